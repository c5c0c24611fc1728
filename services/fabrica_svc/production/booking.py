"""The booking engine: what one message of tag events does, as a pure function.

``plan(events, state) -> Effects``. `state` is everything the events can touch, loaded in bulk for the
whole message before planning (store/events.py): the bindings of the tags, the counter baselines and
machine states of their work centres, the order runs that cover the events' times with their orders, and
which work centres have an automatic downtime open. `plan` walks the events in cursor order and returns what
to write: baselines, bookings, order totals and completions, closed runs, downtime opened and closed (in
event order), and anomalies. Nothing here does I/O; the service layer applies the effects and moves the
consumer's cursor in the same transaction (service.py), so the plan runs once per committed message.

Rules, per event (events of tags no work centre binds are skipped; so are events of bad quality: there is
no value to trust, the baseline and the machine state stay as they were):

* counter tags (production or scrap): the value is taken as an unsigned count at the work centre's width
  (domain.counter_value); not a count is a ``NOT_A_COUNT`` anomaly. A baseline at or above the width (the
  width shrank) is forgotten. domain.counter_delta classifies the step; a JUMP is flagged (anomaly
  ``JUMP``) and books nothing; in every case the value becomes the new baseline. A positive quantity is
  booked to the order whose run covers the reading's time (the latest start wins if two touch); with no run,
  nothing is booked. Good parts that reach the planned quantity complete the order (domain.complete_if_reached)
  and end its open run at that time.
* machine-state tags: not a number is a ``NOT_A_STATE`` anomaly. Otherwise domain.downtime_transition
  says what happens: a stop opens an automatic downtime (unless one is open) for the order running then; a
  start closes every downtime still open on the work centre, an operator's included; running with no
  previous state known but an automatic downtime open closes that one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime

from fabrica.common.v1 import reading_pb2

from . import domain
from .domain import OrderState

#: Anomaly kinds (``tag_anomalies.kind``).
NOT_A_COUNT = "NOT_A_COUNT"
NOT_A_STATE = "NOT_A_STATE"
JUMP = "JUMP"
#: An event the service could not apply at all (service.TagEventService): recorded and passed.
UNTAKEABLE = "UNTAKEABLE"


#: Roles whose values are counts.
COUNTER_ROLES = (reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, reading_pb2.TAG_ROLE_SCRAP_COUNTER)


@dataclass(frozen=True)
class Event:
    """One tag event, as the engine needs it. `value` is None when the reading holds no number."""

    cursor: int
    tag_id: int
    read_time: datetime
    good_quality: bool
    value: int | float | bool | None
    value_text: str


@dataclass(frozen=True)
class Binding:
    """A tag bound to a work centre, with the work centre's counter settings resolved."""

    tag_id: int
    work_center_id: str
    role: int
    width: int
    max_jump: int


@dataclass
class Run:
    """A stretch of time an order ran on its work centre (end None: still running)."""

    id: int
    order_id: int
    work_center_id: str
    start: datetime
    end: datetime | None

    def covers(self, t: datetime) -> bool:
        # The end is inclusive: a scrap count read in the same cycle as the good count that completed the
        # order belongs to it.
        return self.start <= t and (self.end is None or t <= self.end)


@dataclass
class OrderTotals:
    """What booking needs of an order and may change."""

    id: int
    number: str
    state: OrderState
    planned: int
    good: int
    scrap: int
    start: datetime | None
    end: datetime | None


@dataclass
class BookingState:
    """Everything one message of events can read, loaded before planning."""

    bindings: dict[int, Binding] = field(default_factory=dict)
    #: Last counter value per (work centre, tag).
    counters: dict[tuple[str, int], int] = field(default_factory=dict)
    #: Last machine state per work centre (True = running).
    machine: dict[str, bool] = field(default_factory=dict)
    #: Runs per work centre that may cover the events, by start time.
    runs: dict[str, list[Run]] = field(default_factory=dict)
    orders: dict[int, OrderTotals] = field(default_factory=dict)
    #: Work centres with an automatic downtime open.
    open_automatic: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Baseline:
    value: int
    cursor: int
    read_time: datetime


@dataclass(frozen=True)
class MachineStateWrite:
    tag_id: int
    running: bool
    cursor: int
    read_time: datetime


@dataclass(frozen=True)
class CounterBooking:
    order_id: int
    good: int
    scrap: int
    book_time: datetime
    note: str
    cursor: int
    tag_id: int


@dataclass(frozen=True)
class Anomaly:
    work_center_id: str
    tag_id: int
    cursor: int
    kind: str
    previous: int | None
    value_text: str
    note: str
    read_time: datetime


@dataclass(frozen=True)
class OpenDowntime:
    """Open an automatic downtime on the work centre at `start` (for `order_id`, if one ran)."""

    work_center_id: str
    order_id: int | None
    start: datetime


@dataclass(frozen=True)
class CloseDowntimes:
    """End the downtimes still open on the work centre at `end` (never before they started): all of them,
    or only the automatic one."""

    work_center_id: str
    end: datetime
    automatic_only: bool


