"""The database schema the analysis resolves names against, and loading it from a live server.

A ``Schema`` is a value: relations (tables, partitioned and foreign tables,
materialized views, views) with their ordered column names and, for views and
materialized views, their definition; functions by qualified name with their
language, volatility and kind; the user-defined functions PostgreSQL runs without a
statement naming them (behind casts, operators, operator families, domains, event
triggers; a relation's triggers, defaults, constraints, indexes, row-level security
policies) and the relations with rules; each table's parents (partitions and inheritance
children, ``pg_inherits``), whose catalog entries it shares; a ``version`` string that changes
whenever any of that changes (for the decision cache). ``Schema.from_dict`` reads the form used by
tests and by ``purpose-proxy explain --schema FILE``; ``load_schema`` reads the
catalogs of a live server through asyncpg. This module is the only one of
``proxy.analysis`` that does I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from proxy.analysis.model import Column, Table

BUILTIN_SCHEMAS = frozenset({"pg_catalog", "information_schema"})

TABLE = "table"
PARTITIONED_TABLE = "partitioned_table"
FOREIGN_TABLE = "foreign_table"
VIEW = "view"
MATERIALIZED_VIEW = "materialized_view"
RELATION_KINDS = (TABLE, PARTITIONED_TABLE, FOREIGN_TABLE, VIEW, MATERIALIZED_VIEW)
_RELKIND = {"r": TABLE, "p": PARTITIONED_TABLE, "f": FOREIGN_TABLE, "v": VIEW, "m": MATERIALIZED_VIEW}

FUNCTION = "function"
AGGREGATE = "aggregate"
WINDOW = "window"
PROCEDURE = "procedure"
_PROKIND = {"f": FUNCTION, "a": AGGREGATE, "w": WINDOW, "p": PROCEDURE}
_VOLATILITY = {"i": "immutable", "s": "stable", "v": "volatile"}
_VOLATILITY_RANK = {"immutable": 0, "stable": 1, "volatile": 2}


@dataclass(frozen=True, slots=True)
class RelationInfo:
    """A relation: ``columns`` in attribute order; ``definition`` is the SELECT of a (materialized) view.

    ``types`` are the columns' types as ``format_type`` prints them (``integer``,
    ``character varying(20)``, ``date``), in the same order; empty when unknown.
    ``parents`` are the tables it is a partition or an inheritance child of (its
    ``pg_inherits`` rows, in ``inhseqno`` order); ``Schema.ancestors`` follows them up.
    ``primary_key`` names the columns of its primary key, in the key's order (empty
    without one): PostgreSQL lets a query grouped by it select the table's other
    columns (documentation 7.2.3), which the masking rewrite must keep working.
    """

    schema: str
    name: str
    kind: str = TABLE
    columns: tuple[str, ...] = ()
    definition: str | None = None
    types: tuple[str, ...] = ()
    parents: tuple[Table, ...] = ()
    primary_key: tuple[str, ...] = ()

    def type_of(self, column: str) -> str | None:
        """The type of ``column``, or None when unknown.

        >>> RelationInfo("crm", "t", columns=("a", "b"), types=("integer", "text")).type_of("b")
        'text'
        """
        if len(self.types) != len(self.columns):
            return None
        try:
            return self.types[self.columns.index(column)]
        except ValueError:
            return None

    @property
    def builtin(self) -> bool:
        return self.schema in BUILTIN_SCHEMAS

    @property
    def is_view(self) -> bool:
        return self.kind in (VIEW, MATERIALIZED_VIEW)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    """All overloads of one qualified function name, merged."""

    schema: str
    name: str
    languages: frozenset[str] = frozenset({"internal"})
    volatility: str = "volatile"
    kinds: frozenset[str] = frozenset({FUNCTION})
    # The output column names when it is used in FROM, if known (OUT/TABLE parameters or a
    # composite result type); None when unknown.
    result_columns: tuple[str, ...] | None = None

    @property
    def builtin(self) -> bool:
        return self.schema in BUILTIN_SCHEMAS

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


class Schema:
    """Relations and functions by (schema, name); treat as immutable once built."""

    __slots__ = ("_relations", "_functions", "_schemas", "_version", "database", "_parsed", "operators", "casts",
                 "implicit", "on_write", "on_read", "rules", "_ancestors", "_descendants")

    def __init__(self, relations: Iterable[RelationInfo] = (), functions: Iterable[FunctionInfo] = (),
                 version: str | None = None, database: str | None = None,
                 operators: Mapping[str, Iterable[str]] | None = None, casts: Iterable[str] = (),
                 implicit: Mapping[str, str] | None = None,
                 on_write: Mapping[tuple[str, str], Mapping[str, str]] | None = None,
                 on_read: Mapping[tuple[str, str], Mapping[str, str]] | None = None,
                 rules: Mapping[tuple[str, str], Iterable[str]] | None = None) -> None:
        # User-defined operators (outside pg_catalog and information_schema): symbol ->
        # the qualified functions behind its overloads. An operator runs its function,
        # which may read any table, so a statement using the symbol reports them all.
        self.operators: dict[str, tuple[str, ...]] = {
            sym: tuple(sorted(set(fns))) for sym, fns in (operators or {}).items()}
        # Functions outside pg_catalog and information_schema behind casts (pg_cast.castfunc):
        # PostgreSQL runs one for x::t, CAST(x AS t), t(x), and, for an implicit or assignment
        # cast, with no syntax at all, so every statement may run them.
        self.casts: tuple[str, ...] = tuple(sorted(set(casts)))
        # Code PostgreSQL runs that no statement names (``load_schema`` reads it from the catalogs;
        # every name is a qualified function outside pg_catalog and information_schema, mapped to
        # why it runs, in words: "runs in a trigger on crm.members"):
        # - ``implicit``: in any statement (functions behind user-defined operators, operator
        #   classes' support functions, domains' CHECK constraints and defaults, event triggers);
        # - ``on_write``: when a statement writes the relation (its triggers, column defaults and
        #   generated columns, CHECK constraints, index expressions and predicates, and those of
        #   the relations a write to it reaches: partitions, child tables, foreign key actions);
        # - ``on_read``: when a statement reads or writes it (row-level security policies);
        # - ``rules``: the relations with rules (CREATE RULE, besides a view's _RETURN) that a
        #   write to the relation reaches, itself included: the analysis refuses such writes.
        self.implicit: dict[str, str] = dict(sorted((implicit or {}).items()))
        self.on_write: dict[tuple[str, str], dict[str, str]] = {
            k: dict(sorted(v.items())) for k, v in sorted((on_write or {}).items()) if v}
        self.on_read: dict[tuple[str, str], dict[str, str]] = {
            k: dict(sorted(v.items())) for k, v in sorted((on_read or {}).items()) if v}
        self.rules: dict[tuple[str, str], tuple[str, ...]] = {
            k: tuple(sorted(set(v))) for k, v in sorted((rules or {}).items()) if v}
        self._relations: dict[tuple[str, str], RelationInfo] = {(r.schema, r.name): r for r in relations}
        # A partition's or inheritance child's rows are its ancestors' rows: reading it reads them
        # (see ``ancestors``). Only relations with parents are keys.
        self._ancestors: dict[tuple[str, str], tuple[Table, ...]] = ancestry(
            {key: r.parents for key, r in self._relations.items() if r.parents})
        # And the other way: reading a parent (without ONLY) reads its descendants' rows (``descendants``).
        below: dict[tuple[str, str], list[Table]] = {}
        for (sname, rname), ancestors in sorted(self._ancestors.items()):
            for a in ancestors:
                below.setdefault((a.schema, a.name), []).append(Table(sname, rname))
        self._descendants: dict[tuple[str, str], tuple[Table, ...]] = {k: tuple(v) for k, v in below.items()}
        merged: dict[tuple[str, str], FunctionInfo] = {}
        for f in functions:
            key = (f.schema, f.name)
            old = merged.get(key)
            if old is not None:
                vol = max(old.volatility, f.volatility, key=lambda v: _VOLATILITY_RANK.get(v, 2))
                f = FunctionInfo(f.schema, f.name, old.languages | f.languages, vol, old.kinds | f.kinds,
                                 old.result_columns if old.result_columns == f.result_columns else None)
            merged[key] = f
        self._functions = merged
        self._schemas = frozenset(s for s, _ in self._relations) | frozenset(s for s, _ in self._functions)
        self.database = database
        self._version = version or self._digest()
        self._parsed: dict[tuple[str, str], Any] = {}  # view definitions, parsed on first use

    # --- lookups -------------------------------------------------------------------------

    def relation(self, schema: str, name: str) -> RelationInfo | None:
        return self._relations.get((schema, name))

    def function(self, schema: str, name: str) -> FunctionInfo | None:
        return self._functions.get((schema, name))

    def functions_named(self, name: str) -> list[FunctionInfo]:
        return [f for (s, n), f in self._functions.items() if n == name]

    def ancestors(self, schema: str, name: str) -> tuple[Table, ...]:
        """The tables ``schema.name`` is a partition or inheritance child of, directly or through others
        (nearest first); () for any other relation.

        >>> s = Schema.from_dict({"schemas": {"member": {"tables": {"contacts": {"columns": ["id"],
        ...     "partitioned": True}}}, "reporting": {"tables": {"p0": {"columns": ["id"], "partitioned": True,
        ...     "inherits": ["member.contacts"]}, "p0a": {"columns": ["id"], "inherits": [["reporting", "p0"]]}}}}})
        >>> [str(t) for t in s.ancestors("reporting", "p0a")], s.ancestors("member", "contacts")
        (['reporting.p0', 'member.contacts'], ())
        """
        return self._ancestors.get((schema, name), ())

    def descendants(self, schema: str, name: str) -> tuple[Table, ...]:
        """The partitions and inheritance children of ``schema.name``, at any depth: reading it without ONLY
        returns their rows (https://www.postgresql.org/docs/current/ddl-inherit.html).

        >>> s = Schema.from_dict({"schemas": {"archive": {"tables": {"people": ["id", "email"]}},
        ...     "member": {"tables": {"members": {"columns": ["id", "email"], "inherits": ["archive.people"]}}}}})
        >>> [str(t) for t in s.descendants("archive", "people")], s.descendants("member", "members")
        (['member.members'], ())
        """
        return self._descendants.get((schema, name), ())

    def related(self, column: Column) -> tuple[Column, ...]:
        """The columns of the same name of the relation's ancestors and descendants: a value read from one
        may be a value of any of them (a child's rows are its parents' rows, and a parent's read returns its
        children's rows).

        >>> s = Schema.from_dict({"schemas": {"archive": {"tables": {"people": ["id", "email"]}},
        ...     "member": {"tables": {"members": {"columns": ["id", "email"], "inherits": ["archive.people"]}}}}})
        >>> [str(c) for c in s.related(Column("archive", "people", "email"))]
        ['member.members.email']
        """
        below = self._descendants.get((column.schema, column.table), ())
        return (*self.inherited(column), *(Column(t.schema, t.name, column.name) for t in below))

    @property
    def has_ancestry(self) -> bool:
        """Whether any relation is a partition or inheritance child (the analysis skips ``inherited`` otherwise)."""
        return bool(self._ancestors)

    def inherited(self, column: Column) -> tuple[Column, ...]:
        """The columns of the same name of the ancestors of ``column``'s relation (nearest first).

        PostgreSQL matches an inheritance child's and a partition's columns to its parents' by
        name (https://www.postgresql.org/docs/current/ddl-inherit.html, "ddl-partitioning"), so a
        value read from the child's column is a value of the parent's column of that name. A
        column the child has of its own gets the name too: the catalog then gives it the
        parent's defaults (``personal_by_default``), failing closed.

        >>> s = Schema.from_dict({"schemas": {"reporting": {"tables": {"kid": {"columns": ["id", "email"],
        ...     "inherits": ["member.members"]}}}}})
        >>> [str(c) for c in s.inherited(Column("reporting", "kid", "email"))]
        ['member.members.email']
        >>> s.inherited(Column("member", "members", "email"))
        ()
        """
        return tuple(Column(a.schema, a.name, column.name) for a in self._ancestors.get((column.schema, column.table),
                                                                                       ()))

    @property
    def relations(self) -> list[RelationInfo]:
        return list(self._relations.values())

    @property
    def functions(self) -> list[FunctionInfo]:
        return list(self._functions.values())

    @property
    def schemas(self) -> frozenset[str]:
        return self._schemas

    @property
    def knows_builtin_functions(self) -> bool:
        """Whether pg_catalog's functions are listed (a loaded schema) or must be assumed (a test schema)."""
        return any(s == "pg_catalog" for s, _ in self._functions)

    @property
    def version(self) -> str:
        return self._version

    def parsed_definition(self, rel: RelationInfo, parse: Any) -> Any:
        """The parsed view definition of ``rel`` (``parse(sql)`` computes it once)."""
        key = (rel.schema, rel.name)
        if key not in self._parsed:
            self._parsed[key] = parse(rel.definition or "")
        return self._parsed[key]

    def __repr__(self) -> str:
        return f"Schema({len(self._relations)} relations, {len(self._functions)} functions, version={self._version})"

    # --- (de)serialisation ---------------------------------------------------------------------

    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.to_dict(include_version=False), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def to_dict(self, include_version: bool = True) -> dict[str, Any]:
        """The ``from_dict`` form of this schema."""
        schemas: dict[str, dict[str, Any]] = {}
        section = {TABLE: "tables", PARTITIONED_TABLE: "tables", FOREIGN_TABLE: "foreign_tables",
                   VIEW: "views", MATERIALIZED_VIEW: "materialized_views"}
        for r in sorted(self._relations.values(), key=lambda r: (r.schema, r.name)):
            sec = schemas.setdefault(r.schema, {}).setdefault(section[r.kind], {})
            types = {"types": dict(zip(r.columns, r.types))} if r.types else {}
            if r.parents:
                types["inherits"] = [[p.schema, p.name] for p in r.parents]
            if r.primary_key:
                types["primary_key"] = list(r.primary_key)
            if r.kind in (VIEW, MATERIALIZED_VIEW):
                entry: dict[str, Any] = {"columns": list(r.columns), **types}
                if r.definition is not None:
                    entry["sql"] = r.definition
                sec[r.name] = entry
            elif r.kind == PARTITIONED_TABLE:
                sec[r.name] = {"columns": list(r.columns), "partitioned": True, **types}
            elif types:
                sec[r.name] = {"columns": list(r.columns), **types}
            else:
                sec[r.name] = list(r.columns)
        for f in sorted(self._functions.values(), key=lambda f: (f.schema, f.name)):
            entry = {"language": ",".join(sorted(f.languages)), "volatility": f.volatility,
                     "kind": ",".join(sorted(f.kinds))}
            if f.result_columns is not None:
                entry["result_columns"] = list(f.result_columns)
            schemas.setdefault(f.schema, {}).setdefault("functions", {})[f.name] = entry
        out: dict[str, Any] = {"schemas": schemas}
        if self.operators:
            out["operators"] = {sym: list(fns) for sym, fns in sorted(self.operators.items())}
        if self.casts:
            out["casts"] = list(self.casts)
        implicit: dict[str, Any] = {}
        if self.implicit:
            implicit["functions"] = dict(self.implicit)
        for key, table in (("on_write", self.on_write), ("on_read", self.on_read)):
            if table:
                nested: dict[str, dict[str, dict[str, str]]] = {}
                for (sch, name), fns in table.items():
                    nested.setdefault(sch, {})[name] = dict(fns)
                implicit[key] = nested
        if self.rules:
            nested_rules: dict[str, dict[str, list[str]]] = {}
            for (sch, name), ruled in self.rules.items():
                nested_rules.setdefault(sch, {})[name] = list(ruled)
            implicit["rules"] = nested_rules
        if implicit:
            out["implicit"] = implicit
        if self.database:
            out["database"] = self.database
        if include_version:
            out["version"] = self._version
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schema":
        """Build a schema from plain data (names are exact: no case folding, no quoting).

        >>> s = Schema.from_dict({"schemas": {"crm": {
        ...     "tables": {"members": ["member_id", "email"]},
        ...     "views": {"emails": {"columns": ["email"], "sql": "SELECT email FROM crm.members"}},
        ...     "functions": {"lookup": {"language": "plpgsql"}}}}})
        >>> s.relation("crm", "members").columns, s.relation("crm", "emails").kind
        (('member_id', 'email'), 'view')
        >>> sorted(s.function("crm", "lookup").languages)
        ['plpgsql']

        View definitions are resolved with an empty search_path (only pg_catalog), so
        they must qualify the relations they read, as ``pg_get_viewdef`` does when the
        loader runs it. A table or view in the mapping form may give its columns' types
        (``types: {birth_date: date}``); the masking rewrite needs them for some methods.

        A table (or foreign table) in the mapping form may give ``inherits``: the tables it is a
        partition or inheritance child of, each ``[schema, name]`` or ``"schema.name"`` (split at the
        first dot); a file without it describes no inheritance. It may also give ``primary_key``:
        the columns of its primary key, in order (``primary_key: [member_id]``).

        >>> k = Schema.from_dict({"schemas": {"crm": {"tables": {"members": {
        ...     "columns": ["member_id", "email"], "primary_key": ["member_id"]}}}}})
        >>> k.relation("crm", "members").primary_key
        ('member_id',)

        ``implicit`` holds the code PostgreSQL runs without the statement naming it (see
        ``Schema.__init__``): ``functions: {fn: why}``, ``on_write`` and ``on_read``:
        ``{schema: {relation: {fn: why}}}``, ``rules: {schema: {relation: [schema.relation, ...]}}``.
        """
        relations: list[RelationInfo] = []
        functions: list[FunctionInfo] = []
        for sname, sdef in (data.get("schemas") or {}).items():
            sdef = sdef or {}
            for key, kind in (("tables", TABLE), ("foreign_tables", FOREIGN_TABLE)):
                for tname, cols in (sdef.get(key) or {}).items():
                    if isinstance(cols, Mapping):
                        k = PARTITIONED_TABLE if cols.get("partitioned") else kind
                        names = tuple(cols.get("columns") or ())
                        relations.append(RelationInfo(sname, tname, k, names, None, _types(names, cols.get("types")),
                                                      _parents(cols.get("inherits")),
                                                      tuple(cols.get("primary_key") or ())))
                    else:
                        relations.append(RelationInfo(sname, tname, kind, tuple(cols or ())))
            for key, kind in (("views", VIEW), ("materialized_views", MATERIALIZED_VIEW)):
                for vname, vdef in (sdef.get(key) or {}).items():
                    if isinstance(vdef, Mapping):
                        names = tuple(vdef.get("columns") or ())
                        relations.append(RelationInfo(sname, vname, kind, names, vdef.get("sql"),
                                                      _types(names, vdef.get("types"))))
                    else:
                        relations.append(RelationInfo(sname, vname, kind, tuple(vdef or ())))
            for fname, fdef in (sdef.get("functions") or {}).items():
                fdef = fdef or {}
                langs = frozenset(x.strip() for x in str(fdef.get("language", "sql")).split(",") if x.strip())
                kinds = frozenset(x.strip() for x in str(fdef.get("kind", FUNCTION)).split(",") if x.strip())
                rc = fdef.get("result_columns")
                functions.append(FunctionInfo(sname, fname, langs, str(fdef.get("volatility", "volatile")), kinds,
                                              tuple(rc) if rc is not None else None))
        implicit = data.get("implicit") or {}

        def per_relation(key: str) -> dict[tuple[str, str], Any]:
            return {(sch, name): v for sch, rels in (implicit.get(key) or {}).items()
                    for name, v in (rels or {}).items()}

        return cls(relations, functions, version=data.get("version"), database=data.get("database"),
                   operators=data.get("operators"), casts=data.get("casts") or (),
                   implicit=implicit.get("functions"), on_write=per_relation("on_write"),
                   on_read=per_relation("on_read"), rules=per_relation("rules"))

    @classmethod
    def from_file(cls, path: str) -> "Schema":
        """Read a YAML or JSON schema file (the ``from_dict`` form)."""
        import yaml

        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f) or {})


def _parents(value: Any) -> tuple[Table, ...]:
    """The ``inherits`` of a table in the ``from_dict`` form: ``[schema, name]`` pairs or ``"schema.name"``.

    >>> _parents([["member", "contacts"], "member.members"]), _parents(None)
    ((Table(schema='member', name='contacts'), Table(schema='member', name='members')), ())
    """
    out: list[Table] = []
    for item in value or ():
        if isinstance(item, str):
            schema, dot, name = item.partition(".")
            if not dot:
                raise ValueError(f"inherits: {item!r} must be written schema.name")
            out.append(Table(schema, name))
        else:
            schema, name = item
            out.append(Table(str(schema), str(name)))
    return tuple(out)


def ancestry(parents: Mapping[tuple[str, str], Iterable[Table]]) -> dict[tuple[str, str], tuple[Table, ...]]:
    """Each relation's ancestors from its direct parents: parents first, then theirs, each once (a cycle,
    which PostgreSQL does not allow, ends where it closes).

    >>> a = ancestry({("r", "p0a"): [Table("r", "p0")], ("r", "p0"): [Table("m", "c")], ("m", "c"): []})
    >>> [str(t) for t in a[("r", "p0a")]], ("m", "c") in a
    (['r.p0', 'm.c'], False)
    """
    out: dict[tuple[str, str], tuple[Table, ...]] = {}
    for key in parents:
        found = reachable(key, lambda k: [(t.schema, t.name) for t in parents.get(k, ())])
        if found:
            out[key] = tuple(Table(*k) for k in found)
    return out


def reachable(start, step: Callable[[Any], Iterable[Any]]) -> list:
    """What ``step`` leads to from ``start``, breadth first (nearest first), each once, ``start`` left out.

    >>> reachable(1, {1: [2, 3], 2: [4, 1], 3: [4]}.get)
    [2, 3, 4]
    """
    seen, out, todo = {start}, [], deque(step(start) or ())
    while todo:
        node = todo.popleft()
        if node not in seen:
            seen.add(node)
            out.append(node)
            todo.extend(step(node) or ())
    return out


def _types(columns: tuple[str, ...], types: Any) -> tuple[str, ...]:
    """Column types in column order from a ``{column: type}`` mapping (() unless every column has one)."""
    if not isinstance(types, Mapping) or any(c not in types for c in columns):
        return ()
    return tuple(str(types[c]) for c in columns)


# --- loading from a live server ---------------------------------------------------------------

_RELATIONS_SQL = """
SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind,
       coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum)
                   FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}') AS columns,
       coalesce((SELECT array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
                   FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}') AS types,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END AS definition,
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.i)
                   FROM pg_catalog.pg_constraint co
                  CROSS JOIN LATERAL pg_catalog.unnest(co.conkey) WITH ORDINALITY AS k(attnum, i)
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = k.attnum
                  WHERE co.conrelid = c.oid AND co.contype = 'p'), '{}') AS primary_key
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm')
   AND n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
"""

# Each table's parents: a partition's partitioned table (CREATE TABLE ... PARTITION OF, ATTACH
# PARTITION) and an inheritance child's parents (INHERITS, ALTER TABLE ... INHERIT), in inhseqno
# order. pg_inherits also links partitioned indexes to their partitions: only tables count. A
# partition being detached concurrently (inhdetachpending) still counts until it is gone.
_INHERITS_SQL = """
SELECT cn.nspname AS schema, cc.relname AS name, pn.nspname AS parent_schema, pc.relname AS parent_name
  FROM pg_catalog.pg_inherits h
  JOIN pg_catalog.pg_class cc ON cc.oid = h.inhrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace
  JOIN pg_catalog.pg_class pc ON pc.oid = h.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
 WHERE cc.relkind IN ('r', 'p', 'f') AND pc.relkind IN ('r', 'p', 'f')
   AND cn.nspname NOT LIKE 'pg\\_temp\\_%' AND cn.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
 ORDER BY cn.nspname, cc.relname, h.inhseqno
"""

# A user-defined operator symbol -> the functions behind its overloads, and the user-defined
# functions behind their commutators and negators (the planner may use one instead: a < b as
# b > a, NOT a = b as a <> b) and selectivity estimators (the planner runs them).
_OPERATORS_SQL = """
SELECT o.oprname AS symbol, fn.nspname || '.' || p.proname AS function
  FROM pg_catalog.pg_operator o
  JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
  JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode
  JOIN pg_catalog.pg_namespace fn ON fn.oid = p.pronamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
UNION
SELECT o.oprname, fn.nspname || '.' || p.proname
  FROM pg_catalog.pg_operator o
  JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
  LEFT JOIN pg_catalog.pg_operator com ON com.oid = o.oprcom
  LEFT JOIN pg_catalog.pg_operator neg ON neg.oid = o.oprnegate
  CROSS JOIN LATERAL (VALUES (com.oprcode::oid), (neg.oprcode::oid), (o.oprrest::oid), (o.oprjoin::oid)) f(proc)
  JOIN pg_catalog.pg_proc p ON p.oid = f.proc
  JOIN pg_catalog.pg_namespace fn ON fn.oid = p.pronamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND fn.nspname NOT IN ('pg_catalog', 'information_schema')
"""

_CASTS_SQL = """
SELECT DISTINCT fn.nspname || '.' || p.proname AS function
  FROM pg_catalog.pg_cast c
  JOIN pg_catalog.pg_proc p ON p.oid = c.castfunc
  JOIN pg_catalog.pg_namespace fn ON fn.oid = p.pronamespace
 WHERE fn.nspname NOT IN ('pg_catalog', 'information_schema')
"""

# Operator symbols PostgreSQL applies where the statement's text does not hold them: IN, NOT IN,
# CASE x WHEN, NULLIF, IS DISTINCT FROM and USING joins (=, <>; != is <>), BETWEEN and GREATEST/
# LEAST (<, <=, >, >=), LIKE and ILIKE (~~, !~~, ~~*, !~~*), SIMILAR TO (~, !~). A SET search_path
# may also put a user-defined overload ahead of the built-in one. Other symbols are found in the
# statement's text (``operator_functions``).
# Functions outside pg_catalog and information_schema that PostgreSQL may run in any statement
# without the statement naming them: behind an operator of those symbols or of an operator
# family (sorting, DISTINCT, GROUP BY, hashing, indexes use them), behind the commutators and
# negators of those, their selectivity estimators; support functions of operator families;
# CHECK constraints and defaults of domains (a cast to the domain, a write to a column of it);
# event triggers (DDL); subtype difference functions of range types (GiST indexes). The functions
# an expression calls are read from pg_depend (recordDependencyOnExpr), not from its text.
_IMPLICIT_SQL = """
WITH implicit_ops(oid) AS (
  SELECT o.oid FROM pg_catalog.pg_operator o
   WHERE o.oprname IN ('=', '<>', '<', '>', '<=', '>=', '~~', '!~~', '~~*', '!~~*', '~', '!~')
  UNION
  SELECT am.amopopr FROM pg_catalog.pg_amop am
), ops(oid) AS (
  SELECT oid FROM implicit_ops
  UNION
  SELECT x.other FROM pg_catalog.pg_operator o JOIN implicit_ops i ON i.oid = o.oid
   CROSS JOIN LATERAL (VALUES (o.oprcom), (o.oprnegate)) x(other)
   WHERE x.other <> 0
), code(proc, why) AS (
  SELECT f.proc, 'is behind the operator ' || n.nspname || '.' || o.oprname
                 || ' (which IN, BETWEEN, LIKE, CASE, DISTINCT, ORDER BY or an index may apply)'
    FROM ops JOIN pg_catalog.pg_operator o ON o.oid = ops.oid
    JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
   CROSS JOIN LATERAL (VALUES (o.oprcode::oid), (o.oprrest::oid), (o.oprjoin::oid)) f(proc)
   WHERE f.proc <> 0
  UNION ALL
  SELECT ap.amproc::oid, 'is a support function of the operator family ' || n.nspname || '.' || f.opfname
    FROM pg_catalog.pg_amproc ap
    JOIN pg_catalog.pg_opfamily f ON f.oid = ap.amprocfamily
    JOIN pg_catalog.pg_namespace n ON n.oid = f.opfnamespace
  UNION ALL
  SELECT d.refobjid, 'is behind a CHECK constraint of the domain ' || pg_catalog.format_type(co.contypid, NULL)
    FROM pg_catalog.pg_constraint co
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND d.objid = co.oid
                               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
   WHERE co.contypid <> 0
  UNION ALL
  SELECT d.refobjid, 'is behind the default of the domain ' || pg_catalog.format_type(t.oid, NULL)
    FROM pg_catalog.pg_type t
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.objid = t.oid
                               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
   WHERE t.typtype = 'd'
  UNION ALL
  SELECT e.evtfoid, 'runs in the event trigger ' || e.evtname || ' (on DDL)'
    FROM pg_catalog.pg_event_trigger e
  UNION ALL
  SELECT r.rngsubdiff::oid, 'is the subtype difference function of the range type '
                            || pg_catalog.format_type(r.rngtypid, NULL)
    FROM pg_catalog.pg_range r WHERE r.rngsubdiff <> 0
)
SELECT fn.nspname || '.' || p.proname AS function, min(code.why) AS why
  FROM code
  JOIN pg_catalog.pg_proc p ON p.oid = code.proc
  JOIN pg_catalog.pg_namespace fn ON fn.oid = p.pronamespace
 WHERE fn.nspname NOT IN ('pg_catalog', 'information_schema')
 GROUP BY 1
"""

# Functions outside pg_catalog and information_schema that PostgreSQL runs when a statement
# writes (or, for row-level security policies, reads) a relation: its non-internal triggers
# (function and WHEN condition), column defaults and generated columns, CHECK (and other)
# constraints, index expressions and predicates, and, when row-level security is enabled on it,
# its policies' USING and WITH CHECK expressions.
_RELATION_CODE_SQL = """
WITH code(rel, how, proc) AS (
  SELECT t.tgrelid, 'trigger', t.tgfoid FROM pg_catalog.pg_trigger t WHERE NOT t.tgisinternal
  UNION
  SELECT t.tgrelid, 'trigger', d.refobjid
    FROM pg_catalog.pg_trigger t
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass AND d.objid = t.oid
                               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
   WHERE NOT t.tgisinternal
  UNION
  SELECT ad.adrelid, CASE WHEN a.attgenerated <> '' THEN 'generated' ELSE 'default' END, d.refobjid
    FROM pg_catalog.pg_attrdef ad
    JOIN pg_catalog.pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND d.objid = ad.oid
                               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
  UNION
  SELECT co.conrelid, 'constraint', d.refobjid
    FROM pg_catalog.pg_constraint co
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND d.objid = co.oid
                               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
   WHERE co.conrelid <> 0
  UNION
  SELECT i.indrelid, 'index', d.refobjid
    FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = i.indexrelid
                               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
  UNION
  SELECT po.polrelid, 'policy', d.refobjid
    FROM pg_catalog.pg_policy po
    JOIN pg_catalog.pg_class c ON c.oid = po.polrelid AND c.relrowsecurity
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass AND d.objid = po.oid
                               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
)
SELECT n.nspname AS schema, c.relname AS name, code.how, fn.nspname || '.' || p.proname AS function
  FROM code
  JOIN pg_catalog.pg_class c ON c.oid = code.rel
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_proc p ON p.oid = code.proc
  JOIN pg_catalog.pg_namespace fn ON fn.oid = p.pronamespace
 WHERE fn.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
"""

# Relations with rules other than a view's _RETURN (CREATE RULE): PostgreSQL runs their actions,
# any SQL, instead of or besides a write to the relation. pg_catalog's own (pg_settings' rules run
# set_config, which the purpose check refuses on its own) are left out.
_RULES_SQL = """
SELECT DISTINCT n.nspname AS schema, c.relname AS name
  FROM pg_catalog.pg_rewrite r
  JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE r.rulename <> '_RETURN' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
"""

# Where a write to a relation also writes another: from a partitioned or parent table to its
# partitions and child tables (pg_inherits), from a referenced table to the tables whose foreign
# keys act on a change of it (ON DELETE / ON UPDATE CASCADE, SET NULL, SET DEFAULT), from a view
# to the relations its definition reads (a write through a view writes its base relation).
_WRITE_REACH_SQL = """
SELECT pn.nspname AS from_schema, pc.relname AS from_name, cn.nspname AS to_schema, cc.relname AS to_name,
       'partition' AS how
  FROM pg_catalog.pg_inherits h
  JOIN pg_catalog.pg_class pc ON pc.oid = h.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
  JOIN pg_catalog.pg_class cc ON cc.oid = h.inhrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace
 WHERE pc.relkind IN ('r', 'p', 'f') AND cc.relkind IN ('r', 'p', 'f')
UNION
SELECT pn.nspname, pc.relname, cn.nspname, cc.relname, 'foreign key'
  FROM pg_catalog.pg_constraint co
  JOIN pg_catalog.pg_class pc ON pc.oid = co.confrelid JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
  JOIN pg_catalog.pg_class cc ON cc.oid = co.conrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace
 WHERE co.contype = 'f' AND (co.confdeltype IN ('c', 'n', 'd') OR co.confupdtype IN ('c', 'n', 'd'))
UNION
SELECT pn.nspname, pc.relname, cn.nspname, cc.relname, 'view'
  FROM pg_catalog.pg_rewrite r
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
                             AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> r.ev_class
  JOIN pg_catalog.pg_class pc ON pc.oid = r.ev_class JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
  JOIN pg_catalog.pg_class cc ON cc.oid = d.refobjid JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace
 WHERE r.rulename = '_RETURN' AND pc.relkind = 'v' AND cc.relkind IN ('r', 'p', 'f', 'v')
   AND pn.nspname NOT IN ('pg_catalog', 'information_schema')
"""

_RELATION_CODE_WHY = {
    "trigger": "runs in a trigger on {rel}",
    "default": "is behind a column default of {rel}",
    "generated": "is behind a generated column of {rel}",
    "constraint": "is behind a CHECK constraint of {rel}",
    "index": "is behind an index expression or predicate on {rel}",
    "policy": "is behind a row-level security policy of {rel}",
}

_FUNCTIONS_SQL = """
SELECT n.nspname AS schema, p.proname AS name, l.lanname AS language, p.provolatile::text AS volatility,
       p.prokind::text AS kind,
       CASE
         WHEN p.proargmodes IS NOT NULL AND p.proargnames IS NOT NULL
              AND EXISTS (SELECT 1 FROM unnest(p.proargmodes) m WHERE m IN ('o', 'b', 't'))
         THEN (SELECT array_agg(x.name ORDER BY x.ord)
                 FROM unnest(p.proargnames, p.proargmodes) WITH ORDINALITY AS x(name, mode, ord)
                WHERE x.mode IN ('o', 'b', 't'))
         WHEN t.typrelid <> 0
         THEN (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped)
       END AS result_columns
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang
  LEFT JOIN pg_catalog.pg_type t ON t.oid = p.prorettype
 WHERE n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""


# What a schema load depends on, summed into a few numbers: cheap to read every few
# seconds (no pg_get_viewdef, so no lock on any view), and different after any
# committed change the load would see. Relations and columns are hashed by content
# (so TRUNCATE, VACUUM FULL and ANALYZE, which rewrite pg_class rows, do not count);
# view rules, functions, operators, casts, the code a statement runs without naming it (triggers,
# column defaults, constraints, policies, indexes, partitions, operator families, domains, event
# triggers: see ``_IMPLICIT_SQL`` and ``_RELATION_CODE_SQL``; pg_inherits, which also gives each table its
# parents, ``_INHERITS_SQL``: ATTACH and DETACH PARTITION, INHERIT and NO INHERIT insert or delete its rows,
# DETACH ... CONCURRENTLY updates one first) and per-role settings by the xmin of their rows
# (CREATE OR REPLACE writes a new row version); schemas with their privileges, and roles with
# their memberships (which schemas a role may use). Temporary relations are left out, as
# the load leaves them out: sessions create them all the time. The server's own search_path
# is not in it: a session's reset value is fixed when it starts, so the watch's kept connection
# and a load's new one would differ for ever after a change; sessions through the proxy have
# their search_path pinned at connect time anyway (PurposeSession.startup_parameters).
CATALOG_STAMP_SQL = """
SELECT
 (SELECT count(*) || ':' || coalesce(sum(hashtext(c.oid::text || ' ' || c.relname || ' '
                                                 || c.relnamespace::text || ' ' || c.relkind::text || ' '
                                                 || c.relrowsecurity::text)::bigint), 0)
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE c.relkind IN ('r', 'p', 'f', 'v', 'm')
     AND n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'),
 (SELECT count(*) || ':' || coalesce(sum(hashtext(a.attrelid::text || ' ' || a.attnum::text || ' ' || a.attname
                                                 || ' ' || a.atttypid::text || ' ' || a.atttypmod::text
                                                 || ' ' || a.attisdropped::text)::bigint), 0)
    FROM pg_catalog.pg_attribute a
    JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE a.attnum > 0 AND c.relkind IN ('r', 'p', 'f', 'v', 'm', 'c')
     AND n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'),
 (SELECT count(*) || ':' || coalesce(sum(n.oid::text::bigint + hashtext(n.nspname || ' '
                                                                     || coalesce(n.nspacl::text, ''))), 0)
    FROM pg_catalog.pg_namespace n
   WHERE n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'),
 (SELECT count(*) || ':' || coalesce(sum(r.xmin::text::bigint), 0)
    FROM pg_catalog.pg_rewrite r
    JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT LIKE 'pg\\_temp\\_%'),
 (SELECT count(*) || ':' || coalesce(sum(p.xmin::text::bigint), 0)
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname NOT LIKE 'pg\\_temp\\_%'),
 (SELECT count(*) || ':' || coalesce(sum(o.xmin::text::bigint), 0)
    FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
   WHERE n.nspname NOT LIKE 'pg\\_temp\\_%'),
 (SELECT count(*) || ':' || coalesce(sum(c.xmin::text::bigint), 0) FROM pg_catalog.pg_cast c),
 (SELECT count(*) || ':' || coalesce(sum(x.xmin::text::bigint), 0)
    FROM (SELECT t.xmin, t.tgrelid AS rel FROM pg_catalog.pg_trigger t
          UNION ALL SELECT a.xmin, a.adrelid FROM pg_catalog.pg_attrdef a
          UNION ALL SELECT p.xmin, p.polrelid FROM pg_catalog.pg_policy p
          UNION ALL SELECT h.xmin, h.inhrelid FROM pg_catalog.pg_inherits h
          UNION ALL SELECT co.xmin, co.conrelid FROM pg_catalog.pg_constraint co
                     WHERE co.conrelid <> 0 AND co.contype IN ('c', 'f', 'p')) x
    JOIN pg_catalog.pg_class c ON c.oid = x.rel JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'),
 (SELECT count(*) || ':' || coalesce(sum(hashtext(i.indexrelid::text || ' ' || i.indrelid::text || ' '
                                                 || coalesce(i.indexprs::text, '') || ' '
                                                 || coalesce(i.indpred::text, ''))::bigint), 0)
    FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_class c ON c.oid = i.indrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL)
     AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'),
 (SELECT count(*) || ':' || coalesce(sum(x.xmin::text::bigint), 0)
    FROM (SELECT f.xmin FROM pg_catalog.pg_opfamily f UNION ALL SELECT o.xmin FROM pg_catalog.pg_opclass o
          UNION ALL SELECT a.xmin FROM pg_catalog.pg_amop a UNION ALL SELECT a.xmin FROM pg_catalog.pg_amproc a
          UNION ALL SELECT e.xmin FROM pg_catalog.pg_event_trigger e UNION ALL SELECT r.xmin FROM pg_catalog.pg_range r
          UNION ALL SELECT t.xmin FROM pg_catalog.pg_type t WHERE t.typtype = 'd'
          UNION ALL SELECT co.xmin FROM pg_catalog.pg_constraint co WHERE co.contypid <> 0) x),
 (SELECT count(*) || ':' || coalesce(sum(s.xmin::text::bigint), 0) FROM pg_catalog.pg_db_role_setting s),
 (SELECT count(*) || ':' || coalesce(sum(hashtext(r.oid::text || ' ' || r.rolname || ' ' || r.rolsuper::text || ' '
                                                 || r.rolcanlogin::text || ' ' || r.rolinherit::text)::bigint), 0)
    FROM pg_catalog.pg_roles r),
 (SELECT count(*) || ':' || coalesce(sum(m.xmin::text::bigint), 0) FROM pg_catalog.pg_auth_members m)
"""


async def catalog_stamp(conn: Any) -> tuple[str, ...]:
    """A summary of the catalogs a schema load reads: equal stamps, same load (``CATALOG_STAMP_SQL``)."""
    row = await conn.fetchrow(CATALOG_STAMP_SQL)
    return tuple(str(v) for v in row)


async def load_schema(conn: Any) -> Schema:
    """Read relations, view definitions, functions, and the code statements run without naming it, from a
    live server (an asyncpg connection).

    View definitions are read with ``search_path`` set to ``pg_catalog`` only, inside a
    transaction, so that ``pg_get_viewdef`` qualifies every relation outside pg_catalog;
    the connection's search_path is restored afterwards (also when the caller had a
    transaction open). pg_toast and temporary schemas are left out; pg_catalog and
    information_schema are kept.
    """
    async with conn.transaction():
        old_path = await conn.fetchval("SELECT pg_catalog.current_setting('search_path')")
        await conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true)")
        rel_rows = await conn.fetch(_RELATIONS_SQL)
        inherit_rows = await conn.fetch(_INHERITS_SQL)
        fn_rows = await conn.fetch(_FUNCTIONS_SQL)
        op_rows = await conn.fetch(_OPERATORS_SQL)
        cast_rows = await conn.fetch(_CASTS_SQL)
        implicit_rows = await conn.fetch(_IMPLICIT_SQL)
        code_rows = await conn.fetch(_RELATION_CODE_SQL)
        rule_rows = await conn.fetch(_RULES_SQL)
        reach_rows = await conn.fetch(_WRITE_REACH_SQL)
        database = await conn.fetchval("SELECT pg_catalog.current_database()")
        await conn.execute("SELECT pg_catalog.set_config('search_path', $1, true)", old_path)
    parents: dict[tuple[str, str], list[Table]] = {}
    for r in inherit_rows:
        parents.setdefault((r["schema"], r["name"]), []).append(Table(r["parent_schema"], r["parent_name"]))
    relations = []
    for r in rel_rows:
        definition = r["definition"]
        if definition is not None:
            definition = definition.strip().rstrip(";").strip()
        relations.append(RelationInfo(r["schema"], r["name"], _RELKIND[r["relkind"]], tuple(r["columns"] or ()),
                                      definition, tuple(r["types"] or ()),
                                      tuple(parents.get((r["schema"], r["name"]), ())),
                                      tuple(r["primary_key"] or ())))
    functions = [
        FunctionInfo(r["schema"], r["name"], frozenset({r["language"]}),
                     _VOLATILITY.get(r["volatility"], "volatile"), frozenset({_PROKIND.get(r["kind"], FUNCTION)}),
                     tuple(r["result_columns"]) if r["result_columns"] is not None else None)
        for r in fn_rows
    ]
    operators: dict[str, list[str]] = {}
    for r in op_rows:
        operators.setdefault(r["symbol"], []).append(r["function"])
    on_write, on_read, rules = _relation_code(code_rows, rule_rows, reach_rows)
    return Schema(relations, functions, database=database, operators=operators,
                  casts=[r["function"] for r in cast_rows],
                  implicit={r["function"]: r["why"] for r in implicit_rows},
                  on_write=on_write, on_read=on_read, rules=rules)


def _relation_code(code_rows: Iterable[Mapping[str, Any]], rule_rows: Iterable[Mapping[str, Any]],
                   reach_rows: Iterable[Mapping[str, Any]]
                   ) -> tuple[dict[tuple[str, str], dict[str, str]], dict[tuple[str, str], dict[str, str]],
                              dict[tuple[str, str], list[str]]]:
    """``Schema.on_write``, ``on_read`` and ``rules`` from the rows of ``_RELATION_CODE_SQL``, ``_RULES_SQL``
    and ``_WRITE_REACH_SQL``: a write to a relation counts what runs on every relation it reaches.

    >>> code = [{"schema": "s", "name": "child", "how": "trigger", "function": "s.f"}]
    >>> reach = [{"from_schema": "s", "from_name": "parent", "to_schema": "s", "to_name": "child"}]
    >>> w, r, rules = _relation_code(code, [{"schema": "s", "name": "child"}], reach)
    >>> w[("s", "parent")], rules[("s", "parent")]
    ({'s.f': 'runs in a trigger on s.child'}, ['s.child'])
    """
    own_write: dict[tuple[str, str], dict[str, str]] = {}
    on_read: dict[tuple[str, str], dict[str, str]] = {}
    for r in sorted(code_rows, key=lambda r: (r["schema"], r["name"], r["how"], r["function"])):
        key = (r["schema"], r["name"])
        why = _RELATION_CODE_WHY[r["how"]].format(rel=f"{r['schema']}.{r['name']}")
        (on_read if r["how"] == "policy" else own_write).setdefault(key, {}).setdefault(r["function"], why)
    ruled = {(r["schema"], r["name"]) for r in rule_rows}
    reach: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for r in reach_rows:
        reach.setdefault((r["from_schema"], r["from_name"]), set()).add((r["to_schema"], r["to_name"]))
    on_write: dict[tuple[str, str], dict[str, str]] = {}
    rules: dict[tuple[str, str], list[str]] = {}
    for start in set(own_write) | ruled | set(reach):
        seen = {start, *reachable(start, reach.get)}
        for rel in [start, *sorted(seen - {start})]:
            for fn, why in own_write.get(rel, {}).items():
                on_write.setdefault(start, {}).setdefault(fn, why)
        hit = sorted(f"{s}.{n}" for s, n in seen & ruled)
        if hit:
            rules[start] = hit
    return on_write, on_read, rules


def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL's quote_ident does (for plain lower-case names, not at all).

    >>> quote_ident("crm"), quote_ident("Crm"), quote_ident("$user"), quote_ident("select")
    ('crm', '"Crm"', '"$user"', '"select"')
    """
    import re

    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def format_search_path(names: list[str]) -> str:
    """A search_path setting PostgreSQL reads back as ``names`` (``parse_search_path``'s inverse), quoting
    only the names that need it (``quote_ident``), as PostgreSQL prints its default.

    >>> format_search_path(["$user", "public", "Crm", 'a"b'])
    '"$user", public, "Crm", "a""b"'
    >>> parse_search_path(format_search_path(["$user", "public", "Crm", 'a"b']))
    ['$user', 'public', 'Crm', 'a"b']
    """
    return ", ".join(quote_ident(n) for n in names)


def parse_search_path(value: str | None) -> list[str]:
    """Split a search_path setting (as SET records it, or SHOW prints it) into schema names, exactly as
    PostgreSQL's SplitIdentifierString does (utils/adt/varlena.c): only ASCII space, tab, newline,
    carriage return and form feed separate (scanner_isspace; a U+3000 or U+00A0 is part of a name),
    unquoted names are lowered in ASCII only, every name is truncated to 63 bytes. A value PostgreSQL
    refuses ("invalid list syntax") raises ``ValueError``.

    >>> parse_search_path('"$user", public, "Crm", CRM')
    ['$user', 'public', 'Crm', 'crm']
    >>> parse_search_path('public\u3000,member'), parse_search_path('')
    (['public\u3000', 'member'], [])
    """
    from proxy.analysis.lexer import ascii_lower, truncate_identifier

    space = " \t\n\r\f"
    out: list[str] = []
    i, n = 0, len(value or "")
    while i < n and value[i] in space:
        i += 1
    if i >= n:
        return []
    while True:
        if value[i] == '"':
            buf = []
            j = i + 1
            while True:
                k = value.find('"', j)
                if k < 0:
                    raise ValueError("invalid list syntax in search_path: mismatched quotes")
                buf.append(value[j:k])
                if k + 1 < n and value[k + 1] == '"':
                    buf.append('"')
                    j = k + 2
                    continue
                break
            name = "".join(buf)
            i = k + 1
        else:
            j = i
            while j < n and value[j] != "," and value[j] not in space:
                j += 1
            if j == i:
                raise ValueError("invalid list syntax in search_path: an empty name")
            name = ascii_lower(value[i:j])
            i = j
        out.append(truncate_identifier(name))
        while i < n and value[i] in space:
            i += 1
        if i < n and value[i] == ",":
            i += 1
            while i < n and value[i] in space:
                i += 1
            if i >= n:
                raise ValueError("invalid list syntax in search_path: nothing after a comma")
            continue
        if i >= n:
            break
        raise ValueError("invalid list syntax in search_path")
    return [x for x in out if x]


# Reserved key words (they must be quoted as identifiers); enough for quote_ident's purposes.
_RESERVED = frozenset("""
all analyse analyze and any array as asc asymmetric authorization binary both case cast check collate
collation column concurrently constraint create cross current_catalog current_date current_role
current_schema current_time current_timestamp current_user default deferrable desc distinct do else end
except false fetch for foreign freeze from full grant group having ilike in initially inner intersect into
is isnull join lateral leading left like limit localtime localtimestamp natural not notnull null offset on
only or order outer overlaps placing primary references returning right select session_user similar some
symmetric system_user table tablesample then to trailing true union unique user using variadic verbose when
where window with
""".split())
