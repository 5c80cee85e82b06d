"""Shared fixtures: a throwaway PostgreSQL cluster and the real proxy in front of it.

Set PURPOSE_PROXY_TEST_ADMIN_DSN to a superuser DSN of an existing server to run
against it instead of starting a cluster (the test roles are created if missing).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from proxy.devtools.cluster import DEFAULT_USERS, Cluster, find_pg_bin
from proxy.devtools.process import RELAY_ONLY, ProxyProcess


class ExistingServer:
    """A server the tests did not start, reached through PURPOSE_PROXY_TEST_ADMIN_DSN."""

    def __init__(self, admin_dsn: str) -> None:
        import psycopg

        self.admin_dsn = admin_dsn
        self.users = list(DEFAULT_USERS)
        info = psycopg.conninfo.conninfo_to_dict(admin_dsn)
        self.host = info.get("host", "127.0.0.1")
        self.port = int(info.get("port", 5432))
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            for u in self.users:
                if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (u.name,)).fetchone():
                    conn.execute(f'CREATE ROLE "{u.name}" LOGIN PASSWORD %s', (u.password,))
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (u.name,)).fetchone():
                    conn.execute(f'CREATE DATABASE "{u.name}" OWNER "{u.name}"')

    address = property(lambda self: f"{self.host}:{self.port}")
    dsn = Cluster.dsn
    url = Cluster.url

    def psql_admin(self, sql: str, dbname: str = "postgres") -> str:
        return subprocess.run(["psql", self.admin_dsn, "-d", dbname, "-XqAt", "-v", "ON_ERROR_STOP=1", "-c", sql],
                              check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def pg():
    """The PostgreSQL server under test (users: app/scram, md5user, pwuser, trustuser)."""
    admin = os.environ.get("PURPOSE_PROXY_TEST_ADMIN_DSN")
    if admin:
        yield ExistingServer(admin)
        return
    if find_pg_bin() is None:
        pytest.fail("PostgreSQL server binaries not found: install the postgresql package (see .ci/run)")
    # Prepared transactions (two-phase commit) on, so that the tests can commit DDL with COMMIT PREPARED.
    with Cluster(settings={"max_prepared_transactions": "10"}) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def proxy(pg):
    """The real proxy (relay only: every statement allowed) in front of ``pg``."""
    p = ProxyProcess(pg.address, *RELAY_ONLY).start()
    yield p
    p.stop()


@pytest.fixture
def start_proxy(pg):
    """Factory: start a proxy with extra CLI arguments (relay only unless --decider is given)."""
    started: list[ProxyProcess] = []

    def start(*args: str, upstream: str | None = None, env: dict | None = None) -> ProxyProcess:
        extra = () if "--decider" in args else RELAY_ONLY
        p = ProxyProcess(upstream or pg.address, *extra, *args, env=env).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def pg_tls():
    """A second throwaway cluster with TLS on (``ssl = on``, self-signed cert at ``.cert``,
    SAN localhost and 127.0.0.1), same users as ``pg``. Started once, on first use."""
    if find_pg_bin() is None:
        pytest.fail("PostgreSQL server binaries not found: install the postgresql package (see .ci/run)")
    with Cluster(tls=True) as cluster:
        yield cluster
