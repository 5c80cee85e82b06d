"""The statement verdict: turning an ``Analysis`` and a purpose into one ``Decision`` plus an ``Explanation``.

Fail closed throughout: an analysis error or anything ``unsupported`` blocks; an
undeclared user function blocks; personal data without a purpose blocks; any
deny blocks. Masking and aggregate-only use need a SQL rewrite, passed in as
``rewrite``; without one they block too. Explanations name columns, categories
and rule lines, never values from the SQL text.
"""

from __future__ import annotations

import re
from operator import attrgetter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator
from weakref import WeakKeyDictionary

from proxy.analysis.lexer import T, scan, truncate_identifier
from proxy.analysis.model import Analysis, Column, Kind, StatementAccess, Table, Use
from proxy.policy import vocabulary as v
from proxy.policy.decision import Allow, Block, Decision, Mask
from proxy.policy.engine import Policy, RuleDecision

INSUFFICIENT_PRIVILEGE = "42501"
PURPOSE_SETTING = "pii.purpose"

# Statements that are administrative in themselves: they need the admin action.
ADMIN_KINDS = frozenset({Kind.DDL, Kind.CALL, Kind.DO, Kind.TRUNCATE, Kind.OTHER})
# Functions in these schemas are built-ins: they read only their arguments ...
BUILTIN_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
# ... except these, which run SQL text or read tables, files or large objects the
# proxy cannot see. They are refused unless catalog.yaml declares what they read.
OPAQUE_BUILTINS = frozenset({
    "pg_catalog.query_to_xml", "pg_catalog.query_to_xmlschema", "pg_catalog.query_to_xml_and_xmlschema",
    "pg_catalog.cursor_to_xml", "pg_catalog.cursor_to_xmlschema",
    "pg_catalog.table_to_xml", "pg_catalog.table_to_xmlschema", "pg_catalog.table_to_xml_and_xmlschema",
    "pg_catalog.schema_to_xml", "pg_catalog.schema_to_xmlschema", "pg_catalog.schema_to_xml_and_xmlschema",
    "pg_catalog.database_to_xml", "pg_catalog.database_to_xmlschema", "pg_catalog.database_to_xml_and_xmlschema",
    "pg_catalog.pg_read_file", "pg_catalog.pg_read_binary_file", "pg_catalog.pg_ls_dir", "pg_catalog.pg_stat_file",
    "pg_catalog.lo_get", "pg_catalog.lo_export", "pg_catalog.lo_import", "pg_catalog.loread",
    "pg_catalog.lo_open", "pg_catalog.lo_from_bytea", "pg_catalog.lo_put",
    # ts_rewrite(query, select) and ts_stat(sqlquery) run their text argument as a query.
    "pg_catalog.ts_rewrite", "pg_catalog.ts_stat",
})
# Catalog relations whose rows hold values of other tables' columns (planner statistics:
# most common values, histogram bounds) or other sessions' statement texts. Refused: the
# proxy cannot tell whose personal data they show.
OPAQUE_RELATIONS = {
    "pg_catalog.pg_stats": "holds sample values of every column (planner statistics)",
    "pg_catalog.pg_stats_ext": "holds sample values of columns (extended statistics)",
    "pg_catalog.pg_stats_ext_exprs": "holds sample values of expressions (extended statistics)",
    "pg_catalog.pg_statistic": "holds sample values of every column (planner statistics)",
    "pg_catalog.pg_statistic_ext_data": "holds sample values of columns (extended statistics)",
}
# Columns of catalog relations that hold other sessions' statement texts (and the literal
# values written in them).
OPAQUE_COLUMNS = {
    "pg_catalog.pg_stat_activity.query": "holds the statement texts of other sessions",
}

USE_NAMES = ((Use.PROJECT, "project"), (Use.FILTER, "filter"), (Use.WHOLE_ROW, "whole_row"),
             (Use.AGGREGATE, "aggregate"), (Use.WRITE, "write"), (Use.DELETE, "delete"))
ROW_LEVEL = Use.PROJECT | Use.FILTER | Use.WHOLE_ROW
_COLUMN_ORDER = attrgetter("schema", "table", "name")  # Column's own order (its fields, in turn)

Rewrite = Callable[[Analysis, "Explanation"], Decision]


# -- small pure helpers -----------------------------------------------------------------------

def use_names(use: Use) -> tuple[str, ...]:
    """The names of the uses in a flag set.

    >>> use_names(Use.PROJECT | Use.FILTER)
    ('project', 'filter')
    """
    names = _USE_NAMES_BY_VALUE.get(use._value_)
    if names is None:
        names = _USE_NAMES_BY_VALUE[use._value_] = tuple(name for flag, name in USE_NAMES if use & flag)
    return names


_USE_NAMES_BY_VALUE: dict[int, tuple[str, ...]] = {}  # at most one entry per combination of flags


