"""The sans-IO core without a database: the codec's framing and the relay's routing.

Scanner tests feed byte streams cut in every way a socket may cut them. Relay
tests feed canned protocol bytes, shaped as PostgreSQL 15 sends them (55.7
"Message Formats"), into both directions and look at what comes out.
"""

from __future__ import annotations

import struct

import pytest

from proxy.enforcement.apply import MARKER_PREFIX
from proxy.policy.decision import ALLOW, Allow, Block, Mask
from proxy.wire import codec
from proxy.wire.codec import Frame, MessageTooLarge, ProtocolViolation, Scanner
from proxy.wire.relay import CLIENT_INSPECT, SERVER_INSPECT, Relay
from proxy.wire.state import Phase

# --- helpers -------------------------------------------------------------------------


def msg(typ: bytes, body: bytes = b"") -> bytes:
    return codec.message(typ, body)


def data_row(*values: bytes) -> bytes:
    body = struct.pack("!h", len(values)) + b"".join(struct.pack("!i", len(v)) + v for v in values)
    return msg(b"D", body)


def command_complete(tag: str) -> bytes:
    return msg(b"C", codec.cstring(tag))


def ready(status: bytes = b"I") -> bytes:
    return codec.ready_for_query(status)


def auth_ok() -> bytes:
    return msg(b"R", struct.pack("!i", codec.AUTH_OK))


def param_status(name: str, value: str) -> bytes:
    return msg(b"S", codec.cstring(name) + codec.cstring(value))


def bind(portal: str = "", stmt: str = "") -> bytes:
    return msg(b"B", codec.cstring(portal) + codec.cstring(stmt) + struct.pack("!hhh", 0, 0, 0))


def describe_portal(portal: str = "") -> bytes:
    return msg(b"D", b"P" + codec.cstring(portal))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", codec.cstring(portal) + struct.pack("!i", max_rows))


def sync() -> bytes:
    return msg(b"S")


def flush() -> bytes:
    return msg(b"H")


def pg_syntax_error(near: str) -> bytes:
    """The ErrorResponse PostgreSQL 15 sends for a statement that is a lone identifier."""
    fields = [
        b"SERROR\x00", b"VERROR\x00", b"C42601\x00",
        b"M" + codec.cstring(f'syntax error at or near "{near}"'),
        b"P1\x00", b"Fscan.l\x00", b"L1188\x00", b"Rscanner_yyerror\x00",
    ]
    return msg(b"E", b"".join(fields) + b"\x00")


def pg_error(sqlstate: str, text: str, severity: str = "ERROR") -> bytes:
    body = (b"S" + codec.cstring(severity) + b"V" + codec.cstring(severity) + b"C" + codec.cstring(sqlstate)
            + b"M" + codec.cstring(text) + b"\x00")
    return msg(b"E", body)


def collect(items: list) -> bytes:
    """The bytes a list of scanner items stands for, in order."""
    return b"".join(i.raw if isinstance(i, Frame) else i for i in items)


def frames(items: list) -> list[Frame]:
    return [i for i in items if isinstance(i, Frame)]


def error_fields(raw: bytes) -> dict[str, str]:
    assert raw[:1] == b"E"
    (length,) = struct.unpack_from("!i", raw, 1)
    assert length == len(raw) - 1
    return codec.parse_error_fields(raw[5:])


def split_messages(stream: bytes) -> list[bytes]:
    """Cut a concatenation of typed messages into messages (test oracle, not the scanner)."""
    out = []
    pos = 0
    while pos < len(stream):
        (length,) = struct.unpack_from("!i", stream, pos + 1)
        out.append(stream[pos : pos + 1 + length])
        pos += 1 + length
    assert pos == len(stream)
    return out


Z = frozenset({ord("Z")})
STREAM = (
    msg(b"T", b"\x00\x01a\x00" + b"\x00" * 18)
    + data_row(b"1")
    + data_row(b"x" * 300)
    + command_complete("SELECT 2")
    + ready(b"I")
)


# --- Scanner: framing ------------------------------------------------------------------


def test_whole_frames_in_one_read():
    s = Scanner(inspect=Z)
    items = s.feed(STREAM)
    assert collect(items) == STREAM
    assert frames(items) == [Frame(ord("Z"), ready(b"I"))]
    # Opaque messages before the inspected one come as a single segment.
    assert items[0] == STREAM[: -len(ready())]
    assert s.at_boundary


