"""SQL every part of the store shares: the order revision lock, NOTIFY, idempotent-create keys, ids, and the
errors a missing or stale row gives."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from ...runtime.errors import Aborted, FailedPrecondition, NotFound, PreconditionViolation
from ..resources import Kind
from .schema import CHANNEL

_MAX_INT64 = 2**63 - 1


def parse_id(text: str, what: str) -> int:
    """A service-assigned id (a positive integer in text). Anything else names nothing: NOT_FOUND."""
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= _MAX_INT64:
        raise NotFound(f"no {what} with id {text!r}", metadata={f"{what.replace(' ', '_')}_id": text})
    return int(text)


def precondition(kind: str, subject: str, description: str, reason: str, **metadata: str) -> FailedPrecondition:
    return FailedPrecondition(description, reason=reason, metadata=metadata,
                              violations=[PreconditionViolation(type=kind, subject=subject, description=description)])


def missing(kind: Kind, resource_id: str) -> FailedPrecondition:
    return precondition(kind.field.upper(), f"{kind.collection}/{resource_id}",
                        f"{kind.name} {resource_id!r} does not exist", f"{kind.field.upper()}_NOT_FOUND",
                        **{f"{kind.field}_id": resource_id})


def stale(kind: Kind, resource_id: str, given: str, current: str) -> Aborted:
    return Aborted(f"{kind.name} {resource_id!r} changed since it was read (etag {given}, now {current}); "
                   "read it again and retry", reason="ETAG_MISMATCH",
                   metadata={f"{kind.field}_id": resource_id, "etag": current})


async def exists(conn: asyncpg.Connection, table: str, resource_id: str, *, lock: bool = False) -> bool:
    """Whether `table` has the row; `lock` takes FOR SHARE (it cannot be deleted before we commit)."""
    suffix = " FOR SHARE" if lock else ""
    return await conn.fetchval(f"SELECT 1 FROM {table} WHERE id = $1{suffix}", resource_id) is not None


async def lock_revision(conn: asyncpg.Connection) -> None:
    """Taken first by every transaction that writes orders, held to commit: revisions commit in order. The
    counter is the connection's tenant's (a row per tenant, made on its first order write)."""
    if await conn.fetchval("SELECT value FROM order_revision FOR NO KEY UPDATE") is None:
        await conn.execute("INSERT INTO order_revision (value) VALUES (0) ON CONFLICT (tenant_id) DO NOTHING")
        await conn.execute("SELECT value FROM order_revision FOR NO KEY UPDATE")


async def next_revision(conn: asyncpg.Connection) -> int:
    """The next revision of the connection's tenant (lock_revision first)."""
    return await conn.fetchval("UPDATE order_revision SET value = value + 1 RETURNING value")


async def current_revision(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The last revision of the connection's tenant (0 before its first order)."""
    return await conn.fetchval("SELECT coalesce((SELECT value FROM order_revision), 0)")


async def notify(conn: asyncpg.Connection, revision: int) -> None:
    """Announce `revision` of the connection's tenant (delivered on commit)."""
    await conn.execute("SELECT pg_notify($1, production.session_tenant() || ':' || $2)", CHANNEL, str(revision))


async def now(conn: asyncpg.Connection) -> datetime:
    """The transaction's time (what now() gives every statement of it)."""
    return await conn.fetchval("SELECT now()")


async def claim_request(conn: asyncpg.Connection, kind: str, request_id: str) -> str | None:
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


async def record_request(conn: asyncpg.Connection, kind: str, request_id: str, resource_id: int) -> None:
    if request_id:
        await conn.execute("UPDATE create_requests SET resource_id = $3 WHERE kind = $1 AND request_id = $2",
                           kind, request_id.lower(), str(resource_id))
