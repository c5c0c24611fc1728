"""Wires the production service: store, LISTEN connection, servicer, and the tag-event consumer."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
from fabrica.production.v1 import production_service_pb2, production_service_pb2_grpc

from ..runtime.notify import Listener
from ..runtime.server import Resources
from ..runtime.settings import Settings
from .consumer import TagEventConsumer
from .servicer import ProductionServicer
from .store import CHANNEL, MIGRATIONS, ProductionStore

log = logging.getLogger(__name__)

SERVICE_NAME = production_service_pb2.DESCRIPTOR.services_by_name["ProductionService"].full_name
#: host:port of ingest's gRPC server. Unset: no automatic bookings (master data, orders, manual bookings
#: and OEE still work).
INGEST_ADDR_ENV = "FABRICA_INGEST_ADDR"


class ProductionApp:
    name = "production"
    service_names = (SERVICE_NAME,)
    schema = "production"
    migrations = MIGRATIONS

    def __init__(self, settings: Settings, ingest_addr: str = "", consumer_options: Mapping[str, float] | None = None):
        self.settings = settings
        self.ingest_addr = ingest_addr
        self.consumer_options = dict(consumer_options or {})
        self.listener: Listener | None = None
        self.store: ProductionStore | None = None
        self.consumer: TagEventConsumer | None = None
        self._servicer: ProductionServicer | None = None

    async def start(self, resources: Resources) -> None:
        assert resources.pool is not None and resources.dsn is not None
        self.listener = Listener(resources.dsn, CHANNEL)
        await self.listener.start()
        self.store = ProductionStore(resources.pool)
        self._servicer = ProductionServicer(self.store, self.listener)
        if self.ingest_addr:
            self.consumer = TagEventConsumer(resources.dsn, self.ingest_addr, self.store, **self.consumer_options)
            await self.consumer.start()
        else:
            log.info("%s is not set: the tag-event consumer is off (no automatic bookings or downtime)",
                     INGEST_ADDR_ENV)

    def register(self, server: grpc.aio.Server) -> None:
        assert self._servicer is not None, "start() comes before register()"
        production_service_pb2_grpc.add_ProductionServiceServicer_to_server(self._servicer, server)

    async def stop(self) -> None:
        if self.consumer:
            await self.consumer.stop()
        if self.listener:
            await self.listener.stop()


def create_app(settings: Settings, *, ingest_addr: str | None = None,
               consumer_options: Mapping[str, float] | None = None) -> ProductionApp:
    """The production service. `ingest_addr` None takes `settings.ingest_addr` (FABRICA_INGEST_ADDR);
    "" turns the consumer off."""
    if ingest_addr is None:
        ingest_addr = settings.ingest_addr
    return ProductionApp(settings, ingest_addr, consumer_options)
