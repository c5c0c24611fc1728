"""The web tests' stack: config, ingest, production, alarm and a collector in process (tests/in_process.py) over
the test's database, and the gRPC-Web gateway (fabrica_svc.grpcweb) in front of them on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabrica_svc.collector.settings import CollectorSettings
from fabrica_svc.grpcweb.app import Gateway, GatewaySettings
from fabrica_svc.runtime import auth
from fabrica_svc.runtime.settings import load_settings
from in_process import Server, Servers, settings_for


@dataclass
class WebStack:
    servers: Mapping[str, Server]
    gateway: Gateway

    @property
    def url(self) -> str:
        return self.gateway.url


def gateway_settings(upstreams: Mapping[str, str], **overrides: object) -> GatewaySettings:
    # Development mode, as the in-process services (tests/in_process.py): plaintext to them. The gateway under
    # TLS and tokens: tests/test_end_to_end.py, tests/web/screens (a real `fabrica run`).
    base = load_settings("grpc-web", {"FABRICA_INSECURE": "1"}).with_overrides(port=0, shutdown_grace=0.5)
    return GatewaySettings(base=base, upstreams=dict(upstreams), web_dist=None).with_overrides(**overrides)


async def start_services(servers: Servers, database_url: str, tmp_path: Path,
                         key: auth.LocalKey | None = None) -> dict[str, Server]:
    """The services in development mode (plaintext); with `key`, authentication is on (they verify tokens
    signed by it) and production and the collector send tokens of their own, as under `fabrica run`."""
    env: dict[str, str] = {}
    tokens: dict[str, dict[str, str]] = {name: {} for name in ("config", "ingest", "production", "collector", "alarm")}
    if key is not None:
        env = {"FABRICA_JWT_PUBLIC_KEY_FILE": str(key.public_key_file)}
        tokens["production"] = {"token": auth.mint_token(key, subject="service-production", roles=["viewer"],
                                                         ttl_seconds=3600)}
        # Installation-wide, as under `fabrica run` (stack._service_token): alarm reads every tenant's feed.
        tokens["alarm"] = {"token": auth.mint_token(key, subject="service-alarm", roles=["admin"], tenant="*",
                                                    ttl_seconds=3600)}
        tokens["collector"] = {"token": auth.mint_token(key, subject="collector-web-1", roles=["collector"],
                                                        collector_id="web-1", ttl_seconds=3600)}
    out: dict[str, Server] = {}
    for name in ("config", "ingest"):
        out[name] = await servers.start(name, settings_for(name, env, database_url=database_url, data_dir=tmp_path))
    out["production"] = await servers.start(
        "production", settings_for("production", env, database_url=database_url, data_dir=tmp_path,
                                   **tokens["production"]),
        ingest_addr=out["ingest"].address)
    # Rules, alarms and operator actions; no evaluation (no ingest address): the gateway's routes are what is tried.
    out["alarm"] = await servers.start("alarm", settings_for("alarm", env, database_url=database_url, data_dir=tmp_path,
                                                             config_addr=out["config"].address, **tokens["alarm"]))
    base = settings_for("collector", env, data_dir=tmp_path, **tokens["collector"])
    collector = CollectorSettings(base=base, collector_id="web-1", config_addr=out["config"].address,
                                  ingest_addr=out["ingest"].address, batch_latency=0.05)
    out["collector"] = await servers.start("collector", base, config=collector)
    return out


@pytest.fixture
async def web_stack(database_url: str, servers: Servers, tmp_path: Path) -> AsyncIterator[WebStack]:
    started = await start_services(servers, database_url, tmp_path)
    gateway = Gateway(gateway_settings({name: s.address for name, s in started.items()},
                                       cors_origins=("http://localhost:5173", "https://fabrica.example.com")))
    await gateway.start()
    try:
        yield WebStack(started, gateway)
    finally:
        await gateway.stop(grace=0.5)


@pytest.fixture
async def authed_web_stack(database_url: str, servers: Servers, tmp_path: Path) -> AsyncIterator[tuple[WebStack, str]]:
    """The web stack with authentication on (tokens of a local key, verified by every service; plaintext),
    and an engineer's token for the caller. The gateway forwards the caller's `authorization` only."""
    key = auth.ensure_local_key(tmp_path / "auth-data")
    started = await start_services(servers, database_url, tmp_path, key)
    gateway = Gateway(gateway_settings({name: s.address for name, s in started.items()}))
    await gateway.start()
    try:
        yield WebStack(started, gateway), auth.mint_token(key, subject="node", roles=["engineer"], ttl_seconds=600)
    finally:
        await gateway.stop(grace=0.5)
