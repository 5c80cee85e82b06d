"""A structural guard on the analysis: every reference in a statement's tree must have been read by it.

The analysis (``proxy.analysis.flows.Analyzer``) walks a sqlglot tree by hand, clause by clause,
and refuses (``_check_args``) any argument it does not expect. That leaves one way to miss a
reference silently: an argument that is allowed, or a node that is reached, but whose contents
no code path ever reads (hunt 24: ``a JOIN b JOIN c ON x ON y`` hangs ``c`` on ``b``'s table node
under ``joins``, allowed and never read for a non-first FROM item; ``c`` and its card numbers
vanished from the statement).

``recording()`` wraps the Analyzer's entry points (``special``, which every node ``expr`` walks
passes through; ``column``; ``from_item``; ``table_source``; ``target``; ``query``; ...) so that
each instance records the nodes it was given to read. ``unread(sql, schema)`` then walks every
tree the analysis analysed (the statement's, and the definitions of the views it read) and
returns each node of a reference-bearing kind (``REFERENCE_KINDS``: columns, tables, ``*``,
calls, queries, ...) that no entry point was given and that ``legitimate`` does not explain,
for the statements the analysis accepted (no ``unsupported`` reason). A refusal is not checked:
refusing is always safe.

A node counts as read when it was passed to one of the entry points; its descendants are
checked on their own, so a container read only in part still shows what it left.
``legitimate`` lists the few places where a reference-bearing node is rightly handled as a
name, or where the Analyzer reads a wrapper's contents directly; each rule is narrow (the
node's exact place in its parent, and nothing else in the wrapper that could hold code).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlglot import exp

from proxy.analysis import flows
from proxy.analysis.access import analyze
from proxy.analysis.schema import Schema

# Node kinds that name or compute something the analysis must account for.
REFERENCE_KINDS: tuple[type, ...] = (
    exp.Column, exp.Table, exp.Star, exp.Func, exp.Query, exp.Values, exp.Dot, exp.Lateral, exp.Window, exp.Var,
    exp.Parameter, exp.Placeholder, exp.Identifier,
)

# Where an identifier is a name the analysis reads as one (``ident``), not an expression: (parent class, arg).
NAME_SLOTS: frozenset[tuple[type, str]] = frozenset({
    (exp.Column, "this"), (exp.Column, "table"), (exp.Column, "db"), (exp.Column, "catalog"),
    (exp.TableAlias, "this"), (exp.TableAlias, "columns"), (exp.Alias, "alias"), (exp.ColumnDef, "this"),
    (exp.Schema, "expressions"),  # INSERT INTO t (a, b)
    (exp.Join, "using"),  # JOIN ... USING (a, b)
    (exp.Dot, "this"),  # the schema of a qualified call: s.f(..)
    (exp.Dot, "expression"),  # a field name: (t).a
    (exp.Window, "alias"), (exp.Window, "this"),  # OVER w, WINDOW w AS (..), (w ORDER BY ..)
    (exp.Unnest, "offset"),  # WITH ORDINALITY's column name
    (exp.Anonymous, "this"),  # a quoted function name
    (exp.OnConflict, "constraint"),  # ON CONFLICT ON CONSTRAINT c
    (exp.DataType, "kind"),  # a type name
})

# Analyzer methods whose first node argument (after self) is read: (name, index of the argument,
# whether it is a list of nodes).
_ENTRY_POINTS: tuple[tuple[str, int, bool], ...] = (
    ("special", 0, False),  # every node ``expr`` walks
    ("column", 0, False),
    ("query", 0, False),
    ("select", 0, False),
    ("setop", 0, False),
    ("combine", 0, False),  # each set operation of a left-deep chain setop walks
    ("wrapper", 0, False),
    ("values", 0, False),
    ("from_item", 0, False),
    ("join", 2, False),
    ("star_source", 0, False),
    ("row_source", 0, False),
    ("order_key", 0, False),
    ("window_spec", 0, False),
    ("anonymous", 0, False),
    ("aggregate", 0, False),
    ("record_function", 0, False),
    ("_agg_arg", 0, False),
    ("group_items", 0, True),
    ("function_source", 0, True),
    ("unnest_source", 0, False),
    ("set_items", 0, True),
)


@dataclass
class _Record:
    """What one Analyzer instance read, and the trees it was given."""

    analyzer: flows.Analyzer
    trees: list[exp.Expr] = field(default_factory=list)
    read: dict[int, exp.Expr] = field(default_factory=dict)  # (the nodes are kept: their ids stay theirs)
    raised: bool = False


class Recorder:
    def __init__(self) -> None:
        self.records: dict[int, _Record] = {}

    def of(self, an: flows.Analyzer) -> _Record:
        rec = self.records.get(id(an))
        if rec is None:
            rec = self.records[id(an)] = _Record(an)
        return rec


def _mark(rec: _Record, value) -> None:
    if isinstance(value, exp.Expr):
        rec.read[id(value)] = value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, exp.Expr):
                rec.read[id(v)] = v


@contextmanager
def recording() -> Iterator[Recorder]:
    """Wrap the Analyzer's entry points for the duration; yield the recorder of what each instance read."""
    rec = Recorder()
    cls = flows.Analyzer
    saved: dict[str, object] = {}

    def wrap(name: str, index: int):
        orig = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            if len(args) > index:
                _mark(rec.of(self), args[index])
            return orig(self, *args, **kwargs)
        wrapper.__name__ = name
        return wrapper

    def statement(self, tree):
        r = rec.of(self)
        r.trees.append(tree)
        try:
            return saved["statement"](self, tree)
        except BaseException:
            r.raised = True
            raise

    def view_result(self, rel):
        tree = self.ctx.schema.parsed_definition(rel, flows._safe_parse(self.ctx.parse))
        if isinstance(tree, exp.Expr):
            rec.of(self).trees.append(tree)
        return saved["_view_result"](self, rel)

    def within_group(self, node, env):
        # within_group records the aggregate it wraps by name and reads its arguments itself
        _mark(rec.of(self), node.this)
        return saved["within_group"](self, node, env)

    def row_source(self, node, env):
        # row_source looks a whole-row reference up through its parentheses: ``(t).a``
        while isinstance(node, exp.Paren):
            _mark(rec.of(self), node)
            node = node.this
        _mark(rec.of(self), node)
        return saved["row_source"](self, node, env)

    def names_of(name: str):
        # table_source, target and call_schema read a table node's name parts (relation, schema, catalog)
        def wrapper(self, node, *args, **kwargs):
            _mark(rec.of(self), node)
            if name != "call_schema":
                _mark(rec.of(self), node.this)
            _mark(rec.of(self), [node.args.get("db"), node.args.get("catalog")])
            return saved[name](self, node, *args, **kwargs)
        return wrapper

    def select_list(self, items, env, *args, **kwargs):
        # select_list reads an aliased output itself (``* AS x``, ``t.* x``: expanded, not evaluated)
        for item in items:
            _mark(rec.of(self), item)
            if isinstance(item, exp.Alias):
                _mark(rec.of(self), item.this)
        return saved["select_list"](self, items, env, *args, **kwargs)

    def cte_result(self, d):
        # cte_result reads a WITH query's body (a recursive UNION's arms and WITH itself)
        _mark(rec.of(self), d.node)
        return saved["cte_result"](self, d)

    def window(self, node, env):
        # window reads a FILTER on the windowed call itself (the FILTER's condition, then its call)
        if isinstance(node.this, exp.Filter):
            _mark(rec.of(self), node.this)
        return saved["window"](self, node, env)

    patches = {name: wrap(name, index) for name, index, _ in _ENTRY_POINTS}
    patches.update(statement=statement, _view_result=view_result, within_group=within_group, window=window,
                   row_source=row_source, cte_result=cte_result,
                   select_list=select_list)
    for name in ("table_source", "target", "call_schema"):
        patches[name] = names_of(name)
    for name, fn in patches.items():
        if not hasattr(cls, name):  # (an older Analyzer, to see what the guard finds in it)
            continue
        saved[name] = getattr(cls, name)
        setattr(cls, name, fn)
    try:
        yield rec
    finally:
        for name, orig in saved.items():
            setattr(cls, name, orig)


