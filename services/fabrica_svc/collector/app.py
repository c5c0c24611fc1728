"""Wires the collector: settings, the spool, the batcher, the pollers, the config watch, the uplink, the admin API.

``fabrica serve collector`` calls `create_app(settings)`; the shared ServiceHost runs the gRPC server
(CollectorService, health, reflection, metrics). As in every Fabrica service, the host's ``start()`` call
builds the parts from the settings (CollectorSettings) and passes them to the servicer, and ``register()``
adds that servicer to the gRPC server. The collector has no database: its state lives under
``FABRICA_DATA_DIR/collector/<collector id>/`` (see settings.py), locked against a second process.

Data flow: pollers -> Batcher -> Spool (on disk) -> Uplink -> ingest. Beside it, after each applied
configuration, TagSync sends ingest the names and units of the collector's tags (collector/tag_sync.py). Shutdown stops the pollers first and
cuts the last batch into the spool, so nothing polled is left only in memory; what ingest has not
acknowledged is sent after the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from fabrica.collector.v1 import collector_service_pb2, collector_service_pb2_grpc
from fabrica.config.v1 import plc_pb2

from ..runtime.db import Migration
from ..runtime.retry import RetryPolicy
from ..runtime.server import Resources
from ..runtime.settings import Settings
from .batcher import Batcher
from .config_watch import ConfigWatcher
from .drivers import BusRegistry
from .files import DirectoryLock
from .metrics import CollectorFigures, PollMetrics, SpoolFigures, register_spool, unregister_spool
from .servicer import CollectorServicer, own_tenant
from .settings import CollectorSettings, load_collector_settings
from .spool import Spool
from .supervisor import PlcSupervisor
from .tag_sync import TagSync
from .uplink import Uplink

log = logging.getLogger(__name__)

SERVICE_NAME = collector_service_pb2.DESCRIPTOR.services_by_name["CollectorService"].full_name


class CollectorApp:
    name = "collector"
    service_names: Sequence[str] = (SERVICE_NAME,)
    schema: str | None = None
    migrations: Sequence[Migration] = ()

    def __init__(self, settings: Settings, config: CollectorSettings,
                 poller_options: Callable[[plc_pb2.Plc], dict[str, Any]] | None = None):
        self.settings = settings
        self.config = config
        self.poller_options = poller_options  # for tests: see PlcSupervisor
        self.collector_id = config.collector_id
        self._lock: DirectoryLock | None = None
        # Built by start():
        self.spool: Spool
        self.batcher: Batcher
        self.buses: BusRegistry
        self.supervisor: PlcSupervisor
        self.watcher: ConfigWatcher
        self.uplink: Uplink
        self.tag_sync: TagSync
        self.servicer: CollectorServicer
        self._started: list[str] = []

    async def start(self, resources: Resources) -> None:
        cfg = self.config
        state_dir = cfg.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = DirectoryLock(state_dir)
        self._lock.acquire()
        self._started.append("lock")

        self.spool = Spool(state_dir / "spool", cfg.log_max_bytes)
        self.spool.open()
        await self.spool.start()
        self._started.append("spool")
        register_spool(self)

        self.batcher = Batcher(cfg.collector_id, self.spool, max_readings=cfg.batch_size, max_latency=cfg.batch_latency)
        self.buses = BusRegistry()
        self.supervisor = PlcSupervisor(cfg.collector_id, self.batcher.add, self.buses, backoff_min=cfg.reconnect_min,
                                        backoff_max=cfg.reconnect_max, metrics=PollMetrics(),
                                        freeze_gc=self.settings.sole_service, poller_options=self.poller_options,
                                        reach=cfg.reach)
        self._started.append("supervisor")
        self.tag_sync = TagSync(cfg.ingest_addr, cfg.collector_id,
                                retry=RetryPolicy(cfg.reconnect_min, cfg.reconnect_max), settings=self.settings)
        self.tag_sync.start()
        self._started.append("tag_sync")
        self.watcher = ConfigWatcher(cfg.config_addr, cfg.collector_id, self.supervisor, state_dir,
                                     backoff_min=cfg.reconnect_min, backoff_max=cfg.reconnect_max,
                                     status_interval=cfg.status_interval, on_applied=self.tag_sync.update,
                                     settings=self.settings)
        await self.watcher.load()
        self.watcher.start()
        self._started.append("watcher")

        self.uplink = Uplink(cfg.ingest_addr, cfg.collector_id, self.spool, state_dir,
                             backoff_min=cfg.reconnect_min, backoff_max=cfg.reconnect_max, settings=self.settings)
        self.uplink.start()
        self._started.append("uplink")
        self.servicer = CollectorServicer(cfg.collector_id, spool=self.spool, supervisor=self.supervisor,
                                          watcher=self.watcher, uplink=self.uplink, buses=self.buses, reach=cfg.reach,
                                          tenant=own_tenant(self.settings))
        log.info("collector started", extra={"collector_id": cfg.collector_id, "state_dir": str(state_dir),
                                             "config": cfg.config_addr, "ingest": cfg.ingest_addr})

    def register(self, server: grpc.aio.Server) -> None:
        collector_service_pb2_grpc.add_CollectorServiceServicer_to_server(self.servicer, server)

    async def stop(self) -> None:
        started = self._started
        if "watcher" in started:
            await self.watcher.stop()
        if "supervisor" in started:
            await self.supervisor.stop_all()
            self.batcher.close()
        if "uplink" in started:
            await self.uplink.stop()
        if "tag_sync" in started:
            await self.tag_sync.stop()
        if "spool" in started:
            unregister_spool(self)
            await self.spool.close()
        if self._lock is not None:
            self._lock.release()
        self._started = []

    def spool_figures(self) -> SpoolFigures:
        return SpoolFigures.of(self.spool)

    def collector_figures(self) -> CollectorFigures:
        stats = self.uplink.stats
        plcs = {}
        for plc_id, poller in self.supervisor.pollers.items():
            status = poller.status
            interval = min((g.interval for g in poller.groups), default=0.0)
            plcs[plc_id] = (status.connected, status.last_good_read_ns / 1e9, interval)
        return CollectorFigures(
            uplink_connected=self.uplink.connected, readings_sent=stats.readings_written if stats else 0,
            batches_written=stats.batches_written if stats else 0,
            batches_duplicate=stats.batches_duplicate if stats else 0,
            config_connected=self.watcher.connected, config_revision=self.watcher.revision, plcs=plcs)


def create_app(settings: Settings, config: CollectorSettings | None = None, *,
               poller_options: Callable[[plc_pb2.Plc], dict[str, Any]] | None = None) -> CollectorApp:
    """The collector ServiceApp. `config` defaults to the id and peers in `settings` plus the FABRICA_COLLECTOR_*
    environment variables; `poller_options` (tests) gives extra Poller arguments per PLC."""
    return CollectorApp(settings, config if config is not None else load_collector_settings(settings),
                        poller_options)
