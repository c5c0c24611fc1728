"""The demo alarm rules `fabrica run` creates (through the gRPC API, like any client), on the simulated press:

* ``press-1-oil-hot``: the hydraulic oil temperature above 66.5 °C (the simulated press runs at about 66 °C
  with a slow ripple, so it raises and clears now and then), a 0.3 °C deadband and a 5 s on-delay, medium;
* ``press-1-silent``: no good reading of the oil temperature for 90 s (longer than the demo poll group's
  60 s integrity interval, so a steady value never raises it; stop the collector to see it raise), high.

Calling it again (a restart on the same data folder) leaves rules that exist as they are.
"""

from __future__ import annotations

import grpc
from fabrica.alarm.v1 import alarm_service_pb2 as pb
from fabrica.alarm.v1 import alarm_service_pb2_grpc as pb_grpc
from fabrica.alarm.v1 import rule_pb2
from google.protobuf import duration_pb2


def demo_rules(plc_id: str, temperature_tag_id: int) -> list[rule_pb2.AlarmRule]:
    target = rule_pb2.RuleTarget(tag=rule_pb2.TagTarget(plc_id=plc_id, tag_id=temperature_tag_id))
    return [
        rule_pb2.AlarmRule(
            id=f"{plc_id}-oil-hot", display_name="Press 1 oil temperature high", target=target,
            condition=rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(
                comparison=rule_pb2.COMPARISON_GREATER, number=66.5)),
            severity=rule_pb2.SEVERITY_MEDIUM, deadband=0.3, on_delay=duration_pb2.Duration(seconds=5),
            message_template="{tag} at {value} {unit} (above 66.5 {unit})", enabled=True),
        rule_pb2.AlarmRule(
            id=f"{plc_id}-silent", display_name="Press 1 silent", target=target,
            condition=rule_pb2.Condition(no_data=rule_pb2.NoDataCondition(timeout=duration_pb2.Duration(seconds=90))),
            severity=rule_pb2.SEVERITY_HIGH, message_template="no good reading of {tag} on {plc} for 90 s",
            enabled=True),
    ]


async def create_demo_rules(stub: pb_grpc.AlarmServiceStub, plc_id: str, temperature_tag_id: int) -> list[str]:
    """Create the demo rules that do not exist yet; their ids."""
    ids = []
    for rule in demo_rules(plc_id, temperature_tag_id):
        try:
            await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=rule))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        ids.append(rule.id)
    return ids
