"""The canary oracle: planting recognisable values in the sample database, the statements to run, clients that
record every field the proxy returns, and the scanner that knows from the policy which purpose may see what."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from dataclasses import dataclass, field

import psycopg

from proxy.analysis.model import Column, Table
from proxy.policy import vocabulary as v

MEMBER_BASE = 8100000000
# Row keys moved to their own ranges, so that a raw key is recognisable wherever it appears: kind -> (offset,
# (table, column) pairs; the first holds the key, the others reference it).
KEYS = {
    "method": (8200000000, [("billing.payment_methods", "method_id"), ("billing.payments", "method_id")]),
    "assessment": (8300000000, [("credit.assessments", "assessment_id")]),
    "profile": (8400000000, [("ads.interest_profiles", "profile_id")]),
    "inquiry": (8500000000, [("support.inquiries", "inquiry_id"), ("support.call_recordings", "inquiry_id")]),
    "recording": (8600000000, [("support.call_recordings", "recording_id")]),
    "check": (8700000000, [("member.identity_checks", "check_id")]),
    "subscription": (8800000000, [("telecom.subscriptions", "subscription_id"),
                                  ("telecom.access_sessions", "subscription_id"),
                                  ("telecom.communication_logs", "subscription_id")]),
}
NUMBERS = [  # columns whose planted values are distinctive numbers: (table, column, SQL of the new value)
    ("billing.payment_methods", "card_number", "'4917' || lpad((method_id - 8200000000)::text, 8, '0') || '4242'"),
    ("billing.payment_methods", "account_number", "'5917' || lpad((method_id - 8200000000)::text, 6, '0')"),
    ("prizes.winners", "individual_number", "'6917' || lpad(winner_id::text, 8, '0')"),
    ("prizes.winners", "withholding_tax", "74000000 + winner_id * 7919"),
    ("billing.invoices", "amount", "50000000 + (invoice_id * 7919) % 9000000"),
    ("billing.invoices", "tax", "60000000 + (invoice_id * 104729) % 9000000"),
    ("billing.payments", "amount", "70000000 + (payment_id * 7919) % 9000000"),
    ("credit.assessments", "credit_limit", "71000000 + (assessment_id * 7919) % 900000"),
    ("credit.delinquencies", "overdue_amount", "72000000 + (delinquency_id * 7919) % 900000"),
    ("credit.nonpayer_exchange", "unpaid_amount", "73000000 + (exchange_id * 7919) % 900000"),
    ("telecom.access_sessions", "bytes_in", "9100000000000 + session_id * 7919"),
    ("telecom.access_sessions", "bytes_out", "9200000000000 + session_id * 7919"),
    ("telecom.communication_logs", "bytes", "9300000000000 + log_id * 7919"),
]
IPS = [("telecom.access_sessions", "assigned_ip", "session_id", 91), ("telecom.communication_logs", "src_ip", "log_id", 92),
       ("telecom.communication_logs", "dst_ip", "log_id", 93)]
DATES = [("member.members", "birth_date", "member_id"), ("credit.nonpayer_exchange", "birth_date", "exchange_id")]
# Identifying text columns and the shape their canary takes (some columns check what they hold).
TEXT = [
    ("member.members", "member_number", "{}"), ("member.members", "user_id", "{}"),
    ("member.members", "family_name", "Zq{}"), ("member.members", "given_name", "{}"),
    ("member.members", "family_name_kana", "{}"), ("member.members", "given_name_kana", "{}"),
    ("member.members", "email", "{}@x.example"), ("member.members", "phone", "{}-0117"),
    ("member.members", "postal_code", "{}"), ("member.members", "address", "{} Canary Street"),
    ("member.identity_checks", "document_number", "{}"), ("member.guardian_consents", "guardian_name", "{}"),
    ("member.guardian_consents", "guardian_phone", "{}"), ("billing.payment_methods", "card_expiry", "{}"),
    ("billing.payment_methods", "account_holder", "{}"), ("credit.nonpayer_exchange", "family_name", "{}"),
    ("credit.nonpayer_exchange", "given_name", "{}"), ("credit.nonpayer_exchange", "phone", "{}"),
    ("credit.nonpayer_exchange", "address", "{}"), ("browsing.page_views", "url", "https://w.example/{}"),
    ("browsing.page_views", "referrer", "https://r.example/{}"), ("browsing.mail_events", "url", "https://m.example/{}"),
    ("browsing.beacon_hits", "page_url", "https://b.example/{}"),
    ("browsing.personal_urls", "target_url", "https://p.example/{}"), ("support.inquiries", "subject", "{}"),
    ("support.inquiries", "body", "body {} end"), ("support.call_recordings", "caller_number", "{}"),
    ("support.call_recordings", "transcript", "said {}"), ("events.participants", "name", "{}"),
    ("events.participants", "company", "{}"), ("events.participants", "email", "{}@e.example"),
    ("events.participants", "phone", "{}"), ("partners.contacts", "name", "{}"),
    ("partners.contacts", "email", "{}@c.example"), ("partners.contacts", "phone", "{}"),
    ("partners.delivery_recipients", "name", "{}"), ("partners.delivery_recipients", "email", "{}@d.example"),
    ("partners.delivery_recipients", "address", "{}"), ("prizes.winners", "legal_name", "{}"),
    ("prizes.winners", "tax_address", "{}"), ("telecom.subscriptions", "access_id", "{}"),
    ("telecom.communication_logs", "dns_query", "{}.dns.example"),
]
TEXT_RE = re.compile(r"zq(\d+)m(\d+)r(\d+)", re.IGNORECASE)
DIGITS_RE = re.compile(r"(?<![0-9A-Za-z.])\d{8,}(?![0-9A-Za-z]|\.\d)")  # not inside hex, not before a fraction
IP_RE = re.compile(r"10\.9[123]\.\d+\.\d+")
DATE_RE = re.compile(r"(?:1[89]\d\d|200[0-4])-\d\d-\d\d")
HEX_RE = re.compile(r"\\x((?:[0-9a-f]{2}){8,})", re.IGNORECASE)
MD5_RE = re.compile(r"[0-9a-f]{32}", re.IGNORECASE)
SAMPLE_SCHEMAS = ("service", "member", "billing", "credit", "browsing", "ads", "support", "events", "partners",
                  "prizes", "telecom")


# -- planting ------------------------------------------------------------------------------------------------

def plant(conn: psycopg.Connection) -> dict[int, str]:
    """Plant canaries in every personal text column (``zq<n>m<member>r<row>``), distinctive numbers, IPs and birth
    dates, renumbered keys and extra consent withdrawals; returns text column number -> ``schema.table.column``."""
    cur = conn.cursor()
    with conn.transaction():
        cur.execute("SET LOCAL session_replication_role = replica")  # no FK triggers while keys move
        for table, column in _columns(cur, "column_name = 'member_id' AND table_type = 'BASE TABLE'"):
            cur.execute(f"UPDATE {table} SET member_id = member_id + {MEMBER_BASE}")
        for offset, places in KEYS.values():
            for table, column in places:
                cur.execute(f"UPDATE {table} SET {column} = {column} + {offset}")
        columns = {}
        for n, (table, column, template) in enumerate(TEXT, start=10):
            member = f"coalesce(member_id - {MEMBER_BASE}, 0)" if _has(cur, table, "member_id") else "0"
            canary = f"'zq{n}m' || {member} || 'r' || row_number() OVER ()"
            prefix, _, suffix = template.partition("{}")
            cur.execute(f"UPDATE {table} x SET {column} = %s || n.v || %s FROM (SELECT ctid AS id, {canary} AS v "
                        f"FROM {table}) n WHERE x.ctid = n.id AND {column} IS NOT NULL", (prefix, suffix))
            columns[n] = f"{table}.{column}"
        cur.execute(f"UPDATE support.call_recordings SET audio = convert_to('zq9m' || (member_id - {MEMBER_BASE}) "
                    "|| 'r' || (recording_id - 8600000000), 'UTF8')")
        columns[9] = "support.call_recordings.audio"
        for table, column, value in NUMBERS:
            cur.execute(f"UPDATE {table} SET {column} = {value} WHERE {column} IS NOT NULL")
        for table, column, key, octet in IPS:
            cur.execute(f"UPDATE {table} SET {column} = ('10.{octet}.' || ({key} / 250) || '.' || ({key} % 250))::inet")
        # Before 2005 and never 1 January: the `year` mask gives 1 January.
        for table, column, key in DATES:
            cur.execute(f"UPDATE {table} SET {column} = make_date(1930 + ({key} % 70)::int, 2 + ({key} % 10)::int, "
                        f"2 + ({key} % 26)::int)")
        # Withdrawals under parents and children of the withdrawable purposes, and one withdrawn-then-granted.
        cur.execute("SELECT member_id FROM member.members ORDER BY member_id")
        members = [r[0] for r in cur.fetchall()]
        plan = [("marketing.ads", members[100:110]), ("marketing.personalized", members[110:118]),
                ("marketing.partner_campaigns", members[118:124]), ("marketing.ads.behavioural", members[124:130]),
                ("partner_referral", members[130:150]), ("marketing", members[150:155])]
        for purpose, who in plan:
            for m in who:
                cur.execute("INSERT INTO privacy.consents VALUES (%s, %s, 'withdrawn', now() - interval '10 days')",
                            (m, purpose))
        for m in members[150:152]:
            cur.execute("INSERT INTO privacy.consents VALUES (%s, 'marketing', 'granted', now() - interval '1 day')",
                        (m,))
    cur.execute("ANALYZE")
    return columns


def _columns(cur, where: str) -> list[tuple[str, str]]:
    cur.execute("SELECT c.table_schema || '.' || c.table_name, c.column_name FROM information_schema.columns c "
                "JOIN information_schema.tables t USING (table_schema, table_name) "
                f"WHERE c.table_schema = ANY(%s) AND {where} ORDER BY 1, c.ordinal_position", (list(SAMPLE_SCHEMAS),))
    return cur.fetchall()


def _has(cur, table: str, column: str) -> bool:
    return any(c == column for t, c in _columns(cur, f"c.table_schema || '.' || c.table_name = '{table}'"))


# -- the oracle ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Effect:
    """A purpose's effective decision on a column: deny > aggregate > mask > allow (allow: not personal)."""

    effect: str
    method: str | None = None

    def __str__(self) -> str:
        return f"{self.effect} {self.method}" if self.method else self.effect


