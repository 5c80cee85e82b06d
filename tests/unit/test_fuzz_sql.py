"""Property-based fuzzing of the SQL path: corpus, mutated and generated statements must be decided or refused by the
purpose sessions of the seed policy, never crash them."""

from __future__ import annotations

import logging
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.analysis.access import analyze
from proxy.enforcement.cache import DecisionCache
from proxy.policy.decision import Block, Mask
from tests.support import fuzzing
from tests.support.sqlfuzz import (
    REPO, SESSIONS, Chooser, FuzzSessions, Recorded, StaticRuntime, analysis_crash, check_decision, check_statement,
    load_corpus, mutate_sql, new_session, statement,
)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FS = FuzzSessions.load()
RUNTIME = FS.runtime
CORPUS = load_corpus()

numbers = st.lists(st.integers(0, 1 << 16), max_size=160)
sessions = st.sampled_from(SESSIONS)
vias = st.sampled_from(["query", "parse"])
edits = st.lists(st.tuples(st.integers(0, 8), st.integers(0, 1 << 12), st.integers(0, 1 << 12)), min_size=1,
                 max_size=6)


@pytest.fixture(autouse=True)
def _quiet_logs():
    # Unknown relations and refused SETs are logged at INFO; the fuzzers make thousands.
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def decide(spec, sql: str, via: str):
    """Decide ``sql`` in a fresh session of ``spec`` (role, purpose, search_path); no crash of the analysis either."""
    return check_statement(RUNTIME, spec, sql, via)


def test_the_corpus_holds_the_fixtures_the_policy_cases_and_the_bypass_attempts():
    bypass = yaml.safe_load((REPO / "tests/fixtures/enforce/bypass.yaml").read_text())["attempts"]
    assert len(CORPUS) > 500
    assert sum(a["sql"] in CORPUS for a in bypass) >= len(bypass) - 2


def test_every_corpus_statement_in_every_session():
    kinds = set()
    for sql in CORPUS:
        assert analysis_crash(RUNTIME, sql) is None, sql
        FS.reset()
        for session in FS.sessions:
            kinds.add(type(check_decision(session, sql, "query")).__name__)
        kinds.add(type(check_decision(FS.sessions[0], sql, "parse")).__name__)
    assert kinds == {"Allow", "Mask", "Block"}  # the corpus reaches every outcome


@FUZZ
@given(numbers, sessions, vias)
def test_generated_statements_are_decided_or_refused(choices, spec, via):
    decide(spec, statement(Chooser(choices)), via)


@FUZZ
@given(st.sampled_from(CORPUS), st.sampled_from(CORPUS), edits, sessions, vias)
def test_mutated_corpus_statements_are_decided_or_refused(base, other, ops, spec, via):
    decide(spec, mutate_sql(base, other, ops), via)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
                 st.tuples(st.sampled_from(CORPUS), st.binary(max_size=12)).map(
                     lambda t: t[0][: len(t[1]) * 7] + t[1].decode("utf-8", "surrogateescape"))),
       sessions, vias)
def test_arbitrary_text_is_decided_or_refused(text, spec, via):
    decide(spec, text, via)


@FUZZ
@given(st.lists(numbers, min_size=1, max_size=6), sessions)
def test_statement_sequences_keep_one_session_deciding(streams, spec):
    """Settings, PREPARE/EXECUTE, cursors and DDL change a session's state; later statements
    must still be decided or refused."""
    session = new_session(RUNTIME, *spec)
    for choices in streams:
        check_decision(session, statement(Chooser(choices)), "query")
        session.ready(False)  # the server confirmed what ran


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(numbers, st.booleans()), min_size=1, max_size=5), sessions, st.lists(st.integers(0, 4096),
                                                                                              max_size=4))
