"""The proxy's own limits on statements and sessions, as refusal decisions (values the relay applies).

A statement over ``max_statement_length`` is refused like any other: the relay
hands the ``Block`` to ``enforcement.apply``, so the client gets an ordinary
ERROR at that point of its session, with every consequence PostgreSQL gives an
error there, and the text is never analysed. A session over
``max_connections_per_role`` is refused right after PostgreSQL's
AuthenticationOk, where PostgreSQL checks a role's own connection limit.
"""

from __future__ import annotations

from proxy.policy.decision import Block


def statement_too_long(sql: str, limit: int) -> Block | None:
    """A refusal (54000 program_limit_exceeded) if ``sql`` is over ``limit`` bytes of UTF-8, else None.

    >>> statement_too_long("SELECT 1", 8) is None
    True
    >>> b = statement_too_long("SELECT 'é'", 10)
    >>> b.sqlstate, b.severity, b.message
    ('54000', 'ERROR', 'statement is 11 bytes long, over the limit of 10 bytes')
    """
    if len(sql) <= limit // 4:  # even four bytes per character would fit
        return None
    size = len(sql.encode("utf-8", "surrogateescape"))
    if size <= limit:
        return None
    return Block(
        f"statement is {size} bytes long, over the limit of {limit} bytes",
        sqlstate="54000",
        detail="purpose-proxy does not analyse statements longer than max_statement_length; "
               "the statement was not run.",
        hint="Send large values as parameters of a prepared statement, or split the statement.",
        reason="statement-too-long",
    )


def too_many_parses(limit: int) -> Block:
    """The refusal (54000) of a Parse sent while ``limit`` others wait for their answers (no Sync between):
    the relay tracks each until PostgreSQL answers it, and that record must stay bounded.

    >>> too_many_parses(4096).message
    'more than 4096 Parse messages sent without a Sync'
    """
    return Block(
        f"more than {limit} Parse messages sent without a Sync",
        sqlstate="54000",
        detail="purpose-proxy keeps track of each Parse until PostgreSQL answers it; the statement was not "
               "prepared.",
        hint="Send a Sync at least every few thousand Parse messages.",
        reason="too-many-parses",
    )


def too_many_connections_for_role(role: str, limit: int) -> Block:
    """The FATAL refusal of a session over the per-role limit, in PostgreSQL's words (53300).

    >>> b = too_many_connections_for_role("app", 2)
    >>> b.sqlstate, b.severity, b.message
    ('53300', 'FATAL', 'too many connections for role "app"')
    """
    return Block(
        f'too many connections for role "{role}"',
        sqlstate="53300",
        detail=f"purpose-proxy allows {limit} connection{'s' if limit != 1 else ''} per role "
               "(max_connections_per_role).",
        severity="FATAL",
        reason="too-many-connections-for-role",
    )
