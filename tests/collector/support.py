"""Helpers of the collector tests: PLC definitions for the simulator, in-process collectors, bounded waits, a
poller clock the test moves (TickClock)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2, plc_pb2
from google.protobuf import duration_pb2

from fabrica_svc.collector.app import CollectorApp
from fabrica_svc.collector.config_watch import CONFIG_FILE
from fabrica_svc.collector.poller import Poller
from fabrica_svc.collector.settings import CollectorSettings, load_collector_settings
from fabrica_svc.runtime.server import ServiceHost
from in_process import settings_for, start_server
from procs import wait_for as _wait_for

HOST = "127.0.0.1"
HR = plc_pb2.MODBUS_TABLE_HOLDING_REGISTER
IR = plc_pb2.MODBUS_TABLE_INPUT_REGISTER
COIL = plc_pb2.MODBUS_TABLE_COIL
GOOD = reading_pb2.QUALITY_GOOD
COMM = reading_pb2.QUALITY_COMMUNICATION_FAILURE
DECODE = reading_pb2.QUALITY_DECODE_FAILURE
CONFIG = reading_pb2.QUALITY_CONFIG_ERROR

_ids = itertools.count(1000)


def free_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]



async def wait_for(predicate, *, timeout: float = 10.0, **kw):  # noqa: ANN001, ANN003, ANN201
    """procs.wait_for with this suite's default timeout."""
    return await _wait_for(predicate, timeout=timeout, **kw)


class TickClock:
    """A poller's monotonic clock that moves only when the test moves it, with the sleep that goes with it.

    `sleep(delay)` returns once the clock has been moved at least `delay` past where it was when it was
    called; `sleeps` counts the calls, so a test sees when a poller has finished a poll and waits for its
    next tick. Use intervals that are binary fractions (0.25 s): every tick is then an exact float.
    """

    def __init__(self, t: float = 1024.0) -> None:
        self.t = t
        self.sleeps = 0
        self._moved: list[asyncio.Future[None]] = []

    def __call__(self) -> float:
        return self.t

    def set(self, t: float) -> None:
        assert t >= self.t, "a monotonic clock does not go back"
        self.t = t
        moved, self._moved = self._moved, []
        for waiter in moved:
            if not waiter.done():
                waiter.set_result(None)

    async def sleep(self, delay: float) -> None:
        self.sleeps += 1
        target = self.t + delay
        if self.t >= target:
            await asyncio.sleep(0)
        while self.t < target:
            waiter = asyncio.get_running_loop().create_future()
            self._moved.append(waiter)
            await waiter

    async def tick(self, poller: Poller, to: float | None = None) -> None:
        """Move the clock to the poller's next tick (or to `to`) and wait until it sleeps again: its poll
        for that tick is done."""
        sleeps = self.sleeps
        self.set(min(g.next_due for g in poller.groups) if to is None else to)
        await wait_for(lambda: self.sleeps > sleeps, interval=0.002, what=f"{poller.plc_id} to poll and sleep again")


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def mb_tag(name: str, address: int, data_type: int = plc_pb2.DATA_TYPE_UINT16, *, table: int = HR,
           tag_id: int | None = None, **fields: Any) -> plc_pb2.Tag:
    return plc_pb2.Tag(id=next(_ids) if tag_id is None else tag_id, name=name,
                       modbus=plc_pb2.ModbusAddress(table=table, address=address), data_type=data_type, **fields)


def s7_tag(name: str, offset: int, data_type: int, *, db: int = 1, tag_id: int | None = None,
           **fields: Any) -> plc_pb2.Tag:
    return plc_pb2.Tag(id=next(_ids) if tag_id is None else tag_id, name=name,
                       s7=plc_pb2.S7Address(area=plc_pb2.S7_AREA_DATA_BLOCK, db_number=db, byte_offset=offset),
                       data_type=data_type, **fields)