def test_several_inspected_frames_in_one_read():
    s = Scanner(inspect=frozenset({ord("C"), ord("Z")}))
    data = command_complete("INSERT 0 1") + command_complete("UPDATE 3") + ready(b"T")
    items = s.feed(data)
    assert [f.raw for f in frames(items)] == split_messages(data)
    assert [f.type for f in frames(items)] == [ord("C"), ord("C"), ord("Z")]
    assert frames(items)[1].body == b"UPDATE 3\x00"
    assert s.at_boundary


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_split_anywhere_gives_same_stream(cut):
    s = Scanner(inspect=frozenset({ord("C"), ord("Z")}))
    items = s.feed(STREAM[:cut]) + s.feed(STREAM[cut:])
    assert collect(items) == STREAM
    assert [f.raw for f in frames(items)] == [command_complete("SELECT 2"), ready(b"I")]
    assert s.at_boundary


def test_inspected_frame_split_in_header_and_body_is_held_back():
    s = Scanner(inspect=Z)
    z = ready(b"E")
    assert s.feed(z[:3]) == []  # partial header
    assert not s.at_boundary
    assert s.feed(z[3:5]) == []  # header complete, body missing
    assert s.feed(z[5:]) == [Frame(ord("Z"), z)]
    assert s.at_boundary


def test_one_byte_feeds():
    inspect = frozenset({ord("C"), ord("Z")})
    s = Scanner(inspect=inspect)
    items: list = []
    for i in range(len(STREAM)):
        items += s.feed(STREAM[i : i + 1])
    assert collect(items) == STREAM
    assert [f.raw for f in frames(items)] == [command_complete("SELECT 2"), ready(b"I")]
    # Inspected frames are never handed out in pieces.
    for f in frames(items):
        assert len(f.raw) == struct.unpack_from("!i", f.raw, 1)[0] + 1
    assert s.at_boundary


def test_opaque_message_streams_before_it_is_complete():
    s = Scanner(inspect=Z)
    big = data_row(b"y" * 10_000)
    first = s.feed(big[:100])
    assert first == [big[:100]]  # forwarded at once, not buffered
    assert not s.at_boundary
    middle = s.feed(big[100:5000])
    assert middle == [big[100:5000]]
    rest = s.feed(big[5000:] + ready(b"I"))
    assert rest == [big[5000:], Frame(ord("Z"), ready(b"I"))]
    assert s.at_boundary


def test_opaque_header_split_then_streamed():
    s = Scanner(inspect=Z)
    big = data_row(b"z" * 1000)
    assert s.feed(big[:2]) == []  # type and half a length: cannot know the size yet
    out = s.feed(big[2:50])
    assert collect(out) == big[:50]
    out = s.feed(big[50:])
    assert collect(out) == big[50:]
    assert s.at_boundary


def test_empty_feed():
    s = Scanner(inspect=Z)
    assert s.feed(b"") == []
    assert s.at_boundary


def test_zero_body_message():
    s = Scanner(inspect=frozenset({ord("S")}))
    assert s.feed(sync()) == [Frame(ord("S"), sync())]
    assert Frame(ord("S"), sync()).body == b""


# --- Scanner: limits and garbage ---------------------------------------------------------


def test_oversize_length_is_refused_from_the_header_alone():
    s = Scanner(inspect=frozenset({ord("Q")}), max_size=1024)
    header = b"Q" + struct.pack("!i", 1025)
    with pytest.raises(MessageTooLarge) as exc:
        s.feed(header)
    assert exc.value.sqlstate == "08P01"
    assert isinstance(exc.value, ProtocolViolation)


def test_oversize_opaque_message_is_refused_too():
    s = Scanner(inspect=frozenset(), max_size=1024)
    with pytest.raises(MessageTooLarge):
        s.feed(b"d" + struct.pack("!i", 5000) + b"x" * 10)


def test_message_at_the_limit_is_accepted():
    s = Scanner(inspect=frozenset({ord("Q")}), max_size=1024)
    body = b"x" * (1024 - 4 - 1) + b"\x00"
    q = msg(b"Q", body)
    assert struct.unpack_from("!i", q, 1)[0] == 1024
    assert s.feed(q) == [Frame(ord("Q"), q)]


