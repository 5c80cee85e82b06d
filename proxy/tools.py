"""The security team's commands: ``explain`` a decision and ``check`` a policy directory."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from proxy.analysis.access import analyze
from proxy.analysis.model import Analysis
from proxy.analysis.schema import Schema, parse_search_path
from proxy.enforcement.masks import NEEDS_TYPE
from proxy.enforcement.rewrite import make_rewrite
from proxy.policy.cases import load_policy_cases, run_policy_tests, summary
from proxy.policy.checks import (
    check_policy,
    consent_value_problems,
    further_value_problems,
)
from proxy.policy.decision import Block, Mask
from proxy.policy.engine import Policy
from proxy.policy.verdict import Explanation, decide_statement, flatten
from proxy.policy.vocabulary import split_method

SCHEMA_FILE = "schema.yaml"  # the schema a policy directory's test cases are written against


def load_schema_source(dsn: str | None, schema_file: str | None, policies: Path) -> Schema | None:
    """The schema for name resolution: a live server, a schema file, or ``policies/schema.yaml``."""
    if dsn:
        from proxy.enforcement.runtime import load_database_state

        return asyncio.run(load_database_state(dsn, None, 10.0)).schema
    if schema_file:
        return Schema.from_file(schema_file)
    default = policies / SCHEMA_FILE
    if default.exists():
        return Schema.from_file(str(default))
    return None


def untyped_note(analysis: Analysis, expl: Explanation, schema: Schema) -> str | None:
    """Why explain refused a mask the proxy would apply: the schema lacks the type the method needs.

    The proxy reads column types from the database; a schema file may have none
    (policies/schema.yaml), and ``generalize`` cannot be written without the type.
    """
    if expl.reason != "rewrite-refused":
        return None
    columns = {str(c): c for st in flatten(analysis.statements) for c in st.columns}
    untyped = []
    for req in expl.masks:
        col = columns.get(req.column)
        rel = schema.relation(col.schema, col.table) if col is not None else None
        if split_method(req.method or "")[0] in NEEDS_TYPE and (rel is None or rel.type_of(col.name) is None):
            untyped.append(f"{req.column} ({req.method})")
    if not untyped:
        return None
    return (f"the schema gives no type for {', '.join(untyped)}, which the mask needs: explain refuses where the "
            "proxy, which reads the types from the database, masks text, numbers and dates (and refuses other "
            "types). Give --dsn, or types: in the schema file, to see the rewrite.")


def explain(args) -> int:
    policies = Path(args.policies)
    policy = Policy.load(policies)
    schema = load_schema_source(args.dsn, args.schema, policies)
    if schema is None:
        print("purpose-proxy explain: no schema to resolve names against: give --dsn or --schema "
              f"(or put {SCHEMA_FILE} in {policies})", file=sys.stderr)
        return 2
    search_path = parse_search_path(args.search_path) if args.search_path else ["$user", "public"]
    analysis = analyze(args.sql, schema, search_path, args.role)
    decision, expl = decide_statement(analysis, role=args.role, purpose=args.purpose or None, policy=policy,
                                      rewrite=make_rewrite(policy, schema, search_path, args.role))
    rewritten = decision.sql if isinstance(decision, Mask) else None
    note = untyped_note(analysis, expl, schema)
    if args.json:
        out = expl.to_dict()
        out["decision"] = type(decision).__name__.lower()
        if isinstance(decision, Block):
            out["error"] = {"sqlstate": decision.sqlstate, "message": decision.message,
                            "detail": decision.detail, "hint": decision.hint}
        if rewritten is not None:
            out["rewritten_sql"] = rewritten
        if note:
            out["note"] = note
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(expl.to_text())
        if rewritten is not None:
            print(f"\nrewritten SQL:\n  {rewritten}")
        if note:
            print(f"\nnote: {note}")
    return 0


async def _consent_values(dsn: str, consent) -> tuple[dict, dict]:
    """The consent table's status and purpose values (as text) with their row counts (at most 1000 of each)."""
    import asyncpg

    from proxy.analysis.schema import quote_ident

    table = f"{quote_ident(consent.table.schema)}.{quote_ident(consent.table.name)}"
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        counted = []
        for column in (consent.status, consent.purpose):
            rows = await conn.fetch(f"SELECT {quote_ident(column)}::text, count(*) FROM {table} GROUP BY 1 "
                                    "ORDER BY 2 DESC LIMIT 1000", timeout=60)
            counted.append({r[0]: r[1] for r in rows})
        return counted[0], counted[1]
    finally:
        await conn.close(timeout=5)


async def _further_values(dsn: str, source) -> tuple[dict, dict]:
    """A further consent source's status and scope values (as text) with their row counts (at most 1000 of
    each; {} for a column the declaration does not use)."""
    import asyncpg

    from proxy.analysis.schema import quote_ident

    table = f"{quote_ident(source.table.schema)}.{quote_ident(source.table.name)}"
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        counted = []
        for column in (source.status, source.scope):
            rows = [] if column is None else await conn.fetch(
                f"SELECT {quote_ident(column)}::text, count(*) FROM {table} GROUP BY 1 ORDER BY 2 DESC LIMIT 1000",
                timeout=60)
            counted.append({r[0]: r[1] for r in rows})
        return counted[0], counted[1]
    finally:
        await conn.close(timeout=5)


def check(args) -> int:
    policies = Path(args.directory)
    try:
        policy = Policy.load(policies)
    except Exception as exc:
        print(f"FAIL: {exc}")
        return 1
    roles = None
    if args.dsn:  # the live database: its schema, and its roles for the rules' subjects
        from proxy.enforcement.runtime import load_database_state

        state = asyncio.run(load_database_state(args.dsn, None, 10.0))
        schema = state.schema
        roles = set(state.no_usage) if state.no_usage is not None else None
    else:
        schema = load_schema_source(None, args.schema, policies)
    problems = check_policy(policy, schema=schema, roles=roles)
    if args.dsn and policy.catalog.consent is not None:
        try:
            problems += consent_value_problems(policy, *asyncio.run(_consent_values(args.dsn, policy.catalog.consent)))
        except Exception as exc:  # the table's absence is reported above; a role that may not read it, here
            print(f"warning: the consent table's values could not be read: {exc.__class__.__name__}: {exc}")
        for source in policy.catalog.consent.further:
            if source.status is None and source.scope is None:
                continue
            try:
                problems += further_value_problems(policy, source, *asyncio.run(_further_values(args.dsn, source)))
            except Exception as exc:
                print(f"warning: the values of consent source {source.table} could not be read: "
                      f"{exc.__class__.__name__}: {exc}")
    failed = False
    for problem in problems:
        print(problem)
        failed = failed or getattr(problem, "severity", "error") == "error"
    case_files = sorted((policies / "tests").glob("*.yaml")) if (policies / "tests").is_dir() else []
    results = []
    if case_files:
        if schema is None:
            print(f"FAIL: policy test cases need a schema: give --dsn or --schema, or put {SCHEMA_FILE} "
                  f"in {policies}")
            return 1
        cases = [case for f in case_files for case in load_policy_cases(f)]
        results = run_policy_tests(policy, cases, analyze, schema)
        for result in results:
            if not result.passed or args.verbose:
                print(result)
        print(summary(results))
        failed = failed or any(not r.passed for r in results)
    print(f"policy {policy.version}: {len(problems)} problem(s), {len(results)} test case(s): "
          f"{'FAIL' if failed else 'ok'}")
    return 1 if failed else 0
