"""The sample ISP / telecom database in a real PostgreSQL: schema.sql and the generated data load,
the live schema is exactly policies/schema.yaml, and ``purpose-proxy check --dsn`` passes on it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from proxy.analysis.schema import Schema, load_schema
from proxy.devtools.sample import data
from proxy.policy.engine import Policy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DATABASE = "sample_isp"
SAMPLE_SCHEMAS = {"service", "member", "billing", "credit", "browsing", "ads", "support", "events", "partners",
                  "prizes", "telecom"}


@pytest.fixture(scope="module")
def sample_db(pg):
    """Database sample_isp with schema.sql and the generated rows; yields (DSN, rows loaded per table)."""
    pg.psql_admin(f"DROP DATABASE IF EXISTS {DATABASE}")
    pg.psql_admin(f"CREATE DATABASE {DATABASE}")
    dsn = pg.url("postgres", dbname=DATABASE)
    # The policy's roles, so that `check --dsn` can tell its rules' subjects from misspellings.
    policy = Policy.load(REPO / "policies")
    roles = [r for r in sorted(policy.subjects) if r not in policy.groups and r not in _existing_roles(pg)]
    for role in roles:
        pg.psql_admin(f'CREATE ROLE "{role}" NOLOGIN')

    async def setup():
        conn = await asyncpg.connect(dsn)
        try:
            counts = await data.load(conn)
            live = {}
            for name in counts:
                live[name] = await conn.fetchval(f"SELECT count(*) FROM {name}")
            schema = await load_schema(conn)
        finally:
            await conn.close()
        return counts, live, schema

    counts, live, schema = asyncio.run(setup())
    yield dsn, counts, live, schema
    pg.psql_admin(f"DROP DATABASE IF EXISTS {DATABASE}")
    for role in roles:
        pg.psql_admin(f'DROP ROLE IF EXISTS "{role}"')


def _existing_roles(pg) -> set[str]:
    async def fetch():
        conn = await asyncpg.connect(pg.url("postgres", dbname="postgres"))
        try:
            return {r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_catalog.pg_roles")}
        finally:
            await conn.close()

    return asyncio.run(fetch())


def shape(schema: Schema) -> dict:
    return {
        "relations": {f"{r.schema}.{r.name}": (r.kind, r.columns, r.primary_key) for r in schema.relations
                      if r.schema in SAMPLE_SCHEMAS},
        "functions": {f.qualified: (sorted(f.languages), f.volatility, sorted(f.kinds)) for f in schema.functions
                      if f.schema in SAMPLE_SCHEMAS},
    }


def test_generated_rows_load(sample_db):
    _, counts, live, _ = sample_db
    assert counts == live
    assert live["member.members"] == 300 and all(live.values())


def test_live_schema_is_exactly_the_policy_schema_file(sample_db):
    _, _, _, schema = sample_db
    assert shape(schema) == shape(Schema.from_file(str(REPO / "policies" / "schema.yaml")))


def test_purpose_proxy_check_against_the_live_database(sample_db):
    dsn, _, _, _ = sample_db
    result = subprocess.run([sys.executable, "-m", "proxy", "check", str(REPO / "policies"), "--dsn", dsn],
                            capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert " 0 problem(s)" in last and last.endswith(": ok"), result.stdout
    assert "0 failed" in result.stdout


def fetchval(dsn: str, sql: str):
    """One value of ``sql``, run directly in the sample database."""
    async def run():
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def policies_copy(tmp_path: Path) -> Path:
    """A copy of the shipped policy directory to break on purpose."""
    import shutil

    return Path(shutil.copytree(REPO / "policies", tmp_path / "policies"))


def check_live(policies: Path, dsn: str) -> subprocess.CompletedProcess:
    """``purpose-proxy check POLICIES --dsn DSN``, as a security team runs it."""
    return subprocess.run([sys.executable, "-m", "proxy", "check", str(policies), "--dsn", dsn],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))


def test_check_against_the_live_database_finds_a_deny_rule_for_a_role_it_does_not_have(sample_db, tmp_path):
    """Hunt 20: 'analysts' for 'analyst' kept a deny from ever applying, and check --dsn said nothing."""
    dsn = sample_db[0]
    policies = policies_copy(tmp_path)
    with open(policies / "policy.csv", "a") as f:
        f.write("p, analysts, research, payment.invoice, read, deny\n")
    result = check_live(policies, dsn)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rule for 'analysts', which is neither a database role nor a group: it can never match" in result.stdout


def test_check_against_the_live_database_finds_consent_values_the_filter_does_not_read(sample_db, tmp_path):
    """Hunt 20: consent values that differ from the catalog's only in case (a purpose 'Marketing', or the
    catalog's 'Withdrawn' for the database's 'withdrawn') switch the filter off for those rows without a word;
    check --dsn now reads the values the consent table holds."""
    dsn = sample_db[0]
    policies = policies_copy(tmp_path)
    catalog = policies / "catalog.yaml"
    catalog.write_text(catalog.read_text().replace("  withdrawn: [withdrawn]\n", "  withdrawn: [Withdrawn]\n"))

    withdrawn = fetchval(dsn, "SELECT count(*) FROM privacy.consents WHERE status = 'withdrawn'")
    fetchval(dsn, "INSERT INTO privacy.consents (member_id, purpose, status, recorded_at) "
                  "VALUES (2, 'Marketing', 'granted', '2000-01-01')")
    try:
        result = check_live(policies, dsn)
    finally:
        fetchval(dsn, "DELETE FROM privacy.consents WHERE recorded_at = '2000-01-01'")
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert f"{withdrawn} rows have status 'withdrawn', which the filter does not read as 'Withdrawn'" in out, out
    assert "1 row has purpose 'Marketing', which names no purpose" in out, out


def test_check_against_the_live_database_reads_the_further_consent_sources(sample_db, tmp_path):
    """A further consent source (the guardians' consents) is checked like the consent table: its columns
    against the live schema, and the scope values it holds against the purposes."""
    dsn = sample_db[0]
    policies = policies_copy(tmp_path)
    catalog = policies / "catalog.yaml"
    text = catalog.read_text()
    # A column the catalog lists (so the policy loads) but the database does not have; and a scope column.
    text = text.replace("      revoked_at: [minor.guardian_consent]\n",
                        "      revoked_at: [minor.guardian_consent]\n      withdrawn_on: [minor.guardian_consent]\n")
    text = text.replace("      revoked: revoked_at\n", "      revoked: withdrawn_on\n      scope: scope\n")
    catalog.write_text(text)

    minors = fetchval(dsn, "SELECT count(*) FROM member.guardian_consents WHERE scope = 'service_use'")
    fetchval(dsn, "INSERT INTO member.guardian_consents VALUES (9999, 2, 'g', '父', '000', 'Marketing', "
                  "'2000-01-01', NULL)")
    try:
        result = check_live(policies, dsn)
    finally:
        fetchval(dsn, "DELETE FROM member.guardian_consents WHERE consent_id = 9999")
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "further source member.guardian_consents: revoked column withdrawn_on is not in the database " \
           "schema" in out, out
    assert "1 row has scope 'Marketing', which names no purpose" in out, out
    assert f"{minors} rows have scope 'service_use', not a purpose of purposes.yaml" in out, out


def test_the_consent_filter_hides_event_participants_who_are_members_that_withdrew(sample_db):
    # events.participants once named participant_id as its subject: the filter then looked
    # participant ids up among the consent table's member ids, showing members who withdrew.
    from proxy.config import Config
    from proxy.enforcement.hook import SessionInfo
    from proxy.enforcement.purpose import PurposeSession
    from proxy.enforcement.runtime import DatabaseState, PolicyRuntime
    from proxy.policy.decision import Mask

    dsn, _, _, schema = sample_db
    runtime = PolicyRuntime(Config(policies=str(REPO / "policies"), schema_dsn="unused", decision_cache_size=0,
                                   policy_watch_interval=0, schema_refresh_interval=0))
    purpose = "marketing.announcements"
    session = PurposeSession(runtime, SessionInfo("t", "127.0.0.1", {
        "user": "app_marketing", "database": DATABASE, "options": f"-c pii.purpose={purpose}"}), DatabaseState(schema))
    decision = session.decide("SELECT participant_id, member_id FROM events.participants", "query")
    assert isinstance(decision, Mask) and "consent" in decision.methods, decision

    async def run():
        conn = await asyncpg.connect(dsn)
        try:
            shown = await conn.fetch(decision.sql)
            everyone = await conn.fetch("SELECT participant_id, member_id FROM events.participants")
            decisions = await conn.fetch("SELECT member_id, purpose, status, recorded_at FROM privacy.consents")
        finally:
            await conn.close()
        return shown, everyone, decisions

    shown, everyone, decisions = asyncio.run(run())
    last = {}  # a withdrawal counts unless a later decision for the same member and purpose exists
    for r in decisions:
        key = (r["member_id"], r["purpose"])
        last[key] = max(last.get(key, r["recorded_at"]), r["recorded_at"])
    withdrew = {r["member_id"] for r in decisions if r["purpose"] in ("marketing", purpose)
                and r["status"] == "withdrawn" and r["recorded_at"] == last[(r["member_id"], r["purpose"])]}
    expected = {(r["participant_id"], r["member_id"]) for r in everyone if r["member_id"] not in withdrew}
    assert {(r["participant_id"], r["member_id"]) for r in shown} == expected
    assert len(expected) < len(everyone), "the generated data should have participants who withdrew"
