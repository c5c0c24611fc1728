"""Real ingest → production: readings streamed into ingest's StreamReadings come out of WatchTagEvents and are
booked by production's consumer exactly once, through replica hand-over, ingest outages and a SIGKILL."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as ipb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from fabrica.production.v1 import order_pb2 as S
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabrica_svc.runtime.server import ServiceHost
from in_process import settings_for, start_server
from procs import ServiceProcess, free_port

from .support import GOOD_TAG, SCRAP_TAG, STATE_TAG, booked_total, fetchval, new_order, seed, start_production, ts, \
    wait_for

REPO = Path(__file__).resolve().parents[2]
PLC = "press-plc"
ROLES = {GOOD_TAG: reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, SCRAP_TAG: reading_pb2.TAG_ROLE_SCRAP_COUNTER,
         STATE_TAG: reading_pb2.TAG_ROLE_MACHINE_STATE}


async def start_ingest(database_url: str, port: int = 0) -> ServiceHost:
    return await start_server("ingest", settings_for("ingest", database_url=database_url, port=port))


@pytest.fixture
async def ingest(database_url: str) -> AsyncIterator[ServiceHost]:
    host = await start_ingest(database_url)
    yield host
    await host.stop(grace=0)


class Plc:
    """A simulated press as the collector would report it: a 16-bit good counter, a scrap counter and the
    machine state, sent to ingest as numbered ReadingBatches over StreamReadings."""

    def __init__(self, ingest_address: str, good: int = 65_000, scrap: int = 0):
        self.address = ingest_address
        self.good, self.scrap = good, scrap
        self.good_advance = self.scrap_advance = 0
        self.sequence = 0
        self.readings = 0
        #: (good advance, scrap advance) after each reading, in reading order.
        self.history: list[tuple[int, int]] = []
        self.steps = itertools.cycle([1, 2, 3, 1, 4, 2, 5])  # deterministic, uneven increments
        self.clock = datetime.now(UTC)

    def _reading(self, tag: int, value: int) -> reading_pb2.Reading:
        # Distinct, increasing read times (ahead of any order started before the readings are made).
        self.clock = max(self.clock + timedelta(milliseconds=1), datetime.now(UTC))
        self.readings += 1
        self.history.append((self.good_advance, self.scrap_advance))
        r = reading_pb2.Reading(tag_id=tag, read_time=ts(self.clock), quality=reading_pb2.QUALITY_GOOD,
                                plc_id=PLC, role=ROLES[tag])
        r.value.uint_value = value
        return r

    def baseline(self) -> list[reading_pb2.Reading]:
        """The first values production sees: its baseline, not booked."""
        return [self._reading(GOOD_TAG, self.good), self._reading(SCRAP_TAG, self.scrap)]

    def cycle(self, n: int) -> list[reading_pb2.Reading]:
        """`n` counter readings; every fourth one also reads one more scrap part."""
        out = []
        for i in range(n):
            step = next(self.steps)
            self.good = (self.good + step) % 2**16
            self.good_advance += step
            out.append(self._reading(GOOD_TAG, self.good))
            if i % 4 == 3:
                self.scrap += 1
                self.scrap_advance += 1
                out.append(self._reading(SCRAP_TAG, self.scrap))
        return out

    def state(self, value: int) -> list[reading_pb2.Reading]:
        return [self._reading(STATE_TAG, value)]

    async def send(self, batches: Sequence[list[reading_pb2.Reading]]) -> None:
        """One StreamReadings stream: open, the batches, and every acknowledgement back."""
        # A channel of its own (not the process-wide subchannel, which may still be backing off from an
        # attempt made before ingest was up).
        async with grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = ipb_grpc.IngestServiceStub(channel).StreamReadings()
            await call.write(ipb.StreamReadingsRequest(open=ipb.StreamOpen(collector_id="cell-1")))
            resume = await call.read()
            assert resume.resume.committed_sequence == self.sequence
            sent = []
            for readings in batches:
                self.sequence += 1
                sent.append(self.sequence)
                await call.write(ipb.StreamReadingsRequest(batch=reading_pb2.ReadingBatch(
                    collector_id="cell-1", sequence=self.sequence, readings=readings)))
            await call.done_writing()
            acks = []
            while (response := await call.read()) is not grpc.aio.EOF:
                acks.append(response.ack.sequence)
            assert acks == sent


async def last_event_cursor(ingest_address: str, events: int) -> int:
    """The cursor of the `events`-th tag event, read from ingest's own WatchTagEvents (bounded)."""
    seen: list[int] = []
    async with grpc.aio.insecure_channel(ingest_address) as channel:
        call = ipb_grpc.IngestServiceStub(channel).WatchTagEvents(ipb.WatchTagEventsRequest(), timeout=30)
        async for msg in call:
            seen += [e.cursor for e in msg.events]
            if len(seen) >= events:
                call.cancel()
                break
    assert len(seen) == events, f"ingest has {len(seen)} events, expected {events}"
    return seen[-1]


