"""The metrics and health endpoint: a small HTTP/1.1 server on the proxy's event loop (/metrics, /healthz, /readyz).

It runs on the event loop so that scrape-time collectors read the server's
state on the thread that changes it. ``/healthz`` answers 200 while the process
runs; ``/readyz`` answers 200 only when the proxy is listening, PostgreSQL
accepts a TCP connection (checked at most once a second), and a policy is loaded
(purpose enforcement), else 503 with the failed checks. Every read and write is
bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.config import is_unix_dir, parse_hostport

if TYPE_CHECKING:
    from proxy.listener import ProxyServer
    from proxy.observability.metrics import Metrics

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
UPSTREAM_CHECK_TIMEOUT = 2.0
UPSTREAM_CHECK_EVERY = 1.0


Route = Callable[[str], Awaitable[tuple[int, str, bytes]]]  # path -> (status, content type, body)


class TinyHTTP:
    """A one-request-per-connection HTTP/1.1 server for GET and HEAD on the event loop; ``route`` answers
    each path. Every read and write is bounded by ``REQUEST_TIMEOUT``; request tasks are named and kept,
    and cancelled on ``close``. (The health endpoint and the ``--workers`` supervisor both use it.)"""

    def __init__(self, route: Route, name: str) -> None:
        self.route = route
        self.name = name
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self, extra: list[asyncio.Task] | None = None) -> None:
        """Stop listening; cancel and await the requests in flight (and ``extra`` tasks), bounded."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._handlers) + (extra or [])
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except TimeoutError:
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"{self.name}-http-request")
            self._handlers.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readuntil(b"\r\n\r\n")
                method, _, rest = request.partition(b" ")
                path = rest.split(b" ", 1)[0].split(b"?", 1)[0].decode("ascii", "replace")
                if method not in (b"GET", b"HEAD"):
                    status, ctype, body = 405, "text/plain; charset=utf-8", b"method not allowed\n"
                else:
                    status, ctype, body = await self.route(path)
                head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
                writer.write(head if method == b"HEAD" else head + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:
            log.exception("%s endpoint: request failed", self.name)
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)


class HealthEndpoint:
    """Serves /metrics (when metrics are on), /healthz and /readyz on ``address``."""

    def __init__(self, address: str, server: "ProxyServer", metrics: "Metrics | None") -> None:
        self.address = address
        self.proxy = server
        self.metrics = metrics
        self._http = TinyHTTP(self._route, "metrics")
        self._upstream_ok: bool | None = None
        self._upstream_checked = 0.0
        self._upstream_error = ""
        self._check: asyncio.Task | None = None

    async def start(self) -> None:
        host, port = parse_hostport(self.address, "metrics_listen")
        await self._http.start(host, port)
        log.info("metrics and health endpoint on http://%s/metrics", self.address)

    @property
    def port(self) -> int:
        return self._http.port

    async def close(self) -> None:
        await self._http.close([self._check] if self._check is not None else None)

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics" and self.metrics is not None:
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            checks = await self.readiness()
            ok = all(c["ok"] for c in checks.values())
            return (200 if ok else 503), "application/json", (json.dumps({"ready": ok, "checks": checks}) + "\n").encode()
        return 404, "text/plain; charset=utf-8", b"not found\n"

    # --- readiness ---------------------------------------------------------------------------

    async def readiness(self) -> dict[str, dict]:
        proxy = self.proxy
        listening = (not proxy.shutting_down and bool(proxy.servers)
                     and all(s.is_serving() for s in proxy.servers))
        runtime = proxy.runtime
        policy_ok = runtime is None or runtime.policy is not None
        upstream_ok = await self._upstream_reachable()
        return {
            "listening": {"ok": listening},
            "upstream": {"ok": upstream_ok, **({"error": self._upstream_error} if not upstream_ok else {})},
            "policy": {"ok": policy_ok,
                       **({"version": runtime.policy.version} if runtime is not None and policy_ok else {})},
        }

    async def _upstream_reachable(self) -> bool:
        """Whether PostgreSQL accepts a connection (a bare connect: PostgreSQL logs nothing for it)."""
        if time.monotonic() - self._upstream_checked < UPSTREAM_CHECK_EVERY and self._upstream_ok is not None:
            return self._upstream_ok
        if self._check is None or self._check.done():
            self._check = asyncio.get_running_loop().create_task(self._probe(), name="readyz-upstream-probe")
        try:
            return await asyncio.wait_for(asyncio.shield(self._check), UPSTREAM_CHECK_TIMEOUT + 0.5)
        except TimeoutError:
            return False

    async def _probe(self) -> bool:
        upstream = self.proxy.config.upstream
        try:
            async with asyncio.timeout(UPSTREAM_CHECK_TIMEOUT):
                if is_unix_dir(upstream):
                    path, port = upstream, 5432
                    if ":" in upstream.rsplit("/", 1)[-1]:
                        path, _, p = upstream.rpartition(":")
                        port = int(p)
                    _, writer = await asyncio.open_unix_connection(f"{path.rstrip('/')}/.s.PGSQL.{port}")
                else:
                    host, port = parse_hostport(upstream, "upstream")
                    _, writer = await asyncio.open_connection(host, port)
            writer.close()
            self._upstream_ok, self._upstream_error = True, ""
        except (OSError, TimeoutError) as exc:
            self._upstream_ok, self._upstream_error = False, f"{exc.__class__.__name__}: {exc}"
        self._upstream_checked = time.monotonic()
        return self._upstream_ok


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
