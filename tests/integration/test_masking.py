"""Masking by rewrite, per-subject consent, aggregate-only use and writes, through the real proxy and PostgreSQL.

The database ``masking`` holds tests/fixtures/masking/schema.sql (owned by app); the proxy
enforces tests/fixtures/masking/policies. Clients: psql (simple protocol), psycopg
(extended protocol with parameters, and simple), asyncpg (extended protocol, prepared
statements). ``purpose-proxy install`` puts the keyed pseudonym function in the
database; the hash tests recompute it from the key, read as superuser.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
import yaml

from proxy.devtools.process import REPO, ProxyProcess

MASKING = REPO / "tests" / "fixtures" / "masking"
POLICY_DIR = MASKING / "policies"
REWRITE_FIXTURES = REPO / "tests" / "fixtures" / "rewrite"
DATABASE = "masking"
PASSWORD = "app-secret"

pytestmark = pytest.mark.integration

# Member 1 as support sees it, masked by each method.
MEMBER_1 = {"name": "RA****", "email": "***@example.jp", "phone": "****0001", "birth_date": "1961-01-01",
            "postal_code": "100***", "age": "60-69"}
RAW_1 = {"name": "RAW-Tanaka Taro", "email": "raw.tanaka@example.jp", "phone": "RAW-03-1111-0001",
         "birth_date": "1961-04-01", "postal_code": "100-0001", "age": "63"}
CARD_101 = "4111-1111-1111-0101"


# --- the database, the key, the proxy -------------------------------------------------------------

def admin_url(pg, dbname: str) -> str:
    """A superuser URL (asyncpg form) for ``dbname``."""
    admin = getattr(pg, "admin_dsn", None)
    if admin:
        info = psycopg.conninfo.conninfo_to_dict(admin)
        cred = info.get("user", "postgres") + (f":{info['password']}" if info.get("password") else "")
        return f"postgresql://{cred}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{dbname}"
    return pg.url("postgres", dbname=dbname)


def install(pg, dbname: str, *extra: str) -> str:
    r = subprocess.run([sys.executable, "-m", "proxy", "install", "--dsn", admin_url(pg, dbname), *extra],
                       capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def create_database(pg, name: str) -> None:
    with psycopg.connect(admin_url(pg, "postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}" OWNER app')


@pytest.fixture(scope="module")
def masking_db(pg):
    """Database ``masking`` with schema.sql loaded as app and the pseudonym function installed.
    Yields the direct DSN of app (for changes made behind the proxy's back)."""
    create_database(pg, DATABASE)
    dsn = pg.dsn("app", DATABASE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((MASKING / "schema.sql").read_text())
        conn.execute("ANALYZE")
    out = install(pg, DATABASE)
    assert "installed purpose_proxy.pseudonym(text) in database masking" in out
    return dsn


@pytest.fixture(scope="module")
def mproxy(pg, masking_db):
    p = ProxyProcess(pg.address, "--decider", "purpose", "--policies", str(POLICY_DIR),
                     "--schema-dsn", admin_url(pg, "postgres"), "--policy-watch-interval", "0.2").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def key_pads(pg, masking_db) -> tuple[bytes, bytes]:
    """HMAC's inner and outer pads of the database's pseudonym key (only the superuser can read them)."""
    with psycopg.connect(admin_url(pg, DATABASE)) as conn:
        return conn.execute("SELECT inner_pad, outer_pad FROM purpose_proxy.pseudonym_key").fetchone()


def pseudonym(pads: tuple[bytes, bytes], value: str) -> str:
    inner, outer = pads
    return hashlib.sha256(outer + hashlib.sha256(inner + value.encode()).digest()).hexdigest()[:32]


def scoped(pads: tuple[bytes, bytes], purpose: str, value: str) -> str:
    """The pseudonym the hash mask gives ``value`` under ``purpose``: each purpose's pseudonyms are its own."""
    return pseudonym(pads, f"{purpose}|{value}")


# --- clients ----------------------------------------------------------------------------------------

def proxy_dsn(proxy, purpose: str | None, dbname: str = DATABASE) -> str:
    opt = f" options='-c pii.purpose={purpose}'" if purpose else ""
    return f"host=127.0.0.1 port={proxy.port} user=app password={PASSWORD} dbname={dbname}{opt}"


def psql(proxy, purpose: str | None, script: str) -> tuple[list[str], str]:
    """Run ``script`` in one psql session through the proxy: output lines (unaligned, ``|``) and stderr."""
    r = subprocess.run(["psql", proxy_dsn(proxy, purpose), "-X", "-q", "-A", "-t", "-F", "|", "-v",
                        "VERBOSITY=verbose"], input=script, capture_output=True, text=True, timeout=60)
    return [line for line in r.stdout.splitlines() if line], r.stderr


def pconnect(proxy, purpose: str | None, dbname: str = DATABASE):
    return psycopg.connect(proxy_dsn(proxy, purpose, dbname), autocommit=True)


def prows(proxy, purpose: str | None, sql: str, params=None, prepare: bool | None = None,
          dbname: str = DATABASE) -> list[tuple]:
    """Rows through the proxy with psycopg: ``$n`` parameters (RawCursor; extended protocol)."""
    with pconnect(proxy, purpose, dbname) as conn:
        cur = psycopg.RawCursor(conn)
        cur.execute(sql, params, prepare=prepare)
        return cur.fetchall() if cur.description else []


def prefused(proxy, purpose: str | None, sql: str, params=None) -> psycopg.Error:
    with pconnect(proxy, purpose) as conn, pytest.raises(psycopg.Error) as info:
        psycopg.RawCursor(conn).execute(sql, params)
    assert info.value.sqlstate == "42501", str(info.value)
    assert info.value.diag.source_file is None, "a refusal comes from the proxy, not PostgreSQL"
    return info.value


async def aconnect(proxy, purpose: str | None):
    settings = {"pii.purpose": purpose} if purpose else {}
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="app", password=PASSWORD,
                                 database=DATABASE, server_settings=settings)


def arun(coro):
    return asyncio.run(coro)


def text(value) -> str | None:
    """A value as psql prints it (dates ISO, numbers plain)."""
    if value is None:
        return None
    return str(value)


def cell(v):
    """A result value as the rewrite fixtures record it."""
    if v is None or isinstance(v, (int, str, bool)):
        return v
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


# --- the schema the unit tests use is the live one -----------------------------------------------------

def test_schema_yaml_matches_the_live_database(pg, masking_db):
    from proxy.analysis.schema import Schema
    from proxy.enforcement.runtime import load_database_state

    live = asyncio.run(load_database_state(admin_url(pg, DATABASE), None, 10)).schema
    expected = Schema.from_file(str(MASKING / "schema.yaml"))
    for rel in expected.relations:
        assert live.relation(rel.schema, rel.name) == rel, f"{rel} differs from the database"


# --- the rewrite fixtures, run through the proxy --------------------------------------------------------

def _row_cases(policies: Path = POLICY_DIR):
    """The fixture cases with ``rows`` whose file names ``policies`` (each policy has its own proxy)."""
    out = []
    for path in sorted(REWRITE_FIXTURES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if REPO / doc["policies"] != policies:
            continue
        for case in doc["cases"]:
            if "rows" in case:
                out.append(pytest.param(case, id=f"{path.stem}: {case['name']}"))
    return out


@pytest.mark.parametrize("case", _row_cases())
def test_rewrite_fixture_rows_through_the_proxy(mproxy, case):
    """Each fixture case with ``rows`` gives those rows through the proxy (changes rolled back)."""
    assert_fixture_rows(mproxy, case)


def assert_fixture_rows(proxy, case, dbname: str = DATABASE) -> None:
    search_path = case.get("search_path")
    with pconnect(proxy, case["purpose"], dbname) as conn:
        if search_path:
            conn.execute("SET search_path = " + ", ".join(search_path), prepare=False)
        with conn.transaction(force_rollback=True):
            cur = psycopg.RawCursor(conn)
            cur.execute(case["sql"], case.get("params"))
            rows = [[cell(v) for v in r] for r in cur.fetchall()] if cur.description else []
    assert rows == case["rows"]


# --- a further consent source: a guardian's consent for minors (tests/fixtures/guardians) ----------------

GUARDIANS = REPO / "tests" / "fixtures" / "guardians"


@pytest.fixture(scope="module")
def guardians_proxy(pg):
    """Database ``guardians``: the masking schema with crm.guardian_consents, behind a proxy enforcing
    tests/fixtures/guardians/policies (the consent filter reads the guardians' consents too)."""
    create_database(pg, "guardians")
    with psycopg.connect(pg.dsn("app", "guardians"), autocommit=True) as conn:
        conn.execute((MASKING / "schema.sql").read_text())
        conn.execute((GUARDIANS / "schema.sql").read_text())
        conn.execute("ANALYZE")
    install(pg, "guardians")
    p = ProxyProcess(pg.address, "--decider", "purpose", "--policies", str(GUARDIANS / "policies"),
                     "--schema-dsn", admin_url(pg, "postgres"), "--policy-watch-interval", "0").start()
    yield p
    p.stop()


def test_guardians_schema_yaml_matches_the_live_database(pg, guardians_proxy):
    from proxy.analysis.schema import Schema
    from proxy.enforcement.runtime import load_database_state

    live = asyncio.run(load_database_state(admin_url(pg, "guardians"), None, 10)).schema
    for rel in Schema.from_file(str(GUARDIANS / "schema.yaml")).relations:
        assert live.relation(rel.schema, rel.name) == rel, f"{rel} differs from the database"


@pytest.mark.parametrize("case", _row_cases(GUARDIANS / "policies"))
def test_guardian_fixture_rows_through_the_proxy(guardians_proxy, case):
    """The rewrites of tests/fixtures/rewrite/guardians.yaml give their rows on PostgreSQL."""
    assert_fixture_rows(guardians_proxy, case, "guardians")


def test_a_guardians_revocation_holds_from_the_next_statement(pg, guardians_proxy):
    """The filter is SQL PostgreSQL evaluates: revoking (and restoring) a guardian's consent needs no reload."""
    sql = "SELECT member_id FROM crm.members WHERE member_id = 10"
    direct = pg.dsn("app", "guardians")
    assert prows(guardians_proxy, "support", sql, dbname="guardians") == [(10,)]
    with psycopg.connect(direct, autocommit=True) as conn:
        conn.execute("UPDATE crm.guardian_consents SET revoked_at = now() WHERE consent_id = 4")
    try:
        assert prows(guardians_proxy, "support", sql, dbname="guardians") == []
    finally:
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute("UPDATE crm.guardian_consents SET revoked_at = NULL WHERE consent_id = 4")
    assert prows(guardians_proxy, "support", sql, dbname="guardians") == [(10,)]


# --- each masking method, in the output ----------------------------------------------------------------

MEMBER_SQL = "SELECT name, email, phone, birth_date, postal_code, age FROM crm.members WHERE member_id = 1"


def test_every_method_in_the_output_with_psql(mproxy, key_pads):
    lines, err = psql(mproxy, "support", MEMBER_SQL + ";\n"
                      "SELECT card_number, expiry FROM billing.cards WHERE card_id = 101;\n"
                      "SELECT amount IS NULL, issued_at IS NULL FROM billing.invoices WHERE invoice_id = 201;\n")
    assert not err, err
    assert lines == ["|".join(MEMBER_1.values()),
                     f"{scoped(key_pads, 'support', CARD_101)}|{scoped(key_pads, 'support', '2031-01-31')}", "t|t"]


def test_every_method_in_the_output_with_psycopg(mproxy, key_pads):
    for prepare in (False, True):
        (row,) = prows(mproxy, "support", MEMBER_SQL, prepare=prepare)
        assert [text(v) for v in row] == list(MEMBER_1.values())
    (row,) = prows(mproxy, "support", "SELECT card_number FROM billing.cards WHERE card_id = $1", [101])
    assert row == (scoped(key_pads, 'support', CARD_101),)
    (row,) = prows(mproxy, "support", "SELECT amount, issued_at FROM billing.invoices WHERE invoice_id = $1", [201])
    assert row == (None, None)


def test_every_method_in_the_output_with_asyncpg(mproxy, key_pads):
    async def main():
        conn = await aconnect(mproxy, "support")
        try:
            row = await conn.fetchrow(MEMBER_SQL)
            assert {k: text(v) for k, v in row.items()} == MEMBER_1
            assert isinstance(row["birth_date"], datetime.date)  # year keeps the date type
            card = await conn.fetchval("SELECT card_number FROM billing.cards WHERE card_id = $1", 101)
            assert card == scoped(key_pads, 'support', CARD_101)
            amount = await conn.fetchrow("SELECT amount FROM billing.invoices WHERE invoice_id = 201")
            assert amount["amount"] is None
        finally:
            await conn.close()

    arun(main())


def test_row_description_and_parameters_in_the_extended_protocol(mproxy):
    """The client sees the column names it asked for and its parameters keep their numbers and types."""
    async def main():
        conn = await aconnect(mproxy, "support")
        try:
            stmt = await conn.prepare("SELECT m.email AS address, name, $2::text AS tag FROM crm.members m "
                                      "WHERE member_id = $1")
            assert [a.name for a in stmt.get_attributes()] == ["address", "name", "tag"]
            assert [t.name for t in stmt.get_parameters()] == ["int4", "text"]
            assert [tuple(r) for r in await stmt.fetch(2, "x")] == [("***@example.jp", "RA****", "x")]
            assert [tuple(r) for r in await stmt.fetch(4, "y")] == [("***@example.jp", "RA****", "y")]
        finally:
            await conn.close()

    arun(main())
    with pconnect(mproxy, "support") as conn:
        cur = psycopg.RawCursor(conn)
        cur.execute("SELECT m.* FROM crm.members m WHERE m.member_id = $1", [1], prepare=True)
        assert [c.name for c in cur.description] == ["member_id", "name", "email", "phone", "birth_date",
                                                     "postal_code", "age", "region"]
        assert cur.fetchone()[2] == "***@example.jp"


def test_a_mask_of_the_columns_own_type_keeps_its_type_modifier(mproxy, masking_db):
    """RowDescription through the proxy is PostgreSQL's own: a redacted numeric(10,2), varchar(40) or
    timestamp(0) keeps its type modifier (a CASE over a column drops it unless cast back), in the simple
    and the extended protocol."""
    sql = "SELECT refund_id, amount, reason, refunded_at FROM billing.refunds ORDER BY refund_id"

    def shape(conn, prepare):
        cur = conn.cursor()
        cur.execute(sql, prepare=prepare)
        res = cur.pgresult
        return [(res.ftype(i), res.fmod(i)) for i in range(res.nfields)], cur.fetchall()

    with psycopg.connect(masking_db, autocommit=True) as conn:
        direct, _ = shape(conn, False)
    assert [m for _, m in direct[1:]] == [655366, 44, 0]  # numeric(10,2), varchar(40), timestamp(0)
    for prepare in (False, True):
        with pconnect(mproxy, "support") as conn:
            masked, rows = shape(conn, prepare)
        assert masked == direct
        assert rows == [(301, None, None, None), (302, None, None, None)]


# --- each masking method, in predicates ------------------------------------------------------------------

PREDICATES = [  # column, a raw value, the masked value
    ("name", "RAW-Tanaka Taro", "RA****"),
    ("email", "raw.tanaka@example.jp", "***@example.jp"),
    ("phone", "RAW-03-1111-0001", "****0001"),
    ("birth_date::text", "1961-04-01", "1961-01-01"),
    ("postal_code", "100-0001", "100***"),
    ("age::text", "63", "60-69"),
]


@pytest.mark.parametrize("column,raw,masked", PREDICATES, ids=[p[0] for p in PREDICATES])
def test_every_method_in_predicates(mproxy, column, raw, masked):
    sql = f"SELECT count(*) FROM crm.members WHERE member_id = 1 AND {column} = "
    # simple protocol (psql), literals
    lines, err = psql(mproxy, "support", f"{sql}'{raw}';\n{sql}'{masked}';\n")
    assert (lines, err) == (["0", "1"], "")
    # extended protocol, parameters (psycopg and asyncpg)
    assert prows(mproxy, "support", sql + "$1", [raw]) == [(0,)]
    assert prows(mproxy, "support", sql + "$1", [masked]) == [(1,)]

    async def main():
        conn = await aconnect(mproxy, "support")
        try:
            return [await conn.fetchval(sql + "$1", v) for v in (raw, masked)]
        finally:
            await conn.close()

    assert arun(main()) == [0, 1]


def test_hash_and_redact_in_predicates(mproxy, key_pads):
    sql = "SELECT count(*) FROM billing.cards WHERE card_id = 101 AND card_number = $1"
    assert prows(mproxy, "support", sql, [CARD_101]) == [(0,)]
    assert prows(mproxy, "support", sql, [scoped(key_pads, "support", CARD_101)]) == [(1,)]
    lines, err = psql(mproxy, "support", "SELECT count(*) FROM billing.invoices WHERE amount > 0;\n"
                                         "SELECT count(*) FROM billing.invoices WHERE amount IS NULL;\n")
    assert (lines, err) == (["0", "12"], "")  # 13 invoices; member 3 withdrew support


def test_a_masked_column_in_where_cannot_be_used_to_find_a_raw_value(mproxy):
    """Probing a masked column character by character, or by ranges, only ever finds the masked value."""
    async def main():
        conn = await aconnect(mproxy, "support")
        try:
            probe = await conn.prepare("SELECT count(*) FROM crm.members WHERE member_id = 1 "
                                       "AND substr(email, $1, 1) = $2")
            found = ""
            for i in range(1, 6):
                hits = [c for c in "*@.-_abcdefghijklmnopqrstuvwxyz0123456789" if await probe.fetchval(i, c)]
                assert len(hits) == 1, (i, hits)
                found += hits[0]
            ranges = [await conn.fetchval("SELECT count(*) FROM crm.members WHERE member_id = 1 AND email >= $1",
                                          v) for v in ("raw.tanaka@example.jp", "raw.", "r")]
            return found, ranges
        finally:
            await conn.close()

    found, ranges = arun(main())
    assert found == "***@e"  # the masked value; the raw one starts "raw.t"
    assert ranges == [0, 0, 0]  # '***@example.jp' sorts before all of these; the raw value would not
    assert prows(mproxy, "support", "SELECT count(*) FROM crm.members WHERE email LIKE 'raw.%'") == [(0,)]
    assert prows(mproxy, "support", "SELECT count(*) FROM crm.members WHERE name ~ 'Tanaka'") == [(0,)]


def test_whole_row_references_and_views_are_masked(mproxy):
    lines, err = psql(mproxy, "support", "SELECT m FROM crm.members m WHERE member_id = 1;\n"
                                         "SELECT row_to_json(c) FROM crm.member_contacts c WHERE member_id = 2;\n"
                                         "SELECT display_name FROM crm.contact_names WHERE member_id = 4;\n")
    assert not err, err
    assert lines[0] == "(1,RA****,***@example.jp,****0001,1961-01-01,100***,60-69,north)"
    assert json.loads(lines[1]) == {"member_id": 2, "name": "RA****", "email": "***@example.jp",
                                    "phone": "****0002"}
    assert lines[2] == "RA****"
    assert "RAW" not in "".join(lines) and "raw." not in "".join(lines)
    e = prefused(mproxy, "support", "SELECT * FROM crm.member_emails_mv")
    assert "materialized view crm.member_emails_mv" in str(e)


# --- consent ------------------------------------------------------------------------------------------------

def direct(masking_db, sql: str, params=None) -> None:
    """Run ``sql`` directly in PostgreSQL (as app), behind the proxy's back."""
    with psycopg.connect(masking_db, autocommit=True) as conn:
        conn.execute(sql, params)


def test_consent_withdrawal_takes_effect_at_the_next_statement_asyncpg(mproxy, masking_db):
    async def main():
        conn = await aconnect(mproxy, "support")
        try:
            # (text, not an array: asyncpg's type introspection query is not one the proxy analyses)
            stmt = await conn.prepare("SELECT string_agg(member_id::text, ',' ORDER BY member_id) FROM crm.members")
            before = await stmt.fetchval()
            direct(masking_db, "INSERT INTO privacy.consents VALUES (8, 'support', 'withdrawn', now())")
            after_prepared = await stmt.fetchval()  # the same prepared statement, executed again
            after_new = await conn.fetchval("SELECT count(*) FROM crm.members WHERE member_id = 8")
            direct(masking_db, "INSERT INTO privacy.consents VALUES (8, 'support', 'granted', now())")
            regranted = await stmt.fetchval()
            return before, after_prepared, after_new, regranted
        finally:
            await conn.close()

    try:
        before, after_prepared, after_new, regranted = arun(main())
    finally:
        direct(masking_db, "DELETE FROM privacy.consents WHERE member_id = 8 AND purpose = 'support'")
    assert before == "1,2,4,5,6,7,8,9,10"
    assert after_prepared == "1,2,4,5,6,7,9,10"
    assert after_new == 0
    assert regranted == before  # the latest record counts
    assert mproxy.proc.poll() is None  # no restart


def test_consent_withdrawal_takes_effect_at_the_next_statement_psql(mproxy, masking_db):
    query = "SELECT string_agg(member_id::text, ',' ORDER BY member_id) FROM crm.members;\n"
    withdraw = (f"\\! psql \"{masking_db}\" -X -q -c \"INSERT INTO privacy.consents "
                f"VALUES (9, 'support', 'withdrawn', now())\" > /dev/null\n")
    try:
        lines, err = psql(mproxy, "support", query + withdraw + query +
                          "SELECT count(*) FROM billing.invoices WHERE member_id = 9;\n")
    finally:
        direct(masking_db, "DELETE FROM privacy.consents WHERE member_id = 9 AND purpose = 'support'")
    assert not err, err
    assert lines == ["1,2,4,5,6,7,8,9,10", "1,2,4,5,6,7,8,10", "0"]


def test_filtered_rows_cannot_be_detected_through_errors(mproxy):
    """The statement's own predicates run only on rows consent kept (the barrier): a predicate that would
    fail on a withdrawn subject's row (member 3 withdrew support) does not fail."""
    assert prows(mproxy, "support", "SELECT count(*) FROM crm.members WHERE 1 / (member_id - 3) > -100") == [(9,)]
    assert prows(mproxy, "support", "SELECT count(*) FROM billing.invoices i JOIN crm.members m "
                                    "ON m.member_id = i.member_id WHERE 1 / (m.member_id - 3) > -100") == [(12,)]
    with pconnect(mproxy, "support") as conn, conn.transaction(force_rollback=True):
        assert conn.execute("UPDATE crm.members SET phone = 'x' WHERE 1 / (member_id - 3) > -100",
                            prepare=False).rowcount == 9


def test_opt_in_purpose_and_its_subtree(mproxy, masking_db):
    sql = "SELECT member_id FROM crm.members ORDER BY 1"
    ids = lambda purpose: [r[0] for r in prows(mproxy, purpose, sql)]  # noqa: E731
    # Member 6 consented to marketing and withdrew from marketing.email: a statement under marketing may
    # serve e-mail too, so the withdrawal below counts (hunt 17); under marketing.email it does anyway.
    assert ids("marketing") == [1, 2, 7]
    assert ids("marketing.email") == [1, 2, 5, 7]
    try:
        direct(masking_db, "INSERT INTO privacy.consents VALUES (8, 'marketing', 'granted', now()), "
                           "(1, 'marketing', 'withdrawn', now())")
        assert ids("marketing") == [2, 7, 8]
        assert ids("marketing.email") == [2, 5, 7, 8]  # a withdrawal of the parent covers the child
    finally:
        direct(masking_db, "DELETE FROM privacy.consents WHERE (member_id, purpose) IN ((8, 'marketing')) "
                           "OR (member_id = 1 AND purpose = 'marketing' AND status = 'withdrawn')")
    assert ids("marketing") == [1, 2, 7]
    # nothing masked, still filtered: joins and aggregates
    assert prows(mproxy, "marketing", "SELECT count(*) FROM billing.invoices") == [(4,)]


def test_explain_analyze_of_a_filtered_lookup_is_refused(mproxy, masking_db):
    # Hunt 17: the row counts of EXPLAIN ANALYZE come from inside the rewrite; rows=1 before the consent
    # filter's anti join told a member who withdrew (member 3 withdrew support) from one who does not exist.
    lookup = "SELECT name FROM crm.members WHERE member_id = 3"
    with pconnect(mproxy, "support") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + lookup, prepare=False)
        assert "EXPLAIN ANALYZE" in str(info.value)
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + lookup, prepare=False))
    assert "consents __pp_" in plan and "actual rows" not in plan  # plain EXPLAIN: the rewritten plan


