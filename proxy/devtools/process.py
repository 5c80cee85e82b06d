"""Running the real purpose-proxy as a subprocess, for tests, benchmarks and the demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from proxy.devtools.cluster import free_port

# Arguments that make the proxy relay every statement (no policy): for the protocol
# tests and the relay-only benchmark.
RELAY_ONLY = ("--decider", "proxy.enforcement.hook:allow_all")
# Arguments that turn metrics, traces and the audit log off: with RELAY_ONLY, the
# relay alone (the benchmarks' baseline; leave these out to measure observability).
OBSERVABILITY_OFF = ("--metrics-listen", "off", "--trace-exporter", "none", "--audit-sink", "none")

REPO = Path(__file__).resolve().parents[2]  # the checkout, so tests.support deciders import


class ProxyProcess:
    """``python -m proxy serve`` on a free port; ``stop()`` sends SIGTERM and waits.

    Unless the arguments say otherwise, the metrics endpoint gets a free port of
    its own (``metrics_port``) and the audit log a file in the temporary directory
    (``audit_path``), so that several proxies can run side by side. With
    ``--workers N`` the N ports after ``metrics_port`` are free too (worker i's
    endpoint, ``worker_metrics_url(i)``) and each worker writes
    ``worker_audit_path(i)``.
    """

    def __init__(self, upstream: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        extra: list[str] = []
        self.metrics_port: int | None = None
        self.workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
        if "--metrics-listen" not in args:
            self.metrics_port = free_port() if self.workers == 1 else free_port_run(self.workers + 1)
            extra += ["--metrics-listen", f"{self.host}:{self.metrics_port}"]
        self.audit_path: Path | None = None
        if "--audit-path" not in args and "--audit-sink" not in args:
            self.audit_path = tmp / f"purpose-proxy-audit-{self.port}.jsonl"
            for old in [self.audit_path, *self.audit_path.parent.glob(self.audit_path.name + ".*")]:
                old.unlink(missing_ok=True)  # a leftover of an earlier run on the same port
            extra += ["--audit-path", str(self.audit_path)]
        self.args = ["--listen", f"{self.host}:{self.port}", "--upstream", upstream, *extra, *args]
        self.log_path = tmp / f"purpose-proxy-test-{self.port}.log"
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "ProxyProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"proxy did not start listening:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        """The base URL of the metrics and health endpoint (``/metrics``, ``/healthz``, ``/readyz``)."""
        return f"http://{self.host}:{self.metrics_port}"

    def worker_metrics_url(self, index: int) -> str:
        """With ``--workers``: the base URL of worker ``index``'s own endpoint (proxy.workers)."""
        return f"http://{self.host}:{self.metrics_port + 1 + index}"

    def worker_audit_path(self, index: int) -> Path:
        """With ``--workers``: worker ``index``'s audit file (proxy.workers.worker_audit_path)."""
        return self.audit_path.with_name(f"{self.audit_path.stem}.worker{index}{self.audit_path.suffix}")


def free_port_run(count: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """The first of ``count`` consecutive ports that are free now (for a proxy with workers' endpoints)."""
    for _ in range(attempts):
        first = free_port(host)
        if first + count > 65536:
            continue
        held = []
        try:
            for port in range(first, first + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")
