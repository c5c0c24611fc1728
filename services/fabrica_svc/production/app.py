"""Wires the production service from its Settings: the host's database gives the service layer, the LISTEN
connection and the tag-event consumer; the config client checks tag bindings; all are passed in
constructors. As in every Fabrica service, the host's ``start()`` builds the parts and the servicer, and
``register()`` adds that servicer to the gRPC server.

Peers come from the settings object, never from the environment directly:

* ``settings.ingest_addr`` (FABRICA_INGEST_ADDR): where the tag-event consumer reads WatchTagEvents. Unset:
  no automatic bookings (master data, orders, manual bookings and OEE still work).
* ``settings.config_addr`` (FABRICA_CONFIG_ADDR): the config service, asked when a work centre's bindings are
  created or changed whether the tags exist with the roles they are bound in (tagcheck.py). Unset: the
  check is skipped, and a log line at start says so. The tenant directory (runtime/tenants.py) polls config's
  tenants there too: the callers of a suspended tenant are refused (TENANT_INACTIVE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from fabrica.production.v1 import production_service_pb2, production_service_pb2_grpc

from ..runtime.channels import peer_channel
from ..runtime.retry import SERVICE_RETRY, RetryPolicy
from ..runtime.server import Resources
from ..runtime.settings import Settings
from ..runtime.tenants import TenantDirectory
from .consumer import TagEventConsumer
from ..runtime.notify import TenantListener
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


class _ConfigChannel:
    """The channel to config, closed on stop like the other parts."""

    def __init__(self, address: str, settings: Settings):
        self.channel = peer_channel(address, settings)

    async def stop(self) -> None:
        await self.channel.close()


class ProductionApp:
    name = "production"
    service_names = (SERVICE_NAME,)
    schema = "production"
    migrations = MIGRATIONS

    def __init__(self, settings: Settings, consumer: ConsumerOptions | None = None):
        self.settings = settings
        self.consumer_options = consumer or ConsumerOptions()
        #: Applies messages of tag events (the consumer's, and tests' on their own connection).
        self.tag_events = TagEventService()
        # Built by start():
        self.listener: TenantListener
        self.service: ProductionService
        self.servicer: ProductionServicer
        #: None when settings.ingest_addr is unset.
        self.consumer: TagEventConsumer | None = None
        #: Which tenants are suspended, as config last said (the host refuses their callers by it).
        self.tenant_directory: TenantDirectory
        #: What stop() stops, in that order: every part start() built, started or not.
        self._parts: list[TagEventConsumer | TenantListener | TenantDirectory | _ConfigChannel] = []

    async def start(self, resources: Resources) -> None:
        assert resources.pool is not None and resources.dsn is not None  # the host gives a schema its database
        settings = self.settings
        tag_check: TagCheck = NoTagCheck()
        config: list[_ConfigChannel] = []
        if settings.config_addr:
            config = [_ConfigChannel(settings.config_addr, settings)]
            tag_check = ConfigTagCheck(config[0].channel)
        else:
            log.info("FABRICA_CONFIG_ADDR is not set: work centre bindings are not checked against config's tag "
                     "roles")
        self.listener = TenantListener(resources.dsn, CHANNEL)
        self.service = ProductionService(Database(resources.pool), tag_check)
        self.servicer = ProductionServicer(self.service, self.listener)
        if settings.ingest_addr:
            options = self.consumer_options
            self.consumer = TagEventConsumer(resources.dsn, settings.ingest_addr, self.tag_events,
                                             standby_interval=options.standby_interval, retry=options.retry,
                                             settings=settings)
        else:
            log.info("FABRICA_INGEST_ADDR is not set: the tag-event consumer is off (no automatic bookings or "
                     "downtime)")
        self.tenant_directory = TenantDirectory(settings)
        self._parts = [*([self.consumer] if self.consumer else []), self.listener, self.tenant_directory, *config]
        await self.tenant_directory.start()  # polls in the background: start-up never waits for config
        await self.listener.start()
        if self.consumer:
            await self.consumer.start()

    def register(self, server: grpc.aio.Server) -> None:
        production_service_pb2_grpc.add_ProductionServiceServicer_to_server(self.servicer, server)

    async def stop(self) -> None:
        parts, self._parts = self._parts, []
        for part in parts:
            await part.stop()


def create_app(settings: Settings, *, ingest_addr: str | None = None,
               consumer: ConsumerOptions | None = None) -> ProductionApp:
    """The production service from `settings`. `ingest_addr`, if given, replaces ``settings.ingest_addr``
    ("" turns the consumer off)."""
    if ingest_addr is not None:
        settings = settings.with_overrides(ingest_addr=ingest_addr)
    return ProductionApp(settings, consumer)
