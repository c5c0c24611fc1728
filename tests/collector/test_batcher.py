"""The batcher cuts at once when nothing is in flight (every spooled batch acknowledged), gathers while
acknowledgements are outstanding and cuts what gathered when the last one comes back, and lingers as before
when ingest is away or `flush_when_idle` is off. Real spool on disk; the loop's own clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fabrica.common.v1 import reading_pb2

from fabrica_svc.collector.batcher import Batcher
from fabrica_svc.collector.spool import Spool

LINGER = 5.0  # long enough that a cut before it is not the timer's


def reading(i: int) -> reading_pb2.Reading:
    return reading_pb2.Reading(tag_id=1 + i, plc_id="p", quality=reading_pb2.QUALITY_GOOD,
                               read_time={"seconds": 1_740_787_200 + i}, value={"int_value": i})


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool", 1 << 22)
    s.open()
    yield s
    await s.close()


def sizes(s: Spool) -> list[int]:
    return [len(reading_pb2.ReadingBatch.FromString(p).readings)
            for _, p in s.read_after(0, 2**62, 2**62, durable_only=False)]


async def test_idle_uplink_a_polls_readings_go_out_together_at_once(spool: Spool) -> None:
    batcher = Batcher("cell-1", spool, max_readings=500, max_latency=LINGER)
    for i in range(10):  # one poll: added in one go
        batcher.add(reading(i))
    assert sizes(spool) == []  # not yet: at the end of this loop iteration
    await asyncio.sleep(0)
    assert sizes(spool) == [10]


async def test_while_a_batch_is_in_flight_readings_gather_and_go_when_it_is_acknowledged(spool: Spool) -> None:
    batcher = Batcher("cell-1", spool, max_readings=500, max_latency=LINGER)
    batcher.add(reading(0))
    await asyncio.sleep(0)
    assert sizes(spool) == [1]  # batch 1 in flight (not acknowledged)
    for round_ in range(3):
        for i in range(4):
            batcher.add(reading(10 * round_ + i))
            await asyncio.sleep(0.01)
    assert sizes(spool) == [1]  # gathering, well before the linger
    spool.ack(1)  # the acknowledgement: nothing in flight
    await asyncio.sleep(0)
    assert sizes(spool) == [1, 12]
    spool.ack(2)
    await asyncio.sleep(0)
    assert sizes(spool) == [1, 12]  # nothing gathered: no empty batch


async def test_under_load_batches_are_cut_by_size_and_ingest_away_means_the_linger(spool: Spool) -> None:
    batcher = Batcher("cell-1", spool, max_readings=5, max_latency=0.05)
    batcher.add(reading(0))
    await asyncio.sleep(0)
    for i in range(12):  # nothing acknowledged: by size, then the rest after the linger
        batcher.add(reading(i))
    assert sizes(spool) == [1, 5, 5]
    await asyncio.sleep(0.01)
    assert sizes(spool) == [1, 5, 5]
    await asyncio.sleep(0.1)
    assert sizes(spool) == [1, 5, 5, 2]


async def test_without_flush_when_idle_every_batch_waits_for_size_or_the_linger(spool: Spool) -> None:
    batcher = Batcher("cell-1", spool, max_readings=500, max_latency=0.05, flush_when_idle=False)
    batcher.add(reading(0))
    await asyncio.sleep(0.01)
    assert sizes(spool) == []
    await asyncio.sleep(0.1)
    assert sizes(spool) == [1]
