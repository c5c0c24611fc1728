"""Polling one PLC: one asyncio task per PLC, a fixed-rate schedule per poll group, reporting by exception.

Schedule. Each poll group ticks at a fixed rate from its start: tick n is due at start + n * interval,
whatever the previous polls took, so the rate does not drift. A poll that overruns (a slow device, a
timeout) does not cause a burst of catch-up polls: the ticks it missed are skipped and counted, and the
next poll waits for the next tick still ahead. Lateness (start of a poll minus its tick) is recorded for
every poll. The first tick of each group is offset by a stable fraction of min(interval, 1 s) derived from
the PLC id, so that many PLCs configured at once do not all hit the network in the same millisecond.
Groups of one PLC share its task (and its connection): a device answers one request at a time anyway.

Reporting. A tag is reported when its value changes (numbers: by more than the tag's deadband, compared
with the last reported value, so slow drifts are reported once they add up), when its quality changes,
and with every integrity report of its group (every tag, every integrity_interval, default 60 s).
Failures are reported as readings with a bad quality and the error text, never as silence: communication
failures (no connection, timeout: every tag of the PLC), decode failures (the device answered with an
exception or an error code: the tags of that block; a value that cannot be decoded: that tag) and
configuration errors (a tag that cannot be read as defined, or one whose address the device lacks). A
bad quality is reported once when it starts and again with each integrity report, not at every tick: a
dead PLC polled every 100 ms would otherwise write ten useless rows per tag per second for as long as it
is dead, while one row per transition plus the integrity rows tell the same story.

Blocks and absent addresses. Each group's tags are read in the blocks the driver plans within the PLC's
block limits. A block the device refuses because an address in it does not exist (Modbus exception 2, S7
"invalid address") is split until the tags the device lacks are found (collector/split.py): those report
CONFIG_ERROR with the address, the others are read as usual, in the same poll. The split plan is kept
(also across reconnects, while the planned blocks stay the same), so the holes are found once; the absent
tags are read again every BlockLimits.absent_retry_interval (10 min by default), and a tag the device
has gained meanwhile (a firmware update) is read from then on, in a block of its own.

Reconnects. After a communication failure the connection is dropped and re-established with exponential
backoff and jitter (see runtime/retry.py); ticks missed meanwhile are not polls and are not counted as late.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from ..plcmodel.plc import block_limits
from ..plcmodel.spec import DecodeError, TagSpec, TagSpecError
from ..runtime.retry import RetryPolicy
from ..runtime.timefmt import seconds_of, timestamp_from_ns
from .blocks import ModbusBlock
from .drivers import Block, BlockData, CommunicationError, Driver, PlcConfigError
from .metrics import PollMetrics
from .split import plan_fitting, read_block
from .tracing import poll_span
from .tags import compiled, tag_violations, to_value, value_kind

log = logging.getLogger(__name__)

GOOD = reading_pb2.QUALITY_GOOD
COMMUNICATION_FAILURE = reading_pb2.QUALITY_COMMUNICATION_FAILURE
DECODE_FAILURE = reading_pb2.QUALITY_DECODE_FAILURE
CONFIG_ERROR = reading_pb2.QUALITY_CONFIG_ERROR
DEFAULT_INTEGRITY = 60.0
MAX_ERROR_TEXT = 1024  # Reading.error max_len
STOP_ATTEMPTS = 30

Emit = Callable[[reading_pb2.Reading], None]


_UNSET = object()


def _block_order(block: Block) -> tuple[int, int, int]:
    """Blocks sorted as the planners order them: Modbus by table, S7 by area and DB; then by start."""
    if isinstance(block, ModbusBlock):
        return int(block.table), 0, block.start
    return int(block.area), block.db_number, block.start


class TagState:
    """One tag: its definition and what was last reported."""

    __slots__ = ("tag_id", "name", "role", "deadband", "spec", "kind", "error", "last_value", "last_quality")

    def __init__(self, tag: plc_pb2.Tag):
        self.tag_id = tag.id
        self.name = tag.name
        self.role = tag.role
        self.deadband = tag.deadband
        self.spec: TagSpec | None = None
        self.kind = ""
        self.error = ""  # configuration error: the tag is not polled
        self.last_value: Any = _UNSET
        self.last_quality = reading_pb2.QUALITY_UNSPECIFIED

    def changed(self, value: Any) -> bool:
        last = self.last_value
        if last is _UNSET:
            return True
        if value != value and last != last:  # both NaN: no change
            return False
        if self.deadband > 0 and type(value) is not bool and isinstance(value, (int, float)) \
                and isinstance(last, (int, float)):
            return not abs(value - last) <= self.deadband
        return value != last


@dataclass
class Group:
    name: str
    interval: float
    integrity: float
    tags: list[TagState] = field(default_factory=list)
    #: The block reads of a poll: the plan, after any split around addresses the device lacks.
    blocks: list[Block] = field(default_factory=list)
    #: The plan of the group's tags as first made (before any split); a reconnect that plans the same keeps
    #: `blocks` and `absent`.
    base_plan: list[Block] = field(default_factory=list)
    #: Tags the device lacks, by tag id, with the error naming the address; read again at `next_absent_retry`.
    absent: dict[int, str] = field(default_factory=dict)
    next_absent_retry: float = 0.0
    next_due: float = 0.0
    next_integrity: float = 0.0
    polls: int = 0
    skipped: int = 0

    @property
    def polled(self) -> list[TagState]:
        return [t for t in self.tags if t.spec is not None and not t.error]


@dataclass(frozen=True)
class AbsentTag:
    """A tag whose address the device lacks, as the status shows it."""

    tag_id: int
    name: str
    group: str
    spec: TagSpec
    error: str
    #: Wall clock (ns) of the next read attempt.
    retry_ns: int


@dataclass
class PollerStatus:
    plc_id: str
    connected: bool = False
    #: Wall clock (ns) of the last successful block read; 0 when none yet.
    last_good_read_ns: int = 0
    error_count: int = 0
    last_error: str = ""
    #: Seconds the last block read took.
    read_latency: float = 0.0
    tag_count: int = 0
    #: Problems of the definition (bad tags, an unusable connection); they persist until it changes.
    config_errors: list[str] = field(default_factory=list)
    #: The block reads of each poll, by poll group name, after any split.
    reads: list[tuple[str, Block]] = field(default_factory=list)
    #: Tags the device lacks.
    absent: list[AbsentTag] = field(default_factory=list)

    @property
    def error(self) -> str:
        """What is wrong now, in words; empty when healthy."""
        parts = [self.last_error] if self.last_error else []
        if self.config_errors:
            shown = self.config_errors[:5]
            more = len(self.config_errors) - len(shown)
            parts.append("; ".join(shown) + (f"; and {more} more" if more else ""))
        if self.absent:
            shown_absent = [f"tag {a.name!r}: {a.error}" for a in self.absent[:3]]
            more = len(self.absent) - len(shown_absent)
            parts.append(f"the device lacks {len(self.absent)} tag(s): " + "; ".join(shown_absent)
                         + (f"; and {more} more" if more else ""))
        return "; ".join(parts)[:2048]


class Poller:
    """Polls one PLC until stopped. `make_driver` is called once, inside the task.

    `clock` (seconds, monotonic) and `sleep` (an async function of seconds) drive the schedule, the backoff
    waits and the integrity timer; by default they are the event loop's own clock (time.monotonic) and
    asyncio.sleep. A test passes a clock it moves itself, with a sleep that returns once that clock has
    advanced by the delay, and counts polls and skipped ticks per tick exactly. `wall_ns` stamps readings.
    """

    def __init__(
        self,
        plc: plc_pb2.Plc,
        make_driver: Callable[[plc_pb2.Plc], Driver],
        emit: Emit,
        *,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        metrics: PollMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_ns: Callable[[], int] = time.time_ns,
    ):
        self.plc = plc
        self.plc_id = plc.id
        self.limits = block_limits(plc)
        self._make_driver = make_driver
        self._emit = emit
        self.backoff = RetryPolicy(backoff_min, backoff_max).backoff()
        self.metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._wall_ns = wall_ns
        self.driver: Driver | None = None
        self.status = PollerStatus(plc.id)
        self.groups: list[Group] = []
        self.by_id: dict[int, TagState] = {}
        #: Lateness of recent polls in seconds (the benchmark reads it; the metrics get every sample). Short:
        #: every entry is one more object for the garbage collector to visit in each full collection.
        self.lateness: deque[float] = deque(maxlen=256)
        self.polls = 0
        self.skipped = 0
        self._attrs = {"plc_id": plc.id}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._build()

    # ------------------------------------------------------------------------------------- definition

    def _build(self) -> None:
        plc = self.plc
        groups: dict[str, Group] = {}
        for g in plc.poll_groups:
            if g.name not in groups:
                groups[g.name] = Group(g.name, seconds_of(g.poll_interval, 1.0),
                                       seconds_of(g.integrity_interval, DEFAULT_INTEGRITY))
        self.groups = list(groups.values())
        first = self.groups[0] if self.groups else None
        errors = self.status.config_errors
        for i, tag in enumerate(plc.tags):
            state = TagState(tag)
            group = groups.get(tag.poll_group or (first.name if first else ""))
            problems: list[str] = []
            if tag.id == 0:
                problems.append("the tag has no id (it did not come from the config service)")
            elif tag.id in self.by_id:
                problems.append(f"tag id {tag.id} appears twice")
            if group is None:
                problems.append(f"no poll group named {tag.poll_group!r}")
            problems += [f"{v.field}: {v.description}" for v in tag_violations(tag, plc, "tag")]
            if not problems:
                try:
                    state.spec = compiled(tag)
                    state.kind = value_kind(state.spec)
                except TagSpecError as exc:
                    problems.append(exc.detail)
            if problems:
                state.error = f"tag {tag.name!r}: " + "; ".join(problems)
                errors.append(state.error)
            if tag.id and tag.id not in self.by_id:
                self.by_id[tag.id] = state
            if group is None:
                group = first
            if group is not None:
                group.tags.append(state)
        self.status.tag_count = sum(len(g.polled) for g in self.groups)

    # -------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"poll {self.plc_id}")

    async def stop(self) -> None:
        """Stop polling and release the connection.

        The task is cancelled until it is done: on CPython 3.11, asyncio.wait_for (which pymodbus awaits
        every response with) swallows a cancellation that arrives together with the response, and the
        poller would go on polling after a configuration change replaced it. `_stopping` makes the poll
        loop end at its next turn even then.
        """
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        for _ in range(STOP_ATTEMPTS):
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
            if task.done():
                break
        else:
            log.error("the poller of %s did not stop after %d cancellations", self.plc_id, STOP_ATTEMPTS)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved (a cancelled poller ends with CancelledError or nothing)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(self) -> None:
        try:
            try:
                self.driver = self._make_driver(self.plc)
            except PlcConfigError as exc:
                await self._unusable(str(exc))
                return
            while not self._stopping:
                try:
                    await self._poll_forever()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not end polling silently: log it, start over, slowly
                    log.exception("poller of %s failed; starting it over", self.plc_id)
                    self.status.last_error = "internal error; see the collector log"
                    await self.driver.close()
                    await self._sleep(self.backoff.next_delay())
        finally:
            driver, self.driver = self.driver, None
            if driver is not None:
                await driver.dispose()

    async def _poll_forever(self) -> None:
        driver = self.driver
        assert driver is not None
        self._schedule_start()
        self._report_config_errors(self._wall_ns(), force=True)
        if not any(g.tags for g in self.groups):
            await self._keep_connected()
        while not self._stopping:
            if not driver.connected:
                if not await self._connect():
                    await self._sleep(self.backoff.next_delay())
                    continue
            group = min(self.groups, key=lambda g: g.next_due)
            delay = group.next_due - self._clock()
            if delay > 0:
                await self._sleep(delay)
            await self._poll(group)

    async def _unusable(self, error: str) -> None:
        """The definition cannot be polled at all: every tag reports CONFIG_ERROR, again at integrity time."""
        self.status.config_errors.append(error)
        self.status.last_error = ""
        for state in self.by_id.values():
            state.error = state.error or error
        interval = min((g.integrity for g in self.groups), default=DEFAULT_INTEGRITY)
        while not self._stopping:
            self._report_config_errors(self._wall_ns(), force=True)
            await self._sleep(interval)

    async def _keep_connected(self) -> None:
        """A PLC without tags (yet): keep a connection so that its status tells whether it is reachable."""
        assert self.driver is not None
        while not self._stopping:
            if not self.driver.connected and not await self._connect():
                await self._sleep(self.backoff.next_delay())
                continue
            await self._sleep(max(1.0, min((g.interval for g in self.groups), default=1.0)))

    # -------------------------------------------------------------------------------------- schedule

    def _schedule_start(self) -> None:
        now = self._clock()
        for group in self.groups:
            phase = zlib.crc32(f"{self.plc_id}/{group.name}".encode()) / 2**32
            group.next_due = now + phase * min(group.interval, 1.0)
            group.next_integrity = now + group.integrity

    def _advance(self, group: Group) -> None:
        group.next_due += group.interval
        now = self._clock()
        if group.next_due <= now:
            missed = math.floor((now - group.next_due) / group.interval) + 1
            group.next_due += missed * group.interval
            group.skipped += missed
            self.skipped += missed
            if self.metrics:
                self.metrics.skipped.add(missed, self._attrs)

    def _realign(self) -> None:
        """After an outage: the next tick of each group still ahead (an outage is not lateness)."""
        now = self._clock()
        for group in self.groups:
            if group.next_due < now:
                group.next_due += math.ceil((now - group.next_due) / group.interval) * group.interval

    def _integrity_due(self, group: Group, now: float) -> bool:
        if now < group.next_integrity:
            return False
        group.next_integrity += group.integrity
        if group.next_integrity <= now:
            group.next_integrity += math.ceil((now - group.next_integrity) / group.integrity) * group.integrity
        return True

    # ------------------------------------------------------------------------------------- connection

    async def _connect(self) -> bool:
        driver = self.driver
        assert driver is not None
        try:
            await driver.connect()
        except CommunicationError as exc:
            await self._communication_failure(str(exc))
            return False
        self.backoff.reset()
        self.status.connected = True
        for group in self.groups:
            self._plan(group)
        self._realign()
        if not any(g.tags for g in self.groups):
            driver.note_up()  # nothing to read: the connection is all there is to tell (logs the transition)
        return True

    def _plan(self, group: Group) -> None:
        """Plan the group's blocks; keep the split plan when the blocks planned are the same as before."""
        driver = self.driver
        assert driver is not None
        fresh, rejected = plan_fitting(driver, [t.spec for t in group.polled], self.limits)  # type: ignore[misc]
        if rejected:  # tags that do not fit one read: reported, the others planned
            for spec, why in rejected:
                tag = self.by_id[spec.tag_id]
                tag.error = f"tag {tag.name!r}: {why}"
                self.status.config_errors.append(tag.error)
            self.status.tag_count = sum(len(g.polled) for g in self.groups)
            self._report_config_errors(self._wall_ns(), force=True)
        if fresh != group.base_plan:
            group.base_plan, group.blocks = fresh, list(fresh)
            group.absent.clear()
        self._publish_plan()

    def _publish_plan(self) -> None:
        """Copy the groups' plans and absent tags into the status."""
        now, ns = self._clock(), self._wall_ns()
        self.status.reads = [(g.name, b) for g in self.groups for b in g.blocks]
        self.status.absent = [
            AbsentTag(tag_id, self.by_id[tag_id].name, g.name, self.by_id[tag_id].spec, error,  # type: ignore[arg-type]
                      ns + max(0, int((g.next_absent_retry - now) * 1e9)))
            for g in self.groups for tag_id, error in g.absent.items()
        ]

    async def _communication_failure(self, error: str) -> None:
        self.status.connected = False
        self.status.error_count += 1
        self.status.last_error = error
        if self.driver is not None:
            self.driver.note_down(error)  # logs the transition (lost, cannot connect)
            await self.driver.close()
        now, ns = self._clock(), self._wall_ns()
        stamp = timestamp_from_ns(ns)
        emitted = 0
        for group in self.groups:
            force = self._integrity_due(group, now)
            for tag in group.polled:
                if tag.tag_id not in group.absent:  # what the device lacks stays a configuration error
                    emitted += self._bad(tag, COMMUNICATION_FAILURE, error, stamp, force)
            if force:
                self._report_config_errors_of(group, stamp)
        self._count(emitted, "COMMUNICATION_FAILURE")

    # ------------------------------------------------------------------------------------------- poll

    async def _poll(self, group: Group) -> None:
        driver = self.driver
        assert driver is not None
        started = self._clock()
        lateness = max(0.0, started - group.next_due)
        self.lateness.append(lateness)
        group.polls += 1
        self.polls += 1
        metrics = self.metrics
        if metrics:
            metrics.lateness.record(lateness, self._attrs)
        force = self._integrity_due(group, started)
        status = self.status
        had_error = False
        good = bad = 0
        jobs = [(block, False) for block in group.blocks]
        if group.absent and started >= group.next_absent_retry:
            # Read what the device lacked again: a firmware update may have added it.
            group.next_absent_retry = started + self.limits.absent_retry
            absent = [self.by_id[tag_id].spec for tag_id in group.absent]
            jobs += [(block, True) for block in driver.plan(absent, self.limits)]  # type: ignore[arg-type]
        plan: list[Block] = []
        changed = False
        for block, retry in jobs:
            t0 = time.perf_counter()
            t0_ns = time.time_ns()
            try:
                result = await read_block(driver, block, self.limits)
            except CommunicationError as exc:
                if metrics:
                    metrics.reads.add(1, {**self._attrs, "outcome": "communication_error"})
                self._count(good, "GOOD")
                span = poll_span(self.plc_id, group.name, block, t0_ns, time.perf_counter() - t0,
                                 "COMMUNICATION_FAILURE", str(exc))
                with trace.use_span(span, end_on_exit=True):  # the bad readings come from this read
                    await self._communication_failure(str(exc))
                self._advance(group)
                return
            status.read_latency = elapsed = time.perf_counter() - t0
            refused = result.refused
            status.error_count += refused
            if metrics:
                if result.requests > refused:
                    metrics.reads.add(result.requests - refused, {**self._attrs, "outcome": "ok"})
                if refused:
                    metrics.reads.add(refused, {**self._attrs, "outcome": "device_error"})
                if not result.split:
                    metrics.read_duration.record(elapsed, self._attrs)
            if retry:
                recovered = [part for part, _ in result.reads]
                for part in recovered:
                    for spec, _ in part.tags:
                        group.absent.pop(spec.tag_id, None)
                plan += recovered
                changed = changed or bool(recovered)
            elif result.split:
                plan += [part for part, _ in result.reads] + [part for part, _ in result.failed]
                changed = True
            else:
                plan.append(block)
            span = poll_span(self.plc_id, group.name, block, t0_ns, elapsed,
                             "GOOD" if not (refused or result.failed) else "DECODE_FAILURE")
            with trace.use_span(span, end_on_exit=True):  # readings emitted here carry the poll's context
                ns = self._wall_ns()
                stamp = timestamp_from_ns(ns)
                if result.reads:
                    status.last_good_read_ns = ns
                for part, data in result.reads:
                    n_good, n_bad, failed = self._report_block(part, data, stamp, force)
                    good += n_good
                    bad += n_bad
                    had_error = had_error or failed
                if not retry:
                    for part, error in result.failed:
                        had_error = True
                        status.last_error = str(error)
                        for spec, _ in part.tags:
                            bad += self._bad(self.by_id[spec.tag_id], DECODE_FAILURE, str(error), stamp, force)
                for spec, error in result.absent:
                    self._mark_absent(group, spec, error, stamp, force)
        if changed or len(jobs) > len(group.blocks):
            if changed:
                group.blocks = sorted(plan, key=_block_order)
                self._log_split(group)
            self._publish_plan()
        if force:
            self._report_config_errors_of(group, timestamp_from_ns(self._wall_ns()))
        if not had_error:
            status.last_error = ""
        status.connected = True
        driver.note_up()  # every block was answered: logs the transition (connected, restored)
        self._count(good, "GOOD")
        self._count(bad, "DECODE_FAILURE")
        self._advance(group)

    def _report_block(self, block: Block, data: BlockData, stamp: timestamp_pb2.Timestamp,
                      force: bool) -> tuple[int, int, bool]:
        """Decode a block read and report its tags: (GOOD, DECODE_FAILURE readings emitted, any failure)."""
        good = bad = 0
        failed = False
        by_id = self.by_id
        for spec, result in block.decode(data):  # type: ignore[arg-type]
            tag = by_id[spec.tag_id]
            if isinstance(result, DecodeError):
                failed = True
                self.status.last_error = str(result)
                bad += self._bad(tag, DECODE_FAILURE, str(result), stamp, force)
            elif force or tag.last_quality != GOOD or tag.changed(result):
                tag.last_value = result
                tag.last_quality = GOOD
                self._emit(reading_pb2.Reading(
                    tag_id=tag.tag_id, read_time=stamp, value=to_value(tag.kind, result), quality=GOOD,
                    plc_id=self.plc_id, role=tag.role,
                ))
                good += 1
        return good, bad, failed

    def _mark_absent(self, group: Group, spec: TagSpec, error: str, stamp: timestamp_pb2.Timestamp,
                     force: bool) -> None:
        if not group.absent:
            group.next_absent_retry = self._clock() + self.limits.absent_retry
        group.absent[spec.tag_id] = error
        self._count(self._bad(self.by_id[spec.tag_id], CONFIG_ERROR, error, stamp, force), "CONFIG_ERROR")

    def _log_split(self, group: Group) -> None:
        if group.absent:
            names = ", ".join(repr(self.by_id[tag_id].name) for tag_id in list(group.absent)[:5])
            log.info("%s lacks %d tag(s) of group %r (%s%s); reading the group in %d block(s)", self.plc_id,
                     len(group.absent), group.name, names, ", ..." if len(group.absent) > 5 else "",
                     len(group.blocks))
        else:
            log.info("%s refused a block read of group %r (illegal address); reading it in %d block(s)",
                     self.plc_id, group.name, len(group.blocks))

    # -------------------------------------------------------------------------------------- reporting

    def _bad(self, tag: TagState, quality: int, error: str, stamp: timestamp_pb2.Timestamp, force: bool) -> int:
        if not force and tag.last_quality == quality:
            return 0
        tag.last_quality = quality
        self._emit(reading_pb2.Reading(
            tag_id=tag.tag_id, read_time=stamp, quality=quality, error=error[:MAX_ERROR_TEXT], plc_id=self.plc_id,
            role=tag.role,
        ))
        return 1

    def _report_config_errors_of(self, group: Group, stamp: timestamp_pb2.Timestamp) -> None:
        n = 0
        for tag in group.tags:
            if tag.error and tag.tag_id:
                n += self._bad(tag, CONFIG_ERROR, tag.error, stamp, True)
        for tag_id, error in group.absent.items():
            n += self._bad(self.by_id[tag_id], CONFIG_ERROR, error, stamp, True)
        self._count(n, "CONFIG_ERROR")

    def _report_config_errors(self, ns: int, *, force: bool) -> None:
        stamp = timestamp_from_ns(ns)
        n = 0
        seen: set[int] = set()
        for state in self.by_id.values():
            if state.error and state.tag_id not in seen:
                seen.add(state.tag_id)
                n += self._bad(state, CONFIG_ERROR, state.error, stamp, force)
        self._count(n, "CONFIG_ERROR")

    def _count(self, n: int, quality: str) -> None:
        if n and self.metrics:
            self.metrics.readings.add(n, {"quality": quality})
