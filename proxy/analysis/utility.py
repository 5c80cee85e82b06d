"""Reading, from PostgreSQL tokens, the statements sqlglot does not parse or parses loosely (utilities and DDL).

SET/RESET/SHOW, transaction control, EXPLAIN/PREPARE/EXECUTE/DECLARE, COPY,
TRUNCATE, CALL/DO, cursors, LISTEN/NOTIFY and the other utilities, and the DDL family.

Each reader takes the tokens of one statement (``proxy.analysis.lexer``) and
returns plain values; a statement they do not recognise raises ``Unsupported``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from proxy.analysis.lexer import LITERALS, T, Token, truncate_identifier
from proxy.analysis.model import Kind, Use
from proxy.analysis.resolve import Unsupported
from proxy.analysis.schema import quote_ident

QUERY_WORDS = frozenset({"select", "with", "values", "table"})
DML_WORDS = frozenset({"insert", "update", "delete", "merge"})
TRANSACTION_WORDS = frozenset({"begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release"})
UTILITY_WORDS = frozenset({"listen", "notify", "unlisten", "discard", "close", "fetch", "move", "checkpoint",
                           "lock"})
DDL_WORDS = frozenset({"create", "alter", "drop", "grant", "revoke", "comment", "security", "vacuum", "analyze",
                       "analyse", "cluster", "reindex", "refresh", "import", "reassign"})
LIST_QUOTE_SETTINGS = frozenset({"search_path", "temp_tablespaces"})

# The words PostgreSQL's commands begin with (the SQL Commands reference): a statement's first
# word is named in messages and telemetry only when it is one of these, never client text.
COMMAND_WORDS = frozenset("""
    abort alter analyze analyse begin call checkpoint close cluster comment commit copy create deallocate declare
    delete discard do drop end execute explain fetch grant import insert listen load lock merge move notify
    prepare reassign refresh reindex release reset revoke rollback savepoint security select set show start
    table truncate unlisten update vacuum values with
