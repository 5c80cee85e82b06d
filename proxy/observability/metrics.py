"""The proxy's Prometheus metrics: their registry, cached label children, and the values read at scrape time.

Label values are bounded: decisions are allow/mask/block, purposes and categories
come from the policy in force (anything else folds into ``other``; no purpose is
``none``), refusal reasons are the code's own (capped, the rest ``other``). Children
are created once and cached, so counting a statement is a dictionary lookup and
an increment. The per-statement counters and histograms are the proxy's own plain
cells (``HotCounter``, ``HotHistogram``), written only by the event loop and
turned into metric families at scrape time: prometheus-client's metric objects
take a lock per increment and scan buckets one by one, which cost more than the
rest of the telemetry of a cached statement. Values the proxy already keeps (open sessions, bytes relayed,
upstream connect failures, policy reloads, the audit queue) are read by a
collector at scrape time and cost nothing per statement.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.process_collector import ProcessCollector

from proxy import __version__
from proxy.policy.decision import Allow, Block, Mask

if TYPE_CHECKING:
    from proxy.listener import ProxyServer

DECISIONS = ("allow", "mask", "block")
DECISION_LABEL = {Allow: "allow", Mask: "mask", Block: "block"}
NONE = "none"  # no purpose declared / no personal data touched
OTHER = "other"  # a value outside the bounded set
MAX_REASONS = 64

# Decision latency: tens of microseconds (cached, trivial) to a second (cold schema).
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# End-to-end statement latency, decision to ReadyForQuery.
STATEMENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGES = ("total", "analysis", "policy", "rewrite")


class Metrics:
    """The registry and every metric the proxy exports (names follow Prometheus conventions)."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        disable_created_metrics()  # no ..._created series beside every counter and histogram
        self.registry = r = registry or CollectorRegistry()
        self.statements = HotCounter(
            "purpose_proxy_statements",
            "Statements decided, and later runs of prepared statements, by decision and purpose.",
            ["decision", "purpose"], registry=r)
        self.statement_categories = HotCounter(
            "purpose_proxy_statement_categories",
            "Statements decided and later runs of prepared statements, once per category of personal data they touch "
            "(none: no personal data).",
            ["decision", "purpose", "category"], registry=r)
        self.refusals = HotCounter(
            "purpose_proxy_refusals", "Statements refused, by reason.", ["reason"], registry=r)
        self.startup_refusals = HotCounter(
            "purpose_proxy_startup_refusals", "Connections refused at startup (FATAL) by the decider, by reason.",
            ["reason"], registry=r)
        self.sessions = HotCounter(
            "purpose_proxy_client_sessions", "Client sessions started (startup packet accepted).",
            registry=r).labels()
        self.decision_seconds = HotHistogram(
            "purpose_proxy_decision_duration_seconds",
            "Time to decide on a statement: total, and per stage when the decider reports stages.",
            ["stage"], buckets=DECISION_BUCKETS, registry=r)
        self.statement_seconds = HotHistogram(
            "purpose_proxy_statement_duration_seconds",
            "Statement latency through the proxy, from the client's message to ReadyForQuery, by decision.",
            ["decision"], buckets=STATEMENT_BUCKETS, registry=r)
        self.state = StateCollector()
        r.register(self.state)
        if process:
            ProcessCollector(registry=r)
        # Cached children.
        self._statements: dict[tuple[str, str], object] = {}
        self._categories: dict[tuple[str, str, str], object] = {}
        self._reasons: dict[str, object] = {}
        self._startup_reasons: dict[str, object] = {}
        self.stage = {s: self.decision_seconds.labels(s) for s in STAGES}
        self.latency = {d: self.statement_seconds.labels(d) for d in DECISIONS}
        for d in DECISIONS:
            for p in (NONE, OTHER):
                self.statement(d, p)
            self.category(d, NONE, NONE)

    # --- cached children ---------------------------------------------------------------

    def statement(self, decision: str, purpose: str):
        child = self._statements.get((decision, purpose))
        if child is None:
            child = self._statements[(decision, purpose)] = self.statements.labels(decision, purpose)
        return child

    def category(self, decision: str, purpose: str, category: str):
        key = (decision, purpose, category)
        child = self._categories.get(key)
        if child is None:
            child = self._categories[key] = self.statement_categories.labels(decision, purpose, category)
        return child

    def refusal(self, reason: str):
        child = self._reasons.get(reason)
        if child is None:
            if len(self._reasons) >= MAX_REASONS or not _is_reason(reason):
                reason = OTHER
            child = self._reasons.get(reason) or self.refusals.labels(reason)
            self._reasons[reason] = child
        return child

    def startup_refusal(self, reason: str):
        child = self._startup_reasons.get(reason)
        if child is None:
            if len(self._startup_reasons) >= MAX_REASONS or not _is_reason(reason):
                reason = OTHER
            child = self._startup_reasons.get(reason) or self.startup_refusals.labels(reason)
            self._startup_reasons[reason] = child
        return child

    def prepare_policy(self, purposes: Iterable[str]) -> None:
        """Create the statement children of a policy's purposes (they show as 0 before first use)."""
        for p in purposes:
            for d in DECISIONS:
                self.statement(d, p)

    def names(self) -> set[str]:
        """Every sample name this registry can expose (``..._total``, ``..._bucket``...), for cross-checks."""
        suffixes = {"counter": ("_total",), "info": ("_info",), "histogram": ("_bucket", "_count", "_sum"),
                    "gauge": ("",), "summary": ("", "_count", "_sum")}
        out: set[str] = set()
        for family in list(self.registry.collect()) + self.state.describe():
            out.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        return out


