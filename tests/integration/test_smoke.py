"""The proxy relays a psql session exactly as PostgreSQL answers it directly."""

import subprocess


def psql(dsn: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", dsn, "-X", *args], capture_output=True, text=True, timeout=60)


def test_psql_select_same_as_direct(pg, proxy):
    sql = "SELECT 1 AS a, 'x' AS b, current_user AS who"
    direct = psql(pg.dsn("app"), "-c", sql)
    through = psql(pg.dsn("app", host=proxy.host, port=proxy.port), "-c", sql)
    assert through.returncode == 0, through.stderr
    assert through.stdout == direct.stdout