def actions_for(use: Use) -> tuple[str, ...]:
    """The policy actions a use needs: read (project, filter, whole row, aggregate) and/or write (write, delete).

    >>> actions_for(Use.WRITE | Use.PROJECT), actions_for(Use.DELETE)
    (('read', 'write'), ('write',))
    """
    return tuple(a for a, needed in ((v.READ, use.reads), (v.WRITE, use.writes)) if needed)


def aggregate_only(use: Use) -> bool:
    """True when the column is read only inside aggregate functions.

    >>> aggregate_only(Use.AGGREGATE), aggregate_only(Use.AGGREGATE | Use.FILTER)
    (True, False)
    """
    return bool(use & Use.AGGREGATE) and not use & ROW_LEVEL


def strictest(decisions: Iterable[RuleDecision]) -> RuleDecision | None:
    """The most restrictive of several rule decisions (deny > aggregate > mask > allow).

    >>> strictest([RuleDecision("allow"), RuleDecision("mask", "hash"), RuleDecision("mask", "redact")]).label
    'mask(redact)'
    """
    return min(decisions, key=lambda d: v.precedence(d.effect, d.method, d.k), default=None)


def flatten(statements: Iterable[StatementAccess]) -> Iterator[StatementAccess]:
    """Every statement with its inner statements (PREPARE, DECLARE, EXPLAIN ANALYZE), depth first."""
    for st in statements:
        while st is not None:
            yield st
            st = st.inner


_LITERAL = re.compile(
    r"(?:[EeBbXxNn]|[Uu]&)?'((?:[^']|'')*)'"  # string constants, with prefixes
    r"|\$((?:[A-Za-z_][A-Za-z0-9_]*)?)\$(.*?)\$\2\$"  # dollar-quoted
    r"|(?<![A-Za-z_\d.])(\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?)",  # numbers
    re.S,
)


def literals_of(sql: str) -> list[str]:
    r"""The literal values in ``sql`` (contents of strings, dollar quotes, numbers), as written and as
    decoded, longest first.

    Messages from the parser and the analysis echo the decoded value (sqlglot is given the lexer's:
    ``E'a\x40b'`` is ``a@b`` there), so escaped strings are decoded as PostgreSQL would, with
    ``standard_conforming_strings`` on and off (a refusal's message goes to the audit log).

    >>> literals_of("SELECT 'a@b.jp', $$x y$$, 4111111111111111 FROM t WHERE n = 'O''Brien'")
    ['4111111111111111', "O''Brien", "O'Brien", 'a@b.jp', 'x y']
    >>> literals_of(r"SELECT E'k\x40m.example', U&'40\0030' FROM t")
    ['k\\x40m.example', 'k@m.example', '40\\0030', '400']
    >>> literals_of("SELECT 1 FROM U&'!0041B' UESCAPE '!', $é$x y$é$, 'C'\n'D'")
    ['!0041B', 'x y', 'AB', 'CD']
    """
    found: set[str] = set()
    for m in _LITERAL.finditer(sql):
        for value in (m.group(1), m.group(3), m.group(4)):
            if value:
                found.add(value)
                if "''" in value:
                    found.add(value.replace("''", "'"))
    # And as the lexer reads them: decoded escapes (E'', U&'' with UESCAPE), dollar tags of any
    # letters, constants continued across lines ('a'<newline>'b' is 'ab'); and cut to 63 bytes, as
    # a value read as a name is (a hunt found each of these in a refusal's message).
    for scs in (True, False) if "\\" in sql else (True,):
        try:
            found.update(t.value for t in scan(sql, scs) if t.kind in _VALUE_KINDS)
        except Exception:  # unreadable to the lexer: the forms as written are all there is
            pass
    found.update([truncate_identifier(x) for x in found if len(x) >= 16])
    return sorted((x for x in found if len(x) >= 2), key=lambda x: (-len(x), x))


_VALUE_KINDS = frozenset({T.STRING, T.BITSTRING, T.HEXSTRING, T.NUMBER})


