"""User-defined operators report their functions; OID-alias array casts parse."""

from proxy.analysis.access import analyze
from proxy.analysis.schema import Schema

SCHEMA = Schema.from_dict({
    "schemas": {"crm": {"tables": {"members": ["member_id", "email"]}}},
    "operators": {"%%%": ["crm.card_of"], "<->": ["crm.distance", "public.other_distance"]},
})


def functions(sql):
    st = analyze(sql, SCHEMA, ["public"]).statements[0]
    assert not st.unsupported, st.unsupported
    return st.functions


def test_infix_user_operator_reports_its_function():
    assert functions("SELECT 3 %%% 0") == {"crm.card_of"}


def test_operator_syntax_reports_its_function():
    assert functions("SELECT member_id OPERATOR(crm.%%%) 0 FROM crm.members") == {"crm.card_of"}


def test_every_overload_of_a_symbol_is_reported():
    assert functions("SELECT 1 <-> 2") == {"crm.distance", "public.other_distance"}


def test_builtin_operators_report_nothing():
    assert functions("SELECT member_id + 1 FROM crm.members WHERE email ~~ 'a%'") == set()


def test_operator_schema_round_trips_and_changes_the_version():
    again = Schema.from_dict(SCHEMA.to_dict(include_version=False))
    assert again.operators == SCHEMA.operators
    plain = Schema.from_dict({"schemas": {"crm": {"tables": {"members": ["member_id", "email"]}}}})
    assert plain.version != SCHEMA.version


def test_oid_alias_array_casts_parse():
    # asyncpg's type introspection: WHERE t.oid = any($1::oid[])
    st = analyze("SELECT email FROM crm.members WHERE member_id = any($1::oid[])", SCHEMA, ["public"]).statements[0]
    assert not st.unsupported
    assert {str(c) for c in st.columns} == {"crm.members.email", "crm.members.member_id"}
    assert not analyze("SELECT $1::regclass[], $2::regtype[]", SCHEMA, ["public"]).statements[0].unsupported