def plc(plc_id: str, tags: Iterable[plc_pb2.Tag], *, interval: float = 0.1, integrity: float = 60.0,
        timeout: float = 0.5, collector: str = "cell-1", **connection: Any) -> plc_pb2.Plc:
    """A PLC definition; pass exactly one connection, e.g. modbus_tcp=plc_pb2.ModbusTcpConnection(...)."""
    out = plc_pb2.Plc(
        id=plc_id, collector_id=collector, enabled=True,
        poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration(interval),
                                       integrity_interval=duration(integrity))],
        tags=list(tags),
    )
    ((kind, conn),) = connection.items()
    getattr(out, kind).CopyFrom(conn)
    if conn.DESCRIPTOR.fields_by_name.get("timeout"):
        getattr(out, kind).timeout.CopyFrom(duration(timeout))
    return out


def modbus_plc(plc_id: str, port: int, tags: Iterable[plc_pb2.Tag], *, unit: int = 1, **kwargs: Any) -> plc_pb2.Plc:
    return plc(plc_id, tags, modbus_tcp=plc_pb2.ModbusTcpConnection(host=HOST, port=port, unit_id=unit), **kwargs)


def gateway_plc(plc_id: str, port: int, tags: Iterable[plc_pb2.Tag], *, unit: int = 1, **kwargs: Any) -> plc_pb2.Plc:
    return plc(plc_id, tags, modbus_rtu_over_tcp=plc_pb2.ModbusRtuOverTcpConnection(host=HOST, port=port,
                                                                                      unit_id=unit), **kwargs)


def serial_plc(plc_id: str, url: str, tags: Iterable[plc_pb2.Tag], *, unit: int = 1, **kwargs: Any) -> plc_pb2.Plc:
    return plc(plc_id, tags, modbus_rtu=plc_pb2.ModbusRtuConnection(serial_port=url, unit_id=unit), **kwargs)


def s7_plc(plc_id: str, port: int, tags: Iterable[plc_pb2.Tag], **kwargs: Any) -> plc_pb2.Plc:
    return plc(plc_id, tags, s7=plc_pb2.S7Connection(host=HOST, port=port, rack=0, slot=1), **kwargs)


def collector_settings(data_dir: Path, collector_id: str = "cell-1", **env: str) -> CollectorSettings:
    """The collector's settings as `fabrica serve collector` reads them from these variables (`env` on top of
    a fast test profile)."""
    values = {
        "FABRICA_COLLECTOR_ID": collector_id,
        # Nothing listens there unless a test says otherwise.
        "FABRICA_CONFIG_ADDR": f"{HOST}:{free_port()}",
        "FABRICA_INGEST_ADDR": f"{HOST}:{free_port()}",
        "FABRICA_COLLECTOR_RECONNECT_MIN": "0.05",
        "FABRICA_COLLECTOR_RECONNECT_MAX": "0.3",
        "FABRICA_COLLECTOR_BATCH_LATENCY_MS": "50",
        "FABRICA_COLLECTOR_STATUS_INTERVAL": "0.5",
        **env,
    }
    return load_collector_settings(settings_for("collector", values, data_dir=data_dir), values)


def store_config(settings: CollectorSettings, plcs: Iterable[plc_pb2.Plc], revision: int = 1) -> None:
    """Leave a configuration on disk, as a collector that applied it before would have."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    stored = config_service_pb2.WatchPlcsResponse(revision=revision,
                                                  snapshot=config_service_pb2.PlcSnapshot(plcs=list(plcs)))
    (settings.state_dir / CONFIG_FILE).write_bytes(stored.SerializeToString())


async def start_collector(settings: CollectorSettings, **app_args: Any) -> ServiceHost:
    """A collector in process; `app_args` go to its create_app (e.g. poller_options=)."""
    return await start_server("collector", settings.base, config=settings, **app_args)


def app_of(host: ServiceHost) -> CollectorApp:
    return host.app  # type: ignore[return-value]


def spooled(app: CollectorApp) -> list[reading_pb2.ReadingBatch]:
    """Every batch in the collector's log not yet acknowledged (all of them when no ingest runs)."""
    app.batcher.cut()
    spool = app.spool
    return [reading_pb2.ReadingBatch.FromString(p)
            for _, p in spool.read_after(spool.acked, 2**62, 2**62, durable_only=False)]


