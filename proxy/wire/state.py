"""The protocol phases of one proxied session, as an explicit enum.

Reference: PostgreSQL documentation 55.2 "Message Flow". The phase says what the
proxy expects next; ``DISCARDING`` is the failure state of an extended-protocol
batch: after an error, client messages are dropped until Sync, as the backend does
("the backend ... reads and discards messages until a Sync is reached", 55.2.3).
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    STARTUP = "startup"  # before the StartupMessage went upstream
    AUTH = "auth"  # authentication exchange relayed, until the first ReadyForQuery
    IDLE = "idle"  # ReadyForQuery seen, nothing outstanding
    SIMPLE_QUERY = "simple_query"  # a Query message is being answered
    EXTENDED = "extended"  # an extended-protocol batch is in progress
    COPY_IN = "copy_in"  # the backend sent CopyInResponse; the client streams CopyData
    COPY_OUT = "copy_out"  # the backend sent CopyOutResponse and streams CopyData
    COPY_BOTH = "copy_both"  # replication-style CopyBothResponse
    DISCARDING = "discarding"  # a refused extended message: drop client input until Sync
    FAILED = "failed"  # protocol violation: the session is being closed
    CLOSED = "closed"


class TxStatus(bytes, enum.Enum):
    """Transaction status indicator of ReadyForQuery (55.7, "ReadyForQuery")."""

    IDLE = b"I"
    IN_TRANSACTION = b"T"
    FAILED = b"E"
