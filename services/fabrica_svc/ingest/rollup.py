"""Downsampled history: 1-minute and 1-hour rollups of the readings, per tenant, tag, bucket and quality.

Tables (migration 9, schema ``ingest``; both with the tenant policy of runtime/tenancy.py ``isolate_sql``)
--------------------------------------------------------------------------------------------------------
``rollup_minute`` / ``rollup_hour``: one row per (tag_id, bucket_start, quality, tenant_id), bucket_start
aligned to the Unix epoch (as AggregateReadings aligns its buckets), holding *mergeable* partial aggregates
of the readings of that bucket and quality, exactly the quantities ``IngestStore.aggregate`` computes:

    n            every reading (count(*): text, bytes and failed readings count too)
    nv           readings with a numeric value (value IS NOT NULL)
    sum          sum of the numeric values (so a merged mean is sum(sum) / sum(nv), not a mean of means)
    min, max     of the numeric values
    first_time   time of the earliest numeric reading; first_value its value (of several at the very same
                 instant, the smallest, as AggregateReadings orders them: ``min(ARRAY[µs, value])``)
    last_time    time of the latest numeric reading; last_value its value (ties: the largest)

Rows are kept per quality because AggregateReadings filters by quality: a query with qualities merges
the rows of those qualities, one without merges them all. Merging is exact for count, min, max, first and
last (min of mins, first of the firsts by the same key the raw query orders by, ...); the mean is exact up
to floating-point rounding of the sum (partial sums added in another order than one running sum: the raw
query itself sums in scan order, which no query fixes either).

``rollup_state`` (one row, no tenant: it is the job's own) holds the job's ``cursor`` in the committed-readings
feed and ``raw_before``, the installation-wide raw retention horizon (FABRICA_INGEST_RETENTION_DAYS);
``rollup_horizons`` (tenant policy) holds each tenant's raw horizon (its RetentionPolicy.raw_days).

Why a job that follows the feed, not the writer
-----------------------------------------------
The writer's transaction is the ingest hot path (see store.py: five round trips, ~1.5 µs a reading of
CPU); recomputing buckets there would put a read of up to a minute of raw rows per touched tag and an
upsert of two tables into every group commit, and make every batch wait for it. The committed-readings
feed already says, in commit order, which batches committed; the job (:class:`RollupJob`) reads the
batches after its cursor, decodes from their payloads which (tag, minute) buckets they touched, and in ONE
transaction recomputes those minute buckets from the raw readings (delete + insert: exact, idempotent,
late data included), recomputes their hours from the minutes, and stores the new cursor. A crash before
commit leaves the old cursor and the old rows; replaying recomputes the same buckets to the same result:
nothing is ever counted twice. Any replica may run it (an advisory lock: one at a time). Its first round
after migration 9 (``rollup_state.cursor`` -1) builds every bucket from the raw readings there are, in one
snapshot, and takes the feed's head of that snapshot as its cursor (not the migration: on an installation
with data that takes a while, and a migration holds up every replica's start); until then queries read raw
readings. Without the feed (FABRICA_INGEST_FEED=off; every replica must agree on it) there is no rollup,
and AggregateReadings reads raw readings as before. The job's pause between rounds
(FABRICA_INGEST_ROLLUP_MS, 5 s) is cheap for queries: what it has not taken yet is read raw.

Why the answers are always exact (the read side, :class:`RollupReader`)
-----------------------------------------------------------------------
Invariant: for every bucket, its rollup rows aggregate every raw reading of the batches up to the cursor
(the last such batch touching the bucket was processed in a transaction whose snapshot held its readings,
and no later batch up to the cursor touched it without recomputing it). A bucket is *dirty* when a batch
after the cursor touched it. A query reads, in one repeatable-read snapshot: the cursor, the batches after
it (decoded: the dirty buckets of the asked tags), and then

* whole rollup buckets inside the range that are not dirty: from the rollup table,
* the dirty ones and the partial buckets at both ends of the range: from raw readings,

and merges the partial aggregates of both into the asked buckets. When the batches after the cursor are
many (the job is stopped or far behind: over ``MAX_PENDING_BYTES`` of payload) or the feed was purged past
the cursor, the query reads raw readings only (always exact, just slower).

Retention (per tenant, RetentionPolicy from config through runtime/tenants.py ``TenantDirectory``)
--------------------------------------------------------------------------------------------------
Raw readings of a tenant older than its raw_days are deleted by tenant and time (raw partitions are
shared by tenants), rollup rows older than minute_days / hour_days likewise. Horizons are day boundaries
(hour-aligned). A coarser level is never deleted before a finer one (minute rows are kept at least as long
as raw, hours at least as long as minutes). Before raw readings are deleted the job catches up with every
batch committed so far, and the horizon is stored in the same transaction as the delete, so the deletion
never removes a reading the rollup has not taken in. Buckets before a tenant's raw horizon are never
recomputed again (their raw readings are gone: recomputing would erase the rollup); a reading that arrives
already older than its tenant's raw retention is therefore not added to the rollup (retention deletes it).
The installation-wide retention (whole partitions dropped) does the same with ``rollup_state.raw_before``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from fabrica.common.v1 import reading_pb2

from ..runtime import tenancy
from ..runtime.tasks import cancel_and_wait
from .domain import datetime_to_micros, micros_to_datetime, retention_cutoff

log = logging.getLogger(__name__)

MINUTE_US = 60_000_000
HOUR_US = 3_600_000_000
#: Rollup table per bucket width (µs), widest first: a query uses the widest that divides its bucket.
TABLES: dict[int, str] = {HOUR_US: "rollup_hour", MINUTE_US: "rollup_minute"}
#: One rollup job at a time across replicas (pg_try_advisory_xact_lock).
ROLLUP_LOCK_KEY = zlib.crc32(b"fabrica.ingest.rollup") - 2**31
#: A query that would have to decode more payload than this of batches after the job's cursor reads raw.
MAX_PENDING_BYTES = 8 * 1024 * 1024
#: Batches (and payload bytes) the job takes in one transaction.
JOB_MAX_BATCHES = 500
JOB_MAX_BYTES = 16 * 1024 * 1024

_EPOCH = "'1970-01-01 00:00:00+00'::timestamptz"


def _key(t: str) -> str:
    """The order AggregateReadings gives readings for first/last: microseconds since the epoch as float8."""
    return f"(extract(epoch FROM {t}) * 1000000)::float8"


#: The partial aggregate of raw readings `r` (the columns of a rollup row, in order). `{sum_order}`: the
#: rollup sums in a fixed order, so that recomputing a bucket gives the very same bits again.
_RAW_PARTIAL_OF = (
    "count(*) AS n, count(r.value) AS nv, sum(r.value{sum_order}) AS sum, min(r.value) AS min, max(r.value) AS max,"
    " min(r.read_time) FILTER (WHERE r.value IS NOT NULL) AS first_time,"
    f" (min(ARRAY[{_key('r.read_time')}, r.value]) FILTER (WHERE r.value IS NOT NULL))[2] AS first_value,"
    " max(r.read_time) FILTER (WHERE r.value IS NOT NULL) AS last_time,"
    f" (max(ARRAY[{_key('r.read_time')}, r.value]) FILTER (WHERE r.value IS NOT NULL))[2] AS last_value"
)
_RAW_PARTIAL = _RAW_PARTIAL_OF.format(sum_order="")
_RAW_PARTIAL_ORDERED = _RAW_PARTIAL_OF.format(sum_order=" ORDER BY r.read_time, r.value")
#: The merge of minute rows `p` into an hour row (sums in bucket order: the same bits when recomputed).
_MERGE_PARTIAL = (
    "sum(p.n)::bigint AS n, sum(p.nv)::bigint AS nv, sum(p.sum ORDER BY p.bucket_start, p.quality) AS sum, min(p.min) AS min, max(p.max) AS max,"
    " min(p.first_time) AS first_time,"
    f" (min(ARRAY[{_key('p.first_time')}, p.first_value]) FILTER (WHERE p.nv > 0))[2] AS first_value,"
    " max(p.last_time) AS last_time,"
    f" (max(ARRAY[{_key('p.last_time')}, p.last_value]) FILTER (WHERE p.nv > 0))[2] AS last_value"
)
#: The merge of partials `p` into what AggregateReadings returns (store.aggregate's columns).
_MERGE_FINAL = (
    "sum(p.n)::bigint AS n, min(p.min) AS min, max(p.max) AS max,"
    " sum(p.sum) / nullif(sum(p.nv), 0)::float8 AS avg,"
    f" (min(ARRAY[{_key('p.first_time')}, p.first_value]) FILTER (WHERE p.nv > 0))[2] AS first,"
    f" (max(ARRAY[{_key('p.last_time')}, p.last_value]) FILTER (WHERE p.nv > 0))[2] AS last"
)
_COLUMNS = "n, nv, sum, min, max, first_time, first_value, last_time, last_value"


def _table_sql(table: str) -> str:
    return f"""
