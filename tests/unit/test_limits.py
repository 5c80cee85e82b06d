"""The proxy's own limits without a database: their settings (TOML, environment, flags, validation) and the
relay applying them as decisions (a statement over max_statement_length, a role over its connection limit)."""

from __future__ import annotations

import doctest

import pytest

from proxy import cli
from proxy.config import Config, ConfigError, load
from proxy.enforcement import limits
from proxy.enforcement.apply import MARKER_PREFIX
from proxy.wire import codec
from proxy.wire.relay import Relay
from proxy.wire.state import Phase
from tests.unit.test_codec import (STARTUP, Decider, auth_ok, authenticated_relay, command_complete, error_fields,
                                   param_status, pg_syntax_error, ready, sent, split_messages, sync)

RELAY_ONLY = {"decider": "proxy.enforcement.hook:allow_all"}
SETTINGS = {  # name: (a valid value other than the default, the flag's text of it)
    "max_connections_per_role": (5, "5"),
    "max_statement_length": (4096, "4096"),
    "auth_timeout": (2.5, "2.5"),
    "idle_session_timeout": (300.0, "300"),
    "upstream_response_timeout": (30.0, "30"),
}


def test_doctests():
    assert doctest.testmod(limits).failed == 0


# --- settings ----------------------------------------------------------------------------------


def test_safe_defaults():
    c = Config(**RELAY_ONLY).validate()
    assert c.max_connections_per_role == 0  # no per-role limit, as PostgreSQL's CONNECTION LIMIT -1
    assert c.max_statement_length == 256 * 1024
    assert c.auth_timeout == 60.0  # PostgreSQL's authentication_timeout
    assert c.idle_session_timeout == 0.0  # off, as PostgreSQL's idle_session_timeout
    assert c.upstream_response_timeout == 0.0


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_one_name_in_toml_environment_and_flags(name, tmp_path):
    value, text = SETTINGS[name]
    toml = tmp_path / "proxy.toml"
    toml.write_text(f'decider = "{RELAY_ONLY["decider"]}"\n{name} = {text}\n')
    assert getattr(load(toml, env={}), name) == value
    env = {"PURPOSE_PROXY_" + name.upper(): text, "PURPOSE_PROXY_DECIDER": RELAY_ONLY["decider"]}
    assert getattr(load(None, env=env), name) == value
    args = cli.build_parser().parse_args(["serve", "--decider", RELAY_ONLY["decider"],
                                          "--" + name.replace("_", "-"), text])
    assert getattr(cli.config_from_args(args), name) == value


@pytest.mark.parametrize("name, value, message", [
    ("max_connections_per_role", -1, "max_connections_per_role must be 0 (no limit) or positive"),
    ("max_statement_length", -1, "max_statement_length must be 0 (no limit) or positive"),
    ("max_statement_length", 100, "max_statement_length must be 0 (no limit) or at least 1024 bytes"),
    ("auth_timeout", 0, "auth_timeout must be more than 0 and at most 600 seconds"),
    ("auth_timeout", 601, "auth_timeout must be more than 0 and at most 600 seconds"),
    ("idle_session_timeout", -1, "idle_session_timeout must be 0 (off) or positive"),
    ("upstream_response_timeout", -0.5, "upstream_response_timeout must be 0 (off) or positive"),
    ("connect_timeout", 0, "connect_timeout must be more than 0 seconds"),
])
def test_invalid_values_are_configuration_errors(name, value, message):
    with pytest.raises(ConfigError) as ei:
        Config(**RELAY_ONLY, **{name: value}).validate()
    assert str(ei.value) == message


def test_off_values_are_valid():
    Config(**RELAY_ONLY, max_connections_per_role=0, max_statement_length=0, idle_session_timeout=0,
           upstream_response_timeout=0).validate()


# --- max_statement_length in the relay -------------------------------------------------------------


def select_of_length(n: int) -> str:
    return "SELECT '" + "x" * (n - len("SELECT ''")) + "'"


