"""A session's purpose, search_path and prepared statements, and the decision on each statement.

``PurposeSession.decide`` is the inspection hook of a session under purpose
enforcement: it analyses the SQL against the database's schema with the
session's search_path, lets the policy decide, and keeps the session state that
later decisions depend on. It never awaits.

The purpose setting (``pii.purpose`` by default) is a PostgreSQL custom setting:
statements that set it are decided here and then still run upstream, so ``SHOW``
and ``current_setting`` answer as usual. Because the proxy must know the value
PostgreSQL has, the settings the analysis depends on (the purpose and
search_path) may only change at a quiet point of the session: outside a
transaction block, with nothing else in flight, in a statement of their own,
and never with ``SET LOCAL``; ``set_config`` only for search_path, as the whole
statement, with constant arguments (``SELECT set_config('search_path', '', false)``,
as pg_dump sends it). Anything else is refused.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from proxy.analysis.access import analyze, lex
from proxy.analysis.lexer import LexError, T, split_statements, truncate_identifier
from proxy.analysis.model import Analysis, Kind, Table
from proxy.analysis.schema import format_search_path, parse_search_path
from proxy.analysis.shape import shape
from proxy.analysis.utility import (ends_a_transaction_aside, is_temp_schema, temp_schema_listed_at,
                                    temporary_relations)
from proxy.enforcement.cache import MAX_TEXT, Shaped, Verdict, shape_entry
from proxy.enforcement.hook import SessionInfo, StartupRefused
from proxy.enforcement.rewrite import make_rewrite
from proxy.enforcement.startup import BadOptions, startup_settings
from proxy.policy.decision import Block, Decision
from proxy.policy.verdict import Explanation, decide_statement, flatten, with_runs

if TYPE_CHECKING:
    from proxy.enforcement.runtime import DatabaseState, PolicyRuntime

log = logging.getLogger(__name__)

# Settings whose change would move the ground the analysis stands on.
IDENTITY_SETTINGS = frozenset({"role", "session_authorization"})
_GUARDED = IDENTITY_SETTINGS | {"search_path", "all", "client_encoding"}  # never through set_config()
# The proxy reads statements as UTF-8 and truncates names at 63 bytes of UTF-8, as a UTF8
# database does. Any other client encoding can make PostgreSQL, which converts the text
# to the database encoding before its lexer reads it, see other tokens or names:
# - in the client-only encodings (SJIS, BIG5, GBK, GB18030, UHC, JOHAB, SHIFT_JIS_2004;
#   documentation 24.3.1) the second byte of a character can be a quote or a backslash
#   (Shift-JIS 0x95 0x5C is one character): "E'\x95\\' ..." ends a string for one reader only;
# - in the others a byte above 0x7F becomes two or three bytes of UTF-8, so two names
#   the proxy truncates to the same 63 bytes are different names in PostgreSQL (a WITH
#   query read in place of another).
# SQL_ASCII is no conversion: PostgreSQL checks the bytes as UTF-8 (its database encoding),
# as the proxy reads them. Names as clean_encoding_name compares them (encnames.c).
_UTF8_READ = frozenset({"utf8", "unicode", "sqlascii"})


def unsafe_client_encoding(name: str | None) -> bool:
    """Whether statements in client encoding ``name`` could read differently to the proxy and to PostgreSQL.

    >>> [unsafe_client_encoding(n) for n in ("Shift_JIS", "LATIN1", "UTF8", "unicode", "SQL_ASCII", None)]
    [True, True, False, False, False, False]
    """
    return name is not None and re.sub(r"[^0-9a-z]", "", name.lower()) not in _UTF8_READ


# PostgreSQL's encoding names and aliases (src/common/encnames.c), as ``unsafe_client_encoding`` compares them.
_ENCODINGS = frozenset(
    "abc alt big5 euccn eucjis2004 eucjp euckr euctw gb18030 gbk johab koi8 koi8r koi8u mskanji muleinternal "
    "shiftjis shiftjis2004 sjis sqlascii tcvn tcvn5712 uhc unicode utf8 vscii win win866 win874 win932 win936 "
    "win949 win950 windows866 windows874 windows932 windows936 windows949 windows950".split()
    + [f"iso8859{n}" for n in range(1, 17)] + [f"latin{n}" for n in range(1, 11)]
    + [f"win{n}" for n in range(1250, 1259)] + [f"windows{n}" for n in range(1250, 1259)])


def _encoding_refusal(name: str, severity: str = "ERROR") -> Block:
    """The refusal of a client encoding; a name PostgreSQL does not know is not repeated (the message
    goes to the audit log, which keeps no values: a hunt set client_encoding to an e-mail address).

    >>> _encoding_refusal("LATIN1").message, _encoding_refusal("bob@example.com").message
    ('client_encoding LATIN1 is not supported by purpose-proxy', 'the client_encoding requested is not supported by purpose-proxy')
    """
    known = re.sub(r"[^0-9a-z]", "", name.lower()) in _ENCODINGS and len(name) <= 32
    return Block(f"client_encoding {name} is not supported by purpose-proxy" if known else
                 "the client_encoding requested is not supported by purpose-proxy", sqlstate="0A000",
                 severity=severity, reason="client-encoding",
                 detail="The proxy reads SQL as UTF-8; in this encoding PostgreSQL could read a statement's "
                        "strings or names differently.",
                 hint="Use client_encoding UTF8 (PostgreSQL converts to and from the database's encoding).")


def _database_encoding_refusal(name: str) -> Block:
    return Block(f"the database encoding {name} is not supported by purpose-proxy", sqlstate="0A000",
                 reason="client-encoding",
                 detail="PostgreSQL truncates names at 63 bytes of the database encoding; the proxy, which "
                        "reads names as UTF-8, could take two of them for one.",
                 hint="Put the proxy in front of UTF8 databases.")


# SQL PREPAREs a session's records may hold: per name (a PREPARE that failed, 42P05, leaves one more
# candidate behind the name), and in all.
MAX_CANDIDATES = 16
MAX_PREPARED = 10000
MAX_CURSORS = 256  # cursors a session remembers the query of, for the audit of FETCH (the oldest go first)

_DEALLOCATE_ALL = re.compile(r"^\s*deallocate\s+(prepare\s+)?all\s*;?\s*$", re.I)
_CLOSE_ALL = re.compile(r"^\s*close\s+all\s*;?\s*$", re.I)
_DISCARD_TEMP = re.compile(r"^\s*discard\s+(temp|temporary|all)\s*;?\s*$", re.I)
# What may run while the schema the proxy decides on is changing (DDL not yet committed in this
# session, or committed and not yet loaded): statements that name no relation of that schema.
_SCHEMA_FREE = frozenset({Kind.DDL, Kind.SET, Kind.SHOW, Kind.TRANSACTION, Kind.UTILITY, Kind.EMPTY})
SHAPED = True  # tags the cache keys of shape entries (a text without constants is its own shape)
# An UPDATE of pg_settings runs set_config() for each row it changes.
PG_SETTINGS = Table("pg_catalog", "pg_settings")


def unreadable_search_path(value: str) -> bool:
    """Whether PostgreSQL refuses ``value`` as a search_path (a list it cannot split).

    >>> [unreadable_search_path(v) for v in ('crm, "Public"', '', '"a', 'a,', 'a b')]
    [False, False, True, True, True]
    """
    try:
        parse_search_path(value)
    except ValueError:
        return True
    return False


def _refuse(message: str, *, reason: str, sqlstate: str = "42501", detail: str | None = None,
            hint: str | None = None) -> Block:
    return Block(message, sqlstate=sqlstate, detail=detail, hint=hint, reason=reason)


class PurposeSession:
    """Decides one session's statements under its declared purpose."""

    # The relay withholds the DETAIL of constraint-violation errors, which can echo
    # columns of the row the purpose may not read (see enforcement.apply).
    withhold_error_rows = True

    def __init__(self, runtime: "PolicyRuntime", info: SessionInfo, db: "DatabaseState") -> None:
        self.runtime = runtime
        self.info = info
        self.db = db
        self.role = info.role
        self.database = info.database
        self.setting = runtime.config.purpose_setting
        try:
            settings = startup_settings(info.params)
        except BadOptions as exc:
            raise StartupRefused(Block(str(exc), sqlstate="0A000", severity="FATAL", reason="startup-options",
                                       hint="Pass settings as -c name=value in options (PGOPTIONS), or as startup "
                                            "parameters of their own.")) from None
        if IDENTITY_SETTINGS & settings.keys():
            # As SET ROLE later: the proxy decides for the role that logged in.
            raise StartupRefused(Block("changing the session's role at connect time is refused by purpose-proxy",
                                       sqlstate="42501", severity="FATAL", reason="set-role",
                                       hint="Connect as the role that should run the statements."))
        if db.sets_identity(self.role, self.database):
            raise StartupRefused(Block("a role or database setting (ALTER ROLE/DATABASE ... SET role) would make this "
                                       "session run as another role, which purpose-proxy refuses",
                                       sqlstate="42501", severity="FATAL", reason="set-role",
                                       hint="Connect as the role that should run the statements."))
        if unsafe_client_encoding(settings.get("client_encoding")):
            raise StartupRefused(_encoding_refusal(settings["client_encoding"], "FATAL"))
        self.startup_purpose = settings.get(self.setting) or None
        self.purpose = self.startup_purpose
        sp = settings.get("search_path")
        try:
            self.startup_search_path = (parse_search_path(sp) if sp is not None
                                        else db.default_search_path(self.role, self.database))
        except ValueError as exc:
            raise StartupRefused(Block(f'invalid value for parameter "search_path": {exc}', sqlstate="22023",
                                       severity="FATAL", reason="startup-options")) from None
        # Settings the proxy adds to the StartupMessage it sends upstream. The search_path the
        # session starts with is the proxy's reading of the role's, database's and server's
        # defaults; pinned as a client setting it stays what the proxy decides on, whatever
        # changes there later (a SIGHUP applies a new postgresql.conf search_path to open
        # sessions that have not set theirs; ALTER ROLE ... SET or a renamed role reaches new
        # sessions before the proxy has read it). RESET goes back to it, as the proxy expects.
        self.startup_parameters = ({} if sp is not None
                                   else {"search_path": format_search_path(self.startup_search_path)})
        self._settings_epoch = 0  # moves whenever the purpose or the search_path changes
        self._search_path = list(self.startup_search_path)
        # (state, search_path) -> the schemas PostgreSQL searches (without those the role may not
        # use), as a list and a tuple: worked out once per state and path, not per statement
        self._usable: tuple = (None, None, [], ())
        # SQL-level PREPARE name -> every statement that may be behind the name, as
        # (sql, decision, epoch, explanation): a PREPARE of a name that exists fails in
        # PostgreSQL, which the proxy does not see, so the earlier statements stay candidates.
        self.prepared: dict[str, list[tuple[str, Decision, object, Explanation | None]]] = {}
        # The (purpose, search_path) before a SET the server has not yet confirmed:
        # until its ReadyForQuery, statements are decided under both (see ``ready``).
        self._unsettled: tuple[str | None, list[str]] | None = None
        # DDL was let through and its transaction has not ended yet (see ``ready``): until then the
        # loaded schema may not be what PostgreSQL resolves names against in this session.
        self._ddl_open = False
        # A COMMIT/ROLLBACK AND CHAIN (the transaction ends, another begins at once: the status stays
        # in a block) or a COMMIT/ROLLBACK PREPARED (DDL prepared earlier, by any session, commits
        # now) was let through: at the next ReadyForQuery the schema counts as changed.
        # ReadyForQuery messages still to come that may follow a commit of DDL (see ``_apply``).
        self._news_ahead = 0
        self.holdable_cursors = False  # a DECLARE ... WITH HOLD may still be open
        # Temporary relations this session may have created (CREATE TEMP TABLE, SELECT ... INTO TEMP, ...):
        # PostgreSQL searches the session's temporary schema before every schema of the search_path unless
        # pg_temp is listed, and the proxy's loader cannot see it, so an unqualified name of one of these is
        # refused (``_temp_shadowing``). ``temp_unknown``: one may exist whose name the proxy could not tell.
        self.temp_relations: set[str] = set()
        self.temp_unknown = False
        self._temp_created = 0  # DDL that may have created one, so far (see ``_temps_discarded``)
        self._holdable_declared = 0  # DECLARE ... WITH HOLD let through so far (see ``_cursors_closed``)
        # cursor name -> the explanation of the DECLARE that opened it, for the FETCHes from it (``_declared``)
        self.cursors: dict[str, Explanation] = {}
        self.relay = None
        self._scs = True  # standard_conforming_strings, as the server reports it (parameter_status)
        self._unreadable: Block | None = None  # the refusal of every statement under an unreadable encoding
        self.last: Explanation | None = None  # the explanation of the latest decision
        # (EXECUTE's explanation, its runs' explanations) -> the two combined (``_explain_runs``): the
        # same object for the same inputs, so the recorder's memo of record pieces keeps working
        self._run_explanations: dict[tuple, tuple] = {}
        self._check_startup_purpose()

    # --- wiring -------------------------------------------------------------------------

    def attach(self, relay) -> None:
        """The relay whose quiet points gate setting changes."""
        self.relay = relay

    def parameter_status(self, params: dict[str, str]) -> None:
        """The server reported a setting (the relay calls this at each ParameterStatus): take up the
        ones the analysis depends on, once, rather than at every statement."""
        self._scs = params.get("standard_conforming_strings", "on") == "on"
        # The encodings in force (a role's or database's default included): under any but UTF-8
        # nothing can be read with certainty, and every statement is refused.
        self._unreadable = None
        if unsafe_client_encoding(params.get("client_encoding")):
            self._unreadable = _encoding_refusal(params["client_encoding"])
        elif params.get("server_encoding", "UTF8") != "UTF8":
            self._unreadable = _database_encoding_refusal(params["server_encoding"])

    def refresh_state(self) -> None:
        """Take up the database state in force (after a schema reload). The epoch reads the schema
        version from it, and a session that only binds statements prepared earlier decides
        nothing that would refresh it: without this, its Binds never saw the new schema."""
        self.db = self.runtime.database(self.database) or self.db

    @property
    def epoch(self) -> tuple:
        """Changes whenever a decision made earlier may no longer hold: the session's purpose or
        search_path changed, or the runtime's policy or schema (a reload, DDL committed)."""
        return self._settings_epoch, self.runtime.changes, self.db.schema.version

    def _quiet(self) -> bool:
        return self.relay is None or self.relay.quiet

    def _check_startup_purpose(self) -> None:
        purpose = self.purpose
        if purpose is None:
            return
        policy = self.runtime.policy
        if not policy.is_purpose(purpose):
            raise StartupRefused(Block(
                f"unknown purpose declared at connect time in {self.setting}", sqlstate="42501", severity="FATAL",
                hint=self._declare_hint(), reason="unknown-purpose"))
        declared = policy.may_declare(self.role, purpose)
        if not declared.allowed:
            raise StartupRefused(Block(
                f"role \"{self.role}\" may not act under purpose \"{purpose}\"", sqlstate="42501", severity="FATAL",
                detail=f"Declaring {purpose}: {declared.why}.", hint=self._declare_hint(),
                reason="purpose-not-declarable"))

    def _declare_hint(self) -> str:
        purposes = self.runtime.policy.declarable_purposes(self.role)
        if not purposes:
            return f"Role {self.role} may not declare any purpose."
        return f"Role {self.role} may declare: {', '.join(purposes)}."

    # --- deciding -------------------------------------------------------------------------

    def decide(self, sql: str, via: str) -> Decision:
        decision, analysis = self._judge(sql, via)
        if analysis is not None:
            self._apply(analysis, decision, via)
            if self.last is not None and (self.prepared or self.cursors):
                self._explain_runs(analysis)
        return decision

    def _explain_runs(self, analysis: Analysis) -> None:
        """An EXECUTE reads what its prepared statement reads, a FETCH what its cursor's query reads:
        the explanation (and so the audit record and the category metrics) of a Query that runs one
        names those columns too, as the run of a prepared statement through Bind and Execute does
        (``prepared_run``)."""
        runs = []
        for st in analysis.statements:
            if st.kind is Kind.EXECUTE and st.prepared_name:
                entries = self.prepared.get(st.prepared_name)
                if entries and entries[0][3] is not None:  # the first is the one PostgreSQL kept
                    runs.append(entries[0][3])
            elif st.kind is Kind.UTILITY and st.cursor:
                declared = self.cursors.get(st.cursor)
                if declared is not None:
                    runs.append(declared)
        if not runs:
            return
        key = (id(self.last), *map(id, runs))
        hit = self._run_explanations.get(key)
        if hit is None or hit[0] is not self.last or any(a is not b for a, b in zip(hit[1], runs)):
            if len(self._run_explanations) >= 64:
                self._run_explanations.clear()
            hit = self._run_explanations[key] = (self.last, runs, with_runs(self.last, runs))
        self.last = hit[2]

    def _judge(self, sql: str, via: str) -> tuple[Decision, Analysis | None]:
        """The decision on ``sql``, and its analysis when the session state must follow it."""
        self.last = None
        if via == "function_call":
            return _refuse("the FunctionCall protocol message is refused: purpose-proxy cannot see what the "
                           "function reads", reason="function-call",
                           hint="Call the function from SQL (SELECT f(...)) so the proxy can analyse it."), None
        if self._unreadable is not None:
            return self._unreadable, None
        # Read the state in force once: a reload swaps these objects whole.
        self.refresh_state()
        db = self.db
        policy = self.runtime.policy
        scs = self._scs
        usable = self._usable
        if usable[0] is not db or usable[1] is not self._search_path:  # (the setter assigns a new list)
            searched = db.usable_search_path(self._search_path, self.role)
            usable = self._usable = (db, self._search_path, searched, tuple(searched))
        path = usable[2]
        # While a SET is unconfirmed a statement is decided twice (below): no cache then; nor while
        # the schema is changing (every statement is checked by ``_schema_changing``).
        changing = self._ddl_open or self.database in self.runtime.stale
        temps = bool(self.temp_relations) or self.temp_unknown  # (checked on each statement: no cache)
        cache = self.runtime.cache if self._unsettled is None and not changing and not temps else None
        shp = None
        if cache is not None:
            context = (self.role, self.purpose, usable[3], policy.version, db.schema.version, scs)
            entry = cache.get((sql, context))
            if entry is None:
                shp = shape(sql)
                if shp is not None and shp.constants:
                    entry = cache.get((shp.key, context, SHAPED))
            if entry is None:
                cache.misses += 1
            elif type(entry) is Shaped:  # by shape, or by text for a statement without constants
                if shp is None:
                    cache.text_hits += 1
                else:
                    cache.shape_hits += 1
                self.last = entry.explanation
                if entry.unknown_relation:
                    self.runtime.refresh_schema(self.database, "unknown relation")
                return entry.decision_for(shp), None
            else:
                cache.text_hits += 1
                refused = self._session_rules(entry.analysis, via)
                if refused is not None:
                    return refused, None
                self.last = entry.explanation
                if type(entry.decision) is Block:
                    if any(r.startswith("unknown relation") for st in entry.analysis.statements
                           for r in st.unsupported):
                        self.runtime.refresh_schema(self.database, "unknown relation")
                    return entry.decision, None
                return entry.decision, entry.analysis
        analysis = analyze(sql, db.schema, path, self.role, standard_conforming_strings=scs)
        statements = analysis.statements
        refused = self._session_rules(analysis, via)
        if refused is None and temps:
            refused = self._temp_shadowing(analysis, path, scs)
        if refused is not None:
            return refused, None
        if changing or any(st.kind is Kind.DDL for st in statements):
            refused = self._schema_changing(analysis)
            if refused is not None:
                return refused, None
        edits: list = []
        decision, self.last = decide_statement(
            analysis, role=self.role, purpose=self.purpose, policy=policy,
            rewrite=make_rewrite(policy, db.schema, path, self.role, edits))
        if cache is not None:
            entry = shape_entry(analysis, decision, self.last, edits) if shp is not None else None
            if entry is not None:
                cache.put((shp.key, context, SHAPED) if shp.constants else (sql, context), entry)
            elif len(sql) <= MAX_TEXT:
                cache.put((sql, context), Verdict(analysis, decision, self.last))
        if type(decision) is Block:
            if any(r.startswith("unknown relation") for st in statements for r in st.unsupported):
                self.runtime.refresh_schema(self.database, "unknown relation")
            return decision, None
        if self._unsettled is not None:
            # A SET is still in flight: PostgreSQL may yet refuse it, so the statement
            # must also pass under the purpose and search_path from before it.
            purpose, path = self._unsettled
            path = db.usable_search_path(path, self.role)
            before = analyze(sql, db.schema, path, self.role, standard_conforming_strings=scs)
            other, expl = decide_statement(before, role=self.role, purpose=purpose, policy=policy,
                                           rewrite=make_rewrite(policy, db.schema, path, self.role))
            if type(other) is not type(decision) or getattr(other, "sql", None) != getattr(decision, "sql", None):
                self.last = expl
                return other if type(other) is Block else _refuse(
                    "the statement was sent before the server confirmed a change of the purpose or search_path",
                    sqlstate="25001", reason="setting-unconfirmed",
                    hint="Wait for the SET to complete before sending statements that depend on it."), None
        return decision, analysis

    def ready(self, errored: bool) -> None:
        """The relay saw a ReadyForQuery (``errored``: an error came since the previous one).

        A SET of the purpose or search_path is only sent at a quiet point, on its own,
        so the first ReadyForQuery after it ends it: if an error came, PostgreSQL did
        not apply it, and neither does the proxy.
        """
        news = self._news_ahead > 0
        if news:
            self._news_ahead -= 1
        if (self._ddl_open and self.relay.tx_status == b"I") or news:
            # The DDL's transaction has ended (committed, or rolled back): from now on other
            # sessions see its effect too, and the schema is stale until it is loaded again.
            # (After AND CHAIN this session is in a new block: its own rule stays until it ends.)
            self._ddl_open = self._ddl_open and self.relay.tx_status != b"I"
            told = self.runtime.schema_changed(self.database, "DDL committed")
            if told is not None:  # sibling workers: the client has its answer once they know
                self.relay.hold_client_output(told)
        if self._unsettled is None:
            return
        purpose, path = self._unsettled
        self._unsettled = None
        if errored:
            log.info("session %s: the server refused a change of purpose or search_path; keeping %s, %s",
                     self.info.session_id, purpose, path)
            self._set_purpose(purpose)
            self.search_path = path

    def _session_rules(self, analysis: Analysis, via: str = "query") -> Block | None:
        """Refusals that depend on the session rather than the policy."""
        statements = analysis.statements
        for st in flatten(statements):
            if any(t == PG_SETTINGS and use.writes for t, use in st.tables.items()) or any(
                    (c.schema, c.table) == ("pg_catalog", "pg_settings") and use.writes
                    for c, use in st.columns.items()):
                return _refuse("changing settings through pg_settings is refused by purpose-proxy",
                               reason="set-config", hint=f"Use SET {self.setting} / SET search_path in a statement "
                                                         "of its own, outside a transaction block.")
        for st in statements:
            if st.kind is Kind.EXECUTE and st.prepared_name is not None:
                stale = self._stale_prepared(st.prepared_name)
                if stale is not None:
                    return stale
            if st.kind is Kind.PREPARE and st.prepared_name:
                # The records of PREPAREs that may have failed stay (see ``prepared``): bounded, else a
                # client repeating a failing PREPARE grew them without end (hunt 21).
                if (len(self.prepared.get(st.prepared_name, ())) >= MAX_CANDIDATES
                        or sum(map(len, self.prepared.values())) >= MAX_PREPARED):
                    return _refuse(f"too many statements may be prepared under \"{st.prepared_name}\" or in this "
                                   "session for purpose-proxy to keep track of", sqlstate="54000",
                                   reason="too-many-prepared",
                                   hint=f"DEALLOCATE {st.prepared_name} (or DEALLOCATE ALL) first.")
            if "pg_catalog.set_config" in st.functions:
                names = {name for name, _, _ in st.settings}
                # ``SELECT set_config('search_path', '', false)`` alone, all constants, is a SET by another
                # name (pg_dump's first statement): decided by the SET rules below, as SET search_path is.
                # (The purpose is declared with SET only: its changes are what auditors read in the log.)
                tracked = st.set_command and st.kind is Kind.SELECT and names == {"search_path"}
                if not names or names & (_GUARDED | {self.setting}) and not tracked:
                    return _refuse(
                        "set_config() on the purpose, search_path, role or client_encoding is refused by "
                        "purpose-proxy",
                        reason="set-config", hint=f"Use SET {self.setting} / SET search_path in a statement of "
                                                  "its own, outside a transaction block.")
            for name, value, local in st.settings:
                if name == "client_encoding" and unsafe_client_encoding(value):  # None: back to the connect-time one
                    return _encoding_refusal(value)
                if name in IDENTITY_SETTINGS:
                    return _refuse(f"changing the session's role ({name.replace('_', ' ')}) is refused by "
                                   "purpose-proxy", reason="set-role",
                                   hint="Connect as the role that should run the statements.")
                if name in (self.setting, "search_path", "all"):
                    what = "settings" if name == "all" else name
                    if via != "query":
                        # A prepared SET takes effect when (and if) it is executed, which
                        # the proxy does not see: it could not know the setting in force.
                        return _refuse(f"changing {what} through the extended query protocol is refused by "
                                       "purpose-proxy", sqlstate="0A000", reason="setting-prepared",
                                       hint=f"Send SET/RESET of {what} as a simple query (without parameters), "
                                            "or declare the purpose at connect time.")
                    if local:
                        return _refuse(f"SET LOCAL {what} is refused by purpose-proxy", reason="set-local",
                                       hint=f"Use SET {what} outside a transaction block.")
                    if len(statements) > 1 or not self._quiet():
                        return _refuse(
                            f"{what} can only change outside a transaction block, in a statement of its own",
                            sqlstate="25001", reason="setting-in-transaction",
                            hint="COMMIT or ROLLBACK first, and send the SET on its own (not pipelined "
                                 "behind other statements).")
                    if name == "search_path" and value is not None and unreadable_search_path(value):
                        # set_config passes its text as it is (SET quotes it first): PostgreSQL refuses a
                        # list it cannot split, 22023 (check_search_path, SplitIdentifierString).
                        # (The value stays out of the message: refusals reach the audit log.)
                        return _refuse("invalid value for parameter \"search_path\"", sqlstate="22023",
                                       reason="invalid-setting", detail="List syntax is invalid.")
                    if name in (self.setting, "all") and self.holdable_cursors:
                        return _refuse("the purpose cannot change while WITH HOLD cursors may be open",
                                       sqlstate="25001", reason="cursor-open",
                                       hint="CLOSE ALL first.")
        return None

    def sql_prepared(self, name: str) -> bool:
        """Whether a SQL PREPARE may be behind ``name`` (the relay asks, for a Bind of a shared name)."""
        return bool(self.prepared.get(name))

    def _stale_prepared(self, name: str) -> Block | None:
        entries = self.prepared.get(name)
        if not entries:
            return _refuse(f"prepared statement \"{name}\" was not prepared through purpose-proxy", sqlstate="26000",
                           reason="unknown-prepared")
        protocol = getattr(self.relay, "protocol_statement", None)
        if protocol is not None and protocol(name) and any(epoch != self.epoch for _, _, epoch, _ in entries):
            # Parse and PREPARE share PostgreSQL's namespace: a PREPARE of the name that failed
            # there (42P05) is recorded here, and the statement behind it may be a Parse's.
            return _refuse(f"prepared statement \"{name}\" may have been prepared through the extended protocol, "
                           "so EXECUTE cannot decide it again under the current purpose or policy",
                           sqlstate="26000", reason="unknown-prepared",
                           hint="DEALLOCATE it and prepare it again.")
        renewed = []
        for sql, before, epoch, explanation in entries:
            if epoch == self.epoch:
                renewed.append((sql, before, epoch, explanation))
                continue
            now, _ = self._judge(sql, "query")  # decide the PREPARE again under what holds now
            if type(now) is Block:
                return now
            if type(now) is not type(before) or getattr(now, "sql", None) != getattr(before, "sql", None):
                return _refuse(f"prepared statement \"{name}\" was decided under another purpose or policy and "
                               "must be prepared again", sqlstate="0A000", reason="stale-prepared-statement",
                               hint=f"DEALLOCATE {name} and PREPARE it again.")
            renewed.append((sql, before, self.epoch, explanation))
        self.prepared[name] = renewed
        return None

    def _schema_changing(self, analysis: Analysis) -> Block | None:
        """The refusal of a statement that depends on a schema that is changing, else None.

        After DDL in this session, until its transaction ends, only statements that name no
        relation may follow (the proxy loads schemas through its own connection, which sees
        committed catalogs only). After DDL was committed, until the schema is loaded again,
        the same holds for every session on the database: that refusal is worth retrying.
        """
        ddl = self._ddl_open
        for st in analysis.statements:
            if st.kind is Kind.DDL:
                ddl = True
            elif st.kind in _SCHEMA_FREE:
                continue
            elif ddl:
                return _refuse(
                    "statement refused: DDL earlier in this transaction changed the schema, and purpose-proxy "
                    "only decides on schemas that are committed", sqlstate="0A000", reason="after-ddl",
                    hint="Commit the DDL first, then run this statement (in a transaction of its own).")
            elif self.database in self.runtime.stale:
                return _refuse(
                    "statement refused: the database schema changed (DDL) and purpose-proxy is loading it again",
                    sqlstate="40001", reason="schema-reloading",
                    hint="Retry in a moment; statements are decided again once the new schema is loaded.")
        return None

    def _apply(self, analysis: Analysis, decision: Decision, via: str = "query") -> None:
        """Update the session state for an allowed (or masked) statement."""
        sql = analysis.sql
        before = (self.purpose, list(self.search_path))
        if any(st.kind is Kind.DDL for st in analysis.statements):
            self._temps_created(sql)
        for st in analysis.statements:
            for name, value, _ in st.settings:
                if name in (self.setting, "search_path", "all") and self.relay is not None:
                    self._unsettled = before  # until the server confirms it (``ready``)
                if name == self.setting:  # RESET (value None) goes back to the connect-time purpose
                    self._set_purpose(self.startup_purpose if value is None else (value or None))
                elif name == "search_path":
                    self.search_path = (parse_search_path(value) if value is not None
                                        else list(self.startup_search_path))
                elif name == "all":  # RESET ALL / DISCARD ALL: back to the connect-time values
                    self._set_purpose(self.startup_purpose)
                    self.search_path = list(self.startup_search_path)
            if st.kind is Kind.PREPARE and st.prepared_name:
                entry = (sql, decision, self.epoch, self.last)
                self.prepared.setdefault(st.prepared_name, []).append(entry)
                self._prepared_confirmed(st.prepared_name, via, entry if len(analysis.statements) == 1 else None)
            elif st.kind is Kind.UTILITY and st.prepared_name:  # DEALLOCATE name
                self._deallocated(st.prepared_name, via)
            elif st.kind is Kind.UTILITY and _DEALLOCATE_ALL.match(sql):
                self._deallocated(None, via)
            elif st.kind is Kind.DECLARE:
                if st.holdable:
                    self.holdable_cursors = True
                    self._holdable_declared += 1
                if st.cursor and self.last is not None:
                    self._declared(st.cursor, self.last, via)
            elif st.kind is Kind.UTILITY and _CLOSE_ALL.match(sql):
                self._cursors_closed(via)
            elif st.kind is Kind.TRANSACTION and self.relay is not None:
                # COMMIT AND CHAIN commits this session's own transaction: news only when it ran DDL
                # (each one made every session of the database wait for a schema load); COMMIT or
                # ROLLBACK PREPARED may end any session's.
                if ends_a_transaction_aside(sql) and (self._ddl_open or "prepared" in sql.lower()):
                    # It is decided when it arrives, but runs after whatever the client sent before
                    # it (a pipeline): every ReadyForQuery up to the one that ends its batch counts.
                    distance = getattr(self.relay, "batch_end_distance", None)
                    ahead = distance(via == "query") if distance is not None else 1
                    self._news_ahead = max(self._news_ahead, ahead)
            elif st.kind is Kind.DDL:
                if self.relay is None:  # deciding alone (no protocol): as if it ran and committed
                    self.runtime.schema_changed(self.database, "DDL")
                elif not self._ddl_open:
                    # Until its transaction ends (``ready``) the statements after it in this
                    # session are refused; and Binds are decided again from now on, so a
                    # statement prepared before cannot run after it in the same batch.
                    self._ddl_open = True
                    self._settings_epoch += 1
        if any(name == "all" for st in analysis.statements for name, _, _ in st.settings):
            if analysis.statements[0].kind is Kind.UTILITY:  # DISCARD ALL also drops prepared statements
                self._deallocated(None, via)
                self._cursors_closed(via)
        if (self.temp_relations or self.temp_unknown) and _DISCARD_TEMP.match(sql):
            self._temps_discarded(via)

    # --- temporary relations ------------------------------------------------------------------

    def _temps_created(self, sql: str) -> None:
        """Remember the temporary relations the DDL in ``sql`` may create (when it is decided: one that
        fails in PostgreSQL only leaves a name refused that need not be). Renaming while some exist
        may give one a name the proxy cannot follow."""
        try:
            parts = split_statements(sql, lex(sql, self._scs))
        except LexError:
            self.temp_unknown = True
            self._temp_created += 1
            return
        temp_first = any(is_temp_schema(s) for s in self._search_path)
        for part in parts:
            words = {t.value for t in part.tokens if t.kind is T.IDENT}
            names = temporary_relations(part.tokens, temp_first)
            if names is None or ("rename" in words and (self.temp_relations or self.temp_unknown)):
                self.temp_unknown = True
                self._temp_created += 1
            elif names:
                self.temp_relations.update(names)
                self._temp_created += 1

    def _temps_discarded(self, via: str) -> None:
        """DISCARD TEMP (or ALL) drops every temporary relation once it has run without an error, unless
        another may have been created meanwhile. Through Parse it runs only if executed: the names stay.

        Only at a quiet point (outside a transaction block, nothing in flight): DISCARD TEMP is allowed
        in a transaction block (DISCARD ALL is not), and a ROLLBACK (or ROLLBACK TO SAVEPOINT) gives the
        temporary relations back, as it does any dropped table (a hunt ran ``BEGIN; DISCARD TEMP`` and
        ``ROLLBACK``, and the temporary ``members`` was read as the decoy public.members)."""
        if via != "query" or not self._quiet():
            return
        created = self._temp_created

        def done(errored: bool) -> None:
            if not errored and self._temp_created == created:
                self.temp_relations.clear()
                self.temp_unknown = False

        self._once_done(done, via)

    def _temp_shadowing(self, analysis: Analysis, path: list[str], scs: bool) -> Block | None:
        """The refusal of a statement that may read a temporary relation of this session where the proxy
        resolves the name to a relation of its schema (or to none), else None.

        PostgreSQL searches the session's temporary schema first unless pg_temp is listed in the
        search_path, and then where it is listed (documentation 5.9.3, and the search_path setting in
        20.11.1); the proxy's loader cannot see it. A temporary table named like a catalogued table
        would otherwise be decided as that table (a hunt copied phone numbers into a temporary
        ``members`` decided as crm.members under one purpose, then read them as the decoy
        public.members under a purpose that may not read phone numbers)."""
        if self.temp_unknown:
            for st in flatten(analysis.statements):
                if st.kind not in (Kind.SET, Kind.SHOW, Kind.TRANSACTION, Kind.EMPTY) and (
                        st.tables or st.columns or st.references):
                    return _refuse("statement refused: this session may have created a temporary relation whose "
                                   "name purpose-proxy could not follow", sqlstate="0A000",
                                   reason="temporary-relation",
                                   hint="DISCARD TEMP, or create temporary relations with CREATE TEMP TABLE name "
                                        "(without renaming them).")
            return None
        try:
            tokens = lex(analysis.sql, scs)
        except LexError:
            return None  # the analysis refused it already
        names = self.temp_relations
        for i, tok in enumerate(tokens):
            if tok.kind is not T.IDENT and tok.kind is not T.QIDENT:
                continue
            name = truncate_identifier(tok.value)
            if name not in names or (i > 0 and tokens[i - 1].kind is T.DOT) or (
                    i + 1 < len(tokens) and tokens[i + 1].kind is T.DOT):
                continue  # qualified, or a qualifier (the relation it qualifies is named elsewhere)
            if self._temp_first(name, path):
                return _refuse(f"statement refused: \"{name}\" may name a temporary relation of this session, "
                               "which purpose-proxy cannot see", sqlstate="0A000", reason="temporary-relation",
                               hint=f"Qualify the name (pg_temp.{name}, or the schema of the relation meant), or "
                                    "list pg_temp after that schema in search_path.")
        return None

    def _temp_first(self, name: str, path: list[str]) -> bool:
        """Whether PostgreSQL would search the temporary schema for ``name`` before finding it elsewhere on
        ``path`` (the schemas it searches): the temporary schema comes first unless the pg_temp alias is
        listed (a hunt listed pg_temp_99999, another session's or none, which PostgreSQL skips)."""
        at = temp_schema_listed_at(path)
        if at is None:
            return True
        before = [self.role if s == "$user" else s for s in path[:at]]
        if "pg_catalog" not in path:  # searched first unless listed (after pg_temp, then)
            before.insert(0, "pg_catalog")
        schema = self.db.schema
        return not any(schema.relation(s, name) is not None for s in before)

    def _once_done(self, callback, via: str) -> None:
        """Call ``callback(errored)`` when the statement being decided has run (at its batch's
        ReadyForQuery; at once without a relay)."""
        later = getattr(self.relay, "on_batch_end", None)
        if later is None:
            callback(False)
        else:
            later(callback, counted=via == "query")

    def _prepared_confirmed(self, name: str, via: str, entry: tuple | None) -> None:
        """A PREPARE of ``name`` that succeeds means no Parse's statement is behind the name any more:
        the relay forgets its record then (a PREPARE that fails, 42P05, leaves it). ``entry``, the
        record of a PREPARE that is its Query's only statement, goes if that Query fails: no
        statement of its text exists then.

        Through Parse, a PREPARE runs only if a Bind and an Execute follow, which the proxy does
        not follow up: nothing is forgotten (a hunt parsed ``PREPARE s AS SELECT 1``, never ran it,
        and so had the relay forget the statement a Parse had put behind ``s``)."""
        if via != "query":
            return

        def done(errored: bool) -> None:
            if not errored:
                self._forget_protocol_statement(name)
            elif entry is not None:
                kept = [e for e in self.prepared.get(name, ()) if e is not entry]
                if kept:
                    self.prepared[name] = kept
                else:
                    self.prepared.pop(name, None)

        self._once_done(done, via)

    def _declared(self, name: str, explanation: Explanation, via: str) -> None:
        """Cursor ``name`` reads what ``explanation`` names, once its DECLARE has run without an error (one
        that finds a cursor of that name open fails, and FETCH then reads the open one). Through Parse it
        runs only if a Bind and an Execute follow: kept at once (an audit record names more, never less)."""

        def done(errored: bool) -> None:
            if not errored:
                self.cursors.pop(name, None)
                if len(self.cursors) >= MAX_CURSORS:
                    del self.cursors[next(iter(self.cursors))]
                self.cursors[name] = explanation

        if via == "query":
            self._once_done(done, via)
        else:
            done(False)

    def _cursors_closed(self, via: str) -> None:
        """CLOSE ALL (or DISCARD ALL) was sent: the WITH HOLD cursors are gone once it has run without
        an error, unless another was declared meanwhile. Through Parse it runs only if a Bind and an
        Execute follow: the mark stays (a hunt parsed CLOSE ALL, never ran it, and changed the
        purpose with its cursor open; another sent it in a failed transaction block)."""
        if via != "query":
            return
        declared = self._holdable_declared

        def done(errored: bool) -> None:
            if not errored and self._holdable_declared == declared:
                self.holdable_cursors = False

        self._once_done(done, via)

    def _deallocated(self, name: str | None, via: str) -> None:
        """DEALLOCATE ``name`` (None: all) was sent. PostgreSQL drops the statements only if it
        gets that far without an error (an earlier statement of the string, an aborted
        transaction): the records go at the ReadyForQuery that ends the statement's batch, and
        only if no error came. Dropped at once, a failing DEALLOCATE followed by a PREPARE of
        the same name (which fails too) would leave the new text as the only candidate, and
        a later EXECUTE would be decided on it while PostgreSQL runs the old one. Through Parse
        the DEALLOCATE may never run at all: the records stay."""
        if via != "query":
            return
        gone = {n: tuple(e) for n, e in self.prepared.items() if name is None or n == name}

        def confirmed(errored: bool) -> None:
            if errored:
                return
            for n, entries in gone.items():
                kept = [e for e in self.prepared.get(n, ()) if not any(e is g for g in entries)]
                if kept:
                    self.prepared[n] = kept
                else:
                    self.prepared.pop(n, None)
            self._forget_protocol_statement(name)

        self._once_done(confirmed, via)

    def prepared_run(self, name: str) -> tuple[str, Decision, Explanation | None] | None:
        """The PREPARE (its text, decision and explanation) behind ``name``, for a run of it through the
        extended protocol's Bind and Execute (the relay's audit event of that run); None if there is none.

        With several candidates the first is the one PostgreSQL kept (a second PREPARE of a name fails).
        """
        entries = self.prepared.get(name)
        if not entries:
            return None
        sql, decision, _, explanation = entries[0]
        return sql, decision, explanation

    def _forget_protocol_statement(self, name: str | None) -> None:
        """SQL PREPARE/DEALLOCATE share PostgreSQL's namespace with protocol-level (Parse)
        statements: the relay's record of what is behind ``name`` (None: every name) no
        longer holds, so it refuses to Bind that name once decisions may be stale."""
        forget = getattr(self.relay, "forget_statement", None)
        if forget is not None:
            forget(name)

    @property
    def search_path(self) -> list[str]:
        return self._search_path

    @search_path.setter
    def search_path(self, path: list[str]) -> None:
        # A statement prepared under another search_path may name other relations now:
        # PostgreSQL re-plans it under the new one (plancache.c revalidation), so what the
        # proxy decided for it no longer holds (the epoch moves, as for a purpose change).
        if path != self._search_path:
            self._search_path = path
            self._settings_epoch += 1

    def _set_purpose(self, purpose: str | None) -> None:
        if purpose != self.purpose:
            log.info("session %s: purpose %s -> %s", self.info.session_id, self.purpose, purpose)
            self.purpose = purpose
            self._settings_epoch += 1


def decider_factory(runtime: "PolicyRuntime"):
    """A decider factory for ``ProxyServer``: sessions decide under ``runtime``."""

    async def open_session(info: SessionInfo) -> PurposeSession:
        db = await runtime.database_state(info.database)
        return PurposeSession(runtime, info, db)

    return open_session

