"""``serve --workers N``: the supervisor that runs, signals and restarts the worker processes, and their cancel peering.

Each worker is a full proxy (``proxy.cli._serve``) in a fresh interpreter
(``python -m proxy.workers FD``) listening on the same addresses with
SO_REUSEPORT, so the kernel spreads connections over them. The supervisor talks
to a worker through one socketpair (FD): it sends the worker's configuration as
one JSON line, the worker answers ``ready`` once it listens, and either side
sees the other go away as end of file (a worker whose supervisor died shuts
down, draining as on SIGTERM).

Cancel requests: the cancel key a worker hands a client has the worker's index
in it (the secret, read as a big-endian number, is the index modulo N; the pid
stays the backend's). A CancelRequest that the kernel hands to another worker
is passed, as the same packet, to the owning worker's private unix socket in a
directory only the proxy's user can enter (like PgBouncer's peering); the
owner handles it exactly as one sent to it directly, and a key nobody issued is
ignored, as PostgreSQL does.

Schema changes: DDL committed through one worker is news to the others, whose schemas
would otherwise stay stale until their own next reload: the worker sends the database's
name to every sibling's socket, and each treats it as DDL of its own (stale, reloaded,
statements depending on it refused meanwhile).

Metrics and health: worker i serves its own ``/metrics``, ``/healthz`` and
``/readyz`` on the ``metrics_listen`` port + 1 + i; the supervisor serves
``metrics_listen`` itself: ``/healthz``, ``/readyz`` (ready only when every
worker runs, has reported ready and answers its own ``/readyz`` with 200) and a
small ``/metrics`` of its own (workers running and ready, restarts). Each worker
writes its own audit file (``<audit_path stem>.worker<i><suffix>``, its own hash
chain).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from proxy.config import Config, parse_hostport
from proxy.observability.endpoint import TinyHTTP
from proxy.wire import codec

if TYPE_CHECKING:
    from proxy.listener import ProxyServer

log = logging.getLogger(__name__)

# Seconds for the supervisor to get every worker listening at start; then it gives up (exit 1).
STARTUP_TIMEOUT = 60.0
# A worker that dies is restarted after BACKOFF_MIN seconds, doubling for each
# death within STABLE_AFTER seconds of its start, up to BACKOFF_MAX.
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0
# Seconds beyond shutdown_timeout that SIGTERM waits for workers before SIGKILL.
SHUTDOWN_GRACE = 15.0
# Reading a forwarded CancelRequest from a sibling; reading the control line.
PEER_READ_TIMEOUT = 2.0
CONTROL_TIMEOUT = 30.0
WORKER_READYZ_TIMEOUT = 3.0
# The longest CancelRequest: 12 bytes and a secret of at most 256 bytes (protocol 3.2).
MAX_CANCEL_PACKET = 12 + 256
# A sibling's news that DDL was committed through it (the same framing as a CancelRequest: an
# int32 length, an int32 code, then the database name): this worker's schema of that database is
# stale until it loads it again, as the sibling's is.
SCHEMA_CHANGED_CODE = 0x50505343  # "PPSC", not a protocol code
MAX_SCHEMA_PACKET = 8 + 256
MAX_WORKERS = 256


# --- per-worker settings ----------------------------------------------------------------------


def worker_metrics_listen(config: Config, index: int) -> str:
    """Worker ``index``'s metrics address: the metrics_listen port + 1 + index (port 0 stays 0)."""
    if config.metrics_listen == "off":
        return "off"
    port = parse_hostport(config.metrics_listen, "metrics_listen")[1]
    shown = config.metrics_listen.rpartition(":")[0]
    return f"{shown}:{port + 1 + index if port else 0}"


def worker_audit_path(config: Config, index: int) -> str:
    """Worker ``index``'s audit file: ``name.worker<i>.jsonl`` beside ``audit_path`` (each its own chain)."""
    path = Path(config.audit_path)
    return str(path.with_name(f"{path.stem}.worker{index}{path.suffix}"))


def worker_config(config: Config, index: int) -> Config:
    return dataclasses.replace(config, metrics_listen=worker_metrics_listen(config, index),
                               audit_path=worker_audit_path(config, index))


