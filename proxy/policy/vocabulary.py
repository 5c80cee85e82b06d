"""The fixed vocabulary of the policy language: actions, effects, masking methods, dotted names and precedence.

Everything here is a constant or a small pure function; the loaders validate files
against it and the engine orders rules by it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

# Actions a rule can govern. read/write apply to a category; declare/admin to category "*".
READ, WRITE, DECLARE, ADMIN = "read", "write", "declare", "admin"
ACTIONS = (READ, WRITE, DECLARE, ADMIN)
CATEGORY_ACTIONS = (READ, WRITE)
PURPOSE_ACTIONS = (DECLARE, ADMIN)

# Effects, most restrictive first: this order is the precedence (prohibition first).
DENY, AGGREGATE, MASK, ALLOW = "deny", "aggregate", "mask", "allow"
EFFECTS = (DENY, AGGREGATE, MASK, ALLOW)

# Masking methods. A method may take an option after a colon (``partial:2``,
# ``generalize:10``); proxy.enforcement.masks says what each accepts. Which of two mask
# rules wins is not this tuple's order but ``mask_key`` (what each reveals, given its option).
MASK_METHODS = ("redact", "generalize", "year", "hash", "email_domain", "last4", "partial")

# The units generalize truncates dates to, coarsest (revealing least) first.
DATE_UNITS = ("century", "decade", "year", "quarter", "month")

# What a mask reveals, least first: the tiers of the order in policies/README.md. Across
# tiers the order is a convention (a hash and a year are not comparable by content);
# within a tier the amount decides (date units by fineness, characters by their count).
NOTHING, PERIOD, EQUALITY, DOMAIN, CHARACTERS = range(5)
# Defaults of the options, as proxy.enforcement.masks applies them.
PARTIAL_DEFAULT = 1
GENERALIZE_TEXT_DEFAULT = 3

ANY = "*"  # in a rule: any purpose / any category; in a request: "no particular category"

# Default role manager depth in Casbin: hierarchies deeper than this would be cut off.
MAX_DEPTH = 10

_SEGMENT = r"[a-z][a-z0-9_]*"
_DOTTED = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_SUBJECT = re.compile(r"[^\s,*\"']+")
_K = re.compile(r"k\s*=\s*(\d+)")
_METHOD_OPTION = re.compile(r"[A-Za-z0-9_.,-]+")
_PARTIAL_OPTION = re.compile(r"(\d+)(?:,(\d*))?")


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


def mask_key(option: str | None) -> tuple[int, int, int, str]:
    """Sort key of a mask rule's method and option: lower reveals less and wins.

    (tier, amount, characters from the end, canonical option). Tiers: redact (nothing),
    dates truncated to a unit (``year``, ``generalize:<unit>``, coarser first), hash
    (equality only), email_domain, then methods showing characters of the value, by how
    many they can show (``partial:N,M`` N + M, ``last4`` 4, ``generalize`` with a length
    N on text; the start of a number, an area code or issuer, identifies less than its
    end, so with equal counts fewer from the end wins). A malformed option sorts first:
    the rewrite refuses it, so it fails closed.

    >>> sorted(["last4", "partial:8", "partial", "hash", "generalize:month", "year", "redact"], key=mask_key)
    ['redact', 'year', 'generalize:month', 'hash', 'partial', 'last4', 'partial:8']
    >>> sorted(["partial:0,2", "partial:2", "generalize:20", "last4"], key=mask_key)
    ['partial:2', 'partial:0,2', 'last4', 'generalize:20']
    >>> mask_key("partial:x") < mask_key("redact")
    True
    """
    reading = mask_reading(option or "")
    return reading[:4] if reading is not None else (-1, 0, 0, option or "")


class MaskReading(NamedTuple):
    """What a mask reveals: its tier, the amount within it, how much of the amount comes from the end of the
    value, the option in canonical form (equal for options that mean the same), and the method."""

    tier: int
    amount: int
    from_end: int
    option: str
    method: str

    @property
    def sized_generalize(self) -> bool:
        """``generalize`` with a length or width, or without an option: its meaning depends on the type."""
        return self.method == "generalize" and self.tier == CHARACTERS


@lru_cache(maxsize=1024)  # a policy has few distinct options; rules are compared per table cell
def mask_reading(option: str) -> MaskReading | None:
    """How much a mask rule's method and option reveal; None when the option is malformed.

    >>> mask_reading("partial") == mask_reading("partial:1,0") == (CHARACTERS, 1, 0, "1,0", "partial")
    True
    >>> tuple(mask_reading("last4")), tuple(mask_reading("generalize:07")), tuple(mask_reading("generalize:month"))
    ((4, 4, 4, '', 'last4'), (4, 7, 0, '7', 'generalize'), (1, 4, 0, 'month', 'generalize'))
    >>> mask_reading("year:2"), mask_reading("partial:1,2,3"), mask_reading("generalize:weekly")
    (None, None, None)
    """
    if not is_mask_method(option):
        return None
    method, arg = split_method(option)
    if method == "redact":
        return MaskReading(NOTHING, 0, 0, arg or "", method)
    fixed = {"year": (PERIOD, DATE_UNITS.index("year"), 0), "hash": (EQUALITY, 0, 0), "email_domain": (DOMAIN, 0, 0),
             "last4": (CHARACTERS, 4, 4)}
    if method in fixed:
        return MaskReading(*fixed[method], "", method) if arg is None else None
    if method == "partial":
        m = _PARTIAL_OPTION.fullmatch(arg if arg is not None else str(PARTIAL_DEFAULT))
        if m is None:
            return None
        first, last = int(m.group(1)), int(m.group(2) or 0)
        return MaskReading(CHARACTERS, first + last, last, f"{first},{last}", method)
    # generalize: a date unit; or a length (text) or width (numbers), ranked as the N characters it shows
    # of text (the reading where it shows the value itself); mask_conflict covers the other readings.
    if arg in DATE_UNITS:
        return MaskReading(PERIOD, DATE_UNITS.index(arg), 0, arg, method)
    if arg is None:
        return MaskReading(CHARACTERS, GENERALIZE_TEXT_DEFAULT, 0, "", method)
    return MaskReading(CHARACTERS, int(arg), 0, str(int(arg)), method) if arg.isdigit() else None


def mask_conflict(a: str, b: str) -> bool:
    """True when two mask rules' methods cannot be ordered by what they reveal without the column's type.

    ``generalize`` with a length or width (or none) shows the first N characters of text
    (more for a larger N) but a range of width N of a number (less for a larger N), and
    how many characters a range or ``last4`` shows of a number depends on its size: no
    order of such a rule and another mask is right for every column. ``redact`` and
    ``hash`` show no part of any value, and two identical masks do not conflict.

    >>> mask_conflict("generalize:10", "generalize:20"), mask_conflict("generalize:20", "last4")
    (True, True)
    >>> mask_conflict("generalize", "hash"), mask_conflict("generalize:month", "year")
    (False, False)
    >>> mask_conflict("partial:8", "partial"), mask_conflict("redact", "redact:hidden")
    (False, False)
    >>> mask_conflict("generalize:3", "generalize:03"), mask_conflict("generalize", "generalize:3")
    (False, True)
    """
    ra, rb = mask_reading(a), mask_reading(b)
    if ra is None or rb is None or ra == rb:
        return False  # a malformed option wins the order and is refused by the rewrite anyway
    if not (ra.sized_generalize or rb.sized_generalize):
        return False
    other = rb if ra.sized_generalize else ra
    return other.sized_generalize or other.tier not in (NOTHING, EQUALITY)


def precedence(effect: str, method: str | None = None, k: int | None = None) -> tuple:
    """Sort key of an effect: lower comes first and wins.

    Deny beats everything; then aggregate-only (larger k first); then mask (the
    method revealing least first, given its option: ``mask_key``); then allow.

    >>> sorted([("allow", None, None), ("mask", "partial", None), ("deny", None, None),
    ...         ("mask", "redact", None), ("aggregate", None, 5), ("aggregate", None, 10)],
    ...        key=lambda e: precedence(*e))  # doctest: +NORMALIZE_WHITESPACE
    [('deny', None, None), ('aggregate', None, 10), ('aggregate', None, 5),
     ('mask', 'redact', None), ('mask', 'partial', None), ('allow', None, None)]
    >>> precedence("mask", "partial:8") > precedence("mask", "partial") > precedence("mask", "hash")
    True
    """
    rank = EFFECTS.index(effect)
    if effect == AGGREGATE:
        return rank, -(k or 0)
    if effect == MASK:
        return (rank,) + mask_key(method)
    return rank, 0
