"""WatchOrders: a snapshot, live changes made through another replica (LISTEN/NOTIFY), exact resume, resync."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2 as S
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc

from fabrica_svc.production import servicer as production_servicer
from fabrica_svc.runtime.server import ServiceHost

from .support import execute, new_order, seed, start_production


@pytest.fixture
async def two_replicas(database_url: str) -> AsyncIterator[tuple[ServiceHost, ServiceHost]]:
    a = await start_production(database_url)
    b = await start_production(database_url)
    yield a, b
    await a.stop(grace=0)
    await b.stop(grace=0)


class Watch:
    """A WatchOrders stream read in the background into a queue."""

    def __init__(self, stub: pb_grpc.ProductionServiceStub, after: int = 0, work_center: str = ""):
        self.call = stub.WatchOrders(pb.WatchOrdersRequest(after_revision=after, work_center_id=work_center))
        self.queue: asyncio.Queue[pb.WatchOrdersResponse] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.call:
            await self.queue.put(msg)

    async def next(self, timeout: float = 10.0) -> pb.WatchOrdersResponse:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_snapshot_then_live_changes_from_another_replica_then_exact_resume(
        two_replicas: tuple[ServiceHost, ServiceHost], database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the fallback poll out of reach, only a NOTIFY from replica B can wake the watcher on A.
    monkeypatch.setattr(production_servicer, "WATCH_POLL_SECONDS", 300.0)
    a, b = two_replicas
    async with grpc.aio.insecure_channel(a.address) as ch_a, grpc.aio.insecure_channel(b.address) as ch_b:
        stub_a, stub_b = pb_grpc.ProductionServiceStub(ch_a), pb_grpc.ProductionServiceStub(ch_b)
        await seed(stub_b)
        planned = await new_order(stub_b, "PO-1")
        done_today = await new_order(stub_b, "PO-2", start=True)
        done_today = (await stub_b.CompleteOrder(pb.CompleteOrderRequest(id=done_today.id))).order
        done_long_ago = await new_order(stub_b, "PO-3", start=True)
        await stub_b.CancelOrder(pb.CancelOrderRequest(id=done_long_ago.id))
        await execute(database_url, "UPDATE production.orders SET end_time = now() - interval '2 days'"
                                    " WHERE id = $1", int(done_long_ago.id))

        watch = Watch(stub_a)
        first = await watch.next()
        assert first.snapshot
        assert [o.number for o in first.orders] == ["PO-1", "PO-2"], "open orders and today's closed ones"
        assert first.orders[1] == done_today

        started = (await stub_b.StartOrder(pb.StartOrderRequest(id=planned.id))).order
        change = await watch.next()
        assert not change.snapshot and list(change.orders) == [started]
        assert change.revision == int(started.etag.removeprefix("r"))
        booked = await stub_b.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(
            order_id=planned.id, good_quantity=7)))
        assert booked.booking.good_quantity == 7
        change2 = await watch.next()
        assert change2.orders[0].good_quantity == 7 and change2.revision > change.revision
        last_seen = change2.revision
        await watch.close()

        # While disconnected: a new order and a pause.
        p4 = await new_order(stub_b, "PO-4")
        paused = (await stub_b.PauseOrder(pb.PauseOrderRequest(id=planned.id))).order
        resumed = Watch(stub_a, after=last_seen)
        msg = await resumed.next()
        assert not msg.snapshot
        assert [(o.number, o.state) for o in msg.orders] == [("PO-4", S.ORDER_STATE_PLANNED),
                                                             ("PO-1", S.ORDER_STATE_PAUSED)]
        assert msg.orders[0] == p4 and msg.orders[1] == paused
        with pytest.raises(TimeoutError):  # nothing repeated from before the resume point
            await resumed.next(timeout=0.5)
        await stub_b.ResumeOrder(pb.ResumeOrderRequest(id=planned.id))
        assert (await resumed.next()).orders[0].state == S.ORDER_STATE_IN_PROGRESS
        await resumed.close()


async def test_work_center_filter_and_resync(two_replicas: tuple[ServiceHost, ServiceHost],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = two_replicas
    async with grpc.aio.insecure_channel(a.address) as ch:
        stub = pb_grpc.ProductionServiceStub(ch)
        await seed(stub)
        await stub.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=md.WorkCenter(
            id="press-2", display_name="Press 2", sector_id="pressing")))
        await new_order(stub, "P1-A")
        other = await new_order(stub, "P2-A", work_center="press-2")

        watch = Watch(stub, work_center="press-2")
        snap = await watch.next()
        assert snap.snapshot and [o.number for o in snap.orders] == ["P2-A"]
        await new_order(stub, "P1-B")  # another work centre's: not sent
        started = (await stub.StartOrder(pb.StartOrderRequest(id=other.id))).order
        msg = await watch.next()
        assert list(msg.orders) == [started]
        await watch.close()

        monkeypatch.setattr(production_servicer, "MAX_RESUME_REVISIONS", 2)
        for i in range(3):
            await new_order(stub, f"P1-C{i}")
        stale = Watch(stub, after=msg.revision)  # more than 2 revisions behind: a fresh snapshot
        again = await stale.next()
        assert again.snapshot and len(again.orders) == 6
        await stale.close()
        future = Watch(stub, after=again.revision + 1000)  # e.g. a UI that saw another database
        resync = await future.next()
        assert resync.snapshot and resync.revision == again.revision
        await future.close()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchOrders(pb.WatchOrdersRequest(after_revision=-1)):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
