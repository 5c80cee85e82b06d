"""Authentication through the proxy: every method the server offers, and failures that
look exactly as they do directly.

The proxy relays the authentication exchange untouched except for SCRAM channel
binding: SCRAM-SHA-256-PLUS binds to the TLS certificate the *server* presents,
and a client of the proxy sees the proxy's certificate, so the proxy hides the
-PLUS mechanism unless it presents the very certificate PostgreSQL presents.
"""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import psycopg
import pytest

from proxy.devtools.cluster import make_self_signed_cert
from proxy.devtools.process import RELAY_ONLY, ProxyProcess

pytestmark = pytest.mark.integration

USERS = ["app", "md5user", "pwuser", "trustuser"]


def connect_error(dsn: str) -> str:
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(dsn, connect_timeout=10)
    return str(exc.value)


def asyncpg_error(**kw) -> dict:
    async def go():
        try:
            conn = await asyncpg.connect(timeout=10, **kw)
        except asyncpg.PostgresError as exc:
            return exc.as_dict()
        await conn.close()
        return {}

    return asyncio.run(go())


def who(dsn: str) -> tuple:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_user, session_user, current_database(), pg_backend_pid()").fetchone()
        # The proxy hands out its own cancel secret but the real backend pid.
        assert conn.info.backend_pid == row[3]
        ssl = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
        return row[:3] + (ssl,)


# --- every method, plain TCP ---------------------------------------------------------------


@pytest.mark.parametrize("user", USERS)
def test_each_method_same_as_direct(pg, proxy, user):
    direct = who(pg.dsn(user))
    through = who(pg.dsn(user, host=proxy.host, port=proxy.port))
    assert through == direct == (user, user, user, False)


@pytest.mark.parametrize("user", USERS)
def test_each_method_with_psql(pg, proxy, user):
    args = ["-X", "-At", "-c", "SELECT current_user"]
    direct = subprocess.run(["psql", pg.dsn(user), *args], capture_output=True, text=True, timeout=30)
    through = subprocess.run(["psql", pg.dsn(user, host=proxy.host, port=proxy.port), *args],
                             capture_output=True, text=True, timeout=30)
    assert through.returncode == direct.returncode == 0, through.stderr
    assert through.stdout == direct.stdout == f"{user}\n"


@pytest.mark.parametrize("user", USERS)
def test_each_method_with_asyncpg(pg, proxy, user):
    async def go(port):
        password = next(u.password for u in pg.users if u.name == user)
        conn = await asyncpg.connect(host=pg.host, port=port, user=user, password=password, database=user)
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    assert asyncio.run(go(proxy.port)) == asyncio.run(go(pg.port)) == user


@pytest.mark.parametrize("user", ["app", "md5user", "pwuser"])
def test_wrong_password_is_28P01_as_direct(pg, proxy, user):
    direct = asyncpg_error(host=pg.host, port=pg.port, user=user, password="wrong", database=user)
    through = asyncpg_error(host=proxy.host, port=proxy.port, user=user, password="wrong", database=user)
    assert direct["sqlstate"] == "28P01"
    assert direct["severity"] == "FATAL"
    assert direct["message"] == f'password authentication failed for user "{user}"'
    assert through == direct  # every field, including the server's source location

    # libpq's text, with the port (which differs) taken out.
    d = connect_error(pg.dsn(user, password="wrong")).replace(str(pg.port), "PORT")
    t = connect_error(pg.dsn(user, host=proxy.host, port=proxy.port, password="wrong")).replace(str(proxy.port), "PORT")
    assert t == d
    assert "password authentication failed" in t


def test_unknown_role_and_database_as_direct(pg, proxy):
    for kw in ({"user": "nosuchrole", "password": "x", "database": "app"},
               {"user": "app", "password": "app-secret", "database": "nosuchdb"}):
        direct = asyncpg_error(host=pg.host, port=pg.port, **kw)
        through = asyncpg_error(host=proxy.host, port=proxy.port, **kw)
        assert through == direct
        assert direct["sqlstate"] in ("28P01", "3D000")


def test_no_password_supplied_as_direct(pg, proxy):
    d = connect_error(f"host={pg.host} port={pg.port} user=app dbname=app").replace(str(pg.port), "PORT")
    t = connect_error(f"host={proxy.host} port={proxy.port} user=app dbname=app").replace(str(proxy.port), "PORT")
    assert t == d
    assert "no password supplied" in t


def test_many_sequential_logins(pg, proxy):
    for i in range(20):
        user = USERS[i % len(USERS)]
        assert who(pg.dsn(user, host=proxy.host, port=proxy.port))[0] == user


# --- upstream TLS and SCRAM channel binding ---------------------------------------------------