def scrub(text: str, sql: str, limit: int = 300) -> str:
    """``text`` with every literal value of ``sql`` replaced by ``?`` (and cut to ``limit`` characters).

    >>> scrub("cannot analyse near 'secret@example.com'", "SELECT 'secret@example.com'")
    "cannot analyse near '?'"
    >>> scrub("Unknown option CANARY-X. Line 1", "INSERT INTO t VALUES (1) ON CONFLICT 'canary-x'")
    'Unknown option ?. Line 1'
    """
    for literal in literals_of(sql):
        if literal:  # any case: sqlglot upper-cases what it quotes back ("Unknown option X")
            text = re.sub(re.escape(literal), "?", text, flags=re.IGNORECASE)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _quote_list(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- the explanation ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CategoryDecision:
    """The rule decision for one category of a column and one action."""

    category: str
    action: str
    decision: RuleDecision

    def to_dict(self) -> dict:
        return {"category": self.category, "action": self.action, **self.decision.to_dict()}


@dataclass(frozen=True, slots=True)
class ColumnExplanation:
    """How the statement uses one column, its categories, the decisions and the column's outcome.

    ``outcome`` is ``not personal``, ``allow``, ``mask``, ``aggregate`` or ``block``.
    """

    column: str
    uses: tuple[str, ...]
    categories: tuple[str, ...]
    decisions: tuple[CategoryDecision, ...]
    outcome: str
    method: str | None = None  # for mask
    k: int | None = None  # for aggregate
    via: tuple[str, ...] = ()  # declared functions through which the column is read
    note: str = ""

    def to_dict(self) -> dict:
        out = {"column": self.column, "uses": list(self.uses), "categories": list(self.categories),
               "decisions": [d.to_dict() for d in self.decisions], "outcome": self.outcome}
        if self.method:
            out["method"] = self.method
        if self.k is not None:
            out["k"] = self.k
        if self.via:
            out["via"] = list(self.via)
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True, slots=True)
class Requirement:
    """A column that may leave the database only transformed: masked (method) or aggregated (k)."""

    column: str
    category: str
    effect: str  # mask | aggregate
    method: str | None
    k: int | None
    rules: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"mask({self.method})" if self.effect == v.MASK else f"aggregate(k={self.k})"


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a statement got its verdict: purpose, every column touched, the decisions and rules.

    Rendered by ``to_text()`` for people and ``to_dict()`` for JSON. It never holds the
    SQL text or any value from it.
    """

    role: str
    purpose: str | None
    purpose_source: str  # declared | default | none | unknown (an unknown name is not repeated)
    policy_version: str
    statements: tuple[str, ...]
    columns: tuple[ColumnExplanation, ...] = ()
    relations: tuple[str, ...] = ()  # tables used without columns (e.g. count(*))
    functions: tuple[str, ...] = ()
    checks: tuple[tuple[str, RuleDecision], ...] = ()  # ("declare", ...), ("admin", ...)
    requirements: tuple[Requirement, ...] = ()
    verdict: str = "block"  # allow | mask | block
    reason: str = ""
    message: str = ""
    sqlstate: str | None = None
    detail: str | None = None
    hint: str | None = None

    @property
    def masks(self) -> tuple[Requirement, ...]:
        return tuple(r for r in self.requirements if r.effect == v.MASK)

    @property
    def aggregates(self) -> tuple[Requirement, ...]:
        return tuple(r for r in self.requirements if r.effect == v.AGGREGATE)

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "message": self.message,
            "sqlstate": self.sqlstate,
            "detail": self.detail,
            "hint": self.hint,
            "role": self.role,
            "purpose": self.purpose,
            "purpose_source": self.purpose_source,
            "policy_version": self.policy_version,
            "statements": list(self.statements),
            "checks": [{"check": name, **d.to_dict()} for name, d in self.checks],
            "columns": [c.to_dict() for c in self.columns],
            "relations": list(self.relations),
            "functions": list(self.functions),
            "requirements": [{"column": r.column, "category": r.category, "effect": r.effect, "method": r.method,
                              "k": r.k, "rules": list(r.rules)} for r in self.requirements],
        }

    def to_text(self) -> str:
        head = f"verdict: {self.verdict}"
        if self.verdict == "block":
            head += f" ({self.sqlstate}): {self.message}"
        elif self.message:
            head += f": {self.message}"
        lines = [head]
        if self.detail:
            lines += ["  detail: " + line for line in self.detail.splitlines()]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        purpose = (f"{self.purpose} ({self.purpose_source})" if self.purpose
                   else "unknown" if self.purpose_source == "unknown" else "none declared")
        lines.append(f"role: {self.role}  purpose: {purpose}  policy: {self.policy_version}")
        lines.append(f"statements: {', '.join(self.statements) or '-'}")
        for name, d in self.checks:
            lines.append(f"{name}: {d.label}  {d.why}")
        if self.functions:
            lines.append(f"functions: {', '.join(self.functions)}")
        if self.relations:
            lines.append(f"relations without columns: {', '.join(self.relations)}")
        if self.columns:
            lines.append("columns:")
        for c in self.columns:
            via = f" via {', '.join(c.via)}" if c.via else ""
            lines.append(f"  {c.column}  [{', '.join(c.uses)}]{via}  -> {c.outcome}"
                         + (f" ({c.method})" if c.method else "") + (f" (k={c.k})" if c.k is not None else "")
                         + (f": {c.note}" if c.note else ""))
            for d in c.decisions:
                lines.append(f"    {d.category} {d.action}: {d.decision.label}  {d.decision.why}")
        return "\n".join(lines)


def with_runs(expl: Explanation, runs: Iterable[Explanation]) -> Explanation:
    """``expl`` (of an EXECUTE) with what the prepared statements it runs read: their columns,
    relations, functions and requirements, each once. The EXECUTE's own verdict, kinds and
    checks stay: the runs were decided (and rewritten) at their PREPARE.

    >>> col = ColumnExplanation("billing.cards.number", ("read",), ("payment_card",), (), "mask", "redact")
    >>> run = Explanation("app", "billing", "declared", "v1", ("select",), (col,), verdict="mask")
    >>> execute = Explanation("app", "billing", "declared", "v1", ("execute",), verdict="allow")
    >>> both = with_runs(execute, [run, run])
    >>> both.statements, both.verdict, [c.column for c in both.columns]
    (('execute',), 'allow', ['billing.cards.number'])
    """
    columns = dict.fromkeys(expl.columns)
    relations = dict.fromkeys(expl.relations)
    functions = dict.fromkeys(expl.functions)
    requirements = dict.fromkeys(expl.requirements)
    for run in runs:
        columns.update(dict.fromkeys(run.columns))
        relations.update(dict.fromkeys(run.relations))
        functions.update(dict.fromkeys(run.functions))
        requirements.update(dict.fromkeys(run.requirements))
    return replace(expl, columns=tuple(columns), relations=tuple(relations), functions=tuple(functions),
                   requirements=tuple(requirements))


# -- the verdict --------------------------------------------------------------------------------

Outcome = tuple[Decision, Explanation]


@dataclass(slots=True)
class _Touch:
    use: Use = Use.NONE
    via: set[str] = field(default_factory=set)


def _block(expl: Explanation, message: str, reason: str, detail: str | None = None, hint: str | None = None
           ) -> Outcome:
    block = Block(message, INSUFFICIENT_PRIVILEGE, detail=detail, hint=hint, reason=reason,
                  extra={"policy_version": expl.policy_version, "purpose": expl.purpose or ""})
    return block, replace(expl, verdict="block", reason=reason, message=message, sqlstate=INSUFFICIENT_PRIVILEGE,
                          detail=detail, hint=hint)


def _declare_hint(policy: Policy, role: str) -> str:
    purposes = policy.declarable_purposes(role)
    if not purposes:
        return f"Role {role} may not declare any purpose; ask the data protection team."
    return f"SET {PURPOSE_SETTING} = '<purpose>' first; role {role} may declare: {_quote_list(purposes)}."


def _analysis_block(analysis: Analysis, statements: list[StatementAccess], expl: Explanation) -> Outcome | None:
    """Step 1: the analysis must vouch for the statement (no error, nothing unsupported)."""
    if analysis.error is not None:
        why = scrub(analysis.error, analysis.sql)
        return _block(expl, f"purpose-proxy could not analyse the statement with certainty: {why}",
                      "analysis-error", hint="The proxy refuses what it cannot analyse (fail closed).")
    reasons = [scrub(r, analysis.sql) for st in statements for r in st.unsupported]
    if reasons:
        return _block(expl, f"purpose-proxy could not analyse the statement with certainty: {reasons[0]}",
                      "unsupported", detail="\n".join(reasons[1:]) or None,
                      hint="The proxy refuses what it cannot analyse (fail closed); "
                           "rewrite the statement without the construct named.")
    return None


def _touched(statements: list[StatementAccess], policy: Policy, expl: Explanation
             ) -> tuple[dict[Column, _Touch], Explanation, Outcome | None]:
    """Step 2: the columns used, including what declared functions read or write; undeclared functions block."""
    touched: dict[Column, _Touch] = {}
    for st in statements:
        for col, use in st.columns.items():
            touched.setdefault(col, _Touch()).use |= use
    casts = {f.lower() for st in statements for f in st.cast_functions}
    implicit: dict[str, str] = {}
    for st in statements:
        for f, why in st.implicit_functions.items():
            implicit.setdefault(f.lower(), why)
    functions = sorted({f.lower() for st in statements for f in st.functions} | casts | implicit.keys())
    expl = replace(expl, functions=tuple(functions))
    for name in functions:
        entry = policy.catalog.functions.get(name)
        if entry is None:
            schema = name.partition(".")[0] if "." in name else ""
            if schema in BUILTIN_SCHEMAS and name not in OPAQUE_BUILTINS:
                continue
            if name in OPAQUE_BUILTINS:
                return touched, expl, _block(
                    expl, f"function {name} runs SQL or reads data the proxy cannot see", "function",
                    hint="Query the tables directly, or declare what the function reads in catalog.yaml.")
            if name in casts or name in implicit:  # code the statement does not name
                where, what = (("is behind a cast, which PostgreSQL may apply in any statement", "the cast")
                               if name in casts else
                               (f"{implicit[name]}, which PostgreSQL runs without the statement naming it",
                                "the object that runs it"))
                return touched, expl, _block(
                    expl, f"function {name} {where}, and it is not declared in the policy catalog, so the proxy "
                          f"cannot tell which personal data it reads", "function",
                    hint="Declare the function under 'functions:' in catalog.yaml with the columns it reads "
                         f"(reads: [] if none), or drop {what}.")
            return touched, expl, _block(
                expl, f"function {name} is not declared in the policy catalog, so the proxy cannot tell which "
                      f"personal data it reads", "function",
                hint="Declare the function under 'functions:' in catalog.yaml with the columns it reads.")
        for cols, use in ((entry.reads, Use.PROJECT), (entry.writes, Use.WRITE)):
            for col in cols:
                t = touched.setdefault(col, _Touch())
                t.use |= use
                t.via.add(name)
    used = {f"{c.schema}.{c.table}" for c in touched} | {str(t) for st in statements for t in st.tables}
    opaque = [(name, OPAQUE_RELATIONS[name]) for name in sorted(used & OPAQUE_RELATIONS.keys())]
    opaque += [(name, OPAQUE_COLUMNS[name]) for name in sorted({str(c) for c in touched} & OPAQUE_COLUMNS.keys())]
    for name, why in opaque:
        return touched, expl, _block(
            expl, f"purpose-proxy could not analyse the statement with certainty: {name} {why}",
            "unsupported", hint="The proxy refuses what it cannot analyse (fail closed).")
    tables = {f"{c.schema}.{c.table}" for c in touched}
    relations = sorted({str(t) for st in statements for t in st.tables} - tables)
    return touched, replace(expl, relations=tuple(relations)), None


def _purpose_change_block(statements: list[StatementAccess], needs_purpose: bool, policy: Policy, role: str,
                          expl: Explanation) -> Outcome | None:
    """Step 3: SET pii.purpose must name a purpose the role may declare, in a statement of its own."""
    changes = [value for st in statements for name, value, _ in st.settings if name == PURPOSE_SETTING]
    if changes and needs_purpose:
        return _block(expl, f"{PURPOSE_SETTING} must be set in a statement of its own", "purpose-change",
                      hint=f"Send SET {PURPOSE_SETTING} separately, then the statements that use personal data.")
    for value in changes:
        if not value:
            continue  # RESET, or SET to empty: back to the role's default purpose
        if not policy.is_purpose(value):  # the value is not repeated: it is client text
            return _block(expl, f"unknown purpose in SET {PURPOSE_SETTING} (not in purposes.yaml)",
                          "unknown-purpose", hint=_declare_hint(policy, role))
        declared = policy.may_declare(role, value)
        if not declared.allowed:
            return _block(replace(expl, checks=(("declare", declared),)),
                          f"role \"{role}\" may not act under purpose \"{value}\"", "purpose-not-declarable",
                          detail=f"Declaring {value}: {declared.why}.", hint=_declare_hint(policy, role))
    return None


def _purpose_block(purpose: str | None, personal_names: list[str], admin_kinds: list[str], policy: Policy,
                   role: str, expl: Explanation) -> tuple[Explanation, Outcome | None]:
    """Step 4: a purpose is declared (or defaulted), known, and the role may declare it."""
    if purpose is None:
        what = (f"personal data ({_quote_list(personal_names)})" if personal_names
                else f"an administrative statement ({', '.join(admin_kinds)})")
        return expl, _block(expl, f"no purpose declared: the statement uses {what}", "no-purpose",
                            hint=_declare_hint(policy, role))
    if not policy.is_purpose(purpose):  # not repeated: the name came from the client
        return expl, _block(replace(expl, purpose=None, purpose_source="unknown"),
                            "the declared purpose is unknown (not in purposes.yaml)", "unknown-purpose",
                            hint=_declare_hint(policy, role))
    declare = policy.may_declare(role, purpose)
    expl = replace(expl, checks=(("declare", declare),))
    if not declare.allowed:
        return expl, _block(expl, f"role \"{role}\" may not act under purpose \"{purpose}\"",
                            "purpose-not-declarable", detail=f"Declaring {purpose}: {declare.why}.",
                            hint=_declare_hint(policy, role))
    return expl, None


def _admin_block(admin_kinds: list[str], purpose: str, policy: Policy, role: str, expl: Explanation
                 ) -> tuple[Explanation, Outcome | None]:
    """Step 5: administrative statements need an admin rule for the purpose."""
    if not admin_kinds:
        return expl, None
    admin = policy.may_administer(role, purpose)
    expl = replace(expl, checks=expl.checks + (("admin", admin),))
    if admin.allowed:
        return expl, None
    allowed = [p for p in policy.declarable_purposes(role) if policy.may_administer(role, p).allowed]
    hint = (f"Role {role} may run administrative statements under: {_quote_list(allowed)}." if allowed
            else f"Role {role} may not run administrative statements under any purpose.")
    return expl, _block(expl, f"purpose \"{purpose}\" does not allow administrative statements "
                              f"({', '.join(admin_kinds)})", "admin-denied",
                        detail=f"Administering under {purpose}: {admin.why}.", hint=hint)


def _opaque_code_block(statements: list[StatementAccess], purpose: str, policy: Policy, role: str,
                       expl: Explanation) -> Outcome | None:
    """Step 5b: code the analysis cannot read (a DO block, a procedure, a function or trigger body, a DEFAULT
    or CHECK expression) reads whatever it likes, now or whenever it runs later, in this session or others:
    only a purpose that may read every category in the clear may run or define it."""
    what = next((st.opaque_code for st in flatten(statements) if st.opaque_code), None)
    if what is None:
        return None
    unclear = [c for c in sorted(policy.catalog.categories) if policy.decide(role, purpose, c, v.READ).effect != v.ALLOW]
    if not unclear:
        return None
    return _block(expl, f"purpose \"{purpose}\" may not run or define code the proxy cannot read ({what})",
                  "opaque-code", detail=f"The code could read personal data that {purpose} may not read in the clear, "
                                        f"such as category \"{unclear[0]}\".",
                  hint="Run it under a purpose that may read every category unmasked, or apply schema changes "
                       "outside the proxy.")


def _explain_column(col: Column, t: _Touch, cats: tuple[str, ...], role: str, purpose: str, policy: Policy
                    ) -> tuple[ColumnExplanation, Requirement | None]:
    """Step 6, for one column: a decision per (category, action), and the column's outcome."""
    uses, via = use_names(t.use), tuple(sorted(t.via))
    if not cats:
        return ColumnExplanation(str(col), uses, (), (), "not personal", via=via), None
    actions = actions_for(t.use) or (v.READ,)  # a use the analysis did not name counts as a read
    decisions = tuple(CategoryDecision(cat, act, policy.decide(role, purpose, cat, act))
                      for act in actions for cat in cats)
    reads = [d for d in decisions if d.action == v.READ]
    read = strictest(d.decision for d in reads)
    base = ColumnExplanation(str(col), uses, cats, decisions, "allow", via=via)
    if any(d.decision.denied for d in decisions):
        return replace(base, outcome="block"), None
    if read is None or read.effect == v.ALLOW:
        return base, None
    category = next(d.category for d in reads if d.decision is read)
    if read.effect == v.AGGREGATE and not aggregate_only(t.use):
        return replace(base, outcome="block", k=read.k, note="allowed only inside aggregate functions"), None
    requirement = Requirement(str(col), category, read.effect, read.method, read.k, read.rules)
    return replace(base, outcome=read.effect, method=read.method, k=read.k), requirement


