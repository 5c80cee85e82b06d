"""psql through the proxy behaves exactly as psql against PostgreSQL directly.

Every test runs the same psql invocation twice, once against the server and once
through the (relay-only) proxy, and compares exit status, stdout and stderr.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid

import pytest

pytestmark = pytest.mark.integration


def psql(dsn: str, *args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", dsn, "-X", *args], capture_output=True, text=True, timeout=120,
                          input=input, env=env)


def both(pg, proxy, *args: str, user: str = "app", input: str | None = None):
    direct = psql(pg.dsn(user), *args, input=input)
    through = psql(pg.dsn(user, host=proxy.host, port=proxy.port), *args, input=input)
    return direct, through


def assert_same(direct: subprocess.CompletedProcess, through: subprocess.CompletedProcess) -> None:
    assert through.returncode == direct.returncode, through.stderr
    assert through.stdout == direct.stdout
    assert through.stderr == direct.stderr


@pytest.fixture
def table(pg):
    """A fresh table name in the app database, dropped afterwards."""
    name = f"psql_{uuid.uuid4().hex[:10]}"
    yield name
    pg.psql_admin(f"DROP TABLE IF EXISTS {name}", dbname="app")


def test_dash_c_with_types_and_nulls(pg, proxy):
    sql = ("SELECT 1 AS i, 2.5::numeric AS n, NULL::text AS nul, 'ünïcode ✓' AS u, "
           "'{1,2,3}'::int[] AS arr, '2024-02-29'::date AS d, true AS b, E'tab\\there' AS esc")
    direct, through = both(pg, proxy, "-c", sql)
    assert through.returncode == 0, through.stderr
    assert_same(direct, through)
    assert "ünïcode ✓" in through.stdout


def test_multi_statement_string(pg, proxy):
    # One -c string with several statements goes as one simple Query message; psql
    # shows the result of each statement (psql 15 prints all results).
    sql = ("SELECT 1 AS a; SELECT 'two' AS b, 3 AS c; CREATE TEMP TABLE t(x int); "
           "INSERT INTO t VALUES (1),(2); SELECT count(*) FROM t")
    direct, through = both(pg, proxy, "-c", sql)
    assert through.returncode == 0, through.stderr
    assert_same(direct, through)
    assert "two" in through.stdout


def test_multi_statement_string_with_error_in_the_middle(pg, proxy):
    # The implicit transaction of a multi-statement Query is rolled back as a whole.
    sql = "CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (1); SELECT 1/0; INSERT INTO t VALUES (2)"
    direct, through = both(pg, proxy, "-v", "VERBOSITY=verbose", "-c", sql)
    assert through.returncode == 1
    assert "22012" in through.stderr
    assert_same(direct, through)


def test_several_dash_c_and_script_on_stdin(pg, proxy):
    script = ("\\set x 41\nSELECT :x + 1 AS answer;\nBEGIN;\nSELECT txid_current() IS NOT NULL AS in_tx;\n"
              "COMMIT;\n\\echo done\n")
    direct, through = both(pg, proxy, "-c", "SELECT 'first'", "-c", "SELECT 'second'")
    assert through.returncode == 0
    assert_same(direct, through)
    direct, through = both(pg, proxy, "-f", "-", input=script)
    assert through.returncode == 0, through.stderr
    assert_same(direct, through)
    assert "42" in through.stdout and "done" in through.stdout


def test_error_statement_same_text_and_sqlstate(pg, proxy):
    for sql in ["SELECT 1/0", "SELECT * FROM no_such_table_xyz", "SELEC 1", "SELECT 'a'::int",
                "SELECT no_such_function(1)", "DROP TABLE pg_catalog.pg_class"]:
        direct, through = both(pg, proxy, "-v", "VERBOSITY=verbose", "-c", sql)
        assert through.returncode == 1
        assert through.stderr.startswith("ERROR:  "), through.stderr
        assert_same(direct, through)
    direct, through = both(pg, proxy, "-v", "VERBOSITY=verbose", "-c", "SELECT 1/0")
    assert "ERROR:  22012: division by zero" in through.stderr


def test_on_error_stop(pg, proxy, table):
    script = (
        f"CREATE TABLE {table}(id int primary key, v text);\n"
        f"INSERT INTO {table} VALUES (1, 'a');\n"
        f"INSERT INTO {table} VALUES (1, 'dup');\n"  # unique violation: stop here
        f"INSERT INTO {table} VALUES (2, 'never');\n"
    )
    results = []
    for dsn in (pg.dsn("app"), pg.dsn("app", host=proxy.host, port=proxy.port)):
        pg.psql_admin(f"DROP TABLE IF EXISTS {table}", dbname="app")
        r = psql(dsn, "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-f", "-", input=script)
        rows = pg.psql_admin(f"SELECT id, v FROM {table} ORDER BY id", dbname="app")
        results.append((r, rows))
    (direct, direct_rows), (through, through_rows) = results
    assert through.returncode == 3  # psql: "an error occurred in a script and ON_ERROR_STOP was set"
    assert "23505" in through.stderr
    assert_same(direct, through)
    assert through_rows == direct_rows == "1|a\n"


def test_without_on_error_stop_continues(pg, proxy, table):
    script = (f"CREATE TEMP TABLE {table}(id int primary key);\n"
              f"INSERT INTO {table} VALUES (1);\n"
              f"INSERT INTO {table} VALUES (1);\n"
              f"INSERT INTO {table} VALUES (2);\n"
              f"SELECT array_agg(id ORDER BY id) FROM {table};\n")
    direct, through = both(pg, proxy, "-f", "-", input=script)
    assert through.returncode == 0
    assert_same(direct, through)
    assert "{1,2}" in through.stdout


def test_on_error_stop_inside_transaction(pg, proxy):
    script = "\\set ON_ERROR_STOP on\nBEGIN;\nSELECT 1;\nSELECT no_such_column;\nSELECT 2;\nCOMMIT;\n"
    direct, through = both(pg, proxy, "-f", "-", input=script)
    assert through.returncode == 3
    assert_same(direct, through)


def test_copy_from_and_to_file(pg, proxy, table, tmp_path):
    src = tmp_path / "in.tsv"
    null = "\\N"
    lines = [f"{i}\tname {i}\t{null if i % 7 == 0 else i * 1.5}\tcomma, \"quote\" {i}" for i in range(1, 5001)]
    src.write_text("\n".join(lines) + "\n")
    outputs = {}
    for label, dsn in (("direct", pg.dsn("app")), ("proxy", pg.dsn("app", host=proxy.host, port=proxy.port))):
        pg.psql_admin(f"DROP TABLE IF EXISTS {table}", dbname="app")
        r = psql(dsn, "-v", "ON_ERROR_STOP=1", "-c",
                 f"CREATE TABLE {table}(id int, name text, score numeric, note text)")
        assert r.returncode == 0, r.stderr
        r = psql(dsn, "-v", "ON_ERROR_STOP=1", "-c", f"\\copy {table} FROM '{src}'")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "COPY 5000\n"
        out = tmp_path / f"out-{label}.tsv"
        r = psql(dsn, "-v", "ON_ERROR_STOP=1", "-c", f"\\copy (SELECT * FROM {table} ORDER BY id) TO '{out}'")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "COPY 5000\n"
        csv = tmp_path / f"out-{label}.csv"
        r = psql(dsn, "-v", "ON_ERROR_STOP=1", "-c",
                 f"\\copy (SELECT * FROM {table} ORDER BY id) TO '{csv}' WITH (FORMAT csv, HEADER)")
        assert r.returncode == 0, r.stderr
        summary = pg.psql_admin(
            f"SELECT count(*), sum(id), count(score), md5(string_agg(note, ',' ORDER BY id)) FROM {table}",
            dbname="app")
        outputs[label] = (out.read_bytes(), csv.read_bytes(), summary)
    assert outputs["proxy"] == outputs["direct"]
    assert outputs["proxy"][0].decode() == src.read_text()  # text format round-trips exactly
    assert outputs["proxy"][2].startswith("5000|12502500|4286|")


def test_copy_from_stdin_inline(pg, proxy):
    script = ("CREATE TEMP TABLE t(a int, b text);\nCOPY t FROM STDIN;\n1\tone\n2\ttwo\n\\.\n"
              "SELECT * FROM t ORDER BY a;\n")
    direct, through = both(pg, proxy, "-v", "ON_ERROR_STOP=1", "-f", "-", input=script)
    assert through.returncode == 0, through.stderr
    assert_same(direct, through)
    assert "two" in through.stdout


def test_copy_from_file_with_bad_row(pg, proxy, table, tmp_path):
    src = tmp_path / "bad.tsv"
    src.write_text("1\tok\nnot-a-number\tbad\n3\tok\n")
    results = []
    for dsn in (pg.dsn("app"), pg.dsn("app", host=proxy.host, port=proxy.port)):
        pg.psql_admin(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table}(id int, v text); "
                      f"GRANT ALL ON {table} TO app", dbname="app")
        r = psql(dsn, "-v", "VERBOSITY=verbose", "-c", f"\\copy {table} FROM '{src}'")
        results.append((r, pg.psql_admin(f"SELECT count(*) FROM {table}", dbname="app")))
    (direct, direct_count), (through, through_count) = results
    assert through.returncode == 1
    assert "22P02" in through.stderr
    assert_same(direct, through)
    assert through_count == direct_count == "0\n"
    # The session is usable after a failed COPY.
    direct, through = both(pg, proxy, "-f", "-", input=f"\\copy {table} FROM '{src}'\nSELECT 'still alive';\n")
    assert "still alive" in through.stdout
    assert_same(direct, through)


def test_large_output(pg, proxy):
    sql = ("SELECT g, md5(g::text) AS h, repeat('x', g % 200) AS pad "
           "FROM generate_series(1, 100000) g")
    direct, through = both(pg, proxy, "-A", "-t", "-c", sql)
    assert through.returncode == 0, through.stderr
    assert len(through.stdout) > 10_000_000
    assert hashlib.sha256(through.stdout.encode()).hexdigest() == hashlib.sha256(direct.stdout.encode()).hexdigest()
    assert through.stderr == direct.stderr == ""


def test_large_value_and_fetch_count(pg, proxy):
    # One 30 MB value (a single DataRow bigger than any socket read) and psql's
    # FETCH_COUNT mode, which runs the query through a cursor in batches.
    direct, through = both(pg, proxy, "-A", "-t", "-c", "SELECT repeat('abc', 10000000)")
    assert through.returncode == 0
    assert through.stdout == direct.stdout
    assert len(through.stdout) == 30_000_001
    direct, through = both(pg, proxy, "-A", "-t", "-v", "FETCH_COUNT=1000", "-c",
                           "SELECT g FROM generate_series(1, 25000) g")
    assert through.returncode == 0
    assert_same(direct, through)
    assert through.stdout.count("\n") == 25000


def test_meta_commands(pg, proxy, table):
    pg.psql_admin(f"CREATE TABLE {table}(id int primary key, v text); ALTER TABLE {table} OWNER TO app", dbname="app")
    for cmd in (f"\\d {table}", "\\dt public.psql_*", "\\l app", "\\conninfo"):
        direct, through = both(pg, proxy, "-c", cmd)
        assert through.returncode == 0, through.stderr
        if cmd == "\\conninfo":  # names the port, which differs
            assert through.stdout.replace(str(proxy.port), "P") == direct.stdout.replace(str(pg.port), "P")
        else:
            assert_same(direct, through)


@pytest.mark.parametrize("user", ["md5user", "pwuser", "trustuser"])
def test_other_users(pg, proxy, user):
    direct, through = both(pg, proxy, "-c", "SELECT current_user, session_user", user=user)
    assert through.returncode == 0, through.stderr
    assert_same(direct, through)
    assert user in through.stdout
