"""What crosses the gateway, byte for byte, observed at both ends: a real gRPC server on 127.0.0.1:0 (grpc.aio
with generic handlers, so it sees the raw request bytes and metadata exactly as they arrive) stands upstream
of a real gateway, and the test's gRPC-Web client calls through it.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from fabrica_svc.grpcweb.app import Gateway

from .conftest import gateway_settings
from .grpcweb_client import Reply, call

UNARY = "/fabrica.config.v1.ConfigService/GetPlc"
STREAM = "/fabrica.config.v1.ConfigService/WatchPlcs"
RAW = b"\xff\x00 not even a protobuf \x80"  # the gateway must not parse what it forwards
DETAILS = b"\x08\x03\x12\x05oops!\x1a\x00\xfe"  # any bytes: the gateway passes them on untouched
MESSAGE = "Auftrag «A-1» ist pausiert: 100% ✓"


@dataclass
class Recorder:
    """The upstream: records each call's request, metadata and remaining time; answers as the test says."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    fail: bool = False
    stream_messages: int = 3
    stream_pause: float = 0.0
    stream_cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def _record(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        self.calls.append({"request": request, "metadata": list(context.invocation_metadata() or ()),
                           "time_remaining": context.time_remaining()})

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._record(request, context)
        await context.send_initial_metadata((("x-upstream", "config"), ("x-blob-bin", b"\x00\x01\x02")))
        trailing = (("x-trailer", "last words"), ("x-trailer-bin", b"\xfa\xfb"))
        if self.fail:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, MESSAGE,
                                trailing_metadata=(*trailing, ("grpc-status-details-bin", DETAILS)))
        context.set_trailing_metadata(trailing)
        return request[::-1]

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self._record(request, context)
        try:
            for i in range(self.stream_messages):
                yield bytes([i]) * (i + 1)
                await asyncio.sleep(self.stream_pause)
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise
        context.set_trailing_metadata((("x-trailer", "stream done"),))


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method == UNARY:
            return grpc.unary_unary_rpc_method_handler(self.recorder.unary)
        if details.method == STREAM:
            return grpc.unary_stream_rpc_method_handler(self.recorder.stream)
        return None


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Recorder, str]]:
    recorder = Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_Handler(recorder),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield recorder, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.fixture
async def gateway(upstream: tuple[Recorder, str]) -> AsyncIterator[Gateway]:
    _, address = upstream
    gw = Gateway(gateway_settings({"config": address}))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(grace=0.5)


async def _call(gw: Gateway, path: str, request: bytes, **kwargs: Any) -> Reply:
    return await asyncio.to_thread(call, gw.url, path, request, **kwargs)


async def test_request_bytes_metadata_and_deadline_reach_the_upstream(upstream: tuple[Recorder, str],
                                                                     gateway: Gateway) -> None:
    recorder, _ = upstream
    reply = await _call(gateway, UNARY, RAW, headers={
        "authorization": "Bearer header.payload.signature", "x-request-id": "req-42", "x-fabrica-tenant": "acme",
        "x-trace-bin": base64.b64encode(b"\x01\x02\x03").decode(), "grpc-timeout": "5S",
        "origin": "http://localhost:5173"})
    assert reply.status == 0 and reply.messages == [RAW[::-1]]
    (seen,) = recorder.calls
    assert seen["request"] == RAW
    metadata = dict(seen["metadata"])
    assert metadata["authorization"] == "Bearer header.payload.signature"
    assert metadata["x-request-id"] == "req-42"
    assert metadata["x-fabrica-tenant"] == "acme"  # an installation-wide admin's tenant of the call (issue 15)
    assert metadata["x-trace-bin"] == b"\x01\x02\x03"
    for transport in ("x-grpc-web", "origin", "grpc-timeout", "accept", "host"):  # HTTP's and gRPC-Web's own
        assert transport not in metadata, transport
    assert 3.0 < seen["time_remaining"] < 5.5, "the client's 5 s deadline did not reach the upstream"


async def test_a_unary_call_without_deadline_gets_the_routes_bound(upstream: tuple[Recorder, str],
                                                                  gateway: Gateway) -> None:
    recorder, _ = upstream
    reply = await _call(gateway, UNARY, b"x")
    assert reply.status == 0
    # gRPC rounds a deadline up as it encodes it, so "about": a 10-minute one would be ~600.
    assert 50.0 < recorder.calls[0]["time_remaining"] < 61.0  # Envoy's route timeout: 60 s
    # A longer client deadline is capped at the same bound (Envoy's grpc_timeout_header_max).
    await _call(gateway, UNARY, b"x", headers={"grpc-timeout": "10M"})
    assert 50.0 < recorder.calls[1]["time_remaining"] < 61.0


async def test_response_headers_and_trailers_pass_through(upstream: tuple[Recorder, str],
                                                          gateway: Gateway) -> None:
    reply = await _call(gateway, UNARY, b"abc")
    assert reply.status == 0 and reply.messages == [b"cba"]
    assert reply.headers["x-upstream"] == "config"
    assert base64.b64decode(reply.headers["x-blob-bin"] + "==") == b"\x00\x01\x02"
    assert reply.trailers["x-trailer"] == "last words"
    assert base64.b64decode(reply.trailers["x-trailer-bin"] + "==") == b"\xfa\xfb"


async def test_an_error_reaches_the_browser_with_its_details_unchanged(upstream: tuple[Recorder, str],
                                                                       gateway: Gateway) -> None:
    recorder, _ = upstream
    recorder.fail = True
    reply = await _call(gateway, UNARY, b"abc")
    assert reply.status == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert reply.message == MESSAGE
    assert reply.details_bin == DETAILS
    assert reply.trailers["x-trailer"] == "last words"
    assert reply.headers["x-upstream"] == "config"


async def test_a_stream_carries_every_message_then_the_trailers(upstream: tuple[Recorder, str],
                                                                gateway: Gateway) -> None:
    reply = await _call(gateway, STREAM, b"watch")
    assert reply.messages == [b"\x00", b"\x01\x01", b"\x02\x02\x02"]
    assert reply.status == 0 and reply.trailers["x-trailer"] == "stream done"
    recorder, _ = upstream
    assert recorder.calls[0]["time_remaining"] is None, "a stream without a client deadline must have none"


async def test_a_browser_that_goes_away_cancels_the_upstream_stream(upstream: tuple[Recorder, str],
                                                                    gateway: Gateway) -> None:
    recorder, _ = upstream
    recorder.stream_messages, recorder.stream_pause = 1000, 0.05
    reply = await _call(gateway, STREAM, b"watch", max_messages=2)  # reads two, then closes the connection
    assert len(reply.messages) == 2
    await asyncio.wait_for(recorder.stream_cancelled.wait(), timeout=10)


async def test_an_upstream_that_is_down_is_unavailable_not_a_hang(upstream: tuple[Recorder, str]) -> None:
    gw = Gateway(gateway_settings({"config": "127.0.0.1:1"}))
    await gw.start()
    try:
        reply = await _call(gw, UNARY, b"x", headers={"grpc-timeout": "10S"})
    finally:
        await gw.stop(grace=0.5)
    assert reply.status == grpc.StatusCode.UNAVAILABLE.value[0], (reply.status, reply.message)
