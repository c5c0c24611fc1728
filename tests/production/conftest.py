"""The production tests' server: the production service in process (tests/in_process.py) over the test's
database, its tag-event consumer with the tests' short waits. `channel` and `stub` (tests/conftest.py) talk to
it."""

from __future__ import annotations

import pytest

from in_process import Server, Servers, settings_for

from .support import TEST_CONSUMER


@pytest.fixture
async def server(database_url: str, servers: Servers) -> Server:
    return await servers.start("production", settings_for("production", database_url=database_url),
                               consumer=TEST_CONSUMER)
