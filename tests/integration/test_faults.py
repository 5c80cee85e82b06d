"""Faults and lifecycle through the real proxy: cancellation, a slow reader of a huge
result, the upstream dying or missing, and SIGTERM draining.

Destructive tests (killing a backend, stopping the cluster) use a dedicated
cluster of their own, never the shared one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import errors

from proxy.devtools.cluster import Cluster, free_port
from proxy.devtools.process import RELAY_ONLY, ProxyProcess
from tests.support.faults import Worker
from tests.support.rawpg import RawConnection, ServerError, error_fields, query_message
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SHUTDOWN_MESSAGE = "terminating connection because purpose-proxy is shutting down"


def admin_dsn(server) -> str:
    return getattr(server, "admin_dsn", None) or server.dsn("postgres", dbname="postgres")


def wait_active(server, application_name: str, timeout: float = 15.0) -> int:
    """Wait until a backend of ``application_name`` is running a statement; return its pid."""

    def check():
        with psycopg.connect(admin_dsn(server), autocommit=True) as conn:
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active'"
                " AND query LIKE '%%pg_sleep%%'", (application_name,)).fetchone()
        return row[0] if row else None

    return wait_for(check, timeout, f"a running statement of {application_name}", 0.1)


def backend_gone(server, pid: int) -> bool:
    with psycopg.connect(admin_dsn(server), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0


def read_until_eof(raw: RawConnection, limit: int = 100) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(limit):
        try:
            out.append(raw.read_message())
        except (EOFError, ConnectionResetError):
            return out
    raise AssertionError(f"no EOF after {limit} messages: {out}")


# --- cancellation -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_psycopg_cancel_running_statement(pg, proxy, method):
    app = f"cancel-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True,
                         application_name=app) as conn:
        worker = Worker(lambda: conn.execute("SELECT pg_sleep(60)"))
        worker.start()
        pid = wait_active(pg, app)
        if method == "cancel":
            conn.cancel()
        else:
            conn.cancel_safe(timeout=10)
        _, exc = worker.outcome(20)
        assert isinstance(exc, errors.QueryCanceled), exc
        assert exc.sqlstate == "57014"
        assert "canceling statement due to user request" in str(exc)
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)  # same session, still usable


def test_cancel_with_wrong_key_is_ignored(pg, proxy):
    """A CancelRequest with the backend's pid but a key the proxy did not issue cancels nothing."""
    app = f"badcancel-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True,
                         application_name=app) as conn:
        worker = Worker(lambda: conn.execute("SELECT pg_sleep(1.5)").fetchone())
        worker.start()
        pid = wait_active(pg, app)
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
            s.sendall(struct.pack("!iiI", 16, 80877102, pid) + b"\x00\x01\x02\x03")
            s.settimeout(5)
            assert s.recv(1) == b""  # the proxy closes a cancel connection without answer
        result, exc = worker.outcome(20)
        assert exc is None and result == ("",)  # pg_sleep returns void: the statement completed


def test_a_statement_of_a_client_that_vanished_is_cancelled(pg, proxy):
    """Hunt 21: a client killed mid-statement left its statement running in PostgreSQL (a backend notices a closed
    socket only when it next reads or writes); found still running 20 minutes later. Now the proxy cancels it."""
    from tests.support.faults import backends, wait_active as wait_running

    app = f"vanished-{uuid.uuid4().hex[:8]}"
    conn = RawConnection(proxy.host, proxy.port, application_name=app)
    conn.sock.sendall(query_message("SELECT pg_sleep(120)"))
    wait_running(pg, app)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.sock.close()  # a reset, as when the client process is killed
    wait_for(lambda: not any(state == "active" for _, state, _ in backends(pg, app)), 30,
             "the orphaned statement to be cancelled")


