"""Metrics, traces, audit and logs of the real proxy, driven by real clients against a real PostgreSQL.

Purpose decisions use a fixture policy of their own (tests/fixtures/observability/policy)
over a tiny schema created per module in a fresh database; protocol-level counts use the
test decider ``refuse_marker``. Canary literals in the statements must never show up
in a span, a log line or an audit record.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config import load
from proxy.devtools.process import ProxyProcess
from proxy.observability import audit
from proxy.observability.recorder import Recorder
from proxy.policy.engine import Policy
from tests.support.observability import (
    POLICY_DIR,
    SCHEMA_SQL,
    Forwarder,
    InProcessProxy,
    Scrape,
    audit_records,
    http_get,
    timed_marker,
)
from tests.support.waiting import wait_for
from tests.unit.test_deploy import dashboard_expressions, metric_names

pytestmark = pytest.mark.integration

MARKER = ("--decider", "tests.support.deciders:refuse_marker")
CANARIES = ("canary-allow-9931", "canary-refused-4417", "canary-error-8812", "canary-dollar-7123",
            "canary-unparsed-5521", "987654321987", "canary-param-3309", "canarypurpose", "canary-dq-6604",
            "canary_setbare_2208", "canaryword", "canary-option-7719", "canary-escape-3391", "canary-uni-4410",
            "canary-nonascii-1101", "canary-nested-1102", "canary-fromdollar-1103", "anary-fromuni-1104",
            "canary-long-1105", "canaryjoin1106", "canary-enc-1107", "canaryopt1108", "canaryencstart1109",
            "canary_alterrole_1110", "canarynames1111", "canaryparen1112", "canaryminus1113")


@pytest.fixture(scope="module")
def obs_db(pg):
    """A fresh database owned by app with the fixture schema; yields its name."""
    name = "pp_obs_" + uuid.uuid4().hex[:8]
    pg.psql_admin(f'CREATE DATABASE "{name}" OWNER app')
    with psycopg.connect(pg.dsn("app", dbname=name), autocommit=True) as conn:
        conn.execute(SCHEMA_SQL.read_text())
    yield name
    pg.psql_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def purpose_args(pg, *extra: str) -> tuple[str, ...]:
    return ("--decider", "purpose", "--policies", str(POLICY_DIR), "--schema-dsn",
            pg.url("postgres", dbname="postgres"), "--policy-watch-interval", "0", *extra)


def connect(pg, proxy, db: str, purpose: str | None = None, **kw) -> psycopg.Connection:
    opts = {"options": f"-c pii.purpose={purpose}"} if purpose else {}
    return psycopg.connect(pg.dsn("app", dbname=db, host=proxy.host, port=proxy.port), autocommit=True,
                           **opts, **kw)


def refused(conn, sql: str) -> str:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql)
    return info.value.sqlstate


# --- metrics ----------------------------------------------------------------------------------


def test_counters_and_histograms_move_per_decision(pg, start_proxy):
    proxy = start_proxy(*MARKER)
    before = Scrape.of(proxy.metrics_url)
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True) as conn:
        for i in range(3):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        assert refused(conn, "SELECT 1 AS refuse_me") == "42501"
        assert refused(conn, "SELECT 2 AS refuse_me") == "42501"
        during = Scrape.of(proxy.metrics_url)
        assert during.get("purpose_proxy_client_sessions_open") == 1
    after = Scrape.of(proxy.metrics_url)
    d = lambda name, **lbl: after.delta(before, name, **lbl)  # noqa: E731
    assert d("purpose_proxy_statements_total", decision="allow", purpose="none") == 3
    assert d("purpose_proxy_statements_total", decision="block", purpose="none") == 2
    assert d("purpose_proxy_statements_total", decision="mask", purpose="none") == 0
    assert d("purpose_proxy_refusals_total", reason="test-marker") == 2
    assert d("purpose_proxy_statement_categories_total", decision="allow", purpose="none", category="none") == 3
    assert d("purpose_proxy_decision_duration_seconds_count", stage="total") == 5
    assert d("purpose_proxy_statement_duration_seconds_count", decision="allow") == 3
    assert d("purpose_proxy_statement_duration_seconds_count", decision="block") == 2
    assert d("purpose_proxy_statement_duration_seconds_sum", decision="allow") > 0
    assert d("purpose_proxy_client_sessions_total") == 1
    assert d("purpose_proxy_relayed_bytes_total", direction="from_client") > 100
    assert d("purpose_proxy_relayed_bytes_total", direction="from_server") > 100
    wait_for(lambda: Scrape.of(proxy.metrics_url).get("purpose_proxy_client_sessions_open") == 0, 5,
             "the session to close")
    # Stage histograms stay empty: this decider reports no stages.
    assert d("purpose_proxy_decision_duration_seconds_count", stage="analysis") == 0


def test_upstream_connect_failures_are_counted(start_proxy):
    from proxy.devtools.cluster import free_port

    proxy = start_proxy(upstream=f"127.0.0.1:{free_port()}")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"host={proxy.host} port={proxy.port} user=app dbname=app connect_timeout=5")
    assert Scrape.of(proxy.metrics_url).get("purpose_proxy_upstream_connect_failures_total") == 1


def test_purpose_decisions_by_purpose_category_and_reason(pg, obs_db, start_proxy):
    proxy = start_proxy(*purpose_args(pg))
    before = Scrape.of(proxy.metrics_url)
    version = Policy.load(POLICY_DIR).version
    assert before.get("purpose_proxy_policy_info", version=version) == 1
    assert {lbl["purpose"] for lbl in before.labels("purpose_proxy_statements_total")} == {
        "none", "other", "billing", "marketing", "marketing.email"}
    with connect(pg, proxy, obs_db, "billing") as conn:
        assert len(conn.execute("SELECT name, email FROM crm.members").fetchall()) == 2
        assert len(conn.execute("SELECT label FROM public.items").fetchall()) == 3
    with connect(pg, proxy, obs_db, "marketing") as conn:
        assert refused(conn, "SELECT email FROM crm.members") == "42501"
        assert len(conn.execute("SELECT name FROM crm.members").fetchall()) == 2
    with connect(pg, proxy, obs_db, "billing") as conn:  # the decision cache: text, then shape hits
        assert len(conn.execute("SELECT name, email FROM crm.members").fetchall()) == 2
        for label in ("x", "y"):
            conn.execute(f"SELECT label FROM public.items WHERE label = '{label}'", prepare=False).fetchall()
    with pytest.raises(psycopg.OperationalError, match="unknown purpose"):
        connect(pg, proxy, obs_db, "canarypurpose")
    after = Scrape.of(proxy.metrics_url)
    d = lambda name, **lbl: after.delta(before, name, **lbl)  # noqa: E731
    assert d("purpose_proxy_statements_total", decision="allow", purpose="billing") == 5
    assert d("purpose_proxy_decision_cache_hits_total", match="text") >= 1
    assert d("purpose_proxy_decision_cache_hits_total", match="shape") >= 1
    assert d("purpose_proxy_decision_cache_misses_total") >= 4
    assert after.get("purpose_proxy_decision_cache_entries") >= 4
    assert d("purpose_proxy_statements_total", decision="allow", purpose="marketing") == 1
    assert d("purpose_proxy_statements_total", decision="block", purpose="marketing") == 1
    cat = "purpose_proxy_statement_categories_total"
    assert d(cat, decision="allow", purpose="billing", category="identity.name") == 2
    assert d(cat, decision="allow", purpose="billing", category="contact.email") == 2
    assert d(cat, decision="allow", purpose="billing", category="none") == 3
    assert d(cat, decision="block", purpose="marketing", category="contact.email") == 1
    assert d(cat, decision="allow", purpose="marketing", category="identity.name") == 1
    assert d("purpose_proxy_refusals_total", reason="denied") == 1
    assert d("purpose_proxy_startup_refusals_total", reason="unknown-purpose") == 1
    # The refused connection counts too: it is refused right after it authenticated, as PostgreSQL refuses what
    # it checks after authentication (before, an unauthenticated client learned which purposes exist).
    assert d("purpose_proxy_client_sessions_total") == 4
    # Client text never becomes a label value.
    assert "canarypurpose" not in after.text
    # Every metric the dashboard queries is in a live scrape.
    queried = set().union(*(metric_names(e) for _, e in dashboard_expressions()))
    assert queried <= after.names(), sorted(queried - after.names())
    # Reloads: SIGHUP counts a success; the version stays (same files).
    proxy.signal(__import__("signal").SIGHUP)
    wait_for(lambda: Scrape.of(proxy.metrics_url).get("purpose_proxy_policy_reloads_total", result="success") == 1,
             10, "the reload to be counted")
    final = Scrape.of(proxy.metrics_url)
    assert final.get("purpose_proxy_policy_reloads_total", result="failure") == 0
    assert final.get("purpose_proxy_policy_last_reload_timestamp_seconds") >= before.get(
        "purpose_proxy_policy_last_reload_timestamp_seconds")


# --- health --------------------------------------------------------------------------------------


def test_readyz_follows_the_upstream(pg, start_proxy):
    fwd = Forwarder((pg.host, pg.port))
    port = fwd.port
    proxy = start_proxy(upstream=f"127.0.0.1:{port}")
    try:
        assert http_get(proxy.metrics_url + "/healthz") == (200, "ok\n")
        status, body = http_get(proxy.metrics_url + "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True, body
        with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        fwd.stop()  # PostgreSQL is gone, as far as the proxy can tell

        def unready():
            status, body = http_get(proxy.metrics_url + "/readyz")
            return status == 503 and json.loads(body)
        body = wait_for(unready, 10, "/readyz to report the upstream down")
        assert body["checks"]["upstream"]["ok"] is False and body["checks"]["listening"]["ok"] is True
        assert http_get(proxy.metrics_url + "/healthz")[0] == 200  # alive all the same
        fwd = Forwarder((pg.host, pg.port), port=port)  # back again
        wait_for(lambda: http_get(proxy.metrics_url + "/readyz")[0] == 200, 10, "/readyz to recover")
        assert http_get(proxy.metrics_url + "/nope")[0] == 404
    finally:
        fwd.stop()


def test_readyz_reports_the_policy(pg, obs_db, start_proxy):
    proxy = start_proxy(*purpose_args(pg))
    status, body = http_get(proxy.metrics_url + "/readyz")
    checks = json.loads(body)["checks"]
    assert status == 200 and checks["policy"] == {"ok": True, "version": Policy.load(POLICY_DIR).version}


# --- traces ---------------------------------------------------------------------------------------


def in_process_config(pg, tmp_path, **kw):
    return load(env={}, overrides={"listen": ["127.0.0.1:0"], "upstream": pg.address, "metrics_listen": "off",
                                   "audit_path": str(tmp_path / "audit.jsonl"), **kw})


def span_text(span) -> str:
    return span.to_json()


def test_spans_per_statement_with_db_conventions_and_no_values(pg, obs_db, tmp_path):
    exporter = InMemorySpanExporter()
    config = in_process_config(pg, tmp_path, decider="purpose", policies=str(POLICY_DIR),
                               schema_dsn=pg.url("postgres", dbname="postgres"), policy_watch_interval=0)
    proxy = InProcessProxy(config, recorder=Recorder(config, span_exporter=exporter)).start()
    try:
        target = type("T", (), {"host": "127.0.0.1", "port": proxy.port})
        with connect(pg, target, obs_db, "billing") as conn:
            conn.execute("SELECT name FROM crm.members WHERE email <> 'canary-allow-9931@example.invalid'").fetchall()
            conn.execute("SELECT name FROM crm.members WHERE name <> %s", ("canary-param-3309",)).fetchall()
        with connect(pg, target, obs_db, "marketing") as conn:
            assert refused(conn, "SELECT email FROM crm.members WHERE name = 'canary-refused-4417'") == "42501"
    finally:
        proxy.stop()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 3, [s.name for s in spans]
    for root in roots:
        children = sorted(s.name for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id)
        a = root.attributes
        assert root.name == "SELECT crm.members"
        assert a["db.system.name"] == "postgresql" and a["db.namespace"] == obs_db
        assert a["db.operation.name"] == "SELECT" and a["db.collection.name"] == "crm.members"
        assert a["db.query.summary"] == "SELECT crm.members"
        assert a["purpose_proxy.role"] == "app" and len(a["purpose_proxy.statement.fingerprint"]) == 16
        assert "?" in a["db.query.text"] or "$1" in a["db.query.text"]
        if a["purpose_proxy.decision"] == "allow":
            assert a["purpose_proxy.purpose"] == "billing"
            assert children == ["decide", "upstream"]
            assert a["db.response.returned_rows"] >= 1
            assert set(a["purpose_proxy.categories"]) == {"identity.name", "contact.email"} or set(
                a["purpose_proxy.categories"]) == {"identity.name"}
        else:
            assert a["purpose_proxy.purpose"] == "marketing" and a["purpose_proxy.reason"] == "denied"
            assert children == ["decide"]  # refused: nothing went upstream
            assert a["error.type"] == "42501" and not root.status.is_ok
        assert root.start_time <= root.end_time
    text = "\n".join(span_text(s) for s in spans).lower()
    for canary in CANARIES:
        assert canary.lower() not in text


def test_stage_timings_reach_histograms_and_spans(pg, tmp_path):
    exporter = InMemorySpanExporter()
    config = in_process_config(pg, tmp_path, decider="proxy.enforcement.hook:allow_all", metrics_listen="127.0.0.1:0")
    recorder = Recorder(config, span_exporter=exporter)
    proxy = InProcessProxy(config, decider_factory=timed_marker, recorder=recorder).start()
    try:
        with psycopg.connect(pg.dsn("app", host="127.0.0.1", port=proxy.port), autocommit=True) as conn:
            conn.execute("SELECT 1").fetchall()
            assert refused(conn, "SELECT 1 AS refuse_me") == "42501"
    finally:
        proxy.stop()
    registry = recorder.metrics.registry
    for stage in ("analysis", "policy", "total"):
        assert registry.get_sample_value("purpose_proxy_decision_duration_seconds_count", {"stage": stage}) == 2
    names = sorted(s.name for s in exporter.get_finished_spans() if s.parent is not None)
    assert names == ["analysis", "analysis", "policy", "policy", "upstream"]


def test_console_exporter_and_logs_carry_no_values(pg, obs_db, start_proxy):
    proxy = start_proxy(*purpose_args(pg, "--trace-exporter", "console", "--log-level", "debug",
                                      "--log-format", "json"))
    with connect(pg, proxy, obs_db, "billing") as conn:
        conn.execute("SELECT name FROM crm.members WHERE email = 'canary-allow-9931@example.invalid'").fetchall()
        assert refused(conn, "SELECT 'canary-error-8812'::int") == "22P02"
        conn.execute("SELECT $$canary-dollar-7123$$ AS x, 987654321987 AS n").fetchall()
        assert refused(conn, "SELECT 'canary-unparsed-5521' FROM WHERE") == "42501"
        # Found by a telemetry hunt: a quote inside PostgreSQL's "...", a SET value as a bare word, a
        # first word that is no command, a literal sqlglot quotes back upper-cased.
        assert refused(conn, """SELECT 'ab"canary-dq-6604'::int""") == "22P02"
        conn.execute("SET myapp.note TO canary_setbare_2208")
        assert refused(conn, "canaryword blah blah") == "42501"
        assert refused(conn, "INSERT INTO crm.members VALUES (1) ON CONFLICT 'canary-option-7719'") == "42501"
        # Found by hunt 14: the parser quotes back the decoded value of an escaped string, which is
        # not the text between the quotes.
        assert refused(conn, r"INSERT INTO crm.members VALUES (1) ON CONFLICT E'canary\x2descape\x2d3391'") == "42501"
        assert refused(conn, r"INSERT INTO crm.members VALUES (1) ON CONFLICT U&'canary\002duni\002d4410'") == "42501"
        # Found by hunt 19. A Unicode escape beyond U+10FFFF crashed the lexer, and the fingerprint's
        # fallback kept a non-ASCII dollar tag's body and a nested comment.
        assert refused(conn, "SELECT name FROM crm.members WHERE email = $é$canary-nonascii-1101$é$ "
                             "AND U&'!+110000' UESCAPE '!' = ''") == "42501"
        assert refused(conn, "SELECT U&'!+FFFFFF' UESCAPE '!', /* /* */ canary-nested-1102 */ 1") == "42501"
        # A value read as a relation's name, in forms the refusal's scrubbing missed: a non-ASCII dollar
        # tag, U&'' with UESCAPE, cut to 63 bytes, one-character constants continued across lines. The
        # second statement of the long one's shape got the first one's message from the decision cache.
        assert refused(conn, "SELECT * FROM $é$canary-fromdollar-1103$é$") == "42501"
        assert refused(conn, "SELECT * FROM U&'!0063anary-fromuni-1104' UESCAPE '!'") == "42501"
        for n in (1, 2):
            assert refused(conn, f"SELECT {n} FROM 'canary-long-1105 carol@example.invalid 4111111111111111 "
                                 f"{'x' * 30}'") == "42501"
        assert refused(conn, "SELECT 1 FROM " + "\n".join(f"'{c}'" for c in "canaryjoin1106")) == "42501"
        assert refused(conn, "SET client_encoding = 'canary-enc-1107'") == "0A000"
        for sql in ("ALTER ROLE app SET application_name = canary_alterrole_1110", "SET NAMES canarynames1111",
                    "(canaryparen1112 smith)", "- canaryminus1113"):
            with contextlib.suppress(psycopg.Error):
                conn.execute(sql)
    with connect(pg, proxy, obs_db, "marketing") as conn:
        assert refused(conn, "SELECT email FROM crm.members WHERE name = 'canary-refused-4417'") == "42501"
    with pytest.raises(psycopg.OperationalError):
        connect(pg, proxy, obs_db, "canarypurpose")
    for options in ("-c canaryopt1108", "-c client_encoding=canaryencstart1109"):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port, dbname=obs_db), options=options)
    assert proxy.stop() == 0
    log = proxy.log()
    assert '"db.system.name": "postgresql"' in log and '"name": "SELECT crm.members"' in log  # spans came out
    records = proxy.audit_path.read_text()
    assert '"type":"statement"' in records and '"type":"startup_refused"' in records
    log, records = log.lower(), records.lower()  # (sqlglot quotes some values back upper-cased)
    for canary in CANARIES:
        assert canary.lower() not in log, canary
        assert canary.lower() not in records, canary


# --- audit ------------------------------------------------------------------------------------------


def test_audit_records_of_real_traffic(pg, obs_db, start_proxy):
    proxy = start_proxy(*purpose_args(pg))
    with connect(pg, proxy, obs_db, "billing", application_name="obs-test") as conn:
        conn.execute("SELECT name, email FROM crm.members").fetchall()
        assert refused(conn, "SELECT 'x'::int") == "22P02"
        conn.execute("SET pii.purpose = 'marketing'")
        assert refused(conn, "SELECT email FROM crm.members") == "42501"
        with conn.pipeline():  # pipelined: rows must land on the right statements
            c1 = conn.execute("SELECT item_id FROM public.items WHERE item_id <= 1")
            c2 = conn.execute("SELECT item_id FROM public.items WHERE item_id <= 2")
            c3 = conn.execute("SELECT item_id FROM public.items WHERE item_id <= 3")
        assert [len(c.fetchall()) for c in (c1, c2, c3)] == [1, 2, 3]
    proxy.signal(__import__("signal").SIGHUP)
    wait_for(lambda: any(r["type"] == "policy_reload" for r in audit_records(proxy.audit_path)), 10,
             "the reload record")
    assert proxy.stop() == 0
    recs = audit_records(proxy.audit_path)
    types = [r["type"] for r in recs]
    assert types[0] == "audit_open" and types[-1] == "audit_close"
    assert {"session_start", "session_end", "purpose_change", "policy_reload"} <= set(types)
    stmts = [r for r in recs if r["type"] == "statement"]
    first = stmts[0]
    assert first["verdict"] == "allow" and first["purpose"] == "billing" and first["purpose_source"] == "declared"
    assert first["role"] == "app" and first["database"] == obs_db and first["application_name"] == "obs-test"
    assert first["client"].startswith("127.0.0.1:") and first["via"] in ("query", "parse")
    assert first["fingerprint"] == "select name, email from crm.members"
    assert first["statement_kinds"] == ["select"] and first["tables"] == ["crm.members"]
    assert {c["column"]: (c["categories"], c["decision"]) for c in first["columns"]} == {
        "crm.members.name": (["identity.name"], "allow"), "crm.members.email": (["contact.email"], "allow")}
    assert any("policy.csv" in rule and "billing" in rule for rule in first["rules"])
    assert first["rows"] == 2 and first["error"] is None and first["completed"] is True
    assert first["rewrite"] == {"applied": False, "methods": []} and first["consent_filter"] is False
    assert 0 < first["decision_seconds"] <= first["duration_seconds"]
    pg_error = stmts[1]
    assert pg_error["verdict"] == "allow" and pg_error["error"]["sqlstate"] == "22P02"
    assert pg_error["error"]["source"] == "postgresql" and '"x"' not in pg_error["error"]["message"]
    change = next(r for r in recs if r["type"] == "purpose_change")
    assert (change["from"], change["to"]) == ("billing", "marketing")
    denied = next(r for r in stmts if r["verdict"] == "block")
    assert denied["purpose"] == "marketing" and denied["reason"] == "denied"
    assert denied["error"] == {"sqlstate": "42501", "source": "proxy",
                               "message": 'purpose "marketing" may not read personal data of category "contact.email"'}
    assert [c["decision"] for c in denied["columns"]] == ["block"]
    assert [r["rows"] for r in stmts[-3:]] == [1, 2, 3]
    end = next(r for r in recs if r["type"] == "session_end")
    assert end["authenticated"] is True and end["statements"] == len(stmts)
    # The chain verifies, through the CLI as an auditor would run it.
    cli = [sys.executable, "-m", "proxy", "audit"]
    run = subprocess.run(cli + ["verify", str(proxy.audit_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith(f"ok: {len(recs)} records"), run.stdout + run.stderr
    # Queries: by category (and everything under it) and purpose.
    run = subprocess.run(cli + ["query", "--category", "contact", "--purpose", "billing", "--type", "statement",
                                str(proxy.audit_path)], capture_output=True, text=True, timeout=60)
    found = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["seq"] for r in found] == [first["seq"]]


def test_every_run_of_a_prepared_statement_is_audited(pg, obs_db, start_proxy):
    """Drivers prepare what they run often (psycopg after a few runs or when asked, asyncpg always): each later run
    is only Bind/Execute, and still gets a record of its own, with the decision of its Parse and its own rows."""
    import asyncio

    import asyncpg

    proxy = start_proxy(*purpose_args(pg))
    with connect(pg, proxy, obs_db, "billing") as conn:
        for limit in (1, 2, 2):
            conn.execute("SELECT name, email FROM crm.members WHERE member_id <= %s", (limit,), prepare=True)

    async def with_asyncpg():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="app", password="app-secret",
                                     database=obs_db, server_settings={"pii.purpose": "billing"})
        try:
            for limit in (1, 2, 1):
                await conn.fetch("SELECT email FROM crm.members WHERE member_id <= $1", limit)
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())
    assert proxy.stop() == 0
    recs = [r for r in audit_records(proxy.audit_path) if r["type"] == "statement" and "crm.members" in r["tables"]]
    psycopg_runs = [r for r in recs if r["fingerprint"].startswith("select name, email")]
    # psycopg prepares in a batch of its own (Parse, Describe, Sync), then runs the statement three times.
    assert [(r["via"], r["rows"]) for r in psycopg_runs] == [("parse", None), ("execute", 1), ("execute", 2),
                                                            ("execute", 2)]
    asyncpg_runs = [r for r in recs if r["fingerprint"].startswith("select email")]
    # asyncpg parses and runs in one batch the first time (the Parse's record has that run's rows), then only runs.
    assert [(r["via"], r["rows"]) for r in asyncpg_runs] == [("parse", 1), ("execute", 2), ("execute", 1)]
    for run in psycopg_runs[1:] + asyncpg_runs:
        assert run["verdict"] == "allow" and run["purpose"] == "billing" and run["completed"] is True
        assert "contact.email" in run["categories"] and run["error"] is None
    assert all(r["decision_seconds"] is None for r in recs if r["via"] == "execute")
    assert audit.verify([proxy.audit_path]).ok


def test_runs_are_audited_as_the_statement_postgresql_kept(pg, obs_db, start_proxy):
    """Hunt 16: a Parse of a name that failed in PostgreSQL, then one that succeeded: later runs of the name were
    audited as the failed text, "no personal data", while they returned the e-mail addresses."""
    from psycopg import pq

    proxy = start_proxy(*purpose_args(pg))
    with connect(pg, proxy, obs_db, "billing") as conn:
        pgc = conn.pgconn
        assert pgc.prepare(b"s", b"SELECT 'a'::text + 1 AS email").status == pq.ExecStatus.FATAL_ERROR
        assert pgc.prepare(b"s", b"SELECT email FROM crm.members").status == pq.ExecStatus.COMMAND_OK
        for _ in range(2):
            assert pgc.exec_prepared(b"s", []).status == pq.ExecStatus.TUPLES_OK
    assert proxy.stop() == 0
    runs = [r for r in audit_records(proxy.audit_path) if r["type"] == "statement" and r["via"] == "execute"]
    assert len(runs) == 2
    for run in runs:
        assert run["fingerprint"].startswith("select email from crm.members"), run["fingerprint"]
        assert "contact.email" in run["categories"]


def test_a_run_of_a_sql_prepared_statement_through_bind_and_execute_is_audited(pg, obs_db, start_proxy):
    """PREPARE in SQL, then run by name with Bind/Execute (libpq's PQexecPrepared does this): each run is a
    record of the PREPARE's decision, with the categories it reads and the run's own rows."""
    proxy = start_proxy(*purpose_args(pg))
    with connect(pg, proxy, obs_db, "billing") as conn:
        conn.execute("PREPARE emails (int) AS SELECT email FROM crm.members WHERE member_id <= $1")
        for limit in (b"1", b"2"):
            result = conn.pgconn.exec_prepared(b"emails", [limit])
            assert result.status == psycopg.pq.ExecStatus.TUPLES_OK and result.ntuples == int(limit)
    assert proxy.stop() == 0
    recs = [r for r in audit_records(proxy.audit_path) if r["type"] == "statement" and "crm.members" in r["tables"]]
    assert [(r["via"], r["rows"]) for r in recs] == [("query", None), ("execute", 1), ("execute", 2)]
    for run in recs[1:]:
        assert run["fingerprint"] == recs[0]["fingerprint"] and run["fingerprint"].startswith("prepare emails")
        assert (run["verdict"], run["purpose"], run["error"]) == ("allow", "billing", None)
        assert "contact.email" in run["categories"]
    assert audit.verify([proxy.audit_path]).ok


def test_an_execute_in_sql_is_audited_with_what_its_prepared_statement_reads(pg, obs_db, start_proxy):
    """EXECUTE in a Query reads what the PREPARE behind its name reads: its record names those columns and
    categories (it had none, so "who read contact.email under billing" missed every run of this kind)."""
    proxy = start_proxy(*purpose_args(pg))
    with connect(pg, proxy, obs_db, "billing") as conn:
        conn.execute("PREPARE emails (int) AS SELECT email FROM crm.members WHERE member_id <= $1")
        conn.execute("PREPARE names AS SELECT name FROM crm.members")
        for limit in (1, 2):
            assert len(conn.execute(f"EXECUTE emails({limit})").fetchall()) == limit
        conn.execute("EXECUTE names; EXECUTE emails(2)")
        assert conn.execute("SELECT 1").fetchall() == [(1,)]
    assert proxy.stop() == 0
    runs = [r for r in audit_records(proxy.audit_path) if r["type"] == "statement"
            and r["fingerprint"].startswith("execute")]
    assert [(r["via"], r["rows"], r["verdict"]) for r in runs] == [("query", 1, "allow"), ("query", 2, "allow"),
                                                                  ("query", 4, "allow")]  # 2 names + 2 e-mails
    for run in runs:
        assert run["statement_kinds"][0] == "execute" and run["tables"] == ["crm.members"], run
        assert "contact.email" in run["categories"], run
        assert [c["column"] for c in run["columns"] if "contact.email" in c["categories"]] == ["crm.members.email"]
    assert sorted(c["column"] for c in runs[2]["columns"]) == [  # both runs' columns, each once
        "crm.members.email", "crm.members.member_id", "crm.members.name"]
    assert audit.verify([proxy.audit_path]).ok


def test_a_fetch_is_audited_with_what_its_cursor_reads(pg, obs_db, start_proxy):
    """FETCH reads what its cursor's query reads: its record names those columns and categories (it had
    none). A DECLARE that fails because a cursor of that name is open leaves the open one's columns."""
    proxy = start_proxy(*purpose_args(pg))
    with connect(pg, proxy, obs_db, "billing") as conn:
        conn.execute("DECLARE held CURSOR WITH HOLD FOR SELECT email FROM crm.members ORDER BY member_id")
        with pytest.raises(psycopg.errors.DuplicateCursor):
            conn.execute("DECLARE held CURSOR WITH HOLD FOR SELECT name FROM crm.members")
        assert len(conn.execute("FETCH 1 FROM held").fetchall()) == 1
        conn.execute('FETCH NEXT IN "held"')
        conn.execute("CLOSE held")
    assert proxy.stop() == 0
    runs = [r for r in audit_records(proxy.audit_path) if r["type"] == "statement"
            and r["fingerprint"].startswith("fetch")]
    assert [(r["rows"], r["verdict"]) for r in runs] == [(1, "allow"), (1, "allow")]
    for run in runs:
        assert run["statement_kinds"] == ["utility"] and run["tables"] == ["crm.members"], run
        assert sorted(c["column"] for c in run["columns"]) == ["crm.members.email", "crm.members.member_id"], run
        assert "contact.email" in run["categories"], run
    assert audit.verify([proxy.audit_path]).ok


