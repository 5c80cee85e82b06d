"""Framing and encoding of PostgreSQL protocol 3.0 messages, without any I/O.

Reference: PostgreSQL documentation, chapter 55 "Frontend/Backend Protocol",
section 55.7 "Message Formats". Every message after startup is one type byte and
an Int32 length that counts itself but not the type byte. Startup-phase packets
(StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) have no type byte.

The scanner here looks at packet headers only (like PgBouncer's sbuf): messages
whose type is not in its ``inspect`` set pass through as opaque byte ranges and
may be forwarded before they are complete, so a 500 MB DataRow stream never sits
in memory. Only inspected messages are buffered whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.extensions import compiled

# Special startup-phase request codes (55.7, "CancelRequest", "SSLRequest", ...).
PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Frontend message types.
F_QUERY = ord("Q")
F_PARSE = ord("P")
F_BIND = ord("B")
F_DESCRIBE = ord("D")
F_EXECUTE = ord("E")
F_CLOSE = ord("C")
F_SYNC = ord("S")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_TERMINATE = ord("X")
F_PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")

# Backend message types.
B_AUTH = ord("R")
B_KEY_DATA = ord("K")
B_PARAMETER_STATUS = ord("S")
B_READY = ord("Z")
B_ERROR = ord("E")
B_NOTICE = ord("N")
B_COPY_IN = ord("G")
B_COPY_OUT = ord("H")
B_COPY_BOTH = ord("W")
B_COPY_DONE = ord("c")
B_COMMAND_COMPLETE = ord("C")
B_EMPTY_QUERY = ord("I")
B_PORTAL_SUSPENDED = ord("s")
B_PARSE_COMPLETE = ord("1")
B_NEGOTIATE_VERSION = ord("v")

AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_SASL = 10

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!BI")

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid protocol message (SQLSTATE 08P01)."""

    sqlstate = "08P01"


class MessageTooLarge(ProtocolViolation):
    """A message announced a length above the configured maximum (SQLSTATE 08P01)."""


@dataclass(slots=True)
class Frame:
    """One complete message: its type byte and its raw bytes (header included)."""

    type: int
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[5:]


def split_messages(data: bytes, pos: int, table: bytes, max_size: int, frame: type) -> tuple:
    """Walk the messages of ``data`` from the boundary ``pos``: the framing loop of ``Scanner.feed``.

    A message whose type has a nonzero byte in the 256-byte ``table`` becomes
    ``frame(type, raw)``; runs of other messages are handed out as slices,
    undecoded. Returns ``(items, pos, skip, need, bad)``: where the unconsumed tail
    begins, the bytes of an opaque message that continue past ``data``, the total
    length of a partial inspected message held back at ``pos`` (0: none), and the
    ``(type, length)`` of a message whose length is invalid (under 4 or over
    ``max_size``; then ``items`` is void), else None. ``proxy/wire/_scan.c`` is
    the same loop compiled, used when it was built.

    >>> table = bytes(256)[:90] + b"\\x01" + bytes(165)  # Z
    >>> split_messages(b"C\\x00\\x00\\x00\\x0bSELECT\\x00Z\\x00\\x00\\x00\\x05IZ\\x00", 0, table, 1 << 20, Frame)
    ([b'C\\x00\\x00\\x00\\x0bSELECT\\x00', Frame(type=90, raw=b'Z\\x00\\x00\\x00\\x05I')], 18, 0, 0, None)
    """
    n = len(data)
    items: list = []
    seg = skip = need = 0
    unpack = _HDR.unpack_from
    last = n - 5  # a header needs 5 bytes
    while pos <= last:
        typ, length = unpack(data, pos)
        if length > max_size or length < 4:
            return items, pos, 0, 0, (typ, length)
        end = pos + 1 + length
        if table[typ]:
            if end > n:
                need = end - pos
                break
            if pos > seg:
                items.append(data[seg:pos])
            items.append(frame(typ, data[pos:end]))
            seg = pos = end
        elif end > n:
            skip = end - n
            pos = n
        else:
            pos = end
    if pos > seg:
        items.append(data[seg:pos])
    return items, pos, skip, need, None


