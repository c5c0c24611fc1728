"""Domain errors. Domain code raises these; one interceptor maps them to gRPC status codes.

They carry no gRPC types so that domain modules stay plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: `field` is a path such as ``tags[2].name``."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error the services map to a status code."""

    reason: str = "DOMAIN_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    """The request is malformed. Maps to INVALID_ARGUMENT with BadRequest field violations."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | FieldViolation, message: str | None = None):
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = list(violations)
        text = message or "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(text)


class NotFound(DomainError):
    """The named resource does not exist. Maps to NOT_FOUND."""

    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    """A resource with that id exists. Maps to ALREADY_EXISTS."""

    reason = "ALREADY_EXISTS"


@dataclass
class PreconditionViolation:
    """One failed precondition, e.g. type ``STATE``, subject ``orders/42``."""

    type: str
    subject: str
    description: str


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the call (e.g. starting a completed order)."""

    reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str,
        *,
        violations: list[PreconditionViolation] | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations or [])


class Aborted(DomainError):
    """A concurrency conflict, e.g. an etag mismatch. Maps to ABORTED; the client re-reads and retries."""

    reason = "ABORTED"


class OutOfRange(DomainError):
    """A position past what exists or is still kept (e.g. a cursor older than the retained events). Maps to
    OUT_OF_RANGE: the client starts again from a position that is valid."""

    reason = "OUT_OF_RANGE"


class Unauthenticated(DomainError):
    """The caller proved no identity (no token, a bad or expired one, no client certificate where one is
    needed). Maps to UNAUTHENTICATED with ErrorInfo."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """The caller is known but may not do this (a role it lacks, another collector's stream). Maps to
    PERMISSION_DENIED with ErrorInfo."""

    reason = "PERMISSION_DENIED"


@dataclass(frozen=True)
class QuotaViolation:
    """One quota used up: `subject` whose (``tenants/acme``), `description` which and how far."""

    subject: str
    description: str


class ResourceExhausted(DomainError):
    """A quota or limit is used up. Maps to RESOURCE_EXHAUSTED (with a QuotaFailure detail when the error
    names quotas); retry later, slower."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, quota_violations: list[QuotaViolation] | None = None,
                 reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message, reason=reason, metadata=metadata)
        self.quota_violations = list(quota_violations or [])


class Unavailable(DomainError):
    """A dependency (Postgres, a peer service) is not reachable. Maps to UNAVAILABLE; retry later."""

    reason = "UNAVAILABLE"


__all__ = [
    "Aborted",
    "AlreadyExists",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "QuotaViolation",
    "PreconditionViolation",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
