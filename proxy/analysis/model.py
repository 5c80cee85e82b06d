"""The values SQL analysis produces: which base-table columns a statement uses, and how.

These are the contract between ``proxy.analysis`` (which fills them from sqlglot
trees and the live schema) and ``proxy.policy`` (which decides on them). Views are
already resolved to the base columns they read.

For the SQL rewrite (``proxy.enforcement.rewrite``) each statement also lists where
its relation references are in the text (``RelationRef``) and where statistical
aggregates over base columns are computed (``AggregateCall``), as character and
token positions: enough to rewrite the statement by substituting text, without
parsing it again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple


class Use(enum.Flag):
    """How a statement uses a column. Several can hold at once."""

    NONE = 0
    PROJECT = enum.auto()  # its value can reach the client (select list, RETURNING, COPY TO)
    FILTER = enum.auto()  # WHERE/HAVING/JOIN ON/USING, GROUP BY, ORDER BY, window, DISTINCT ON
    WRITE = enum.auto()  # INSERT column or UPDATE SET target
    DELETE = enum.auto()  # DELETE/TRUNCATE removes rows: every column of the table
    WHOLE_ROW = enum.auto()  # through a whole-row reference (SELECT t FROM t, row_to_json(t), t.*::text)
    AGGREGATE = enum.auto()  # only inside an aggregate function (count(x), avg(x), ...)

    # Flag's operators and hash are Python code in enum (a member lookup through the enum
    # machinery each); the analysis combines uses for every column reference. Every
    # combination is a cached singleton (_COMBINATIONS), so identity hashing is consistent.
    __hash__ = object.__hash__

    def __or__(self, other: Use) -> Use:
        if other.__class__ is not Use:
            return NotImplemented
        return _COMBINATIONS[self._value_ | other._value_]

    def __and__(self, other: Use) -> Use:
        if other.__class__ is not Use:
            return NotImplemented
        return _COMBINATIONS[self._value_ & other._value_]

    @property
    def reads(self) -> bool:
        return bool(self._value_ & _READ_BITS)

    @property
    def writes(self) -> bool:
        return bool(self._value_ & _WRITE_BITS)


_COMBINATIONS = tuple(enum.Flag.__or__(Use(v), Use.NONE) for v in range(1 << (len(Use.__members__) - 1)))
_READ_BITS = (Use.PROJECT | Use.FILTER | Use.WHOLE_ROW | Use.AGGREGATE).value
_WRITE_BITS = (Use.WRITE | Use.DELETE).value


class Column(NamedTuple):
    """A base-table column, fully qualified and in PostgreSQL's case (unquoted names lowered).

    A named tuple, not a dataclass: the analysis hashes and compares hundreds of them per
    statement, and a tuple does both in C (a frozen dataclass's ``__hash__`` and ``__eq__``
    are Python code).
    """

    schema: str
    table: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}.{self.name}"


class Table(NamedTuple):
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


class Kind(str, enum.Enum):
    """What a statement is, for policy (action), audit and the decision cache."""

    SELECT = "select"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    MERGE = "merge"
    COPY_TO = "copy_to"
    COPY_FROM = "copy_from"
    TRUNCATE = "truncate"
    DDL = "ddl"  # CREATE/ALTER/DROP/GRANT/COMMENT/...: an administrative action
    SET = "set"  # SET/RESET/SET LOCAL
    SHOW = "show"
    TRANSACTION = "transaction"  # BEGIN/COMMIT/ROLLBACK/SAVEPOINT/...
    UTILITY = "utility"  # harmless utilities: LISTEN/NOTIFY/UNLISTEN/DISCARD/DEALLOCATE/CLOSE/FETCH/...
    PREPARE = "prepare"
    EXECUTE = "execute"
    DECLARE = "declare"
    EXPLAIN = "explain"
    CALL = "call"
    DO = "do"
    EMPTY = "empty"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of SQL text: characters ``[start, end)`` and tokens ``[first, last)``.

    Character offsets are into ``Analysis.sql`` (or, for references inside a view,
    into the view's definition ``RelationRef.definition``); token indexes are into the
    tokens ``proxy.analysis.lexer.scan`` reads from that same text, so that a statement
    of the same shape with other literals maps to the same tokens.
    """

    start: int
    end: int
    first: int
    last: int


