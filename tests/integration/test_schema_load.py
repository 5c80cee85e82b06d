"""``load_schema`` against a real PostgreSQL, and the analysis checked against what PostgreSQL reads.

A dedicated database gets the objects of ``tests/fixtures/analysis/schema.yaml``
(with types). The tests check that ``load_schema`` returns them (columns in order,
view and materialized-view definitions, functions, pg_catalog and
information_schema relations), that a view definition read back from the server
analyses to its base columns, that the loaded schema analyses every fixture the
same way as the YAML schema does, and, for every fixture query, that each base
column PostgreSQL's plan reads (``EXPLAIN (VERBOSE, FORMAT JSON)``) is reported by
the analysis, and that statements the analysis refuses as invalid are refused by
PostgreSQL too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import uuid

import asyncpg
import pytest

from proxy.analysis.access import analyze
from proxy.analysis.model import Column, Kind
from proxy.analysis.schema import MATERIALIZED_VIEW, TABLE, VIEW, catalog_stamp, load_schema
from proxy.devtools.sample import policies_dir
from proxy.policy.checks import check_policy
from proxy.policy.engine import Policy
from tests.unit.test_analysis import CASES, DEFAULT_PATH, SCHEMA as YAML_SCHEMA

pytestmark = pytest.mark.integration

DDL = """
CREATE SCHEMA crm;
CREATE SCHEMA billing;
CREATE TABLE crm.members (member_id int PRIMARY KEY, name text, email text, phone text, birth_date date,
                          postal_code text);
CREATE TABLE crm.notes (note_id serial PRIMARY KEY, member_id int, body text, created_at timestamptz DEFAULT now());
CREATE TABLE crm.docs (doc_id int PRIMARY KEY, member_id int, tags text[], doc jsonb);
CREATE TABLE crm."CustomerFile" ("FileId" int, "OwnerName" text, member_id int, name text);
CREATE TABLE billing.cards (card_id int PRIMARY KEY, member_id int, card_number text, expiry date);
CREATE TABLE billing.invoices (invoice_id serial PRIMARY KEY, member_id int, amount numeric, issued_at date);
CREATE TABLE public.audit_log (id serial, at timestamptz DEFAULT now(), actor text, action text);
CREATE TABLE public.members (id int, label text);
CREATE VIEW crm.member_contacts AS
  SELECT m.member_id, m.name, m.email, m.phone FROM crm.members m WHERE m.email IS NOT NULL;
CREATE VIEW crm.member_emails (id, email_lower) AS
  SELECT c.member_id, lower(c.email) FROM crm.member_contacts c;
CREATE VIEW crm.member_summary AS
  SELECT m.member_id, sum(i.amount) AS invoice_total
  FROM crm.members m JOIN billing.invoices i ON i.member_id = m.member_id GROUP BY m.member_id;
CREATE MATERIALIZED VIEW crm.member_stats AS
  SELECT postal_code, count(*) AS members FROM crm.members GROUP BY postal_code;
CREATE FUNCTION crm.member_score(id int) RETURNS int LANGUAGE plpgsql STABLE AS $$ BEGIN RETURN id; END $$;
CREATE FUNCTION crm.search_members(q text) RETURNS TABLE (member_id int, name text) LANGUAGE sql STABLE
  AS $$ SELECT m.member_id, m.name FROM crm.members m WHERE m.name = q $$;
