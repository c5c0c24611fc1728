"""`fabrica run`: the whole local stack in one process, for trying Fabrica out.

An embedded Postgres in --data-dir (unless DATABASE_URL names one), every service on consecutive ports from
--base-port, the web UI with the gRPC-Web gateway on --web-port (http://127.0.0.1:8080), and (unless
--no-demo) the PLC simulator with a demo plant, demo PLC definitions and a demo
order, so live data flows as soon as it starts. Ctrl-C stops it all.

Each service gets its settings as `fabrica serve` would read them, pointed at this stack (its port, the
data folder, the database, its peers, the demo collector id) and passed to its ``create_app``; the process
environment is read, never written.

TLS: every service serves TLS with a certificate of the stack's own CA (``<data dir>/tls/``, created at first
start: local_tls.py), and config and ingest also serve their mutual-TLS peer port (the next two ports after the
four gRPC ports), where the collector and production call them with their certificates, so ingest and config
know which collector is calling. Plaintext only with FABRICA_INSECURE=1 (development; the services warn).

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
from urllib.parse import urlsplit, urlunsplit

from .grpcweb.app import Gateway, GatewaySettings, load_gateway_settings
from .local_tls import LocalPki
from .runtime.auth import LocalKey, ensure_local_key, mint_token
from .runtime.db import resolve_database_url
from .runtime.logs import configure_logging
from .runtime.server import ServiceHost
from .runtime.settings import Settings, SettingsError, load_settings
from .runtime.telemetry import configure_telemetry

log = logging.getLogger("fabrica.run")

ORDER = ("config", "ingest", "production", "collector", "alarm")
DEMO_COLLECTOR_ID = "demo"
#: The services collectors and services call, each with a mutual-TLS peer port (after the gRPC ports).
PEER_SERVICES = ("config", "ingest")
#: How many consecutive ports from --base-port a TLS stack binds: the gRPC ports, then the peer ports.
PORTS_USED = len(ORDER) + len(PEER_SERVICES)


def grpcurl_transport(settings: Settings) -> str:
    """How grpcurl reaches a service of this stack: trusting the stack's CA, or plaintext in development mode."""
    tls = settings.tls
    return f"-cacert {tls.ca_path}" if tls is not None and tls.ca_path is not None else "-plaintext"
#: How long the tokens `fabrica run` mints for its own services last (they are minted again at each start),
#: and the admin token it prints.
SERVICE_TOKEN_TTL = 365 * 86400.0
ADMIN_TOKEN_TTL = 86400.0
VERIFIER_VARIABLES = ("FABRICA_JWT_PUBLIC_KEY_FILE", "FABRICA_JWKS_URL", "FABRICA_JWKS_FILE")
TOKEN_VARIABLES = ("FABRICA_TOKEN_FILE", "FABRICA_TOKEN")


