"""A PostgreSQL-faithful lexer: where strings, quoted identifiers, comments and statements begin and end.

The proxy must read a SQL string exactly as the server's scanner (``scan.l``) does:
a string literal, comment or dollar quote that the analysis reads differently from
PostgreSQL could hide a statement or a relation from it. This module follows the
server's rules (nested ``/* */`` comments, ``''`` doubling, ``E''`` backslash
escapes, ``U&''``/``U&""`` with ``UESCAPE``, ``$tag$`` quoting, adjacent string
literals continued across a newline, ``standard_conforming_strings``, identifier
characters including every non-ASCII byte) and refuses (``LexError``) what the
server would refuse or what it cannot read with certainty. sqlglot is only ever
given the code between these tokens (see ``proxy.analysis.parse``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple

NAMEDATALEN = 64  # identifiers are truncated to NAMEDATALEN - 1 bytes


class LexError(ValueError):
    """The text cannot be read as PostgreSQL would read it (the caller fails closed)."""


class T(enum.Enum):
    """Token kinds. Code tokens are IDENT, NUMBER, PARAM, OP and the punctuation kinds."""

    IDENT = "ident"  # unquoted identifier or keyword; value is ASCII-lowered
    QIDENT = "qident"  # "quoted" or U&"quoted" identifier; value is the exact name
    STRING = "string"  # '..', E'..', N'..', U&'..', $tag$..$tag$; value is the decoded text
    BITSTRING = "bitstring"  # B'0101'
    HEXSTRING = "hexstring"  # X'1F'
    NUMBER = "number"
    PARAM = "param"  # $1
    OP = "op"  # one operator character (+ - * / < > = ~ ! @ # % ^ & | ` ?) or ':'/'::'
    LPAREN = "("
    RPAREN = ")"
    LBRACKET = "["
    RBRACKET = "]"
    COMMA = ","
    DOT = "."
    SEMI = ";"

    # Enum hashes a member by its name in Python code; the analysis looks kinds up in sets
    # for every token, so hash by identity in C (members are singletons, compared by identity).
    __hash__ = object.__hash__


LITERALS = (T.STRING, T.BITSTRING, T.HEXSTRING)


class Token(NamedTuple):
    """One PostgreSQL token (a named tuple: the lexer makes hundreds per statement, and a
    tuple is built at a third of a frozen dataclass's cost)."""

    kind: T
    start: int  # offset of the first character
    end: int  # offset one past the last character
    value: str  # decoded value (strings, quoted identifiers), lowered word (IDENT), else the text
    text: str = ""  # the source text (IDENT keeps its original case here)

    def is_word(self, *words: str) -> bool:
        """True for an unquoted identifier/keyword equal to one of ``words`` (lower case)."""
        return self.kind is T.IDENT and self.value in words


_SPACE = " \t\n\r\f"
_DIGITS = frozenset("0123456789")  # scan.l's digit: ASCII only (str.isdigit() also takes "٣" and "²")
_NEWLINE = "\n\r"
_OP_CHARS = set("~!@#^&|`?+-*/%<>=")
_SELF = {"(": T.LPAREN, ")": T.RPAREN, "[": T.LBRACKET, "]": T.RBRACKET, ",": T.COMMA, ";": T.SEMI}


def _ident_start(c: str) -> bool:
    return c.isascii() and (c.isalpha() or c == "_") or not c.isascii()


def _ident_cont(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "_$") or not c.isascii()


# The characters _ident_cont accepts, for scanning a whole identifier in one match.
_IDENT_REST = re.compile(r"[A-Za-z0-9_$\x80-\U0010ffff]*")


def ascii_lower(s: str) -> str:
    """Fold an unquoted identifier as PostgreSQL does with a UTF-8 database: ASCII letters only.

    >>> ascii_lower("MÉMBERS")
    'mÉmbers'
    """
    return s.lower() if s.isascii() else s.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}


