"""``serve --workers 2`` through the real proxy subprocess and a real PostgreSQL.

Which worker holds a session is read from the workers' own metrics endpoints
(worker i serves ``/metrics`` on the metrics port + 1 + i), their pids from the
supervisor's ``/readyz`` and /proc. Routing by the kernel (SO_REUSEPORT) is
random per connection, so tests that need both workers use enough connections
that all of them landing on one worker is out of the question (2^-19 or less).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from proxy.devtools.cluster import free_port
from proxy.devtools.process import ProxyProcess
from proxy.observability import audit
from tests.integration.test_faults import SHUTDOWN_MESSAGE, Worker, wait_active
from tests.support.enforce import POLICY_DIR, purpose_options
from tests.support.observability import Scrape, http_get
from tests.support.rawpg import RawConnection
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

WORKERS = 2
CANCEL_REQUEST_CODE = 80877102


def start_workers(start_proxy, *args: str, **kw) -> ProxyProcess:
    """A proxy with ``WORKERS`` workers, once the supervisor's /readyz says every one of them is ready."""
    p = start_proxy("--workers", str(WORKERS), *args, **kw)
    wait_for(lambda: readyz(p)[0] == 200, 30, "every worker to report ready", 0.1)
    return p


def readyz(p: ProxyProcess) -> tuple[int, dict]:
    status, body = http_get(p.metrics_url + "/readyz")
    return status, json.loads(body)


def worker_pids(p: ProxyProcess) -> list[int]:
    return [w["pid"] for w in readyz(p)[1]["workers"]]


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def sessions(p: ProxyProcess, metric: str = "purpose_proxy_client_sessions_total") -> list[float]:
    return [Scrape.of(p.worker_metrics_url(i)).get(metric) for i in range(WORKERS)]


def cancel_packet(pid: int, secret: bytes) -> bytes:
    return struct.pack("!iiI", 12 + len(secret), CANCEL_REQUEST_CODE, pid) + secret


def dsn(pg, p: ProxyProcess, **kw) -> str:
    return pg.dsn("app", host=p.host, port=p.port, **kw)


# --- spreading, queries, cancel keys ---------------------------------------------------------------


def test_connections_spread_over_the_workers_and_queries_work(pg, start_proxy):
    p = start_workers(start_proxy)
    status, ready = readyz(p)
    assert status == 200 and ready["ready"] is True
    pids = worker_pids(p)
    assert len(set(pids)) == WORKERS and p.proc.pid not in pids
    assert all(parent_pid(pid) == p.proc.pid for pid in pids)  # real child processes of the supervisor
    assert all(w["checks"]["listening"]["ok"] and w["checks"]["upstream"]["ok"] for w in ready["workers"])

    # Raw connections one at a time: the worker whose session count goes up holds the
    # session, and the cancel key it handed out names it (secret modulo the worker count).
    owners = []
    before = sessions(p)
    for _ in range(20):
        with RawConnection(p.host, p.port, user="trustuser") as raw:
            after = sessions(p)
            grown = [i for i in range(WORKERS) if after[i] > before[i]]
            assert len(grown) == 1, (before, after)
            owner = grown[0]
            owners.append(owner)
            backend_pid, secret = raw.backend_key
            assert int.from_bytes(secret, "big") % WORKERS == owner
            rows = raw.simple_query("SELECT pg_backend_pid()")
            assert any(t == b"D" and str(backend_pid).encode() in body for t, body in rows)  # the pid is the backend's
            before = after
    assert set(owners) == set(range(WORKERS)), owners

    # Many concurrent client sessions through psycopg: every query works, both workers serve them.
    start = sessions(p)
    conns = [psycopg.connect(dsn(pg, p), autocommit=True) for _ in range(20)]
    try:
        for n, conn in enumerate(conns):
            assert conn.execute("SELECT %s::int + 1, current_user", [n]).fetchone() == (n + 1, "app")
        open_now = sessions(p, "purpose_proxy_client_sessions_open")
        assert sum(open_now) == len(conns) and all(n > 0 for n in open_now), open_now
    finally:
        for conn in conns:
            conn.close()
    end = sessions(p)
    assert sum(end) - sum(start) == len(conns)

    # The supervisor's own metrics.
    status, text = http_get(p.metrics_url + "/metrics")
    scrape = Scrape(text)
    assert scrape.get("purpose_proxy_workers") == WORKERS
    assert scrape.get("purpose_proxy_workers_ready") == WORKERS
    assert scrape.get("purpose_proxy_worker_restarts_total", worker="0") == 0


