"""The collector's spans: a reading's trace starts here (runtime/telemetry.py has the sampling rules).

* ``collector.poll``: one block read of a PLC. Started once the read is over, with the read's start time,
  so that its outcome is known when the sampler decides: a failed read (communication failure, a request
  the device refused, a part that failed) is always kept. Attributes: PLC, poll group, block (table or area,
  first address, count, the range as text), latency in seconds, quality. The readings reported from the
  read are emitted while it is the current span, which is how the batcher learns where they came from.
* ``collector.batch``: a batch cut from the readings of one or more polls; child of the first sampled
  poll (else the first), with a link to each poll. Always kept when it holds a bad-quality reading. Its
  context is written into the batch (ReadingBatch.trace_context) and so into the spool with it.
* ``collector.spool.append``: the spool write of the batch (child of the batch span).
* ``collector.uplink.send``: a batch sent to ingest (child of the batch's context, read back from the
  batch itself, so also after a restart); always kept when the batch goes out again.
* ``collector.batch.rejected``: a batch ingest rejected for good, set aside; always kept.
"""

from __future__ import annotations

from fabrica.common.v1 import reading_pb2
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from ..plcmodel.spec import ModbusTable, S7Area
from ..runtime.telemetry import ALWAYS_SAMPLE, from_proto
from .blocks import ModbusBlock, S7Block

tracer = trace.get_tracer("fabrica.collector")


def block_attributes(block: object) -> dict[str, object]:
    """The register range of a block read, as span attributes."""
    if isinstance(block, ModbusBlock):
        table = ModbusTable(block.table).name.lower()
        return {"fabrica.block.table": table, "fabrica.block.start": block.start, "fabrica.block.count": block.count,
                "fabrica.block.range": f"{table}[{block.start}..{block.start + block.count - 1}]"}
    if isinstance(block, S7Block):
        area = S7Area(block.area).name
        where = f"DB{block.db_number}" if area == "DB" else area
        return {"fabrica.block.area": area, "fabrica.block.db_number": block.db_number,
                "fabrica.block.start": block.start, "fabrica.block.count": block.size,
                "fabrica.block.range": f"{where}[{block.start}..{block.start + block.size - 1}]"}
    return {}


def poll_span(plc_id: str, group: str, block: object, start_ns: int, latency: float, quality: str,
              error: str = "") -> trace.Span:
    """The span of one block read that started at `start_ns` (wall clock) and took `latency` seconds."""
    attributes: dict[str, object] = {
        "fabrica.plc.id": plc_id, "fabrica.poll_group": group, "fabrica.read.latency_s": latency,
        "fabrica.quality": quality, **block_attributes(block),
    }
    if quality != "GOOD":
        attributes[ALWAYS_SAMPLE] = True
    span = tracer.start_span("collector.poll", context=trace.set_span_in_context(trace.INVALID_SPAN),
                             attributes=attributes, start_time=start_ns)
    if error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error[:256]))
    return span


def trouble_span(name: str, payload: bytes | None, attributes: dict[str, object], error: str) -> None:
    """A short span for what befell a batch (set aside after ingest rejected it), in the batch's trace and
    always sampled."""
    parent = trace_context_of(payload) if payload else None
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent) if parent else trace.INVALID_SPAN)
    span = tracer.start_span(name, context=context, attributes={ALWAYS_SAMPLE: True, **attributes})
    span.set_status(trace.Status(trace.StatusCode.ERROR, error[:256]))
    span.end()


# --- the batch's context in its encoding ---------------------------------------------------------------
# ReadingBatch.trace_context is field 4, after the readings. Protobuf parsers take fields in any order, so the
# batcher writes it first: the uplink then finds it in the first bytes of a spooled record without parsing
# the readings (records are sent as they are in the log).

_TRACE_CONTEXT_TAG = (4 << 3) | 2  # field 4, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_batch(batch: reading_pb2.ReadingBatch, context: reading_pb2.TraceContext | None) -> bytes:
    """`batch` serialized, with `context` (if any) as its first field."""
    body = batch.SerializeToString()
    if context is None or not context.traceparent:
        return body
    tc = context.SerializeToString()
    return bytes((_TRACE_CONTEXT_TAG,)) + _varint(len(tc)) + tc + body


def trace_context_of(payload: bytes) -> SpanContext | None:
    """The trace context of an encoded ReadingBatch: read from its first field when the batcher put it there,
    else by parsing the batch (a record re-encoded by `Spool.renumber_above`)."""
    if payload[:1] == bytes((_TRACE_CONTEXT_TAG,)) and len(payload) > 2 and payload[1] < 0x80:
        size = payload[1]
        tc = reading_pb2.TraceContext.FromString(payload[2:2 + size])
        return from_proto(tc)
    try:
        batch = reading_pb2.ReadingBatch.FromString(payload)
    except DecodeError:
        return None
    return from_proto(batch.trace_context) if batch.HasField("trace_context") else None
