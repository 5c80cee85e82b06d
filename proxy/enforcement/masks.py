"""The masking methods: each turns the SQL of a column into the SQL of its masked value, for PostgreSQL to compute.

A method is one function ``(column_sql, option, column_type) -> expression`` in the
registry ``METHODS``; adding a method is adding one decorated function (and its
name to ``proxy.policy.vocabulary.MASK_METHODS``, and its rank, given its option, to
``vocabulary.mask_reading``, which orders masks from the one revealing least). No
method shows a whole value: those keeping a part hide short values whole.
``option`` is what the policy wrote after a colon
(``partial:2``), None without one; ``column_type`` is the column's type as
``format_type`` prints it, None when unknown. Every function and type the
expressions use is schema-qualified (``pg_catalog.left``), and operators are
avoided, so a function or operator of the same name elsewhere on the session's
search_path cannot capture the unmasked value.
"""

from __future__ import annotations

import re
from typing import Callable

MaskMethod = Callable[[str, "str | None", "str | None"], str]
METHODS: dict[str, MaskMethod] = {}

# Methods that cannot mask a column whose type is unknown (a schema file without ``types:``).
NEEDS_TYPE = frozenset({"generalize"})
# Methods whose result also depends on the purpose the statement runs under (``mask_sql``'s ``scope``):
# a pseudonym is the purpose's own, so two purposes' pseudonymised data cannot be joined on it.
SCOPED = frozenset({"hash"})
PSEUDONYM_FUNCTION = "purpose_proxy.pseudonym"  # installed by ``purpose-proxy install``
STARS = "'****'"  # stands for what a method hides (fixed length: it reveals no length)


class MaskError(ValueError):
    """A method cannot mask this column (bad option, or a type it does not handle)."""


def method(name: str) -> Callable[[MaskMethod], MaskMethod]:
    """Register a masking method under ``name``."""

    def register(fn: MaskMethod) -> MaskMethod:
        METHODS[name] = fn
        return fn

    return register


# -- small helpers ---------------------------------------------------------------------------------

def literal(value: str) -> str:
    """A SQL string literal.

    >>> literal("it's")
    "'it''s'"
    """
    return "'" + value.replace("'", "''") + "'"


def as_text(col: str) -> str:
    """The column as text, whatever its type.

    >>> as_text("t.email")
    '(t.email)::pg_catalog.text'
    """
    return f"({col})::pg_catalog.text"


def unless_null(col: str, expression: str) -> str:
    """``expression``, but NULL where the column is NULL (NULL stays NULL, and reveals nothing more).

    >>> unless_null("c", "'x'")
    "(CASE WHEN (c) IS NULL THEN NULL ELSE 'x' END)"
    """
    return f"(CASE WHEN ({col}) IS NULL THEN NULL ELSE {expression} END)"


def count_option(option: str | None, default: int, name: str, upper: int = 1000) -> int:
    """A non-negative whole-number option (``default`` without one).

    >>> count_option("3", 1, "partial"), count_option(None, 1, "partial")
    (3, 1)
    >>> count_option("x", 1, "partial")
    Traceback (most recent call last):
    ...
    proxy.enforcement.masks.MaskError: partial: option 'x' is not a whole number from 0 to 1000
    """
    if option is None or option == "":
        return default
    if not option.isdigit() or int(option) > upper:
        raise MaskError(f"{name}: option {option!r} is not a whole number from 0 to {upper}")
    return int(option)


def type_family(column_type: str | None) -> str | None:
    """What kind of value a column type holds: integer, numeric, text, date, timestamp, timestamptz (None: other).

    >>> [type_family(t) for t in ("integer", "numeric(10,2)", "character varying(8)", "date",
    ...                           "timestamp(3) with time zone", "jsonb", None)]
    ['integer', 'numeric', 'text', 'date', 'timestamptz', None, None]
    """
    if column_type is None:
        return None
    t = re.sub(r"\(.*?\)", "", column_type.lower()).strip()
    if t in ("smallint", "integer", "bigint"):
        return "integer"
    if t in ("numeric", "real", "double precision", "money"):
        return "numeric" if t != "money" else None
    if t in ("text", "character varying", "character", "bpchar", "name", "citext"):
        return "text"
    if t == "date":
        return "date"
    if t == "timestamp without time zone":
        return "timestamp"
    if t == "timestamp with time zone":
        return "timestamptz"
    return None


