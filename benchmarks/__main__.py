"""Command line of the benchmark harness: options, the interleaved rounds, and where the report goes."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from benchmarks import decisions, idle, personal, pgbench, report
from benchmarks.stack import (
    ENFORCING,
    ENFORCING_2W,
    OBSERVED,
    SAMPLE_DATABASE,
    Stack,
    Target,
)

DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


PARTS = ("pgbench", "personal", "decisions", "idle")
# --quick: everything briefly (a smoke test); options given explicitly win.
QUICK = {"rounds": 1, "duration": 2, "scale": 1, "statements": 30, "members": 100, "decision_runs": 20,
         "idle_connections": 50}
FULL = {"rounds": 3, "duration": 10, "scale": 10, "statements": 1000, "members": 1000, "decision_runs": 200,
        "idle_connections": 1000}
TARGET_NAMES = ["direct", "pgbouncer", "proxy", ENFORCING, OBSERVED, ENFORCING_2W]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="pgbench against PostgreSQL directly, through PgBouncer and "
                                            "through purpose-proxy (relay only and enforcing), in interleaved "
                                            "rounds; a personal-data workload on the sample database; decision "
                                            "latency per query kind; proxy memory with idle connections.")
    p.add_argument("--duration", type=int, metavar="SECONDS", help="length of each pgbench run (10)")
    p.add_argument("--rounds", type=int, help="rounds of pgbench and of the personal-data workload; the report "
                                              "gives medians across pgbench rounds (3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run of every part: 1 round of 2 s at scale 1, 30 statements per kind, 100 members, "
                        "20 decisions per kind, 50 idle connections; does not write RESULTS.md unless --results "
                        "is given")
    p.add_argument("--scale", type=int, help="pgbench -i scale factor (10)")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (8)")
    p.add_argument("--threads", type=int, default=2, help="pgbench -j (2)")
    p.add_argument("--workloads", nargs="+", choices=list(pgbench.WORKLOADS), default=list(pgbench.WORKLOADS))
    p.add_argument("--targets", nargs="+", choices=TARGET_NAMES, metavar="TARGET",
                   help=f"pgbench targets to measure (default all that run: {' '.join(TARGET_NAMES)})")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="what to run (default all): pgbench rounds, the personal-data workload, in-process "
                        "decision latency, RSS with idle connections")
    p.add_argument("--statements", type=int, metavar="N",
                   help="personal-data workload: timed statements per kind, variant, path and round (1000)")
    p.add_argument("--members", type=int, metavar="N", help="members of the generated sample database (1000)")
    p.add_argument("--decision-runs", type=int, metavar="N", help="timed decisions per query kind and mode (200)")
    p.add_argument("--idle-connections", type=int, metavar="N", help="idle clients held through each proxy (1000)")
    p.add_argument("--results", type=Path, metavar="FILE", help=f"markdown report (default {DEFAULT_RESULTS})")
    p.add_argument("--json", type=Path, metavar="FILE", help="also dump the raw results as JSON")
    p.add_argument("--observability", action="store_true",
                   help="also run the relay with metrics, audit log and tracing (exporter none) on, "
                        "and report what they cost")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.quick and args.results is None:
        args.results = DEFAULT_RESULTS
    return args


def warm_up(stack: Stack, targets: list[Target], args: argparse.Namespace, common: dict) -> None:
    """Unrecorded runs: pools, the proxies' imports and, for enforcing targets, the decision cache
    (every workload's statements decided once, so the rounds run with a warm cache)."""
    for target in targets:
        pgbench.run(target, "select", 0, min(2, args.duration), **common)
        if target.name in (ENFORCING, ENFORCING_2W):
            for workload in args.workloads:
                stack.reset()
                pgbench.run(target, workload, 0, 1, **common)


def measure(stack: Stack, args: argparse.Namespace) -> list[pgbench.Run]:
    """Every workload on every target, round after round; the target order rotates each round."""
    common = dict(clients=args.clients, threads=args.threads, user=stack.user, dbname=stack.dbname)
    targets = [t for t in stack.targets if args.targets is None or t.name in args.targets]
    warm_up(stack, targets, args, common)
    runs = []
    for rnd in range(1, args.rounds + 1):
        shift = (rnd - 1) % len(targets)
        order = targets[shift:] + targets[:shift]
        for workload in args.workloads:
            for target in order:
                stack.reset()
                r = pgbench.run(target, workload, rnd, args.duration, **common)
                runs.append(r)
                cpu = "" if r.cpu_us is None else f"  cpu {r.cpu_us:7.1f} us/txn"
                print(f"round {rnd}/{args.rounds}  {workload:16} {target.name:18} tps {r.tps:9.0f}  "
                      f"latency {r.latency_ms:7.3f} ms{cpu}", flush=True)
    return runs


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _sqlglot_build() -> str:
    """sqlglot's version, and whether sqlglotc's compiled modules are what imports (the proxies run here too)."""
    import sqlglot
    import sqlglot.parser

    compiled = not sqlglot.parser.__file__.endswith(".py")
    return f"{sqlglot.__version__}" + (" compiled (sqlglotc)" if compiled else " (pure Python)")


def _compiled_loops() -> str:
    """Which of the proxy's optional C loops (setup.py) import here (the proxies run here too)."""
    from proxy.analysis import shape
    from proxy.wire import codec

    built = [name for name, loop in (("framing", codec.COMPILED_SPLIT), ("shapes", shape.COMPILED_SCAN))
             if loop is not None]
    return ", ".join(built) if built else "none (Python loops)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind like Ctrl-C: stop what was started
    started = time.monotonic()
    parts = set(args.parts)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": report.machine(),
        "revision": report.revision(),
        **{k: getattr(args, k) for k in ("rounds", "duration", "clients", "threads", "scale")},
        "load_before": _loadavg(),
        "load": {},
    }
    if "idle" in parts:
        idle.raise_nofile(idle.needed_nofile(args.idle_connections))  # before any child starts: they inherit it
    runs: list[pgbench.Run] = []
    extras: dict = {}
    try:
        print(f"setting up PostgreSQL (pgbench -i -s {args.scale}"
              + (f", sample database with {args.members} members" if "personal" in parts or "decisions" in parts
                 else "") + "), PgBouncer and purpose-proxy ...", flush=True)
        wanted = set(args.targets or TARGET_NAMES) if "pgbench" in parts else set()
        with Stack(args.scale, pool_size=args.clients * 2, observability=args.observability,
                   pgbouncer="pgbouncer" in wanted or "personal" in parts,
                   enforcing=bool(wanted & {ENFORCING, ENFORCING_2W}), workers=ENFORCING_2W in wanted,
                   sample_members=args.members if parts & {"personal", "decisions"} else 0) as stack:
            meta["versions"] = stack.versions()
            meta["uvloop"] = stack.uses_uvloop()
            meta["sqlglot"] = _sqlglot_build()
            meta["compiled_loops"] = _compiled_loops()
            meta["notes"] = list(stack.notes)
            if not meta["uvloop"]:
                print("warning: the proxy is not using uvloop (pip install uvloop)", file=sys.stderr)
            if "pgbench" in parts:
                meta["load"]["pgbench"] = _loadavg()
                try:
                    runs = measure(stack, args)
                except pgbench.PgbenchError as exc:
                    for name, proc in stack.proxies().items():
                        if f"against {name} " in str(exc):
                            alive = proc.proc.poll() is None
                            print(f"--- {name} ({'running' if alive else f'exited {proc.proc.returncode}'}), "
                                  f"log {proc.log_path} ---\n{proc.log()[-4000:]}", file=sys.stderr)
                    print(exc, file=sys.stderr)
                    return 1
            if "personal" in parts:
                meta["load"]["personal"] = _loadavg()
                print(f"personal-data workload: {args.rounds} rounds x {args.statements} statements per kind, "
                      "variant and path ...", flush=True)
                extras["personal"] = personal.measure(stack, args.rounds, args.statements)
            if "decisions" in parts:
                meta["load"]["decisions"] = _loadavg()
                print(f"decision latency in-process: {args.decision_runs} runs per kind, cold and warm ...",
                      flush=True)
                state = asyncio.run(decisions.live_state(stack.sample_reader_dsn, SAMPLE_DATABASE))
                extras["decisions"] = decisions.measure(stack.seed_policies, state, SAMPLE_DATABASE,
                                                        args.decision_runs)
            if "idle" in parts:
                meta["load"]["idle"] = _loadavg()
                print(f"RSS with {args.idle_connections} idle connections ...", flush=True)
                extras["idle"] = idle.measure(stack, args.idle_connections)
            extras["rss_at_end"] = idle.snapshot(stack)
    except KeyboardInterrupt:
        print("interrupted; stopped everything", file=sys.stderr)
        return 130
    meta["load_after"] = _loadavg()
    meta["elapsed"] = f"{time.monotonic() - started:.0f} s"
    summary = report.summarise(runs)
    print()
    if runs:
        print(report.summary_table(summary))
        if any(ENFORCING in by for by in summary.values()):
            print()
            print(report.enforcement_table(summary))
        if any(ENFORCING_2W in by for by in summary.values()):
            print()
            print(report.workers_table(summary))
    if args.observability:
        print(report.observability_table(summary))
    if "personal" in extras:
        for variant in personal.VARIANTS:
            print(f"\npersonal-data workload, {variant} (microseconds):")
            print(report.personal_table(extras["personal"], variant))
    if "decisions" in extras:
        print("\ndecision latency in-process (microseconds):")
        print(report.decisions_table(extras["decisions"]))
    if "idle" in extras:
        print()
        print(report.idle_table(extras["idle"]))
    checks = report.acceptance(summary, extras)
    if checks:
        print()
        print(report.table(["issue #6 criterion", "measured", ""], checks))
    for note in meta["notes"]:
        print(f"note: {note}")
    if args.results:
        report.write_results(args.results, report.markdown(meta, runs, summary, extras))
        print(f"\nwrote {args.results}")
    if args.json:
        report.write_json(args.json, meta, runs, summary, extras)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
