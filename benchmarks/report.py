"""Summarising runs: the machine description, medians and ratios, the console table, RESULTS.md and the JSON dump."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from statistics import median

from benchmarks.personal import PATHS as PERSONAL_PATHS
from benchmarks.pgbench import STATEMENTS, WORKLOADS, Run

TARGETS = ("direct", "pgbouncer", "proxy")
ENFORCING = "proxy-enforcing"
ENFORCING_2W = "proxy-enforcing-2w"
# Issue #6's acceptance thresholds, shown next to what was measured.
MIN_RATIO = 0.8  # enforcing TPS / PgBouncer TPS, pgbench -S simple and prepared
MAX_CPU_RATIO = 1.5  # enforcing CPU per statement / PgBouncer's
MAX_ADDED_P50_US = 150
MAX_ADDED_P99_US = 1000
MAX_COLD_P50_US = 1500
MAX_IDLE_RSS_MB = 150
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
    targets = list(TARGETS) + sorted({r.target for r in runs} - set(TARGETS))  # proxy-enforcing, proxy-observed
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


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if a and b else "-"


def _per_stmt(by: dict, target: str, workload: str) -> str:
    cpu = by.get(target, {}).get("cpu_us")
    return "-" if cpu is None else f"{cpu / STATEMENTS[workload]:.1f}"


def enforcement_table(summary: dict) -> str:
    """Enforcement on (warm decision cache) against PgBouncer, direct and the relay alone."""
    rows = []
    for w, by in summary.items():
        if ENFORCING not in by:
            continue
        tps = {t: by[t]["tps"] if t in by else None for t in (*TARGETS, ENFORCING)}
        cpu = {t: by[t]["cpu_us"] if t in by else None for t in ("pgbouncer", "proxy", ENFORCING)}
        rows.append([w, *(f"{tps[t]:.0f}" if tps[t] else "-" for t in (*TARGETS, ENFORCING)),
                     f"**{_ratio(tps[ENFORCING], tps['pgbouncer'])}**", _ratio(tps[ENFORCING], tps["direct"]),
                     _ratio(tps[ENFORCING], tps["proxy"]),
                     " / ".join(f"{by[t]['latency_ms']:.3f}" if t in by else "-" for t in ("pgbouncer", ENFORCING)),
                     *(_cpu(*(by[t][k] for k in ("cpu_us", "cpu_user_us", "cpu_sys_us"))) if t in by else "-"
                       for t in ("pgbouncer", ENFORCING)),
                     f"**{_ratio(cpu[ENFORCING], cpu['pgbouncer'])}**",
                     " / ".join(_per_stmt(by, t, w) for t in ("pgbouncer", "proxy", ENFORCING))])
    return table(["workload", "TPS direct", "TPS pgbouncer", "TPS relay", "TPS enforcing", "enforcing/pgbouncer",
                  "enforcing/direct", "enforcing/relay", "latency ms pgbouncer / enforcing",
                  "CPU us/txn pgbouncer (user+sys)", "CPU us/txn enforcing (user+sys)", "CPU enforcing/pgbouncer",
                  "CPU us/statement pgbouncer / relay / enforcing"], rows)


def workers_table(summary: dict) -> str:
    """Scaling from 1 to 2 workers (the enforcing proxy with --workers 2)."""
    rows = []
    for w, by in summary.items():
        if ENFORCING not in by or ENFORCING_2W not in by:
            continue
        one, two = by[ENFORCING], by[ENFORCING_2W]
        rows.append([w, f"{one['tps']:.0f}", f"{two['tps']:.0f}", _ratio(two["tps"], one["tps"]),
                     _ratio(two["tps"], by.get("pgbouncer", {}).get("tps")),
                     _cpu(one["cpu_us"], one["cpu_user_us"], one["cpu_sys_us"]),
                     _cpu(two["cpu_us"], two["cpu_user_us"], two["cpu_sys_us"])])
    return table(["workload", "TPS 1 worker", "TPS 2 workers", "2 workers / 1", "2 workers / pgbouncer",
                  "CPU us/txn 1 worker", "CPU us/txn 2 workers (all processes)"], rows)


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _minus(a: dict | None, b: dict | None) -> str:
    """p50 of path ``a`` - p50 of path ``b`` (signed microseconds), "-" where either did not run."""
    return f"{a['p50_us'] - b['p50_us']:+.0f}" if a and b else "-"


def _by_path(row: dict, key: str) -> str:
    """``key`` (p50_us, p99_us) of every path of a personal-workload row, "-" for a path that did not run."""
    return " / ".join(_us(row.get(path, {}).get(key)) for path in PERSONAL_PATHS)


def personal_table(personal: dict, variant: str) -> str:
    rows = []
    for r in personal["rows"]:
        if r["variant"] != variant:
            continue
        d, p, rw = r.get("direct", {}), r.get("proxy", {}), r.get("rewritten")
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(p.get("errors", {}).items())) or "-"
        rows.append([r["statement"], f"{r['role']} / {r['purpose']}", r["verdict"],
                     _by_path(r, "p50_us"), f"**{p['p50_us'] - d['p50_us']:+.0f}**",
                     _by_path(r, "p99_us"), f"**{p['p99_us'] - d['p99_us']:+.0f}**",
                     _minus(r.get("pgbouncer"), d), _minus(r.get("relay"), d),
                     _us(rw["p50_us"]) if rw else "-", _minus(p, rw), errors])
    paths = " / ".join(PERSONAL_PATHS)
    return table(["statement", "role / purpose", "verdict", f"p50 {paths}", "added p50", f"p99 {paths}",
                  "added p99", "pgbouncer - direct p50", "relay - direct p50", "p50 direct, rewritten SQL",
                  "proxy - rewritten p50", "errors through the proxy"], rows)


def _pgbouncer_path(personal: dict) -> str:
    """What the personal workload's *pgbouncer* column is, or that it did not run."""
    if not any("pgbouncer" in r for r in personal["rows"]):
        return "*pgbouncer*: not run (PgBouncer not installed, see the notes). "
    return ("*pgbouncer* is PgBouncer (`pool_mode=session`) in front of the same database, the original "
            "statements through it: what any connection pooler's hop costs on this machine (it ignores the "
            "purpose option, `ignore_startup_parameters = options`, and logs in to PostgreSQL as the role). ")


