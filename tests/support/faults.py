"""Helpers for the fault and limit tests: what leaks would look like (backends, sessions, sockets), and threads.

Every check here is a state that must eventually hold, polled with a generous
bound; none measures how long something took.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import uuid

import psycopg

from tests.support.observability import Scrape
from tests.support.rawpg import RawConnection
from tests.support.waiting import wait_for


def app_name(prefix: str) -> str:
    """A unique application_name, to find a session's backend in pg_stat_activity."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def admin_dsn(server) -> str:
    return getattr(server, "admin_dsn", None) or server.dsn("postgres", dbname="postgres")


def backends(server, application_name: str) -> list[tuple[int, str | None, str | None]]:
    """(pid, state, wait_event) of the backends of ``application_name``, through a direct connection."""
    with psycopg.connect(admin_dsn(server), autocommit=True) as conn:
        return conn.execute("SELECT pid, state, wait_event FROM pg_stat_activity WHERE application_name = %s",
                            (application_name,)).fetchall()


def wait_no_backends(server, application_name: str, timeout: float = 30.0) -> None:
    """Wait until no backend of ``application_name`` is left: no upstream connection leaked."""
    wait_for(lambda: not backends(server, application_name), timeout,
             f"the backends of {application_name} to exit")


def wait_active(server, application_name: str, timeout: float = 15.0, wait_event: str | None = None) -> int:
    """Wait until a backend of ``application_name`` is running a statement (and waiting on ``wait_event``)."""

    def check():
        for pid, state, event in backends(server, application_name):
            if state == "active" and (wait_event is None or event == wait_event):
                return pid
        return None

    return wait_for(check, timeout, f"a running statement of {application_name}", 0.1)


def sessions_open(proxy) -> float:
    """The proxy's ``purpose_proxy_client_sessions_open`` gauge (client sessions relaying now)."""
    return Scrape.of(proxy.metrics_url).get("purpose_proxy_client_sessions_open")


def wait_sessions(proxy, n: int, timeout: float = 30.0) -> None:
    """Wait until exactly ``n`` client sessions are open in the proxy: none leaked."""
    wait_for(lambda: sessions_open(proxy) == n, timeout, f"{n} open sessions in the proxy")


def tcp_connections(pid: int) -> int:
    """How many TCP connections (sockets not listening) process ``pid`` holds, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[9] in inodes and fields[3] != "0A":  # 0A: LISTEN
                        count += 1
        except OSError:
            pass
    return count


def wait_connections(proxy, n: int, timeout: float = 30.0) -> None:
    """Wait until the proxy process holds exactly ``n`` TCP connections (two per session: client and upstream)."""
    wait_for(lambda: tcp_connections(proxy.proc.pid) == n, timeout,
             f"the proxy to hold {n} TCP connections (it holds {tcp_connections(proxy.proc.pid)})")


def read_until_eof(raw: RawConnection, limit: int = 100) -> list[tuple[bytes, bytes]]:
    """The messages a raw connection receives until the server closes it."""
    out = []
    for _ in range(limit):
        try:
            out.append(raw.read_message())
        except (EOFError, ConnectionResetError):
            return out
    raise AssertionError(f"no EOF after {limit} messages: {out}")


def read_message(sock: socket.socket) -> tuple[bytes, int, bytes]:
    """One whole message from ``sock``: its type, the first int32 of its body (an Authentication code), its body."""
    data = b""
    while len(data) < 5 or len(data) < 1 + struct.unpack("!i", data[1:5])[0]:
        chunk = sock.recv(65536)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    length = struct.unpack("!i", data[1:5])[0]
    assert len(data) == 1 + length, "more than one message"
    return data[:1], struct.unpack("!i", data[5:9])[0], data[5:]


def closed_without_a_word(sock: socket.socket) -> bool:
    """True when the peer closes ``sock`` without sending anything (more)."""
    sock.settimeout(30)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


class Worker(threading.Thread):
    """Runs ``fn`` in a thread and keeps its result or exception."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None
        self.exc: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.exc = exc

    def outcome(self, timeout: float):
        self.join(timeout)
        assert not self.is_alive(), f"worker still running after {timeout}s"
        return self.result, self.exc


class Bystander(threading.Thread):
    """A second session that keeps running statements through the proxy until ``stop()``.

    ``stop()`` returns how many statements it ran and raises the first failure:
    a fault in another session must never reach it.
    """

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=15)
        assert self.conn.execute("SELECT 'bystander'").fetchone() == ("bystander",)
        self.count = 0
        self.failure: BaseException | None = None
        self.stop_event = threading.Event()
        self.stopped = False

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                n = self.count
                assert self.conn.execute("SELECT %s::int + 1", (n,)).fetchone() == (n + 1,)
                self.count += 1
                self.stop_event.wait(0.05)
        except BaseException as exc:  # noqa: BLE001 - raised by stop()
            self.failure = exc

    def __enter__(self) -> "Bystander":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int:
        if self.stopped:
            return self.count
        self.stopped = True
        if self.is_alive():
            self.stop_event.set()
            self.join(30)
        try:
            if self.failure is not None:
                raise AssertionError(f"the bystander session failed after {self.count} statements") from self.failure
            assert self.conn.execute("SELECT 'still here'").fetchone() == ("still here",)
            return self.count
        finally:
            self.conn.close()