def test_decisions_through_the_relay_and_a_backend(items, spec, cut):
    """Real decisions on the wire: every statement upstream was decided and went out as decided."""
    steps = []
    for choices, extended in items:
        sql = statement(Chooser(choices))
        steps.append(fuzzing.parse("", sql) + fuzzing.bind() + fuzzing.execute() + fuzzing.SYNC if extended
                     else fuzzing.query(sql))
    factory = lambda: Recorded(new_session(RUNTIME, *spec))  # noqa: E731
    run, decider = fuzzing.converse(steps, fuzzing.cut_at(cut), decider_factory=factory)
    fuzzing.check_run(run, decider, conversation=True)
    assert run.violation is None
    assert "raised" not in [c[2] for c in decider.calls]
    assert len(decider.calls) >= len(steps)


_CONSTANT = re.compile(r"\b\d+\b|'[^']*'")
_OTHER_CONSTANTS = ("0", "1", "2", "-1", "'x'", "'a''b'", "NULL", "9999999999", "1.5", "'2024-01-01'")


@FUZZ
@given(st.one_of(numbers.map(lambda n: statement(Chooser(n))), st.sampled_from(CORPUS)),
       st.lists(st.integers(0, 99), min_size=1, max_size=12), sessions, vias)
def test_the_decision_cache_decides_as_a_fresh_analysis_does(sql, picks, spec, via):
    """Differential: the same statement with other constants (what the shape cache keys on), decided
    with the decision cache and without it, gets the same kind of decision, rewrite and SQLSTATE."""
    cached = StaticRuntime(RUNTIME.policy, RUNTIME.state.schema, DecisionCache(1000))
    it = iter(picks)
    variants = [sql, _CONSTANT.sub(lambda m: _OTHER_CONSTANTS[next(it, 0) % len(_OTHER_CONSTANTS)], sql), sql]
    with_cache = new_session(cached, *spec)
    for text in variants:
        want = new_session(RUNTIME, *spec).decide(text, via)
        got = with_cache.decide(text, via)
        assert (type(got), getattr(got, "sql", None), getattr(got, "sqlstate", None)) == \
            (type(want), getattr(want, "sql", None), getattr(want, "sqlstate", None)), text


# --- regressions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", [
    "SELECT mem\udc83X",  # bytes that are not UTF-8 in a name: truncate_identifier raised UnicodeEncodeError
    "SELECT card_number FROM billing.payment_methods WHERE member_id\udcff= 42",
    # an empty name part: sqlglot left a str where the analysis expected a node (AttributeError)
    "SELECT m.email, i.amount FROM crm...members m JOIN billing.invoices i ON i.member_id = m.member_id",
    # sqlglot's parser itself raised AttributeError on these
    "SELECT m.nosuch FROM crmcrm. unnest(.RRAY[1]) members m",
    "SELECT name FROM crm.members m ORDER BY (SELECT count(*) FROM billing.invoices i WHERE i.member_id = \r.",
    "SELECT * FROM generate_series(1, $2, E'\\t')",  # sqlglot's own assert on the step (atheris, long run)
])
def test_analysis_refuses_what_crashed_it_before(sql):
    """Found by the SQL fuzzer: these made the analysis raise (it failed closed, with "internal
    error in the analysis"); now each is refused for what it is."""
    analysis = analyze(sql, RUNTIME.state.schema, ["$user", "public"], "app")
    reasons = [r for st in analysis.statements for r in st.unsupported]
    assert reasons and not any("internal error" in r for r in reasons), reasons
    for spec in SESSIONS[:3]:
        assert type(decide(spec, sql, "query")) is Block


def test_masked_statement_with_bytes_that_are_not_utf8_goes_upstream_with_them():
    """Found by the SQL fuzzer: the rewrite of a masked statement holding bytes that are not
    UTF-8 raised UnicodeEncodeError on its way to the wire."""
    spec = ("app_support", "support", None)
    sql = "SELECT card_number FROM billing.payment_methods WHERE card_brand = '\udcff'"
    decision = decide(spec, sql, "query")
    assert type(decision) is Mask
    run, decider = fuzzing.converse([fuzzing.query(sql.encode("utf-8", "surrogateescape"))],
                                    decider_factory=lambda: Recorded(new_session(RUNTIME, *spec)))
    fuzzing.check_run(run, decider, conversation=True)
    assert b"'\xff'" in run.to_server and run.violation is None