# Per policy (which is immutable once loaded), the explanations of columns already explained: a
# column's explanation depends on the column, its uses and functions, the role and the purpose only.
_MEMOS: WeakKeyDictionary[Policy, dict] = WeakKeyDictionary()
_MEMO_LIMIT = 50000


def _memo(policy: Policy) -> dict:
    memo = _MEMOS.get(policy)
    if memo is None or len(memo) > _MEMO_LIMIT:
        memo = _MEMOS[policy] = {}
    return memo


def _undecided(memo: dict, key: tuple, cats: tuple[str, ...]) -> ColumnExplanation:
    """The column's explanation before the policy is asked (``key``: column, use, functions)."""
    found = memo.get(key)
    if found is None:
        col, use, via = key
        found = memo[key] = ColumnExplanation(str(col), use_names(use), cats, (),
                                              "undecided" if cats else "not personal", via=via)
    return found


def _explained(memo: dict, key: tuple, cats: tuple[str, ...], role: str, purpose: str, policy: Policy
               ) -> tuple[ColumnExplanation, Requirement | None]:
    """``_explain_column`` of the column ``key`` stands for (column, use, functions), remembered."""
    full = (key, role, purpose)
    found = memo.get(full)
    if found is None:
        col, use, via = key
        found = memo[full] = _explain_column(col, _Touch(use, set(via)), cats, role, purpose, policy)
    return found


