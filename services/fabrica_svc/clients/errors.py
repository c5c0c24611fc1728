"""What a failed call says about itself: the ``google.rpc.Status`` a Fabrica service puts in its trailers
(``grpc-status-details-bin``, built by the runtime's interceptor), decoded with grpcio-status.

Clients log ``str(error_details(exc))`` and decide on retries with its fields, e.g.::

    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        if details.reason == "CURSOR_OUT_OF_RANGE": ...
        log.error("ingest refused the batch: %s", details)
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


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
