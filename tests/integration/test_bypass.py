"""Bypass attempts against purpose enforcement, end to end: real clients, the real proxy,
real PostgreSQL (tests/fixtures/enforce: schema with canary values, policy, corpus).

* ``test_bypass``: every attempt of tests/fixtures/enforce/bypass.yaml, on a fresh
  connection, through the simple protocol (psycopg without parameters), the extended
  protocol (psycopg prepared statements; libpq PQsendQueryParams for COPY), asyncpg
  prepared statements and psql. No canary of a category the purpose may not read may
  come back: not in rows, column names, COPY data, errors or notices, nor be copied into
  a non-personal table. Attempts marked ``expect: refuse`` (the default) must be refused by
  the proxy (its errors carry no source location, PostgreSQL's always do).
* ``test_legit``: statements of tests/fixtures/enforce/legit.yaml give through the proxy
  exactly what PostgreSQL gives directly.
* The ``test_scenario_*`` tests are attacks that need several protocol steps: statements
  prepared under one purpose and run under another, Parse-only SETs, a session default
  search_path changed behind the proxy.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import psycopg
import pytest
from psycopg import pq

from proxy.analysis.shape import spans
from tests.support.enforce import (
    CANARIES, ENCODED_CANARY, Outcome, asyncpg_connect, asyncpg_setup, denied_categories, load_attempts,
    load_legit, load_policy, proxy_refusals, psycopg_connect, purpose_options, run_asyncpg, run_psql,
    run_psycopg, run_setup,
)

pytestmark = pytest.mark.integration

ATTEMPTS = load_attempts()
LEGIT = load_legit()
POLICY = load_policy()
MODES = ("simple", "extended", "asyncpg", "psql")
LEGIT_MODES = ("simple", "extended", "asyncpg")


def _cases():
    for a in ATTEMPTS:
        for mode in a.get("modes", MODES):
            yield pytest.param(a, mode, id=f"{a['id']}-{mode}")


def proxy_dsn(pg, proxy, purpose: str | None) -> str:
    return pg.dsn("app", host=proxy.host, port=proxy.port, **purpose_options(purpose))


def proxy_url(pg, proxy) -> str:
    return pg.url("app", host=proxy.host, port=proxy.port)


@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def direct(enforce_db):
    """A direct connection to PostgreSQL (no proxy), for checks and comparisons."""
    with psycopg.connect(enforce_db, autocommit=True) as conn:
        yield conn


def scratch_leaks(direct) -> list[str]:
    """Canaries copied into the non-personal tables; cleaned up when found."""
    text = repr(direct.execute("SELECT v FROM public.scratch UNION ALL SELECT body FROM public.notes").fetchall())
    found = [cat for cat, rx in CANARIES.items() if rx.search(text)]
    if found or ENCODED_CANARY.search(text):
        direct.execute("TRUNCATE public.scratch")
        direct.execute("UPDATE public.notes SET body = 'restored' WHERE body ~* 'canary|1911|2077|2055|777'")
    return found


# --- the corpus ----------------------------------------------------------------------------------------


def test_corpus_is_meaningful():
    """At least 100 attempts, unique ids, each after a category its purpose may not read, and
    no attempt spells a canary itself (an echo of the SQL must not count as a leak)."""
    assert len(ATTEMPTS) >= 100
    ids = [a["id"] for a in ATTEMPTS]
    assert len(ids) == len(set(ids))
    for a in ATTEMPTS:
        assert a["canary"] in CANARIES, a["id"]
        assert a["canary"] in denied_categories(POLICY, "app", a["purpose"]), \
            f"{a['id']}: {a['canary']} is not denied under {a['purpose']}"
        assert a.get("expect", "refuse") in ("refuse", "clean"), a["id"]
        assert set(a.get("modes", MODES)) <= set(MODES), a["id"]
        for sql in [a["sql"], *a.get("setup", []), *a.get("setup_any", [])]:
            for cat, rx in CANARIES.items():
                assert not rx.search(sql), f"{a['id']}: the SQL spells a {cat} canary"
    assert len(LEGIT) >= 25
    assert len({s["id"] for s in LEGIT}) == len(LEGIT)


@pytest.mark.parametrize("attempt,mode", list(_cases()))
def test_bypass(attempt, mode, pg, enforce_proxy, direct, loop):
    _attempt(attempt, mode, pg, enforce_proxy, direct, loop)


@pytest.mark.parametrize("attempt,mode", list(_cases()))
def test_bypass_with_warm_cache(attempt, mode, pg, enforce_proxy, direct, loop):
    """The same attempt, preceded on its connection by a statement of the same shape with other constants
    (for texts outside the shape subset, by the attempt itself): the proxy's decision cache then holds
    that statement's decision, and the attempt must still be refused or come back clean."""
    _attempt(attempt, mode, pg, enforce_proxy, direct, loop, warm=True)


