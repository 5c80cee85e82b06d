"""Temporary relations a session creates, which the proxy's loader cannot see (hunt 30).

PostgreSQL searches the session's temporary schema before the search_path's schemas unless pg_temp
is listed there (documentation 5.9.3); a temporary table named like a catalogued one would otherwise
be decided as that table.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from proxy.analysis.lexer import scan
from proxy.analysis.utility import temporary_relations
from proxy.policy.decision import Allow, Block
from tests.unit.test_cache import CASES, _session


@pytest.fixture
def admin(monkeypatch):
    def make(search_path=("crm", "public"), size=1000):
        s = _session(dict(CASES[0], purpose="operations", role="admin", search_path=list(search_path)), size)
        # (no event loop to load schemas on here)
        monkeypatch.setattr(s.runtime, "schema_changed", lambda *a, **k: None)
        monkeypatch.setattr(s.runtime, "refresh_schema", lambda *a, **k: None)
        return s
    return make


@pytest.mark.parametrize("sql, temp_first, names", [
    ("CREATE TEMP TABLE members (id int)", False, ["members"]),
    ("CREATE GLOBAL TEMPORARY TABLE IF NOT EXISTS members (id int)", False, ["members"]),
    ("CREATE TEMP VIEW notes AS SELECT 1", False, ["notes"]),
    ("CREATE OR REPLACE TEMP RECURSIVE VIEW notes (a) AS SELECT 1", False, ["notes"]),
    ("CREATE TEMP SEQUENCE s", False, ["s"]),
    ("CREATE TABLE pg_temp.members (id int)", False, ["members"]),
    ("CREATE TABLE pg_temp_7.members (id int)", False, ["members"]),
    ("CREATE TABLE members (id int)", True, ["members"]),
    ("CREATE TABLE members (id int)", False, []),
    ("CREATE TABLE crm.members2 (temp int)", False, []),
    ("CREATE TEMP TABLE members AS SELECT 1 AS id", False, ["members"]),
    ("SELECT 1 AS id INTO TEMP members", False, ["members"]),
    ("SELECT 1 AS id INTO members", True, ["members"]),
    ("SELECT (SELECT 1) AS id INTO TEMPORARY TABLE members", False, ["members"]),
    ("DROP TABLE pg_temp.members", True, []),
    ("CREATE INDEX ON pg_temp.members (id)", False, []),
    ("ALTER TABLE pg_temp.members RENAME TO notes", False, None),
    ("CREATE TEMP FOREIGN TABLE x () SERVER s", False, None),
    ("CREATE FOREIGN TABLE pg_temp.x () SERVER s", False, None),
    # the tables IMPORT FOREIGN SCHEMA creates are named by the remote server (temporary in pg_temp)
    ("IMPORT FOREIGN SCHEMA crm LIMIT TO (members) FROM SERVER loop INTO pg_temp", False, None),
    ("IMPORT FOREIGN SCHEMA crm FROM SERVER loop INTO public", True, []),
    # INDEX is an unreserved keyword: a table may be called so
    ("CREATE TABLE index (id int)", True, ["index"]),
    ("CREATE UNIQUE INDEX i ON pg_temp.members (id)", True, []),
])
def test_temporary_relations_created(sql, temp_first, names):
    assert temporary_relations(scan(sql), temp_first) == names


def test_unqualified_name_of_a_temp_table_is_refused_until_discarded(admin):
    s = admin()
    assert type(s.decide("SELECT email FROM members", "query")) is Allow
    assert type(s.decide("CREATE TEMP TABLE members (member_id int, email text)", "query")) is Allow
    for sql in ("SELECT email FROM members", "SELECT m.email FROM members AS m", 'TABLE "members"',
                "INSERT INTO members (email) SELECT email FROM crm.members",
                "CREATE VIEW notes AS SELECT email FROM members", "ALTER TABLE members RENAME TO x"):
        refused = s.decide(sql, "query")
        assert type(refused) is Block and refused.reason == "temporary-relation", sql
    # qualified names (and a name used only as a qualifier) are not in question
    assert type(s.decide("SELECT members.email FROM crm.members", "query")) is Allow
    assert type(s.decide("DISCARD TEMP", "query")) is Allow
    assert type(s.decide("SELECT email FROM members", "query")) is Allow


def test_where_pg_temp_is_listed_decides(admin):
    s = admin(["crm", "pg_temp", "public"])
    s.decide("CREATE TEMP TABLE members (member_id int)", "query")
    s.decide("CREATE TEMP TABLE notes (member_id int)", "query")
    assert type(s.decide("SELECT email FROM members", "query")) is Allow  # crm.members comes first
    assert s.decide("SELECT 1 FROM notes", "query").reason == "temporary-relation"  # before public.notes
    s.decide("SET search_path = pg_temp, crm", "query")
    assert s.decide("SELECT email FROM members", "query").reason == "temporary-relation"
    s.decide("RESET search_path", "query")  # back to crm, pg_temp, public
    assert type(s.decide("SELECT email FROM members", "query")) is Allow


def test_only_the_pg_temp_alias_places_the_temporary_schema(admin):
    """A pg_temp_N entry may be another session's temporary schema (or none): PostgreSQL skips it and searches
    the session's own first. A hunt set search_path to crm, pg_temp_99999 (SET, or set_config as pg_dump does)
    and had a temporary ``members`` decided as crm.members."""
    s = admin(["crm", "pg_temp_99999", "public"])
    s.decide("CREATE TEMP TABLE members (member_id int)", "query")
    assert s.decide("SELECT email FROM members", "query").reason == "temporary-relation"
    s.decide("SELECT set_config('search_path', 'crm, pg_temp_3', false)", "query")
    assert s.decide("SELECT email FROM members", "query").reason == "temporary-relation"
    s.decide("SET search_path = pg_temp_3, crm, pg_temp", "query")  # the alias; an own pg_temp_3 before it
    assert s.decide("SELECT email FROM members", "query").reason == "temporary-relation"
    s.decide("SET search_path = crm, pg_temp, pg_temp_3", "query")
    assert type(s.decide("SELECT email FROM members", "query")) is Allow  # crm.members comes first


def test_the_cache_does_not_answer_for_a_session_with_temp_tables(admin):
    s = admin(size=1000)
    other = admin(size=1000)
    assert type(other.decide("SELECT email FROM members WHERE member_id = 1", "query")) is Allow  # cached
    s.decide("SELECT 1 AS member_id INTO TEMP members", "query")
    assert s.decide("SELECT email FROM members WHERE member_id = 2", "query").reason == "temporary-relation"
    assert s.decide("SELECT email FROM members WHERE member_id = 1", "query").reason == "temporary-relation"


def test_a_temp_relation_of_unknown_name_refuses_what_reads_relations(admin):
    s = admin()
    # (a form temporary_relations does not read: its name is not told)
    assert type(s.decide("CREATE TYPE pg_temp.t AS (a int)", "query")) is Allow
    assert s.temp_unknown
    assert s.decide("SELECT email FROM crm.members", "query").reason == "temporary-relation"
    assert type(s.decide("SELECT 1", "query")) is Allow
    assert type(s.decide("SHOW search_path", "query")) is Allow
    s.decide("DISCARD ALL", "query")
    assert not s.temp_unknown and not s.temp_relations
    assert type(s.decide("SELECT email FROM members", "query")) is Allow


def test_discard_temp_inside_a_transaction_block_forgets_nothing(admin):
    """DISCARD TEMP runs in a transaction block, and ROLLBACK (or ROLLBACK TO SAVEPOINT) gives the temporary
    relations back: a hunt ran ``BEGIN; DISCARD TEMP`` and ``ROLLBACK``, and the temporary ``members``, filled
    with phone numbers, was then decided as the decoy public.members."""
    s = admin()
    s.decide("CREATE TEMP TABLE members (member_id int, email text)", "query")
    s.relay = SimpleNamespace(quiet=False)  # in a transaction block (or with statements in flight)
    assert type(s.decide("DISCARD TEMP", "query")) is Allow
    assert s.temp_relations == {"members"}
    assert s.decide("SELECT email FROM members", "query").reason == "temporary-relation"
    s.relay = None  # a quiet point
    s.decide("DISCARD TEMP", "query")
    assert not s.temp_relations

