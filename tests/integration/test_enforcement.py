"""Purpose enforcement as clients see it: the errors (SQLSTATE, message, DETAIL, HINT) the
proxy returns through psycopg, asyncpg and psql, the purpose setting's life cycle, and
policy hot reload. Real clients, the real proxy, real PostgreSQL, the schema and policy of
tests/fixtures/enforce.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import pq

from tests.integration.conftest import enforcing_proxy
from tests.support.enforce import POLICY_DIR, purpose_options, run_psql
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def dsn(pg, proxy, purpose: str | None, **extra) -> str:
    return pg.dsn("app", host=proxy.host, port=proxy.port, **purpose_options(purpose), **extra)


def url(pg, proxy) -> str:
    return pg.url("app", host=proxy.host, port=proxy.port)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def policy_line(text: str) -> int:
    """The line number of ``text`` in the fixture policy.csv (as the proxy cites it)."""
    lines = (POLICY_DIR / "policy.csv").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip() == text)


class Seen:
    """One error as three clients saw it."""

    def __init__(self, psycopg_error, asyncpg_error, psql_stderr: str) -> None:
        self.pg = psycopg_error
        self.apg = asyncpg_error
        self.psql = psql_stderr

    @property
    def sqlstate(self) -> str:
        assert self.pg.sqlstate == self.apg.sqlstate, (self.pg.sqlstate, self.apg.sqlstate)
        assert f"ERROR:  {self.pg.sqlstate}: " in self.psql, self.psql
        return self.pg.sqlstate

    @property
    def message(self) -> str:
        assert self.pg.diag.message_primary == self.apg.message
        return self.pg.diag.message_primary

    @property
    def detail(self) -> str | None:
        assert self.pg.diag.message_detail == self.apg.detail
        return self.pg.diag.message_detail

    @property
    def hint(self) -> str | None:
        assert self.pg.diag.message_hint == self.apg.hint
        return self.pg.diag.message_hint

    def from_proxy(self) -> bool:
        """PostgreSQL's own errors carry their source location; the proxy's never do."""
        return (self.pg.diag.source_file is None and self.apg.server_source_filename is None
                and "LOCATION:" not in self.psql)


def error_of(pg, proxy, purpose: str | None, sql: str, setup: tuple[str, ...] = ()) -> Seen:
    """Run ``setup`` then ``sql`` through psycopg (simple protocol), asyncpg and psql; all must fail."""
    with psycopg.connect(dsn(pg, proxy, purpose), autocommit=True) as conn:
        for s in setup:
            conn.execute(s)
        with pytest.raises(psycopg.Error) as info:
            conn.execute(sql)
        pe = info.value

    async def apg():
        conn = await asyncpg.connect(url(pg, proxy), server_settings={} if purpose is None else
                                     {"pii.purpose": purpose})
        try:
            for s in setup:
                await conn.execute(s)
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.execute(sql)
            return info.value
        finally:
            await conn.close()

    ae = run(apg())
    out = run_psql(dsn(pg, proxy, purpose), [*setup, sql])
    return Seen(pe, ae, out.raw)


# --- declaring a purpose ---------------------------------------------------------------------------------


def test_unknown_purpose_at_connect_is_fatal(pg, enforce_proxy):
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn(pg, enforce_proxy, "astrology"))
    assert "FATAL" in str(info.value) and "unknown purpose declared at connect time in pii.purpose" in str(info.value)
    assert "astrology" not in str(info.value)  # the proxy does not repeat client text

    async def apg():
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(url(pg, enforce_proxy), server_settings={"pii.purpose": "astrology"})
        return info.value

    e = run(apg())
    assert (e.sqlstate, e.severity) == ("42501", "FATAL")
    assert "Role app may declare: " in e.hint and "billing" in e.hint and "marketing" in e.hint
    r = subprocess.run(["psql", dsn(pg, enforce_proxy, "astrology"), "-XAtc", "SELECT 1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "FATAL:  unknown purpose declared at connect time" in r.stderr


def test_a_startup_refusal_is_told_only_after_authentication(pg, enforce_proxy):
    """Hunt 23: a client that never authenticated learned which purposes exist and what each role may declare
    (and which databases exist). Like PostgreSQL with what it checks after authentication, the refusal now
    comes after AuthenticationOk; before it, the client gets PostgreSQL's request for a password."""
    from tests.support.faults import read_message
    from tests.support.rawpg import startup_message

    for params in ({"database": "app", "options": "-c pii.purpose=astrology"},
                   {"database": "no_such_database_here", "options": "-c pii.purpose=billing"}):
        with socket.create_connection((enforce_proxy.host, enforce_proxy.port), timeout=30) as s:
            s.sendall(startup_message("app", params["database"], options=params["options"]))
            kind, code, _ = read_message(s)
            assert kind == b"R" and code != 0, (params, kind, code)  # a password request, nothing else
    with pytest.raises(psycopg.OperationalError) as info:  # authenticated: told, as before
        psycopg.connect(dsn(pg, enforce_proxy, "astrology"))
    assert "unknown purpose declared at connect time" in str(info.value)


def test_unknown_purpose_via_set_is_an_error(pg, enforce_proxy):
    seen = error_of(pg, enforce_proxy, "billing", "SET pii.purpose = 'astrology'")
    assert seen.sqlstate == "42501" and seen.from_proxy()
    assert seen.message == "unknown purpose in SET pii.purpose (not in purposes.yaml)"
    assert "role app may declare: billing, " in seen.hint.lower()
    with psycopg.connect(dsn(pg, enforce_proxy, "billing"), autocommit=True) as conn:
        with pytest.raises(psycopg.Error):
            conn.execute("SET pii.purpose = 'astrology'")
        assert conn.execute("SHOW pii.purpose").fetchone()[0] == "billing"  # unchanged, session alive


def test_purpose_the_role_may_not_declare(pg, enforce_proxy):
    async def apg():
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(url(pg, enforce_proxy), server_settings={"pii.purpose": "operations"})
        return info.value

    e = run(apg())
    assert (e.sqlstate, e.severity) == ("42501", "FATAL")
    assert e.message == 'role "app" may not act under purpose "operations"'
    assert e.detail.startswith("Declaring operations: ")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn(pg, enforce_proxy, "operations"))
    assert 'may not act under purpose "operations"' in str(info.value)

    seen = error_of(pg, enforce_proxy, "billing", "SET pii.purpose = 'operations'")
    assert seen.sqlstate == "42501" and seen.from_proxy()
    assert seen.message == 'role "app" may not act under purpose "operations"'
    assert seen.detail == "Declaring operations: no rule allows it (default deny)."
    assert "role app may declare: billing, " in seen.hint.lower() and "operations" not in seen.hint


def test_no_purpose_declared(pg, enforce_proxy):
    seen = error_of(pg, enforce_proxy, None, "SELECT email FROM crm.members")
    assert seen.sqlstate == "42501" and seen.from_proxy()
    assert seen.message == "no purpose declared: the statement uses personal data (crm.members.email)"
    assert "SET pii.purpose" in seen.hint or "may declare" in seen.hint
    with psycopg.connect(dsn(pg, enforce_proxy, None), autocommit=True) as conn:
        rows = conn.execute("SELECT note_id, body FROM public.notes ORDER BY note_id").fetchall()
        assert rows[0] == (1, "called about the router")
        assert conn.execute("SELECT phone FROM members ORDER BY 1").fetchall()[0] == ("decoy-phone-1",)
        conn.execute("SET pii.purpose = 'marketing'")
        assert conn.execute("SELECT email FROM crm.members WHERE member_id = 1").fetchone()[0].startswith("CANARY")


def test_show_and_current_setting_report_the_purpose(pg, enforce_proxy):
    with psycopg.connect(dsn(pg, enforce_proxy, "marketing"), autocommit=True) as conn:
        assert conn.execute("SHOW pii.purpose").fetchone()[0] == "marketing"
        assert conn.execute("SELECT current_setting('pii.purpose')").fetchone()[0] == "marketing"
        conn.execute("SET pii.purpose = 'support'")
        assert conn.execute("SHOW pii.purpose").fetchone()[0] == "support"
        assert conn.execute("SELECT current_setting('pii.purpose')", prepare=True).fetchone()[0] == "support"
        assert conn.execute("SELECT phone FROM crm.members WHERE member_id = 1").fetchone()[0].startswith("CANARY")

    async def apg():
        conn = await asyncpg.connect(url(pg, enforce_proxy), server_settings={"pii.purpose": "research"})
        try:
            return await conn.fetchval("SELECT current_setting('pii.purpose')"), await conn.fetchval("SHOW pii.purpose")
        finally:
            await conn.close()

    assert run(apg()) == ("research", "research")
    out = run_psql(dsn(pg, enforce_proxy, "billing"), ["SHOW pii.purpose"])
    assert "billing" in out.raw


