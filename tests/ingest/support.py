"""Builders and a harness shared by the ingest tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import config_service_pb2_grpc as config_grpc
from fabrica.config.v1 import tenant_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from fabrica_svc.ingest.config import IngestConfig
from fabrica_svc.runtime.settings import Settings
from in_process import Server, open_server, settings_for
from procs import PLAINTEXT
from procs import wait_for as _wait_for

GOOD = reading_pb2.QUALITY_GOOD
MEASUREMENT = reading_pb2.TAG_ROLE_MEASUREMENT
PRODUCTION_COUNTER = reading_pb2.TAG_ROLE_PRODUCTION_COUNTER
SCRAP_COUNTER = reading_pb2.TAG_ROLE_SCRAP_COUNTER
MACHINE_STATE = reading_pb2.TAG_ROLE_MACHINE_STATE

#: 2025-03-01T00:00:00Z in microseconds: test data lives around it (well inside any retention test window).
T0_US = 1_740_787_200_000_000
REPO = Path(__file__).resolve().parents[2]


def ts_us(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def reading(tag_id: int, us: int, value: float | int | bool | str | bytes | None = 1.0, *,
            quality: int = GOOD, plc_id: str = "plc-1", role: int = MEASUREMENT, kind: str | None = None,
            error: str = "") -> reading_pb2.Reading:
    r = reading_pb2.Reading(tag_id=tag_id, read_time=ts_us(us), quality=quality, plc_id=plc_id, role=role,
                            error=error)
    if value is not None:
        if kind is None:
            kind = {bool: "bool_value", int: "int_value", float: "double_value", str: "string_value",
                    bytes: "bytes_value"}[type(value)]
        setattr(r.value, kind, value)
    return r


def batch(collector_id: str, sequence: int, readings: Sequence[reading_pb2.Reading]) -> reading_pb2.ReadingBatch:
    return reading_pb2.ReadingBatch(collector_id=collector_id, sequence=sequence, readings=readings)


def numbered_batches(collector_id: str, count: int, size: int, *, tags: int = 10, first_sequence: int = 1,
                     start_us: int = T0_US, role: int = MEASUREMENT, plc_id: str = "plc-1",
                     tag_base: int = 1) -> list[reading_pb2.ReadingBatch]:
    """`count` batches of `size` readings; reading i (over all batches) has tag tag_base + i % tags, time
    start_us + i ms and value i, so every (tag, time) is distinct and the value says which reading it is."""
    out = []
    i = 0
    for b in range(count):
        rs = []
        for _ in range(size):
            rs.append(reading(tag_base + i % tags, start_us + i * 1000, float(i), plc_id=plc_id, role=role))
            i += 1
        out.append(batch(collector_id, first_sequence + b, rs))
    return out


def open_request(collector_id: str) -> pb.StreamReadingsRequest:
    return pb.StreamReadingsRequest(open=pb.StreamOpen(collector_id=collector_id))


def batch_request(b: reading_pb2.ReadingBatch) -> pb.StreamReadingsRequest:
    return pb.StreamReadingsRequest(batch=b)


#: An in-process ingest server (the real app in the ServiceHost) and a client channel to it: `.stub`,
#: `.app`, `.address`, `.database_url`.
Ingest = Server


def ingest_settings(database_url: str, **overrides: object) -> Settings:
    return settings_for("ingest", database_url=database_url, **overrides)


#: What the ingest tests run with unless they say otherwise: batches are grouped for 5 ms, not 20.
TEST_CONFIG = IngestConfig(group_max_delay=0.005)
#: Streams still open when a test ends get this long to finish.
STOP_GRACE = 0.5


async def start_ingest(database_url: str, config: IngestConfig | None = None, **settings: object) -> Ingest:
    """An ingest server the caller stops with `stop_ingest` (the `ingest_factory` fixture stops its own)."""
    return await open_server("ingest", ingest_settings(database_url, **settings), grace=STOP_GRACE,
                             config=config or TEST_CONFIG)


async def stop_ingest(ingest: Ingest) -> None:
    await ingest.stop()


async def stream_batches(stub: pb_grpc.IngestServiceStub, collector_id: str,
                         batches: Sequence[reading_pb2.ReadingBatch], *,
                         metadata: Sequence[tuple[str, str]] = ()) -> tuple[int, list[pb.BatchAck]]:
    """Open a stream (with `metadata`, e.g. the ``x-fabrica-tenant`` header of an installation-wide caller),
    send `batches`, close; return (resume sequence, acks)."""
    call = stub.StreamReadings(metadata=tuple(metadata) or None)
    await call.write(open_request(collector_id))
    first = await call.read()
    acks = []
    for b in batches:
        await call.write(batch_request(b))
    await call.done_writing()
    while (response := await call.read()) is not grpc.aio.EOF:
        acks.append(response.ack)
    return first.resume.committed_sequence, acks


async def fetchval(dsn: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()



async def wait_for(predicate, *, timeout: float = 15.0, **kw):  # noqa: ANN001, ANN003, ANN201
    """procs.wait_for with this suite's default timeout."""
    return await _wait_for(predicate, timeout=timeout, **kw)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int | None:
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=1.0
        )
        return response.status
    except grpc.aio.AioRpcError:
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class IngestProcess:
    """`fabrica serve ingest` as a child process (for SIGKILL tests)."""

    port: int
    database_url: str
    log_path: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "DATABASE_URL": self.database_url, "FABRICA_METRICS_PORT": "-1",
               "FABRICA_LOG_FORMAT": "text", "PYTHONPATH": f"{REPO / 'gen'}:{REPO / 'services'}",
               **PLAINTEXT, **self.env_extra}
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open by the child)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fabrica_svc.cli", "serve", "ingest", "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()
        async with grpc.aio.insecure_channel(self.address) as channel:
            async def serving() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"ingest exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
                return await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            await wait_for(serving, timeout=timeout, interval=0.1, what="ingest SERVING")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


class TenantsConfig(config_grpc.ConfigServiceServicer):
    """A real gRPC ConfigService serving ListTenants only, from `tenants` (a test changes them at will), in
    pages of the size asked: the quotas and retention ingest's TenantDirectory polls. (Config's own
    ListTenants is another part's; every other RPC here is UNIMPLEMENTED, as the generated base class has it.)"""

    def __init__(self, tenants: Sequence[tenant_pb2.Tenant] = ()):
        self.tenants = {t.code: t for t in tenants}
        self.calls = 0
        self.unimplemented = False

    async def ListTenants(self, request: config_pb.ListTenantsRequest,
                          context: grpc.aio.ServicerContext) -> config_pb.ListTenantsResponse:
        self.calls += 1
        if self.unimplemented:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListTenants is not served")
        codes = sorted(self.tenants)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 50)
        return config_pb.ListTenantsResponse(tenants=[self.tenants[c] for c in codes[start:end]],
                                             next_page_token=str(end) if end < len(codes) else "")


async def serve_config(servicer: config_grpc.ConfigServiceServicer) -> tuple[grpc.aio.Server, str]:
    """`servicer` on 127.0.0.1:0; returns the server (the caller stops it) and its address."""
    server = grpc.aio.server()
    config_grpc.add_ConfigServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def tenant(code: str, readings_per_second: int = 0, raw_days: int = 0) -> tenant_pb2.Tenant:
    return tenant_pb2.Tenant(code=code, name=code, active=True,
                             quota=tenant_pb2.TenantQuota(readings_per_second=readings_per_second),
                             retention=tenant_pb2.RetentionPolicy(raw_days=raw_days))
