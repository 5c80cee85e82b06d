"""A statement's shape: its text with the string and number constants cut out, found in microseconds.

The decision cache (``proxy.enforcement.cache``) keys decisions on shapes, so a
statement that differs from an analysed one only in its constants is decided
without being parsed again. That is only safe when two texts with the same
shape are the same PostgreSQL tokens apart from the constants' values, so
``shape`` covers a deliberately small subset of SQL that one regular
expression reads exactly as PostgreSQL's lexer does (scan.l, section 4.1 of
the PostgreSQL documentation):

* string constants ``'...'`` (quotes doubled inside) and unsigned decimal numbers
  ``123`` or ``1.5`` not touching a letter, digit, ``_``, ``$``, ``.`` or quote
  are the constants; quoted identifiers are kept whole;
* outside constants the text must be ASCII and hold no comment (``--``, ``/*``),
  no ``$`` other than a ``$n`` parameter, no unterminated quote, and no ``U&``
  prefix (whose ``UESCAPE '...'`` constant changes the text before it);
* no backslash anywhere (its meaning inside a string depends on
  ``standard_conforming_strings`` and on an ``E`` prefix).

Anything else gets ``None`` and goes the slow way (analysed, cached by exact
text only). Because both readings agree up to the first character they would
read differently, and every such character is refused above, two texts with the
same shape differ only inside constants of the same kind. A constant's value
can still matter to a decision (``ORDER BY 2``, ``set_config('search_path',
...)``): the analysis flags those statements and the cache never keys them on
their shape.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from proxy.extensions import compiled

STRING = "\x01"  # stands for a string constant in a shape
NUMBER = "\x02"  # stands for a number
MARKERS = re.compile("[\x01\x02]")
# In the text of a rewrite's edit, a copy of the statement's text at [start, end) (a
# constant the rewrite repeats elsewhere): the rewrite puts the text there, and a
# template (``template``) the constant of each later statement of the same shape.
# Delimited by NUL, which no SQL text can hold (the protocol's strings end at NUL, and
# analyze refuses one), so no name or string a client writes can pose as a placeholder.
COPY = re.compile("\x00C([0-9]+):([0-9]+)\x00")
_COPIED = re.compile("\x00K([0-9]+)\x00")  # in a template: a copy of constant number n


def copy_of(start: int, end: int) -> str:
    """The placeholder for a copy of the statement's text at ``[start, end)`` (see ``COPY``)."""
    return f"\x00C{start}:{end}\x00"

# Groups: 1 a quoted identifier (kept), 2 a string constant, 3 a number; matched where
# _PIECE_START finds a character a piece can start with (one character class, which the
# engine scans for in C; a pattern that begins with a lookahead is tried at every position).
_PIECE = re.compile(
    r"""("[^"]*(?:""[^"]*)*")"""
    r"""|('[^']*(?:''[^']*)*')"""
    r"""|(?<![\w$.'"])(\d+(?:\.\d+)?)(?![\w$.'"])""",
    re.ASCII,
)
_PIECE_START = re.compile(r"""["'0-9]""")
# Outside constants and quoted identifiers: a quote left over (unterminated), a comment, a $
# that is not a $n parameter, a U& prefix, a NUL or a control character other than white
# space. Inside them these mean nothing to PostgreSQL's lexer: the two readings agree up to
# the first character they would read differently, which would then be outside.
# (The regular expression ['"\x00-\x08\x0b\x0c\x0e-\x1f\x7f&]|--|/\*|\$(?!\d) says it in one line, but
# an alternation that begins with a character class is tried at every position: 0.8 us
# for a one-line query. ``_unsafe`` finds the candidates with one class, scanned in C.)
_UNSAFE_START = re.compile(r"""[-/$'"\x00-\x08\x0b\x0c\x0e-\x1f\x7f&]""")