# Built-in types whose modifier (a length, a precision) ``format_type`` prints, as pg_catalog names: the
# modifier is part of the result's shape (RowDescription's type modifier: ``varchar(20)``, ``numeric(10,2)``),
# and an expression over the column (``CASE``, ``date_trunc``) loses it unless it is cast back.
_MODIFIED_TYPES = (
    (re.compile(r"character varying(\(\d+\))"), "pg_catalog.varchar"),
    (re.compile(r"character(\(\d+\))"), "pg_catalog.bpchar"),
    (re.compile(r"numeric(\(\d+(?:,-?\d+)?\))"), "pg_catalog.numeric"),
    (re.compile(r"timestamp(\(\d\)) without time zone"), "pg_catalog.timestamp"),
    (re.compile(r"timestamp(\(\d\)) with time zone"), "pg_catalog.timestamptz"),
    (re.compile(r"time(\(\d\)) without time zone"), "pg_catalog.time"),
    (re.compile(r"time(\(\d\)) with time zone"), "pg_catalog.timetz"),
)


def keep_modifier(expression: str, column_type: str | None) -> str:
    """``expression`` cast back to the column's type where that type has a modifier, so that a result of the
    column's own type keeps its length or precision too (other types, and unknown ones, are left as they are:
    their expression already has the column's full type).

    >>> keep_modifier("x", "character varying(20)"), keep_modifier("x", "numeric(10,2)")
    ('(x)::pg_catalog.varchar(20)', '(x)::pg_catalog.numeric(10,2)')
    >>> keep_modifier("x", "timestamp(0) with time zone"), keep_modifier("x", "text"), keep_modifier("x", None)
    ('(x)::pg_catalog.timestamptz(0)', 'x', 'x')
    """
    for pattern, name in _MODIFIED_TYPES:
        found = pattern.fullmatch(column_type or "")
        if found:
            return f"({expression})::{name}{found[1]}"
    return expression


# -- the methods -------------------------------------------------------------------------------------

@method("redact")
def redact(col: str, option: str | None = None, column_type: str | None = None) -> str:
    """NULL of the column's own type, or with an option that constant (of the column's type) for every row.
    A type with a modifier keeps it (``keep_modifier``; a constant longer than a ``varchar(n)`` is cut to n
    characters, as by any explicit cast).

    >>> redact("t.email")
    '(CASE WHEN false THEN t.email END)'
    >>> redact("t.email", "hidden")
    "(CASE WHEN false THEN t.email ELSE 'hidden' END)"
    >>> redact("t.amount", None, "numeric(10,2)")
    '((CASE WHEN false THEN t.amount END))::pg_catalog.numeric(10,2)'
    """
    if option:
        return keep_modifier(f"(CASE WHEN false THEN {col} ELSE {literal(option)} END)", column_type)
    return keep_modifier(f"(CASE WHEN false THEN {col} END)", column_type)


@method("partial")
def partial(col: str, option: str | None = None, column_type: str | None = None) -> str:
    """The first N (and last M) characters, the rest replaced by ``****``; option ``N`` or ``N,M`` (default 1).

    Values no longer than N + M are hidden whole.

    >>> partial("t.name", "2,1")  # doctest: +NORMALIZE_WHITESPACE
    "(CASE WHEN (t.name) IS NULL THEN NULL ELSE (CASE WHEN pg_catalog.length((t.name)::pg_catalog.text) <= 3
      THEN '****' ELSE pg_catalog.concat(pg_catalog.left((t.name)::pg_catalog.text, 2), '****',
      pg_catalog.right((t.name)::pg_catalog.text, 1)) END) END)"
    """
    first_s, _, last_s = (option or "1").partition(",")
    first = count_option(first_s, 1, "partial")
    last = count_option(last_s, 0, "partial")
    text = as_text(col)
    parts = [f"pg_catalog.left({text}, {first})", STARS]
    if last:
        parts.append(f"pg_catalog.right({text}, {last})")
    shown = f"pg_catalog.concat({', '.join(parts)})"
    return unless_null(col, f"(CASE WHEN pg_catalog.length({text}) <= {first + last} THEN {STARS} "
                            f"ELSE {shown} END)")