def test_oversize_after_valid_messages_in_same_read():
    s = Scanner(inspect=frozenset({ord("Q")}), max_size=100)
    with pytest.raises(MessageTooLarge):
        s.feed(codec.query("SELECT 1") + b"Q" + struct.pack("!i", 101))


@pytest.mark.parametrize("length", [-1, -2147483648, 0, 1, 2, 3])
def test_negative_or_too_small_length(length):
    s = Scanner(inspect=frozenset({ord("Q")}))
    with pytest.raises(ProtocolViolation):
        s.feed(b"Q" + struct.pack("!i", length))


@pytest.mark.parametrize("length", [-1, 3])
def test_bad_length_of_opaque_type(length):
    s = Scanner(inspect=frozenset())
    with pytest.raises(ProtocolViolation):
        s.feed(b"D" + struct.pack("!i", length))


def test_garbage_is_a_protocol_violation():
    # What an HTTP client would send to the port: 'G' then "ET /" read as a length.
    s = Scanner(inspect=CLIENT_INSPECT, max_size=codec.DEFAULT_MAX_MESSAGE_SIZE)
    with pytest.raises(ProtocolViolation):
        s.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    s = Scanner(inspect=CLIENT_INSPECT, max_size=codec.DEFAULT_MAX_MESSAGE_SIZE)
    with pytest.raises(ProtocolViolation):
        s.feed(b"\xff\xff\xff\xff\xff\xff\xff\xff")


def test_garbage_after_a_valid_message_split_across_reads():
    s = Scanner(inspect=frozenset({ord("Q")}))
    q = codec.query("SELECT 1")
    items = s.feed(q + b"Q\x00")
    assert items == [Frame(ord("Q"), q)]
    with pytest.raises(ProtocolViolation):
        s.feed(b"\x00\x00\x00")  # completes a length of 0


# --- startup packets ------------------------------------------------------------------


def test_startup_packet_split_and_params():
    params = {"user": "app", "database": "appdb", "application_name": "t\u00e9st", "options": "-c x=1"}
    raw = codec.startup_message(params)
    buf = bytearray()
    for i in range(len(raw) - 1):
        buf.append(raw[i])
        assert codec.split_startup_packet(buf) is None
    buf.append(raw[-1])
    buf += b"Qrest"
    packet = codec.split_startup_packet(buf)
    assert packet is not None
    assert packet.code == codec.PROTOCOL_3_0 and packet.is_startup
    assert codec.parse_startup_params(packet.payload) == params
    assert bytes(buf) == b"Qrest"  # what follows the packet stays in the buffer


def test_ssl_and_cancel_requests():
    buf = bytearray(codec.ssl_request() + codec.cancel_request(1234, b"\x01\x02\x03\x04"))
    p1 = codec.split_startup_packet(buf)
    assert p1.code == codec.SSL_REQUEST_CODE and not p1.is_startup and p1.payload == b""
    p2 = codec.split_startup_packet(buf)
    assert p2.code == codec.CANCEL_REQUEST_CODE
    assert struct.unpack("!i", p2.payload[:4])[0] == 1234 and p2.payload[4:] == b"\x01\x02\x03\x04"
    assert buf == bytearray()


@pytest.mark.parametrize("length", [0, 4, 7, 10001, -1])
def test_startup_packet_bad_length(length):
    buf = bytearray(struct.pack("!i", length) + struct.pack("!i", codec.PROTOCOL_3_0) + b"\x00" * 8)
    with pytest.raises(ProtocolViolation):
        codec.split_startup_packet(buf)


def test_startup_params_edge_cases():
    assert codec.parse_startup_params(b"\x00") == {}
    assert codec.parse_startup_params(b"user\x00\x00\x00") == {"user": ""}


# --- message codecs -------------------------------------------------------------------


def test_parse_roundtrip():
    raw = codec.encode_parse("s1", "SELECT $1::int, $2", (23, 25))
    f = codec.Scanner(CLIENT_INSPECT).feed(raw)[0]
    p = codec.decode_parse(f.body)
    assert (p.name, p.sql, p.param_types) == ("s1", "SELECT $1::int, $2", (23, 25))


@pytest.mark.parametrize("body", [b"", b"s1\x00", b"s1\x00SELECT 1\x00", b"s1\x00SELECT 1\x00\x00\x02\x00\x00\x00\x17",
                                  b"\x00SELECT 1\x00\xff\xff"])
