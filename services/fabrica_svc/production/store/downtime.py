"""Downtime records (automatic from machine states, or entered by hand) and what OEE reads."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from .records import Downtime, OrderCycle, from_row


async def insert(conn: asyncpg.Connection, work_center_id: str, order_id: int | None, start: datetime,
                 end: datetime | None, reason_id: str | None, note: str) -> Downtime:
    """A stop entered by hand."""
    row = await conn.fetchrow(
        "INSERT INTO downtimes (work_center_id, order_id, start_time, end_time, reason_id, note, automatic)"
        " VALUES ($1, $2, $3, $4, $5, $6, false) RETURNING *",
        work_center_id, order_id, start, end, reason_id, note)
    return from_row(Downtime, row)


async def lock(conn: asyncpg.Connection, downtime_id: int) -> bool:
    """Lock the record for an update; False if there is none."""
    return await conn.fetchval("SELECT 1 FROM downtimes WHERE id = $1 FOR NO KEY UPDATE", downtime_id) is not None


async def classify(conn: asyncpg.Connection, downtime_id: int, reason_id: str, note: str) -> Downtime:
    """Set the reason; an empty note keeps the one there (classifying again should not wipe what an operator
    wrote)."""
    row = await conn.fetchrow(
        "UPDATE downtimes SET reason_id = $2, note = CASE WHEN $3 = '' THEN note ELSE $3 END"
        " WHERE id = $1 RETURNING *", downtime_id, reason_id, note)
    return from_row(Downtime, row)


async def get(conn: asyncpg.Connection, downtime_id: int, *, lock: bool = False) -> Downtime | None:
    row = await conn.fetchrow("SELECT * FROM downtimes WHERE id = $1" + (" FOR NO KEY UPDATE" if lock else ""),
                              downtime_id)
    return None if row is None else from_row(Downtime, row)


async def end(conn: asyncpg.Connection, downtime_id: int, end_time: datetime) -> Downtime:
    """Set the end of a stop."""
    row = await conn.fetchrow("UPDATE downtimes SET end_time = $2 WHERE id = $1 RETURNING *", downtime_id, end_time)
    return from_row(Downtime, row)


async def list_page(conn: asyncpg.Connection, work_center_id: str, start: datetime | None, end: datetime | None,
                    page_size: int, after: tuple[datetime, int] | None) -> tuple[list[Downtime], bool]:
    """Stops overlapping [start, end), newest first, after the (start time, id) `after`."""
    rows = await conn.fetch(
        "SELECT * FROM downtimes WHERE work_center_id = $1"
        " AND ($2::timestamptz IS NULL OR end_time IS NULL OR end_time > $2)"
        " AND start_time < coalesce($3::timestamptz, now())"
        " AND ($4::timestamptz IS NULL OR (start_time, id) < ($4, $5))"
        " ORDER BY start_time DESC, id DESC LIMIT $6",
        work_center_id, start, end, after[0] if after else None, after[1] if after else 0, page_size + 1)
    return [from_row(Downtime, r) for r in rows[:page_size]], len(rows) > page_size


async def open_automatic(conn: asyncpg.Connection, work_center_id: str, order_id: int | None, start: datetime) -> None:
    await conn.execute(
        "INSERT INTO downtimes (work_center_id, order_id, start_time, automatic) VALUES ($1, $2, $3, true)",
        work_center_id, order_id, start)


async def close_open(conn: asyncpg.Connection, work_center_id: str, end: datetime, *, automatic_only: bool) -> None:
    """End the stops still open on the work centre (all, or only the automatic one) at `end`, never before
    they started."""
    await conn.execute(
        "UPDATE downtimes SET end_time = greatest($2, start_time) WHERE work_center_id = $1"
        " AND end_time IS NULL AND (automatic OR NOT $3)", work_center_id, end, automatic_only)


async def counting(conn: asyncpg.Connection, work_center_id: str, start: datetime,
                   end: datetime) -> list[tuple[datetime, datetime | None]]:
    """(start, end) of the stops in the window that count against availability or are not classified."""
    rows = await conn.fetch(
        "SELECT d.start_time, d.end_time FROM downtimes d LEFT JOIN downtime_reasons r ON r.tenant_id = d.tenant_id AND r.id = d.reason_id"
        " WHERE d.work_center_id = $1 AND (d.reason_id IS NULL OR r.counts_against_availability)"
        " AND d.start_time < $3 AND (d.end_time IS NULL OR d.end_time > $2)",
        work_center_id, start, end)
    return [(r["start_time"], r["end_time"]) for r in rows]


async def order_with_cycle(conn: asyncpg.Connection, order_id: int) -> OrderCycle | None:
    """The order's work centre, times and quantities with its item's ideal cycle (nanoseconds)."""
    row = await conn.fetchrow(
        "SELECT o.work_center_id, o.start_time, o.end_time, o.good_quantity, o.scrap_quantity, i.ideal_cycle_nanos"
        " FROM orders o JOIN items i ON i.tenant_id = o.tenant_id AND i.id = o.item_id WHERE o.id = $1", order_id)
    return None if row is None else from_row(OrderCycle, row)


async def counts_by_item(conn: asyncpg.Connection, work_center_id: str, start: datetime,
                         end: datetime) -> list[tuple[float, int, int]]:
    """(ideal cycle in seconds, good, scrap) per item booked on the work centre in [start, end)."""
    rows = await conn.fetch(
        "SELECT i.ideal_cycle_nanos, sum(b.good_quantity) AS good, sum(b.scrap_quantity) AS scrap"
        " FROM bookings b JOIN orders o ON o.id = b.order_id JOIN items i ON i.tenant_id = o.tenant_id AND i.id = o.item_id"
        " WHERE o.work_center_id = $1 AND b.book_time >= $2 AND b.book_time < $3"
        " GROUP BY i.id, i.ideal_cycle_nanos",
        work_center_id, start, end)
    return [(r["ideal_cycle_nanos"] / 1e9, int(r["good"]), int(r["scrap"])) for r in rows]
