"""End to end with a simulated PLC: an S7 device (plcsim.S7Device, whose DB bytes the test writes as a PLC
program would), polled by a real collector, stored by a real ingest, evaluated by a real alarm service, and a
real HTTP receiver on loopback for the webhook.

The motor current is pushed past its limit: the alarm raises and the receiver gets one signed notification;
an operator acknowledges; the current returns and the alarm clears. Each transition is notified exactly
once. Then the PLC stops answering, and its "no data" alarm raises within N seconds plus one poll interval
of the last good reading."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path

import pytest
from fabrica.alarm.v1 import alarm_pb2
from fabrica.alarm.v1 import alarm_service_pb2 as pb
from fabrica.alarm.v1 import notify_pb2, rule_pb2
from fabrica.config.v1 import config_service_pb2
from google.protobuf import duration_pb2

from collector.support import collector_settings
from fabrica_svc.alarm.config import AlarmConfig
from fabrica_svc.alarm.notify.domain import verify_signature
from fabrica_svc.collector.demo import demo_plcs
from fabrica_svc.plcsim import S7Device
from in_process import Server, Servers, settings_for
from procs import wait_for
from webhook_receiver import Receiver

from .support import gt_rule, tag_named

S = alarm_pb2
POLL = 0.2
NO_DATA_SECONDS = 2
#: A steady value is reported again this often: the "no data" timeout must exceed it.
INTEGRITY = 1
SECRET = "a-secret-of-the-receiver"


def current(device: S7Device, amps: float) -> None:
    """The PLC program writes the motor current (DB1.DBD2, REAL, big-endian)."""
    device.set_bytes(1, 2, struct.pack(">f", amps))


async def alarm_state(alarm: Server, rule_id: str) -> int:
    listed = (await alarm.stub.ListAlarms(pb.ListAlarmsRequest(rule_id=rule_id, include_normal=True))).alarms
    return listed[0].state if listed else S.ALARM_STATE_UNSPECIFIED


async def wait_state(alarm: Server, rule_id: str, state: int) -> None:
    async def reached() -> bool:
        return await alarm_state(alarm, rule_id) == state
    await wait_for(reached, timeout=30, what=f"{rule_id} in {S.AlarmState.Name(state)}")


async def all_events(alarm: Server) -> list[alarm_pb2.AlarmEvent]:
    return list((await alarm.stub.ListAlarmEvents(pb.ListAlarmEventsRequest(page_size=1000))).events)[::-1]


@pytest.fixture
async def plant(database_url: str, servers: Servers, tmp_path: Path):  # noqa: ANN201
    config = await servers.start("config", settings_for("config", database_url=database_url))
    ingest = await servers.start("ingest", settings_for("ingest", database_url=database_url))
    alarm = await servers.start("alarm", settings_for("alarm", database_url=database_url, config_addr=config.address,
                                                      ingest_addr=ingest.address),
                                config=AlarmConfig(tick_interval=0.2, live_window=5.0))
    settings = collector_settings(tmp_path, "cell-1", FABRICA_CONFIG_ADDR=config.address,
                                  FABRICA_INGEST_ADDR=ingest.address)
    device = S7Device({1: 14})
    await device.start()
    current(device, 10.0)
    plc = next(p for p in demo_plcs("cell-1", 1, 1, device.port) if p.id == "press-2")
    plc.poll_groups[0].poll_interval.CopyFrom(duration_pb2.Duration(nanos=int(POLL * 1e9)))
    plc.poll_groups[0].integrity_interval.CopyFrom(duration_pb2.Duration(seconds=INTEGRITY))
    plc = (await config.stub.CreatePlc(config_service_pb2.CreatePlcRequest(plc=plc))).plc
    await servers.start("collector", settings.base, config=settings)
    try:
        with Receiver() as receiver:
            yield alarm, device, plc, receiver
    finally:
        await device.stop()


async def test_raise_notify_acknowledge_clear_then_no_data(plant) -> None:  # noqa: ANN001
    alarm, device, plc, receiver = plant
    stub = alarm.stub
    await stub.CreateNotificationTarget(pb.CreateNotificationTargetRequest(target=notify_pb2.NotificationTarget(
        id="ops", url=receiver.url("/hook"), secret=SECRET, enabled=True)))
    amps = tag_named(plc, "press.current")
    await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule(
        "current-high", "press-2", amps.id, 50.0, deadband=5.0, message_template="{tag} at {value} {unit}")))
    silent = gt_rule("press-2-silent", "press-2", amps.id, 0, condition=rule_pb2.Condition(
        no_data=rule_pb2.NoDataCondition(timeout=duration_pb2.Duration(seconds=NO_DATA_SECONDS))))
    await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=silent))
    async def named() -> bool:  # evaluated, with the name the collector reported to ingest: settled
        listed = (await stub.ListAlarms(pb.ListAlarmsRequest(rule_id="current-high", include_normal=True))).alarms
        return bool(listed) and listed[0].tag_name == "press.current" and listed[0].state == S.ALARM_STATE_NORMAL
    await wait_for(named, timeout=30, what="the alarm evaluated, normal, with its tag's name")

    current(device, 80.0)
    await wait_state(alarm, "current-high", S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED)
    (active,) = (await stub.ListAlarms(pb.ListAlarmsRequest())).alarms
    assert active.message == "press.current at 80 A" and active.value.double_value == 80.0
    current(device, 47.0)  # below the limit, within the deadband: still active
    await asyncio.sleep(5 * POLL)
    acked = await stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(rule_id="current-high", tag_id=amps.id,
                                                                   note="checking the motor"))
    assert acked.alarm.state == S.ALARM_STATE_ACTIVE_ACKNOWLEDGED
    current(device, 20.0)
    await wait_state(alarm, "current-high", S.ALARM_STATE_NORMAL)

    # The PLC stops answering: the collector reports communication failures, then nothing good comes.
    await wait_for(lambda: len(receiver.at("/hook")) >= 3, timeout=30, what="three notifications")
    stopped = time.time()
    await device.stop()
    await wait_state(alarm, "press-2-silent", S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED)
    seen_after = time.time() - stopped
    events = await all_events(alarm)
    no_data = next(e for e in events if e.rule_id == "press-2-silent" and e.type == S.ALARM_EVENT_TYPE_RAISED)
    # The alarm's time is the first bad reading + N (the evaluator's verdict on read times); the collector
    # reports the failure at its first poll after the stop, so it is within N + one poll interval of it.
    raised_after = no_data.event_time.ToNanoseconds() / 1e9 - stopped
    assert NO_DATA_SECONDS <= raised_after <= NO_DATA_SECONDS + POLL, \
        f"no data raised {raised_after:.2f} s after the PLC stopped"
    assert not no_data.HasField("value")
    print(f"no data: raised at stop + {raised_after:.2f} s (read times), seen by a client {seen_after:.2f} s after")

    await wait_for(lambda: len(receiver.at("/hook")) >= 4, timeout=30, what="the no-data notification")
    await asyncio.sleep(1.0)  # nothing more may come
    got = receiver.at("/hook")
    assert [e.type for e in events] == [S.ALARM_EVENT_TYPE_RAISED, S.ALARM_EVENT_TYPE_ACKNOWLEDGED,
                                        S.ALARM_EVENT_TYPE_CLEARED, S.ALARM_EVENT_TYPE_RAISED]
    keys = [r.headers["Idempotency-Key"] for r in got]
    assert keys == [f"alarm-event-{e.id}" for e in events], "one notification per transition, in order"
    for r in got:
        assert verify_signature(SECRET, r.headers["Fabrica-Timestamp"], r.headers["Fabrica-Signature"], r.body,
                                now=time.time())
    bodies = [json.loads(r.body) for r in got]
    assert [b["event_type"] for b in bodies] == ["alarm.raised", "alarm.acknowledged", "alarm.cleared",
                                                 "alarm.raised"]
    assert bodies[0]["event"]["value"]["double_value"] == 80.0 and bodies[1]["event"]["note"] == "checking the motor"
    target = (await stub.GetNotificationTarget(pb.GetNotificationTargetRequest(id="ops"))).target
    assert target.pending_deliveries == 0 and target.HasField("last_delivery_time") and not target.secret
    deliveries = (await stub.ListDeliveries(pb.ListDeliveriesRequest(target_id="ops"))).deliveries
    assert sorted(d.idempotency_key for d in deliveries) == sorted(keys)
    assert all(d.state == notify_pb2.DELIVERY_STATE_DELIVERED for d in deliveries)
