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

REPO = Path(__file__).resolve().parents[2]  # the checkout, so tests.support deciders import


class ProxyProcess:
    """``python -m proxy serve`` on a free port; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, upstream: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.args = ["--listen", f"{self.host}:{self.port}", "--upstream", upstream, *args]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"purpose-proxy-test-{self.port}.log"
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
