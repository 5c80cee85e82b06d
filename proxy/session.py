"""One client connection and its upstream connection: the asyncio shell around the relay.

The startup phase (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage,
upstream connect and TLS) runs in one named task per session. From the
StartupMessage on, bytes go straight from ``data_received`` into the sans-IO
``Relay`` and its output is written at once: no await per message, no queue.
Backpressure: when one side's write buffer passes its high-water mark, reading
from the other side pauses until it drains (asyncio pause/resume_writing).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from proxy.enforcement.hook import SessionInfo, StartupRefused
from proxy.wire import codec
from proxy.wire.relay import Relay
from proxy.wire.state import Phase

if TYPE_CHECKING:
    from proxy.listener import ProxyServer

log = logging.getLogger(__name__)

_ids = itertools.count(1)

STARTUP_TIMEOUT = 60.0  # seconds a client may take to send its startup packets


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if not self.upstream:
            self.session.client_connected(self)

    def data_received(self, data: bytes) -> None:
        if self.session.relaying:
            if self.upstream:
                self.session.from_server(data)
            else:
                self.session.from_client(data)
            return
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport: a half-closed PostgreSQL session is over

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self.session.side_lost(self, exc)

    def pause_writing(self) -> None:
        self.session.pause_other(self)

    def resume_writing(self) -> None:
        self.session.resume_other(self)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read_until(self, n: int, timeout: float) -> None:
        """Wait until ``n`` bytes are buffered (startup phase only)."""
        async with asyncio.timeout(timeout):
            while len(self.buf) < n:
                if self.closed:
                    raise ClientGone()
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter


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
        self.done = asyncio.get_running_loop().create_future()
        self.draining = False
        self.counted = False  # holds one of the server's client-connection slots
        self.client_secret: bytes | None = None
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
        self.task = asyncio.get_running_loop().create_task(self._startup(), name=f"session-{self.id}-startup")

    def from_client(self, data: bytes) -> None:
        self.bytes_from_client += len(data)  # observability: bytes relayed
        relay = self.relay
        try:
            relay.client_data(data)
        except codec.ProtocolViolation as exc:
            relay.fail(exc.sqlstate, f"protocol violation: {exc}")
        self.flush()

    def from_server(self, data: bytes) -> None:
        self.bytes_from_server += len(data)  # observability: bytes relayed
        relay = self.relay
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
            if not self.client.closed:
                self.client.transport.writelines(relay.to_client)
            relay.to_client.clear()
        if relay.events:
            self.server.observe(self, relay.events)
            relay.events.clear()
        if relay.close_after_flush:
            self.close()

    def pause_other(self, side: _Side) -> None:
        other = self.client if side.upstream else self.upstream
        if other is not None and not other.closed:
            other.transport.pause_reading()

    def resume_other(self, side: _Side) -> None:
        other = self.client if side.upstream else self.upstream
        if other is not None and not other.closed:
            other.transport.resume_reading()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side.upstream:
            if self.relaying and not self.client.closed:
                relay = self.relay
                if relay.phase not in (Phase.CLOSED, Phase.FAILED) and not relay.server_fatal:
                    relay.fail("08006", "connection to the upstream PostgreSQL server was lost",
                               hint="The server may have restarted. Reconnect and retry.")
                    self.flush()
            self.close()
        else:
            if self.relaying and self.upstream is not None and not self.upstream.closed:
                if self.relay.phase is not Phase.CLOSED and self.relay._client.at_boundary:
                    self.upstream.transport.write(codec.terminate())
            self.close()

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
        while True:
            await client.read_until(8, STARTUP_TIMEOUT)
            size = int.from_bytes(client.buf[:4], "big")
            if size < 8 or size > 10000:
                raise codec.ProtocolViolation(f"invalid length of startup packet: {size}")
            await client.read_until(size, STARTUP_TIMEOUT)
            raw = bytes(client.buf[:size])
            packet = codec.split_startup_packet(client.buf)
            if packet.code == codec.SSL_REQUEST_CODE:
                if client.buf:
                    # 55.2.10: data after SSLRequest before the answer could be injected
                    # by a man in the middle (CVE-2021-23214).
                    raise codec.ProtocolViolation("received unencrypted data after SSL request")
                ctx = self.server.client_tls
                if ctx is None or self.info.tls:
                    client.transport.write(b"N")
                    continue
                client.transport.write(b"S")
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
            break
        self.info.params = codec.parse_startup_params(packet.payload)
        if self.config.client_tls_required and not self.info.tls:
            raise _StartupError("28000", "purpose-proxy requires TLS (connect with sslmode=require)")
        if not self.server.admit(self):
            raise _StartupError("53300", "sorry, too many clients already")
        decider = await self.server.new_decider(self.info)
        self.decider = decider  # observability: the recorder reads the session's purpose from it
        relay = Relay(decider, key_mapper=self._map_key, max_message_size=self.config.max_message_size,
                      observed=bool(self.server.observers))
        if hasattr(decider, "attach"):
            decider.attach(relay)
        self.relay = relay
        await self._connect_upstream()
        relay.channel_binding = self._same_certificate()
        relay.start(raw)
        self.relaying = True
        self.server.session_started(self)  # observability: session metrics and audit record
        rest = bytes(client.buf)
        client.buf.clear()
        self.flush()
        if rest:
            self.from_client(rest)
        self.task.set_name(f"session-{self.id}")
        await asyncio.shield(self.done)

    async def _connect_upstream(self) -> None:
        try:
            transport, side = await self.server.open_upstream(lambda: _Side(self, upstream=True))
        except (OSError, TimeoutError, ssl.SSLError, _StartupError) as exc:
            self.server.upstream_failed()
            if isinstance(exc, _StartupError):
                raise
            raise _StartupError(
                "08006",
                f"purpose-proxy could not connect to the upstream PostgreSQL server at {self.config.upstream}: "
                f"{exc.__class__.__name__}: {exc}",
                hint="Check that PostgreSQL is running and that --upstream points at it.",
            ) from None
        self.upstream = side
        if side.buf:  # bytes that came with the TLS answer belong to the relay
            pending = bytes(side.buf)
            side.buf.clear()
            self.relay.server_data(pending)

    def _same_certificate(self) -> bool:
        """True when client and upstream TLS both end in the same certificate (see Relay)."""
        own = self.server.client_cert_der
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

    def terminate(self, sqlstate: str, message: str) -> None:
        """Close the session with a FATAL error to the client (when the stream allows it)."""
        if self.relay is not None and self.relaying:
            self.relay.fail(sqlstate, message)
            if self.upstream is not None and not self.upstream.closed and self.relay._client.at_boundary:
                self.relay.to_server.append(codec.terminate())
            self.flush()
        else:
            self._fatal_startup(sqlstate, message)

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side is not None and side.transport is not None and not side.transport.is_closing():
                side.transport.close()
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
