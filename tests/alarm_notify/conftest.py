"""Fixtures of the notification and forwarding tests: the alarm schema's notify tables on a fresh database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from fabrica_svc.alarm.notify import NOTIFY_MIGRATIONS
from fabrica_svc.runtime import tenancy
from fabrica_svc.runtime.db import apply_migrations, create_pool
from webhook_receiver import Receiver


@pytest.fixture(autouse=True)
def in_default_tenant() -> Iterator[None]:
    """These tests call notify's store functions as a request would: in a tenant (``default``), since the
    tables are under row-level security (a connection of no tenant sees and writes nothing)."""
    token = tenancy.set_current(tenancy.DEFAULT)
    yield
    tenancy.reset(token)


@pytest.fixture
async def alarm_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(database_url)
    try:
        await apply_migrations(conn, "alarm", NOTIFY_MIGRATIONS)
    finally:
        await conn.close()
    pool = await create_pool(database_url, "alarm")
    yield pool
    await pool.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r