def test_reset_goes_back_to_the_connect_time_purpose(pg, enforce_proxy):
    with psycopg.connect(dsn(pg, enforce_proxy, "marketing"), autocommit=True) as conn:
        conn.execute("SET pii.purpose = 'support'")
        assert conn.execute("SELECT phone FROM crm.members WHERE member_id = 1").fetchone()
        conn.execute("RESET pii.purpose")
        assert conn.execute("SHOW pii.purpose").fetchone()[0] == "marketing"
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("SELECT phone FROM crm.members WHERE member_id = 1")
        assert 'purpose "marketing"' in info.value.diag.message_primary
        conn.execute("SET SESSION pii.purpose TO support")
        conn.execute("RESET ALL")  # RESET ALL too
        assert conn.execute("SHOW pii.purpose").fetchone()[0] == "marketing"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT phone FROM crm.members WHERE member_id = 1")


def test_set_config_of_search_path_alone_is_followed_as_a_set(pg, enforce_proxy):
    """``SELECT set_config('search_path', '...', false)`` on its own, with constants, is how pg_dump and
    pg_restore set search_path: the proxy follows it as SET search_path. Decided on the old path, the read
    below would be refused (public.members has no email); any other use of set_config on it is refused."""
    with psycopg.connect(dsn(pg, enforce_proxy, "billing"), autocommit=True) as conn:
        assert conn.execute("SELECT pg_catalog.set_config('search_path', 'crm', false)").fetchone() == ("crm",)
        assert conn.execute("SELECT email FROM members WHERE member_id = 1").fetchone()
        for sql in ("SELECT set_config('search_path', 'public', false) WHERE true",
                    "SELECT set_config('search_path', 'public', true)",
                    "SELECT set_config('pii.purpose', 'support', false)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
        assert conn.execute("SHOW search_path").fetchone() == ("crm",)
        with conn.transaction():
            with pytest.raises(psycopg.errors.ActiveSqlTransaction):  # (25001) as SET search_path
                conn.execute("SELECT set_config('search_path', 'public', false)")


def test_pg_dump_through_the_proxy(pg, enforce_proxy):
    """pg_dump opens with set_config('search_path', '', false) and a set_config over pg_settings; a schema's
    dump goes through, its data under the purpose's rules."""
    password = next(u.password for u in pg.users if u.name == "app")
    env = {**os.environ, "PGPASSWORD": password, "PGOPTIONS": "-c pii.purpose=billing"}
    r = subprocess.run(["pg_dump", "-h", enforce_proxy.host, "-p", str(enforce_proxy.port), "-U", "app", "-d", "app",
                        "-s", "-n", "crm"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "CREATE TABLE crm.members" in r.stdout


def test_set_purpose_inside_a_transaction_block_is_refused(pg, enforce_proxy):
    seen = error_of(pg, enforce_proxy, "marketing", "SET pii.purpose = 'support'", setup=("BEGIN",))
    assert seen.sqlstate == "25001" and seen.from_proxy()
    assert seen.message == "pii.purpose can only change outside a transaction block, in a statement of its own"
    assert "COMMIT or ROLLBACK first" in seen.hint
    with psycopg.connect(dsn(pg, enforce_proxy, "marketing")) as conn:  # not autocommit: psycopg opens BEGIN
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            conn.execute("SET pii.purpose = 'support'")
        assert conn.info.transaction_status == pq.TransactionStatus.INERROR  # as any error in a block
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SHOW pii.purpose").fetchone()[0] == "marketing"
        conn.rollback()
        conn.autocommit = True
        conn.execute("SET pii.purpose = 'support'")  # outside a block it works
        assert conn.execute("SHOW pii.purpose").fetchone()[0] == "support"
    seen = error_of(pg, enforce_proxy, "marketing", "SET LOCAL pii.purpose = 'support'", setup=("BEGIN",))
    assert seen.sqlstate == "42501" and seen.message == "SET LOCAL pii.purpose is refused by purpose-proxy"


def test_a_deallocate_that_failed_keeps_the_statement_behind_its_name(pg, enforce_proxy):
    # A DEALLOCATE that PostgreSQL never ran (an error earlier in the string) must not make
    # the proxy forget the statement: a PREPARE of the name then fails in PostgreSQL, and
    # EXECUTE after a purpose change would be decided on that text while the old one runs.
    with psycopg.connect(dsn(pg, enforce_proxy, "support"), autocommit=True) as conn:
        conn.execute("PREPARE q AS SELECT phone FROM crm.members")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0; DEALLOCATE q")
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            conn.execute("PREPARE q AS SELECT 1")
        conn.execute("SET pii.purpose = 'marketing'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("EXECUTE q")
        conn.execute("DEALLOCATE q")  # this one runs: the name is free again
        conn.execute("PREPARE q AS SELECT 1")
        assert conn.execute("EXECUTE q").fetchone() == (1,)


def test_parse_and_prepare_of_one_name_are_both_candidates(pg, enforce_proxy):
    # Parse and SQL PREPARE share PostgreSQL's namespace; the second of a name fails there
    # (42P05) but was the only text the proxy kept for its side: after a purpose change,
    # EXECUTE (or Bind) was decided on "SELECT 1" and ran the first one.
    for first_parse in (False, True):
        with psycopg.connect(dsn(pg, enforce_proxy, "support"), autocommit=True) as conn:
            pgc = conn.pgconn
            if first_parse:
                res = pgc.prepare(b"s1", b"SELECT phone FROM crm.members")
                assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
                with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                    conn.execute("PREPARE s1 AS SELECT 1")
            else:
                conn.execute("PREPARE s1 AS SELECT phone FROM crm.members")
                res = pgc.prepare(b"s1", b"SELECT 1")
                assert res.status == pq.ExecStatus.FATAL_ERROR  # 42P05 from PostgreSQL
            conn.execute("SET pii.purpose = 'marketing'")
            if first_parse:
                with pytest.raises(psycopg.Error) as info:
                    conn.execute("EXECUTE s1")
                assert info.value.sqlstate in ("26000", "42501")
            else:
                res = pgc.exec_prepared(b"s1", [])
                assert res.status == pq.ExecStatus.FATAL_ERROR
                assert res.error_field(pq.DiagnosticField.SQLSTATE) in (b"26000", b"42501", b"0A000")


@pytest.mark.parametrize("how", ["parsed-only", "failed"])
def test_a_close_all_that_did_not_run_keeps_the_cursor_guard(pg, enforce_proxy, how):
    # Hunt 16: a CLOSE ALL that was only parsed (never bound or executed), or that failed in an
    # aborted transaction block, made the proxy let the purpose change with a WITH HOLD cursor
    # still open, and FETCH then returned its rows under the new purpose.
    with psycopg.connect(dsn(pg, enforce_proxy, "support"), autocommit=True) as conn:
        conn.execute("DECLARE h CURSOR WITH HOLD FOR SELECT phone FROM crm.members")
        if how == "parsed-only":
            res = conn.pgconn.prepare(b"", b"CLOSE ALL")
            assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        else:
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("BEGIN; SELECT 1/0")
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("CLOSE ALL")
            conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM pg_cursors WHERE name = 'h'").fetchone() == (1,)
        with pytest.raises(psycopg.errors.ActiveSqlTransaction) as info:
            conn.execute("SET pii.purpose = 'marketing'")
        assert "WITH HOLD" in str(info.value)
        conn.execute("CLOSE ALL")  # this one runs: the purpose may change now
        conn.execute("SET pii.purpose = 'marketing'")


@pytest.mark.parametrize("what", ["prepare", "deallocate"])
def test_a_prepare_or_deallocate_only_parsed_changes_no_statement(pg, enforce_proxy, what):
    # Hunt 16: a PREPARE or DEALLOCATE that was only parsed made the proxy forget the statement behind
    # the name (a Parse's, or a SQL PREPARE's), and EXECUTE after a purpose change ran it undecided.
    with psycopg.connect(dsn(pg, enforce_proxy, "support"), autocommit=True) as conn:
        pgc = conn.pgconn
        if what == "prepare":
            assert pgc.prepare(b"s", b"SELECT phone FROM crm.members").status == pq.ExecStatus.COMMAND_OK
            assert pgc.prepare(b"", b"PREPARE s AS SELECT 1").status == pq.ExecStatus.COMMAND_OK
        else:
            conn.execute("PREPARE s AS SELECT phone FROM crm.members")
            assert pgc.prepare(b"", b"DEALLOCATE s").status == pq.ExecStatus.COMMAND_OK
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                conn.execute("PREPARE s AS SELECT 1")
        conn.execute("SET pii.purpose = 'marketing'")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("EXECUTE s")
        assert info.value.sqlstate in ("26000", "42501") and info.value.diag.source_file is None


def test_extended_messages_after_a_sync_keep_the_purpose_from_changing(pg, enforce_proxy):
    # Hunt 16: Sync, then BEGIN and DECLARE through Parse/Bind/Execute with a Flush instead of a Sync.
    # The answer to the first Sync made the proxy take the session for idle, outside a transaction:
    # it let the purpose change inside the transaction, and FETCH read the cursor under it.
    def pbe(sql: bytes) -> bytes:
        return (_msg(b"P", b"\x00" + sql + b"\x00\x00\x00") + _msg(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
                + _msg(b"E", b"\x00\x00\x00\x00\x00"))

    conn = psycopg.connect(dsn(pg, enforce_proxy, "support"), autocommit=True)
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        sock.settimeout(10)
        sock.sendall(_msg(b"S") + pbe(b"BEGIN") + pbe(b"DECLARE c CURSOR FOR SELECT phone FROM crm.members")
                     + _msg(b"H"))
        got = b""
        while b"Z\x00\x00\x00\x05I" not in got or got.count(b"C\x00\x00\x00") < 2:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed"
            got += chunk
        sock.sendall(_msg(b"Q", b"SET pii.purpose = 'marketing'\x00"))
        got = b""
        while b"Z\x00\x00\x00\x05" not in got:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed"
            got += chunk
        assert b"C25001\x00" in got  # refused: the session is in a transaction block
        assert got.endswith(b"Z\x00\x00\x00\x05E")
    finally:
        sock.close()
        conn.close()


def test_a_schema_reload_reaches_statements_prepared_before(pg, enforce_db):
    # A hunt had a view's column replaced (same name, another source) outside the proxy and the
    # schema reloaded: a session that only bound its prepared statement again kept the old
    # decision and returned the new column's values. Its next Bind must be decided again.
    view = f"crm.v_{uuid.uuid4().hex[:8]}"
    proxy = enforcing_proxy(pg, POLICY_DIR)
    try:
        with psycopg.connect(enforce_db, autocommit=True) as owner:
            owner.execute(f"CREATE VIEW {view} AS SELECT member_id, name FROM crm.members")
        with psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True) as conn, \
                psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True) as other:
            query = f"SELECT name FROM {view} ORDER BY member_id LIMIT 1".encode()
            res = conn.pgconn.prepare(b"s", query)
            assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
            assert conn.pgconn.exec_prepared(b"s", []).status == pq.ExecStatus.TUPLES_OK
            with psycopg.connect(enforce_db, autocommit=True) as owner:
                owner.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT member_id, phone AS name FROM crm.members")

            def reloaded() -> bool:  # an unknown name makes the proxy load the schema again
                with pytest.raises(psycopg.Error):
                    other.execute("SELECT * FROM crm.no_such_table_here")
                try:
                    other.execute(query.decode())
                except psycopg.errors.InsufficientPrivilege:
                    return True
                return False

            wait_for(reloaded, 30, "the proxy to load the changed view")
            res = conn.pgconn.exec_prepared(b"s", [])
            assert res.status == pq.ExecStatus.FATAL_ERROR
            assert res.error_field(pq.DiagnosticField.SQLSTATE) in (b"42501", b"0A000")
    finally:
        proxy.stop()
        with psycopg.connect(enforce_db, autocommit=True) as owner:
            owner.execute(f"DROP VIEW IF EXISTS {view}")


def test_set_purpose_through_the_extended_protocol_is_refused(pg, enforce_proxy):
    """A prepared SET runs only when (and if) it is executed, which the proxy cannot see."""
    with psycopg.connect(dsn(pg, enforce_proxy, "marketing"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute("SET pii.purpose = 'support'", prepare=True)
        assert info.value.diag.source_file is None
        assert "simple query" in info.value.diag.message_hint
        assert conn.execute("SHOW pii.purpose").fetchone()[0] == "marketing"


def test_denial_names_column_rule_and_way_forward(pg, enforce_proxy):
    seen = error_of(pg, enforce_proxy, "marketing", "SELECT member_id, phone FROM crm.members WHERE member_id = 1")
    assert seen.sqlstate == "42501" and seen.from_proxy()
    assert seen.message == 'purpose "marketing" may not read personal data of category "contact.phone"'
    line = policy_line("p, staff, marketing, contact.phone, read, deny")
    assert seen.detail == (f"crm.members.phone (contact.phone, read): denied by policy.csv:{line}: "
                           "p, staff, marketing, contact.phone, read, deny")
    assert seen.hint == ("Declare a purpose that covers contact.phone (role app may use: support), "
                         "or remove crm.members.phone from the statement.")
    # Several denied columns: all listed, the default deny named as such; no literal from the SQL.
    seen = error_of(pg, enforce_proxy, "marketing",
                    "SELECT birth_date, phone FROM crm.members WHERE email = 'secret-literal@example.jp'")
    assert "crm.members.birth_date (identity.birth_date, read): no rule allows it (default deny)" in seen.detail
    assert "crm.members.phone (contact.phone, read): denied by policy.csv:" in seen.detail
    assert "secret-literal" not in seen.psql and "secret-literal" not in seen.detail + seen.hint + seen.message


def test_parse_failure_is_refused_and_not_sent_upstream(pg, enforce_proxy):
    marker = "garbage_" + uuid.uuid4().hex[:10]
    garbage = f"SELEKT {marker} FRUM crm.members WHERE ((("
    log_file = getattr(pg, "log_file", None)
    if log_file is not None:
        pg.psql_admin("ALTER ROLE app IN DATABASE app SET log_statement = 'all'")
    try:
        seen = error_of(pg, enforce_proxy, "marketing", garbage)
    finally:
        if log_file is not None:
            pg.psql_admin("ALTER ROLE app IN DATABASE app RESET log_statement")
    assert seen.sqlstate == "42501" and seen.from_proxy()
    assert seen.message.startswith("purpose-proxy could not analyse the statement with certainty: ")
    assert "fail closed" in seen.hint
    assert marker not in seen.message + (seen.detail or "")  # not PostgreSQL's "syntax error at or near"
    if log_file is not None:
        log = log_file.read_text(errors="replace")
        assert "purpose_proxy_refused_" in log  # the stand-in went upstream ...
        assert marker not in log  # ... the statement never did


def test_unknown_function_is_refused(pg, enforce_proxy):
    seen = error_of(pg, enforce_proxy, "billing", "SELECT public.note_count()")
    assert seen.sqlstate == "42501" and seen.from_proxy()
    assert seen.message == ("function public.note_count is not declared in the policy catalog, so the proxy "
                            "cannot tell which personal data it reads")
    assert "catalog.yaml" in seen.hint
    seen = error_of(pg, enforce_proxy, "billing", "SELECT crm.lookup_card(1)")
    assert "crm.lookup_card is not declared" in seen.message
    seen = error_of(pg, enforce_proxy, "billing", "SELECT query_to_xml('select 1', true, false, '')")
    assert seen.sqlstate == "42501" and "query_to_xml" in seen.message and seen.from_proxy()
    with psycopg.connect(dsn(pg, enforce_proxy, "billing"), autocommit=True) as conn:  # declared: fine
        assert conn.execute("SELECT crm.member_label(1)").fetchone()[0].startswith("CANARY-NAME-1")


def test_ddl_needs_an_admin_rule(pg, enforce_proxy):
    table = "ddl_" + uuid.uuid4().hex[:8]
    seen = error_of(pg, enforce_proxy, "marketing", f"CREATE TABLE public.{table} (x int)")
    assert seen.sqlstate == "42501" and seen.from_proxy()
    assert seen.message == 'purpose "marketing" does not allow administrative statements (ddl)'
    assert seen.hint == "Role app may run administrative statements under: maintenance."
    seen = error_of(pg, enforce_proxy, None, f"CREATE TABLE public.{table} (x int)")
    assert seen.message == "no purpose declared: the statement uses an administrative statement (ddl)"
    with psycopg.connect(dsn(pg, enforce_proxy, "maintenance"), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{table} (x int)")
        conn.execute(f"DROP TABLE public.{table}")
    seen = error_of(pg, enforce_proxy, "support", "TRUNCATE public.scratch")
    assert seen.message == 'purpose "support" does not allow administrative statements (truncate)'
    seen = error_of(pg, enforce_proxy, "support", "DO $$ BEGIN NULL; END $$")
    assert seen.message == 'purpose "support" does not allow administrative statements (do)'


@pytest.mark.parametrize("order", ["insert-first", "insert-last"])
def test_multi_statement_query_with_a_denied_statement_runs_nothing(order, pg, enforce_proxy, enforce_db):
    marker = "multi-" + uuid.uuid4().hex[:8]
    insert = f"INSERT INTO public.scratch (v) VALUES ('{marker}')"
    denied = "SELECT phone FROM crm.members"
    sql = f"{insert}; {denied}" if order == "insert-first" else f"{denied}; {insert}"
    seen = error_of(pg, enforce_proxy, "marketing", sql)
    assert seen.sqlstate == "42501" and seen.from_proxy() and "contact.phone" in seen.message
    with psycopg.connect(enforce_db, autocommit=True) as direct:
        n = direct.execute("SELECT count(*) FROM public.scratch WHERE v = %s", [marker]).fetchone()[0]
    assert n == 0, "a statement of a refused Query ran"
    with psycopg.connect(dsn(pg, enforce_proxy, "marketing"), autocommit=True) as conn:
        conn.execute(f"{insert}; SELECT email FROM crm.members WHERE member_id = 1")  # all allowed: runs
    with psycopg.connect(enforce_db, autocommit=True) as direct:
        assert direct.execute("DELETE FROM public.scratch WHERE v = %s", [marker]).rowcount == 1


def test_constraint_error_detail_is_withheld(pg, enforce_proxy, enforce_db):
    """billing may write member_id, not read phone: a not-null violation's DETAIL would show the row."""
    seen = error_of(pg, enforce_proxy, "billing", "UPDATE crm.members SET member_id = NULL WHERE member_id = 1")
    assert seen.sqlstate == "23502" and not seen.from_proxy()  # PostgreSQL's error ...
    assert "CANARY" not in seen.detail + seen.psql and "1911" not in seen.psql  # ... without the row
    assert "withheld" in seen.detail
    with psycopg.connect(enforce_db, autocommit=True) as direct:  # directly, PostgreSQL shows it
        with pytest.raises(psycopg.errors.NotNullViolation) as info:
            direct.execute("UPDATE crm.members SET member_id = NULL WHERE member_id = 1")
        assert "CANARY-PHONE-1" in info.value.diag.message_detail


# --- policy hot reload ------------------------------------------------------------------------------------


@pytest.fixture
def policy_copy(tmp_path):
    d = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, d)
    return d


def _append_rule(policy_dir, line: str) -> None:
    path = policy_dir / "policy.csv"
    path.write_text(path.read_text() + line + "\n")


@pytest.mark.parametrize("trigger", ["file-watch", "sighup"])
def test_policy_hot_reload_applies_without_reconnecting(trigger, pg, enforce_db, policy_copy):
    proxy = enforcing_proxy(pg, policy_copy, watch_interval=0.2 if trigger == "file-watch" else 0)
    try:
        with psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True) as conn:
            sql = "SELECT email FROM crm.members WHERE member_id = %s"
            assert conn.execute("SELECT email FROM crm.members WHERE member_id = 1").fetchone()
            assert conn.execute(sql, [1], prepare=True).fetchone()  # prepared under the old policy
            _append_rule(policy_copy, "p, staff, marketing, contact.email, read, deny")
            if trigger == "sighup":
                proxy.signal(signal.SIGHUP)

            def refused():
                try:
                    conn.execute("SELECT email FROM crm.members WHERE member_id = 1")
                except psycopg.errors.InsufficientPrivilege as e:
                    return e
                return None

            e = wait_for(refused, 10, "the reloaded policy to refuse email under marketing")
            assert 'category "contact.email"' in e.diag.message_primary
            assert "p, staff, marketing, contact.email, read, deny" in e.diag.message_detail
            with pytest.raises(psycopg.Error) as info:  # the statement prepared before the reload too
                conn.execute(sql, [1], prepare=True)
            assert info.value.sqlstate in ("42501", "0A000") and info.value.diag.source_file is None
            assert conn.execute("SELECT name FROM crm.members WHERE member_id = 1").fetchone()  # still allowed
        assert "policy reloaded" in proxy.log()
    finally:
        proxy.stop()


def test_broken_policy_reload_keeps_the_previous_policy(pg, enforce_db, policy_copy):
    proxy = enforcing_proxy(pg, policy_copy, watch_interval=0.2)
    try:
        with psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True) as conn:
            assert conn.execute("SELECT email FROM crm.members WHERE member_id = 1").fetchone()
            good = (policy_copy / "policy.csv").read_text()
            # An allow for phone that would be a leak if loaded, plus an invalid line.
            _append_rule(policy_copy, "p, app, marketing, contact.phone, read, allow")
            _append_rule(policy_copy, "p, app, no_such_purpose, contact, read, allow")
            wait_for(lambda: "policy reload" in proxy.log() and "failed" in proxy.log(), 10,
                     "the proxy to log the failed reload")
            assert "previous policy" in proxy.log()
            # The same session (not dropped) still works under the previous policy.
            assert conn.execute("SELECT email FROM crm.members WHERE member_id = 1").fetchone()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT phone FROM crm.members WHERE member_id = 1")
            with psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True) as other:  # new sessions too
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    other.execute("SELECT phone FROM crm.members")
            # Fixed: the next reload takes effect.
            (policy_copy / "policy.csv").write_text(good + "p, staff, marketing, contact.email, read, deny\n")

            def refused():
                try:
                    conn.execute("SELECT email FROM crm.members WHERE member_id = 1")
                except psycopg.errors.InsufficientPrivilege:
                    return True
                return False

            wait_for(refused, 10, "the fixed policy to be loaded")
            assert conn.info.status == pq.ConnStatus.OK
    finally:
        proxy.stop()


def test_a_half_written_catalog_is_not_put_in_force_by_the_watcher(pg, enforce_db, policy_copy):
    """Hunt 20: catalog.yaml written up to ``schemas:``, then a pause of a second: valid YAML that catalogues
    nothing, put in force by the watcher, and phone numbers came back under marketing. Now the watcher leaves a
    change that protects less to SIGHUP."""
    proxy = enforcing_proxy(pg, policy_copy, watch_interval=0.2)
    try:
        with psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT phone FROM crm.members WHERE member_id = 1")
            catalog = policy_copy / "catalog.yaml"
            full = catalog.read_text()
            catalog.write_text(full[:full.index("\nschemas:") + 1])
            wait_for(lambda: "leaves them to a deliberate reload" in proxy.log(), 10, "the watcher to hold the change")
            assert "crm.members: no longer catalogued" in proxy.log()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT phone FROM crm.members WHERE member_id = 1")
            proxy.signal(signal.SIGHUP)  # deliberately: now it is the policy (and phone is not personal)

            def read():
                try:
                    return conn.execute("SELECT phone FROM crm.members WHERE member_id = 1").fetchone()
                except psycopg.errors.InsufficientPrivilege:
                    return None

            assert wait_for(read, 10, "SIGHUP to put the change in force")
    finally:
        proxy.stop()


# --- client encodings the proxy cannot read ------------------------------------------------------------
# In PostgreSQL's client-only encodings (SJIS, BIG5, GBK, ...) the second byte of a character
# can be a backslash: "E'\x95\\'" is one string for a reader of UTF-8 and an unterminated one
# for PostgreSQL, which converts from the client encoding first. Under SJIS this statement
# read cards as marketing before the proxy refused these encodings (now all but UTF8).
SJIS_SMUGGLE = (b"SELECT E'\x95\\' AS x, member_id, phone FROM crm.members LIMIT 3 --'")


def test_a_client_only_encoding_at_connect_is_fatal(pg, enforce_proxy):
    for extra in ({"client_encoding": "SJIS"}, {"options": "'-c pii.purpose=marketing -c client_encoding=win932'"}):
        conninfo = pg.dsn("app", host=enforce_proxy.host, port=enforce_proxy.port,
                          **({} if "options" in extra else purpose_options("marketing")), **extra)
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(conninfo)
        assert "FATAL" in str(info.value) and "is not supported by purpose-proxy" in str(info.value)


def test_a_client_only_encoding_cannot_be_set(pg, enforce_proxy):
    for sql in ("SET client_encoding = 'SJIS'", "SET NAMES 'big5'", "SET client_encoding TO \"Shift_JIS_2004\"",
                "SELECT set_config('client_encoding', 'GBK', false)"):
        seen = error_of(pg, enforce_proxy, "marketing", sql)
        assert seen.sqlstate in ("0A000", "42501") and seen.from_proxy(), sql
    # LATIN1 is ASCII-safe, but a byte above 0x7F is two bytes of UTF-8 in PostgreSQL: names
    # the proxy truncated at 63 bytes to one name were two (a hunt swapped a WITH query so).
    seen = error_of(pg, enforce_proxy, "marketing", "SET client_encoding = 'LATIN1'")
    assert seen.sqlstate == "0A000" and seen.from_proxy()
    with psycopg.connect(dsn(pg, enforce_proxy, "marketing"), autocommit=True) as conn:
        conn.execute("SET client_encoding = 'SQL_ASCII'")  # no conversion: the server checks UTF-8
        conn.execute("RESET client_encoding")
        assert conn.execute("SHOW client_encoding").fetchone()[0] == "UTF8"


def test_a_client_only_encoding_from_the_role_refuses_every_statement(pg, enforce_proxy):
    admin = pg.dsn("postgres", dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ALTER ROLE app SET client_encoding = 'SJIS'")
    try:
        conn = pq.PGconn.connect(dsn(pg, enforce_proxy, "marketing").encode())
        assert conn.status == pq.ConnStatus.OK, conn.error_message
        assert conn.parameter_status(b"client_encoding") == b"SJIS"
        res = conn.exec_(SJIS_SMUGGLE)
        assert res.status == pq.ExecStatus.FATAL_ERROR
        assert res.error_field(pq.DiagnosticField.SQLSTATE) == b"0A000"
        assert b"client_encoding SJIS is not supported" in res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
        conn.finish()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("ALTER ROLE app RESET client_encoding")


def test_the_purpose_can_change_after_a_copy_through_the_extended_protocol(pg, enforce_proxy):
    # libpq sends Sync with the COPY's Execute (the backend ignores it during COPY IN) and
    # another after CopyDone: one ReadyForQuery. Counted right, the session is quiet again.
    conn = pq.PGconn.connect(dsn(pg, enforce_proxy, "billing").encode())
    try:
        for data in (b"not a number\n", None):
            conn.send_query_params(b"COPY billing.invoices (invoice_id) FROM STDIN", None)
            res = conn.get_result()
            assert res.status == pq.ExecStatus.COPY_IN, res.error_message
            if data is not None:
                conn.put_copy_data(data)
            conn.put_copy_end(None if data is not None else b"changed my mind")
            res = conn.get_result()
            assert res.status == pq.ExecStatus.FATAL_ERROR  # bad input, then CopyFail
            assert conn.get_result() is None
        res = conn.exec_(b"SET pii.purpose = 'support'")
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        assert conn.exec_(b"SHOW pii.purpose").get_value(0, 0) == b"support"
    finally:
        conn.finish()


def _msg(t: bytes, body: bytes = b"") -> bytes:
    return t + (len(body) + 4).to_bytes(4, "big") + body


_COPY_EXTENDED = (_msg(b"P", b"\x00COPY billing.invoices (invoice_id) FROM STDIN\x00\x00\x00")
                  + _msg(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00") + _msg(b"E", b"\x00\x00\x00\x00\x00")
                  + _msg(b"H"))
_COPY_SIMPLE = _msg(b"Q", b"COPY billing.invoices (invoice_id) FROM STDIN\x00")


@pytest.mark.parametrize("start, during, answers", [
    # CopyFail, then three Syncs: the backend left COPY IN at the CopyFail and answers each.
    (_COPY_EXTENDED, _msg(b"f", b"stop\x00") + _msg(b"S") * 3, 3),
    # Bad data, then a Sync: the copy fails on the data, then the backend reads and answers the Sync.
    (_COPY_EXTENDED, _msg(b"d", b"not a number\n") + _msg(b"S"), 1),
    (_COPY_SIMPLE, _msg(b"d", b"not a number\n") + _msg(b"S"), 2),
], ids=["copy-fail-then-syncs", "bad-data-then-sync", "simple-copy-bad-data-then-sync"])
def test_syncs_around_a_failing_copy_keep_the_session_busy(pg, enforce_proxy, start, during, answers):
    # Sent in one write after CopyInResponse: the copy's end as above, then a transaction with
    # a slow statement. A purpose change sent while it runs must be refused as not quiet,
    # however the backend counts the Syncs (hunts found both ways to make the proxy count
    # one too few, and the SET was let through inside the transaction).
    conn = psycopg.connect(dsn(pg, enforce_proxy, "billing"), autocommit=True)
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        sock.settimeout(10)
        sock.sendall(start)
        got = b""
        while b"G" not in [got[i:i + 1] for i in _starts(got)]:
            got += sock.recv(65536)
        sock.sendall(during + _msg(b"Q", b"BEGIN; SELECT pg_sleep(1)\x00"))
        time.sleep(0.4)
        sock.sendall(_msg(b"Q", b"SET pii.purpose = 'support'\x00"))
        got = b""
        while got.count(b"Z\x00\x00\x00\x05") < answers + 2:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed"
            got += chunk
        assert b"C25001\x00" in got  # the SET: refused, the session was not quiet
    finally:
        sock.close()
        conn.close()


def _starts(buf: bytes):
    """Offsets of the messages in ``buf`` (a run of whole or partial backend messages)."""
    i = 0
    while i + 5 <= len(buf):
        yield i
        i += 1 + int.from_bytes(buf[i + 1:i + 5], "big")


# --- DDL: the schema the proxy decides on changes --------------------------------------------------------


@pytest.fixture
def ddl_decoy(pg, enforce_db):
    """A schema holding a decoy ``members`` (as crm.members, nothing personal), created directly and
    owned by app; the proxy started after it knows it. Yields (schema, proxy)."""
    schema = f"dd_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(enforce_db, autocommit=True) as owner:
        owner.execute(f"CREATE SCHEMA {schema}")
        owner.execute(f"CREATE TABLE {schema}.members (member_id int, phone text)")
        owner.execute(f"INSERT INTO {schema}.members VALUES (1, 'not-a-phone')")
    proxy = enforcing_proxy(pg, POLICY_DIR)
    try:
        yield schema, proxy
    finally:
        proxy.stop()
        with psycopg.connect(enforce_db, autocommit=True) as owner:
            owner.execute(f"DROP SCHEMA {schema} CASCADE")


def _phone_reader(pg, proxy, schema: str) -> psycopg.Connection:
    """Marketing (phone denied) with the decoy's schema first in its search_path: ``members`` is the
    decoy while it exists, crm.members once it is gone."""
    conn = psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True)
    conn.execute(f"SET search_path = {schema}, crm")
    assert conn.execute("SELECT phone FROM members").fetchall() == [("not-a-phone",)]
    return conn


def _never_the_real_phones(conn: psycopg.Connection) -> None:
    """``SELECT phone FROM members`` is refused (while the schema reloads: 40001, retried), and never
    returns crm.members' phones."""
    deadline = time.monotonic() + 30
    while True:
        try:
            rows = conn.execute("SELECT phone FROM members").fetchall()
        except psycopg.errors.SerializationFailure as exc:  # the proxy is loading the new schema
            assert "loading it again" in str(exc)
            assert time.monotonic() < deadline, "the schema was never loaded again"
            time.sleep(0.05)
            continue
        except psycopg.errors.InsufficientPrivilege as exc:
            assert "contact.phone" in str(exc)
            return
        raise AssertionError(f"the statement ran on the old schema's decision: {rows[:2]}")


def test_ddl_committed_after_a_while_is_taken_up_before_the_next_statement(pg, ddl_decoy):
    # A hunt dropped the decoy in a transaction block held open for a while: the loads the DDL
    # started ran before the COMMIT (their connection cannot see uncommitted catalogs), nothing
    # loaded again at the COMMIT, and marketing read crm.members' phones through the decoy's name
    # until the next interval reload.
    schema, proxy = ddl_decoy
    reader = _phone_reader(pg, proxy, schema)
    with psycopg.connect(dsn(pg, proxy, "maintenance"), autocommit=True) as admin, reader:
        admin.execute("BEGIN")
        admin.execute(f"DROP TABLE {schema}.members")
        time.sleep(2.5)  # longer than the old once-a-second reload deferral
        admin.execute("COMMIT")
        _never_the_real_phones(reader)


def test_statements_after_ddl_in_its_transaction_are_refused(pg, ddl_decoy):
    # In the DDL's own transaction the proxy's schema (read through its own connection) cannot
    # know the change: what follows it there is refused, until it commits.
    schema, proxy = ddl_decoy
    with psycopg.connect(dsn(pg, proxy, "maintenance"), autocommit=True) as admin:
        admin.execute(f"SET search_path = {schema}, crm")
        admin.execute("BEGIN")
        admin.execute(f"DROP TABLE {schema}.members")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            admin.execute("SELECT phone FROM members")
        assert "DDL earlier in this transaction" in str(info.value)
        admin.execute("ROLLBACK")
        with pytest.raises(psycopg.errors.FeatureNotSupported):  # in one Query too
            admin.execute(f"DROP TABLE {schema}.members; SELECT phone FROM members")


def test_ddl_run_through_the_extended_protocol_later_is_taken_up(pg, ddl_decoy):
    # A hunt prepared the DROP (Parse, Sync: the reloads ran then, before it ran) and executed it
    # later: nothing loaded the schema again.
    schema, proxy = ddl_decoy
    reader = _phone_reader(pg, proxy, schema)
    with psycopg.connect(dsn(pg, proxy, "maintenance"), autocommit=True) as admin, reader:
        res = admin.pgconn.prepare(b"dd", f"DROP TABLE {schema}.members".encode())
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        time.sleep(2.5)
        res = admin.pgconn.exec_prepared(b"dd", [])
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        _never_the_real_phones(reader)


def test_a_statement_prepared_before_ddl_cannot_run_after_it_in_one_pipeline(pg, ddl_decoy):
    # Bind and Execute of a statement prepared on the decoy, pipelined right after the DROP's: the
    # statement would be planned again by PostgreSQL on crm.members.
    schema, proxy = ddl_decoy
    with psycopg.connect(dsn(pg, proxy, "maintenance"), autocommit=True) as admin:
        admin.execute(f"SET search_path = {schema}, crm")
        for name, sql in ((b"read", "SELECT phone FROM members"), (b"dd", f"DROP TABLE {schema}.members")):
            res = admin.pgconn.prepare(name, sql.encode())
            assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        pgconn = admin.pgconn
        pgconn.enter_pipeline_mode()
        pgconn.send_query_prepared(b"dd", [])
        pgconn.send_query_prepared(b"read", [])
        pgconn.pipeline_sync()
        results = []
        while True:
            pgconn.consume_input()
            res = pgconn.get_result()
            if res is None:
                continue
            results.append(res)
            if res.status == pq.ExecStatus.PIPELINE_SYNC:
                break
        pgconn.exit_pipeline_mode()
        assert all(r.status != pq.ExecStatus.TUPLES_OK for r in results), [r.status for r in results]
        refused = [r for r in results if r.status == pq.ExecStatus.FATAL_ERROR]
        assert refused and refused[0].error_field(pq.DiagnosticField.SQLSTATE) == b"0A000"


def test_a_bind_split_across_a_policy_reload_is_decided_again(pg, enforce_db, policy_copy):
    # A hunt sent the first bytes of a Bind, had the policy reloaded to deny the statement's column,
    # then sent the rest: with observability off Bind streamed through undecided once it had begun,
    # and the statement ran under the old policy.
    from proxy.devtools.process import OBSERVABILITY_OFF, ProxyProcess

    proxy = ProxyProcess(pg.address, "--decider", "purpose", "--policies", str(policy_copy), "--schema-dsn",
                         pg.url("postgres", dbname="postgres"), "--policy-watch-interval", "0",
                         *OBSERVABILITY_OFF).start()
    conn = psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True)
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        res = conn.pgconn.prepare(b"s", b"SELECT email FROM crm.members WHERE member_id = 1")
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        bind = _msg(b"B", b"\x00s\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
        sock.settimeout(10)
        sock.sendall(bind[:7])
        time.sleep(0.2)
        _append_rule(policy_copy, "p, staff, marketing, contact.email, read, deny")
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: "policy reloaded" in proxy.log(), 10, "the policy reload")
        sock.sendall(bind[7:] + _msg(b"E", b"\x00\x00\x00\x00\x00") + _msg(b"S"))
        got = b""
        while b"Z\x00\x00\x00\x05" not in got:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed"
            got += chunk
        assert b"CANARY-EMAIL" not in got
        assert b"C42501\x00" in got or b"C0A000\x00" in got, got
    finally:
        sock.close()
        conn.close()
        proxy.stop()


def test_ddl_run_directly_in_postgresql_is_noticed_by_the_catalog_watch(pg, enforce_db, ddl_decoy):
    # DDL run directly in PostgreSQL (a migration tool that does not connect through the proxy) used
    # to be seen only at the next interval reload, 300 s later: for that long marketing read
    # crm.members' phones through the dropped decoy's name. The catalog watch (every 2 s by default)
    # notices the change and loads the schema again, with no statement naming anything unknown.
    schema, proxy = ddl_decoy
    with _phone_reader(pg, proxy, schema) as reader:
        with psycopg.connect(enforce_db, autocommit=True) as owner:
            owner.execute(f"DROP TABLE {schema}.members")
        wait_for(lambda: "catalogs changed outside the proxy" in proxy.log(), 20, "the catalog watch")

        def refused() -> bool:
            try:
                reader.execute("SELECT phone FROM members").fetchall()
            except psycopg.errors.InsufficientPrivilege as exc:
                assert "contact.phone" in str(exc)
                return True
            return False

        wait_for(refused, 20, "the reloaded schema to decide the statement")


def test_a_view_locked_while_the_catalogs_change_makes_the_schema_stale(pg, enforce_db, ddl_decoy):
    # Found by a hunt: an application session holding a lock on a view keeps every load failing
    # (pg_get_viewdef waits for the lock, lock_timeout ends the wait); after DDL run directly the proxy
    # then kept deciding on the old schema for as long as the lock was held. Now a failed load after a
    # change the catalog watch saw makes the schema stale: refused (40001) until a load succeeds.
    schema, proxy = ddl_decoy
    with _phone_reader(pg, proxy, schema) as reader, psycopg.connect(enforce_db) as locker:
        locker.execute("LOCK TABLE crm.member_contacts IN ACCESS EXCLUSIVE MODE")  # (a transaction of its own)
        with psycopg.connect(enforce_db, autocommit=True) as owner:
            owner.execute(f"DROP TABLE {schema}.members")
        wait_for(lambda: "schema refresh of database app failed" in proxy.log(), 30, "a failed load")
        with pytest.raises(psycopg.errors.SerializationFailure):
            reader.execute("SELECT phone FROM members")
        locker.rollback()
        _never_the_real_phones(reader)


def test_a_schema_the_role_may_not_use_is_not_searched(pg, enforce_db):
    # Found by a hunt: PostgreSQL leaves schemas the role has no USAGE on out of its search_path, so
    # with a decoy members there the proxy decided on the decoy and PostgreSQL read crm.members.
    schema = f"nu_{uuid.uuid4().hex[:8]}"
    pg.psql_admin(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.members (member_id int, phone text); "
                  f"INSERT INTO {schema}.members VALUES (1, 'not-a-phone')", dbname="app")
    proxy = enforcing_proxy(pg, POLICY_DIR)
    try:
        with psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True) as conn:
            conn.execute(f"SET search_path = {schema}, crm")
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute("SELECT phone FROM members").fetchall()
            assert "contact.phone" in str(info.value)
            # Once granted (the catalog watch sees it), both read the decoy.
            pg.psql_admin(f"GRANT USAGE ON SCHEMA {schema} TO app; GRANT SELECT ON {schema}.members TO app",
                          dbname="app")

            def decoy() -> bool:
                try:
                    return conn.execute("SELECT phone FROM members").fetchall() == [("not-a-phone",)]
                except psycopg.errors.InsufficientPrivilege:
                    return False

            wait_for(decoy, 20, "the grant to be taken up")
    finally:
        proxy.stop()
        pg.psql_admin(f"DROP SCHEMA {schema} CASCADE", dbname="app")


@pytest.mark.parametrize("space", ["\u3000", "\u00a0", "\x1c"])
def test_a_startup_search_path_is_split_as_postgresql_splits_it(pg, enforce_proxy, space):
    # Found by a hunt: to PostgreSQL "public<U+3000>" is one (missing) schema name, so members is
    # crm.members; the proxy stripped the U+3000 and decided on the decoy public.members.
    async def go() -> None:
        conn = await asyncpg.connect(url(pg, enforce_proxy), database="app",
                                     server_settings={"search_path": f"public{space}, crm",
                                                      "pii.purpose": "marketing"})
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("SELECT phone FROM members")
        finally:
            await conn.close()

    run(go())


def test_a_revoked_schema_reaches_statements_prepared_before(pg, enforce_db):
    # Found by a hunt: a REVOKE of USAGE run directly was taken up by new statements, but the schema's
    # version did not change, so epochs did not move and EXECUTE / Bind of a statement prepared on the
    # decoy went on reading crm.members.
    schema = f"nu_{uuid.uuid4().hex[:8]}"
    pg.psql_admin(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.members (member_id int, phone text); "
                  f"INSERT INTO {schema}.members VALUES (1, 'not-a-phone'); GRANT USAGE ON SCHEMA {schema} TO app; "
                  f"GRANT SELECT ON {schema}.members TO app", dbname="app")
    proxy = enforcing_proxy(pg, POLICY_DIR)
    try:
        with psycopg.connect(dsn(pg, proxy, "marketing"), autocommit=True) as conn:
            conn.execute(f"SET search_path = {schema}, crm")
            conn.execute("PREPARE p AS SELECT phone FROM members")
            assert conn.execute("EXECUTE p").fetchall() == [("not-a-phone",)]
            loads = proxy.log().count("schema of database app loaded")
            pg.psql_admin(f"REVOKE USAGE ON SCHEMA {schema} FROM app", dbname="app")
            # (until the catalog watch has seen it and the load ends, PostgreSQL and the proxy differ:
            # the documented window of DDL run directly)
            wait_for(lambda: proxy.log().count("schema of database app loaded") > loads, 20, "the reload")
            with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.FeatureNotSupported)):
                conn.execute("EXECUTE p").fetchall()
    finally:
        proxy.stop()
        pg.psql_admin(f"DROP SCHEMA {schema} CASCADE", dbname="app")


