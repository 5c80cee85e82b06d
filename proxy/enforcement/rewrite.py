"""The masking rewrite: turns a statement the policy lets through only transformed into the SQL PostgreSQL runs instead.

Every reference to a relation with masked columns or consent-filtered rows is
replaced, where it stands in the text, by a derived table of the same name and
columns that computes the masked values and leaves out the rows of subjects
who withdrew (or did not give) consent::

    SELECT m.email FROM crm.members m WHERE m.email LIKE '%@example.jp'
    SELECT m.email FROM (SELECT __pp_row.member_id, <email masked> AS email, ...
                           FROM crm.members AS __pp_row WHERE <consent>) m WHERE m.email LIKE '%@example.jp'

so the mask holds wherever the column is used (select list, WHERE, JOIN, GROUP BY,
ORDER BY, functions, whole-row references). Views over such relations are inlined
as derived tables with the substitution inside. A query block that aggregates a
column allowed only in aggregates gets ``HAVING count(DISTINCT subject) >= k``. A
GROUP BY holding the primary key of a substituted table gets the table's columns the
block uses outside aggregates (a derived table has no key: ``group_additions``).
Everything else in the text, ``$n`` parameters included, is kept byte for byte.
What cannot be rewritten with certainty is refused (``Block``).

``make_rewrite(policy, schema, search_path, role)`` gives the ``rewrite`` that
``proxy.policy.verdict.decide_statement`` calls; ``rewrite_statement`` composes,
in order: ``plan_of`` (what must change) → ``check_functions`` →
``check_statement`` for each statement → ``text_edits`` (substitutions, recursing
into views) → ``apply_edits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from proxy.analysis.functions import effective_search_path
from proxy.analysis.model import (AggregateCall, Analysis, Column, KeyGroup, Kind, RelationRef, StatementAccess, Table,
                                  Use)
from proxy.analysis.schema import MATERIALIZED_VIEW, VIEW, Schema, quote_ident
from proxy.analysis.shape import COPY, copy_of
from proxy.enforcement.masks import MaskError, mask_sql
from proxy.policy import vocabulary as v
from proxy.policy.catalog import ConsentSource, FurtherSource
from proxy.policy.decision import Allow, Block, Decision, Mask
from proxy.policy.engine import Policy
from proxy.policy.verdict import Explanation, flatten

ROW = "__pp_row"  # the relation inside its derived table
CONSENT = "__pp_consent"  # the consent table inside the consent condition
LATER = "__pp_later"  # a later consent record of the same subject and purpose
FURTHER = "__pp_further"  # a further consent source's row inside its condition
VIEW_BODY = "__pp_view"  # an inlined view definition
ROW_ID = "__pp_ctid"  # a derived table's row identity (its relation's ctid), for the repetition check
# Column types whose "=" with an integer, a string or a parameter is leakproof in
# PostgreSQL (pg_proc.proleakproof of int2/4/8eq and their cross-type forms, texteq,
# bpchareq, uuid_eq, booleq): such a test may run on rows the consent filter drops.
_PUSHABLE_TYPES = {
    "smallint": ("int", "str", "param"), "integer": ("int", "str", "param"), "bigint": ("int", "str", "param"),
    "text": ("str", "param"), "character varying": ("str", "param"), "character": ("str", "param"),
    "uuid": ("str", "param"), "boolean": ("str", "param"),
}
RESERVED_PREFIX = "__pp_"
# Built-in types without an equality operator PostgreSQL can group by (no default btree or hash
# operator class: "could not identify an equality operator for type json"), nor arrays of them.
_UNGROUPABLE_TYPES = frozenset({"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})

Edit = tuple[int, int, str]  # replace text[start:end] by the string


class Refused(Exception):
    """The statement cannot be rewritten with certainty; the message says which column or table and why."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass
class TablePlan:
    """What a relation's derived table must do: mask these columns (column -> method), filter consent."""

    table: Table
    masks: dict[str, str] = field(default_factory=dict)
    consent: str | None = None  # opt_in | opt_out

    @property
    def substitute(self) -> bool:
        return bool(self.masks) or self.consent is not None


@dataclass
class Plan:
    """Everything the rewrite must achieve for one analysed SQL string."""

    purpose: str
    tables: dict[Table, TablePlan] = field(default_factory=dict)
    aggregates: dict[Column, int] = field(default_factory=dict)  # aggregate-only column -> k
    consent: ConsentSource | None = None

    @property
    def empty(self) -> bool:
        return not self.aggregates and not any(tp.substitute for tp in self.tables.values())


@dataclass
class Context:
    """What the rewrite reads besides the analysis: the policy, the schema and the session's search path."""

    policy: Policy
    schema: Schema
    path: list[str]
    plan: Plan


# -- small helpers ------------------------------------------------------------------------------

