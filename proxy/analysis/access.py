"""The analysis entry point: ``analyze(sql, schema, search_path, role)``, the columns each statement uses, and how.

It composes, in order: ``lexer.scan`` (PostgreSQL's tokens, checked against the
other reading of ``standard_conforming_strings``) → ``lexer.split_statements`` →
``utility.classify`` (statement kind from its first keywords) → for queries and
DML ``parse.parse_statement`` and ``flows.analyze_tree``; for utilities the
readers of ``proxy.analysis.utility``. Every statement gets a ``StatementAccess``;
whatever cannot be analysed with certainty is reported in its ``unsupported``.
"""

from __future__ import annotations

from typing import Iterable

from sqlglot import exp

from proxy.analysis import utility
from proxy.analysis.flows import Analyzer, Context, analyze_tree, implicit_code
from proxy.analysis.functions import denied, effective_search_path
from proxy.analysis.lexer import LexError, Statement, T, Token, scan, split_statements
from proxy.analysis.model import Analysis, Column, Kind, StatementAccess, Table, Use
from proxy.analysis.parse import Unparsable, parse_statement
from proxy.analysis.resolve import P, Unsupported, resolve_relation
from proxy.analysis.schema import MATERIALIZED_VIEW, PARTITIONED_TABLE, TABLE, Schema, parse_search_path

MAX_SQL_LENGTH = 1_000_000  # longer strings are refused rather than analysed


def lex(sql: str, standard_conforming_strings: bool = True) -> list[Token]:
    """PostgreSQL's tokens for ``sql``; refuses text whose tokens depend on standard_conforming_strings.

    A backslash in a plain string literal means different things with
    standard_conforming_strings on and off; if the two readings do not split the text
    into the same tokens, the analysis cannot know which one the server uses.

    >>> [t.value for t in lex("SELECT '\\\\d+' ~ name")]
    ['select', '\\\\d+', '~', 'name']
    >>> lex("SELECT 'a\\\\'; SELECT 1 --'")
    Traceback (most recent call last):
    ...
    proxy.analysis.lexer.LexError: a string literal containing a backslash is read differently depending on standard_conforming_strings
    """
    tokens = scan(sql, standard_conforming_strings)
    if "\\" in sql and any(t.kind is T.STRING and "\\" in t.text and t.text[:1] in ("'", "n", "N") for t in tokens):
        try:
            other = scan(sql, not standard_conforming_strings)
        except LexError:
            other = None
        if other is None or [(t.kind, t.start, t.end) for t in other] != [(t.kind, t.start, t.end) for t in tokens]:
            raise LexError("a string literal containing a backslash is read differently depending on "
                           "standard_conforming_strings")
    return tokens


def analyze(sql: str, schema: Schema, search_path: Iterable[str] | str = ("$user", "public"), role: str = "", *,
            standard_conforming_strings: bool = True) -> Analysis:
    """Analyse every statement of ``sql`` against ``schema`` with the session's search_path and role.

    ``search_path`` is a list of schema names (``"$user"`` stands for ``role``) or the
    setting's text (``'"$user", public'``). ``standard_conforming_strings`` is the
    session's setting; text whose statements or relations depend on it is refused.

    >>> from proxy.analysis.schema import Schema
    >>> s = Schema.from_dict({"schemas": {"crm": {"tables": {"members": ["member_id", "email"]}}}})
    >>> a = analyze("SELECT email FROM members WHERE member_id = $1; SET pii.purpose = 'billing'", s, ["crm"])
    >>> [(st.kind.value, sorted((str(c), u.name) for c, u in st.columns.items()), st.settings) for st in a.statements]
    [('select', [('crm.members.email', 'PROJECT'), ('crm.members.member_id', 'FILTER')], []), ('set', [], [('pii.purpose', 'billing', False)])]
    >>> analyze("SELECT * FROM memberz", s, ["crm"]).statements[0].unsupported
    ['unknown relation memberz']
    """
    if len(sql) > MAX_SQL_LENGTH:
        msg = f"the SQL text is longer than {MAX_SQL_LENGTH} characters"
        return Analysis(sql, [StatementAccess(Kind.OTHER, unsupported=[msg])], error=msg)
    if "\x00" in sql:  # PostgreSQL's strings end at NUL; the rewrite's placeholders rely on it
        msg = "the SQL text contains a NUL character"
        return Analysis(sql, [StatementAccess(Kind.OTHER, unsupported=[msg])], error=msg)
    try:
        tokens = lex(sql, standard_conforming_strings)
    except LexError as exc:
        msg = f"cannot read the SQL text: {exc}"
        return Analysis(sql, [StatementAccess(Kind.OTHER, unsupported=[msg])], error=msg)
    statements = split_statements(sql, tokens)
    if not statements:
        return Analysis(sql, [StatementAccess(Kind.EMPTY)])
    if isinstance(search_path, str):  # the setting's text, as SET records it or SHOW prints it
        search_path = parse_search_path(search_path)
    ctx = Context(schema, effective_search_path(tuple(search_path), role), role, parse=parse_view)
    return Analysis(sql, [analyze_statement(st, ctx) for st in statements])