def test_consent_filters_updates_and_deletes(mproxy, masking_db):
    with pconnect(mproxy, "support") as conn:
        assert conn.execute("UPDATE crm.members SET phone = 'RAW-new' WHERE member_id IN (2, 3)",
                            prepare=False).rowcount == 1
    with psycopg.connect(masking_db, autocommit=True) as conn:
        phones = dict(conn.execute("SELECT member_id, phone FROM crm.members WHERE member_id IN (2, 3)").fetchall())
        conn.execute("UPDATE crm.members SET phone = 'RAW-03-1111-0002' WHERE member_id = 2")
    assert phones == {2: "RAW-new", 3: "RAW-03-1111-0003"}  # member 3 withdrew support: untouched


def test_no_purpose_here_may_rewrite_the_consent_decisions(mproxy, masking_db):
    # Once any purpose could run this and then see every member who had withdrawn.
    for sql in ("UPDATE privacy.consents SET status = 'granted' WHERE status = 'withdrawn'",
                "DELETE FROM privacy.consents WHERE status = 'withdrawn'",
                "INSERT INTO privacy.consents VALUES (3, 'support', 'granted', now() + interval '1 day')"):
        e = prefused(mproxy, "support", sql)
        assert "consent" in str(e), str(e)
    with psycopg.connect(masking_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM privacy.consents WHERE member_id = 3 AND status = 'granted' "
                            "AND recorded_at > now()").fetchone() == (0,)


