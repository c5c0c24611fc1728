"""runtime.telemetry: the sampling rules, the trace context inside messages, and the batch encoding that puts
the context first (collector.tracing)."""

from __future__ import annotations

import pytest
from fabrica.common.v1 import reading_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

from fabrica_svc.collector.tracing import encode_batch, trace_context_of
from fabrica_svc.runtime.settings import SettingsError
from fabrica_svc.runtime.telemetry import (ALWAYS_SAMPLE, FabricaSampler, from_proto, is_sampled, parent_of,
                                           sampler_from_env, span_context, to_proto)


def _tracer(ratio: float):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=FabricaSampler(ratio))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def _remote(sampled: bool) -> SpanContext:
    return SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))


@pytest.mark.parametrize(("ratio", "parent", "always", "kept"), [
    (0.0, None, False, False),   # a new trace, ratio 0: dropped
    (1.0, None, False, True),    # ratio 1: kept
    (0.0, None, True, True),     # trouble (a failed read, a bad batch, a resend): kept whatever the ratio
    (0.0, True, False, True),    # a child follows its sampled parent ...
    (1.0, False, False, False),  # ... and its unsampled parent
    (0.0, False, True, True),    # trouble under an unsampled parent: kept, in the parent's trace
])
def test_sampling_rules(ratio: float, parent: bool | None, always: bool, kept: bool) -> None:
    tracer, exporter = _tracer(ratio)
    context = None if parent is None else trace.set_span_in_context(trace.NonRecordingSpan(_remote(parent)))
    span = tracer.start_span("s", context=context, attributes={ALWAYS_SAMPLE: True} if always else {})
    span.end()
    assert bool(exporter.get_finished_spans()) == kept
    if kept and parent is not None:
        assert span.get_span_context().trace_id == _remote(parent).trace_id


def test_a_bad_sample_ratio_is_refused_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="FABRICA_TRACE_SAMPLE_RATIO"):
        sampler_from_env({"FABRICA_TRACE_SAMPLE_RATIO": "1.5"})
    with pytest.raises(SettingsError, match="FABRICA_TRACE_SAMPLE_RATIO"):
        sampler_from_env({"FABRICA_TRACE_SAMPLE_RATIO": "often"})
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "always_on"}) is None  # the SDK's standard samplers
    assert sampler_from_env({}).ratio == 0.05


def test_context_in_a_message_round_trips() -> None:
    tracer, _ = _tracer(1.0)
    with tracer.start_as_current_span("batch") as span:
        message = reading_pb2.TraceContext()
        to_proto(message)
    assert len(message.traceparent) == 55
    ctx = from_proto(message)
    assert ctx is not None and ctx.trace_id == span.get_span_context().trace_id
    assert ctx.span_id == span.get_span_context().span_id and is_sampled(ctx)
    assert from_proto(reading_pb2.TraceContext()) is None
    assert span_context("00-zz-00f067aa0ba902b7-01") is None


def test_parent_of_takes_the_first_sampled_and_links_each_once() -> None:
    a, b = _remote(False), SpanContext(7, 8, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    parent, links = parent_of([a, None, b, a])
    assert trace.get_current_span(parent).get_span_context() == b
    assert [link.context for link in links] == [a, b]
    assert parent_of([None]) == (None, [])


def test_the_batch_encoding_puts_the_context_first_and_parses_as_the_batch() -> None:
    batch = reading_pb2.ReadingBatch(collector_id="cell-1", sequence=3, readings=[
        reading_pb2.Reading(tag_id=1, quality=reading_pb2.QUALITY_GOOD)])
    context = reading_pb2.TraceContext(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    payload = encode_batch(batch, context)
    assert payload[0] == 0x22  # field 4 first
    parsed = reading_pb2.ReadingBatch.FromString(payload)
    expected = reading_pb2.ReadingBatch()
    expected.CopyFrom(batch)
    expected.trace_context.CopyFrom(context)
    assert parsed == expected
    assert trace_context_of(payload).span_id == 0x00F067AA0BA902B7
    # A record in the usual field order (re-encoded by the spool) is parsed instead; none gives None.
    assert trace_context_of(expected.SerializeToString()).span_id == 0x00F067AA0BA902B7
    assert trace_context_of(batch.SerializeToString()) is None
    assert encode_batch(batch, None) == batch.SerializeToString()
