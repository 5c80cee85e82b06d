"""The explain and check commands, run as a security team runs them (through the CLI entry point)."""

import json
import shutil
from pathlib import Path

from proxy.cli import main

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
SQL = ("SELECT m.family_name, c.card_number FROM member.members m JOIN billing.payment_methods c USING (member_id) "
       "WHERE m.email LIKE '%@secret-literal.example'")


def test_explain_names_columns_uses_categories_rules_and_verdict(capsys):
    assert main(["explain", "--role", "app_marketing", "--purpose", "marketing", "--policies", str(POLICIES), SQL]) == 0
    out = capsys.readouterr().out
    assert "verdict: block (42501)" in out
    assert "billing.payment_methods.card_number  [project]  -> block" in out
    assert "member.members.email  [filter]  -> allow" in out
    assert "policy.csv:" in out and "p, staff, marketing, payment, read, deny" in out
    assert "secret-literal" not in out  # never a value from the statement


def test_explain_json(capsys):
    assert main(["explain", "--json", "--role", "app_billing", "--purpose", "billing", "--policies", str(POLICIES),
                 SQL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"] == "allow"
    cols = {c["column"]: c for c in out["columns"]}
    assert cols["billing.payment_methods.card_number"]["categories"] == ["payment.card"]
    assert "secret-literal" not in json.dumps(out)


def test_explain_without_purpose_blocks_personal_data(capsys):
    main(["explain", "--role", "app_marketing", "--policies", str(POLICIES), "SELECT email FROM member.members"])
    assert "no purpose declared" in capsys.readouterr().out


def test_check_passes_on_the_shipped_policies(capsys):
    assert main(["check", str(POLICIES)]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and out.rstrip().endswith("ok")


def test_check_fails_on_a_broken_policy(capsys):
    broken = REPO / "tests" / "fixtures" / "policies" / "broken"
    assert main(["check", str(broken)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_fails_when_a_case_is_not_met(tmp_path, capsys):
    d = tmp_path / "policies"
    shutil.copytree(POLICIES, d)
    (d / "tests" / "wrong.yaml").write_text(
        "cases:\n  - name: marketing may read card numbers (it may not)\n    role: app_marketing\n"
        "    purpose: marketing\n    sql: SELECT card_number FROM billing.payment_methods\n    expect: allow\n")
    assert main(["check", str(d)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: " in out and "marketing may read card numbers" in out
