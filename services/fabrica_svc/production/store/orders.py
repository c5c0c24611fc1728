"""Orders and their runs.

Every change to an order (state, quantities) takes the next value of a one-row revision counter whose row
lock is held to commit (common.lock_revision), and writes it on the order. Revisions therefore commit in
order: a watcher that has read every change up to R never later sees one below R appear. Orders are never
deleted, so "what changed after R" is simply the orders whose revision is above R; each change is also
announced with NOTIFY (delivered on commit) so a watcher on any replica learns of it. Every transaction
that writes orders takes that row lock first and the order rows second, so they cannot deadlock. Orders, their numbers and the revision counter are each tenant's own (schema.py):
one tenant's changes never move another's revisions, and a watcher sees its tenant's orders only.

An order's runs (``order_runs``: from start or resume to pause, completion or cancellation) say which
order a counter increment belongs to: the one whose run covers the reading's time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from ...runtime.errors import AlreadyExists, NotFound
from ..domain import OrderState
from .common import parse_id
from .records import Order, from_row
from .schema import CLOSED_ORDERS_SHOWN, OPEN_STATES


def _order(row: asyncpg.Record) -> Order:
    return from_row(Order, row)


def _not_found(order_id: str) -> NotFound:
    return NotFound(f"no order with id {order_id!r}", metadata={"order_id": order_id})


async def insert(conn: asyncpg.Connection, number: str, item_id: str, work_center_id: str, planned_quantity: int,
                 revision: int) -> Order:
    """A new PLANNED order; ALREADY_EXISTS if the number is taken."""
    row = await conn.fetchrow(
        "INSERT INTO orders (number, item_id, work_center_id, planned_quantity, state, revision,"
        " create_time, update_time) VALUES ($1, $2, $3, $4, $5, $6, now(), now())"
        " ON CONFLICT (tenant_id, number) DO NOTHING RETURNING *",
        number, item_id, work_center_id, planned_quantity, int(OrderState.PLANNED), revision)
    if row is None:
        raise AlreadyExists(f"an order with number {number!r} exists", metadata={"number": number})
    return _order(row)


async def get(conn: asyncpg.Connection | asyncpg.Pool, order_id: str, *, for_update: bool = False) -> Order:
    """The order; NOT_FOUND if there is none. `for_update` locks it (FOR NO KEY UPDATE)."""
    lock = " FOR NO KEY UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT * FROM orders WHERE id = $1{lock}", parse_id(order_id, "order"))
    if row is None:
        raise _not_found(order_id)
    return _order(row)


async def by_id(conn: asyncpg.Connection, order_id: int) -> Order:
    return _order(await conn.fetchrow("SELECT * FROM orders WHERE id = $1", order_id))


async def existing_id(conn: asyncpg.Connection | asyncpg.Pool, order_id: str) -> int:
    """The id of an order that exists; NOT_FOUND otherwise."""
    oid = parse_id(order_id, "order")
    if await conn.fetchval("SELECT 1 FROM orders WHERE id = $1", oid) is None:
        raise _not_found(order_id)
    return oid


async def list_page(conn: asyncpg.Connection | asyncpg.Pool, work_center_id: str, states: Sequence[int],
                    page_size: int, before_id: int | None) -> tuple[list[Order], bool]:
    rows = await conn.fetch(
        "SELECT * FROM orders WHERE ($1 = '' OR work_center_id = $1)"
        " AND (cardinality($2::smallint[]) = 0 OR state = ANY($2::smallint[]))"
        " AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $4",
        work_center_id, list(states), before_id, page_size + 1)
    return [_order(r) for r in rows[:page_size]], len(rows) > page_size


async def running_other(conn: asyncpg.Connection, work_center_id: str, order_id: int) -> tuple[int, str] | None:
    """(id, number) of another order in progress on the work centre, if any."""
    row = await conn.fetchrow("SELECT id, number FROM orders WHERE work_center_id = $1 AND state = $2 AND id <> $3",
                              work_center_id, int(OrderState.IN_PROGRESS), order_id)
    return None if row is None else (row["id"], row["number"])


async def set_state(conn: asyncpg.Connection, order_id: int, state: OrderState, revision: int,
                    cancel_reason: str) -> Order:
    """Store a new state: IN_PROGRESS sets the start (the first time), COMPLETED and CANCELLED the end,
    CANCELLED the reason. Raises asyncpg.UniqueViolationError if another order is already in progress."""
    row = await conn.fetchrow(
        "UPDATE orders SET state = $2::smallint, revision = $3, update_time = now(),"
        " start_time = CASE WHEN $5 THEN coalesce(start_time, now()) ELSE start_time END,"
        " end_time = CASE WHEN $6 THEN now() ELSE end_time END,"
        " cancel_reason = CASE WHEN $7 THEN $4 ELSE cancel_reason END"
        " WHERE id = $1 RETURNING *",
        order_id, int(state), revision, cancel_reason, state is OrderState.IN_PROGRESS,
        state in (OrderState.COMPLETED, OrderState.CANCELLED), state is OrderState.CANCELLED)
    return _order(row)


async def set_totals(conn: asyncpg.Connection, totals: Sequence[tuple[int, int, int, OrderState, datetime | None,
                                                                      int]]) -> None:
    """Store (id, good, scrap, state, end time, revision) of orders that booked."""
    for order_id, good, scrap, state, end, revision in totals:
        await conn.execute(
            "UPDATE orders SET good_quantity = $2, scrap_quantity = $3, state = $4, end_time = $5,"
            " revision = $6, update_time = now() WHERE id = $1",
            order_id, good, scrap, int(state), end, revision)


async def start_run(conn: asyncpg.Connection, order_id: int, work_center_id: str) -> None:
    await conn.execute("INSERT INTO order_runs (order_id, work_center_id, start_time) VALUES ($1, $2, now())",
                       order_id, work_center_id)


async def end_run(conn: asyncpg.Connection, order_id: int) -> None:
    """End the order's open run now (never before it started)."""
    await conn.execute("UPDATE order_runs SET end_time = greatest(now(), start_time)"
                       " WHERE order_id = $1 AND end_time IS NULL", order_id)


