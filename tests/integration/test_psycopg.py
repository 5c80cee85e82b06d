"""psycopg 3 (libpq) through the proxy: simple and extended protocol, pipeline mode,
COPY, server-side cursors and transactions, each compared with the same code run
directly against PostgreSQL."""

from __future__ import annotations

import datetime
import decimal
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import tuple_row

pytestmark = pytest.mark.integration


def dsns(pg, proxy, user: str = "app") -> dict[str, str]:
    return {"direct": pg.dsn(user), "proxy": pg.dsn(user, host=proxy.host, port=proxy.port)}


def run_both(pg, proxy, scenario, *, autocommit: bool = True, user: str = "app", **connect_kw):
    """Run ``scenario(conn)`` on a fresh connection direct and through the proxy."""
    out = {}
    for label, dsn in dsns(pg, proxy, user).items():
        with psycopg.connect(dsn, autocommit=autocommit, **connect_kw) as conn:
            out[label] = scenario(conn)
    assert out["proxy"] == out["direct"]
    return out["proxy"]


def error_of(exc: psycopg.Error) -> tuple:
    d = exc.diag
    return (type(exc).__name__, exc.sqlstate, d.severity, d.message_primary, d.message_detail, d.message_hint,
            d.statement_position)


ROW_SQL = ("SELECT 1::int AS i, 2::bigint AS b, 3.25::numeric AS n, 'text ✓'::text AS t, NULL::int AS nul, "
           "'2024-02-29 12:34:56+00'::timestamptz AS ts, '{1,NULL,3}'::int[] AS arr, "
           "'\\x00ff'::bytea AS by, '{\"k\": [1, 2]}'::jsonb AS j, "
           "'8a1f1a0c-6f4b-4dc9-9a3b-1a2b3c4d5e6f'::uuid AS u")


# --- simple protocol ------------------------------------------------------------------


def test_simple_protocol_types(pg, proxy):
    def scenario(conn):
        cur = conn.execute(ROW_SQL, prepare=False)
        return [d.name for d in cur.description], [d.type_code for d in cur.description], cur.fetchall()

    names, oids, rows = run_both(pg, proxy, scenario)
    assert rows[0][0:4] == (1, 2, decimal.Decimal("3.25"), "text ✓")
    assert rows[0][5] == datetime.datetime(2024, 2, 29, 12, 34, 56, tzinfo=datetime.timezone.utc)


def test_simple_protocol_multi_statement(pg, proxy):
    def scenario(conn):
        cur = conn.cursor()
        cur.execute("CREATE TEMP TABLE t(x int); INSERT INTO t SELECT generate_series(1, 5); "
                    "SELECT x FROM t ORDER BY x; SELECT 'last'", prepare=False)
        results = []
        while True:
            results.append((cur.statusmessage, cur.fetchall() if cur.description else None))
            if not cur.nextset():
                break
        return results

    results = run_both(pg, proxy, scenario)
    assert results[-1] == ("SELECT 1", [("last",)])


def test_client_cursor_simple_protocol_with_params(pg, proxy):
    # ClientCursor interpolates parameters on the client and sends a simple Query.
    def scenario(conn):
        cur = psycopg.ClientCursor(conn)
        cur.execute("SELECT %s::int + 1, %s::text, %s::date", (41, "it's \"quoted\"", datetime.date(2000, 1, 1)))
        return cur.fetchall()

    assert run_both(pg, proxy, scenario) == [(42, "it's \"quoted\"", datetime.date(2000, 1, 1))]


def test_simple_protocol_error_then_recover(pg, proxy):
    def scenario(conn):
        out = []
        for q in ("SELECT 1/0", "SELECT * FROM nope_table", "SELECT 'x'::int", "SELECT 'fine'"):
            try:
                out.append(conn.execute(q, prepare=False).fetchall())
            except psycopg.Error as exc:
                out.append(error_of(exc))
        return out

    out = run_both(pg, proxy, scenario)
    assert out[0][:2] == ("DivisionByZero", "22012")
    assert out[1][:2] == ("UndefinedTable", "42P01")
    assert out[-1] == [("fine",)]