def qualified(table: Table) -> str:
    """A table's name, quoted where needed.

    >>> qualified(Table("Crm", "VIP")), qualified(Table("crm", "members"))
    ('"Crm"."VIP"', 'crm.members')
    """
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def sql_value(value: object) -> str:
    """A status value of the consent table as a SQL literal.

    >>> sql_value("withdrawn"), sql_value(True), sql_value(3), sql_value("it's")
    ("'withdrawn'", 'true', '3', "'it''s'")
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def equals(left: str, right: str) -> str:
    """Equality by pg_catalog's operator only (no operator of the session's search_path can capture it).

    >>> equals("a", "b")
    'a OPERATOR(pg_catalog.=) b'
    """
    return f"{left} OPERATOR(pg_catalog.=) {right}"


def any_of(column: str, values: Iterable[object]) -> str:
    """``column`` equal to one of ``values``.

    >>> any_of("c.purpose", ["a.b", "a"])
    "(c.purpose OPERATOR(pg_catalog.=) 'a.b' OR c.purpose OPERATOR(pg_catalog.=) 'a')"
    """
    return "(" + " OR ".join(equals(column, sql_value(x)) for x in values) + ")"


def apply_edits(text: str, edits: Iterable[Edit]) -> str:
    """``text`` with every edit applied (edits do not overlap; an insertion goes before a replacement at its offset).

    >>> apply_edits("SELECT a FROM t WHERE b", [(14, 15, "(SELECT 1 AS a) AS t"), (22, 22, "("), (23, 23, ") AND c")])
    'SELECT a FROM (SELECT 1 AS a) AS t WHERE (b) AND c'
    """
    ordered = sorted(set(edits), key=lambda e: (e[0], e[1]))
    for (_, end, _), (start, _, _) in zip(ordered, ordered[1:]):
        if start < end:  # never expected: the analysis records each place once
            raise Refused("purpose-proxy cannot rewrite this statement with certainty: two rewrites overlap in its "
                          "text")
    out = text
    for start, end, new in reversed(ordered):
        if "\x00" in new:
            new = COPY.sub(lambda m: text[int(m[1]):int(m[2])], new)
        out = out[:start] + new + out[end:]
    return out


def clause_at(text: str, at: int, clause: str) -> str:
    """``clause`` padded to be inserted at ``at`` in ``text``: a space only where none is already next to it.

    >>> clause_at("SELECT 1 FROM t GROUP BY a ORDER BY 1", 27, "HAVING x")
    'HAVING x '
    >>> clause_at("SELECT 1 FROM t", 15, "WHERE x")
    ' WHERE x'
    """
    before = "" if at > 0 and text[at - 1].isspace() else " "
    after = "" if at >= len(text) or text[at].isspace() else " "
    return f"{before}{clause}{after}"


def all_refs(refs: Iterable[RelationRef]) -> Iterator[RelationRef]:
    """References and, for views, the references of their definitions, depth first."""
    for ref in refs:
        yield ref
        yield from all_refs(ref.inner)


def statement_refs(st: StatementAccess) -> list[RelationRef]:
    """The references of a statement and of the statements inside it (PREPARE, DECLARE, EXPLAIN)."""
    out: list[RelationRef] = []
    while st is not None:
        out.extend(st.references)
        st = st.inner
    return out


def all_calls(statements: Iterable[StatementAccess]) -> list[AggregateCall]:
    """Every aggregate call of the statements and of the views they read (each view once)."""
    calls: list[AggregateCall] = []
    seen: set[int] = set()
    for st in statements:
        calls.extend(st.aggregates)
        for ref in all_refs(st.references):
            if ref.aggregates and id(ref.aggregates) not in seen:
                seen.add(id(ref.aggregates))
                calls.extend(ref.aggregates)
    return calls


def reads_table(st: StatementAccess, table: Table) -> bool:
    """Whether the statement reads rows or columns of ``table``."""
    if any(t == table and use.reads for t, use in st.tables.items()):
        return True
    return any((c.schema, c.table) == (table.schema, table.name) and use.reads for c, use in st.columns.items())


def touched_tables(st: StatementAccess) -> set[Table]:
    """The base tables a statement touches in any way."""
    out = {Table(c.schema, c.table) for c in st.columns} | set(st.tables)
    out |= {r.table for r in all_refs(statement_refs(st))}
    return out


# -- 1. the plan ----------------------------------------------------------------------------------

def plan_of(analysis: Analysis, expl: Explanation, policy: Policy, schema: Schema | None = None) -> Plan:
    """What must change: masked columns and consent per table, aggregate-only columns with their k (with
    ``schema``, a partition or inheritance child read directly also gets its ancestors': ``inherit_plans``)."""
    purpose = expl.purpose or ""
    plan = Plan(purpose, consent=policy.catalog.consent)
    statements = list(flatten(analysis.statements))
    columns = {str(c): c for st in statements for c in st.columns}
    for req in expl.requirements:
        col = columns.get(req.column)
        if col is None:
            raise Refused(f"column {req.column} must be {_label(req.effect, req.method, req.k)} under purpose "
                          f"\"{purpose}\", but it is read through a function, where the rewrite cannot reach it",
                          hint="Read the column directly in the statement instead of through the function.")
        if req.effect == v.MASK:
            plan.tables.setdefault(Table(col.schema, col.table), TablePlan(Table(col.schema, col.table))) \
                .masks[col.name] = req.method or "redact"
        else:
            plan.aggregates[col] = max(plan.aggregates.get(col, 0), req.k or 2)
    mode = policy.consent_mode(expl.purpose)
    if mode is not None:
        tables = {t for st in statements for t in touched_tables(st)}
        for name in expl.functions:  # tables declared functions read count too (check_functions refuses them)
            entry = policy.catalog.functions.get(name)
            tables |= {Table(c.schema, c.table) for c in (entry.reads if entry else ())}
        personal = {c.column.rpartition(".")[0] for c in expl.columns if c.categories}
        # (count(*) counts the people too; a view is not: the rewrite inlines it, its tables are filtered)
        personal |= {str(t) for t in tables if policy.catalog.holds_personal(t) and not _is_view(schema, t)}
        for table in tables:
            if policy.catalog.subject_of(table) is not None:
                plan.tables.setdefault(table, TablePlan(table)).consent = mode
            elif str(table) in personal and not any(
                    policy.catalog.subject_of(a) for a in (schema.ancestors(table.schema, table.name)
                                                           if schema is not None else ())):
                # Nothing to match consent decisions with: every row would be shown, those of people who
                # withdrew included (a table a schema's personal_by_default covers, or a subject: removed).
                raise Refused(f"rows of {table} must be filtered by consent under purpose \"{purpose}\", but the "
                              f"catalog names no subject column for it",
                              hint="Give the table 'subject:' in catalog.yaml, or use a purpose that does not "
                                   "depend on consent.")
    if schema is not None and schema.has_ancestry:
        inherit_plans(plan, (r for st in statements for r in all_refs(statement_refs(st))), schema)
    return plan


def _is_view(schema: Schema | None, table: Table) -> bool:
    rel = schema.relation(table.schema, table.name) if schema is not None else None
    return rel is not None and rel.kind == VIEW


def inherit_plans(plan: Plan, refs: Iterable[RelationRef], schema: Schema) -> None:
    """Give each referenced partition or inheritance child what its ancestors' table plans ask: their masks
    (of two methods for a column, the one revealing less) and their consent filtering, besides its own.

    The analysis reports a child's columns as its ancestors' columns too
    (``proxy.analysis.access.with_lineage``), so the policy's masks and consent filtering for
    them are planned on the ancestors; the child's rows are rewritten where the child stands.

    >>> s = Schema.from_dict({"schemas": {"r": {"tables": {"p0": {"columns": ["id", "email"],
    ...     "inherits": ["m.contacts"]}}}}})
    >>> plan = Plan("marketing", {Table("m", "contacts"): TablePlan(Table("m", "contacts"), {"email": "redact"},
    ...     "opt_out"), Table("r", "p0"): TablePlan(Table("r", "p0"), {"email": "hash"})})
    >>> inherit_plans(plan, [RelationRef(Table("r", "p0"), "table", None)], s)
    >>> plan.tables[Table("r", "p0")]
    TablePlan(table=Table(schema='r', name='p0'), masks={'email': 'redact'}, consent='opt_out')
    """
    for ref in refs:
        inherited = [plan.tables[a] for a in schema.ancestors(ref.table.schema, ref.table.name) if a in plan.tables]
        if not inherited:
            continue
        tp = plan.tables.setdefault(ref.table, TablePlan(ref.table))
        for other in inherited:
            for col, method in other.masks.items():
                mine = tp.masks.get(col)
                tp.masks[col] = method if mine is None else min(mine, method, key=lambda m: v.precedence(v.MASK, m))
            tp.consent = tp.consent or other.consent


def _label(effect: str, method: str | None, k: int | None) -> str:
    return f"masked ({method})" if effect == v.MASK else f"aggregated over groups of at least {k}"


# -- 2. checks ------------------------------------------------------------------------------------

def check_functions(expl: Explanation, ctx: Context) -> None:
    """Declared functions read tables themselves: none may read a masked column or a consent-filtered table."""
    plan = ctx.plan
    for name in expl.functions:
        entry = ctx.policy.catalog.functions.get(name)
        if entry is None:
            continue
        for col in entry.reads:
            tp = plan.tables.get(Table(col.schema, col.table))
            if col in plan.aggregates or (tp is not None and (col.name in tp.masks or tp.consent)):
                what = "is masked" if tp is not None and col.name in tp.masks else (
                    "is allowed only in aggregates" if col in plan.aggregates else "has rows filtered by consent")
                raise Refused(f"function {name} reads {col}, which {what} under purpose \"{plan.purpose}\"; the "
                              f"rewrite cannot reach inside the function",
                              hint="Read the table directly in the statement instead of through the function.")


def check_statement(st: StatementAccess, ctx: Context) -> None:
    """Refuse what would let data out of its protection or what the rewrite cannot reach in one statement."""
    plan = ctx.plan
    tables = {t: tp for t, tp in plan.tables.items() if tp.substitute and reads_table(st, t)}
    aggregated = [c for c in st.columns if c in plan.aggregates]
    masked = [c for c, use in st.columns.items()
              if c.name in plan.tables.get(Table(c.schema, c.table), TablePlan(Table("", ""))).masks and use.reads]
    if not tables and not aggregated and not masked:
        return
    subject = _subject_of(tables, aggregated, masked)
    if st.kind is Kind.DDL:
        # A DDL statement cannot be rewritten: what it reads it copies (CREATE ... AS, REFRESH),
        # evaluates over the stored rows and may show in its errors (ALTER COLUMN ... TYPE, a new
        # unique key or foreign key), or renames (utility.ddl_reads).
        raise Refused(f"{subject} would be read unprotected by a DDL statement under purpose \"{plan.purpose}\" "
                      "(copied by CREATE ... AS, SELECT INTO or REFRESH MATERIALIZED VIEW, evaluated over the "
                      "stored rows by ALTER COLUMN ... TYPE or a new key, whose errors show values, or renamed or "
                      "moved by RENAME or SET SCHEMA, after which the catalog knows it by its new name only)",
                      hint="Only read such data; change such columns under a purpose that may read them in the clear.")
    if st.kind is Kind.EXPLAIN:  # only EXPLAIN ANALYZE reads (the analysis copies its statement's reads)
        # Its row counts come from inside the rewritten statement: rows the consent filter removes
        # are counted before the filter, and conditions on masked columns before the mask (a hunt
        # told withdrawn members from absent ones, and confirmed guesses of their attributes).
        raise Refused(f"{subject} would be read by EXPLAIN ANALYZE under purpose \"{plan.purpose}\", whose row "
                      "counts show what the rewrite hides (rows filtered by consent, conditions on masked values)",
                      hint="Run EXPLAIN without ANALYZE, or the statement itself.")
    if st.kind is Kind.COPY_TO and (aggregated or masked):
        raise Refused(f"{subject} would be copied out of its protection by COPY ... TO under purpose "
                      f"\"{plan.purpose}\"", hint="Use SELECT to read masked or aggregated data.")
    if st.kind in (Kind.INSERT, Kind.UPDATE, Kind.MERGE):
        for c in masked:
            if st.columns[c] & (Use.PROJECT | Use.WHOLE_ROW):
                what = {"merge": "a MERGE"}.get(st.kind.value, f"an {st.kind.value.upper()}")
                raise Refused(f"column {c} is masked under purpose \"{plan.purpose}\", and {what} statement would "
                              f"write it into a table or return it, out of its protection",
                              hint="Do not write or return masked columns in INSERT, UPDATE or MERGE.")
    refs = list(all_refs(statement_refs(st)))
    for ref in refs:
        tp = plan.tables.get(ref.table)
        if not ref.target or tp is None:
            continue
        for c in masked:
            if Table(c.schema, c.table) == ref.table:
                raise Refused(f"column {c} is masked under purpose \"{plan.purpose}\", and it is read in a statement "
                              f"that writes {ref.table}, whose rows the rewrite cannot mask (WHERE, SET, RETURNING "
                              f"or ON CONFLICT of the {ref.statement.upper()})",
                              hint=f"Do not read {c} in the {ref.statement.upper()}; select the rows by unmasked "
                                   "columns.")
    for table in tables:
        # (a table read through a partition or inheritance child of it is rewritten where the child stands)
        if not any(r.table == table or table in ctx.schema.ancestors(r.table.schema, r.table.name) for r in refs):
            raise Refused(f"{table} must be read through the rewrite under purpose \"{plan.purpose}\" "
                          f"({_why_table(plan.tables[table])}), but the statement reads it in a way the rewrite "
                          f"cannot substitute", hint="Use SELECT ... FROM the table instead.")
    chain = []
    inner: StatementAccess | None = st
    while inner is not None:
        chain.append(inner)
        inner = inner.inner
    for c in aggregated:
        if not any(c in call.columns for call in all_calls(chain)):
            raise Refused(f"column {c} is allowed only in aggregates under purpose \"{plan.purpose}\", but the "
                          f"rewrite cannot find the aggregate that reads it")


def _subject_of(tables, aggregated, masked) -> str:
    if masked:
        return f"masked column {masked[0]}"
    if aggregated:
        return f"column {aggregated[0]} (allowed only in aggregates)"
    table = next(iter(tables))
    return f"consent-filtered data of {table}"


def _why_table(tp: TablePlan) -> str:
    parts = []
    if tp.masks:
        parts.append("masked columns " + ", ".join(sorted(tp.masks)))
    if tp.consent:
        parts.append("rows filtered by consent")
    return "; ".join(parts)


def check_search_path(ref: RelationRef, ctx: Context) -> None:
    """An inlined view definition is read under the session's search_path: the functions it calls must
    resolve as they did for the view (pg_catalog first, no other schema on the path with the same names)."""
    path = ctx.path
    if not path or path[0] != "pg_catalog":
        raise Refused(f"view {ref.table} must be inlined to mask what it reads, but the session's search_path "
                      "puts pg_catalog after other schemas",
                      hint="Leave pg_catalog out of search_path (it is then searched first).")
    for fn in sorted(ref.functions):
        schema, _, name = fn.rpartition(".")
        if schema != "pg_catalog":
            continue
        for other in path[1:]:
            if ctx.schema.function(other, name) is not None:
                raise Refused(f"view {ref.table} must be inlined to mask what it reads, but function {name} it "
                              f"calls could resolve to {other}.{name} under the session's search_path",
                              hint=f"Remove {other} from search_path for this statement.")


# -- 3. the substitutions -----------------------------------------------------------------------

def consent_condition(source: ConsentSource, mode: str, purpose: str, subject_sql: str,
                      below: tuple[str, ...] = ()) -> str:
    """True for rows whose subject may be used under ``purpose``: no withdrawal of it, of a purpose above it
    or of one of the purposes ``below`` it (a statement under ``marketing`` may serve any of its children,
    so a member who withdrew from ``marketing.email`` is not used under it either), and, opt-in, a consent to
    it or a purpose above it. With ``recorded_at``, only each subject's latest record per purpose counts.
    Evaluated by PostgreSQL, so a withdrawal holds from the next statement on.

    >>> src = ConsentSource(Table("privacy", "consents"), "member_id", "purpose", "status", ("withdrawn",))
    >>> consent_condition(src, "opt_out", "marketing.email", "__pp_row.member_id")  # doctest: +NORMALIZE_WHITESPACE
    "(NOT EXISTS (SELECT 1 FROM privacy.consents AS __pp_consent WHERE __pp_consent.member_id
      OPERATOR(pg_catalog.=) __pp_row.member_id AND (__pp_consent.purpose OPERATOR(pg_catalog.=) 'marketing.email'
      OR __pp_consent.purpose OPERATOR(pg_catalog.=) 'marketing') AND (__pp_consent.status OPERATOR(pg_catalog.=)
      'withdrawn')))"
    """
    table = qualified(source.table)
    subject, purpose_col, status = (f"{CONSENT}.{quote_ident(x)}" for x in (source.subject, source.purpose,
                                                                             source.status))
    above = v.ancestors(purpose)

    def decided(values: tuple, purposes: tuple) -> str:
        cond = [equals(subject, subject_sql), any_of(purpose_col, purposes), any_of(status, values)]
        if source.recorded_at:
            at = quote_ident(source.recorded_at)
            later = (f"NOT EXISTS (SELECT 1 FROM {table} AS {LATER} WHERE "
                     f"{equals(f'{LATER}.{quote_ident(source.subject)}', subject)} AND "
                     f"{equals(f'{LATER}.{quote_ident(source.purpose)}', purpose_col)} AND "
                     f"{LATER}.{at} OPERATOR(pg_catalog.>) {CONSENT}.{at})")
            cond.append(later)
        return f"EXISTS (SELECT 1 FROM {table} AS {CONSENT} WHERE {' AND '.join(cond)})"

    out = f"NOT {decided(source.withdrawn, above + below)}"
    if mode == "opt_in":
        out = f"{decided(source.granted, above)} AND {out}"
    for further in source.further:
        out += f" AND NOT {further_withdrawal(further, purpose, subject_sql)}"
    return f"({out})"


def further_withdrawal(source: FurtherSource, purpose: str, subject_sql: str) -> str:
    """True when a row of a further consent source withdraws the subject from ``purpose``: it is revoked
    (``revoked`` not NULL, or ``status`` one of ``withdrawn``) or, with ``scope``, its scope is not
    ``purpose`` or a purpose above it (a statement under ``marketing`` may serve any purpose under it, so
    only a scope covering ``marketing`` itself covers it). With ``recorded_at``, only the subject's latest
    row counts.

    A NULL scope must not read as consent: ``=`` with NULL gives NULL, an OR of NULLs and falses is NULL
    and NOT NULL is NULL (sections 9.2 and 9.1 of the PostgreSQL documentation), which the EXISTS' WHERE
    treats as false, so ``IS NOT TRUE`` counts a NULL scope as covering nothing. A NULL status is not a
    revocation, as in the consent table. A NULL ``recorded_at`` is never earlier than another row, so such
    a row always counts.

    >>> g = FurtherSource(Table("member", "guardian_consents"), "member_id", revoked="revoked_at", scope="scope")
    >>> further_withdrawal(g, "marketing.email", "__pp_row.member_id")  # doctest: +NORMALIZE_WHITESPACE
    "EXISTS (SELECT 1 FROM member.guardian_consents AS __pp_further WHERE __pp_further.member_id
     OPERATOR(pg_catalog.=) __pp_row.member_id AND (__pp_further.revoked_at IS NOT NULL OR
     (__pp_further.scope OPERATOR(pg_catalog.=) 'marketing.email' OR __pp_further.scope OPERATOR(pg_catalog.=)
     'marketing') IS NOT TRUE))"
    """
    table = qualified(source.table)
    subject = f"{FURTHER}.{quote_ident(source.subject)}"
    withdraws = []
    if source.revoked:
        withdraws.append(f"{FURTHER}.{quote_ident(source.revoked)} IS NOT NULL")
    if source.status:
        withdraws.append(any_of(f"{FURTHER}.{quote_ident(source.status)}", source.withdrawn))
    if source.scope:
        withdraws.append(f"{any_of(f'{FURTHER}.{quote_ident(source.scope)}', v.ancestors(purpose))} IS NOT TRUE")
    cond = [equals(subject, subject_sql), "(" + " OR ".join(withdraws) + ")"]
    if source.recorded_at:
        at = quote_ident(source.recorded_at)
        cond.append(f"NOT EXISTS (SELECT 1 FROM {table} AS {LATER} WHERE "
                    f"{equals(f'{LATER}.{quote_ident(source.subject)}', subject)} AND "
                    f"{LATER}.{at} OPERATOR(pg_catalog.>) {FURTHER}.{at})")
    return f"EXISTS (SELECT 1 FROM {table} AS {FURTHER} WHERE {' AND '.join(cond)})"


def purposes_below(ctx: Context) -> tuple[str, ...]:
    """The registered purposes under the statement's purpose (their withdrawals count under it too)."""
    purpose = ctx.plan.purpose
    return tuple(p for p in ctx.policy.purposes.descendants(purpose) if p != purpose)


def lineage_subject(table: Table, ctx: Context) -> str | None:
    """The name of ``table``'s data-subject column: the catalog's ``subject`` of the table or, for a partition
    or inheritance child, of its ancestors (their rows are its rows, the column of the same name its column).
    Entries that name different columns are refused: the rewrite would not know whose consent counts."""
    names = ctx.policy.catalog.subjects_of((table, *ctx.schema.ancestors(table.schema, table.name)))
    if len(names) > 1:
        raise Refused(f"the catalog names different subject columns ({', '.join(names)}) for {table} and the "
                      f"tables it is a partition or inheritance child of",
                      hint=f"Give {table} the subject column of its parent in catalog.yaml, or none.")
    return names[0] if names else None


def subject_column(table: Table, ctx: Context) -> str:
    """The name of ``table``'s data-subject column (``lineage_subject``), checked against the schema."""
    name = lineage_subject(table, ctx)
    rel = ctx.schema.relation(table.schema, table.name)
    if name is None or rel is None or name not in rel.columns:
        raise Refused(f"rows of {table} must be filtered by consent, but its subject column "
                      f"{name or '(none)'} is not in the table")
    return name


def derived_table(ref: RelationRef, tp: TablePlan, ctx: Context, row_id: bool = False) -> str:
    """The text that replaces ``ref``: a derived table with the relation's columns, masked, and its rows
    filtered by consent; named like the reference (its alias stays where it is). ``row_id`` adds the
    relation's ctid as ``__pp_ctid`` (see ``repetition_checks``)."""
    rel = ctx.schema.relation(ref.table.schema, ref.table.name)
    if rel is None or not rel.columns:
        raise Refused(f"{ref.table} must be rewritten, but its columns are unknown")
    items = []
    for col in rel.columns:
        src = f"{ROW}.{quote_ident(col)}"
        method = tp.masks.get(col)
        if method is None:
            items.append(src)
            continue
        try:
            items.append(f"{mask_sql(src, method, rel.type_of(col), ctx.plan.purpose)} AS {quote_ident(col)}")
        except MaskError as exc:
            raise Refused(f"column {ref.table}.{col} cannot be masked ({method}): {exc}") from None
    if row_id:
        items.append(f"{ROW}.ctid AS {ROW_ID}")
    where = ""
    if tp.consent:
        subject = subject_column(ref.table, ctx)
        where = " WHERE " + consent_condition(ctx.plan.consent, tp.consent, ctx.plan.purpose,
                                              f"{ROW}.{quote_ident(subject)}", purposes_below(ctx))
        if ctx.plan.consent.barrier:  # (without the barrier PostgreSQL pushes the conditions down itself)
            where += pushed_down(ref, tp, rel)
    only = "ONLY " if ref.only else ""
    # OFFSET 0 keeps the statement's own predicates out of the derived table (a barrier, like a
    # security_barrier view's): PostgreSQL evaluates them only on rows the consent filter kept.
    fence = " OFFSET 0" if tp.consent and ctx.plan.consent.barrier else ""
    body = f"(SELECT {', '.join(items)} FROM {only}{qualified(ref.table)} AS {ROW}{where}{fence})"
    return _named(ref, body)


def pushed_down(ref: RelationRef, tp: TablePlan, rel) -> str:
    """`` AND col = constant`` inside a consent-filtered derived table for each such conjunct of
    the statement's WHERE on the reference (``RelationRef.pushable``), so that the barrier
    (OFFSET 0) does not turn a lookup by key into a scan of the whole table.

    PostgreSQL pushes only leakproof conditions into a security-barrier view; these are the
    same kind: an unmasked column of a type whose ``=`` is leakproof against a constant. The
    statement's own WHERE still applies outside, so rows and results do not change.

    >>> from proxy.analysis.model import RelationRef, Table
    >>> from proxy.analysis.schema import RelationInfo
    >>> r = RelationRef(Table("crm", "m"), "table", None, pushable=[(0, 30, 31, "int"), (1, 40, 45, "str")])
    >>> info = RelationInfo("crm", "m", columns=("id", "email"), types=("integer", "text"))
    >>> pushed_down(r, TablePlan(Table("crm", "m"), masks={"email": "redact"}), info)
    ' AND __pp_row.id OPERATOR(pg_catalog.=) \\x00C30:31\\x00'
    """
    out = []
    for i, start, end, kind in ref.pushable:
        if i >= len(rel.columns) or rel.columns[i] in tp.masks:
            continue
        if kind not in _PUSHABLE_TYPES.get(rel.type_of(rel.columns[i]) or "", ()):
            continue
        test = f" AND {ROW}.{quote_ident(rel.columns[i])} OPERATOR(pg_catalog.=) {copy_of(start, end)}"
        if test not in out:
            out.append(test)
    return "".join(out)


def _named(ref: RelationRef, body: str) -> str:
    if ref.table_command:
        return f"SELECT * FROM {body} AS {quote_ident(ref.table.name)}"
    return body if ref.alias is not None else f"{body} AS {quote_ident(ref.table.name)}"


def inline_view(ref: RelationRef, edits: list[Edit], ctx: Context) -> str:
    """The text that replaces a view reference: its definition, rewritten, as a derived table with the view's
    column names."""
    rel = ctx.schema.relation(ref.table.schema, ref.table.name)
    if ref.definition is None or rel is None or not rel.columns:
        raise Refused(f"view {ref.table} reads data that must be masked or filtered, and its definition is unknown")
    check_search_path(ref, ctx)
    body = apply_edits(ref.definition, edits)
    cols = ", ".join(quote_ident(c) for c in rel.columns)
    return _named(ref, f"(SELECT * FROM ({body}) AS {VIEW_BODY}({cols}))")


def target_edits(text: str, ref: RelationRef, tp: TablePlan, ctx: Context) -> list[Edit]:
    """A DML target cannot become a derived table: for consent, a top-level UPDATE or DELETE gets the
    condition added to its WHERE (with the barrier, ``CASE WHEN consent THEN (its condition) ELSE false
    END``, so its own condition is evaluated only on rows consent keeps); an INSERT needs none; anything
    else is refused."""
    if not tp.consent:
        return []
    if ref.statement == "insert" and not ref.conflict_update:
        return []
    why = _why_table(tp)
    if ref.statement not in ("update", "delete") or not ref.top_level or ref.problems:
        what = {"insert": "an INSERT ... ON CONFLICT DO UPDATE", "merge": "a MERGE", "update": "an UPDATE",
                "delete": "a DELETE"}.get(ref.statement, ref.statement.upper())
        where = "" if ref.top_level else " in a WITH query"
        problem = f" ({ref.problems[0]})" if ref.problems else ""
        raise Refused(f"{ref.table} has {why} under purpose \"{ctx.plan.purpose}\", and the rewrite cannot keep "
                      f"{what}{where}{problem} to the rows the purpose may use",
                      hint="Write a plain UPDATE or DELETE (not in WITH), with a WHERE clause if needed.")
    if ref.alias is not None and ref.alias.startswith(RESERVED_PREFIX):
        raise Refused(f"the alias {ref.alias} is reserved for purpose-proxy's rewrite")
    subject = subject_column(ref.table, ctx)
    row = quote_ident(ref.alias) if ref.alias is not None else qualified(ref.table)
    cond = consent_condition(ctx.plan.consent, tp.consent, ctx.plan.purpose, f"{row}.{quote_ident(subject)}",
                             purposes_below(ctx))
    if ref.where is not None and ctx.plan.consent.barrier:  # CASE: the statement's condition only on kept rows
        return [(ref.where.start, ref.where.start, f"CASE WHEN {cond} THEN ("),
                (ref.where.end, ref.where.end, ") ELSE false END")]
    if ref.where is not None:
        return [(ref.where.start, ref.where.start, "("), (ref.where.end, ref.where.end, f") AND {cond}")]
    return [(ref.where_at, ref.where_at, clause_at(text, ref.where_at, f"WHERE {cond}"))]


def having_edits(text: str, calls: list[AggregateCall], ctx: Context) -> list[Edit]:
    """``HAVING count(DISTINCT subject) >= k`` (``count(*)`` for a relation without a subject column that is
    its block's only FROM item) on each block aggregating an aggregate-only column. A HAVING already there
    goes behind it, ``CASE WHEN <suppression> THEN (<its condition>) ELSE false END``: AND-ed, PostgreSQL may
    test the client's condition on a small group first, and an error it raises (``1 / (sum(x) - 777) > 0``)
    would tell that group's statistic (CASE evaluates in order, 9.18.1; the aggregates themselves take
    plain columns only, and cannot fail on a value)."""
    plan = ctx.plan
    blocks: dict[int, tuple] = {}
    for call in calls:
        involved = [c for c in call.columns if c in plan.aggregates]
        if not involved:
            continue
        col = min(involved)
        k = max(plan.aggregates[c] for c in involved)
        rule = (f"purpose \"{plan.purpose}\" allows {col} only in aggregates over groups of at least {k}, and the "
                f"rewrite can suppress small groups only where an aggregate takes the plain column of a table in "
                f"the FROM list of its own query")
        if call.ref is None or call.block is None:
            raise Refused(f"{rule}: here {call.why or 'it cannot'}",
                          hint=f"Write e.g. SELECT ..., avg(t.{col.name}) FROM {col.schema}.{col.table} t ... "
                               "GROUP BY ... (no FILTER, CASE or expressions around the column).")
        read = call.ref.table
        if Table(col.schema, col.table) not in (read, *ctx.schema.ancestors(read.schema, read.name)):
            raise Refused(f"{rule}: here the aggregate reads it through another relation")
        count = _group_size(call, ctx, rule)
        entry = blocks.setdefault(id(call.block), (call.block, {}, set()))
        entry[1][count] = max(entry[1].get(count, 0), k)
        if not call.sole:
            entry[2].add(_row_identity(call.ref, ctx))
    edits: list[Edit] = []
    for block, counts, rows in blocks.values():
        cond = " AND ".join([f"{count} OPERATOR(pg_catalog.>=) {k}" for count, k in sorted(counts.items())] + [
            f"pg_catalog.count(*) OPERATOR(pg_catalog.=) pg_catalog.count(DISTINCT {row})" for row in sorted(rows)])
        if block.having is not None:
            edits += [(block.having.start, block.having.start, f"CASE WHEN {cond} THEN ("),
                      (block.having.end, block.having.end, ") ELSE false END")]
        else:
            edits.append((block.having_at, block.having_at, clause_at(text, block.having_at, f"HAVING {cond}")))
    return edits


def repeated_refs(calls: list[AggregateCall], ctx: Context) -> set[int]:
    """The references (ids) whose rows a join may repeat in a group aggregating an aggregate-only column.

    Counting a group's data subjects does not bound what one of them contributes: a join or
    LATERAL that repeats one row a thousand times (``CROSS JOIN LATERAL generate_series(1, CASE
    WHEN id = 500 THEN 1000 ELSE 1 END)``) weights its value out of a sum, and with the rank
    family any value by binary search. So a group of a block with more than one FROM item is
    also suppressed unless it holds each row of the aggregated relation once:
    ``count(*) = count(DISTINCT <ref>.ctid)`` (a partitioned or inherited table's ctids can
    repeat across its parts, which suppresses more groups, never fewer).
    """
    return {id(c.ref) for c in calls if c.ref is not None and not c.sole
            and any(col in ctx.plan.aggregates for col in c.columns)}


def _row_identity(ref: RelationRef, ctx: Context) -> str:
    tp = ctx.plan.tables.get(ref.table)
    column = ROW_ID if tp is not None and tp.substitute else "ctid"
    return f"{quote_ident(ref.name)}.{column}"


def _group_size(call: AggregateCall, ctx: Context, rule: str) -> str:
    ref = call.ref
    subject = lineage_subject(ref.table, ctx)
    rel = ctx.schema.relation(ref.table.schema, ref.table.name)
    if subject is not None and rel is not None and subject in rel.columns:
        i = rel.columns.index(subject)
        name = ref.alias_columns[i] if i < len(ref.alias_columns) else subject
        return f"pg_catalog.count(DISTINCT {quote_ident(ref.name)}.{quote_ident(name)})"
    if call.sole:
        return "pg_catalog.count(*)"
    raise Refused(f"{rule}: here {ref.table} is joined with other relations, which can repeat its rows, and the "
                  f"catalog names no subject column for it to count the people in a group",
                  hint=f"Name the data-subject column of {ref.table} in catalog.yaml (subject:), or aggregate it "
                       "without joins.")


def groupable(column_type: str | None) -> bool:
    """Whether PostgreSQL can group by values of ``column_type`` (as ``format_type`` prints it; None:
    unknown, taken as yes): GROUP BY needs the type's equality operator from a btree or hash operator
    class (json, xml and the geometric types but box's area have none).

    >>> groupable("integer"), groupable("character varying(20)"), groupable("json"), groupable("point[]")
    (True, True, False, False)
    >>> groupable(None), groupable("jsonb")
    (True, True)
    """
    if column_type is None:
        return True
    base = column_type.split("(")[0].strip()
    while base.endswith("[]"):
        base = base[:-2].strip()
    return base not in _UNGROUPABLE_TYPES


def group_additions(group: KeyGroup, rel, tp: TablePlan) -> list[str]:
    """What the rewrite appends to a GROUP BY that holds the primary key of a table it substitutes:
    the columns of the reference the block uses outside aggregates and does not group by (and the
    reference itself when the block uses its whole row).

    PostgreSQL lets a block grouped by a table's primary key use its other columns ungrouped (7.2.3
    "The GROUP BY and HAVING Clauses"; SELECT, GROUP BY clause: functional dependency); a derived
    table has no key, so they must be grouped. Within a group every row has the same key, so the
    same row of the table: grouping by its other columns as well leaves the groups as they were (a
    masked column groups by the masked value the derived table shows, one per row). A column of a
    type without equality cannot be grouped: refused.

    >>> from proxy.analysis.model import RelationRef, Table
    >>> from proxy.analysis.schema import RelationInfo
    >>> rel = RelationInfo("crm", "m", columns=("id", "name", "doc"), types=("integer", "text", "json"),
    ...                    primary_key=("id",))
    >>> ref = RelationRef(Table("crm", "m"), "table", None, alias="p")
    >>> tp = TablePlan(Table("crm", "m"), masks={"name": "partial"})
    >>> group_additions(KeyGroup(ref, 0, 0, frozenset({0}), (0, 1)), rel, tp)
    ['p.name']
    >>> try:
    ...     group_additions(KeyGroup(ref, 0, 0, frozenset({0}), (1, 2)), rel, tp)
    ... except Refused as exc:
    ...     print(str(exc).split(": ")[1].split(", but ")[1])
    PostgreSQL cannot group by its type json
    """
    out = []
    wanted = [i for i in group.used if i not in group.grouped and i < len(rel.columns)]
    for i in wanted:
        column_type = rel.type_of(rel.columns[i])
        if not groupable(column_type):
            raise Refused(f"{rel} must be rewritten ({_why_table(tp)}), and the query groups by its primary key "
                          f"and uses its column {rel.columns[i]} ungrouped: a derived table has no primary key, "
                          f"so the rewrite must group by {rel.columns[i]} too, but PostgreSQL cannot group by its "
                          f"type {column_type}",
                          hint=f"Select {rel.columns[i]} through an aggregate (e.g. (array_agg(x))[1]) or as "
                               "text (x::text), and group by that.")
        name = group.ref.alias_columns[i] if i < len(group.ref.alias_columns) else rel.columns[i]
        out.append(f"{quote_ident(group.ref.name)}.{quote_ident(name)}")
    if group.whole_row:
        bad = [c for c in rel.columns if not groupable(rel.type_of(c))]
        if bad:
            raise Refused(f"{rel} must be rewritten ({_why_table(tp)}), and the query groups by its primary key "
                          f"and uses its whole row ungrouped: a derived table has no primary key, so the rewrite "
                          f"must group by the row too, but PostgreSQL cannot group by the type "
                          f"{rel.type_of(bad[0])} of its column {bad[0]}",
                          hint="Name the columns instead of the whole row.")
        out.append(quote_ident(group.ref.name))
    return out


def group_edits(groups: Iterable[KeyGroup], ctx: Context) -> dict[int, str]:
    """Offset -> the text to insert there (``, p.name, ...``) for each GROUP BY that must name more columns
    because the table whose primary key it holds is substituted (``group_additions``)."""
    out: dict[int, str] = {}
    for group in groups:
        tp = ctx.plan.tables.get(group.ref.table)
        rel = ctx.schema.relation(group.ref.table.schema, group.ref.table.name)
        if tp is None or not tp.substitute or rel is None or group.ref.target:
            continue
        added = group_additions(group, rel, tp)
        if added:
            out[group.at] = out.get(group.at, "") + "".join(f", {a}" for a in added)
    return out


def with_insertions(edits: list[Edit], inserts: dict[int, str]) -> list[Edit]:
    """``edits`` with each text of ``inserts`` inserted at its offset: ahead of another insertion there
    (a HAVING clause added after the GROUP BY list), as one edit, so that their order is fixed.

    >>> with_insertions([(5, 5, " HAVING x"), (0, 1, "y")], {5: ", b", 3: ", c"})
    [(5, 5, ', b HAVING x'), (0, 1, 'y'), (3, 3, ', c')]
    """
    out: list[Edit] = []
    for start, end, new in edits:
        if start == end and start in inserts:
            new = inserts[start] + new
            inserts = {k: v for k, v in inserts.items() if k != start}
        out.append((start, end, new))
    return out + [(at, at, text) for at, text in inserts.items()]


def text_edits(text: str, refs: list[RelationRef], calls: list[AggregateCall], ctx: Context,
               groups: Iterable[KeyGroup] = ()) -> list[Edit]:
    """The edits of one text (a statement, or a view definition): references, DML targets, HAVING clauses
    and GROUP BY lists (``groups``: statements only)."""
    edits: list[Edit] = []
    repeated = repeated_refs(calls, ctx)
    for ref in refs:
        tp = ctx.plan.tables.get(ref.table)
        if ref.target:
            if tp is not None:
                edits += target_edits(text, ref, tp, ctx)
            continue
        if ref.kind in (VIEW, MATERIALIZED_VIEW):
            inner = text_edits(ref.definition or "", ref.inner, ref.aggregates, ctx)
            if inner and ref.kind == MATERIALIZED_VIEW:
                raise Refused(f"materialized view {ref.table} holds copies of data that must be masked, filtered "
                              f"by consent or aggregated under purpose \"{ctx.plan.purpose}\"",
                              hint="Read the tables it is built from instead.")
            if inner:
                if ref.problems or ref.span is None:
                    raise Refused(f"view {ref.table} must be inlined, but {ref.problems[0]}")
                edits.append((ref.span.start, ref.span.end, inline_view(ref, inner, ctx)))
                continue
        if tp is not None and tp.substitute:
            if ref.problems or ref.span is None:
                raise Refused(f"{ref.table} must be rewritten under purpose \"{ctx.plan.purpose}\" "
                              f"({_why_table(tp)}), but {ref.problems[0]}",
                              hint="Give the table an alias and name its columns through the alias; no TABLESAMPLE.")
            edits.append((ref.span.start, ref.span.end, derived_table(ref, tp, ctx, id(ref) in repeated)))
    edits += having_edits(text, calls, ctx)
    return with_insertions(edits, group_edits(groups, ctx))


# -- 4. the rewrite ---------------------------------------------------------------------------------

def rewrite_statement(analysis: Analysis, expl: Explanation, policy: Policy, schema: Schema,
                      search_path: Iterable[str] = ("$user", "public"), role: str = "") -> Decision:
    """The decision for a statement that needs masking, aggregate-only treatment or consent filtering:
    a ``Mask`` with the rewritten SQL, ``Allow`` when nothing needs changing, or a ``Block``."""
    return rewrite_with_edits(analysis, expl, policy, schema, search_path, role)[0]


def rewrite_with_edits(analysis: Analysis, expl: Explanation, policy: Policy, schema: Schema,
                       search_path: Iterable[str] = ("$user", "public"), role: str = "") -> tuple[Decision, list[Edit]]:
    """``rewrite_statement``'s decision and, for a ``Mask``, the text edits that made its SQL
    (the decision cache replays them on statements of the same shape)."""
    try:
        plan = plan_of(analysis, expl, policy, schema)
        if plan.empty:
            return Allow("consent: nothing to filter")
        ctx = Context(policy, schema, effective_search_path(tuple(search_path), role), plan)
        check_functions(expl, ctx)
        statements = list(flatten(analysis.statements))
        for st in statements:
            check_statement(st, ctx)
        refs = [r for st in statements for r in st.references]
        calls = [c for st in statements for c in st.aggregates]
        groups = [g for st in statements for g in st.key_groups]
        edits = text_edits(analysis.sql, refs, calls, ctx, groups)
    except Refused as exc:
        return Block(f"purpose-proxy refused the statement: {exc}", detail=None,
                     hint=exc.hint or "The proxy refuses what it cannot rewrite with certainty.",
                     reason="rewrite-refused"), []
    if not edits:
        if plan.aggregates or any(tp.masks for tp in plan.tables.values()):
            return Block("purpose-proxy refused the statement: it found nothing to rewrite for the masked or "
                         "aggregate-only columns it reads", reason="rewrite-refused"), []
        return Allow("consent: nothing to filter"), []
    methods = sorted({m for tp in plan.tables.values() for m in tp.masks.values()})
    if plan.aggregates:
        methods.append("aggregate")
    if any(tp.consent for tp in plan.tables.values()):
        methods.append("consent")
    reason = "mask" if any(tp.masks for tp in plan.tables.values()) else (
        "aggregate" if plan.aggregates else "consent")
    return Mask(apply_edits(analysis.sql, edits), tuple(methods), reason), edits


def make_rewrite(policy: Policy, schema: Schema, search_path: Iterable[str] = ("$user", "public"),
                 role: str = "", edits: list[Edit] | None = None) -> Callable[[Analysis, Explanation], Decision]:
    """The ``rewrite`` argument of ``decide_statement`` for one session state; the edits of each
    ``Mask`` it returns are added to ``edits`` when given."""
    path = tuple(search_path)

    def rewrite(analysis: Analysis, expl: Explanation) -> Decision:
        decision, made = rewrite_with_edits(analysis, expl, policy, schema, path, role)
        if edits is not None:
            edits.extend(made)
        return decision

    return rewrite
