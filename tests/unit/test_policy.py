"""Unit tests of the policy layer: loading and validation, hierarchies, precedence, the decision
table against Casbin, statement verdicts on hand-built analyses, explanations, test cases and checks."""

from __future__ import annotations

import doctest
import importlib
import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.analysis.model import Analysis, Column, Kind, StatementAccess, Table, Use
from proxy.policy import engine as engine_module
from proxy.policy import vocabulary as v
from proxy.policy.cases import (
    PolicyCase,
    load_policy_cases,
    parse_policy_cases,
    policy_probe,
    run_policy_tests,
)
from proxy.policy.casbin_model import MODEL
from proxy.policy.checks import check_directory, check_policy
from proxy.policy.decision import Allow, Block, Mask
from proxy.policy.engine import DEFAULT_DENY, Policy, RuleDecision
from proxy.policy.problems import ERROR, WARNING, PolicyError
from proxy.policy.verdict import Explanation, decide_statement

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "policies"
BASIC = ROOT / "tests" / "fixtures" / "policies" / "basic"
BROKEN = ROOT / "tests" / "fixtures" / "policies" / "broken"
FILES = {"catalog": "catalog.yaml", "purposes": "purposes.yaml", "model": "model.conf", "policy": "policy.csv"}


# -- helpers ------------------------------------------------------------------------------------

def texts(directory: Path = BASIC) -> dict[str, str]:
    return {key: (directory / name).read_text(encoding="utf-8") for key, name in FILES.items()}


def build(**overrides: str) -> Policy:
    return Policy.from_texts(**{**texts(), **overrides})


def swap(text: str, old: str, new: str) -> str:
    assert old in text, f"fixture does not contain {old!r}"
    return text.replace(old, new, 1)