def truncate_identifier(name: str) -> str:
    """Truncate to NAMEDATALEN-1 bytes at a character boundary, as the server does (with a NOTICE).

    >>> truncate_identifier("a" * 70) == "a" * 63
    True
    """
    if len(name) < 16:  # at most 4 bytes a character: short enough
        return name
    b = name.encode("utf-8", "surrogateescape")  # bytes of the SQL text that are not UTF-8 stay bytes
    if len(b) < NAMEDATALEN:
        return name
    b = b[: NAMEDATALEN - 1]
    while b:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            b = b[:-1]
    return ""


# The tokens most statements are made of, each with the white space before it, for one
# match per token in _Scanner.run; whatever does not match here (comments, quotes, $,
# numbers other than plain integers, ...) takes the scanner's careful branches. Each
# alternative must read exactly what those branches read:
# * w: an unquoted word (identifier or key word), unless it is the prefix of a string
#   (E'', N'', B'', X'') or of a Unicode escape (U&'', U&"");
# * p: punctuation, and a "." not followed by a digit (".5" is a number);
# * n: an integer not followed by a digit, ".", "e", or an identifier character
#   (PostgreSQL 15 refuses "123abc" as trailing junk: the careful branch raises);
# * o: one operator character that does not begin a comment ("--", "/*"), or "::" / ":".
_FAST = re.compile(r"""[ \t\n\r\f]*(?:
    (?P<w>(?![eEnNbBxX]')(?![uU]&['"])[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)
  | (?P<p>[(),\[\];]|\.(?![0-9]))
  | (?P<n>[0-9]+(?![0-9.A-Za-z_$\x80-\U0010ffff]))
  | (?P<o>[~!@\#^&|`?+*%<>=]|-(?!-)|/(?!\*)|::?)
)""", re.VERBOSE)
def _no_match(s: str, i: int) -> None:
    return None


_FAST_KIND = {"p": None, "n": T.NUMBER, "o": T.OP}
# The same by _FAST's group numbers (1: w, 2: p, 3: n, 4: o), which the scanner reads.
_FAST_KINDS = (None, None, _FAST_KIND["p"], _FAST_KIND["n"], _FAST_KIND["o"])
if dict(_FAST.groupindex) != {"w": 1, "p": 2, "n": 3, "o": 4}:  # pragma: no cover - _FAST was edited
    raise ImportError("lexer._FAST_KINDS does not follow the groups of _FAST")
_PUNCT = {"(": T.LPAREN, ")": T.RPAREN, "[": T.LBRACKET, "]": T.RBRACKET, ",": T.COMMA, ";": T.SEMI, ".": T.DOT}

_DOLQ = re.compile(r"\$([A-Za-z_\x80-\U0010ffff][A-Za-z_0-9\x80-\U0010ffff]*)?\$")


