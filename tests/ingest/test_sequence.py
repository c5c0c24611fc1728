"""The sequence rule and the epoch: one forged message can no longer do lasting harm to a collector.

A writer that is not the collector opens StreamReadings for its id and sends a batch far ahead of the
committed sequence (2^63-1 included): the batch is refused with FAILED_PRECONDITION and the expected sequence,
nothing of it is stored, and the real collector (a real Uplink over a real spool) keeps storing every one of
its readings. Epochs fence an old incarnation; ResetCollectorSequence repairs a sequence pushed ahead before
this rule existed. Real ingest, real Postgres, real gRPC."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
from datetime import UTC
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_helpers import error_info, field_violations, rich_status

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica_svc.collector.spool import Spool
from fabrica_svc.collector.uplink import Uplink

from .support import REPO, T0_US, batch, batch_request, fetch, fetchval, numbered_batches, reading, stream_batches, wait_for

COLLECTOR = "demo"
COMMITTED = "SELECT committed_sequence FROM ingest.collector_sequences WHERE collector_id = $1"
EPOCH = "SELECT epoch FROM ingest.collector_sequences WHERE collector_id = $1"
#: The real collector's readings have tags 1..10; the forger's tag 999.
REAL = "SELECT count(*) FROM ingest.readings WHERE tag_id BETWEEN 1 AND 10"
REAL_DISTINCT = "SELECT count(*) FROM (SELECT DISTINCT tag_id, read_time FROM ingest.readings WHERE tag_id <= 10) d"
FORGED = "SELECT count(*) FROM ingest.readings WHERE tag_id = 999"
BATCH = 20


def forged(sequence: int, collector_id: str = COLLECTOR) -> reading_pb2.ReadingBatch:
    return batch(collector_id, sequence, [reading(999, T0_US + sequence % 10**9, 6.66)])


def open_request(collector_id: str = COLLECTOR, epoch: int = 0, new_epoch: bool = False) -> pb.StreamReadingsRequest:
    return pb.StreamReadingsRequest(open=pb.StreamOpen(collector_id=collector_id, epoch=epoch, new_epoch=new_epoch))


async def open_stream(stub, collector_id: str = COLLECTOR, epoch: int = 0, new_epoch: bool = False):  # noqa: ANN001, ANN201
    call = stub.StreamReadings()
    await call.write(open_request(collector_id, epoch, new_epoch))
    first = await call.read()
    return call, first.resume


async def refused(call) -> grpc.aio.AioRpcError:  # noqa: ANN001
    """Read the stream to its end; the error that ended it."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(20):  # a bound, not the assertion: an accepted batch would leave it open
            while await call.read() is not grpc.aio.EOF:
                pass
    return err.value


def precondition_types(err: grpc.aio.AioRpcError) -> list[str]:
    out = []
    for detail in rich_status(err).details:
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            out += [f"{v.type} {v.subject}" for v in failure.violations]
    return out


async def forge(ingest, sequence: int | None = None, *, ahead: int = 0) -> grpc.aio.AioRpcError:  # noqa: ANN001
    """A forger's stream for the collector, with the collector's own epoch (the worst case: a forger with
    epoch 0 is fenced at open once the collector has one): one batch at `sequence` (or `ahead` above the
    committed sequence it resumes at), which must be refused."""
    epoch = await fetchval(ingest.database_url, EPOCH, COLLECTOR) or 0
    call, resume = await open_stream(ingest.stub, epoch=epoch)
    if sequence is None:
        sequence = min(resume.committed_sequence + ahead, 2**63 - 1)
    await call.write(batch_request(forged(sequence)))
    err = await refused(call)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    info = error_info(err)
    assert info.reason == "SEQUENCE_GAP"
    assert info.metadata["sequence"] == str(sequence)
    assert int(info.metadata["expected_sequence"]) == resume.committed_sequence + 1
    assert precondition_types(err) == [f"SEQUENCE collectors/{COLLECTOR}"]
    return err


# --- the rule, on one stream and in the transaction ----------------------------------------------------------


