"""Turning one lexed statement into a sqlglot tree without letting sqlglot re-read literals or comments.

sqlglot's own tokenizer is close to PostgreSQL's but not the same (``U&""``
identifiers, strings continued across lines, non-ASCII whitespace, ...). So the
statement's literals, quoted identifiers and comments come from
``proxy.analysis.lexer``; sqlglot's tokenizer only sees the code between them,
and every identifier it produces must line up with an identifier of the
PostgreSQL lexer. Anything that does not line up, does not parse, or parses into
sqlglot's opaque ``exp.Command`` fallback raises ``Unparsable``.
"""

from __future__ import annotations

import logging
import re

from sqlglot import exp
from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import ErrorLevel, ParseError, TokenError
from sqlglot.tokens import Token as SqlglotToken
from sqlglot.tokens import TokenType

from proxy.analysis.lexer import T, Token, truncate_identifier

DIALECT = Postgres()
_TOKENIZER_CLS = Postgres.Tokenizer
_CODE_KINDS = frozenset({T.IDENT, T.OP, T.LPAREN, T.RPAREN, T.LBRACKET, T.RBRACKET, T.COMMA, T.DOT})
# (ids: sqlglot's TokenType hashes its members in Python code, and this runs for every token)
_UNEXPECTED_IN_CODE = {id(t) for t in (
    TokenType.STRING, TokenType.IDENTIFIER, TokenType.HEREDOC_STRING, TokenType.BYTE_STRING,
    TokenType.NATIONAL_STRING, TokenType.RAW_STRING, TokenType.BIT_STRING, TokenType.HEX_STRING,
    TokenType.UNICODE_STRING, TokenType.UNKNOWN,
)}



def _no_command_fallback_warning(record: logging.LogRecord) -> bool:
    """sqlglot warns whenever it falls back to exp.Command; the analysis reports that case itself."""
    return "Falling back to parsing as a 'Command'" not in record.getMessage()


logging.getLogger("sqlglot").addFilter(_no_command_fallback_warning)


class Unparsable(ValueError):
    """The statement cannot be turned into a tree the analysis can trust."""


def to_sqlglot_tokens(text: str, tokens: tuple[Token, ...] | list[Token]) -> list[SqlglotToken]:
    r"""sqlglot tokens for a statement: literals from the PostgreSQL lexer, code from sqlglot's tokenizer.

    sqlglot's tokenizer runs over the statement with every comment blanked out and
    every literal, quoted identifier, number and parameter replaced by a same-length
    placeholder word; each placeholder then becomes the token the PostgreSQL lexer
    read there. Most statements take a shortcut to the same tokens (``_direct_tokens``).

    >>> from proxy.analysis.lexer import scan
    >>> sql = 'SELECT U&"\\0061" FROM t'
    >>> [(t.token_type.name, t.text) for t in to_sqlglot_tokens(sql, scan(sql))]
    [('SELECT', 'SELECT'), ('IDENTIFIER', 'a'), ('FROM', 'FROM'), ('VAR', 't')]
    """
    out = _direct_tokens(text, tokens) if _DIRECT else None
    if out is None:
        out = _tokens_via_sqlglot(text, tokens)
    if "[" in text:  # (only an array suffix needs it)
        out = _object_identifier_arrays(out)
    return out