def test_notices_and_parameter_status(pg, proxy):
    def scenario(conn):
        notices = []
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.sqlstate, d.message_primary)))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$", prepare=False)
        conn.execute("SET application_name = 'psycopg-through-proxy'")
        conn.execute("SET TimeZone = 'Europe/Helsinki'")
        return notices, conn.info.parameter_status("application_name"), conn.info.parameter_status("TimeZone")

    notices, app, tz = run_both(pg, proxy, scenario)
    assert notices == [("NOTICE", "00000", "hello 42"), ("WARNING", "01000", "careful")]
    assert (app, tz) == ("psycopg-through-proxy", "Europe/Helsinki")


# --- extended protocol ----------------------------------------------------------------


def test_extended_protocol_parameters(pg, proxy):
    params = (7, "unicode ✓ and 'quotes'", None, decimal.Decimal("12345.6789"), b"\x00\x01\xff",
              [1, 2, 3], uuid.UUID("8a1f1a0c-6f4b-4dc9-9a3b-1a2b3c4d5e6f"),
              datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc))

    def scenario(conn):
        out = []
        cur = conn.execute("SELECT %s, %s, %s::text, %s, %s, %s, %s, %s", params)
        out.append(cur.fetchall())
        cur = conn.cursor(binary=True)
        cur.execute("SELECT %s, %s, %s::text, %s, %s, %s, %s, %s", params)
        out.append(cur.fetchall())
        cur.executemany("SELECT %s::int", [(i,) for i in range(20)])
        out.append(cur.rowcount)
        return out

    out = run_both(pg, proxy, scenario)
    assert out[0] == out[1] == [params]


def test_prepared_statements(pg, proxy):
    def scenario(conn):
        out = []
        for i in range(8):
            cur = conn.execute("SELECT %s::int * 2, %s::text", (i, f"v{i}"), prepare=True)
            out.append(cur.fetchone())
        # psycopg names its prepared statements; they live on the backend session.
        names = conn.execute("SELECT name, statement FROM pg_prepared_statements ORDER BY name").fetchall()
        out.append(len(names) >= 1)
        out.append(any("$1" in s for _, s in names))
        return out

    out = run_both(pg, proxy, scenario)
    assert out[:8] == [(i * 2, f"v{i}") for i in range(8)]
    assert out[8:] == [True, True]


def test_prepare_threshold_auto_prepare(pg, proxy):
    def scenario(conn):
        conn.prepare_threshold = 2
        out = [conn.execute("SELECT %s::int + 100", (i,)).fetchone()[0] for i in range(6)]
        out.append(conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0])
        return out

    out = run_both(pg, proxy, scenario)
    assert out[:6] == list(range(100, 106))
    assert out[6] >= 1


def test_extended_protocol_errors(pg, proxy):
    def scenario(conn):
        out = []
        for q, p in [("SELECT %s::int / 0", (1,)), ("SELECT %s::int", ("nope",)), ("SELEC %s", (1,)),
                     ("SELECT %s", (1,))]:
            for prepare in (False, True):
                try:
                    out.append(conn.execute(q, p, prepare=prepare).fetchall())
                except psycopg.Error as exc:
                    out.append(error_of(exc))
        return out

    out = run_both(pg, proxy, scenario)
    assert out[0][1] == "22012" and out[2][1] == "22P02" and out[4][1] == "42601"
    assert out[-1] == [(1,)]


# --- pipeline mode ---------------------------------------------------------------------


