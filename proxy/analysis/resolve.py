"""Name resolution by PostgreSQL's rules: identifiers, relations on the search_path, FROM namespaces, columns.

Values here are the analysis' own: a ``Flow`` maps base columns (``Column``) and base
relations (``Table``, for their rows) to how their values reach an expression
(``Use.PROJECT``, ``Use.AGGREGATE``, ``Use.WHOLE_ROW``); a ``Source`` is one FROM item
(relation, view, CTE, subquery, function, VALUES) with its output columns and their
flows; an ``Item`` is what a top-level FROM entry or join exposes; a ``Level`` is the
FROM namespace of one query level. Lookups follow ``parser/parse_relation.c``:
unqualified column names are searched level by level (innermost first) and are
ambiguous when two entries of one level match; a name that is no column is tried as
a whole-row reference to a FROM item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from sqlglot import exp

from proxy.analysis.lexer import ascii_lower, truncate_identifier
from proxy.analysis.model import Column, RelationRef, Table, Use
from proxy.analysis.schema import RelationInfo, Schema

Flow = dict[Union[Column, Table], Use]

P, F, A, W = Use.PROJECT, Use.FILTER, Use.AGGREGATE, Use.WHOLE_ROW
SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})


class Unsupported(Exception):
    """The analysis cannot vouch for the statement; the message says why (one English sentence)."""


class UnknownColumn(Unsupported):
    """No column or FROM item of that name is in scope."""


# --- flows -----------------------------------------------------------------------------------


def union(*flows: Flow) -> Flow:
    """Merge flows, or-ing the uses of shared keys.

    >>> union({Table("crm", "members"): Use.PROJECT}, {Table("crm", "members"): Use.AGGREGATE})
    {Table(schema='crm', name='members'): <Use.PROJECT|AGGREGATE: 33>}
    """
    out: Flow = {}
    for fl in flows:
        for k, u in fl.items():
            out[k] = out.get(k, Use.NONE) | u
    return out


def merge_into(dst: Flow, src: Flow) -> None:
    for k, u in src.items():
        dst[k] = dst.get(k, Use.NONE) | u


def aggregated(flow: Flow) -> Flow:
    """Values that reach a statistical aggregate only: PROJECT becomes AGGREGATE."""
    return {k: (u & ~P) | A if u & P else u for k, u in flow.items()}


def valued_columns(flow: Flow) -> set[Column]:
    """The base columns whose values (not only statistics of them) reach ``flow``.

    >>> sorted(valued_columns({Column("b", "i", "amount"): Use.PROJECT, Column("b", "i", "id"): Use.AGGREGATE,
    ...                        Table("b", "i"): Use.PROJECT}))
    [Column(schema='b', table='i', name='amount')]
    """
    return {k for k, u in flow.items() if isinstance(k, Column) and u & P}


def whole_row(flow: Flow) -> Flow:
    return {k: u | W for k, u in flow.items()}


def consumed(u: Use, ctx: Use) -> Use:
    """The use recorded when a value that flows with ``u`` is consumed in context ``ctx``.

    In a projecting context (select list, RETURNING, COPY TO, values stored by INSERT or
    UPDATE) the flow's own uses are recorded; in a filtering context (WHERE, JOIN, GROUP BY,
    ORDER BY, ...) FILTER is, keeping AGGREGATE and WHOLE_ROW.

    >>> consumed(Use.PROJECT, Use.FILTER), consumed(Use.AGGREGATE, Use.FILTER)
    (<Use.FILTER: 2>, <Use.FILTER|AGGREGATE: 34>)
    """
    if ctx is P:
        return u
    return ctx | (u & (A | W))


def of_groups(u: Use) -> Use:
    """The use recorded when a query's ORDER BY or HAVING consumes a value that flows with ``u``.

    A statistic of the query's own aggregates (AGGREGATE alone) counts as shown, not as a filter:
    the groups a HAVING condition or a sort compares are at most those the statistic would be
    shown for. PostgreSQL computes sort keys only for the groups its HAVING kept (the Agg node
    tests its qual before it projects, src/backend/executor/nodeAgg.c), and the rewrite puts a
    HAVING condition behind the small-group suppression (``CASE WHEN <suppression> THEN (<it>)
    ELSE false END``: AND-ed, PostgreSQL could test it first, and an error it raised would tell
    a small group's value). Anything else compares rows by their values: a filter.

    >>> of_groups(Use.AGGREGATE), of_groups(Use.PROJECT), of_groups(Use.AGGREGATE | Use.PROJECT)
    (<Use.AGGREGATE: 32>, <Use.FILTER: 2>, <Use.FILTER|AGGREGATE: 34>)
    """
    if u & A and not u & (P | F | W):
        return u
    return consumed(u, F)


# --- identifiers and relations -------------------------------------------------------------------

_IDENTIFIER = exp.Identifier
_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}  # as lexer.ascii_lower folds


def ident(node: exp.Expr | str | None) -> str | None:
    """The PostgreSQL name of an identifier node: unquoted ones folded (ASCII only), all truncated.

    >>> ident(exp.to_identifier("Members")), ident(exp.to_identifier("Members", quoted=True))
    ('members', 'Members')
    """
    if node.__class__ is _IDENTIFIER:  # the usual case, first (args read directly: the properties cost more)
        args = node.args
        name = args.get("this")
        if not args.get("quoted"):
            name = name.lower() if name.isascii() else name.translate(_ASCII_LOWER)
        return name if len(name) < 16 else truncate_identifier(name)
    if node is None:
        return None
    if isinstance(node, str):
        return truncate_identifier(ascii_lower(node))
    if isinstance(node, exp.Identifier):
        name = node.this if node.quoted else ascii_lower(node.this)
        return truncate_identifier(name)
    if isinstance(node, exp.Var):
        return truncate_identifier(ascii_lower(node.this))
    if isinstance(node, exp.Star):
        return "*"
    raise Unsupported(f"unexpected name {node.sql('postgres')}")


def resolve_relation(schema: Schema, path: list[str], name: str, schema_name: str | None = None,
                     catalog: str | None = None) -> RelationInfo:
    """Find a relation as PostgreSQL would: qualified, or the first schema on the path that has it.

    >>> s = Schema.from_dict({"schemas": {"crm": {"tables": {"members": ["id"]}}}})
    >>> str(resolve_relation(s, ["pg_catalog", "crm"], "members"))
    'crm.members'
    >>> resolve_relation(s, ["pg_catalog", "public"], "members")
    Traceback (most recent call last):
    ...
    proxy.analysis.resolve.Unsupported: unknown relation members
    """
    if catalog is not None and catalog != schema.database:
        raise Unsupported(f"cross-database reference {catalog}.{schema_name}.{name}")
    if schema_name is not None:
        rel = schema.relation(schema_name, name)
        if rel is None:
            raise Unsupported(f"unknown relation {schema_name}.{name}")
        return rel
    for sch in path:
        rel = schema.relation(sch, name)
        if rel is not None:
            return rel
    raise Unsupported(f"unknown relation {name}")


# --- FROM namespaces ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Source:
    """One FROM item as the statement sees it."""

    name: str  # its reference name ("" for an unaliased subquery)
    columns: list[str | None]  # output column names (None: a name the analysis cannot tell)
    flows: list[Flow]
    rows: Flow = field(default_factory=dict)  # what its row set depends on
    relation: RelationInfo | None = None  # a relation referenced by name (for schema.table.column)
    aliased: bool = False
    known: bool = True  # False: a function whose output columns are unknown
    base: bool = False  # a stored relation (has system columns)
    generic: Flow = field(default_factory=dict)  # the flow of any column when ``known`` is False
    label: str = ""
    ref: RelationRef | None = None  # where a stored relation is referenced in the text (for the rewrite)

    def whole(self) -> Flow:
        """The flow of a whole-row reference to this item."""
        if not self.known:
            return whole_row(self.generic)
        return whole_row(union(*self.flows))


@dataclass(eq=False)
class Item:
    """A top-level FROM entry: its column-visible entries and its table-visible sources."""

    entries: list[tuple[str | None, Flow]]
    sources: list[Source]
    unknown: list[Source] = field(default_factory=list)  # sources with unknown columns

    @classmethod
    def of(cls, src: Source) -> "Item":
        entries = list(zip(src.columns, src.flows)) if src.known else []
        return cls(entries, [src], [] if src.known else [src])

    @property
    def rows(self) -> Flow:
        return union(*(s.rows for s in self.sources))


@dataclass(eq=False)
class Level:
    """The FROM namespace of one query level (the items visible so far)."""

    items: list[Item] = field(default_factory=list)
    # reference name -> the sources of ``items`` called so, built at the first ``add``: a FROM list of
    # n items checked against all the items before each was quadratic (8000 took seconds, hunt 21)
    _named: dict[str, list[Source]] | None = field(default=None, repr=False)

    def add(self, item: Item) -> None:
        named = self._named
        if named is None:
            named = self._named = {}
            for it in self.items:
                for src in it.sources:
                    named.setdefault(src.name, []).append(src)
        check_conflicts([a for b in item.sources if b.name for a in named.get(b.name, ())], item.sources)
        self.items.append(item)
        for src in item.sources:
            named.setdefault(src.name, []).append(src)

    def snapshot(self) -> "Level":
        return Level(list(self.items))


@dataclass(eq=False)
class Env:
    """Where names are looked up: the query levels (innermost first) and the visible CTEs."""

    levels: tuple[Level, ...] = ()
    ctes: dict[str, object] = field(default_factory=dict)

    def inner(self, level: Level) -> "Env":
        return Env((level,) + self.levels, self.ctes)


def lookup_unqualified(env: Env, name: str) -> Flow:
    """The flow of an unqualified column reference (or whole-row reference) ``name``."""
    for lv in env.levels:
        matches: list[Flow] = []
        uncertain = False
        unknown: list[Source] = []
        for it in lv.items:
            for nm, fl in it.entries:
                if nm == name:
                    matches.append(fl)
                elif nm is None:
                    uncertain = True
            unknown.extend(it.unknown)
        if len(matches) > 1:
            raise Unsupported(f'ambiguous column reference "{name}"')
        if matches:
            return matches[0]
        if unknown:
            raise Unsupported(f'cannot tell whether column "{name}" comes from {unknown[0].label}, '
                              f"whose output columns are unknown")
        if uncertain:
            raise Unsupported(f'cannot tell which column "{name}" refers to (a subquery column without a '
                              f"name the analysis can determine)")
        if name in SYSTEM_COLUMNS:
            bases = [s for it in lv.items for s in it.sources if s.base]
            if len(bases) > 1:
                raise Unsupported(f'ambiguous column reference "{name}"')
            if bases:
                return {}
    src = lookup_refname(env, name)
    if src is not None:
        return src.whole()
    raise UnknownColumn(f'column "{name}" does not exist')


def check_conflicts(existing: list[Source], new: list[Source]) -> None:
    """Refuse two FROM items with one reference name (checkNameSpaceConflicts).

    Two unaliased relations of the same name in different schemas do not conflict; a
    reference to that name is then ambiguous.
    """
    for b in new:
        for a in existing:
            if not a.name or a.name != b.name:
                continue
            if a.aliased or b.aliased or a.relation is None or b.relation is None or \
                    (a.relation.schema, a.relation.name) == (b.relation.schema, b.relation.name):
                raise Unsupported(f'table name "{b.name}" specified more than once')


def lookup_refname(env: Env, name: str, schema_name: str | None = None) -> Source | None:
    """The FROM item called ``name`` (``schema_name.name`` for an unaliased relation), innermost first."""
    for lv in env.levels:
        hits = []
        for it in lv.items:
            for s in it.sources:
                if schema_name is None:
                    if s.name == name:
                        hits.append(s)
                elif (s.relation is not None and not s.aliased and s.relation.schema == schema_name
                      and s.relation.name == name):
                    hits.append(s)
        if len(hits) > 1:
            raise Unsupported(f'table reference "{name}" is ambiguous')
        if hits:
            ref = hits[0].ref
            if schema_name is not None and ref is not None:
                problem = f"a column of {schema_name}.{name} is named with its schema ({schema_name}.{name}.column)"
                if problem not in ref.problems:
                    ref.problems.append(problem)
            return hits[0]
    return None


def column_of(src: Source, name: str) -> Flow:
    """The flow of column ``name`` of the FROM item ``src``."""
    if not src.known:
        return src.generic
    hits = [fl for nm, fl in zip(src.columns, src.flows) if nm == name]
    if len(hits) > 1:
        raise Unsupported(f'ambiguous column reference "{src.name}.{name}"')
    if hits:
        return hits[0]
    if src.base and name in SYSTEM_COLUMNS:
        return {}
    if any(nm is None for nm in src.columns):
        raise Unsupported(f'cannot tell which column "{src.name}.{name}" refers to (a subquery column without '
                          f"a name the analysis can determine)")
    raise Unsupported(f'column {src.name}.{name} does not exist')


def lookup_qualified(env: Env, parts: list[str]) -> Flow:
    """The flow of ``table.column``, ``schema.table.column`` or ``table.column.field``."""
    if len(parts) == 2:
        src = lookup_refname(env, parts[0])
        if src is None:
            raise Unsupported(f'missing FROM-clause entry for table "{parts[0]}"')
        return column_of(src, parts[1])
    if len(parts) == 3:
        src = lookup_refname(env, parts[1], parts[0])
        if src is not None:
            return column_of(src, parts[2])
        src = lookup_refname(env, parts[0])
        if src is not None:  # table.column.field (a field of a composite column)
            return column_of(src, parts[1])
        raise Unsupported(f'missing FROM-clause entry for table "{parts[0]}.{parts[1]}"')
    raise Unsupported(f"improper qualified name {'.'.join(parts)}")