def same_shape_other_constants(sql: str) -> str:
    """``sql`` with every constant of its shape replaced (strings by 'zz', numbers by 1), or ``sql`` itself
    when it is outside the shape subset (then the decision cache keys it on its exact text)."""
    where = spans(sql)
    if not where:
        return sql
    out = sql
    for a, b in reversed(where):
        out = out[:a] + ("'zz'" if sql[a] == "'" else "1") + out[b:]
    return out


def _attempt(attempt, mode, pg, enforce_proxy, direct, loop, warm: bool = False) -> None:
    purpose = attempt["purpose"]
    connect = attempt.get("connect", purpose)
    setup, setup_any, sql = attempt.get("setup", []), attempt.get("setup_any", []), attempt["sql"]
    # The warming statement runs the way the attempt does (its outcome does not matter).
    warmers = [same_shape_other_constants(sql)] if warm else []
    denied = denied_categories(POLICY, "app", purpose)
    if mode in ("simple", "extended"):
        with psycopg_connect(proxy_dsn(pg, enforce_proxy, connect)) as conn:
            run_setup(conn, setup, setup_any)
            for warmer in warmers:
                run_psycopg(conn, warmer, prepare=(mode == "extended"), mode=mode)
            outcome = run_psycopg(conn, sql, prepare=(mode == "extended"), mode=mode)
            if mode == "extended" and not outcome.errors and not sql.lower().lstrip().startswith("copy"):
                # psycopg prepares on first use: run it again through the prepared statement.
                again = run_psycopg(conn, sql, prepare=True, mode=mode)
                outcome.rows += again.rows
                outcome.errors += again.errors
                outcome.notices += again.notices
    elif mode == "asyncpg":
        async def go() -> Outcome:
            conn = await asyncpg_connect(proxy_url(pg, enforce_proxy), connect)
            try:
                await asyncpg_setup(conn, setup, setup_any)
                for warmer in warmers:
                    await run_asyncpg(conn, warmer)
                return await run_asyncpg(conn, sql)
            finally:
                await conn.close()
        outcome = loop.run_until_complete(asyncio.wait_for(go(), 30))
    else:
        dsn = proxy_dsn(pg, enforce_proxy, connect)
        for warmer in warmers:  # in a psql of its own, so that its refusal cannot count as the attempt's
            run_psql(dsn, [*setup, *setup_any, warmer])
        outcome = run_psql(dsn, [*setup, *setup_any, sql])

    leaks = outcome.leaks(denied)
    assert not leaks, f"BYPASS {attempt['id']} ({mode}): {leaks}\n{outcome.summary()}\n{outcome.text()[:2000]}"
    copied = scratch_leaks(direct)
    assert not copied, f"BYPASS {attempt['id']} ({mode}): canaries of {copied} copied into public tables"
    if attempt.get("expect", "refuse") == "refuse":
        if mode == "psql":
            assert proxy_refusals(outcome), \
                f"{attempt['id']} (psql) was not refused by the proxy:\n{outcome.raw[:2000]}"
        else:
            assert outcome.refused, f"{attempt['id']} ({mode}) was not refused by the proxy: {outcome.summary()}"
            assert outcome.error["severity"] in (None, "ERROR"), outcome.summary()


# --- legitimate statements ---------------------------------------------------------------------------------


def _normalize(rows):
    return [tuple(r) for r in rows]


def _run_legit_psycopg(dsn: str, stmt: dict, prepare: bool) -> tuple[list[str], list]:
    with psycopg.connect(dsn, autocommit=not stmt.get("write")) as conn:
        if stmt["sql"].lower().startswith("copy"):
            raise AssertionError("COPY is compared separately")
        cur = conn.execute(stmt["sql"], prepare=prepare)
        cols = [c.name for c in cur.description]
        rows = _normalize(cur.fetchall())
        if prepare and not stmt.get("write"):  # the second run uses the prepared statement
            cur = conn.execute(stmt["sql"], prepare=True)
            assert _normalize(cur.fetchall()) == rows
        if stmt.get("write"):
            conn.rollback()
    return cols, rows


async def _run_legit_asyncpg(url: str, purpose: str | None, stmt: dict) -> tuple[list[str], list]:
    conn = await asyncpg.connect(url, server_settings={} if purpose is None else {"pii.purpose": purpose})
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            ps = await conn.prepare(stmt["sql"])
            cols = [a.name for a in ps.get_attributes()]
            rows = [tuple(r) for r in await ps.fetch()]
        finally:
            await tx.rollback()
    finally:
        await conn.close()
    return cols, rows