@method("last4")
def last4(col: str, option: str | None = None, column_type: str | None = None) -> str:
    """``****`` and the last four characters (values of four or fewer are hidden whole).

    >>> last4("c.card_number")  # doctest: +NORMALIZE_WHITESPACE
    "(CASE WHEN (c.card_number) IS NULL THEN NULL ELSE (CASE WHEN
      pg_catalog.length((c.card_number)::pg_catalog.text) <= 4 THEN '****' ELSE pg_catalog.concat('****',
      pg_catalog.right((c.card_number)::pg_catalog.text, 4)) END) END)"
    """
    if option:
        raise MaskError("last4 takes no option")
    text = as_text(col)
    return unless_null(col, f"(CASE WHEN pg_catalog.length({text}) <= 4 THEN {STARS} "
                            f"ELSE pg_catalog.concat({STARS}, pg_catalog.right({text}, 4)) END)")


@method("email_domain")
def email_domain(col: str, option: str | None = None, column_type: str | None = None) -> str:
    """Only the domain of an e-mail address, as ``***@domain`` (no ``@``: hidden whole).

    >>> email_domain("m.email")  # doctest: +NORMALIZE_WHITESPACE
    "(CASE WHEN (m.email) IS NULL THEN NULL ELSE (CASE WHEN pg_catalog.strpos((m.email)::pg_catalog.text, '@') > 0
      THEN pg_catalog.concat('***@', pg_catalog.regexp_replace((m.email)::pg_catalog.text, '^.*@', ''))
      ELSE '****' END) END)"
    """
    if option:
        raise MaskError("email_domain takes no option")
    text = as_text(col)
    return unless_null(col, f"(CASE WHEN pg_catalog.strpos({text}, '@') > 0 THEN pg_catalog.concat('***@', "
                            f"pg_catalog.regexp_replace({text}, '^.*@', '')) ELSE {STARS} END)")


@method("hash")
def hash_(col: str, option: str | None = None, column_type: str | None = None, scope: str | None = None) -> str:
    """A stable keyed pseudonym: the same value gives the same pseudonym under one key and one ``scope``, and
    the key stays in the database (``purpose-proxy install`` creates the function and the key). The rewrite
    gives the statement's purpose as ``scope``: the key is then, in effect, the purpose's own, and the same
    member id gets unrelated pseudonyms under ``marketing.ads`` and ``research`` (a purpose promised not to
    identify the person would otherwise share its pseudonyms with every purpose that can map them back).
    The scope ends in ``|``, which no purpose name holds, so (scope, value) pairs never give the same text;
    ``textcat`` is strict, so NULL stays NULL.

    >>> hash_("m.email")
    'purpose_proxy.pseudonym((m.email)::pg_catalog.text)'
    >>> hash_("m.email", scope="marketing.ads")
    "purpose_proxy.pseudonym(pg_catalog.textcat('marketing.ads|', (m.email)::pg_catalog.text))"
    """
    if option:
        raise MaskError("hash takes no option")
    if scope is None:
        return f"{PSEUDONYM_FUNCTION}({as_text(col)})"
    if "|" in scope:
        raise MaskError(f"a pseudonym's scope may not hold '|': {scope!r}")
    return f"{PSEUDONYM_FUNCTION}(pg_catalog.textcat({literal(scope + '|')}, {as_text(col)}))"


_YEAR_OF = {
    "date": "(pg_catalog.date_trunc('year', ({col})::pg_catalog.timestamp))::pg_catalog.date",
    "timestamp": "pg_catalog.date_trunc('year', {col})",
    "timestamptz": "pg_catalog.date_trunc('year', {col})",
}


@method("year")
def year(col: str, option: str | None = None, column_type: str | None = None) -> str:
    """Dates (and timestamps) to the first day of their year, keeping the column's type where it is a date or
    timestamp; other types are read as a timestamp and give a date.

    >>> year("m.birth_date", None, "date")
    "(pg_catalog.date_trunc('year', (m.birth_date)::pg_catalog.timestamp))::pg_catalog.date"
    >>> year("e.seen_at", None, "timestamp with time zone")
    "pg_catalog.date_trunc('year', e.seen_at)"
    >>> year("e.seen_at", None, "timestamp(0) without time zone")
    "(pg_catalog.date_trunc('year', e.seen_at))::pg_catalog.timestamp(0)"
    """
    if option:
        raise MaskError("year takes no option")
    family = type_family(column_type) or "date"
    return keep_modifier(_YEAR_OF.get(family, _YEAR_OF["date"]).format(col=col),
                         column_type if family in _YEAR_OF else None)


