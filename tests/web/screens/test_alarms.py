"""The Alarms screen in a real Chromium against a real `fabrica run`: a rule whose threshold the simulated press's
oil temperature already exceeds raises an alarm that appears live (no reload) with its names, an operator
acknowledges it and sees the state change, a viewer is offered no action, and the nav and Overview count it."""

from __future__ import annotations

import grpc
import pytest
from playwright.sync_api import Page, expect

from .conftest import CuttableProxy, Stack, screenshot, sign_in

pytestmark = pytest.mark.slow

RULE = "ui-oil-warm"


def _temperature_tag(stack: Stack) -> tuple[int, str]:
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc

    with stack.channel(stack.config) as ch:
        plc = cgrpc.ConfigServiceStub(ch).GetPlc(cpb.GetPlcRequest(id="press-1"), timeout=10,
                                                 metadata=stack.metadata()).plc
    tag = next(t for t in plc.tags if t.name == "press.temperature")
    return tag.id, tag.unit


def _create_rule(stack: Stack, tag_id: int) -> None:
    """A rule the simulated temperature (about 66 °C) is always above: it raises on the next reading."""
    from fabrica.alarm.v1 import alarm_service_pb2 as apb
    from fabrica.alarm.v1 import alarm_service_pb2_grpc as agrpc
    from fabrica.alarm.v1 import rule_pb2

    rule = rule_pb2.AlarmRule(
        id=RULE, display_name="Oil warmer than 20 °C",
        target=rule_pb2.RuleTarget(tag=rule_pb2.TagTarget(plc_id="press-1", tag_id=tag_id)),
        condition=rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(
            comparison=rule_pb2.COMPARISON_GREATER, number=20.0)),
        severity=rule_pb2.SEVERITY_HIGH, message_template="{tag} at {value} {unit}", enabled=True)
    with stack.channel(stack.alarm) as ch:
        agrpc.AlarmServiceStub(ch).CreateAlarmRule(apb.CreateAlarmRuleRequest(rule=rule), timeout=10,
                                                   metadata=stack.metadata())


def _delete_rule_left_by_an_earlier_try(stack: Stack) -> None:
    """A rerun (tests/web/screens/conftest.py: browser tests may run again after a failure) starts without the
    rule an earlier try created: deleting it suppresses its alarm, which leaves the active list."""
    from fabrica.alarm.v1 import alarm_service_pb2 as apb
    from fabrica.alarm.v1 import alarm_service_pb2_grpc as agrpc

    with stack.channel(stack.alarm) as ch:
        try:
            agrpc.AlarmServiceStub(ch).DeleteAlarmRule(apb.DeleteAlarmRuleRequest(id=RULE), timeout=10,
                                                       metadata=stack.metadata())
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # the first try: there is none
                raise


