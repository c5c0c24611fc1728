"""What a failed call says about itself: the ``google.rpc.Status`` a Fabrica service puts in its trailers
(``grpc-status-details-bin``, built by the runtime's interceptor), decoded with grpcio-status.

Clients log ``str(error_details(exc))`` and decide on retries with its fields, e.g.::

    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        if details.reason == "CURSOR_OUT_OF_RANGE": ...
        log.error("ingest refused the batch: %s", details)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorDetails:
    """The decoded status of a failed call. Empty details when the peer sent none (or inconsistent ones)."""

    code: grpc.StatusCode
    message: str
    #: ErrorInfo: the machine-readable reason (e.g. INVALID_ARGUMENT, CURSOR_OUT_OF_RANGE), its domain and
    #: metadata.
    reason: str = ""
    domain: str = ""
    metadata: tuple[tuple[str, str], ...] = ()
    #: BadRequest: (field path, description) per violation.
    field_violations: tuple[tuple[str, str], ...] = ()
    #: PreconditionFailure: (type, subject, description) per violation.
    precondition_violations: tuple[tuple[str, str, str], ...] = ()
    #: QuotaFailure: (subject, description) per violation, e.g. ("tenants/acme", "... readings per second ...").
    quota_violations: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        parts = [f"{self.code.name}: {self.message}"]
        if self.reason:
            parts.append(f"reason {self.reason}")
        parts += [f"{k}={v}" for k, v in self.metadata]
        violations = [f"{f}: {d}" for f, d in self.field_violations]
        violations += [f"{t} {s}: {d}" for t, s, d in self.precondition_violations]
        violations += [f"quota {s}: {d}" for s, d in self.quota_violations]
        parts += [v for v in violations if v not in self.message]  # a service often says them in the message too
        return parts[0] if len(parts) == 1 else f"{parts[0]} [{'; '.join(parts[1:])}]"


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Decode the rich status of a failed call (a ``grpc.aio.AioRpcError`` or a sync ``grpc.RpcError``)."""
    code = error.code()  # type: ignore[attr-defined]
    message = error.details() or ""  # type: ignore[attr-defined]
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # code or message differ from the status proto: not a status we can trust
        status = None
    if status is None:
        return ErrorDetails(code, message)
    reason = domain = ""
    metadata: tuple[tuple[str, str], ...] = ()
    fields: list[tuple[str, str]] = []
    preconditions: list[tuple[str, str, str]] = []
    quotas: list[tuple[str, str]] = []
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, tuple(sorted(info.metadata.items()))
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            fields += [(v.field, v.description) for v in bad.field_violations]
        elif packed.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            packed.Unpack(failure)
            preconditions += [(v.type, v.subject, v.description) for v in failure.violations]
        elif packed.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            packed.Unpack(quota)
            quotas += [(v.subject, v.description) for v in quota.violations]
    return ErrorDetails(code, message, reason, domain, metadata, tuple(fields), tuple(preconditions), tuple(quotas))


def _at_once(awaitable: object) -> object:
    """The result of a coroutine that finishes without waiting (a done call's status accessors)."""
    coro = awaitable.__await__()  # type: ignore[attr-defined]
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the call's status is not there yet")


class ServerStatus:
    """The status a streaming call ended with first, kept against grpcio's asyncio client overwriting it.

    When a server ends a stream the client is still writing to (an abort: ingest's RESOURCE_EXHAUSTED of a
    batch over the tenant's quota, a FAILED_PRECONDITION of the sequence rule), a write that Core refuses
    because the stream has just closed makes grpcio 1.85 set the call's status to INTERNAL ("Internal error
    from Core", debug string ``Failed "execute_batch"``) even when the server's status was already there
    (grpc/grpc#36066; the fix, grpc/grpc#43486, is not released). Every read and ``code()`` after that says
    INTERNAL, so a client would lose the server's code and details (e.g. ``retry_after_ms``). A call's done
    callbacks run each time it is given a status, the server's first: this keeps that one.

    Use: ``status = ServerStatus(call)`` right after the call is made, then ``raise status.real(exc)``
    where an AioRpcError of the call is raised."""

    def __init__(self, call: grpc.aio.Call):
        self.first: grpc.aio.AioRpcError | None = None
        self._seen = False
        call.add_done_callback(self._done)

    def _done(self, call: grpc.aio.Call) -> None:
        if self._seen:
            return
        self._seen = True
        try:
            code = _at_once(call.code())
            if code in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL) or call.cancelled():
                return  # nothing to restore: an OK end, Core's own error, or this side's cancellation
            self.first = grpc.aio.AioRpcError(
                code, _at_once(call.initial_metadata()), _at_once(call.trailing_metadata()), _at_once(call.details()),
                _at_once(call.debug_error_string()))
        except Exception:  # noqa: BLE001 - never break grpc's callback: without it, the status is as grpc says
            log.debug("could not keep the status of a call", exc_info=True)

    def real(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        """`error`, or the server's status it overwrote (an INTERNAL from a write refused as the stream ended)."""
        if (self.first is not None and error.code() == grpc.StatusCode.INTERNAL
                and "execute_batch" in (error.debug_error_string() or "")):
            return self.first
        return error
