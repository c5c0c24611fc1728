"""Plain rules of the ingest service. No gRPC, no asyncpg, no I/O (the contract's enum numbers come from
the generated protos).

Rows
----
A reading is stored as one narrow row (see ``READING_COLUMNS``)::

    (tag_id, read_us, quality, kind, value, int_value, text_value, bytes_value, error)

``read_us`` is microseconds since the Unix epoch (Postgres keeps microseconds, so this is exact).
``kind`` says which member of ``fabrica.common.v1.Value`` was set; it is the member's field number
(0 = no value). The typed value round-trips exactly:

=========  ==========================================  =======================================
kind       stored in                                   ``value`` (the numeric view, float8)
=========  ==========================================  =======================================
1 bool     ``value`` 0 or 1                            0.0 / 1.0
2 int64    ``int_value``                               float(v)
3 uint64   ``int_value``, the same 64 bits (two's      float(v)
           complement: 2^64-1 is stored as -1)
4 double   ``value``                                   v
5 string   ``text_value``                              NULL
6 bytes    ``bytes_value``                             NULL
=========  ==========================================  =======================================

Why a uint64 shares the bigint column instead of a ``numeric`` one: COPY of a bigint is a fixed 8 bytes,
``numeric`` is variable length and several times slower to encode and to aggregate, and the exact value
is only ever read back through ``kind`` (in SQL: ``int_value::numeric + 18446744073709551616`` when
``kind = 3 AND int_value < 0``). Aggregates and statistics use ``value``, the float8 view every numeric
kind has.

Exactly once, and the sequence rule
-----------------------------------
:func:`plan_group` decides, inside the transaction that holds the collectors' sequence rows, which
batches of a group are written, which are duplicates and which are refused: a batch at or below the
collector's committed sequence (including one written earlier in the same group) is a duplicate; the next
one written must be exactly committed + 1; one further ahead is refused (:func:`sequence_gap`), as is a
batch of a stream whose epoch is below the collector's stored epoch (:func:`epoch_fenced`). The stream
handler applies the same rule first to what it has seen of its own stream (so a far-ahead batch is refused
before it is even converted); the check here is the one that holds against every other stream and replica.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from fabrica.common.v1 import reading_pb2

from ..runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, PreconditionViolation
from ..runtime.timefmt import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS

# --- value kinds (the field numbers of fabrica.common.v1.Value's oneof) -------------------------------
_VALUE_FIELDS = reading_pb2.Value.DESCRIPTOR.fields_by_name
KIND_NONE = 0  # no member of the oneof set (no field has number 0)
KIND_BOOL = _VALUE_FIELDS["bool_value"].number
KIND_INT = _VALUE_FIELDS["int_value"].number
KIND_UINT = _VALUE_FIELDS["uint_value"].number
KIND_DOUBLE = _VALUE_FIELDS["double_value"].number
KIND_STRING = _VALUE_FIELDS["string_value"].number
KIND_BYTES = _VALUE_FIELDS["bytes_value"].number

QUALITY_GOOD = reading_pb2.QUALITY_GOOD
#: TagRole values whose readings also go to tag_events: production counter, scrap counter, machine state.
EVENT_ROLES = frozenset({
    reading_pb2.TAG_ROLE_PRODUCTION_COUNTER,
    reading_pb2.TAG_ROLE_SCRAP_COUNTER,
    reading_pb2.TAG_ROLE_MACHINE_STATE,
})

MAX_BIGINT = 2**63 - 1
_TWO64 = 2**64

READING_COLUMNS = (
    "tag_id", "read_time", "quality", "kind", "value", "int_value", "text_value", "bytes_value", "error",
)
EVENT_COLUMNS = (
    "tag_id", "plc_id", "role", "read_time", "quality", "kind", "value", "int_value", "text_value", "bytes_value",
)

#: (tag_id, read_us, quality, kind, value, int_value, text_value, bytes_value, error)
ReadingRow = tuple[int, int, int, int, float | None, int | None, str | None, bytes | None, str | None]
#: (tag_id, plc_id, role, read_us, quality, kind, value, int_value, text_value, bytes_value)
EventRow = tuple[int, str, int, int, int, int, float | None, int | None, str | None, bytes | None]


def uint_to_bigint(v: int) -> int:
    """The signed 64-bit integer with the same bits as the unsigned `v` (0 <= v < 2**64)."""
    return v - _TWO64 if v > MAX_BIGINT else v


def bigint_to_uint(v: int) -> int:
    return v & (_TWO64 - 1)


def micros_to_datetime(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def datetime_to_micros(t: datetime) -> int:
    delta = t - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# --- batches ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class WriteBatch:
    """One ReadingBatch, converted to rows and checked, ready for the writer."""

    collector_id: str
    sequence: int
    rows: list[ReadingRow]
    #: Readings of counter and machine-state tags, in batch order.
    events: list[EventRow] = field(default_factory=list)
    #: The newest row of each tag in the batch (ties: the later one).
    latest: dict[int, ReadingRow] = field(default_factory=dict)
    #: tag_id -> (plc_id, role) as the tag's first reading in the batch says (a change shows next batch).
    tags: dict[int, tuple[str, int]] = field(default_factory=dict)
    #: The epoch of the stream the batch came on (StreamOpen.epoch); set by the stream handler.
    epoch: int = 0
    #: The batch as received (the serialized ReadingBatch), for the committed-readings feed; set by the
    #: stream handler when the feed is on (store.py, "The committed-readings feed").
    payload: bytes | None = None
    #: The batch's W3C trace context (ReadingBatch.trace_context); set by the stream handler. Stored with its
    #: tag events when the trace is sampled (trace flags with bit 0 set), so production's booking joins the trace.
    traceparent: str = ""
    tracestate: str = ""
    #: The tenant whose rows these are: the tenant of the collector that streamed it (runtime/tenancy.py),
    #: set by the stream handler. The writer writes the batch under it (never across tenants).
    tenant: str = "default"

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class BatchOutcome:
    duplicate: bool
    written: int
    #: Why the batch was refused (nothing of it written), or None.
    refused: FailedPrecondition | None = None


def sequence_gap(collector_id: str, sequence: int, expected: int, committed: int) -> FailedPrecondition:
    """The error of a batch that does not follow the collector's sequence: FAILED_PRECONDITION with the
    expected sequence in the ErrorInfo metadata."""
    description = (f"batch {sequence} of collector {collector_id} does not follow its sequence: the next batch must "
                   f"be {expected} (committed {committed}, plus the batches of this stream ahead of it); nothing of "
                   "it was stored")
    return FailedPrecondition(
        description, reason="SEQUENCE_GAP",
        violations=[PreconditionViolation("SEQUENCE", f"collectors/{collector_id}", description)],
        metadata={"collector_id": collector_id, "sequence": str(sequence), "expected_sequence": str(expected),
                  "committed_sequence": str(committed)},
    )


def epoch_fenced(collector_id: str, epoch: int, stored: int) -> FailedPrecondition:
    """The error of a stream of an epoch below the collector's stored one (an old incarnation)."""
    description = (f"collector {collector_id} is at epoch {stored}: this stream's epoch {epoch} belongs to an older "
                   "incarnation and may not store any more (nothing of this batch was stored)")
    return FailedPrecondition(
        description, reason="EPOCH_FENCED",
        violations=[PreconditionViolation("EPOCH", f"collectors/{collector_id}", description)],
        metadata={"collector_id": collector_id, "epoch": str(epoch), "stored_epoch": str(stored)},
    )


