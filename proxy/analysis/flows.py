"""Walking a parsed statement scope by scope and recording which base columns it uses, and how.

``analyze_tree(tree, ctx, acc)`` interprets one sqlglot tree (a query or a DML
statement) the way PostgreSQL's parse analysis would: it builds each query
level's FROM namespace (``proxy.analysis.resolve``), resolves every column
reference, expands ``*``, follows subqueries, CTEs (recursive and data-modifying),
set operations, views and materialized views down to base columns, and computes
for every expression a *flow*: the base columns (and relations) whose values reach
it, with PROJECT, AGGREGATE (only through a statistical aggregate) or WHOLE_ROW.
Flows are recorded into the ``StatementAccess`` when they are consumed: the
statement's outputs as PROJECT, WHERE/JOIN/GROUP BY/ORDER BY/... as FILTER.
A column of a subquery, CTE or view that nothing consumes is not reported; every
filter inside one is.

Anything it does not understand raises ``Unsupported`` (the caller fails closed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

import sqlglot
from sqlglot import exp
from sqlglot.dialects.postgres import Postgres

from proxy.analysis import functions as fn
from proxy.analysis import positions as pos
from proxy.analysis.lexer import Statement, T, Token
from proxy.analysis.model import (AggregateBlock, AggregateCall, Column, KeyGroup, Kind, RelationRef, StatementAccess,
                                  Table, Use)
from proxy.analysis.resolve import (A, F, P, W, Env, Flow, Item, Level, Source, UnknownColumn, Unsupported, aggregated,
                                    check_conflicts, column_of, consumed, ident, lookup_qualified, lookup_refname,
                                    lookup_unqualified, merge_into, of_groups, resolve_relation, union, valued_columns,
                                    whole_row)
from proxy.analysis.schema import (BUILTIN_SCHEMAS, MATERIALIZED_VIEW, PARTITIONED_TABLE, TABLE, VIEW, RelationInfo,
                                   Schema)

# Unquoted names that PostgreSQL reads as keywords, never as columns.
SQL_VALUE_KEYWORDS = frozenset({
    "current_user", "session_user", "user", "current_role", "current_catalog", "current_schema",
    "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp", "system_user",
    "default",
})
# ... from PostgreSQL 16 on: before, an ordinary name (any column or alias may be called it).
KEYWORDS_FROM_16 = frozenset({"system_user"})

# Relation references one statement may make (views' included). Far beyond any real query; past it a
# statement is refused rather than analysed for seconds on the loop every session shares (hunt 21 sent
# 8000 in 160 kB).
MAX_REFERENCES = 2000

_STAT_AGG_TYPES = (
    exp.Count, exp.Sum, exp.Avg, exp.Stddev, exp.StddevPop, exp.StddevSamp, exp.Variance, exp.VariancePop,
    exp.Corr, exp.CovarPop, exp.CovarSamp, exp.RegrAvgx, exp.RegrAvgy, exp.RegrCount, exp.RegrIntercept,
    exp.RegrR2, exp.RegrSlope, exp.RegrSxx, exp.RegrSxy, exp.RegrSyy,
)
# Typed nodes that are syntax, not calls of a pg_proc function.
_NOT_CALLS = (
    exp.Cast, exp.TryCast, exp.Case, exp.If, exp.Coalesce, exp.Greatest, exp.Least, exp.Nullif, exp.Extract,
    exp.Array, exp.Exists, exp.Anonymous, exp.Paren, exp.Interval, exp.Tuple, exp.CurrentDate,
    exp.CurrentTimestamp, exp.CurrentTime, exp.CurrentUser, exp.SessionUser, exp.CurrentSchema,
    exp.CurrentCatalog, exp.Localtime, exp.Localtimestamp, exp.Unnest, exp.Struct, exp.Bracket,
)
_NAME_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_EMPTY = (None, False, [], "")
_TYPED_NAMES: dict[type, str | None] = {}  # typed sqlglot function class -> PostgreSQL name
# Node classes met so far that Analyzer.special has no branch for (operators, CASE, ...), and that
# are no call of a function (Analyzer.evaluated_regardless): both decide by class alone.
_PLAIN: set[type] = set()
_NOT_CALL_CLASSES: set[type] = set()
_CALLED_AS: dict[type, frozenset[str]] = {}  # typed sqlglot class -> every function name sqlglot reads as it
# (typed class, id of the schema, search path) -> (the schema, the user-defined functions and the data-reading
# built-ins outside pg_catalog that a node of the class may call there): ``Analyzer.shadowing``, once per class
_SHADOWS: dict[tuple, tuple] = {}


def called_as(cls: type) -> frozenset[str]:
    """Every function name sqlglot reads as a node of class ``cls``: the name a typed node stands for is lost.

    ``ceiling(x)`` and ``ceil(x)`` are both exp.Ceil, ``now()`` is exp.CurrentTimestamp, ``mod(a, b)`` exp.Mod (like
    ``a % b``), ``variance(x)`` exp.Variance, printed var_samp. PostgreSQL resolves the name written along the
    path: with a user-defined public.ceiling(integer), ``ceiling(1)`` ran it while the analysis took
    pg_catalog.ceil, and card numbers went out under any purpose (hunt 28). Built once from the parser's
    function table (each name called with 0 to 4 arguments).

    >>> sorted(called_as(exp.Ceil)), sorted(called_as(exp.Mod)), "now" in called_as(exp.CurrentTimestamp)
    (['ceil', 'ceiling'], ['mod'], True)
    """
    if not _CALLED_AS:
        found: dict[type, set[str]] = {}
        for name in set(Postgres.Parser.FUNCTIONS) | set(Postgres.Parser.FUNCTION_PARSERS):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                continue
            for n in range(5):
                try:
                    node = sqlglot.parse_one(f"SELECT {name}({', '.join(['x'] * n)})", read="postgres").expressions[0]
                except Exception:  # (a builder that wants other arguments)
                    continue
                if not isinstance(node, (exp.Anonymous, exp.Column, exp.Literal)):  # (exp.Mod is no exp.Func)
                    found.setdefault(type(node), set()).add(name.lower())
        _CALLED_AS.update((k, frozenset(v)) for k, v in found.items())
        _CALLED_AS.setdefault(exp.Anonymous, frozenset())
    return _CALLED_AS.get(cls, frozenset())


# What a boolean constant may be spelt as in a string (8.1.2.5 "Boolean Type"; unique prefixes aside).
_BOOLEAN_TEXTS = {"true": True, "t": True, "on": True, "yes": True, "y": True, "1": True,
                  "false": False, "f": False, "off": False, "no": False, "n": False, "0": False}


def _sole_call(node: exp.Expr) -> bool:
    """Whether ``node`` is the whole of its statement: ``SELECT f(...)`` or ``SELECT f(...) AS x``, with no
    FROM, WHERE, LIMIT, set operation or anything else that could run it other than exactly once.

    >>> import sqlglot
    >>> [_sole_call(sqlglot.parse_one(q, read="postgres").find(exp.Anonymous)) for q in
    ...  ("SELECT s.f(1) AS x", "SELECT f(1) WHERE false", "SELECT f(1), 2", "SELECT (SELECT f(1))")]
    [True, False, False, False]
    """
    up = node.parent
    if isinstance(up, exp.Dot) and up.expression is node:  # pg_catalog.f(...)
        node, up = up, up.parent
    if isinstance(up, exp.Alias) and up.this is node:
        node, up = up, up.parent
    return (isinstance(up, exp.Select) and up.parent is None and node.arg_key == "expressions"
            and len(up.expressions) == 1 and all(k == "expressions" or not v for k, v in up.args.items()))


def _pg_settings_row(node: exp.Expr, name: exp.Expr) -> str | None:
    """The setting ``set_config(name, ...)`` names in ``SELECT set_config(name, ...) FROM pg_settings WHERE
    name = 'x'`` (pg_dump's way of setting what the server may not have, restrict_nonsystem_relation_kind
    since 15.8): 'x', lower case; None for any other form.

    >>> import sqlglot
    >>> q = "SELECT set_config(name, 'view', false) FROM pg_catalog.pg_settings WHERE name = 'Restrict_X'"
    >>> call = sqlglot.parse_one(q, read="postgres").find(exp.Anonymous)
    >>> _pg_settings_row(call, call.expressions[0])
    'restrict_x'
    """
    select = node.parent.parent if isinstance(node.parent, exp.Alias) else node.parent
    if not (isinstance(name, exp.Column) and not name.table and name.name == "name" and isinstance(select, exp.Select)
            and select.parent is None and len(select.expressions) == 1):
        return None
    if any(v for k, v in select.args.items() if k not in ("expressions", "from_", "where")):
        return None
    source, where = select.args.get("from_"), select.args.get("where")
    table = source.this if source is not None else None
    if not (isinstance(table, exp.Table) and table.name == "pg_settings" and table.db in ("", "pg_catalog")
            and not table.args.get("joins") and not table.alias and not table.catalog):
        return None
    cond = where.this if where is not None else None
    if not isinstance(cond, exp.EQ):
        return None
    sides = (cond.this, cond.expression)
    for col, lit in (sides, sides[::-1]):
        if (isinstance(col, exp.Column) and not col.table and col.name == "name" and isinstance(lit, exp.Literal)
                and lit.is_string):
            return lit.name.lower()
    return None


# Expressions PostgreSQL names after their construct in a result column (FigureColname).
_FIGURE_NAMES = ((exp.Case, "case"), (exp.Coalesce, "coalesce"), (exp.Nullif, "nullif"),
                 (exp.Greatest, "greatest"), (exp.Least, "least"), (exp.Exists, "exists"), (exp.Array, "array"))


@dataclass
class Context:
    """What the analysis of one statement needs besides the tree."""

    schema: Schema
    path: list[str]  # effective search path (pg_catalog included)
    role: str = ""
    parse: Callable[[str], exp.Expr] | None = None  # parses a view definition
    max_view_depth: int = 32


@dataclass
class Result:
    """A query's outputs: column names (None when the analysis cannot tell), their flows, its rows."""

    names: list[str | None]
    flows: list[Flow]
    rows: Flow = field(default_factory=dict)


@dataclass(eq=False)
class _Cte:
    name: str
    node: exp.Expr
    colnames: list[str]
    env: Env | None = None
    recursive: bool = False
    result: Result | None = None
    busy: bool = False
    materialized: bool | None = None  # MATERIALIZED (True), NOT MATERIALIZED (False), or neither
    refs: int = 0  # references to it seen so far


@dataclass
class _Frame:
    aggregated: bool = False


def _check_args(node: exp.Expr, allowed: frozenset[str] | set[str], what: str) -> None:
    for k, v in node.args.items():
        if k not in allowed and v not in _EMPTY:
            raise Unsupported(f"{what} with {k.rstrip('_').replace('_', ' ').upper()} is not supported by the analysis")
    if node.args.get("locks") and "locks" in allowed:
        _check_locks(node)


def _check_locks(node: exp.Expr) -> None:
    """FOR UPDATE OF a, b names FROM items of the query (PostgreSQL refuses anything else there); the analysis
    reads no more of it, so anything else is refused.

    >>> import sqlglot
    >>> _check_locks(sqlglot.parse_one("SELECT 1 FROM t FOR UPDATE OF t NOWAIT", read="postgres"))
    >>> _check_locks(sqlglot.parse_one("SELECT 1 FROM t FOR UPDATE OF FROM u", read="postgres"))
    Traceback (most recent call last):
    ...
    proxy.analysis.resolve.Unsupported: FOR UPDATE OF something other than a name is not supported by the analysis
    """
    for lock in node.args.get("locks") or []:
        for t in lock.expressions if isinstance(lock, exp.Lock) else [lock]:
            if not isinstance(t, exp.Table) or not isinstance(t.this, exp.Identifier) or any(
                    v not in _EMPTY for k, v in t.args.items() if k not in ("this", "db", "catalog")):
                raise Unsupported("FOR UPDATE OF something other than a name is not supported by the analysis")


_SELECT_ARGS = frozenset({"with_", "expressions", "distinct", "into", "from_", "joins", "where", "group",
                          "having", "windows", "order", "limit", "offset", "locks"})
_SETOP_ARGS = frozenset({"with_", "this", "expression", "distinct", "order", "limit", "offset", "locks"})
_WRAPPER_ARGS = frozenset({"this", "with_", "order", "limit", "offset", "locks"})
_TABLE_ARGS = frozenset({"this", "db", "catalog", "alias", "joins", "only", "rows_from", "ordinality", "sample"})


def implicit_code(schema: Schema, acc: StatementAccess, sch: str, name: str, write: bool,
                  rules: bool = True) -> None:
    """Count the code PostgreSQL runs when a statement reads (``write`` false) or writes relation
    ``sch.name`` without the statement naming it: its row-level security policies' functions, and
    for a write its triggers', defaults', constraints' and indexes' functions (``Schema.on_read``,
    ``on_write``) go to ``acc.implicit_functions``; a write reaching a relation with rules is refused
    (unless ``rules`` is false: COPY FROM and TRUNCATE run no rules).

    >>> s = Schema(on_write={("crm", "t"): {"crm.f": "runs in a trigger on crm.t"}}, rules={("crm", "r"): ["crm.r"]})
    >>> acc = StatementAccess(Kind.INSERT); implicit_code(s, acc, "crm", "t", write=True); acc.implicit_functions
    {'crm.f': 'runs in a trigger on crm.t'}
    >>> implicit_code(s, acc, "crm", "r", write=True)
    Traceback (most recent call last):
    ...
    proxy.analysis.resolve.Unsupported: crm.r has rules (CREATE RULE), which PostgreSQL runs instead of or besides a write to it and the analysis does not read
    """
    key = (sch, name)
    code = schema.on_read.get(key)
    if code:
        for fn, why in code.items():
            acc.implicit_functions.setdefault(fn, why)
    if not write:
        return
    ruled = schema.rules.get(key) if rules else None
    if ruled:
        if ruled == (f"{sch}.{name}",):
            raise Unsupported(f"{sch}.{name} has rules (CREATE RULE), which PostgreSQL runs instead of or besides "
                              f"a write to it and the analysis does not read")
        raise Unsupported(f"a write to {sch}.{name} reaches {', '.join(ruled)} (a partition, child table or foreign "
                          f"key action), which has rules (CREATE RULE) that the analysis does not read")
    code = schema.on_write.get(key)
    if code:
        for fn, why in code.items():
            acc.implicit_functions.setdefault(fn, why)