def test_a_role_setting_that_changes_the_role_refuses_the_login(pg, enforce_proxy):
    # Found by a hunt: ALTER ROLE ... SET role = 'other' made sessions run as another role (with its
    # schema privileges) while the proxy decided for the one that logged in.
    pg.psql_admin("ALTER ROLE app IN DATABASE app SET role = 'app'", dbname="app")
    try:
        def refused() -> bool:
            try:
                psycopg.connect(dsn(pg, enforce_proxy, "marketing")).close()
            except psycopg.OperationalError as exc:
                assert "run as another role" in str(exc)
                return True
            return False

        wait_for(refused, 20, "the role setting to be read")
    finally:
        pg.psql_admin("ALTER ROLE app IN DATABASE app RESET role", dbname="app")

    def admitted() -> bool:
        try:
            psycopg.connect(dsn(pg, enforce_proxy, "marketing")).close()
        except psycopg.OperationalError:
            return False
        return True

    wait_for(admitted, 20, "the reset to be read")


def test_an_invalid_startup_search_path_is_refused_as_postgresql_refuses_it(pg, enforce_proxy):
    async def go() -> None:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(url(pg, enforce_proxy), database="app",
                                  server_settings={"search_path": '"crm', "pii.purpose": "marketing"})
        assert info.value.sqlstate == "22023"

    run(go())


