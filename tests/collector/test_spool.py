"""The store-and-forward log on a real disk: order, acknowledgement, deletion, restarts, torn tails, the size
limit, renumbering, and a SIGKILLed writer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fabrica.common.v1 import reading_pb2
from google.protobuf import timestamp_pb2

from fabrica.collector.v1.collector_service_pb2 import (
    DROP_REASON_DISK_ERROR,
    DROP_REASON_REJECTED_BY_INGEST,
    DROP_REASON_SPOOL_FULL,
)

from fabrica_svc.collector.spool import HEADER, Spool, format_ns

REPO = Path(__file__).resolve().parents[2]
T0_NS = 1_740_787_200 * 10**9


def batch(seq: int, n: int = 3, collector: str = "cell-1") -> tuple[bytes, int, int]:
    readings = [
        reading_pb2.Reading(tag_id=i + 1, plc_id="p", quality=reading_pb2.QUALITY_GOOD,
                            read_time=timestamp_pb2.Timestamp(seconds=(T0_NS // 10**9) + seq, nanos=i),
                            value=reading_pb2.Value(int_value=seq * 100 + i))
        for i in range(n)
    ]
    payload = reading_pb2.ReadingBatch(collector_id=collector, sequence=seq, readings=readings).SerializeToString()
    return payload, n, readings[0].read_time.ToNanoseconds()


def append(spool: Spool, count: int, n: int = 3) -> list[int]:
    seqs = []
    for _ in range(count):
        seq = spool.next_sequence()
        spool.append(seq, *batch(seq, n))
        seqs.append(seq)
    return seqs


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_records_come_back_in_order_only_once_durable_and_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20, segment_bytes=1024)
    spool.open()
    seqs = append(spool, 50)
    assert seqs == list(range(1, 51))
    assert spool.backlog_readings == 150
    # Written, but not yet fsynced: the uplink must not send it.
    assert spool.read_after(0) == []
    spool.sync()
    got = spool.read_after(0, max_records=1000)
    assert [s for s, _ in got] == seqs
    assert [reading_pb2.ReadingBatch.FromString(p).sequence for _, p in got] == seqs
    assert [s for s, _ in spool.read_after(47)] == [48, 49, 50]

    files_before = segment_files(tmp_path)
    assert len(files_before) > 3
    spool.ack(30)
    assert spool.backlog_readings == 60
    assert spool.oldest_unacked_ns() == batch(31)[2]
    spool.sync()  # persists acked = 30, then deletes what it covers
    remaining = segment_files(tmp_path)
    deleted = set(files_before) - set(remaining)
    assert deleted and remaining
    assert all(int(p.stem) < int(remaining[0].stem) for p in deleted)
    assert int(remaining[0].stem) <= 31  # the segment holding 31 stays
    assert [s for s, _ in spool.read_after(30, max_records=1000)] == list(range(31, 51))
    assert json.loads((tmp_path / "state.json").read_text())["acked"] == 30
    assert not list(tmp_path.glob("*.tmp"))

    spool.ack(50)
    spool.sync()
    assert segment_files(tmp_path) == []
    assert spool.backlog_readings == 0 and spool.disk_bytes == 0 and spool.oldest_unacked_ns() is None


def test_sequences_keep_increasing_across_restarts_even_when_everything_was_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    spool.open()
    append(spool, 10)
    spool.ack(10)
    spool.sync()
    assert segment_files(tmp_path) == []

    again = Spool(tmp_path, 1 << 20)
    again.open()
    assert again.next_sequence() == 11
    assert again.backlog_readings == 0
    append(again, 2)
    again.sync()

    third = Spool(tmp_path, 1 << 20)
    report = third.open()
    assert report.records == 2
    assert third.next_sequence() == 13
    assert [s for s, _ in third.read_after(0)] == [11, 12]


@pytest.mark.parametrize("damage", ["cut header", "cut payload", "bad crc"])
def test_a_torn_tail_is_cut_off_and_everything_before_it_survives(tmp_path: Path, damage: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, 1 << 20)
    spool.open()
    append(spool, 5)
    spool.sync()
    path = segment_files(tmp_path)[-1]
    intact = path.stat().st_size
    last_payload, _, _ = batch(5)
    record_size = HEADER.size + len(last_payload)
    data = bytearray(path.read_bytes())
    if damage == "cut header":  # a sixth record whose header was only partly written
        data += b"\x10\x00\x00"
        expected, kept = intact, 5
    elif damage == "cut payload":  # the fifth record's payload cut short
        data = data[:-7]
        expected, kept = intact - record_size, 4
    else:  # the fifth record's payload damaged
        data[-3] ^= 0xFF
        expected, kept = intact - record_size, 4
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="fabrica_svc.collector.spool"):
        again = Spool(tmp_path, 1 << 20)
        report = again.open()
    assert report.records == kept
    assert path.stat().st_size == expected
    assert "cutting off" in caplog.text
    assert [s for s, _ in again.read_after(0)] == list(range(1, kept + 1))
    # Never reuse a number: the state file remembers 5 even if the fifth record was torn.
    assert again.next_sequence() == 6
    append(again, 1)
    again.sync()
    assert [s for s, _ in again.read_after(0)] == [*range(1, kept + 1), 6]


def test_over_its_size_limit_the_log_drops_the_oldest_segment_and_counts_it(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, 8192, segment_bytes=2048)
    spool.open()
    with caplog.at_level(logging.WARNING, logger="fabrica_svc.collector.spool"):
        append(spool, 200)
    spool.sync()
    on_disk = sum(p.stat().st_size for p in segment_files(tmp_path))
    assert on_disk == spool.disk_bytes <= 8192
    kept = spool.read_after(0, max_records=10_000)
    assert kept[-1][0] == 200 and kept[0][0] > 1
    assert [s for s, _ in kept] == list(range(kept[0][0], 201))
    assert spool.dropped_readings == 3 * (kept[0][0] - 1)
    assert spool.backlog_readings == 3 * len(kept)
    assert "dropped the oldest segment" in caplog.text

    # The count survives a restart.
    dropped = spool.dropped_readings
    again = Spool(tmp_path, 8192, segment_bytes=2048)
    again.open()
    assert again.dropped_readings == dropped


def test_every_dropped_reading_is_counted_by_reason_and_each_drop_is_logged_once_with_its_range(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def size(seq: int) -> int:  # readings per batch: 1 to 5, so a count of batches cannot pass for one of readings
        return 1 + seq % 5

    spool = Spool(tmp_path, 8192, segment_bytes=2048)
    spool.open()
    for seq in range(1, 11):
        spool.append(seq, *batch(seq, size(seq)))
    spool.ack(4)  # acknowledged readings are not lost when their segment goes
    with caplog.at_level(logging.WARNING, logger="fabrica_svc.collector.spool"):
        for seq in range(11, 301):
            spool.append(seq, *batch(seq, size(seq)))
    spool.sync()
    kept = [s for s, _ in spool.read_after(spool.acked, max_records=10_000)]
    first_kept = kept[0]
    assert kept == list(range(first_kept, 301)) and first_kept > 5
    lost = sum(size(s) for s in range(5, first_kept))
    assert spool.dropped == {DROP_REASON_SPOOL_FULL: lost, DROP_REASON_REJECTED_BY_INGEST: 0, DROP_REASON_DISK_ERROR: 0}
    assert spool.dropped_readings == lost
    assert spool.backlog_readings == sum(size(s) for s in kept)

    lines = [r for r in caplog.records if "dropped the oldest segment" in r.getMessage()]
    assert all(r.levelno == logging.WARNING and r.reason == "DROP_REASON_SPOOL_FULL" for r in lines)
    # Each dropped batch is in exactly one line, in order, with its readings counted in that line.
    assert [s for r in lines for s in range(r.first_sequence, r.last_sequence + 1)] == list(range(5, first_kept))
    for r in lines:
        batches = range(r.first_sequence, r.last_sequence + 1)
        assert r.dropped_readings == sum(size(s) for s in batches)
        assert f"{r.dropped_readings} unacknowledged readings (batches {batches[0]} to {batches[-1]}" in r.getMessage()
        assert f"read from {format_ns(batch(batches[0])[2])} to before {format_ns(batch(batches[-1] + 1)[2])}" \
            in r.getMessage()

    # A batch ingest rejects for good: acknowledged, counted as rejected, its readings as dropped for that reason.
    payload, readings = spool.reject(first_kept)
    assert payload == batch(first_kept, size(first_kept))[0] and readings == size(first_kept)
    assert spool.dropped[DROP_REASON_REJECTED_BY_INGEST] == size(first_kept) and spool.rejected_batches == 1
    assert spool.dropped_readings == lost + size(first_kept)
    assert spool.acked == first_kept and spool.backlog_readings == sum(size(s) for s in kept[1:])

    # The counts cover the life of the log: they survive a restart.
    spool.sync()
    again = Spool(tmp_path, 8192, segment_bytes=2048)
    again.open()
    assert again.dropped == spool.dropped and again.rejected_batches == 1


def test_readings_the_disk_refuses_to_append_are_counted_and_logged(tmp_path: Path) -> None:
    # A real refusal: the writer's file size limit (RLIMIT_FSIZE; SIGXFSZ ignored, so write() fails with EFBIG
    # after a partial write), lowered for two batches and raised again. In a child process: the limit is
    # process-wide.
    script = textwrap.dedent(f"""
        import asyncio, logging, resource, signal, sys
        sys.path[:0] = [{str(REPO / 'gen')!r}, {str(REPO / 'services')!r}]
        from pathlib import Path
        from fabrica.common.v1 import reading_pb2
        from google.protobuf import timestamp_pb2
        from fabrica_svc.collector.batcher import Batcher
        from fabrica_svc.collector.spool import Spool
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        folder = Path({str(tmp_path)!r})

        async def main():
            spool = Spool(folder, 1 << 20, segment_bytes=1 << 20)
            spool.open()
            batcher = Batcher("cell-1", spool, max_readings=4)
            def add(n, first):
                for i in range(first, first + n):
                    batcher.add(reading_pb2.Reading(tag_id=1, plc_id="p", quality=reading_pb2.QUALITY_GOOD,
                                read_time=timestamp_pb2.Timestamp(seconds={T0_NS // 10**9} + i),
                                value=reading_pb2.Value(int_value=i)))
            add(12, 0)  # batches 1 to 3
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            size = sum(p.stat().st_size for p in folder.glob("*.seg"))
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))
            add(8, 12)  # two batches the disk refuses (both would have been batch 4)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            add(4, 20)  # batch 4
            await spool.close()

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    spool = Spool(tmp_path, 1 << 20, segment_bytes=1 << 20)
    spool.open()
    assert spool.dropped == {DROP_REASON_SPOOL_FULL: 0, DROP_REASON_REJECTED_BY_INGEST: 0, DROP_REASON_DISK_ERROR: 8}
    stored = [reading_pb2.ReadingBatch.FromString(p) for _, p in spool.read_after(0, max_records=100)]
    assert [b.sequence for b in stored] == [1, 2, 3, 4]
    assert [r.value.int_value for b in stored for r in b.readings] == [*range(12), *range(20, 24)]
    lines = [line for line in done.stderr.splitlines() if "cannot append batch" in line]
    assert len(lines) == 2 and all(line.startswith("ERROR cannot append batch 4 to the spool") for line in lines)
    assert f"dropped its 4 readings (read from {format_ns(T0_NS + 12 * 10**9)} to {format_ns(T0_NS + 15 * 10**9)})" \
        in lines[0]
    assert lines[1].endswith("8 readings lost to disk errors since the log was created")