@pytest.mark.parametrize("mode", LEGIT_MODES)
@pytest.mark.parametrize("stmt", LEGIT, ids=[s["id"] for s in LEGIT])
def test_legit(stmt, mode, pg, enforce_proxy, enforce_db, loop):
    """An allowed statement gives through the proxy what it gives directly (names and rows)."""
    purpose = stmt["purpose"]
    if mode in ("simple", "extended"):
        prepare = mode == "extended"
        direct_result = _run_legit_psycopg(pg.dsn("app", **purpose_options(purpose)), stmt, prepare)
        try:
            proxied = _run_legit_psycopg(proxy_dsn(pg, enforce_proxy, purpose), stmt, prepare)
        except psycopg.Error as e:
            pytest.fail(f"refused through the proxy ({mode}): {e.sqlstate} {e}")
    else:
        direct_result = loop.run_until_complete(_run_legit_asyncpg(pg.url("app"), purpose, stmt))
        try:
            proxied = loop.run_until_complete(_run_legit_asyncpg(proxy_url(pg, enforce_proxy), purpose, stmt))
        except asyncpg.PostgresError as e:
            pytest.fail(f"refused through the proxy (asyncpg): {e.sqlstate} {e}")
    assert proxied == direct_result
    assert proxied[1], "a legitimate statement of the fixture returns rows"


def test_legit_copy_out(pg, enforce_proxy, enforce_db):
    """An allowed COPY TO STDOUT returns the same bytes as directly."""
    sql = "COPY (SELECT member_id, phone, email FROM crm.members ORDER BY 1) TO STDOUT WITH (FORMAT csv, HEADER)"

    def copy(dsn: str) -> bytes:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            with cur.copy(sql) as cp:
                return b"".join(bytes(d) for d in cp)

    assert copy(proxy_dsn(pg, enforce_proxy, "support")) == copy(pg.dsn("app")) != b""


def test_legit_psql(pg, enforce_proxy, enforce_db):
    """psql output through the proxy equals psql output directly, for every legit read."""
    reads = [s for s in LEGIT if not s.get("write")]

    def run(stmt, host_port):
        dsn = pg.dsn("app", **host_port, **purpose_options(stmt["purpose"]))
        return run_psql(dsn, [stmt["sql"]]).raw

    with ThreadPoolExecutor(8) as pool:
        proxied = list(pool.map(lambda s: run(s, {"host": enforce_proxy.host, "port": enforce_proxy.port}), reads))
        direct = list(pool.map(lambda s: run(s, {}), reads))
    for stmt, a, b in zip(reads, proxied, direct):
        assert a == b, f"{stmt['id']}: psql output differs through the proxy"


# --- multi-step scenarios ----------------------------------------------------------------------------------


def _libpq_results(pgconn) -> list[tuple[int, str | None, str | None, list]]:
    """(status, sqlstate, source file, values) of every result until the next ReadyForQuery."""
    out = []
    while (res := pgconn.get_result()) is not None:
        err = res.error_field(pq.DiagnosticField.SQLSTATE)
        src = res.error_field(pq.DiagnosticField.SOURCE_FILE)
        msg = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
        values = [res.get_value(r, c) for r in range(res.ntuples) for c in range(res.nfields)]
        out.append((res.status, err and err.decode(), src and src.decode(), values, msg and msg.decode()))
    return out


def _assert_refused_no_leak(results, what: str, denied=("contact.phone",)) -> None:
    text = repr(results)
    for cat in denied:
        assert not CANARIES[cat].search(text), f"BYPASS ({what}): {text[:500]}"
    errors = [r for r in results if r[0] == pq.ExecStatus.FATAL_ERROR]
    assert errors, f"{what}: not refused: {text[:300]}"
    status, sqlstate, src, _, msg = errors[-1]
    assert sqlstate in ("42501", "0A000", "26000") and src is None, f"{what}: {sqlstate} {msg} (source {src})"


