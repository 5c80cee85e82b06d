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


# What one decided message becomes: bytes for upstream, and maybe a refusal. A plain
# tuple: it is made for every statement, and a tuple costs a fifth of a dataclass.
Wire = tuple[bytes, Refusal | None]


def refusal_error(block: Block) -> bytes:
    return codec.error_response(
        block.sqlstate, block.message, severity=block.severity, detail=block.detail, hint=block.hint
    )


def apply(decision: Decision, frame: codec.Frame, parse: codec.ParseMessage | None = None) -> Wire:
    """Return what to send upstream for a Query, FunctionCall, Parse or Bind ``frame``.

    ``parse`` is the decoded Parse when ``frame`` is one. A Bind is only ever
    refused (a statement decided again after the purpose or policy changed).

    >>> q = codec.Frame(ord("Q"), codec.query("SELECT 1"))
    >>> apply(Allow(), q) == (q.raw, None)
    True
    >>> upstream, refusal = apply(Block("no"), q)
    >>> upstream.startswith(b"Q") and refusal.marker in upstream
    True
    """
    if type(decision) is Allow:
        return frame.raw, None
    if type(decision) is Mask:
        if parse is None:
            return codec.query(decision.sql), None
        return codec.encode_parse(parse.name, decision.sql, parse.param_types), None
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
        return upstream, Refusal(marker.encode(), refusal_error(decision), decision)
    raise TypeError(f"not a decision: {decision!r}")


# Errors whose DETAIL can hold values of the row that failed or of an existing row:
# integrity constraint violations (class 23: "Failing row contains (...)", "Key (...)=(...)
# already exists / conflicts with existing key") and WITH CHECK OPTION violations. The
# statement may have been allowed to write some columns and still not to read the
# others; PostgreSQL itself leaves out columns the role may not SELECT, so does the proxy.
_ROW_VALUE_STATES = (b"C23", b"C44000\x00")
WITHHELD_DETAIL = "purpose-proxy withheld the detail of this error: it can contain values of the row."


def withhold_row_values(raw: bytes) -> bytes:
    """An ErrorResponse ``raw`` without the DETAIL field if its SQLSTATE can echo row values.

    >>> err = codec.error_response("23502", "null value", detail="Failing row contains (1, x).")
    >>> b"Failing row" in withhold_row_values(err), b"withheld" in withhold_row_values(err)
    (False, True)
    >>> withhold_row_values(codec.error_response("42601", "syntax error", detail="d")) == \\
    ...     codec.error_response("42601", "syntax error", detail="d")
    True
    """
    if b"\x00D" not in raw or not any(b"\x00" + s in raw or raw[5:].startswith(s) for s in _ROW_VALUE_STATES):
        return raw
    fields = []
    sqlstate = b""
    for part in raw[5:].split(b"\x00"):
        if not part:
            continue
        if part[:1] == b"C":
            sqlstate = part[1:]
        fields.append(part)
    if not (sqlstate.startswith(b"23") or sqlstate == b"44000"):
        return raw
    body = b"".join((b"D" + WITHHELD_DETAIL.encode() if f[:1] == b"D" else f) + b"\x00" for f in fields) + b"\x00"
    return codec.message(raw[:1], body)
