"""The SQL fuzzers' shared pieces (purpose sessions under the seed policy and the sample schema without a database, the
statement corpus, mutations and the decision invariants), used by tests/unit/test_fuzz_sql.py and fuzz/sql.py.

``FuzzSessions`` builds one ``PurposeSession`` per (role, purpose) of ``SESSIONS``
on a stand-in runtime that holds the shipped policy (policies/) and the sample
schema (policies/schema.yaml, which tests/unit/test_sample.py pins to
proxy/devtools/sample/schema.sql). ``check_decision`` runs one statement through
a session, as a Query or a Parse, and through ``enforcement.apply`` onto the
wire: the only outcomes allowed are an ``Allow``, a ``Mask`` with a rewrite, or a
``Block`` (the designed refusal); any exception is a finding, and so is a
refusal that says the analysis crashed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import yaml

from proxy.analysis.access import analyze
from proxy.analysis.schema import Schema
from proxy.enforcement.apply import apply
from proxy.enforcement.hook import SessionInfo, StartupRefused
from proxy.enforcement.purpose import PurposeSession
from proxy.enforcement.runtime import DatabaseState
from proxy.policy.decision import Allow, Block, Mask
from proxy.policy.engine import Policy
from proxy.wire import codec

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
SCHEMA_YAML = POLICIES / "schema.yaml"

# (role, purpose declared at connect time or None for the role's default if any, search_path
# given at connect time or None for the server's "$user", public).
SESSIONS: tuple[tuple[str, str | None, str | None], ...] = (
    ("app_billing", "billing", None), ("app_marketing", "marketing", None), ("app_support", "support", None),
    ("analyst", "statistics", None), ("analyst", "research", "member,billing,browsing,telecom"),
    ("admin", "operations", None), ("trainer", "operator_training", "support,member"),
    ("app_portal", None, None), ("app_exchange", None, "credit,member"), ("nobody", None, None),
    ("app_marketing", "marketing", "member,browsing,public"),
)

# What a refusal may not say: the analysis or the decision crashed instead of deciding.
CRASH_MARKERS = ("internal error in the analysis", "could not decide", "Traceback")


class StaticRuntime:
    """A ``PolicyRuntime`` stand-in: one policy, one schema, no reloads and no I/O."""

    def __init__(self, policy: Policy, schema: Schema, cache=None) -> None:
        self.config = SimpleNamespace(purpose_setting="pii.purpose", decision_cache_size=0)
        self.policy = policy
        self.state = DatabaseState(schema)
        self.cache = cache
        self.refreshes = 0  # a count: a list would grow without bound over a long run
        self.stale: set[str] = set()
        self.changes = 0

    def database(self, name: str) -> DatabaseState:
        return self.state

    def refresh_schema(self, name: str, why: str) -> None:
        self.refreshes += 1

    def schema_changed(self, name: str, why: str) -> None:
        self.refreshes += 1  # no reload here: the static schema is current at once


@dataclass
class FuzzSessions:
    """Purpose sessions for every entry of ``SESSIONS`` on one static runtime."""

    runtime: StaticRuntime
    sessions: list[PurposeSession] = field(default_factory=list)

    @classmethod
    def load(cls, cache=None) -> "FuzzSessions":
        runtime = StaticRuntime(Policy.load(POLICIES), Schema.from_file(str(SCHEMA_YAML)), cache)
        out = cls(runtime)
        out.reset()
        return out

    def reset(self) -> None:
        """Fresh sessions (a statement may change a session's purpose or search_path)."""
        self.sessions = [new_session(self.runtime, *spec) for spec in SESSIONS]


def new_session(runtime: StaticRuntime, role: str, purpose: str | None, search_path: str | None = None
                ) -> PurposeSession:
    params = {"user": role, "database": "isp", "application_name": "fuzz"}
    options = []
    if purpose is not None:
        options.append(f"-c pii.purpose={purpose}")
    if search_path is not None:
        options.append(f"-c search_path={search_path}")
    if options:
        params["options"] = " ".join(options)
    info = SessionInfo("fuzz", "127.0.0.1:1", params)
    try:
        return PurposeSession(runtime, info, runtime.state)
    except StartupRefused as exc:  # pragma: no cover - SESSIONS is checked by a test
        raise AssertionError(f"{role} may not declare {purpose}: {exc.block.message}") from None


def check_decision(session: PurposeSession, sql: str, via: str):
    """Decide ``sql`` in ``session`` and put the decision on the wire; return the decision.

    Raises AssertionError for anything but an Allow, a Mask or a designed Block.
    """
    sql = sql.replace("\x00", "")  # a statement text off the wire ends at its first NUL
    decision = session.decide(sql, via)
    kind = type(decision)
    assert kind in (Allow, Mask, Block), f"not a decision: {decision!r}"
    if kind is Block:
        assert decision.message and len(decision.sqlstate) == 5, decision
        text = " ".join(x for x in (decision.message, decision.detail or "", decision.hint or ""))
        assert not any(m in text for m in CRASH_MARKERS), f"refused because something crashed: {text[:500]}"
    elif kind is Mask:
        assert isinstance(decision.sql, str) and decision.sql.strip(), decision
    # Onto the wire, as the relay does it: this must not raise either.
    if via == "parse":
        raw = codec.encode_parse("s", sql)
        frame = codec.Frame(codec.F_PARSE, raw)
        upstream, refusal = apply(decision, frame, codec.decode_parse(raw[5:]))
    else:
        frame = codec.Frame(codec.F_QUERY, codec.query(sql))
        upstream, refusal = apply(decision, frame)
    assert (refusal is not None) == (kind is Block)
    if kind is Allow:
        assert upstream == frame.raw
    return decision


def analysis_crash(runtime: StaticRuntime, sql: str, search_path=("$user", "public"), role: str = "app") -> str | None:
    """The reason the analysis gives when it crashed on ``sql`` (it fails closed), else None."""
    analysis = analyze(sql.replace("\x00", ""), runtime.state.schema, list(search_path), role)
    for st in analysis.statements:
        for r in st.unsupported:
            if "internal error" in r:
                return r
    return None


def check_statement(runtime: StaticRuntime, spec: tuple, sql: str, via: str, cached: StaticRuntime | None = None):
    """``check_decision`` in a fresh session of ``spec`` (role, purpose, search_path), after checking
    that the analysis does not crash on ``sql``; with ``cached`` (a runtime with a decision cache),
    also that the cache decides as a fresh analysis does (kind, rewrite, SQLSTATE)."""
    crash = analysis_crash(runtime, sql, (spec[2] or "$user,public").split(","), spec[0])
    assert crash is None, f"the analysis crashed on {sql!r}: {crash}"
    want = check_decision(new_session(runtime, *spec), sql, via)
    if cached is not None:
        got = check_decision(new_session(cached, *spec), sql, via)
        assert (type(got), getattr(got, "sql", None), getattr(got, "sqlstate", None)) == \
            (type(want), getattr(want, "sql", None), getattr(want, "sqlstate", None)), (sql, want, got)
    return want


class Recorded:
    """A decider (a ``PurposeSession``) whose calls are recorded as ``fuzzing.RecordingDecider`` records
    them, so that the relay invariants can be checked with real decisions."""

    withhold_error_rows = True

    def __init__(self, inner: PurposeSession) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str, object]] = []

    @property
    def epoch(self):
        return self.inner.epoch

    @property
    def last(self):
        return self.inner.last

    def attach(self, relay) -> None:
        self.inner.attach(relay)

    def ready(self, errored: bool) -> None:
        self.inner.ready(errored)

    def decide(self, sql: str, via: str):
        try:
            decision = self.inner.decide(sql, via)
        except Exception:
            self.calls.append((sql, via, "raised"))
            raise
        self.calls.append((sql, via, decision))
        return decision