@dataclass(frozen=True)
class GroupPlan:
    #: One outcome per batch, in group order.
    outcomes: list[BatchOutcome]
    #: New committed sequence of each collector whose sequence advanced.
    advanced: dict[str, int]

    @property
    def written(self) -> list[int]:
        """Indexes of the batches to write."""
        return [i for i, o in enumerate(self.outcomes) if not o.duplicate and o.refused is None]


def plan_group(committed: Mapping[str, tuple[int, int]], batches: Sequence[tuple[str, int, int, int]]) -> GroupPlan:
    """Which of `batches` ((collector_id, sequence, size, epoch) in group order) to write, given each
    collector's (committed sequence, epoch) read under lock. A batch of an epoch below the stored one is
    refused (fenced); one at or below its collector's committed sequence, or at or below a sequence written
    earlier in this group, is a duplicate; the next written must be exactly one above; one further ahead is
    refused (a gap)."""
    current = {c: seq for c, (seq, _) in committed.items()}
    outcomes = []
    advanced: dict[str, int] = {}
    for collector_id, sequence, size, epoch in batches:
        stored_epoch = committed.get(collector_id, (0, 0))[1]
        last = current.get(collector_id, 0)
        if epoch < stored_epoch:
            outcomes.append(BatchOutcome(False, 0, epoch_fenced(collector_id, epoch, stored_epoch)))
        elif sequence <= last:
            outcomes.append(BatchOutcome(duplicate=True, written=0))
        elif sequence != last + 1:
            outcomes.append(BatchOutcome(False, 0, sequence_gap(collector_id, sequence, last + 1, last)))
        else:
            current[collector_id] = sequence
            advanced[collector_id] = sequence
            outcomes.append(BatchOutcome(duplicate=False, written=size))
    return GroupPlan(outcomes, advanced)


