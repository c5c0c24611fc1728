"""Fixtures of the ingest tests: in-process ingest servers on 127.0.0.1:0 over a fresh database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from fabrica_svc.ingest.config import IngestConfig

from .support import Ingest, IngestProcess, start_ingest, stop_ingest


@pytest.fixture
async def ingest_factory(database_url: str) -> AsyncIterator[Callable[..., Awaitable[Ingest]]]:
    """Start as many ingest servers (replicas) on the test's database as a test needs."""
    started: list[Ingest] = []

    async def start(config: IngestConfig | None = None, **settings: object) -> Ingest:
        ingest = await start_ingest(database_url, config, **settings)
        started.append(ingest)
        return ingest

    yield start
    for ingest in reversed(started):
        await stop_ingest(ingest)


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