def parse_view(sql: str) -> exp.Expr:
    """Parse a view definition (as pg_get_viewdef prints it) into a query tree."""
    try:
        statements = split_statements(sql, lex(sql))
        if len(statements) != 1:
            raise Unsupported("it is not one statement")
        tree = parse_statement(statements[0].text, statements[0].tokens)
    except (LexError, Unparsable) as exc:
        raise Unsupported(str(exc)) from None
    if not isinstance(tree, (exp.Select, exp.SetOperation, exp.Subquery, exp.Values)):
        raise Unsupported("it is not a query")
    tree.meta["statement"] = statements[0]  # positions of its references, for the rewrite
    return tree


def operator_runs(st: Statement) -> list[str]:
    """The operator texts of a statement: runs of adjacent operator characters.

    >>> from proxy.analysis.lexer import scan, split_statements
    >>> sql = "SELECT a %%% 0, b OPERATOR(crm.<->) c, d::int"
    >>> operator_runs(split_statements(sql, scan(sql))[0])
    ['%%%', '<->', '::']
    """
    runs: list[str] = []
    end = -1
    for tok in st.tokens:
        if tok.kind is T.OP:
            if tok.start == end and runs:
                runs[-1] += tok.text or st.text[tok.start:tok.end]
            else:
                runs.append(tok.text or st.text[tok.start:tok.end])
            end = tok.end
        else:
            end = -1
    return runs


def operator_functions(st: Statement, schema: Schema) -> set[str]:
    """The functions behind the user-defined operators a statement may use.

    PostgreSQL picks an operator by symbol and argument types along the search_path,
    so a symbol defined outside pg_catalog may run its function wherever it appears:
    every function behind any overload of a symbol the statement's operator text
    contains is reported (the policy then refuses undeclared functions).

    >>> from proxy.analysis.lexer import scan, split_statements
    >>> s = Schema(operators={"%%%": ["crm.card_of"]})
    >>> sql = "SELECT 3 %%% 0"
    >>> operator_functions(split_statements(sql, scan(sql))[0], s)
    {'crm.card_of'}
    """
    if not schema.operators:
        return set()
    found: set[str] = set()
    for run in operator_runs(st):
        for symbol, functions in schema.operators.items():
            if symbol in run:
                found.update(functions)
    return found


def analyze_statement(st: Statement, ctx: Context) -> StatementAccess:
    """The access of one statement (never raises: problems go to ``unsupported``)."""
    acc = StatementAccess(Kind.OTHER)
    try:
        acc.functions.update(operator_functions(st, ctx.schema))
        acc.cast_functions.update(ctx.schema.casts)
        if ctx.schema.implicit:
            acc.implicit_functions.update(ctx.schema.implicit)
        _dispatch(st, ctx, acc)
    except Unsupported as exc:
        msg = str(exc)
        if msg not in acc.unsupported:
            acc.unsupported.append(msg)
    except Unparsable as exc:
        acc.unsupported.append(str(exc))
    except RecursionError:
        acc.unsupported.append("the statement is nested too deeply")
    except Exception as exc:  # noqa: BLE001 - a bug in the analysis must fail closed, not crash the session
        acc.unsupported.append(f"internal error in the analysis ({type(exc).__name__}: {exc})")
    return with_lineage(acc, ctx.schema)


