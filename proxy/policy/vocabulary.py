"""The fixed vocabulary of the policy language: actions, effects, masking methods, dotted names and precedence.

Everything here is a constant or a small pure function; the loaders validate files
against it and the engine orders rules by it.
"""

from __future__ import annotations

import re

# Actions a rule can govern. read/write apply to a category; declare/admin to category "*".
READ, WRITE, DECLARE, ADMIN = "read", "write", "declare", "admin"
ACTIONS = (READ, WRITE, DECLARE, ADMIN)
CATEGORY_ACTIONS = (READ, WRITE)
PURPOSE_ACTIONS = (DECLARE, ADMIN)

# Effects, most restrictive first: this order is the precedence (prohibition first).
DENY, AGGREGATE, MASK, ALLOW = "deny", "aggregate", "mask", "allow"
EFFECTS = (DENY, AGGREGATE, MASK, ALLOW)

# Masking methods, the one revealing least first. When two mask rules apply to the
# same request, the one earlier here wins. A method may take an option after a colon
# (``partial:2``, ``generalize:10``); proxy.enforcement.masks says what each accepts.
MASK_METHODS = ("redact", "generalize", "year", "hash", "email_domain", "last4", "partial")

ANY = "*"  # in a rule: any purpose / any category; in a request: "no particular category"

# Default role manager depth in Casbin: hierarchies deeper than this would be cut off.
MAX_DEPTH = 10

_SEGMENT = r"[a-z][a-z0-9_]*"
_DOTTED = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_SUBJECT = re.compile(r"[^\s,*\"']+")
_K = re.compile(r"k\s*=\s*(\d+)")
_METHOD_OPTION = re.compile(r"[A-Za-z0-9_.,-]+")


def is_dotted_name(name: object) -> bool:
    """True for a valid purpose or category name: lower-case segments joined by dots.

    >>> is_dotted_name("contact.email"), is_dotted_name("Contact"), is_dotted_name("a..b")
    (True, False, False)
    """
    return isinstance(name, str) and _DOTTED.fullmatch(name) is not None


def is_subject_name(name: str) -> bool:
    """True for a usable role or group name (no blanks, commas, quotes or wildcard).

    >>> is_subject_name("app"), is_subject_name("billing-svc"), is_subject_name("*"), is_subject_name("a b")
    (True, True, False, False)
    """
    return _SUBJECT.fullmatch(name) is not None


def parent(name: str) -> str | None:
    """The parent of a dotted name, or None at the top.

    >>> parent("marketing.email"), parent("marketing")
    ('marketing', None)
    """
    head, dot, _ = name.rpartition(".")
    return head if dot else None


def ancestors(name: str) -> tuple[str, ...]:
    """The name and every ancestor, nearest first.

    >>> ancestors("a.b.c")
    ('a.b.c', 'a.b', 'a')
    """
    out = [name]
    while (p := parent(out[-1])) is not None:
        out.append(p)
    return tuple(out)


def depth(name: str) -> int:
    """Number of segments of a dotted name.

    >>> depth("contact"), depth("contact.email")
    (1, 2)
    """
    return name.count(".") + 1


def split_method(option: str) -> tuple[str, str | None]:
    """A mask rule's option as (method, method option or None).

    >>> split_method("partial:2"), split_method("hash")
    (('partial', '2'), ('hash', None))
    """
    method, colon, arg = option.partition(":")
    return method.strip(), (arg.strip() if colon else None)


def is_mask_method(option: str) -> bool:
    """True for a known masking method, with or without a well-formed option.

    >>> is_mask_method("last4"), is_mask_method("partial:2,2"), is_mask_method("partial:"), is_mask_method("blur")
    (True, True, False, False)
    """
    method, arg = split_method(option)
    return method in MASK_METHODS and (arg is None or _METHOD_OPTION.fullmatch(arg) is not None)


def parse_k(option: str) -> int | None:
    """The k of an aggregate option ``k=N``, or None when malformed.

    >>> parse_k("k=5"), parse_k("k = 10"), parse_k("5"), parse_k("k=x")
    (5, 10, None, None)
    """
    m = _K.fullmatch(option.strip())
    return int(m.group(1)) if m else None


def precedence(effect: str, method: str | None = None, k: int | None = None) -> tuple[int, int]:
    """Sort key of an effect: lower comes first and wins.

    Deny beats everything; then aggregate-only (larger k first); then mask (the
    method revealing least first); then allow.

    >>> sorted([("allow", None, None), ("mask", "partial", None), ("deny", None, None),
    ...         ("mask", "redact", None), ("aggregate", None, 5), ("aggregate", None, 10)],
    ...        key=lambda e: precedence(*e))  # doctest: +NORMALIZE_WHITESPACE
    [('deny', None, None), ('aggregate', None, 10), ('aggregate', None, 5),
     ('mask', 'redact', None), ('mask', 'partial', None), ('allow', None, None)]
    """
    rank = EFFECTS.index(effect)
    if effect == AGGREGATE:
        return rank, -(k or 0)
    if effect == MASK:
        name = split_method(method)[0] if method else method
        return rank, MASK_METHODS.index(name) if name in MASK_METHODS else -1
    return rank, 0