def test_the_search_path_is_pinned_at_connect_time(pg, enforce_proxy, enforce_db):
    # Found by a hunt: a search_path changed in postgresql.conf (SIGHUP) reaches open sessions that
    # never set theirs, and the proxy kept deciding on the one it read at connect time. The proxy now
    # sends the search_path it decides on in the StartupMessage, where a SIGHUP does not override it.
    with psycopg.connect(enforce_db, autocommit=True) as direct:
        default = direct.execute("SHOW search_path").fetchone()[0]
    with psycopg.connect(dsn(pg, enforce_proxy, "marketing"), autocommit=True) as conn:
        assert conn.execute("SHOW search_path").fetchone()[0] == default  # as without the proxy
        pg.psql_admin("ALTER SYSTEM SET search_path = crm, public")
        try:
            pg.psql_admin("SELECT pg_reload_conf()")
            time.sleep(0.5)
            conn.execute("SELECT 1")  # a backend takes up a reloaded configuration between statements
            assert conn.execute("SHOW search_path").fetchone()[0] == default
            conn.execute("SET search_path = crm")
            conn.execute("RESET search_path")
            assert conn.execute("SHOW search_path").fetchone()[0] == default
        finally:
            pg.psql_admin("ALTER SYSTEM RESET search_path")
            pg.psql_admin("SELECT pg_reload_conf()")


