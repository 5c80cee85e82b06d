"""Property-based fuzzing of the relay state machine in both directions: random, mutated and out-of-order messages, any
chunking, and the regressions the fuzzers found."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.policy.decision import ALLOW, Block
from proxy.wire import codec
from proxy.wire.state import Phase
from tests.support.fuzzing import (
    CLIENT_VOCABULARY, COPY_DONE, FLUSH, LOGIN, ROW_DESCRIPTION, SERVER_VOCABULARY, SYNC, TERMINATE,
    RecordingDecider, bind, check_conversation, check_run, check_script, close, command_complete, compare_runs,
    converse, data_row, describe, error, execute, function_call, marker, msg, mutate, parse, query, ready, run_script,
    split_messages, whole,
)

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

mutations = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 1 << 16), st.integers(0, 255),
                               st.binary(max_size=6)), max_size=2)
generic = st.builds(msg, st.sampled_from(b"QPBEDCSHXFdcfpRKZTNGWAIV?\x00").map(lambda b: bytes([b])),
                    st.binary(max_size=24))


def _mutated(messages: list[bytes], muts) -> bytes:
    data = b"".join(messages)
    for op, pos, arg, extra in muts:
        data = mutate(data, op, pos, arg, extra)
    return data


client_step = st.builds(_mutated, st.lists(st.sampled_from(CLIENT_VOCABULARY) | generic, min_size=1, max_size=8),
                        st.one_of(st.just([]), mutations))
server_step = st.builds(_mutated, st.lists(st.sampled_from(SERVER_VOCABULARY) | generic | st.just(LOGIN),
                                           min_size=1, max_size=8),
                        st.one_of(st.just([]), mutations))
scripts = st.tuples(st.booleans(), st.lists(st.one_of(st.tuples(st.just("c"), client_step),
                                                      st.tuples(st.just("s"), server_step)), max_size=7)
                    ).map(lambda t: ([("s", LOGIN)] if t[0] else []) + t[1])
cuts = st.lists(st.integers(0, 1 << 12), max_size=6)
configs = st.fixed_dictionaries({"observed": st.booleans(), "max_message_size": st.sampled_from([None, 48, 1 << 20]),
                                 "key_mapper": st.booleans()})


def both_ways(script, cut, **config):
    return check_script(script, cut, **config)


@FUZZ
@given(scripts, cuts, configs)
def test_random_scripts_in_both_directions_keep_the_invariants_however_cut(script, cut, config):
    both_ways(script, cut, **config)


conversation = st.lists(st.builds(_mutated, st.lists(st.sampled_from(CLIENT_VOCABULARY), min_size=1, max_size=6),
                                  st.one_of(st.just([]), st.just([]), mutations)), min_size=1, max_size=6)


@FUZZ
@given(conversation, cuts, cuts, st.booleans())
def test_conversations_with_a_simulated_backend(steps, cut, server_cut, observed):
    check_conversation(steps, cut, server_cut, observed=observed)


# A session with every kind of traffic: simple and extended queries, a refusal of each
# kind, a mask, a purpose change, a Bind after it, COPY both ways, a FunctionCall.
SESSION = [
    query("SELECT 1") + query("SELECT refuse"),
    parse("s1", "SELECT mask FROM t") + bind("", "s1") + describe(b"P") + execute() + SYNC,
    parse("", "SELECT refuse") + bind() + execute() + SYNC + parse("s2", "SELECT 1") + SYNC,
    query("BEGIN") + query("SELECT refuse") + query("ROLLBACK"),
    query("SET pii.purpose = 'x'") + bind("", "s2") + execute() + SYNC + bind("", "s1") + execute() + SYNC,
    query("COPY t FROM STDIN"),
    msg(b"d", b"1\n") + COPY_DONE,
    query("COPY t TO STDOUT") + function_call(1) + close(b"S", "s1") + FLUSH + SYNC,
    query(b"SELECT '\xff' mask") + query(b"SELECT '\xfe' refuse"),
    TERMINATE,
]


@pytest.mark.parametrize("observed", [True, False])
def test_every_split_point_of_a_whole_session_gives_the_same_result(observed):
    ref, ref_decider = converse(SESSION, whole, observed=observed)
    check_run(ref, ref_decider, conversation=True)
    assert ref.violation is None and ref.stopped_at == len(SESSION) - 1
    assert [c[1] for c in ref_decider.calls].count("function_call") == 1
    for step in range(len(SESSION)):
        for cut in range(1, len(SESSION[step])):
            chunker = lambda data, s=step, c=cut: [data[:c], data[c:]] if data is SESSION[s] else [data]  # noqa: E731
            run, decider = converse(SESSION, chunker, observed=observed)
            check_run(run, decider, conversation=True)
            compare_runs(ref, run)


# --- messages in the wrong state -----------------------------------------------------------------

WRONG_STATE = {
    "bind and execute during authentication": [("c", bind("", "s1") + execute() + SYNC), ("s", LOGIN)],
    "query during authentication": [("c", query("SELECT refuse")), ("s", LOGIN + error("42601", "x") + ready())],
    "copy data outside copy": [("s", LOGIN), ("c", msg(b"d", b"x") + COPY_DONE + msg(b"f", b"no\x00"))],
    "execute without parse": [("s", LOGIN), ("c", execute("nope") + SYNC), ("s", error("34000", "x") + ready())],
    "sync storm": [("s", LOGIN), ("c", SYNC * 50), ("s", ready() * 60)],
    "ready for query never asked for": [("s", LOGIN + ready(b"T") * 3 + ready(b"E") + ready(b"I"))],
    "copy done without copy": [("s", LOGIN + COPY_DONE + msg(b"d", b"x") + COPY_DONE)],
    "copy in response when idle, then a query": [("s", LOGIN + msg(b"G", b"\x00\x00\x00")),
                                                 ("c", query("SELECT refuse") + SYNC)],
    "data rows during authentication": [("s", ROW_DESCRIPTION + data_row(b"x") + command_complete("SELECT 1"))],
    "authentication after login": [("s", LOGIN), ("c", query("SELECT 1")), ("s", LOGIN + LOGIN)],
    "error for a refusal never made": [("s", LOGIN), ("c", query("SELECT 1")),
                                       ("s", error("42601", f'syntax error at or near "{marker(7)}"') + ready())],
    "refusal answered twice": [("s", LOGIN), ("c", query("SELECT refuse")),
                               ("s", (error("42601", f'syntax error at or near "{marker(1)}"') + ready()) * 2)],
    "terminate then more": [("s", LOGIN), ("c", TERMINATE + query("SELECT 1") + parse("", "SELECT refuse"))],
    "unknown client message type": [("s", LOGIN), ("c", msg(b"?", b"x") + query("SELECT 1"))],
    "unknown server message type": [("s", LOGIN + msg(b"?", b"x") + msg(b"\xff"))],
    "truncated query then garbage": [("s", LOGIN), ("c", query("SELECT 1")[:7] + b"\xff" * 8)],
    "negative length": [("s", LOGIN), ("c", b"Q" + struct.pack("!i", -5))],
    "huge server length": [("s", LOGIN + b"D" + struct.pack("!i", 2**31 - 1) + b"x" * 10)],
    "malformed close": [("s", LOGIN), ("c", msg(b"C", b"Sno-terminator"))],
    "malformed function call": [("s", LOGIN), ("c", msg(b"F", b"\x00"))],
    "bind of an unknown statement after a purpose change": [
        ("s", LOGIN), ("c", query("SET pii.purpose = 'x'") + bind("", "never") + execute() + SYNC)],
}


@pytest.mark.parametrize("name", list(WRONG_STATE))
def test_messages_in_the_wrong_state(name):
    script = WRONG_STATE[name]
    run = both_ways(script, [3, 11, 40])
    for cut in range(1, 12):
        both_ways(script, [cut])
    if run.violation is not None:
        assert run.phase is Phase.FAILED


# --- regressions ---------------------------------------------------------------------------------


class PurposeLike:
    """Allows ``SELECT secret`` under the first purpose only; a SET moves the epoch."""

    def __init__(self) -> None:
        self.epoch = 0
        self.calls: list[tuple[str, str]] = []

    def decide(self, sql: str, via: str):
        self.calls.append((sql, via))
        if sql.startswith("SET"):
            self.epoch += 1
            return ALLOW
        return Block("not under this purpose") if self.epoch and "secret" in sql else ALLOW


@pytest.mark.parametrize("one_read", [True, False])
def test_bind_pipelined_behind_a_purpose_change_is_decided_again(one_read):
    """Found by the split-point fuzzing: a Bind that arrived in the same read as the SET that
    moved the epoch went upstream undecided, so a statement prepared under one purpose ran
    under another. The rest of that read is now framed again with Bind inspected."""
    from tests.unit.test_codec import authenticated_relay

    d = PurposeLike()
    relay = authenticated_relay(d)
    relay.client_data(parse("s1", "SELECT secret") + SYNC)
    relay.server_data(msg(b"1") + ready())
    relay.to_server.clear()
    change = query("SET pii.purpose = 'other'")
    rest = bind("", "s1") + execute() + SYNC
    if one_read:
        relay.client_data(change + rest)
    else:
        relay.client_data(change)
        relay.client_data(rest)
    upstream = b"".join(relay.to_server)
    assert d.calls[-1] == ("SELECT secret", "parse")  # decided again at the Bind
    assert bind("", "s1") not in upstream  # the Bind did not run
    assert upstream.endswith(SYNC) and b"purpose_proxy_refused_" in upstream
    assert execute() not in upstream  # dropped with the refused Bind, until the Sync


def test_rest_of_a_read_is_framed_again_whatever_it_holds():
    """The read that moves the epoch ends in a partial opaque message and a partial Bind."""
    from tests.unit.test_codec import authenticated_relay

    d = PurposeLike()
    relay = authenticated_relay(d)
    relay.client_data(parse("s1", "SELECT secret") + parse("s2", "SELECT 1") + SYNC)
    relay.server_data(msg(b"1") * 2 + ready())
    relay.to_server.clear()
    big = msg(b"d", b"x" * 100)
    stream = query("SET pii.purpose = 'other'") + big + bind("", "s2") + execute() + SYNC + bind("", "s1") + SYNC
    cut = len(stream) - 8  # inside the last Bind
    relay.client_data(stream[:cut])
    relay.client_data(stream[cut:])
    upstream = b"".join(relay.to_server)
    assert [c for c in d.calls[2:]] == [("SET pii.purpose = 'other'", "query"), ("SELECT 1", "parse"),
                                       ("SELECT secret", "parse")]
    assert upstream.startswith(query("SET pii.purpose = 'other'") + big + bind("", "s2") + execute() + SYNC)
    assert bind("", "s1") not in upstream


def test_a_fatal_decision_lets_nothing_after_it_upstream():
    """Found by the chunking comparison: after a FATAL refusal the rest of the same read
    still went upstream (decided, but on a session that was being closed)."""
    run, decider = run_script([("s", LOGIN), ("c", query("SELECT 1") + query("SELECT fatal") + query("SELECT 2")
                                                   + bind() + execute() + SYNC)])
    check_run(run, decider)
    assert run.phase is Phase.FAILED and [c[0] for c in decider.calls] == ["SELECT 1", "SELECT fatal"]
    assert run.to_server.endswith(query("SELECT 1"))
    fields = codec.parse_error_fields(split_messages(run.to_client)[0][-1][5:])
    assert (fields["S"], fields["C"]) == ("FATAL", "42501")


@pytest.mark.parametrize("sql", [b"SELECT '\xff' AS mask", b"SELECT '\xff' AS refuse", b"SELECT \xc3 boom"])
def test_statements_that_are_not_utf8_are_masked_or_refused_without_a_crash(sql):
    """Found by the SQL fuzzer: a rewrite or a refusal message holding bytes that are not
    UTF-8 raised UnicodeEncodeError in the codec, which escaped the relay and dropped the
    session without an answer. The rewrite now carries the client's own bytes (PostgreSQL
    then judges the encoding), and error texts are valid UTF-8."""
    steps = [query(sql), parse("n", sql) + bind("", "n") + execute() + SYNC]
    run, decider = converse(steps)
    check_run(run, decider, conversation=True)
    assert run.violation is None and run.phase is Phase.IDLE
    messages, _ = split_messages(run.to_client)
    for m in messages:
        if m[:1] == b"E":
            m[5:].decode("utf-8")
    if b"mask" in sql:
        assert query(b"/* masked */ " + sql) in run.to_server


@pytest.mark.parametrize("bad", [msg(b"R", b""), msg(b"R", b"\x00\x00"), msg(b"S", b"no terminator"),
                                 msg(b"S", b"one\x00"), msg(b"K", b"ab")])
def test_malformed_backend_messages_are_a_protocol_violation(bad):
    """Found by the codec fuzzer: a short Authentication or a ParameterStatus without its
    terminators raised struct.error/ValueError out of the relay; now 08P01 for the session."""
    run, decider = run_script([("c", query("SELECT 1")), ("s", bad)])
    check_run(run, decider)
    assert run.violation is not None and run.violation[1] == "s"
    fields = codec.parse_error_fields(run.fatal_injected[5:])
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")


def test_sasl_mechanism_names_that_are_not_utf8_pass():
    sasl = msg(b"R", struct.pack("!i", 10) + b"\xff-PLUS\x00SCRAM-SHA-256\x00\x00")
    run, _ = run_script([("s", sasl)])
    assert run.violation is None
    assert run.to_client == msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\x00\x00")


def test_upstream_violation_mid_message_injects_no_fatal_into_it():
    """Found by the codec fuzzer: after a bad header in the same read as the end of a
    streamed DataRow, the scanner said it was at a message boundary, and the FATAL went
    into the middle of the row. Now it is not sent when the client stream is mid-message."""
    row = data_row(b"x" * 100)
    script = [("s", LOGIN), ("c", query("SELECT 1")), ("s", row[:40]), ("s", row[40:] + b"Z\xff\xff\xff\xff")]
    run, decider = run_script(script)
    check_run(run, decider)
    assert run.violation is not None and run.fatal_injected is None
    _, rest = split_messages(run.to_client)
    assert rest == row[:40]
    both_ways(script, [1, 50, 70])


def test_recording_decider_sees_every_statement_in_order():
    run, decider = run_script([("s", LOGIN), ("c", query("SELECT 1") + parse("a", "SELECT mask FROM t") + SYNC
                                                   + function_call(7) + query("SELECT boom"))])
    check_run(run, decider)
    assert [(c[0], c[1]) for c in decider.calls] == [
        ("SELECT 1", "query"), ("SELECT mask FROM t", "parse"), ("-- FunctionCall of function oid 7", "function_call"),
        ("SELECT boom", "query")]
    assert isinstance(RecordingDecider().decide("SELECT refuse", "query"), Block)


@pytest.mark.parametrize("copy_response", [msg(b"H", b"\x00\x00\x00"), msg(b"G", b"\x00\x00\x00"),
                                           msg(b"W", b"\x00\x00\x00")])
def test_a_copy_starting_while_a_batch_is_dropped_cannot_smuggle_the_rest_of_a_message(copy_response):
    """Found by the atheris fuzzer (an uninspected Parse upstream): while a refused batch was being
    dropped, the head of a message was dropped; a CopyOutResponse (of a COPY sent before the batch)
    then ended DISCARDING and the rest of that message went upstream, where PostgreSQL read it as
    messages of their own: a Sync and a Query nobody had decided. Now only the client's Sync ends
    DISCARDING, so a message is dropped or forwarded whole."""
    smuggled = SYNC + query("SELECT secret")
    script = [("s", LOGIN),
              ("c", query("COPY (SELECT 1) TO STDOUT") + parse("", "SELECT refuse")
               + b"d" + struct.pack("!i", 4 + len(smuggled))),
              ("s", copy_response + msg(b"d", b"1\n")),
              ("c", smuggled + SYNC),
              ("s", COPY_DONE + command_complete("COPY 1") + ready()
               + error("42601", f'syntax error at or near "{marker(1)}"') + ready())]
    run, decider = run_script(script)
    check_run(run, decider)
    assert query("SELECT secret") not in run.to_server
    assert run.to_server.endswith(SYNC) and run.to_server.count(SYNC) == 1
    assert [c[0] for c in decider.calls] == ["COPY (SELECT 1) TO STDOUT", "SELECT refuse"]
    for cut in range(1, 20):
        check_script(script, [cut])
