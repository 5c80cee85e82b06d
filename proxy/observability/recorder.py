"""Where the relay's statement events and the sessions' lifecycle become metrics, spans and audit records.

The core layers only return values: the relay hands completed ``StatementEvent``s
to ``ProxyServer.observe``, the decider keeps the ``Explanation`` of each
decision (``last``, captured per event by the relay), the policy runtime counts
reloads. ``Recorder`` is the one place that turns them into telemetry:

- metrics: cached label children, a few increments per statement;
- spans: only when an exporter is configured (``trace_exporter = none`` costs nothing);
- audit: a statement's record is joined from pieces encoded once per decision, chained and queued;
  the ``audit-writer`` thread only writes the lines.

With metrics off (``metrics_listen = off``), no tracing and ``audit_sink = none``
the server installs no recorder at all: the relay-only configuration benchmarks
compare against.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.config import Config
from proxy.observability import audit as audit_mod
from proxy.observability.fingerprint import Fingerprints, operation_of
from proxy.observability.metrics import DECISION_LABEL, NONE, OTHER, Metrics
from proxy.policy.decision import Block, Decision, Mask
from proxy.wire import codec

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from proxy.listener import ProxyServer
    from proxy.session import Session
    from proxy.wire.relay import StatementEvent

log = logging.getLogger(__name__)

# The refusal sessions get while the audit log cannot keep up (audit_when_full = fail).
AUDIT_UNAVAILABLE = Block(
    "purpose-proxy cannot record this statement in the audit log right now; statement refused",
    sqlstate="53000",
    hint="The audit log writer is behind. Retry shortly; the proxy log has the details.",
    reason="audit-unavailable",
)

_KIND_OPERATION = {"copy_to": "COPY", "copy_from": "COPY"}
_WORDY_KINDS = {"ddl", "utility", "transaction", "other", "empty"}  # named by their first keyword instead


def enabled(config: Config) -> bool:
    """Whether any of metrics, traces or audit is on (else the server installs no recorder)."""
    return config.metrics_listen != "off" or config.trace_exporter != "none" or config.audit_sink != "none"


@dataclass
class _SessionState:
    session_id: str
    started: float  # wall time
    purpose: str | None
    statements: int = 0
    snapshot: tuple = ()
    extra: dict = field(default_factory=dict)


class Recorder:
    """Metrics, traces and audit for one ``ProxyServer``."""

    def __init__(self, config: Config, *, span_exporter: "SpanExporter | None" = None,
                 audit_stream=None) -> None:
        from proxy.observability import tracing

        self.config = config
        self.server: "ProxyServer | None" = None
        self.metrics = Metrics() if config.metrics_listen != "off" else None
        provider = tracing.build_provider(config, span_exporter, batch=span_exporter is None)
        self.wall_offset = time.time() - time.perf_counter()
        self.tracer = tracing.StatementTracer(provider, self.wall_offset) if provider is not None else None
        self.audit: audit_mod.AuditLog | None = None
        if config.audit_sink != "none":
            sink = (audit_mod.FileSink(config.audit_path, config.audit_rotate_bytes, config.audit_rotate_seconds)
                    if config.audit_sink == "file" else audit_mod.StreamSink(audit_stream))
            self.audit = audit_mod.AuditLog(sink, queue_size=config.audit_queue_size,
                                            when_full=config.audit_when_full,
                                            block_timeout=config.audit_block_timeout)
        if self.metrics is not None:
            self.metrics.state.audit = self.audit
        self.endpoint = None
        self._sessions: dict[str, _SessionState] = {}
        self._fingerprints = Fingerprints()
        self._statement_records = StatementRecords(self._fingerprints)
        self._policy_version: str | None = None
        self._purpose_labels: dict[str | None, str] = {}
        self._categories: frozenset[str] = frozenset()

    # --- lifecycle ---------------------------------------------------------------------------

    def bind(self, server: "ProxyServer") -> None:
        self.server = server
        if self.metrics is not None:
            self.metrics.state.server = server
        self._refresh_policy()

    async def start(self) -> None:
        """Start the audit writer and the metrics/health endpoint (before the proxy listens)."""
        if self.audit is not None:
            self.audit.start()
        if self.config.metrics_listen != "off":
            from proxy.observability.endpoint import HealthEndpoint

            self.endpoint = HealthEndpoint(self.config.metrics_listen, self.server, self.metrics)
            await self.endpoint.start()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the endpoint, flush spans, write every queued audit record (bounded by ``timeout``)."""
        import asyncio

        if self.endpoint is not None:
            await self.endpoint.close()
        if self.tracer is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.tracer.shutdown), timeout)
            except Exception as exc:  # an exporter that hangs or fails must not stop the shutdown
                log.error("span exporter shutdown failed: %s", exc.__class__.__name__)
        if self.audit is not None:
            # AuditLog.close joins the writer with this timeout itself; the thread wait is bounded by it.
            await asyncio.to_thread(self.audit.close, timeout)

    # --- policy-derived label sets -------------------------------------------------------------

    def _refresh_policy(self) -> None:
        runtime = self.server.runtime if self.server is not None else None
        policy = runtime.policy if runtime is not None else None
        version = policy.version if policy is not None else None
        if version == self._policy_version and self._purpose_labels:
            return
        self._policy_version = version
        self._purpose_labels = {None: NONE}
        if policy is not None:
            purposes = sorted(policy.purposes.purposes)
            self._purpose_labels.update({p: p for p in purposes})
            self._categories = frozenset(policy.catalog.categories)
            if self.metrics is not None:
                self.metrics.prepare_policy(purposes)

    def _purpose_label(self, purpose: str | None) -> str:
        label = self._purpose_labels.get(purpose)
        return label if label is not None else OTHER

    # --- sessions --------------------------------------------------------------------------------

    def session_started(self, session: "Session") -> None:
        info = session.info
        decider = session.decider
        purpose = getattr(decider, "purpose", None)
        state = _SessionState(info.session_id, time.time(), purpose)
        self._sessions[info.session_id] = state
        if self.metrics is not None:
            self.metrics.sessions.inc()
        if self.audit is not None:
            self.audit.submit(state.started, _session_start_record,
                              (self._snapshot(session), info.tls, self._known_purpose(purpose)))

    def session_ended(self, session: "Session") -> None:
        if self.metrics is not None:
            state_metrics = self.metrics.state
            state_metrics.retired_from_client += session.bytes_from_client
            state_metrics.retired_from_server += session.bytes_from_server
        state = self._sessions.get(session.id)
        if state is None:
            return  # never got to relaying (cancel request, refused at startup, ...)
        relay = session.relay
        if relay is not None:
            cut_off = relay.unfinished() + relay.events
            relay.events.clear()
            if cut_off:
                self.observe(session, cut_off)
        del self._sessions[session.id]
        if self.audit is not None:
            now = time.time()
            self.audit.submit(now, _session_end_record,
                              (session.id, now - state.started, state.statements,
                               bool(relay is not None and relay.authenticated),
                               session.bytes_from_client, session.bytes_from_server))

    def startup_refused(self, session: "Session", block: Block) -> None:
        if self.metrics is not None:
            self.metrics.startup_refusal(block.reason or OTHER).inc()
        if self.audit is not None:
            self.audit.submit(time.time(), _startup_refused_record,
                              (self._snapshot(session), block.sqlstate, block.message, block.reason))

    def policy_reloaded(self, ok: bool, why: str, before: str, after: str) -> None:
        self._refresh_policy()
        if self.audit is not None:
            self.audit.submit(time.time(), _policy_reload_record, (ok, why, before, after))

    def _snapshot(self, session: "Session") -> tuple:
        info = session.info
        relay = session.relay
        app = info.application_name
        if relay is not None:
            app = relay.server_params.get("application_name", app)
        return (info.session_id, info.client_addr, info.role, info.database, app)

    def _known_purpose(self, purpose: str | None) -> str | None:
        """The purpose if the policy knows it (client text that is not a purpose is never recorded)."""
        if purpose is None:
            return None
        if self.server is None or self.server.runtime is None:
            return purpose if self._purpose_labels.get(purpose) else None
        return purpose if self.server.runtime.policy.is_purpose(purpose) else None

    # --- statements --------------------------------------------------------------------------------

    def wrap_decider(self, decider):
        """The decider a session uses: gated by the audit log's ``refusing`` signal in ``fail`` mode."""
        if self.audit is not None and self.config.audit_when_full == "fail":
            return AuditGate(decider, self.audit)
        return decider

    def observe(self, session: "Session", events: list["StatementEvent"]) -> None:
        """Count, trace and audit completed statements (called from ``Session.flush``)."""
        state = self._sessions.get(session.id)
        if self._policy_version is not None and self.server.runtime.policy.version != self._policy_version:
            self._refresh_policy()
        metrics, tracer, audit = self.metrics, self.tracer, self.audit
        decider = session.decider
        snapshot = self._snapshot(session) if (audit is not None or tracer is not None) else None
        for ev in events:
            decision = ev.decision
            label = DECISION_LABEL.get(type(decision), OTHER)
            expl = ev.detail
            if expl is not None and hasattr(expl, "purpose_source"):
                purpose = expl.purpose
                source = expl.purpose_source
            else:
                expl = None
                purpose = state.purpose if state is not None else getattr(decider, "purpose", None)
                source = None
            purpose_label = OTHER if source == "unknown" else self._purpose_label(purpose)
            categories = _categories(expl) if expl is not None else ()
            if metrics is not None:
                metrics.statement(label, purpose_label).inc()
                if categories:
                    known = self._categories
                    for cat in categories:
                        metrics.category(label, purpose_label, cat if cat in known else OTHER).inc()
                else:
                    metrics.category(label, purpose_label, NONE).inc()
                if label == "block":
                    metrics.refusal(decision.reason or OTHER).inc()
                if ev.via != "execute":  # a run of a prepared statement was decided at its Parse
                    metrics.stage["total"].observe(ev.seconds)
                if ev.stages:
                    for stage, seconds in ev.stages:
                        child = metrics.stage.get(stage)
                        if child is not None:
                            child.observe(seconds)
                if ev.finished is not None:
                    metrics.latency[label].observe(ev.finished - ev.started)
            if tracer is not None:
                self._trace(ev, expl, snapshot, purpose_label, label, categories)
            if audit is not None:
                if decision is AUDIT_UNAVAILABLE:
                    audit.refused_statement()
                else:
                    audit.append(self.wall_offset + ev.started,
                                 self._statement_records(ev, expl, snapshot, self._known_purpose(purpose), source))
            if state is not None:
                state.statements += 1
        if state is not None and decider is not None:
            now = getattr(decider, "purpose", state.purpose)
            if now != state.purpose:
                if audit is not None:
                    audit.submit(time.time(), _purpose_change_record,
                                 (session.id, session.info.role, self._known_purpose(state.purpose),
                                  self._known_purpose(now)))
                state.purpose = now

    def _trace(self, ev: "StatementEvent", expl, snapshot: tuple, purpose: str, label: str,
               categories: tuple[str, ...]) -> None:
        fp, fp_id = self._fingerprints(ev.sql)
        tables = _tables(expl) if expl is not None else []
        operation = _operation(expl, fp)
        summary = " ".join([operation] + tables[:3]).strip() or "statement"
        sqlstate = _sqlstate(ev.error) if ev.error is not None else None
        attributes: dict[str, Any] = {
            "db.system.name": "postgresql",
            "db.namespace": snapshot[3],
            "db.query.summary": summary,
            "db.query.text": fp,
            "purpose_proxy.session.id": snapshot[0],
            "purpose_proxy.role": snapshot[2],
            "purpose_proxy.purpose": purpose,
            "purpose_proxy.decision": label,
            "purpose_proxy.categories": list(categories),
            "purpose_proxy.statement.fingerprint": fp_id,
            "purpose_proxy.via": ev.via,
        }
        if operation:
            attributes["db.operation.name"] = operation
        if len(tables) == 1:
            attributes["db.collection.name"] = tables[0]
        if type(ev.decision) is Block and ev.decision.reason:
            attributes["purpose_proxy.reason"] = ev.decision.reason
        if type(ev.decision) is Mask:
            attributes["purpose_proxy.masking.methods"] = list(ev.decision.methods)
        if expl is not None:
            attributes["purpose_proxy.policy.version"] = expl.policy_version
        rows = ev.rows
        if rows is not None:
            attributes["db.response.returned_rows"] = rows
        if sqlstate is not None:
            attributes["db.response.status_code"] = sqlstate
            attributes["error.type"] = sqlstate
        upstream = {"db.system.name": "postgresql", "db.namespace": snapshot[3], "db.query.summary": summary}
        if operation:
            upstream["db.operation.name"] = operation
        if len(tables) == 1:
            upstream["db.collection.name"] = tables[0]
        if sqlstate is not None:
            upstream["db.response.status_code"] = sqlstate
        self.tracer.record(name=summary, started=ev.started, decided=ev.started + ev.seconds,
                           finished=ev.finished, stages=ev.stages,
                           forwarded=type(ev.decision) is not Block, attributes=attributes,
                           upstream_attributes=upstream, error=sqlstate)