def with_lineage(acc: StatementAccess, schema: Schema) -> StatementAccess:
    """``acc`` with every use of a column recorded on the column of the same name of each of its relation's
    ancestors and descendants too (``Schema.related``), and likewise its rows, the values it copies and the
    aggregates over it.

    A partition's or child's rows are rows of its ancestors (reading the parent returns them), so
    reading them directly must be decided as reading the ancestors' columns: the catalog's entries
    for the ancestors apply to the child wherever it stands, besides its own (the policy then takes
    the strictest). This is the one place where that happens; the policy decides on plain columns.

    >>> s = Schema.from_dict({"schemas": {"member": {"tables": {"contacts": {"columns": ["id", "email"],
    ...     "partitioned": True}}}, "reporting": {"tables": {"p0": {"columns": ["id", "email"],
    ...     "inherits": ["member.contacts"]}}}}})
    >>> st = analyze("SELECT email FROM reporting.p0 WHERE id = 1", s).statements[0]
    >>> sorted((str(c), u.name) for c, u in st.columns.items())  # doctest: +NORMALIZE_WHITESPACE
    [('member.contacts.email', 'PROJECT'), ('member.contacts.id', 'FILTER'),
     ('reporting.p0.email', 'PROJECT'), ('reporting.p0.id', 'FILTER')]
    """
    if not schema.has_ancestry:
        return acc
    # And the other way (hunt 22): reading a parent returns its descendants' rows, so it is decided as
    # reading theirs too (a catalogued table made a partition of an uncatalogued parent gave its card
    # numbers to a session without a purpose). Also with ONLY, which leaves them out: stricter, never looser.
    for c, u in list(acc.columns.items()):
        for a in schema.related(c):
            acc.use(a, u)
    for t, u in list(acc.tables.items()):
        for a in (*schema.ancestors(t.schema, t.name), *schema.descendants(t.schema, t.name)):
            acc.tables[a] = acc.tables.get(a, Use.NONE) | u
    for sources in acc.copies.values():
        sources.update([a for c in list(sources) for a in schema.related(c)])
    calls = list(acc.aggregates)
    refs = list(acc.references)
    while refs:  # views' definitions hold aggregates of their own
        ref = refs.pop()
        calls.extend(ref.aggregates)
        refs.extend(ref.inner)
    for call in calls:
        extra = [a for c in call.columns for a in schema.related(c)]
        if extra:
            call.columns = call.columns | frozenset(extra)
    return acc


def _dispatch(st: Statement, ctx: Context, acc: StatementAccess) -> None:
    toks = st.tokens
    kind = utility.classify(toks)
    first = utility.word(toks[0])
    if kind is None:
        acc.kind = {"insert": Kind.INSERT, "update": Kind.UPDATE, "delete": Kind.DELETE,
                    "merge": Kind.MERGE}.get(first or "", Kind.SELECT)
        tree = parse_statement(st.text, toks)
        acc.kind = analyze_tree(tree, ctx, acc, st)
        return
    acc.kind = kind
    if kind is Kind.SET:
        acc.settings.extend(utility.parse_set(toks))
    elif kind in (Kind.SHOW, Kind.TRANSACTION):
        return
    elif kind is Kind.UTILITY:
        if first == "deallocate":
            acc.prepared_name = utility.parse_deallocate(toks)
        elif first == "fetch":
            acc.cursor = utility.parse_fetch(toks)
        elif first == "discard" and len(toks) == 2 and toks[1].is_word("all"):
            acc.settings.append(("all", None, False))
    elif kind is Kind.EXPLAIN:
        executes, i = utility.parse_explain(toks)
        inner = analyze_statement(_sub(st, i), ctx)
        acc.inner = inner
        acc.unsupported.extend(inner.unsupported)
        if executes:
            _copy(inner, acc, settings=True)
            if inner.kind is Kind.DDL:  # EXPLAIN ANALYZE CREATE TABLE ... AS / SELECT ... INTO creates it
                acc.kind = Kind.DDL
            if inner.kind is Kind.EXECUTE:
                acc.unsupported.append("EXPLAIN ANALYZE EXECUTE runs a prepared statement whose accesses the "
                                       "analysis of this statement does not see")
    elif kind is Kind.PREPARE:
        name, i = utility.parse_prepare(toks)
        acc.prepared_name = name
        inner = analyze_statement(_sub(st, i), ctx)
        acc.inner = inner
        if inner.kind not in (Kind.SELECT, Kind.INSERT, Kind.UPDATE, Kind.DELETE, Kind.MERGE) and not inner.unsupported:
            inner.unsupported.append(f"a {inner.kind.value} statement cannot be prepared")
        acc.unsupported.extend(inner.unsupported)
        _copy(inner, acc, settings=False)
    elif kind is Kind.DECLARE:
        acc.cursor, i, acc.holdable = utility.parse_declare(toks)
        inner = analyze_statement(_sub(st, i), ctx)
        acc.inner = inner
        if inner.kind is not Kind.SELECT and not inner.unsupported:
            inner.unsupported.append(f"a cursor cannot be declared for a {inner.kind.value} statement")
        acc.unsupported.extend(inner.unsupported)
        _copy(inner, acc, settings=False)
    elif kind is Kind.EXECUTE:
        name, args = utility.parse_execute(toks)
        acc.prepared_name = name
        if args is not None:
            _expressions(st, args, ctx, acc)
    elif kind is Kind.CALL:
        if len(toks) < 3:
            raise Unsupported("cannot read CALL statement")
        acc.opaque_code = "a procedure (CALL)"
        _expressions(st, (1, len(toks)), ctx, acc)
    elif kind is Kind.DO:
        acc.opaque_code = "a DO block"
        return
    elif kind is Kind.COPY_TO:
        _copy_statement(st, ctx, acc)
    elif kind is Kind.TRUNCATE:
        for parts in utility.parse_truncate(toks):
            rel = _relation(ctx, parts)
            if rel.kind not in (TABLE, PARTITIONED_TABLE):
                raise Unsupported(f"cannot truncate {rel}, which is not a table")
            implicit_code(ctx.schema, acc, rel.schema, rel.name, write=True, rules=False)
            Analyzer(ctx, acc).delete_rows([Table(rel.schema, rel.name)])
    elif kind is Kind.DDL:
        _ddl(st, ctx, acc, first)
    else:
        named = f"{first.upper()} statements" if first in utility.COMMAND_WORDS else "statements of this kind"
        raise Unsupported(f"{named} are not supported by the analysis")  # never client text


