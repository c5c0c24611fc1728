"""The 1-minute and 1-hour rollups (ingest/rollup.py): aggregates from them equal aggregates computed from
raw readings over the same buckets (several days, several tags, two tenants, late readings, readings at
the same instant, failures without values, a quality filter), whether the job has caught up or not; a year
of 1-minute buckets is answered from the rollup table (its plan); the job survives a crash and a restart
without counting twice; retention per tenant deletes exactly that tenant's rows."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import tenant_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import query_pb2
from fabrica_svc.ingest import rollup as rollup_module
from fabrica_svc.ingest.domain import KIND_DOUBLE, KIND_NONE, micros_to_datetime
from fabrica_svc.ingest.maintenance import maintain
from fabrica_svc.ingest.rollup import RollupJob, RollupReader, effective_days, purge_tenant, touched_minutes
from fabrica_svc.ingest.store import EVENTS_LOCK_KEY
from fabrica_svc.runtime.tenants import TenantDirectory
from fabrica_svc.runtime import tenancy

from .support import TEST_CONFIG, T0_US, batch, reading, stream_batches, ts_us

GOOD = reading_pb2.QUALITY_GOOD
STALE = reading_pb2.QUALITY_STALE
COMM = reading_pb2.QUALITY_COMMUNICATION_FAILURE
S = 1_000_000
MIN = 60 * S
HOUR = 3600 * S
DAY = 86_400 * S
#: The rollup job of the app is off: each test drives its own job, so what is caught up is known.
NO_JOB = replace(TEST_CONFIG, rollup=False)


def dt(us: int) -> datetime:
    return micros_to_datetime(us)


async def commit_batch(conn: asyncpg.Connection, tenant: str, collector: str, sequence: int,
                       rows: list[tuple[int, int, float | None, int]]) -> None:
    """What ingest's writer does for a batch of `tenant` (its readings and its feed row in one transaction,
    the feed cursor under the events lock), for tenants the stream path of this branch cannot stamp yet."""
    readings = [reading(tag, us, value, quality=q) if value is not None else
                reading(tag, us, None, quality=q, error="timeout") for tag, us, value, q in rows]
    payload = batch(collector, sequence, readings).SerializeToString()
    await conn.execute(f"SELECT set_config('{tenancy.SETTING}', $1, false)", tenant)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", EVENTS_LOCK_KEY)
        await conn.execute(
            "INSERT INTO ingest.readings (tenant_id, tag_id, read_time, quality, kind, value)"
            " SELECT $1, * FROM unnest($2::bigint[], $3::timestamptz[], $4::smallint[], $5::smallint[], $6::float8[])",
            tenant, [r[0] for r in rows], [dt(r[1]) for r in rows], [r[3] for r in rows],
            [KIND_DOUBLE if r[2] is not None else KIND_NONE for r in rows], [r[2] for r in rows])
        await conn.execute(
            "INSERT INTO ingest.committed_batches (cursor, collector_id, sequence, plc_ids, reading_count, payload)"
            " VALUES (nextval('ingest.committed_batches_cursor_seq'), $1, $2, '{plc-1}', $3, $4)",
            collector, sequence, len(rows), payload)


def generate(tags: list[int], start_us: int, days: float, seed: int) -> list[tuple[int, int, float | None, int]]:
    """Readings every ~1-4 minutes per tag over `days`, with failures (no value), stale ones, and a few
    readings of one tag at the very same instant."""
    rnd = random.Random(seed)
    out = []
    for tag in tags:
        us = start_us + rnd.randrange(0, 60 * S)
        while us < start_us + days * DAY:
            roll = rnd.random()
            if roll < 0.05:
                out.append((tag, us, None, COMM))
            else:
                out.append((tag, us, round(rnd.uniform(-50, 150), 3), STALE if roll < 0.15 else GOOD))
            if roll > 0.99:  # three more at the same instant
                out.extend((tag, us, float(v), GOOD) for v in rnd.sample(range(-5, 5), 3))
            us += rnd.randrange(60 * S, 240 * S)
    return out


async def raw_aggregate(store, *args):
    saved, store.rollups = store.rollups, None
    try:
        return await store.aggregate(*args)
    finally:
        store.rollups = saved


def assert_same(got, want, what) -> None:
    assert [(r["tag_id"], r["bucket"], r["n"]) for r in got] == [(r["tag_id"], r["bucket"], r["n"]) for r in want], what
    for g, w in zip(got, want):
        for k in ("min", "max", "first", "last"):
            assert g[k] == w[k] or (g[k] is None and w[k] is None), (what, k, dict(g), dict(w))
        assert (g["avg"] is None and w["avg"] is None) or math.isclose(g["avg"], w["avg"], rel_tol=1e-12,
                                                                       abs_tol=1e-9), (what, dict(g), dict(w))


#: (bucket seconds, start, end): aligned and unaligned ranges; widths that use the hour table, the minute
#: table, and raw readings (not a whole number of minutes).
CASES = [
    (60, 0, 3 * DAY), (60, 17 * S + 3, 2 * DAY + 5 * MIN + 1), (120, 7 * MIN, DAY), (300, 0, 3 * DAY),
    (3600, 0, 3 * DAY), (7200, 30 * MIN + 11, 3 * DAY - 13 * S), (86_400, 0, 3 * DAY), (90, 0, DAY), (7, 0, HOUR),
    (3600, 5 * HOUR + 10 * MIN, 5 * HOUR + 20 * MIN),  # no whole hour in it: the minute table does not apply
]


#: A few of them, for the checks between the job's rounds.
SOME_CASES = [CASES[1], CASES[3], CASES[5], CASES[7]]


async def check_all(store, reader: RollupReader, tags: list[int], *, expect_from_rollup: bool,
                    cases=CASES) -> int:
    """Every case, under each tenant and across tenants, with and without a quality filter: rollup answer ==
    raw answer. Returns how many buckets were compared."""
    compared = 0
    saved, store.rollups = store.rollups, reader
    try:
        # Each tenant its own tags (another's are not its to see), and every tag across tenants.
        for scope, asked in (("default", [t for t in tags if t < 10]), ("acme", [t for t in tags if t > 10]),
                             (tenancy.ALL, tags)):
            with tenancy.scope(scope):
                for width, lo, hi in cases:
                    for qualities in (None, [GOOD, COMM]):
                        args = (asked, dt(T0_US + lo), dt(T0_US + hi), width, qualities)
                        got = await store.aggregate(*args)
                        want = await raw_aggregate(store, *args)
                        assert_same(got, want, (scope, width, lo, hi, qualities))
                        compared += len(want)
        if expect_from_rollup:
            with tenancy.system():
                async with store.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
                    plan = await reader.plan(conn, tags, dt(T0_US), dt(T0_US + 3 * DAY), 3600, None)
            assert plan is not None and plan.table == "rollup_hour" and plan.dirty == 0
    finally:
        store.rollups = saved
    return compared


@pytest.fixture
async def two_tenants(ingest_factory):
    """Tags 1-3 of tenant default streamed through StreamReadings (the real write path), tags 11-12 of
    tenant acme committed as the writer commits them; three days of readings from T0."""
    ingest = await ingest_factory(NO_JOB)
    assert await RollupJob(ingest.app.store.pool).run_once() == 1  # the first round builds them (empty)
    rows = generate([1, 2, 3], T0_US, 3, seed=1)
    batches = [batch("c-default", n + 1, [reading(t, us, v, quality=q) if v is not None else
                                           reading(t, us, None, quality=q, error="x") for t, us, v, q in rows[i:i + 400]])
               for n, i in enumerate(range(0, len(rows), 400))]
    _, acks = await stream_batches(ingest.stub, "c-default", batches)
    assert sum(a.written for a in acks) == len(rows)
    acme = generate([11, 12], T0_US, 3, seed=2)
    conn = await asyncpg.connect(ingest.database_url)
    for n, i in enumerate(range(0, len(acme), 400)):
        await commit_batch(conn, "acme", "c-acme", n + 1, acme[i:i + 400])
    yield ingest, conn, len(batches), len(range(0, len(acme), 400))
    await conn.close()


async def test_rollup_aggregates_equal_raw_aggregates_caught_up_or_not_with_late_readings(two_tenants) -> None:
    ingest, conn, default_batches, acme_batches = two_tenants
    store = ingest.app.store
    reader = RollupReader(store.pool)
    job = RollupJob(store.pool, max_batches=7)
    tags = [1, 2, 3, 11, 12]
    assert await check_all(store, reader, tags, expect_from_rollup=False, cases=SOME_CASES) > 0  # none rolled up
    assert await job.run_once() == 7  # part of the way
    await check_all(store, reader, tags, expect_from_rollup=False, cases=SOME_CASES)
    await job.catch_up()
    compared = await check_all(store, reader, tags, expect_from_rollup=True)
    assert compared > 1000
    # Late readings (two days old) of both tenants, into buckets that are already rolled up.
    late = generate([2, 3], T0_US + 6 * HOUR, 0.2, seed=3)
    _, acks = await stream_batches(ingest.stub, "c-default", [batch("c-default", default_batches + 1, [
        reading(t, us, v, quality=q) if v is not None else reading(t, us, None, quality=q, error="x")
        for t, us, v, q in late])])
    assert acks[0].written == len(late)
    await commit_batch(conn, "acme", "c-acme", acme_batches + 1, generate([11], T0_US + 30 * HOUR, 0.1, seed=4))
    await check_all(store, reader, tags, expect_from_rollup=False, cases=SOME_CASES)  # dirty ones: from raw
    with tenancy.system():
        async with store.pool.acquire() as c, c.transaction(isolation="repeatable_read"):
            plan = await reader.plan(c, tags, dt(T0_US), dt(T0_US + 3 * DAY), 60, None)
    assert plan is not None and plan.dirty > 0
    await job.catch_up()
    await check_all(store, reader, tags, expect_from_rollup=True)


async def test_the_rollup_rows_hold_each_tenants_readings_under_its_policy(two_tenants) -> None:
    ingest, conn, _, _ = two_tenants
    store = ingest.app.store
    await RollupJob(store.pool).catch_up()
    for tenant, tags in (("default", {1, 2, 3}), ("acme", {11, 12})):
        with tenancy.scope(tenant):
            seen = {r["tag_id"] for r in await store.pool.fetch("SELECT DISTINCT tag_id FROM ingest.rollup_minute")}
            hours = {r["tag_id"] for r in await store.pool.fetch("SELECT DISTINCT tag_id FROM ingest.rollup_hour")}
        assert seen == hours == tags
    # A connection that names no tenant sees no rollup row (row-level security fails closed).
    assert await store.pool.fetchval("SELECT count(*) FROM ingest.rollup_minute") == 0
    with tenancy.system():
        total = await store.pool.fetchval("SELECT sum(n) FROM ingest.rollup_minute")
        raw = await store.pool.fetchval("SELECT count(*) FROM ingest.readings")
        assert total == raw == await store.pool.fetchval("SELECT sum(n) FROM ingest.rollup_hour")


async def rollup_contents(pool) -> list[tuple]:
    with tenancy.system():
        rows = []
        for table in ("rollup_minute", "rollup_hour"):
            rows += [(table, *r.values()) for r in await pool.fetch(
                f"SELECT * FROM ingest.{table} ORDER BY tag_id, bucket_start, quality, tenant_id")]
        return rows


async def test_the_job_survives_a_crash_mid_round_and_a_restart_without_counting_twice(two_tenants,
                                                                                    monkeypatch) -> None:
    ingest, conn, _, _ = two_tenants
    store = ingest.app.store
    job = RollupJob(store.pool, max_batches=5)
    assert await job.run_once() == 5
    before = await rollup_contents(store.pool)
    cursor = await job.cursor()
    # A crash after the minute buckets were rewritten and before the cursor moved: nothing of it stays.
    real = rollup_module._recompute

    async def crash(conn, minutes):
        await real(conn, minutes)
        raise ConnectionResetError("killed")

    monkeypatch.setattr(rollup_module, "_recompute", crash)
    with pytest.raises(ConnectionResetError):
        await job.run_once()
    monkeypatch.setattr(rollup_module, "_recompute", real)
    assert await job.cursor() == cursor and await rollup_contents(store.pool) == before
    # A new job (a restarted ingest) continues from the stored cursor.
    assert cursor > 0
    restarted = RollupJob(store.pool)
    await restarted.catch_up()
    caught_up = await rollup_contents(store.pool)
    with tenancy.system():
        assert await store.pool.fetchval("SELECT sum(n) FROM ingest.rollup_minute") == \
            await store.pool.fetchval("SELECT count(*) FROM ingest.readings")
    # Replaying every batch again (as if the cursor had been lost) recomputes the same rows.
    with tenancy.system():
        await store.pool.execute("UPDATE ingest.rollup_state SET cursor = 0")
    await RollupJob(store.pool).catch_up()
    assert await rollup_contents(store.pool) == caught_up
    # And a rebuild from every raw reading (what the first round after migration 9 does) gives them too.
    with tenancy.system():
        await store.pool.execute("UPDATE ingest.rollup_state SET cursor = -1")
    rebuilt = RollupJob(store.pool)
    await rebuilt.catch_up()
    assert rebuilt.stats.rebuilds == 1 and await rollup_contents(store.pool) == caught_up
    await check_all(store, RollupReader(store.pool), [1, 2, 3, 11, 12], expect_from_rollup=True, cases=SOME_CASES)


async def test_the_apps_job_follows_the_feed_and_keeps_after_a_restart(ingest_factory, servers) -> None:
    config = replace(TEST_CONFIG, rollup_interval=0.05)
    ingest = await ingest_factory(config)
    # Today (its partition exists before ingest serves): no late day's partition is made meanwhile.
    base = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    t0 = int(base.timestamp()) * S
    rows = [(1, t0 + i * 7 * S, float(i)) for i in range(300)]
    await stream_batches(ingest.stub, "c1", [batch("c1", 1, [reading(t, us, v) for t, us, v in rows])])
    await ingest.app.rollup.catch_up()
    await ingest.stop()
    again = await ingest_factory(config)
    await stream_batches(again.stub, "c1", [batch("c1", 2, [reading(1, t0 + 5 * S, 1000.0)])])
    await again.app.rollup.catch_up()
    with tenancy.system():
        assert await again.app.store.pool.fetchval("SELECT sum(n) FROM ingest.rollup_minute") == 301
        assert await again.app.store.pool.fetchval("SELECT sum(n) FROM ingest.rollup_hour") == 301
        got = await again.app.store.aggregate([1], base, base + timedelta(hours=1), 3600, None)
    assert [(r["n"], r["max"], r["first"], r["last"]) for r in got] == [(301, 1000.0, 0.0, 299.0)]
    # The RPC (its default tenant) answers the same, from the hour table.
    response = await again.stub.AggregateReadings(pb.AggregateReadingsRequest(
        filter=query_pb2.ReadingFilter(tag_ids=[1], start_time=ts_us(t0), end_time=ts_us(t0 + HOUR)),
        bucket_seconds=3600))
    assert [(b.count, b.min, b.max, b.first, b.last) for b in response.buckets] == [(301, 0.0, 1000.0, 0.0, 299.0)]
    assert math.isclose(response.buckets[0].avg, (sum(range(300)) + 1000.0) / 301, rel_tol=1e-12)


async def test_a_year_of_minute_buckets_is_answered_from_the_rollup_table(ingest_factory) -> None:
    ingest = await ingest_factory(NO_JOB)
    store = ingest.app.store
    year = datetime(2024, 1, 1, tzinfo=UTC)
    end = datetime(2025, 1, 1, tzinfo=UTC)
    with tenancy.system():
        await store.pool.execute(
            "INSERT INTO ingest.rollup_minute (tenant_id, tag_id, bucket_start, quality, n, nv, sum, min, max,"
            " first_time, first_value, last_time, last_value)"
            " SELECT 'default', 77, t, 1, 2, 2, 2 * i, i - 1, i + 1, t, i - 1, t + interval '30 s', i + 1"
            " FROM generate_series($1::timestamptz, $2::timestamptz - interval '1 minute', interval '1 minute')"
            "   WITH ORDINALITY AS g(t, i)", year, end)
        await store.pool.execute("UPDATE ingest.rollup_state SET cursor = 0")  # built (nothing in the feed)
    reader = RollupReader(store.pool)
    with tenancy.scope("default"):
        async with store.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            plan = await reader.plan(conn, [77], year, end, 60, None)
            assert plan is not None and plan.table == "rollup_minute" and not plan.edges and plan.dirty == 0
            explained = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {plan.sql}", *plan.args))
            rows = await conn.fetch(plan.sql, *plan.args)
    relations = set()

    def walk(node):
        if "Relation Name" in node:
            relations.add(node["Relation Name"])
        for child in node.get("Plans", ()):
            walk(child)

    walk(explained[0]["Plan"])
    assert relations == {"rollup_minute"}, relations  # not the readings, of no partition
    assert len(rows) == 366 * 1440
    assert (rows[0]["n"], rows[0]["min"], rows[0]["first"], rows[0]["last"], rows[0]["avg"]) == (2, 0.0, 0.0, 2.0, 1.0)
    # 2-minute buckets merge pairs exactly: first of the firsts, last of the lasts, sum/count mean.
    with tenancy.scope("default"):
        store.rollups = reader
        wider = await store.aggregate([77], year, year + timedelta(hours=1), 120, None)
    assert [(r["n"], r["min"], r["max"], r["avg"], r["first"], r["last"]) for r in wider[:2]] == [
        (4, 0.0, 3.0, 1.5, 0.0, 3.0), (4, 2.0, 5.0, 3.5, 2.0, 5.0)]


async def test_retention_per_tenant_deletes_exactly_that_tenants_old_rows(two_tenants) -> None:
    ingest, conn, _, _ = two_tenants
    store = ingest.app.store
    job = RollupJob(store.pool)  # nothing rolled up yet: maintenance must catch up before deleting raw rows
    assert await job.cursor() == 0
    now = dt(T0_US + 3 * DAY + 5 * HOUR)  # the data ends today; raw readings of the first two days go
    with tenancy.system():
        before = {t: await store.pool.fetchval(
            "SELECT count(*) FROM ingest.readings WHERE tenant_id = $1", t) for t in ("default", "acme")}
        acme_old = await store.pool.fetchval(
            "SELECT count(*) FROM ingest.readings WHERE tenant_id = 'acme' AND read_time < $1", dt(T0_US + 2 * DAY))
        hours_before = await raw_aggregate(store, [11, 12], dt(T0_US), dt(T0_US + 3 * DAY), 3600, None)
    directory = TenantDirectory(None, tenants=[
        tenant_pb2.Tenant(code="acme", retention=tenant_pb2.RetentionPolicy(raw_days=1, minute_days=1, hour_days=0)),
        tenant_pb2.Tenant(code="default"),  # no retention: kept forever
    ])
    with tenancy.system():
        report = await maintain(store, now, ahead=1, retention_days=0, rollup=job, tenants=directory)
    assert [p.tenant for p in report.tenants] == ["acme"]
    assert report.tenants[0].raw_deleted == acme_old > 0
    with tenancy.system():
        assert await store.pool.fetchval(
            "SELECT count(*) FROM ingest.readings WHERE tenant_id = 'default'") == before["default"]
        assert await store.pool.fetchval(
            "SELECT count(*) FROM ingest.readings WHERE tenant_id = 'acme'") == before["acme"] - acme_old
        assert await store.pool.fetchval(
            "SELECT min(read_time) FROM ingest.readings WHERE tenant_id = 'acme'") >= dt(T0_US + 2 * DAY)
        assert await store.pool.fetchval(
            "SELECT count(*) FROM ingest.rollup_minute WHERE tenant_id = 'acme' AND bucket_start < $1",
            dt(T0_US + 2 * DAY)) == 0
        assert await store.pool.fetchval(
            "SELECT count(*) FROM ingest.rollup_minute WHERE tenant_id = 'default' AND bucket_start < $1",
            dt(T0_US + 2 * DAY)) > 0
        # The hours outlive the raw readings: the same hourly aggregates as before the purge.
        store.rollups = RollupReader(store.pool)
        assert_same(await store.aggregate([11, 12], dt(T0_US), dt(T0_US + 3 * DAY), 3600, None), hours_before,
                    "hours after raw retention")
    # A late reading older than acme's raw retention does not reopen (and so erase) a rolled-up hour.
    await commit_batch(conn, "acme", "c-acme", 1000, [(11, T0_US + 2 * HOUR + 5 * S, 9999.0, GOOD)])
    with tenancy.system():
        assert_same(await store.aggregate([11, 12], dt(T0_US), dt(T0_US + 3 * DAY), 3600, None), hours_before,
                    "hours with a late reading beyond retention, before the job")
        await job.catch_up()
        assert_same(await store.aggregate([11, 12], dt(T0_US), dt(T0_US + 3 * DAY), 3600, None), hours_before,
                    "hours with a late reading beyond retention, after the job")
        store.rollups = None


async def test_purge_tenant_hour_retention_and_raw_only_without_rollup(two_tenants) -> None:
    ingest, _, _, _ = two_tenants
    store = ingest.app.store
    await RollupJob(store.pool).catch_up()
    now = dt(T0_US + 3 * DAY + HOUR)
    report = await purge_tenant(store.pool, None, "default", now, 2, 2, 2)
    assert report.raw_deleted > 0 and report.minute_deleted > 0 and report.hour_deleted > 0
    with tenancy.system():
        for table, column in (("readings", "read_time"), ("rollup_minute", "bucket_start"),
                              ("rollup_hour", "bucket_start")):
            assert await store.pool.fetchval(
                f"SELECT count(*) FROM ingest.{table} WHERE tenant_id = 'default' AND {column} < $1",
                dt(T0_US + DAY)) == 0
            assert await store.pool.fetchval(
                f"SELECT count(*) FROM ingest.{table} WHERE tenant_id = 'acme' AND {column} < $1",
                dt(T0_US + DAY)) > 0


def test_effective_days_never_expire_a_coarser_level_first() -> None:
    assert effective_days(0, 30, 365) == (0, 0, 0)  # raw kept forever: so are the rollups
    assert effective_days(7, 30, 365) == (7, 30, 365)
    assert effective_days(30, 7, 1) == (30, 30, 30)
    assert effective_days(7, 0, 30) == (7, 0, 0)
    assert effective_days(7, 30, 0) == (7, 30, 0)


def test_touched_minutes_floor_as_the_writer_and_date_bin_do() -> None:
    payload = batch("c", 1, [
        reading(5, 59_999_999), reading(5, 60_000_000), reading(6, -1), reading(6, -60_000_001),
    ]).SerializeToString()
    assert touched_minutes([payload]) == {(5, 0), (5, 60_000_000), (6, -60_000_000), (6, -120_000_000)}


async def test_tenant_directory_without_config_keeps_what_it_was_given() -> None:
    directory = TenantDirectory(None, tenants=[tenant_pb2.Tenant(
        code="acme", quota=tenant_pb2.TenantQuota(readings_per_second=5),
        retention=tenant_pb2.RetentionPolicy(raw_days=3))])
    assert directory.retention("acme").raw_days == 3 and directory.quota("acme").readings_per_second == 5
    # A tenant not known: no quota, everything kept.
    assert directory.retention("other") == tenant_pb2.RetentionPolicy()
    assert directory.quota("other") == tenant_pb2.TenantQuota()
    assert await directory.poll_once() is False  # no config address: nothing polled, nothing replaced
    assert directory.known() == ["acme"] and directory.retention("acme").raw_days == 3


async def test_tenant_directory_keeps_the_last_known_tenants_while_config_is_away() -> None:
    import socket

    from in_process import settings_for

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    known = tenant_pb2.Tenant(code="acme", retention=tenant_pb2.RetentionPolicy(raw_days=3))
    directory = TenantDirectory(settings_for("ingest", config_addr=f"127.0.0.1:{port}"), tenants=[known])
    try:
        assert await directory.poll_once() is False  # UNAVAILABLE
        assert directory.known() == ["acme"] and directory.retention("acme").raw_days == 3
    finally:
        await directory.stop()


async def test_installation_wide_retention_keeps_the_rollups_of_what_it_deletes(two_tenants) -> None:
    ingest, conn, _, _ = two_tenants
    store = ingest.app.store
    job = RollupJob(store.pool)
    tags = [1, 2, 3, 11, 12]
    with tenancy.system():
        hours_before = await raw_aggregate(store, tags, dt(T0_US), dt(T0_US + 3 * DAY), 3600, None)
        await maintain(store, dt(T0_US + 3 * DAY + 5 * HOUR), ahead=1, retention_days=1, rollup=job)
        assert await store.pool.fetchval("SELECT min(read_time) FROM ingest.readings") >= dt(T0_US + 2 * DAY)
        assert await store.pool.fetchval("SELECT raw_before FROM ingest.rollup_state") == dt(T0_US + 2 * DAY)
        store.rollups = RollupReader(store.pool)
        assert_same(await store.aggregate(tags, dt(T0_US), dt(T0_US + 3 * DAY), 3600, None), hours_before,
                    "hours after the installation's retention")
        await commit_batch(conn, "acme", "c-acme", 1000, [(12, T0_US + DAY + 5 * S, -9999.0, GOOD)])
        await job.catch_up()
        assert_same(await store.aggregate(tags, dt(T0_US), dt(T0_US + 3 * DAY), 3600, None), hours_before,
                    "a late reading older than the horizon leaves the rolled-up hours as they were")
        store.rollups = None


def test_rollup_settings() -> None:
    from fabrica_svc.ingest.config import load_ingest_config
    from fabrica_svc.runtime.settings import SettingsError

    assert (load_ingest_config({}).rollup, load_ingest_config({}).rollup_interval) == (True, 5.0)
    cfg = load_ingest_config({"FABRICA_INGEST_ROLLUP": "off", "FABRICA_INGEST_ROLLUP_MS": "250"})
    assert (cfg.rollup, cfg.rollup_interval) == (False, 0.25)
    for name, value in (("FABRICA_INGEST_ROLLUP", "maybe"), ("FABRICA_INGEST_ROLLUP_MS", "0")):
        with pytest.raises(SettingsError, match=name):
            load_ingest_config({name: value})
