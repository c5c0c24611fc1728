"""IngestUplink against a real ingest: resume point, acknowledgements to the source, permanent errors with their
decoded details, and the failure handler that keeps its one reconnect loop going."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from fabrica_svc.clients.ingest import IngestUplink, ListBatchSource, UplinkRejected
from fabrica_svc.runtime.retry import RetryPolicy

from .support import T0_US, batch, fetchval, free_port, numbered_batches, reading, stream_batches


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


async def test_a_rejection_carries_ingests_error_details_decoded(ingest) -> None:
    batches = numbered_batches("line-1", 2, 10)
    batches[1] = batch("line-1", 2, [reading(2**63 + 1, T0_US)])
    with pytest.raises(UplinkRejected) as err:
        await asyncio.wait_for(IngestUplink(ingest.channel, "line-1", ListBatchSource(batches)).run(), 30)
    details = err.value.details
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.message == err.value.error.details()
    assert (details.reason, details.domain) == ("INVALID_ARGUMENT", "fabrica.dev")
    assert [f for f, _ in details.field_violations] == ["batch.readings[0].tag_id"]
    assert str(details) in str(err.value)


class FlakySource(RecordingSource):
    """Its first pass fails as a disk under a log could (OSError), once batch 2 is acknowledged."""

    def __init__(self, batches):
        super().__init__(batches)
        self.failed = False
        self.two_acked = asyncio.Event()

    async def batches_after(self, sequence: int):
        sent = 0
        async for b in super().batches_after(sequence):
            if sent == 2 and not self.failed:
                await self.two_acked.wait()
                self.failed = True
                raise OSError(5, "Input/output error")
            sent += 1
            yield b

    async def acknowledged(self, sequence: int) -> None:
        await super().acknowledged(sequence)
        if sequence >= 2:
            self.two_acked.set()


async def test_one_loop_a_failure_handler_decides_and_the_run_goes_on(ingest) -> None:
    batches = numbered_batches("line-1", 6, 10)
    good = batches[3]
    batches[3] = batch("line-1", 4, [reading(2**63 + 1, T0_US)])
    source = FlakySource(batches)
    seen: list[Exception] = []

    async def on_failure(failure: Exception) -> bool:
        seen.append(failure)
        if isinstance(failure, UplinkRejected):
            source.batches[3] = good  # the cause removed: the same run sends the batch again at once
            return True
        return False  # the source's error: try again after the backoff

    uplink = IngestUplink(ingest.channel, "line-1", source, max_in_flight=1, on_failure=on_failure,
                          retry=RetryPolicy(initial=0.01, maximum=0.05))
    stats = await asyncio.wait_for(uplink.run(), 30)
    assert [type(f) for f in seen] == [OSError, UplinkRejected]
    assert seen[1].sequence == 4
    assert stats.acked_sequence == 6 and stats.streams == 3
    assert source.resumed_from == [0, 2, 3]
    assert await fetchval(ingest.database_url, "SELECT count(*) FROM ingest.readings") == 60


async def test_an_error_without_rich_details_decodes_to_its_code_and_message() -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:  # nothing listens there
        with pytest.raises(UplinkRejected) as err:
            await asyncio.wait_for(IngestUplink(channel, "line-1", ListBatchSource([]), retryable=frozenset()).run(),
                                   30)
    details = err.value.details
    assert details.code == grpc.StatusCode.UNAVAILABLE and details.message == err.value.error.details()
    assert (details.reason, details.field_violations, details.metadata) == ("", (), ())
    assert str(details) == f"UNAVAILABLE: {details.message}"


async def test_a_server_that_ends_the_stream_under_the_writes_is_heard_with_its_own_status() -> None:
    """grpcio's asyncio client turns a call's status into INTERNAL when a write races the server's end of the
    stream (grpc/grpc#36066): the uplink must still see the server's code and details (here a quota refusal,
    as ingest sends it while the collector is writing batches ahead), not the INTERNAL."""
    from fabrica.ingest.v1 import ingest_service_pb2 as ingest_pb

    async def refuse_after_one(requests, context):  # noqa: ANN001, ANN202 - a raw-bytes stream handler
        await anext(requests)  # open
        yield ingest_pb.StreamReadingsResponse(resume=ingest_pb.StreamResume(collector_id="line-1")).SerializeToString()
        await anext(requests)  # the first batch; the client is writing the next ones meanwhile
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the quota")

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "fabrica.ingest.v1.IngestService", {"StreamReadings": grpc.stream_stream_rpc_method_handler(refuse_after_one)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(40):  # the race is lost in some of the attempts only
                uplink = IngestUplink(channel, "line-1", ListBatchSource(numbered_batches("line-1", 64, 200)),
                                      max_in_flight=64, retryable=frozenset())
                with pytest.raises(UplinkRejected) as err:
                    await asyncio.wait_for(uplink.run(), 30)
                codes.append((err.value.error.code(), err.value.error.details()))
    finally:
        await server.stop(None)
    assert set(codes) == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the quota")}


async def test_the_uplink_stops_when_cancelled_while_it_cleans_up_a_failed_stream() -> None:
    """Cancelling the uplink (the collector's Uplink.stop) while a failed stream is being cleaned up ends it.
    It used to wait for its sender under suppress(CancelledError), which swallowed its own cancellation when
    that arrived there: run() reconnected for ever and stop() hung (a collector test timed out on it)."""
    from fabrica.ingest.v1 import ingest_service_pb2 as ingest_pb

    async def fail_after_one(requests, context):  # noqa: ANN001, ANN202 - a raw-bytes stream handler
        await anext(requests)
        yield ingest_pb.StreamReadingsResponse(resume=ingest_pb.StreamResume(collector_id="line-1")).SerializeToString()
        await anext(requests)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")

    cleaning = asyncio.Event()

    class SlowToCancel(ListBatchSource):
        """One batch, then waits for more; cancelled, it takes a while to let go (a disk flush, say)."""

        async def batches_after(self, sequence: int):  # noqa: ANN201
            yield numbered_batches("line-1", 1, 10)[0]
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cleaning.set()
                await asyncio.sleep(0.5)
                raise

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "fabrica.ingest.v1.IngestService", {"StreamReadings": grpc.stream_stream_rpc_method_handler(fail_after_one)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            run = asyncio.create_task(IngestUplink(channel, "line-1", SlowToCancel([])).run())
            await asyncio.wait_for(cleaning.wait(), 20)  # the stream failed; its sender is letting go
            run.cancel()
            done, _ = await asyncio.wait([run], timeout=10)
            assert done and run.cancelled(), "the uplink went on after it was cancelled"
    finally:
        await server.stop(None)