@pytest.fixture(scope="module")
def proxy_up_tls(pg_tls):
    """A proxy that talks TLS to the TLS cluster; plain TCP to its clients."""
    p = ProxyProcess(pg_tls.address, *RELAY_ONLY, "--upstream-tls", "require").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def proxy_both_tls(pg_tls, tmp_path_factory):
    """TLS on both legs, the proxy with its own certificate (not the server's)."""
    crt, key = make_self_signed_cert(tmp_path_factory.mktemp("proxy-cert"))
    p = ProxyProcess(pg_tls.address, *RELAY_ONLY, "--upstream-tls", "require", "--tls-cert", str(crt), "--tls-key", str(key)).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def proxy_same_cert(pg_tls):
    """TLS on both legs, the proxy presenting PostgreSQL's own certificate and key."""
    p = ProxyProcess(pg_tls.address, *RELAY_ONLY, "--upstream-tls", "verify-full", "--upstream-tls-ca", str(pg_tls.cert),
                     "--tls-cert", str(pg_tls.cert), "--tls-key", str(pg_tls.data_dir / "server.key")).start()
    yield p
    p.stop()


def test_direct_tls_server_offers_channel_binding(pg_tls):
    # The baseline: directly, channel_binding=require works against the TLS cluster.
    assert who(pg_tls.dsn("app", sslmode="require", channel_binding="require")) == ("app", "app", "app", True)


@pytest.mark.parametrize("user", USERS)
def test_upstream_tls_channel_binding_prefer_works(pg_tls, proxy_up_tls, user):
    # SCRAM-SHA-256-PLUS is hidden by the proxy, so libpq's default
    # channel_binding=prefer settles on plain SCRAM-SHA-256.
    dsn = pg_tls.dsn(user, host=proxy_up_tls.host, port=proxy_up_tls.port, channel_binding="prefer")
    assert who(dsn) == (user, user, user, True)  # the upstream leg is encrypted


def test_upstream_tls_channel_binding_require_fails(pg_tls, proxy_up_tls):
    # Expected and unsupported: channel binding cannot pass through a proxy that
    # terminates TLS with another certificate. libpq refuses on its side.
    msg = connect_error(pg_tls.dsn("app", host=proxy_up_tls.host, port=proxy_up_tls.port,
                                   channel_binding="require"))
    assert "channel binding required" in msg


def test_client_tls_channel_binding_require_fails(pg_tls, proxy_both_tls):
    # Expected and unsupported: the client is on TLS, but the proxy does not offer
    # SCRAM-SHA-256-PLUS (its certificate is not the server's), so libpq gives up.
    msg = connect_error(pg_tls.dsn("app", host=proxy_both_tls.host, port=proxy_both_tls.port, sslmode="require",
                                   channel_binding="require"))
    assert "server did not offer an authentication method that supports channel binding" in msg


def test_client_tls_and_upstream_tls_scram_needs_channel_binding_disable(pg_tls, proxy_both_tls):
    """Known limitation: TLS on both legs with different certificates, SCRAM, and
    libpq's default channel_binding=prefer cannot work through any proxy that does
    not terminate authentication. libpq on TLS says "y" in the SCRAM gs2 header
    ("I support channel binding, the server seems not to"); PostgreSQL on TLS must
    then fail the login (downgrade protection), and the header is covered by the
    client proof, so the proxy cannot change it. The error is PostgreSQL's own.
    """
    dsn = pg_tls.dsn("app", host=proxy_both_tls.host, port=proxy_both_tls.port, sslmode="require")
    msg = connect_error(dsn + " channel_binding=prefer")
    assert "SCRAM channel binding negotiation error" in msg
    # What works: channel_binding=disable, or a non-SCRAM method.
    assert who(dsn + " channel_binding=disable") == ("app", "app", "app", True)
    for user in ("md5user", "pwuser", "trustuser"):
        dsn = pg_tls.dsn(user, host=proxy_both_tls.host, port=proxy_both_tls.port, sslmode="require")
        assert who(dsn) == (user, user, user, True)


@pytest.mark.parametrize("channel_binding", ["prefer", "require"])
def test_same_certificate_lets_channel_binding_through(pg_tls, proxy_same_cert, channel_binding):
    # tls-server-end-point binds to the hash of the server certificate; when the
    # proxy presents PostgreSQL's own certificate, the binding holds end to end
    # and the proxy passes SCRAM-SHA-256-PLUS through.
    dsn = pg_tls.dsn("app", host="localhost", port=proxy_same_cert.port, sslmode="verify-full",
                     sslrootcert=str(pg_tls.cert), channel_binding=channel_binding)
    assert who(dsn) == ("app", "app", "app", True)


def test_upstream_tls_wrong_password_as_direct(pg_tls, proxy_up_tls):
    direct = asyncpg_error(host=pg_tls.host, port=pg_tls.port, user="app", password="wrong", database="app",
                           ssl="require")
    through = asyncpg_error(host=proxy_up_tls.host, port=proxy_up_tls.port, user="app", password="wrong",
                            database="app", ssl="disable")
    assert direct["sqlstate"] == "28P01"
    assert through == direct
