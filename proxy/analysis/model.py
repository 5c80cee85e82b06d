"""The values SQL analysis produces: which base-table columns a statement uses, and how.

These are the contract between ``proxy.analysis`` (which fills them from sqlglot
trees and the live schema) and ``proxy.policy`` (which decides on them). Views are
already resolved to the base columns they read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Use(enum.Flag):
    """How a statement uses a column. Several can hold at once."""

    NONE = 0
    PROJECT = enum.auto()  # its value can reach the client (select list, RETURNING, COPY TO)
    FILTER = enum.auto()  # WHERE/HAVING/JOIN ON/USING, GROUP BY, ORDER BY, window, DISTINCT ON
    WRITE = enum.auto()  # INSERT column or UPDATE SET target
    DELETE = enum.auto()  # DELETE/TRUNCATE removes rows: every column of the table
    WHOLE_ROW = enum.auto()  # through a whole-row reference (SELECT t FROM t, row_to_json(t), t.*::text)
    AGGREGATE = enum.auto()  # only inside an aggregate function (count(x), avg(x), ...)

    @property
    def reads(self) -> bool:
        return bool(self & (Use.PROJECT | Use.FILTER | Use.WHOLE_ROW | Use.AGGREGATE))

    @property
    def writes(self) -> bool:
        return bool(self & (Use.WRITE | Use.DELETE))


@dataclass(frozen=True, order=True, slots=True)
class Column:
    """A base-table column, fully qualified and in PostgreSQL's case (unquoted names lowered)."""

    schema: str
    table: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}.{self.name}"


@dataclass(frozen=True, order=True, slots=True)
class Table:
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
