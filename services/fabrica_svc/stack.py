"""`fabrica run`: the whole local stack in one process, for trying Fabrica out.

An embedded Postgres in --data-dir (unless DATABASE_URL names one), every service on consecutive ports from
--base-port, and (unless --no-demo) the PLC simulator with a demo plant, demo PLC definitions and a demo
order, so live data flows as soon as it starts. Ctrl-C stops it all.

Each service gets its settings as `fabrica serve` would read them, pointed at this stack (its port, the
data folder, the database, its peers, the demo collector id) and passed to its ``create_app``; the process
environment is read, never written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from .runtime.db import resolve_database_url
from .runtime.logs import configure_logging
from .runtime.server import ServiceHost
from .runtime.settings import Settings, SettingsError, load_settings

log = logging.getLogger("fabrica.run")

ORDER = ("config", "ingest", "production", "collector", "alarm")
DEMO_COLLECTOR_ID = "demo"


def _banner(hosts: dict[str, ServiceHost], extra: list[str]) -> str:
    cfg = hosts["config"].address
    lines = ["", "Fabrica is running. Services (gRPC, plaintext, server reflection on each):"]
    for name, host in hosts.items():
        metrics = f"   metrics http://127.0.0.1:{host.metrics_port}/metrics" if host.metrics_port else ""
        lines.append(f"  {name:<11} {host.address}{metrics}")
    lines += extra
    lines += [
        "",
        "Try (grpcurl is in .venv/bin):",
        f"  .venv/bin/grpcurl -plaintext {cfg} list",
        f"  .venv/bin/grpcurl -plaintext {cfg} describe fabrica.config.v1.ConfigService",
        f"  .venv/bin/grpcurl -plaintext {cfg} fabrica.config.v1.ConfigService/ListPlcs",
        f"  .venv/bin/grpcurl -plaintext {cfg} fabrica.config.v1.ConfigService/ListDeviceProfiles",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def stack_settings(services: Sequence[str], base_port: int, data_dir: Path,
                   env: Mapping[str, str] | None = None) -> dict[str, Settings]:
    """The settings of each of `services` in this stack: read from `env` (default: the process environment)
    as `fabrica serve` reads them, with text logs unless FABRICA_LOG_FORMAT says otherwise, then given
    their port (config on `base_port`, the others on the next ones, in ORDER) and `data_dir`. Peers are
    this stack's config and ingest and the collector is DEMO_COLLECTOR_ID, unless `env` names others."""
    env = os.environ if env is None else env
    ports = {name: base_port + i for i, name in enumerate(ORDER)}
    out: dict[str, Settings] = {}
    for name in services:
        settings = load_settings(name, {"FABRICA_LOG_FORMAT": "text", **env})
        out[name] = settings.with_overrides(
            port=ports[name],
            data_dir=data_dir,
            config_addr=settings.config_addr or f"127.0.0.1:{ports['config']}",
            ingest_addr=settings.ingest_addr or f"127.0.0.1:{ports['ingest']}",
            collector_id=settings.collector_id or DEMO_COLLECTOR_ID,
        )
    return out


async def run_stack(args: argparse.Namespace) -> int:
    from .cli import create_app

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        settings_of = stack_settings(ORDER, args.base_port, data_dir)
    except SettingsError as exc:
        print(f"fabrica run: {exc}")
        return 2
    first = settings_of[ORDER[0]]
    configure_logging("run", first.log_level, first.log_format)
    database_url = await resolve_database_url(first.database_url, data_dir)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    hosts: dict[str, ServiceHost] = {}
    try:
        for name in ORDER:
            settings = settings_of[name].with_overrides(database_url=database_url)
            host = ServiceHost(create_app(name, settings), settings)
            await host.start()
            hosts[name] = host
        extra: list[str] = [f"  postgres    {database_url}"]
        async with contextlib.AsyncExitStack() as demo:
            from .demo import start_demo  # noqa: PLC0415 - the demo pulls in the simulator only when run

            extra += await start_demo(demo, hosts, args, data_dir)
            print(_banner(hosts, extra), flush=True)
            await stop.wait()
            log.info("stopping")
    except SettingsError as exc:
        print(f"fabrica run: {exc}")
        return 2
    finally:
        for host in reversed(list(hosts.values())):
            await host.stop(grace=1)
    return 0
