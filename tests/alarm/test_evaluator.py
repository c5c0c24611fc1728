"""Table-driven tests of the pure evaluator and the lifecycle, on a fake clock (times are seconds, passed in).

Each case is a rule and a series of (time, value) readings, or ("tick", time) steps, and the transitions
expected: (time, "raise" | "clear")."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fabrica_svc.alarm import lifecycle as lc
from fabrica_svc.alarm.evaluator import (BAND, EQUAL, EWMA, GREATER, GREATER_OR_EQUAL, LESS, LESS_OR_EQUAL, NO_DATA,
                                         NOT_EQUAL, NS, RATE, TARGET_PLC, TARGET_ROLE, TARGET_TAG, THRESHOLD,
                                         Condition, Evaluator, Evaluators, InstanceState, Rule, Sample,
                                         template_errors)
from fabrica_svc.runtime.errors import FailedPrecondition

BAD = object()  # a bad-quality reading


def rule(condition: Condition, **kw: object) -> Rule:
    base = Rule(id="r", condition=condition, target_kind=TARGET_TAG, plc_id="p", tag_id=1, display_name="R",
                severity=3)
    return replace(base, **kw)  # type: ignore[arg-type]


def run(r: Rule, steps: list[tuple]) -> list[tuple[float, str]]:
    ev = Evaluator.build([r])
    out = []
    for step in steps:
        if step[0] == "tick":
            transitions = ev.tick(int(step[1] * NS))
        else:
            t, value = step
            good = value is not BAD
            transitions = ev.evaluate(Sample(1, "p", int(t * NS), good, value if good else None))
        out += [(tr.time_ns / NS, "raise" if tr.raised else "clear") for tr in transitions]
    return out


def gt(threshold: float) -> Condition:
    return Condition(THRESHOLD, comparison=GREATER, threshold=threshold)


CASES = {
    # comparisons
    "greater raises above, clears at or below": (
        rule(gt(80)), [(0, 70), (1, 80), (2, 81), (3, 90), (4, 80), (5, 85)],
        [(2, "raise"), (4, "clear"), (5, "raise")]),
    "less": (rule(Condition(THRESHOLD, comparison=LESS, threshold=10)), [(0, 11), (1, 10), (2, 9.9), (3, 10)],
             [(2, "raise"), (3, "clear")]),
    "greater or equal": (rule(Condition(THRESHOLD, comparison=GREATER_OR_EQUAL, threshold=5)),
                         [(0, 4), (1, 5), (2, 4.99)], [(1, "raise"), (2, "clear")]),
    "less or equal": (rule(Condition(THRESHOLD, comparison=LESS_OR_EQUAL, threshold=5)),
                      [(0, 6), (1, 5), (2, 5.01)], [(1, "raise"), (2, "clear")]),
    "equal on ints": (rule(Condition(THRESHOLD, comparison=EQUAL, threshold=3)), [(0, 2), (1, 3), (2, 4)],
                      [(1, "raise"), (2, "clear")]),
    "not equal": (rule(Condition(THRESHOLD, comparison=NOT_EQUAL, threshold=1)), [(0, 1), (1, 0), (2, 1)],
                  [(1, "raise"), (2, "clear")]),
    "bool threshold on a bool tag": (rule(Condition(THRESHOLD, comparison=EQUAL, threshold=True)),
                                     [(0, False), (1, True), (2, True), (3, False)], [(1, "raise"), (3, "clear")]),
    "bool threshold ignores numbers": (rule(Condition(THRESHOLD, comparison=EQUAL, threshold=True)),
                                       [(0, 1), (1, 1.0)], []),
    "strings are no opinion": (rule(gt(1)), [(0, "abc"), (1, b"\x01")], []),
    "bad quality holds the state": (rule(gt(80)), [(0, 90), (1, BAD), (2, BAD), (3, 70)],
                                    [(0, "raise"), (3, "clear")]),
    # deadband
    "deadband: clears only past threshold - deadband": (
        rule(gt(80), deadband=2), [(0, 81), (1, 79), (2, 78.5), (3, 78), (4, 80.5)],
        [(0, "raise"), (3, "clear"), (4, "raise")]),
    "deadband on less: clears at threshold + deadband": (
        rule(Condition(THRESHOLD, comparison=LESS, threshold=10), deadband=1), [(0, 9), (1, 10.5), (2, 11)],
        [(0, "raise"), (2, "clear")]),
    "deadband does not delay the raise": (rule(gt(80), deadband=5), [(0, 79), (1, 80.1)], [(1, "raise")]),
    # on-delay / off-delay, measured between read times
    "on-delay: must hold 5 s": (rule(gt(80), on_delay_ns=5 * NS), [(0, 90), (3, 90), (5, 90), (6, 70)],
                                [(5, "raise"), (6, "clear")]),
    "on-delay: a dip restarts it": (rule(gt(80), on_delay_ns=5 * NS), [(0, 90), (3, 70), (4, 90), (8, 90), (9, 90)],
                                    [(9, "raise")]),
    "off-delay: must be gone 3 s": (rule(gt(80), off_delay_ns=3 * NS), [(0, 90), (1, 70), (2, 90), (3, 70), (5, 70),
                                                                         (6, 70)],
                                    [(0, "raise"), (6, "clear")]),
    "on-delay completed by the clock without a reading": (
        rule(gt(80), on_delay_ns=5 * NS), [(0, 90), ("tick", 4), ("tick", 5.5), (6, 90)], [(5, "raise")]),
    "off-delay completed by the clock": (rule(gt(80), off_delay_ns=2 * NS), [(0, 90), (1, 70), ("tick", 2.5), ("tick", 3.5)],
                                         [(0, "raise"), (3, "clear")]),
    "deadband with delays": (rule(gt(80), deadband=2, on_delay_ns=2 * NS, off_delay_ns=2 * NS),
                             [(0, 81), (2, 81), (3, 79), (4, 77), (5, 79), (6, 77), (8, 77)], [(2, "raise"), (8, "clear")]),
    # band
    "band: outside [low, high] inclusive": (rule(Condition(BAND, low=10, high=20)),
                                            [(0, 10), (1, 20), (2, 20.5), (3, 15), (4, 9.9)],
                                            [(2, "raise"), (3, "clear"), (4, "raise")]),
    "band with deadband": (rule(Condition(BAND, low=10, high=20), deadband=1),
                           [(0, 21), (1, 19.5), (2, 19), (3, 9), (4, 10.5), (5, 11)],
                           [(0, "raise"), (2, "clear"), (3, "raise"), (5, "clear")]),
    # rate of change per minute
    "rate: 10/min limit": (rule(Condition(RATE, max_per_minute=10)),
                           [(0, 0), (60, 5), (120, 20), (180, 25), (240, 10)],
                           [(120, "raise"), (180, "clear"), (240, "raise")]),
    "rate ignores bools and needs two readings": (rule(Condition(RATE, max_per_minute=1)), [(0, True), (1, 100)], []),
    # EWMA deviation
    "ewma: a jump beyond k sd after warm-up": (
        rule(Condition(EWMA, alpha=0.2, k=3, warmup_samples=5)),
        [(0, 10), (1, 11), (2, 10), (3, 11), (4, 10), (5, 30), (6, 10.5)], [(5, "raise"), (6, "clear")]),
    "ewma: no raise during warm-up": (rule(Condition(EWMA, alpha=0.2, k=3, warmup_samples=5)),
                                      [(0, 10), (1, 100), (2, 10)], []),
    # no data
    "no data: bad-quality heartbeats raise timeout after the first": (
        rule(Condition(NO_DATA, timeout_ns=10 * NS)), [(0, 1), (5, BAD), (10, BAD), (14, BAD), (15, BAD), (17, 2)],
        [(15, "raise"), (17, "clear")]),
    "no data: the clock raises timeout after the first bad reading": (
        rule(Condition(NO_DATA, timeout_ns=10 * NS)), [(0, 1), (5, BAD), ("tick", 14), ("tick", 15.5)],
        [(15, "raise")]),
    "no data: silence raises on the clock at last reading + timeout": (
        rule(Condition(NO_DATA, timeout_ns=10 * NS)), [(0, 1), ("tick", 9), ("tick", 15), ("tick", 20), (21, 1)],
        [(10, "raise"), (21, "clear")]),
    "no data: a steady value refreshed by integrity reports never raises": (
        rule(Condition(NO_DATA, timeout_ns=10 * NS)), [(0, 1), (8, 1), (16, 1), ("tick", 17), ("tick", 25.9),
                                                       ("tick", 26.5)],
        [(26, "raise")]),
    "no data: a good reading ends a bad spell": (
        rule(Condition(NO_DATA, timeout_ns=10 * NS)), [(0, 1), (5, BAD), (9, 1), (14, BAD), ("tick", 19)],
        []),
    "no data: a tag that never reports raises from the rule's start": (
        rule(Condition(NO_DATA, timeout_ns=10 * NS), since_ns=100 * NS), [("tick", 105), ("tick", 111)],
        [(110, "raise")]),
    "no data with an on-delay": (
        rule(Condition(NO_DATA, timeout_ns=10 * NS), on_delay_ns=5 * NS), [(0, 1), ("tick", 12), ("tick", 15)],
        [(15, "raise")]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_condition_evaluation(name: str) -> None:
    r, steps, expected = CASES[name]
    assert run(r, steps) == expected


def test_targets_match_one_tag_a_plc_or_a_role() -> None:
    cond = gt(0)
    rules = [rule(cond, id="one", tag_id=7), rule(cond, id="plc", target_kind=TARGET_PLC, plc_id="p2"),
             rule(cond, id="role", target_kind=TARGET_ROLE, role=1, plc_id=""),
             rule(cond, id="role-p1", target_kind=TARGET_ROLE, role=1, plc_id="p1")]
    ev = Evaluator.build(rules)

    def ids(tag: int, plc: str, role: int) -> list[str]:
        return [t.rule_id for t in ev.evaluate(Sample(tag, plc, 0, True, 5.0, role=role))]

    assert ids(7, "p1", 1) == ["one", "role", "role-p1"]
    assert ids(8, "p2", 2) == ["plc"]
    assert ids(9, "p3", 1) == ["role"]
    assert ids(7, "p1", 1) == []  # active already


def test_a_reading_meets_the_rules_of_its_own_tenant_only() -> None:
    """Two tenants with the same rule id on the same tag id (tag and rule ids are a tenant's): each reading
    is evaluated against its tenant's rules; a tenant without rules evaluates nothing; states stay apart."""
    acme, bolt = rule(gt(80), tenant="acme"), rule(gt(50), tenant="bolt")
    stored = InstanceState(active=True, value=99.0)  # bolt's instance is active already (loaded as stored)
    ev = Evaluators.build([acme, bolt], {("bolt", "r", 1): stored})
    assert sorted(ev.by_tenant) == ["acme", "bolt"] and ev.rule_count == 2
    (t,) = ev.evaluate(Sample(1, "p", 0, True, 90.0, tenant="acme"))
    assert (t.tenant, t.rule_id, t.raised) == ("acme", "r", True)
    assert [x.raised for x in ev.evaluate(Sample(1, "p", 1, True, 60.0, tenant="acme"))] == [False]  # < 80
    assert ev.evaluate(Sample(1, "p", 2, True, 60.0, tenant="bolt")) == []  # bolt: active already, above 50
    (cleared,) = ev.evaluate(Sample(1, "p", 3, True, 10.0, tenant="bolt"))
    assert (cleared.tenant, cleared.raised) == ("bolt", False)
    assert ev.evaluate(Sample(1, "p", 4, True, 1000.0, tenant="cobalt")) == []  # no rules: nothing
    dirty = ev.take_dirty()
    assert sorted(dirty) == ["acme", "bolt"] and list(dirty["acme"]) == [("r", 1)]
    assert ev.take_dirty() == {}


def test_disabled_rules_evaluate_nothing_and_states_round_trip_through_json() -> None:
    r = rule(gt(80), deadband=1, message_template="{tag} at {value} {unit} ({severity})")
    ev = Evaluator.build([r, replace(r, id="off", enabled=False)])
    (t,) = ev.evaluate(Sample(1, "p", 0, True, 90.5, tag_name="temp", unit="°C"))
    assert t.message == "temp at 90.5 °C (high)" and t.rule_id == "r"
    state = ev.take_dirty()[("r", 1)]
    again = Evaluator.build([r], {("r", 1): InstanceState.from_json(state.to_json())})
    assert again.evaluate(Sample(1, "p", 1, True, 79.5)) == []  # still active: within the deadband
    assert [x.raised for x in again.evaluate(Sample(1, "p", 2, True, 79.0))] == [False]


def test_template_errors() -> None:
    assert template_errors("{tag} = {value} {unit}") == []
    assert "unknown placeholder {foo}" in template_errors("{foo}")[0]
    assert template_errors("{value:>10}") and template_errors("{") and template_errors("{value!r}")


LIFECYCLE = [
    (lc.NORMAL, "raise", lc.ACTIVE_UNACKNOWLEDGED),
    (lc.ACTIVE_UNACKNOWLEDGED, "ack", lc.ACTIVE_ACKNOWLEDGED),
    (lc.ACTIVE_ACKNOWLEDGED, "clear", lc.NORMAL),
    (lc.ACTIVE_UNACKNOWLEDGED, "clear", lc.CLEARED_UNACKNOWLEDGED),
    (lc.CLEARED_UNACKNOWLEDGED, "ack", lc.NORMAL),
    (lc.CLEARED_UNACKNOWLEDGED, "raise", lc.ACTIVE_UNACKNOWLEDGED),
    (lc.ACTIVE_ACKNOWLEDGED, "raise", None),
    (lc.NORMAL, "clear", None),
    (lc.NORMAL, "ack", FailedPrecondition),
    (lc.ACTIVE_ACKNOWLEDGED, "ack", FailedPrecondition),
]


@pytest.mark.parametrize(("state", "action", "expected"), LIFECYCLE)
def test_lifecycle(state: str, action: str, expected: object) -> None:
    if action == "raise":
        assert lc.on_raise(state) == expected
    elif action == "clear":
        assert lc.on_clear(state) == expected
    elif expected is FailedPrecondition:
        with pytest.raises(FailedPrecondition):
            lc.on_acknowledge(state, "alarms/r/1")
    else:
        assert lc.on_acknowledge(state, "alarms/r/1") == expected


def test_shelved_alarms_are_not_annunciated_for_raises_and_clears() -> None:
    assert not lc.is_annunciated(lc.RAISED, shelved=True) and lc.is_annunciated(lc.ACKNOWLEDGED, shelved=True)
    assert lc.is_annunciated(lc.RAISED, shelved=False)