class _Scanner:
    def __init__(self, sql: str, standard_conforming_strings: bool, fast: bool = True) -> None:
        self.fast = fast  # take the common tokens in one match each (tests compare with the careful branches)
        self.s = sql
        self.n = len(sql)
        self.scs = standard_conforming_strings
        self.tokens: list[Token] = []
        self.comments: list[tuple[int, int]] = []

    # --- helpers ----------------------------------------------------------------------

    def _skip_space_and_comments(self, i: int) -> int:
        s, n = self.s, self.n
        while i < n:
            c = s[i]
            if c in _SPACE:
                i += 1
            elif c == "-" and s.startswith("--", i):
                j = i + 2
                while j < n and s[j] not in _NEWLINE:
                    j += 1
                self.comments.append((i, j))
                i = j
            elif c == "/" and s.startswith("/*", i):
                i = self._block_comment(i)
            else:
                break
        return i

    def _block_comment(self, i: int) -> int:
        s, n = self.s, self.n
        depth, j = 0, i
        while j < n:
            if s.startswith("/*", j):
                depth += 1
                j += 2
            elif s.startswith("*/", j):
                depth -= 1
                j += 2
                if depth == 0:
                    self.comments.append((i, j))
                    return j
            else:
                j += 1
        raise LexError("unterminated /* comment")

    def _continuation(self, i: int) -> int | None:
        """If whitespace containing a newline (and only -- comments) then a quote follows, its offset."""
        s, n = self.s, self.n
        j, saw_newline = i, False
        while j < n:
            c = s[j]
            if c in _NEWLINE:
                saw_newline = True
                j += 1
            elif c in " \t\f":
                j += 1
            elif c == "-" and s.startswith("--", j):
                while j < n and s[j] not in _NEWLINE:
                    j += 1
            else:
                break
        if saw_newline and j < n and s[j] == "'":
            return j
        return None

    def _quoted(self, i: int, backslash: bool) -> tuple[str, int]:
        """Read a '...' body starting at the opening quote ``i``; return (raw body, offset after)."""
        s, n = self.s, self.n
        j = i + 1
        out: list[str] = []
        while True:
            if j >= n:
                raise LexError("unterminated quoted string")
            c = s[j]
            if c == "'":
                if j + 1 < n and s[j + 1] == "'":
                    out.append("''")
                    j += 2
                    continue
                j += 1
                nxt = self._continuation(j)
                if nxt is None:
                    return "".join(out), j
                j = nxt + 1
                continue
            if c == "\\" and backslash:
                if j + 1 >= n:
                    raise LexError("unterminated quoted string")
                out.append(s[j : j + 2])
                j += 2
                continue
            out.append(c)
            j += 1

    # --- the scanner -------------------------------------------------------------------

    def run(self) -> list[Token]:
        s, n = self.s, self.n
        add, new, IDENT = self.tokens.append, tuple.__new__, T.IDENT  # (locals: hot loop)
        fast = _FAST.match if self.fast else _no_match
        kinds = _FAST_KINDS
        i = 0
        while True:
            m = fast(s, i)
            if m is not None:  # the common tokens, one match each (see _FAST)
                group = m.lastindex  # (by number: lastgroup and span(name) look the name up)
                a = m.start(group)
                i = m.end()
                word = s[a:i]
                if group == 1:
                    add(new(Token, (IDENT, a, i, word.lower() if word.isascii() else ascii_lower(word), word)))
                else:
                    add(new(Token, (kinds[group] or _PUNCT[word], a, i, word, word)))
                continue
            i = self._skip_space_and_comments(i)
            if i >= n:
                return self.tokens
            c = s[i]
            nxt = s[i + 1] if i + 1 < n else ""
            if c == "'":
                raw, j = self._quoted(i, backslash=not self.scs)
                value = _unescape_e(raw) if not self.scs else raw.replace("''", "'")
                self._add(T.STRING, i, j, value)
                i = j
            elif c in "eE" and nxt == "'":
                raw, j = self._quoted(i + 1, backslash=True)
                self._add(T.STRING, i, j, _unescape_e(raw))
                i = j
            elif c in "nN" and nxt == "'":
                raw, j = self._quoted(i + 1, backslash=not self.scs)
                value = _unescape_e(raw) if not self.scs else raw.replace("''", "'")
                self._add(T.STRING, i, j, value)
                i = j
            elif c in "bBxX" and nxt == "'":
                raw, j = self._quoted(i + 1, backslash=False)
                if "''" in raw:
                    raise LexError("quote inside a bit-string literal")
                kind = T.BITSTRING if c in "bB" else T.HEXSTRING
                self._add(kind, i, j, raw)
                i = j
            elif c in "uU" and nxt == "&" and i + 2 < n and s[i + 2] in "'\"":
                i = self._unicode(i)
            elif c == '"':
                name, j = self._quoted_identifier(i + 1)
                if not name:
                    raise LexError("zero-length delimited identifier")
                self._add(T.QIDENT, i, j, name)
                i = j
            elif c == "$":
                if nxt in _DIGITS:
                    j = i + 1
                    while j < n and s[j] in _DIGITS:
                        j += 1
                    if j < n and _ident_cont(s[j]):
                        raise LexError("trailing junk after parameter")
                    self._add(T.PARAM, i, j, s[i:j])
                    i = j
                    continue
                m = _DOLQ.match(s, i)
                if not m:
                    raise LexError("stray $")
                delim = m.group(0)
                end = s.find(delim, m.end())
                if end < 0:
                    raise LexError("unterminated dollar-quoted string")
                self._add(T.STRING, i, end + len(delim), s[m.end() : end])
                i = end + len(delim)
            elif _ident_start(c):
                j = _IDENT_REST.match(s, i + 1).end()
                word = s[i:j]
                self.tokens.append(Token(T.IDENT, i, j, ascii_lower(word), word))
                i = j
            elif c in _DIGITS or (c == "." and nxt in _DIGITS):
                i = self._number(i)
            elif c == ".":
                self._add(T.DOT, i, i + 1, ".")
                i += 1
            elif c == ":":
                if nxt == ":":
                    self._add(T.OP, i, i + 2, "::")
                    i += 2
                else:
                    self._add(T.OP, i, i + 1, ":")
                    i += 1
            elif c in _SELF:
                self._add(_SELF[c], i, i + 1, c)
                i += 1
            elif c in _OP_CHARS:
                self._add(T.OP, i, i + 1, c)
                i += 1
            else:
                raise LexError(f"unexpected character {c!r}")

    def _add(self, kind: T, start: int, end: int, value: str) -> None:
        self.tokens.append(tuple.__new__(Token, (kind, start, end, value, self.s[start:end])))

    def _number(self, i: int) -> int:
        s, n = self.s, self.n
        j = i
        while j < n and s[j] in _DIGITS:
            j += 1
        if j < n and s[j] == "." and not s.startswith("..", j):
            j += 1
            while j < n and s[j] in _DIGITS:
                j += 1
        if j < n and s[j] in "eE":
            k = j + 1
            if k < n and s[k] in "+-":
                k += 1
            if k < n and s[k] in _DIGITS:
                while k < n and s[k] in _DIGITS:
                    k += 1
                j = k
            else:
                raise LexError("trailing junk after numeric literal")
        if j < n and _ident_cont(s[j]):
            # PostgreSQL 15 refuses "123abc"; older servers read "123 abc", newer ones accept
            # 0x1F and 1_000. The analysis does not guess.
            raise LexError("trailing junk after numeric literal")
        self._add(T.NUMBER, i, j, s[i:j])
        return j

    def _quoted_identifier(self, j: int) -> tuple[str, int]:
        """The body of a double-quoted identifier starting at ``j`` (after the quote),
        with ``""`` read as one quote, and the offset past the closing quote."""
        s, n = self.s, self.n
        out: list[str] = []
        while True:
            if j >= n:
                raise LexError("unterminated quoted identifier")
            if s[j] == '"':
                if j + 1 < n and s[j + 1] == '"':
                    out.append('"')
                    j += 2
                    continue
                return "".join(out), j + 1
            out.append(s[j])
            j += 1

    def _unicode(self, i: int) -> int:
        s = self.s
        quote = s[i + 2]
        if quote == "'":
            if not self.scs:
                raise LexError("U&'' strings need standard_conforming_strings")
            raw, j = self._quoted(i + 2, backslash=False)
            raw = raw.replace("''", "'")
        else:
            raw, j = self._quoted_identifier(i + 3)
        escape = "\\"
        k = self._skip_space_and_comments(j)
        m = re.compile(r"uescape", re.I).match(s, k)
        if m and (m.end() >= self.n or not _ident_cont(s[m.end()])):
            k2 = self._skip_space_and_comments(m.end())
            m2 = re.compile(r"'([^'])'").match(s, k2)
            if not m2:
                raise LexError("invalid UESCAPE clause")
            escape = m2.group(1)
            if escape in "0123456789abcdefABCDEF+'\" \t\n\r\f":
                raise LexError("invalid Unicode escape character")
            j = m2.end()
        value = _unescape_unicode(raw, escape)
        if quote == "'":
            self._add(T.STRING, i, j, value)
        else:
            if not value:
                raise LexError("zero-length delimited identifier")
            self._add(T.QIDENT, i, j, value)
        return j


