"""The ``purpose-proxy demo`` command: a throwaway PostgreSQL with the sample ISP database, the enforcing proxy in front of it, and the same statements run under several roles and purposes.

What it does, in order: find PostgreSQL server binaries (the system's, else the
``pgserver`` package's embedded ones, else fail saying what to install); start a
throwaway cluster (``proxy.devtools.cluster.Cluster``); create the policy's roles
and the database ``isp`` with the sample schema and generated fake data
(``proxy.devtools.sample``); start the real proxy as a subprocess
(``ProxyProcess`` with ``--decider purpose``, the shipped policies and
``--schema-dsn``); then connect through the proxy with asyncpg as each role, under
each purpose, and print the verdict (allowed, masked, aggregate-only,
consent-filtered or blocked), the policy rule behind it and a few rows, as the
proxy gave them. With ``--keep`` everything stays up and psql connection strings are printed
until Ctrl-C. Cluster and proxy are always cleaned up, on errors and Ctrl-C too.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from proxy.devtools.cluster import Cluster, find_pg_bin, free_port

DATABASE = "isp"
PASSWORD = "demo"  # every demo role's password: the cluster lives only as long as the demo
READER = "proxy_reader"  # the proxy's own role for reading schemas
WIDTH = 100
INSTALL_HINT = ("install the PostgreSQL server binaries (Debian/Ubuntu: apt-get install postgresql; "
                "Fedora: dnf install postgresql-server; macOS: brew install postgresql), set PG_BIN to the "
                "directory holding initdb and pg_ctl, or pip install pgserver for an embedded PostgreSQL")


class DemoError(RuntimeError):
    """The demo cannot run; the message says why and what to do."""


# -- the walk-through ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One statement run as ``role`` under ``purpose`` (None: no purpose declared)."""

    title: str
    role: str
    purpose: str | None
    sql: str
    promise: str  # what the notices promise, in one line


OVERDUE = ("SELECT m.member_number, m.family_name, m.email, i.billing_month, i.amount FROM member.members m "
           "JOIN billing.invoices i ON i.member_id = m.member_id WHERE i.status = 'overdue' "
           "ORDER BY i.billing_month DESC, m.member_id LIMIT 3")
CARDS = ("SELECT m.family_name, p.card_brand, p.card_number, p.card_expiry FROM member.members m "
         "JOIN billing.payment_methods p ON p.member_id = m.member_id WHERE p.kind = 'card' "
         "ORDER BY m.member_id LIMIT 3")
BIRTHDAYS = "SELECT family_name, given_name, birth_date FROM member.members ORDER BY member_id LIMIT 3"
BROWSING = ("SELECT family_name, email, url, viewed_at FROM browsing.member_page_views "
            "ORDER BY viewed_at DESC LIMIT 3")
ADS = "SELECT cookie_id, url, os, platform FROM browsing.page_views ORDER BY viewed_at DESC LIMIT 3"
OS_STATS = "SELECT os, count(DISTINCT member_id) AS members FROM browsing.page_views GROUP BY os ORDER BY os"
CALLS = ("SELECT recording_id, started_at, duration_seconds, left(transcript, 40) AS transcript "
         "FROM support.call_recordings ORDER BY started_at DESC LIMIT 3")
PRIZES = ("SELECT legal_name, individual_number, prize_value, withholding_tax FROM prizes.winners "
          "ORDER BY prize_value DESC LIMIT 3")
NONPAYERS = ("SELECT carrier_code, direction, family_name, unpaid_amount FROM credit.nonpayer_exchange "
             "ORDER BY exchange_id LIMIT 3")
EMAILS = "SELECT email FROM member.members ORDER BY member_id LIMIT 3"
PLANS = "SELECT name, kind, monthly_fee FROM service.plans ORDER BY plan_id LIMIT 3"
MAILING = "SELECT count(*) AS recipients FROM member.members WHERE status = 'active'"

STEPS = [
    Step("Billing reads overdue invoices", "app_billing", "billing", OVERDUE,
         "000 type (1) / 004 purpose 1: billing (料金等の請求)"),
    Step("The same invoices for marketing", "app_marketing", "marketing.announcements", OVERDUE,
         "payment and credit data are never used for marketing"),
    Step("The same invoices for research", "analyst", "research", OVERDUE,
         "research is pseudonymised: never names or e-mail addresses"),
    Step("Billing reads card numbers", "app_billing", "billing", CARDS,
         "billing uses the payment data it needs"),
    Step("Support looks at a member's card", "app_support", "support", CARDS,
         "support sees the last four card digits only"),
    Step("Support looks at birth dates", "app_support", "support", BIRTHDAYS,
         "support sees the year of birth only"),
    Step("Announcements look at birth dates", "app_marketing", "marketing.announcements", BIRTHDAYS,
         "announcements may target by year of birth, never the day"),
    Step("Recipients of an announcement", "app_marketing", "marketing.announcements", MAILING,
         "members who asked to stop (利用停止) receive no announcements: their rows are filtered out"),
    Step("The same count for billing", "app_billing", "billing", MAILING,
         "a stop-of-use request does not stop billing under the contract"),
    Step("Pages visited, with the member's name, for personalised information", "app_marketing",
         "marketing.personalized", BROWSING,
         "000 part B: browsing information combined with identity for better-targeted information"),
    Step("The same for behavioural ads", "app_marketing", "marketing.ads.behavioural", BROWSING,
         "000 part B: behavioural ads only in a form that does not identify the person"),
    Step("Behavioural ads without identity", "app_marketing", "marketing.ads.behavioural", ADS,
         "pages and platforms, keyed by a hashed cookie ID"),
    Step("The same pages for support", "app_support", "support", BROWSING,
         "browsing information is used only for the purposes of part B"),
    Step("Members per operating system (the analyst's default purpose)", "analyst", None, OS_STATS,
         "000 part B: statistics; identifiers only counted, groups under 10 suppressed"),
    Step("Recorded calls for operator training", "trainer", "operator_training", CALLS,
         "000 type (5): recordings for operator training"),
    Step("Recorded calls for marketing", "app_marketing", "marketing.announcements", CALLS,
         "recordings serve support quality and training only"),
    Step("Prize tax data for prize tax processing", "accounting", "prize_tax", PRIZES,
         "000 type (1): 賞金等の税務処理"),
    Step("Prize tax data for marketing", "app_marketing", "marketing.announcements", PRIZES,
         "prize tax data only for prize tax processing"),
    Step("Non-payer records for credit management", "app_billing", "credit_management", NONPAYERS,
         "non-payer information only for the exchange between carriers"),
    Step("Non-payer records for the exchange (the gateway's default purpose)", "app_exchange", None, NONPAYERS,
         "000 type (1): 不払者情報の交換"),
    Step("Personal data without a declared purpose", "app_marketing", None, EMAILS,
         "no purpose, no personal data"),
    Step("Service plans without a declared purpose", "app_marketing", None, PLANS,
         "data that is not personal needs no purpose"),
]


@dataclass
class Outcome:
    """What happened to one step, and what the policy asked for."""

    step: Step
    verdict: str  # allowed | masked | aggregate-only | consent-filtered | blocked
    purpose_shown: str
    rules: list[str] = field(default_factory=list)
    message: str = ""
    detail: str = ""
    note: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    row_count: int = 0


# -- PostgreSQL ------------------------------------------------------------------------------------

def locate_postgres(find: Callable[[], Path | None] | None = None) -> tuple[Path, str]:
    """The directory with initdb and pg_ctl, and where it came from; ``DemoError`` if there is none.

    The system's binaries (or ``PG_BIN``) first, then the embedded PostgreSQL of the
    ``pgserver`` package if it is installed.
    """
    found = (find or find_pg_bin)()
    if found is not None:
        return found, f"PostgreSQL binaries in {found}"
    try:
        with warnings.catch_warnings():  # it warns about runtime directories on import
            warnings.simplefilter("ignore")
            import pgserver  # type: ignore[import-not-found]
    except ImportError:
        raise DemoError(f"no PostgreSQL server binaries found: {INSTALL_HINT}") from None
    embedded = Path(pgserver.__file__).resolve().parent / "pginstall" / "bin"
    if not (embedded / "initdb").exists():
        raise DemoError(f"the pgserver package has no initdb in {embedded}; {INSTALL_HINT}")
    return embedded, f"embedded PostgreSQL of the pgserver package ({embedded})"


