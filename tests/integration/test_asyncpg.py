"""asyncpg through the proxy: the binary extended protocol, COPY, notifications, cancellation.

Each scenario runs once directly against PostgreSQL and once through the proxy
(relay only, every statement allowed) and the results must be identical.
asyncpg has no synchronous API; the tests drive it with ``asyncio.run`` and an
overall timeout, so no asyncio plugin is needed.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import io
import uuid

import asyncpg
import psycopg
import pytest

pytestmark = pytest.mark.integration


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def kwargs(pg, proxy=None) -> dict:
    host, port = (proxy.host, proxy.port) if proxy is not None else (pg.host, pg.port)
    return dict(host=host, port=port, user="app", password="app-secret", database="app")


async def connect(pg, proxy=None) -> asyncpg.Connection:
    return await asyncio.wait_for(asyncpg.connect(**kwargs(pg, proxy)), 15)


@pytest.fixture
def table(pg):
    """A fresh table name; the scenario creates it, it is dropped after the test."""
    name = "a_" + uuid.uuid4().hex[:12]
    yield name
    with psycopg.connect(pg.dsn("app"), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def both(pg, proxy, scenario, *args):
    """Run ``scenario(conn, *args)`` directly, then through the proxy; return both results."""

    async def once(via_proxy):
        conn = await connect(pg, proxy if via_proxy else None)
        try:
            return await scenario(conn, *args)
        finally:
            await asyncio.wait_for(conn.close(), 10)

    return run(once(False)), run(once(True))


TYPES_QUERY = """
SELECT g AS i, g::int8 * 1000000000 AS big, (g / 7.0)::numeric(12, 4) AS num, g::float8 / 3 AS f,
       'row ' || g AS t, g % 2 = 0 AS b, NULL::text AS n, date '2024-01-01' + g AS d,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute' AS ts,
       ARRAY[g, g + 1] AS arr, ('{"k": ' || g || '}')::jsonb AS j, decode(lpad(to_hex(g), 8, '0'), 'hex') AS bytes,
       md5(g::text)::uuid AS u
