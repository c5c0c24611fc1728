"""All SQL of the production service (schema ``production``), split by resource.

``schema`` (migrations, channel, lock key), ``master`` (sectors, work centres, items, defect codes,
downtime reasons and tag bindings), ``orders`` (orders and their runs), ``bookings`` (bookings and defects),
``downtime`` (stops and what OEE reads) and ``events`` (the tag-event consumer's state and effects). Every
function takes the connection of the transaction it runs in and returns plain dataclasses (``records``, or
the booking engine's types); the service layer (service.py) opens the transactions and decides.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from .schema import CHANNEL, CONSUMER_LOCK_KEY, MIGRATIONS


class Database:
    """The pool, and the two kinds of transaction the service layer runs."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[asyncpg.Connection]:
        """A read-write transaction (read committed)."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[asyncpg.Connection]:
        """A read-only snapshot (repeatable read): what it reads is consistent."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn


__all__ = ["CHANNEL", "CONSUMER_LOCK_KEY", "MIGRATIONS", "Database"]
