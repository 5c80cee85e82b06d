"""The three targets under test: a throwaway PostgreSQL with pgbench data, PgBouncer and purpose-proxy before it."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from proxy.devtools.cluster import Cluster, User, free_port
from proxy.devtools.process import OBSERVABILITY_OFF, RELAY_ONLY, ProxyProcess

# A trust user keeps authentication out of the measurement on every path.
BENCH_USER = User("bench", None, "trust")
OBSERVED = "proxy-observed"  # the relay with metrics, audit and tracing on
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
PGBENCH = shutil.which("pgbench") or "/usr/bin/pgbench"


@dataclass
class Target:
    """Where pgbench connects; ``pid`` is the middleman whose CPU is measured (None for direct)."""

    name: str
    host: str
    port: int
    pid: int | None = None


def version(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()


class PgBouncer:
    """PgBouncer in the foreground (session pooling, trust auth); as root it runs as ``postgres``."""

    def __init__(self, upstream: Cluster, dbname: str, user: str, pool_size: int) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="purpose-proxy-pgbouncer-"))
        (self.dir / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n{dbname} = host={upstream.host} port={upstream.port} dbname={dbname}\n\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir / 'userlist.txt'}\npool_mode = session\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = {pool_size * 4}\n"
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
    """Context manager that starts PostgreSQL (with ``pgbench -i``), PgBouncer and the proxy, and stops them all."""

    def __init__(self, scale: int, pool_size: int, observability: bool = False) -> None:
        self.observability = observability
        self.scale = scale
        self.pool_size = pool_size
        self.user = self.dbname = BENCH_USER.name

    def __enter__(self) -> "Stack":
        with ExitStack() as stack:
            self.cluster = Cluster(users=[BENCH_USER])
            stack.callback(self.cluster.cleanup)
            self.cluster.start()
            self.pgbench_init()
            self.pgbouncer = PgBouncer(self.cluster, self.dbname, self.user, self.pool_size)
            stack.callback(self.pgbouncer.stop)
            self.pgbouncer.start()
            # The relay alone: no decisions, and metrics, traces and audit off
            # (OBSERVABILITY_OFF), so results stay comparable across versions.
            self.proxy = ProxyProcess(self.cluster.address, *RELAY_ONLY, *OBSERVABILITY_OFF)
            stack.callback(self.proxy.stop)
            self.proxy.start()
            if self.observability:
                # The same relay with metrics, the audit log (a temporary file) and
                # tracing (exporter none) on: the difference is what observability costs.
                self.observed = ProxyProcess(self.cluster.address, *RELAY_ONLY, "--metrics-listen",
                                             f"127.0.0.1:{free_port()}", "--trace-exporter", "none")
                stack.callback(self.observed.stop)
                self.observed.start()
            self._cleanup = stack.pop_all()
        self.targets = [
            Target("direct", self.cluster.host, self.cluster.port),
            Target("pgbouncer", "127.0.0.1", self.pgbouncer.port, self.pgbouncer.proc.pid),
            Target("proxy", self.proxy.host, self.proxy.port, self.proxy.proc.pid),
        ]
        if self.observability:
            self.targets.append(Target(OBSERVED, self.observed.host, self.observed.port, self.observed.proc.pid))
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup.close()

    def pgbench_init(self) -> None:
        r = subprocess.run([PGBENCH, "-i", "-q", "-s", str(self.scale), "-h", self.cluster.host,
                            "-p", str(self.cluster.port), "-U", self.user, self.dbname],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench -i failed ({r.returncode}):\n{r.stderr}")

    def reset(self) -> None:
        """What ``pgbench`` does before a run unless ``-n``, done directly so no target pays for it."""
        for sql in ("VACUUM pgbench_branches, pgbench_tellers", "TRUNCATE pgbench_history"):
            self.cluster.psql_admin(sql, dbname=self.dbname)  # VACUUM refuses a transaction block

    def uses_uvloop(self) -> bool:
        return "uvloop" in Path(f"/proc/{self.proxy.proc.pid}/maps").read_text()

    def versions(self) -> dict[str, str]:
        return {
            "postgresql": version(str(self.cluster.bin_dir / "postgres"), "--version"),
            "pgbouncer": version(PGBOUNCER, "--version"),
            "pgbench": version(PGBENCH, "--version"),
        }
