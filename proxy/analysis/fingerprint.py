"""A statement's fingerprint for telemetry: its tokens with every literal replaced by ``?``.

The fingerprint keeps keywords and identifiers (unquoted ones folded to lower case,
quoted ones quoted), operators and ``$n`` parameters, and drops comments and
whitespace, so statements that differ only in their constants share one
fingerprint. It never contains a literal value: strings of every kind, numbers,
bit strings and dollar-quoted bodies all become ``?``, and where a string's extent
depends on ``standard_conforming_strings`` whatever either reading calls a literal
is masked. Text the lexer cannot read yields a constant placeholder. No schema is
needed and nothing is parsed beyond the lexer.
"""

from __future__ import annotations

from proxy.analysis.lexer import LITERALS, LexError, T, literal_mask, scan
from proxy.analysis.utility import COMMAND_WORDS

UNREADABLE = "<unreadable sql>"
MAX_LENGTH = 4096

_NO_SPACE_BEFORE = {T.COMMA, T.RPAREN, T.RBRACKET, T.DOT, T.SEMI}
_NO_SPACE_AFTER = {T.LPAREN, T.LBRACKET, T.DOT}


def fingerprint(sql: str) -> str:
    """The statement with literals replaced by ``?`` (normalized, no values).

    >>> fingerprint("SELECT email FROM Crm.Members WHERE id = 42 AND name = 'Ann' -- note")
    'select email from crm.members where id = ? and name = ?'
    >>> fingerprint("SELECT * FROM t WHERE id IN (1, 2, 3) AND x = $1")
    'select * from t where id in (?, ...) and x = $1'
    >>> fingerprint("SELECT 'unterminated")
    '<unreadable sql>'
    """
    try:
        tokens = scan(sql, True)
    except LexError:
        return UNREADABLE
    masked: list[tuple[int, int]] = []
    if any(t.kind is T.STRING and "\\" in t.text for t in tokens):
        try:
            masked = literal_mask(sql, False)
        except LexError:
            return UNREADABLE
    out: list[str] = []
    kinds: list[T | None] = []
    value_from = _masked_from(tokens)
    for i, t in enumerate(tokens):
        if t.kind is T.SEMI:
            value_from = i + 1 + _masked_from(tokens[i + 1:])  # the next statement's
        elif i > value_from:
            continue  # the rest of a SET's value: one ? stands for all of it
        if t.kind in LITERALS or t.kind is T.NUMBER or _overlaps(t.start, t.end, masked) or i == value_from:
            text, kind = "?", None
        elif t.kind is T.IDENT:
            text, kind = t.value, t.kind
        elif t.kind is T.QIDENT:
            text, kind = '"' + t.value.replace('"', '""') + '"', t.kind
        else:
            text, kind = t.text, t.kind
        out.append(text)
        kinds.append(kind)
    return _join(_collapse(out, kinds))[:MAX_LENGTH]


def _masked_from(tokens) -> int:
    """Where a setting's value begins (a bare word there is a value, not a name: ``SET application_name
    TO ann``): after ``SET [SESSION|LOCAL] name = / TO``, ``SET TIME ZONE``, ``SET NAMES``, and the ``SET
    name = / TO`` of ALTER ROLE/DATABASE/SYSTEM/FUNCTION and CREATE FUNCTION (which masks the rest of the
    statement); 0 for a statement that begins with no command word; past the end for any other statement.

    >>> from proxy.analysis.lexer import scan
    >>> [_masked_from(scan(q)) for q in ("SET application_name TO ann", "SET a.b = x, y", "SET TIME ZONE utc",
    ...                                       "SELECT 1", "ann smith", "SET NAMES ann", "- ann", "(SELECT 1)",
    ...                                       "ALTER ROLE r SET application_name = ann", "ALTER TABLE t SET SCHEMA s")]
    [3, 5, 3, 2, 0, 2, 0, 4, 6, 6]
    """
    if not tokens:
        return 0
    first = next((t for t in tokens if t.kind is not T.LPAREN), tokens[0])  # (SELECT ...) is a statement
    if first.kind is not T.IDENT or first.value not in COMMAND_WORDS:
        return 0  # no command: its words may be anything the client typed, values included
    if first.is_word("alter") or first.is_word("create"):
        return _setting_value(tokens, next((i for i, t in enumerate(tokens) if t.is_word("set")), len(tokens)))
    if not tokens[0].is_word("set"):
        return len(tokens)
    if len(tokens) > 3 and tokens[1].is_word("time") and tokens[2].is_word("zone"):
        return 3
    if len(tokens) > 2 and tokens[1].is_word("names"):
        return 2
    for i, t in enumerate(tokens[1:], 1):
        if t.is_word("to") or (t.kind is T.OP and t.text == "="):
            return i + 1
    return len(tokens)


def _setting_value(tokens, at: int) -> int:
    """After the ``SET`` at ``at``: where the value of ``SET name = / TO value`` begins (the name may be
    qualified); past the end when what follows is no such setting (``SET SCHEMA s``, ``SET DEFAULT 1``)."""
    i = at + 1
    while i < len(tokens) and tokens[i].kind in (T.IDENT, T.QIDENT, T.DOT):
        if tokens[i].is_word("to"):
            break
        i += 1
    if at + 1 < i < len(tokens) and (tokens[i].is_word("to") or (tokens[i].kind is T.OP and tokens[i].text == "=")):
        return i + 1
    return len(tokens)


def _overlaps(a: int, b: int, spans: list[tuple[int, int]]) -> bool:
    return any(s < b and a < e for s, e in spans)


def _collapse(out: list[str], kinds: list[T | None]) -> list[tuple[str, T | None]]:
    """Shorten parenthesized lists of two or more placeholders to ``(?, ...)``."""
    res: list[tuple[str, T | None]] = []
    i, n = 0, len(out)
    while i < n:
        if kinds[i] is T.LPAREN:
            j, count = i + 1, 0
            while j < n and kinds[j] is None:  # a placeholder
                count += 1
                j += 1
                if j < n and kinds[j] is T.COMMA:
                    j += 1
                else:
                    break
            if count >= 2 and j < n and kinds[j] is T.RPAREN and kinds[j - 1] is None:
                res.extend([("(", T.LPAREN), ("?", None), (",", T.COMMA), ("...", None), (")", T.RPAREN)])
                i = j + 1
                continue
        res.append((out[i], kinds[i]))
        i += 1
    return res


def _join(items: list[tuple[str, T | None]]) -> str:
    parts: list[str] = []
    prev: T | None = None
    for k, (text, kind) in enumerate(items):
        if k and kind not in _NO_SPACE_BEFORE and prev not in _NO_SPACE_AFTER and not (
                kind is T.OP and text == "::") and not (prev is T.OP and parts and parts[-1] == "::"):
            parts.append(" ")
        parts.append(text)
        prev = kind
    return "".join(parts)
