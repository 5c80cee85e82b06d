"""Building TLS contexts from the configuration happens here: the client leg's, the upstream leg's, and that of
the proxy's own catalog connections."""

from __future__ import annotations

import logging
import os
import ssl
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
    passwords and results then cross it in clear, though the clients asked for encryption."""
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
    if "sslmode" in parse_qs(urlsplit(dsn).query):  # (asyncpg's own reading: urllib's, the last value wins)
        return None
    return upstream_tls_context(config)
