"""The shortcut from the PostgreSQL lexer's tokens to sqlglot's (parse._direct_tokens) makes exactly the tokens
sqlglot's tokenizer makes of the blanked statement, or leaves the statement to it."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.analysis import parse as P
from proxy.analysis.lexer import LexError, scan, split_statements
from tests.support.sqlfuzz import Chooser, load_corpus, mutate_sql, statement

CORPUS = load_corpus()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces that meet sqlglot's exceptions: two-word key words, USER-DEFINED, "@", command words,
# touching literals, "$" in names, non-ASCII names, comments between words.
SOUP = ["ORDER", "order", "BY", "by", "b", "GROUP", "grouping", "SETS", "within", "user", "USER", "-", "DEFINED",
        "<", ">", "=", "@", "!", "~", "*", "::", ":", "(", ")", "[", "]", ",", ".", "'x'", "1", "1.5", "$1", '"Q"',
        "x", "select", "from", "similar", "to", "char", "character", "varying", "double", "precision", "int", "inte",
        "sql", "security", "#", ">>", "|", "/", "?", "&", "%", "^", "`", "e'a'", "U&'a'", "$$d$$", "-- c\n",
        "/* c */", "\n", "  ", "execute", "show", "do", "DO", "fetch", "lock", "rename", "begin", ";", "ab$c", "by$",
        "é", "+", "oid", "regclass"]


def _signature(tokens):
    return [(t.token_type, t.text, t.line, t.col, t.start, t.end, t.comments) for t in tokens]


def _same(sql: str) -> int:
    """Check every statement of ``sql``; return how many took the shortcut."""
    try:
        statements = split_statements(sql, scan(sql))
    except LexError:
        return 0
    taken = 0
    for s in statements:
        direct = P._direct_tokens(s.text, s.tokens)
        if direct is None:
            continue
        taken += 1
        try:
            slow = P._tokens_via_sqlglot(s.text, s.tokens)
        except P.Unparsable as exc:
            pytest.fail(f"the shortcut took {s.text!r}, which sqlglot's tokenizer refuses: {exc}")
        assert _signature(direct) == _signature(slow), s.text
    return taken


def test_the_shortcut_applies_to_this_sqlglot():
    assert P._DIRECT
    assert P._PAIRS["ORDER"]["BY"] is P.TokenType.ORDER_BY
    assert "USER" in P._TOUCHING


def test_the_corpus_reads_the_same_either_way():
    taken = sum(_same(sql) for sql in CORPUS)
    assert taken > 0.8 * len(CORPUS)


@pytest.mark.parametrize("sql", [
    "SELECT a FROM t ORDER BY a", "SELECT a FROM t ORDER  /* c */\n BY a", "SELECT a FROM t order by(a)",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t", "SELECT a FROM t GROUP BYE",
    "SELECT x::oid[], y <> z, a->>'k', b::int FROM t", "SELECT user-defined FROM t", "SELECT @ a FROM t",
    "SELECT a FROM t ORDER B", "SELECT 'a'b FROM t", "SELECT a FROM t ORDER BY'x'", "SELECT a similar to 'x'",
])
def test_statements_at_the_edges(sql):
    _same(sql)


@FUZZ
@given(st.lists(st.integers(0, 1 << 16), max_size=160))
def test_generated_statements(numbers):
    _same(statement(Chooser(numbers)))


@FUZZ
@given(st.integers(0, 1 << 30))
def test_mutated_statements(seed):
    rng = random.Random(seed)
    base, other = rng.choice(CORPUS), rng.choice(CORPUS)
    ops = [(rng.randrange(9), rng.randrange(4096), rng.randrange(4096)) for _ in range(rng.randrange(1, 7))]
    _same(mutate_sql(base, other, ops))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(SOUP), st.sampled_from(["", " ", "  "])), min_size=1, max_size=14))
def test_token_soup(pieces):
    _same("".join(p + gap for p, gap in pieces))
