"""StreamReadings against a real in-process ingest and Postgres: exactly once, acks, validation, latest
values, tags, events, backpressure."""

from __future__ import annotations

import asyncio
import asyncpg
import grpc
import pytest
from grpc_helpers import error_info, field_violations

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import query_pb2
from fabrica_svc.ingest.config import IngestConfig
from fabrica_svc.ingest.convert import batch_from_proto
from fabrica_svc.ingest.domain import WriteBatch
from fabrica_svc.ingest.writer import StreamSession
from fabrica_svc.runtime.errors import InvalidArgument

from .support import (
    MACHINE_STATE,
    PRODUCTION_COUNTER,
    SCRAP_COUNTER,
    T0_US,
    batch,
    batch_request,
    fetch,
    fetchval,
    numbered_batches,
    open_request,
    reading,
    stream_batches,
    ts_us,
    wait_for,
)

COUNT_SQL = "SELECT count(*) FROM ingest.readings"
DISTINCT_SQL = "SELECT count(*) FROM (SELECT DISTINCT tag_id, read_time FROM ingest.readings) d"


async def test_batches_are_written_once_and_acknowledged_in_order(ingest) -> None:
    batches = numbered_batches("line-1", 12, 250)
    resume, acks = await stream_batches(ingest.stub, "line-1", batches)
    assert resume == 0
    assert [(a.sequence, a.duplicate, a.written) for a in acks] == [(s, False, 250) for s in range(1, 13)]
    assert await fetchval(ingest.database_url, COUNT_SQL) == 3000
    # every reading, with its value (value i is reading i)
    values = await fetch(ingest.database_url, "SELECT value FROM ingest.readings ORDER BY value")
    assert [r["value"] for r in values] == [float(i) for i in range(3000)]
    assert await fetchval(ingest.database_url,
                          "SELECT committed_sequence FROM ingest.collector_sequences WHERE collector_id = 'line-1'") == 12


async def test_replayed_and_duplicate_batches_are_acknowledged_not_stored(ingest) -> None:
    batches = numbered_batches("line-1", 6, 100)
    await stream_batches(ingest.stub, "line-1", batches[:4])
    # a reconnecting collector that did not get the acks resends everything, plus new batches
    resume, acks = await stream_batches(ingest.stub, "line-1", batches)
    assert resume == 4
    assert [(a.sequence, a.duplicate, a.written) for a in acks] == [
        (1, True, 0), (2, True, 0), (3, True, 0), (4, True, 0), (5, False, 100), (6, False, 100)]
    # a stream that starts below the resume point and skips around
    resume, acks = await stream_batches(ingest.stub, "line-1", [batches[1], batches[5]])
    assert resume == 6 and all(a.duplicate for a in acks)
    assert await fetchval(ingest.database_url, COUNT_SQL) == 600
    assert await fetchval(ingest.database_url, DISTINCT_SQL) == 600


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-replica", "two-replicas"])
async def test_two_concurrent_streams_of_one_collector_write_each_batch_once(ingest_factory, replicas: int) -> None:
    servers = [await ingest_factory() for _ in range(replicas)]
    batches = numbered_batches("line-7", 40, 200)

    async def one_stream(server) -> list[pb.BatchAck]:
        call = server.stub.StreamReadings()
        await call.write(open_request("line-7"))
        await call.read()
        acks = []

        async def send() -> None:
            for b in batches:
                await call.write(batch_request(b))
                await asyncio.sleep(0)  # interleave with the other stream
            await call.done_writing()

        sender = asyncio.create_task(send())
        while (response := await call.read()) is not grpc.aio.EOF:
            acks.append(response.ack)
        await sender
        return acks

    acks_a, acks_b = await asyncio.gather(one_stream(servers[0]), one_stream(servers[-1]))
    assert [a.sequence for a in acks_a] == list(range(1, 41)) == [a.sequence for a in acks_b]
    # exactly one of the two streams wrote each batch; the other was told it was a duplicate
    for a, b in zip(acks_a, acks_b):
        assert (a.duplicate, b.duplicate) in ((False, True), (True, False)), (a, b)
        assert a.written + b.written == 200
    dsn = servers[0].database_url
    assert await fetchval(dsn, COUNT_SQL) == 8000
    assert await fetchval(dsn, DISTINCT_SQL) == 8000


def _without_value() -> reading_pb2.ReadingBatch:
    return batch("line-1", 2, [reading(1, T0_US + 5_000), reading(2, T0_US + 5_000, None)])


