"""A prepared statement is decided again at Bind once the decider's epoch moved."""

from proxy.policy.decision import ALLOW, Block
from proxy.wire import codec
from proxy.wire.relay import Relay
from proxy.wire.state import Phase


class Decider:
    """A decider whose answer and epoch the test sets (a purpose change, say)."""

    def __init__(self):
        self.epoch = 0
        self.answer = ALLOW
        self.seen = []

    def decide(self, sql, via):
        self.seen.append((sql, via))
        return self.answer


def ready_relay(decider):
    relay = Relay(decider)
    relay.phase = Phase.IDLE
    return relay


def execute(portal=""):
    return codec.message(b"E", codec.cstring(portal) + b"\x00\x00\x00\x00")


def sync():
    return codec.message(b"S", b"")


def test_bind_is_opaque_while_the_epoch_holds():
    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT 1", ()) + sync())
    r.to_server.clear()
    bind = codec.encode_bind("", "s1")
    r.client_data(bind + execute() + sync())
    assert b"".join(r.to_server) == bind + execute() + sync()
    assert d.seen == [("SELECT 1", "parse")]


def test_bind_after_epoch_change_with_same_decision_passes():
    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT 1", ()) + sync())
    d.epoch = 1
    r.client_data(codec.query("SET pii.purpose = 'x'"))  # any decision notices the epoch
    r.to_server.clear()
    bind = codec.encode_bind("", "s1")
    r.client_data(bind + execute() + sync())
    assert b"".join(r.to_server) == bind + execute() + sync()
    assert d.seen[-1] == ("SELECT 1", "parse")


def test_bind_after_epoch_change_to_block_is_refused_until_sync():
    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT secret FROM t", ()) + sync())
    d.epoch = 1
    d.answer = Block("purpose x may not read secret", detail="column t.secret")
    r.refresh_epoch()  # as the session does after a policy reload
    r.to_server.clear()
    r.client_data(codec.encode_bind("", "s1") + execute() + sync())
    sent = b"".join(r.to_server)
    marker = sent[sent.index(b"purpose_proxy_refused_"):].split(b"\x00")[0].decode()
    # The stand-in Bind, then only the Sync: the Execute was discarded.
    assert sent == codec.encode_bind("", marker) + sync()
    assert r.phase is Phase.EXTENDED  # Sync ended the discarding
    # PostgreSQL answers the stand-in Bind with 26000 naming it; the client sees the refusal.
    r.server_data(codec.error_response("26000", f'prepared statement "{marker}" does not exist')
                  + codec.ready_for_query(b"I"))
    out = b"".join(r.to_client)
    fields = codec.parse_error_fields(out[5:out.index(b"Z")])
    assert fields["C"] == "42501" and fields["M"] == "purpose x may not read secret"


def test_a_run_refused_at_its_bind_is_an_event_like_any_decision():
    """The audit log and the metrics hear of a refusal at Bind (after a purpose change or reload) too."""
    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT secret FROM t", ()) + sync())
    r.server_data(codec.message(b"1", b"") + codec.ready_for_query(b"I"))
    d.epoch = 1
    d.answer = Block("purpose x may not read secret", detail="column t.secret")
    r.refresh_epoch()
    r.events.clear()
    r.to_server.clear()
    r.client_data(codec.encode_bind("", "s1") + execute() + sync())
    sent = b"".join(r.to_server)
    marker = sent[sent.index(b"purpose_proxy_refused_"):].split(b"\x00")[0].decode()
    r.server_data(codec.error_response("26000", f'prepared statement "{marker}" does not exist')
                  + codec.ready_for_query(b"I"))
    (refused,) = r.events
    assert (refused.via, refused.sql, refused.decision) == ("bind", "SELECT secret FROM t", d.answer)
    assert codec.parse_error_fields(refused.error[5:])["C"] == "42501" and refused.finished is not None


def test_bind_of_statement_allowed_before_but_masked_now_must_be_prepared_again():
    from proxy.policy.decision import Mask

    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT email FROM m", ()) + sync())
    d.epoch = 1
    d.answer = Mask("SELECT masked FROM m")
    r.refresh_epoch()
    r.to_server.clear()
    r.client_data(codec.encode_bind("", "s1") + execute() + sync())
    marker = b"".join(r.to_server).split(b"purpose_proxy_refused_")[1][:24]
    r.server_data(codec.error_response("26000", "prepared statement \"purpose_proxy_refused_" + marker.decode()
                                       + "\" does not exist") + codec.ready_for_query(b"I"))
    out = b"".join(r.to_client)
    assert codec.parse_error_fields(out[5:out.index(b"Z")])["C"] == "0A000"


