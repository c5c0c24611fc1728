"""``IngestUplink``: the client side of ingest's StreamReadings, for the collector (and tests and benchmarks).

It opens the stream, learns from ``resume`` where ingest stands, sends batches from a
:class:`BatchSource` after that point, keeps at most ``max_in_flight`` unacknowledged, checks that acks
come in order, and tells the source what is acknowledged (so a store-and-forward log can delete it).

:meth:`IngestUplink.run` is the one reconnect loop of the uplink; it waits with the runtime's
:class:`~fabrica_svc.runtime.retry.RetryPolicy` (the channel below only re-establishes its connection).
On a retryable error (UNAVAILABLE and the like: ingest restarting, Postgres away) it reconnects and
resends everything after the new resume point; ingest stores each batch once whatever is resent. That
includes RESOURCE_EXHAUSTED, ingest's refusal of a batch over the tenant's readings/s quota: nothing of the
batch was stored, and the uplink waits at least the ``retry_after_ms`` ingest names (ErrorInfo metadata)
before it sends it again (:attr:`UplinkStats.quota_refusals` counts these).
INVALID_ARGUMENT and other permanent errors become :class:`UplinkRejected` (resending the same batch cannot
help), with ingest's error details decoded; so do FAILED_PRECONDITION refusals of the sequence rule
(SEQUENCE_GAP, with ingest's ``expected_sequence``) and of a fenced epoch (EPOCH_FENCED). Without an
``on_failure`` handler, that and an error of the source end ``run()``; with one (the collector's), the
handler decides and the same loop goes on.

Sequences and epochs. Ingest stores a batch only if it is exactly one above the collector's committed
sequence, so a source numbers what it sends without gaps (a store-and-forward log that lost batches
renumbers the rest). The source also says which epoch to open each stream with (:meth:`BatchSource.
stream_epoch`), learns where ingest stands before it sends (:meth:`BatchSource.resumed`, which may ask for
the stream to be opened again, e.g. with a new epoch before it renumbers), may end a stream to have it
reopened at once (:class:`ReopenStream`), and hears of every batch acknowledged as a duplicate
(:meth:`BatchSource.duplicate`).

Encoded once. The stream is a stream-stream call with an identity request serializer: every request goes
out as bytes the uplink builds. A source may give a batch as a :class:`RawBatch`, the serialized
``ReadingBatch`` it already holds (the collector's spool), which then goes on the wire as it is, framed as
the ``batch`` field of a ``StreamReadingsRequest`` (:func:`frame_batch`); a ``ReadingBatch`` message is
serialized once. So a collector's batch is encoded once in its life, by its batcher.

Example::

    channel = grpc.aio.insecure_channel(target, options=runtime.channels.PEER_CHANNEL_OPTIONS)
    stats = await IngestUplink(channel, "line-1", ListBatchSource(batches)).run()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, Union

import grpc

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb

from ..runtime.retry import SERVICE_RETRY, RetryPolicy
from .errors import ErrorDetails, ServerStatus, error_details

log = logging.getLogger(__name__)


RETRYABLE: frozenset[grpc.StatusCode] = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,  # e.g. the server shut down under the call
})


_STREAM_READINGS = "/{}/StreamReadings".format(pb.DESCRIPTOR.services_by_name["IngestService"].full_name)
#: Wire tags (field number << 3 | wire type) of StreamReadingsRequest.batch and ReadingBatch.sequence.
_BATCH_TAG = bytes([pb.StreamReadingsRequest.BATCH_FIELD_NUMBER << 3 | 2])
_SEQUENCE_TAG = bytes([reading_pb2.ReadingBatch.SEQUENCE_FIELD_NUMBER << 3 | 0])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def frame_batch(payload: bytes, sequence: int) -> bytes:
    """A serialized StreamReadingsRequest whose ``batch`` is the serialized ReadingBatch `payload` with its
    sequence set to `sequence`: `payload` is copied as it is, followed by the sequence field, which a
    protobuf parser takes over the one in `payload` (for a scalar field given twice, the last one wins)."""
    inner = _SEQUENCE_TAG + _varint(sequence)
    return b"".join((_BATCH_TAG, _varint(len(payload) + len(inner)), payload, inner))


@dataclass(frozen=True)
class RawBatch:
    """A batch as the bytes of a serialized ReadingBatch, sent as they are (:func:`frame_batch`) under
    `sequence`, whatever sequence `payload` itself carries. `readings` is how many it holds."""

    sequence: int
    readings: int
    payload: bytes


#: What a source gives: a message (serialized once, when sent) or the bytes of one (sent as they are).
Batch = Union[reading_pb2.ReadingBatch, RawBatch]


def _identity(request: bytes) -> bytes:
    return request


def _count(batch: Batch) -> int:
    return batch.readings if isinstance(batch, RawBatch) else len(batch.readings)


def _request_bytes(batch: Batch) -> bytes:
    if isinstance(batch, RawBatch):
        return frame_batch(batch.payload, batch.sequence)
    return pb.StreamReadingsRequest(batch=batch).SerializeToString()


class BatchSource(Protocol):
    """Where the uplink's batches come from. Sequences start at 1 and strictly increase; ingest stores a batch
    only when it is exactly one above the committed sequence. Subclass it to inherit the defaults of the
    optional methods (no epoch, nothing to do on resume or on a duplicate)."""

    def batches_after(self, sequence: int) -> AsyncIterator[Batch]:
        """The batches (messages or :class:`RawBatch`) with a sequence above `sequence`, in order. Called again after every reconnect.
        It may wait for new batches (a live collector) or end (a finite source: the uplink then finishes
        once everything is acknowledged), or raise :class:`ReopenStream`."""
        ...

    async def acknowledged(self, sequence: int) -> None:
        """Everything up to `sequence` is committed in ingest and may be forgotten."""
        ...

    def stream_epoch(self) -> tuple[int, bool]:
        """(epoch, new_epoch) of the next stream's open (StreamOpen): by default no epoch."""
        return 0, False

    async def resumed(self, committed: int, epoch: int) -> bool:
        """Ingest answered open: its committed sequence and the stream's epoch, before anything is sent.
        False closes the stream and opens the next one at once (with what :meth:`stream_epoch` says then)."""
        return True

    async def duplicate(self, sequence: int, readings: int) -> None:
        """Ingest acknowledged batch `sequence` (of `readings` readings) as a duplicate, not storing it; called
        before :meth:`acknowledged`."""
        return None


