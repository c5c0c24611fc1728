"""The write path between the streams and Postgres: a bounded queue, grouping, one transaction at a time.

Streams :meth:`BatchWriter.submit` converted batches. ``submit`` waits while the rows accepted but not yet
written would pass ``queue_max_rows``; the stream handler is then not reading its stream, so gRPC flow
control stops the client. That is the only buffer: memory stays bounded whatever the clients do.

One task takes batches from the queue into a group, bounded by ``group_max_rows`` and by
``group_max_delay`` after the first batch (0 by default: a group is what queued while the previous
transaction ran, so an idle writer writes a batch at once and a busy one in large groups), and writes the group in one transaction
(:meth:`IngestStore.write_group`). While that transaction runs, the streams keep converting and queueing
the next batches, so Python and Postgres work at the same time. Each batch's future resolves only after
commit; the stream acknowledges in order by awaiting its futures in order.

Everything runs on the service's one event loop. The transaction's round trips wait while the loop
validates and converts incoming batches, so under full load Postgres and Python overlap only partly; a
writer thread with its own loop and connection was measured (benchmarks/ingest.py) and gained nothing:
the GIL makes the two threads take turns, and CPU per reading went up. More throughput comes from more
replicas, which share nothing but Postgres.

Failures
--------
* Postgres unreachable (connection lost, refused, timed out, shutting down, out of disk or connections):
  every batch of the group fails with ``Unavailable``; its stream is marked failed, so that its later
  batches already queued are dropped, never written after a gap (the client resends them after resuming
  from the committed sequence). The writer drops its connection and connects again for the next group,
  so ingest recovers by itself when Postgres is back.
* Once the database is known lost (a group failed so, the writer's connection or the event listener's
  closed), every open stream ends with UNAVAILABLE, idle ones too (:meth:`BatchWriter.database_lost`);
  new streams fail at open until Postgres answers, and then work again without a restart.
* A transaction that outlives ``transaction_timeout`` (a hung server, a partition) is abandoned as
  "unavailable": its connection is terminated, nothing of it is acknowledged.
* Deadlock or serialization failure (should not happen given the lock order): the group is retried. So is
  a row that the default partition of ``readings`` refuses because maintenance attached the partition of
  its day while the transaction routed it ("violates partition constraint": the statement saw the
  partitions as they were when it started); the retry routes it to the new partition. It is never a bad
  batch: a reading of any time has a partition.
* Anything else (a batch Postgres rejects): the group is retried batch by batch so that the one bad batch
  fails alone, and the other streams' batches are written.
* A batch the transaction refuses under the collector's row lock (it does not follow the committed
  sequence, or its stream's epoch is fenced: domain.plan_group) is not written, the others of the group
  are; its future fails with that FAILED_PRECONDITION and its stream is marked failed like above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg
from opentelemetry import metrics, trace

from ..runtime.tasks import cancel_and_wait
from ..runtime.db import DB_UNAVAILABLE_ERRORS
from ..runtime.errors import FieldViolation, InvalidArgument, Unavailable
from .domain import BatchOutcome, TagCache, WriteBatch
from .store import IngestStore
from .tracing import commit_span, trouble_span

log = logging.getLogger(__name__)

#: "Postgres is not there right now": do not acknowledge, end the streams with UNAVAILABLE, reconnect.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    *DB_UNAVAILABLE_ERRORS,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, crash, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # disk full, out of memory, too many connections
)
_CONFLICTS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_REJECTED = (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError)
_CONFLICT_RETRIES = 3


def _consume(fut: asyncio.Future[object]) -> None:
    # A failed stream's later batches have nobody awaiting them; mark their exceptions as seen.
    if not fut.cancelled():
        fut.exception()


@dataclass(eq=False)
class StreamSession:
    """One StreamReadings stream as the writer sees it."""

    collector_id: str
    #: The committed sequence told to the client on open; batches at or below it are duplicates for sure.
    resumed_at: int = 0
    #: The stream's epoch (StreamResume.epoch); its batches carry it into the write transaction.
    epoch: int = 0
    #: Set by the writer when a batch of this stream failed; the stream's later batches are dropped.
    failed: BaseException | None = None
    #: Told when the stream fails while it may be idle (the stream handler then ends the call with it).
    interrupt: Callable[[BaseException], None] | None = None
    #: The tenant of the stream's collector; its batches are written under it.
    tenant: str = "default"

    def fail(self, error: BaseException) -> None:
        if self.failed is None:
            self.failed = error
            if self.interrupt is not None:
                self.interrupt(error)


@dataclass(eq=False)
class _Pending:
    session: StreamSession
    batch: WriteBatch
    future: asyncio.Future[BatchOutcome]


class RowBudget:
    """At most `limit` rows accepted and not yet written. A batch larger than the whole budget is let in
    alone (when nothing else is held), so it can never wait forever."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._changed = asyncio.Condition()

    async def acquire(self, rows: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held == 0 or self.held + rows <= self.limit)
            self.held += rows
            self.peak = max(self.peak, self.held)

    async def release(self, rows: int) -> None:
        async with self._changed:
            self.held -= rows
            self._changed.notify_all()