async def consumer_cursor(database_url: str) -> int:
    return int(await fetchval(database_url, "SELECT cursor FROM production.consumer_cursor"))


async def test_ingest_to_production_books_and_completes_the_order(ingest: ServiceHost, database_url: str) -> None:
    production = await start_production(database_url, ingest.address)
    try:
        async with grpc.aio.insecure_channel(production.address) as ch:
            stub = pb_grpc.ProductionServiceStub(ch)
            await seed(stub)
            order = await new_order(stub, planned=60, start=True)
            watch = stub.WatchOrders(pb.WatchOrdersRequest(work_center_id="press-1"))
            snapshot = await watch.read()
            assert snapshot.snapshot and snapshot.orders[0].state == S.ORDER_STATE_IN_PROGRESS

            plc = Plc(ingest.address)
            await plc.send([plc.baseline() + plc.state(1)])
            await plc.send([plc.cycle(5), plc.state(0), plc.state(1)])  # a short stop
            while plc.good_advance < 60:
                await plc.send([plc.cycle(3)])
            await plc.send([plc.cycle(5)])  # made after the order completed: not booked
            # The order completes at the first good reading that reaches 60; later readings are not its.
            good, scrap = next((g, s) for g, s in plc.history if g >= 60)

            done = None
            async with asyncio.timeout(30):
                while done is None:
                    msg = await watch.read()
                    assert msg is not grpc.aio.EOF
                    done = next((o for o in msg.orders if o.id == order.id and o.state == S.ORDER_STATE_COMPLETED),
                                None)
            watch.cancel()
            assert (done.good_quantity, done.scrap_quantity) == (good, scrap)
            assert good >= 60 and plc.good_advance > good

            last = await last_event_cursor(ingest.address, plc.readings)
            await wait_for(lambda: _at(database_url, last), what="the consumer to catch up")
            assert await booked_total(database_url, order.id) == good
            assert (await stub.GetOrder(pb.GetOrderRequest(id=order.id))).order == done
            stops = (await stub.ListDowntimes(pb.ListDowntimesRequest(
                work_center_id="press-1", end_time=ts(plc.clock + timedelta(seconds=1))))).downtimes
            assert len(stops) == 1 and stops[0].automatic and stops[0].order_id == order.id
            assert stops[0].HasField("end_time")
    finally:
        await production.stop(grace=0)


async def _at(database_url: str, cursor: int) -> bool:
    return await consumer_cursor(database_url) >= cursor


async def test_one_replica_consumes_and_a_standby_takes_over(ingest: ServiceHost, database_url: str) -> None:
    a = await start_production(database_url, ingest.address)
    b = await start_production(database_url, ingest.address)
    stopped: list[ServiceHost] = []
    try:
        replicas = {a.app.consumer: a, b.app.consumer: b}  # type: ignore[attr-defined]
        active = await wait_for(lambda: [c for c in replicas if c.active.is_set()], what="one active consumer")
        await asyncio.sleep(0.5)  # the other has tried the lock a few times by now (every 0.1 s)
        assert [c for c in replicas if c.active.is_set()] == active and len(active) == 1
        assert await fetchval(database_url, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                                            " WHERE l.locktype = 'advisory' AND l.granted"
                                            " AND a.application_name = 'fabrica-production-consumer'") == 1
        async with grpc.aio.insecure_channel(a.address) as ch:
            stub = pb_grpc.ProductionServiceStub(ch)
            await seed(stub)
            order = await new_order(stub, planned=1_000_000, start=True)
        plc = Plc(ingest.address)
        await plc.send([plc.baseline(), plc.cycle(20)])
        await wait_for(lambda: _booked(database_url, order.id, plc.good_advance), what="bookings by the first")

        first = replicas[active[0]]
        await first.stop(grace=0)  # its session ends: the lock is free
        stopped.append(first)
        standby = next(c for c in replicas if c is not active[0])
        await wait_for(standby.active.is_set, what="the stand-by to take over")
        await plc.send([plc.cycle(20), plc.cycle(20)])
        await wait_for(lambda: _booked(database_url, order.id, plc.good_advance), what="bookings by the second")
        last = await last_event_cursor(ingest.address, plc.readings)
        await wait_for(lambda: _at(database_url, last), what="the consumer to catch up")
        assert await booked_total(database_url, order.id) == plc.good_advance
        assert await booked_total(database_url, order.id, "scrap_quantity") == plc.scrap_advance
    finally:
        for host in (a, b):
            if not any(host is done for done in stopped):
                await host.stop(grace=0)


