"""The `fabrica` command line.

  fabrica serve <config|ingest|production|collector|alarm> [--port N]   run one service (a container)
  fabrica run                                                      the whole local stack, for trying it out
  fabrica plcsim                                                   the PLC simulator
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .runtime.logs import configure_logging
from .runtime.server import ServiceApp, ServiceHost, serve_until_signal
from .runtime.settings import Settings, SettingsError, load_settings

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
    run.add_argument("--data-dir", default=".fabrica", help="where the embedded Postgres and local state live")
    run.add_argument("--base-port", type=int, default=50051, help="config on this port, the others on the next ones")
    run.add_argument("--no-demo", action="store_true", help="do not create the demo plant, PLCs and order")

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
