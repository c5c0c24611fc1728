"""The `fabrica` command line.

  fabrica serve <config|ingest|production|collector|alarm> [--port N]   run one service (a container)
  fabrica run                                                      the whole local stack, for trying it out
  fabrica token --role R --user U [--tenant T] [--data-dir D] [--ttl 8h]  a bearer token signed by `run`'s local key
  fabrica grpc-web [--port N]                                      the gRPC-Web gateway and web UI alone
  fabrica plcsim                                                   the PLC simulator
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from .runtime.logs import configure_logging
from .runtime.server import ServiceApp, ServiceHost, serve_until_signal
from .runtime.settings import Settings, SettingsError, load_settings, token_audience, token_issuer

log = logging.getLogger("fabrica")

#: Each service's app module. Its ``create_app(settings, **app_args) -> ServiceApp`` builds the service; the
#: module is imported only when that service is built, so `fabrica plcsim` and `fabrica serve X` load no other.
SERVICES = {
    "config": "fabrica_svc.config.app",
    "ingest": "fabrica_svc.ingest.app",
    "production": "fabrica_svc.production.app",
    "collector": "fabrica_svc.collector.app",
    "alarm": "fabrica_svc.alarm.app",
}


def create_app(service: str, settings: Settings, **app_args: Any) -> ServiceApp:
    """`service`'s app, built by its module's ``create_app`` (`app_args` as that function takes them)."""
    return importlib.import_module(SERVICES[service]).create_app(settings, **app_args)


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.service).with_overrides(sole_service=True)
    if args.port is not None:
        settings = settings.with_overrides(port=args.port)
    if args.host is not None:
        settings = settings.with_overrides(host=args.host)
    configure_logging(args.service, settings.log_level, settings.log_format)
    host = ServiceHost(create_app(args.service, settings), settings)
    asyncio.run(serve_until_signal([host]))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .stack import run_stack

    return asyncio.run(run_stack(args))


def _token(args: argparse.Namespace) -> int:
    """Mint a token with the local key of the data folder (made on first use, as `fabrica run` does); the
    token alone on the last line, so ``TOKEN=$(fabrica token ... | tail -1)`` works."""
    from .runtime.auth import ensure_local_key, mint_token

    data_dir = Path(args.data_dir or os.environ.get("FABRICA_DATA_DIR") or ".fabrica")
    ttl = _duration(args.ttl)
    # The issuer and audience the services check (FABRICA_JWT_*); nothing else of a service's settings
    # (no certificate, no port) matters to minting a token.
    issuer, audience = token_issuer(os.environ), token_audience(os.environ)
    key = ensure_local_key(data_dir)
    roles = sorted({r.strip() for r in args.role.split(",") if r.strip()})
    kw: dict[str, Any] = {"collector_id": args.collector_id} if args.collector_id else {}
    if args.tenant:
        kw["tenant"] = args.tenant
    try:
        token = mint_token(key, subject=args.user, roles=roles, ttl_seconds=ttl, issuer=issuer,
                           audience=audience, **kw)
    except ValueError as exc:
        print(f"fabrica token: {exc}", file=sys.stderr)
        return 2
    tenant = "every tenant" if args.tenant == "*" else f"tenant {args.tenant or 'default'}"
    print(f"# {args.user}: {', '.join(roles)} of {tenant}, valid {args.ttl}, signed by {key.private_key_file}",
          file=sys.stderr)
    print(token)
    return 0


def _duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``8h`` or ``7d`` in seconds; SettingsError otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise SettingsError(f"--ttl {text!r} is not a duration such as 90s, 30m, 8h or 7d") from None
    if not 0 < value <= 366 * 86400:
        raise SettingsError(f"--ttl {text!r} must be more than 0 and at most 366d")
    return value


def _grpc_web(args: argparse.Namespace) -> int:
    from .grpcweb.app import load_gateway_settings, serve_gateway

    settings = load_gateway_settings()
    base = settings.base
    if args.port is not None:
        base = base.with_overrides(port=args.port)
    if args.host is not None:
        base = base.with_overrides(host=args.host)
    configure_logging("grpc-web", base.log_level, base.log_format)
    asyncio.run(serve_gateway(settings.with_overrides(base=base)))
    return 0


def _plcsim(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .plcsim.cli import main as plcsim_main

    return plcsim_main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fabrica", description="Fabrica: shop-floor PLC data to production records.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run one service; settings come from environment variables")
    serve.add_argument("service", choices=sorted(SERVICES), help="the service to run")
    serve.add_argument("--port", type=int, help="gRPC port (overrides FABRICA_PORT)")
    serve.add_argument("--host", help="address to bind (overrides FABRICA_HOST)")

    run = sub.add_parser("run", help="run the whole local stack with an embedded Postgres")
    run.add_argument("--data-dir", default=None,
                     help="where the embedded Postgres and local state live (FABRICA_DATA_DIR, else .fabrica)")
    run.add_argument("--base-port", type=int, default=50051, help="config on this port, the others on the next ones")
    run.add_argument("--no-demo", action="store_true", help="do not create the demo plant, PLCs and order")
    run.add_argument("--web-port", type=int, default=8080,
                     help="the web UI and gRPC-Web gateway's HTTP port (0: any free port)")

    web = sub.add_parser("grpc-web", help="the gRPC-Web gateway and web UI; upstreams and CORS origins come "
                                          "from environment variables (fabrica_svc/grpcweb/app.py)")
    web.add_argument("--port", type=int, help="HTTP port (overrides FABRICA_PORT; default 8080)")
    web.add_argument("--host", help="address to bind (overrides FABRICA_HOST)")

    token = sub.add_parser("token", help="mint a bearer token with the local signing key of `fabrica run`")
    token.add_argument("--role", required=True,
                       help="viewer, operator, engineer, admin or collector (several: comma-separated)")
    token.add_argument("--user", required=True, help="who the token names (its sub)")
    token.add_argument("--data-dir", default=None, help="the folder of `fabrica run` (FABRICA_DATA_DIR, else .fabrica)")
    token.add_argument("--ttl", default="8h", help="how long the token is valid: 90s, 30m, 8h, 7d (default 8h)")
    token.add_argument("--collector-id", default="", help="for a collector's token: the collector it proves")
    token.add_argument("--tenant", default="",
                       help="the tenant the token belongs to (default: the tenant 'default'); '*' for an admin of "
                            "the whole installation, who names the tenant per call (header x-fabrica-tenant)")

    sub.add_parser("plcsim", help="the PLC simulator (Modbus TCP, Modbus RTU over TCP, S7); --help for options",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "plcsim":
        return _plcsim(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "run":
            return _run(args)
        if args.command == "token":
            return _token(args)
        if args.command == "grpc-web":
            return _grpc_web(args)
    except SettingsError as exc:
        print(f"fabrica: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # cannot bind, database unreachable: say so in one line
        print(f"fabrica: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
