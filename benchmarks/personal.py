"""The personal-data workload: statements on the sample ISP database, directly, through PgBouncer and the
relay, and through the enforcing proxy with the seed policy, one at a time, with per-statement latency.

Each statement kind runs as an application role under a purpose that the seed policy
(``policies/``) answers with a known verdict: allowed, masked, consent-filtered,
aggregate-only or refused. Every statement differs from the previous one in its
literals, so that through the proxy the decision comes from the decision cache's
*shape* entries (the statement text is new each time).

Two variants, each on its own connections (psycopg, autocommit):

* ``simple``: the literals are in the text, sent with the simple query protocol
  (``prepare_threshold=None``: psycopg never prepares them behind our back);
* ``prepared``: the same statement with ``$n`` parameters, prepared once per
  connection (``prepare=True``) and then only bound and executed: the proxy decides the
  Parse once, the executions pass through.

Four paths run every statement (same literals), taking turns statement by statement
with the order rotating, so drift on a busy machine hits them alike: ``direct``
(PostgreSQL), ``pgbouncer`` (PgBouncer in session mode: what any connection pooler's hop
costs; skipped when PgBouncer is not installed), ``relay`` (the relay-only proxy of the
pgbench targets: what any proxy in the path costs) and ``proxy`` (the enforcing proxy).
For statements the proxy rewrites, one more series sends the proxy's rewritten SQL
directly to PostgreSQL, which splits the added latency into what the rewritten
statement costs PostgreSQL and what the proxy itself adds. A refused statement reaches
PostgreSQL only as a stand-in that fails at once (``proxy.enforcement.apply``), so its
latency is the proxy's error round trip; directly the same statement just runs.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import psycopg

from benchmarks import decisions
from benchmarks.stack import SAMPLE_DATABASE, Stack, purpose_options

VARIANTS = ("simple", "prepared")
# PostgreSQL itself, PgBouncer, the relay-only proxy, the enforcing proxy
PATHS = ("direct", "pgbouncer", "relay", "proxy")
WARMUP = 20  # untimed statements per connection before the first round


@dataclass(frozen=True)
class Statement:
    """One statement kind: ``template`` has ``{name}`` fields that ``values`` fills per statement."""

    name: str
    role: str
    purpose: str
    template: str
    expect: str  # the seed policy's verdict

    def values(self, rng: random.Random, members: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "{id}" in self.template:
            out["id"] = rng.randint(1, members)
        if "{since}" in self.template:
            out["since"] = dt.date(2018, 4, 1) + dt.timedelta(days=rng.randrange(1700))
        return out

    def simple(self, values: dict[str, Any]) -> str:
        return self.template.format(**{k: literal(v) for k, v in values.items()})

    def prepared(self) -> str:
        """The text with psycopg placeholders (``%(name)s``, sent as ``$n``)."""
        return self.template.format(**{k: f"%({k})s" for k in re.findall(r"\{(\w+)\}", self.template)})


def literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dt.date):
        return f"'{value.isoformat()}'"
    raise TypeError(value)


STATEMENTS = [
    Statement("lookup, allowed", "app_billing", "billing",
              "SELECT member_id, member_number, family_name, given_name, email, phone FROM member.members "
              "WHERE member_id = {id}", "allowed"),
    Statement("lookup, masked", "app_support", "support",
              "SELECT member_id, family_name, given_name, birth_date, phone FROM member.members "
              "WHERE member_id = {id}", "masked"),
    Statement("lookup, consent-filtered", "app_marketing", "marketing.announcements",
              "SELECT member_id, family_name, given_name, email FROM member.members WHERE member_id = {id}",
              "consent-filtered"),
    Statement("lookup, refused", "app_marketing", "marketing.announcements",
              "SELECT member_id, card_brand, card_number FROM billing.payment_methods WHERE member_id = {id}",
              "refused"),
    Statement("join (3 tables)", "app_billing", "billing",
              "SELECT m.member_number, m.family_name, i.billing_month, i.amount + i.tax AS total, p.paid_at "
              "FROM member.members m JOIN billing.invoices i ON i.member_id = m.member_id "
              "LEFT JOIN billing.payments p ON p.invoice_id = i.invoice_id "
              "WHERE m.member_id = {id} ORDER BY i.billing_month DESC LIMIT 6", "allowed"),
    Statement("aggregate (k=10)", "analyst", "statistics",
              "SELECT prefecture, count(DISTINCT member_id) AS members, count(*) AS n FROM member.members "
              "WHERE joined_at >= {since} GROUP BY prefecture ORDER BY prefecture", "aggregate-only"),
]


class Series:
    """Latencies (microseconds) and errors (SQLSTATE -> count) of one statement kind on one path."""

    def __init__(self) -> None:
        self.us: list[float] = []
        self.errors: dict[str, int] = {}

    def run(self, conn: psycopg.Connection, sql: str, params: Any = None, prepare: bool | None = None) -> None:
        cur = conn.cursor()
        t0 = time.perf_counter_ns()
        try:
            cur.execute(sql, params, prepare=prepare)
            cur.fetchall()
        except psycopg.Error as exc:
            state = exc.sqlstate or "?"
            self.errors[state] = self.errors.get(state, 0) + 1
        self.us.append((time.perf_counter_ns() - t0) / 1000)

    def summary(self) -> dict:
        if not self.us:
            return {}
        return {"n": len(self.us), "p50_us": decisions.percentile(self.us, 0.5),
                "p99_us": decisions.percentile(self.us, 0.99), "mean_us": sum(self.us) / len(self.us),
                "errors": dict(self.errors)}


def _rewritten(decision: Any) -> str | None:
    """The SQL the proxy sends for a rewritten statement (None: sent as is, or refused)."""
    return getattr(decision, "sql", None)


def _as_psycopg(sql: str, params: dict[str, Any], names: list[str]) -> tuple[str, tuple]:
    """A ``$n`` text (the proxy's rewrite of a prepared statement) as psycopg's ``%s`` text and parameters."""
    order = [int(n) for n in re.findall(r"\$(\d+)", sql)]
    text = re.sub(r"\$\d+", "%s", sql.replace("%", "%%"))
    return text, tuple(params[names[n - 1]] for n in order)


def metrics(stack: Stack) -> dict[str, float]:
    """The personal proxy's decision-cache counters."""
    url = f"http://{stack.personal_proxy.host}:{stack.personal_metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for key, pattern in (("text_hits", r'^purpose_proxy_decision_cache_hits_total\{match="text"\} (\S+)'),
                         ("shape_hits", r'^purpose_proxy_decision_cache_hits_total\{match="shape"\} (\S+)'),
                         ("misses", r"^purpose_proxy_decision_cache_misses_total (\S+)")):
        m = re.search(pattern, text, re.MULTILINE)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def endpoints(stack: Stack) -> dict[str, tuple[str, int]]:
    """Host and port of each path the stack has, in ``PATHS`` order (no ``pgbouncer`` without PgBouncer)."""
    middlemen = {"pgbouncer": stack.pgbouncer, "relay": stack.proxy, "proxy": stack.personal_proxy}
    out = {"direct": (stack.cluster.host, stack.cluster.port)}
    out.update((path, (m.host, m.port)) for path, m in middlemen.items() if m is not None)
    return {path: out[path] for path in PATHS if path in out}


