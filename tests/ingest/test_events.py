"""WatchTagEvents: catch-up from a cursor, then live through LISTEN/NOTIFY on any replica; cursors follow
commit order across replicas, so a live watcher misses nothing; retention answers OUT_OF_RANGE."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
from grpc_helpers import error_info, field_violations

from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import tag_event_pb2
from fabrica_svc.runtime import tenancy
from fabrica_svc.ingest.config import IngestConfig
from fabrica_svc.ingest.maintenance import maintain
from fabrica_svc.ingest.store import EVENTS_LOCK_KEY

from .support import MACHINE_STATE, PRODUCTION_COUNTER, T0_US, batch, reading, stream_batches, wait_for

#: Watchers poll only every 60 s here: whatever arrives sooner came through NOTIFY.
NOTIFY_ONLY = IngestConfig(event_poll_interval=60.0, group_max_delay=0.002)


async def until_live(ingest, watchers: int = 1) -> None:  # noqa: ANN001 - support.Ingest
    """Wait until `watchers` WatchTagEvents streams have read everything and wait on the hub for a NOTIFY."""
    await wait_for(lambda: ingest.app.hub.waiting == watchers, what=f"{watchers} watcher(s) waiting on the hub")


def assert_woken_by_notify(ingest) -> None:  # noqa: ANN001 - support.Ingest
    """A watcher that waited on the hub was woken, and only a NOTIFY can have done it: the hub never
    reconnected (a reconnect wakes every watcher too) and the poll interval is a minute away."""
    hub = ingest.app.hub
    assert hub.connects == 1 and hub.notifications > 0 and hub.woken > 0, (hub.connects, hub.notifications, hub.woken)


def counter_batches(collector: str, count: int, per_batch: int = 3, first_sequence: int = 1,
                    tag_base: int = 1, plc_id: str = "press-1") -> list:
    """Batches of counter readings whose values are unique: (collector number, batch, index)."""
    out = []
    for b in range(count):
        seq = first_sequence + b
        out.append(batch(collector, seq, [
            reading(tag_base + i % 2, T0_US + seq * 1000 + i, seq * 1000 + i, role=PRODUCTION_COUNTER, plc_id=plc_id)
            for i in range(per_batch)
        ] + [reading(50, T0_US + seq * 1000, 20.5 + seq)]))  # a measurement: never an event
    return out


async def collect(stub, request: pb.WatchTagEventsRequest, n: int, timeout: float = 10.0) -> list[tag_event_pb2.TagEvent]:
    """The first `n` events of a watch; fails if they do not come within `timeout`."""
    call = stub.WatchTagEvents(request)
    events: list[tag_event_pb2.TagEvent] = []
    try:
        async with asyncio.timeout(timeout):
            async for response in call:
                events += response.events
                if len(events) >= n:
                    break
    finally:
        call.cancel()
    return events


def assert_exactly_once(events, expected_values) -> None:
    cursors = [e.cursor for e in events]
    assert cursors == sorted(set(cursors)), "cursors must strictly increase"
    assert sorted(e.value.int_value for e in events) == sorted(expected_values)


async def test_watch_catches_up_from_a_cursor_then_goes_live(ingest_factory) -> None:
    ingest = await ingest_factory(NOTIFY_ONLY)
    await stream_batches(ingest.stub, "c1", counter_batches("c1", 4))
    first = [v for b in counter_batches("c1", 4) for v in (r.value.int_value for r in b.readings[:3])]
    call = ingest.stub.WatchTagEvents(pb.WatchTagEventsRequest(after_cursor=0))
    events: list[tag_event_pb2.TagEvent] = []
    async with asyncio.timeout(10):
        async for response in call:
            events += response.events
            if len(events) == len(first):
                break
        assert_exactly_once(events, first)
        assert events[0].role == PRODUCTION_COUNTER and events[0].plc_id == "press-1"
        # live: written once the watch caught up and waits on the hub, delivered by NOTIFY
        await until_live(ingest)
        woken = ingest.app.hub.woken
        more = counter_batches("c1", 3, first_sequence=5)
        await stream_batches(ingest.stub, "c1", more)
        async for response in call:
            events += response.events
            if len(events) >= len(first) + 9:
                break
    call.cancel()
    assert_woken_by_notify(ingest)
    assert ingest.app.hub.woken > woken
    assert_exactly_once(events, first + [r.value.int_value for b in more for r in b.readings[:3]])
    # resuming after any cursor gives exactly the events after it
    k = 5
    resumed = await collect(ingest.stub, pb.WatchTagEventsRequest(after_cursor=events[k].cursor), len(events) - k - 1)
    assert [e.cursor for e in resumed] == [e.cursor for e in events[k + 1:]]
    assert resumed == events[k + 1:]


async def test_watch_filters_by_tag_and_plc(ingest) -> None:
    await stream_batches(ingest.stub, "c1", counter_batches("c1", 3, tag_base=1, plc_id="press-1"))
    await stream_batches(ingest.stub, "c2", counter_batches("c2", 3, tag_base=11, plc_id="press-2"))
    by_tag = await collect(ingest.stub, pb.WatchTagEventsRequest(tag_ids=[12]), 3)
    assert {e.tag_id for e in by_tag} == {12}
    by_plc = await collect(ingest.stub, pb.WatchTagEventsRequest(plc_ids=["press-1"]), 9)
    assert {e.plc_id for e in by_plc} == {"press-1"} and len(by_plc) == 9
    # a filtered watch that has seen nothing yet still moves on and then gets new events live
    call = ingest.stub.WatchTagEvents(pb.WatchTagEventsRequest(tag_ids=[99]))
    await stream_batches(ingest.stub, "c3", [batch("c3", 1, [reading(99, T0_US, 7, role=MACHINE_STATE)])])
    async with asyncio.timeout(10):
        response = await call.read()
    call.cancel()
    assert [(e.tag_id, e.value.int_value, e.role) for e in response.events] == [(99, 7, MACHINE_STATE)]


async def test_replicas_write_in_commit_order_and_a_live_watcher_on_another_replica_misses_nothing(ingest_factory) -> None:
    a, b, c = [await ingest_factory(NOTIFY_ONLY) for _ in range(3)]
    collectors = {"c1": a, "c2": b, "c3": a, "c4": b}
    plans = {cid: counter_batches(cid, 25, per_batch=4, tag_base=10 * n)
             for n, cid in enumerate(collectors, start=1)}
    expected = [r.value.int_value for bs in plans.values() for bt in bs for r in bt.readings[:4]]
    watcher = asyncio.create_task(collect(c.stub, pb.WatchTagEventsRequest(), len(expected), timeout=30))
    await until_live(c)  # the watcher has read the (empty) table and waits before anything is written
    await asyncio.gather(*(stream_batches(server.stub, cid, plans[cid]) for cid, server in collectors.items()))
    events = await watcher
    assert len(events) == len(expected)
    assert_exactly_once(events, expected)
    assert_woken_by_notify(c)  # every event came live, from the other replicas' NOTIFYs


async def test_cursor_older_than_retained_events_is_out_of_range(ingest) -> None:
    await ingest.app.maintenance.stop()  # this test runs the round itself
    await stream_batches(ingest.stub, "c1", counter_batches("c1", 2))
    events = await collect(ingest.stub, pb.WatchTagEventsRequest(), 6)
    # the first batch's events become old enough for a 7-day retention to remove them
    with tenancy.system():  # the test's own SQL on the service's pool says whose rows (row-level security)
        await ingest.app.store.pool.execute(
            "UPDATE ingest.tag_events SET insert_time = now() - interval '30 days' WHERE cursor <= $1",
            events[2].cursor)
    await maintain(ingest.app.store, datetime.now(UTC), ahead=1, retention_days=7)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(ingest.stub, pb.WatchTagEventsRequest(after_cursor=events[0].cursor), 1)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert err.value.details() == (
        f"after_cursor {events[0].cursor} is older than the retained events (events up to {events[2].cursor} were"
        " removed by retention); resume from 0 for the oldest retained event")
    info = error_info(err.value)
    assert (info.reason, dict(info.metadata)) == ("CURSOR_OUT_OF_RANGE", {"purged_through": str(events[2].cursor)})
    # the last removed cursor and 0 both resume at the oldest retained event
    for after in (events[2].cursor, 0):
        assert await collect(ingest.stub, pb.WatchTagEventsRequest(after_cursor=after), 3) == events[3:]


async def test_watch_request_validation(ingest) -> None:
    for request, field in ((pb.WatchTagEventsRequest(after_cursor=-1), "after_cursor"),
                           (pb.WatchTagEventsRequest(tag_ids=[0]), "tag_ids[0]"),
                           (pb.WatchTagEventsRequest(tag_ids=[2**63]), "tag_ids[0]")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(ingest.stub, request, 1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(err.value)


async def test_event_transactions_serialize_so_a_cursor_never_becomes_visible_before_a_smaller_one(ingest) -> None:
    """Another replica's event transaction holds the events lock with a cursor taken: ingest's write must
    wait for it (not commit a larger cursor first, which a watcher could read and skip past)."""
    conn = await asyncpg.connect(ingest.database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT pg_advisory_xact_lock($1)", EVENTS_LOCK_KEY)
        other = await conn.fetchval(
            "INSERT INTO ingest.tag_events (tenant_id, tag_id, plc_id, role, read_time, quality, kind, value, int_value)"
            " VALUES ('default', 7, 'press-9', 2, now(), 1, 2, 1, 1) RETURNING cursor")  # every event names its tenant
        watch = ingest.stub.WatchTagEvents(pb.WatchTagEventsRequest())
        write = asyncio.create_task(stream_batches(ingest.stub, "c1", counter_batches("c1", 1)))
        done, _ = await asyncio.wait({write}, timeout=0.5)
        assert not done, "an events transaction committed while another one held the events lock"
        await tx.commit()
        _, acks = await asyncio.wait_for(write, timeout=10)
        assert [a.written for a in acks] == [4]
        events: list[tag_event_pb2.TagEvent] = []
        async with asyncio.timeout(10):
            async for response in watch:
                events += response.events
                if len(events) >= 4:
                    break
        watch.cancel()
        assert events[0].cursor == other and events[0].plc_id == "press-9"
        assert_exactly_once(events, [1] + [r.value.int_value for r in counter_batches("c1", 1)[0].readings[:3]])
    finally:
        await conn.close()
