"""Fault injection through the real proxy and a real PostgreSQL.

A TCP fault proxy (``proxy/devtools/faultproxy.py``) sits between purpose-proxy and
PostgreSQL, or between the client and purpose-proxy, and resets, half-closes,
blackholes, delays, fragments and stalls connections or refuses new ones;
PostgreSQL itself is restarted. (test_faults.py has a backend killed mid-statement,
an immediate stop with idle sessions, pg_terminate_backend, a missing upstream and a
slow reader of a huge result; these are the faults it does not cover.)

For each fault the affected client gets a clean error, with the SQLSTATE
PostgreSQL itself uses for it:

- the upstream connection lost (reset, half-closed, or silent past
  ``upstream_response_timeout`` even to a cancel request): FATAL 08006
  connection_failure, the class PostgreSQL defines for a broken connection and
  what libpq reports when it loses its server (PgBouncer sends FATAL 08P01
  "server conn crashed?" there, a protocol-violation code that tells the client
  less);
- PostgreSQL ending the session itself (a fast restart): its own FATAL 57P01,
  passed on with nothing of the proxy's after it;
- a statement the proxy cancels after ``upstream_response_timeout``:
  PostgreSQL's own ERROR 57014 (the proxy sends a real CancelRequest, so the backend
  stops and answers as PostgreSQL's own statement_timeout does, with 57014), and the
  session goes on (PgBouncer's query_timeout instead drops both connections);
- no answer to the startup packet within ``connect_timeout``: FATAL 08006, like an
  unreachable server.

And nothing leaks: no backend of the session is left in pg_stat_activity, the
proxy's ``purpose_proxy_client_sessions_open`` gauge and its TCP connections go back
to what they were, and a second session (``Bystander``) keeps running statements
throughout. The module has a cluster of its own (it is restarted), with
``authentication_timeout = 1s`` so that PostgreSQL's own behaviour can be compared.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import errors

from proxy.devtools.cluster import Cluster
from proxy.devtools.faultproxy import DOWN, UP, FaultProxy
from proxy.devtools.process import RELAY_ONLY, ProxyProcess
from tests.support.faults import (Bystander, Worker, app_name, closed_without_a_word, read_message, read_until_eof,
                                  wait_active, wait_connections, wait_no_backends, wait_sessions)
from tests.support.observability import Scrape
from tests.support.rawpg import RawConnection, ServerError, error_fields, query_message, startup_message
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

LOST = "connection to the upstream PostgreSQL server was lost"
ADMIN_SHUTDOWN = "terminating connection due to administrator command"


@pytest.fixture(scope="module")
def cluster():
    with Cluster(settings={"authentication_timeout": "1s"}) as c:
        yield c


@pytest.fixture
def start(cluster):
    """Factory: the real proxy (relay only) in front of ``upstream`` (default: the cluster itself)."""
    started: list[ProxyProcess] = []

    def start(*args: str, upstream: str | None = None) -> ProxyProcess:
        p = ProxyProcess(upstream or cluster.address, *RELAY_ONLY, *args).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def upstream_fp(cluster):
    """A fault proxy in front of the cluster: start purpose-proxy with ``upstream=upstream_fp.address``."""
    with FaultProxy.to(cluster.address) as fp:
        yield fp


def dsn_of(cluster, where, user: str = "app") -> str:
    """A DSN for ``user`` through ``where`` (a proxy or a fault proxy)."""
    return cluster.dsn(user, host=where.host, port=where.port)


def fatal(msgs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, str, str, str]]:
    """(type, severity, SQLSTATE, message) of the errors and notices among ``msgs``."""
    return [(t, *(error_fields(b)[k] for k in "SCM")) for t, b in msgs if t in (b"E", b"N")]


def wait_only_the_bystander_left(cluster, p, *gone_apps: str) -> None:
    """The victims' backends are gone and the proxy holds only the bystander's session (client and upstream)."""
    for app in gone_apps:
        wait_no_backends(cluster, app)
    wait_sessions(p, 1)
    wait_connections(p, 2)


def big_result_query(rows: int, width: int = 1000) -> bytes:
    return query_message(f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})")


def read_data_rows(raw: RawConnection, n: int) -> None:
    """Read the RowDescription and ``n`` DataRows of a result that is still streaming."""
    assert raw.read_message()[0] == b"T"
    for _ in range(n):
        assert raw.read_message()[0] == b"D"


@pytest.fixture
def table(cluster):
    name = "fi_" + uuid.uuid4().hex[:12]
    with psycopg.connect(cluster.dsn("app"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (v int)")
    yield name
    with psycopg.connect(cluster.dsn("app"), autocommit=True, connect_timeout=30) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


# --- the upstream connection reset (RST) ---------------------------------------------------------


def test_upstream_reset_between_statements(cluster, upstream_fp, start):
    p = start(upstream=upstream_fp.address)
    dsn = dsn_of(cluster, p)
    victim_app, raw_app = app_name("reset-idle"), app_name("reset-idle-raw")
    with Bystander(dsn):  # upstream link 0
        victim = psycopg.connect(dsn, autocommit=True, application_name=victim_app)  # link 1
        raw = RawConnection(p.host, p.port, user="trustuser", application_name=raw_app)  # link 2
        try:
            assert victim.execute("SELECT 'before'").fetchone() == ("before",)
            upstream_fp.link(1).reset()
            upstream_fp.link(2).reset()
            # On the wire, unasked and at once: FATAL 08006, then the end of the connection.
            assert fatal(read_until_eof(raw)) == [(b"E", "FATAL", "08006", LOST)]
            with pytest.raises(psycopg.OperationalError) as ei:
                victim.execute("SELECT 'after'")
            assert ei.value.sqlstate == "08006"
            assert LOST in str(ei.value)
            assert victim.closed
        finally:
            victim.close()
            raw.sock.close()
        wait_only_the_bystander_left(cluster, p, victim_app, raw_app)
    wait_sessions(p, 0)


def test_upstream_reset_mid_statement_cancels_the_orphaned_statement(cluster, upstream_fp, start):
    p = start(upstream=upstream_fp.address)
    dsn = dsn_of(cluster, p)
    app = app_name("reset-busy")
    with Bystander(dsn):  # link 0
        victim = psycopg.connect(dsn, autocommit=True, application_name=app)  # link 1
        try:
            worker = Worker(lambda: victim.execute("SELECT pg_sleep(600)"))
            worker.start()
            wait_active(cluster, app)
            upstream_fp.link(1).reset()
            _, exc = worker.outcome(30)
            assert isinstance(exc, psycopg.OperationalError), exc
            assert exc.sqlstate == "08006"
            assert LOST in str(exc)
        finally:
            victim.close()
        # The backend would sleep on for ten minutes, unaware its connection is gone: the proxy
        # cancelled the statement (a CancelRequest of its own), and answering it the backend
        # found its connection gone and exited.
        wait_no_backends(cluster, app, timeout=60)
        wait_sessions(p, 1)
        wait_connections(p, 2)  # the bystander's client and upstream connections


def test_upstream_reset_mid_result(cluster, upstream_fp, start):
    p = start(upstream=upstream_fp.address)
    dsn = dsn_of(cluster, p)
    app = app_name("reset-result")
    with Bystander(dsn):  # link 0
        raw = RawConnection(p.host, p.port, user="trustuser", application_name=app)  # link 1
        try:
            raw.send(big_result_query(1_000_000))  # about 1 GB: still streaming when cut
            read_data_rows(raw, 100)
            upstream_fp.link(1).reset()
            tail = []
            try:
                while True:
                    msg = raw.read_message()
                    if msg[0] != b"D":
                        tail.append(msg)
            except (EOFError, ConnectionResetError):
                pass
        finally:
            raw.sock.close()
        # The stream ends. Cut at a message boundary, the proxy says why (FATAL 08006); cut inside
        # a DataRow, it cannot add a message without corrupting the stream, and only ends it.
        assert [t for t, _ in tail] in ([], [b"E"]), tail
        assert fatal(tail) in ([], [(b"E", "FATAL", "08006", LOST)])
        wait_no_backends(cluster, app)
        wait_sessions(p, 1)
        wait_connections(p, 2)  # the bystander's client and upstream connections


def test_all_upstream_connections_dropped_at_once(cluster, upstream_fp, start):
    p = start(upstream=upstream_fp.address)
    dsn = dsn_of(cluster, p)
    idle_app, busy_app, tx_app = app_name("drop-idle"), app_name("drop-busy"), app_name("drop-tx")
    idle = psycopg.connect(dsn, autocommit=True, application_name=idle_app)
    busy = psycopg.connect(dsn, autocommit=True, application_name=busy_app)
    in_tx = psycopg.connect(dsn, application_name=tx_app)
    try:
        in_tx.execute("SELECT 'in a block'")
        worker = Worker(lambda: busy.execute("SELECT pg_sleep(600)"))
        worker.start()
        wait_active(cluster, busy_app)
        upstream_fp.reset_all()
        _, exc = worker.outcome(30)
        assert isinstance(exc, psycopg.OperationalError) and exc.sqlstate == "08006", exc
        for conn in (idle, in_tx):
            with pytest.raises(psycopg.OperationalError) as ei:
                conn.execute("SELECT 1")
            assert ei.value.sqlstate == "08006"
    finally:
        for conn in (idle, busy, in_tx):
            conn.close()
    # The proxy stays up and serves new sessions over new upstream connections.
    with psycopg.connect(dsn, autocommit=True) as fresh:
        assert fresh.execute("SELECT 'fresh'").fetchone() == ("fresh",)
    for app in (idle_app, busy_app, tx_app):
        wait_no_backends(cluster, app, timeout=60)
    wait_sessions(p, 0)


# --- PostgreSQL restarted -------------------------------------------------------------------------


def test_upstream_fast_restart_mid_statement_and_in_a_transaction_block(cluster, start, table):
    """pg_ctl restart -m fast: every backend sends FATAL 57P01 and exits. The proxy passes PostgreSQL's own
    error on (and adds no 08006 of its own after it); the open transaction is rolled back."""
    p = start()
    dsn = dsn_of(cluster, p)
    busy_app, raw_app, tx_app = app_name("restart-busy"), app_name("restart-raw"), app_name("restart-tx")
    busy = psycopg.connect(dsn, autocommit=True, application_name=busy_app)
    in_tx = psycopg.connect(dsn, application_name=tx_app)
    raw = RawConnection(p.host, p.port, user="trustuser", application_name=raw_app)
    try:
        in_tx.execute(f"INSERT INTO {table} VALUES (1)")  # a transaction block, left open between statements
        worker = Worker(lambda: busy.execute("SELECT pg_sleep(600)"))
        worker.start()
        raw.send(query_message("SELECT pg_sleep(600)"))
        wait_active(cluster, busy_app)
        wait_active(cluster, raw_app)
        cluster.restart()
        assert fatal(read_until_eof(raw)) == [(b"E", "FATAL", "57P01", ADMIN_SHUTDOWN)]
        _, exc = worker.outcome(30)
        assert isinstance(exc, psycopg.OperationalError) and exc.sqlstate == "57P01", exc
        with pytest.raises(psycopg.OperationalError) as ei:
            in_tx.execute("COMMIT")
        assert ei.value.sqlstate == "57P01"
        assert ADMIN_SHUTDOWN in str(ei.value)
    finally:
        for conn in (busy, in_tx):
            conn.close()
        raw.sock.close()
    wait_sessions(p, 0)

    def serving():
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                return conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        except psycopg.OperationalError:
            return None

    assert wait_for(serving, 60, "sessions through the proxy to work again", 0.25) == (0,)  # rolled back


# --- an upstream that accepts and never answers ---------------------------------------------------


def test_upstream_that_never_answers_the_startup_packet(cluster, upstream_fp, start):
    p = start("--connect-timeout", "0.5", "--max-client-connections", "2", upstream=upstream_fp.address)
    dsn = dsn_of(cluster, p)
    with Bystander(dsn):  # connected before: its upstream connection works throughout
        before = Scrape.of(p.metrics_url)
        upstream_fp.blackhole()  # new connections are accepted and never answered
        for _ in range(3):  # more than the one free slot: every attempt gives it back
            with pytest.raises(psycopg.OperationalError) as pi:
                psycopg.connect(dsn, connect_timeout=15)
            assert "could not connect to the upstream PostgreSQL server at" in str(pi.value)
            assert "no answer to the startup packet within 0.5 seconds (connect_timeout)" in str(pi.value)
        with pytest.raises(ServerError) as ri:
            RawConnection(p.host, p.port, user="trustuser", timeout=15)
        assert (ri.value.fields["S"], ri.value.fields["C"]) == ("FATAL", "08006")

        async def attempt():
            return await asyncpg.connect(host=p.host, port=p.port, user="app", password="app-secret",
                                         database="app", timeout=15)

        with pytest.raises(asyncpg.exceptions.ConnectionFailureError) as ai:
            asyncio.run(attempt())
        assert ai.value.sqlstate == "08006"
        # The proxy closed its end of every connection nobody answered.
        wait_for(lambda: upstream_fp.open_links == 1, 30, "only the bystander's upstream link to stay open")
        wait_connections(p, 2)  # the bystander's client and upstream connections
        assert Scrape.of(p.metrics_url).delta(before, "purpose_proxy_upstream_connect_failures_total") == 5
        upstream_fp.blackhole(False)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=15) as conn:
            assert conn.execute("SELECT 'answered'").fetchone() == ("answered",)
    wait_sessions(p, 0)


def test_upstream_refusing_new_connections(cluster, upstream_fp, start):
    p = start(upstream=upstream_fp.address)
    dsn = dsn_of(cluster, p)
    with Bystander(dsn):
        upstream_fp.refuse()
        with pytest.raises(psycopg.OperationalError) as pi:
            psycopg.connect(dsn, connect_timeout=15)
        assert "could not connect to the upstream PostgreSQL server at" in str(pi.value)
        assert "ConnectionRefusedError" in str(pi.value)
        upstream_fp.heal()
        with psycopg.connect(dsn, autocommit=True, connect_timeout=15) as conn:
            assert conn.execute("SELECT 'back'").fetchone() == ("back",)
    wait_sessions(p, 0)


def test_upstream_that_stops_answering_mid_session(cluster, upstream_fp, start):
    """upstream_response_timeout: the statement is cancelled first; when even that brings no answer, the
    upstream connection is given up with FATAL 08006 and closed."""
    p = start("--upstream-response-timeout", "0.5", upstream=upstream_fp.address)
    dsn = dsn_of(cluster, p)
    app = app_name("blackholed")
    with Bystander(dsn):  # link 0
        victim = psycopg.connect(dsn, autocommit=True, application_name=app)  # link 1
        try:
            assert victim.execute("SELECT 'before'").fetchone() == ("before",)
            upstream_fp.link(1).blackhole()
            with pytest.raises(psycopg.OperationalError) as ei:
                victim.execute("SELECT 'into the hole'")
            assert ei.value.sqlstate == "08006"
            assert "the upstream PostgreSQL server stopped answering" in str(ei.value)
            assert victim.closed
        finally:
            victim.close()
        log = p.log()
        assert "cancelling the statement" in log and "not even to a cancel request" in log
        wait_no_backends(cluster, app)
        wait_sessions(p, 1)
        wait_connections(p, 2)  # the bystander's client and upstream connections


def test_upstream_response_timeout_cancels_the_statement_and_the_session_goes_on(cluster, start, table):
    p = start("--upstream-response-timeout", "0.5")
    dsn = dsn_of(cluster, p)
    app = app_name("slow")

    def clock():
        """Return once upstream_response_timeout has surely passed: another session's statement is cancelled."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            with pytest.raises(errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(600)")

    with Bystander(dsn):
        conn = psycopg.connect(dsn, autocommit=True, application_name=app)
        in_tx = psycopg.connect(dsn)
        try:
            pid = conn.info.backend_pid
            with pytest.raises(errors.QueryCanceled) as ei:
                conn.execute("SELECT pg_sleep(600)")
            assert ei.value.sqlstate == "57014"
            assert ei.value.diag.severity == "ERROR"
            assert "canceling statement due to user request" in str(ei.value)
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)  # the same session goes on
            # Waiting for the client is not waiting for the server: COPY FROM STDIN while the client
            # takes its time, and a transaction block left idle, are not cancelled.
            with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                copy.write_row((1,))
                clock()
                copy.write_row((2,))
            assert in_tx.execute("SELECT 'in a block'").fetchone() == ("in a block",)
            clock()
            assert in_tx.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)
            in_tx.commit()
        finally:
            conn.close()
            in_tx.close()
        wait_no_backends(cluster, app)
    wait_sessions(p, 0)


