"""Test-only decider factories, loaded by the proxy subprocess with ``--decider``.

``refuse_marker`` refuses every statement whose text contains ``refuse_me`` and
allows everything else, so tests can provoke a refusal at any point of a session
with ordinary SQL (``SELECT 1 AS refuse_me``).
"""

from __future__ import annotations

from proxy.enforcement.hook import Decide, SessionInfo
from proxy.policy.decision import ALLOW, Block, Decision

MARKER = "refuse_me"
MESSAGE = "statement refused by the test decider"
SQLSTATE = "42501"
DETAIL = "The statement text contains the marker refuse_me."
HINT = "Leave out refuse_me."


def refuse_marker(session: SessionInfo) -> Decide:
    """Block statements containing ``refuse_me`` (42501, with detail and hint); allow the rest."""

    def decide(sql: str, via: str) -> Decision:
        if MARKER in sql:
            return Block(MESSAGE, sqlstate=SQLSTATE, detail=DETAIL, hint=HINT, reason="test-marker")
        return ALLOW

    return decide
