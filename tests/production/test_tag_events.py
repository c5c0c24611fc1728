"""Tag events applied to the database the way the consumer applies them (TagEventService.apply_tag_events on its
own connection): counter deltas with wrap, reset and jump, exactly-once by cursor, auto-completion, downtime from
machine states. The gRPC stream from a real ingest is exercised in test_consumer_e2e.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import tag_event_pb2
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2 as S
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from google.protobuf import field_mask_pb2

from fabrica_svc.production.service import TagEventService
from in_process import Server

from .support import GOOD_TAG, SCRAP_TAG, STATE_TAG, booked_total, fetchval, new_order, seed, ts

GOOD = reading_pb2.QUALITY_GOOD


def ev(cursor: int, tag: int, value: object, t: datetime, *, quality: int = GOOD,
       kind: str | None = None) -> tag_event_pb2.TagEvent:
    e = tag_event_pb2.TagEvent(cursor=cursor, tag_id=tag, plc_id="press-plc", quality=quality, read_time=ts(t))
    if value is not None:
        kind = kind or {bool: "bool_value", int: "uint_value", float: "double_value", str: "string_value"}[type(value)]
        setattr(e.value, kind, value)
    return e


class Events:
    """Applies messages of events with increasing cursors on a dedicated connection, like the consumer."""

    def __init__(self, tag_events: TagEventService, conn: asyncpg.Connection):
        self.tag_events, self.conn, self.cursor = tag_events, conn, 0

    def make(self, tag: int, value: object, t: datetime, **kw: object) -> tag_event_pb2.TagEvent:
        self.cursor += 1
        return ev(self.cursor, tag, value, t, **kw)

    async def apply(self, *events: tag_event_pb2.TagEvent):  # noqa: ANN201
        return await self.tag_events.apply_tag_events(self.conn, list(events))


@pytest.fixture
async def events(server: Server, stub: pb_grpc.ProductionServiceStub, database_url: str) -> AsyncIterator[Events]:
    await seed(stub)  # press-1: 16-bit counters, jump limit 1,000
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "production"})
    yield Events(server.app.tag_events, conn)  # type: ignore[attr-defined]
    await conn.close()


def after(order: S.Order, seconds: float) -> datetime:
    return order.start_time.ToDatetime(tzinfo=UTC) + timedelta(seconds=seconds)


async def anomalies(database_url: str) -> list[str]:
    kinds = await fetchval(database_url, "SELECT string_agg(kind, ',' ORDER BY id) FROM production.tag_anomalies")
    return kinds.split(",") if kinds else []


# The counter walk on a 16-bit counter with a jump limit of 1,000: (value, booked, why).
WALK_16 = [
    (65_000, 0, "first value: baseline"),
    (65_010, 10, "normal increase"),
    (65_010, 0, "repeated value"),
    (5, 531, "wrap at 16 bit: 65,536 - 65,010 + 5"),
    (0, 0, "reset to zero (too far to be a wrap)"),
    (7, 7, "increase after the reset"),
    (2_000, 0, "jump over the limit: flagged, new baseline"),
    (2_003, 3, "increase from the new baseline"),
]


async def test_counter_walk_is_booked_once_whatever_the_replays(events: Events, stub: pb_grpc.ProductionServiceStub,
                                                                database_url: str) -> None:
    order = await new_order(stub, planned=100_000, start=True)
    walk = [events.make(GOOD_TAG, value, after(order, i + 1)) for i, (value, _, _) in enumerate(WALK_16)]
    scrap = [events.make(SCRAP_TAG, 100, after(order, 20)), events.make(SCRAP_TAG, 102, after(order, 21))]
    first, second = walk[:4], walk[4:] + scrap

    result = await events.apply(*first)
    assert (result.cursor, result.applied, result.booked_good) == (4, 4, 541)
    assert (await events.apply(*first)).applied == 0, "a replay of a committed message books nothing"
    # A message that overlaps what is committed: only the new part counts.
    result = await events.apply(*walk[2:], *scrap)
    assert (result.applied, result.booked_good, result.booked_scrap, result.anomalies) == (6, 10, 2, 1)
    assert (await events.apply(*second)).applied == 0

    expected = sum(b for _, b, _ in WALK_16)
    got = (await stub.GetOrder(pb.GetOrderRequest(id=order.id))).order
    assert (got.good_quantity, got.scrap_quantity) == (expected, 2) == (551, 2)
    assert await booked_total(database_url, order.id) == 551
    bookings = (await stub.ListBookings(pb.ListBookingsRequest(order_id=order.id))).bookings
    assert [b.good_quantity for b in bookings if b.good_quantity] == [b for _, b, _ in WALK_16 if b]
    assert all(b.source == S.BOOKING_SOURCE_COUNTER for b in bookings)
    assert bookings[1].book_time == walk[3].read_time and "wrapped" in bookings[1].note
    assert await anomalies(database_url) == ["JUMP"]
    assert await fetchval(database_url, "SELECT cursor FROM production.consumer_cursor") == 10
    assert await fetchval(database_url, "SELECT value FROM production.counter_state WHERE tag_id = $1",
                          GOOD_TAG) == 2_003


async def test_32_bit_wrap_and_defaults(events: Events, stub: pb_grpc.ProductionServiceStub) -> None:
    # Width 0 means 32 bit, jump 0 means 10,000.
    await stub.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=md.WorkCenter(
        id="press-32", display_name="Press 32", sector_id="pressing", plc_id="p", production_counter_tag_id=201)))
    order = await new_order(stub, planned=100_000, work_center="press-32", start=True)
    result = await events.apply(
        events.make(201, 2**32 - 3, after(order, 1)),
        events.make(201, 4, after(order, 2)),  # wrapped: 7 parts
        events.make(201, 9_004, after(order, 3)),  # 9,000: within the default limit
        events.make(201, 19_005, after(order, 4)),  # 10,001: over it
    )
    assert (result.booked_good, result.anomalies) == (9_007, 1)


async def test_values_and_qualities(events: Events, stub: pb_grpc.ProductionServiceStub, database_url: str) -> None:
    order = await new_order(stub, planned=100_000, start=True)
    bad = reading_pb2.QUALITY_COMMUNICATION_FAILURE
    result = await events.apply(
        events.make(GOOD_TAG, 10, after(order, 1)),
        events.make(GOOD_TAG, 50_000, after(order, 2), quality=bad),  # not trusted: ignored
        events.make(GOOD_TAG, None, after(order, 3), quality=bad),
        events.make(GOOD_TAG, 12.0, after(order, 4)),  # a whole float is a count: +2
        events.make(GOOD_TAG, 12.5, after(order, 5)),  # not a count: flagged
        events.make(GOOD_TAG, "13", after(order, 6)),  # not a count: flagged
        events.make(GOOD_TAG, -65_520, after(order, 7), kind="int_value"),  # a signed register: 16 mod 2**16, +4
        events.make(9_999, 77, after(order, 8)),  # a tag no work centre binds
    )
    assert (result.applied, result.booked_good, result.anomalies) == (8, 6, 2)
    assert await anomalies(database_url) == ["NOT_A_COUNT", "NOT_A_COUNT"]
    assert (await stub.GetOrder(pb.GetOrderRequest(id=order.id))).order.good_quantity == 6
    only_unbound = await events.apply(events.make(9_999, 78, after(order, 9)))
    assert (only_unbound.cursor, only_unbound.booked_good) == (9, 0), "the cursor moves past what is not ours"


async def test_counts_belong_to_the_order_that_ran_when_they_were_read(
        events: Events, stub: pb_grpc.ProductionServiceStub, database_url: str) -> None:
    long_ago = datetime(2024, 1, 1, tzinfo=UTC)
    # No order runs: the counter only moves the baseline.
    result = await events.apply(events.make(GOOD_TAG, 100, long_ago), events.make(GOOD_TAG, 150, long_ago))
    assert result.booked_good == 0
    first = await new_order(stub, "PO-1", planned=100_000, start=True)
    # Read before the order started (the consumer was behind): baseline only.
    assert (await events.apply(events.make(GOOD_TAG, 170, long_ago + timedelta(seconds=1)))).booked_good == 0
    assert (await events.apply(events.make(GOOD_TAG, 180, after(first, 0.001)))).booked_good == 10
    first = (await stub.CompleteOrder(pb.CompleteOrderRequest(id=first.id))).order
    second = await new_order(stub, "PO-2", planned=100_000, start=True)
    # Read while PO-1 ran, processed after it completed and PO-2 started: PO-1's parts.
    during_first = first.end_time.ToDatetime(tzinfo=UTC) - timedelta(microseconds=1)
    result = await events.apply(events.make(GOOD_TAG, 185, during_first),
                                events.make(GOOD_TAG, 190, after(second, 1)))
    assert result.booked_good == 10
    assert (await booked_total(database_url, first.id), await booked_total(database_url, second.id)) == (15, 5)
    # Paused: nothing is booked; resumed: booked again.
    await stub.PauseOrder(pb.PauseOrderRequest(id=second.id))
    paused_at = datetime.now(UTC) + timedelta(seconds=5)
    assert (await events.apply(events.make(GOOD_TAG, 200, paused_at))).booked_good == 0
    await stub.ResumeOrder(pb.ResumeOrderRequest(id=second.id))
    assert (await events.apply(events.make(GOOD_TAG, 204, paused_at + timedelta(seconds=5)))).booked_good == 4
    assert await booked_total(database_url, second.id) == 9


async def test_order_completes_itself_in_the_same_transaction(
        events: Events, stub: pb_grpc.ProductionServiceStub, database_url: str) -> None:
    order = await new_order(stub, planned=20, start=True)
    t_done = after(order, 3)
    result = await events.apply(
        events.make(GOOD_TAG, 1_000, after(order, 1)),
        events.make(GOOD_TAG, 1_015, after(order, 2)),
        events.make(GOOD_TAG, 1_025, t_done),  # 25 >= 20: complete (all 25 were made, all are booked)
        events.make(SCRAP_TAG, 0, after(order, 1)),
        events.make(SCRAP_TAG, 2, t_done),  # read in the same cycle as the completing count: still this order's
        events.make(GOOD_TAG, 1_030, t_done + timedelta(seconds=1)),  # after completion: baseline only
    )
    assert result.completed_orders == [int(order.id)]
    assert (result.booked_good, result.booked_scrap) == (25, 2)
    done = (await stub.GetOrder(pb.GetOrderRequest(id=order.id))).order
    assert (done.state, done.good_quantity, done.scrap_quantity) == (S.ORDER_STATE_COMPLETED, 25, 2)
    assert done.end_time == ts(t_done)
    assert await fetchval(database_url, "SELECT count(*) FROM production.order_runs WHERE end_time IS NULL") == 0
    # The work centre is free for the next order.
    await new_order(stub, "PO-2", start=True)


async def test_machine_state_opens_and_closes_downtime(events: Events, stub: pb_grpc.ProductionServiceStub) -> None:
    order = await new_order(stub, planned=100_000, start=True)
    t = [after(order, i) for i in range(1, 12)]
    listing = pb.ListDowntimesRequest(work_center_id="press-1", end_time=ts(t[-1]))  # the times are ahead of now
    await events.apply(
        events.make(STATE_TAG, 1, t[0]),  # running: nothing to do
        events.make(STATE_TAG, 0, t[1]),  # stopped: a stop opens
        events.make(STATE_TAG, 2, t[2]),  # fault: still the same stop
        events.make(STATE_TAG, 1, t[3]),  # running again: it closes
        events.make(STATE_TAG, 5, t[4], quality=reading_pb2.QUALITY_STALE),  # not trusted: ignored
        events.make(STATE_TAG, False, t[5]),  # a BOOL state tag: stopped
    )
    await events.apply(events.make(STATE_TAG, "running", t[6]),  # not a state: flagged, nothing changes
                       events.make(STATE_TAG, True, t[7]))
    downtimes = (await stub.ListDowntimes(listing)).downtimes
    assert [(d.start_time, d.end_time) for d in downtimes] == [(ts(t[5]), ts(t[7])), (ts(t[1]), ts(t[3]))]
    assert all(d.automatic and d.order_id == order.id and d.reason_id == "" for d in downtimes)
    # Stopped again, and an operator classifies the open stop while it lasts.
    await events.apply(events.make(STATE_TAG, 0, t[8]))
    open_stop = (await stub.ListDowntimes(listing)).downtimes[0]
    assert not open_stop.HasField("end_time")
    await stub.ClassifyDowntime(pb.ClassifyDowntimeRequest(id=open_stop.id, reason_id="TOOL"))
    await events.apply(events.make(STATE_TAG, 1, t[9]))
    closed = (await stub.ListDowntimes(listing)).downtimes[0]
    assert (closed.id, closed.reason_id, closed.end_time) == (open_stop.id, "TOOL", ts(t[9]))


async def test_rebinding_a_tag_starts_from_a_fresh_baseline(events: Events, stub: pb_grpc.ProductionServiceStub,
                                                            database_url: str) -> None:
    order = await new_order(stub, planned=100_000, start=True)
    mask = field_mask_pb2.FieldMask(paths=["production_counter_tag_id"])

    async def bind(tag: int) -> None:
        await stub.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
            work_center=md.WorkCenter(id="press-1", production_counter_tag_id=tag), update_mask=mask))

    await events.apply(events.make(GOOD_TAG, 100, after(order, 1)), events.make(GOOD_TAG, 110, after(order, 2)))
    await bind(111)
    await events.apply(events.make(GOOD_TAG, 500, after(order, 3)))  # not bound now: not ours
    await bind(GOOD_TAG)
    # Bound again: 520 is a new baseline, not +410 from the old one.
    result = await events.apply(events.make(GOOD_TAG, 520, after(order, 4)),
                                events.make(GOOD_TAG, 530, after(order, 5)))
    assert result.booked_good == 10
    # A new counter width makes the old baselines meaningless too.
    await stub.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
        work_center=md.WorkCenter(id="press-1", counter_width=32),
        update_mask=field_mask_pb2.FieldMask(paths=["counter_width"])))
    assert await fetchval(database_url, "SELECT count(*) FROM production.counter_state") == 0
    assert (await events.apply(events.make(GOOD_TAG, 70_000, after(order, 6)))).booked_good == 0
    assert await booked_total(database_url, order.id) == 20
