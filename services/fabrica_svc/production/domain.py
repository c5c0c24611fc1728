"""Pure rules of the production service: counter deltas, the order life cycle, downtime detection and OEE.

Nothing here knows about gRPC, asyncpg or any I/O (the generated enums give the numbers of the states). Bad input raises
:class:`~fabrica_svc.runtime.errors.InvalidArgument`; a forbidden order transition raises
:class:`~fabrica_svc.runtime.errors.FailedPrecondition`. The service layer maps both to status codes.

Counter deltas
--------------
A work centre's PLC counts parts in an unsigned register of ``width`` bits. The service keeps the last value
it saw and books the difference to the running order. :func:`counter_delta` classifies each new value
against the previous one (``M = 2**width``, ``J = max_jump``):

* no previous value: FIRST, 0 booked (the value is the baseline);
* ``current == previous``: NONE, 0;
* ``0 < current - previous <= J``: INCREASE, ``current - previous``;
* ``current - previous > J``: JUMP, 0 (flagged);
* ``current < previous`` and the wrap distance ``M - previous + current <= J``: WRAP, the wrap distance;
* otherwise ``current < previous`` and ``current <= J``: RESET, ``current``;
* any other ``current < previous``: JUMP, 0 (flagged).

A wrap is preferred over a reset when both fit (a 16-bit counter going 65530 → 4 wrapped; it did not
restart and make 4 parts). A reset books ``current``: the parts made since the PLC restarted at zero.
In every case ``current`` becomes the new baseline and the quantity is never negative.

The proto's "0 means default" (32 bits, jump 10,000) is resolved by :func:`resolve_counter_settings`;
:func:`counter_delta` itself takes only explicit settings.

Order life cycle
----------------
==========  ==================================  ===========
Action      From                                To
==========  ==================================  ===========
start       PLANNED                             IN_PROGRESS
pause       IN_PROGRESS                         PAUSED
resume      PAUSED                              IN_PROGRESS
complete    IN_PROGRESS, PAUSED                 COMPLETED
cancel      PLANNED, IN_PROGRESS, PAUSED        CANCELLED
==========  ==================================  ===========

COMPLETED and CANCELLED are final. :func:`transition` returns the new state or raises FailedPrecondition
(reason ``ORDER_STATE_INVALID``) with one ``ORDER_STATE`` violation.

Downtime and OEE
----------------
The machine-state tag reports 1 while the machine runs; any other value is a stop (:func:`is_running`).
:func:`downtime_transition` says when to open or close an automatic downtime. :func:`overlap_seconds`
measures the downtime inside a window and :func:`compute_oee` turns times and counts into OEE; see their
docstrings for the zero-denominator conventions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Final, Literal

from fabrica.production.v1 import order_pb2

from fabrica_svc.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, PreconditionViolation

__all__ = [
    "COUNTER_WIDTHS",
    "DEFAULT_COUNTER_WIDTH",
    "DEFAULT_MAX_COUNTER_JUMP",
    "TRANSITIONS",
    "Completion",
    "CounterDelta",
    "DeltaKind",
    "DowntimeChange",
    "MachineState",
    "Oee",
    "OrderAction",
    "OrderState",
    "auto_complete_state",
    "complete_if_reached",
    "compute_oee",
    "counter_value",
    "counter_delta",
    "downtime_transition",
    "is_running",
    "overlap_seconds",
    "resolve_counter_settings",
    "should_auto_complete",
    "transition",
    "weighted_ideal_cycle_time",
]

# --------------------------------------------------------------------------------------------------------------
# Counter deltas
# --------------------------------------------------------------------------------------------------------------

#: Register widths a counter may have.
COUNTER_WIDTHS: Final = frozenset({16, 32, 64})
#: Width used when a work centre leaves ``counter_width`` at 0.
DEFAULT_COUNTER_WIDTH: Final = 32
#: Jump limit used when a work centre leaves ``max_counter_jump`` at 0.
DEFAULT_MAX_COUNTER_JUMP: Final = 10_000


class DeltaKind(Enum):
    """How a counter value relates to the previous one; see the module docstring for the rules."""

    FIRST = "FIRST"
    NONE = "NONE"
    INCREASE = "INCREASE"
    WRAP = "WRAP"
    RESET = "RESET"
    JUMP = "JUMP"


@dataclass(frozen=True)
class CounterDelta:
    """The outcome for one counter value: what happened, how many parts to book (>= 0), and why."""

    kind: DeltaKind
    quantity: int
    note: str


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_counter_settings(counter_width: int, max_counter_jump: int) -> tuple[int, int]:
    """Apply the proto defaults: width 0 → 32, jump 0 → 10,000. Returns ``(width, max_jump)``."""
    return (counter_width or DEFAULT_COUNTER_WIDTH, max_counter_jump or DEFAULT_MAX_COUNTER_JUMP)


def counter_delta(previous: int | None, current: int, *, width: int, max_jump: int) -> CounterDelta:
    """Classify ``current`` against ``previous`` and return the quantity to book.

    ``width`` must be 16, 32 or 64 (0 is not accepted here; see :func:`resolve_counter_settings`),
    ``max_jump`` at least 1, and both values integers in ``[0, 2**width)``. Anything else raises
    InvalidArgument.
    """
    violations: list[FieldViolation] = []
    if not _is_int(width) or width not in COUNTER_WIDTHS:
        violations.append(FieldViolation("width", f"must be 16, 32 or 64, got {width!r}"))
    if not _is_int(max_jump) or max_jump < 1:
        violations.append(FieldViolation("max_jump", f"must be a positive integer, got {max_jump!r}"))
    if violations:
        raise InvalidArgument(violations)
    modulus = 1 << width
    for name, value in (("previous", previous), ("current", current)):
        if value is None and name == "previous":
            continue
        if not _is_int(value) or not 0 <= value < modulus:
            violations.append(FieldViolation(name, f"must be an integer in [0, 2**{width}), got {value!r}"))
    if violations:
        raise InvalidArgument(violations)

    if previous is None:
        return CounterDelta(DeltaKind.FIRST, 0, f"first value {current}: baseline")
    if current == previous:
        return CounterDelta(DeltaKind.NONE, 0, "unchanged")
    if current > previous:
        step = current - previous
        if step <= max_jump:
            return CounterDelta(DeltaKind.INCREASE, step, f"{previous} -> {current}")
        return CounterDelta(
            DeltaKind.JUMP, 0, f"jump {previous} -> {current} (+{step}) exceeds {max_jump}; new baseline"
        )
    wrapped = modulus - previous + current
    if wrapped <= max_jump:
        return CounterDelta(DeltaKind.WRAP, wrapped, f"wrapped at 2**{width}: {previous} -> {current}")
    if current <= max_jump:
        return CounterDelta(DeltaKind.RESET, current, f"reset: {previous} -> {current}")
    return CounterDelta(
        DeltaKind.JUMP, 0, f"drop {previous} -> {current} is neither a wrap nor a reset within {max_jump}; new baseline"
    )


def counter_value(value: int | float, width: int) -> int | None:
    """A counter reading as an unsigned value in ``[0, 2**width)``, or None if it is not a count.

    Integers are taken modulo ``2**width``: a counter read as a signed register (an INT16 past 32767 reads
    negative) is the same unsigned count modulo its width, and deltas are computed modulo the width anyway.
    A float must be whole (a counter with a scale of 1, or a PLC that reports counts as REAL). Booleans,
    fractions, NaN and infinities are not counts.
    """
    if width not in COUNTER_WIDTHS:
        raise InvalidArgument(FieldViolation("width", f"must be 16, 32 or 64, got {width!r}"))
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        value = int(value)
    if not isinstance(value, int):
        return None
    return value % (1 << width)


# --------------------------------------------------------------------------------------------------------------
# Order life cycle
# --------------------------------------------------------------------------------------------------------------


class OrderState(IntEnum):
    """Order states, with the numbers of the generated ``fabrica.production.v1.OrderState``."""

    PLANNED = order_pb2.ORDER_STATE_PLANNED
    IN_PROGRESS = order_pb2.ORDER_STATE_IN_PROGRESS
    PAUSED = order_pb2.ORDER_STATE_PAUSED
    COMPLETED = order_pb2.ORDER_STATE_COMPLETED
    CANCELLED = order_pb2.ORDER_STATE_CANCELLED


class OrderAction(str, Enum):
    """What an operator (or auto-completion) does to an order."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    COMPLETE = "complete"
    CANCEL = "cancel"