@pytest.mark.parametrize("end", ["COMMIT AND CHAIN", "prepared", "prepared, cache warm"])
def test_ddl_committed_without_leaving_a_transaction_block_is_taken_up(pg, ddl_decoy, end):
    # COMMIT AND CHAIN commits and opens the next block at once (the status never returns to idle);
    # PREPARE TRANSACTION then COMMIT PREPARED (by any session) commits DDL prepared earlier.
    # "cache warm": a hunt first sent a COMMIT PREPARED of a transaction that does not exist (it fails,
    # and its news reloaded the schema while the DDL was still uncommitted); the real one then came
    # from the decision cache by shape, which skipped the session, and nothing was reloaded after it.
    schema, proxy = ddl_decoy
    reader = _phone_reader(pg, proxy, schema)
    gid = f"pp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn(pg, proxy, "maintenance"), autocommit=True) as admin, reader:
        admin.execute("BEGIN")
        admin.execute(f"DROP TABLE {schema}.members")
        if end.startswith("prepared"):
            admin.execute(f"PREPARE TRANSACTION '{gid}'")  # the test cluster allows prepared transactions
            try:
                time.sleep(1.5)
                with psycopg.connect(dsn(pg, proxy, "maintenance"), autocommit=True) as other:
                    if end.endswith("cache warm"):  # three Query messages in one write
                        sock = socket.socket(fileno=os.dup(other.pgconn.socket))
                        try:
                            sock.settimeout(10)
                            sock.sendall(b"".join(_msg(b"Q", q.encode() + b"\x00") for q in (
                                "COMMIT PREPARED 'pp_nothere'", "SELECT pg_sleep(1)", f"COMMIT PREPARED '{gid}'")))
                            got = b""
                            while got.count(b"Z\x00\x00\x00\x05") < 3:
                                chunk = sock.recv(65536)
                                assert chunk, "the connection closed"
                                got += chunk
                            assert got.count(b"COMMIT PREPARED\x00") == 1, got
                        finally:
                            sock.close()
                    else:
                        other.execute(f"COMMIT PREPARED '{gid}'")
            finally:  # never leave it behind holding the decoy's lock (the fixture drops the schema)
                with psycopg.connect(pg.dsn("postgres", dbname="app"), autocommit=True) as su:
                    if su.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", [gid]).fetchone():
                        su.execute(f"ROLLBACK PREPARED '{gid}'")
        else:
            time.sleep(1.5)
            admin.execute(end)
        _never_the_real_phones(reader)
        if not end.startswith("prepared"):
            admin.execute("ROLLBACK")