def _tokens_via_sqlglot(text: str, tokens: tuple[Token, ...] | list[Token]) -> list[SqlglotToken]:
    """``to_sqlglot_tokens`` the long way: sqlglot's tokenizer over the blanked statement, checked token by token."""
    code = _CODE_KINDS
    pieces: list[str] = []
    starting: dict[int, int] = {}  # offset -> index of the PostgreSQL token starting there
    ending: dict[int, int] = {}  # offset -> index of the PostgreSQL token ending there
    pos = 0
    for k, t in enumerate(tokens):
        a, b = t.start, t.end
        if a > pos:
            pieces.append(" " * (a - pos))
        if t.kind in code:
            if not t.text.isascii() and any(c.isspace() for c in t.text):
                # PostgreSQL takes every non-ASCII character for part of a name; sqlglot takes
                # U+00A0, U+3000, U+0085, ... for spaces, and then reads "order\u3000by" (a
                # table alias to PostgreSQL) as ORDER BY.
                raise Unparsable(f"the name {t.text!r} holds a character the analysis would read as a space")
            pieces.append(text[a:b])
        else:
            pieces.append("_" * (b - a))
        starting[a] = k
        ending[b] = k
        pos = b
    pieces.append(" " * (len(text) - pos))
    blanked = "".join(pieces)
    try:
        stoks = _TOKENIZER_CLS(dialect=DIALECT).tokenize(blanked)
    except TokenError as exc:
        raise Unparsable(f"cannot tokenize: {exc}") from None
    # Every sqlglot token must begin and end where a PostgreSQL token begins and ends (it
    # may span several code tokens, e.g. the keyword ORDER BY, but a literal only alone),
    # and every PostgreSQL token must lie in a sqlglot token: then both read the same
    # identifiers.
    covered = 0
    out: list[SqlglotToken] = []
    for st in stoks:
        a, b = st.start, st.end + 1
        first, last = starting.get(a), ending.get(b)
        if id(st.token_type) in _UNEXPECTED_IN_CODE or first is None or last is None or last < first:
            raise Unparsable(f"the analysis reads {blanked[a:b]!r} differently from PostgreSQL")
        covered += last - first + 1
        if first == last and tokens[first].kind not in code:
            out.extend(_literal_tokens(tokens[first]))
        elif first == last or all(tokens[k].kind in code for k in range(first, last + 1)):
            out.append(st)
        else:
            raise Unparsable(f"the analysis reads {text[a:b]!r} differently from PostgreSQL")
    if covered != len(tokens):
        raise Unparsable("the analysis reads the statement's code differently from PostgreSQL")
    return out


# --- the shortcut: sqlglot's tokens straight from the PostgreSQL lexer's -----------------------------------
#
# sqlglot's tokenizer reads the blanked statement as three kinds of pieces: words (a key word's
# type, else VAR), runs of operator and punctuation characters (the longest key words of its
# table, e.g. "<>", "::", else one token per character) and placeholders (one VAR each). What
# it makes of a word or a run depends on that piece alone, with the exceptions that
# _direct_tokens leaves to _tokens_via_sqlglot: two-word key words ("ORDER BY", read here from
# the table below), a word or placeholder touching another one, a word after "@", command key
# words, anything not plain ASCII. Each distinct piece is tokenized once by sqlglot itself and
# remembered. The table is checked when the module loads (_direct_table); if sqlglot's rules
# are not the ones relied on, every statement takes the long way.

_PG_SYMBOLS = "~!@#^&|`?+-*/%<>=:()[],."  # every character of an OP or punctuation token
_SYMBOL_KINDS = frozenset({T.OP, T.LPAREN, T.RPAREN, T.LBRACKET, T.RBRACKET, T.COMMA, T.DOT})
_PLACEHOLDER_KINDS = frozenset({T.QIDENT, T.STRING, T.BITSTRING, T.HEXSTRING, T.NUMBER, T.PARAM})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEMO_LIMIT = 20000  # remembered words and runs (beyond that they are tokenized each time)
_PIECES: dict[str, tuple[tuple[TokenType, str, int, int], ...] | None] = {}


def _direct_table() -> tuple[bool, dict[str, dict[str, TokenType]], frozenset[str]]:
    """Whether the shortcut applies to this sqlglot, its two-word key words (first word -> second
    word -> type) and the words that begin a key word going on with a symbol ("USER-DEFINED")."""
    tok = _TOKENIZER_CLS
    keys: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for ch, sub in node.items():
            if ch == 0:
                keys.append(prefix)
            else:
                walk(sub, prefix + ch)

    walk(tok._KEYWORD_TRIE, "")
    pairs: dict[str, dict[str, TokenType]] = {}
    touching: set[str] = set()
    ok = all(c in tok.SINGLE_TOKENS and c not in tok.VAR_SINGLE_TOKENS for c in _PG_SYMBOLS)
    for key in keys:
        if "'" in key or '"' in key:
            continue  # never met: quotes are inside literals, which the blanked text does not hold
        if _WORD.match(key) is None:  # operators: symbols only, so a run never goes on into a word
            ok = ok and not any(c.isalnum() or c == "_" or c.isspace() for c in key)
        elif re.fullmatch(r"[A-Z_]+ [A-Z_]+", key):
            first, second = key.split(" ")
            ok = ok and not any(k != key and k.startswith(key) for k in keys)
            pairs.setdefault(first, {})[second] = tok.KEYWORDS[key]
        elif " " not in key:
            touching.add(_WORD.match(key).group(0))
        else:
            ok = False
    return ok, pairs, frozenset(touching)