#: ``TRANSITIONS[action][from_state] == to_state`` for every legal transition.
TRANSITIONS: Final[Mapping[OrderAction, Mapping[OrderState, OrderState]]] = MappingProxyType({
    OrderAction.START: MappingProxyType({OrderState.PLANNED: OrderState.IN_PROGRESS}),
    OrderAction.PAUSE: MappingProxyType({OrderState.IN_PROGRESS: OrderState.PAUSED}),
    OrderAction.RESUME: MappingProxyType({OrderState.PAUSED: OrderState.IN_PROGRESS}),
    OrderAction.COMPLETE: MappingProxyType(
        {OrderState.IN_PROGRESS: OrderState.COMPLETED, OrderState.PAUSED: OrderState.COMPLETED}
    ),
    OrderAction.CANCEL: MappingProxyType(
        dict.fromkeys((OrderState.PLANNED, OrderState.IN_PROGRESS, OrderState.PAUSED), OrderState.CANCELLED)
    ),
})


def transition(state: OrderState | int, action: OrderAction | str, *, subject: str = "order") -> OrderState:
    """Return the state after ``action``, or raise FailedPrecondition if ``state`` does not allow it.

    ``subject`` names the order in the violation (e.g. ``orders/42``). An unknown state number or action
    name raises InvalidArgument.
    """
    try:
        state = OrderState(state)
    except ValueError:
        raise InvalidArgument(FieldViolation("state", f"unknown order state {state!r}")) from None
    try:
        action = OrderAction(action)
    except ValueError:
        raise InvalidArgument(FieldViolation("action", f"unknown order action {action!r}")) from None
    new_state = TRANSITIONS[action].get(state)
    if new_state is None:
        description = f"cannot {action.value} an order that is {state.name}"
        raise FailedPrecondition(
            description,
            violations=[PreconditionViolation(type="ORDER_STATE", subject=subject, description=description)],
            reason="ORDER_STATE_INVALID",
            metadata={"state": state.name, "action": action.value},
        )
    return new_state