@dataclass(frozen=True)
class Hit:
    column: str  # schema.table.column the value was planted in
    member: int  # the subject's original member id, 0 if unknown
    token: str  # what was found
    how: str  # raw | reversed | md5


@dataclass
class Oracle:
    """What each role and purpose may see, from the policy, and the raw values planted, from the database."""

    policy: object
    text_columns: dict[int, str]
    types: dict[tuple[str, str], str] = field(default_factory=dict)  # (table, column) -> data type
    numbers: dict[str, tuple[str, int]] = field(default_factory=dict)
    ips: dict[str, tuple[str, int]] = field(default_factory=dict)
    dates: dict[str, tuple[str, int]] = field(default_factory=dict)
    md5s: dict[str, tuple[str, int]] = field(default_factory=dict)
    samples: dict[tuple[str, str], str] = field(default_factory=dict)  # a raw value per planted column
    withdrawn: dict[str, set[int]] = field(default_factory=dict)  # purpose -> original member ids
    rows: dict[str, int] = field(default_factory=dict)  # subject table -> rows
    rows_visible: dict[tuple[str, str], int] = field(default_factory=dict)  # (table, purpose) -> rows consent shows

    @classmethod
    def load(cls, policy, conn: psycopg.Connection, text_columns: dict[int, str]) -> Oracle:
        o = cls(policy, text_columns)
        cur = conn.cursor()
        cur.execute("SELECT table_schema || '.' || table_name, column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = ANY(%s)", (list(SAMPLE_SCHEMAS),))
        o.types = {(t, c): ty for t, c, ty in cur.fetchall()}
        keyed = [(t, c) for _, places in KEYS.values() for t, c in places[:1]]
        for table, column in [("member.members", "member_id"), *keyed, *[(t, c) for t, c, _ in NUMBERS]]:
            cur.execute(f"SELECT {column}::text, {_member(table, o)} FROM {table} WHERE {column} IS NOT NULL")
            for value, member in cur.fetchall():
                o.numbers.setdefault(value, (f"{table}.{column}", member))
        for table, column, _, _ in IPS:
            cur.execute(f"SELECT host({column}), {_member(table, o)} FROM {table}")
            o.ips.update((val, (f"{table}.{column}", m)) for val, m in cur.fetchall())
        for table, column, _ in DATES:
            cur.execute(f"SELECT {column}::text, {_member(table, o)} FROM {table}")
            o.dates.update((val, (f"{table}.{column}", m)) for val, m in cur.fetchall())
        for name in [*text_columns.values(), *(f"{t}.{c}" for t, c, _ in NUMBERS)]:
            table, column = name.rsplit(".", 1)
            cur.execute(f"SELECT {column}::text, {_member(table, o)} FROM {table} WHERE {column} IS NOT NULL "
                        "ORDER BY 1")
            values = cur.fetchall()
            if values:
                o.samples[(table, column)] = values[0][0]
            for value, member in values:
                for form in {value, value.lower(), value.upper(), value[::-1]}:
                    o.md5s[hashlib.md5(form.encode()).hexdigest()] = (name, member)
        o.withdrawn = withdrawn_members(policy, cur)
        for table in o.subject_tables():
            for purpose in policy.purposes.purposes:
                ids = [MEMBER_BASE + m for m in o.withdrawn.get(purpose, ())] or [0]
                cur.execute(f"SELECT count(*) FROM {table} WHERE member_id IS NULL OR NOT member_id = ANY(%s)", (ids,))
                o.rows_visible[(table, purpose)] = cur.fetchone()[0]
        return o

    def decision(self, role: str, purpose: str, table: str, column: str) -> Effect:
        cats = self.policy.categories_of(Column(*table.split("."), column))
        if not cats:
            return Effect("allow")
        ds = [self.policy.decide(role, purpose, c, "read") for c in cats]
        if any(d.effect == v.DENY for d in ds):
            return Effect("deny")
        if any(d.effect == v.AGGREGATE for d in ds):
            return Effect("aggregate", f"k={max(d.k for d in ds if d.effect == v.AGGREGATE)}")
        masks = [str(d.method) for d in ds if d.effect == v.MASK]
        return Effect("mask", masks[0]) if masks else Effect("allow")

    def tables(self) -> list[str]:
        return sorted({t for t, _ in self.types})

    def subject_tables(self) -> list[str]:
        out = []
        for table in sorted({t for t, _ in self.types}):
            subject = self.policy.catalog.subject_of(Table(*table.split(".")))
            if subject is not None and str(subject).endswith(".member_id") and (table, "member_id") in self.types:
                out.append(table)
        return out

    def columns(self, table: str) -> list[str]:
        return [c for t, c in self.types if t == table]

    def hits(self, text: str) -> list[Hit]:
        """Every planted value in ``text``, also reversed or as the md5 of any case of it."""
        out = []
        # bytea in text form (\\x...) holds its bytes in hex
        decoded = [bytes.fromhex(m.group(1)).decode("latin-1") for m in HEX_RE.finditer(text)]
        for form, how in ((text, "raw"), (text[::-1], "reversed"), *((d, "hex") for d in decoded)):
            for m in TEXT_RE.finditer(form):
                name = self.text_columns.get(int(m.group(1)))
                if name:
                    out.append(Hit(name, int(m.group(2)), m.group(0), how))
        for m in DIGITS_RE.finditer(text):
            if m.group(0) in self.numbers:
                out.append(Hit(*self.numbers[m.group(0)], m.group(0), "raw"))
        for m in IP_RE.finditer(text):
            if m.group(0) in self.ips:
                out.append(Hit(*self.ips[m.group(0)], m.group(0), "raw"))
        for m in DATE_RE.finditer(text):
            if m.group(0) in self.dates:
                out.append(Hit(*self.dates[m.group(0)], m.group(0), "raw"))
        for m in MD5_RE.finditer(text):
            if m.group(0).lower() in self.md5s:
                out.append(Hit(*self.md5s[m.group(0).lower()], m.group(0), "md5"))
        return out

    def leaks(self, role: str, purpose: str, text: str, typed: str = "") -> list[tuple[Hit, str]]:
        """The hits ``purpose`` must not see: a column it may not read raw, or a member who withdrew from it.
        Values the client typed itself (``typed``) are not leaks wherever they are echoed."""
        out = []
        for hit in self.hits(text):
            if hit.token in typed:
                continue
            table, column = hit.column.rsplit(".", 1)
            effect = self.decision(role, purpose, table, column)
            if effect.effect != "allow":
                out.append((hit, f"{hit.column} ({effect} under {purpose}) came back {hit.how}"))
            elif hit.member and hit.member in self.withdrawn.get(purpose, ()):
                out.append((hit, f"member {hit.member} withdrew from {purpose}, yet their {hit.column} came back"))
        return out


