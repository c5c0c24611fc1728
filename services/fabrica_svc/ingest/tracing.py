"""Ingest's spans in a reading's trace (runtime/telemetry.py has the sampling rules).

* ``ingest.commit``: one write transaction of a group of batches. Its parent is the first sampled batch's
  context (ReadingBatch.trace_context: the collector's batch span), and it links to every batch's context,
  so each batch of a group commit finds its commit. Attributes: batches (group size), rows, collectors, the
  commit's duration in seconds, and the outcome.
* ``ingest.batch.duplicate``: a batch that arrives again after it was committed (the collector resent it);
  always sampled, a child of the batch's context.
* ``ingest.batch.refused`` / ``ingest.batch.failed``: a batch the transaction refused (a sequence gap, a
  fenced epoch) or could not write (the database unavailable, a rejected batch); always sampled, a child of
  the batch's context, with the error as its status.
"""

from __future__ import annotations

from collections.abc import Sequence

from fabrica.common.v1 import reading_pb2
from opentelemetry import trace

from ..runtime.telemetry import ALWAYS_SAMPLE, from_proto, parent_of, span_context
from .domain import WriteBatch

tracer = trace.get_tracer("fabrica.ingest")


def commit_span(batches: Sequence[WriteBatch]) -> trace.Span:
    parent, links = parent_of([span_context(b.traceparent, b.tracestate) for b in batches])
    return tracer.start_span("ingest.commit", context=parent or trace.set_span_in_context(trace.INVALID_SPAN),
                             links=links, attributes={
                                 "fabrica.ingest.group_batches": len(batches),
                                 "fabrica.ingest.group_rows": sum(b.size for b in batches),
                                 "fabrica.collector.ids": sorted({b.collector_id for b in batches}),
                             })


def trouble_span(name: str, batch: WriteBatch, error: BaseException) -> None:
    """A short span for a batch ingest refused or could not write, in the batch's trace and always sampled
    (the commit span of its group is kept only if the group's trace is)."""
    parent = span_context(batch.traceparent, batch.tracestate)
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent) if parent else trace.INVALID_SPAN)
    span = tracer.start_span(name, context=context, attributes={
        ALWAYS_SAMPLE: True, "fabrica.collector.id": batch.collector_id, "fabrica.batch.sequence": batch.sequence,
        "fabrica.batch.readings": batch.size})
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"[:256]))
    span.end()


def duplicate_span(batch: reading_pb2.ReadingBatch, committed: int) -> None:
    if not batch.HasField("trace_context"):
        return
    parent = from_proto(batch.trace_context)
    if parent is None:
        return
    tracer.start_span("ingest.batch.duplicate", context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
                      attributes={ALWAYS_SAMPLE: True, "fabrica.collector.id": batch.collector_id,
                                  "fabrica.batch.sequence": batch.sequence,
                                  "fabrica.ingest.committed_sequence": committed}).end()
