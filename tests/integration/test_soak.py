"""`python -m benchmarks.soak`, cut down to 50 clients and a few seconds, so that the harness does not rot: it
starts everything, holds the clients, samples, reloads, checks and writes its report. Only what was done is
asserted, never a timing (nor the RSS criterion, which a few seconds cannot judge)."""

from __future__ import annotations

import json
import signal

import pytest

from benchmarks import soak

pytestmark = pytest.mark.integration


def test_short_soak(tmp_path):
    results, raw = tmp_path / "SOAK.md", tmp_path / "soak.json"
    results.write_text("# Soak results\n\nkept\n")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        soak.main(["--clients", "50", "--active", "10", "--duration", "5", "--warmup", "1", "--members", "100",
                   "--sample-interval", "1", "--results", str(results), "--json", str(raw)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    res = json.loads(raw.read_text())
    run = res["run"]
    assert run["backends_connected"] == 50 and run["idle_total"] == 40 and run["idle_alive"] == 40
    assert res["losses"] == 0 and res["unexpected"] == {}, res["unexpected_examples"]
    assert res["counted"] > 0 and all(k["n"] > 0 for k in res["by_kind"])
    assert res["refusal_sqlstates"].keys() == {"42501"}
    # Sampled: RSS and open files of the proxy, 2 sockets per client while they are connected, and back
    # to where they were once they left.
    phases = [s["phase"] for s in res["samples"]]
    assert phases[0] == "start" and phases[-1] == "end" and "warm" in phases
    assert all(s["rss_kb"] > 0 and s["sessions_open"] == 50 for s in res["samples"])
    assert all(s["fds"] >= res["fds"]["before"] + 100 for s in res["samples"])
    assert res["fds"]["after_close"] <= res["fds"]["before"] + 2
    assert run["sessions_after_close"] == 0 and run["backends_after_close"] == 0
    assert res["reloads"]["flips"] > 0 and res["reloads"]["problems"] == []
    assert {c["check"] for c in res["checks"]} >= {"RSS at the end within 10% of RSS after warm-up",
                                                   "every probe decided by the policy in force"}

    text = results.read_text()
    assert text.startswith("# Soak results\n\nkept\n")
    for heading in ("### Verdict", "### Throughput, latency, errors", "### Memory and open files of the proxy",
                    "### Policy reloads under load", "### Over time"):
        assert heading in text, heading
