"""What the tag-event consumer reads and writes, on its own connection (which holds the election lock).

Each message of tag events is applied in one transaction that also moves the stored cursor
(``consumer_cursor``) past it (service.TagEventService): replays and restarts never book twice. The cursor
row is locked first, and events at or below the stored cursor are skipped, so even two consumers that
somehow ran at once could not book an event twice; the unique index on ``bookings.source_cursor`` is a last
guard. Counter baselines (``counter_state``) and machine states (``machine_state``) are per work centre.

The cursor is the installation's (one consumer reads every tenant's events); everything else is a tenant's:
the events of each tenant in a message are applied under that tenant (set_tenant), so a tenant's event finds
only its own tenant's bindings, work centres and orders.

The state a message needs is read in bulk, a handful of queries per message whatever its size
(load_bindings, load_state); the effects the plan returns are written back in bulk too (apply).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import asyncpg

from ...runtime import tenancy
from .. import domain
from ..booking import (
    COUNTER_ROLES,
    Binding,
    BookingState,
    CloseDowntimes,
    Effects,
    OpenDowntime,
    OrderTotals,
    Run,
)
from ..domain import OrderState
from . import bookings, downtime, orders
from .common import lock_revision, next_revision, notify
from .schema import CONSUMER_LOCK_KEY

_MAX_INT64 = 2**63 - 1


async def try_lock(conn: asyncpg.Connection) -> bool:
    """Take the session lock that makes this connection's process the one consumer."""
    return await conn.fetchval("SELECT pg_try_advisory_lock($1)", CONSUMER_LOCK_KEY)


async def set_tenant(conn: asyncpg.Connection, tenant: str) -> None:
    """Work for `tenant` until the transaction ends: the consumer's connection sees, and writes, that tenant's
    rows only (row-level security; runtime/tenancy.py). Outside a transaction it sees none."""
    await conn.execute(f"SELECT set_config('{tenancy.SETTING}', $1, true)", tenant)


async def cursor(conn: asyncpg.Connection | asyncpg.Pool, *, for_update: bool = False) -> int:
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchval(f"SELECT cursor FROM consumer_cursor{lock}")


async def save_cursor(conn: asyncpg.Connection, value: int) -> None:
    await conn.execute("UPDATE consumer_cursor SET cursor = $1, update_time = now()", value)


async def load_bindings(conn: asyncpg.Connection, tag_ids: Iterable[int]) -> dict[int, Binding]:
    """The bindings of these tags, with their work centres' counter settings resolved."""
    ids = sorted({t for t in tag_ids if t <= _MAX_INT64})
    rows = await conn.fetch(
        "SELECT b.tag_id, b.role, b.work_center_id, w.counter_width, w.max_counter_jump FROM tag_bindings b"
        " JOIN work_centers w ON w.tenant_id = b.tenant_id AND w.id = b.work_center_id WHERE b.tag_id = ANY($1::bigint[])", ids)
    out = {}
    for r in rows:
        width, jump = domain.resolve_counter_settings(r["counter_width"], r["max_counter_jump"])
        out[r["tag_id"]] = Binding(r["tag_id"], r["work_center_id"], r["role"], width, jump)
    return out


