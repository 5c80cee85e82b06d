"""The protocol fuzzers' shared machinery (message vocabularies, mutations, a recording decider, a simulated backend
and the relay invariants), used by tests/unit/test_fuzz_*.py and the atheris harnesses in fuzz/.

A fuzz case is a *script*: a list of steps, each bytes for one direction (``"c"``:
client to proxy, ``"s"``: server to proxy). ``run_script`` feeds a script through a
``Relay`` the way ``proxy.session`` does (a ``ProtocolViolation`` becomes
``relay.fail`` and ends the session; any other exception escapes and is a bug),
cutting each step into chunks with a ``chunker``. ``converse`` does the same with
client steps only, answered by ``SimBackend``, a small stand-in for PostgreSQL 15.

The invariants (``check_run``): every Query, Parse and FunctionCall that reaches
the upstream side was decided first, in order, and went out as the decision
said; everything upstream is whole client messages in order or the relay's own
stand-ins and rewrites (nothing can be smuggled inside another message); a
session that failed is marked failed and closing, and a FATAL 08P01 it injected
sits on a message boundary of the client stream; no stand-in marker of the proxy
reaches the client (conversations). ``compare_runs`` checks that the way input
was chunked changes nothing: identical outputs, or, when the session failed,
outputs that are prefixes of the byte-by-byte run's.
"""

from __future__ import annotations

import contextlib
import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from proxy.enforcement import apply as apply_module
from proxy.policy.decision import ALLOW, Block, Decision, Mask
from proxy.wire import codec
from proxy.wire.relay import Relay
from proxy.wire.state import Phase

STARTUP = codec.startup_message({"user": "app", "database": "app", "application_name": "fuzz"})
MARKER_PREFIX = apply_module.MARKER_PREFIX
# Deterministic stand-in markers (see ``deterministic_markers``): "fz" and 22 digits.
MARKER_RE = re.compile(re.escape(MARKER_PREFIX).encode() + rb"fz\d{22}")
ANY_MARKER_RE = re.compile(re.escape(MARKER_PREFIX).encode() + rb"[0-9a-z]{24}")


# --- wire builders -----------------------------------------------------------------------------


def msg(typ: bytes, body: bytes = b"") -> bytes:
    return codec.message(typ, body)


def cstr(s: bytes | str) -> bytes:
    return (s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s) + b"\x00"


def query(sql: bytes | str) -> bytes:
    return msg(b"Q", cstr(sql))


def parse(name: bytes | str, sql: bytes | str, oids: tuple[int, ...] = ()) -> bytes:
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack(f"!h{len(oids)}I", len(oids), *oids))


def bind(portal: bytes | str = b"", stmt: bytes | str = b"", params: tuple[bytes | None, ...] = ()) -> bytes:
    body = cstr(portal) + cstr(stmt) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return msg(b"B", body + struct.pack("!h", 0))


def execute(portal: bytes | str = b"", max_rows: int = 0) -> bytes:
    return msg(b"E", cstr(portal) + struct.pack("!i", max_rows))


def describe(kind: bytes = b"S", name: bytes | str = b"") -> bytes:
    return msg(b"D", kind + cstr(name))


def close(kind: bytes = b"S", name: bytes | str = b"") -> bytes:
    return msg(b"C", kind + cstr(name))


def function_call(oid: int, *args: bytes) -> bytes:
    body = struct.pack("!ih", oid, 0) + struct.pack("!h", len(args))
    body += b"".join(struct.pack("!i", len(a)) + a for a in args)
    return msg(b"F", body + struct.pack("!h", 0))


SYNC = msg(b"S")
FLUSH = msg(b"H")
TERMINATE = msg(b"X")
COPY_DONE = msg(b"c")


