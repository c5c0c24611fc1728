"""The shared runtime: migrations under concurrency, settings, and what ServiceHost gives every service, on a
real in-process server with a small probe service: health, reflection, the one interceptor's validation
(unary, server-streaming and every message of a bidi stream) and error mapping, and the port file."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as cpb
from fabrica.config.v1 import config_service_pb2_grpc as cpb_grpc
from fabrica.config.v1 import plc_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as ipb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fabrica_svc.runtime.db import Migration, apply_migrations
from fabrica_svc.runtime.errors import Aborted, FailedPrecondition, NotFound, PreconditionViolation
from fabrica_svc.runtime.server import LIVENESS, Resources, ServiceHost
from fabrica_svc.runtime.settings import SettingsError, load_settings
from grpc_helpers import error_info, field_violations, rich_status

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


def test_the_port_file_setting() -> None:
    assert load_settings("config", {}).port_file is None
    assert load_settings("config", {"FABRICA_PORT_FILE": "/run/fabrica/ports.json"}).port_file == Path(
        "/run/fabrica/ports.json")


# ------------------------------------------------------------------------------ ServiceHost, on a probe

CONFIG = cpb.DESCRIPTOR.services_by_name["ConfigService"].full_name
INGEST = ipb.DESCRIPTOR.services_by_name["IngestService"].full_name
Code = grpc.StatusCode


class ConfigProbe(cpb_grpc.ConfigServiceServicer):
    """GetPlc answers by id: each id raises one kind of error. WatchPlcs sends a snapshot, then fails."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def GetPlc(self, request: cpb.GetPlcRequest, context: grpc.aio.ServicerContext) -> cpb.GetPlcResponse:
        self.calls.append(request.id)
        if request.id == "missing":
            raise NotFound("PLC missing does not exist", metadata={"plc_id": request.id})
        if request.id == "running":
            raise FailedPrecondition("the PLC is polled", violations=[
                PreconditionViolation("STATE", "plcs/running", "polled by cell-1")], reason="PLC_IN_USE")
        if request.id == "stale":
            raise Aborted("etag mismatch", reason="ETAG_MISMATCH")
        if request.id == "db-gone":
            raise asyncpg.CannotConnectNowError("the database system is shutting down")
        if request.id == "bug":
            raise KeyError("secret-internal-detail")
        return cpb.GetPlcResponse(plc=plc_pb2.Plc(id=request.id))

    async def WatchPlcs(self, request: cpb.WatchPlcsRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[cpb.WatchPlcsResponse]:
        self.calls.append(request.collector_id)
        yield cpb.WatchPlcsResponse(revision=3, snapshot=cpb.PlcSnapshot())
        raise NotFound(f"collector {request.collector_id} was removed")


class IngestProbe(ipb_grpc.IngestServiceServicer):
    """StreamReadings acknowledges each batch it is handed."""

    def __init__(self) -> None:
        self.received: list[ipb.StreamReadingsRequest] = []

    async def StreamReadings(self, requests: AsyncIterator[ipb.StreamReadingsRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[ipb.StreamReadingsResponse]:
        async for request in requests:
            self.received.append(request)
            if request.HasField("batch"):
                yield ipb.StreamReadingsResponse(ack=ipb.BatchAck(sequence=request.batch.sequence))


class ProbeApp:
    """A service without a database, as ServiceHost sees any service."""

    name = "probe"
    service_names = (CONFIG, INGEST)
    schema = None
    migrations: list[Migration] = []

    def __init__(self) -> None:
        self.config, self.ingest = ConfigProbe(), IngestProbe()

    async def start(self, resources: Resources) -> None:
        pass

    def register(self, server: grpc.aio.Server) -> None:
        cpb_grpc.add_ConfigServiceServicer_to_server(self.config, server)
        ipb_grpc.add_IngestServiceServicer_to_server(self.ingest, server)

    async def stop(self) -> None:
        pass


async def probe_host(app: ProbeApp, tmp_path: Path) -> AsyncIterator[ServiceHost]:
    """A started ServiceHost of `app` on 127.0.0.1:0, stopped afterwards (the body of a fixture)."""
    settings = load_settings("config", {"FABRICA_INSECURE": "1"}).with_overrides(port=0, metrics_port=-1, data_dir=tmp_path)
    host = ServiceHost(app, settings)  # type: ignore[arg-type]
    await host.start()
    yield host
    await host.stop(grace=0)


@pytest.fixture
async def probe(tmp_path: Path) -> AsyncIterator[ServiceHost]:
    async for host in probe_host(ProbeApp(), tmp_path):
        yield host


@pytest.fixture
async def channel(probe: ServiceHost) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(probe.address) as ch:
        yield ch


async def test_health_is_serving_for_the_server_each_service_and_liveness_and_ends_on_shutdown(
    probe: ServiceHost, channel: grpc.aio.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", CONFIG, INGEST, LIVENESS):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(service="fabrica.nope.v1.NopeService"))
    assert err.value.code() == Code.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=CONFIG))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    await probe.health.enter_graceful_shutdown()  # what stop() does first: watchers hear it before the end
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()


async def test_reflection_lists_the_services_and_describes_their_files(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(**request: object) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(**request))
        await call.done_writing()
        response = await call.read()
        call.cancel()
        return response

    listed = await ask(list_services="")
    assert sorted(s.name for s in listed.list_services_response.service) == sorted(
        [CONFIG, INGEST, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"])
    described = await ask(file_containing_symbol=CONFIG)
    assert described.file_descriptor_response.file_descriptor_proto, "the file that defines the service"


async def test_an_invalid_request_is_invalid_argument_with_field_violations_before_the_handler_runs(
    probe: ServiceHost, channel: grpc.aio.Channel
) -> None:
    stub = cpb_grpc.ConfigServiceStub(channel)
    app: ProbeApp = probe.app  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetPlc(cpb.GetPlcRequest(id=""))
    assert err.value.code() == Code.INVALID_ARGUMENT and list(field_violations(err.value)) == ["id"]
    assert error_info(err.value).reason == "INVALID_ARGUMENT"
    # Server streaming: refused before the first message.
    call = stub.WatchPlcs(cpb.WatchPlcsRequest(collector_id="Not An Id"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == Code.INVALID_ARGUMENT and list(field_violations(err.value)) == ["collector_id"]
    assert app.config.calls == []
    assert (await stub.GetPlc(cpb.GetPlcRequest(id="press-1"))).plc.id == "press-1"
    assert app.config.calls == ["press-1"]


async def test_every_message_of_a_client_stream_is_validated_and_a_bad_one_ends_only_that_stream(
    probe: ServiceHost, channel: grpc.aio.Channel
) -> None:
    stub = ipb_grpc.IngestServiceStub(channel)
    app: ProbeApp = probe.app  # type: ignore[assignment]
    reading = reading_pb2.Reading(tag_id=1, read_time=timestamp_pb2.Timestamp(seconds=1_800_000_000),
                                  quality=reading_pb2.QUALITY_GOOD, plc_id="press-1")
    batch = reading_pb2.ReadingBatch(collector_id="cell-1", sequence=1, readings=[reading])
    call = stub.StreamReadings()
    await call.write(ipb.StreamReadingsRequest(open=ipb.StreamOpen(collector_id="cell-1")))
    await call.write(ipb.StreamReadingsRequest(batch=batch))
    assert (await call.read()).ack.sequence == 1
    await call.write(ipb.StreamReadingsRequest())  # neither open nor batch: the oneof is required
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "message 2 of the stream is invalid" in err.value.details()
    assert len(app.ingest.received) == 2  # the handler never saw the bad message
    # The server goes on: a new stream works.
    again = stub.StreamReadings()
    await again.write(ipb.StreamReadingsRequest(batch=batch))
    assert (await again.read()).ack.sequence == 1
    again.cancel()


@pytest.mark.parametrize("plc_id, code, reason", [
    ("missing", Code.NOT_FOUND, "NOT_FOUND"),
    ("running", Code.FAILED_PRECONDITION, "PLC_IN_USE"),
    ("stale", Code.ABORTED, "ETAG_MISMATCH"),
    ("db-gone", Code.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    ("bug", Code.INTERNAL, "INTERNAL"),
])
async def test_errors_are_mapped_to_codes_with_details_in_one_place(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture, plc_id: str, code: Code, reason: str
) -> None:
    with caplog.at_level(logging.ERROR, logger="fabrica_svc.runtime"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cpb_grpc.ConfigServiceStub(channel).GetPlc(cpb.GetPlcRequest(id=plc_id))
    assert err.value.code() == code
    info = error_info(err.value)
    assert info.reason == reason and info.domain == "fabrica.dev"
    assert rich_status(err.value).code == code.value[0]
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if plc_id == "bug":
        # A bug: no internals in the answer; the traceback is in the log.
        assert err.value.details() == "internal error; see the service log"
        assert "secret-internal-detail" not in str(err.value.trailing_metadata())
        assert len(logged) == 1 and logged[0].exc_info is not None
    else:
        assert logged == []  # an expected error is an answer, not a log line
    if plc_id == "missing":
        assert dict(info.metadata) == {"plc_id": "missing"}
    if plc_id == "running":
        (detail,) = [d for d in rich_status(err.value).details if d.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR)]
        failure = error_details_pb2.PreconditionFailure()
        detail.Unpack(failure)
        assert [(v.type, v.subject) for v in failure.violations] == [("STATE", "plcs/running")]


async def test_an_error_in_a_server_stream_after_messages_is_mapped_too(channel: grpc.aio.Channel) -> None:
    call = cpb_grpc.ConfigServiceStub(channel).WatchPlcs(cpb.WatchPlcsRequest(collector_id="cell-1"))
    assert (await call.read()).revision == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == Code.NOT_FOUND and error_info(err.value).reason == "NOT_FOUND"


async def test_the_port_file_lists_each_service_of_the_process_with_its_bound_ports(tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    port_file.write_text(json.dumps({"pid": os.getpid() + 1, "services": {"ingest": {"port": 1}}}))  # stale
    hosts = []
    try:
        for name in ("config", "production"):
            settings = load_settings(name, {"FABRICA_INSECURE": "1"}).with_overrides(port=0, metrics_port=0,
                                                                                   data_dir=tmp_path,
                                                              port_file=port_file)
            app = ProbeApp()
            app.name = name
            host = ServiceHost(app, settings)  # type: ignore[arg-type]
            await host.start()
            hosts.append(host)
        written = json.loads(port_file.read_text())
        assert written == {"pid": os.getpid(), "services": {
            h.app.name: {"port": h.port, "metrics_port": h.metrics_port} for h in hosts}}
        assert all(h.port and h.metrics_port for h in hosts)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{written['services']['production']['port']}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=CONFIG))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert [p.name for p in tmp_path.iterdir()] == ["ports.json"]  # no scratch file left behind
    finally:
        for host in hosts:
            await host.stop(grace=0)
