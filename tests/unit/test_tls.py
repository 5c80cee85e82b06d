"""TLS contexts built from the configuration (proxy.tls), without a network: the catalog connections' choice."""

from __future__ import annotations

import doctest
import ssl

from proxy import tls
from proxy.config import Config
from proxy.devtools.cluster import make_self_signed_cert

DSN = "postgresql://reader:secret@db.internal:5432/postgres"


def test_doctests():
    result = doctest.testmod(tls)
    assert result.attempted > 0 and result.failed == 0


def test_catalog_connections_verify_as_the_upstream_leg_does(tmp_path):
    crt, _key = make_self_signed_cert(tmp_path)
    ctx = tls.catalog_tls(Config(upstream_tls="verify-full", upstream_tls_ca=str(crt)), DSN)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    ctx = tls.catalog_tls(Config(upstream_tls="require", upstream_tls_ca=str(crt)), DSN)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname  # the chain, as libpq's require with a CA


def test_the_dsn_or_the_environment_decides_first(monkeypatch):
    strict = Config(upstream_tls="require")
    assert tls.catalog_tls(strict, DSN + "?sslmode=verify-full&sslrootcert=/etc/ca.pem") is None
    # asyncpg reads no ``ssl`` from a DSN (it would send it to the server as a setting): upstream_tls still applies
    assert tls.catalog_tls(strict, DSN + "?ssl=true").verify_mode == ssl.CERT_NONE
    assert tls.catalog_tls(strict, DSN + "?ssl=false&application_name=x").verify_mode == ssl.CERT_NONE
    assert tls.catalog_tls(Config(upstream_tls="disable"), DSN) is None
    monkeypatch.setenv("PGSSLMODE", "disable")
    assert tls.catalog_tls(strict, DSN) is None


def test_startup_says_when_the_schema_connections_get_weaker_tls(monkeypatch, caplog):
    """PGSSLMODE in the proxy's environment, or schema_dsn's own sslmode, decides the schema connections' TLS
    (``catalog_tls``); one weaker than upstream_tls is said at startup (hunt 33)."""
    config = Config(upstream_tls="require", schema_dsn=DSN + "?sslmode=prefer")
    with caplog.at_level("WARNING", logger="proxy.listener"):
        tls.warn_about_transport(config)
    assert "schema_dsn's sslmode=prefer decides the TLS of the proxy's schema connections" in caplog.text
    caplog.clear()
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    with caplog.at_level("WARNING", logger="proxy.listener"):
        tls.warn_about_transport(config)  # the environment's mode decides, and it is not weaker
    assert caplog.text == ""
