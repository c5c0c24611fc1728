"""OpenTelemetry traces and metrics, with a Prometheus scrape endpoint per service.

Traces: every RPC gets a server span (opentelemetry-instrumentation-grpc); log lines carry its trace id.
Set FABRICA_TRACES=console to print finished spans (no OTLP exporter is bundled; add one in the image if
a collector is available). Metrics: the OpenTelemetry SDK with the Prometheus reader, served on
FABRICA_METRICS_PORT at /metrics.
"""

from __future__ import annotations

import logging
import os
import threading

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from prometheus_client import start_http_server

log = logging.getLogger(__name__)
_lock = threading.Lock()
_configured = False


def configure_telemetry(service: str) -> None:
    """Install the process-wide tracer and meter providers once (several servers may share a process)."""
    global _configured
    with _lock:
        if _configured:
            return
        resource = Resource.create({"service.name": f"fabrica-{service}", "service.namespace": "fabrica"})
        tracer_provider = TracerProvider(resource=resource)
        if os.environ.get("FABRICA_TRACES") == "console":
            tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()]))
        _configured = True


def start_metrics_endpoint(host: str, port: int) -> tuple[object, int] | None:
    """Serve /metrics on host:port (0 = any free port); returns (server, bound port), or None when port < 0."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_port
    log.info("metrics endpoint listening", extra={"address": f"http://{host}:{bound}/metrics"})
    return server, bound