def _member(table: str, oracle: Oracle) -> str:
    return f"coalesce(member_id - {MEMBER_BASE}, 0)" if (table, "member_id") in oracle.types else "0"


def withdrawn_members(policy, cur) -> dict[str, set[int]]:
    """Purpose -> original ids of members whose latest decision withdrew it, a parent or a child of it."""
    source = policy.catalog.consent
    cur.execute(f"SELECT DISTINCT ON ({source.subject}, {source.purpose}) {source.subject}, {source.purpose}, "
                f"{source.status} FROM {source.table.schema}.{source.table.name} "
                f"ORDER BY {source.subject}, {source.purpose}, {source.recorded_at} DESC")
    latest = cur.fetchall()
    out: dict[str, set[int]] = {}
    for purpose in policy.purposes.purposes:
        if policy.consent_mode(purpose) != "opt_out":
            continue
        out[purpose] = {m - MEMBER_BASE for m, q, status in latest if status in source.withdrawn
                        and (q == purpose or purpose.startswith(q + ".") or q.startswith(purpose + "."))}
    for further in source.further:  # rows that withdraw too (a guardian's revoked consent)
        for purpose in out:
            out[purpose] |= {m - MEMBER_BASE for m in further_withdrawn(further, purpose, cur)}
    return out


def further_withdrawn(further, purpose: str, cur) -> set[int]:
    """Ids of the subjects a further consent source withdraws from ``purpose``: a row (their latest one, with
    recorded_at) revoked, or whose scope is not the purpose or one above it."""
    cols = [further.subject, further.revoked or "NULL", further.status or "NULL", further.scope or "NULL",
            further.recorded_at or "NULL"]
    cur.execute(f"SELECT {', '.join(cols)} FROM {further.table.schema}.{further.table.name}")
    rows = cur.fetchall()
    newest: dict[int, object] = {}
    for subject, _, _, _, at in rows:
        if at is not None:
            newest[subject] = max(newest.get(subject, at), at)
    out = set()
    for subject, revoked, status, scope, at in rows:
        if further.recorded_at and at is not None and at < newest[subject]:
            continue
        covered = scope is not None and (purpose == scope or purpose.startswith(scope + "."))
        if (further.revoked and revoked is not None) or (further.status and status in further.withdrawn) or \
                (further.scope and not covered):
            out.add(subject)
    return out


