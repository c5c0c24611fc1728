"""Fixtures of the production tests: an in-process production server on 127.0.0.1:0 over a fresh database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc

from fabrica_svc.runtime.server import ServiceHost

from .support import start_production


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[ServiceHost]:
    host = await start_production(database_url)
    yield host
    await host.stop(grace=0)


@pytest.fixture
async def channel(server: ServiceHost) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.ProductionServiceStub:
    return pb_grpc.ProductionServiceStub(channel)
