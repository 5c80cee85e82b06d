"""Refused statements, end to end: real clients, the real proxy, real PostgreSQL.

The proxy runs with the test decider ``tests.support.deciders:refuse_marker``,
which refuses any statement containing ``refuse_me``. A refusal must look to the
client like an ordinary PostgreSQL error at that point of the session (the
refusal's SQLSTATE, message, detail and hint instead of the error's own), with
every consequence PostgreSQL gives an error there: the implicit transaction rolled
back, an explicit one failed, an extended batch skipped until Sync. Where it makes
sense the same action is run directly against PostgreSQL with a statement that
really fails (``SELECT 1/0``) and the outcomes are compared.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import errors, pq

from tests.support import deciders
from proxy.devtools.process import ProxyProcess

pytestmark = pytest.mark.integration

REFUSED = "SELECT 1 AS refuse_me"
FAILING = "SELECT 1/0"  # the same position, run directly: a real PostgreSQL error


@pytest.fixture(scope="module")
def rproxy(pg):
    p = ProxyProcess(pg.address, "--decider", "tests.support.deciders:refuse_marker").start()
    yield p
    p.stop()


@pytest.fixture
def direct_dsn(pg):
    return pg.dsn("app")


@pytest.fixture
def proxy_dsn(pg, rproxy):
    return pg.dsn("app", host=rproxy.host, port=rproxy.port)


@pytest.fixture
def table(direct_dsn):
    """A fresh table ``t_<random>(v int)`` owned by app, dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (v int)")
    yield name
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def rows(dsn: str, table: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT v FROM {table} ORDER BY v")]


def truncate(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")


def psql(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", dsn, "-X", *args], input=stdin, capture_output=True, text=True, timeout=60)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def assert_refusal(exc: psycopg.Error) -> None:
    assert isinstance(exc, errors.InsufficientPrivilege)
    assert exc.sqlstate == deciders.SQLSTATE
    assert exc.diag.message_primary == deciders.MESSAGE
    assert exc.diag.message_detail == deciders.DETAIL
    assert exc.diag.message_hint == deciders.HINT
    assert exc.diag.severity == "ERROR"


# --- psql ---------------------------------------------------------------------------


def test_psql_refusal_error_text(proxy_dsn):
    r = psql(proxy_dsn, "-c", REFUSED)
    assert r.returncode == 1
    assert r.stdout == ""
    assert f"ERROR:  {deciders.MESSAGE}" in r.stderr
    assert f"DETAIL:  {deciders.DETAIL}" in r.stderr
    assert f"HINT:  {deciders.HINT}" in r.stderr
    assert "syntax error" not in r.stderr and "purpose_proxy_refused_" not in r.stderr


def test_psql_next_statement_works(direct_dsn, proxy_dsn):
    script = f"SELECT 'before' AS a;\n{REFUSED};\nSELECT 'after' AS a, 40 + 2 AS b;\n"
    through = psql(proxy_dsn, "-A", stdin=script)
    direct = psql(direct_dsn, "-A", stdin=script.replace(REFUSED, FAILING))
    assert through.returncode == direct.returncode == 0  # psql goes on after an error
    assert through.stdout == direct.stdout
    assert "after|42" in through.stdout
    assert f"ERROR:  {deciders.MESSAGE}" in through.stderr


def test_psql_multi_statement_query_runs_nothing(direct_dsn, proxy_dsn, table):
    # One Query message with three statements: the marker in the last one refuses all.
    sql = f"INSERT INTO {table} VALUES (1); INSERT INTO {table} VALUES (2); {REFUSED}"
    r = psql(proxy_dsn, "-c", sql)
    assert r.returncode == 1
    assert deciders.MESSAGE in r.stderr
    assert rows(direct_dsn, table) == []
    # The marker first, inserts after: same.
    r = psql(proxy_dsn, "-c", f"{REFUSED}; INSERT INTO {table} VALUES (3)")
    assert r.returncode == 1
    assert rows(direct_dsn, table) == []
    # Without the marker the same string runs in full through the proxy.
    r = psql(proxy_dsn, "-c", f"INSERT INTO {table} VALUES (1); INSERT INTO {table} VALUES (2)")
    assert r.returncode == 0, r.stderr
    assert rows(direct_dsn, table) == [1, 2]


def test_psql_transaction_refused_then_commit_rolls_back(direct_dsn, proxy_dsn, table):
    script = (f"BEGIN;\nINSERT INTO {table} VALUES (1);\n{REFUSED};\nSELECT 1;\nCOMMIT;\n"
              f"SELECT count(*) AS n FROM {table};\n")
    through = psql(proxy_dsn, "-A", stdin=script)
    assert rows(direct_dsn, table) == []
    direct = psql(direct_dsn, "-A", stdin=script.replace(REFUSED, FAILING))
    assert rows(direct_dsn, table) == []
    assert through.stdout == direct.stdout
    assert "ROLLBACK" in through.stdout
    assert "current transaction is aborted" in through.stderr


# --- nothing of a refused statement reaches PostgreSQL --------------------------------


def test_refused_insert_leaves_table_unchanged(direct_dsn, proxy_dsn, table):
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        for params in (None, (7,)):  # simple Query, then extended protocol
            sql = (f"INSERT INTO {table} SELECT 5 AS refuse_me" if params is None
                   else f"INSERT INTO {table} SELECT %s AS refuse_me")
            with pytest.raises(psycopg.Error) as ei:
                conn.execute(sql, params)
            assert_refusal(ei.value)
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
    assert rows(direct_dsn, table) == [1]


def test_refused_statement_never_runs_upstream(direct_dsn, proxy_dsn, table):
    """A sequence is not transactional: had the statement run and been rolled back, it would show."""
    seq = table + "_seq"
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SEQUENCE {seq}")
    try:
        with psycopg.connect(proxy_dsn, autocommit=True) as conn:
            for params in (None, (1,)):
                sql = (f"SELECT nextval('{seq}') AS refuse_me" if params is None
                       else f"SELECT nextval('{seq}') + %s AS refuse_me")
                with pytest.raises(psycopg.Error) as ei:
                    conn.execute(sql, params)
                assert_refusal(ei.value)
            with pytest.raises(psycopg.Error):
                conn.execute(f"BEGIN; SELECT nextval('{seq}'); SELECT 1 AS refuse_me; COMMIT")
        with psycopg.connect(direct_dsn, autocommit=True) as conn:
            assert conn.execute(f"SELECT last_value, is_called FROM {seq}").fetchone() == (1, False)
            # The control: the same statement without the marker does advance it.
            conn.execute(f"SELECT nextval('{seq}')")
            assert conn.execute(f"SELECT last_value, is_called FROM {seq}").fetchone() == (1, True)
    finally:
        with psycopg.connect(direct_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SEQUENCE IF EXISTS {seq}")


# --- asyncpg ----------------------------------------------------------------------------


def _asyncpg_kwargs(pg, host=None, port=None) -> dict:
    return dict(host=host or pg.host, port=port or pg.port, user="app", password="app-secret", database="app")


def test_asyncpg_fetch_refused(pg, rproxy):
    async def main():
        conn = await asyncpg.connect(**_asyncpg_kwargs(pg, rproxy.host, rproxy.port))
        try:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as ei:
                await conn.fetch(REFUSED)
            e = ei.value
            assert e.sqlstate == "42501"
            assert e.message == deciders.MESSAGE
            assert e.detail == deciders.DETAIL
            assert e.hint == deciders.HINT
            # fetch with arguments (a different Parse), and execute (simple Query)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.fetch("SELECT $1::int AS refuse_me", 1)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(REFUSED)
            assert await conn.fetchval("SELECT 41 + $1::int", 1) == 42
            assert await conn.fetch("SELECT 1 AS a") == [(1,)]
        finally:
            await conn.close()

    run(main())


def test_asyncpg_prepared_statement_refused(pg, rproxy):
    async def main():
        conn = await asyncpg.connect(**_asyncpg_kwargs(pg, rproxy.host, rproxy.port))
        try:
            ok = await conn.prepare("SELECT $1::int * 2 AS v")
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as ei:
                await conn.prepare("SELECT $1::int AS refuse_me")
            assert ei.value.detail == deciders.DETAIL
            # The statement prepared before the refusal is intact and usable.
            assert await ok.fetchval(21) == 42
            again = await conn.prepare("SELECT $1::text || 'x' AS v")
            assert await again.fetchval("a") == "ax"
            # Inside a transaction the refusal fails the transaction, as any error would.
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute("SELECT 1")
                    await conn.prepare("SELECT 2 AS refuse_me")
            assert await ok.fetchval(1) == 2
        finally:
            await conn.close()

    run(main())


# --- psycopg: simple, extended, pipeline ----------------------------------------------------


def test_psycopg_simple_query_refused(proxy_dsn):
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as ei:
            conn.execute(REFUSED)  # no parameters: psycopg sends a simple Query
        assert_refusal(ei.value)
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 'ok'").fetchone() == ("ok",)
        # A client-side-binding cursor: always simple Query, even with parameters.
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.Error) as ei:
            cur.execute("SELECT %s AS refuse_me", (1,))
        assert_refusal(ei.value)
        cur.execute("SELECT %s::int + 1", (1,))
        assert cur.fetchone() == (2,)


@pytest.mark.parametrize("prepare", [False, True], ids=["unnamed", "named"])
def test_psycopg_extended_with_params_refused(proxy_dsn, prepare):
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as ei:
            conn.execute("SELECT %s::int AS refuse_me", (1,), prepare=prepare)
        assert_refusal(ei.value)
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        for i in range(3):  # prepare=True: a named server-side statement, reused
            assert conn.execute("SELECT %s::int * 2", (i,), prepare=prepare).fetchone() == (i * 2,)
        with pytest.raises(psycopg.Error) as ei:
            conn.execute("SELECT %s::int AS refuse_me", (2,), prepare=prepare)
        assert_refusal(ei.value)
        assert conn.execute("SELECT %s::text", ("still fine",), prepare=prepare).fetchone() == ("still fine",)


def _pipeline_scenario(dsn: str, table: str, bad: str, *, sync_after_first: bool):
    """Run a pipeline with ``bad`` third; return what the client and the table show."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        raised = None
        try:
            with conn.pipeline() as p:
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
                if sync_after_first:
                    p.sync()
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (2,))
                conn.execute(bad)
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (3,))
        except psycopg.Error as exc:
            raised = exc
        status = conn.info.transaction_status
        after = conn.execute("SELECT 'usable'").fetchone()
    return raised, status, after, rows(dsn, table)


@pytest.mark.parametrize("sync_after_first", [False, True], ids=["one-sync", "sync-after-first"])
def test_psycopg_pipeline_refusal_rolls_back_like_an_error(direct_dsn, proxy_dsn, table, sync_after_first):
    d_exc, d_status, d_after, d_rows = _pipeline_scenario(direct_dsn, table, FAILING,
                                                          sync_after_first=sync_after_first)
    truncate(direct_dsn, table)
    p_exc, p_status, p_after, p_rows = _pipeline_scenario(proxy_dsn, table, REFUSED,
                                                          sync_after_first=sync_after_first)
    assert isinstance(d_exc, errors.DivisionByZero)
    assert p_exc is not None
    assert_refusal(p_exc)
    # Rolled back exactly as PostgreSQL does for an error at that point: everything
    # in the failed sync's implicit transaction, nothing synced before it.
    assert p_rows == d_rows == ([1] if sync_after_first else [])
    assert p_status == d_status == pq.TransactionStatus.IDLE
    assert p_after == d_after == ("usable",)


def test_psycopg_pipeline_explicit_transaction(direct_dsn, proxy_dsn, table):
    def scenario(dsn, bad):
        with psycopg.connect(dsn) as conn:  # not autocommit: psycopg opens a transaction
            with pytest.raises(psycopg.Error) as ei:
                with conn.pipeline():
                    conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
                    conn.execute(bad)
                    conn.execute(f"INSERT INTO {table} VALUES (%s)", (2,))
            status = conn.info.transaction_status
            with pytest.raises(errors.InFailedSqlTransaction):
                conn.execute("SELECT 1")
            conn.rollback()
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (10,))
            conn.commit()
        return ei.value, status, rows(dsn, table)

    d_exc, d_status, d_rows = scenario(direct_dsn, FAILING)
    truncate(direct_dsn, table)
    p_exc, p_status, p_rows = scenario(proxy_dsn, REFUSED)
    assert isinstance(d_exc, errors.DivisionByZero)
    assert_refusal(p_exc)
    assert p_status == d_status == pq.TransactionStatus.INERROR
    assert p_rows == d_rows == [10]


# --- explicit transactions ------------------------------------------------------------------


@pytest.mark.parametrize("params", [None, (1,)], ids=["simple", "extended"])
def test_refusal_in_transaction_fails_it(direct_dsn, proxy_dsn, table, params):
    sql = REFUSED if params is None else "SELECT %s::int AS refuse_me"
    with psycopg.connect(proxy_dsn) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert conn.info.transaction_status == pq.TransactionStatus.INTRANS
        with pytest.raises(psycopg.Error) as ei:
            conn.execute(sql, params)
        assert_refusal(ei.value)
        assert conn.info.transaction_status == pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction) as ei2:  # PostgreSQL's own 25P02
            conn.execute("SELECT 1")
        assert ei2.value.sqlstate == "25P02"
        assert "current transaction is aborted" in str(ei2.value)
        conn.rollback()
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 'after rollback'").fetchone() == ("after rollback",)
        conn.commit()
    assert rows(direct_dsn, table) == []


def test_refusal_in_transaction_then_commit_rolls_back(direct_dsn, proxy_dsn, table):
    def scenario(dsn, bad):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("BEGIN")
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (2,))
            with pytest.raises(psycopg.Error) as ei:
                conn.execute(bad)
            status = conn.info.transaction_status
            cur = conn.execute("COMMIT")
            tag = cur.statusmessage
            final = conn.info.transaction_status
        return ei.value, status, tag, final, rows(dsn, table)

    d = scenario(direct_dsn, FAILING)
    p = scenario(proxy_dsn, REFUSED)
    assert_refusal(p[0])
    assert p[1:] == d[1:]
    assert p[1] == pq.TransactionStatus.INERROR
    assert p[2] == "ROLLBACK"  # PostgreSQL answers COMMIT of a failed transaction so
    assert p[3] == pq.TransactionStatus.IDLE
    assert p[4] == []


def test_refusal_in_savepoint_can_be_rolled_back_to(direct_dsn, proxy_dsn, table):
    def scenario(dsn, bad):
        with psycopg.connect(dsn) as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            with pytest.raises(psycopg.Error) as ei:
                with conn.transaction():  # a savepoint inside the outer transaction
                    conn.execute(f"INSERT INTO {table} VALUES (2)")
                    conn.execute(bad)
            assert conn.info.transaction_status == pq.TransactionStatus.INTRANS
            conn.execute(f"INSERT INTO {table} VALUES (3)")
            conn.commit()
        return ei.value, rows(dsn, table)

    d_exc, d_rows = scenario(direct_dsn, FAILING)
    truncate(direct_dsn, table)
    p_exc, p_rows = scenario(proxy_dsn, REFUSED)
    assert_refusal(p_exc)
    assert p_rows == d_rows == [1, 3]


# --- refusals through COPY, streaming and batch APIs -------------------------------------------


def test_refusal_of_copy_stream_and_batch_statements(pg, rproxy, direct_dsn, proxy_dsn, table):
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        cur = conn.cursor()
        attempts = {
            "stream": lambda: list(cur.stream("SELECT g AS refuse_me FROM generate_series(1, 3) g")),
            "executemany": lambda: cur.executemany(f"INSERT INTO {table} SELECT %s AS refuse_me", [(1,), (2,)]),
        }

        def copy_out():
            with cur.copy("COPY (SELECT 1 AS refuse_me) TO STDOUT") as cp:
                return list(cp)

        def copy_in():
            with cur.copy(f"COPY {table} FROM STDIN -- refuse_me") as cp:
                cp.write_row((1,))

        attempts["copy out"] = copy_out
        attempts["copy in"] = copy_in

        def server_side_cursor():
            with conn.transaction():
                named = conn.cursor(name="refused_cursor")
                named.execute("SELECT g AS refuse_me FROM generate_series(1, 3) g")
                return named.fetchall()

        attempts["server-side cursor"] = server_side_cursor
        for what, attempt in attempts.items():
            with pytest.raises(psycopg.Error) as ei:
                attempt()
            assert_refusal(ei.value)
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE, what
            assert conn.execute("SELECT %s::text", (what,)).fetchone() == (what,)

    async def with_asyncpg():
        conn = await asyncpg.connect(**_asyncpg_kwargs(pg, rproxy.host, rproxy.port))
        try:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.copy_from_query("SELECT 1 AS refuse_me", output=io.BytesIO())
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.executemany(f"INSERT INTO {table} SELECT $1 AS refuse_me", [(1,), (2,)])
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                async with conn.transaction():
                    [r async for r in conn.cursor("SELECT 1 AS refuse_me")]
            await conn.copy_records_to_table(table, records=[(1,), (2,)])
            return await conn.fetchval(f"SELECT count(*) FROM {table}")
        finally:
            await conn.close()

    assert run(with_asyncpg()) == 2
    assert rows(direct_dsn, table) == [1, 2]


def test_postgres_errors_mentioning_the_stand_in_prefix_pass_unchanged(direct_dsn, proxy_dsn):
    """Only the stand-in's syntax error is swapped; PostgreSQL's other errors never are."""

    def errors_of(dsn):
        out = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            for sql in ("SELECT purpose_proxy_refused_abc", "SELECT 1 FROM purpose_proxy_refused_t",
                        "SELECT 'purpose_proxy_refused_x'::int"):
                # a text cursor sends a simple Query; a binary one the extended protocol
                for cur in (conn.cursor(), conn.cursor(binary=True)):
                    with pytest.raises(psycopg.Error) as ei:
                        cur.execute(sql)
                    out.append((ei.value.sqlstate, ei.value.diag.message_primary))
        return out

    through = errors_of(proxy_dsn)
    assert through == errors_of(direct_dsn)
    assert [s for s, _ in through] == ["42703", "42703", "42P01", "42P01", "22P02", "22P02"]