def test_malformed_parse(body):
    with pytest.raises(ProtocolViolation):
        codec.decode_parse(body)


def test_query_without_terminator():
    with pytest.raises(ProtocolViolation):
        codec.query_text(b"Q\x00\x00\x00\x0cSELECT 1")


def test_error_response_roundtrip():
    raw = codec.error_response("42501", "no \x00way", detail="d", hint="h")
    f = error_fields(raw)
    assert f == {"S": "ERROR", "V": "ERROR", "C": "42501", "M": "no way", "D": "d", "H": "h"}
    assert codec.error_response("01000", "n", notice=True, severity="NOTICE")[:1] == b"N"


# --- Relay ---------------------------------------------------------------------------


class Decider:
    """Records what the relay asks and answers from a table (default: allow)."""

    def __init__(self, answers: dict[str, object] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, sql: str, via: str):
        self.calls.append((sql, via))
        return self.answers.get(sql, ALLOW)


STARTUP = codec.startup_message({"user": "app", "database": "app"})
REFUSAL = Block("refused by test policy", sqlstate="42501", detail="purpose: marketing", hint="ask the DPO")


def sent(chunks: list[bytes]) -> bytes:
    out = b"".join(chunks)
    chunks.clear()
    return out


def authenticated_relay(decide=None, key_mapper=None, **kw) -> Relay:
    relay = Relay(decide or Decider(), key_mapper=key_mapper, **kw)
    relay.start(STARTUP)
    assert relay.phase is Phase.AUTH
    assert sent(relay.to_server) == STARTUP
    relay.server_data(
        auth_ok() + param_status("server_version", "15.18") + param_status("client_encoding", "UTF8")
        + codec.backend_key_data(4242, b"\x00\x00\x30\x39") + ready(b"I")
    )
    assert relay.authenticated
    assert relay.phase is Phase.IDLE
    relay.to_client.clear()
    return relay


def test_startup_and_auth_relay():
    relay = Relay(Decider())
    relay.start(STARTUP)
    assert sent(relay.to_server) == STARTUP
    assert relay.phase is Phase.AUTH and not relay.authenticated
    md5_req = msg(b"R", struct.pack("!i", 5) + b"salt")
    relay.server_data(md5_req)
    assert sent(relay.to_client) == md5_req
    pw = msg(b"p", codec.cstring("md5abcdef"))
    relay.client_data(pw)
    assert sent(relay.to_server) == pw  # passwords are relayed, never decided on
    rest = auth_ok() + param_status("TimeZone", "UTC") + codec.backend_key_data(7, b"abcd") + ready(b"I")
    relay.server_data(rest)
    assert sent(relay.to_client) == rest  # no key mapper: BackendKeyData unchanged
    assert relay.server_params == {"TimeZone": "UTC"}
    assert relay.backend_key == (7, b"abcd")
    assert relay.authenticated and relay.phase is Phase.IDLE and relay.idle


def test_allow_forwards_query_unchanged():
    d = Decider()
    relay = authenticated_relay(d)
    q = codec.query("SELECT 1")
    relay.client_data(q)
    assert sent(relay.to_server) == q
    assert d.calls == [("SELECT 1", "query")]
    assert relay.phase is Phase.SIMPLE_QUERY
    answer = msg(b"T", b"\x00\x01a\x00" + b"\x00" * 18) + data_row(b"1") + command_complete("SELECT 1") + ready(b"I")
    relay.server_data(answer)
    assert sent(relay.to_client) == answer
    assert relay.phase is Phase.IDLE and relay.tx_status == b"I"
    assert [(e.via, e.sql, e.decision) for e in relay.events] == [("query", "SELECT 1", ALLOW)]


def test_query_split_across_reads_is_decided_once_whole():
    d = Decider()
    relay = authenticated_relay(d)
    q = codec.query("SELECT 'a long enough statement'")
    for b in q:
        relay.client_data(bytes([b]))
    assert sent(relay.to_server) == q
    assert d.calls == [("SELECT 'a long enough statement'", "query")]


def test_a_read_forwarded_unchanged_goes_on_as_the_read_itself():
    # Several messages in one read, none changed: one buffer each way, the very bytes
    # object that was read (one plain write for the socket instead of a gathered one).
    relay = authenticated_relay(Decider())
    batch = bind() + execute() + sync()
    relay.client_data(batch)
    assert len(relay.to_server) == 1 and relay.to_server[0] is batch
    answer = msg(b"2") + data_row(b"1") + command_complete("SELECT 1") + ready()
    relay.server_data(answer)
    assert len(relay.to_client) == 1 and relay.to_client[0] is answer
    assert relay.phase is Phase.IDLE