@pytest.mark.parametrize("ahead", [2, 1000, 2**63 - 1], ids=["next-but-one", "far", "2^63-1"])
async def test_a_batch_ahead_of_the_next_sequence_is_refused_with_the_expected_one_and_nothing_is_stored(
        ingest, ahead: int) -> None:
    await stream_batches(ingest.stub, COLLECTOR, numbered_batches(COLLECTOR, 3, BATCH))
    sequence = ahead if ahead == 2**63 - 1 else 3 + ahead
    err = await forge(ingest, sequence)
    assert error_info(err).metadata["expected_sequence"] == "4"
    assert "the next batch must be 4" in err.details()
    assert await fetchval(ingest.database_url, FORGED) == 0
    assert await fetchval(ingest.database_url, COMMITTED, COLLECTOR) == 3
    # the collector's next batch is still the one stored
    resume, acks = await stream_batches(ingest.stub, COLLECTOR, numbered_batches(COLLECTOR, 4, BATCH)[3:])
    assert resume == 3 and [(a.sequence, a.duplicate, a.written) for a in acks] == [(4, False, BATCH)]


async def test_on_one_stream_the_batches_not_yet_committed_count_and_the_ones_before_a_gap_are_acknowledged(
        ingest) -> None:
    batches = numbered_batches(COLLECTOR, 3, BATCH)
    call, resume = await open_stream(ingest.stub)
    assert resume.committed_sequence == 0
    for b in batches:  # queued together, committed later
        await call.write(batch_request(b))
    await call.write(batch_request(forged(5)))
    acks = [(await call.read()).ack.sequence for _ in batches]
    err = await refused(call)
    assert acks == [1, 2, 3]
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).metadata["expected_sequence"] == "4"
    assert await fetchval(ingest.database_url, REAL) == 3 * BATCH
    assert await fetchval(ingest.database_url, FORGED) == 0


async def test_the_transaction_refuses_a_batch_that_no_longer_follows_under_the_lock(ingest) -> None:
    await stream_batches(ingest.stub, COLLECTOR, numbered_batches(COLLECTOR, 5, BATCH))
    call, resume = await open_stream(ingest.stub)
    assert resume.committed_sequence == 5
    # Meanwhile the committed sequence moves back (an admin reset, or another replica's view): batch 6 follows
    # what this stream saw, not what is committed.
    await ingest.stub.ResetCollectorSequence(pb.ResetCollectorSequenceRequest(collector_id=COLLECTOR,
                                                                             committed_sequence=2))
    await call.write(batch_request(forged(6)))
    err = await refused(call)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).metadata["expected_sequence"] == "3"
    assert await fetchval(ingest.database_url, FORGED) == 0
    assert await fetchval(ingest.database_url, COMMITTED, COLLECTOR) == 2


# --- the real collector keeps storing ------------------------------------------------------------------------


class Collector:
    """A real Uplink over a real spool, fed numbered batches of readings of tags 1..10."""

    def __init__(self, ingest, state_dir: Path, made: int = 0, *, max_bytes: int = 64 << 20,  # noqa: ANN001
                 max_in_flight: int = 32):
        self.spool = Spool(state_dir / "spool", max_bytes)
        self.uplink = Uplink(ingest.address, COLLECTOR, self.spool, state_dir, backoff_min=0.02, backoff_max=0.2,
                             max_in_flight=max_in_flight)
        self.appended = 0
        self._made = made  # batches made before (by an earlier run over the same log): readings go on after them

    async def start(self) -> None:
        self.spool.open()
        await self.spool.start()
        self.uplink.start()

    def append(self, count: int) -> None:
        for b in numbered_batches(COLLECTOR, count, BATCH, start_us=T0_US + self._made * BATCH * 1000):
            sequence = self.spool.next_sequence()
            b.sequence = sequence
            self.spool.append(sequence, b.SerializeToString(), len(b.readings), 0)
            self.appended += len(b.readings)
        self._made += count

    async def drained(self) -> None:
        await wait_for(lambda: self.spool.acked == self.spool.high_water and self.spool.backlog_readings == 0,
                       timeout=30, what="every batch acknowledged")

    async def stop(self) -> None:
        await self.uplink.stop()
        await self.spool.close()