COMPILED_SPLIT = compiled("proxy.wire._scan", "split")  # None: not built, or PURPOSE_PROXY_NO_EXTENSIONS
_split = COMPILED_SPLIT or split_messages
_TABLES: dict[frozenset, bytes] = {}


def _table(inspect: frozenset[int]) -> bytes:
    """The 256-byte lookup table of a set of message types, as ``split_messages`` takes it."""
    table = _TABLES.get(inspect)
    if table is None:
        table = bytes(1 if i in inspect else 0 for i in range(256))
        if len(_TABLES) < 64:  # the relay uses a handful of sets
            _TABLES[inspect] = table
    return table


class Scanner:
    """Splits one direction of a stream into opaque segments and inspected frames.

    ``feed(data)`` returns a list whose items are either ``bytes`` (opaque bytes
    to forward as they are, possibly part of a message whose rest comes later) or
    ``Frame`` (a whole message of an inspected type).

    >>> s = Scanner(inspect=frozenset({ord("Z")}))
    >>> s.feed(b"C\\x00\\x00\\x00\\x0bSELECT\\x00" + b"Z\\x00\\x00\\x00\\x05I")
    [b'C\\x00\\x00\\x00\\x0bSELECT\\x00', Frame(type=90, raw=b'Z\\x00\\x00\\x00\\x05I')]
    """

    __slots__ = ("_inspect", "_table", "max_size", "verbatim", "_buf", "_need", "_skip")

    def __init__(self, inspect: frozenset[int], max_size: int | None = None) -> None:
        self.inspect = inspect
        self.max_size = max_size
        self._buf = bytearray()  # held-back bytes: a partial header or inspected message
        self._need = 0  # total bytes the held-back message needs (0: header unknown)
        self._skip = 0  # bytes of an opaque message still to pass through
        # True when the items of the latest ``feed`` joined are exactly the bytes it was
        # given (nothing held back from before, nothing held back now): a caller that
        # forwards every item unchanged may then forward those bytes in one piece.
        self.verbatim = False

    @property
    def inspect(self) -> frozenset[int]:
        """The message types handed out as ``Frame``s (may change between feeds)."""
        return self._inspect

    @inspect.setter
    def inspect(self, types: frozenset[int]) -> None:
        self._inspect = types
        self._table = _table(types)

    def _bad_length(self, typ: int, length: int) -> None:
        if length < 4 or length > 0x7FFFFFFF:
            raise ProtocolViolation(f"invalid message length {length} for message type {typ!r}")
        raise MessageTooLarge(f"message of type {chr(typ)!r} is {length} bytes, over the limit of {self.max_size}")

    @property
    def at_boundary(self) -> bool:
        """True when everything passed through so far ends on a message boundary."""
        return self._skip == 0 and not self._buf

    def feed(self, data: bytes) -> list:
        verbatim = True
        if self._buf:
            buf = self._buf
            buf += data
            if len(buf) < (self._need or 5):
                self.verbatim = False
                return []
            data = bytes(buf)
            buf.clear()
            self._need = 0
            verbatim = False
        n = len(data)
        pos = 0
        skip = self._skip
        if skip:
            if skip >= n:
                self._skip = skip - n
                self.verbatim = verbatim
                return [data] if n else []
            pos = skip
            self._skip = 0
        items, pos, self._skip, self._need, bad = _split(data, pos, self._table, self.max_size or 0x7FFFFFFF, Frame)
        if bad is not None:
            # Nothing of this feed is handed out: what was ends where it ended before.
            self._skip, self._need = skip, 0
            self._bad_length(*bad)
        if pos < n:
            self._buf += data[pos:]
            verbatim = False
        self.verbatim = verbatim
        return items

    def reframe(self, items) -> list:
        """Frame again, with the current ``inspect`` set, what the latest ``feed`` returned from
        ``items`` on (its unprocessed rest, which starts on a message boundary) and whatever it
        held back. The relay calls this when the set changed halfway through a feed."""
        data = b"".join(i if type(i) is bytes else i.raw for i in items) + bytes(self._buf)
        self._buf.clear()
        self._need = 0
        self._skip = 0
        return self.feed(data) if data else []


