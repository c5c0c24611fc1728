"""Proto ⇄ domain for the ingest service. No SQL.

:func:`batch_from_proto` is on the hot path (every reading passes through it once): it reads each field
once, builds the row tuple the store COPYs, and checks what protovalidate cannot (a tag id or sequence
that does not fit Postgres' bigint, a timestamp outside Timestamp's range, NUL characters that Postgres
text cannot hold). A batch that fails any check is rejected whole with field violations, so that one bad
reading can never fail a transaction that also holds other streams' batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import committed_pb2, query_pb2, tag_event_pb2

from ..runtime.errors import FieldViolation, InvalidArgument
from ..runtime.timefmt import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS, timestamp_from_datetime, timestamp_is_valid
from .domain import (
    EVENT_ROLES,
    KIND_BOOL,
    KIND_BYTES,
    KIND_DOUBLE,
    KIND_INT,
    KIND_NONE,
    KIND_STRING,
    KIND_UINT,
    MAX_BIGINT,
    WriteBatch,
    bigint_to_uint,
)

_MAX_VIOLATIONS = 50
_TWO64 = 2**64
GOOD, STALE = reading_pb2.QUALITY_GOOD, reading_pb2.QUALITY_STALE


def batch_from_proto(batch: reading_pb2.ReadingBatch, prefix: str = "batch") -> WriteBatch:
    """Rows, events, newest row per tag and tag metadata of a (protovalidate-checked) batch."""
    violations: list[FieldViolation] = []
    if batch.sequence > MAX_BIGINT:
        violations.append(FieldViolation(f"{prefix}.sequence", "must be below 2^63"))
    rows: list[Any] = []
    events: list[Any] = []
    latest: dict[int, Any] = {}
    tags: dict[int, tuple[str, int]] = {}
    append = rows.append
    min_s, max_s = MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS  # timestamp_is_valid, inlined: per reading
    for i, r in enumerate(batch.readings):
        tag_id = r.tag_id
        ts = r.read_time
        seconds = ts.seconds
        nanos = ts.nanos
        read_us = seconds * 1_000_000 + nanos // 1000
        quality = r.quality
        error = r.error or None
        plc_id = r.plc_id
        role = r.role
        v = r.value
        kind = v.WhichOneof("kind")
        if kind == "double_value":
            row = (tag_id, read_us, quality, KIND_DOUBLE, v.double_value, None, None, None, error)
        elif kind == "int_value":
            iv = v.int_value
            row = (tag_id, read_us, quality, KIND_INT, float(iv), iv, None, None, error)
        elif kind == "uint_value":
            uv = v.uint_value
            row = (tag_id, read_us, quality, KIND_UINT, float(uv), uv - _TWO64 if uv > MAX_BIGINT else uv,
                   None, None, error)
        elif kind == "bool_value":
            row = (tag_id, read_us, quality, KIND_BOOL, 1.0 if v.bool_value else 0.0, None, None, None, error)
        elif kind == "string_value":
            sv = v.string_value
            if "\x00" in sv:
                violations.append(FieldViolation(f"{prefix}.readings[{i}].value.string_value",
                                                 "must not contain NUL characters"))
            row = (tag_id, read_us, quality, KIND_STRING, None, None, sv, None, error)
        elif kind == "bytes_value":
            row = (tag_id, read_us, quality, KIND_BYTES, None, None, None, v.bytes_value, error)
        else:
            if quality == GOOD or quality == STALE:
                violations.append(FieldViolation(f"{prefix}.readings[{i}].value",
                                                 "a reading of GOOD or STALE quality must carry a value"))
            row = (tag_id, read_us, quality, KIND_NONE, None, None, None, None, error)
        if tag_id > MAX_BIGINT:
            violations.append(FieldViolation(f"{prefix}.readings[{i}].tag_id", "must be below 2^63"))
        if not (min_s <= seconds <= max_s and 0 <= nanos <= 999_999_999):
            violations.append(FieldViolation(f"{prefix}.readings[{i}].read_time",
                                             "must be a valid timestamp between years 1 and 9999"))
        if error is not None and "\x00" in error:
            violations.append(FieldViolation(f"{prefix}.readings[{i}].error", "must not contain NUL characters"))
        if "\x00" in plc_id:
            violations.append(FieldViolation(f"{prefix}.readings[{i}].plc_id", "must not contain NUL characters"))
        append(row)
        prev = latest.get(tag_id)
        if prev is None:  # the tag's first reading in the batch: its plc_id and role are the tag's
            latest[tag_id] = row
            tags[tag_id] = (plc_id, role)
        elif prev[1] <= read_us:
            latest[tag_id] = row
        if role in EVENT_ROLES:
            events.append((tag_id, plc_id, role, *row[1:8]))
        if violations and len(violations) >= _MAX_VIOLATIONS:
            break
    if violations:
        raise InvalidArgument(violations)
    return WriteBatch(batch.collector_id, batch.sequence, rows, events, latest, tags)


# --- requests -----------------------------------------------------------------------------------------


def check_timestamp(ts: timestamp_pb2.Timestamp, path: str, out: list[FieldViolation]) -> None:
    if not timestamp_is_valid(ts.seconds, ts.nanos):
        out.append(FieldViolation(path, "must be a valid timestamp between years 1 and 9999"))


def check_tag_ids(tag_ids: Sequence[int], path: str, out: list[FieldViolation]) -> None:
    for i, t in enumerate(tag_ids):
        if t > MAX_BIGINT:
            out.append(FieldViolation(f"{path}[{i}]", "must be below 2^63"))


def check_filter(f: query_pb2.ReadingFilter, prefix: str = "filter") -> None:
    found: list[FieldViolation] = []
    check_timestamp(f.start_time, f"{prefix}.start_time", found)
    check_timestamp(f.end_time, f"{prefix}.end_time", found)
    check_tag_ids(f.tag_ids, f"{prefix}.tag_ids", found)
    if found:
        raise InvalidArgument(found)


def tag_infos_from_proto(request: pb.SyncTagsRequest) -> list[tuple[int, str, str, str, int]]:
    """(tag_id, plc_id, name, unit, role) per tag of a (protovalidate-checked) SyncTags request; a tag id
    given twice is INVALID_ARGUMENT (the set would say two things of one tag)."""
    seen: dict[int, int] = {}
    violations: list[FieldViolation] = []
    out = []
    for i, t in enumerate(request.tags):
        first = seen.setdefault(t.tag_id, i)
        if first != i and len(violations) < _MAX_VIOLATIONS:
            violations.append(FieldViolation(f"tags[{i}].tag_id", f"tag {t.tag_id} is already tags[{first}]"))
        out.append((t.tag_id, t.plc_id, t.name, t.unit, t.role))
    if violations:
        raise InvalidArgument(violations)
    return out


# --- responses ----------------------------------------------------------------------------------------


def value_from_row(kind: int, value: float | None, int_value: int | None, text_value: str | None,
                   bytes_value: bytes | None) -> reading_pb2.Value | None:
    if kind == KIND_DOUBLE:
        return reading_pb2.Value(double_value=value)
    if kind == KIND_INT:
        return reading_pb2.Value(int_value=int_value)
    if kind == KIND_UINT:
        return reading_pb2.Value(uint_value=bigint_to_uint(int_value or 0))
    if kind == KIND_BOOL:
        return reading_pb2.Value(bool_value=bool(value))
    if kind == KIND_STRING:
        return reading_pb2.Value(string_value=text_value or "")
    if kind == KIND_BYTES:
        return reading_pb2.Value(bytes_value=bytes_value or b"")
    return None


def reading_from_row(row: Mapping[str, Any]) -> reading_pb2.Reading:
    """A Reading from a row with the reading columns plus plc_id and role (from tags) and tag_name and unit
    (from tag_metadata); each of these may be NULL."""
    r = reading_pb2.Reading(
        tag_id=row["tag_id"],
        read_time=timestamp_from_datetime(row["read_time"]),
        quality=row["quality"],
        error=row["error"] or "",
        plc_id=row["plc_id"] or "",
        role=row["role"] or reading_pb2.TAG_ROLE_UNSPECIFIED,
        tag_name=row["tag_name"] or "",
        unit=row["unit"] or "",
    )
    value = value_from_row(row["kind"], row["value"], row["int_value"], row["text_value"], row["bytes_value"])
    if value is not None:
        r.value.CopyFrom(value)
    return r


def readings_from_rows(rows: Iterable[Mapping[str, Any]], max_bytes: int) -> tuple[list[reading_pb2.Reading], int]:
    """Readings from `rows`, stopping once their encoded size passes `max_bytes` (at least one is always
    taken). Returns the readings and how many rows were used."""
    out = []
    size = 0
    for row in rows:
        r = reading_from_row(row)
        out.append(r)
        size += r.ByteSize() + 4
        if size >= max_bytes:
            break
    return out, len(out)


def tag_event_from_row(row: Mapping[str, Any]) -> tag_event_pb2.TagEvent:
    e = tag_event_pb2.TagEvent(
        cursor=row["cursor"],
        tag_id=row["tag_id"],
        plc_id=row["plc_id"],
        role=row["role"],
        quality=row["quality"],
        read_time=timestamp_from_datetime(row["read_time"]),
    )
    value = value_from_row(row["kind"], row["value"], row["int_value"], row["text_value"], row["bytes_value"])
    if value is not None:
        e.value.CopyFrom(value)
    return e


def bucket_from_row(row: Mapping[str, Any]) -> query_pb2.ReadingBucket:
    nan = float("nan")

    def num(key: str) -> float:
        v = row[key]
        return nan if v is None else float(v)

    return query_pb2.ReadingBucket(
        tag_id=row["tag_id"],
        start_time=timestamp_from_datetime(row["bucket"]),
        count=row["n"],
        min=num("min"),
        max=num("max"),
        avg=num("avg"),
        first=num("first"),
        last=num("last"),
    )


# --- the committed-readings feed ----------------------------------------------------------------------


@dataclass(frozen=True)
class FeedFilter:
    """What a WatchCommittedReadings asked for: readings of these PLCs and/or tags (both: readings that
    match both, as WatchTagEvents); None is "any"."""

    plc_ids: frozenset[str] | None
    tag_ids: frozenset[int] | None

    @classmethod
    def of(cls, plc_ids: Iterable[str], tag_ids: Iterable[int]) -> FeedFilter:
        return cls(frozenset(plc_ids) or None, frozenset(tag_ids) or None)

    def committed_batch(self, row: Mapping[str, Any]) -> committed_pb2.CommittedBatch | None:
        """The CommittedBatch of a feed row, narrowed to the readings asked for; None if none is left."""
        out = committed_pb2.CommittedBatch(cursor=row["cursor"], commit_time=timestamp_from_datetime(row["commit_time"]),
                                           stored_readings=row["reading_count"])
        plcs, tags = self.plc_ids, self.tag_ids
        if plcs is None and tags is None:
            out.batch.MergeFromString(row["payload"])
            return out
        batch = reading_pb2.ReadingBatch.FromString(row["payload"])
        kept = [r for r in batch.readings if (plcs is None or r.plc_id in plcs) and (tags is None or r.tag_id in tags)]
        if not kept:
            return None
        if len(kept) == len(batch.readings):
            out.batch.CopyFrom(batch)
        else:
            out.batch.collector_id = batch.collector_id
            out.batch.sequence = batch.sequence
            out.batch.readings.extend(kept)
        return out