# --- the places where a reference-bearing node is rightly not read -------------------------------



def _only(node: exp.Expr, *keys: str) -> bool:
    """Whether ``node`` has nothing but ``keys`` (and empty arguments)."""
    return all(k in keys or v in (None, False, [], "") for k, v in node.args.items())


def _is_default(node: exp.Expr) -> bool:
    return (isinstance(node, exp.Column) and not node.args.get("table") and isinstance(node.this, exp.Identifier)
            and not node.this.quoted and node.this.this.lower() == "default")


def _set_clause(eq: exp.Expr | None) -> bool:
    """Whether ``eq`` is a SET item of UPDATE, ON CONFLICT DO UPDATE or MERGE ... UPDATE."""
    return isinstance(eq, exp.EQ) and eq.arg_key == "expressions" and isinstance(eq.parent, (exp.Update,
                                                                                             exp.OnConflict))


def legitimate(node: exp.Expr, read: dict[int, exp.Expr]) -> str | None:
    """Why ``node`` is rightly not read by the analysis (``read``: the nodes it read), or None (a candidate miss)."""
    parent, key = node.parent, node.arg_key
    if isinstance(node, exp.Identifier) and any(isinstance(parent, c) and key == k for c, k in NAME_SLOTS):
        return "name"
    # t.* and (t).*: the star of a column or field selection that was read
    if isinstance(node, exp.Star) and _only(node) and (key == "this" and isinstance(parent, exp.Column)
                                                       or key == "expression" and isinstance(parent, exp.Dot)) \
            and id(parent) in read:
        return "star of a read reference"
    # a type name (crm.label in CAST(x AS crm.label)) and its modifiers (varchar(20)): PostgreSQL takes
    # only constants and names there ("type modifiers must be simple constants or identifiers")
    up = node
    while isinstance(up.parent, (exp.Dot, exp.Column, exp.DataTypeParam)) and not isinstance(up, exp.DataType):
        up = up.parent
    if isinstance(up.parent, exp.DataType) and up.arg_key in ("kind", "expressions"):
        return "type name or modifier"
    # A SET target is a column name of the target relation (``_set_target``): ``SET a = ..``,
    # ``SET (a, b) = ..``, ``SET a[i] = ..`` (its base column only: a subscript is code).
    if isinstance(node, exp.Column) and _only(node, "this") and isinstance(node.this, exp.Identifier):
        up = node
        while isinstance(up.parent, exp.Bracket) and up.arg_key == "this":
            up = up.parent
        if isinstance(up.parent, exp.Tuple) and up.arg_key == "expressions":
            up = up.parent
        if up.arg_key == "this" and _set_clause(up.parent):
            return "SET target column"
        # MERGE ... WHEN NOT MATCHED THEN INSERT (a, b): target column names
        if up.arg_key == "this" and isinstance(up.parent, exp.Insert) and isinstance(up.parent.parent, exp.When):
            return "MERGE INSERT target column"
        # USING (a, b): names of the joined items' columns, read by name
        if key == "using" and isinstance(parent, exp.Join):
            return "JOIN USING column name"
    # DEFAULT as a SET value or a MERGE INSERT value: no value of anything
    if _is_default(node) and _only(node, "this"):
        up = node.parent if isinstance(node.parent, exp.Tuple) else node
        if up.arg_key == "expression" and (_set_clause(up.parent)
                                           or isinstance(up.parent, exp.Insert)
                                           and isinstance(up.parent.parent, exp.When)):
            return "DEFAULT"
    # x COLLATE name: a collation's name, which sqlglot makes a column when qualified (``Analyzer.collate``);
    # an unqualified column there is the second argument of a call "collate"(x, y), which must be read
    if key == "expression" and isinstance(parent, exp.Collate) and (
            isinstance(node, (exp.Identifier, exp.Var))
            or isinstance(node, exp.Column) and _only(node, "this", "table") and node.args.get("table") is not None
            and isinstance(node.this, exp.Identifier)):
        return "collation name"
    # the name parts of the tables of the two rules below
    if isinstance(node, exp.Identifier) and isinstance(parent, exp.Table) and key in ("this", "db", "catalog") \
            and legitimate(parent, read) in ("FOR UPDATE OF name", "SELECT INTO target"):
        return "name"
    # FOR UPDATE OF t: names a FROM item of the same query (PostgreSQL refuses any other name)
    if isinstance(node, exp.Table) and key == "expressions" and isinstance(parent, exp.Lock) \
            and _only(node, "this", "db", "catalog"):
        return "FOR UPDATE OF name"
    # SELECT ... INTO t: the name of the table it creates (the statement is then DDL)
    if isinstance(node, exp.Table) and key == "this" and isinstance(parent, exp.Into):
        return "SELECT INTO target"
    # ROWS FROM (f(..), g(..) AS (a int)): the analysis reads each entry's call (its ``this``); the rest are names
    if isinstance(node, exp.Table) and key == "rows_from" and _only(node, "this", "alias"):
        return "ROWS FROM entry"
    # LATERAL (query) and (a, b) = (query): the analysis reads the query in the parentheses
    if isinstance(node, exp.Subquery) and (
            key == "this" and isinstance(parent, exp.Lateral) and _only(node, "this", "alias")
            or key == "expression" and _set_clause(parent) and _only(node, "this")):
        return "parentheses around a query"
    # MERGE ... THEN DELETE / DO NOTHING, ON CONFLICT DO NOTHING/UPDATE, lock strengths: key words
    if isinstance(node, exp.Var) and (key == "then" and isinstance(parent, exp.When)
                                      or key == "action" and isinstance(parent, exp.OnConflict)):
        return "key word"
    return None


