"""The ISA-18.2 lifecycle end to end through real services: readings streamed into a real ingest, evaluated by
a real alarm service from ingest's committed-readings feed; operators acknowledge and shelve; a disabled rule
suppresses; WatchAlarms sends a snapshot, then each change, and resumes from its cursor."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from fabrica.alarm.v1 import alarm_pb2
from fabrica.alarm.v1 import alarm_service_pb2 as pb
from fabrica.alarm.v1 import rule_pb2
from fabrica.common.v1 import reading_pb2
from google.protobuf import field_mask_pb2

from fabrica_svc.runtime.principal import INSECURE
from in_process import Server, Servers, settings_for
from ingest.support import batch, reading, stream_batches
from procs import wait_for

from .support import gt_rule, seconds

S = alarm_pb2
US = 1_000_000


@pytest.fixture
async def stack(database_url: str, servers: Servers) -> tuple[Server, Server]:
    ingest = await servers.start("ingest", settings_for("ingest", database_url=database_url))
    alarm = await servers.start("alarm", settings_for("alarm", database_url=database_url,
                                                      ingest_addr=ingest.address))
    return ingest, alarm


class Feed:
    """Sends readings of tag 1 of plc-1 to ingest as collector c1, one batch each, at increasing times."""

    def __init__(self, ingest: Server, t0_us: int | None = None):
        self.stub = ingest.stub
        self.sequence = 0
        self.t_us = t0_us or int((time.time() - 100) * US)  # in the past: before the operators act

    async def send(self, *values: float, tag_id: int = 1) -> None:
        batches = []
        for v in values:
            self.sequence += 1
            self.t_us += US
            batches.append(batch("c1", self.sequence, [reading(tag_id, self.t_us, float(v))]))
        await stream_batches(self.stub, "c1", batches)


async def events(alarm: Server, **filters: object) -> list[alarm_pb2.AlarmEvent]:
    out, token = [], ""
    while True:
        page = await alarm.stub.ListAlarmEvents(pb.ListAlarmEventsRequest(page_size=3, page_token=token, **filters))
        out += page.events
        if not (token := page.next_page_token):
            return out[::-1]  # oldest first


async def state_of(alarm: Server, rule_id: str = "hot", tag_id: int = 1) -> int:
    page = await alarm.stub.ListAlarms(pb.ListAlarmsRequest(rule_id=rule_id, include_normal=True))
    return next((a.state for a in page.alarms if a.tag_id == tag_id), S.ALARM_STATE_UNSPECIFIED)


async def wait_state(alarm: Server, state: int, **kw: object) -> None:
    async def reached() -> bool:
        return await state_of(alarm, **kw) == state
    await wait_for(reached, timeout=15)


async def test_raise_acknowledge_clear_and_cleared_unacknowledged(stack: tuple[Server, Server]) -> None:
    ingest, alarm = stack
    rule = (await alarm.stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, 80)))).rule
    feed = Feed(ingest)
    await feed.send(70, 75, 90)
    await wait_state(alarm, S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED)
    (active,) = (await alarm.stub.ListAlarms(pb.ListAlarmsRequest())).alarms
    assert active.value.double_value == 90 and active.message == "tag 1 = 90" and active.plc_id == "plc-1"
    # The evaluation lag (fabrica_tag_events_lag{consumer="alarm"}): the feed's readings are ~100 s old.
    (lag,) = alarm.host.app.evaluation.lag.observe()
    assert lag.attributes == {"consumer": "alarm"} and 90 <= lag.value <= 3600, lag
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alarm.stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(rule_id="hot", tag_id=1, etag="a999"))
    assert err.value.code() == grpc.StatusCode.ABORTED
    acked = await alarm.stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(rule_id="hot", tag_id=1, note="on it",
                                                                         etag=active.etag))
    # Who acknowledged is the caller's principal (runtime/principal.actor()): here the development principal,
    # as these in-process servers run with authentication off.
    assert acked.alarm.state == S.ALARM_STATE_ACTIVE_ACKNOWLEDGED and acked.event.actor == INSECURE.subject
    assert acked.alarm.acknowledged_by == INSECURE.subject
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alarm.stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(rule_id="hot", tag_id=1))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alarm.stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(rule_id="hot", tag_id=42))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await feed.send(85, 60)
    await wait_state(alarm, S.ALARM_STATE_NORMAL)
    await feed.send(95, 50)
    await wait_state(alarm, S.ALARM_STATE_CLEARED_UNACKNOWLEDGED)
    await alarm.stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(rule_id="hot", tag_id=1))
    assert await state_of(alarm) == S.ALARM_STATE_NORMAL
    assert not (await alarm.stub.ListAlarms(pb.ListAlarmsRequest())).alarms  # only those not normal by default

    history = await events(alarm)
    assert [(e.type, e.state) for e in history] == [
        (S.ALARM_EVENT_TYPE_RAISED, S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED),
        (S.ALARM_EVENT_TYPE_ACKNOWLEDGED, S.ALARM_STATE_ACTIVE_ACKNOWLEDGED),
        (S.ALARM_EVENT_TYPE_CLEARED, S.ALARM_STATE_NORMAL),
        (S.ALARM_EVENT_TYPE_RAISED, S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED),
        (S.ALARM_EVENT_TYPE_CLEARED, S.ALARM_STATE_CLEARED_UNACKNOWLEDGED),
        (S.ALARM_EVENT_TYPE_ACKNOWLEDGED, S.ALARM_STATE_NORMAL),
    ]
    assert [e.value.double_value for e in history if e.type != S.ALARM_EVENT_TYPE_ACKNOWLEDGED] == [90, 60, 95, 50]
    assert history[1].note == "on it"
    assert [e.id for e in history] == sorted(e.id for e in history)
    # filters
    assert await events(alarm, plc_id="other") == []
    assert len(await events(alarm, tag_id=1, severities=[rule_pb2.SEVERITY_HIGH])) == 6
    assert await events(alarm, severities=[rule_pb2.SEVERITY_LOW]) == []
    since = history[3].event_time.ToNanoseconds()
    assert [e.id for e in await events(alarm, start_time=history[3].event_time)] == \
        [e.id for e in history if e.event_time.ToNanoseconds() >= since]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alarm.stub.ListAlarmEvents(pb.ListAlarmEventsRequest(start_time=history[3].event_time,
                                                                   end_time=history[0].event_time))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Disabling the rule suppresses an active alarm and evaluates nothing more.
    await feed.send(99)
    await wait_state(alarm, S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED)
    await alarm.stub.UpdateAlarmRule(pb.UpdateAlarmRuleRequest(
        rule=rule_pb2.AlarmRule(id="hot", enabled=False), update_mask=field_mask_pb2.FieldMask(paths=["enabled"])))
    assert await state_of(alarm) == S.ALARM_STATE_NORMAL
    await feed.send(10, 99)
    await asyncio.sleep(1.0)
    last = (await events(alarm))[-1]
    assert last.type == S.ALARM_EVENT_TYPE_SUPPRESSED and await state_of(alarm) == S.ALARM_STATE_NORMAL
    assert rule.enabled


async def test_shelving_silences_notifications_until_it_ends_and_watch_resumes(stack: tuple[Server, Server]) -> None:
    ingest, alarm = stack
    await alarm.stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, 80)))
    watch = alarm.stub.WatchAlarms(pb.WatchAlarmsRequest())
    first = await asyncio.wait_for(watch.read(), 10)
    assert first.HasField("snapshot") and not first.snapshot.alarms
    feed = Feed(ingest)
    await feed.send(90)
    change = await asyncio.wait_for(watch.read(), 10)
    assert change.change.event.type == S.ALARM_EVENT_TYPE_RAISED and change.cursor == change.change.event.id
    shelved = await alarm.stub.ShelveAlarm(pb.ShelveAlarmRequest(rule_id="hot", tag_id=1, duration=seconds(1.5)))
    assert shelved.alarm.HasField("shelved_until")
    await feed.send(10)  # clears while shelved: recorded, not annunciated
    seen = [(await asyncio.wait_for(watch.read(), 10)).change.event for _ in range(3)]
    watch.cancel()
    assert [e.type for e in seen] == [S.ALARM_EVENT_TYPE_SHELVED, S.ALARM_EVENT_TYPE_CLEARED,
                                      S.ALARM_EVENT_TYPE_UNSHELVED]
    assert seen[1].state == S.ALARM_STATE_CLEARED_UNACKNOWLEDGED
    # Resume after the raise: the same three, no snapshot.
    again = alarm.stub.WatchAlarms(pb.WatchAlarmsRequest(after_cursor=change.cursor))
    resumed = [(await asyncio.wait_for(again.read(), 10)) for _ in range(3)]
    again.cancel()
    assert [r.change.event.id for r in resumed] == [e.id for e in seen]
    # A snapshot now holds the alarm that is not normal.
    snap = alarm.stub.WatchAlarms(pb.WatchAlarmsRequest())
    (alarm_now,) = (await asyncio.wait_for(snap.read(), 10)).snapshot.alarms
    snap.cancel()
    assert alarm_now.state == S.ALARM_STATE_CLEARED_UNACKNOWLEDGED and not alarm_now.HasField("shelved_until")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        call = alarm.stub.WatchAlarms(pb.WatchAlarmsRequest(after_cursor=10_000))
        await call.read()
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_a_plc_rule_has_an_alarm_per_tag_and_list_alarms_filters_and_pages(stack: tuple[Server, Server]) -> None:
    ingest, alarm = stack
    plc_rule = gt_rule("plc-hot", "plc-1", 1, 80, target=rule_pb2.RuleTarget(plc=rule_pb2.PlcTarget(plc_id="plc-1")),
                       severity=rule_pb2.SEVERITY_CRITICAL)
    role_rule = gt_rule("any-low", "plc-1", 1, 0, target=rule_pb2.RuleTarget(role=rule_pb2.RoleTarget(
        role=reading_pb2.TAG_ROLE_MEASUREMENT)), condition=rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(
            comparison=rule_pb2.COMPARISON_LESS, number=5)), severity=rule_pb2.SEVERITY_LOW)
    for rule in (plc_rule, role_rule):
        await alarm.stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=rule))
    t_us = int((time.time() - 100) * US)
    readings = [reading(tag, t_us + tag, v) for tag, v in ((1, 90.0), (2, 95.0), (3, 99.0), (4, 10.0))]
    readings += [reading(7, t_us, 1.0, plc_id="plc-2")]  # another PLC: only the role rule
    await stream_batches(ingest.stub, "c1", [batch("c1", 1, readings)])

    async def listed(**filters: object) -> list[tuple[str, int]]:
        out, token = [], ""
        while True:
            page = await alarm.stub.ListAlarms(pb.ListAlarmsRequest(page_size=2, page_token=token, **filters))
            out += [(a.rule_id, a.tag_id) for a in page.alarms]
            if not (token := page.next_page_token):
                return out
    await wait_for(lambda: _count_is(listed, 4), timeout=15)
    assert await listed() == [("any-low", 7), ("plc-hot", 1), ("plc-hot", 2), ("plc-hot", 3)]
    assert await listed(plc_id="plc-2") == [("any-low", 7)]
    assert await listed(severities=[rule_pb2.SEVERITY_CRITICAL]) == [("plc-hot", 1), ("plc-hot", 2), ("plc-hot", 3)]
    assert await listed(rule_id="plc-hot", states=[S.ALARM_STATE_ACTIVE_ACKNOWLEDGED]) == []
    assert len(await listed(include_normal=True)) == 9  # every instance evaluated, normal ones too
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a token of another query
        page = await alarm.stub.ListAlarms(pb.ListAlarmsRequest(page_size=1))
        await alarm.stub.ListAlarms(pb.ListAlarmsRequest(page_size=1, plc_id="plc-2", page_token=page.next_page_token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _count_is(listed, n: int) -> bool:  # noqa: ANN001
    return len(await listed()) == n


async def test_changing_a_rules_condition_suppresses_and_evaluates_afresh(stack: tuple[Server, Server]) -> None:
    ingest, alarm = stack
    await alarm.stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, 80)))
    feed = Feed(ingest)
    await feed.send(90)
    await wait_state(alarm, S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED)
    # A new name only: the alarm and its evaluation carry over.
    await alarm.stub.UpdateAlarmRule(pb.UpdateAlarmRuleRequest(
        rule=rule_pb2.AlarmRule(id="hot", display_name="renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
    assert await state_of(alarm) == S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED
    await feed.send(95)  # still above: no new raise
    # A new threshold: suppressed, then evaluated from scratch against 100.
    new = gt_rule("hot", "plc-1", 1, 100)
    await alarm.stub.UpdateAlarmRule(pb.UpdateAlarmRuleRequest(
        rule=new, update_mask=field_mask_pb2.FieldMask(paths=["condition"])))
    assert await state_of(alarm) == S.ALARM_STATE_NORMAL
    await feed.send(97, 105)
    await wait_state(alarm, S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED)
    history = await events(alarm)
    assert [(e.type, e.value.double_value) for e in history] == [
        (S.ALARM_EVENT_TYPE_RAISED, 90.0), (S.ALARM_EVENT_TYPE_SUPPRESSED, 90.0), (S.ALARM_EVENT_TYPE_RAISED, 105.0)]
