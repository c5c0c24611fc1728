"""Wires the config service: settings, store, LISTEN connection, servicer."""

from __future__ import annotations

import grpc
from fabrica.config.v1 import config_service_pb2, config_service_pb2_grpc

from ..runtime.notify import Listener
from ..runtime.server import Resources
from ..runtime.settings import Settings
from .servicer import ConfigServicer
from .store import CHANNEL, MIGRATIONS, ConfigStore

SERVICE_NAME = config_service_pb2.DESCRIPTOR.services_by_name["ConfigService"].full_name


class ConfigApp:
    name = "config"
    service_names = (SERVICE_NAME,)
    schema = "config"
    migrations = MIGRATIONS

    def __init__(self, settings: Settings):
        self.settings = settings
        self.listener: Listener | None = None
        self._servicer: ConfigServicer | None = None

    async def start(self, resources: Resources) -> None:
        assert resources.pool is not None and resources.dsn is not None
        self.listener = Listener(resources.dsn, CHANNEL)
        await self.listener.start()
        self._servicer = ConfigServicer(ConfigStore(resources.pool), self.listener)

    def register(self, server: grpc.aio.Server) -> None:
        assert self._servicer is not None, "start() comes before register()"
        config_service_pb2_grpc.add_ConfigServiceServicer_to_server(self._servicer, server)

    async def stop(self) -> None:
        if self.listener:
            await self.listener.stop()


def create_app(settings: Settings) -> ConfigApp:
    return ConfigApp(settings)