# -- the statements ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Script:
    """Statements run in order on one connection; ``expect`` checks a statement's result columns:
    ``zqexpect_<n>`` (exactly n), ``zqmin<k>`` (each value k or more, or NULL); ``noerror``: only refusals may fail."""

    statements: tuple[str, ...]
    shared: bool = True  # may run on the pair's shared connection (it leaves no session state behind)
    noerror: bool = False


# Attacks on one masked or aggregate-only column {c} of table {t}; each pair runs a seeded sample of them.
COLUMN_SHAPES = [
    "SELECT t.{c} FROM {t} t",
    "SELECT upper(t.{c}::text), reverse(t.{c}::text), md5(t.{c}::text) FROM {t} t",
    "SELECT t.{c}::text FROM {t} t ORDER BY t.{c} LIMIT 5",
    "SELECT DISTINCT t.{c} FROM {t} t",
    "SELECT string_agg(t.{c}::text, ','), array_agg(t.{c})::text, min(t.{c}::text), max(t.{c}::text) FROM {t} t",
    "SELECT row_number() OVER (PARTITION BY t.{c} ORDER BY t.{c}), t.{c} FROM {t} t",
    "WITH w AS MATERIALIZED (SELECT t.{c} FROM {t} t) SELECT * FROM w",
    "SELECT t.{c} FROM {t} t UNION SELECT t.{c} FROM {t} t",
    "SELECT format('%s', t.{c}), to_json(t.{c})::text, (t.{c}, 1)::text FROM {t} t",
    "SELECT t.{c}::text::numeric FROM {t} t",
    "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY t.{c}) FROM {t} t",
    "SELECT * FROM (VALUES (1)) v(x) LEFT JOIN LATERAL (SELECT t.{c} FROM {t} t) l ON true",
    "SELECT xmlelement(name a, t.{c})::text, encode(convert_to(t.{c}::text, 'UTF8'), 'escape') FROM {t} t",
]
# Whole rows of a table {t} holding a protected column.
ROW_SHAPES = ["SELECT * FROM {t}", "SELECT t::text FROM {t} t", "SELECT row_to_json(t)::text FROM {t} t"]
# Rows of a subject table {t} under a withdrawable purpose: withdrawn members' rows must not come back.
CONSENT_SHAPES = [
    ["SELECT count(*) AS zqexpect_{n} FROM {t}"],
    ["SELECT count(*) AS zqexpect_{n} FROM (SELECT member_id FROM {t} UNION ALL SELECT NULL WHERE false) s"],
    ["SELECT * FROM {t}"],
    ["WITH RECURSIVE w AS (SELECT member_id FROM {t} UNION SELECT member_id FROM w) "
     "SELECT count(*) AS zqexpect_{n} FROM w RIGHT JOIN {t} USING (member_id)"],
    ["COPY (SELECT * FROM {t}) TO STDOUT"],
    ["BEGIN", "DECLARE zc CURSOR FOR SELECT * FROM {t}", "FETCH ALL FROM zc", "COMMIT"],
    ["PREPARE zq(bigint) AS SELECT * FROM {t} WHERE member_id = $1", "EXECUTE zq({w})", "DEALLOCATE zq"],
    ["SELECT m.member_id, t.* FROM member.members m LEFT JOIN {t} t USING (member_id)"],
]
# Aggregate-only: small groups and value aggregates (zqmin10: a group of fewer than 10 subjects came back).
AGGREGATE_SHAPES = [  # (table, the subject column it counts, statement): run where that column is aggregate-only
    ("billing.invoices", "member_id",
     "SELECT i.plan_id, count(DISTINCT i.member_id) AS zqmin10, sum(i.amount) FROM billing.invoices i GROUP BY 1"),
    ("billing.invoices", "member_id", "SELECT i.plan_id, count(DISTINCT i.member_id) AS zqmin10 "
     "FROM billing.invoices i GROUP BY ROLLUP (i.plan_id)"),
    ("member.members", "member_id", "SELECT m.postal_code, count(m.member_id) AS zqmin10 FROM member.members m GROUP BY 1"),
    ("member.members", "member_id", "SELECT m.birth_date, count(m.member_id) AS zqmin10 FROM member.members m GROUP BY 1"),
    ("billing.invoices", "member_id", "SELECT i.plan_id, array_agg(i.amount)::text FROM billing.invoices i GROUP BY 1"),
    ("billing.invoices", "member_id", "SELECT sum(i.amount) FROM billing.invoices i WHERE i.invoice_id = 5"),
    ("billing.invoices", "member_id", "SELECT i.plan_id, sum(i.amount) / count(DISTINCT i.member_id) "
     "FROM billing.invoices i GROUP BY 1 HAVING count(DISTINCT i.member_id) = 1"),
    ("telecom.access_sessions", "member_id", "SELECT count(DISTINCT s.member_id) AS zqmin10, sum(s.bytes_in) "
     "FROM telecom.access_sessions s GROUP BY s.session_id"),
    ("telecom.access_sessions", "member_id",
     "SELECT count(DISTINCT s.member_id) AS zqmin10, max(s.bytes_in) FROM telecom.access_sessions s"),
    ("browsing.page_views", "member_id",
     "SELECT v.url, count(DISTINCT v.member_id) AS zqmin10 FROM browsing.page_views v GROUP BY 1"),
]
# Session state around a protected column {c} of {t}: cursors, prepared statements, COPY, EXPLAIN, notifications.
SESSION_SHAPES = [
    ["BEGIN", "DECLARE c2 SCROLL CURSOR FOR SELECT t.{c} FROM {t} t", "FETCH LAST FROM c2", "MOVE BACKWARD ALL FROM c2",
     "FETCH 3 FROM c2", "COMMIT"],
    ["DECLARE c3 CURSOR WITH HOLD FOR SELECT * FROM {t}", "FETCH 3 FROM c3", "CLOSE c3"],
    ["BEGIN", "DECLARE c5 BINARY CURSOR FOR SELECT t.{c} FROM {t} t", "FETCH 3 FROM c5", "COMMIT"],
    ["PREPARE p5 AS SELECT t.{c} FROM {t} t", "EXECUTE p5", "EXPLAIN (VERBOSE, COSTS OFF) EXECUTE p5",
     "SELECT statement FROM pg_prepared_statements", "DEALLOCATE p5"],
    ["PREPARE p2(text) AS SELECT count(*) AS zqexpect_0 FROM {t} t WHERE t.{c}::text = $1", "EXECUTE p2({raw})",
     "DEALLOCATE p2"],
    ["COPY (SELECT t.{c} FROM {t} t) TO STDOUT WITH (FORMAT csv, HEADER)"],
    ["COPY {t} TO STDOUT"],
    ["COPY (SELECT * FROM {t}) TO STDOUT WITH (FORMAT binary)"],
    ["LISTEN {chan}", "SELECT pg_notify('{chan}', t.{c}::text) FROM {t} t LIMIT 2", "SELECT 1"],
    ["SELECT set_config('application_name', t.{c}::text, false) FROM {t} t LIMIT 1", "SHOW application_name"],
]
# Equality and error oracles on a known raw value {raw} of a masked column.
ORACLE_SHAPES = [
    (False, "SELECT count(*) AS zqexpect_0 FROM {t} t WHERE t.{c}::text = {raw} OR t.{c}::text IN ({raw})"),
    (True, "SELECT count(*) FROM {t} t WHERE 1 / (CASE WHEN t.{c}::text = {raw} THEN 0 ELSE 1 END) = 1"),
]
# Statements that carry a value out of the catalog, where every purpose reads it: a statistic over one row is the
# row's value (hunt 25). Run under purposes that may read {c} raw; purposes that may not must not receive it.
CARRIER_SHAPES = [
    "SELECT pg_notify('{chan}', (SELECT sum(x)::text FROM (SELECT t.{c}::numeric AS x FROM {t} t "
    "WHERE t.{c} IS NOT NULL ORDER BY 1 LIMIT 1) s))",
    "SELECT pg_notify('{chan}', (SELECT avg(x)::bigint::text FROM (SELECT t.{c}::numeric AS x FROM {t} t "
    "WHERE t.{c} IS NOT NULL ORDER BY 1 LIMIT 1) s))",
    "UPDATE service.plans SET name = (SELECT sum(x)::text FROM (SELECT t.{c}::numeric AS x FROM {t} t "
    "WHERE t.{c} IS NOT NULL ORDER BY 1 LIMIT 1) s) WHERE plan_id = (SELECT min(plan_id) FROM service.plans)",
]


def lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def pairs(policy) -> list[tuple[str, str]]:
    """Every (role, purpose) the policy lets a role declare."""
    roles = sorted(s for s in policy.subjects if s not in policy.groups)
    return [(role, purpose) for role in roles for purpose in policy.declarable_purposes(role)]


def corpus(oracle: Oracle, role: str, purpose: str, chan: str, size: int = 8) -> list[Script]:
    """A seeded sample of the statements that exercise what the policy does to ``purpose``: masks and aggregate-only
    columns, consent filters, refusals, cursors, COPY, notifications, prepared statements and carriers."""
    rnd = random.Random(f"{role}/{purpose}")
    protected, raw, denied = [], [], []
    for table in oracle.tables():
        for column in oracle.columns(table):
            effect = oracle.decision(role, purpose, table, column)
            if effect.effect in ("mask", "aggregate"):
                protected.append((table, column, effect))
            elif effect.effect == "deny" and (table, column) in oracle.samples:
                denied.append((table, column))
            elif effect.effect == "allow" and oracle.policy.categories_of(Column(*table.split("."), column)):
                raw.append((table, column))
    scripts: list[Script] = []
    fill = lambda sql, t, c="", **kw: sql.format(t=t, c=c, chan=chan, **kw)
    for table in sorted({t for t, _, _ in protected} | {t for t, _ in rnd.sample(denied, min(2, len(denied)))}):
        scripts.append(Script((fill(rnd.choice(ROW_SHAPES), table),)))
    for table, column, effect in rnd.sample(protected, min(size, len(protected))):
        for shape in rnd.sample(COLUMN_SHAPES, 3):
            scripts.append(Script((fill(shape, table, column),)))
        sample = oracle.samples.get((table, column))
        if sample is not None and effect.effect == "mask":
            noerror, shape = rnd.choice(ORACLE_SHAPES)
            scripts.append(Script((fill(shape, table, column, raw=lit(sample)),), noerror=noerror))
    for table, column, effect in rnd.sample(protected, min(2, len(protected))):
        sample = oracle.samples.get((table, column), "0")
        for shape in rnd.sample(SESSION_SHAPES, 3):
            scripts.append(Script(tuple(fill(s, table, column, raw=lit(sample)) for s in shape), shared=False))
    if purpose in oracle.withdrawn:
        withdrawn = sorted(oracle.withdrawn[purpose]) or [0]
        for table in rnd.sample(oracle.subject_tables(), 3):
            n = oracle.rows_visible[(table, purpose)]
            for shape in rnd.sample(CONSENT_SHAPES, 3):
                scripts.append(Script(tuple(fill(s, table, n=n, w=MEMBER_BASE + withdrawn[0]) for s in shape),
                                      shared=len(shape) == 1))
    scripts += [Script((sql,)) for table, column, sql in AGGREGATE_SHAPES
                if oracle.decision(role, purpose, table, column).effect == "aggregate"]
    carriers = [(t, c) for t, c in raw if f"{t}.{c}" in {n for n, _ in oracle.numbers.values()}]
    for table, column in rnd.sample(carriers, min(2, len(carriers))):
        for shape in CARRIER_SHAPES:
            scripts.append(Script((fill(shape, table, column),), shared=False))
    return scripts


