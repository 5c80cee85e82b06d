"""Configuration: defaults, then a TOML file, then PURPOSE_PROXY_* variables, then flags.

Every setting has one name used in all three places: ``max_client_connections`` in
TOML is ``PURPOSE_PROXY_MAX_CLIENT_CONNECTIONS`` in the environment and
``--max-client-connections`` on the command line.
"""

from __future__ import annotations

import dataclasses
import os
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
    metrics_listen: str = "127.0.0.1:9187"
    max_client_connections: int = 1000
    max_message_size: int = 256 * 1024 * 1024
    connect_timeout: float = 10.0
    shutdown_timeout: float = 30.0
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
    policy_watch_interval: float = 2.0
    log_level: str = "info"
    log_format: str = "text"

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
        if self.max_message_size < 1024:
            raise ConfigError("max_message_size must be at least 1024 bytes")
        return self


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
