"""One server interceptor for every RPC of every service.

It validates each request message against the protovalidate rules written in the protos, answering
INVALID_ARGUMENT with ``google.rpc.BadRequest`` field violations (at most MAX_VIOLATIONS of them, the rest
counted in ErrorInfo's ``omitted_violations``) before the handler sees anything (a large request is
checked in a worker process, runtime/validation.py, so it does not stall the event loop), and it
maps domain errors (runtime/errors.py) and lost-database errors to status codes with
``google.rpc.Status`` details (built with grpcio-status), in this one place. It also records per-RPC metrics.

Before anything else it decides who the caller is and whether it may call the method: every method but
health and reflection calls the `identify` callable it was given (runtime/auth.py: a bearer token, then a
client certificate; UNAUTHENTICATED without either), then checks the role the method declares in the
protos (``(fabrica.common.v1.required_role)``; PERMISSION_DENIED, reason ROLE_REQUIRED, without it). The
principal is set for the handler (runtime/principal.py ``current()``), and so is the request id the audit
trail records (runtime/audit.py). Without `identify` authentication is off (FABRICA_INSECURE=1) and every
caller is the development principal. So is the tenant the call works in (runtime/tenancy.py); with
`tenant_active` (a service that polls config's tenants, runtime/tenants.py), a tenant's own caller in a
suspended tenant is PERMISSION_DENIED, reason TENANT_INACTIVE (installation-wide callers are not: they
suspended it, and may still look and clean up); a stream open at the suspension ends so at its next
message, read or sent.

A request that is not protobuf at all (undecodable bytes) is INVALID_ARGUMENT with reason
``MALFORMED_MESSAGE`` too, in every RPC shape, logged in one line at most once per
:data:`MALFORMED_LOG_INTERVAL` seconds per method. grpcio decodes a request before any interceptor or
handler runs and answers a decode error itself with UNKNOWN (a unary request) or raises it inside the
handler's iterator (a stream), so the interceptor wraps each method's request deserializer: a message that
does not decode becomes an :class:`_Undecodable` marker, which the interceptor refuses where it checks the
request.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import metrics

from . import audit, auth
from . import principal as principals
from . import tenancy
from .db import DB_UNAVAILABLE_ERRORS
from .errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .validation import MAX_VIOLATIONS, OffLoopValidator, violations_of

log = logging.getLogger(__name__)

#: Seconds between two log lines about undecodable requests to one method (the ones in between are counted).
MALFORMED_LOG_INTERVAL = 10.0

DOMAIN = "fabrica.dev"
#: The trailer grpcio-status writes the rich status to (clients and tests decode it from there).
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_CODES: list[tuple[type[DomainError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Aborted, grpc.StatusCode.ABORTED),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def _pack(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


#: What the field violations of one answer may take, in bytes of paths and descriptions. The status
#: travels in the trailers twice (message and details, base64) and a client refuses trailers beyond 16 KiB
#: (gRPC's default), turning an answer that lists 100,000 violations into RESOURCE_EXHAUSTED.
VIOLATION_BYTES = 4096


def _shown(violations: list[FieldViolation]) -> list[FieldViolation]:
    """The violations an answer lists: at most MAX_VIOLATIONS and VIOLATION_BYTES (at least one), in order.
    The same for every RPC; the rest are counted in ErrorInfo metadata ``omitted_violations``."""
    shown: list[FieldViolation] = []
    used = 0
    for v in violations[:MAX_VIOLATIONS]:
        v = FieldViolation(v.field[:256], v.description[:512])
        used += len(v.field.encode()) + len(v.description.encode()) + 8
        if shown and used > VIOLATION_BYTES:
            break
        shown.append(v)
    return shown


def status_for(exc: DomainError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and rich status (with details) for a domain error."""
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
    details: list[message.Message] = []
    text, metadata = exc.message, exc.metadata
    if isinstance(exc, InvalidArgument):
        shown = _shown(exc.violations)
        omitted = len(exc.violations) - len(shown)
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in shown
                ]
            )
        )
        if omitted:
            text = (f"{len(exc.violations)} field violations, the first {len(shown)} in the details "
                    f"({omitted} more not listed); first: {shown[0].field}: {shown[0].description}")
            metadata = {**metadata, "omitted_violations": str(omitted)}
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
    elif isinstance(exc, ResourceExhausted) and exc.quota_violations:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                            for v in exc.quota_violations]
            )
        )
    details.append(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=metadata))
    rich = status_pb2.Status(code=code.value[0], message=text, details=[_pack(d) for d in details])
    return code, rich


