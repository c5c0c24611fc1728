"""Collector: how many Modbus TCP devices one collector process keeps on schedule.

Each simulated device is its own pymodbus Modbus TCP server (its own port and connection) with 100 holding
registers whose values all change every second; the collector polls each device once a second, one block
read of 100 registers, 100 uint16 tags, so every poll reports every tag (report by exception then reports
as much as a plain publisher would). The device count goes up in steps until the p99 poll lateness passes
100 ms (or a poll fails or a tick is skipped), or the cap (FABRICA_BENCH_MAX_DEVICES, default 1,000).

The collector is the real thing, in this process: pollers, batcher, the store-and-forward log on disk
(with its fsyncs), and the uplink, streaming to an ingest stand-in that acknowledges every batch without
storing it (Postgres is benchmark `ingest`'s subject). The devices and the stand-in run in a child
process, so this process's CPU time is the collector's own. Per step: p99 lateness, tags/s decoded,
readings/s reported, batches acknowledged, CPU of the collector and of the device process.

Printed beside Neuron's published figure (15,000 tags/s at ~124 % CPU of 4 cores, 500 devices x 30 tags)
and beside the decoder alone (decoded tags/s of ModbusBlock.decode on 100-register blocks), measured in
this run. Nothing asserts on speed. Run: ``make bench`` or ``.venv/bin/python -m benchmarks.collector``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REGISTERS = 100
INTERVAL = 1.0
WARMUP = 2.5
WINDOW = 5.0
LATENESS_LIMIT = 0.100
STEPS = (25, 50, 100, 200, 300, 400, 500, 600, 800, 1000)
NEURON = {"devices": 500, "tags": 30, "tags_per_s": 15_000, "cpu": "~124 % (of 4 cores)"}
REPO = Path(__file__).resolve().parents[1]


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ----------------------------------------------------------------------------------------- device process


async def _serve_devices(count: int) -> None:
    import grpc
    from fabrica.ingest.v1 import ingest_service_pb2 as pb
    from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def changing(fc, start, address, count, registers, values):  # noqa: ANN001, ANN202 - pymodbus hook
        base = int(time.time()) * 7
        for i in range(address - start, address - start + count):
            registers[i] = (base + i) & 0xFFFF
        return None

    servers, ports = [], []
    for _ in range(count):
        device = SimDevice(id=1, simdata=[SimData(0, count=REGISTERS, datatype=DataType.REGISTERS)], action=changing)
        server = ModbusTcpServer(device, address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        servers.append(server)
        ports.append(server.transport.sockets[0].getsockname()[1])

    class Sink(pb_grpc.IngestServiceServicer):
        """Acknowledges every batch at once (stands in for ingest; stores nothing)."""

        async def StreamReadings(self, requests, context):  # noqa: ANN001, ANN201
            first = await anext(aiter(requests))
            yield pb.StreamReadingsResponse(resume=pb.StreamResume(collector_id=first.open.collector_id))
            async for request in requests:
                yield pb.StreamReadingsResponse(ack=pb.BatchAck(sequence=request.batch.sequence,
                                                                written=len(request.batch.readings)))

    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_IngestServiceServicer_to_server(Sink(), grpc_server)
    sink = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    print(json.dumps({"ports": ports, "sink": sink}), flush=True)
    # Until the parent closes our stdin (or dies).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await grpc_server.stop(0)
    for server in servers:
        await server.shutdown()


# ------------------------------------------------------------------------------------------ decoder only


def _decoder_only(seconds: float = 1.5) -> float:
    from fabrica_svc.collector.blocks import plan_modbus_reads
    from fabrica_svc.plcmodel.spec import DataType, ModbusTable, TagSpec

    specs = [TagSpec(i + 1, DataType.UINT16, modbus_table=ModbusTable.HOLDING_REGISTER, address=i)
             for i in range(REGISTERS)]
    (block,) = plan_modbus_reads(specs)
    data = [(i * 7919) & 0xFFFF for i in range(REGISTERS)]
    decoded, deadline = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(100):
            block.decode(data)
        decoded += 100 * REGISTERS
    return decoded / (time.perf_counter() - started)


# ------------------------------------------------------------------------------ spool + uplink alone


async def _spool_uplink_cpu(sink: int, readings: int, raw: bool) -> float:
    """CPU µs of this process per reading from Batcher.add to its acknowledgement (batcher, spool on disk,
    uplink; the readings are built beforehand, as the pollers would). `raw`: the spooled bytes go out as they
    are (what the uplink does); otherwise each record is parsed and encoded again before it is sent (before)."""
    from google.protobuf import timestamp_pb2

    from fabrica.common.v1 import reading_pb2
    from fabrica_svc.collector.batcher import Batcher
    from fabrica_svc.collector.spool import Spool
    from fabrica_svc.collector.uplink import SpoolSource, Uplink

    class Reencoding(SpoolSource):
        """The uplink's source as it was: parse each record, set its sequence, let the client encode it."""

        async def batches_after(self, sequence):  # noqa: ANN001, ANN201
            async for raw_batch in super().batches_after(sequence):
                batch = reading_pb2.ReadingBatch.FromString(raw_batch.payload)
                batch.sequence = raw_batch.sequence
                yield batch

    state = Path(tempfile.mkdtemp(prefix="fabrica-bench-uplink-"))
    spool = Spool(state / "spool", 1 << 30)
    spool.open()
    await spool.start()
    batcher = Batcher("bench-uplink", spool, max_readings=500, max_latency=0.2)
    uplink = Uplink(f"127.0.0.1:{sink}", "bench-uplink", spool, state, backoff_min=0.1, backoff_max=1.0)
    if not raw:
        uplink.source = Reencoding(spool, "bench-uplink")
    stamp = timestamp_pb2.Timestamp(seconds=1_740_787_200)
    built = [reading_pb2.Reading(tag_id=1 + i % 1000, read_time=stamp, quality=1, plc_id="dev-0001",
                                 value=reading_pb2.Value(uint_value=i & 0xFFFF)) for i in range(readings)]
    uplink.start()
    try:
        await asyncio.sleep(0.2)  # connected
        cpu = time.process_time()
        for i in range(0, readings, 100):  # polls of 100 tags
            for r in built[i:i + 100]:
                batcher.add(r)
            await asyncio.sleep(0)
        batcher.cut()
        while spool.acked < spool.high_water:
            await asyncio.sleep(0.002)
        return (time.process_time() - cpu) / readings * 1e6
    finally:
        await uplink.stop()
        await spool.close()
        shutil.rmtree(state, ignore_errors=True)