def readings(app: CollectorApp, tag_id: int | None = None, plc_id: str | None = None) -> list[reading_pb2.Reading]:
    out = [r for b in spooled(app) for r in b.readings]
    if tag_id is not None:
        out = [r for r in out if r.tag_id == tag_id]
    if plc_id is not None:
        out = [r for r in out if r.plc_id == plc_id]
    return out


def value_of(r: reading_pb2.Reading) -> Any:
    kind = r.value.WhichOneof("kind")
    return None if kind is None else getattr(r.value, kind)


async def start_config(database_url: str, port: int = 0) -> ServiceHost:
    """The config service, in process, on the test's database."""
    return await start_server("config", settings_for("config", port=port, database_url=database_url))


async def start_ingest(database_url: str, port: int = 0) -> ServiceHost:
    """The ingest service, in process, on the test's database."""
    return await start_server("ingest", settings_for("ingest", port=port, database_url=database_url))


def key(r: reading_pb2.Reading) -> tuple[int, int, int, Any]:
    """What identifies a stored reading: tag, read time (Postgres keeps microseconds), quality, value."""
    return r.tag_id, r.read_time.ToMicroseconds(), r.quality, value_of(r)


async def stored_readings(address: str, tag_ids: Iterable[int]) -> list[reading_pb2.Reading]:
    """Every reading ingest has of these tags (ExportReadings over all time)."""
    import grpc
    from fabrica.ingest.v1 import ingest_service_pb2 as ipb
    from fabrica.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
    from fabrica.ingest.v1 import query_pb2
    from google.protobuf import timestamp_pb2

    request = ipb.ExportReadingsRequest(filter=query_pb2.ReadingFilter(
        tag_ids=sorted(set(tag_ids)), start_time=timestamp_pb2.Timestamp(seconds=0),
        end_time=timestamp_pb2.Timestamp(seconds=4_000_000_000)))
    out: list[reading_pb2.Reading] = []
    async with grpc.aio.insecure_channel(address) as channel:
        async for chunk in ipb_grpc.IngestServiceStub(channel).ExportReadings(request, timeout=30):
            out.extend(chunk.readings)
    return out


def plc_from_profile(profile: Any, plc_id: str, *, interval: float = 0.05, **connection: Any) -> plc_pb2.Plc:
    """A PLC as CreatePlcFromProfile builds it from `profile` (poll groups and tags copied, ids assigned), with
    every poll group at `interval`, checked by config's own rules. Pass one connection, as to :func:`plc`."""
    from fabrica_svc.config import domain

    out = plc(plc_id, [], **connection)
    del out.poll_groups[:]
    for group in profile.poll_groups:
        out.poll_groups.add().CopyFrom(group)
        out.poll_groups[-1].poll_interval.CopyFrom(duration(interval))
    out.tags.extend(profile.tags)
    out = domain.normalized(out)
    domain.check_plc(out)
    for tag in out.tags:  # config assigns the ids
        tag.id = next(_ids)
    return out


async def settled_readings(plc_def: plc_pb2.Plc, *, timeout: float = 10.0,
                           settled: Any = None) -> dict[str, reading_pb2.Reading]:
    """Poll `plc_def` with the collector's real poller until every tag has reported and the latest readings
    satisfy `settled` (a predicate on {tag name: latest reading}; default: every one GOOD), then stop; the
    latest reading of each tag. The first poll of a device with holes in its map may still fail a block the
    poller then re-plans, so a test of values waits for this state rather than taking the first reading."""
    from fabrica_svc.collector.drivers import BusRegistry, make_driver
    from fabrica_svc.collector.poller import Poller

    names = {t.id: t.name for t in plc_def.tags}
    latest: dict[str, reading_pb2.Reading] = {}
    buses = BusRegistry()
    poller = Poller(plc_def, lambda p: make_driver(p, buses), lambda r: latest.__setitem__(names[r.tag_id], r),
                    backoff_min=0.05, backoff_max=0.2)
    done = settled or (lambda got: all(r.quality == GOOD for r in got.values()))
    poller.start()
    try:
        await wait_for(lambda: len(latest) == len(names) and done(latest), timeout=timeout,
                       what=f"a settled reading of every tag of {plc_def.id}")
    finally:
        await poller.stop()
    return dict(latest)
