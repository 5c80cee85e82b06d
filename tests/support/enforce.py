"""Helpers for the enforcement tests: the test schema and policy, canaries, and running SQL
through real clients while recording everything that comes back.

The fixture schema (tests/fixtures/enforce/schema.sql) stores in every personal column
values that are easy to find in any output: ``CANARIES`` maps each category to a pattern.
``run_psycopg``, ``run_asyncpg`` and ``run_psql`` run statements through a real client and
return an ``Outcome`` that holds every piece of text the server (or the proxy) sent:
rows, column names, COPY data, error fields and notices. ``Outcome.leaks(categories)``
names the canaries found in it.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "enforce"
SCHEMA_SQL = FIXTURES / "schema.sql"
POLICY_DIR = FIXTURES / "policies"
BYPASS_YAML = FIXTURES / "bypass.yaml"
LEGIT_YAML = FIXTURES / "legit.yaml"

# SQLSTATEs of the proxy's refusals.
REFUSAL_STATES = frozenset({"42501", "25001", "0A000", "26000"})

# Category -> what its values look like anywhere (case-insensitive, separators optional).
CANARIES: dict[str, re.Pattern[str]] = {
    "identity.name": re.compile(r"canary\W?_?name", re.I),
    "identity.birth_date": re.compile(r"1911"),
    "contact.email": re.compile(r"canary\W?_?email", re.I),
    "contact.phone": re.compile(r"canary\W?_?phone", re.I),
    "contact.postal": re.compile(r"canary\W?_?postal", re.I),
    "payment.card": re.compile(r"canary\W?_?card|2077", re.I),
    "payment.invoice": re.compile(r"777\d\d|2055"),
}
# "CANARY" hex-encoded, and base64 of "CANARY-" at its three alignments: an encoded copy
# of any canary is a leak too.
ENCODED_CANARY = re.compile(r"43414e415259|Q0FOQVJZ|NBTkFSW|DQU5BUl", re.I)


def load_attempts() -> list[dict]:
    return yaml.safe_load(BYPASS_YAML.read_text())["attempts"]


def load_legit() -> list[dict]:
    return yaml.safe_load(LEGIT_YAML.read_text())["statements"]


def load_policy():
    from proxy.policy.engine import Policy

    return Policy.load(POLICY_DIR)


def denied_categories(policy, role: str, purpose: str | None) -> set[str]:
    """The canary categories ``role`` may not read in full under ``purpose`` (None: no purpose)."""
    out = set()
    for cat in CANARIES:
        if purpose is None:
            out.add(cat)
            continue
        d = policy.decide(role, purpose, cat, "read")
        if d.effect != "allow":
            out.add(cat)
    return out


def purpose_options(purpose: str | None) -> dict[str, str]:
    return {} if purpose is None else {"options": f"'-c pii.purpose={purpose}'"}


@dataclass
class Outcome:
    """Everything one client saw for one statement (or one Query with several)."""

    mode: str
    columns: list[str] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)
    copy: bytes = b""
    errors: list[dict[str, str | None]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    raw: str = ""  # psql: its whole output

    @property
    def error(self) -> dict[str, str | None] | None:
        return self.errors[-1] if self.errors else None

    @property
    def refused(self) -> bool:
        """The last error is a refusal by the proxy (PostgreSQL's own errors name a source file)."""
        e = self.error
        return bool(e) and e.get("sqlstate") in REFUSAL_STATES and not e.get("source")

    def text(self) -> str:
        parts = [repr(self.columns), repr(self.rows), self.copy.decode("utf-8", "replace"), self.raw]
        parts += [repr(e) for e in self.errors] + list(self.notices)
        return "\n".join(parts)

    def leaks(self, categories: Iterable[str]) -> list[str]:
        text = self.text()
        found = [f"{cat}: {m.group(0)!r}" for cat in sorted(categories)
                 if (m := CANARIES[cat].search(text))]
        if (m := ENCODED_CANARY.search(text)):
            found.append(f"encoded canary: {m.group(0)!r}")
        return found

    def summary(self) -> str:
        e = self.error
        if e:
            return f"{self.mode}: error {e.get('sqlstate')} {e.get('message')!r} (source {e.get('source')})"
        return f"{self.mode}: {len(self.rows)} row(s), columns {self.columns}"


# --- psycopg ------------------------------------------------------------------------------------

def _psycopg_error(e) -> dict[str, str | None]:
    d = e.diag
    return {"sqlstate": e.sqlstate, "severity": d.severity, "message": d.message_primary,
            "detail": d.message_detail, "hint": d.message_hint, "context": d.context,
            "internal_query": d.internal_query, "schema": d.schema_name, "table": d.table_name,
            "column": d.column_name, "constraint": d.constraint_name, "datatype": d.datatype_name,
            "source": d.source_file, "text": str(e)}


def psycopg_connect(dsn: str):
    import psycopg

    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(
        " | ".join(str(x) for x in (diag.severity, diag.sqlstate, diag.message_primary, diag.message_detail,
                                   diag.message_hint, diag.context) if x)))
    conn.info_notices = notices  # type: ignore[attr-defined]
    return conn