def should_auto_complete(good_quantity: int, planned_quantity: int) -> bool:
    """True once the good quantity reaches the planned quantity. Never true for a planned quantity below 1."""
    return planned_quantity >= 1 and good_quantity >= planned_quantity


def auto_complete_state(state: OrderState | int, good_quantity: int, planned_quantity: int) -> OrderState | None:
    """COMPLETED when an order that may complete (in progress or paused) has reached its planned quantity.

    None otherwise: a planned order cannot jump to COMPLETED (parts booked to it by hand before it starts
    do not finish it), and a completed or cancelled order stays as it is.
    """
    state = OrderState(state)
    if not should_auto_complete(good_quantity, planned_quantity):
        return None
    if state not in TRANSITIONS[OrderAction.COMPLETE]:
        return None
    return transition(state, OrderAction.COMPLETE)


@dataclass(frozen=True)
class Completion:
    """An order that reached its planned quantity: its new state and end time."""

    state: OrderState
    end_time: datetime


def complete_if_reached(state: OrderState | int, good_quantity: int, planned_quantity: int,
                        start_time: datetime | None, at: datetime) -> Completion | None:
    """The completion of an order whose good quantity reached the plan at time ``at``, or None.

    One rule for counter and manual bookings: see :func:`auto_complete_state` for which orders complete.
    The order ends at ``at``, never before it started (a late reading can be stamped before the start).
    """
    completed = auto_complete_state(state, good_quantity, planned_quantity)
    if completed is None:
        return None
    return Completion(completed, at if start_time is None else max(at, start_time))


# --------------------------------------------------------------------------------------------------------------
# Machine state and downtime
# --------------------------------------------------------------------------------------------------------------


class MachineState(IntEnum):
    """Values of the machine-state tag (as the demo plant reports them). Only RUNNING counts as running."""

    STOPPED = 0
    RUNNING = 1
    FAULT = 2


#: What to do with the work centre's automatic downtime.
DowntimeChange = Literal["open", "close"]


def is_running(value: int | float | bool) -> bool:
    """The rule for the machine-state tag: exactly 1 means running; any other value (0, 2, 7, ...) means not."""
    return value == MachineState.RUNNING


def downtime_transition(previous_running: bool | None, running: bool) -> DowntimeChange | None:
    """Return ``"open"`` when the machine stops, ``"close"`` when it starts again, else None.

    With no previous state (``None``: first reading, or state unknown), a stopped machine opens a downtime
    and a running one does nothing; the caller must not open a second downtime if one is already open.
    """
    if running:
        return "close" if previous_running is False else None
    return "open" if previous_running in (None, True) else None


# --------------------------------------------------------------------------------------------------------------
# OEE
# --------------------------------------------------------------------------------------------------------------


