"""All SQL of the production service (schema ``production``).

Master data (sectors, work centres, items, defect codes, downtime reasons) are plain rows; each write takes
the next value of one sequence as the row's revision, and the etag is made from it. A work centre's bound
tags are also rows of ``tag_bindings`` (primary key: the tag), so a tag is bound once, in one role, and
the event consumer finds its work centre with one lookup.

Orders: every change to an order (state, quantities) takes the next value of a one-row revision counter
whose row lock is held to commit, and writes it on the order. Revisions therefore commit in order: a
watcher that has read every change up to R never later sees one below R appear. Orders are never
deleted, so "what changed after R" is simply the orders whose revision is above R; each change is also
announced with NOTIFY (delivered on commit) so a watcher on any replica learns of it. Every transaction
that writes orders takes that row lock first and the order rows second, so they cannot deadlock.

An order's runs (``order_runs``: from start or resume to pause, completion or cancellation) say which
order a counter increment belongs to: the one whose run covers the reading's time. A late event (the
consumer was behind) is so booked to the order that was running when the parts were made, not to
whatever runs when it is processed.

The tag-event consumer applies one ``WatchTagEventsResponse`` per transaction, which also moves the
stored cursor (``consumer_cursor``) past it: replays and restarts never book twice. The cursor row is
locked first, and events at or below the stored cursor are skipped, so even two consumers that somehow
ran at once could not book an event twice; the unique index on ``bookings.source_cursor`` is a last
guard. Counter baselines (``counter_state``) and machine states (``machine_state``) are per work centre.
"""

from __future__ import annotations

import base64
import binascii
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import tag_event_pb2
from fabrica.production.v1 import master_data_pb2, order_pb2
from google.protobuf import duration_pb2, message

from ..runtime.db import Migration
from ..runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
)
from . import domain
from .domain import OrderAction, OrderState
from .resources import DEFECT_CODE, DOWNTIME_REASON, ITEM, SECTOR, WORK_CENTER, Kind, tag_bindings

log = logging.getLogger(__name__)

CHANNEL = "fabrica_production_orders"
#: Key of the session advisory lock that elects the one replica consuming tag events.
CONSUMER_LOCK_KEY = zlib.crc32(b"fabrica.production.tag-event-consumer") - 2**31
#: Closed orders the first WatchOrders message still shows.
CLOSED_ORDERS_SHOWN = timedelta(hours=24)

_OPEN_STATES = [int(OrderState.PLANNED), int(OrderState.IN_PROGRESS), int(OrderState.PAUSED)]
_COUNTER_ROLES = (reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, reading_pb2.TAG_ROLE_SCRAP_COUNTER)
_MAX_INT64 = 2**63 - 1

MIGRATIONS = [
    Migration(
        1,
        "master data, orders, runs, bookings, defects, downtime, consumer state",
        """
        CREATE SEQUENCE master_revision;

        CREATE TABLE sectors (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );

        CREATE TABLE work_centers (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            sector_id text NOT NULL REFERENCES sectors (id),
            plc_id text NOT NULL,
            production_counter_tag_id bigint NOT NULL,
            scrap_counter_tag_id bigint NOT NULL,
            machine_state_tag_id bigint NOT NULL,
            counter_width integer NOT NULL,
            max_counter_jump bigint NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );
        CREATE INDEX work_centers_sector ON work_centers (sector_id, id);

        -- The tags work centres bind: a tag is bound once, in one role (fabrica.common.v1.TagRole).
        CREATE TABLE tag_bindings (
            tag_id bigint PRIMARY KEY,
            work_center_id text NOT NULL REFERENCES work_centers (id) ON DELETE CASCADE,
            role smallint NOT NULL
        );
        CREATE INDEX tag_bindings_work_center ON tag_bindings (work_center_id);

        CREATE TABLE items (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            ideal_cycle_nanos bigint NOT NULL CHECK (ideal_cycle_nanos > 0),
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );

        CREATE TABLE defect_codes (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            severity smallint NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );

        CREATE TABLE downtime_reasons (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            color text NOT NULL,
            counts_against_availability boolean NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );

        CREATE TABLE order_revision (
            only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            value bigint NOT NULL
        );
        INSERT INTO order_revision VALUES (true, 0);

        CREATE TABLE orders (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            number text NOT NULL UNIQUE,
            item_id text NOT NULL REFERENCES items (id),
            work_center_id text NOT NULL REFERENCES work_centers (id),
            planned_quantity bigint NOT NULL CHECK (planned_quantity >= 1),
            state smallint NOT NULL CHECK (state BETWEEN 1 AND 5),
            good_quantity bigint NOT NULL DEFAULT 0 CHECK (good_quantity >= 0),
            scrap_quantity bigint NOT NULL DEFAULT 0 CHECK (scrap_quantity >= 0),
            start_time timestamptz,
            end_time timestamptz,
            cancel_reason text NOT NULL DEFAULT '',
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );
        -- One running order per work centre, whatever the code above does.
        CREATE UNIQUE INDEX orders_one_in_progress ON orders (work_center_id) WHERE state = 2;
        CREATE INDEX orders_revision ON orders (revision);
        CREATE INDEX orders_work_center ON orders (work_center_id, id);
        CREATE INDEX orders_item ON orders (item_id);
        CREATE INDEX orders_open ON orders (id) WHERE state IN (1, 2, 3);

        -- From each start or resume to the pause, completion or cancellation that ends it.
        CREATE TABLE order_runs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            order_id bigint NOT NULL REFERENCES orders (id),
            work_center_id text NOT NULL,
            start_time timestamptz NOT NULL,
            end_time timestamptz
        );
        CREATE INDEX order_runs_work_center ON order_runs (work_center_id, start_time);
        CREATE UNIQUE INDEX order_runs_one_open ON order_runs (order_id) WHERE end_time IS NULL;

        CREATE TABLE bookings (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            order_id bigint NOT NULL REFERENCES orders (id),
            good_quantity bigint NOT NULL,
            scrap_quantity bigint NOT NULL,
            source smallint NOT NULL,
            book_time timestamptz NOT NULL,
            note text NOT NULL DEFAULT '',
            source_cursor bigint,
            source_tag_id bigint,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX bookings_order ON bookings (order_id, id);
        CREATE INDEX bookings_order_time ON bookings (order_id, book_time);
        -- Each tag event books at most once.
        CREATE UNIQUE INDEX bookings_source_cursor ON bookings (source_cursor) WHERE source_cursor IS NOT NULL;

        CREATE TABLE defects (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            order_id bigint NOT NULL REFERENCES orders (id),
            defect_code_id text NOT NULL REFERENCES defect_codes (id),
            quantity bigint NOT NULL CHECK (quantity > 0),
            note text NOT NULL DEFAULT '',
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX defects_order ON defects (order_id, id);

        CREATE TABLE downtimes (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            work_center_id text NOT NULL REFERENCES work_centers (id),
            order_id bigint REFERENCES orders (id),
            start_time timestamptz NOT NULL,
            end_time timestamptz CHECK (end_time >= start_time),
            reason_id text REFERENCES downtime_reasons (id),
            note text NOT NULL DEFAULT '',
            automatic boolean NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX downtimes_work_center ON downtimes (work_center_id, start_time DESC, id DESC);
        CREATE UNIQUE INDEX downtimes_one_open_automatic ON downtimes (work_center_id)
            WHERE automatic AND end_time IS NULL;

        -- Idempotent creates: the first request with a key records what it made.
        CREATE TABLE create_requests (
            kind text NOT NULL,
            request_id text NOT NULL,
            resource_id text,
            create_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (kind, request_id)
        );

        -- The last WatchTagEvents cursor whose events are applied.
        CREATE TABLE consumer_cursor (
            only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            cursor bigint NOT NULL,
            update_time timestamptz NOT NULL
        );
        INSERT INTO consumer_cursor VALUES (true, 0, now());

        -- Last counter value seen per work centre and tag: the baseline of the next delta. numeric: a
        -- 64-bit counter does not fit a bigint.
        CREATE TABLE counter_state (
            work_center_id text NOT NULL REFERENCES work_centers (id) ON DELETE CASCADE,
            tag_id bigint NOT NULL,
            value numeric(20, 0) NOT NULL,
            cursor bigint NOT NULL,
            read_time timestamptz NOT NULL,
            PRIMARY KEY (work_center_id, tag_id)
        );

        CREATE TABLE machine_state (
            work_center_id text PRIMARY KEY REFERENCES work_centers (id) ON DELETE CASCADE,
            tag_id bigint NOT NULL,
            running boolean NOT NULL,
            cursor bigint NOT NULL,
            read_time timestamptz NOT NULL
        );

        -- Counter jumps (flagged, not booked) and values that are not counts or states. Kept after the
        -- work centre is gone: they are a record.
        CREATE TABLE tag_anomalies (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            work_center_id text NOT NULL,
            tag_id bigint NOT NULL,
            cursor bigint NOT NULL,
            kind text NOT NULL,
            previous_value numeric(20, 0),
            value text NOT NULL,
            note text NOT NULL,
            read_time timestamptz NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX tag_anomalies_work_center ON tag_anomalies (work_center_id, id);
        """,
    ),
]


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def etag_of(revision: int) -> str:
    return f"r{revision}"


