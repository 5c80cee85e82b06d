"""Canaries planted in every personal column of the sample database do not come back, through the real proxy in
three client modes, to a role and purpose the shipped policy keeps them from (hunt 25's oracle, trimmed)."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from proxy.demo import DATABASE, PASSWORD, READER, setup_database
from proxy.devtools.cluster import Cluster, find_pg_bin
from proxy.devtools.process import ProxyProcess
from proxy.devtools.sample import policies_dir
from proxy.policy.engine import Policy
from tests.support.canaries import Hunt, Oracle, pairs, plant

pytestmark = pytest.mark.integration

MODES = ("simple", "binary", "asyncpg")


@pytest.fixture(scope="module")
def planted():
    """A cluster of its own with the sample database (200 members, seed 1), canaries planted, behind a proxy
    enforcing the shipped policy; yields (oracle, proxy DSN, direct superuser connection)."""
    bin_dir = find_pg_bin()
    assert bin_dir is not None, "PostgreSQL binaries (initdb, pg_ctl) not found"
    policy = Policy.load(policies_dir())
    cluster = Cluster(users=[], bin_dir=bin_dir, base_dir=None)
    cluster.start()
    proxy = admin = None
    try:
        asyncio.run(setup_database(cluster, sorted(s for s in policy.subjects if s not in policy.groups), 200, 1))
        admin = psycopg.connect(host=cluster.host, port=cluster.port, user="postgres", dbname=DATABASE,
                                autocommit=True)
        oracle = Oracle.load(policy, admin, plant(admin))
        reader = f"postgresql://{READER}:{PASSWORD}@{cluster.host}:{cluster.port}/postgres"
        proxy = ProxyProcess(f"{cluster.host}:{cluster.port}", "--decider", "purpose", "--policies",
                             str(policies_dir()), "--schema-dsn", reader, "--policy-watch-interval", "0").start(60)
        yield oracle, {"host": proxy.host, "port": proxy.port, "dbname": DATABASE, "password": PASSWORD}, admin
    finally:
        if admin is not None:
            admin.close()
        if proxy is not None:
            proxy.stop()
        cluster.stop()
        cluster.cleanup()


def report(hunt: Hunt, limit: int = 25) -> str:
    shown = "\n".join(hunt.failures[:limit])
    more = f"\n... and {len(hunt.failures) - limit} more" if len(hunt.failures) > limit else ""
    return f"{len(hunt.failures)} problem(s) in {hunt.statements} statements:\n{shown}{more}"


def test_the_scanner_finds_every_planted_column_where_it_may_be_read(planted):
    """The oracle is not blind: each planted column, read under a purpose that may read it raw, is found."""
    oracle, dsn, _ = planted
    missed = []
    for name in sorted(set(oracle.text_columns.values()) | {n for n, _ in oracle.numbers.values()}):
        table, column = name.rsplit(".", 1)
        reader = next(((r, p) for r, p in pairs(oracle.policy)
                       if oracle.decision(r, p, table, column).effect == "allow"), None)
        if reader is None:
            continue  # no purpose reads it raw: every read of it is checked by the hunt instead
        with psycopg.connect(**dsn, user=reader[0], options=f"-c pii.purpose={reader[1]}", autocommit=True) as conn:
            try:
                rows = conn.execute(f"SELECT {column}::text FROM {table} WHERE {column} IS NOT NULL LIMIT 3").fetchall()
            except psycopg.Error as e:
                missed.append(f"{name}: {reader[0]} under {reader[1]} may read it raw, yet: {e}")
                continue
        if not any(hit.column == name for row in rows for hit in oracle.hits(str(row[0]))):
            missed.append(f"{name}: read by {reader[0]} under {reader[1]} as {rows}, no canary recognised")
    assert not missed, "\n".join(missed)


@pytest.mark.parametrize("mode", MODES)
def test_no_purpose_gets_back_what_the_policy_keeps_from_it(planted, mode):
    oracle, dsn, admin = planted
    hunt = Hunt(oracle, dsn, admin, mode, chan=f"zq_{uuid.uuid4().hex[:12]}").run()
    assert hunt.statements > 300, f"only {hunt.statements} statements ran: the corpus lost its shapes"
    assert not hunt.failures, report(hunt)
