"""The relay's statement events: completed at their ReadyForQuery, in order, with rows and errors (pipelining included)."""

from __future__ import annotations

from proxy.policy.decision import ALLOW, Block
from proxy.wire import codec
from proxy.wire.relay import StatementEvent, row_count
from proxy.wire.state import Phase
from tests.unit.test_codec import (
    REFUSAL,
    Decider,
    authenticated_relay,
    bind,
    command_complete,
    data_row,
    execute,
    msg,
    pg_error,
    pg_syntax_error,
    ready,
    sent,
    sync,
)

ROWDESC = msg(b"T", b"\x00\x01a\x00" + b"\x00" * 18)
PARSE_COMPLETE = msg(b"1")
BIND_COMPLETE = msg(b"2")


def answer(rows: int, tag: str | None = None, status: bytes = b"I") -> bytes:
    return (ROWDESC + b"".join(data_row(str(i).encode()) for i in range(rows))
            + command_complete(tag or f"SELECT {rows}") + ready(status))


def marker_of(relay) -> bytes:
    """The marker of the refusal the relay is waiting for (the stand-in PostgreSQL will reject)."""
    return next(iter(relay._refusals))


def test_event_completes_at_ready_for_query_with_rows_and_times():
    relay = authenticated_relay()
    relay.client_data(codec.query("SELECT a FROM t"))
    assert relay.events == []  # decided, not answered yet
    relay.server_data(answer(3)[:-6])
    assert relay.events == []  # CommandComplete seen, ReadyForQuery not yet
    relay.server_data(ready(b"I"))
    (ev,) = relay.events
    assert (ev.via, ev.sql, ev.decision, ev.rows, ev.error) == ("query", "SELECT a FROM t", ALLOW, 3, None)
    assert ev.started > 0 and ev.seconds >= 0 and ev.finished >= ev.started + ev.seconds


def test_multi_statement_query_sums_its_row_counts():
    relay = authenticated_relay()
    relay.client_data(codec.query("INSERT INTO t VALUES (1), (2); UPDATE t SET a = 1; SET x = 1"))
    relay.server_data(command_complete("INSERT 0 2") + command_complete("UPDATE 5") + command_complete("SET")
                      + ready(b"I"))
    (ev,) = relay.events
    assert ev.rows == 7


def test_command_without_count_has_no_rows():
    relay = authenticated_relay()
    relay.client_data(codec.query("BEGIN"))
    relay.server_data(command_complete("BEGIN") + ready(b"T"))
    assert relay.events[0].rows is None and relay.events[0].finished is not None


def test_pipelined_queries_complete_in_order_with_their_own_rows():
    relay = authenticated_relay()
    relay.client_data(codec.query("SELECT 1") + codec.query("SELECT 2") + codec.query("SELECT 3"))
    stream = answer(1) + answer(2) + answer(0)
    for i in range(0, len(stream), 7):  # answers arrive in arbitrary pieces
        relay.server_data(stream[i:i + 7])
    assert [(e.sql, e.rows) for e in relay.events] == [("SELECT 1", 1), ("SELECT 2", 2), ("SELECT 3", 0)]
    assert relay.events[0].finished <= relay.events[1].finished <= relay.events[2].finished


def test_extended_batches_pipelined_behind_one_another():
    relay = authenticated_relay()
    batch = lambda sql: codec.encode_parse("", sql) + bind() + execute() + sync()  # noqa: E731
    relay.client_data(batch("SELECT a FROM t") + batch("DELETE FROM t"))
    relay.server_data(PARSE_COMPLETE + BIND_COMPLETE + data_row(b"1") + data_row(b"2") + command_complete("SELECT 2")
                      + ready(b"I"))
    assert [(e.via, e.sql, e.rows) for e in relay.events] == [("parse", "SELECT a FROM t", 2)]
    relay.server_data(PARSE_COMPLETE + BIND_COMPLETE + command_complete("DELETE 4") + ready(b"I"))
    assert [(e.sql, e.rows) for e in relay.events] == [("SELECT a FROM t", 2), ("DELETE FROM t", 4)]


