"""Conversions between protobuf Timestamp/Duration and Python times, one set for every service.

Datetimes are always timezone-aware UTC; nanosecond integers are since the Unix epoch.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

#: The range protobuf's Timestamp allows: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def timestamp_is_valid(seconds: int, nanos: int) -> bool:
    """True where (seconds, nanos) is a Timestamp protobuf can convert (years 1..9999, 0 <= nanos < 1e9)."""
    return MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS and 0 <= nanos <= 999_999_999


def timestamp_from_datetime(t: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def to_datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def optional_datetime(msg: Any, field: str) -> datetime | None:
    """The datetime of `msg.field`, or None when the field is not set."""
    return to_datetime(getattr(msg, field)) if msg.HasField(field) else None


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    """Fill a Timestamp field from `value`; leave it unset for None."""
    if value is not None:
        target.FromDatetime(value)


def duration_from_seconds(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def seconds_of(duration: duration_pb2.Duration, default: float) -> float:
    """A Duration in seconds; `default` when it is zero or negative (not set)."""
    value = duration.ToTimedelta().total_seconds()
    return value if value > 0 else default
