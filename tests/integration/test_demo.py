"""``purpose-proxy demo`` run as a user runs it: a subprocess that starts its own PostgreSQL and
proxy, walks through the statements, prints verdicts, rules and rows, and cleans up; and
``--keep``, which stays up for psql until interrupted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "demo", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def steps(output: str) -> dict[str, str]:
    """The demo's output per step title."""
    parts = re.split(r"^── \d+\. ", output, flags=re.M)[1:]
    return {part.splitlines()[0].rstrip(" ─"): part for part in parts}


def assert_cleaned_up(output: str) -> None:
    data_dir = re.search(r"data directory (\S+)", output).group(1)
    assert not Path(data_dir).exists()
    proxy_addr, pg_addr = re.search(r"listening on (\S+), in front of PostgreSQL on (\S+)", output).groups()
    for addr in (proxy_addr, pg_addr):
        host, port = addr.rsplit(":", 1)
        assert not port_open(host, int(port)), addr
    assert f"cleaned up: proxy stopped, PostgreSQL stopped and {data_dir} removed" in output


def test_demo_runs_to_completion_and_shows_verdicts(tmp_path):
    result = subprocess.run(demo_command(), capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                            env=env())
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    by_step = steps(out)
    assert len(by_step) >= 15

    billing = by_step["Billing reads overdue invoices"]
    assert "role     app_billing" in billing and "purpose  billing" in billing
    assert "verdict  ALLOWED" in billing and "policy.csv:" in billing
    assert "member_number | family_name | email | billing_month | amount" in billing
    assert re.search(r"BG\d{8} \| ", billing)  # real rows came back through the proxy

    marketing = by_step["The same invoices for marketing"]
    assert "verdict  BLOCKED" in marketing
    assert 'may not read personal data of category "payment.invoice"' in marketing
    assert "p, staff, marketing, payment, read, deny" in marketing  # the rule, from the error's DETAIL

    assert "verdict  BLOCKED" in by_step["The same for behavioural ads"]
    assert "p, staff, marketing.ads, contact, read, deny" in by_step["The same for behavioural ads"]
    # Part B personalised information is allowed, for the members who did not ask to stop it.
    assert "verdict  CONSENT-FILTERED" in by_step["Pages visited, with the member's name, for personalised information"]
    announcement = by_step["Recipients of an announcement"]
    billing_count = by_step["The same count for billing"]
    assert "verdict  CONSENT-FILTERED" in announcement and "verdict  ALLOWED" in billing_count
    recipients = [int(re.search(r"recipients\s+(\d+)", text).group(1)) for text in (announcement, billing_count)]
    assert 0 < recipients[0] < recipients[1]  # stop-of-use requests remove members from marketing only
    # the recording's own key is pseudonymised like the member id (it would map the calls back)
    assert "verdict  MASKED" in by_step["Recorded calls for operator training"]
    assert "verdict  BLOCKED" in by_step["Recorded calls for marketing"]
    assert "verdict  ALLOWED" in by_step["Prize tax data for prize tax processing"]
    assert "verdict  BLOCKED" in by_step["Prize tax data for marketing"]
    assert "no purpose declared" in by_step["Personal data without a declared purpose"]
    assert "verdict  ALLOWED" in by_step["Service plans without a declared purpose"]

    # Masking and aggregate-only: rows transformed by the rewrite came back.
    for title, wanted in (("Support looks at a member's card", "MASKED"),
                          ("Behavioural ads without identity", "MASKED"),
                          ("Members per operating system (the analyst's default purpose)", "AGGREGATE-ONLY")):
        text = by_step[title]
        assert f"verdict  {wanted}" in text and "rows " in text, text

    assert re.search(r"summary of \d+ statements: .*\d+ allowed.*\d+ blocked", out)
    assert_cleaned_up(out)


def test_demo_keep_stays_up_for_psql_until_interrupted(tmp_path):
    proc = subprocess.Popen(demo_command("--keep", "--members", "60"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path), env=env())
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "Press Ctrl-C" in out, out
        dsn = re.search(r'psql "(host=\S+ port=\d+ user=app_billing password=\S+ dbname=isp '
                        r"options='-c pii.purpose=billing')\"", out).group(1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SHOW pii.purpose").fetchone() == ("billing",)
            assert conn.execute("SELECT count(*) FROM billing.invoices").fetchone()[0] > 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute("SELECT score FROM credit.assessments")
            assert "credit.assessment" in str(refused.value)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "interrupted: cleaning up" in out
    assert_cleaned_up(out)
