"""The inspection hook: where each session gets the function that decides its statements.

A decider factory takes the session's ``SessionInfo`` once, after the startup
packet, and returns ``decide(sql, via) -> Decision`` which the relay calls for
every Query and Parse (``via`` is ``"query"`` or ``"parse"``). It must not block:
it runs on the event loop, in the sans-IO core.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from proxy.policy.decision import ALLOW, Block, Decision

Decide = Callable[[str, str], Decision]


@dataclass(slots=True)
class SessionInfo:
    """What the proxy knows of a client session, for decisions and telemetry."""

    session_id: str
    client_addr: str
    params: dict[str, str] = field(default_factory=dict)  # StartupMessage parameters
    tls: bool = False

    @property
    def role(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        return self.params.get("database", "") or self.role

    @property
    def application_name(self) -> str:
        return self.params.get("application_name", "")

    @property
    def options(self) -> str:
        return self.params.get("options", "")


class StartupRefused(Exception):
    """Raised by a decider factory to refuse the session with a FATAL error."""

    def __init__(self, block: Block) -> None:
        super().__init__(block.message)
        self.block = block


DeciderFactory = Callable[[SessionInfo], Decide]


def allow_all(session: SessionInfo) -> Decide:
    """The relay-only decider: every statement is allowed."""

    def decide(sql: str, via: str) -> Decision:
        return ALLOW

    return decide


def refuse_all(block: Block) -> Decide:
    """The decider of a session refused at startup, until its refusal is told (after authentication):
    every statement gets the refusal.

    >>> refuse_all(Block("no", sqlstate="42501"))("SELECT 1", "query").message
    'no'
    """

    def decide(sql: str, via: str) -> Decision:
        return block

    return decide


def load_factory(spec: str) -> DeciderFactory:
    """Import ``module:attribute`` and return it as a decider factory."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"decider must be 'module:callable', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    if not callable(factory):
        raise ValueError(f"decider {spec!r} is not callable")
    return factory