def decisions_table(rows: list[dict]) -> str:
    return table(["query kind", "role / purpose", "verdict", "size", "cold p50 us", "cold p99 us", "cold mean us",
                  "warm p50 us", "warm p99 us", "warm: cache hits / misses"],
                 [[r["kind"], f"{r['role']} / {r['purpose']}", r["verdict"], f"{r['lines']} lines, {r['chars']} chars",
                   f"**{r['cold_p50_us']:.0f}**", f"{r['cold_p99_us']:.0f}", f"{r['cold_mean_us']:.0f}",
                   f"{r['warm_p50_us']:.1f}", f"{r['warm_p99_us']:.1f}", f"{r['warm_hits']} / {r['warm_misses']}"]
                  for r in rows])


def _mib(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def idle_table(rows: list[dict]) -> str:
    return table(["proxy", "idle clients", "backends seen", "RSS before, MiB", "RSS with the clients, MiB",
                  "KiB per client", "RSS after they left, MiB", "peak RSS (VmHWM), MiB", "connect time s"],
                 [[r["mode"], str(r["connections"]), str(r["backends"]), _mib(r["rss_idle_kb"]),
                   f"**{_mib(r['rss_connected_kb'])}**", f"{r['per_connection_kb']:.1f}",
                   _mib(r["rss_after_close_kb"]), _mib(r["hwm_kb"]), f"{r['connect_seconds']:.1f}"] for r in rows])


def acceptance(summary: dict, extras: dict) -> list[list[str]]:
    """Issue #6's acceptance criteria next to what this run measured (rows of a table)."""
    out = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "**not met**")

    for w, label in (("select", "pgbench -S simple"), ("select-prepared", "pgbench -S prepared")):
        by = summary.get(w, {})
        if ENFORCING in by and "pgbouncer" in by:
            r = by[ENFORCING]["tps"] / by["pgbouncer"]["tps"]
            out.append([f"{label}: enforcing TPS / PgBouncer >= {MIN_RATIO}", f"{r:.2f}", verdict(r >= MIN_RATIO)])
    for w, by in summary.items():
        a, b = by.get(ENFORCING, {}).get("cpu_us"), by.get("pgbouncer", {}).get("cpu_us")
        if a and b:
            out.append([f"{w}: enforcing CPU per statement <= {MAX_CPU_RATIO} x PgBouncer's",
                        f"{a / STATEMENTS[w]:.1f} vs {b / STATEMENTS[w]:.1f} us ({a / b:.2f} x)",
                        verdict(a / b <= MAX_CPU_RATIO)])
    personal = extras.get("personal")
    if personal:
        for variant in ("simple", "prepared"):
            rows = [r for r in personal["rows"] if r["variant"] == variant and "proxy" in r and "direct" in r]
            if not rows:
                continue
            p50 = max(rows, key=lambda r: r["proxy"]["p50_us"] - r["direct"]["p50_us"])
            p99 = max(rows, key=lambda r: r["proxy"]["p99_us"] - r["direct"]["p99_us"])
            a50 = p50["proxy"]["p50_us"] - p50["direct"]["p50_us"]
            a99 = p99["proxy"]["p99_us"] - p99["direct"]["p99_us"]
            out.append([f"personal data, {variant}: added p50 <= {MAX_ADDED_P50_US} us (worst statement)",
                        f"{a50:+.0f} us ({p50['statement']})", verdict(a50 <= MAX_ADDED_P50_US)])
            out.append([f"personal data, {variant}: added p99 <= {MAX_ADDED_P99_US} us (worst statement)",
                        f"{a99:+.0f} us ({p99['statement']})", verdict(a99 <= MAX_ADDED_P99_US)])

            def own(r: dict) -> float:  # beyond what the statement PostgreSQL gets costs there
                return r["proxy"]["p50_us"] - (r.get("rewritten") or r["direct"])["p50_us"]

            mine = max(rows, key=own)
            out.append([f"personal data, {variant}: the proxy's own share of the added p50 (proxy - rewritten SQL "
                        f"direct, or - direct if not rewritten) <= {MAX_ADDED_P50_US} us (worst statement)",
                        f"{own(mine):+.0f} us ({mine['statement']})", verdict(own(mine) <= MAX_ADDED_P50_US)])
    cold = extras.get("decisions")
    if cold:
        six = cold[:6]
        worst = max(six, key=lambda r: r["cold_p50_us"])
        out.append([f"cold decision p50 < {MAX_COLD_P50_US} us for the six query kinds (worst)",
                    f"{worst['cold_p50_us']:.0f} us ({worst['kind']})",
                    verdict(worst["cold_p50_us"] < MAX_COLD_P50_US)])
    for r in extras.get("idle") or ():
        mb = r["rss_connected_kb"] * 1024 / 1e6
        out.append([f"{r['mode']}: RSS with {r['connections']} idle clients < {MAX_IDLE_RSS_MB} MB",
                    f"{mb:.1f} MB ({r['rss_connected_kb'] / 1024:.1f} MiB)",
                    verdict(mb < MAX_IDLE_RSS_MB if r["connections"] >= 1000 else None)])
    return out