class Analyzer:
    """Interprets statements into a ``StatementAccess``; one instance per statement."""

    def __init__(self, ctx: Context, acc: StatementAccess, statement: Statement | None = None) -> None:
        self.ctx = ctx
        self.acc = acc
        self.path = ctx.path
        self.frames: list[_Frame] = [_Frame()]
        self.modifying: list[Kind] = []
        # A SELECT ... INTO anywhere (PostgreSQL takes it inside parentheses, and on the first branch
        # of a UNION, and refuses it elsewhere): the statement creates a table.
        self.creates_table = False
        self.view_depth = 0
        self.locked: set[int] = set()  # SELECTs that lock rows through a parenthesized query (see ``wrapper``)
        self.views: dict[tuple[str, str], Result] = {}
        self.views_busy: set[tuple[str, str]] = set()
        # Positions, for the rewrite: the text being read (the statement, or a view's
        # definition while it is analysed), and where its references and aggregates go.
        self.text: pos.Text | None = (pos.Text(statement.tokens, statement.offset, statement.first)
                                      if statement is not None else None)
        self.refs: list[RelationRef] = acc.references
        # (id of the list the reference is in, span, target) -> (that list, the reference): see ``reference``
        self.ref_index: dict[tuple, tuple[list[RelationRef], RelationRef]] = {}
        self.aggs: list[AggregateCall] = acc.aggregates
        self.view_parts: dict[tuple[str, str], tuple[list, list, frozenset[str], str | None]] = {}
        self._filtered: exp.Expr | None = None  # the aggregate call under a FILTER clause being read
        self.top: exp.Expr | None = None  # the statement's own query, whose outputs are all consumed anyway
        self.ctes: list[_Cte] = []  # every WITH query of the statement (views' included)
        # Columns a statistical aggregate other than a count reads (sum, avg, ...): over one row
        # that is the row's value, so storing it counts as copying them (``copy``).
        self.valued: set[Column] = set()

    # --- recording ---------------------------------------------------------------------------------------

    def consume(self, flow: Flow, ctx: Use, groups: bool = False) -> None:
        """Record the uses of values that flow with ``flow`` and are consumed in ``ctx`` (``groups``: by a
        query's ORDER BY or HAVING, see ``of_groups``)."""
        acc = self.acc
        for k, u in flow.items():
            use = of_groups(u) if groups else consumed(u, ctx)
            if isinstance(k, Column):
                acc.columns[k] = acc.columns.get(k, Use.NONE) | use
            else:
                acc.tables[k] = acc.tables.get(k, Use.NONE) | use

    def consume_result(self, r: Result, ctx: Use) -> None:
        for fl in r.flows:
            self.consume(fl, ctx)
        self.consume(r.rows, ctx)

    # --- statements ------------------------------------------------------------------------------------------

    def statement(self, tree: exp.Expr) -> Kind:
        """Analyse a whole statement; return its kind."""
        env = Env()
        self.top = tree
        if isinstance(tree, exp.Insert):
            self.insert(tree, env)
            kind = Kind.INSERT
        elif isinstance(tree, exp.Update):
            self.update(tree, env)
            kind = Kind.UPDATE
        elif isinstance(tree, exp.Delete):
            self.delete(tree, env)
            kind = Kind.DELETE
        elif isinstance(tree, exp.Merge):
            self.merge(tree, env)
            kind = Kind.MERGE
        elif isinstance(tree, (exp.Select, exp.SetOperation, exp.Subquery, exp.Values)):
            r = self.query(tree, env)
            self.consume_result(r, P)
            kind = Kind.DDL if self.creates_table else Kind.SELECT
        else:
            raise Unsupported(f"{type(tree).__name__.upper()} statements are not supported by the analysis")
        self.evaluated_ctes()
        if kind is Kind.SELECT and self.modifying:
            kind = self.modifying[0]
        return kind

    # --- queries ----------------------------------------------------------------------------------------------

    def query(self, node: exp.Expr, env: Env) -> Result:
        if isinstance(node, exp.Select):
            return self.select(node, env)
        if isinstance(node, exp.SetOperation):
            return self.setop(node, env)
        if isinstance(node, exp.Subquery):
            return self.wrapper(node, env)
        if isinstance(node, exp.Values):
            return self.values(node, env)
        if isinstance(node, exp.Paren):
            return self.query(node.this, env)
        if isinstance(node, (exp.Insert, exp.Update, exp.Delete, exp.Merge)):
            raise Unsupported("a data-modifying statement is only allowed at the top level or in WITH")
        raise Unsupported(f"{type(node).__name__} is not a query the analysis understands")

    def select(self, node: exp.Select, env: Env) -> Result:
        _check_args(node, _SELECT_ARGS, "SELECT")
        if node.args.get("into"):
            self.creates_table = True
        env = self.with_(node, env)
        level = Level()
        from_ = node.args.get("from_")
        self.add_from(level, from_.this if from_ is not None else None, node.args.get("joins") or [], env)
        if node.args.get("locks") or id(node) in self.locked:
            self.row_copies(level)
        inner = env.inner(level)
        frame = _Frame()
        self.frames.append(frame)
        try:
            where = node.args.get("where")
            if where is not None:
                self.consume(self.expr(where.this, inner), F)
                self.note_pushable(where.this, inner)
            for w in node.args.get("windows") or []:
                self.window_spec(w, inner)
            names, flows = self.select_list(node.expressions, inner, evaluated=node is not self.top)
            group = node.args.get("group")
            if group is not None:
                frame.aggregated = True
                self.group_items(list(group.expressions) + _group_extras(group), inner, level, names, flows)
            having = node.args.get("having")
            if having is not None:
                frame.aggregated = True
                self.consume(self.expr(having.this, inner), F, groups=True)
            distinct = node.args.get("distinct")
            if distinct is not None:
                on = distinct.args.get("on")
                if on is not None:
                    for e in on.expressions if isinstance(on, exp.Tuple) else [on]:
                        self.order_key(e, inner, names, flows)
                elif distinct.expressions:
                    raise Unsupported("DISTINCT with expressions is not supported by the analysis")
                else:
                    for fl in flows:
                        self.consume(fl, F)
            order = node.args.get("order")
            if order is not None:
                for o in order.expressions:
                    self.order_key(o.this, inner, names, flows, groups=True)
            self.limits(node, inner)
            if group is not None:
                self.key_groups(node, group, inner)
        finally:
            self.frames.pop()
        rows = union(*(it.rows for it in level.items))
        if frame.aggregated:
            rows = aggregated(rows)
        return Result(names, flows, rows)

    def row_copies(self, level: Level) -> None:
        """Read every output of the FROM items of a level that locks rows (FOR UPDATE/SHARE) or is an UPDATE,
        DELETE or MERGE, except stored tables and views: PostgreSQL keeps a whole-row copy of every other
        item it does not flatten (planner.c preprocess_rowmarks, ROW_MARK_COPY, for EvalPlanQual), and that
        whole-row reference keeps the planner from dropping its unused outputs (allpaths.c
        remove_unused_subquery_outputs), so ``UPDATE t SET ... FROM (SELECT id, 1 / (...) AS z FROM u OFFSET 0)
        s`` or ``... FOR UPDATE OF t`` computes z for every row, and its error can show a value (hunt 29).
        A view's outputs are its definition's, not the statement's, and are left to their uses."""
        for it in level.items:
            for src in it.sources:
                if src.base or src.relation is not None and src.relation.kind in (VIEW, MATERIALIZED_VIEW):
                    continue
                for fl in src.flows if src.known else [src.generic]:
                    self.consume(fl, P)

    def limits(self, node: exp.Expr, env: Env) -> None:
        for key in ("limit", "offset"):
            lim = node.args.get(key)
            if lim is None:
                continue
            if isinstance(lim, exp.Fetch):
                count = lim.args.get("count")
                if count is not None:
                    self.consume(self.expr(count, env), F)
                continue
            for k in ("this", "expression", "offset"):
                v = lim.args.get(k)
                if isinstance(v, exp.Expr):
                    self.consume(self.expr(v, env), F)

    def order_key(self, e: exp.Expr, env: Env | None, names: list[str | None], flows: list[Flow],
                  groups: bool = False) -> None:
        """An ORDER BY / DISTINCT ON item: an ordinal, an output column name, or an input expression
        (``groups``: an ORDER BY, where statistics count as shown, see ``of_groups``; DISTINCT ON filters).

        >>> from proxy.analysis.access import analyze; from proxy.analysis.schema import Schema
        >>> s = Schema.from_dict({"schemas": {"bi": {"tables": {"t": ["region", "amount"]}}}})
        >>> st = analyze("SELECT region FROM bi.t GROUP BY region ORDER BY sum(amount) DESC", s).statements[0]
        >>> sorted((c.name, u.name) for c, u in st.columns.items())
        [('amount', 'AGGREGATE'), ('region', 'PROJECT|FILTER')]
        """
        if isinstance(e, exp.Literal) and not e.is_string:
            self.acc.reads_constants = True
            self.consume(_ordinal(e, flows), F, groups)
            return
        if isinstance(e, exp.Column) and not e.args.get("table") and not isinstance(e.this, exp.Star):
            n = ident(e.this)
            hits = [fl for nm, fl in zip(names, flows) if nm == n]
            if hits:
                self.consume(union(*hits), F, groups)
                return
        if env is None:
            raise Unsupported("ORDER BY on a set operation must name an output column")
        self.consume(self.expr(e, env), F, groups)

    def group_items(self, items: list[exp.Expr], env: Env, level: Level, names: list[str | None],
                    flows: list[Flow]) -> None:
        for g in items:
            if isinstance(g, (exp.GroupingSets, exp.Cube, exp.Rollup, exp.Tuple)):
                self.group_items(list(g.expressions), env, level, names, flows)
            elif isinstance(g, exp.Literal) and not g.is_string:
                self.acc.reads_constants = True
                self.consume(_ordinal(g, flows), F)
            elif isinstance(g, exp.Column) and not g.args.get("table") and not isinstance(g.this, exp.Star):
                n = ident(g.this)
                local = _find_local(level, n)
                if local is not None:
                    self.consume(local, F)
                    continue
                hits = [fl for nm, fl in zip(names, flows) if nm == n]
                if hits:
                    self.consume(union(*hits), F)
                else:
                    self.consume(self.expr(g, env), F)
            else:
                self.consume(self.expr(g, env), F)

    def window_spec(self, w: exp.Expr, env: Env) -> None:
        """A window's PARTITION BY, ORDER BY and frame (its filters); the window it names is a name only.

        >>> import sqlglot; from proxy.analysis.model import StatementAccess
        >>> w = sqlglot.parse_one("SELECT sum(a) OVER ($1 ORDER BY a) FROM t", read="postgres").expressions[0]
        >>> Analyzer(Context(Schema(), []), StatementAccess(Kind.SELECT)).window_spec(w, Env())
        Traceback (most recent call last):
        ...
        proxy.analysis.resolve.Unsupported: a window name that is not a name is not supported by the analysis
        """
        if any(w.args.get(k) is not None and not isinstance(w.args[k], exp.Identifier)
               for k in ("alias",) + (("this",) if w.arg_key == "windows" else ())):
            raise Unsupported("a window name that is not a name is not supported by the analysis")
        for key in ("partition_by",):
            for e in w.args.get(key) or []:
                self.consume(self.expr(e, env), F)
        order = w.args.get("order")
        if order is not None:
            for o in order.expressions:
                self.consume(self.expr(o.this, env), F)
        spec = w.args.get("spec")
        if spec is not None:
            for e in spec.iter_expressions():
                if isinstance(e, exp.Expr):
                    self.consume(self.expr(e, env), F)

    def select_list(self, items: list[exp.Expr], env: Env,
                    evaluated: bool = False) -> tuple[list[str | None], list[Flow]]:
        """Output names and flows; with ``evaluated`` (a subquery's list), outputs PostgreSQL computes whether
        or not anything uses them (``evaluated_regardless``) are read here, as they would be if returned."""
        names: list[str | None] = []
        flows: list[Flow] = []
        level = env.levels[0] if env.levels else Level()
        for item in items:
            alias = None
            inner = item
            if isinstance(item, exp.Alias):
                alias = ident(item.args.get("alias"))
                inner = item.this
            if isinstance(inner, exp.Star):
                if not level.items:
                    raise Unsupported("SELECT * with no tables specified")
                for it in level.items:
                    if it.unknown:
                        raise Unsupported(f"cannot expand * over {it.unknown[0].label}, whose output columns are "
                                          f"unknown")
                    for nm, fl in it.entries:
                        names.append(nm)
                        flows.append(fl)
                continue
            if isinstance(inner, exp.Column) and isinstance(inner.this, exp.Star):
                src = self.star_source(inner, env)
                if not src.known:
                    raise Unsupported(f"cannot expand {src.name}.* over {src.label}, whose output columns are unknown")
                names.extend(src.columns)
                flows.extend(src.flows)
                continue
            if isinstance(inner, exp.Dot) and isinstance(inner.expression, exp.Star):
                src = self.row_source(inner.this, env)
                if src is None or not src.known:
                    raise Unsupported("(composite).* expansion is only supported for whole-row references")
                names.extend(src.columns)
                flows.extend(whole_row(fl) for fl in src.flows)
                continue
            if isinstance(inner, exp.Subquery) and inner.args.get("alias") is None:
                r = self.query(inner, env)  # a scalar subquery is named after its column
                flows.append(union(*r.flows, r.rows))
                names.append(alias if alias is not None else (r.names[0] if len(r.names) == 1 else None))
                continue
            flows.append(self.expr(inner, env))
            if evaluated and self.evaluated_regardless(inner):
                self.consume(flows[-1], P)
            names.append(alias if alias is not None else self.figure_name(inner))
        return names, flows

    def star_source(self, col: exp.Column, env: Env) -> Source:
        parts = _column_parts(col, self.ctx.schema)[:-1]
        if len(parts) == 1:
            src = lookup_refname(env, parts[0])
        elif len(parts) == 2:
            src = lookup_refname(env, parts[1], parts[0])
        else:
            src = None
        if src is None:
            raise Unsupported(f'missing FROM-clause entry for table "{".".join(parts)}"')
        return src

    def row_source(self, node: exp.Expr, env: Env) -> Source | None:
        """The FROM item a whole-row expression ``(t)`` / ``t`` refers to, if it is one."""
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.Column) and not node.args.get("table") and not isinstance(node.this, exp.Star):
            name = ident(node.this)
            for lv in env.levels:
                for it in lv.items:
                    if any(nm == name for nm, _ in it.entries) or it.unknown:
                        return None
            return lookup_refname(env, name)
        if isinstance(node, exp.Column) and isinstance(node.this, exp.Star):
            return self.star_source(node, env)
        return None

    def setop(self, node: exp.SetOperation, env: Env) -> Result:
        """UNION/INTERSECT/EXCEPT; a left-deep chain of them is walked without recursion."""
        _check_args(node, _SETOP_ARGS, "set operation")
        env = self.with_(node, env)
        chain = [node]
        cur = node.this
        while isinstance(cur, exp.SetOperation) and not any(
                cur.args.get(k) not in _EMPTY for k in ("with_", "order", "limit", "offset", "locks")):
            _check_args(cur, _SETOP_ARGS, "set operation")
            chain.append(cur)
            cur = cur.this
        result = self.query(cur, env)
        for op in reversed(chain):
            right = self.query(op.expression, env)
            result = self.combine(op, result, right)
        self.wrapper_clauses(node, result, env)
        if node is not self.top:
            # A set operation below the top is computed whole: the planner drops no unused output
            # of it (allpaths.c remove_unused_subquery_outputs leaves set operations alone, and
            # a UNION ALL is only flattened into its arms when their types line up), so an
            # output that some arm computes with an expression, which can fail with an error
            # that shows a value, counts as read, used or not.
            arms = [cur] + [op.expression for op in chain]
            for i, fl in enumerate(result.flows):
                if not all(self.plain_output(arm, i, env) for arm in arms):
                    self.consume(fl, P)
        return result

    def plain_output(self, arm: exp.Expr, i: int, env: Env) -> bool:
        """Whether output ``i`` of a set operation's ``arm`` is a constant or a column of a table the arm reads
        directly (no view, CTE, subquery or function in its FROM): computing it cannot fail.

        >>> from proxy.analysis.schema import Schema
        >>> s = Schema.from_dict({"schemas": {"app": {"tables": {"t": {"columns": ["a", "b"]}}}}})
        >>> from proxy.analysis.model import StatementAccess
        >>> an = Analyzer(Context(s, ["pg_catalog", "app"]), StatementAccess(Kind.SELECT))
        >>> import sqlglot
        >>> arm = sqlglot.parse_one("SELECT a, b::int, 1 FROM t", read="postgres")
        >>> [an.plain_output(arm, i, Env()) for i in range(3)]
        [True, False, True]
        """
        while isinstance(arm, exp.Subquery) and all(arm.args.get(k) in _EMPTY for k in _WRAPPER_ARGS - {"this"}):
            arm = arm.this
        if not isinstance(arm, exp.Select) or arm.args.get("with_") or i >= len(arm.expressions):
            return False
        outputs = [e.unalias() for e in arm.expressions]
        if any(isinstance(e, exp.Star) or isinstance(e, exp.Column) and isinstance(e.this, exp.Star) for e in outputs):
            return False  # positions are not the select list's
        e = outputs[i]
        if isinstance(e, (exp.Literal, exp.Null, exp.Boolean)):
            return True
        if not isinstance(e, exp.Column):
            return False
        from_ = arm.args.get("from_")
        for src in ([from_.this] if from_ is not None else []) + [j.this for j in arm.args.get("joins") or []]:
            if not isinstance(src, exp.Table) or not isinstance(src.this, exp.Identifier) or src.args.get("joins"):
                return False
            sch = ident(src.args.get("db")) if src.args.get("db") else None
            if sch is None and ident(src.this) in env.ctes:
                return False
            try:
                if resolve_relation(self.ctx.schema, self.path, ident(src.this), sch).kind != TABLE:
                    return False
            except Unsupported:
                return False
        return True

    def combine(self, node: exp.SetOperation, left: Result, right: Result) -> Result:
        if len(left.flows) != len(right.flows):
            raise Unsupported("each side of a set operation must have the same number of columns")
        distinct = node.args.get("distinct") is not False or not isinstance(node, exp.Union)
        if isinstance(node, exp.Except):
            for fl in right.flows:
                self.consume(fl, F)
            self.consume(right.rows, F)
            flows = [dict(fl) for fl in left.flows]
            rows = dict(left.rows)
        else:
            flows = [union(a, b) for a, b in zip(left.flows, right.flows)]
            rows = union(left.rows, right.rows)
        if distinct:
            for fl in flows:
                self.consume(fl, F)
        return Result(list(left.names), flows, rows)

    def wrapper(self, node: exp.Subquery, env: Env) -> Result:
        _check_args(node, _WRAPPER_ARGS, "parenthesized query")
        env = self.with_(node, env)
        if node.args.get("locks"):
            # ``(SELECT ... FROM t, (...) s) FOR UPDATE OF t`` locks in the SELECT inside (gram.y
            # insertSelectOptions): its FROM items are copied whole there (``row_copies``).
            inner = node.this
            while isinstance(inner, (exp.Subquery, exp.Paren)):
                inner = inner.this
            self.locked.add(id(inner))
        r = self.query(node.this, env)
        self.wrapper_clauses(node, r, env)
        return r

    def wrapper_clauses(self, node: exp.Expr, r: Result, env: Env) -> None:
        """ORDER BY (output columns only) and LIMIT/OFFSET of a set operation or parenthesized query.

        LIMIT and OFFSET are expressions in the scope around the query, its own WITH
        included: a CTE of that WITH hides a table of the same name there too.
        """
        order = node.args.get("order")
        if order is not None:
            for o in order.expressions:
                self.order_key(o.this, None, r.names, r.flows, groups=True)
        self.limits(node, env)

    def values(self, node: exp.Values, env: Env) -> Result:
        _check_args(node, frozenset({"expressions", "alias"}), "VALUES")
        flows: list[Flow] = []
        for row in node.expressions:
            cells = row.expressions if isinstance(row, exp.Tuple) else [row]
            if flows and len(cells) != len(flows):
                raise Unsupported("VALUES lists must all be the same length")
            if not flows:
                flows = [{} for _ in cells]
            for i, c in enumerate(cells):
                merge_into(flows[i], self.expr(c, env))
        if len(node.expressions) > 1 or any(self.evaluated_regardless(row) for row in node.expressions):
            # A VALUES scan computes every cell of every row, used or not; only a single row without
            # volatile or set-returning calls is pulled up into its query, where unused cells are
            # never computed (prepjointree.c is_simple_values). So an unused cell's error would show
            # a value: ``EXISTS (SELECT 1 FROM (VALUES (1 / (length(m.email) - 21)), (1)) v)`` (hunt 26).
            for fl in flows:
                self.consume(fl, P)
        return Result([f"column{i + 1}" for i in range(len(flows))], flows, {})

    # --- WITH --------------------------------------------------------------------------------------------------

    def with_(self, node: exp.Expr, env: Env) -> Env:
        w = node.args.get("with_")
        if w is None:
            return env
        _check_args(w, frozenset({"expressions", "recursive"}), "WITH")
        recursive = bool(w.args.get("recursive"))
        ctes = dict(env.ctes)
        defs: list[_Cte] = []
        for cte in w.expressions:
            _check_args(cte, frozenset({"this", "alias", "materialized"}), "WITH query")
            alias = cte.args.get("alias")
            name = ident(alias.this)
            colnames = [ident(c) for c in alias.columns] if alias is not None else []
            d = _Cte(name, cte.this, colnames, recursive=recursive, materialized=cte.args.get("materialized"))
            self.ctes.append(d)
            if name in {x.name for x in defs}:
                raise Unsupported(f'WITH query name "{name}" specified more than once')
            defs.append(d)
            if recursive:
                ctes[name] = d
            d.env = Env(env.levels, ctes if recursive else dict(ctes))
            if not recursive:
                ctes[name] = d
        for d in defs:
            self.cte_result(d)
        return Env(env.levels, ctes)

    def cte_result(self, d: _Cte) -> Result:
        """The outputs of WITH query ``d``, analysed once; a recursive one's until its flows settle.

        >>> from proxy.analysis.access import analyze; from proxy.analysis.schema import Schema
        >>> s = Schema.from_dict({"schemas": {"app": {"tables": {"t": ["a", "card"], "u": ["a"]}}}})
        >>> sql = ("WITH RECURSIVE r(n) AS (WITH u AS (SELECT card AS a FROM t) SELECT a FROM u "
        ...        "UNION SELECT n FROM r) TABLE r")
        >>> sorted(str(c) for c in analyze(sql, s, ["app"]).statements[0].columns)
        ['app.t.card']
        """
        if d.result is not None:
            return d.result
        if d.busy:
            raise Unsupported(f'recursive reference to query "{d.name}" must be in the second part of a UNION')
        d.busy = True
        try:
            body = d.node
            if isinstance(body, (exp.Insert, exp.Update, exp.Delete, exp.Merge)):
                kind = {exp.Insert: Kind.INSERT, exp.Update: Kind.UPDATE, exp.Delete: Kind.DELETE,
                        exp.Merge: Kind.MERGE}[type(body)]
                self.modifying.append(kind)
                r = self.dml(body, d.env)
                d.result = self._rename(d, r)
            elif d.recursive and isinstance(body, exp.Union) and not any(
                    body.args.get(k) not in _EMPTY for k in ("order", "limit", "offset", "locks")):
                _check_args(body, _SETOP_ARGS, "set operation")
                # The UNION's own WITH is in scope in both its arms: in ``WITH RECURSIVE r AS (WITH plans AS
                # (SELECT card_number AS name FROM ...) SELECT name FROM plans UNION ALL ...)`` PostgreSQL reads
                # ``plans`` as that WITH query; unread, it was taken for service.plans and the card
                # numbers went out under any purpose (hunt 27).
                env = self.with_(body, d.env)
                left = self.query(body.this, env)
                d.result = self._rename(d, left)
                d.busy = False
                distinct = body.args.get("distinct") is not False
                for _ in range(64):
                    right = self.query(body.expression, env)
                    if len(right.flows) != len(left.flows):
                        raise Unsupported("each side of a set operation must have the same number of columns")
                    cur = d.result
                    new = Result(cur.names, [union(a, b) for a, b in zip(cur.flows, right.flows)],
                                 union(cur.rows, right.rows))
                    if new.flows == cur.flows and new.rows == cur.rows:
                        break
                    d.result = new
                else:  # pragma: no cover - flows grow monotonically over a finite set
                    raise Unsupported(f'cannot analyse recursive query "{d.name}"')
                if distinct:
                    for fl in d.result.flows:
                        self.consume(fl, F)
            else:
                d.result = self._rename(d, self.query(body, d.env))
        finally:
            d.busy = False
        return d.result

    def evaluated_ctes(self) -> None:
        """Read every output of the WITH queries PostgreSQL computes whole, used or not (at the statement's end,
        when all references are known): a data-modifying one runs (and computes its RETURNING) even
        unreferenced; a referenced one is computed whole when MATERIALIZED, recursive, referenced more than
        once, locking rows, or calling a volatile function: it is not inlined then (7.8.3 "Common Table Expression
        Materialization"), and an error in any of its columns can show a value.

        >>> from proxy.analysis.access import analyze
        >>> from proxy.analysis.schema import Schema
        >>> s = Schema.from_dict({"schemas": {"app": {"tables": {"t": {"columns": ["a", "b"]}}}}})
        >>> st = analyze("WITH x AS MATERIALIZED (SELECT a, b FROM t) SELECT a FROM x", s, ["app"], "r").statements[0]
        >>> sorted(c.name for c in st.columns)
        ['a', 'b']
        """
        for d in self.ctes:
            if d.result is None:
                continue
            modifying = isinstance(d.node, (exp.Insert, exp.Update, exp.Delete, exp.Merge))
            # A locking clause anywhere in it (FOR UPDATE/SHARE, in a subquery too) keeps it from being
            # inlined as well: subselect.c contain_dml counts rowMarks as a side effect, so
            # ``WITH c AS (SELECT 1 / (...card_number...) AS z FROM t FOR UPDATE) SELECT count(*) FROM c``
            # computes z for every row (hunt 29).
            if modifying or d.refs and (d.materialized or d.recursive or d.refs > 1
                                        or d.node.find(exp.Lock) is not None
                                        or self.evaluated_regardless(d.node)):
                for fl in d.result.flows:
                    self.consume(fl, P)

    def evaluated_regardless(self, e: exp.Expr) -> bool:
        """Whether ``e`` (anywhere in it) calls a volatile or set-returning function, or a user-defined one
        (volatile unless declared otherwise; its body is not analysed). PostgreSQL computes such an
        output of a subquery even when nothing above uses it, and does not inline a WITH query holding
        one. Other unused outputs are never computed (the planner drops them, allpaths.c
        remove_unused_subquery_outputs), so their errors cannot show a value."""
        inert = _NOT_CALL_CLASSES
        for node in e.walk():
            if node.__class__ in inert:
                continue
            if isinstance(node, exp.Anonymous):
                if isinstance(node.parent, exp.Dot):
                    return True  # schema-qualified: taken for a user-defined function
                res = fn.classify_function(_func_name(node), None, self.ctx.schema, self.path)
                if res.cls is not fn.FunctionClass.SAFE_BUILTIN or fn.evaluated_regardless(res.name,
                                                                                           self.ctx.schema):
                    return True
            elif isinstance(node, exp.Unnest):
                return True
            elif called_as(node.__class__) and self.shadowing(node):
                return True  # (it may call a user-defined function)
            elif isinstance(node, exp.Func) and not isinstance(node, _NOT_CALLS):
                name = self.typed_name(node)
                if name and fn.evaluated_regardless(name, self.ctx.schema):
                    return True
            elif not called_as(node.__class__):
                inert.add(node.__class__)  # (the tests above are on the class alone)
        return False

    @staticmethod
    def _rename(d: _Cte, r: Result) -> Result:
        if len(d.colnames) > len(r.names):
            raise Unsupported(f'WITH query "{d.name}" has {len(r.names)} columns available but '
                              f"{len(d.colnames)} columns specified")
        names = list(d.colnames) + list(r.names[len(d.colnames):])
        return Result(names, r.flows, r.rows)

    # --- FROM ----------------------------------------------------------------------------------------------------

    def add_from(self, level: Level, first: exp.Expr | None, joins: list[exp.Join], env: Env) -> None:
        """Add a FROM list (its first item, then comma items and joins) to ``level``."""
        if first is None:
            if joins:
                raise Unsupported("JOIN without FROM")
            return
        current: Item | None = None
        for node, join in _from_sequence(first, joins):
            if current is not None and (join is None or _is_comma(join)):
                level.add(current)
                current = None
            lateral = env.inner(Level(level.items + ([current] if current is not None else [])))
            # ``first``'s own joins come next in the sequence; any other item's are a nested join group.
            right = self.from_item(node, env, lateral, joins_read=node is first)
            if current is None:
                current = right
            else:
                current = self.join(current, right, join, env)
        if current is not None:
            level.add(current)

    def join(self, left: Item, right: Item, join: exp.Join, env: Env) -> Item:
        _check_args(join, frozenset({"this", "on", "side", "kind", "using", "method"}), "JOIN")
        method = (join.args.get("method") or "").upper()
        kind = (join.args.get("kind") or "").upper()
        if method and method != "NATURAL":
            raise Unsupported(f"{method} JOIN is not supported by the analysis")
        if kind and kind not in ("CROSS", "INNER", "OUTER"):
            raise Unsupported(f"{kind} JOIN is not supported by the analysis")
        check_conflicts(left.sources, right.sources)
        using = join.args.get("using")
        if method == "NATURAL":
            if left.unknown or right.unknown:
                raise Unsupported("NATURAL JOIN over a function whose output columns are unknown")
            lnames = [nm for nm, _ in left.entries]
            rnames = {nm for nm, _ in right.entries}
            using_names = [nm for i, nm in enumerate(lnames) if nm in rnames and nm not in lnames[:i]]
        elif using:
            using_names = [ident(u.this if isinstance(u, exp.Column) else u) for u in using]
        else:
            using_names = []
        entries: list[tuple[str | None, Flow]]
        if using_names:
            merged: list[tuple[str | None, Flow]] = []
            lrest, rrest = list(left.entries), list(right.entries)
            for n in using_names:
                lf = _take_one(lrest, n, "left", left)
                rf = _take_one(rrest, n, "right", right)
                self.consume(lf, F)
                self.consume(rf, F)
                merged.append((n, union(lf, rf)))
            entries = merged + lrest + rrest
        else:
            entries = left.entries + right.entries
        combined = Item(entries, left.sources + right.sources, left.unknown + right.unknown)
        on = join.args.get("on")
        if on is not None:
            self.consume(self.expr(on, env.inner(Level([combined]))), F)
        return combined

    def from_item(self, node: exp.Expr, env: Env, lateral: Env, joins_read: bool = False) -> Item:
        """The FROM item ``node``; ``joins_read`` when the caller reads the joins sqlglot hangs on it."""
        if isinstance(node, exp.Table):
            _check_args(node, _TABLE_ARGS, "FROM item")
            if own_joins(node) and not joins_read:
                # ``a JOIN b JOIN c ON x ON y`` is ``a JOIN (b JOIN c ON x) ON y``: sqlglot hangs the
                # inner join on ``b``, and reading ``b`` alone dropped ``c`` from the statement (hunt 24:
                # ``SELECT *`` returned card numbers under any purpose).
                return self.join_group(node, lateral)
            if node.args.get("rows_from"):
                return Item.of(self.function_source(list(node.args["rows_from"]),
                                                    node.args.get("alias"), bool(node.args.get("ordinality")),
                                                    lateral))
            if isinstance(node.this, (exp.Func, exp.Dot)):
                return Item.of(self.function_source([node], node.args.get("alias"),
                                                    bool(node.args.get("ordinality")), lateral))
            return Item.of(self.table_source(node, env))
        if isinstance(node, exp.Lateral):
            _check_args(node, frozenset({"this", "alias", "ordinality", "view", "outer"}), "LATERAL")
            if node.args.get("view") or node.args.get("outer"):
                raise Unsupported("LATERAL VIEW is not PostgreSQL")
            inner = node.this
            if isinstance(inner, exp.Subquery):
                # (the query in the parentheses is read here, so nothing else may hang on them)
                _check_args(inner, frozenset({"this", "alias"}), "LATERAL subquery")
                if node.args.get("alias") is not None and inner.args.get("alias") is not None:
                    raise Unsupported("a LATERAL subquery with two aliases is not supported by the analysis")
                r = self.query(inner.this, lateral)
                return Item.of(_derived(r, node.args.get("alias") or inner.args.get("alias"), "subquery"))
            if isinstance(inner, exp.Unnest) and not node.args.get("ordinality"):
                if node.args.get("alias") is not None and inner.args.get("alias") is not None:
                    raise Unsupported("a LATERAL unnest with two aliases is not supported by the analysis")
                return Item.of(self.unnest_source(inner, node.args.get("alias") or inner.args.get("alias"), lateral))
            return Item.of(self.function_source([inner], node.args.get("alias"), bool(node.args.get("ordinality")),
                                                lateral))
        if isinstance(node, exp.Unnest):
            return Item.of(self.unnest_source(node, node.args.get("alias"), lateral))
        if isinstance(node, exp.Values):
            r = self.values(node, env)
            return Item.of(_derived(r, node.args.get("alias"), "VALUES"))
        if isinstance(node, exp.Subquery):
            inner = node.this
            alias = node.args.get("alias")
            _check_args(node, frozenset({"this", "alias", "joins"}), "FROM item")
            if isinstance(inner, (exp.Table, exp.Subquery)) and _is_join_group(inner):
                if node.args.get("joins"):
                    raise Unsupported("unexpected joins on a parenthesized join")
                item = self.join_group(inner, lateral)
                if alias is None:
                    return item
                if item.unknown:
                    raise Unsupported("an aliased join over a function whose output columns are unknown")
                r = Result([nm for nm, _ in item.entries], [fl for _, fl in item.entries], item.rows)
                return Item.of(_derived(r, alias, "join"))
            if node.args.get("joins"):
                raise Unsupported("unexpected joins on a subquery")
            r = self.query(inner, env)
            return Item.of(_derived(r, alias, "subquery"))
        raise Unsupported(f"{type(node).__name__} in FROM is not supported by the analysis")

    def unnest_source(self, node: exp.Unnest, alias: exp.TableAlias | None, lateral: Env) -> Source:
        """``unnest(a, ...) [WITH ORDINALITY] [AS x(...)]`` in FROM, LATERAL or not: sqlglot keeps the
        ordinality column's alias apart (``offset``), after the alias's other column names.

        >>> from proxy.analysis.access import analyze
        >>> from proxy.analysis.schema import Schema
        >>> s = Schema.from_dict({"schemas": {"app": {"tables": {"t": {"columns": ["a", "b"]}}}}})
        >>> sql = "SELECT x.v, x.n FROM t CROSS JOIN LATERAL unnest(t.b) WITH ORDINALITY AS x(v, n)"
        >>> st = analyze(sql, s, ["app"], "r").statements[0]
        >>> sorted((c.name, u.name) for c, u in st.columns.items()), st.unsupported
        ([('b', 'PROJECT|FILTER')], [])
        """
        _check_args(node, frozenset({"expressions", "alias", "offset"}), "UNNEST")
        self.typed_function("unnest")
        flows = [self.expr(e, lateral) for e in node.expressions]
        for fl in flows:  # computed for every row, deciding how many rows come out (``function_source``)
            self.consume(fl, F)
        names: list[str | None] = ["unnest"] * len(flows)
        if len(flows) == 1 and alias is not None and alias.this is not None and not alias.columns:
            names = [ident(alias.this)]
        offset = node.args.get("offset")
        if offset:  # WITH ORDINALITY; sqlglot keeps the ordinality column's alias here
            names.append(ident(offset) if isinstance(offset, exp.Identifier) else "ordinality")
            flows.append({})
        return _derived(Result(names, flows, union(*flows)), alias, "unnest", default_name="unnest")

    def join_group(self, node: exp.Expr, lateral: Env) -> Item:
        """A join group read as one FROM item: ``node`` and the joins sqlglot hangs on it."""
        grp = Level()
        self.add_from(grp, node, [], lateral)
        if len(grp.items) != 1:
            raise Unsupported("unexpected parenthesized FROM list")
        return grp.items[0]

    def table_source(self, node: exp.Table, env: Env) -> Source:
        sample = node.args.get("sample")
        if sample is not None:  # TABLESAMPLE method (args) [REPEATABLE (seed)]: constants only
            for e in sample.iter_expressions():
                self.consume(self.expr(e, env), F)
        name = ident(node.this)
        sch = ident(node.args.get("db")) if node.args.get("db") else None
        cat = ident(node.args.get("catalog")) if node.args.get("catalog") else None
        alias = node.args.get("alias")
        if sch is None and name in env.ctes:
            env.ctes[name].refs += 1
            r = self.cte_result(env.ctes[name])
            return _derived(r, alias, f'WITH query "{name}"', default_name=name)
        rel = resolve_relation(self.ctx.schema, self.path, name, sch, cat)
        src = self.relation_source(rel)
        src.ref = self.reference(node, rel)
        if src.ref is not None and sample is not None:
            src.ref.problems.append(f"{rel} is read with TABLESAMPLE")
        return _aliased(src, alias)

    # --- positions (for the rewrite) -----------------------------------------------------------------

    def reference(self, node: exp.Table, rel: RelationInfo, target: bool = False) -> RelationRef | None:
        """Record where relation ``rel`` is referenced by ``node`` (None when positions are not tracked)."""
        text = self.text
        if text is None:
            return None
        parts = [node.args.get(k) for k in ("catalog", "db")] + [node.this]
        idx = []
        for part in parts:
            if part is None:
                continue
            start = part.meta.get("start") if isinstance(part, exp.Identifier) else None
            i = text.index_at(start) if start is not None else None
            if i is None:  # not expected: every identifier sqlglot reads carries its position
                ref = RelationRef(Table(rel.schema, rel.name), rel.kind, None, target=target,
                                  problems=["its place in the text is unknown"])
                self.refs.append(ref)
                return ref
            idx.append(i)
        first, last = min(idx), max(idx) + 1
        only = bool(node.args.get("only"))
        command = False
        if only and first > 0 and text.tokens[first - 1].is_word("only"):
            first -= 1
        elif not target and first > 0 and text.tokens[first - 1].is_word("table"):
            first -= 1  # the TABLE name command
            command = True
        if not target and last < len(text.tokens) and text.tokens[last].kind is T.OP and text.tokens[last].value == "*":
            # "name *": the old spelling of "name and its descendants", the default (7.2.1.1); sqlglot
            # drops the star, so the reference takes it, else a substitution would leave it behind.
            last += 1
        alias = node.args.get("alias")
        alias_name = ident(alias.this) if alias is not None and alias.this is not None else None
        alias_cols = tuple(ident(c.this if isinstance(c, exp.ColumnDef) else c) for c in alias.columns) \
            if alias is not None else ()
        span = text.span(first, last)
        # The recursive part of WITH RECURSIVE is analysed until its flows settle (twice at
        # least): its references are one each, else the rewrite edits the same place twice
        # (a hunt sized the second edit to delete a quote and run the string's content).
        # Found by a lookup, not a scan: a scan per reference made 8000 references in one
        # statement take 14 s of the event loop (hunt 21).
        key = (id(self.refs), span, target)
        seen = self.ref_index.get(key)
        if seen is not None and seen[0] is self.refs:
            return seen[1]
        if len(self.ref_index) >= MAX_REFERENCES:  # the analysis runs on the event loop every session shares
            raise Unsupported(f"the statement references more than {MAX_REFERENCES} relations")
        ref = RelationRef(Table(rel.schema, rel.name), rel.kind, span, alias_name, alias_cols,
                          target=target, only=only, table_command=command)
        parts_ = self.view_parts.get((rel.schema, rel.name))
        if parts_ is not None:
            ref.inner, ref.aggregates, ref.functions, ref.definition = parts_
        self.refs.append(ref)
        self.ref_index[key] = (self.refs, ref)
        return ref

    def local_source(self, col: exp.Expr, env: Env) -> Source | None:
        """The FROM item of the innermost query level a plain column reference names, if it is exactly one."""
        if not isinstance(col, exp.Column) or isinstance(col.this, exp.Star) or not env.levels:
            return None
        parts = _column_parts(col, self.ctx.schema)
        level = env.levels[0]
        if any(it.unknown for it in level.items):
            return None
        if len(parts) == 2:
            hits = [src for it in level.items for src in it.sources if src.name == parts[0]]
            if len(hits) == 1 and hits[0].known and hits[0].columns.count(parts[1]) == 1:
                return hits[0]
            return None
        if len(parts) != 1:
            return None
        items = [it for it in level.items for nm, _ in it.entries if nm == parts[0]]
        if len(items) != 1:
            return None
        srcs = [src for src in items[0].sources if src.known and parts[0] in src.columns]
        return srcs[0] if len(srcs) == 1 and srcs[0].columns.count(parts[0]) == 1 else None

    def note_pushable(self, cond: exp.Expr, env: Env) -> None:
        """Record on each reference the ``column = constant`` conjuncts of its block's WHERE (``RelationRef.pushable``).

        Only top-level conjuncts, a plain column of exactly one FROM item of this block on
        one side and a literal or ``$n`` on the other, each checked to be one token of the
        text; statements only (not view definitions).
        """
        text = self.text
        if text is None or self.view_depth:
            return
        for conj in _conjuncts(cond):
            if not isinstance(conj, exp.EQ):
                continue
            for col, const in ((conj.this, conj.expression), (conj.expression, conj.this)):
                found = _constant_token(const, text)
                if found is None or not isinstance(col, exp.Column):
                    continue
                src = self.local_source(col, env)
                if src is None or src.ref is None or src.relation is None:
                    continue
                i = src.columns.index(_column_parts(col, self.ctx.schema)[-1])
                tok, kind = found
                src.ref.pushable.append((i, tok.start + text.offset, tok.end + text.offset, kind))
                break

    def block_of(self, ref: RelationRef) -> AggregateBlock | None:
        """The query block (SELECT) whose FROM list holds ``ref``, with where its HAVING is."""
        text = self.text
        if text is None:
            return None
        if ref.span is None:
            return None
        local = ref.span.first - text.first
        sel = pos.block_start(text, local)
        if sel is None:
            return None
        block = text.blocks.get(sel)
        if block is None:
            having, at, token = pos.having_position(text, sel)
            block = text.blocks[sel] = AggregateBlock(sel + text.first, having, None if having else at,
                                                      None if having else token + text.first)
        return block

    def key_groups(self, node: exp.Select, group: exp.Group, env: Env) -> None:
        """Record the stored tables of this block whose whole primary key its GROUP BY holds, with the
        columns of them the block uses outside aggregates (``KeyGroup``; statements only, not view
        definitions).

        PostgreSQL lets such a block use the table's other columns ungrouped (7.2.3: "unless the
        grouped column is the primary key ... of the table containing the ungrouped column"), but
        not with grouping sets (SELECT, GROUP BY clause: functional dependency is recognised only
        for a plain GROUP BY list), so ROLLUP, CUBE, GROUPING SETS and parenthesized lists are left
        alone. An item is a plain column of the table, by name (an input column first, then an
        output column, as PostgreSQL resolves a GROUP BY name) or by position in the select list.
        """
        text = self.text
        if text is None or self.view_depth:
            return
        if any(v not in _EMPTY for k, v in group.args.items() if k != "expressions"):
            return  # GROUPING SETS, CUBE, ROLLUP, GROUP BY DISTINCT (or ALL), WITH TOTALS
        items = [g.unnest() if isinstance(g, exp.Paren) else g for g in group.expressions]
        if any(isinstance(g, (exp.GroupingSets, exp.Cube, exp.Rollup, exp.Tuple)) for g in items):
            return
        grouped: dict[int, tuple[Source, set[int]]] = {}
        for g in items:
            col = _grouped_column(g, node.expressions, lambda c: self.local_source(c, env) is not None)
            src = self.local_source(col, env) if col is not None else None
            if src is None or src.ref is None or not src.base or src.relation is None:
                continue
            if src.ref.kind not in (TABLE, PARTITIONED_TABLE) or not src.relation.primary_key:
                continue
            name = _column_parts(col, self.ctx.schema)[-1]
            if name in src.columns:
                grouped.setdefault(id(src), (src, set()))[1].add(src.columns.index(name))
        keyed = []
        for src, cols in grouped.values():
            rel = src.relation
            if len(src.columns) == len(rel.columns) and all(
                    k in rel.columns and rel.columns.index(k) in cols for k in rel.primary_key):
                keyed.append((src, cols))
        if not keyed:
            return
        used: dict[int, set[int]] = {id(src): set() for src, _ in keyed}
        whole: set[int] = set()
        for e in _level_expressions(node):
            for c in _outside_aggregates(e):
                if isinstance(c, exp.Star) or isinstance(c.this, exp.Star):
                    table = ident(c.args["table"].this) if isinstance(c, exp.Column) and c.args.get("table") else None
                    for src, _ in keyed:
                        if table is None or table == src.name:
                            used[id(src)].update(range(len(src.columns)))
                    continue
                src = self.local_source(c, env)
                if src is not None and id(src) in used:
                    used[id(src)].add(src.columns.index(_column_parts(c, self.ctx.schema)[-1]))
                elif not c.args.get("table") and src is None:
                    whole.update(id(s) for s, _ in keyed if s.name == ident(c.this))
        for src, cols in keyed:
            sel = pos.block_start(text, src.ref.span.first - text.first) if src.ref.span is not None else None
            end = pos.group_end(text, sel) if sel is not None else None
            if end is None or any(kg.ref is src.ref for kg in self.acc.key_groups):
                continue
            self.acc.key_groups.append(KeyGroup(src.ref, end[0], end[1], frozenset(cols),
                                                tuple(sorted(used[id(src)])), id(src) in whole))

    def record_aggregate(self, node: exp.Expr, args: list[exp.Expr], env: Env, flow: Flow,
                         other: Flow | None = None) -> None:
        """Record a statistical aggregate over base columns, and whether it is of the simple form
        (one plain column of a FROM item of the same block; see ``AggregateCall``)."""
        columns = frozenset(k for k in union(flow, other or {}) if isinstance(k, Column))
        if not columns:
            return
        call = AggregateCall(columns)
        arg = args[0] if len(args) == 1 else None
        if isinstance(arg, exp.Distinct) and len(arg.expressions) == 1:
            arg = arg.expressions[0]
        if node is self._filtered:
            call.why = "it has a FILTER clause"
        elif other and any(isinstance(k, Column) for k in other):
            call.why = "its other arguments read columns"
        elif arg is None:
            call.why = "it has more than one argument"
        elif not isinstance(arg, exp.Column) or isinstance(arg.this, exp.Star):
            call.why = "its argument is an expression, not a plain column"
        else:
            src = self.local_source(arg, env)
            if src is None:
                call.why = "its argument is not a column of a FROM item of the same query"
            elif src.ref is None or src.ref.kind in (VIEW, MATERIALIZED_VIEW) or not src.base:
                call.why = "its argument is read through a view, subquery, WITH query or function"
            else:
                call.block = self.block_of(src.ref)
                if call.block is None:
                    call.why = "cannot find the query block that reads the table"
                else:
                    call.ref = src.ref
                    level = env.levels[0]
                    call.sole = len(level.items) == 1 and len(level.items[0].sources) == 1
        self.aggs.append(call)

    def relation_source(self, rel: RelationInfo) -> Source:
        """A FROM item for a relation: base columns, or a view resolved through its definition.

        A materialized view stores its rows: its own columns are reported as well as the
        base columns its definition read.
        """
        if self.ctx.schema.on_read:
            implicit_code(self.ctx.schema, self.acc, rel.schema, rel.name, write=False)
        if rel.kind in (VIEW, MATERIALIZED_VIEW) and rel.definition is not None and rel.schema not in BUILTIN_SCHEMAS:
            r = self.view_result(rel)
            if len(r.flows) != len(rel.columns):
                raise Unsupported(f"the definition of view {rel} has {len(r.flows)} columns, not "
                                  f"{len(rel.columns)}")
            if rel.kind == MATERIALIZED_VIEW:
                flows = [union(fl, {Column(rel.schema, rel.name, c): P}) for c, fl in zip(rel.columns, r.flows)]
                rows = union(r.rows, {Table(rel.schema, rel.name): P})
                return Source(rel.name, list(rel.columns), flows, rows, relation=rel, base=True,
                              label=f"materialized view {rel}")
            return Source(rel.name, list(rel.columns), r.flows, r.rows, relation=rel, label=f"view {rel}")
        if rel.kind == VIEW and rel.schema not in BUILTIN_SCHEMAS:
            raise Unsupported(f"the definition of view {rel} is unknown")
        cols = list(rel.columns)
        flows = [{Column(rel.schema, rel.name, c): P} for c in cols]
        return Source(rel.name, cols, flows, {Table(rel.schema, rel.name): P}, relation=rel, base=True,
                      label=f"relation {rel}")

    def plain_view_columns(self, rel: RelationInfo, depth: int = 0) -> set[int]:
        """Positions of the columns of an automatically updatable view that are plain base columns.

        Raises ``Unsupported`` when the view is not automatically updatable (one FROM
        item that is a table or such a view; no WITH, DISTINCT, GROUP BY, HAVING, LIMIT,
        OFFSET, set operation, window or aggregate).
        """
        tree = self.ctx.schema.parsed_definition(rel, _safe_parse(self.ctx.parse))
        simple = isinstance(tree, exp.Select) and not tree.args.get("joins") and tree.args.get("from_") is not None
        if simple:
            for k, v in tree.args.items():
                if k not in ("expressions", "from_", "where") and v not in _EMPTY:
                    simple = False
            if any(isinstance(n, (exp.AggFunc, exp.Window)) for e in tree.expressions for n in e.walk()):
                simple = False
        src = tree.args["from_"].this if simple else None
        if not isinstance(src, exp.Table) or isinstance(src.this, (exp.Func, exp.Dot)) or depth > 16:
            raise Unsupported(f"writing through view {rel}, which is not a simple view of one table")
        name = ident(src.this)
        sch = ident(src.args.get("db")) if src.args.get("db") else None
        inner = resolve_relation(self.ctx.schema, ["pg_catalog"], name, sch)
        if inner.kind in (VIEW, MATERIALIZED_VIEW):
            if inner.kind == MATERIALIZED_VIEW:
                raise Unsupported(f"writing through view {rel}, which is not a simple view of one table")
            ok = self.plain_view_columns(inner, depth + 1)
            alias = src.args.get("alias")
            inner_names = [ident(c) for c in alias.columns] if alias is not None else []
            inner_names += list(inner.columns)[len(inner_names):]
            plain_names = {inner_names[i] for i in ok if i < len(inner_names)}
        else:
            plain_names = None
        out = set()
        for i, e in enumerate(tree.expressions):
            e = e.this if isinstance(e, exp.Alias) else e
            if isinstance(e, exp.Column) and not isinstance(e.this, exp.Star):
                if plain_names is None or ident(e.this) in plain_names:
                    out.add(i)
            elif isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
                raise Unsupported(f"writing through view {rel}, whose definition is not expanded")
        return out

    def view_result(self, rel: RelationInfo) -> Result:
        """The outputs of a view's definition, analysed once per statement (its filters are recorded then)."""
        key = (rel.schema, rel.name)
        cached = self.views.get(key)
        if cached is not None:
            return cached
        if key in self.views_busy:
            raise Unsupported(f"view {rel} refers to itself")
        self.views_busy.add(key)
        try:
            r = self._view_result(rel)
        finally:
            self.views_busy.discard(key)
        self.views[key] = r
        return r

    def _view_result(self, rel: RelationInfo) -> Result:
        if self.view_depth >= self.ctx.max_view_depth:
            raise Unsupported(f"views nested too deeply at {rel}")
        tree = self.ctx.schema.parsed_definition(rel, _safe_parse(self.ctx.parse))
        if isinstance(tree, str):
            raise Unsupported(f"cannot analyse the definition of view {rel}: {tree}")
        saved_path, saved_frames = self.path, self.frames
        self.path, self.frames = ["pg_catalog"], [_Frame()]
        self.view_depth += 1
        # The definition's references and aggregates are recorded with positions in its
        # own text (parse_view keeps the lexed statement with the tree).
        st = tree.meta.get("statement") if isinstance(tree, exp.Expr) else None
        saved = (self.text, self.refs, self.aggs, self.acc.functions)
        self.text = pos.Text(st.tokens) if isinstance(st, Statement) else None
        self.refs, self.aggs, self.acc.functions = [], [], set()
        try:
            return self.query(tree, Env())
        finally:
            functions = self.acc.functions
            self.view_parts[(rel.schema, rel.name)] = (self.refs, self.aggs, frozenset(functions),
                                                       st.text if isinstance(st, Statement) else None)
            self.text, self.refs, self.aggs, self.acc.functions = saved
            self.acc.functions |= functions
            self.path, self.frames = saved_path, saved_frames
            self.view_depth -= 1

    def function_source(self, calls: list[exp.Expr], alias: exp.TableAlias | None, ordinality: bool,
                        env: Env) -> Source:
        """A function (or ROWS FROM list) in FROM: its outputs all carry the flows of its arguments.

        The arguments are also consumed as a filter: PostgreSQL computes them for every row of the
        FROM items before (lateral to it), whatever the query uses, and they decide how many rows the
        function returns (``generate_series(1, CASE WHEN amount > 9000 THEN 1 ELSE 0 END)`` drops the
        others) and whether it raises an error (``unnest(ARRAY[1 / (amount - 9001)])``). Carried only
        into the rows, an aggregated query turned them into AGGREGATE (hunt 26). Each of ``calls`` is a
        call, or the table node sqlglot makes of a call in FROM (``call_schema``)."""
        generic: Flow = {}
        names: list[str | None] = []
        known = True
        fname = ""
        for entry in calls:
            call, sch = self.call_schema(entry) if isinstance(entry, exp.Table) else (entry, None)
            args = self.qualified_call(call, sch, env)
            self.consume(args, F)
            merge_into(generic, args)
            qual, name, cols = self.function_columns(call, sch)
            fname = fname or name
            if cols is None:
                if len(calls) == 1 and alias is not None and alias.columns:
                    cols = [None] * len(alias.columns)
                else:
                    known = False
                    cols = []
            names.extend(cols)
        if ordinality:
            if not known:
                raise Unsupported("WITH ORDINALITY over a function whose output columns are unknown")
            names.append("ordinality")
        aname = ident(alias.this) if alias is not None and alias.this is not None else None
        acols = [ident(c.this if isinstance(c, exp.ColumnDef) else c) for c in alias.columns] if alias else []
        if known and len(calls) == 1 and len(names) == 1 + int(ordinality) and aname and not acols \
                and names[0] == fname and fname not in fn.SRF_COLUMNS:
            names[0] = aname
        if acols:
            if known and len(acols) > len(names):
                raise Unsupported(f"function {fname} has {len(names)} columns available but {len(acols)} "
                                  f"columns specified")
            if not known:
                names, known = list(acols), True
            else:
                names = acols + names[len(acols):]
        label = f"function {fname}()"
        return Source(aname or fname, names, [generic] * len(names), dict(generic), aliased=aname is not None,
                      known=known, generic=generic, label=label)

    def call_schema(self, node: exp.Table) -> tuple[exp.Expr, str | None]:
        """The call of a function in FROM, and the schema it is qualified with (None if it is not).

        sqlglot makes ``FROM s.f(x)`` (and each ``ROWS FROM`` entry) a table node whose ``this`` is the
        call and whose ``db`` is ``s``. Read without it, ``FROM shadow.lower(1)`` was taken for
        pg_catalog.lower, while PostgreSQL ran shadow.lower, which returned card numbers (hunt 27).

        >>> import sqlglot; from proxy.analysis.model import StatementAccess
        >>> t = sqlglot.parse_one("SELECT * FROM shadow.lower(1)", read="postgres").args["from_"].this
        >>> call, sch = Analyzer(Context(Schema(), []), StatementAccess(Kind.SELECT)).call_schema(t)
        >>> type(call).__name__, sch
        ('Lower', 'shadow')
        """
        cat = node.args.get("catalog")
        if cat is not None and ident(cat) != self.ctx.schema.database:
            raise Unsupported(f"cross-database reference {node.sql('postgres')}")
        db = node.args.get("db")
        return node.this, ident(db) if db is not None else None

    def qualified_call(self, call: exp.Expr, sch: str | None, env: Env) -> Flow:
        """The flow of a call in FROM that ``sch`` qualifies (as ``dot`` reads ``sch.f(x)`` elsewhere)."""
        if sch is None or sch == "pg_catalog" and not isinstance(call, exp.Anonymous):
            return self.expr(call, env)  # (typed nodes are built-ins of pg_catalog)
        if isinstance(call, exp.Anonymous):
            return self.anonymous(call, env, sch)
        # (sqlglot types some calls by name, shadow.lower(x) too: not a built-in, and not read as one)
        raise Unsupported(f"the qualified call {sch}.{self.typed_name(call) or call.key}() in FROM is not supported "
                          f"by the analysis")

    def function_columns(self, call: exp.Expr, sch: str | None = None) -> tuple[str, str, list[str | None] | None]:
        if isinstance(call, exp.Dot):
            sch = ident(call.this)
            call = call.expression
        if isinstance(call, exp.Anonymous):
            name = _func_name(call)
        elif isinstance(call, exp.ExplodingGenerateSeries):
            name = "generate_series"
        elif isinstance(call, exp.Func):
            name = self.typed_name(call) or ""
        else:
            raise Unsupported("unexpected function call in FROM")
        res = fn.classify_function(name, sch, self.ctx.schema, self.path) if name else None
        if res is not None and res.schema:
            info = self.ctx.schema.function(res.schema, name)
            if info is not None and info.result_columns is not None:
                return res.qualified, name, list(info.result_columns)
        if name in fn.SRF_COLUMNS and (res is None or res.cls in (fn.FunctionClass.SAFE_BUILTIN,)):
            return name, name, list(fn.SRF_COLUMNS[name])
        if res is not None and res.cls is fn.FunctionClass.SAFE_BUILTIN:
            return res.qualified, name, [name]
        return name, name, None

    # --- DML ------------------------------------------------------------------------------------------------------

    def dml(self, node: exp.Expr, env: Env, top: bool = False) -> Result:
        if isinstance(node, exp.Insert):
            return self.insert(node, env, top)
        if isinstance(node, exp.Update):
            return self.update(node, env, top)
        if isinstance(node, exp.Delete):
            return self.delete(node, env, top)
        return self.merge(node, env, top)

    def target(self, node: exp.Expr, verb: str) -> tuple[Source, dict[str, list[Column]], list[Table]]:
        """The relation a DML statement writes: its FROM item, base columns by name, and base tables."""
        if not isinstance(node, exp.Table) or isinstance(node.this, (exp.Func, exp.Dot)):
            raise Unsupported(f"unexpected {verb} target")
        _check_args(node, frozenset({"this", "db", "catalog", "alias", "only"}), f"{verb} target")
        name = ident(node.this)
        sch = ident(node.args.get("db")) if node.args.get("db") else None
        cat = ident(node.args.get("catalog")) if node.args.get("catalog") else None
        rel = resolve_relation(self.ctx.schema, self.path, name, sch, cat)
        if rel.kind == MATERIALIZED_VIEW:
            raise Unsupported(f"cannot change materialized view {rel}")
        src = self.relation_source(rel)
        src.ref = self.reference(node, rel, target=True)
        if src.ref is not None:
            src.ref.statement = verb.lower()
        if src.base:
            mapping = {c: [Column(rel.schema, rel.name, c)] for c in rel.columns}
            tables = [Table(rel.schema, rel.name)]
        else:
            mapping, tables = _simple_view(rel, src, self.plain_view_columns(rel))
        schema = self.ctx.schema
        if schema.on_write or schema.rules:
            implicit_code(schema, self.acc, rel.schema, rel.name, write=True)
            for t in tables:
                implicit_code(schema, self.acc, t.schema, t.name, write=True)
        alias = node.args.get("alias")
        return _aliased(src, alias), mapping, tables

    def returning(self, node: exp.Expr, env: Env, top: bool) -> Result:
        """RETURNING: consumed as PROJECT at the top level; in a WITH query, by whoever reads it."""
        ret = node.args.get("returning")
        if ret is None:
            return Result([], [], {})
        if ret.args.get("into"):
            raise Unsupported("RETURNING INTO is not supported by the analysis")
        names, flows = self.select_list(ret.expressions, env)
        if top:
            for fl in flows:
                self.consume(fl, P)
        return Result(names, flows, {})

    def delete_rows(self, tables: list[Table]) -> None:
        """Deleting rows uses every column of the base table (DELETE)."""
        for t in tables:
            self.acc.tables[t] = self.acc.tables.get(t, Use.NONE) | Use.DELETE
            rel = self.ctx.schema.relation(t.schema, t.name)
            for c in rel.columns if rel is not None else ():
                self.acc.use(Column(t.schema, t.name, c), Use.DELETE)

    def write(self, mapping: dict[str, list[Column]], name: str, rel: str, use: Use = Use.WRITE,
              value: Flow | None = None) -> None:
        """Record the write of column ``name`` of ``rel`` (through a view: its base column), and what
        ``value`` it is given."""
        cols = mapping.get(name)
        if cols is None:
            raise Unsupported(f'column "{name}" of relation {rel} does not exist')
        if not cols:
            raise Unsupported(f'column "{name}" of view {rel} is not a plain column of its base table')
        for c in cols:
            self.acc.use(c, use)
            if value:
                self.copy(c, value)

    def copy(self, target: Column | str, value: Flow) -> None:
        """Record that the values of the columns in ``value`` are stored into ``target``.

        Only values count: a column that reaches ``value`` through a count alone
        (``count(email)``) is not copied; one through any other expression is
        (``lower(email)``, ``min(email)``, ``CASE WHEN card LIKE '4%' ...``), and so is one
        through another statistic (``sum(amount)`` of one invoice is its amount, hunt 25).
        """
        sources = [k for k, u in value.items() if isinstance(k, Column)
                   and (u & (P | W) or (u & A and k in self.valued))]
        if sources:
            self.acc.copies.setdefault(target, set()).update(sources)

    def insert(self, node: exp.Insert, env: Env, top: bool = True) -> Result:
        _check_args(node, frozenset({"with_", "this", "expression", "conflict", "returning", "default"}), "INSERT")
        env = self.with_(node, env)
        target = node.this
        cols: list[str] | None = None
        if isinstance(target, exp.Schema):
            cols = [ident(c) for c in target.expressions]
            target = target.this
        src, mapping, tables = self.target(target, "INSERT")
        if src.ref is not None:
            src.ref.top_level = top and not self.view_depth
        relname = str(src.relation)
        inserted: dict[str, Flow] = {}
        written: list[str] = cols or []  # DEFAULT VALUES writes defaults only
        if not node.args.get("default"):
            body = node.expression
            if body is None:
                raise Unsupported("INSERT without VALUES or a query")
            r = self.query(body, Env((), env.ctes))
            for fl in r.flows:
                self.consume(fl, P)
            self.consume(r.rows, P)
            all_cols = [c for c in src.columns if c is not None]
            written = cols if cols is not None else all_cols[: len(r.flows)]
            if len(r.flows) > len(written):
                raise Unsupported("INSERT has more expressions than target columns")
            inserted = dict(zip(written, r.flows))
        for c in written:
            self.write(mapping, c, relname, value=inserted.get(c))
        for t in tables:
            self.acc.tables[t] = self.acc.tables.get(t, Use.NONE) | Use.WRITE
        conflict = node.args.get("conflict")
        if conflict is not None:
            if src.ref is not None:
                action = conflict.args.get("action")
                src.ref.conflict_update = isinstance(action, exp.Expr) and action.name.upper() == "DO UPDATE"
            self.on_conflict(conflict, src, mapping, inserted, env, relname)
        level = Level([Item.of(src)])
        res = self.returning(node, env.inner(level), top)
        return Result(res.names, res.flows, dict(src.rows) if res.flows else {})

    def on_conflict(self, conflict: exp.OnConflict, src: Source, mapping: dict[str, list[Column]],
                    inserted: dict[str, Flow], env: Env, relname: str) -> None:
        _check_args(conflict, frozenset({"expressions", "action", "conflict_keys", "index_predicate", "constraint",
                                         "where"}), "ON CONFLICT")
        action = conflict.args.get("action")
        action_name = action.name.upper() if isinstance(action, exp.Expr) else ""
        if action_name not in ("DO NOTHING", "DO UPDATE"):
            raise Unsupported(f"ON CONFLICT {action_name or '?'} is not supported by the analysis")
        excluded = Source("excluded", list(src.columns), [inserted.get(c or "", {}) for c in src.columns], {},
                          aliased=True, label="EXCLUDED")
        tenv = env.inner(Level([Item.of(src)]))
        for k in conflict.args.get("conflict_keys") or []:
            self.consume(self.expr(k.this if isinstance(k, exp.Ordered) else k, tenv), F)
        pred = conflict.args.get("index_predicate")
        if pred is not None:
            self.consume(self.expr(pred.this, tenv), F)
        uenv = env.inner(Level([Item.of(src), Item([], [excluded])]))
        self.set_items(conflict.args.get("expressions") or [], mapping, uenv, relname)
        where = conflict.args.get("where")
        if where is not None:
            self.consume(self.expr(where.this, uenv), F)

    def set_items(self, items: list[exp.Expr], mapping: dict[str, list[Column]], env: Env, relname: str) -> None:
        for eq in items:
            if not isinstance(eq, exp.EQ):
                raise Unsupported("unexpected SET item")
            lhs, rhs = eq.this, eq.expression
            targets = lhs.expressions if isinstance(lhs, exp.Tuple) else [lhs]
            if isinstance(lhs, exp.Tuple) and isinstance(rhs, exp.Tuple):
                values = list(rhs.expressions)
            else:
                values = [rhs]
            stored: list[Flow] = []  # what each target gets, in order
            for v in values:
                if isinstance(v, exp.Column) and not v.args.get("table") and isinstance(v.this, exp.Identifier) \
                        and not v.this.quoted and v.this.this.lower() == "default":
                    stored.append({})
                    continue
                if isinstance(v, exp.Subquery):
                    r = self.query(v.this, env)
                    self.consume_result(r, P)
                    stored.extend(r.flows)  # (a, b) = (SELECT x, y ...): one value per output column
                else:
                    fl = self.expr(v, env)
                    self.consume(fl, P)
                    stored.append(fl)
            if len(stored) != len(targets):  # (a, b) = ROW(...) and the like: each may get any of it
                stored = [union(*stored)] * len(targets)
            for t, fl in zip(targets, stored):
                name = _set_target(t)
                if isinstance(t, exp.Bracket):
                    # SET a[i] = v stores the old value with one element replaced: the old value is read
                    # (and an error the assignment raises, a slice out of range, tells of it).
                    old = {c: P for c in mapping.get(name) or ()}
                    self.consume(old, P)
                    fl = union(fl, old)
                self.write(mapping, name, relname, value=union(fl, self.subscripts(t, env)))

    def subscripts(self, t: exp.Expr, env: Env) -> Flow:
        """The flow of the subscripts of a SET or INSERT target column (``SET a[i] = ..``), consumed as values:
        they are code, not the column's name (a jsonb subscript is even stored, as a key).

        >>> from proxy.analysis.access import analyze; from proxy.analysis.schema import Schema
        >>> s = Schema.from_dict({"schemas": {"app": {"tables": {"t": ["doc"], "c": ["card"]}}}})
        >>> st = analyze("UPDATE t SET doc[(SELECT card FROM c)] = '1'", s, ["app"]).statements[0]
        >>> sorted((str(c), u.name) for c, u in st.columns.items())
        [('app.c.card', 'PROJECT'), ('app.t.doc', 'PROJECT|WRITE')]
        """
        out: Flow = {}
        while isinstance(t, exp.Bracket):
            for e in t.expressions:
                merge_into(out, self.expr(e, env))
            t = t.this
        self.consume(out, P)
        return out

    def dml_position(self, src: Source, verb: str, top: bool) -> None:
        """For the target of a top-level UPDATE/DELETE: where its WHERE condition is (for the rewrite)."""
        ref = src.ref
        if ref is None or ref.span is None or not top or self.text is None or self.view_depth:
            return
        ref.top_level = True
        ref.where, ref.where_at, token, problem = pos.dml_where(self.text, verb)
        ref.where_token = token + self.text.first
        if problem:
            ref.problems.append(problem)

    def update(self, node: exp.Update, env: Env, top: bool = True) -> Result:
        _check_args(node, frozenset({"with_", "this", "expressions", "from_", "where", "returning"}), "UPDATE")
        env = self.with_(node, env)
        src, mapping, tables = self.target(node.this, "UPDATE")
        self.dml_position(src, "update", top)
        level = Level()
        from_ = node.args.get("from_")
        if from_ is not None:
            self.add_from(level, from_.this, [], env)
        self.row_copies(level)
        others = union(*(it.rows for it in level.items))
        level.add(Item.of(src))
        inner = env.inner(level)
        self.set_items(node.expressions, mapping, inner, str(src.relation))
        where = node.args.get("where")
        if where is not None:
            self.consume(self.expr(where.this, inner), F)
        self.consume(others, F)
        for t in tables:
            self.acc.tables[t] = self.acc.tables.get(t, Use.NONE) | Use.WRITE
        res = self.returning(node, inner, top)
        return Result(res.names, res.flows, dict(src.rows) if res.flows else {})

    def delete(self, node: exp.Delete, env: Env, top: bool = True) -> Result:
        _check_args(node, frozenset({"with_", "this", "using", "where", "returning"}), "DELETE")
        env = self.with_(node, env)
        src, mapping, tables = self.target(node.this, "DELETE")
        self.dml_position(src, "delete", top)
        level = Level()
        for u in node.args.get("using") or []:
            self.add_from(level, u, [], env)
        self.row_copies(level)
        others = union(*(it.rows for it in level.items))
        level.add(Item.of(src))
        inner = env.inner(level)
        self.delete_rows(tables)
        where = node.args.get("where")
        if where is not None:
            self.consume(self.expr(where.this, inner), F)
        self.consume(others, F)
        res = self.returning(node, inner, top)
        return Result(res.names, res.flows, dict(src.rows) if res.flows else {})

    def merge(self, node: exp.Merge, env: Env, top: bool = True) -> Result:
        _check_args(node, frozenset({"this", "using", "on", "whens", "with_", "returning"}), "MERGE")
        env = self.with_(node, env)
        src, mapping, tables = self.target(node.this, "MERGE")
        if src.ref is not None:
            src.ref.top_level = top and not self.view_depth
        relname = str(src.relation)
        level = Level()
        self.add_from(level, node.args["using"], [], env)
        self.row_copies(level)
        others = union(*(it.rows for it in level.items))
        level.add(Item.of(src))
        inner = env.inner(level)
        on = node.args.get("on")
        if on is None:
            raise Unsupported("MERGE without ON")
        self.consume(self.expr(on, inner), F)
        self.consume(others, F)
        use = Use.NONE
        for when in node.args["whens"].expressions:
            _check_args(when, frozenset({"matched", "source", "condition", "then"}), "MERGE WHEN")
            cond = when.args.get("condition")
            if cond is not None:
                self.consume(self.expr(cond, inner), F)
            then = when.args.get("then")
            if isinstance(then, exp.Update):
                _check_args(then, frozenset({"expressions"}), "MERGE UPDATE")
                self.set_items(then.expressions, mapping, inner, relname)
                use |= Use.WRITE
            elif isinstance(then, exp.Insert):
                _check_args(then, frozenset({"this", "expression"}), "MERGE INSERT")
                cols_node, vals = then.this, then.expression
                subscripted: dict[str, Flow] = {}
                if cols_node is None:
                    cols = [c for c in src.columns if c is not None]
                else:
                    targets = cols_node.expressions if isinstance(cols_node, exp.Tuple) else [cols_node]
                    cols = [_set_target(c) for c in targets]
                    for c, t in zip(cols, targets):
                        merge_into(subscripted.setdefault(c, {}), self.subscripts(t, inner))
                values = vals.expressions if isinstance(vals, exp.Tuple) else ([vals] if vals is not None else [])
                if len(values) > len(cols):
                    raise Unsupported("INSERT has more expressions than target columns")
                given: dict[str, Flow] = {}
                for c, v in zip(cols, values):
                    if isinstance(v, exp.Column) and isinstance(v.this, exp.Identifier) and not v.this.quoted \
                            and v.this.this.lower() == "default" and not v.args.get("table"):
                        continue
                    given[c] = fl = self.expr(v, inner)
                    self.consume(fl, P)
                for c in cols[: len(values)] if cols_node is None else cols:
                    self.write(mapping, c, relname, value=union(given.get(c) or {}, subscripted.get(c) or {}))
                use |= Use.WRITE
            elif isinstance(then, exp.Var) and then.name.upper() == "DELETE":
                self.delete_rows(tables)
                use |= Use.DELETE
            elif isinstance(then, exp.Var) and then.name.upper() == "DO NOTHING":
                pass
            else:
                raise Unsupported("unexpected MERGE action")
        for t in tables:
            self.acc.tables[t] = self.acc.tables.get(t, Use.NONE) | (use or Use.WRITE)
        res = self.returning(node, inner, top)
        return Result(res.names, res.flows, dict(src.rows) if res.flows else {})

    # --- expressions -----------------------------------------------------------------------------------------------

    def expr(self, node: exp.Expr, env: Env) -> Flow:
        """The flow of an expression; subqueries inside record their own filters.

        Nodes without a meaning of their own (operators, CASE, casts' targets, ...) pass
        on the union of their children's flows; they are walked without recursion so
        that long chains (``a OR b OR ...``) stay cheap.
        """
        fl = self.special(node, env)
        if fl is not None:
            return fl
        out: Flow = {}
        stack = list(node.iter_expressions())
        while stack:
            child = stack.pop()
            fl = self.special(child, env)
            if fl is None:
                stack.extend(child.iter_expressions())
            else:
                merge_into(out, fl)
        return out

    def special(self, node: exp.Expr, env: Env) -> Flow | None:
        """The flow of a node that has a meaning of its own, or None for a plain operator node.

        Which branch a node takes depends on its class alone (keep it so): a class that took
        none is remembered in ``_PLAIN`` and not tested again (most nodes of an expression are
        operators, which would otherwise go through every test below).
        """
        if node.__class__ in _PLAIN:
            return None
        if called_as(node.__class__):
            self.shadowing(node)
        if isinstance(node, exp.Column):
            return self.column(node, env)
        if isinstance(node, exp.Parameter):
            # sqlglot reads PostgreSQL's prefix operator @ (absolute value) as the @name
            # parameter of other dialects, with the operand as its child: only $n, a number
            # (parse.py makes it from the PostgreSQL lexer's parameter token), is a constant.
            if isinstance(node.this, exp.Literal) and not node.this.is_string and node.this.this.isdigit():
                return {}
            raise Unsupported("the prefix operator @ is not supported by the analysis (use abs())")
        if isinstance(node, exp.Placeholder):
            if node.this is not None or any(True for _ in node.iter_expressions()):
                raise Unsupported("a placeholder with a name or operand is not PostgreSQL syntax")
            return {}
        if isinstance(node, (exp.Literal, exp.Null, exp.Boolean, exp.DataType)):
            return {}
        if isinstance(node, (exp.Var, exp.Identifier)):
            return self.name_flow(node, env)
        if isinstance(node, exp.Star):
            raise Unsupported("* is not allowed here")
        if isinstance(node, exp.Subquery):
            if node.args.get("alias") is not None:
                raise Unsupported("unexpected aliased subquery in an expression")
            r = self.query(node, env)
            return union(*r.flows, r.rows)
        if isinstance(node, (exp.Select, exp.SetOperation)):
            r = self.query(node, env)
            return union(*r.flows, r.rows)
        if isinstance(node, exp.Exists):
            r = self.query(node.this, env)
            self.consume_result(r, F)
            return {}
        if isinstance(node, exp.In):
            _check_args(node, frozenset({"this", "expressions", "query"}), "IN")
            out = dict(self.expr(node.this, env))
            q = node.args.get("query")
            if q is not None:
                r = self.query(q, env)
                self.consume_result(r, F)
            for e in node.expressions:
                merge_into(out, self.expr(e, env))
            return out
        if isinstance(node, (exp.Any, exp.All)):
            inner = node.this
            if isinstance(inner, (exp.Subquery, exp.Select, exp.SetOperation)):
                r = self.query(inner, env)
                self.consume_result(r, F)
                return {}
            return self.expr(inner, env)
        if isinstance(node, exp.Dot):
            return self.dot(node, env)
        if isinstance(node, exp.Collate):
            return self.collate(node, env)
        if isinstance(node, exp.Window):
            return self.window(node, env)
        if isinstance(node, exp.Filter):
            saved, self._filtered = self._filtered, node.this
            try:
                out = dict(self.expr(node.this, env))
            finally:
                self._filtered = saved
            where = node.expression
            self.consume(self.expr(where.this if isinstance(where, exp.Where) else where, env), F)
            return out
        if isinstance(node, exp.WithinGroup):
            return self.within_group(node, env)
        if isinstance(node, (exp.Cast, exp.TryCast)):
            return self.expr(node.this, env)
        if isinstance(node, exp.Anonymous):
            return self.anonymous(node, env, None)
        if isinstance(node, exp.AggFunc):
            return self.aggregate(node, env, isinstance(node, _STAT_AGG_TYPES), windowed=False)
        if isinstance(node, exp.Func) and not isinstance(node, _NOT_CALLS) and not (
                isinstance(node, (exp.Binary, exp.Connector, exp.Unary))):
            return self.typed_call(node, env)
        if isinstance(node, (exp.Table, exp.From, exp.Join, exp.Lateral, exp.Insert, exp.Update, exp.Delete,
                             exp.Merge, exp.Command, exp.Alias)):
            raise Unsupported(f"unexpected {type(node).__name__} in an expression")
        if not called_as(node.__class__):
            _PLAIN.add(node.__class__)  # (a class a call may be read as is tested each time)
        return None

    def collate(self, node: exp.Collate, env: Env) -> Flow:
        """``x COLLATE name`` reads ``x``; the name is a collation's (24.2 "Collation Support"), which sqlglot
        makes a column when qualified (``COLLATE pg_catalog.default``, in every psql ``\\d`` pattern query).

        sqlglot also reads a call of a function named collate (``"collate"(x, y)``, PostgreSQL's
        4.2.6 "Function Calls": COLLATE is a reserved word, quoted it names any function) as this
        node, its second argument an unqualified column: that form reads both arguments, and so
        does a qualified name where a function named collate is on the path (``special`` has
        recorded it: ``"collate"(x, m.card_number)`` and ``x COLLATE s.c`` are the same tree).

        >>> from proxy.analysis.access import analyze
        >>> from proxy.analysis.schema import Schema
        >>> s = Schema.from_dict({"schemas": {"app": {"tables": {"t": {"columns": ["a", "b"]}}}}})
        >>> sql = 'SELECT a FROM t WHERE b > $1 COLLATE pg_catalog.default ORDER BY a COLLATE "C", a COLLATE ucs_basic'
        >>> st = analyze(sql, s, ["app"], "r").statements[0]
        >>> sorted((c.name, u.name) for c, u in st.columns.items()), st.unsupported
        ([('a', 'PROJECT|FILTER'), ('b', 'FILTER')], [])
        >>> st = analyze('SELECT "collate"(a, b) FROM t', s, ["app"], "r").statements[0]
        >>> sorted((c.name, u.name) for c, u in st.columns.items())
        [('a', 'PROJECT'), ('b', 'PROJECT')]
        """
        _check_args(node, frozenset({"this", "expression"}), "COLLATE")
        name = node.expression
        if isinstance(name, (exp.Identifier, exp.Var)):  # x COLLATE "C", x COLLATE ucs_basic
            return self.expr(node.this, env)
        if not (isinstance(name, exp.Column) and not name.args.get("db") and not name.args.get("catalog")
                and isinstance(name.this, exp.Identifier)):
            raise Unsupported("a COLLATE clause the analysis does not read")
        if name.args.get("table") is not None and not self.shadowing(node):
            return self.expr(node.this, env)  # x COLLATE schema.name
        out = dict(self.expr(node.this, env))  # "collate"(x, y): a call, reading both
        merge_into(out, self.expr(name, env))
        return out

    def name_flow(self, node: exp.Var | exp.Identifier, env: Env) -> Flow:
        """A bare name sqlglot did not make a column (EXTRACT's field, date_part's or date_trunc's first
        argument, an interval unit, ...): sqlglot sometimes turns a column into one (``date_part(col, d)``),
        so every column of that name in scope counts, whatever its case (sqlglot may change it)."""
        name = node.name
        if not name:
            return {}
        key = name.lower()
        out: Flow = {}
        for lv in env.levels:
            for it in lv.items:
                for nm, fl in it.entries:
                    if nm is not None and nm.lower() == key:
                        merge_into(out, fl)
        return out

    def column(self, node: exp.Column, env: Env) -> Flow:
        if isinstance(node.this, exp.Star):
            return self.star_source(node, env).whole()
        parts = _column_parts(node, self.ctx.schema)
        if len(parts) == 1:
            name = parts[0]
            this = node.this
            if name in SQL_VALUE_KEYWORDS and isinstance(this, exp.Identifier) and not this.quoted:
                if name not in KEYWORDS_FROM_16:
                    return {}
                # PostgreSQL 15 reads a column (or FROM item) of that name where there is one, 16 the
                # key word: the column, whichever server this is (a hunt named a card column so).
                try:
                    return lookup_unqualified(env, name)
                except UnknownColumn:
                    return {}
            return lookup_unqualified(env, name)
        return lookup_qualified(env, parts)

    def dot(self, node: exp.Dot, env: Env) -> Flow:
        this, field_ = node.this, node.expression
        if not isinstance(this, exp.Expr):  # "a...b": sqlglot leaves empty name parts as strings
            raise Unsupported(f"improper qualified name {node.sql('postgres')}")
        if isinstance(field_, exp.Func):
            if not isinstance(this, exp.Identifier):
                raise Unsupported(f"improper qualified function name {node.sql('postgres')}")
            sch = ident(this)
            if isinstance(field_, exp.Anonymous):
                return self.anonymous(field_, env, sch)
            raise Unsupported(f"unexpected qualified call {node.sql('postgres')}")
        if isinstance(field_, exp.Star):
            return whole_row(self.expr(this, env))
        if isinstance(field_, exp.Identifier):
            src = self.row_source(this, env)
            if src is not None:
                return column_of(src, ident(field_))
            return self.expr(this, env)
        raise Unsupported(f"unexpected expression {node.sql('postgres')}")

    def window(self, node: exp.Window, env: Env) -> Flow:
        _check_args(node, frozenset({"this", "partition_by", "order", "spec", "alias", "over"}), "window")
        self.window_spec(node, env)
        func = node.this
        out: Flow = {}
        if isinstance(func, exp.Filter):
            where = func.expression
            self.consume(self.expr(where.this if isinstance(where, exp.Where) else where, env), F)
            func = func.this
        if isinstance(func, exp.AggFunc):
            merge_into(out, self.aggregate(func, env, False, windowed=True))
        elif isinstance(func, exp.Anonymous):
            merge_into(out, self.anonymous(func, env, None, windowed=True))
        else:
            merge_into(out, self.expr(func, env))
        return out

    def within_group(self, node: exp.WithinGroup, env: Env) -> Flow:
        func, order = node.this, node.expression
        if isinstance(func, exp.Anonymous):
            name = _func_name(func)
            res = self.record_function(func, None)
            stat = name in fn.STATISTICAL_AGGREGATES and res.builtin_only
            args = [self.expr(a, env) for a in func.expressions]
        elif isinstance(func, exp.AggFunc):
            name = self.typed_name(func) or type(func).__name__.lower()
            res = self.typed_function(name, func)
            stat = isinstance(func, _STAT_AGG_TYPES) and res.builtin_only
            args = [self.expr(a, env) for a in func.iter_expressions()]
        else:
            raise Unsupported("WITHIN GROUP on something that is not an aggregate")
        self.frames[-1].aggregated = True
        ordered = [o.this for o in (order.expressions if isinstance(order, exp.Order) else [])]
        keys = union(*(self.expr(o, env) for o in ordered))
        if stat:
            self.record_aggregate(node, ordered, env, keys, union(*args))
        return union(aggregated(keys) if stat else keys, *args)

    def aggregate(self, node: exp.Expr, env: Env, stat: bool, windowed: bool) -> Flow:
        """An aggregate call: its input flows become AGGREGATE if it only computes a statistic."""
        name = self.typed_name(node) if not isinstance(node, exp.Anonymous) else _func_name(node)
        if name and not isinstance(node, exp.Anonymous):
            res = self.typed_function(name, node)
            if not res.builtin_only:
                stat = False  # (a user-defined aggregate of the name may return its input values)
        if not windowed:
            self.frames[-1].aggregated = True
        out: Flow = {}
        children = node.expressions if isinstance(node, exp.Anonymous) else list(node.iter_expressions())
        for child in children:
            merge_into(out, self._agg_arg(child, env))
        if stat and not windowed:
            self.record_aggregate(node, list(children), env, out)
            if name not in fn.COUNTING_AGGREGATES:
                self.valued.update(valued_columns(out))
            return aggregated(out)
        return out

    def _agg_arg(self, child: exp.Expr, env: Env) -> Flow:
        if isinstance(child, exp.Star):
            return {}
        if isinstance(child, exp.Order):  # string_agg(x, ',' ORDER BY y): y only orders
            for o in child.expressions:
                self.consume(self.expr(o.this, env), F)
            return self.expr(child.this, env) if child.this is not None else {}
        if isinstance(child, exp.Distinct):
            out: Flow = {}
            for e in child.expressions:
                merge_into(out, self._agg_arg(e, env))
            return out
        return self.expr(child, env)

    def typed_name(self, node: exp.Expr) -> str | None:
        """The PostgreSQL name of a function sqlglot parsed into a typed node (as it would print it)."""
        cls = type(node)
        if isinstance(node, (exp.Binary, exp.Connector, exp.Unary)) and not isinstance(node, exp.AggFunc):
            return None  # an operator (sqlglot models some operators as functions)
        if cls not in _TYPED_NAMES:
            try:
                sql = node.sql("postgres")
            except Exception:  # pragma: no cover - generator failure
                sql = ""
            m = _NAME_RE.match(sql)
            _TYPED_NAMES[cls] = m.group(1).lower() if m else None
        return _TYPED_NAMES[cls]

    def shadowing(self, node: exp.Expr) -> tuple[str, ...]:
        """Record the user-defined functions on the path that typed node ``node`` may be a call of, under any
        name sqlglot reads as its class (``called_as``), and return their qualified names.

        >>> import sqlglot; from proxy.analysis.model import StatementAccess
        >>> s = Schema.from_dict({"schemas": {"public": {"functions": {"ceiling": {"language": "sql"}}}}})
        >>> a = Analyzer(Context(s, ["public"]), StatementAccess(Kind.SELECT))
        >>> a.shadowing(sqlglot.parse_one("SELECT ceil(1)", read="postgres").expressions[0]), sorted(a.acc.functions)
        (('public.ceiling',), ['public.ceiling'])
        """
        schema = self.ctx.schema
        key = (node.__class__, id(schema), tuple(self.path))
        hit = _SHADOWS.get(key)
        if hit is None or hit[0] is not schema:
            found: list[str] = []
            denied: list[fn.Resolved] = []
            for name in sorted(called_as(node.__class__)):
                res = fn.classify_function(name, None, schema, self.path)
                if res.cls is fn.FunctionClass.USER_DEFINED:
                    found += [res.qualified, *res.others]
                elif res.cls is fn.FunctionClass.DATA_READING_BUILTIN and res.schema != "pg_catalog":
                    denied.append(res)
            if len(_SHADOWS) >= 4096:
                _SHADOWS.clear()
            hit = _SHADOWS[key] = (schema, tuple(found), tuple(denied))
        for res in hit[2]:
            self._deny(res)
        self.acc.functions.update(hit[1])
        return hit[1]

    def typed_function(self, name: str, node: exp.Expr | None = None) -> fn.Resolved:
        """Record the call of a function sqlglot parsed into a typed node (``sum``, ``lower``, ``unnest``):
        a built-in's name, which a user-defined function of the same name on the path may stand for, or of
        any other name sqlglot reads as ``node``'s class (``shadowing``)."""
        res = fn.classify_function(name, None, self.ctx.schema, self.path)
        if node is not None and (more := [q for q in self.shadowing(node) if q != res.qualified]):
            res = replace(res, others=tuple(dict.fromkeys((*res.others, *more))))
        if res.cls is fn.FunctionClass.USER_DEFINED:
            self.acc.functions.add(res.qualified)
        elif res.cls is fn.FunctionClass.DATA_READING_BUILTIN:
            self._deny(res)
        else:
            self.acc.functions.add(f"pg_catalog.{name}")
        self.acc.functions.update(res.others)
        return res

    def typed_call(self, node: exp.Func, env: Env) -> Flow:
        name = self.typed_name(node)
        if name:
            self.typed_function(name)
        out: Flow = {}
        for child in node.iter_expressions():
            merge_into(out, self.expr(child, env))
        return out

    def record_function(self, node: exp.Anonymous, sch: str | None) -> fn.Resolved:
        name = _func_name(node)
        res = fn.classify_function(name, sch, self.ctx.schema, self.path)
        if res.cls is fn.FunctionClass.UNKNOWN:
            raise Unsupported(f"unknown function {res.qualified}")
        if res.cls is fn.FunctionClass.DATA_READING_BUILTIN:
            self._deny(res)
        self.acc.functions.add(res.qualified)
        self.acc.functions.update(res.others)
        return res

    def _deny(self, res: fn.Resolved) -> None:
        reason = f"function {res.qualified} {res.reason}"
        if reason not in self.acc.unsupported:
            self.acc.unsupported.append(reason)

    def anonymous(self, node: exp.Anonymous, env: Env, sch: str | None, windowed: bool = False) -> Flow:
        if sch is None and isinstance(node.this, str) and node.this.lower() == "row":
            out: Flow = {}  # the ROW(...) constructor
            for child in node.expressions:
                merge_into(out, self.expr(child, env))
            return out
        res = self.record_function(node, sch)
        if res.name == "set_config" and res.schema == "pg_catalog":
            self.set_config(node)
        elif res.name == "set_config" and sch is None:
            # Read as the user-defined set_config on the path, but PostgreSQL picks among the functions of
            # the name by argument types first (10.3): pg_catalog's may be the one that runs. Its settings
            # count, but it is not followed as a SET (which of the two changes them is not known).
            self.acc.functions.add("pg_catalog.set_config")
            self.set_config(node, certain=False)
        if res.aggregate:
            stat = res.builtin_only and res.name in fn.STATISTICAL_AGGREGATES
            return self.aggregate(node, env, stat, windowed)
        out: Flow = {}
        for child in node.expressions:
            merge_into(out, self.expr(child, env))
        if res.schema == "pg_catalog" and (place := fn.EXPORTING.get(res.name)) is not None:
            self.copy(place, out)
        return out

    def set_config(self, node: exp.Anonymous, certain: bool = True) -> None:
        """Record set_config(name, value, is_local) as a setting.

        The name must be a constant; a value that is not one is recorded as None (unknown),
        an is_local that is not one as False (the lasting case). ``certain``: the call is
        pg_catalog.set_config (not possibly a user-defined one of the name).
        """
        args = node.expressions
        self.acc.reads_constants = True
        if len(args) == 3 and (named := _pg_settings_row(node, args[0])) is not None:
            table = node.find_ancestor(exp.Select).args["from_"].this
            rel = resolve_relation(self.ctx.schema, self.path, table.name, table.db or None)
            if (rel.schema, rel.name) == ("pg_catalog", "pg_settings"):  # (not a relation of that name elsewhere)
                args = [exp.Literal.string(named), *args[1:]]
        if len(args) != 3 or not (isinstance(args[0], exp.Literal) and args[0].is_string):
            raise Unsupported("set_config with a setting name that is not a constant")
        value = args[1].this if isinstance(args[1], exp.Literal) and args[1].is_string else None
        local = args[2]
        constant = True
        if isinstance(local, exp.Boolean):
            is_local = bool(local.this)
        elif isinstance(local, exp.Literal) and local.is_string and local.name.lower() in _BOOLEAN_TEXTS:
            is_local = _BOOLEAN_TEXTS[local.name.lower()]
        else:
            is_local, constant = False, False
        self.acc.settings.append((args[0].this.lower(), value, is_local))
        if certain and constant and value is not None and _sole_call(node) and len(self.acc.settings) == 1:
            self.acc.set_command = True

    # --- naming -------------------------------------------------------------------------------------------------------

    def figure_name(self, node: exp.Expr) -> str | None:
        """The name PostgreSQL gives an unaliased output column (FigureColname), or None if unsure."""
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.Column):
            return None if isinstance(node.this, exp.Star) else ident(node.this)
        if isinstance(node, (exp.Cast, exp.TryCast)):
            inner = self.figure_name(node.this)
            return inner if inner not in (None, "?column?") else None
        if isinstance(node, exp.Anonymous):
            return _func_name(node)
        if isinstance(node, exp.Dot):
            if isinstance(node.expression, exp.Identifier):
                return ident(node.expression)
            if isinstance(node.expression, exp.Anonymous):
                return _func_name(node.expression)
            return None
        if isinstance(node, (exp.Window, exp.Filter, exp.WithinGroup)):
            return self.figure_name(node.this)
        for kind, name in _FIGURE_NAMES:
            if isinstance(node, kind):
                return name
        if isinstance(node, (exp.Literal, exp.Binary, exp.Not, exp.Neg, exp.Boolean, exp.Null)):
            return None if isinstance(node, exp.Boolean) else "?column?"
        if isinstance(node, exp.Func) and not isinstance(node, _NOT_CALLS):
            name = self.typed_name(node)
            if name in ("count", "sum", "avg", "min", "max", "lower", "upper", "length", "array_agg",
                        "string_agg", "concat", "abs", "round", "now", "date_trunc", "generate_series"):
                return name
        return None


