"""Table-driven tests of the domain rules the service added: counter values, auto-completion by state, and the
cycle time of several items."""

from __future__ import annotations

import pytest

from fabrica_svc.production.domain import (
    OrderState,
    auto_complete_state,
    compute_oee,
    counter_value,
    weighted_ideal_cycle_time,
)
from fabrica_svc.runtime.errors import InvalidArgument


@pytest.mark.parametrize(
    ("value", "width", "expected"),
    [
        pytest.param(5, 16, 5, id="uint"),
        pytest.param(2**16 - 1, 16, 65_535, id="top-16"),
        pytest.param(70_000, 16, 70_000 - 2**16, id="wider-than-declared"),
        pytest.param(-1, 16, 65_535, id="int16-past-32767"),
        pytest.param(-2**31, 32, 2**31, id="int32-min"),
        pytest.param(2**64 - 1, 64, 2**64 - 1, id="top-64"),
        pytest.param(12.0, 32, 12, id="whole-float"),
        pytest.param(12.5, 32, None, id="fraction"),
        pytest.param(float("nan"), 32, None, id="nan"),
        pytest.param(float("inf"), 32, None, id="inf"),
        pytest.param(True, 32, None, id="bool"),
        pytest.param("7", 32, None, id="string"),
    ],
)
def test_counter_value(value: object, width: int, expected: int | None) -> None:
    assert counter_value(value, width) == expected  # type: ignore[arg-type]


def test_counter_value_rejects_a_bad_width() -> None:
    with pytest.raises(InvalidArgument):
        counter_value(1, 8)


@pytest.mark.parametrize(
    ("state", "good", "planned", "expected"),
    [
        (OrderState.IN_PROGRESS, 99, 100, None),
        (OrderState.IN_PROGRESS, 100, 100, OrderState.COMPLETED),
        (OrderState.IN_PROGRESS, 130, 100, OrderState.COMPLETED),
        (OrderState.PAUSED, 100, 100, OrderState.COMPLETED),
        (OrderState.PLANNED, 100, 100, None),
        (OrderState.COMPLETED, 100, 100, None),
        (OrderState.CANCELLED, 500, 100, None),
        (2, 0, 0, None),
    ],
)
def test_auto_complete_state(state: OrderState, good: int, planned: int, expected: OrderState | None) -> None:
    assert auto_complete_state(state, good, planned) == expected


def test_weighted_ideal_cycle_time_feeds_oee() -> None:
    cycle, total = weighted_ideal_cycle_time([(2.0, 6_200), (5.0, 1_800)])
    assert total == 8_000 and cycle * total == pytest.approx(21_400)
    oee = compute_oee(planned_time_s=28_800, downtime_s=3_600, ideal_cycle_time_s=cycle, total_count=total,
                      good_count=7_800)
    assert oee.performance == pytest.approx(21_400 / 25_200)
    assert weighted_ideal_cycle_time([]) == (0.0, 0)
    with pytest.raises(InvalidArgument):
        weighted_ideal_cycle_time([(2.0, -1)])