@dataclass
class WriterStats:
    groups: int = 0
    batches_written: int = 0
    batches_duplicate: int = 0
    rows_written: int = 0
    failed_groups: int = 0
    largest_group_rows: int = 0
    batches_submitted: int = 0


class BatchWriter:
    def __init__(
        self,
        store: IngestStore,
        *,
        group_max_rows: int,
        group_max_delay: float,
        queue_max_rows: int,
        transaction_timeout: float = 30.0,
    ):
        self.store = store
        self.group_max_rows = group_max_rows
        self.group_max_delay = group_max_delay
        self.transaction_timeout = transaction_timeout
        self.budget = RowBudget(queue_max_rows)
        self.stats = WriterStats()
        self.tags = TagCache()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None
        self._sessions: set[StreamSession] = set()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        meter = metrics.get_meter("fabrica.ingest")
        self._m_rows = meter.create_counter("fabrica_ingest_rows_written", description="Readings committed")
        self._m_batches = meter.create_counter(
            "fabrica_ingest_batches", description="Batches, by outcome (written, duplicate, failed, refused: a sequence gap or a fenced epoch)"
        )
        self._m_group = meter.create_histogram(
            "fabrica_ingest_group_rows", description="Rows per write transaction"
        )
        self._m_seconds = meter.create_histogram(
            "fabrica_ingest_transaction_duration", unit="s", description="Write transaction duration"
        )

    # --- life cycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingest-writer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._carry is not None:
            self._carry.future.cancel()
            self._carry = None
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()
        await self._drop_connection()

    @property
    def queued_rows(self) -> int:
        return self.budget.held

    # --- the streams' side ----------------------------------------------------------------------------

    async def submit(self, session: StreamSession, batch: WriteBatch) -> asyncio.Future[BatchOutcome]:
        """Queue `batch`; waits while the queue is full. The future resolves after commit."""
        if session.failed is not None:
            raise session.failed
        await self.budget.acquire(batch.size)
        future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        self._queue.put_nowait(_Pending(session, batch, future))
        self.stats.batches_submitted += 1
        return future

    # --- the writer task ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            group = await self._next_group()
            try:
                if group:
                    await self._write(group)
            except asyncio.CancelledError:  # stopping: nobody will learn whether these committed
                for item in group:
                    item.future.cancel()
                raise
            except Exception:  # never let the writer die: fail the group, keep going
                log.exception("write group failed unexpectedly")
                self._fail(group, Unavailable("ingest could not write the batch; retry", reason="WRITE_FAILED"))
            finally:
                await self.budget.release(sum(p.batch.size for p in group))

    async def _next_group(self) -> list[_Pending]:
        """The next group: the first batch waiting, then more until the group is full or
        `group_max_delay` has passed since the first. A batch that would overflow the group is carried
        over to start the next one (so the queue's order is kept)."""
        group: list[_Pending] = []
        rows = 0
        deadline: float | None = None
        while rows < self.group_max_rows:
            if self._carry is not None:
                item, self._carry = self._carry, None
            elif not self._queue.empty():
                item = self._queue.get_nowait()
            elif deadline is None:
                item = await self._queue.get()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            if deadline is None:
                deadline = time.monotonic() + self.group_max_delay
            if item.session.failed is not None:
                if not item.future.done():
                    item.future.set_exception(item.session.failed)
                await self.budget.release(item.batch.size)
                continue
            if group and rows + item.batch.size > self.group_max_rows:
                self._carry = item
                break
            group.append(item)
            rows += item.batch.size
        return group

    async def _write(self, group: list[_Pending]) -> None:
        for attempt in range(1, _CONFLICT_RETRIES + 1):
            try:
                outcomes, tag_changes = await self._transaction(group)
            except _CONFLICTS as exc:
                log.warning("write conflict, retrying", extra={"attempt": attempt, "error": str(exc)})
                continue
            except asyncpg.exceptions.CheckViolationError as exc:
                if "partition constraint" in str(exc):  # a partition attached under the transaction: again
                    log.warning("partition attached during the write, retrying", extra={"attempt": attempt})
                    continue
                await self._reject(group, exc)
                return
            except UNAVAILABLE_ERRORS as exc:
                await self._drop_connection()
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("database unavailable: batches not written", extra={"error": reason})
                self._fail(group, Unavailable(f"database unavailable: {reason}", reason="DATABASE_UNAVAILABLE"))
                self.database_lost(reason)
                return
            except Exception as exc:
                await self._reject(group, exc)
                return
            self.tags.remember(tag_changes)
            self._resolve(group, outcomes)
            return
        self._fail(group, Unavailable("write conflicts persisted; retry", reason="WRITE_CONFLICT"))

    async def _reject(self, group: list[_Pending], exc: Exception) -> None:
        """Postgres refused the group: isolate the batch it rejects (writing the others), or fail the one."""
        if len(group) > 1:
            log.warning("group rejected, writing its batches one by one", extra={"error": str(exc)})
            for item in group:
                if item.session.failed is None:
                    await self._write([item])
                elif not item.future.done():
                    item.future.set_exception(item.session.failed)
            return
        self._fail(group, self._rejection(exc))

    async def _transaction(self, group: Sequence[_Pending]) -> tuple[list[BatchOutcome], list[tuple[str, int, str, int]]]:
        batches = [p.batch for p in group]
        span = commit_span(batches)
        try:
            outcomes, tag_changes = await self._transaction_of(batches)
        except BaseException as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:256]))
            raise
        else:
            span.set_attribute("fabrica.ingest.rows_written", sum(o.written for o in outcomes))
            span.set_attribute("fabrica.ingest.batches_refused", sum(o.refused is not None for o in outcomes))
        finally:
            span.set_attribute("fabrica.ingest.commit_seconds", (time.time_ns() - span.start_time) / 1e9
                               if getattr(span, "start_time", None) else 0.0)
            span.end()
        return outcomes, tag_changes

    async def _transaction_of(self, batches: list[WriteBatch]) -> tuple[list[BatchOutcome], list[tuple[str, int, str, int]]]:
        tag_changes = self.tags.changes(batches)
        started = time.perf_counter()
        if self._conn is None or self._conn.is_closed():
            self._conn = await self.store.connect_writer()
            self._conn.add_termination_listener(self._on_connection_closed)
        conn = self._conn
        # The transaction runs as its own task: if it outlives its time (a network partition, a hung
        # server), terminating the connection fails it at once, where a cancel would wait for a rollback
        # that cannot happen.
        task = asyncio.ensure_future(self.store.write_group(conn, batches, tag_changes))
        try:
            async with asyncio.timeout(self.transaction_timeout):
                plan = await asyncio.shield(task)
        except BaseException:
            if not task.done():
                if self._conn is conn:
                    self._conn = None
                conn.terminate()
                with contextlib.suppress(BaseException):
                    await task
            raise
        self._m_seconds.record(time.perf_counter() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("group of %d batches, %d rows: %.1f ms; %d rows queued", len(batches),
                      sum(b.size for b in batches), (time.perf_counter() - started) * 1000, self.budget.held)
        return plan.outcomes, tag_changes

    def _resolve(self, group: Sequence[_Pending], outcomes: Sequence[BatchOutcome]) -> None:
        written_rows = 0
        s = self.stats
        for item, outcome in zip(group, outcomes, strict=True):
            if outcome.refused is not None:
                self._m_batches.add(1, {"outcome": "refused"})
                trouble_span("ingest.batch.refused", item.batch, outcome.refused)
                log.warning("batch refused: %s", outcome.refused.message, extra={
                    "reason": outcome.refused.reason, **outcome.refused.metadata})
                if not item.future.done():
                    item.future.set_exception(outcome.refused)
                item.session.fail(outcome.refused)
                continue
            if outcome.duplicate:
                s.batches_duplicate += 1
                self._m_batches.add(1, {"outcome": "duplicate"})
            else:
                s.batches_written += 1
                written_rows += outcome.written
                self._m_batches.add(1, {"outcome": "written"})
            if not item.future.done():
                item.future.set_result(outcome)
        s.groups += 1
        s.rows_written += written_rows
        s.largest_group_rows = max(s.largest_group_rows, sum(p.batch.size for p in group))
        self._m_rows.add(written_rows)
        self._m_group.record(sum(p.batch.size for p in group))

    def _fail(self, group: Sequence[_Pending], error: BaseException) -> None:
        self.stats.failed_groups += 1
        for item in group:
            if not item.future.done():
                item.future.set_exception(error)
            item.session.fail(error)
            self._m_batches.add(1, {"outcome": "failed"})
            trouble_span("ingest.batch.failed", item.batch, error)

    # --- open streams ---------------------------------------------------------------------------------

    def open_session(self, collector_id: str, resumed_at: int, epoch: int = 0, tenant: str = "default") -> StreamSession:
        session = StreamSession(collector_id, resumed_at, epoch, tenant=tenant)
        self._sessions.add(session)
        return session

    def close_session(self, session: StreamSession) -> None:
        self._sessions.discard(session)

    def database_lost(self, reason: str) -> None:
        """End every open stream with UNAVAILABLE, idle ones too: their clients reconnect (to this or
        another replica) and resume from the committed sequence once Postgres answers again."""
        if self._sessions:
            log.warning("database lost: ending %d stream(s)", len(self._sessions), extra={"reason": reason})
        error = Unavailable(f"database unavailable: {reason}", reason="DATABASE_UNAVAILABLE")
        for session in list(self._sessions):
            session.fail(error)

    @staticmethod
    def _rejection(exc: Exception) -> BaseException:
        if isinstance(exc, _REJECTED):
            return InvalidArgument(FieldViolation("batch", f"rejected by the database: {exc}"))
        return exc

    def _on_connection_closed(self, conn: asyncpg.Connection) -> None:
        if conn is self._conn:  # not one we dropped ourselves: Postgres closed it (shutdown, crash, network)
            self._conn = None
            self.database_lost("the writer's connection was closed")

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