# --- helpers --------------------------------------------------------------------------------------------------------


def _func_name(node: exp.Anonymous) -> str:
    this = node.this
    return ident(this) if isinstance(this, exp.Identifier) else ident(str(this))


def _column_parts(node: exp.Column, schema: Schema) -> list[str]:
    parts = []
    args = node.args
    get = args.get
    cat = get("catalog")
    if cat is not None:
        c = ident(cat)
        if c != schema.database:
            raise Unsupported(f"cross-database reference {node.sql('postgres')}")
    v = get("db")
    if v is not None:
        parts.append(ident(v))
    v = get("table")
    if v is not None:
        parts.append(ident(v))
    this = get("this")
    parts.append(ident(this) if not isinstance(this, exp.Star) else "*")
    return parts


def _conjuncts(cond: exp.Expr) -> list[exp.Expr]:
    """The top-level AND-ed conditions of ``cond`` (parentheses dropped)."""
    while isinstance(cond, exp.Paren):
        cond = cond.this
    if isinstance(cond, exp.And):
        return _conjuncts(cond.this) + _conjuncts(cond.expression)
    return [cond]


def _constant_token(node: exp.Expr, text: pos.Text) -> tuple[Token, str] | None:
    """The lexer's token for a plain constant (an integer, a string, ``$n``) and its kind, or None."""
    if isinstance(node, exp.Parameter) and isinstance(node.this, exp.Literal):
        start, kind = node.this.meta.get("start"), "param"
        start = start - 1 if isinstance(start, int) else None  # the "$"
    elif isinstance(node, exp.Literal):
        start, kind = node.meta.get("start"), "str" if node.is_string else "int"
    else:
        return None
    i = text.index_at(start) if isinstance(start, int) else None
    if i is None:
        return None
    tok = text.tokens[i]
    want = {"param": T.PARAM, "str": T.STRING, "int": T.NUMBER}[kind]
    if tok.kind is not want or (kind == "int" and not (tok.text.isdigit() and len(tok.text) <= 18)):
        return None  # (a longer integer is numeric, whose = is not leakproof)
    return tok, kind