def test_a_read_with_a_held_back_or_changed_message_goes_on_in_pieces():
    relay = authenticated_relay(Decider({"SELECT secret FROM t": REFUSAL}))
    # The read ends inside an inspected message: what went on is the read minus that tail.
    head = bind() + execute() + sync()
    relay.client_data(head + sync()[:3])
    assert sent(relay.to_server) == head
    relay.to_server.clear()
    relay.client_data(sync()[3:])  # the rest: the held-back part comes first
    assert sent(relay.to_server) == sync()
    relay.server_data(msg(b"2") + command_complete("SELECT 0") + ready() + ready())
    relay.to_client.clear()
    # A refused statement in the read: the stand-in goes up, not the client's bytes.
    relay.client_data(codec.encode_parse("", "SELECT secret FROM t") + bind() + sync())
    upstream = sent(relay.to_server)
    assert b"secret" not in upstream and upstream.endswith(sync())
    stand_in = codec.decode_parse(split_messages(upstream)[0][5:]).sql
    # Its error is swapped for the refusal, so the answer goes on in pieces too.
    relay.server_data(pg_syntax_error(stand_in) + ready())
    out = split_messages(sent(relay.to_client))
    assert error_fields(out[0])["C"] == "42501" and out[1] == ready()


def test_mask_rewrites_query_and_parse():
    d = Decider({"SELECT email FROM t": Mask("SELECT '***' AS email FROM t", methods=("redact",))})
    relay = authenticated_relay(d)
    relay.client_data(codec.query("SELECT email FROM t"))
    assert sent(relay.to_server) == codec.query("SELECT '***' AS email FROM t")
    relay.server_data(command_complete("SELECT 0") + ready())
    relay.client_data(codec.encode_parse("s", "SELECT email FROM t", (25,)) + sync())
    assert sent(relay.to_server) == codec.encode_parse("s", "SELECT '***' AS email FROM t", (25,)) + sync()
    assert d.calls[-1] == ("SELECT email FROM t", "parse")


def test_block_sends_stand_in_and_swaps_the_syntax_error():
    d = Decider({"SELECT secret FROM t": REFUSAL})
    relay = authenticated_relay(d)
    relay.client_data(codec.query("SELECT secret FROM t"))
    upstream = sent(relay.to_server)
    assert b"secret" not in upstream  # nothing of the statement reaches PostgreSQL
    assert upstream[:1] == b"Q"
    stand_in = codec.query_text(upstream)
    assert stand_in.startswith(MARKER_PREFIX)
    # PostgreSQL answers the lone identifier with a syntax error naming it.
    relay.server_data(pg_syntax_error(stand_in) + ready(b"I"))
    out = split_messages(sent(relay.to_client))
    assert len(out) == 2
    f = error_fields(out[0])
    assert f["C"] == "42501" and f["M"] == "refused by test policy" and f["S"] == "ERROR"
    assert f["D"] == "purpose: marketing" and f["H"] == "ask the DPO"
    assert MARKER_PREFIX not in out[0].decode("utf-8", "replace")
    assert out[1] == ready(b"I")
    assert relay.phase is Phase.IDLE


def test_block_inside_transaction_keeps_postgres_failed_state():
    d = Decider({"DELETE FROM t": REFUSAL})
    relay = authenticated_relay(d)
    relay.client_data(codec.query("BEGIN"))
    assert sent(relay.to_server) == codec.query("BEGIN")
    relay.server_data(command_complete("BEGIN") + ready(b"T"))
    assert relay.tx_status == b"T" and not relay.idle
    relay.client_data(codec.query("DELETE FROM t"))
    stand_in = codec.query_text(sent(relay.to_server))
    assert stand_in.startswith(MARKER_PREFIX)
    relay.server_data(pg_syntax_error(stand_in) + ready(b"E"))
    out = split_messages(sent(relay.to_client))
    assert error_fields(out[-2])["C"] == "42501"
    assert out[-1] == ready(b"E")
    assert relay.tx_status == b"E"


