"""Fixtures of the enforcement tests: the test schema in database ``app`` and the enforcing proxy."""

from __future__ import annotations

import psycopg
import pytest

from proxy.devtools.process import ProxyProcess
from tests.support.enforce import POLICY_DIR, SCHEMA_SQL


def enforcing_proxy(pg, policy_dir, watch_interval: float = 0.2) -> ProxyProcess:
    """The real proxy under purpose enforcement with the policy in ``policy_dir``."""
    return ProxyProcess(pg.address, "--decider", "purpose", "--policies", str(policy_dir),
                        "--schema-dsn", pg.url("postgres", dbname="postgres"),
                        "--policy-watch-interval", str(watch_interval)).start()


@pytest.fixture(scope="session")
def enforce_db(pg):
    """Database ``app`` holding tests/fixtures/enforce/schema.sql (owned by app), with planner
    statistics (as any production database has them). Yields the direct DSN for app."""
    dsn = pg.dsn("app")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL.read_text())
        conn.execute("ANALYZE crm.members, billing.cards, billing.invoices, \"Crm\".\"VIP\", public.notes, "
                     "public.members")
    return dsn


@pytest.fixture(scope="session")
def enforce_proxy(pg, enforce_db):
    """The enforcing proxy in front of ``pg`` with tests/fixtures/enforce/policies."""
    p = enforcing_proxy(pg, POLICY_DIR)
    yield p
    p.stop()
