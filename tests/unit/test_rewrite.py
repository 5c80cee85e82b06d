"""The masking rewrite: fixture pairs (tests/fixtures/rewrite/*.yaml) against a YAML schema, and its parts.

Each fixture case names a purpose and a statement and expects either the exact SQL the
proxy sends upstream instead (``rewritten``), a refusal (``refused``: part of the
message, SQLSTATE 42501) or the statement unchanged. The schema and policy are
tests/fixtures/masking/ (the same ones tests/integration/test_masking.py runs against a
real PostgreSQL, where the cases with ``rows`` are also run through the proxy).
"""

from __future__ import annotations

import doctest
import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from proxy.analysis.access import analyze
from proxy.analysis.lexer import scan
from proxy.analysis.model import Table
from proxy.analysis.schema import Schema
from proxy.enforcement import masks
from proxy.enforcement.rewrite import make_rewrite
from proxy.policy import vocabulary as v
from proxy.policy.decision import Allow, Block, Mask
from proxy.policy.engine import Policy
from proxy.policy.problems import PolicyError
from proxy.policy.verdict import decide_statement

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "rewrite"
MASKING = REPO / "tests" / "fixtures" / "masking"
DEFAULT_PATH = ["$user", "public"]


def load_cases() -> list:
    out = []
    for path in sorted(FIXTURES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for case in doc["cases"]:
            case = dict(case, schema=doc["schema"], policies=doc["policies"])
            out.append(pytest.param(case, id=f"{path.stem}: {case['name']}"))
    return out


CASES = load_cases()
_LOADED: dict[str, object] = {}


def _load(kind: str, rel: str):
    key = f"{kind}:{rel}"
    if key not in _LOADED:
        _LOADED[key] = Schema.from_file(str(REPO / rel)) if kind == "schema" else Policy.load(REPO / rel)
    return _LOADED[key]


def decide(case: dict, rewrite: bool = True):
    schema, policy = _load("schema", case["schema"]), _load("policy", case["policies"])
    path = case.get("search_path", DEFAULT_PATH)
    role = case.get("role", "app")
    analysis = analyze(case["sql"], schema, path, role)
    return decide_statement(analysis, role=role, purpose=case["purpose"], policy=policy,
                            rewrite=make_rewrite(policy, schema, path, role) if rewrite else None)


def test_fixture_files_are_well_formed():
    assert len(CASES) >= 80
    names = set()
    for param in CASES:
        case = param.values[0]
        outcomes = [k for k in ("rewritten", "refused", "unchanged") if k in case]
        assert len(outcomes) == 1, f"{case['name']}: exactly one of rewritten, refused, unchanged"
        assert case["name"] not in names, f"duplicate case name {case['name']}"
        names.add(case["name"])


@pytest.mark.parametrize("case", CASES)
def test_rewrite_fixture(case):
    decision, expl = decide(case)
    if "rewritten" in case:
        assert isinstance(decision, Mask), f"expected a rewrite, got {decision!r}"
        assert decision.sql == case["rewritten"]
        assert expl.verdict == "mask"
    elif "refused" in case:
        assert isinstance(decision, Block), f"expected a refusal, got {decision!r}"
        assert case["refused"] in decision.message
        assert decision.sqlstate == "42501"
        assert expl.verdict == "block"
    else:
        assert isinstance(decision, Allow), f"expected the statement unchanged, got {decision!r}"
    if "reason" in case:
        assert expl.reason == case["reason"]


@pytest.mark.parametrize("case", [c for c in CASES if "rewritten" in c.values[0]])
def test_rewrite_keeps_the_text_outside_the_references(case):
    """Every token of the statement outside the substituted references is kept, in order (the rewrite only
    replaces relation references and inserts clauses), and the $n parameters are the same (a derived table may
    repeat one, see rewrite.pushed_down, but none is new)."""
    analysis = analyze(case["sql"], _load("schema", case["schema"]), case.get("search_path", DEFAULT_PATH), "app")
    spans = [(r.span.start, r.span.end) for st in analysis.statements for r in _with_inner(st)]
    kept = [(t.kind, t.text) for t in scan(case["sql"])
            if not any(start <= t.start < end for start, end in spans)]
    rewritten = iter((t.kind, t.text) for t in scan(case["rewritten"]))
    missing = [tok for tok in kept if not any(tok == other for other in rewritten)]
    assert not missing, f"tokens not kept in order: {missing}"
    params = lambda text: sorted({t.value for t in scan(text) if t.kind.name == "PARAM"})  # noqa: E731
    assert params(case["rewritten"]) == params(case["sql"])


def _with_inner(st):
    while st is not None:
        yield from st.references
        st = st.inner


@pytest.mark.parametrize("mark", ["\x03", "\x04", "\x01", "\x02"])
def test_names_a_client_writes_cannot_pose_as_the_rewrites_placeholders(mark):
    # A hunt named a table alias "\x03A:B\x03", the form the rewrite's copy placeholders had:
    # the alias went into the HAVING clause and was replaced by the text of a string constant
    # holding "... UNION ALL SELECT email, phone ...", never analysed. Placeholders are
    # NUL-delimited now (no SQL text holds a NUL); any other character stays in the name.
    payload = 'member_id") >= 0 UNION ALL SELECT email FROM crm.members --'
    pre = "SELECT '"
    a, b = len(pre), len(pre) + len(payload)
    alias = f'"{mark}{a}:{b}{mark}"'
    sql = f"{pre}{payload}' AS t, count({alias}.amount)::text FROM billing.invoices AS {alias}"
    decision, _ = decide({"sql": sql, "purpose": "analytics", "schema": "tests/fixtures/masking/schema.yaml",
                          "policies": "tests/fixtures/masking/policies"})
    assert isinstance(decision, (Mask, Block))
    if isinstance(decision, Mask):
        assert decision.sql.count("UNION ALL") == 1 and f"{mark}{a}:{b}{mark}" in decision.sql


def test_a_nul_in_the_sql_text_is_refused():
    from proxy.analysis.shape import copy_of

    sql = f'SELECT count(amount) FROM billing.invoices AS "{copy_of(0, 6)}"'
    decision, _ = decide({"sql": sql, "purpose": "analytics", "schema": "tests/fixtures/masking/schema.yaml",
                          "policies": "tests/fixtures/masking/policies"})
    assert isinstance(decision, Block)


def test_without_a_rewrite_masking_and_consent_are_refused():
    case = {"sql": "SELECT email FROM crm.members", "purpose": "support",
            "schema": "tests/fixtures/masking/schema.yaml", "policies": "tests/fixtures/masking/policies"}
    decision, expl = decide(case, rewrite=False)
    assert isinstance(decision, Block) and expl.reason == "rewrite-unavailable"
    decision, expl = decide(dict(case, sql="SELECT count(*) FROM crm.members", purpose="marketing"), rewrite=False)
    assert isinstance(decision, Block) and expl.reason == "rewrite-unavailable"
    assert "consent" in decision.message


def test_explain_shows_the_rewritten_sql(capsys):
    from proxy import tools

    args = SimpleNamespace(policies=str(MASKING / "policies"), schema=str(MASKING / "schema.yaml"), dsn=None,
                           search_path=None, role="app", purpose="support", json=False,
                           sql="SELECT email FROM crm.members WHERE member_id = 1")
    assert tools.explain(args) == 0
    out = capsys.readouterr().out
    assert "rewritten SQL:" in out
    assert "pg_catalog.regexp_replace((__pp_row.email)::pg_catalog.text, '^.*@', '')" in out
    assert "rows of crm.members filtered by consent" in out
    args.json = True
    assert tools.explain(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decision"] == "mask" and doc["verdict"] == "mask"
    assert doc["rewritten_sql"].startswith("SELECT email FROM (SELECT __pp_row.member_id")


def test_references_record_positions_and_tokens():
    schema = _load("schema", "tests/fixtures/masking/schema.yaml")
    sql = "SELECT 1; SELECT m.email FROM ONLY crm.members AS m JOIN crm.member_contacts USING (member_id)"
    analysis = analyze(sql, schema, DEFAULT_PATH, "app")
    refs = analysis.statements[1].references
    tokens = scan(sql)
    assert [(sql[r.span.start:r.span.end], r.alias, r.only, r.kind) for r in refs] == [
        ("ONLY crm.members", "m", True, "table"), ("crm.member_contacts", None, False, "view")]
    for r in refs:
        assert tokens[r.span.first].start == r.span.start and tokens[r.span.last - 1].end == r.span.end
    view = refs[1]
    assert [(view.definition[i.span.start:i.span.end], i.table) for i in view.inner] == [
        ("crm.members", Table("crm", "members"))]


def test_update_target_records_its_where_clause():
    schema = _load("schema", "tests/fixtures/masking/schema.yaml")
    sql = "UPDATE crm.members m SET phone = $1 WHERE member_id = $2 RETURNING member_id"
    (ref,) = analyze(sql, schema, DEFAULT_PATH, "app").statements[0].references
    assert ref.target and ref.top_level and ref.statement == "update"
    assert sql[ref.where.start:ref.where.end] == "member_id = $2"
    assert sql[ref.where_at:].startswith("RETURNING")


def test_every_policy_method_has_a_masking_function_with_an_example():
    assert set(masks.METHODS) == set(v.MASK_METHODS)
    for name, fn in masks.METHODS.items():
        assert fn.__doc__ and ">>>" in fn.__doc__, f"{name} needs a docstring example"


@pytest.mark.parametrize("module", ["proxy.enforcement.masks", "proxy.enforcement.rewrite",
                                    "proxy.enforcement.pseudonym", "proxy.enforcement.cache", "proxy.policy.purposes",
                                    "proxy.policy.vocabulary", "proxy.policy.catalog"])
def test_docstring_examples(module):
    failed, attempted = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failed == 0


def test_mask_options_are_validated():
    assert v.is_mask_method("partial:2,1") and v.is_mask_method("generalize:5")
    with pytest.raises(masks.MaskError):
        masks.mask_sql("c", "partial:x")
    with pytest.raises(masks.MaskError):
        masks.mask_sql("c", "generalize:decade", "integer")
    assert "'decade'" in masks.mask_sql("c", "generalize:decade", "date")


def test_generalize_on_text_never_shows_a_whole_value():
    # generalize:20 on a 16-digit card number kept all 16 digits; values no longer than the prefix
    # are now hidden whole, like partial's
    sql = masks.mask_sql("c.card_number", "generalize:20", "text")
    assert "pg_catalog.length((c.card_number)::pg_catalog.text) <= 20 THEN '***'" in sql
    assert "pg_catalog.left((c.card_number)::pg_catalog.text, 20)" in sql
    assert "<= 3 THEN '***'" in masks.mask_sql("m.postal_code", "generalize", "character varying(8)")
    with pytest.raises(masks.MaskError, match="at least 2"):  # a range of one whole number is the number
        masks.mask_sql("m.age", "generalize:1", "integer")
    assert "'1'::pg_catalog.numeric" in masks.mask_sql("m.amount", "generalize:1", "numeric")


@pytest.mark.parametrize("option", ["redact", "redact:x", "partial", "partial:8", "partial:2,1", "partial:0,4",
                                    "partial:x", "partial:1,2,3", "last4", "last4:2", "email_domain", "hash",
                                    "hash:1", "year", "year:2", "generalize", "generalize:20", "generalize:month",
                                    "generalize:weekly", "generalize:-1"])
def test_an_option_the_order_cannot_read_is_refused_by_every_mask(option):
    # vocabulary.mask_key ranks an option it cannot read first: that is fail-closed only if the
    # rewrite then refuses it, whatever the column's type
    outcomes = []
    for column_type in ("text", "integer", "numeric", "date", "timestamp with time zone"):
        try:
            masks.mask_sql("t.c", option, column_type)
            outcomes.append(True)
        except masks.MaskError:
            outcomes.append(False)
    assert any(outcomes) == (v.mask_reading(option) is not None), outcomes


def test_explain_without_column_types_says_why_it_refuses_generalize(capsys):
    from proxy import tools

    args = SimpleNamespace(policies=str(REPO / "policies"), schema=None, dsn=None, search_path=None,
                           role="analyst", purpose="research", json=False,
                           sql="SELECT postal_code FROM member.members")
    assert tools.explain(args) == 0
    out = capsys.readouterr().out
    assert "verdict: block" in out and "generalize needs the type" in out
    assert "note: the schema gives no type for member.members.postal_code (generalize)" in out
    assert "--dsn" in out
    args.json = True
    assert tools.explain(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["reason"] == "rewrite-refused" and "member.members.postal_code" in doc["note"]
    # with the types (as the proxy has them) there is no note: the column is masked
    args = SimpleNamespace(policies=str(MASKING / "policies"), schema=str(MASKING / "schema.yaml"), dsn=None,
                           search_path=None, role="app", purpose="support", json=True,
                           sql="SELECT postal_code FROM crm.members")
    assert tools.explain(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decision"] == "mask" and "note" not in doc


def _policy(catalog_extra: str = "", purposes_extra: str = "", rules: str = "") -> Policy:
    catalog = ("categories:\n  contact: {description: c}\n"
               "tables:\n  crm.members: {subject: member_id, columns: {member_id: [], email: [contact]}}\n"
               + catalog_extra)
    purposes = "purposes:\n  support: {description: s, source: t}\n" + purposes_extra
    model = (MASKING / "policies" / "model.conf").read_text()
    return Policy.from_texts(catalog=catalog, purposes=purposes, model=model,
                             policy="p, app, support, *, declare, allow\n" + rules)


def test_consent_section_and_purpose_flags_are_validated():
    consent = ("consent:\n  table: privacy.consents\n  subject: member_id\n  purpose: purpose\n  status: status\n"
               "  withdrawn: [withdrawn]\n")
    policy = _policy(consent)
    assert policy.consent_mode("support") == "opt_out"
    with pytest.raises(PolicyError, match="opt_in, but catalog.yaml has no consent section with granted values"):
        _policy(consent, "  ads: {description: a, source: t, opt_in: true}\n")
    assert _policy(consent + "  granted: [granted]\n", "  ads: {description: a, source: t, opt_in: true}\n"
                   ).consent_mode("ads") == "opt_in"
    assert _policy(consent, "  billing: {description: b, source: t, withdrawable: false}\n"
                   ).consent_mode("billing") is None
    assert _policy().consent_mode("support") is None
    with pytest.raises(PolicyError, match="consent: table must be written schema.table"):
        _policy(consent.replace("privacy.consents", "consents"))
    with pytest.raises(PolicyError, match="withdrawn must be a list of status values"):
        _policy(consent.replace("[withdrawn]", "[]"))
    with pytest.raises(PolicyError, match="unknown masking method 'blur:2'"):
        _policy(rules="p, app, support, contact, read, mask, blur:2\n")
    assert _policy(rules="p, app, support, contact, read, mask, partial:3\n").decide(
        "app", "support", "contact", "read").method == "partial:3"


def test_check_compares_the_consent_table_with_the_schema():
    from proxy.policy.checks import check_policy

    policy = _load("policy", "tests/fixtures/masking/policies")
    assert check_policy(policy, schema=_load("schema", "tests/fixtures/masking/schema.yaml")) == []
    problems = [str(p) for p in check_policy(policy, schema={"privacy.consents": ["member_id", "purpose"]})]
    assert any("consent: status column privacy.consents.status is not in the database schema" in p for p in problems)
    problems = [str(p) for p in check_policy(policy, schema={})]
    assert any("consent table privacy.consents is not in the database schema" in p for p in problems)


def test_consent_barrier_can_be_turned_off():
    """With ``barrier: false`` the derived table has no OFFSET 0 fence and an UPDATE's condition is AND-ed."""
    files = {name: (MASKING / "policies" / f"{name}").read_text()
             for name in ("catalog.yaml", "purposes.yaml", "model.conf", "policy.csv")}
    policy = Policy.from_texts(catalog=files["catalog.yaml"] + "  barrier: false\n", purposes=files["purposes.yaml"],
                               model=files["model.conf"], policy=files["policy.csv"])
    assert policy.catalog.consent.barrier is False
    schema = _load("schema", "tests/fixtures/masking/schema.yaml")
    for sql, fenced, unfenced in (
            ("SELECT member_id FROM crm.members WHERE member_id = 1", " OFFSET 0) AS members", ")))) AS members"),
            ("UPDATE crm.members SET phone = 'x' WHERE member_id = 1", "WHERE CASE WHEN (NOT EXISTS",
             "WHERE (member_id = 1) AND (NOT EXISTS")):
        analysis = analyze(sql, schema, DEFAULT_PATH, "app")
        unsafe, _ = decide_statement(analysis, role="app", purpose="support", policy=policy,
                                     rewrite=make_rewrite(policy, schema))
        safe, _ = decide({"sql": sql, "purpose": "support", "schema": "tests/fixtures/masking/schema.yaml",
                          "policies": "tests/fixtures/masking/policies"})
        assert fenced in safe.sql and fenced not in unsafe.sql
        assert unfenced in unsafe.sql


def test_overlapping_edits_are_refused_and_repeated_ones_made_once():
    """Two different edits of one place refuse the rewrite (a hunt had the second one delete a quote)."""
    from proxy.enforcement.rewrite import Refused, apply_edits

    text = "SELECT a FROM crm.members m WHERE 'x' = 'y'"
    same = (14, 25, "(SELECT 1 AS a) AS")
    assert apply_edits(text, [same, same]) == "SELECT a FROM (SELECT 1 AS a) AS m WHERE 'x' = 'y'"
    with pytest.raises(Refused):
        apply_edits(text, [same, (14, 29, "t")])
    with pytest.raises(Refused):
        apply_edits(text, [same, (20, 20, "x")])
    assert apply_edits(text, [same, (14, 14, "/* */ ")]).startswith("SELECT a FROM /* */ (SELECT")


# -- GROUP BY a primary key (hunt 35) --------------------------------------------------------------------------

KEYED = Schema.from_dict({"schemas": {"crm": {
    "tables": {"members": {"columns": ["member_id", "name", "prefs"], "primary_key": ["member_id"],
                           "types": {"member_id": "integer", "name": "text", "prefs": "json"}},
               "lines": {"columns": ["line_no", "member_id", "note"], "primary_key": ["member_id", "line_no"]}},
    "views": {"named": {"columns": ["member_id", "name", "n"],
                        "sql": "SELECT m.member_id, m.name, count(*) AS n FROM crm.members m GROUP BY m.member_id"}}}}})


def key_groups(sql: str) -> list[tuple[str, list[int], list[int], bool]]:
    st = analyze(sql, KEYED, DEFAULT_PATH, "app").statements[0]
    assert not st.unsupported, st.unsupported
    return [(g.ref.name, sorted(g.grouped), list(g.used), g.whole_row) for g in st.key_groups]


@pytest.mark.parametrize("sql, expected", [
    # the key by alias, by table name, by position, by output name; a composite key whole or not
    ("SELECT m.member_id, m.name FROM crm.members m GROUP BY m.member_id", [("m", [0], [0, 1], False)]),
    ("SELECT members.name, count(*) FROM crm.members GROUP BY members.member_id", [("members", [0], [1], False)]),
    ("SELECT m.member_id, m.name FROM crm.members m GROUP BY 1", [("m", [0], [0, 1], False)]),
    ("SELECT m.member_id AS k, m.name FROM crm.members m GROUP BY k", [("m", [0], [0, 1], False)]),
    ("SELECT l.note FROM crm.lines l GROUP BY l.line_no, l.member_id", [("l", [0, 1], [2], False)]),
    ("SELECT l.note FROM crm.lines l GROUP BY l.line_no", []),
    # HAVING, ORDER BY, windows and subqueries count; aggregates' arguments do not
    (("SELECT count(m.name) FROM crm.members m GROUP BY m.member_id HAVING max(m.prefs::text) > '' "
      "ORDER BY m.name"), [("m", [0], [1], False)]),
    ("SELECT rank() OVER (ORDER BY m.name) FROM crm.members m GROUP BY m.member_id", [("m", [0], [1], False)]),
    ("SELECT (SELECT count(*) FROM crm.lines l WHERE l.note = m.name) FROM crm.members m GROUP BY m.member_id",
     [("m", [0], [1], False)]),
    ("SELECT m.*, count(l.note) FROM crm.members m JOIN crm.lines l USING (member_id) GROUP BY m.member_id",
     [("m", [0], [0, 1, 2], False)]),
    ("SELECT m FROM crm.members m GROUP BY m.member_id", [("m", [0], [], True)]),
    # several tables in one block
    (("SELECT m.name, l.note FROM crm.members m JOIN crm.lines l ON l.member_id = m.member_id "
      "GROUP BY m.member_id, l.member_id, l.line_no"), [("m", [0], [1], False), ("l", [0, 1], [2], False)]),
    # no functional dependency with grouping sets (SELECT, GROUP BY clause): left alone
    ("SELECT m.member_id, m.name FROM crm.members m GROUP BY ROLLUP (m.member_id)", []),
    ("SELECT m.member_id, m.name FROM crm.members m GROUP BY GROUPING SETS ((m.member_id))", []),
    ("SELECT m.member_id, m.name FROM crm.members m GROUP BY CUBE (m.member_id)", []),
    ("SELECT m.member_id FROM crm.members m GROUP BY m.member_id, ROLLUP (m.name)", []),
    # a view's definition is not a statement: its own GROUP BY is not recorded (see REPORT)
    ("SELECT n FROM crm.named", []),
])
def test_blocks_grouped_by_a_primary_key_are_recorded(sql, expected):
    assert key_groups(sql) == expected


def test_group_by_a_key_refuses_a_column_it_cannot_group_by():
    """A column of a type without equality (json) that must be added to the GROUP BY is refused with a
    message that says why; the same query without it is rewritten."""
    policy = _load("policy", "tests/fixtures/masking/policies")
    data = yaml.safe_load((MASKING / "schema.yaml").read_text())
    members = data["schemas"]["crm"]["tables"]["members"]
    members["columns"].append("prefs")
    members["types"]["prefs"] = "json"
    schema = Schema.from_dict(data)

    def run(sql: str):
        analysis = analyze(sql, schema, DEFAULT_PATH, "app")
        return decide_statement(analysis, role="app", purpose="support", policy=policy,
                                rewrite=make_rewrite(policy, schema, DEFAULT_PATH, "app"))[0]

    refused = run("SELECT m.member_id, m.prefs FROM crm.members m GROUP BY m.member_id")
    assert isinstance(refused, Block) and refused.reason == "rewrite-refused", refused
    assert "must group by prefs too, but PostgreSQL cannot group by its type json" in refused.message
    ok = run("SELECT m.member_id, m.name, json_agg(m.prefs) FROM crm.members m GROUP BY m.member_id")
    assert isinstance(ok, Mask) and ok.sql.endswith("GROUP BY m.member_id, m.name"), ok