def run_setup(conn, setup: Iterable[str], setup_any: Iterable[str] = ()) -> None:
    """Run ``setup`` (each must succeed), then ``setup_any`` (outcome ignored), simple protocol."""
    import psycopg

    for sql in setup:
        try:
            conn.execute(sql, prepare=False)
        except psycopg.Error as e:
            raise AssertionError(f"setup statement {sql!r} failed: {e.sqlstate} {e}") from e
    for sql in setup_any:
        try:
            conn.execute(sql, prepare=False)
        except psycopg.Error:
            pass


def _is_copy(sql: str) -> bool:
    return re.match(r"\s*copy\b", sql, re.I) is not None


def run_psycopg(conn, sql: str, *, prepare: bool, mode: str, params=None) -> Outcome:
    """Run ``sql`` on an autocommit psycopg connection: simple protocol (prepare=False, no
    parameters) or a named prepared statement (prepare=True: Parse/Bind/Execute)."""
    import psycopg

    out = Outcome(mode)
    notices = conn.info_notices
    start = len(notices)
    try:
        if _is_copy(sql):
            if prepare:
                out = _libpq_extended_copy(conn, sql, mode)
            else:
                with conn.cursor() as cur:
                    with cur.copy(sql) as copy:
                        for data in copy:
                            out.copy += bytes(data)
        else:
            with conn.cursor() as cur:
                cur.execute(sql, params, prepare=prepare)
                while True:
                    if cur.description is not None:
                        out.columns += [c.name for c in cur.description]
                        out.rows += cur.fetchall()
                    if not cur.nextset():
                        break
    except psycopg.Error as e:
        out.errors.append(_psycopg_error(e))
    out.notices += notices[start:]
    return out


def _libpq_extended_copy(conn, sql: str, mode: str) -> Outcome:
    """COPY through the extended protocol (PQsendQueryParams: Parse/Bind/Describe/Execute/Sync)."""
    from psycopg import pq

    out = Outcome(mode)
    pgconn = conn.pgconn
    pgconn.send_query_params(sql.encode(), None)
    pgconn.flush()
    while True:
        while pgconn.is_busy():
            import select

            select.select([pgconn.socket], [], [], 5)
            pgconn.consume_input()
        res = pgconn.get_result()
        if res is None:
            break
        if res.status == pq.ExecStatus.COPY_OUT:
            while True:
                n, data = pgconn.get_copy_data(0)
                if n < 0:
                    break
                if n == 0:
                    import select

                    select.select([pgconn.socket], [], [], 5)
                    pgconn.consume_input()
                    continue
                out.copy += bytes(data)
        elif res.status == pq.ExecStatus.FATAL_ERROR:
            f = lambda code: (res.error_field(code) or b"").decode("utf-8", "replace") or None  # noqa: E731
            out.errors.append({"sqlstate": f(pq.DiagnosticField.SQLSTATE),
                               "severity": f(pq.DiagnosticField.SEVERITY_NONLOCALIZED),
                               "message": f(pq.DiagnosticField.MESSAGE_PRIMARY),
                               "detail": f(pq.DiagnosticField.MESSAGE_DETAIL),
                               "hint": f(pq.DiagnosticField.MESSAGE_HINT),
                               "context": f(pq.DiagnosticField.CONTEXT),
                               "source": f(pq.DiagnosticField.SOURCE_FILE)})
        elif res.status == pq.ExecStatus.TUPLES_OK:
            out.columns += [(res.fname(i) or b"").decode() for i in range(res.nfields)]
            out.rows += [tuple(res.get_value(r, c) for c in range(res.nfields)) for r in range(res.ntuples)]
    return out