def test_pipeline_mode(pg, proxy):
    def scenario(conn):
        out = []
        conn.execute("CREATE TEMP TABLE pl(id int primary key, v text)")
        with conn.pipeline() as p:
            curs = [conn.execute("INSERT INTO pl VALUES (%s, %s) RETURNING id", (i, f"v{i}")) for i in range(10)]
            c_sel = conn.execute("SELECT count(*) FROM pl")
            p.sync()
            out.append([c.fetchone() for c in curs])
            out.append(c_sel.fetchone())
            c2 = conn.cursor()
            c2.executemany("INSERT INTO pl VALUES (%s, %s)", [(i, "many") for i in range(10, 30)])
            c3 = conn.execute("SELECT v, count(*) FROM pl GROUP BY v ORDER BY v LIMIT 3", prepare=True)
        out.append(c3.fetchall())
        out.append(conn.execute("SELECT count(*) FROM pl").fetchone())
        return out

    out = run_both(pg, proxy, scenario)
    assert out[0] == [(i,) for i in range(10)]
    assert out[-1] == (30,)


def test_pipeline_with_a_failing_statement(pg, proxy):
    """A statement that PostgreSQL itself rejects aborts the rest of its pipeline segment:
    the backend discards messages until Sync (55.2.4). The next segment runs again."""

    def scenario(conn):
        out = []
        conn.execute("CREATE TEMP TABLE pf(id int primary key)")
        try:
            with conn.pipeline() as p:
                conn.execute("INSERT INTO pf VALUES (1)")
                c_ok = conn.execute("SELECT 'before'")
                conn.execute("INSERT INTO pf VALUES (1)")  # unique_violation
                conn.execute("INSERT INTO pf VALUES (2)")  # skipped by the backend
                conn.execute("SELECT 1/0")  # skipped too
                p.sync()
        except psycopg.Error as exc:
            out.append(error_of(exc))
        out.append(("after", conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE))
        with conn.pipeline() as p:
            c1 = conn.execute("INSERT INTO pf VALUES (3) RETURNING id")
            c2 = conn.execute("SELECT array_agg(id ORDER BY id) FROM pf")
        out.append(c1.fetchone())
        out.append(c2.fetchone())
        try:
            out.append(c_ok.fetchone())
        except psycopg.Error as exc:
            out.append(type(exc).__name__)
        return out

    out = run_both(pg, proxy, scenario)
    assert out[0][:2] == ("UniqueViolation", "23505")
    assert out[1] == ("after", True)
    # The whole failed segment was one implicit transaction: the first INSERT is gone too.
    assert out[2:] == [(3,), ([3],), ("before",)]


def test_pipeline_failing_statement_in_transaction(pg, proxy):
    def scenario(conn):
        out = []
        conn.execute("CREATE TEMP TABLE pt(id int)")
        try:
            with conn.pipeline():
                with conn.transaction():
                    conn.execute("INSERT INTO pt VALUES (1)")
                    conn.execute("SELECT no_such_column FROM pt")
                    conn.execute("INSERT INTO pt VALUES (2)")
        except psycopg.Error as exc:
            out.append(error_of(exc))
        out.append(conn.execute("SELECT count(*) FROM pt").fetchone())
        out.append(conn.info.transaction_status.name)
        return out

    out = run_both(pg, proxy, scenario)
    assert out[0][1] == "42703"
    assert out[1] == (0,)


# --- COPY ------------------------------------------------------------------------------