class AuditGate:
    """A session's decider behind the audit log's ``refusing`` signal (``audit_when_full = fail``)."""

    def __init__(self, decider, audit: audit_mod.AuditLog) -> None:
        self._decider = decider
        self._decide = getattr(decider, "decide", decider)
        self._audit = audit
        self.last = None

    def decide(self, sql: str, via: str) -> Decision:
        if self._audit.refusing:
            self.last = None
            return AUDIT_UNAVAILABLE
        decision = self._decide(sql, via)
        self.last = getattr(self._decider, "last", None)
        return decision

    @property
    def epoch(self):
        return getattr(self._decider, "epoch", 0)

    @property
    def purpose(self):
        return getattr(self._decider, "purpose", None)

    def attach(self, relay) -> None:
        if hasattr(self._decider, "attach"):
            self._decider.attach(relay)

    def __getattr__(self, name: str):
        # Everything else of the decider's protocol (timings, ready, withhold_error_rows,
        # ...) is the decider's own: present exactly when the decider has it.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._decider, name)


# --- pieces of an Explanation ------------------------------------------------------------------


def _categories(expl) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for col in expl.columns:
        for cat in col.categories:
            seen[cat] = None
    return tuple(seen)


def _tables(expl) -> list[str]:
    seen: dict[str, None] = {}
    for col in expl.columns:
        seen[col.column.rsplit(".", 1)[0]] = None
    for rel in expl.relations:
        seen[rel] = None
    return list(seen)


