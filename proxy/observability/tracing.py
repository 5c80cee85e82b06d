"""Traces: the tracer provider for the configured exporter, and one span tree per statement built from its event.

Spans are built after the fact, when the statement's answer is complete, with
the times the relay took: a statement span (named by ``db.query.summary``) with
children for deciding (``analysis``, ``policy``, ``rewrite`` when the decider
reports those stages, else one ``decide``) and, unless refused, ``upstream``
for the execution in PostgreSQL. With ``trace_exporter = none`` there is no
provider and nothing here runs. Attributes follow the OpenTelemetry database
conventions (``db.system.name``, ``db.namespace``, ``db.operation.name``,
``db.collection.name``, ``db.query.summary``, ``db.query.text`` as the
fingerprint, never literal values) plus ``purpose_proxy.*``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from proxy import __version__
from proxy.config import OTLP_EXPORTERS, Config, ConfigError

TRACER_NAME = "purpose-proxy"


def build_provider(config: Config, exporter: SpanExporter | None = None, *, batch: bool = True
                   ) -> TracerProvider | None:
    """A tracer provider for ``config.trace_exporter`` (or for ``exporter``); None for ``none``."""
    if exporter is None:
        kind = config.trace_exporter
        if kind == "none":
            return None
        if kind == "console":
            exporter = ConsoleSpanExporter(out=sys.stdout)
        elif kind == "otlp":
            exporter = _otlp_exporter(config)
        else:
            raise ConfigError(f"trace_exporter: unknown exporter {kind!r}")
    provider = TracerProvider(resource=Resource.create({"service.name": "purpose-proxy",
                                                         "service.version": __version__}))
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return provider


def _otlp_exporter(config: Config) -> SpanExporter:
    module_name, package = OTLP_EXPORTERS[config.otlp_protocol]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(f"trace_exporter = otlp needs the Python package {package} (pip install {package})") from None
    endpoint = config.otlp_endpoint
    if config.otlp_protocol == "http":
        if endpoint and "/v1/" not in endpoint:
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return module.OTLPSpanExporter(endpoint=endpoint) if endpoint else module.OTLPSpanExporter()
    if endpoint:
        return module.OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    return module.OTLPSpanExporter()


class StatementTracer:
    """Builds the span tree of one completed statement (runs on the event loop, only when tracing is on)."""

    def __init__(self, provider: TracerProvider, wall_offset: float) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME, __version__)
        self.offset = wall_offset  # time.time() - time.perf_counter()

    def _ns(self, t: float) -> int:
        return int((t + self.offset) * 1e9)

    def record(self, *, name: str, started: float, decided: float, finished: float | None,
               stages: Sequence[tuple[str, float]] | None, forwarded: bool, attributes: dict,
               upstream_attributes: dict, error: str | None) -> None:
        t0, t1 = self._ns(started), self._ns(decided)
        t2 = self._ns(finished) if finished is not None else t1
        tracer = self.tracer
        span = tracer.start_span(name, start_time=t0, kind=SpanKind.SERVER, attributes=attributes)
        ctx = trace.set_span_in_context(span)
        if stages:
            t = t0
            for stage, seconds in stages:
                end = t + int(seconds * 1e9)
                tracer.start_span(stage, context=ctx, start_time=t).end(end_time=end)
                t = end
        else:
            tracer.start_span("decide", context=ctx, start_time=t0).end(end_time=t1)
        if forwarded:
            up = tracer.start_span("upstream", context=ctx, kind=SpanKind.CLIENT, start_time=t1,
                                   attributes=upstream_attributes)
            if error is not None:
                up.set_status(Status(StatusCode.ERROR))
            up.end(end_time=t2)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=t2)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes the batch processor (bounded by its own export timeout)
