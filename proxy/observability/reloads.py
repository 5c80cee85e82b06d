"""Policy reloads as events: a ``PolicyRuntime`` that tells observers about every reload attempt and its outcome.

``PolicyRuntime.install_policy`` (after SIGHUP, file changes) counts successes and
failures; this subclass also calls each of ``reload_observers`` with
``(ok, why, version_before, version_after)``, so the recorder can audit reloads
without the runtime knowing about telemetry.
"""

from __future__ import annotations

import logging
from typing import Callable

from proxy.enforcement.runtime import PolicyRuntime

log = logging.getLogger(__name__)

ReloadObserver = Callable[[bool, str, str, str], None]


class ObservedPolicyRuntime(PolicyRuntime):
    """A ``PolicyRuntime`` whose reload attempts are reported to ``reload_observers``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reload_observers: list[ReloadObserver] = []

    def install_policy(self, loaded, why: str) -> bool:
        before, failed = self.policy.version, self.reloads_failed
        swapped = super().install_policy(loaded, why)
        ok = self.reloads_failed == failed
        for observer in self.reload_observers:
            try:
                observer(ok, why, before, self.policy.version)
            except Exception:  # telemetry never breaks a reload
                log.exception("reload observer failed")
        return swapped
