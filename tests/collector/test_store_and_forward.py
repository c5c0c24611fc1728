"""Store-and-forward against the real ingest service (in process, embedded Postgres): while ingest is down
the backlog grows on disk, then drains, and ingest ends with every reading exactly once."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from fabrica.collector.v1 import collector_service_pb2 as cpb
from fabrica.collector.v1 import collector_service_pb2_grpc as cpb_grpc
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2
from google.protobuf import timestamp_pb2

from fabrica_svc.collector.spool import Spool, format_ns
from fabrica_svc.plcsim import Simulator

from .support import (GOOD, IR, app_of, collector_settings, free_port, gateway_plc, key, mb_tag, modbus_plc, s7_plc,
                      s7_tag, start_collector, start_ingest, store_config, stored_readings, value_of, wait_for)

T = plc_pb2


@pytest.fixture
async def live() -> AsyncIterator[Simulator]:
    async with Simulator(seed=3) as sim:
        yield sim


def busy_plcs(sim: Simulator) -> list[T.Plc]:
    """Three PLCs, one per protocol, polled fast with values that change all the time."""
    return [
        modbus_plc("press", sim.modbus_port, [
            mb_tag("count", 0, T.DATA_TYPE_UINT32), mb_tag("temperature", 4, T.DATA_TYPE_FLOAT32),
            mb_tag("pressure", 6, T.DATA_TYPE_FLOAT32, word_order=T.WORD_ORDER_LITTLE_ENDIAN),
            mb_tag("current", 8, T.DATA_TYPE_FLOAT32)], interval=0.02, integrity=0.3),
        gateway_plc("meter", sim.rtu_port, [mb_tag("voltage", 0, T.DATA_TYPE_FLOAT32, table=IR),
                                            mb_tag("power", 0x34, T.DATA_TYPE_FLOAT32, table=IR)], interval=0.05),
        s7_plc("press-s7", sim.s7_port, [s7_tag("temperature", 2, T.DATA_TYPE_FLOAT32),
                                         s7_tag("state", 10, T.DATA_TYPE_INT16)], interval=0.05, integrity=0.3),
    ]


async def test_ingest_down_for_a_while_the_backlog_grows_then_drains_and_nothing_is_lost(
    database_url: str, live: Simulator, tmp_path: Path
) -> None:
    ingest_port = free_port()
    settings = collector_settings(tmp_path, FABRICA_INGEST_ADDR=f"127.0.0.1:{ingest_port}")
    store_config(settings, busy_plcs(live))
    collector = await start_collector(settings)
    ingest = None
    try:
        app = app_of(collector)
        spool = app.spool
        await wait_for(lambda: spool.backlog_readings >= 100, what="a backlog")
        first = spool.backlog_readings
        await wait_for(lambda: spool.backlog_readings >= first + 200, what="the backlog to grow")
        async with grpc.aio.insecure_channel(collector.address) as channel:
            status = await cpb_grpc.CollectorServiceStub(channel).GetStatus(cpb.GetStatusRequest())
        assert status.backlog_readings >= first + 200 and not status.uplink_connected
        assert status.HasField("oldest_backlog_time") and status.backlog_bytes > 0

        # Nothing is acknowledged yet, so the log holds every batch so far; watch every later append too.
        appended = dict(spool.read_after(0, 1 << 30, 1 << 40, durable_only=False))
        assert sorted(appended) == list(range(1, len(appended) + 1))
        append = spool.append

        def recording(sequence: int, payload: bytes, readings: int, oldest_ns: int) -> None:
            append(sequence, payload, readings, oldest_ns)
            appended[sequence] = payload

        spool.append = recording  # type: ignore[method-assign]
        grown = spool.backlog_readings

        ingest = await start_ingest(database_url, ingest_port)
        # It drains while the pollers go on producing...
        await wait_for(lambda: app.uplink.connected and spool.backlog_readings < grown / 4, timeout=20,
                       what="the backlog to drain")
        # ...and once they stop, everything is acknowledged.
        await app.supervisor.stop_all()
        app.batcher.cut()
        await wait_for(lambda: spool.acked == spool.high_water and spool.backlog_readings == 0, timeout=20,
                       what="everything acknowledged")
        assert sorted(appended) == list(range(1, spool.high_water + 1))

        sent = [r for payload in appended.values() for r in reading_pb2.ReadingBatch.FromString(payload).readings]
        stored = await stored_readings(ingest.address, {r.tag_id for r in sent})
        assert len(sent) > grown
        assert Counter(map(key, stored)) == Counter(map(key, sent))
        assert max(Counter(map(key, stored)).values()) == 1
    finally:
        await collector.stop(grace=0)
        if ingest is not None:
            await ingest.stop(grace=0)


async def test_a_batch_ingest_rejects_for_good_is_set_aside_and_the_rest_flows(database_url: str,
                                                                              tmp_path: Path) -> None:
    settings = collector_settings(tmp_path)
    spool = Spool(settings.state_dir / "spool", 1 << 20)
    spool.open()
    good = [reading_pb2.Reading(tag_id=7, plc_id="p", quality=GOOD, read_time=timestamp_pb2.Timestamp(seconds=s),
                                value=reading_pb2.Value(int_value=s)) for s in (1_700_000_001, 1_700_000_003)]
    bad = reading_pb2.Reading(tag_id=7, plc_id="p", quality=GOOD, value=reading_pb2.Value(int_value=2))  # no time
    for seq, reading in ((1, good[0]), (2, bad), (3, good[1])):
        batch = reading_pb2.ReadingBatch(collector_id="cell-1", sequence=seq, readings=[reading])
        spool.append(seq, batch.SerializeToString(), 1, 0)
    await spool.close()

    ingest = await start_ingest(database_url)
    collector = await start_collector(collector_settings(tmp_path, FABRICA_INGEST_ADDR=ingest.address))
    try:
        app = app_of(collector)
        await wait_for(lambda: app.spool.acked == 3, timeout=20, what="batches 1 and 3 stored, 2 set aside")
        stored = await stored_readings(ingest.address, [7])
        assert sorted(value_of(r) for r in stored) == [1_700_000_001, 1_700_000_003]
        assert app.uplink.rejected_batches == 1 and app.spool.dropped_readings == 1
        kept = reading_pb2.ReadingBatch.FromString((settings.state_dir / "rejected" / f"{2:020d}.binpb").read_bytes())
        assert kept.readings[0] == bad
        assert "INVALID_ARGUMENT" in app.uplink.last_error
    finally:
        await collector.stop(grace=0)
        await ingest.stop(grace=0)


async def test_status_metrics_and_logs_count_exactly_the_readings_the_size_limit_and_ingest_dropped(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A log at the smallest size limit the settings allow, left by an earlier run with ingest away: 400 batches of
    # 10 readings do not fit, so the oldest were dropped; batch 401 is one ingest will never take.
    caplog.set_level(logging.WARNING, logger="fabrica_svc.collector")
    limit, base = 64 * 1024, 1_750_000_000
    settings = collector_settings(tmp_path, "cell-loss", FABRICA_COLLECTOR_LOG_MAX_BYTES=str(limit))
    tags = range(9001, 9011)

    def good(seq: int) -> reading_pb2.ReadingBatch:
        return reading_pb2.ReadingBatch(collector_id="cell-loss", sequence=seq, readings=[
            reading_pb2.Reading(tag_id=tag, plc_id="p", quality=GOOD, value=reading_pb2.Value(int_value=seq),
                                read_time=timestamp_pb2.Timestamp(seconds=base + seq)) for tag in tags])

    bad = reading_pb2.ReadingBatch(collector_id="cell-loss", sequence=401, readings=[
        reading_pb2.Reading(tag_id=9001, plc_id="p", quality=GOOD, value=reading_pb2.Value(int_value=i))
        for i in range(3)])  # no read time
    batches = [good(seq) for seq in range(1, 401)] + [bad] + [good(seq) for seq in range(402, 406)]
    spool = Spool(settings.state_dir / "spool", limit)  # as the collector opens it for that limit
    spool.open()
    for b in batches:
        spool.append(b.sequence, b.SerializeToString(), len(b.readings), (base + b.sequence) * 10**9)
    await spool.close()
    appended = sum(len(b.readings) for b in batches)

    ingest = await start_ingest(database_url)
    collector = await start_collector(collector_settings(tmp_path, "cell-loss", FABRICA_INGEST_ADDR=ingest.address,
                                                         FABRICA_COLLECTOR_LOG_MAX_BYTES=str(limit)))
    try:
        app = app_of(collector)
        await wait_for(lambda: app.spool.acked == 405, timeout=30, what="every batch stored or set aside")
        stored = await stored_readings(ingest.address, tags)
        # The truth is ingest's: what it stored is a run of whole batches up to the end, but 401.
        stored_batches = Counter(r.read_time.seconds - base for r in stored)
        first = min(stored_batches)
        assert sorted(stored_batches) == [*range(first, 401), *range(402, 406)] and first > 1
        assert set(stored_batches.values()) == {10} and max(Counter(map(key, stored)).values()) == 1
        spool_full = 10 * (first - 1)
        # Every reading appended is in ingest or counted as dropped, and by the right reason.
        assert appended == len(stored) + spool_full + 3

        async with grpc.aio.insecure_channel(collector.address) as channel:
            status = await cpb_grpc.CollectorServiceStub(channel).GetStatus(cpb.GetStatusRequest())
        assert [(d.reason, d.readings) for d in status.dropped_readings_by_reason] == [
            (cpb.DROP_REASON_SPOOL_FULL, spool_full), (cpb.DROP_REASON_REJECTED_BY_INGEST, 3),
            (cpb.DROP_REASON_DISK_ERROR, 0)]
        assert status.dropped_readings == spool_full + 3 and status.rejected_batches == 1

        exported = {}
        for family in text_string_to_metric_families(prometheus_client.generate_latest().decode()):
            for sample in family.samples:
                if sample.labels.get("collector_id") == "cell-loss":
                    exported[sample.name, sample.labels.get("reason")] = sample.value
        assert exported["fabrica_collector_dropped_readings_total", "spool_full"] == spool_full
        assert exported["fabrica_collector_dropped_readings_total", "rejected_by_ingest"] == 3
        assert exported["fabrica_collector_dropped_readings_total", "disk_error"] == 0
        assert exported["fabrica_collector_rejected_batches_total", None] == 1

        # Logged once per occurrence: each size-limit drop with its batches (together exactly 1 to first - 1)...
        drops = [r for r in caplog.records if r.name.endswith(".spool") and r.getMessage().find("dropped the") > 0]
        assert [s for r in drops for s in range(r.first_sequence, r.last_sequence + 1)] == list(range(1, first))
        assert sum(r.dropped_readings for r in drops) == spool_full
        assert f"read from {format_ns((base + 1) * 10**9)}" in drops[0].getMessage()
        # ...and the rejection, with ingest's reason and the field it names.
        rejected = [r for r in caplog.records if "for good" in r.getMessage()]
        assert len(rejected) == 1 and rejected[0].levelno == logging.ERROR
        message = rejected[0].getMessage()
        assert message.startswith("ingest rejects batch 401 for good (INVALID_ARGUMENT: ")
        assert "reason INVALID_ARGUMENT" in message and "batch.readings[0].read_time: value is required" in message
        assert "with its 3 readings (no read time)" in message
        assert rejected[0].field_violations == [f"batch.readings[{i}].read_time: value is required" for i in range(3)]
    finally:
        await collector.stop(grace=0)
        await ingest.stop(grace=0)


async def test_a_collector_whose_local_state_was_lost_renumbers_above_what_ingest_has(
    database_url: str, live: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fabrica_svc.collector.spool")
    ingest = await start_ingest(database_url)
    settings = collector_settings(tmp_path, FABRICA_INGEST_ADDR=ingest.address)
    plcs = busy_plcs(live)[:1]
    store_config(settings, plcs)
    collector = await start_collector(settings)
    try:
        app = app_of(collector)
        await wait_for(lambda: app.spool.acked >= 20, timeout=20, what="twenty batches stored")
        await collector.stop(grace=0)
        first_run = app.spool.high_water

        # The disk is replaced: no log, no state; the same collector id starts from scratch.
        shutil.rmtree(settings.state_dir)
        store_config(settings, plcs)
        collector = await start_collector(settings)
        app = app_of(collector)
        appended: dict[int, bytes] = {}
        append = app.spool.append

        def recording(sequence: int, payload: bytes, readings: int, oldest_ns: int) -> None:
            append(sequence, payload, readings, oldest_ns)
            appended[sequence] = payload

        app.spool.append = recording  # type: ignore[method-assign]
        await wait_for(lambda: app.spool.acked > first_run + 10, timeout=20, what="new batches stored")
        await app.supervisor.stop_all()
        app.batcher.cut()
        await wait_for(lambda: app.spool.acked == app.spool.high_water, timeout=20, what="everything stored")
        assert app.spool.backlog_readings == 0
        # Numbering starts at 1 again, but ingest reports first_run as committed: what was appended before
        # the uplink learnt that is renumbered above it, and the rest follows it. Every reading is stored.
        assert "beyond this log's high-water mark" in caplog.text
        assert app.spool.high_water > first_run
        sent = [r for p in appended.values() for r in reading_pb2.ReadingBatch.FromString(p).readings]
        stored = Counter(map(key, await stored_readings(ingest.address, {t.id for t in plcs[0].tags})))
        assert all(stored[key(r)] == 1 for r in sent), "a reading of the second run was taken for a duplicate"
        assert max(stored.values()) == 1
    finally:
        await collector.stop(grace=0)
        await ingest.stop(grace=0)


async def test_a_duplicate_ack_for_a_batch_sent_for_the_first_time_shows_in_status_and_metrics(
    database_url: str, tmp_path: Path
) -> None:
    from fabrica.ingest.v1 import ingest_service_pb2 as ipb
    from fabrica.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc

    ingest = await start_ingest(database_url)
    collector = await start_collector(collector_settings(tmp_path, "cell-dup", FABRICA_INGEST_ADDR=ingest.address))
    try:
        app = app_of(collector)
        await wait_for(lambda: app.uplink.connected, timeout=20, what="the uplink's stream open")

        def one(seq: int, tag: int) -> reading_pb2.ReadingBatch:
            return reading_pb2.ReadingBatch(collector_id="cell-dup", sequence=seq, readings=[reading_pb2.Reading(
                tag_id=tag, plc_id="p", quality=GOOD, read_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
                value=reading_pb2.Value(int_value=1))])

        # Another writer with the collector's id (and epoch) takes sequence 1 first.
        async with grpc.aio.insecure_channel(ingest.address) as channel:
            call = ipb_grpc.IngestServiceStub(channel).StreamReadings()
            await call.write(ipb.StreamReadingsRequest(open=ipb.StreamOpen(collector_id="cell-dup",
                                                                           epoch=app.spool.epoch)))
            assert (await call.read()).resume.committed_sequence == 0
            await call.write(ipb.StreamReadingsRequest(batch=one(1, 77)))
            assert (await call.read()).ack.written == 1
            await call.done_writing()
        sequence = app.spool.next_sequence()
        app.spool.append(sequence, one(sequence, 78).SerializeToString(), 1, 0)
        await wait_for(lambda: app.spool.acked == sequence, timeout=20, what="the collector's batch acknowledged")

        async with grpc.aio.insecure_channel(collector.address) as channel:
            status = await cpb_grpc.CollectorServiceStub(channel).GetStatus(cpb.GetStatusRequest())
        assert status.suspicious_duplicates == 1
        exported = {(s.name, s.labels.get("collector_id")): s.value
                    for family in text_string_to_metric_families(prometheus_client.generate_latest().decode())
                    for s in family.samples}
        assert exported["fabrica_collector_suspicious_duplicates_total", "cell-dup"] == 1
    finally:
        await collector.stop(grace=0)
        await ingest.stop(grace=0)