async def abort_with(context: grpc.aio.ServicerContext, exc: DomainError) -> None:
    """End the RPC with the rich status of `exc` (grpcio-status puts it in ``grpc-status-details-bin``)."""
    _, rich = status_for(exc)
    await context.abort_with_status(rpc_status.to_status(rich))


def _translate(exc: BaseException) -> DomainError | None:
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, DB_UNAVAILABLE_ERRORS):
        return Unavailable(f"database unavailable: {type(exc).__name__}: {exc}", reason="DATABASE_UNAVAILABLE")
    return None


class _Undecodable:
    """What the tolerant deserializer returns for bytes that are not a valid message of the method's type."""

    __slots__ = ("error", "size")

    def __init__(self, error: Exception, size: int):
        self.error, self.size = error, size


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an :class:`_Undecodable` instead of raising on bytes it cannot decode."""
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, or whatever a custom deserializer raises
            return _Undecodable(exc, len(raw))

    return deserialize


class _MalformedLog:
    """One short log line per method per `interval` seconds about undecodable requests, with the count of
    those not logged in between: a flood of garbage must not flood the log."""

    def __init__(self, interval: float = MALFORMED_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def note(self, method: str, bad: _Undecodable) -> None:
        now = self.clock()
        last = self._last.get(method)
        if last is not None and now - last < self.interval:
            self._suppressed[method] = self._suppressed.get(method, 0) + 1
            return
        self._last[method] = now
        suppressed = self._suppressed.pop(method, 0)
        log.warning("undecodable request to %s (%d bytes): %s: %s%s", method, bad.size, type(bad.error).__name__,
                    bad.error, f" ({suppressed} more since the last report)" if suppressed else "")


def _malformed(index: int | None) -> InvalidArgument:
    where = "the request" if index is None else f"message {index} of the stream"
    error = InvalidArgument(FieldViolation("(message)", "not a valid protobuf message of the method's type"),
                            f"{where} cannot be decoded")
    error.reason = "MALFORMED_MESSAGE"
    return error


class _InvalidStreamMessage(Exception):
    def __init__(self, error: InvalidArgument):
        super().__init__(error.message)
        self.error = error


def invalid_stream_message(index: int, found: list[FieldViolation]) -> InvalidArgument:
    """The error for message `index` of a request stream that breaks the rules (`found`): the interceptor's,
    and that of a method that validates its own stream (:func:`validates_own_requests`)."""
    listed = "; ".join(f"{v.field}: {v.description}" for v in found[:MAX_VIOLATIONS])
    return InvalidArgument(found, f"message {index} of the stream is invalid: {listed}")


async def _validated_stream(requests: AsyncIterator[Any], validate: bool,
                            malformed: Callable[[_Undecodable], None],
                            admitted: Callable[[], None] | None = None) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if admitted is not None:  # the caller's tenant suspended since the stream opened: no more of it
            admitted()
        if isinstance(request, _Undecodable):
            malformed(request)
            raise _InvalidStreamMessage(_malformed(index))
        if validate:
            found = violations_of(request)
            if found:
                raise _InvalidStreamMessage(invalid_stream_message(index, found))
        index += 1
        yield request


def _wrap_handler(handler: grpc.RpcMethodHandler,
                  wrap: Callable[[Callable[..., Any], bool, bool], Callable[..., Any]]) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by ``wrap(behavior, request_streaming, response_streaming)``,
    whichever of the four RPC shapes it has (as grpc's examples/python/interceptors do), and its request
    deserializer made tolerant (:func:`_tolerant`): `wrap` must refuse the :class:`_Undecodable` it yields."""
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    return factory(wrap(behavior, handler.request_streaming, handler.response_streaming),
                   request_deserializer=_tolerant(handler.request_deserializer),
                   response_serializer=handler.response_serializer)


