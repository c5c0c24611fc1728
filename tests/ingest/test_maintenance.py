"""Daily partitions ahead of time, late rows moved out of the default partition, retention."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import query_pb2
from fabrica_svc.ingest.config import load_ingest_config
from fabrica_svc.ingest.maintenance import maintain
from fabrica_svc.runtime.settings import SettingsError

from .support import batch, fetch, fetchval, reading, stream_batches, ts_us, wait_for

S = 1_000_000


def day_us(d: date, hour: int = 12) -> int:
    return int(datetime(d.year, d.month, d.day, hour, tzinfo=UTC).timestamp()) * S


async def partitions(dsn: str) -> dict[str, int]:
    """Partition name -> rows in it."""
    rows = await fetch(dsn, "SELECT tableoid::regclass::text AS p, count(*) AS n FROM ingest.readings GROUP BY 1")
    names = await fetch(dsn, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                             " WHERE i.inhparent = 'ingest.readings'::regclass")
    counts = {r["p"].removeprefix("ingest."): r["n"] for r in rows}
    return {r["relname"]: counts.get(r["relname"], 0) for r in names}


async def test_partitions_are_created_ahead_at_start(ingest) -> None:
    today = datetime.now(UTC).date()
    names = await partitions(ingest.database_url)
    for i in range(4):  # today and 3 days ahead (the default)
        assert f"readings_p{today + timedelta(days=i):%Y%m%d}" in names
    assert "readings_default" in names
    # an index on (tag_id, read_time) on every partition
    indexed = await fetchval(ingest.database_url,
                             "SELECT count(*) FROM pg_indexes WHERE schemaname = 'ingest'"
                             " AND tablename LIKE 'readings_%' AND indexdef LIKE '%(tag_id, read_time)%'")
    assert indexed == len(names)


async def test_late_rows_move_from_the_default_partition_into_their_day(ingest) -> None:
    dsn = ingest.database_url
    await ingest.app.maintenance.stop()  # this test runs the rounds itself
    old = date(2024, 5, 17)
    await stream_batches(ingest.stub, "c1", [batch("c1", 1, [reading(1, day_us(old) + i * S, float(i)) for i in range(50)]
                                                  + [reading(2, day_us(old + timedelta(days=1)), 1.0)])])
    before = await partitions(dsn)
    assert before["readings_default"] == 51
    report = await maintain(ingest.app.store, datetime.now(UTC), ahead=3, retention_days=0)
    assert {"readings_p20240517", "readings_p20240518"} <= set(report.created)
    after = await partitions(dsn)
    assert after["readings_default"] == 0
    assert after["readings_p20240517"] == 50 and after["readings_p20240518"] == 1
    page = await ingest.stub.QueryReadings(pb.QueryReadingsRequest(filter=query_pb2.ReadingFilter(
        tag_ids=[1], start_time=ts_us(day_us(old, 0)), end_time=ts_us(day_us(old, 23)))))
    assert [r.value.double_value for r in page.readings] == [float(i) for i in range(50)]
    # ingest keeps writing into the new partition (and nothing is lost or doubled)
    await stream_batches(ingest.stub, "c1", [batch("c1", 2, [reading(1, day_us(old, 13), -1.0)])])
    assert (await partitions(dsn))["readings_p20240517"] == 51
    # a second round has nothing to do
    again = await maintain(ingest.app.store, datetime.now(UTC), ahead=3, retention_days=0)
    assert again.created == [] and again.dropped == []


async def test_retention_drops_old_partitions_default_rows_and_events(ingest) -> None:
    dsn = ingest.database_url
    await ingest.app.maintenance.stop()  # this test runs the rounds itself
    now = datetime(2025, 6, 30, 9, tzinfo=UTC)
    days = [date(2025, 6, 20), date(2025, 6, 22), date(2025, 6, 23), date(2025, 6, 29)]
    readings = [reading(1, day_us(d) + i * S, float(i), role=2 if i == 0 else 1) for d in days for i in range(3)]
    readings.append(reading(1, day_us(date(2031, 1, 1)), 9.0))  # far future: stays in the default partition
    await stream_batches(ingest.stub, "c1", [batch("c1", 1, readings)])
    await maintain(ingest.app.store, now, ahead=1, retention_days=0)  # gives each day its partition
    # then a late reading of a day that retention will remove, in the default partition
    await stream_batches(ingest.stub, "c1", [batch("c1", 2, [reading(1, day_us(date(2025, 6, 21)), 5.0)])])
    old_events = await fetch(dsn, "UPDATE ingest.tag_events SET insert_time = $1 WHERE read_time < $2 RETURNING cursor",
                             now - timedelta(days=9), datetime(2025, 6, 23, tzinfo=UTC))
    assert len(old_events) == 2
    report = await maintain(ingest.app.store, now, ahead=1, retention_days=7)  # keeps 2025-06-23 on
    assert report.dropped == ["readings_p20250620", "readings_p20250622"]
    left = await partitions(dsn)
    assert {"readings_p20250623", "readings_p20250629", "readings_p20250630", "readings_p20250701"} <= set(left)
    assert not {"readings_p20250620", "readings_p20250622"} & set(left)
    assert report.default_rows_deleted == 1  # the late 2025-06-21 reading
    assert await fetchval(dsn, "SELECT count(*) FROM ingest.readings") == 2 * 3 + 1
    # events of the removed days are gone, and the mark says up to where
    remaining = await fetch(dsn, "SELECT cursor FROM ingest.tag_events ORDER BY cursor")
    assert len(remaining) == 2
    assert report.events_purged_through == max(r["cursor"] for r in old_events) < remaining[0]["cursor"]


def test_settings_reject_bad_values_naming_the_variable() -> None:
    assert load_ingest_config({}).retention_days == 0
    cfg = load_ingest_config({"FABRICA_INGEST_RETENTION_DAYS": "30", "FABRICA_INGEST_GROUP_MAX_DELAY_MS": "5"})
    assert cfg.retention_days == 30 and cfg.group_max_delay == 0.005
    for name, value in (("FABRICA_INGEST_RETENTION_DAYS", "-1"), ("FABRICA_INGEST_GROUP_MAX_ROWS", "many"),
                        ("FABRICA_INGEST_QUEUE_MAX_ROWS", "0"), ("FABRICA_INGEST_EVENT_POLL_SECONDS", "0")):
        with pytest.raises(SettingsError, match=name):
            load_ingest_config({name: value})


async def test_a_starting_replica_moves_late_rows_in_the_background(ingest_factory) -> None:
    first = await ingest_factory()
    old = date(2024, 2, 29)
    await stream_batches(first.stub, "c1", [batch("c1", 1, [reading(1, day_us(old) + i * S, 1.0) for i in range(20)])])
    assert (await partitions(first.database_url))["readings_default"] == 20
    await ingest_factory()  # its first maintenance round runs in the background right after start

    async def moved() -> bool:
        return (await partitions(first.database_url)).get("readings_p20240229") == 20
    await wait_for(moved, what="the late rows in their day's partition")
    assert (await partitions(first.database_url))["readings_default"] == 0


async def test_a_write_racing_the_attach_of_its_days_partition_is_retried_and_stored_in_it(ingest) -> None:
    """Maintenance attaches a late day's partition while the writer is routing that day's rows to the
    default partition: the writer's statement, which saw the partitions as they were when it started, is
    refused ("violates partition constraint") once the attach commits; the writer writes the group again,
    into the new partition, and the batch is acknowledged once (never rejected as a bad batch)."""
    dsn = ingest.database_url
    await ingest.app.maintenance.stop()
    day = date(2024, 6, 3)
    lo = datetime(day.year, day.month, day.day, tzinfo=UTC)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():  # what create_partition does, held open
            await conn.execute("LOCK TABLE ingest.readings_default IN ACCESS EXCLUSIVE MODE")
            await conn.execute("CREATE TABLE ingest.readings_p20240603"
                               " (LIKE ingest.readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
            await conn.execute(f"ALTER TABLE ingest.readings ATTACH PARTITION ingest.readings_p20240603"
                               f" FOR VALUES FROM ('{lo.isoformat()}') TO ('{(lo + timedelta(days=1)).isoformat()}')")
            write = asyncio.create_task(stream_batches(ingest.stub, "c1", [
                batch("c1", 1, [reading(1, day_us(day) + i * S, float(i)) for i in range(20)])]))
            await wait_for(lambda: _waiting(dsn), what="the writer waiting for the default partition")
        _, acks = await asyncio.wait_for(write, 30)
    finally:
        await conn.close()
    assert [(a.sequence, a.written) for a in acks] == [(1, 20)]
    assert (await partitions(dsn))["readings_p20240603"] == 20
    assert ingest.app.writer.stats.failed_groups == 0


async def _waiting(dsn: str) -> bool:
    return bool(await fetchval(dsn, "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                                    " WHERE NOT l.granted AND c.relname = 'readings_default'"))
