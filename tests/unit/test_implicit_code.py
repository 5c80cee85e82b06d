"""Code PostgreSQL runs without the statement naming it (triggers, defaults, constraints, indexes,
row-level security policies, rules, operators, operator classes, domains, event triggers) counts as
called: ``Schema.implicit``/``on_write``/``on_read``/``rules`` and ``StatementAccess.implicit_functions``."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.analysis.access import analyze
from proxy.analysis.schema import Schema, _relation_code
from proxy.policy.decision import Allow, Block
from proxy.policy.engine import Policy
from proxy.policy.verdict import decide_statement

BASIC = Path(__file__).resolve().parents[1] / "fixtures" / "policies" / "basic"

BASE = {
    "schemas": {
        "crm": {"tables": {"members": ["member_id", "name", "email", "phone"],
                           "audit": ["id", "note"], "plain": ["id", "note"]},
                "views": {"member_names": {"columns": ["member_id", "name"],
                                           "sql": "SELECT m.member_id, m.name FROM crm.members m"}}},
    },
}
IMPLICIT = {
    "functions": {"crm.num_eq": "is behind the operator crm.="},
    "on_write": {"crm": {"members": {"crm.stamp": "runs in a trigger on crm.members",
                                     "crm.cards": "is behind a column default of crm.members"}}},
    "on_read": {"crm": {"audit": {"crm.may_see": "is behind a row-level security policy of crm.audit"}}},
    "rules": {"crm": {"plain": ["crm.plain"]}},
}


def schema(**implicit) -> Schema:
    return Schema.from_dict({**BASE, "implicit": implicit})


def st(sql: str, s: Schema):
    return analyze(sql, s, ["crm"]).statements[0]


def test_round_trip_and_version():
    full = schema(**IMPLICIT)
    again = Schema.from_dict(full.to_dict(include_version=False))
    assert (again.implicit, again.on_write, again.on_read, again.rules) == \
        (full.implicit, full.on_write, full.on_read, full.rules)
    assert again.version == full.version
    assert full.to_dict()["implicit"] == IMPLICIT
    plain = Schema.from_dict(BASE)
    assert "implicit" not in plain.to_dict()
    versions = {plain.version, full.version}
    for key in IMPLICIT:  # each part alone changes the version
        versions.add(schema(**{key: IMPLICIT[key]}).version)
    assert len(versions) == 2 + len(IMPLICIT)


def test_a_schema_without_such_code_reports_nothing():
    s = Schema.from_dict(BASE)
    for sql in ("INSERT INTO crm.members (member_id) VALUES (1) RETURNING name", "SELECT note FROM crm.audit",
                "INSERT INTO crm.plain VALUES (1, 'x')", "TRUNCATE crm.members"):
        a = st(sql, s)
        assert not a.unsupported and a.implicit_functions == {}, sql


def test_writes_count_the_relations_code_and_reads_do_not():
    s = schema(on_write=IMPLICIT["on_write"])
    for sql in ("INSERT INTO crm.members (member_id) VALUES (1)", "UPDATE members SET phone = 'x'",
                "DELETE FROM crm.members WHERE member_id = 1", "TRUNCATE crm.members",
                "COPY crm.members (member_id) FROM STDIN",
                "MERGE INTO crm.members m USING crm.plain p ON m.member_id = p.id WHEN MATCHED THEN DELETE",
                "WITH x AS (UPDATE crm.members SET name = 'n' RETURNING 1) SELECT * FROM x",
                "INSERT INTO crm.member_names (member_id) VALUES (2)",  # through an updatable view
                "PREPARE p AS INSERT INTO crm.members (member_id) VALUES ($1)",
                "EXPLAIN ANALYZE DELETE FROM crm.members"):
        a = st(sql, s)
        assert not a.unsupported, (sql, a.unsupported)
        funcs = dict(a.implicit_functions)
        if a.inner is not None:
            funcs.update(a.inner.implicit_functions)
        assert funcs == IMPLICIT["on_write"]["crm"]["members"], sql
    for sql in ("SELECT name FROM crm.members", "SELECT * FROM crm.member_names", "COPY crm.members TO STDOUT",
                "INSERT INTO crm.audit SELECT member_id, name FROM crm.members"):
        a = st(sql, s)
        assert not a.unsupported and a.implicit_functions == {}, sql


def test_row_level_security_policies_count_on_reads_and_writes():
    s = schema(on_read=IMPLICIT["on_read"])
    want = {"crm.may_see": "is behind a row-level security policy of crm.audit"}
    for sql in ("SELECT 1 FROM crm.audit", "SELECT count(*) FROM (SELECT id FROM audit) x",
                "UPDATE crm.audit SET note = 'x'", "COPY crm.audit TO STDOUT"):
        assert st(sql, s).implicit_functions == want, sql
    assert st("SELECT name FROM crm.members", s).implicit_functions == {}


def test_writes_to_relations_with_rules_are_refused():
    s = schema(rules={"crm": {"plain": ["crm.plain"], "members": ["crm.audit"]}})
    a = st("INSERT INTO crm.plain VALUES (1)", s)
    assert a.unsupported == ["crm.plain has rules (CREATE RULE), which PostgreSQL runs instead of or besides a "
                             "write to it and the analysis does not read"]
    a = st("DELETE FROM crm.members", s)
    assert "reaches crm.audit" in a.unsupported[0]
    for sql in ("SELECT * FROM crm.plain", "TRUNCATE crm.plain", "COPY crm.plain FROM STDIN"):  # no rules run
        assert not st(sql, s).unsupported, sql


def test_global_code_counts_in_every_statement():
    s = schema(functions=IMPLICIT["functions"])
    for sql in ("SELECT 1", "SELECT name FROM crm.members WHERE member_id IN (1.0)", "SET search_path = crm",
                "CREATE TABLE crm.x (id int)"):
        assert st(sql, s).implicit_functions == IMPLICIT["functions"], sql
    assert st("SELECT 1", s).functions == set()


def test_the_load_closes_writes_over_partitions_and_foreign_key_actions():
    code = [{"schema": "s", "name": "leaf", "how": "trigger", "function": "s.trg"},
            {"schema": "s", "name": "parent", "how": "default", "function": "s.dflt"},
            {"schema": "s", "name": "leaf", "how": "policy", "function": "s.pol"}]
    reach = [{"from_schema": "s", "from_name": "root", "to_schema": "s", "to_name": "parent"},
             {"from_schema": "s", "from_name": "parent", "to_schema": "s", "to_name": "leaf"},
             {"from_schema": "s", "from_name": "leaf", "to_schema": "s", "to_name": "root"}]  # a cycle ends
    on_write, on_read, rules = _relation_code(code, [{"schema": "s", "name": "leaf"}], reach)
    assert on_write[("s", "root")] == {"s.dflt": "is behind a column default of s.parent",
                                       "s.trg": "runs in a trigger on s.leaf"}
    assert on_write[("s", "leaf")]["s.trg"] == "runs in a trigger on s.leaf"
    assert on_read == {("s", "leaf"): {"s.pol": "is behind a row-level security policy of s.leaf"}}
    assert rules == {("s", "root"): ["s.leaf"], ("s", "parent"): ["s.leaf"], ("s", "leaf"): ["s.leaf"]}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.load(BASIC)


def decide(sql: str, s: Schema, policy: Policy):
    return decide_statement(analyze(sql, s, ["crm"]), role="app", purpose="support", policy=policy)


def test_the_policy_refuses_undeclared_implicit_functions_naming_why(policy):
    s = schema(on_write={"crm": {"plain": {"crm.cards": "runs in a trigger on crm.plain"}}})
    block, expl = decide("INSERT INTO crm.plain VALUES (1, 'x')", s, policy)
    assert isinstance(block, Block)
    assert block.message.startswith("function crm.cards runs in a trigger on crm.plain, which PostgreSQL runs "
                                    "without the statement naming it, and it is not declared")
    assert "crm.cards" in expl.functions
    plain = Schema.from_dict(BASE)
    assert not isinstance(decide("INSERT INTO crm.plain VALUES (1, 'x')", plain, policy)[0], Block)


def test_declared_implicit_functions_count_what_they_read(policy):
    # crm.label is declared (reads crm.members.name): behind a trigger it reads that column
    s = schema(on_write={"crm": {"plain": {"crm.label": "runs in a trigger on crm.plain"}}})
    _, expl = decide("INSERT INTO crm.plain VALUES (1, 'x')", s, policy)
    assert "crm.label" in expl.functions