def _unescape_e(raw: str) -> str:
    """Decode the body of an E'' string (backslash escapes, doubled quotes)."""
    out: list[str] = []
    i, n = 0, len(raw)
    simple = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
    while i < n:
        c = raw[i]
        if c == "'":
            out.append("'")
            i += 2
            continue
        if c != "\\":
            out.append(c)
            i += 1
            continue
        d = raw[i + 1]
        if d in simple:
            out.append(simple[d])
            i += 2
        elif d in "01234567":
            j = i + 1
            while j < n and j < i + 4 and raw[j] in "01234567":
                j += 1
            out.append(chr(int(raw[i + 1 : j], 8) & 0xFF))
            i = j
        elif d == "x" and i + 2 < n and raw[i + 2] in "0123456789abcdefABCDEF":
            j = i + 2
            while j < n and j < i + 4 and raw[j] in "0123456789abcdefABCDEF":
                j += 1
            out.append(chr(int(raw[i + 2 : j], 16)))
            i = j
        elif d in "uU":
            width = 4 if d == "u" else 8
            h = raw[i + 2 : i + 2 + width]
            if len(h) != width or any(x not in "0123456789abcdefABCDEF" for x in h):
                raise LexError("invalid Unicode escape")
            out.append(_code_point(int(h, 16)))
            i += 2 + width
        else:
            out.append(d)
            i += 2
    return "".join(out)