@dataclass(slots=True, eq=False)
class RelationRef:
    """One reference to a stored relation (table, view, materialized view, ...) in a statement.

    ``span`` covers ``[ONLY] [[catalog.]schema.]name`` (and a leading ``TABLE`` for the
    ``TABLE name`` form, then ``table_command`` is set); the alias, if any, follows it.
    ``problems`` says why the reference could not be replaced by a derived table of the
    same name (e.g. TABLESAMPLE, or a column named ``schema.table.column`` through it).
    For a view, ``inner`` and ``aggregates`` are the references and aggregates of its
    definition, with spans into ``definition``. For the target of a top-level UPDATE or
    DELETE, ``where`` is the span of its WHERE condition and ``where_at`` the offset
    where a WHERE clause would go when it has none.
    """

    table: Table
    kind: str  # a proxy.analysis.schema relation kind: table, view, materialized_view, ...
    span: Span | None  # None only if the analysis could not place it (then it is never substituted)
    alias: str | None = None
    alias_columns: tuple[str, ...] = ()
    target: bool = False  # the relation an INSERT/UPDATE/DELETE/MERGE writes
    only: bool = False
    table_command: bool = False
    problems: list[str] = field(default_factory=list)
    inner: list["RelationRef"] = field(default_factory=list)
    aggregates: list["AggregateCall"] = field(default_factory=list)
    definition: str | None = None
    functions: frozenset[str] = frozenset()  # for a view: the functions its definition calls
    statement: str = ""  # for a target: the statement kind (insert, update, delete, merge)
    top_level: bool = False  # for a target: the statement itself, not a WITH query
    where: Span | None = None
    where_at: int | None = None
    where_token: int | None = None  # the token ``where_at`` is before (the number of tokens: at the end)
    conflict_update: bool = False  # INSERT ... ON CONFLICT DO UPDATE
    # ``column = constant`` conjuncts of the WHERE of the block reading this reference, as
    # (the column's index among the relation's columns, the constant's span in the whole
    # string, its kind: "int", "str" or "param"): the rewrite may test them inside the
    # derived table too, so that a consent-filtered lookup can use an index.
    pushable: list[tuple[int, int, int, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The name the reference is known by in its query: its alias, or the relation's name."""
        return self.alias if self.alias is not None else self.table.name


@dataclass(slots=True, eq=False)
class AggregateBlock:
    """A query block (one SELECT) in which statistical aggregates are computed.

    ``having`` is the span of its HAVING condition; without one, ``having_at`` is the
    character offset where a HAVING clause goes (before WINDOW/ORDER BY/LIMIT/... or at
    the end of the block). Offsets are into the text of the statement or view holding it.
    """

    select: int  # token index of its SELECT keyword
    having: Span | None = None
    having_at: int | None = None
    having_token: int | None = None  # the token ``having_at`` is before (the number of tokens: at the end)


@dataclass(slots=True, eq=False)
class AggregateCall:
    """One statistical aggregate (count, sum, avg, ...) whose input reads base columns.

    ``ref`` is set when its one argument is a plain column (or DISTINCT column) of a
    relation reference in the FROM list of the same query block (``block``), with no
    FILTER, ORDER BY or further arguments: only such calls can be held to a minimum
    group size by a HAVING clause on that block. ``sole`` says that reference is the
    block's only FROM item.
    """

    columns: frozenset[Column]
    ref: RelationRef | None = None
    block: AggregateBlock | None = None
    sole: bool = False
    why: str = ""  # why it is not of the simple form


@dataclass(slots=True, eq=False)
class KeyGroup:
    """A query block grouped by the whole primary key of a table reference in its FROM list.

    PostgreSQL then lets the block use the table's other columns outside aggregates
    (they are functionally dependent on the key; documentation 7.2.3, SELECT's GROUP BY
    clause). A derived table has no key, so when the rewrite substitutes ``ref`` it
    appends ``used`` to the GROUP BY, less ``grouped``. Columns are indexes into the
    relation's columns; ``at`` is the character offset just after the GROUP BY list
    (and ``token`` the index of the token after it).
    """

    ref: RelationRef
    at: int
    token: int
    grouped: frozenset[int]
    used: tuple[int, ...]
    whole_row: bool = False  # the block uses the reference's whole row outside aggregates


@dataclass(slots=True)
class StatementAccess:
    """The analysis of one statement of a (possibly multi-statement) SQL string."""

    kind: Kind
    columns: dict[Column, Use] = field(default_factory=dict)
    tables: dict[Table, Use] = field(default_factory=dict)  # relation-level use (e.g. count(*))
    functions: set[str] = field(default_factory=set)  # schema-qualified, lower case
    # Reasons the analysis cannot vouch for the statement: non-empty means fail closed.
    unsupported: list[str] = field(default_factory=list)
    # SET/RESET of settings the proxy tracks: (name lower case, value or None for RESET, is_local)
    settings: list[tuple[str, str | None, bool]] = field(default_factory=list)
    # For PREPARE name AS ...: the prepared statement name; for EXECUTE name: the name run.
    prepared_name: str | None = None
    # For PREPARE / DECLARE / EXPLAIN ANALYZE: the analysis of the inner statement.
    inner: "StatementAccess | None" = None
    # Where the statement's relation references and statistical aggregates are (for the
    # rewrite); for PREPARE/DECLARE/EXPLAIN those of the inner statement are on ``inner``.
    references: list[RelationRef] = field(default_factory=list)
    aggregates: list[AggregateCall] = field(default_factory=list)
    # Blocks grouped by a relation's primary key (``KeyGroup``), for the rewrite.
    key_groups: list[KeyGroup] = field(default_factory=list)
    # The analysis depended on the value of a constant (an ORDER BY/GROUP BY position, a
    # set_config name): a statement of the same shape with other constants may differ.
    reads_constants: bool = False
    # The statement is ``SELECT [pg_catalog.]set_config('name', 'value', false|true)`` and nothing else: a SET
    # by another name, run exactly once (pg_dump and pg_restore open with one for search_path).
    set_command: bool = False
    # DECLARE ... WITH HOLD: the cursor outlives its transaction (read from the tokens).
    holdable: bool = False
    # DECLARE name / FETCH ... name: the cursor declared or read.
    cursor: str | None = None
    # Code PostgreSQL runs now or later that the analysis cannot read (a DO block, a
    # procedure, a function or trigger body, a DEFAULT or CHECK expression...): what it is.
    opaque_code: str | None = None
    # Where the statement stores values of base columns: a written base column, or a place
    # outside the catalog named in words (a notification payload, a setting, ...) -> the
    # columns whose values (not only statistics of them) reach it.
    copies: dict["Column | str", set[Column]] = field(default_factory=dict)
    # User-defined functions behind casts, which the statement may run without naming them
    # (``Schema.casts``): the policy treats them as called.
    cast_functions: set[str] = field(default_factory=set)
    # User-defined functions PostgreSQL runs for the statement without it naming them (behind an
    # operator, an operator class, a domain, an event trigger; a trigger, column default, CHECK
    # constraint, index or row-level security policy of a relation it writes or reads:
    # ``Schema.implicit``, ``on_write``, ``on_read``) -> why, in words ("runs in a trigger on
    # crm.members"): the policy treats them as called.
    implicit_functions: dict[str, str] = field(default_factory=dict)

    def use(self, column: Column, how: Use) -> None:
        self.columns[column] = self.columns.get(column, Use.NONE) | how


@dataclass(slots=True)
class Analysis:
    """The analysis of one SQL string (a Query message or a Parse)."""

    sql: str
    statements: list[StatementAccess]
    error: str | None = None  # a parse failure: fail closed

    @property
    def columns(self) -> dict[Column, Use]:
        out: dict[Column, Use] = {}
        for st in self.statements:
            for c, u in st.columns.items():
                out[c] = out.get(c, Use.NONE) | u
        return out
