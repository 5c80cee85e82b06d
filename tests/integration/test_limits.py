"""Limits of the real proxy: the largest client message, the number of client sessions (in all and per
role), the longest statement, and the idle-session and authentication timeouts.

Where PostgreSQL has the same limit (a role's CONNECTION LIMIT, idle_session_timeout), the proxy's answer
is compared with PostgreSQL's own.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import errors

from tests.support.faults import (Bystander, admin_dsn, app_name, closed_without_a_word, read_message,
                                  read_until_eof, tcp_connections, wait_connections, wait_no_backends,
                                  wait_sessions)
from tests.support.observability import Scrape
from tests.support.rawpg import RawConnection, ServerError, error_fields, query_message, startup_message
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


# --- --max-connections-per-role -------------------------------------------------------------


def too_many_for(role: str) -> str:
    return f'too many connections for role "{role}"'


@pytest.fixture
def limited_role(pg):
    """A role with PostgreSQL's own CONNECTION LIMIT 1, to compare the proxy's per-role limit with."""
    name = "limited_" + uuid.uuid4().hex[:8]
    with psycopg.connect(admin_dsn(pg), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'limited-secret' CONNECTION LIMIT 1")
    yield name
    with psycopg.connect(admin_dsn(pg), autocommit=True) as conn:
        wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                      (name,)).fetchone() == (0,), 15, f"the sessions of {name} to end")
        conn.execute(f"DROP ROLE {name}")


def test_connections_count_before_their_startup_packet(pg, start_proxy):
    """Hunt 21: silent connections counted towards nothing until their startup packet; one client held 20000 of
    them, every descriptor the proxy had, and other clients could not connect. Now every connection counts, up to
    max_client_connections and a tenth more (at least 10) for cancel requests and clients starting up."""
    p = start_proxy("--max-client-connections", "2", "--auth-timeout", "120")
    silent = [socket.create_connection((p.host, p.port), timeout=30) for _ in range(12)]
    try:
        wait_for(lambda: tcp_connections(p.proc.pid) >= 12, 30, "the proxy to accept the silent connections")
        with socket.create_connection((p.host, p.port), timeout=30) as extra:
            extra.sendall(startup_message("app", "app"))  # refused after its startup packet, as PostgreSQL does
            kind, _, body = read_message(extra)
            assert kind == b"E" and (error_fields(body)["S"], error_fields(body)["C"]) == ("FATAL", "53300")
        # One more, silent: not held until auth_timeout (120 s here; the socket would time out first).
        with socket.create_connection((p.host, p.port), timeout=30) as extra:
            kind, _, body = read_message(extra)
            assert kind == b"E" and error_fields(body)["C"] == "08006"
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(pg.dsn("app", host=p.host, port=p.port), connect_timeout=15)
        assert "sorry, too many clients already" in str(info.value)
        assert "refusing connections" in p.log()
    finally:
        for s in silent:
            s.close()
    # The slots are free again once the silent connections are gone.
    wait_for(lambda: tcp_connections(p.proc.pid) == 0, 30, "the silent connections to be closed")
    with psycopg.connect(pg.dsn("app", host=p.host, port=p.port), autocommit=True, connect_timeout=15) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_max_connections_per_role_answers_like_postgresql(pg, start_proxy, limited_role):
    p = start_proxy("--max-connections-per-role", "1")
    cases = {
        "direct": dict(host=pg.host, port=pg.port, user=limited_role, password="limited-secret", dbname="postgres"),
        "proxy": dict(host=p.host, port=p.port, user="app", password="app-secret", dbname="app"),
    }
    for where, kw in cases.items():
        dsn = " ".join(f"{k}={v}" for k, v in kw.items())

        async def attempt(kw=kw):
            return await asyncpg.connect(host=kw["host"], port=kw["port"], user=kw["user"],
                                         password=kw["password"], database=kw["dbname"], timeout=15)

        with psycopg.connect(dsn, autocommit=True) as held:
            with pytest.raises(psycopg.OperationalError) as pi:
                psycopg.connect(dsn, connect_timeout=15)
            assert f"FATAL:  {too_many_for(kw['user'])}" in str(pi.value), where
            with pytest.raises(asyncpg.exceptions.TooManyConnectionsError) as ai:
                asyncio.run(attempt())
            assert (ai.value.sqlstate, ai.value.message) == ("53300", too_many_for(kw["user"])), where
            assert held.execute("SELECT 'held'").fetchone() == ("held",)


def test_max_connections_per_role(pg, start_proxy):
    p = start_proxy("--max-connections-per-role", "2")
    refused_app = app_name("refused")
    dsn = pg.dsn("app", host=p.host, port=p.port)
    first = psycopg.connect(dsn, autocommit=True)
    second = psycopg.connect(dsn, autocommit=True)
    try:
        with pytest.raises(psycopg.OperationalError) as pi:
            psycopg.connect(dsn, connect_timeout=15, application_name=refused_app)
        assert too_many_for("app") in str(pi.value)
        assert "purpose-proxy allows 2 connections per role (max_connections_per_role)" in str(pi.value)
        r = subprocess.run(["psql", dsn, "-X", "-c", "SELECT 1"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"FATAL:  {too_many_for('app')}" in r.stderr
        # Credentials come first: a client without them learns nothing of the role's slots.
        with pytest.raises(psycopg.OperationalError) as wi:
            psycopg.connect(pg.dsn("app", host=p.host, port=p.port, password="wrong"), connect_timeout=15)
        assert "password authentication failed" in str(wi.value)
        # Other roles have slots of their own.
        others = [psycopg.connect(pg.dsn(user, host=p.host, port=p.port), autocommit=True)
                  for user in ("md5user", "md5user", "trustuser")]
        try:
            assert [c.execute("SELECT current_user").fetchone()[0] for c in others] == [
                "md5user", "md5user", "trustuser"]
        finally:
            for c in others:
                c.close()
        assert first.execute("SELECT 'first'").fetchone() == ("first",)
        # The refused sessions left no backend behind.
        wait_no_backends(pg, refused_app)

        # Once one of the role's sessions ends, the next one is admitted.
        first.close()

        def admitted():
            try:
                return psycopg.connect(dsn, autocommit=True, connect_timeout=15)
            except psycopg.OperationalError as exc:
                assert too_many_for("app") in str(exc)
                return None

        third = wait_for(admitted, 15, "one of the role's slots to free up")
        try:
            assert third.execute("SELECT 'third'").fetchone() == ("third",)
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(dsn, connect_timeout=15)
        finally:
            third.close()
    finally:
        first.close()
        second.close()
    scrape = Scrape.of(p.metrics_url)
    assert scrape.get("purpose_proxy_startup_refusals_total", reason="too-many-connections-for-role") >= 3


def test_max_connections_per_role_on_the_wire(pg, start_proxy):
    """As PostgreSQL does: AuthenticationOk, then FATAL 53300 and the end of the connection, nothing else."""
    p = start_proxy("--max-connections-per-role", "1")
    refused_app = app_name("refused-raw")
    with RawConnection(p.host, p.port, user="trustuser") as held:
        raw = RawConnection.__new__(RawConnection)
        raw.sock = socket.create_connection((p.host, p.port), timeout=30)
        raw.buf = bytearray()
        try:
            raw.send(startup_message("trustuser", "trustuser", application_name=refused_app))
            msgs = read_until_eof(raw)
        finally:
            raw.sock.close()
        assert [t for t, _ in msgs] == [b"R", b"E"]
        assert msgs[0][1] == struct.pack("!i", 0)  # AuthenticationOk
        f = error_fields(msgs[1][1])
        assert (f["S"], f["C"], f["M"]) == ("FATAL", "53300", too_many_for("trustuser"))
        assert held.simple_query("SELECT 1")[-1] == (b"Z", b"I")
    wait_no_backends(pg, refused_app)


# --- --max-statement-length -----------------------------------------------------------------------

STATEMENT_LIMIT = 2048


def select_of_length(n: int) -> str:
    """``SELECT 'xxx...'`` of exactly ``n`` bytes."""
    return "SELECT '" + "x" * (n - len("SELECT ''")) + "'"


@pytest.fixture
def short_proxy(start_proxy):
    return start_proxy("--max-statement-length", str(STATEMENT_LIMIT))


def test_statement_over_max_statement_length_on_the_wire(short_proxy):
    p = short_proxy
    with RawConnection(p.host, p.port, user="trustuser") as raw:
        fits = select_of_length(STATEMENT_LIMIT)
        assert [t for t, _ in raw.simple_query(fits)] == [b"T", b"D", b"C", b"Z"]
        msgs = raw.simple_query(select_of_length(STATEMENT_LIMIT + 1))
        assert [t for t, _ in msgs] == [b"E", b"Z"] and msgs[-1] == (b"Z", b"I")
        f = error_fields(msgs[0][1])
        assert (f["S"], f["C"]) == ("ERROR", "54000")
        assert f["M"] == f"statement is {STATEMENT_LIMIT + 1} bytes long, over the limit of {STATEMENT_LIMIT} bytes"
        assert "max_statement_length" in f["D"]
        # Bytes, not characters.
        wide = "SELECT '" + "é" * 1100 + "'"
        assert len(wide) < STATEMENT_LIMIT < len(wide.encode())
        msgs = raw.simple_query(wide)
        assert error_fields(msgs[0][1])["C"] == "54000" and msgs[-1] == (b"Z", b"I")
        # In a transaction block it is an error like any other: the block fails until ROLLBACK.
        assert raw.simple_query("BEGIN")[-1] == (b"Z", b"T")
        msgs = raw.simple_query(select_of_length(5000))
        assert error_fields(msgs[0][1])["C"] == "54000" and msgs[-1] == (b"Z", b"E")
        msgs = raw.simple_query("SELECT 1")
        assert error_fields(msgs[0][1])["C"] == "25P02" and msgs[-1] == (b"Z", b"E")
        assert raw.simple_query("ROLLBACK")[-1] == (b"Z", b"I")
        assert raw.simple_query("SELECT 'usable'")[1] == (b"D", b"\x00\x01\x00\x00\x00\x06usable")


def test_statement_over_max_statement_length_through_drivers(pg, short_proxy):
    p = short_proxy
    before = Scrape.of(p.metrics_url)
    long_sql = "SELECT %s::int, '" + "x" * 3000 + "'"
    with psycopg.connect(pg.dsn("app", host=p.host, port=p.port), autocommit=True) as conn:
        with pytest.raises(errors.ProgramLimitExceeded) as ei:
            conn.execute(long_sql, (1,))  # extended protocol: the Parse is refused
        assert ei.value.sqlstate == "54000"
        assert ei.value.diag.severity == "ERROR"
        assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)

    async def scenario():
        conn = await asyncpg.connect(host=p.host, port=p.port, user="app", password="app-secret", database="app")
        try:
            with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError):
                await conn.fetchval(long_sql.replace("%s", "$1"), 1)
            with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError):
                await conn.prepare(select_of_length(STATEMENT_LIMIT + 1))
            assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
            async with conn.transaction():
                assert await conn.fetchval("SELECT 'in a transaction'") == "in a transaction"
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    after = Scrape.of(p.metrics_url)
    assert after.delta(before, "purpose_proxy_refusals_total", reason="statement-too-long") == 3


# --- --idle-session-timeout -------------------------------------------------------------------------

IDLE_MESSAGE = "terminating connection due to idle-session timeout"


def test_idle_session_timeout_answers_like_postgresql(pg, start_proxy):
    p = start_proxy("--idle-session-timeout", "0.5")

    def scenario(host: str, port: int, **params: str) -> list[tuple[bytes, dict]]:
        with RawConnection(host, port, user="trustuser", **params) as raw:
            assert raw.simple_query("SELECT 1")[-1] == (b"Z", b"I")
            return [(t, error_fields(b)) for t, b in read_until_eof(raw)]

    direct = scenario(pg.host, pg.port, options="-c idle_session_timeout=500")
    through = scenario(p.host, p.port)
    assert [t for t, _ in direct] == [t for t, _ in through] == [b"E"]
    fields = lambda f: (f["S"], f["V"], f["C"], f["M"])  # noqa: E731
    assert fields(through[0][1]) == fields(direct[0][1]) == ("FATAL", "FATAL", "57P05", IDLE_MESSAGE)
    wait_sessions(p, 0)


def test_idle_session_timeout_spares_transactions_and_running_statements(pg, start_proxy):
    p = start_proxy("--idle-session-timeout", "0.5")
    dsn = pg.dsn("app", host=p.host, port=p.port)
    app_tx, app_busy = app_name("idle-tx"), app_name("idle-busy")
    in_tx = psycopg.connect(dsn, application_name=app_tx)  # not autocommit: statements open a block
    busy = psycopg.connect(dsn, autocommit=True, application_name=app_busy)
    try:
        with Bystander(dsn):  # a session that keeps working is never idle
            assert in_tx.execute("SELECT 'in a block'").fetchone() == ("in a block",)
            # A statement longer than the timeout: the session is not idle while it runs.
            assert busy.execute("SELECT pg_sleep(1.5)::text, 'done'").fetchone() == ("", "done")
            # A session left idle from here on is ended: by then the timeout has passed for the
            # session idle in its transaction block, and for the one that just finished.
            with RawConnection(p.host, p.port, user="trustuser") as clock:
                msgs = read_until_eof(clock)
            assert [(t, error_fields(b)["C"]) for t, b in msgs] == [(b"E", "57P05")]
            assert in_tx.execute("SELECT 'still in the block'").fetchone() == ("still in the block",)
            in_tx.commit()  # idle outside a block from now on
            wait_no_backends(pg, app_tx)  # the proxy ended it, backend included
            with pytest.raises(psycopg.OperationalError) as ei:
                in_tx.execute("SELECT 1")
            assert ei.value.sqlstate == "57P05"
            wait_no_backends(pg, app_busy)
            with pytest.raises(psycopg.OperationalError) as ei:
                busy.execute("SELECT 1")
            assert ei.value.sqlstate == "57P05"
            assert IDLE_MESSAGE in str(ei.value)
    finally:
        in_tx.close()
        busy.close()
    wait_sessions(p, 0)


# --- --auth-timeout --------------------------------------------------------------------------------


def test_auth_timeout_closes_clients_that_do_not_authenticate(pg, start_proxy):
    """Like PostgreSQL's authentication_timeout: whether the startup packet never comes or the client stalls
    mid-authentication, the connection is closed without an error message (PostgreSQL only logs it)."""
    p = start_proxy("--auth-timeout", "0.5", "--max-client-connections", "1")
    with socket.create_connection((p.host, p.port), timeout=30) as s:  # sends nothing
        assert closed_without_a_word(s)
    with socket.create_connection((p.host, p.port), timeout=30) as s:  # half a startup packet
        s.sendall(struct.pack("!i", 64))
        assert closed_without_a_word(s)
    with socket.create_connection((p.host, p.port), timeout=30) as s:  # SSLRequest, then nothing
        s.sendall(struct.pack("!ii", 8, 80877103))
        assert s.recv(1) == b"N"
        assert closed_without_a_word(s)
    # A SCRAM user that never answers the server's AuthenticationSASL: it holds the only client
    # slot and an upstream connection until auth_timeout, then both are closed.
    with socket.create_connection((p.host, p.port), timeout=30) as s:
        s.sendall(startup_message("app", "app"))
        assert read_message(s)[:2] == (b"R", 10)  # AuthenticationSASL
        assert closed_without_a_word(s)
    wait_connections(p, 0)  # no upstream connection left behind
    assert "not authenticated within auth_timeout" in p.log()
    # The slot is free again, and an authenticated session is not bound by auth_timeout.
    with psycopg.connect(pg.dsn("app", host=p.host, port=p.port), autocommit=True, connect_timeout=15) as conn:
        with socket.create_connection((p.host, p.port), timeout=30) as clock:  # outlives auth_timeout
            assert closed_without_a_word(clock)
        assert conn.execute("SELECT 'authenticated'").fetchone() == ("authenticated",)
    wait_sessions(p, 0)