_DIRECT, _PAIRS, _TOUCHING = _direct_table()
_COMMAND_TYPES = frozenset(_TOKENIZER_CLS.COMMANDS)
_COMMAND_PREFIXES = frozenset(_TOKENIZER_CLS.COMMAND_PREFIX_TOKENS)


def _piece(piece: str) -> tuple[tuple[TokenType, str, int, int], ...] | None:
    """sqlglot's tokens for one word or run on its own: (type, text, start, end) each, or None when it
    reads it as something the shortcut does not take (a type unexpected in code, a comment)."""
    found = _PIECES.get(piece, False)
    if found is not False:
        return found  # type: ignore[return-value]
    try:
        toks = _TOKENIZER_CLS(dialect=DIALECT).tokenize(piece)
    except TokenError:
        toks = None
    out = None
    if toks and not any(id(t.token_type) in _UNEXPECTED_IN_CODE or t.comments for t in toks):
        out = tuple((t.token_type, t.text, t.start, t.end) for t in toks)
    if len(_PIECES) < _MEMO_LIMIT:
        _PIECES[piece] = out
    return out


# word -> (type, text, two-word first word's seconds or None, touching) or None (not for the shortcut)
_WORDS: dict[str, tuple[TokenType, str, dict[str, TokenType] | None, bool] | None] = {}


def _word(word: str) -> tuple[TokenType, str, dict[str, TokenType] | None, bool] | None:
    found = _WORDS.get(word, False)
    if found is not False:
        return found  # type: ignore[return-value]
    out = None
    if _WORD.fullmatch(word):
        toks = _piece(word)
        if toks is not None and len(toks) == 1 and toks[0][2] == 0 and toks[0][3] == len(word) - 1:
            upper = word.upper()
            out = (toks[0][0], toks[0][1], _PAIRS.get(upper), upper in _TOUCHING)
    if len(_WORDS) < _MEMO_LIMIT:
        _WORDS[word] = out
    return out


def _direct_tokens(text: str, tokens: tuple[Token, ...] | list[Token]) -> list[SqlglotToken] | None:
    """The tokens ``_tokens_via_sqlglot`` makes, built from the PostgreSQL lexer's tokens, or None when
    the statement holds something only sqlglot's tokenizer can tell (see above)."""
    out: list[SqlglotToken] = []
    add = out.append
    IDENT, PARAMETER = T.IDENT, TokenType.PARAMETER
    symbols, placeholders, commands, words, pieces = _SYMBOL_KINDS, _PLACEHOLDER_KINDS, _COMMAND_TYPES, _WORDS, _PIECES
    n = len(tokens)
    prev_end = -1
    prev_type = None  # the type of the last token made
    prev_wordish = False  # the previous token was a word or a placeholder (no gap may follow it)
    i = 0
    while i < n:
        tok = tokens[i]
        kind, a, b = tok[0], tok[1], tok[2]
        if kind is IDENT:
            if (prev_wordish and a == prev_end) or prev_type is PARAMETER:
                return None
            w = words.get(tok[4], False)
            if w is False:
                w = _word(tok[4])
            if w is None:
                return None
            tt, ttext, seconds, touching = w
            if seconds is not None and i + 1 < n:
                nxt = tokens[i + 1]
                if nxt[1] > b and nxt[0] is IDENT:
                    # the first word of a two-word key word, then a gap and a word: sqlglot reads on into it
                    w2 = words.get(nxt[4], False)
                    if w2 is False:
                        w2 = _word(nxt[4])
                    if w2 is None:
                        return None
                    second = nxt[4].upper()
                    pair = seconds.get(second)
                    if pair is not None:  # "ORDER BY": one token over both words
                        if i + 2 < n and tokens[i + 2][1] == nxt[2] and tokens[i + 2][0] not in symbols:
                            return None
                        b = nxt[2]
                        add(SqlglotToken(pair, f"{tok[4].upper()} {second}", 1, b, a, b - 1))
                        prev_end, prev_type, prev_wordish = b, pair, True
                        i += 2
                        continue
                    # else sqlglot stops inside the second word or after it, having met no key word:
                    # the first word is read on its own
            elif touching and i + 1 < n and tokens[i + 1][1] == b:
                return None
            if tt in commands and (prev_type is None or prev_type in _COMMAND_PREFIXES):
                return None  # sqlglot reads the rest of the statement as the command's text
            add(SqlglotToken(tt, ttext, 1, b, a, b - 1))
            prev_type = tt
            prev_wordish = True
        elif kind in symbols:
            j = i + 1
            if j < n and tokens[j][1] == b and tokens[j][0] in symbols:  # a run of several
                ends = {b}
                while j < n and tokens[j][1] == b and tokens[j][0] in symbols:
                    b = tokens[j][2]
                    ends.add(b)
                    j += 1
                found = _piece(text[a:b])
                if found is None:
                    return None
                for tt, ttext, s, e in found:
                    if tt in commands or (s != 0 and a + s not in ends) or a + e + 1 not in ends:
                        return None  # a token that does not end where a PostgreSQL token ends
                    add(SqlglotToken(tt, ttext, 1, a + e + 1, a + s, a + e))
                i = j - 1
            else:
                found = pieces.get(tok[4], False)
                if found is False:
                    found = _piece(tok[4])
                if found is None or len(found) != 1:
                    return None
                tt, ttext, s, e = found[0]
                if tt in commands or s != 0 or e != b - a - 1:
                    return None
                add(SqlglotToken(tt, ttext, 1, b, a, b - 1))
            prev_type = tt
            prev_wordish = False
        elif kind in placeholders and not (prev_wordish and a == prev_end):
            lit = _literal_tokens(tok)
            out.extend(lit)
            prev_type = lit[-1].token_type
            prev_wordish = True
        else:
            return None
        prev_end = b
        i += 1
    return out