def test_several_statements_in_one_extended_batch_get_completions_in_order():
    relay = authenticated_relay()
    relay.client_data(codec.encode_parse("a", "SELECT 1") + bind("", "a") + execute()
                      + codec.encode_parse("b", "SELECT 2") + bind("", "b") + execute() + sync())
    relay.server_data(PARSE_COMPLETE + BIND_COMPLETE + data_row(b"1") + command_complete("SELECT 1")
                      + PARSE_COMPLETE + BIND_COMPLETE + data_row(b"2") + data_row(b"2") + command_complete("SELECT 2")
                      + ready(b"I"))
    assert [(e.sql, e.rows) for e in relay.events] == [("SELECT 1", 1), ("SELECT 2", 2)]


def test_prepare_only_batch_then_bind_execute_batch():
    """A statement only prepared in its batch (asyncpg) completes with no rows; each later run is an event of its own,
    with the decision and account of its Parse and its own rows."""
    relay = authenticated_relay()
    relay.client_data(codec.encode_parse("s1", "SELECT a FROM t") + sync())
    relay.server_data(PARSE_COMPLETE + ready(b"I"))
    (parsed,) = relay.events
    assert (parsed.via, parsed.sql, parsed.rows) == ("parse", "SELECT a FROM t", None)
    for rows in (1, 3):
        relay.events.clear()
        relay.client_data(bind("", "s1") + execute() + sync())
        relay.server_data(BIND_COMPLETE + b"".join(data_row(b"1") for _ in range(rows))
                          + command_complete(f"SELECT {rows}") + ready(b"I"))
        (run,) = relay.events
        assert (run.via, run.sql, run.rows, run.decision, run.seconds) == ("execute", "SELECT a FROM t", rows,
                                                                          parsed.decision, 0.0)
        assert run.finished is not None and run.detail is parsed.detail


def test_runs_get_their_own_rows_in_a_pipeline():
    """Parse+Bind+Execute is one event (the Parse's); further Executes of the statement, in the same batch or later
    ones, are runs with their own counts, in order; a prepare-only Parse in the same batch takes none of them."""
    relay = authenticated_relay()
    relay.client_data(codec.encode_parse("a", "SELECT 1") + codec.encode_parse("b", "SELECT 2")
                      + bind("", "b") + execute() + bind("p", "b") + execute("p") + execute("nosuch") + sync()
                      + bind("", "b") + execute() + sync())
    relay.server_data(PARSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + data_row(b"2") + command_complete("SELECT 1")
                      + BIND_COMPLETE + data_row(b"2") + data_row(b"2") + command_complete("SELECT 2")
                      + pg_error("34000", 'portal "nosuch" does not exist') + ready(b"I")
                      + BIND_COMPLETE + command_complete("SELECT 0") + ready(b"I"))
    assert [(e.via, e.sql, e.rows, e.error is not None) for e in relay.events] == [
        ("parse", "SELECT 1", None, True), ("parse", "SELECT 2", 1, False), ("execute", "SELECT 2", 2, False),
        ("execute", "SELECT 2", 0, False)]


def test_a_run_ended_without_a_count_takes_its_turn():
    """PortalSuspended (a row limit) and EmptyQueryResponse end a run without a count: the next run keeps its own."""
    relay = authenticated_relay()
    relay.client_data(codec.encode_parse("s", "SELECT a FROM t") + sync())
    relay.server_data(PARSE_COMPLETE + ready(b"I"))
    relay.events.clear()
    relay.client_data(bind("p", "s") + execute("p", 1) + execute("p") + sync())
    relay.server_data(BIND_COMPLETE + data_row(b"1") + msg(b"s") + data_row(b"2") + command_complete("SELECT 1")
                      + ready(b"I"))
    assert [(e.via, e.rows) for e in relay.events] == [("execute", None), ("execute", 1)]


def test_an_unobserved_relay_frames_no_execute():
    relay = authenticated_relay(observed=False)
    data = codec.encode_parse("s", "SELECT 1") + bind("", "s") + execute() + sync()
    assert [type(i) for i in relay._client.feed(data)] == [codec.Frame, bytes, codec.Frame]


