"""Undecodable requests, in every RPC shape of a real grpc.aio server with the shared interceptor, and
health's List on a real service host.

grpcio decodes a request before any handler runs; without the interceptor's tolerant deserializer a unary
request that is not protobuf is UNKNOWN "Unexpected DecodeError" with a traceback logged each time, and
garbage inside a stream is INTERNAL. Here: INVALID_ARGUMENT, reason MALFORMED_MESSAGE, one short log line
per method per interval (a count of the others), no traceback; garbage in a stream ends that stream only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import error_info, field_violations

from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from fabrica_svc.runtime import interceptors
from fabrica_svc.runtime.interceptors import ServiceInterceptor
from in_process import Servers, settings_for
from ingest.support import (TEST_CONFIG, batch_request, ingest_settings, numbered_batches, open_request,
                            stream_batches)

Msg = pb.WatchTagEventsRequest
SERVICE = "fabrica.test.v1.Malformed"
SHAPES = ("Unary", "ServerStream", "ClientStream", "Bidi")
#: Not a protobuf message: field 1 with wire type 7 (there is none).
GARBAGE = b"\x0f\xff\xff"
VALID = Msg(after_cursor=5).SerializeToString()


async def unary(request: Msg, context: grpc.aio.ServicerContext) -> Msg:
    return request


async def server_stream(request: Msg, context: grpc.aio.ServicerContext) -> AsyncIterator[Msg]:
    yield request


async def client_stream(requests: AsyncIterator[Msg], context: grpc.aio.ServicerContext) -> Msg:
    return Msg(after_cursor=sum([r.after_cursor async for r in requests]))


async def bidi(requests: AsyncIterator[Msg], context: grpc.aio.ServicerContext) -> AsyncIterator[Msg]:
    async for request in requests:
        yield request


async def serve(interceptor: ServiceInterceptor) -> AsyncIterator[grpc.aio.Channel]:
    kw = dict(request_deserializer=Msg.FromString, response_serializer=Msg.SerializeToString)
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **kw),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **kw),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **kw),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(0)


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    async for ch in serve(ServiceInterceptor("test")):
        yield ch


async def call_raw(channel: grpc.aio.Channel, shape: str, messages: list[bytes]) -> list[bytes]:
    """`shape` called with raw bytes (identity serializers): the raw responses."""
    method = f"/{SERVICE}/{shape}"
    if shape == "Unary":
        return [await channel.unary_unary(method)(messages[0], timeout=10)]
    if shape == "ServerStream":
        return [r async for r in channel.unary_stream(method)(messages[0], timeout=10)]
    if shape == "ClientStream":
        return [await channel.stream_unary(method)(iter(messages), timeout=10)]
    return [r async for r in channel.stream_stream(method)(iter(messages), timeout=10)]


@pytest.mark.parametrize("shape", SHAPES)
async def test_an_undecodable_request_is_invalid_argument_malformed_message_in_every_shape(
        channel: grpc.aio.Channel, shape: str, caplog: pytest.LogCaptureFixture) -> None:
    streaming = shape in ("ClientStream", "Bidi")
    caplog.set_level(logging.DEBUG, logger="fabrica_svc")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call_raw(channel, shape, [VALID, GARBAGE] if streaming else [GARBAGE])
    err = raised.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("message 1 of the stream cannot be decoded" if streaming
                             else "the request cannot be decoded")
    assert error_info(err).reason == "MALFORMED_MESSAGE"
    assert list(field_violations(err)) == ["(message)"]
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client's garbage"
    # The same call with valid bytes is answered: the server is fine.
    assert Msg.FromString((await call_raw(channel, shape, [VALID, VALID] if streaming else [VALID]))[-1]).after_cursor \
        == (10 if shape == "ClientStream" else 5)


async def test_undecodable_requests_are_logged_once_per_interval_per_method_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = [1000.0]
    interceptor = ServiceInterceptor("test")
    interceptor._malformed_log = interceptors._MalformedLog(clock=lambda: clock[0])
    served = serve(interceptor)
    channel = await anext(served)
    caplog.set_level(logging.WARNING, logger=interceptors.log.name)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "undecodable request" in r.getMessage()]

    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError):
            await call_raw(channel, "Bidi", [GARBAGE])
    assert len(lines()) == 1 and f"{SERVICE}/Bidi" in lines()[0] and "more since" not in lines()[0]
    with pytest.raises(grpc.aio.AioRpcError):
        await call_raw(channel, "Unary", [GARBAGE])  # another method has its own interval
    assert len(lines()) == 2 and f"{SERVICE}/Unary" in lines()[1]
    clock[0] += interceptors.MALFORMED_LOG_INTERVAL
    with pytest.raises(grpc.aio.AioRpcError):
        await call_raw(channel, "Bidi", [GARBAGE])
    assert len(lines()) == 3 and "(4 more since the last report)" in lines()[2]
    assert all("\n" not in line for line in lines())
    await served.aclose()


async def test_health_list_names_every_service_with_its_status(database_url: str, servers: Servers) -> None:
    server = await servers.start("config", settings_for("config", database_url=database_url))
    health = health_pb2_grpc.HealthStub(server.channel)
    listed = await health.List(health_pb2.HealthListRequest(), timeout=10)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert {name: r.status for name, r in listed.statuses.items()} == {
        "": serving, "liveness": serving, "fabrica.config.v1.ConfigService": serving}


async def test_garbage_after_open_in_stream_readings_ends_that_stream_only(database_url: str,
                                                                           servers: Servers) -> None:
    ingest = await servers.start("ingest", ingest_settings(database_url), config=TEST_CONFIG)
    first, second = numbered_batches("cell-1", 2, 5)
    call = ingest.channel.stream_stream("/fabrica.ingest.v1.IngestService/StreamReadings",
                                        response_deserializer=pb.StreamReadingsResponse.FromString)(
        iter([open_request("cell-1").SerializeToString(), batch_request(first).SerializeToString(), GARBAGE,
              batch_request(second).SerializeToString()]), timeout=10)
    responses = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for response in call:
            responses.append(response)
    assert [r.WhichOneof("kind") for r in responses] == ["resume", "ack"] and responses[1].ack.sequence == 1
    err = raised.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "message 2 of the stream cannot be decoded"
    assert error_info(err).reason == "MALFORMED_MESSAGE"
    # The batch before the garbage is stored, the one after it is not; the server streams on.
    committed, acks = await stream_batches(ingest_grpc.IngestServiceStub(ingest.channel), "cell-1", [second])
    assert committed == 1 and [(a.sequence, a.duplicate, a.written) for a in acks] == [(2, False, 5)]
