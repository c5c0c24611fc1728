"""WatchLatestValues: a snapshot of the latest values, then only the tags whose latest reading changed, as
batches commit; a reconnect starts with a snapshot again; a bad request is refused with its field."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from fabrica.ingest.v1 import ingest_service_pb2 as pb

from grpc_helpers import field_violations

from .support import TEST_CONFIG, Ingest, batch, reading, stream_batches

T0 = 1_700_000_000_000_000  # microseconds


async def _next(call, timeout: float = 10.0) -> pb.WatchLatestValuesResponse:  # noqa: ANN001 - a stream call
    return await asyncio.wait_for(call.read(), timeout)


async def test_a_snapshot_then_only_what_changed(ingest_factory) -> None:  # noqa: ANN001 - the fixture
    ingest: Ingest = await ingest_factory(dataclasses.replace(TEST_CONFIG, latest_watch_interval=0.05))
    await stream_batches(ingest.stub, "watch", [batch("watch", 1, [
        reading(1, T0, 1.5, plc_id="plc-a"), reading(2, T0, 7, plc_id="plc-a"), reading(3, T0, 9.0, plc_id="plc-b")])])
    call = ingest.stub.WatchLatestValues(pb.WatchLatestValuesRequest(plc_id="plc-a"))
    first = await _next(call)
    assert first.snapshot and [(r.tag_id, r.value.double_value or r.value.int_value) for r in first.readings] == [
        (1, 1.5), (2, 7)]

    # A newer reading of one tag (and one of another PLC's): only that tag comes, in order of commit.
    await stream_batches(ingest.stub, "watch", [batch("watch", 2, [
        reading(2, T0 + 1_000, 8, plc_id="plc-a"), reading(3, T0 + 1_000, 10.0, plc_id="plc-b")])])
    second = await _next(call)
    assert not second.snapshot
    assert [(r.tag_id, r.value.int_value) for r in second.readings] == [(2, 8)]
    # An older reading changes nothing (latest never moves back), so nothing is sent for it.
    await stream_batches(ingest.stub, "watch", [batch("watch", 3, [reading(1, T0 - 1_000, 0.5, plc_id="plc-a")]),
                                                batch("watch", 4, [reading(1, T0 + 2_000, 2.5, plc_id="plc-a")])])
    third = await _next(call)
    assert [(r.tag_id, r.value.double_value) for r in third.readings] == [(1, 2.5)]
    call.cancel()

    # By tag ids; a new stream starts with the current state.
    again = ingest.stub.WatchLatestValues(pb.WatchLatestValuesRequest(tag_ids=[3, 1]))
    snap = await _next(again)
    assert snap.snapshot and [(r.tag_id, r.value.double_value) for r in snap.readings] == [(1, 2.5), (3, 10.0)]
    again.cancel()


@pytest.mark.parametrize("request_, field", [
    (pb.WatchLatestValuesRequest(), "tag_ids"),
    (pb.WatchLatestValuesRequest(tag_ids=[0]), "tag_ids[0]"),
    (pb.WatchLatestValuesRequest(plc_id="no spaces"), "plc_id"),
])
async def test_a_bad_request_is_refused_with_its_field(ingest: Ingest, request_: pb.WatchLatestValuesRequest,
                                                       field: str) -> None:
    call = ingest.stub.WatchLatestValues(request_)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _next(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
