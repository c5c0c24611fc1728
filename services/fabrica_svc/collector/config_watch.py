"""Follows the collector's configuration: WatchPlcs from the config service, kept on local disk.

On start the last applied configuration is read from `config.binpb` (a WatchPlcsResponse holding the
revision and a snapshot of every PLC of this collector) and applied at once, so a collector that starts
while the config service is unreachable polls what it polled before. The watch then resumes after that
revision: the config service sends only the changes since (or a fresh snapshot if it cannot resume).
After each applied message the file is rewritten atomically, so the stored revision always matches the
stored PLCs; a crash between applying and writing only means the same changes are applied again.

After each applied configuration (the stored one at start included) `on_applied` gets every PLC of it: the
collector's TagSync then tells ingest the names and units of its tags (collector/tag_sync.py).

The applied revision and the status of each PLC go back with ReportCollectorStatus shortly after each
change and every `status_interval` seconds. Both streams reconnect with backoff and jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from fabrica.config.v1 import collector_status_pb2, config_service_pb2, config_service_pb2_grpc, plc_pb2
from google.protobuf.message import DecodeError

from ..clients.errors import error_details
from ..runtime.channels import PEER_CHANNEL_OPTIONS
from ..runtime.telemetry import client_interceptors
from ..runtime.retry import RetryPolicy
from .files import atomic_write
from .supervisor import PlcSupervisor

log = logging.getLogger(__name__)

CONFIG_FILE = "config.binpb"
#: Changes usually come in bursts (a script updating many PLCs): report once they settle.
REPORT_DELAY = 0.2


class ConfigWatcher:
    def __init__(self, target: str, collector_id: str, supervisor: PlcSupervisor, state_dir: Path, *,
                 backoff_min: float = 0.5, backoff_max: float = 30.0, status_interval: float = 15.0,
                 on_applied: Callable[[Iterable[plc_pb2.Plc]], None] | None = None):
        self.target = target
        self.collector_id = collector_id
        self.supervisor = supervisor
        self.path = state_dir / CONFIG_FILE
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.status_interval = status_interval
        self.on_applied = on_applied
        #: The configuration revision applied (0: none yet).
        self.revision = 0
        self.connected = False
        #: Snapshots received (a resumed watch gets only changes) and status reports sent.
        self.snapshots = 0
        self.reports = 0
        self._report_now = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def load(self) -> bool:
        """Apply the configuration kept on disk, if any. True when there was one."""
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return False
        try:
            stored = config_service_pb2.WatchPlcsResponse.FromString(data)
        except DecodeError as exc:
            log.error("the stored configuration %s is unreadable (%s); waiting for the config service", self.path, exc)
            return False
        await self.supervisor.apply_snapshot(stored.snapshot.plcs)
        self.revision = stored.revision
        self._applied()
        log.info("applied the stored configuration", extra={"revision": self.revision, "plcs": len(stored.snapshot.plcs)})
        return True

    def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=PEER_CHANNEL_OPTIONS, interceptors=client_interceptors())
        stub = config_service_pb2_grpc.ConfigServiceStub(self._channel)
        self._tasks = [
            asyncio.create_task(self._watch(stub), name="config-watch"),
            asyncio.create_task(self._report_loop(stub), name="config-report"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    async def _watch(self, stub: config_service_pb2_grpc.ConfigServiceStub) -> None:
        backoff = RetryPolicy(self.backoff_min, self.backoff_max).backoff()
        while True:
            call = stub.WatchPlcs(config_service_pb2.WatchPlcsRequest(collector_id=self.collector_id,
                                                                      after_revision=self.revision))
            try:
                async for message in call:
                    if not self.connected:
                        log.info("watching the configuration", extra={"after_revision": self.revision})
                    self.connected = True
                    backoff.reset()
                    await self._apply(message)
                error = "the config service ended the watch"
            except grpc.aio.AioRpcError as exc:
                error = str(error_details(exc))  # code, message, ErrorInfo reason, field violations
            except Exception as exc:  # a bug applying a change: keep watching (and applying) anyway
                log.exception("applying a configuration change failed")
                error = f"{type(exc).__name__}: {exc}"
            finally:
                call.cancel()
            self.connected = False
            delay = backoff.next_delay()
            log.log(logging.INFO if backoff.failures == 1 else logging.DEBUG,
                    "configuration watch interrupted (%s); reconnecting in %.1f s", error, delay)
            await asyncio.sleep(delay)

    async def _apply(self, message: config_service_pb2.WatchPlcsResponse) -> None:
        kind = message.WhichOneof("event")
        if kind == "snapshot":
            self.snapshots += 1
            await self.supervisor.apply_snapshot(message.snapshot.plcs)
        elif kind == "change":
            change = message.change
            if change.type == config_service_pb2.CHANGE_TYPE_UPSERT:
                await self.supervisor.upsert(change.plc)
            elif change.type == config_service_pb2.CHANGE_TYPE_DELETE:
                await self.supervisor.remove(change.plc_id)
        self.revision = message.revision
        self._applied()
        await self._persist()
        self._report_now.set()

    def _applied(self) -> None:
        if self.on_applied is not None:
            self.on_applied(self.supervisor.definitions.values())

    async def _persist(self) -> None:
        stored = config_service_pb2.WatchPlcsResponse(
            revision=self.revision,
            snapshot=config_service_pb2.PlcSnapshot(plcs=list(self.supervisor.definitions.values())),
        )
        try:
            await asyncio.to_thread(atomic_write, self.path, stored.SerializeToString())
        except OSError as exc:
            log.error("cannot keep the configuration on disk: %s", exc)

    def status_request(self) -> config_service_pb2.ReportCollectorStatusRequest:
        return config_service_pb2.ReportCollectorStatusRequest(
            collector_id=self.collector_id,
            applied_revision=self.revision,
            plc_statuses=[
                collector_status_pb2.PlcStatus(plc_id=s.plc_id, connected=s.connected, error=s.error)
                for s in self.supervisor.statuses()
            ],
        )

    async def _report_loop(self, stub: config_service_pb2_grpc.ConfigServiceStub) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.status_interval):
                    await self._report_now.wait()
                    await asyncio.sleep(REPORT_DELAY)
            self._report_now.clear()
            try:
                await stub.ReportCollectorStatus(self.status_request(), timeout=max(1.0, min(10.0, self.status_interval)))
                self.reports += 1
            except grpc.aio.AioRpcError as exc:
                log.debug("status report failed: %s", error_details(exc))
            except Exception:  # never let a bug end the reports
                log.exception("status report failed")
