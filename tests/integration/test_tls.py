"""TLS on both legs: clients to the proxy (--tls-cert/--tls-key, --client-tls-required)
and the proxy to PostgreSQL (--upstream-tls require/verify-full), checked with psql,
psycopg and asyncpg, and on the server side through pg_stat_ssl."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import urllib.request

import asyncpg
import psycopg
import pytest

from proxy.devtools.cluster import make_self_signed_cert
from proxy.devtools.process import RELAY_ONLY, ProxyProcess
from tests.support.enforce import POLICY_DIR
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for the proxy (SAN localhost and 127.0.0.1)."""
    return make_self_signed_cert(tmp_path_factory.mktemp("proxy-tls"))


@pytest.fixture(scope="module")
def other_cert(tmp_path_factory):
    """An unrelated self-signed certificate, to play a wrong CA."""
    return make_self_signed_cert(tmp_path_factory.mktemp("other-tls"))


@pytest.fixture(scope="module")
def proxy_tls(pg, cert):
    crt, key = cert
    p = ProxyProcess(pg.address, *RELAY_ONLY, "--tls-cert", str(crt), "--tls-key", str(key)).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def proxy_tls_required(pg, cert):
    crt, key = cert
    p = ProxyProcess(pg.address, *RELAY_ONLY, "--tls-cert", str(crt), "--tls-key", str(key), "--client-tls-required").start()
    yield p
    p.stop()