def _unsafe(outside: str) -> bool:
    """Whether ASCII text outside constants holds a character or pair the shape subset refuses.

    >>> [_unsafe(t) for t in ("a - b / c = $1", "a -- b", "a /* b", "$$", "x$", "a & b", "ok")]
    [False, True, True, True, True, True, False]
    """
    search = _UNSAFE_START.search
    m = search(outside)
    while m is not None:
        i = m.start()
        c = outside[i]
        after = outside[i + 1:i + 2]
        if c == "-":
            if after == "-":
                return True
        elif c == "/":
            if after == "*":
                return True
        elif c == "$":
            if not after.isdigit():  # only $n parameters (ASCII here: isdigit is 0-9)
                return True
        else:  # a quote, a control character or &
            return True
        m = search(outside, i + 1)
    return False


class Shape(NamedTuple):
    """``key``: the text with each constant replaced by ``STRING`` or ``NUMBER``;
    ``constants``: the constants' texts in order (quotes included)."""

    key: str
    constants: tuple[str, ...]


# Recent answers by text. The decision cache asks for a statement's shape when the
# statement arrives, the telemetry's fingerprints once its answer is back: the second
# asking is a dict lookup (the text's hash is cached by then). Cleared when full;
# texts over _RECENT_TEXT characters are not kept.
_recent: dict[str, Shape | None] = {}
_RECENT = 512
_RECENT_TEXT = 4096
_UNSEEN = object()


def shape(sql: str) -> Shape | None:
    """The shape of ``sql`` (remembered for a while: see ``_recent``), or None when it is
    outside the subset read here.

    >>> s = shape("SELECT email FROM crm.members WHERE id = 42 AND name = 'O''Hara'")
    >>> s.key == "SELECT email FROM crm.members WHERE id = " + NUMBER + " AND name = " + STRING
    True
    >>> s.constants
    ('42', "'O''Hara'")
    >>> shape('SELECT "col 1" FROM t1 WHERE x = $1').constants
    ()
    >>> [shape(q) for q in ("SELECT 1 -- c", "SELECT $$x$$", "SELECT E'\\\\n'", "SELECT 'open", "SELECT 1e5")]
    [None, None, None, None, Shape(key='SELECT 1e5', constants=())]
    """
    answer = _recent.get(sql, _UNSEEN)
    if answer is not _UNSEEN:
        return answer
    answer = _shape(sql)
    if len(sql) <= _RECENT_TEXT:
        if len(_recent) >= _RECENT:
            _recent.clear()
        _recent[sql] = answer
    return answer


def _shape_py(sql: str) -> Shape | None:
    """The shape of ``sql`` read in Python: the reference of the compiled ``_shape.scan`` (and its stand-in)."""
    if "\\" in sql:  # anywhere: inside a string its meaning depends on standard_conforming_strings
        return None
    key: list[str] = []  # the text, a quoted identifier or a marker, the text, ...
    outside: list[str] = []  # the text between pieces (quoted identifiers are pieces too)
    constants: list[str] = []
    last = 0
    for piece in _pieces(sql):
        text = sql[last:piece.start()]
        outside.append(text)
        key.append(text)
        group = piece.lastindex
        if group == 1:
            key.append(piece.group(1))
        else:
            constants.append(piece.group(group))
            key.append(STRING if group == 2 else NUMBER)
        last = piece.end()
    tail = sql[last:]
    outside.append(tail)
    text = "".join(outside)
    if not text.isascii() or _unsafe(text):
        return None
    key.append(tail)
    return Shape("".join(key), tuple(constants))



COMPILED_SCAN = compiled("proxy.analysis._shape", "scan")  # None: not built, or PURPOSE_PROXY_NO_EXTENSIONS


def _shape_c(sql: str, _scan=COMPILED_SCAN, _new=tuple.__new__) -> Shape | None:
    found = _scan(sql)
    return None if found is None else _new(Shape, found)


_shape = _shape_c if COMPILED_SCAN is not None else _shape_py