def _operation(expl, fingerprint: str) -> str:
    if expl is not None and expl.statements:
        kind = expl.statements[0]
        if kind not in _WORDY_KINDS:
            return _KIND_OPERATION.get(kind, kind.upper())
    return operation_of(fingerprint)


def _sqlstate(raw: bytes) -> str | None:
    return codec.parse_error_fields(raw[5:]).get("C")


# --- audit record builders ------------------------------------


def _session_fields(snapshot: tuple) -> dict:
    sid, client, role, database, app = snapshot
    return {"session": sid, "client": client, "role": role, "database": database, "application_name": app}


def _session_start_record(snapshot: tuple, tls: bool, purpose: str | None) -> dict:
    return {"type": "session_start", **_session_fields(snapshot), "tls": tls, "purpose": purpose}


def _session_end_record(sid: str, seconds: float, statements: int, authenticated: bool, bytes_in: int,
                        bytes_out: int) -> dict:
    return {"type": "session_end", "session": sid, "duration_seconds": round(seconds, 6),
            "statements": statements, "authenticated": authenticated,
            "bytes_from_client": bytes_in, "bytes_from_server": bytes_out}


def _startup_refused_record(snapshot: tuple, sqlstate: str, message: str, reason: str) -> dict:
    return {"type": "startup_refused", **_session_fields(snapshot),
            "error": {"sqlstate": sqlstate, "message": message, "source": "proxy"}, "reason": reason or None}


