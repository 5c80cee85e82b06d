"""The decision cache: shapes read constants as PostgreSQL's lexer does, and a warm cache decides exactly as a cold one.

* Shapes: for statements of the test corpora and random ones, every text of the same
  shape with other constants lexes (``proxy.analysis.lexer.scan``, PostgreSQL-faithful)
  to the same tokens apart from the constants' values.
* Warm equals cold: every masking fixture (tests/fixtures/rewrite) and every statement
  with its constants changed is decided by a session with a warm cache exactly as by a
  session without a cache: same decision type, same SQL sent upstream, same message.
* Safety cases: constants whose value the analysis reads (ORDER BY positions,
  set_config names) are never keyed on their shape.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.analysis import shape as shapes
from proxy.analysis.lexer import LITERALS, T, scan
from proxy.analysis.schema import Schema
from proxy.config import Config
from proxy.enforcement.cache import Shaped, Verdict
from proxy.enforcement.hook import SessionInfo
from proxy.enforcement.purpose import PurposeSession
from proxy.enforcement.runtime import DatabaseState, PolicyRuntime
from proxy.policy.decision import Block, Mask

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def _corpus() -> list[str]:
    out: list[str] = []
    for path in sorted((FIXTURES / "rewrite").glob("*.yaml")):
        out += [c["sql"] for c in yaml.safe_load(path.read_text())["cases"]]
    for name in ("bypass.yaml", "legit.yaml"):
        doc = yaml.safe_load((FIXTURES / "enforce" / name).read_text())
        items = doc.get("attempts") or doc.get("statements") or []
        out += [a["sql"] for a in items if isinstance(a.get("sql"), str)]
    return out


CORPUS = _corpus()


def _code_tokens(sql: str) -> list[tuple]:
    """The tokens of ``sql`` with the values of constants left out."""
    return [(t.kind, None if t.kind in LITERALS or t.kind is T.NUMBER else t.value, t.text[:1] if t.kind in LITERALS
             else None) for t in scan(sql)]


def _with_constants(sql: str, replace) -> str:
    """``sql`` with each constant that ``shape`` found replaced by ``replace(i, old)``."""
    where = shapes.spans(sql)
    out = sql
    for i, (a, b) in reversed(list(enumerate(where))):
        out = out[:a] + replace(i, sql[a:b]) + out[b:]
    return out


def test_the_corpus_is_mostly_within_the_shape_subset():
    inside = [q for q in CORPUS if shapes.shape(q) is not None]
    assert len(CORPUS) > 300 and len(inside) > 0.6 * len(CORPUS)


@pytest.mark.parametrize("sql", [q for q in CORPUS if shapes.shape(q) is not None][:400])
def test_same_shape_means_same_tokens(sql):
    variant = _with_constants(sql, lambda i, old: "'x''y 日本'" if old.startswith("'") else "12.5")
    assert shapes.shape(variant).key == shapes.shape(sql).key
    assert _code_tokens(variant) == _code_tokens(sql)


_string = st.text(alphabet=st.characters(blacklist_characters="\\\x00", blacklist_categories=("Cs",)), max_size=12)
_constant = st.one_of(_string.map(lambda s: "'" + s.replace("'", "''") + "'"),
                      st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{1,3})?\Z"))
_piece = st.sampled_from(["SELECT ", "a", " ", "FROM ", "t", ".", ",", "(", ")", "=", "::", "'", '"', "x1", "$1",
                          "-", "+", "e", "E", "\n", ";", "--", "/*", "*/", "$$", "U&", "&", "1", "0x", "_", "é"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_piece, _constant), max_size=16), st.lists(_constant, min_size=16, max_size=16))
def test_random_texts_of_one_shape_lex_alike(pieces, others):
    sql = "".join(pieces)
    s = shapes.shape(sql)
    if s is None:
        return
    try:
        before = _code_tokens(sql)
    except Exception:  # not lexable: the variant must not be lexable either, or lex the same way
        before = None
    variant = _with_constants(sql, lambda i, old: others[i % 16] if (others[i % 16][0] == "'") == (old[0] == "'")
                              else old)
    assert shapes.shape(variant).key == s.key
    try:
        after = _code_tokens(variant)
    except Exception:
        after = None
    if before is not None and after is not None:
        assert after == before


# --- warm equals cold ---------------------------------------------------------------------------------------


def _cases() -> list[dict]:
    out = []
    for path in sorted((FIXTURES / "rewrite").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for case in doc["cases"]:
            out.append(dict(case, schema=doc["schema"], policies=doc["policies"]))
    return out


CASES = _cases()
_RUNTIMES: dict[tuple, PolicyRuntime] = {}


def _runtime(case: dict, size: int) -> PolicyRuntime:
    key = (case["schema"], case["policies"], size)
    if key not in _RUNTIMES:
        config = Config(policies=str(REPO / case["policies"]), schema_dsn="unused", decision_cache_size=size,
                        policy_watch_interval=0, schema_refresh_interval=0)
        runtime = PolicyRuntime(config)
        runtime._databases["app"] = DatabaseState(Schema.from_file(str(REPO / case["schema"])))
        runtime._loaded_generation["app"] = 0
        _RUNTIMES[key] = runtime
    return _RUNTIMES[key]


def _session(case: dict, size: int) -> PurposeSession:
    runtime = _runtime(case, size)
    options = f"-c pii.purpose={case['purpose']}"
    if "search_path" in case:
        options += " -c search_path=" + ",".join(case["search_path"])
    info = SessionInfo("test", "127.0.0.1", {"user": case.get("role", "app"), "database": "app", "options": options})
    return PurposeSession(runtime, info, runtime.database("app"))


def _same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, Mask):
        assert a.sql == b.sql and a.methods == b.methods and a.reason == b.reason
    if isinstance(a, Block):
        assert (a.message, a.sqlstate, a.detail, a.hint, a.reason) == (b.message, b.sqlstate, b.detail, b.hint,
                                                                        b.reason)


def _variants(sql: str) -> list[str]:
    if shapes.spans(sql) is None:
        return []
    return [_with_constants(sql, lambda i, old: "'zz'" if old.startswith("'") else "1"),
            _with_constants(sql, lambda i, old: "'a''b'" if old.startswith("'") else str(7 + i))]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_warm_cache_decides_like_no_cache(case):
    warm = _session(case, 1000)
    cold = _session(case, 0)
    for sql in [case["sql"], case["sql"], *_variants(case["sql"]), *_variants(case["sql"])]:
        for via in ("query", "parse"):
            _same(warm.decide(sql, via), cold.decide(sql, via))
            assert (warm.last is None) == (cold.last is None)
            if warm.last is not None:
                assert warm.last.to_dict() == cold.last.to_dict()


def test_cache_is_hit_by_text_and_by_shape():
    case = next(c for c in CASES if c["name"] == "partial keeps the first characters of a name")
    runtime = _runtime(case, 50)
    cache = runtime.cache
    cache.clear()
    s = _session(case, 50)
    first = s.decide(case["sql"], "query")
    assert isinstance(first, Mask) and cache.misses >= 1
    hits = cache.shape_hits
    other = _variants(case["sql"])[1]
    again = s.decide(other, "query")
    assert cache.shape_hits == hits + 1
    assert isinstance(again, Mask) and again.sql != first.sql


@pytest.mark.parametrize("sql", ["BEGIN", "END", "SAVEPOINT a1", "ROLLBACK TO SAVEPOINT a1",
                                 "PREPARE TRANSACTION 'gid-1'"])
def test_transaction_control_is_kept_as_a_final_decision(sql):
    # A hit on a final (Shaped) entry skips the session rules: only right for statements
    # that set nothing and read nothing, which transaction control is.
    case = dict(CASES[0], sql=sql, purpose="support")
    s = _session(case, 1000)
    cache = s.runtime.cache
    cache.clear()
    first = s.decide(sql, "query")
    assert [type(e) for e, _ in cache._entries.values()] == [Shaped]
    hits = cache.shape_hits + cache.text_hits
    _same(s.decide(sql, "query"), first)
    assert cache.shape_hits + cache.text_hits == hits + 1
    assert s.purpose == "support"


@pytest.mark.parametrize("sql", ["COMMIT AND CHAIN", "COMMIT PREPARED 'gid-1'", "ROLLBACK PREPARED 'gid-1'"])
def test_transaction_control_that_may_commit_ddl_aside_goes_through_the_session_on_a_hit(sql):
    # Found by a hunt: COMMIT PREPARED answered from a shape entry skipped the session, which then
    # never loaded the schema after the prepared DDL committed.
    case = dict(CASES[0], sql=sql, purpose="support")
    s = _session(case, 1000)
    cache = s.runtime.cache
    cache.clear()
    s.decide(sql, "query")
    assert [type(e) for e, _ in cache._entries.values()] == [Verdict]
    _, analysis = s._judge(sql, "query")
    assert analysis is not None  # so ``decide`` applies it to the session


@pytest.mark.parametrize("sql", [
    "SELECT member_id, email FROM crm.members ORDER BY 1",  # a position: ORDER BY 2 would sort by email
    "SELECT region, count(*) FROM crm.members GROUP BY 1",
    "SELECT set_config('application_name', 'x', false) FROM crm.members",
])
def test_constants_whose_value_matters_are_not_keyed_on_shape(sql):
    case = dict(CASES[0], sql=sql, purpose="support")
    s = _session(case, 1000)
    s.runtime.cache.clear()
    s.decide(sql, "query")
    assert not any(len(k) == 3 for k in s.runtime.cache._entries), "kept by shape"


def test_set_config_of_the_purpose_is_refused_after_a_harmless_one_of_the_same_shape():
    case = dict(CASES[0], purpose="support")
    s = _session(case, 1000)
    harmless = s.decide("SELECT set_config('application_name', 'x', false)", "query")
    assert not isinstance(harmless, Block)
    attack = s.decide("SELECT set_config('pii.purpose', 'marketing', false)", "query")
    assert isinstance(attack, Block) and attack.reason == "set-config"


@pytest.mark.parametrize("value", ['"crm', "crm,", "crm public", "crm,,public"])
def test_set_config_of_a_search_path_postgresql_cannot_split_is_refused_as_postgresql_would(value):
    """set_config hands PostgreSQL its text as it is (SET quotes a string first): a hunt's
    ``SELECT set_config('search_path', '"crm', false)`` ended in an internal error of the proxy."""
    s = _session(dict(CASES[0], purpose="support"), 1000)
    before = list(s.search_path)
    for _ in range(2):  # cold, then warm
        refused = s.decide(f"SELECT set_config('search_path', '{value}', false)", "query")
        assert isinstance(refused, Block) and refused.sqlstate == "22023", refused
    assert s.search_path == before


def test_the_cache_is_bounded_and_emptied_on_reload():
    case = CASES[0]
    runtime = _runtime(case, 3)
    s = _session(case, 3)
    for i in range(10):
        s.decide(f"SELECT {i} AS c{i}", "query")
    assert len(runtime.cache) <= 3
    runtime._changed()
    assert len(runtime.cache) == 0


def test_shape_subset_refuses_what_it_cannot_read_exactly():
    for sql in ["SELECT 1 -- x", "SELECT /* x */ 1", "SELECT $$a$$", "SELECT E'\\n'", "SELECT U&'d!0061' UESCAPE '!'",
                "SELECT 'unterminated", 'SELECT "unterminated', "SELECT é1", "SELECT 1\x01"]:
        assert shapes.shape(sql) is None, sql
    assert re.search("\x02", shapes.shape("SELECT a FROM t WHERE b = 10").key)
    assert "\x02" not in shapes.shape("SELECT a1, t.2x, 1e5, 0x1F FROM t").key


# --- the compiled scan (proxy/analysis/_shape.c) against the Python reading ------------------------------


def test_the_compiled_shape_scan_is_built_where_a_compiler_is():
    # setup.py builds it as optional: a failed build would pass unnoticed without this.
    import os
    import shutil
    import sysconfig

    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    if shutil.which("cc") and headers and not os.environ.get("PURPOSE_PROXY_NO_EXTENSIONS"):
        assert shapes.COMPILED_SCAN is not None, "proxy/analysis/_shape.c was not built (pip install -e . builds it)"
        assert shapes._shape is shapes._shape_c


def _both_readings(sql: str) -> None:
    if shapes.COMPILED_SCAN is None:  # the test above checks that this happens only without a C compiler
        pytest.skip("the compiled shape scan is not built here")
    expected = shapes._shape_py(sql)
    got = shapes._shape_c(sql)
    assert got == expected
    if expected is not None:  # dict keys: equal strings of one kind (CPython compares kinds first)
        assert type(got) is shapes.Shape and all(type(c) is str for c in got.constants)
        assert hash(got.key) == hash(expected.key)


_edge = st.sampled_from(["'", "''", '"', '""', "1", "12", "1.5", "1.", ".5", "$", "$1", "$a", "-", "--", "/", "/*",
                         "*", "&", "\\", "\t", "\n", "\r", "\x00", "\x01", "\x0b", "\x7f", "\x80", "é", "日",
                         "\U0001F600", "\u3000", "a", "_", "x1", "e", " ", ".", ",", "U&"])


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_edge, _piece, _constant, st.text(max_size=3)), max_size=24))
def test_compiled_and_python_shapes_agree(pieces):
    _both_readings("".join(pieces))


@pytest.mark.parametrize("sql", CORPUS[::3] + [
    "", "1", "'a'", '"a"', "'a''", "'a'''b'", '"a""b', '"a"""', "$'x'1", "-'x'-", 'a-"x"-b', "12.5x", "1.2.3",
    "1.23", "x$", 'SELECT "é" FROM t WHERE a = 1.5', "SELECT \"\U0001F600\" FROM t WHERE a = '\u3000'",
    "SELECT 'a\\b'", 'SELECT "a\\b"', "SELECT 1\t\r\n", "SELECT 'é', 1", "SELECT '" + "x" * 100 + "'," + ",".join(["1"] * 40)])
