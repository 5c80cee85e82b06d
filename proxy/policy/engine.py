"""The loaded policy: validation across files, the version hash, and per-request rule decisions from a table Casbin fills at load.

``Policy.load(directory)`` reads catalog.yaml, purposes.yaml, model.conf and
policy.csv, validates them (``PolicyError`` names file, line and problem) and asks
Casbin's ``enforce_ex`` once for every (role or group, purpose, category, action).
The hot path (``decide``) is a dictionary lookup; a role the table does not know is
evaluated by Casbin on first use and memoised in a bounded cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Iterable, Mapping

from proxy.analysis.model import Column
from proxy.policy import vocabulary as v
from proxy.policy.casbin_model import (
    CATEGORY_CONJUNCT,
    REQUIRED_CONJUNCTS,
    PURPOSE_CONJUNCT,
    conjuncts,
    load_model,
    new_enforcer,
)
from proxy.policy.catalog import Catalog, parse_catalog
from proxy.policy.problems import PolicyError, Problem
from proxy.policy.purposes import Purposes, parse_purposes
from proxy.policy.rules import Rule, RuleSet, parse_policy_csv

FILES = ("catalog.yaml", "purposes.yaml", "model.conf", "policy.csv")
MEMO_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class RuleDecision:
    """What the rules say for one (role, purpose, category, action).

    ``effect`` is allow, deny, mask or aggregate; ``method`` is the mask method,
    ``k`` the aggregate threshold; ``rules`` the policy lines that decided it
    (empty for the default deny); ``note`` says why when no rule was consulted,
    or why the rules gave this decision (conflicting masks).

    >>> RuleDecision("mask", method="last4", rules=("policy.csv:3: p, app, support, payment.card, read, mask, last4",)).label
    'mask(last4)'
    >>> DEFAULT_DENY.label, DEFAULT_DENY.allowed, DEFAULT_DENY.why
    ('deny', False, 'no rule allows it (default deny)')
    """

    effect: str
    method: str | None = None
    k: int | None = None
    rules: tuple[str, ...] = ()
    note: str = ""

    @property
    def allowed(self) -> bool:
        return self.effect == v.ALLOW

    @property
    def denied(self) -> bool:
        return self.effect == v.DENY

    @property
    def label(self) -> str:
        if self.effect == v.MASK:
            return f"mask({self.method})"
        if self.effect == v.AGGREGATE:
            return f"aggregate(k={self.k})"
        return self.effect

    @property
    def why(self) -> str:
        """The rule line(s) (with the note, if any), or the reason no rule was consulted."""
        if self.rules:
            return "; ".join(self.rules) + (f" ({self.note})" if self.note else "")
        return self.note or "no rule allows it (default deny)"

    def to_dict(self) -> dict:
        out: dict = {"effect": self.effect, "rules": list(self.rules)}
        if self.method:
            out["method"] = self.method
        if self.k is not None:
            out["k"] = self.k
        if self.note:
            out["note"] = self.note
        return out


DEFAULT_DENY = RuleDecision(v.DENY)


def decision_of(rule: Rule | None, rivals: Iterable[Rule] = ()) -> RuleDecision:
    """The decision a decisive rule gives (None: default deny); with ``rivals``, applicable mask rules
    that conflict with it (``vocabulary.mask_conflict``), a deny naming them all.

    Which of such masks reveals less depends on the column's type, which the rules
    cannot know, so neither may decide: the request fails closed, and the refusal
    names the lines to reconcile.

    >>> decision_of(Rule("app", "statistics", "payment", "read", "aggregate", "k=5", line=9)).label
    'aggregate(k=5)'
    >>> d = decision_of(Rule("app", "support", "payment", "read", "mask", "last4", line=3),
    ...                 [Rule("ops", "support", "payment", "read", "mask", "generalize:20", line=4)])
    >>> d.label, len(d.rules), d.note
    ('deny', 2, "conflicting masks: which of last4, generalize:20 reveals less depends on the column's type")
    """
    if rule is None:
        return DEFAULT_DENY
    rivals = tuple(rivals)
    if rivals:
        methods = ", ".join(dict.fromkeys(r.option for r in (rule, *rivals)))
        return RuleDecision(v.DENY, rules=tuple(str(r) for r in (rule, *rivals)),
                            note=f"conflicting masks: which of {methods} reveals less depends on the column's type")
    return RuleDecision(rule.effect, rule.method, rule.k, (str(rule),))


def content_version(texts: Mapping[str, str]) -> str:
    """A short content hash of the policy files (name and text of each).

    >>> content_version({"a": "x"}) == content_version({"a": "x"}) != content_version({"a": "y"})
    True
    """
    h = hashlib.sha256()
    for name in sorted(texts):
        h.update(name.encode() + b"\0" + texts[name].encode() + b"\0")
    return h.hexdigest()[:16]


class Policy:
    """A validated purpose policy with its precomputed decision table. Immutable once loaded."""

    def __init__(self, catalog: Catalog, purposes: Purposes, ruleset: RuleSet, model_text: str, version: str,
                 source: str = "") -> None:
        self.catalog = catalog
        self.purposes = purposes
        self.ruleset = ruleset
        self.model_text = model_text
        self.version = version
        self.source = source
        self.ordered_rules = ruleset.in_precedence_order()
        self._by_fields = {r.fields: r for r in self.ordered_rules}
        self._by_name = {str(r): r for r in self.ordered_rules}
        self.groups = frozenset(g.group for g in ruleset.groupings)
        self.subjects = tuple(sorted(set(ruleset.subjects()) | set(purposes.defaults)))
        self.links = {
            "g": [(g.role, g.group) for g in ruleset.groupings],
            "g2": [(p, v.parent(p)) for p in sorted(purposes.purposes) if v.parent(p)],
            "g3": [(c, v.parent(c)) for c in sorted(catalog.categories) if v.parent(c)],
        }
        self.enforcer = new_enforcer(model_text, [r.fields for r in self.ordered_rules], self.links)
        self._memo: OrderedDict[tuple[str, str, str, str], RuleDecision] = OrderedDict()
        self._single: dict[tuple[str, ...], object] = {}
        self._table = self._build_table()

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> "Policy":
        """Load and validate the policy in ``directory`` (catalog.yaml, purposes.yaml, model.conf, policy.csv)."""
        directory = Path(directory)
        texts: dict[str, str] = {}
        problems = []
        for name in FILES:
            try:
                texts[name] = (directory / name).read_text(encoding="utf-8-sig")
            except FileNotFoundError:
                problems.append(Problem(name, None, f"missing: {directory / name} does not exist"))
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(Problem(name, None, f"cannot read {directory / name}: {exc}"))
        if problems:
            raise PolicyError(problems)
        return cls.from_texts(catalog=texts["catalog.yaml"], purposes=texts["purposes.yaml"],
                              model=texts["model.conf"], policy=texts["policy.csv"], source=str(directory))

    @classmethod
    def from_texts(cls, *, catalog: str, purposes: str, model: str, policy: str, source: str = "") -> "Policy":
        """Build a policy from the four files' text (no I/O); all problems raise one ``PolicyError``."""
        problems: list[Problem] = []
        parsed: dict = {}
        for name, parse, text in (("catalog", parse_catalog, catalog), ("purposes", parse_purposes, purposes),
                                  ("model", load_model, model)):
            try:
                parsed[name] = parse(text)
            except PolicyError as exc:
                problems.extend(exc.problems)
        if problems:  # policy.csv is checked against the other files: they must be sound first
            raise PolicyError(problems)
        consent = parsed["catalog"].consent
        for purpose in parsed["purposes"].purposes.values():
            if purpose.opt_in and (consent is None or not consent.granted):
                problems.append(Problem("purposes.yaml", purpose.line, f"purpose {purpose.name!r} is opt_in, but "
                                        "catalog.yaml has no consent section with granted values"))
        if problems:
            raise PolicyError(problems)
        ruleset = parse_policy_csv(policy, parsed["purposes"].purposes, parsed["catalog"].categories)
        version = content_version({"catalog.yaml": catalog, "purposes.yaml": purposes, "model.conf": model,
                                   "policy.csv": policy})
        return cls(parsed["catalog"], parsed["purposes"], ruleset, model, version, source)

    # -- the decision table ----------------------------------------------------------------

    def cells(self, subjects: Iterable[str] | None = None) -> Iterable[tuple[str, str, str, str]]:
        """Every request the table answers: (subject, purpose, category, action)."""
        categories = sorted(self.catalog.categories)
        for sub in self.subjects if subjects is None else subjects:
            for purpose in sorted(self.purposes.purposes):
                for act in v.ACTIONS:
                    for category in (categories if act in v.CATEGORY_ACTIONS else (v.ANY,)):
                        yield sub, purpose, category, act

    def _build_table(self) -> dict[tuple[str, str, str, str], RuleDecision]:
        # A cell's candidate rules are those whose subject the request's role is (or
        # belongs to), whose action matches and, where the matcher has the canonical
        # purpose and category conditions, whose purpose and category cover the cell:
        # the matcher requires all of these (checked in casbin_model), so no other
        # rule can apply, and no candidate means deny. When the matcher is exactly
        # those conditions, every candidate matches and Casbin, which takes rules in
        # precedence order, answers with the first: the table takes it without the
        # call. A matcher with further conditions is asked through Casbin per cell.
        # tests/unit/test_policy.py checks the table against the full enforcer.
        # A decisive mask rule is then checked against the other applicable masks
        # (which follow it in that order): a conflicting one turns the cell into a deny.
        present = conjuncts(self.enforcer.model["m"]["m"].value)
        canonical = present == {*REQUIRED_CONJUNCTS, PURPOSE_CONJUNCT, CATEGORY_CONJUNCT}
        rm = {key: self.enforcer.get_named_role_manager(key) for key in ("g", "g2", "g3")}
        up_purpose = {p: {q for q in self.purposes.purposes if rm["g2"].has_link(p, q)} | {v.ANY}
                      for p in self.purposes.purposes} if PURPOSE_CONJUNCT in present else None
        up_category = {c: {d for d in self.catalog.categories if rm["g3"].has_link(c, d)} | {v.ANY}
                       for c in self.catalog.categories} if CATEGORY_CONJUNCT in present else None
        if up_category is not None:
            up_category[v.ANY] = {v.ANY}
        interned: dict[tuple[str, ...] | None, RuleDecision] = {None: DEFAULT_DENY}
        table: dict[tuple[str, str, str, str], RuleDecision] = {}
        for sub in self.subjects:
            mine = [r for r in self.ordered_rules if rm["g"].has_link(sub, r.sub)]
            by_act = {act: [r for r in mine if r.act == act] for act in v.ACTIONS}
            enforcers = {} if canonical else {act: new_enforcer(self.model_text, [r.fields for r in rules], self.links)
                                              for act, rules in by_act.items() if rules}
            for cell in self.cells([sub]):
                _, purpose, category, act = cell
                applicable = (r for r in by_act[act]
                              if (up_purpose is None or r.purpose in up_purpose[purpose])
                              and (up_category is None or r.category in up_category[category]))
                first = next(applicable, None)
                if first is None:
                    table[cell] = DEFAULT_DENY
                    continue
                if canonical:
                    rule: Rule | None = first
                    rivals = tuple(r for r in takewhile(lambda r: r.effect == v.MASK, applicable)
                                   if v.mask_conflict(first.option, r.option)) if first.effect == v.MASK else ()
                else:
                    ok, fields = enforcers[act].enforce_ex(*cell)
                    rule = self._by_fields[tuple(fields)] if ok else None
                    rivals = self._rivals(rule, cell, by_act[act])
                key = (rule.fields if rule else None, tuple(r.fields for r in rivals))
                if key not in interned:
                    interned[key] = decision_of(rule, rivals)
                table[cell] = interned[key]
        return table

    def _rivals(self, rule: Rule | None, cell: tuple[str, str, str, str], candidates: Iterable[Rule]
                ) -> tuple[Rule, ...]:
        """The mask rules among ``candidates`` that apply at ``cell`` and conflict with the decisive ``rule``
        (each asked of Casbin alone, as ``applies_at`` does), in precedence order."""
        if rule is None or rule.effect != v.MASK:
            return ()
        rivals = [r for r in candidates if r.effect == v.MASK and v.mask_conflict(rule.option, r.option)]
        if not rivals:
            return ()
        role_manager = self.enforcer.get_role_manager()
        return tuple(r for r in rivals if role_manager.has_link(cell[0], r.sub) and r.act == cell[3]
                     and self._alone(r).enforce(*cell))

    def _alone(self, rule: Rule):
        """A Casbin enforcer with ``rule`` as its only rule (made once per rule)."""
        found = self._single.get(rule.fields)
        if found is None:
            found = self._single[rule.fields] = new_enforcer(self.model_text, [rule.fields], self.links)
        return found

    @property
    def table(self) -> Mapping[tuple[str, str, str, str], RuleDecision]:
        return self._table

    def enforce(self, role: str, purpose: str, category: str, action: str) -> RuleDecision:
        """Ask Casbin directly (``enforce_ex`` over all rules), bypassing the table."""
        ok, fields = self.enforcer.enforce_ex(role, purpose, category, action)
        rule = self._by_fields[tuple(fields)] if ok else None
        return decision_of(rule, self._rivals(rule, (role, purpose, category, action), self.ordered_rules))

    # -- the API -----------------------------------------------------------------------------

    def decide(self, role: str, purpose: str, category: str, action: str) -> RuleDecision:
        """The rule decision for ``role`` using ``category`` for ``action`` under ``purpose``.

        Unknown purposes, categories and actions are denied without consulting rules
        (a ``*`` rule must not admit a purpose nobody published).
        """
        key = (role, purpose, category, action)
        found = self._table.get(key)
        if found is not None:
            return found
        if purpose not in self.purposes.purposes:
            return RuleDecision(v.DENY, note=f"unknown purpose {purpose!r}")
        if action not in v.ACTIONS:
            return RuleDecision(v.DENY, note=f"unknown action {action!r}")
        if category != v.ANY and category not in self.catalog.categories:
            return RuleDecision(v.DENY, note=f"unknown category {category!r}")
        memo = self._memo
        found = memo.get(key)
        if found is not None:
            memo.move_to_end(key)
            return found
        found = self.enforce(*key)
        memo[key] = found
        if len(memo) > MEMO_LIMIT:
            memo.popitem(last=False)
        return found

    def may_declare(self, role: str, purpose: str) -> RuleDecision:
        """Whether ``role`` may act under ``purpose`` (a ``declare`` rule, category ``*``)."""
        return self.decide(role, purpose, v.ANY, v.DECLARE)

    def may_administer(self, role: str, purpose: str) -> RuleDecision:
        """Whether ``role`` may run administrative statements (DDL, CALL, DO, TRUNCATE) under ``purpose``."""
        return self.decide(role, purpose, v.ANY, v.ADMIN)

    def default_purpose(self, role: str) -> str | None:
        """The purpose ``role`` acts under when it declares none (purposes.yaml ``defaults``)."""
        return self.purposes.defaults.get(role)

    def is_purpose(self, name: str) -> bool:
        return name in self.purposes.purposes

    def consent_mode(self, purpose: str | None) -> str | None:
        """How per-subject consent filters rows under ``purpose``: ``opt_in`` (only subjects who consented),
        ``opt_out`` (all but subjects who withdrew), or None (no consent source, or not withdrawable)."""
        if self.catalog.consent is None or purpose is None or purpose not in self.purposes.purposes:
            return None
        if self.purposes.is_opt_in(purpose):
            return "opt_in"
        return "opt_out" if self.purposes.is_withdrawable(purpose) else None

    def consent_sources(self, purpose: str | None) -> tuple[str, ...]:
        """The tables whose rows decide which subjects' rows a statement under ``purpose`` may use: the consent
        table and the further sources (``consent: further_sources:``); () where consent filters nothing.

        >>> from proxy.devtools.sample import policies_dir
        >>> pol = Policy.load(policies_dir())
        >>> pol.consent_sources("marketing"), pol.consent_sources("billing")
        (('privacy.consents', 'member.guardian_consents'), ())
        """
        if self.consent_mode(purpose) is None:
            return ()
        return tuple(str(t) for t in self.catalog.consent.tables)

    def categories_of(self, column: Column) -> tuple[str, ...]:
        """The personal-information categories of ``column``; () when it is not personal."""
        return self.catalog.categories_of(column)

    def declarable_purposes(self, role: str) -> tuple[str, ...]:
        """The purposes ``role`` may declare, sorted."""
        return tuple(p for p in sorted(self.purposes.purposes) if self.may_declare(role, p).allowed)

    def purposes_allowing(self, role: str, category: str, action: str) -> tuple[str, ...]:
        """Purposes ``role`` may declare under which ``category`` is allowed (or masked) for ``action``."""
        return tuple(p for p in self.declarable_purposes(role)
                     if self.decide(role, p, category, action).effect in (v.ALLOW, v.MASK, v.AGGREGATE))

    def rule(self, fields: tuple[str, ...]) -> Rule | None:
        """The rule with these six Casbin fields."""
        return self._by_fields.get(tuple(fields))

    def rule_named(self, readable: str) -> Rule | None:
        """The rule a ``RuleDecision.rules`` entry (``policy.csv:12: p, ...``) names."""
        return self._by_name.get(readable)

    def applies_at(self, rule: Rule) -> list[tuple[str, str, str, str]]:
        """Every table cell where Casbin finds ``rule`` applicable (asked with that rule alone)."""
        enforcer = self._alone(rule)
        role_manager = self.enforcer.get_role_manager()
        subjects = [s for s in self.subjects if role_manager.has_link(s, rule.sub)]
        return [cell for cell in self.cells(subjects) if cell[3] == rule.act and enforcer.enforce(*cell)]

    def __repr__(self) -> str:
        return f"<Policy {self.source or '(text)'} version {self.version}: {len(self.ruleset.rules)} rules>"