def test_closed_statement_is_forgotten_once_its_batch_ends_without_an_error():
    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT 1", ()) + sync())
    r.server_data(codec.message(b"1", b"") + codec.ready_for_query(b"I"))
    r.client_data(codec.message(b"C", b"Ss1\x00") + codec.encode_parse("s1", "SELECT 2", ()) + sync())
    assert len(r._statements["s1"]) == 2  # PostgreSQL has not closed it yet
    r.server_data(codec.message(b"3", b"") + codec.message(b"1", b"") + codec.ready_for_query(b"I"))
    assert [p.sql for p, *_ in r._statements["s1"]] == ["SELECT 2"]  # the Parse after the Close stays


def test_a_close_skipped_after_an_error_keeps_the_statement():
    # PostgreSQL skips to Sync after an error (55.2.3), so the Close never ran: a later
    # failing Parse of the name must not become the only statement the relay knows of.
    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT secret", ()) + sync())
    r.server_data(codec.message(b"1", b"") + codec.ready_for_query(b"I"))
    r.client_data(codec.encode_bind("", "nope") + codec.message(b"C", b"Ss1\x00") + sync())
    r.server_data(codec.error_response("26000", "prepared statement \"nope\" does not exist")
                  + codec.ready_for_query(b"I"))
    r.client_data(codec.encode_parse("s1", "SELECT 1", ()) + sync())
    assert [p.sql for p, *_ in r._statements["s1"]] == ["SELECT secret", "SELECT 1"]


