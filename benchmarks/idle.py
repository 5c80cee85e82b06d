"""Proxy memory with many idle client connections: RSS (/proc VmRSS) before, with N idle, and after.

A fresh proxy is started for each mode (relay only, and enforcing the benchmark policy
with the purpose declared at connect time), N clients connect through it to PostgreSQL
and then sit idle after ReadyForQuery; the proxy's resident set is read from /proc while
they are connected. The clients are minimal protocol clients (StartupMessage, trust
authentication, wait for ReadyForQuery) on one asyncio loop, so the harness stays small.

Each client is two sockets in the proxy (client and upstream) and one backend in
PostgreSQL: N = 1,000 needs ``max_connections`` above 1,000 (the benchmark cluster has
1,100) and about 2,100 open files in the proxy and 1,100 in the harness (``ulimit -n``;
``raise_nofile`` lifts the soft limit to what is needed if the hard limit allows).
"""

from __future__ import annotations

import asyncio
import resource
import struct
import time

from benchmarks import procfs
from benchmarks.stack import (
    BENCH_POLICY,
    BENCH_PURPOSE,
    ENFORCING,
    Stack,
    enforcing_args,
    purpose_options,
    stop_proxy,
)
from proxy.devtools.process import OBSERVABILITY_OFF, RELAY_ONLY, ProxyProcess

PROTOCOL_3 = 196608
CONCURRENCY = 32  # connection attempts in flight at once


def needed_nofile(connections: int) -> int:
    """Open files the proxy needs for ``connections`` clients: two sockets each, plus slack."""
    return 2 * connections + 100


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``want`` (at most the hard limit); children inherit it.
    Returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def startup_message(user: str, database: str, options: str | None) -> bytes:
    params = {"user": user, "database": database, "application_name": "purpose-proxy-bench-idle"}
    if options:
        params["options"] = options
    body = struct.pack("!i", PROTOCOL_3) + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                                    for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def _connect(host: str, port: int, startup: bytes, timeout: float) -> asyncio.StreamWriter:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(startup)
        while True:
            head = await asyncio.wait_for(reader.readexactly(5), timeout)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            body = await asyncio.wait_for(reader.readexactly(length - 4), timeout)
            if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise RuntimeError("the server asked for a password (the idle benchmark needs trust)")
            if kind == b"E":
                raise RuntimeError("connection refused: " + body.replace(b"\0", b" ").decode(errors="replace"))
            if kind == b"Z":
                return writer
    except BaseException:
        writer.close()
        raise


async def hold(host: str, port: int, n: int, user: str, database: str, options: str | None,
               while_open, timeout: float = 60.0):
    """Open ``n`` idle sessions, call ``while_open()`` while they are all open, close them; its result."""
    startup = startup_message(user, database, options)
    gate = asyncio.Semaphore(CONCURRENCY)
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        async with gate:
            writers.append(await _connect(host, port, startup, timeout))

    try:
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise RuntimeError(f"{len(failures)} of {n} idle connections failed; first: {failures[0]!r}")
        await asyncio.sleep(0.5)  # let the proxy settle (buffers, its own bookkeeping)
        return while_open()
    finally:
        for w in writers:
            try:
                w.write(b"X\0\0\0\4")  # Terminate
                w.close()
            except OSError:  # already closed by the other side
                pass
        await asyncio.sleep(0.2)


def backends(stack: Stack, user: str) -> int:
    return int(stack.cluster.psql_admin(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' "
        "AND application_name = 'purpose-proxy-bench-idle'").strip())


def measure(stack: Stack, connections: int) -> list[dict]:
    """RSS of a fresh relay-only and a fresh enforcing proxy, idle and with ``connections`` idle clients."""
    soft, hard = raise_nofile(needed_nofile(connections))
    modes = [("proxy (relay only)", "proxy", (*RELAY_ONLY, *OBSERVABILITY_OFF), None),
             (f"{ENFORCING} (benchmark policy)", ENFORCING,
              (*enforcing_args(BENCH_POLICY, stack.schema_dsn), *OBSERVABILITY_OFF), purpose_options(BENCH_PURPOSE))]
    out = []
    for label, target, args, options in modes:
        proxy = ProxyProcess(stack.cluster.address, *args, "--max-client-connections", str(connections + 100))
        proxy.start()
        try:
            pid = proxy.proc.pid
            # One session first, so that the enforcing proxy has loaded the schema of the
            # database (as it would have in production) before the idle baseline is read.
            asyncio.run(hold(proxy.host, proxy.port, 1, stack.user, stack.dbname, options, lambda: None))
            time.sleep(0.3)
            base = procfs.tree_rss_kb(pid)
            t0 = time.monotonic()
            seen = {}

            def probe(seen: dict = seen, pid: int = pid) -> None:
                seen["rss"] = procfs.tree_rss_kb(pid)
                seen["backends"] = backends(stack, stack.user)

            asyncio.run(hold(proxy.host, proxy.port, connections, stack.user, stack.dbname, options, probe))
            took = time.monotonic() - t0
            time.sleep(0.5)
            after = procfs.tree_rss_kb(pid)
            hwm = procfs.tree_hwm_kb(pid)
        finally:
            stop_proxy(proxy)
        row = {"mode": label, "target": target, "connections": connections, "backends": seen["backends"],
               "rss_idle_kb": base, "rss_connected_kb": seen["rss"], "rss_after_close_kb": after,
               "hwm_kb": hwm, "per_connection_kb": (seen["rss"] - base) / connections,
               "rss_connected_mb": seen["rss"] * 1024 / 1e6,
               "connect_seconds": took, "nofile_soft": soft, "nofile_hard": hard}
        print(f"idle: {label:38} {connections} connections  RSS {base / 1024:6.1f} -> {seen['rss'] / 1024:6.1f} MiB "
              f"({row['per_connection_kb']:.1f} KiB each), after close {after / 1024:.1f} MiB", flush=True)
        out.append(row)
    return out


def snapshot(stack: Stack) -> list[dict]:
    """RSS and peak RSS of the harness's long-running proxies (pgbench targets, the personal-data one) now."""
    out = []
    for name, proc in stack.proxies().items():
        pid = proc.proc.pid
        out.append({"target": name, "rss_kb": procfs.tree_rss_kb(pid), "hwm_kb": procfs.tree_hwm_kb(pid),
                    "processes": len(procfs.tree(pid))})
    return out