# --- GROUP BY a primary key (hunt 35) ---------------------------------------------------------------------

# Django's query for Member.objects.annotate(n=Count("cards")) on managed models: grouped by the primary
# key only (allows_group_by_selected_pks), the other selected columns ungrouped.
DJANGO_ANNOTATE = """
import json, sys, types
import django
from django.conf import settings

port, password, purpose = sys.argv[1:4]
app = types.ModuleType("masking_app")  # an installed app for the models (reverse relations need one)
app.__path__ = ["."]
sys.modules["masking_app"] = app
settings.configure(INSTALLED_APPS=["masking_app"], USE_TZ=True, DATABASES={"default": {
    "ENGINE": "django.db.backends.postgresql", "HOST": "127.0.0.1", "PORT": port, "NAME": "masking",
    "USER": "app", "PASSWORD": password,
    "OPTIONS": {"options": f"-c pii.purpose={purpose} -c search_path=crm,billing"}}})
django.setup()
from django.db import models
from django.db.models import Count


class Member(models.Model):
    member_id = models.IntegerField(primary_key=True)
    name = models.TextField()
    birth_date = models.DateField(null=True)

    class Meta:
        app_label = "masking_app"
        db_table = "members"


class Card(models.Model):
    card_id = models.IntegerField(primary_key=True)
    member = models.ForeignKey(Member, models.DO_NOTHING, db_column="member_id", related_name="cards")

    class Meta:
        app_label = "masking_app"
        db_table = "cards"


qs = Member.objects.annotate(n=Count("cards")).order_by("member_id")
print(json.dumps({"sql": str(qs.query), "rows": [[m.member_id, m.name, str(m.birth_date), m.n] for m in qs]}))
"""