# --- a slow reader of a huge result -----------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples VmRSS of ``pid`` from /proc every few milliseconds; keeps the maximum (kB)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.max_kb = 0
        self.samples = 0
        self.stop_event = threading.Event()

    def read(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.max_kb = max(self.max_kb, self.read())
                self.samples += 1
            except OSError:
                return
            self.stop_event.wait(0.01)

    def stop(self) -> int:
        self.stop_event.set()
        self.join(5)
        return self.max_kb


def test_slow_reader_of_500mb_result_keeps_proxy_memory_bounded(pg, start_proxy):
    rows, width = 500, 1_000_000
    p = start_proxy()
    sampler = RssSampler(p.proc.pid)
    baseline_kb = sampler.read()
    sampler.start()
    try:
        with RawConnection(p.host, p.port, user="trustuser", timeout=60) as raw:
            raw.send(query_message(f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})"))
            # Read nothing for a while: PostgreSQL produces the result far faster than
            # this client takes it, so without backpressure it would pile up in the proxy.
            time.sleep(3)
            data_rows = 0
            data_bytes = 0
            others: list[tuple[bytes, bytes]] = []
            header = bytearray()
            remaining = 0
            cur_type = b""
            cur_body = bytearray()
            since_pause = 0
            done = False
            raw.sock.settimeout(30)
            pending = bytes(raw.buf)
            raw.buf.clear()
            while not done:
                chunk = pending or raw.sock.recv(65536)
                pending = b""
                assert chunk, "proxy closed the connection mid-result"
                since_pause += len(chunk)
                if since_pause >= 4 * 1024 * 1024:  # a slow consumer: pause every 4 MB
                    since_pause = 0
                    time.sleep(0.02)
                pos, n = 0, len(chunk)
                while pos < n and not done:
                    if remaining:
                        take = min(remaining, n - pos)
                        if cur_type != b"D":
                            cur_body += chunk[pos : pos + take]
                        else:
                            data_bytes += take
                        pos += take
                        remaining -= take
                        if remaining:
                            continue
                    else:
                        need = 5 - len(header)
                        header += chunk[pos : pos + need]
                        pos += min(need, n - pos)
                        if len(header) < 5:
                            continue
                        cur_type = bytes(header[:1])
                        remaining = struct.unpack_from("!i", header, 1)[0] - 4
                        header.clear()
                        cur_body = bytearray()
                        if remaining:
                            continue
                    # a message is complete
                    if cur_type == b"D":
                        data_rows += 1
                    else:
                        others.append((cur_type, bytes(cur_body)))
                        done = cur_type == b"Z"
            assert data_rows == rows
            assert data_bytes == rows * (2 + 4 + width)
            assert [t for t, _ in others] == [b"T", b"C", b"Z"], others
            assert others[1][1] == f"SELECT {rows}\x00".encode()
            # The session goes on normally after the huge result.
            assert raw.simple_query("SELECT 'after'")[-1] == (b"Z", b"I")
    finally:
        max_kb = sampler.stop()
    assert sampler.samples > 50
    assert max_kb < 100 * 1024, f"proxy RSS reached {max_kb / 1024:.1f} MB (baseline {baseline_kb / 1024:.1f} MB)"


# --- the upstream terminated or killed -----------------------------------------------------------


def test_pg_terminate_backend_gives_57p01_like_direct(pg, proxy):
    def scenario(host, port):
        with RawConnection(host, port, user="trustuser") as raw:
            pid = raw.backend_key[0]
            with psycopg.connect(admin_dsn(pg), autocommit=True) as admin:
                assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
            msgs = read_until_eof(raw)
        return [(t, error_fields(b)) for t, b in msgs]

    direct = scenario(pg.host, pg.port)
    through = scenario(proxy.host, proxy.port)
    assert through == direct
    assert [t for t, _ in through] == [b"E"]
    fields = through[0][1]
    assert (fields["S"], fields["C"]) == ("FATAL", "57P01")
    assert fields["M"] == "terminating connection due to administrator command"

    # psycopg sees the same: AdminShutdown on the next statement, and the proxy goes on.
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(admin_dsn(pg), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_for(lambda: backend_gone(pg, pid), 10, "the backend to exit")
        with pytest.raises(psycopg.OperationalError) as ei:
            conn.execute("SELECT 1")
        assert ei.value.sqlstate == "57P01"
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True) as conn:
        assert conn.execute("SELECT 'proxy still serves'").fetchone() == ("proxy still serves",)


@pytest.fixture(scope="module")
def own_cluster():
    """A dedicated cluster for tests that kill backends or stop the server."""
    with Cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def own_proxy(own_cluster):
    # A small session limit, to show that failed upstream connections give their slot back.
    p = ProxyProcess(own_cluster.address, *RELAY_ONLY, "--max-client-connections", "3").start()
    yield p
    p.stop()


def wait_serving(cluster, proxy, timeout: float = 60.0) -> None:
    """Wait until a new session through ``proxy`` works (the cluster may be recovering)."""

    def ok():
        try:
            with psycopg.connect(cluster.dsn("app", host=proxy.host, port=proxy.port), connect_timeout=5,
                                 autocommit=True) as conn:
                return conn.execute("SELECT 'up'").fetchone() == ("up",)
        except psycopg.OperationalError:
            return False

    wait_for(ok, timeout, "sessions through the proxy to work again", 0.25)


def test_backend_killed_mid_statement(own_cluster, own_proxy):
    dsn = own_cluster.dsn("app", host=own_proxy.host, port=own_proxy.port)
    app = f"killed-{uuid.uuid4().hex[:8]}"
    wait_serving(own_cluster, own_proxy)
    with psycopg.connect(dsn, autocommit=True, application_name=app) as busy, \
            psycopg.connect(dsn, autocommit=True) as bystander:
        bystander.execute("SELECT 1")
        worker = Worker(lambda: busy.execute("SELECT pg_sleep(60)"))
        worker.start()
        pid = wait_active(own_cluster, app)
        os.kill(pid, signal.SIGKILL)
        _, exc = worker.outcome(20)
        # The backend vanished without a word: the proxy tells the client so, as FATAL 08006.
        assert isinstance(exc, psycopg.OperationalError), exc
        assert exc.sqlstate == "08006"
        assert "connection to the upstream PostgreSQL server was lost" in str(exc)
        assert busy.closed
        # The crash restarts the whole cluster: the bystander's backend was terminated too.
        with pytest.raises(psycopg.OperationalError):
            for _ in range(100):
                bystander.execute("SELECT 1")
                time.sleep(0.1)
    assert own_proxy.proc.poll() is None
    wait_serving(own_cluster, own_proxy)


def test_cluster_immediate_stop_and_restart(own_cluster, own_proxy):
    dsn = own_cluster.dsn("app", host=own_proxy.host, port=own_proxy.port)
    wait_serving(own_cluster, own_proxy)
    conn = psycopg.connect(dsn, autocommit=True)
    raw = RawConnection(own_proxy.host, own_proxy.port, user="trustuser")
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        own_cluster.stop("immediate")
        # On the wire: PostgreSQL's own WARNING (its backend's last words on SIGQUIT),
        # then, as the upstream connection ended without a FATAL, the proxy's 08006.
        msgs = read_until_eof(raw)
        assert [(t, error_fields(b)["S"], error_fields(b)["C"]) for t, b in msgs] == [
            (b"N", "WARNING", "57P01"), (b"E", "FATAL", "08006")]
        assert error_fields(msgs[0][1])["M"] == "terminating connection due to immediate shutdown command"
        assert error_fields(msgs[1][1])["M"] == "connection to the upstream PostgreSQL server was lost"
        with pytest.raises(psycopg.OperationalError) as ei:
            conn.execute("SELECT 1")
        assert ei.value.sqlstate == "08006"
        assert "connection to the upstream PostgreSQL server was lost" in str(ei.value)
        assert conn.closed
    finally:
        conn.close()
        raw.sock.close()

    # While the server is down, new sessions get a clear 08006 and the proxy keeps running.
    async def attempt():
        return await asyncpg.connect(host=own_proxy.host, port=own_proxy.port, user="app",
                                     password="app-secret", database="app", timeout=15)

    for _ in range(5):  # more than --max-client-connections: each must give its slot back
        with pytest.raises(asyncpg.exceptions.ConnectionFailureError) as ai:
            asyncio.run(attempt())
        assert ai.value.sqlstate == "08006"
        assert "could not connect to the upstream PostgreSQL server" in ai.value.message
    assert own_proxy.proc.poll() is None

    own_cluster.restart()  # pg_ctl restart starts a stopped server
    wait_serving(own_cluster, own_proxy)
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]  # all three slots are free
    try:
        for c in conns:
            assert c.execute("SELECT current_user").fetchone() == ("app",)
    finally:
        for c in conns:
            c.close()


