"""Cuts the readings of every poller into numbered ReadingBatches and appends them to the spool.

A batch is cut when it reaches `max_readings`; otherwise, with `flush_when_idle` (the default), as soon as
the uplink has nothing in flight, else `max_latency` after its first reading arrived, whichever comes first.

"Nothing in flight" is the spool's view: every batch appended is acknowledged (``acked == high_water``).
Then a reading is cut into a batch at the end of the event loop's current iteration (``call_soon``), so the
readings one poll adds together still go together, and it is on its way at once instead of waiting out the
linger. While acknowledgements are outstanding, readings gather (as Nagle's algorithm does); when the last
one comes back (the spool tells us, :attr:`Spool.on_drained`) what gathered is cut at once. So at light
load a reading waits for no timer, and under load batches grow with the round trip to ingest, up to
`max_readings`, and are as few and as large as before. While ingest is away the backlog is never drained,
and batches are cut by size and `max_latency` as they always were.
"""

from __future__ import annotations

import asyncio
import logging

from fabrica.collector.v1.collector_service_pb2 import DROP_REASON_DISK_ERROR
from fabrica.common.v1 import reading_pb2
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from ..runtime.telemetry import ALWAYS_SAMPLE, parent_of, to_proto
from .spool import Spool, format_ns
from .tracing import encode_batch, tracer

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, collector_id: str, spool: Spool, *, max_readings: int = 500, max_latency: float = 0.2,
                 flush_when_idle: bool = True):
        if not 1 <= max_readings <= 10_000:
            raise ValueError("max_readings must be 1..10000 (the contract's limit per batch)")
        self.collector_id = collector_id
        self.spool = spool
        self.max_readings = max_readings
        self.max_latency = max_latency
        self.flush_when_idle = flush_when_idle
        self._pending: list[reading_pb2.Reading] = []
        #: The scheduled cut: the linger timer, or the cut at the end of this loop iteration (idle uplink).
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._soon = False
        if flush_when_idle:
            spool.on_drained = self._drained
        #: The poll spans the pending readings came from (the current span at `add`), each once, and whether
        #: one of them is of bad quality (then the batch's span is always sampled).
        self._polls: list[SpanContext] = []
        self._last_poll: SpanContext | None = None
        self._bad = False
        #: Readings appended to the spool so far.
        self.readings = 0

    def add(self, reading: reading_pb2.Reading) -> None:
        pending = self._pending
        pending.append(reading)
        poll = trace.get_current_span().get_span_context()
        if poll is not self._last_poll:
            self._last_poll = poll
            if poll.is_valid:
                self._polls.append(poll)
        if reading.quality != reading_pb2.QUALITY_GOOD:
            self._bad = True
        if len(pending) >= self.max_readings:
            self.cut()
        elif self._soon:
            pass
        elif self.flush_when_idle and self.spool.acked >= self.spool.high_water:
            self._cut_soon()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_latency, self.cut)

    def _cut_soon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._soon = True
        self._timer = asyncio.get_running_loop().call_soon(self.cut)

    def _drained(self) -> None:
        """The spool's every batch is acknowledged: cut what gathered meanwhile (at the end of this iteration)."""
        if self._pending and not self._soon:
            self._cut_soon()

    def cut(self) -> None:
        """Append what is pending as one batch (now)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._soon = False
        readings, self._pending = self._pending, []
        polls, self._polls, self._last_poll, bad, self._bad = self._polls, [], None, self._bad, False
        if not readings:
            return
        sequence = self.spool.next_sequence()
        parent, links = parent_of(polls)
        attributes: dict[str, object] = {"fabrica.collector.id": self.collector_id, "fabrica.batch.sequence": sequence,
                                         "fabrica.batch.readings": len(readings)}
        if bad:
            attributes[ALWAYS_SAMPLE] = True
        with tracer.start_as_current_span("collector.batch", context=parent, links=links, attributes=attributes) as span:
            self._append(sequence, readings, span)

    def _append(self, sequence: int, readings: list[reading_pb2.Reading], span: trace.Span) -> None:
        batch = reading_pb2.ReadingBatch(collector_id=self.collector_id, sequence=sequence, readings=readings)
        context = None
        if span.get_span_context().is_valid:
            context = reading_pb2.TraceContext()
            to_proto(context, span)
        # Readings come in poll order, so the first is the oldest (within the few microseconds that separate
        # two pollers' reads).
        oldest = readings[0].read_time.ToNanoseconds()
        try:
            with tracer.start_as_current_span("collector.spool.append", attributes={"fabrica.batch.sequence": sequence}):
                self.spool.append(sequence, encode_batch(batch, context), len(readings), oldest)
        except OSError as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"spool append failed: {exc}"))
            # Not in the log, so lost: the spool counts them (DROP_REASON_DISK_ERROR), this says which.
            log.error(
                "cannot append batch %d to the spool (%s): dropped its %d readings (read from %s to %s); %d readings "
                "lost to disk errors since the log was created",
                sequence, exc, len(readings), format_ns(oldest), format_ns(readings[-1].read_time.ToNanoseconds()),
                self.spool.dropped[DROP_REASON_DISK_ERROR],
                extra={"reason": "DROP_REASON_DISK_ERROR", "sequence": sequence, "dropped_readings": len(readings)},
            )
            return
        self.readings += len(readings)

    def close(self) -> None:
        """Cut what is pending (graceful shutdown: nothing polled is left in memory)."""
        self.cut()
