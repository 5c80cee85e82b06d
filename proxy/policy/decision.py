"""The closed set of decisions the policy layer returns for one statement.

A decision is a value. The policy layer returns one of ``Allow``, ``Mask`` or
``Block``; exactly one place (``proxy.enforcement.apply``) turns it into wire
messages, for Simple Query and extended-protocol Parse alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True, slots=True)
class Allow:
    """Send the statement upstream unchanged."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Mask:
    """Send ``sql`` (a rewrite of the statement) upstream instead of the original."""

    sql: str
    methods: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Block:
    """Answer the statement with an ErrorResponse; nothing of it reaches PostgreSQL.

    ``sqlstate`` defaults to 42501 (insufficient_privilege). ``severity`` is ERROR
    for a refused statement; FATAL closes the session after the error.
    """

    message: str
    sqlstate: str = "42501"
    detail: str | None = None
    hint: str | None = None
    severity: str = "ERROR"
    reason: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


Decision = Union[Allow, Mask, Block]

ALLOW = Allow()
