"""The demo's pieces that need no PostgreSQL: finding the server binaries, what it prints."""

from __future__ import annotations

import doctest
import sys
import types

import pytest

from proxy import cli, demo


def test_module_opens_with_what_it_owns():
    assert demo.__doc__.splitlines()[0].startswith("The ``purpose-proxy demo`` command: a throwaway PostgreSQL")
    assert doctest.testmod(demo).failed == 0


def test_system_binaries_come_first(tmp_path):
    assert demo.locate_postgres(lambda: tmp_path) == (tmp_path, f"PostgreSQL binaries in {tmp_path}")


def test_embedded_postgres_of_pgserver_when_no_system_binaries(tmp_path, monkeypatch):
    bin_dir = tmp_path / "pgserver" / "pginstall" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "initdb").write_text("")
    fake = types.ModuleType("pgserver")
    fake.__file__ = str(tmp_path / "pgserver" / "__init__.py")
    monkeypatch.setitem(sys.modules, "pgserver", fake)
    found, source = demo.locate_postgres(lambda: None)
    assert found == bin_dir.resolve() and "pgserver" in source


def test_clear_message_when_there_is_no_postgres(monkeypatch):
    monkeypatch.setitem(sys.modules, "pgserver", None)  # import pgserver raises ImportError
    with pytest.raises(demo.DemoError) as info:
        demo.locate_postgres(lambda: None)
    message = str(info.value)
    assert "no PostgreSQL server binaries found" in message
    assert "apt-get install postgresql" in message and "pip install pgserver" in message and "PG_BIN" in message


def test_cli_reports_the_missing_postgres_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(demo, "find_pg_bin", lambda: None)
    monkeypatch.setitem(sys.modules, "pgserver", None)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "purpose-proxy demo: no PostgreSQL server binaries found" in err


def test_every_step_names_a_role_and_purpose_of_the_policy():
    from proxy.devtools.sample import policies_dir
    from proxy.policy.engine import Policy

    policy = Policy.load(policies_dir())
    for step in demo.STEPS:
        assert step.role in policy.subjects and step.role not in policy.groups, step
        assert step.purpose is None or policy.may_declare(step.role, step.purpose).allowed, step
    assert {s.purpose for s in demo.STEPS if s.purpose} >= {"billing", "support", "marketing.personalized",
                                                            "marketing.ads.behavioural", "operator_training",
                                                            "prize_tax"}


def test_connection_strings_declare_the_purpose():
    lines = demo.connection_strings("127.0.0.1", 6432)
    assert ("psql \"host=127.0.0.1 port=6432 user=app_billing password=demo dbname=isp "
            "options='-c pii.purpose=billing'\"") in lines