def merge_latest(batches: Iterable[WriteBatch]) -> list[ReadingRow]:
    """The newest row per tag over `batches` (ties go to the later batch), sorted by tag_id so that
    concurrent transactions lock the `latest` rows in one order and cannot deadlock."""
    newest: dict[int, ReadingRow] = {}
    for batch in batches:
        for tag_id, row in batch.latest.items():
            prev = newest.get(tag_id)
            if prev is None or prev[1] <= row[1]:
                newest[tag_id] = row
    return [newest[t] for t in sorted(newest)]


class TagCache:
    """What this process last wrote to the `tags` table, so that tag metadata is upserted only when it is
    new or changed. Keyed by (tenant, tag_id): a tag's row is its tenant's. Bounded: past `max_size` entries
    it starts over (it is only a cache; the upsert itself is idempotent).

    With several replicas each has its own cache; a tag whose PLC flips back and forth between replicas
    may be left as the other replica wrote it until this one sees a change. Tags change PLC rarely, and
    the next change corrects it."""

    def __init__(self, max_size: int = 1_000_000):
        self.max_size = max_size
        self._known: dict[tuple[str, int], tuple[str, int]] = {}

    def changes(self, batches: Iterable[WriteBatch]) -> list[tuple[str, int, str, int]]:
        """(tenant, tag_id, plc_id, role) of tags new or changed in `batches`, sorted by tenant and tag_id."""
        merged: dict[tuple[str, int], tuple[str, int]] = {}
        for batch in batches:
            tenant = batch.tenant
            for tag_id, info in batch.tags.items():
                merged[(tenant, tag_id)] = info
        known = self._known
        return sorted((*key, *info) for key, info in merged.items() if known.get(key) != info)

    def remember(self, changes: Iterable[tuple[str, int, str, int]]) -> None:
        """Call after the transaction that wrote `changes` committed."""
        changes = list(changes)
        if len(self._known) + len(changes) > self.max_size:
            self._known.clear()
        for tenant, tag_id, plc_id, role in changes:
            self._known[(tenant, tag_id)] = (plc_id, role)

    def __len__(self) -> int:
        return len(self._known)


# --- history queries ----------------------------------------------------------------------------------

MAX_PAGE_SIZE = 10_000
DEFAULT_PAGE_SIZE = 1_000
#: A page or an export chunk stops early past this many bytes of readings (clients' default limit is 4 MiB).
MAX_RESPONSE_BYTES = 3 * 1024 * 1024
EXPORT_CHUNK_ROWS = 5_000
#: Hard limit of (tags × buckets) an AggregateReadings call may cover: the answer is not paged.
MAX_BUCKETS = 50_000