# --- the corpus ----------------------------------------------------------------------------------

_SQL_START = re.compile(r"^\s*(\(|/\*|--\s|select|with|insert|update|delete|merge|set|reset|show|copy|prepare|execute|"
                        r"deallocate|declare|fetch|close|move|explain|begin|start|commit|rollback|savepoint|release|"
                        r"create|alter|drop|truncate|grant|revoke|comment|do|call|values|table|lock|listen|notify|"
                        r"discard|vacuum|analyze|refresh|reindex|cluster|security|import|load|checkpoint|abort|end)\b",
                        re.I)


def _yaml_sql(node, out: list[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("sql", "setup", "setup_any", "statement", "statements", "query") and isinstance(v, str):
                out.append(v)
            elif k in ("setup", "setup_any", "sql") and isinstance(v, list):
                out.extend(x for x in v if isinstance(x, str))
            else:
                _yaml_sql(v, out)
    elif isinstance(node, list):
        for v in node:
            _yaml_sql(v, out)


def _python_sql(path: Path, out: list[str]) -> None:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL_START.match(node.value) \
                and len(node.value) < 4000 and " " in node.value.strip():
            out.append(node.value)


def load_corpus() -> list[str]:
    """Every SQL statement of the test fixtures, the policy test cases and the bypass tests, deduplicated."""
    out: list[str] = []
    for path in sorted([*(REPO / "tests" / "fixtures").rglob("*.yaml"), *(POLICIES / "tests").glob("*.yaml")]):
        try:
            _yaml_sql(yaml.safe_load(path.read_text(encoding="utf-8")), out)
        except yaml.YAMLError:
            continue
    for name in ("test_bypass.py", "test_enforcement.py", "test_masking.py"):
        path = REPO / "tests" / "integration" / name
        if path.exists():
            _python_sql(path, out)
    seen: set[str] = set()
    return [s for s in out if s.strip() and not (s in seen or seen.add(s))]


# --- mutations -----------------------------------------------------------------------------------

TOKEN_RE = re.compile(r"\$\d+|\$[A-Za-z_]*\$|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|[A-Za-z_][A-Za-z0-9_$]*|\d+(?:\.\d+)?"
                      r"|::|<=|>=|<>|!=|\|\||->>|->|#>>|[^\sA-Za-z0-9_]|\s+", re.S)

# Pieces of PostgreSQL syntax to splice in: keywords, names of the sample schema, and
# lexically awkward tokens (dollar quotes, escapes, Unicode identifiers, comments).
FRAGMENTS: tuple[str, ...] = (
    "SELECT", "FROM", "WHERE", "JOIN", "LEFT JOIN", "ON", "USING", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", "OFFSET",
    "UNION ALL", "INTERSECT", "EXCEPT", "WITH", "RECURSIVE", "AS", "LATERAL", "DISTINCT ON (1)", "WINDOW w AS ()",
    "OVER (PARTITION BY 1)", "FILTER (WHERE true)", "WITHIN GROUP (ORDER BY 1)", "RETURNING *",
    "ON CONFLICT DO NOTHING",
    "INSERT INTO", "UPDATE", "SET", "DELETE FROM", "VALUES", "TABLE", "ONLY", "*", ",", "(", ")", ";", ".",
    "=",
    "::text", "::regclass", "->>", "||", "IS NOT DISTINCT FROM", "ANY(ARRAY[1])", "ROW(1, 2)",
    "CASE WHEN true THEN 1 END",
    "EXISTS (SELECT 1)", "NOT", "NULL", "$1", "$2", "'x'", "E'\\\\'", "E'\\''", "$$x$$", "$q$ ' $q$", "U&'\\0041'",
    "U&\"\\0041\"", "B'101'", "X'ff'", "1e10", "-- c\n", "/* c */", "/* /* nested */ */", "\"Member\"", "\"\"\"\"",
    "member.members", "members", "family_name", "birth_date", "billing.payment_methods", "card_number",
    "billing.invoices", "amount", "support.call_recordings", "caller_number", "browsing.page_views", "url",
    "browsing.member_page_views", "support.inquiry_overview", "privacy.consents", "telecom.access_sessions",
    "assigned_ip", "credit.assessments", "score", "m", "m.*", "t.member_id", "count(*)", "count(DISTINCT member_id)",
    "string_agg(family_name, ',')", "row_to_json(m)", "to_jsonb(m.*)", "current_setting('pii.purpose')",
    "set_config('pii.purpose', 'x', false)", "query_to_xml('select 1', true, true, '')", "pg_read_file('x')",
    "billing.outstanding_balance(1)", "generate_series(1, 3)", "unnest(ARRAY[1])", "pii.purpose", "search_path",
    "'marketing'", "LOCAL", "PREPARE p AS", "EXECUTE p", "DECLARE c CURSOR WITH HOLD FOR", "EXPLAIN ANALYZE",
    "COPY", "TO STDOUT", "FROM STDIN", "CREATE TEMP TABLE t AS", "CREATE VIEW v AS", "DO $$ BEGIN END $$",
    "\\", "\udcff", "\u3042", "\t", "\n", "'", "\"", "$", "e'", "N'x'", "&", "pg_catalog.", "public.",
    "pg_stats", "pg_stat_activity", "information_schema.columns", "DEFAULT", "IN (SELECT", "ARRAY(SELECT", "FOR UPDATE",
)


def tokens(sql: str) -> list[str]:
    return TOKEN_RE.findall(sql) or [sql]


def mutate_sql(sql: str, other: str, ops: list[tuple[int, int, int]]) -> str:
    """Token-level mutations of ``sql``: delete, duplicate, swap, replace or insert a fragment,
    splice ``other`` in, truncate, or flip a character (``ops``: (op, position, argument))."""
    toks = tokens(sql)
    for op, pos, arg in ops:
        n = len(toks)
        i = pos % max(n, 1)
        op %= 9
        if op == 0 and n > 1:
            del toks[i]
        elif op == 1 and n:
            toks.insert(i, toks[i])
        elif op == 2 and n > 1:
            j = arg % n
            toks[i], toks[j] = toks[j], toks[i]
        elif op == 3 and n:
            toks[i] = FRAGMENTS[arg % len(FRAGMENTS)]
        elif op == 4:
            toks.insert(i, " " + FRAGMENTS[arg % len(FRAGMENTS)] + " ")
        elif op == 5:
            others = tokens(other)
            k = arg % (len(others) + 1)
            toks = toks[:i] + others[k:] if arg & 1 else toks[:i] + others[:k] + toks[i:]
        elif op == 6:
            toks = toks[:i + 1]
        elif op == 7 and n:
            t = toks[i]
            if t:
                c = arg % len(t)
                toks[i] = t[:c] + chr((ord(t[c]) + 1 + arg) % 0x80 or 0x20) + t[c + 1:]
        else:
            toks.insert(i, " " if arg & 1 else ";")
    return "".join(toks)


# --- a small grammar of PostgreSQL syntax over the sample schema ------------------------------------


class Chooser:
    """Turns a stream of numbers (from hypothesis or from atheris' bytes) into choices; 0 once it runs out."""

    def __init__(self, numbers) -> None:
        self.numbers = numbers
        self.i = 0

    def __call__(self, n: int) -> int:
        if n <= 1 or self.i >= len(self.numbers):
            return 0
        v = self.numbers[self.i] % n
        self.i += 1
        return v

    def pick(self, seq):
        return seq[self(len(seq))]

    def maybe(self, text: str) -> str:
        return text if self(3) == 1 else ""


_SCHEMA_CACHE: dict[str, tuple[str, ...]] = {}


def relations() -> dict[str, tuple[str, ...]]:
    """Relation name -> columns of the sample schema."""
    if not _SCHEMA_CACHE:
        for r in Schema.from_file(str(SCHEMA_YAML)).relations:
            _SCHEMA_CACHE[f"{r.schema}.{r.name}"] = tuple(r.columns)
    return _SCHEMA_CACHE


FUNCS1 = ("lower", "upper", "length", "md5", "coalesce", "count", "max", "min", "sum", "avg", "to_json",
          "quote_literal", "concat", "string_agg", "array_agg", "row_to_json", "jsonb_build_object", "nullif", "left",
          "trim")
LITERALS = ("1", "0", "NULL", "'x'", "$1", "true", "42.5", "E'\\\\x'", "$$y$$", "ARRAY[1,2]", "'2024-01-01'::date",
            "current_user", "current_setting('pii.purpose')", "now()")
OPS = ("=", "<>", "<", ">=", "||", "+", "AND", "OR", "LIKE", "IS DISTINCT FROM", "~", "->>", "@>")


def _column(c: Chooser, scope: list[tuple[str, tuple[str, ...]]]) -> str:
    if not scope:
        return c.pick(LITERALS)
    alias, cols = c.pick(scope)
    col = c.pick(cols + ("*", "nosuch")) if c(8) == 0 else c.pick(cols)
    if col == "*":
        return f"{alias}.*" if c(2) else f"row_to_json({alias})"
    return f"{alias}.{col}" if c(4) else col


def expr(c: Chooser, scope, depth: int = 0) -> str:
    k = c(10) if depth < 3 else c(2)
    if k == 0:
        return _column(c, scope)
    if k == 1:
        return c.pick(LITERALS)
    if k == 2:
        return f"{c.pick(FUNCS1)}({expr(c, scope, depth + 1)})"
    if k == 3:
        return f"({expr(c, scope, depth + 1)} {c.pick(OPS)} {expr(c, scope, depth + 1)})"
    if k == 4:
        a, b, e = (expr(c, scope, depth + 1) for _ in range(3))
        return f"CASE WHEN {a} THEN {b} ELSE {e} END"
    if k == 5:
        return f"({select(c, depth + 1, scope, single=True)})"
    if k == 6:
        return f"EXISTS ({select(c, depth + 1, scope)})"
    if k == 7:
        return f"{expr(c, scope, depth + 1)} IN ({select(c, depth + 1, scope, single=True)})"
    if k == 8:
        return f"{expr(c, scope, depth + 1)}::{c.pick(('text', 'int', 'jsonb', 'regclass', 'bytea'))}"
    return f"count(*) FILTER (WHERE {expr(c, scope, depth + 1)})" if c(2) else \
        f"{c.pick(('sum', 'max', 'count'))}({expr(c, scope, depth + 1)}) OVER (PARTITION BY {_column(c, scope)})"


def from_item(c: Chooser, depth: int, alias: str, outer) -> tuple[str, tuple[str, ...]]:
    rels = relations()
    k = c(6) if depth < 3 else 0
    if k <= 2:
        name = c.pick(tuple(rels))
        shown = name if c(4) else name.split(".", 1)[1]  # unqualified: resolved on the search_path
        return f"{c.maybe('ONLY ')}{shown} {alias}", rels[name]
    if k == 3:
        sub = select(c, depth + 1, outer)
        return f"{c.maybe('LATERAL ')}({sub}) {alias}", ("a", "b")
    if k == 4:
        return f"generate_series(1, 3) {alias}(a)", ("a",)
    return f"unnest(ARRAY['x']) {alias}(a)", ("a",)


def select(c: Chooser, depth: int = 0, outer=(), single: bool = False) -> str:
    scope = list(outer)
    item, cols = from_item(c, depth, f"t{depth}", scope)
    scope.append((f"t{depth}", cols))
    sql = item
    if c(3) == 1:
        j, jcols = from_item(c, depth, f"j{depth}", scope)
        scope.append((f"j{depth}", jcols))
        sql += f" {c.pick(('JOIN', 'LEFT JOIN', 'CROSS JOIN', 'FULL JOIN'))} {j}"
        if "CROSS" not in sql:
            sql += f" ON {expr(c, scope, depth + 1)}"
    n = 1 if single else 1 + c(3)
    items = ", ".join(expr(c, scope, depth + 1) + c.maybe(" AS x") for _ in range(n))
    out = f"SELECT {c.maybe('DISTINCT ')}{items} FROM {sql}"
    if c(2):
        out += f" WHERE {expr(c, scope, depth + 1)}"
    if c(4) == 1:
        out += f" GROUP BY {c.pick(('1', _column(c, scope)))}" + c.maybe(f" HAVING count(*) > {c(5)}")
    if c(4) == 1:
        out += f" ORDER BY {c.pick(('1', _column(c, scope)))}"
    if single or c(4) == 1:
        out += " LIMIT 1"
    if not single and depth < 2 and c(6) == 1:
        out += f" {c.pick(('UNION', 'UNION ALL', 'EXCEPT', 'INTERSECT'))} {select(c, depth + 1, outer)}"
    if depth == 0 and c(6) == 1:
        out = f"WITH w AS ({select(c, 1)}) {out}"
    return out


def statement(c: Chooser) -> str:
    """One statement (sometimes several) of the grammar."""
    rels = relations()
    k = c(16)
    name = c.pick(tuple(rels))
    cols = rels[name]
    scope = [("t", cols)]
    if k <= 5:
        return select(c)
    if k == 6:
        col = c.pick(cols)
        return f"INSERT INTO {name} ({col}) {c.pick(('VALUES (' + c.pick(LITERALS) + ')', select(c, 1)))}" + \
            c.maybe(" RETURNING *") + c.maybe(" ON CONFLICT DO NOTHING")
    if k == 7:
        return f"UPDATE {name} t SET {c.pick(cols)} = {expr(c, scope, 1)} WHERE {expr(c, scope, 1)}" + \
            c.maybe(f" RETURNING {c.pick(cols)}")
    if k == 8:
        return f"DELETE FROM {name} t WHERE {expr(c, scope, 1)}" + c.maybe(" RETURNING t.*")
    if k == 9:
        return c.pick((f"SET pii.purpose = '{c.pick(('billing', 'marketing', 'support', 'research', 'nope'))}'",
                       "RESET pii.purpose", "SET search_path = member, billing", "SET search_path TO DEFAULT",
                       "SET LOCAL pii.purpose = 'billing'", "RESET ALL", "DISCARD ALL", "SHOW pii.purpose",
                       "SET ROLE admin", "SELECT set_config('pii.purpose', 'billing', false)",
                       "UPDATE pg_settings SET setting = 'x' WHERE name = 'pii.purpose'"))
    if k == 10:
        return c.pick((f"PREPARE p AS {select(c)}", "EXECUTE p", "EXECUTE p(1)", "DEALLOCATE p", "DEALLOCATE ALL",
                       f"DECLARE c CURSOR {c.maybe('WITH HOLD ')}FOR {select(c)}", "FETCH 1 FROM c", "CLOSE ALL"))
    if k == 11:
        return c.pick((f"COPY ({select(c)}) TO STDOUT", f"COPY {name} TO STDOUT", f"COPY {name} FROM STDIN",
                       f"COPY {name} ({c.pick(cols)}) TO STDOUT WITH (FORMAT csv)"))
    if k == 12:
        return f"EXPLAIN {c.maybe('ANALYZE ')}{select(c)}"
    if k == 13:
        return c.pick((f"CREATE TEMP TABLE x AS {select(c)}", f"CREATE VIEW v AS {select(c)}", f"TRUNCATE {name}",
                       f"CREATE INDEX ON {name} ({c.pick(cols)})", f"DROP TABLE {name}", "DO $$ BEGIN END $$",
                       "CALL p()", f"ALTER TABLE {name} ADD COLUMN z int", f"GRANT SELECT ON {name} TO app"))
    if k == 14:
        return c.pick(("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT a", "START TRANSACTION READ ONLY", "SELECT 1"))
    return f"{statement(c)}; {statement(c)}"