def _local_host(host: str) -> str:
    """Where to reach a server listening on ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


# --- the worker side ------------------------------------------------------------------------


class CancelPeers:
    """A worker's cancel keys with its index in them, and the private socket its siblings forward cancels to."""

    def __init__(self, index: int, count: int, directory: str, timeout: float) -> None:
        self.index = index
        self.count = count
        self.directory = directory
        self.timeout = timeout  # per forward: the owner's own cancel is bounded by connect_timeout + 2 s
        self.server: "ProxyServer | None" = None
        self._listener: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._announcing: set[asyncio.Task] = set()

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"worker-{index}.sock")

    def new_secret(self, size: int) -> bytes:
        """A random secret of ``size`` bytes whose value modulo the worker count is this worker's index."""
        if size == 0:
            return b""
        value = secrets.randbelow((1 << (8 * size)) // self.count) * self.count + self.index
        return value.to_bytes(size, "big")

    def owner(self, secret: bytes) -> int:
        return int.from_bytes(secret, "big") % self.count

    async def start(self, server: "ProxyServer") -> None:
        self.server = server
        path = self.path(self.index)
        try:
            os.unlink(path)  # left by this worker's predecessor
        except FileNotFoundError:
            pass
        self._listener = await asyncio.start_unix_server(self._handle, path)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self._handlers) + list(self._announcing):
            task.cancel()
        if self._handlers or self._announcing:
            await asyncio.wait(list(self._handlers) + list(self._announcing), timeout=2)
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.wait_closed(), 2)
            except TimeoutError:
                pass
            try:
                os.unlink(self.path(self.index))
            except OSError:
                pass

    async def forward(self, pid: int, secret: bytes) -> bool:
        """Pass a CancelRequest whose key another worker issued to that worker; False if the key is this worker's."""
        owner = self.owner(secret)
        if owner == self.index:
            return False
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(self.path(owner))
                try:
                    writer.write(codec.cancel_request(pid, secret))
                    await writer.drain()
                    await reader.read(1)  # the owner closes once it has passed the request on
                finally:
                    writer.close()
            log.info("cancel request passed on to worker %d", owner)
        except (OSError, TimeoutError) as exc:
            log.warning("could not forward a cancel request to worker %d: %s", owner, exc.__class__.__name__)
        return True

    def schema_changed(self, database: str) -> "asyncio.Future | None":
        """Tell every sibling that DDL on ``database`` was committed through this worker (in the
        background, each bounded by the peer timeout); the future is done when all have taken it."""
        name = database.encode("utf-8", "surrogateescape")
        if len(name) + 8 > MAX_SCHEMA_PACKET:
            return None
        packet = struct.pack("!iI", len(name) + 8, SCHEMA_CHANGED_CODE) + name
        tasks = []
        for index in range(self.count):
            if index != self.index:
                task = asyncio.get_running_loop().create_task(
                    self._announce(index, packet), name=f"worker-{self.index}-schema-news-{index}")
                self._announcing.add(task)
                task.add_done_callback(self._announcing.discard)
                tasks.append(task)
        return asyncio.gather(*tasks, return_exceptions=True) if tasks else None

    async def _announce(self, index: int, packet: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(self.path(index))
                try:
                    writer.write(packet)
                    await writer.drain()
                    await reader.read(1)  # the sibling answers once it has taken the news
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("could not tell worker %d of a schema change: %s", index, exc.__class__.__name__)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"worker-{self.index}-peer")
            self._handlers.add(task)
        try:
            async with asyncio.timeout(PEER_READ_TIMEOUT):
                size, code = struct.unpack("!iI", await reader.readexactly(8))
                if code == SCHEMA_CHANGED_CODE and 8 <= size <= MAX_SCHEMA_PACKET:
                    name = (await reader.readexactly(size - 8)).decode("utf-8", "surrogateescape")
                    runtime = getattr(self.server, "runtime", None)
                    if runtime is not None:
                        runtime.schema_changed(name, "DDL committed through a sibling worker", local=False)
                    writer.write(b"k")  # taken: the sibling's client may have its answer now
                    await writer.drain()
                    return
                if code != codec.CANCEL_REQUEST_CODE or not 12 <= size <= MAX_CANCEL_PACKET:
                    return
                body = await reader.readexactly(size - 8)
            pid = int.from_bytes(body[:4], "big")
            await self.server.forward_cancel(pid, body[4:], from_peer=True)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("forwarded cancel request failed")
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)


