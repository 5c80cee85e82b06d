"""The purpose rules (policy.csv): parsing and validating ``p`` rule lines and ``g`` role-group lines.

A rule line is ``p, sub, purpose, category, act, effect[, option]``; a group line
is ``g, role, group``. The purpose and category hierarchies (Casbin's g2 and g3)
are derived from purposes.yaml and catalog.yaml, so they are never written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Iterable

from proxy.policy import vocabulary as v
from proxy.policy.problems import Collector
from proxy.policy.sources import split_csv_line

FILE = "policy.csv"
RULE_FIELDS = ("sub", "purpose", "category", "act", "effect", "option")


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``p`` line. ``option`` is the mask method or ``k=N`` for aggregate, else empty."""

    sub: str
    purpose: str
    category: str
    act: str
    effect: str
    option: str = ""
    line: int = 0
    file: str = FILE

    @property
    def method(self) -> str | None:
        return self.option if self.effect == v.MASK else None

    @property
    def k(self) -> int | None:
        return v.parse_k(self.option) if self.effect == v.AGGREGATE else None

    @property
    def fields(self) -> tuple[str, ...]:
        """The rule as Casbin stores it (six fields, option possibly empty)."""
        return (self.sub, self.purpose, self.category, self.act, self.effect, self.option)

    @property
    def text(self) -> str:
        """The rule as written in policy.csv (normalised spacing).

        >>> Rule("app", "support", "payment.card", "read", "mask", "last4").text
        'p, app, support, payment.card, read, mask, last4'
        >>> Rule("app", "billing", "contact", "read", "allow").text
        'p, app, billing, contact, read, allow'
        """
        return ", ".join(("p",) + self.fields[:5] + ((self.option,) if self.option else ()))

    @property
    def precedence(self) -> tuple:
        return v.precedence(self.effect, self.method, self.k)

    def __str__(self) -> str:
        """``policy.csv:12: p, ...``: the readable form used in explanations."""
        return f"{self.file}:{self.line}: {self.text}"


@dataclass(frozen=True, slots=True)
class Grouping:
    """One ``g`` line: ``role`` is a member of ``group``."""

    role: str
    group: str
    line: int = 0
    file: str = FILE

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: g, {self.role}, {self.group}"


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    groupings: tuple[Grouping, ...]
    file: str = FILE

    def in_precedence_order(self) -> tuple[Rule, ...]:
        """Rules sorted so that the first applicable one is the decisive one.

        The key holds a mask's option in canonical form, so rules with equal keys give
        the same decision whatever the file order; the line only picks which is cited.

        >>> rs = RuleSet((Rule("a", "p", "c", "read", "allow", line=1),
        ...               Rule("a", "p", "c", "read", "mask", "hash", line=2),
        ...               Rule("g", "p", "c", "read", "deny", line=3)), ())
        >>> [r.line for r in rs.in_precedence_order()]
        [3, 2, 1]
        >>> rs = RuleSet((Rule("g", "p", "c", "read", "mask", "partial:8", line=1),
        ...               Rule("a", "p", "c", "read", "mask", "partial", line=2)), ())
        >>> [r.option for r in rs.in_precedence_order()]
        ['partial', 'partial:8']
        """
        return tuple(sorted(self.rules, key=lambda r: (r.precedence, r.line)))

    def subjects(self) -> tuple[str, ...]:
        """Every role and group named in a rule or group line, sorted."""
        names = {r.sub for r in self.rules}
        for g in self.groupings:
            names.update((g.role, g.group))
        return tuple(sorted(names))


def _check_rule(fields: list[str], line: int, purposes: Container[str], categories: Container[str],
                c: Collector) -> Rule | None:
    if len(fields) not in (6, 7):
        c.error(line, f"a p line needs sub, purpose, category, act, effect[, option]; got {len(fields) - 1} field(s)")
        return None
    sub, purpose, category, act, effect = fields[1:6]
    option = fields[6] if len(fields) == 7 else ""
    ok = True

    def bad(message: str) -> None:
        nonlocal ok
        ok = False
        c.error(line, message)

    if not sub or not v.is_subject_name(sub):
        bad(f"invalid role or group name {sub!r}")
    if purpose != v.ANY and purpose not in purposes:
        bad(f"unknown purpose {purpose!r} (not in purposes.yaml)")
    if category != v.ANY and category not in categories:
        bad(f"unknown category {category!r} (not in catalog.yaml)")
    if act not in v.ACTIONS:
        bad(f"unknown action {act!r} (expected one of: {', '.join(v.ACTIONS)})")
    if effect not in v.EFFECTS:
        bad(f"unknown effect {effect!r} (expected one of: {', '.join(v.EFFECTS)})")
    elif effect == v.MASK:
        if not option:
            bad(f"a mask rule needs a masking method (one of: {', '.join(v.MASK_METHODS)})")
        elif not v.is_mask_method(option):
            bad(f"unknown masking method {option!r} (expected one of: {', '.join(v.MASK_METHODS)}, "
                f"optionally with an option after a colon, e.g. partial:2)")
        elif v.mask_reading(option) is None:  # else refused only when a statement needs it
            bad(f"masking method {option!r}: {v.split_method(option)[0]} does not take that option "
                f"(policies/README.md, 'Masking methods')")
    elif effect == v.AGGREGATE:
        k = v.parse_k(option)
        if k is None or k < 2:
            bad(f"an aggregate rule needs k=N with N >= 2 for small-group suppression, got {option!r}")
    elif option:
        bad(f"an {effect} rule takes no option, got {option!r}")
    if effect in (v.MASK, v.AGGREGATE) and act in v.ACTIONS and act != v.READ:
        bad(f"{effect} applies to reading only; use allow or deny for {act}")
    if act in v.PURPOSE_ACTIONS:
        if category != v.ANY:
            bad(f"{act} rules take category '*', got {category!r}")
        if effect in (v.MASK, v.AGGREGATE):
            bad(f"{act} rules are allow or deny")
    return Rule(sub, purpose, category, act, effect, option, line, c.file) if ok else None


