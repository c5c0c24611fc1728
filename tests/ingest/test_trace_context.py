"""A batch's trace context (ReadingBatch.trace_context) reaches production through the tag events of its readings
when the trace is sampled, and only then."""

from __future__ import annotations

import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from grpc_helpers import field_violations

from .support import T0_US, batch, reading, start_ingest, stream_batches
from .test_events import collect

COUNTER = reading_pb2.TAG_ROLE_PRODUCTION_COUNTER
SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
#: W3C level 2's random flag (0x02) without the sampled one: not sampled.
UNSAMPLED = "00-5bf92f3577b34da6a3ce929d0e0e4736-10f067aa0ba902b7-02"
#: Sampled and random, as the OpenTelemetry SDK writes it.
SAMPLED_RANDOM = "00-6bf92f3577b34da6a3ce929d0e0e4736-20f067aa0ba902b7-03"


async def test_tag_events_carry_the_sampled_context_of_their_batch(database_url: str) -> None:
    ingest = await start_ingest(database_url)
    try:
        first = batch("cell-1", 1, [reading(7, T0_US, 1, role=COUNTER), reading(8, T0_US, 2, role=COUNTER)])
        first.trace_context.traceparent = SAMPLED
        first.trace_context.tracestate = "fabrica=1"
        second = batch("cell-1", 2, [reading(7, T0_US + 1, 3, role=COUNTER)])
        second.trace_context.traceparent = UNSAMPLED
        third = batch("cell-1", 3, [reading(7, T0_US + 2, 4, role=COUNTER)])
        fourth = batch("cell-1", 4, [reading(8, T0_US + 3, 5, role=COUNTER)])
        fourth.trace_context.traceparent = SAMPLED_RANDOM
        _, acks = await stream_batches(ingest.stub, "cell-1", [first, second, third, fourth])
        assert [a.sequence for a in acks] == [1, 2, 3, 4]
        events = await collect(ingest.stub, pb.WatchTagEventsRequest(after_cursor=0), 5)
        assert [(e.trace_context.traceparent, e.trace_context.tracestate) for e in events] == [
            (SAMPLED, "fabrica=1"), (SAMPLED, "fabrica=1"), ("", ""), ("", ""), (SAMPLED_RANDOM, "")]
        assert not events[2].HasField("trace_context")
    finally:
        await ingest.stop()


async def test_a_malformed_trace_context_is_invalid_argument_naming_the_field(database_url: str) -> None:
    ingest = await start_ingest(database_url)
    try:
        for field, value in (("traceparent", "00-not-a-trace-01"), ("tracestate", "k=" + "v" * 600)):
            bad = batch("cell-1", 1, [reading(7, T0_US, 1, role=COUNTER)])
            setattr(bad.trace_context, field, value)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream_batches(ingest.stub, "cell-1", [bad])
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"batch.trace_context.{field}" in field_violations(caught.value)
    finally:
        await ingest.stop()