def _purpose_change_record(sid: str, role: str, before: str | None, after: str | None) -> dict:
    return {"type": "purpose_change", "session": sid, "role": role, "from": before, "to": after,
            "purpose": after}


def _policy_reload_record(ok: bool, why: str, before: str, after: str) -> dict:
    return {"type": "policy_reload", "result": "success" if ok else "failure", "trigger": why,
            "version_before": before, "version_after": after, "changed": before != after}


def _error_fields(ev: "StatementEvent") -> dict | None:
    if ev.error is None:
        if ev.finished is None and type(ev.decision) is not Block:
            return None
        if type(ev.decision) is Block and ev.finished is not None and ev.decision.severity == "FATAL":
            d = ev.decision
            return {"sqlstate": d.sqlstate, "message": d.message, "source": "proxy"}
        return None
    fields = codec.parse_error_fields(ev.error[5:])
    decision = ev.decision
    if type(decision) is Block and fields.get("C") == decision.sqlstate:
        return {"sqlstate": decision.sqlstate, "message": decision.message, "source": "proxy"}
    # PostgreSQL's own error: its message can hold values in any form (RAISE '%' of a parameter, a
    # value with a quote inside "..."), so it is not recorded; the condition's name stands in.
    return {"sqlstate": fields.get("C"), "message": condition_name(fields.get("C")), "source": "postgresql"}