def test_scenario_psycopg_prepared_under_support_run_under_marketing(pg, enforce_proxy):
    """psycopg prepare=True under support, then SET pii.purpose = 'marketing': every later
    execution of the cached prepared statement is refused, not only the first."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "support")) as conn:
        sql = "SELECT phone FROM crm.members WHERE member_id = %s"
        assert conn.execute(sql, [1], prepare=True).fetchall()
        conn.execute("SET pii.purpose = 'marketing'")
        for attempt in range(3):
            with pytest.raises(psycopg.Error) as info:
                rows = conn.execute(sql, [1], prepare=True).fetchall()
                pytest.fail(f"BYPASS on execution {attempt + 1}: {rows}")
            assert info.value.sqlstate in ("42501", "0A000") and info.value.diag.source_file is None


def _binds_refused_after(dsn: str, sql: bytes, change: str, binds: int) -> None:
    """Parse ``sql`` (libpq), run ``change``, then Bind/Execute it ``binds`` times: each must be refused."""
    with psycopg_connect(dsn) as conn:
        pgc = conn.pgconn
        pgc.send_prepare(b"s_changed", sql)
        assert _libpq_results(pgc)[0][0] == pq.ExecStatus.COMMAND_OK
        conn.execute(change)
        for attempt in range(binds):
            pgc.send_query_prepared(b"s_changed", None)
            _assert_refused_no_leak(_libpq_results(pgc), f"Bind #{attempt + 1} after {change}")


def test_scenario_libpq_bind_after_refused_bind(pg, enforce_proxy):
    """A Bind refused after a purpose change must stay refused on the next Bind of that name."""
    _binds_refused_after(proxy_dsn(pg, enforce_proxy, "support"), b"SELECT phone FROM crm.members",
                         "SET pii.purpose = 'marketing'", 3)


def test_scenario_sql_prepare_then_protocol_bind(pg, enforce_proxy):
    """PREPARE (SQL) under support, SET marketing, then Bind/Execute of that name through the
    extended protocol (the same namespace in PostgreSQL)."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "support")) as conn:
        conn.execute("PREPARE sqlp AS SELECT phone FROM crm.members")
        conn.execute("SET pii.purpose = 'marketing'")
        conn.pgconn.send_query_prepared(b"sqlp", None)
        _assert_refused_no_leak(_libpq_results(conn.pgconn), "protocol Bind of an SQL-prepared statement")


def test_scenario_duplicate_parse_does_not_replace_the_decision(pg, enforce_proxy):
    """Parse s1 (phone) under support; under marketing Parse s1 again with harmless SQL:
    PostgreSQL refuses the duplicate and keeps the first s1, so Bind s1 must be refused."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "support")) as conn:
        pgc = conn.pgconn
        pgc.send_prepare(b"s1", b"SELECT phone FROM crm.members")
        _libpq_results(pgc)
        conn.execute("SET pii.purpose = 'marketing'")
        pgc.send_prepare(b"s1", b"SELECT 1")
        _libpq_results(pgc)  # 42P05 from PostgreSQL (or a refusal)
        pgc.send_query_prepared(b"s1", None)
        _assert_refused_no_leak(_libpq_results(pgc), "Bind after a duplicate Parse")


def test_scenario_redeclared_sql_statement_after_deallocate(pg, enforce_proxy):
    """Parse p (harmless), DEALLOCATE p in SQL, PREPARE p (phone) in SQL under support, SET
    marketing, Bind p: the proxy must not judge p by the first, harmless Parse."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "support")) as conn:
        pgc = conn.pgconn
        pgc.send_prepare(b"p", b"SELECT 1")
        _libpq_results(pgc)
        conn.execute("DEALLOCATE p")
        conn.execute("PREPARE p AS SELECT phone FROM crm.members")
        conn.execute("SET pii.purpose = 'marketing'")
        pgc.send_query_prepared(b"p", None)
        _assert_refused_no_leak(_libpq_results(pgc), "Bind of a re-PREPAREd name")


def test_scenario_asyncpg_statement_cache_across_purposes(pg, enforce_proxy, loop):
    """asyncpg caches prepared statements: after the purpose change both the cached query and
    an explicitly prepared statement are refused, every time."""
    async def go():
        conn = await asyncpg_connect(proxy_url(pg, enforce_proxy), "support")
        try:
            assert await conn.fetch("SELECT phone FROM crm.members")
            stmt = await conn.prepare("SELECT phone FROM crm.members WHERE member_id = $1")
            await conn.fetch("SELECT 1")  # asyncpg's prepare() leaves the batch open (no Sync)
            await conn.execute("SET pii.purpose = 'marketing'")
            for _ in range(2):
                for run in (lambda: conn.fetch("SELECT phone FROM crm.members"), lambda: stmt.fetch(1)):
                    try:
                        rows = await run()
                    except asyncpg.PostgresError as e:
                        assert e.sqlstate in ("42501", "0A000") and e.server_source_filename is None
                    else:
                        pytest.fail(f"BYPASS: {rows}")
        finally:
            await conn.close()

    loop.run_until_complete(asyncio.wait_for(go(), 30))


