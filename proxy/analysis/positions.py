"""Where things are in a statement's tokens: name spans, the query block around a FROM item, its HAVING, a DML WHERE.

The rewrite substitutes text at positions the analysis records; sqlglot's tree only
knows where identifiers are, so clause boundaries are found here from the
PostgreSQL lexer's tokens, by keyword and parenthesis depth (every keyword used
here is reserved in PostgreSQL, so it cannot be a bare name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter

from proxy.analysis.lexer import T, Token, scan
from proxy.analysis.model import Span

# Clauses that follow HAVING in a SELECT, in the grammar's order.
_AFTER_HAVING = frozenset({"window", "order", "limit", "offset", "fetch", "for"})
_SET_OPERATIONS = frozenset({"union", "intersect", "except"})
# Every word _block_scan looks at (the others are skipped at once).
_CLAUSE_WORDS = _AFTER_HAVING | _SET_OPERATIONS | {"having", "group", "where", "from", "into", "order", "for"}
_KIND, _START = itemgetter(0), itemgetter(1)  # a Token's kind and start (a named tuple's fields by index: faster)


@dataclass(eq=False)
class Text:
    """The tokens of one text (a statement, or a view definition) and where it sits in the whole SQL string.

    ``offset`` is added to character offsets of ``tokens`` and ``first`` to token
    indexes to get positions in the whole string.

    >>> t = Text.of("SELECT a FROM (t)")
    >>> t.index_at(15), t.matching(3), t.span(4, 5)
    (4, 5, Span(start=15, end=16, first=4, last=5))
    """

    tokens: tuple[Token, ...]
    offset: int = 0
    first: int = 0
    _starts: dict[int, int] = field(default_factory=dict, repr=False)
    _match: list[int] | None = field(default=None, repr=False)
    blocks: dict = field(default_factory=dict, repr=False)  # SELECT index -> AggregateBlock (the analysis' cache)

    @classmethod
    def of(cls, text: str, offset: int = 0, first: int = 0) -> "Text":
        return cls(tuple(scan(text)), offset, first)

    def index_at(self, pos: int) -> int | None:
        """The index of the token starting at character ``pos`` (relative to this text)."""
        if not self._starts:
            self._starts = dict(zip(map(_START, self.tokens), range(len(self.tokens))))
        return self._starts.get(pos)

    def matching(self, i: int) -> int:
        """The index of the parenthesis matching the one at ``i`` (-1 if unbalanced)."""
        if self._match is None:
            match = [-1] * len(self.tokens)
            stack: list[int] = []
            LPAREN, RPAREN = T.LPAREN, T.RPAREN
            for k, kind in enumerate(map(_KIND, self.tokens)):
                if kind is LPAREN:
                    stack.append(k)
                elif kind is RPAREN and stack:
                    j = stack.pop()
                    match[j], match[k] = k, j
            self._match = match
        return self._match[i]

    def span(self, i: int, j: int) -> Span:
        """Tokens ``[i, j)`` as a span of the whole string."""
        return Span(self.tokens[i].start + self.offset, self.tokens[j - 1].end + self.offset,
                    i + self.first, j + self.first)

    def at(self, i: int) -> int:
        """The character offset (in the whole string) where token ``i`` starts; past the end: after the last."""
        if i < len(self.tokens):
            return self.tokens[i].start + self.offset
        return self.tokens[-1].end + self.offset


def block_start(text: Text, i: int) -> int | None:
    """The index of the SELECT keyword of the query block whose FROM list holds token ``i``.

    Walking back, parenthesized groups are skipped whole and an unmatched ``(`` (a
    parenthesized join) is stepped out of; the first SELECT met is the block's.

    >>> t = Text.of("SELECT x FROM (SELECT 1 FROM a) s JOIN (b JOIN c ON true) ON true")
    >>> block_start(t, 14), block_start(t, 7)
    (0, 4)
    """
    toks = text.tokens
    RPAREN, IDENT = T.RPAREN, T.IDENT
    k = i - 1
    while k >= 0:
        tok = toks[k]
        kind = tok[0]
        if kind is RPAREN:
            m = text.matching(k)
            if m < 0:
                return None
            k = m - 1
            continue
        if kind is IDENT and tok[3] == "select":
            return k
        k -= 1
    return None


def _block_scan(text: Text, sel: int) -> tuple[dict[str, int], int]:
    """Top-level clause keywords of the block starting at SELECT ``sel`` (first occurrence), and its end index."""
    toks = text.tokens
    found: dict[str, int] = {}
    k = sel + 1
    n = len(toks)
    LPAREN, RPAREN, IDENT = T.LPAREN, T.RPAREN, T.IDENT
    while k < n:
        tok = toks[k]
        kind = tok[0]
        if kind is LPAREN:
            m = text.matching(k)
            if m < 0:
                return found, n
            k = m + 1
            continue
        if kind is RPAREN:
            return found, k
        if kind is IDENT and tok[3] in _CLAUSE_WORDS:
            word = tok[3]
            nxt = toks[k + 1] if k + 1 < n else None
            if word in _SET_OPERATIONS:
                return found, k
            if word in ("group", "order") and not (nxt is not None and nxt.is_word("by")):
                pass  # WITHIN GROUP (...)
            elif word == "for" and not (nxt is not None and nxt.is_word("update", "share", "no", "key")):
                pass
            elif word in _AFTER_HAVING or word in ("having", "group", "where", "from", "into"):
                found.setdefault(word, k)
        k += 1
    return found, n


def having_position(text: Text, sel: int) -> tuple[Span | None, int, int]:
    """The span of the HAVING condition of the block at SELECT ``sel`` (None if it has none), and where
    a HAVING clause goes when it has none: a character offset in the whole string, and the index of the
    token it goes before (the number of tokens: at the end).

    >>> t = Text.of("SELECT a, avg(b) FROM t GROUP BY a ORDER BY 1")
    >>> having_position(t, 0)
    (None, 35, 12)
    >>> t = Text.of("SELECT count(*) FROM t HAVING count(*) > 1 UNION SELECT 1")
    >>> span, at, _ = having_position(t, 0); (span.start, span.end)
    (30, 42)
    """
    found, end = _block_scan(text, sel)
    later = [found[w] for w in _AFTER_HAVING if w in found]
    stop = min(later) if later else end
    having = found.get("having")
    if having is not None and having < stop:
        return text.span(having + 1, stop), text.at(stop), stop
    return None, text.at(stop), stop


def group_end(text: Text, sel: int) -> tuple[int, int] | None:
    """Where the GROUP BY list of the block at SELECT ``sel`` ends: the character offset just after its
    last item (in the whole string) and the index of the token after it; None without a GROUP BY.

    >>> t = Text.of("SELECT a, count(*) FROM t GROUP BY a, (b) HAVING count(*) > 1")
    >>> group_end(t, 0), t.tokens[16].text
    ((41, 16), 'HAVING')
    >>> group_end(Text.of("SELECT a FROM t GROUP BY a"), 0), group_end(Text.of("SELECT a FROM t"), 0)
    ((26, 7), None)
    """
    found, end = _block_scan(text, sel)
    group = found.get("group")
    if group is None:
        return None
    later = [found[w] for w in ("having", *_AFTER_HAVING) if w in found and found[w] > group]
    stop = min(later) if later else end
    if stop <= group + 2:
        return None
    return text.tokens[stop - 1].end + text.offset, stop + text.first


def dml_where(text: Text, verb: str) -> tuple[Span | None, int, int, str | None]:
    """For a top-level UPDATE or DELETE: the span of its WHERE condition (None without one), where a WHERE
    clause goes (before RETURNING or at the end: a character offset and the index of the token it goes
    before), and a problem that prevents adding a condition.

    >>> t = Text.of("WITH x AS (SELECT 1) UPDATE t SET a = (SELECT 2) WHERE b RETURNING a")
    >>> span, at, token, problem = dml_where(t, "update"); (span.start, span.end, at, token, problem)
    (55, 56, 57, 18, None)
    >>> dml_where(Text.of("DELETE FROM t"), "delete")[1:]
    (13, 3, None)
    """
    toks = text.tokens
    k, n = 0, len(toks)
    seen_verb = False
    where = returning = None
    while k < n:
        tok = toks[k]
        if tok.kind is T.LPAREN:
            m = text.matching(k)
            if m < 0:
                return None, text.at(n), n, "unbalanced parentheses"
            k = m + 1
            continue
        if tok.kind is T.IDENT:
            if not seen_verb and tok.value == verb:
                seen_verb = True
            elif seen_verb and tok.value == "where" and where is None:
                where = k
            elif seen_verb and tok.value == "returning" and returning is None:
                returning = k
        k += 1
    if not seen_verb:
        return None, text.at(n), n, f"cannot find the {verb.upper()} keyword"
    stop = returning if returning is not None else n
    at = text.at(stop)
    if where is None:
        return None, at, stop, None
    if where + 1 < n and toks[where + 1].is_word("current"):
        return None, at, stop, "WHERE CURRENT OF a cursor"
    if where + 1 >= stop:
        return None, at, stop, "an empty WHERE clause"
    return text.span(where + 1, stop), at, stop, None
