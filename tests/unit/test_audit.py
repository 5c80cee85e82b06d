"""The audit log: chaining, verification (changed byte, removed record), rotation, resumption, queries, backpressure."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import threading
import time
from pathlib import Path

import pytest

from proxy import cli
from proxy.observability import audit
from proxy.observability.audit import GENESIS, AuditLog, FileSink, StreamSink
from proxy.observability.recorder import AUDIT_UNAVAILABLE, AuditGate
from proxy.policy.decision import ALLOW
from proxy.wire import codec
from tests.unit.test_codec import authenticated_relay


def fields(kind: str, **extra) -> dict:
    return {"type": kind, **extra}


def write_log(path: Path, n: int, **sink_kw) -> AuditLog:
    log = AuditLog(FileSink(path, **sink_kw))
    log.start()
    for _ in range(n):
        log.submit(time.time(), fields, ("statement",))
    assert log.close(10)
    return log


def records(*paths: Path) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()]


def test_records_are_chained_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    recs = records(path)
    assert [r["type"] for r in recs] == ["audit_open", "statement", "statement", "statement", "audit_close"]
    assert [r["seq"] for r in recs] == list(range(5))
    assert recs[0]["prev"] == GENESIS
    for before, rec in zip(recs, recs[1:]):
        assert rec["prev"] == before["hash"]
    for line, rec in zip(path.read_bytes().splitlines(keepends=True), recs):
        # The hash is that of the line's own bytes with the hash member cut out: '{"v":2,...,"prev":"..."}'.
        assert line.startswith(b'{"v":2,"seq":') and line.endswith(b',"hash":"' + rec["hash"].encode() + b'"}\n')
        body = line[: line.rindex(b',"hash":')] + b"}"
        assert hashlib.sha256(body).hexdigest() == rec["hash"]
        assert list(rec)[:4] == ["v", "seq", "time", "type"] and list(rec)[-2:] == ["prev", "hash"]
        assert dt.datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).tzinfo is not None
    assert audit.verify([path]).ok


def format_1_log(path: Path, n: int, prev: str = GENESIS, seq: int = 0) -> str:
    """A log as format 1 wrote it (canonical JSON, keys sorted); returns the last hash."""
    with open(path, "a") as f:
        for i in range(seq, seq + n):
            line, prev = audit.record_line({"v": 1, "seq": i, "time": "2026-01-01T00:00:00.000000Z",
                                            "type": "statement", "prev": prev})
            f.write(line)
    return prev


def test_format_1_records_still_verify_and_a_chain_spans_the_upgrade(tmp_path):
    path = tmp_path / "audit.jsonl"
    format_1_log(path, 3)
    assert audit.verify([path]).ok
    write_log(path, 2)  # the upgraded proxy resumes the chain in format 2
    recs = records(path)
    assert [r["v"] for r in recs] == [1, 1, 1, 2, 2, 2, 2] and recs[3]["resumed"] is True
    result = audit.verify([path])
    assert result.ok and result.records == 7, result.describe()
    # Format 1 lines must stay canonical: the same record with its keys reordered is a changed record.
    lines = path.read_text().splitlines(keepends=True)
    rec = json.loads(lines[1])
    lines[1] = json.dumps(dict(reversed(list(rec.items()))), separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    result = audit.verify([path])
    assert not result.ok and result.broken_line == 2 and "canonical" in result.problem


def test_a_format_2_line_cannot_pass_as_format_1(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 1)
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"v":2', '"v":1', 1)
    path.write_text("".join(lines))
    result = audit.verify([path])
    assert not result.ok and result.broken_line == 2


def test_one_changed_byte_is_found_at_its_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    for target in range(len(lines)):
        for pos in (10, len(lines[target]) // 2, len(lines[target]) - 3):
            changed = bytearray(lines[target])
            changed[pos] = ord("X") if changed[pos] != ord("X") else ord("Y")
            bad = tmp_path / f"bad-{target}-{pos}.jsonl"
            bad.write_bytes(b"".join(lines[:target] + [bytes(changed)] + lines[target + 1:]))
            result = audit.verify([bad])
            assert not result.ok
            assert (result.broken_file, result.broken_line) == (str(bad), target + 1), result.describe()


def test_a_removed_record_is_found_at_the_next_one(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    lines = path.read_bytes().splitlines(keepends=True)
    for removed in range(1, len(lines) - 1):
        bad = tmp_path / f"removed-{removed}.jsonl"
        bad.write_bytes(b"".join(lines[:removed] + lines[removed + 1:]))
        result = audit.verify([bad])
        assert not result.ok and result.broken_line == removed + 1, result.describe()
        assert "prev" in result.problem


def test_rotation_by_size_keeps_one_chain_across_files(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(path, rotate_bytes=600))
    log.start()
    for _ in range(40):
        log.submit(time.time(), fields, ("statement",))
        time.sleep(0.001)  # several writer batches, so the size check runs between them
    assert log.close(10)
    rotated = audit.rotated_files(path)
    assert len(rotated) >= 2
    files = rotated + [path]
    recs = records(*files)
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    # Any order on the command line: files are put in chain order.
    result = audit.verify(list(reversed(files)))
    assert result.ok and result.records == len(recs), result.describe()
    # A whole rotated file missing breaks the chain at the next file's first line.
    result = audit.verify([f for f in files if f != rotated[1]])
    assert not result.ok and result.broken_line == 1
    assert result.broken_file == str(files[files.index(rotated[1]) + 1])


def test_rotation_by_time(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = FileSink(path, rotate_seconds=3600)
    log = AuditLog(sink)
    log.start()
    log.submit(time.time(), fields, ("statement",))
    deadline = time.monotonic() + 5
    while log.written < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.opened_at -= 7200  # the file is now two hours old
    log.submit(time.time(), fields, ("statement",))
    assert log.close(10)
    assert len(audit.rotated_files(path)) == 1
    assert audit.verify(audit.rotated_files(path) + [path]).ok


def test_restart_resumes_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    write_log(path, 2)
    recs = records(path)
    assert [r["type"] for r in recs].count("audit_open") == 2
    assert recs[4]["type"] == "audit_open" and recs[4]["resumed"] is True and recs[4]["prev"] == recs[3]["hash"]
    assert audit.verify([path]).ok


def test_restart_after_a_cut_off_line_leaves_it_visible(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # a crash cut the last record
    write_log(path, 1)
    result = audit.verify([path])
    assert not result.ok and result.broken_line == 4  # the cut record; the chain resumes after it
    assert records_after_cut_are_chained(path)


def records_after_cut_are_chained(path: Path) -> bool:
    lines = path.read_text().splitlines()
    tail = [json.loads(x) for x in lines[4:]]
    return all(b["prev"] == a["hash"] for a, b in zip(tail, tail[1:]))


def test_stdout_sink(tmp_path):
    out = io.StringIO()
    log = AuditLog(StreamSink(out))
    log.start()
    log.submit(time.time(), fields, ("statement",))
    assert log.close(10)
    path = tmp_path / "stdout.jsonl"
    path.write_text(out.getvalue())
    assert audit.verify([path]).ok and len(records(path)) == 3


def test_a_failing_builder_still_leaves_a_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(path))
    log.start()
    log.submit(time.time(), lambda: 1 / 0, ())
    assert log.close(10)
    assert [r["type"] for r in records(path)] == ["audit_open", "record_error", "audit_close"]


class StalledFile:
    """A sink whose writes wait until released (a stalled disk)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lines: list[str] = []

    def open(self):
        return 0, GENESIS

    def write(self, lines):
        assert self.release.wait(30)
        self.lines += lines

    def flush(self):
        pass

    def due(self, now):
        return False

    def close(self):
        pass


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_fail_mode_raises_the_signal_refuses_through_the_relay_and_drops_nothing():
    sink = StalledFile()
    log = AuditLog(sink, queue_size=4, when_full="fail")
    log.start()
    wait_until(lambda: log.pending == 0)  # the writer took audit_open and is stuck writing it
    for _ in range(10):
        log.submit(time.time(), fields, ("statement",))
    assert log.refusing and log.full_events >= 1 and log.pending == 10  # over the bound, none dropped
    # A session's gate acts on the signal: the statement is refused with 53000 and never reaches PostgreSQL.
    relay = authenticated_relay(AuditGate(lambda sql, via: ALLOW, log))
    relay.client_data(codec.query("SELECT 1"))
    assert codec.query("SELECT 1") not in b"".join(relay.to_server)
    stand_in = next(iter(relay._refusals)).decode()
    relay.server_data(codec.error_response("42601", f'syntax error at or near "{stand_in}"')
                      + codec.ready_for_query(b"I"))
    (ev,) = relay.events
    assert ev.decision is AUDIT_UNAVAILABLE
    assert codec.parse_error_fields(relay.to_client[-2][5:])["C"] == "53000"
    log.refused_statement()
    sink.release.set()
    wait_until(lambda: not log.refusing)
    relay.to_server.clear()
    relay.client_data(codec.query("SELECT 2"))
    assert relay.to_server == [codec.query("SELECT 2")]  # accepted again
    assert log.close(10)
    types = [json.loads(x)["type"] for x in sink.lines]
    assert types.count("statement") == 10
    summary = [json.loads(x) for x in sink.lines if json.loads(x)["type"] == "audit_backpressure"]
    assert len(summary) == 1 and summary[0]["refused_statements"] == 1