def test_block_split_error_response_is_still_swapped():
    d = Decider({"x": REFUSAL})
    relay = authenticated_relay(d)
    relay.client_data(codec.query("x"))
    stand_in = codec.query_text(sent(relay.to_server))
    answer = pg_syntax_error(stand_in) + ready(b"I")
    for i in range(len(answer)):
        relay.server_data(answer[i : i + 1])
    out = split_messages(sent(relay.to_client))
    assert error_fields(out[0])["M"] == "refused by test policy"


def test_real_errors_are_not_swapped():
    relay = authenticated_relay(Decider())
    relay.client_data(codec.query("SELEC 1"))
    err = pg_syntax_error("SELEC")
    relay.server_data(err + ready(b"I"))
    assert sent(relay.to_client) == err + ready(b"I")


def test_stale_marker_error_never_reaches_the_client_as_syntax_error():
    relay = authenticated_relay(Decider())
    relay.server_data(pg_syntax_error(MARKER_PREFIX + "feedbeef") + ready(b"I"))
    out = split_messages(sent(relay.to_client))
    f = error_fields(out[0])
    assert f["C"] == "42501" and MARKER_PREFIX not in f["M"]


def test_decider_crash_fails_closed():
    def decide(sql, via):
        raise RuntimeError("boom")

    relay = authenticated_relay(decide)
    relay.client_data(codec.query("SELECT 1"))
    stand_in = codec.query_text(sent(relay.to_server))
    assert stand_in.startswith(MARKER_PREFIX)
    relay.server_data(pg_syntax_error(stand_in) + ready(b"I"))
    assert error_fields(split_messages(sent(relay.to_client))[0])["C"] == "XX000"


def test_fatal_block_closes_session():
    relay = authenticated_relay(Decider({"x": Block("go away", sqlstate="28000", severity="FATAL")}))
    relay.client_data(codec.query("x"))
    assert sent(relay.to_server) == b""
    f = error_fields(sent(relay.to_client))
    assert f["S"] == "FATAL" and f["C"] == "28000"
    assert relay.phase is Phase.FAILED and relay.close_after_flush


def test_refused_parse_drops_batch_until_sync():
    d = Decider({"SELECT secret FROM t WHERE id = $1": REFUSAL})
    relay = authenticated_relay(d)
    batch = (
        codec.encode_parse("", "SELECT secret FROM t WHERE id = $1", (23,))
        + bind() + describe_portal() + execute() + msg(b"C", b"S" + codec.cstring("other"))
        + sync()
    )
    relay.client_data(batch)
    upstream = split_messages(sent(relay.to_server))
    # Only the stand-in Parse and the Sync go upstream; Bind/Describe/Execute/Close are dropped.
    assert [m[:1] for m in upstream] == [b"P", b"S"]
    p = codec.decode_parse(upstream[0][5:])
    assert p.name == "" and p.sql.startswith(MARKER_PREFIX) and p.param_types == ()
    assert upstream[1] == sync()
    assert relay.phase is Phase.EXTENDED
    relay.server_data(pg_syntax_error(p.sql) + ready(b"I"))
    out = split_messages(sent(relay.to_client))
    assert error_fields(out[0])["M"] == "refused by test policy"
    assert out[1] == ready(b"I")
    assert relay.phase is Phase.IDLE and relay.idle
    # The next batch goes through untouched.
    nxt = codec.encode_parse("", "SELECT 1") + bind() + execute() + sync()
    relay.client_data(nxt)
    assert sent(relay.to_server) == nxt


def test_refused_parse_discarding_spans_reads_and_passes_flush():
    d = Decider({"bad": REFUSAL})
    relay = authenticated_relay(d)
    relay.client_data(codec.encode_parse("s1", "bad") + flush())
    upstream = split_messages(sent(relay.to_server))
    assert [m[:1] for m in upstream] == [b"P", b"H"]
    assert codec.decode_parse(upstream[0][5:]).name == "s1"  # same statement name
    assert relay.phase is Phase.DISCARDING
    relay.client_data(bind(stmt="s1") + execute())
    assert sent(relay.to_server) == b""
    assert relay.phase is Phase.DISCARDING
    relay.client_data(sync())
    assert sent(relay.to_server) == sync()