async def test_a_forger_far_ahead_is_refused_while_every_reading_of_the_real_collector_arrives(
        ingest, tmp_path: Path) -> None:
    real = Collector(ingest, tmp_path)
    await real.start()
    try:
        refusals = 0
        for ahead in (1_000, 10**12, 2**63 - 1, 50, 2):  # interleaved with the collector's own batches
            real.append(7)
            await wait_for(lambda: real.spool.acked > 0, what="the collector storing")
            await forge(ingest, ahead=ahead)
            refusals += 1
        real.append(7)
        await real.drained()
        assert refusals == 5
        # All of them, exactly once; nothing of the forger's.
        assert await fetchval(ingest.database_url, REAL) == real.appended == 6 * 7 * BATCH
        assert await fetchval(ingest.database_url, REAL_DISTINCT) == real.appended
        assert await fetchval(ingest.database_url, FORGED) == 0
        assert await fetchval(ingest.database_url, COMMITTED, COLLECTOR) == 42
        assert real.spool.dropped_readings == 0 and real.spool.suspicious_duplicates == 0
    finally:
        await real.stop()


async def test_after_a_forged_2_63_minus_1_the_collector_still_stores(ingest, tmp_path: Path) -> None:
    real = Collector(ingest, tmp_path)
    await real.start()
    try:
        real.append(3)
        await real.drained()
        await forge(ingest, 2**63 - 1)
        real.append(3)
        await real.drained()
        assert await fetchval(ingest.database_url, COMMITTED, COLLECTOR) == 6
        assert await fetchval(ingest.database_url, REAL) == real.appended == 6 * BATCH
        assert await fetchval(ingest.database_url, FORGED) == 0
    finally:
        await real.stop()


async def test_a_sequence_pushed_ahead_before_the_rule_is_repaired_by_the_reset_and_every_reading_arrives(
        ingest, tmp_path: Path) -> None:
    real = Collector(ingest, tmp_path)
    await real.start()
    real.append(4)
    await real.drained()
    await real.stop()
    # What a forger could do before the sequence rule: committed far ahead of the collector.
    dsn = ingest.database_url
    conn_sql = "UPDATE ingest.collector_sequences SET committed_sequence = 9223372036854775807 WHERE collector_id = $1"
    await fetchval(dsn, conn_sql + " RETURNING 1", COLLECTOR)
    reset = await ingest.stub.ResetCollectorSequence(pb.ResetCollectorSequenceRequest(
        collector_id=COLLECTOR, committed_sequence=4))
    assert (reset.previous_committed_sequence, reset.committed_sequence) == (2**63 - 1, 4)
    assert reset.previous_epoch == reset.epoch == 1  # kept: the collector's own epoch still opens

    real = Collector(ingest, tmp_path, made=4)
    await real.start()
    try:
        real.append(5)
        await real.drained()
        assert await fetchval(dsn, COMMITTED, COLLECTOR) == 9
        assert await fetchval(dsn, REAL) == 9 * BATCH
        assert await fetchval(dsn, REAL_DISTINCT) == 9 * BATCH
    finally:
        await real.stop()


