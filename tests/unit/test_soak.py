"""The soak harness's pieces without PostgreSQL: options, the policies the reloads swap in, how an outcome is
judged, which policy may have been in force when, the proxy log's reload lines, the report's markers."""

from __future__ import annotations

import datetime as dt
import shutil

import pytest

from benchmarks import soak
from proxy.devtools.sample import policies_dir
from proxy.policy.engine import Policy
from proxy.policy.problems import PolicyError


def test_defaults_are_the_issue_s_soak():
    opts = soak.parse_args(["--no-results"])
    assert (opts.clients, opts.active, opts.duration, opts.warmup) == (1000, 100, 600, 60)
    assert opts.reload and opts.reload_interval == 1.0 and opts.reload_trigger == "sighup"
    assert opts.results is None
    assert soak.parse_args([]).results == soak.DEFAULT_RESULTS
    small = soak.parse_args(["--clients", "50", "--duration", "5", "--no-results"])
    assert small.active == len(soak.KINDS) and small.warmup == 1.0
    with pytest.raises(SystemExit):
        soak.parse_args(["--clients", "5", "--active", "6"])


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    for name in soak.POLICY_FILES:
        shutil.copyfile(policies_dir() / name, d / name)
    return d, soak.policy_variants(d)


def test_the_changed_policy_flips_only_the_probe_s_rule(variants):
    d, v = variants
    a, b = v.A.splitlines(), v.B.splitlines()
    assert [i + 1 for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y] == [v.flip_line]
    assert a[v.flip_line - 1] == soak.FLIP_ALLOW and b[v.flip_line - 1] == soak.FLIP_DENY
    assert Policy.load(d).version == v.version_A != v.version_B


