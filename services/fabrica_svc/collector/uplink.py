"""The uplink to ingest: the shared StreamReadings client (fabrica_svc.ingest.client) fed from the spool.

`SpoolSource` is the client's BatchSource over the store-and-forward log: after every (re)connect it
yields the durable batches above the sequence ingest reports as committed, then waits for new ones; each
acknowledgement (and the resume point itself) acknowledges the spool, which deletes what ingest has.

`Uplink` runs the client for ever. The client reconnects by itself on retryable errors; it gives up on a
permanent one (`UplinkRejected`). For INVALID_ARGUMENT (a batch ingest will never take) the uplink
reconnects sending one batch at a time, so that the batch ingest rejects is known for sure; that one is set
aside (written to `rejected/<sequence>.binpb` in the state folder, its readings counted as
dropped, logged) and the rest flows again. A rejection must not stall the log for ever: the readings
behind it would eventually be dropped by the size limit instead. Any other permanent error (a wrong
address, a missing permission) says nothing about the batches: the uplink keeps them and retries slowly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from fabrica.common.v1 import reading_pb2

from ..ingest.client import IngestUplink, UplinkRejected
from ..runtime.channels import PEER_CHANNEL_OPTIONS
from ..runtime.retry import RetryPolicy
from .spool import Spool

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
    def __init__(self, target: str, collector_id: str, spool: Spool, state_dir: Path, *,
                 backoff_min: float = 0.5, backoff_max: float = 30.0, max_in_flight: int = 32):
        self.target = target
        self.collector_id = collector_id
        self.spool = spool
        self.source = SpoolSource(spool)
        self.rejected_dir = state_dir / "rejected"
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_in_flight = max_in_flight
        self.rejected_batches = 0
        self.last_error = ""
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.source.connected

    def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=PEER_CHANNEL_OPTIONS)
        self._task = asyncio.create_task(self._run(), name="uplink")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    async def _run(self) -> None:
        assert self._channel is not None
        backoff = RetryPolicy(self.backoff_min, self.backoff_max).backoff()
        careful = False  # one batch in flight, after a rejection
        suspect: int | None = None
        while True:
            uplink = IngestUplink(self._channel, self.collector_id, self.source,
                                  max_in_flight=1 if careful else self.max_in_flight,
                                  initial_backoff=self.backoff_min, max_backoff=self.backoff_max)
            try:
                await uplink.run()  # returns only if the source ended, which a spool never does
            except UplinkRejected as exc:
                self.last_error = str(exc)
                if exc.error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    # Not about a batch (a wrong address, a missing permission): nothing to set aside. Keep
                    # everything and try again, slowly; the log holds the readings meanwhile.
                    log.error("%s; retrying in %.0f s", exc, self.backoff_max)
                    await asyncio.sleep(self.backoff_max)
                    continue
                if careful and exc.sequence is not None and exc.sequence == suspect:
                    self._set_aside(exc.sequence, exc)
                    careful, suspect = False, None
                    backoff.reset()
                    continue
                log.error("%s; retrying one batch at a time to find the one it refuses", exc)
                careful, suspect = True, exc.sequence
                await asyncio.sleep(backoff.next_delay())
            except Exception as exc:  # the client's own bug or the source's: log, wait, go on
                self.last_error = str(exc)
                log.exception("uplink failed; restarting it")
                await asyncio.sleep(backoff.next_delay())

    def _set_aside(self, sequence: int, error: UplinkRejected) -> None:
        records = self.spool.read_after(sequence - 1, max_records=1, durable_only=False)
        readings = 0
        if records and records[0][0] == sequence:
            payload = records[0][1]
            readings = len(reading_pb2.ReadingBatch.FromString(payload).readings)
            try:
                self.rejected_dir.mkdir(parents=True, exist_ok=True)
                (self.rejected_dir / f"{sequence:020d}.binpb").write_bytes(payload)
            except OSError as exc:
                log.error("cannot keep the rejected batch %d: %s", sequence, exc)
        self.spool.dropped_readings += readings
        self.spool.ack(sequence)
        self.rejected_batches += 1
        log.error(
            "ingest rejects batch %d for good (%s): set aside in %s with its %d readings, counted as dropped",
            sequence, error.error.details(), self.rejected_dir, readings,
            extra={"sequence": sequence, "dropped_readings": readings},
        )
