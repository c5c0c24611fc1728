"""The uplink to ingest: the shared StreamReadings client (fabrica_svc.clients.ingest) fed from the spool.

`SpoolSource` is the client's BatchSource over the store-and-forward log: after every (re)connect it
yields the durable batches above the sequence ingest reports as committed, then waits for new ones; each
acknowledgement (and the resume point itself) acknowledges the spool, which deletes what ingest has.

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
from fabrica.collector.v1.collector_service_pb2 import DROP_REASON_REJECTED_BY_INGEST
from fabrica.common.v1 import reading_pb2

from ..clients.ingest import IngestUplink, UplinkRejected
from ..runtime.channels import PEER_CHANNEL_OPTIONS
from ..runtime.retry import RetryPolicy
from .spool import Spool, format_ns

log = logging.getLogger(__name__)


class SpoolSource:
    """The spool as the uplink's BatchSource."""

    def __init__(self, spool: Spool, max_records: int = 32):
        self.spool = spool
        self.max_records = max_records
        self._streams = 0

    @property
    def connected(self) -> bool:
        """Ingest has answered `resume` and the stream is open."""
        return self._streams > 0

    async def batches_after(self, sequence: int) -> AsyncIterator[reading_pb2.ReadingBatch]:
        spool = self.spool
        # Above what ingest has, and above what the log has settled otherwise (a batch set aside).
        cursor = max(sequence, spool.acked)
        self._streams += 1
        try:
            while True:
                records = spool.read_after(cursor, self.max_records)
                if not records:
                    # Nothing durable above the cursor: skip past dropped records, then wait for more.
                    cursor = max(cursor, min(spool.durable_sequence, spool.high_water))
                    await spool.wait_durable_beyond(cursor)
                    continue
                for seq, payload in records:
                    cursor = seq
                    yield reading_pb2.ReadingBatch.FromString(payload)
        finally:
            self._streams -= 1

    async def acknowledged(self, sequence: int) -> None:
        if sequence > self.spool.high_water:
            # Ingest has sequences this log never used: the local state was lost. Renumber what is
            # pending above them, or ingest would take it for duplicates.
            self.spool.renumber_above(sequence)
        else:
            self.spool.ack(sequence)


class Uplink:
    """Streams the spool to ingest for ever; see the module's docstring."""

    def __init__(self, target: str, collector_id: str, spool: Spool, state_dir: Path, *,
                 backoff_min: float = 0.5, backoff_max: float = 30.0, max_in_flight: int = 32):
        self.target = target
        self.collector_id = collector_id
        self.spool = spool
        self.source = SpoolSource(spool)
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
    def rejected_batches(self) -> int:
        """Batches set aside since the log was created (the spool keeps the count)."""
        return self.spool.rejected_batches

    def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=PEER_CHANNEL_OPTIONS)
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
        if failure.error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            # Not about a batch (a wrong address, a missing permission): nothing to set aside. Keep
            # everything and try again; the log holds the readings meanwhile.
            log.error("%s; keeping every batch, trying again after the backoff", failure)
            return False
        if self._careful and failure.sequence is not None and failure.sequence == self._suspect:
            self._set_aside(failure)
            self._careful, self._suspect = False, None
            client.max_in_flight = self.max_in_flight
            return True
        log.error("%s; retrying one batch at a time to find the one it refuses", failure)
        self._careful, self._suspect = True, failure.sequence
        client.max_in_flight = 1
        return False

    def _set_aside(self, rejected: UplinkRejected) -> None:
        sequence = rejected.sequence
        assert sequence is not None
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
        log.error(
            "ingest rejects batch %d for good (%s): set aside in %s with its %d readings (%s), counted as dropped; "
            "%d batches and %d readings rejected since the log was created",
            sequence, details, self.rejected_dir, readings, times, self.spool.rejected_batches,
            self.spool.dropped[DROP_REASON_REJECTED_BY_INGEST],
            extra={"reason": "DROP_REASON_REJECTED_BY_INGEST", "sequence": sequence, "dropped_readings": readings,
                   "error_reason": details.reason,
                   "field_violations": [f"{f}: {d}" for f, d in details.field_violations]},
        )
