"""The workers setting, per-worker settings, cancel keys that name their worker, and cancel forwarding between
workers (in one process: two ``CancelPeers`` on their unix sockets). The processes themselves are tested in
tests/integration/test_workers.py."""

from __future__ import annotations

import asyncio
import collections

import pytest

from proxy import cli
from proxy.config import Config, ConfigError, load
from proxy.wire import codec
from proxy.workers import CancelPeers, worker_audit_path, worker_config, worker_metrics_listen

RELAY_ONLY = {"decider": "proxy.enforcement.hook:allow_all"}


def test_default_is_one_process():
    assert Config(**RELAY_ONLY).validate().workers == 1


def test_one_name_in_toml_environment_and_flags(tmp_path):
    toml = tmp_path / "proxy.toml"
    toml.write_text(f'decider = "{RELAY_ONLY["decider"]}"\nworkers = 4\n')
    assert load(toml, env={}).workers == 4
    assert load(None, env={"PURPOSE_PROXY_WORKERS": "3", "PURPOSE_PROXY_DECIDER": RELAY_ONLY["decider"]}).workers == 3
    args = cli.build_parser().parse_args(["serve", "--decider", RELAY_ONLY["decider"], "--workers", "2"])
    assert cli.config_from_args(args).workers == 2


@pytest.mark.parametrize("settings, message", [
    ({"workers": 0}, "workers must be between 1 and 256"),
    ({"workers": 257}, "workers must be between 1 and 256"),
    ({"workers": 2, "listen": ["127.0.0.1:0"]}, "workers > 1 needs fixed listen ports"),
    ({"workers": 4, "metrics_listen": "127.0.0.1:65533"}, "past 65535 with 4 workers"),
    ({"workers": 2, "audit_sink": "stdout"}, "audit_sink = stdout cannot be used with workers > 1"),
])
def test_invalid_worker_settings(settings, message):
    with pytest.raises(ConfigError) as ei:
        Config(**RELAY_ONLY, **settings).validate()
    assert message in str(ei.value)


def test_stdout_audit_and_port_zero_stay_valid_with_one_process():
    Config(**RELAY_ONLY, audit_sink="stdout", listen=["127.0.0.1:0"], metrics_listen="127.0.0.1:65535").validate()


def test_per_worker_metrics_address_and_audit_file():
    c = Config(**RELAY_ONLY, workers=3, metrics_listen="[::1]:9187", audit_path="/var/log/pp/audit.jsonl")
    assert [worker_metrics_listen(c, i) for i in range(3)] == ["[::1]:9188", "[::1]:9189", "[::1]:9190"]
    assert worker_audit_path(c, 2) == "/var/log/pp/audit.worker2.jsonl"
    w = worker_config(c, 1)
    assert (w.metrics_listen, w.audit_path, w.workers) == ("[::1]:9189", "/var/log/pp/audit.worker1.jsonl", 3)
    assert worker_metrics_listen(Config(**RELAY_ONLY, metrics_listen="off"), 0) == "off"
    assert worker_metrics_listen(Config(**RELAY_ONLY, metrics_listen="127.0.0.1:0"), 1) == "127.0.0.1:0"


@pytest.mark.parametrize("count", [1, 2, 3, 7, 256])
def test_cancel_keys_name_their_worker(count):
    for index in {0, count // 2, count - 1}:
        peers = CancelPeers(index, count, "/nonexistent", 1.0)
        keys = [peers.new_secret(4) for _ in range(200)]
        assert all(len(k) == 4 and peers.owner(k) == index for k in keys)
        assert len(set(keys)) > 190  # random otherwise
    assert len(CancelPeers(1, 2, "/nonexistent", 1.0).new_secret(32)) == 32  # longer secrets (protocol 3.2)


def test_cancel_key_bits_stay_random():
    """Only the worker index is fixed: every byte still takes many values (4 bytes, 2 workers: 31 random bits)."""
    peers = CancelPeers(1, 2, "/nonexistent", 1.0)
    keys = [peers.new_secret(4) for _ in range(2000)]
    for i in range(4):
        assert len(collections.Counter(k[i] for k in keys)) > 100


class _FakeServer:
    """What CancelPeers needs of a ProxyServer: forward_cancel, recording what reached it."""

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes, bool]] = []

    async def forward_cancel(self, pid: int, secret: bytes, *, from_peer: bool = False) -> None:
        self.received.append((pid, secret, from_peer))


def test_a_cancel_request_is_passed_to_the_worker_its_key_names(tmp_path):
    async def scenario():
        peers = [CancelPeers(i, 2, str(tmp_path), 2.0) for i in range(2)]
        servers = [_FakeServer(), _FakeServer()]
        for p, s in zip(peers, servers):
            await p.start(s)
        try:
            own = peers[0].new_secret(4)
            other = peers[1].new_secret(4)
            assert await peers[0].forward(1234, own) is False  # its own key: handled where it landed
            assert await peers[0].forward(1234, other) is True
            assert servers[1].received == [(1234, other, True)]  # never passed on again
            assert servers[0].received == []
            # A sibling that is not there: the forward gives up (bounded), the request is dropped.
            await peers[1].close()
            assert await peers[0].forward(99, other) is True
            # Garbage on the peer socket is ignored.
            reader, writer = await asyncio.open_unix_connection(peers[0].path(0))
            writer.write(b"\x00\x00\x00\x10" + b"\x00" * 12)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            reader, writer = await asyncio.open_unix_connection(peers[0].path(0))
            writer.write(codec.cancel_request(7, own))
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert servers[0].received == [(7, own, True)]
        finally:
            for p in peers:
                await p.close()

    asyncio.run(scenario())
