"""The targets under test: a throwaway PostgreSQL with pgbench data (and the sample ISP database),
PgBouncer and purpose-proxy (relay only, and enforcing a policy) before it."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from proxy.devtools.cluster import Cluster, User, free_port
from proxy.devtools.process import OBSERVABILITY_OFF, RELAY_ONLY, REPO, ProxyProcess

# A trust user keeps authentication out of the measurement on every path.
BENCH_USER = User("bench", None, "trust")
OBSERVED = "proxy-observed"  # the relay with metrics, audit and tracing on
ENFORCING = "proxy-enforcing"  # purpose enforcement with benchmarks/policy (pgbench's tables catalogued)
ENFORCING_2W = "proxy-enforcing-2w"  # the same with --workers 2 (once the proxy has --workers)
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
PGBENCH = shutil.which("pgbench") or "/usr/bin/pgbench"
# The benchmark policy: pgbench's tables as personal data the purpose `benchmark` may use.
BENCH_POLICY = Path(__file__).resolve().parent / "policy"
BENCH_PURPOSE = "benchmark"
# 1,000 idle clients through a proxy are 1,000 backends, plus the harness's own connections.
# Only the benchmark cluster gets this (proxy.devtools.cluster.Cluster defaults to 300).
MAX_CONNECTIONS = 1100
SAMPLE_DATABASE = "isp"  # the sample ISP database, as the demo creates it
SAMPLE_SEED = 42
# PgBouncer's server connections per sample role: the personal-data workload holds one per statement
# kind and variant of a role (4 at most), whatever pgbench's --clients make the default pool.
SAMPLE_POOL_SIZE = 8


@dataclass
class Target:
    """Where pgbench connects; ``pid`` is the middleman whose CPU is measured (None for direct);
    ``env`` is added to pgbench's environment (PGOPTIONS declaring the purpose)."""

    name: str
    host: str
    port: int
    pid: int | None = None
    env: dict[str, str] = field(default_factory=dict)