CREATE TABLE {table} (
    tag_id bigint NOT NULL,
    bucket_start timestamptz NOT NULL,
    quality smallint NOT NULL,
    n bigint NOT NULL,
    nv bigint NOT NULL,
    sum double precision,
    min double precision,
    max double precision,
    first_time timestamptz,
    first_value double precision,
    last_time timestamptz,
    last_value double precision
);
{tenancy.isolate_sql("ingest", table)}
-- tag first: every query names its tags, and tag ids are global (the tenant policy is an OR, no index key).
ALTER TABLE {table} ADD PRIMARY KEY (tag_id, bucket_start, quality, tenant_id);
CREATE INDEX {table}_tenant_time_idx ON {table} (tenant_id, bucket_start);
"""


def _recompute_minutes_sql(keys: str) -> tuple[str, str]:
    """(DELETE, INSERT) recomputing the minute rows of the (tag_id, bucket_start) rows of `keys` (a FROM
    item named k) from raw readings, for buckets at or after the tenant's raw horizon. Per key one index
    range scan (LATERAL: the planner cannot turn it into a join on tag_id alone)."""
    delete = (
        f"DELETE FROM ingest.rollup_minute m USING {keys}"
        " WHERE m.tag_id = k.tag_id AND m.bucket_start = k.bucket_start"
        "   AND m.bucket_start >= ingest.rollup_raw_before(m.tenant_id)"
    )
    insert = (
        f"INSERT INTO ingest.rollup_minute (tenant_id, tag_id, bucket_start, quality, {_COLUMNS})"
        f" SELECT x.* FROM {keys} CROSS JOIN LATERAL ("
        f"  SELECT r.tenant_id, k.tag_id, k.bucket_start, r.quality, {_RAW_PARTIAL_ORDERED}"
        "   FROM ingest.readings r WHERE r.tag_id = k.tag_id"
        "    AND r.read_time >= k.bucket_start AND r.read_time < k.bucket_start + interval '1 minute'"
        "    AND k.bucket_start >= ingest.rollup_raw_before(r.tenant_id)"
        "   GROUP BY r.tenant_id, r.quality) x"
    )
    return delete, insert


def _recompute_hours_sql(keys: str) -> tuple[str, str]:
    """(DELETE, INSERT) recomputing the hour rows of `keys` (tag_id, bucket_start: hour starts) from the
    minute rows."""
    delete = (
        f"DELETE FROM ingest.rollup_hour h USING {keys}"
        " WHERE h.tag_id = k.tag_id AND h.bucket_start = k.bucket_start"
        "   AND h.bucket_start >= ingest.rollup_raw_before(h.tenant_id)"
    )
    insert = (
        f"INSERT INTO ingest.rollup_hour (tenant_id, tag_id, bucket_start, quality, {_COLUMNS})"
        f" SELECT x.* FROM {keys} CROSS JOIN LATERAL ("
        f"  SELECT p.tenant_id, k.tag_id, k.bucket_start, p.quality, {_MERGE_PARTIAL}"
        "   FROM ingest.rollup_minute p WHERE p.tag_id = k.tag_id"
        "    AND p.bucket_start >= k.bucket_start AND p.bucket_start < k.bucket_start + interval '1 hour'"
        "    AND k.bucket_start >= ingest.rollup_raw_before(p.tenant_id)"
        "   GROUP BY p.tenant_id, p.quality) x"
    )
    return delete, insert


#: Every bucket of every raw reading at or after its tenant's raw horizon, recomputed in two passes over
#: the tables (the job's first round after migration 9, and its rebuild if the feed lost batches it had
#: not read).
_MINUTE = f"date_bin(interval '1 minute', r.read_time, {_EPOCH})"
_HOUR = f"date_bin(interval '1 hour', p.bucket_start, {_EPOCH})"
REBUILD_SQL = f"""
DELETE FROM ingest.rollup_minute WHERE bucket_start >= ingest.rollup_raw_before(tenant_id);
DELETE FROM ingest.rollup_hour WHERE bucket_start >= ingest.rollup_raw_before(tenant_id);
INSERT INTO ingest.rollup_minute (tenant_id, tag_id, bucket_start, quality, {_COLUMNS})
SELECT r.tenant_id, r.tag_id, {_MINUTE}, r.quality, {_RAW_PARTIAL_ORDERED}
FROM ingest.readings r WHERE {_MINUTE} >= ingest.rollup_raw_before(r.tenant_id)
GROUP BY r.tenant_id, r.tag_id, {_MINUTE}, r.quality;
INSERT INTO ingest.rollup_hour (tenant_id, tag_id, bucket_start, quality, {_COLUMNS})
SELECT p.tenant_id, p.tag_id, {_HOUR}, p.quality, {_MERGE_PARTIAL}
FROM ingest.rollup_minute p WHERE {_HOUR} >= ingest.rollup_raw_before(p.tenant_id)
GROUP BY p.tenant_id, p.tag_id, {_HOUR}, p.quality
"""

#: Migration 9 (store.MIGRATIONS): the tables and their policies (the job's first round fills them).
MIGRATION_SQL = f"""
CREATE TABLE rollup_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- -1: the rollups are to be built from every raw reading (the job's first round, not this migration:
    -- on a large installation that takes long, and a migration holds up every replica's start).
    cursor bigint NOT NULL DEFAULT -1,
    raw_before timestamptz,
    update_time timestamptz NOT NULL DEFAULT now()
);
INSERT INTO rollup_state DEFAULT VALUES;
CREATE TABLE rollup_horizons (
    raw_before timestamptz NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now()
);
{tenancy.isolate_sql("ingest", "rollup_horizons")}
ALTER TABLE rollup_horizons ADD PRIMARY KEY (tenant_id);
-- A tenant's raw horizon: raw readings before it are deleted (its own retention or the installation's).
CREATE FUNCTION rollup_raw_before(tenant text) RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT coalesce(greatest((SELECT s.raw_before FROM ingest.rollup_state s),
                             (SELECT h.raw_before FROM ingest.rollup_horizons h WHERE h.tenant_id = tenant)),
                    '-infinity'::timestamptz)
