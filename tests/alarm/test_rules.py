"""Alarm rules as resources against a real alarm server and a real config server: CRUD, etags, request ids,
paging, and validation (the contract's rules, the cross-field rules, and the tags config knows)."""

from __future__ import annotations

import grpc
import pytest
from fabrica.alarm.v1 import alarm_service_pb2 as pb
from fabrica.alarm.v1 import rule_pb2
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from in_process import Server, Servers, settings_for

from .support import create_press, gt_rule, seconds, tag_named


@pytest.fixture
async def stack(database_url: str, servers: Servers) -> tuple[Server, Server]:
    config = await servers.start("config", settings_for("config", database_url=database_url))
    alarm = await servers.start("alarm", settings_for("alarm", database_url=database_url,
                                                      config_addr=config.address))
    return config, alarm


def details(exc: grpc.aio.AioRpcError) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(field violations, precondition violations (type, subject)) of a rich status."""
    status = rpc_status.from_call(exc)
    fields, preconditions = [], []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [(v.field, v.description) for v in bad.field_violations]
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pf = error_details_pb2.PreconditionFailure()
            detail.Unpack(pf)
            preconditions += [(v.type, v.subject) for v in pf.violations]
    return fields, preconditions


async def test_crud_with_etags_request_ids_and_pages(stack: tuple[Server, Server]) -> None:
    config, alarm = stack
    press = await create_press(config.stub)
    temp = tag_named(press, "press.temperature")
    stub = alarm.stub
    created = (await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(
        rule=gt_rule("oil-hot", "press-1", temp.id, 80), request_id="0f8c6f8e-1"))).rule
    assert created.etag and created.HasField("create_time") and created.condition.threshold.number == 80
    again = (await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(
        rule=gt_rule("oil-hot", "press-1", temp.id, 99), request_id="0f8c6f8e-1"))).rule
    assert again == created  # the retried create answers what it created
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("oil-hot", "press-1", temp.id, 80)))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for i in range(4):
        await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule(f"r{i}", "press-1", temp.id, 50 + i)))
    ids, token = [], ""
    while True:
        page = await stub.ListAlarmRules(pb.ListAlarmRulesRequest(page_size=2, page_token=token))
        ids += [r.id for r in page.rules]
        token = page.next_page_token
        if not token:
            break
    assert ids == ["oil-hot", "r0", "r1", "r2", "r3"]

    patch = rule_pb2.AlarmRule(id="oil-hot", etag=created.etag, severity=rule_pb2.SEVERITY_CRITICAL)
    updated = (await stub.UpdateAlarmRule(pb.UpdateAlarmRuleRequest(
        rule=patch, update_mask=field_mask_pb2.FieldMask(paths=["severity"])))).rule
    assert updated.severity == rule_pb2.SEVERITY_CRITICAL and updated.etag != created.etag
    assert updated.condition == created.condition
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the old etag is stale now
        await stub.UpdateAlarmRule(pb.UpdateAlarmRuleRequest(
            rule=patch, update_mask=field_mask_pb2.FieldMask(paths=["severity"])))
    assert err.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateAlarmRule(pb.UpdateAlarmRuleRequest(
            rule=rule_pb2.AlarmRule(id="oil-hot"), update_mask=field_mask_pb2.FieldMask(paths=["id"])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)[0][0][0] == "update_mask.paths[0]"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeleteAlarmRule(pb.DeleteAlarmRuleRequest(id="oil-hot", etag=created.etag))
    assert err.value.code() == grpc.StatusCode.ABORTED
    await stub.DeleteAlarmRule(pb.DeleteAlarmRuleRequest(id="oil-hot", etag=updated.etag))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAlarmRule(pb.GetAlarmRuleRequest(id="oil-hot"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def band(low: float, high: float) -> rule_pb2.Condition:
    return rule_pb2.Condition(band=rule_pb2.BandCondition(low=low, high=high))


async def test_bad_rules_are_refused_with_the_field_named(stack: tuple[Server, Server]) -> None:
    config, alarm = stack
    press = await create_press(config.stub)
    temp, running = tag_named(press, "press.temperature"), tag_named(press, "press.running")
    rate = rule_pb2.Condition(rate=rule_pb2.RateCondition(max_per_minute=5))
    flag_gt = rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(comparison=rule_pb2.COMPARISON_GREATER,
                                                                        flag=True))
    flag_eq = rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(comparison=rule_pb2.COMPARISON_EQUAL,
                                                                        flag=True))
    cases = [
        (gt_rule("a", "press-1", temp.id, 1, condition=band(10, 5)), grpc.StatusCode.INVALID_ARGUMENT,
         "rule.condition.band.low"),
        (gt_rule("a", "press-1", temp.id, 1, condition=band(0, 10), deadband=5), grpc.StatusCode.INVALID_ARGUMENT,
         "rule.deadband"),
        (gt_rule("a", "press-1", running.id, 1, condition=rate), grpc.StatusCode.INVALID_ARGUMENT,
         "rule.condition.rate"),
        (gt_rule("a", "press-1", temp.id, 1, condition=flag_eq), grpc.StatusCode.INVALID_ARGUMENT,
         "rule.condition.threshold.flag"),
        (gt_rule("a", "press-1", running.id, 1, condition=flag_gt), grpc.StatusCode.INVALID_ARGUMENT,
         "rule.condition.threshold.comparison"),
        (gt_rule("a", "press-1", temp.id, 1, message_template="{tag} {nope}"), grpc.StatusCode.INVALID_ARGUMENT,
         "rule.message_template"),
        (gt_rule("a", "press-1", temp.id, 1, severity=rule_pb2.SEVERITY_UNSPECIFIED),
         grpc.StatusCode.INVALID_ARGUMENT, "rule.severity"),
        (gt_rule("a", "press-1", temp.id, 1, condition=rule_pb2.Condition(no_data=rule_pb2.NoDataCondition(
            timeout=seconds(60)))), grpc.StatusCode.INVALID_ARGUMENT, "rule.condition.no_data.timeout"),
        (gt_rule("a", "press-1", 987654, 1), grpc.StatusCode.FAILED_PRECONDITION, "tags/987654"),
        (gt_rule("a", "no-such-plc", temp.id, 1), grpc.StatusCode.FAILED_PRECONDITION, "plcs/no-such-plc"),
    ]
    for rule, code, where in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await alarm.stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=rule))
        assert err.value.code() == code, (where, err.value.details())
        fields, preconditions = details(err.value)
        assert where in [f for f, _ in fields] + [s for _, s in preconditions], (where, fields, preconditions)
    assert not (await alarm.stub.ListAlarmRules(pb.ListAlarmRulesRequest())).rules  # nothing half-written
    ok = gt_rule("a", "press-1", running.id, 1, condition=flag_eq)  # a bool threshold on a bool tag is fine
    await alarm.stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=ok))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # an update is checked as a create
        await alarm.stub.UpdateAlarmRule(pb.UpdateAlarmRuleRequest(
            rule=rule_pb2.AlarmRule(id="a", condition=rate), update_mask=field_mask_pb2.FieldMask(paths=["condition"])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
