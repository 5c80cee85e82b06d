"""One client connection and its upstream connection: the asyncio shell around the relay.

The startup phase (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage,
upstream connect and TLS) runs in one named task per session. From the
StartupMessage on, bytes go straight from ``data_received`` into the sans-IO
``Relay`` and its output is written at once: no await per message, no queue.
Backpressure: when one side's write buffer passes its high-water mark, reading
from the other side pauses until it drains (asyncio pause/resume_writing).

Timers are ``loop.call_later`` handles the session keeps and cancels when it
closes: ``auth_timeout`` from accept until the first ReadyForQuery, and one
watch timer for ``idle_session_timeout`` and ``upstream_response_timeout``, which
re-arms itself for the nearest deadline (the hot path only notes the time of
the latest bytes each way). What counts as idle or waiting is the relay's
protocol state, never the content of rows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import math
import socket
import ssl
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Callable

from proxy.enforcement.hook import SessionInfo, StartupRefused, refuse_all
from proxy.policy.decision import Block
from proxy.wire import codec
from proxy.wire.relay import Relay
from proxy.wire.state import Phase

if TYPE_CHECKING:
    from proxy.listener import ProxyServer

log = logging.getLogger(__name__)
REFUSED_WAIT = 2.0  # seconds a connection over the limit has to send its startup packet

_ids = itertools.count(1)

# Seconds a closing connection may take to hand over what is still buffered for
# it; after that it is aborted (a peer that stopped reading would hold it forever).
CLOSE_GRACE = 10.0
# Seconds a client connection the proxy ends stays half-open (our side shut for
# writing, reads dropped) so that its last message, typically a FATAL saying
# why, is not destroyed by the reset a later write of the client would provoke.
LINGER = 1.0
IDLE_SESSION_TIMEOUT_MESSAGE = "terminating connection due to idle-session timeout"  # PostgreSQL 14+, 57P05


class ClientGone(Exception):
    """The client closed its connection during the startup phase."""


class _Side(asyncio.Protocol):
    """The asyncio protocol of one side of a session; it forwards events to the session."""

    def __init__(self, session: "Session", upstream: bool) -> None:
        self.session = session
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # startup phase only
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.abort_timer: asyncio.TimerHandle | None = None  # armed by shut (CLOSE_GRACE) and linger (LINGER)
        self.received: Callable[[bytes], None] | None = None  # set when relaying starts: where bytes go
        self.lingering = False  # shut for writing, dropping what it reads until the peer's EOF (``linger``)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.upstream:
            self.session.upstream = self  # from now on, closing the session closes it too
        else:
            self.session.client_connected(self)

    def data_received(self, data: bytes) -> None:
        received = self.received
        if received is not None:
            received(data)
            return
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        if self.upstream or self.lingering:
            # the server half-closed: its session is over (side_lost reports it); or the
            # client answered our FIN with its own: close now
            return False
        return self.session.client_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.abort_timer is not None:
            self.abort_timer.cancel()
            self.abort_timer = None
        self._wake()
        self.session.side_lost(self, exc)

    def pause_writing(self) -> None:
        self.session.pause_other(self)

    def resume_writing(self) -> None:
        self.session.resume_other(self)

    def shut(self) -> None:
        """Close the connection; what is still buffered for the peer gets CLOSE_GRACE to go out."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size() and not self.closed:
            # close() first hands over what is buffered; a peer that stopped
            # reading would keep the connection (and its buffers) forever.
            self.abort_timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    def linger(self) -> None:
        """End the connection gently: send FIN after what is buffered, drop whatever the peer still
        sends, and close at its EOF or after LINGER seconds.

        A plain close of a socket with unread input, or one that receives data
        afterwards, answers with a TCP reset, and a reset makes the peer's kernel
        discard what it received but the client has not read yet: a client that
        sends its next Query before reading would lose the FATAL telling it why
        the session ended (PostgreSQL's own backends have this race; a proxy in
        the middle need not).
        """
        transport = self.transport
        self.lingering = True
        self.received = _drop
        try:
            transport.resume_reading()
            transport.write_eof()
        except (NotImplementedError, RuntimeError, OSError):
            self.shut()
            return
        self.abort_timer = asyncio.get_running_loop().call_later(LINGER, self.shut)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read_until(self, n: int, timeout: float | None) -> None:
        """Wait until ``n`` bytes are buffered (startup phase only; ``ClientGone`` if the peer closed)."""
        async with asyncio.timeout(timeout):
            while len(self.buf) < n:
                if self.closed:
                    raise ClientGone()
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter


def _drop(data: bytes) -> None:
    """What a lingering connection does with what it reads."""


class Session:
    """A proxied client session: startup, then relaying through a ``Relay``."""

    def __init__(self, server: "ProxyServer") -> None:
        self.server = server
        self.config = server.config
        self.id = f"{next(_ids):06x}"
        self.client: _Side | None = None
        self.upstream: _Side | None = None
        self.relay: Relay | None = None
        self.relaying = False
        self.info: SessionInfo | None = None
        self.task: asyncio.Task | None = None
        self.hold_task: asyncio.Task | None = None  # holds the client's answers (``_hold_client_output``)
        self.done = asyncio.get_running_loop().create_future()
        self.draining = False
        self.counted = False  # holds one of the server's client-connection slots
        self.role_counted = False  # holds one of its role's slots (max_connections_per_role)
        self.connecting = False  # past the StartupMessage: deciding, connecting upstream
        self.client_secret: bytes | None = None
        self.client_cert_der: bytes | None = None  # the certificate (DER) the client's TLS handshake presented
        self.loop = asyncio.get_running_loop()
        self.auth_timer: asyncio.TimerHandle | None = None
        self.watch_timer: asyncio.TimerHandle | None = None
        # With idle_session_timeout or upstream_response_timeout on: loop times of the
        # latest bytes from each side, of the client bytes that began the current wait
        # for the server, and of the cancel request the proxy sent for it.
        self.watching = False
        self.seen_client = self.seen_server = self.waiting_since = 0.0
        self.cancelled_at: float | None = None
        self.upstream_paused = False  # reading from upstream paused: the client is not keeping up
        self.client_done = False  # the client half-closed: PostgreSQL finishes what it was sent, then closes
        # Observability (read by proxy.observability at scrape time and when the
        # session ends): bytes relayed each way, and the session's decider.
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.decider = None

    # --- protocol callbacks ----------------------------------------------------------

    def client_connected(self, side: _Side) -> None:
        self.client = side
        peer = side.transport.get_extra_info("peername")
        addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        self.info = SessionInfo(self.id, addr)
        self.server.sessions.add(self)
        self.auth_timer = self.loop.call_later(self.config.auth_timeout, self._auth_timeout)
        self.task = self.loop.create_task(self._startup(), name=f"session-{self.id}-startup")

    def from_client(self, data: bytes) -> None:
        self.bytes_from_client += len(data)  # observability: bytes relayed
        relay = self.relay
        if self.watching:
            now = self.loop.time()
            self.seen_client = now
            if not relay.awaiting_server:
                self.waiting_since = now  # these bytes may begin a wait for the server
        try:
            relay.client_data(data)
        except codec.ProtocolViolation as exc:
            relay.fail(exc.sqlstate, f"protocol violation: {exc}")
        self.flush()

    def from_server(self, data: bytes) -> None:
        self.bytes_from_server += len(data)  # observability: bytes relayed
        relay = self.relay
        if self.watching:
            self.seen_server = self.loop.time()
        try:
            relay.server_data(data)
        except codec.ProtocolViolation as exc:
            log.error("session %s: upstream protocol violation: %s", self.id, exc)
            relay.fail("08P01", "purpose-proxy received an invalid message from the upstream server")
        self.flush()
        if self.draining and relay.idle:
            self.terminate("57P01", "terminating connection because purpose-proxy is shutting down")

    def flush(self) -> None:
        relay = self.relay
        if relay.to_server:
            if self.upstream is not None and not self.upstream.closed:
                self.upstream.transport.writelines(relay.to_server)
            relay.to_server.clear()
        if relay.to_client:
            if relay.client_hold is not None:
                self._hold_client_output(relay)
            else:
                if not self.client.closed:
                    self.client.transport.writelines(relay.to_client)
                relay.to_client.clear()
        if relay.events:
            self.server.observe(self, relay.events)
            relay.events.clear()
        if relay.close_after_flush:
            self.close()

    def _hold_client_output(self, relay) -> None:
        """Write nothing to the client until ``relay.client_hold`` is done (bounded: connect_timeout
        + 3 s); meanwhile nothing more is read from PostgreSQL, so nothing piles up here."""
        if self.hold_task is not None:
            return
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.transport.pause_reading()

        async def release(until) -> None:
            try:
                await asyncio.wait_for(asyncio.shield(until), self.config.connect_timeout + 3.0)
            except Exception as exc:  # a timeout; the siblings' announcements log their own failures
                log.warning("session %s: answered before every worker heard of the schema change (%s)",
                            self.id, exc.__class__.__name__)
            finally:
                self.hold_task = None
                relay.client_hold = None
                if self.upstream is not None and not self.upstream.closed and not self.upstream_paused:
                    self.upstream.transport.resume_reading()
                if not self.client.closed:
                    self.flush()

        self.hold_task = self.loop.create_task(release(relay.client_hold), name=f"session-{self.id}-hold")

    def pause_other(self, side: _Side) -> None:
        other = self.client if side.upstream else self.upstream
        if other is not None and not other.closed:
            other.transport.pause_reading()
            if other.upstream:
                self.upstream_paused = True

    def resume_other(self, side: _Side) -> None:
        other = self.client if side.upstream else self.upstream
        if other is not None and not other.closed:
            other.transport.resume_reading()
            if other.upstream:
                self.upstream_paused = False
                self.seen_server = self.loop.time()  # its silence counts from here

    def client_eof(self) -> bool:
        """The client half-closed (sent EOF but still reads): True keeps its connection open for the answers.

        PostgreSQL itself answers everything it read before the EOF and then ends
        the session; so does the proxy: it passes the end on as a Terminate after
        the client's last complete message, and the session ends when PostgreSQL
        closes. Otherwise (mid-message, TLS, not yet relaying) the session ends now.
        """
        relay = self.relay
        upstream = self.upstream
        if (not self.relaying or self.info.tls or upstream is None or upstream.closed
                or relay.phase is Phase.CLOSED or relay.phase is Phase.FAILED or not relay._client.at_boundary):
            return False
        self.client_done = True
        upstream.transport.write(codec.terminate())
        return True

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side.upstream:
            if not self.relaying and self.task is not None and not self.task.done():
                return  # the startup task is waiting on this connection and reports its loss
            if self.relaying and not self.client.closed and not self.client_done:
                relay = self.relay
                if relay.phase not in (Phase.CLOSED, Phase.FAILED) and not relay.server_fatal:
                    # A statement the backend may still be running would run on, unseen:
                    # cancel it (the backend then notices its connection is gone).
                    self.server.cancel_orphaned(self)
                    relay.fail("08006", "connection to the upstream PostgreSQL server was lost",
                               hint="The server may have restarted. Reconnect and retry.")
                    self.flush()
            self.close()
        else:
            if self.relaying and self.upstream is not None and not self.upstream.closed:
                # A statement still running would run on: a backend notices a closed client socket only
                # when it next reads or writes (client_connection_check_interval is 0 by default), and a
                # hunt found planning statements of killed clients still running after 20 minutes.
                self.server.cancel_orphaned(self)
                if self.relay.phase is not Phase.CLOSED and self.relay._client.at_boundary:
                    self.upstream.transport.write(codec.terminate())
            self.close()

    # --- timers ------------------------------------------------------------------------

    def _auth_timeout(self) -> None:
        """auth_timeout passed: unless authenticated by now, close without a word, as PostgreSQL does.

        (PostgreSQL exits silently when the startup packet does not come within
        authentication_timeout, and during authentication reports "canceling
        authentication due to timeout" to its log only, never to the client.)
        """
        self.auth_timer = None
        if self.relay is not None and self.relay.authenticated:
            return
        log.info("session %s: not authenticated within auth_timeout (%gs): closing the connection",
                 self.id, self.config.auth_timeout)
        task = self.task
        if not self.relaying and task is not None and not task.done():
            task.cancel()  # reading the startup packet, TLS, deciding or connecting upstream
        self.close()

    def _start_watch(self) -> None:
        timeouts = [t for t in (self.config.idle_session_timeout, self.config.upstream_response_timeout) if t]
        if not timeouts:
            return
        self.watching = True
        self.seen_client = self.seen_server = self.waiting_since = self.loop.time()
        self.watch_timer = self.loop.call_later(min(timeouts), self._watch)

    def _watch(self) -> None:
        """Check the idle-session and upstream-response deadlines; act on a passed one, or re-arm."""
        self.watch_timer = None
        relay = self.relay
        if self.done.done() or relay.phase is Phase.CLOSED or relay.phase is Phase.FAILED:
            return
        now = self.loop.time()
        due = math.inf
        idle_timeout = self.config.idle_session_timeout
        if idle_timeout:
            if relay.idle:  # ReadyForQuery 'I' seen, nothing in flight
                since = max(self.seen_client, self.seen_server)
                if now - since >= idle_timeout:
                    log.info("session %s: idle for idle_session_timeout (%gs): closing", self.id, idle_timeout)
                    self.terminate("57P05", IDLE_SESSION_TIMEOUT_MESSAGE)
                    return
                due = since + idle_timeout
            else:
                due = now + idle_timeout
        response_timeout = self.config.upstream_response_timeout
        if response_timeout:
            if relay.awaiting_server and not self.upstream_paused:
                since = max(self.seen_server, self.waiting_since)
                cancelled = self.cancelled_at
                if cancelled is not None and cancelled >= since:
                    # Silent since before the cancel request: the server or the path to it is gone.
                    if now - cancelled >= response_timeout:
                        log.warning("session %s: no answer from PostgreSQL for upstream_response_timeout (%gs), "
                                    "not even to a cancel request: closing the session", self.id, response_timeout)
                        self.terminate(
                            "08006", "the upstream PostgreSQL server stopped answering",
                            detail=f"No answer for {2 * response_timeout:g} seconds, none to a cancel request "
                                   "either (upstream_response_timeout).",
                            hint="The server or the network to it may be down. Reconnect and retry.")
                        return
                    due = min(due, cancelled + response_timeout)
                elif now - since >= response_timeout:
                    log.warning("session %s: no answer from PostgreSQL for upstream_response_timeout (%gs): "
                                "cancelling the statement", self.id, response_timeout)
                    self.cancelled_at = now
                    self.server.cancel_statement(self)
                    due = min(due, now + response_timeout)
                else:
                    due = min(due, since + response_timeout)
            else:
                due = min(due, now + response_timeout)
        self.watch_timer = self.loop.call_later(max(due - now, 0.001), self._watch)

    # --- startup -----------------------------------------------------------------------

    async def _startup(self) -> None:
        try:
            await self._negotiate()
        except (ClientGone, ConnectionError):
            self.close()
        except TimeoutError:
            self._fatal_startup("08006", "timeout while waiting for the startup packet")
        except codec.ProtocolViolation as exc:
            self._fatal_startup("08P01", str(exc))
        except StartupRefused as exc:
            b = exc.block
            self.server.startup_refused(self, b)  # observability: metrics and audit of the refusal
            self._fatal_startup(b.sqlstate, b.message, detail=b.detail, hint=b.hint)
        except _StartupError as exc:
            self._fatal_startup(exc.sqlstate, exc.message, hint=exc.hint)
        except asyncio.CancelledError:
            self.close()
            raise
        except ssl.SSLError as exc:
            # The client's TLS handshake failed (upstream TLS errors become
            # _StartupError in _connect_upstream); the connection is gone already.
            log.info("session %s: client TLS handshake failed: %s", self.id, exc)
            self.close()
        except Exception:
            log.exception("session %s: startup failed", self.id)
            self._fatal_startup("XX000", "purpose-proxy internal error during startup")

    async def _negotiate(self) -> None:
        client = self.client
        loop = asyncio.get_running_loop()
        # Over the connection limit: like PostgreSQL, read the startup packet (answering an SSLRequest "N")
        # and then refuse it, 53300 (a cancel request still goes through); but within REFUSED_WAIT, so that
        # connections over the limit cannot be held open (they count, see ProxyServer.accept).
        full = not self.server.accept()
        wait = REFUSED_WAIT if full else None
        while True:  # bounded by auth_timeout
            await client.read_until(8, wait)
            size = int.from_bytes(client.buf[:4], "big")
            if size < 8 or size > 10000:
                raise codec.ProtocolViolation(f"invalid length of startup packet: {size}")
            await client.read_until(size, wait)
            raw = bytes(client.buf[:size])
            packet = codec.split_startup_packet(client.buf)
            if packet.code == codec.SSL_REQUEST_CODE:
                if client.buf:
                    # 55.2.10: data after SSLRequest before the answer could be injected
                    # by a man in the middle (CVE-2021-23214).
                    raise codec.ProtocolViolation("received unencrypted data after SSL request")
                ctx = self.server.client_tls
                if ctx is None or self.info.tls or full:
                    client.transport.write(b"N")
                    continue
                client.transport.write(b"S")
                self.client_cert_der = self.server.client_cert_der  # what this client is shown (reloads change it)
                client.transport = await loop.start_tls(client.transport, client, ctx, server_side=True)
                self.info.tls = True
                continue
            if packet.code == codec.GSSENC_REQUEST_CODE:
                client.transport.write(b"N")  # GSSAPI encryption is not offered
                continue
            if packet.code == codec.CANCEL_REQUEST_CODE:
                if len(packet.payload) >= 8:
                    pid = int.from_bytes(packet.payload[:4], "big")
                    await self.server.forward_cancel(pid, packet.payload[4:])
                self.close()
                return
            if packet.code >> 16 != 3:
                raise _StartupError("0A000", f"unsupported frontend protocol {packet.code >> 16}.{packet.code & 0xFFFF}: "
                                             "server supports 3.0 to 3.0")
            if full:
                raise _StartupError("53300", "sorry, too many clients already")
            break
        self.info.params = codec.parse_startup_params(packet.payload)
        self.connecting = True
        if self.config.client_tls_required and not self.info.tls:
            raise _StartupError("28000", "purpose-proxy requires TLS (connect with sslmode=require)")
        if not self.server.admit(self):
            raise _StartupError("53300", "sorry, too many clients already")
        config = self.config
        admit = self._admit_role if config.max_connections_per_role else None
        try:
            decider = await self.server.new_decider(self.info)
        except (StartupRefused, _StartupError) as exc:
            # Told right after AuthenticationOk, where PostgreSQL reports what it checks after
            # authenticating (a database that does not exist, a role's connection limit): before it,
            # an unauthenticated client learned which purposes exist, what each role may declare and
            # which databases do (hunt 23). Meanwhile nothing is decided: the session ends there.
            block = (exc.block if isinstance(exc, StartupRefused) else
                     Block(exc.message, sqlstate=exc.sqlstate, hint=exc.hint, reason="startup"))
            block = replace(block, severity="FATAL")
            decider, admit = refuse_all(block), partial(self._refused_after_authentication, block)
        self.decider = decider  # observability: the recorder reads the session's purpose from it
        relay = Relay(decider, key_mapper=self._map_key, max_message_size=config.max_message_size,
                      observed=bool(self.server.observers), max_statement_length=config.max_statement_length,
                      admit=admit)
        if hasattr(decider, "attach"):
            decider.attach(relay)
        self.relay = relay
        await self._connect_upstream()
        relay.channel_binding = self._same_certificate()
        relay.plain_upstream_for_tls_client = self.info.tls and self._plain_network_upstream()
        relay.start(codec.with_startup_params(raw, getattr(decider, "startup_parameters", None) or {}))
        self.flush()  # the StartupMessage goes upstream
        await self._upstream_answer()
        self.relaying = True
        client.received = self.from_client
        self.upstream.received = self.from_server
        self._start_watch()
        self.server.session_started(self)  # observability: session metrics and audit record
        upstream = self.upstream
        pending = bytes(upstream.buf)  # the server's first answer (and what came with the TLS answer)
        upstream.buf.clear()
        rest = bytes(client.buf)
        client.buf.clear()
        self.from_server(pending)
        if upstream.closed:  # it answered and closed at once (its loss went unreported so far)
            self.side_lost(upstream, None)
        if rest and not self.done.done():
            self.from_client(rest)
        self.task.set_name(f"session-{self.id}")
        await asyncio.shield(self.done)

    def _upstream_error(self, what: str) -> _StartupError:
        self.server.upstream_failed()
        return _StartupError(
            "08006", f"purpose-proxy could not connect to the upstream PostgreSQL server at {self.config.upstream}: "
                     f"{what}",
            hint="Check that PostgreSQL is running and that --upstream points at it.")

    async def _connect_upstream(self) -> None:
        try:
            transport, side = await self.server.open_upstream(lambda: _Side(self, upstream=True))
        except _StartupError:
            self.server.upstream_failed()
            raise
        except (OSError, TimeoutError, ssl.SSLError, ClientGone) as exc:
            raise self._upstream_error(f"{exc.__class__.__name__}: {exc}") from None
        self.upstream = side

    async def _upstream_answer(self) -> None:
        """Wait (up to connect_timeout) for the server's first answer to the StartupMessage."""
        try:
            await self.upstream.read_until(1, self.config.connect_timeout)
        except TimeoutError:
            raise self._upstream_error(f"no answer to the startup packet within {self.config.connect_timeout:g} "
                                       "seconds (connect_timeout)") from None
        except ClientGone:
            raise self._upstream_error("the server closed the connection without answering") from None

    def _admit_role(self):
        return self.server.admit_role(self)

    def _refused_after_authentication(self, block: Block) -> Block:
        """The startup refusal, told now that the client has authenticated (see ``_negotiate``)."""
        self.server.startup_refused(self, block)  # observability: metrics and audit of the refusal
        return block

    def _plain_network_upstream(self) -> bool:
        """True when the upstream connection is unencrypted TCP to another host (not a Unix socket or loopback)."""
        transport = self.upstream.transport
        if transport.get_extra_info("ssl_object") is not None:
            return False
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple):  # a Unix socket
            return False
        try:
            return not ipaddress.ip_address(peer[0]).is_loopback
        except ValueError:
            return True

    def _same_certificate(self) -> bool:
        """True when client and upstream TLS both end in the same certificate (see Relay)."""
        own = self.client_cert_der
        if not self.info.tls or own is None:
            return False
        ssl_object = self.upstream.transport.get_extra_info("ssl_object")
        return ssl_object is not None and ssl_object.getpeercert(binary_form=True) == own

    def _map_key(self, pid: int, secret: bytes) -> bytes:
        self.client_secret = self.server.register_cancel_key(self, pid, secret)
        return self.client_secret

    def _fatal_startup(self, sqlstate: str, message: str, *, detail: str | None = None,
                       hint: str | None = None) -> None:
        client = self.client
        if client is not None and not client.closed and not client.transport.is_closing():
            client.transport.write(codec.error_response(sqlstate, message, severity="FATAL",
                                                        detail=detail, hint=hint))
        self.close()

    # --- teardown ------------------------------------------------------------------------

    def terminate(self, sqlstate: str, message: str, *, detail: str | None = None,
                  hint: str | None = None) -> None:
        """Close the session with a FATAL error to the client (when the stream allows it)."""
        if self.relay is not None and self.relaying:
            self.relay.fail(sqlstate, message, detail=detail, hint=hint)
            if self.upstream is not None and not self.upstream.closed and self.relay._client.at_boundary:
                self.relay.to_server.append(codec.terminate())
            self.flush()
        else:
            self._fatal_startup(sqlstate, message, detail=detail, hint=hint)

    def close(self) -> None:
        for timer in (self.auth_timer, self.watch_timer):
            if timer is not None:
                timer.cancel()
        self.auth_timer = self.watch_timer = None
        for side in (self.client, self.upstream):
            if side is None or side.transport is None or side.transport.is_closing() or side.lingering:
                continue
            if (side is self.client and not side.closed and not self.client_done
                    and side.transport.can_write_eof()):
                side.linger()
            else:
                side.shut()
        task = self.task
        if (self.connecting and not self.relaying and task is not None and not task.done()
                and task is not asyncio.current_task()):
            task.cancel()  # deciding or connecting upstream for a session that is over
        if self.hold_task is not None and self.hold_task is not asyncio.current_task():
            self.hold_task.cancel()
        if self.relay is not None:
            self.relay.phase = Phase.CLOSED if self.relay.phase is not Phase.FAILED else Phase.FAILED
        if not self.done.done():
            self.done.set_result(None)
        self.server.forget(self)


class _StartupError(Exception):
    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint
