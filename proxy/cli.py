"""The purpose-proxy command line: parsing arguments and starting the chosen command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from proxy import __version__
from proxy.config import FIELDS, Config, ConfigError, load
from proxy.policy.problems import PolicyError


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (or PURPOSE_PROXY_CONFIG)")
    p.add_argument("--listen", metavar="HOST:PORT", action="append",
                   help="address to listen on; repeat for several (default 127.0.0.1:6432)")
    p.add_argument("--upstream", metavar="HOST:PORT|DIR",
                   help="PostgreSQL server: HOST:PORT or a unix-socket directory (default 127.0.0.1:5432)")
    p.add_argument("--policies", metavar="DIR", help="policy directory (default policies)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT|off",
                   help="metrics and health endpoint (default 127.0.0.1:9187); off: no metrics")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes sharing the listen port(s) with SO_REUSEPORT, under a supervisor "
                        "(default 1: one process, no supervisor)")
    p.add_argument("--max-client-connections", type=int, metavar="N", help="default 1000")
    p.add_argument("--max-connections-per-role", type=int, metavar="N",
                   help="authenticated sessions per role; over it FATAL 53300 (default 0: no limit)")
    p.add_argument("--max-message-size", type=int, metavar="BYTES", help="largest client message (default 256 MiB)")
    p.add_argument("--max-statement-length", type=int, metavar="BYTES",
                   help="longest SQL text of a Query or Parse; longer ones get ERROR 54000 "
                        "(default 262144; 0: no limit)")
    p.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                   help="upstream connect timeout, up to the server's first answer (default 10)")
    p.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   help="how long SIGTERM waits for busy sessions (default 30)")
    p.add_argument("--auth-timeout", type=float, metavar="SECONDS",
                   help="time from connect to authenticated, then the connection is closed (default 60)")
    p.add_argument("--idle-session-timeout", type=float, metavar="SECONDS",
                   help="idle time outside a transaction block before FATAL 57P05 (default 0: off)")
    p.add_argument("--upstream-response-timeout", type=float, metavar="SECONDS",
                   help="PostgreSQL's silence on a waiting statement before the proxy cancels it, "
                        "and as long again before FATAL 08006 (default 0: off)")
    p.add_argument("--tls-cert", metavar="FILE", help="certificate for client TLS")
    p.add_argument("--tls-key", metavar="FILE", help="private key for client TLS")
    p.add_argument("--client-tls-required", action="store_const", const=True, default=None,
                   help="refuse clients that do not use TLS")
    p.add_argument("--upstream-tls", choices=["disable", "prefer", "require", "verify-full"],
                   help="TLS to PostgreSQL (default disable)")
    p.add_argument("--upstream-tls-ca", metavar="FILE", help="CA file for --upstream-tls verify-full")
    p.add_argument("--decider", metavar="purpose|MODULE:CALLABLE",
                   help="'purpose' (default: enforce the policy) or a decider factory; "
                        "proxy.enforcement.hook:allow_all relays everything")
    p.add_argument("--schema-dsn", metavar="DSN",
                   help="the proxy's own connection for reading schemas (required for purpose enforcement)")
    p.add_argument("--purpose-setting", metavar="NAME", help="the setting that declares the purpose (default pii.purpose)")
    p.add_argument("--schema-refresh-interval", type=float, metavar="SECONDS", help="default 300")
    p.add_argument("--catalog-watch-interval", type=float, metavar="SECONDS",
                   help="how often catalogs are checked for DDL run directly in PostgreSQL (default 2; 0 disables)")
    p.add_argument("--decision-cache-size", type=int, metavar="N",
                   help="decisions kept by statement text or shape (default 10000; 0: no cache)")
    p.add_argument("--decision-cache-bytes", type=int, metavar="BYTES",
                   help="memory the decision cache may hold, estimated (default 64 MiB)")
    p.add_argument("--policy-watch-interval", type=float, metavar="SECONDS",
                   help="how often policy files are checked for changes (default 2; 0 disables)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--log-format", choices=["text", "json", "logfmt"], help="default text")
    p.add_argument("--trace-exporter", choices=["none", "console", "otlp"], help="span exporter (default none)")
    p.add_argument("--otlp-endpoint", metavar="URL",
                   help="OTLP collector (http: http://host:4318, grpc: http://host:4317; default the exporter's)")
    p.add_argument("--otlp-protocol", choices=["http", "grpc"], help="OTLP transport (default http)")
    p.add_argument("--audit-sink", choices=["file", "stdout", "none"], help="where audit records go (default file)")
    p.add_argument("--audit-path", metavar="FILE", help="audit log file (default purpose-proxy-audit.jsonl)")
    p.add_argument("--audit-rotate-bytes", type=int, metavar="BYTES",
                   help="rotate the audit file at this size (default 100 MiB; 0: never)")
    p.add_argument("--audit-rotate-seconds", type=float, metavar="SECONDS",
                   help="rotate the audit file after this long (default 86400; 0: never)")
    p.add_argument("--audit-queue-size", type=int, metavar="N", help="audit records the writer may fall behind "
                                                                     "(default 10000)")
    p.add_argument("--audit-when-full", choices=["block", "fail"],
                   help="when the audit queue is full: block (wait, bounded) or fail (refuse statements); "
                        "default block")
    p.add_argument("--audit-block-timeout", type=float, metavar="SECONDS",
                   help="longest wait for the audit writer with --audit-when-full block (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="purpose-proxy",
        description="A PostgreSQL proxy that enforces purpose limitation on personal data.",
    )
    parser.add_argument("--version", action="version", version=f"purpose-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve = sub.add_parser("serve", help="run the proxy in front of a PostgreSQL server",
                           description="Run the proxy. Settings come from defaults, then --config, "
                                       "then PURPOSE_PROXY_* variables, then these flags.")
    _add_serve_flags(serve)

    ex = sub.add_parser("explain", help="show how a statement is decided for a role and purpose",
                        description="List every column the statement touches, how it is used, its categories, "
                                    "the decision per column with the rule that produced it, and the verdict.")
    ex.add_argument("sql", help="the SQL text")
    ex.add_argument("--role", required=True, help="the database role running the statement")
    ex.add_argument("--purpose", help="the declared purpose (omit for none)")
    ex.add_argument("--policies", default="policies", metavar="DIR", help="policy directory (default policies)")
    ex.add_argument("--dsn", help="resolve names against this live database (asyncpg DSN)")
    ex.add_argument("--schema", metavar="FILE", help="resolve names against this schema file (YAML/JSON)")
    ex.add_argument("--search-path", metavar="PATH", help='session search_path (default "$user", public)')
    ex.add_argument("--json", action="store_true", help="JSON output")

    ck = sub.add_parser("check", help="validate a policy directory and run its test cases",
                        description="Validate model, policy and catalog, then run the YAML test cases in "
                                    "DIR/tests. Exit status 1 on any problem (for CI).")
    ck.add_argument("directory", nargs="?", default="policies", help="policy directory (default policies)")
    ck.add_argument("--dsn", help="also compare the catalog with this live database")
    ck.add_argument("--schema", metavar="FILE", help="schema file for the test cases (default DIR/schema.yaml)")
    ck.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")

    au = sub.add_parser("audit", help="verify or query audit logs",
                        description="Verify the hash chain of audit log files, or list the records that match.")
    asub = au.add_subparsers(dest="audit_command", metavar="ACTION")
    asub.required = True
    av = asub.add_parser("verify", help="check the hash chain across audit files",
                         description="Check every record's hash and its link to the previous one across FILEs "
                                     "(rotated files included, taken in chain order). Exit 1 and name the "
                                     "first broken record (file:line) if the chain is broken.")
    av.add_argument("files", nargs="+", metavar="FILE")
    aq = asub.add_parser("query", help="list audit records matching filters (JSON lines)",
                         description="Print the records of FILEs that match every filter given, as JSON lines. "
                                     "--category and --purpose match the name and everything under it.")
    aq.add_argument("files", nargs="+", metavar="FILE")
    aq.add_argument("--category", help="records touching this category of personal data (or one under it)")
    aq.add_argument("--purpose", help="records under this purpose (or one under it)")
    aq.add_argument("--since", help="from this time on (ISO 8601, UTC unless an offset is given; or 30m, 2h, 7d ago)")
    aq.add_argument("--until", help="before this time (same forms as --since)")
    aq.add_argument("--type", action="append", dest="types", metavar="TYPE",
                    help="record type (statement, session_start, session_end, purpose_change, startup_refused, "
                         "policy_reload, ...); repeatable")
    aq.add_argument("--verdict", choices=["allow", "mask", "block"], help="statement verdict")
    aq.add_argument("--session", help="session id")
    aq.add_argument("--role", help="database role")
    aq.add_argument("--count", action="store_true", help="print only the number of matching records")

    inst = sub.add_parser("install", help="install the keyed pseudonym function (hash masking) in a database",
                          description="Create schema purpose_proxy with the function pseudonym(text) that the hash "
                                      "mask calls, and its key: generated inside PostgreSQL, kept in a table only "
                                      "the installing role can read, never in any statement text. Run it as the "
                                      "role that should own the key (not an application role). Idempotent: an "
                                      "existing key is kept unless --rotate-key is given.")
    inst.add_argument("--dsn", required=True, help="the database to install into (asyncpg DSN)")
    inst.add_argument("--rotate-key", action="store_true",
                      help="replace the key (every pseudonym changes)")
    inst.add_argument("--grant", action="append", metavar="ROLE",
                      help="roles that may run the function (repeatable; default every role)")

    demo = sub.add_parser("demo", help="run the proxy on a throwaway PostgreSQL with sample data and show decisions",
                          description="Start a throwaway PostgreSQL with the sample ISP / telecom database and fake "
                                      "data, put the enforcing proxy in front of it, and run the same statements "
                                      "as several roles under several purposes, printing each verdict, the rule "
                                      "behind it and a few rows. Everything is removed at the end.")
    demo.add_argument("--keep", action="store_true",
                      help="stay up afterwards and print psql connection strings (until Ctrl-C)")
    demo.add_argument("--policies", metavar="DIR", help="policy directory (default: the shipped sample policy)")
    demo.add_argument("--members", type=int, default=300, metavar="N", help="fake members to generate (default 300)")
    demo.add_argument("--seed", type=int, default=42, help="seed of the fake data (default 42)")
    return parser


def audit(args: argparse.Namespace) -> int:
    """``purpose-proxy audit verify|query``."""
    import json

    from proxy.observability import audit as audit_log

    if args.audit_command == "verify":
        result = audit_log.verify(args.files)
        print(result.describe())
        return 0 if result.ok else 1
    try:
        since = audit_log.parse_when(args.since) if args.since else None
        until = audit_log.parse_when(args.until) if args.until else None
    except ValueError as exc:
        print(f"purpose-proxy audit query: bad time: {exc}", file=sys.stderr)
        return 2
    count = 0
    try:
        for record in audit_log.query(args.files, category=args.category, purpose=args.purpose, since=since,
                                      until=until, types=args.types or (), verdict=args.verdict,
                                      session=args.session, role=args.role):
            count += 1
            if not args.count:
                print(json.dumps(record, ensure_ascii=False, sort_keys=True))
    except OSError as exc:
        print(f"purpose-proxy audit query: {exc}", file=sys.stderr)
        return 2
    if args.count:
        print(count)
    return 0


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    return load(args.config, overrides=overrides)


def setup_logging(config: Config) -> None:
    from proxy.observability.logs import configure

    configure(config.log_level, config.log_format)


def serve(config: Config, worker=None) -> int:
    """Run the proxy; with ``workers`` > 1 the supervisor (proxy.workers), which runs this in each worker."""
    if worker is None and config.workers > 1:
        from proxy.workers import supervise

        return supervise(config)
    try:
        import uvloop  # optional extra: purpose-proxy[fast]
    except ImportError:
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    return runner(_serve(config, worker))


def settle_heap() -> int:
    """Put what startup allocated out of the cyclic garbage collector's sight; returns how many objects.

    Modules, sqlglot's tables and the policy live as long as the process, yet every full
    collection walked them: 20-25 ms with the event loop (every session's) stopped, the p99
    of cold decisions (benchmarks/RESULTS.md, session 13). ``gc.freeze`` moves them to a
    generation no collection visits. A frozen object that later becomes cyclic garbage is
    never freed: only startup's objects are frozen, once, so that is at most one policy's
    worth after a reload.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def _serve(config: Config, worker=None) -> int:
    from proxy.listener import ProxyServer

    log = logging.getLogger("proxy")
    server = ProxyServer(config, peers=worker.peers if worker is not None else None)
    try:
        await server.start()
    except OSError as exc:
        print(f"purpose-proxy: cannot start: {exc}", file=sys.stderr)
        await server.shutdown(timeout=1)
        return 1
    settle_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    if worker is not None:
        worker.started(stop.set)  # tells the supervisor; stops (drains) if the supervisor goes away
    else:
        print(f"purpose-proxy listening on {', '.join(config.listen)}, upstream {config.upstream}", flush=True)
    await stop.wait()
    log.info("shutting down: waiting up to %.1fs for %d sessions", config.shutdown_timeout, len(server.sessions))
    await server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            config = config_from_args(args)
            setup_logging(config)
            return serve(config)
        if args.command in ("explain", "check"):
            from proxy import tools

            return getattr(tools, args.command)(args)
        if args.command == "install":
            from proxy.enforcement import pseudonym

            return pseudonym.run(args)
        if args.command == "demo":
            from proxy import demo

            return demo.run(args)
        if args.command == "audit":
            return audit(args)
    except ConfigError as exc:
        print(f"purpose-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except PolicyError as exc:
        print(f"purpose-proxy: invalid policy: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
