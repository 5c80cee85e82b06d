"""`python -m benchmarks --quick`, cut down to a few seconds of measuring: every part runs against a real
PostgreSQL and real proxies, and the report and the JSON get every section.

Only what was done is asserted (work happened, verdicts are the policy's, refusals were refusals,
the cache answered by shape, the idle clients were all connected), never a timing.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from benchmarks import __main__ as bench
from benchmarks import stack as bench_stack

pytestmark = pytest.mark.integration


def test_quick_run_of_every_part(tmp_path, monkeypatch):
    # The hook for --workers must skip with a note when the proxy has no such option (the
    # other way round it starts proxy-enforcing-2w; that is not what this test is about).
    monkeypatch.setattr(bench_stack, "proxy_accepts_workers", lambda: False)
    results, raw = tmp_path / "RESULTS.md", tmp_path / "bench.json"
    results.write_text("# Benchmark results\n\nkept\n")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        status = bench.main(["--quick", "--duration", "1", "--workloads", "select", "tpcb",
                             "--targets", "direct", "proxy-enforcing", "proxy-enforcing-2w",
                             "--members", "40", "--statements", "6", "--decision-runs", "3",
                             "--idle-connections", "20", "--results", str(results), "--json", str(raw)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 0
    data = json.loads(raw.read_text())

    runs = data["runs"]
    assert {(r["workload"], r["target"]) for r in runs} == {(w, t) for w in ("select", "tpcb")
                                                            for t in ("direct", "proxy-enforcing")}
    for r in runs:
        assert r["transactions"] > 0 and r["failed"] == 0, r
        assert (r["cpu_us"] is None) == (r["target"] == "direct")

    rows = data["personal"]["rows"]
    has_pgbouncer = os.path.exists(bench_stack.PGBOUNCER)
    assert len(rows) == 2 * len({r["statement"] for r in rows}) == 12
    for r in rows:
        # The PgBouncer reference path runs where PgBouncer is installed (else a note says why not).
        for path in ("direct", "relay", "proxy") + (("pgbouncer",) if has_pgbouncer else ()):
            assert r[path]["n"] == 6, (r["statement"], path)
            assert r[path]["errors"] == ({"42501": 6} if r["verdict"] == "refused" and path == "proxy" else {})
        assert ("pgbouncer" in r) == has_pgbouncer
        assert ("rewritten" in r) == (r["verdict"] in ("masked", "consent-filtered", "aggregate-only"))
    assert [r["verdict"] for r in rows[::2]] == ["allowed", "masked", "consent-filtered", "refused", "allowed",
                                                 "aggregate-only"]
    assert data["personal"]["cache"]["shape_hits"] > 0

    cold = data["decisions"]
    assert len(cold) == 10 and all(r["warm_hits"] == 3 for r in cold)

    assert [(r["target"], r["connections"], r["backends"]) for r in data["idle"]] == [
        ("proxy", 20, 20), ("proxy-enforcing", 20, 20)]
    assert any("proxy-enforcing-2w skipped" in n and "--workers" in n for n in data["meta"]["notes"])

    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nkept\n")
    for heading in ("### Enforcement on", "### Personal-data workload", "### Decision latency per query kind",
                    "### Proxy memory with idle client connections", "### Notes", "### Per-round raw numbers"):
        assert heading in text, heading