def _banner(hosts: dict[str, ServiceHost], extra: list[str], auth_lines: Sequence[str] = (),
            web: Gateway | None = None) -> str:
    cfg = hosts["config"].address
    how = grpcurl_transport(hosts["config"].settings)
    tls = hosts["config"].settings.tls
    transport = f"TLS, CA {tls.ca_path}" if tls is not None else "PLAINTEXT (FABRICA_INSECURE=1)"
    header = '-H "authorization: Bearer $TOKEN"'
    lines = ["", f"Fabrica is running. Services (gRPC over {transport}; server reflection on each):"]
    for name, host in hosts.items():
        metrics = f"   metrics http://127.0.0.1:{host.metrics_port}/metrics" if host.metrics_port else ""
        peer = f"   peer (mutual TLS) {host.peer_address}" if host.peer_address else ""
        lines.append(f"  {name:<11} {host.address}{peer}{metrics}")
    if web is not None:
        what = "the web UI (log in with a token, e.g. the admin token below), and gRPC-Web to every service" \
            if web.settings.web_dist else \
            "gRPC-Web to every service (the UI is not built: npm run build in web/)"
        lines.append(f"  {'web':<11} {web.url}/   {what}")
    lines += extra
    lines += auth_lines
    lines += [
        "",
        "Try (grpcurl is in .venv/bin):",
        f"  .venv/bin/grpcurl {how} {cfg} list",
        f"  .venv/bin/grpcurl {how} {cfg} describe fabrica.config.v1.ConfigService",
        f"  .venv/bin/grpcurl {how} {header} {cfg} fabrica.config.v1.ConfigService/ListPlcs",
        f"  .venv/bin/grpcurl {how} {header} {cfg} fabrica.config.v1.ConfigService/ListDeviceProfiles",
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

    Unless `env` has FABRICA_INSECURE=1, each service gets its certificate of the local CA in
    ``data_dir/tls`` (created if need be; any FABRICA_TLS_* of `env` is replaced) and config and ingest their
    peer port (the ports after ORDER's), which is where their peers call them.

    With `key` (the local signing key), every service verifies tokens with it unless `env` names a verifier,
    and the collector and production send tokens it signs unless `env` gives them one."""
    env = os.environ if env is None else env
    ports = {name: base_port + i for i, name in enumerate(ORDER)}
    peer_ports = {name: base_port + len(ORDER) + i for i, name in enumerate(PEER_SERVICES)}
    tls = env.get("FABRICA_INSECURE", "").strip() != "1"
    pki = LocalPki(data_dir) if tls else None
    collector_id = (env.get("FABRICA_COLLECTOR_ID") or "").strip() or DEMO_COLLECTOR_ID
    peer = peer_ports if tls else ports  # where the collector and production call config and ingest
    defaults = {"FABRICA_LOG_FORMAT": "text"}
    if key is not None and not any(env.get(v) for v in VERIFIER_VARIABLES):
        defaults["FABRICA_JWT_PUBLIC_KEY_FILE"] = str(key.public_key_file)
    out: dict[str, Settings] = {}
    for name in services:
        service_env = {**defaults, **env}
        if pki is not None:
            files = pki.collector(collector_id) if name == "collector" else pki.service(name)
            service_env.update(files.env())
            service_env["FABRICA_PEER_PORT"] = str(peer_ports[name]) if name in PEER_SERVICES else "-1"
        settings = load_settings(name, service_env)
        out[name] = settings.with_overrides(
            port=ports[name],
            data_dir=data_dir,
            config_addr=settings.config_addr or f"127.0.0.1:{peer['config']}",
            ingest_addr=settings.ingest_addr or f"127.0.0.1:{peer['ingest']}",
            collector_id=settings.collector_id or DEMO_COLLECTOR_ID,
        )
        if key is not None and not any(env.get(v) for v in TOKEN_VARIABLES):
            out[name] = out[name].with_overrides(token=_service_token(key, out[name]))
    return out


def shown_dsn(dsn: str) -> str:
    """`dsn` as the banner may print it: its password (in the user info or a ``password=`` parameter)
    replaced by ``***`` (a log is no place for a secret)."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = "&".join("password=***" if q.lower().startswith("password=") else q for q in parts.query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return dsn
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _service_token(key: LocalKey, settings: Settings) -> str:
    """The token a service of this stack sends its peers: the collector's own, production's and alarm's a
    viewer's (they read tag events, committed readings and PLCs); "" for config, which calls no one, and ingest,
    which calls config (ListTenants) with its certificate alone (a service's certificate acts across tenants)."""
    common = {"ttl_seconds": SERVICE_TOKEN_TTL, "issuer": settings.jwt_issuer, "audience": settings.jwt_audience}
    if settings.service == "collector":
        return mint_token(key, subject=f"collector-{settings.collector_id}", roles=["collector"],
                          collector_id=settings.collector_id, **common)
    if settings.service in ("production", "alarm"):
        return mint_token(key, subject=f"service-{settings.service}", roles=["viewer"], **common)
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


def gateway_settings(hosts: Mapping[str, ServiceHost], web_port: int, data_dir: Path,
                     env: Mapping[str, str] | None = None) -> GatewaySettings:
    """The settings of this stack's gRPC-Web gateway: on 127.0.0.1:`web_port`, its upstreams the services'
    user ports (TLS without client certificates, verified with the local CA: the gateway gets a certificate
    of its own from it, ``service:grpc-web``), forwarding each browser's own ``authorization`` header; the
    gateway sends no token of its own (runtime/channels.py adds none without FABRICA_TOKEN*)."""
    env = os.environ if env is None else env
    web_env = {"FABRICA_LOG_FORMAT": "text", **env}
    for variable in TOKEN_VARIABLES:  # a browser's call carries its caller's token, never the gateway's
        web_env.pop(variable, None)
    if hosts["config"].settings.tls is not None:
        web_env.update(LocalPki(data_dir).service("grpc-web").env())
    settings = load_gateway_settings(web_env)
    return settings.with_overrides(
        base=settings.base.with_overrides(host="127.0.0.1", port=web_port, token="", token_file=None),
        upstreams={name: host.address for name, host in hosts.items()})


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
    # One process hosts every service: its spans and metrics are the stack's (service.name fabrica-run), not
    # the first service's; each span's instrumentation scope (fabrica.collector, ...) names its service.
    configure_telemetry("run")
    database_url = await resolve_database_url(first.database_url, data_dir)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    hosts: dict[str, ServiceHost] = {}
    web: Gateway | None = None
    try:
        for name in ORDER:
            settings = settings_of[name].with_overrides(database_url=database_url)
            host = ServiceHost(create_app(name, settings), settings)
            await host.start()
            hosts[name] = host
        web = Gateway(gateway_settings(hosts, args.web_port, data_dir))
        await web.start()
        extra: list[str] = [f"  postgres    {shown_dsn(database_url)}"]
        auth_lines, admin = _auth_lines(key, first, data_dir)
        async with contextlib.AsyncExitStack() as demo:
            from .demo import start_demo  # noqa: PLC0415 - the demo pulls in the simulator only when run

            extra += await start_demo(demo, hosts, args, data_dir, token=admin)
            print(_banner(hosts, extra, auth_lines, web), flush=True)
            await stop.wait()
            log.info("stopping")
    except SettingsError as exc:
        print(f"fabrica run: {exc}")
        return 2
    finally:
        if web is not None:
            await web.stop(grace=1)
        for host in reversed(list(hosts.values())):
            await host.stop(grace=1)
    return 0