# --- packet delays ----------------------------------------------------------------------------------


def workload(cluster, host: str, port: int) -> list:
    """Simple and extended queries, a large result, COPY both ways, a failed statement, a transaction,
    and prepared statements through asyncpg; what each returned."""
    dsn = cluster.dsn("app", host=host, port=port)
    out = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
        out.append(conn.execute("SELECT 1, 'one'").fetchall())
        out.append(conn.execute("SELECT %s::text, %s::int, %s::bytea", ("param", 42, b"\x00\xff")).fetchall())
        out.append(conn.execute("SELECT md5(string_agg(g::text, ',')), count(*) FROM generate_series(1, 20000) g")
                   .fetchall())
        out.append(conn.execute("SELECT g, repeat('y', g % 97) FROM generate_series(1, 3000) g").fetchall())
        with pytest.raises(errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        out.append(conn.execute("SELECT 'after the error'").fetchall())
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE d (v int, t text)")
            with conn.cursor().copy("COPY d FROM STDIN") as copy:
                for i in range(2000):
                    copy.write_row((i, f"row {i}"))
            out.append(conn.execute("SELECT sum(v), count(*), max(t) FROM d").fetchall())
            data = bytearray()
            with conn.cursor().copy("COPY (SELECT * FROM d ORDER BY v) TO STDOUT") as copy:
                for chunk in copy:
                    data += chunk
            out.append(bytes(data))

    async def extended():
        conn = await asyncpg.connect(host=host, port=port, user="app", password="app-secret", database="app")
        try:
            stmt = await conn.prepare("SELECT $1::int * g FROM generate_series(1, 500) g")
            rows = [await stmt.fetch(n) for n in (1, 2, 3)]
            return [[tuple(r) for r in rs] for rs in rows]
        finally:
            await conn.close()

    out.append(asyncio.run(asyncio.wait_for(extended(), 60)))
    return out


def test_packet_delays_and_fragments_keep_results_exact(cluster, upstream_fp, start):
    upstream_fp.delay(0.002)  # every chunk to and from PostgreSQL waits
    p = start("--upstream-response-timeout", "10", upstream=upstream_fp.address)
    with FaultProxy.to(p.address) as client_fp:
        client_fp.delay(0.0, chunk=7)  # the client's leg cut into 7-byte pieces, both ways
        with Bystander(dsn_of(cluster, p)):
            assert workload(cluster, client_fp.host, client_fp.port) == workload(cluster, cluster.host, cluster.port)
    assert "cancelling the statement" not in p.log()
    wait_sessions(p, 0)


# --- half-closed connections ------------------------------------------------------------------------


@pytest.mark.parametrize("toward", ["proxy", "server"])
def test_upstream_half_closed(cluster, upstream_fp, start, toward):
    """The upstream connection half-closed (shutdown(SHUT_WR)) toward purpose-proxy, which reads EOF, or
    toward PostgreSQL, which then ends the session and closes: either way the client gets FATAL 08006 at
    once, and the connection is closed on both legs."""
    p = start(upstream=upstream_fp.address)
    dsn = dsn_of(cluster, p)
    victim_app, raw_app = app_name(f"half-{toward}"), app_name(f"half-{toward}-raw")
    with Bystander(dsn):  # link 0
        victim = psycopg.connect(dsn, autocommit=True, application_name=victim_app)  # link 1
        raw = RawConnection(p.host, p.port, user="trustuser", application_name=raw_app)  # link 2
        try:
            assert victim.execute("SELECT 1").fetchone() == (1,)
            for i in (1, 2):
                upstream_fp.link(i).half_close(DOWN if toward == "proxy" else UP)
            assert fatal(read_until_eof(raw)) == [(b"E", "FATAL", "08006", LOST)]
            with pytest.raises(psycopg.OperationalError) as ei:
                victim.execute("SELECT 1")
            assert ei.value.sqlstate == "08006"
        finally:
            victim.close()
            raw.sock.close()
        wait_only_the_bystander_left(cluster, p, victim_app, raw_app)


def test_the_fatal_reaches_a_slow_client_that_writes_before_reading(cluster, upstream_fp, start):
    """The upstream connection is lost while an answer is still on its way to a slow client (its receive
    window is full), and the client sends its next Query before it reads on (psycopg does). After a plain
    close that Query would meet a closed socket, whose TCP reset throws away everything not yet delivered:
    the rest of the answer and the FATAL 08006 saying why the session ended. The proxy shuts its side for
    writing instead and reads and drops what the client still sends, so all of it arrives."""
    p = start(upstream=upstream_fp.address)
    app = app_name("linger")
    with Bystander(dsn_of(cluster, p)):  # link 0
        with RawConnection(p.host, p.port, user="trustuser", application_name=app, rcvbuf=4096) as raw:  # link 1
            raw.send(big_result_query(40, width=1000))  # 40 kB: more than the client's window holds
            time.sleep(0.3)  # the whole answer has left PostgreSQL and waits in the proxy's socket
            upstream_fp.link(1).reset()
            wait_sessions(p, 1)  # the proxy has written the FATAL and ended the session
            raw.send(query_message("SELECT 'too late'"))
            time.sleep(0.3)  # a reset, if one comes, arrives before the client reads on
            msgs = read_until_eof(raw)
        assert [t for t, _ in msgs] == [b"T"] + [b"D"] * 40 + [b"C", b"Z", b"E"]
        assert fatal(msgs) == [(b"E", "FATAL", "08006", LOST)]
        wait_no_backends(cluster, app)
        wait_connections(p, 2)


def test_upstream_half_closed_toward_the_server_mid_statement(cluster, upstream_fp, start):
    """PostgreSQL reads the EOF only after the running statement: its answer still arrives, then 08006."""
    p = start(upstream=upstream_fp.address)
    app = app_name("half-busy")
    with Bystander(dsn_of(cluster, p)):  # link 0
        with RawConnection(p.host, p.port, user="trustuser", application_name=app) as raw:  # link 1
            raw.send(query_message("SELECT pg_sleep(1)::text, 'finished'"))
            wait_active(cluster, app)
            upstream_fp.link(1).half_close(UP)
            msgs = read_until_eof(raw)
        assert [t for t, _ in msgs] == [b"T", b"D", b"C", b"Z", b"E"]
        assert msgs[1][1].endswith(b"finished")
        assert fatal(msgs) == [(b"E", "FATAL", "08006", LOST)]
        wait_no_backends(cluster, app)
        wait_sessions(p, 1)
        wait_connections(p, 2)  # the bystander's client and upstream connections


def test_client_half_close_answered_like_postgresql(cluster, start):
    """A client that half-closes (shutdown(SHUT_WR)) gets the answers to what it sent, then the end of the
    connection, as from PostgreSQL directly; idle, it just gets the end."""
    p = start()

    def scenario(host: str, port: int, app: str, sql: str | None) -> list[tuple[bytes, bytes]]:
        with RawConnection(host, port, user="trustuser", application_name=app) as raw:
            if sql is not None:
                raw.send(query_message(sql))
            raw.sock.shutdown(socket.SHUT_WR)
            return read_until_eof(raw)

    apps = []
    with Bystander(dsn_of(cluster, p)):
        for sql in ("SELECT pg_sleep(0.3)::text, 'answered'", None):
            direct_app, through_app = app_name("half-direct"), app_name("half-through")
            apps += [direct_app, through_app]
            direct = scenario(cluster.host, cluster.port, direct_app, sql)
            through = scenario(p.host, p.port, through_app, sql)
            assert through == direct
            assert [t for t, _ in through] == ([b"T", b"D", b"C", b"Z"] if sql else [])
        for app in apps:
            wait_no_backends(cluster, app)
        wait_sessions(p, 1)
        wait_connections(p, 2)  # the bystander's client and upstream connections


def test_client_leg_half_closed_toward_the_client(cluster, start):
    """The client reads EOF while purpose-proxy still has its session: the client sees a closed connection;
    once it leaves, the proxy ends the session and its backend."""
    p = start()
    app = app_name("half-client")
    with FaultProxy.to(p.address) as client_fp, Bystander(dsn_of(cluster, p)):
        victim = psycopg.connect(dsn_of(cluster, client_fp), autocommit=True, application_name=app)
        try:
            assert victim.execute("SELECT 1").fetchone() == (1,)
            client_fp.link(0).half_close(DOWN)
            with pytest.raises(psycopg.OperationalError) as ei:
                victim.execute("SELECT 2")
            assert "server closed the connection unexpectedly" in str(ei.value)
        finally:
            victim.close()
        wait_no_backends(cluster, app)
        wait_sessions(p, 1)


# --- clients that vanish or never read --------------------------------------------------------------


@pytest.mark.parametrize("how", ["reset", "close"])
def test_client_vanishes_mid_result(cluster, start, how):
    p = start()
    app = app_name(f"vanish-{how}")
    with Bystander(dsn_of(cluster, p)):
        raw = RawConnection(p.host, p.port, user="trustuser", application_name=app)
        raw.send(big_result_query(1_000_000))  # about 1 GB
        read_data_rows(raw, 100)
        if how == "reset":
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.sock.close()
        # The backend was writing the result: with the proxy's upstream connection closed, it exits.
        wait_no_backends(cluster, app)
        wait_sessions(p, 1)
        wait_connections(p, 2)  # the bystander's client and upstream connections


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_client_that_never_reads(cluster, start):
    """A client that stops reading mid-result: backpressure reaches PostgreSQL (its backend waits to write),
    the proxy's memory stays bounded, other sessions go on, and upstream_response_timeout does not take the
    proxy's own pause for a silent server. When the client reads again, the result is whole; when it
    vanishes instead, nothing is left behind."""
    p = start("--upstream-response-timeout", "0.5")
    dsn = dsn_of(cluster, p)
    rows = 200_000  # 200 MB
    with FaultProxy.to(p.address) as client_fp, Bystander(dsn):
        reader_app, vanishing_app = app_name("never-reads"), app_name("never-reads-vanishes")
        raw = RawConnection(client_fp.host, client_fp.port, user="trustuser", application_name=reader_app)
        gone = RawConnection(client_fp.host, client_fp.port, user="trustuser", application_name=vanishing_app)
        try:
            client_fp.stall(DOWN)  # nothing more reaches the clients: as if they never read
            raw.send(big_result_query(rows))
            gone.send(big_result_query(rows))
            wait_active(cluster, reader_app, wait_event="ClientWrite")
            wait_active(cluster, vanishing_app, wait_event="ClientWrite")
            # upstream_response_timeout passes while PostgreSQL waits on the proxy (the clock: another
            # session's statement is cancelled meanwhile), and nothing is cancelled.
            with psycopg.connect(dsn, autocommit=True) as conn:
                with pytest.raises(errors.QueryCanceled):
                    conn.execute("SELECT pg_sleep(600)")
            assert rss_kb(p.proc.pid) < 100 * 1024
            # One client vanishes: its backend, blocked writing, goes too.
            client_fp.link(1).reset()
            wait_no_backends(cluster, vanishing_app)
            # The other reads again and gets every row.
            client_fp.heal()
            data_rows, others = 0, []
            while not others or others[-1][0] != b"Z":
                msg = raw.read_message()
                if msg[0] == b"D":
                    data_rows += 1
                else:
                    others.append(msg)
            assert data_rows == rows
            assert [t for t, _ in others] == [b"T", b"C", b"Z"]
            assert others[1][1] == f"SELECT {rows}\x00".encode()
            assert raw.simple_query("SELECT 'after'")[-1] == (b"Z", b"I")
        finally:
            raw.close()
            gone.sock.close()
        wait_no_backends(cluster, reader_app)
        wait_sessions(p, 1)
        wait_connections(p, 2)  # the bystander's client and upstream connections


# --- authentication timeout, compared with PostgreSQL ----------------------------------------------------


def test_auth_timeout_closes_like_postgresql(cluster, start):
    """PostgreSQL (authentication_timeout = 1s here) and the proxy (auth_timeout 0.5 s) both close, without
    a word, a connection that never sends its startup packet and one that stalls mid-authentication."""
    p = start("--auth-timeout", "0.5")
    for host, port in ((cluster.host, cluster.port), (p.host, p.port)):
        with socket.create_connection((host, port), timeout=30) as s:
            assert closed_without_a_word(s), (host, port)
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(startup_message("app", "app"))
            assert read_message(s)[:2] == (b"R", 10), (host, port)  # AuthenticationSASL
            assert closed_without_a_word(s), (host, port)
    wait_sessions(p, 0)