def test_copy_in_and_out(pg, proxy):
    rows = [(i, f"name {i}\twith tab", None if i % 5 == 0 else decimal.Decimal(i) / 4, f"ü{i}") for i in range(3000)]

    def scenario(conn):
        out = []
        conn.execute("CREATE TEMP TABLE cp(id int, name text, score numeric, u text)")
        with conn.cursor() as cur:
            with cur.copy("COPY cp FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
            out.append(cur.rowcount)
            with cur.copy("COPY cp (id, name) FROM STDIN") as copy:
                copy.write(b"".join(f"{i}\traw {i}\n".encode() for i in range(3000, 3500)))
            out.append(cur.rowcount)
            with cur.copy("COPY (SELECT * FROM cp ORDER BY id) TO STDOUT") as copy:
                out.append(list(copy.rows()))
            with cur.copy("COPY (SELECT * FROM cp ORDER BY id) TO STDOUT (FORMAT csv)") as copy:
                out.append(b"".join(bytes(b) for b in copy))
            with cur.copy("COPY (SELECT id, score FROM cp ORDER BY id) TO STDOUT (FORMAT binary)") as copy:
                copy.set_types(["int4", "numeric"])
                out.append(list(copy.rows()))
            with cur.copy("COPY cp (id, score) FROM STDIN (FORMAT binary)") as copy:
                copy.set_types(["int4", "numeric"])
                copy.write_row((99999, decimal.Decimal("1.5")))
            out.append(conn.execute("SELECT count(*), sum(id) FROM cp").fetchone())
        return out

    out = run_both(pg, proxy, scenario)
    assert out[0] == 3000 and out[1] == 500
    assert len(out[2]) == 3500
    assert out[2][1] == ("1", "name 1\twith tab", "0.25", "ü1")
    assert out[-1] == (3501, sum(range(3500)) + 99999)


def test_copy_errors(pg, proxy):
    def scenario(conn):
        out = []
        conn.execute("CREATE TEMP TABLE ce(id int primary key)")
        # Bad data: PostgreSQL fails the COPY while the client streams.
        try:
            with conn.cursor().copy("COPY ce FROM STDIN") as copy:
                copy.write(b"1\n2\nnot-an-int\n3\n")
        except psycopg.Error as exc:
            out.append(error_of(exc))
        # The client aborts the COPY itself (CopyFail).
        try:
            with conn.cursor().copy("COPY ce FROM STDIN") as copy:
                copy.write_row((10,))
                raise RuntimeError("client gives up")
        except RuntimeError as exc:
            out.append(str(exc))
        except psycopg.Error as exc:
            out.append(error_of(exc))
        # Unique violation reported at the end of the COPY.
        try:
            with conn.cursor().copy("COPY ce FROM STDIN") as copy:
                copy.write(b"5\n5\n")
        except psycopg.Error as exc:
            out.append(error_of(exc))
        out.append(conn.execute("SELECT count(*) FROM ce").fetchone())
        with conn.cursor().copy("COPY ce FROM STDIN") as copy:
            copy.write(b"7\n8\n")
        out.append(conn.execute("SELECT array_agg(id ORDER BY id) FROM ce").fetchone())
        return out

    out = run_both(pg, proxy, scenario)
    assert out[0][1] == "22P02"
    assert out[-1] == ([7, 8],)


def test_copy_in_extended_in_transaction(pg, proxy):
    def scenario(conn):
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE ct(v text)")
            with conn.cursor().copy("COPY ct FROM STDIN") as copy:
                for i in range(100):
                    copy.write_row((f"row {i}" * 50,))
            n = conn.execute("SELECT count(*), sum(length(v)) FROM ct").fetchone()
        return n, conn.info.transaction_status.name

    assert run_both(pg, proxy, scenario, autocommit=False)[0][0] == 100


# --- server-side cursors ------------------------------------------------------------------


def test_server_side_cursor(pg, proxy):
    def scenario(conn):
        out = []
        with conn.transaction():
            with conn.cursor(name="ssc", row_factory=tuple_row) as cur:
                cur.itersize = 77
                cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 1000) g WHERE g > %s", (10,))
                out.append(cur.fetchone())
                out.append(len(cur.fetchmany(100)))
                cur.scroll(0, mode="absolute")
                out.append(cur.fetchone())
                out.append(sum(1 for _ in cur))
            out.append(conn.execute("SELECT count(*) FROM pg_cursors WHERE name = 'ssc'").fetchone())
        with conn.cursor(name="held", withhold=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 50) g")
            out.append(cur.fetchmany(5))
            out.append(len(cur.fetchall()))
        with conn.transaction():
            with conn.cursor(name="bad") as cur:
                try:
                    cur.execute("SELECT 1/(g - 5) FROM generate_series(1, 10) g")
                    out.append(cur.fetchall())
                except psycopg.Error as exc:
                    out.append(error_of(exc))
                raise psycopg.Rollback()
        return out

    out = run_both(pg, proxy, scenario, autocommit=False)
    assert out[0] == (11, "6512bd43d9caa6e02c990b0a82652dca")
    assert out[2] == (11, "6512bd43d9caa6e02c990b0a82652dca")
    assert out[3] == 989
    assert out[-1][1] == "22012"