def check_can_run_postgres() -> None:
    """PostgreSQL refuses to run as root; as root the cluster runs as the ``postgres`` user, which must exist."""
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise DemoError("running as root, but there is no 'postgres' user to run PostgreSQL as (PostgreSQL "
                        "refuses to run as root): run the demo as an ordinary user, or create the user "
                        "(the postgresql package does)") from None


async def setup_database(cluster: Cluster, roles: list[str], members: int, seed: int) -> dict[str, int]:
    """Create the roles and database ``isp`` with the sample schema and fake data; rows per table."""
    import asyncpg

    from proxy.devtools.sample import data

    admin = await asyncpg.connect(host=cluster.host, port=cluster.port, user="postgres", database="postgres")
    try:
        for role in [READER, *roles]:
            await admin.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD \'{PASSWORD}\'')
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(host=cluster.host, port=cluster.port, user="postgres", database=DATABASE)
    try:
        counts = await data.load(conn, data.generate(seed=seed, members=members))
        schemas = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                                   "AND nspname NOT IN ('information_schema', 'public')")
        # The database grants the demo roles everything; the proxy is what limits them to their purposes.
        grantees = ", ".join(f'"{r}"' for r in roles)
        for row in schemas:
            schema = row["nspname"]
            await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {grantees}")
            await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {grantees}")
            await conn.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {grantees}")
            if "admin" in roles:
                await conn.execute(f'GRANT CREATE ON SCHEMA {schema} TO "admin"')
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    # The keyed pseudonym behind the `hash` mask lives in the database, as
    # `purpose-proxy install` puts it there.
    from proxy.enforcement.pseudonym import install

    await install(f"postgresql://postgres@{cluster.host}:{cluster.port}/{DATABASE}", grant=tuple(roles))
    return counts


# -- running the steps -----------------------------------------------------------------------------

def explain_step(step: Step, policy: Any, state: Any) -> Any:
    """What the policy asks for this step (the ``explain`` machinery): (decision, explanation)."""
    from proxy.analysis.access import analyze
    from proxy.enforcement.rewrite import make_rewrite
    from proxy.policy.verdict import decide_statement

    search_path = state.default_search_path(step.role, DATABASE)
    analysis = analyze(step.sql, state.schema, search_path, step.role)
    rewrite = make_rewrite(policy, state.schema, search_path, step.role)
    return decide_statement(analysis, role=step.role, purpose=step.purpose, policy=policy, rewrite=rewrite)


def deciding_rules(expl: Any, limit: int = 4) -> list[str]:
    """The policy lines behind an explanation: masks and aggregates first, then what allowed the columns."""
    seen: list[str] = []
    for req in expl.requirements:
        seen += [r for r in req.rules if r not in seen]
    for col in expl.columns:
        for d in col.decisions:
            seen += [r for r in d.decision.rules if r not in seen]
    if not seen:
        for _, d in expl.checks:
            seen += [r for r in d.rules if r not in seen]
    return seen[:limit] + ([f"... and {len(seen) - limit} more"] if len(seen) > limit else [])