def _object_identifier_arrays(out: list[SqlglotToken]) -> list[SqlglotToken]:
    """Let ``oid[]``, ``regclass[]`` and the other OID alias types take an array suffix.

    sqlglot parses ``x::oid`` but not ``x::oid[]`` (asyncpg's type introspection sends
    ``$1::oid[]``): before ``[]`` such a type name is read as an integer type, which
    sqlglot takes with an array suffix. For the analysis the two are alike (an array
    of OIDs reads no data), and rewrites edit the original text, which keeps ``oid``.

    >>> from proxy.analysis.lexer import scan
    >>> sql = "SELECT $1::oid[]"
    >>> [t.token_type.name for t in to_sqlglot_tokens(sql, scan(sql))][-4:]
    ['DCOLON', 'BIGINT', 'L_BRACKET', 'R_BRACKET']
    """
    for i in range(len(out) - 2):
        t = out[i]
        if (t.token_type is TokenType.OBJECT_IDENTIFIER and out[i + 1].token_type is TokenType.L_BRACKET
                and out[i + 2].token_type is TokenType.R_BRACKET):
            out[i] = SqlglotToken(TokenType.BIGINT, t.text, line=t.line, col=t.col, start=t.start, end=t.end)
    return out


_LITERAL_TYPES = {T.QIDENT: TokenType.IDENTIFIER, T.STRING: TokenType.STRING, T.BITSTRING: TokenType.BIT_STRING,
                  T.HEXSTRING: TokenType.HEX_STRING, T.NUMBER: TokenType.NUMBER}


def _literal_tokens(tok: Token) -> list[SqlglotToken]:
    col = tok.start + 1
    if tok.kind is T.PARAM:
        return [SqlglotToken(TokenType.PARAMETER, "$", line=1, col=col, start=tok.start, end=tok.start),
                SqlglotToken(TokenType.NUMBER, tok.value[1:], line=1, col=col + 1, start=tok.start + 1,
                             end=tok.end - 1)]
    tt = _LITERAL_TYPES.get(tok.kind)
    if tt is None:  # pragma: no cover - SEMI never reaches here (statements are split)
        raise Unparsable(f"unexpected token {tok.text!r}")
    return [SqlglotToken(tt, tok.value, line=1, col=col, start=tok.start, end=tok.end - 1)]