# --- asyncpg ------------------------------------------------------------------------------------

def _asyncpg_error(e) -> dict[str, str | None]:
    fields = {}
    for name in ("sqlstate", "severity", "message", "detail", "hint", "context", "internal_query",
                 "schema_name", "table_name", "column_name", "constraint_name", "data_type_name",
                 "server_source_filename"):
        fields[name] = getattr(e, name, None)
    fields["source"] = fields.pop("server_source_filename")
    fields["text"] = str(e)
    return fields


_ASYNCPG_NOTICES: dict[int, list[str]] = {}  # id(connection) -> notices received


async def asyncpg_connect(url: str, purpose: str | None):
    import asyncpg

    settings = {} if purpose is None else {"pii.purpose": purpose}
    conn = await asyncpg.connect(url, server_settings=settings, timeout=10)
    notices: list[str] = []
    conn.add_log_listener(lambda c, msg: notices.append(
        " | ".join(str(x) for x in (getattr(msg, "severity", None), msg.sqlstate, msg.message,
                                   getattr(msg, "detail", None), getattr(msg, "hint", None),
                                   getattr(msg, "context", None)) if x)))
    _ASYNCPG_NOTICES[id(conn)] = notices
    return conn


async def asyncpg_setup(conn, setup: Iterable[str], setup_any: Iterable[str] = ()) -> None:
    import asyncpg

    for sql in setup:
        try:
            await conn.execute(sql)
        except asyncpg.PostgresError as e:
            raise AssertionError(f"setup statement {sql!r} failed: {e.sqlstate} {e}") from e
    for sql in setup_any:
        try:
            await conn.execute(sql)
        except asyncpg.PostgresError:
            pass


async def run_asyncpg(conn, sql: str, mode: str = "asyncpg", args: tuple = ()) -> Outcome:
    """Prepare ``sql`` (Parse/Describe) and fetch it (Bind/Execute/Sync) with asyncpg."""
    import asyncpg

    out = Outcome(mode)
    notices = _ASYNCPG_NOTICES.setdefault(id(conn), [])
    start = len(notices)
    try:
        stmt = await conn.prepare(sql)
        out.columns = [a.name for a in stmt.get_attributes()]
        out.rows = [tuple(r) for r in await stmt.fetch(*args)]
    except asyncpg.PostgresError as e:
        out.errors.append(_asyncpg_error(e))
    except asyncpg.InterfaceError as e:  # e.g. a statement asyncpg cannot run this way
        out.errors.append({"sqlstate": None, "message": str(e), "source": "client"})
    await asyncio.sleep(0)
    out.notices += notices[start:]
    return out


# --- psql ------------------------------------------------------------------------------------------

_PSQL_ERROR = re.compile(r"^(?:psql:[^:]*:\d+: )?(ERROR|FATAL):\s+([0-9A-Z]{5}): (.*)$")


def run_psql(dsn: str, commands: list[str], timeout: float = 60) -> Outcome:
    """Run each command as its own ``-c`` (one Query message each) with VERBOSITY verbose."""
    args = ["psql", dsn, "-X", "-v", "VERBOSITY=verbose", "-P", "pager=off"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    out = Outcome("psql", raw=r.stdout + "\n" + r.stderr)
    block: dict | None = None
    for line in r.stderr.splitlines():
        m = _PSQL_ERROR.match(line)
        if m:
            block = {"sqlstate": m.group(2), "message": m.group(3), "severity": m.group(1), "source": None}
            out.errors.append(block)
        elif block is not None and line.startswith("LOCATION:"):
            block["source"] = line.split(":", 1)[1].strip()
        elif line.startswith(("NOTICE:", "WARNING:", "INFO:")):
            out.notices.append(line)
            block = None
    return out  # PostgreSQL's own errors carry LOCATION in verbose mode; the proxy's never do


def proxy_refusals(outcome: Outcome) -> list[dict]:
    return [e for e in outcome.errors if e.get("sqlstate") in REFUSAL_STATES and not e.get("source")]
