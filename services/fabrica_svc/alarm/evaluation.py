"""The evaluation loop: ingest's committed readings, from the stored cursor, through the evaluator, into alarm
events, exactly once.

Why a stream from ingest and not evaluation in ingest's commit path: alarms are a service of their own
(rules, lifecycle, notifications, their own schema), and ingest's write path is the system's bottleneck;
evaluating there would put every rule on it and couple the two deployments. A resumable stream with a cursor
committed here, as production does with WatchTagEvents, gives the same exactly-once guarantee without that.

One replica evaluates at a time: the one holding a session advisory lock on its own connection (as
production's consumer); the others stand by. On that connection, messages of readings are evaluated in
memory and committed in ONE transaction with the events they produced (their ``notify`` flag is the
notification outbox), the evaluator states they touched, and the cursor past the last of them
(service.EvaluationStore.commit). A crash anywhere leaves either all of that or none of it; on restart the
states and cursor are loaded together, so the replay from the cursor reproduces exactly the transitions not
yet recorded. If a rule changed under the evaluation (its revision moved, or, for any rule, a new one
included, the rules' version of the load's snapshot: store.rules_version), nothing is written: the rules and
states are reloaded and the same messages are evaluated again. (The revision sequence, read before each
message, is only the hint to reload early: it moves before the change commits.)

Group commit: one transaction covers every message the stream has already delivered (up to
`group_messages` messages or `group_readings` readings), never waiting for more, so a live stream commits
each message as it comes while a backlog (a restart, a burst) pays one commit and one write of each touched
state per group instead of per message. The states written are the evaluator's dirty set (those touched
since the last commit), one statement.

The "no data" timer, and why it runs on two clocks. Everything a reading carries is evaluated on *event
time* (its read_time), including a bad-quality reading of a PLC that does not answer: the collector keeps
polling and reports communication failures, so "no good reading for N s" raises at the first bad reading
past last good + N, deterministically, replay or not. Silence, though, produces no reading to carry a time
(a dead collector, a network cut): only a clock can notice it. So every `tick_interval` the loop also calls
``Evaluator.tick(now)`` with *wall time*, which raises "no data" at last good + N (and completes on/off
delays that ran out while no reading came), committed the same way with the cursor unchanged. A wall-clock
decision is only sound when the evaluator has seen what ingest has: after a restart with a backlog, every
tag would look silent. The tick therefore runs only while the stream is live: no message is waiting, and
either no message came for a tick interval (caught up) or the newest read time received is within
`live_window` of now. The collector's and this host's clocks are assumed NTP-synchronised (as read_time
always is); a skew adds to the delay.

Tenants: the feed is read installation-wide (every tenant's batches, each naming its tenant; readings.py),
and every tenant's rules are loaded (evaluator.Evaluators: one evaluator per tenant), so a reading is
evaluated against the rules of its own tenant only. The commit writes each tenant's part as that tenant
(service.EvaluationStore.commit), in the one transaction that moves the cursor. The evaluator's connection
runs as the row-level-security role (runtime/tenancy.py DB_ROLE) like every pool's, scoped to no tenant
outside those transactions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import grpc
from opentelemetry import metrics

from ..clients.errors import error_details
from ..runtime import tenancy
from ..runtime.retry import SERVICE_RETRY, RetryPolicy
from ..runtime.tasks import cancel_and_wait
from ..runtime.telemetry import ConsumerLag
from . import store
from .evaluator import NS, Evaluators, Rule, Sample, Transition
from .service import EvaluationStore, Outbox
from .store import EventRow, RuleRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadingsMessage:
    """One message of the committed-readings stream: readings, and the cursor just past them."""

    cursor: int
    samples: Sequence[Sample]


#: Opens the stream after a cursor; the iterator ends or raises when the stream does.
ReadingSource = Callable[[int], AsyncIterator[ReadingsMessage]]


@dataclass(frozen=True)
class EvaluationOptions:
    tick_interval: float = 1.0
    live_window: float = 5.0
    standby_interval: float = 1.0
    retry: RetryPolicy = SERVICE_RETRY
    #: One commit covers at most this many messages already received, or about this many readings.
    group_messages: int = 64
    group_readings: int = 50_000
    #: Messages read ahead of the evaluation.
    read_ahead: int = 16


class Evaluation:
    """The background task (see the module docstring); `clock` is the wall clock of the tick."""

    def __init__(self, dsn: str, source: ReadingSource, decode: Callable[[RuleRow], Rule], *,
                 options: EvaluationOptions | None = None, clock: Callable[[], float] = time.time,
                 outbox: Outbox | None = None):
        self.dsn = dsn
        self.source = source
        self.decode = decode
        self.options = options or EvaluationOptions()
        self.clock = clock
        self.store = EvaluationStore(outbox)
        self.active = asyncio.Event()
        #: The cursor of the last commit of this replica.
        self.cursor: int | None = None
        self.readings = 0
        self._backoff = self.options.retry.backoff()
        self._last_problem = ""
        self._last_warning = 0.0
        self._task: asyncio.Task[None] | None = None
        meter = metrics.get_meter("fabrica.alarm")
        self._readings_metric = meter.create_counter("fabrica_alarm_readings_evaluated",
                                                     description="Readings evaluated against the alarm rules")
        self._events_metric = meter.create_counter("fabrica_alarm_events", description="Alarm events recorded")
        #: The evaluation lag, fabrica_tag_events_lag{consumer="alarm"}, as production reports its own
        #: (runtime/telemetry.py ConsumerLag).
        self.lag = ConsumerLag(meter, "alarm", self.active)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alarm-evaluation")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        standing_by = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10, command_timeout=60, server_settings={
                    "application_name": "fabrica-alarm-evaluator", "search_path": '"alarm", public',
                    "role": tenancy.DB_ROLE})
                if not await store.try_lock_evaluator(conn):
                    if not standing_by:
                        log.info("another replica evaluates alarms; standing by")
                        standing_by = True
                    await conn.close()
                    conn = None
                    await asyncio.sleep(self.options.standby_interval)
                    continue
                standing_by = False
                self.active.set()
                await self._evaluate(conn)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("alarm evaluation lost the database: %s", exc)
            except Exception:  # a bug must not end evaluation for good: log, back off, resume from the cursor
                log.exception("alarm evaluation failed; resuming from the stored cursor")
            finally:
                self.active.clear()
                if conn is not None:
                    try:
                        await asyncio.wait_for(conn.close(), timeout=2)
                    except Exception:  # a dead connection: the server ends the session (and the lock) anyway
                        conn.terminate()
            await self._backoff.wait()

    async def _load(self, conn: asyncpg.Connection) -> tuple[Evaluators, int, int]:
        """The evaluators of every rule, the cursor, and the rule-change hint read before them. The hint may
        count a change that is not committed yet, which the load then misses: the evaluators carry the rules'
        own version (`Evaluators.rules_version`), which each commit compares (EvaluationStore.commit)."""
        hint = await store.rules_changed_hint(conn)
        rules, states, cursor, version = await self.store.load(conn, self.decode)
        evaluator = Evaluators.build(rules, states)
        evaluator.rules_version = version
        return evaluator, cursor, hint

    async def _evaluate(self, conn: asyncpg.Connection) -> None:
        evaluator, cursor, version = await self._load(conn)
        log.info("evaluating alarms", extra={"cursor": cursor, "rules": evaluator.rule_count,
                                             "tenants": len(evaluator.by_tenant)})
        while not conn.is_closed():
            queue: asyncio.Queue[ReadingsMessage | BaseException | None] = asyncio.Queue(
                maxsize=self.options.read_ahead)
            reader = asyncio.create_task(self._read(cursor, queue), name="alarm-readings")
            last_message = last_tick = time.monotonic()
            newest_ns = 0
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout=self.options.tick_interval)
                    except TimeoutError:
                        item = "tick"  # type: ignore[assignment]
                    if isinstance(item, BaseException) or item is None:
                        if isinstance(item, BaseException):
                            self._warn_stream(item)
                        self.lag.disconnected()
                        break
                    if await store.rules_changed_hint(conn) != version:
                        evaluator, stored, version = await self._load(conn)
                        if stored != cursor:  # cannot happen under the lock; be safe: start over from it
                            cursor = stored
                            break
                    if item == "tick":
                        idle = time.monotonic() - last_message >= self.options.tick_interval
                        if not await self._tick(conn, evaluator, idle, newest_ns):
                            version = -1  # the rules changed under it: reload before the next item
                        last_tick = time.monotonic()
                        continue
                    assert isinstance(item, ReadingsMessage)
                    last_message = time.monotonic()
                    group, end = self._group(item, queue)
                    for message in group:
                        if message.samples:
                            newest_ns = max(newest_ns, max(s.time_ns for s in message.samples))
                    evaluator, version = await self._apply(conn, evaluator, version, group)
                    self.lag.applied(newest_ns)
                    cursor = group[-1].cursor
                    self._backoff.reset()
                    self._last_problem = ""
                    if end is not None:  # the stream ended (or failed) behind the group: reconnect after it
                        if isinstance(end, BaseException):
                            self._warn_stream(end)
                        self.lag.disconnected()
                        break
                    if queue.empty() and time.monotonic() - last_tick >= self.options.tick_interval:
                        if not await self._tick(conn, evaluator, False, newest_ns):
                            version = -1
                        last_tick = time.monotonic()
            finally:
                await cancel_and_wait(reader)
            await self._backoff.wait()

    def _warn_stream(self, exc: BaseException) -> None:
        """A warning when the stream fails in a new way, then one a minute: an ingest that is away for an hour
        should not write a line per retry."""
        problem = str(error_details(exc)) if isinstance(exc, grpc.RpcError) else str(exc)
        now = time.monotonic()
        if problem != self._last_problem or now - self._last_warning >= 60.0:
            log.warning("committed-readings stream failed: %s; retrying with backoff", problem)
            self._last_problem, self._last_warning = problem, now
        else:
            log.debug("committed-readings stream failed again: %s", problem)

    async def _read(self, cursor: int, queue: asyncio.Queue) -> None:
        try:
            async for message in self.source(cursor):
                await queue.put(message)
                # Let the evaluation run: the stream's next messages are often buffered already, and reading
                # them all first would leave the commits' database time unused for reading.
                await asyncio.sleep(0)
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which logs it and reconnects
            await queue.put(exc)

    def _group(self, first: ReadingsMessage, queue: asyncio.Queue
               ) -> tuple[list[ReadingsMessage], BaseException | bool | None]:
        """`first` and the messages already waiting behind it, within the group bounds (never waiting for
        one); and what ended the stream if that came right behind them (True: it ended cleanly), else None."""
        group, readings = [first], len(first.samples)
        while (len(group) < self.options.group_messages and readings < self.options.group_readings
               and not queue.empty()):
            item = queue.get_nowait()
            if not isinstance(item, ReadingsMessage):
                return group, item if item is not None else True
            group.append(item)
            readings += len(item.samples)
        return group, None

    async def _apply(self, conn: asyncpg.Connection, evaluator: Evaluators, version: int,
                     group: Sequence[ReadingsMessage]) -> tuple[Evaluators, int]:
        """Evaluate the messages of `group` in order and commit what they produced with the last one's cursor."""
        cursor = group[-1].cursor
        count = sum(len(m.samples) for m in group)
        while True:
            transitions: list[Transition] = []
            of_tenant = evaluator.by_tenant.get  # (Evaluators.evaluate, inlined: one call less per reading)
            for message in group:
                for sample in message.samples:
                    tenant_evaluator = of_tenant(sample.tenant)
                    if tenant_evaluator is None:  # a tenant without rules
                        continue
                    found = tenant_evaluator.evaluate(sample)
                    if found:
                        transitions += found
            result = await self.store.commit(conn, rules=_rules(evaluator), cursor=cursor,
                                             transitions=transitions, states=evaluator.take_dirty(),
                                             rules_version=evaluator.rules_version)
            if result.committed:
                self.cursor = cursor
                self.readings += count
                self._readings_metric.add(count)
                self._published(result.events)
                return evaluator, version
            log.info("a rule changed during evaluation; reloading and evaluating the messages again")
            evaluator, stored, version = await self._load(conn)
            if stored >= cursor:
                return evaluator, version

    async def _tick(self, conn: asyncpg.Connection, evaluator: Evaluators, idle: bool, newest_ns: int) -> bool:
        """Commit what is due without a reading; False (nothing written) when the rules changed under it."""
        now = self.clock()
        live = idle or newest_ns >= (now - self.options.live_window) * NS
        transitions = evaluator.tick(int(now * NS)) if live else []
        states = evaluator.take_dirty() if live else {}
        result = await self.store.commit(conn, rules=_rules(evaluator), cursor=None, transitions=transitions,
                                         states=states, now=datetime.fromtimestamp(now, UTC),
                                         rules_version=evaluator.rules_version)
        if not result.committed:  # a rule changed: the caller reloads
            return False
        self._published(result.events)
        return True

    def _published(self, events: list[EventRow]) -> None:
        if events:
            self._events_metric.add(len(events))


def _rules(evaluators: Evaluators) -> dict[str, dict[str, Rule]]:
    """Per tenant, its rules by id."""
    return {t: e.rules for t, e in evaluators.by_tenant.items()}
