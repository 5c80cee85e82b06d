"""Property-based fuzzing of the message codec: framing under any chunking, wrong lengths, garbage, and every decoder
on arbitrary bytes."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.enforcement.startup import BadOptions, startup_settings
from proxy.wire import codec
from proxy.wire.codec import MessageTooLarge, ProtocolViolation, Scanner
from proxy.wire.relay import CLIENT_INSPECT, CLIENT_INSPECT_BIND, SERVER_INSPECT, row_count
from tests.support.fuzzing import (
    BAD_LENGTHS, CLIENT_VOCABULARY, SERVER_VOCABULARY, WHOLE_CLIENT_VOCABULARY, check_decoders, check_scanner, cut_at,
    first_bad_header, msg, mutate, scanned, scanner_items, split_messages, with_length,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TYPES = st.sampled_from(b"QPBEDCSHXFdcfpRKZTNGWAItn123v?\x00\xff").map(lambda b: bytes([b]))
any_message = st.one_of(
    st.builds(msg, TYPES, st.binary(max_size=48)),
    st.sampled_from(WHOLE_CLIENT_VOCABULARY),  # a partial header would make the stream ill-framed
    st.sampled_from(SERVER_VOCABULARY),
    st.builds(lambda n: msg(b"D", b"x" * n), st.integers(0, 3000)),  # long opaque messages stream in pieces
)
streams = st.lists(any_message, max_size=12).map(b"".join)
inspect_sets = st.sampled_from([frozenset(), CLIENT_INSPECT, CLIENT_INSPECT_BIND, SERVER_INSPECT,
                                frozenset({ord("Z")}), frozenset(range(256))])
cuts = st.lists(st.integers(0, 1 << 16), max_size=10)
max_sizes = st.sampled_from([None, 64, 1024, codec.DEFAULT_MAX_MESSAGE_SIZE])
mutations = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1 << 16), st.integers(0, 255),
                               st.binary(max_size=8)), max_size=4)


@FUZZ
@given(streams, inspect_sets, cuts)
def test_scanner_frames_identically_however_the_stream_is_cut(stream, inspect, cut):
    check_scanner(stream, inspect, cut, None)
    s = Scanner(inspect)
    items, exc = scanner_items(s, cut_at(cut)(stream))
    assert exc is None
    if not split_messages(stream)[1]:  # whole messages: every byte, once, in order, ending on a boundary
        assert scanned(items) == stream and s.at_boundary
    else:  # the vocabulary has headers whose bodies never come: what came out is a prefix, and it waits
        assert stream.startswith(scanned(items)) and not s.at_boundary


@FUZZ
@given(streams, mutations, inspect_sets, cuts, max_sizes)
@example(stream=SERVER_VOCABULARY[0] + msg(b"D", b"x" * 100), mutations=[(4, 0, 0, b"")],
         inspect=SERVER_INSPECT, cut=[60, 130], max_size=None)
@example(stream=codec.query("SELECT 1") * 2, mutations=[(4, 1, 0, b"")], inspect=frozenset(), cut=[5], max_size=None)
def test_scanner_on_mutated_input_refuses_at_the_same_place_however_cut(stream, mutations, inspect, cut, max_size):
    for op, pos, arg, extra in mutations:
        stream = mutate(stream, op, pos, arg, extra)
    check_scanner(stream, inspect, cut, max_size)


def test_an_empty_read_in_the_middle_of_an_opaque_message_hands_out_nothing():
    """Found by the atheris fuzzer: it handed out an empty opaque segment, which the relay took
    for the start of a message (an idle session became EXTENDED)."""
    s = Scanner(frozenset())
    row = msg(b"D", b"x" * 100)
    assert s.feed(row[:20]) == [row[:20]]
    assert s.feed(b"") == []
    assert s.feed(row[20:]) == [row[20:]] and s.at_boundary


@FUZZ
@given(st.sampled_from(BAD_LENGTHS) | st.integers(-(2**31), 2**31 - 1), st.binary(min_size=1, max_size=1),
       inspect_sets, max_sizes, st.binary(max_size=16))
def test_wrong_lengths(length, typ, inspect, max_size, tail):
    s = Scanner(inspect, max_size)
    header = typ + struct.pack("!i", length)
    limit = max_size or 0x7FFFFFFF
    bad = first_bad_header(header + tail, max_size)
    try:
        items = s.feed(header + tail)
    except MessageTooLarge:
        assert bad is not None and bad > 0 or 4 <= length and length > limit
        return
    except ProtocolViolation:
        assert bad is not None and (bad > 0 or length < 4 or length > limit)
        return
    assert bad is None and 4 <= length <= limit
    if typ[0] in inspect and length - 4 > len(tail):
        assert items == []  # held back until whole
    else:
        assert scanned(items) == (header + tail)[: len(scanned(items))]


@FUZZ
@given(st.sampled_from(CLIENT_VOCABULARY + SERVER_VOCABULARY), st.sampled_from([-2, -1, 1, 2]),
       st.sampled_from(CLIENT_VOCABULARY), inspect_sets, cuts)
def test_off_by_one_lengths_never_crash_and_frame_as_announced(message, delta, following, inspect, cut):
    true = struct.unpack_from("!i", message, 1)[0]
    stream = with_length(message, true + delta) + following + following
    bad = first_bad_header(stream, None)
    s = Scanner(inspect)
    items, exc = scanner_items(s, cut_at(cut)(stream))
    assert (exc is None) == (bad is None)
    # The scanner frames by the announced length, as PostgreSQL does: what it hands out
    # is the stream, in order.
    assert stream.startswith(scanned(items))


# --- decoders --------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 70))
def test_decoders_raise_only_protocol_violations(body, start):
    check_decoders(body, start)


@FUZZ
@given(st.lists(st.binary(max_size=24), max_size=6))
def test_row_count_of_any_command_tags(tags):
    completions = b"".join(msg(b"C", t.replace(b"\x00", b"") + b"\x00") for t in tags)
    n = row_count(completions)
    assert n is None or n >= 0


@FUZZ
@given(st.binary(max_size=40), st.binary(max_size=200), st.lists(st.integers(0, 2**32 - 1), max_size=5))
def test_parse_roundtrip_of_any_bytes(name, sql, oids):
    name, sql = name.replace(b"\x00", b""), sql.replace(b"\x00", b"")
    text_name, text_sql = name.decode("utf-8", "surrogateescape"), sql.decode("utf-8", "surrogateescape")
    raw = codec.encode_parse(text_name, text_sql, tuple(oids))
    p = codec.decode_parse(raw[5:])
    assert (p.name, p.sql, p.param_types) == (text_name, text_sql, tuple(oids))
    q = codec.query(text_sql)
    assert q[5:] == sql + b"\x00"  # the client's own bytes go out again, undecodable ones included
    assert codec.query_text(q) == text_sql


@FUZZ
@given(st.binary(max_size=80), st.binary(max_size=40), st.sampled_from(["ERROR", "FATAL"]))
def test_error_response_of_any_text_is_well_formed_utf8(message, detail, severity):
    text = message.decode("utf-8", "surrogateescape")  # what a decider may echo of undecodable SQL
    raw = codec.error_response("42501", text, severity=severity, detail=detail.decode("utf-8", "surrogateescape"))
    messages, rest = split_messages(raw)
    assert messages == [raw] and rest == b""
    raw[5:].decode("utf-8")  # valid UTF-8 for every client
    fields = codec.parse_error_fields(raw[5:])
    assert fields["C"] == "42501" and fields["S"] == severity


# --- startup packets -------------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.one_of(
    st.binary(max_size=40),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4).map(codec.startup_message),
    st.sampled_from([codec.ssl_request(), codec.cancel_request(1, b"abcd"), b"B\x00\x00\x00\x0c\x00\x00"]),
    st.builds(lambda n: struct.pack("!ii", n, codec.PROTOCOL_3_0), st.sampled_from([-1, 0, 7, 8, 10000, 10001])),
), max_size=5).map(b"".join), cuts)
def test_startup_packets_in_any_pieces(stream, cut):
    buf = bytearray()
    packets = []
    for chunk in cut_at(cut)(stream):
        buf += chunk
        try:
            while (p := codec.split_startup_packet(buf)) is not None:
                packets.append(p)
                params = codec.parse_startup_params(p.payload)
                try:
                    startup_settings(params)
                except BadOptions:
                    pass  # options the proxy does not read: the session refuses the connection
        except ProtocolViolation:
            (length,) = struct.unpack_from("!i", buf, 0)
            assert length < 8 or length > 10000
            return
    consumed = sum(8 + len(p.payload) for p in packets)
    assert bytes(buf) == stream[consumed:]


def test_a_bind_before_startup_is_an_invalid_startup_length():
    # What the proxy reads first is a startup packet: a typed message there has a length
    # made of its type byte and the top of its length field.
    for first in (msg(b"B", b"\x00\x00\x00\x00\x00\x00\x00"), msg(b"Q", b"SELECT 1\x00"), msg(b"X")):
        buf = bytearray(first + b"\x00" * 8)
        try:
            codec.split_startup_packet(buf)
        except ProtocolViolation as exc:
            assert exc.sqlstate == "08P01"
        else:
            raise AssertionError(f"{first!r} accepted as a startup packet")


# --- the compiled framing loop (proxy/wire/_scan.c) against the Python one ----------------------------


def test_the_compiled_framing_loop_is_built_where_a_compiler_is():
    # setup.py builds it as optional: a failed build would pass unnoticed without this.
    import shutil
    import sysconfig
    from pathlib import Path

    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    if shutil.which("cc") and headers and not os.environ.get("PURPOSE_PROXY_NO_EXTENSIONS"):
        assert codec.COMPILED_SPLIT is not None, "proxy/wire/_scan.c was not built (pip install -e . builds it)"


tables = st.one_of(inspect_sets.map(codec._table), st.binary(min_size=256, max_size=256))


@FUZZ
@given(st.one_of(streams, st.binary(max_size=300)), st.integers(0, 400), tables,
       st.sampled_from([0, 3, 4, 5, 64, 1024, 0x7FFFFFFF]))
@example(msg(b"Q", b"x" * 10), 0, codec._table(frozenset({ord("Q")})), 14)  # exactly at the limit
@example(b"Q\xff\xff\xff\xffx", 0, bytes(256), 0x7FFFFFFF)  # a "negative" length
@example(b"Q\x80\x00\x00\x00", 0, bytes(256), 0x7FFFFFFF)
def test_compiled_and_python_framing_loops_agree(data, pos, table, max_size):
    compiled = codec.COMPILED_SPLIT
    if compiled is None:  # the test above checks that this happens only without a C compiler
        pytest.skip("the compiled framing loop is not built here")
    pos = min(pos, len(data))
    assert compiled(data, pos, table, max_size, codec.Frame) == codec.split_messages(data, pos, table, max_size,
                                                                                     codec.Frame)
