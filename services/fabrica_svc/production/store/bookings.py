"""Bookings (manual and from counters) and defects of orders."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg
from fabrica.production.v1 import order_pb2

from .records import Booking, Defect, from_row


async def get(conn: asyncpg.Connection, booking_id: int) -> Booking:
    return from_row(Booking, await conn.fetchrow("SELECT * FROM bookings WHERE id = $1", booking_id))


async def insert_manual(conn: asyncpg.Connection, order_id: int, good: int, scrap: int, book_time: datetime | None,
                        note: str) -> Booking:
    """A manual booking, at `book_time` or now."""
    row = await conn.fetchrow(
        "INSERT INTO bookings (order_id, good_quantity, scrap_quantity, source, book_time, note)"
        " VALUES ($1, $2, $3, $4, coalesce($5, now()), $6) RETURNING *",
        order_id, good, scrap, order_pb2.BOOKING_SOURCE_MANUAL, book_time, note)
    return from_row(Booking, row)


async def insert_counted(conn: asyncpg.Connection,
                         rows: Sequence[tuple[int, int, int, datetime, str, int, int]]) -> None:
    """Bookings from counters: (order, good, scrap, book time, note, source cursor, source tag)."""
    if rows:
        await conn.executemany(
            "INSERT INTO bookings (order_id, good_quantity, scrap_quantity, source, book_time, note,"
            " source_cursor, source_tag_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [(o, g, s, order_pb2.BOOKING_SOURCE_COUNTER, t, n, c, tag) for o, g, s, t, n, c, tag in rows])


async def list_page(conn: asyncpg.Connection, order_id: int, page_size: int,
                    after_id: int) -> tuple[list[Booking], bool]:
    rows = await conn.fetch("SELECT * FROM bookings WHERE order_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                            order_id, after_id, page_size + 1)
    return [from_row(Booking, r) for r in rows[:page_size]], len(rows) > page_size


async def get_defect(conn: asyncpg.Connection, defect_id: int) -> Defect:
    return from_row(Defect, await conn.fetchrow("SELECT * FROM defects WHERE id = $1", defect_id))


async def insert_defect(conn: asyncpg.Connection, order_id: int, defect_code_id: str, quantity: int,
                        note: str) -> Defect:
    row = await conn.fetchrow(
        "INSERT INTO defects (order_id, defect_code_id, quantity, note) VALUES ($1, $2, $3, $4) RETURNING *",
        order_id, defect_code_id, quantity, note)
    return from_row(Defect, row)


async def list_defects(conn: asyncpg.Connection, order_id: int, page_size: int,
                       after_id: int) -> tuple[list[Defect], bool]:
    rows = await conn.fetch("SELECT * FROM defects WHERE order_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                            order_id, after_id, page_size + 1)
    return [from_row(Defect, r) for r in rows[:page_size]], len(rows) > page_size