def test_group_by_a_primary_key_with_psycopg(mproxy):
    """PostgreSQL lets a query grouped by a table's primary key select the table's other columns; the
    derived table that masks or filters the table has no key, so the rewrite groups by them too (hunt 35:
    42803 "must appear in the GROUP BY clause" for every purpose that rewrites the table)."""
    sql = ("SELECT m.member_id, m.name, m.birth_date, count(c.card_id) AS n FROM crm.members m "
           "LEFT JOIN billing.cards c ON c.member_id = m.member_id GROUP BY m.member_id ORDER BY m.member_id")
    for prepare in (False, True):
        rows = prows(mproxy, "support", sql, prepare=prepare)
        assert [r[0] for r in rows] == [1, 2, 4, 5, 6, 7, 8, 9, 10], prepare  # member 3 withdrew from support
        assert rows[0] == (1, "RA****", datetime.date(1961, 1, 1), 1), prepare
        assert {r[1] for r in rows} == {"RA****"} and rows[-1] == (10, "RA****", None, 0), prepare
    rows = prows(mproxy, "marketing", "SELECT m.member_id, m.name, m.email FROM crm.members m "
                                      "GROUP BY m.member_id ORDER BY $1::int, 1", [1])
    assert rows == [(1, RAW_1["name"], RAW_1["email"]), (2, "RAW-Suzuki Hanako", "raw.suzuki@example.jp"),
                    (7, "RAW-Mori Aya", "raw.mori@example.jp")]  # opt-in: the members who consented
    # GROUP BY ROLLUP: PostgreSQL applies no functional dependency there, directly either
    with pytest.raises(psycopg.errors.GroupingError):
        prows(mproxy, "support", "SELECT m.member_id, m.name FROM crm.members m GROUP BY ROLLUP (m.member_id)")