def expectations(sql: str, columns: list[str], rows: list[tuple]) -> list[str]:
    """What a statement's result columns ask for and did not get."""
    problems = []
    for i, name in enumerate(columns):
        for row in rows:
            value = row[i] if i < len(row) else None
            if name.startswith("zqexpect_") and str(value) != name[len("zqexpect_"):]:
                problems.append(f"column {name} expected {name[len('zqexpect_'):]}, got {value}")
            elif name.startswith("zqmin") and value is not None and float(str(value)) < float(name[5:]):
                problems.append(f"column {name}: a group of {value} came back (fewer than {name[5:]})")
    return problems


# -- clients -------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """What a client received for one statement: ``parts`` is every text received, labelled by where it came."""

    ok: bool = True
    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    parts: list[tuple[str, str]] = field(default_factory=list)
    sqlstate: str | None = None


def _text(x) -> str:
    return bytes(x).decode("latin-1") if isinstance(x, (bytes, bytearray, memoryview)) else str(x)


def _rows(result: Result, columns: list[str], rows) -> None:
    result.columns = columns
    result.parts.append(("column names", ",".join(columns)))
    for i, row in enumerate(rows):
        result.rows.append(tuple(row))
        result.parts += [(f"row {i} column {name}", _text(x)) for name, x in zip(columns, row)]