def test_an_alarm_appears_live_an_operator_acknowledges_it_and_a_viewer_may_not(page: Page, stack: Stack) -> None:
    _delete_rule_left_by_an_earlier_try(stack)
    tag_id, unit = _temperature_tag(stack)
    page.goto(stack.url + "#/alarms")
    expect(page.get_by_test_id("stream-state")).to_have_text("live")
    page.evaluate("window.__sameDocument = true")
    row = page.locator(f"[data-testid=active-alarms] tr[data-rule={RULE}]")
    expect(row).to_have_count(0)

    _create_rule(stack, tag_id)
    # The evaluator raises it on the next reading of the tag; the stream brings it without a reload.
    expect(row).to_be_visible(timeout=90_000)
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    expect(row.get_by_test_id("alarm-state")).to_have_text("active, unacknowledged")
    expect(row.get_by_test_id("severity")).to_have_text("high")
    # The names (rules, PLCs, tags) are read once per page; a loaded machine may take a while.
    expect(row).to_contain_text("Oil warmer than 20 °C", timeout=20_000)
    expect(row).to_contain_text("Press 1 (Modbus TCP)", timeout=20_000)
    expect(row.get_by_test_id("tag-name")).to_have_text("press.temperature")
    expect(row.get_by_test_id("alarm-value")).to_contain_text(unit, timeout=20_000)
    value = float(row.get_by_test_id("alarm-value").inner_text().split()[0].replace(",", ""))
    assert value > 20.0
    expect(page.get_by_test_id("nav-alarm-count")).to_be_visible()
    assert int(page.get_by_test_id("nav-alarm-count").inner_text()) >= 1
    # The raise is in the recent events.
    expect(page.locator(f"[data-testid=alarm-events] tr[data-rule={RULE}]").first).to_contain_text("raised")

    # A viewer reads it and is offered neither Acknowledge nor Shelve.
    sign_in(page, stack.url, stack.token("viewer", "vera"), "vera · viewer")
    page.goto(stack.url + "#/alarms")
    expect(row).to_be_visible()
    expect(row.get_by_test_id("alarm-state")).to_have_text("active, unacknowledged")
    expect(page.get_by_test_id("acknowledge")).to_have_count(0)
    expect(page.get_by_test_id("shelve")).to_have_count(0)

    # An operator acknowledges it with a note: the state changes on screen, the event names who and why.
    sign_in(page, stack.url, stack.token("operator", "olga"), "olga · operator")
    page.goto(stack.url + "#/alarms")
    expect(row.get_by_test_id("alarm-state")).to_have_text("active, unacknowledged")
    row.get_by_test_id("acknowledge").click()
    row.get_by_label("Note").fill("checked the cooler")
    row.get_by_test_id("acknowledge-confirm").click()
    expect(row.get_by_test_id("alarm-state")).to_have_text("active, acknowledged", timeout=20_000)
    expect(row.get_by_test_id("acknowledged-by")).to_contain_text("olga")
    expect(row.get_by_test_id("acknowledged-by")).to_contain_text("checked the cooler")
    expect(row.get_by_test_id("acknowledge")).to_have_count(0)
    acked = page.locator(f"[data-testid=alarm-events] tr[data-rule={RULE}]", has_text="acknowledged").first
    expect(acked).to_contain_text("checked the cooler")
    expect(acked).to_contain_text("olga")
    screenshot(page, "14-alarms")

    # The Overview counts it.
    page.goto(stack.url + "#/")
    expect(page.get_by_test_id("kpi-alarms")).not_to_have_text("0")
    expect(page.get_by_test_id("kpi-alarms")).not_to_have_text("—")

    # What the buttons would do, the service refuses for a viewer all the same: the sentence, not a code.
    from fabrica.alarm.v1 import alarm_service_pb2 as apb
    from fabrica.alarm.v1 import alarm_service_pb2_grpc as agrpc

    with stack.channel(stack.alarm) as ch:
        with pytest.raises(grpc.RpcError) as denied:
            agrpc.AlarmServiceStub(ch).AcknowledgeAlarm(apb.AcknowledgeAlarmRequest(rule_id=RULE, tag_id=tag_id),
                                                        timeout=10, metadata=stack.metadata(stack.token("viewer", "vera")))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_broken_alarm_stream_says_reconnecting_and_resumes_with_what_happened_meanwhile(
        page: Page, proxy: CuttableProxy, stack: Stack) -> None:
    from fabrica.alarm.v1 import alarm_service_pb2 as apb
    from fabrica.alarm.v1 import alarm_service_pb2_grpc as agrpc
    from google.protobuf import duration_pb2

    tag_id, _ = _temperature_tag(stack)
    origin = f"http://127.0.0.1:{proxy.port}/"
    sign_in(page, origin, stack.admin_token, "admin")
    page.goto(origin + "#/alarms")
    badge = page.get_by_test_id("stream-state")
    expect(badge).to_have_text("live")
    row = page.locator(f"[data-testid=active-alarms] tr[data-rule={RULE}]")  # raised by the test above
    expect(row).to_be_visible()
    expect(row.get_by_test_id("shelved")).to_have_count(0)
    proxy.cut()
    expect(badge).to_have_text("reconnecting…", timeout=30_000)
    # Meanwhile someone shelves it: the resumed stream (after its last cursor) brings the change.
    with stack.channel(stack.alarm) as ch:
        agrpc.AlarmServiceStub(ch).ShelveAlarm(apb.ShelveAlarmRequest(
            rule_id=RULE, tag_id=tag_id, duration=duration_pb2.Duration(seconds=3600), note="cooler on order"),
            timeout=10, metadata=stack.metadata())
    proxy.restore()
    expect(badge).to_have_text("live", timeout=30_000)
    expect(row.get_by_test_id("shelved")).to_contain_text("shelved until", timeout=30_000)
    expect(page.locator(f"[data-testid=alarm-events] tr[data-rule={RULE}]", has_text="shelved").first
           ).to_contain_text("cooler on order")
