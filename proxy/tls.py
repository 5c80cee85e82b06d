"""Building TLS contexts from the configuration happens here: the client leg's, the upstream leg's, and that of
the proxy's own catalog connections."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from urllib.parse import parse_qs, urlsplit

from proxy.config import Config, is_unix_dir, parse_hostport

log = logging.getLogger("proxy.listener")


def client_tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    key = config.tls_key or config.tls_cert
    if os.stat(key).st_mode & 0o077:  # PostgreSQL refuses to start with such a key (be-secure-openssl.c)
        log.warning("the TLS private key %s can be read by its group or others: it should be mode 0600", key)
    return ctx


def warn_about_transport(config: Config) -> None:
    """Say so at startup when clients' TLS ends at the proxy and the upstream leg is plain TCP to another host:
    passwords and results then cross it in clear, though the clients asked for encryption; and when the
    schema connections are told to use weaker TLS than the upstream leg (``catalog_tls_warning``)."""
    weaker = catalog_tls_warning(config, os.environ)
    if weaker is not None:
        log.warning("%s", weaker)
    upstream = config.upstream
    if not config.tls_cert or config.upstream_tls != "disable" or is_unix_dir(upstream):
        return
    host = parse_hostport(upstream, "upstream")[0]
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("client connections use TLS but upstream_tls is disable: passwords and results cross the "
                    "connection to %s unencrypted (set upstream_tls = verify-full)", upstream)


def leaf_certificate_der(path: str | None) -> bytes | None:
    """The first certificate of a PEM file, DER-encoded (what a TLS peer receives)."""
    if not path:
        return None
    with open(path) as f:
        pem = f.read()
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end_marker = "-----END CERTIFICATE-----"
    end = pem.find(end_marker, begin)
    if begin < 0 or end < 0:
        return None
    return ssl.PEM_cert_to_DER_cert(pem[begin : end + len(end_marker)])


def upstream_tls_context(config: Config) -> ssl.SSLContext | None:
    mode = config.upstream_tls
    if mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode == "verify-full":
        ctx.load_verify_locations(config.upstream_tls_ca)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif config.upstream_tls_ca:
        # prefer / require with a CA: verify the chain, not the name, as libpq's require does when
        # given a root certificate (it behaves as verify-ca); the CA was silently ignored (hunt 23).
        ctx.load_verify_locations(config.upstream_tls_ca)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:  # prefer / require: encrypt, do not verify (libpq's sslmode=require)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_contexts(config: Config) -> tuple[ssl.SSLContext | None, bytes | None, ssl.SSLContext | None]:
    """The client-side TLS context, the certificate it presents (DER), and the upstream TLS context, read from
    the configured files (at start, and again on SIGHUP)."""
    return client_tls_context(config), leaf_certificate_der(config.tls_cert), upstream_tls_context(config)


def catalog_tls(config: Config, dsn: str) -> ssl.SSLContext | None:
    """The TLS of the proxy's own catalog connections (``schema_dsn``): upstream_tls's, unless the DSN says.

    What these connections read decides what every statement is analysed against (tables,
    views, search_path, role settings): a man in the middle of them could make a table of
    card numbers look like another. They followed asyncpg's default (prefer: encrypt if the
    server agrees, verify nothing) even where the operator had asked require or verify-full
    of the upstream leg. Now require and verify-full (with upstream_tls_ca) apply to them
    too. The DSN's own ``sslmode`` wins, and so does PGSSLMODE. Under prefer, asyncpg's
    default stays. A unix-socket DSN gets no TLS either way (asyncpg uses none there).
    Only ``sslmode`` is the DSN's say: asyncpg sends every query parameter it does not know
    (``ssl=true`` among them) to the server as a setting, so exempting those fell back to
    prefer, which an impostor that declines TLS satisfies (a real server refuses the setting).

    >>> catalog_tls(Config(upstream_tls="require"), "postgresql://reader@db/postgres").verify_mode.name
    'CERT_NONE'
    >>> catalog_tls(Config(upstream_tls="require"), "postgresql://reader@db/postgres?sslmode=disable") is None
    True
    >>> catalog_tls(Config(upstream_tls="prefer"), "postgresql://reader@db/postgres") is None
    True
    >>> catalog_tls(Config(upstream_tls="require"), "postgresql://reader@db/postgres?ssl=false").verify_mode.name
    'CERT_NONE'
    """
    if config.upstream_tls not in ("require", "verify-full") or os.environ.get("PGSSLMODE"):
        return None
    if _dsn_sslmode(dsn) is not None:
        return None
    return upstream_tls_context(config)


# libpq's sslmode values, weakest first (34.19 "SSL Support", Table 34.1).
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _dsn_sslmode(dsn: str) -> str | None:
    """The sslmode a URL DSN names, if any (asyncpg's own reading: urllib's, the last value wins).

    >>> _dsn_sslmode("postgresql://r@db/x?sslmode=prefer&sslmode=disable"), _dsn_sslmode("postgresql://r@db/x")
    ('disable', None)
    """
    values = parse_qs(urlsplit(dsn).query).get("sslmode")
    return values[-1] if values else None


def catalog_tls_warning(config: Config, environ: Mapping[str, str]) -> str | None:
    """What to say at startup when the schema connections will be less protected than upstream_tls asks of
    the upstream leg: PGSSLMODE in the proxy's environment, or schema_dsn's own sslmode, names a weaker
    mode (``catalog_tls`` lets either decide). None when nothing is weaker.

    >>> cfg = Config(upstream_tls="verify-full", upstream_tls_ca="ca.pem", schema_dsn="postgresql://r@db/x")
    >>> catalog_tls_warning(cfg, {"PGSSLMODE": "prefer"})[:60]
    'PGSSLMODE=prefer in the environment decides the TLS of the p'
    >>> catalog_tls_warning(cfg, {}) is None, catalog_tls_warning(Config(upstream_tls="prefer"), {"PGSSLMODE": "disable"})
    (True, None)
    """
    wanted = config.upstream_tls
    if wanted not in ("require", "verify-full") or not config.schema_dsn:
        return None
    env = environ.get("PGSSLMODE")
    mode, where = (env, "PGSSLMODE={} in the environment") if env else (
        _dsn_sslmode(config.schema_dsn), "schema_dsn's sslmode={}")
    if mode is None or mode not in _SSLMODES or _SSLMODES.index(mode) >= _SSLMODES.index(wanted):
        return None
    return (f"{where.format(mode)} decides the TLS of the proxy's schema connections, which is weaker than "
            f"upstream_tls = {wanted}: the schema every statement is analysed against can be read or changed "
            f"in transit")