def _deny_block(expl: Explanation, purpose: str, role: str, policy: Policy) -> Outcome | None:
    """Step 7: any deny blocks, naming purpose, category, columns, rules and a way forward."""
    denied = [(c.column, d) for c in expl.columns for d in c.decisions if d.decision.denied]
    if not denied:
        return None
    # Name an explicit prohibition when there is one: it is the rule the notice promised.
    first = next((d for _, d in denied if d.decision.rules), denied[0][1])
    message = f"purpose \"{purpose}\" may not {first.action} personal data of category \"{first.category}\""
    detail = "\n".join(f"{col} ({d.category}, {d.action}): {'denied by ' if d.decision.rules else ''}"
                       f"{d.decision.why}" for col, d in denied)
    columns = _quote_list(sorted({col for col, _ in denied}))
    if first.decision.note.startswith("conflicting masks"):  # a deny the rules did not say: name its cause
        return _block(expl, f"{message}: {first.decision.note}", "denied", detail=detail,
                      hint="Keep one of the conflicting mask rules in policy.csv (policies/README.md, "
                           f"'Masking methods'), or remove {columns} from the statement.")
    others = policy.purposes_allowing(role, first.category, first.action)
    if others:
        hint = (f"Declare a purpose that covers {first.category} (role {role} may use: {_quote_list(others)}), "
                f"or remove {columns} from the statement.")
    else:
        hint = f"No purpose role {role} may declare covers {first.category}; remove {columns} from the statement."
    return _block(expl, message, "denied", detail=detail, hint=hint)