def fill(template: str, constants: tuple[str, ...]) -> str:
    """``template`` (a shape key, possibly edited) with its markers replaced by ``constants`` in order.

    >>> fill("SELECT x FROM t WHERE a = \\x02 AND b = \\x01", ("7", "'z'"))
    "SELECT x FROM t WHERE a = 7 AND b = 'z'"
    """
    pieces = MARKERS.split(template)
    if len(pieces) != len(constants) + 1:
        raise ValueError("the template does not hold one marker per constant")
    if "\x00" in template:  # copies of constants (resolved piece by piece: a constant may hold anything)
        pieces = [_COPIED.sub(lambda m: constants[int(m[1])], p) for p in pieces]
    out = [pieces[0]]
    for const, piece in zip(constants, pieces[1:]):
        out.append(const)
        out.append(piece)
    return "".join(out)


def _pieces(sql: str):
    """The matches of ``_PIECE`` in ``sql``, in order, as ``_shape`` finds them."""
    found = _PIECE_START.search(sql)
    while found is not None:
        piece = _PIECE.match(sql, found.start())
        if piece is None:
            found = _PIECE_START.search(sql, found.start() + 1)
            continue
        yield piece
        found = _PIECE_START.search(sql, piece.end())


def spans(sql: str) -> list[tuple[int, int]] | None:
    """Where the constants of ``sql`` are (character offsets), in the order ``shape`` lists them.

    >>> spans("SELECT 'a', 10 FROM t")
    [(7, 10), (12, 14)]
    """
    if shape(sql) is None:
        return None
    return [m.span(2) if m.group(2) is not None else m.span(3)
            for m in _pieces(sql) if m.group(1) is None]


def _copies(sql: str, new: str, where: list[tuple[int, int]]) -> str | None:
    """``new`` with each copy placeholder made a copy of constant number n, or the text itself
    where it copies no constant (a ``$n``); None if one copies part of a constant.

    >>> _copies("SELECT 1 WHERE a = 42", "b = " + copy_of(19, 21), [(7, 8), (19, 21)])
    'b = \\x00K1\\x00'
    """
    index = {span: k for k, span in enumerate(where)}
    failed = False

    def one(m: re.Match) -> str:
        nonlocal failed
        a, b = int(m[1]), int(m[2])
        if (a, b) in index:
            return f"\x00K{index[(a, b)]}\x00"
        if any(ca < b and a < cb for ca, cb in where):
            failed = True
        return sql[a:b]

    out = COPY.sub(one, new)
    return None if failed else out


def template(sql: str, edits: list[tuple[int, int, str]]) -> str | None:
    """The shape key of ``sql`` with text ``edits`` (start, end, new text) applied, for ``fill``.

    None when an edit touches the inside of a constant or brings a marker of its own,
    so that the edits cannot be carried over to other constants.

    >>> sql = "SELECT a FROM t WHERE b = 5"
    >>> fill(template(sql, [(14, 15, "(SELECT 1 AS a) t")]), ("9",))
    'SELECT a FROM (SELECT 1 AS a) t WHERE b = 9'
    """
    where = spans(sql)
    if where is None:
        return None
    if any(MARKERS.search(new) for _, _, new in edits):
        return None
    if any("\x00" in new for _, _, new in edits):
        copied = [(start, end, _copies(sql, new, where)) for start, end, new in edits]
        if any(new is None for _, _, new in copied):
            return None
        edits = copied
    for start, end, _ in edits:
        for a, b in where:
            if a < start < b or a < end < b or (start < b and a < end and start != end):
                return None
    # Replace the constants by markers and apply the edits, from the end (offsets stay valid);
    # an insertion at a constant's start goes before it, like ``rewrite.apply_edits``.
    pieces = list(edits) + [(a, b, STRING if sql[a] == "'" else NUMBER) for a, b in where]
    out = sql
    for start, end, new in sorted(pieces, key=lambda e: (e[0], e[1]), reverse=True):
        out = out[:start] + new + out[end:]
    return out
