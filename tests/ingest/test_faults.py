"""Process-level faults: ingest killed with SIGKILL, Postgres stopped mid-stream. Counted afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from fabrica_svc.clients.ingest import IngestUplink, ListBatchSource
from fabrica_svc.runtime.channels import PEER_CHANNEL_OPTIONS
from fabrica_svc.runtime.retry import RetryPolicy
from fabrica_svc.ingest.config import IngestConfig

from procs import start_postgres, stop_postgres

from .support import (
    PRODUCTION_COUNTER,
    IngestProcess,
    fetch,
    fetchval,
    free_port,
    health_status,
    numbered_batches,
    start_ingest,
    stop_ingest,
    wait_for,
)

pytestmark = pytest.mark.slow

COUNT = "SELECT count(*) FROM ingest.readings"
DISTINCT = "SELECT count(*) FROM (SELECT DISTINCT tag_id, read_time FROM ingest.readings) d"
COMMITTED = "SELECT committed_sequence FROM ingest.collector_sequences WHERE collector_id = $1"


class HookedSource(ListBatchSource):
    """A source that calls `on_ack(sequence)` on every acknowledgement and can be held closed."""

    def __init__(self, batches, on_ack=None):
        super().__init__(batches)
        self.on_ack = on_ack
        self.open = asyncio.Event()
        self.open.set()
        self.resumed_from: list[int] = []

    async def batches_after(self, sequence: int):
        self.resumed_from.append(sequence)
        for b in self.batches:
            if b.sequence > sequence:
                await self.open.wait()
                yield b

    async def acknowledged(self, sequence: int) -> None:
        await super().acknowledged(sequence)
        if self.on_ack is not None:
            self.on_ack(sequence)


async def test_ingest_killed_mid_stream_and_restarted_stores_exactly_100000_readings(
        database_url, processes, tmp_path: Path) -> None:
    ingest = IngestProcess(free_port(), database_url, tmp_path / "ingest.log")
    processes.append(ingest)
    await ingest.start()
    batches = numbered_batches("line-1", 200, 500, tags=100)  # 100,000 readings
    restarted: list[asyncio.Task[None]] = []
    killed_at: list[int] = []

    def on_ack(sequence: int) -> None:
        if sequence >= 40 and not killed_at:
            killed_at.append(sequence)
            ingest.kill()  # SIGKILL, with batches in flight
            restarted.append(asyncio.create_task(ingest.start()))

    source = HookedSource(batches, on_ack)
    async with grpc.aio.insecure_channel(ingest.address, options=PEER_CHANNEL_OPTIONS) as channel:
        uplink = IngestUplink(channel, "line-1", source, max_in_flight=32,
                              retry=RetryPolicy(initial=0.05, maximum=0.5))
        stats = await asyncio.wait_for(uplink.run(), timeout=90)
    await restarted[0]
    assert killed_at and killed_at[0] < 200
    assert stats.streams >= 2 and grpc.StatusCode.UNAVAILABLE in stats.errors
    assert len(source.resumed_from) >= 2 and source.resumed_from[0] == 0
    assert await fetchval(database_url, COUNT) == 100_000
    assert await fetchval(database_url, DISTINCT) == 100_000
    assert await fetchval(database_url, COMMITTED, "line-1") == 200
    values = await fetch(database_url, "SELECT min(value) AS lo, max(value) AS hi, sum(value) AS s FROM ingest.readings")
    assert (values[0]["lo"], values[0]["hi"], values[0]["s"]) == (0.0, 99_999.0, sum(range(100_000)))


async def test_postgres_stopped_mid_stream_nothing_uncommitted_is_acked_and_the_client_completes(private_postgres) -> None:
    server = private_postgres
    dsn = server.get_uri()
    ingest = await start_ingest(dsn, IngestConfig(group_max_delay=0.002, group_max_rows=2_000), health_interval=0.2)
    try:
        batches = numbered_batches("line-1", 120, 500, tags=50)
        stopping: list[int] = []
        source = HookedSource(batches, lambda seq: stopping.append(seq) if seq >= 30 and not stopping else None)
        uplink = IngestUplink(ingest.channel, "line-1", source, max_in_flight=16,
                              retry=RetryPolicy(initial=0.05, maximum=0.3))
        run = asyncio.create_task(uplink.run())
        await wait_for(lambda: stopping, what="30 batches acknowledged")
        source.open.clear()  # after the restart the client must wait until the database is checked
        await asyncio.to_thread(stop_postgres, server)

        await wait_for(lambda: health_status(ingest.channel), what="health answers")
        await wait_for(lambda: _status_is(ingest.channel, health_pb2.HealthCheckResponse.NOT_SERVING),
                       what="NOT_SERVING")
        await wait_for(lambda: grpc.StatusCode.UNAVAILABLE in uplink.stats.errors, what="the stream to end UNAVAILABLE")
        acked_while_down = uplink.stats.acked_sequence
        assert acked_while_down < 120
        await asyncio.sleep(1.0)
        assert uplink.stats.acked_sequence == acked_while_down  # nothing acknowledged without a database
        assert not run.done()

        resumes_before = len(source.resumed_from)
        await asyncio.to_thread(start_postgres, server)
        await wait_for(lambda: _status_is(ingest.channel, health_pb2.HealthCheckResponse.SERVING),
                       timeout=30, what="SERVING again")
        await wait_for(lambda: len(source.resumed_from) > resumes_before, timeout=30, what="the client to resume")
        resumed = source.resumed_from[-1]
        # Everything acknowledged is stored, whole batches only, nothing twice.
        assert resumed >= acked_while_down
        assert await fetchval(dsn, COMMITTED, "line-1") == resumed
        assert await fetchval(dsn, COUNT) == resumed * 500
        assert await fetchval(dsn, DISTINCT) == resumed * 500

        source.open.set()
        stats = await asyncio.wait_for(run, timeout=60)
        assert stats.acked_sequence == 120
        assert await fetchval(dsn, COUNT) == 60_000
        assert await fetchval(dsn, DISTINCT) == 60_000
        assert await fetchval(dsn, COMMITTED, "line-1") == 120
    finally:
        await stop_ingest(ingest)


async def _status_is(channel: grpc.aio.Channel, status: int) -> bool:
    return await health_status(channel) == status


async def test_watch_resumed_after_ingest_restart_delivers_every_later_event_once(
        database_url, processes, tmp_path: Path) -> None:
    ingest = IngestProcess(free_port(), database_url, tmp_path / "ingest.log")
    processes.append(ingest)
    await ingest.start()
    first = numbered_batches("c1", 30, 8, tags=4, role=PRODUCTION_COUNTER)
    second = numbered_batches("c2", 60, 8, tags=4, role=PRODUCTION_COUNTER, tag_base=100, start_us=1_800_000_000_000_000)
    async with grpc.aio.insecure_channel(ingest.address, options=PEER_CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        await IngestUplink(channel, "c1", ListBatchSource(first)).run()
        received = []
        watch = stub.WatchTagEvents(pb.WatchTagEventsRequest(after_cursor=0))
        writer = asyncio.create_task(IngestUplink(channel, "c2", ListBatchSource(second),
                                                  retry=RetryPolicy(initial=0.05, maximum=0.5)).run())
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(30):
                    async for response in watch:
                        received += response.events
                        if len(received) >= 300:  # caught up on c1, part way through c2
                            ingest.kill()
        except TimeoutError:  # say where it stood (a failure seen once under load, cause not known yet)
            ended = writer.exception() if writer.done() and not writer.cancelled() else None
            raise AssertionError(f"the watch neither reached 300 events nor ended: {len(received)} received; the "
                                 f"c2 writer {'ended: ' + repr(ended) if writer.done() else 'still running'}") from None
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        last = received[-1].cursor
        await ingest.start()
        await asyncio.wait_for(writer, timeout=60)  # the writer's uplink rode through the restart
        everything = await fetch(database_url, "SELECT cursor, value FROM ingest.tag_events ORDER BY cursor")
        assert len(everything) == 30 * 8 + 60 * 8
        later = [(r["cursor"], r["value"]) for r in everything if r["cursor"] > last]
        resumed = []
        watch = stub.WatchTagEvents(pb.WatchTagEventsRequest(after_cursor=last))
        async with asyncio.timeout(30):
            async for response in watch:
                resumed += response.events
                if len(resumed) >= len(later):
                    break
        watch.cancel()
    assert [(e.cursor, e.value.double_value) for e in resumed] == later
    seen = [e.cursor for e in received] + [e.cursor for e in resumed]
    assert seen == [r["cursor"] for r in everything]  # before and after the restart: each event once