def test_cancel_from_fresh_connections_always_cancels(pg, start_proxy):
    """The cancel connection lands on either worker; the one that did not issue the key passes it on."""
    p = start_workers(start_proxy)
    attempts = 20
    for n in range(attempts):
        app = f"wcancel-{uuid.uuid4().hex[:8]}"
        with psycopg.connect(dsn(pg, p), autocommit=True, application_name=app) as conn:
            worker = Worker(lambda: conn.execute("SELECT pg_sleep(60)"))
            worker.start()
            pid = wait_active(pg, app)
            if n % 2:
                conn.cancel()
            else:
                conn.cancel_safe(timeout=10)
            _, exc = worker.outcome(20)
            assert isinstance(exc, errors.QueryCanceled), (n, exc)
            assert exc.sqlstate == "57014" and "canceling statement due to user request" in str(exc)
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)  # same session, still usable
    # Both routings were taken: some requests were passed on to the other worker, some not.
    passed_on = wait_for(lambda: p.log().count("cancel request passed on to worker"), 10,
                         "a cancel request passed on between workers")
    assert passed_on < attempts, p.log()
    assert "could not forward" not in p.log()


def test_wrong_cancel_keys_are_ignored_by_every_worker(pg, start_proxy):
    p = start_workers(start_proxy)
    app = f"wbadcancel-{uuid.uuid4().hex[:8]}"
    keys = [bytes([0, 1, 2, n]) for n in range(24)]  # both parities: half of them name each worker
    with psycopg.connect(dsn(pg, p), autocommit=True, application_name=app) as conn:
        worker = Worker(lambda: conn.execute("SELECT pg_sleep(3)").fetchone())
        worker.start()
        pid = wait_active(pg, app)
        for key in keys:
            with socket.create_connection((p.host, p.port), timeout=5) as s:
                s.sendall(cancel_packet(pid, key))
                s.settimeout(10)
                assert s.recv(1) == b""  # closed without an answer, as PostgreSQL does
        result, exc = worker.outcome(20)
        assert exc is None and result == ("",)  # pg_sleep returns void: the statement completed
        assert conn.execute("SELECT 1").fetchone() == (1,)
    log = p.log()
    # Each wrong key was ignored exactly once, by the worker it names (never passed on twice).
    assert log.count("cancel request with an unknown key ignored") == len(keys), log
    assert 0 < log.count("cancel request passed on to worker") < len(keys), log


# --- readiness ---------------------------------------------------------------------------------------


def test_readyz_reports_every_worker(pg, start_proxy):
    """Workers that listen but cannot reach PostgreSQL: the supervisor's /readyz is 503 and says why."""
    p = start_proxy("--workers", str(WORKERS), upstream=f"127.0.0.1:{free_port()}")

    def all_checked():
        status, body = readyz(p)
        workers = body["workers"]
        return (status, workers) if all(w["running"] and "upstream" in w["checks"] for w in workers) else None

    status, workers = wait_for(all_checked, 30, "every worker to answer its /readyz", 0.1)
    assert status == 503
    for w in workers:
        assert w["ready"] is False
        assert w["checks"]["listening"]["ok"] is True and w["checks"]["upstream"]["ok"] is False
    assert http_get(p.metrics_url + "/healthz") == (200, "ok\n")
    for i in range(WORKERS):
        assert http_get(p.worker_metrics_url(i) + "/readyz")[0] == 503


# --- lifecycle ---------------------------------------------------------------------------------------