def error(sqlstate: str, text: str, severity: str = "ERROR", detail: str | None = None) -> bytes:
    """An ErrorResponse shaped like PostgreSQL's (with a source file, which the proxy's own lack)."""
    fields = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate), b"M" + cstr(text)]
    if detail:
        fields.append(b"D" + cstr(detail))
    fields += [b"Fpostgres.c\x00", b"L1\x00", b"Rfuzz\x00"]
    return msg(b"E", b"".join(fields) + b"\x00")


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def command_complete(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return msg(b"D", body)


ROW_DESCRIPTION = msg(b"T", b"\x00\x01a\x00" + b"\x00" * 6 + b"\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00")


def param_status(name: str, value: str) -> bytes:
    return msg(b"S", cstr(name) + cstr(value))


def auth(code: int, extra: bytes = b"") -> bytes:
    return msg(b"R", struct.pack("!i", code) + extra)


AUTH_OK = auth(0)
LOGIN = (AUTH_OK + param_status("server_version", "15.18") + param_status("client_encoding", "UTF8")
         + param_status("standard_conforming_strings", "on") + msg(b"K", struct.pack("!i", 4242) + b"\x00\x00\x30\x39")
         + ready(b"I"))


def marker(n: int) -> str:
    """The n-th deterministic stand-in marker (1-based), as ``deterministic_markers`` hands them out."""
    return f"{MARKER_PREFIX}fz{n:022d}"


# --- vocabularies ------------------------------------------------------------------------------

# Statement texts the recording decider answers by content (see RecordingDecider).
SQL_TEXTS: tuple[bytes, ...] = (
    b"SELECT 1", b"SELECT refuse", b"SELECT mask FROM t", b"SET pii.purpose = 'x'", b"SELECT fatal",
    b"SELECT boom", b"BEGIN", b"COMMIT", b"ROLLBACK", b"COPY t FROM STDIN", b"COPY t TO STDOUT",
    b"SELECT error", b"", b" ", b"SELECT '\xff\xfe' AS mask", b"SELECT '\xc3' refuse", b"SELECT 1; SELECT 2",
    b"purpose_proxy_refused_0", b"SELECT $1", b"RESET pii.purpose", b"SELECT '\xe3\x81\x82'",
)
NAMES: tuple[bytes, ...] = (b"", b"s1", b"s2", b"\xff", b"p1", MARKER_PREFIX.encode() + b"x")


def client_vocabulary() -> list[bytes]:
    """Well-formed frontend messages, some of them in places where they make no sense."""
    out: list[bytes] = []
    for sql in SQL_TEXTS:
        out.append(query(sql))
        out.append(parse(b"", sql))
    for name in NAMES[:4]:
        out += [parse(name, b"SELECT refuse"), parse(name, b"SELECT 1", (23, 25)), bind(b"", name, (b"1", None)),
                describe(b"S", name), close(b"S", name)]
    out += [bind(b"p1", b"s1"), execute(), execute(b"p1", 5), describe(b"P", b""), close(b"P", b"p1"),
            SYNC, SYNC, FLUSH, TERMINATE, function_call(1), function_call(2, b"x"),
            msg(b"F", b"\x00\x01"), msg(b"d", b"1\tx\n"), msg(b"d", b""), COPY_DONE, msg(b"f", cstr("stop")),
            msg(b"p", cstr("secret")), msg(b"p", b""), msg(b"C", b"S"), msg(b"C", b"Xs1\x00"), msg(b"B", b"\x00"),
            msg(b"B", b""), msg(b"D", b""), msg(b"Q", b""), msg(b"Q", b"no terminator"), msg(b"P", b"\x00\x00"),
            msg(b"P", b"\x00SELECT 1\x00\x00\x05"), msg(b"P", b"\x00SELECT 1\x00\xff\xff"),
            msg(b"?", b"unknown"), msg(b"\x00"), msg(b"\xff", b"x" * 3)]
    return out


# Headers whose bodies come later: in a conversation the next step's bytes are their rest.
PARTIAL_HEADERS = [b"d" + struct.pack("!i", 4 + 14), b"?" + struct.pack("!i", 4 + 40), b"B" + struct.pack("!i", 4 + 30)]


def server_vocabulary() -> list[bytes]:
    """Backend messages, well-formed and not, including out-of-order ones."""
    sasl = auth(10, b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00")
    out = [
        AUTH_OK, auth(5, b"salt"), auth(3), sasl, auth(10, b"\xff\xfe-PLUS\x00\x00"), auth(11, b"r=abc"), auth(12),
        msg(b"R", b""), msg(b"R", b"\x00\x00"), param_status("TimeZone", "UTC"),
        param_status("standard_conforming_strings", "off"), param_status("standard_conforming_strings", "on"),
        msg(b"S", b"no terminators"), msg(b"S", b""), msg(b"K", struct.pack("!i", 7) + b"abcd"), msg(b"K", b"ab"),
        ready(b"I"), ready(b"T"), ready(b"E"), msg(b"Z"), msg(b"Z", b"II"), ROW_DESCRIPTION, data_row(b"1"),
        data_row(None, b"x" * 40), command_complete("SELECT 3"), command_complete("INSERT 0 5"),
        command_complete("SET"), command_complete("COPY 2"), msg(b"C"), msg(b"C", b"UPDATE 99999999999999999999\x00"),
        error("42601", f'syntax error at or near "{marker(1)}"'),
        error("42601", f'syntax error at or near "{marker(2)}"'),
        error("26000", f'prepared statement "{marker(1)}" does not exist'), error("42601", "syntax error"),
        error("42601", f"{MARKER_PREFIX}unknown"), error("23505", "duplicate key", detail="Key (a)=(1) exists."),
        error("44000", "check option", detail="Failing row contains (secret)."),
        error("57P01", "terminating connection", "FATAL"), error("XX000", "panic", "PANIC"), msg(b"E", b""),
        msg(b"E", b"SFATAL\x00"), msg(b"N", b"SNOTICE\x00Mhello\x00\x00"), msg(b"G", b"\x00\x00\x00"),
        msg(b"H", b"\x00\x00\x00"), msg(b"W", b"\x00\x00\x00"), msg(b"d", b"row\n"), COPY_DONE, msg(b"1"), msg(b"2"),
        msg(b"3"), msg(b"n"), msg(b"s"), msg(b"I"), msg(b"t", b"\x00\x00"), msg(b"V", b"\xff\xff\xff\xff"),
        msg(b"A", struct.pack("!i", 1) + b"chan\x00payload\x00"), msg(b"v", struct.pack("!ii", 0, 0)),
        msg(b"?", b"unknown"),
    ]
    return out


WHOLE_CLIENT_VOCABULARY = client_vocabulary()  # every item one whole message: streams of them frame cleanly
CLIENT_VOCABULARY = WHOLE_CLIENT_VOCABULARY + PARTIAL_HEADERS
SERVER_VOCABULARY = server_vocabulary()
BAD_LENGTHS = (-(2**31), -1, 0, 1, 3, 2**31 - 1, 0x10000000, 0x10000001)


def with_length(message: bytes, length: int) -> bytes:
    """``message`` with its length field replaced (``length`` may be a wrong one)."""
    return message[:1] + struct.pack("!i", length) + message[5:]


# --- mutations ---------------------------------------------------------------------------------


def mutate(data: bytes, op: int, pos: int, arg: int, extra: bytes = b"") -> bytes:
    """One of a fixed set of byte-level mutations of ``data`` (``op`` picks it, modulo the count)."""
    n = len(data)
    p = pos % (n + 1)
    op %= 8
    if op == 0:  # truncate
        return data[:p]
    if op == 1 and n:  # flip bits of one byte
        i = pos % n
        return data[:i] + bytes([data[i] ^ (arg & 0xFF or 1)]) + data[i + 1:]
    if op == 2:  # insert bytes
        return data[:p] + extra + data[p:]
    if op == 3:  # delete a range
        return data[:p] + data[p + 1 + arg % 16:]
    if op == 4:  # overwrite a length field (the first message header at or after pos) with a wrong length
        starts = message_starts(data)
        if starts:
            s = next((x for x in starts if x >= p), starts[-1])
            (true,) = struct.unpack_from("!i", data, s + 1)
            choices = BAD_LENGTHS + (true - 1, true + 1, true + 2, true - 2)
            return data[:s + 1] + struct.pack("!I", choices[arg % len(choices)] & 0xFFFFFFFF) + data[s + 5:]
        return data
    if op == 5:  # duplicate a range
        return data[:p] + data[p:p + 1 + arg % 32] + data[p:]
    if op == 6:  # replace a type byte
        starts = message_starts(data)
        if starts:
            s = starts[pos % len(starts)]
            return data[:s] + bytes([arg & 0xFF]) + data[s + 1:]
        return data
    return data + extra  # append garbage


def message_starts(data: bytes) -> list[int]:
    """Offsets of the message headers of a typed stream, as far as it frames."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        out.append(pos)
        if length < 4:
            break
        pos += 1 + length
    return out


def split_messages(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole typed messages of ``data`` (test oracle, independent of the Scanner) and the rest."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        if length < 4 or pos + 1 + length > len(data):
            break
        out.append(data[pos:pos + 1 + length])
        pos += 1 + length
    return out, data[pos:]


# --- chunkers ----------------------------------------------------------------------------------

Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def cut_at(cuts: Iterable[int]) -> Chunker:
    """A chunker that cuts every step at the given offsets (modulo the step's length)."""
    cuts = list(cuts)

    def chunk(data: bytes) -> list[bytes]:
        if not data:
            return [data]
        points = sorted({c % len(data) for c in cuts} - {0})
        out, prev = [], 0
        for p in points:
            out.append(data[prev:p])
            prev = p
        out.append(data[prev:])
        return out

    return chunk


# --- the recording decider ---------------------------------------------------------------------

REFUSAL = Block("refused by the fuzz decider", sqlstate="42501", detail="fuzz", hint="none", reason="fuzz")
FATAL_REFUSAL = Block("session refused by the fuzz decider", sqlstate="42501", severity="FATAL", reason="fuzz-fatal")


class RecordingDecider:
    """Decides by the statement's text and records every call in order.

    ``refuse`` in the text: Block; ``mask``: Mask (a rewrite); ``fatal``: a FATAL Block;
    ``boom``: the decider raises; a SET or RESET moves the epoch (like a purpose change).
    """

    withhold_error_rows = True

    def __init__(self, *, epoch_moves: bool = True) -> None:
        self.calls: list[tuple[str, str, object]] = []  # (sql, via, decision or "raised")
        self.epoch = 0
        self.epoch_moves = epoch_moves
        self.last = None
        self.timings = (("analysis", 0.0),)
        self.readies: list[bool] = []
        self.relay = None

    def attach(self, relay) -> None:
        self.relay = relay

    def decide(self, sql: str, via: str) -> Decision:
        low = sql.lower()
        if "boom" in low:
            self.calls.append((sql, via, "raised"))
            raise RuntimeError("the fuzz decider crashed")
        if "fatal" in low:
            d: Decision = FATAL_REFUSAL
        elif "refuse" in low:
            d = REFUSAL
        elif "mask" in low:
            d = Mask("/* masked */ " + sql, methods=("fuzz",))
        else:
            d = ALLOW
        if self.epoch_moves and low.lstrip().startswith(("set ", "reset ")):
            self.epoch += 1
        self.calls.append((sql, via, d))
        return d

    def ready(self, errored: bool) -> None:
        self.readies.append(errored)


@contextlib.contextmanager
def deterministic_markers() -> Iterator[None]:
    """Make the stand-in markers of refusals predictable (marker(1), marker(2), ...) meanwhile."""
    counter = iter(range(1, 1 << 62))
    original = apply_module.secrets

    class _Secrets:
        @staticmethod
        def token_hex(n: int = 12) -> str:
            return f"fz{next(counter):022d}"

    apply_module.secrets = _Secrets  # type: ignore[assignment]
    try:
        yield
    finally:
        apply_module.secrets = original


# --- running a script --------------------------------------------------------------------------


@dataclass
class Run:
    """What one run of a script produced."""

    to_server: bytes = b""
    to_client: bytes = b""
    calls: list = field(default_factory=list)
    events: list = field(default_factory=list)
    violation: tuple[int, str, str] | None = None  # (step, side, message)
    stopped_at: int | None = None  # the step at which the session ended (violation or close)
    phase: Phase | None = None
    tx_status: bytes = b""
    fatal_injected: bytes | None = None  # the FATAL the relay put on the client stream when it failed
    client_before_fatal: bytes = b""
    ended_at: tuple[int, str] | None = None  # (step, side) where the relay failed (violation or FATAL refusal)
    client_stream: bytes = b""  # every byte the client sent (that the relay was given)
    server_complete: bool = True  # every server byte reached the relay (conversation)

    def summary(self) -> tuple:
        return (self.to_server, self.to_client, self.calls, self.events, self.violation is not None,
                self.stopped_at, self.phase, self.tx_status)


def _event_summary(relay: Relay) -> list:
    out = []
    for ev in relay.events:
        out.append((ev.via, ev.sql, type(ev.decision).__name__, ev.rows, ev.error, ev.finished is not None))
    relay.events.clear()
    return out


def new_relay(decider, *, observed: bool = True, max_message_size: int | None = codec.DEFAULT_MAX_MESSAGE_SIZE,
              key_mapper: bool = True) -> Relay:
    relay = Relay(decider, key_mapper=(lambda pid, secret: b"PRXY") if key_mapper else None,
                  max_message_size=max_message_size, observed=observed)
    if hasattr(decider, "attach"):
        decider.attach(relay)
    relay.start(STARTUP)
    return relay


class _Session:
    """Feeds a relay as ``proxy.session.Session`` does, collecting what it would write."""

    def __init__(self, relay: Relay, run: Run) -> None:
        self.relay = relay
        self.run = run
        self.up = bytearray()
        self.down = bytearray()
        self.ended = False
        self.step: tuple[int, str] = (-1, "c")
        original = relay.fail

        def fail(sqlstate: str, message: str, **kw) -> None:  # note the FATAL the relay puts on the client stream
            n = len(relay.to_client)
            at_boundary = relay.client_at_boundary
            original(sqlstate, message, **kw)
            if len(relay.to_client) > n:
                assert at_boundary, "the relay injected a FATAL error while the client stream was mid-message"
                run.fatal_injected = relay.to_client[-1]
                run.client_before_fatal = bytes(self.down) + b"".join(relay.to_client[:-1])
            run.ended_at = self.step

        relay.fail = fail  # the relay calls self.fail: the instance attribute wins

    def drain(self) -> None:
        relay = self.relay
        self.up += b"".join(relay.to_server)
        relay.to_server.clear()
        self.down += b"".join(relay.to_client)
        relay.to_client.clear()
        self.run.events += _event_summary(relay)
        if relay.close_after_flush:
            self.ended = True

    def _fail(self, step: int, side: str, exc: codec.ProtocolViolation) -> None:
        relay = self.relay
        self.run.violation = (step, side, str(exc))
        if side == "c":
            relay.fail(exc.sqlstate, f"protocol violation: {exc}")
        else:
            relay.fail("08P01", "purpose-proxy received an invalid message from the upstream server")
        self.drain()
        self.ended = True

    def client(self, step: int, data: bytes) -> None:
        self.step = (step, "c")
        self.run.client_stream += data
        try:
            self.relay.client_data(data)
        except codec.ProtocolViolation as exc:
            self._fail(step, "c", exc)
            return
        self.drain()

    def server(self, step: int, data: bytes) -> None:
        self.step = (step, "s")
        try:
            self.relay.server_data(data)
        except codec.ProtocolViolation as exc:
            self._fail(step, "s", exc)
            return
        self.drain()

    def finish(self, decider) -> Run:
        run = self.run
        run.to_server = bytes(self.up)
        run.to_client = bytes(self.down)
        run.calls = [(sql, via, d if isinstance(d, str) else (type(d).__name__, getattr(d, "sql", None),
                                                              getattr(d, "severity", None)))
                     for sql, via, d in decider.calls]
        run.phase = self.relay.phase
        run.tx_status = self.relay.tx_status
        run.events += [(ev.via, ev.sql, type(ev.decision).__name__, None, ev.error, False)
                       for ev in self.relay.unfinished()]
        return run


def run_script(script: list[tuple[str, bytes]], chunker: Chunker = whole, *, decider_factory=RecordingDecider,
               observed: bool = True, max_message_size: int | None = codec.DEFAULT_MAX_MESSAGE_SIZE,
               key_mapper: bool = True) -> tuple[Run, object]:
    """Feed ``script`` (steps of ("c" | "s", bytes)) through a fresh relay after its startup."""
    decider = decider_factory()
    with deterministic_markers():
        relay = new_relay(decider, observed=observed, max_message_size=max_message_size, key_mapper=key_mapper)
        session = _Session(relay, Run())
        session.drain()
        for i, (side, data) in enumerate(script):
            for chunk in chunker(data):
                if side == "c":
                    session.client(i, chunk)
                else:
                    session.server(i, chunk)
                if session.ended:
                    break
            if session.ended:
                session.run.stopped_at = i
                break
        return session.finish(decider), decider


# --- a simulated backend -----------------------------------------------------------------------


class SimBackend:
    """A small stand-in for a PostgreSQL 15 backend: answers frontend messages roughly as it would.

    It knows the startup packet, simple and extended queries (with the failed-batch
    discarding until Sync), transaction status, COPY in and out, FunctionCall, and
    closes with FATAL 08P01 on a message it does not accept, as postgres.c does.
    A statement text holding a proxy marker, or ``error``, fails with a syntax error.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.started = False
        self.closed = False
        self.tx = b"I"
        self.discarding = False
        self.copy_in = False
        self.statements: set[bytes] = {b""}

    def feed(self, data: bytes) -> bytes:
        if self.closed:
            return b""
        self.buf += data
        out = bytearray()
        if not self.started:
            if len(self.buf) < 8:
                return b""
            (length,) = struct.unpack_from("!i", self.buf, 0)
            if len(self.buf) < length:
                return b""
            del self.buf[:length]
            self.started = True
            out += LOGIN
        while not self.closed and len(self.buf) >= 5:
            typ = self.buf[0:1]
            (length,) = struct.unpack_from("!i", self.buf, 1)
            if length < 4:
                out += self._fatal(f"invalid message length {length}")
                break
            if len(self.buf) < 1 + length:
                break
            body = bytes(self.buf[5:1 + length])
            del self.buf[:1 + length]
            out += self._message(typ, body)
        return bytes(out)

    def _fatal(self, text: str) -> bytes:
        self.closed = True
        return error("08P01", text, "FATAL")

    def _fail(self, sqlstate: str, text: str) -> bytes:
        if self.tx == b"T":
            self.tx = b"E"
        return error(sqlstate, text)

    def _statement(self, sql: bytes) -> bytes:
        low = sql.lower()
        m = ANY_MARKER_RE.search(sql) or (re.search(rb"purpose_proxy_refused_\w*", sql))
        if m:
            return self._fail("42601", f'syntax error at or near "{m.group(0).decode()}"')
        if self.tx == b"E" and not low.strip().startswith((b"rollback", b"commit")):
            return self._fail("25P02", "current transaction is aborted, commands ignored until end of "
                                       "transaction block")
        if b"error" in low:
            return self._fail("42P01", 'relation "error" does not exist')
        if low.strip().startswith(b"begin"):
            self.tx = b"T"
            return command_complete("BEGIN")
        if low.strip().startswith((b"commit", b"rollback")):
            self.tx = b"I"
            return command_complete("ROLLBACK" if low.strip().startswith(b"rollback") else "COMMIT")
        if not low.strip():
            return msg(b"I")
        return ROW_DESCRIPTION + data_row(b"1") + command_complete("SELECT 1")

    def _message(self, typ: bytes, body: bytes) -> bytes:
        if self.copy_in:
            if typ == b"d":
                return b""
            if typ == b"c":
                self.copy_in = False
                return command_complete("COPY 1") + ready(self.tx)
            if typ == b"f":
                self.copy_in = False
                return self._fail("57014", "COPY from stdin failed") + ready(self.tx)
            if typ in (b"H", b"S"):
                return b""
            self.copy_in = False
            return self._fail("08P01", f"unexpected message type 0x{typ[0]:02X} during COPY from stdin") \
                + ready(self.tx)
        if typ == b"Q":
            sql = body[:body.find(b"\x00")] if b"\x00" in body else body
            low = sql.lower()
            if b"copy" in low and b"stdin" in low and not ANY_MARKER_RE.search(sql) and self.tx != b"E":
                self.copy_in = True
                return msg(b"G", b"\x00\x00\x00")
            if b"copy" in low and b"stdout" in low and not ANY_MARKER_RE.search(sql) and self.tx != b"E":
                return (msg(b"H", b"\x00\x00\x00") + msg(b"d", b"1\n") + msg(b"d", b"2\n") + COPY_DONE
                        + command_complete("COPY 2") + ready(self.tx))
            return self._statement(sql) + ready(self.tx)
        if typ == b"S":
            self.discarding = False
            return ready(self.tx)
        if typ == b"H":
            return b""
        if typ == b"X":
            self.closed = True
            return b""
        if typ in (b"d", b"c", b"f"):
            return b""  # postgres.c: accepted and ignored outside COPY
        if typ == b"F":
            return msg(b"V", struct.pack("!i", 1) + b"1") + ready(self.tx)
        if self.discarding:
            return b"" if typ in (b"P", b"B", b"E", b"D", b"C") else self._fatal("invalid frontend message type")
        if typ == b"P":
            name, _, rest = body.partition(b"\x00")
            sql = rest[:rest.find(b"\x00")] if b"\x00" in rest else rest
            if ANY_MARKER_RE.search(sql) or b"purpose_proxy_refused_" in sql or b"error" in sql.lower():
                self.discarding = True
                return self._fail("42601", f'syntax error at or near "{sql[:60].decode("utf-8", "replace")}"')
            self.statements.add(name)
            return msg(b"1")
        if typ == b"B":
            _, _, rest = body.partition(b"\x00")  # portal name, then statement name
            stmt = rest[:rest.find(b"\x00")] if b"\x00" in rest else rest
            if stmt not in self.statements:
                self.discarding = True
                return self._fail("26000", f'prepared statement "{stmt.decode("utf-8", "replace")}" does not exist')
            return msg(b"2")
        if typ == b"E":
            return data_row(b"1") + command_complete("SELECT 1")
        if typ == b"D":
            return msg(b"n")
        if typ == b"C":
            if body[:1] == b"S":
                self.statements.discard(body[1:].partition(b"\x00")[0] or b"\x01")
            return msg(b"3")
        return self._fatal(f"invalid frontend message type {typ[0]}")


def converse(client_steps: list[bytes], chunker: Chunker = whole, server_chunker: Chunker = whole, *,
             decider_factory=RecordingDecider, observed: bool = True,
             max_message_size: int | None = codec.DEFAULT_MAX_MESSAGE_SIZE) -> tuple[Run, object]:
    """Feed client steps through a relay whose upstream is a ``SimBackend``; the backend answers
    after each whole step (so chunking does not change what it answers, nor when)."""
    decider = decider_factory()
    backend = SimBackend()
    with deterministic_markers():
        relay = new_relay(decider, observed=observed, max_message_size=max_message_size)
        session = _Session(relay, Run())
        sent_upstream = 0

        def pump(step: int) -> None:
            nonlocal sent_upstream
            session.drain()
            answer = backend.feed(bytes(session.up[sent_upstream:]))
            sent_upstream = len(session.up)
            for chunk in server_chunker(answer):
                if session.ended:
                    session.run.server_complete = False
                    return
                session.server(step, chunk)

        pump(-1)
        for i, data in enumerate(client_steps):
            for chunk in chunker(data):
                session.client(i, chunk)
                if session.ended:
                    break
            if not session.ended:
                pump(i)
            if session.ended or backend.closed:
                session.run.stopped_at = i
                break
        return session.finish(decider), decider


# --- invariants --------------------------------------------------------------------------------


def _text(body: bytes) -> bytes:
    end = body.find(b"\x00")
    return body if end < 0 else body[:end]


def upstream_statements(to_server: bytes) -> list[tuple[str, bytes]]:
    """The Query, Parse and FunctionCall messages of the upstream stream, as (kind, text): what
    PostgreSQL would read, framed independently of the relay (the startup packet first)."""
    assert to_server.startswith(STARTUP), "the startup packet goes upstream first"
    messages, _ = split_messages(to_server[len(STARTUP):])
    out = []
    for m in messages:
        t, body = m[:1], m[5:]
        if t == b"Q":
            out.append(("Q", _text(body)))
        elif t == b"P":
            name_end = body.find(b"\x00")
            out.append(("P", _text(body[name_end + 1:]) if name_end >= 0 else b""))
        elif t == b"F":
            out.append(("F", body[:4]))
    return out


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _matches(kind: str, text: bytes, call: tuple) -> bool:
    sql, via, d = call
    want = "P" if via == "parse" else "Q"
    if d == "raised" or (isinstance(d, Block) and d.severity != "FATAL"):
        return kind == want and ANY_MARKER_RE.fullmatch(text) is not None
    if isinstance(d, Block):  # FATAL: nothing goes upstream
        return False
    if isinstance(d, Mask):
        return kind == want and text == _enc(d.sql).replace(b"\x00", b"")
    if via == "function_call":
        return kind == "F" and sql == f"-- FunctionCall of function oid {struct.unpack('!i', text)[0]}"
    return kind == want and text == _enc(sql)


def check_upstream(to_server: bytes, calls: list[tuple[str, str, object]]) -> None:
    """Every statement that reached upstream was decided, in order, and went out as decided."""
    j = 0
    for kind, text in upstream_statements(to_server):
        while j < len(calls) and not _matches(kind, text, calls[j]):
            j += 1
        assert j < len(calls), f"UNINSPECTED: {kind} {text[:120]!r} reached upstream without a matching decision"
        j += 1


def _relay_made(m: bytes, masks: set[bytes]) -> bool:
    """A message the relay writes itself: a refusal's stand-in, or a rewrite of a masked statement."""
    t, body = m[:1], m[5:]
    if t in (b"Q", b"P", b"B") and ANY_MARKER_RE.search(body):
        return True
    if t == b"Q":
        return _text(body) in masks
    if t == b"P":
        name_end = body.find(b"\x00")
        return name_end >= 0 and _text(body[name_end + 1:]) in masks
    return False


def check_forwarding(run: Run, calls: list[tuple[str, str, object]]) -> None:
    """What went upstream is whole messages of the client, in order (some dropped), and the relay's
    own stand-ins and rewrites; only the last may be a message still streaming. PostgreSQL frames
    the upstream bytes as the relay did: no byte the client sent can reach it as a message the
    relay did not see as one."""
    ups, rest = split_messages(run.to_server[len(STARTUP):])
    sent, _ = split_messages(run.client_stream)
    masks = {_enc(d.sql).replace(b"\x00", b"") for _, _, d in calls if isinstance(d, Mask)}
    i = 0
    for m in ups:
        if _relay_made(m, masks):
            continue
        while i < len(sent) and sent[i] != m:
            i += 1
        assert i < len(sent), f"SMUGGLED: upstream got {m[:80]!r}, which the client did not send as a message"
        i += 1
    if rest:
        offset = sum(len(m) for m in sent[:i])
        starts = [x for x in message_starts(run.client_stream) if x >= offset]
        assert any(run.client_stream[x:x + len(rest)] == rest for x in starts), \
            f"SMUGGLED: upstream ends in {rest[:80]!r}, which starts no message of the client"


def check_run(run: Run, decider, *, conversation: bool = False) -> None:
    """The invariants every run must keep (see the module docstring)."""
    check_upstream(run.to_server, decider.calls)
    check_forwarding(run, decider.calls)
    if run.violation is not None:
        assert run.phase is Phase.FAILED, run.phase
    if run.fatal_injected is not None:
        fatal = run.fatal_injected
        (messages, rest) = split_messages(fatal)
        assert len(messages) == 1 and rest == b"" and fatal[:1] == b"E", fatal
        fields = codec.parse_error_fields(fatal[5:])
        assert fields["S"] == "FATAL"
        if run.violation is not None:
            assert fields["C"] == "08P01", fields
        # The client can read it: everything before it is whole messages.
        _, rest = split_messages(run.client_before_fatal)
        assert rest == b"", f"FATAL injected after a partial message: {rest[:40]!r}"
    if conversation:
        assert not MARKER_RE.search(run.to_client), "a stand-in marker reached the client"
        if run.server_complete:
            _, rest = split_messages(run.to_client)
            assert rest == b"", f"the client stream ends mid-message: {rest[:40]!r}"


def compare_runs(ref: Run, run: Run) -> None:
    """``run`` (any chunking) against ``ref`` (byte by byte): chunking changes nothing, except when the
    session fails. Then it fails in the same step, and what was sent before is a prefix of the
    byte-by-byte run's: a chunk is framed whole before its messages are acted on, so a bad header
    late in a chunk can end the session before an earlier message is decided (or before an earlier
    FATAL refusal, which ends it with another SQLSTATE)."""
    if ref.ended_at is None and run.ended_at is None:
        assert run.violation is None and ref.violation is None
        assert run.stopped_at == ref.stopped_at
        assert run.to_server == ref.to_server
        assert run.to_client == ref.to_client
        assert run.calls == ref.calls
        assert run.events == ref.events
        assert (run.phase, run.tx_status) == (ref.phase, ref.tx_status)
        return
    assert run.ended_at == ref.ended_at, (ref.ended_at, run.ended_at, ref.violation, run.violation)
    assert run.phase is Phase.FAILED and ref.phase is Phase.FAILED
    assert run.stopped_at == ref.stopped_at
    assert ref.to_server.startswith(run.to_server)
    assert ref.calls[:len(run.calls)] == run.calls
    if ref.violation is not None:  # bytes ref refused are refused however they are cut
        assert run.violation is not None and run.violation[:2] == ref.violation[:2]
    mine = run.client_before_fatal if run.fatal_injected is not None else run.to_client
    theirs = ref.client_before_fatal if ref.fatal_injected is not None else ref.to_client
    if run.ended_at[1] == "c":
        assert mine == theirs
        assert (run.fatal_injected is None) == (ref.fatal_injected is None)
    else:
        assert run.to_server == ref.to_server
        assert theirs.startswith(mine)


# --- whole checks, shared by the hypothesis tests and the atheris harnesses ---------------------


def check_script(script: list[tuple[str, bytes]], cut: list[int], **config) -> Run:
    """Run ``script`` byte by byte and cut at ``cut``; check both runs and compare them."""
    ref, ref_decider = run_script(script, bytewise, **config)
    check_run(ref, ref_decider)
    run, decider = run_script(script, cut_at(cut), **config)
    check_run(run, decider)
    compare_runs(ref, run)
    return run


def check_conversation(steps: list[bytes], cut: list[int], server_cut: list[int], **config) -> Run:
    """Converse byte by byte and cut at ``cut`` (answers cut at ``server_cut``); check and compare."""
    ref, ref_decider = converse(steps, bytewise, cut_at(server_cut), **config)
    check_run(ref, ref_decider, conversation=True)
    run, decider = converse(steps, cut_at(cut), cut_at(server_cut), **config)
    check_run(run, decider, conversation=True)
    compare_runs(ref, run)
    return run


def scanner_items(scanner: codec.Scanner, chunks) -> tuple[list, codec.ProtocolViolation | None]:
    """Feed chunks until the first violation; the items handed out and the violation."""
    items: list = []
    for chunk in chunks:
        try:
            got = scanner.feed(chunk)
        except codec.ProtocolViolation as exc:
            return items, exc
        assert all(type(i) is bytes or type(i) is codec.Frame for i in got)
        assert all(len(i) for i in got if type(i) is bytes), "empty opaque segment"
        if scanner.verbatim:  # the relay may then forward the chunk itself for these items
            assert scanned(got) == chunk
        items += got
    return items, None


def scanned(items: list) -> bytes:
    return b"".join(i.raw if type(i) is codec.Frame else i for i in items)


def first_bad_header(stream: bytes, max_size: int | None) -> int | None:
    """Offset of the first header the scanner must refuse (oracle: walks the lengths itself)."""
    limit = max_size or 0x7FFFFFFF
    pos = 0
    while pos + 5 <= len(stream):
        (length,) = struct.unpack_from("!I", stream, pos + 1)
        if length < 4 or length > limit:
            return pos
        pos += 1 + length
    return None


def check_scanner(stream: bytes, inspect: frozenset[int], cut: list[int], max_size: int | None) -> None:
    """The Scanner on any bytes, cut anywhere: the same refusal at the same place as byte by byte,
    every byte before it handed out once and in order, inspected messages whole, and after a
    refusal a truthful ``at_boundary``."""
    bad = first_bad_header(stream, max_size)
    byte_scanner = codec.Scanner(inspect, max_size)
    byte_items, byte_exc = scanner_items(byte_scanner, bytewise(stream))
    scanner = codec.Scanner(inspect, max_size)
    items, exc = scanner_items(scanner, cut_at(cut)(stream))
    assert (exc is None) == (byte_exc is None) == (bad is None), (bad, exc, byte_exc)
    emitted, byte_emitted = scanned(items), scanned(byte_items)
    assert stream.startswith(byte_emitted) and byte_emitted.startswith(emitted)
    frames = [f.raw for f in items if type(f) is codec.Frame]
    byte_frames = [f.raw for f in byte_items if type(f) is codec.Frame]
    assert byte_frames[:len(frames)] == frames
    for f in frames:
        assert f[0] in inspect and len(f) == 1 + struct.unpack_from("!i", f, 1)[0]
    if bad is not None:
        assert exc.sqlstate == "08P01" and type(exc) is type(byte_exc)
        assert byte_emitted == stream[:bad]  # everything before the bad header, nothing of it
        _, rest = split_messages(emitted)
        assert scanner.at_boundary == (rest == b"")
    else:
        whole_messages, rest = split_messages(stream)
        assert byte_frames == [m for m in whole_messages if m[0] in inspect]
        if scanner.at_boundary:
            assert emitted == stream and rest == b""


def check_decoders(body: bytes, start: int = 0) -> None:
    """Every decoder of the codec on arbitrary bytes: a value or a ProtocolViolation, nothing else."""
    from proxy.enforcement.apply import withhold_row_values
    from proxy.wire.relay import row_count

    def value(fn, *args):
        try:
            return fn(*args)
        except codec.ProtocolViolation:
            return None

    for fn in (codec.decode_parse, codec.function_call_oid, codec.decode_backend_key_data,
               codec.auth_code, codec.parameter_status, codec.sasl_mechanisms, codec.parse_error_fields,
               codec.parse_startup_params):
        value(fn, body)
    value(codec.cstring_at, body, start)
    value(codec.query_text, msg(b"Q", body))
    sasl = value(codec.sasl_mechanisms, struct.pack("!i", 10) + body)
    if sasl is not None:  # a mechanism list survives re-encoding
        assert codec.sasl_mechanisms(codec.auth_sasl(sasl)[5:]) == sasl
    withhold_row_values(msg(b"E", body))
    row_count(msg(b"C", body.replace(b"\x00", b"") + b"\x00"))
    text = body.decode("utf-8", "surrogateescape")
    err = codec.error_response("42501", text, detail=text, hint=text)
    err[5:].decode("utf-8")
    assert codec.parse_error_fields(err[5:])["C"] == "42501"
    q = codec.query(text)
    assert q[5:] == body.replace(b"\x00", b"") + b"\x00"  # the client's own bytes, undecodable ones too
    buf = bytearray(body)
    try:
        while (p := codec.split_startup_packet(buf)) is not None:
            codec.parse_startup_params(p.payload)
    except codec.ProtocolViolation:
        pass