def _ordinal(e: exp.Literal, flows: list[Flow]) -> Flow:
    try:
        i = int(e.this)
    except ValueError:
        raise Unsupported(f"non-integer constant {e.this} in ORDER BY/GROUP BY") from None
    if not 1 <= i <= len(flows):
        raise Unsupported(f"position {i} is not in select list")
    return flows[i - 1]


def _find_local(level: Level, name: str) -> Flow | None:
    hits = [fl for it in level.items for nm, fl in it.entries if nm == name]
    if len(hits) > 1:
        raise Unsupported(f'ambiguous column reference "{name}"')
    if hits:
        return hits[0]
    if any(it.unknown for it in level.items):
        raise Unsupported(f'cannot tell whether column "{name}" comes from a function whose output columns are '
                          f"unknown")
    return None


def _grouped_column(g: exp.Expr, selects: list[exp.Expr], is_input: Callable[[exp.Column], bool]) -> exp.Column | None:
    """The plain column a GROUP BY item groups by, if it is one: itself, the select list item at its
    position (``GROUP BY 1``), or, for a bare name that is no input column (``is_input``), the select
    list item of that output name (SELECT reference, GROUP BY clause).

    >>> import sqlglot
    >>> q = sqlglot.parse_one("SELECT m.id AS k, m.a + 1 FROM t m GROUP BY 1, 2, k, m.b", read="postgres")
    >>> [getattr(_grouped_column(g, q.expressions, lambda c: False), "sql", lambda: None)()
    ...  for g in q.args["group"].expressions]
    ['m.id', None, 'm.id', 'm.b']
    """
    if isinstance(g, exp.Literal) and not g.is_string:
        try:
            i = int(g.this)
        except ValueError:
            return None
        if not 1 <= i <= len(selects):
            return None
        g = selects[i - 1].unalias()
    elif isinstance(g, exp.Column) and not g.args.get("table") and not isinstance(g.this, exp.Star) \
            and not is_input(g):
        named = [e.this for e in selects if isinstance(e, exp.Alias) and e.alias == ident(g.this)]
        g = named[0] if len(named) == 1 else g
    if isinstance(g, exp.Column) and not isinstance(g.this, exp.Star):
        return g
    return None