def test_commit_and_chain_without_ddl_loads_no_schema(pg, enforce_proxy):
    """COMMIT AND CHAIN ends only this session's transaction: without DDL in it, other sessions have nothing to
    take up. Each one used to mark the database's schema stale, and every session on it got 40001 until the
    schema was loaded again (hunt 30)."""
    log = enforce_proxy.log_path
    with psycopg.connect(dsn(pg, enforce_proxy, "billing"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        before = log.read_text().count("(DDL committed)")
        for sql in ("BEGIN", "SELECT email FROM crm.members WHERE member_id = 1", "COMMIT AND CHAIN",
                    "ROLLBACK AND CHAIN", "COMMIT"):
            conn.execute(sql)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert log.read_text().count("(DDL committed)") == before


def test_a_user_defined_cast_function_counts_as_called_in_every_statement(pg, enforce_proxy):
    # Found by hunt 15: CREATE CAST (bigint AS text) WITH FUNCTION public.card_of(bigint) made
    # member_id::text return card numbers, while the analysis read the cast as a plain conversion.
    # PostgreSQL may also apply an implicit or assignment cast with no syntax at all, so every
    # statement counts as calling such a function until the catalog declares what it reads.
    from tests.support.enforce import SCHEMA_SQL

    name = "pp_cast_" + uuid.uuid4().hex[:8]
    pg.psql_admin(f'CREATE DATABASE "{name}" OWNER app')
    try:
        with psycopg.connect(pg.dsn("app", dbname=name), autocommit=True) as conn:
            conn.execute(SCHEMA_SQL.read_text())
            conn.execute("CREATE TYPE crm.label AS (v text)")
            conn.execute("CREATE FUNCTION crm.label_of(id int) RETURNS crm.label LANGUAGE sql STABLE AS "
                         "$$ SELECT ROW(string_agg(card_number, ','))::crm.label FROM billing.cards "
                         "WHERE member_id = id $$")
            conn.execute("CREATE CAST (int AS crm.label) WITH FUNCTION crm.label_of(int)")
            direct = conn.execute("SELECT (member_id::crm.label)::text FROM crm.members WHERE member_id = 1"
                                  ).fetchone()[0]
            assert "CANARY-CARD" in direct  # what the cast would hand out
        dsn = pg.dsn("app", dbname=name, host=enforce_proxy.host, port=enforce_proxy.port,
                     **purpose_options("marketing"))
        with psycopg.connect(dsn, autocommit=True) as conn:
            for sql in ("SELECT (member_id::crm.label)::text FROM crm.members WHERE member_id = 1",
                        "SELECT CAST(member_id AS crm.label) FROM crm.members WHERE member_id = 1",
                        "SELECT member_id FROM crm.members WHERE member_id = 1"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                    conn.execute(sql).fetchall()
                assert "crm.label_of is behind a cast" in str(err.value), sql
    finally:
        pg.psql_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _scratch_database(pg, prefix: str, setup: list[str]) -> str:
    """A new database owned by app holding the enforcement schema and ``setup`` (run as app)."""
    from tests.support.enforce import SCHEMA_SQL

    name = prefix + uuid.uuid4().hex[:8]
    pg.psql_admin(f'CREATE DATABASE "{name}" OWNER app')
    with psycopg.connect(pg.dsn("app", dbname=name), autocommit=True) as conn:
        conn.execute(SCHEMA_SQL.read_text())
        for sql in setup:
            conn.execute(sql)
    return name


_CARDS_FN = ("CREATE FUNCTION public.cards() RETURNS text LANGUAGE sql STABLE AS "
             "$$ SELECT string_agg(card_number, ',') FROM billing.cards $$")


@pytest.fixture(scope="module")
def implicit_db(pg):
    """A database with a trigger, a column default, a row-level security policy and a rule that hand
    out card numbers, each on a table of its own in public (which the test catalog does not hold)."""
    name = _scratch_database(pg, "pp_implicit_", [
        _CARDS_FN,
        "CREATE FUNCTION public.fill_v() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN NEW.v := public.cards(); RETURN NEW; END $$",
        "CREATE TABLE public.trig_t (id int, v text)",
        "CREATE TRIGGER fill BEFORE INSERT ON public.trig_t FOR EACH ROW EXECUTE FUNCTION public.fill_v()",
        "CREATE TABLE public.def_t (id int, v text DEFAULT public.cards())",
        "CREATE FUNCTION public.shout(x int) RETURNS boolean LANGUAGE plpgsql STABLE AS "
        "$$ BEGIN RAISE EXCEPTION 'seen: %', public.cards(); END $$",
        "CREATE TABLE public.rls_t (id int)",
        "INSERT INTO public.rls_t VALUES (1)",
        "ALTER TABLE public.rls_t ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE public.rls_t FORCE ROW LEVEL SECURITY",
        "CREATE POLICY peek ON public.rls_t USING (public.shout(id))",
        "CREATE TABLE public.rule_t (id int)",
        "CREATE RULE steal AS ON INSERT TO public.rule_t DO INSTEAD SELECT card_number FROM billing.cards",
    ])
    yield name
    pg.psql_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("sql, message", [
    ("INSERT INTO public.trig_t (id) VALUES (1) RETURNING v",
     "function public.fill_v runs in a trigger on public.trig_t"),
    ("INSERT INTO public.def_t (id) VALUES (1) RETURNING v",
     "function public.cards is behind a column default of public.def_t"),
    ("SELECT count(*) FROM public.rls_t",
     "function public.shout is behind a row-level security policy of public.rls_t"),
    ("INSERT INTO public.rule_t VALUES (1)", "public.rule_t has rules (CREATE RULE)"),
], ids=["trigger", "default", "rls-policy", "rule"])
def test_code_a_write_or_read_runs_without_naming_it_counts_as_called(pg, enforce_proxy, implicit_db, sql, message):
    # Found by a hunt: PostgreSQL runs triggers, column defaults, row-level security policies and
    # rules that the statement never names; through the proxy they handed out card numbers under a
    # purpose denied them. The schema load now reads them, and a statement writing (or reading) the
    # relation counts their functions as called; a write to a relation with rules is refused.
    with psycopg.connect(pg.dsn("app", dbname=implicit_db)) as conn:  # what it would hand out
        try:
            seen = str(conn.execute(sql).fetchall())
        except psycopg.Error as exc:
            seen = str(exc)
        conn.rollback()
        assert "CANARY-CARD" in seen
    dsn = pg.dsn("app", dbname=implicit_db, host=enforce_proxy.host, port=enforce_proxy.port,
                 **purpose_options("marketing"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute(sql).fetchall()
        assert message in str(err.value)
        # Only the statements that touch those relations: the rest of the database is as before.
        assert conn.execute("SELECT count(*) FROM public.notes").fetchone()[0] == 4
        conn.execute("BEGIN")
        conn.execute("INSERT INTO public.notes (note_id, body) VALUES (99, 'x')")
        conn.execute("ROLLBACK")


def test_a_user_defined_operator_applied_implicitly_counts_as_called_in_every_statement(pg, enforce_proxy):
    # Found by a hunt: x IN (1.0) ran public.=(bigint, numeric), which no statement text shows (nor
    # BETWEEN its >=, nor LIKE its ~~): the functions behind such operators count as called.
    name = _scratch_database(pg, "pp_implicit_op_", [
        _CARDS_FN,
        "CREATE FUNCTION public.num_eq(a bigint, b numeric) RETURNS boolean LANGUAGE plpgsql STABLE AS "
        "$$ BEGIN RAISE EXCEPTION 'seen: %', public.cards(); END $$",
        "CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = numeric, FUNCTION = public.num_eq)",
    ])
    sql = "SELECT member_id FROM crm.members WHERE member_id::bigint IN (1.0)"
    try:
        with psycopg.connect(pg.dsn("app", dbname=name), autocommit=True) as conn:
            with pytest.raises(psycopg.Error) as err:
                conn.execute(sql).fetchall()
            assert "CANARY-CARD" in str(err.value)  # what the operator would hand out
        dsn = pg.dsn("app", dbname=name, host=enforce_proxy.host, port=enforce_proxy.port,
                     **purpose_options("marketing"))
        with psycopg.connect(dsn, autocommit=True) as conn:
            for stmt in (sql, "SELECT 1"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                    conn.execute(stmt).fetchall()
                assert "function public.num_eq is behind the operator public.=" in str(err.value), stmt
    finally:
        pg.psql_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