async def _booked(database_url: str, order_id: str, expected: int) -> bool:
    return await booked_total(database_url, order_id) >= expected


async def test_consumer_waits_for_ingest_and_catches_up(database_url: str) -> None:
    port = free_port()  # nothing listens here yet
    production = await start_production(database_url, f"127.0.0.1:{port}")
    ingest = None
    try:
        async with grpc.aio.insecure_channel(production.address) as ch:
            stub = pb_grpc.ProductionServiceStub(ch)
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING, "production serves without ingest"
            await seed(stub)
            order = await new_order(stub, planned=1_000_000, start=True)
            ingest = await start_ingest(database_url, port)
            plc = Plc(ingest.address)
            await plc.send([plc.baseline(), plc.cycle(10)])
            await wait_for(lambda: _booked(database_url, order.id, plc.good_advance), what="bookings")
            assert await booked_total(database_url, order.id) == plc.good_advance
    finally:
        await production.stop(grace=0)
        if ingest is not None:
            await ingest.stop(grace=0)


async def _serving(address: str, proc: ServiceProcess) -> bool:
    if proc.proc is not None and proc.proc.poll() is not None:
        raise AssertionError(f"production exited with {proc.proc.returncode}:\n{proc.log()}")
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
async def test_sigkill_mid_stream_then_restart_books_exactly_the_counter_advance(
        ingest: ServiceHost, database_url: str, tmp_path: Path) -> None:
    env = {"DATABASE_URL": database_url, "FABRICA_INGEST_ADDR": ingest.address, "FABRICA_METRICS_PORT": "-1",
           "FABRICA_LOG_FORMAT": "text",
           "PYTHONPATH": os.pathsep.join([str(REPO / "gen"), str(REPO / "services"), os.environ.get("PYTHONPATH", "")])}
    first = ServiceProcess("production", env, tmp_path / "production-1.log")
    second = ServiceProcess("production", env, tmp_path / "production-2.log")
    try:
        first.start(wait=False)
        await wait_for(lambda: _serving(first.address, first), timeout=60, interval=0.1, what="production SERVING")
        async with grpc.aio.insecure_channel(first.address) as ch:
            stub = pb_grpc.ProductionServiceStub(ch)
            await seed(stub)
            order = await new_order(stub, planned=1_000_000, start=True)

        plc = Plc(ingest.address, good=65_450)  # wraps after 86 parts
        await plc.send([plc.baseline()])
        killed = asyncio.Event()

        async def feed_first_half() -> None:
            for _ in range(60):  # bounded; the kill comes as soon as anything is booked
                await plc.send([plc.cycle(3), plc.cycle(3)])
                if killed.is_set():
                    return
                await asyncio.sleep(0.01)

        feeder = asyncio.create_task(feed_first_half())
        await wait_for(lambda: _booked(database_url, order.id, 1), what="the first bookings")
        first.kill()  # SIGKILL, while events are streaming
        killed.set()
        await feeder
        booked_at_kill = await booked_total(database_url, order.id)
        assert booked_at_kill > 0

        # More parts while production is dead.
        for _ in range(10):
            await plc.send([plc.cycle(4)])
        assert await booked_total(database_url, order.id) < plc.good_advance, "the dead process booked nothing"

        second.start(wait=False)
        await wait_for(lambda: _serving(second.address, second), timeout=60, interval=0.1, what="restart")
        last = await last_event_cursor(ingest.address, plc.readings)
        await wait_for(lambda: _at(database_url, last), timeout=30, what="the restarted consumer to catch up")
        assert await booked_total(database_url, order.id) == plc.good_advance
        assert await booked_total(database_url, order.id, "scrap_quantity") == plc.scrap_advance
        increments = await fetchval(database_url, "SELECT count(*) FROM production.bookings WHERE order_id = $1",
                                    int(order.id))
        assert increments == await fetchval(database_url, "SELECT count(DISTINCT source_cursor)"
                                                          " FROM production.bookings WHERE order_id = $1",
                                            int(order.id))
        async with grpc.aio.insecure_channel(second.address) as ch:
            got = (await pb_grpc.ProductionServiceStub(ch).GetOrder(pb.GetOrderRequest(id=order.id))).order
        assert (got.good_quantity, got.scrap_quantity) == (plc.good_advance, plc.scrap_advance)
        assert plc.good_advance > 86 and plc.good < 65_450, "the 16-bit counter wrapped on the way"
        assert "consuming tag events" in second.log(), "the restarted process did the catching up"
        print(f"booked before SIGKILL: {booked_at_kill}; after restart: {plc.good_advance} = the counter's advance")
    finally:
        first.kill()
        second.kill()