def _level_expressions(node: exp.Select) -> list[exp.Expr]:
    """What a grouped block evaluates per group: its select list, HAVING, window definitions, DISTINCT ON
    and ORDER BY (WHERE, FROM and GROUP BY come before grouping)."""
    out = list(node.expressions)
    for key in ("having", "order"):
        clause = node.args.get(key)
        if clause is not None:
            out.extend(o.this if isinstance(o, exp.Ordered) else o for o in (
                clause.expressions if key == "order" else [clause.this]))
    out.extend(node.args.get("windows") or [])
    distinct = node.args.get("distinct")
    on = distinct.args.get("on") if distinct is not None else None
    if on is not None:
        out.extend(on.expressions if isinstance(on, exp.Tuple) else [on])
    return out


def _outside_aggregates(node: exp.Expr, nested: bool = False):
    """The column references (and stars) of ``node`` a grouped block evaluates per group: not inside an
    aggregate of the block. A window function runs after grouping, on the groups (3.5): its arguments,
    PARTITION BY and ORDER BY count. A subquery is read whole but for its stars: an outer column in it
    must be grouped too (its own columns may add names, which only groups by more of the same row).

    >>> import sqlglot
    >>> e = sqlglot.parse_one("SELECT a, count(b), sum(c) OVER (PARTITION BY d), (SELECT max(e) FROM u), "
    ...                       "count(*) FILTER (WHERE f), m.* FROM t m", read="postgres")
    >>> [c.sql() for x in e.expressions for c in _outside_aggregates(x)]
    ['a', 'c', 'd', 'e', 'm.*']
    """
    if isinstance(node, exp.Star) or isinstance(node, exp.Column) and isinstance(node.this, exp.Star):
        if not nested:
            yield node
        return
    if isinstance(node, exp.Column):
        yield node
        return
    if isinstance(node, exp.Window) or nested:
        pass
    elif isinstance(node, exp.AggFunc) or isinstance(node, (exp.Filter, exp.WithinGroup)) and isinstance(
            node.this, exp.AggFunc):
        return
    inner = nested or isinstance(node, (exp.Window, exp.Query))
    for child in node.iter_expressions():
        yield from _outside_aggregates(child, inner)