def psql(dsn: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", dsn, "-X", "-At", "-c", sql], capture_output=True, text=True, timeout=60)


def client_dsns(pg, proxy, crt, user="app"):
    return {
        "require": pg.dsn(user, host=proxy.host, port=proxy.port, sslmode="require"),
        "verify-full": pg.dsn(user, host="localhost", port=proxy.port, sslmode="verify-full", sslrootcert=str(crt)),
        "verify-full-ip": pg.dsn(user, host="127.0.0.1", port=proxy.port, sslmode="verify-full",
                                 sslrootcert=str(crt)),
    }


# --- client-facing TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["require", "verify-full", "verify-full-ip"])
def test_psql_over_tls(pg, proxy_tls, cert, mode):
    dsn = client_dsns(pg, proxy_tls, cert[0])[mode]
    r = psql(dsn, "SELECT 1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1\n"
    info = subprocess.run(["psql", dsn, "-X", "-c", "\\conninfo"], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "SSL connection (protocol: TLSv1." in info.stdout


@pytest.mark.parametrize("mode", ["require", "verify-full", "verify-full-ip"])
@pytest.mark.parametrize("user", ["app", "md5user", "pwuser", "trustuser"])
def test_psycopg_over_tls(pg, proxy_tls, cert, mode, user):
    dsn = client_dsns(pg, proxy_tls, cert[0], user)[mode]
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_user, %s::int", (7,)).fetchone() == (user, 7)
        # The upstream leg is plain TCP in this setup.
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)
        # Something bigger than a TLS record, both ways.
        big = "x" * 200_000
        assert conn.execute("SELECT length(%s::text), md5(%s::text)", (big, big)).fetchone()[0] == 200_000
        rows = conn.execute("SELECT repeat('y', 1000) FROM generate_series(1, 2000)").fetchall()
        assert len(rows) == 2000


def test_verify_full_with_the_wrong_ca_fails(pg, proxy_tls, other_cert):
    dsn = pg.dsn("app", host="localhost", port=proxy_tls.port, sslmode="verify-full", sslrootcert=str(other_cert[0]))
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(dsn, connect_timeout=10)
    assert "certificate verify failed" in str(exc.value)


def test_failed_client_handshake_is_not_an_internal_error(pg, cert, other_cert, start_proxy):
    # A client that rejects the proxy's certificate aborts the handshake. The proxy
    # must log that plainly and drop the connection, not report an internal error
    # (or try to write a plaintext FATAL into the dead TLS connection).
    crt, key = cert
    p = start_proxy("--tls-cert", str(crt), "--tls-key", str(key), "--max-client-connections", "1")
    bad = pg.dsn("app", host="localhost", port=p.port, sslmode="verify-full", sslrootcert=str(other_cert[0]))
    for _ in range(3):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(bad, connect_timeout=10)
    good = pg.dsn("app", host="localhost", port=p.port, sslmode="verify-full", sslrootcert=str(crt))
    with psycopg.connect(good, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert p.stop() == 0
    log = p.log()
    assert log.count("client TLS handshake failed") == 3, log
    assert "Traceback" not in log and "internal error" not in log, log


def test_verify_full_with_the_wrong_host_name_fails(pg, proxy_tls, cert):
    # The certificate covers localhost and 127.0.0.1, not ::1 or other names.
    dsn = pg.dsn("app", host="127.0.0.1", hostaddr="127.0.0.1", port=proxy_tls.port, sslmode="verify-full",
                 sslrootcert=str(cert[0]))
    with psycopg.connect(dsn, connect_timeout=10) as conn:  # sanity: IP SAN matches
        assert conn.execute("SELECT 1").fetchone() == (1,)
    dsn = pg.dsn("app", host="not-the-name.invalid", hostaddr="127.0.0.1", port=proxy_tls.port,
                 sslmode="verify-full", sslrootcert=str(cert[0]))
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(dsn, connect_timeout=10)
    assert "does not match host name" in str(exc.value)


def test_plain_client_still_allowed_without_client_tls_required(pg, proxy_tls):
    with psycopg.connect(pg.dsn("app", host=proxy_tls.host, port=proxy_tls.port, sslmode="disable")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # sslmode=prefer (libpq's default) takes TLS when the proxy offers it.
    with psycopg.connect(pg.dsn("app", host=proxy_tls.host, port=proxy_tls.port, sslmode="prefer")) as conn:
        assert conn.pgconn.ssl_in_use


def test_proxy_without_tls_declines_ssl_request(pg, proxy):
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port, sslmode="prefer")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port, sslmode="require"), connect_timeout=10)
    assert "server does not support SSL" in str(exc.value)


def test_client_tls_required_refuses_plain_client_with_28000(pg, proxy_tls_required, cert):
    async def plain():
        try:
            conn = await asyncpg.connect(host=proxy_tls_required.host, port=proxy_tls_required.port, user="app",
                                         password="app-secret", database="app", ssl=False, timeout=10)
        except asyncpg.PostgresError as exc:
            return exc.as_dict()
        await conn.close()
        return {}

    err = asyncio.run(plain())
    assert err["sqlstate"] == "28000"
    assert err["severity"] == "FATAL"
    assert "requires TLS" in err["message"]

    r = psql(pg.dsn("app", host=proxy_tls_required.host, port=proxy_tls_required.port, sslmode="disable"), "SELECT 1")
    assert r.returncode == 2
    assert "FATAL:  purpose-proxy requires TLS" in r.stderr

    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(pg.dsn("app", host=proxy_tls_required.host, port=proxy_tls_required.port, sslmode="disable"),
                        connect_timeout=10)
    assert "requires TLS" in str(exc.value)

    # A TLS client gets in.
    for dsn in client_dsns(pg, proxy_tls_required, cert[0]).values():
        r = psql(dsn, "SELECT 1")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "1\n"


def test_asyncpg_over_tls(pg, proxy_tls, cert):
    crt = cert[0]

    async def go(host, ssl_arg):
        conn = await asyncpg.connect(host=host, port=proxy_tls.port, user="app", password="app-secret",
                                     database="app", ssl=ssl_arg, timeout=10)
        try:
            assert conn.get_settings() is not None
            one = await conn.fetchval("SELECT 1")
            row = await conn.fetchrow("SELECT $1::int + 1 AS n, $2::text AS t", 41, "tls")
            stmt = await conn.prepare("SELECT g FROM generate_series(1, $1) g")
            rows = await stmt.fetch(3000)
            in_tls = conn._transport.get_extra_info("ssl_object") is not None
            return one, tuple(row), len(rows), in_tls
        finally:
            await conn.close()

    verify = ssl.create_default_context(cafile=str(crt))
    assert asyncio.run(go("localhost", verify)) == (1, (42, "tls"), 3000, True)
    assert asyncio.run(go("127.0.0.1", "require")) == (1, (42, "tls"), 3000, True)
    wrong = ssl.create_default_context()  # system CAs: the self-signed cert is not trusted
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(go("localhost", wrong))


# --- upstream TLS ---------------------------------------------------------------------------------


def server_ssl_row(conn) -> tuple:
    return conn.execute("SELECT ssl, version IS NOT NULL, cipher IS NOT NULL FROM pg_stat_ssl "
                        "WHERE pid = pg_backend_pid()").fetchone()


@pytest.mark.parametrize("mode", ["require", "verify-full"])
def test_upstream_tls(pg_tls, start_proxy, mode):
    args = ["--upstream-tls", mode]
    if mode == "verify-full":
        args += ["--upstream-tls-ca", str(pg_tls.cert)]
    p = start_proxy(*args, upstream=pg_tls.address)
    for user in ("app", "md5user", "pwuser", "trustuser"):
        with psycopg.connect(pg_tls.dsn(user, host=p.host, port=p.port, sslmode="disable")) as conn:
            assert not conn.pgconn.ssl_in_use  # client leg plain
            assert conn.execute("SELECT current_user").fetchone() == (user,)
            assert server_ssl_row(conn) == (True, True, True)  # upstream leg encrypted
            pid = conn.info.backend_pid
            # Seen from another session, by pid, as a superuser would.
            seen = pg_tls.psql_admin(f"SELECT ssl FROM pg_stat_ssl WHERE pid = {pid}")
            assert seen == "t\n"
            rows = conn.execute("SELECT repeat('z', 5000) FROM generate_series(1, 1000)").fetchall()
            assert len(rows) == 1000
    r = psql(pg_tls.dsn("app", host=p.host, port=p.port), "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "t\n"


def test_upstream_verify_full_with_wrong_ca_fails(pg_tls, start_proxy, other_cert):
    p = start_proxy("--upstream-tls", "verify-full", "--upstream-tls-ca", str(other_cert[0]), upstream=pg_tls.address)
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(pg_tls.dsn("app", host=p.host, port=p.port), connect_timeout=10)
    msg = str(exc.value)
    assert "could not connect to the upstream PostgreSQL server" in msg
    assert "CERTIFICATE_VERIFY_FAILED" in msg or "certificate verify failed" in msg


def test_upstream_tls_require_against_plain_server_fails(pg, start_proxy):
    p = start_proxy("--upstream-tls", "require")
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(pg.dsn("app", host=p.host, port=p.port), connect_timeout=10)
    assert "does not support TLS" in str(exc.value)


def test_upstream_tls_require_with_a_ca_verifies_the_chain(pg_tls, start_proxy, other_cert):
    """Hunt 23: --upstream-tls-ca was ignored unless the mode was verify-full; libpq's require verifies the chain
    when given a root certificate, and so does the proxy now."""
    p = start_proxy("--upstream-tls", "require", "--upstream-tls-ca", str(other_cert[0]), upstream=pg_tls.address)
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(pg_tls.dsn("app", host=p.host, port=p.port), connect_timeout=10)
    assert "CERTIFICATE_VERIFY_FAILED" in str(exc.value) or "certificate verify failed" in str(exc.value)


def test_unencrypted_bytes_after_the_upstream_ssl_answer_end_the_connection(start_proxy):
    """Hunt 23: a man in the middle answered the proxy's SSLRequest with "S" and, before the handshake, a plain
    AuthenticationOk and a result; the proxy relayed them to its client as the server's (CVE-2021-23222)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def fake_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(8)  # SSLRequest
            conn.sendall(b"S" + b"R\x00\x00\x00\x08\x00\x00\x00\x00" + b"Z\x00\x00\x00\x05I")
            conn.recv(1)

    server = threading.Thread(target=fake_server, name="fake-upstream", daemon=True)
    server.start()
    try:
        p = start_proxy("--upstream-tls", "require", upstream=f"127.0.0.1:{port}")
        with pytest.raises(psycopg.OperationalError) as exc:
            psycopg.connect(f"host={p.host} port={p.port} user=app dbname=app password=x sslmode=disable",
                            connect_timeout=10)
        assert "received unencrypted data after the upstream server's SSL response" in str(exc.value)
    finally:
        server.join(10)
        listener.close()


def test_upstream_tls_prefer(pg, pg_tls, start_proxy):
    plain = start_proxy("--upstream-tls", "prefer")
    with psycopg.connect(pg.dsn("app", host=plain.host, port=plain.port)) as conn:
        assert server_ssl_row(conn) == (False, False, False)
    assert "refused TLS" in plain.log()  # (a server that refuses TLS may be a man in the middle: said, and counted)
    tls = start_proxy("--upstream-tls", "prefer", upstream=pg_tls.address)
    with psycopg.connect(pg_tls.dsn("app", host=tls.host, port=tls.port, sslmode="disable")) as conn:
        assert server_ssl_row(conn) == (True, True, True)


def test_tls_on_both_legs(pg_tls, cert, start_proxy):
    crt, key = cert
    p = start_proxy("--tls-cert", str(crt), "--tls-key", str(key), "--client-tls-required",
                    "--upstream-tls", "verify-full", "--upstream-tls-ca", str(pg_tls.cert), upstream=pg_tls.address)
    # md5 and password: no SCRAM channel-binding questions (see test_auth for SCRAM).
    for user in ("md5user", "pwuser", "trustuser"):
        dsn = pg_tls.dsn(user, host="localhost", port=p.port, sslmode="verify-full", sslrootcert=str(crt))
        with psycopg.connect(dsn) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT current_user").fetchone() == (user,)
            assert server_ssl_row(conn) == (True, True, True)
    dsn = pg_tls.dsn("app", host="localhost", port=p.port, sslmode="verify-full", sslrootcert=str(crt),
                     channel_binding="disable")
    with psycopg.connect(dsn) as conn:
        assert server_ssl_row(conn) == (True, True, True)
    # Large output over both legs (TLS records, backpressure), same bytes as direct.
    query = "SELECT g, md5(g::text), repeat('w', g % 300) FROM generate_series(1, 60000) g"
    through = psql(dsn, query)
    direct = psql(pg_tls.dsn("md5user", sslmode="require"), query)
    assert through.returncode == direct.returncode == 0, through.stderr
    assert len(through.stdout) > 10_000_000
    assert through.stdout == direct.stdout
    # COPY both ways over both TLS legs.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE t(v text)")
        with conn.cursor().copy("COPY t FROM STDIN") as copy:
            for i in range(5000):
                copy.write_row((f"row {i} " * 20,))
        with conn.cursor().copy("COPY t TO STDOUT") as copy:
            n = sum(1 for _ in copy.rows())
        assert n == 5000


def test_sighup_rereads_rotated_certificates(pg, start_proxy, tmp_path):
    """A certificate is rotated in place (new files, same paths) and SIGHUP puts it in force for new
    connections; a pair caught half copied (new certificate, old key) is refused and the old pair stays;
    sessions already open keep theirs. Counted in purpose_proxy_tls_reloads_total."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first, second = make_self_signed_cert(tmp_path / "first"), make_self_signed_cert(tmp_path / "second")
    crt, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    shutil.copy(first[0], crt)
    shutil.copy(first[1], key)
    p = start_proxy("--tls-cert", str(crt), "--tls-key", str(key))

    def connect(ca):
        return psycopg.connect(pg.dsn("app", host="localhost", port=p.port, sslmode="verify-full",
                                      sslrootcert=str(ca)), connect_timeout=10)

    def reloads(result):
        text = urllib.request.urlopen(p.metrics_url + "/metrics", timeout=10).read().decode()
        return float(re.search(rf'^purpose_proxy_tls_reloads_total{{result="{result}"}} (\S+)$', text, re.M).group(1))

    with connect(first[0]) as held:
        shutil.copy(second[0], crt)  # the key not yet: the pair does not match
        p.signal(signal.SIGHUP)
        wait_for(lambda: "TLS files not reloaded" in p.log(), 10, "the half-copied pair to be refused")
        assert "KEY_VALUES_MISMATCH" in p.log() or "key values mismatch" in p.log(), p.log()
        with connect(first[0]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        shutil.copy(second[1], key)
        p.signal(signal.SIGHUP)
        wait_for(lambda: "TLS files reloaded" in p.log(), 10, "the rotated pair to be read")
        with connect(second[0]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError) as exc:
            connect(first[0])
        assert "certificate verify failed" in str(exc.value)
        assert held.execute("SELECT 2").fetchone() == (2,)  # the open session is undisturbed
    assert (reloads("failure"), reloads("success")) == (1, 1)


# --- the proxy's own catalog connections (schema_dsn) ----------------------------------------------------------


def test_catalog_connections_follow_upstream_tls(pg, pg_tls, start_proxy):
    """The connections that read the schema decide what every statement is analysed against; they followed
    asyncpg's default (prefer) whatever upstream_tls said, so a plain server (or a man in the middle who
    declines TLS) fed them a schema under upstream_tls = verify-full. Here the schema DSN names the plain
    cluster: under verify-full that load fails and statements are refused; the DSN's own sslmode wins."""
    tls_args = ("--decider", "purpose", "--policies", str(POLICY_DIR), "--policy-watch-interval", "0",
                "--upstream-tls", "verify-full", "--upstream-tls-ca", str(pg_tls.cert))
    plain_catalog = pg.url("postgres", dbname="postgres")
    dsn = pg_tls.dsn("app", dbname="postgres", sslmode="disable")

    strict = start_proxy(*tls_args, "--schema-dsn", plain_catalog, upstream=pg_tls.address)
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(dsn, host=strict.host, port=strict.port, options="-c pii.purpose=billing")
    assert 'could not read the schema of database "postgres"' in str(exc.value)
    log = strict.log_path.read_text()
    assert "SSL" in log, log[-2000:]

    explicit = start_proxy(*tls_args, "--schema-dsn", plain_catalog + "?sslmode=disable", upstream=pg_tls.address)
    with psycopg.connect(dsn, host=explicit.host, port=explicit.port, autocommit=True,
                         options="-c pii.purpose=billing") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server_ssl_row(conn) == (True, True, True)  # the client's own statements still go over TLS