def overlap_seconds(
    intervals: Iterable[tuple[datetime, datetime | None]],
    window_start: datetime,
    window_end: datetime,
    now: datetime,
) -> float:
    """Seconds of ``[window_start, window_end)`` covered by at least one interval.

    An interval with end None is still open and ends at ``now``. Intervals are clipped to the window and
    merged, so overlapping stops are counted once; empty or inverted intervals count nothing. All datetimes
    must be of one kind (all timezone-aware, preferably UTC). A window ending before it starts raises
    InvalidArgument.
    """
    if window_end < window_start:
        raise InvalidArgument(FieldViolation("window_end", "must not be before window_start"))
    clipped = []
    for start, end in intervals:
        lo = max(start, window_start)
        hi = min(now if end is None else end, window_end)
        if hi > lo:
            clipped.append((lo, hi))
    clipped.sort()
    total = 0.0
    cur_lo = cur_hi = None
    for lo, hi in clipped:
        if cur_hi is not None and lo <= cur_hi:
            cur_hi = max(cur_hi, hi)
            continue
        if cur_hi is not None:
            total += (cur_hi - cur_lo).total_seconds()
        cur_lo, cur_hi = lo, hi
    if cur_hi is not None:
        total += (cur_hi - cur_lo).total_seconds()
    return total


@dataclass(frozen=True)
class Oee:
    """OEE and its factors, with the inputs they came from. Times are in seconds."""

    planned_time_s: float
    downtime_s: float
    run_time_s: float
    ideal_cycle_time_s: float
    total_count: int
    good_count: int
    availability: float
    performance: float
    quality: float
    oee: float


def compute_oee(
    *,
    planned_time_s: float,
    downtime_s: float,
    ideal_cycle_time_s: float,
    total_count: int,
    good_count: int,
) -> Oee:
    """Compute OEE = availability × performance × quality.

    * run time = planned time − downtime, floored at 0 (downtime longer than the plan means no run time);
    * availability = run time / planned time; **0.0 when nothing was planned**;
    * performance = ideal cycle time × total count / run time; **0.0 when there was no run time**. Not
      clamped: above 1.0 means more parts than the ideal rate allows, i.e. the ideal cycle time is set too
      slow, and the figure is kept so that shows;
    * quality = good count / total count; **1.0 when no part was made** (nothing bad was made; OEE is 0
      anyway through performance).

    Never raises ZeroDivisionError. Negative or non-finite inputs, and ``good_count > total_count``, raise
    InvalidArgument.
    """
    violations = [
        FieldViolation(name, f"must be a finite number >= 0, got {value!r}")
        for name, value in (
            ("planned_time_s", planned_time_s),
            ("downtime_s", downtime_s),
            ("ideal_cycle_time_s", ideal_cycle_time_s),
            ("total_count", total_count),
            ("good_count", good_count),
        )
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0
    ]
    if not violations and good_count > total_count:
        violations.append(FieldViolation("good_count", f"must not exceed total_count ({good_count} > {total_count})"))
    if violations:
        raise InvalidArgument(violations)

    run_time_s = max(float(planned_time_s) - float(downtime_s), 0.0)
    availability = run_time_s / planned_time_s if planned_time_s > 0 else 0.0
    performance = ideal_cycle_time_s * total_count / run_time_s if run_time_s > 0 else 0.0
    quality = good_count / total_count if total_count > 0 else 1.0
    return Oee(
        planned_time_s=float(planned_time_s),
        downtime_s=float(downtime_s),
        run_time_s=run_time_s,
        ideal_cycle_time_s=float(ideal_cycle_time_s),
        total_count=total_count,
        good_count=good_count,
        availability=availability,
        performance=performance,
        quality=quality,
        oee=availability * performance * quality,
    )


def weighted_ideal_cycle_time(counts: Iterable[tuple[float, int]]) -> tuple[float, int]:
    """Combine ``(ideal cycle time in s, parts)`` of several items into one ``(cycle time, total parts)``.

    The cycle time returned is the parts-weighted mean, so ``cycle × total`` is the sum of
    ``ideal cycle time × count`` over the items: what :func:`compute_oee` needs for a work centre that made
    several items in the window. With no parts it is 0. Negative counts raise InvalidArgument.
    """
    ideal_s = 0.0
    total = 0
    for cycle_s, count in counts:
        if count < 0 or cycle_s < 0 or not math.isfinite(cycle_s):
            raise InvalidArgument(FieldViolation(
                "counts", f"cycle time and count must be >= 0, got {(cycle_s, count)!r}"))
        ideal_s += cycle_s * count
        total += count
    return (ideal_s / total if total else 0.0), total
