"""The soak: many client connections held through an enforcing proxy for minutes of mixed traffic, with the policy reloaded under load, sampling throughput, latency, errors, RSS and open files."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import decisions, idle, personal, procfs, report
from benchmarks.personal import Statement
from benchmarks.stack import SAMPLE_DATABASE, Stack

DEFAULT_RESULTS = Path(__file__).resolve().parent / "SOAK.md"
BEGIN = "<!-- soak:begin (written by `python -m benchmarks.soak`; edits up to the end marker are overwritten) -->"
END = "<!-- soak:end -->"
APPLICATION = "purpose-proxy-soak"
POLICY_FILES = ("catalog.yaml", "purposes.yaml", "model.conf", "policy.csv")
RSS_TOLERANCE = 0.10  # issue #7: RSS at the end within 10% of RSS after warm-up

# The statement whose verdict the reloads flip. Its role and purpose run nothing else, so the
# flip changes no other statement's outcome: under the seed policy (A) it is allowed and returns
# the member's invoices; under the changed policy (B) the rule behind it says deny, so it must be
# refused with 42501 naming that rule. Anything else means a statement was decided by a policy
# that was not in force.
PROBE = Statement("flip probe", "app_portal", "contract_performance",
                  "SELECT invoice_id, billing_month, amount FROM billing.invoices WHERE member_id = {id}",
                  "allowed")
FLIP_ALLOW = "p, staff, contract_performance, payment.invoice, read, allow"
FLIP_DENY = "p, staff, contract_performance, payment.invoice, read, deny"
# Invalid policies: the *other* valid policy's text (with the probe's rule flipped) followed by one
# broken line. A loader that applied lines before reaching the broken one would flip the probe:
# that is what "decided by a half-loaded policy" would look like.
BROKEN_LINES = (
    "p, staff, contract_performance, payment.invoice, read",  # a field missing
    "p, staff, billing, payment, read, allw",  # no such effect
    "p, staff, no_such_purpose, payment, read, allow",  # no such purpose
)
KINDS = [*personal.STATEMENTS, PROBE]
REFUSED = ("invalid", "held")  # flips whose reload must fail, leaving the policy in force


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Hold many client connections (asyncpg, one event loop) through a proxy enforcing the seed "
                    "policy on the sample ISP database, run mixed allowed/masked/consent-filtered/aggregate/"
                    "refused statements on some of them for a while, reload valid and invalid policies every "
                    "second, and sample throughput, latency, errors, proxy RSS and open files.")
    p.add_argument("--clients", type=int, default=1000, help="client connections held (1000)")
    p.add_argument("--active", type=int,
                   help=f"of them running statements, one kind each in turn; the rest stay idle (10%%, at least "
                        f"{len(KINDS)}: 100)")
    p.add_argument("--duration", type=float, default=600, metavar="SECONDS", help="traffic time (600)")
    p.add_argument("--warmup", type=float, metavar="SECONDS",
                   help="first part of the traffic not counted in the totals; RSS after it is the baseline "
                        "(min(60, duration/5))")
    p.add_argument("--sample-interval", type=float, default=5, metavar="SECONDS", help="sampling period (5)")
    p.add_argument("--members", type=int, default=1000, help="members of the generated sample database (1000)")
    p.add_argument("--seed", type=int, default=7, help="random seed of the statements' literals (7)")
    p.add_argument("--think-ms", type=float, default=0, help="pause of an active client between statements (0)")
    p.add_argument("--no-reload", dest="reload", action="store_false",
                   help="do not reload the policy during the run (default: reload)")
    p.add_argument("--reload-interval", type=float, default=1.0, metavar="SECONDS",
                   help="time between policy changes: valid and invalid alternately (1)")
    p.add_argument("--reload-trigger", choices=["sighup", "watch"], default="sighup",
                   help="sighup: send SIGHUP after each change (file watcher off); watch: the proxy's own file "
                        "watcher notices (--watch-interval)")
    p.add_argument("--watch-interval", type=float, default=0.5, metavar="SECONDS",
                   help="the proxy's --policy-watch-interval with --reload-trigger watch (0.5)")
    p.add_argument("--statement-timeout", type=float, default=30, metavar="SECONDS",
                   help="client-side timeout of each statement (30)")
    p.add_argument("--connect-timeout", type=float, default=60, metavar="SECONDS",
                   help="client-side timeout of each connection attempt (60)")
    p.add_argument("--audit", action="store_true",
                   help="audit log on (a temporary file), and check every probe's record: its verdict must be "
                        "the one of the policy version it names")
    p.add_argument("--results", type=Path, metavar="FILE",
                   help=f"markdown report (default {DEFAULT_RESULTS}; only the part between the markers is "
                        "replaced)")
    p.add_argument("--no-results", action="store_true", help="print the report only")
    p.add_argument("--json", type=Path, metavar="FILE", help="also dump samples and totals as JSON")
    args = p.parse_args(argv)
    if args.active is None:
        args.active = min(args.clients, max(len(KINDS), args.clients // 10))
    if args.active < len(KINDS):
        print(f"note: with fewer than {len(KINDS)} active clients some statement kinds do not run", file=sys.stderr)
    if not 0 < args.active <= args.clients:
        p.error("--active must be between 1 and --clients")
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 5)
    if not 0 <= args.warmup < args.duration:
        p.error("--warmup must be shorter than --duration")
    if args.results is None and not args.no_results:
        args.results = DEFAULT_RESULTS
    if args.no_results:
        args.results = None
    return args


# -- the policies the reloads swap in ---------------------------------------------------------------

@dataclass
class Variants:
    """policy.csv texts: ``A`` (the seed), ``B`` (the probe's rule denied) and invalid ones; their versions."""

    A: str
    B: str
    version_A: str
    version_B: str
    flip_line: int  # line of the probe's rule in policy.csv

    def invalid(self, n: int, in_force: str) -> str:
        """The n-th invalid text: the policy *not* in force, with a broken line at the end."""
        other = self.B if in_force == "A" else self.A
        return other.rstrip("\n") + "\n# purpose-proxy soak: broken on purpose\n" + BROKEN_LINES[n % len(BROKEN_LINES)] + "\n"


def policy_variants(directory: Path) -> Variants:
    """Build and validate the variants from the policy in ``directory`` (the seed policy's copy)."""
    from proxy.policy.engine import Policy
    from proxy.policy.problems import PolicyError

    texts = {name: (directory / name).read_text(encoding="utf-8") for name in POLICY_FILES}
    a = texts["policy.csv"]
    lines = a.splitlines()
    where = [i for i, line in enumerate(lines) if line.strip() == FLIP_ALLOW]
    if len(where) != 1:
        raise RuntimeError(f"policy.csv should have the line {FLIP_ALLOW!r} exactly once (found {len(where)})")
    lines[where[0]] = FLIP_DENY
    b = "\n".join(lines) + "\n"

    def load(policy: str) -> Any:
        return Policy.from_texts(catalog=texts["catalog.yaml"], purposes=texts["purposes.yaml"],
                                 model=texts["model.conf"], policy=policy)

    va, vb = load(a).version, load(b).version
    if va == vb:
        raise RuntimeError("the changed policy has the same version as the seed policy")
    variants = Variants(a, b, va, vb, where[0] + 1)
    for n in range(len(BROKEN_LINES)):
        for in_force in ("A", "B"):
            try:
                load(variants.invalid(n, in_force))
            except PolicyError:
                continue
            raise RuntimeError(f"the invalid policy {n} loads: {BROKEN_LINES[n]!r}")
    return variants


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one rename: a reload reads the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.soak-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- what the proxy says ---------------------------------------------------------------------------

def scrape(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """The proxy's /metrics: open sessions, reload counters, the policy version in force, cache entries."""
    text = urllib.request.urlopen(url, timeout=timeout).read().decode()

    def value(pattern: str) -> float | None:
        m = re.search(pattern, text, re.MULTILINE)
        return float(m.group(1)) if m else None

    version = re.search(r'^purpose_proxy_policy_info\{version="([^"]*)"\}', text, re.MULTILINE)
    return {
        "sessions_open": value(r"^purpose_proxy_client_sessions_open (\S+)"),
        "reloads_success": value(r'^purpose_proxy_policy_reloads_total\{result="success"\} (\S+)') or 0.0,
        "reloads_failure": value(r'^purpose_proxy_policy_reloads_total\{result="failure"\} (\S+)') or 0.0,
        "policy_version": version.group(1) if version else None,
        "cache_entries": value(r"^purpose_proxy_decision_cache_entries (\S+)"),
    }


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


RELOAD_OK = re.compile(r"policy reloaded \((?P<why>[^)]*)\): version (?P<old>\w+) -> (?P<new>\w+)")
RELOAD_FAILED = re.compile(r"policy reload \((?P<why>[^)]*)\) failed; the previous policy (?P<kept>\w+) stays in force")


def reload_log(log: str) -> list[tuple[str, str, str]]:
    """The proxy log's reload lines in order: ("ok", old, new) or ("failed", kept, "")."""
    out = []
    for line in log.splitlines():
        if m := RELOAD_OK.search(line):
            out.append(("ok", m["old"], m["new"]))
        elif m := RELOAD_FAILED.search(line):
            out.append(("failed", m["kept"], ""))
    return out


# -- the clients -----------------------------------------------------------------------------------

@dataclass
class Expected:
    """What the database holds, read directly before the run, to check each answer against."""

    members: set[int]
    visible_to_marketing: set[int]  # members whose rows the consent filter lets through
    invoices: dict[int, int]  # member -> invoices


def dollar_text(st: Statement) -> tuple[str, list[str]]:
    """The statement with ``$n`` parameters (asyncpg), and the value names in parameter order."""
    names: list[str] = []
    for name in re.findall(r"\{(\w+)\}", st.template):
        if name not in names:
            names.append(name)
    return st.template.format(**{n: f"${i + 1}" for i, n in enumerate(names)}), names


def judge(st: Statement, values: dict, result: tuple, expected: Expected) -> str:
    """The outcome's label: ``ok`` (what the policy says), ``allow``/``deny`` for the probe, else ``unexpected: ...``."""
    kind = result[0]
    if kind == "rows":
        _, n, rows = result
        if st.expect == "refused":
            return f"unexpected: {n} rows where 42501 was expected"
        if st is PROBE:
            want = expected.invoices.get(values["id"], 0)
            return "allow" if n == want else f"unexpected: probe returned {n} rows, not {want}"
        if st.name.startswith("lookup, consent"):
            want = int(values["id"] in expected.visible_to_marketing)
            return "ok" if n == want else f"unexpected: consent filter returned {n} rows, not {want}"
        if st.name.startswith("lookup"):
            want = int(values["id"] in expected.members)
            if n != want:
                return f"unexpected: {n} rows, not {want}"
            if st.expect == "masked" and rows:
                born = rows[0]["birth_date"]
                if born is not None and (born.month, born.day) != (1, 1):
                    return "unexpected: birth_date not masked to its year"
            return "ok"
        if st.name.startswith("join"):
            return "ok" if n <= 6 else f"unexpected: {n} rows from a LIMIT 6"
        return "ok"
    if kind == "error":
        _, state, message, detail = result
        if state == "42501" and st.expect == "refused":
            return "ok"
        if state == "42501" and st is PROBE and FLIP_DENY in (detail or ""):
            return "deny"
        return f"unexpected: {state} {message}"
    return f"unexpected: {kind}"


class Recorder:
    """Latencies and outcomes of every statement, by kind; per-sample windows; the probe's outcomes with times."""

    def __init__(self, warmup_until: float) -> None:
        self.warmup_until = warmup_until
        self.latency_ms = array("d")  # after the warm-up
        self.by_kind_ms: dict[str, array] = {st.name: array("d") for st in KINDS}
        self.window_ms = array("d")
        self.window_count = 0
        self.window_unexpected = 0
        self.window_errors: Counter = Counter()
        self.total = 0
        self.counted = 0  # after the warm-up
        self.outcomes: dict[str, Counter] = {st.name: Counter() for st in KINDS}
        self.sqlstates: Counter = Counter()  # every error, by SQLSTATE
        self.refusal_states: Counter = Counter()  # errors of statements the policy refuses
        self.unexpected: Counter = Counter()
        self.examples: list[str] = []
        self.probe_t0 = array("d")
        self.probe_t1 = array("d")
        self.probe_outcome = bytearray()  # b"a" allowed, b"d" denied, b"x" something else
        self.losses = 0  # connections that ended without the harness closing them
        self.loss_examples: list[str] = []
        self.timeouts = 0
        self.reconnects = 0

    def record(self, st: Statement, values: dict, result: tuple, t0: float, t1: float, expected: Expected) -> None:
        label = judge(st, values, result, expected)
        ms = (t1 - t0) * 1000
        self.total += 1
        self.window_count += 1
        self.window_ms.append(ms)
        if t0 >= self.warmup_until:
            self.counted += 1
            self.latency_ms.append(ms)
            self.by_kind_ms[st.name].append(ms)
        self.outcomes[st.name][label.split(":")[0] if label.startswith("unexpected") else label] += 1
        if result[0] == "error":
            self.sqlstates[result[1]] += 1
            self.window_errors[result[1]] += 1
            if st.expect == "refused" or st is PROBE:
                self.refusal_states[result[1]] += 1
        elif result[0] != "rows":
            self.window_errors[result[0]] += 1
        if label.startswith("unexpected"):
            self.unexpected[label[:120]] += 1
            self.window_unexpected += 1
            if len(self.examples) < 20:
                self.examples.append(f"{st.name} {values}: {label[:300]}")
        if st is PROBE:
            self.probe_t0.append(t0)
            self.probe_t1.append(t1)
            self.probe_outcome += {"allow": b"a", "deny": b"d"}.get(label, b"x")

    def lost(self, what: str) -> None:
        self.losses += 1
        if len(self.loss_examples) < 20:
            self.loss_examples.append(what[:300])

    def take_window(self) -> tuple[int, list[float], int, dict]:
        out = (self.window_count, sorted(self.window_ms), self.window_unexpected, dict(self.window_errors))
        self.window_ms = array("d")
        self.window_count = self.window_unexpected = 0
        self.window_errors = Counter()
        return out


class Client:
    """One asyncpg connection through the proxy, as one role under one purpose; counts its own loss."""

    def __init__(self, index: int, st: Statement, active: bool) -> None:
        self.index = index
        self.st = st
        self.active = active
        self.conn: Any = None
        self.closing = False
        self.lost = False  # this connection's loss is counted (once, by whoever sees it first)

    async def connect(self, host: str, port: int, password: str, timeout: float, rec: Recorder) -> None:
        import asyncpg

        self.closing = self.lost = False
        self.conn = await asyncpg.connect(
            host=host, port=port, user=self.st.role, password=password, database=SAMPLE_DATABASE, timeout=timeout,
            server_settings={"application_name": APPLICATION, "options": f"-c pii.purpose={self.st.purpose}"})
        conn = self.conn

        def ended(_conn: Any) -> None:
            if not self.closing and conn is self.conn:
                self.mark_lost("connection closed by the other side", rec)

        self.conn.add_termination_listener(ended)

    def mark_lost(self, what: str, rec: Recorder) -> None:
        if not self.lost:
            self.lost = True
            rec.lost(f"client {self.index} ({self.st.role}/{self.st.purpose}): {what}")

    async def close(self, timeout: float) -> None:
        self.closing = True
        if self.conn is None:
            return
        try:
            await asyncio.wait_for(self.conn.close(), timeout)
        except Exception:  # noqa: BLE001 (a broken connection: just drop it)
            self.conn.terminate()


async def run_statement(conn: Any, st: Statement, values: dict, prepared: bool, timeout: float) -> tuple:
    """("rows", n, rows or None) | ("error", sqlstate, message, detail) | ("timeout",) | ("lost", text)."""
    import asyncpg

    try:
        if prepared:
            text, names = dollar_text(st)
            rows = await conn.fetch(text, *(values[n] for n in names), timeout=timeout)
            return ("rows", len(rows), rows)
        status = await conn.execute(st.simple(values), timeout=timeout)  # simple query protocol
        return ("rows", int(status.rsplit(" ", 1)[-1]), None)
    except TimeoutError:
        return ("timeout",)
    except asyncpg.PostgresError as exc:
        if conn.is_closed():
            return ("lost", f"{exc.sqlstate} {exc}")
        return ("error", exc.sqlstate, str(exc), getattr(exc, "detail", None))
    except (asyncpg.InterfaceError, OSError, ConnectionError) as exc:
        return ("lost", repr(exc))


async def active_loop(client: Client, ctx: "Soak", rng: random.Random) -> None:
    rec, opts = ctx.rec, ctx.opts
    while not ctx.stopping.is_set():
        values = client.st.values(rng, ctx.members)
        prepared = rng.random() < 0.5
        t0 = time.perf_counter()
        result = await run_statement(client.conn, client.st, values, prepared, opts.statement_timeout)
        t1 = time.perf_counter()
        rec.record(client.st, values, result, t0, t1, ctx.expected)
        if result[0] in ("lost", "timeout"):
            if result[0] == "lost":
                client.mark_lost(f"statement: {result[1]}", rec)
            else:
                rec.timeouts += 1
            # A new connection in its place (a timed-out one is in an unknown state).
            await client.close(5)
            if ctx.stopping.is_set():
                return
            try:
                await client.connect(ctx.host, ctx.port, ctx.password, opts.connect_timeout, rec)
                rec.reconnects += 1
            except Exception as exc:  # noqa: BLE001
                rec.lost(f"client {client.index}: reconnect failed: {exc!r}")
                await asyncio.sleep(1)
                continue
        if opts.think_ms:
            await asyncio.sleep(opts.think_ms / 1000)


# -- the reloads -----------------------------------------------------------------------------------

@dataclass
class Flip:
    """One change of policy.csv: which text, when written, when the proxy was seen to have reloaded."""

    n: int
    variant: str  # "A", "B", "invalid-<k>" or "held-A" (the watcher's refusal of A, before SIGHUP)
    t_write: float
    expect_version: str  # the version that must be in force after it
    t_confirmed: float | None = None
    seen_version: str | None = None
    result: str | None = None  # success | failure (the counter that moved)


class Reloader:
    """Every ``interval``: policy.csv replaced by B, an invalid text, A, an invalid text, B, ... and the reload
    confirmed on /metrics (its counter moved, the version in force is the expected one) before the next."""

    def __init__(self, ctx: "Soak", variants: Variants, directory: Path) -> None:
        self.ctx = ctx
        self.variants = variants
        self.path = directory / "policy.csv"
        self.flips: list[Flip] = []
        self.in_force = "A"
        self.problems: list[str] = []

    async def run(self) -> None:
        ctx, opts = self.ctx, self.ctx.opts
        n = 0
        next_valid = "B"
        while not ctx.stopping.is_set():
            started = time.perf_counter()
            try:
                before = await ctx.metrics()
            except Exception as exc:  # noqa: BLE001 (no change without knowing the counters before it)
                self.problems.append(f"before change {n}: /metrics did not answer: {exc!r}")
                await asyncio.sleep(opts.reload_interval)
                continue
            if n % 2 == 0:
                variant, text = next_valid, (self.variants.B if next_valid == "B" else self.variants.A)
                expect = self.variants.version_B if next_valid == "B" else self.variants.version_A
            else:
                variant, text = f"invalid-{(n // 2) % len(BROKEN_LINES)}", self.variants.invalid(n // 2, self.in_force)
                expect = self.variants.version_A if self.in_force == "A" else self.variants.version_B
            flip = Flip(n, variant, time.perf_counter(), expect)
            write_atomically(self.path, text)
            flip.t_write = time.perf_counter()
            if opts.reload_trigger == "sighup":
                os.kill(ctx.proxy_pid, signal.SIGHUP)
            elif variant == "A":
                # A drops B's deny: the watcher leaves a change that protects less to a deliberate reload
                # (counted as a failed reload, B staying in force), and SIGHUP puts it in force.
                held = Flip(n, "held-A", flip.t_write, self.variants.version_B)
                held.t_write = flip.t_write
                self.flips.append(held)
                await self.confirm(held, before, timeout=max(10.0, 4 * opts.watch_interval))
                before = await ctx.metrics()
                os.kill(ctx.proxy_pid, signal.SIGHUP)
            self.flips.append(flip)
            await self.confirm(flip, before, timeout=max(10.0, 4 * opts.watch_interval))
            if flip.seen_version == expect and not variant.startswith("invalid"):
                self.in_force = variant
                next_valid = "A" if variant == "B" else "B"
            n += 1
            rest = opts.reload_interval - (time.perf_counter() - started)
            try:
                await asyncio.wait_for(ctx.stopping.wait(), max(0.0, rest))
            except TimeoutError:
                pass

    async def confirm(self, flip: Flip, before: dict, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        pause = 0.01
        seen = None
        while time.perf_counter() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
            try:
                now = await self.ctx.metrics()
            except Exception:  # noqa: BLE001 (the endpoint is busy: try again)
                continue
            moved = {r: now[f"reloads_{r}"] - before[f"reloads_{r}"] for r in ("success", "failure")}
            if moved["success"] + moved["failure"] == 0:
                continue
            flip.result = "success" if moved["success"] else "failure"
            flip.seen_version = seen = now["policy_version"]
            if sum(moved.values()) > 1:
                self.problems.append(f"flip {flip.n} ({flip.variant}): {sum(moved.values())} reloads counted, not 1")
            refused = flip.variant.startswith(REFUSED)
            if flip.seen_version != flip.expect_version:
                if refused or flip.result == "failure":
                    self.problems.append(f"flip {flip.n} ({flip.variant}): version {flip.seen_version} in force, "
                                         f"expected {flip.expect_version}")
                    flip.t_confirmed = time.perf_counter()
                    return
                continue  # counted, but the version not swapped yet as seen by the endpoint: look again
            flip.t_confirmed = time.perf_counter()
            want = "failure" if refused else "success"
            if flip.result != want:
                self.problems.append(f"flip {flip.n} ({flip.variant}): reload counted as {flip.result}, not {want}")
            return
        flip.seen_version = None
        self.problems.append(f"flip {flip.n} ({flip.variant}): no reload with version {flip.expect_version} seen on "
                             f"/metrics within {timeout:.0f} s (last seen: {flip.result}, version {seen})")

    def transitions(self) -> list[tuple[float, float, str]]:
        """Changes of the policy in force: (written, confirmed or +inf, new version)."""
        out = []
        version = self.variants.version_A
        for f in self.flips:
            # Unconfirmed: the change may have happened at any time since it was written.
            new = f.seen_version if f.t_confirmed is not None else f.expect_version
            if new is not None and new != version:
                out.append((f.t_write, f.t_confirmed if f.t_confirmed is not None else float("inf"), new))
                version = new
        return out


def possible_versions(transitions: list[tuple[float, float, str]], initial: str, t0: float, t1: float) -> set[str]:
    """Every policy version that may have been in force at some moment of [t0, t1]."""
    current, out = initial, set()
    for written, confirmed, new in transitions:
        if confirmed < t0:
            current = new
        elif written <= t1:
            out.add(new)
        else:
            break
    out.add(current)
    return out


def probe_check(rec: Recorder, reloader: Reloader | None, variants: Variants | None) -> dict:
    """Every probe outcome against the policy in force while it ran: allowed under A, refused under B."""
    counts = Counter(rec.probe_outcome.decode())
    out = {"allowed": counts.get("a", 0), "refused": counts.get("d", 0), "other": counts.get("x", 0),
           "violations": 0, "during_a_reload": 0, "examples": []}
    if reloader is None or variants is None:
        out["violations"] = out["refused"] + out["other"]  # without reloads the seed policy allows it
        return out
    transitions = reloader.transitions()
    want = {"a": variants.version_A, "d": variants.version_B}
    for t0, t1, o in zip(rec.probe_t0, rec.probe_t1, rec.probe_outcome.decode(), strict=True):
        if o == "x":
            out["violations"] += 1
            continue
        versions = possible_versions(transitions, variants.version_A, t0, t1)
        if len(versions) > 1:
            out["during_a_reload"] += 1
        if want[o] not in versions:
            out["violations"] += 1
            if len(out["examples"]) < 10:
                out["examples"].append({"outcome": {"a": "allowed", "d": "refused"}[o], "t0": t0, "t1": t1,
                                        "in_force": sorted(versions)})
    return out


def audit_check(path: Path, variants: Variants) -> dict:
    """The audit log's statement records: every one names version A or B, and every probe's verdict is that
    version's (allow under A, block under B); policy_reload records by result."""
    out = {"statements": 0, "other_versions": 0, "probe_records": 0, "probe_mismatches": 0, "reloads": Counter(),
           "examples": []}
    want = {variants.version_A: "allow", variants.version_B: "block"}
    files = sorted(path.parent.glob(path.name + "*"))
    for f in files:
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                if rec.get("type") == "policy_reload":
                    out["reloads"][rec.get("result")] += 1
                if rec.get("type") != "statement":
                    continue
                out["statements"] += 1
                version = rec.get("policy_version")
                if version not in want:
                    out["other_versions"] += 1
                    continue
                if (rec.get("role") == PROBE.role and rec.get("purpose") == PROBE.purpose
                        and "billing.invoices" in (rec.get("tables") or [])):
                    out["probe_records"] += 1
                    if rec.get("verdict") != want[version]:
                        out["probe_mismatches"] += 1
                        if len(out["examples"]) < 10:
                            out["examples"].append({k: rec.get(k) for k in ("seq", "policy_version", "verdict",
                                                                             "rules")})
    out["reloads"] = dict(out["reloads"])
    out["files"] = [str(f) for f in files]
    return out


# -- the run ---------------------------------------------------------------------------------------

def pct(sorted_values: Any, q: float) -> float | None:
    return decisions.percentile(sorted_values, q) if len(sorted_values) else None


class Soak:
    """One soak run against a running stack (its ``personal_proxy`` is the proxy under test)."""

    def __init__(self, opts: argparse.Namespace, stack: Stack, policy_dir: Path, variants: Variants | None) -> None:
        self.opts = opts
        self.stack = stack
        self.proxy = stack.personal_proxy
        self.proxy_pid = self.proxy.proc.pid
        self.host, self.port = self.proxy.host, self.proxy.port
        self.password = stack.sample_password
        self.members = stack.sample_members
        self.metrics_url = f"http://{self.proxy.host}:{stack.personal_metrics_port}/metrics"
        self.policy_dir = policy_dir
        self.variants = variants
        self.samples: list[dict] = []
        self.stopping = asyncio.Event()
        self.reloader: Reloader | None = None

    async def metrics(self) -> dict:
        return await asyncio.wait_for(asyncio.to_thread(scrape, self.metrics_url), 15)

    async def backends(self) -> int:
        """PostgreSQL backends of the harness's clients (application_name), asked directly."""
        import asyncpg

        c = self.stack.cluster
        conn = await asyncpg.connect(host=c.host, port=c.port, user="postgres", database="postgres", timeout=30)
        try:
            return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                                       APPLICATION, timeout=30)
        finally:
            await conn.close(timeout=10)

    async def read_expected(self) -> Expected:
        import asyncpg

        c = self.stack.cluster
        direct = await asyncpg.connect(host=c.host, port=c.port, user="postgres", database=SAMPLE_DATABASE,
                                       timeout=30)
        try:
            members = {r[0] for r in await direct.fetch("SELECT member_id FROM member.members", timeout=60)}
            invoices = {r[0]: r[1] for r in await direct.fetch(
                "SELECT member_id, count(*) FROM billing.invoices GROUP BY member_id", timeout=60)}
        finally:
            await direct.close(timeout=10)
        # Through the proxy, before any load: the consent filter's answer for every member.
        st = personal.STATEMENTS[2]
        via = await asyncpg.connect(host=self.host, port=self.port, user=st.role, password=self.password,
                                    database=SAMPLE_DATABASE, timeout=30,
                                    server_settings={"options": f"-c pii.purpose={st.purpose}"})
        try:
            visible = {r[0] for r in await via.fetch("SELECT member_id FROM member.members", timeout=60)}
        finally:
            await via.close(timeout=10)
        return Expected(members, visible, invoices)

    def sample(self, t: float, phase: str, metrics: dict | None) -> dict:
        count, window, unexpected, errors = self.rec.take_window()
        elapsed = t - (self.samples[-1]["_t"] if self.samples else self.t_start)
        s = {
            "_t": t, "t": round(t - self.t_start, 1), "phase": phase,
            "statements": count, "per_second": count / elapsed if elapsed > 0 else 0.0,
            "p50_ms": pct(window, 0.5), "p99_ms": pct(window, 0.99), "errors": errors, "unexpected": unexpected,
            "rss_kb": procfs.status_kb(self.proxy_pid, "VmRSS"), "hwm_kb": procfs.status_kb(self.proxy_pid, "VmHWM"),
            "fds": open_fds(self.proxy_pid), "losses": self.rec.losses, "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        }
        if metrics:
            s.update({k: metrics[k] for k in ("sessions_open", "reloads_success", "reloads_failure",
                                              "cache_entries")})
        self.samples.append(s)
        p50 = "-" if s["p50_ms"] is None else f"{s['p50_ms']:.1f}"
        p99 = "-" if s["p99_ms"] is None else f"{s['p99_ms']:.1f}"
        print(f"soak {s['t']:6.0f}s {phase:7} {s['per_second']:7.0f} stmt/s  p50 {p50:>6} p99 {p99:>7} ms  "
              f"errors {sum(errors.values()):5}  unexpected {unexpected}  RSS {s['rss_kb'] / 1024:6.1f} MiB  "
              f"fds {s['fds']:5}  sessions {s.get('sessions_open') or 0:5.0f}  lost {self.rec.losses}  "
              f"reloads {s.get('reloads_success', 0):.0f}/{s.get('reloads_failure', 0):.0f}  load {s['load']}",
              flush=True)
        return s

    async def sampler(self) -> None:
        """A sample every ``sample_interval`` seconds, and one exactly when the warm-up ends."""
        opts = self.opts
        offsets = sorted({*(k * opts.sample_interval for k in range(1, int(opts.duration / opts.sample_interval) + 1)
                            if k * opts.sample_interval < opts.duration), opts.warmup} - {0.0})
        for offset in offsets:
            wait = self.t_start + offset - time.perf_counter()
            try:
                await asyncio.wait_for(self.stopping.wait(), max(wait, 0.0))
                return
            except TimeoutError:
                pass
            try:
                m = await self.metrics()
            except Exception:  # noqa: BLE001 (a sample without the proxy's counters)
                m = None
            if self.stopping.is_set():
                return
            phase = "warm" if offset == opts.warmup else "warmup" if offset < opts.warmup else "run"
            self.sample(time.perf_counter(), phase, m)

    async def run(self) -> dict:
        opts = self.opts
        result: dict[str, Any] = {}
        self.expected = await self.read_expected()
        self.rec = Recorder(float("inf"))
        # The baseline is taken as the state after the clients leave is (below): once the proxy holds no
        # session (read_expected's connection is gone) and a second has passed (a connection the proxy
        # ended may linger that long), else a socket still closing counts as the baseline's.
        deadline = time.perf_counter() + 30
        while (await self.metrics())["sessions_open"] and time.perf_counter() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        baseline_fds, baseline_rss = open_fds(self.proxy_pid), procfs.status_kb(self.proxy_pid, "VmRSS")
        print(f"connecting {opts.clients} clients ({opts.active} active) ...", flush=True)
        clients = [Client(i, KINDS[i % len(KINDS)], i < opts.active) for i in range(opts.clients)]
        gate = asyncio.Semaphore(idle.CONCURRENCY)

        async def connect(c: Client) -> None:
            async with gate:
                await c.connect(self.host, self.port, self.password, opts.connect_timeout, self.rec)

        t = time.perf_counter()
        got = await asyncio.gather(*(connect(c) for c in clients), return_exceptions=True)
        failed = [g for g in got if isinstance(g, BaseException)]
        result["connect_seconds"] = time.perf_counter() - t
        if failed:
            for c in clients:
                await c.close(5)
            raise RuntimeError(f"{len(failed)} of {opts.clients} connections failed; first: {failed[0]!r}")
        result["backends_connected"] = await self.backends()
        print(f"{opts.clients} clients connected in {result['connect_seconds']:.1f} s; PostgreSQL shows "
              f"{result['backends_connected']} backends", flush=True)
        self.t_start = time.perf_counter()
        self.warmup_until = self.t_start + opts.warmup
        self.rec.warmup_until = self.warmup_until
        self.sample(self.t_start, "warm" if opts.warmup == 0 else "start", await self.metrics())
        metrics_before = self.samples[0]
        tasks = [asyncio.create_task(active_loop(c, self, random.Random(opts.seed * 100003 + c.index)))
                 for c in clients if c.active]
        sampler = asyncio.create_task(self.sampler())
        reload_task = None
        if self.variants is not None:
            self.reloader = Reloader(self, self.variants, self.policy_dir)
            reload_task = asyncio.create_task(self.reloader.run())
        try:
            await asyncio.wait_for(self.stopping.wait(), opts.duration)
        except TimeoutError:
            pass
        self.stopping.set()
        t_end = time.perf_counter()
        self.sample(t_end, "end", await self.metrics())
        done, pending = await asyncio.wait(tasks + [sampler] + ([reload_task] if reload_task else []),
                                           timeout=opts.statement_timeout + 30)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        result["stuck_tasks"] = len(pending)
        # Every idle connection must still be there and answer.
        alive = 0

        async def ping(c: Client) -> bool:
            async with gate:
                r = await run_statement(c.conn, Statement("ping", c.st.role, c.st.purpose, "SELECT 1", "allowed"),
                                        {}, False, opts.statement_timeout)
                return r[0] == "rows"

        pings = await asyncio.gather(*(ping(c) for c in clients if not c.active))
        alive = sum(pings)
        result["idle_alive"], result["idle_total"] = alive, len(pings)
        final = await self.metrics()
        await asyncio.gather(*(c.close(10) for c in clients))
        # After every client left: no session, backend or socket may remain.
        sessions = final["sessions_open"]
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            m = await self.metrics()
            sessions = m["sessions_open"]
            backends = await self.backends()
            if not sessions and not backends:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        result.update({
            "t_traffic": t_end - self.t_start,
            "sessions_after_close": sessions, "backends_after_close": await self.backends(),
            "fds_before": baseline_fds, "rss_before_kb": baseline_rss,
            "fds_after_close": open_fds(self.proxy_pid), "rss_after_close_kb": procfs.status_kb(self.proxy_pid, "VmRSS"),
            "metrics_before": {k: metrics_before.get(k) for k in ("reloads_success", "reloads_failure")},
            "metrics_end": final,
        })
        return result


def summarise(opts: argparse.Namespace, soak: Soak, run: dict, log: str, audit: dict | None) -> dict:
    rec = soak.rec
    samples = [{k: v for k, v in s.items() if k != "_t"} for s in soak.samples]
    during = [s for s in samples if s["phase"] in ("warm", "run", "end")]
    warm = next((s for s in samples if s["phase"] == "warm"), samples[0])
    end = next(s for s in samples if s["phase"] == "end")
    lat = sorted(rec.latency_ms)
    counted_seconds = max(1e-9, run["t_traffic"] - opts.warmup)
    rss_growth = (end["rss_kb"] - warm["rss_kb"]) / warm["rss_kb"]
    after_warm = [s for s in samples if s["phase"] in ("warm", "run", "end")]
    slope = None
    if len(after_warm) >= 3:
        xs, ys = [s["t"] for s in after_warm], [s["rss_kb"] for s in after_warm]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60 / 1024 if den else None  # MiB/min
    fds = [s["fds"] for s in during]
    by_kind = []
    for st in KINDS:
        ms = sorted(rec.by_kind_ms[st.name])
        by_kind.append({"kind": st.name, "role": st.role, "purpose": st.purpose, "expect": st.expect,
                        "n": len(ms), "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99),
                        "outcomes": dict(rec.outcomes[st.name])})
    reloads: dict[str, Any] | None = None
    if soak.reloader is not None:
        r, v = soak.reloader, soak.variants
        flips = r.flips
        valid = [f for f in flips if not f.variant.startswith(REFUSED)]
        invalid = [f for f in flips if f.variant.startswith(REFUSED)]
        m0, m1 = run["metrics_before"], run["metrics_end"]
        moved = {k: m1[f"reloads_{k}"] - m0[f"reloads_{k}"] for k in ("success", "failure")}
        lines = reload_log(log)
        ok_lines = [x for x in lines if x[0] == "ok"]
        failed_lines = [x for x in lines if x[0] == "failed"]
        # The log, flip by flip: a valid change logs "reloaded old -> new", an invalid one "failed; <the
        # version in force> stays in force".
        expected_lines = []
        version = v.version_A
        for f in flips:
            if f.variant.startswith(REFUSED):
                expected_lines.append(("failed", version, ""))
            else:
                expected_lines.append(("ok", version, f.expect_version))
                version = f.expect_version
        reloads = {
            "trigger": opts.reload_trigger, "interval": opts.reload_interval,
            "flips": len(flips), "valid": len(valid), "invalid": len(invalid),
            "confirmed": sum(f.t_confirmed is not None for f in flips),
            "confirm_ms_p50": pct(sorted((f.t_confirmed - f.t_write) * 1000 for f in flips if f.t_confirmed), 0.5),
            "confirm_ms_max": max(((f.t_confirmed - f.t_write) * 1000 for f in flips if f.t_confirmed), default=None),
            "metrics_success": moved["success"], "metrics_failure": moved["failure"],
            "log_reloaded": len(ok_lines), "log_failed_kept_previous": len(failed_lines),
            "log_matches_flips": lines == expected_lines,
            "version_A": v.version_A, "version_B": v.version_B, "flip_line": v.flip_line,
            "versions_seen": sorted({f.seen_version for f in flips if f.seen_version}),
            "problems": r.problems[:20], "problem_count": len(r.problems),
        }
    probes = probe_check(rec, soak.reloader, soak.variants)
    refusals_right = set(rec.refusal_states) <= {"42501"}
    checks = [
        ("no connection lost", rec.losses == 0 and run["idle_alive"] == run["idle_total"],
         f"{rec.losses} lost, {run['idle_total'] - run['idle_alive']} of {run['idle_total']} idle not answering"),
        ("no unexpected outcome", sum(rec.unexpected.values()) == 0,
         f"{sum(rec.unexpected.values())} unexpected ({rec.timeouts} timeouts)"),
        ("every refused statement answered 42501", refusals_right and rec.outcomes[personal.STATEMENTS[3].name]
         .get("ok", 0) > 0, f"SQLSTATEs of refusals: {dict(rec.refusal_states)}"),
        ("RSS at the end within 10% of RSS after warm-up", abs(rss_growth) <= RSS_TOLERANCE,
         f"{warm['rss_kb'] / 1024:.1f} -> {end['rss_kb'] / 1024:.1f} MiB ({rss_growth * 100:+.1f}%)"),
        ("no session, backend or socket left after the clients left",
         not run["sessions_after_close"] and not run["backends_after_close"]
         and run["fds_after_close"] <= run["fds_before"] + 2,
         f"sessions {run['sessions_after_close']:.0f}, backends {run['backends_after_close']}, "
         f"fds {run['fds_before']} before -> {run['fds_after_close']} after"),
        ("no task stuck at the end", run["stuck_tasks"] == 0, f"{run['stuck_tasks']} stuck"),
        ("every probe decided by the policy in force", probes["violations"] == 0,
         f"{probes['allowed']} allowed, {probes['refused']} refused, {probes['violations']} violations"),
    ]
    if reloads is not None:
        counted = reloads["metrics_success"] == reloads["valid"] and reloads["metrics_failure"] == reloads["invalid"]
        checks += [
            ("every reload confirmed, the expected version in force after each", reloads["problem_count"] == 0
             and reloads["confirmed"] == reloads["flips"],
             f"{reloads['confirmed']} of {reloads['flips']} confirmed, {reloads['problem_count']} problems"),
            ("reload counters moved: success = valid changes, failure = invalid ones", counted,
             f"success +{reloads['metrics_success']:.0f} ({reloads['valid']} valid), "
             f"failure +{reloads['metrics_failure']:.0f} ({reloads['invalid']} invalid)"),
            ("the log shows each failed reload kept the previous policy", reloads["log_matches_flips"],
             f"{reloads['log_reloaded']} reloaded, {reloads['log_failed_kept_previous']} failed (kept previous)"),
        ]
    if audit is not None:
        answered = probes["allowed"] + probes["refused"]
        checks.append(("audit: a record of every probe, each with its policy version's verdict",
                       audit["probe_mismatches"] == 0 and audit["other_versions"] == 0
                       and audit["probe_records"] >= answered > 0,
                       f"{audit['probe_records']} probe records for {answered} probes answered, "
                       f"{audit['probe_mismatches']} mismatches, "
                       f"{audit['other_versions']} records of another version"))
    return {
        "statements": rec.total, "counted": rec.counted, "per_second": rec.counted / counted_seconds,
        "latency_ms": {"p50": pct(lat, 0.5), "p90": pct(lat, 0.9), "p99": pct(lat, 0.99),
                       "max": lat[-1] if lat else None},
        "by_kind": by_kind, "sqlstates": dict(rec.sqlstates), "refusal_sqlstates": dict(rec.refusal_states),
        "unexpected": dict(rec.unexpected), "unexpected_examples": rec.examples, "timeouts": rec.timeouts,
        "losses": rec.losses, "loss_examples": rec.loss_examples, "reconnects": rec.reconnects,
        "rss": {"before_kb": run["rss_before_kb"], "after_warmup_kb": warm["rss_kb"], "end_kb": end["rss_kb"],
                "max_kb": max(s["rss_kb"] for s in during), "hwm_kb": end["hwm_kb"],
                "after_close_kb": run["rss_after_close_kb"], "growth": rss_growth, "slope_mib_per_min": slope},
        "fds": {"before": run["fds_before"], "min": min(fds), "max": max(fds), "end": end["fds"],
                "after_close": run["fds_after_close"]},
        "reloads": reloads, "probes": probes, "audit": audit, "run": run, "samples": samples,
        "checks": [{"check": c, "ok": ok, "measured": m} for c, ok, m in checks],
    }


# -- the report ------------------------------------------------------------------------------------

def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(meta: dict, opts: argparse.Namespace, res: dict) -> str:
    t = report.table
    m = meta["machine"]
    run = res["run"]
    lines = [
        BEGIN,
        f"## Latest soak: {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        *(f"- **{k}**: {m[k]}" for k in ("cpu", "cores", "memory", "kernel", "python")),
        f"- **postgresql**: {meta['postgresql']}",
        f"- **proxy code**: {meta['revision']}",
        f"- **proxy event loop**: {'uvloop' if meta['uvloop'] else 'asyncio'}; the harness's: {meta['harness_loop']}",
        f"- **limits**: RLIMIT_NOFILE {meta['nofile'][0]} soft / {meta['nofile'][1]} hard (harness and proxy); "
        f"PostgreSQL max_connections {meta['max_connections']}",
        f"- **clients**: {opts.clients} connections ({opts.active} active, {opts.clients - opts.active} idle), "
        f"asyncpg on one event loop, roles and purposes as below; {run['backends_connected']} PostgreSQL "
        f"backends while connected; connecting took {run['connect_seconds']:.1f} s",
        f"- **traffic**: {run['t_traffic']:.0f} s, the first {opts.warmup:.0f} s warm-up (not in the totals); "
        f"closed loop (think time {opts.think_ms:g} ms), each statement with new literals, simple query "
        f"protocol or prepared (asyncpg's statement cache) at random",
        "- **policy reloads**: " + (f"policy.csv replaced every {opts.reload_interval:g} s, valid and invalid "
                                    f"alternately, reload by {opts.reload_trigger}"
                                    + (f" (--policy-watch-interval {opts.watch_interval:g})"
                                       if opts.reload_trigger == "watch" else "")
                                    if opts.reload else "off"),
        f"- **audit log**: {'on' if opts.audit else 'off'}; metrics on; tracing off",
        f"- **load average** before / after: {meta['load_before']} / {meta['load_after']}",
        f"- **duration of the whole run**: {meta['elapsed']}",
        "",
        "### Verdict",
        "",
        t(["check", "measured", ""], [[c["check"], c["measured"], "pass" if c["ok"] else "**FAIL**"]
                                     for c in res["checks"]]),
        "",
        "### Throughput, latency, errors (after warm-up)",
        "",
        f"{res['counted']:,} statements in {run['t_traffic'] - opts.warmup:.0f} s: **{res['per_second']:.0f} "
        f"statements/s**; latency p50 **{_f(res['latency_ms']['p50'], '.2f')} ms**, p90 "
        f"{_f(res['latency_ms']['p90'], '.2f')} ms, p99 **{_f(res['latency_ms']['p99'], '.2f')} ms**, max "
        f"{_f(res['latency_ms']['max'], '.0f')} ms (client wall time, {opts.active} clients in a closed loop on "
        f"{m['cores']} cores shared with PostgreSQL and the harness: queueing, not the proxy's own cost; see RESULTS.md for "
        f"that). {res['statements']:,} statements including the warm-up.",
        "",
        t(["statement", "role / purpose", "policy says", "n", "p50 ms", "p99 ms", "outcomes"],
          [[k["kind"], f"{k['role']} / {k['purpose']}", k["expect"] if k["kind"] != PROBE.name
            else "allowed (A) / refused (B)", f"{k['n']:,}", _f(k["p50_ms"], ".2f"), _f(k["p99_ms"], ".2f"),
            ", ".join(f"{o} {n:,}" for o, n in sorted(k["outcomes"].items()))] for k in res["by_kind"]]),
        "",
        f"Errors by SQLSTATE (whole run): {res['sqlstates'] or 'none'}; of statements the policy refuses: "
        f"{res['refusal_sqlstates'] or 'none'}. Unexpected outcomes: {sum(res['unexpected'].values())}"
        + (f" ({res['unexpected']})" if res["unexpected"] else "") + f"; client timeouts: {res['timeouts']}; "
        f"connections lost: {res['losses']}; idle connections answering at the end: {run['idle_alive']} of "
        f"{run['idle_total']}.",
        "",
        "### Memory and open files of the proxy",
        "",
        t(["", "before the clients", "after warm-up", "end of traffic", "max during", "after the clients left"],
          [["RSS MiB", _f(res["rss"]["before_kb"] / 1024), _f(res["rss"]["after_warmup_kb"] / 1024),
            _f(res["rss"]["end_kb"] / 1024), _f(res["rss"]["max_kb"] / 1024),
            _f(res["rss"]["after_close_kb"] / 1024)],
           ["open fds", str(res["fds"]["before"]), "", str(res["fds"]["end"]),
            f"{res['fds']['max']} (min {res['fds']['min']})", str(res["fds"]["after_close"])]]),
        "",
        f"RSS end vs after warm-up: {res['rss']['growth'] * 100:+.1f}% (criterion: within 10%); least-squares "
        f"slope after warm-up {_f(res['rss']['slope_mib_per_min'], '+.2f')} MiB/min; peak (VmHWM) "
        f"{res['rss']['hwm_kb'] / 1024:.1f} MiB.",
        "",
    ]
    if res["reloads"] is not None:
        r, p = res["reloads"], res["probes"]
        lines += [
            "### Policy reloads under load",
            "",
            f"{r['flips']} changes of policy.csv ({r['valid']} valid, {r['invalid']} invalid); each confirmed on "
            f"/metrics before the next ({r['confirmed']} confirmed, median {_f(r['confirm_ms_p50'], '.0f')} ms, "
            f"longest {_f(r['confirm_ms_max'], '.0f')} ms after the change). "
            f"`purpose_proxy_policy_reloads_total`: success +{r['metrics_success']:.0f}, failure "
            f"+{r['metrics_failure']:.0f}. Proxy log: {r['log_reloaded']} \"policy reloaded\", "
            f"{r['log_failed_kept_previous']} \"failed; the previous policy ... stays in force\", in the order of "
            f"the changes and naming the right versions: {'yes' if r['log_matches_flips'] else '**no**'}. "
            f"Versions seen in force: {', '.join(r['versions_seen'])} (A = {r['version_A']}, B = {r['version_B']}).",
            "",
            f"The probe ({PROBE.role} / {PROBE.purpose}, `{PROBE.template}`) is allowed under A and refused "
            f"under B (policy.csv:{r['flip_line']} flips from allow to deny); each invalid policy is the other "
            f"valid one plus a broken line, so a half-loaded policy would flip it. Outcomes: {p['allowed']:,} "
            f"allowed with the member's invoices, {p['refused']:,} refused 42501 naming the rule, {p['other']} "
            f"other; {p['during_a_reload']:,} ran while a reload was in progress (either answer right); "
            f"**{p['violations']} decided by a policy not in force**.",
            "",
        ]
    if res["audit"] is not None:
        a = res["audit"]
        lines += [f"Audit log: {a['statements']:,} statement records, {a['probe_records']:,} of the probe, "
                  f"{a['probe_mismatches']} with a verdict other than their policy version's, "
                  f"{a['other_versions']} naming a version other than A or B; policy_reload records {a['reloads']}.",
                  ""]
    step = max(1, len(res["samples"]) // 24)
    shown = [s for i, s in enumerate(res["samples"]) if i % step == 0 or s["phase"] in ("warm", "end")]
    lines += [
        f"### Over time (every {step * opts.sample_interval:g} s; all samples in the JSON)",
        "",
        t(["t s", "phase", "stmt/s", "p50 ms", "p99 ms", "errors", "unexpected", "RSS MiB", "fds", "sessions",
           "lost", "reloads ok/failed", "load"],
          [[f"{s['t']:.0f}", s["phase"], f"{s['per_second']:.0f}", _f(s["p50_ms"], ".2f"), _f(s["p99_ms"], ".1f"),
            str(sum(s["errors"].values())), str(s["unexpected"]), _f(s["rss_kb"] / 1024), str(s["fds"]),
            _f(s.get("sessions_open"), ".0f"), str(s["losses"]),
            f"{_f(s.get('reloads_success'), '.0f')}/{_f(s.get('reloads_failure'), '.0f')}", s["load"]]
           for s in shown]),
        "",
    ]
    if res["unexpected_examples"] or res["loss_examples"]:
        lines += ["### First unexpected outcomes", "", *(f"- {x}" for x in res["unexpected_examples"] +
                                                          res["loss_examples"]), ""]
    lines.append(END)
    return "\n".join(lines)


def write_results(path: Path, section: str) -> None:
    """Replace the soak's section of ``path``, keeping anything outside the markers."""
    report.write_results(path, section, BEGIN, END, "# Soak results")


# -- main ------------------------------------------------------------------------------------------

def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _event_loop() -> tuple[Any, str]:
    try:
        import uvloop

        return uvloop.new_event_loop, "uvloop"
    except ImportError:
        return None, "asyncio"


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind like Ctrl-C: stop what was started
    started = time.monotonic()
    # 1 socket per client here, 2 (client and upstream) in the proxy, which inherits the limit.
    nofile = idle.raise_nofile(idle.needed_nofile(opts.clients))
    if nofile[0] != resource.RLIM_INFINITY and nofile[0] < idle.needed_nofile(opts.clients):
        print(f"error: {opts.clients} clients need {idle.needed_nofile(opts.clients)} open files, the hard limit "
              f"is {nofile[1]}: raise it (ulimit -Hn as root)", file=sys.stderr)
        return 2
    max_connections = max(1100, opts.clients + 100)
    loop_factory, loop_name = _event_loop()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.soak " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": report.machine(), "revision": report.revision(), "load_before": _loadavg(),
        "nofile": nofile, "max_connections": max_connections, "harness_loop": loop_name,
    }
    from proxy.devtools.sample import policies_dir

    policy_dir = Path(tempfile.mkdtemp(prefix="purpose-proxy-soak-policy-"))
    audit_path = policy_dir.parent / f"{policy_dir.name}-audit.jsonl"
    log_copy: Path | None = None
    try:
        for name in POLICY_FILES:
            shutil.copyfile(policies_dir() / name, policy_dir / name)
        variants = policy_variants(policy_dir) if opts.reload else None
        extra = ["--max-client-connections", str(opts.clients + 100)]
        if opts.reload and opts.reload_trigger == "watch":
            extra += ["--policy-watch-interval", str(opts.watch_interval)]
        if opts.audit:
            extra += ["--audit-sink", "file", "--audit-path", str(audit_path)]
        print(f"setting up PostgreSQL (max_connections {max_connections}, sample database with {opts.members} "
              f"members) and the enforcing proxy ...", flush=True)
        with Stack(0, pool_size=1, enforcing=False, workers=False, pgbouncer=False, relay=False,
                   sample_members=opts.members, max_connections=max_connections, personal_policies=policy_dir,
                   personal_args=tuple(extra)) as stack:
            meta["postgresql"] = stack.versions()["postgresql"]
            meta["uvloop"] = stack.uses_uvloop()
            soak = Soak(opts, stack, policy_dir, variants)
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                run = runner.run(asyncio.wait_for(soak.run(), opts.duration + opts.statement_timeout + 600))
            log = stack.personal_proxy.log()
            if stack.personal_proxy.proc.poll() is not None:
                print(f"error: the proxy exited ({stack.personal_proxy.proc.returncode})", file=sys.stderr)
            audit = audit_check(audit_path, variants) if opts.audit and variants is not None else None
            res = summarise(opts, soak, run, log, audit)
            if not all(c["ok"] for c in res["checks"]):
                log_copy = Path(tempfile.gettempdir()) / f"purpose-proxy-soak-{int(time.time())}.log"
                log_copy.write_text(log)
    except KeyboardInterrupt:
        print("interrupted; stopped everything", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(policy_dir, ignore_errors=True)
        for f in audit_path.parent.glob(audit_path.name + "*"):
            f.unlink(missing_ok=True)
    meta["load_after"] = _loadavg()
    meta["elapsed"] = f"{time.monotonic() - started:.0f} s"
    text = markdown(meta, opts, res)
    print()
    print(text)
    if log_copy is not None:
        print(f"\nthe proxy's log: {log_copy}")
    if opts.results:
        write_results(opts.results, text)
        print(f"\nwrote {opts.results}")
    if opts.json:
        opts.json.write_text(json.dumps({"meta": meta, "options": {k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(opts).items()},
                                         **res}, indent=2, default=str) + "\n")
        print(f"wrote {opts.json}")
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