class _WorkerTag(logging.Filter):
    """Prefixes a worker's log messages with ``worker <i>:`` (session ids repeat across workers)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"worker {index}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "worker_tagged", False):
            record.msg = self.prefix + str(record.msg)
            record.worker_tagged = True
        return True


class Worker:
    """One worker process's link to its supervisor (``proxy.cli._serve`` reports to it)."""

    def __init__(self, control: socket.socket, index: int, count: int, peers: CancelPeers) -> None:
        self.control = control
        self.index = index
        self.count = count
        self.peers = peers

    def started(self, stop: Callable[[], None]) -> None:
        """The proxy listens: tell the supervisor, and stop (drain) when the supervisor goes away."""
        self.control.settimeout(CONTROL_TIMEOUT)
        try:
            self.control.sendall(b"ready\n")
        except OSError:
            stop()
            return
        self.control.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = self.control.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.control.fileno())
                log.warning("the supervisor is gone: shutting down")
                stop()

        loop.add_reader(self.control.fileno(), readable)


def _read_header(control: socket.socket) -> dict:
    control.settimeout(CONTROL_TIMEOUT)
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = control.recv(65536)
        if not chunk or len(data) > 16 * 1024 * 1024:
            raise ConnectionError("no configuration from the supervisor")
        data += chunk
    return json.loads(data)


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process: ``python -m proxy.workers CONTROL_FD``."""
    from proxy import cli
    from proxy.config import ConfigError
    from proxy.policy.problems import PolicyError

    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the proxy's own handler (a policy reload) is in place
    control = socket.socket(fileno=int(argv[0]))
    try:
        header = _read_header(control)
    except (OSError, ValueError) as exc:
        print(f"purpose-proxy worker: {exc}", file=sys.stderr)
        return 1
    index, count = header["index"], header["count"]
    try:
        config = Config(**header["config"]).validate()
    except ConfigError as exc:
        print(f"purpose-proxy worker {index}: configuration error: {exc}", file=sys.stderr)
        return 2
    cli.setup_logging(config)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(index))
    log.info("started (pid %d)", os.getpid())
    peers = CancelPeers(index, count, header["peer_dir"], config.connect_timeout + 3.0)
    try:
        return cli.serve(config, worker=Worker(control, index, count, peers))
    except PolicyError as exc:
        print(f"purpose-proxy worker {index}: invalid policy: {exc}", file=sys.stderr)
        return 2


# --- the supervisor ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class Supervisor:
    """Runs ``config.workers`` worker processes, forwards SIGTERM and SIGHUP to them and restarts the dead."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.count = config.workers
        self.slots = [_Slot(i) for i in range(self.count)]
        self.stopping = False
        self.peer_dir = ""
        self._stop: asyncio.Event | None = None
        self._initial: asyncio.Future | None = None
        self._endpoint = TinyHTTP(self._route, "supervisor")

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._initial = loop.create_future()
        self.peer_dir = tempfile.mkdtemp(prefix="purpose-proxy-")  # mode 0700: only this user
        if len(os.path.join(self.peer_dir, f"worker-{self.count}.sock")) > 100:
            shutil.rmtree(self.peer_dir, ignore_errors=True)
            self.peer_dir = tempfile.mkdtemp(prefix="purpose-proxy-", dir="/tmp")  # unix socket paths are short
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.forward, signal.SIGHUP)
        try:
            if self.config.metrics_listen != "off":
                host, port = parse_hostport(self.config.metrics_listen, "metrics_listen")
                try:
                    await self._endpoint.start(host, port)
                except OSError as exc:
                    print(f"purpose-proxy: cannot start: {exc}", file=sys.stderr)
                    return 1
            for slot in self.slots:
                slot.task = loop.create_task(self._keep(slot), name=f"worker-{slot.index}-supervise")
            stop_wait = loop.create_task(self._stop.wait(), name="supervisor-stop-wait")
            try:
                await asyncio.wait([self._initial, stop_wait], timeout=STARTUP_TIMEOUT,
                                   return_when=asyncio.FIRST_COMPLETED)
                status = 0
                if not self._stop.is_set():
                    if not self._initial.done():
                        log.error("workers not listening within %.0fs: giving up", STARTUP_TIMEOUT)
                        status = 1
                    else:
                        status = self._initial.result()
                    if status == 0:
                        print(f"purpose-proxy listening on {', '.join(self.config.listen)}, upstream "
                              f"{self.config.upstream}, {self.count} workers", flush=True)
                        await self._stop.wait()  # the proxy's lifetime: until SIGTERM or SIGINT
                    else:
                        self.stop()
                log.info("shutting down: waiting for %d workers", sum(s.running for s in self.slots))
                await self._shutdown()
                return status
            finally:
                stop_wait.cancel()
                await asyncio.wait([stop_wait], timeout=1)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._close_endpoint()
            shutil.rmtree(self.peer_dir, ignore_errors=True)

    def stop(self) -> None:
        """SIGTERM or SIGINT: no more restarts; the workers drain and exit."""
        first = not self.stopping
        self.stopping = True
        self._stop.set()
        if first:
            log.info("stopping: forwarding SIGTERM to the workers")
        self.forward(signal.SIGTERM)

    def forward(self, sig: int) -> None:
        """Send ``sig`` to the running workers (SIGHUP only to those listening: it reloads their policy,
        and one still starting loads the policy anyway)."""
        for slot in self.slots:
            if slot.running and (slot.ready or sig != signal.SIGHUP):
                try:
                    slot.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
        if sig == signal.SIGHUP:
            log.info("SIGHUP forwarded to %d workers", sum(s.running and s.ready for s in self.slots))

    async def _shutdown(self) -> None:
        """Wait for the workers (stop() sent them SIGTERM); kill those still running past the grace period."""
        tasks = [s.task for s in self.slots if s.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_timeout + SHUTDOWN_GRACE)
        if pending:
            for slot in self.slots:
                if slot.running:
                    log.warning("worker %d (pid %d) still running after shutdown_timeout: killing it",
                                slot.index, slot.proc.pid)
                    try:
                        slot.proc.kill()
                    except ProcessLookupError:
                        pass
            _, pending = await asyncio.wait(pending, timeout=5)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)

    # --- one worker ------------------------------------------------------------------------

    async def _keep(self, slot: _Slot) -> None:
        """Run worker ``slot.index`` until the supervisor stops, restarting it when it dies."""
        while not self.stopping:
            code = await self._run_once(slot)
            if self.stopping:
                break
            if not self._initial.done():
                log.error("worker %d could not start (%s)", slot.index, _describe_exit(code))
                self._initial.set_result(code if code and code > 0 else 1)
                break
            lived = time.monotonic() - slot.started_at
            slot.quick_deaths = 0 if lived >= STABLE_AFTER else slot.quick_deaths + 1
            delay = min(BACKOFF_MIN * 2 ** max(slot.quick_deaths - 1, 0), BACKOFF_MAX)
            log.warning("worker %d exited unexpectedly (%s) after %.1fs; restarting in %.1fs",
                        slot.index, _describe_exit(code), lived, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                break
            except TimeoutError:
                slot.restarts += 1

    async def _run_once(self, slot: _Slot) -> int | None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # where this proxy package is imported from
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            with parent:
                try:
                    slot.proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "proxy.workers", str(child.fileno()),
                        pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL, env=env)
                except OSError as exc:
                    log.error("cannot start worker %d: %s", slot.index, exc)
                    return 1
                finally:
                    child.close()
                slot.ready = False
                slot.started_at = time.monotonic()
                log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)
                if self.stopping:  # SIGTERM came while it was being started
                    slot.proc.send_signal(signal.SIGTERM)
                reader, writer = await asyncio.open_unix_connection(sock=parent)
                header = {"index": slot.index, "count": self.count, "peer_dir": self.peer_dir,
                          "config": dataclasses.asdict(worker_config(self.config, slot.index))}
                writer.write(json.dumps(header).encode() + b"\n")
                control = asyncio.get_running_loop().create_task(self._control(slot, reader),
                                                                 name=f"worker-{slot.index}-control")
                try:
                    return await slot.proc.wait()
                finally:
                    slot.ready = False
                    control.cancel()
                    await asyncio.wait([control], timeout=2)
                    writer.close()
        except OSError as exc:
            log.error("worker %d: control channel failed: %s", slot.index, exc)
            if slot.running:
                slot.proc.kill()
                await asyncio.wait_for(slot.proc.wait(), 5)
            return 1

    async def _control(self, slot: _Slot, reader: asyncio.StreamReader) -> None:
        """Read the worker's control messages: ``ready`` once it listens."""
        try:
            while line := await reader.readline():
                if line == b"ready\n":
                    slot.ready = True
                    log.info("worker %d (pid %d) listening", slot.index, slot.proc.pid)
                    if all(s.ready for s in self.slots) and not self._initial.done():
                        self._initial.set_result(0)
        except (ConnectionError, ValueError):
            pass

    # --- health endpoint ---------------------------------------------------------------------

    async def _close_endpoint(self) -> None:
        await self._endpoint.close()

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            ready, report = await self.readiness()
            return (200 if ready else 503), "application/json", (json.dumps({"ready": ready, "workers": report})
                                                                 + "\n").encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
        return 404, "text/plain; charset=utf-8", b"not found\n"

    async def readiness(self) -> tuple[bool, list[dict]]:
        """Ready: not stopping, and every worker runs, has reported ready and answers its /readyz with 200."""
        loop = asyncio.get_running_loop()
        answers = await asyncio.gather(*(loop.create_task(self._worker_readyz(slot), name=f"worker-{slot.index}-readyz")
                                         for slot in self.slots))  # each bounded by WORKER_READYZ_TIMEOUT
        report = []
        for slot, (ok, checks) in zip(self.slots, answers):
            report.append({"index": slot.index, "pid": slot.proc.pid if slot.running else None,
                           "running": slot.running, "ready": slot.ready and ok, "restarts": slot.restarts,
                           "metrics": worker_metrics_listen(self.config, slot.index), "checks": checks})
        ready = not self.stopping and all(w["ready"] for w in report)
        return ready, report

    async def _worker_readyz(self, slot: _Slot) -> tuple[bool, dict]:
        if not (slot.running and slot.ready):
            return False, {}
        host, port = parse_hostport(worker_metrics_listen(self.config, slot.index), "metrics_listen")
        writer = None
        try:
            async with asyncio.timeout(WORKER_READYZ_TIMEOUT):
                reader, writer = await asyncio.open_connection(_local_host(host), port)
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                await writer.drain()
                answer = b""
                while len(answer) < 65536 and (chunk := await reader.read(65536)):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            ok = head.split(b" ", 2)[1:2] == [b"200"]
            return ok, json.loads(body).get("checks", {})
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            return False, {"endpoint": {"ok": False, "error": exc.__class__.__name__}}
        finally:
            if writer is not None:
                writer.close()

    def _metrics(self) -> bytes:
        running = sum(s.running for s in self.slots)
        ready = sum(s.running and s.ready for s in self.slots)
        lines = [
            "# HELP purpose_proxy_workers Worker processes configured (workers).",
            "# TYPE purpose_proxy_workers gauge",
            f"purpose_proxy_workers {self.count}",
            "# HELP purpose_proxy_workers_running Worker processes running now.",
            "# TYPE purpose_proxy_workers_running gauge",
            f"purpose_proxy_workers_running {running}",
            "# HELP purpose_proxy_workers_ready Worker processes that have reported listening.",
            "# TYPE purpose_proxy_workers_ready gauge",
            f"purpose_proxy_workers_ready {ready}",
            "# HELP purpose_proxy_worker_restarts_total Workers restarted after dying unexpectedly.",
            "# TYPE purpose_proxy_worker_restarts_total counter",
        ]
        lines += [f'purpose_proxy_worker_restarts_total{{worker="{s.index}"}} {s.restarts}' for s in self.slots]
        return ("\n".join(lines) + "\n").encode()


def supervise(config: Config) -> int:
    """``purpose-proxy serve`` with ``workers`` > 1: run the supervisor until SIGTERM (or a failed start)."""
    return asyncio.run(Supervisor(config).run())


if __name__ == "__main__":
    from proxy.workers import worker_main as _main  # the module proper, not this __main__ copy

    sys.exit(_main())