@dataclass(frozen=True)
class PageCursor:
    """Position after the last row returned: rows are ordered by (read_time, tag_id, row position), where
    the row position (the row's ctid: block, offset) only breaks ties between readings of one tag with the
    same timestamp, so that a page boundary between them neither repeats nor skips one.

    In a page token (runtime.pages) the cursor is the position, ``read_us,tag_id,block,offset``, and the
    filter's fingerprint is the query."""

    read_us: int
    tag_id: int
    block: int
    offset: int

    def position(self) -> str:
        return f"{self.read_us},{self.tag_id},{self.block},{self.offset}"

    @classmethod
    def from_position(cls, position: str) -> PageCursor:
        """The cursor :meth:`position` wrote; InvalidArgument(page_token) for anything else, including
        numbers no row can have (so a forged token never reaches the query)."""
        parts = position.split(",")
        if len(parts) != 4 or not all(_INTEGER.fullmatch(p) for p in parts):
            raise InvalidArgument(_BAD_TOKEN)
        cursor = cls(*(int(p) for p in parts))
        if not (_MIN_READ_US <= cursor.read_us <= _MAX_READ_US and 0 <= cursor.tag_id <= MAX_BIGINT
                and 0 <= cursor.block < 2**32 and 0 <= cursor.offset < 2**16):
            raise InvalidArgument(_BAD_TOKEN)
        return cursor


_INTEGER = re.compile(r"-?[0-9]{1,19}")
_MIN_READ_US = MIN_TIMESTAMP_SECONDS * 1_000_000
_MAX_READ_US = MAX_TIMESTAMP_SECONDS * 1_000_000 + 999_999
_BAD_TOKEN = FieldViolation("page_token", "not a page token of this query; start without one")


def filter_fingerprint(filter_bytes: bytes) -> str:
    """The page-token query of a ReadingFilter (its deterministic encoding): a token is bound to its filter."""
    return f"readings:{zlib.crc32(filter_bytes):08x}"


def check_bucket_count(range_seconds: float, bucket_seconds: int, tag_count: int) -> None:
    buckets = math.ceil(range_seconds / bucket_seconds) * max(tag_count, 1)
    if buckets > MAX_BUCKETS:
        raise InvalidArgument(FieldViolation(
            "bucket_seconds",
            f"{max(tag_count, 1)} tag(s) over this range make up to {buckets} buckets, more than {MAX_BUCKETS};"
            " use wider buckets, a shorter range or fewer tags",
        ))


# --- partitions ---------------------------------------------------------------------------------------

PARTITION_PREFIX = "readings_p"


def partition_name(day: date) -> str:
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def partition_day(name: str) -> date | None:
    """The day of a partition named by :func:`partition_name`, else None."""
    if not name.startswith(PARTITION_PREFIX):
        return None
    try:
        return datetime.strptime(name[len(PARTITION_PREFIX):], "%Y%m%d").date()
    except ValueError:
        return None


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def days_ahead(now: datetime, ahead: int) -> list[date]:
    """Today (UTC) and the `ahead` days after it."""
    today = now.astimezone(UTC).date()
    return [today + timedelta(days=i) for i in range(ahead + 1)]


def retention_cutoff(now: datetime, retention_days: int) -> datetime | None:
    """Readings before this instant may be dropped (a day boundary, UTC); None keeps everything."""
    if retention_days <= 0:
        return None
    start, _ = day_bounds(now.astimezone(UTC).date() - timedelta(days=retention_days))
    return start


def expired_partitions(names: Iterable[str], cutoff: datetime | None) -> list[str]:
    """Partitions (named by :func:`partition_name`) that end at or before `cutoff`."""
    if cutoff is None:
        return []
    out = []
    for name in names:
        day = partition_day(name)
        if day is not None and day_bounds(day)[1] <= cutoff:
            out.append(name)
    return sorted(out)
