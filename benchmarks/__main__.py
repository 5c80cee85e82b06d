"""Command line of the benchmark harness: options, the interleaved rounds, and where the report goes."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import sys
from pathlib import Path

from benchmarks import pgbench, report
from benchmarks.stack import Stack

DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="pgbench against PostgreSQL directly, through PgBouncer and "
                                            "through purpose-proxy, in interleaved rounds.")
    p.add_argument("--duration", type=int, default=10, metavar="SECONDS", help="length of each pgbench run (10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the report gives medians across them (3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 2 s at scale 1; does not write RESULTS.md unless --results is given")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (10)")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (8)")
    p.add_argument("--threads", type=int, default=2, help="pgbench -j (2)")
    p.add_argument("--workloads", nargs="+", choices=list(pgbench.WORKLOADS), default=list(pgbench.WORKLOADS))
    p.add_argument("--results", type=Path, metavar="FILE", help=f"markdown report (default {DEFAULT_RESULTS})")
    p.add_argument("--json", type=Path, metavar="FILE", help="also dump the raw results as JSON")
    p.add_argument("--observability", action="store_true",
                   help="also run the relay with metrics, audit log and tracing (exporter none) on, "
                        "and report what they cost")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.scale = 1, 2, 1
    elif args.results is None:
        args.results = DEFAULT_RESULTS
    return args


def measure(stack: Stack, args: argparse.Namespace) -> list[pgbench.Run]:
    """Every workload on every target, round after round; the target order rotates each round."""
    common = dict(clients=args.clients, threads=args.threads, user=stack.user, dbname=stack.dbname)
    for target in stack.targets:  # warm caches, pools and the proxy's imports; not recorded
        pgbench.run(target, "select", 0, min(2, args.duration), **common)
    runs = []
    for rnd in range(1, args.rounds + 1):
        shift = (rnd - 1) % len(stack.targets)
        order = stack.targets[shift:] + stack.targets[:shift]
        for workload in args.workloads:
            for target in order:
                stack.reset()
                r = pgbench.run(target, workload, rnd, args.duration, **common)
                runs.append(r)
                cpu = "" if r.cpu_us is None else f"  cpu {r.cpu_us:7.1f} us/txn"
                print(f"round {rnd}/{args.rounds}  {workload:16} {target.name:10} tps {r.tps:9.0f}  "
                      f"latency {r.latency_ms:7.3f} ms{cpu}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind like Ctrl-C: stop what was started
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": report.machine(),
        "revision": report.revision(),
        **{k: getattr(args, k) for k in ("rounds", "duration", "clients", "threads", "scale")},
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        print(f"setting up PostgreSQL (pgbench -i -s {args.scale}), PgBouncer and purpose-proxy ...", flush=True)
        with Stack(args.scale, pool_size=args.clients * 2, observability=args.observability) as stack:
            meta["versions"] = stack.versions()
            meta["uvloop"] = stack.uses_uvloop()
            if not meta["uvloop"]:
                print("warning: the proxy is not using uvloop (pip install uvloop)", file=sys.stderr)
            try:
                runs = measure(stack, args)
            except pgbench.PgbenchError as exc:
                alive = stack.proxy.proc.poll() is None
                print(f"{exc}\n--- proxy ({'running' if alive else f'exited {stack.proxy.proc.returncode}'}), "
                      f"log {stack.proxy.log_path} ---\n{stack.proxy.log()[-4000:]}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("interrupted; stopped everything", file=sys.stderr)
        return 130
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = report.summarise(runs)
    print()
    print(report.summary_table(summary))
    if args.observability:
        print(report.observability_table(summary))
    if args.results:
        report.write_results(args.results, report.markdown(meta, runs, summary))
        print(f"\nwrote {args.results}")
    if args.json:
        report.write_json(args.json, meta, runs, summary)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