def _copy(inner: StatementAccess, acc: StatementAccess, settings: bool) -> None:
    for c, u in inner.columns.items():
        acc.use(c, u)
    for t, u in inner.tables.items():
        acc.tables[t] = acc.tables.get(t, Use.NONE) | u
    acc.functions |= inner.functions
    for name, why in inner.implicit_functions.items():
        acc.implicit_functions.setdefault(name, why)
    if settings:
        acc.settings.extend(inner.settings)


def _copy_positions(inner: StatementAccess, acc: StatementAccess) -> None:
    """Keep the references and aggregates of an inner query that is not ``acc.inner`` (COPY, CREATE AS)."""
    acc.references.extend(inner.references)
    acc.aggregates.extend(inner.aggregates)
    acc.key_groups.extend(inner.key_groups)


def _sub(st: Statement, i: int, j: int | None = None, prefix: str = "") -> Statement:
    """The statement made of tokens ``i:j`` of ``st`` (optionally after a ``prefix`` of code).

    Its ``offset`` and ``first`` still place its own tokens in the whole SQL string (the
    prefix's tokens are not in it).
    """
    toks = st.tokens[i:j]
    base = toks[0].start
    text = prefix + st.text[base: toks[-1].end]
    shift = len(prefix) - base
    new = [Token(t.kind, t.start + shift, t.end + shift, t.value, t.text) for t in toks]
    extra = 0
    if prefix:
        head = list(scan(prefix))
        extra = len(head)
        new = head + new
    return Statement(text, tuple(new), st.offset - shift, st.first + i - extra)


def _expressions(st: Statement, rng: tuple[int, int], ctx: Context, acc: StatementAccess) -> None:
    """Analyse call/argument expressions (CALL p(...), EXECUTE p(...)) as the select list of a SELECT."""
    sub = _sub(st, rng[0], rng[1], prefix="SELECT ")
    tree = parse_statement(sub.text, sub.tokens)
    if not isinstance(tree, exp.Select) or any(
            v not in (None, False, []) for k, v in tree.args.items() if k != "expressions"):
        raise Unsupported("cannot read the arguments of the statement")
    analyze_tree(tree, ctx, acc, sub)


def _relation(ctx: Context, parts: list[str]):
    if len(parts) == 1:
        return resolve_relation(ctx.schema, ctx.path, parts[0])
    if len(parts) == 2:
        return resolve_relation(ctx.schema, ctx.path, parts[1], parts[0])
    if len(parts) == 3:
        return resolve_relation(ctx.schema, ctx.path, parts[2], parts[1], parts[0])
    raise Unsupported(f"improper qualified name {'.'.join(parts)}")