@pytest.mark.parametrize("setting", ["search_path", "purpose"])
def test_scenario_parse_only_set_does_not_move_the_proxy(setting, pg, enforce_proxy, loop):
    """A SET sent as Parse (asyncpg prepare) but never executed changes nothing in PostgreSQL;
    the proxy must not act as if it had."""
    async def go():
        conn = await asyncpg_connect(proxy_url(pg, enforce_proxy), "marketing")
        try:
            if setting == "search_path":
                await conn.execute("SET search_path = crm, public")
                sql_set, read = "SET search_path = public", "SELECT phone FROM members"
            else:
                sql_set, read = "SET pii.purpose = 'support'", "SELECT phone FROM crm.members"
            try:
                await conn.prepare(sql_set)
            except asyncpg.PostgresError:
                pass  # refusing it is fine
            await conn.fetch("SELECT 1")
            shown = await conn.fetchval("SHOW search_path" if setting == "search_path" else "SHOW pii.purpose")
            try:
                rows = await conn.fetch(read)
            except asyncpg.PostgresError as e:
                assert e.sqlstate == "42501" and e.server_source_filename is None
            else:
                leaked = [r for r in rows if CANARIES["contact.phone"].search(repr(r))]
                assert not leaked, f"BYPASS (PostgreSQL still has {setting} {shown!r}): {leaked}"
        finally:
            await conn.close()

    loop.run_until_complete(asyncio.wait_for(go(), 30))


def test_scenario_prepared_set_executed_later(pg, enforce_proxy):
    """Parse a SET of search_path, change search_path with a simple SET, then Bind/Execute the
    prepared SET: the proxy must know which search_path PostgreSQL ends up with."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "marketing")) as conn:
        pgc = conn.pgconn
        pgc.send_prepare(b"setp", b"SET search_path = crm, public")
        _libpq_results(pgc)
        conn.execute("SET search_path = public")
        pgc.send_query_prepared(b"setp", None)
        _libpq_results(pgc)
        try:
            rows = conn.execute("SELECT phone FROM members").fetchall()
        except psycopg.Error as e:
            assert e.sqlstate == "42501" and e.diag.source_file is None
        else:
            shown = conn.execute("SHOW search_path").fetchone()[0]
            assert not CANARIES["contact.phone"].search(repr(rows)), f"BYPASS (search_path {shown}): {rows}"


@pytest.mark.parametrize("target", ["ROLE app", "DATABASE app", "ROLE app IN DATABASE app"])
def test_scenario_default_search_path_changed_then_new_session(target, pg, enforce_proxy):
    """Under maintenance (DDL allowed) ALTER ... SET search_path = crm, public; a session opened
    right after under marketing must not read crm.members.phone through the unqualified name."""
    try:
        with psycopg_connect(proxy_dsn(pg, enforce_proxy, "maintenance")) as conn:
            conn.execute(f"ALTER {target} SET search_path = crm, public")
        with psycopg_connect(proxy_dsn(pg, enforce_proxy, "marketing")) as conn:
            shown = conn.execute("SHOW search_path").fetchone()[0]
            try:
                rows = conn.execute("SELECT phone FROM members").fetchall()
            except psycopg.Error as e:
                assert e.sqlstate == "42501" and e.diag.source_file is None
            else:
                assert not CANARIES["contact.phone"].search(repr(rows)), f"BYPASS (search_path {shown}): {rows}"
    finally:
        pg.psql_admin(f"ALTER {target} RESET search_path", dbname="app")
        # ... and through the proxy, so that it reloads the defaults (it would only notice a
        # change made behind its back at its next schema refresh).
        with psycopg_connect(proxy_dsn(pg, enforce_proxy, "maintenance")) as conn:
            conn.execute(f"ALTER {target} RESET search_path")
        with psycopg_connect(proxy_dsn(pg, enforce_proxy, None)) as conn:
            assert conn.execute("SELECT phone FROM members ORDER BY 1").fetchone() == ("decoy-phone-1",)


def test_scenario_temp_view_shadowing_a_public_table(pg, enforce_proxy):
    """A temporary view named like public.notes (temporary objects come first in name lookup)
    cannot be used to read phone under marketing."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "maintenance")) as conn:
        try:
            conn.execute("CREATE TEMP VIEW notes AS SELECT member_id, phone AS body FROM crm.members")
        except psycopg.Error:
            pass  # refused: the view reads phone
        conn.execute("SET pii.purpose = 'marketing'")
        try:
            rows = conn.execute("SELECT body FROM notes").fetchall()
        except psycopg.Error as e:
            assert e.sqlstate == "42501"
        else:
            assert not CANARIES["contact.phone"].search(repr(rows)), f"BYPASS: {rows}"