def _group_extras(group: exp.Group) -> list[exp.Expr]:
    out: list[exp.Expr] = []
    for key in ("grouping_sets", "cube", "rollup"):
        v = group.args.get(key)
        if isinstance(v, list):
            out.extend(v)
        elif isinstance(v, exp.Expr):
            out.append(v)
    if group.args.get("totals"):
        raise Unsupported("GROUP BY ... WITH TOTALS is not PostgreSQL")
    return out


def own_joins(node: exp.Expr) -> list[exp.Join]:
    """The joins sqlglot hangs on a FROM item itself rather than on its query.

    PostgreSQL reads ``a JOIN b JOIN c ON x ON y`` as ``a JOIN (b JOIN c ON x) ON y``; sqlglot keeps
    the inner join on ``b``'s table node, so reading ``b`` as a plain table drops ``c``.

    >>> import sqlglot
    >>> j = sqlglot.parse_one("SELECT * FROM a JOIN b JOIN c ON x ON y", read="postgres").args["joins"][0]
    >>> [j.this.name] + [k.this.name for k in own_joins(j.this)]
    ['b', 'c']
    >>> own_joins(sqlglot.parse_one("SELECT * FROM a JOIN b ON y", read="postgres").args["joins"][0].this)
    []
    """
    return list(node.args.get("joins") or []) if isinstance(node, exp.Table) else []


