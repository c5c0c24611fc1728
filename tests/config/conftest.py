"""The config tests' server: the config service in process (tests/in_process.py) over the test's database.
`channel` and `stub` (tests/conftest.py) talk to it."""

from __future__ import annotations

import pytest

from in_process import Server, Servers, settings_for


@pytest.fixture
async def server(database_url: str, servers: Servers) -> Server:
    return await servers.start("config", settings_for("config", database_url=database_url))
