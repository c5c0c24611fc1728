"""The shared runtime: migrations under concurrency, health, reflection, validation and error mapping."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from fabrica_svc.runtime.db import Migration, apply_migrations
from fabrica_svc.runtime.settings import SettingsError, load_settings

MIGRATIONS = [
    Migration(1, "create things", "CREATE TABLE things (id int PRIMARY KEY)"),
    Migration(2, "add name", "ALTER TABLE things ADD COLUMN name text"),
]


async def test_concurrent_replicas_apply_each_migration_once(database_url: str) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(apply_migrations(c, "smoke", MIGRATIONS) for c in conns))
        assert sorted(v for r in results for v in r) == [1, 2]
        rows = await conns[0].fetch("SELECT version FROM smoke.schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [1, 2]
        assert await apply_migrations(conns[0], "smoke", MIGRATIONS) == []
    finally:
        for c in conns:
            await c.close()


async def test_failed_migration_leaves_nothing_behind(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        bad = [*MIGRATIONS, Migration(3, "broken", "ALTER TABLE nope ADD COLUMN x int")]
        with pytest.raises(asyncpg.UndefinedTableError):
            await apply_migrations(conn, "smoke2", bad)
        exists = await conn.fetchval("SELECT to_regclass('smoke2.things')")
        assert exists is None
    finally:
        await conn.close()


def test_settings_reject_bad_values_with_the_variable_name() -> None:
    with pytest.raises(SettingsError, match="FABRICA_PORT"):
        load_settings("config", {"FABRICA_PORT": "abc"})
    with pytest.raises(SettingsError, match="FABRICA_PORT"):
        load_settings("config", {"FABRICA_PORT": "70000"})
    with pytest.raises(SettingsError, match="FABRICA_LOG_FORMAT"):
        load_settings("config", {"FABRICA_LOG_FORMAT": "xml"})
    s = load_settings("ingest", {})
    assert s.port == 50052 and s.database_url is None