def _without_time() -> reading_pb2.ReadingBatch:
    return batch("line-1", 2, [reading_pb2.Reading(tag_id=1, quality=1, plc_id="plc-1",
                                                   value=reading_pb2.Value(double_value=1.0))])


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (batch("", 2, [reading(1, T0_US + 5_000)]), "batch.collector_id"),
        (batch("line-1", 0, [reading(1, T0_US + 5_000)]), "batch.sequence"),
        (_without_value(), "batch.readings[1].value"),
        (_without_time(), "batch.readings[0].read_time"),
        (batch("line-1", 2, []), "batch.readings"),
        (batch("line-1", 2, [reading(2**63 + 5, T0_US)]), "batch.readings[0].tag_id"),
        (batch("line-1", 2, [reading(1, T0_US, "bad\x00text")]), "batch.readings[0].value.string_value"),
        (batch("line-2", 2, [reading(1, T0_US + 5_000)]), "batch.collector_id"),  # not the stream's collector
        (batch("line-1", 1, [reading(1, T0_US + 5_000)]), "batch.sequence"),  # does not increase
    ],
    ids=["no-collector", "sequence-0", "no-value", "no-time", "no-readings", "tag-id-too-big", "nul-in-text",
         "other-collector", "sequence-not-increasing"],
)
async def test_invalid_batch_ends_the_stream_and_nothing_of_it_is_written(ingest, bad, field: str) -> None:
    good = batch("line-1", 1, [reading(1, T0_US), reading(2, T0_US)])
    call = ingest.stub.StreamReadings()
    await call.write(open_request("line-1"))
    assert (await call.read()).resume.committed_sequence == 0
    await call.write(batch_request(good))
    await call.write(batch_request(bad))
    # the batch before the bad one is committed and acknowledged, then the stream ends
    first = await call.read()
    assert (first.ack.sequence, first.ack.written) == (1, 2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value), field_violations(err.value)
    assert await fetchval(ingest.database_url, COUNT_SQL) == 2
    assert await fetchval(ingest.database_url,
                          "SELECT committed_sequence FROM ingest.collector_sequences WHERE collector_id = 'line-1'") == 1


