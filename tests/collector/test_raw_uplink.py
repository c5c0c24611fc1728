"""A spooled batch goes to ingest as the bytes the batcher encoded (never parsed nor encoded again), framed as
the request's ``batch`` with the wire sequence after it, and ingest stores exactly what its readings say."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from google.protobuf import timestamp_pb2

from fabrica_svc.clients.ingest import frame_batch
from fabrica_svc.collector.batcher import Batcher
from fabrica_svc.collector.spool import Spool
from fabrica_svc.collector.uplink import Uplink

from .support import start_ingest, stored_readings, wait_for

T0_US = 1_740_787_200_123_456  # microseconds: what Postgres keeps of a read time


def every_kind_of_reading() -> list[reading_pb2.Reading]:
    values = [
        reading_pb2.Value(double_value=21.5), reading_pb2.Value(double_value=-0.0),
        reading_pb2.Value(double_value=math.inf), reading_pb2.Value(double_value=-math.inf),
        reading_pb2.Value(double_value=5e-324), reading_pb2.Value(double_value=1.7976931348623157e308),
        reading_pb2.Value(int_value=-(2**63)), reading_pb2.Value(int_value=2**63 - 1), reading_pb2.Value(int_value=-1),
        reading_pb2.Value(uint_value=2**64 - 1), reading_pb2.Value(uint_value=2**63), reading_pb2.Value(uint_value=7),
        reading_pb2.Value(bool_value=True), reading_pb2.Value(bool_value=False),
        reading_pb2.Value(string_value="Grüße, 温度 😀"), reading_pb2.Value(string_value=""),
        reading_pb2.Value(bytes_value=bytes(range(256))), reading_pb2.Value(bytes_value=b""),
        None,  # a failed read: no value
    ]
    out = []
    for i, value in enumerate(values):
        us = T0_US + i * 1_001
        r = reading_pb2.Reading(
            tag_id=100 + i, read_time=timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000),
            quality=reading_pb2.QUALITY_GOOD if value is not None else reading_pb2.QUALITY_COMMUNICATION_FAILURE,
            plc_id=f"plc-{i % 3}", role=i % 5, error="" if value is not None else "timeout after 1 s (Zeitüberschreitung)")
        if value is not None:
            r.value.CopyFrom(value)
        out.append(r)
    return out


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool", 1 << 26)
    s.open()
    await s.start()
    yield s
    await s.close()


def spooled_payloads(s: Spool) -> dict[int, bytes]:
    return {seq: p for seq, p in s.read_after(0, 2**62, 2**62, durable_only=False)}


def test_a_framed_batch_is_the_payload_as_it_is_with_the_wire_sequence_after_it() -> None:
    payload = reading_pb2.ReadingBatch(collector_id="cell-1", sequence=9, readings=every_kind_of_reading()
                                       ).SerializeToString()
    for sequence in (9, 1, 2**63 - 1, 300):
        framed = frame_batch(payload, sequence)
        assert payload in framed and len(framed) - len(payload) <= 2 + 4 + 10  # tag, length, sequence field
        request = pb.StreamReadingsRequest.FromString(framed)
        expected = reading_pb2.ReadingBatch.FromString(payload)
        expected.sequence = sequence
        assert request.WhichOneof("kind") == "batch" and request.batch == expected


async def test_the_uplink_writes_the_spooled_bytes_as_they_are(spool: Spool, tmp_path: Path) -> None:
    """An ingest stand-in that receives the raw request bytes: each batch request is the spool's record
    framed, byte for byte (the batcher encoded it; nothing parsed or encoded it again)."""
    received: list[bytes] = []

    async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        first = pb.StreamReadingsRequest.FromString(await anext(aiter(requests)))
        yield pb.StreamReadingsResponse(resume=pb.StreamResume(collector_id=first.open.collector_id, epoch=1)
                                        ).SerializeToString()
        async for raw in requests:
            received.append(raw)
            sequence = pb.StreamReadingsRequest.FromString(raw).batch.sequence
            yield pb.StreamReadingsResponse(ack=pb.BatchAck(sequence=sequence)).SerializeToString()

    handler = grpc.method_handlers_generic_handler("fabrica.ingest.v1.IngestService", {
        "StreamReadings": grpc.stream_stream_rpc_method_handler(stream)})  # bytes in, bytes out
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    batcher = Batcher("cell-1", spool, max_readings=7, max_latency=0.01)
    uplink = Uplink(f"127.0.0.1:{port}", "cell-1", spool, tmp_path, backoff_min=0.05, backoff_max=0.2)
    try:
        for r in every_kind_of_reading():
            batcher.add(r)
        batcher.cut()
        payloads = spooled_payloads(spool)
        assert len(payloads) == 3
        uplink.start()
        await wait_for(lambda: spool.acked == spool.high_water)
        assert received == [frame_batch(payloads[seq], seq) for seq in sorted(payloads)]
    finally:
        await uplink.stop()
        await server.stop(0)


async def test_a_spooled_batch_sent_as_raw_bytes_is_stored_exactly_as_its_readings_say(
        database_url: str, spool: Spool, tmp_path: Path) -> None:
    ingest = await start_ingest(database_url)
    batcher = Batcher("cell-1", spool, max_readings=5, max_latency=0.01)
    uplink = Uplink(ingest.address, "cell-1", spool, tmp_path, backoff_min=0.05, backoff_max=0.2)
    sent = every_kind_of_reading()
    try:
        for r in sent:
            batcher.add(r)
        batcher.cut()
        spooled = [r for p in spooled_payloads(spool).values() for r in reading_pb2.ReadingBatch.FromString(p).readings]
        assert spooled == sent
        uplink.start()
        await wait_for(lambda: spool.acked == spool.high_water and spool.acked > 0)
        stored = await stored_readings(ingest.address, [r.tag_id for r in sent])
    finally:
        await uplink.stop()
        await ingest.stop()
    # The readings ingest returns carry tag_name and unit (empty: no SyncTags here); the rest is the reading.
    for r in stored:
        assert r.tag_name == "" and r.unit == ""
    assert sorted(r.SerializeToString() for r in stored) == sorted(r.SerializeToString() for r in sent)
