"""Partition maintenance: daily partitions ahead of time, late rows out of the default partition, retention.

Retention is installation-wide (FABRICA_INGEST_RETENTION_DAYS: whole daily partitions dropped) and, with a
tenant directory (runtime/tenants.py), per tenant (RetentionPolicy: raw readings deleted by tenant and time, rollup
rows by tenant and bucket; rollup.py ``purge_tenant``). With the rollup job, raw readings go only after the
job has caught up (rollup.py, "Retention"), and the feed is never purged past the job's cursor.

Runs once at start-up and then every ``maintenance_interval``. Any replica may run it: partition creation
takes a transaction-level advisory lock (another replica that holds it is doing the same work), and every
DDL statement runs with a short ``lock_timeout`` so that it never holds up the writer; what does not get
done is retried on the next round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ..runtime import tenancy
from ..runtime.tasks import cancel_and_wait
from .domain import day_bounds, days_ahead, expired_partitions, partition_name, retention_cutoff
from .rollup import RollupJob, TenantPurge, purge_tenant
from .store import IngestStore
from ..runtime.tenants import TenantDirectory

log = logging.getLogger(__name__)


@dataclass
class MaintenanceReport:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    default_rows_deleted: int = 0
    events_purged_through: int = 0
    feed_purged_through: int = 0
    tenants: list[TenantPurge] = field(default_factory=list)


async def ensure_ahead(store: IngestStore, now: datetime, *, ahead: int) -> list[str]:
    """Create today's and the next `ahead` days' partitions if missing (quick: normally no rows move)."""
    with tenancy.system():  # the partitions hold every tenant's rows
        existing = set(await store.partitions())
        created = []
        for day in days_ahead(now, ahead):
            name = partition_name(day)
            if name not in existing and await store.create_partition(day):
                created.append(name)
        return created


async def maintain(store: IngestStore, now: datetime, *, ahead: int, retention_days: int,
                   feed_retention_hours: int | None = None, rollup: RollupJob | None = None,
                   tenants: TenantDirectory | None = None) -> MaintenanceReport:
    """One round: create today's and the next `ahead` days' partitions, give days that have rows in the
    default partition (within retention) their own partition, and drop what retention no longer keeps;
    with `feed_retention_hours`, also the committed-readings feed older than that (never past the `rollup`
    job's cursor); with `tenants`, each known tenant's own retention. Across tenants (tenancy.system():
    partitions, late rows and retention are every tenant's), whoever calls it."""
    with tenancy.system():
        return await _maintain(store, now, ahead=ahead, retention_days=retention_days,
                               feed_retention_hours=feed_retention_hours, rollup=rollup, tenants=tenants)


async def _maintain(store: IngestStore, now: datetime, *, ahead: int, retention_days: int,
                    feed_retention_hours: int | None, rollup: RollupJob | None,
                    tenants: TenantDirectory | None) -> MaintenanceReport:
    report = MaintenanceReport()
    existing = set(await store.partitions())
    cutoff = retention_cutoff(now, retention_days)
    wanted = days_ahead(now, ahead)
    lo = cutoff if cutoff is not None else datetime(1, 1, 2, tzinfo=UTC)
    hi = day_bounds(wanted[-1])[1]
    late = await store.default_partition_days(lo, hi)
    for day in sorted(set(wanted) | set(late)):
        name = partition_name(day)
        if name in existing:
            continue
        if await store.create_partition(day):
            report.created.append(name)
            existing.add(name)
    if cutoff is not None:
        if rollup is not None:  # the rollup has every reading before any goes, and stops recomputing them
            await rollup.hold_raw_before(cutoff)
        for name in expired_partitions(existing, cutoff):
            await store.drop_partition(name)
            report.dropped.append(name)
        report.default_rows_deleted, report.events_purged_through = await store.purge_before(cutoff)
    if feed_retention_hours is not None:
        report.feed_purged_through = await store.purge_feed_before(
            now - timedelta(hours=feed_retention_hours), await rollup.cursor() if rollup is not None else None)
    for code in tenants.known() if tenants is not None else ():
        policy = tenants.retention(code)
        if policy is not None and (policy.raw_days or policy.minute_days or policy.hour_days):
            report.tenants.append(await purge_tenant(store.pool, rollup, code, now, policy.raw_days,
                                                     policy.minute_days, policy.hour_days))
    if report.created or report.dropped or report.default_rows_deleted:
        log.info("partition maintenance", extra={
            "created": report.created, "dropped": report.dropped,
            "default_rows_deleted": report.default_rows_deleted
        })
    return report


class Maintenance:
    def __init__(self, store: IngestStore, *, interval: float, ahead: int, retention_days: int,
                 feed_retention_hours: int | None = None, rollup: RollupJob | None = None,
                 tenants: TenantDirectory | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.store = store
        self.interval = interval
        self.ahead = ahead
        self.retention_days = retention_days
        self.feed_retention_hours = feed_retention_hours
        self.rollup = rollup
        self.tenants = tenants
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> MaintenanceReport | None:
        try:
            with tenancy.system():  # partitions and retention of every tenant
                return await maintain(self.store, self.clock(), ahead=self.ahead, retention_days=self.retention_days,
                                  feed_retention_hours=self.feed_retention_hours, rollup=self.rollup,
                                  tenants=self.tenants)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database may be away; the next round retries
            log.warning("partition maintenance failed; retrying later", extra={"error": f"{type(exc).__name__}: {exc}"})
            return None

    async def start(self) -> None:
        """Today's and the next days' partitions before serving; the rest of a round (moving late rows,
        retention, which may take long) in the background, right away and then every `interval`."""
        try:
            with tenancy.system():
                await ensure_ahead(self.store, self.clock(), ahead=self.ahead)
        except Exception as exc:  # the default partition takes every reading meanwhile
            log.warning("could not create partitions ahead; retrying in the background",
                        extra={"error": f"{type(exc).__name__}: {exc}"})
        self._task = asyncio.create_task(self._loop(), name="ingest-maintenance")

    async def _loop(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