def test_refused_query_carries_the_refusal_the_client_got():
    relay = authenticated_relay(Decider({"SELECT secret": REFUSAL}))
    relay.client_data(codec.query("SELECT secret"))
    stand_in = sent(relay.to_server)
    assert stand_in != codec.query("SELECT secret")
    relay.server_data(pg_syntax_error(marker_of(relay).decode()) + ready(b"I"))
    (ev,) = relay.events
    assert ev.decision is REFUSAL and ev.rows is None
    assert codec.parse_error_fields(ev.error[5:])["M"] == REFUSAL.message  # the swapped error, not the stand-in


def test_refused_parse_in_a_pipeline_does_not_shift_later_statements():
    relay = authenticated_relay(Decider({"SELECT secret": REFUSAL}))
    relay.client_data(codec.encode_parse("", "SELECT secret") + bind() + execute() + sync()
                      + codec.query("SELECT ok"))
    assert relay.phase is Phase.SIMPLE_QUERY or relay.phase is Phase.DISCARDING
    relay.server_data(pg_syntax_error(marker_of(relay).decode()) + ready(b"I") + answer(2))
    assert [(e.sql, e.rows, e.error is not None) for e in relay.events] == [
        ("SELECT secret", None, True), ("SELECT ok", 2, False)]


def test_postgres_error_is_attributed_to_its_statement():
    relay = authenticated_relay()
    relay.client_data(codec.query("SELECT 1/0") + codec.query("SELECT 1"))
    relay.server_data(pg_error("22012", "division by zero") + ready(b"I") + answer(1))
    first, second = relay.events
    assert codec.parse_error_fields(first.error[5:])["C"] == "22012" and second.error is None


def test_unfinished_takes_what_is_still_in_flight():
    relay = authenticated_relay()
    relay.client_data(codec.query("SELECT pg_sleep(10)") + codec.encode_parse("", "SELECT 2"))
    assert relay.events == []
    left = relay.unfinished()
    assert [(e.sql, e.finished) for e in left] == [("SELECT pg_sleep(10)", None), ("SELECT 2", None)]
    assert relay.unfinished() == []
    relay.server_data(ready(b"I"))  # a late answer finds nothing to complete
    assert relay.events == []


def test_fatal_decision_is_an_event_at_once():
    fatal = Block("go away", severity="FATAL", reason="test")
    relay = authenticated_relay(Decider({"SELECT 1": fatal}))
    relay.client_data(codec.query("SELECT 1"))
    (ev,) = relay.events
    assert ev.decision is fatal and ev.finished is not None and relay.close_after_flush


class Explaining:
    """A decider that keeps an account of its latest decision and its stage timings."""

    def __init__(self) -> None:
        self.last = None
        self.timings = ()
        self.n = 0

    def decide(self, sql: str, via: str):
        self.n += 1
        self.last = ("account", self.n)
        self.timings = (("analysis", 0.001 * self.n), ("policy", 0.002))
        return ALLOW


def test_decider_account_and_timings_are_captured_per_statement():
    relay = authenticated_relay(Explaining())
    relay.client_data(codec.query("SELECT 1") + codec.query("SELECT 2"))  # pipelined: both decided first
    relay.server_data(answer(1) + answer(1))
    assert [e.detail for e in relay.events] == [("account", 1), ("account", 2)]
    assert [e.stages for e in relay.events] == [(("analysis", 0.001), ("policy", 0.002)),
                                                (("analysis", 0.002), ("policy", 0.002))]


def test_row_count_and_event_rows():
    assert row_count(command_complete("SELECT 5") + command_complete("COPY 3")) == 8
    assert row_count(command_complete("CREATE TABLE")) is None
    ev = StatementEvent("query", "x", ALLOW, 0.0)
    assert ev.rows is None


def test_an_unobserved_relay_keeps_no_events_and_streams_command_complete():
    from proxy.policy.decision import ALLOW
    from proxy.wire import codec
    from proxy.wire.relay import Relay
    from proxy.wire.state import Phase

    relay = Relay(lambda sql, via: ALLOW, observed=False)
    relay.phase = Phase.IDLE
    relay.client_data(codec.query("SELECT 1"))
    answer = codec.message(b"C", b"SELECT 1\x00") + codec.ready_for_query(b"I")
    relay.server_data(answer)
    assert relay.events == []
    assert b"".join(relay.to_client) == answer
    assert relay.phase is Phase.IDLE and relay.tx_status == b"I"