async def run_step(step: Step, host: str, port: int, policy: Any, state: Any) -> Outcome:
    """Connect through the proxy as the step's role and purpose, run the SQL, and classify what came back."""
    import asyncpg

    settings = {"application_name": "purpose-proxy-demo"}
    if step.purpose:
        settings["options"] = f"-c pii.purpose={step.purpose}"
    _, expl = explain_step(step, policy, state)
    purpose_shown = (f"{step.purpose} (declared at connect time)" if step.purpose
                     else f"{expl.purpose} (the role's default; none declared)" if expl.purpose
                     else "none declared")
    out = Outcome(step, "blocked", purpose_shown)
    try:
        conn = await asyncpg.connect(host=host, port=port, user=step.role, password=PASSWORD, database=DATABASE,
                                     server_settings=settings, timeout=15)
    except asyncpg.PostgresError as exc:
        out.message, out.detail = str(exc), getattr(exc, "detail", None) or ""
        out.note = "refused at connect time"
        return out
    try:
        records = await asyncio.wait_for(conn.fetch(step.sql), 30)
    except asyncpg.PostgresError as exc:
        out.message = exc.args[0] if exc.args else str(exc)
        out.detail = getattr(exc, "detail", None) or ""
        hint = getattr(exc, "hint", None) or ""
        if hint:
            out.note = hint
        out.rules = [line for line in out.detail.splitlines() if line.strip()]  # the error's DETAIL
        return out
    finally:
        await conn.close()
    out.row_count = len(records)
    out.columns = list(records[0].keys()) if records else []
    out.rows = [tuple(r.values()) for r in records[:3]]
    out.rules = deciding_rules(expl)
    reason = (expl.reason or "").lower()
    if "consent" in reason:
        out.verdict = "consent-filtered"
    elif expl.aggregates:
        out.verdict = "aggregate-only"
        out.note = "groups smaller than k are suppressed: " + ", ".join(f"{r.column} {r.label}" for r in expl.aggregates)
    elif expl.requirements:
        out.verdict = "masked"
        out.note = ", ".join(f"{r.column} {r.label}" for r in expl.requirements)
    else:
        out.verdict = "allowed"
        if expl.reason == "no personal data":
            out.note = "no personal data: no purpose needed"
    return out


# -- printing ------------------------------------------------------------------------------------------

