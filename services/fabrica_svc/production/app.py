"""Wires the production service from its Settings: database, LISTEN connection, service layer, servicer, the
config client that checks tag bindings, and the tag-event consumer.

Peers come from the settings object, never from the environment directly:

* ``settings.ingest_addr`` (FABRICA_INGEST_ADDR): where the tag-event consumer reads WatchTagEvents. Unset:
  no automatic bookings (master data, orders, manual bookings and OEE still work).
* ``settings.config_addr`` (FABRICA_CONFIG_ADDR): the config service, asked when a work centre's bindings are
  created or changed whether the tags exist with the roles they are bound in (tagcheck.py). Unset: the
  check is skipped, and a log line at start says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from fabrica.production.v1 import production_service_pb2, production_service_pb2_grpc

from ..runtime.channels import PEER_CHANNEL_OPTIONS
from ..runtime.notify import Listener
from ..runtime.retry import SERVICE_RETRY, RetryPolicy
from ..runtime.server import Resources
from ..runtime.settings import Settings
from .consumer import TagEventConsumer
from .service import ProductionService, TagEventService
from .servicer import ProductionServicer
from .store import CHANNEL, MIGRATIONS, Database
from .tagcheck import ConfigTagCheck, NoTagCheck, TagCheck

log = logging.getLogger(__name__)

SERVICE_NAME = production_service_pb2.DESCRIPTOR.services_by_name["ProductionService"].full_name


@dataclass(frozen=True)
class ConsumerOptions:
    """How the tag-event consumer waits: between tries of the election lock, and after a failure."""

    standby_interval: float = 1.0
    retry: RetryPolicy = SERVICE_RETRY


class ProductionApp:
    name = "production"
    service_names = (SERVICE_NAME,)
    schema = "production"
    migrations = MIGRATIONS

    def __init__(self, settings: Settings, consumer: ConsumerOptions | None = None):
        self.settings = settings
        self.consumer_options = consumer or ConsumerOptions()
        self.tag_events = TagEventService()
        self.listener: Listener | None = None
        self.service: ProductionService | None = None
        self.consumer: TagEventConsumer | None = None
        self._config_channel: grpc.aio.Channel | None = None
        self._servicer: ProductionServicer | None = None

    def _tag_check(self) -> TagCheck:
        if not self.settings.config_addr:
            log.info("FABRICA_CONFIG_ADDR is not set: work centre bindings are not checked against config's tag "
                     "roles")
            return NoTagCheck()
        self._config_channel = grpc.aio.insecure_channel(self.settings.config_addr, options=PEER_CHANNEL_OPTIONS)
        return ConfigTagCheck(self._config_channel)

    async def start(self, resources: Resources) -> None:
        assert resources.pool is not None and resources.dsn is not None
        self.listener = Listener(resources.dsn, CHANNEL)
        await self.listener.start()
        self.service = ProductionService(Database(resources.pool), self._tag_check())
        self._servicer = ProductionServicer(self.service, self.listener)
        if self.settings.ingest_addr:
            options = self.consumer_options
            self.consumer = TagEventConsumer(resources.dsn, self.settings.ingest_addr, self.tag_events,
                                             standby_interval=options.standby_interval, retry=options.retry)
            await self.consumer.start()
        else:
            log.info("FABRICA_INGEST_ADDR is not set: the tag-event consumer is off (no automatic bookings or "
                     "downtime)")

    def register(self, server: grpc.aio.Server) -> None:
        # The host calls start() (which needs the pool it opens) before register(): see runtime/server.py.
        assert self._servicer is not None, "start() comes before register()"
        production_service_pb2_grpc.add_ProductionServiceServicer_to_server(self._servicer, server)

    async def stop(self) -> None:
        if self.consumer:
            await self.consumer.stop()
        if self.listener:
            await self.listener.stop()
        if self._config_channel is not None:
            await self._config_channel.close()


def create_app(settings: Settings, *, ingest_addr: str | None = None,
               consumer: ConsumerOptions | None = None) -> ProductionApp:
    """The production service from `settings`. `ingest_addr`, if given, replaces ``settings.ingest_addr``
    ("" turns the consumer off)."""
    if ingest_addr is not None:
        settings = settings.with_overrides(ingest_addr=ingest_addr)
    return ProductionApp(settings, consumer)
