"""The booking engine's plan, table-driven and without a database: what one message of tag events does to a
loaded state (booking.plan). The same rules against Postgres and a real ingest are in test_tag_events.py and
test_consumer_e2e.py; here each case states the state, the events and the exact effects by hand."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from fabrica.common.v1 import reading_pb2

from fabrica_svc.production import booking
from fabrica_svc.production.booking import (
    Anomaly,
    Baseline,
    Binding,
    BookingState,
    CloseDowntimes,
    CounterBooking,
    Event,
    MachineStateWrite,
    OpenDowntime,
    OrderTotals,
    Run,
)
from fabrica_svc.production.domain import OrderState

T0 = datetime(2024, 3, 4, 8, 0, tzinfo=UTC)
GOOD, SCRAP, STATE = 101, 102, 103
GOOD2, STATE2 = 201, 203
PC, SC, MS = (reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, reading_pb2.TAG_ROLE_SCRAP_COUNTER,
              reading_pb2.TAG_ROLE_MACHINE_STATE)


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ev(cursor: int, tag: int, value: object, at: float, *, good: bool = True) -> Event:
    number = value if isinstance(value, int | float | bool) else None
    kind = {bool: "bool_value", int: "uint_value", float: "double_value", str: "string_value"}.get(type(value))
    text = "(none)" if value is None else f"{kind}={value!r}"
    return Event(cursor=cursor, tag_id=tag, read_time=t(at), good_quality=good, value=number, value_text=text)


def bindings(width: int = 16, jump: int = 1000) -> dict[int, Binding]:
    return {
        GOOD: Binding(GOOD, "press-1", PC, width, jump),
        SCRAP: Binding(SCRAP, "press-1", SC, width, jump),
        STATE: Binding(STATE, "press-1", MS, width, jump),
        GOOD2: Binding(GOOD2, "press-2", PC, 32, 10_000),
        STATE2: Binding(STATE2, "press-2", MS, 32, 10_000),
    }


def order(oid: int = 1, planned: int = 1000, good: int = 0, state: OrderState = OrderState.IN_PROGRESS,
          start: float = 0) -> OrderTotals:
    return OrderTotals(oid, f"PO-{oid}", state, planned, good, 0, t(start), None)


def running(baselines: dict[tuple[str, int], int] | None = None, *, planned: int = 100_000, good: int = 0,
            width: int = 16, jump: int = 1000, **kw: object) -> BookingState:
    """press-1 runs order 1 since T0 (run 10); press-2 runs order 2 since T0 (run 20)."""
    return BookingState(
        bindings=bindings(width, jump), counters=dict(baselines or {}),
        runs={"press-1": [Run(10, 1, "press-1", T0, None)], "press-2": [Run(20, 2, "press-2", T0, None)]},
        orders={1: order(1, planned, good), 2: order(2)}, **kw)  # type: ignore[arg-type]


def booked(effects: booking.Effects) -> list[tuple[int, int, int, int]]:
    """(order, good, scrap, cursor) of each booking."""
    return [(b.order_id, b.good, b.scrap, b.cursor) for b in effects.bookings]


# --------------------------------------------------------------------------------------------------------------
# Counters: one row per case, the state's baseline, the values read, and the exact bookings and anomalies
# --------------------------------------------------------------------------------------------------------------

COUNTER_CASES = [
    # name, baseline of GOOD (None: none yet), values (16 bits, jump 1000), bookings (good), anomaly kinds
    ("first value is the baseline", None, [500], [], []),
    ("increments", 500, [501, 503, 510], [1, 2, 7], []),
    ("unchanged books nothing", 500, [500, 500], [], []),
    ("wrap at 16 bits", 65_530, [4], [10], []),
    ("wrap exactly to zero", 65_535, [0], [1], []),
    ("reset to a small value", 40_000, [7], [7], []),
    ("jump up is flagged, then books from the new baseline", 100, [5_000, 5_003], [3], ["JUMP"]),
    ("drop that is neither wrap nor reset", 40_000, [30_000], [], ["JUMP"]),
    ("step of exactly the limit books", 0, [1_000], [1_000], []),
    ("values wrap modulo the width (signed reading)", 65_535, [-65_535], [2], []),
    ("whole float is a count", 10, [12.0], [2], []),
    ("fraction is not a count", 10, [12.5, 13], [3], ["NOT_A_COUNT"]),
    ("string is not a count", 10, ["ten", 11], [1], ["NOT_A_COUNT"]),
    ("baseline above a shrunk width is forgotten", 70_000, [5, 6], [1], []),
]


@pytest.mark.parametrize(("baseline", "values", "good", "anomalies"),
                         [c[1:] for c in COUNTER_CASES], ids=[c[0] for c in COUNTER_CASES])
def test_counter_cases(baseline: int | None, values: list[object], good: list[int], anomalies: list[str]) -> None:
    state = running({} if baseline is None else {("press-1", GOOD): baseline})
    events = [ev(i + 1, GOOD, v, i + 1) for i, v in enumerate(values)]
    effects = booking.plan(events, state)
    assert [b.good for b in effects.bookings] == good
    assert [a.kind for a in effects.anomalies] == anomalies
    assert effects.booked_good == sum(good)
    numeric = [v for v in values if isinstance(v, int | float) and float(v).is_integer()]
    if numeric:  # the last count read is the new baseline, booked or not
        assert effects.baselines[("press-1", GOOD)].value == int(numeric[-1]) % 2**16
    assert effects.orders == ([] if not good else [OrderTotals(1, "PO-1", OrderState.IN_PROGRESS, 100_000, sum(good), 0,
                                                               T0, None)])


def test_a_jump_records_what_it_jumped_from() -> None:
    effects = booking.plan([ev(7, GOOD, 5_000, 1)], running({("press-1", GOOD): 100}))
    assert effects.anomalies == [Anomaly("press-1", GOOD, 7, "JUMP", 100, "uint_value=5000",
                                         "jump 100 -> 5000 (+4900) exceeds 1000; new baseline", t(1))]
    assert effects.baselines == {("press-1", GOOD): Baseline(5_000, 7, t(1))}
    assert effects.bookings == []


def test_32_bit_wrap_with_the_width_of_the_binding() -> None:
    effects = booking.plan([ev(1, GOOD, 3, 1)], running({("press-1", GOOD): 2**32 - 7}, width=32))
    assert booked(effects) == [(1, 10, 0, 1)]
    assert effects.bookings[0].note == f"wrapped at 2**32: {2**32 - 7} -> 3"


def test_scrap_counter_books_scrap() -> None:
    effects = booking.plan([ev(1, SCRAP, 3, 1), ev(2, GOOD, 12, 2)],
                           running({("press-1", SCRAP): 1, ("press-1", GOOD): 10}))
    assert booked(effects) == [(1, 0, 2, 1), (1, 2, 0, 2)]
    assert (effects.booked_good, effects.booked_scrap) == (2, 2)
    assert (effects.orders[0].good, effects.orders[0].scrap) == (2, 2)


def test_bad_quality_changes_nothing() -> None:
    state = running({("press-1", GOOD): 10}, machine={"press-1": True})
    effects = booking.plan([ev(1, GOOD, 20, 1, good=False), ev(2, STATE, 0, 2, good=False)], state)
    assert effects == booking.Effects()


def test_unbound_tags_are_skipped() -> None:
    assert booking.plan([ev(1, 9_999, 5, 1), ev(2, 9_999, 6, 2)], running()) == booking.Effects()


# --------------------------------------------------------------------------------------------------------------
# Runs and auto-completion
# --------------------------------------------------------------------------------------------------------------


def test_no_running_order_moves_the_baseline_and_books_nothing() -> None:
    state = BookingState(bindings=bindings(), counters={("press-1", GOOD): 10})
    effects = booking.plan([ev(1, GOOD, 15, 1), ev(2, GOOD, 18, 2)], state)
    assert effects.bookings == [] and effects.orders == []
    assert effects.baselines == {("press-1", GOOD): Baseline(18, 2, t(2))}


def test_parts_go_to_the_run_that_covers_their_time() -> None:
    # Order 1 ran 0..10 s (paused), order 3 runs from 20 s; a reading at 15 s falls between runs.
    state = BookingState(
        bindings=bindings(), counters={("press-1", GOOD): 0},
        runs={"press-1": [Run(10, 1, "press-1", t(0), t(10)), Run(11, 3, "press-1", t(20), None)]},
        orders={1: order(1, state=OrderState.PAUSED), 3: order(3, start=20)})
    effects = booking.plan([ev(1, GOOD, 4, 5), ev(2, GOOD, 6, 10), ev(3, GOOD, 9, 15), ev(4, GOOD, 10, 25)], state)
    assert booked(effects) == [(1, 4, 0, 1), (1, 2, 0, 2), (3, 1, 0, 4)], "the end of a run is inclusive"


def test_auto_complete_at_planned_quantity_closes_the_run() -> None:
    state = running({("press-1", GOOD): 0, ("press-1", SCRAP): 0}, planned=20, good=15)
    effects = booking.plan([ev(1, GOOD, 3, 1), ev(2, GOOD, 5, 2), ev(3, SCRAP, 1, 2), ev(4, GOOD, 9, 3)], state)
    # 15 + 3 = 18, + 2 = 20: complete at 2 s; the scrap read at the same time still belongs to it; 3 s does not.
    assert booked(effects) == [(1, 3, 0, 1), (1, 2, 0, 2), (1, 0, 1, 3)]
    assert effects.completed_orders == [1]
    assert effects.orders == [OrderTotals(1, "PO-1", OrderState.COMPLETED, 20, 20, 1, T0, t(2))]
    assert effects.closed_runs == [(10, t(2))]


def test_a_paused_order_that_reaches_its_plan_completes_but_a_planned_one_does_not() -> None:
    for start_state, expected in ((OrderState.PAUSED, OrderState.COMPLETED), (OrderState.PLANNED, OrderState.PLANNED)):
        state = running({("press-1", GOOD): 0}, planned=5)
        state.orders[1].state = start_state
        effects = booking.plan([ev(1, GOOD, 5, 1)], state)
        assert effects.orders[0].state is expected


def test_completion_never_ends_before_the_start() -> None:
    # A late reading stamped before the order started, inside a run that started even earlier (clock skew).
    state = running({("press-1", GOOD): 0}, planned=5)
    state.orders[1].start = t(30)
    effects = booking.plan([ev(1, GOOD, 5, 1)], state)
    assert effects.orders[0].end == t(30)
    assert effects.closed_runs == [(10, t(1))]


# --------------------------------------------------------------------------------------------------------------
# Machine state and downtime: the previous state, whether an automatic stop is open, events -> changes
# --------------------------------------------------------------------------------------------------------------

STATE_CASES = [
    # name, previous running, automatic stop open, values, downtime changes (kind, at), final running
    ("first stop opens", None, False, [0], [("open", 1)], False),
    ("first run does nothing", None, False, [1], [], True),
    ("stop then run", True, False, [0, 1], [("open", 1), ("close", 2)], True),
    ("fault is a stop", True, False, [2], [("open", 1)], False),
    ("still stopped does nothing", False, True, [0, 7], [], False),
    ("stop with one open does not open a second", None, True, [0], [], False),
    ("running again closes every open stop", False, True, [1], [("close", 1)], True),
    ("running with no state known closes the automatic one", None, True, [1], [("close-automatic", 1)], True),
    ("stop, run, stop, run", True, False, [0, 1, 0, 1],
     [("open", 1), ("close", 2), ("open", 3), ("close", 4)], True),
    ("bool true runs", False, True, [True], [("close", 1)], True),
]


def _changes(effects: booking.Effects) -> list[tuple[str, datetime]]:
    out = []
    for c in effects.downtime:
        if isinstance(c, OpenDowntime):
            out.append(("open", c.start))
        else:
            out.append(("close-automatic" if c.automatic_only else "close", c.end))
    return out


@pytest.mark.parametrize(("previous", "open_stop", "values", "changes", "final"), [c[1:] for c in STATE_CASES],
                         ids=[c[0] for c in STATE_CASES])
def test_machine_state_cases(previous: bool | None, open_stop: bool, values: list[object],
                             changes: list[tuple[str, float]], final: bool) -> None:
    state = running(machine={} if previous is None else {"press-1": previous},
                    open_automatic={"press-1"} if open_stop else set())
    effects = booking.plan([ev(i + 1, STATE, v, i + 1) for i, v in enumerate(values)], state)
    assert _changes(effects) == [(kind, t(at)) for kind, at in changes]
    last = len(values)
    assert effects.machine_states == {"press-1": MachineStateWrite(STATE, final, last, t(last))}


def test_a_stop_is_booked_to_the_order_running_then() -> None:
    state = BookingState(bindings=bindings(), runs={"press-1": [Run(10, 1, "press-1", t(5), None)]},
                         orders={1: order(1, start=5)})
    effects = booking.plan([ev(1, STATE, 0, 1), ev(2, STATE, 1, 2), ev(3, STATE, 0, 6)], state)
    assert effects.downtime == [OpenDowntime("press-1", None, t(1)), CloseDowntimes("press-1", t(2), False),
                                OpenDowntime("press-1", 1, t(6))]


def test_a_state_that_is_not_a_number_is_flagged_and_changes_nothing() -> None:
    effects = booking.plan([ev(1, STATE, "running", 1)], running(machine={"press-1": False}))
    assert [a.kind for a in effects.anomalies] == ["NOT_A_STATE"]
    assert effects.downtime == [] and effects.machine_states == {}


# --------------------------------------------------------------------------------------------------------------
# Several work centres, order of events, replays, purity
# --------------------------------------------------------------------------------------------------------------


def test_several_work_centres_in_one_message() -> None:
    state = running({("press-1", GOOD): 100, ("press-2", GOOD2): 4_000_000_000}, machine={"press-2": True})
    effects = booking.plan([
        ev(1, GOOD, 110, 1), ev(2, GOOD2, 4_000_000_050, 1), ev(3, STATE2, 0, 2), ev(4, GOOD, 65_000, 3),
        ev(5, GOOD2, 4_000_000_060, 3),
    ], state)
    assert booked(effects) == [(1, 10, 0, 1), (2, 50, 0, 2), (2, 10, 0, 5)]
    assert [(a.work_center_id, a.kind) for a in effects.anomalies] == [("press-1", "JUMP")]
    assert effects.downtime == [OpenDowntime("press-2", 2, t(2))]
    assert [(o.id, o.good) for o in effects.orders] == [(1, 10), (2, 60)]
    assert set(effects.baselines) == {("press-1", GOOD), ("press-2", GOOD2)}


def test_events_are_taken_in_cursor_order() -> None:
    state = running({("press-1", GOOD): 0})
    shuffled = [ev(3, GOOD, 6, 3), ev(1, GOOD, 1, 1), ev(2, GOOD, 3, 2)]
    assert booked(booking.plan(shuffled, state)) == [(1, 1, 0, 1), (1, 2, 0, 2), (1, 3, 0, 3)]


def test_a_replayed_message_on_the_state_it_left_books_nothing_more() -> None:
    """The store skips events at or below the committed cursor; should the same values arrive again as new
    events anyway, the baselines they left make them book nothing."""
    events = [ev(1, GOOD, 5, 1), ev(2, GOOD, 9, 2)]
    first = booking.plan(events, running({("press-1", GOOD): 0}))
    assert first.booked_good == 9
    after = running({key: b.value for key, b in first.baselines.items()}, good=9)
    again = booking.plan([ev(3, GOOD, 5, 1), ev(4, GOOD, 9, 2)], after)
    assert again.bookings[-1:] == [CounterBooking(1, 4, 0, t(2), "5 -> 9", 4, GOOD)]
    assert booking.plan([ev(3, GOOD, 9, 2)], after).bookings == [], "the same last value again books nothing"


def test_plan_is_pure() -> None:
    state = running({("press-1", GOOD): 0}, planned=3, machine={"press-1": True})
    before = copy.deepcopy(state)
    events = [ev(1, GOOD, 5, 1), ev(2, STATE, 0, 2)]
    first = booking.plan(events, state)
    assert state == before, "the loaded state is not changed"
    assert booking.plan(events, state) == first, "same input, same effects"