class ListBatchSource(BatchSource):
    """A finite source over batches held in memory (tests, benchmarks, replaying a file)."""

    def __init__(self, batches: Iterable[reading_pb2.ReadingBatch]):
        self.batches = list(batches)
        self.acked = 0

    async def batches_after(self, sequence: int) -> AsyncIterator[reading_pb2.ReadingBatch]:
        for batch in self.batches:
            if batch.sequence > sequence:
                yield batch

    async def acknowledged(self, sequence: int) -> None:
        self.acked = max(self.acked, sequence)


class ReopenStream(Exception):
    """Raised by a source's `batches_after`: end this stream once what was sent is acknowledged, then open
    the next one at once (e.g. the source must renumber under a new epoch)."""


class UplinkRejected(Exception):
    """Ingest rejected the stream with a permanent error (e.g. INVALID_ARGUMENT for a bad batch)."""

    def __init__(self, error: grpc.aio.AioRpcError, sequence: int | None):
        details = error_details(error)
        super().__init__(f"ingest rejected the stream ({details}); first unacknowledged batch: {sequence}")
        self.error = error
        #: Ingest's status, decoded: ErrorInfo reason, field violations.
        self.details: ErrorDetails = details
        self.sequence = sequence


#: Called by :meth:`IngestUplink.run` with what a reconnect does not fix by itself: an
#: :class:`UplinkRejected` or an error of the source. Return True when the cause is removed (e.g. the
#: rejected batch set aside: the next attempt starts at once and the backoff starts over), False to try again
#: after the backoff; raise to end ``run()``.
FailureHandler = Callable[[Exception], Awaitable[bool]]


class _Retry(Exception):
    """The stream ended before everything was acknowledged, without an error status."""


class _Reopen(Exception):
    """The source asked for a new stream (ReopenStream, or False from `resumed`)."""