def _copy_statement(st: Statement, ctx: Context, acc: StatementAccess) -> None:
    spec = utility.parse_copy(st.tokens)
    acc.kind = Kind.COPY_TO if spec.direction == "to" else Kind.COPY_FROM
    if spec.query is not None:
        inner = analyze_statement(_sub(st, spec.query[0], spec.query[1]), ctx)
        if inner.kind not in (Kind.SELECT, Kind.INSERT, Kind.UPDATE, Kind.DELETE, Kind.MERGE) \
                and not inner.unsupported:
            inner.unsupported.append(f"COPY of a {inner.kind.value} statement")
        acc.unsupported.extend(inner.unsupported)
        _copy(inner, acc, settings=True)
        _copy_positions(inner, acc)
        return
    rel = _relation(ctx, spec.relation or [])
    if spec.direction == "to" and rel.kind != TABLE:
        raise Unsupported(f"COPY {rel} TO: only plain tables can be copied (use COPY (SELECT ...) TO)")
    if spec.direction == "from" and rel.kind not in (TABLE, PARTITIONED_TABLE):
        raise Unsupported(f"COPY {rel} FROM: only tables can be copied into")
    implicit_code(ctx.schema, acc, rel.schema, rel.name, write=spec.direction == "from", rules=False)
    cols = spec.columns if spec.columns is not None else list(rel.columns)
    use = Use.PROJECT if spec.direction == "to" else Use.WRITE
    for c in cols:
        if c not in rel.columns:
            raise Unsupported(f'column "{c}" of relation {rel} does not exist')
        acc.use(Column(rel.schema, rel.name, c), use)
    t = Table(rel.schema, rel.name)
    acc.tables[t] = acc.tables.get(t, Use.NONE) | use
    if spec.where is not None:
        # The condition reads the incoming rows, not stored data; only its calls matter.
        cond = _sub(st, spec.where[0], spec.where[1])
        probe = StatementAccess(Kind.SELECT)
        q = f"SELECT 1 FROM {_qi(rel.schema)}.{_qi(rel.name)} WHERE "
        sub = Statement(q + cond.text, tuple(scan(q)) + tuple(
            Token(x.kind, x.start + len(q), x.end + len(q), x.value, x.text) for x in cond.tokens))
        tree = parse_statement(sub.text, sub.tokens)
        analyze_tree(tree, ctx, probe)
        acc.functions |= probe.functions
        acc.unsupported.extend(probe.unsupported)


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ddl(st: Statement, ctx: Context, acc: StatementAccess, first: str | None) -> None:
    toks = st.tokens
    acc.opaque_code = utility.ddl_code(toks)
    try:
        reads = utility.ddl_reads(toks)
    except Unsupported:
        reads = []  # ddl_code has made the statement code the analysis cannot read
    for read in reads:
        # Stored values the statement reads as it runs (and may show in its errors): reads of
        # those columns (for a materialized view, also of what its definition read), decided by
        # the policy like any other.
        try:
            rel = _relation(ctx, read.relation)
        except Unsupported:
            if read.if_known:
                continue  # an index (or nothing: PostgreSQL then refuses the statement itself)
            raise
        an = Analyzer(ctx, acc)
        src = an.relation_source(rel)
        for c in rel.columns if read.columns is None else read.columns:
            if c not in rel.columns:
                raise Unsupported(f'column "{c}" of relation {rel} does not exist')
            an.consume(src.flows[rel.columns.index(c)], read.use)
        an.consume(src.rows, read.use)
    renamed = utility.renamed_schema(toks) if first == "alter" else None
    if renamed is not None:  # every stored value in it goes by another name: see ``ddl_reads``
        an = Analyzer(ctx, acc)
        for rel in ctx.schema.relations:
            if rel.schema == renamed:
                src = an.relation_source(rel)
                for flow in src.flows:
                    an.consume(flow, Use.PROJECT)
                an.consume(src.rows, Use.PROJECT)
    if first == "refresh":
        parts, data = utility.parse_refresh(toks)
        rel = _relation(ctx, parts)
        if rel.kind != MATERIALIZED_VIEW:
            raise Unsupported(f"{rel} is not a materialized view")
        if data and rel.definition is not None:
            an = Analyzer(ctx, acc)
            r = an.view_result(rel)
            an.consume_result(r, P)
        return
    rng = utility.ddl_query(toks) if first == "create" else None
    if rng is not None:
        inner = analyze_statement(_sub(st, rng[0], rng[1]), ctx)
        if inner.kind is not Kind.SELECT and not inner.unsupported:
            inner.unsupported.append(f"CREATE ... AS of a {inner.kind.value} statement")
        acc.unsupported.extend(inner.unsupported)
        _copy(inner, acc, settings=True)
        _copy_positions(inner, acc)
        return
    # Calls in DDL (defaults, index expressions, checks, policies) run later on the server;
    # only the denylisted built-ins are refused here.
    for name in utility.called_names(toks):
        reason = denied(name)
        if reason:
            acc.unsupported.append(f"function {name} {reason}")
