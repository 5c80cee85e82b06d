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


def _watched(tmp_path: Path, monkeypatch) -> tuple[Path, PolicyRuntime, str]:
    """A copy of the shipped policies, a runtime on it (short settle time) and the version in force."""
    directory = _policies(tmp_path)
    rt = _runtime(directory)
    monkeypatch.setattr(runtime_module, "SETTLE_SECONDS", 0.02)
    return directory, rt, rt.policy.version


async def _watch_until(rt: PolicyRuntime, done, timeout: float = 10.0) -> None:
    """Run the watcher until ``done()`` holds (bounded)."""
    watcher = asyncio.create_task(rt.watch(0.01), name="policy-watch-test")
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            assert asyncio.get_running_loop().time() < deadline, "the watcher never got there"
            await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def test_the_watcher_leaves_a_half_written_catalog_to_a_deliberate_reload(tmp_path, monkeypatch):
    """Hunt 20: catalog.yaml written up to ``schemas:``, then a pause: valid YAML that catalogues nothing, put in
    force by the watcher, and e-mail addresses and card numbers came back to a session without a purpose."""
    directory, rt, before = _watched(tmp_path, monkeypatch)
    catalog = directory / "catalog.yaml"
    full = catalog.read_text()
    catalog.write_text(full[:full.index("\nschemas:") + 1])
    assert Policy.load(directory).catalog.tables == {}  # the half is a valid policy: that is the danger
    asyncio.run(_watch_until(rt, lambda: rt.reloads_failed == 1))
    assert rt.policy.version == before
    # The rest of the file arrives: the watcher puts the whole in force (here: the same policy).
    catalog.write_text(full)
    asyncio.run(_watch_until(rt, lambda: rt.reloads_ok == 1))
    assert rt.policy.version == before
    # A deliberate reload (SIGHUP) of a change that protects less puts it in force.
    catalog.write_text(full[:full.index("\nschemas:") + 1])
    assert asyncio.run(rt.reload_policy_async("SIGHUP")) is True
    assert rt.policy.catalog.tables == {}


def test_the_watcher_holds_a_policy_csv_without_its_last_restriction_but_puts_a_new_one_in_force(tmp_path,
                                                                                                 monkeypatch):
    directory, rt, before = _watched(tmp_path, monkeypatch)
    rules = directory / "policy.csv"
    full = rules.read_text()
    last = full.rstrip("\n").rsplit("\n", 1)[1]
    assert ", mask, " in last or ", deny" in last, last  # the shipped file ends with a restriction
    rules.write_text(full.rstrip("\n").rsplit("\n", 1)[0] + "\n")
    asyncio.run(_watch_until(rt, lambda: rt.reloads_failed == 1))
    assert rt.policy.version == before
    rules.write_text(full + "p, analyst, research, payment.invoice, read, deny\n")  # tighter: applies at once
    asyncio.run(_watch_until(rt, lambda: rt.policy.version != before))
    assert any(r.effect == "deny" and r.sub == "analyst" and r.category == "payment.invoice"
               for r in rt.policy.ruleset.rules)


def test_dropped_protections_names_what_a_change_would_stop_protecting(tmp_path):
    from proxy.policy.narrowing import dropped_protections

    directory = _policies(tmp_path)
    old = Policy.load(directory)
    catalog = directory / "catalog.yaml"
    text = catalog.read_text()
    at = text.index("  browsing.page_views:")
    end = text.index("subject: member_id", at)
    catalog.write_text(text[:end] + text[end + len("subject: member_id"):])
    purposes = directory / "purposes.yaml"
    text = purposes.read_text().replace("\n  marketing:\n", "\n  marketing:\n    withdrawable: false\n", 1)
    # (hunt 22: a default cut short can name the purpose above it: "app_exchange: nonpayer" for a longer name)
    purposes.write_text(text.replace("  analyst: statistics\n", "  analyst: research\n", 1))
    (directory / "model.conf").write_text((directory / "model.conf").read_text() + "\n# edited\n")
    dropped = dropped_protections(old, Policy.load(directory), limit=100)
    assert "browsing.page_views: subject member_id dropped" in dropped, dropped
    assert "purpose marketing: withdrawable dropped" in dropped, dropped  # its consent filter would go
    assert "default purpose of analyst changed to research" in dropped and "model.conf changed" in dropped


def test_a_database_that_could_not_be_loaded_is_not_tried_again_at_once(tmp_path):
    """Hunt 23: clients that had not authenticated made the proxy log in to load a schema once per made-up
    database name. A failed first load is remembered for a few seconds."""
    calls = []

    async def failing_loader(dsn, name, timeout):
        calls.append(name)
        raise OSError(f"database {name} does not exist")

    rt = PolicyRuntime(Config(policies=str(_policies(tmp_path)), schema_dsn="unused", policy_watch_interval=0,
                              schema_refresh_interval=0), loader=failing_loader)

    async def scenario():
        for _ in range(3):
            try:
                await rt.database_state("nope")
            except OSError as exc:
                assert "does not exist" in str(exc)
            else:
                raise AssertionError("loaded")

    asyncio.run(scenario())
    assert calls == ["nope"]
