"""Decisions already made, kept so that a statement seen before, or of the same shape, is not analysed again.

A decision depends on the statement and on what it was decided under: the
role, the purpose, the search_path, the policy version, the schema version and
``standard_conforming_strings``. That ``context`` is part of every key, so a
purpose change, a reload or DDL never finds an old decision (and the runtime
empties the cache on each reload, to free the memory).

Two kinds of entry, one bounded LRU:

* ``Verdict`` by exact text: the analysis, the decision and its explanation.
  The session still applies its own rules (quiet points for SET, prepared
  statements) and state changes to the analysis on every hit.
* ``Shaped`` by shape (``proxy.analysis.shape``; by text when there are no constants):
  for plain queries, DML and transaction control (BEGIN, COMMIT, SAVEPOINT ...) whose
  analysis did not look at any constant's value and that change no session state,
  the final decision. A ``Mask`` keeps the rewritten text as a template with
  markers where the constants were, so a hit is rewritten without parsing.

Consent changes need no invalidation: the consent filter is SQL that
PostgreSQL evaluates on every execution.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from proxy.analysis import shape as shapes
from proxy.analysis.model import Analysis, Kind
from proxy.analysis.utility import ends_a_transaction_aside
from proxy.policy.decision import Block, Decision, Mask
from proxy.policy.verdict import Explanation

# Statement kinds whose decision can be keyed on their shape: their analysis is a
# function of the tokens (constants aside), and deciding them changes no session state.
# Transaction control reads no data and sets nothing the proxy tracks (SET TRANSACTION
# is a SET): keyed by its text (no constants) or shape (PREPARE TRANSACTION 'gid'), a
# hit skips the session rules an exact-text entry would run again (pgbench's BEGIN/END).
# Not so COMMIT AND CHAIN and COMMIT PREPARED, which may commit DDL the session must
# account for: those are kept by text only, and a hit goes through the session again.
SHAPE_KINDS = frozenset({Kind.SELECT, Kind.INSERT, Kind.UPDATE, Kind.DELETE, Kind.MERGE, Kind.TRANSACTION})
MAX_TEXT = 64 * 1024  # longer statements are not kept by exact text


@dataclass(frozen=True, slots=True)
class Verdict:
    """An exact-text entry: what the analysis and the policy said."""

    analysis: Analysis
    decision: Decision
    explanation: Explanation | None


@dataclass(frozen=True, slots=True)
class Shaped:
    """A shape entry: the final decision (for a ``Mask``, ``template`` rebuilds its SQL)."""

    decision: Decision
    explanation: Explanation | None
    template: str | None = None
    unknown_relation: bool = False  # the decision was a refusal for a relation not in the schema
    pieces: tuple[str, ...] = ()  # the template split at its markers

    def __post_init__(self) -> None:
        if self.template is not None:
            object.__setattr__(self, "pieces", tuple(shapes.MARKERS.split(self.template)))

    def decision_for(self, shape: shapes.Shape | None) -> Decision:
        """The decision for a statement of this shape with ``shape.constants`` (None: the very text decided).

        >>> from proxy.policy.decision import Mask
        >>> s = shapes.shape("SELECT email FROM t WHERE id = 7")
        >>> entry = Shaped(Mask("x", ("hash",)), None, template=s.key.replace("FROM t", "FROM (SELECT 1) t"))
        >>> entry.decision_for(shapes.shape("SELECT email FROM t WHERE id = 12")).sql
        'SELECT email FROM (SELECT 1) t WHERE id = 12'
        """
        if self.template is None or shape is None:
            return self.decision
        d = self.decision
        if "\x00" in self.template:  # the rewrite repeats a constant (rewrite.pushed_down)
            return Mask(shapes.fill(self.template, shape.constants), d.methods, d.reason)
        pieces = self.pieces
        out = [pieces[0]]
        for const, piece in zip(shape.constants, pieces[1:]):
            out.append(const)
            out.append(piece)
        return Mask("".join(out), d.methods, d.reason)


# Refusals whose message is made from the statement's own text (what the analysis could not read).
_OWN_WORDS = frozenset({"unsupported", "analysis-error"})


def shape_entry(analysis: Analysis, decision: Decision, explanation: Explanation | None,
                edits: list[tuple[int, int, str]]) -> Shaped | None:
    """The shape entry for a freshly decided statement, or None if its decision may depend on more
    than its shape.

    >>> from proxy.analysis.model import StatementAccess
    >>> from proxy.policy.decision import ALLOW
    >>> a = Analysis("SELECT 1 FROM t WHERE id = 3", [StatementAccess(Kind.SELECT)])
    >>> shape_entry(a, ALLOW, None, []) is not None
    True
    >>> a.statements[0].reads_constants = True  # e.g. ORDER BY 2
    >>> shape_entry(a, ALLOW, None, []) is None
    True
    """
    if analysis.error is not None or not analysis.statements:
        return None
    for st in analysis.statements:
        if (st.kind not in SHAPE_KINDS or st.reads_constants or st.settings or st.prepared_name is not None
                or st.inner is not None or st.cursor is not None):
            return None
        if st.kind is Kind.TRANSACTION and ends_a_transaction_aside(analysis.sql):
            return None  # the session must see each one (``PurposeSession._apply``): kept by text only
    if type(decision) is Mask:
        template = shapes.template(analysis.sql, edits)
        if template is None or shapes.fill(template, shapes.shape(analysis.sql).constants) != decision.sql:
            return None
        return Shaped(decision, explanation, template)
    if type(decision) is Block and decision.reason in _OWN_WORDS:
        return None  # its message quotes the statement (scrubbed of literals): no other statement's to give
    unknown = type(decision) is Block and any(
        r.startswith("unknown relation") for st in analysis.statements for r in st.unsupported)
    return Shaped(decision, explanation, None, unknown)


class DecisionCache:
    """A bounded LRU of ``Verdict`` (keyed ``(text, context)``) and ``Shaped`` (keyed ``(shape key, context)``)
    entries, with hit and miss counts read at scrape time. Bounded twice: ``size`` entries, and ``max_bytes``
    of what they hold (``entry_cost``).

    >>> cache = DecisionCache(100, max_bytes=16000)
    >>> from proxy.policy.decision import ALLOW
    >>> for n in range(20):  # 919 or 920 bytes each
    ...     cache.put(("SELECT " + " " * 400 + str(n), ()), Shaped(ALLOW, None))
    >>> len(cache), cache.bytes, cache.get(("SELECT " + " " * 400 + "0", ())) is None
    (17, 15650, True)
    """

    def __init__(self, size: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple, tuple[Verdict | Shaped, int]] = OrderedDict()
        self.text_hits = 0
        self.shape_hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> Verdict | Shaped | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: tuple, entry: Verdict | Shaped) -> None:
        cost = entry_cost(key, entry)
        if cost > self.max_bytes // 16:
            return  # one entry may not take a sixteenth of the cache
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (entry, cost)
        self.bytes += cost
        while len(self._entries) > self.size or self.bytes > self.max_bytes:
            self.bytes -= self._entries.popitem(last=False)[1][1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def entry_cost(key: tuple, entry: Verdict | Shaped) -> int:
    """About how many bytes an entry keeps alive: its key's text, the rewritten SQL, the template and its
    pieces, and for an exact-text entry the analysis (tokens, references: a few times the text).

    >>> from proxy.policy.decision import ALLOW
    >>> entry_cost(("SELECT 1", ()), Shaped(ALLOW, None))
    520
    """
    text = key[0] if key and isinstance(key[0], str) else ""
    cost = 512 + len(text)
    sql = getattr(entry.decision, "sql", None)
    if sql:
        cost += len(sql)
    if type(entry) is Verdict:
        cost += 4 * len(entry.analysis.sql)
    elif entry.template is not None:
        cost += 2 * len(entry.template)
    return cost
