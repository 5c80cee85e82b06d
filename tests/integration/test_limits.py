"""Limits of the real proxy: the largest client message and the number of client sessions."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors

from tests.support.rawpg import RawConnection, ServerError, error_fields, query_message
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

LIMIT = 4096


# --- --max-message-size ---------------------------------------------------------------------


@pytest.fixture
def small_proxy(start_proxy):
    return start_proxy("--max-message-size", str(LIMIT))


def test_oversized_query_closes_only_that_client(pg, small_proxy):
    p = small_proxy
    dsn = pg.dsn("app", host=p.host, port=p.port)
    with psycopg.connect(dsn, autocommit=True) as other, psycopg.connect(dsn, autocommit=True) as victim:
        other.execute("SELECT 1")
        # A Query message of exactly the limit passes (the length counts itself, not the type byte).
        fits = "SELECT '" + "x" * (LIMIT - 4 - 1 - len("SELECT ''")) + "'"
        assert len(query_message(fits)) - 1 == LIMIT
        assert victim.execute(fits).fetchone()[0] == "x" * (LIMIT - 14)
        too_big = "SELECT '" + "x" * 5000 + "'"
        with pytest.raises(psycopg.OperationalError) as ei:
            victim.execute(too_big)
        assert isinstance(ei.value, errors.ProtocolViolation)
        assert ei.value.sqlstate == "08P01"
        assert ei.value.diag.severity == "FATAL"
        assert "over the limit of 4096" in str(ei.value)
        assert victim.closed
        # The other session on the same proxy is untouched, and new sessions are served.
        assert other.execute("SELECT 'still here'").fetchone() == ("still here",)
    with psycopg.connect(dsn, autocommit=True) as fresh:
        assert fresh.execute("SELECT 2").fetchone() == (2,)
    assert p.proc.poll() is None


def test_oversized_bind_parameter_is_refused_too(pg, small_proxy):
    p = small_proxy
    dsn = pg.dsn("app", host=p.host, port=p.port)
    with psycopg.connect(dsn, autocommit=True) as other, psycopg.connect(dsn, autocommit=True) as victim:
        assert victim.execute("SELECT length(%s)", ("y" * 3000,)).fetchone() == (3000,)
        with pytest.raises(errors.ProtocolViolation) as ei:
            victim.execute("SELECT length(%s)", ("y" * 5000,))  # the Bind message is too large
        assert ei.value.sqlstate == "08P01"
        assert victim.closed
        assert other.execute("SELECT length(%s)", ("z" * 100,)).fetchone() == (100,)


def test_oversized_message_on_the_wire(small_proxy):
    p = small_proxy
    with RawConnection(p.host, p.port, user="trustuser") as bystander:
        raw = RawConnection(p.host, p.port, user="trustuser")
        try:
            raw.send(query_message("SELECT '" + "x" * 5000 + "'"))
            msgs = []
            while True:
                try:
                    msgs.append(raw.read_message())
                except (EOFError, ConnectionResetError):
                    break
                assert len(msgs) < 10
        finally:
            raw.sock.close()
        assert [t for t, _ in msgs] == [b"E"]  # one FATAL error, then the connection ends
        f = error_fields(msgs[0][1])
        assert (f["S"], f["C"]) == ("FATAL", "08P01")
        assert f["M"] == "protocol violation: message of type 'Q' is 5014 bytes, over the limit of 4096"
        assert bystander.simple_query("SELECT 1")[-1] == (b"Z", b"I")


# --- --max-client-connections ------------------------------------------------------------------


def test_max_client_connections(pg, start_proxy):
    p = start_proxy("--max-client-connections", "2")
    dsn = pg.dsn("app", host=p.host, port=p.port)

    async def asyncpg_attempt():
        return await asyncpg.connect(host=p.host, port=p.port, user="app", password="app-secret",
                                     database="app", timeout=15)

    first = psycopg.connect(dsn, autocommit=True)
    second = psycopg.connect(dsn, autocommit=True)
    try:
        # The third client is refused, through every client, with PostgreSQL's own words.
        with pytest.raises(asyncpg.exceptions.TooManyConnectionsError) as ai:
            asyncio.run(asyncpg_attempt())
        assert ai.value.sqlstate == "53300"
        assert ai.value.message == "sorry, too many clients already"
        with pytest.raises(ServerError) as ri:
            RawConnection(p.host, p.port, user="trustuser", timeout=15)
        assert (ri.value.fields["S"], ri.value.fields["C"]) == ("FATAL", "53300")
        r = subprocess.run(["psql", dsn, "-X", "-c", "SELECT 1"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert "FATAL:  sorry, too many clients already" in r.stderr
        with pytest.raises(psycopg.OperationalError) as pi:
            psycopg.connect(dsn, connect_timeout=15)
        assert "sorry, too many clients already" in str(pi.value)

        # The first two keep working, and a cancel request is not a client session:
        # it goes through while the proxy is full.
        assert first.execute("SELECT 'first'").fetchone() == ("first",)
        assert second.execute("SELECT 'second'").fetchone() == ("second",)
        failure: list[BaseException] = []

        def sleep():
            try:
                second.execute("SELECT pg_sleep(60)")
            except BaseException as exc:  # noqa: BLE001 - checked below
                failure.append(exc)

        t = threading.Thread(target=sleep, daemon=True)
        t.start()
        pid = second.info.backend_pid
        wait_for(lambda: first.execute("SELECT state = 'active' FROM pg_stat_activity WHERE pid = %s",
                                       (pid,)).fetchone() == (True,), 15, "pg_sleep to run")
        second.cancel_safe(timeout=10)
        t.join(20)
        assert not t.is_alive()
        assert isinstance(failure[0], errors.QueryCanceled)

        # After one disconnects, a new client is admitted (once the proxy saw it go).
        first.close()

        def admitted():
            try:
                return psycopg.connect(dsn, autocommit=True, connect_timeout=15)
            except psycopg.OperationalError as exc:
                assert "too many clients" in str(exc)
                return None

        third = wait_for(admitted, 15, "a slot to free up")
        try:
            assert third.execute("SELECT 'third'").fetchone() == ("third",)
            assert second.execute("SELECT 'second again'").fetchone() == ("second again",)
            with pytest.raises(asyncpg.exceptions.TooManyConnectionsError):
                asyncio.run(asyncpg_attempt())
        finally:
            third.close()
    finally:
        first.close()
        second.close()