# --- the upstream unavailable ------------------------------------------------------------


def test_upstream_unavailable_gives_08006(pg, start_proxy):
    closed_port = free_port()
    p = start_proxy("--connect-timeout", "5", upstream=f"127.0.0.1:{closed_port}")
    for _ in range(2):
        with pytest.raises(ServerError) as ei:
            RawConnection(p.host, p.port, user="trustuser", timeout=15)
        f = ei.value.fields
        assert (f["S"], f["C"]) == ("FATAL", "08006")
        assert f["M"].startswith("purpose-proxy could not connect to the upstream PostgreSQL server at "
                                 f"127.0.0.1:{closed_port}")
        assert "ConnectionRefusedError" in f["M"]
        assert f["H"] == "Check that PostgreSQL is running and that --upstream points at it."

    async def attempt():
        return await asyncpg.connect(host=p.host, port=p.port, user="app", password="app-secret",
                                     database="app", timeout=15)

    with pytest.raises(asyncpg.exceptions.ConnectionFailureError) as ai:
        asyncio.run(attempt())
    assert ai.value.sqlstate == "08006"

    with pytest.raises(psycopg.OperationalError) as pi:
        psycopg.connect(pg.dsn("app", host=p.host, port=p.port), connect_timeout=15)
    assert "could not connect to the upstream PostgreSQL server" in str(pi.value)
    assert p.proc.poll() is None


# --- SIGTERM draining -------------------------------------------------------------------------


