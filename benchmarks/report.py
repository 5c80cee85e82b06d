"""Summarising runs: the machine description, medians and ratios, the console table, RESULTS.md and the JSON dump."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from statistics import median

from benchmarks.pgbench import WORKLOADS, Run

TARGETS = ("direct", "pgbouncer", "proxy")
BEGIN = "<!-- benchmarks:begin (written by `python -m benchmarks`; edits up to the end marker are overwritten) -->"
END = "<!-- benchmarks:end -->"


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mem_kb = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.MULTILINE).group(1))
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or "unknown",
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.platform(),
        "python": platform.python_version(),
    }


def revision() -> str:
    """The commit measured, flagged when proxy/ has uncommitted changes (the working tree is what runs)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), *args],
                              capture_output=True, text=True).stdout.strip()

    dirty = " + uncommitted changes under proxy/" if git("status", "--porcelain", "--", "proxy") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def summarise(runs: list[Run]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Medians across rounds: summary[workload][target] = {tps, latency_ms, cpu_us, cpu_user_us, cpu_sys_us}."""
    out: dict = {}
    targets = list(TARGETS) + sorted({r.target for r in runs} - set(TARGETS))  # e.g. proxy-observed
    for w in WORKLOADS:
        for t in targets:
            rs = [r for r in runs if r.workload == w and r.target == t]
            if not rs:
                continue
            med = {k: median(getattr(r, k) for r in rs) for k in ("tps", "latency_ms")}
            for k in ("cpu_us", "cpu_user_us", "cpu_sys_us"):
                vals = [getattr(r, k) for r in rs if getattr(r, k) is not None]
                med[k] = median(vals) if vals else None
            out.setdefault(w, {})[t] = med
    return out


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _cpu(total: float | None, user: float | None, sys: float | None) -> str:
    return "-" if total is None else f"{total:.1f} ({user:.1f}+{sys:.1f})"


def summary_table(summary: dict) -> str:
    rows = []
    for w, by in summary.items():
        tps = {t: by[t]["tps"] if t in by else None for t in TARGETS}

        def ratio(a: str, b: str) -> str:
            return f"{tps[a] / tps[b]:.2f}" if tps[a] and tps[b] else "-"

        rows.append([w, *(f"{tps[t]:.0f}" if tps[t] else "-" for t in TARGETS),
                     ratio("proxy", "direct"), ratio("proxy", "pgbouncer"), ratio("pgbouncer", "direct"),
                     " / ".join(f"{by[t]['latency_ms']:.3f}" if t in by else "-" for t in TARGETS),
                     *(_cpu(*(by[t][k] for k in ("cpu_us", "cpu_user_us", "cpu_sys_us"))) if t in by else "-"
                       for t in ("pgbouncer", "proxy"))])
    return table(["workload", "TPS direct", "TPS pgbouncer", "TPS proxy", "proxy/direct", "proxy/pgbouncer",
                  "pgbouncer/direct", "latency ms direct / pgbouncer / proxy",
                  "CPU us/txn pgbouncer (user+sys)", "CPU us/txn proxy (user+sys)"], rows)


def observability_table(summary: dict) -> str:
    """What metrics, audit and tracing cost: the observed relay against the plain relay."""
    rows = []
    for w, by in summary.items():
        if "proxy" not in by or "proxy-observed" not in by:
            continue
        plain, observed = by["proxy"], by["proxy-observed"]
        rows.append([w, f"{plain['tps']:.0f}", f"{observed['tps']:.0f}", f"{observed['tps'] / plain['tps']:.3f}",
                     _cpu(plain["cpu_us"], plain["cpu_user_us"], plain["cpu_sys_us"]),
                     _cpu(observed["cpu_us"], observed["cpu_user_us"], observed["cpu_sys_us"])])
    return table(["workload", "TPS relay", "TPS relay + observability", "ratio", "CPU us/txn relay",
                  "CPU us/txn relay + observability"], rows)


def raw_table(runs: list[Run]) -> str:
    return table(["round", "workload", "target", "TPS", "latency ms", "transactions", "failed",
                  "CPU us/txn (user+sys)"],
                 [[str(r.round), r.workload, r.target, f"{r.tps:.0f}", f"{r.latency_ms:.3f}", str(r.transactions),
                   str(r.failed), _cpu(r.cpu_us, r.cpu_user_us, r.cpu_sys_us)] for r in runs])


def markdown(meta: dict, runs: list[Run], summary: dict) -> str:
    env = [f"- **{k}**: {v}" for k, v in {**meta["machine"], **meta["versions"]}.items()]
    return "\n".join([
        BEGIN,
        f"## Latest run: {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        *env,
        f"- **proxy code**: {meta['revision']}",
        f"- **proxy event loop**: {'uvloop' if meta['uvloop'] else 'asyncio (uvloop not loaded)'}",
        f"- **settings**: {meta['rounds']} rounds x {meta['duration']} s per run, {meta['clients']} clients, "
        f"{meta['threads']} threads, scale {meta['scale']}, PgBouncer pool_mode=session",
        f"- **load average** before / after: {meta['load_before']} / {meta['load_after']}",
        "",
        f"### Summary (medians over {meta['rounds']} rounds)",
        "",
        summary_table(summary),
        "",
        *(["### Cost of metrics + audit log + tracing (exporter none)", "", observability_table(summary), ""]
          if any("proxy-observed" in by for by in summary.values()) else []),
        "### Per-round raw numbers",
        "",
        raw_table(runs),
        END,
    ])


def write_results(path: Path, section: str) -> None:
    """Replace this harness's section of ``path``, keeping anything outside the markers."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        text = head + section + rest.partition(END)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def write_json(path: Path, meta: dict, runs: list[Run], summary: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "runs": [r.as_dict() for r in runs], "summary": summary}, indent=2)
                    + "\n")