_UNITS = ("year", "quarter", "month", "decade", "century")


@method("generalize")
def generalize(col: str, option: str | None = None, column_type: str | None = None) -> str:
    """Numbers to the range of width N they fall in (default 10; text: ``60-69`` for whole numbers, ``[60,70)``
    otherwise), text such as postal codes to its first N characters (default 3) and ``***``, dates and
    timestamps to the start of a unit (option year, quarter, month, decade or century; default year).
    Needs the column's type.

    On text, values of N characters or fewer become ``***``: a prefix must never be the
    whole value (``generalize:20`` on a 16-digit card number would otherwise show all of it).

    >>> generalize("m.age", "5", "integer")  # doctest: +ELLIPSIS
    "(CASE WHEN (m.age) IS NULL THEN NULL ELSE pg_catalog.concat((...)::pg_catalog.int8, '-', ...) END)"
    >>> generalize("m.postal_code", None, "text")  # doctest: +NORMALIZE_WHITESPACE
    "(CASE WHEN (m.postal_code) IS NULL THEN NULL ELSE (CASE WHEN
      pg_catalog.length((m.postal_code)::pg_catalog.text) <= 3 THEN '***' ELSE
      pg_catalog.concat(pg_catalog.left((m.postal_code)::pg_catalog.text, 3), '***') END) END)"
    >>> generalize("m.x", None, None)
    Traceback (most recent call last):
    ...
    proxy.enforcement.masks.MaskError: generalize needs the type of the column (read the schema from the database)
    """
    family = type_family(column_type)
    if family in ("integer", "numeric"):
        width = count_option(option, 10, "generalize", upper=10 ** 12)
        if width < (2 if family == "integer" else 1):  # a range of one whole number is the number
            raise MaskError(f"generalize: the width must be at least {2 if family == 'integer' else 1}")
        n = f"'{width}'::pg_catalog.numeric"
        low = (f"pg_catalog.numeric_mul(pg_catalog.floor(pg_catalog.numeric_div(({col})::pg_catalog.numeric, {n})), "
               f"{n})")
        if family == "integer":
            last = f"pg_catalog.numeric_add({low}, '{width - 1}'::pg_catalog.numeric)"
            return unless_null(col, f"pg_catalog.concat(({low})::pg_catalog.int8, '-', ({last})::pg_catalog.int8)")
        high = f"pg_catalog.numeric_add({low}, {n})"
        return unless_null(col, f"pg_catalog.concat('[', {low}, ',', {high}, ')')")
    if family == "text":
        keep = count_option(option, 3, "generalize")
        text = as_text(col)
        return unless_null(col, f"(CASE WHEN pg_catalog.length({text}) <= {keep} THEN '***' "
                                f"ELSE pg_catalog.concat(pg_catalog.left({text}, {keep}), '***') END)")
    if family in ("date", "timestamp", "timestamptz"):
        unit = option or "year"
        if unit not in _UNITS:
            raise MaskError(f"generalize: unit {unit!r} is not one of {', '.join(_UNITS)}")
        if family == "date":
            return f"(pg_catalog.date_trunc({literal(unit)}, ({col})::pg_catalog.timestamp))::pg_catalog.date"
        return keep_modifier(f"pg_catalog.date_trunc({literal(unit)}, {col})", column_type)
    if column_type is None:
        raise MaskError("generalize needs the type of the column (read the schema from the database)")
    raise MaskError(f"generalize does not handle columns of type {column_type}")


def mask_sql(col: str, method_option: str, column_type: str | None = None, scope: str | None = None) -> str:
    """The masked expression for a policy's method (``name`` or ``name:option``); ``scope`` (the statement's
    purpose) is passed to the methods in ``SCOPED``.

    >>> mask_sql("t.c", "redact")
    '(CASE WHEN false THEN t.c END)'
    >>> mask_sql("t.c", "hash", None, "research")
    "purpose_proxy.pseudonym(pg_catalog.textcat('research|', (t.c)::pg_catalog.text))"
    >>> mask_sql("t.c", "blur")
    Traceback (most recent call last):
    ...
    proxy.enforcement.masks.MaskError: unknown masking method 'blur'
    """
    name, _, option = method_option.partition(":")
    fn = METHODS.get(name)
    if fn is None:
        raise MaskError(f"unknown masking method {name!r}")
    if name in SCOPED:
        return fn(col, option or None, column_type, scope)
    return fn(col, option or None, column_type)