# --- startup-phase packets ---------------------------------------------------------


@dataclass(slots=True)
class StartupPacket:
    """An untyped startup-phase packet: its request code and payload."""

    code: int
    payload: bytes

    @property
    def is_startup(self) -> bool:
        return self.code >> 16 == 3


def split_startup_packet(buf: bytearray, max_size: int = 10000) -> StartupPacket | None:
    """Take one startup-phase packet off the front of ``buf``, or None if incomplete.

    PostgreSQL limits the startup packet to 10000 bytes (MAX_STARTUP_PACKET_LENGTH).
    """
    if len(buf) < 8:
        return None
    (length,) = _I32.unpack_from(buf, 0)
    if length < 8 or length > max_size:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")
    if len(buf) < length:
        return None
    (code,) = _I32.unpack_from(buf, 4)
    payload = bytes(buf[8:length])
    del buf[:length]
    return StartupPacket(code & 0xFFFFFFFF, payload)


def parse_startup_params(payload: bytes) -> dict[str, str]:
    """Decode the name/value pairs of a StartupMessage payload."""
    parts = payload.split(b"\x00")
    params: dict[str, str] = {}
    it = iter(parts)
    for key in it:
        if not key:
            break
        value = next(it, b"")
        params[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return params


def with_startup_params(packet: bytes, params: dict[str, str]) -> bytes:
    """A StartupMessage ``packet`` with ``params`` added after the client's own (the client's bytes kept).

    >>> with_startup_params(startup_message({"user": "u"}), {"search_path": "public"}) == \\
    ...     startup_message({"user": "u", "search_path": "public"})
    True
    """
    if not params:
        return packet
    body = packet[4:-1] + _param_list(params) + b"\x00"  # before the list's terminating NUL
    return _I32.pack(4 + len(body)) + body


def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _param_list(params) + b"\x00"
    return _I32.pack(8 + len(body)) + _I32.pack(version) + body


def _param_list(params: dict[str, str]) -> bytes:
    """StartupMessage parameters as name and value, each NUL-terminated (without the list's final NUL)."""
    return b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items())


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: bytes) -> bytes:
    return _I32.pack(12 + len(secret)) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + secret


# --- typed messages -----------------------------------------------------------------


def message(typ: bytes, body: bytes) -> bytes:
    return typ + _I32.pack(len(body) + 4) + body


def cstring(s: str) -> bytes:
    # surrogateescape: text decoded from the wire with it (statement texts and names
    # holding bytes that are not UTF-8) goes out again as the bytes it came from.
    return s.encode("utf-8", "surrogateescape").replace(b"\x00", b"") + b"\x00"


def _text_field(s: str) -> bytes:
    """An error field's text, valid UTF-8 whatever it holds (undecodable client bytes become "?")."""
    return s.encode("utf-8", "replace").replace(b"\x00", b"") + b"\x00"


