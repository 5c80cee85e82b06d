"""Decision latency in-process (no network): how long ``PurposeSession.decide`` takes per query kind.

The session is built as the decision-cache tests build it (``PolicyRuntime`` +
``DatabaseState`` + ``PurposeSession``), with the seed policy (``policies/``) and the
sample schema: loaded from the live sample database when the harness has one
(``load_database_state``), else read from ``policies/schema.yaml``.

* **cold**: the decision cache off (``decision_cache_size = 0``): every statement is
  lexed, parsed, resolved against the schema, decided and (for masks, consent and
  aggregate-only use) rewritten;
* **warm**: the cache on and filled by one statement of the kind; the runs that follow
  differ from it and from each other in their constants, so they are answered by shape.

Every run uses distinct constants; a few untimed runs first warm what is not the
decision cache (imports, the policy table's memo, parsed view definitions)::

    python -m benchmarks.decisions --runs 200          # against policies/schema.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from proxy.analysis.schema import Schema
from proxy.cli import settle_heap
from proxy.config import Config
from proxy.enforcement.hook import SessionInfo
from proxy.enforcement.purpose import PurposeSession
from proxy.enforcement.runtime import DatabaseState, PolicyRuntime, load_database_state
from proxy.policy.decision import Block, Decision, Mask

WARMUP = 5  # untimed runs per kind and mode


@dataclass(frozen=True)
class QueryKind:
    """A query kind: ``sql(i)`` is the ``i``-th statement of the kind (distinct constants for each i)."""

    name: str
    role: str
    purpose: str
    sql: Callable[[int], str]


def _day(i: int) -> str:
    return (dt.date(2019, 1, 1) + dt.timedelta(days=i % 1500)).isoformat()


POINT = "SELECT member_id, family_name, email FROM member.members WHERE member_id = {a}"
JOIN3 = ("SELECT m.member_number, m.family_name, i.billing_month, i.amount + i.tax AS total, p.paid_at "
         "FROM member.members m JOIN billing.invoices i ON i.member_id = m.member_id "
         "LEFT JOIN billing.payments p ON p.invoice_id = i.invoice_id "
         "WHERE m.member_id = {a} ORDER BY i.billing_month DESC LIMIT 6")
CTE = ("WITH recent AS (SELECT member_id, sum(amount + tax) AS total FROM billing.invoices "
       "WHERE billing_month >= '{day}' GROUP BY member_id) "
       "SELECT m.member_number, m.family_name, r.total "
       "FROM member.members m JOIN recent r ON r.member_id = m.member_id "
       "WHERE r.total > (SELECT avg(amount) FROM billing.invoices WHERE status = 'paid') * {b} "
       "AND m.member_id IN (SELECT member_id FROM billing.payments WHERE amount > {a})")
GROUP_BY = ("SELECT status, billing_month, count(*) AS invoices, sum(amount) AS amount FROM billing.invoices "
            "WHERE amount > {a} GROUP BY status, billing_month ORDER BY billing_month, status")
INSERT = ("INSERT INTO support.inquiries (inquiry_id, member_id, received_at, channel, topic, subject, body, status, "
          "operator_id) VALUES ({a}, {b}, now(), 'web', 'billing', 'invoice {a}', 'question about invoice {b}', "
          "'open', 3) RETURNING inquiry_id, received_at, status")
REPORT = """WITH billed AS (
    SELECT i.member_id, count(*) AS invoices, sum(i.amount + i.tax) AS billed
      FROM billing.invoices i
     WHERE i.billing_month >= DATE '{day}'
     GROUP BY i.member_id
), paid AS (
    SELECT p.member_id, sum(p.amount) AS paid, max(p.paid_at) AS last_paid
      FROM billing.payments p
     WHERE p.paid_at >= TIMESTAMPTZ '{day}'
     GROUP BY p.member_id
), overdue AS (
    SELECT d.member_id, count(*) AS cases, sum(d.overdue_amount) AS overdue_amount,
           max(CASE d.collection_stage WHEN 'reminder' THEN 1 WHEN 'demand' THEN 2
                                       WHEN 'collection' THEN 3 ELSE 4 END) AS worst_stage
      FROM credit.delinquencies d
     WHERE d.resolved_at IS NULL
     GROUP BY d.member_id
)
SELECT m.member_number, m.family_name, m.given_name, m.prefecture,
       b.invoices, b.billed, coalesce(p.paid, 0) AS paid,
       b.billed - coalesce(p.paid, 0) AS balance, p.last_paid,
       coalesce(o.cases, 0) AS overdue_cases, o.worst_stage,
       a.score, a.credit_limit, a.decision,
       rank() OVER (PARTITION BY m.prefecture ORDER BY b.billed - coalesce(p.paid, 0) DESC) AS rank_in_prefecture
  FROM member.members m
  JOIN billed b ON b.member_id = m.member_id
  LEFT JOIN paid p ON p.member_id = m.member_id
  LEFT JOIN overdue o ON o.member_id = m.member_id
  LEFT JOIN LATERAL (SELECT s.score, s.credit_limit, s.decision FROM credit.assessments s
                      WHERE s.member_id = m.member_id ORDER BY s.assessed_at DESC LIMIT 1) a ON true
 WHERE m.status <> 'cancelled' AND b.billed - coalesce(p.paid, 0) > {a}
 ORDER BY balance DESC, m.member_id
 LIMIT {b}"""
MASKED = "SELECT member_id, family_name, given_name, birth_date, phone FROM member.members WHERE member_id = {a}"
CONSENT = "SELECT member_id, family_name, given_name, email FROM member.members WHERE member_id = {a}"
REFUSED = "SELECT member_id, card_brand, card_number FROM billing.payment_methods WHERE member_id = {a}"
AGGREGATE = ("SELECT prefecture, count(DISTINCT member_id) AS members, count(*) AS n FROM member.members "
             "WHERE joined_at >= '{day}' GROUP BY prefecture ORDER BY prefecture")


def _kind(name: str, role: str, purpose: str, template: str) -> QueryKind:
    return QueryKind(name, role, purpose,
                     lambda i: template.format(a=1 + i, b=2 + i % 97, day=_day(i)))


# The six kinds of issue #6 (all allowed as they stand), then the point select under the
# other verdicts: what masking, consent filtering, aggregate-only use and a refusal add.
KINDS = [
    _kind("point select", "app_billing", "billing", POINT),
    _kind("3-table join", "app_billing", "billing", JOIN3),
    _kind("CTE + subquery", "app_billing", "billing", CTE),
    _kind("GROUP BY", "app_billing", "billing", GROUP_BY),
    _kind("INSERT RETURNING", "app_support", "support", INSERT),
    _kind("30-line report", "app_billing", "credit_management", REPORT),
    _kind("point select, masked", "app_support", "support", MASKED),
    _kind("point select, consent-filtered", "app_marketing", "marketing.announcements", CONSENT),
    _kind("point select, refused", "app_marketing", "marketing.announcements", REFUSED),
    _kind("GROUP BY, aggregate-only", "analyst", "statistics", AGGREGATE),
]
SIX = KINDS[:6]


def verdict(decision: Decision) -> str:
    """allowed | masked | consent-filtered | aggregate-only | refused (as the demo names them)."""
    if isinstance(decision, Block):
        return "refused"
    if isinstance(decision, Mask):
        return {"consent": "consent-filtered", "aggregate": "aggregate-only"}.get(decision.reason, "masked")
    return "allowed"


def runtime(policies: Path, cache_size: int) -> PolicyRuntime:
    """The policy in force, with a decision cache of ``cache_size`` (0: none)."""
    return PolicyRuntime(Config(policies=str(policies), schema_dsn="unused", decision_cache_size=cache_size,
                                policy_watch_interval=0, schema_refresh_interval=0))


def session(rt: PolicyRuntime, state: DatabaseState, database: str, role: str, purpose: str) -> PurposeSession:
    """A session of ``role`` on ``database`` that declared ``purpose`` at connect time."""
    info = SessionInfo("bench", "127.0.0.1", {"user": role, "database": database,
                                              "options": f"-c pii.purpose={purpose}"})
    return PurposeSession(rt, info, state)


def schema_file_state(policies: Path) -> DatabaseState:
    """The sample schema from the policy's schema.yaml (no column types: some masks need the live one)."""
    return DatabaseState(Schema.from_file(str(policies / "schema.yaml")))


