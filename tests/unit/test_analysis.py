"""Fixture-driven tests of the SQL access analysis (tests/fixtures/analysis/*.yaml).

Each fixture file is a list of cases. A case has ``sql`` and optionally
``search_path`` (default ``[crm, public]``), ``role`` (default ``app``),
``standard_conforming_strings`` and either the expectations of a single statement
(``kind``, ``columns``, ``tables``, ``functions``, ``settings``, ``prepared_name``,
``inner``, ``unsupported``) or ``statements``: a list of such expectations, one per
statement. ``columns`` and ``tables`` are exact: every base column/table the
statement uses, with its uses (``project``, ``filter``, ``write``, ``delete``,
``whole_row``, ``aggregate``). ``unsupported`` is a substring (or list of
substrings) that the statement's reasons must contain; without it the statement
must be fully supported.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.analysis.access import analyze
from proxy.analysis.model import Kind, StatementAccess, Use
from proxy.analysis.schema import Schema

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "analysis"
DEFAULT_PATH = ["crm", "public"]
FLAGS = {"project": Use.PROJECT, "filter": Use.FILTER, "write": Use.WRITE, "delete": Use.DELETE,
         "whole_row": Use.WHOLE_ROW, "aggregate": Use.AGGREGATE}


def load_schema() -> Schema:
    return Schema.from_dict(yaml.safe_load((FIXTURES / "schema.yaml").read_text()))


SCHEMA = load_schema()


def _cases():
    for path in sorted(FIXTURES.glob("*.yaml")):
        if path.name == "schema.yaml":
            continue
        for i, case in enumerate(yaml.safe_load(path.read_text()) or []):
            name = case.get("name") or case["sql"][:60]
            yield pytest.param(case, id=f"{path.stem}:{i}:{name}")


CASES = list(_cases())


def _uses(names) -> Use:
    u = Use.NONE
    for n in names:
        u |= FLAGS[n]
    return u


def _show(u: Use) -> list[str]:
    return sorted(n for n, f in FLAGS.items() if u & f)


def check_statement(st: StatementAccess, exp: dict, where: str) -> None:
    reasons = st.unsupported
    if "unsupported" in exp:
        wanted = exp["unsupported"]
        wanted = [wanted] if isinstance(wanted, str) else wanted
        assert reasons, f"{where}: expected unsupported {wanted!r}, got none (columns {st.columns})"
        for w in wanted:
            assert any(w in r for r in reasons), f"{where}: no reason contains {w!r}: {reasons}"
    else:
        assert not reasons, f"{where}: unexpectedly unsupported: {reasons}"
    if "kind" in exp:
        assert st.kind is Kind(exp["kind"]), f"{where}: kind {st.kind.value}, expected {exp['kind']}"
    if "columns" in exp:
        got = {str(c): _show(u) for c, u in st.columns.items()}
        want = {c: sorted(v) for c, v in (exp["columns"] or {}).items()}
        assert got == want, f"{where}: columns differ\n  got:  {got}\n  want: {want}"
    if "tables" in exp:
        got = {str(t): _show(u) for t, u in st.tables.items()}
        want = {t: sorted(v) for t, v in (exp["tables"] or {}).items()}
        assert got == want, f"{where}: tables differ\n  got:  {got}\n  want: {want}"
    if "functions" in exp:
        assert st.functions == set(exp["functions"] or []), f"{where}: functions {sorted(st.functions)}"
    if "settings" in exp:
        want = [tuple(s) for s in exp["settings"] or []]
        assert st.settings == want, f"{where}: settings {st.settings}, expected {want}"
    if "prepared_name" in exp:
        assert st.prepared_name == exp["prepared_name"], f"{where}: prepared_name {st.prepared_name!r}"
    if "inner" in exp:
        assert st.inner is not None, f"{where}: no inner statement"
        check_statement(st.inner, exp["inner"], where + " (inner)")


@pytest.mark.parametrize("case", CASES)
def test_fixture(case: dict) -> None:
    a = analyze(case["sql"], SCHEMA, case.get("search_path", DEFAULT_PATH), case.get("role", "app"),
                standard_conforming_strings=case.get("standard_conforming_strings", True))
    if "error" in case:
        assert a.error and case["error"] in a.error, f"error {a.error!r}"
    expected = case.get("statements") or [case]
    assert len(a.statements) == len(expected), f"{len(a.statements)} statements: {a.statements}"
    for i, (st, exp) in enumerate(zip(a.statements, expected)):
        check_statement(st, exp, f"statement {i + 1}")


def test_fixture_count() -> None:
    """The brief asks for at least 120 fixture cases covering every construct."""
    assert len(CASES) >= 120


def test_fixture_uses_are_known_flags() -> None:
    for p in CASES:
        case = p.values[0]
        for exp in case.get("statements") or [case]:
            for uses in (exp.get("columns") or {}).values():
                _uses(uses)
