"""Helpers of the alarm tests: rules built from the contract's messages, the demo press PLC in config, and a
committed-readings feed of the tests' own (`TenantFeed`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fabrica.alarm.v1 import rule_pb2
from fabrica.config.v1 import config_service_pb2, plc_pb2
from google.protobuf import duration_pb2

from fabrica_svc.alarm.evaluation import ReadingsMessage
from fabrica_svc.alarm.evaluator import NS, Sample
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


class TenantFeed:
    """A committed-readings source (evaluation.ReadingSource): messages of readings of any tenants, resumable
    from a cursor, as ingest's installation-wide feed gives them."""

    def __init__(self) -> None:
        self.messages: list[ReadingsMessage] = []
        self.changed = asyncio.Condition()
        self.t_ns = int((time.time() - 100) * NS)

    async def send(self, tenant: str, value: float, tag_id: int = 1, plc_id: str = "plc-1") -> None:
        self.t_ns += NS
        message = ReadingsMessage(len(self.messages) + 1, [Sample(tag_id, plc_id, self.t_ns, True, float(value),
                                                                  tenant=tenant)])
        async with self.changed:
            self.messages.append(message)
            self.changed.notify_all()

    async def source(self, after_cursor: int) -> AsyncIterator[ReadingsMessage]:
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.messages) > after_cursor)
                pending = self.messages[after_cursor:]
            for message in pending:
                yield message
                after_cursor = message.cursor