#: Who the caller of an RPC is (runtime/auth.py Authenticator.identify): a principal, or UNAUTHENTICATED.
Identify = Callable[[grpc.aio.ServicerContext], Awaitable[principals.Principal]]


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Authentication and roles, validation, error mapping and RPC metrics for every method."""

    def __init__(self, service: str, *, validate: bool = True, identify: Identify | None = None,
                 tenant_active: Callable[[str], bool] | None = None):
        self.service = service
        self.validate = validate
        self.identify = identify
        self.tenant_active = tenant_active
        self.validator = OffLoopValidator()
        self._malformed_log = _MalformedLog()
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

    @contextlib.asynccontextmanager
    async def _outcome(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Around one RPC: an exception becomes its status (in one place), and the outcome is recorded.

        An abort by the handler itself (context.abort) passes through as it is."""
        started = time.perf_counter()
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(context, method, exc, started)
        self._record(method, grpc.StatusCode.OK, started)

    async def _checked(self, path: str, request: Any, request_streaming: bool, validate: bool,
                       admitted: Callable[[], None] | None = None) -> Any:
        """The request, decoded and validated (unless `validate` is False: the method validates its own): a
        message now (a large one away from the event loop), or each message of a stream as it is read. `path`
        is the full method name (``/fabrica.config.v1.ConfigService/GetPlc``)."""
        def malformed(bad: _Undecodable) -> None:
            self._malformed_log.note(path, bad)

        if request_streaming:
            return _validated_stream(request, validate, malformed, admitted)
        if isinstance(request, _Undecodable):
            malformed(request)
            raise _malformed(None)
        if validate:
            found = await self.validator.violations_of(request)
            if found:
                raise InvalidArgument(found)
        return request

    async def _admit(self, path: str, context: grpc.aio.ServicerContext) -> Callable[[], None] | None:
        """Set the request id and the caller's principal for this RPC, refusing a caller who may not call
        `path`. Each RPC runs in a task of its own, so what is set here is the handler's alone.

        Returns the check that the caller's tenant is still active (None when there is nothing to check):
        a stream calls it before each message it reads or sends, so a suspension ends the streams already
        open at their next message."""
        audit.begin_call(path.rsplit("/", 1)[-1], context.invocation_metadata())
        if auth.is_open(path):
            return None
        if self.identify is None:
            caller = principals.INSECURE
        else:
            caller = await self.identify(context)
            auth.authorize(path, caller)
        principals.set_current(caller)
        tenant = principals.tenant_of_request(caller, tenancy.requested(context.invocation_metadata()))
        tenancy.set_current(tenant)
        active = self.tenant_active
        if active is None or caller.installation_wide or not tenancy.is_code(tenant):
            return None

        def admitted() -> None:
            if not active(tenant):
                raise PermissionDenied(f"tenant {tenant!r} is suspended (inactive)", reason="TENANT_INACTIVE",
                                       metadata={"tenant": tenant})

        admitted()
        return admitted

    def close(self) -> None:
        """Release the validator's worker process (ServiceHost.stop calls this)."""
        self.validator.close()

    def _behavior(self, method: str, path: str) -> Callable[[Callable[..., Any], bool, bool], Callable[..., Any]]:
        def wrap(behavior: Callable[..., Any], request_streaming: bool, response_streaming: bool) -> Callable[..., Any]:
            validate = self.validate and not getattr(behavior, VALIDATES_OWN_REQUESTS, False)
            if response_streaming:

                async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    async with self._outcome(method, context):
                        admitted = await self._admit(path, context)
                        checked = await self._checked(path, request, request_streaming, validate, admitted)
                        async for response in _responses(behavior, checked, context):
                            if admitted is not None:
                                admitted()
                            yield response

                return streaming

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._outcome(method, context):
                    admitted = await self._admit(path, context)
                    return await behavior(await self._checked(path, request, request_streaming, validate, admitted),
                                          context)

            return unary

        return wrap

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _wrap_handler(handler, self._behavior(handler_call_details.method.rsplit("/", 1)[-1],
                                              handler_call_details.method))


async def _responses(behavior: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """Responses of a streaming handler, whether it is an async generator or writes with context.write."""
    if inspect.isasyncgenfunction(behavior):
        async for response in behavior(request, context):
            yield response
    else:
        result = await behavior(request, context)
        if result is not None:
            raise TypeError("a streaming handler that uses context.write must return None")


# --- the per-method opt-out of request validation ------------------------------------------------------

#: The attribute :func:`validates_own_requests` sets on a servicer method.
VALIDATES_OWN_REQUESTS = "__fabrica_validates_own_requests__"

_Method = Callable[..., Any]


def validates_own_requests(method: _Method) -> _Method:
    """Declares that a servicer method validates its requests itself, with the same verdicts as
    protovalidate (shown by a differential test): the interceptor then skips its protovalidate check for
    that method only, and still refuses undecodable messages. Use it where the method reads every field
    anyway (StreamReadings converts each reading), so that the check is not made twice."""
    setattr(method, VALIDATES_OWN_REQUESTS, True)
    return method


__all__ = ["ServiceInterceptor", "abort_with", "invalid_stream_message", "status_for", "validates_own_requests"]
