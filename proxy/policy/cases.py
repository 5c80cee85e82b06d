"""Policy test cases (policies/tests/*.yaml): parsing them and running them against a policy.

A case says: this role, under this purpose, running this SQL, gets this verdict
(allow, mask or block), optionally because of this column or category, for a mask
with this method, and with its rows filtered by the consent recorded in these
tables. The runner takes the SQL analyser as an argument, so it stays a pure
function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from proxy.analysis.model import Analysis, Column
from proxy.policy import vocabulary as v
from proxy.policy.decision import Allow, Block, Decision, Mask
from proxy.policy.engine import Policy
from proxy.policy.problems import Collector
from proxy.policy.sources import YamlList, YamlMap, load_yaml
from proxy.policy.verdict import Explanation, consent_tables, decide_statement, flatten

VERDICTS = ("allow", "mask", "block")
CASE_KEYS = ("name", "role", "purpose", "sql", "expect", "column", "category", "reason", "method", "search_path",
             "consent")
DEFAULT_SEARCH_PATH = ("$user", "public")

Analyze = Callable[..., Analysis]  # analyze(sql, schema, search_path=..., role=...) -> Analysis


@dataclass(frozen=True, slots=True)
class PolicyCase:
    """One expectation about the policy. ``purpose`` None means no purpose declared; ``method`` is the mask
    method (with its option) of ``column``, or of every masked column without one."""

    name: str
    role: str
    purpose: str | None
    sql: str
    expect: str
    column: str | None = None
    category: str | None = None
    reason: str | None = None
    search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH
    file: str = ""
    line: int | None = None
    method: str | None = None
    consent: tuple[str, ...] | None = None  # the tables whose consent decisions filter its rows; () for none

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file else ""
        return f"{where}{self.name}"


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: PolicyCase
    passed: bool
    actual: str  # allow | mask | block | error
    failures: tuple[str, ...] = ()
    explanation: Explanation | None = None

    def __str__(self) -> str:
        status = "ok" if self.passed else "FAIL"
        text = f"{status}: {self.case} (expected {self.case.expect}, got {self.actual})"
        return text + "".join(f"\n  {f}" for f in self.failures)


def parse_policy_cases(text: str, file: str = "tests.yaml") -> list[PolicyCase]:
    """Parse a test-case file: a mapping with ``cases:``, a list of mappings.

    >>> cases = parse_policy_cases('''
    ... cases:
    ...   - name: card numbers are masked for support
    ...     role: app
    ...     purpose: support
    ...     sql: SELECT card_number FROM billing.cards
    ...     expect: mask
    ...     column: billing.cards.card_number
    ...     method: last4
    ... ''')
    >>> cases[0].expect, cases[0].column, cases[0].method, cases[0].line
    ('mask', 'billing.cards.card_number', 'last4', 3)
    """
    c = Collector(file)
    doc = load_yaml(text, file)
    if not isinstance(doc, YamlMap) or not isinstance(doc.get("cases"), YamlList):
        c.error(1, "a test file is a mapping with a 'cases' list")
        c.raise_if_any()
    for key in doc:
        if key != "cases":
            c.error(doc.line_of(key), f"unknown key {key!r} (expected cases)")
    out: list[PolicyCase] = []
    items = doc["cases"]
    for i, item in enumerate(items):
        line = items.line_of(i)
        if not isinstance(item, YamlMap):
            c.error(line, "each case is a mapping")
            continue
        for key in item:
            if key not in CASE_KEYS:
                c.error(item.line_of(key), f"unknown key {key!r} (expected one of: {', '.join(CASE_KEYS)})")
        values: dict[str, Any] = {}
        for key in ("name", "role", "sql", "expect"):
            value = item.get(key)
            if not isinstance(value, str) or not value.strip():
                c.error(line, f"case needs {key} (text)")
            values[key] = value if isinstance(value, str) else ""
        for key in ("purpose", "column", "category", "reason", "method"):
            value = item.get(key)
            if value is not None and not isinstance(value, str):
                c.error(item.line_of(key), f"{key} must be text")
                value = None
            values[key] = value or None
        if values["expect"] and values["expect"] not in VERDICTS:
            c.error(item.line_of("expect"), f"expect must be one of {', '.join(VERDICTS)}, got {values['expect']!r}")
        if values["method"] is not None:
            if values["expect"] != "mask":
                c.error(item.line_of("method"), "method needs expect: mask")
            elif v.mask_reading(values["method"]) is None:
                c.error(item.line_of("method"), f"method {values['method']!r} is not a masking method with a valid "
                                                f"option (one of: {', '.join(v.MASK_METHODS)})")
        consent = item.get("consent")
        if consent is not None and (not isinstance(consent, list) or not all(isinstance(t, str) for t in consent)):
            c.error(item.line_of("consent"), "consent must be a list of schema.table (the consent sources), [] for "
                                             "none")
            consent = None
        path = item.get("search_path", list(DEFAULT_SEARCH_PATH))
        if isinstance(path, str):
            path = [p.strip() for p in path.split(",")]
        if not isinstance(path, list) or not all(isinstance(p, str) for p in path):
            c.error(item.line_of("search_path"), "search_path must be a list of schema names")
            path = list(DEFAULT_SEARCH_PATH)
        out.append(PolicyCase(values["name"], values["role"], values["purpose"], values["sql"], values["expect"],
                              values["column"], values["category"], values["reason"], tuple(path), file, line,
                              values["method"], tuple(consent) if consent is not None else None))
    c.raise_if_any()
    return out


def load_policy_cases(path: str | Path) -> list[PolicyCase]:
    """Read the cases of one YAML file, or of every ``*.yaml`` in a directory (sorted by name)."""
    path = Path(path)
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    cases: list[PolicyCase] = []
    for f in files:
        cases += parse_policy_cases(f.read_text(encoding="utf-8-sig"), str(f))
    return cases


def policy_probe(analysis: Analysis, explanation: Explanation) -> Decision:
    """A stand-in rewrite for policy tests: reports that the policy asks for a rewrite, without rewriting."""
    return Mask(sql=analysis.sql, methods=tuple(r.label for r in explanation.requirements), reason="policy-test")


def verdict_of(decision: Decision) -> str:
    """``allow``, ``mask`` or ``block`` for a decision.

    >>> verdict_of(Allow()), verdict_of(Block("no"))
    ('allow', 'block')
    """
    return {Allow: "allow", Mask: "mask", Block: "block"}[type(decision)]


def _implicated(expl: Explanation, verdict: str) -> tuple[set[str], set[str]]:
    """The columns and categories that determined ``verdict``."""
    if verdict == "mask":
        return {r.column for r in expl.requirements}, {r.category for r in expl.requirements}
    if verdict == "block":
        cols = {c.column for c in expl.columns if c.outcome == "block"}
        cats = {d.category for c in expl.columns if c.outcome == "block" for d in c.decisions
                if d.decision.denied or d.decision.effect == v.AGGREGATE}
        if expl.reason == "rewrite-unavailable":
            cols |= {r.column for r in expl.requirements}
            cats |= {r.category for r in expl.requirements}
        return cols, cats
    return {c.column for c in expl.columns}, {cat for c in expl.columns for cat in c.categories}


def method_failures(expl: Explanation, method: str, column: str | None) -> list[str]:
    """Why the masks of ``expl`` are not ``method`` (on ``column``, or on every masked column); [] when they are.

    Options that mean the same match (``partial`` is ``partial:1``).

    >>> from proxy.policy.verdict import Requirement
    >>> expl = Explanation("app", "support", "declared", "v1", ("select",), requirements=(
    ...     Requirement("b.c.card", "payment.card", "mask", "generalize:20", None, ()),))
    >>> method_failures(expl, "last4", "b.c.card")
    ['method of b.c.card is generalize:20, expected last4']
    >>> method_failures(expl, "generalize:20", None), method_failures(expl, "hash", "b.c.other")
    ([], ['no mask on b.c.other'])
    """
    masked = [r for r in expl.masks if column is None or r.column == column]
    if not masked:
        return [f"no mask on {column}" if column else "no column is masked"]
    want = v.mask_reading(method)
    return [f"method of {r.column} is {r.method}, expected {method}" for r in masked
            if (v.mask_reading(r.method or "") or r.method) != (want or method)]


def consent_failures(policy: Policy, analysis: Analysis, expl: Explanation, verdict: str,
                     expected: Sequence[str]) -> list[str]:
    """Why the consent sources filtering the statement's rows are not ``expected`` (in any order); [] when
    they are. A statement is filtered when it gets a rewrite and consent filters a table it touches under
    its purpose (``consent_tables``); it is then filtered by every source of ``Policy.consent_sources``.

    >>> from proxy.devtools.sample import policies_dir
    >>> pol = Policy.load(policies_dir())
    >>> consent_failures(pol, Analysis("", ()), Explanation("r", "billing", "declared", "v", ()), "allow",
    ...                  ["privacy.consents"])
    ['rows filtered by no consent source, expected privacy.consents']
    """
    statements = list(flatten(analysis.statements))
    filtered = verdict == "mask" and bool(consent_tables(statements, _touched_columns(statements, policy, expl),
                                                         policy, expl.purpose))
    actual = policy.consent_sources(expl.purpose) if filtered else ()
    if sorted(actual) == sorted(expected):
        return []
    found, wanted = ", ".join(actual) or "no consent source", ", ".join(expected) or "no consent source"
    return [f"rows filtered by {found}, expected {wanted}"]


def _touched_columns(statements: Sequence, policy: Policy, expl: Explanation) -> list[Column]:
    """The columns the statements use and those the declared functions they call read or write."""
    out = [c for st in statements for c in st.columns]
    for name in expl.functions:
        entry = policy.catalog.functions.get(name)
        out += [*entry.reads, *entry.writes] if entry is not None else []
    return out


def run_policy_tests(policy: Policy, cases: Iterable[PolicyCase], analyze: Analyze, schema: Any
                     ) -> list[CaseResult]:
    """Run ``cases`` against ``policy``, analysing SQL with ``analyze(sql, schema, search_path=, role=)``.

    Mask and aggregate outcomes are reported as ``mask`` (the verdict the policy asks
    for), whether or not a rewrite is installed in the proxy.
    """
    results: list[CaseResult] = []
    for case in cases:
        try:
            analysis = analyze(case.sql, schema, search_path=case.search_path, role=case.role)
        except Exception as exc:
            results.append(CaseResult(case, False, "error", (f"analyze raised {type(exc).__name__}: {exc}",)))
            continue
        decision, expl = decide_statement(analysis, role=case.role, purpose=case.purpose, policy=policy,
                                          rewrite=policy_probe)
        actual = verdict_of(decision)
        failures: list[str] = []
        if actual != case.expect:
            failures.append(f"verdict {actual}: {expl.message or expl.reason}")
        else:
            cols, cats = _implicated(expl, actual)
            if case.column and case.column not in cols:
                failures.append(f"column {case.column} did not determine the verdict (got: {', '.join(sorted(cols)) or '-'})")
            if case.category and case.category not in cats:
                failures.append(f"category {case.category} did not determine the verdict "
                                f"(got: {', '.join(sorted(cats)) or '-'})")
            if case.reason and case.reason != expl.reason:
                failures.append(f"reason {expl.reason!r}, expected {case.reason!r}")
            if case.method:
                failures += method_failures(expl, case.method, case.column)
            if case.consent is not None:
                failures += consent_failures(policy, analysis, expl, actual, case.consent)
        results.append(CaseResult(case, not failures, actual, tuple(failures), expl))
    return results


def summary(results: Sequence[CaseResult]) -> str:
    """One line per failure and a count."""
    failed = [r for r in results if not r.passed]
    lines = [str(r) for r in failed]
    lines.append(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return "\n".join(lines)