def test_renumbering_above_what_ingest_has_keeps_every_pending_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    spool.open()
    append(spool, 3, n=2)
    spool.ack(1)
    assert spool.renumber_above(100) == 2
    spool.sync()
    got = spool.read_after(100)
    assert [s for s, _ in got] == [101, 102]
    batches = [reading_pb2.ReadingBatch.FromString(p) for _, p in got]
    assert [b.sequence for b in batches] == [101, 102]
    # The readings of the old batches 2 and 3, unchanged.
    assert [r.value.int_value for b in batches for r in b.readings] == [200, 201, 300, 301]
    assert spool.backlog_readings == 4 and spool.next_sequence() == 103
    assert [int(p.stem) for p in segment_files(tmp_path)] == [101]


async def test_the_group_commit_makes_appends_durable_in_the_background(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    spool.open()
    await spool.start()
    try:
        append(spool, 3)
        async with asyncio.timeout(10):
            await spool.wait_durable_beyond(2)
        assert [s for s, _ in spool.read_after(0)] == [1, 2, 3]
        spool.ack(3)
        async with asyncio.timeout(10):
            while segment_files(tmp_path):  # deleted once the state is persisted
                await asyncio.sleep(0.02)
    finally:
        await spool.close()


def test_nothing_appended_is_lost_when_the_writer_is_killed_with_sigkill(tmp_path: Path) -> None:
    # The writer appends without ever syncing (no flusher): once write() returned, the record is the
    # kernel's, and a SIGKILL cannot take it back.
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO / 'gen')!r}, {str(REPO / 'services')!r}, {str(Path(__file__).parent)!r}]
        from pathlib import Path
        from fabrica_svc.collector.spool import Spool
        from test_spool import batch
        spool = Spool(Path({str(tmp_path)!r}), 1 << 26, segment_bytes=4096)
        spool.open()
        while True:
            seq = spool.next_sequence()
            spool.append(seq, *batch(seq))
            print(seq, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        last = 0
        for _ in range(300):  # bounded: it appends forever, we read 300 confirmations
            last = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    spool = Spool(tmp_path, 1 << 26, segment_bytes=4096)
    spool.open()
    got = [s for s, _ in spool.read_after(0, max_records=1 << 20)]
    assert last == 300
    assert got[:last] == list(range(1, last + 1))  # every confirmed append, in order, maybe a few more
    assert got == list(range(1, len(got) + 1))
