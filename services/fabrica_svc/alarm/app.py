"""Wires the alarm service from its Settings (as every Fabrica service: ``start()`` builds the parts and
passes them in constructors, ``register()`` adds the servicer, ``stop()`` stops what ``start()`` built).

* ``settings.ingest_addr`` (FABRICA_INGEST_ADDR): where the evaluation, and the readings forwarding, read
  ingest's committed readings. Unset: rules, alarms and operator actions work, nothing is evaluated or
  forwarded (said once at start).
* ``settings.config_addr`` (FABRICA_CONFIG_ADDR): rules' PLCs and tags are checked there (in the request's
  tenant). Unset: not checked. The tenant directory (runtime/tenants.py) polls config's tenants there too: the
  callers of a suspended tenant are refused (TENANT_INACTIVE).
* FABRICA_ALARM_* (config.py): the evaluator's tick and live window.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from fabrica.alarm.v1 import alarm_service_pb2, alarm_service_pb2_grpc

from ..runtime import tenancy
from ..runtime.channels import peer_channel
from ..runtime.notify import TenantListener
from ..runtime.server import Resources
from ..runtime.settings import Settings
from ..runtime.tenants import TenantDirectory
from .config import AlarmConfig, load_alarm_config
from .evaluation import Evaluation, EvaluationOptions, ReadingSource
from .notify.forwarding import ForwardingSupervisor
from .notify.webhook import WebhookDispatcher
from .outbox import WebhookOutbox
from .rules import ConfigTagCatalog, NoTagCatalog, TagCatalog
from .service import AlarmService
from .servicer import AlarmServicer, decode_rule
from .store import CHANNEL, MIGRATIONS

log = logging.getLogger(__name__)

SERVICE_NAME = alarm_service_pb2.DESCRIPTOR.services_by_name["AlarmService"].full_name


class _Channel:
    """A channel to config or ingest (runtime/channels.peer_channel: TLS, the service's token, tracing)."""

    def __init__(self, address: str, settings: Settings, tenant: str | None = None):
        self.channel = peer_channel(address, settings, tenant=tenant)

    async def stop(self) -> None:
        await self.channel.close()


class AlarmApp:
    name = "alarm"
    service_names = (SERVICE_NAME,)
    schema = "alarm"
    migrations = MIGRATIONS

    def __init__(self, settings: Settings, config: AlarmConfig, source: ReadingSource | None = None):
        self.settings = settings
        self.config = config
        #: Where readings come from: given by a test, else built from settings.ingest_addr in start().
        self.source = source
        self.listener: TenantListener
        self.service: AlarmService
        self.servicer: AlarmServicer
        self.evaluation: Evaluation | None = None
        self.dispatcher: WebhookDispatcher
        #: Which tenants are suspended, as config last said (the host refuses their callers by it).
        self.tenant_directory: TenantDirectory
        #: Readings forwarding (notify/forwarding.py): only with an ingest to read from.
        self.forwarding: ForwardingSupervisor | None = None
        self._parts: list[Any] = []

    def _ingest_source(self, channel: grpc.aio.Channel) -> ReadingSource | None:
        from .readings import ingest_readings  # noqa: PLC0415 - the stream client of ingest's contract

        return ingest_readings(channel)

    async def start(self, resources: Resources) -> None:
        assert resources.pool is not None and resources.dsn is not None
        settings = self.settings
        catalog: TagCatalog = NoTagCatalog()
        channels: list[_Channel] = []
        if settings.config_addr:
            channels.append(_Channel(settings.config_addr, settings))
            catalog = ConfigTagCatalog(channels[-1].channel)
        else:
            log.info("FABRICA_CONFIG_ADDR is not set: the PLCs and tags of alarm rules are not checked")
        source = self.source
        if source is None and settings.ingest_addr:
            # The evaluation reads every tenant's committed readings, each batch naming its tenant.
            channels.append(_Channel(settings.ingest_addr, settings, tenant=tenancy.ALL))
            source = self._ingest_source(channels[-1].channel)
        self.listener = TenantListener(resources.dsn, CHANNEL, application_name="fabrica-alarm-listen")
        outbox = WebhookOutbox()
        self.service = AlarmService(resources.pool, outbox)
        self.servicer = AlarmServicer(self.service, catalog, self.listener, resources.pool)
        if source is not None:
            options = EvaluationOptions(tick_interval=self.config.tick_interval, live_window=self.config.live_window,
                                        group_messages=self.config.group_messages,
                                        group_readings=self.config.group_readings)
            self.evaluation = Evaluation(resources.dsn, source, decode_rule, options=options, outbox=outbox)
        else:
            log.info("FABRICA_INGEST_ADDR is not set: alarm rules are not evaluated")
        self.dispatcher = WebhookDispatcher(resources.pool, resources.dsn)
        if settings.ingest_addr:
            self.forwarding = ForwardingSupervisor(resources.pool, resources.dsn, settings.ingest_addr, settings=settings)
        self.tenant_directory = TenantDirectory(settings)
        self._parts = [*([self.evaluation] if self.evaluation else []), *([self.forwarding] if self.forwarding else []),
                       self.dispatcher, self.listener, self.tenant_directory, *channels]
        await self.tenant_directory.start()  # polls in the background: start-up never waits for config
        await self.listener.start()
        await self.dispatcher.start()
        if self.forwarding:
            await self.forwarding.start()
        if self.evaluation:
            await self.evaluation.start()

    def register(self, server: grpc.aio.Server) -> None:
        alarm_service_pb2_grpc.add_AlarmServiceServicer_to_server(self.servicer, server)

    async def stop(self) -> None:
        parts, self._parts = self._parts, []
        for part in parts:
            await part.stop()


def create_app(settings: Settings, *, config: AlarmConfig | None = None, source: ReadingSource | None = None,
               ingest_addr: str | None = None) -> AlarmApp:
    """The alarm service from `settings`; `config` defaults to FABRICA_ALARM_*; `source` (tests) replaces the
    readings stream of ingest; `ingest_addr`, if given, replaces ``settings.ingest_addr``."""
    if ingest_addr is not None:
        settings = settings.with_overrides(ingest_addr=ingest_addr)
    return AlarmApp(settings, config if config is not None else load_alarm_config(), source)
