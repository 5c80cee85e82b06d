"""Fuzzed and malformed protocol input through the real proxy and a real PostgreSQL: refused with 08P01 for that
session only, never a hang, and the bypass the fuzzers found stays closed."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import fuzzing as fz
from tests.support.enforce import CANARIES
from tests.support.rawpg import RawConnection, error_fields

pytestmark = pytest.mark.integration

READ_TIMEOUT = 15.0


def read_all(sock: socket.socket, whole: bool = True) -> list[tuple[bytes, bytes]]:
    """Every message until the proxy closes the connection (a hang fails on the socket timeout);
    ``whole``: the stream must end on a message boundary."""
    sock.settimeout(READ_TIMEOUT)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    messages, rest = fz.split_messages(bytes(data))
    assert rest == b"" or not whole, f"the stream to the client ends mid-message: {rest[:40]!r}"
    return [(m[:1], m[5:]) for m in messages]


def raw_session(proxy, purpose: str = "marketing") -> RawConnection:
    return RawConnection(proxy.host, proxy.port, "trustuser", "app", timeout=READ_TIMEOUT, **{"pii.purpose": purpose})


def test_bind_pipelined_behind_a_purpose_change_is_decided_again(pg, enforce_proxy):
    """A statement prepared under billing, bound in the same write as the SET that changes the
    purpose to marketing: the Bind is decided again (and refused), no card number comes back."""
    with raw_session(enforce_proxy, "billing") as raw:
        raw.send(fz.parse("s1", "SELECT card_number FROM billing.cards ORDER BY card_id") + fz.SYNC)
        assert [t for t, _ in (raw.read_message(), raw.read_message())] == [b"1", b"Z"]
        raw.send(fz.query("SET pii.purpose = 'marketing'") + fz.bind("", "s1") + fz.execute() + fz.SYNC)
        messages = []
        while sum(t == b"Z" for t, _ in messages) < 2:
            messages.append(raw.read_message())
        rows = b"".join(body for t, body in messages if t == b"D").decode("utf-8", "replace")
        assert not CANARIES["payment.card"].search(rows), f"BYPASS: {rows[:200]!r}"
        errors = [error_fields(body) for t, body in messages if t == b"E"]
        assert len(errors) == 1 and errors[0]["C"] == "42501" and "F" not in errors[0], errors  # the proxy's
        assert "payment.card" in errors[0]["M"]
        assert raw.simple_query("SHOW pii.purpose")[1][1].startswith(b"\x00\x01\x00\x00\x00\tmarketing")


def test_a_copy_cannot_carry_an_undecided_statement_past_a_refused_batch(pg, enforce_proxy):
    """A long COPY TO STDOUT, a refused Parse, then a CopyData header whose body is sent once the
    COPY has started: the body (a Sync and a Query of card numbers) must be dropped with the
    refused batch, not reach PostgreSQL as messages of their own."""
    secret = "SELECT card_number FROM billing.cards"
    smuggled = fz.SYNC + fz.query(secret)
    with raw_session(enforce_proxy, "marketing") as raw:
        raw.send(fz.query("COPY (SELECT g FROM generate_series(1, 200000) g) TO STDOUT") + fz.parse("", secret)
                 + b"d" + struct.pack("!i", 4 + len(smuggled)))
        messages = [raw.read_message()]
        while messages[-1][0] != b"H":  # the COPY has started
            messages.append(raw.read_message())
        raw.send(smuggled + fz.SYNC + fz.query("SELECT 'end'"))
        while messages[-1] != (b"Z", b"I") or not any(t == b"D" and b"end" in body for t, body in messages):
            messages.append(raw.read_message())
    rows = b"".join(body for t, body in messages if t == b"D").decode("utf-8", "replace")
    assert not CANARIES["payment.card"].search(rows), f"BYPASS: {rows[:200]!r}"
    errors = [error_fields(body) for t, body in messages if t == b"E"]
    assert [(e["C"], "F" in e) for e in errors] == [("42501", False)], errors  # the refused Parse, by the proxy
    assert sum(t == b"Z" for t, _ in messages) == 3  # the COPY, the refused batch's Sync, the last query


@pytest.mark.parametrize("tail", [
    b"Q" + struct.pack("!i", -1),  # a negative length
    b"Q" + struct.pack("!i", 3),  # shorter than the length field itself
    b"P\x00\x00\x00\x06\x00\x00",  # a Parse without its parameter count
    b"P\x00\x00\x00\x09\x00x\x00\x00\x05",  # a Parse announcing more parameter types than it has
    b"C\x00\x00\x00\x06Sx",  # a Close without its terminator
    b"GET / HTTP/1.1\r\n\r\n",  # not the protocol at all
])
def test_a_malformed_message_ends_that_session_with_08P01(pg, enforce_proxy, tail):
    with raw_session(enforce_proxy) as bystander, raw_session(enforce_proxy) as victim:
        assert victim.simple_query("SELECT 1")[-1] == (b"Z", b"I")
        victim.send(tail)
        messages = read_all(victim.sock)
        assert [t for t, _ in messages] == [b"E"]  # one FATAL error, then the end of the session
        fatal = error_fields(messages[-1][1])
        assert (fatal["S"], fatal["C"]) == ("FATAL", "08P01") and "F" not in fatal, fatal
        assert bystander.simple_query("SELECT 1")[-1] == (b"Z", b"I")
    assert enforce_proxy.proc.poll() is None


@pytest.mark.parametrize("first", [fz.bind("", "s1") + fz.execute() + fz.SYNC, fz.query("SELECT 1"), fz.TERMINATE])
def test_a_typed_message_before_startup_is_an_invalid_startup_packet(pg, enforce_proxy, first):
    with socket.create_connection((enforce_proxy.host, enforce_proxy.port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(first + b"\x00" * 16)
        messages = read_all(sock)
    fatal = error_fields(messages[-1][1])
    assert (fatal["S"], fatal["C"]) == ("FATAL", "08P01") and "startup packet" in fatal["M"], fatal


client_stream = st.builds(
    lambda messages, muts: _mutated(b"".join(messages), muts),
    st.lists(st.sampled_from(fz.CLIENT_VOCABULARY), min_size=1, max_size=10),
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1 << 12), st.integers(0, 255), st.binary(max_size=6)),
             max_size=3))


def _mutated(data: bytes, muts) -> bytes:
    for op, pos, arg, extra in muts:
        data = fz.mutate(data, op, pos, arg, extra)
    return data


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(client_stream)
def test_random_client_streams_through_the_real_proxy(pg, enforce_proxy, stream):
    """Whatever a client sends after startup, its session ends when it closes its side (no hang),
    a FATAL error it gets is a protocol violation (the proxy's or PostgreSQL's), and other
    sessions go on."""
    victim = raw_session(enforce_proxy)
    try:
        victim.sock.sendall(stream)
        victim.sock.shutdown(socket.SHUT_WR)  # then wait for the end of the session
        messages = read_all(victim.sock, whole=False)
    finally:
        victim.sock.close()
    for t, body in messages:
        if t == b"E" and error_fields(body)["S"] == "FATAL":
            assert error_fields(body)["C"] == "08P01", error_fields(body)
    with raw_session(enforce_proxy) as bystander:
        assert bystander.simple_query("SELECT 1")[-1] == (b"Z", b"I")
    assert enforce_proxy.proc.poll() is None
