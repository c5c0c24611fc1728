"""Fixtures of the ingest tests: in-process ingest servers (tests/in_process.py) over a fresh database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import pytest

from fabrica_svc.ingest.config import IngestConfig
from in_process import Servers

from .support import STOP_GRACE, TEST_CONFIG, Ingest, IngestProcess, ingest_settings


@pytest.fixture
def ingest_factory(database_url: str, servers: Servers) -> Callable[..., Awaitable[Ingest]]:
    """Start as many ingest servers (replicas) on the test's database as a test needs; `servers` stops them."""

    async def start(config: IngestConfig | None = None, **settings: object) -> Ingest:
        return await servers.start("ingest", ingest_settings(database_url, **settings), grace=STOP_GRACE,
                                   config=config or TEST_CONFIG)

    return start


@pytest.fixture
async def ingest(ingest_factory: Callable[..., Awaitable[Ingest]]) -> Ingest:
    return await ingest_factory()


@pytest.fixture
def processes() -> Iterator[list[IngestProcess]]:
    """Child ingest processes a test starts; SIGKILLed at the end whatever happened."""
    procs: list[IngestProcess] = []
    yield procs
    for p in procs:
        p.kill()
