"""Table-driven tests of the production domain rules."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta

import pytest

from fabrica_svc.production.domain import (
    TRANSITIONS,
    CounterDelta,
    DeltaKind,
    MachineState,
    OrderAction,
    OrderState,
    compute_oee,
    counter_delta,
    downtime_transition,
    is_running,
    overlap_seconds,
    resolve_counter_settings,
    should_auto_complete,
    transition,
)
from fabrica_svc.runtime.errors import FailedPrecondition, InvalidArgument, PreconditionViolation

# --------------------------------------------------------------------------------------------------------------
# Counter deltas
# --------------------------------------------------------------------------------------------------------------

U16, U32, U64 = 2**16, 2**32, 2**64

COUNTER_CASES = [
    # id, previous, current, width, max_jump, kind, quantity
    ("first-value", None, 1234, 32, 10_000, DeltaKind.FIRST, 0),
    ("first-value-zero", None, 0, 16, 10_000, DeltaKind.FIRST, 0),
    ("repeated-value", 500, 500, 32, 10_000, DeltaKind.NONE, 0),
    ("normal-increase", 100, 137, 32, 10_000, DeltaKind.INCREASE, 37),
    ("increase-at-limit", 0, 10_000, 32, 10_000, DeltaKind.INCREASE, 10_000),
    ("increase-to-top-16", U16 - 3, U16 - 1, 16, 10_000, DeltaKind.INCREASE, 2),
    ("wrap-16", 65530, 4, 16, 10_000, DeltaKind.WRAP, 10),
    ("wrap-16-to-zero", U16 - 1, 0, 16, 10_000, DeltaKind.WRAP, 1),
    ("wrap-32", U32 - 5, 20, 32, 10_000, DeltaKind.WRAP, 25),
    ("wrap-64", U64 - 1, 99, 64, 10_000, DeltaKind.WRAP, 100),
    ("wrap-preferred-over-reset", 60_000, 100, 16, 10_000, DeltaKind.WRAP, 5_636),
    ("reset-to-zero", 5_000, 0, 32, 10_000, DeltaKind.RESET, 0),
    ("reset-to-small-value", 5_000, 12, 32, 10_000, DeltaKind.RESET, 12),
    ("reset-16-too-far-to-wrap", 30_000, 7, 16, 10_000, DeltaKind.RESET, 7),
    ("jump-over-limit", 100, 10_101, 32, 10_000, DeltaKind.JUMP, 0),
    ("jump-wrap-over-limit", 65_000, 9_000, 16, 1_000, DeltaKind.JUMP, 0),
    ("jump-down-not-reset", 900_000, 500_000, 32, 10_000, DeltaKind.JUMP, 0),
]


@pytest.mark.parametrize(
    ("previous", "current", "width", "max_jump", "kind", "quantity"),
    [pytest.param(*case[1:], id=case[0]) for case in COUNTER_CASES],
)
def test_counter_delta(previous, current, width, max_jump, kind, quantity):
    delta = counter_delta(previous, current, width=width, max_jump=max_jump)
    assert isinstance(delta, CounterDelta)
    assert (delta.kind, delta.quantity) == (kind, quantity)
    assert delta.quantity >= 0
    assert delta.note


@pytest.mark.parametrize(
    ("previous", "current", "width", "max_jump", "field"),
    [
        pytest.param(1, 2, 0, 10_000, "width", id="width-zero"),
        pytest.param(1, 2, 8, 10_000, "width", id="width-8"),
        pytest.param(1, 2, 32, 0, "max_jump", id="max-jump-zero"),
        pytest.param(1, -1, 32, 10_000, "current", id="current-negative"),
        pytest.param(1, U16, 16, 10_000, "current", id="current-out-of-range-16"),
        pytest.param(1, U32, 32, 10_000, "current", id="current-out-of-range-32"),
        pytest.param(1, 2.0, 32, 10_000, "current", id="current-float"),
        pytest.param(U16, 1, 16, 10_000, "previous", id="previous-out-of-range"),
        pytest.param(-5, 1, 32, 10_000, "previous", id="previous-negative"),
    ],
)
def test_counter_delta_invalid(previous, current, width, max_jump, field):
    with pytest.raises(InvalidArgument) as exc:
        counter_delta(previous, current, width=width, max_jump=max_jump)
    assert [v.field for v in exc.value.violations] == [field]


@pytest.mark.parametrize(
    ("width", "max_jump", "expected"),
    [
        pytest.param(0, 0, (32, 10_000), id="defaults"),
        pytest.param(16, 500, (16, 500), id="explicit"),
    ],
)
def test_resolve_counter_settings(width, max_jump, expected):
    assert resolve_counter_settings(width, max_jump) == expected


# --------------------------------------------------------------------------------------------------------------
# Order state machine
# --------------------------------------------------------------------------------------------------------------

S, A = OrderState, OrderAction
LEGAL = {
    (S.PLANNED, A.START): S.IN_PROGRESS,
    (S.IN_PROGRESS, A.PAUSE): S.PAUSED,
    (S.PAUSED, A.RESUME): S.IN_PROGRESS,
    (S.IN_PROGRESS, A.COMPLETE): S.COMPLETED,
    (S.PAUSED, A.COMPLETE): S.COMPLETED,
    (S.PLANNED, A.CANCEL): S.CANCELLED,
    (S.IN_PROGRESS, A.CANCEL): S.CANCELLED,
    (S.PAUSED, A.CANCEL): S.CANCELLED,
}
ALL_PAIRS = list(itertools.product(OrderState, OrderAction))


def test_order_state_numbers_match_proto():
    assert [(s.name, s.value) for s in OrderState] == [
        ("PLANNED", 1),
        ("IN_PROGRESS", 2),
        ("PAUSED", 3),
        ("COMPLETED", 4),
        ("CANCELLED", 5),
    ]


def test_transition_table_matches_spec():
    table = {(frm, action): to for action, moves in TRANSITIONS.items() for frm, to in moves.items()}
    assert table == LEGAL


@pytest.mark.parametrize(
    ("state", "action"),
    [pytest.param(s, a, id=f"{s.name}-{a.value}") for s, a in ALL_PAIRS],
)
def test_transition(state, action):
    if (state, action) in LEGAL:
        assert transition(state, action, subject="orders/42") is LEGAL[state, action]
        return
    with pytest.raises(FailedPrecondition) as exc:
        transition(state, action, subject="orders/42")
    description = f"cannot {action.value} an order that is {state.name}"
    assert exc.value.reason == "ORDER_STATE_INVALID"
    assert exc.value.message == description
    assert exc.value.violations == [
        PreconditionViolation(type="ORDER_STATE", subject="orders/42", description=description)
    ]


@pytest.mark.parametrize(
    ("state", "action", "expected"),
    [
        pytest.param(1, "start", S.IN_PROGRESS, id="raw-int-and-str"),
        pytest.param(S.PAUSED, "resume", S.IN_PROGRESS, id="str-action"),
    ],
)
def test_transition_accepts_raw_values(state, action, expected):
    assert transition(state, action) is expected


@pytest.mark.parametrize(
    ("state", "action", "field"),
    [
        pytest.param(0, "start", "state", id="unspecified-state"),
        pytest.param(S.PLANNED, "launch", "action", id="unknown-action"),
    ],
)
def test_transition_invalid_input(state, action, field):
    with pytest.raises(InvalidArgument) as exc:
        transition(state, action)
    assert exc.value.violations[0].field == field


@pytest.mark.parametrize(
    ("good", "planned", "expected"),
    [
        pytest.param(0, 100, False, id="nothing-made"),
        pytest.param(99, 100, False, id="one-short"),
        pytest.param(100, 100, True, id="reached"),
        pytest.param(130, 100, True, id="exceeded"),
        pytest.param(5, 0, False, id="no-plan"),
    ],
)
def test_should_auto_complete(good, planned, expected):
    assert should_auto_complete(good, planned) is expected


# --------------------------------------------------------------------------------------------------------------
# Machine state and downtime
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(MachineState.RUNNING, True, id="running"),
        pytest.param(1, True, id="one"),
        pytest.param(1.0, True, id="one-float"),
        pytest.param(True, True, id="bool-true"),
        pytest.param(MachineState.STOPPED, False, id="stopped"),
        pytest.param(MachineState.FAULT, False, id="fault"),
        pytest.param(7, False, id="unknown-value"),
    ],
)
def test_is_running(value, expected):
    assert is_running(value) is expected


@pytest.mark.parametrize(
    ("previous", "running", "expected"),
    [
        pytest.param(None, True, None, id="first-running"),
        pytest.param(None, False, "open", id="first-stopped"),
        pytest.param(True, False, "open", id="stops"),
        pytest.param(False, True, "close", id="starts"),
        pytest.param(True, True, None, id="keeps-running"),
        pytest.param(False, False, None, id="stays-stopped"),
    ],
)
def test_downtime_transition(previous, running, expected):
    assert downtime_transition(previous, running) == expected


# --------------------------------------------------------------------------------------------------------------
# OEE
# --------------------------------------------------------------------------------------------------------------


def test_compute_oee_hand_computed_shift():
    # 8 h shift, 1 h down, ideal cycle 1 s, 24,000 parts of which 23,000 good.
    oee = compute_oee(
        planned_time_s=28_800, downtime_s=3_600, ideal_cycle_time_s=1.0, total_count=24_000, good_count=23_000
    )
    assert oee.run_time_s == 25_200  # 28,800 - 3,600
    assert oee.availability == pytest.approx(0.875)  # 25,200 / 28,800
    assert oee.performance == pytest.approx(0.9523809523809523)  # 1.0 * 24,000 / 25,200
    assert oee.quality == pytest.approx(0.9583333333333334)  # 23,000 / 24,000
    assert oee.oee == pytest.approx(0.7986111111111112)  # 0.875 * 0.95238 * 0.95833
    assert (oee.planned_time_s, oee.downtime_s, oee.ideal_cycle_time_s) == (28_800, 3_600, 1.0)
    assert (oee.total_count, oee.good_count) == (24_000, 23_000)


@pytest.mark.parametrize(
    ("planned", "down", "cycle", "total", "good", "expected"),
    [
        # expected: (run_time_s, availability, performance, quality, oee)
        pytest.param(0, 0, 1.0, 0, 0, (0.0, 0.0, 0.0, 1.0, 0.0), id="nothing-planned"),
        pytest.param(0, 0, 1.0, 10, 10, (0.0, 0.0, 0.0, 1.0, 0.0), id="parts-without-plan"),
        pytest.param(3_600, 3_600, 1.0, 0, 0, (0.0, 0.0, 0.0, 1.0, 0.0), id="down-all-shift"),
        pytest.param(3_600, 5_000, 1.0, 0, 0, (0.0, 0.0, 0.0, 1.0, 0.0), id="downtime-exceeds-plan"),
        pytest.param(3_600, 0, 1.0, 0, 0, (3_600.0, 1.0, 0.0, 1.0, 0.0), id="ran-but-no-parts"),
        pytest.param(3_600, 0, 1.0, 100, 0, (3_600.0, 1.0, 100 / 3_600, 0.0, 0.0), id="all-scrap"),
        pytest.param(100, 0, 2.0, 100, 100, (100.0, 1.0, 2.0, 1.0, 2.0), id="performance-above-one-unclamped"),
    ],
)
def test_compute_oee_edge_cases(planned, down, cycle, total, good, expected):
    oee = compute_oee(
        planned_time_s=planned, downtime_s=down, ideal_cycle_time_s=cycle, total_count=total, good_count=good
    )
    assert (oee.run_time_s, oee.availability, oee.performance, oee.quality, oee.oee) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"planned_time_s": -1}, "planned_time_s", id="negative-planned"),
        pytest.param({"downtime_s": math.nan}, "downtime_s", id="nan-downtime"),
        pytest.param({"ideal_cycle_time_s": math.inf}, "ideal_cycle_time_s", id="inf-cycle"),
        pytest.param({"total_count": -3}, "total_count", id="negative-total"),
        pytest.param({"good_count": 11}, "good_count", id="good-exceeds-total"),
    ],
)
def test_compute_oee_invalid(kwargs, field):
    args = {"planned_time_s": 100, "downtime_s": 0, "ideal_cycle_time_s": 1.0, "total_count": 10, "good_count": 10}
    with pytest.raises(InvalidArgument) as exc:
        compute_oee(**(args | kwargs))
    assert [v.field for v in exc.value.violations] == [field]


T0 = datetime(2025, 3, 3, 6, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("intervals", "now_min", "expected_s"),
    [
        pytest.param([], 480, 0, id="no-downtime"),
        pytest.param([(at(10), at(20))], 480, 600, id="single-inside"),
        pytest.param([(at(10), at(30)), (at(20), at(40))], 480, 1_800, id="overlapping-merged"),
        pytest.param([(at(10), at(40)), (at(15), at(20))], 480, 1_800, id="contained-merged"),
        pytest.param([(at(10), at(20)), (at(20), at(30))], 480, 1_200, id="touching"),
        pytest.param([(at(10), at(20)), (at(50), at(60))], 480, 1_200, id="disjoint"),
        pytest.param([(at(-30), at(10))], 480, 600, id="starts-before-window"),
        pytest.param([(at(470), at(500))], 600, 600, id="ends-after-window"),
        pytest.param([(at(-60), at(-10)), (at(490), at(520))], 600, 0, id="outside-window"),
        pytest.param([(at(100), None)], 130, 1_800, id="open-ends-now"),
        pytest.param([(at(470), None)], 600, 600, id="open-clipped-to-window"),
        pytest.param([(at(200), None)], 150, 0, id="open-starts-after-now"),
        pytest.param([(at(100), None), (at(110), at(120))], 130, 1_800, id="open-overlapping-closed"),
        pytest.param([(at(30), at(20))], 480, 0, id="inverted-interval"),
    ],
)
def test_overlap_seconds(intervals, now_min, expected_s):
    # The window is the 8 h shift 06:00-14:00.
    assert overlap_seconds(intervals, at(0), at(480), at(now_min)) == expected_s


def test_overlap_seconds_inverted_window():
    with pytest.raises(InvalidArgument):
        overlap_seconds([], at(10), at(0), at(20))