# How a row-level use of an aggregate-only column is named in the refusal.
_ROW_LEVEL_USES = {"project": "project (a value in the output)",
                   "filter": "filter (in WHERE, JOIN, GROUP BY, ORDER BY or the like, which reveals its values)",
                   "whole_row": "whole_row (part of a whole-row value)"}


def _aggregate_block(expl: Explanation, purpose: str) -> Outcome | None:
    """Step 8: a column under an aggregate rule used other than inside aggregates blocks."""
    misused = [c for c in expl.columns if c.outcome == "block" and c.k is not None]
    if not misused:
        return None
    first = misused[0]
    d = next(d for d in first.decisions if d.decision.effect == v.AGGREGATE)
    uses = ", ".join(_ROW_LEVEL_USES.get(u, u) for u in first.uses if u != "aggregate")
    message = (f"purpose \"{purpose}\" allows category \"{d.category}\" only inside aggregate functions, "
               f"but {first.column} is used as {uses}")
    detail = "\n".join(
        f"{c.column} ({x.category}): {x.decision.label} by {x.decision.why}; used as "
        f"{', '.join(u for u in c.uses if u != 'aggregate')}"
        for c in misused for x in c.decisions if x.decision.effect == v.AGGREGATE)
    return _block(expl, message, "aggregate-only", detail=detail,
                  hint=f"Use {first.column} only inside aggregates such as count(), sum() or avg(); "
                       f"groups smaller than k={first.k} are suppressed. Grouping by it (GROUP BY), filtering "
                       f"or ordering by it would reveal its values row by row, so those are refused too.")