def encode_page_token(query: str, last: str) -> str:
    return base64.urlsafe_b64encode(f"v1\0{query}\0{last}".encode()).decode()


def decode_page_token(token: str, query: str) -> str:
    """The position a token stands for; INVALID_ARGUMENT if it is not ours or belongs to another query."""
    try:
        version, owner, last = base64.urlsafe_b64decode(token.encode()).decode().split("\0")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument(FieldViolation("page_token", "not a token this service issued")) from None
    if version != "v1" or owner != query:
        raise InvalidArgument(FieldViolation("page_token", "the token belongs to a different query"))
    return last


def parse_id(text: str, what: str) -> int:
    """A service-assigned id (a positive integer in text). Anything else names nothing: NOT_FOUND."""
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= _MAX_INT64:
        raise NotFound(f"no {what} with id {text!r}", metadata={f"{what.replace(' ', '_')}_id": text})
    return int(text)


def _ts(msg_field, value: datetime | None) -> None:  # noqa: ANN001 - a Timestamp field
    if value is not None:
        msg_field.FromDatetime(value)


def _precondition(kind: str, subject: str, description: str, reason: str, **metadata: str) -> FailedPrecondition:
    return FailedPrecondition(description, reason=reason, metadata=metadata,
                              violations=[PreconditionViolation(type=kind, subject=subject, description=description)])


def _missing(kind: Kind, resource_id: str) -> FailedPrecondition:
    return _precondition(kind.field.upper(), f"{kind.collection}/{resource_id}",
                         f"{kind.name} {resource_id!r} does not exist", f"{kind.field.upper()}_NOT_FOUND",
                         **{f"{kind.field}_id": resource_id})


def _stale(kind: Kind, resource_id: str, given: str, current: str) -> Aborted:
    return Aborted(f"{kind.name} {resource_id!r} changed since it was read (etag {given}, now {current}); "
                   "read it again and retry", reason="ETAG_MISMATCH",
                   metadata={f"{kind.field}_id": resource_id, "etag": current})


# --------------------------------------------------------------------------------------------------------------
# Master data: rows <-> messages
# --------------------------------------------------------------------------------------------------------------


def _common(msg: message.Message, row: asyncpg.Record) -> message.Message:
    msg.etag = etag_of(row["revision"])  # type: ignore[attr-defined]
    msg.create_time.FromDatetime(row["create_time"])  # type: ignore[attr-defined]
    msg.update_time.FromDatetime(row["update_time"])  # type: ignore[attr-defined]
    return msg


def _sector(row: asyncpg.Record) -> master_data_pb2.Sector:
    return _common(master_data_pb2.Sector(id=row["id"], display_name=row["display_name"]), row)


def _work_center(row: asyncpg.Record) -> master_data_pb2.WorkCenter:
    return _common(master_data_pb2.WorkCenter(
        id=row["id"], display_name=row["display_name"], sector_id=row["sector_id"], plc_id=row["plc_id"],
        production_counter_tag_id=row["production_counter_tag_id"], scrap_counter_tag_id=row["scrap_counter_tag_id"],
        machine_state_tag_id=row["machine_state_tag_id"], counter_width=row["counter_width"],
        max_counter_jump=row["max_counter_jump"]), row)


def _item(row: asyncpg.Record) -> master_data_pb2.Item:
    item = master_data_pb2.Item(id=row["id"], display_name=row["display_name"])
    item.ideal_cycle_time.FromNanoseconds(row["ideal_cycle_nanos"])
    return _common(item, row)


def _defect_code(row: asyncpg.Record) -> master_data_pb2.DefectCode:
    return _common(master_data_pb2.DefectCode(id=row["id"], display_name=row["display_name"],
                                              severity=row["severity"]), row)


def _downtime_reason(row: asyncpg.Record) -> master_data_pb2.DowntimeReason:
    return _common(master_data_pb2.DowntimeReason(
        id=row["id"], display_name=row["display_name"], color=row["color"],
        counts_against_availability=row["counts_against_availability"]), row)


def _nanos(d: duration_pb2.Duration) -> int:
    return d.ToNanoseconds()


@dataclass(frozen=True)
class _Table:
    kind: Kind
    table: str
    columns: tuple[str, ...]
    values: Callable[[message.Message], tuple[object, ...]]
    from_row: Callable[[asyncpg.Record], message.Message]


_TABLES: dict[str, _Table] = {
    t.kind.field: t
    for t in (
        _Table(SECTOR, "sectors", ("display_name",), lambda m: (m.display_name,), _sector),
        _Table(WORK_CENTER, "work_centers",
               ("display_name", "sector_id", "plc_id", "production_counter_tag_id", "scrap_counter_tag_id",
                "machine_state_tag_id", "counter_width", "max_counter_jump"),
               lambda m: (m.display_name, m.sector_id, m.plc_id, m.production_counter_tag_id, m.scrap_counter_tag_id,
                          m.machine_state_tag_id, m.counter_width, m.max_counter_jump),
               _work_center),
        _Table(ITEM, "items", ("display_name", "ideal_cycle_nanos"),
               lambda m: (m.display_name, _nanos(m.ideal_cycle_time)), _item),
        _Table(DEFECT_CODE, "defect_codes", ("display_name", "severity"),
               lambda m: (m.display_name, int(m.severity)), _defect_code),
        _Table(DOWNTIME_REASON, "downtime_reasons", ("display_name", "color", "counts_against_availability"),
               lambda m: (m.display_name, m.color, m.counts_against_availability), _downtime_reason),
    )
}

