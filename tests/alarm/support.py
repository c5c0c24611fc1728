"""Helpers of the alarm tests: rules built from the contract's messages, and the demo press PLC in config."""

from __future__ import annotations

from fabrica.alarm.v1 import rule_pb2
from fabrica.config.v1 import config_service_pb2, plc_pb2
from google.protobuf import duration_pb2

from fabrica_svc.collector.demo import demo_plcs


def gt_rule(rule_id: str, plc_id: str, tag_id: int, threshold: float, **kw: object) -> rule_pb2.AlarmRule:
    """A rule: tag `tag_id` of `plc_id` above `threshold`, high severity, enabled (fields in `kw` on top)."""
    rule = rule_pb2.AlarmRule(
        id=rule_id, display_name=f"{rule_id} high", severity=rule_pb2.SEVERITY_HIGH, enabled=True,
        target=rule_pb2.RuleTarget(tag=rule_pb2.TagTarget(plc_id=plc_id, tag_id=tag_id)),
        condition=rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(
            comparison=rule_pb2.COMPARISON_GREATER, number=threshold)),
        message_template="{tag} = {value} {unit}")
    for name, value in kw.items():
        field = getattr(rule, name)
        if hasattr(field, "CopyFrom"):
            field.CopyFrom(value)
        else:
            setattr(rule, name, value)
    return rule


def seconds(s: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(s * 1e9))
    return d


async def create_press(config_stub, collector_id: str = "alarm-test", port: int = 1) -> plc_pb2.Plc:  # noqa: ANN001
    """The demo Modbus press (press-1) in config, pointing at `port`; returns it with its tag ids."""
    press = next(p for p in demo_plcs(collector_id, port, port, port) if p.id == "press-1")
    return (await config_stub.CreatePlc(config_service_pb2.CreatePlcRequest(plc=press))).plc


def tag_named(plc: plc_pb2.Plc, name: str) -> plc_pb2.Tag:
    return next(t for t in plc.tags if t.name == name)