# --- transactions ------------------------------------------------------------------------


def test_transactions_commit_and_rollback(pg, proxy):
    table = f"tx_{uuid.uuid4().hex[:10]}"

    def scenario(conn):
        out = []
        ident = sql.Identifier(table)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE TABLE {}(id int primary key)").format(ident))
        conn.commit()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(ident))
        out.append(conn.info.transaction_status.name)
        conn.rollback()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(ident))
        conn.commit()
        # A failed transaction: the error puts it in state E; later statements fail
        # with 25P02 until ROLLBACK.
        conn.execute(sql.SQL("INSERT INTO {} VALUES (3)").format(ident))
        try:
            conn.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(ident))
        except psycopg.Error as exc:
            out.append(error_of(exc))
        out.append(conn.info.transaction_status.name)
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as exc:
            out.append(error_of(exc))
        conn.rollback()
        # Savepoints through conn.transaction() nesting.
        with conn.transaction():
            conn.execute(sql.SQL("INSERT INTO {} VALUES (4)").format(ident))
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("INSERT INTO {} VALUES (5)").format(ident))
                    conn.execute("SELECT 1/0")
            except psycopg.errors.DivisionByZero:
                out.append("inner rolled back")
        with psycopg.connect(conn.info.dsn + " password=" + conn.info.password, autocommit=True) as other:
            out.append(other.execute(sql.SQL("SELECT array_agg(id ORDER BY id) FROM {}").format(ident)).fetchone())
        conn.execute(sql.SQL("DROP TABLE {}").format(ident))
        conn.commit()
        return out

    out = run_both(pg, proxy, scenario, autocommit=False)
    assert out[0] == "INTRANS"
    assert out[1][1] == "23505"
    assert out[2] == "INERROR"
    assert out[3][1] == "25P02"
    assert out[-1] == ([2, 4],)


def test_isolation_and_read_only(pg, proxy):
    def scenario(conn):
        out = []
        conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        conn.read_only = True
        out.append(conn.execute("SHOW transaction_isolation").fetchone())
        try:
            conn.execute("CREATE TEMP TABLE ro(x int)")
            conn.execute("INSERT INTO ro VALUES (1)")
        except psycopg.Error as exc:
            out.append(error_of(exc))
        conn.rollback()
        return out

    out = run_both(pg, proxy, scenario, autocommit=False)
    assert out[0] == ("serializable",)


def test_listen_notify(pg, proxy):
    # NotificationResponse arrives between queries, outside any request of the client.
    channel = f"ch_{uuid.uuid4().hex[:8]}"

    def scenario(conn):
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        with psycopg.connect(pg.dsn("app"), autocommit=True) as other:
            for i in range(3):
                other.execute("SELECT pg_notify(%s, %s)", (channel, f"payload {i}"))
        got = []
        for n in conn.notifies(timeout=5, stop_after=3):
            got.append((n.channel, n.payload))
        return got

    assert run_both(pg, proxy, scenario) == [(channel, f"payload {i}") for i in range(3)]


@pytest.mark.parametrize("user", ["md5user", "pwuser", "trustuser"])
def test_other_auth_methods(pg, proxy, user):
    def scenario(conn):
        return conn.execute("SELECT current_user, %s::int", (5,)).fetchone()

    assert run_both(pg, proxy, scenario, user=user) == (user, 5)


def test_async_connection(pg, proxy):
    import asyncio

    async def go(dsn):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT g FROM generate_series(1, %s) g", (500,))
            rows = await cur.fetchall()
            async with conn.pipeline():
                c1 = await conn.execute("SELECT 1")
                c2 = await conn.execute("SELECT 2")
            return len(rows), await c1.fetchone(), await c2.fetchone()

    d = dsns(pg, proxy)
    assert asyncio.run(go(d["proxy"])) == asyncio.run(go(d["direct"])) == (500, (1,), (2,))
