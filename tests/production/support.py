"""Builders and helpers shared by the production tests."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import grpc
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2

from fabrica_svc.production.app import ConsumerOptions
from fabrica_svc.runtime.retry import RetryPolicy
from fabrica_svc.runtime.server import ServiceHost
from grpc_helpers import rich_status
from in_process import settings_for, start_server
from procs import wait_for as _wait_for

#: Tag ids of the default work centre "press-1" (as the config service would have assigned them).
GOOD_TAG, SCRAP_TAG, STATE_TAG = 101, 102, 103


#: The consumer's waits in tests: stand-bys try the lock every 0.1 s, failures retry from 0.05 s up to 0.5 s.
TEST_CONSUMER = ConsumerOptions(standby_interval=0.1, retry=RetryPolicy(initial=0.05, maximum=0.5))


async def start_production(database_url: str, ingest_addr: str = "", config_addr: str = "") -> ServiceHost:
    """A production server (with TEST_CONSUMER) on `database_url`, wired to ingest and config at those
    addresses; the caller stops it."""
    settings = settings_for("production", database_url=database_url, ingest_addr=ingest_addr, config_addr=config_addr)
    return await start_server("production", settings, consumer=TEST_CONSUMER)


def ts(dt: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(dt)
    return out


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    """A time on 2024-03-04 (UTC): fixed, in the past, for hand-computed examples."""
    return datetime(2024, 3, 4, hour, minute, second, tzinfo=UTC)


def precondition_violations(err: grpc.aio.AioRpcError) -> list[error_details_pb2.PreconditionFailure.Violation]:
    out = []
    for detail in rich_status(err).details:
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pf = error_details_pb2.PreconditionFailure()
            detail.Unpack(pf)
            out.extend(pf.violations)
    return out


async def fetchval(database_url: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def execute(database_url: str, sql: str, *args: object) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def wait_for(predicate, *, timeout: float = 20.0, **kw):  # noqa: ANN001, ANN003, ANN201
    """procs.wait_for with this suite's default timeout."""
    return await _wait_for(predicate, timeout=timeout, **kw)


async def seed(stub: pb_grpc.ProductionServiceStub, *, work_center: str = "press-1", tags: Sequence[int] = (
        GOOD_TAG, SCRAP_TAG, STATE_TAG), counter_width: int = 16, max_counter_jump: int = 1000) -> None:
    """A sector, a work centre bound to three tags, two items, a defect code and two downtime reasons."""
    await stub.CreateSector(pb.CreateSectorRequest(sector=md.Sector(id="pressing", display_name="Pressing")))
    good, scrap, state = tags
    await stub.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=md.WorkCenter(
        id=work_center, display_name="Press 1", sector_id="pressing", plc_id="press-plc",
        production_counter_tag_id=good, scrap_counter_tag_id=scrap, machine_state_tag_id=state,
        counter_width=counter_width, max_counter_jump=max_counter_jump)))
    await stub.CreateItem(pb.CreateItemRequest(item=md.Item(
        id="BRK-100", display_name="Bracket", ideal_cycle_time=duration_pb2.Duration(seconds=2))))
    await stub.CreateItem(pb.CreateItemRequest(item=md.Item(
        id="CLP-200", display_name="Clip", ideal_cycle_time=duration_pb2.Duration(seconds=5))))
    await stub.CreateDefectCode(pb.CreateDefectCodeRequest(defect_code=md.DefectCode(
        id="BURR", display_name="Burr", severity=md.SEVERITY_MINOR)))
    await stub.CreateDowntimeReason(pb.CreateDowntimeReasonRequest(downtime_reason=md.DowntimeReason(
        id="TOOL", display_name="Tool change", color="#ff8800", counts_against_availability=True)))
    await stub.CreateDowntimeReason(pb.CreateDowntimeReasonRequest(downtime_reason=md.DowntimeReason(
        id="BREAK", display_name="Break", color="#00aa00", counts_against_availability=False)))


async def new_order(stub: pb_grpc.ProductionServiceStub, number: str = "PO-1", *, planned: int = 100,
                    item: str = "BRK-100", work_center: str = "press-1", start: bool = False) -> order_pb2.Order:
    order = (await stub.CreateOrder(pb.CreateOrderRequest(order=order_pb2.Order(
        number=number, item_id=item, work_center_id=work_center, planned_quantity=planned)))).order
    if start:
        order = (await stub.StartOrder(pb.StartOrderRequest(id=order.id))).order
    return order


async def booked_total(database_url: str, order_id: str, column: str = "good_quantity") -> int:
    return int(await fetchval(database_url, f"SELECT coalesce(sum({column}), 0) FROM production.bookings"
                                            " WHERE order_id = $1", int(order_id)))
