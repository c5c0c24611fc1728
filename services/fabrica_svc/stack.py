"""`fabrica run`: the whole local stack in one process, for trying Fabrica out.

An embedded Postgres in --data-dir (unless DATABASE_URL names one), every service on consecutive ports from
--base-port, and (unless --no-demo) the PLC simulator with a demo plant, demo PLC definitions and a demo
order, so live data flows as soon as it starts. Ctrl-C stops it all.

Each service gets its settings as `fabrica serve` would read them, pointed at this stack (its port, the
data folder, the database, its peers, the demo collector id) and passed to its ``create_app``; the process
environment is read, never written.

Authentication is on: unless the environment names a verifier of its own, every service verifies tokens with
the local signing key in ``<data dir>/auth/`` (created at first start, reused later; runtime/auth.py). The
collector sends a token of its own (role collector, its collector id), production a viewer's, both minted at
start; the banner prints an admin token for trying things with grpcurl (`fabrica token` mints more). The
banner never prints the database password.
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

from .runtime.auth import LocalKey, ensure_local_key, mint_token
from .runtime.db import resolve_database_url
from .runtime.logs import configure_logging
from .runtime.server import ServiceHost
from .runtime.settings import Settings, SettingsError, load_settings

log = logging.getLogger("fabrica.run")

ORDER = ("config", "ingest", "production", "collector")
DEMO_COLLECTOR_ID = "demo"
#: How long the tokens `fabrica run` mints for its own services last (they are minted again at each start),
#: and the admin token it prints.
SERVICE_TOKEN_TTL = 365 * 86400.0
ADMIN_TOKEN_TTL = 86400.0
VERIFIER_VARIABLES = ("FABRICA_JWT_PUBLIC_KEY_FILE", "FABRICA_JWKS_URL", "FABRICA_JWKS_FILE")
TOKEN_VARIABLES = ("FABRICA_TOKEN_FILE", "FABRICA_TOKEN")


def shown_dsn(dsn: str) -> str:
    """`dsn` with its password replaced by ``***`` (the banner and logs never show it)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def _banner(hosts: dict[str, ServiceHost], extra: list[str], auth_lines: Sequence[str] = ()) -> str:
    cfg = hosts["config"].address
    header = '-H "authorization: Bearer $TOKEN"'
    lines = ["", "Fabrica is running. Services (gRPC, plaintext, server reflection on each):"]
    for name, host in hosts.items():
        metrics = f"   metrics http://127.0.0.1:{host.metrics_port}/metrics" if host.metrics_port else ""
        lines.append(f"  {name:<11} {host.address}{metrics}")
    lines += extra
    lines += auth_lines
    lines += [
        "",
        "Try (grpcurl is in .venv/bin):",
        f"  .venv/bin/grpcurl -plaintext {cfg} list",
        f"  .venv/bin/grpcurl -plaintext {cfg} describe fabrica.config.v1.ConfigService",
        f"  .venv/bin/grpcurl -plaintext {header} {cfg} fabrica.config.v1.ConfigService/ListPlcs",
        f"  .venv/bin/grpcurl -plaintext {header} {cfg} fabrica.config.v1.ConfigService/ListDeviceProfiles",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def stack_settings(services: Sequence[str], base_port: int, data_dir: Path,
                   env: Mapping[str, str] | None = None, key: LocalKey | None = None) -> dict[str, Settings]:
    """The settings of each of `services` in this stack: read from `env` (default: the process environment)
    as `fabrica serve` reads them, with text logs unless FABRICA_LOG_FORMAT says otherwise, then given
    their port (config on `base_port`, the others on the next ones, in ORDER) and `data_dir`. Peers are
    this stack's config and ingest and the collector is DEMO_COLLECTOR_ID, unless `env` names others.

    With `key` (the local signing key), every service verifies tokens with it unless `env` names a verifier,
    and the collector and production send tokens it signs unless `env` gives them one."""
    env = os.environ if env is None else env
    ports = {name: base_port + i for i, name in enumerate(ORDER)}
    defaults = {"FABRICA_LOG_FORMAT": "text"}
    if key is not None and not any(env.get(v) for v in VERIFIER_VARIABLES):
        defaults["FABRICA_JWT_PUBLIC_KEY_FILE"] = str(key.public_key_file)
    out: dict[str, Settings] = {}
    for name in services:
        settings = load_settings(name, {**defaults, **env})
        out[name] = settings.with_overrides(
            port=ports[name],
            data_dir=data_dir,
            config_addr=settings.config_addr or f"127.0.0.1:{ports['config']}",
            ingest_addr=settings.ingest_addr or f"127.0.0.1:{ports['ingest']}",
            collector_id=settings.collector_id or DEMO_COLLECTOR_ID,
        )
        if key is not None and not any(env.get(v) for v in TOKEN_VARIABLES):
            out[name] = out[name].with_overrides(token=_service_token(key, out[name]))
    return out


def _service_token(key: LocalKey, settings: Settings) -> str:
    """The token a service of this stack sends its peers: the collector's own, production's a viewer's;
    "" for config and ingest, which call no one."""
    common = {"ttl_seconds": SERVICE_TOKEN_TTL, "issuer": settings.jwt_issuer, "audience": settings.jwt_audience}
    if settings.service == "collector":
        return mint_token(key, subject=f"collector-{settings.collector_id}", roles=["collector"],
                          collector_id=settings.collector_id, **common)
    if settings.service == "production":
        return mint_token(key, subject="service-production", roles=["viewer"], **common)
    return ""


def _auth_lines(key: LocalKey, settings: Settings, data_dir: Path) -> tuple[list[str], str]:
    """The banner's lines about tokens, and the admin token they show."""
    admin = mint_token(key, subject="admin", roles=["admin"], ttl_seconds=ADMIN_TOKEN_TTL,
                       issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    return [
        "",
        f"Every call but health and reflection needs a bearer token (signed by {key.private_key_file}).",
        f"An admin token, valid {ADMIN_TOKEN_TTL / 3600:.0f} h (more: .venv/bin/fabrica token --role viewer|operator|"
        f"engineer|admin --user NAME --data-dir {data_dir}):",
        f"  export TOKEN={admin}",
    ], admin


async def run_stack(args: argparse.Namespace) -> int:
    from .cli import create_app

    data_dir = Path(args.data_dir or os.environ.get("FABRICA_DATA_DIR") or ".fabrica").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = ensure_local_key(data_dir)
    try:
        settings_of = stack_settings(ORDER, args.base_port, data_dir, key=key)
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
        extra: list[str] = [f"  postgres    {shown_dsn(database_url)}"]
        auth_lines, admin = _auth_lines(key, first, data_dir)
        async with contextlib.AsyncExitStack() as demo:
            from .demo import start_demo  # noqa: PLC0415 - the demo pulls in the simulator only when run

            extra += await start_demo(demo, hosts, args, data_dir, token=admin)
            print(_banner(hosts, extra, auth_lines), flush=True)
            await stop.wait()
            log.info("stopping")
    except SettingsError as exc:
        print(f"fabrica run: {exc}")
        return 2
    finally:
        for host in reversed(list(hosts.values())):
            await host.stop(grace=1)
    return 0
