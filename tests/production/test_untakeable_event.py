"""A tag event production cannot take is recorded as an anomaly and passed: later bookings still happen.

Real ingest → WatchTagEvents → production's consumer. The untakeable event is a counter step the order's
total cannot hold: a 64-bit counter with the largest jump limit that books 2^63 - 1 parts to an order that
has 5 already (the total would be beyond Postgres's bigint). Applying it fails the same way every time; the
consumer used to retry it from the same cursor for ever, and no booking was made again."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from fabrica.production.v1 import order_pb2 as S
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc

from fabrica_svc.runtime.server import ServiceHost

from .support import GOOD_TAG, booked_total, fetchval, new_order, seed, start_production, wait_for
from .test_consumer_e2e import Plc, _at, last_event_cursor, start_ingest

MAX_INT64 = 2**63 - 1


@pytest.fixture
async def ingest(database_url: str) -> AsyncIterator[ServiceHost]:
    host = await start_ingest(database_url)
    yield host
    await host.stop(grace=0)


async def test_an_event_that_cannot_be_taken_is_an_anomaly_and_later_bookings_still_happen(
        ingest: ServiceHost, database_url: str) -> None:
    production = await start_production(database_url, ingest.address)
    try:
        async with grpc.aio.insecure_channel(production.address) as ch:
            stub = pb_grpc.ProductionServiceStub(ch)
            await seed(stub, counter_width=64, max_counter_jump=MAX_INT64)
            order = await new_order(stub, planned=1000, start=True)

            plc = Plc(ingest.address, good=0)
            await plc.send([plc.baseline()])
            await plc.send([[plc._reading(GOOD_TAG, 5)]])  # books 5
            await plc.send([[plc._reading(GOOD_TAG, 5 + MAX_INT64)]])  # 5 + (2^63 - 1) parts: cannot be taken
            poison = await last_event_cursor(ingest.address, plc.readings)
            await plc.send([[plc._reading(GOOD_TAG, 8)]])  # from the baseline 5: books 3
            await plc.send([[plc._reading(GOOD_TAG, 20)], [plc._reading(GOOD_TAG, 21)]])  # books 12, then 1

            last = await last_event_cursor(ingest.address, plc.readings)
            await wait_for(lambda: _at(database_url, last), what="the consumer to pass the untakeable event")
            assert await booked_total(database_url, order.id) == 21
            assert await fetchval(database_url, "SELECT count(*) FROM production.bookings WHERE order_id = $1",
                                  int(order.id)) == 4
            kinds = await fetchval(database_url, "SELECT array_agg(kind || ':' || cursor ORDER BY id)"
                                                 " FROM production.tag_anomalies")
            assert kinds == [f"UNTAKEABLE:{poison}"]
            got = (await stub.GetOrder(pb.GetOrderRequest(id=order.id))).order
            assert (got.state, got.good_quantity) == (S.ORDER_STATE_IN_PROGRESS, 21)
    finally:
        await production.stop(grace=0)