def test_a_malformed_bind_still_goes_to_postgresql_which_refuses_it():
    """Framing Bind to follow the runs must not make the proxy stricter than before: PostgreSQL answers it."""
    relay = authenticated_relay()
    relay.to_server.clear()
    bad = msg(b"B", b"portal-without-terminator")
    relay.client_data(bad + execute() + sync())
    assert sent(relay.to_server) == bad + execute() + sync()
    relay.server_data(pg_error("08P01", "invalid message format") + ready(b"I"))
    assert relay.events == [] and relay.phase is Phase.IDLE


def test_a_protocol_run_of_a_statement_of_sql_prepare_is_an_event_of_that_prepare():
    # PREPARE and Parse share PostgreSQL's namespace: a client may PREPARE in SQL and run the
    # statement with Bind/Execute. That run reads what the PREPARE was decided on; it is audited
    # as a run of it (its text, decision and account), with its own row count.
    from tests.unit.test_cache import CASES, _session

    s = _session(next(c for c in CASES if c["name"] == "partial keeps the first characters of a name"), 0)
    relay = authenticated_relay(s)
    s.attach(relay)
    prepare = "PREPARE members_by_id (int) AS SELECT name FROM crm.members WHERE member_id = $1"
    relay.client_data(codec.query(prepare))
    relay.server_data(command_complete("PREPARE") + ready())
    (prepared,) = relay.events
    assert prepared.detail is not None and prepared.detail.to_dict()["columns"]  # the PREPARE's account
    relay.events.clear()
    relay.client_data(bind("", "members_by_id") + execute() + sync())
    relay.server_data(BIND_COMPLETE + data_row(b"RA****") + data_row(b"SU****") + command_complete("SELECT 2")
                      + ready())
    (run,) = relay.events
    assert (run.via, run.sql, run.decision, run.rows, run.error) == ("execute", prepare, prepared.decision, 2, None)
    assert run.detail is prepared.detail
    # A name nobody prepared (PostgreSQL refuses its Bind): no event to make up.
    relay.events.clear()
    relay.client_data(bind("", "nobody") + execute() + sync())
    relay.server_data(pg_error("26000", 'prepared statement "nobody" does not exist') + ready())
    assert relay.events == []


def test_a_later_run_is_of_the_statement_postgresql_kept():
    """Of two Parses of one name PostgreSQL keeps the one that completed (ParseComplete): the first when the second
    failed (42P05), the second when the first failed. A hunt had runs of a card query audited as the failed text."""
    for first_fails in (True, False):
        relay = authenticated_relay()
        relay.client_data(codec.encode_parse("s", "SELECT 'a'::text + 1") + sync())
        relay.server_data((pg_error("42883", "operator does not exist") if first_fails else PARSE_COMPLETE)
                          + ready(b"I"))
        relay.client_data(codec.encode_parse("s", "SELECT a FROM t") + sync())
        relay.server_data((PARSE_COMPLETE if first_fails else pg_error("42P05", 'prepared statement "s" already exists'))
                          + ready(b"I"))
        relay.events.clear()
        relay.client_data(bind("", "s") + execute() + sync())
        relay.server_data(BIND_COMPLETE + data_row(b"1") + command_complete("SELECT 1") + ready(b"I"))
        (run,) = relay.events
        assert run.sql == ("SELECT a FROM t" if first_fails else "SELECT 'a'::text + 1")


def test_parses_after_an_error_in_their_batch_leave_no_statement():
    """An error skips the rest of the batch: Parses without a ParseComplete by its ReadyForQuery created nothing."""
    relay = authenticated_relay()
    relay.client_data(codec.encode_parse("a", "SELECT 1") + codec.encode_parse("b", "SELECT nope")
                      + codec.encode_parse("c", "SELECT 3") + sync() + codec.encode_parse("d", "SELECT 4") + sync())
    relay.server_data(PARSE_COMPLETE + pg_error("42703", 'column "nope" does not exist') + ready(b"I"))
    assert sorted(relay._statements) == ["a", "d"]  # d's batch is still to be answered
    relay.server_data(PARSE_COMPLETE + ready(b"I"))
    assert sorted(relay._statements) == ["a", "d"]