FROM generate_series(1, 2000) AS g
"""


def test_fetch_same_as_direct(pg, proxy):
    async def scenario(conn):
        records = await conn.fetch(TYPES_QUERY)
        return [tuple(r) for r in records], [tuple(r.keys()) for r in records[:1]]

    direct, through = both(pg, proxy, scenario)
    assert through == direct
    assert len(through[0]) == 2000
    first = through[0][0]
    assert first[0] == 1 and first[2] == decimal.Decimal("0.1429") and first[7] == datetime.date(2024, 1, 2)


def test_fetchrow_fetchval_same_as_direct(pg, proxy):
    async def scenario(conn):
        row = await conn.fetchrow("SELECT $1::int AS a, $2::text AS b, $3::numeric AS c", 7, "x", decimal.Decimal("1.5"))
        none = await conn.fetchrow("SELECT 1 WHERE false")
        val = await conn.fetchval("SELECT current_user")
        big = await conn.fetchval("SELECT repeat('y', 1000000)")
        return dict(row), none, val, len(big), big[:3]

    direct, through = both(pg, proxy, scenario)
    assert through == direct
    assert through == ({"a": 7, "b": "x", "c": decimal.Decimal("1.5")}, None, "app", 1000000, "yyy")


def test_prepared_statements_same_as_direct(pg, proxy):
    async def scenario(conn):
        stmt = await conn.prepare("SELECT $1::int + $2::int AS s, $3::text AS t")
        out = [tuple(await stmt.fetchrow(i, i * 2, f"v{i}")) for i in range(50)]
        params = [t.name for t in stmt.get_parameters()]
        attrs = [(a.name, a.type.name) for a in stmt.get_attributes()]
        cur_rows = []
        async with conn.transaction():
            async for r in conn.cursor("SELECT g FROM generate_series(1, 500) g", prefetch=37):
                cur_rows.append(r["g"])
        # asyncpg's statement cache: the same text reuses the named server statement.
        cached = [await conn.fetchval("SELECT $1::int * 3", i) for i in range(20)]
        return out, params, attrs, cur_rows, cached

    direct, through = both(pg, proxy, scenario)
    assert through == direct
    assert through[1] == ["int4", "int4", "text"]
    assert through[3] == list(range(1, 501))


def test_executemany_same_as_direct(pg, proxy, table):
    async def scenario(conn, name):
        await conn.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY, label text)")
        await conn.executemany(f"INSERT INTO {name} VALUES ($1, $2)", [(i, f"label {i}") for i in range(1000)])
        with pytest.raises(asyncpg.exceptions.UniqueViolationError):
            await conn.executemany(f"INSERT INTO {name} VALUES ($1, $2)", [(5000, "new"), (1, "dup")])
        return [tuple(r) for r in await conn.fetch(f"SELECT * FROM {name} ORDER BY id")]

    direct, through = both(pg, proxy, scenario, table)
    assert through == direct
    assert len(through) == 1000  # executemany is atomic: the failed batch left nothing


def test_copy_records_to_table_same_as_direct(pg, proxy, table):
    records = [(i, f"name {i}", None if i % 10 == 0 else i * 1.25) for i in range(20000)]

    async def scenario(conn, name):
        await conn.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int, name text, x float8)")
        status = await conn.copy_records_to_table(name, records=records)
        return status, [tuple(r) for r in await conn.fetch(f"SELECT * FROM {name} ORDER BY id")]

    direct, through = both(pg, proxy, scenario, table)
    assert through == direct
    assert through[0] == "COPY 20000"
    assert through[1] == records


def test_copy_from_query_same_as_direct(pg, proxy):
    async def scenario(conn):
        buf = io.BytesIO()
        status = await conn.copy_from_query(
            "SELECT g, md5(g::text), repeat('z', g % 300) FROM generate_series(1, $1::int) g", 30000,
            output=buf, format="csv")
        chunks = []

        async def sink(data):
            chunks.append(bytes(data))

        status2 = await conn.copy_from_query("SELECT 1 AS a, 'b' AS b", output=sink, format="text")
        return status, buf.getvalue(), status2, b"".join(chunks)

    direct, through = both(pg, proxy, scenario)
    assert through == direct
    assert through[0] == "COPY 30000"
    assert through[1].count(b"\n") == 30000
    assert through[3] == b"1\tb\n"


def test_copy_to_table_same_as_direct(pg, proxy, table):
    data = "".join(f"{i},text {i},{'t' if i % 3 == 0 else 'f'}\n" for i in range(30000)).encode()

    async def scenario(conn, name):
        await conn.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int, t text, flag bool)")
        status = await conn.copy_to_table(name, source=io.BytesIO(data), format="csv")
        # A COPY FROM STDIN that fails in PostgreSQL mid-stream: the error arrives,
        # the table is untouched by it, and the connection goes on.
        with pytest.raises(asyncpg.exceptions.InvalidTextRepresentationError):
            await conn.copy_to_table(name, source=io.BytesIO(b"1,a,true\nnot-a-number,b,false\n"), format="csv")
        out = io.BytesIO()
        await conn.copy_from_table(name, output=out, format="csv")
        return status, await conn.fetchval(f"SELECT count(*) FROM {name}"), out.getvalue()

    direct, through = both(pg, proxy, scenario, table)
    assert through == direct
    assert through[0] == "COPY 30000"
    assert through[1] == 30000
    assert through[2] == data


def test_listen_notify_between_two_proxied_connections(pg, proxy):
    async def main():
        listener = await connect(pg, proxy)
        sender = await connect(pg, proxy)
        try:
            got: asyncio.Queue = asyncio.Queue()
            await listener.add_listener("purpose_chan", lambda c, pid, ch, payload: got.put_nowait((pid, ch, payload)))
            await sender.execute("NOTIFY purpose_chan, 'hello through the proxy'")
            first = await asyncio.wait_for(got.get(), 10)
            # A notification delivered while the listener is idle, and one of a transaction.
            async with sender.transaction():
                await sender.execute("SELECT pg_notify('purpose_chan', $1)", "from a transaction")
                await sender.execute("SELECT pg_notify('purpose_chan', $1)", "x" * 7000)
            second = await asyncio.wait_for(got.get(), 10)
            third = await asyncio.wait_for(got.get(), 10)
            return first, second, third, sender.get_server_pid()
        finally:
            await listener.close()
            await sender.close()

    first, second, third, sender_pid = run(main())
    assert first == (sender_pid, "purpose_chan", "hello through the proxy")
    assert second == (sender_pid, "purpose_chan", "from a transaction")
    assert third == (sender_pid, "purpose_chan", "x" * 7000)


def test_timeout_cancels_query_through_proxy(pg, proxy):
    """asyncpg's timeout sends a CancelRequest with the proxy-issued key; the proxy maps it."""

    async def main():
        conn = await connect(pg, proxy)
        admin = await connect(pg)
        try:
            pid = conn.get_server_pid()
            with pytest.raises(TimeoutError):
                await conn.fetch("SELECT pg_sleep(60)", timeout=0.5)
            # Had the cancel not reached the backend it would sleep a minute more, and
            # the next statement on the connection would wait for it: bounded at 20s.
            assert await asyncio.wait_for(conn.fetchval("SELECT 40 + 2"), 20) == 42
            state = await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
            # A second cancellation on the same connection works as well.
            with pytest.raises(TimeoutError):
                await conn.execute("SELECT pg_sleep(60)", timeout=0.3)
            assert await asyncio.wait_for(conn.fetchval("SELECT 'again'"), 20) == "again"
            return state
        finally:
            await conn.close()
            await admin.close()

    assert run(main()) == "idle"


def test_transactions_same_as_direct(pg, proxy, table):
    async def scenario(conn, name):
        await conn.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (v int)")
        log = []
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {name} VALUES (1)")
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {name} VALUES (2)")
                raise RuntimeError("roll it back")
        except RuntimeError:
            log.append("rolled back")
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {name} VALUES (3)")
            async with conn.transaction():  # SAVEPOINT
                await conn.execute(f"INSERT INTO {name} VALUES (4)")
                async with conn.transaction():  # nested SAVEPOINT
                    await conn.execute(f"INSERT INTO {name} VALUES (5)")
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {name} VALUES (6)")
                    await conn.execute("SELECT 1/0")
            except asyncpg.exceptions.DivisionByZeroError:
                log.append("savepoint rolled back")
            log.append(conn.is_in_transaction())
            await conn.execute(f"INSERT INTO {name} VALUES (7)")
        tr = conn.transaction(isolation="serializable", readonly=True)
        await tr.start()
        log.append(await conn.fetchval("SHOW transaction_isolation"))
        with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
            await conn.execute(f"INSERT INTO {name} VALUES (8)")
        await tr.rollback()
        log.append(conn.is_in_transaction())
        return log, [r["v"] for r in await conn.fetch(f"SELECT v FROM {name} ORDER BY v")]

    direct, through = both(pg, proxy, scenario, table)
    assert through == direct
    assert through == (["rolled back", "savepoint rolled back", True, "serializable", False], [1, 3, 4, 5, 7])
