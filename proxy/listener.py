"""Accepting clients, counting them, forwarding cancel requests and shutting down happen here."""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import ssl
import time
from typing import Callable

from proxy.config import Config, is_unix_dir, parse_hostport
from proxy.enforcement.hook import DeciderFactory, SessionInfo, StartupRefused, load_factory
from proxy.enforcement.limits import too_many_connections_for_role
from proxy.observability.logs import mask_values
from proxy.policy.decision import Block
from proxy.session import Session, _Side, _StartupError
from proxy.tls import tls_contexts, warn_about_transport
from proxy.wire import codec
from proxy.wire.state import Phase

log = logging.getLogger(__name__)

# Phases in which no statement is running upstream (see shutdown()).
_NOT_RUNNING = frozenset({Phase.STARTUP, Phase.AUTH, Phase.IDLE, Phase.FAILED, Phase.CLOSED})


class ProxyServer:
    """The listening proxy: its sessions, their cancel keys, and its lifecycle."""

    def __init__(self, config: Config, decider_factory: DeciderFactory | None = None, *,
                 recorder=None, peers=None) -> None:
        self.config = config
        # With --workers N > 1: this worker's proxy.workers.CancelPeers (cancel keys that name
        # the worker, and the socket sibling workers forward cancel requests to); else None.
        self.peers = peers
        self.runtime = None
        # Observability (proxy.observability.recorder): metrics, traces and audit, or
        # None when all three are off (the relay-only configuration).
        if recorder is None:
            from proxy.observability.recorder import Recorder, enabled

            recorder = Recorder(config) if enabled(config) else None
        self.recorder = recorder
        if decider_factory is None and config.decider == "purpose":
            from proxy.enforcement.purpose import decider_factory as purpose_factory
            from proxy.observability.reloads import ObservedPolicyRuntime

            self.runtime = ObservedPolicyRuntime(config)  # raises PolicyError on an invalid policy
            self.runtime.listeners.append(self._decisions_changed)
            if recorder is not None:
                self.runtime.reload_observers.append(recorder.policy_reloaded)
            decider_factory = purpose_factory(self.runtime)
        self.decider_factory = decider_factory or load_factory(config.decider)
        self.client_tls, self.client_cert_der, self.upstream_tls = tls_contexts(config)
        warn_about_transport(config)
        self.sessions: set[Session] = set()
        self._full_logged = -1e9  # when ``accept`` last logged that connections are refused
        self.upstream_plaintext = 0  # upstream connections left unencrypted by upstream_tls = prefer
        self.tls_reloads = {"success": 0, "failure": 0}  # SIGHUP's rereading of the TLS files (``reload_tls``)
        self._plaintext_logged = -1e9
        self.admitted = 0
        self.role_sessions: dict[str, int] = {}  # authenticated sessions per role (max_connections_per_role)
        # CancelRequests the proxy sends on its own (a statement past upstream_response_timeout,
        # one orphaned by a lost upstream connection); each bounded by connect_timeout + 2 s.
        self.cancel_tasks: set[asyncio.Task] = set()
        self.cancel_keys: dict[tuple[int, bytes], tuple[Session, bytes]] = {}
        self.servers: list[asyncio.base_events.Server] = []
        self.observers: list[Callable] = []
        self.upstream_failures = 0
        self.shutting_down = False
        if recorder is not None:
            recorder.bind(self)
            self.observers.append(recorder.observe)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.recorder is not None:
            await self.recorder.start()  # audit writer, metrics and health endpoint
        if self.runtime is not None:
            self.runtime.start()
        if self.peers is not None:
            await self.peers.start(self)
            if self.runtime is not None:  # DDL committed through this worker is news to its siblings
                self.runtime.schema_observers.append(self.peers.schema_changed)
        for addr in self.config.listen:
            host, port = parse_hostport(addr, "listen")
            server = await loop.create_server(
                lambda: _Side(Session(self), upstream=False), host, port, reuse_address=True, backlog=1024,
                reuse_port=True if self.peers is not None else None,  # workers share the port (kernel spreads clients)
            )
            self.servers.append(server)
            log.info("listening on %s", addr)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for server in self.servers:
            for sock in server.sockets:
                out.append(sock.getsockname()[:2])
        return out

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting; let sessions finish their work; close stragglers with 57P01.

        A session is closed as soon as it is idle outside a transaction block, so
        running statements and open transactions get up to ``timeout`` seconds.
        """
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        self.shutting_down = True
        for server in self.servers:
            server.close()
        message = "terminating connection because purpose-proxy is shutting down"
        for session in list(self.sessions):
            session.draining = True
            if session.relay is None or session.relay.idle:
                session.terminate("57P01", message)
        pending = [s.done for s in self.sessions if not s.done.done()]
        if pending:
            done, not_done = await asyncio.wait(pending, timeout=timeout)
            if not_done:
                log.warning("shutdown: closing %d sessions still busy after %.1fs", len(not_done), timeout)
        # A backend running a statement does not notice its connection closing until
        # it next reads or writes, so a statement cut off here would run on (and an
        # autocommit write commit) after the client was told the session is over.
        # Cancel those statements, as PostgreSQL's own fast shutdown does.
        running = [s.relay.backend_key for s in self.sessions
                   if s.relaying and s.relay.backend_key is not None and s.relay.phase not in _NOT_RUNNING]
        for session in list(self.sessions):
            session.terminate("57P01", message)
        if running:
            await asyncio.wait([asyncio.ensure_future(self.cancel_backend(pid, secret))
                                for pid, secret in running], timeout=5)
        tasks = [s.task for s in list(self.sessions) if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self.cancel_tasks:
            await asyncio.wait(list(self.cancel_tasks), timeout=5)
            for task in list(self.cancel_tasks):
                task.cancel()
        for server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except TimeoutError:
                pass
        if self.runtime is not None:
            await self.runtime.close()
        if self.peers is not None:
            await self.peers.close()
        if self.recorder is not None:
            await self.recorder.close()  # flushes spans and writes every queued audit record

    # --- decisions -------------------------------------------------------------------------

    async def new_decider(self, info: SessionInfo):
        """The session's decider (a factory may be a coroutine: the purpose runtime loads schemas)."""
        try:
            decider = self.decider_factory(info)
            if inspect.isawaitable(decider):
                decider = await decider
            if self.recorder is not None:
                decider = self.recorder.wrap_decider(decider)  # audit_when_full = fail: the gate
            return decider
        except StartupRefused:
            raise
        except Exception as exc:
            # (masked: the driver's message quotes what the client sent, such as the database name)
            log.error("session %s: cannot prepare decisions: %s: %s", info.session_id, exc.__class__.__name__,
                      mask_values(str(exc)))
            raise _StartupError("08006", f"purpose-proxy could not read the schema of database \"{info.database}\": "
                                         f"{exc.__class__.__name__}",
                                hint="Check schema_dsn and that PostgreSQL is reachable.") from None

    def reload(self, why: str = "SIGHUP") -> None:
        """What SIGHUP reloads: the TLS files, then the policy."""
        self.reload_tls()
        self.reload_policy(why)

    def reload_policy(self, why: str = "SIGHUP") -> None:
        """Reload the policy in the background."""
        if self.runtime is not None:
            self.runtime.request_reload(why)

    def reload_tls(self) -> bool:
        """Read the TLS certificate, key and CA files again, for connections from now on (a rotated
        certificate); sessions keep the one they began with. If any file cannot be used (a certificate
        copied before its key, a missing file), everything stays as it was, as PostgreSQL keeps its
        SSL context when a reload cannot load the new files (be_tls_init with isServerStart false)."""
        config = self.config
        if not config.tls_cert and config.upstream_tls == "disable":
            return True
        try:
            contexts = tls_contexts(config)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.tls_reloads["failure"] += 1
            log.error("TLS files not reloaded, the certificates in force stay: %s: %s", exc.__class__.__name__, exc)
            return False
        self.client_tls, self.client_cert_der, self.upstream_tls = contexts
        self.tls_reloads["success"] += 1
        log.info("TLS files reloaded")
        return True

    def _decisions_changed(self) -> None:
        # Statements prepared before must be decided again before they next run.
        for session in self.sessions:
            if session.relay is not None:
                session.relay.refresh_epoch()

    # --- sessions ----------------------------------------------------------------------------

    def accept(self) -> bool:
        """Whether a new connection may wait for its startup packet: connections count from the start (an
        unauthenticated client held 20000 sockets silent, every descriptor the proxy had, hunt 21), up to
        ``max_client_connections`` and a tenth more (cancel requests and clients still starting up)."""
        limit = self.config.max_client_connections
        if len(self.sessions) <= limit + max(10, limit // 10):
            return True
        now = time.monotonic()
        if now - self._full_logged >= 10:  # (not once per connection: a flood would flood the log too)
            self._full_logged = now
            log.warning("refusing connections: %d are open or starting up (max_client_connections %d)",
                        len(self.sessions), limit)
        return False

    def admit(self, session: Session) -> bool:
        if self.shutting_down:
            raise _StartupError("57P03", "purpose-proxy is shutting down")
        if self.admitted >= self.config.max_client_connections:
            return False
        self.admitted += 1
        session.counted = True
        return True

    def admit_role(self, session: Session) -> Block | None:
        """At AuthenticationOk: take one of the role's slots, or refuse (53300) when it has none left.

        Counted after authentication, where PostgreSQL checks a role's own
        connection limit, so a client cannot use up a role's slots without its
        credentials.
        """
        limit = self.config.max_connections_per_role
        role = session.info.role
        held = self.role_sessions.get(role, 0)
        if held >= limit:
            block = too_many_connections_for_role(role, limit)
            self.startup_refused(session, block)  # observability: metrics and audit of the refusal
            return block
        self.role_sessions[role] = held + 1
        session.role_counted = True
        return None

    def forget(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            if session.counted:
                self.admitted -= 1
                session.counted = False
            if session.role_counted:
                role = session.info.role
                held = self.role_sessions.get(role, 0) - 1
                if held > 0:
                    self.role_sessions[role] = held
                else:
                    self.role_sessions.pop(role, None)
                session.role_counted = False
            if session.relay is not None and session.relay.backend_key is not None and session.client_secret:
                self.cancel_keys.pop((session.relay.backend_key[0], session.client_secret), None)
            if self.recorder is not None:
                self.recorder.session_ended(session)

    # Observability hooks the session calls (no-ops without a recorder).

    def session_started(self, session: Session) -> None:
        if self.recorder is not None:
            self.recorder.session_started(session)

    def startup_refused(self, session: Session, block) -> None:
        if self.recorder is not None:
            self.recorder.startup_refused(session, block)

    def observe(self, session: Session, events: list) -> None:
        for observer in self.observers:
            observer(session, events)

    def upstream_failed(self) -> None:
        self.upstream_failures += 1

    # --- upstream ----------------------------------------------------------------------------

    async def open_upstream(self, factory: Callable[[], _Side]) -> tuple[asyncio.Transport, _Side]:
        """Connect to PostgreSQL and negotiate TLS as configured (55.2.10 "SSL Session Encryption")."""
        loop = asyncio.get_running_loop()
        upstream = self.config.upstream
        async with asyncio.timeout(self.config.connect_timeout):
            if is_unix_dir(upstream):
                port = 5432
                path = upstream
                if ":" in upstream.rsplit("/", 1)[-1]:
                    path, _, p = upstream.rpartition(":")
                    port = int(p)
                transport, side = await loop.create_unix_connection(factory, f"{path.rstrip('/')}/.s.PGSQL.{port}")
                return transport, side
            host, port = parse_hostport(upstream, "upstream")
            transport, side = await loop.create_connection(factory, host, port)
            ctx = self.upstream_tls
            if ctx is None:
                return transport, side
            transport.write(codec.ssl_request())
            await side.read_until(1, self.config.connect_timeout)
            answer = bytes(side.buf[:1])
            del side.buf[:1]
            if answer == b"S":
                if side.buf:
                    # 55.2.10: bytes after the server's "S" and before the handshake were not encrypted:
                    # anyone on the path could have put them there, a login and results included
                    # (libpq's CVE-2021-23222; hunt 23 made the proxy relay a forged AuthenticationOk).
                    transport.close()
                    raise _StartupError("08P01", "received unencrypted data after the upstream server's SSL response")
                transport = await loop.start_tls(transport, side, ctx, server_hostname=host)
                side.transport = transport
            elif self.config.upstream_tls != "prefer":
                transport.close()
                raise _StartupError("08006", "the upstream PostgreSQL server does not support TLS, "
                                             f"but upstream_tls is {self.config.upstream_tls}")
            else:
                self.upstream_plaintext += 1
                now = time.monotonic()
                if now - self._plaintext_logged >= 60:  # (once a minute: every session would say it)
                    self._plaintext_logged = now
                    log.warning("the upstream PostgreSQL server refused TLS; with upstream_tls = prefer this "
                                "session's upstream connection, its password exchange included, is not encrypted")
            return transport, side

    # --- cancel requests ----------------------------------------------------------------------

    def cancel_statement(self, session: Session) -> bool:
        """Cancel what the session's backend is running, in the background (a named, tracked task)."""
        relay = session.relay
        if relay is None or relay.backend_key is None or self.shutting_down:
            return False
        pid, secret = relay.backend_key
        task = asyncio.get_running_loop().create_task(self.cancel_backend(pid, secret),
                                                      name=f"session-{session.id}-cancel")
        self.cancel_tasks.add(task)
        task.add_done_callback(self.cancel_tasks.discard)
        return True

    def cancel_orphaned(self, session: Session) -> None:
        """The session lost its upstream connection or its client: cancel a statement its backend may still be
        running (it would run on unseen)."""
        relay = session.relay
        if relay is not None and relay.phase not in _NOT_RUNNING:
            self.cancel_statement(session)

    def register_cancel_key(self, session: Session, pid: int, secret: bytes) -> bytes:
        """Hand the client a proxy-owned secret for the backend's key (same pid, same length)."""
        peers = self.peers
        client_secret = peers.new_secret(len(secret)) if peers is not None else secrets.token_bytes(len(secret))
        self.cancel_keys[(pid, client_secret)] = (session, secret)
        return client_secret

    async def forward_cancel(self, pid: int, client_secret: bytes, *, from_peer: bool = False) -> None:
        """Forward a CancelRequest to the backend that owns the key (55.2.8 "Canceling Requests").

        With workers, a key another worker issued goes to that worker (``from_peer``:
        it came from a sibling, so it is never passed on again).
        """
        entry = self.cancel_keys.get((pid, client_secret))
        if entry is None:
            if self.peers is not None and not from_peer and await self.peers.forward(pid, client_secret):
                return
            log.info("cancel request with an unknown key ignored")
            return
        await self.cancel_backend(pid, entry[1])

    async def cancel_backend(self, pid: int, secret: bytes) -> None:
        """Send a CancelRequest with the backend's own key to PostgreSQL."""
        try:
            transport, side = await self.open_upstream(lambda: _CancelSide())
            transport.write(codec.cancel_request(pid, secret))
            # PostgreSQL answers nothing and closes; wait briefly for that, then close.
            try:
                async with asyncio.timeout(2):
                    await side.closed_future
            except TimeoutError:
                pass
            transport.close()
        except (OSError, TimeoutError, ssl.SSLError, _StartupError) as exc:
            log.warning("could not forward cancel request: %s", exc)


class _CancelSide(_Side):
    """The upstream side of a cancel connection: it only waits for the server to close."""

    def __init__(self) -> None:
        self.transport = None
        self.buf = bytearray()
        self.waiter = None
        self.closed = False
        self.closed_future = asyncio.get_running_loop().create_future()
        self.upstream = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._wake()
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass
