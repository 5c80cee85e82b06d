"""The sample ISP / telecom database and the shipped policy agree: schema.sql, policies/schema.yaml,
the catalog, the generated data, and where the policies are found."""

from __future__ import annotations

import datetime as dt
import doctest
import re
from pathlib import Path

import pytest
import sqlglot
import yaml
from sqlglot import exp

from proxy.analysis.access import analyze
from proxy.analysis.model import Table
from proxy.analysis.schema import FUNCTION, TABLE, VIEW, FunctionInfo, RelationInfo, Schema
from proxy.devtools import sample
from proxy.devtools.sample import data
from proxy.policy.checks import check_policy
from proxy.policy.engine import Policy

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
SCHEMA_YAML = POLICIES / "schema.yaml"


def schema_from_sql(text: str) -> Schema:
    """The relations and functions that schema.sql creates, read from its CREATE statements."""
    relations, functions = [], []
    for st in sqlglot.parse(text, read="postgres"):
        assert isinstance(st, exp.Create), f"schema.sql holds only CREATE statements, not {st.sql()[:60]}"
        kind = st.args.get("kind")
        if kind in ("SCHEMA", "INDEX"):  # (indexes add no relation the analysis sees)
            continue
        if kind == "TABLE":
            table = st.this.this
            cols = tuple(c.name for c in st.this.expressions if isinstance(c, exp.ColumnDef))
            key = tuple(c.name for c in st.this.expressions if isinstance(c, exp.ColumnDef) and any(
                isinstance(k.kind, exp.PrimaryKeyColumnConstraint) for k in c.constraints))
            key += tuple(k.name for pk in st.this.expressions if isinstance(pk, exp.PrimaryKey) for k in pk.expressions)
            relations.append(RelationInfo(table.db, table.name, TABLE, cols, primary_key=key))
        elif kind == "VIEW":
            select = st.expression
            relations.append(RelationInfo(st.this.db, st.this.name, VIEW, tuple(select.named_selects),
                                          select.sql(dialect="postgres")))
        elif kind == "FUNCTION":
            name = st.this.this
            props = {type(p).__name__: p for p in st.args["properties"].expressions}
            language = props["LanguageProperty"].name.lower()
            volatility = props["StabilityProperty"].name.lower()
            functions.append(FunctionInfo(name.db, name.name, frozenset({language}), volatility,
                                          frozenset({FUNCTION})))
        else:
            raise AssertionError(f"unexpected CREATE {kind} in schema.sql")
    return Schema(relations, functions)


@pytest.fixture(scope="module")
def from_sql() -> Schema:
    return schema_from_sql(data.SCHEMA_SQL.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def from_yaml() -> Schema:
    return Schema.from_file(str(SCHEMA_YAML))


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.load(POLICIES)


def shape(schema: Schema) -> dict:
    """Relations (kind, ordered columns, primary key) and functions (languages, volatility, kinds) by name."""
    return {
        "relations": {f"{r.schema}.{r.name}": (r.kind, r.columns, r.primary_key) for r in schema.relations},
        "functions": {f.qualified: (sorted(f.languages), f.volatility, sorted(f.kinds)) for f in schema.functions},
    }


def test_schema_yaml_matches_schema_sql_exactly(from_sql, from_yaml):
    assert shape(from_yaml) == shape(from_sql)
    assert len(from_sql.relations) >= 30


def test_views_resolve_to_the_same_base_columns(from_sql, from_yaml):
    views = [r for r in from_sql.relations if r.is_view]
    assert {f"{v.schema}.{v.name}" for v in views} == {"browsing.member_page_views", "support.inquiry_overview"}
    for view in views:
        sql = f"SELECT * FROM {view.schema}.{view.name}"
        got = {}
        for label, schema in (("sql", from_sql), ("yaml", from_yaml)):
            analysis = analyze(sql, schema, ["$user", "public"], "tester")
            assert analysis.error is None and not analysis.statements[0].unsupported, (label, analysis)
            got[label] = {str(c): u for c, u in analysis.statements[0].columns.items()}
        assert got["sql"] == got["yaml"], view
        assert got["sql"], view


def test_catalog_classifies_every_table_and_column_of_the_sample_schema(policy, from_yaml):
    tables = {Table(r.schema, r.name) for r in from_yaml.relations if not r.is_view}
    assert set(policy.catalog.tables) == tables  # every table listed, none that does not exist
    for table, entry in policy.catalog.tables.items():
        columns = from_yaml.relation(table.schema, table.name).columns
        assert set(entry.columns) == set(columns), table  # every column classified explicitly
    assert check_policy(policy, schema=from_yaml) == []


def test_check_finds_tables_the_consent_filter_cannot_filter(from_yaml, tmp_path):
    """Hunt 20: without 'subject: member_id' on browsing.page_views, marketing.personalized showed the page
    views of members who withdrew, and check said nothing. A table a schema default covers counts too."""
    import shutil

    shutil.copytree(POLICIES, tmp_path / "p")
    catalog = tmp_path / "p" / "catalog.yaml"
    text = catalog.read_text()
    at = text.index("  browsing.page_views:")
    end = text.index("subject: member_id", at)
    catalog.write_text(text[:end] + "# (subject removed)" + text[end + len("subject: member_id"):])
    extra = Schema([*from_yaml.relations, RelationInfo("browsing", "clicks_copy", TABLE, ("member_id", "url"))],
                   from_yaml.functions)
    found = [p.message.split(":")[0] for p in check_policy(Policy.load(tmp_path / "p"), schema=extra)
             if "no subject column" in p.message and p.severity == "error"]
    assert found == ["table browsing.clicks_copy", "table browsing.page_views"], found


def test_a_table_without_subject_is_refused_under_a_purpose_with_a_consent_filter(from_yaml, tmp_path):
    """The decision behind the check above: with no subject column to match consent decisions with, a purpose
    with a consent filter is refused the table's personal data, rather than shown every row."""
    import shutil

    from proxy.enforcement.rewrite import make_rewrite
    from proxy.policy.decision import Block, Mask
    from proxy.policy.verdict import decide_statement

    shutil.copytree(POLICIES, tmp_path / "p")
    catalog = tmp_path / "p" / "catalog.yaml"
    text = catalog.read_text()
    at = text.index("  browsing.page_views:")
    end = text.index("subject: member_id", at)
    for sql in ("SELECT url, viewed_at FROM browsing.page_views", "SELECT pg_catalog.count(*) FROM browsing.page_views"):
        catalog.write_text(text)
        for edited, expected in ((False, Mask), (True, Block)):
            if edited:
                catalog.write_text(text[:end] + "# (subject removed)" + text[end + len("subject: member_id"):])
            policy = Policy.load(tmp_path / "p")
            analysis = analyze(sql, from_yaml, ["public"], "app_marketing")
            decision, _ = decide_statement(analysis, role="app_marketing", purpose="marketing.personalized",
                                           policy=policy, rewrite=make_rewrite(policy, from_yaml, ["public"],
                                                                               "app_marketing"))
            assert isinstance(decision, expected), (sql, decision)
        assert "names no subject column for it" in decision.message, decision.message  # (count(*): hunt 22)


def test_a_view_over_tables_with_subjects_is_consent_filtered_not_refused(policy, from_yaml):
    """The refusal above is for tables: a view has no subject of its own, and the rewrite inlines it, filtering
    its tables (the demo's first marketing statement was refused when views counted as tables)."""
    from proxy.enforcement.rewrite import make_rewrite
    from proxy.policy.decision import Mask
    from proxy.policy.verdict import decide_statement

    for sql in ("SELECT family_name, email, url FROM browsing.member_page_views",
                "SELECT pg_catalog.count(*) FROM browsing.member_page_views"):
        analysis = analyze(sql, from_yaml, ["public"], "app_marketing")
        decision, _ = decide_statement(analysis, role="app_marketing", purpose="marketing.personalized",
                                       policy=policy, rewrite=make_rewrite(policy, from_yaml, ["public"],
                                                                           "app_marketing"))
        assert isinstance(decision, Mask) and "consent" in decision.methods, (sql, decision)


def test_catalog_names_the_data_subject_of_every_personal_table(policy):
    for table, entry in policy.catalog.tables.items():
        personal = any(cats for cats in entry.columns.values())
        assert (entry.subject is not None) == personal, table
        if entry.subject:
            assert entry.subject in entry.columns, table


def test_no_column_catalogued_as_not_personal_stands_for_the_data_subject(policy):
    """A column every purpose may read must not repeat the subject's key: where it equals the subject column
    on every row of the generated data, it re-identifies what the purposes see pseudonymised (hunts 15, 17)."""
    for t in data.generate(seed=1, members=300):
        entry = policy.catalog.tables.get(Table(t.schema, t.table))
        if entry is None or entry.subject is None or not t.rows:
            continue
        subject = t.columns.index(entry.subject)
        for i, col in enumerate(t.columns):
            if i != subject and not entry.columns[col]:
                assert any(row[i] != row[subject] for row in t.rows), f"{t.name}.{col} equals {entry.subject}"


def test_catalog_covers_every_kind_of_information_the_notices_name(policy):
    wanted = ["identity.name", "contact.email", "payment.card", "payment.invoice", "credit.assessment",
              "credit.nonpayer", "browsing.page", "browsing.mail", "browsing.client", "browsing.cookie",
              "browsing.beacon", "browsing.personal_url", "inquiry.content", "call.recording", "call.meta",
              "event.participant", "partner.contact", "partner.entrusted", "prize.tax", "minor.guardian_consent",
              "telecom.access", "telecom.communication"]
    assert set(wanted) <= set(policy.catalog.categories)
    used = {cat for entry in policy.catalog.tables.values() for cats in entry.columns.values() for cat in cats}
    assert set(wanted) <= used


def test_every_purpose_keeps_the_notice_wording_and_names_its_source(policy):
    seeds = {"000_d29cc49cd1a1cbdd.txt", "004_0c50c4a3e3c053f9.txt"}
    doc = yaml.safe_load((POLICIES / "purposes.yaml").read_text(encoding="utf-8"))["purposes"]
    assert set(doc) == set(policy.purposes.purposes)
    assert len(doc) >= 25
    for name, body in doc.items():
        assert body.get("original") and re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", body["original"]), name
        assert any(seed in body["source"] for seed in seeds), name
    for purpose in ("identity_verification", "billing", "credit_management", "operations", "marketing.announcements",
                    "research", "research.behaviour_analysis", "marketing.ads.behavioural", "support",
                    "contract_performance", "partner_referral", "prize_tax", "nonpayer_exchange",
                    "operator_training", "statistics", "marketing.ads.third_party", "marketing.partner_campaigns",
                    "service_notices"):
        assert policy.is_purpose(purpose), purpose


def test_the_vendored_notices_are_the_project_seeds():
    shared = REPO.parent / "shared" / "seeds"  # beside the checkout in the project's workspace and CI
    if not shared.is_dir():
        return  # a plain clone: the vendored copies are all there is to compare with
    for seed in shared.glob("*.txt"):
        assert (POLICIES / "sources" / seed.name).read_bytes() == seed.read_bytes(), seed.name


def test_the_original_wording_is_quoted_from_the_seed_notices():
    seeds = POLICIES / "sources"  # the two notices, vendored with the policy
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(seeds.glob("*.txt")))
    assert text, f"{seeds} holds no notice"
    text = re.sub(r"\s+", "", text)
    doc = yaml.safe_load((POLICIES / "purposes.yaml").read_text(encoding="utf-8"))["purposes"]
    for name, body in doc.items():
        for part in body["original"].split(" / "):
            for piece in part.split("…"):  # an ellipsis marks words left out
                assert re.sub(r"\s+", "", piece) in text, (name, piece)


