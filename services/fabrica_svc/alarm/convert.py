"""Contract messages ⇄ the evaluator's and the store's plain values. No SQL, no rules."""

from __future__ import annotations

from typing import Any

from fabrica.alarm.v1 import alarm_pb2, rule_pb2
from fabrica.common.v1 import reading_pb2

from ..runtime.timefmt import set_timestamp
from . import evaluator as ev
from .store import AlarmRow, EventRow

_OUTPUT_ONLY = ("etag", "create_time", "update_time")


def without_output_only(rule: rule_pb2.AlarmRule) -> rule_pb2.AlarmRule:
    out = rule_pb2.AlarmRule()
    out.CopyFrom(rule)
    for name in _OUTPUT_ONLY:
        out.ClearField(name)
    return out


def _ns(duration: Any) -> int:
    return duration.seconds * ev.NS + duration.nanos


def condition_of(msg: rule_pb2.Condition) -> ev.Condition:
    kind = msg.WhichOneof("kind")
    if kind == "threshold":
        t = msg.threshold
        threshold: float | bool = t.flag if t.WhichOneof("threshold") == "flag" else t.number
        return ev.Condition(ev.THRESHOLD, comparison=rule_pb2.Comparison.Name(t.comparison).removeprefix("COMPARISON_"),
                            threshold=threshold)
    if kind == "band":
        return ev.Condition(ev.BAND, low=msg.band.low, high=msg.band.high)
    if kind == "rate":
        return ev.Condition(ev.RATE, max_per_minute=msg.rate.max_per_minute)
    if kind == "ewma":
        return ev.Condition(ev.EWMA, alpha=msg.ewma.alpha, k=msg.ewma.k, warmup_samples=msg.ewma.warmup_samples)
    return ev.Condition(ev.NO_DATA, timeout_ns=_ns(msg.no_data.timeout))


def rule_of(msg: rule_pb2.AlarmRule, revision: int = 0, since_ns: int = 0,
            tenant: str = ev.DEFAULT_TENANT) -> ev.Rule:
    """The evaluator's rule from a (valid) AlarmRule of `tenant`."""
    target = msg.target
    kind = target.WhichOneof("kind")
    plc_id, tag_id, role = "", 0, 0
    if kind == "tag":
        plc_id, tag_id = target.tag.plc_id, target.tag.tag_id
    elif kind == "plc":
        plc_id = target.plc.plc_id
    else:
        plc_id, role = target.role.plc_id, target.role.role
    return ev.Rule(
        id=msg.id, condition=condition_of(msg.condition), target_kind=kind or ev.TARGET_TAG, plc_id=plc_id,
        tag_id=tag_id, role=role, display_name=msg.display_name, severity=msg.severity, deadband=msg.deadband,
        on_delay_ns=_ns(msg.on_delay), off_delay_ns=_ns(msg.off_delay), message_template=msg.message_template,
        enabled=msg.enabled, revision=revision, since_ns=since_ns, tenant=tenant)


_GOOD = reading_pb2.QUALITY_GOOD


def sample_of(reading: reading_pb2.Reading, name_unit: tuple[str, str] | None = None,
              tenant: str = ev.DEFAULT_TENANT) -> ev.Sample:
    """The evaluator's sample of a reading of `tenant`; `name_unit` replaces the reading's tag name and unit when
    given. (On the evaluation's path for every reading: kept to plain attribute reads.)"""
    t = reading.read_time
    value = reading.value
    kind = value.WhichOneof("kind")  # an unset value has no kind either
    name, unit = name_unit if name_unit is not None else (reading.tag_name, reading.unit)
    return ev.Sample(reading.tag_id, reading.plc_id, t.seconds * ev.NS + t.nanos, reading.quality == _GOOD,
                     None if kind is None else getattr(value, kind), reading.role, name, unit, tenant)


def python_value(value: reading_pb2.Value) -> ev.Value:
    kind = value.WhichOneof("kind")
    return None if kind is None else getattr(value, kind)


# The stored form of a value: {"bool": true}, {"int": 3}, {"uint": 3}, {"double": 1.5}, {"string": ".."},
# {"bytes": "<hex>"}; None for no value.

def stored_value(value: ev.Value) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value} if value < 2**63 else {"uint": value}
    if isinstance(value, float):
        return {"double": value if value == value and abs(value) != float("inf") else str(value)}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    return {"string": str(value)}


def value_message(stored: dict[str, Any] | None, target: reading_pb2.Value) -> None:
    if not stored:
        return
    ((kind, v),) = stored.items()
    if kind == "bool":
        target.bool_value = v
    elif kind == "int":
        target.int_value = v
    elif kind == "uint":
        target.uint_value = v
    elif kind == "double":
        target.double_value = float(v)
    elif kind == "bytes":
        target.bytes_value = bytes.fromhex(v)
    else:
        target.string_value = v


def alarm_message(a: AlarmRow) -> alarm_pb2.Alarm:
    msg = alarm_pb2.Alarm(
        rule_id=a.rule_id, tag_id=a.tag_id, plc_id=a.plc_id, tag_name=a.tag_name, severity=a.severity,
        state=alarm_pb2.AlarmState.Value(f"ALARM_STATE_{a.state}"), message=a.message,
        acknowledged_by=a.acknowledged_by, acknowledge_note=a.acknowledge_note, etag=f"a{a.revision}")
    if a.value is not None:
        value_message(a.value, msg.value)
    set_timestamp(msg.raise_time, a.raise_time)
    set_timestamp(msg.state_time, a.state_time)
    set_timestamp(msg.shelved_until, a.shelved_until)
    return msg


def event_message(e: EventRow) -> alarm_pb2.AlarmEvent:
    msg = alarm_pb2.AlarmEvent(
        id=e.id, type=alarm_pb2.AlarmEventType.Value(f"ALARM_EVENT_TYPE_{e.type}"), rule_id=e.rule_id,
        tag_id=e.tag_id, plc_id=e.plc_id, tag_name=e.tag_name, severity=e.severity,
        previous_state=alarm_pb2.AlarmState.Value(f"ALARM_STATE_{e.previous_state}"),
        state=alarm_pb2.AlarmState.Value(f"ALARM_STATE_{e.state}"), message=e.message, actor=e.actor, note=e.note)
    msg.event_time.FromDatetime(e.event_time)
    if e.value is not None:
        value_message(e.value, msg.value)
    return msg


def state_name(state: int) -> str:
    return alarm_pb2.AlarmState.Name(state).removeprefix("ALARM_STATE_")