async def live_state(dsn: str, database: str) -> DatabaseState:
    return await load_database_state(dsn, database, 10.0)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by the nearest-rank method."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def _time_us(s: PurposeSession, sql: str) -> tuple[float, Decision]:
    t0 = time.perf_counter_ns()
    d = s.decide(sql, "query")
    return (time.perf_counter_ns() - t0) / 1000, d


def measure(policies: Path, state: DatabaseState, database: str, runs: int,
            kinds: list[QueryKind] = KINDS) -> list[dict]:
    """Cold and warm decision latency per kind: one dict per kind (microseconds)."""
    cold_rt, warm_rt = runtime(policies, 0), runtime(policies, 10000)
    settle_heap()  # as ``purpose-proxy serve`` does once it listens: full collections skip what lives on
    out = []
    for k in kinds:
        cold = session(cold_rt, state, database, k.role, k.purpose)
        warm = session(warm_rt, state, database, k.role, k.purpose)
        first = None
        for i in range(WARMUP):
            first = cold.decide(k.sql(10_000 + i), "query")
            warm.decide(k.sql(20_000 + i), "query")  # fills the cache with the kind's shape
        cold_us = [_time_us(cold, k.sql(i))[0] for i in range(runs)]
        cache = warm_rt.cache
        hits0, misses0 = cache.shape_hits + cache.text_hits, cache.misses
        warm_us = [_time_us(warm, k.sql(30_000 + i))[0] for i in range(runs)]
        row = {
            "kind": k.name, "role": k.role, "purpose": k.purpose, "verdict": verdict(first),
            "lines": k.sql(0).count("\n") + 1, "chars": len(k.sql(0)), "runs": runs,
            "cold_p50_us": percentile(cold_us, 0.5), "cold_p99_us": percentile(cold_us, 0.99),
            "cold_mean_us": sum(cold_us) / runs,
            "warm_p50_us": percentile(warm_us, 0.5), "warm_p99_us": percentile(warm_us, 0.99),
            "warm_hits": cache.shape_hits + cache.text_hits - hits0, "warm_misses": cache.misses - misses0,
        }
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decisions", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=200, help="timed decisions per kind and mode (200)")
    p.add_argument("--policies", type=Path, default=None, help="policy directory (default: the shipped one)")
    p.add_argument("--dsn", help="read the schema of the sample database from this DSN instead of schema.yaml")
    p.add_argument("--database", default="isp")
    args = p.parse_args(argv)
    from proxy.devtools.sample import policies_dir

    policies = args.policies or policies_dir()
    state = asyncio.run(live_state(args.dsn, args.database)) if args.dsn else schema_file_state(policies)
    rows = measure(policies, state, args.database, args.runs)
    from benchmarks.report import decisions_table

    print(decisions_table(rows))
    print(f"\n(median of the cold p50s of the six kinds: {median(r['cold_p50_us'] for r in rows[:6]):.0f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