class PsycopgClient:
    """psycopg through the proxy: ``simple`` (client-side binding, simple protocol, text) or ``binary``
    (extended protocol, binary results)."""

    def __init__(self, dsn: dict, purpose: str, binary: bool, chan: str | None = None):
        self.binary = binary
        self.notices: list[str] = []
        self.notifies: list[str] = []
        self.conn = psycopg.connect(**dsn, options=f"-c pii.purpose={purpose}", autocommit=True, connect_timeout=10,
                                    **({} if binary else {"cursor_factory": psycopg.ClientCursor}))
        self.conn.add_notice_handler(lambda d: self.notices.append(" | ".join(
            str(x) for x in (d.severity, d.message_primary, d.message_detail, d.message_hint, d.context) if x)))
        if chan:  # a witness: reads notifications with notifies() only (psycopg warns against mixing)
            self.conn.execute(f"LISTEN {chan}")
        else:
            self.conn.add_notify_handler(lambda n: self.notifies.append(n.payload))

    def run(self, sql: str) -> Result:
        out = Result()
        self.notices.clear()
        try:
            cur = self.conn.cursor(binary=True) if self.binary else self.conn.cursor()
            if re.match(r"\s*copy\b", sql, re.IGNORECASE):
                with cur.copy(sql) as copy:
                    out.parts += [("COPY data", _text(data)) for data in copy]
            else:
                cur.execute(sql)
                while True:
                    if cur.description:
                        _rows(out, [d.name for d in cur.description], cur.fetchall())
                    out.parts.append(("command tag", f"{cur.statusmessage} {cur.rowcount}"))
                    if not cur.nextset():
                        break
        except psycopg.Error as e:
            out.ok, out.sqlstate = False, e.sqlstate
            out.parts += _error_parts(e.diag, str(e))
            if self.conn.closed or self.conn.broken:
                raise
        out.parts += [("notice", n) for n in self.notices] + [("notification payload", n) for n in self.notifies]
        self.notifies.clear()
        return out

    def wait_for(self, sentinel: str, timeout: float = 30) -> list[str]:
        """The payloads received up to ``sentinel`` (sent after everything that may have notified)."""
        for n in self.conn.notifies(timeout=timeout):
            self.notifies.append(n.payload)
            if n.payload == sentinel:
                break
        assert sentinel in self.notifies, f"notification {sentinel} never arrived"
        i = self.notifies.index(sentinel)
        got, self.notifies = self.notifies[:i], self.notifies[i + 1:]
        return got

    def close(self) -> None:
        self.conn.close()


def _error_parts(diag, text: str) -> list[tuple[str, str]]:
    fields = ("sqlstate", "message_primary", "message_detail", "message_hint", "context", "internal_query",
              "schema_name", "table_name", "column_name", "datatype_name", "constraint_name")
    return [("error", text)] + [(f"error {f}", str(getattr(diag, f))) for f in fields if getattr(diag, f, None)]


class AsyncpgClient:
    """asyncpg through the proxy: every statement prepared (Parse/Describe/Bind/Execute), binary results."""

    def __init__(self, loop, dsn: dict, purpose: str, chan: str | None = None):
        import asyncpg

        self.loop, self.notices, self.notifies = loop, [], []
        self.conn = loop.run_until_complete(asyncpg.connect(
            host=dsn["host"], port=dsn["port"], user=dsn["user"], password=dsn["password"], database=dsn["dbname"],
            server_settings={"pii.purpose": purpose}, timeout=10))
        self.conn.add_log_listener(lambda c, m: self.notices.append(
            " | ".join(str(x) for x in (m.severity, m.message, m.detail, m.hint, m.context) if x)))
        if chan:
            loop.run_until_complete(self.conn.add_listener(chan, lambda c, pid, ch, p: self.notifies.append(p)))

    def run(self, sql: str) -> Result:
        return self.loop.run_until_complete(self._run(sql))

    async def _run(self, sql: str) -> Result:
        import asyncpg

        out = Result()
        self.notices.clear()
        try:
            if re.match(r"\s*(copy|begin|commit|rollback|listen|declare|close|move|prepare|deallocate)\b", sql, re.IGNORECASE):
                out.parts.append(("command tag", await self.conn.execute(sql)))  # not preparable, or COPY: no rows
            else:
                stmt = await self.conn.prepare(sql)
                _rows(out, [a.name for a in stmt.get_attributes()], [r.values() for r in await stmt.fetch()])
                out.parts.append(("command tag", stmt.get_statusmsg() or ""))
        except asyncpg.PostgresError as e:
            out.ok, out.sqlstate = False, e.sqlstate
            out.parts += [("error", str(e))] + [(f"error {k}", str(x)) for k, x in e.as_dict().items() if x]
        except asyncpg.InterfaceError as e:
            out.ok = False
            out.parts.append(("client error", str(e)))
        await asyncio.sleep(0)
        out.parts += [("notice", n) for n in self.notices]
        return out

    def wait_for(self, sentinel: str, timeout: float = 30) -> list[str]:
        async def wait():
            for _ in range(int(timeout / 0.005)):
                if sentinel in self.notifies:
                    return
                await asyncio.sleep(0.005)
        self.loop.run_until_complete(wait())
        assert sentinel in self.notifies, f"notification {sentinel} never arrived"
        i = self.notifies.index(sentinel)
        got, self.notifies = self.notifies[:i], self.notifies[i + 1:]
        return got

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())