# ----------------------------------------------------------------------------------------- the collector


def _plcs(ports: list[int]):  # noqa: ANN202
    from fabrica.config.v1 import plc_pb2
    from google.protobuf import duration_pb2

    plcs = []
    for n, port in enumerate(ports):
        plc = plc_pb2.Plc(
            id=f"dev-{n:04d}", collector_id="bench", enabled=True,
            modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1", port=port, unit_id=1,
                                                   timeout=duration_pb2.Duration(seconds=1)),
            poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration_pb2.Duration(seconds=1))],
        )
        for i in range(REGISTERS):
            plc.tags.add(id=n * REGISTERS + i + 1, name=f"r{i}", data_type=plc_pb2.DATA_TYPE_UINT16,
                         modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=i))
        plcs.append(plc)
    return plcs


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run_collector(ports: list[int], sink: int, child_pid: int, steps: list[int]) -> list[dict]:
    import psutil

    from fabrica_svc.collector.batcher import Batcher
    from fabrica_svc.collector.drivers import BusRegistry
    from fabrica_svc.collector.metrics import PollMetrics
    from fabrica_svc.collector.spool import Spool
    from fabrica_svc.collector.supervisor import PlcSupervisor
    from fabrica_svc.collector.uplink import Uplink
    from fabrica_svc.runtime.telemetry import configure_telemetry

    configure_telemetry("collector")  # as in `fabrica serve collector`: the SDK meter records every poll
    child = psutil.Process(child_pid)
    state = Path(tempfile.mkdtemp(prefix="fabrica-bench-collector-"))
    spool = Spool(state / "spool", 1 << 30)
    spool.open()
    await spool.start()
    batcher = Batcher("bench", spool, max_readings=500, max_latency=0.2)
    uplink = Uplink(f"127.0.0.1:{sink}", "bench", spool, state, backoff_min=0.1, backoff_max=1.0)
    uplink.start()
    # freeze_gc as in `fabrica serve collector`: the collector has this process to itself.
    supervisor = PlcSupervisor("bench", batcher.add, BusRegistry(), metrics=PollMetrics(), freeze_gc=True)
    plcs = _plcs(ports)
    rows = []
    try:
        for n in steps:
            await supervisor.apply_snapshot(plcs[:n])
            await asyncio.sleep(WARMUP)
            pollers = list(supervisor.pollers.values())
            for p in pollers:
                p.lateness.clear()
            polls0 = sum(p.polls for p in pollers)
            errors0 = sum(p.status.error_count for p in pollers)
            skipped0 = sum(p.skipped for p in pollers)
            readings0, acked0 = batcher.readings, spool.acked
            cpu0, child0, wall0 = time.process_time(), sum(child.cpu_times()[:2]), time.perf_counter()
            await asyncio.sleep(WINDOW)
            wall = time.perf_counter() - wall0
            cpu = (time.process_time() - cpu0) / wall
            child_cpu = (sum(child.cpu_times()[:2]) - child0) / wall
            late = [x for p in pollers for x in p.lateness]
            polls = sum(p.polls for p in pollers) - polls0
            row = {
                "devices": n,
                "p50_ms": _p(late, 0.50) * 1000,
                "p99_ms": _p(late, 0.99) * 1000,
                "max_ms": max(late, default=float("nan")) * 1000,
                "tags_s": polls * REGISTERS / wall,
                "readings_s": (batcher.readings - readings0) / wall,
                "acked_batches": spool.acked - acked0,
                "backlog": spool.backlog_readings,
                "errors": sum(p.status.error_count for p in pollers) - errors0,
                "skipped": sum(p.skipped for p in pollers) - skipped0,
                "cpu": cpu * 100,
                "device_cpu": child_cpu * 100,
            }
            row["ok"] = row["p99_ms"] < LATENESS_LIMIT * 1000 and row["errors"] == 0 and row["skipped"] == 0
            rows.append(row)
            print(f"  {n:>5} devices: p99 {row['p99_ms']:7.1f} ms  {row['tags_s']:9,.0f} tags/s  "
                  f"{row['readings_s']:9,.0f} readings/s  collector CPU {row['cpu']:5.1f} %  "
                  f"devices CPU {row['device_cpu']:5.1f} %  backlog {row['backlog']:,}  errors {row['errors']}  "
                  f"skipped {row['skipped']}"
                  f"{'' if row['ok'] else '  <- over the limit'}", flush=True)
            if not row["ok"]:
                break
    finally:
        await supervisor.stop_all()
        batcher.close()
        await uplink.stop()
        await spool.close()
    return rows