def test_block_mode_waits_bounded_and_keeps_the_record():
    sink = StalledFile()
    log = AuditLog(sink, queue_size=2, when_full="block", block_timeout=0.2)
    log.start()
    wait_until(lambda: log.pending == 0)
    log.submit(time.time(), fields, ("statement",))
    log.submit(time.time(), fields, ("statement",))
    started = time.monotonic()
    log.submit(time.time(), fields, ("statement",))  # full: waits about block_timeout, then keeps it
    waited = time.monotonic() - started
    assert 0.15 <= waited < 2.0 and log.pending == 3 and not log.refusing
    sink.release.set()
    assert log.close(10)
    assert [json.loads(x)["type"] for x in sink.lines].count("statement") == 3


def test_query_filters(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(path))
    log.start()
    base = dt.datetime(2025, 1, 2, 12, tzinfo=dt.timezone.utc).timestamp()
    rows = [
        (base, {"categories": ["contact.email"], "purpose": "billing", "verdict": "allow"}),
        (base + 3600, {"categories": ["identity.name"], "purpose": "marketing", "verdict": "allow"}),
        (base + 7200, {"categories": ["contact.email"], "purpose": "marketing.email", "verdict": "block"}),
    ]
    for when, extra in rows:
        log.submit(when, lambda e: {"type": "statement", **e}, (extra,))
    assert log.close(10)
    q = lambda **kw: [r.get("purpose") for r in audit.query([path], types=["statement"], **kw)]  # noqa: E731
    assert q(category="contact") == ["billing", "marketing.email"]
    assert q(purpose="marketing") == ["marketing", "marketing.email"]
    assert q(category="contact", purpose="marketing") == ["marketing.email"]
    assert q(since=audit.parse_when("2025-01-02T12:30:00Z"), until=audit.parse_when("2025-01-02T14:00:00Z")) == [
        "marketing"]
    assert q(verdict="block") == ["marketing.email"]