def test_pipeline_refused_parse_between_allowed_batches():
    d = Decider({"bad": REFUSAL})
    relay = authenticated_relay(d)
    ok1 = codec.encode_parse("", "SELECT 1") + bind() + execute() + sync()
    bad = codec.encode_parse("", "bad") + bind() + execute() + sync()
    ok2 = codec.encode_parse("", "SELECT 2") + bind() + execute() + sync()
    relay.client_data(ok1 + bad + ok2)
    upstream = sent(relay.to_server)
    msgs = split_messages(upstream)
    assert [m[:1] for m in msgs] == [b"P", b"B", b"E", b"S", b"P", b"S", b"P", b"B", b"E", b"S"]
    assert upstream.startswith(ok1) and upstream.endswith(ok2)
    marker = codec.decode_parse(msgs[4][5:]).sql
    one = msg(b"1") + msg(b"2") + data_row(b"1") + command_complete("SELECT 1") + ready(b"I")
    relay.server_data(one + pg_syntax_error(marker) + ready(b"I"))
    assert relay.phase is not Phase.IDLE  # the third batch is still outstanding
    relay.server_data(msg(b"1") + msg(b"2") + data_row(b"2") + command_complete("SELECT 1") + ready(b"I"))
    out = split_messages(sent(relay.to_client))
    errs = [error_fields(m) for m in out if m[:1] == b"E"]
    assert [e["C"] for e in errs] == ["42501"]
    assert out.count(ready(b"I")) == 3
    assert relay.phase is Phase.IDLE


def test_terminate_while_discarding_goes_upstream():
    relay = authenticated_relay(Decider({"bad": REFUSAL}))
    relay.client_data(codec.encode_parse("", "bad") + bind())
    sent(relay.to_server)
    relay.client_data(codec.terminate())
    assert sent(relay.to_server) == codec.terminate()
    assert relay.phase is Phase.CLOSED


def test_sasl_mechanism_list_loses_plus():
    relay = Relay(Decider())
    relay.start(STARTUP)
    offer = codec.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    relay.server_data(offer)
    out = sent(relay.to_client)
    assert out == codec.auth_sasl(["SCRAM-SHA-256"])
    assert codec.sasl_mechanisms(out[5:]) == ["SCRAM-SHA-256"]
    # Without -PLUS the offer passes byte for byte.
    plain = codec.auth_sasl(["SCRAM-SHA-256"])
    relay.server_data(plain)
    assert sent(relay.to_client) == plain
    # SASLContinue / SASLFinal (codes 11, 12) pass untouched.
    cont = msg(b"R", struct.pack("!i", 11) + b"r=abc,s=def,i=4096")
    relay.server_data(cont)
    assert sent(relay.to_client) == cont


def test_sasl_plus_passes_when_proxy_presents_the_servers_certificate():
    relay = Relay(Decider())
    relay.channel_binding = True  # the session found both TLS legs end in one certificate
    relay.start(STARTUP)
    offer = codec.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    relay.server_data(offer)
    assert sent(relay.to_client) == offer


def test_backend_key_data_secret_is_replaced_by_key_mapper():
    seen = []

    def mapper(pid: int, secret: bytes) -> bytes:
        seen.append((pid, secret))
        return b"\xaa\xbb\xcc\xdd"

    relay = Relay(Decider(), key_mapper=mapper)
    relay.start(STARTUP)
    relay.server_data(auth_ok() + codec.backend_key_data(31337, b"\x01\x02\x03\x04") + ready())
    out = split_messages(sent(relay.to_client))
    assert seen == [(31337, b"\x01\x02\x03\x04")]
    assert out[1] == codec.backend_key_data(31337, b"\xaa\xbb\xcc\xdd")
    assert codec.decode_backend_key_data(out[1][5:]) == (31337, b"\xaa\xbb\xcc\xdd")
    assert relay.backend_key == (31337, b"\x01\x02\x03\x04")  # the real key stays with the proxy


def test_ready_for_query_updates_tx_status_and_phase():
    relay = authenticated_relay(Decider())
    for sql, status, tag in [("BEGIN", b"T", "BEGIN"), ("SELEC", b"E", None), ("ROLLBACK", b"I", "ROLLBACK")]:
        relay.client_data(codec.query(sql))
        assert relay.phase is Phase.SIMPLE_QUERY
        reply = command_complete(tag) if tag else pg_syntax_error("SELEC")
        relay.server_data(reply)
        assert relay.phase is Phase.SIMPLE_QUERY  # not done before ReadyForQuery
        relay.server_data(ready(status))
        assert relay.tx_status == status
        assert relay.phase is Phase.IDLE
        assert relay.idle == (status == b"I")


