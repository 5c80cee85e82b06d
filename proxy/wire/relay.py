"""Protocol state and message routing of one proxied session happen here, without I/O.

The asyncio shell (``proxy.session``) feeds bytes in with ``client_data`` and
``server_data`` and writes out what accumulates in ``to_server`` and
``to_client``. Nothing here awaits or touches a socket.

Client messages are looked at by header; the relay frames only those it acts
on (Query, Parse, FunctionCall, Sync, Flush, Close, Terminate; Bind too once a
decision may have gone stale) and every Query, Parse and FunctionCall goes
through ``decide`` and then ``enforcement.apply``. Backend
messages are looked at by header only, except the few the proxy tracks:
Authentication (to hide SCRAM channel binding), BackendKeyData (to hand the client
a proxy-owned cancel key), ParameterStatus, ErrorResponse (to swap in refusals),
the Copy*Responses and ReadyForQuery (phase and transaction status), and
CommandComplete (row counts for telemetry).

Two of the proxy's own limits are applied here, as decisions: a Query or Parse
whose SQL text is over ``max_statement_length`` bytes is refused through
``enforcement.apply`` without being analysed, and ``admit`` (the per-role
connection limit) is asked at AuthenticationOk whether the session may go on.

Each decided message becomes a ``StatementEvent``, handed out in ``events`` when
its answer is complete: events decided since the previous sync point (Query,
Sync, FunctionCall) form a batch, batches queue in order (pipelining), and the
ReadyForQuery that answers a sync point completes the oldest batch. Row counts
(CommandComplete) and the first error go to the oldest batch's events in order.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

from proxy.enforcement.apply import MARKER_PREFIX, Refusal, apply, refusal_error, withhold_row_values
from proxy.enforcement.limits import statement_too_long, too_many_parses
from proxy.policy.decision import Allow, Block, Decision
from proxy.wire import codec
from proxy.wire.state import Phase

log = logging.getLogger(__name__)

# Members of an enum are looked up through its metaclass on every access (about
# 80 ns on CPython 3.11, eight times a module global); the hot path uses these names.
_AUTH, _CLOSED, _COPY_BOTH, _COPY_IN, _COPY_OUT, _DISCARDING = (
    Phase.AUTH, Phase.CLOSED, Phase.COPY_BOTH, Phase.COPY_IN, Phase.COPY_OUT, Phase.DISCARDING)
_EXTENDED, _FAILED, _IDLE, _SIMPLE_QUERY, _STARTUP = (
    Phase.EXTENDED, Phase.FAILED, Phase.IDLE, Phase.SIMPLE_QUERY, Phase.STARTUP)
# Where an opaque client message is an extended-protocol one (not a password, not CopyData).
_PROTOCOL_PHASES = frozenset({_IDLE, _EXTENDED, _SIMPLE_QUERY, _COPY_OUT})

Decide = Callable[[str, str], Decision]  # (sql, via) -> decision; via: "query", "parse", "function_call"
KeyMapper = Callable[[int, bytes], bytes]  # (backend pid, backend secret) -> client secret
Admit = Callable[[], Block | None]  # at AuthenticationOk: None lets the session go on, a FATAL Block ends it

# Client messages the relay frames; the rest (Bind, Execute, Describe, CopyData...)
# stream through opaque. Sync and Flush are framed so that, while discarding, every
# opaque byte can simply be dropped.
CLIENT_INSPECT = frozenset({codec.F_QUERY, codec.F_PARSE, codec.F_FUNCTION_CALL, codec.F_SYNC,
                            codec.F_FLUSH, codec.F_CLOSE, codec.F_TERMINATE, codec.F_COPY_DONE,
                            codec.F_COPY_FAIL})
# Once a decision may have gone stale (the decider's epoch moved: a purpose change
# or a policy reload), Bind is framed too, so that a statement prepared earlier is
# decided again before it runs.
CLIENT_INSPECT_BIND = CLIENT_INSPECT | {codec.F_BIND}
# Observed, Bind and Execute are framed from the start (a Bind still passes as it is until
# the epoch moves): every Execute is one run of a prepared statement, and each run is an
# event of its own, with the decision its statement got at Parse and its own row count.
CLIENT_INSPECT_OBSERVED = CLIENT_INSPECT_BIND | {codec.F_EXECUTE}
SERVER_INSPECT = frozenset(
    {
        codec.B_AUTH,
        codec.B_KEY_DATA,
        codec.B_PARAMETER_STATUS,
        codec.B_READY,
        codec.B_ERROR,
        codec.B_COPY_IN,
        codec.B_COPY_OUT,
        codec.B_COPY_BOTH,
        codec.B_COPY_DONE,
        codec.B_COMMAND_COMPLETE,
        codec.B_EMPTY_QUERY,
        codec.B_PORTAL_SUSPENDED,
        codec.B_PARSE_COMPLETE,
    }
)
SERVER_INSPECT_UNOBSERVED = SERVER_INSPECT - {codec.B_COMMAND_COMPLETE, codec.B_EMPTY_QUERY,
                                               codec.B_PORTAL_SUSPENDED}
# What ends one Execute's run (55.2.3: "an Execute ... is terminated by CommandComplete,
# EmptyQueryResponse, PortalSuspended or ErrorResponse"; an error also skips the rest).
_RUN_ENDS = (codec.B_EMPTY_QUERY, codec.B_PORTAL_SUSPENDED)
_COPY_PHASES = {codec.B_COPY_IN: _COPY_IN, codec.B_COPY_OUT: _COPY_OUT,
                codec.B_COPY_BOTH: _COPY_BOTH}
_MARKER = MARKER_PREFIX.encode()
_B_COMMAND_COMPLETE = codec.B_COMMAND_COMPLETE
_B_PARSE_COMPLETE = codec.B_PARSE_COMPLETE
perf_counter = time.perf_counter
_MAX_PENDING_REFUSALS = 64
_MAX_PORTALS = 1024
_MAX_BATCH_HOOKS = 1024
_MAX_PARSES = 4096


class _Batch(list):
    """The statement events of one batch (up to its sync point) and, once an Execute was sent, ``runs``:
    for each Execute in order, the event it is a run of (None: a portal the relay cannot name)."""

    __slots__ = ("runs",)

    def __init__(self, events=()) -> None:
        super().__init__(events)
        self.runs: list | None = None


def _uncounted(batch: list["StatementEvent"]) -> "StatementEvent":
    """The event a CommandComplete belongs to: the first of its batch without one, else the last."""
    for event in batch:
        if event.completions is None:
            return event
    return batch[-1]


@dataclass(slots=True)
class StatementEvent:
    """A decision the relay made and how its answer went: handed to the session for metrics, traces and audit.

    Times are ``time.perf_counter()`` values. ``finished`` is None until the
    ReadyForQuery of the statement's sync point (it stays None for a statement cut
    off by the end of the session, see ``Relay.unfinished``). ``completions`` holds
    the raw CommandComplete messages attributed to it (parsed only when asked for,
    by ``rows``); ``error`` is the first ErrorResponse the client got for it.
    """

    via: str
    sql: str
    decision: Decision
    seconds: float  # time spent deciding
    started: float = 0.0  # when deciding began
    detail: object = None  # the decider's account of the decision (its ``last``), if it keeps one
    stages: tuple | None = None  # ((stage, seconds), ...) of deciding, if the decider reports them (``timings``)
    finished: float | None = None
    completions: bytes | None = None
    error: bytes | None = None

    @property
    def rows(self) -> int | None:
        """Rows the statement returned or affected, summed over its CommandCompletes (None: no count)."""
        return row_count(self.completions) if self.completions else None


def row_count(completions: bytes) -> int | None:
    """The sum of the row counts of concatenated CommandComplete messages ("SELECT 5", "INSERT 0 5"; "SET": none).

    >>> row_count(codec.message(b"C", b"SELECT 5\\x00") + codec.message(b"C", b"INSERT 0 2\\x00"))
    7
    >>> row_count(codec.message(b"C", b"SET\\x00")) is None
    True
    """
    total = None
    pos, n = 0, len(completions)
    while pos + 5 <= n:
        end = pos + 1 + int.from_bytes(completions[pos + 1 : pos + 5], "big")
        tag = completions[pos + 5 : end - 1]
        count = tag[tag.rfind(b" ") + 1 :]
        if count.isdigit() and b" " in tag:
            total = (total or 0) + int(count)
        pos = end
    return total


class Relay:
    """One session's protocol state machine and router (sans-IO)."""

    def __init__(
        self,
        decider: Decide,
        *,
        key_mapper: KeyMapper | None = None,
        max_message_size: int | None = codec.DEFAULT_MAX_MESSAGE_SIZE,
        observed: bool = True,
        max_statement_length: int = 0,
        admit: Admit | None = None,
    ) -> None:
        # A decider is a callable, or an object with ``decide(sql, via)`` and an
        # ``epoch`` that changes whenever earlier decisions may no longer hold.
        self.decide: Decide = getattr(decider, "decide", decider)
        self._decider = decider
        self._epoch = getattr(decider, "epoch", 0)
        self.key_mapper = key_mapper
        self.max_statement_length = max_statement_length  # bytes of SQL text; 0: no limit
        self.admit = admit
        # True only when the client's TLS channel ends in the certificate PostgreSQL
        # itself presents (set by the session after the upstream connect): then
        # SCRAM-SHA-256-PLUS binds end to end and is passed through.
        self.channel_binding = False
        # The client's connection is encrypted and the upstream one is not (and crosses a network): a
        # request for the password in clear is refused rather than relayed (see ``_auth``).
        self.plain_upstream_for_tls_client = False
        self.phase = _STARTUP
        self.tx_status = b"I"
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        # Set by the decider (``hold_client_output``): the session writes nothing to the client until
        # this awaitable is done (the relay itself awaits nothing; bytes keep collecting in to_client).
        self.client_hold = None
        self.events: list[StatementEvent] = []  # completed statements, for the session to observe
        self.server_params: dict[str, str] = {}
        self.backend_key: tuple[int, bytes] | None = None
        self.authenticated = False
        # True while the statement being decided arrived at a quiet point: outside a
        # transaction block, nothing in flight (the decider gates setting changes on it).
        self.quiet = False
        self.server_fatal = False  # the backend sent a FATAL/PANIC error: it is closing
        self.close_after_flush = False
        # Statement events (timings, row counts) are kept only when someone observes
        # them; unobserved, CommandComplete streams through opaque like a DataRow.
        self.observed = observed
        # A decider whose decisions can go stale (it has an epoch) gets Bind framed from the start: a
        # Bind whose first bytes streamed through before the epoch moved would otherwise run on the
        # old decision, with the rest of its bytes sent after (a hunt split one across a reload).
        inspect = CLIENT_INSPECT_OBSERVED if observed else (
            CLIENT_INSPECT_BIND if hasattr(decider, "epoch") else CLIENT_INSPECT)
        self._client = codec.Scanner(inspect, max_message_size)
        self._redecide_binds = False  # the epoch moved once: every Bind is decided again before it runs
        self._server = codec.Scanner(SERVER_INSPECT if observed else SERVER_INSPECT_UNOBSERVED, None)
        self._outstanding = 0  # sync points (Query, Sync, FunctionCall) not yet answered by Z
        # Extended-protocol messages sent since the client's last Sync: the backend runs them
        # (Parse, Bind, Execute with a Flush, or none at all) before the ReadyForQuery of the
        # Sync still to come, so the answer to an earlier sync point does not make the session
        # idle (a hunt ran BEGIN and DECLARE that way while the relay took the session as idle).
        self._unsynced = False
        self._busy_phase = _IDLE  # phase to return to after COPY ends
        # COPY FROM STDIN and the client's Syncs (see the Sync branch of _client_items):
        # whether the client ended the copy (CopyDone/CopyFail) since CopyInResponse, and
        # how many Syncs sent after that stand in for one sent before the copy began.
        self._copy_ended = False
        self._copy_skip = 0
        self._refusals: OrderedDict[bytes, Refusal] = OrderedDict()
        # Prepared statements by name: every (Parse, its decision, the epoch it was
        # decided in) that may be behind the name. A Parse of a name that exists fails
        # in PostgreSQL (42P05), which the relay does not see, so a later Parse of the
        # same name adds a candidate instead of replacing the earlier one.
        # (The decider's account of the decision comes along, for the events of later runs.)
        self._statements: dict[str, list[tuple[codec.ParseMessage, Decision, object, object]]] = {}
        # Observed only: the statement each portal was last bound to (a Bind names both; a
        # portal PostgreSQL has dropped since stays here harmlessly: its Execute fails), and
        # the statements parsed in the current batch whose first run is still to come (that
        # run is their Parse's event; every later run gets an event of its own).
        self._portals: dict[bytes, str] = {}
        # Every Parse sent upstream and not yet answered, in order, as (the sync point that ends
        # its batch, name, its record in _statements or None): ParseComplete confirms the first
        # (55.2.3: answers come in order); one still unconfirmed when its batch's ReadyForQuery
        # comes failed in PostgreSQL (or was skipped after an error), and its record goes. At most
        # _MAX_PARSES: a Parse beyond is refused (once this gave up tracking, and the records of
        # Parses that failed in PostgreSQL then grew without bound, hunt 21).
        self._parses: deque = deque()
        self._answered = 0  # ReadyForQuery messages seen
        self._unexecuted: dict[str, StatementEvent] = {}
        # (sql, decision, account) of a statement prepared with SQL PREPARE, if the decider keeps them.
        self._prepared_run = getattr(decider, "prepared_run", None)
        # Whether a SQL PREPARE (whose text only the decider keeps) may be behind a name.
        self._sql_prepared = getattr(decider, "sql_prepared", None)
        # The decider hears of every ReadyForQuery (and whether an error preceded it),
        # to learn whether a setting change it allowed took effect.
        self._ready_hook = getattr(decider, "ready", None)
        # ... and of every ParameterStatus (the settings the server reports as they change).
        self._params_hook = getattr(decider, "parameter_status", None)
        self._errored = False
        # Callbacks waiting for the ReadyForQuery that ends a batch, as [ReadyForQuery
        # messages to let pass first, callback(errored)] (see ``on_batch_end``).
        self._batch_hooks: list[list] = []
        # Errors of integrity constraints can echo whole rows: withhold their DETAIL.
        self._withhold_rows = bool(getattr(decider, "withhold_error_rows", False))
        # Statement events awaiting their answer: those decided since the last sync
        # point, then one entry per sync point not yet answered by ReadyForQuery
        # (None when no statement was decided in that batch).
        self._batch: _Batch | None = None
        self._inflight: deque[_Batch | None] = deque()
        self._explains = hasattr(decider, "last")  # the decider keeps an account of its latest decision
        self._interrupted = False  # set when the rest of a client read must not be handled as framed
        self._timed = hasattr(decider, "timings")  # ... and the time each stage of it took

    # --- startup -----------------------------------------------------------------

    def start(self, startup_packet: bytes) -> None:
        """Send the client's StartupMessage upstream and begin relaying authentication."""
        self.to_server.append(startup_packet)
        self.phase = _AUTH

    @property
    def client_at_boundary(self) -> bool:
        """True when an ErrorResponse can be injected into the stream to the client."""
        return self._server.at_boundary

    @property
    def idle(self) -> bool:
        """Nothing in flight and no transaction block open: a quiet point of the session."""
        return self.phase is _IDLE and self.tx_status == b"I" and self._outstanding == 0

    @property
    def awaiting_server(self) -> bool:
        """A sync point waits for its ReadyForQuery and the backend is not waiting for COPY data."""
        return self._outstanding > 0 and self.phase is not _COPY_IN and self.phase is not _COPY_BOTH

    def refresh_epoch(self) -> None:
        """Look at the decider's epoch again (the listener calls this after a policy or schema reload)."""
        refresh = getattr(self._decider, "refresh_state", None)
        if refresh is not None:
            refresh()  # the decider takes up the new state first: its epoch is read from it
        epoch = getattr(self._decider, "epoch", 0)
        if epoch != self._epoch:
            self._epoch = epoch
            self._decide_binds_again()

    def _decide_binds_again(self) -> bool:
        """From now on every Bind is decided again; True when Bind was not framed until now."""
        self._redecide_binds = True
        if codec.F_BIND in self._client.inspect:
            return False
        self._client.inspect = CLIENT_INSPECT_BIND
        return True

    # --- client -> server --------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Frame client bytes, decide on statements, queue what goes upstream.

        Raises ``codec.ProtocolViolation`` on malformed input.
        """
        out = self.to_server
        mark = len(out)
        items = self._client.feed(data)
        if self._client_items(items) and len(items) > 1 and self._client.verbatim:
            # Every message of this read goes upstream as the client sent it: send the
            # read itself, one buffer for the socket instead of a gather of its slices.
            out[mark:] = (data,)

    def _client_items(self, items: list) -> bool:
        """Handle framed client items; True when each went upstream unchanged, in order."""
        out = self.to_server
        verbatim = True
        pending = iter(items)
        for item in pending:
            phase = self.phase
            if type(item) is bytes:  # Bind/Execute/Describe/CopyData...: opaque
                if phase is _IDLE:
                    self.phase = _EXTENDED
                elif phase is _DISCARDING:
                    verbatim = False
                    continue
                if phase in _PROTOCOL_PHASES:
                    self._unsynced = True
                out.append(item)
                continue
            t = item.type
            if phase is _DISCARDING:
                verbatim = False
                # 55.2.3: after an error the backend discards messages until Sync. The
                # proxy drops them too (nothing of a refused batch goes upstream) but
                # passes Flush and Sync so the backend's own answers come as they would.
                if t == codec.F_SYNC:
                    self.phase = _EXTENDED
                    self._unsynced = False
                    self._outstanding += 1
                    self._inflight.append(self._batch)
                    self._batch = None
                    if self._unexecuted:
                        self._unexecuted.clear()
                    out.append(item.raw)
                elif t == codec.F_FLUSH:
                    out.append(item.raw)
                elif t == codec.F_TERMINATE:
                    self.phase = _CLOSED
                    out.append(item.raw)
                continue
            if t == codec.F_QUERY:
                self._mark_quiet(phase)
                self._outstanding += 1
                self._unsynced = False  # its ReadyForQuery comes after whatever was sent before it
                self.phase = _SIMPLE_QUERY
                if type(self._decide_and_forward(item, "query", None)) is not Allow:
                    verbatim = False
                self._inflight.append(self._batch)
                self._batch = None
            elif t == codec.F_SYNC:
                # The backend ignores a Sync it reads while in COPY IN (CopyGetData in
                # copyfromparse.c; 55.2.6), but the copy may already have failed on its
                # side (bad data) when it reads one, and then answers it. The relay cannot
                # tell, so it counts every Sync: too many sync points only keep the session
                # from looking quiet (a purpose change is refused), too few would let one
                # through while statements still run. The exception is libpq's own flow: it
                # sends the batch's Sync with the Execute, before the copy begins (ignored),
                # and another after CopyDone; that one stands in for it (_copy_skip, set at
                # CopyInResponse).
                self._unsynced = False
                if phase is _COPY_IN and self._copy_ended and self._copy_skip:
                    self._copy_skip -= 1
                else:
                    self._outstanding += 1
                    self._inflight.append(self._batch)
                    self._batch = None
                    if self._unexecuted:
                        self._unexecuted.clear()
                    if phase is _IDLE:
                        self.phase = _EXTENDED
                out.append(item.raw)
            elif t == codec.F_PARSE:
                self._mark_quiet(phase)
                self.phase = _EXTENDED
                self._unsynced = True
                parse = codec.decode_parse(item.body)
                decision = self._decide_and_forward(item, "parse", parse)
                allowed = decision is not None and type(decision) is not Block
                if type(decision) is not Allow:
                    verbatim = False
                detail = None
                if allowed and self.observed:
                    event = self._batch[-1]
                    detail = event.detail
                    self._unexecuted[parse.name] = event
                record = (parse, decision, self._epoch, detail) if allowed else None
                if not parse.name:  # PostgreSQL drops the unnamed statement before parsing
                    if allowed:
                        self._statements[""] = [record]
                    else:
                        self._statements.pop("", None)
                elif allowed:  # a refused named Parse leaves any earlier statement of that name
                    self._statements.setdefault(parse.name, []).append(record)
                if decision is not None and len(self._parses) < _MAX_PARSES:
                    self._parses.append((self._answered + self._outstanding, parse.name, record))
            elif t == codec.F_BIND:
                self._unsynced = True
                if self.observed:
                    self._bound(item.raw)
                if self._redecide_binds:
                    self._bind(item)
                    verbatim = False
                else:
                    if phase is _IDLE:
                        self.phase = _EXTENDED
                    out.append(item.raw)
            elif t == codec.F_EXECUTE:  # framed only when observed
                self._unsynced = True
                if phase is _IDLE:
                    self.phase = _EXTENDED
                self._run(item.raw)
                out.append(item.raw)
            elif t == codec.F_CLOSE:
                if item.raw[5:6] == b"S":
                    # PostgreSQL closes the statement only if its batch gets that far (after
                    # an error it skips to Sync, 55.2.3): the record goes when the batch ends
                    # without an error. Kept a little too long, a record only makes a later
                    # Bind be decided under more candidates, never fewer.
                    name = codec.cstring_at(item.raw, 6)
                    if entries := self._statements.get(name):
                        closed = tuple(entries)
                        self.on_batch_end(lambda errored, n=name, c=closed: errored or self._drop_statements(n, c),
                                          counted=False)
                elif self._portals and item.raw[5:6] == b"P":
                    self._portals.pop(item.raw[6:item.raw.find(b"\x00", 6)], None)
                self._unsynced = True
                if phase is _IDLE:
                    self.phase = _EXTENDED
                out.append(item.raw)
            elif t == codec.F_FUNCTION_CALL:
                # FunctionCall (55.7) runs a function by OID outside SQL: decided
                # like a statement, refused through the same stand-in as a Query.
                self._mark_quiet(phase)
                self._outstanding += 1
                self._unsynced = False
                self.phase = _SIMPLE_QUERY
                if type(self._decide_and_forward(item, "function_call", None)) is not Allow:
                    verbatim = False
                self._inflight.append(self._batch)
                self._batch = None
            elif t == codec.F_TERMINATE:
                self.phase = _CLOSED
                out.append(item.raw)
            elif t == codec.F_COPY_DONE or t == codec.F_COPY_FAIL:
                if phase is _COPY_IN:
                    self._copy_ended = True
                elif phase is _IDLE:
                    self.phase = _EXTENDED
                out.append(item.raw)
            else:  # Flush
                if phase is _IDLE:
                    self.phase = _EXTENDED
                out.append(item.raw)
            if self._interrupted:
                if self.phase is _FAILED:
                    return False  # a FATAL refusal: the session closes, nothing more of this read goes upstream
                # The epoch moved halfway through this read, whose rest was framed with Bind
                # opaque: frame it again so that a Bind in it is decided again too.
                self._interrupted = False
                self._client_items(self._client.reframe(pending))
                return False
        return verbatim

    def _mark_quiet(self, phase: Phase) -> None:
        self.quiet = phase is _IDLE and self._outstanding == 0 and self.tx_status == b"I"

    def _bound(self, raw: bytes) -> None:
        """Remember which statement a Bind binds its portal to (observed: for the runs of that portal)."""
        end = raw.find(b"\x00", 5)  # Bind: portal name, then statement name
        stmt_end = raw.find(b"\x00", end + 1) if end >= 0 else -1
        if stmt_end < 0:
            return  # malformed: PostgreSQL refuses it (as it did before Bind was framed)
        portals = self._portals
        portals[raw[5:end]] = raw[end + 1:stmt_end].decode("utf-8", "surrogateescape")
        if len(portals) > _MAX_PORTALS:  # named portals the client never closes: forget the oldest
            del portals[next(iter(portals))]

    def _run(self, raw: bytes) -> None:
        """An Execute (observed): the event of this run of its portal's statement, in the batch's runs."""
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
        name = self._portals.get(raw[5:raw.find(b"\x00", 5)])
        event = None
        if name is not None:
            event = self._unexecuted.pop(name, None)  # the statement's first run in its Parse's batch
            if event is None:
                # A later run: the decision stands as made at Parse (a Bind after the epoch
                # moved decided it again). With several candidates behind a name, the first
                # is the one PostgreSQL kept (a second Parse of a name fails there).
                if entries := self._statements.get(name):
                    parse, decision, _, detail = entries[0]
                    run = (parse.sql, decision, detail)
                else:  # maybe a statement of SQL PREPARE (the names are shared): the decider knows those
                    run = self._prepared_run(name) if self._prepared_run is not None else None
                if run is not None:
                    event = StatementEvent("execute", run[0], run[1], 0.0, perf_counter(), run[2])
                    batch.append(event)
        if batch.runs is None:
            batch.runs = [event]
        else:
            batch.runs.append(event)

    def _bind(self, frame: codec.Frame) -> None:
        """Bind after the epoch moved: decide the statement again before it runs."""
        if self.phase is _IDLE:
            self.phase = _EXTENDED
        started = perf_counter()
        portal_end = frame.raw.find(b"\x00", 5)  # Bind: portal name, then statement name
        if portal_end < 0:
            raise codec.ProtocolViolation("malformed Bind message")
        name = codec.cstring_at(frame.raw, portal_end + 1)
        entries = self._statements.get(name)
        if entries is None and not name:  # no unnamed statement: PostgreSQL refuses the Bind
            self.to_server.append(frame.raw)
            return
        now: Decision | None = None
        renewed = []
        if name and self._sql_prepared is not None and self._sql_prepared(name):
            # SQL PREPARE and Parse share PostgreSQL's namespace: a Parse of the name that failed
            # there (42P05) is recorded here, and the statement behind it may be the PREPARE's.
            entries = None
        for parse, before, epoch, detail in entries or ():
            if epoch == self._epoch:
                renewed.append((parse, before, epoch, detail))
                continue
            now = self._decide(parse.sql, "parse")
            if now == before or (type(now) is type(before) and type(now) is not Block
                                 and getattr(now, "sql", None) == getattr(before, "sql", None)):
                renewed.append((parse, before, self._epoch, self._decider.last if self._explains else detail))
                continue
            break
        else:
            if entries:
                self._statements[name] = renewed
                self.to_server.append(frame.raw)
                return
            # A named statement the relay did not see prepared (SQL PREPARE shares the
            # namespace) cannot be decided again: refuse it rather than run it blind.
            now = Block(
                f"prepared statement \"{name}\" was not prepared through the extended protocol of this session, "
                "so it cannot be decided again under the current purpose or policy",
                sqlstate="26000",
                hint="Prepare the statement again with Parse (or run it with EXECUTE).",
                reason="unknown-prepared",
            )
        if type(now) is not Block:
            now = Block(
                "prepared statement was decided under another purpose or policy and must be prepared again",
                sqlstate="0A000",
                detail=f"statement {name or '(unnamed)'!s} was prepared before the session's purpose or the policy changed",
                hint="Prepare the statement again (DEALLOCATE it, or reconnect).",
                reason="stale-prepared-statement",
            )
        if self.observed:  # a run refused at its Bind is a decision like any other: it gets its event
            decided = bool(entries) and self._explains
            event = StatementEvent("bind", parse.sql if entries else "", now, perf_counter() - started, started,
                                   self._decider.last if decided else None)
            if self._batch is None:
                self._batch = _Batch((event,))
            else:
                self._batch.append(event)
        # The statement still exists in PostgreSQL: keep its record, so that every
        # later Bind of it is decided again (and refused while the decision stands).
        upstream, refusal = apply(now, frame)
        self.to_server.append(upstream)
        self._refuse(refusal)
        self.phase = _DISCARDING

    def hold_client_output(self, until) -> None:
        """Keep what is for the client (this answer and the next) until the awaitable ``until`` is done."""
        self.client_hold = until

    def on_batch_end(self, callback: Callable[[bool], object], counted: bool) -> None:
        """Call ``callback(errored)`` at the ReadyForQuery that ends the batch of the message being
        handled (``counted``: that message, a Query, is itself the batch's sync point, already
        counted); ``errored`` says an error came in that batch. Session state that a statement
        changes in PostgreSQL only if it succeeds (a Close, a DEALLOCATE) waits for this.

        Bounded: past _MAX_BATCH_HOOKS waiting (a client sending Close after Close without a
        Sync) the callback is dropped, which leaves the records it would have removed: later
        decisions only see more candidates behind a name, never fewer."""
        if len(self._batch_hooks) < _MAX_BATCH_HOOKS:
            self._batch_hooks.append([self._outstanding - 1 if counted else self._outstanding, callback])

    def batch_end_distance(self, counted: bool) -> int:
        """How many ReadyForQuery messages from now the one that ends the batch of the message being
        handled comes (1: the next one); ``counted`` as for ``on_batch_end``."""
        return self._outstanding if counted else self._outstanding + 1

    def _drop_statements(self, name: str, gone: tuple) -> None:
        """Drop the candidates ``gone`` of statement ``name`` (a Parse since then stays)."""
        entries = self._statements.get(name)
        if entries is None:
            return
        kept = [e for e in entries if not any(e is g for g in gone)]
        if kept:
            self._statements[name] = kept
        else:
            del self._statements[name]

    def _batch_ended(self, errored: bool) -> None:
        due = []
        for hook in self._batch_hooks:
            hook[0] -= 1
            if hook[0] < 0:
                due.append(hook)
        if due:
            self._batch_hooks = [h for h in self._batch_hooks if h[0] >= 0]
            for _, callback in due:
                callback(errored)

    def protocol_statement(self, name: str) -> bool:
        """Whether a statement prepared with Parse may be behind ``name`` (for EXECUTE of a shared name)."""
        return bool(self._statements.get(name))

    def forget_statement(self, name: str | None) -> None:
        """Drop the record of prepared statement ``name`` (None: all), when SQL-level
        PREPARE or DEALLOCATE touched it: a later Bind of it, once decisions may be
        stale, is refused instead of judged by a statement that is no longer behind it."""
        if name is None:
            self._statements.clear()
        else:
            self._statements.pop(name, None)

    def _decide(self, sql: str, via: str) -> Decision:
        try:
            decision = self.decide(sql, via)
        except Exception:  # fail closed: a decider crash refuses the statement
            log.exception("decision failed; refusing the statement")
            decision = Block(
                "purpose-proxy could not decide on this statement (internal error)",
                sqlstate="XX000",
                hint="The proxy log has the details. The statement was not run.",
                reason="decider-error",
            )
        epoch = getattr(self._decider, "epoch", 0)
        if epoch != self._epoch:
            self._epoch = epoch
            if self._decide_binds_again():
                self._interrupted = True  # the rest of the current read needs framing again
        return decision

    def _decide_and_forward(self, frame: codec.Frame, via: str, parse: codec.ParseMessage | None) -> Decision | None:
        if parse is not None:
            sql = parse.sql
        elif via == "query":
            sql = codec.query_text(frame.raw)
        else:
            sql = f"-- FunctionCall of function oid {codec.function_call_oid(frame.body)}"
        # Over max_statement_length: refused without analysis (which costs time in
        # proportion to the text, on the event loop every session shares).
        limit = self.max_statement_length
        too_long = statement_too_long(sql, limit) if limit and len(frame.raw) - 5 > limit else None
        if parse is not None and len(self._parses) >= _MAX_PARSES:
            too_long = too_many_parses(_MAX_PARSES)  # (refused before analysis, like an overlong text)
        if not self.observed:
            decision = too_long or self._decide(sql, via)
            if type(decision) is Block and decision.severity == "FATAL":
                self.fail(decision.sqlstate, decision.message, detail=decision.detail, hint=decision.hint)
                return None
        else:
            started = perf_counter()
            if too_long is not None:
                decision, decided = too_long, started
                # No account of the decider's (it was not asked); telemetry fingerprints the
                # text, so the event keeps a bounded prefix of it.
                event = StatementEvent(via, sql[:limit], decision, 0.0, started)
            else:
                decision = self._decide(sql, via)
                decided = perf_counter()
                event = StatementEvent(via, sql, decision, decided - started, started,
                                       self._decider.last if self._explains else None)
                if self._timed:
                    event.stages = self._decider.timings
            if type(decision) is Block and decision.severity == "FATAL":
                event.finished = decided  # no answer follows: the session ends
                self.events.append(event)
                self.fail(decision.sqlstate, decision.message, detail=decision.detail, hint=decision.hint)
                return None
            if self._batch is None:
                self._batch = _Batch((event,))
            else:
                self._batch.append(event)
        upstream, refusal = apply(decision, frame, parse)
        self.to_server.append(upstream)
        if refusal is not None:
            self._refuse(refusal)
            if parse is not None:
                self.phase = _DISCARDING
        return decision

    def _refuse(self, refusal: Refusal) -> None:
        """Remember a refusal until PostgreSQL's error on its stand-in comes back."""
        self._refusals[refusal.marker] = refusal
        while len(self._refusals) > _MAX_PENDING_REFUSALS:
            self._refusals.popitem(last=False)

    # --- server -> client --------------------------------------------------------

    def server_data(self, data: bytes) -> None:
        out = self.to_client
        mark = len(out)
        inflight = self._inflight
        items = self._server.feed(data)
        verbatim = True  # every message goes to the client as the server sent it
        for item in items:
            if type(item) is bytes:
                out.append(item)
                continue
            t = item.type
            if t == _B_COMMAND_COMPLETE:
                raw = item.raw
                if inflight and (batch := inflight[0]) is not None:
                    if batch.runs:  # an Execute's run ends: its event gets the count
                        event = batch.runs.pop(0)
                        if event is not None:
                            event.completions = raw if event.completions is None else event.completions + raw
                        out.append(raw)
                        continue
                    if not batch:
                        out.append(raw)
                        continue
                    event = batch[0]
                    if event.completions is None:
                        event.completions = raw
                    else:  # a multi-statement Query, or several statements in one batch
                        if len(batch) > 1:
                            event = _uncounted(batch)
                        event.completions = raw if event.completions is None else event.completions + raw
                out.append(raw)
            elif t == _B_PARSE_COMPLETE:
                if self._parses:
                    self._parses.popleft()
                out.append(item.raw)
            elif t in _RUN_ENDS:  # a run without a count: an empty query, or a row limit reached
                if inflight and (batch := inflight[0]) is not None and batch.runs:
                    batch.runs.pop(0)
                out.append(item.raw)
            elif t == codec.B_READY:
                self.tx_status = item.raw[5:6]
                if self._outstanding > 0:
                    self._outstanding -= 1
                self._answered += 1
                if self._parses and self._parses[0][0] < self._answered:
                    self._parses_failed()
                if self._batch_hooks:
                    self._batch_ended(self._errored)
                if self._ready_hook is not None:
                    self._ready_hook(self._errored)
                self._errored = False
                if inflight and (batch := inflight.popleft()) is not None:
                    now = perf_counter()
                    for event in batch:
                        event.finished = now
                    self.events += batch
                if self._outstanding == 0 and self.phase is not _DISCARDING:
                    self.phase = _EXTENDED if self._unsynced else _IDLE
                elif self.phase in (_COPY_IN, _COPY_OUT, _COPY_BOTH, _AUTH):
                    self.phase = self._busy_phase
                if not self.authenticated:
                    self.authenticated = True
                out.append(item.raw)
            elif t == codec.B_ERROR:
                if item.raw[5:12] in (b"SFATAL\x00", b"SPANIC\x00"):
                    self.server_fatal = True
                self._errored = True
                raw = self._swap_refusal(item.raw)
                if self._withhold_rows:
                    raw = withhold_row_values(raw)
                if raw is not item.raw:
                    verbatim = False
                if inflight and (batch := inflight[0]) is not None:
                    # An error aborts the rest of its batch; runs that ended before it keep their success.
                    finished_runs = batch.runs is not None
                    for event in batch:
                        if event.error is None and not (finished_runs and event.completions is not None):
                            event.error = raw
                out.append(raw)
                if self.phase in (_COPY_IN, _COPY_OUT, _COPY_BOTH):
                    self.phase = self._busy_phase
            elif t in _COPY_PHASES:
                # A COPY sent before a refused batch may start while the batch is being
                # dropped: the client's bytes are dropped until its Sync all the same. Only
                # client messages end DISCARDING, so whether a message's bytes are dropped
                # cannot change halfway through it (and forward the tail of a dropped one).
                if self.phase is not _DISCARDING:
                    if self.phase not in _COPY_PHASES.values():
                        self._busy_phase = self.phase
                    self.phase = _COPY_PHASES[t]
                    if t == codec.B_COPY_IN:
                        # In the extended protocol the batch's Sync may already be on its
                        # way (libpq sends it with the Execute): the backend will ignore it.
                        self._copy_ended = False
                        self._copy_skip = 1 if self._busy_phase is _EXTENDED and self._outstanding else 0
                out.append(item.raw)
            elif t == codec.B_COPY_DONE:
                if self.phase is _COPY_OUT:
                    self.phase = self._busy_phase
                out.append(item.raw)
            elif t == codec.B_PARAMETER_STATUS:
                name, value = codec.parameter_status(item.body)
                self.server_params[name] = value
                if self._params_hook is not None:
                    self._params_hook(self.server_params)
                out.append(item.raw)
            elif t == codec.B_AUTH:
                if self.plain_upstream_for_tls_client and codec.auth_code(item.body) == codec.AUTH_CLEARTEXT_PASSWORD:
                    # The client encrypted its connection; relaying this request would send its password
                    # unencrypted over the upstream leg (a server that refused TLS under upstream_tls =
                    # prefer, or a man in the middle pretending to be one, asked just that: hunt 23).
                    out.append(codec.error_response(
                        "28000", "purpose-proxy does not relay a request for a cleartext password over an "
                                 "unencrypted upstream connection to a client that connected with TLS",
                        severity="FATAL", hint="Set upstream_tls to require or verify-full, or use scram-sha-256."))
                    self.to_server.append(codec.terminate())
                    self.phase = _FAILED
                    self.close_after_flush = True
                    return
                out.append(self._auth(item))
                verbatim = False
                if self.admit is not None and codec.auth_code(item.body) == codec.AUTH_OK:
                    refusal = self.admit()
                    if refusal is not None:
                        # Where PostgreSQL checks a role's connection limit: right after
                        # AuthenticationOk, before anything else reaches the client.
                        out.append(refusal_error(refusal))
                        self.to_server.append(codec.terminate())
                        self.phase = _FAILED
                        self.close_after_flush = True
                        return
            elif t == codec.B_KEY_DATA:
                out.append(self._key_data(item))
                verbatim = False
            else:
                out.append(item.raw)
        if verbatim and len(items) > 1 and self._server.verbatim:
            # As in client_data: the read itself, in one piece.
            out[mark:] = (data,)

    def _parses_failed(self) -> None:
        """The batch just answered ended before these Parses completed: PostgreSQL holds no statement
        of theirs, so their records go (else a later run of the name would be told apart wrongly:
        the first of two Parses of a name is not the one PostgreSQL kept if it failed)."""
        parses = self._parses
        while parses and parses[0][0] < self._answered:
            _, name, record = parses.popleft()
            if record is None:
                continue
            entries = self._statements.get(name)
            if entries is None:
                continue
            kept = [e for e in entries if e is not record]
            if kept:
                self._statements[name] = kept
            else:
                del self._statements[name]

    def unfinished(self) -> list[StatementEvent]:
        """Take the events still awaiting their answer (the session calls this when it ends)."""
        out = [e for batch in self._inflight if batch is not None for e in batch]
        out += self._batch or ()
        self._inflight.clear()
        self._batch = None
        return out

    def _swap_refusal(self, raw: bytes) -> bytes:
        if _MARKER not in raw:
            return raw
        for marker in list(self._refusals):
            if marker in raw:
                return self._refusals.pop(marker).error
        # The stand-in of a refusal the proxy no longer tracks: never let the client
        # see it as a syntax error. Only a syntax error (42601) can be one; any other
        # error that merely mentions the prefix (a column of that name, say) is
        # PostgreSQL's own answer and passes unchanged.
        if b"C42601\x00" not in raw:
            return raw
        return refusal_error(Block("statement refused by purpose-proxy", reason="expired-refusal"))

    def _auth(self, frame: codec.Frame) -> bytes:
        code = codec.auth_code(frame.body)
        if code == codec.AUTH_SASL and not self.channel_binding:
            # SCRAM channel binding (tls-server-end-point) binds to the certificate
            # the server presents; the client sees the proxy's, so unless that is the
            # same certificate the binding cannot work end to end: hide it.
            mechs = codec.sasl_mechanisms(frame.body)
            kept = [m for m in mechs if not m.endswith("-PLUS")]
            if kept != mechs:
                return codec.auth_sasl(kept)
        return frame.raw

    def _key_data(self, frame: codec.Frame) -> bytes:
        pid, secret = codec.decode_backend_key_data(frame.body)
        self.backend_key = (pid, secret)
        if self.key_mapper is None:
            return frame.raw
        return codec.backend_key_data(pid, self.key_mapper(pid, secret))

    # --- failures ------------------------------------------------------------------

    def fail(self, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        """Send a FATAL error to the client (when the stream allows it) and close."""
        if self.client_at_boundary:
            self.to_client.append(
                codec.error_response(sqlstate, message, severity="FATAL", detail=detail, hint=hint)
            )
        self.phase = _FAILED
        self.close_after_flush = True
        self._interrupted = True
