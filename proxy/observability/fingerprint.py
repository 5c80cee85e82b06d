"""Statement fingerprints for telemetry: the SQL with every literal replaced, cached, and a short id of it.

``proxy.analysis.fingerprint`` (the lexer-based fingerprint of the analysis
layer) is used when it is importable; otherwise a small regular-expression
fallback here replaces string constants, dollar-quoted bodies and numbers with
``?`` and drops comments. Both never return a literal value.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict

from proxy.analysis.utility import COMMAND_WORDS

try:  # the analysis layer's fingerprint (lexer-based, normalised) and statement shapes
    from proxy.analysis.fingerprint import fingerprint as _analysis_fingerprint
    from proxy.analysis.shape import shape as _shape
except ImportError:  # pragma: no cover - only while the analysis layer lacks it
    _analysis_fingerprint = _shape = None

UNREADABLE = "<unreadable sql>"  # as the analysis layer's fingerprint says it

_TOKENS = re.compile(
    r"--[^\n]*|/\*.*?\*/"  # comments
    r"|(?:[EeBbXxNn]|[Uu]&)?'(?:[^']|'')*'?"  # string constants (an unterminated one runs to the end)
    r"|\$([A-Za-z_][A-Za-z0-9_]*)?\$.*?(?:\$\1\$|$)"  # dollar-quoted bodies
    r"|(?<![A-Za-z_\d$.])\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?"  # numbers
    r"|\.\d+(?:[eE][+-]?\d+)?",
    re.S,
)
_SPACE = re.compile(r"\s+")


def fallback_fingerprint(sql: str) -> str:
    """Literals replaced by ``?``, comments dropped, white space collapsed (used without the analysis layer).

    >>> fallback_fingerprint("SELECT name FROM t WHERE id = 42 AND x = E'it''s' -- c\\n AND y = $$z$$")
    'SELECT name FROM t WHERE id = ? AND x = ? AND y = ?'
    """

    def sub(m: re.Match) -> str:
        text = m.group(0)
        return " " if text.startswith(("--", "/*")) else "?"

    if "\\" in sql and "'" in sql:
        # Where a string ends depends on standard_conforming_strings and escapes:
        # mask everything from the first quote on rather than guess.
        sql = sql[: sql.index("'")] + "'...'"
    return _SPACE.sub(" ", _TOKENS.sub(sub, sql)).strip()[:4096]


class Fingerprints:
    """A bounded cache of fingerprints by SQL text (drivers repeat parameterised statements)."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._cache: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._fingerprint = _analysis_fingerprint or fallback_fingerprint
        self._last: tuple[str | None, tuple[str, str]] = (None, ("", ""))  # a span and an audit record ask in turn

    def __call__(self, sql: str) -> tuple[str, str]:
        """(fingerprint, id): the id is the first 16 hex digits of the fingerprint's SHA-256.

        Statements that differ only in their constants have one fingerprint: they are
        cached by their shape (``proxy.analysis.shape``), found without the lexer.
        """
        last = self._last
        if last[0] is sql:
            return last[1]
        out = self._lookup(sql)
        self._last = (sql, out)
        return out

    def _lookup(self, sql: str) -> tuple[str, str]:
        hit = self._cache.get(sql)
        if hit is not None:
            self._cache.move_to_end(sql)
            return hit
        key = sql
        shaped = _shape(sql) if _shape is not None else None
        if shaped is not None and shaped.constants:
            key = shaped.key
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            text = self._fingerprint(sql)
        except Exception:  # a fingerprint must never take a statement's telemetry down, nor guess:
            # the regular expressions cannot tell where a statement the lexer failed on keeps its
            # values (a hunt's nested comment and non-ASCII dollar tag came out whole)
            text = UNREADABLE
        out = (text, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16])
        if len(key) <= 16384:
            self._cache[key] = out
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return out


def operation_of(fingerprint: str) -> str:
    """The first keyword of a fingerprint, upper case ("SELECT"), or "" when there is none.

    >>> operation_of("with x as (select 1) select * from x"), operation_of("<unreadable sql>"), operation_of("ann x")
    ('WITH', '', '')
    """
    word = fingerprint.lstrip("( ").split(" ", 1)[0]
    return word.upper() if word in COMMAND_WORDS else ""  # a span's name: never client text
