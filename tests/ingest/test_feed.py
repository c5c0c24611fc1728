"""WatchCommittedReadings: every committed batch once, in commit order, from any cursor, after a restart and
on any replica; filters narrow it and still move the cursor; retention answers OUT_OF_RANGE."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from grpc_helpers import error_info, field_violations

from fabrica.ingest.v1 import committed_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica_svc.runtime import tenancy
from fabrica_svc.ingest.config import IngestConfig
from fabrica_svc.ingest.maintenance import maintain

from .support import (
    PRODUCTION_COUNTER,
    T0_US,
    batch,
    fetchval,
    numbered_batches,
    reading,
    start_ingest,
    stop_ingest,
    stream_batches,
    wait_for,
)

#: Watchers poll only every 60 s here: whatever arrives sooner came through NOTIFY.
NOTIFY_ONLY = IngestConfig(event_poll_interval=60.0, group_max_delay=0.002)


async def watch_batches(stub, request: pb.WatchCommittedReadingsRequest, n: int, timeout: float = 15.0
                        ) -> tuple[list[committed_pb2.CommittedBatch], list[pb.WatchCommittedReadingsResponse]]:
    """The first `n` batches of a watch and the messages they came in; fails if they do not come in time."""
    call = stub.WatchCommittedReadings(request)
    batches: list[committed_pb2.CommittedBatch] = []
    messages: list[pb.WatchCommittedReadingsResponse] = []
    try:
        async with asyncio.timeout(timeout):
            async for response in call:
                messages.append(response)
                batches += response.batches
                if len(batches) >= n:
                    break
    finally:
        call.cancel()
    return batches, messages


async def next_message(call) -> pb.WatchCommittedReadingsResponse:  # noqa: ANN001
    async with asyncio.timeout(10):
        return await call.read()


def key(b: committed_pb2.CommittedBatch) -> tuple[str, int]:
    return b.batch.collector_id, b.batch.sequence


def assert_in_commit_order(batches: list[committed_pb2.CommittedBatch]) -> None:
    cursors = [b.cursor for b in batches]
    assert cursors == sorted(set(cursors)), "cursors must strictly increase"
    keys = [key(b) for b in batches]
    assert len(keys) == len(set(keys)), "a batch was sent twice"
    for collector in {c for c, _ in keys}:
        sequences = [s for c, s in keys if c == collector]
        assert sequences == sorted(sequences), f"{collector}'s batches out of order"


async def test_every_committed_batch_once_as_sent_then_live_and_resume_after_any_cursor_is_exact(database_url) -> None:
    ingest = await start_ingest(database_url, NOTIFY_ONLY)
    try:
        sent = {**{("c1", b.sequence): b for b in numbered_batches("c1", 6, 40)},
                **{("c2", b.sequence): b for b in numbered_batches("c2", 4, 25, tag_base=100, plc_id="plc-2")}}
        await stream_batches(ingest.stub, "c1", [b for (c, _), b in sent.items() if c == "c1"])
        await stream_batches(ingest.stub, "c2", [b for (c, _), b in sent.items() if c == "c2"])
        got, messages = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(), len(sent))
        assert_in_commit_order(got)
        assert {key(b): b.batch for b in got} == sent  # exactly as sent, every reading
        assert all(b.stored_readings == len(b.batch.readings) for b in got)
        assert messages[-1].cursor == got[-1].cursor == messages[-1].head_cursor
        now = datetime.now(UTC)
        assert all(abs(b.commit_time.ToDatetime(UTC) - now) < timedelta(minutes=5) for b in got)

        # resuming after the cursor of any message gives exactly what followed it, nothing twice
        for k in range(len(got)):
            rest, _ = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(after_cursor=got[k].cursor),
                                          len(got) - k - 1) if k < len(got) - 1 else ([], [])
            assert rest == got[k + 1:]

        # live: a watch that has caught up is woken by the commit's NOTIFY (the poll is a minute away)
        call = ingest.stub.WatchCommittedReadings(pb.WatchCommittedReadingsRequest(after_cursor=got[-1].cursor))
        await wait_for(lambda: ingest.app.feed_hub.waiting == 1, what="the watch waits on the feed's hub")
        more = numbered_batches("c1", 2, 10, first_sequence=7, start_us=T0_US + 10**9)
        await stream_batches(ingest.stub, "c1", more)
        live: list[committed_pb2.CommittedBatch] = []
        while len(live) < 2:
            live += (await next_message(call)).batches
        call.cancel()
        assert [b.batch for b in live] == more and live[0].cursor > got[-1].cursor
        assert ingest.app.feed_hub.connects == 1 and ingest.app.feed_hub.notifications > 0
        assert ingest.app.hub.notifications == 0  # no events were written: the tag-event watchers slept on
    finally:
        await stop_ingest(ingest)


async def test_a_consumer_resumes_from_its_cursor_after_ingest_restarts(database_url) -> None:
    ingest = await start_ingest(database_url)
    first = numbered_batches("c1", 5, 20)
    await stream_batches(ingest.stub, "c1", first)
    got, _ = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(), 5)
    await stop_ingest(ingest)
    ingest = await start_ingest(database_url)  # a new process on the same database
    try:
        second = numbered_batches("c1", 3, 20, first_sequence=6, start_us=T0_US + 10**9)
        await stream_batches(ingest.stub, "c1", first[3:] + second)  # a resend: duplicates are not fed again
        rest, _ = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(after_cursor=got[2].cursor), 5)
        assert [b.batch for b in rest] == first[3:] + second
        assert rest[:2] == got[3:]
        assert await fetchval(database_url, "SELECT count(*) FROM ingest.committed_batches") == 8
    finally:
        await stop_ingest(ingest)


async def test_filters_narrow_the_batches_and_still_move_the_cursor(ingest) -> None:
    mixed = batch("c1", 1, [reading(1, T0_US, 1.0, plc_id="press-1"), reading(2, T0_US, 2.0, plc_id="press-2"),
                            reading(3, T0_US, 3, plc_id="press-1", role=PRODUCTION_COUNTER)])
    other = batch("c1", 2, [reading(2, T0_US + 1000, 4.0, plc_id="press-2")])
    await stream_batches(ingest.stub, "c1", [mixed, other])
    by_plc, messages = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(plc_ids=["press-1"]), 1)
    assert [list(b.batch.readings) for b in by_plc] == [[mixed.readings[0], mixed.readings[2]]]
    assert (by_plc[0].batch.collector_id, by_plc[0].batch.sequence, by_plc[0].stored_readings) == ("c1", 1, 3)
    by_tag, _ = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(tag_ids=[2]), 2)
    assert [[r.value.double_value for r in b.batch.readings] for b in by_tag] == [[2.0], [4.0]]
    both, _ = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(plc_ids=["press-1"], tag_ids=[3]), 1)
    assert [r.tag_id for r in both[0].batch.readings] == [3]

    # a watch whose filter matches nothing is told the cursor moved past what it skips, then gets its batch live
    call = ingest.stub.WatchCommittedReadings(pb.WatchCommittedReadingsRequest(plc_ids=["press-9"]))
    skipped = await next_message(call)
    head = by_tag[-1].cursor
    assert (list(skipped.batches), skipped.cursor, skipped.head_cursor) == ([], head, head)
    await stream_batches(ingest.stub, "c1", [batch("c1", 3, [reading(2, T0_US + 2000, 5.0, plc_id="press-2")])])
    moved = await next_message(call)
    assert (list(moved.batches), moved.cursor) == ([], head + 1)
    await stream_batches(ingest.stub, "c1", [batch("c1", 4, [reading(9, T0_US + 3000, 6.0, plc_id="press-9")])])
    found = await next_message(call)
    call.cancel()
    assert [(b.cursor, b.batch.sequence) for b in found.batches] == [(head + 2, 4)] and found.cursor == head + 2


async def test_start_at_end_sends_only_what_commits_from_then_on(ingest) -> None:
    await stream_batches(ingest.stub, "c1", numbered_batches("c1", 3, 5))
    call = ingest.stub.WatchCommittedReadings(pb.WatchCommittedReadingsRequest(start_at_end=True))
    now = await next_message(call)  # at once: where "now" is
    assert (list(now.batches), now.cursor, now.head_cursor) == ([], 3, 3)
    await wait_for(lambda: ingest.app.feed_hub.waiting == 1, what="the watch waits on the feed's hub")
    later = numbered_batches("c1", 1, 5, first_sequence=4, start_us=T0_US + 10**9)
    await stream_batches(ingest.stub, "c1", later)
    message = await next_message(call)
    call.cancel()
    assert [b.batch for b in message.batches] == later and message.cursor == 4


async def test_batches_from_concurrent_replicas_reach_a_live_watcher_on_another_replica_in_commit_order(
        ingest_factory) -> None:
    a, b, c = [await ingest_factory(NOTIFY_ONLY) for _ in range(3)]
    plans = {cid: numbered_batches(cid, 20, 15, tag_base=100 * n) for n, cid in enumerate(("c1", "c2", "c3", "c4"), 1)}
    servers = {"c1": a, "c2": b, "c3": a, "c4": b}
    total = sum(len(p) for p in plans.values())
    watcher = asyncio.create_task(watch_batches(c.stub, pb.WatchCommittedReadingsRequest(), total, timeout=60))
    await wait_for(lambda: c.app.feed_hub.waiting == 1, what="the watch waits on the feed's hub")
    await asyncio.gather(*(stream_batches(servers[cid].stub, cid, plans[cid]) for cid in plans))
    got, _ = await watcher
    assert_in_commit_order(got)
    assert {key(x): x.batch for x in got} == {(cid, bt.sequence): bt for cid, p in plans.items() for bt in p}
    assert [x.cursor for x in got] == list(range(1, total + 1))  # no transaction rolled back: no gaps either


async def test_large_batches_come_a_few_per_message(ingest) -> None:
    """A page is cut at about 3 MiB of payload; the rest follows at once, in order."""
    big = [batch("c1", s, [reading(t, T0_US + s * 10**6 + t, "x" * 3000, kind="string_value") for t in range(1, 501)])
           for s in range(1, 7)]  # ~1.5 MB each
    await stream_batches(ingest.stub, "c1", big)
    got, messages = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(), 6, timeout=30)
    assert [x.batch for x in got] == big
    assert len(messages) >= 3 and all(len(m.batches) <= 3 for m in messages)
    assert [m.cursor for m in messages] == [m.batches[-1].cursor for m in messages]


async def test_cursor_older_than_the_retained_feed_is_out_of_range(ingest) -> None:
    await ingest.app.maintenance.stop()  # this test runs the round itself
    await stream_batches(ingest.stub, "c1", numbered_batches("c1", 4, 5))
    got, _ = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(), 4)
    with tenancy.system():  # the test's own SQL on the service's pool says whose rows (row-level security)
        await ingest.app.store.pool.execute(
            "UPDATE ingest.committed_batches SET commit_time = now() - interval '3 hours' WHERE cursor <= $1",
            got[1].cursor)
    report = await maintain(ingest.app.store, datetime.now(UTC), ahead=1, retention_days=0, feed_retention_hours=2)
    assert report.feed_purged_through == got[1].cursor
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(after_cursor=got[0].cursor), 1)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(err.value)
    assert (info.reason, dict(info.metadata)) == ("CURSOR_OUT_OF_RANGE", {"purged_through": str(got[1].cursor)})
    for after in (got[1].cursor, 0):  # the last removed cursor and 0 resume at the oldest retained batch
        rest, _ = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(after_cursor=after), 2)
        assert rest == got[2:]


async def test_the_feed_can_be_turned_off(ingest_factory) -> None:
    ingest = await ingest_factory(IngestConfig(feed=False))
    _, acks = await stream_batches(ingest.stub, "c1", numbered_batches("c1", 2, 5))
    assert [a.written for a in acks] == [5, 5]
    assert await fetchval(ingest.database_url, "SELECT count(*) FROM ingest.committed_batches") == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(), 1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "FEED_DISABLED"


async def test_watch_request_validation(ingest) -> None:
    for request, field in ((pb.WatchCommittedReadingsRequest(after_cursor=-1), "after_cursor"),
                           (pb.WatchCommittedReadingsRequest(tag_ids=[0]), "tag_ids[0]"),
                           (pb.WatchCommittedReadingsRequest(tag_ids=[2**63]), "tag_ids[0]"),
                           (pb.WatchCommittedReadingsRequest(plc_ids=[""]), "plc_ids[0]")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch_batches(ingest.stub, request, 1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(err.value)



async def test_the_feed_stores_each_batch_as_received_not_encoded_again(ingest) -> None:
    """The stored payload is the bytes the collector sent (the ``batch`` field of its request), not the
    batch encoded again: a batch whose fields are written in an order protobuf never writes them
    (sequence before collector_id, and readings before both) is stored with that order."""
    from fabrica.common.v1 import reading_pb2

    readings = numbered_batches("raw-c", 1, 5)[0].readings
    b = reading_pb2.ReadingBatch(collector_id="raw-c", sequence=1, readings=readings)
    unusual = reading_pb2.ReadingBatch(readings=readings).SerializeToString() + (
        reading_pb2.ReadingBatch(sequence=1).SerializeToString()
        + reading_pb2.ReadingBatch(collector_id="raw-c").SerializeToString())
    assert reading_pb2.ReadingBatch.FromString(unusual) == b and unusual != b.SerializeToString()
    call = ingest.channel.stream_stream("/fabrica.ingest.v1.IngestService/StreamReadings",
                                        request_serializer=lambda raw: raw,
                                        response_deserializer=pb.StreamReadingsResponse.FromString)()
    await call.write(pb.StreamReadingsRequest(open=pb.StreamOpen(collector_id="raw-c")).SerializeToString())
    assert (await call.read()).resume.committed_sequence == 0
    await call.write(b"\x12" + _varint(len(unusual)) + unusual)
    assert (await call.read()).ack.sequence == 1
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    stored = await fetchval(ingest.database_url, "SELECT payload FROM ingest.committed_batches"
                                                 " WHERE collector_id = 'raw-c' AND sequence = 1")
    assert stored == unusual
    got, _ = await watch_batches(ingest.stub, pb.WatchCommittedReadingsRequest(), 1)
    assert got[0].batch == b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_batch_bytes_are_taken_only_from_a_request_that_is_one_batch_field() -> None:
    from fabrica.common.v1 import reading_pb2
    from fabrica_svc.ingest.convert import batch_bytes_of, parse_stream_request

    big = numbered_batches("c", 1, 300)[0]  # over 127 bytes: a length of several varint bytes
    small = batch("c", 1, [reading(1, T0_US)])
    for b in (big, small, reading_pb2.ReadingBatch()):
        raw = pb.StreamReadingsRequest(batch=b).SerializeToString()
        assert batch_bytes_of(raw) == b.SerializeToString()
        received = parse_stream_request(raw)
        assert received.message == pb.StreamReadingsRequest(batch=b) and received.batch_bytes == b.SerializeToString()
    raw = pb.StreamReadingsRequest(batch=small).SerializeToString()
    assert batch_bytes_of(pb.StreamReadingsRequest(open=pb.StreamOpen(collector_id="c")).SerializeToString()) is None
    assert batch_bytes_of(raw + raw) is None  # the field twice: protobuf merges them, the bytes are not one batch
    assert batch_bytes_of(raw + b"\x08\x01") is None  # another field besides
    assert batch_bytes_of(raw[:-1]) is None and batch_bytes_of(b"") is None and batch_bytes_of(b"\x12\xff") is None
    with pytest.raises(Exception):
        parse_stream_request(b"\x12\x05ab")  # truncated: refused as grpcio's own deserializer refuses it
