"""The uplink to ingest: the shared StreamReadings client (fabrica_svc.clients.ingest) fed from the spool.

`SpoolSource` is the client's BatchSource over the store-and-forward log: after every (re)connect it
yields the durable batches above the sequence ingest reports as committed, then waits for new ones; each
acknowledgement (and the resume point itself) acknowledges the spool, which deletes what ingest has. It
yields each record's bytes as they are (`RawBatch`: the client frames them as the request's ``batch`` and
sets the wire sequence after them), so a batch is encoded once in its life, by the batcher, and never
parsed again on its way to ingest.

Wire numbering. Ingest stores a batch only when it is exactly one above the committed sequence (a batch
further ahead is refused), but the log has holes where batches left it without reaching ingest: the size
limit dropped them, or ingest rejected one and it was set aside. So a record goes on the wire as its log
sequence minus the log's `wire_shift`, and a hole right after what ingest has committed is closed by a new
shift: record P becomes committed + 1. The shift only changes in a new epoch of the collector, which
fences in ingest every stream of the old numbering (one still draining on another replica could otherwise
commit an old number after the new one was given to another record). So on a hole the source takes the
next epoch (persisted first), has the stream reopened, and in the new epoch's first stream decides the new
shift and persists it before anything is sent under it. A log with no epoch yet (new, or its state lost)
asks ingest for one; when ingest has sequences beyond anything the log used (its local state was lost),
the pending batches are renumbered above them in the log itself (`Spool.renumber_above`).

Refusals. A stream ingest refuses (FAILED_PRECONDITION: a sequence gap, with ingest's expected sequence, or
a fenced epoch) is logged at ERROR and deletes nothing: only acknowledgements delete, and a refused batch is
never acknowledged. A batch acknowledged as a duplicate the first time it was sent in this epoch (above the
highest sequence that may have been sent before) cannot be one of ours: another writer is using this
collector id. It is counted (`Spool.suspicious_duplicates`, GetStatus, a metric) and logged at ERROR.

`Uplink` runs the client for ever. The client's `run()` is the one reconnect loop (with the runtime's
RetryPolicy; the gRPC channel only re-establishes its connection underneath); the uplink is its failure
handler, for what a reconnect does not fix by itself. For INVALID_ARGUMENT (a batch ingest will never take)
the next attempts send one batch at a time, so that the batch ingest rejects is known for sure; that one is
set aside (written to `rejected/<sequence>.binpb` in the state folder, counted by the spool as a rejected
batch and its readings as dropped, logged with ingest's reason) and the rest flows again at once. A
rejection must not stall the log for ever: the readings behind it would eventually be dropped by the size
limit instead. Any other permanent error (a wrong address, a missing permission) says nothing about the
batches: the uplink keeps them and tries again after the backoff, which grows to its maximum.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from opentelemetry import trace
from fabrica.collector.v1.collector_service_pb2 import DROP_REASON_REJECTED_BY_INGEST
from fabrica.common.v1 import reading_pb2

from ..clients.ingest import BatchSource, IngestUplink, RawBatch, ReopenStream, UplinkRejected, UplinkStats
from ..runtime.channels import peer_channel
from ..runtime.settings import Settings
from ..runtime.retry import RetryPolicy
from ..runtime.telemetry import ALWAYS_SAMPLE
from .spool import Spool, format_ns
from .tracing import trace_context_of, tracer, trouble_span

log = logging.getLogger(__name__)


class SpoolSource(BatchSource):
    """The spool as the uplink's BatchSource (see the module's docstring for the numbering)."""

    def __init__(self, spool: Spool, collector_id: str = "", max_records: int = 32):
        self.spool = spool
        self.collector_id = collector_id
        self.max_records = max_records
        self._streams = 0
        #: The highest wire sequence that may have been sent in the current numbering: anything in the log may
        #: have been, by an earlier run. A duplicate above its value when a stream starts is suspicious.
        self._sent_through = spool.high_water - spool.wire_shift
        self._stream_prior = self._sent_through
        #: The send span of each batch on the wire, by wire sequence, until its acknowledgement.
        self._sending: dict[int, trace.Span] = {}

    @property
    def connected(self) -> bool:
        """Ingest has answered `resume` and the stream is open."""
        return self._streams > 0

    def local(self, wire: int) -> int:
        """The log's sequence of the record sent as `wire`."""
        return wire + self.spool.wire_shift

    def stream_epoch(self) -> tuple[int, bool]:
        epoch = self.spool.epoch
        return (0, True) if epoch == 0 else (epoch, False)

    async def resumed(self, committed: int, epoch: int) -> bool:
        spool = self.spool
        if spool.epoch == 0:
            spool.epoch = epoch  # given by ingest; persisted below (a crash before: the log asks again)
        if spool.wire_epoch != spool.epoch:
            # The first stream of this epoch: no stream of the old numbering can commit any more.
            self._renumber(committed)
            spool.wire_epoch = spool.epoch
            await spool.save_state()
            self._sent_through = committed
            return True
        local = committed + spool.wire_shift
        if local > spool.high_water:
            await self._next_epoch(f"ingest has committed sequence {committed}, beyond this log's high-water mark")
            return False
        nxt = spool.first_after(max(local, spool.acked))
        if (nxt != local + 1) if nxt is not None else spool.high_water != local:
            await self._next_epoch(f"log batches after {local} never reached ingest (dropped or set aside)")
            return False
        return True

    def _renumber(self, committed: int) -> None:
        """Decide the numbering of a new epoch: the first pending record goes out as committed + 1."""
        spool = self.spool
        local = committed + spool.wire_shift
        if local > spool.high_water:
            # Ingest has sequences this log never used: the local state was lost. Renumber what is
            # pending above them, or ingest would take it for duplicates.
            spool.renumber_above(local)
            spool.new_log = 0
            return
        if spool.new_log:
            # A new log: what ingest has is an earlier incarnation's, none of it is ours.
            spool.new_log = 0
        else:
            spool.ack(local)
        nxt = spool.first_after(spool.acked)
        target = nxt if nxt is not None else spool.high_water + 1
        shift = target - (committed + 1)
        if shift != spool.wire_shift:
            log.warning(
                "log batches %d to %d never reached ingest (dropped or set aside, counted there): in epoch %d log "
                "batch %d goes out as sequence %d, the one after ingest's committed %d",
                local + 1, target - 1, spool.epoch, target, committed + 1, committed,
                extra={"epoch": spool.epoch, "wire_shift": shift, "committed_sequence": committed})
            spool.wire_shift = shift

    async def _next_epoch(self, why: str) -> None:
        spool = self.spool
        spool.epoch += 1
        await spool.save_state()
        log.warning("%s: the numbering must change, so the collector takes epoch %d (fencing streams of the "
                    "old one) and opens a new stream", why, spool.epoch, extra={"epoch": spool.epoch})

    async def batches_after(self, sequence: int) -> AsyncIterator[RawBatch]:
        spool = self.spool
        shift = spool.wire_shift
        cursor = sequence + shift  # resumed() made sure that the next record is cursor + 1
        self._stream_prior = self._sent_through
        self._streams += 1
        try:
            while True:
                records = spool.read_records_after(cursor, self.max_records)
                if not records:
                    nxt = spool.first_after(cursor)
                    if nxt == cursor + 1 or (nxt is None and spool.high_water == cursor):
                        await spool.wait_durable_beyond(cursor)
                        continue
                    await self._hole(cursor, nxt if nxt is not None else spool.high_water + 1)
                for seq, payload, readings in records:
                    if seq != cursor + 1:
                        await self._hole(cursor, seq)
                    cursor = seq
                    wire = seq - shift
                    self._send_span(wire, payload, resent=wire <= self._sent_through)
                    self._sent_through = max(self._sent_through, wire)
                    yield RawBatch(wire, readings, payload)
        finally:
            self._streams -= 1
            for span in self._sending.values():  # not acknowledged on this stream: sent again on the next
                span.set_status(trace.Status(trace.StatusCode.ERROR, "stream ended before the acknowledgement"))
                span.end()
            self._sending.clear()

    def _send_span(self, wire: int, payload: bytes, *, resent: bool) -> None:
        """Start the span of sending a batch, a child of the batch's own span (its context is in the record,
        so this holds after a restart too); it ends with the acknowledgement. A batch sent again is always
        sampled (runtime.telemetry: FabricaSampler)."""
        parent = trace_context_of(payload)
        attributes: dict[str, object] = {"fabrica.collector.id": self.collector_id, "fabrica.batch.sequence": wire,
                                         "fabrica.batch.resent": resent}
        if resent:
            attributes[ALWAYS_SAMPLE] = True
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent) if parent else trace.INVALID_SPAN)
        old = self._sending.pop(wire, None)
        if old is not None:
            old.end()
        self._sending[wire] = tracer.start_span("collector.uplink.send", context=context, attributes=attributes)

    async def _hole(self, cursor: int, nxt: int) -> None:
        """The records between `cursor` (the last sent) and `nxt` left the log unsent (the size limit): the
        numbering must change, in a new epoch, on a new stream (this one ends after its acks)."""
        await self._next_epoch(f"log batches {cursor + 1} to {nxt - 1} left the log unsent")
        raise ReopenStream()

    async def acknowledged(self, sequence: int) -> None:
        self.spool.ack(sequence + self.spool.wire_shift)
        span = self._sending.pop(sequence, None)
        if span is not None:
            span.end()

    async def duplicate(self, sequence: int, readings: int) -> None:
        span = self._sending.pop(sequence, None)
        if span is not None:
            span.set_attribute("fabrica.batch.duplicate", True)
            span.end()
        if sequence <= self._stream_prior:
            return  # sent before: an earlier stream's copy was committed
        spool = self.spool
        spool.suspicious_duplicates += 1
        log.error(
            "ingest acknowledged batch %d (log batch %d, %d readings) as a duplicate the first time this collector "
            "sent it: another writer is using collector id %s, and these readings were most likely not stored; "
            "%d suspicious duplicates since the log was created",
            sequence, self.local(sequence), readings, self.collector_id, spool.suspicious_duplicates,
            extra={"reason": "SUSPICIOUS_DUPLICATE", "sequence": sequence, "readings": readings,
                   "suspicious_duplicates": spool.suspicious_duplicates})