$$;
{_table_sql("rollup_minute")}
{_table_sql("rollup_hour")}
"""


def touched_minutes(payloads: Iterable[bytes]) -> set[tuple[int, int]]:
    """(tag_id, minute start µs) of every reading of the serialized ReadingBatches (the feed's payloads),
    with the writer's conversion of read_time (convert.py: seconds·10⁶ + nanos // 1000)."""
    out: set[tuple[int, int]] = set()
    batch = reading_pb2.ReadingBatch()
    for payload in payloads:
        batch.ParseFromString(payload)
        for r in batch.readings:
            t = r.read_time
            us = t.seconds * 1_000_000 + t.nanos // 1000
            out.add((r.tag_id, us - us % MINUTE_US))
    return out


def _key_arrays(keys: Iterable[tuple[int, int]]) -> tuple[list[int], list[datetime]]:
    tags: list[int] = []
    starts: list[datetime] = []
    for tag_id, us in sorted(keys):
        tags.append(tag_id)
        starts.append(micros_to_datetime(us))
    return tags, starts


_KEYS = "(SELECT * FROM unnest($1::bigint[], $2::timestamptz[]) AS u(tag_id, bucket_start)) k"


async def _recompute(conn: asyncpg.Connection, minutes: set[tuple[int, int]]) -> None:
    """Recompute the minute buckets `minutes` from raw readings and their hours from the minutes."""
    if not minutes:
        return
    for sql in _recompute_minutes_sql(_KEYS):
        await conn.execute(sql, *_key_arrays(minutes))
    hours = {(tag_id, us - us % HOUR_US) for tag_id, us in minutes}
    for sql in _recompute_hours_sql(_KEYS):
        await conn.execute(sql, *_key_arrays(hours))


@dataclass
class RollupStats:
    batches: int = 0
    buckets: int = 0
    rebuilds: int = 0


class RollupJob:
    """Follows the committed-readings feed and keeps the rollups current (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, *, interval: float = 5.0, max_batches: int = JOB_MAX_BATCHES,
                 max_bytes: int = JOB_MAX_BYTES):
        self.pool = pool
        self.interval = interval
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.stats = RollupStats()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """One transaction: the batches after the cursor (at most max_batches / about max_bytes), their
        buckets recomputed, the cursor moved. Returns the batches taken (0: caught up, or another replica
        holds the job's lock right now)."""
        with tenancy.system():
            # Repeatable read: the batches read and the raw readings recomputed are of one snapshot.
            async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", ROLLUP_LOCK_KEY):
                    return 0
                cursor = await conn.fetchval("SELECT cursor FROM ingest.rollup_state")
                purged = await conn.fetchval("SELECT purged_through FROM ingest.feed_retention")
                if cursor < 0 or purged > cursor:  # never built, or the feed lost batches it never saw
                    return await self._rebuild(conn, lost=cursor >= 0)
                rows = await conn.fetch(
                    "WITH f AS (SELECT cursor, octet_length(payload) AS size FROM ingest.committed_batches"
                    "  WHERE cursor > $1 ORDER BY cursor LIMIT $2),"
                    " w AS (SELECT cursor, sum(size) OVER (ORDER BY cursor) AS upto FROM f)"
                    " SELECT c.cursor, c.payload FROM w JOIN ingest.committed_batches c USING (cursor)"
                    " WHERE w.upto <= $3 OR w.cursor = (SELECT min(cursor) FROM f) ORDER BY c.cursor",
                    cursor, self.max_batches, self.max_bytes,
                )
                if not rows:
                    return 0
                minutes = touched_minutes(r["payload"] for r in rows)
                await _recompute(conn, minutes)
                await conn.execute("UPDATE ingest.rollup_state SET cursor = $1, update_time = now()",
                                   rows[-1]["cursor"])
        self.stats.batches += len(rows)
        self.stats.buckets += len(minutes)
        return len(rows)

    async def _rebuild(self, conn: asyncpg.Connection, *, lost: bool) -> int:
        """Every bucket from every raw reading, in the round's snapshot; the cursor is then the feed's head
        of that snapshot (every batch up to it is in the readings read)."""
        if lost:
            log.warning("the committed-readings feed was purged past the rollup's cursor; rebuilding the rollups")
        else:
            log.info("building the rollups from every raw reading (the first round after migration 9)")
        head = await conn.fetchval(
            "SELECT greatest(coalesce(max(cursor), 0), (SELECT purged_through FROM ingest.feed_retention))"
            " FROM ingest.committed_batches")
        await conn.execute(REBUILD_SQL)
        await conn.execute("UPDATE ingest.rollup_state SET cursor = $1, update_time = now()", head)
        self.stats.rebuilds += 1
        return 1

    async def catch_up(self) -> int:
        """Run rounds until every batch committed when this was called is rolled up; returns the cursor.
        Waits for another replica's round rather than skipping it."""
        with tenancy.system():
            head = int(await self.pool.fetchval("SELECT coalesce(max(cursor), 0) FROM ingest.committed_batches"))
        while True:
            await self.run_once()
            with tenancy.system():
                cursor = int(await self.pool.fetchval("SELECT cursor FROM ingest.rollup_state"))
            if cursor >= head:
                return cursor
            await asyncio.sleep(0.01)

    async def cursor(self) -> int:
        with tenancy.system():
            return int(await self.pool.fetchval("SELECT cursor FROM ingest.rollup_state"))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ingest-rollup")

    async def _loop(self) -> None:
        while True:
            try:
                while await self.run_once():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be away; the next round retries
                log.warning("rollup round failed; retrying later", extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    # --- retention ------------------------------------------------------------------------------------

    async def hold_raw_before(self, cutoff: datetime) -> None:
        """Before the installation-wide retention drops raw readings before `cutoff`: catch up, then record
        the horizon (buckets before it are never recomputed from raw again)."""
        await self.catch_up()
        with tenancy.system():
            await self.pool.execute(
                "UPDATE ingest.rollup_state SET raw_before = greatest(raw_before, $1), update_time = now()", cutoff)

@dataclass
class TenantPurge:
    tenant: str
    raw_deleted: int = 0
    minute_deleted: int = 0
    hour_deleted: int = 0


async def purge_tenant(pool: asyncpg.Pool, job: RollupJob | None, tenant: str, now: datetime, raw_days: int,
                       minute_days: int, hour_days: int) -> TenantPurge:
    """One tenant's retention: its raw readings, minute and hour rows older than its days (0 keeps forever;
    never a coarser level before a finer one, :func:`effective_days`). With the rollup `job`, it first
    catches up with every batch committed so far, and the tenant's raw horizon is stored in the delete's
    transaction (see the module docstring)."""
    raw_days, minute_days, hour_days = effective_days(raw_days, minute_days, hour_days)
    report = TenantPurge(tenant)
    raw_cut = retention_cutoff(now, raw_days)
    if raw_cut is not None:
        if job is not None:
            await job.catch_up()  # every reading committed so far is in the rollup before raw ones go
        with tenancy.scope(tenant):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO ingest.rollup_horizons AS h (tenant_id, raw_before) VALUES ($1, $2)"
                    " ON CONFLICT (tenant_id) DO UPDATE SET raw_before = greatest(h.raw_before, EXCLUDED.raw_before),"
                    "  update_time = now()", tenant, raw_cut)
                status = await conn.execute(
                    "DELETE FROM ingest.readings WHERE tenant_id = $1 AND read_time < $2", tenant, raw_cut)
                report.raw_deleted = int(status.split()[-1])
    with tenancy.scope(tenant):
        for days, table, attr in ((minute_days, "rollup_minute", "minute_deleted"),
                                  (hour_days, "rollup_hour", "hour_deleted")):
            cut = retention_cutoff(now, days)
            if cut is not None:
                status = await pool.execute(
                    f"DELETE FROM ingest.{table} WHERE tenant_id = $1 AND bucket_start < $2", tenant, cut)
                setattr(report, attr, int(status.split()[-1]))
    return report


def effective_days(raw_days: int, minute_days: int, hour_days: int) -> tuple[int, int, int]:
    """Retention days as applied (0 = forever): minute rows live at least as long as raw readings and hour
    rows at least as long as minute rows, so a coarser level always covers what a finer one still has (a
    query is then never answered by a level that lost buckets a finer one keeps)."""
    minute = 0 if minute_days == 0 or raw_days == 0 else max(minute_days, raw_days)
    hour = 0 if hour_days == 0 or minute == 0 else max(hour_days, minute)
    return raw_days, minute, hour


# --- the read side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one AggregateReadings query is answered: the SQL and its arguments (for EXPLAIN too)."""

    table: str
    sql: str
    args: tuple[object, ...]
    dirty: int = 0
    edges: bool = False


def _width_of(bucket_seconds: int) -> int | None:
    bucket_us = bucket_seconds * 1_000_000
    for width in TABLES:
        if bucket_us % width == 0:
            return width
    return None


class RollupReader:
    """AggregateReadings from the rollups where they are caught up, raw readings for the rest."""

    def __init__(self, pool: asyncpg.Pool, *, max_pending_bytes: int = MAX_PENDING_BYTES):
        self.pool = pool
        self.max_pending_bytes = max_pending_bytes

    async def plan(self, conn: asyncpg.Connection, tag_ids: Sequence[int], start: datetime, end: datetime,
                   bucket_seconds: int, qualities: Sequence[int] | None) -> Plan | None:
        """The query answering from the rollups, built inside the caller's repeatable-read transaction on
        `conn` (its snapshot decides what is dirty); None when the rollups cannot help (the bucket is not a
        whole number of minutes, the range holds no whole minute, the job is too far behind)."""
        width = _width_of(bucket_seconds)
        if width is None:
            return None
        start_us, end_us = datetime_to_micros(start), datetime_to_micros(end)
        lo = -((-start_us) // width) * width
        hi = end_us - end_us % width
        if lo >= hi:
            return None
        state = await conn.fetchrow(
            "SELECT s.cursor, (SELECT purged_through FROM ingest.feed_retention) AS purged,"
            " (SELECT coalesce(sum(octet_length(payload)), 0) FROM ingest.committed_batches c"
            "  WHERE c.cursor > s.cursor) AS pending FROM ingest.rollup_state s")
        if (state is None or state["cursor"] < 0 or state["purged"] > state["cursor"]
                or state["pending"] > self.max_pending_bytes):
            return None
        asked = set(tag_ids)
        dirty: set[tuple[int, int]] = set()
        if state["pending"]:
            payloads = await conn.fetch(
                "SELECT payload FROM ingest.committed_batches WHERE cursor > $1", state["cursor"])
            for tag_id, minute in touched_minutes(r["payload"] for r in payloads):
                bucket = minute - minute % width
                if tag_id in asked and lo <= bucket < hi:
                    dirty.add((tag_id, bucket))
        table = TABLES[width]
        edges = start_us < lo or hi < end_us
        bucket = "make_interval(secs => $4::float8)"
        rollup_bucket = ("m.bucket_start" if bucket_seconds * 1_000_000 == width
                         else f"date_bin({bucket}, m.bucket_start, {_EPOCH})")
        arms = [
            # A bucket of the table's own width is its bucket_start: no date_bin, so the rows come out of
            # the primary key in the order the merge groups them (no hash and sort of every row).
            f"SELECT m.tag_id, {rollup_bucket} AS bucket, {_COLUMNS}"
            f" FROM ingest.{table} m"
            " WHERE m.tag_id = ANY($1::bigint[]) AND m.bucket_start >= $6 AND m.bucket_start < $7"
            "   AND ($5::smallint[] IS NULL OR m.quality = ANY($5::smallint[]))"
            + ("" if not dirty else
               "   AND (m.bucket_start < ingest.rollup_raw_before(m.tenant_id) OR NOT EXISTS ("
               "        SELECT 1 FROM dirty d WHERE d.tag_id = m.tag_id AND d.bucket_start = m.bucket_start))")
        ]
        raw_where = "r.tag_id = ANY($1::bigint[]) AND ($5::smallint[] IS NULL OR r.quality = ANY($5::smallint[]))"
        if edges:  # the partial buckets at the ends of the range
            arms.append(
                f"SELECT r.tag_id, date_bin({bucket}, r.read_time, {_EPOCH}) AS bucket, {_RAW_PARTIAL}"
                f" FROM ingest.readings r WHERE {raw_where}"
                "   AND ((r.read_time >= $2 AND r.read_time < $6) OR (r.read_time >= $7 AND r.read_time < $3))"
                " GROUP BY 1, 2")
        if dirty:  # buckets touched by batches the job has not taken yet (within raw retention)
            arms.append(
                f"SELECT x.* FROM dirty d CROSS JOIN LATERAL ("
                f" SELECT r.tag_id, date_bin({bucket}, r.read_time, {_EPOCH}) AS bucket, {_RAW_PARTIAL}"
                "  FROM ingest.readings r WHERE r.tag_id = d.tag_id"
                "   AND r.read_time >= d.bucket_start AND r.read_time < d.bucket_start + $10::interval"
                f"  AND {raw_where} AND d.bucket_start >= ingest.rollup_raw_before(r.tenant_id)"
                "  GROUP BY 1, 2) x")
        parts = "\n UNION ALL ".join(arms)
        # Every parameter is typed in `a` (never read: an arm that does not need one leaves it out).
        sql = ("WITH a AS (SELECT $2::timestamptz AS s, $3::timestamptz AS e, $4::float8 AS b, $10::interval AS w),"
               " dirty AS (SELECT * FROM unnest($8::bigint[], $9::timestamptz[]) AS d(tag_id, bucket_start)),"
               f" p AS ({parts})"
               f" SELECT p.tag_id, p.bucket, {_MERGE_FINAL} FROM p GROUP BY p.tag_id, p.bucket"
               " ORDER BY p.tag_id, p.bucket")
        dirty_tags, dirty_starts = _key_arrays(dirty)
        args = (list(tag_ids), start, end, bucket_seconds, list(qualities) if qualities else None,
                micros_to_datetime(lo), micros_to_datetime(hi), dirty_tags, dirty_starts,
                timedelta(microseconds=width))
        return Plan(table, sql, args, len(dirty), edges)

    async def aggregate(self, tag_ids: Sequence[int], start: datetime, end: datetime, bucket_seconds: int,
                        qualities: Sequence[int] | None) -> list[asyncpg.Record] | None:
        """store.aggregate's rows from the rollups (and raw readings where they are not caught up), or None
        when the caller should read raw readings only."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            plan = await self.plan(conn, tag_ids, start, end, bucket_seconds, qualities)
            if plan is None:
                return None
            return await conn.fetch(plan.sql, *plan.args)


__all__ = [
    "MIGRATION_SQL", "Plan", "RollupJob", "RollupReader", "TenantPurge", "effective_days", "purge_tenant",
    "touched_minutes",
]
