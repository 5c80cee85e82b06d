"""The keyed pseudonym function the ``hash`` mask calls, and ``purpose-proxy install``, which puts it in a database.

``purpose_proxy.pseudonym(text)`` is HMAC-SHA-256 (first 128 bits, hex) of its
argument under a key that lives only in the table ``purpose_proxy.pseudonym_key``:
the same value gives the same pseudonym for as long as the key stays, a different
key gives unrelated ones. The key is generated inside PostgreSQL from
``gen_random_uuid()`` (a strong random source) and stored as HMAC's two padded
forms, so it never appears in any statement text (``pg_stat_activity``, server
logs, the proxy's traces and audit records show only these statements). The table
is readable by its owner alone; the function runs with its owner's rights
(SECURITY DEFINER, fixed search_path) and is the only way to use the key.

Through the proxy, clients cannot call the function themselves (it is not
declared in the policy catalog, so statements naming it are refused): they could
otherwise compute the pseudonyms of guessed values.
"""

from __future__ import annotations

import asyncio

from proxy.enforcement.masks import PSEUDONYM_FUNCTION

SCHEMA = PSEUDONYM_FUNCTION.partition(".")[0]
KEY_TABLE = f"{SCHEMA}.pseudonym_key"

# 64 random bytes (4 x 122 random bits of version-4 UUIDs) and HMAC's inner (0x36) and
# outer (0x5c) pads of it, all computed by the server.
_NEW_KEY = f"""
WITH k AS (
    SELECT pg_catalog.uuid_send(pg_catalog.gen_random_uuid()) || pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
        || pg_catalog.uuid_send(pg_catalog.gen_random_uuid()) || pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
        AS key)
INSERT INTO {KEY_TABLE} (id, inner_pad, outer_pad)
SELECT 1,
       pg_catalog.decode((SELECT pg_catalog.string_agg(pg_catalog.lpad(pg_catalog.to_hex(
           pg_catalog.get_byte(k.key, i) # 54), 2, '0'), '' ORDER BY i)
             FROM pg_catalog.generate_series(0, 63) i), 'hex'),
       pg_catalog.decode((SELECT pg_catalog.string_agg(pg_catalog.lpad(pg_catalog.to_hex(
           pg_catalog.get_byte(k.key, i) # 92), 2, '0'), '' ORDER BY i)
             FROM pg_catalog.generate_series(0, 63) i), 'hex')
  FROM k
"""

SETUP = [
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC",
    f"""CREATE TABLE IF NOT EXISTS {KEY_TABLE} (
        id integer PRIMARY KEY CHECK (id = 1),
        inner_pad bytea NOT NULL CHECK (pg_catalog.length(inner_pad) = 64),
        outer_pad bytea NOT NULL CHECK (pg_catalog.length(outer_pad) = 64),
        created_at timestamptz NOT NULL DEFAULT pg_catalog.now())""",
    f"REVOKE ALL ON {KEY_TABLE} FROM PUBLIC",
]

FUNCTION = f"""
CREATE OR REPLACE FUNCTION {PSEUDONYM_FUNCTION}(value text) RETURNS text
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT pg_catalog.substr(pg_catalog.encode(pg_catalog.sha256(k.outer_pad OPERATOR(pg_catalog.||)
               pg_catalog.sha256(k.inner_pad OPERATOR(pg_catalog.||) pg_catalog.convert_to(value, 'UTF8'))), 'hex'),
           1, 32)
      FROM {KEY_TABLE} AS k
     WHERE k.id OPERATOR(pg_catalog.=) 1
$fn$
"""


def install_statements(rotate: bool = False, grant: tuple[str, ...] = ()) -> list[str]:
    """The statements ``purpose-proxy install`` runs, in one transaction (none holds key material).

    >>> stmts = install_statements(grant=("app",))
    >>> stmts[0], stmts[-1]
    ('CREATE SCHEMA IF NOT EXISTS purpose_proxy', 'GRANT EXECUTE ON FUNCTION purpose_proxy.pseudonym(text) TO app')
    >>> any("DO UPDATE" in s for s in install_statements(rotate=True))
    True
    """
    from proxy.analysis.schema import quote_ident

    conflict = ("ON CONFLICT (id) DO UPDATE SET inner_pad = EXCLUDED.inner_pad, outer_pad = EXCLUDED.outer_pad, "
                "created_at = pg_catalog.now()") if rotate else "ON CONFLICT (id) DO NOTHING"
    grantees = ", ".join(quote_ident(g) for g in grant) if grant else "PUBLIC"
    return SETUP + [
        _NEW_KEY + conflict,
        FUNCTION,
        f"REVOKE ALL ON FUNCTION {PSEUDONYM_FUNCTION}(text) FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA {SCHEMA} TO {grantees}",
        f"GRANT EXECUTE ON FUNCTION {PSEUDONYM_FUNCTION}(text) TO {grantees}",
    ]


async def install(dsn: str, rotate: bool = False, grant: tuple[str, ...] = (), timeout: float = 10.0) -> str:
    """Create (or update) the pseudonym function and its key in the database of ``dsn``; a one-line report."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=timeout)
    try:
        async with conn.transaction():
            had_key = await conn.fetchval(f"SELECT pg_catalog.to_regclass('{KEY_TABLE}') IS NOT NULL")
            if had_key:
                had_key = await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {KEY_TABLE})")
            for statement in install_statements(rotate, grant):
                await conn.execute(statement)
            database = await conn.fetchval("SELECT pg_catalog.current_database()")
            owner = await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()
    key = "rotated" if rotate and had_key else ("kept" if had_key else "created")
    who = ", ".join(grant) if grant else "every role (PUBLIC)"
    return (f"installed {PSEUDONYM_FUNCTION}(text) in database {database} (owner {owner}; key {key}; "
            f"executable by {who})")


def run(args) -> int:
    """``purpose-proxy install``."""
    import sys

    try:
        print(asyncio.run(install(args.dsn, args.rotate_key, tuple(args.grant or ()))))
    except Exception as exc:  # connection or permission problems: say so, exit 1
        print(f"purpose-proxy install: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