@dataclass
class Effects:
    """What to write for one message, in the order it must be written."""

    anomalies: list[Anomaly] = field(default_factory=list)
    #: Downtime changes in event order (an open and a close of one work centre may follow each other).
    downtime: list[OpenDowntime | CloseDowntimes] = field(default_factory=list)
    baselines: dict[tuple[str, int], Baseline] = field(default_factory=dict)
    machine_states: dict[str, MachineStateWrite] = field(default_factory=dict)
    bookings: list[CounterBooking] = field(default_factory=list)
    #: Orders whose totals or state changed, by id.
    orders: list[OrderTotals] = field(default_factory=list)
    #: Runs ended by a completion: (run id, end time).
    closed_runs: list[tuple[int, datetime]] = field(default_factory=list)
    completed_orders: list[int] = field(default_factory=list)
    booked_good: int = 0
    booked_scrap: int = 0


def _run_at(runs: dict[str, list[Run]], work_center_id: str, t: datetime) -> Run | None:
    for run in reversed(runs.get(work_center_id, [])):  # the latest start wins if two touch
        if run.covers(t):
            return run
    return None


class _Planner:
    def __init__(self, state: BookingState):
        # Working copies: the caller's state is not changed.
        self.counters = dict(state.counters)
        self.machine = dict(state.machine)
        self.runs = copy.deepcopy(state.runs)
        self.orders = copy.deepcopy(state.orders)
        self.open_automatic = set(state.open_automatic)
        self.bindings = state.bindings
        self.changed: set[int] = set()
        self.closed_runs: dict[int, datetime] = {}
        self.out = Effects()

    def anomaly(self, event: Event, binding: Binding, kind: str, previous: int | None, note: str) -> None:
        self.out.anomalies.append(Anomaly(binding.work_center_id, event.tag_id, event.cursor, kind, previous,
                                          event.value_text, note, event.read_time))

    def counter(self, event: Event, binding: Binding) -> None:
        t = event.read_time
        value = None if event.value is None else domain.counter_value(event.value, binding.width)
        key = (binding.work_center_id, event.tag_id)
        previous = self.counters.get(key)
        if value is None:
            self.anomaly(event, binding, NOT_A_COUNT, previous, f"{event.value_text} is not a counter value")
            return
        if previous is not None and previous >= 1 << binding.width:
            previous = None  # the work centre's counter width shrank: start over from this value
        delta = domain.counter_delta(previous, value, width=binding.width, max_jump=binding.max_jump)
        self.counters[key] = value
        self.out.baselines[key] = Baseline(value, event.cursor, t)
        if delta.kind is domain.DeltaKind.JUMP:
            self.anomaly(event, binding, JUMP, previous, delta.note)
            return
        if delta.quantity <= 0:
            return
        run = _run_at(self.runs, binding.work_center_id, t)
        if run is None:
            return  # no order was running when these parts were made: the baseline moves, nothing is booked
        order = self.orders[run.order_id]
        is_scrap = binding.role == reading_pb2.TAG_ROLE_SCRAP_COUNTER
        if is_scrap:
            order.scrap += delta.quantity
            self.out.booked_scrap += delta.quantity
        else:
            order.good += delta.quantity
            self.out.booked_good += delta.quantity
        self.changed.add(order.id)
        self.out.bookings.append(CounterBooking(order.id, 0 if is_scrap else delta.quantity,
                                                delta.quantity if is_scrap else 0, t, delta.note, event.cursor,
                                                event.tag_id))
        completion = domain.complete_if_reached(order.state, order.good, order.planned, order.start, t)
        if completion is not None:
            order.state, order.end = completion.state, completion.end_time
            for r in self.runs.get(binding.work_center_id, []):
                if r.order_id == order.id and r.end is None:
                    r.end = max(t, r.start)
                    self.closed_runs[r.id] = r.end
            self.out.completed_orders.append(order.id)

    def machine_state_event(self, event: Event, binding: Binding) -> None:
        t = event.read_time
        wc = binding.work_center_id
        if event.value is None:
            self.anomaly(event, binding, NOT_A_STATE, None, f"{event.value_text} is not a machine state")
            return
        running = domain.is_running(event.value)
        change = domain.downtime_transition(self.machine.get(wc), running)
        self.machine[wc] = running
        self.out.machine_states[wc] = MachineStateWrite(event.tag_id, running, event.cursor, t)
        if change == "open" and wc not in self.open_automatic:
            run = _run_at(self.runs, wc, t)
            self.out.downtime.append(OpenDowntime(wc, run.order_id if run else None, t))
            self.open_automatic.add(wc)
        elif change == "close":
            # The machine runs again: every stop still open on it ends, including one an operator opened.
            self.out.downtime.append(CloseDowntimes(wc, t, automatic_only=False))
            self.open_automatic.discard(wc)
        elif running and wc in self.open_automatic:
            # Running, with no previous state known (e.g. the state tag was re-bound) but a stop still open.
            self.out.downtime.append(CloseDowntimes(wc, t, automatic_only=True))
            self.open_automatic.discard(wc)

    def result(self) -> Effects:
        self.out.orders = [self.orders[i] for i in sorted(self.changed)]
        self.out.closed_runs = sorted(self.closed_runs.items())
        return self.out


def plan(events: list[Event], state: BookingState) -> Effects:
    """The effects of `events` (taken in cursor order) on `state`, which is not changed."""
    planner = _Planner(state)
    for event in sorted(events, key=lambda e: e.cursor):
        binding = state.bindings.get(event.tag_id)
        if binding is None or not event.good_quality:
            continue
        if binding.role in COUNTER_ROLES:
            planner.counter(event, binding)
        elif binding.role == reading_pb2.TAG_ROLE_MACHINE_STATE:
            planner.machine_state_event(event, binding)
    return planner.result()