def test_cli_verify_and_query(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    assert cli.main(["audit", "verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: 4 records")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1] + lines[2:]))
    assert cli.main(["audit", "verify", str(path)]) == 1
    assert f"BROKEN: {path}:2:" in capsys.readouterr().out
    assert cli.main(["audit", "query", "--type", "audit_close", "--count", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "1"
    assert cli.main(["audit", "query", "--since", "not a time", str(path)]) == 2


@pytest.mark.parametrize("text", ["2h", "90m", "1d", "30s"])
def test_relative_times(text):
    now = time.time()
    assert audit.parse_when(text, now) < dt.datetime.fromtimestamp(now, dt.timezone.utc)


def test_the_gate_keeps_the_deciders_protocol():
    class Full:
        withhold_error_rows = True
        purpose = "billing"
        epoch = (1, 2)
        timings = (("analysis", 0.1),)

        def __init__(self):
            self.last = "account"
            self.readies = []

        def decide(self, sql, via):
            return ALLOW

        def ready(self, errored):
            self.readies.append(errored)

    inner = Full()
    gate = AuditGate(inner, AuditLog(StreamSink(io.StringIO())))
    assert gate.withhold_error_rows is True and gate.purpose == "billing" and gate.epoch == (1, 2)
    assert gate.timings == (("analysis", 0.1),)
    gate.ready(False)
    assert inner.readies == [False]
    assert gate.decide("SELECT 1", "query") is ALLOW and gate.last == "account"
    assert not hasattr(AuditGate(lambda sql, via: ALLOW, AuditLog(StreamSink(io.StringIO()))), "timings")


def test_statement_records_share_pieces_but_not_per_statement_values():
    from proxy.observability.fingerprint import Fingerprints
    from proxy.observability.recorder import StatementRecords
    from proxy.policy.decision import Block
    from proxy.wire.relay import StatementEvent

    records = StatementRecords(Fingerprints(), size=4)
    block = Block("no", sqlstate="42501", reason="denied")
    one = ("000001", "127.0.0.1:1", "app", "db", "a")
    two = ("000002", "127.0.0.1:2", "ops", "db", "b")
    done = codec.message(b"C", b"SELECT 3\x00")

    def rec(sql, decision, snapshot, purpose, **kw):
        ev = StatementEvent("query", sql, decision, 0.00001, 100.0, **kw)
        return json.loads("{" + records(ev, None, snapshot, purpose, "declared") + "}")

    first = rec("SELECT a FROM t WHERE b = 1", ALLOW, one, "billing", finished=100.5, completions=done)
    second = rec("SELECT a FROM t WHERE b = 2", ALLOW, two, "support", finished=None)
    third = rec("DELETE FROM t WHERE b = 'x'", block, one, "billing", finished=100.2,
                error=codec.error_response("42501", "no"))
    assert (first["session"], first["role"], first["purpose"], first["rows"], first["completed"]) == (
        "000001", "app", "billing", 3, True)
    assert (second["session"], second["role"], second["purpose"], second["rows"], second["completed"]) == (
        "000002", "ops", "support", None, False)
    assert first["fingerprint"] == second["fingerprint"] == "select a from t where b = ?"
    assert second["duration_seconds"] is None and first["duration_seconds"] == 0.5
    assert (third["verdict"], third["reason"], third["statement_kinds"], third["fingerprint"]) == (
        "block", "denied", ["delete"], "delete from t where b = ?")
    assert third["error"] == {"sqlstate": "42501", "message": "no", "source": "proxy"}
    assert first["verdict"] == "allow" and first["reason"] is None and first["error"] is None
    for _ in range(10):  # past the bound: the tables are emptied and rebuilt, the records stay right
        rec(f"SELECT {_} FROM t{_}", ALLOW, (str(_), "c", "r", "d", ""), None)
    assert rec("SELECT a FROM t WHERE b = 3", ALLOW, one, "billing", finished=101.0) == dict(
        first, rows=None, duration_seconds=1.0)


def test_a_statement_record_says_whether_the_consent_filter_was_applied():
    # It said false for every statement once: the recorder looked for an attribute Mask does not have.
    from proxy.observability.fingerprint import Fingerprints
    from proxy.observability.recorder import StatementRecords
    from proxy.policy.decision import Mask
    from proxy.wire.relay import StatementEvent

    records = StatementRecords(Fingerprints())
    snapshot = ("000001", "127.0.0.1:1", "app", "db", "a")

    def rec(decision):
        ev = StatementEvent("query", "SELECT email FROM crm.members", decision, 0.00001, 100.0, finished=100.1)
        return json.loads("{" + records(ev, None, snapshot, "marketing", "declared") + "}")

    filtered = rec(Mask("SELECT email FROM (...) AS members", ("consent",)))
    masked = rec(Mask("SELECT (...) AS email FROM crm.members", ("partial",)))
    assert filtered["consent_filter"] is True and filtered["rewrite"] == {"applied": True, "methods": ["consent"]}
    assert masked["consent_filter"] is False and rec(ALLOW)["consent_filter"] is False


def test_postgresql_error_messages_never_reach_the_record():
    # Masking quoted text and numbers missed a RAISE of a parameter and a value with a quote
    # inside "...": only the SQLSTATE and its condition name are recorded.
    from proxy.observability.fingerprint import Fingerprints
    from proxy.observability.recorder import StatementRecords
    from proxy.wire.relay import StatementEvent

    records = StatementRecords(Fingerprints())
    for state, message, name in (("P0001", "raised: CANARYX-raise", "raise_exception"),
                                 ("22P02", 'invalid input syntax for type integer: "ab"CANARYX-dq"',
                                  "invalid_text_representation")):
        ev = StatementEvent("query", "SELECT f($1)", ALLOW, 0.00001, 100.0, finished=100.1,
                            error=codec.error_response(state, message))
        line = records(ev, None, ("1", "127.0.0.1:1", "app", "db", "a"), "billing", "declared")
        assert "CANARYX" not in line
        assert json.loads("{" + line + "}")["error"] == {"sqlstate": state, "message": name, "source": "postgresql"}