async def load_state(conn: asyncpg.Connection, bindings: dict[int, Binding],
                     touched: Iterable[tuple[int, datetime]]) -> BookingState:
    """Everything events of these (tag, read time)s can touch, for the plan. Takes the order revision lock
    first and locks the orders involved (lock order: cursor, revision, orders; RPCs that write orders take
    revision then orders)."""
    touched = [(tag, t) for tag, t in touched if tag in bindings]
    state = BookingState(bindings=bindings)
    if not touched:
        return state
    await lock_revision(conn)
    work_centers = sorted({bindings[tag].work_center_id for tag, _ in touched})
    times = [t for _, t in touched]
    pairs = sorted({(bindings[tag].work_center_id, tag) for tag, _ in touched if bindings[tag].role in COUNTER_ROLES})
    for r in await conn.fetch(
            "SELECT s.work_center_id, s.tag_id, s.value FROM counter_state s"
            " JOIN unnest($1::text[], $2::bigint[]) AS k(wc, tag) ON s.work_center_id = k.wc AND s.tag_id = k.tag",
            [p[0] for p in pairs], [p[1] for p in pairs]):
        state.counters[(r["work_center_id"], r["tag_id"])] = int(r["value"])
    for r in await conn.fetch("SELECT work_center_id, running FROM machine_state"
                              " WHERE work_center_id = ANY($1::text[])", work_centers):
        state.machine[r["work_center_id"]] = r["running"]
    for r in await conn.fetch("SELECT work_center_id FROM downtimes WHERE work_center_id = ANY($1::text[])"
                              " AND automatic AND end_time IS NULL", work_centers):
        state.open_automatic.add(r["work_center_id"])
    for r in await conn.fetch(
            "SELECT id, order_id, work_center_id, start_time, end_time FROM order_runs"
            " WHERE work_center_id = ANY($1::text[]) AND start_time <= $3 AND (end_time IS NULL OR end_time >= $2)"
            " ORDER BY start_time", work_centers, min(times), max(times)):
        state.runs.setdefault(r["work_center_id"], []).append(
            Run(r["id"], r["order_id"], r["work_center_id"], r["start_time"], r["end_time"]))
    order_ids = sorted({run.order_id for runs in state.runs.values() for run in runs})
    for r in await conn.fetch("SELECT * FROM orders WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
                              order_ids):
        state.orders[r["id"]] = OrderTotals(r["id"], r["number"], OrderState(r["state"]), r["planned_quantity"],
                                            r["good_quantity"], r["scrap_quantity"], r["start_time"], r["end_time"])
    return state


async def apply(conn: asyncpg.Connection, effects: Effects) -> None:
    """Write what the plan decided, in its order: anomalies and downtime changes (in event order), then
    baselines, machine states, bookings, orders (each a new revision), ended runs, and one NOTIFY."""
    if effects.anomalies:
        await conn.executemany(
            "INSERT INTO tag_anomalies (work_center_id, tag_id, cursor, kind, previous_value, value, note, read_time)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [(a.work_center_id, a.tag_id, a.cursor, a.kind, a.previous, a.value_text, a.note, a.read_time)
             for a in effects.anomalies])
    for change in effects.downtime:
        if isinstance(change, OpenDowntime):
            await downtime.open_automatic(conn, change.work_center_id, change.order_id, change.start)
        elif isinstance(change, CloseDowntimes):
            await downtime.close_open(conn, change.work_center_id, change.end, automatic_only=change.automatic_only)
    if effects.baselines:
        await conn.executemany(
            "INSERT INTO counter_state (work_center_id, tag_id, value, cursor, read_time)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, work_center_id, tag_id) DO UPDATE SET"
            " value = excluded.value, cursor = excluded.cursor, read_time = excluded.read_time",
            [(wc, tag, b.value, b.cursor, b.read_time) for (wc, tag), b in effects.baselines.items()])
    if effects.machine_states:
        await conn.executemany(
            "INSERT INTO machine_state (work_center_id, tag_id, running, cursor, read_time)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, work_center_id) DO UPDATE SET"
            " tag_id = excluded.tag_id, running = excluded.running, cursor = excluded.cursor,"
            " read_time = excluded.read_time",
            [(wc, m.tag_id, m.running, m.cursor, m.read_time) for wc, m in effects.machine_states.items()])
    await bookings.insert_counted(conn, [(b.order_id, b.good, b.scrap, b.book_time, b.note, b.cursor, b.tag_id)
                                         for b in effects.bookings])
    last_revision = None
    for order in effects.orders:
        last_revision = await next_revision(conn)
        await orders.set_totals(conn, [(order.id, order.good, order.scrap, order.state, order.end, last_revision)])
    await orders.end_runs(conn, effects.closed_runs)
    if last_revision is not None:
        await notify(conn, last_revision)