def main() -> int:
    _raise_fd_limit()
    cap = int(os.environ.get("FABRICA_BENCH_MAX_DEVICES") or 1000)
    steps = [n for n in STEPS if n <= cap] or [cap]
    print(f"Collector: Modbus TCP devices with {REGISTERS} holding registers each, polled every {INTERVAL:g} s; "
          f"steps {steps}; {WARMUP:g} s warm-up + {WINDOW:g} s measured per step; limit p99 lateness "
          f"{LATENESS_LIMIT * 1000:.0f} ms", flush=True)
    decoder = _decoder_only()
    print(f"  decoder alone: {decoder:,.0f} decoded tags/s (one core)", flush=True)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "gen"), str(REPO / "services"), str(REPO)])}
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.collector", "--serve-devices", str(max(steps))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            print("the device process did not start", file=sys.stderr)
            return 1
        info = json.loads(line)
        n = int(os.environ.get("FABRICA_BENCH_UPLINK_READINGS") or 200_000)
        before = asyncio.run(_spool_uplink_cpu(info["sink"], n, raw=False))
        after = asyncio.run(_spool_uplink_cpu(info["sink"], n, raw=True))
        print(f"  spool + uplink alone, {n:,} readings: collector CPU {after:.2f} µs per reading sent (before, parsing"
              f" and encoding each batch again: {before:.2f})", flush=True)
        rows = asyncio.run(_run_collector(info["ports"], info["sink"], child.pid, steps))
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    sustained = [r for r in rows if r["ok"]]
    best = sustained[-1] if sustained else None
    print()
    print(f"{'':<34}{'Fabrica collector':>22}{'Neuron (published)':>22}")
    if best:
        print(f"{'devices sustained (p99 < 100 ms)':<34}{best['devices']:>22,}{NEURON['devices']:>22,}")
        print(f"{'tags per device':<34}{REGISTERS:>22}{NEURON['tags']:>22}")
        print(f"{'tags/s':<34}{best['tags_s']:>22,.0f}{NEURON['tags_per_s']:>22,}")
        print(f"{'readings/s reported':<34}{best['readings_s']:>22,.0f}{'':>22}")
        lateness = f"{best['p99_ms']:.1f} / {best['max_ms']:.1f} ms"
        cpu = f"{best['cpu']:.0f} % (one process)"
        print(f"{'p99 / max poll lateness':<34}{lateness:>22}{'':>22}")
        print(f"{'CPU':<34}{cpu:>22}{NEURON['cpu']:>22}")
    else:
        print(f"{'devices sustained (p99 < 100 ms)':<34}{'none of the steps':>22}{NEURON['devices']:>22,}")
    print(f"{'decoder alone, tags/s':<34}{decoder:>22,.0f}{'':>22}")
    print(f"{'spool + uplink CPU per reading':<34}{f'{after:.2f} µs (before {before:.2f})':>22}{'':>22}")
    limit = rows[-1] if rows and not rows[-1]["ok"] else None
    if limit:
        print(f"  (at {limit['devices']} devices: p99 {limit['p99_ms']:.1f} ms, collector CPU {limit['cpu']:.0f} %, "
              f"device process CPU {limit['device_cpu']:.0f} %)")
    elif best and best["devices"] == max(steps):
        print(f"  (the cap of {max(steps)} devices was reached within the limit)")
    print(f"  host: {os.cpu_count()} CPUs; the devices run in one separate process on the same host")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-devices":
        _raise_fd_limit()
        asyncio.run(_serve_devices(int(sys.argv[2])))
        raise SystemExit(0)
    raise SystemExit(main())
