"""Process-level fault test: `fabrica serve collector` and `fabrica serve ingest` as child processes.

The collector is killed with SIGKILL while ingest is down and a backlog is on disk; both are restarted;
ingest ends with every reading exactly once, and sequence numbers went on increasing across the restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from fabrica.collector.v1 import collector_service_pb2 as cpb
from fabrica.collector.v1 import collector_service_pb2_grpc as cpb_grpc
from fabrica.common.v1 import reading_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabrica_svc.collector.spool import Spool
from fabrica_svc.plcsim import Simulator
from procs import PLAINTEXT, bound_ports

from .support import collector_settings, free_port, key, store_config, stored_readings, wait_for
from .test_store_and_forward import busy_plcs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Service:
    """One `fabrica serve <service>` child process. With port 0 it binds a free port and reports it through
    its port file (read back by `start`); a restart asks for the port it had, so peers keep its address."""

    def __init__(self, service: str, port: int, env: dict[str, str], log: Path):
        self.service, self.port, self.env, self.log = service, port, env, log
        self.port_file = log.with_name(f"{log.name}.ports.json")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        assert self.port, f"{self.service} has not reported its port yet"
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'gen'}:{REPO / 'services'}", "FABRICA_METRICS_PORT": "-1",
               "FABRICA_LOG_FORMAT": "text", **PLAINTEXT, **self.env, "FABRICA_PORT_FILE": str(self.port_file)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fabrica_svc.cli", "serve", self.service, "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )
        proc = self.proc

        def reported() -> dict[str, int | None] | None:
            assert proc.poll() is None, f"{self.service} exited:\n{self.log.read_text()[-3000:]}"
            return bound_ports(self.port_file, proc.pid, self.service)

        self.port = (await wait_for(reported, timeout=60, what=f"{self.service} to report its port"))["port"]
        deadline = time.monotonic() + 60
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:  # bounded: SERVING, the process died, or the deadline
                assert self.proc.poll() is None, f"{self.service} exited:\n{self.log.read_text()[-3000:]}"
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, f"{self.service} not SERVING:\n{self.log.read_text()[-3000:]}"
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.kill()


@pytest.fixture
async def live() -> AsyncIterator[Simulator]:
    async with Simulator(seed=8) as sim:
        yield sim


async def status_of(collector: Service) -> cpb.GetStatusResponse:
    async with grpc.aio.insecure_channel(collector.address) as channel:
        return await cpb_grpc.CollectorServiceStub(channel).GetStatus(cpb.GetStatusRequest(), timeout=5)


def batches_on_disk(spool_dir: Path, scratch: Path) -> dict[int, reading_pb2.ReadingBatch]:
    """The batches in a (copy of a) spool folder, read the way a restarting collector reads them."""
    shutil.copytree(spool_dir, scratch)
    spool = Spool(scratch, 1 << 30)
    spool.open()
    return {seq: reading_pb2.ReadingBatch.FromString(p)
            for seq, p in spool.read_after(spool.acked, 1 << 30, 1 << 40, durable_only=False)}


async def test_collector_killed_with_sigkill_while_ingest_is_down_loses_and_duplicates_nothing(
    database_url: str, live: Simulator, tmp_path: Path, services: list[Service]
) -> None:
    settings = collector_settings(tmp_path / "data")
    store_config(settings, busy_plcs(live))
    ingest_port = free_port()  # ingest comes up later, at the address the collector is given now
    env = {
        "FABRICA_DATA_DIR": str(settings.base.data_dir), "FABRICA_COLLECTOR_ID": settings.collector_id,
        "FABRICA_CONFIG_ADDR": settings.config_addr, "FABRICA_INGEST_ADDR": f"127.0.0.1:{ingest_port}",
        "FABRICA_COLLECTOR_BATCH_LATENCY_MS": "50", "FABRICA_COLLECTOR_RECONNECT_MIN": "0.05",
        "FABRICA_COLLECTOR_RECONNECT_MAX": "0.3",
    }
    collector = Service("collector", 0, env, tmp_path / "collector.log")
    ingest = Service("ingest", ingest_port, {"DATABASE_URL": database_url}, tmp_path / "ingest.log")
    services.extend([collector, ingest])

    await collector.start()
    status = await wait_for(lambda: _backlog_at_least(collector, 300), timeout=30, what="a backlog on disk")
    assert not status.uplink_connected
    collector.kill()

    spool_dir = settings.state_dir / "spool"
    before = batches_on_disk(spool_dir, tmp_path / "copy")
    assert before and sorted(before) == list(range(1, max(before) + 1))
    killed_at = max(before)

    await ingest.start()
    await collector.start()
    await wait_for(lambda: _drained(collector, below=300), timeout=30, what="the backlog to drain")
    # Stop the readings: the PLCs go silent (one bad-quality reading per tag, then nothing), all is sent.
    await live.pause()
    await wait_for(lambda: _drained(collector, below=1), timeout=30, what="everything acknowledged")
    assert collector.terminate() == 0

    state = json.loads((spool_dir / "state.json").read_text())
    # Numbering went on after the SIGKILL, and ingest acknowledged everything up to the last drain.
    assert state["high_water"] > killed_at and state["acked"] > killed_at

    sent_before = [r for b in before.values() for r in b.readings]
    stored = await stored_readings(ingest.address, _tag_ids(settings))
    counts = Counter(map(key, stored))
    assert max(counts.values()) == 1, "a reading was stored twice"
    assert all(counts[key(r)] == 1 for r in sent_before), "a reading on disk at the SIGKILL was lost"
    assert len(stored) > len(sent_before)  # and what came after the restart is there too


async def _backlog_at_least(collector: Service, n: int) -> cpb.GetStatusResponse | None:
    try:
        status = await status_of(collector)
    except grpc.aio.AioRpcError:
        return None
    return status if status.backlog_readings >= n else None


async def _drained(collector: Service, below: int) -> bool:
    try:
        status = await status_of(collector)
    except grpc.aio.AioRpcError:
        return False
    return status.uplink_connected and status.backlog_readings < below


def _tag_ids(settings) -> set[int]:  # noqa: ANN001
    from fabrica.config.v1 import config_service_pb2

    stored = config_service_pb2.WatchPlcsResponse.FromString((settings.state_dir / "config.binpb").read_bytes())
    return {t.id for p in stored.snapshot.plcs for t in p.tags}
