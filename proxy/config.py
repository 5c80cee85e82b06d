"""Configuration: defaults, then a TOML file, then PURPOSE_PROXY_* variables, then flags.

Every setting has one name used in all three places: ``max_client_connections`` in
TOML is ``PURPOSE_PROXY_MAX_CLIENT_CONNECTIONS`` in the environment and
``--max-client-connections`` on the command line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "PURPOSE_PROXY_"


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass
class Config:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:6432"])
    upstream: str = "127.0.0.1:5432"
    policies: str = "policies"
    # Worker processes (proxy.workers): more than 1 runs a supervisor and that many
    # workers sharing the listen ports with SO_REUSEPORT (Linux spreads clients).
    workers: int = 1
    # The metrics and health endpoint (/metrics, /healthz, /readyz); "off" turns
    # metrics off entirely (nothing is counted).
    metrics_listen: str = "127.0.0.1:9187"
    max_client_connections: int = 1000
    # Authenticated sessions per role; over it, FATAL 53300 as PostgreSQL's own
    # per-role CONNECTION LIMIT. 0: no limit.
    max_connections_per_role: int = 0
    max_message_size: int = 256 * 1024 * 1024
    # Bytes of SQL text in one Query or Parse; longer statements are refused with
    # ERROR 54000 without being analysed (analysis costs about 4.5 us per byte of
    # the event loop every session shares). 0: no limit.
    max_statement_length: int = 256 * 1024
    # Seconds to connect to PostgreSQL, and for its first answer to the startup packet.
    connect_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    # Seconds from accepting a client until it is authenticated (PostgreSQL's
    # authentication_timeout, same default); then the connection is closed silently.
    auth_timeout: float = 60.0
    # Seconds a session may stay idle outside a transaction block before FATAL 57P05
    # (PostgreSQL's idle_session_timeout). 0: off.
    idle_session_timeout: float = 0.0
    # Seconds PostgreSQL may stay silent while a statement waits for its answer; then
    # the proxy cancels the statement (the client gets PostgreSQL's 57014), and after as
    # long again without an answer ends the session with FATAL 08006. 0: off.
    upstream_response_timeout: float = 0.0
    # Client-facing TLS: the proxy terminates it with this certificate and key.
    tls_cert: str | None = None
    tls_key: str | None = None
    client_tls_required: bool = False
    # Upstream TLS: disable | prefer | require | verify-full
    upstream_tls: str = "disable"
    upstream_tls_ca: str | None = None
    # Where statements are decided: "purpose" (the policy in `policies`), or
    # "module:callable" naming a decider factory (proxy.enforcement.hook:allow_all
    # relays everything: for measuring the relay alone).
    decider: str = "purpose"
    # The proxy's own connection for reading each database's schema (asyncpg DSN;
    # the database name is replaced by the session's).
    schema_dsn: str | None = None
    purpose_setting: str = "pii.purpose"
    schema_refresh_interval: float = 300.0
    # How often each loaded database's catalogs are checked for DDL run directly in PostgreSQL
    # (one small query over a kept connection; 0: only the interval reload sees such DDL).
    catalog_watch_interval: float = 2.0
    # Decisions kept (by statement text, and by shape for statements that differ only in
    # their constants); 0 turns the decision cache off.
    decision_cache_size: int = 10000
    # and at most this many bytes of statement texts, rewrites and analyses (an estimate): long
    # statements differing in their spaces filled 10000 entries with gigabytes (hunt 21)
    decision_cache_bytes: int = 64 * 1024 * 1024
    policy_watch_interval: float = 2.0
    log_level: str = "info"
    log_format: str = "text"  # text | json | logfmt
    # Traces: none | console | otlp (needs opentelemetry-exporter-otlp-proto-http,
    # or -proto-grpc with otlp_protocol = grpc).
    trace_exporter: str = "none"
    otlp_endpoint: str | None = None  # default: the exporter's (localhost:4318 / :4317)
    otlp_protocol: str = "http"  # http | grpc
    # Audit log: one hash-chained JSON line per decision and session event.
    audit_sink: str = "file"  # file | stdout | none
    audit_path: str = "purpose-proxy-audit.jsonl"
    audit_rotate_bytes: int = 100 * 1024 * 1024  # 0: no size rotation
    audit_rotate_seconds: float = 86400.0  # 0: no time rotation
    audit_queue_size: int = 10000
    # When the writer falls audit_queue_size records behind: "block" waits (up to
    # audit_block_timeout seconds, then keeps the record in memory) or "fail"
    # refuses new statements (SQLSTATE 53000) until it catches up. Never a drop.
    audit_when_full: str = "block"
    audit_block_timeout: float = 1.0

    def validate(self) -> "Config":
        if not self.listen:
            raise ConfigError("listen: at least one address is required")
        for addr in self.listen:
            parse_hostport(addr, "listen")
        if not is_unix_dir(self.upstream):
            parse_hostport(self.upstream, "upstream")
        if self.upstream_tls not in ("disable", "prefer", "require", "verify-full"):
            raise ConfigError(f"upstream_tls: expected disable|prefer|require|verify-full, got {self.upstream_tls!r}")
        if self.upstream_tls == "verify-full" and not self.upstream_tls_ca:
            raise ConfigError("upstream_tls = verify-full needs upstream_tls_ca")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if self.client_tls_required and not self.tls_cert:
            raise ConfigError("client_tls_required needs tls_cert and tls_key")
        if self.max_client_connections < 1:
            raise ConfigError("max_client_connections must be at least 1")
        if self.decider == "purpose" and not self.schema_dsn:
            raise ConfigError("schema_dsn is required for purpose enforcement: a DSN the proxy uses to read "
                              "each database's schema (e.g. postgresql://proxy_reader:...@db:5432/postgres)")
        if "." not in self.purpose_setting:
            raise ConfigError("purpose_setting must be a custom setting name with a dot, like pii.purpose")
        if self.decision_cache_size < 0:
            raise ConfigError("decision_cache_size must be 0 (off) or positive")
        if self.decision_cache_bytes < 1024 * 1024:
            raise ConfigError("decision_cache_bytes must be at least 1 MiB")
        if self.max_message_size < 1024:
            raise ConfigError("max_message_size must be at least 1024 bytes")
        self._validate_limits()
        self._validate_observability()
        self._validate_workers()
        return self

    def _validate_limits(self) -> None:
        if self.max_connections_per_role < 0:
            raise ConfigError("max_connections_per_role must be 0 (no limit) or positive")
        if self.max_statement_length < 0:
            raise ConfigError("max_statement_length must be 0 (no limit) or positive")
        if 0 < self.max_statement_length < 1024:
            raise ConfigError("max_statement_length must be 0 (no limit) or at least 1024 bytes")
        if self.connect_timeout <= 0:
            raise ConfigError("connect_timeout must be more than 0 seconds")
        if self.shutdown_timeout < 0:
            raise ConfigError("shutdown_timeout must not be negative")
        # Like PostgreSQL's authentication_timeout (1 s to 10 min), fractions allowed: it
        # is never off, so that a client that sends nothing cannot hold a connection.
        if not 0 < self.auth_timeout <= 600:
            raise ConfigError("auth_timeout must be more than 0 and at most 600 seconds")
        if self.idle_session_timeout < 0:
            raise ConfigError("idle_session_timeout must be 0 (off) or positive")
        if self.upstream_response_timeout < 0:
            raise ConfigError("upstream_response_timeout must be 0 (off) or positive")

    def _validate_workers(self) -> None:
        if not 1 <= self.workers <= 256:
            raise ConfigError("workers must be between 1 and 256")
        if self.workers == 1:
            return
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigError("workers > 1 needs SO_REUSEPORT, which this platform lacks")
        if any(parse_hostport(addr, "listen")[1] == 0 for addr in self.listen):
            raise ConfigError("workers > 1 needs fixed listen ports (not port 0): the workers share them")
        if self.metrics_listen != "off":
            port = parse_hostport(self.metrics_listen, "metrics_listen")[1]
            if port and port + self.workers > 65535:
                raise ConfigError(f"metrics_listen: worker i serves its metrics on port {port} + 1 + i, "
                                  f"past 65535 with {self.workers} workers")
        if self.audit_sink == "stdout":
            raise ConfigError("audit_sink = stdout cannot be used with workers > 1: the workers' hash chains "
                              "would interleave in one stream (use audit_sink = file: one file per worker)")

    def _validate_observability(self) -> None:
        if self.metrics_listen != "off":
            parse_hostport(self.metrics_listen, "metrics_listen")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: expected debug|info|warning|error, got {self.log_level!r}")
        if self.log_format not in ("text", "json", "logfmt"):
            raise ConfigError(f"log_format: expected text|json|logfmt, got {self.log_format!r}")
        if self.trace_exporter not in ("none", "console", "otlp"):
            raise ConfigError(f"trace_exporter: expected none|console|otlp, got {self.trace_exporter!r}")
        if self.otlp_protocol not in ("http", "grpc"):
            raise ConfigError(f"otlp_protocol: expected http|grpc, got {self.otlp_protocol!r}")
        if self.trace_exporter == "otlp":
            module, package = OTLP_EXPORTERS[self.otlp_protocol]
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                raise ConfigError(f"trace_exporter = otlp (otlp_protocol = {self.otlp_protocol}) needs the Python "
                                  f"package {package}, which is not installed (pip install {package}, or "
                                  f"pip install 'purpose-proxy[otlp]')")
        if self.audit_sink not in ("file", "stdout", "none"):
            raise ConfigError(f"audit_sink: expected file|stdout|none, got {self.audit_sink!r}")
        if self.audit_sink == "file" and not self.audit_path:
            raise ConfigError("audit_sink = file needs audit_path")
        if self.audit_when_full not in ("block", "fail"):
            raise ConfigError(f"audit_when_full: expected block|fail, got {self.audit_when_full!r}")
        if self.audit_queue_size < 1:
            raise ConfigError("audit_queue_size must be at least 1")
        if self.audit_rotate_bytes < 0 or self.audit_rotate_seconds < 0:
            raise ConfigError("audit_rotate_bytes and audit_rotate_seconds must be 0 (off) or positive")
        if not 0 < self.audit_block_timeout <= 60:
            raise ConfigError("audit_block_timeout must be between 0 and 60 seconds")


# The OTLP span exporter module and the package that provides it, per otlp_protocol.
OTLP_EXPORTERS = {
    "http": ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "opentelemetry-exporter-otlp-proto-http"),
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "opentelemetry-exporter-otlp-proto-grpc"),
}


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def is_unix_dir(upstream: str) -> bool:
    return upstream.startswith("/")


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _coerce(name: str, value: Any) -> Any:
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else str(f.type)
    if kind.startswith("list"):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    if kind == "bool":
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return None if value is None else str(value)


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the effective configuration from file, environment and flag overrides."""
    values: dict[str, Any] = {}
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        section = data.get("proxy", data)
        for key, value in section.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[name] = _coerce(name, value)
    for name in FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    return Config(**values).validate()