def test_scenario_many_attempts_one_connection(pg, enforce_proxy, direct):
    """All refused attempts of one purpose, one after another on one connection (simple
    protocol): the session stays usable, and nothing leaks in between."""
    attempts = [a for a in ATTEMPTS if a["purpose"] == "marketing" and not a.get("setup")
                and not a.get("setup_any") and a.get("expect", "refuse") == "refuse"]
    denied = denied_categories(POLICY, "app", "marketing")
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "marketing")) as conn:
        for a in attempts:
            outcome = run_psycopg(conn, a["sql"], prepare=False, mode="simple")
            assert not outcome.leaks(denied), f"BYPASS {a['id']}: {outcome.summary()}"
            assert outcome.refused, f"{a['id']} not refused: {outcome.summary()}"
            if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        assert conn.execute("SELECT email FROM crm.members WHERE member_id = 1").fetchone()[0]
    assert not scratch_leaks(direct)


def test_scenario_pipelined_statement_behind_a_rejected_set(pg, enforce_proxy):
    """With search_path = crm, a SET PostgreSQL rejects (syntax error) and a read pipelined right
    behind it in the same write: the read runs with crm first, so it must be decided that way."""
    from tests.support.rawpg import RawConnection, error_fields, query_message

    with RawConnection(enforce_proxy.host, enforce_proxy.port, "trustuser", "app",
                       **{"pii.purpose": "marketing"}) as raw:
        raw.simple_query("SET search_path = crm, public")
        raw.send(query_message("SET search_path = public, NULL") + query_message("SELECT phone FROM members"))
        messages = []
        while sum(1 for t, _ in messages if t == b"Z") < 2:
            messages.append(raw.read_message())
        data = b"".join(body for t, body in messages if t == b"D")
        assert not CANARIES["contact.phone"].search(data.decode(errors="replace")), f"BYPASS: {data[:200]!r}"
        errors = [error_fields(body) for t, body in messages if t == b"E"]
        assert errors[-1]["C"] in ("42501", "25001") and "F" not in errors[-1], errors
        # PostgreSQL kept crm first; so does the proxy.
        after = raw.simple_query("SELECT phone FROM members")
        assert any(t == b"E" and error_fields(b)["C"] == "42501" for t, b in after)
        assert not any(t == b"D" for t, _ in after)


@pytest.mark.parametrize("options", [
    "-c search_path=crm,public", "--search_path=crm", "-csearch_path=crm", "-c SEARCH_PATH=crm",
    "--search-path=crm",
    r"-c search_path=crm,\\ public",  # conninfo quoting turns \\ into \, which escapes the space
])
def test_scenario_search_path_at_connect_time(options, pg, enforce_proxy):
    """A search_path given in the startup packet's options puts crm first from the start."""
    conn_dsn = pg.dsn("app", host=enforce_proxy.host, port=enforce_proxy.port,
                      options=f"'-c pii.purpose=marketing {options}'")
    with psycopg_connect(conn_dsn) as conn:
        shown = conn.execute("SHOW search_path").fetchone()[0]
        assert shown.startswith("crm")
        outcome = run_psycopg(conn, "SELECT phone FROM members", prepare=False, mode="simple")
        assert not outcome.leaks({"contact.phone"}), f"BYPASS (search_path {shown}): {outcome.summary()}"
        assert outcome.refused


def test_scenario_search_path_as_startup_parameter(pg, enforce_proxy, loop):
    """asyncpg sends server_settings as startup parameters of their own."""
    async def go():
        conn = await asyncpg.connect(proxy_url(pg, enforce_proxy),
                                     server_settings={"pii.purpose": "marketing", "search_path": "crm, public"})
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                rows = await conn.fetch("SELECT phone FROM members")
                pytest.fail(f"BYPASS: {rows}")
            assert info.value.sqlstate == "42501"
        finally:
            await conn.close()

    loop.run_until_complete(asyncio.wait_for(go(), 30))


def test_scenario_other_sessions_statement_texts(pg, enforce_proxy):
    """A support session filters on a phone number; a marketing session of the same role must
    not read that literal back from pg_stat_activity."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "support")) as support:
        phone = support.execute("SELECT phone FROM crm.members WHERE member_id = 2").fetchone()[0]
        support.execute(f"SELECT member_id FROM crm.members WHERE phone = '{phone}'")  # stays its last query
        with psycopg_connect(proxy_dsn(pg, enforce_proxy, "marketing")) as marketing:
            for sql in ("SELECT query FROM pg_stat_activity", "SELECT * FROM pg_catalog.pg_stat_activity",
                        "SELECT a FROM pg_stat_activity a"):
                outcome = run_psycopg(marketing, sql, prepare=False, mode="simple")
                assert not outcome.leaks({"contact.phone"}), f"BYPASS {sql}: {outcome.summary()}"
            # Monitoring without statement texts still works.
            assert marketing.execute("SELECT count(*) FROM pg_stat_activity WHERE state IS NOT NULL").fetchone()


# --- found by a session/protocol hunt -----------------------------------------------------------


def test_scenario_sql_prepare_then_search_path_change(pg, enforce_proxy):
    """PREPARE under the default search_path (public.members, a decoy), then SET search_path = crm:
    PostgreSQL re-plans the statement under the new path, so EXECUTE would read crm.members."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "marketing")) as conn:
        conn.execute("PREPARE s AS SELECT phone FROM members")
        assert conn.execute("EXECUTE s").fetchall()  # the decoy's phones
        conn.execute("SET search_path = crm")
        outcome = run_psycopg(conn, "EXECUTE s", prepare=False, mode="simple")
        assert outcome.refused and not outcome.leaks({"contact.phone"}), f"BYPASS: {outcome.summary()}"