def line_with(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def load_errors(key: str, old: str, new: str) -> tuple[list, str]:
    """Mutate one fixture file, expect PolicyError; return its problems and the mutated text."""
    mutated = swap(texts()[key], old, new)
    with pytest.raises(PolicyError) as info:
        build(**{key: mutated})
    return list(info.value.problems), mutated


def c(name: str) -> Column:
    return Column(*name.split("."))


def stmt(kind: Kind = Kind.SELECT, cols: dict[str, Use] | None = None, **kw) -> StatementAccess:
    s = StatementAccess(kind, **kw)
    for name, use in (cols or {}).items():
        s.use(c(name), use)
    return s


def analysis(sql: str, *statements: StatementAccess, error: str | None = None) -> Analysis:
    return Analysis(sql, list(statements), error)


def select(sql: str = "SELECT ...", **cols: Use) -> Analysis:
    return analysis(sql, stmt(Kind.SELECT, {k.replace("__", "."): u for k, u in cols.items()}))


@pytest.fixture(scope="module")
def basic() -> Policy:
    return Policy.load(BASIC)


@pytest.fixture(scope="module")
def sample() -> Policy:
    return Policy.load(SAMPLE)


# -- doctests of the policy modules ----------------------------------------------------------------

@pytest.mark.parametrize("module", ["problems", "vocabulary", "sources", "catalog", "purposes", "rules", "narrowing",
                                    "casbin_model", "engine", "verdict", "checks", "cases"])
def test_docstring_examples(module):
    mod = importlib.import_module(f"proxy.policy.{module}")
    assert mod.__doc__ and mod.__doc__.strip(), "each module opens with a docstring"
    result = doctest.testmod(mod)
    assert result.failed == 0


# -- loading ------------------------------------------------------------------------------------------

def test_load_fixture(basic):
    assert basic.is_purpose("marketing.email") and not basic.is_purpose("nope")
    assert basic.default_purpose("analyst") == "statistics"
    assert basic.default_purpose("app") is None
    assert {"app", "analyst", "dba", "intern", "staff"} <= set(basic.subjects)
    assert basic.groups == {"staff", "app"}
    assert len(basic.version) == 16
    assert basic.version == Policy.load(BASIC).version


def test_version_is_a_content_hash():
    a = build()
    b = build(policy=texts()["policy"] + "\n# a comment\n")
    assert a.version != b.version
    assert build().version == a.version


def test_load_shipped_sample_policy(sample):
    assert sample.is_purpose("marketing.ads.behavioural")
    assert sample.default_purpose("admin") == "operations"
    assert check_policy(sample) == []
    assert (SAMPLE / "README.md").is_file()


def test_shipped_test_cases_parse_and_name_known_things(sample):
    cases = load_policy_cases(SAMPLE / "tests")
    assert len(cases) >= 10
    for case in cases:
        assert case.role in sample.subjects, case
        assert case.purpose is None or sample.is_purpose(case.purpose), case
        if case.category:
            assert case.category in sample.catalog.categories, case
        if case.column:
            assert sample.categories_of(c(case.column)), case
    assert {case.expect for case in cases} == {"allow", "mask", "block"}


def test_missing_file_is_named(tmp_path):
    for name in FILES.values():
        if name != "policy.csv":
            (tmp_path / name).write_text((BASIC / name).read_text())
    with pytest.raises(PolicyError) as info:
        Policy.load(tmp_path)
    (problem,) = info.value.problems
    assert problem.file == "policy.csv" and "does not exist" in problem.message


def test_broken_fixture_reports_every_problem_with_file_and_line():
    with pytest.raises(PolicyError) as info:
        Policy.load(BROKEN)
    problems = info.value.problems
    assert {p.file for p in problems} == {"catalog.yaml", "purposes.yaml"}
    assert all(p.line for p in problems)
    text = str(info.value)
    assert "catalog.yaml:" in text and "unknown category 'contact.mail'" in text
    assert "purposes.yaml:" in text and "needs a source" in text


# -- validation errors ------------------------------------------------------------------------------

CATALOG_ERRORS = [
    ("      email: [contact.email]", "      email: [contact.mail]", "email: [contact.mail]",
     "unknown category 'contact.mail'"),
    ("    personal_by_default: identity", "    personal_by_default: identiti", "personal_by_default: identiti",
     "personal_by_default: unknown category 'identiti'"),
    ("  billing: {personal_by_default: payment}", "  billing: {personal_by_default: money}", "money",
     "unknown category 'money'"),
    ("  contact.email: {description: E-mail address}", "  contakt.email: {description: E-mail address}",
     "contakt.email", "parent category 'contakt' is not defined"),
    ("  payment: {description: Payment data}", "  Payment: {description: Payment data}", "Payment:",
     "must be lower-case words"),
    ("  identity: {description: Identity}", "  identity: {}", "identity: {}", "needs a description"),
    ("  crm.members:", "  crm_members:", "crm_members", "must be written schema.table"),
    ("  crm.label: {reads: [crm.members.name]}", "  crm.label: {reads: [members.name]}", "crm.label",
     "must be written schema.table.column"),
    ("  crm.label: {reads: [crm.members.name]}", "  crm.label: {writes: []}", "crm.label", "'reads' is required"),
    ("    subject: member_id\n    personal_by_default: identity",
     "    subject: member_id\n    subject: id\n    personal_by_default: identity", "subject: id",
     "duplicate key 'subject'"),
    ("schemas:", "views:\nschemas:", "views:", "unknown key 'views'"),
    ("      member_id: []\n      name:", "      member_id: []\n      colour: [blue]\n      name:", "colour",
     "unknown category 'blue'"),
    # hunt 20: a value deleted and not yet written made the column "not personal"
    ("      email: [contact.email]\n", "      email:\n", "      email:", "column email has no value"),
]


@pytest.mark.parametrize("old,new,needle,message", CATALOG_ERRORS)
def test_catalog_errors(old, new, needle, message):
    problems, mutated = load_errors("catalog", old, new)
    match = [p for p in problems if message in p.message]
    assert match, [str(p) for p in problems]
    assert match[0].file == "catalog.yaml"
    assert match[0].line == line_with(mutated, needle)


PURPOSE_ERRORS = [
    ("  marketing: {description: Marketing, source: fixture}\n", "", "marketing.email",
     "parent purpose 'marketing' is not defined"),
    ("  ops: {description: Operations, source: fixture}", "  ops: {description: Operations}", "ops:",
     "needs a source"),
    ("  billing: {description: Billing, source: fixture}", "  billing: {source: fixture}", "billing:",
     "needs a description"),
    ("  dba: ops", "  dba: operations", "dba: operations", "unknown default purpose 'operations'"),
    ("  billing: {description: Billing, source: fixture}", "  billing: {description: Billing, source: x, law: y}",
     "law", "unknown key 'law'"),
    ("  billing: {description: Billing, source: fixture}", "  Billing!: {description: Billing, source: fixture}",
     "Billing!", "must be lower-case words"),
]


@pytest.mark.parametrize("old,new,needle,message", PURPOSE_ERRORS)
def test_purpose_errors(old, new, needle, message):
    problems, mutated = load_errors("purposes", old, new)
    match = [p for p in problems if message in p.message]
    assert match, [str(p) for p in problems]
    assert match[0].file == "purposes.yaml"
    assert match[0].line == line_with(mutated, needle)


MODEL_ERRORS = [
    ("r = sub, purpose, category, act", "r = sub, obj, act", "r = sub, obj", "request_definition must be"),
    ("p = sub, purpose, category, act, effect, option", "p = sub, purpose, category, act, eft, option",
     "p = sub", "no eft field"),
    ("e = priority(p.eft) || deny", "e = some(where (p.eft == allow))", "e = some", "priority(p.eft) || deny"),
    ("m = g(r.sub, p.sub) && ", "m = ", "m = ", "g(r.sub, p.sub)"),
    ("&& r.act == p.act", "&& r.act == p.act || r.sub == \"root\"", "m = ", "top-level ||"),
    ("g3 = _, _", "g3 = _, _, _", "g3 = ", "g3 must be '_, _'"),
    ("g3 = _, _\n", "", None, "[role_definition] must define exactly g, g2, g3"),
]


def test_yaml_syntax_error_names_file_line_and_context():
    problems, mutated = load_errors("catalog", "schemas:", "schemas: [")
    (problem,) = problems
    opened = line_with(mutated, "schemas: [")
    assert problem.file == "catalog.yaml" and problem.message.startswith("YAML: ")
    assert opened <= problem.line <= opened + 5
    assert f"flow sequence on line {opened}" in problem.message


@pytest.mark.parametrize("old,new,needle,message", MODEL_ERRORS)
def test_model_errors(old, new, needle, message):
    problems, mutated = load_errors("model", old, new)
    match = [p for p in problems if message in p.message]
    assert match, [str(p) for p in problems]
    assert match[0].file == "model.conf"
    if needle:
        assert match[0].line == line_with(mutated, needle)


@pytest.mark.parametrize("old,new", [
    ("&& r.act == p.act", '&& r.act == p.act && p.option != "last4"'),  # an extra condition
    ('(p.purpose == "*" || g2(r.purpose, p.purpose))', '(g2(r.purpose, p.purpose) || p.purpose == "*")'),
    ('(p.category == "*" || g3(r.category, p.category))', '(g3(r.category, p.category) || "*" == p.category)'),
])
def test_model_matcher_may_be_extended_and_the_table_still_equals_casbin(old, new):
    policy = build(model=swap(MODEL, old, new))
    assert policy.decide("app", "billing", "contact.email", "read").allowed
    for cell in policy.cells():
        assert policy.table[cell] == policy.enforce(*cell), cell
    extra_condition = "last4" in new
    assert policy.decide("app", "support", "payment.card", "read").denied is extra_condition


def test_model_that_is_not_casbin():
    with pytest.raises(PolicyError) as info:
        build(model="this is not a model\n")
    assert info.value.problems[0].file == "model.conf"


# (old, new, message, text of the line the problem must point at; None: the last line of ``new``)
RULE_ERRORS = [
    ("p, app, billing, contact, read, allow", "p, app, billing, contact, read, alow", "unknown effect 'alow'", None),
    ("p, app, support, payment.card, read, mask, last4", "p, app, support, payment.card, read, mask, last5",
     "unknown masking method 'last5'", None),
    ("p, app, support, payment.card, read, mask, last4", "p, app, support, payment.card, read, mask",
     "needs a masking method", None),
    ("p, app, support, payment.card, read, mask, last4", "p, app, support, payment.card, read, mask, partial:x",
     "masking method 'partial:x': partial does not take that option", None),
    ("p, app, support, payment.card, read, mask, last4", "p, app, support, payment.card, read, mask, year:2",
     "masking method 'year:2': year does not take that option", None),
    ("read, aggregate, k=5", "read, aggregate", "needs k=N", "p, analyst, statistics, payment.invoice, read, aggregate"),
    ("read, aggregate, k=5", "read, aggregate, k=1", "needs k=N with N >= 2", "aggregate, k=1"),
    ("p, app, billing, contact, read, allow", "p, app, billing, contact, read, allow, redact", "takes no option",
     None),
    ("p, app, support, contact, write, allow", "p, app, support, contact, write, mask, hash",
     "mask applies to reading only", None),
    ("p, app, billing, *, declare, allow", "p, app, billing, contact, declare, allow",
     "declare rules take category '*'", None),
    ("p, dba, ops, *, admin, allow", "p, dba, ops, *, admin, mask, redact", "admin rules are allow or deny", None),
    ("p, app, billing, contact, read, allow", "p, app, biling, contact, read, allow", "unknown purpose 'biling'",
     None),
    ("p, app, billing, contact, read, allow", "p, app, billing, contakt, read, allow",
     "unknown category 'contakt'", None),
    ("p, app, billing, contact, read, allow", "p, app, billing, contact, select, allow",
     "unknown action 'select'", None),
    ("p, app, billing, contact, read, allow", "p, app, billing, contact, read", "got 4 field(s)", None),
    ("g, intern, app", "g2, marketing.email, marketing", "g2 lines are derived", None),
    ("g, intern, app", "g3, contact.email, contact", "g3 lines are derived", None),
    ("g, intern, app", "x, intern, app", "unknown line type 'x'", None),
    ("g, intern, app", "g, intern", "a g line is 'g, role, group'", None),
    ("g, intern, app", "g, intern, app\ng, staff, intern", "role groups form a cycle: app -> staff -> intern -> app",
     "g, app, staff"),
    ("g, intern, app", "g, intern, intern", "cannot be a member of itself", None),
    ("g, intern, app", "g, intern, app\ng, intern, app", "duplicate of line", None),
    ("p, app, billing, contact, read, allow",
     "p, app, billing, contact, read, allow\np,app,billing,contact,read,allow", "duplicate of line", None),
    ("p, app, billing, contact, read, allow", "p, a pp, billing, contact, read, allow", "invalid role or group",
     None),
]


@pytest.mark.parametrize("old,new,message,at", RULE_ERRORS)
def test_policy_csv_errors(old, new, message, at):
    problems, mutated = load_errors("policy", old, new)
    match = [p for p in problems if message in p.message]
    assert match, [str(p) for p in problems]
    assert match[0].file == "policy.csv"
    at = at or new.splitlines()[-1]
    lines = [n for n, line in enumerate(mutated.splitlines(), 1) if at in line]
    assert match[0].line == lines[-1]


def test_all_errors_of_a_file_are_reported_at_once():
    text = swap(swap(texts()["policy"], "p, app, billing, contact, read, allow", "p, app, billing, contact, read, alow"),
                "p, app, support, contact, read, allow", "p, app, support, contakt, read, allow")
    with pytest.raises(PolicyError) as info:
        build(policy=text)
    assert len(info.value.problems) == 2
    assert [p.line for p in info.value.problems] == sorted(p.line for p in info.value.problems)


def test_group_nesting_deeper_than_casbin_follows_is_an_error():
    def chain(links: int) -> str:
        lines = [f"g, r{i}, r{i + 1}" for i in range(links)] + [f"p, r{links}, billing, *, declare, allow"]
        return texts()["policy"] + "\n".join(lines) + "\n"

    assert build(policy=chain(9)).may_declare("r0", "billing").allowed  # ten levels: Casbin follows them
    with pytest.raises(PolicyError) as info:
        build(policy=chain(10))
    assert any("deeper than 10" in p.message for p in info.value.problems)


# -- catalog lookups ------------------------------------------------------------------------------

def test_categories_of(basic):
    assert basic.categories_of(c("crm.members.email")) == ("contact.email",)
    assert basic.categories_of(c("crm.members.note")) == ("contact.email", "identity.name")
    assert basic.categories_of(c("crm.members.member_id")) == ()  # listed with []: not personal
    assert basic.categories_of(c("crm.members.nickname")) == ("identity",)  # table default: fail closed
    assert basic.categories_of(c("billing.payouts.iban")) == ("payment",)  # schema default
    assert basic.categories_of(c("billing.cards.member_id")) == ()
    assert basic.categories_of(c("public.settings.value")) == ()
    assert basic.catalog.subject_of(Table("crm", "members")) == c("crm.members.member_id")


# -- hierarchies, precedence, defaults ----------------------------------------------------------------

def test_parent_purpose_rule_covers_child(basic):
    # p, app, marketing, contact, read, allow
    d = basic.decide("app", "marketing.email", "contact.email", "read")
    assert d.allowed and d.rules == (f"policy.csv:{line_with(texts()['policy'], 'p, app, marketing, contact, read, allow')}: "
                                     "p, app, marketing, contact, read, allow",)


def test_child_purpose_rule_does_not_cover_parent(basic):
    # the deny on marketing.email/contact.phone does not reach marketing itself
    assert basic.decide("app", "marketing", "contact.phone", "read").allowed
    assert basic.decide("app", "marketing.email", "contact.phone", "read").denied


def test_parent_category_rule_covers_child(basic):
    for category in ("contact", "contact.email", "contact.phone"):
        assert basic.decide("app", "billing", category, "read").allowed
    assert basic.decide("app", "billing", "contact.email", "write").denied  # other action


def test_group_rule_covers_members_and_nested_members(basic):
    # p, staff, marketing, payment, read, deny: app is in staff, intern in app
    for role in ("app", "intern", "staff"):
        assert basic.decide(role, "marketing", "payment.card", "read").denied
    assert basic.decide("intern", "billing", "contact.email", "read").allowed  # inherits app's rules


def test_deny_beats_allow():
    rules = texts()["policy"] + "p, app, billing, contact.email, read, deny\n"
    policy = build(policy=rules)
    d = policy.decide("app", "billing", "contact.email", "read")
    assert d.denied and "p, app, billing, contact.email, read, deny" in d.rules[0]
    assert policy.decide("app", "billing", "contact.phone", "read").allowed


def test_deny_on_parent_beats_specific_allow_on_child():
    rules = texts()["policy"] + ("p, app, marketing.email, payment.card, read, allow\n"
                                 "p, app, marketing.email, payment.invoice, read, mask, hash\n")
    policy = build(policy=rules)
    assert policy.decide("app", "marketing.email", "payment.card", "read").denied
    assert policy.decide("app", "marketing.email", "payment.invoice", "read").denied


def test_mask_method_is_carried(basic):
    d = basic.decide("app", "support", "payment.card", "read")
    assert (d.effect, d.method, d.k) == ("mask", "last4", None)
    assert "p, app, support, payment.card, read, mask, last4" in d.rules[0]
    d = basic.decide("analyst", "statistics", "payment.invoice", "read")
    assert (d.effect, d.method, d.k) == ("aggregate", None, 5)


def test_most_restrictive_wins_regardless_of_file_order():
    extra = ["p, app, billing, contact.email, read, mask, partial",
             "p, app, billing, contact.email, read, mask, redact",
             "p, app, billing, contact.email, read, mask, hash",
             "p, app, billing, contact.phone, read, aggregate, k=3",
             "p, app, billing, contact.phone, read, aggregate, k=10",
             "p, app, billing, contact.phone, read, mask, redact"]
    for seed in range(4):
        random.Random(seed).shuffle(extra)
        policy = build(policy=texts()["policy"] + "\n".join(extra) + "\n")
        assert policy.decide("app", "billing", "contact.email", "read").label == "mask(redact)"
        assert policy.decide("app", "billing", "contact.phone", "read").label == "aggregate(k=10)"
        assert policy.decide("app", "billing", "contact", "read").allowed


def with_rules(*rules: str, **overrides: str) -> list[Policy]:
    """The basic policy with ``rules`` added above and below its own, in every order."""
    from itertools import permutations

    base = texts()["policy"].rstrip("\n") + "\n"
    return [build(policy=text, **overrides) for order in permutations(rules)
            for text in ("\n".join(order) + "\n" + base, base + "\n".join(order) + "\n")]


@pytest.mark.parametrize("rules,label", [
    # The tester's cases: an option that shows more must not win because its line comes first.
    (("partial:8", "partial"), "mask(partial)"),
    (("generalize:month", "year"), "mask(year)"),
    (("generalize:month", "generalize:year"), "mask(generalize:year)"),
    (("generalize:decade", "generalize:month", "year"), "mask(generalize:decade)"),
    (("partial:2,2", "partial:2"), "mask(partial:2)"),
    (("partial:3", "partial:0,2"), "mask(partial:0,2)"),
    # Across methods showing characters, the count decides: partial shows 1, last4 4.
    (("last4", "partial"), "mask(partial)"),
    (("last4", "partial:0,2"), "mask(partial:0,2)"),
    (("last4", "partial:8"), "mask(last4)"),
    (("partial:4", "last4"), "mask(partial:4)"),  # equal count: fewer from the end
    (("redact:hidden", "redact"), "mask(redact)"),
    (("hash", "email_domain", "partial:8"), "mask(hash)"),
    (("year", "hash"), "mask(year)"),
])
def test_mask_options_are_ranked_by_what_they_reveal_whatever_the_file_order(rules, label):
    subjects = ("app", "staff", "intern")  # rules on the role, its group and a member alike
    written = [f"p, {subjects[i % 3]}, billing, contact.email, read, mask, " + (f'"{rule}"' if "," in rule else rule)
               for i, rule in enumerate(rules)]
    for policy in with_rules(*written):
        d = policy.decide("intern", "billing", "contact.email", "read")
        assert d.label == label, (d.label, d.rules)
        assert policy.rule_named(d.rules[0]).option == label[5:-1]
        assert policy.table[("intern", "billing", "contact.email", "read")] == policy.enforce(
            "intern", "billing", "contact.email", "read")


@pytest.mark.parametrize("rules", [
    ("last4", "generalize:20"),  # the tester's card: a prefix of 20 on text, a range of 20 on a number
    ("generalize:10", "generalize:20"),  # larger reveals more on text, less on numbers
    ("generalize", "generalize:3"),  # the same on text, not on numbers (width 10)
    ("generalize:5", "partial:8"),
    ("generalize:month", "generalize"),
    ("email_domain", "generalize:2"),
])
def test_masks_whose_order_depends_on_the_column_type_conflict_and_deny(rules):
    written = [f"p, {sub}, billing, contact.email, read, mask, {rule}" for sub, rule in zip(("app", "staff"), rules)]
    for policy in with_rules(*written):
        d = policy.decide("app", "billing", "contact.email", "read")
        assert d.denied and d.effect == "deny", d
        assert sorted(policy.rule_named(r).option for r in d.rules) == sorted(rules)
        assert "conflicting masks" in d.note and "depends on the column's type" in d.why
        assert policy.table[("app", "billing", "contact.email", "read")] == policy.enforce(
            "app", "billing", "contact.email", "read")
        assert policy.decide("app", "billing", "contact.phone", "read").allowed  # other cells untouched


@pytest.mark.parametrize("rules,label", [
    (("generalize:20", "hash"), "mask(hash)"),  # hash and redact show no part of any value: no conflict
    (("generalize", "redact"), "mask(redact)"),
    (("generalize:10", "generalize:10"), "mask(generalize:10)"),  # the same mask from two rules
    (("generalize:20", "last4", "hash"), "mask(hash)"),  # a conflict a hash shows less than decides nothing
])
def test_generalize_next_to_redact_hash_or_itself_is_no_conflict(rules, label):
    written = [f"p, {('app', 'staff', 'intern')[i]}, billing, contact.email, read, mask, {rule}"
               for i, rule in enumerate(rules)]
    for policy in with_rules(*written):
        assert policy.decide("intern", "billing", "contact.email", "read").label == label  # in app, in staff


def test_conflicts_with_an_extended_matcher_equal_casbin():
    # Cells are then asked of Casbin one by one; the rivals of a mask too.
    model = swap(MODEL, "&& r.act == p.act", '&& r.act == p.act && p.option != "last4"')
    for policy in with_rules("p, staff, billing, contact.email, read, mask, generalize:20",
                             "p, app, billing, contact, read, mask, partial", model=model):
        for cell in policy.cells():
            assert policy.table[cell] == policy.enforce(*cell), cell
        assert policy.decide("app", "billing", "contact.email", "read").denied
        assert policy.decide("app", "billing", "contact.phone", "read").label == "mask(partial)"
        assert policy.decide("app", "support", "payment.card", "read").denied  # last4 excluded by the matcher


SAMPLE_RULES = {
    "card": ("p, staff, support, payment.card, read, mask, last4",
             "p, customer_care, support, payment, read, mask, generalize:20"),
    "phone": ("p, staff, support_quality, contact.phone, read, mask, partial",
              "p, customer_care, support_quality, contact.phone, read, mask, partial:8"),
    "birth": ("p, staff, support, identity.birth_date, read, mask, year",
              "p, customer_care, support, identity.birth_date, read, mask, generalize:month"),
}


@pytest.mark.parametrize("above", [True, False])
def test_the_reported_sample_policy_changes(above):
    """A rule added to the shipped policy above or below its own rule: the file order no longer decides."""
    base = texts(SAMPLE)

    def policy_with(which: str) -> Policy:
        own, added = SAMPLE_RULES[which]
        assert own + "\n" in base["policy"]
        text = base["policy"].replace(own + "\n", (f"{added}\n{own}\n" if above else f"{own}\n{added}\n"))
        return Policy.from_texts(**{**base, "policy": text})

    card = policy_with("card").decide("app_support", "support", "payment.card", "read")
    assert card.denied and "generalize:20" in card.why and "last4" in card.why
    assert policy_with("phone").decide("trainer", "support_quality", "contact.phone", "read").label == "mask(partial)"
    assert policy_with("birth").decide("app_support", "support", "identity.birth_date", "read").label == "mask(year)"
    decision, _ = decide_statement(select(billing__payment_methods__card_number=Use.PROJECT), role="app_support",
                                   purpose="support", policy=policy_with("card"), rewrite=policy_probe)
    assert isinstance(decision, Block) and "conflicting masks" in decision.detail
    assert "conflicting masks: which of" in decision.message and "mask rules" in decision.hint  # not a plain deny


def test_default_deny(basic):
    assert basic.decide("app", "billing", "payment.card", "write") == DEFAULT_DENY
    assert basic.decide("app", "statistics", "contact.email", "read") == DEFAULT_DENY
    assert DEFAULT_DENY.rules == () and "default deny" in DEFAULT_DENY.why


def test_unknown_purpose_category_action_are_denied_even_with_wildcards(basic):
    # p, dba, ops, *, read, mask, redact must not admit names nobody published
    assert basic.decide("dba", "ops", "contact.email", "read").label == "mask(redact)"
    assert basic.decide("dba", "opz", "contact.email", "read").note == "unknown purpose 'opz'"
    assert basic.decide("dba", "ops", "contact.emial", "read").note == "unknown category 'contact.emial'"
    assert basic.decide("dba", "ops", "contact.email", "drop").note == "unknown action 'drop'"
    for d in (basic.decide("dba", "opz", "contact.email", "read"), basic.decide("dba", "ops", "x", "read")):
        assert d.denied


def test_declare_rules(basic):
    assert basic.may_declare("app", "billing").allowed
    assert basic.may_declare("app", "marketing.email").allowed  # through the parent purpose
    assert basic.may_declare("intern", "support").allowed  # through the group
    assert not basic.may_declare("app", "statistics").allowed
    assert not basic.may_declare("analyst", "billing").allowed
    assert not basic.may_declare("app", "nope").allowed
    assert basic.declarable_purposes("app") == ("billing", "marketing", "marketing.email", "support")
    d = basic.may_declare("analyst", "statistics")
    assert d.allowed and "p, analyst, statistics, *, declare, allow" in d.rules[0]
    assert basic.may_administer("dba", "ops").allowed and not basic.may_administer("app", "billing").allowed


def test_declare_deny_beats_declare_allow():
    policy = build(policy=texts()["policy"] + "p, intern, marketing, *, declare, deny\n")
    assert not policy.may_declare("intern", "marketing.email").allowed
    assert policy.may_declare("app", "marketing.email").allowed


def test_unknown_roles_go_to_casbin_and_are_memoised_boundedly(monkeypatch):
    policy = build()
    calls = []
    real = policy.enforce

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(policy, "enforce", counting)
    monkeypatch.setattr(engine_module, "MEMO_LIMIT", 3)
    assert policy.decide("mallory", "billing", "contact.email", "read").denied
    assert policy.decide("mallory", "billing", "contact.email", "read").denied
    assert len(calls) == 1  # memoised
    for i in range(5):
        policy.decide(f"user{i}", "billing", "contact.email", "read")
    assert len(policy._memo) == 3  # bounded
    policy.decide("app", "billing", "contact.email", "read")
    assert len(calls) == 6  # table hits never reach Casbin


# -- the decision table equals Casbin --------------------------------------------------------------

def test_decision_table_equals_casbin_for_every_combination(basic, sample):
    for policy in (basic, sample):
        cells = list(policy.cells())
        assert len(cells) == len(policy.table)
        for cell in cells:
            assert policy.table[cell] == policy.enforce(*cell), cell
            assert policy.decide(*cell) is policy.table[cell]


SUBS = ("a", "b", "grp", "top")
PURPOSES = ("p", "p.x", "p.x.y", "q")
CATEGORIES = ("c", "c.x", "c.y", "d")
PROPERTY_CATALOG = ("categories:\n" + "".join(f"  {n}: {{description: {n}}}\n" for n in CATEGORIES)
                    + "tables:\n  s.t:\n    columns:\n      x: [c.x]\n")
PROPERTY_PURPOSES = ("purposes:\n" + "".join(f"  {n}: {{description: {n}, source: test}}\n" for n in PURPOSES))


MASK_OPTIONS = ("partial:8", "partial:0,4", "redact:x", "generalize:20", "generalize:3", "generalize:month",
                "generalize:century")


@st.composite
def random_rules(draw):
    groupings = draw(st.lists(st.sampled_from([("a", "grp"), ("b", "grp"), ("grp", "top"), ("b", "top")]),
                              unique=True))
    rules = []
    for _ in range(draw(st.integers(0, 14))):
        act = draw(st.sampled_from(v.ACTIONS))
        if act in v.PURPOSE_ACTIONS:
            category, effect = "*", draw(st.sampled_from((v.ALLOW, v.DENY)))
        else:
            category = draw(st.sampled_from(CATEGORIES + ("*",)))
            effects = v.EFFECTS if act == v.READ else (v.ALLOW, v.DENY)
            effect = draw(st.sampled_from(effects))
        option = ""
        if effect == v.MASK:
            option = draw(st.sampled_from(v.MASK_METHODS + MASK_OPTIONS))
        elif effect == v.AGGREGATE:
            option = f"k={draw(st.integers(2, 9))}"
        rule = (draw(st.sampled_from(SUBS)), draw(st.sampled_from(PURPOSES + ("*",))), category, act, effect, option)
        if rule not in rules:
            rules.append(rule)
    return groupings, rules


def oracle(groupings, rules, cell) -> tuple:
    """A naive reading of the documented semantics, independent of Casbin."""
    sub, purpose, category, act = cell
    parents = {}
    for role, group in groupings:
        parents.setdefault(role, set()).add(group)

    def closure(name):
        seen, todo = {name}, [name]
        while todo:
            for p in parents.get(todo.pop(), ()):
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen

    def covers(rule_name, name):
        return rule_name == "*" or name == rule_name or name.startswith(rule_name + ".")

    applicable = [r for r in rules if r[0] in closure(sub) and covers(r[1], purpose) and covers(r[2], category)
                  and r[3] == act]
    if not applicable:
        return (v.DENY, None, None)
    best = min(applicable, key=lambda r: v.precedence(r[4], r[5] if r[4] == v.MASK else None,
                                                      v.parse_k(r[5]) if r[4] == v.AGGREGATE else None))
    if best[4] == v.MASK and any(r[4] == v.MASK and v.mask_conflict(best[5], r[5]) for r in applicable):
        return (v.DENY, None, None)  # masks whose order depends on the column type
    return (best[4], best[5] if best[4] == v.MASK else None, v.parse_k(best[5]) if best[4] == v.AGGREGATE else None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_rules(), st.randoms(use_true_random=False))
def test_property_table_equals_casbin_and_the_documented_semantics(drawn, rnd):
    groupings, rules = drawn
    lines = [f"g, {r}, {g}" for r, g in groupings] + [
        "p, " + ", ".join(r[:5]) + ((f', "{r[5]}"' if "," in r[5] else f", {r[5]}") if r[5] else "") for r in rules]
    rnd.shuffle(lines)
    policy = Policy.from_texts(catalog=PROPERTY_CATALOG, purposes=PROPERTY_PURPOSES, model=MODEL,
                               policy="\n".join(lines) + "\n")
    for cell in list(policy.cells()) + [("zed", "p.x", "c.x", "read"), ("a", "q", "*", "read")]:
        got = policy.decide(*cell)
        assert got == policy.enforce(*cell), cell
        assert (got.effect, got.method, got.k) == oracle(groupings, rules, cell), cell
        if got.rules and not got.note:
            rule = policy.rule_named(got.rules[0])
            assert rule is not None and (rule.effect, rule.method, rule.k) == (got.effect, got.method, got.k)
        elif got.rules:  # conflicting masks: every line named is a mask rule
            assert all(policy.rule_named(r).effect == v.MASK for r in got.rules)


# -- decide_statement -------------------------------------------------------------------------------

def test_allow_with_explanation(basic):
    a = select(crm__members__email=Use.PROJECT, crm__members__member_id=Use.FILTER)
    decision, expl = decide_statement(a, role="app", purpose="billing", policy=basic)
    assert decision == Allow("policy")
    assert expl.verdict == "allow" and expl.purpose == "billing" and expl.purpose_source == "declared"
    email = next(col for col in expl.columns if col.column == "crm.members.email")
    assert email.uses == ("project",) and email.categories == ("contact.email",) and email.outcome == "allow"
    assert email.decisions[0].decision.allowed
    member = next(col for col in expl.columns if col.column == "crm.members.member_id")
    assert member.outcome == "not personal"


def test_no_personal_data_needs_no_purpose(basic):
    decision, expl = decide_statement(select(crm__members__member_id=Use.PROJECT, public__t__x=Use.FILTER),
                                      role="app", purpose=None, policy=basic)
    assert isinstance(decision, Allow) and expl.reason == "no personal data"
    decision, _ = decide_statement(analysis("SELECT 1", stmt(Kind.SELECT)), role="nobody", purpose=None,
                                   policy=basic)
    assert isinstance(decision, Allow)


def test_deny_blocks_naming_purpose_category_column_rule_and_hint(basic):
    a = select(crm__members__email=Use.PROJECT, billing__cards__card_number=Use.PROJECT)
    decision, expl = decide_statement(a, role="app", purpose="marketing.email", policy=basic)
    assert isinstance(decision, Block) and decision.sqlstate == "42501"
    assert decision.reason == "denied"
    assert '"marketing.email"' in decision.message and '"payment.card"' in decision.message
    assert "billing.cards.card_number" in decision.detail
    assert "p, staff, marketing, payment, read, deny" in decision.detail
    assert "policy.csv:" in decision.detail
    assert "billing" in decision.hint and "support" in decision.hint  # purposes that would do
    assert "remove billing.cards.card_number" in decision.hint
    assert expl.verdict == "block" and expl.message == decision.message


def test_default_deny_detail_says_so(basic):
    decision, _ = decide_statement(select(crm__members__phone=Use.PROJECT), role="analyst", purpose="statistics",
                                   policy=basic)
    assert isinstance(decision, Block)
    assert "crm.members.phone (contact.phone, read): no rule allows it (default deny)" in decision.detail
    assert "No purpose role analyst may declare covers contact.phone" in decision.hint


def test_write_needs_a_write_rule(basic):
    ins = analysis("INSERT ...", stmt(Kind.INSERT, {"billing.invoices.amount": Use.WRITE,
                                                    "billing.invoices.member_id": Use.WRITE}))
    assert isinstance(decide_statement(ins, role="app", purpose="billing", policy=basic)[0], Allow)
    upd = analysis("UPDATE ...", stmt(Kind.UPDATE, {"crm.members.email": Use.WRITE,
                                                    "crm.members.member_id": Use.FILTER}))
    decision, _ = decide_statement(upd, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and "may not write" in decision.message
    assert isinstance(decide_statement(upd, role="app", purpose="support", policy=basic)[0], Allow)


def test_returning_is_a_read_as_well_as_a_write(basic):
    upd = analysis("UPDATE ... RETURNING", stmt(Kind.UPDATE, {"billing.invoices.amount": Use.WRITE | Use.PROJECT}))
    assert isinstance(decide_statement(upd, role="app", purpose="billing", policy=basic)[0], Allow)
    decision, expl = decide_statement(upd, role="dba", purpose="ops", policy=basic)  # write allow, read redact
    assert isinstance(decision, Block) and decision.reason == "rewrite-unavailable"
    assert {d.action for d in expl.columns[0].decisions} == {"read", "write"}


def test_delete_is_a_write(basic):
    delete = analysis("DELETE ...", stmt(Kind.DELETE, {"crm.members.email": Use.DELETE,
                                                       "crm.members.member_id": Use.DELETE | Use.FILTER}))
    decision, _ = decide_statement(delete, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and "may not write" in decision.message
    assert isinstance(decide_statement(delete, role="app", purpose="support", policy=basic)[0], Allow)


def test_mask_without_rewrite_blocks_fail_closed(basic):
    a = select(billing__cards__card_number=Use.PROJECT)
    decision, expl = decide_statement(a, role="app", purpose="support", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "rewrite-unavailable"
    assert "column billing.cards.card_number requires masking (method last4)" in decision.message
    assert "masking rewrite unavailable" in decision.message
    assert expl.masks[0].column == "billing.cards.card_number" and expl.masks[0].method == "last4"
    assert expl.columns[0].outcome == "mask" and expl.columns[0].method == "last4"


def test_mask_with_rewrite_returns_its_mask(basic):
    seen = []

    def rewrite(an: Analysis, ex: Explanation):
        seen.append(ex)
        return Mask(sql="SELECT rewritten", methods=tuple(r.method for r in ex.masks), reason="mask")

    a = select(billing__cards__card_number=Use.PROJECT, crm__members__name=Use.PROJECT)
    decision, expl = decide_statement(a, role="app", purpose="support", policy=basic, rewrite=rewrite)
    assert decision == Mask(sql="SELECT rewritten", methods=("last4",), reason="mask")
    assert expl.verdict == "mask"
    assert [(r.column, r.category, r.method) for r in seen[0].masks] == [
        ("billing.cards.card_number", "payment.card", "last4")]


def test_a_failing_or_wrong_rewrite_blocks(basic):
    a = select(billing__cards__card_number=Use.PROJECT)

    def broken(an, ex):
        raise RuntimeError("boom 'secret'")

    decision, _ = decide_statement(a, role="app", purpose="support", policy=basic, rewrite=broken)
    assert isinstance(decision, Block) and decision.reason == "rewrite-error" and "secret" not in decision.message
    decision, _ = decide_statement(a, role="app", purpose="support", policy=basic, rewrite=lambda an, ex: Allow())
    assert isinstance(decision, Block) and decision.reason == "rewrite-error"
    refusal = Block("cannot mask inside a window function", reason="rewrite")
    decision, expl = decide_statement(a, role="app", purpose="support", policy=basic,
                                      rewrite=lambda an, ex: refusal)
    assert decision is refusal and expl.verdict == "block"


def test_aggregate_only(basic):
    agg = select(billing__invoices__amount=Use.AGGREGATE)
    decision, expl = decide_statement(agg, role="analyst", purpose=None, policy=basic)  # default purpose
    assert expl.purpose == "statistics" and expl.purpose_source == "default"
    assert isinstance(decision, Block) and decision.reason == "rewrite-unavailable"
    assert "k=5" in decision.message
    assert expl.aggregates[0].k == 5
    decision, _ = decide_statement(agg, role="analyst", purpose=None, policy=basic, rewrite=policy_probe)
    assert isinstance(decision, Mask) and decision.methods == ("aggregate(k=5)",)
    for use in (Use.PROJECT, Use.FILTER | Use.AGGREGATE, Use.WHOLE_ROW):
        row = select(billing__invoices__amount=use)
        decision, expl = decide_statement(row, role="analyst", purpose=None, policy=basic, rewrite=policy_probe)
        assert isinstance(decision, Block) and decision.reason == "aggregate-only", use
        assert "only inside aggregate functions" in decision.message
        assert expl.columns[0].outcome == "block"


def test_multi_category_column_takes_the_strictest(basic):
    # note: [contact.email, identity.name]; marketing: contact allow, identity.name mask partial
    decision, expl = decide_statement(select(crm__members__note=Use.PROJECT), role="app", purpose="marketing",
                                      policy=basic)
    assert expl.columns[0].outcome == "mask" and expl.columns[0].method == "partial"
    assert len(expl.columns[0].decisions) == 2
    # statistics: contact.email masked, identity.name default deny: the deny wins
    decision, _ = decide_statement(select(crm__members__note=Use.PROJECT), role="analyst", purpose="statistics",
                                   policy=basic)
    assert isinstance(decision, Block) and '"identity.name"' in decision.message


def test_analysis_error_blocks(basic):
    a = analysis("SELECT FROM WHERE 'x'", error="Invalid expression / Unexpected token near 'x'")
    decision, expl = decide_statement(a, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and decision.sqlstate == "42501" and decision.reason == "analysis-error"
    assert "could not analyse the statement with certainty" in decision.message
    assert "Unexpected token" in decision.message


def test_unsupported_blocks_even_in_inner_statements(basic):
    inner = stmt(Kind.SELECT, {"crm.members.email": Use.PROJECT}, unsupported=["dynamic SQL in a function body"])
    a = analysis("PREPARE p AS ...", stmt(Kind.PREPARE, inner=inner, prepared_name="p"))
    decision, expl = decide_statement(a, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "unsupported"
    assert "could not analyse the statement with certainty: dynamic SQL in a function body" in decision.message
    assert expl.statements == ("prepare", "select")


def test_inner_statement_columns_are_decided(basic):
    inner = stmt(Kind.SELECT, {"billing.cards.card_number": Use.PROJECT})
    a = analysis("EXPLAIN ANALYZE ...", stmt(Kind.EXPLAIN, inner=inner))
    decision, _ = decide_statement(a, role="app", purpose="marketing", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "denied"


def test_functions(basic):
    undeclared = analysis("SELECT crm.f(email) ...", stmt(Kind.SELECT, {"crm.members.email": Use.PROJECT},
                                                          functions={"crm.f"}))
    decision, _ = decide_statement(undeclared, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "function" and "crm.f" in decision.message
    opaque = analysis("SELECT query_to_xml(...)", stmt(Kind.SELECT, functions={"pg_catalog.query_to_xml"}))
    decision, _ = decide_statement(opaque, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "function"
    builtin = analysis("SELECT lower(email)", stmt(Kind.SELECT, {"crm.members.email": Use.PROJECT},
                                                   functions={"pg_catalog.lower", "pg_catalog.count"}))
    assert isinstance(decide_statement(builtin, role="app", purpose="billing", policy=basic)[0], Allow)
    # a declared function counts as reading what it declares
    declared = analysis("SELECT crm.label(member_id)", stmt(Kind.SELECT, {"crm.members.member_id": Use.PROJECT},
                                                            functions={"crm.label"}))
    assert isinstance(decide_statement(declared, role="app", purpose="billing", policy=basic)[0], Allow)
    decision, expl = decide_statement(declared, role="analyst", purpose="statistics", policy=basic)
    assert isinstance(decision, Block) and '"identity.name"' in decision.message
    name = next(col for col in expl.columns if col.column == "crm.members.name")
    assert name.via == ("crm.label",)
    writes = analysis("SELECT crm.touch()", stmt(Kind.SELECT, functions={"crm.touch"}))
    decision, _ = decide_statement(writes, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and "may not write" in decision.message


def test_no_purpose_blocks_when_personal_data_is_touched(basic):
    decision, expl = decide_statement(select(crm__members__email=Use.PROJECT), role="app", purpose=None,
                                      policy=basic)
    assert isinstance(decision, Block) and decision.reason == "no-purpose"
    assert decision.message.startswith("no purpose declared")
    assert "crm.members.email" in decision.message
    assert "SET pii.purpose" in decision.hint and "billing" in decision.hint
    assert expl.columns[0].outcome == "undecided" and expl.columns[0].categories == ("contact.email",)
    decision, _ = decide_statement(select(crm__members__email=Use.PROJECT), role="app", purpose="", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "no-purpose"


def test_undeclarable_and_unknown_purposes_block(basic):
    decision, _ = decide_statement(select(crm__members__email=Use.PROJECT), role="app", purpose="statistics",
                                   policy=basic)
    assert isinstance(decision, Block) and decision.reason == "purpose-not-declarable"
    assert '"app"' in decision.message and '"statistics"' in decision.message
    decision, expl = decide_statement(select(crm__members__email=Use.PROJECT), role="app",
                                      purpose="x' OR 1=1", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "unknown-purpose"
    assert "OR 1=1" not in decision.message and "OR 1=1" not in expl.to_text()


def test_administrative_statements_need_admin(basic):
    ddl = analysis("CREATE TABLE t (x int)", stmt(Kind.DDL))
    decision, expl = decide_statement(ddl, role="dba", purpose=None, policy=basic)
    assert isinstance(decision, Allow)
    assert [name for name, _ in expl.checks] == ["declare", "admin"]
    decision, _ = decide_statement(ddl, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "admin-denied" and "ddl" in decision.message
    decision, _ = decide_statement(ddl, role="app", purpose=None, policy=basic)
    assert isinstance(decision, Block) and decision.reason == "no-purpose"
    for kind in (Kind.CALL, Kind.DO, Kind.OTHER):
        decision, _ = decide_statement(analysis("...", stmt(kind)), role="app", purpose="billing", policy=basic)
        assert isinstance(decision, Block) and decision.reason == "admin-denied", kind


def test_truncate_needs_admin_and_write(basic):
    cols = {"crm.members.email": Use.DELETE, "crm.members.member_id": Use.DELETE}
    truncate = analysis("TRUNCATE crm.members", stmt(Kind.TRUNCATE, cols))
    assert isinstance(decide_statement(truncate, role="dba", purpose="ops", policy=basic)[0], Allow)
    policy = build(policy=swap(texts()["policy"], "p, dba, ops, *, write, allow\n", ""))
    decision, _ = decide_statement(truncate, role="dba", purpose="ops", policy=policy)
    assert isinstance(decision, Block) and "may not write" in decision.message


def test_set_purpose_is_checked(basic):
    ok = analysis("SET pii.purpose = 'support'", stmt(Kind.SET, settings=[("pii.purpose", "support", False)]))
    assert isinstance(decide_statement(ok, role="app", purpose=None, policy=basic)[0], Allow)
    reset = analysis("RESET pii.purpose", stmt(Kind.SET, settings=[("pii.purpose", None, False)]))
    assert isinstance(decide_statement(reset, role="app", purpose="billing", policy=basic)[0], Allow)
    bad = analysis("SET pii.purpose = 'statistics'", stmt(Kind.SET, settings=[("pii.purpose", "statistics", False)]))
    decision, _ = decide_statement(bad, role="app", purpose=None, policy=basic)
    assert isinstance(decision, Block) and decision.reason == "purpose-not-declarable"
    unknown = analysis("SET pii.purpose = 'zz'", stmt(Kind.SET, settings=[("pii.purpose", "zz-secret", False)]))
    decision, _ = decide_statement(unknown, role="app", purpose=None, policy=basic)
    assert isinstance(decision, Block) and decision.reason == "unknown-purpose"
    assert "zz-secret" not in decision.message
    mixed = analysis("SET pii.purpose = 'support'; SELECT email FROM crm.members",
                     stmt(Kind.SET, settings=[("pii.purpose", "support", False)]),
                     stmt(Kind.SELECT, {"crm.members.email": Use.PROJECT}))
    decision, _ = decide_statement(mixed, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "purpose-change"


# -- explanations ---------------------------------------------------------------------------------------

SECRET_SQL = ("SELECT email, card_number FROM crm.members JOIN billing.cards USING (member_id) "
              "WHERE email = 'hanako.yamada@example.jp' AND card_number = '4111111111111111' "
              "AND phone = $q$090-1234-5678$q$ AND member_id = 987654")
SECRETS = ("hanako.yamada@example.jp", "4111111111111111", "090-1234-5678", "987654")


def secret_analysis(**kw) -> Analysis:
    return analysis(SECRET_SQL, stmt(Kind.SELECT, {"crm.members.email": Use.PROJECT | Use.FILTER,
                                                   "billing.cards.card_number": Use.PROJECT | Use.FILTER,
                                                   "crm.members.phone": Use.FILTER,
                                                   "crm.members.member_id": Use.FILTER,
                                                   "billing.cards.member_id": Use.FILTER}, **kw))


@pytest.mark.parametrize("purpose", ["billing", "support", "marketing.email", None, "statistics"])
def test_explanation_lists_rules_and_columns_and_never_literals(basic, purpose):
    decision, expl = decide_statement(secret_analysis(), role="app", purpose=purpose, policy=basic)
    text = expl.to_text()
    blob = json.dumps(expl.to_dict(), ensure_ascii=False)
    assert json.loads(blob)["verdict"] == expl.verdict
    for rendering in (text, blob, repr(decision)):
        for secret in SECRETS:
            assert secret not in rendering
    assert "crm.members.email" in text and "crm.members.email" in blob
    if purpose in ("billing", "support", "marketing.email"):
        assert "policy.csv:" in text and "p, app, " in text
        assert any(d["rules"] for col in expl.to_dict()["columns"] for d in col["decisions"])


def test_explanation_text_shows_uses_categories_decisions_and_verdict(basic):
    _, expl = decide_statement(secret_analysis(), role="app", purpose="marketing.email", policy=basic)
    text = expl.to_text()
    assert text.splitlines()[0].startswith("verdict: block (42501): ")
    assert "purpose: marketing.email (declared)" in text
    assert "billing.cards.card_number  [project, filter]  -> block" in text
    assert "payment.card read: deny  policy.csv:" in text
    assert "crm.members.phone  [filter]  -> block" in text  # marketing.email denies contact.phone
    d = expl.to_dict()
    assert d["purpose"] == "marketing.email" and d["policy_version"] == basic.version
    card = next(col for col in d["columns"] if col["column"] == "billing.cards.card_number")
    assert card["uses"] == ["project", "filter"] and card["categories"] == ["payment.card"]
    assert card["decisions"][0]["effect"] == "deny"
    assert "p, staff, marketing, payment, read, deny" in card["decisions"][0]["rules"][0]


def test_reasons_from_the_analysis_are_scrubbed_of_literals(basic):
    a = secret_analysis(unsupported=["cannot resolve 'hanako.yamada@example.jp' = 987654 in a lateral join"])
    decision, expl = decide_statement(a, role="app", purpose="billing", policy=basic)
    assert isinstance(decision, Block) and decision.reason == "unsupported"
    for rendering in (decision.message, expl.to_text(), json.dumps(expl.to_dict())):
        for secret in SECRETS:
            assert secret not in rendering
    assert "lateral join" in decision.message
    err = analysis(SECRET_SQL, error="Unexpected token near '4111111111111111'")
    decision, expl = decide_statement(err, role="app", purpose="billing", policy=basic)
    assert "4111111111111111" not in decision.message and "4111111111111111" not in expl.to_text()


# -- policy test cases ----------------------------------------------------------------------------------

CASES_YAML = """
cases:
  - name: billing reads e-mail
    role: app
    purpose: billing
    sql: Q1
    expect: allow
    column: crm.members.email
  - name: support masks cards
    role: app
    purpose: support
    sql: Q2
    expect: mask
    category: payment.card
  - name: marketing may not read cards
    role: app
    purpose: marketing
    sql: Q2
    expect: block
    column: billing.cards.card_number
    reason: denied
  - name: wrong expectation
    role: app
    purpose: billing
    sql: Q2
    expect: block
  - name: wrong column
    role: app
    purpose: marketing
    sql: Q2
    expect: block
    column: crm.members.email
  - name: analyser fails
    role: app
    sql: BROKEN
    expect: allow
"""


def fake_analyze(sql, schema, search_path=("$user", "public"), role=""):
    assert schema == {"crm.members": ["email"]} and role == "app"
    if sql == "BROKEN":
        raise ValueError("cannot parse")
    return {"Q1": select(sql, crm__members__email=Use.PROJECT),
            "Q2": select(sql, billing__cards__card_number=Use.PROJECT)}[sql]


def test_run_policy_tests(basic):
    cases = parse_policy_cases(CASES_YAML, "t.yaml")
    results = run_policy_tests(basic, cases, fake_analyze, {"crm.members": ["email"]})
    outcome = {r.case.name: r for r in results}
    assert outcome["billing reads e-mail"].passed
    assert outcome["support masks cards"].passed and outcome["support masks cards"].actual == "mask"
    assert outcome["marketing may not read cards"].passed
    assert not outcome["wrong expectation"].passed and outcome["wrong expectation"].actual == "allow"
    assert not outcome["wrong column"].passed and "crm.members.email" in outcome["wrong column"].failures[0]
    assert outcome["analyser fails"].actual == "error" and not outcome["analyser fails"].passed
    assert "t.yaml:" in str(outcome["wrong column"])


METHOD_CASES_YAML = """
cases:
  - name: support masks cards with last4
    role: app
    purpose: support
    sql: Q2
    expect: mask
    column: billing.cards.card_number
    method: last4
  - name: any masked column
    role: app
    purpose: support
    sql: Q2
    expect: mask
    method: last4
  - name: another method
    role: app
    purpose: support
    sql: Q2
    expect: mask
    column: billing.cards.card_number
    method: partial:4
  - name: a column not masked
    role: app
    purpose: support
    sql: Q2
    expect: mask
    column: crm.members.email
    method: last4
"""


def test_policy_cases_assert_the_mask_method(basic):
    cases = parse_policy_cases(METHOD_CASES_YAML, "t.yaml")
    assert [case.method for case in cases] == ["last4", "last4", "partial:4", "last4"]
    outcome = {r.case.name: r for r in run_policy_tests(basic, cases, fake_analyze, {"crm.members": ["email"]})}
    assert outcome["support masks cards with last4"].passed and outcome["any masked column"].passed
    assert not outcome["another method"].passed and outcome["another method"].actual == "mask"
    assert outcome["another method"].failures == ("method of billing.cards.card_number is last4, expected partial:4",)
    assert not outcome["a column not masked"].passed
    # options that mean the same match
    partial = build(policy=swap(texts()["policy"], "card, read, mask, last4", "card, read, mask, partial"))
    same = parse_policy_cases(METHOD_CASES_YAML.replace("method: last4", "method: partial:1,0"), "t.yaml")[:1]
    assert run_policy_tests(partial, same, fake_analyze, {"crm.members": ["email"]})[0].passed


def test_policy_case_method_errors():
    with pytest.raises(PolicyError) as info:
        parse_policy_cases("cases:\n  - {name: n, role: r, sql: s, expect: allow, method: last4}\n"
                           "  - {name: n, role: r, sql: s, expect: mask, method: blur}\n"
                           "  - {name: n, role: r, sql: s, expect: mask, method: 'partial:x'}\n", "t.yaml")
    messages = [str(p) for p in info.value.problems]
    assert "t.yaml:2: method needs expect: mask" in messages
    assert any(m.startswith("t.yaml:3: method 'blur' is not a masking method") for m in messages)
    assert any(m.startswith("t.yaml:4: method 'partial:x'") for m in messages)


def test_shipped_cases_catch_the_reported_policy_changes():
    """`purpose-proxy check` fails for each change the tester made (the cases assert the method)."""
    base = texts(SAMPLE)
    cases = [case for case in load_policy_cases(SAMPLE / "tests") if case.sql in SAMPLE_ANALYSES]

    def analyze(sql, schema, search_path=("$user", "public"), role=""):
        return Analysis(sql, SAMPLE_ANALYSES[sql])

    for own, changed in ((SAMPLE_RULES["card"][0], SAMPLE_RULES["card"][1] + "\n" + SAMPLE_RULES["card"][0]),
                         (SAMPLE_RULES["phone"][0], SAMPLE_RULES["phone"][0].replace("partial", "partial:8")),
                         (SAMPLE_RULES["birth"][0], SAMPLE_RULES["birth"][0].replace("year", "generalize:month")),
                         ("p, staff, marketing, identity.birth_date, read, mask, year",
                          "p, staff, marketing, identity.birth_date, read, mask, generalize:month"),
                         ("p, staff, operator_training, contact.phone, read, mask, redact",
                          "p, staff, operator_training, contact.phone, read, mask, last4")):
        policy = Policy.from_texts(**{**base, "policy": swap(base["policy"], own + "\n", changed + "\n")})
        failed = [r for r in run_policy_tests(policy, cases, analyze, schema=None) if not r.passed]
        assert failed, changed


def test_policy_case_file_errors():
    with pytest.raises(PolicyError) as info:
        parse_policy_cases("cases:\n  - name: x\n    role: app\n    sql: S\n    expect: maybe\n    colour: red\n",
                           "t.yaml")
    messages = [str(p) for p in info.value.problems]
    assert "t.yaml:5: expect must be one of allow, mask, block, got 'maybe'" in messages
    assert any("t.yaml:6: unknown key 'colour'" in m for m in messages)
    with pytest.raises(PolicyError):
        parse_policy_cases("- just a list\n", "t.yaml")
    case = parse_policy_cases("cases:\n  - {name: n, role: r, sql: s, expect: allow, search_path: 'a, b'}\n")[0]
    assert case == PolicyCase("n", "r", None, "s", "allow", search_path=("a", "b"), file="tests.yaml", line=2)


# -- static checks ----------------------------------------------------------------------------------------

def test_check_policy_clean_fixture(basic):
    assert check_policy(basic) == []


def test_check_purposes_nobody_may_declare_and_bad_defaults():
    purposes = texts()["purposes"].replace("defaults:", "  orphan: {description: O, source: s}\ndefaults:") \
        + "  app: statistics\n"
    problems = check_policy(build(purposes=purposes))
    orphan = [p for p in problems if "'orphan' cannot be declared" in p.message]
    assert orphan and orphan[0].severity == WARNING and orphan[0].line == line_with(purposes, "orphan:")
    default = [p for p in problems if "default purpose 'statistics'" in p.message]
    assert default and default[0].severity == ERROR and default[0].file == "purposes.yaml"
    assert problems[0].severity == ERROR  # errors first


def test_check_shadowed_and_redundant_rules():
    rules = texts()["policy"] + ("p, app, marketing, payment.card, read, allow\n"
                                 "p, app, billing, contact.email, read, allow\n")
    problems = check_policy(build(policy=rules))
    shadowed = [p for p in problems if p.line == line_with(rules, "p, app, marketing, payment.card, read, allow")]
    assert shadowed and "shadowed by deny p, staff, marketing, payment, read, deny" in shadowed[0].message
    redundant = [p for p in problems if p.line == line_with(rules, "p, app, billing, contact.email, read, allow")]
    assert redundant and "p, app, billing, contact, read, allow" in redundant[0].message


def test_check_rules_that_can_never_take_effect():
    rules = texts()["policy"] + "p, app, statistics, contact.email, read, allow\n"
    problems = check_policy(build(policy=rules))
    assert any("can never take effect" in p.message and p.line == len(rules.splitlines()) for p in problems)


def test_check_with_database_roles(basic):
    problems = check_policy(basic, roles=["app", "analyst", "dba"])
    assert any("'intern'" in p.message and p.file == "policy.csv" for p in problems)
    problems = check_policy(build(policy=texts()["policy"] + "p, ap, billing, contact, read, allow\n"),
                            roles=["app", "analyst", "dba", "intern"])
    assert any("rule for 'ap'" in p.message for p in problems)


def test_check_against_schema(basic):
    schema = {
        Table("crm", "members"): ["member_id", "name", "email", "note", "shoe_size"],  # phone missing
        "billing.cards": {"member_id": "int", "card_number": "text"},
        # billing.invoices missing
    }
    problems = check_policy(basic, schema=schema)
    text = "\n".join(str(p) for p in problems)
    assert "column crm.members.phone is not in the database schema" in text
    assert "table billing.invoices is not in the database schema" in text
    assert "function crm.touch: column crm.members.phone is not in the database schema" in text
    assert "shoe_size" not in text  # covered by the table's personal_by_default
    no_default = build(catalog=swap(texts()["catalog"], "    personal_by_default: identity\n", ""))
    problems = check_policy(no_default, schema=schema)
    uncatalogued = [p for p in problems if "shoe_size" in p.message]
    assert uncatalogued and uncatalogued[0].severity == WARNING and "treated as not personal" in uncatalogued[0].message


def test_check_against_an_analysis_style_schema(basic):
    class Rel:
        def __init__(self, columns):
            self.columns = tuple(columns)

    class StubSchema:  # the shape of proxy.analysis.schema.Schema: relation(schema, name) -> info | None
        relations = {("crm", "members"): Rel(["member_id", "name", "email", "phone", "note"]),
                     ("billing", "cards"): Rel(["member_id", "card_number"]),
                     ("billing", "invoices"): Rel(["member_id"])}

        def relation(self, schema, name):
            return self.relations.get((schema, name))

    problems = check_policy(basic, schema=StubSchema())
    assert [p.message for p in problems] == ["column billing.invoices.amount is not in the database schema"]


def test_check_directory_returns_load_errors():
    problems = check_directory(BROKEN)
    assert problems and all(p.severity == ERROR for p in problems)
    assert check_directory(BASIC) == []


def test_rule_decision_value():
    d = RuleDecision("aggregate", k=5, rules=("policy.csv:1: p, a, b, c, read, aggregate, k=5",))
    assert d.label == "aggregate(k=5)" and not d.allowed and not d.denied
    assert d.to_dict() == {"effect": "aggregate", "k": 5, "rules": ["policy.csv:1: p, a, b, c, read, aggregate, k=5"]}
    with pytest.raises(Exception):
        d.effect = "allow"  # frozen


# -- the shipped sample cases, with the analyses the SQL analyser is expected to produce ---------------

P, F, W, AGG = Use.PROJECT, Use.FILTER, Use.WRITE, Use.AGGREGATE
SAMPLE_ANALYSES = {
    "SELECT member_id FROM browsing.cookies WHERE cookie_id = 'c0ffee' AND auto_login":
        [stmt(Kind.SELECT, {"browsing.cookies.member_id": P, "browsing.cookies.cookie_id": F,
                            "browsing.cookies.auto_login": F})],
    "INSERT INTO billing.payments (payment_id, invoice_id, member_id, method_id, paid_at, amount) "
    "VALUES (1, 2, 3, 4, now(), 5478)":
        [stmt(Kind.INSERT, {"billing.payments.payment_id": W, "billing.payments.invoice_id": W,
                            "billing.payments.member_id": W, "billing.payments.method_id": W,
                            "billing.payments.paid_at": W, "billing.payments.amount": W})],
    "SELECT member_id, billing.outstanding_balance(member_id) FROM member.members WHERE status = 'suspended'":
        [stmt(Kind.SELECT, {"member.members.member_id": P, "member.members.status": F},
              functions={"billing.outstanding_balance"})],
    "SELECT member_id, score FROM credit.assessments":
        [stmt(Kind.SELECT, {"credit.assessments.member_id": P, "credit.assessments.score": P})],
    "SELECT family_name, unpaid_amount FROM credit.nonpayer_exchange WHERE direction = 'received'":
        [stmt(Kind.SELECT, {"credit.nonpayer_exchange.family_name": P, "credit.nonpayer_exchange.unpaid_amount": P,
                            "credit.nonpayer_exchange.direction": F})],
    "SELECT unpaid_amount FROM credit.nonpayer_exchange":
        [stmt(Kind.SELECT, {"credit.nonpayer_exchange.unpaid_amount": P})],
    "SELECT family_name FROM credit.nonpayer_exchange":
        [stmt(Kind.SELECT, {"credit.nonpayer_exchange.family_name": P})],
    "INSERT INTO telecom.notices (notice_id, member_id, kind, channel, sent_at) "
    "VALUES (1, 42, 'fee_change', 'email', now())":
        [stmt(Kind.INSERT, {"telecom.notices.notice_id": W, "telecom.notices.member_id": W,
                            "telecom.notices.kind": W, "telecom.notices.channel": W, "telecom.notices.sent_at": W})],
    "SELECT legal_name, tax_address, individual_number, prize_value, withholding_tax FROM prizes.winners":
        [stmt(Kind.SELECT, {"prizes.winners.legal_name": P, "prizes.winners.tax_address": P,
                            "prizes.winners.individual_number": P, "prizes.winners.prize_value": P,
                            "prizes.winners.withholding_tax": P})],
    "SELECT legal_name, individual_number FROM prizes.winners":
        [stmt(Kind.SELECT, {"prizes.winners.legal_name": P, "prizes.winners.individual_number": P})],
    "SELECT individual_number FROM prizes.winners WHERE member_id = 42":
        [stmt(Kind.SELECT, {"prizes.winners.individual_number": P, "prizes.winners.member_id": F})],
    "SELECT m.email FROM member.members m JOIN billing.payment_methods p ON p.member_id = m.member_id "
    "WHERE p.card_brand = 'VISA'":
        [stmt(Kind.SELECT, {"member.members.email": P, "member.members.member_id": F,
                            "billing.payment_methods.member_id": F, "billing.payment_methods.card_brand": F})],
    "SELECT email FROM member.members WHERE billing.outstanding_balance(member_id) = 0":
        [stmt(Kind.SELECT, {"member.members.email": P, "member.members.member_id": F},
              functions={"billing.outstanding_balance"})],
    "SELECT family_name, given_name, email FROM member.members WHERE prefecture = '大阪府' AND status = 'active'":
        [stmt(Kind.SELECT, {"member.members.family_name": P, "member.members.given_name": P,
                            "member.members.email": P, "member.members.prefecture": F, "member.members.status": F})],
    "SELECT given_name, birth_date FROM member.members":
        [stmt(Kind.SELECT, {"member.members.given_name": P, "member.members.birth_date": P})],
    "SELECT family_name, birth_date FROM member.members WHERE member_id = 42":
        [stmt(Kind.SELECT, {"member.members.family_name": P, "member.members.birth_date": P,
                            "member.members.member_id": F})],
    "SELECT email FROM member.members": [stmt(Kind.SELECT, {"member.members.email": P})],
    "SELECT name, monthly_fee FROM service.plans WHERE kind = 'ftth'":
        [stmt(Kind.SELECT, {"service.plans.name": P, "service.plans.monthly_fee": P, "service.plans.kind": F})],
    "SELECT cookie_id, url, os, platform FROM browsing.page_views WHERE viewed_at > now() - interval '1 day'":
        [stmt(Kind.SELECT, {"browsing.page_views.cookie_id": P, "browsing.page_views.url": P,
                            "browsing.page_views.os": P, "browsing.page_views.platform": P,
                            "browsing.page_views.viewed_at": F})],
    "SELECT os, count(DISTINCT member_id) FROM browsing.page_views GROUP BY os":
        [stmt(Kind.SELECT, {"browsing.page_views.os": P | F, "browsing.page_views.member_id": AGG},
              functions={"pg_catalog.count"})],
    "SELECT member_id, url FROM browsing.page_views":
        [stmt(Kind.SELECT, {"browsing.page_views.member_id": P, "browsing.page_views.url": P})],
    "SELECT url, count(*) FROM browsing.page_views GROUP BY url ORDER BY 2 DESC":
        [stmt(Kind.SELECT, {"browsing.page_views.url": P | F}, functions={"pg_catalog.count"})],
    "SELECT family_name, url FROM browsing.member_page_views":  # the view, resolved to its base columns
        [stmt(Kind.SELECT, {"member.members.family_name": P, "browsing.page_views.url": P,
                            "member.members.member_id": F, "browsing.page_views.member_id": F})],
    "SELECT card_brand, card_number FROM billing.payment_methods WHERE member_id = 42":
        [stmt(Kind.SELECT, {"billing.payment_methods.card_brand": P, "billing.payment_methods.card_number": P,
                            "billing.payment_methods.member_id": F})],
    "SELECT started_at, transcript FROM support.call_recordings WHERE member_id = 42":
        [stmt(Kind.SELECT, {"support.call_recordings.started_at": P, "support.call_recordings.transcript": P,
                            "support.call_recordings.member_id": F})],
    "SELECT caller_number, transcript FROM support.call_recordings":
        [stmt(Kind.SELECT, {"support.call_recordings.caller_number": P, "support.call_recordings.transcript": P})],
    "SELECT transcript FROM support.call_recordings":
        [stmt(Kind.SELECT, {"support.call_recordings.transcript": P})],
    "SELECT member_id, email FROM member.members":
        [stmt(Kind.SELECT, {"member.members.member_id": P, "member.members.email": P})],
    "CREATE INDEX page_views_viewed_at ON browsing.page_views (viewed_at)": [stmt(Kind.DDL)],
    "DROP TABLE billing.invoices": [stmt(Kind.DDL)],
    "SELECT assigned_ip, started_at FROM telecom.access_sessions":
        [stmt(Kind.SELECT, {"telecom.access_sessions.assigned_ip": P, "telecom.access_sessions.started_at": P})],
    "SELECT name, email FROM partners.delivery_recipients":
        [stmt(Kind.SELECT, {"partners.delivery_recipients.name": P, "partners.delivery_recipients.email": P})],
    "SELECT name, phone FROM events.participants":
        [stmt(Kind.SELECT, {"events.participants.name": P, "events.participants.phone": P})],
}


def test_shipped_sample_cases_pass_with_hand_built_analyses(sample):
    def analyze(sql, schema, search_path=("$user", "public"), role=""):
        return Analysis(sql, SAMPLE_ANALYSES[sql])

    cases = [case for case in load_policy_cases(SAMPLE / "tests") if case.sql in SAMPLE_ANALYSES]
    assert len(cases) >= 30
    results = run_policy_tests(sample, cases, analyze, schema=None)
    assert all(r.passed for r in results), "\n".join(str(r) for r in results if not r.passed)


def test_dotted_hierarchies_deeper_than_casbin_follows_are_errors():
    deep = ".".join(f"l{i}" for i in range(11))
    chain = "".join(f"  {'.'.join(deep.split('.')[:n])}: {{description: d, source: s}}\n" for n in range(1, 12))
    with pytest.raises(PolicyError) as info:
        build(purposes="purposes:\n" + chain)
    assert any("nested deeper than 10 levels" in p.message for p in info.value.problems)


def test_readme_examples_are_valid():
    import re

    from proxy.policy.casbin_model import load_model
    from proxy.policy.catalog import parse_catalog
    from proxy.policy.purposes import parse_purposes

    readme = (SAMPLE / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(\w*)\n(.*?)```", readme, re.S)
    yaml_blocks = [text for lang, text in blocks if lang == "yaml"]
    catalog = parse_catalog(yaml_blocks[0])
    assert catalog.categories_of(c("crm.members.contact_info")) == ("contact.email", "contact.phone")
    assert catalog.categories_of(c("crm.members.added_later")) == ("contact",)
    assert parse_purposes(yaml_blocks[1]).defaults == {"analyst": "statistics"}
    model = next(text for lang, text in blocks if "[request_definition]" in text)
    load_model(model)
    cases = parse_policy_cases(next(text for text in yaml_blocks if text.startswith("cases:")))
    assert cases[0].search_path == ("public",)


def test_a_consent_subject_of_another_kind_is_an_error(tmp_path):
    # The consent filter compares a table's subject with the consent table's: events.participants
    # once named participant_id, so under marketing the rows of members who withdrew showed
    # (their participant ids are not their member ids) while others' rows were hidden.
    shutil.copytree(SAMPLE, tmp_path / "p")
    catalog = tmp_path / "p" / "catalog.yaml"
    catalog.write_text(swap(catalog.read_text(), "    subject: member_id\n    columns:\n      participant_id: []",
                            "    subject: participant_id\n    columns:\n      participant_id: []"))
    problems = check_policy(Policy.load(tmp_path / "p"))
    assert [p.severity for p in problems] == [ERROR]
    assert "events.participants" in problems[0].message and "marketing.announcements" in problems[0].message
    assert problems[0].line == line_with(catalog.read_text(), "  events.participants:")


def test_consent_decisions_any_purpose_may_rewrite_are_an_error(tmp_path):
    # With privacy.consents.status unclassified, a marketing session could run
    # UPDATE privacy.consents SET status = 'granted' ... and see everyone who withdrew.
    shutil.copytree(SAMPLE, tmp_path / "p")
    catalog = tmp_path / "p" / "catalog.yaml"
    catalog.write_text(swap(catalog.read_text(), "      status: [consent.decision]", "      status: []"))
    problems = check_policy(Policy.load(tmp_path / "p"))
    assert [p.severity for p in problems] == [ERROR]
    assert "privacy.consents: status not classified" in problems[0].message


def test_under_the_shipped_policy_only_the_stop_of_use_procedure_touches_consent_decisions(sample):
    writers = {p for role in sample.subjects for p in sample.purposes_allowing(role, "consent.decision", v.WRITE)}
    readers = {p for role in sample.subjects for p in sample.purposes_allowing(role, "consent.decision", v.READ)}
    assert writers == {"disclosure_requests"}
    assert readers <= {"disclosure_requests", "operations"}  # operations reads everything redacted


# -- further consent sources: a guardian's consent for minors (catalog.yaml consent: further_sources) -------------

GUARDIAN_SOURCE = "    - table: member.guardian_consents\n      subject: member_id\n      revoked: revoked_at\n"


def sample_with(tmp_path: Path, old: str, new: str) -> tuple[Path, str]:
    """A copy of the shipped policy with one change to catalog.yaml; its directory and the new catalog text."""
    shutil.copytree(SAMPLE, tmp_path / "p")
    catalog = tmp_path / "p" / "catalog.yaml"
    catalog.write_text(swap(catalog.read_text(), old, new))
    return tmp_path / "p", catalog.read_text()


def test_the_shipped_policy_filters_by_the_guardians_consent_under_withdrawable_purposes_only(sample):
    assert [str(f.table) for f in sample.catalog.consent.further] == ["member.guardian_consents"]
    for purpose in ("marketing", "marketing.ads.third_party", "research", "research.behaviour_analysis",
                    "partner_referral"):
        assert sample.consent_sources(purpose) == ("privacy.consents", "member.guardian_consents"), purpose
    for purpose in ("billing", "identity_verification", "support", "statistics", "disclosure_requests"):
        assert sample.consent_sources(purpose) == (), purpose


@pytest.mark.parametrize("old, new, message", [
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE.replace("member.guardian_consents", "member.guardian_consent"),
     "table member.guardian_consent is not in the catalog's tables"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE.replace("revoked_at", "revoked_on"),
     "member.guardian_consents: revoked column 'revoked_on' is not a column of the table in the catalog"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE.replace("subject: member_id", "subject: member"),
     "member.guardian_consents: subject column 'member' is not a column of the table in the catalog"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE + "      scope: scopes\n",
     "member.guardian_consents: scope column 'scopes' is not a column of the table in the catalog"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE.replace("      revoked: revoked_at\n", ""),
     "say when a row withdraws consent"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE.replace("      revoked: revoked_at\n", "      status: scope\n"),
     "status and withdrawn go together"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE.replace("      subject: member_id\n", ""), "subject must be a column name"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE + "      revoke: revoked_at\n", "unknown key 'revoke'"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE.replace("member.guardian_consents", "guardian_consents"),
     "table must be written schema.table"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE + GUARDIAN_SOURCE, "listed twice"),
    (GUARDIAN_SOURCE, GUARDIAN_SOURCE.replace("member.guardian_consents", "privacy.consents"),
     "privacy.consents is the consent table itself"),
    ("  further_sources:\n", "  further_sources: member.guardian_consents\n  old_sources:\n",
     "further_sources must be a list"),
    (GUARDIAN_SOURCE, "    - member.guardian_consents\n", "each source is a mapping"),
])
def test_a_broken_further_consent_source_is_not_loaded(tmp_path, old, new, message):
    """A declaration that cannot be read, or names a table or column the catalog does not have, must not load
    as if it withdrew nothing: `purpose-proxy check` reports it and the proxy keeps the policy in force."""
    directory, _ = sample_with(tmp_path, old, new)
    problems = check_directory(directory)
    assert problems and all(p.severity == ERROR for p in problems), problems
    assert any(message in p.message for p in problems), [p.message for p in problems]


def test_further_consent_decisions_any_purpose_may_rewrite_are_an_error(tmp_path):
    # Unclassified, revoked_at could be cleared by any purpose (UPDATE ... SET revoked_at = NULL).
    directory, _ = sample_with(tmp_path, "      revoked_at: [minor.guardian_consent]", "      revoked_at: []")
    problems = check_policy(Policy.load(directory))
    assert [p.severity for p in problems] == [ERROR], problems
    assert "further source member.guardian_consents: revoked_at not classified" in problems[0].message


def test_a_further_consent_source_naming_other_people_is_an_error(tmp_path):
    directory, _ = sample_with(tmp_path, "      member_id: [identity.member_id, minor.guardian_consent]",
                               "      member_id: [minor.guardian_consent]")
    problems = [p for p in check_policy(Policy.load(directory)) if "further source" in p.message]
    assert [p.severity for p in problems] == [ERROR], problems
    assert "its subject column 'member_id' is not classified like the consent table's" in problems[0].message


def test_a_further_consent_source_is_compared_with_the_database_schema(sample):
    from proxy.analysis.schema import Schema

    full = Schema.from_file(str(SAMPLE / "schema.yaml"))
    schema = {Table(r.schema, r.name): list(r.columns) for r in full.relations}
    assert not [p for p in check_policy(sample, schema) if "further source" in p.message]
    schema[Table("member", "guardian_consents")].remove("revoked_at")
    problems = [p for p in check_policy(sample, schema) if "further source" in p.message]
    assert [p.message for p in problems] == [
        "consent: further source member.guardian_consents: revoked column revoked_at is not in the database schema"]
    del schema[Table("member", "guardian_consents")]
    problems = [p for p in check_policy(sample, schema) if "further source" in p.message]
    assert [p.message for p in problems] == [
        "consent: further source member.guardian_consents is not in the database schema"]


def test_dropping_or_changing_a_further_consent_source_is_a_dropped_protection(tmp_path, sample):
    from proxy.policy.narrowing import dropped_protections

    directory, _ = sample_with(tmp_path, GUARDIAN_SOURCE, "")
    text = (directory / "catalog.yaml").read_text()
    (directory / "catalog.yaml").write_text(text.replace("  further_sources:\n", ""))
    assert dropped_protections(sample, Policy.load(directory)) == [
        "consent: further source member.guardian_consents dropped"]
    (directory / "catalog.yaml").write_text(text.replace("  further_sources:\n", "  further_sources:\n" +
                                            GUARDIAN_SOURCE.replace("revoked_at", "consented_at")))
    assert dropped_protections(sample, Policy.load(directory)) == [
        "consent: further source member.guardian_consents changed"]


def test_policy_cases_pin_the_consent_sources(sample):
    from proxy.analysis.access import analyze
    from proxy.analysis.schema import Schema

    schema = Schema.from_file(str(SAMPLE / "schema.yaml"))
    cases = parse_policy_cases("""
cases:
  - {name: a, role: app_marketing, purpose: marketing, sql: SELECT family_name FROM member.members, expect: mask,
     consent: [member.guardian_consents, privacy.consents]}
  - {name: b, role: app_marketing, purpose: marketing, sql: SELECT family_name FROM member.members, expect: mask,
     consent: [privacy.consents]}
  - {name: c, role: app_billing, purpose: billing, sql: SELECT member_id FROM billing.invoices, expect: allow,
     consent: []}
""")
    results = run_policy_tests(sample, cases, analyze, schema)
    assert [r.passed for r in results] == [True, False, True]
    assert results[1].failures == (
        "rows filtered by privacy.consents, member.guardian_consents, expected privacy.consents",)
    with pytest.raises(PolicyError, match="consent must be a list"):
        parse_policy_cases("cases:\n  - {name: a, role: r, sql: SELECT 1, expect: allow, consent: yes}\n")


# -- partitions and inheritance children (a security tester's finding) ----------------------------------------------
# A partition or inheritance child of a catalogued table, placed in a schema the catalog does not list, was
# not personal: its rows are the parent's rows, so reading it directly is decided as reading the parent.

def _inheriting_schema():
    import yaml

    from proxy.analysis.schema import Schema

    data = yaml.safe_load((SAMPLE / "schema.yaml").read_text())
    members = list(data["schemas"]["member"]["tables"]["members"]["columns"])
    data["schemas"]["member"]["tables"]["contacts"] = {"columns": ["member_id", "email"], "partitioned": True}
    data["schemas"]["reporting"] = {"tables": {
        "contacts_p0": {"columns": ["member_id", "email"], "partitioned": True, "inherits": ["member.contacts"]},
        "contacts_p0a": {"columns": ["member_id", "email"], "inherits": ["reporting.contacts_p0"]},
        "members_child": {"columns": members + ["note"], "inherits": ["member.members"]}}}
    return Schema.from_dict(data)


def _decide(policy: Policy, schema, sql: str, role: str, purpose: str | None):
    from proxy.analysis.access import analyze
    from proxy.enforcement.rewrite import make_rewrite

    return decide_statement(analyze(sql, schema, ["public"], role), role=role, purpose=purpose, policy=policy,
                            rewrite=make_rewrite(policy, schema, ["public"], role))


@pytest.mark.parametrize("role, purpose", [("analyst", "statistics"), ("app_portal", None),
                                           ("app_marketing", "marketing.announcements")])
def test_a_partition_elsewhere_is_decided_as_its_parent(sample, role, purpose):
    schema = _inheriting_schema()
    parent, parent_expl = _decide(sample, schema, "SELECT member_id, email FROM member.contacts", role, purpose)
    assert isinstance(parent, Block)
    for table in ("reporting.contacts_p0", "reporting.contacts_p0a"):  # a partition, and a partition of it
        decision, expl = _decide(sample, schema, f"SELECT member_id, email FROM {table}", role, purpose)
        assert isinstance(decision, Block), (table, expl.to_text())
        assert (expl.reason, decision.message) == (parent_expl.reason, parent.message)


def test_an_inheritance_child_is_masked_aggregated_and_consent_filtered_as_its_parent(sample):
    schema = _inheriting_schema()
    for sql, role, purpose, needle in [
            ("SELECT birth_date, prefecture FROM {t}", "analyst", "statistics", "date_trunc('year'"),
            ("SELECT prefecture, count(DISTINCT member_id) FROM {t} GROUP BY prefecture", "analyst", "statistics",
             "HAVING pg_catalog.count(DISTINCT {n}.member_id) OPERATOR(pg_catalog.>=) 10"),
            ("SELECT member_id, email FROM {t}", "app_marketing", "marketing.announcements",
             "FROM {t} AS __pp_row WHERE (NOT EXISTS (SELECT 1 FROM privacy.consents"),
            ("SELECT count(*) FROM {t}", "app_marketing", "marketing.announcements", "privacy.consents")]:
        for table in ("member.members", "reporting.members_child"):
            decision, expl = _decide(sample, schema, sql.format(t=table), role, purpose)
            assert isinstance(decision, Mask), (sql, table, expl.to_text())
            assert needle.format(t=table, n=table.split(".")[1]) in decision.sql, decision.sql
    decision, _ = _decide(sample, schema, "UPDATE reporting.members_child SET email = 'x'", "app_marketing",
                          "marketing.announcements")
    assert isinstance(decision, Block) and "contact.email" in decision.message


def test_a_child_column_gets_its_own_entry_and_its_ancestors_entries(basic):
    # ext.kid INHERITS (crm.members); its own entry puts payment.card on email (crm.members: contact.email).
    from proxy.analysis.schema import Schema

    catalog = texts()["catalog"].replace("tables:\n", "tables:\n  ext.kid:\n    columns:\n      email: [payment.card]\n"
                                                      "      member_id: []\n", 1)
    policy = build(catalog=catalog)
    schema = Schema.from_dict({"schemas": {
        "crm": {"tables": {"members": ["member_id", "name", "email", "phone", "note"]}},
        "ext": {"tables": {"kid": {"columns": ["member_id", "name", "email", "phone", "note", "extra"],
                                   "inherits": ["crm.members"]}}}}})
    # support: contact allowed, payment.card masked last4: the child's email is masked though the parent's is not,
    # and reading the parent, which returns the child's rows too, is refused (the rewrite cannot reach them there).
    decision, _ = _decide(policy, schema, "SELECT email FROM crm.members", "app", "support")
    assert isinstance(decision, Block) and "ext.kid must be read through the rewrite" in decision.message
    assert isinstance(_decide(policy, schema, "SELECT name FROM crm.members", "app", "support")[0], Allow)
    decision, expl = _decide(policy, schema, "SELECT email FROM ext.kid", "app", "support")
    assert isinstance(decision, Mask) and "ext.kid AS __pp_row" in decision.sql, expl.to_text()
    # statistics: contact.email would be masked, payment.card has no rule: denied.
    decision, _ = _decide(policy, schema, "SELECT email FROM ext.kid", "analyst", "statistics")
    assert isinstance(decision, Block) and "payment.card" in decision.message
    # A column of the child's own falls under the parent's personal_by_default (identity): support may not read it.
    decision, expl = _decide(policy, schema, "SELECT extra FROM ext.kid", "app", "support")
    assert isinstance(decision, Block) and "crm.members.extra" in expl.to_text()


def test_a_child_naming_another_subject_than_its_parent_is_refused(sample):
    schema = _inheriting_schema()
    t = texts(SAMPLE)
    policy = build(**{**t, "catalog": t["catalog"].replace(
        "\ntables:\n", "\ntables:\n  reporting.members_child:\n    subject: member_number\n", 1)})
    decision, _ = _decide(policy, schema, "SELECT email FROM reporting.members_child", "app_marketing",
                          "marketing.announcements")
    assert isinstance(decision, Block) and "different subject columns (member_number, member_id)" in decision.message


def test_check_reports_mask_rules_that_conflict(tmp_path):
    """Conflicting masks deny the cells they meet in, which nobody wrote: check says so, at the rules' lines."""
    import shutil

    shutil.copytree(SAMPLE, tmp_path / "p")
    rules = tmp_path / "p" / "policy.csv"
    rules.write_text(rules.read_text() + "p, customer_care, support, payment, read, mask, generalize:20\n")
    policy = Policy.load(tmp_path / "p")
    found = [p for p in check_policy(policy) if "conflict for role" in p.message]
    last = len(rules.read_text().splitlines())
    assert found and all(p.severity == "error" and f", {last} conflict" in p.message for p in found), found
    assert any("category payment.card" in p.message for p in found)
    assert not [p for p in check_policy(Policy.load(SAMPLE)) if "conflict for role" in p.message]