_CONDITIONS: dict[str, str] = {}


def condition_name(sqlstate: str | None) -> str | None:
    """PostgreSQL's name of the error condition ``sqlstate`` (Appendix A, "PostgreSQL Error Codes"), from
    asyncpg's table of them; None when unknown.

    >>> condition_name("22P02"), condition_name("P0001"), condition_name("ZZZZZ")
    ('invalid_text_representation', 'raise_exception', None)
    """
    if not _CONDITIONS:
        import asyncpg.exceptions

        stack = [asyncpg.exceptions.PostgresError]
        while stack:
            cls = stack.pop()
            stack.extend(cls.__subclasses__())
            state = getattr(cls, "sqlstate", None)
            if state and state not in _CONDITIONS:
                words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", cls.__name__.removesuffix("Error")).lower()
                _CONDITIONS[state] = words
        _CONDITIONS["P0001"] = "raise_exception"  # asyncpg names it RaiseError
    return _CONDITIONS.get(sqlstate) if sqlstate else None


class StatementRecords:
    """The JSON members of statement audit records, joined from pieces encoded once.

    What a cached decision shares between statements (its explanation and
    decision object, the session, the purpose, the fingerprint) is encoded on
    first use and kept, and so is their join per session, decision and fingerprint
    (the record's head); per statement only the error, row count and times are
    encoded. The pieces keep the objects they were made from, so an ``id`` is never
    reused while its entry lives. Used by one thread (the event loop).

    >>> import json; from proxy.wire.relay import StatementEvent; from proxy.policy.decision import ALLOW
    >>> ev = StatementEvent("query", "SELECT 1", ALLOW, 0.00002, 10.0, finished=10.001)
    >>> rec = json.loads("{" + StatementRecords(Fingerprints())(ev, None, ("s1", "127.0.0.1:5", "app", "db", ""),
    ...                                                        None, None) + "}")
    >>> rec["type"], rec["fingerprint"], rec["verdict"], rec["statement_kinds"], rec["completed"]
    ('statement', 'select ?', 'allow', ['select'], True)
    """

    def __init__(self, fingerprints: Fingerprints, size: int = 2048) -> None:
        self.fingerprints = fingerprints
        self.size = size
        self._heads: dict[tuple, tuple[object, object, str]] = {}
        self._decided: dict[tuple, tuple[object, object, str]] = {}
        self._sessions: dict[tuple, str] = {}
        self._purposes: dict[tuple, str] = {}
        self._fingerprinted: dict[str, str] = {}
        self._rows: dict[bytes, int | None] = {}

    def __call__(self, ev: "StatementEvent", expl, snapshot: tuple, purpose: str | None, source: str | None) -> str:
        fp, fp_id = self.fingerprints(ev.sql)
        decision = ev.decision
        via = ev.via
        # Everything up to the error: one lookup when this session has seen this decision before.
        key = (fp_id, id(expl), id(decision), snapshot, purpose, source, via)
        head = self._heads.get(key)
        if head is None or head[0] is not expl or head[1] is not decision:
            head = self._keep(self._heads, key, (expl, decision, self._head(fp, fp_id, expl, decision, snapshot,
                                                                              purpose, source, via)))
        finished = ev.finished
        error = None if ev.error is None and type(decision) is not Block else _error_fields(ev)
        completions = ev.completions
        if completions is None:
            rows = None
        else:  # the same few CommandComplete tags again and again ("SELECT 1")
            rows = self._rows.get(completions, -1)
            if rows == -1:
                rows = self._keep(self._rows, completions, ev.rows) if len(completions) <= 64 else ev.rows
        return (f'{head[2]},"error":{"null" if error is None else _json(error)},'
                f'"rows":{"null" if rows is None else int(rows)},'
                f'"completed":{"false" if finished is None else "true"},'
                f'"decision_seconds":{"null" if via == "execute" else format(ev.seconds, ".9f")},'
                f'"duration_seconds":{"null" if finished is None else format(finished - ev.started, ".9f")}')

    def _head(self, fp: str, fp_id: str, expl, decision, snapshot: tuple, purpose: str | None, source: str | None,
              via: str) -> str:
        """The members a record shares with others of its session, decision and fingerprint, from pieces."""
        fingerprint = self._fingerprinted.get(fp_id)
        if fingerprint is None:
            fingerprint = self._keep(self._fingerprinted, fp_id,
                                     audit_mod.members({"fingerprint": fp, "fingerprint_id": fp_id}))
        key = (id(expl) if expl is not None else fp_id, id(decision))
        hit = self._decided.get(key)
        if hit is None or hit[0] is not expl or hit[1] is not decision:
            hit = self._keep(self._decided, key, (expl, decision, _decided_members(expl, decision, fp)))
        session = self._sessions.get(snapshot)
        if session is None:
            session = self._keep(self._sessions, snapshot, audit_mod.members(_session_fields(snapshot)))
        declared = self._purposes.get((purpose, source))
        if declared is None:
            declared = self._keep(self._purposes, (purpose, source),
                                  audit_mod.members({"purpose": purpose, "purpose_source": source}))
        return (f'"type":"statement",{session},{declared},"via":{_VIA.get(via) or _json(via)},{fingerprint},'
                f'{hit[2]}')

    def _keep(self, table: dict, key, value):
        if len(table) >= self.size:
            table.clear()  # simpler than an LRU, and rare: the pieces are few and rebuilt on demand
        table[key] = value
        return value


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