def test_statement_over_the_limit_is_refused_unread_through_apply():
    d = Decider()
    relay = authenticated_relay(d, max_statement_length=1024)
    relay.client_data(codec.query(select_of_length(1024)))
    assert sent(relay.to_server) == codec.query(select_of_length(1024))
    assert d.calls == [(select_of_length(1024), "query")]
    relay.server_data(command_complete("SELECT 1") + ready(b"I"))
    relay.to_client.clear()

    relay.client_data(codec.query(select_of_length(1025)))
    assert len(d.calls) == 1  # the decider never saw it
    (stand_in,) = split_messages(sent(relay.to_server))
    marker = codec.query_text(stand_in)
    assert marker.startswith(MARKER_PREFIX)  # the same stand-in as any refusal
    relay.server_data(pg_syntax_error(marker) + ready(b"I"))
    err, rfq = split_messages(sent(relay.to_client))
    f = error_fields(err)
    assert (f["S"], f["C"], f["M"]) == ("ERROR", "54000", "statement is 1025 bytes long, over the limit of 1024 bytes")
    assert rfq == ready(b"I") and relay.phase is Phase.IDLE
    (event,) = relay.events[-1:]
    assert event.decision.reason == "statement-too-long" and event.detail is None
    assert len(event.sql) <= 1024  # telemetry gets a bounded prefix


def test_parse_over_the_limit_discards_its_batch_until_sync():
    d = Decider()
    relay = authenticated_relay(d, max_statement_length=1024)
    relay.client_data(codec.encode_parse("s1", select_of_length(2000)) + sync())
    upstream = split_messages(sent(relay.to_server))
    assert [m[:1] for m in upstream] == [b"P", b"S"]
    assert codec.decode_parse(upstream[0][5:]).sql.startswith(MARKER_PREFIX)
    assert d.calls == []


def test_no_limit_when_zero():
    d = Decider()
    relay = authenticated_relay(d, max_statement_length=0)
    relay.client_data(codec.query(select_of_length(100_000)))
    assert sent(relay.to_server) == codec.query(select_of_length(100_000))
    assert len(d.calls) == 1


# --- the per-role limit at AuthenticationOk -----------------------------------------------------------


def startup_answer() -> bytes:
    return (auth_ok() + param_status("server_version", "15.18")
            + codec.backend_key_data(4242, b"\x00\x00\x30\x39") + ready(b"I"))


def test_admitted_session_goes_on():
    asked = []
    relay = Relay(Decider(), admit=lambda: asked.append(1))
    relay.start(STARTUP)
    sent(relay.to_server)
    relay.server_data(startup_answer())
    assert asked == [1] and relay.authenticated and not relay.close_after_flush
    assert sent(relay.to_client) == startup_answer()


def test_refused_session_ends_right_after_authentication_ok():
    keys = []
    relay = Relay(Decider(), admit=lambda: limits.too_many_connections_for_role("app", 3),
                  key_mapper=lambda pid, secret: keys.append(pid) or secret)
    relay.start(STARTUP)
    sent(relay.to_server)
    relay.server_data(startup_answer())
    out = split_messages(sent(relay.to_client))
    assert out[0] == auth_ok() and len(out) == 2  # nothing of the session after AuthenticationOk
    f = error_fields(out[1])
    assert (f["S"], f["C"], f["M"]) == ("FATAL", "53300", 'too many connections for role "app"')
    assert sent(relay.to_server) == codec.terminate()
    assert relay.phase is Phase.FAILED and relay.close_after_flush
    assert keys == [] and not relay.authenticated  # no cancel key handed out


def test_startup_objects_are_out_of_the_collectors_sight():
    """``serve`` freezes what startup allocated (``settle_heap``): a full collection then walks only what
    sessions allocated since, not the modules, sqlglot's tables and the policy (20+ ms of a stopped event
    loop). Run in a child process: freezing the test process's own objects would outlive this test."""
    import subprocess
    import sys

    code = ("import gc, proxy.listener, proxy.enforcement.purpose\n"
            "from proxy.cli import settle_heap\n"
            "before = len(gc.get_objects())\n"
            "frozen = settle_heap()\n"
            "print(before, frozen, len(gc.get_objects()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, frozen, after = map(int, out.stdout.split())
    assert before > 10_000 and frozen > before // 2
    assert after < 100