def version(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()


def proxy_accepts_workers() -> bool:
    """Whether ``python -m proxy serve`` has a ``--workers`` option (multi-process serving)."""
    r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--help"], capture_output=True, text=True,
                       cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    return "--workers" in r.stdout


def enforcing_args(policies: Path, schema_dsn: str) -> tuple[str, ...]:
    """Purpose enforcement with ``policies``; no policy file watching (a stat() every few seconds)."""
    return ("--decider", "purpose", "--policies", str(policies), "--schema-dsn", schema_dsn,
            "--policy-watch-interval", "0")


def stop_proxy(proxy: ProxyProcess) -> None:
    """Stop a proxy the harness started and remove its log, unless it had exited by itself (then the log
    stays for a post-mortem and its path is printed)."""
    crashed = proxy.proc is not None and proxy.proc.poll() is not None
    status = proxy.stop()
    if crashed:
        print(f"note: the proxy on port {proxy.port} had exited ({status}); its log: {proxy.log_path}",
              file=sys.stderr, flush=True)
    else:
        proxy.log_path.unlink(missing_ok=True)


def purpose_options(purpose: str) -> str:
    """The libpq ``options`` (PGOPTIONS) that declare ``purpose`` at connect time."""
    return f"-c pii.purpose={purpose}"


class PgBouncer:
    """PgBouncer in the foreground (session pooling, trust auth); as root it runs as ``postgres``.

    It serves ``dbname`` for ``user``; with ``sample_roles`` (role -> password) also the sample
    database, logging in to PostgreSQL as those roles with their passwords (SCRAM), and it ignores
    the ``options`` startup parameter (the purpose their clients declare)."""

    host = "127.0.0.1"

    def __init__(self, upstream: Cluster, dbname: str, user: str, pool_size: int,
                 sample_roles: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="purpose-proxy-pgbouncer-"))
        users = {user: "", **(sample_roles or {})}
        (self.dir / "userlist.txt").write_text("".join(f'"{u}" "{pw}"\n' for u, pw in users.items()))
        databases = f"{dbname} = host={upstream.host} port={upstream.port} dbname={dbname}\n"
        clients, extra = pool_size * 4, ""
        if sample_roles:
            databases += (f"{SAMPLE_DATABASE} = host={upstream.host} port={upstream.port} dbname={SAMPLE_DATABASE} "
                          f"pool_size={SAMPLE_POOL_SIZE}\n")
            clients += SAMPLE_POOL_SIZE * len(sample_roles)
            extra = "ignore_startup_parameters = options\n"
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n{databases}\n"
            f"[pgbouncer]\nlisten_addr = {self.host}\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir / 'userlist.txt'}\npool_mode = session\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = {clients}\n{extra}"
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "PgBouncer":
        demote = None
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            pw = pwd.getpwnam("postgres")
            for p in self.dir.iterdir():
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

            def demote() -> None:
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

        with open(self.dir / "pgbouncer.log", "wb") as log:
            self.proc = subprocess.Popen([PGBOUNCER, str(self.dir / "pgbouncer.ini")], stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=demote, cwd="/")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not start listening:\n{self.log()}")

    def log(self) -> str:
        return (self.dir / "pgbouncer.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: immediate shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Stack:
    """Context manager that starts PostgreSQL (with ``pgbench -i``), PgBouncer and the proxies, and stops them all.

    Targets for pgbench: ``direct``, ``pgbouncer``, ``proxy`` (relay only), ``proxy-enforcing``
    (``--decider purpose`` with benchmarks/policy; pgbench declares the purpose with PGOPTIONS),
    optionally ``proxy-observed`` and, once the proxy accepts ``--workers``, ``proxy-enforcing-2w``.
    With ``sample_members`` the cluster also gets the sample ISP database (as ``purpose-proxy demo``
    loads it) and ``personal_proxy``, an enforcing proxy with the shipped seed policy in front of it
    (or with ``personal_policies``, and ``personal_args`` added to its command line); PgBouncer then
    serves the sample database too, for the seed policy's roles.
    ``relay=False`` leaves out the relay-only proxy (and the ``proxy`` target), ``scale=0`` the pgbench
    data; ``max_connections`` is the cluster's (the soak, ``benchmarks/soak.py``, holds more clients).
    """

    def __init__(self, scale: int, pool_size: int, observability: bool = False, enforcing: bool = True,
                 workers: bool = True, sample_members: int = 0, pgbouncer: bool = True, relay: bool = True,
                 max_connections: int = MAX_CONNECTIONS, personal_policies: Path | None = None,
                 personal_args: tuple[str, ...] = ()) -> None:
        self.relay = relay
        self.max_connections = max_connections
        self.personal_policies = personal_policies
        self.personal_args = tuple(personal_args)
        self.use_pgbouncer = pgbouncer
        self.observability = observability
        self.enforcing = enforcing
        self.workers = workers
        self.sample_members = sample_members
        self.scale = scale
        self.pool_size = pool_size
        self.user = self.dbname = BENCH_USER.name
        self.notes: list[str] = []  # what was skipped and why, for the report
        self.sample_counts: dict[str, int] = {}

    def __enter__(self) -> "Stack":
        with ExitStack() as stack:
            self.cluster = Cluster(users=[BENCH_USER], settings={"max_connections": str(self.max_connections)})
            stack.callback(self.cluster.cleanup)
            self.cluster.start()
            if self.scale > 0:
                self.pgbench_init()
            if self.sample_members:
                self.load_sample()
            self.pgbouncer: PgBouncer | None = None
            if self.use_pgbouncer and not os.path.exists(PGBOUNCER):
                note = f"pgbouncer skipped: {PGBOUNCER} not found (Debian: apt-get install pgbouncer)"
                print("note: " + note, flush=True)
                self.notes.append(note)
            elif self.use_pgbouncer:
                self.pgbouncer = PgBouncer(self.cluster, self.dbname, self.user, self.pool_size,
                                           self.sample_logins())
                stack.callback(self.pgbouncer.stop)
                self.pgbouncer.start()
            # The relay alone: no decisions, and metrics, traces and audit off
            # (OBSERVABILITY_OFF), so results stay comparable across versions.
            self.proxy: ProxyProcess | None = None
            if self.relay:
                self.proxy = ProxyProcess(self.cluster.address, *RELAY_ONLY, *OBSERVABILITY_OFF)
                stack.callback(stop_proxy, self.proxy)
                self.proxy.start()
            if self.enforcing:
                # Enforcement on, observability off like the relay: the difference to the
                # relay is what deciding costs (with a warm decision cache, after the warm-up).
                self.enforcer = ProxyProcess(self.cluster.address, *enforcing_args(BENCH_POLICY, self.schema_dsn),
                                             *OBSERVABILITY_OFF)
                stack.callback(stop_proxy, self.enforcer)
                self.enforcer.start()
            if self.observability:
                # The same relay with metrics, the audit log (a temporary file) and
                # tracing (exporter none) on: the difference is what observability costs.
                self.observed = ProxyProcess(self.cluster.address, *RELAY_ONLY, "--metrics-listen",
                                             f"127.0.0.1:{free_port()}", "--trace-exporter", "none")
                stack.callback(stop_proxy, self.observed)
                self.observed.start()
            # ---- HOOK: scaling from 1 to 2 workers -------------------------------------------
            # `--workers N` (several processes on one port) is being added to the proxy. Until
            # `python -m proxy serve --help` lists it, this target is skipped with a note; then
            # it lights up by itself: the enforcing proxy with --workers 2, measured like the
            # others (CPU summed over the worker processes) and reported next to the 1-worker one.
            self.enforcer_2w: ProxyProcess | None = None
            if self.enforcing and self.workers:
                if proxy_accepts_workers():
                    self.enforcer_2w = ProxyProcess(self.cluster.address,
                                                    *enforcing_args(BENCH_POLICY, self.schema_dsn),
                                                    *OBSERVABILITY_OFF, "--workers", "2")
                    stack.callback(stop_proxy, self.enforcer_2w)
                    self.enforcer_2w.start()
                else:
                    note = (f"{ENFORCING_2W} skipped: `python -m proxy serve` does not accept --workers yet "
                            "(scaling from 1 to 2 workers is measured once it does)")
                    print("note: " + note, flush=True)
                    self.notes.append(note)
            # ----------------------------------------------------------------------------------
            if self.sample_members:
                self.personal_metrics_port = free_port()
                self.personal_proxy = ProxyProcess(
                    self.cluster.address,
                    *enforcing_args(self.personal_policies or self.seed_policies, self.sample_reader_dsn),
                    # metrics on (for the decision cache's hit counters), audit and tracing off
                    "--metrics-listen", f"127.0.0.1:{self.personal_metrics_port}", "--audit-sink", "none",
                    "--trace-exporter", "none", *self.personal_args)
                stack.callback(stop_proxy, self.personal_proxy)
                self.personal_proxy.start(timeout=60)
            self._cleanup = stack.pop_all()
        pgoptions = {"PGOPTIONS": purpose_options(BENCH_PURPOSE)}
        self.targets = [Target("direct", self.cluster.host, self.cluster.port)]
        if self.pgbouncer is not None:
            self.targets.append(Target("pgbouncer", self.pgbouncer.host, self.pgbouncer.port,
                                       self.pgbouncer.proc.pid))
        if self.proxy is not None:
            self.targets.append(Target("proxy", self.proxy.host, self.proxy.port, self.proxy.proc.pid))
        if self.enforcing:
            self.targets.append(Target(ENFORCING, self.enforcer.host, self.enforcer.port, self.enforcer.proc.pid,
                                       pgoptions))
        if self.observability:
            self.targets.append(Target(OBSERVED, self.observed.host, self.observed.port, self.observed.proc.pid))
        if self.enforcer_2w is not None:
            self.targets.append(Target(ENFORCING_2W, self.enforcer_2w.host, self.enforcer_2w.port,
                                       self.enforcer_2w.proc.pid, pgoptions))
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup.close()

    @property
    def schema_dsn(self) -> str:
        """The enforcing proxies' own connection for reading schemas (trust, over TCP)."""
        return f"postgresql://postgres@{self.cluster.host}:{self.cluster.port}/postgres"

    def proxies(self) -> dict[str, ProxyProcess]:
        """The proxy processes, by target name (``personal`` for the sample database's)."""
        out = {"proxy": self.proxy} if self.proxy is not None else {}
        if self.enforcing:
            out[ENFORCING] = self.enforcer
        if self.observability:
            out[OBSERVED] = self.observed
        if self.enforcer_2w is not None:
            out[ENFORCING_2W] = self.enforcer_2w
        if self.sample_members:
            out["personal"] = self.personal_proxy
        return out

    def pgbench_init(self) -> None:
        r = subprocess.run([PGBENCH, "-i", "-q", "-s", str(self.scale), "-h", self.cluster.host,
                            "-p", str(self.cluster.port), "-U", self.user, self.dbname],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench -i failed ({r.returncode}):\n{r.stderr}")

    def load_sample(self) -> None:
        """The sample ISP database as ``purpose-proxy demo`` creates it (the seed policy's roles with
        password ``demo``, schema, fake data, grants, the pseudonym function), plus indexes on the
        foreign keys the personal-data workload joins on (as a production database would have)."""
        from proxy import demo
        from proxy.devtools.sample import policies_dir
        from proxy.policy.engine import Policy

        self.seed_policies = policies_dir()
        policy = Policy.load(self.seed_policies)
        roles = sorted(s for s in policy.subjects if s not in policy.groups)
        self.sample_roles = roles
        self.sample_counts = asyncio.run(demo.setup_database(self.cluster, roles, self.sample_members,
                                                             SAMPLE_SEED))
        self.cluster.psql_admin("CREATE INDEX ON billing.invoices (member_id); "
                                "CREATE INDEX ON billing.payments (invoice_id); ANALYZE", dbname=SAMPLE_DATABASE)
        self.sample_password = demo.PASSWORD
        self.sample_reader_dsn = (f"postgresql://{demo.READER}:{demo.PASSWORD}@{self.cluster.host}:"
                                  f"{self.cluster.port}/postgres")

    def sample_logins(self) -> dict[str, str] | None:
        """The sample roles and their password, for PgBouncer (None without the sample database)."""
        return {role: self.sample_password for role in self.sample_roles} if self.sample_members else None

    def reset(self) -> None:
        """What ``pgbench`` does before a run unless ``-n``, done directly so no target pays for it."""
        for sql in ("VACUUM pgbench_branches, pgbench_tellers", "TRUNCATE pgbench_history"):
            self.cluster.psql_admin(sql, dbname=self.dbname)  # VACUUM refuses a transaction block

    def uses_uvloop(self) -> bool:
        proxy = self.proxy if self.proxy is not None else next(iter(self.proxies().values()))
        return "uvloop" in Path(f"/proc/{proxy.proc.pid}/maps").read_text()

    def versions(self) -> dict[str, str]:
        return {
            "postgresql": version(str(self.cluster.bin_dir / "postgres"), "--version"),
            "pgbouncer": version(PGBOUNCER, "--version") if self.pgbouncer is not None else "not used",
            "pgbench": version(PGBENCH, "--version"),
        }