async def test_stream_must_start_with_open_and_open_only_once(ingest) -> None:
    call = ingest.stub.StreamReadings()
    await call.write(batch_request(batch("line-1", 1, [reading(1, T0_US)])))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "open" in field_violations(err.value)

    call = ingest.stub.StreamReadings()
    await call.write(open_request("line-1"))
    await call.read()
    await call.write(open_request("line-1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "open" in field_violations(err.value)

    call = ingest.stub.StreamReadings()
    await call.write(pb.StreamReadingsRequest(open=pb.StreamOpen(collector_id="Not Valid")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert "open.collector_id" in field_violations(err.value)
    assert await fetchval(ingest.database_url, COUNT_SQL) == 0


VALUES = [
    ("int_value", -(2**63)),
    ("int_value", 2**63 - 1),
    ("uint_value", 2**64 - 1),
    ("uint_value", 2**63),
    ("bool_value", True),
    ("double_value", -12.5e-300),
    ("string_value", "Störung: Ölstand ✓"),
    ("bytes_value", b"\x00\x01\xfe\xff"),
]


async def test_typed_values_round_trip_through_query_and_latest(ingest) -> None:
    readings = [reading(100 + i, T0_US + i * 1000, v, kind=k) for i, (k, v) in enumerate(VALUES)]
    readings.append(reading(200, T0_US, None, quality=reading_pb2.QUALITY_COMMUNICATION_FAILURE,
                            error="timeout after 1s"))
    await stream_batches(ingest.stub, "line-1", [batch("line-1", 1, readings)])
    tag_ids = [r.tag_id for r in readings]
    page = await ingest.stub.QueryReadings(pb.QueryReadingsRequest(filter=query_pb2.ReadingFilter(
        tag_ids=tag_ids, start_time=ts_us(T0_US), end_time=ts_us(T0_US + 60_000_000))))
    by_tag = {r.tag_id: r for r in page.readings}
    latest = await ingest.stub.GetLatestValues(pb.GetLatestValuesRequest(tag_ids=tag_ids))
    latest_by_tag = {r.tag_id: r for r in latest.readings}
    for sent in readings:
        assert by_tag[sent.tag_id] == sent, (by_tag[sent.tag_id], sent)
        assert latest_by_tag[sent.tag_id] == sent
    # and in SQL the uint64 is exactly recoverable
    big = await fetchval(ingest.database_url, "SELECT int_value::numeric + 18446744073709551616"
                                              " FROM ingest.readings WHERE tag_id = 102")
    assert int(big) == 2**64 - 1


async def test_latest_value_never_moves_back_in_time(ingest) -> None:
    await stream_batches(ingest.stub, "line-1", [
        batch("line-1", 1, [reading(5, T0_US + 10_000_000, 10.0)]),
        batch("line-1", 2, [reading(5, T0_US + 5_000_000, 5.0)]),  # late, older reading
    ])
    latest = await ingest.stub.GetLatestValues(pb.GetLatestValuesRequest(tag_ids=[5]))
    assert [r.value.double_value for r in latest.readings] == [10.0]
    await stream_batches(ingest.stub, "line-1", [batch("line-1", 3, [reading(5, T0_US + 20_000_000, 20.0)])])
    latest = await ingest.stub.GetLatestValues(pb.GetLatestValuesRequest(tag_ids=[5]))
    assert [r.value.double_value for r in latest.readings] == [20.0]
    assert await fetchval(ingest.database_url, COUNT_SQL) == 3


async def test_tag_metadata_is_learned_from_readings(ingest) -> None:
    await stream_batches(ingest.stub, "line-1", [
        batch("line-1", 1, [reading(1, T0_US, plc_id="press-1"), reading(2, T0_US, 7, plc_id="press-2",
                                                                        role=PRODUCTION_COUNTER, kind="uint_value")]),
    ])
    await stream_batches(ingest.stub, "line-1", [batch("line-1", 2, [reading(1, T0_US + 1000, plc_id="press-2")])])
    rows = await fetch(ingest.database_url, "SELECT tag_id, plc_id, role FROM ingest.tags ORDER BY tag_id")
    assert [tuple(r) for r in rows] == [(1, "press-2", 1), (2, "press-2", PRODUCTION_COUNTER)]
    by_plc = await ingest.stub.GetLatestValues(pb.GetLatestValuesRequest(plc_id="press-2"))
    assert [(r.tag_id, r.plc_id) for r in by_plc.readings] == [(1, "press-2"), (2, "press-2")]
    assert by_plc.readings[1].role == PRODUCTION_COUNTER
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest.stub.GetLatestValues(pb.GetLatestValuesRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tag_ids" in field_violations(err.value)


async def test_counter_and_machine_state_readings_become_events_in_the_same_transaction(ingest) -> None:
    rs = [reading(1, T0_US, 1.0), reading(2, T0_US, 10, role=PRODUCTION_COUNTER),
          reading(3, T0_US, 1, role=SCRAP_COUNTER), reading(4, T0_US, 1, role=MACHINE_STATE),
          reading(2, T0_US + 1000, 11, role=PRODUCTION_COUNTER)]
    await stream_batches(ingest.stub, "line-1", [batch("line-1", 1, rs)])
    rows = await fetch(ingest.database_url, "SELECT cursor, tag_id, int_value FROM ingest.tag_events ORDER BY cursor")
    assert [(r["tag_id"], r["int_value"]) for r in rows] == [(2, 10), (3, 1), (4, 1), (2, 11)]
    assert [r["cursor"] for r in rows] == sorted({r["cursor"] for r in rows})
    # a replay writes no event either
    await stream_batches(ingest.stub, "line-1", [batch("line-1", 1, rs)])
    assert await fetchval(ingest.database_url, "SELECT count(*) FROM ingest.tag_events") == 4


async def test_full_queue_stops_reading_the_stream_and_nothing_is_acked_before_commit(ingest_factory) -> None:
    # Rows are the budget; large values make the bytes on the wire exceed what HTTP/2 windows can buffer.
    ingest = await ingest_factory(IngestConfig(queue_max_rows=100, group_max_rows=50, group_max_delay=0.001))
    writer = ingest.app.writer
    await stream_batches(ingest.stub, "line-1", numbered_batches("line-1", 1, 10))
    payload = "x" * 60_000
    batches = [batch("line-1", 2 + b, [reading(1 + i, T0_US + 10_000_000 + b * 1000 + i, payload) for i in range(50)])
               for b in range(16)]  # 16 batches of 3 MB: far more than HTTP/2 windows hold

    blocker = await asyncpg.connect(ingest.database_url)
    tx = blocker.transaction()
    await tx.start()
    # Hold the collector's sequence row: the writer's next transaction waits on it, i.e. Postgres is slow.
    await blocker.execute("SELECT * FROM ingest.collector_sequences WHERE collector_id = 'line-1' FOR UPDATE")
    call = ingest.stub.StreamReadings()
    await call.write(open_request("line-1"))
    await call.read()
    acks: list[pb.BatchAck] = []
    sent = 0

    async def send() -> None:
        nonlocal sent
        for b in batches:
            await call.write(batch_request(b))
            sent += 1
        await call.done_writing()

    async def receive() -> None:
        while (response := await call.read()) is not grpc.aio.EOF:
            acks.append(response.ack)

    sender, receiver = asyncio.create_task(send()), asyncio.create_task(receive())
    try:
        await wait_for(lambda: writer.queued_rows >= 100, what="the queue to fill")
        submitted = writer.stats.batches_submitted
        await asyncio.sleep(0.5)  # give a runaway reader every chance to show itself
        assert writer.stats.batches_submitted == submitted  # the stream is no longer read
        assert submitted <= 1 + 2  # the first stream's batch, then the budget's worth of batches
        assert writer.budget.peak <= 100
        assert sent < len(batches) and not sender.done()  # flow control holds the client
        assert acks == []  # nothing committed, nothing acknowledged
    finally:
        await tx.rollback()
        await blocker.close()
    await asyncio.wait_for(asyncio.gather(sender, receiver), timeout=60)
    assert [a.sequence for a in acks] == list(range(2, 18))
    assert await fetchval(ingest.database_url, COUNT_SQL) == 10 + 16 * 50
    assert writer.budget.peak <= 100


async def test_a_batch_postgres_rejects_fails_alone_and_the_rest_of_its_group_is_written(ingest) -> None:
    """Bypass the conversion checks to hand the writer a row Postgres refuses (text with NUL)."""
    writer = ingest.app.writer
    good = batch_from_proto(batch("line-1", 1, [reading(1, T0_US)]))
    row = batch_from_proto(batch("line-2", 1, [reading(2, T0_US, "x")])).rows[0]
    bad = WriteBatch("line-2", 1, [row[:6] + ("bad\x00", *row[7:])])
    other = batch_from_proto(batch("line-3", 1, [reading(3, T0_US)]))
    for b in (good, bad, other):  # what the stream handler adds for the committed-readings feed
        b.payload = batch(b.collector_id, b.sequence, [reading(1, T0_US)]).SerializeToString()
    sessions = [StreamSession(c) for c in ("line-1", "line-2", "line-3")]
    futures = [await writer.submit(s, b) for s, b in zip(sessions, (good, bad, other))]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0].written == 1 and results[2].written == 1
    assert isinstance(results[1], InvalidArgument)
    assert sessions[1].failed is results[1] and sessions[0].failed is None
    rows = await fetch(ingest.database_url, "SELECT tag_id FROM ingest.readings ORDER BY tag_id")
    assert [r["tag_id"] for r in rows] == [1, 3]
    committed = await fetch(ingest.database_url,
                            "SELECT collector_id, committed_sequence FROM ingest.collector_sequences ORDER BY 1")
    assert [tuple(r) for r in committed] == [("line-1", 1), ("line-3", 1)]  # line-2: rolled back


async def test_error_details_name_the_reason(ingest) -> None:
    call = ingest.stub.StreamReadings()
    await call.write(open_request("line-1"))
    await call.read()
    await call.write(batch_request(batch("line-1", 0, [reading(1, T0_US)])))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert error_info(err.value).reason == "INVALID_ARGUMENT"


async def test_a_transaction_that_hangs_is_abandoned_unacknowledged_and_the_client_resends(ingest_factory) -> None:
    ingest = await ingest_factory(IngestConfig(transaction_timeout=0.5, group_max_delay=0.001))
    batches = numbered_batches("line-1", 3, 10)
    await stream_batches(ingest.stub, "line-1", batches[:1])
    blocker = await asyncpg.connect(ingest.database_url)
    try:
        async with blocker.transaction():
            # Postgres "hangs" for this collector: its sequence row stays locked past the timeout.
            await blocker.execute("SELECT * FROM ingest.collector_sequences WHERE collector_id = 'line-1' FOR UPDATE")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(stream_batches(ingest.stub, "line-1", batches[1:]), timeout=20)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await blocker.close()
    resume, acks = await stream_batches(ingest.stub, "line-1", batches)
    assert resume == 1 and [(a.sequence, a.duplicate) for a in acks] == [(1, True), (2, False), (3, False)]
    assert await fetchval(ingest.database_url, COUNT_SQL) == 30
