"""gRPC-Web in, gRPC out: the connectrpc ASGI runtime speaks gRPC-Web to the browser, and each method is
forwarded to its upstream grpcio server as RAW BYTES (generic ``unary_unary`` / ``unary_stream`` with no
serializers), so the gateway never parses a message and needs no generated code: a new method in the
protos is routed by `make gen` alone.

What crosses, in both directions:
- request headers become gRPC metadata (``authorization`` and any custom header; HTTP's own headers and
  gRPC-Web's transport headers do not), ``-bin`` headers base64-decoded as gRPC requires;
- the client's ``grpc-timeout`` becomes the upstream call's deadline (capped for unary calls, routes.py);
- the upstream's initial metadata become response headers, its trailing metadata the gRPC-Web trailers,
  ``grpc-status-details-bin`` (google.rpc.Status with BadRequest, ErrorInfo, ...) byte for byte;
- the status code and message; a closed browser tab cancels the upstream call.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint

from .routes import Kind, Route

log = logging.getLogger(__name__)

_STREAM_TYPES = {
    Kind.UNARY: StreamType.UNARY,
    Kind.SERVER_STREAM: StreamType.SERVER_STREAM,
    Kind.CLIENT_STREAM: StreamType.CLIENT_STREAM,
    Kind.BIDI_STREAM: StreamType.BIDI_STREAM,
}

#: gRPC status codes (grpc.StatusCode) as Connect codes; the same numbers by other names.
_CODES: dict[grpc.StatusCode, Code] = {
    status: Code.CANCELED if status is grpc.StatusCode.CANCELLED else Code[status.name]
    for status in grpc.StatusCode
    if status is not grpc.StatusCode.OK
}

#: Request headers that are HTTP's or gRPC-Web's own, not the caller's metadata: never forwarded.
_NOT_METADATA = frozenset({
    "host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer",
    "content-type", "content-length", "content-encoding", "accept", "accept-encoding", "accept-language",
    "user-agent", "origin", "referer", "cookie", "cache-control", "pragma", "priority", "dnt",
    "x-grpc-web", "x-user-agent", "x-accept-content-transfer-encoding", "x-accept-response-streaming",
    "access-control-request-method", "access-control-request-headers",
})
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_ASCII_VALUE = re.compile(r"[\x20-\x7e]*")


class _RawBytes:
    """A connectrpc codec that hands the message bytes through untouched, named "proto" so that
    ``application/grpc-web+proto`` (and plain ``application/grpc-web``) select it."""

    def name(self) -> str:
        return "proto"

    def encode(self, message: bytes) -> bytes:
        return message

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> bytes:
        return bytes(data)


def forwarded_metadata(headers: Mapping[str, str]) -> list[tuple[str, str | bytes]]:
    """The request headers a gRPC upstream gets as metadata."""
    out: list[tuple[str, str | bytes]] = []
    for key, value in headers.items():
        key = key.lower()
        if key in _NOT_METADATA or key.startswith(("grpc-", "sec-", ":")) or not _METADATA_KEY.fullmatch(key):
            continue
        if key.endswith("-bin"):
            try:
                out.append((key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True)))
            except ValueError:
                raise ConnectError(Code.INVALID_ARGUMENT, f"header {key} is not base64") from None
        elif _ASCII_VALUE.fullmatch(value):
            out.append((key, value))
        else:
            raise ConnectError(Code.INVALID_ARGUMENT, f"header {key} has characters gRPC metadata cannot carry")
    return out


def _to_headers(metadata: Any, into: Any) -> None:
    """gRPC metadata into HTTP headers (``-bin`` values base64, unpadded, as gRPC writes them)."""
    for key, value in metadata or ():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii").rstrip("=")
        into.add(key, value)


def _error(exc: grpc.aio.AioRpcError, ctx: RequestContext) -> ConnectError:
    """The upstream's status for the browser: its code and message, and its trailing metadata (with the
    status details) as the response's trailers. The details are passed on as the upstream wrote them: the
    error itself carries none, so connectrpc writes no grpc-status-details-bin of its own."""
    _to_headers(exc.trailing_metadata(), ctx.response_trailers)
    return ConnectError(_CODES.get(exc.code(), Code.UNKNOWN), exc.details() or "")


def _timeout(route: Route, ctx: RequestContext) -> float | None:
    remaining = ctx.timeout_ms
    client = None if remaining is None else max(remaining / 1000.0, 0.0)
    if route.max_timeout is None:
        return client
    return route.max_timeout if client is None else min(client, route.max_timeout)


def _unary(route: Route, channel: grpc.aio.Channel) -> Endpoint:
    call_of = channel.unary_unary(route.path)

    async def forward(request: bytes, ctx: RequestContext) -> bytes:
        call = call_of(request, timeout=_timeout(route, ctx), metadata=forwarded_metadata(ctx.request_headers))
        try:
            response = await call
            _to_headers(await call.initial_metadata(), ctx.response_headers)
            _to_headers(await call.trailing_metadata(), ctx.response_trailers)
        except grpc.aio.AioRpcError as exc:
            _to_headers(exc.initial_metadata(), ctx.response_headers)
            raise _error(exc, ctx) from None
        return response

    return Endpoint.unary(_method(route), forward)


def _server_stream(route: Route, channel: grpc.aio.Channel) -> Endpoint:
    call_of = channel.unary_stream(route.path)

    async def forward(request: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        call = call_of(request, timeout=_timeout(route, ctx), metadata=forwarded_metadata(ctx.request_headers))
        try:
            _to_headers(await call.initial_metadata(), ctx.response_headers)
            async for message in call:
                yield message
            _to_headers(await call.trailing_metadata(), ctx.response_trailers)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, ctx) from None
        finally:
            call.cancel()  # a no-op once it ended; stops the upstream when the browser went away

    return Endpoint.server_stream(_method(route), forward)


def _refused(route: Route) -> Endpoint:
    reason = route.refused

    async def refuse(request: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        raise ConnectError(Code.UNIMPLEMENTED, reason or "")
        yield b""  # pragma: no cover - makes this an async generator

    # Served as a server stream: the request body is one message at most, and the answer is the status.
    return Endpoint.server_stream(_method(route, StreamType.SERVER_STREAM), refuse)


def _method(route: Route, stream_type: StreamType | None = None) -> MethodInfo:
    return MethodInfo(name=route.method, service_name=route.service, input=bytes, output=bytes,
                      idempotency_level=IdempotencyLevel.UNKNOWN,
                      stream_type=stream_type or _STREAM_TYPES[route.kind])


class GrpcWebProxy(ConnectASGIApplication):
    """connectrpc's ASGI application with one endpoint per route, each forwarding to its upstream."""

    def __init__(self, routes: Mapping[str, Route], channels: Mapping[str, grpc.aio.Channel],
                 read_max_bytes: int) -> None:
        endpoints: dict[str, Endpoint] = {}
        for path, route in routes.items():
            if route.refused:
                endpoints[path] = _refused(route)
            elif route.upstream not in channels:
                continue
            elif route.kind is Kind.UNARY:
                endpoints[path] = _unary(route, channels[route.upstream])
            else:
                endpoints[path] = _server_stream(route, channels[route.upstream])
        self.endpoints = endpoints
        # Identity compression only: a message is forwarded as it arrived, the upstream compresses nothing.
        super().__init__(service=self, endpoints=lambda _: endpoints, read_max_bytes=read_max_bytes,
                         codecs=[_RawBytes()], compressions=[])

    @property
    def path(self) -> str:
        return "/"
