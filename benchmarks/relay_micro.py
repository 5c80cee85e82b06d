"""A micro benchmark of the sans-IO relay alone: CPU time per statement, no sockets.

It feeds one Query and a typical four-message answer (RowDescription, DataRow,
CommandComplete, ReadyForQuery) through ``Relay`` N times and reports
``time.process_time`` per statement, the median of several repetitions. Used to
keep changes to the hot path honest (see benchmarks/README.md):

    python -m benchmarks.relay_micro            # 100k statements x 7 repetitions
    python -m benchmarks.relay_micro -n 20000 -r 3
    python -m benchmarks.relay_micro --observe  # also metrics + audit (file) + tracing none, as a
                                                # session's flush would run them; process time
                                                # includes the audit-writer thread
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from proxy.enforcement.hook import allow_all
from proxy.enforcement.hook import SessionInfo
from proxy.wire import codec
from proxy.wire.relay import Relay
from proxy.wire.state import Phase

QUERY = codec.query("SELECT abalance FROM pgbench_accounts WHERE aid = 48213")
ANSWER = b"".join([
    codec.message(b"T", b"\x00\x01abalance\x00" + b"\x00" * 6 + b"\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"),
    codec.message(b"D", b"\x00\x01\x00\x00\x00\x04-123"),
    codec.message(b"C", b"SELECT 1\x00"),
    codec.ready_for_query(b"I"),
])


class _Session:
    """The parts of ``proxy.session.Session`` the recorder reads."""

    def __init__(self, relay: Relay) -> None:
        self.id = "bench"
        self.info = SessionInfo("bench", "127.0.0.1:5555", {"user": "bench", "database": "bench"})
        self.relay = relay
        self.decider = None
        self.bytes_from_client = self.bytes_from_server = 0


def run(n: int, recorder=None) -> float:
    """Seconds of process time per statement for ``n`` statements through one relay (and ``recorder``)."""
    relay = Relay(allow_all(SessionInfo("bench", "local")))
    relay.phase = Phase.IDLE
    relay.authenticated = True
    to_server, to_client, events = relay.to_server, relay.to_client, relay.events
    client_data, server_data = relay.client_data, relay.server_data
    session = _Session(relay)
    observe = recorder.observe if recorder is not None else None
    if recorder is not None:
        recorder.session_started(session)
    start = time.process_time()
    for _ in range(n):
        client_data(QUERY)
        server_data(ANSWER)
        to_server.clear()
        to_client.clear()
        if observe is not None:
            observe(session, events)
        events.clear()
    if recorder is not None and recorder.audit is not None:  # the writer thread counts too: wait for it
        deadline = time.monotonic() + 120
        while recorder.audit.pending and time.monotonic() < deadline:
            time.sleep(0.001)
    return (time.process_time() - start) / n


def _recorder(directory: str):
    from proxy.config import load
    from proxy.observability.recorder import Recorder

    config = load(env={}, overrides={"decider": "proxy.enforcement.hook:allow_all", "audit_queue_size": 1_000_000,
                                     "audit_path": str(Path(directory) / "audit.jsonl")})
    recorder = Recorder(config)  # metrics on (no endpoint), audit to a file, tracing none
    recorder.audit.start()
    return recorder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay_micro", description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=100_000, help="statements per repetition (default 100000)")
    p.add_argument("-r", type=int, default=7, help="repetitions (default 7); the median is reported")
    p.add_argument("--observe", action="store_true", help="also run the recorder (metrics, audit, no tracing)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = _recorder(tmp) if args.observe else None
        run(min(args.n, 5000), recorder)  # warm-up
        samples = [run(args.n, recorder) for _ in range(args.r)]
        if recorder is not None:
            recorder.audit.close(30)
    what = "relay + metrics + audit" if args.observe else "relay"
    print(f"{what}: {statistics.median(samples) * 1e6:.3f} us/statement (median of {args.r} x {args.n}; "
          f"min {min(samples) * 1e6:.3f}, max {max(samples) * 1e6:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