@dataclass
class UplinkStats:
    #: The highest sequence ingest has confirmed (by resume or ack).
    acked_sequence: int = 0
    batches_written: int = 0
    batches_duplicate: int = 0
    readings_written: int = 0
    #: Streams opened (the first one included).
    streams: int = 0
    #: Status codes of the errors that ended a stream, in order (the last 100).
    errors: list[grpc.StatusCode] = field(default_factory=list)
    #: Streams ended by RESOURCE_EXHAUSTED (a batch over the tenant's readings/s quota), and the seconds
    #: waited after them before sending again.
    quota_refusals: int = 0
    quota_wait_seconds: float = 0.0


class IngestUplink:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        collector_id: str,
        source: BatchSource,
        *,
        max_in_flight: int = 32,
        retry: RetryPolicy = SERVICE_RETRY,
        retryable: frozenset[grpc.StatusCode] = RETRYABLE,
        on_failure: FailureHandler | None = None,
    ):
        # StreamReadings with an identity request serializer: requests are bytes (see the module's docstring).
        self._open_call = channel.stream_stream(_STREAM_READINGS, request_serializer=_identity,
                                                response_deserializer=pb.StreamReadingsResponse.FromString)
        self.collector_id = collector_id
        self.source = source
        #: Read when a stream opens: a failure handler may change it for the next attempt.
        self.max_in_flight = max_in_flight
        self.retry = retry
        self.retryable = retryable
        self.on_failure = on_failure
        self.stats = UplinkStats()
        self._first_unacked: int | None = None

    async def run(self) -> UplinkStats:
        """Send until the source ends and everything is acknowledged (forever for an endless source).

        Reconnects on retryable errors after the retry policy's backoff, which starts over whenever an
        attempt got something acknowledged. A permanent error (:class:`UplinkRejected`) or an error of the
        source goes to `on_failure` when there is one, else ends the run."""
        backoff = self.retry.backoff()
        reopened = False
        while True:
            progress_before = self.stats.acked_sequence
            try:
                await self._stream()
                return self.stats
            except _Reopen as exc:
                # At once, but never twice in a row without a pause (unless the stream between got acks).
                if not reopened or self.stats.acked_sequence > progress_before:
                    reopened = True
                    continue
                failure = exc
            except grpc.aio.AioRpcError as exc:
                self._note_error(exc.code())
                failure: Exception = exc if exc.code() in self.retryable else UplinkRejected(exc, self._first_unacked)
            except _Retry as exc:
                self._note_error(grpc.StatusCode.UNAVAILABLE)
                failure = exc
            except Exception as exc:  # the source's (a spool's disk, a bug): the handler decides
                failure = exc
            reopened = False
            if self.stats.acked_sequence > progress_before:
                backoff.reset()
            if not isinstance(failure, (grpc.aio.AioRpcError, _Retry, _Reopen)):
                if self.on_failure is None:
                    if isinstance(failure, UplinkRejected):
                        raise failure from failure.error
                    raise failure
                if await self.on_failure(failure):
                    backoff.reset()
                    continue
            delay = backoff.next_delay()
            if isinstance(failure, grpc.aio.AioRpcError) and failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                delay = max(delay, self._retry_after(failure))
                self.stats.quota_refusals += 1
                self.stats.quota_wait_seconds += delay
            reason = str(error_details(failure)) if isinstance(failure, grpc.aio.AioRpcError) else str(failure)
            log.info("uplink reconnecting", extra={"collector_id": self.collector_id, "delay": round(delay, 3),
                                                   "error": reason[:500]})
            await asyncio.sleep(delay)

    def _retry_after(self, error: grpc.aio.AioRpcError) -> float:
        """The seconds ingest asks to wait after a RESOURCE_EXHAUSTED (metadata ``retry_after_ms``; 0 when it
        names none), at most a minute."""
        try:
            return min(60.0, max(0, int(dict(error_details(error).metadata).get("retry_after_ms", "0"))) / 1000)
        except ValueError:
            return 0.0

    def _note_error(self, code: grpc.StatusCode) -> None:
        self.stats.errors.append(code)
        del self.stats.errors[:-100]

    async def _stream(self) -> None:
        call = self._open_call()
        status = ServerStatus(call)  # the server's own status, should a write race its end (errors.py)
        self.stats.streams += 1
        in_flight: deque[tuple[int, int]] = deque()  # (sequence, readings)
        window = asyncio.Semaphore(self.max_in_flight)
        sent_all = asyncio.Event()
        reopen = asyncio.Event()
        sender: asyncio.Task[None] | None = None
        try:
            epoch, new_epoch = self.source.stream_epoch()
            opening = pb.StreamOpen(collector_id=self.collector_id, epoch=epoch, new_epoch=new_epoch)
            with contextlib.suppress(asyncio.InvalidStateError):  # the call already ended: read() says why
                await call.write(pb.StreamReadingsRequest(open=opening).SerializeToString())
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "resume":
                raise _Retry("stream ended before resume")
            resumed = first.resume.committed_sequence
            if not await self.source.resumed(resumed, first.resume.epoch):
                raise _Reopen("the source asked for a new stream on resume")
            await self._confirm(resumed)

            async def send() -> None:
                last = resumed
                try:
                    try:
                        async for batch in self.source.batches_after(resumed):
                            if batch.sequence <= last:
                                raise ValueError(f"source gave sequence {batch.sequence} after {last}")
                            last = batch.sequence
                            await window.acquire()
                            in_flight.append((batch.sequence, _count(batch)))
                            self._first_unacked = in_flight[0][0]
                            await call.write(_request_bytes(batch))
                    except ReopenStream:
                        reopen.set()  # end this stream after its acks; run() opens the next at once
                    await call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    return  # the call ended under the write; the reader gets its status
                except BaseException:
                    call.cancel()  # wake the reader; the source's error is raised from run()
                    raise
                if not reopen.is_set():
                    sent_all.set()

            sender = asyncio.create_task(send())
            while True:
                try:
                    response = await call.read()
                except (grpc.aio.AioRpcError, asyncio.CancelledError):
                    # The sender cancels the call when the source fails: the read then raises CancelledError
                    # (grpc's, for a call cancelled locally), which must not pass for this task's cancellation.
                    task = asyncio.current_task()
                    if (sender.done() and not sender.cancelled() and sender.exception() is not None
                            and not (task is not None and task.cancelling())):
                        raise sender.exception() from None  # type: ignore[misc]
                    raise
                if response is grpc.aio.EOF:
                    break
                if response.WhichOneof("kind") != "ack":
                    continue
                ack = response.ack
                if not in_flight or ack.sequence != in_flight[0][0]:
                    raise _Retry(f"ack {ack.sequence} out of order (expected {in_flight[0][0] if in_flight else None})")
                _, readings = in_flight.popleft()
                window.release()
                self._first_unacked = in_flight[0][0] if in_flight else None
                if ack.duplicate:
                    self.stats.batches_duplicate += 1
                    await self.source.duplicate(ack.sequence, readings)
                else:
                    self.stats.batches_written += 1
                    self.stats.readings_written += ack.written
                await self._confirm(ack.sequence)
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]
            if reopen.is_set() and not in_flight:
                raise _Reopen("the source asked for a new stream")
            if not (sent_all.is_set() and not in_flight):
                # A clean end without everything acknowledged: the status says why if there was one.
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    # The same error as a failed read raises, so that run() treats the status alike either way
                    # (a RESOURCE_EXHAUSTED's retry_after_ms, a permanent code's rejection).
                    raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(),
                                               await call.details())
                raise _Retry("stream ended before every batch was acknowledged")
        except grpc.aio.AioRpcError as exc:
            raise status.real(exc) from None
        finally:
            try:
                if sender is not None and not sender.done():
                    sender.cancel()
                    # asyncio.wait, not `await sender` under suppress(CancelledError): that would also swallow the
                    # cancellation of this task itself arriving here (Uplink.stop), and run() would go on for ever.
                    await asyncio.wait([sender])
                if sender is not None and sender.done() and not sender.cancelled():
                    sender.exception()  # retrieved: an error there shows as the call's status instead
            finally:
                call.cancel()

    async def _confirm(self, sequence: int) -> None:
        if sequence > self.stats.acked_sequence:
            self.stats.acked_sequence = sequence
        await self.source.acknowledged(sequence)
