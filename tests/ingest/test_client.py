"""IngestUplink against a real ingest: resume point, acknowledgements to the source, permanent errors."""

from __future__ import annotations

import asyncio

import pytest

from fabrica_svc.clients.ingest import IngestUplink, ListBatchSource, UplinkRejected

from .support import T0_US, batch, fetchval, numbered_batches, reading, stream_batches


class RecordingSource(ListBatchSource):
    def __init__(self, batches):
        super().__init__(batches)
        self.resumed_from: list[int] = []
        self.acks: list[int] = []

    async def batches_after(self, sequence: int):
        self.resumed_from.append(sequence)
        async for b in super().batches_after(sequence):
            yield b

    async def acknowledged(self, sequence: int) -> None:
        self.acks.append(sequence)
        await super().acknowledged(sequence)


async def test_uplink_sends_from_the_resume_point_and_acknowledges_to_the_source(ingest) -> None:
    batches = numbered_batches("line-1", 30, 100)
    await stream_batches(ingest.stub, "line-1", batches[:10])
    source = RecordingSource(batches)
    stats = await asyncio.wait_for(IngestUplink(ingest.channel, "line-1", source, max_in_flight=4).run(), 30)
    assert source.resumed_from == [10]
    assert source.acks == list(range(10, 31))  # the resume point, then each ack in order
    assert (stats.acked_sequence, stats.batches_written, stats.batches_duplicate, stats.readings_written) == (30, 20, 0, 2000)
    assert await fetchval(ingest.database_url, "SELECT count(*) FROM ingest.readings") == 3000


async def test_uplink_stops_on_a_batch_ingest_rejects(ingest) -> None:
    batches = numbered_batches("line-1", 5, 10)
    batches[3] = batch("line-1", 4, [reading(2**63 + 1, T0_US)])  # passes the client, not ingest
    source = RecordingSource(batches)
    with pytest.raises(UplinkRejected) as err:
        await asyncio.wait_for(IngestUplink(ingest.channel, "line-1", source, max_in_flight=1).run(), 30)
    assert err.value.sequence == 4
    assert source.acked == 3
    assert await fetchval(ingest.database_url, "SELECT count(*) FROM ingest.readings") == 30