def test_phase_waits_for_every_outstanding_ready():
    relay = authenticated_relay(Decider())
    relay.client_data(codec.query("SELECT 1") + codec.query("SELECT 2"))
    relay.server_data(command_complete("SELECT 1") + ready())
    assert relay.phase is Phase.SIMPLE_QUERY
    relay.server_data(command_complete("SELECT 1") + ready())
    assert relay.phase is Phase.IDLE


def test_copy_in_streams_copy_data_undecided():
    d = Decider()
    relay = authenticated_relay(d)
    relay.client_data(codec.query("COPY t FROM STDIN"))
    sent(relay.to_server)
    relay.server_data(msg(b"G", b"\x00\x00\x01\x00\x00"))
    assert relay.phase is Phase.COPY_IN
    chunk = msg(b"d", b"1\tQ looks like a query\n" * 100)
    relay.client_data(chunk[:50])
    relay.client_data(chunk[50:] + msg(b"c"))
    assert sent(relay.to_server) == chunk + msg(b"c")
    assert d.calls == [("COPY t FROM STDIN", "query")]
    relay.server_data(command_complete("COPY 100"))
    relay.server_data(ready())
    assert relay.phase is Phase.IDLE


def test_copy_out_phase():
    relay = authenticated_relay(Decider())
    relay.client_data(codec.query("COPY t TO STDOUT"))
    relay.server_data(msg(b"H", b"\x00\x00\x01\x00\x00"))
    assert relay.phase is Phase.COPY_OUT
    rows = msg(b"d", b"1\n") * 3
    relay.server_data(rows + msg(b"c"))
    assert relay.phase is Phase.SIMPLE_QUERY
    relay.server_data(command_complete("COPY 3") + ready())
    assert relay.phase is Phase.IDLE
    assert b"".join(relay.to_client).count(b"d\x00\x00\x00\x061\n") == 3


def test_extended_copy_in_sync_accounting():
    """libpq's extended COPY FROM: Sync right after Execute, another Sync after CopyDone.

    The backend ignores the Sync it reads during COPY IN, so one ReadyForQuery comes.
    """
    relay = authenticated_relay(Decider())
    relay.client_data(codec.encode_parse("", "COPY t FROM STDIN") + bind() + execute() + sync())
    relay.server_data(msg(b"1") + msg(b"2") + msg(b"G", b"\x00\x00\x00"))
    assert relay.phase is Phase.COPY_IN
    relay.client_data(msg(b"d", b"1\n") + msg(b"c") + sync())
    relay.server_data(command_complete("COPY 1") + ready())
    assert relay.phase is Phase.IDLE


def test_client_protocol_violation_and_size_limit():
    relay = authenticated_relay(Decider(), max_message_size=1024)
    with pytest.raises(MessageTooLarge):
        relay.client_data(b"Q" + struct.pack("!i", 2048))
    relay = authenticated_relay(Decider())
    with pytest.raises(ProtocolViolation):
        relay.client_data(msg(b"P", b"no terminators"))


def test_fail_injects_fatal_only_at_a_boundary():
    relay = authenticated_relay(Decider())
    relay.client_data(codec.query("SELECT repeat('x', 100000)"))
    big = data_row(b"x" * 100_000)
    relay.server_data(big[:1000])  # mid-DataRow: an error now would corrupt the stream
    sent(relay.to_client)
    relay.fail("08006", "gone")
    assert relay.to_client == []
    assert relay.close_after_flush and relay.phase is Phase.FAILED
    relay2 = authenticated_relay(Decider())
    relay2.fail("57P01", "shutting down")
    f = error_fields(sent(relay2.to_client))
    assert f["S"] == "FATAL" and f["C"] == "57P01"


def test_server_fatal_is_noticed():
    relay = authenticated_relay(Decider())
    relay.server_data(pg_error("57P01", "terminating connection due to administrator command", "FATAL"))
    assert relay.server_fatal


def test_inspect_sets():
    assert codec.F_COPY_DATA not in CLIENT_INSPECT and codec.F_QUERY in CLIENT_INSPECT
    assert ord("D") not in SERVER_INSPECT  # DataRow streams opaque
    assert isinstance(ALLOW, Allow)
