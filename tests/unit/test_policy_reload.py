"""Policy reloads read the files as they stood at one moment: never a mix of old and new files."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from proxy.config import Config
from proxy.enforcement import runtime as runtime_module
from proxy.enforcement.runtime import PolicyRuntime
from proxy.policy.engine import Policy

REPO = Path(__file__).resolve().parents[2]


def _runtime(directory: Path) -> PolicyRuntime:
    return PolicyRuntime(Config(policies=str(directory), schema_dsn="unused", policy_watch_interval=0,
                                schema_refresh_interval=0))


def _policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target)
    return target


def _change(directory: Path) -> None:
    """An edit of policy.csv: one more comment line (a new content hash, the same rules)."""
    with open(directory / "policy.csv", "a") as f:
        f.write("# edited\n")


def test_a_file_changed_while_the_policy_is_read_is_read_again(tmp_path, monkeypatch):
    directory = _policies(tmp_path)
    rt = _runtime(directory)
    real_load = Policy.load
    calls = []

    def load_while_a_deploy_writes(path):
        calls.append(path)
        policy = real_load(path)
        if len(calls) == 1:
            _change(directory)  # the next file of the deploy lands while this read is under way
        return policy

    monkeypatch.setattr(runtime_module.Policy, "load", staticmethod(load_while_a_deploy_writes))
    monkeypatch.setattr(runtime_module, "SETTLE_SECONDS", 0.01)
    assert rt.reload_policy("test") is True
    assert len(calls) == 2  # the first read saw the files change under it and was thrown away
    assert rt.policy.version == real_load(directory).version  # what stands on disk now


def test_files_that_never_stand_still_are_not_put_in_force(tmp_path, monkeypatch):
    directory = _policies(tmp_path)
    rt = _runtime(directory)
    before = rt.policy.version
    real_load = Policy.load

    def load_during_endless_writes(path):
        policy = real_load(path)
        _change(directory)
        return policy

    monkeypatch.setattr(runtime_module.Policy, "load", staticmethod(load_during_endless_writes))
    monkeypatch.setattr(runtime_module, "SETTLE_SECONDS", 0.01)
    assert rt.reload_policy("test") is False
    assert rt.policy.version == before and rt.reloads_failed == 1


def test_the_watcher_waits_until_the_files_stand_still(tmp_path, monkeypatch):
    directory = _policies(tmp_path)
    rt = _runtime(directory)
    monkeypatch.setattr(runtime_module, "SETTLE_SECONDS", 0.2)
    loads = []
    real_load = Policy.load
    monkeypatch.setattr(runtime_module.Policy, "load", staticmethod(lambda p: loads.append(p) or real_load(p)))

    async def scenario():
        watcher = asyncio.create_task(rt.watch(0.01), name="policy-watch-test")
        try:
            # A deploy writing a file every 10 ms, far within the settle time. (Both run on this
            # loop: a stalled loop delays the watcher's wake-up behind the writer's, never before.)
            for _ in range(10):
                _change(directory)
                await asyncio.sleep(0.01)
            expected = real_load(directory).version
            deadline = asyncio.get_running_loop().time() + 5
            while rt.policy.version != expected:
                assert asyncio.get_running_loop().time() < deadline, "the change was never put in force"
                await asyncio.sleep(0.01)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    asyncio.run(scenario())
    assert len(loads) == 1  # the watcher read the files once, after the writes stopped
