"""Notification and forwarding targets as plain values, their rules, and the webhook signature. No I/O.

The signature (what a receiver checks)
--------------------------------------
Every webhook request carries::

    Fabrica-Timestamp: <unix seconds of this attempt>
    Fabrica-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>
    Idempotency-Key:   <the same on every attempt of the same event>

The receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes with the target's
secret, compares in constant time (:func:`verify_signature`), and refuses a timestamp too far from its
clock (replays). Signing the timestamp with the body (as Stripe and Slack do) means an old, captured
request cannot be replayed later with a fresh timestamp.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from ...runtime.errors import FieldViolation, InvalidArgument

#: DeliveryState numbers (protos/fabrica/alarm/v1/notify.proto); also the outbox's `state` column.
DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_FAILED = 1, 2, 3
#: ForwardingTarget destinations; also forwarding_targets.kind.
FORWARD_HTTP, FORWARD_INGEST = 1, 2

SIGNATURE_HEADER = "Fabrica-Signature"
TIMESTAMP_HEADER = "Fabrica-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
EVENT_TYPE_HEADER = "Fabrica-Event-Type"
ATTEMPT_HEADER = "Fabrica-Delivery-Attempt"

_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_COLLECTOR_ID = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_PLC_ID = re.compile(r"^[A-Za-z0-9._:-]{1,63}$")
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.-]+:[0-9]{1,5}$|^\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}$")
MIN_SECRET, MAX_SECRET = 16, 256


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The Fabrica-Signature header value of `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def verify_signature(secret: str, timestamp: str, signature: str, body: bytes, *, now: float,
                     tolerance: float = 300.0) -> bool:
    """What a receiver checks: the signature is the body's under `secret` and the timestamp is within
    `tolerance` seconds of `now`."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(now - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def check_url(url: str, path: str, out: list[FieldViolation]) -> None:
    if len(url) > 2048:
        out.append(FieldViolation(path, "must be at most 2048 characters"))
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a bad port
    except ValueError as exc:
        out.append(FieldViolation(path, f"not a URL: {exc}"))
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        out.append(FieldViolation(path, "must be an http:// or https:// URL with a host"))
    elif any(c.isspace() or ord(c) < 0x20 for c in url):
        out.append(FieldViolation(path, "must not contain spaces or control characters"))


def _check_common(target_id: str, display_name: str, out: list[FieldViolation]) -> None:
    if not _ID.match(target_id):
        out.append(FieldViolation("id", "must be 1-63 lowercase letters, digits or '-', starting with a letter"))
    if len(display_name) > 128 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in display_name):
        out.append(FieldViolation("display_name", "must be at most 128 characters, no control characters"))


def _check_secret(secret: str, path: str, out: list[FieldViolation]) -> None:
    if not MIN_SECRET <= len(secret) <= MAX_SECRET or any(ord(c) < 0x20 or ord(c) == 0x7F for c in secret):
        out.append(FieldViolation(path, f"must be {MIN_SECRET} to {MAX_SECRET} printable characters"))


@dataclass
class NotificationTarget:
    """A webhook: each alarm event is POSTed to `url` as JSON, signed with `secret`."""

    id: str
    url: str
    secret: str
    display_name: str = ""
    enabled: bool = True
    # Output only:
    revision: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None
    pending_deliveries: int = 0
    failed_deliveries: int = 0
    last_delivered_time: datetime | None = None
    last_error: str = ""

    def check(self) -> None:
        found: list[FieldViolation] = []
        _check_common(self.id, self.display_name, found)
        check_url(self.url, "url", found)
        _check_secret(self.secret, "secret", found)
        if found:
            raise InvalidArgument(found)

    def replace(self, **changes: object) -> NotificationTarget:
        """A copy with the changes that are not None."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class Delivery:
    """One notification to one target and where it stands."""

    id: int
    target_id: str
    idempotency_key: str
    event_type: str
    body: bytes
    state: int
    attempts: int
    next_attempt_time: datetime | None = None
    last_error: str = ""
    last_http_status: int = 0
    last_attempt_time: datetime | None = None
    create_time: datetime | None = None
    delivered_time: datetime | None = None


@dataclass
class ForwardingTarget:
    """Committed readings of `plc_ids` sent on: as HTTP JSON batches to `url` (signed with `secret` like a
    webhook), or into another Fabrica's ingest at `ingest_address` as collector `collector_id`."""

    id: str
    plc_ids: Sequence[str]
    kind: int
    url: str = ""
    secret: str = ""
    ingest_address: str = ""
    collector_id: str = ""
    display_name: str = ""
    enabled: bool = True
    #: A new target starts after the newest committed batch instead of the oldest retained one.
    start_at_end: bool = False
    # Output only:
    revision: int = 0
    cursor: int = 0
    forwarded_batches: int = 0
    forwarded_readings: int = 0
    last_forward_time: datetime | None = None
    last_commit_time: datetime | None = None
    last_error: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    #: The tenant whose target it is (and whose readings it forwards); set when read from the store.
    tenant: str = ""

    def check(self) -> None:
        found: list[FieldViolation] = []
        _check_common(self.id, self.display_name, found)
        if not 1 <= len(self.plc_ids) <= 1000:
            found.append(FieldViolation("plc_ids", "name 1 to 1,000 PLCs"))
        for i, p in enumerate(self.plc_ids):
            if not _PLC_ID.match(p):
                found.append(FieldViolation(f"plc_ids[{i}]", "must be 1-63 letters, digits or . _ : -"))
        if self.kind == FORWARD_HTTP:
            check_url(self.url, "http.url", found)
            _check_secret(self.secret, "http.secret", found)
        elif self.kind == FORWARD_INGEST:
            if not _ADDRESS.match(self.ingest_address) or len(self.ingest_address) > 255:
                found.append(FieldViolation("ingest.address", "must be host:port"))
            if not (_COLLECTOR_ID.match(self.collector_id) and len(self.collector_id) <= 63):
                found.append(FieldViolation("ingest.collector_id",
                                            "must be 1-63 lowercase letters, digits or '-' (a collector id)"))
        else:
            found.append(FieldViolation("destination", "name http or ingest"))
        if found:
            raise InvalidArgument(found)

    def replace(self, **changes: object) -> ForwardingTarget:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def check_event(idempotency_key: str, event_type: str) -> None:
    found: list[FieldViolation] = []
    if not _KEY.match(idempotency_key):
        found.append(FieldViolation("idempotency_key", "must be 1-200 printable ASCII characters, no spaces"))
    if not _EVENT_TYPE.match(event_type):
        found.append(FieldViolation("event_type", "must be 1-64 lowercase letters, digits, '.', '_' or '-'"))
    if found:
        raise InvalidArgument(found)