#: What a foreign key from each table means when it blocks a delete.
_USED_BY = {
    "work_centers": "work centres", "orders": "orders", "downtimes": "downtime records", "defects": "defect records",
}


# --------------------------------------------------------------------------------------------------------------
# Orders and what hangs off them: rows <-> messages
# --------------------------------------------------------------------------------------------------------------


def _order(row: asyncpg.Record) -> order_pb2.Order:
    o = order_pb2.Order(
        id=str(row["id"]), number=row["number"], item_id=row["item_id"], work_center_id=row["work_center_id"],
        planned_quantity=row["planned_quantity"], state=row["state"], good_quantity=row["good_quantity"],
        scrap_quantity=row["scrap_quantity"], etag=etag_of(row["revision"]),
    )
    _ts(o.start_time, row["start_time"])
    _ts(o.end_time, row["end_time"])
    o.create_time.FromDatetime(row["create_time"])
    o.update_time.FromDatetime(row["update_time"])
    return o


def _booking(row: asyncpg.Record) -> order_pb2.Booking:
    b = order_pb2.Booking(id=str(row["id"]), order_id=str(row["order_id"]), good_quantity=row["good_quantity"],
                          scrap_quantity=row["scrap_quantity"], source=row["source"], note=row["note"])
    b.book_time.FromDatetime(row["book_time"])
    return b


def _defect(row: asyncpg.Record) -> order_pb2.Defect:
    d = order_pb2.Defect(id=str(row["id"]), order_id=str(row["order_id"]), defect_code_id=row["defect_code_id"],
                         quantity=row["quantity"], note=row["note"])
    d.create_time.FromDatetime(row["create_time"])
    return d


def _downtime(row: asyncpg.Record) -> order_pb2.Downtime:
    d = order_pb2.Downtime(id=str(row["id"]), work_center_id=row["work_center_id"],
                           order_id="" if row["order_id"] is None else str(row["order_id"]),
                           reason_id=row["reason_id"] or "", note=row["note"], automatic=row["automatic"])
    d.start_time.FromDatetime(row["start_time"])
    _ts(d.end_time, row["end_time"])
    return d


@dataclass(frozen=True)
class OeeInputs:
    """What OEE is computed from: the window, the stops that count, and (cycle time, good, scrap) per item."""

    start: datetime
    end: datetime
    now: datetime
    downtimes: list[tuple[datetime, datetime | None]]
    counts: list[tuple[float, int, int]]


@dataclass
class ApplyResult:
    """What one message of tag events did."""

    cursor: int
    applied: int = 0
    booked_good: int = 0
    booked_scrap: int = 0
    anomalies: int = 0
    completed_orders: list[int] = field(default_factory=list)


@dataclass
class _Run:
    id: int
    order_id: int
    start: datetime
    end: datetime | None
    closed_now: bool = False

    def covers(self, t: datetime) -> bool:
        # The end is inclusive: a scrap count read in the same cycle as the good count that completed the
        # order belongs to it.
        return self.start <= t and (self.end is None or t <= self.end)


@dataclass
class _OrderTotals:
    id: int
    number: str
    state: OrderState
    planned: int
    good: int
    scrap: int
    start: datetime | None
    end: datetime | None
    changed: bool = False


def _event_number(value: reading_pb2.Value) -> int | float | bool | None:
    kind = value.WhichOneof("kind")
    if kind in ("bool_value", "int_value", "uint_value", "double_value"):
        return getattr(value, kind)
    return None


def _value_text(value: reading_pb2.Value) -> str:
    kind = value.WhichOneof("kind")
    return "(none)" if kind is None else f"{kind}={getattr(value, kind)!r}"[:200]


class ProductionStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    # ----------------------------------------------------------------------------------------------------------
    # Master data
    # ----------------------------------------------------------------------------------------------------------

    async def _bind_tags(self, conn: asyncpg.Connection, wc: master_data_pb2.WorkCenter) -> None:
        """Replace the work centre's tag bindings; FAILED_PRECONDITION if another work centre has a tag."""
        bindings = tag_bindings(wc)
        if bindings:
            taken = await conn.fetch(
                "SELECT tag_id, work_center_id FROM tag_bindings WHERE tag_id = ANY($1::bigint[])"
                " AND work_center_id <> $2 ORDER BY tag_id", list(bindings), wc.id)
            if taken:
                violations = [PreconditionViolation(
                    type="TAG_BINDING", subject=f"tags/{r['tag_id']}",
                    description=f"tag {r['tag_id']} is bound to work centre {r['work_center_id']!r}") for r in taken]
                raise FailedPrecondition("; ".join(v.description for v in violations), violations=violations,
                                         reason="TAG_ALREADY_BOUND", metadata={"work_center_id": wc.id})
        await conn.execute("DELETE FROM tag_bindings WHERE work_center_id = $1", wc.id)
        try:
            await conn.executemany("INSERT INTO tag_bindings (tag_id, work_center_id, role) VALUES ($1, $2, $3)",
                                   [(tag, wc.id, role) for tag, role in bindings.items()])
        except asyncpg.UniqueViolationError:  # another work centre bound it since we looked
            raise _precondition("TAG_BINDING", f"workCenters/{wc.id}", "a tag of this work centre was just bound "
                                "to another one; read and retry", "TAG_ALREADY_BOUND") from None

    async def _before_write(self, conn: asyncpg.Connection, kind: Kind, msg: message.Message) -> None:
        if kind is WORK_CENTER:
            # FOR SHARE: the sector cannot be deleted under us before we commit.
            if await conn.fetchval("SELECT 1 FROM sectors WHERE id = $1 FOR SHARE", msg.sector_id) is None:
                raise _missing(SECTOR, msg.sector_id)

    async def _after_write(self, conn: asyncpg.Connection, kind: Kind, msg: message.Message) -> None:
        if kind is WORK_CENTER:
            await self._bind_tags(conn, msg)  # type: ignore[arg-type]

    async def create_master(self, kind: Kind, msg: message.Message) -> message.Message:
        t = _TABLES[kind.field]
        cols = ", ".join(t.columns)
        params = ", ".join(f"${i}" for i in range(2, len(t.columns) + 2))
        async with self.pool.acquire() as conn, conn.transaction():
            await self._before_write(conn, kind, msg)
            row = await conn.fetchrow(
                f"INSERT INTO {t.table} (id, {cols}, revision, create_time, update_time)"
                f" VALUES ($1, {params}, nextval('master_revision'), now(), now())"
                " ON CONFLICT (id) DO NOTHING RETURNING *",
                msg.id, *t.values(msg))  # type: ignore[attr-defined]
            if row is None:
                raise AlreadyExists(f"a {kind.name} with id {msg.id!r} exists",  # type: ignore[attr-defined]
                                    metadata={f"{kind.field}_id": msg.id})  # type: ignore[attr-defined]
            await self._after_write(conn, kind, msg)
            return t.from_row(row)

    async def get_master(self, kind: Kind, resource_id: str) -> message.Message:
        t = _TABLES[kind.field]
        row = await self.pool.fetchrow(f"SELECT * FROM {t.table} WHERE id = $1", resource_id)
        if row is None:
            raise NotFound(f"no {kind.name} with id {resource_id!r}", metadata={f"{kind.field}_id": resource_id})
        return t.from_row(row)

    async def list_master(self, kind: Kind, page_size: int, after_id: str,
                          sector_id: str = "") -> tuple[list[message.Message], bool]:
        t = _TABLES[kind.field]
        if kind is WORK_CENTER:
            rows = await self.pool.fetch(
                "SELECT * FROM work_centers WHERE ($1 = '' OR sector_id = $1) AND id > $2 ORDER BY id LIMIT $3",
                sector_id, after_id, page_size + 1)
        else:
            rows = await self.pool.fetch(f"SELECT * FROM {t.table} WHERE id > $1 ORDER BY id LIMIT $2",
                                         after_id, page_size + 1)
        return [t.from_row(r) for r in rows[:page_size]], len(rows) > page_size

    async def update_master(self, kind: Kind, resource_id: str, etag: str,
                            merge: Callable[[message.Message], message.Message]) -> message.Message:
        """Lock the row, check the etag, store ``merge(current)``."""
        t = _TABLES[kind.field]
        sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(t.columns, start=2))
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT * FROM {t.table} WHERE id = $1 FOR NO KEY UPDATE", resource_id)
            if row is None:
                raise NotFound(f"no {kind.name} with id {resource_id!r}", metadata={f"{kind.field}_id": resource_id})
            current = t.from_row(row)
            if etag and etag != current.etag:  # type: ignore[attr-defined]
                raise _stale(kind, resource_id, etag, current.etag)  # type: ignore[attr-defined]
            new = merge(current)
            await self._before_write(conn, kind, new)
            row = await conn.fetchrow(
                f"UPDATE {t.table} SET {sets}, revision = nextval('master_revision'), update_time = now()"
                " WHERE id = $1 RETURNING *", resource_id, *t.values(new))
            await self._after_write(conn, kind, new)
            if kind is WORK_CENTER:
                await self._forget_baselines(conn, current, new)  # type: ignore[arg-type]
            return t.from_row(row)

    @staticmethod
    async def _forget_baselines(conn: asyncpg.Connection, old: master_data_pb2.WorkCenter,
                                new: master_data_pb2.WorkCenter) -> None:
        """Drop counter baselines and the machine state that no longer describe the bound tags.

        A tag that is unbound and later bound again must not book, from a stale baseline, what its counter
        advanced in between; after a width change old baselines would be read at the wrong width. The next
        reading of each tag is its new baseline.
        """
        if domain.resolve_counter_settings(old.counter_width, 1)[0] != domain.resolve_counter_settings(
                new.counter_width, 1)[0]:
            await conn.execute("DELETE FROM counter_state WHERE work_center_id = $1", new.id)
        else:
            bound = [t for t in (new.production_counter_tag_id, new.scrap_counter_tag_id) if t]
            await conn.execute("DELETE FROM counter_state WHERE work_center_id = $1 AND tag_id <> ALL($2::bigint[])",
                               new.id, bound)
        if old.machine_state_tag_id != new.machine_state_tag_id:
            await conn.execute("DELETE FROM machine_state WHERE work_center_id = $1", new.id)

    async def delete_master(self, kind: Kind, resource_id: str, etag: str) -> None:
        t = _TABLES[kind.field]
        async with self.pool.acquire() as conn, conn.transaction():
            revision = await conn.fetchval(f"SELECT revision FROM {t.table} WHERE id = $1 FOR UPDATE", resource_id)
            if revision is None:
                raise NotFound(f"no {kind.name} with id {resource_id!r}", metadata={f"{kind.field}_id": resource_id})
            if etag and etag != etag_of(revision):
                raise _stale(kind, resource_id, etag, etag_of(revision))
            try:
                await conn.execute(f"DELETE FROM {t.table} WHERE id = $1", resource_id)
            except asyncpg.ForeignKeyViolationError as exc:
                used_by = _USED_BY.get(exc.table_name or "", exc.table_name or "other records")
                raise _precondition("IN_USE", f"{kind.collection}/{resource_id}",
                                    f"{kind.name} {resource_id!r} is still used by {used_by}", "IN_USE",
                                    **{f"{kind.field}_id": resource_id}) from None

    # ----------------------------------------------------------------------------------------------------------
    # Orders
    # ----------------------------------------------------------------------------------------------------------

    @staticmethod
    async def _lock_revision(conn: asyncpg.Connection) -> None:
        # Taken first by every transaction that writes orders, held to commit: revisions commit in order.
        await conn.execute("SELECT value FROM order_revision FOR NO KEY UPDATE")

    @staticmethod
    async def _next_revision(conn: asyncpg.Connection) -> int:
        return await conn.fetchval("UPDATE order_revision SET value = value + 1 RETURNING value")

    @staticmethod
    async def _notify(conn: asyncpg.Connection, revision: int) -> None:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(revision))

    @staticmethod
    async def _claim_request(conn: asyncpg.Connection, kind: str, request_id: str) -> str | None:
        """Record `request_id`; if an earlier request had it, the id of what that one created.

        ON CONFLICT waits for a concurrent transaction holding the same key: if it commits we answer what it
        made, if it rolls back our insert goes through.
        """
        if not request_id:
            return None
        claimed = await conn.fetchval(
            "INSERT INTO create_requests (kind, request_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
            kind, request_id.lower())
        if claimed:
            return None
        return await conn.fetchval("SELECT resource_id FROM create_requests WHERE kind = $1 AND request_id = $2",
                                   kind, request_id.lower())

    @staticmethod
    async def _record_request(conn: asyncpg.Connection, kind: str, request_id: str, resource_id: int) -> None:
        if request_id:
            await conn.execute("UPDATE create_requests SET resource_id = $3 WHERE kind = $1 AND request_id = $2",
                               kind, request_id.lower(), str(resource_id))

    @staticmethod
    async def _order_for_update(conn: asyncpg.Connection, order_id: str) -> asyncpg.Record:
        row = await conn.fetchrow("SELECT * FROM orders WHERE id = $1 FOR NO KEY UPDATE", parse_id(order_id, "order"))
        if row is None:
            raise NotFound(f"no order with id {order_id!r}", metadata={"order_id": order_id})
        return row

    async def create_order(self, order: order_pb2.Order, request_id: str) -> order_pb2.Order:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._lock_revision(conn)
            earlier = await self._claim_request(conn, "order", request_id)
            if earlier is not None:
                row = await conn.fetchrow("SELECT * FROM orders WHERE id = $1", int(earlier))
                return _order(row)
            violations = []
            if await conn.fetchval("SELECT 1 FROM items WHERE id = $1 FOR SHARE", order.item_id) is None:
                violations += _missing(ITEM, order.item_id).violations
            if await conn.fetchval("SELECT 1 FROM work_centers WHERE id = $1 FOR SHARE", order.work_center_id) is None:
                violations += _missing(WORK_CENTER, order.work_center_id).violations
            if violations:
                raise FailedPrecondition("; ".join(v.description for v in violations), violations=violations,
                                         reason="REFERENCE_NOT_FOUND")
            revision = await self._next_revision(conn)
            row = await conn.fetchrow(
                "INSERT INTO orders (number, item_id, work_center_id, planned_quantity, state, revision,"
                " create_time, update_time) VALUES ($1, $2, $3, $4, $5, $6, now(), now())"
                " ON CONFLICT (number) DO NOTHING RETURNING *",
                order.number, order.item_id, order.work_center_id, order.planned_quantity,
                int(OrderState.PLANNED), revision)
            if row is None:
                raise AlreadyExists(f"an order with number {order.number!r} exists", metadata={"number": order.number})
            await self._record_request(conn, "order", request_id, row["id"])
            await self._notify(conn, revision)
            return _order(row)

    async def get_order(self, order_id: str) -> order_pb2.Order:
        row = await self.pool.fetchrow("SELECT * FROM orders WHERE id = $1", parse_id(order_id, "order"))
        if row is None:
            raise NotFound(f"no order with id {order_id!r}", metadata={"order_id": order_id})
        return _order(row)

    async def list_orders(self, work_center_id: str, states: Sequence[int], page_size: int,
                          before_id: int | None) -> tuple[list[order_pb2.Order], bool]:
        rows = await self.pool.fetch(
            "SELECT * FROM orders WHERE ($1 = '' OR work_center_id = $1)"
            " AND (cardinality($2::smallint[]) = 0 OR state = ANY($2::smallint[]))"
            " AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $4",
            work_center_id, list(states), before_id, page_size + 1)
        return [_order(r) for r in rows[:page_size]], len(rows) > page_size

    async def change_order_state(self, order_id: str, etag: str, action: OrderAction,
                                 reason: str = "") -> order_pb2.Order:
        """Apply a state change (domain.transition) under the order's row lock, in one transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._lock_revision(conn)
            row = await self._order_for_update(conn, order_id)
            if etag and etag != etag_of(row["revision"]):
                raise Aborted(f"order {order_id} changed since it was read (etag {etag}, now "
                              f"{etag_of(row['revision'])}); read it again and retry", reason="ETAG_MISMATCH",
                              metadata={"order_id": order_id, "etag": etag_of(row["revision"])})
            new_state = domain.transition(row["state"], action, subject=f"orders/{row['id']}")
            wc = row["work_center_id"]
            if new_state is OrderState.IN_PROGRESS:
                running = await conn.fetchrow(
                    "SELECT id, number FROM orders WHERE work_center_id = $1 AND state = $2 AND id <> $3",
                    wc, int(OrderState.IN_PROGRESS), row["id"])
                if running is not None:
                    raise self._busy(wc, running["id"], running["number"])
            revision = await self._next_revision(conn)
            try:
                new = await conn.fetchrow(
                    "UPDATE orders SET state = $2::smallint, revision = $3, update_time = now(),"
                    " start_time = CASE WHEN $5 THEN coalesce(start_time, now()) ELSE start_time END,"
                    " end_time = CASE WHEN $6 THEN now() ELSE end_time END,"
                    " cancel_reason = CASE WHEN $7 THEN $4 ELSE cancel_reason END"
                    " WHERE id = $1 RETURNING *",
                    row["id"], int(new_state), revision, reason, new_state is OrderState.IN_PROGRESS,
                    new_state in (OrderState.COMPLETED, OrderState.CANCELLED), new_state is OrderState.CANCELLED)
            except asyncpg.UniqueViolationError:  # the index caught what the check above should have
                raise self._busy(wc, None, None) from None
            if new_state is OrderState.IN_PROGRESS:
                await conn.execute("INSERT INTO order_runs (order_id, work_center_id, start_time)"
                                   " VALUES ($1, $2, now())", row["id"], wc)
            else:
                await conn.execute("UPDATE order_runs SET end_time = greatest(now(), start_time)"
                                   " WHERE order_id = $1 AND end_time IS NULL", row["id"])
            await self._notify(conn, revision)
            return _order(new)

    @staticmethod
    def _busy(work_center_id: str, order_id: int | None, number: str | None) -> FailedPrecondition:
        which = f"order {number!r} (id {order_id})" if order_id else "another order"
        return _precondition("WORK_CENTER_BUSY", f"workCenters/{work_center_id}",
                             f"{which} is in progress on work centre {work_center_id!r}; pause or complete it first",
                             "WORK_CENTER_BUSY", work_center_id=work_center_id,
                             **({"running_order_id": str(order_id)} if order_id else {}))

    # ----------------------------------------------------------------------------------------------------------
    # Bookings and defects
    # ----------------------------------------------------------------------------------------------------------

    async def create_booking(self, booking: order_pb2.Booking, request_id: str) -> order_pb2.Booking:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._lock_revision(conn)
            earlier = await self._claim_request(conn, "booking", request_id)
            if earlier is not None:
                return _booking(await conn.fetchrow("SELECT * FROM bookings WHERE id = $1", int(earlier)))
            order = await self._order_for_update(conn, booking.order_id)
            state = OrderState(order["state"])
            subject = f"orders/{order['id']}"
            if state in (OrderState.COMPLETED, OrderState.CANCELLED):
                raise _precondition("ORDER_STATE", subject, f"cannot book to an order that is {state.name}",
                                    "ORDER_CLOSED", order_id=str(order["id"]), state=state.name)
            good = order["good_quantity"] + booking.good_quantity
            if good < 0:
                raise _precondition("QUANTITY", subject, f"the correction of {booking.good_quantity} would leave "
                                    f"{good} good parts; the order has {order['good_quantity']}",
                                    "QUANTITY_NEGATIVE", order_id=str(order["id"]))
            scrap = order["scrap_quantity"] + booking.scrap_quantity
            book_time = booking.book_time.ToDatetime(tzinfo=UTC) if booking.HasField("book_time") else None
            row = await conn.fetchrow(
                "INSERT INTO bookings (order_id, good_quantity, scrap_quantity, source, book_time, note)"
                " VALUES ($1, $2, $3, $4, coalesce($5, now()), $6) RETURNING *",
                order["id"], booking.good_quantity, booking.scrap_quantity, order_pb2.BOOKING_SOURCE_MANUAL,
                book_time, booking.note)
            completed = domain.auto_complete_state(state, good, order["planned_quantity"])
            revision = await self._next_revision(conn)
            await conn.execute(
                "UPDATE orders SET good_quantity = $2, scrap_quantity = $3, state = $4, revision = $5,"
                " end_time = CASE WHEN $6 THEN now() ELSE end_time END, update_time = now() WHERE id = $1",
                order["id"], good, scrap, int(completed or state), revision, completed is not None)
            if completed is not None:
                await conn.execute("UPDATE order_runs SET end_time = greatest(now(), start_time)"
                                   " WHERE order_id = $1 AND end_time IS NULL", order["id"])
                log.info("order completed by a manual booking", extra={"order_id": order["id"], "good": good})
            await self._record_request(conn, "booking", request_id, row["id"])
            await self._notify(conn, revision)
            return _booking(row)

    async def _order_exists(self, conn: asyncpg.Connection | asyncpg.Pool, order_id: str) -> int:
        oid = parse_id(order_id, "order")
        if await conn.fetchval("SELECT 1 FROM orders WHERE id = $1", oid) is None:
            raise NotFound(f"no order with id {order_id!r}", metadata={"order_id": order_id})
        return oid

    async def list_bookings(self, order_id: str, page_size: int, after_id: int) -> tuple[list[order_pb2.Booking], bool]:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            oid = await self._order_exists(conn, order_id)
            rows = await conn.fetch("SELECT * FROM bookings WHERE order_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                                    oid, after_id, page_size + 1)
        return [_booking(r) for r in rows[:page_size]], len(rows) > page_size

    async def create_defect(self, defect: order_pb2.Defect, request_id: str) -> order_pb2.Defect:
        async with self.pool.acquire() as conn, conn.transaction():
            earlier = await self._claim_request(conn, "defect", request_id)
            if earlier is not None:
                return _defect(await conn.fetchrow("SELECT * FROM defects WHERE id = $1", int(earlier)))
            oid = await self._order_exists(conn, defect.order_id)
            if await conn.fetchval("SELECT 1 FROM defect_codes WHERE id = $1 FOR SHARE", defect.defect_code_id) is None:
                raise _missing(DEFECT_CODE, defect.defect_code_id)
            row = await conn.fetchrow(
                "INSERT INTO defects (order_id, defect_code_id, quantity, note) VALUES ($1, $2, $3, $4) RETURNING *",
                oid, defect.defect_code_id, defect.quantity, defect.note)
            await self._record_request(conn, "defect", request_id, row["id"])
            return _defect(row)

    async def list_defects(self, order_id: str, page_size: int, after_id: int) -> tuple[list[order_pb2.Defect], bool]:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            oid = await self._order_exists(conn, order_id)
            rows = await conn.fetch("SELECT * FROM defects WHERE order_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                                    oid, after_id, page_size + 1)
        return [_defect(r) for r in rows[:page_size]], len(rows) > page_size

    # ----------------------------------------------------------------------------------------------------------
    # Downtime
    # ----------------------------------------------------------------------------------------------------------

    @staticmethod
    async def _order_running_at(conn: asyncpg.Connection, work_center_id: str, t: datetime) -> int | None:
        return await conn.fetchval(
            "SELECT order_id FROM order_runs WHERE work_center_id = $1 AND start_time <= $2"
            " AND (end_time IS NULL OR end_time >= $2) ORDER BY start_time DESC LIMIT 1", work_center_id, t)

    async def create_downtime(self, downtime: order_pb2.Downtime) -> order_pb2.Downtime:
        start = downtime.start_time.ToDatetime(tzinfo=UTC)
        end = downtime.end_time.ToDatetime(tzinfo=UTC) if downtime.HasField("end_time") else None
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM work_centers WHERE id = $1 FOR SHARE",
                                   downtime.work_center_id) is None:
                raise _missing(WORK_CENTER, downtime.work_center_id)
            if downtime.reason_id and await conn.fetchval(
                    "SELECT 1 FROM downtime_reasons WHERE id = $1 FOR SHARE", downtime.reason_id) is None:
                raise _missing(DOWNTIME_REASON, downtime.reason_id)
            # The order is the one that was running when the stop began (order_id is not taken from the
            # request: it would have to agree with the runs anyway).
            order_id = await self._order_running_at(conn, downtime.work_center_id, start)
            row = await conn.fetchrow(
                "INSERT INTO downtimes (work_center_id, order_id, start_time, end_time, reason_id, note, automatic)"
                " VALUES ($1, $2, $3, $4, $5, $6, false) RETURNING *",
                downtime.work_center_id, order_id, start, end, downtime.reason_id or None, downtime.note)
            return _downtime(row)

    async def classify_downtime(self, downtime_id: str, reason_id: str, note: str) -> order_pb2.Downtime:
        did = parse_id(downtime_id, "downtime")
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM downtimes WHERE id = $1 FOR NO KEY UPDATE", did) is None:
                raise NotFound(f"no downtime with id {downtime_id!r}", metadata={"downtime_id": downtime_id})
            if await conn.fetchval("SELECT 1 FROM downtime_reasons WHERE id = $1 FOR SHARE", reason_id) is None:
                raise _missing(DOWNTIME_REASON, reason_id)
            # An empty note keeps the one there (classifying again should not wipe what an operator wrote).
            row = await conn.fetchrow(
                "UPDATE downtimes SET reason_id = $2, note = CASE WHEN $3 = '' THEN note ELSE $3 END"
                " WHERE id = $1 RETURNING *", did, reason_id, note)
            return _downtime(row)

    async def list_downtimes(self, work_center_id: str, start: datetime | None, end: datetime | None,
                             page_size: int, after: tuple[datetime, int] | None
                             ) -> tuple[list[order_pb2.Downtime], bool]:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            if await conn.fetchval("SELECT 1 FROM work_centers WHERE id = $1", work_center_id) is None:
                raise NotFound(f"no work centre with id {work_center_id!r}",
                               metadata={"work_center_id": work_center_id})
            rows = await conn.fetch(
                "SELECT * FROM downtimes WHERE work_center_id = $1"
                " AND ($2::timestamptz IS NULL OR end_time IS NULL OR end_time > $2)"
                " AND start_time < coalesce($3::timestamptz, now())"
                " AND ($4::timestamptz IS NULL OR (start_time, id) < ($4, $5))"
                " ORDER BY start_time DESC, id DESC LIMIT $6",
                work_center_id, start, end, after[0] if after else None, after[1] if after else 0, page_size + 1)
        return [_downtime(r) for r in rows[:page_size]], len(rows) > page_size

    # ----------------------------------------------------------------------------------------------------------
    # OEE
    # ----------------------------------------------------------------------------------------------------------

    @staticmethod
    async def _counting_downtimes(conn: asyncpg.Connection, work_center_id: str, start: datetime,
                                  end: datetime) -> list[tuple[datetime, datetime | None]]:
        rows = await conn.fetch(
            "SELECT d.start_time, d.end_time FROM downtimes d LEFT JOIN downtime_reasons r ON r.id = d.reason_id"
            " WHERE d.work_center_id = $1 AND (d.reason_id IS NULL OR r.counts_against_availability)"
            " AND d.start_time < $3 AND (d.end_time IS NULL OR d.end_time > $2)",
            work_center_id, start, end)
        return [(r["start_time"], r["end_time"]) for r in rows]

    async def order_oee_inputs(self, order_id: str) -> OeeInputs:
        oid = parse_id(order_id, "order")
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            now = await conn.fetchval("SELECT now()")
            row = await conn.fetchrow(
                "SELECT o.*, i.ideal_cycle_nanos FROM orders o JOIN items i ON i.id = o.item_id WHERE o.id = $1", oid)
            if row is None:
                raise NotFound(f"no order with id {order_id!r}", metadata={"order_id": order_id})
            if row["start_time"] is None:
                raise _precondition("ORDER_STATE", f"orders/{oid}", "the order has not started; it has no run to "
                                    "measure", "ORDER_NOT_STARTED", order_id=order_id)
            start, end = row["start_time"], row["end_time"] or now
            downtimes = await self._counting_downtimes(conn, row["work_center_id"], start, end)
        return OeeInputs(start, end, now, downtimes,
                         [(row["ideal_cycle_nanos"] / 1e9, row["good_quantity"], row["scrap_quantity"])])

    async def work_center_oee_inputs(self, work_center_id: str, start: datetime, end: datetime | None) -> OeeInputs:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            now = await conn.fetchval("SELECT now()")
            if await conn.fetchval("SELECT 1 FROM work_centers WHERE id = $1", work_center_id) is None:
                raise NotFound(f"no work centre with id {work_center_id!r}",
                               metadata={"work_center_id": work_center_id})
            # The future has no run time yet: a window that reaches past now ends now.
            end = now if end is None else min(end, now)
            start = min(start, end)
            downtimes = await self._counting_downtimes(conn, work_center_id, start, end)
            rows = await conn.fetch(
                "SELECT i.ideal_cycle_nanos, sum(b.good_quantity) AS good, sum(b.scrap_quantity) AS scrap"
                " FROM bookings b JOIN orders o ON o.id = b.order_id JOIN items i ON i.id = o.item_id"
                " WHERE o.work_center_id = $1 AND b.book_time >= $2 AND b.book_time < $3"
                " GROUP BY i.id, i.ideal_cycle_nanos",
                work_center_id, start, end)
        return OeeInputs(start, end, now, downtimes,
                         [(r["ideal_cycle_nanos"] / 1e9, int(r["good"]), int(r["scrap"])) for r in rows])

    # ----------------------------------------------------------------------------------------------------------
    # WatchOrders
    # ----------------------------------------------------------------------------------------------------------

    async def order_snapshot(self, work_center_id: str) -> tuple[int, list[order_pb2.Order]]:
        """Open orders and those closed in the last 24 h, and the revision they are current at."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            revision = await conn.fetchval("SELECT value FROM order_revision")
            rows = await conn.fetch(
                "SELECT * FROM orders WHERE ($1 = '' OR work_center_id = $1)"
                " AND (state = ANY($2::smallint[]) OR end_time >= now() - $3::interval) ORDER BY id",
                work_center_id, _OPEN_STATES, CLOSED_ORDERS_SHOWN)
        return revision, [_order(r) for r in rows]

    async def order_changes_after(self, revision: int, work_center_id: str,
                                  limit: int = 500) -> tuple[list[tuple[int, order_pb2.Order]], int]:
        """Orders changed after `revision` (by revision), and the current revision, read consistently."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            current = await conn.fetchval("SELECT value FROM order_revision")
            rows = await conn.fetch(
                "SELECT * FROM orders WHERE revision > $1 AND ($2 = '' OR work_center_id = $2)"
                " ORDER BY revision LIMIT $3", revision, work_center_id, limit)
        return [(r["revision"], _order(r)) for r in rows], current

    async def current_order_revision(self) -> int:
        return await self.pool.fetchval("SELECT value FROM order_revision")

    # ----------------------------------------------------------------------------------------------------------
    # Tag events (the consumer runs these on its own connection, which holds the election lock)
    # ----------------------------------------------------------------------------------------------------------

    @staticmethod
    async def try_consumer_lock(conn: asyncpg.Connection) -> bool:
        return await conn.fetchval("SELECT pg_try_advisory_lock($1)", CONSUMER_LOCK_KEY)

    @staticmethod
    async def load_cursor(conn: asyncpg.Connection | asyncpg.Pool) -> int:
        return await conn.fetchval("SELECT cursor FROM consumer_cursor")

    @staticmethod
    async def reset_cursor(conn: asyncpg.Connection) -> None:
        await conn.execute("UPDATE consumer_cursor SET cursor = 0, update_time = now()")

    async def apply_tag_events(self, conn: asyncpg.Connection,
                               events: Sequence[tag_event_pb2.TagEvent]) -> ApplyResult:
        """Apply one message of tag events and move the cursor past it, in one transaction."""
        async with conn.transaction():
            stored = await conn.fetchval("SELECT cursor FROM consumer_cursor FOR UPDATE")
            # Events at or below the stored cursor are applied already: a replay books nothing.
            fresh = sorted((e for e in events if e.cursor > stored), key=lambda e: e.cursor)
            result = ApplyResult(cursor=stored)
            if not fresh:
                return result
            result.cursor = fresh[-1].cursor
            result.applied = len(fresh)
            await _EventBatch(conn, fresh, result).apply()
            await conn.execute("UPDATE consumer_cursor SET cursor = $1, update_time = now()", result.cursor)
            return result


@dataclass
class _Binding:
    work_center_id: str
    role: int
    width: int
    max_jump: int


class _EventBatch:
    """One transaction's worth of tag events: loads the state it needs, walks the events in cursor order,
    then writes baselines, bookings and orders back in bulk."""

    def __init__(self, conn: asyncpg.Connection, events: list[tag_event_pb2.TagEvent], result: ApplyResult):
        self.conn = conn
        self.events = events
        self.result = result
        self.bindings: dict[int, _Binding] = {}
        self.counters: dict[tuple[str, int], int] = {}
        self.counter_writes: dict[tuple[str, int], tuple[int, int, datetime]] = {}
        self.machine: dict[str, bool] = {}
        self.machine_writes: dict[str, tuple[int, bool, int, datetime]] = {}
        self.runs: dict[str, list[_Run]] = {}
        self.orders: dict[int, _OrderTotals] = {}
        self.bookings: list[tuple[object, ...]] = []

    async def apply(self) -> None:
        conn = self.conn
        tag_ids = sorted({e.tag_id for e in self.events if e.tag_id <= _MAX_INT64})
        rows = await conn.fetch(
            "SELECT b.tag_id, b.role, b.work_center_id, w.counter_width, w.max_counter_jump FROM tag_bindings b"
            " JOIN work_centers w ON w.id = b.work_center_id WHERE b.tag_id = ANY($1::bigint[])", tag_ids)
        for r in rows:
            width, jump = domain.resolve_counter_settings(r["counter_width"], r["max_counter_jump"])
            self.bindings[r["tag_id"]] = _Binding(r["work_center_id"], r["role"], width, jump)
        relevant = [(e, self.bindings[e.tag_id]) for e in self.events if e.tag_id in self.bindings]
        if not relevant:
            return  # nothing of ours: only the cursor moves
        work_centers = sorted({b.work_center_id for _, b in relevant})
        times = [e.read_time.ToDatetime(tzinfo=UTC) for e, _ in relevant]
        # Lock order: cursor (taken), order revision, orders. RPCs that write orders take revision then orders.
        await ProductionStore._lock_revision(conn)
        pairs = sorted({(b.work_center_id, e.tag_id) for e, b in relevant if b.role in _COUNTER_ROLES})
        for r in await conn.fetch(
                "SELECT s.work_center_id, s.tag_id, s.value FROM counter_state s"
                " JOIN unnest($1::text[], $2::bigint[]) AS k(wc, tag) ON s.work_center_id = k.wc AND s.tag_id = k.tag",
                [p[0] for p in pairs], [p[1] for p in pairs]):
            self.counters[(r["work_center_id"], r["tag_id"])] = int(r["value"])
        for r in await conn.fetch("SELECT work_center_id, running FROM machine_state"
                                  " WHERE work_center_id = ANY($1::text[])", work_centers):
            self.machine[r["work_center_id"]] = r["running"]
        for r in await conn.fetch(
                "SELECT id, order_id, work_center_id, start_time, end_time FROM order_runs"
                " WHERE work_center_id = ANY($1::text[]) AND start_time <= $3 AND (end_time IS NULL OR end_time >= $2)"
                " ORDER BY start_time", work_centers, min(times), max(times)):
            self.runs.setdefault(r["work_center_id"], []).append(
                _Run(r["id"], r["order_id"], r["start_time"], r["end_time"]))
        order_ids = sorted({run.order_id for runs in self.runs.values() for run in runs})
        for r in await conn.fetch("SELECT * FROM orders WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
                                  order_ids):
            self.orders[r["id"]] = _OrderTotals(r["id"], r["number"], OrderState(r["state"]), r["planned_quantity"],
                                                r["good_quantity"], r["scrap_quantity"], r["start_time"], r["end_time"])

        for (event, binding), t in zip(relevant, times, strict=True):
            if event.quality != reading_pb2.QUALITY_GOOD:
                continue  # no value to trust: the baseline and the machine state stay as they were
            if binding.role in _COUNTER_ROLES:
                await self._counter(event, binding, t)
            elif binding.role == reading_pb2.TAG_ROLE_MACHINE_STATE:
                await self._machine_state(event, binding, t)
        await self._write()

    def _run_at(self, work_center_id: str, t: datetime) -> _Run | None:
        for run in reversed(self.runs.get(work_center_id, [])):  # the latest start wins if two touch
            if run.covers(t):
                return run
        return None

    async def _anomaly(self, event: tag_event_pb2.TagEvent, binding: _Binding, kind: str, previous: int | None,
                       note: str, t: datetime) -> None:
        self.result.anomalies += 1
        log.warning("tag event not booked: %s", note, extra={
            "work_center_id": binding.work_center_id, "tag_id": event.tag_id, "cursor": event.cursor, "kind": kind})
        await self.conn.execute(
            "INSERT INTO tag_anomalies (work_center_id, tag_id, cursor, kind, previous_value, value, note, read_time)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            binding.work_center_id, event.tag_id, event.cursor, kind, previous, _value_text(event.value), note, t)

    async def _counter(self, event: tag_event_pb2.TagEvent, binding: _Binding, t: datetime) -> None:
        raw = _event_number(event.value)
        value = None if raw is None else domain.counter_value(raw, binding.width)
        key = (binding.work_center_id, event.tag_id)
        previous = self.counters.get(key)
        if value is None:
            await self._anomaly(event, binding, "NOT_A_COUNT", previous,
                                f"{_value_text(event.value)} is not a counter value", t)
            return
        if previous is not None and previous >= 1 << binding.width:
            previous = None  # the work centre's counter width shrank: start over from this value
        delta = domain.counter_delta(previous, value, width=binding.width, max_jump=binding.max_jump)
        self.counters[key] = value
        self.counter_writes[key] = (value, event.cursor, t)
        if delta.kind is domain.DeltaKind.JUMP:
            await self._anomaly(event, binding, "JUMP", previous, delta.note, t)
            return
        if delta.quantity <= 0:
            return
        run = self._run_at(binding.work_center_id, t)
        if run is None:
            return  # no order was running when these parts were made: the baseline moves, nothing is booked
        order = self.orders[run.order_id]
        scrap = binding.role == reading_pb2.TAG_ROLE_SCRAP_COUNTER
        if scrap:
            order.scrap += delta.quantity
            self.result.booked_scrap += delta.quantity
        else:
            order.good += delta.quantity
            self.result.booked_good += delta.quantity
        order.changed = True
        self.bookings.append((order.id, 0 if scrap else delta.quantity, delta.quantity if scrap else 0,
                              order_pb2.BOOKING_SOURCE_COUNTER, t, delta.note, event.cursor, event.tag_id))
        completed = domain.auto_complete_state(order.state, order.good, order.planned)
        if completed is not None:
            order.state = completed
            order.end = max(t, order.start) if order.start else t
            for r in self.runs.get(binding.work_center_id, []):
                if r.order_id == order.id and r.end is None:
                    r.end = max(t, r.start)
                    r.closed_now = True
            self.result.completed_orders.append(order.id)
            log.info("order completed: planned quantity reached", extra={
                "order_id": order.id, "number": order.number, "good": order.good, "planned": order.planned})

    async def _machine_state(self, event: tag_event_pb2.TagEvent, binding: _Binding, t: datetime) -> None:
        raw = _event_number(event.value)
        wc = binding.work_center_id
        if raw is None:
            await self._anomaly(event, binding, "NOT_A_STATE", None,
                                f"{_value_text(event.value)} is not a machine state", t)
            return
        running = domain.is_running(raw)
        change = domain.downtime_transition(self.machine.get(wc), running)
        self.machine[wc] = running
        self.machine_writes[wc] = (event.tag_id, running, event.cursor, t)
        open_automatic = await self.conn.fetchval(
            "SELECT id FROM downtimes WHERE work_center_id = $1 AND automatic AND end_time IS NULL", wc)
        if change == "open" and open_automatic is None:
            run = self._run_at(wc, t)
            await self.conn.execute(
                "INSERT INTO downtimes (work_center_id, order_id, start_time, automatic) VALUES ($1, $2, $3, true)",
                wc, run.order_id if run else None, t)
        elif change == "close":
            # The machine runs again: every stop still open on it ends, including one an operator opened.
            await self.conn.execute(
                "UPDATE downtimes SET end_time = greatest($2, start_time) WHERE work_center_id = $1"
                " AND end_time IS NULL", wc, t)
        elif running and open_automatic is not None:
            # Running, with no previous state known (e.g. the state tag was re-bound) but a stop still open.
            await self.conn.execute("UPDATE downtimes SET end_time = greatest($2, start_time) WHERE id = $1",
                                    open_automatic, t)

    async def _write(self) -> None:
        conn = self.conn
        if self.counter_writes:
            await conn.executemany(
                "INSERT INTO counter_state (work_center_id, tag_id, value, cursor, read_time)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (work_center_id, tag_id) DO UPDATE SET"
                " value = excluded.value, cursor = excluded.cursor, read_time = excluded.read_time",
                [(wc, tag, v, c, t) for (wc, tag), (v, c, t) in self.counter_writes.items()])
        if self.machine_writes:
            await conn.executemany(
                "INSERT INTO machine_state (work_center_id, tag_id, running, cursor, read_time)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (work_center_id) DO UPDATE SET"
                " tag_id = excluded.tag_id, running = excluded.running, cursor = excluded.cursor,"
                " read_time = excluded.read_time",
                [(wc, *rest) for wc, rest in self.machine_writes.items()])
        if self.bookings:
            await conn.executemany(
                "INSERT INTO bookings (order_id, good_quantity, scrap_quantity, source, book_time, note,"
                " source_cursor, source_tag_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", self.bookings)
        last_revision = None
        for order in self.orders.values():
            if not order.changed:
                continue
            last_revision = await ProductionStore._next_revision(conn)
            await conn.execute(
                "UPDATE orders SET good_quantity = $2, scrap_quantity = $3, state = $4, end_time = $5,"
                " revision = $6, update_time = now() WHERE id = $1",
                order.id, order.good, order.scrap, int(order.state), order.end, last_revision)
        closed = [(r.id, r.end) for runs in self.runs.values() for r in runs if r.closed_now]
        if closed:
            await conn.executemany("UPDATE order_runs SET end_time = $2 WHERE id = $1", closed)
        if last_revision is not None:
            await ProductionStore._notify(conn, last_revision)


__all__ = [
    "CHANNEL",
    "CONSUMER_LOCK_KEY",
    "MIGRATIONS",
    "ApplyResult",
    "OeeInputs",
    "ProductionStore",
    "decode_page_token",
    "encode_page_token",
    "etag_of",
    "parse_id",
]
