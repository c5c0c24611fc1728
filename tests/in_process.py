"""In-process Fabrica servers for the tests, one way for every service.

A server is the service's real app, built by its ``create_app`` exactly as ``fabrica serve`` builds it,
running in the shared ServiceHost on 127.0.0.1:0, with a client channel to it. The fixtures in
tests/conftest.py are built on this module: ``servers`` starts any number of them for a test and stops them
afterwards; ``channel`` and ``stub`` talk to the ``server`` fixture a test folder defines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from fabrica.alarm.v1 import alarm_service_pb2_grpc
from fabrica.collector.v1 import collector_service_pb2_grpc
from fabrica.config.v1 import config_service_pb2_grpc
from fabrica.ingest.v1 import ingest_service_pb2_grpc
from fabrica.production.v1 import production_service_pb2_grpc

from fabrica_svc.cli import create_app
from fabrica_svc.runtime.server import ServiceHost
from fabrica_svc.runtime.settings import Settings, load_settings

#: The client stub of each service's API.
STUBS: dict[str, Any] = {
    "config": config_service_pb2_grpc.ConfigServiceStub,
    "ingest": ingest_service_pb2_grpc.IngestServiceStub,
    "production": production_service_pb2_grpc.ProductionServiceStub,
    "collector": collector_service_pb2_grpc.CollectorServiceStub,
    "alarm": alarm_service_pb2_grpc.AlarmServiceStub,
}


def settings_for(service: str, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """`service`'s settings for a test: read from `env` only (never the test process's environment), on
    port 0 with no metrics endpoint and the database checked every 0.2 s; `overrides` on top. Development
    mode (FABRICA_INSECURE=1: plaintext, and without a token verifier in `env` or `overrides` authentication
    is off) unless `env` says otherwise or names TLS files (tests of TLS: tests/tls_support.py, whose
    environments name a token verifier too; tests/runtime/test_auth.py turns authentication on)."""
    defaults: dict[str, Any] = {"port": 0, "metrics_port": -1, "health_interval": 0.2}
    env = dict(env or {})
    if not any(k.startswith("FABRICA_TLS_") for k in env):
        env.setdefault("FABRICA_INSECURE", "1")
    return load_settings(service, env).with_overrides(**{**defaults, **overrides})


async def start_server(service: str, settings: Settings | None = None, **app_args: Any) -> ServiceHost:
    """Start `service` in process (settings: :func:`settings_for`) and return its host; the caller stops it.
    `app_args` go to the service's ``create_app`` (e.g. ingest's ``config=``)."""
    settings = settings if settings is not None else settings_for(service)
    host = ServiceHost(create_app(service, settings, **app_args), settings)
    await host.start()
    return host


@dataclass
class Server:
    """A started server and a client channel to it."""

    host: ServiceHost
    channel: grpc.aio.Channel
    #: Seconds in-flight calls get when the server is stopped.
    grace: float = 0.0

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def app(self) -> Any:
        return self.host.app

    @property
    def settings(self) -> Settings:
        return self.host.settings

    @property
    def database_url(self) -> str | None:
        return self.host.settings.database_url

    @property
    def stub(self) -> Any:
        """The stub of this server's service."""
        return STUBS[self.host.app.name](self.channel)

    async def stop(self) -> None:
        await self.channel.close()
        await self.host.stop(grace=self.grace)


async def open_server(service: str, settings: Settings | None = None, *, grace: float = 0.0,
                      **app_args: Any) -> Server:
    """:func:`start_server` with a channel to it (TLS trusting the server's CA when it has one, without a client
    certificate: its gRPC port); the caller stops it with ``Server.stop()``."""
    host = await start_server(service, settings, **app_args)
    tls = host.settings.tls
    channel = (grpc.aio.secure_channel(host.address, grpc.ssl_channel_credentials(tls.ca_pem)) if tls is not None
               else grpc.aio.insecure_channel(host.address))
    return Server(host, channel, grace)


class Servers:
    """The servers one test started (the ``servers`` fixture): stopped together, the last started first."""

    def __init__(self) -> None:
        self._started: list[Server] = []

    async def start(self, service: str, settings: Settings | None = None, *, grace: float = 0.0,
                    **app_args: Any) -> Server:
        server = await open_server(service, settings, grace=grace, **app_args)
        self._started.append(server)
        return server

    async def stop_all(self) -> None:
        while self._started:
            await self._started.pop().stop()