CREATE FUNCTION crm.opaque_rows() RETURNS SETOF record LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;
CREATE FUNCTION crm.legacy_rows() RETURNS TABLE (x int, label text) LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$;
CREATE PROCEDURE crm.archive_member(id int) LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
CREATE DOMAIN crm.code AS text;
CREATE SCHEMA shadow;
CREATE FUNCTION shadow.lower(id int) RETURNS text LANGUAGE sql STABLE AS $$ SELECT id::text $$;
CREATE AGGREGATE shadow.sum(numeric) (sfunc = numeric_add, stype = numeric);
CREATE FUNCTION shadow.ceiling(id int) RETURNS text LANGUAGE sql STABLE AS $$ SELECT id::text $$;
CREATE FUNCTION shadow.mod(a int, b int) RETURNS text LANGUAGE sql STABLE AS $$ SELECT a::text $$;
CREATE FUNCTION shadow.now() RETURNS text LANGUAGE sql STABLE AS $$ SELECT 'then' $$;
CREATE AGGREGATE shadow.variance(numeric) (sfunc = numeric_add, stype = numeric);
"""


@contextlib.contextmanager
def scratch_database(pg, prefix: str, ddl: str | None = None):
    """A fresh database owned by ``app``, with ``ddl`` run in it as ``app``, dropped afterwards; yields its name."""
    name = prefix + uuid.uuid4().hex[:8]
    pg.psql_admin(f'CREATE DATABASE "{name}" OWNER app')

    async def setup() -> None:
        conn = await asyncpg.connect(pg.url("app", dbname=name))
        try:
            await conn.execute(ddl)
        finally:
            await conn.close()

    try:
        if ddl:
            asyncio.run(setup())
        yield name
    finally:
        pg.psql_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def db(pg):
    """A fresh database owned by ``app`` holding the fixture schema; yields its URL."""
    with scratch_database(pg, "pp_analysis_", DDL) as name:
        yield pg.url("app", dbname=name)


async def _load(url: str):
    conn = await asyncpg.connect(url)
    try:
        return await load_schema(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def loaded(db):
    return asyncio.run(_load(db))


def test_load_schema_returns_tables_views_and_functions(loaded):
    s = loaded
    members = s.relation("crm", "members")
    assert members is not None and members.kind == TABLE
    assert members.columns == ("member_id", "name", "email", "phone", "birth_date", "postal_code")
    mixed = s.relation("crm", "CustomerFile")
    assert mixed is not None and mixed.columns == ("FileId", "OwnerName", "member_id", "name")
    assert s.relation("crm", "customerfile") is None
    contacts = s.relation("crm", "member_contacts")
    assert contacts.kind == VIEW and contacts.columns == ("member_id", "name", "email", "phone")
    assert "crm.members" in contacts.definition  # qualified although crm is on no search_path
    emails = s.relation("crm", "member_emails")
    assert emails.columns == ("id", "email_lower") and "crm.member_contacts" in emails.definition
    stats = s.relation("crm", "member_stats")
    assert stats.kind == MATERIALIZED_VIEW and stats.definition and stats.columns == ("postal_code", "members")
    assert s.database and s.database.startswith("pp_analysis_")
    # pg_catalog and information_schema relations are kept (a statement reading them is analysed).
    assert s.relation("pg_catalog", "pg_class") is not None
    assert s.relation("pg_catalog", "pg_stat_activity") is not None
    assert s.relation("information_schema", "tables") is not None
    assert not any(r.schema == "pg_toast" or r.schema.startswith("pg_temp") for r in s.relations)
    score = s.function("crm", "member_score")
    assert score.languages == {"plpgsql"} and score.volatility == "stable" and not score.builtin
    assert s.function("crm", "search_members").result_columns == ("member_id", "name")
    assert s.function("crm", "opaque_rows").result_columns is None
    assert "procedure" in s.function("crm", "archive_member").kinds
    lower = s.function("pg_catalog", "lower")
    assert lower is not None and lower.builtin
    assert "aggregate" in s.function("pg_catalog", "count").kinds
    assert s.knows_builtin_functions
    # Serial and now() defaults call pg_catalog functions only: no code runs unnamed here.
    assert (s.implicit, s.on_write, s.on_read, s.rules) == ({}, {}, {}, {})


IMPLICIT_DDL = """
CREATE FUNCTION crm.f(x int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT x';
CREATE FUNCTION crm.g(x text) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
CREATE FUNCTION crm.trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE FUNCTION crm.cmp(a bigint, b bigint) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 0';
CREATE FUNCTION crm.eq(a bigint, b numeric) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
CREATE FUNCTION crm.near(a int, b int) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
CREATE OPERATOR crm.= (LEFTARG = bigint, RIGHTARG = numeric, FUNCTION = crm.eq);
CREATE OPERATOR crm.### (LEFTARG = int, RIGHTARG = int, FUNCTION = crm.near);
CREATE DOMAIN crm.small AS int CHECK (crm.f(VALUE) < 10) DEFAULT crm.f(1);
CREATE TABLE crm.w (id int DEFAULT crm.f(0), g int GENERATED ALWAYS AS (crm.f(id)) STORED,
                    t text CHECK (crm.g(t)));
CREATE TRIGGER w_trg BEFORE INSERT ON crm.w FOR EACH ROW EXECUTE FUNCTION crm.trg();
CREATE INDEX ON crm.w (crm.f(id)) WHERE crm.g(t);
CREATE TABLE crm.p (id int PRIMARY KEY, t text);
CREATE TABLE crm.c (id int REFERENCES crm.p ON DELETE CASCADE);
CREATE TRIGGER c_trg BEFORE DELETE ON crm.c FOR EACH ROW EXECUTE FUNCTION crm.trg();
ALTER TABLE crm.p ENABLE ROW LEVEL SECURITY;
CREATE POLICY p_pol ON crm.p USING (crm.g(t));
CREATE POLICY w_pol ON crm.w USING (crm.g(t));
CREATE TABLE crm.r (id int);
CREATE RULE r_rule AS ON INSERT TO crm.r DO ALSO NOTIFY r;
CREATE VIEW crm.wv AS SELECT id, t FROM crm.w;
CREATE VIEW crm.rv AS SELECT id FROM crm.r;
"""


def test_load_schema_reads_the_code_statements_run_without_naming_it(pg):
    with scratch_database(pg, "pp_implicit_", DDL + IMPLICIT_DDL) as name:
        try:
            _check_implicit_code(pg, name)
        finally:
            pg.psql_admin("DROP EVENT TRIGGER IF EXISTS pp_evt", dbname=name)


def _check_implicit_code(pg, name: str) -> None:
    """What ``load_schema`` reads of the implicit code in database ``name``."""
    # What only a superuser may create: an operator family with a support function, an event trigger.
    pg.psql_admin("CREATE FUNCTION crm.evt() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$;"
                  "CREATE EVENT TRIGGER pp_evt ON ddl_command_start EXECUTE FUNCTION crm.evt();"
                  "CREATE OPERATOR CLASS crm.big_ops FOR TYPE bigint USING btree AS "
                  "OPERATOR 1 <, OPERATOR 3 =, FUNCTION 1 crm.cmp(bigint, bigint);", dbname=name)
    s = asyncio.run(_load(pg.url("app", dbname=name)))
    assert s.implicit == {
        "crm.cmp": "is a support function of the operator family crm.big_ops",
        "crm.eq": "is behind the operator crm.= (which IN, BETWEEN, LIKE, CASE, DISTINCT, ORDER BY or an index "
                  "may apply)",
        "crm.evt": "runs in the event trigger pp_evt (on DDL)",
        "crm.f": "is behind a CHECK constraint of the domain crm.small",
    }
    assert s.operators["###"] == ("crm.near",)  # found by its symbol in the text, not in every statement
    w_code = {"crm.f": "is behind a column default of crm.w", "crm.g": "is behind a CHECK constraint of crm.w",
              "crm.trg": "runs in a trigger on crm.w"}  # one reason a function runs is enough to name
    assert s.on_write == {
        ("crm", "w"): w_code,
        ("crm", "wv"): w_code,  # a write through the view writes crm.w
        ("crm", "c"): {"crm.trg": "runs in a trigger on crm.c"},
        ("crm", "p"): {"crm.trg": "runs in a trigger on crm.c"},  # ON DELETE CASCADE reaches crm.c
    }
    assert s.on_read == {("crm", "p"): {"crm.g": "is behind a row-level security policy of crm.p"}}  # not w
    assert s.rules == {("crm", "r"): ("crm.r",), ("crm", "rv"): ("crm.r",)}
    again = type(s).from_dict(s.to_dict())
    assert (again.implicit, again.on_write, again.on_read, again.rules, again.version) == \
        (s.implicit, s.on_write, s.on_read, s.rules, s.version)
    # `purpose-proxy check --dsn` tells the policy's reviewers what will be refused for want of declarations.
    found = {p.message for p in check_policy(Policy.load(policies_dir()), schema=s) if "crm." in p.message}
    undeclared = "and it is not declared in the catalog, so the proxy refuses"
    assert {
        f"function crm.cmp is a support function of the operator family crm.big_ops, {undeclared} every statement "
        "on this database",
        f"function crm.trg runs in a trigger on crm.c, {undeclared} statements that write crm.c, crm.p",
        f"function crm.trg runs in a trigger on crm.w, {undeclared} statements that write crm.w, crm.wv",
        f"function crm.g is behind a row-level security policy of crm.p, {undeclared} statements that read or write "
        "crm.p",
        f"function crm.near is behind the operator ###, {undeclared} statements using ###",
        "crm.rv: a write reaches relations with rules (crm.r), so the proxy refuses writes to it",
    } <= found, "\n".join(sorted(found))


def test_schema_version_is_stable_and_changes_with_ddl(db, loaded):
    again = asyncio.run(_load(db))
    assert again.version == loaded.version

    async def alter() -> None:
        conn = await asyncpg.connect(db)
        try:
            await conn.execute("CREATE TABLE public.scratch (x int)")
        finally:
            await conn.close()

    asyncio.run(alter())
    changed = asyncio.run(_load(db))
    assert changed.version != loaded.version
    assert changed.relation("public", "scratch").columns == ("x",)


@pytest.mark.parametrize("change, counts", [
    ("CREATE TEMP TABLE scratch_tmp (x int)", False),  # other sessions' temporary tables are not loaded
    ("CREATE FUNCTION pg_temp.scratch_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'", False),
    ("TRUNCATE billing.invoices", False),  # rewrites the pg_class row, not what a load reads
    ("ANALYZE crm.members", False),
    ("VACUUM FULL crm.notes", False),
    ("CREATE INDEX ON crm.notes (member_id)", False),
    ("ALTER TABLE crm.notes ADD COLUMN stamp_test text", True),
    ("ALTER TABLE crm.notes RENAME COLUMN body TO body_renamed", True),
    ("ALTER TABLE crm.notes ALTER COLUMN body TYPE varchar(200)", True),
    ("ALTER TABLE crm.notes RENAME TO notes_renamed", True),
    ("CREATE OR REPLACE VIEW crm.member_contacts AS "
     "SELECT m.member_id, m.name, m.postal_code AS email, m.phone FROM crm.members m", True),
    ("CREATE OR REPLACE FUNCTION crm.member_score(id int) RETURNS int LANGUAGE plpgsql VOLATILE "
     "AS $$ BEGIN RETURN id; END $$", True),
    ("ALTER ROLE app SET search_path = crm, public", True),
    ("CREATE SCHEMA stamp_test", True),
    ("REVOKE USAGE ON SCHEMA crm FROM PUBLIC", True),  # which schemas a role may search
    ("GRANT USAGE ON SCHEMA crm TO PUBLIC", True),
    ("CREATE CAST (int AS crm.code) WITH INOUT", True),  # a cast may run a function (hunt 15)
    # Code a statement runs without naming it (built-in functions here: the stamp moves all the same).
    ("CREATE TRIGGER stamp_trg BEFORE UPDATE ON crm.notes FOR EACH ROW "
     "EXECUTE FUNCTION suppress_redundant_updates_trigger()", True),
    ("ALTER TABLE crm.notes ALTER COLUMN body SET DEFAULT lower('x')", True),
    ("ALTER TABLE crm.notes ADD CHECK (length(body) < 100)", True),
    ("CREATE INDEX ON crm.notes (lower(body))", True),
    ("ALTER TABLE crm.notes ENABLE ROW LEVEL SECURITY", True),
    ("CREATE POLICY stamp_pol ON crm.notes USING (true)", True),
    ("ALTER DOMAIN crm.code ADD CHECK (length(VALUE) < 9)", True),
    ("ALTER DOMAIN crm.code SET DEFAULT 'x'", True),
    ("CREATE RULE stamp_rule AS ON INSERT TO crm.notes DO INSTEAD NOTHING", True),
    ("CREATE TEMP TABLE scratch_tmp2 (x int DEFAULT lower('x')::int CHECK (x > 0)) ", False),
])
def test_catalog_stamp_moves_with_what_a_load_reads_only(pg, change, counts):
    """The catalog watch reloads when the stamp moves: on DDL that changes what ``load_schema`` and the
    search_path defaults read, and not on what sessions do all the time."""

    async def run(name: str) -> tuple:
        conn = await asyncpg.connect(pg.url("app", dbname=name))
        other = await asyncpg.connect(pg.url("app", dbname=name))
        try:
            await conn.execute(DDL)
            before = await catalog_stamp(conn)
            assert await catalog_stamp(conn) == before
            await other.execute(change)
            return before, await catalog_stamp(conn)
        finally:
            await conn.execute("ALTER ROLE app RESET search_path")
            await conn.close()
            await other.close()

    with scratch_database(pg, "pp_stamp_") as name:
        before, after = asyncio.run(run(name))
    assert (after != before) is counts


INHERITANCE_DDL = """
CREATE SCHEMA member;
CREATE SCHEMA reporting;
CREATE TABLE member.contacts (member_id int, email text) PARTITION BY RANGE (member_id);
CREATE TABLE reporting.contacts_p0 PARTITION OF member.contacts FOR VALUES FROM (0) TO (1000)
  PARTITION BY RANGE (member_id);
CREATE TABLE reporting.contacts_p0a PARTITION OF reporting.contacts_p0 FOR VALUES FROM (0) TO (500);
CREATE INDEX ON member.contacts (email);  -- partitioned indexes have pg_inherits rows too
CREATE TABLE member.members (member_id int, email text);
CREATE TABLE member.notes (body text);
CREATE TABLE reporting.members_child (note text) INHERITS (member.members, member.notes);
CREATE TABLE reporting.loose (member_id int, email text);
"""


def test_load_schema_reads_partitions_and_inheritance_children(pg):
    """Each table's parents, transitively; ATTACH/DETACH PARTITION and INHERIT/NO INHERIT move both the
    catalog stamp (so the watch reloads) and the loaded schema's version (so cached decisions go)."""

    async def run(name: str) -> list:
        conn = await asyncpg.connect(pg.url("app", dbname=name))
        other = await asyncpg.connect(pg.url("app", dbname=name))
        try:
            seen = [(await catalog_stamp(conn), await load_schema(conn))]
            for change in ("ALTER TABLE member.contacts ATTACH PARTITION reporting.loose FOR VALUES FROM (1000) "
                           "TO (2000)",
                           "ALTER TABLE member.contacts DETACH PARTITION reporting.loose",
                           "ALTER TABLE reporting.loose INHERIT member.members",
                           "ALTER TABLE reporting.loose NO INHERIT member.members"):
                await other.execute(change)
                seen.append((await catalog_stamp(conn), await load_schema(conn)))
            return seen
        finally:
            await conn.close()
            await other.close()

    with scratch_database(pg, "pp_inherit_", INHERITANCE_DDL) as name:
        seen = asyncio.run(run(name))
    s = seen[0][1]
    ancestors = {f"{r.schema}.{r.name}": [str(t) for t in s.ancestors(r.schema, r.name)]
                 for r in s.relations if r.schema in ("member", "reporting")}
    assert ancestors == {
        "member.contacts": [], "member.members": [], "member.notes": [], "reporting.loose": [],
        "reporting.contacts_p0": ["member.contacts"],
        "reporting.contacts_p0a": ["reporting.contacts_p0", "member.contacts"],
        "reporting.members_child": ["member.members", "member.notes"],  # in the order INHERITS lists them
    }
    assert type(s).from_dict(s.to_dict()).version == s.version
    loose = [[str(t) for t in schema.ancestors("reporting", "loose")] for _, schema in seen]
    assert loose == [[], ["member.contacts"], [], ["member.members"], []]
    stamps, versions = [x for x, _ in seen], [schema.version for _, schema in seen]
    assert all(a != b for a, b in itertools.pairwise(stamps)), stamps
    assert all(a != b for a, b in itertools.pairwise(versions)), versions


PRIMARY_KEY_DDL = """
CREATE SCHEMA crm;
CREATE TABLE crm.members (member_id integer PRIMARY KEY, name text);
CREATE TABLE crm.lines (line_no integer, "Member" integer, note text, PRIMARY KEY ("Member", line_no));
CREATE TABLE crm.loose (a integer UNIQUE NOT NULL, b text);
CREATE TABLE crm.parts (k integer, v text, PRIMARY KEY (k)) PARTITION BY RANGE (k);
CREATE VIEW crm.names AS SELECT member_id, name FROM crm.members;
"""


def test_load_schema_reads_primary_keys(pg):
    """Each table's primary key, in the key's column order (not the table's): a query grouped by it may
    use the table's other columns, which the rewrite must keep working. Unique keys are not primary keys
    (PostgreSQL infers functional dependency from the primary key only). Adding or dropping one moves the
    catalog stamp."""

    async def run(name: str) -> list:
        conn = await asyncpg.connect(pg.url("app", dbname=name))
        try:
            seen = [(await catalog_stamp(conn), await load_schema(conn))]
            await conn.execute("ALTER TABLE crm.loose ADD PRIMARY KEY (b)")
            seen.append((await catalog_stamp(conn), await load_schema(conn)))
            return seen
        finally:
            await conn.close()

    with scratch_database(pg, "pp_pkey_", PRIMARY_KEY_DDL) as name:
        (before, s), (after, t) = asyncio.run(run(name))
    keys = {r.name: r.primary_key for r in s.relations if r.schema == "crm"}
    assert keys == {"members": ("member_id",), "lines": ("Member", "line_no"), "loose": (), "parts": ("k",),
                    "names": ()}
    assert type(s).from_dict(s.to_dict()).relation("crm", "lines") == s.relation("crm", "lines")
    assert type(s).from_dict(s.to_dict()).version == s.version
    assert t.relation("crm", "loose").primary_key == ("b",)
    assert before != after and s.version != t.version


def test_catalog_stamp_is_the_same_from_an_old_connection_and_a_new_one(pg):
    # Found by a hunt: the stamp held the server's search_path as the session read it at start; after
    # ALTER DATABASE ... SET search_path the watch's kept connection and every load's new one differed
    # for ever, and the proxy loaded the schema every 2 s.

    async def run(name: str) -> tuple:
        old = await asyncpg.connect(pg.url("app", dbname=name))
        try:
            await old.execute(f'ALTER DATABASE "{name}" SET search_path = public, pg_catalog')
            first = await catalog_stamp(old)
            new = await asyncpg.connect(pg.url("app", dbname=name))
            try:
                return first, await catalog_stamp(old), await catalog_stamp(new)
            finally:
                await new.close()
        finally:
            await old.close()

    with scratch_database(pg, "pp_stamp_") as name:
        first, again, fresh = asyncio.run(run(name))
    assert first == again == fresh


def test_loaded_view_definition_analyses_to_base_columns(loaded):
    a = analyze("SELECT email_lower FROM crm.member_emails WHERE id = 1", loaded)
    st = a.statements[0]
    assert not st.unsupported, st.unsupported
    assert st.columns == {
        Column("crm", "members", "email"): st.columns[Column("crm", "members", "email")],
        Column("crm", "members", "member_id"): st.columns[Column("crm", "members", "member_id")],
    }
    from proxy.analysis.model import Use

    assert st.columns[Column("crm", "members", "email")] == Use.PROJECT | Use.FILTER
    assert st.columns[Column("crm", "members", "member_id")] == Use.FILTER
    assert "pg_catalog.lower" in st.functions


def test_loaded_schema_classifies_functions(loaded):
    st = analyze("SELECT crm.member_score(member_id), lower(email) FROM crm.members", loaded).statements[0]
    assert not st.unsupported and {"crm.member_score", "pg_catalog.lower"} <= st.functions
    st = analyze("SELECT query_to_xml('select 1', true, true, '')", loaded).statements[0]
    assert any("executes SQL" in r for r in st.unsupported)
    st = analyze("SELECT no_such_function(1)", loaded).statements[0]
    assert any("unknown function" in r for r in st.unsupported)
    st = analyze("SELECT relname FROM pg_class WHERE relnamespace = 11", loaded).statements[0]
    assert not st.unsupported and Column("pg_catalog", "pg_class", "relname") in st.columns


# --- the fixtures against the real server ---------------------------------------------------------------

_SCAN_TYPES = {"Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Tid Scan", "Tid Range Scan",
               "Sample Scan"}
_EXPR_KEYS = ("Output", "Filter", "Index Cond", "Recheck Cond", "Hash Cond", "Merge Cond", "Join Filter",
              "Sort Key", "Group Key", "Presorted Key", "One-Time Filter", "TID Cond", "Function Call",
              "Table Function Call", "Conflict Filter", "Run Condition", "Cache Key", "Order By", "Hash Key")
_STRING = re.compile(r"'(?:[^']|'')*'")
_REF = re.compile(r'(?<![\w"$.])("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)\.("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*|\*)')


def _unquote(s: str) -> str:
    return s[1:-1].replace('""', '"') if s.startswith('"') else s


def pg_reads(plan: dict, schema) -> set[Column]:
    """The base columns a plan reads: expressions of every node, scan outputs only where they are the result.

    EXPLAIN VERBOSE qualifies column references with the scan's alias (``m.email``,
    whole rows as ``m.*``) unless the query has a single range table entry, where it
    leaves them bare.
    """
    aliases: dict[str, tuple[str, str]] = {}

    def collect_aliases(node: dict) -> None:
        if node.get("Relation Name") and node.get("Alias"):
            aliases[node["Alias"]] = (node.get("Schema"), node["Relation Name"])
        for child in node.get("Plans", []):
            collect_aliases(child)

    collect_aliases(plan)
    single = next(iter(aliases.values())) if len(aliases) == 1 else None
    out: set[Column] = set()

    def add_refs(text: str) -> None:
        text = _STRING.sub("''", text)
        for a, c in _REF.findall(text):
            alias, col = _unquote(a), _unquote(c)
            if alias not in aliases:
                continue
            sch, rel = aliases[alias]
            info = schema.relation(sch, rel)
            if col == "*":
                out.update(Column(sch, rel, x) for x in info.columns)
            elif col in info.columns:
                out.add(Column(sch, rel, col))
        if single is not None:
            info = schema.relation(*single)
            for w in _BARE.findall(text):
                if _unquote(w) in info.columns:
                    out.add(Column(single[0], single[1], _unquote(w)))

    def walk(node: dict, parent: dict | None, in_cte: bool) -> None:
        ntype = node.get("Node Type")
        is_scan = ntype in _SCAN_TYPES
        for key in _EXPR_KEYS:
            val = node.get(key)
            if val is None:
                continue
            if key == "Output":
                if is_scan and parent is not None and parent.get("Node Type") != "ModifyTable":
                    continue  # a scan's output feeds its parent (and may be the whole physical tuple)
                if ntype in _PASS_THROUGH:
                    continue  # these copy their child's tuple
                if ntype == "ModifyTable" and in_cte:
                    continue  # RETURNING of a WITH query: delivered only if the query reads it
            for text in val if isinstance(val, list) else [val]:
                add_refs(str(text))
        for child in node.get("Plans", []):
            walk(child, node, in_cte or str(child.get("Subplan Name", "")).startswith("CTE "))

    walk(plan, None, False)
    return out


_PASS_THROUGH = {"Hash", "Materialize", "Memoize", "Sort", "Unique", "Gather", "Gather Merge", "Append",
                 "Incremental Sort", "Merge Append", "SetOp", "Recursive Union"}
_BARE = re.compile(r'(?<![\w"$.:])("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)(?![\w"$.(])')


_EXPLAINABLE = {Kind.SELECT, Kind.INSERT, Kind.UPDATE, Kind.DELETE, Kind.MERGE}
# Reasons for refusing a statement that PostgreSQL must agree with (the statement is invalid).
_INVALID = ("does not exist", "ambiguous", "unknown relation", "specified more than once", "missing FROM-clause",
            "columns available but", "same number of columns", "more expressions than target columns",
            "must all be the same length", "unknown function")


def _single(case: dict) -> dict | None:
    stmts = case.get("statements")
    if stmts is not None:
        return None
    if "$" in case["sql"] and re.search(r"\$\d", case["sql"]):
        return None  # parameters need types
    return case


def _path_sql(case: dict) -> str:
    role = case.get("role", "app")
    path = [role if p == "$user" else p for p in case.get("search_path", DEFAULT_PATH)]
    return "SET LOCAL search_path = " + (", ".join('"' + p.replace('"', '""') + '"' for p in path) or "''")


async def _explain_all(url: str, loaded) -> list[str]:
    conn = await asyncpg.connect(url)
    problems: list[str] = []
    checked = 0
    try:
        for param in CASES:
            case = _single(param.values[0])
            if case is None or case.get("standard_conforming_strings") is False:
                continue
            sql = case["sql"]
            a = analyze(sql, loaded, case.get("search_path", DEFAULT_PATH), case.get("role", "app"))
            st = a.statements[0] if len(a.statements) == 1 else None
            if st is None or "pg_stat_activity" in sql or "pg_class" in sql or "app.crm" in sql:
                continue
            ref = analyze(sql, YAML_SCHEMA, case.get("search_path", DEFAULT_PATH), case.get("role", "app"))
            rst = ref.statements[0]
            if (st.kind, st.columns, st.tables, bool(st.unsupported)) != (rst.kind, rst.columns, rst.tables,
                                                                          bool(rst.unsupported)):
                problems.append(f"{param.id}: the loaded schema analyses differently: {st} vs {rst}")
            if st.kind not in _EXPLAINABLE:
                continue
            if any(not f.startswith("pg_catalog.") for f in st.functions) and not st.unsupported:
                continue  # the body of a user-defined function is the policy's business, not the analysis'
            invalid = [r for r in st.unsupported if any(x in r for x in _INVALID)]
            if st.unsupported and not invalid:
                continue  # refused for a reason of the analysis' own
            tr = conn.transaction()
            await tr.start()
            try:
                await conn.execute(_path_sql(case))
                raw = await conn.fetchval("EXPLAIN (VERBOSE, FORMAT JSON) " + sql)
                error = None
            except asyncpg.PostgresError as exc:
                error = exc
            finally:
                await tr.rollback()
            checked += 1
            if invalid:
                if error is None:
                    problems.append(f"{param.id}: refused as {invalid} but PostgreSQL accepts it")
                continue
            if error is not None:
                problems.append(f"{param.id}: analysed, but PostgreSQL refuses it: {error}")
                continue
            plan = json.loads(raw)[0]["Plan"]
            reads = pg_reads(plan, loaded)
            reported = {c for c, u in st.columns.items() if u.reads}
            missing = reads - reported
            if missing:
                problems.append(f"{param.id}: PostgreSQL reads {sorted(map(str, missing))} which the analysis "
                                f"does not report (it reports {sorted(map(str, reported))})")
    finally:
        await conn.close()
    assert checked >= 100, f"only {checked} fixture statements were checked against PostgreSQL"
    return problems


def test_fixtures_agree_with_postgresql(db, loaded):
    problems = asyncio.run(_explain_all(db, loaded))
    assert not problems, "\n".join(problems)


def test_load_schema_leaves_the_connection_as_it_was(db):
    async def run() -> tuple[str, str, bool]:
        conn = await asyncpg.connect(db)
        try:
            await conn.execute("SET search_path = crm, public")
            async with conn.transaction():
                await load_schema(conn)
                inside = await conn.fetchval("SHOW search_path")
            after = await conn.fetchval("SHOW search_path")
            await load_schema(conn)
            return inside, after, conn.is_in_transaction()
        finally:
            await conn.close()

    inside, after, in_tx = asyncio.run(run())
    assert inside == after == "crm, public" and not in_tx


def test_what_a_load_reads_is_of_the_moment_of_its_stamp(pg, db, monkeypatch):
    """A change committed while a load runs is read as of the stamp the load keeps, or not at all. Read in
    turn, ALTER ROLE ... SET role committed after the stamp was read, and RESET before the watcher's next
    look (which then found the stamp it knew: the row was gone again), left the login refused for good."""
    from proxy.enforcement import runtime

    name = db.rsplit("/", 1)[1].split("?", 1)[0]
    read_stamp = runtime.catalog_stamp

    async def stamp_then_change(conn):
        stamp = await read_stamp(conn)
        pg.psql_admin(f"ALTER ROLE app IN DATABASE {name} SET role = 'app'", dbname=name)  # committed meanwhile
        return stamp

    monkeypatch.setattr(runtime, "catalog_stamp", stamp_then_change)
    try:
        state = asyncio.run(runtime.load_database_state(db, name, 10.0))
    finally:
        pg.psql_admin(f"ALTER ROLE app IN DATABASE {name} RESET role", dbname=name)
    assert not state.sets_identity("app", name), "the load read a change its stamp does not know of"
