"""Tenants in the web UI, in a real Chromium against a real `fabrica run`: an installation-wide admin picks the
tenant in the header and every screen shows that tenant's data only (the UI sends ``x-fabrica-tenant`` on every
call); a suspended tenant's user is told the company's account is suspended, not that the role forbids it.

The tests share one stack and run in file order: the last one suspends the tenant the first one works in."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, Request, expect

from .conftest import Stack, screenshot, sign_in

pytestmark = pytest.mark.slow

TENANT = "acme"
ACME_PLC = "acme-press-1"
SUSPENDED = "Your company's account (tenant acme) is suspended; ask the installation's administrator."


def _metadata(token: str, tenant: str | None = None) -> tuple[tuple[str, str], ...]:
    md = (("authorization", f"Bearer {token}"),)
    return md + ((("x-fabrica-tenant", tenant),) if tenant else ())


@pytest.fixture(scope="module")
def root(stack: Stack) -> str:
    """An installation-wide admin's token, with the tenant acme and one PLC of acme created through it."""
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc
    from fabrica.config.v1 import plc_pb2, tenant_pb2
    from google.protobuf import duration_pb2

    token = stack.token("admin", "root", tenant="*")
    plc = plc_pb2.Plc(id=ACME_PLC, display_name="Acme stamping press", collector_id="acme-collector", enabled=True,
                      modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1", port=stack.modbus_port, unit_id=1),
                      poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration_pb2.Duration(seconds=1))])
    plc.tags.add(name="stroke_count", poll_group="default", data_type=plc_pb2.DATA_TYPE_UINT16, unit="strokes",
                 modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=0))
    with stack.channel(stack.config) as ch:
        stub = cgrpc.ConfigServiceStub(ch)
        stub.CreateTenant(cpb.CreateTenantRequest(tenant=tenant_pb2.Tenant(code=TENANT, name="Acme Metalworks",
                                                                           active=True)),
                          timeout=10, metadata=_metadata(token))
        stub.CreatePlc(cpb.CreatePlcRequest(plc=plc), timeout=10, metadata=_metadata(token, TENANT))
        # What the screens must show: acme has its PLC alone, default the demo plant's and not acme's.
        assert [p.id for p in stub.ListPlcs(cpb.ListPlcsRequest(), timeout=10,
                                            metadata=_metadata(token, TENANT)).plcs] == [ACME_PLC]
        assert ACME_PLC not in [p.id for p in stub.ListPlcs(cpb.ListPlcsRequest(), timeout=10,
                                                            metadata=_metadata(token)).plcs]
    return token


def _grpc_headers(page: Page) -> list[dict[str, str]]:
    """The headers of every gRPC-Web call the page makes from now on."""
    seen: list[dict[str, str]] = []

    def on_request(r: Request) -> None:
        if "grpc-web" in (r.headers.get("content-type") or ""):
            seen.append(r.headers)

    page.on("request", on_request)
    return seen


def test_an_installation_wide_admin_picks_the_tenant_and_sees_only_its_plcs(page: Page, stack: Stack,
                                                                            root: str) -> None:
    sign_in(page, stack.url, root, "root · admin")
    picker = page.get_by_test_id("tenant-picker")
    expect(picker).to_have_value("default")
    # Every tenant, by code and name.
    expect(picker.locator("option", has_text="Acme Metalworks")).to_have_attribute("value", TENANT)
    expect(picker.locator("option[value=default]")).to_have_count(1)

    page.goto(stack.url + "#/config")
    plcs = page.get_by_test_id("plc-config-list")
    expect(plcs.locator("tr[data-plc=press-1]")).to_be_visible()
    expect(plcs.locator(f"tr[data-plc={ACME_PLC}]")).to_have_count(0)

    calls = _grpc_headers(page)
    picker.select_option(TENANT)
    expect(plcs.locator(f"tr[data-plc={ACME_PLC}]")).to_contain_text("Acme stamping press")
    expect(plcs.locator("tr[data-plc]")).to_have_count(1)  # none of the demo plant's PLCs
    expect(page.get_by_test_id("tenant-picker")).to_have_value(TENANT)
    assert calls and all(h.get("x-fabrica-tenant") == TENANT for h in calls
                         if h.get("x-fabrica-tenant") != "*"), calls
    screenshot(page, "20-tenant-picker-acme")

    # The choice stays for the tab; a stream opens in the tenant too: acme has no order, the demo plant has one.
    page.goto(stack.url + "#/orders")
    expect(page.get_by_test_id("stream-state")).to_have_text("live")
    expect(page.get_by_test_id("tenant-picker")).to_have_value(TENANT)
    expect(page.locator('[data-testid=order-board] .order-card[data-order="DEMO-0001"]')).to_have_count(0)

    page.get_by_test_id("tenant-picker").select_option("default")
    expect(page.locator('[data-testid=order-board] .order-card[data-order="DEMO-0001"]')).to_be_visible()
    page.goto(stack.url + "#/config")
    expect(plcs.locator("tr[data-plc=press-1]")).to_be_visible()
    expect(plcs.locator(f"tr[data-plc={ACME_PLC}]")).to_have_count(0)
    screenshot(page, "21-tenant-picker-default")


def test_a_suspended_tenants_user_is_told_the_account_is_suspended(page: Page, stack: Stack, root: str) -> None:
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc
    from fabrica.config.v1 import tenant_pb2
    from google.protobuf import field_mask_pb2

    def set_active(active: bool) -> None:
        with stack.channel(stack.config) as ch:
            cgrpc.ConfigServiceStub(ch).UpdateTenant(
                cpb.UpdateTenantRequest(tenant=tenant_pb2.Tenant(code=TENANT, active=active),
                                        update_mask=field_mask_pb2.FieldMask(paths=["active"])),
                timeout=10, metadata=_metadata(root))

    set_active(True)  # active again when this test runs once more after a failure
    ana = stack.token("engineer", "ana", tenant=TENANT)
    sign_in(page, stack.url, ana, "ana · engineer")
    # A tenant's identity picks nothing, sees its tenant, and names none per call.
    expect(page.get_by_test_id("tenant-label")).to_have_text(TENANT)
    expect(page.get_by_test_id("tenant-picker")).to_have_count(0)
    calls = _grpc_headers(page)
    page.goto(stack.url + "#/config")
    plcs = page.get_by_test_id("plc-config-list")
    expect(plcs.locator(f"tr[data-plc={ACME_PLC}]")).to_be_visible()
    expect(plcs.locator("tr[data-plc=press-1]")).to_have_count(0)
    assert calls and not any("x-fabrica-tenant" in h for h in calls), calls

    set_active(False)  # config refuses acme's users at once
    page.reload()
    alert = page.get_by_test_id("plc-config-list").get_by_role("alert")
    expect(alert).to_have_text(SUSPENDED)
    expect(page.get_by_text("Your role does not allow this")).to_have_count(0)
    screenshot(page, "22-tenant-suspended")
