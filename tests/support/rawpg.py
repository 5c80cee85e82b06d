"""A minimal blocking PostgreSQL protocol client on a raw socket, for fault tests.

It does only what the tests need: a StartupMessage for a trust-authenticated or
cleartext/none user, simple queries, and reading messages one by one or as a raw
byte stream (to read a huge result slowly). Message formats: PostgreSQL docs 55.7.
"""

from __future__ import annotations

import socket
import struct


def startup_message(user: str, database: str, **params: str) -> bytes:
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", database), *params.items()):
        body += k.encode() + b"\x00" + v.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!i", len(body) + 4) + body


def query_message(sql: str | bytes) -> bytes:
    data = (sql.encode() if isinstance(sql, str) else sql) + b"\x00"
    return b"Q" + struct.pack("!i", len(data) + 4) + data


def terminate_message() -> bytes:
    return b"X\x00\x00\x00\x04"


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse/NoticeResponse body, keyed by field code."""
    return {chr(p[0]): p[1:].decode("utf-8", "replace") for p in body.split(b"\x00") if p}


class ServerError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('S')} {fields.get('C')}: {fields.get('M')}")
        self.fields = fields
        self.sqlstate = fields.get("C")


class RawConnection:
    """One protocol-3.0 connection on a blocking socket with a timeout on every read."""

    def __init__(self, host: str, port: int, user: str = "trustuser", database: str | None = None,
                 timeout: float = 30.0, rcvbuf: int | None = None, **params: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.params: dict[str, str] = {}
        self.backend_key: tuple[int, bytes] | None = None
        self.sock.sendall(startup_message(user, database or user, **params))
        while True:
            typ, body = self.read_message()
            if typ == b"R":
                (code,) = struct.unpack_from("!i", body)
                if code != 0:
                    raise RuntimeError(f"authentication method {code} not supported by RawConnection")
            elif typ == b"E":
                raise ServerError(error_fields(body))
            elif typ == b"K":
                self.backend_key = (struct.unpack_from("!i", body)[0], bytes(body[4:]))
            elif typ == b"S":
                name, value, _ = body.split(b"\x00", 2)
                self.params[name.decode()] = value.decode()
            elif typ == b"Z":
                return

    def recv_into_buf(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_message(self) -> tuple[bytes, bytes]:
        """The next message as (type byte, body); raises EOFError when the server closed."""
        while len(self.buf) < 5:
            if not self.recv_into_buf():
                raise EOFError("connection closed")
        (length,) = struct.unpack_from("!i", self.buf, 1)
        while len(self.buf) < 1 + length:
            if not self.recv_into_buf():
                raise EOFError("connection closed")
        typ = bytes(self.buf[:1])
        body = bytes(self.buf[5 : 1 + length])
        del self.buf[: 1 + length]
        return typ, body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def simple_query(self, sql: str) -> list[tuple[bytes, bytes]]:
        """Send a Query and return every message up to and including ReadyForQuery."""
        self.send(query_message(sql))
        out = []
        while True:
            msg = self.read_message()
            out.append(msg)
            if msg[0] == b"Z":
                return out

    def close(self) -> None:
        try:
            self.sock.sendall(terminate_message())
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