def test_sigterm_drains_every_worker_and_all_processes_exit(pg, start_proxy):
    p = start_workers(start_proxy, "--shutdown-timeout", "20")
    pids = worker_pids(p)
    busy_apps = [f"wdrain-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    busy = [psycopg.connect(dsn(pg, p), autocommit=True, application_name=app) for app in busy_apps]
    idle = [psycopg.connect(dsn(pg, p), autocommit=True) for _ in range(16)]
    try:
        for conn in busy + idle:
            conn.execute("SELECT 1")
        open_now = sessions(p, "purpose_proxy_client_sessions_open")
        assert all(n > 0 for n in open_now), open_now  # both workers have sessions to drain
        workers = [Worker(lambda c=c: c.execute("SELECT pg_sleep(2), 'slept'").fetchone()) for c in busy]
        for w in workers:
            w.start()
        for app in busy_apps:
            wait_active(pg, app)
        p.signal(signal.SIGTERM)
        # The supervisor passes SIGTERM on; each worker logs this as it begins to drain.
        wait_for(lambda: p.log().count("shutting down: waiting up to") == WORKERS, 15,
                 "both workers to begin draining")

        # Idle sessions on both workers are closed with 57P01.
        for conn in idle:
            with pytest.raises(psycopg.OperationalError) as ei:
                conn.execute("SELECT 1")
            assert ei.value.sqlstate == "57P01" and SHUTDOWN_MESSAGE in str(ei.value)
        # Running statements finish first, then their sessions are closed too.
        for w in workers:
            result, exc = w.outcome(20)
            assert exc is None and result == ("", "slept"), exc
        for conn in busy:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        assert p.proc.wait(timeout=30) == 0
    finally:
        for conn in busy + idle:
            conn.close()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} still exists"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((p.host, p.port), timeout=5).close()
    log = p.log()
    assert log.count("shutting down: waiting up to") == WORKERS  # each worker drained
    assert "still busy" not in log and "exited unexpectedly" not in log


def test_killed_worker_is_restarted_and_new_connections_work(pg, start_proxy):
    p = start_workers(start_proxy)
    old = worker_pids(p)
    os.kill(old[0], signal.SIGKILL)

    def restarted():
        status, body = readyz(p)
        w = body["workers"][0]
        return status == 200 and w["pid"] not in (None, old[0]) and w["restarts"] == 1 and body

    body = wait_for(restarted, 30, "worker 0 to be restarted and ready", 0.1)
    new = [w["pid"] for w in body["workers"]]
    assert new[1] == old[1]  # the other worker was left alone
    assert parent_pid(new[0]) == p.proc.pid
    assert Scrape(http_get(p.metrics_url + "/metrics")[1]).get("purpose_proxy_worker_restarts_total",
                                                               worker="0") == 1
    assert "worker 0 exited unexpectedly (signal SIGKILL)" in p.log()

    before = sessions(p)
    assert before[0] == 0  # the restarted worker's counters start afresh
    for n in range(20):
        with psycopg.connect(dsn(pg, p), autocommit=True) as conn:
            assert conn.execute("SELECT %s::int", [n]).fetchone() == (n,)
    after = sessions(p)
    assert all(a > b for a, b in zip(after, before)), (before, after)  # the new worker serves clients too
    assert sum(after) - sum(before) == 20

    # A cancel still reaches the session whichever worker holds it.
    app = f"wrestart-{uuid.uuid4().hex[:8]}"
    for _ in range(4):
        with psycopg.connect(dsn(pg, p), autocommit=True, application_name=app) as conn:
            worker = Worker(lambda: conn.execute("SELECT pg_sleep(60)"))
            worker.start()
            wait_active(pg, app)
            conn.cancel_safe(timeout=10)
            _, exc = worker.outcome(20)
            assert isinstance(exc, errors.QueryCanceled), exc
    assert p.stop() == 0