def _copy_block(statements: list[StatementAccess], purpose: str, policy: Policy, expl: Explanation
                ) -> Outcome | None:
    """Step 8b: personal data may not be stored where the catalog holds nothing personal.

    A value written into a column (INSERT, UPDATE, MERGE, ON CONFLICT) that the catalog
    holds as not personal (a reference table, a temporary table) would be handed to every
    purpose, and so would a notification payload, a setting or a lock key
    (``functions.EXPORTING``), which other sessions, or later statements under another
    purpose, read. A column with categories of its own keeps the copy under the policy:
    the catalog may classify what a table receives differently on purpose (names reported
    to a credit exchange are ``credit.nonpayer`` there). Masked and aggregate-only columns
    are left to the rewrite, which refuses to store them or stores what it made of them.
    """
    rewritten = {r.column for r in expl.requirements}
    for st in statements:
        for target, sources in st.copies.items():
            if isinstance(target, Column) and policy.categories_of(target):
                continue
            for src in sorted(sources, key=_COLUMN_ORDER):
                cats = policy.categories_of(src)
                if not cats or str(src) in rewritten:
                    continue
                where = (target if isinstance(target, str)
                         else f"column {target}, which the catalog holds as not personal")
                message = (f"under purpose \"{purpose}\", {src} (category \"{cats[0]}\") would be copied into "
                           f"{where}, out of the policy's reach")
                return _block(expl, message, "copied-out-of-catalog",
                              hint="Store personal data only in columns the catalog classifies (policies/catalog.yaml), "
                                   "or store only a count of it.")
    return None


def consent_tables(statements: list[StatementAccess], touched: Iterable[Column], policy: Policy,
                    purpose: str | None) -> list[str]:
    """The tables the rewrite must filter by consent (also those touched through declared functions), when
    consent filters rows under ``purpose``: those with a data-subject column, and those with personal columns
    but none (the rewrite refuses them unless an ancestor names one, ``plan_of``)."""
    if policy.consent_mode(purpose) is None:
        return []
    touched = list(touched)
    tables = {(c.schema, c.table) for c in touched}
    tables |= {(t.schema, t.name) for st in statements for t in st.tables}
    personal = {(c.schema, c.table) for c in touched if policy.categories_of(c)}
    # (and tables used for their rows only: count(*) counts the people who withdrew too, hunt 22)
    personal |= {(s, t) for s, t in tables if policy.catalog.holds_personal(Table(s, t))}
    return sorted(f"{s}.{t}" for s, t in tables
                  if policy.catalog.subject_of(Table(s, t)) is not None or (s, t) in personal)