class _Cell:
    """One counter series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _Buckets:
    """One histogram series: counts per bucket (the last is +Inf) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # bucket le=bound holds amount <= bound
        self.sum += amount


class _Hot:
    """A labelled metric whose series (made by ``_series_of``) are plain objects, exported at scrape time."""

    family = CounterMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._series: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str):
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = self._series_of()
        return series

    def describe(self):
        return [self.family(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        family = self.family(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self._series.items()):
            self._add(family, list(values), series)
        return [family]


class HotCounter(_Hot):
    """A labelled counter (``purpose_proxy_x_total``).

    >>> c = HotCounter("x", "Things.", ["kind"]); c.labels("a").inc(); c.labels("a").inc(2)
    >>> [(s.name, s.labels, s.value) for f in c.collect() for s in f.samples]
    [('x_total', {'kind': 'a'}, 3)]
    """

    _series_of = _Cell

    @staticmethod
    def _add(family, values: list[str], cell: _Cell) -> None:
        family.add_metric(values, cell.value)


class HotHistogram(_Hot):
    """A labelled histogram.

    >>> h = HotHistogram("t_seconds", "Time.", ["stage"], buckets=(0.1, 1.0)); b = h.labels("x")
    >>> b.observe(0.1); b.observe(0.5); b.observe(5)
    >>> [(s.name, s.labels.get("le"), s.value) for f in h.collect() for s in f.samples]  # doctest: +NORMALIZE_WHITESPACE
    [('t_seconds_bucket', '0.1', 1), ('t_seconds_bucket', '1.0', 2), ('t_seconds_bucket', '+Inf', 3),
     ('t_seconds_count', None, 3), ('t_seconds_sum', None, 5.6)]
    """

    family = HistogramMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (), *,
                 buckets: tuple[float, ...], registry: CollectorRegistry | None = None) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def _series_of(self) -> _Buckets:
        return _Buckets(self.bounds)

    def _add(self, family, values: list[str], series: _Buckets) -> None:
        counts, total = list(series.counts), series.sum  # a copy: cumulative counts stay consistent
        cumulative, running = [], 0
        for le, n in zip(self._les, counts):
            running += n
            cumulative.append((le, running))
        family.add_metric(values, cumulative, sum_value=total)


def _is_reason(reason: str) -> bool:
    return 0 < len(reason) <= 48 and reason.replace("-", "").replace("_", "").isalnum() and reason.isascii()


class StateCollector:
    """Values read at scrape time from the server, the policy runtime and the audit log."""

    def __init__(self) -> None:
        self.server: "ProxyServer | None" = None
        self.audit = None
        self.retired_from_client = 0  # bytes of sessions that have ended
        self.retired_from_server = 0
        self.started = time.time()

    def describe(self):
        return list(self._families())

    def collect(self):
        return list(self._families(self.server))

    def _families(self, server: "ProxyServer | None" = None):
        open_ = GaugeMetricFamily("purpose_proxy_client_sessions_open",
                                  "Client sessions currently relaying.")
        bytes_ = CounterMetricFamily("purpose_proxy_relayed_bytes", "Bytes relayed, by direction.",
                                     labels=["direction"])
        failures = CounterMetricFamily("purpose_proxy_upstream_connect_failures",
                                       "Failed connection attempts to the upstream PostgreSQL server.")
        plaintext = CounterMetricFamily("purpose_proxy_upstream_unencrypted_connections",
                                        "Upstream connections left unencrypted because the server refused TLS "
                                        "(upstream_tls = prefer).")
        tls_reloads = CounterMetricFamily("purpose_proxy_tls_reloads", "Rereadings of the TLS certificate, key and "
                                          "CA files on SIGHUP, by result (a failure keeps those in force).",
                                          labels=["result"])
        info = InfoMetricFamily("purpose_proxy_policy", "The policy in force (version is a content hash).",
                                labels=["version"])
        reloads = CounterMetricFamily("purpose_proxy_policy_reloads", "Policy reload attempts, by result.",
                                      labels=["result"])
        last = GaugeMetricFamily("purpose_proxy_policy_last_reload_timestamp_seconds",
                                 "Unix time of the last successful policy load.")
        build = InfoMetricFamily("purpose_proxy_build", "The proxy's version.", labels=["version"])
        audit_written = CounterMetricFamily("purpose_proxy_audit_records", "Audit records written.")
        audit_queue = GaugeMetricFamily("purpose_proxy_audit_queue_length",
                                        "Audit records waiting for the writer.")
        audit_full = CounterMetricFamily("purpose_proxy_audit_queue_full",
                                         "Times a record found the audit queue full (then blocked or refused).")
        audit_refused = CounterMetricFamily("purpose_proxy_audit_refused_statements",
                                            "Statements refused because the audit log could not keep up.")
        audit_errors = CounterMetricFamily("purpose_proxy_audit_write_errors", "Failed audit writes (retried).")
        cache_hits = CounterMetricFamily("purpose_proxy_decision_cache_hits",
                                         "Decisions answered from the decision cache, by what matched: the exact "
                                         "text or the shape (text without its constants).", labels=["match"])
        cache_misses = CounterMetricFamily("purpose_proxy_decision_cache_misses",
                                           "Statements analysed because the decision cache had no answer.")
        cache_entries = GaugeMetricFamily("purpose_proxy_decision_cache_entries", "Decisions in the decision cache.")
        cache_bytes = GaugeMetricFamily("purpose_proxy_decision_cache_bytes",
                                        "Memory the decision cache's entries hold (an estimate; bounded by "
                                        "decision_cache_bytes).")
        if server is not None:
            sessions = list(server.sessions)
            open_.add_metric([], sum(1 for s in sessions if s.relaying))
            bytes_.add_metric(["from_client"], self.retired_from_client
                              + sum(getattr(s, "bytes_from_client", 0) for s in sessions))
            bytes_.add_metric(["from_server"], self.retired_from_server
                              + sum(getattr(s, "bytes_from_server", 0) for s in sessions))
            failures.add_metric([], server.upstream_failures)
            plaintext.add_metric([], getattr(server, "upstream_plaintext", 0))
            for result, count in getattr(server, "tls_reloads", {}).items():
                tls_reloads.add_metric([result], count)
            runtime = server.runtime
            if runtime is not None:
                info.add_metric([runtime.policy.version], {})
                reloads.add_metric(["success"], runtime.reloads_ok)
                reloads.add_metric(["failure"], runtime.reloads_failed)
                last.add_metric([], runtime.last_reload)
                cache = getattr(runtime, "cache", None)
                if cache is not None:
                    cache_hits.add_metric(["text"], cache.text_hits)
                    cache_hits.add_metric(["shape"], cache.shape_hits)
                    cache_misses.add_metric([], cache.misses)
                    cache_entries.add_metric([], len(cache))
                    cache_bytes.add_metric([], cache.bytes)
            build.add_metric([__version__], {})
            audit = self.audit
            if audit is not None:
                audit_written.add_metric([], audit.written)
                audit_queue.add_metric([], audit.pending)
                audit_full.add_metric([], audit.full_events)
                audit_refused.add_metric([], audit.refused)
                audit_errors.add_metric([], audit.write_errors)
        yield from (open_, bytes_, failures, plaintext, tls_reloads, info, reloads, last, build, audit_written, audit_queue, audit_full,
                    audit_refused, audit_errors, cache_hits, cache_misses, cache_entries, cache_bytes)