def test_sighup_reaches_every_worker(pg, start_proxy, enforce_db, tmp_path):
    policy = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, policy)
    p = start_workers(start_proxy, "--decider", "purpose", "--policies", str(policy), "--schema-dsn",
                      pg.url("postgres", dbname="postgres"), "--policy-watch-interval", "0")
    sql = "SELECT email FROM crm.members WHERE member_id = 1"
    conns = [psycopg.connect(dsn(pg, p, **purpose_options("marketing")), autocommit=True) for _ in range(20)]
    try:
        for conn in conns:
            assert conn.execute(sql).fetchone()
        open_now = sessions(p, "purpose_proxy_client_sessions_open")
        assert all(n > 0 for n in open_now), open_now  # sessions on both workers
        versions = [Scrape.of(p.worker_metrics_url(i)).labels("purpose_proxy_policy_info") for i in range(WORKERS)]
        assert versions[0] == versions[1] and len(versions[0]) == 1

        path = policy / "policy.csv"
        path.write_text(path.read_text() + "p, staff, marketing, contact.email, read, deny\n")
        p.signal(signal.SIGHUP)

        def reloaded():
            scrapes = [Scrape.of(p.worker_metrics_url(i)) for i in range(WORKERS)]
            return all(s.get("purpose_proxy_policy_reloads_total", result="success") == 1 for s in scrapes) and scrapes

        scrapes = wait_for(reloaded, 15, "both workers to reload the policy")
        new_versions = [s.labels("purpose_proxy_policy_info") for s in scrapes]
        assert new_versions[0] == new_versions[1] != versions[0]
        for conn in conns:  # every session, on either worker, is now under the new policy
            with pytest.raises(errors.InsufficientPrivilege) as info:
                conn.execute(sql)
            assert "p, staff, marketing, contact.email, read, deny" in info.value.diag.message_detail
    finally:
        for conn in conns:
            conn.close()
    assert p.log().count("policy reloaded (SIGHUP)") == WORKERS


def test_each_worker_writes_its_own_audit_chain(pg, start_proxy):
    p = start_workers(start_proxy)
    for n in range(20):
        with psycopg.connect(dsn(pg, p), autocommit=True) as conn:
            conn.execute("SELECT 1")
    assert p.stop() == 0
    assert not p.audit_path.exists()  # nothing writes the shared name
    for i in range(WORKERS):
        path = p.worker_audit_path(i)
        result = audit.verify([path])
        assert result.ok, result.describe()
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert any(r["type"] == "session_start" for r in records), records


def test_invalid_worker_settings_are_refused(pg, tmp_path):
    for args, message in [(("--workers", "0"), "workers must be between 1 and 256"),
                          (("--workers", "2", "--audit-sink", "stdout"), "audit_sink = stdout cannot be used")]:
        p = ProxyProcess(pg.address, "--decider", "proxy.enforcement.hook:allow_all", *args)
        with pytest.raises(RuntimeError) as info:
            p.start()
        assert p.proc.returncode == 2 and message in str(info.value)


def test_ddl_through_one_worker_reaches_the_others(pg, start_proxy, enforce_db):
    # A hunt dropped a decoy table through one worker: that worker reloaded its schema, the other
    # kept deciding on the decoy (its name now meant crm.members) until its interval reload.
    from tests.integration.test_enforcement import _never_the_real_phones

    schema = f"dd_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(enforce_db, autocommit=True) as owner:
        owner.execute(f"CREATE SCHEMA {schema}")
        owner.execute(f"CREATE TABLE {schema}.members (member_id int, phone text)")
        owner.execute(f"INSERT INTO {schema}.members VALUES (1, 'not-a-phone')")
    conns = []
    try:
        p = start_workers(start_proxy, "--decider", "purpose", "--policies", str(POLICY_DIR), "--schema-dsn",
                          pg.url("postgres", dbname="postgres"), "--policy-watch-interval", "0")
        conns = [psycopg.connect(dsn(pg, p, **purpose_options("marketing")), autocommit=True) for _ in range(20)]
        for conn in conns:
            conn.execute(f"SET search_path = {schema}, crm")
            assert conn.execute("SELECT phone FROM members").fetchall() == [("not-a-phone",)]
        assert all(n > 0 for n in sessions(p, "purpose_proxy_client_sessions_open"))  # readers on both workers
        with psycopg.connect(dsn(pg, p, **purpose_options("maintenance")), autocommit=True) as admin:
            admin.execute(f"DROP TABLE {schema}.members")
        for conn in conns:  # at once: the DROP's answer came only once the sibling had the news
            _never_the_real_phones(conn)
    finally:
        for conn in conns:
            conn.close()
        with psycopg.connect(enforce_db, autocommit=True) as owner:
            owner.execute(f"DROP SCHEMA {schema} CASCADE")
