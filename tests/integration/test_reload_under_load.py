"""Policy reloads under load, through the real proxy and a real PostgreSQL: 20 clients run the soak's statements
for about 8 s while policy.csv flips every 0.5 s between a changed valid policy and an invalid one (the other valid
policy plus a broken line), noticed by the proxy's own file watcher.

No session may be dropped, the probe statement the changed policy flips must only ever be allowed (with the
member's rows) or refused with 42501 naming the flipped rule, and always by the policy that was in force while it
ran (checked against when each reload was seen on /metrics, and against each audit record's policy version); the
failed reloads are counted on /metrics and logged as keeping the previous policy. Nothing here asserts a timing.
"""

from __future__ import annotations

import json
import signal

import pytest

from benchmarks import soak

pytestmark = pytest.mark.integration


def test_policy_flips_valid_and_invalid_under_load(tmp_path):
    raw = tmp_path / "soak.json"
    previous = signal.getsignal(signal.SIGTERM)
    try:
        soak.main(["--clients", "20", "--active", "20", "--duration", "8", "--warmup", "1", "--members", "100",
                   "--sample-interval", "2", "--reload-interval", "0.5", "--reload-trigger", "watch",
                   "--watch-interval", "0.1", "--audit", "--no-results", "--json", str(raw)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    res = json.loads(raw.read_text())
    checks = {c["check"]: c for c in res["checks"]}

    # No session dropped, nothing but the policy's answers.
    assert res["losses"] == 0 and res["reconnects"] == 0, res["loss_examples"]
    assert res["unexpected"] == {} and res["timeouts"] == 0, res["unexpected_examples"]
    assert res["run"]["backends_connected"] == 20
    assert res["sqlstates"].keys() == {"42501"}

    # The probe: both outcomes happened, nothing else did, and never under the wrong policy.
    probe = next(k for k in res["by_kind"] if k["kind"] == soak.PROBE.name)
    assert set(probe["outcomes"]) == {"allow", "deny"}
    p = res["probes"]
    assert p["allowed"] > 0 and p["refused"] > 0 and p["other"] == 0 and p["violations"] == 0, p

    # Reloads: valid and invalid ones happened, each counted once on /metrics and logged, the version in
    # force after each the expected one.
    r = res["reloads"]
    assert r["valid"] >= 2 and r["invalid"] >= 2
    assert r["metrics_success"] == r["valid"] and r["metrics_failure"] == r["invalid"]
    assert r["confirmed"] == r["flips"] and r["problems"] == []
    assert r["log_failed_kept_previous"] == r["invalid"] and r["log_matches_flips"]
    assert set(r["versions_seen"]) == {r["version_A"], r["version_B"]}

    # The audit log: every statement decided under A or B, every probe record's verdict its version's.
    a = res["audit"]
    assert a["probe_records"] > 0 and a["probe_mismatches"] == 0 and a["other_versions"] == 0, a["examples"]
    assert a["reloads"] == {"success": r["valid"], "failure": r["invalid"]}

    for name in ("no connection lost", "no unexpected outcome", "every refused statement answered 42501",
                 "every probe decided by the policy in force", "no session, backend or socket left after the "
                 "clients left", "the log shows each failed reload kept the previous policy"):
        assert checks[name]["ok"], checks[name]