async def end_runs(conn: asyncpg.Connection, ends: Sequence[tuple[int, datetime]]) -> None:
    """Set the end of runs by id: (run id, end)."""
    if ends:
        await conn.executemany("UPDATE order_runs SET end_time = $2 WHERE id = $1", list(ends))


async def running_at(conn: asyncpg.Connection, work_center_id: str, t: datetime) -> int | None:
    """The order whose run on the work centre covers `t` (the latest start wins)."""
    return await conn.fetchval(
        "SELECT order_id FROM order_runs WHERE work_center_id = $1 AND start_time <= $2"
        " AND (end_time IS NULL OR end_time >= $2) ORDER BY start_time DESC LIMIT 1", work_center_id, t)


async def snapshot(conn: asyncpg.Connection, work_center_id: str) -> list[Order]:
    """Open orders and those closed in the last 24 h (read in the caller's transaction)."""
    rows = await conn.fetch(
        "SELECT * FROM orders WHERE ($1 = '' OR work_center_id = $1)"
        " AND (state = ANY($2::smallint[]) OR end_time >= now() - $3::interval) ORDER BY id",
        work_center_id, OPEN_STATES, CLOSED_ORDERS_SHOWN)
    return [_order(r) for r in rows]


async def changed_after(conn: asyncpg.Connection, revision: int, work_center_id: str, limit: int) -> list[Order]:
    """Orders changed after `revision`, by revision: of the connection's tenant, as row-level security says
    anyway. The tenant is also named here so that the watch's poll is one search of orders (tenant_id,
    revision), not one per tenant (measured with 50 tenants of 4,000 orders: 10 buffers instead of 215)."""
    rows = await conn.fetch(
        "SELECT * FROM orders WHERE tenant_id = production.session_tenant() AND revision > $1"
        " AND ($2 = '' OR work_center_id = $2)"
        " ORDER BY revision LIMIT $3", revision, work_center_id, limit)
    return [_order(r) for r in rows]