""".split())

Setting = tuple[str, "str | None", bool]


def word(tok: Token | None) -> str | None:
    """The lower-case keyword of an unquoted identifier token, else None."""
    return tok.value if tok is not None and tok.kind is T.IDENT else None


# Statements whose kind their first word alone decides.
_WORD_KINDS = {"explain": Kind.EXPLAIN, "execute": Kind.EXECUTE, "declare": Kind.DECLARE, "copy": Kind.COPY_TO,
               "truncate": Kind.TRUNCATE, "do": Kind.DO, "call": Kind.CALL}


def classify(tokens: tuple[Token, ...] | list[Token]) -> Kind | None:
    """The kind a statement has from its first keywords; None for queries and DML (sqlglot parses those).

    >>> from proxy.analysis.lexer import scan
    >>> classify(scan("SHOW search_path")), classify(scan("SELECT 1")), classify(scan("ROLLBACK TO SAVEPOINT a"))
    (<Kind.SHOW: 'show'>, None, <Kind.TRANSACTION: 'transaction'>)
    """
    first = tokens[0]
    w = word(first)
    if first.kind is T.LPAREN or w in QUERY_WORDS or w in DML_WORDS:
        return None
    nxt = word(tokens[1]) if len(tokens) > 1 else None
    if w in ("set", "reset"):
        return Kind.SET
    if w == "show":
        return Kind.SHOW
    if w in TRANSACTION_WORDS:
        return Kind.TRANSACTION
    if w == "prepare":
        if nxt == "transaction" and len(tokens) > 2 and tokens[2].kind in LITERALS:
            return Kind.TRANSACTION
        return Kind.PREPARE
    if w in UTILITY_WORDS or w == "deallocate":
        return Kind.UTILITY
    if w in _WORD_KINDS:
        return _WORD_KINDS[w]
    if w in DDL_WORDS:
        return Kind.DDL
    return Kind.OTHER


# --- small token readers -------------------------------------------------------------------------------


class _Reader:
    def __init__(self, tokens: tuple[Token, ...] | list[Token], what: str) -> None:
        self.t = list(tokens)
        self.i = 0
        self.what = what

    def peek(self, k: int = 0) -> Token | None:
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def at_end(self) -> bool:
        return self.i >= len(self.t)

    def next(self) -> Token:
        tok = self.peek()
        if tok is None:
            self.fail()
        self.i += 1
        return tok

    def accept(self, *words: str) -> str | None:
        tok = self.peek()
        if tok is not None and tok.kind is T.IDENT and tok.value in words:
            self.i += 1
            return tok.value
        return None

    def expect(self, *words: str) -> str:
        w = self.accept(*words)
        if w is None:
            self.fail()
        return w

    def accept_kind(self, kind: T) -> Token | None:
        tok = self.peek()
        if tok is not None and tok.kind is kind:
            self.i += 1
            return tok
        return None

    def name(self) -> str:
        tok = self.next()
        if tok.kind not in (T.IDENT, T.QIDENT):
            self.fail()
        return truncate_identifier(tok.value)

    def qualified_name(self) -> list[str]:
        parts = [self.name()]
        while self.accept_kind(T.DOT):
            parts.append(self.name())
        return parts

    def fail(self) -> None:
        raise Unsupported(f"cannot read {self.what} statement")


# --- SET / RESET -------------------------------------------------------------------------------------------


def parse_set(tokens: tuple[Token, ...] | list[Token]) -> list[Setting]:
    """The settings a SET or RESET statement changes: (name, value or None, is_local).

    >>> from proxy.analysis.lexer import scan
    >>> parse_set(scan("SET LOCAL pii.purpose = 'billing'"))
    [('pii.purpose', 'billing', True)]
    >>> parse_set(scan("SET search_path TO crm, \\"Crm\\", '$user'"))
    [('search_path', 'crm, "Crm", "$user"', False)]
    >>> parse_set(scan("RESET ALL")), parse_set(scan("SET TIME ZONE 'UTC'"))
    ([('all', None, False)], [('timezone', 'UTC', False)])
    """
    r = _Reader(tokens, "SET")
    if r.accept("reset"):
        return [_parse_reset(r)]
    r.expect("set")
    scope = r.accept("session", "local")
    is_local = scope == "local"
    if scope == "session" and r.accept("characteristics"):
        r.expect("as")
        r.expect("transaction")
        return _transaction_modes(r, "default_", False)
    if r.accept("transaction"):
        if r.accept("snapshot"):
            r.next()
            return []
        return _transaction_modes(r, "", True)
    if scope == "session" and r.accept("authorization"):
        if r.accept("default"):
            _end(r)
            return [("session_authorization", None, is_local)]
        value = _value(r)
        _end(r)
        return [("session_authorization", value, is_local)]
    if r.accept("constraints"):
        return []
    save = r.i
    w = r.accept("time", "names", "schema", "role", "xml")
    if w == "time" and r.accept("zone"):
        if r.accept("local", "default"):
            _end(r)
            return [("timezone", None, is_local)]
        if r.accept("interval"):
            value = _value(r)
            r.i = len(r.t)
            return [("timezone", value, is_local)]
        value = _value(r)
        _end(r)
        return [("timezone", value, is_local)]
    if w == "names":
        if r.at_end() or r.accept("default"):
            _end(r)
            return [("client_encoding", None, is_local)]
        value = _value(r)
        _end(r)
        return [("client_encoding", value, is_local)]
    if w == "schema":
        value = _value(r)
        _end(r)
        return [("search_path", quote_ident(value), is_local)]
    if w == "role":
        if r.accept("none"):
            _end(r)
            return [("role", None, is_local)]
        value = _value(r)
        _end(r)
        return [("role", value, is_local)]
    if w == "xml" and r.accept("option"):
        value = r.expect("document", "content")
        _end(r)
        return [("xmloption", value, is_local)]
    r.i = save
    name = ".".join(r.qualified_name()).lower()
    tok = r.next()
    if not (tok.kind is T.OP and tok.value == "=") and word(tok) != "to":
        if word(tok) == "from" and r.accept("current"):
            raise Unsupported("SET ... FROM CURRENT is only allowed in function definitions")
        r.fail()
    if r.accept("default"):
        _end(r)
        return [(name, None, is_local)]
    values = [_value(r, list_quote=name in LIST_QUOTE_SETTINGS)]
    while r.accept_kind(T.COMMA):
        values.append(_value(r, list_quote=name in LIST_QUOTE_SETTINGS))
    _end(r)
    return [(name, ", ".join(values), is_local)]


def _parse_reset(r: _Reader) -> Setting:
    if r.accept("all"):
        name = "all"
    elif r.accept("time"):
        r.expect("zone")
        name = "timezone"
    elif r.accept("session"):
        r.expect("authorization")
        name = "session_authorization"
    elif r.accept("transaction"):
        r.expect("isolation")
        r.expect("level")
        name = "transaction_isolation"
    else:
        name = ".".join(r.qualified_name()).lower()
    _end(r)
    return (name, None, False)


def _transaction_modes(r: _Reader, prefix: str, is_local: bool) -> list[Setting]:
    out: list[Setting] = []
    while not r.at_end():
        if r.accept("isolation"):
            r.expect("level")
            w = r.expect("serializable", "repeatable", "read")
            if w == "repeatable":
                r.expect("read")
                level = "repeatable read"
            elif w == "read":
                level = "read " + r.expect("committed", "uncommitted")
            else:
                level = w
            out.append((prefix + "transaction_isolation", level, is_local))
        elif r.accept("read"):
            w = r.expect("only", "write")
            out.append((prefix + "transaction_read_only", "on" if w == "only" else "off", is_local))
        elif r.accept("not"):
            r.expect("deferrable")
            out.append((prefix + "transaction_deferrable", "off", is_local))
        elif r.accept("deferrable"):
            out.append((prefix + "transaction_deferrable", "on", is_local))
        elif not r.accept_kind(T.COMMA):
            r.fail()
    return out


def _value(r: _Reader, list_quote: bool = False) -> str:
    tok = r.next()
    if tok.kind in LITERALS:
        return quote_ident(tok.value) if list_quote else tok.value
    if tok.kind in (T.IDENT, T.QIDENT):
        name = truncate_identifier(tok.value)
        return quote_ident(name) if list_quote else name
    if tok.kind is T.OP and tok.value in "+-":
        num = r.next()
        if num.kind is not T.NUMBER:
            r.fail()
        return ("-" if tok.value == "-" else "") + num.value
    if tok.kind is T.NUMBER:
        return tok.value
    r.fail()
    return ""


def _end(r: _Reader) -> None:
    if not r.at_end():
        r.fail()


def ends_a_transaction_aside(sql: str) -> bool:
    """Whether a transaction statement may commit DDL without this session going idle: COMMIT AND
    CHAIN (the next block opens at once) or COMMIT/ROLLBACK PREPARED (of a transaction prepared by
    any session). A word is never split by a comment, so the words are enough; a false positive only
    reloads a schema once more.

    >>> [ends_a_transaction_aside(q) for q in ("COMMIT AND CHAIN", "COMMIT PREPARED 'x'", "COMMIT", "END")]
    [True, True, False, False]
    """
    low = sql.lower()
    return "chain" in low or "prepared" in low


# --- temporary relations ---------------------------------------------------------------------------------

_TEMP_WORDS = frozenset({"temp", "temporary"})
_INTO_WORDS = frozenset({"temp", "temporary", "unlogged", "table", "global", "local"})


def is_temp_schema(name: str) -> bool:
    """Whether a search_path entry or schema name is a temporary schema (the ``pg_temp`` alias or a
    ``pg_temp_N`` schema itself).

    >>> [is_temp_schema(n) for n in ("pg_temp", "pg_temp_3", "pg_temporal", "public")]
    [True, True, False, False]
    """
    return name == "pg_temp" or name.startswith("pg_temp_")


def temp_schema_listed_at(path: list[str]) -> int | None:
    """The earliest place in ``path`` (the search_path's entries) at which PostgreSQL may search the
    session's temporary schema; None when it is searched before all of them (and before pg_catalog).

    Only the ``pg_temp`` alias places it for sure: a ``pg_temp_N`` entry is the session's own temporary
    schema only if N is its number, which the proxy does not know; any other is skipped like a schema
    the role may not use (or that does not exist), and the session's temporary schema is then searched
    first, as when none is listed (5.9.3 "The Schema Search Path"; recomputeNamespacePath in
    catalog/namespace.c). With the alias listed, an own ``pg_temp_N`` before it would come earlier.

    >>> [temp_schema_listed_at(p) for p in (["crm"], ["crm", "pg_temp"], ["crm", "pg_temp_99"],
    ...                                     ["crm", "pg_temp_3", "public", "pg_temp"])]
    [None, 1, None, 1]
    """
    if "pg_temp" not in path:
        return None
    return next(i for i, s in enumerate(path) if is_temp_schema(s))


def temporary_relations(tokens: tuple[Token, ...] | list[Token], temp_first: bool) -> list[str] | None:
    """The names of the relations a DDL statement (or ``SELECT ... INTO``) may create in the session's
    temporary schema: ``[]`` when it creates none there, None when it may create one whose name these
    tokens do not tell. ``temp_first``: the search_path may make the temporary schema the one
    unqualified names are created in (pg_temp listed first; documentation 5.9.3, "The Schema Search
    Path": "the first schema in the search path is called the current schema ... new objects are
    created there"). A temporary relation is searched before every schema unless pg_temp is listed
    (the same section), where the proxy's loader, which cannot see another session's temporary
    schema, knows nothing of it.

    >>> from proxy.analysis.lexer import scan
    >>> temporary_relations(scan("CREATE TEMP TABLE IF NOT EXISTS Members (id int)"), False)
    ['members']
    >>> temporary_relations(scan('CREATE TABLE pg_temp."X" (id int)'), False), temporary_relations(scan("CREATE TABLE t (temp int)"), False)
    (['X'], [])
    >>> temporary_relations(scan("WITH q AS (SELECT 1 AS a) SELECT a INTO TEMPORARY TABLE notes FROM q"), False)
    ['notes']
    >>> temporary_relations(scan("CREATE VIEW v AS SELECT 1"), True), temporary_relations(scan("ALTER TABLE pg_temp.a RENAME TO b"), False)
    (['v'], None)
    >>> temporary_relations(scan("DROP TABLE pg_temp.a"), True), temporary_relations(scan("CREATE INDEX ON pg_temp.a (x)"), False)
    ([], [])
    >>> temporary_relations(scan("IMPORT FOREIGN SCHEMA crm FROM SERVER loop INTO pg_temp"), False) is None
    True
    >>> temporary_relations(scan("CREATE TABLE index (x int)"), True), temporary_relations(scan("CREATE UNIQUE INDEX i ON t (x)"), True)
    (['index'], [])
    """
    words = [word(t) for t in tokens]
    if not ({"create", "into", "rename"} & set(words)) or words[:2] == ["create", "index"] or words[:3] == [
            "create", "unique", "index"]:
        return []  # DROP, GRANT, COMMENT, CREATE INDEX ...: no relation one could read from (a table may be
        # named index: INDEX is an unreserved keyword, Appendix C)
    temp_named = any(w in _TEMP_WORDS for w in words) or any(
        t.kind in (T.IDENT, T.QIDENT) and is_temp_schema(t.value) for t in tokens)
    if not temp_named and not temp_first:
        return []
    unknown = None  # a form not read below (ALTER ... RENAME, CREATE ... AS EXECUTE into pg_temp ...)
    if words[0] == "import":  # IMPORT FOREIGN SCHEMA ... INTO pg_temp: the remote server names the tables
        return unknown if temp_named else []
    try:
        r = _Reader(tokens, "CREATE")
        if r.accept("create"):
            if r.accept("or"):
                r.expect("replace")
            r.accept("global", "local")
            temp = r.accept("temp", "temporary") is not None
            r.accept("unlogged")
            r.accept("recursive")
            if r.accept("table", "view", "sequence") is None:
                return unknown
            if r.accept("if"):
                r.expect("not")
                r.expect("exists")
        else:  # SELECT ... INTO: the first INTO outside parentheses
            depth, temp = 0, False
            while True:
                tok = r.next()
                depth += (tok.kind is T.LPAREN) - (tok.kind is T.RPAREN)
                if depth == 0 and word(tok) == "into":
                    break
            while (w := r.accept(*_INTO_WORDS)) is not None:
                temp = temp or w in _TEMP_WORDS
        parts = r.qualified_name()
    except Unsupported:
        return unknown
    if len(parts) > 1:
        return [parts[-1]] if is_temp_schema(parts[-2]) else []
    return parts if temp or temp_first else []


# --- EXPLAIN / PREPARE / EXECUTE / DECLARE / DEALLOCATE ------------------------------------------------------


def parse_explain(tokens: tuple[Token, ...] | list[Token]) -> tuple[bool, int]:
    """(whether EXPLAIN executes the statement, index of the explained statement's first token).

    >>> from proxy.analysis.lexer import scan
    >>> parse_explain(scan("EXPLAIN (ANALYZE true, BUFFERS) SELECT 1")), parse_explain(scan("EXPLAIN VERBOSE SELECT 1"))
    ((True, 7), (False, 2))
    """
    r = _Reader(tokens, "EXPLAIN")
    r.expect("explain")
    analyze = False
    if r.accept_kind(T.LPAREN):
        while True:
            opt = r.next()
            if opt.kind is not T.IDENT:
                r.fail()
            value: str | None = None
            nxt = r.peek()
            if nxt is not None and nxt.kind not in (T.COMMA, T.RPAREN):
                v = r.next()
                value = v.value.lower() if v.kind in (T.IDENT, T.NUMBER) or v.kind in LITERALS else None
                if value is None:
                    r.fail()
            if opt.value in ("analyze", "analyse"):
                if value in (None, "true", "on", "1", "yes"):
                    analyze = True
                elif value in ("false", "off", "0", "no"):
                    analyze = False
                else:
                    raise Unsupported(f"unrecognised EXPLAIN ANALYZE value {value}")
            if r.accept_kind(T.COMMA):
                continue
            if r.accept_kind(T.RPAREN):
                break
            r.fail()
    else:
        if r.accept("analyze", "analyse"):
            analyze = True
        r.accept("verbose")
    if r.at_end():
        r.fail()
    return analyze, r.i


def parse_prepare(tokens: tuple[Token, ...] | list[Token]) -> tuple[str, int]:
    """(prepared statement name, index of the prepared statement's first token).

    >>> from proxy.analysis.lexer import scan
    >>> parse_prepare(scan("PREPARE q1 (int, text) AS SELECT $1"))
    ('q1', 8)
    """
    r = _Reader(tokens, "PREPARE")
    r.expect("prepare")
    name = r.name()
    if r.accept_kind(T.LPAREN):
        depth = 1
        while depth:
            tok = r.next()
            depth += {T.LPAREN: 1, T.RPAREN: -1}.get(tok.kind, 0)
    r.expect("as")
    if r.at_end():
        r.fail()
    return name, r.i


def parse_execute(tokens: tuple[Token, ...] | list[Token]) -> tuple[str, tuple[int, int] | None]:
    """(prepared statement name, token range of the parenthesized arguments or None)."""
    r = _Reader(tokens, "EXECUTE")
    r.expect("execute")
    name = r.name()
    if r.at_end():
        return name, None
    if r.peek().kind is not T.LPAREN or tokens[-1].kind is not T.RPAREN:
        r.fail()
    return name, (r.i, len(tokens))


# Objects whose definition is code PostgreSQL runs later, and clauses that store an
# expression it evaluates later (or on every row now: ALTER ... TYPE ... USING).
_CODE_OBJECTS = frozenset({"function", "procedure", "trigger", "rule", "aggregate", "operator", "cast", "language",
                           "transform", "policy", "domain", "conversion"})
_CODE_CLAUSES = frozenset({"default", "check", "generated", "using", "execute"})


def ddl_code(tokens: tuple[Token, ...] | list[Token]) -> str | None:
    """What code a DDL statement defines or runs that the analysis cannot read, or None.

    Keywords are read from the tokens (a string or quoted identifier never counts); the
    reading errs on the side of finding code (``DROP DEFAULT`` counts). Expressions that
    PostgreSQL evaluates over the stored rows as the statement runs (index expressions and
    predicates, statistics expressions, exclusion constraints, a changed attribute type of
    typed tables) count, and so does an ALTER TABLE or CREATE UNIQUE INDEX whose reads of
    stored values (``ddl_reads``) cannot be told.

    >>> from proxy.analysis.lexer import scan
    >>> [ddl_code(scan(q)) for q in ("CREATE OR REPLACE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
    ...     "ALTER TABLE t ADD COLUMN y text DEFAULT f()", "CREATE INDEX ON t ((email::int))",
    ...     'CREATE TABLE t (a int, "default" text)', "COMMENT ON TABLE t IS 'a check'")]
    ['CREATE FUNCTION', 'a DEFAULT clause', 'an index expression', None, None]
    >>> [ddl_code(scan(q)) for q in ("CREATE INDEX i ON t (a) WHERE b::int > 0", "CREATE STATISTICS s ON (a || b) FROM t",
    ...     "CREATE STATISTICS s (ndistinct) ON a, b FROM t", "ALTER TABLE t ADD EXCLUDE (a WITH =)")]
    ['a partial-index predicate (WHERE)', 'a statistics expression', None, 'an exclusion constraint']
    """
    words = [t.value for t in tokens if t.kind is T.IDENT]
    if not words:
        return None
    if words[0] in ("create", "alter"):
        for w in words[1:5]:
            if w in _CODE_OBJECTS:
                return f"{words[0].upper()} {w.upper()}"
    index = words[0] == "create" and "index" in words[1:4]
    if words[0] in ("create", "alter"):
        for j, t in enumerate(tokens):
            if t.kind is T.IDENT and t.value in _CODE_CLAUSES:
                if index and t.value == "using" and _access_method_at(tokens, j + 1):
                    continue  # CREATE INDEX ... USING btree (...): the index's access method, no code
                return f"a {t.value.upper()} clause"
        found = _evaluated_expression(tokens, words)
        if found:
            return found
    if index:
        depth = 0
        skip = None  # the depth at which WITH (storage_parameter = value, ...) ends
        for k, t in enumerate(tokens):
            if t.kind is T.LPAREN:
                depth += 1
                if skip is None and depth == 1 and k and tokens[k - 1].is_word("with"):
                    skip = 0  # storage parameters are settings, not expressions
                elif depth > 1 and skip is None:
                    return "an index expression"
            elif t.kind is T.RPAREN:
                depth -= 1
                if skip is not None and depth == skip:
                    skip = None
            elif skip is not None:
                continue
            elif depth and t.kind is T.OP:
                return "an index expression"
            elif not depth and t.is_word("where"):  # evaluated on every stored row as the index is built
                return "a partial-index predicate (WHERE)"
    try:
        ddl_reads(tokens)
    except Unsupported as exc:
        return str(exc)
    return None


def _access_method_at(tokens: tuple[Token, ...] | list[Token], j: int) -> bool:
    """Whether tokens ``j``, ``j + 1`` are an access method's name and the ``(`` of the index's columns."""
    return (j + 1 < len(tokens) and tokens[j].kind in (T.IDENT, T.QIDENT) and tokens[j + 1].kind is T.LPAREN)


def _evaluated_expression(tokens: tuple[Token, ...] | list[Token], words: list[str]) -> str | None:
    """Expressions of a CREATE or ALTER that PostgreSQL evaluates over stored rows, keyword clauses aside."""
    for a, b in pairwise(tokens):
        if a.is_word("set") and b.is_word("expression"):  # ALTER COLUMN ... SET EXPRESSION AS (...)
            return "a generation expression (SET EXPRESSION)"
        if a.is_word("exclude") and (b.kind is T.LPAREN or b.is_word("using")):  # its operators and WHERE
            return "an exclusion constraint"
    if words[:2] == ["alter", "type"] and "attribute" in words and "type" in words[words.index("attribute"):]:
        # converts the values stored in the tables of the type (typed tables), which the analysis does not know
        return "ALTER TYPE ... ALTER ATTRIBUTE ... TYPE"
    if words[:2] == ["alter", "type"] and "rename" in words and "attribute" in words:
        # CASCADE renames the columns of the type's typed tables, which the analysis does not know
        return "ALTER TYPE ... RENAME ATTRIBUTE"
    if words[:2] == ["create", "statistics"]:
        # CREATE STATISTICS [IF NOT EXISTS] name [(kinds)] ON column, ... FROM table: anything but
        # column names between ON and FROM is an expression ANALYZE evaluates on the stored rows.
        depth, on = 0, None
        for j, t in enumerate(tokens):
            depth += {T.LPAREN: 1, T.RPAREN: -1}.get(t.kind, 0)
            if depth or t.kind is T.RPAREN:
                continue
            if on is None and t.is_word("on"):
                on = j
            elif on is not None and t.is_word("from"):
                if all(x.kind in (T.IDENT, T.QIDENT, T.COMMA) for x in tokens[on + 1:j]):
                    return None
                break
        return "a statistics expression"
    return None


@dataclass(frozen=True)
class DdlRead:
    """Stored values of a relation a DDL statement reads as it runs (and may show in its errors).

    ``columns`` None: every column of the relation. ``if_known``: only if the name is a relation
    the schema holds (ALTER INDEX ... RENAME renames whatever relation it names, usually an index,
    which the schema does not hold).
    """

    relation: list[str]
    columns: tuple[str, ...] | None
    use: Use
    if_known: bool = False


_ALTER_READ_WORDS = frozenset({"type", "unique", "primary", "foreign", "attach", "inherit", "rename", "schema"})


def ddl_reads(tokens: tuple[Token, ...] | list[Token]) -> list[DdlRead]:
    """The stored values an ALTER TABLE or CREATE UNIQUE INDEX reads as it runs.

    PostgreSQL reads them and names them in its errors: ALTER COLUMN ... TYPE converts
    every stored value of the column (a failed conversion repeats it), a new UNIQUE or
    PRIMARY KEY constraint or unique index shows a duplicated key, a new FOREIGN KEY a
    key missing from the referenced columns (which it compares), ATTACH PARTITION builds
    the partitioned table's indexes (unique or with expressions) over the attached table.
    ATTACH PARTITION and INHERIT also make every row of the table readable through its new
    parent, where the analysis (which knows no inheritance) would not look for them. RENAME
    and SET SCHEMA (of a table, foreign table, view or materialized view) give stored values
    another name, and the catalog categorises by name: ``billing.payment_methods.card_number``
    renamed ``method_id`` (not personal), or moved to a schema without ``personal_by_default``,
    would be read as what it is called then. So they read what they rename, like a copy would.
    Columns added by the same ALTER TABLE hold nothing stored yet and are left out.
    Raises ``Unsupported`` when the statement may read stored values but cannot be read.

    >>> from proxy.analysis.lexer import scan
    >>> [(r.relation, r.columns, r.use.name) for r in ddl_reads(scan(
    ...     "ALTER TABLE ONLY crm.t ADD COLUMN z int, ALTER COLUMN a SET DATA TYPE bigint, ADD UNIQUE (b, z)"))]
    [(['crm', 't'], ('a',), 'PROJECT'), (['crm', 't'], ('b',), 'PROJECT')]
    >>> [(r.relation, r.columns, r.use.name) for r in ddl_reads(scan("CREATE UNIQUE INDEX i ON t (lower(a), b)"))]
    [(['t'], ('b',), 'PROJECT')]
    >>> [(r.relation, r.columns) for r in ddl_reads(scan("ALTER TABLE t RENAME COLUMN a TO b"))]
    [(['t'], ('a',))]
    >>> [(r.relation, r.columns) for r in ddl_reads(scan("ALTER MATERIALIZED VIEW s.v SET SCHEMA x"))]
    [(['s', 'v'], None)]
    >>> ddl_reads(scan("ALTER TABLE t RENAME CONSTRAINT c TO d")), ddl_reads(scan("CREATE INDEX ON t (a)"))
    ([], [])
    """
    words = [t.value for t in tokens if t.kind is T.IDENT]
    if len(words) < 3:
        return []
    if words[:2] == ["alter", "index"] and "rename" in words:
        # PostgreSQL lets ALTER INDEX rename any relation, a table too (RenameRelation)
        r = _Reader(tokens, "ALTER INDEX")
        r.expect("alter")
        r.expect("index")
        if r.accept("if"):
            r.expect("exists")
        rel = r.qualified_name()
        return [DdlRead(rel, None, Use.PROJECT, if_known=True)] if r.accept("rename") else []
    if words[0] == "alter" and (words[1] in ("table", "view")
                                or words[1:3] in (["foreign", "table"], ["materialized", "view"])):
        if not _ALTER_READ_WORDS.intersection(words[2:]):
            return []
        read, what = _alter_table_reads, "an ALTER TABLE"
    elif words[0] == "create" and words[1:3] == ["unique", "index"]:
        read, what = _unique_index_reads, "a CREATE UNIQUE INDEX"
    else:
        return []
    try:
        return read(tokens)
    except Unsupported as exc:
        if str(exc).startswith("cannot read "):  # a _Reader's failure
            raise Unsupported(f"{what} whose reads of stored values the analysis cannot tell") from None
        raise


def _alter_table_reads(tokens: tuple[Token, ...] | list[Token]) -> list[DdlRead]:
    r = _Reader(tokens, "ALTER TABLE")
    r.expect("alter")
    if r.accept("foreign"):
        r.expect("table")
    elif r.accept("materialized"):
        r.expect("view")
    else:
        r.expect("table", "view")
    if r.accept("if"):
        r.expect("exists")
    r.accept("only")
    rel = r.qualified_name()
    if (star := r.peek()) is not None and star.kind is T.OP and star.value == "*":
        r.next()
    actions: list[list[Token]] = [[]]
    depth = 0
    for tok in r.t[r.i:]:
        depth += {T.LPAREN: 1, T.RPAREN: -1}.get(tok.kind, 0)
        if depth == 0 and tok.kind is T.COMMA:
            actions.append([])
        else:
            actions[-1].append(tok)
    reads: list[DdlRead] = []
    added: set[str] = set()
    for action in actions:
        a = _Reader(action, "ALTER TABLE")
        if a.accept("alter"):
            if a.accept("constraint"):
                continue
            a.accept("column")
            column = a.name()
            if a.accept("type") or (a.accept("set") and a.accept("data") and a.expect("type")):
                reads.append(DdlRead(rel, (column,), Use.PROJECT))  # converts every stored value
        elif a.accept("add"):
            if a.accept("constraint"):
                a.name()
            w = a.accept("unique", "primary", "foreign", "check", "exclude")
            if w in ("unique", "primary"):
                if w == "primary":
                    a.expect("key")
                if a.accept("nulls"):
                    a.accept("not")
                    a.expect("distinct")
                if a.peek() is not None and a.peek().kind is T.LPAREN:  # not USING INDEX
                    reads.append(DdlRead(rel, tuple(_name_list(a)), Use.PROJECT))  # shows a duplicated key
            elif w == "foreign":
                a.expect("key")
                columns = _name_list(a)
                a.expect("references")
                target = a.qualified_name()
                if a.peek() is None or a.peek().kind is not T.LPAREN:
                    raise Unsupported("a FOREIGN KEY that does not name the referenced columns")
                reads.append(DdlRead(rel, tuple(columns), Use.PROJECT))  # shows a key found missing
                reads.append(DdlRead(target, tuple(_name_list(a)), Use.FILTER))  # which it looks up
            elif w is None and not a.at_end():
                a.accept("column")
                if a.accept("if"):
                    a.expect("not")
                    a.expect("exists")
                added.add(a.name())
        elif a.accept("attach"):
            a.expect("partition")
            # builds the partitioned table's indexes over the attached table, whose rows it then returns
            reads.append(DdlRead(a.qualified_name(), None, Use.PROJECT))
        elif a.accept("inherit"):
            # the parent then returns the rows too, and the analysis takes it for a table of its own
            reads.append(DdlRead(rel, None, Use.PROJECT))
        elif a.accept("rename"):
            if a.accept("to"):  # every column now belongs to a relation of another name
                reads.append(DdlRead(rel, None, Use.PROJECT))
            elif not a.accept("constraint"):
                a.accept("column")
                reads.append(DdlRead(rel, (a.name(),), Use.PROJECT))
        elif a.accept("set") and a.accept("schema"):  # ... and to a relation of another schema
            reads.append(DdlRead(rel, None, Use.PROJECT))
    out = []
    for read in reads:
        if read.relation == rel and read.columns is not None:
            kept = tuple(c for c in read.columns if c not in added)
            if not kept:
                continue
            read = DdlRead(read.relation, kept, read.use)
        out.append(read)
    return out


def renamed_schema(tokens: tuple[Token, ...] | list[Token]) -> str | None:
    """The schema an ``ALTER SCHEMA name RENAME TO new`` renames (every relation in it then goes by
    another qualified name, as with ``ALTER TABLE ... SET SCHEMA``), else None.

    >>> from proxy.analysis.lexer import scan
    >>> renamed_schema(scan("ALTER SCHEMA billing RENAME TO old_billing")), renamed_schema(scan("ALTER SCHEMA s OWNER TO x"))
    ('billing', None)
    """
    r = _Reader(tokens, "ALTER SCHEMA")
    if not (r.accept("alter") and r.accept("schema")):
        return None
    name = r.name()
    return name if r.accept("rename") else None


def _name_list(r: _Reader) -> list[str]:
    """``( name [, ...] )``"""
    if not r.accept_kind(T.LPAREN):
        r.fail()
    names = [r.name()]
    while r.accept_kind(T.COMMA):
        names.append(r.name())
    if not r.accept_kind(T.RPAREN):
        r.fail()
    return names


def _unique_index_reads(tokens: tuple[Token, ...] | list[Token]) -> list[DdlRead]:
    """CREATE UNIQUE INDEX [CONCURRENTLY] [[IF NOT EXISTS] name] ON [ONLY] table [USING method] (element, ...):
    the plain columns of its key (expressions are code: ``ddl_code``)."""
    r = _Reader(tokens, "CREATE UNIQUE INDEX")
    r.expect("create")
    r.expect("unique")
    r.expect("index")
    r.accept("concurrently")
    if not r.accept("on"):
        if r.accept("if"):
            r.expect("not")
            r.expect("exists")
        r.name()
        r.expect("on")
    r.accept("only")
    rel = r.qualified_name()
    if r.accept("using"):
        r.name()
    if not r.accept_kind(T.LPAREN):
        r.fail()
    elements: list[list[Token]] = [[]]
    depth = 1
    while depth:
        tok = r.next()
        depth += {T.LPAREN: 1, T.RPAREN: -1}.get(tok.kind, 0)
        if depth == 1 and tok.kind is T.COMMA:
            elements.append([])
        elif depth:
            elements[-1].append(tok)
    columns = []
    for el in elements:
        if not el:
            r.fail()
        if el[0].kind in (T.IDENT, T.QIDENT) and (len(el) == 1 or el[1].kind not in (T.LPAREN, T.DOT)):
            columns.append(truncate_identifier(el[0].value))
    if not columns:
        return []
    return [DdlRead(rel, tuple(columns), Use.PROJECT)]  # building it shows a duplicated key


def parse_declare(tokens: tuple[Token, ...] | list[Token]) -> tuple[str, int, bool]:
    """(cursor name, index of the cursor query's first token, whether it is WITH HOLD).

    Read from the tokens, so a comment between WITH and HOLD changes nothing:

    >>> from proxy.analysis.lexer import scan
    >>> parse_declare(scan("DECLARE c CURSOR WITH/**/HOLD FOR SELECT 1"))
    ('c', 6, True)
    """
    r = _Reader(tokens, "DECLARE")
    r.expect("declare")
    name = r.name()
    while r.accept("binary", "asensitive", "insensitive", "no", "scroll"):
        pass
    r.expect("cursor")
    held = r.accept("with", "without")
    if held:
        r.expect("hold")
    r.expect("for")
    if r.at_end():
        r.fail()
    return name, r.i, held == "with"


def parse_fetch(tokens: tuple[Token, ...] | list[Token]) -> str | None:
    """The cursor a FETCH reads (``FETCH [direction] [FROM | IN] name``: the last token), None if unreadable.

    It only attributes the FETCH's rows to its cursor's query (audit); the FETCH is allowed either way.

    >>> from proxy.analysis.lexer import scan
    >>> parse_fetch(scan('FETCH FORWARD 5 FROM "Rows"')), parse_fetch(scan("FETCH c")), parse_fetch(scan("FETCH"))
    ('Rows', 'c', None)
    """
    if len(tokens) < 2 or tokens[-1].kind not in (T.IDENT, T.QIDENT):
        return None
    return truncate_identifier(tokens[-1].value)


def parse_deallocate(tokens: tuple[Token, ...] | list[Token]) -> str | None:
    """The prepared statement DEALLOCATE drops, or None for DEALLOCATE ALL."""
    r = _Reader(tokens, "DEALLOCATE")
    r.expect("deallocate")
    r.accept("prepare")
    if r.accept("all"):
        _end(r)
        return None
    name = r.name()
    _end(r)
    return name


# --- COPY / TRUNCATE -----------------------------------------------------------------------------------------


@dataclass
class CopySpec:
    direction: str  # "to" | "from"
    relation: list[str] | None  # qualified name parts, or None for COPY (query)
    columns: list[str] | None
    query: tuple[int, int] | None  # token range of the query inside the parentheses
    where: tuple[int, int] | None  # token range of a COPY FROM ... WHERE condition


def parse_copy(tokens: tuple[Token, ...] | list[Token]) -> CopySpec:
    """Read COPY: what it copies, in which direction; refuses server files and programs.

    >>> from proxy.analysis.lexer import scan
    >>> parse_copy(scan("COPY crm.members (email) TO STDOUT WITH (FORMAT csv)"))
    CopySpec(direction='to', relation=['crm', 'members'], columns=['email'], query=None, where=None)
    """
    r = _Reader(tokens, "COPY")
    r.expect("copy")
    r.accept("binary")
    relation = columns = query = None
    if r.accept_kind(T.LPAREN):
        start = r.i
        depth = 1
        while depth:
            tok = r.next()
            depth += {T.LPAREN: 1, T.RPAREN: -1}.get(tok.kind, 0)
        query = (start, r.i - 1)
    else:
        relation = r.qualified_name()
        if r.accept_kind(T.LPAREN):
            columns = [r.name()]
            while r.accept_kind(T.COMMA):
                columns.append(r.name())
            if not r.accept_kind(T.RPAREN):
                r.fail()
    direction = r.expect("to", "from")
    if query is not None and direction == "from":
        r.fail()
    target = r.peek()
    if word(target) == "program":
        raise Unsupported("COPY to or from a program runs it on the server")
    if target is not None and target.kind in LITERALS:
        raise Unsupported("COPY to or from a server file is not supported by the analysis")
    r.expect("stdout" if direction == "to" else "stdin")
    where = None
    depth = 0
    for j in range(r.i, len(tokens)):
        tok = tokens[j]
        depth += {T.LPAREN: 1, T.RPAREN: -1}.get(tok.kind, 0)
        if depth == 0 and tok.is_word("where"):
            if direction != "from" or j + 1 >= len(tokens):
                r.fail()
            where = (j + 1, len(tokens))
            break
    return CopySpec(direction, relation, columns, query, where)


def parse_truncate(tokens: tuple[Token, ...] | list[Token]) -> list[list[str]]:
    """The relations TRUNCATE empties; CASCADE (which empties unnamed tables too) is refused."""
    r = _Reader(tokens, "TRUNCATE")
    r.expect("truncate")
    r.accept("table")
    names = []
    while True:
        r.accept("only")
        names.append(r.qualified_name())
        tok = r.peek()
        if tok is not None and tok.kind is T.OP and tok.value == "*":
            r.next()
        if not r.accept_kind(T.COMMA):
            break
    while not r.at_end():
        w = r.expect("restart", "continue", "identity", "cascade", "restrict")
        if w == "cascade":
            raise Unsupported("TRUNCATE ... CASCADE also empties the tables that reference these, which the "
                              "analysis does not know")
    return names


def parse_refresh(tokens: tuple[Token, ...] | list[Token]) -> tuple[list[str], bool]:
    """(materialized view name, whether it is populated) for REFRESH MATERIALIZED VIEW."""
    r = _Reader(tokens, "REFRESH")
    r.expect("refresh")
    r.expect("materialized")
    r.expect("view")
    r.accept("concurrently")
    name = r.qualified_name()
    data = True
    if r.accept("with"):
        data = not r.accept("no")
        r.expect("data")
    _end(r)
    return name, data


# --- DDL ------------------------------------------------------------------------------------------------------


def ddl_query(tokens: tuple[Token, ...] | list[Token]) -> tuple[int, int] | None:
    """The token range of the query a CREATE TABLE/VIEW/MATERIALIZED VIEW ... AS defines, if any.

    >>> from proxy.analysis.lexer import scan
    >>> ddl_query(scan("CREATE MATERIALIZED VIEW v AS SELECT 1 WITH NO DATA"))
    (5, 7)
    """
    r = _Reader(tokens, "CREATE")
    if not r.accept("create"):
        return None
    if r.accept("or"):
        r.expect("replace")
    while r.accept("global", "local", "temp", "temporary", "unlogged", "recursive"):
        pass
    w = r.accept("table", "view", "materialized")
    if w is None:
        return None
    if w == "materialized":
        r.expect("view")
    depth = 0
    for j in range(r.i, len(tokens)):
        tok = tokens[j]
        depth += {T.LPAREN: 1, T.RPAREN: -1}.get(tok.kind, 0)
        if depth == 0 and tok.is_word("as") and j + 1 < len(tokens):
            nxt = tokens[j + 1]
            if word(nxt) == "execute":
                raise Unsupported("CREATE TABLE ... AS EXECUTE is not supported by the analysis")
            if word(nxt) in QUERY_WORDS or nxt.kind is T.LPAREN:
                end = len(tokens)
                tail = [word(t) for t in tokens[-4:]]
                if tail[-2:] == ["with", "data"]:
                    end -= 2
                elif tail[-3:] == ["with", "no", "data"]:
                    end -= 3
                elif tail[-3:] == ["with", "check", "option"]:
                    end -= 3
                elif tail[-4:] in (["with", "cascaded", "check", "option"], ["with", "local", "check", "option"]):
                    end -= 4
                return j + 1, end
    return None


def called_names(tokens: tuple[Token, ...] | list[Token]) -> list[str]:
    """Names immediately followed by "(" (calls, but also type modifiers and column lists)."""
    out = []
    for a, b in zip(tokens, tokens[1:]):
        if b.kind is T.LPAREN and a.kind in (T.IDENT, T.QIDENT):
            out.append(truncate_identifier(a.value))
    return out