def cell(value: Any, width: int = 34) -> str:
    """One value as the demo prints it: short, one line, bytes as their length.

    >>> cell(b"RIFF..."), cell("a\\nb"), cell("x" * 40, 10)
    ('<7 bytes>', 'a b', 'xxxxxxxxx…')
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = f"<{len(bytes(value))} bytes>"
    elif value is None:
        text = "NULL"
    else:
        text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render(n: int, out: Outcome) -> str:
    step = out.step
    lines = [f"── {n}. {step.title} " + "─" * max(3, WIDTH - len(step.title) - 6 - len(str(n)))]
    lines.append(f"   promise  {step.promise}")
    lines.append(f"   role     {step.role}")
    lines.append(f"   purpose  {out.purpose_shown}")
    sql = textwrap.wrap(step.sql, WIDTH - 12)
    lines.append(f"   SQL      {sql[0]}")
    lines += [f"            {s}" for s in sql[1:]]
    verdict = out.verdict.upper()
    lines.append(f"   verdict  {verdict}")
    if out.message:
        lines.append(f"   error    {out.message}")
    for i, rule in enumerate(out.rules):
        lines.append(f"   {('detail' if out.verdict == 'blocked' else 'rule') if i == 0 else '':8} {rule}")
    if out.note:
        for i, part in enumerate(textwrap.wrap(out.note, WIDTH - 12)):
            lines.append(f"   {'note' if i == 0 else '':8} {part}")
    if out.verdict != "blocked":
        lines.append(f"   rows     {out.row_count} row(s)" + (", first 3:" if out.row_count > 3 else ":"))
        if out.columns:
            lines.append("            " + " | ".join(out.columns))
        for row in out.rows:
            lines.append("            " + " | ".join(cell(v) for v in row))
    return "\n".join(lines)


def connection_strings(host: str, port: int) -> list[str]:
    examples = [("app_billing", "billing"), ("app_support", "support"), ("app_marketing", "marketing.personalized"),
                ("app_marketing", "marketing.ads.behavioural"), ("trainer", "operator_training"),
                ("accounting", "prize_tax"), ("analyst", None), ("admin", None)]
    out = []
    for role, purpose in examples:
        opts = f" options='-c pii.purpose={purpose}'" if purpose else ""
        out.append(f'psql "host={host} port={port} user={role} password={PASSWORD} dbname={DATABASE}{opts}"')
    return out


# -- the command -----------------------------------------------------------------------------------------

def _raise_interrupt(signum, frame):  # SIGTERM ends the demo like Ctrl-C
    raise KeyboardInterrupt


def run(args) -> int:
    """``purpose-proxy demo``: returns the exit status."""
    from proxy.devtools.process import ProxyProcess
    from proxy.devtools.sample import policies_dir

    started = time.monotonic()
    policies = Path(args.policies) if args.policies else policies_dir()
    cluster: Cluster | None = None
    proxy: ProxyProcess | None = None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    say = lambda text="": print(text, flush=True)  # noqa: E731
    try:
        bin_dir, source = locate_postgres()
        check_can_run_postgres()
        from proxy.policy.engine import Policy

        policy = Policy.load(policies)
        roles = sorted(s for s in policy.subjects if s not in policy.groups)
        say(f"purpose-proxy demo: policy {policy.version} from {policies}")
        say(f"  ({len(policy.purposes.purposes)} purposes, {len(policy.catalog.categories)} categories, "
            f"{len(policy.ruleset.rules)} rules; roles: {', '.join(roles)})")
        say(f"starting a throwaway PostgreSQL ({source})")
        cluster = Cluster(users=[], bin_dir=bin_dir)
        say(f"  data directory {cluster.base_dir}")
        cluster.start()
        counts = asyncio.run(setup_database(cluster, roles, args.members, args.seed))
        say(f"  database {DATABASE}: sample ISP / telecom schema, {sum(counts.values())} fake rows in "
            f"{len(counts)} tables ({counts.get('member.members', 0)} members)")
        reader = f"postgresql://{READER}:{PASSWORD}@{cluster.host}:{cluster.port}/postgres"
        proxy = ProxyProcess(cluster.address, "--decider", "purpose", "--policies", str(policies),
                             "--schema-dsn", reader, "--metrics-listen", f"127.0.0.1:{free_port()}",
                             "--policy-watch-interval", "0", "--log-level", "warning")
        proxy.start(timeout=120)
        say(f"purpose-proxy listening on {proxy.address}, in front of PostgreSQL on {cluster.address}")
        say()
        outcomes = asyncio.run(_walk(proxy.host, proxy.port, reader, policy))
        for n, out in enumerate(outcomes, 1):
            say(render(n, out))
            say()
        tally: dict[str, int] = {}
        for out in outcomes:
            tally[out.verdict] = tally.get(out.verdict, 0) + 1
        say(f"summary of {len(outcomes)} statements: "
            + ", ".join(f"{count} {verdict}" for verdict, count in sorted(tally.items())))
        say(f"demo finished in {time.monotonic() - started:.1f}s")
        if args.keep:
            say()
            say("The proxy stays up. Try it by hand (SET pii.purpose = '...' changes the purpose):")
            for line in connection_strings(proxy.host, proxy.port):
                say("  " + line)
            say(f"PostgreSQL directly (no proxy): psql \"host={cluster.host} port={cluster.port} user=postgres "
                f"dbname={DATABASE}\"")
            if getattr(proxy, "audit_path", None) is not None:
                say(f"The proxy's audit log (removed at the end): {proxy.audit_path}")
            say("Press Ctrl-C to stop and clean up.")
            while True:
                if proxy.proc is not None and proxy.proc.poll() is not None:
                    say(f"the proxy exited with status {proxy.proc.returncode}")
                    return 1
                time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", flush=True)
        return 0 if args.keep else 130
    except DemoError as exc:
        print(f"purpose-proxy demo: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        print(f"purpose-proxy demo failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if proxy is not None:
            print("proxy log:\n" + proxy.log()[-4000:], file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        try:
            _cleanup(proxy, cluster)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


def _cleanup(proxy, cluster: Cluster | None) -> None:
    if proxy is not None:
        try:
            proxy.stop()
        finally:
            leftovers = [proxy.log_path]
            audit = getattr(proxy, "audit_path", None)  # the audit log ProxyProcess may have the proxy write
            if audit is not None:
                leftovers += [audit, *audit.parent.glob(audit.name + ".*")]
            for path in leftovers:
                try:
                    path.unlink()
                except OSError:
                    pass
    if cluster is not None:
        cluster.cleanup()
        print(f"cleaned up: proxy stopped, PostgreSQL stopped and {cluster.base_dir} removed", flush=True)


async def _walk(host: str, port: int, reader: str, policy: Any) -> list[Outcome]:
    from proxy.enforcement.runtime import load_database_state

    state = await load_database_state(reader, DATABASE, 10.0)
    return [await run_step(step, host, port, policy, state) for step in STEPS]