def parse_statement(text: str, tokens: tuple[Token, ...] | list[Token]) -> exp.Expr:
    """Parse one statement (no trailing semicolon) into a sqlglot tree, or raise ``Unparsable``.

    >>> from proxy.analysis.lexer import scan
    >>> parse_statement("SELECT email FROM crm.members", scan("SELECT email FROM crm.members")).sql()
    'SELECT email FROM crm.members'
    """
    stoks = to_sqlglot_tokens(text, tokens)
    parser = DIALECT.parser(error_level=ErrorLevel.RAISE)
    try:
        trees = parser.parse(stoks, text)
    except (ParseError, TokenError) as exc:
        msg = str(exc).split("\n")[0]
        raise Unparsable(f"cannot parse the statement: {msg}") from None
    except RecursionError:
        raise Unparsable("the statement is nested too deeply") from None
    except (AssertionError, AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
        # sqlglot tripping over syntax it does not expect (its own checks included)
        raise Unparsable(f"cannot parse the statement (the parser failed: {type(exc).__name__})") from None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        raise Unparsable("cannot parse the statement")
    tree = trees[0]
    names, command = _names_in(tree)
    if command:
        raise Unparsable("cannot parse the statement (syntax the analysis does not understand)")
    lost = _missing(tokens, names)
    if lost:
        raise Unparsable(f"the analysis lost the name {lost[0]} while parsing the statement")
    return tree


# PostgreSQL's key words (pg_get_keywords() of PostgreSQL 15, plus a few of later versions) and
# built-in type names: words that may appear in a statement without being names in its tree.
PG_KEYWORDS = frozenset("""
    abort absent absolute access action add admin after aggregate all also alter always analyse analyze and
    any array as asc asensitive assertion assignment asymmetric at atomic attach attribute authorization
    backward before begin between bigint binary bit boolean both breadth by cache call called cascade cascaded
    case cast catalog chain char character characteristics check checkpoint class close cluster coalesce
    collate collation column columns comment comments commit committed compression concurrently configuration
    conflict connection constraint constraints content continue conversion copy cost create cross csv cube
    current current_catalog current_date current_role current_schema current_time current_timestamp
    current_user cursor cycle data database day deallocate dec decimal declare default defaults deferrable
    deferred definer delete delimiter delimiters depends depth desc detach dictionary disable discard distinct
    do document domain double drop each else enable encoding encrypted end enum escape event except exclude
    excluding exclusive execute exists explain expression extension external extract false family fetch filter
    finalize first float following for force foreign format forward freeze from full function functions
    generated global grant granted greatest group grouping groups handler having header hold hour identity if
    ilike immediate immutable implicit import in include including increment index indexes inherit inherits
    initially inline inner inout input insensitive insert instead int integer intersect interval into invoker
    is isnull isolation join json json_array json_arrayagg json_object json_objectagg json_scalar
    json_serialize key keys label language large last lateral leading leakproof least left level like limit
    listen load local localtime localtimestamp location lock locked logged mapping match matched materialized
    maxvalue merge method minute minvalue mode month move name names national natural nchar new next nfc nfd
    nfkc nfkd no none normalize normalized not nothing notify notnull nowait null nullif nulls numeric object
    of off offset oids old on only operator option options or order ordinality others out outer over overlaps
    overlay overriding owned owner parallel parameter parser partial partition passing password placing plans
    policy position preceding precision prepare prepared preserve primary prior privileges procedural
    procedure procedures program publication quote range read real reassign recheck recursive ref references
    referencing refresh reindex relative release rename repeatable replace replica reset restart restrict
    return returning returns revoke right role rollback rollup routine routines row rows rule savepoint scalar
    schema schemas scroll search second security select sequence sequences serializable server session
    session_user set setof sets share show similar simple skip smallint snapshot some sql stable standalone
    start statement statistics stdin stdout storage stored strict string strip subscription substring support
    symmetric sysid system system_user table tables tablesample tablespace temp template temporary text then
    ties time timestamp to trailing transaction transform treat trigger trim true truncate trusted type types
    uescape unbounded uncommitted unencrypted union unique unknown unlisten unlogged until update user using
    vacuum valid validate validator value values varchar variadic varying verbose version view views volatile
    when where whitespace window with within without work wrapper write xml xmlattributes xmlconcat xmlelement
    xmlexists xmlforest xmlnamespaces xmlparse xmlpi xmlroot xmlserialize xmltable year yes zone
""".split())
PG_TYPE_NAMES = frozenset("""
    aclitem any anyarray anycompatible anycompatiblearray anycompatiblemultirange anycompatiblenonarray
    anycompatiblerange anyelement anyenum anymultirange anynonarray anyrange bigint bigserial bit bool boolean
    box bpchar bytea char character cid cidr circle cstring date datemultirange daterange dec decimal double
    event_trigger fdw_handler float float4 float8 gtsvector index_am_handler inet int int2 int2vector int4
    int4multirange int4range int8 int8multirange int8range integer internal interval json jsonb jsonpath
    language_handler line lseg macaddr macaddr8 money name numeric nummultirange numrange oid oidvector path
    point polygon precision real record refcursor regclass regcollation regconfig regdictionary regnamespace
    regoper regoperator regproc regprocedure regrole regtype serial smallint smallserial table_am_handler text
    tid time timestamp timestamptz timetz trigger tsm_handler tsmultirange tsquery tsrange tstzmultirange
    tstzrange tsvector txid_snapshot unknown uuid varbit varchar varying void xid xid8 xml
""".split())


_NOT_NAMES = PG_KEYWORDS | PG_TYPE_NAMES


def dropped_names(tokens: tuple[Token, ...] | list[Token], tree: exp.Expr) -> list[str]:
    """Identifiers of the statement that appear nowhere in its tree (sqlglot dropped or rewrote them).

    Key words, built-in type names and called function names are exempt (sqlglot keeps
    neither as names); everything else the PostgreSQL lexer read as an identifier must
    be somewhere in the tree, or the tree may not say what PostgreSQL will run.
    """
    return _missing(tokens, _names_in(tree)[0])


def _names_in(tree: exp.Expr) -> tuple[set[str], bool]:
    """The names in ``tree`` (lower case), and whether any node of it is an ``exp.Command``
    (sqlglot's fallback for text it did not parse). One walk over every node (``Expr.walk``,
    compiled in sqlglotc), with what each node class holds looked up once per class.

    >>> from proxy.analysis.lexer import scan
    >>> names, command = _names_in(parse_statement("SELECT e.Email FROM t AS e", scan("SELECT e.Email FROM t AS e")))
    >>> sorted(names), command
    (['e', 'email', 't'], False)
    """
    names: set[str] = set()
    add = names.add
    command = False
    roles = _NAME_ROLES
    for node in tree.walk():
        role = roles.get(node.__class__)
        if role is None:
            role = _name_role(node.__class__)
        if role:
            if role == _NAME:
                add(str(node.this).lower())
            elif role == _CALL:
                if isinstance(node.this, str):
                    add(node.this.lower())
            elif role == _TYPE:
                kind = node.args.get("kind")
                if isinstance(kind, str):
                    names.update(p.strip('"').lower() for p in kind.split("."))
            else:
                command = True
    return names, command


_NAME, _CALL, _TYPE, _COMMAND = 1, 2, 3, 4
_NAME_ROLES: dict[type, int] = {}  # node class -> what _names_in reads of it (0: nothing)


def _name_role(cls: type) -> int:
    if issubclass(cls, (exp.Identifier, exp.Var)):
        role = _NAME
    elif issubclass(cls, exp.Anonymous):
        role = _CALL
    elif issubclass(cls, exp.DataType):
        role = _TYPE
    elif issubclass(cls, exp.Command):
        role = _COMMAND
    else:
        role = 0
    _NAME_ROLES[cls] = role
    return role


def _missing(tokens: tuple[Token, ...] | list[Token], names: set[str]) -> list[str]:
    """The identifiers among ``tokens`` that are not in ``names`` (see ``dropped_names``)."""
    out = []
    IDENT, QIDENT, LPAREN, exempt = T.IDENT, T.QIDENT, T.LPAREN, _NOT_NAMES
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        kind, value = tok[0], tok[3]
        if kind is IDENT:
            if value in exempt:
                continue
        elif kind is not QIDENT:
            continue
        if i < last and tokens[i + 1][0] is LPAREN:
            continue  # a function name (sqlglot keeps typed calls as node types) or a type modifier
        if value.lower() not in names and truncate_identifier(value).lower() not in names:
            out.append(tok.text)
    return out