@pytest.mark.parametrize("n", range(len(soak.BROKEN_LINES)))
def test_each_invalid_policy_is_the_other_valid_one_plus_a_broken_line(variants, tmp_path, n):
    d, v = variants
    for in_force, other in (("A", v.B), ("B", v.A)):
        text = v.invalid(n, in_force)
        assert text.startswith(other.rstrip("\n")) and text.rstrip("\n").endswith(soak.BROKEN_LINES[n])
    for name in soak.POLICY_FILES:
        shutil.copyfile(d / name, tmp_path / name)
    soak.write_atomically(tmp_path / "policy.csv", v.invalid(n, "A"))
    with pytest.raises(PolicyError):
        Policy.load(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


EXPECTED = soak.Expected(members={1, 2, 3}, visible_to_marketing={1, 3}, invoices={1: 2, 2: 0})
BY_NAME = {st.name: st for st in soak.KINDS}


@pytest.mark.parametrize("kind, values, result, label", [
    ("lookup, allowed", {"id": 2}, ("rows", 1, None), "ok"),
    ("lookup, allowed", {"id": 2}, ("rows", 0, None), "unexpected: 0 rows, not 1"),
    ("lookup, masked", {"id": 2}, ("rows", 1, [{"birth_date": dt.date(1990, 1, 1)}]), "ok"),
    ("lookup, masked", {"id": 2}, ("rows", 1, [{"birth_date": dt.date(1990, 5, 17)}]),
     "unexpected: birth_date not masked to its year"),
    ("lookup, consent-filtered", {"id": 2}, ("rows", 0, None), "ok"),
    ("lookup, consent-filtered", {"id": 2}, ("rows", 1, None), "unexpected: consent filter returned 1 rows, not 0"),
    ("lookup, refused", {"id": 1}, ("error", "42501", "may not", None), "ok"),
    ("lookup, refused", {"id": 1}, ("rows", 1, None), "unexpected: 1 rows where 42501 was expected"),
    ("lookup, refused", {"id": 1}, ("error", "57014", "canceled", None), "unexpected: 57014 canceled"),
    ("flip probe", {"id": 1}, ("rows", 2, None), "allow"),
    ("flip probe", {"id": 1}, ("rows", 0, None), "unexpected: probe returned 0 rows, not 2"),
    ("flip probe", {"id": 1}, ("error", "42501", "may not", f"... denied by policy.csv:103: {soak.FLIP_DENY}"),
     "deny"),
    ("flip probe", {"id": 1}, ("error", "42501", "may not", "denied by default"), "unexpected: 42501 may not"),
    ("aggregate (k=10)", {"since": dt.date(2020, 1, 1)}, ("timeout",), "unexpected: timeout"),
    ("join (3 tables)", {"id": 1}, ("lost", "reset"), "unexpected: lost"),
])
def test_judge(kind, values, result, label):
    assert soak.judge(BY_NAME[kind], values, result, EXPECTED) == label


def test_possible_versions():
    # A in force; B written at 10, seen at 10.3; A written at 12, never confirmed.
    tr = [(10.0, 10.3, "B"), (12.0, float("inf"), "A")]
    assert soak.possible_versions(tr, "A", 1, 9) == {"A"}
    assert soak.possible_versions(tr, "A", 9, 10.1) == {"A", "B"}
    assert soak.possible_versions(tr, "A", 10.1, 10.2) == {"A", "B"}
    assert soak.possible_versions(tr, "A", 10.4, 11) == {"B"}
    assert soak.possible_versions(tr, "A", 11, 12.5) == {"A", "B"}
    assert soak.possible_versions(tr, "A", 13, 14) == {"A", "B"}  # unconfirmed: either, from then on


def test_probe_check_finds_a_decision_by_a_policy_not_in_force():
    rec = soak.Recorder(0.0)
    v = soak.Variants("a", "b", "A", "B", 1)

    class Flips:
        def transitions(self):
            return [(10.0, 10.3, "B")]

    probe = soak.PROBE
    rec.record(probe, {"id": 1}, ("rows", 2, None), 1, 2, EXPECTED)  # A in force: allowed, right
    rec.record(probe, {"id": 1}, ("error", "42501", "", soak.FLIP_DENY), 10.0, 10.5, EXPECTED)  # either
    rec.record(probe, {"id": 1}, ("error", "42501", "", soak.FLIP_DENY), 11, 12, EXPECTED)  # B: right
    rec.record(probe, {"id": 1}, ("rows", 2, None), 11, 12, EXPECTED)  # allowed under B: wrong
    rec.record(probe, {"id": 1}, ("error", "42501", "", soak.FLIP_DENY), 3, 4, EXPECTED)  # refused under A: wrong
    out = soak.probe_check(rec, Flips(), v)
    assert (out["allowed"], out["refused"], out["other"]) == (2, 3, 0)
    assert out["violations"] == 2 and out["during_a_reload"] == 1
    assert [e["outcome"] for e in out["examples"]] == ["allowed", "refused"]


def test_reload_log_lines():
    log = ("2026-11-23T22:01:02.003Z INFO proxy.enforcement.runtime: policy reloaded (SIGHUP): version aa -> bb\n"
           "2026-11-23T22:01:03.003Z ERROR proxy.enforcement.runtime: policy reload (file change) failed; the "
           "previous policy bb stays in force: policy.csv:274: ...\n"
           "2026-11-23T22:01:04.003Z INFO proxy.session: something else\n")
    assert soak.reload_log(log) == [("ok", "aa", "bb"), ("failed", "bb", "")]


def test_report_section_replaces_only_its_markers(tmp_path):
    path = tmp_path / "SOAK.md"
    soak.write_results(path, f"{soak.BEGIN}\nfirst\n{soak.END}")
    path.write_text("# Soak results\n\nnotes above\n\n" + path.read_text().split("\n\n", 1)[1] + "\nnotes below\n")
    soak.write_results(path, f"{soak.BEGIN}\nsecond\n{soak.END}")
    text = path.read_text()
    assert "first" not in text and "second" in text
    assert text.startswith("# Soak results\n\nnotes above\n") and text.endswith("notes below\n")