def _check_groups(groupings: Iterable[Grouping], c: Collector) -> None:
    parents: dict[str, set[str]] = {}
    for g in groupings:
        parents.setdefault(g.role, set()).add(g.group)

    def chain(role: str, seen: tuple[str, ...]) -> int:
        if role in seen:
            raise _Cycle(seen[seen.index(role):] + (role,))
        return 1 + max((chain(p, seen + (role,)) for p in parents.get(role, ())), default=0)

    reported: set[frozenset] = set()
    for g in groupings:
        try:
            if chain(g.role, ()) > v.MAX_DEPTH:  # Casbin follows at most MAX_DEPTH - 1 links
                c.error(g.line, f"role groups are nested deeper than {v.MAX_DEPTH} levels from {g.role!r}")
        except _Cycle as cyc:
            key = frozenset(cyc.path)
            if key not in reported:
                reported.add(key)
                c.error(g.line, "role groups form a cycle: " + " -> ".join(cyc.path))


class _Cycle(Exception):
    def __init__(self, path: tuple[str, ...]) -> None:
        self.path = path


def parse_policy_csv(text: str, purposes: Container[str], categories: Container[str], file: str = FILE) -> RuleSet:
    """Parse policy.csv against the known purposes and categories; all problems raise one ``PolicyError``.

    >>> rs = parse_policy_csv("p, app, billing, contact, read, allow\\ng, app, staff\\n", {"billing"}, {"contact"})
    >>> rs.rules[0].text, str(rs.groupings[0])
    ('p, app, billing, contact, read, allow', 'policy.csv:2: g, app, staff')
    >>> parse_policy_csv("p, app, billing, contact, read, alow\\n", {"billing"}, {"contact"})
    Traceback (most recent call last):
    ...
    proxy.policy.problems.PolicyError: policy.csv:1: unknown effect 'alow' (expected one of: deny, aggregate, mask, allow)
    """
    c = Collector(file)
    rules: list[Rule] = []
    groupings: list[Grouping] = []
    seen_rules: dict[tuple, int] = {}
    seen_groups: dict[tuple, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            fields = split_csv_line(stripped)
        except Exception as exc:  # csv.Error
            c.error(number, f"malformed line: {exc}")
            continue
        kind = fields[0] if fields else ""
        if kind == "p":
            rule = _check_rule(fields, number, purposes, categories, c)
            if rule is not None:
                if rule.fields in seen_rules:
                    c.error(number, f"duplicate of line {seen_rules[rule.fields]}")
                    continue
                seen_rules[rule.fields] = number
                rules.append(rule)
        elif kind == "g":
            if len(fields) != 3:
                c.error(number, f"a g line is 'g, role, group'; got {len(fields) - 1} field(s)")
                continue
            role, group = fields[1], fields[2]
            if not (v.is_subject_name(role) and v.is_subject_name(group)):
                c.error(number, f"invalid role or group name in {stripped!r}")
                continue
            if role == group:
                c.error(number, f"{role!r} cannot be a member of itself")
                continue
            if (role, group) in seen_groups:
                c.error(number, f"duplicate of line {seen_groups[(role, group)]}")
                continue
            seen_groups[(role, group)] = number
            groupings.append(Grouping(role, group, number, file))
        elif kind in ("g2", "g3"):
            source = "purposes.yaml" if kind == "g2" else "catalog.yaml"
            c.error(number, f"{kind} lines are derived from the dotted names in {source}; do not write them here")
        else:
            c.error(number, f"unknown line type {kind!r} (expected p or g)")
    _check_groups(groupings, c)
    c.raise_if_any()
    return RuleSet(tuple(rules), tuple(groupings), file)
