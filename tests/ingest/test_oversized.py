"""Oversized readings and batches at a real ingest server: a value beyond the contract's 64 KiB is
INVALID_ARGUMENT on its field, a batch up to the one message size limit is stored, and only one beyond
that limit is the transport's RESOURCE_EXHAUSTED. Nothing of a refused batch is stored."""

from __future__ import annotations

import grpc
import pytest
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc

from fabrica_svc.runtime.channels import MAX_MESSAGE_BYTES, PEER_CHANNEL_OPTIONS
from grpc_helpers import field_violations

from .support import (MEASUREMENT, PRODUCTION_COUNTER, T0_US, Ingest, batch, batch_request, fetchval, open_request,
                      reading, stream_batches)

Code = grpc.StatusCode
KIB64 = 64 * 1024


async def stored(ingest: Ingest) -> tuple[int, int, int]:
    """(readings, tag events, collectors with a committed sequence) in ingest's tables."""
    return (int(await fetchval(ingest.database_url, "SELECT count(*) FROM ingest.readings")),
            int(await fetchval(ingest.database_url, "SELECT count(*) FROM ingest.tag_events")),
            int(await fetchval(ingest.database_url, "SELECT count(*) FROM ingest.collector_sequences")))


def strings(n: int, size: int, role: int = MEASUREMENT) -> list:
    value = "s" * size
    return [reading(1 + i, T0_US + i, value, role=role) for i in range(n)]


async def test_a_10_mb_counter_reading_is_invalid_argument_on_its_value_and_nothing_is_stored(ingest: Ingest) -> None:
    huge = [reading(1, T0_US, 1, role=PRODUCTION_COUNTER, kind="uint_value"),
            reading(1, T0_US + 1, "9" * 10_000_000, role=PRODUCTION_COUNTER)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stream_batches(ingest.stub, "cell-1", [batch("cell-1", 1, huge)])
    assert err.value.code() == Code.INVALID_ARGUMENT, err.value
    violations = field_violations(err.value)
    assert list(violations) == ["batch.readings[1].value.string_value"], violations
    assert "65536" in violations["batch.readings[1].value.string_value"]
    assert await stored(ingest) == (0, 0, 0)


async def test_a_value_of_exactly_64_kib_is_stored(ingest: Ingest) -> None:
    _, acks = await stream_batches(ingest.stub, "cell-1", [batch("cell-1", 1, strings(1, KIB64, PRODUCTION_COUNTER))])
    assert [(a.sequence, a.written) for a in acks] == [(1, 1)]
    assert await stored(ingest) == (1, 1, 1)


async def test_a_batch_larger_than_grpcs_default_limits_and_within_the_one_limit_is_stored(ingest: Ingest) -> None:
    readings = strings(320, KIB64)  # about 20 MiB: beyond gRPC's default 4 MiB and the old 16 MiB
    big = batch("cell-1", 1, readings)
    assert 16 * 1024 * 1024 < batch_request(big).ByteSize() < MAX_MESSAGE_BYTES
    async with grpc.aio.insecure_channel(ingest.address, options=PEER_CHANNEL_OPTIONS) as channel:
        _, acks = await stream_batches(pb_grpc.IngestServiceStub(channel), "cell-1", [big])
    assert [(a.sequence, a.written) for a in acks] == [(1, 320)]
    assert await stored(ingest) == (320, 0, 1)


async def test_a_batch_beyond_the_limit_is_the_transports_resource_exhausted_and_nothing_is_stored(
        ingest: Ingest) -> None:
    n = MAX_MESSAGE_BYTES // KIB64 + 8
    too_big = batch("cell-1", 1, strings(n, KIB64))
    assert batch_request(too_big).ByteSize() > MAX_MESSAGE_BYTES
    # A channel without a send limit, so that the message reaches the server (a peer channel would refuse
    # to send it, with the same code).
    async with grpc.aio.insecure_channel(ingest.address) as channel:
        call = pb_grpc.IngestServiceStub(channel).StreamReadings()
        await call.write(open_request("cell-1"))
        assert (await call.read()).resume.committed_sequence == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.write(batch_request(too_big))
            await call.read()
        assert err.value.code() == Code.RESOURCE_EXHAUSTED, err.value
    assert await stored(ingest) == (0, 0, 0)