def _from_sequence(first: exp.Expr, joins: list[exp.Join]):
    yield first, None
    for j in own_joins(first):
        yield j.this, j
    for j in joins:
        yield j.this, j


def _is_comma(join: exp.Join) -> bool:
    return not any(join.args.get(k) for k in ("on", "side", "kind", "using", "method"))


def _is_join_group(node: exp.Expr) -> bool:
    if isinstance(node, exp.Table):
        return bool(node.args.get("joins"))
    if isinstance(node, exp.Subquery):
        return _is_join_group(node.this) or bool(node.args.get("joins"))
    return False


def _take_one(entries: list[tuple[str | None, Flow]], name: str, side: str, item: Item) -> Flow:
    hits = [i for i, (nm, _) in enumerate(entries) if nm == name]
    if len(hits) > 1:
        raise Unsupported(f'common column name "{name}" appears more than once in {side} table')
    if not hits:
        if item.unknown:
            raise Unsupported(f'cannot tell whether column "{name}" exists in the {side} table of a join')
        raise Unsupported(f'column "{name}" specified in USING clause does not exist in {side} table')
    _, fl = entries.pop(hits[0])
    return fl


def _derived(r: Result, alias: exp.TableAlias | None, what: str, default_name: str = "") -> Source:
    names = list(r.names)
    aname = default_name
    aliased = False
    if alias is not None:
        if alias.this is not None:
            aname = ident(alias.this)
            aliased = True
        cols = [ident(c.this if isinstance(c, exp.ColumnDef) else c) for c in alias.columns]
        if len(cols) > len(names):
            raise Unsupported(f"{what} has {len(names)} columns available but {len(cols)} columns specified")
        names = cols + names[len(cols):]
    return Source(aname, names, list(r.flows), dict(r.rows), aliased=aliased, label=what)


