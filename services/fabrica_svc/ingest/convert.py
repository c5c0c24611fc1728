"""Proto ⇄ domain for the ingest service. No SQL.

:func:`batch_from_proto` is on the hot path (every reading passes through it once). It is also the ONE
validation of a ``ReadingBatch``: StreamReadings opts out of the shared interceptor's protovalidate check
(``@validates_own_requests`` in servicer.py), and this loop reads each field of each reading once, checks
it against the rules written in ``fabrica/common/v1/reading.proto`` and builds the row tuple the store
COPYs, in the same pass. Its verdicts are protovalidate's: the same violations, with the same field paths
and descriptions, in the same order (tests/ingest/test_batch_validation.py generates thousands of valid
and invalid batches and compares both). It then checks what protovalidate cannot (a tag id or sequence
that does not fit Postgres' bigint, a timestamp outside Timestamp's range, NUL characters that Postgres
text cannot hold, a GOOD or STALE reading without a value); as before, those are reported only when no
rule of the protos is broken. A batch that fails any check is rejected whole with field violations, so
that one bad reading can never fail a transaction that also holds other streams' batches.

Measured (CPU time per reading, batches of 2,000 double readings, this machine): protovalidate 2.3 µs
plus the old conversion 1.4 µs, against 1.5 µs for this one pass; see benchmarks/ingest.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from buf.validate import validate_pb2
from google.protobuf import timestamp_pb2

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import committed_pb2, query_pb2, tag_event_pb2

from ..runtime.errors import FieldViolation, InvalidArgument
from ..runtime.validation import violations_of
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

# --- the rules of reading.proto, as protovalidate words them ------------------------------------------
# Each constant names the rule it stands for; tests/ingest/test_batch_validation.py checks every one of
# them against protovalidate on generated batches, so a rule changed in the proto and not here fails there.
_RULES = validate_pb2.field
_COLLECTOR_RULES = reading_pb2.ReadingBatch.DESCRIPTOR.fields_by_name["collector_id"].GetOptions().Extensions[
    _RULES].string
_COLLECTOR_PATTERN = re.compile(_COLLECTOR_RULES.pattern)
_MAX_READINGS = reading_pb2.ReadingBatch.DESCRIPTOR.fields_by_name["readings"].GetOptions().Extensions[
    _RULES].repeated.max_items
_QUALITIES = frozenset(v.number for v in reading_pb2.Quality.DESCRIPTOR.values) - {0}  # defined, not_in [0]
_DEFINED_QUALITIES = frozenset(v.number for v in reading_pb2.Quality.DESCRIPTOR.values)
_ROLES = frozenset(v.number for v in reading_pb2.TagRole.DESCRIPTOR.values)


def _rules(message: Any, name: str) -> Any:
    return message.DESCRIPTOR.fields_by_name[name].GetOptions().Extensions[_RULES]


_MAX_ERROR = _rules(reading_pb2.Reading, "error").string.max_len
_PLC_ID = _rules(reading_pb2.Reading, "plc_id").string
_MAX_STRING_BYTES = _rules(reading_pb2.Value, "string_value").string.max_bytes
_MAX_BYTES = _rules(reading_pb2.Value, "bytes_value").bytes.max_len
_GT_0 = "must be greater than 0"
_REQUIRED = "value is required"
_DEFINED = "value must be one of the defined enum values"


def _collector_id_violations(collector_id: str, path: str, out: list[FieldViolation]) -> None:
    """ReadingBatch.collector_id: string min_len, max_len (in characters) and pattern (matched as RE2 does:
    ``$`` is the end of the text, never before a final newline)."""
    n = len(collector_id)
    if n < _COLLECTOR_RULES.min_len:
        out.append(FieldViolation(path, f"must be at least {_COLLECTOR_RULES.min_len} characters"))
    if n > _COLLECTOR_RULES.max_len:
        out.append(FieldViolation(path, f"must be at most {_COLLECTOR_RULES.max_len} characters"))
    if _COLLECTOR_PATTERN.search(collector_id) is None or collector_id.endswith("\n"):
        out.append(FieldViolation(path, f"does not match regex pattern `{_COLLECTOR_RULES.pattern}`"))


def _reading_violations(r: reading_pb2.Reading, path: str, out: list[FieldViolation]) -> None:
    """Every rule of reading.proto that `r` breaks, in protovalidate's order (field number order). Only
    called for a reading the fast checks of :func:`batch_from_proto` found fault with."""
    if r.tag_id == 0:
        out.append(FieldViolation(f"{path}.tag_id", _GT_0))
    if not r.HasField("read_time"):
        out.append(FieldViolation(f"{path}.read_time", _REQUIRED))
    if r.HasField("value"):
        v = r.value
        kind = v.WhichOneof("kind")
        if kind is None:
            out.append(FieldViolation(f"{path}.value.kind", "exactly one field is required in oneof"))
        elif kind == "string_value" and len(v.string_value.encode()) > _MAX_STRING_BYTES:
            out.append(FieldViolation(f"{path}.value.string_value", f"must be at most {_MAX_STRING_BYTES} bytes"))
        elif kind == "bytes_value" and len(v.bytes_value) > _MAX_BYTES:
            out.append(FieldViolation(f"{path}.value.bytes_value", f"must be at most {_MAX_BYTES} bytes"))
    quality = r.quality
    if quality not in _DEFINED_QUALITIES:
        out.append(FieldViolation(f"{path}.quality", _DEFINED))
    elif quality == 0:
        out.append(FieldViolation(f"{path}.quality", "must not be in list [0]"))
    if len(r.error) > _MAX_ERROR:
        out.append(FieldViolation(f"{path}.error", f"must be at most {_MAX_ERROR} characters"))
    if len(r.plc_id) < _PLC_ID.min_len:
        out.append(FieldViolation(f"{path}.plc_id", f"must be at least {_PLC_ID.min_len} characters"))
    elif len(r.plc_id) > _PLC_ID.max_len:
        out.append(FieldViolation(f"{path}.plc_id", f"must be at most {_PLC_ID.max_len} characters"))
    if r.role not in _ROLES:
        out.append(FieldViolation(f"{path}.role", _DEFINED))


def batch_from_proto(batch: reading_pb2.ReadingBatch, prefix: str = "batch") -> WriteBatch:
    """Rows, events, newest row per tag and tag metadata of a batch, after checking it (see the module's
    docstring): InvalidArgument with every violation of the protos' rules if there are any, else with
    those of the checks only code can make (at most _MAX_VIOLATIONS of them)."""
    readings = batch.readings
    if len(readings) > _MAX_READINGS:  # alone, without looking at the items (runtime/validation.py)
        raise InvalidArgument(FieldViolation(f"{prefix}.readings", f"must contain no more than {_MAX_READINGS} "
                                                                   f"item(s), has {len(readings)}"))
    ruled: list[FieldViolation] = []  # broken rules of the protos, as protovalidate reports them
    violations: list[FieldViolation] = []  # what only code checks
    collector_id = batch.collector_id
    if (not _COLLECTOR_RULES.min_len <= len(collector_id) <= _COLLECTOR_RULES.max_len
            or _COLLECTOR_PATTERN.search(collector_id) is None or collector_id.endswith("\n")):
        _collector_id_violations(collector_id, f"{prefix}.collector_id", ruled)
    sequence = batch.sequence
    if sequence == 0:
        ruled.append(FieldViolation(f"{prefix}.sequence", _GT_0))
    elif sequence > MAX_BIGINT:
        violations.append(FieldViolation(f"{prefix}.sequence", "must be below 2^63"))
    if not readings:
        ruled.append(FieldViolation(f"{prefix}.readings", "must contain at least 1 item(s)"))
    rows: list[Any] = []
    events: list[Any] = []
    latest: dict[int, Any] = {}
    tags: dict[int, tuple[str, int]] = {}
    append = rows.append
    min_s, max_s = MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS  # timestamp_is_valid, inlined: per reading
    qualities, roles, event_roles = _QUALITIES, _ROLES, EVENT_ROLES
    plc_min, plc_max, max_error = _PLC_ID.min_len, _PLC_ID.max_len, _MAX_ERROR
    max_string_chars = _MAX_STRING_BYTES // 4  # at most 4 bytes of UTF-8 a character: shorter ones cannot be over
    for i, r in enumerate(readings):
        bad = False  # a rule of the protos is broken: _reading_violations says which, in protovalidate's words
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
        dv = v.double_value
        # A double_value that reads as nonzero (NaN too) is the member set: an unset member reads as 0.0. So
        # the usual reading skips WhichOneof (~600 instructions a reading, callgrind); a zero asks it.
        kind = "double_value" if dv else v.WhichOneof("kind")
        if kind == "double_value":
            row = (tag_id, read_us, quality, KIND_DOUBLE, dv, None, None, None, error)
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
            if len(sv) > max_string_chars and len(sv.encode()) > _MAX_STRING_BYTES:
                bad = True
            if "\x00" in sv:
                violations.append(FieldViolation(f"{prefix}.readings[{i}].value.string_value",
                                                 "must not contain NUL characters"))
            row = (tag_id, read_us, quality, KIND_STRING, None, None, sv, None, error)
        elif kind == "bytes_value":
            bv = v.bytes_value
            if len(bv) > _MAX_BYTES:
                bad = True
            row = (tag_id, read_us, quality, KIND_BYTES, None, None, None, bv, error)
        else:
            if r.HasField("value"):
                bad = True  # a Value with no member set
            elif quality == GOOD or quality == STALE:
                violations.append(FieldViolation(f"{prefix}.readings[{i}].value",
                                                 "a reading of GOOD or STALE quality must carry a value"))
            row = (tag_id, read_us, quality, KIND_NONE, None, None, None, None, error)
        if not 0 < tag_id <= MAX_BIGINT:
            if tag_id:
                violations.append(FieldViolation(f"{prefix}.readings[{i}].tag_id", "must be below 2^63"))
            else:
                bad = True
        if not (min_s <= seconds <= max_s and 0 <= nanos <= 999_999_999):
            violations.append(FieldViolation(f"{prefix}.readings[{i}].read_time",
                                             "must be a valid timestamp between years 1 and 9999"))
        elif seconds == 0 and nanos == 0 and not r.HasField("read_time"):
            bad = True  # required; a present zero (1970-01-01T00:00:00Z) is valid
        if quality not in qualities or role not in roles or not plc_min <= len(plc_id) <= plc_max:
            bad = True
        if error is not None:
            if len(error) > max_error:
                bad = True
            if "\x00" in error:
                violations.append(FieldViolation(f"{prefix}.readings[{i}].error", "must not contain NUL characters"))
        if "\x00" in plc_id:
            violations.append(FieldViolation(f"{prefix}.readings[{i}].plc_id", "must not contain NUL characters"))
        if bad:
            _reading_violations(r, f"{prefix}.readings[{i}]", ruled)
        append(row)
        prev = latest.get(tag_id)
        if prev is None:  # the tag's first reading in the batch: its plc_id and role are the tag's
            latest[tag_id] = row
            tags[tag_id] = (plc_id, role)
        elif prev[1] <= read_us:
            latest[tag_id] = row
        if role in event_roles:
            events.append((tag_id, plc_id, role, *row[1:8]))
    if batch.HasField("trace_context"):  # field 4, after the readings as protovalidate orders them; once a
        # batch, small: protovalidate itself checks it, so its verdict is protovalidate's by construction
        ruled.extend(violations_of(batch.trace_context, f"{prefix}.trace_context"))
    if ruled:
        raise InvalidArgument(ruled)
    if violations:
        raise InvalidArgument(violations[:_MAX_VIOLATIONS])
    return WriteBatch(collector_id, sequence, rows, events, latest, tags)


# --- StreamReadings' messages as received --------------------------------------------------------------

#: The tag of StreamReadingsRequest.batch on the wire: field 2, length-delimited.
_BATCH_TAG = (pb.StreamReadingsRequest.DESCRIPTOR.fields_by_name["batch"].number << 3) | 2


class ReceivedRequest:
    """A StreamReadingsRequest as grpcio handed it over (:func:`parse_stream_request`): the parsed message
    and, when the request is one ``batch`` field and nothing else, that field's bytes, which are the
    ReadingBatch exactly as the collector encoded it. The committed-readings feed stores those bytes, so a
    batch is not encoded again in ingest (``SerializeToString`` of a freshly parsed 2,000-reading batch
    costs ~0.2 µs a reading, more than the parse)."""

    __slots__ = ("message", "batch_bytes")

    def __init__(self, message: pb.StreamReadingsRequest, batch_bytes: bytes | None):
        self.message = message
        self.batch_bytes = batch_bytes


def batch_bytes_of(raw: bytes) -> bytes | None:
    """The payload of the ``batch`` field of the serialized StreamReadingsRequest `raw` if that field is
    all `raw` holds (its tag, its length as a varint, then exactly that many bytes); None otherwise (an
    open message, another field besides, the field twice), and the caller then encodes the parsed batch."""
    n = len(raw)
    if n < 2 or raw[0] != _BATCH_TAG:
        return None
    length = shift = 0
    i = 1
    while True:
        if i >= n or shift > 63:
            return None
        b = raw[i]
        i += 1
        length |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    return raw[i:] if i + length == n else None


def parse_stream_request(raw: bytes) -> ReceivedRequest:
    """StreamReadings' request deserializer (registered by servicer.add_to_server): the message, parsed
    as grpcio's generated deserializer does (raising on bytes that are not one), and its batch's bytes."""
    return ReceivedRequest(pb.StreamReadingsRequest.FromString(raw), batch_bytes_of(raw))


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
        tenant=row["tenant_id"],
    )
    value = value_from_row(row["kind"], row["value"], row["int_value"], row["text_value"], row["bytes_value"])
    if value is not None:
        e.value.CopyFrom(value)
    if row.get("traceparent"):
        e.trace_context.traceparent = row["traceparent"]
        e.trace_context.tracestate = row["tracestate"] or ""
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
                                           stored_readings=row["reading_count"], tenant=row["tenant_id"])
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