def _code_point(value: int) -> str:
    """The character of a Unicode escape; beyond U+10FFFF PostgreSQL fails with "invalid Unicode
    escape value" (22P05), and so does the lexer (Python's ``chr`` would raise something else,
    which once sent fingerprints to a fallback that kept a statement's values).

    >>> _code_point(0x41)
    'A'
    >>> try:
    ...     _code_point(0x110000)
    ... except LexError as exc:
    ...     print(exc)
    invalid Unicode escape value
    """
    if value > 0x10FFFF:
        raise LexError("invalid Unicode escape value")
    return chr(value)


def _unescape_unicode(raw: str, esc: str) -> str:
    out: list[str] = []
    i, n = 0, len(raw)
    hexd = "0123456789abcdefABCDEF"
    while i < n:
        c = raw[i]
        if c != esc:
            out.append(c)
            i += 1
            continue
        if i + 1 < n and raw[i + 1] == esc:
            out.append(esc)
            i += 2
        elif i + 4 < n + 0 and all(x in hexd for x in raw[i + 1 : i + 5]) and len(raw[i + 1 : i + 5]) == 4:
            out.append(_code_point(int(raw[i + 1 : i + 5], 16)))
            i += 5
        elif i + 1 < n and raw[i + 1] == "+" and len(raw[i + 2 : i + 8]) == 6 and all(
            x in hexd for x in raw[i + 2 : i + 8]
        ):
            out.append(_code_point(int(raw[i + 2 : i + 8], 16)))
            i += 8
        else:
            raise LexError("invalid Unicode escape")
    return "".join(out)


def scan(sql: str, standard_conforming_strings: bool = True) -> list[Token]:
    """Split ``sql`` into PostgreSQL tokens (comments and whitespace dropped).

    >>> [t.value for t in scan("SELECT 'it''s' /* a /* nested */ comment */ FROM \\"Crm\\".Members")]
    ['select', "it's", 'from', 'Crm', '.', 'members']
    >>> [t.value for t in scan("SELECT E'a\\\\'b', $q$ ; $q$")]
    ['select', "a'b", ',', ' ; ']
    """
    return _Scanner(sql, standard_conforming_strings).run()


