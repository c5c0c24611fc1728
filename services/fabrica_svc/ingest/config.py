"""Settings of the ingest service, from FABRICA_INGEST_* environment variables.

=====================================  ===========================================================  =======
Variable                               Meaning                                                      Default
=====================================  ===========================================================  =======
FABRICA_INGEST_RETENTION_DAYS          Days of readings and tag events kept; 0 keeps everything     0
FABRICA_INGEST_PARTITIONS_AHEAD        Daily partitions created ahead of today                      3
FABRICA_INGEST_GROUP_MAX_ROWS          Rows per write transaction (batches are grouped up to it)    20000
FABRICA_INGEST_GROUP_MAX_DELAY_MS      How long the writer waits to fill a group (0: it does not)   0
FABRICA_INGEST_QUEUE_MAX_ROWS          Rows accepted but not yet written; streams wait beyond it    100000
FABRICA_INGEST_EVENT_POLL_SECONDS      Watchers re-check for events this often without a NOTIFY     2
FABRICA_INGEST_MAINTENANCE_SECONDS     Partition and retention maintenance interval                 3600
FABRICA_INGEST_FEED                    Keep the committed-readings feed (WatchCommittedReadings)    on
FABRICA_INGEST_FEED_RETENTION_HOURS    Hours of committed batches the feed keeps for its consumers  168
FABRICA_INGEST_LATEST_WATCH_MS         WatchLatestValues looks for newer readings this often        200
FABRICA_INGEST_QUOTA_MAX_DELAY_MS      Longest a stream over its tenant's readings/s quota is held  1000
                                       before its batch is refused with RESOURCE_EXHAUSTED
FABRICA_INGEST_TENANTS_POLL_SECONDS    How often the tenants' quotas and retention are read from    10
                                       config (FABRICA_CONFIG_ADDR; unset: no quotas, keep all)
FABRICA_INGEST_ROLLUP                  Keep the 1-minute and 1-hour rollups (needs the feed)        on
FABRICA_INGEST_ROLLUP_MS               The rollup job looks for newly committed batches this often  5000
=====================================  ===========================================================  =======

The writer does not wait to fill a group by default: a group is what queued while the previous transaction
ran (group commit), so under load groups grow by themselves and when idle a batch is written at once. A
fixed wait (it was 20 ms) only added to every reading's way to GetLatestValues (benchmarks/freshness.py).

Retention defaults to "keep everything": a historian that deletes data nobody asked it to delete is worse
than one that needs a setting to free disk. The feed is different: it is a copy of the readings for
consumers that fall behind (the alarm service, forwarding), so it keeps a week unless told otherwise; a
consumer further behind than that is told OUT_OF_RANGE. With the feed off, write transactions append
nothing to it (store.py, "The committed-readings feed").

Tenants' quotas (quota.py): a stream over its tenant's readings/s quota waits for its turn, up to the quota
delay, before its next batch is read (backpressure); a batch that would wait longer is refused with
RESOURCE_EXHAUSTED and sent again by the collector. The quotas come from config's ListTenants, polled by
runtime/tenants.py; without FABRICA_CONFIG_ADDR every tenant is unlimited.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..runtime.settings import env_choice, env_float, env_int


@dataclass(frozen=True)
class IngestConfig:
    retention_days: int = 0
    partitions_ahead: int = 3
    group_max_rows: int = 20_000
    group_max_delay: float = 0.0
    queue_max_rows: int = 100_000
    event_poll_interval: float = 2.0
    maintenance_interval: float = 3600.0
    latest_watch_interval: float = 0.2
    #: Batches accepted on one stream but not yet acknowledged (bounds per-stream bookkeeping).
    stream_max_in_flight: int = 256
    #: A write transaction that takes longer than this is abandoned as "database unavailable".
    transaction_timeout: float = 30.0
    #: Write transactions append each batch to the committed-readings feed.
    feed: bool = True
    #: Hours the feed keeps committed batches (purged by the maintenance rounds).
    feed_retention_hours: int = 168
    #: Longest a stream over its tenant's readings/s quota waits for its turn before RESOURCE_EXHAUSTED.
    quota_max_delay: float = 1.0
    #: How often the tenants (quotas, retention) are read from config.
    tenants_poll_interval: float = 10.0
    #: The rollup job keeps the 1-minute and 1-hour rollups and AggregateReadings reads them (rollup.py).
    rollup: bool = True
    #: The rollup job's pause between rounds when it has caught up. A round recomputes each minute it
    #: touches whole (up to a minute of a tag's raw rows), so rounds further apart read each reading fewer
    #: times; queries stay exact meanwhile (the minutes not rolled up yet come from raw readings).
    rollup_interval: float = 5.0


def load_ingest_config(env: Mapping[str, str] | None = None) -> IngestConfig:
    """Ingest's settings from `env` (default: the process environment), read with the runtime's parsers, so a
    bad value gets the same one-line error naming the variable as every other setting."""
    env = os.environ if env is None else env
    return IngestConfig(
        retention_days=env_int(env, "FABRICA_INGEST_RETENTION_DAYS", 0, 0, 100_000),
        partitions_ahead=env_int(env, "FABRICA_INGEST_PARTITIONS_AHEAD", 3, 1, 366),
        group_max_rows=env_int(env, "FABRICA_INGEST_GROUP_MAX_ROWS", 20_000, 1, 10_000_000),
        group_max_delay=env_int(env, "FABRICA_INGEST_GROUP_MAX_DELAY_MS", 0, 0, 60_000) / 1000.0,
        queue_max_rows=env_int(env, "FABRICA_INGEST_QUEUE_MAX_ROWS", 100_000, 1, 100_000_000),
        event_poll_interval=env_float(env, "FABRICA_INGEST_EVENT_POLL_SECONDS", 2.0, 0.05, 3600.0),
        maintenance_interval=env_float(env, "FABRICA_INGEST_MAINTENANCE_SECONDS", 3600.0, 1.0, 86_400.0),
        feed=env_choice(env, "FABRICA_INGEST_FEED", "on", ("on", "off")) == "on",
        feed_retention_hours=env_int(env, "FABRICA_INGEST_FEED_RETENTION_HOURS", 168, 1, 876_000),
        latest_watch_interval=env_int(env, "FABRICA_INGEST_LATEST_WATCH_MS", 200, 20, 60_000) / 1000.0,
        quota_max_delay=env_int(env, "FABRICA_INGEST_QUOTA_MAX_DELAY_MS", 1000, 0, 60_000) / 1000.0,
        tenants_poll_interval=env_float(env, "FABRICA_INGEST_TENANTS_POLL_SECONDS", 10.0, 0.05, 3600.0),
        rollup=env_choice(env, "FABRICA_INGEST_ROLLUP", "on", ("on", "off")) == "on",
        rollup_interval=env_int(env, "FABRICA_INGEST_ROLLUP_MS", 5000, 10, 3_600_000) / 1000.0,
    )
