"""Observability settings (validation, CLI flags, environment), trace provider choice, and log formats."""

from __future__ import annotations

import io
import json
import logging

import pytest

from proxy import cli
from proxy.config import ConfigError, load
from proxy.observability import logs, tracing
from proxy.observability.recorder import Recorder, enabled

BASE = {"decider": "proxy.enforcement.hook:allow_all"}


def cfg(**kw):
    return load(env={}, overrides={**BASE, **kw})


def test_defaults():
    c = cfg()
    assert (c.metrics_listen, c.trace_exporter, c.audit_sink, c.audit_when_full) == (
        "127.0.0.1:9187", "none", "file", "block")
    assert c.audit_queue_size == 10000 and c.audit_rotate_bytes > 0 and c.audit_rotate_seconds > 0
    assert enabled(c)
    assert not enabled(cfg(metrics_listen="off", audit_sink="none"))  # the relay-only configuration


def test_otlp_without_the_exporter_package_is_a_clear_config_error(capsys):
    with pytest.raises(ConfigError, match="opentelemetry-exporter-otlp-proto-http.*not installed"):
        cfg(trace_exporter="otlp")
    with pytest.raises(ConfigError, match="opentelemetry-exporter-otlp-proto-grpc"):
        cfg(trace_exporter="otlp", otlp_protocol="grpc")
    assert cli.main(["serve", "--decider", "proxy.enforcement.hook:allow_all", "--trace-exporter", "otlp"]) == 2
    assert "needs the Python package opentelemetry-exporter-otlp-proto-http" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [
    {"trace_exporter": "jaeger"}, {"otlp_protocol": "udp"}, {"audit_sink": "syslog"}, {"audit_when_full": "drop"},
    {"audit_queue_size": 0}, {"audit_rotate_bytes": -1}, {"audit_block_timeout": 0}, {"metrics_listen": "nope"},
    {"log_format": "xml"}, {"audit_sink": "file", "audit_path": ""},
])
def test_invalid_values(bad):
    with pytest.raises(ConfigError):
        cfg(**bad)


def test_environment_and_file(tmp_path):
    env = {"PURPOSE_PROXY_AUDIT_WHEN_FULL": "fail", "PURPOSE_PROXY_AUDIT_QUEUE_SIZE": "7",
           "PURPOSE_PROXY_METRICS_LISTEN": "off", "PURPOSE_PROXY_DECIDER": BASE["decider"]}
    c = load(env=env)
    assert (c.audit_when_full, c.audit_queue_size, c.metrics_listen) == ("fail", 7, "off")
    toml = tmp_path / "p.toml"
    toml.write_text('decider = "proxy.enforcement.hook:allow_all"\ntrace_exporter = "console"\n'
                    'audit_rotate_seconds = 60\nlog_format = "logfmt"\n')
    c = load(toml, env={})
    assert (c.trace_exporter, c.audit_rotate_seconds, c.log_format) == ("console", 60.0, "logfmt")


def test_cli_flags_reach_the_config():
    args = cli.build_parser().parse_args([
        "serve", "--decider", BASE["decider"], "--audit-sink", "stdout", "--audit-rotate-bytes", "1000",
        "--trace-exporter", "console", "--metrics-listen", "off", "--log-format", "logfmt",
        "--audit-when-full", "fail", "--audit-block-timeout", "0.5"])
    c = cli.config_from_args(args)
    assert (c.audit_sink, c.audit_rotate_bytes, c.trace_exporter, c.metrics_listen, c.log_format,
            c.audit_when_full, c.audit_block_timeout) == ("stdout", 1000, "console", "off", "logfmt", "fail", 0.5)


def test_trace_provider_per_exporter():
    assert tracing.build_provider(cfg()) is None  # none: no provider, nothing runs
    provider = tracing.build_provider(cfg(trace_exporter="console"))
    assert provider is not None
    provider.shutdown()
    rec = Recorder(cfg(metrics_listen="off", audit_sink="none"))
    assert rec.tracer is None and rec.metrics is None and rec.audit is None


def record(msg: str, *args, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except type(exc):
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("proxy.test", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_log_formats_and_masked_exceptions():
    failure = ValueError("cannot parse near 'canary-4111' at 1234")
    j = json.loads(logs.JsonFormatter().format(record("session %s: failed", "00000a", exc=failure)))
    assert j["msg"] == "session 00000a: failed" and j["level"] == "error" and j["logger"] == "proxy.test"
    assert "ValueError" in j["exc"] and "canary" not in j["exc"] and "1234" not in j["exc"]
    line = logs.LogfmtFormatter().format(record("listening on %s", "127.0.0.1:6432", exc=failure))
    assert line.startswith("ts=") and " level=error logger=proxy.test msg=\"listening on 127.0.0.1:6432\"" in line
    assert "\n" not in line and "canary" not in line
    text = logs.TextFormatter().format(record("x", exc=failure))
    assert "ValueError" in text and "canary" not in text


def test_configure_installs_the_chosen_format():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("warning", "logfmt")
    try:
        root = logging.getLogger()
        assert root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, logs.LogfmtFormatter)
        stream = io.StringIO()
        root.handlers[0].setStream(stream)
        logging.getLogger("proxy.x").warning("policy %s loaded", "abc")
        assert stream.getvalue().strip().endswith('msg="policy abc loaded"')
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
