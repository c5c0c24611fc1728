"""The web tests' stack: config, ingest, production and a collector in process (tests/in_process.py) over
the test's database, and the gRPC-Web gateway (fabrica_svc.grpcweb) in front of them on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabrica_svc.collector.settings import CollectorSettings
from fabrica_svc.grpcweb.app import Gateway, GatewaySettings
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
    base = load_settings("grpc-web", {}).with_overrides(port=0, shutdown_grace=0.5)
    return GatewaySettings(base=base, upstreams=dict(upstreams), web_dist=None).with_overrides(**overrides)


async def start_services(servers: Servers, database_url: str, tmp_path: Path) -> dict[str, Server]:
    out: dict[str, Server] = {}
    for name in ("config", "ingest"):
        out[name] = await servers.start(name, settings_for(name, database_url=database_url, data_dir=tmp_path))
    out["production"] = await servers.start(
        "production", settings_for("production", database_url=database_url, data_dir=tmp_path),
        ingest_addr=out["ingest"].address)
    base = settings_for("collector", data_dir=tmp_path)
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
