"""Wires the ingest service: its settings (IngestConfig) and the host's database give the store, the
writer, the hubs (the runtime's Listener on the tag events channel and on the feed's), the maintenance rounds
and the tenant directory (runtime/tenants.py: each tenant's quota, retention and state, polled from config at
``settings.config_addr``; none set: every tenant unlimited, kept for ever) with the quotas it feeds
(quota.py), which are passed to the servicer.

``fabrica serve ingest`` calls :func:`create_app`; the shared ServiceHost does the rest (Postgres and
migrations, the pool, the gRPC server with validation, health, reflection, metrics, shutdown). As in every
Fabrica service, the host's ``start()`` call builds the parts and the servicer, and ``register()`` adds that
servicer to the gRPC server.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from fabrica.ingest.v1 import ingest_service_pb2

from ..runtime.db import Migration
from ..runtime.notify import Listener
from ..runtime.server import Resources
from ..runtime.settings import Settings
from .config import IngestConfig, load_ingest_config
from .maintenance import Maintenance
from .quota import TenantQuotas
from .rollup import RollupJob, RollupReader
from .servicer import IngestServicer, add_to_server
from .store import EVENTS_CHANNEL, FEED_CHANNEL, MIGRATIONS, SCHEMA, IngestStore
from ..runtime.tenants import TenantDirectory
from .writer import BatchWriter

SERVICE_NAME = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


class IngestApp:
    name = "ingest"
    service_names: Sequence[str] = (SERVICE_NAME,)
    schema: str | None = SCHEMA
    migrations: Sequence[Migration] = MIGRATIONS

    def __init__(self, settings: Settings, config: IngestConfig):
        self.settings = settings
        self.config = config
        # Built by start():
        self.store: IngestStore
        self.writer: BatchWriter
        self.hub: Listener
        self.feed_hub: Listener
        self.maintenance: Maintenance
        #: Each tenant's state, quota and retention as config last said (runtime/tenants.py); the host refuses
        #: the callers of a suspended tenant by it (runtime/server.py).
        self.tenant_directory: TenantDirectory
        self.quotas: TenantQuotas
        self.servicer: IngestServicer
        #: The rollup job (None with the feed or the rollup off).
        self.rollup: RollupJob | None = None
        #: What stop() stops, in that order: every part start() built, started or not.
        self._parts: list[Maintenance | Listener | BatchWriter | RollupJob | TenantDirectory] = []

    async def start(self, resources: Resources) -> None:
        assert resources.pool is not None and resources.dsn is not None  # the host gives a schema its database
        config = self.config
        self.store = IngestStore(resources.pool, resources.dsn, feed=config.feed)
        self.writer = BatchWriter(
            self.store,
            group_max_rows=config.group_max_rows,
            group_max_delay=config.group_max_delay,
            queue_max_rows=config.queue_max_rows,
            transaction_timeout=config.transaction_timeout,
        )
        # Any replica's write transaction notifies EVENTS_CHANNEL at commit. Watchers also wake every
        # event_poll_interval whatever happens, the connection is checked as often, and a lost connection
        # ends the writer's idle streams.
        self.hub = Listener(resources.dsn, EVENTS_CHANNEL, poll_interval=config.event_poll_interval,
                            check_interval=config.event_poll_interval, on_lost=self.writer.database_lost,
                            application_name="fabrica-ingest-listen")
        # The committed-readings feed's watchers wait on their own channel (every write transaction notifies
        # it), so that tag-event watchers are not woken by commits without events.
        self.feed_hub = Listener(resources.dsn, FEED_CHANNEL, poll_interval=config.event_poll_interval,
                                 check_interval=config.event_poll_interval,
                                 application_name="fabrica-ingest-feed-listen")
        self.tenant_directory = TenantDirectory(self.settings, interval=config.tenants_poll_interval)
        if config.feed and config.rollup:  # the rollup follows the feed (rollup.py)
            self.rollup = RollupJob(resources.pool, interval=config.rollup_interval)
            self.store.rollups = RollupReader(resources.pool)
        self.maintenance = Maintenance(
            self.store, interval=config.maintenance_interval, ahead=config.partitions_ahead,
            retention_days=config.retention_days,
            feed_retention_hours=config.feed_retention_hours if config.feed else None,
            rollup=self.rollup, tenants=self.tenant_directory,
        )
        self.quotas = TenantQuotas(self.tenant_directory, max_delay=config.quota_max_delay)
        self.servicer = IngestServicer(config, self.store, self.writer, self.hub, self.feed_hub, quotas=self.quotas)
        self._parts = [self.maintenance, *([self.rollup] if self.rollup else []), self.tenant_directory, self.feed_hub,
                       self.hub, self.writer]
        await self.tenant_directory.start()  # polls in the background: start-up never waits for config
        if self.rollup is not None:
            await self.rollup.start()
        await self.maintenance.start()
        await self.writer.start()
        await self.hub.start()
        await self.feed_hub.start()

    def register(self, server: grpc.aio.Server) -> None:
        add_to_server(self.servicer, server)  # StreamReadings keeps each batch's received bytes

    async def stop(self) -> None:
        parts, self._parts = self._parts, []
        for part in parts:
            await part.stop()


def create_app(settings: Settings, config: IngestConfig | None = None) -> IngestApp:
    """The ingest ServiceApp. `config` defaults to the FABRICA_INGEST_* environment variables."""
    return IngestApp(settings, config if config is not None else load_ingest_config())
