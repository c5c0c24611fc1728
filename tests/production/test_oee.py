"""GetOee against hand-computed examples, and its errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2 as S
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc

from grpc_helpers import field_violations

from .support import at, execute, new_order, precondition_violations, seed, ts

Code = grpc.StatusCode


async def _down(stub: pb_grpc.ProductionServiceStub, start: datetime, end: datetime, reason: str = "",
                wc: str = "press-1") -> None:
    await stub.CreateDowntime(pb.CreateDowntimeRequest(downtime=S.Downtime(
        work_center_id=wc, start_time=ts(start), end_time=ts(end), reason_id=reason)))


async def _book(stub: pb_grpc.ProductionServiceStub, order_id: str, good: int, scrap: int, when: datetime) -> None:
    await stub.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(
        order_id=order_id, good_quantity=good, scrap_quantity=scrap, book_time=ts(when))))


async def test_work_center_oee_hand_computed(stub: pb_grpc.ProductionServiceStub) -> None:
    """Shift 08:00-16:00 (28,800 s) on press-1.

    Stops that count: 07:50-08:10 unclassified (600 s inside the window), 09:00-09:30 unclassified (1,800 s),
    11:50-12:10 tool change (1,200 s) and 12:00-12:05 inside it (merged: 0 s more). Not counted: a break
    10:00-10:20, a stop after the window, another work centre's stop. Downtime 3,600 s, run time 25,200 s.
    Parts in the window: brackets (2 s ideal) 6,000 good + 200 scrap, clips (5 s ideal) 1,800 good; a
    booking before the window and one on another work centre do not count. Ideal time 2 × 6,200 + 5 × 1,800
    = 21,400 s.

    availability = 25,200 / 28,800 = 0.875; performance = 21,400 / 25,200 = 0.849206...;
    quality = 7,800 / 8,000 = 0.975; OEE = 0.875 × 0.849206 × 0.975 = 21,400 / 28,800 × 0.975 = 0.724479...
    """
    await seed(stub)
    await stub.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=md.WorkCenter(
        id="press-2", display_name="Press 2", sector_id="pressing")))
    await _down(stub, at(7, 50), at(8, 10))
    await _down(stub, at(9), at(9, 30))
    await _down(stub, at(10), at(10, 20), "BREAK")
    await _down(stub, at(11, 50), at(12, 10), "TOOL")
    await _down(stub, at(12), at(12, 5))
    await _down(stub, at(16, 30), at(17))
    await _down(stub, at(9), at(10), wc="press-2")

    brackets = await new_order(stub, "PO-B", planned=100_000)
    clips = await new_order(stub, "PO-C", planned=100_000, item="CLP-200")
    elsewhere = await new_order(stub, "PO-X", planned=100_000, work_center="press-2")
    await _book(stub, brackets.id, 500, 0, at(7))  # before the window
    await _book(stub, brackets.id, 6000, 0, at(9, 40))
    await _book(stub, brackets.id, 0, 200, at(10, 30))
    await _book(stub, clips.id, 1800, 0, at(13))
    await _book(stub, elsewhere.id, 999, 9, at(12))

    oee = (await stub.GetOee(pb.GetOeeRequest(work_center_id="press-1", start_time=ts(at(8)),
                                              end_time=ts(at(16))))).oee
    assert oee.start_time == ts(at(8)) and oee.end_time == ts(at(16))
    assert oee.planned_seconds == 28_800
    assert oee.downtime_seconds == 3_600
    assert (oee.good_count, oee.total_count) == (7_800, 8_000)
    assert oee.availability == pytest.approx(0.875)
    assert oee.performance == pytest.approx(21_400 / 25_200)
    assert oee.quality == pytest.approx(0.975)
    assert oee.oee == pytest.approx(0.72447916666)

    # Reclassifying the 09:00 stop as a break takes its 1,800 s out of the downtime.
    nine = [d for d in (await stub.ListDowntimes(pb.ListDowntimesRequest(
        work_center_id="press-1", start_time=ts(at(9)), end_time=ts(at(9, 1))))).downtimes]
    await stub.ClassifyDowntime(pb.ClassifyDowntimeRequest(id=nine[0].id, reason_id="BREAK"))
    again = (await stub.GetOee(pb.GetOeeRequest(work_center_id="press-1", start_time=ts(at(8)),
                                                end_time=ts(at(16))))).oee
    assert again.downtime_seconds == 1_800 and again.availability == pytest.approx(27_000 / 28_800)

    # A window reaching into the future ends now: the future has no run time yet.
    future = datetime.now(UTC) + timedelta(days=365)
    clipped = (await stub.GetOee(pb.GetOeeRequest(work_center_id="press-1", start_time=ts(at(8)),
                                                  end_time=ts(future)))).oee
    assert clipped.end_time.ToDatetime(tzinfo=UTC) < future
    # An empty window (all in the future) has nothing planned: all zero, quality 1 by convention.
    empty = (await stub.GetOee(pb.GetOeeRequest(work_center_id="press-1", start_time=ts(future)))).oee
    assert (empty.planned_seconds, empty.availability, empty.oee, empty.total_count) == (0, 0, 0, 0)


async def test_order_oee_hand_computed(stub: pb_grpc.ProductionServiceStub, database_url: str) -> None:
    """An order of brackets (2 s ideal) that ran 08:00-09:00 (3,600 s) with an unclassified stop 08:10-08:16
    (360 s) and a break 08:30-08:40 (not counted); 1,500 good and 100 scrap.

    availability = 3,240 / 3,600 = 0.9; performance = 2 × 1,600 / 3,240 = 0.987654...;
    quality = 1,500 / 1,600 = 0.9375; OEE = 3,200 / 3,600 × 0.9375 = 0.833333...
    """
    await seed(stub)
    order = await new_order(stub, planned=100_000, start=True)
    await _book(stub, order.id, 1500, 100, at(8, 30))
    await stub.CompleteOrder(pb.CompleteOrderRequest(id=order.id))
    # The run's times come from the database clock; set them to the example's (there is no RPC for that).
    await execute(database_url, "UPDATE production.orders SET start_time = $2, end_time = $3 WHERE id = $1",
                  int(order.id), at(8), at(9))
    await _down(stub, at(8, 10), at(8, 16))
    await _down(stub, at(8, 30), at(8, 40), "BREAK")
    await _down(stub, at(9, 30), at(9, 40))  # after the order

    oee = (await stub.GetOee(pb.GetOeeRequest(order_id=order.id))).oee
    assert oee.start_time == ts(at(8)) and oee.end_time == ts(at(9))
    assert (oee.planned_seconds, oee.downtime_seconds) == (3_600, 360)
    assert (oee.good_count, oee.total_count) == (1_500, 1_600)
    assert oee.availability == pytest.approx(0.9)
    assert oee.performance == pytest.approx(3_200 / 3_240)
    assert oee.quality == pytest.approx(0.9375)
    assert oee.oee == pytest.approx(5 / 6)


async def test_oee_errors(stub: pb_grpc.ProductionServiceStub) -> None:
    await seed(stub)
    planned = await new_order(stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetOee(pb.GetOeeRequest(order_id=planned.id))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert [v.type for v in precondition_violations(err.value)] == ["ORDER_STATE"]
    cases = [
        (pb.GetOeeRequest(), Code.INVALID_ARGUMENT, "subject"),
        (pb.GetOeeRequest(work_center_id="press-1"), Code.INVALID_ARGUMENT, "start_time"),
        (pb.GetOeeRequest(work_center_id="press-1", start_time=ts(at(9)), end_time=ts(at(8))),
         Code.INVALID_ARGUMENT, "end_time"),
        (pb.GetOeeRequest(order_id=planned.id, start_time=ts(at(8))), Code.INVALID_ARGUMENT, "start_time"),
        (pb.GetOeeRequest(work_center_id="nope", start_time=ts(at(8))), Code.NOT_FOUND, None),
        (pb.GetOeeRequest(order_id="4242"), Code.NOT_FOUND, None),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetOee(request)
        assert err.value.code() == code, request
        if field:
            assert field in field_violations(err.value), (request, field_violations(err.value))
