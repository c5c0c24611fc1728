"""All SQL of the ingest service: the schema (migrations), the write transaction, history, latest values,
statistics, tag events and partition maintenance.

Tables (schema ``ingest``)
--------------------------
``readings``            one narrow row per reading (domain.READING_COLUMNS), partitioned by RANGE on
                        ``read_time``: one partition per UTC day (``readings_pYYYYMMDD``), created ahead by
                        the maintenance task, plus ``readings_default`` so that a reading of any time is
                        always accepted (late or future-dated ones land there and are moved into their day's
                        partition when maintenance creates it).
``latest``              the newest reading per tag, upserted in the same transaction; never moves back in time.
``tags``                tag_id → plc_id, role, learned from the readings (upserted only when new or changed).
``tag_metadata``        tag_id → name, unit, plc_id, role and whether it was removed, as each tag's collector
                        last described it (SyncTags, :meth:`IngestStore.sync_tags`). Not the ``tags`` table:
                        the write transaction locks ``tags`` rows, and a sync of thousands of rows must never
                        hold a lock a batch waits for (nor deadlock with one); the writer never touches this
                        table, so readings and syncs are independent. A tag no collector described has no
                        row: its readings carry an empty name and unit and it stays in latest values.
``collector_sequences`` each collector's committed sequence (the exactly-once and sequence checks) and its
                        highest epoch (which fences older incarnations; migration 3).
``tag_events``          readings of counter and machine-state tags with a ``cursor`` that increases in commit
                        order; ``event_retention.purged_through`` is the highest cursor deleted by retention.
``rollup_minute``,      1-minute and 1-hour rollups per tenant, tag, bucket and quality (migration 9), kept by
``rollup_hour``         the rollup job; ``rollup_state`` (its feed cursor), ``rollup_horizons`` (raw retention per
                        tenant). See rollup.py.
``committed_batches``   the committed-readings feed (migration 4): one row per stored batch, with a ``cursor``
                        in commit order, the batch's PLC ids and the batch itself (the serialized ReadingBatch);
                        ``feed_retention.purged_through`` is the highest cursor deleted by feed retention.

Indexes: the trade-off
----------------------
Every history query names its tags (ReadingFilter requires tag_ids or a PLC), so the one index readings
have is a btree on ``(tag_id, read_time)``, declared on the parent and so present on every partition:
a tag's range is one index range scan, paging by (read_time, tag_id) is one bounded index scan per tag
(see :meth:`IngestStore.readings_page`), an export sorts its range once (:meth:`IngestStore.export`),
and buckets and statistics read only the rows they aggregate.

What it costs, measured here (embedded Postgres 18, 2 cores, 600,000 narrow rows of 1,000 tags, COPY in
transactions of 20,000 rows, into the partitioned table)::

    no index                                      ~760,000-870,000 rows/s
    BRIN (read_time)                              ~750,000 rows/s
    btree (read_time, tag_id)                     ~430,000-450,000 rows/s
    btree (tag_id, read_time), rows as they come  ~230,000-310,000 rows/s
    btree (tag_id, read_time), group sorted by    ~420,000-460,000 rows/s   <- what ingest does
      tag_id before COPY

The btree on (tag_id, read_time) is what makes COPY slower: each row goes to one of a thousand leaf
pages. Sorting each group by tag_id before COPY (a stable sort, so a tag's rows stay in arrival order;
~1 ms per 20,000 rows in Python) makes the inserts walk the index in order and also clusters each tag's
rows on the heap, which helps the history queries too. That recovers most of the loss. End to end
the index costs less than these figures suggest: ingest is bound by its own CPU (validating and
converting ~1.5 µs per reading in one pass, see README.md and benchmarks/ingest.py) well before
Postgres is.

Rejected: BRIN on read_time alone keeps COPY at full speed, but "tag X over the last 8 hours", the most
common historian query, would then read every tag's rows of those 8 hours, and keyset paging would
re-read the rest of the range for each page. A btree on (read_time, tag_id) suits paging across many
tags, but a month of one tag would scan every tag's index entries for that month. Building the
(tag_id, read_time) btree only on closed days (CREATE INDEX CONCURRENTLY from maintenance) would make
today, the most queried day, the slow one. A deployment with far higher rates than a plant produces
(or TimescaleDB/Citus, see ARCHITECTURE.md) can revisit this; the benchmark prints the figures.

The committed-readings feed (WatchCommittedReadings)
---------------------------------------------------
Consumers that need every reading (the alarm evaluator, forwarding to another platform) follow a log of
committed batches from a cursor they store with their own results. The choice, and what was rejected:

* One row per committed batch, in the write transaction (``_APPEND_FEED``), holding the ReadingBatch as the
  collector sent it (serialized protobuf, ~40 bytes a reading, stored uncompressed out of line: STORAGE
  EXTERNAL, so Postgres spends no CPU compressing inside the writer's transaction). What it costs the write
  path: no encoding (the payload is the ``batch`` field's bytes as received, kept by StreamReadings' request
  deserializer, convert.parse_stream_request; encoding the parsed batch again cost ~0.2 µs a reading), one
  INSERT of a few rows per transaction, and the events lock (below) in every transaction, not only
  in those with events. The readings are written exactly once by the same transaction, so the feed holds
  exactly the committed batches: no reading in the feed that is not stored, none stored that is not in it.
* Cursors come from ``committed_batches_cursor_seq`` taken under the same advisory lock as the tag events
  (EVENTS_LOCK_KEY, held to commit), so they follow commit order across replicas: once a cursor is
  visible, every smaller one that will ever exist is too, and a watcher can resume after any cursor.
* A NOTIFY on FEED_CHANNEL at commit wakes the watchers (their own LISTEN: the tag-event watchers are
  not woken by every commit).
* Rejected: reading the ``readings`` table by a commit position (it has none: rows carry read_time, not
  commit order, and adding a column to every narrow row costs far more than one row per batch); a tag
  event per reading (one row per reading, and the events table is about counters and states); logical
  decoding (a replication slot per consumer, superuser set-up, WAL retained by a stalled consumer).
* Retention is its own (``FABRICA_INGEST_FEED_RETENTION_HOURS``, 7 days by default): the feed is for
  consumers catching up, not a second historian. ``FABRICA_INGEST_FEED=off`` turns it off entirely
  (nothing is written; the RPC answers FAILED_PRECONDITION).

Tenants (migration 8)
---------------------
Every table but the two retention marks (``event_retention``, ``feed_retention``: one installation-wide row
each, no tenant's data) and ``schema_migrations`` has a ``tenant_id`` and row-level security, forced, with the
policy of runtime/tenancy.py (TENANT_TABLES; ``audit_entries`` by runtime/audit.py). ``readings`` is
partitioned: the policy is on the parent, which every query names, and on each partition too (those of the
migration and those maintenance creates, :func:`partition_isolation_sql`), so a statement naming a partition
(maintenance's on ``readings_default``) is held as well. Keys: a collector id is unique within its tenant
(``collector_sequences`` (tenant_id, collector_id)); tag ids are config's global numbers, but ``tags``,
``latest`` and ``tag_metadata`` are keyed (tag_id, tenant_id), so a collector of another tenant naming an id
that is not its own writes rows of its own tenant and never touches (nor learns of) the owner's. Cursors of
``tag_events`` and ``committed_batches`` stay global positions: a tenant's watcher sees gaps.

Reads run on the service's pool, whose connections are scoped to the RPC's tenant on acquire: no query
here names a tenant, and one that ran outside a tenant would see nothing. Background work says whose it is
(maintenance: ``tenancy.system()``).

The writer's connection is its own (not the pool's) and runs as the row-level-security role too. A group
holds batches of several tenants; :meth:`IngestStore.write_group` writes each tenant's slice after
``set_config('fabrica.tenant', <tenant>, true)``, so every statement is under that tenant's policy (never
``*``): its WITH CHECK refuses a row of another tenant, and the sequence rows it locks are the tenant's.
Postgres refuses COPY FROM into a table with row-level security, so the slice's readings (and tag events)
are COPYed into a temporary table of the writer's connection (``readings_stage``, ``events_stage``: no
policy, emptied at each commit) and moved with one INSERT .. SELECT under the tenant. What the options cost,
measured here (embedded Postgres 18, 2 shared cores, 400,000 readings in transactions of 20,000, the
table's index as above; rows/s, and CPU per row in the writer's process)::

    COPY straight into readings (no row-level security)           ~310,000-400,000   1.0 µs (tenant column sent)
    COPY straight in, tenant from the session default             ~400,000           0.6 µs
    COPY into the staging table, INSERT .. SELECT under the       ~300,000-356,000   0.6-0.7 µs  <- what ingest does
      tenant's policy
    INSERT .. SELECT FROM unnest($1::bigint[], ...) (9 arrays)   ~155,000-190,000   2.2-3.3 µs
    executemany INSERT                                           ~90,000            2.7 µs

The staging table keeps the write at ~90% of COPY and costs the writer's process nothing more (the
INSERT .. SELECT is Postgres's work), where the array parameters cost the one Python thread ingest is bound
by 2-3 µs a row. ``make bench`` (benchmarks/ingest.py, modes 5 and 6) prints the write path with row-level
security on beside off. A group of several tenants costs a round trip more per tenant (set_config) and the
staging table's TRUNCATE between slices.

Locks, in the order every write transaction takes them (so that transactions of several ingest replicas
cannot deadlock): tenant by tenant (in code order), collector_sequences rows (sorted by collector id, FOR
UPDATE) and tags rows (sorted by tag_id); then the events advisory lock (with events or the feed on; held
to commit); then, tenant by tenant, latest rows (sorted by tag_id). A transaction that holds latest rows
either holds the events lock already or never asks for it. A SyncTags transaction takes only its
collector's advisory lock and ``tag_metadata`` rows (in tag_id order).
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from itertools import chain
import asyncpg

from ..runtime import audit, tenancy
from ..runtime.db import Migration
from ..runtime.errors import FailedPrecondition
from .rollup import MIGRATION_SQL as ROLLUP_MIGRATION_SQL
from .rollup import RollupReader
from .domain import (
    EVENT_COLUMNS,
    MAX_BIGINT,
    QUALITY_GOOD,
    READING_COLUMNS,
    BatchOutcome,
    GroupPlan,
    PageCursor,
    WriteBatch,
    day_bounds,
    merge_latest,
    partition_name,
    plan_group,
)

SCHEMA = "ingest"
EVENTS_CHANNEL = "fabrica_ingest_events"
#: Notified (with the highest cursor) by each write transaction that appended to the committed-readings feed.
FEED_CHANNEL = "fabrica_ingest_feed"
#: pg_advisory_xact_lock key that serializes event-writing transactions (so cursors follow commit order).
EVENTS_LOCK_KEY = zlib.crc32(b"fabrica.ingest.tag_events") - 2**31
MAINTENANCE_LOCK_KEY = zlib.crc32(b"fabrica.ingest.maintenance") - 2**31
#: First key of the two-key pg_advisory_xact_lock that serializes the SyncTags of one collector.
TAG_SYNC_LOCK_CLASS = zlib.crc32(b"fabrica.ingest.tag_sync") - 2**31
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970-01-01

#: The tables whose rows belong to a tenant (row-level security, migration 8; audit_entries too, by
#: runtime/audit.py). Not in it: ``event_retention`` and ``feed_retention``, one row each, the
#: installation-wide retention marks of the cursors (no tenant's data), and ``schema_migrations``.
TENANT_TABLES = ("readings", "latest", "tags", "tag_metadata", "collector_sequences", "tag_events",
                 "committed_batches")
#: The ingest tables without row-level security, and why they hold no tenant's data (tests/tenancy checks
#: every other table has it, forced).
UNSCOPED_TABLES = {
    "schema_migrations": "the migrations applied to the schema",
    "event_retention": "one row: the installation-wide retention mark of the tag-event cursor",
    "feed_retention": "one row: the installation-wide retention mark of the committed feed's cursor",
    "rollup_state": "one row: the rollup job's own cursor and the installation-wide raw horizon (rollup.py)",
}
#: The tenant policy's predicate, quoted for a format() string in SQL.
_POLICY_SQL = tenancy.POLICY_PREDICATE.replace("'", "''")


def partition_isolation_sql(name: str) -> str:
    """Row-level security on the readings partition `name` (created at runtime by maintenance): the parent's
    policy, so that a statement naming the partition itself is held by it too, and the grants every table of
    the schema gives the row-level-security role at start (runtime/tenancy.py role_sql)."""
    return (f'ALTER TABLE ingest."{name}" ENABLE ROW LEVEL SECURITY;'
            f' ALTER TABLE ingest."{name}" FORCE ROW LEVEL SECURITY;'
            f' CREATE POLICY tenant_isolation ON ingest."{name}" USING {tenancy.POLICY_PREDICATE}'
            f" WITH CHECK {tenancy.POLICY_PREDICATE};"
            f' GRANT SELECT, INSERT, UPDATE, DELETE ON ingest."{name}" TO {tenancy.DB_ROLE};')

MIGRATIONS = [
    Migration(1, "readings, latest values, tags, collector sequences, tag events", """
