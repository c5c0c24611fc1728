"""The gateway's routes and policy: every method of every Fabrica service, read from the protos'
descriptors, with the upstream that serves it and how a browser may call it.

The same routes and policy as deploy/envoy/envoy.yaml (tests/web/test_gateway.py derives them from that
file and checks the gateway against each):

- unary methods: forwarded, for at most UNARY_TIMEOUT seconds, less when the client's ``grpc-timeout`` says
  so (Envoy: ``timeout: 60s`` with ``max_stream_duration.grpc_timeout_header_max: 60s``);
- server-streaming methods: forwarded without a gateway deadline (Envoy: ``timeout: 0s``); a client's own
  ``grpc-timeout`` still applies;
- client-streaming and bidi methods: refused, UNIMPLEMENTED with the reason (gRPC-Web has no client stream;
  Envoy answers them with 404, which a gRPC-Web client reads as UNIMPLEMENTED). Collectors call ingest's
  StreamReadings directly.

Not mirrored: Envoy's idle timeouts (a stream with no data for an hour is reset there; the gateway keeps it,
and the services' keepalive pings find a dead upstream) and gRPC-Web's text mode (application/grpc-web-text,
base64; connect-web and grpc-web's "grpcweb" mode send binary).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

from ..runtime.reflection import descriptor_set_path

#: The most a unary call may take through the gateway, in seconds (Envoy's route timeout).
UNARY_TIMEOUT = 60.0

#: The upstreams, by the second part of a service's package (``fabrica.config.v1`` → config).
UPSTREAMS = ("config", "ingest", "production", "collector", "alarm")


class Kind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI_STREAM = "bidi_stream"


@dataclass(frozen=True)
class Route:
    #: ``/fabrica.config.v1.ConfigService/WatchPlcs``: the HTTP path of the method.
    path: str
    service: str
    method: str
    #: The upstream that serves it (one of UPSTREAMS).
    upstream: str
    kind: Kind

    @property
    def refused(self) -> str | None:
        """Why a browser cannot call this method, or None when it can."""
        if self.kind in (Kind.CLIENT_STREAM, Kind.BIDI_STREAM):
            what = "streams from the client" if self.kind is Kind.CLIENT_STREAM else "is bidirectional"
            return f"{self.service}/{self.method} {what}: gRPC-Web cannot carry it; call it over gRPC directly"
        return None

    @property
    def max_timeout(self) -> float | None:
        """The gateway's own bound on a call, in seconds; None: only the client's deadline, if any."""
        return UNARY_TIMEOUT if self.kind is Kind.UNARY else None


def _kind(method: descriptor_pb2.MethodDescriptorProto) -> Kind:
    if method.client_streaming:
        return Kind.BIDI_STREAM if method.server_streaming else Kind.CLIENT_STREAM
    return Kind.SERVER_STREAM if method.server_streaming else Kind.UNARY


def routes_from(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, Route]:
    """Every method of every ``fabrica.<upstream>.*`` service in `files`, by path."""
    out: dict[str, Route] = {}
    for file in files:
        parts = file.package.split(".")
        if len(parts) < 2 or parts[0] != "fabrica" or parts[1] not in UPSTREAMS:
            continue
        for service in file.service:
            full = f"{file.package}.{service.name}"
            for method in service.method:
                path = f"/{full}/{method.name}"
                out[path] = Route(path, full, method.name, parts[1], _kind(method))
    return out


def load_routes(path: Path | None = None) -> dict[str, Route]:
    """The routes of the Fabrica protos as generated (gen/fabrica/descriptor_set.binpb)."""
    data = (path or descriptor_set_path()).read_bytes()
    return routes_from(descriptor_pb2.FileDescriptorSet.FromString(data).file)


def upstreams_of(routes: Mapping[str, Route]) -> set[str]:
    return {r.upstream for r in routes.values()}