def literal_mask(sql: str, standard_conforming_strings: bool = True) -> list[tuple[int, int]]:
    """Spans of ``sql`` that are literals or comments (never code) under the given setting."""
    sc = _Scanner(sql, standard_conforming_strings)
    toks = sc.run()
    spans = [(t.start, t.end) for t in toks if t.kind in LITERALS]
    return spans + sc.comments


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a SQL string: its tokens and its text (offsets relative to ``text``).

    ``offset`` is what to add to an offset in ``text`` to get the offset in the whole
    SQL string, ``first`` the index of the statement's first token among the tokens of
    the whole string.
    """

    text: str
    tokens: tuple[Token, ...]
    offset: int = 0
    first: int = 0


def split_statements(sql: str, tokens: list[Token]) -> list[Statement]:
    """Split tokens at top-level semicolons, as the server's grammar does.

    A semicolon inside parentheses (``CREATE RULE ... DO (a; b)``) or inside a
    ``BEGIN ATOMIC ... END`` function body does not end the statement. Empty
    statements are dropped.

    >>> [s.text for s in split_statements("SELECT 1; ;SELECT (2)", scan("SELECT 1; ;SELECT (2)"))]
    ['SELECT 1', 'SELECT (2)']
    """
    if ";" not in sql:  # one statement (a semicolon inside a literal or comment only slows this down)
        return [_statement(sql, tokens, 0)] if tokens else []
    out: list[Statement] = []
    depth = 0
    atomic = 0  # nesting of BEGIN ATOMIC / CASE ... END inside a function body
    cur: list[Token] = []
    first = 0
    routine = None  # _is_routine(cur), settled once the statement has its first four tokens
    for i, tok in enumerate(tokens):
        if not cur:
            first = i
            routine = None
        if tok.kind is T.LPAREN:
            depth += 1
        elif tok.kind is T.RPAREN:
            depth -= 1
        elif tok.kind is T.IDENT and cur:
            in_routine = routine
            if in_routine is None:
                in_routine = _is_routine(cur)
                if len(cur) >= 4:  # it looks at the first four tokens only
                    routine = in_routine
            if in_routine:
                if tok.value == "atomic" and cur[-1].is_word("begin") and depth == 0:
                    atomic += 1
                elif atomic and tok.value in ("case", "end") and not (cur[-1].kind is T.DOT or cur[-1].is_word("as")):
                    # (a label "AS case" or a qualified "x.end" is a name, not the key word)
                    atomic += 1 if tok.value == "case" else -1
        if tok.kind is T.SEMI and depth <= 0 and atomic == 0:
            if cur:
                out.append(_statement(sql, cur, first))
            cur = []
            depth = 0
            continue
        cur.append(tok)
    if cur:
        out.append(_statement(sql, cur, first))
    return out


def _is_routine(cur: list[Token]) -> bool:
    """Whether a statement so far is CREATE [OR REPLACE] FUNCTION/PROCEDURE (which may have a BEGIN ATOMIC body)."""
    words = [t.value for t in cur[:4] if t.kind is T.IDENT]
    if words[:1] != ["create"]:
        return False
    rest = words[3:4] if words[1:3] == ["or", "replace"] else words[1:2]
    return rest in (["function"], ["procedure"])


def _statement(sql: str, toks: list[Token], first: int = 0) -> Statement:
    base = toks[0].start
    text = sql[base : toks[-1].end]
    if base == 0:  # the usual single statement: its offsets are already right
        return Statement(text, tuple(toks), 0, first)
    shifted = tuple(
        Token(t.kind, t.start - base, t.end - base, t.value, t.text) for t in toks
    )
    return Statement(text, shifted, base, first)