# --- the check ----------------------------------------------------------------------------------------


@dataclass
class Unread:
    sql: str
    node: exp.Expr
    path: str

    def __str__(self) -> str:
        return f"{type(self.node).__name__} {self.node.sql('postgres')[:80]!r} at {self.path} in {self.sql[:300]!r}"


def path_of(node: exp.Expr) -> str:
    parts = []
    while node.parent is not None:
        parts.append(f"{type(node.parent).__name__}.{node.arg_key}")
        node = node.parent
    return " < ".join(parts) or "(root)"


def unread_in(rec: Recorder, sql: str) -> list[Unread]:
    """The unread reference-bearing nodes of the trees of accepted statements that ``rec`` saw."""
    out: list[Unread] = []
    for r in rec.records.values():
        if r.raised or not r.trees or r.analyzer.acc.unsupported:
            continue
        for tree in r.trees:
            for node in tree.walk():
                if isinstance(node, REFERENCE_KINDS) and id(node) not in r.read and legitimate(node, r.read) is None:
                    out.append(Unread(sql, node, path_of(node)))
    return out


def unread(sql: str, schema: Schema, search_path=("$user", "public"), role: str = "app") -> tuple[list[Unread], bool]:
    """The unread references of ``sql`` (see ``unread_in``) and whether every statement of it was accepted."""
    with recording() as rec:
        analysis = analyze(sql, schema, list(search_path), role)
    accepted = all(not st.unsupported for st in analysis.statements)
    return unread_in(rec, sql), accepted