def test_generated_data_fits_the_schema_and_is_deterministic(from_sql):
    tables = data.generate()
    assert [t.name for t in tables] == [t.name for t in data.generate()]
    assert all(a.rows == b.rows for a, b in zip(tables, data.generate()))
    assert tables[1].rows != data.generate(seed=7)[1].rows
    relations = {f"{r.schema}.{r.name}": r for r in from_sql.relations if not r.is_view}
    assert {t.name for t in tables} == set(relations)
    for t in tables:
        assert t.columns == relations[t.name].columns, t.name
        assert all(len(row) == len(t.columns) for row in t.rows), t.name
        assert t.rows, t.name
    members = next(t for t in tables if t.name == "member.members")
    assert len(members.rows) == 300


def test_generated_people_are_fake():
    tables = {t.name: t for t in data.generate()}
    members = tables["member.members"]
    emails = [row[members.columns.index("email")] for row in members.rows]
    assert all(e.rsplit("@", 1)[1] in data.DOMAINS for e in emails)  # reserved example domains only
    cards = tables["billing.payment_methods"]
    numbers = [row[cards.columns.index("card_number")] for row in cards.rows if row[2] == "card"]
    assert numbers and all(n.startswith("400000") and len(n) == 16 for n in numbers)
    birth = members.columns.index("birth_date")
    minors = {row[0] for row in members.rows if row[birth] > dt.date(data.TODAY.year - 16, data.TODAY.month,
                                                                      data.TODAY.day)}
    consents = {row[1] for row in tables["member.guardian_consents"].rows}
    assert minors and minors == consents  # every member under 16 came with a guardian's consent


def test_data_module_doctests():
    assert doctest.testmod(data).failed == 0


def test_sql_rendering_of_generated_rows():
    sql = data.to_sql([data.Table("s.t", ("a", "b"), [(1, "O'Brien"), (None, b"\x00")])])
    assert sql == "INSERT INTO s.t (a, b) VALUES (1, 'O''Brien');\nINSERT INTO s.t (a, b) VALUES (NULL, '\\x00'::bytea);\n"


def test_shipped_policies_are_found_in_the_package():
    found = sample.policies_dir()
    assert (found / "policy.csv").is_file() and (found / "tests").is_dir()
    assert (found / "policy.csv").read_bytes() == (POLICIES / "policy.csv").read_bytes()
