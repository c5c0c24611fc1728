"""One server interceptor for every RPC of every service.

It validates each request message against the protovalidate rules written in the protos, answering
INVALID_ARGUMENT with ``google.rpc.BadRequest`` field violations before the handler sees anything, and it
maps domain errors (runtime/errors.py) and lost-database errors to status codes with
``google.rpc.Status`` details, in this one place. It also records per-RPC metrics.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import metrics

from .db import DB_UNAVAILABLE_ERRORS
from .errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from .validation import violations_of

log = logging.getLogger(__name__)

DOMAIN = "fabrica.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_CODES: list[tuple[type[DomainError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Aborted, grpc.StatusCode.ABORTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def _pack(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def status_for(exc: DomainError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and rich status (with details) for a domain error."""
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
    details: list[message.Message] = []
    if isinstance(exc, InvalidArgument):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in exc.violations
                ]
            )
        )
    elif isinstance(exc, FailedPrecondition) and exc.violations:
        details.append(
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=v.type, subject=v.subject, description=v.description
                    )
                    for v in exc.violations
                ]
            )
        )
    details.append(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata))
    rich = status_pb2.Status(code=code.value[0], message=exc.message, details=[_pack(d) for d in details])
    return code, rich


async def abort_with(context: grpc.aio.ServicerContext, exc: DomainError) -> None:
    code, rich = status_for(exc)
    await context.abort(code, rich.message, trailing_metadata=((STATUS_DETAILS_KEY, rich.SerializeToString()),))


def _translate(exc: BaseException) -> DomainError | None:
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, DB_UNAVAILABLE_ERRORS):
        return Unavailable(f"database unavailable: {type(exc).__name__}: {exc}", reason="DATABASE_UNAVAILABLE")
    return None


class _InvalidStreamMessage(Exception):
    def __init__(self, error: InvalidArgument):
        super().__init__(error.message)
        self.error = error


async def _validated_stream(requests: AsyncIterator[Any], validate: bool) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if validate:
            found = violations_of(request)
            if found:
                raise _InvalidStreamMessage(InvalidArgument(found, f"message {index} of the stream is invalid: "
                                                            + "; ".join(f"{v.field}: {v.description}" for v in found)))
        index += 1
        yield request


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Validation, error mapping and RPC metrics for every method."""

    def __init__(self, service: str, *, validate: bool = True):
        self.service = service
        self.validate = validate
        meter = metrics.get_meter("fabrica.rpc")
        self._calls = meter.create_counter("fabrica_rpc_calls", description="RPCs handled, by method and code")
        self._duration = meter.create_histogram(
            "fabrica_rpc_duration", unit="s", description="RPC duration, by method and code",
            # In seconds: the SDK's default buckets are meant for milliseconds and would put every RPC in one.
            explicit_bucket_boundaries_advisory=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
        )

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        attrs = {"service": self.service, "method": method, "code": code.name}
        self._calls.add(1, attrs)
        self._duration.record(time.perf_counter() - started, attrs)

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, exc: BaseException, started: float) -> None:
        domain = exc.error if isinstance(exc, _InvalidStreamMessage) else _translate(exc)
        if domain is None:
            log.exception("unhandled error in %s", method)
            domain = DomainError("internal error; see the service log")
            domain.reason = "INTERNAL"
        code, _ = status_for(domain)
        self._record(method, code, started)
        await abort_with(context, domain)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        validate = self.validate
        intercept = self

        if handler.unary_unary or handler.unary_stream:
            behavior = handler.unary_unary or handler.unary_stream

            async def check(request: Any, context: grpc.aio.ServicerContext, started: float) -> bool:
                if validate:
                    found = violations_of(request)
                    if found:
                        await intercept._fail(context, method, InvalidArgument(found), started)
                        return False
                return True

            if handler.unary_unary:

                async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    started = time.perf_counter()
                    await check(request, context, started)
                    try:
                        response = await behavior(request, context)
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:  # mapped to a status in one place
                        await intercept._fail(context, method, exc, started)
                    intercept._record(method, grpc.StatusCode.OK, started)
                    return response

                return grpc.unary_unary_rpc_method_handler(
                    unary_unary, handler.request_deserializer, handler.response_serializer
                )

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.perf_counter()
                await check(request, context, started)
                try:
                    async for response in _responses(behavior, request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await intercept._fail(context, method, exc, started)
                intercept._record(method, grpc.StatusCode.OK, started)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )

        behavior = handler.stream_unary or handler.stream_stream
        if handler.stream_unary:

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    response = await behavior(_validated_stream(requests, validate), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await intercept._fail(context, method, exc, started)
                intercept._record(method, grpc.StatusCode.OK, started)
                return response

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for response in _responses(behavior, _validated_stream(requests, validate), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await intercept._fail(context, method, exc, started)
            intercept._record(method, grpc.StatusCode.OK, started)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )


async def _responses(behavior: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """Responses of a streaming handler, whether it is an async generator or writes with context.write."""
    if inspect.isasyncgenfunction(behavior):
        async for response in behavior(request, context):
            yield response
    else:
        result = await behavior(request, context)
        if result is not None:
            raise TypeError("a streaming handler that uses context.write must return None")


__all__ = ["ServiceInterceptor", "abort_with", "status_for"]