class Uplink:
    """Streams the spool to ingest for ever; see the module's docstring."""

    def __init__(self, target: str, collector_id: str, spool: Spool, state_dir: Path, *,
                 backoff_min: float = 0.5, backoff_max: float = 30.0, max_in_flight: int = 32,
                 settings: Settings | None = None):
        self.target = target
        #: Its service's settings: the channel's TLS and the token it sends (runtime/channels.peer_channel);
        #: None: plaintext without a token (tests).
        self.settings = settings
        self.collector_id = collector_id
        self.spool = spool
        self.source = SpoolSource(spool, collector_id)
        self.rejected_dir = state_dir / "rejected"
        self.retry = RetryPolicy(backoff_min, backoff_max)
        self.max_in_flight = max_in_flight
        self.last_error = ""
        self._careful = False  # one batch in flight, after a rejection
        self._suspect: int | None = None
        self._client: IngestUplink | None = None
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[object] | None = None

    @property
    def connected(self) -> bool:
        return self.source.connected

    @property
    def stats(self) -> UplinkStats | None:
        """The client's counters (None before start)."""
        return self._client.stats if self._client is not None else None

    @property
    def rejected_batches(self) -> int:
        """Batches set aside since the log was created (the spool keeps the count)."""
        return self.spool.rejected_batches

    def start(self) -> None:
        self._channel = peer_channel(self.target, self.settings)
        self._client = IngestUplink(self._channel, self.collector_id, self.source, max_in_flight=self.max_in_flight,
                                    retry=self.retry, on_failure=self._on_failure)
        self._task = asyncio.create_task(self._client.run(), name="uplink")
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.remove_done_callback(self._ended)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    @staticmethod
    def _ended(task: asyncio.Task[object]) -> None:
        # run() never ends over a spool and the handler never raises: if it does, readings stop flowing.
        if task.cancelled():
            return
        log.critical("the uplink to ingest stopped; readings stay in the spool until a restart",
                     exc_info=task.exception())

    async def _on_failure(self, failure: Exception) -> bool:
        """The client's failure handler: True when the cause is removed (a batch set aside)."""
        client = self._client
        assert client is not None
        self.last_error = str(failure)
        if not isinstance(failure, UplinkRejected):  # the source's (the spool's disk) or a bug
            log.error("uplink failed; reconnecting after the backoff", exc_info=failure)
            return False
        code = failure.error.code()
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            self._refused(failure)
            return False
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            # Not about a batch (a wrong address, a missing permission): nothing to set aside. Keep
            # everything and try again; the log holds the readings meanwhile.
            log.error("%s; keeping every batch, trying again after the backoff", failure)
            return False
        # Log sequences from here on: the wire numbering may change before the next attempt.
        local = self.source.local(failure.sequence) if failure.sequence is not None else None
        if self._careful and local is not None and local == self._suspect:
            self._set_aside(failure, local)
            self._careful, self._suspect = False, None
            client.max_in_flight = self.max_in_flight
            return True
        log.error("%s; retrying one batch at a time to find the one it refuses", failure)
        self._careful, self._suspect = True, local
        client.max_in_flight = 1
        return False

    def _refused(self, failure: UplinkRejected) -> None:
        """Ingest refused the stream (FAILED_PRECONDITION): nothing of the refused batch was stored and nothing
        is deleted; the next attempt resumes from what ingest has committed."""
        details = failure.details
        meta = dict(details.metadata)
        if details.reason == "EPOCH_FENCED":
            log.error(
                "ingest fences this collector: its epoch %s is below the stored epoch %s, so another incarnation of "
                "collector %s has taken over; keeping every batch (%d readings) and trying again after the backoff. "
                "If this one is the collector that should run, stop the other and set the epoch back with "
                "ResetCollectorSequence", meta.get("epoch"), meta.get("stored_epoch"), self.collector_id,
                self.spool.backlog_readings,
                extra={"reason": details.reason, "epoch": meta.get("epoch"), "stored_epoch": meta.get("stored_epoch")})
            return
        log.error(
            "ingest refused batch %s: it expects sequence %s next (%s); nothing of it was stored, every batch is kept, "
            "trying again from what ingest has committed after the backoff",
            meta.get("sequence", failure.sequence), meta.get("expected_sequence", "?"), details,
            extra={"reason": details.reason, "sequence": meta.get("sequence"),
                   "expected_sequence": meta.get("expected_sequence")})

    def _set_aside(self, rejected: UplinkRejected, sequence: int) -> None:
        payload, readings = self.spool.reject(sequence)
        times = "no read time"
        if payload is not None:
            batch = reading_pb2.ReadingBatch.FromString(payload)
            read = sorted(r.read_time.ToNanoseconds() for r in batch.readings if r.HasField("read_time"))
            if read:
                times = f"read from {format_ns(read[0])} to {format_ns(read[-1])}"
            try:
                self.rejected_dir.mkdir(parents=True, exist_ok=True)
                (self.rejected_dir / f"{sequence:020d}.binpb").write_bytes(payload)
            except OSError as exc:
                log.error("cannot keep the rejected batch %d: %s", sequence, exc)
        details = rejected.details
        trouble_span("collector.batch.rejected", payload, {"fabrica.collector.id": self.collector_id,
                                                           "fabrica.batch.sequence": sequence,
                                                           "fabrica.batch.readings": readings}, str(details))
        log.error(
            "ingest rejects batch %d for good (%s): set aside in %s with its %d readings (%s), counted as dropped; "
            "%d batches and %d readings rejected since the log was created",
            sequence, details, self.rejected_dir, readings, times, self.spool.rejected_batches,
            self.spool.dropped[DROP_REASON_REJECTED_BY_INGEST],
            extra={"reason": "DROP_REASON_REJECTED_BY_INGEST", "sequence": sequence, "dropped_readings": readings,
                   "error_reason": details.reason,
                   "field_violations": [f"{f}: {d}" for f, d in details.field_violations]},
        )