def test_compiled_and_python_shapes_agree_on_the_corpus(sql):
    _both_readings(sql)


def test_a_statement_is_shaped_once_for_the_decision_cache_and_its_fingerprint(monkeypatch):
    from proxy.observability.fingerprint import Fingerprints

    case = next(c for c in CASES if c["name"] == "partial keeps the first characters of a name")
    s = _session(case, 50)
    s.decide(case["sql"], "query")  # the shape is in the cache now
    other = _variants(case["sql"])[1]
    calls: list[str] = []
    real = shapes._shape
    monkeypatch.setattr(shapes, "_recent", {})
    monkeypatch.setattr(shapes, "_shape", lambda sql: calls.append(sql) or real(sql))
    decision = s.decide(other, "query")
    assert isinstance(decision, Mask) and calls == [other]
    Fingerprints()(other)  # telemetry asks next: the answer is remembered
    assert calls == [other]


def test_remembered_shapes_are_bounded_and_long_texts_are_not_kept(monkeypatch):
    monkeypatch.setattr(shapes, "_recent", {})
    for i in range(shapes._RECENT + 5):
        assert shapes.shape(f"SELECT {i} FROM t").constants == (str(i),)
    assert 0 < len(shapes._recent) <= shapes._RECENT
    long = "SELECT 1 FROM t WHERE a IN (" + ", ".join(map(str, range(2000))) + ")"
    assert len(long) > shapes._RECENT_TEXT and shapes.shape(long) is not None
    assert long not in shapes._recent