def test_function_call_is_decided_and_refused_like_a_query():
    d = Decider()
    d.answer = Block("function calls are refused")
    r = ready_relay(d)
    fc = codec.message(b"F", b"\x00\x00\x0b\xb8" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
    r.client_data(fc)
    sent = b"".join(r.to_server)
    assert sent.startswith(b"Q") and b"purpose_proxy_refused_" in sent
    assert d.seen == [("-- FunctionCall of function oid 3000", "function_call")]


def _refused_bind(r, name):
    r.to_server.clear()
    r.client_data(codec.encode_bind("", name) + execute() + sync())
    sent = b"".join(r.to_server)
    r.server_data(codec.error_response("26000", "prepared statement does not exist") + codec.ready_for_query(b"I"))
    return b"purpose_proxy_refused_" in sent


def test_a_refused_bind_stays_refused():
    """PostgreSQL still holds the statement after a refused Bind: the next Bind is decided again."""
    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT secret FROM t", ()) + sync())
    d.epoch = 1
    d.answer = Block("no")
    r.refresh_epoch()
    assert _refused_bind(r, "s1")
    assert _refused_bind(r, "s1")


def test_duplicate_parse_keeps_the_earlier_statement_as_a_candidate():
    """A second Parse of a name PostgreSQL already holds fails there (42P05): both are judged at Bind."""
    class ByText(Decider):
        def decide(self, sql, via):
            self.seen.append((sql, via))
            return Block("no") if self.epoch and "secret" in sql else ALLOW

    d = ByText()
    r = ready_relay(d)
    r.client_data(codec.encode_parse("s1", "SELECT secret FROM t", ()) + sync())
    d.epoch = 1
    r.refresh_epoch()
    r.client_data(codec.encode_parse("s1", "SELECT 1", ()) + sync())
    assert _refused_bind(r, "s1")


def test_bind_of_a_name_the_relay_never_saw_parsed_is_refused_once_stale():
    """SQL PREPARE shares the namespace: such a statement cannot be decided again at Bind."""
    d = Decider()
    r = ready_relay(d)
    r.client_data(codec.query("PREPARE p AS SELECT 1"))
    d.epoch = 1
    r.refresh_epoch()
    assert _refused_bind(r, "p")
    r.forget_statement(None)
    r.to_server.clear()
    r.client_data(codec.encode_bind("", "") + execute() + sync())  # the unnamed statement: PostgreSQL decides
    assert b"purpose_proxy_refused_" not in b"".join(r.to_server)


# --- COPY FROM STDIN and the count of Syncs -----------------------------------------------------------
# The backend ignores Sync during COPY IN until the client's CopyDone/CopyFail (55.2.6). The
# relay's count of sync points must match the ReadyForQuery messages that will come: too few
# and the session looks quiet (a purpose change let through) while statements still run.

COPY_IN = codec.message(b"G", b"\x00\x00\x01\x00\x00")
COPY_DONE, COPY_FAIL = codec.message(b"c", b""), codec.message(b"f", b"no\x00")


def _copy_started(r, with_sync: bool):
    r.client_data(codec.encode_parse("", "COPY t FROM STDIN", ()) + codec.encode_bind("", "") + execute()
                  + (sync() if with_sync else codec.message(b"H", b"")))
    r.server_data(codec.message(b"1", b"") + codec.message(b"2", b"") + COPY_IN)


def test_libpq_extended_copy_counts_one_sync_point():
    # libpq sends Sync with the Execute (ignored by the backend) and another after CopyDone.
    r = ready_relay(Decider())
    _copy_started(r, with_sync=True)
    r.client_data(codec.message(b"d", b"1\n") + COPY_DONE + sync())
    assert r._outstanding == 1
    r.server_data(codec.message(b"C", b"COPY 1\x00") + codec.ready_for_query(b"I"))
    assert r._outstanding == 0 and r.phase is Phase.IDLE


def test_syncs_after_copy_fail_are_counted():
    # Each Sync after CopyFail earns a ReadyForQuery; with a pre-copy Sync, one fewer.
    for with_sync in (False, True):
        r = ready_relay(Decider())
        _copy_started(r, with_sync)
        r.client_data(COPY_FAIL + sync() + sync() + sync() + codec.query("SELECT pg_sleep(3)"))
        assert r._outstanding == 4, with_sync
        r.server_data(codec.error_response("57014", "COPY from stdin failed") + codec.ready_for_query(b"I")
                      + codec.ready_for_query(b"I") + codec.ready_for_query(b"I"))
        assert r._outstanding == 1 and not r.quiet  # the SELECT still runs
        r.client_data(codec.query("SET pii.purpose = 'x'"))
        assert not r.quiet


def test_syncs_during_copy_in_are_counted_as_the_backend_may_answer_them():
    # Whether the backend answers a Sync sent during COPY IN depends on whether the copy
    # already failed when it reads it (bad data before it): the relay counts them all, so
    # it may wait for answers that never come (no quiet point: a purpose change is refused),
    # but never misses one (a quiet point while a statement runs).
    for copy_query in (False, True):
        r = ready_relay(Decider())
        if copy_query:
            r.client_data(codec.query("COPY t FROM STDIN"))
            r.server_data(COPY_IN)
        else:
            _copy_started(r, with_sync=False)
        r.client_data(codec.message(b"d", b"not a number\n") + sync() + codec.query("BEGIN"))
        r.server_data(codec.error_response("22P02", "invalid input syntax for type integer")
                      + codec.ready_for_query(b"I") * (2 if copy_query else 1))
        assert r._outstanding == 1 and not r.quiet, copy_query  # BEGIN still to be answered


def test_a_schema_reload_makes_binds_decided_again():
    # A hunt replaced a view's column (phone -> card number) and reloaded the schema: a session
    # that only bound its statement again kept the decision made on the old view, because
    # the epoch read the schema version from the state the session last decided with.
    from benchmarks.decisions import runtime, schema_file_state, session
    from proxy.analysis.schema import Schema
    from proxy.devtools.sample import policies_dir
    from proxy.enforcement.runtime import DatabaseState

    pol = policies_dir()
    rt = runtime(pol, 100)
    state = schema_file_state(pol)
    s = session(rt, state, "isp", "app_support", "support")
    r = ready_relay(s)
    s.attach(r)
    r.client_data(codec.encode_parse("s1", "SELECT phone FROM member.members WHERE member_id = $1", ()) + sync())
    r.server_data(codec.message(b"1", b"") + codec.ready_for_query(b"I"))
    assert not r._redecide_binds
    changed = state.schema.to_dict()
    changed["version"] = "another-version"
    rt._databases["isp"] = DatabaseState(Schema.from_dict(changed))
    r.refresh_epoch()  # what the listener does for every session after a reload
    assert r._redecide_binds


def test_closes_waiting_for_their_batch_are_bounded():
    r = ready_relay(Decider())
    r.client_data(codec.encode_parse("s1", "SELECT 1", ()) + sync())
    r.server_data(codec.message(b"1", b"") + codec.ready_for_query(b"I"))
    r.client_data(codec.message(b"C", b"Ss1\x00") * 5000)  # no Sync: nothing is confirmed yet
    assert len(r._batch_hooks) == 1024 and "s1" in r._statements
    r.client_data(sync())
    r.server_data(codec.message(b"3", b"") * 5000 + codec.ready_for_query(b"I"))
    assert "s1" not in r._statements and not r._batch_hooks