CREATE TABLE tags (
    tag_id bigint PRIMARY KEY,
    plc_id text NOT NULL,
    role smallint NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tags_plc_id_idx ON tags (plc_id, tag_id);

CREATE TABLE readings (
    tag_id bigint NOT NULL,
    read_time timestamptz NOT NULL,
    quality smallint NOT NULL,
    kind smallint NOT NULL,
    value double precision,
    int_value bigint,
    text_value text,
    bytes_value bytea,
    error text
) PARTITION BY RANGE (read_time);
CREATE INDEX readings_tag_id_read_time_idx ON readings (tag_id, read_time);
CREATE TABLE readings_default PARTITION OF readings DEFAULT;

CREATE TABLE latest (
    tag_id bigint PRIMARY KEY,
    read_time timestamptz NOT NULL,
    quality smallint NOT NULL,
    kind smallint NOT NULL,
    value double precision,
    int_value bigint,
    text_value text,
    bytes_value bytea,
    error text
);

CREATE TABLE collector_sequences (
    collector_id text PRIMARY KEY,
    committed_sequence bigint NOT NULL DEFAULT 0,
    update_time timestamptz NOT NULL DEFAULT now()
);

-- CACHE 1 (the default) matters: cursors are taken under the events lock, so they follow commit order.
CREATE SEQUENCE tag_events_cursor_seq AS bigint CACHE 1;
CREATE TABLE tag_events (
    cursor bigint PRIMARY KEY DEFAULT nextval('tag_events_cursor_seq'),
    tag_id bigint NOT NULL,
    plc_id text NOT NULL,
    role smallint NOT NULL,
    read_time timestamptz NOT NULL,
    quality smallint NOT NULL,
    kind smallint NOT NULL,
    value double precision,
    int_value bigint,
    text_value text,
    bytes_value bytea,
    insert_time timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE tag_events_cursor_seq OWNED BY tag_events.cursor;

CREATE TABLE event_retention (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    purged_through bigint NOT NULL DEFAULT 0
);
INSERT INTO event_retention DEFAULT VALUES;
"""),
    Migration(2, "tag metadata reported by collectors: name, unit, removed", """
CREATE TABLE tag_metadata (
    tag_id bigint PRIMARY KEY,
    collector_id text NOT NULL,
    plc_id text NOT NULL,
    name text NOT NULL,
    unit text NOT NULL,
    role smallint NOT NULL,
    removed boolean NOT NULL DEFAULT false,
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tag_metadata_collector_idx ON tag_metadata (collector_id, tag_id);
"""),
    Migration(3, "collector epochs: the highest epoch of each collector, which fences older incarnations", """
ALTER TABLE collector_sequences ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
"""),
    Migration(4, "the committed-readings feed: one row per committed batch, with a cursor in commit order", """
-- CACHE 1 (the default) matters: cursors are taken under the events lock, so they follow commit order.
CREATE SEQUENCE committed_batches_cursor_seq AS bigint CACHE 1;
CREATE TABLE committed_batches (
    cursor bigint PRIMARY KEY,
    collector_id text NOT NULL,
    sequence bigint NOT NULL,
    plc_ids text[] NOT NULL,
    reading_count integer NOT NULL,
    payload bytea NOT NULL,
    commit_time timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE committed_batches_cursor_seq OWNED BY committed_batches.cursor;
ALTER TABLE committed_batches ALTER COLUMN payload SET STORAGE EXTERNAL;
CREATE INDEX committed_batches_commit_time_idx ON committed_batches USING brin (commit_time);
-- A watch of a few PLCs catching up: their batches without reading every other PLC's (GIN's pending list
-- keeps the insert in the write transaction cheap).
CREATE INDEX committed_batches_plc_ids_idx ON committed_batches USING gin (plc_ids);

CREATE TABLE feed_retention (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    purged_through bigint NOT NULL DEFAULT 0
);
INSERT INTO feed_retention DEFAULT VALUES;
"""),
    Migration(5, "tag events carry the trace context of their batch (when it was sampled)", """
ALTER TABLE tag_events ADD COLUMN traceparent text, ADD COLUMN tracestate text;
"""),
    audit.migration(6),
    Migration(7, "each reading names its tenant (runtime/tenancy.py; readings from before tenants: default)", """
ALTER TABLE readings ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
"""),
    Migration(8, "tenants: row-level security on every ingest table, keys per tenant", "\n".join([
        *(tenancy.isolate_sql(SCHEMA, table) for table in TENANT_TABLES),
        audit.isolation_sql(SCHEMA),
        """
-- Each partition of readings has the parent's policy too (a query names the parent, but a statement on a
-- partition, as maintenance makes, must not pass the policy by).
DO $$ DECLARE p regclass; BEGIN
    FOR p IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'ingest.readings'::regclass LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', p);
        EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', p);
        EXECUTE format('CREATE POLICY tenant_isolation ON %s USING """ + _POLICY_SQL + """ WITH CHECK """ + _POLICY_SQL + """', p);
    END LOOP;
END $$;

-- Collector ids are unique per tenant: each tenant's collector has its own sequence and epoch.
ALTER TABLE collector_sequences DROP CONSTRAINT collector_sequences_pkey,
    ADD PRIMARY KEY (tenant_id, collector_id);
-- Tag ids are global numbers (config's sequence), but a row is its tenant's: a collector of another
-- tenant naming the same id writes rows of its own tenant, never one of this tenant's.
ALTER TABLE tags DROP CONSTRAINT tags_pkey, ADD PRIMARY KEY (tag_id, tenant_id);
ALTER TABLE latest DROP CONSTRAINT latest_pkey, ADD PRIMARY KEY (tag_id, tenant_id);
ALTER TABLE tag_metadata DROP CONSTRAINT tag_metadata_pkey, ADD PRIMARY KEY (tag_id, tenant_id);
DROP INDEX tag_metadata_collector_idx;
CREATE INDEX tag_metadata_collector_idx ON tag_metadata (tenant_id, collector_id, tag_id);
-- A tenant's watcher reads its own events and batches after its cursor, and its newest cursor, without
-- scanning every other tenant's (the policy's OR cannot use an index; the watch queries name the tenant).
CREATE INDEX tag_events_tenant_cursor_idx ON tag_events (tenant_id, cursor);
CREATE INDEX committed_batches_tenant_cursor_idx ON committed_batches (tenant_id, cursor);
"""])),
    Migration(9, "1-minute and 1-hour rollups of the readings per tenant, tag, bucket and quality (rollup.py)",
              ROLLUP_MIGRATION_SQL),
]

def _own_tenant(param: int) -> tuple[str, tuple[str, ...]]:
    """For the watch queries of a single tenant's caller: the predicate ``tenant_id = $<param> AND `` and its
    argument, so that the (tenant_id, cursor) indexes serve them (the policy, which holds all the same, is an
    OR no index can serve); nothing for a caller across tenants."""
    tenant = tenancy.current()
    if tenant is None or tenant == tenancy.ALL:
        return "", ()
    return f"tenant_id = ${param} AND ", (tenant,)


def _sampled(traceparent: str) -> bool:
    """The traceparent's sampled flag (the low bit of its last field; 0x02 is W3C level 2's random flag)."""
    return len(traceparent) == 55 and int(traceparent[53:], 16) & 1 == 1


def _trace_of(batch: WriteBatch) -> tuple[str | None, str | None]:
    """The trace columns of a batch's tag events: its context when sampled, else NULL."""
    if _sampled(batch.traceparent):
        return batch.traceparent, batch.tracestate or None
    return None, None


_READING_SELECT = "tag_id, read_time, quality, kind, value, int_value, text_value, bytes_value, error"
_READING_COLUMN_LIST = ", ".join(READING_COLUMNS)
_EVENT_COLUMN_LIST = ", ".join((*EVENT_COLUMNS, "traceparent", "tracestate"))
#: The writer connection's staging tables (temporary: its own, emptied at each commit, no row-level
#: security). COPY is not allowed into a table with row-level security, so each tenant slice of a group is
#: COPYed here and moved into the real table with INSERT ... SELECT under the slice's tenant (see "Tenants").
_STAGE_SQL = """
CREATE TEMPORARY TABLE readings_stage (LIKE ingest.readings) ON COMMIT DELETE ROWS;
ALTER TABLE readings_stage DROP COLUMN tenant_id;
CREATE TEMPORARY TABLE events_stage (
    ord bigint GENERATED ALWAYS AS IDENTITY,
    tag_id bigint, plc_id text, role smallint, read_time timestamptz, quality smallint, kind smallint,
    value double precision, int_value bigint, text_value text, bytes_value bytea, traceparent text, tracestate text
) ON COMMIT DELETE ROWS;
"""
_MOVE_READINGS = (f"INSERT INTO ingest.readings (tenant_id, {_READING_COLUMN_LIST})"
                  f" SELECT $1, {_READING_COLUMN_LIST} FROM pg_temp.readings_stage")
_MOVE_EVENTS = (f"INSERT INTO ingest.tag_events ({_EVENT_COLUMN_LIST})"
                f" SELECT {_EVENT_COLUMN_LIST} FROM pg_temp.events_stage ORDER BY ord")
_SET_TENANT = f"SELECT set_config('{tenancy.SETTING}', $1, true)"
#: The tag's columns a returned reading carries (convert.reading_from_row), over `r` (the readings) joined
#: with `t` (tags) and `m` (tag_metadata): _TAG_JOIN.
_TAG_SELECT = "t.plc_id, t.role, m.name AS tag_name, m.unit"
#: `r` must have tenant_id: a tag id is one tenant's, but an installation-wide caller sees every tenant's rows.
_TAG_JOIN = (" LEFT JOIN ingest.tags t ON t.tag_id = r.tag_id AND t.tenant_id = r.tenant_id"
             " LEFT JOIN ingest.tag_metadata m ON m.tag_id = r.tag_id AND m.tenant_id = r.tenant_id")

_SYNC_TAGS = """
WITH incoming AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::smallint[])
        AS u(tag_id, plc_id, name, unit, role)
), upserted AS (
    INSERT INTO ingest.tag_metadata AS m (tag_id, collector_id, plc_id, name, unit, role)
    SELECT tag_id, $1, plc_id, name, unit, role FROM incoming ORDER BY tag_id
    ON CONFLICT (tag_id, tenant_id) DO UPDATE SET collector_id = EXCLUDED.collector_id, plc_id = EXCLUDED.plc_id,
        name = EXCLUDED.name, unit = EXCLUDED.unit, role = EXCLUDED.role, removed = false, update_time = now()
    WHERE (m.collector_id, m.plc_id, m.name, m.unit, m.role, m.removed)
        IS DISTINCT FROM (EXCLUDED.collector_id, EXCLUDED.plc_id, EXCLUDED.name, EXCLUDED.unit, EXCLUDED.role, false)
    RETURNING 1
), gone AS (
    UPDATE ingest.tag_metadata m SET removed = true, update_time = now()
    WHERE m.tag_id IN (SELECT x.tag_id FROM ingest.tag_metadata x
                       WHERE x.collector_id = $1 AND NOT x.removed
                         AND NOT EXISTS (SELECT 1 FROM incoming i WHERE i.tag_id = x.tag_id)
                       ORDER BY x.tag_id FOR UPDATE)
    RETURNING 1
)
SELECT (SELECT count(*) FROM upserted) AS changed, (SELECT count(*) FROM gone) AS removed
"""

_LOCK_SEQUENCES = (
    "SELECT collector_id, committed_sequence, epoch FROM ingest.collector_sequences"
    " WHERE tenant_id = $2 AND collector_id = ANY($1::text[]) ORDER BY collector_id FOR UPDATE"
)

_FINISH_GROUP = f"""
WITH newest AS (
    INSERT INTO ingest.latest AS l ({_READING_SELECT})
    SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::smallint[], $4::smallint[], $5::float8[],
                         $6::bigint[], $7::text[], $8::bytea[], $9::text[])
    ON CONFLICT (tag_id, tenant_id) DO UPDATE SET read_time = EXCLUDED.read_time, quality = EXCLUDED.quality,
        kind = EXCLUDED.kind, value = EXCLUDED.value, int_value = EXCLUDED.int_value,
        text_value = EXCLUDED.text_value, bytes_value = EXCLUDED.bytes_value, error = EXCLUDED.error
    WHERE l.read_time <= EXCLUDED.read_time
), advanced AS (
    UPDATE ingest.collector_sequences s SET committed_sequence = u.seq, update_time = now()
    FROM unnest($10::text[], $11::bigint[]) AS u(collector_id, seq)
    WHERE s.tenant_id = $14 AND s.collector_id = u.collector_id
)
SELECT CASE WHEN $12::boolean THEN pg_notify($13, currval('ingest.tag_events_cursor_seq')::text) END
"""


#: The feed rows of a transaction's written batches, cursors taken in batch order (under the events lock,
#: which the caller holds), and the NOTIFY that wakes the feed's watchers at commit.
_APPEND_FEED = """
WITH b AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::integer[], $4::bytea[])
        WITH ORDINALITY AS u(collector_id, sequence, reading_count, payload, i)
), p AS (
    SELECT i, array_agg(DISTINCT plc_id ORDER BY plc_id) AS plc_ids
    FROM unnest($5::bigint[], $6::text[]) AS x(i, plc_id) GROUP BY i
), fed AS (
    INSERT INTO ingest.committed_batches (cursor, collector_id, sequence, plc_ids, reading_count, payload)
    SELECT nextval('ingest.committed_batches_cursor_seq'), b.collector_id, b.sequence,
           coalesce(p.plc_ids, '{}'), b.reading_count, b.payload
    FROM b LEFT JOIN p USING (i) ORDER BY b.i
    RETURNING cursor
)
SELECT pg_notify($7, (SELECT max(cursor) FROM fed)::text)
"""


def feed_columns(batches: Sequence[WriteBatch]) -> tuple[list[object], ...]:
    """The parameters of _APPEND_FEED for `batches`: per batch its collector, sequence, size and payload,
    and (batch number from 1, plc_id) per distinct PLC of each batch."""
    owners: list[int] = []
    plcs: list[str] = []
    for i, b in enumerate(batches, 1):
        if b.payload is None:
            raise ValueError(f"batch {b.collector_id}/{b.sequence} has no payload for the committed-readings feed")
        for plc_id in {plc_id for plc_id, _ in b.tags.values()}:
            owners.append(i)
            plcs.append(plc_id)
    return ([b.collector_id for b in batches], [b.sequence for b in batches], [b.size for b in batches],
            [b.payload for b in batches], owners, plcs)


def _encode_us(us: int) -> tuple[int]:
    return (us - _PG_EPOCH_US,)


def _decode_us(t: tuple[int]) -> int:
    return t[0] + _PG_EPOCH_US


def _ts(t: datetime) -> str:
    return t.isoformat()


@dataclass(frozen=True)
class FeedPage:
    """Feed rows after a cursor, with the highest cursor committed and the retention mark, all from one
    snapshot (see :meth:`IngestStore.feed_page`)."""

    rows: list[asyncpg.Record]
    #: The highest cursor committed when the page was read (everything up to it was visible).
    high: int
    purged_through: int
    #: The rows are every matching row after the cursor up to `high` (neither the row limit nor the byte
    #: limit cut the page short).
    complete: bool


@dataclass(frozen=True)
class CollectorSequence:
    """A collector's row of collector_sequences."""

    committed: int
    epoch: int


@dataclass(frozen=True)
class EventsPage:
    rows: list[asyncpg.Record]
    #: The highest cursor committed when the page was read (everything up to it was visible).
    high: int
    purged_through: int


class IngestStore:
    """SQL over the service's pool (reads) and the writer's own connection (writes)."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, *, feed: bool = True, row_security: bool = True):
        self.pool = pool
        self.dsn = dsn
        #: Whether write transactions append to the committed-readings feed (FABRICA_INGEST_FEED).
        self.feed = feed
        #: The writer's connection runs as the row-level-security role (runtime/tenancy.py DB_ROLE), as the
        #: pool's do. False (benchmarks only, beside runtime/db.py ``create_pool(row_security=False)``): as
        #: the connecting user, whom the policies do not hold when it is a superuser, and COPY goes
        #: straight into the tables.
        self.row_security = row_security
        #: Answers aggregate() from the 1-minute and 1-hour rollups when set (rollup.py; needs the feed).
        self.rollups: RollupReader | None = None

    # --- write path -----------------------------------------------------------------------------------

    async def connect_writer(self, timeout: float = 5.0) -> asyncpg.Connection:
        """A dedicated connection for write transactions. Its timestamptz codec takes microseconds since
        the Unix epoch (ints), the form the rows are built in, which saves making a datetime per row."""
        settings = {"application_name": "fabrica-ingest-writer"}
        if self.row_security:
            settings["role"] = tenancy.DB_ROLE
        conn = await asyncpg.connect(self.dsn, timeout=timeout, server_settings=settings)
        try:
            await conn.set_type_codec(
                "timestamptz", schema="pg_catalog", encoder=_encode_us, decoder=_decode_us, format="tuple"
            )
            if self.row_security:
                await conn.execute(_STAGE_SQL)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def committed_sequence(self, collector_id: str) -> int:
        value = await self.pool.fetchval(
            "SELECT committed_sequence FROM ingest.collector_sequences WHERE collector_id = $1", collector_id
        )
        return int(value or 0)

    async def open_stream(self, collector_id: str, epoch: int, new_epoch: bool) -> CollectorSequence:
        """The collector's (committed sequence, epoch) for a stream opening with `epoch`, after taking the
        epoch over when it is above the stored one, or after giving the collector the next epoch for
        `new_epoch`. Taking over updates the row under its lock, so once this returns no batch of a lower
        epoch can commit any more (the write transaction checks the epoch under the same lock). A stream
        at or below the stored epoch changes nothing (and a collector never seen keeps no row for epoch 0)."""
        row = await self.pool.fetchrow(
            "SELECT committed_sequence, epoch FROM ingest.collector_sequences WHERE collector_id = $1", collector_id
        )
        if not new_epoch and (epoch == 0 if row is None else epoch <= row["epoch"]):
            return CollectorSequence(0, 0) if row is None else CollectorSequence(*row)
        if new_epoch and row is not None and row["epoch"] >= MAX_BIGINT:
            raise FailedPrecondition(f"collector {collector_id} is at the last epoch ({MAX_BIGINT}); reset it with "
                                     "ResetCollectorSequence", reason="EPOCH_EXHAUSTED",
                                     metadata={"collector_id": collector_id, "stored_epoch": str(row["epoch"])})
        row = await self.pool.fetchrow(
            "INSERT INTO ingest.collector_sequences AS s (collector_id, epoch)"
            " VALUES ($1, CASE WHEN $3 THEN 1 ELSE $2 END)"
            " ON CONFLICT (tenant_id, collector_id) DO UPDATE SET update_time = now(), epoch = CASE"
            "  WHEN $3 THEN s.epoch + (s.epoch < 9223372036854775807)::int ELSE greatest(s.epoch, $2) END"
            " RETURNING committed_sequence, epoch",
            collector_id, epoch, new_epoch,
        )
        return CollectorSequence(*row)

    async def reset_sequence(self, collector_id: str, committed: int, epoch: int | None
                             ) -> tuple[CollectorSequence, CollectorSequence] | None:
        """Set the collector's committed sequence (and epoch, unless None) under its row lock; returns
        (before, after), or None for a collector without a row."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT committed_sequence, epoch FROM ingest.collector_sequences WHERE collector_id = $1 FOR UPDATE",
                collector_id,
            )
            if row is None:
                return None
            before = CollectorSequence(*row)
            after = CollectorSequence(committed, before.epoch if epoch is None else epoch)
            await conn.execute(
                "UPDATE ingest.collector_sequences SET committed_sequence = $2, epoch = $3, update_time = now()"
                " WHERE collector_id = $1",
                collector_id, after.committed, after.epoch,
            )
            await audit.record(conn, f"collectors/{collector_id}",
                               f"committed sequence {before.committed} -> {after.committed}, "
                               f"epoch {before.epoch} -> {after.epoch}")
        return before, after

    async def write_group(
        self, conn: asyncpg.Connection, batches: Sequence[WriteBatch], tag_changes: Sequence[tuple[str, int, str, int]]
    ) -> GroupPlan:
        """One transaction for a group of batches, each tenant's slice under that tenant (``fabrica.tenant``
        set with set_config(..., true) before its statements, so every statement is held by the policies:
        a row of another tenant can be neither read nor written). First, tenant by tenant (in code order):
        lock the collectors' sequence rows, drop the batches at or below the committed sequences and refuse
        those that do not follow them or come from a fenced epoch (domain.plan_group), write the rest's
        readings and keep the tags current. Then, under the events lock, tenant by tenant: append tag events
        (with NOTIFY) and the feed, keep latest values current, advance the sequences. Commit. Raises on any
        failure; nothing is then written. `tag_changes` are (tenant, tag_id, plc_id, role), sorted."""
        slices: dict[str, list[int]] = {}
        for i, b in enumerate(batches):
            slices.setdefault(b.tenant, []).append(i)
        tenants = sorted(slices)
        changes: dict[str, list[tuple[str, int, str, int]]] = {}
        for change in tag_changes:
            changes.setdefault(change[0], []).append(change)
        outcomes: list[BatchOutcome | None] = [None] * len(batches)
        advanced: dict[str, dict[str, int]] = {}
        written_of: dict[str, list[WriteBatch]] = {}
        staged = False
        # Every statement here is a round trip during which the event loop may be busy converting other
        # batches, so a one-tenant transaction is kept to seven of them (ten with events or new tags).
        async with conn.transaction():
            for tenant in tenants:
                await conn.execute(_SET_TENANT, tenant)
                mine = [batches[i] for i in slices[tenant]]
                collectors = sorted({b.collector_id for b in mine})
                # The statements name the slice's tenant besides the policy (which alone would do): so that
                # without row-level security (benchmarks) the slices stay apart too.
                locked = await conn.fetch(_LOCK_SEQUENCES, collectors, tenant)
                if len(locked) < len(collectors):  # a collector's first batch
                    await conn.execute(
                        "INSERT INTO ingest.collector_sequences (collector_id)"
                        " SELECT c FROM unnest($1::text[]) AS c ORDER BY c"
                        " ON CONFLICT (tenant_id, collector_id) DO NOTHING",
                        collectors,
                    )
                    locked = await conn.fetch(_LOCK_SEQUENCES, collectors, tenant)
                plan = plan_group(
                    {r["collector_id"]: (r["committed_sequence"], r["epoch"]) for r in locked},
                    [(b.collector_id, b.sequence, b.size, b.epoch) for b in mine],
                )
                for i, outcome in zip(slices[tenant], plan.outcomes):
                    outcomes[i] = outcome
                written = [mine[i] for i in plan.written]
                if not written:
                    continue
                written_of[tenant], advanced[tenant] = written, plan.advanced
                # Stable sort by tag: the btree on (tag_id, read_time) is then filled in order (see above).
                records = sorted(chain.from_iterable(b.rows for b in written), key=operator.itemgetter(0))
                if self.row_security:
                    if staged:
                        await conn.execute("TRUNCATE pg_temp.readings_stage")
                    await conn.copy_records_to_table("readings_stage", schema_name="pg_temp",
                                                     columns=READING_COLUMNS, records=records)
                    await conn.execute(_MOVE_READINGS, tenant)
                    staged = True
                else:  # the tenant_id column's default is the session's tenant, set above
                    await conn.copy_records_to_table(
                        "readings", schema_name=SCHEMA, columns=READING_COLUMNS, records=records
                    )
                del records
                if tenant in changes:
                    _, tag_ids, plc_ids, roles = zip(*changes[tenant])
                    await conn.execute(
                        "INSERT INTO ingest.tags (tag_id, plc_id, role)"
                        " SELECT * FROM unnest($1::bigint[], $2::text[], $3::smallint[])"
                        " ON CONFLICT (tag_id, tenant_id) DO UPDATE SET plc_id = EXCLUDED.plc_id,"
                        "  role = EXCLUDED.role, update_time = now()"
                        " WHERE (tags.plc_id, tags.role) IS DISTINCT FROM (EXCLUDED.plc_id, EXCLUDED.role)",
                        tag_ids, plc_ids, roles,
                    )
            if written_of and (self.feed or any(b.events for w in written_of.values() for b in w)):
                # Serialize event-writing transactions (of every replica) from here to commit, and take
                # the cursors only now: a cursor then never becomes visible before a smaller one.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", EVENTS_LOCK_KEY)
            current = tenants[-1] if tenants else None
            staged = False
            for tenant, written in written_of.items():  # in code order, as above
                if tenant != current:
                    await conn.execute(_SET_TENANT, tenant)
                    current = tenant
                events = list(chain.from_iterable(b.events for b in written))
                if events:
                    await self._append_events(conn, written, events, staged)
                    staged = self.row_security
                if self.feed:  # the committed-readings feed: one row per written batch (see the module docstring)
                    await conn.execute(_APPEND_FEED, *feed_columns(written), FEED_CHANNEL)
                # Latest values, the sequences and the NOTIFY in one statement (data-modifying CTEs always run).
                await conn.execute(
                    _FINISH_GROUP,
                    *zip(*merge_latest(written)),
                    list(advanced[tenant]), list(advanced[tenant].values()), bool(events), EVENTS_CHANNEL, tenant,
                )
        assert all(o is not None for o in outcomes)
        # The sequences advanced, by "tenant/collector" (a collector id is unique within its tenant only).
        return GroupPlan(outcomes, {f"{t}/{c}": seq for t in tenants  # type: ignore[arg-type]
                                    for c, seq in advanced.get(t, {}).items()})

    async def _append_events(self, conn: asyncpg.Connection, written: Sequence[WriteBatch],
                             events: list[tuple[object, ...]], staged: bool) -> None:
        """The tag events of one tenant's written batches, cursors in batch order (the caller holds the
        events lock and has set the tenant)."""
        columns: tuple[str, ...] = EVENT_COLUMNS
        if any(_sampled(b.traceparent) for b in written):
            # Some batches' traces are sampled: their events carry the context on to production.
            events = [(*e, *_trace_of(b)) for b in written for e in b.events]
            columns = (*EVENT_COLUMNS, "traceparent", "tracestate")
        if not self.row_security:
            await conn.copy_records_to_table("tag_events", schema_name=SCHEMA, columns=columns, records=events)
            return
        if staged:
            await conn.execute("TRUNCATE pg_temp.events_stage")
        await conn.copy_records_to_table("events_stage", schema_name="pg_temp", columns=columns, records=events)
        await conn.execute(_MOVE_EVENTS)

    # --- read path ------------------------------------------------------------------------------------

    async def resolve_tags(self, tag_ids: Sequence[int], plc_id: str) -> list[int]:
        """The tags a filter covers: `tag_ids`, narrowed to the PLC's tags when `plc_id` is set too."""
        if not plc_id:
            return sorted(set(tag_ids))
        rows = await self.pool.fetch(
            "SELECT tag_id FROM ingest.tags WHERE plc_id = $1"
            " AND ($2::bigint[] IS NULL OR tag_id = ANY($2::bigint[])) ORDER BY tag_id",
            plc_id, list(tag_ids) or None,
        )
        return [r["tag_id"] for r in rows]

    async def readings_page(
        self,
        tag_ids: Sequence[int],
        start: datetime,
        end: datetime,
        after: PageCursor | None,
        after_time: datetime | None,
        qualities: Sequence[int] | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        """Up to `limit` readings ordered by (read_time, tag_id, ctid), after `after`.

        Per tag, an index range scan that stops after `limit` rows; the union is sorted and cut to `limit`.
        So a page costs at most tags × limit index rows, however long the range (a plain ORDER BY ... LIMIT
        over many tags would sort the whole remaining range for every page)."""
        if after is None:
            lower, key = start, (start, 0, (0, 0))
        else:
            assert after_time is not None
            lower, key = max(start, after_time), (after_time, after.tag_id, (after.block, after.offset))
        return await self.pool.fetch(
            f"SELECT r.*, {_TAG_SELECT}"
            " FROM unnest($1::bigint[]) AS q(tag_id)"
            " CROSS JOIN LATERAL ("
            f"  SELECT {_READING_SELECT}, x.tenant_id, x.ctid AS row_id FROM ingest.readings x"
            "   WHERE x.tag_id = q.tag_id AND x.read_time >= $2 AND x.read_time < $3"
            "     AND (x.read_time, x.tag_id, x.ctid) > ($4, $5, $6::tid)"
            "     AND ($7::smallint[] IS NULL OR x.quality = ANY($7::smallint[]))"
            "   ORDER BY x.read_time, x.ctid LIMIT $8) r"
            f"{_TAG_JOIN}"
            " ORDER BY r.read_time, r.tag_id, r.row_id LIMIT $8",
            list(tag_ids), lower, end, key[0], key[1], key[2], qualities, limit,
        )

    async def export(
        self, tag_ids: Sequence[int], start: datetime, end: datetime, qualities: Sequence[int] | None,
        chunk: int,
    ) -> AsyncIterator[list[asyncpg.Record]]:
        """All readings of the range in (read_time, tag_id) order, `chunk` rows at a time, from one
        server-side cursor in one snapshot: Postgres sorts the range once. Paging with
        :meth:`readings_page` would fetch up to tags × chunk rows for every chunk instead. The caller's
        pace sets the pace (memory here is one chunk)."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = await conn.cursor(
                f"SELECT r.*, {_TAG_SELECT} FROM (SELECT {_READING_SELECT}, tenant_id FROM ingest.readings"
                "  WHERE tag_id = ANY($1::bigint[]) AND read_time >= $2 AND read_time < $3"
                "    AND ($4::smallint[] IS NULL OR quality = ANY($4::smallint[]))) r"
                f"{_TAG_JOIN}"
                " ORDER BY r.read_time, r.tag_id",
                list(tag_ids), start, end, qualities,
            )
            while rows := await cursor.fetch(chunk):
                yield rows

    async def aggregate(
        self, tag_ids: Sequence[int], start: datetime, end: datetime, bucket_seconds: int,
        qualities: Sequence[int] | None,
    ) -> list[asyncpg.Record]:
        """count, min, max, avg, first and last per tag and epoch-aligned bucket.

        first/last are the values of the earliest and latest numeric reading of the bucket, as
        ``min``/``max`` over ``ARRAY[microseconds, value]`` (arrays compare element by element): constant
        memory per bucket, where ``array_agg(value ORDER BY read_time)[1]`` would hold the whole bucket.
        Readings of one tag at the very same instant are ordered by value. A bucket with no numeric
        value (only failures, or text) has NULL min/max/avg/first/last.

        With :attr:`rollups` set and a bucket of whole minutes, the same aggregates come from the rollup
        tables for the whole minutes (hours) they have caught up on, and from the readings for the rest
        (rollup.py: the same answer, read from far fewer rows)."""
        if self.rollups is not None:
            rows = await self.rollups.aggregate(tag_ids, start, end, bucket_seconds, qualities)
            if rows is not None:
                return rows
        return await self.pool.fetch(
            "SELECT tag_id,"
            " date_bin(make_interval(secs => $4::float8), read_time, '1970-01-01 00:00:00+00'::timestamptz) AS bucket,"
            " count(*) AS n, min(value) AS min, max(value) AS max, avg(value) AS avg,"
            " (min(ARRAY[(extract(epoch FROM read_time) * 1000000)::float8, value])"
            "   FILTER (WHERE value IS NOT NULL))[2] AS first,"
            " (max(ARRAY[(extract(epoch FROM read_time) * 1000000)::float8, value])"
            "   FILTER (WHERE value IS NOT NULL))[2] AS last"
            " FROM ingest.readings"
            " WHERE tag_id = ANY($1::bigint[]) AND read_time >= $2 AND read_time < $3"
            "   AND ($5::smallint[] IS NULL OR quality = ANY($5::smallint[]))"
            " GROUP BY tag_id, bucket ORDER BY tag_id, bucket",
            list(tag_ids), start, end, bucket_seconds, qualities,
        )

    async def summarize(
        self, tag_id: int, start: datetime, end: datetime, lsl: float | None, usl: float | None
    ) -> asyncpg.Record:
        """Statistics of the GOOD numeric readings of one tag, all computed in Postgres. The trend is the
        least-squares line of value against hours since `start`, so the intercept is the line's value at
        the start of the range."""
        return await self.pool.fetchrow(
            "WITH s AS ("
            " SELECT count(value) AS n, avg(value) AS mean, stddev_samp(value) AS sd,"
            "  min(value) AS min, max(value) AS max,"
            "  regr_slope(value, x) AS slope, regr_intercept(value, x) AS intercept"
            " FROM (SELECT value, (extract(epoch FROM read_time - $2::timestamptz) / 3600)::float8 AS x"
            "       FROM ingest.readings"
            "       WHERE tag_id = $1 AND read_time >= $2 AND read_time < $3"
            f"         AND quality = {QUALITY_GOOD:d} AND value IS NOT NULL) r)"  # the generated enum's number
            " SELECT n, coalesce(mean, 0) AS mean, coalesce(sd, 0) AS sd, coalesce(min, 0) AS min,"
            "  coalesce(max, 0) AS max, slope, intercept,"
            "  CASE WHEN $4::float8 IS NOT NULL AND $5::float8 IS NOT NULL AND sd > 0"
            "   THEN ($5::float8 - $4::float8) / (6 * sd) END AS cp,"
            "  CASE WHEN sd > 0 THEN least(($5::float8 - mean) / (3 * sd), (mean - $4::float8) / (3 * sd)) END AS cpk"
            " FROM s",
            tag_id, start, end, lsl, usl,
        )

    async def latest(self, tag_ids: Sequence[int] | None, plc_id: str | None) -> list[asyncpg.Record]:
        """The newest reading of each tag asked for, with its name and unit; tags their collector reported
        removed are left out (by id too: a removed tag has no live value, only history)."""
        return await self.pool.fetch(
            f"SELECT r.*, {_TAG_SELECT} FROM ingest.latest r{_TAG_JOIN}"
            " WHERE ($1::bigint[] IS NULL OR r.tag_id = ANY($1::bigint[]))"
            "   AND ($2::text IS NULL OR t.plc_id = $2)"
            "   AND m.removed IS NOT TRUE"
            " ORDER BY r.tag_id",
            list(tag_ids) if tag_ids else None, plc_id or None,
        )

    async def sync_tags(self, collector_id: str, tags: Sequence[tuple[int, str, str, str, int]]) -> tuple[int, int]:
        """Make `tags` (tag_id, plc_id, name, unit, role; each tag_id once) the collector's described tags:
        upsert them (a tag another collector described before becomes this one's), mark the collector's
        other tags removed. Returns (rows changed, rows newly removed); (0, 0) for the same set again.
        One statement under the collector's advisory lock, so two syncs of a collector never interleave."""
        columns = list(zip(*tags)) if tags else [(), (), (), (), ()]
        async with self.pool.acquire() as conn, conn.transaction():
            # Keyed by tenant and collector: another tenant's collector of the same id is another collector.
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", TAG_SYNC_LOCK_CLASS,
                               f"{tenancy.current()}/{collector_id}")
            row = await conn.fetchrow(_SYNC_TAGS, collector_id, *(list(c) for c in columns))
            if row["changed"] or row["removed"]:  # the same set again changes nothing and is not recorded
                await audit.record(conn, f"collectors/{collector_id}/tags",
                                   f"{row['changed']} tags described, {row['removed']} removed")
        return int(row["changed"]), int(row["removed"])

    async def events_page(
        self, after: int, tag_ids: Sequence[int] | None, plc_ids: Sequence[str] | None, limit: int
    ) -> EventsPage:
        """Events after cursor `after` (filtered), plus, from the same snapshot, the highest cursor
        committed and the retention mark. Because cursors are taken in commit order, every cursor at or
        below `high` that will ever exist is already visible: a filtered watcher may skip to `high`."""
        mine, args = _own_tenant(5)
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                "SELECT cursor, tenant_id, tag_id, plc_id, role, read_time, quality, kind, value, int_value,"
                " text_value, bytes_value, traceparent, tracestate FROM ingest.tag_events"
                f" WHERE {mine}cursor > $1 AND ($2::bigint[] IS NULL OR tag_id = ANY($2::bigint[]))"
                "   AND ($3::text[] IS NULL OR plc_id = ANY($3::text[]))"
                " ORDER BY cursor LIMIT $4",
                after, list(tag_ids) if tag_ids else None, list(plc_ids) if plc_ids else None, limit, *args,
            )
            mine, args = _own_tenant(1)
            marks = await conn.fetchrow(
                f"SELECT (SELECT coalesce(max(cursor), 0) FROM ingest.tag_events WHERE {mine}true) AS high,"
                " (SELECT purged_through FROM ingest.event_retention) AS purged", *args
            )
        return EventsPage(rows, marks["high"], marks["purged"])

    async def feed_page(self, after: int, plc_ids: Sequence[str] | None, limit: int, max_bytes: int) -> FeedPage:
        """Feed rows after cursor `after` (of batches with a reading of one of `plc_ids`, when set), at most
        `limit` rows and `max_bytes` of payload (but always the first row, whatever its size), plus, from the same snapshot, the
        highest cursor committed and the retention mark. As for events, every cursor at or below `high`
        that will ever exist is already visible (cursors are taken in commit order)."""
        mine, args = _own_tenant(5)
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            # The first `limit` matching rows (ids and sizes only), then the payloads of those that fit.
            rows = await conn.fetch(
                "WITH f AS ("
                "  SELECT cursor, octet_length(payload) AS size FROM ingest.committed_batches"
                f"  WHERE {mine}cursor > $1 AND ($2::text[] IS NULL OR plc_ids && $2::text[])"
                "  ORDER BY cursor LIMIT $3"
                "), w AS (SELECT cursor, sum(size) OVER (ORDER BY cursor) AS upto, count(*) OVER () AS n FROM f)"
                " SELECT c.cursor, c.tenant_id, c.commit_time, c.reading_count, c.payload, w.n"
                " FROM w JOIN ingest.committed_batches c USING (cursor)"
                " WHERE w.upto <= $4 OR w.cursor = (SELECT min(cursor) FROM f) ORDER BY c.cursor",
                after, list(plc_ids) if plc_ids else None, limit, max_bytes, *args,
            )
            mine, args = _own_tenant(1)
            marks = await conn.fetchrow(
                f"SELECT (SELECT coalesce(max(cursor), 0) FROM ingest.committed_batches WHERE {mine}true) AS high,"
                " (SELECT purged_through FROM ingest.feed_retention) AS purged", *args
            )
        complete = not rows or (len(rows) == rows[0]["n"] < limit)
        return FeedPage(rows, marks["high"], marks["purged"], complete)

    async def feed_head(self) -> int:
        """The highest cursor of the committed-readings feed (0 when it is empty)."""
        mine, args = _own_tenant(1)
        return int(await self.pool.fetchval(
            f"SELECT coalesce(max(cursor), 0) FROM ingest.committed_batches WHERE {mine}true", *args))

    async def purge_feed_before(self, cutoff: datetime, keep_after: int | None = None) -> int:
        """Delete feed rows committed before `cutoff`, by cursor (up to the last one committed before it,
        and never past `keep_after`: the rollup job's cursor), so that what remains is always every batch
        after `purged_through`; returns purged_through."""
        async with self.pool.acquire() as conn, conn.transaction():
            return int(await conn.fetchval(
                "WITH edge AS (SELECT least(max(cursor), $2) AS c FROM ingest.committed_batches WHERE commit_time < $1),"
                " gone AS (DELETE FROM ingest.committed_batches WHERE cursor <= (SELECT c FROM edge))"
                " UPDATE ingest.feed_retention"
                " SET purged_through = greatest(purged_through, coalesce((SELECT c FROM edge), 0))"
                " RETURNING purged_through",
                cutoff, keep_after,
            ))

    # --- maintenance ----------------------------------------------------------------------------------

    async def partitions(self) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'ingest.readings'::regclass ORDER BY c.relname"
        )
        return [r["relname"] for r in rows]

    async def create_partition(self, day: date, lock_timeout: str = "2s") -> bool:
        """Create `day`'s partition, moving that day's rows out of the default partition first. False if
        another replica is maintaining partitions right now (it will do it)."""
        name = partition_name(day)
        lo, hi = day_bounds(day)
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", MAINTENANCE_LOCK_KEY):
                return False
            # Partitions are DDL on the tables' owner's tables: as the connecting user, not the RLS role.
            await conn.execute("SET LOCAL ROLE NONE")
            # Never let a DDL lock queue block the writer for long: give up and retry next round.
            await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
            if await conn.fetchval("SELECT to_regclass($1)", f"{SCHEMA}.{name}") is not None:
                return True
            # No write may be in progress across the attach: a COPY routes its rows with the partitions it
            # saw when it started, so one that started before the attach and waited for the default
            # partition's lock would put that day's rows into the default partition after it, and fail
            # ("violates partition constraint", a batch refused for nothing). Readers are not held up;
            # writers wait while the partition is made (moving that day's late rows, normally none). Any
            # long reader of the default partition (an export, the rollup job's round) made that race likely.
            await conn.execute("LOCK TABLE ingest.readings IN SHARE ROW EXCLUSIVE MODE")
            # No rows of that day may reach the default partition between the move and the attach
            # (the attach would then fail).
            await conn.execute("LOCK TABLE ingest.readings_default IN ACCESS EXCLUSIVE MODE")
            await conn.execute(
                f"CREATE TABLE ingest.{name} (LIKE ingest.readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
            # The tenant column came with LIKE (its default and check too); the policy is the parent's.
            await conn.execute(partition_isolation_sql(name))
            await conn.execute(
                f"WITH moved AS (DELETE FROM ingest.readings_default WHERE read_time >= $1 AND read_time < $2"
                f" RETURNING *) INSERT INTO ingest.{name} SELECT * FROM moved",
                lo, hi,
            )
            await conn.execute(
                f"ALTER TABLE ingest.readings ATTACH PARTITION ingest.{name}"
                f" FOR VALUES FROM ('{_ts(lo)}') TO ('{_ts(hi)}')"
            )
        return True

    async def default_partition_days(self, lo: datetime, hi: datetime, limit: int = 100) -> list[date]:
        """Days in [lo, hi) that have rows in the default partition (normally none: it is small)."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT (read_time AT TIME ZONE 'UTC')::date AS day FROM ingest.readings_default"
            " WHERE read_time >= $1 AND read_time < $2 ORDER BY day LIMIT $3",
            lo, hi, limit,
        )
        return [r["day"] for r in rows]

    async def drop_partition(self, name: str, lock_timeout: str = "1s") -> None:
        """Drop a partition. This takes an ACCESS EXCLUSIVE lock on ``readings`` for a moment (Postgres
        allows no DETACH ... CONCURRENTLY next to a default partition), so writers may wait up to
        `lock_timeout` once per retention round; past it the drop is retried next round."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL ROLE NONE")  # DDL, as in create_partition
            await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
            await conn.execute(f'DROP TABLE IF EXISTS ingest."{name}"')

    async def purge_before(self, cutoff: datetime) -> tuple[int, int]:
        """Delete default-partition readings and tag events older than `cutoff`; returns (readings
        deleted, purged_through). Events go by cursor, up to the last one inserted before the cutoff, so
        that what remains is always every event after `purged_through`."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute("DELETE FROM ingest.readings_default WHERE read_time < $1", cutoff)
            purged = await conn.fetchval(
                "WITH edge AS (SELECT max(cursor) AS c FROM ingest.tag_events WHERE insert_time < $1),"
                " gone AS (DELETE FROM ingest.tag_events WHERE cursor <= (SELECT c FROM edge))"
                " UPDATE ingest.event_retention"
                " SET purged_through = greatest(purged_through, coalesce((SELECT c FROM edge), 0))"
                " RETURNING purged_through",
                cutoff,
            )
        return int(status.split()[-1]), int(purged)