def error_response(
    sqlstate: str,
    message_text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    """Encode an ErrorResponse (or NoticeResponse) as in section 55.8 "Error Fields".

    >>> error_response("42501", "no")[:1]
    b'E'
    """
    fields = [b"S" + cstring(severity), b"V" + cstring(severity), b"C" + cstring(sqlstate),
              b"M" + _text_field(message_text)]
    if detail:
        fields.append(b"D" + _text_field(detail))
    if hint:
        fields.append(b"H" + _text_field(hint))
    return message(b"N" if notice else b"E", b"".join(fields) + b"\x00")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Decode the fields of an ErrorResponse/NoticeResponse body, keyed by field code."""
    out: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


def ready_for_query(status: bytes) -> bytes:
    return message(b"Z", status)


def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


def query_text(raw: bytes) -> str:
    """Decode the SQL of a whole Query message, header included (no copy of the body first).

    >>> query_text(query("SELECT 1"))
    'SELECT 1'
    """
    end = raw.find(b"\x00", 5)
    if end < 0:
        raise ProtocolViolation("Query message without terminator")
    return raw[5:end].decode("utf-8", "surrogateescape")


@dataclass(slots=True)
class ParseMessage:
    name: str
    sql: str
    param_types: tuple[int, ...]


def decode_parse(body: bytes) -> ParseMessage:
    """Decode a Parse body: statement name, query string, parameter type OIDs."""
    a = body.find(b"\x00")
    b = body.find(b"\x00", a + 1)
    if a < 0 or b < 0 or len(body) < b + 3:
        raise ProtocolViolation("malformed Parse message")
    (count,) = struct.unpack_from("!h", body, b + 1)
    if count < 0 or len(body) != b + 3 + 4 * count:
        raise ProtocolViolation("malformed Parse message: wrong parameter type count")
    oids = struct.unpack_from(f"!{count}I", body, b + 3)
    return ParseMessage(
        body[:a].decode("utf-8", "surrogateescape"),
        body[a + 1 : b].decode("utf-8", "surrogateescape"),
        oids,
    )


def encode_parse(name: str, sql: str, param_types: tuple[int, ...] = ()) -> bytes:
    body = (
        name.encode("utf-8", "surrogateescape") + b"\x00"
        + sql.encode("utf-8", "surrogateescape") + b"\x00"
        + struct.pack(f"!h{len(param_types)}I", len(param_types), *param_types)
    )
    return message(b"P", body)


def encode_bind(portal: str, statement: str) -> bytes:
    """A Bind with no parameters and no result-format codes."""
    return message(b"B", cstring(portal) + cstring(statement) + b"\x00\x00\x00\x00\x00\x00")


def cstring_at(raw: bytes, start: int) -> str:
    """The NUL-terminated string of ``raw`` starting at ``start``."""
    end = raw.find(b"\x00", start)
    if end < 0:
        raise ProtocolViolation("missing string terminator")
    return raw[start:end].decode("utf-8", "surrogateescape")


def function_call_oid(body: bytes) -> int:
    """The function OID of a FunctionCall body."""
    if len(body) < 4:
        raise ProtocolViolation("FunctionCall too short")
    return _I32.unpack_from(body, 0)[0]


def terminate() -> bytes:
    return message(b"X", b"")


def auth_code(body: bytes) -> int:
    if len(body) < 4:
        raise ProtocolViolation("Authentication message too short")
    return _I32.unpack_from(body, 0)[0]


def sasl_mechanisms(body: bytes) -> list[str]:
    """Mechanism names of an AuthenticationSASL body (code 10, then a list of C strings)."""
    return [m.decode("utf-8", "surrogateescape") for m in body[4:].split(b"\x00") if m]


def auth_sasl(mechanisms: list[str]) -> bytes:
    body = _I32.pack(AUTH_SASL) + b"".join(cstring(m) for m in mechanisms) + b"\x00"
    return message(b"R", body)


def parameter_status(body: bytes) -> tuple[str, str]:
    if body.count(b"\x00") < 2:
        raise ProtocolViolation("malformed ParameterStatus message")
    name, value, _ = body.split(b"\x00", 2)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return message(b"K", _I32.pack(pid) + secret)


def decode_backend_key_data(body: bytes) -> tuple[int, bytes]:
    if len(body) < 8:
        raise ProtocolViolation("BackendKeyData too short")
    return _I32.unpack_from(body, 0)[0], bytes(body[4:])