def _rewrite(analysis: Analysis, expl: Explanation, purpose: str, rewrite: Rewrite | None,
             consent: list[str] | None = None) -> Outcome:
    """Step 9: masks, aggregate-only use and consent filtering go to the rewrite; without one, or if it fails, block."""
    requirements = expl.requirements
    if rewrite is None and not requirements:
        return _block(expl, f"rows of {_quote_list(consent or [])} are filtered by per-subject consent under purpose "
                            f"\"{purpose}\"; consent rewrite unavailable", "rewrite-unavailable",
                      hint="Use a purpose that does not depend on consent.")
    if rewrite is None:
        first = requirements[0]
        if first.effect == v.MASK:
            message = (f"column {first.column} requires masking (method {first.method}) under purpose "
                       f"\"{purpose}\"; masking rewrite unavailable")
        else:
            message = (f"column {first.column} may be used only in aggregates with small-group suppression "
                       f"(k={first.k}) under purpose \"{purpose}\"; suppression rewrite unavailable")
        detail = "\n".join(f"{r.column} ({r.category}): {r.label} by {'; '.join(r.rules)}" for r in requirements)
        return _block(expl, message, "rewrite-unavailable", detail=detail,
                      hint="Leave out the column(s) listed, or use a purpose that allows them unmasked.")
    try:
        decision = rewrite(analysis, expl)
    except Exception as exc:  # a failing rewrite must not let the statement through
        return _block(expl, f"masking rewrite failed ({type(exc).__name__}); statement refused", "rewrite-error")
    if isinstance(decision, Mask):
        done = [f"{r.column} {r.label}" for r in requirements]
        if consent and ("consent" in decision.methods or not requirements):
            done.append(f"rows of {_quote_list(consent)} filtered by consent")
        return decision, replace(expl, verdict="mask", reason=decision.reason or "mask",
                                 message=f"rewritten: {', '.join(done)}")
    if isinstance(decision, Allow) and not requirements:
        return decision, replace(expl, verdict="allow", reason=decision.reason or "policy")
    if isinstance(decision, Block):
        return decision, replace(expl, verdict="block", reason=decision.reason or "rewrite", message=decision.message,
                                 sqlstate=decision.sqlstate, detail=decision.detail, hint=decision.hint)
    return _block(expl, "masking rewrite returned no rewritten statement; statement refused", "rewrite-error")


def decide_statement(analysis: Analysis, *, role: str, purpose: str | None, policy: Policy,
                     rewrite: Rewrite | None = None) -> Outcome:
    """Decide one analysed SQL string for ``role`` acting under ``purpose`` (None: not declared).

    Returns Allow, Block, or whatever ``rewrite(analysis, explanation)`` returns when
    columns need masking or aggregate-only treatment, or rows of tables with a
    data-subject column need consent filtering under the purpose (a ``Mask``, a
    ``Block``, or ``Allow`` when there is nothing to filter); without ``rewrite`` those
    statements are blocked. The steps are numbered as in
    policies/README.md ("How a statement is decided").
    """
    purpose = purpose or None
    source = "declared" if purpose else "none"
    if purpose is None and (default := policy.default_purpose(role)):
        purpose, source = default, "default"
    statements = list(flatten(analysis.statements))
    expl = Explanation(role=role, purpose=purpose, purpose_source=source, policy_version=policy.version,
                       statements=tuple(st.kind.value for st in statements))
    if blocked := _analysis_block(analysis, statements, expl):
        return blocked
    touched, expl, blocked = _touched(statements, policy, expl)
    if blocked:
        return blocked

    personal = {c: policy.categories_of(c) for c in touched}
    order = sorted(touched, key=_COLUMN_ORDER)  # as Column sorts itself, without its Python-level __lt__
    memo = _memo(policy)
    keys = {c: (c, touched[c].use, tuple(sorted(touched[c].via)) if touched[c].via else ()) for c in order}
    expl = replace(expl, columns=tuple(_undecided(memo, keys[c], personal[c]) for c in order))
    admin_kinds = sorted({st.kind.value for st in statements if st.kind in ADMIN_KINDS})
    needs_purpose = bool(admin_kinds) or any(personal.values())
    if blocked := _purpose_change_block(statements, needs_purpose, policy, role, expl):
        return blocked
    if not needs_purpose:
        if purpose is not None and policy.is_purpose(purpose) and \
                (consent := consent_tables(statements, touched, policy, purpose)):
            return _rewrite(analysis, expl, purpose, rewrite, consent)
        return Allow("no personal data"), replace(expl, verdict="allow", reason="no personal data")

    personal_names = [str(c) for c in order if personal[c]]
    expl, blocked = _purpose_block(purpose, personal_names, admin_kinds, policy, role, expl)
    if blocked:
        return blocked
    assert purpose is not None
    expl, blocked = _admin_block(admin_kinds, purpose, policy, role, expl)
    if blocked:
        return blocked
    if blocked := _opaque_code_block(statements, purpose, policy, role, expl):
        return blocked

    explained = [_explained(memo, keys[c], personal[c], role, purpose, policy) for c in order]
    expl = replace(expl, columns=tuple(col for col, _ in explained),
                   requirements=tuple(req for _, req in explained if req is not None))
    if blocked := (_deny_block(expl, purpose, role, policy) or _aggregate_block(expl, purpose)
                   or _copy_block(statements, purpose, policy, expl)):
        return blocked
    consent = consent_tables(statements, touched, policy, purpose)
    if expl.requirements or consent:
        return _rewrite(analysis, expl, purpose, rewrite, consent)
    return Allow("policy"), replace(expl, verdict="allow", reason="policy")
