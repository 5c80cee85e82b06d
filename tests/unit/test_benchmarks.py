"""The benchmark harness's pieces that need no PostgreSQL: options, the benchmark policy, the statements
and their verdicts under the seed policy, in-process decision timing, /proc readings and the report.

Nothing here asserts a timing: the numbers live in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks import decisions, personal, procfs, report
from benchmarks.__main__ import parse_args
from benchmarks.pgbench import Run
from benchmarks.stack import BENCH_POLICY
from proxy.devtools.sample import policies_dir

REPO = Path(__file__).resolve().parents[2]


def test_quick_fills_what_was_not_given_and_explicit_options_win():
    quick = parse_args(["--quick"])
    assert (quick.rounds, quick.duration, quick.scale, quick.results) == (1, 2, 1, None)
    assert quick.statements and quick.decision_runs and quick.idle_connections < 1000
    mixed = parse_args(["--quick", "--duration", "1", "--idle-connections", "7"])
    assert (mixed.duration, mixed.idle_connections, mixed.rounds) == (1, 7, 1)
    full = parse_args([])
    assert (full.rounds, full.idle_connections, full.decision_runs) == (3, 1000, 200)
    assert full.results is not None and full.parts == ["pgbench", "personal", "decisions", "idle"]


def test_the_benchmark_policy_passes_its_own_checks():
    r = subprocess.run([sys.executable, "-m", "proxy", "check", str(BENCH_POLICY)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 problem(s)" in r.stdout


def test_personal_statements_render_both_variants():
    st = next(s for s in personal.STATEMENTS if "{since}" in s.template)
    import datetime as dt

    values = {"since": dt.date(2020, 2, 3)}
    assert "joined_at >= '2020-02-03'" in st.simple(values)
    assert "joined_at >= %(since)s" in st.prepared()
    text, params = personal._as_psycopg("SELECT 1 FROM t WHERE a = $2 AND b LIKE '%x' AND c = $1",
                                        {"x": 1, "y": 2}, ["x", "y"])
    assert text == "SELECT 1 FROM t WHERE a = %s AND b LIKE '%%x' AND c = %s" and params == (2, 1)


def test_the_seed_policy_gives_each_statement_its_intended_verdict():
    policies = policies_dir()
    state = decisions.schema_file_state(policies)
    rt = decisions.runtime(policies, 0)
    import random

    rng = random.Random(1)
    for st in personal.STATEMENTS:
        s = decisions.session(rt, state, "isp", st.role, st.purpose)
        assert decisions.verdict(s.decide(st.simple(st.values(rng, 100)), "query")) == st.expect, st.name
        pg_text = st.prepared().replace("%(id)s", "$1").replace("%(since)s", "$1")
        assert decisions.verdict(s.decide(pg_text, "parse")) == st.expect, st.name


def test_decision_timing_covers_every_kind_cold_and_warm():
    policies = policies_dir()
    rows = decisions.measure(policies, decisions.schema_file_state(policies), "isp", runs=3)
    assert [r["kind"] for r in rows][:6] == ["point select", "3-table join", "CTE + subquery", "GROUP BY",
                                             "INSERT RETURNING", "30-line report"]
    assert {r["verdict"] for r in rows[:6]} == {"allowed"}
    assert [r["verdict"] for r in rows[6:]] == ["masked", "consent-filtered", "refused", "aggregate-only"]
    assert rows[5]["lines"] >= 30
    for r in rows:
        assert r["cold_p50_us"] > 0 and r["warm_p50_us"] > 0
        assert (r["warm_hits"], r["warm_misses"]) == (3, 0), r["kind"]  # warm runs are answered by shape


def test_distinct_constants_for_every_run():
    for k in decisions.KINDS:
        texts = {k.sql(i) for i in range(50)}
        assert len(texts) == 50, k.name


def test_procfs_reads_this_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in procfs.tree(os.getpid())
        user, sys_ = procfs.tree_cpu_ticks(os.getpid())
        assert user + sys_ > 0
        assert procfs.tree_rss_kb(os.getpid()) > procfs.status_kb(os.getpid(), "VmRSS")
    finally:
        child.kill()
        child.wait()


def _runs() -> list[Run]:
    out = []
    for rnd in (1, 2, 3):
        for w in ("select", "select-prepared", "tpcb"):
            for t, tps, cpu in (("direct", 30000, None), ("pgbouncer", 15000, 20.0), ("proxy", 14000, 30.0),
                                ("proxy-enforcing", 12000 + rnd, 40.0), ("proxy-enforcing-2w", 16000, 50.0)):
                out.append(Run(rnd, w, t, tps / (7 if w == "tpcb" else 1), 0.5, 1000, 0,
                               None if cpu is None else cpu / 2, None if cpu is None else cpu / 2))
    return out


def _extras() -> dict:
    stats = {"n": 10, "p50_us": 100.0, "p99_us": 300.0, "mean_us": 120.0, "errors": {}}
    rows = []
    for st in personal.STATEMENTS:
        for variant in personal.VARIANTS:
            proxy = dict(stats, p50_us=180.0, p99_us=500.0,
                         errors={"42501": 10} if st.expect == "refused" else {})
            row = {"statement": st.name, "variant": variant, "role": st.role, "purpose": st.purpose,
                   "verdict": st.expect, "sql": st.template, "direct": stats, "pgbouncer": dict(stats, p50_us=140.0),
                   "relay": dict(stats, p50_us=150.0), "proxy": proxy}
            if st.expect not in ("allowed", "refused"):
                row["rewritten"] = dict(stats, p50_us=110.0)
            rows.append(row)
    cold = [{"kind": k.name, "role": k.role, "purpose": k.purpose, "verdict": "allowed", "lines": 1, "chars": 80,
             "runs": 5, "cold_p50_us": 900.0, "cold_p99_us": 2000.0, "cold_mean_us": 1000.0, "warm_p50_us": 8.0,
             "warm_p99_us": 20.0, "warm_hits": 5, "warm_misses": 0} for k in decisions.KINDS]
    idle = [{"mode": "proxy (relay only)", "target": "proxy", "connections": 1000, "backends": 1000,
             "rss_idle_kb": 30000, "rss_connected_kb": 45000, "rss_after_close_kb": 45000, "hwm_kb": 46000,
             "per_connection_kb": 15.0, "rss_connected_mb": 46.08, "connect_seconds": 4.0, "nofile_soft": 4096,
             "nofile_hard": 4096}]
    return {"personal": {"rows": rows, "rounds": 3, "per_round": 10, "members": 100,
                         "cache": {"shape_hits": 90.0, "text_hits": 5.0, "misses": 6.0}},
            "decisions": cold, "idle": idle,
            "rss_at_end": [{"target": "proxy", "rss_kb": 40000, "hwm_kb": 41000}]}


def _meta() -> dict:
    return {"date": "2026-01-01T00:00:00+00:00", "command": "python -m benchmarks", "machine": {"cpu": "test"},
            "versions": {"postgresql": "15"}, "revision": "abc", "uvloop": True, "rounds": 3, "duration": 10,
            "clients": 8, "threads": 2, "scale": 10, "load_before": "1 1 1", "load_after": "2 2 2",
            "load": {"personal": "1.00 1.00 1.00"}, "notes": ["proxy-enforcing-2w skipped: no --workers"]}


def test_report_has_every_section_and_keeps_what_is_outside_the_markers(tmp_path):
    runs = _runs()
    summary = report.summarise(runs)
    assert summary["select"]["proxy-enforcing"]["tps"] == 12002  # the median of the three rounds
    text = report.markdown(_meta(), runs, summary, _extras())
    for heading in ("Issue #6 acceptance criteria", "### Summary (medians over 3 rounds)", "### Enforcement on",
                    "### Scaling from 1 to 2 workers", "### Personal-data workload", "### Decision latency per query",
                    "### Proxy memory with idle client connections", "### Notes", "### Per-round raw numbers"):
        assert heading in text, heading
    assert "| select | 30000 | 15000 | 14000 | 12002 | **0.80** |" in text
    assert "**2.00**" in text  # CPU enforcing / PgBouncer
    assert "40.0 / 30.0 / 20.0" not in text and "20.0 / 30.0 / 40.0" in text  # CPU per statement, in that order
    assert "| +80 |" not in text and "**+80**" in text  # added p50 = proxy - direct
    assert "| 100 / 140 / 150 / 180 |" in text and "| +40 | +50 |" in text  # pgbouncer beside the relay
    assert "no --workers" in text
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nintro\n\n" + report.BEGIN + "\nold\n" + report.END
                   + "\n\n## Analysis\nkept\n")
    report.write_results(out, text)
    written = out.read_text()
    assert "intro" in written and "## Analysis\nkept" in written and "\nold\n" not in written
    assert written.count(report.BEGIN) == 1


def test_acceptance_rows_follow_the_thresholds():
    runs = _runs()
    rows = {r[0]: r for r in report.acceptance(report.summarise(runs), _extras())}
    simple = rows["pgbench -S simple: enforcing TPS / PgBouncer >= 0.8"]
    assert simple[1] == "0.80" and simple[2] == "met"
    assert rows["select: enforcing CPU per statement <= 1.5 x PgBouncer's"][2] == "**not met**"
    assert rows["personal data, simple: added p50 <= 150 us (worst statement)"][2] == "met"
    assert rows["cold decision p50 < 1500 us for the six query kinds (worst)"][2] == "met"
    assert rows["proxy (relay only): RSS with 1000 idle clients < 150 MB"][2] == "met"