_VIA = {via: _json(via) for via in ("query", "parse", "bind", "execute", "function_call")}


def _decided_members(expl, decision: Decision, fp: str) -> str:
    """What a statement's record takes from its explanation and decision: kinds, tables, columns, verdict..."""
    if expl is not None:
        fields = _explanation_fields(expl)
    else:
        op = operation_of(fp)
        fields = {"statement_kinds": [op.lower()] if op else [], "tables": [], "columns": [], "categories": [],
                  "rules": [], "policy_version": None}
    mask = type(decision) is Mask
    fields.update(
        verdict=DECISION_LABEL.get(type(decision), "unknown"),
        reason=(decision.reason or None) if type(decision) is Block else (getattr(expl, "reason", None) or None),
        rewrite={"applied": mask, "methods": list(decision.methods) if mask else []},
        consent_filter=mask and "consent" in decision.methods,  # the rewrite filters rows by consent
    )
    return audit_mod.members(fields)


def _explanation_fields(expl) -> dict:
    columns = [{"column": c.column, "uses": list(c.uses), "categories": list(c.categories),
                "decision": c.outcome, **({"method": c.method} if c.method else {}),
                **({"k": c.k} if c.k is not None else {})} for c in expl.columns]
    rules: dict[str, None] = {}
    for _, d in expl.checks:
        rules.update(dict.fromkeys(d.rules))
    for c in expl.columns:
        for d in c.decisions:
            rules.update(dict.fromkeys(d.decision.rules))
    return {"statement_kinds": list(expl.statements), "tables": _tables(expl), "columns": columns,
            "categories": list(_categories(expl)), "rules": list(rules), "policy_version": expl.policy_version}