def _aliased(src: Source, alias: exp.TableAlias | None) -> Source:
    if alias is None:
        return src
    names = list(src.columns)
    cols = [ident(c) for c in alias.columns]
    if len(cols) > len(names):
        raise Unsupported(f"{src.label} has {len(names)} columns available but {len(cols)} columns specified")
    names = cols + names[len(cols):]
    name = ident(alias.this) if alias.this is not None else src.name
    return Source(name, names, src.flows, src.rows, relation=src.relation, aliased=alias.this is not None,
                  known=src.known, base=src.base, generic=src.generic, label=src.label, ref=src.ref)


def _set_target(t: exp.Expr) -> str:
    while isinstance(t, exp.Bracket):  # SET arr[1] = ...
        t = t.this
    if isinstance(t, exp.Column) and not t.args.get("table") and isinstance(t.this, exp.Identifier):
        return ident(t.this)
    if isinstance(t, exp.Identifier):
        return ident(t)
    raise Unsupported(f"unsupported SET target {t.sql('postgres')}")


def _simple_view(rel: RelationInfo, src: Source, plain: set[int]) -> tuple[dict[str, list[Column]], list[Table]]:
    """Writes through an automatically updatable view map to the base columns of its one table."""
    tables = [k for k in src.rows if isinstance(k, Table)]
    if len(tables) != 1:
        raise Unsupported(f"writing through view {rel}, which is not a simple view of one table")
    mapping: dict[str, list[Column]] = {}
    for i, (name, fl) in enumerate(zip(src.columns, src.flows)):
        cols = [k for k in fl if isinstance(k, Column)]
        if i in plain and len(fl) == 1 and len(cols) == 1:
            mapping[name or ""] = cols
        else:
            mapping[name or ""] = []  # not a plain base column: the server refuses writes to it
    return mapping, tables


def _safe_parse(parse: Callable[[str], exp.Expr] | None) -> Callable[[str], object]:
    def run(sql: str) -> object:
        if parse is None:
            return "no parser"
        try:
            return parse(sql)
        except Unsupported as exc:
            return str(exc)
    return run


def analyze_tree(tree: exp.Expr, ctx: Context, acc: StatementAccess, statement: Statement | None = None) -> Kind:
    """Record into ``acc`` every base column ``tree`` uses; return the statement's kind.

    With the lexed ``statement`` the tree was parsed from, the relation references and
    aggregates are also recorded with their positions (``acc.references``, ``acc.aggregates``).

    >>> from proxy.analysis.schema import Schema
    >>> from proxy.analysis.parse import parse_statement
    >>> from proxy.analysis.lexer import scan
    >>> s = Schema.from_dict({"schemas": {"crm": {"tables": {"members": ["id", "email"]}}}})
    >>> sql = "SELECT email FROM crm.members WHERE id = 1"
    >>> acc = StatementAccess(Kind.OTHER)
    >>> analyze_tree(parse_statement(sql, scan(sql)), Context(s, ["pg_catalog"]), acc)
    <Kind.SELECT: 'select'>
    >>> {str(c): u.name for c, u in acc.columns.items()}
    {'crm.members.id': 'FILTER', 'crm.members.email': 'PROJECT'}
    """
    return Analyzer(ctx, acc, statement).statement(tree)
