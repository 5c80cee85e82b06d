"""One pgbench measurement against a target: the command, its parsed output, and the middleman's CPU."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass

from benchmarks.procfs import TICK_US, tree_cpu_ticks
from benchmarks.stack import PGBENCH, Target

WORKLOADS = {
    "select": ["-S"],
    "select-prepared": ["-S", "-M", "prepared"],
    "tpcb": [],
}
# Statements per transaction of each workload (TPC-B: BEGIN, 3 UPDATE, SELECT, INSERT, END),
# to turn CPU per transaction into CPU per statement.
STATEMENTS = {"select": 1, "select-prepared": 1, "tpcb": 7}


class PgbenchError(RuntimeError):
    pass


@dataclass
class Run:
    round: int
    workload: str
    target: str
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    # CPU of the middleman (pgbouncer or proxy, with its workers) per transaction, in microseconds;
    # None for direct.
    cpu_user_us: float | None
    cpu_sys_us: float | None

    @property
    def cpu_us(self) -> float | None:
        return None if self.cpu_user_us is None else self.cpu_user_us + self.cpu_sys_us

    @property
    def cpu_us_per_statement(self) -> float | None:
        return None if self.cpu_us is None else self.cpu_us / STATEMENTS[self.workload]

    def as_dict(self) -> dict:
        return {**asdict(self), "cpu_us": self.cpu_us}


def cpu_ticks(pid: int) -> tuple[int, int]:
    """utime and stime of ``pid`` and its descendants (workers), in clock ticks."""
    return tree_cpu_ticks(pid)


def _number(pattern: str, text: str) -> str:
    m = re.search(pattern, text, re.MULTILINE)
    if m is None:
        raise PgbenchError(f"pgbench output lacks {pattern!r}:\n{text}")
    return m.group(1)


def run(target: Target, workload: str, rnd: int, duration: int, clients: int, threads: int,
        user: str, dbname: str) -> Run:
    cmd = [PGBENCH, "-n", "-h", target.host, "-p", str(target.port), "-U", user,
           "-c", str(clients), "-j", str(threads), "-T", str(duration), *WORKLOADS[workload], dbname]
    env = {**os.environ, **target.env} if target.env else None  # e.g. PGOPTIONS declaring the purpose
    before = cpu_ticks(target.pid) if target.pid else None
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    after = cpu_ticks(target.pid) if target.pid else None
    if r.returncode != 0:
        raise PgbenchError(f"pgbench against {target.name} exited with {r.returncode}: {' '.join(cmd)}\n"
                           f"--- stderr ---\n{r.stderr}--- stdout ---\n{r.stdout}")
    txns = int(_number(r"^number of transactions actually processed: (\d+)", r.stdout))
    failed = re.search(r"^number of failed transactions: (\d+)", r.stdout, re.MULTILINE)
    user_us = sys_us = None
    if before is not None and txns:
        user_us = (after[0] - before[0]) * TICK_US / txns
        sys_us = (after[1] - before[1]) * TICK_US / txns
    return Run(rnd, workload, target.name,
               tps=float(_number(r"^tps = ([\d.]+)", r.stdout)),
               latency_ms=float(_number(r"^latency average = ([\d.]+) ms", r.stdout)),
               transactions=txns, failed=int(failed.group(1)) if failed else 0,
               cpu_user_us=user_us, cpu_sys_us=sys_us)
