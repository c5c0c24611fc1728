"""OpenTelemetry traces and metrics, with a Prometheus scrape endpoint per service.

Traces
------
Every RPC gets a server span (opentelemetry-instrumentation-grpc, runtime/server.py) and every channel one
service keeps to another gets client spans: whoever makes a peer channel passes
``interceptors=client_interceptors()`` (runtime/channels.py ``peer_channel`` does), so the W3C ``traceparent`` goes out
with each call. Where no request headers travel with the data (a batch in the collector's log, a tag event
in ingest's table) the context rides in the contract instead (``fabrica.common.v1.TraceContext``):
:func:`to_proto` / :func:`from_proto`.

Export: with ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, spans go to that
OTLP/gRPC endpoint through a batch processor; the exporter and the processor read the standard variables
(``OTEL_EXPORTER_OTLP_HEADERS``, ``_INSECURE``, ``_CERTIFICATE``, ``_TIMEOUT``, ``_COMPRESSION``,
``OTEL_BSP_*``), and the resource takes ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``.
``FABRICA_TRACES=console`` prints finished spans (development). ``OTEL_SDK_DISABLED=true`` turns tracing
off altogether.

Sampling (head sampling: the decision is taken when a span starts and inherited by its children, so a
trace is complete or absent, never half-kept). By default :class:`FabricaSampler`: a new trace is kept with
probability ``FABRICA_TRACE_SAMPLE_RATIO`` (default 0.05), a child follows its parent, and a span started
with the attribute ``fabrica.sample.always`` is always kept, even under an unsampled parent. Spans of
trouble set it: a poll span is started *after* the read (with its real start time), so its quality is
known when the decision is taken, and a failed read is always kept; a batch holding a bad reading, the
uplink's send of a batch that goes out again (a retry after a reconnect or a restart) and ingest's
handling of a batch it refuses or has already stored are kept too. ``OTEL_TRACES_SAMPLER`` (with
``OTEL_TRACES_SAMPLER_ARG``) replaces the default with one of the SDK's standard samplers.

Metrics: the OpenTelemetry SDK with the Prometheus reader, served on FABRICA_METRICS_PORT at /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence

import grpc
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, TraceIdRatioBased
from opentelemetry.trace import Link, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import start_http_server

from .settings import SettingsError, env_float

log = logging.getLogger(__name__)
_lock = threading.Lock()
_configured = False

#: Span attribute: keep this span (and so its trace from here on) whatever the ratio says.
ALWAYS_SAMPLE = "fabrica.sample.always"
DEFAULT_SAMPLE_RATIO = 0.05
_propagator = TraceContextTextMapPropagator()


class FabricaSampler(Sampler):
    """Parent-based ratio sampling, plus every span started with ``fabrica.sample.always`` (see above)."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self._root = TraceIdRatioBased(ratio)

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str, kind=None,
                      attributes: Mapping[str, object] | None = None, links: Sequence[Link] | None = None,
                      trace_state: TraceState | None = None) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        state = parent.trace_state if parent.is_valid else None
        if attributes and attributes.get(ALWAYS_SAMPLE):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, state)
        if parent.is_valid:
            decision = Decision.RECORD_AND_SAMPLE if parent.trace_flags.sampled else Decision.DROP
            return SamplingResult(decision, attributes if decision != Decision.DROP else None, state)
        return self._root.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"FabricaSampler{{ratio={self.ratio}, always={ALWAYS_SAMPLE}}}"


def sampler_from_env(env: Mapping[str, str]) -> Sampler | None:
    """The sampler the environment asks for; None means the SDK's own reading of OTEL_TRACES_SAMPLER."""
    if env.get("OTEL_TRACES_SAMPLER"):
        return None
    return FabricaSampler(env_float(env, "FABRICA_TRACE_SAMPLE_RATIO", DEFAULT_SAMPLE_RATIO, 0.0, 1.0))


def tracing_disabled(env: Mapping[str, str]) -> bool:
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def configure_telemetry(service: str, env: Mapping[str, str] | None = None) -> None:
    """Install the process-wide tracer and meter providers once (several servers may share a process)."""
    global _configured
    env = os.environ if env is None else env
    with _lock:
        if _configured:
            return
        attributes = {"service.namespace": "fabrica"}
        if not env.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = f"fabrica-{service}"
        resource = Resource.create(attributes)
        if not tracing_disabled(env):
            tracer_provider = TracerProvider(resource=resource, sampler=sampler_from_env(env))
            if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            if env.get("FABRICA_TRACES") == "console":
                tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()]))
        _configured = True


def check_telemetry_settings(env: Mapping[str, str]) -> None:
    """Refuse a bad sampling ratio at start-up, with the one-line settings error (raises SettingsError)."""
    sampler_from_env(env)


def flush_traces(timeout_millis: int = 5000) -> None:
    """Export what the processors hold (on shutdown: a batch processor would lose its last spans)."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "force_flush", None)
    if flush is not None:
        flush(timeout_millis)


# --- client spans on peer channels ---------------------------------------------------------------------

def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a channel to another Fabrica service: a client span per call, whose context goes
    out in the call's metadata (W3C traceparent/tracestate). Every peer channel maker passes them as
    ``grpc.aio.*_channel(..., interceptors=client_interceptors())``."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


# --- the context inside messages -----------------------------------------------------------------------

def current_carrier(span: trace.Span | None = None) -> dict[str, str]:
    """{"traceparent": ..., "tracestate": ...} of `span` (default: the current one); empty without a trace."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(carrier, context=ctx)
    return carrier


