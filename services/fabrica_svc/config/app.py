"""Wires the config service: its settings and the host's database give the store and the LISTEN connection
(fanned out per tenant: runtime/notify.py TenantListener), which are passed to the servicer.

Like every Fabrica service: ``create_app(settings)`` returns the app; the ServiceHost calls ``start()``, which
builds the parts and the servicer, then ``register()``, which adds that servicer to the gRPC server.
"""

from __future__ import annotations

import grpc
from fabrica.config.v1 import config_service_pb2, config_service_pb2_grpc

from ..runtime.server import Resources
from ..runtime.settings import Settings
from ..runtime.notify import TenantListener
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
        # Built by start():
        self.store: ConfigStore
        self.listener: TenantListener
        self.servicer: ConfigServicer
        #: What stop() stops, in that order: every part start() built, started or not.
        self._parts: list[TenantListener] = []

    async def start(self, resources: Resources) -> None:
        assert resources.pool is not None and resources.dsn is not None  # the host gives a schema its database
        self.store = ConfigStore(resources.pool)
        self.listener = TenantListener(resources.dsn, CHANNEL)
        self.servicer = ConfigServicer(self.store, self.listener)
        self._parts = [self.listener]
        await self.listener.start()

    def register(self, server: grpc.aio.Server) -> None:
        config_service_pb2_grpc.add_ConfigServiceServicer_to_server(self.servicer, server)

    async def stop(self) -> None:
        parts, self._parts = self._parts, []
        for part in parts:
            await part.stop()


def create_app(settings: Settings) -> ConfigApp:
    return ConfigApp(settings)