def test_a_prepared_run_refused_at_its_bind_is_audited(pg, obs_db, start_proxy):
    """Prepared under one purpose, run under another that may not read it: refused at Bind, and recorded."""
    proxy = start_proxy(*purpose_args(pg))
    sql = "SELECT email FROM crm.members WHERE member_id = %s"
    with connect(pg, proxy, obs_db, "billing") as conn:
        assert conn.execute(sql, (1,), prepare=True).fetchall() == [("ann@example.invalid",)]
        conn.execute("SET pii.purpose = 'marketing'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql, (2,), prepare=True)  # Bind/Execute of the statement prepared under billing
    assert proxy.stop() == 0
    recs = [r for r in audit_records(proxy.audit_path) if r["type"] == "statement" and "crm.members" in r["tables"]]
    refused = [r for r in recs if r["via"] == "bind"]
    assert len(refused) == 1, [(r["via"], r["verdict"]) for r in recs]
    assert (refused[0]["verdict"], refused[0]["purpose"], refused[0]["error"]["sqlstate"]) == ("block", "marketing",
                                                                                            "42501")
    assert refused[0]["fingerprint"] == "select email from crm.members where member_id = $1"
    assert "contact.email" in refused[0]["categories"]
    assert audit.verify([proxy.audit_path]).ok


def test_audit_verify_finds_a_changed_byte_and_a_removed_record(pg, start_proxy, tmp_path):
    proxy = start_proxy(*MARKER)
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True) as conn:
        for i in range(5):
            conn.execute("SELECT %s::int", (i,))
    assert proxy.stop() == 0
    lines = proxy.audit_path.read_bytes().splitlines(keepends=True)
    target = next(i for i, line in enumerate(lines) if b'"type":"statement"' in line and i > 2)
    cli = [sys.executable, "-m", "proxy", "audit", "verify"]

    changed = bytearray(lines[target])
    pos = changed.index(b'"rows":') + len(b'"rows":')
    changed[pos] = ord("7") if changed[pos] != ord("7") else ord("8")
    bad = tmp_path / "changed.jsonl"
    bad.write_bytes(b"".join(lines[:target] + [bytes(changed)] + lines[target + 1:]))
    run = subprocess.run(cli + [str(bad)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and f"BROKEN: {bad}:{target + 1}: hash mismatch" in run.stdout, run.stdout

    removed = tmp_path / "removed.jsonl"
    removed.write_bytes(b"".join(lines[:target] + lines[target + 1:]))
    run = subprocess.run(cli + [str(removed)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and f"BROKEN: {removed}:{target + 1}: prev does not match" in run.stdout, run.stdout


def test_records_survive_sigterm(pg, start_proxy):
    """Every statement of every client is in the log after SIGTERM, including one still running."""
    proxy = start_proxy(*MARKER, "--shutdown-timeout", "10")
    conns = [psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True) for _ in range(4)]
    done = 0
    for conn in conns:
        for i in range(25):
            if i % 5 == 4:
                with pytest.raises(psycopg.Error):
                    conn.execute("SELECT 1 AS refuse_me")
            else:
                conn.execute("SELECT %s::int", (i,), prepare=False)  # each one a Parse: a decision
            done += 1
    slow = psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True)
    result: list = []
    t = threading.Thread(target=lambda: result.append(slow.execute("SELECT pg_sleep(1.5)").fetchone()),
                         name="slow-statement")
    t.start()
    time.sleep(0.5)  # the slow statement is running
    proxy.signal(__import__("signal").SIGTERM)
    t.join(20)
    assert result == [("",)]  # the busy session was allowed to finish
    assert proxy.proc.wait(30) == 0
    for conn in conns + [slow]:
        conn.close()
    recs = audit_records(proxy.audit_path)
    stmts = [r for r in recs if r["type"] == "statement"]
    assert len(stmts) == done + 1
    assert sum(r["verdict"] == "block" for r in stmts) == 20
    assert [r["type"] for r in recs].count("session_end") == 5 and recs[-1]["type"] == "audit_close"
    assert any("pg_sleep" in r["fingerprint"] and r["completed"] and r["rows"] == 1 for r in stmts)
    assert audit.verify([proxy.audit_path]).ok


def test_rotation_keeps_the_chain_in_a_real_proxy(pg, start_proxy):
    proxy = start_proxy(*MARKER, "--audit-rotate-bytes", "3000")
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True) as conn:
        for i in range(40):
            conn.execute("SELECT %s::int", (i,), prepare=False)
            time.sleep(0.002)
    assert proxy.stop() == 0
    rotated = audit.rotated_files(proxy.audit_path)
    assert len(rotated) >= 2
    files = [str(p) for p in reversed(rotated + [proxy.audit_path])]  # any order: chain order is found
    run = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", *files], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and f"in {len(files)} file(s), chain intact" in run.stdout, run.stdout
    assert sum(r["type"] == "statement" for r in audit_records(proxy.audit_path)) == 40


def test_stdout_sink_and_everything_off(pg, start_proxy):
    proxy = start_proxy(*MARKER, "--audit-sink", "stdout")
    with psycopg.connect(pg.dsn("app", host=proxy.host, port=proxy.port), autocommit=True) as conn:
        conn.execute("SELECT 1")
    assert proxy.stop() == 0
    lines = [line for line in proxy.log().splitlines() if line.startswith('{"') and '"hash":' in line]
    assert any('"type":"statement"' in line for line in lines)
    path = Path(proxy.log_path).with_suffix(".audit.jsonl")
    path.write_text("\n".join(lines) + "\n")
    assert audit.verify([path]).ok
    # Relay only: no endpoint, no audit file, statements still run.
    off = start_proxy("--metrics-listen", "off", "--audit-sink", "none")
    with psycopg.connect(pg.dsn("app", host=off.host, port=off.port), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert off.metrics_port is None and off.audit_path is None