def test_long_statements_differing_in_their_spaces_fill_the_cache_only_to_its_byte_bound():
    """Hunt 21: an allowed 250 kB statement with a different run of spaces each time took an entry of its own
    (by shape: spaces are kept), 10000 of them about 2.5 GB. Now the cache stays within decision_cache_bytes."""
    case = dict(CASES[0], purpose="support")
    s = _session(case, 1000)
    cache = s.runtime.cache
    cache.clear()
    before, cache.max_bytes = cache.max_bytes, 16 * 1024 * 1024  # (masked: some 400 kB an entry)
    try:
        for n in range(60):
            s.decide("SELECT member_id FROM crm.members" + " " * (100_000 + n) + "WHERE member_id = 1", "query")
            assert cache.bytes <= cache.max_bytes
        assert 0 < len(cache) < 60
    finally:
        cache.max_bytes = before
        cache.clear()


def test_the_records_of_prepares_that_may_have_failed_are_bounded():
    """Hunt 21: 'PREPARE a AS SELECT <100 kB>; PREPARE a AS SELECT 2' again and again (each failing with 42P05)
    left one more candidate behind the name every time, 100 kB each. Past MAX_CANDIDATES the PREPARE is refused
    (54000) until the name is deallocated."""
    from proxy.enforcement.purpose import MAX_CANDIDATES

    case = dict(CASES[0], purpose="support")
    s = _session(case, 0)
    for n in range(MAX_CANDIDATES):
        assert not isinstance(s.decide(f"PREPARE a AS SELECT {n}; SELECT 1", "query"), Block)
    refused = s.decide("PREPARE a AS SELECT 99; SELECT 1", "query")
    assert isinstance(refused, Block) and refused.sqlstate == "54000" and "DEALLOCATE a" in refused.hint
    assert not isinstance(s.decide("PREPARE b AS SELECT 1", "query"), Block)  # other names are not affected
    s.decide("DEALLOCATE a", "query")
    assert not isinstance(s.decide("PREPARE a AS SELECT 1", "query"), Block)