def connect(stack: Stack, st: Statement, path: str, variant: str) -> psycopg.Connection:
    """A connection of ``st``'s role and purpose: ``direct``, through ``pgbouncer``, the ``relay`` (the
    relay-only proxy) or the enforcing ``proxy``. Every path declares the purpose; only the proxy acts on it
    (PostgreSQL takes ``pii.purpose`` for a placeholder setting, PgBouncer ignores the option)."""
    host, port = endpoints(stack)[path]
    kw = {"prepare_threshold": None} if variant == "simple" else {}
    return psycopg.connect(host=host, port=port, user=st.role, password=stack.sample_password,
                           dbname=SAMPLE_DATABASE, options=purpose_options(st.purpose), autocommit=True,
                           connect_timeout=30, **kw)


def measure(stack: Stack, rounds: int, per_round: int, seed: int = 7,
            statements: list[Statement] = STATEMENTS) -> dict:
    """Every statement kind in both variants, ``rounds`` x ``per_round`` statements per path."""
    import asyncio

    paths = tuple(endpoints(stack))
    state = asyncio.run(decisions.live_state(stack.sample_reader_dsn, SAMPLE_DATABASE))
    rt = decisions.runtime(stack.seed_policies, 10000)
    rng = random.Random(seed)
    members = stack.sample_members
    cache_before = metrics(stack)
    results: dict[tuple[str, str], dict[str, Series]] = {}
    conns: dict[tuple[str, str], dict[str, psycopg.Connection]] = {}
    verdicts: dict[str, str] = {}
    try:
        for st in statements:
            session = decisions.session(rt, state, SAMPLE_DATABASE, st.role, st.purpose)
            verdicts[st.name] = decisions.verdict(session.decide(st.simple(st.values(rng, members)), "query"))
            if verdicts[st.name] != st.expect:
                print(f"warning: {st.name}: the seed policy now says {verdicts[st.name]}, not {st.expect}",
                      flush=True)
            for variant in VARIANTS:
                conns[(st.name, variant)] = {path: connect(stack, st, path, variant) for path in paths}
                results[(st.name, variant)] = {path: Series() for path in (*paths, "rewritten")}
        for rnd in range(rounds):
            for st in statements:
                session = decisions.session(rt, state, SAMPLE_DATABASE, st.role, st.purpose)
                names = re.findall(r"\{(\w+)\}", st.template)
                for variant in VARIANTS:
                    by_path = conns[(st.name, variant)]
                    series = results[(st.name, variant)]
                    n = per_round + (WARMUP if rnd == 0 else 0)
                    for i in range(n):
                        values = st.values(rng, members)
                        if variant == "simple":
                            sql, params, prepare = st.simple(values), None, None
                            rewritten = _rewritten(session.decide(sql, "query"))
                            rparams = None
                        else:
                            sql, params, prepare = st.prepared(), values, True
                            pg_text = re.sub(r"%\((\w+)\)s",
                                             lambda m, names=names: f"${names.index(m.group(1)) + 1}", sql)
                            rewritten = _rewritten(session.decide(pg_text, "parse"))
                            if rewritten is not None:
                                rewritten, rparams = _as_psycopg(rewritten, values, names)
                        timed = i >= n - per_round
                        turns = [(path, by_path[path], sql, params) for path in paths]
                        if rewritten is not None:
                            turns.append(("rewritten", by_path["direct"], rewritten, rparams))
                        shift = i % len(turns)  # rotate, so that no path always comes first
                        turns = turns[shift:] + turns[:shift]
                        for path, conn, text, args in turns:
                            if timed:
                                series[path].run(conn, text, args, prepare)
                            else:
                                Series().run(conn, text, args, prepare)
                print(f"personal round {rnd + 1}/{rounds}  {st.name:26} p50 {' / '.join(paths)} us  "
                      + "  ".join(f"{v}: " + " / ".join(f"{results[(st.name, v)][path].summary()['p50_us']:4.0f}"
                                                          for path in paths) for v in VARIANTS), flush=True)
    finally:
        for by_path in conns.values():
            for c in by_path.values():
                c.close()
    cache_after = metrics(stack)
    rows = []
    for st in statements:
        for variant in VARIANTS:
            series = results[(st.name, variant)]
            rows.append({"statement": st.name, "variant": variant, "role": st.role, "purpose": st.purpose,
                         "verdict": verdicts[st.name], "sql": st.template if variant == "simple" else st.prepared(),
                         **{path: s.summary() for path, s in series.items() if s.us}})
    return {"rows": rows, "paths": list(paths), "rounds": rounds, "per_round": per_round, "members": members,
            "cache": {k: cache_after[k] - cache_before[k] for k in cache_after}}
