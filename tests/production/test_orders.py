"""Orders, manual bookings, defects and downtime over gRPC: life cycle, illegal transitions, errors with
details, idempotent creates, and nothing half-written."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from fabrica.production.v1 import order_pb2
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc

from grpc_helpers import error_info, field_violations

from .support import at, booked_total, fetchval, new_order, precondition_violations, seed, ts

Code = grpc.StatusCode
S = order_pb2


@pytest.fixture
async def seeded(stub: pb_grpc.ProductionServiceStub) -> pb_grpc.ProductionServiceStub:
    await seed(stub)
    return stub


async def count(database_url: str, table: str) -> int:
    return int(await fetchval(database_url, f"SELECT count(*) FROM production.{table}"))


async def test_order_life_cycle(seeded: pb_grpc.ProductionServiceStub) -> None:
    stub = seeded
    created = await new_order(stub, "PO-1", planned=50)
    assert created.id and created.state == S.ORDER_STATE_PLANNED and created.etag
    assert not created.HasField("start_time") and not created.HasField("end_time")
    assert (created.good_quantity, created.scrap_quantity) == (0, 0)
    assert (await stub.GetOrder(pb.GetOrderRequest(id=created.id))).order == created

    started = (await stub.StartOrder(pb.StartOrderRequest(id=created.id, etag=created.etag))).order
    assert started.state == S.ORDER_STATE_IN_PROGRESS and started.HasField("start_time")
    assert started.etag != created.etag
    paused = (await stub.PauseOrder(pb.PauseOrderRequest(id=created.id))).order
    assert paused.state == S.ORDER_STATE_PAUSED
    resumed = (await stub.ResumeOrder(pb.ResumeOrderRequest(id=created.id))).order
    assert resumed.state == S.ORDER_STATE_IN_PROGRESS
    assert resumed.start_time == started.start_time, "start_time is the first start"
    done = (await stub.CompleteOrder(pb.CompleteOrderRequest(id=created.id))).order
    assert done.state == S.ORDER_STATE_COMPLETED and done.HasField("end_time")
    assert done.end_time.ToNanoseconds() >= done.start_time.ToNanoseconds()

    second = await new_order(stub, "PO-2")
    cancelled = (await stub.CancelOrder(pb.CancelOrderRequest(id=second.id, reason="customer withdrew"))).order
    assert cancelled.state == S.ORDER_STATE_CANCELLED and cancelled.HasField("end_time")
    third = await new_order(stub, "PO-3", item="CLP-200")

    listed = (await stub.ListOrders(pb.ListOrdersRequest())).orders
    assert [o.number for o in listed] == ["PO-3", "PO-2", "PO-1"], "newest first"
    open_only = (await stub.ListOrders(pb.ListOrdersRequest(states=[S.ORDER_STATE_PLANNED]))).orders
    assert [o.id for o in open_only] == [third.id]
    page1 = await stub.ListOrders(pb.ListOrdersRequest(page_size=2, work_center_id="press-1"))
    page2 = await stub.ListOrders(pb.ListOrdersRequest(page_size=2, work_center_id="press-1",
                                                       page_token=page1.next_page_token))
    assert [o.number for o in [*page1.orders, *page2.orders]] == ["PO-3", "PO-2", "PO-1"]
    assert page2.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a token of another filter
        await stub.ListOrders(pb.ListOrdersRequest(page_token=page1.next_page_token))
    assert err.value.code() == Code.INVALID_ARGUMENT and "page_token" in field_violations(err.value)


# (state to bring the order to, action, RPC) for every transition the state machine forbids.
ILLEGAL = [
    ("planned", "pause"), ("planned", "resume"), ("planned", "complete"),
    ("in_progress", "start"), ("in_progress", "resume"),
    ("paused", "start"), ("paused", "pause"),
    ("completed", "start"), ("completed", "pause"), ("completed", "resume"), ("completed", "complete"),
    ("completed", "cancel"),
    ("cancelled", "start"), ("cancelled", "resume"), ("cancelled", "complete"), ("cancelled", "cancel"),
]


async def _call(stub: pb_grpc.ProductionServiceStub, action: str, order_id: str) -> order_pb2.Order:
    name = action.capitalize()
    req = getattr(pb, f"{name}OrderRequest")(id=order_id)
    return (await getattr(stub, f"{name}Order")(req)).order


async def test_illegal_transitions_are_failed_precondition_with_details(seeded: pb_grpc.ProductionServiceStub,
                                                                        database_url: str) -> None:
    paths = {"planned": [], "in_progress": ["start"], "paused": ["start", "pause"],
             "completed": ["start", "complete"], "cancelled": ["cancel"]}
    for n, (state, action) in enumerate(ILLEGAL):
        order = await new_order(seeded, f"ILL-{n}")
        for step in paths[state]:
            order = await _call(seeded, step, order.id)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(seeded, action, order.id)
        case = f"{action} when {state}"
        assert err.value.code() == Code.FAILED_PRECONDITION, case
        info = error_info(err.value)
        assert info.reason == "ORDER_STATE_INVALID" and info.metadata["action"] == action, case
        [v] = precondition_violations(err.value)
        assert (v.type, v.subject) == ("ORDER_STATE", f"orders/{order.id}"), case
        assert state.upper() in v.description, case
        assert (await seeded.GetOrder(pb.GetOrderRequest(id=order.id))).order == order, f"{case}: unchanged"
        if state == "in_progress":
            await _call(seeded, "complete", order.id)  # free the work centre for the next case
    # Nothing but the legal steps was written: one run per start, closed by the complete.
    assert await fetchval(database_url, "SELECT count(*) FROM production.order_runs WHERE end_time IS NULL") == 0


async def test_one_running_order_per_work_center(seeded: pb_grpc.ProductionServiceStub) -> None:
    stub = seeded
    a = await new_order(stub, "A", start=True)
    b = await new_order(stub, "B")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartOrder(pb.StartOrderRequest(id=b.id))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert error_info(err.value).reason == "WORK_CENTER_BUSY"
    [v] = precondition_violations(err.value)
    assert (v.type, v.subject) == ("WORK_CENTER_BUSY", "workCenters/press-1") and "'A'" in v.description
    assert (await stub.GetOrder(pb.GetOrderRequest(id=b.id))).order.state == S.ORDER_STATE_PLANNED

    await stub.PauseOrder(pb.PauseOrderRequest(id=a.id))
    await stub.StartOrder(pb.StartOrderRequest(id=b.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # resuming A while B runs
        await stub.ResumeOrder(pb.ResumeOrderRequest(id=a.id))
    assert err.value.code() == Code.FAILED_PRECONDITION and error_info(err.value).reason == "WORK_CENTER_BUSY"
    await stub.CompleteOrder(pb.CompleteOrderRequest(id=b.id))

    # Many starts at once on one work centre: exactly one wins.
    orders = [await new_order(stub, f"RACE-{i}") for i in range(6)]
    results = await asyncio.gather(*(stub.StartOrder(pb.StartOrderRequest(id=o.id)) for o in orders),
                                   return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 5
    assert all(e.code() == Code.FAILED_PRECONDITION for e in losers)
    running = (await stub.ListOrders(pb.ListOrdersRequest(states=[S.ORDER_STATE_IN_PROGRESS]))).orders
    assert [o.id for o in running] == [winners[0].order.id]


async def test_create_order_errors_and_idempotency(seeded: pb_grpc.ProductionServiceStub,
                                                   database_url: str) -> None:
    stub = seeded
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateOrder(pb.CreateOrderRequest(order=S.Order(
            number="X", item_id="NOPE", work_center_id="nope", planned_quantity=1)))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert {(v.type, v.subject) for v in precondition_violations(err.value)} == {
        ("ITEM", "items/NOPE"), ("WORK_CENTER", "workCenters/nope")}

    for order, field in [
        (S.Order(number="X", item_id="BRK-100", work_center_id="press-1", planned_quantity=0),
         "order.planned_quantity"),
        (S.Order(number="", item_id="BRK-100", work_center_id="press-1", planned_quantity=1), "order.number"),
        (S.Order(number="X", item_id="BRK-100", planned_quantity=1), "order.work_center_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateOrder(pb.CreateOrderRequest(order=order))
        assert err.value.code() == Code.INVALID_ARGUMENT and field in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateOrder(pb.CreateOrderRequest())
    assert err.value.code() == Code.INVALID_ARGUMENT and "order" in field_violations(err.value)
    assert await count(database_url, "orders") == 0

    request_id = "5b0d7c6e-1f2a-4b3c-9d8e-7f6a5b4c3d2e"
    req = pb.CreateOrderRequest(request_id=request_id, order=S.Order(
        number="PO-9", item_id="BRK-100", work_center_id="press-1", planned_quantity=10,
        state=S.ORDER_STATE_COMPLETED, good_quantity=99))  # output-only fields are ignored
    first = (await stub.CreateOrder(req)).order
    assert first.state == S.ORDER_STATE_PLANNED and first.good_quantity == 0
    again = (await stub.CreateOrder(req)).order
    assert again == first, "a retried create answers what the first one made"
    with pytest.raises(grpc.aio.AioRpcError) as err:  # same number, no key: a second order would clash
        await stub.CreateOrder(pb.CreateOrderRequest(order=req.order))
    assert err.value.code() == Code.ALREADY_EXISTS
    assert await count(database_url, "orders") == 1

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartOrder(pb.StartOrderRequest(id=first.id, etag="r0"))
    assert err.value.code() == Code.ABORTED and error_info(err.value).reason == "ETAG_MISMATCH"
    for bad_id in ("abc", "999999", "-1"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetOrder(pb.GetOrderRequest(id=bad_id))
        assert err.value.code() == Code.NOT_FOUND


async def test_manual_bookings(seeded: pb_grpc.ProductionServiceStub, database_url: str) -> None:
    stub = seeded
    order = await new_order(stub, planned=40, start=True)
    b1 = (await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(
        order_id=order.id, good_quantity=30, scrap_quantity=2, note="shift 1"),
        request_id="0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"))).booking
    assert b1.source == S.BOOKING_SOURCE_MANUAL and b1.HasField("book_time") and b1.note == "shift 1"
    again = (await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(
        order_id=order.id, good_quantity=30, scrap_quantity=2, note="shift 1"),
        request_id="0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"))).booking
    assert again == b1, "the retry was not booked again"
    await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id=order.id, good_quantity=-5,
                                                                       note="miscounted")))
    got = (await stub.GetOrder(pb.GetOrderRequest(id=order.id))).order
    assert (got.good_quantity, got.scrap_quantity, got.state) == (25, 2, S.ORDER_STATE_IN_PROGRESS)

    # A correction below zero is refused whole.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id=order.id, good_quantity=-26)))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert [v.type for v in precondition_violations(err.value)] == ["QUANTITY"]

    invalid = [
        (S.Booking(order_id=order.id), "booking.good_quantity"),
        (S.Booking(order_id=order.id, scrap_quantity=-1), "booking.scrap_quantity"),
        (S.Booking(good_quantity=1), "booking.order_id"),
        (S.Booking(order_id=order.id, good_quantity=1, source=S.BOOKING_SOURCE_COUNTER), "booking.source"),
        (S.Booking(order_id=order.id, good_quantity=100_000_001), "booking.good_quantity"),
        (S.Booking(order_id=order.id, good_quantity=1, note="x" * 1001), "booking.note"),
    ]
    for booking, field in invalid:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateBooking(pb.CreateBookingRequest(booking=booking))
        assert err.value.code() == Code.INVALID_ARGUMENT and field in field_violations(err.value), field
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id="4242", good_quantity=1)))
    assert err.value.code() == Code.NOT_FOUND
    assert await count(database_url, "bookings") == 2

    # Reaching the planned quantity completes the order in the same transaction.
    await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id=order.id, good_quantity=15)))
    done = (await stub.GetOrder(pb.GetOrderRequest(id=order.id))).order
    assert (done.state, done.good_quantity) == (S.ORDER_STATE_COMPLETED, 40) and done.HasField("end_time")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id=order.id, good_quantity=1)))
    assert err.value.code() == Code.FAILED_PRECONDITION and error_info(err.value).reason == "ORDER_CLOSED"
    assert await booked_total(database_url, order.id) == 40

    page1 = await stub.ListBookings(pb.ListBookingsRequest(order_id=order.id, page_size=2))
    page2 = await stub.ListBookings(pb.ListBookingsRequest(order_id=order.id, page_size=2,
                                                           page_token=page1.next_page_token))
    assert [b.good_quantity for b in [*page1.bookings, *page2.bookings]] == [30, -5, 15], "oldest first"
    assert page2.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListBookings(pb.ListBookingsRequest(order_id="4242"))
    assert err.value.code() == Code.NOT_FOUND

    # A planned order takes bookings (e.g. parts made in a trial run) but does not complete from them.
    planned = await new_order(stub, "PO-P", planned=5)
    await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id=planned.id, good_quantity=5)))
    assert (await stub.GetOrder(pb.GetOrderRequest(id=planned.id))).order.state == S.ORDER_STATE_PLANNED


async def test_defects(seeded: pb_grpc.ProductionServiceStub, database_url: str) -> None:
    stub = seeded
    order = await new_order(stub, start=True)
    key = "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"
    d1 = (await stub.CreateDefect(pb.CreateDefectRequest(request_id=key, defect=S.Defect(
        order_id=order.id, defect_code_id="BURR", quantity=3, note="left edge")))).defect
    assert d1.id and d1.HasField("create_time") and (d1.quantity, d1.note) == (3, "left edge")
    assert (await stub.CreateDefect(pb.CreateDefectRequest(request_id=key, defect=S.Defect(
        order_id=order.id, defect_code_id="BURR", quantity=3)))).defect == d1
    await stub.CreateDefect(pb.CreateDefectRequest(defect=S.Defect(order_id=order.id, defect_code_id="BURR",
                                                                   quantity=1)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateDefect(pb.CreateDefectRequest(defect=S.Defect(order_id=order.id, defect_code_id="CRACK",
                                                                       quantity=1)))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert [(v.type, v.subject) for v in precondition_violations(err.value)] == [("DEFECT_CODE", "defectCodes/CRACK")]
    for defect, field in [(S.Defect(order_id=order.id, defect_code_id="BURR"), "defect.quantity"),
                          (S.Defect(order_id=order.id, quantity=1), "defect.defect_code_id")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateDefect(pb.CreateDefectRequest(defect=defect))
        assert err.value.code() == Code.INVALID_ARGUMENT and field in field_violations(err.value)
    listed = (await stub.ListDefects(pb.ListDefectsRequest(order_id=order.id))).defects
    assert [d.quantity for d in listed] == [3, 1]
    assert await count(database_url, "defects") == 2


async def test_manual_downtime_classification_and_listing(seeded: pb_grpc.ProductionServiceStub,
                                                          database_url: str) -> None:
    stub = seeded

    async def down(start: datetime, end: datetime | None = None, **kw: str) -> order_pb2.Downtime:
        d = S.Downtime(work_center_id="press-1", start_time=ts(start), **kw)
        if end is not None:
            d.end_time.CopyFrom(ts(end))
        return (await stub.CreateDowntime(pb.CreateDowntimeRequest(downtime=d))).downtime

    first = await down(at(8), at(8, 20), reason_id="BREAK", note="lunch")
    assert (first.automatic, first.reason_id, first.order_id) == (False, "BREAK", "")
    second = await down(at(9), at(9, 5))
    third = await down(at(10))  # still open
    assert not third.HasField("end_time")

    for d, field in [
        (S.Downtime(work_center_id="press-1", start_time=ts(at(9)), end_time=ts(at(8))), "downtime.end_time"),
        (S.Downtime(work_center_id="press-1", start_time=ts(at(9)), end_time=ts(at(9))), "downtime.end_time"),
        (S.Downtime(work_center_id="press-1"), "downtime.start_time"),
        (S.Downtime(start_time=ts(at(9))), "downtime.work_center_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateDowntime(pb.CreateDowntimeRequest(downtime=d))
        assert err.value.code() == Code.INVALID_ARGUMENT and field in field_violations(err.value), field
    for d, subject in [
        (S.Downtime(work_center_id="nope", start_time=ts(at(9))), "workCenters/nope"),
        (S.Downtime(work_center_id="press-1", start_time=ts(at(9)), reason_id="NOPE"), "downtimeReasons/NOPE"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateDowntime(pb.CreateDowntimeRequest(downtime=d))
        assert err.value.code() == Code.FAILED_PRECONDITION
        assert precondition_violations(err.value)[0].subject == subject
    assert await count(database_url, "downtimes") == 3

    classified = (await stub.ClassifyDowntime(pb.ClassifyDowntimeRequest(id=second.id, reason_id="TOOL",
                                                                         note="die worn"))).downtime
    assert (classified.reason_id, classified.note) == ("TOOL", "die worn")
    kept = (await stub.ClassifyDowntime(pb.ClassifyDowntimeRequest(id=second.id, reason_id="BREAK"))).downtime
    assert (kept.reason_id, kept.note) == ("BREAK", "die worn"), "an empty note keeps the one there"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ClassifyDowntime(pb.ClassifyDowntimeRequest(id="123456", reason_id="TOOL"))
    assert err.value.code() == Code.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ClassifyDowntime(pb.ClassifyDowntimeRequest(id=second.id, reason_id="NOPE"))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert (await stub.ListDowntimes(pb.ListDowntimesRequest(work_center_id="press-1", start_time=ts(at(9)),
                                                             end_time=ts(at(9, 1))))).downtimes[0] == kept

    everything = (await stub.ListDowntimes(pb.ListDowntimesRequest(work_center_id="press-1"))).downtimes
    assert [d.id for d in everything] == [third.id, second.id, first.id], "newest first"
    window = pb.ListDowntimesRequest(work_center_id="press-1", start_time=ts(at(8, 30)), end_time=ts(at(10, 30)),
                                     page_size=1)
    p1 = await stub.ListDowntimes(window)
    window.page_token = p1.next_page_token
    p2 = await stub.ListDowntimes(window)
    assert [d.id for d in [*p1.downtimes, *p2.downtimes]] == [third.id, second.id] and not p2.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListDowntimes(pb.ListDowntimesRequest(work_center_id="press-1", start_time=ts(at(9)),
                                                         end_time=ts(at(8))))
    assert err.value.code() == Code.INVALID_ARGUMENT and "end_time" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListDowntimes(pb.ListDowntimesRequest(work_center_id="nope"))
    assert err.value.code() == Code.NOT_FOUND

    # A stop entered while an order runs is attributed to it.
    order = await new_order(stub, start=True)
    during = await down(datetime.now(UTC) + timedelta(seconds=1))
    assert during.order_id == order.id
