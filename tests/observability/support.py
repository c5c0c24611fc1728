"""Helpers of the observability tests: promtool/prometheus from Debian's package, the metric names the
rules and dashboards use, and a real OTLP/gRPC trace receiver on loopback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"


def debian_tool(name: str) -> str:
    """promtool / prometheus: on PATH, else installed from Debian's `prometheus` package (as `make test` does)."""
    found = shutil.which(name)
    if found is None:
        subprocess.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus",
                       shell=True, check=True, capture_output=True, timeout=600)
        found = shutil.which(name)
    assert found is not None, f"{name} is not installed (Debian package prometheus)"
    return found


_METRIC = re.compile(r"\bfabrica_[a-z0-9_]+")


def rule_metrics() -> set[str]:
    import yaml

    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return {m for g in rules["groups"] for r in g["rules"] for m in _METRIC.findall(r["expr"])}


def dashboard_metrics() -> set[str]:
    out: set[str] = set()
    for path in GRAFANA_DIR.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out |= set(_METRIC.findall(target["expr"]))
    return out


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC TraceService on 127.0.0.1:0 keeping every span it is sent, with its service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, opentelemetry.proto.trace.v1.Span)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def Export(self, request, context):  # noqa: N802 - the gRPC method
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> OtlpReceiver:
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def named(self, name: str) -> list[tuple[str, object]]:
        return [(s, span) for s, span in self.spans if span.name == name]
