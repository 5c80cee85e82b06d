"""The fault proxy itself (proxy/devtools/faultproxy.py), against a small echo server: each fault does what the
fault-injection tests rely on."""

from __future__ import annotations

import socket
import socketserver
import threading

import pytest

from proxy.devtools.faultproxy import DOWN, UP, FaultProxy
from tests.support.waiting import wait_for


class Echo(socketserver.ThreadingTCPServer):
    """Echoes what it receives; on EOF it sends b"bye" and closes. Records what each connection saw."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.connections: list[dict] = []
        super().__init__(("127.0.0.1", 0), EchoHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        seen = {"chunks": [], "eof": False, "reset": False}
        self.server.connections.append(seen)
        sock = self.request
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    seen["eof"] = True
                    sock.sendall(b"bye")
                    return
                seen["chunks"].append(data)
                sock.sendall(data)
        except ConnectionResetError:
            seen["reset"] = True
        except OSError:
            pass


@pytest.fixture
def echo():
    server = Echo()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fp(echo):
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        yield proxy


def connect(fp: FaultProxy) -> socket.socket:
    return socket.create_connection((fp.host, fp.port), timeout=10)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {out!r}"
        out += chunk
    return out


def test_forwards_both_ways_and_passes_eof_on(fp, echo):
    with connect(fp) as s:
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"hello"
        s.shutdown(socket.SHUT_WR)  # the echo server sees EOF, answers and closes
        assert recv_exactly(s, 3) == b"bye"
        assert s.recv(10) == b""
    assert echo.connections[0]["eof"]
    wait_for(lambda: fp.open_links == 0, 10, "the link to close")


def test_delay_and_chunking_keep_the_bytes(fp, echo):
    fp.delay(0.001, UP, chunk=3)
    with connect(fp) as s:
        payload = bytes(range(256)) * 4
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload
        link = fp.link(0)
        assert link.forwarded[UP] == link.forwarded[DOWN] == len(payload)
        # Cut into pieces of at most 3 bytes (counted where they are written: the receiver may
        # read several at once, TCP keeps no boundaries).
        assert link.writes[UP] >= len(payload) / 3


def test_reset_sends_rst_both_ways(fp, echo):
    with connect(fp) as s:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        fp.link(0).reset()
        with pytest.raises(ConnectionResetError):
            while s.recv(10):
                pass
    wait_for(lambda: echo.connections[0]["reset"], 10, "the target to see the reset")


def test_half_close_down_gives_the_client_eof_and_keeps_its_sending(fp, echo):
    with connect(fp) as s:
        wait_for(lambda: fp.open_links == 1, 10, "the link")
        fp.half_close(DOWN)
        assert s.recv(10) == b""
        s.sendall(b"still sent")
        wait_for(lambda: b"".join(echo.connections[0]["chunks"]) == b"still sent", 10, "the data to arrive")


def test_half_close_up_gives_the_target_eof_and_keeps_its_answers(fp, echo):
    with connect(fp) as s:
        wait_for(lambda: fp.open_links == 1, 10, "the link")
        fp.link(0).half_close(UP)
        assert recv_exactly(s, 3) == b"bye"  # the target read EOF and answered
        assert echo.connections[0]["eof"]


def test_stall_fills_the_senders_buffers_until_resumed(fp, echo):
    with connect(fp) as s:
        wait_for(lambda: fp.open_links == 1, 10, "the link")
        fp.stall(UP)
        s.settimeout(0.5)
        sent = 0
        block = b"y" * 65536
        with pytest.raises(TimeoutError):
            for _ in range(10_000):  # at most 640 MB: the buffers fill long before
                s.sendall(block)
                sent += len(block)
        # At most the one read already under way when the stall began got through.
        received = sum(map(len, echo.connections[0]["chunks"])) if echo.connections else 0
        assert received <= 65536 < sent
        fp.heal()

        def drain() -> bool:  # read the echoes so that the echo server can go on
            try:
                while s.recv(1 << 20):
                    pass
            except TimeoutError:
                pass
            return sum(map(len, echo.connections[0]["chunks"])) >= sent

        wait_for(drain, 30, "the stalled data to arrive")


def test_refuse_and_heal(fp):
    fp.refuse()
    with pytest.raises(ConnectionRefusedError):
        connect(fp)
    fp.heal()
    with connect(fp) as s:
        s.sendall(b"back")
        assert recv_exactly(s, 4) == b"back"


def test_blackhole_accepts_and_never_connects(fp, echo):
    fp.blackhole()
    with connect(fp) as s:
        s.sendall(b"anyone?")
        wait_for(lambda: fp.open_links == 1, 10, "the link")
        assert fp.link(0).target is None  # never connected to the target: nobody can answer
        assert echo.connections == []
    wait_for(lambda: fp.open_links == 0, 10, "the link to close after the client left")
    fp.blackhole(False)
    with connect(fp) as s:
        s.sendall(b"now")
        assert recv_exactly(s, 3) == b"now"