def test_scenario_protocol_prepare_then_search_path_change(pg, enforce_proxy):
    """The same with a protocol-level Parse, then Bind/Execute after the SET."""
    _binds_refused_after(proxy_dsn(pg, enforce_proxy, "marketing"), b"SELECT phone FROM members",
                         "SET search_path = crm", 2)


@pytest.mark.parametrize("options", ["-c pii.purpose=marketing -Ec search_path=crm",
                                     "-c pii.purpose=marketing -r -c --search_path=crm",
                                     "-c pii.purpose=marketing -c"])
def test_scenario_startup_options_the_proxy_cannot_read_refuse_the_connection(options, pg, enforce_proxy):
    """PostgreSQL reads options with getopt (-Ec is two switches; -r takes -c as its argument and
    --search_path=crm then sets the path): anything but -c name=value / --name=value is refused."""
    with pytest.raises(psycopg.OperationalError) as info:
        with psycopg_connect(pg.dsn("app", host=enforce_proxy.host, port=enforce_proxy.port,
                                    options=f"'{options}'")) as c:
            rows = c.execute("SELECT phone FROM members").fetchall()
            pytest.fail(f"BYPASS: connected and read {rows}")
    assert "startup options" in str(info.value)


@pytest.mark.parametrize("setting,plain,in_options,sql", [
    ("search_path", "crm", "public", "SELECT phone FROM members"),
    ("pii.purpose", "marketing", "support", "SELECT phone FROM crm.members"),
])
def test_scenario_startup_parameters_win_over_options(setting, plain, in_options, sql, pg, enforce_proxy, loop):
    """PostgreSQL applies options first and the startup parameters of their own after them (they win):
    the proxy must decide under the same values."""
    async def go():
        settings = {"pii.purpose": "marketing", setting: plain, "options": f"-c {setting}={in_options}"}
        conn = await asyncpg.connect(proxy_url(pg, enforce_proxy), server_settings=settings)
        try:
            assert await conn.fetchval(f"SHOW {setting}") == plain
            with pytest.raises(asyncpg.PostgresError) as info:
                rows = await conn.fetch(sql)
                pytest.fail(f"BYPASS: {rows}")
            assert info.value.sqlstate == "42501"
        finally:
            await conn.close()

    loop.run_until_complete(asyncio.wait_for(go(), 30))


@pytest.mark.parametrize("options", ["-c role=app", "--session-authorization=app"])
def test_scenario_role_at_connect_time_is_refused(options, pg, enforce_proxy):
    """As SET ROLE is later: the proxy decides for the role that logged in, so a session
    may not start as another one (with role memberships, -c role=X would run it as X)."""
    with pytest.raises(psycopg.OperationalError) as info:
        with psycopg_connect(pg.dsn("app", host=enforce_proxy.host, port=enforce_proxy.port,
                                    options=f"'-c pii.purpose=marketing {options}'")):
            pytest.fail("connected")
    assert "role at connect time" in str(info.value)


def _after_reload(conn, sql: str):
    """Run ``sql``, retrying while the proxy reloads the schema after DDL (40001, schema-reloading)."""
    for _ in range(100):
        try:
            return conn.execute(sql)
        except psycopg.Error as e:
            if e.sqlstate != "40001":
                raise
            time.sleep(0.05)
    return conn.execute(sql)


def _copy_phones_then_read_as_decoy(conn, reads: tuple[str, ...],
                                    paths: tuple[str, str] = ("SET search_path = crm, public",
                                                              "SET search_path = public")) -> None:
    """With a temporary ``members`` in place: under support, with search_path crm (``paths[0]``), copy phone
    numbers into "crm.members"; under marketing, with search_path public (``paths[1]``), read them back as
    the decoy public.members. Each step may be refused (0A000); no read may return a phone number."""
    conn.execute("SET pii.purpose = 'support'")
    _after_reload(conn, paths[0])
    try:
        _after_reload(conn, "INSERT INTO members (phone) SELECT phone FROM crm.members")
    except psycopg.Error as e:
        assert e.sqlstate == "0A000", e
    conn.execute("SET pii.purpose = 'marketing'")
    _after_reload(conn, paths[1])
    for sql in reads:
        try:
            rows = _after_reload(conn, sql).fetchall()
        except psycopg.Error as e:
            assert e.sqlstate == "0A000", e
        else:
            assert not CANARIES["contact.phone"].search(repr(rows)), f"BYPASS {sql}: {rows}"