def raw_table(runs: list[Run]) -> str:
    return table(["round", "workload", "target", "TPS", "latency ms", "transactions", "failed",
                  "CPU us/txn (user+sys)"],
                 [[str(r.round), r.workload, r.target, f"{r.tps:.0f}", f"{r.latency_ms:.3f}", str(r.transactions),
                   str(r.failed), _cpu(r.cpu_us, r.cpu_user_us, r.cpu_sys_us)] for r in runs])


def _load(meta: dict, part: str) -> str:
    load = meta.get("load", {}).get(part)
    return f" Load average (1, 5, 15 min) at its start: {load}." if load else ""


def markdown(meta: dict, runs: list[Run], summary: dict, extras: dict | None = None) -> str:
    extras = extras or {}
    env = [f"- **{k}**: {v}" for k, v in {**meta["machine"], **meta["versions"]}.items()]
    personal, cold, idle = extras.get("personal"), extras.get("decisions"), extras.get("idle")

    def has(target: str) -> bool:
        return any(target in by for by in summary.values())

    sections: list[str] = []
    checks = acceptance(summary, extras)
    if checks:
        sections += ["### Issue #6 acceptance criteria, as measured in this run", "",
                     table(["criterion", "measured", ""], checks), ""]
    if runs:
        sections += [f"### Summary (medians over {meta['rounds']} rounds)", "", summary_table(summary), ""]
    if has(ENFORCING):
        sections += [
            "### Enforcement on: purpose-proxy deciding every statement (warm decision cache)", "",
            f"`{ENFORCING}`: `--decider purpose` with `benchmarks/policy/` (pgbench's tables catalogued as "
            "personal data the purpose `benchmark` may read and write), the purpose declared at connect time "
            "(`PGOPTIONS='-c pii.purpose=benchmark'`), metrics, audit and tracing off like the relay. A short "
            "unrecorded run of every workload fills the decision cache first. TPC-B has 7 statements per "
            "transaction, the others 1." + _load(meta, "pgbench"), "",
            enforcement_table(summary), ""]
    if has(ENFORCING_2W):
        sections += ["### Scaling from 1 to 2 workers (enforcing)", "", workers_table(summary), ""]
    if has("proxy-observed"):
        sections += ["### Cost of metrics + audit log + tracing (exporter none)", "", observability_table(summary), ""]
    if personal:
        cache = personal.get("cache", {})
        sections += [
            "### Personal-data workload: per-statement latency, direct vs through the enforcing proxy", "",
            f"The sample ISP database ({personal['members']} members, generated as `purpose-proxy demo` does, "
            "plus indexes on `billing.invoices (member_id)` and `billing.payments (invoice_id)`) behind a proxy "
            "enforcing the seed policy (`policies/`; metrics on, audit and tracing off). One statement at a time "
            "(psycopg, autocommit), the paths taking turns statement by statement with the same literals; "
            f"{personal['rounds']} rounds x {personal['per_round']} statements per kind, variant and path. "
            "Microseconds, client-side wall time per statement (send to last row); " + _pgbouncer_path(personal)
            + "*relay* is the relay-only proxy (every statement allowed, nothing decided), *proxy* the enforcing "
            "one. **added** = proxy - "
            "direct at the same percentile. *rewritten SQL*: the proxy's rewrite of the statement sent directly, so "
            "`proxy - rewritten` is what the proxy adds beyond what the rewritten statement costs PostgreSQL "
            "(consent filtering with `barrier: true` keeps PostgreSQL from using the index: that cost is the "
            "policy's, not the proxy's). A refused statement does not reach PostgreSQL through the proxy "
            "(only a stand-in that fails at once does: its latency is the error round trip); directly it runs."
            + _load(meta, "personal"), "",
            "Simple query protocol, literals in the text, a new literal every statement (decided by the cache's "
            "shape entries):", "", personal_table(personal, "simple"), "",
            "Prepared (`$n` parameters; Parse decided once per connection, then Bind/Execute pass through):", "",
            personal_table(personal, "prepared"), "",
            f"Decision cache of the proxy during this workload: {cache.get('shape_hits', 0):.0f} shape hits, "
            f"{cache.get('text_hits', 0):.0f} text hits, {cache.get('misses', 0):.0f} misses "
            "(`purpose_proxy_decision_cache_hits_total`, `..._misses_total`).", ""]
    if cold:
        sections += [
            "### Decision latency per query kind, in-process (no network)", "",
            "`PurposeSession.decide` with the seed policy and the sample schema loaded from the live database. "
            f"**cold**: decision cache off, so every statement is parsed, resolved, decided and (if the policy "
            f"asks) rewritten; **warm**: cache on, answered by shape. {cold[0]['runs']} timed runs per kind and "
            "mode, each with distinct constants, after 5 untimed ones. The first six are issue #6's kinds; the "
            "last four show what masking, consent filtering, a refusal and aggregate-only use add to a point "
            "select or a GROUP BY." + _load(meta, "decisions"), "", decisions_table(cold), ""]
    if idle:
        sections += [
            "### Proxy memory with idle client connections", "",
            "A fresh proxy per row (metrics, audit and tracing off), then N minimal clients connect through it "
            "(trust authentication; the enforcing proxy with the purpose declared) and stay idle; VmRSS from "
            f"/proc while they are connected. Needs `max_connections` > N in PostgreSQL (the benchmark cluster "
            f"has 1,100) and about 2N + 100 open files in the proxy (`ulimit -n`; this run: soft "
            f"{idle[0]['nofile_soft']}, hard {idle[0]['nofile_hard']})." + _load(meta, "idle"), "",
            idle_table(idle), ""]
        snap = extras.get("rss_at_end")
        if snap:
            sections += ["RSS of the harness's long-running proxies at the end of the run (after serving the "
                         "pgbench rounds; `personal`: the seed-policy proxy of the personal-data workload): "
                         + ", ".join(f"{r['target']} {_mib(r['rss_kb'])} MiB (peak {_mib(r['hwm_kb'])}"
                                     + (f"; {r['processes']} processes, summed" if r.get("processes", 1) > 1 else "")
                                     + ")" for r in snap) + ".", ""]
    notes = meta.get("notes") or []
    if notes:
        sections += ["### Notes", "", *(f"- {n}" for n in notes), ""]
    if runs:
        sections += ["### Per-round raw numbers", "", raw_table(runs)]
    settings = (f"- **settings**: {meta['rounds']} rounds x {meta['duration']} s per run, {meta['clients']} clients, "
                f"{meta['threads']} threads, scale {meta['scale']}, PgBouncer pool_mode=session")
    return "\n".join([
        BEGIN,
        f"## Latest run: {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        *env,
        f"- **proxy code**: {meta['revision']}",
        f"- **proxy event loop**: {'uvloop' if meta['uvloop'] else 'asyncio (uvloop not loaded)'}",
        *([f"- **sqlglot**: {meta['sqlglot']}"] if meta.get("sqlglot") else []),
        *([f"- **compiled loops**: {meta['compiled_loops']}"] if meta.get("compiled_loops") else []),
        settings,
        f"- **load average** before / after: {meta['load_before']} / {meta['load_after']}",
        *([f"- **duration of the whole run**: {meta['elapsed']}"] if meta.get("elapsed") else []),
        "",
        *sections,
        END,
    ])


def write_results(path: Path, section: str, begin: str = BEGIN, end: str = END,
                  title: str = "# Benchmark results") -> None:
    """Replace a harness's section of ``path`` (between ``begin`` and ``end``), keeping anything outside
    the markers."""
    text = path.read_text() if path.exists() else title + "\n\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + section + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def write_json(path: Path, meta: dict, runs: list[Run], summary: dict, extras: dict | None = None) -> None:
    path.write_text(json.dumps({"meta": meta, "runs": [r.as_dict() for r in runs], "summary": summary,
                                **(extras or {})}, indent=2) + "\n")