async def test_a_refused_stream_is_logged_with_the_expected_sequence_and_nothing_unstored_is_deleted(
        ingest, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fabrica_svc.collector")
    real = Collector(ingest, tmp_path)
    await real.start()
    try:
        real.append(5)
        await real.drained()
        # The committed sequence goes back under the collector's open stream: its next batch is refused.
        await ingest.stub.ResetCollectorSequence(pb.ResetCollectorSequenceRequest(collector_id=COLLECTOR,
                                                                                 committed_sequence=2))
        real.append(5)
        await real.drained()
        refusals = [r for r in caplog.records if r.getMessage().startswith("ingest refused batch")]
        assert refusals and refusals[0].levelno == logging.ERROR
        assert refusals[0].expected_sequence == "3" and "it expects sequence 3 next" in refusals[0].getMessage()
        # Every reading is in ingest once: the refused batch was kept and sent again, renumbered after 2.
        assert await fetchval(ingest.database_url, REAL) == real.appended == 10 * BATCH
        assert await fetchval(ingest.database_url, REAL_DISTINCT) == real.appended
        assert await fetchval(ingest.database_url, COMMITTED, COLLECTOR) == 7
        assert real.spool.epoch >= 2 and real.spool.dropped_readings == 0
    finally:
        await real.stop()


async def test_a_duplicate_for_a_batch_sent_for_the_first_time_is_counted_and_logged_as_suspicious(
        ingest, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="fabrica_svc.collector")
    real = Collector(ingest, tmp_path)
    await real.start()
    try:
        await wait_for(lambda: real.uplink.connected, what="the collector's stream open")
        assert real.spool.epoch == 1
        # A forger who knows the epoch sends the very next batch before the collector does.
        call, resume = await open_stream(ingest.stub, epoch=1)
        assert resume.committed_sequence == 0
        await call.write(batch_request(forged(1)))
        assert (await call.read()).ack.written == 1
        await call.done_writing()
        real.append(2)
        await real.drained()
        assert real.spool.suspicious_duplicates == 1
        (record,) = [r for r in caplog.records if "duplicate the first time" in r.getMessage()]
        assert record.levelno == logging.ERROR and record.sequence == 1 and record.readings == BATCH
        assert await fetchval(ingest.database_url, FORGED) == 1
        assert await fetchval(ingest.database_url, REAL) == BATCH  # batch 2; batch 1 was taken by the forger
    finally:
        await real.stop()


async def test_batches_the_size_limit_drops_while_streaming_leave_no_gap_on_the_wire(
        ingest, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fabrica_svc.collector.uplink")
    real = Collector(ingest, tmp_path, max_bytes=64 * 1024, max_in_flight=2)
    await real.start()
    blocker = await asyncpg.connect(ingest.database_url)
    try:
        real.append(2)
        await real.drained()
        # Postgres holds the collector's row: the stream's batches wait in flight while the log overflows.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT * FROM ingest.collector_sequences WHERE collector_id = $1 FOR UPDATE", COLLECTOR)
        real.append(3)
        # Batches 3 and 4 are sent (the window is 2) and wait for the row; 5 waits for the window.
        await wait_for(lambda: ingest.app.writer.stats.batches_submitted >= 4, what="two batches in flight")
        real.append(200)  # over the limit: the oldest segments go, the batches in flight and unsent ones after them
        assert real.spool.dropped_readings > 0
        kept = [r for _, payload in real.spool.read_after(real.spool.acked, 1 << 30, 1 << 40, durable_only=False)
                for r in reading_pb2.ReadingBatch.FromString(payload).readings]
        await tx.rollback()
        await real.drained()
        rows = await fetch(ingest.database_url, "SELECT tag_id, read_time FROM ingest.readings WHERE tag_id <= 10")
        stored = {(r["tag_id"], r["read_time"]) for r in rows}
        assert len(stored) == len(rows)  # nothing twice
        kept_keys = {(r.tag_id, r.read_time.ToDatetime(tzinfo=UTC)) for r in kept}
        assert kept_keys <= stored  # every batch still in the log arrived, after the dropped ones
        assert real.appended - len(rows) <= real.spool.dropped_readings  # what is missing is counted as dropped
        committed = await fetchval(ingest.database_url, COMMITTED, COLLECTOR)
        assert committed == len(rows) // BATCH  # contiguous on the wire: one sequence per stored batch
        assert real.spool.epoch >= 2  # the hole was closed in a new epoch, found while streaming
        assert any("left the log unsent" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        await blocker.close()
        await real.stop()


# --- epochs ------------------------------------------------------------------------------------------------------


async def test_an_old_epoch_is_fenced_at_open_and_on_a_stream_opened_before_the_new_one_took_over(ingest) -> None:
    old, resume = await open_stream(ingest.stub, epoch=1)
    assert (resume.committed_sequence, resume.epoch) == (0, 1)
    await old.write(batch_request(numbered_batches(COLLECTOR, 1, BATCH)[0]))
    assert (await old.read()).ack.written == BATCH

    new, resume = await open_stream(ingest.stub, epoch=2)
    assert (resume.committed_sequence, resume.epoch) == (1, 2)
    assert await fetchval(ingest.database_url, EPOCH, COLLECTOR) == 2
    # The old incarnation's next batch: refused under the lock, nothing of it stored.
    await old.write(batch_request(numbered_batches(COLLECTOR, 2, BATCH)[1]))
    err = await refused(old)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).reason == "EPOCH_FENCED"
    assert dict(error_info(err).metadata) == {"collector_id": COLLECTOR, "epoch": "1", "stored_epoch": "2"}
    assert precondition_types(err) == [f"EPOCH collectors/{COLLECTOR}"]
    # A new stream of the old epoch (or of none) is refused at open.
    for epoch in (1, 0):
        call = ingest.stub.StreamReadings()
        await call.write(open_request(epoch=epoch))
        err = await refused(call)
        assert (err.code(), error_info(err).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "EPOCH_FENCED")
    # The new epoch continues at committed + 1 (a new epoch never moves the sequence).
    await new.write(batch_request(numbered_batches(COLLECTOR, 2, BATCH)[1]))
    assert (await new.read()).ack.sequence == 2
    await new.done_writing()
    assert await fetchval(ingest.database_url, REAL) == 2 * BATCH


async def test_new_epoch_gives_the_next_epoch_and_must_come_without_one(ingest) -> None:
    _, resume = await open_stream(ingest.stub, new_epoch=True)
    assert resume.epoch == 1
    _, resume = await open_stream(ingest.stub, new_epoch=True)
    assert resume.epoch == 2
    call = ingest.stub.StreamReadings()
    await call.write(open_request(epoch=3, new_epoch=True))
    err = await refused(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "open.epoch" in field_violations(err)
    # a collector that never stored nor opened with an epoch keeps no row
    await open_stream(ingest.stub, "never-seen")
    assert await fetchval(ingest.database_url, COMMITTED, "never-seen") is None


async def test_a_collector_whose_log_is_recreated_fences_its_old_incarnation(ingest, tmp_path: Path) -> None:
    first = Collector(ingest, tmp_path / "first")
    await first.start()
    try:
        first.append(3)
        await first.drained()
        assert first.spool.epoch == 1
        # The same collector id starts again on a new disk: a new epoch, and the old process is fenced.
        second = Collector(ingest, tmp_path / "second")
        await second.start()
        try:
            second.append(3)
            await second.drained()
            assert second.spool.epoch == 2
            first.append(2)
            await wait_for(lambda: "EPOCH_FENCED" in first.uplink.last_error, what="the old incarnation fenced")
            assert first.spool.backlog_readings == 2 * BATCH  # kept, not deleted
            assert await fetchval(ingest.database_url, REAL) == 6 * BATCH
        finally:
            await second.stop()
    finally:
        await first.stop()


# --- ResetCollectorSequence ------------------------------------------------------------------------------------


async def test_reset_sets_committed_and_epoch_and_the_next_batch_follows_it(ingest) -> None:
    await stream_batches(ingest.stub, COLLECTOR, numbered_batches(COLLECTOR, 6, BATCH))
    reset = await ingest.stub.ResetCollectorSequence(pb.ResetCollectorSequenceRequest(
        collector_id=COLLECTOR, committed_sequence=0, epoch=7))
    assert (reset.collector_id, reset.previous_committed_sequence, reset.previous_epoch, reset.committed_sequence,
            reset.epoch) == (COLLECTOR, 6, 0, 0, 7)
    assert await fetchval(ingest.database_url, EPOCH, COLLECTOR) == 7
    _, resume = await open_stream(ingest.stub, epoch=7)
    assert (resume.committed_sequence, resume.epoch) == (0, 7)
    # without an epoch it keeps the stored one
    reset = await ingest.stub.ResetCollectorSequence(pb.ResetCollectorSequenceRequest(
        collector_id=COLLECTOR, committed_sequence=3))
    assert (reset.previous_committed_sequence, reset.committed_sequence, reset.epoch) == (0, 3, 7)


@pytest.mark.parametrize(
    ("request_fields", "code", "field"),
    [
        ({"collector_id": "nobody", "committed_sequence": 1}, grpc.StatusCode.NOT_FOUND, None),
        ({"collector_id": "Bad Id", "committed_sequence": 1}, grpc.StatusCode.INVALID_ARGUMENT, "collector_id"),
        ({"collector_id": "", "committed_sequence": 1}, grpc.StatusCode.INVALID_ARGUMENT, "collector_id"),
        ({"collector_id": "demo", "committed_sequence": 2**63}, grpc.StatusCode.INVALID_ARGUMENT,
         "committed_sequence"),
        ({"collector_id": "demo", "epoch": 2**64 - 1}, grpc.StatusCode.INVALID_ARGUMENT, "epoch"),
    ],
    ids=["unknown", "bad-id", "no-id", "sequence-beyond-bigint", "epoch-beyond-bigint"],
)
async def test_reset_errors(ingest, request_fields: dict, code: grpc.StatusCode, field: str | None) -> None:
    await stream_batches(ingest.stub, COLLECTOR, numbered_batches(COLLECTOR, 1, BATCH))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest.stub.ResetCollectorSequence(pb.ResetCollectorSequenceRequest(**request_fields))
    assert err.value.code() == code
    if field is not None:
        assert field in field_violations(err.value), field_violations(err.value)
    assert await fetchval(ingest.database_url, COMMITTED, COLLECTOR) == 1


async def test_an_open_with_an_epoch_beyond_bigint_is_invalid(ingest) -> None:
    call = ingest.stub.StreamReadings()
    await call.write(open_request(epoch=2**63))
    err = await refused(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "open.epoch" in field_violations(err)


async def test_streams_interleaved_with_refusals_end_without_holding_anything(ingest) -> None:
    # Many forged streams at once, each refused; the collector's stream, opened among them, is not disturbed.
    results = await asyncio.gather(*(forge(ingest, 10 + i) for i in range(20)))
    assert len(results) == 20
    resume, acks = await stream_batches(ingest.stub, COLLECTOR, numbered_batches(COLLECTOR, 2, BATCH))
    assert resume == 0 and [a.written for a in acks] == [BATCH, BATCH]
    assert ingest.app.writer.queued_rows == 0


async def test_the_readme_grpcurl_example_of_the_reset_works_as_written(ingest) -> None:
    await stream_batches(ingest.stub, COLLECTOR, numbered_batches(COLLECTOR, 3, BATCH))
    readme = (REPO / "README.md").read_text()
    # (The README's command also sends the admin token over TLS; this ingest runs plaintext, without
    # authentication: the test checks the body and the method.)
    command = readme[readme.index("$G -cacert .fabrica/tls/ca.pem -H \"authorization: Bearer $TOKEN\" "
                                  "-d '{\"collector_id\": \"demo\""):]
    command = command[:command.index("ResetCollectorSequence") + len("ResetCollectorSequence")]
    body = command[command.index("-d '") + 4:command.index("' \\")]
    method = command.split()[-1]
    assert "127.0.0.1:50052" in command  # the stack's ingest; here the test's
    proc = await asyncio.create_subprocess_exec(
        shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl", "-plaintext", "-d", body, ingest.address, method,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    answer = json.loads(out)  # zero fields (the epochs, the new sequence) are left out
    assert answer == {"collector_id": COLLECTOR, "previous_committed_sequence": "3"}
    assert await fetchval(ingest.database_url, COMMITTED, COLLECTOR) == 0