def to_proto(message, span: trace.Span | None = None) -> None:
    """Fill a fabrica.common.v1.TraceContext `message` from `span` (default: the current one)."""
    carrier = current_carrier(span)
    message.traceparent = carrier.get("traceparent", "")
    message.tracestate = carrier.get("tracestate", "")[:512]


def span_context(traceparent: str, tracestate: str = "") -> SpanContext | None:
    """The remote SpanContext a traceparent names, or None when it is empty or malformed."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    ctx = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
    return ctx if ctx.is_valid else None


def from_proto(message) -> SpanContext | None:
    """The SpanContext of a fabrica.common.v1.TraceContext (None when it carries none)."""
    return span_context(message.traceparent, message.tracestate)


def parent_of(contexts: Sequence[SpanContext | None]) -> tuple[Context | None, list[Link]]:
    """For a span that covers several items each with its own context (a batch of polls, a commit of
    batches, a booking of events): the parent is the first sampled context (else the first), and every
    distinct context is a link. Links are capped at 128 (the SDK's default limit)."""
    valid = [c for c in contexts if c is not None]
    if not valid:
        return None, []
    parent = next((c for c in valid if c.trace_flags & TraceFlags.SAMPLED), valid[0])
    seen: set[tuple[int, int]] = set()
    links: list[Link] = []
    for c in valid:
        key = (c.trace_id, c.span_id)
        if key not in seen and len(links) < 128:
            seen.add(key)
            links.append(Link(c))
    return trace.set_span_in_context(trace.NonRecordingSpan(parent)), links


def is_sampled(ctx: SpanContext | None) -> bool:
    return ctx is not None and bool(ctx.trace_flags & TraceFlags.SAMPLED)


# --- health as a metric ---------------------------------------------------------------------------------
_health_sources: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_health_gauge = False


def observe_health(host: object) -> None:
    """Export `fabrica_health_serving{service}`: 1 while `host` (a ServiceHost: `.app.name`, `.serving`) is
    SERVING, 0 while NOT_SERVING, so an alert can watch what Kubernetes' probes see."""
    global _health_gauge
    with _lock:
        _health_sources[id(host)] = host
        if _health_gauge:
            return
        _health_gauge = True

    def callback(options):
        for source in list(_health_sources.values()):
            serving = getattr(source, "serving", None)
            if serving is not None:
                yield metrics.Observation(int(serving), {"service": source.app.name})

    metrics.get_meter("fabrica.runtime").create_observable_gauge(
        "fabrica_health_serving", callbacks=[callback],
        description="1 while the service's health is SERVING (its dependencies are ready), 0 while NOT_SERVING")


def start_metrics_endpoint(host: str, port: int) -> tuple[object, int] | None:
    """Serve /metrics on host:port (0 = any free port); returns (server, bound port), or None when port < 0."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_port
    log.info("metrics endpoint listening", extra={"address": f"http://{host}:{bound}/metrics"})
    return server, bound


__all__ = [
    "ALWAYS_SAMPLE", "FabricaSampler", "SettingsError", "check_telemetry_settings", "client_interceptors",
    "configure_telemetry", "flush_traces", "from_proto", "parent_of", "span_context",
    "start_metrics_endpoint", "to_proto",
]


class ConsumerLag:
    """The gauge ``fabrica_tag_events_lag{consumer=...}`` of a consumer of ingest's streams (production's tag
    events, alarm's committed readings): the age of the newest item it applied when it applied it, plus the
    time since then while its stream to ingest is down. A standby replica (`active` not set) reports nothing.
    The consumer calls `applied(newest_ns)` after each message and `disconnected()` when its stream ends."""

    def __init__(self, meter: metrics.Meter, consumer: str, active: asyncio.Event):
        self.consumer = consumer
        self.active = active
        #: (lag in seconds of the newest item applied, wall time it was applied, whether the stream is open).
        self._lag: tuple[float, float, bool] = (0.0, 0.0, False)
        meter.create_observable_gauge(
            "fabrica_tag_events_lag", unit="s", callbacks=[self.observe],
            description="How far a tag-event consumer is behind: the age of the newest event it applied when it "
            "applied it, plus the time since then while its stream to ingest is down, by consumer")

    def applied(self, newest_ns: int) -> None:
        """A message applied whose newest item was read at `newest_ns` (0: none had a time)."""
        now = time.time()
        self._lag = (max(0.0, now - newest_ns / 1e9) if newest_ns else 0.0, now, True)

    def disconnected(self) -> None:
        lag, at, _ = self._lag
        self._lag = (lag, at or time.time(), False)

    def observe(self, options: object = None) -> list[metrics.Observation]:
        if not self.active.is_set():
            return []
        lag, at, connected = self._lag
        if not connected and at:
            lag += max(0.0, time.time() - at)
        return [metrics.Observation(lag, {"consumer": self.consumer})]
