"""Demo master data and a running order, for `fabrica run` (through the gRPC API, like any client).

``fabrica run`` calls :func:`create_demo` once config has assigned the simulated press's tag ids; from then on
the collector's readings of the press counter are booked to the demo order, which completes itself at its
planned quantity. Calling it again (a restart on the same data folder) changes nothing that is already
right: it re-binds the work centre if the tag ids changed and starts a new demo order only when none is
running.

Note on the simulator: its ``press.production_count`` counts every part made (good and scrap), so bound as
the production counter the demo books good + scrap as good. Its ``press.scrap_count`` is a 16-bit register
while the production count is 32-bit; a work centre has one counter width, so bind the 32-bit one's width
(the scrap counter then loses one part each time it wraps at 65,536, which the demo never reaches).

The item's ideal cycle time is the press's rated speed, not its running rate: the simulated press makes
2 parts/s while running (plcsim's PlantConfig.rate), and since scrap is counted in both counters the demo's
total count is about 4 % above the parts made. An ideal cycle of 0.5 s (exactly the running rate) therefore
showed a performance of about 103 %, the sign of an ideal cycle time set too slow; 0.45 s (a press rated
2.2 parts/s) shows about 94 %.
"""

from __future__ import annotations

import logging

import grpc
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, field_mask_pb2

log = logging.getLogger(__name__)

SECTOR_ID = "pressing"
WORK_CENTER_ID = "press-1"
ITEM_ID = "BRK-100"
#: The reference type the demo item is grouped under.
REFERENCE_TYPE = md.ReferenceType(id="BRACKETS", display_name="Brackets", description="Pressed steel brackets")
ORDER_PREFIX = "DEMO-"
#: The demo item's ideal cycle time in seconds (see the module docstring).
IDEAL_CYCLE_SECONDS = 0.45

_DEFECT_CODES = [
    md.DefectCode(id="BURR", display_name="Burr", severity=md.SEVERITY_MINOR),
    md.DefectCode(id="CRACK", display_name="Crack", severity=md.SEVERITY_MAJOR),
    md.DefectCode(id="SPLIT", display_name="Split sheet", severity=md.SEVERITY_CRITICAL),
]
_DOWNTIME_REASONS = [
    md.DowntimeReason(id="TOOL", display_name="Tool change", color="#f59e0b", counts_against_availability=True),
    md.DowntimeReason(id="MATERIAL", display_name="No material", color="#ef4444", counts_against_availability=True),
    md.DowntimeReason(id="FAULT", display_name="Machine fault", color="#b91c1c", counts_against_availability=True),
    md.DowntimeReason(id="BREAK", display_name="Break", color="#10b981", counts_against_availability=False),
]
_BINDING_FIELDS = ["plc_id", "production_counter_tag_id", "scrap_counter_tag_id", "machine_state_tag_id",
                   "counter_width"]


async def _create(call, request) -> None:  # noqa: ANN001 - a unary Create* method and its request
    try:
        await call(request)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


async def create_demo(
    stub: pb_grpc.ProductionServiceStub,
    *,
    plc_id: str,
    production_counter_tag_id: int,
    scrap_counter_tag_id: int = 0,
    machine_state_tag_id: int = 0,
    counter_width: int = 32,
    planned_quantity: int = 600,
    ideal_cycle_seconds: float = IDEAL_CYCLE_SECONDS,
) -> order_pb2.Order:
    """Create (or bring up to date) the demo sector, work centre, reference type, item, defect codes and downtime
    reasons,
    and return the work centre's running order, starting a new demo order if none runs."""
    await _create(stub.CreateSector, pb.CreateSectorRequest(sector=md.Sector(id=SECTOR_ID, display_name="Pressing")))
    wanted = md.WorkCenter(
        id=WORK_CENTER_ID, display_name="Press 1", sector_id=SECTOR_ID, plc_id=plc_id,
        production_counter_tag_id=production_counter_tag_id, scrap_counter_tag_id=scrap_counter_tag_id,
        machine_state_tag_id=machine_state_tag_id, counter_width=counter_width)
    try:
        await stub.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=wanted))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        current = (await stub.GetWorkCenter(pb.GetWorkCenterRequest(id=WORK_CENTER_ID))).work_center
        if any(getattr(current, f) != getattr(wanted, f) for f in _BINDING_FIELDS):
            log.info("demo work centre re-bound to the simulator's tags", extra={"plc_id": plc_id})
            wanted.etag = current.etag
            await stub.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
                work_center=wanted, update_mask=field_mask_pb2.FieldMask(paths=_BINDING_FIELDS)))
    cycle = duration_pb2.Duration()
    cycle.FromNanoseconds(round(ideal_cycle_seconds * 1e9))
    await _create(stub.CreateReferenceType, pb.CreateReferenceTypeRequest(reference_type=REFERENCE_TYPE))
    try:
        await stub.CreateItem(pb.CreateItemRequest(item=md.Item(
            id=ITEM_ID, display_name="Mounting bracket", ideal_cycle_time=cycle, reference_type_id=REFERENCE_TYPE.id)))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        item = (await stub.GetItem(pb.GetItemRequest(id=ITEM_ID))).item
        # From a run before the ideal cycle time was corrected, or before items had reference types.
        paths = ([*(["ideal_cycle_time"] if item.ideal_cycle_time != cycle else []),
                  *(["reference_type_id"] if not item.reference_type_id else [])])
        if paths:
            log.info("demo item brought up to date", extra={"item_id": ITEM_ID, "fields": ",".join(paths)})
            await stub.UpdateItem(pb.UpdateItemRequest(
                item=md.Item(id=ITEM_ID, ideal_cycle_time=cycle, reference_type_id=REFERENCE_TYPE.id, etag=item.etag),
                update_mask=field_mask_pb2.FieldMask(paths=paths)))
    for code in _DEFECT_CODES:
        await _create(stub.CreateDefectCode, pb.CreateDefectCodeRequest(defect_code=code))
    for reason in _DOWNTIME_REASONS:
        await _create(stub.CreateDowntimeReason, pb.CreateDowntimeReasonRequest(downtime_reason=reason))

    running = (await stub.ListOrders(pb.ListOrdersRequest(
        work_center_id=WORK_CENTER_ID, states=[order_pb2.ORDER_STATE_IN_PROGRESS]))).orders
    if running:
        return running[0]
    # Newest first: the first demo order listed carries the highest number so far.
    numbers = [o.number for o in (await stub.ListOrders(pb.ListOrdersRequest(
        work_center_id=WORK_CENTER_ID, page_size=500))).orders if o.number.startswith(ORDER_PREFIX)]
    last = max((int(n.removeprefix(ORDER_PREFIX)) for n in numbers if n.removeprefix(ORDER_PREFIX).isdigit()),
               default=0)
    order = (await stub.CreateOrder(pb.CreateOrderRequest(order=order_pb2.Order(
        number=f"{ORDER_PREFIX}{last + 1:04d}", item_id=ITEM_ID, work_center_id=WORK_CENTER_ID,
        planned_quantity=planned_quantity)))).order
    order = (await stub.StartOrder(pb.StartOrderRequest(id=order.id, etag=order.etag))).order
    log.info("demo order started", extra={"order_id": order.id, "number": order.number,
                                          "planned_quantity": planned_quantity})
    return order
