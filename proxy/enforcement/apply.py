"""Turning a decision into wire messages happens here, and only here.

Simple Query and extended-protocol Parse take the same path. A refused statement
never reaches PostgreSQL; instead the proxy sends a stand-in that PostgreSQL
rejects with a syntax error, and the relay swaps that error for the refusal. This
keeps every consequence of the error exactly PostgreSQL's own (55.2.2/55.2.3):
an implicit transaction is rolled back, an explicit transaction block enters the
failed state 'E', an extended batch discards messages until Sync, and the right
ReadyForQuery follows.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from proxy.policy.decision import Allow, Block, Decision, Mask
from proxy.wire import codec

MARKER_PREFIX = "purpose_proxy_refused_"


@dataclass(slots=True)
class Refusal:
    """A refusal waiting for PostgreSQL's error on the stand-in statement."""

    marker: bytes
    error: bytes  # the ErrorResponse the client gets instead
    block: Block


@dataclass(slots=True)
class Wire:
    """What one decided message becomes: bytes for upstream, and maybe a refusal."""

    upstream: bytes
    refusal: Refusal | None = None


def refusal_error(block: Block) -> bytes:
    return codec.error_response(
        block.sqlstate, block.message, severity=block.severity, detail=block.detail, hint=block.hint
    )


def apply(decision: Decision, frame: codec.Frame, parse: codec.ParseMessage | None = None) -> Wire:
    """Return what to send upstream for a Query, FunctionCall, Parse or Bind ``frame``.

    ``parse`` is the decoded Parse when ``frame`` is one. A Bind is only ever
    refused (a statement decided again after the purpose or policy changed).

    >>> q = codec.Frame(ord("Q"), codec.query("SELECT 1"))
    >>> apply(Allow(), q).upstream == q.raw
    True
    >>> w = apply(Block("no"), q)
    >>> w.upstream.startswith(b"Q") and w.refusal.marker in w.upstream
    True
    """
    if type(decision) is Allow:
        return Wire(frame.raw)
    if type(decision) is Mask:
        if parse is None:
            return Wire(codec.query(decision.sql))
        return Wire(codec.encode_parse(parse.name, decision.sql, parse.param_types))
    if type(decision) is Block:
        marker = MARKER_PREFIX + secrets.token_hex(12)
        if parse is not None:
            # Same statement name: PostgreSQL drops the unnamed statement before
            # parsing, and refuses a duplicate name only after parsing succeeded.
            upstream = codec.encode_parse(parse.name, marker, ())
        elif frame.type == codec.F_BIND:
            # Binding a statement that does not exist fails with 26000 naming it,
            # and touches neither the client's statements nor its portals.
            upstream = codec.encode_bind("", marker)
        else:  # Query or FunctionCall: both end in one ReadyForQuery
            upstream = codec.query(marker)
        return Wire(upstream, Refusal(marker.encode(), refusal_error(decision), decision))
    raise TypeError(f"not a decision: {decision!r}")