def test_group_by_a_primary_key_from_django(mproxy):
    """Django's .annotate() on managed models groups by the primary key only: it works through the proxy."""
    r = subprocess.run([sys.executable, "-c", DJANGO_ANNOTATE, str(mproxy.port), PASSWORD, "support"],
                       capture_output=True, text=True, timeout=120, cwd=str(REPO), check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert 'GROUP BY "members"."member_id"' in out["sql"] and '"members"."name"' in out["sql"], out["sql"]
    assert out["rows"][:2] == [[1, "RA****", "1961-01-01", 1], [2, "RA****", "1972-01-01", 1]]
    assert [row[0] for row in out["rows"]] == [1, 2, 4, 5, 6, 7, 8, 9, 10]


# --- aggregate-only --------------------------------------------------------------------------------------------

def test_aggregate_only_groups_and_suppression(mproxy):
    rows = prows(mproxy, "analytics", "SELECT region, count(*), sum(amount) FROM billing.invoices "
                                      "GROUP BY region ORDER BY region")
    assert rows == [("north", 4, decimal.Decimal(10000)), ("south", 6, decimal.Decimal(36300))]  # east: 1 member
    assert prows(mproxy, "analytics", "SELECT sum(amount) FROM billing.invoices WHERE member_id = $1", [9]) == []
    assert prows(mproxy, "analytics", "SELECT avg(amount) FROM billing.invoices WHERE region = $1",
                 ["south"]) == [(decimal.Decimal("6050.0000000000000000"),)]
    lines, err = psql(mproxy, "analytics", "SELECT region, round(avg(amount)) FROM billing.invoices GROUP BY 1 "
                                           "ORDER BY 1;\n")
    assert (lines, err) == (["north|2500", "south|6050"], "")


def test_aggregate_only_refusals_explain_the_rule(mproxy):
    e = prefused(mproxy, "analytics", "SELECT amount FROM billing.invoices")
    assert "only inside aggregate functions" in str(e)
    e = prefused(mproxy, "analytics", "SELECT amount, count(*) FROM billing.invoices GROUP BY amount")
    assert "GROUP BY" in str(e) and "reveals its values" in str(e)
    e = prefused(mproxy, "analytics", "SELECT sum(amount) FILTER (WHERE member_id = 9) FROM billing.invoices")
    assert "FILTER" in str(e) and "groups of at least 3" in str(e)
    e = prefused(mproxy, "analytics", "SELECT max(amount) FROM billing.invoices")
    assert "only inside aggregate functions" in str(e)


# --- writes ----------------------------------------------------------------------------------------------------

def test_writes_need_the_write_action(mproxy, masking_db):
    e = prefused(mproxy, "marketing", "UPDATE crm.members SET email = 'x' WHERE member_id = 1")
    assert 'may not write personal data of category "contact.email"' in str(e)
    e = prefused(mproxy, "support", "DELETE FROM billing.invoices WHERE invoice_id = 201")
    assert 'may not write personal data of category "payment.invoice"' in str(e)
    # billing may write invoices, and RETURNING is a read it may do
    try:
        assert prows(mproxy, "billing", "INSERT INTO billing.invoices VALUES (300, 1, 'north', 42, '2024-05-01') "
                                        "RETURNING amount") == [(decimal.Decimal(42),)]
    finally:
        direct(masking_db, "DELETE FROM billing.invoices WHERE invoice_id = 300")
    # RETURNING of a masked column of the written table is a read it cannot mask
    e = prefused(mproxy, "billing", "INSERT INTO crm.members (member_id) VALUES (51) RETURNING name")
    assert "masked" in str(e)


def test_copies_of_masked_data_are_refused(mproxy):
    for sql in ("INSERT INTO public.scratch (v) SELECT email FROM crm.members",
                "CREATE TABLE public.copy AS SELECT email FROM crm.members",
                "SELECT email INTO public.copy FROM crm.members",
                "UPDATE public.scratch SET v = (SELECT email FROM crm.members WHERE member_id = 1)"):
        e = prefused(mproxy, "support", sql)
        assert "crm.members.email" in str(e), sql
    lines, err = psql(mproxy, "support", "COPY (SELECT email FROM crm.members) TO STDOUT;\n")
    assert lines == [] and "42501" in err and "COPY" in err
    # filtering on a masked column while copying something else is fine (and sees masked values)
    with pconnect(mproxy, "support") as conn, conn.transaction(force_rollback=True):
        n = conn.execute("INSERT INTO public.scratch (v) SELECT 'x' FROM crm.members WHERE email LIKE 'raw%'",
                         prepare=False).rowcount
        assert n == 0


# --- explain ---------------------------------------------------------------------------------------------------

def test_explain_shows_the_rewritten_sql(pg, masking_db):
    r = subprocess.run([sys.executable, "-m", "proxy", "explain", "--role", "app", "--purpose", "support",
                        "--policies", str(POLICY_DIR), "--dsn", admin_url(pg, DATABASE),
                        "SELECT email FROM crm.members WHERE member_id = 1"],
                       capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("verdict: mask: rewritten: crm.members.email mask(email_domain)")
    assert "rewritten SQL:" in r.stdout
    assert "SELECT email FROM (SELECT __pp_row.member_id" in r.stdout


# --- the pseudonym function -------------------------------------------------------------------------------------

def test_pseudonyms_are_stable_and_keyed(pg, mproxy, key_pads):
    inner, outer = key_pads
    key = bytes(b ^ 0x36 for b in inner)
    assert key == bytes(b ^ 0x5C for b in outer) and len(set(key)) > 16  # one random 64-byte key
    first = prows(mproxy, "support", "SELECT card_number FROM billing.cards ORDER BY card_id")
    again = prows(mproxy, "support", "SELECT card_number FROM billing.cards ORDER BY card_id")
    assert first == again  # stable across sessions
    assert first[0][0] == scoped(key_pads, 'support', CARD_101)
    assert first[0][0] != hashlib.sha256(CARD_101.encode()).hexdigest()[:32]  # keyed, not a plain hash
    assert "key kept" in install(pg, DATABASE)  # installing again keeps the key and the pseudonyms
    assert prows(mproxy, "support", "SELECT card_number FROM billing.cards ORDER BY card_id") == first
    # clients may not compute pseudonyms of guesses through the proxy
    e = prefused(mproxy, "support", f"SELECT purpose_proxy.pseudonym('{CARD_101}')")
    assert "not declared in the policy catalog" in str(e)


def test_key_is_private_and_rotation_changes_pseudonyms(pg):
    create_database(pg, "masking_rotate")
    with psycopg.connect(admin_url(pg, "masking_rotate"), autocommit=True) as conn:
        conn.execute("ALTER DATABASE masking_rotate SET log_statement = 'all'")
    out = install(pg, "masking_rotate")
    assert "key created" in out
    with psycopg.connect(pg.dsn("app", "masking_rotate"), autocommit=True) as conn:
        one = conn.execute("SELECT purpose_proxy.pseudonym('x')").fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM purpose_proxy.pseudonym_key")
    with psycopg.connect(pg.dsn("app", DATABASE), autocommit=True) as conn:
        other_db = conn.execute("SELECT purpose_proxy.pseudonym('x')").fetchone()[0]
    assert one != other_db  # another key, other pseudonyms
    assert "key rotated" in install(pg, "masking_rotate", "--rotate-key")
    with psycopg.connect(pg.dsn("app", "masking_rotate"), autocommit=True) as conn:
        two = conn.execute("SELECT purpose_proxy.pseudonym('x')").fetchone()[0]
    assert two != one
    with psycopg.connect(admin_url(pg, "masking_rotate")) as conn:
        pads = conn.execute("SELECT inner_pad, outer_pad FROM purpose_proxy.pseudonym_key").fetchone()
    assert two == pseudonym(pads, "x")
    log = getattr(pg, "log_file", None)
    if log is not None and Path(log).exists():  # every statement was logged: none holds the key
        text_ = Path(log).read_text(errors="replace")
        assert "purpose_proxy.pseudonym_key" in text_
        for secret in (pads[0].hex(), pads[1].hex(), bytes(b ^ 0x36 for b in pads[0]).hex()):
            assert secret not in text_ and secret[:16] not in text_


def test_key_not_in_pg_stat_activity(pg, mproxy, key_pads):
    """While a masked statement runs, its text (as PostgreSQL shows it) calls the function and holds no key."""
    seen: list[str] = []

    def watch():
        with psycopg.connect(admin_url(pg, DATABASE), autocommit=True) as conn:
            for _ in range(100):
                rows = conn.execute("SELECT query FROM pg_stat_activity WHERE usename = 'app' "
                                    "AND query LIKE '%pseudonym%' AND state = 'active'").fetchall()
                if rows:
                    seen.extend(r[0] for r in rows)
                    return
                time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    prows(mproxy, "support", "SELECT card_number, pg_sleep(1.5) FROM billing.cards WHERE card_id = 101")
    t.join()
    assert seen, "the statement was not seen in pg_stat_activity"
    assert "purpose_proxy.pseudonym(pg_catalog.textcat('support|', (__pp_row.card_number)::pg_catalog.text))" in seen[0]
    key = bytes(b ^ 0x36 for b in key_pads[0])
    for secret in (key_pads[0].hex(), key_pads[1].hex(), key.hex()):
        assert secret[:16] not in seen[0]