# -- the hunt ------------------------------------------------------------------------------------------------

@dataclass
class Hunt:
    """Runs every pair's corpus in one client mode, scans what comes back, and collects failures as sentences."""

    oracle: Oracle
    dsn: dict  # host, port, dbname, password of the proxy
    admin: psycopg.Connection  # postgres, directly: sends sentinels, watches and restores service.plans
    mode: str
    chan: str
    statements: int = 0
    failures: list[str] = field(default_factory=list)

    def connect(self, role: str, purpose: str, listen: bool = False):
        dsn = {**self.dsn, "user": role}
        chan = self.chan if listen else None
        if self.mode == "asyncpg":
            return AsyncpgClient(self._loop, dsn, purpose, chan)
        return PsycopgClient(dsn, purpose, self.mode == "binary", chan)

    def run(self, size: int = 8) -> Hunt:
        self._loop = asyncio.new_event_loop()
        # One listener per purpose: a payload another purpose's statement sends must respect this one's rules.
        witnesses = {}
        for role, purpose in pairs(self.oracle.policy):
            if purpose not in witnesses:
                witnesses[purpose] = (role, self.connect(role, purpose, listen=True))
        plans = self.admin.execute("SELECT * FROM service.plans ORDER BY 1").fetchall()
        sentinels = 0
        try:
            for role, purpose in pairs(self.oracle.policy):
                shared = self.connect(role, purpose)
                for script in corpus(self.oracle, role, purpose, self.chan, size):
                    client = shared if script.shared else self.connect(role, purpose)
                    for sql in script.statements:
                        self.statements += 1
                        self.check(role, purpose, sql, client.run(sql), script.noerror)
                    if client is not shared:
                        client.close()
                    text = " ".join(script.statements)
                    if "notify" in text.lower():
                        sentinels += 1
                        sentinel = f"zz-sentinel-{sentinels}"
                        self.admin.execute("SELECT pg_notify(%s, %s)", (self.chan, sentinel))
                        for w_purpose, (w_role, witness) in witnesses.items():
                            for payload in witness.wait_for(sentinel):
                                self.scan(w_role, w_purpose, f"a notification sent by {role}/{purpose} running "
                                          f"{text!r}", "notification payload", payload, "")
                    if "service.plans" in text and self.admin.execute(
                            "SELECT * FROM service.plans ORDER BY 1").fetchall() != plans:
                        for w_purpose, (w_role, _) in witnesses.items():
                            reader = self.connect(w_role, w_purpose)
                            for where, part in reader.run("SELECT * FROM service.plans").parts:
                                self.scan(w_role, w_purpose, f"service.plans after {role}/{purpose} ran {text!r}",
                                          f"service.plans {where}", part, "")
                            reader.close()
                        self._restore_plans(plans)
                shared.close()
        finally:
            for _, witness in witnesses.values():
                witness.close()
            self._loop.close()
        return self

    def check(self, role: str, purpose: str, sql: str, result: Result, noerror: bool) -> None:
        for where, part in result.parts:
            self.scan(role, purpose, repr(sql), where, part, sql)
        for problem in expectations(sql, result.columns, result.rows):
            self.fail(role, purpose, repr(sql), problem)
        if noerror and not result.ok and result.sqlstate != "42501":
            detail = next((p for w, p in result.parts if w.startswith("error")), "")
            self.fail(role, purpose, repr(sql), f"failed with {result.sqlstate} ({detail[:120]}): an error that "
                      "depends on a raw value is an oracle")

    def scan(self, role: str, purpose: str, what: str, where: str, text: str, typed: str) -> None:
        for hit, why in self.oracle.leaks(role, purpose, text, typed):
            excerpt = text[max(0, text.find(hit.token) - 40):text.find(hit.token) + len(hit.token) + 40]
            self.fail(role, purpose, what, f"{why} in the {where}: ...{excerpt}...")

    def fail(self, role: str, purpose: str, what: str, problem: str) -> None:
        failure = f"[{self.mode}] {role} under {purpose}, {what}: {problem}"
        if failure not in self.failures:
            self.failures.append(failure)

    def _restore_plans(self, plans: list[tuple]) -> None:
        with self.admin.transaction():
            for row in plans:
                self.admin.execute("UPDATE service.plans SET name = %s WHERE plan_id = %s", (row[1], row[0]))