@pytest.fixture
def table(pg):
    name = "f_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg.dsn("app"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (v int)")
    yield name
    with psycopg.connect(pg.dsn("app"), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_sigterm_drains_busy_sessions_and_closes_idle_ones(pg, start_proxy, table):
    """Observed drain: a session is closed with 57P01 as soon as it is idle outside a
    transaction block; one that is running a statement or is inside a transaction goes
    on (its statement, then its COMMIT) and is closed right after the COMMIT's
    ReadyForQuery. New connections are refused (the listening socket is closed)."""
    p = start_proxy("--shutdown-timeout", "20")
    dsn = pg.dsn("app", host=p.host, port=p.port)
    app = f"drain-{uuid.uuid4().hex[:8]}"
    busy = psycopg.connect(dsn, application_name=app)  # not autocommit: a transaction block
    idle = psycopg.connect(dsn, autocommit=True)
    raw_idle = RawConnection(p.host, p.port, user="trustuser")
    raw_busy = RawConnection(p.host, p.port, user="trustuser", application_name=app + "-raw")
    try:
        busy.execute(f"INSERT INTO {table} VALUES (1)")
        idle.execute("SELECT 1")
        raw_busy.send(query_message("BEGIN; CREATE TEMP TABLE drained (v int); SELECT pg_sleep(2)"))

        def work():
            steps = [busy.execute("SELECT pg_sleep(2), 'slept'").fetchone()]
            busy.commit()
            steps.append("committed")
            return steps

        worker = Worker(work)
        worker.start()
        wait_active(pg, app)
        wait_active(pg, app + "-raw")
        p.signal(signal.SIGTERM)

        # The idle session is closed at once with 57P01, the stream ending after it.
        msgs = read_until_eof(raw_idle)
        assert [t for t, _ in msgs] == [b"E"]
        f = error_fields(msgs[0][1])
        assert (f["S"], f["C"], f["M"]) == ("FATAL", "57P01", SHUTDOWN_MESSAGE)
        with pytest.raises(psycopg.OperationalError) as ei:
            idle.execute("SELECT 1")
        assert ei.value.sqlstate == "57P01"

        # New connections are refused: the listening socket is closed.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((p.host, p.port), timeout=5).close()

        # The busy sessions finish their statement and their COMMIT ...
        result, exc = worker.outcome(20)
        assert exc is None, exc
        assert result == [("", "slept"), "committed"]  # pg_sleep is void: psycopg reads ""
        msgs = []
        while not msgs or msgs[-1][0] != b"Z":
            msgs.append(raw_busy.read_message())
        assert [t for t, _ in msgs] == [b"C", b"C", b"T", b"D", b"C", b"Z"]
        assert msgs[-1] == (b"Z", b"T")  # still in the transaction block: not closed
        raw_busy.send(query_message("INSERT INTO drained VALUES (1); COMMIT"))
        # ... and, now idle outside a transaction, they are closed with 57P01 on the wire.
        msgs = read_until_eof(raw_busy)
        assert [t for t, _ in msgs] == [b"C", b"C", b"Z", b"E"]
        assert msgs[1] == (b"C", b"COMMIT\x00") and msgs[2] == (b"Z", b"I")
        f = error_fields(msgs[3][1])
        assert (f["S"], f["C"], f["M"]) == ("FATAL", "57P01", SHUTDOWN_MESSAGE)
        # libpq may read that FATAL together with the COMMIT's ReadyForQuery and then
        # report only the closed connection on the next statement; either way it is over.
        with pytest.raises(psycopg.OperationalError):
            busy.execute("SELECT 1")
        assert busy.closed

        assert p.proc.wait(timeout=15) == 0
        assert "still busy" not in p.log()  # it did not wait out --shutdown-timeout
    finally:
        for r in (raw_idle, raw_busy):
            r.sock.close()
        for c in (busy, idle):
            c.close()
    with psycopg.connect(pg.dsn("app"), autocommit=True) as conn:
        assert conn.execute(f"SELECT v FROM {table}").fetchall() == [(1,)]


def test_sigterm_closes_statement_running_past_shutdown_timeout(pg, start_proxy, table):
    p = start_proxy("--shutdown-timeout", "1")
    dsn = pg.dsn("app", host=p.host, port=p.port)
    app = f"overrun-{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(dsn, application_name=app)
    try:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        worker = Worker(lambda: conn.execute("SELECT pg_sleep(30)"))
        worker.start()
        pid = wait_active(pg, app)
        p.signal(signal.SIGTERM)
        _, exc = worker.outcome(20)
        assert isinstance(exc, psycopg.OperationalError), exc
        assert exc.sqlstate == "57P01"
        assert SHUTDOWN_MESSAGE in str(exc)
        assert conn.closed
        assert p.proc.wait(timeout=15) == 0
        assert "still busy" in p.log()
        # The statement does not keep running upstream, and its transaction is not committed.
        wait_for(lambda: backend_gone(pg, pid), 15, "the backend of the closed session to exit")
    finally:
        conn.close()
    with psycopg.connect(pg.dsn("app"), autocommit=True) as c:
        assert c.execute(f"SELECT v FROM {table}").fetchall() == []