def test_scenario_temp_table_shadowing_a_catalogued_table(pg, enforce_proxy):
    """A temporary table is searched before the search_path's schemas (pg_temp comes first unless
    listed) and the proxy's loader cannot see it. Hunt 30: under maintenance (which may run DDL) a
    temporary ``members``; under support, with search_path crm, phone numbers copied into it as
    "crm.members"; under marketing, with search_path public, read back as the decoy public.members."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "maintenance")) as conn:
        conn.execute("CREATE TEMP TABLE members (member_id int, name text, email text, phone text)")
        _copy_phones_then_read_as_decoy(conn, ("SELECT phone FROM members", "SELECT * FROM members",
                                               "SELECT m.phone FROM members m", 'SELECT phone FROM "members"',
                                               "TABLE members"))
        # Qualified names are not in question; and once the temporary relations are gone, the name is free.
        assert _after_reload(conn, "SELECT phone FROM public.members ORDER BY 1").fetchone() == ("decoy-phone-1",)
        conn.execute("DISCARD TEMP")
        assert conn.execute("SELECT phone FROM members ORDER BY 1").fetchone() == ("decoy-phone-1",)


def test_scenario_temp_view_over_a_temp_table(pg, enforce_proxy):
    """A view over a temporary table is itself temporary (whatever its name): creating one that reads the
    temporary ``members`` by an unqualified name is refused, as reading it is."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "maintenance")) as conn:
        conn.execute("SET search_path = crm, public")
        conn.execute("CREATE TEMP TABLE members (member_id int, name text, email text, phone text)")
        with pytest.raises(psycopg.Error) as e:
            _after_reload(conn, "CREATE VIEW notes AS SELECT member_id, 1 AS note_id, phone AS body FROM members")
        assert e.value.sqlstate == "0A000"
        with pytest.raises(psycopg.Error) as e:
            conn.execute("ALTER TABLE members RENAME TO notes")
        assert e.value.sqlstate == "0A000"
        conn.execute("DROP TABLE pg_temp.members")


@pytest.mark.parametrize("block", [("BEGIN", "DISCARD TEMP", "ROLLBACK"),
                                   ("BEGIN", "SAVEPOINT s", "DISCARD TEMP", "ROLLBACK TO SAVEPOINT s", "COMMIT")])
def test_scenario_discard_temp_rolled_back(block, pg, enforce_proxy):
    """DISCARD TEMP may run in a transaction block, and ROLLBACK gives the temporary relations back (DROP is
    transactional): the proxy forgot the temporary ``members`` PostgreSQL kept, and the hunt-30 scenario ran
    again (phone numbers copied in as "crm.members" under support, read as the decoy public.members under
    marketing)."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "maintenance")) as conn:
        conn.execute("CREATE TEMP TABLE members (member_id int, name text, email text, phone text)")
        for sql in block:
            _after_reload(conn, sql)
        _copy_phones_then_read_as_decoy(conn, ("SELECT phone FROM members",))
        conn.execute("DISCARD TEMP")  # (at a quiet point: the name is free again)
        assert _after_reload(conn, "SELECT phone FROM members ORDER BY 1").fetchone() == ("decoy-phone-1",)


@pytest.mark.parametrize("set_path", ["SET search_path = {}", "SELECT set_config('search_path', '{}', false)"])
def test_scenario_pg_temp_of_another_number_does_not_place_the_temp_schema(set_path, pg, enforce_proxy):
    """Only the ``pg_temp`` alias (or the session's own pg_temp_N, whose number the proxy does not know) places
    the temporary schema in the search_path: a ``pg_temp_N`` of another session, or of none, is skipped
    like any schema the role may not use, and the session's temporary schema is searched first (5.9.3;
    recomputeNamespacePath in catalog/namespace.c). A hunt listed pg_temp_99999 after crm and public to
    copy phone numbers into a temporary ``members`` decided as crm.members, then read them as the decoy
    public.members under marketing (set with SET or with set_config, as pg_dump does)."""
    with psycopg_connect(proxy_dsn(pg, enforce_proxy, "maintenance")) as conn:
        conn.execute("CREATE TEMP TABLE members (member_id int, name text, email text, phone text)")
        paths = (set_path.format("crm, pg_temp_99999"), set_path.format("public, pg_temp_99999"))
        _copy_phones_then_read_as_decoy(conn, ("SELECT phone FROM members", "TABLE members"), paths)
