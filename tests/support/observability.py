"""Helpers for the observability tests: scraping /metrics, reading audit files, a stoppable TCP forwarder,
an in-process proxy, and a test decider that reports stage timings.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.enforcement.hook import Decide, SessionInfo
from proxy.policy.decision import ALLOW, Block, Decision

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "observability"
POLICY_DIR = FIXTURES / "policy"
SCHEMA_SQL = FIXTURES / "schema.sql"


# --- metrics -------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Scrape:
    """One scrape of /metrics: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    @classmethod
    def of(cls, base_url: str) -> "Scrape":
        status, text = http_get(base_url + "/metrics")
        assert status == 200, text
        return cls(text)

    def get(self, name: str, **labels) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def labels(self, name: str) -> list[dict]:
        return [dict(lbl) for n, lbl in self.samples if n == name]

    def delta(self, before: "Scrape", name: str, **labels) -> float:
        return self.get(name, **labels) - before.get(name, **labels)


# --- audit ---------------------------------------------------------------------------------


def audit_records(path: Path) -> list[dict]:
    files = sorted(path.parent.glob(path.name + ".*")) + [path]
    return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]


# --- a TCP forwarder the tests can stop (an upstream that goes away) -------------------------


class Forwarder:
    """Relays TCP connections from a local port to ``target``; ``stop()`` closes everything."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name="test-forwarder", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True, name="test-forwarder-pipe").start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.listener.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass
        self.thread.join(5)


# --- the proxy in this process (for span tests) ----------------------------------------------


class InProcessProxy:
    """``ProxyServer`` on its own event loop in a thread (so tests can hand it a span exporter)."""

    def __init__(self, config, decider_factory=None, recorder=None) -> None:
        self.config = config
        self.decider_factory = decider_factory
        self.recorder = recorder
        self.server = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="in-process-proxy", daemon=True)

    def _run(self) -> None:
        from proxy.listener import ProxyServer

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.server = ProxyServer(self.config, self.decider_factory, recorder=self.recorder)
            await self.server.start()
            self._started.set()
            await self._stop.wait()
            await self.server.shutdown(timeout=5)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc
            self._started.set()

    def start(self) -> "InProcessProxy":
        self.thread.start()
        assert self._started.wait(30), "in-process proxy did not start"
        if self.error is not None:
            raise self.error
        return self

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "in-process proxy did not stop"
        if self.error is not None:
            raise self.error


# --- a decider that reports stage timings ----------------------------------------------------


class TimedMarker:
    """Refuses statements containing ``refuse_me``; reports (analysis, policy) timings like a full decider would."""

    def __init__(self) -> None:
        self.last = None
        self.timings: tuple = ()

    def decide(self, sql: str, via: str) -> Decision:
        t0 = time.perf_counter()
        refused = "refuse_me" in sql
        t1 = time.perf_counter()
        decision: Decision = Block("statement refused by the test decider", reason="test-marker") if refused else ALLOW
        t2 = time.perf_counter()
        self.timings = (("analysis", t1 - t0), ("policy", t2 - t1))
        return decision


def timed_marker(session: SessionInfo) -> Decide:
    return TimedMarker()
