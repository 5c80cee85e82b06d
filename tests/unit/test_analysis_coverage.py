"""The structural guard on the analysis (tests/support/coverage.py): in every statement it accepts, every
column, table, star, call and query of the parsed tree (and of the views it reads) was read.

The corpus: every SQL text of the fixtures, the policy test cases and the bypass tests
(``sqlfuzz.load_corpus``), the PostgreSQL constructs of tests/fixtures/coverage/constructs.sql, and
seeded samples of the SQL grammar's statements and of mutated corpus statements, each analysed
against the analysis fixtures' schema and the sample schema (two search paths). Deterministic: the
samples are drawn from fixed seeds. A refusal is never a finding (refusing is safe); a reference the
analysis accepted the statement without reading is, whatever its decision would have been.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import yaml
from sqlglot import exp

from proxy.analysis import flows
from proxy.analysis.schema import Schema
from tests.support.coverage import unread
from tests.support.sqlfuzz import REPO, SCHEMA_YAML, Chooser, load_corpus, mutate_sql, statement

ANALYSIS = Schema.from_dict(yaml.safe_load((REPO / "tests/fixtures/analysis/schema.yaml").read_text()))
SAMPLE = Schema.from_file(str(SCHEMA_YAML))
CONFIGS = (
    (ANALYSIS, ("crm", "public"), "app"),
    (SAMPLE, ("$user", "public"), "app"),
    (SAMPLE, ("member", "billing", "browsing", "telecom", "service", "public"), "analyst"),
)
CONSTRUCTS = [s for s in (REPO / "tests/fixtures/coverage/constructs.sql").read_text().split("\n;;\n") if s.strip()]
GENERATED = 400
MUTATED = 1500


def _generated(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [statement(Chooser([rnd.randrange(1 << 16) for _ in range(160)])) for _ in range(n)]


def _mutated(corpus: list[str], n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rnd.choice(corpus), rnd.choice(corpus)
        ops = [(rnd.randrange(9), rnd.randrange(1 << 12), rnd.randrange(1 << 12)) for _ in range(rnd.randrange(1, 4))]
        out.append(mutate_sql(a, b, ops))
    return out


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def check(statements: list[str]) -> tuple[list[str], int]:
    """The unread references found in ``statements`` (as text), and how many analyses were accepted."""
    found: list[str] = []
    accepted = 0
    for sql in statements:
        for schema, path, role in CONFIGS:
            misses, ok = unread(sql, schema, path, role)
            accepted += ok
            found.extend(str(m) for m in misses)
    return found, accepted


def test_every_reference_of_the_corpus_is_read():
    corpus = load_corpus()
    found, accepted = check(corpus)
    assert accepted > 1000, accepted  # (the guard only looks at accepted statements)
    assert not found, "\n".join(found[:20])


def test_every_reference_of_the_constructs_is_read():
    found, accepted = check(CONSTRUCTS)
    assert accepted > 500, accepted
    assert not found, "\n".join(found[:20])


def test_every_reference_of_generated_and_mutated_statements_is_read():
    statements = _generated(GENERATED, 27) + _mutated(load_corpus() + CONSTRUCTS, MUTATED, 27)
    found, accepted = check(statements)
    assert accepted > 500, accepted
    assert not found, "\n".join(found[:20])


@pytest.mark.parametrize("sql, where", [
    # hunt 24: the inner join sqlglot hangs on a non-first FROM item
    ("SELECT * FROM service.plans p JOIN service.plans q JOIN billing.payment_methods c ON true ON true",
     "Table.joins"),
])
def test_the_guard_finds_a_join_the_analysis_does_not_read(monkeypatch, sql, where):
    """Put hunt 24's miss back (every FROM item's own joins taken as read by the caller): the guard finds it."""
    original = flows.Analyzer.from_item

    def from_item(self, node, env, lateral, joins_read=False):
        return original(self, node, env, lateral, joins_read=True)
    monkeypatch.setattr(flows.Analyzer, "from_item", from_item)
    misses, accepted = unread(sql, SAMPLE, ("$user", "public"), "app")
    assert accepted and any(where in m.path and "payment_methods" in str(m) for m in misses), misses


@pytest.mark.parametrize("method", ["subscripts", "call_schema"])
def test_the_guard_finds_what_hunt_27_fixed_when_it_is_undone(monkeypatch, method):
    """Undo hunt 27's reads of SET subscripts and of a FROM call's schema: the guard finds both."""
    sql = {"subscripts": "UPDATE service.plans SET name[(SELECT max(card_number) FROM billing.payment_methods)] = 'x'",
           "call_schema": "SELECT x FROM billing.outstanding_balance(1) AS t(x)"}[method]
    if method == "subscripts":
        monkeypatch.setattr(flows.Analyzer, "subscripts", lambda self, t, env: {})
    else:  # the calls alone, as before (the table nodes holding their schemas are not passed on)
        original = flows.Analyzer.function_source

        def function_source(self, calls, *args):
            return original(self, [c.this if isinstance(c, exp.Table) else c for c in calls], *args)
        monkeypatch.setattr(flows.Analyzer, "function_source", function_source)
    misses, _ = unread(sql, SAMPLE, ("billing",), "app")
    assert misses, sql


def test_the_constructs_file_is_sql_of_the_sample_schema():
    assert len(CONSTRUCTS) > 300
    assert Path(REPO / "tests/fixtures/coverage/constructs.sql").read_text().count("payment_methods") > 100
