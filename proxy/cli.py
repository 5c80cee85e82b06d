"""The purpose-proxy command line: parsing arguments and starting the chosen command."""

from __future__ import annotations

import argparse
import asyncio
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
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="metrics endpoint (default 127.0.0.1:9187)")
    p.add_argument("--max-client-connections", type=int, metavar="N", help="default 1000")
    p.add_argument("--max-message-size", type=int, metavar="BYTES", help="largest client message (default 256 MiB)")
    p.add_argument("--connect-timeout", type=float, metavar="SECONDS", help="upstream connect timeout (default 10)")
    p.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   help="how long SIGTERM waits for busy sessions (default 30)")
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
    p.add_argument("--policy-watch-interval", type=float, metavar="SECONDS",
                   help="how often policy files are checked for changes (default 2; 0 disables)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--log-format", choices=["text", "json"], help="default text")


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
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    return load(args.config, overrides=overrides)


def setup_logging(config: Config) -> None:
    from proxy.observability.logs import configure

    configure(config.log_level, config.log_format)


def serve(config: Config) -> int:
    try:
        import uvloop  # optional extra: purpose-proxy[fast]
    except ImportError:
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    return runner(_serve(config))


async def _serve(config: Config) -> int:
    from proxy.listener import ProxyServer

    log = logging.getLogger("proxy")
    server = ProxyServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_policy)
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
