"""What /proc says about a middleman: CPU ticks and resident memory of a process and its descendants.

A middleman may be several processes (``--workers N`` forks workers under one
parent), so CPU and memory are summed over the process tree that is alive when
they are read. Resident memory summed over processes counts pages they share
(the parent's imports after a fork) once per process: an upper bound.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children; empty if it is gone)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cpu_ticks(pid: int) -> tuple[int, int]:
    """utime and stime of ``pid`` alone, in clock ticks (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])


def tree_cpu_ticks(pid: int) -> tuple[int, int]:
    """utime and stime summed over ``pid`` and its live descendants, in clock ticks."""
    user = sys = 0
    for p in tree(pid):
        try:
            u, s = cpu_ticks(p)
        except OSError:  # exited between listing and reading
            continue
        user, sys = user + u, sys + s
    return user, sys


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if m is None:
        raise ValueError(f"/proc/{pid}/status has no {field}")
    return int(m.group(1))


def tree_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status summed over ``pid`` and its live descendants."""
    total = 0
    for p in tree(pid):
        try:
            total += status_kb(p, field)
        except (OSError, ValueError):  # exited between listing and reading, or a kernel thread
            continue
    return total


def tree_rss_kb(pid: int) -> int:
    """VmRSS summed over ``pid`` and its live descendants (shared pages counted per process)."""
    return tree_status_kb(pid, "VmRSS")


def tree_hwm_kb(pid: int) -> int:
    """Peak RSS (VmHWM) summed over ``pid`` and its live descendants: an upper bound of the tree's peak."""
    return tree_status_kb(pid, "VmHWM")