def test_messages_sent_after_the_last_sync_keep_the_session_busy():
    """The answer to a Sync does not make the session idle while extended messages sent after that Sync have yet to
    be answered (a hunt sent Sync, then BEGIN and DECLARE without one, and had a purpose change let through)."""
    relay = authenticated_relay()
    relay.client_data(sync() + codec.encode_parse("", "BEGIN") + bind("", "") + execute() + msg(b"H"))
    relay.server_data(ready(b"I"))  # the first Sync's answer
    assert relay.phase is Phase.EXTENDED and not relay.idle
    relay.client_data(codec.query("SET x = 1"))
    assert not relay.quiet
    relay.server_data(PARSE_COMPLETE + BIND_COMPLETE + command_complete("BEGIN") + command_complete("SET")
                      + ready(b"T"))
    assert relay.phase is Phase.IDLE and relay.tx_status == b"T"  # a Query's answer ends what came before it


def test_a_parse_beyond_the_tracked_many_without_a_sync_is_refused():
    """Hunt 21: past 4096 Parses without a Sync the relay stopped tracking them, and from then on the records of
    Parses that failed in PostgreSQL (42P05) grew without bound. Now such a Parse is refused (54000), the rest of
    its batch is discarded until the Sync, and tracking goes on."""
    from proxy.wire.relay import _MAX_PARSES

    relay = authenticated_relay()
    relay.client_data(b"".join(codec.encode_parse("", "SELECT 1") for _ in range(_MAX_PARSES)))
    assert b"54000" not in sent(relay.to_client)
    relay.client_data(codec.encode_parse("s", "SELECT 2") + bind("", "s") + execute() + sync())
    assert "s" not in relay._statements
    # (the refused Parse went upstream as a stand-in that fails at once: its error is the refusal's place)
    relay.server_data(PARSE_COMPLETE * _MAX_PARSES + pg_syntax_error(marker_of(relay).decode()) + ready(b"I"))
    answer = sent(relay.to_client)
    assert answer.count(PARSE_COMPLETE) == _MAX_PARSES and b"54000" in answer and answer.endswith(ready(b"I"))
    assert len(relay._parses) == 0 and relay.phase is Phase.IDLE
    for n in range(3):  # a named Parse PostgreSQL refuses leaves no record behind, batch after batch
        relay.client_data(codec.encode_parse("t", f"SELECT {n}") + sync())
        relay.server_data((PARSE_COMPLETE if n == 0 else pg_error("42P05", 'prepared statement "t" already exists'))
                          + ready(b"I"))
    assert [p.sql for p, *_ in relay._statements["t"]] == ["SELECT 0"]


def test_a_cleartext_password_request_is_not_relayed_from_a_plain_upstream_to_a_tls_client():
    """Hunt 23: a client with sslmode=verify-full to a proxy with client TLS required; a man in the middle answered
    the proxy's SSLRequest with N (upstream_tls = prefer) and asked for the password in clear: the proxy relayed
    the request and the client's password crossed the upstream leg unencrypted."""
    from proxy.wire.relay import Relay
    from tests.unit.test_codec import STARTUP

    cleartext = msg(b"R", codec.AUTH_CLEARTEXT_PASSWORD.to_bytes(4, "big"))
    for guarded in (False, True):
        relay = Relay(Decider())
        relay.plain_upstream_for_tls_client = guarded
        relay.start(STARTUP)
        relay.server_data(cleartext)
        answer = sent(relay.to_client)
        if guarded:
            assert answer.startswith(b"E") and b"28000" in answer and b"FATAL" in answer
            assert relay.phase is Phase.FAILED and sent(relay.to_server).endswith(codec.terminate())
        else:
            assert answer == cleartext  # the client asked for nothing, or its leg is not encrypted: as before
