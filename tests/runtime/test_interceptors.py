"""The one server interceptor, over all four RPC shapes of a real grpc.aio server on 127.0.0.1:0: request
validation (a message, or each message of a stream), domain errors, lost-database errors and bugs become
the same code, message and google.rpc.Status details whatever the shape, decoded with grpcio-status."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_helpers import error_info, field_violations
from grpc_status import rpc_status

from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica_svc.runtime.errors import (AlreadyExists, FailedPrecondition, NotFound, OutOfRange,
                                        PreconditionViolation)
from fabrica_svc.runtime.interceptors import ServiceInterceptor

#: The message every method takes and returns: after_cursor must be >= 0 (a protovalidate rule).
Msg = pb.WatchTagEventsRequest
SERVICE = "fabrica.test.v1.Shapes"
SHAPES = ("Unary", "ServerStream", "ClientStream", "Bidi")


def outcome(request: Msg) -> Msg:
    """What the handlers do with a message: raise the error its after_cursor names, or echo it."""
    match request.after_cursor:
        case 1:
            raise NotFound("plcs/press-9 does not exist", metadata={"resource": "plcs/press-9"})
        case 2:
            raise FailedPrecondition("order 7 is completed", reason="ORDER_COMPLETED", violations=[
                PreconditionViolation("STATE", "orders/7", "a completed order cannot start")])
        case 3:
            raise OutOfRange("cursor 3 is gone", reason="CURSOR_OUT_OF_RANGE", metadata={"purged_through": "9"})
        case 4:
            raise asyncpg.InterfaceError("connection is closed")
        case 5:
            raise KeyError("a bug")
        case 6:
            raise AlreadyExists("plcs/press-1 exists")
    return request


async def unary(request: Msg, context: grpc.aio.ServicerContext) -> Msg:
    return outcome(request)


async def server_stream(request: Msg, context: grpc.aio.ServicerContext) -> AsyncIterator[Msg]:
    yield Msg(after_cursor=100)  # a response before the error: the stream still ends with the error's status
    yield outcome(request)


async def server_stream_by_write(request: Msg, context: grpc.aio.ServicerContext) -> None:
    await context.write(Msg(after_cursor=100))
    await context.write(outcome(request))


async def client_stream(requests: AsyncIterator[Msg], context: grpc.aio.ServicerContext) -> Msg:
    last = Msg()
    async for request in requests:
        last = outcome(request)
    return last


async def bidi(requests: AsyncIterator[Msg], context: grpc.aio.ServicerContext) -> AsyncIterator[Msg]:
    async for request in requests:
        yield outcome(request)


def handler(behavior, factory):  # noqa: ANN001, ANN202
    return factory(behavior, request_deserializer=Msg.FromString, response_serializer=Msg.SerializeToString)


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ServiceInterceptor("test")])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": handler(unary, grpc.unary_unary_rpc_method_handler),
        "ServerStream": handler(server_stream, grpc.unary_stream_rpc_method_handler),
        "ServerStreamByWrite": handler(server_stream_by_write, grpc.unary_stream_rpc_method_handler),
        "ClientStream": handler(client_stream, grpc.stream_unary_rpc_method_handler),
        "Bidi": handler(bidi, grpc.stream_stream_rpc_method_handler),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(0)


async def call(channel: grpc.aio.Channel, shape: str, messages: list[Msg]) -> list[Msg]:
    """Call `shape` with `messages` (the first one only for a unary request); the responses."""
    kw = dict(request_serializer=Msg.SerializeToString, response_deserializer=Msg.FromString)
    method = f"/{SERVICE}/{shape}"
    if shape == "Unary":
        return [await channel.unary_unary(method, **kw)(messages[0], timeout=10)]
    if shape.startswith("ServerStream"):
        return [r async for r in channel.unary_stream(method, **kw)(messages[0], timeout=10)]
    if shape == "ClientStream":
        return [await channel.stream_unary(method, **kw)(iter(messages), timeout=10)]
    return [r async for r in channel.stream_stream(method, **kw)(iter(messages), timeout=10)]


async def failure(channel: grpc.aio.Channel, shape: str, messages: list[Msg]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, shape, messages)
    status = rpc_status.from_call(err.value)  # grpcio-status checks its code and message match the call's
    assert status is not None and status.code == err.value.code().value[0]
    return err.value


@pytest.mark.parametrize("shape", [*SHAPES, "ServerStreamByWrite"])
async def test_every_shape_passes_valid_messages_through(channel: grpc.aio.Channel, shape: str) -> None:
    responses = await call(channel, shape, [Msg(after_cursor=10), Msg(after_cursor=11)])
    assert [r.after_cursor for r in responses] == {
        "Unary": [10], "ServerStream": [100, 10], "ServerStreamByWrite": [100, 10], "ClientStream": [11],
        "Bidi": [10, 11]}[shape]


@pytest.mark.parametrize("shape", [*SHAPES, "ServerStreamByWrite"])
@pytest.mark.parametrize("cursor, code, message, reason", [
    (1, grpc.StatusCode.NOT_FOUND, "plcs/press-9 does not exist", "NOT_FOUND"),
    (2, grpc.StatusCode.FAILED_PRECONDITION, "order 7 is completed", "ORDER_COMPLETED"),
    (3, grpc.StatusCode.OUT_OF_RANGE, "cursor 3 is gone", "CURSOR_OUT_OF_RANGE"),
    (4, grpc.StatusCode.UNAVAILABLE, "database unavailable: InterfaceError: connection is closed",
     "DATABASE_UNAVAILABLE"),
    (5, grpc.StatusCode.INTERNAL, "internal error; see the service log", "INTERNAL"),
    (6, grpc.StatusCode.ALREADY_EXISTS, "plcs/press-1 exists", "ALREADY_EXISTS"),
])
async def test_every_shape_maps_an_error_to_the_same_rich_status(channel: grpc.aio.Channel, shape: str, cursor: int,
                                                                 code: grpc.StatusCode, message: str,
                                                                 reason: str) -> None:
    err = await failure(channel, shape, [Msg(after_cursor=cursor)])
    assert (err.code(), err.details()) == (code, message)
    info = error_info(err)
    assert (info.reason, info.domain) == (reason, "fabrica.dev")
    assert dict(info.metadata) == {1: {"resource": "plcs/press-9"}, 3: {"purged_through": "9"}}.get(cursor, {})
    details = rpc_status.from_call(err).details
    if cursor == 2:
        failed = error_details_pb2.PreconditionFailure()
        assert len(details) == 2 and details[0].Unpack(failed)
        assert [(v.type, v.subject, v.description) for v in failed.violations] == [
            ("STATE", "orders/7", "a completed order cannot start")]
    else:
        assert len(details) == 1  # the ErrorInfo only


@pytest.mark.parametrize("shape", SHAPES)
async def test_every_shape_refuses_an_invalid_message_with_field_violations(channel: grpc.aio.Channel,
                                                                            shape: str) -> None:
    streaming = shape in ("ClientStream", "Bidi")
    err = await failure(channel, shape, [Msg(after_cursor=10), Msg(after_cursor=-1)] if streaming
                        else [Msg(after_cursor=-1)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err)
    assert list(violations) == ["after_cursor"]
    text = f"after_cursor: {violations['after_cursor']}"
    assert err.details() == (f"message 1 of the stream is invalid: {text}" if streaming else text)
    assert error_info(err).reason == "INVALID_ARGUMENT"
