"""The web UI in a real Chromium against a real `fabrica run` with the PLC simulator: what an operator and an
engineer do, seen on screen, with a screenshot of every screen in build/screenshots/.

The tests of this module share one stack and run in file order (the demo order fills as they go)."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid

import pytest
from playwright.sync_api import Page, expect

from .conftest import CuttableProxy, Stack, screenshot, sign_in

pytestmark = pytest.mark.slow

ORDERS = "[data-testid=order-board]"


def _column(page: Page, state: str):  # noqa: ANN202 - a Playwright locator
    return page.locator(f'{ORDERS} .board-col[data-state="{state}"]')


def _forged_token(sub: str, roles: list[str]) -> str:
    """A JWT with these claims, unsigned: it reads as a token in the browser; the services refuse it."""
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc({'sub': sub, 'roles': roles})}.sig"


def test_the_demo_orders_progress_bar_advances_as_the_press_counts_without_a_reload(page: Page, stack: Stack) -> None:
    page.goto(stack.url)
    bar = page.locator('[data-testid=overview-orders] tr[data-order="DEMO-0001"] [role=progressbar]')
    expect(bar).to_be_visible()
    expect(page.get_by_test_id("stream-state")).to_have_text("live")
    page.evaluate("window.__sameDocument = true")
    first = int(bar.get_attribute("aria-valuenow") or "0")
    page.wait_for_function(
        """(n) => Number(document.querySelector('[data-testid=overview-orders] tr[data-order="DEMO-0001"] '
                 + '[role=progressbar]').getAttribute('aria-valuenow')) > n""", arg=first, timeout=30_000)
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    later = int(bar.get_attribute("aria-valuenow") or "0")
    assert later > first
    # The PLCs with their state, by name.
    plcs = page.get_by_test_id("overview-plcs")
    expect(plcs).to_contain_text("Press 1 (Modbus TCP)")
    expect(plcs.locator("tr", has_text="Press 2 (S7)")).to_contain_text("connected")
    screenshot(page, "01-overview")


def test_a_broken_order_stream_says_reconnecting_and_resumes(page: Page, proxy: CuttableProxy, stack: Stack) -> None:
    # Another origin (the proxy's port): the token is kept per origin, so sign in there.
    sign_in(page, f"http://127.0.0.1:{proxy.port}/", stack.admin_token, "admin")
    page.goto(f"http://127.0.0.1:{proxy.port}/#/orders")
    badge = page.get_by_test_id("stream-state")
    expect(badge).to_have_text("live")
    card = page.locator(f'{ORDERS} .order-card[data-order="DEMO-0001"] [data-testid=progress-text]')
    expect(card).to_be_visible()
    proxy.cut()
    expect(badge).to_have_text("reconnecting…", timeout=30_000)
    before = card.inner_text()
    screenshot(page, "04-orders-reconnecting")
    proxy.restore()
    expect(badge).to_have_text("live", timeout=30_000)
    expect(card).not_to_have_text(before, timeout=30_000)  # counting again after the resume


def test_an_operator_runs_an_order_on_a_second_work_centre(page: Page, stack: Stack) -> None:
    # A second work centre, booked by hand, through master data.
    page.goto(stack.url + "#/config?tab=master")
    page.get_by_test_id("new-master").click()
    form = page.get_by_test_id("edit-workCenters")
    form.locator("input[name=id]").fill("assembly-1")
    form.locator("input[name=display_name]").fill("Assembly cell 1")
    form.locator("select[name=sector_id]").select_option(label="Pressing")
    form.get_by_role("button", name="Create").click()
    expect(page.locator("tr[data-id=assembly-1]")).to_contain_text("Assembly cell 1")
    screenshot(page, "08-master-data")

    # The operator's own token, from `fabrica token` on the stack's data folder.
    sign_in(page, stack.url, stack.token("operator", "olga"), "olga · operator")

    page.goto(stack.url + "#/orders")
    page.get_by_test_id("new-order").click()
    form = page.get_by_test_id("create-order")
    form.locator("input[name=number]").fill("PO-7001")
    form.locator("select[name=item]").select_option(label="Mounting bracket")
    form.locator("select[name=workCenter]").select_option(label="Assembly cell 1")
    form.locator("input[name=planned]").fill("0")
    form.get_by_role("button", name="Create order").click()
    # Checked in the browser by the protos' own rules, shown next to the field.
    expect(form.locator('[data-field="order.planned_quantity"] .field-error')).to_have_text("Must be from 1 to 100000000.")
    form.locator("input[name=planned]").fill("40")
    form.get_by_role("button", name="Create order").click()
    expect(_column(page, "planned").locator('.order-card[data-order="PO-7001"]')).to_be_visible()
    page.get_by_test_id("new-order").click()
    form = page.get_by_test_id("create-order")
    form.locator("input[name=number]").fill("PO-7002")
    form.locator("select[name=item]").select_option(label="Mounting bracket")
    form.locator("select[name=workCenter]").select_option(label="Assembly cell 1")
    form.locator("input[name=planned]").fill("10")
    form.get_by_role("button", name="Create order").click()
    expect(_column(page, "planned").locator('.order-card[data-order="PO-7002"]')).to_be_visible()

    first = _column(page, "planned").locator('.order-card[data-order="PO-7001"]')
    first.locator("[data-action=start]").click()
    running = _column(page, "in progress").locator('.order-card[data-order="PO-7001"]')
    expect(running).to_contain_text("Assembly cell 1")

    # A second order cannot start where one runs: the server's reason, in words, on the card.
    second = _column(page, "planned").locator('.order-card[data-order="PO-7002"]')
    second.locator("[data-action=start]").click()
    expect(second.get_by_test_id("order-error")).to_contain_text(
        "is in progress on work centre 'assembly-1'; pause or complete it first")

    running.locator("[data-action=pause]").click()
    paused = _column(page, "paused").locator('.order-card[data-order="PO-7001"]')
    expect(paused).to_be_visible()
    paused.click()  # its detail: manual booking, defects, OEE
    detail = page.get_by_test_id("order-detail")
    booking = detail.get_by_test_id("manual-booking")
    booking.locator("input").nth(0).fill("12")
    booking.get_by_role("button", name="Book").click()
    expect(detail).to_contain_text("Booking saved.")
    defect = detail.get_by_test_id("record-defect")
    defect.locator("select").select_option(label="Burr")
    defect.get_by_role("button", name="Record defect").click()
    expect(detail.locator("table", has_text="Burr")).to_be_visible()
    expect(paused.get_by_test_id("progress-text")).to_contain_text("12 good")
    screenshot(page, "04-orders")
    paused.locator("[data-action=complete]").click()
    expect(_column(page, "completed").locator('.order-card[data-order="PO-7001"]')).to_contain_text("12 good")


def test_an_engineer_creates_a_plc_from_a_profile_previews_it_and_sees_its_live_values(page: Page, stack: Stack) -> None:
    page.goto(stack.url + "#/config")
    page.get_by_test_id("new-plc").click()
    editor = page.get_by_test_id("plc-editor")
    editor.locator("select[name=profile]").select_option("s7-press-db1")
    editor.locator("input[name=id]").fill("Press 3")
    editor.locator("input[name=displayName]").fill("Press 3 (S7 from profile)")
    editor.locator("input[name=collectorId]").fill("demo")
    editor.locator("input[name=host]").fill("127.0.0.1")
    editor.locator("input[name=port]").fill(str(stack.s7_port))
    # The id is not one: the service's field violation (sent as grpc-status-details-bin), next to the field.
    editor.get_by_test_id("save-plc").click()
    expect(editor.locator('[data-field="plc.id"] .field-error')).to_have_text(
        "Contains characters that are not allowed here.")
    expect(editor.get_by_role("alert").first).to_contain_text("Please correct the field marked below (id)")
    screenshot(page, "07-configuration-field-violation")
    editor.locator("input[name=id]").fill("press-3")

    # Before saving: the connection, and a tag's value as the collector decodes it.
    editor.get_by_test_id("probe").click()
    expect(editor.get_by_test_id("probe-result")).to_contain_text("Reachable")
    row = editor.locator('[data-testid=tag-editor] tr[data-tag="current"]')
    row.get_by_role("button", name="Preview").click()
    expect(row.get_by_test_id("preview-value")).to_have_text(re.compile(r"^-?[\d,.]+ A$"))
    expect(page.locator("tr[data-plc=press-3]")).to_have_count(0)  # nothing saved yet
    screenshot(page, "07-configuration-new-plc")
    editor.get_by_test_id("save-plc").click()
    expect(page.get_by_test_id("saved")).to_contain_text("Saved Press 3 (S7 from profile)")
    expect(page.locator("tr[data-plc=press-3]")).to_contain_text("7")

    page.goto(stack.url + "#/plant?plc=press-3")
    current = page.locator('[data-testid=tag-table] tr[data-tag="current"]')
    expect(current.get_by_test_id("tag-value")).to_have_text(re.compile(r"^-?[\d,.]+ A$"), timeout=30_000)
    expect(current).to_contain_text("good")
    expect(page.locator('.plc-card[data-plc="press-3"]')).to_contain_text("connected")
    screenshot(page, "02-plant")


def test_a_value_opens_its_trend_which_draws_points_and_exports_them(page: Page, stack: Stack) -> None:
    page.goto(stack.url + "#/plant?plc=press-1")
    row = page.locator('[data-testid=tag-table] tr[data-tag="press.temperature"]')
    expect(row.get_by_test_id("tag-value")).to_contain_text("°C")
    row.get_by_test_id("tag-value").click()
    expect(page).to_have_url(re.compile(r"#/trend\?tags=\d+"))
    plot = page.locator(".plot")
    expect(plot.locator("canvas")).to_be_visible()
    assert int(plot.get_attribute("data-points") or "0") > 0
    expect(page.get_by_test_id("trend-mode")).to_contain_text("s buckets")  # the last hour: server-side buckets
    # Drag across the last fifth of the hour: zoomed in to 12 minutes, the chart shows raw readings.
    box = plot.locator(".u-over").bounding_box()
    assert box
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.99, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    expect(page).to_have_url(re.compile(r"#/trend\?tags=\d+&start=\d+&end=\d+"))
    expect(page.get_by_test_id("trend-mode")).to_contain_text("raw readings")
    expect(page.get_by_role("button", name="Reset zoom")).to_be_visible()
    page.get_by_role("button", name="15 min").click()
    expect(page.get_by_test_id("trend-mode")).to_contain_text("raw readings")
    page.wait_for_function("Number(document.querySelector('.plot').dataset.points) > 1")
    stats = page.get_by_test_id("trend-stats")
    expect(stats.locator("tbody tr")).to_contain_text("press.temperature")
    with page.expect_download() as dl:
        page.get_by_role("button", name="Export CSV").click()
    lines = open(dl.value.path(), encoding="utf-8").read().splitlines()
    assert lines[0] == "time,tag,value,min,max"
    assert len(lines) - 1 == int(plot.get_attribute("data-points") or "0")
    assert all("press.temperature" in line for line in lines[1:])
    screenshot(page, "03-trend")


def test_a_stop_is_classified_with_a_reason_and_the_pareto_shows_it(page: Page, stack: Stack) -> None:
    page.goto(stack.url + "#/downtime?wc=press-1")
    page.get_by_role("button", name="Record a stop").click()
    form = page.get_by_test_id("new-downtime")
    local = "(m) => { const d = new Date(Date.now() - m * 60000); d.setMinutes(d.getMinutes() - d.getTimezoneOffset()); " \
            "return d.toISOString().slice(0, 16); }"
    form.locator("input[type=datetime-local]").nth(0).fill(page.evaluate(local, 30))
    form.locator("input[type=datetime-local]").nth(1).fill(page.evaluate(local, 18))
    form.locator("input").nth(2).fill("die change on line 1")
    form.get_by_role("button", name="Record stop").click()
    row = page.locator("[data-testid=past-downtimes] tr", has_text="die change on line 1")
    expect(row).to_contain_text("Unclassified")
    row.get_by_test_id("classify").select_option(label="Tool change")
    expect(row).to_contain_text("Tool change")
    bar = page.locator('[data-testid=pareto] .pareto-row[data-reason="Tool change"]')
    expect(bar).to_contain_text("12 min")
    assert bar.locator(".pareto-bar").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(245, 158, 11)"
    # OEE of the work centre and of its running order; the demo's ideal cycle time gives a sane performance.
    perf = page.get_by_test_id("oee-order").get_by_test_id("performance")
    expect(perf).to_have_text(re.compile(r"^\d+\.\d %$"))
    assert float(perf.inner_text().split()[0]) <= 100.0
    expect(page.get_by_test_id("cycle-time-flag")).to_have_count(0)
    screenshot(page, "05-downtime")

    # A stop entered while the machine is down is ended by hand when it runs again (EndDowntime).
    page.get_by_role("button", name="Record a stop").click()
    form = page.get_by_test_id("new-downtime")
    form.locator("input[type=datetime-local]").nth(0).fill(page.evaluate(local, 5))
    form.locator("input").nth(2).fill("waiting for coil")
    form.get_by_role("button", name="Record stop").click()
    open_row = page.locator("[data-testid=open-downtimes] tr", has_text="waiting for coil")
    expect(open_row).to_contain_text("still down")
    open_row.get_by_test_id("end-downtime").click()
    expect(page.locator("[data-testid=past-downtimes] tr", has_text="waiting for coil")).to_contain_text("entered by hand")
    expect(page.locator("[data-testid=open-downtimes] tr", has_text="waiting for coil")).to_have_count(0)


#: Holds the answers of the lists the names are read from until the Downtime screen is opened, then lets them
#: all through right after its first render, before its effects run (they run after the next paint): the
#: timing that, under load, left the screen showing ids while the cache and later-mounted parts had names.
_HOLD_NAMES_UNTIL_DOWNTIME = """(() => {
  const held = []; let holding = true; const fetch0 = window.fetch.bind(window);
  window.fetch = (input, init) => {
    const url = typeof input === "string" ? input : input.url;
    const p = fetch0(input, init);
    if (!holding || !/List(Plcs|WorkCenters|Items|DowntimeReasons|DefectCodes)$/.test(url)) return p;
    return p.then((r) => r.arrayBuffer().then((b) => new Promise((done) => {
      const answer = () => done(new Response(b, { status: r.status, headers: r.headers }));
      if (holding) held.push(answer); else answer();  // one that arrives after the release goes straight on
    })));
  };
  addEventListener("hashchange", () => {
    if (!holding || !location.hash.startsWith("#/downtime")) return;
    holding = false;
    setTimeout(() => held.splice(0).forEach((f) => f()), 0);
  });
})();"""


def test_names_that_arrive_right_after_a_screen_first_renders_are_shown(page: Page, stack: Stack) -> None:
    page.add_init_script(_HOLD_NAMES_UNTIL_DOWNTIME)
    page.reload()  # the overview again (the token is kept in the tab), its names held back
    expect(page.locator(".who-name")).to_contain_text("admin · admin")
    page.goto(stack.url + "#/downtime?wc=press-1")
    expect(page.get_by_test_id("oee-wc").locator("h2")).to_have_text("Press 1, last 8 h")


def test_master_data_created_after_the_page_read_its_names_is_shown_by_name(page: Page, stack: Stack) -> None:
    from fabrica.production.v1 import master_data_pb2 as mpb
    from fabrica.production.v1 import order_pb2 as opb
    from fabrica.production.v1 import production_service_pb2 as ppb
    from fabrica.production.v1 import production_service_pb2_grpc as pgrpc
    from google.protobuf import timestamp_pb2

    page.goto(stack.url + "#/downtime?wc=press-1")
    expect(page.get_by_test_id("oee-wc").locator("h2")).to_have_text("Press 1, last 8 h")  # names read
    # Someone else adds a reason and books a stop with it; this page has never heard of the reason.
    # (Its own id and note on each try: a rerun after a failure does not meet the last try's. The note is no part
    # of the reason's name, which every row's reason picker lists once the names have it.)
    key = uuid.uuid4().hex[:6]
    start = timestamp_pb2.Timestamp(seconds=int(time.time()) - 50 * 60)
    end = timestamp_pb2.Timestamp(seconds=start.seconds + 7 * 60)
    with stack.channel(stack.production) as ch:
        stub = pgrpc.ProductionServiceStub(ch)
        stub.CreateDowntimeReason(ppb.CreateDowntimeReasonRequest(downtime_reason=mpb.DowntimeReason(
            id=f"JAM-{key}", display_name=f"Coil jammed {key}", color="#7c3aed", counts_against_availability=True)),
            timeout=10, metadata=stack.metadata())
        stub.CreateDowntime(ppb.CreateDowntimeRequest(downtime=opb.Downtime(
            work_center_id="press-1", start_time=start, end_time=end, reason_id=f"JAM-{key}", note=f"booked elsewhere {key}")),
            timeout=10, metadata=stack.metadata())
    row = page.locator("[data-testid=past-downtimes] tr", has_text=f"booked elsewhere {key}")
    expect(row).to_contain_text(f"Coil jammed {key}", timeout=30_000)  # the list polls every 5 s, the names follow
    expect(row).not_to_contain_text(f"JAM-{key}")
    bar = page.locator(f'[data-testid=pareto] .pareto-row[data-reason="Coil jammed {key}"]')
    expect(bar).to_contain_text("7 min")
    assert bar.locator(".pareto-bar").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(124, 58, 237)"


def test_a_viewer_sees_no_buttons_for_what_the_role_may_not_do(page: Page, stack: Stack) -> None:
    page.goto(stack.url + "#/login")
    page.locator("textarea[name=token]").fill("not a token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".field-error")).to_contain_text("This is not a JSON Web Token")
    screenshot(page, "09-login")
    # A token the services do not trust (no signature of their key): their UNAUTHENTICATED brings the login back.
    page.locator("textarea[name=token]").fill(_forged_token("mallory", ["admin"]))
    page.get_by_role("button", name="Sign in").click()
    page.goto(stack.url + "#/orders")
    expect(page.get_by_test_id("login-required")).to_contain_text("The last one was refused", timeout=30_000)
    expect(page.locator("textarea[name=token]")).to_be_visible()
    expect(page.locator(".who-name")).to_have_count(0)
    expect(page.get_by_test_id("new-order")).to_have_count(0)
    # A real viewer token (minted by `fabrica token`, verified by the services): it reads, and no action is offered.
    sign_in(page, stack.url, stack.token("viewer", "vera"), "vera · viewer")
    page.goto(stack.url + "#/orders")
    expect(page.locator(f'{ORDERS} .order-card[data-order="DEMO-0001"]')).to_be_visible()
    expect(page.get_by_test_id("new-order")).to_have_count(0)
    expect(page.locator(f"{ORDERS} [data-action]")).to_have_count(0)
    page.goto(stack.url + "#/config")
    expect(page.locator("tr[data-plc=press-1]")).to_be_visible()
    expect(page.get_by_test_id("new-plc")).to_have_count(0)
    screenshot(page, "06-configuration")
    # What the buttons would do, the services refuse for this token all the same.
    import grpc
    from fabrica.production.v1 import production_service_pb2 as ppb
    from fabrica.production.v1 import production_service_pb2_grpc as pgrpc

    with stack.channel(stack.production) as ch:
        with pytest.raises(grpc.RpcError) as denied:
            pgrpc.ProductionServiceStub(ch).CreateOrder(ppb.CreateOrderRequest(), timeout=10,
                                                        metadata=stack.metadata(stack.token("viewer", "vera")))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_screens_fit_a_tablet(page: Page, stack: Stack) -> None:
    page.set_viewport_size({"width": 820, "height": 1180})
    for route, name in (("#/", "10-tablet-overview"), ("#/orders", "11-tablet-orders"), ("#/plant?plc=press-1", "12-tablet-plant"),
                        ("#/downtime?wc=press-1", "13-tablet-downtime")):
        page.goto(stack.url + route)
        page.wait_for_timeout(1500)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), f"{route} is wider than the tablet"
        screenshot(page, name)


def test_an_edit_made_meanwhile_is_shown_not_overwritten(page: Page, stack: Stack) -> None:
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc
    from fabrica.config.v1 import plc_pb2
    from google.protobuf import field_mask_pb2

    page.goto(stack.url + "#/config")
    page.locator("tr[data-plc=meter-1]").get_by_role("button", name="Edit").click()
    editor = page.get_by_test_id("plc-editor")
    expect(editor.locator("input[name=displayName]")).not_to_have_value("")
    # Someone else saves the meter while it is open here.
    md = stack.metadata()
    with stack.channel(stack.config) as ch:
        stub = cgrpc.ConfigServiceStub(ch)
        current = stub.GetPlc(cpb.GetPlcRequest(id="meter-1"), timeout=10, metadata=md).plc
        stub.UpdatePlc(cpb.UpdatePlcRequest(plc=plc_pb2.Plc(id="meter-1", display_name="Energy meter (renamed meanwhile)",
                                                            etag=current.etag),
                                            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), timeout=10,
                        metadata=md)
        editor.locator("input[name=displayName]").fill("Energy meter, hall 2")
        editor.get_by_test_id("save-plc").click()
        conflict = editor.get_by_test_id("conflict")
        expect(conflict).to_contain_text("Energy meter (renamed meanwhile)")
        expect(conflict).to_contain_text("were not saved")
        assert stub.GetPlc(cpb.GetPlcRequest(id="meter-1"), timeout=10, metadata=md).plc.display_name == "Energy meter (renamed meanwhile)"
        expect(editor.locator("input[name=displayName]")).to_have_value("Energy meter, hall 2")  # ours, kept
        screenshot(page, "07-configuration-concurrent-edit")
        # Deliberately over theirs, now that they were seen.
        conflict.get_by_role("button", name="Keep mine over theirs").click()
        editor.get_by_test_id("save-plc").click()
        expect(page.get_by_test_id("saved")).to_contain_text("Saved Energy meter, hall 2")
        assert stub.GetPlc(cpb.GetPlcRequest(id="meter-1"), timeout=10, metadata=md).plc.display_name == "Energy meter, hall 2"


def test_a_plc_with_a_thousand_tags_renders_only_the_rows_in_view(page: Page, stack: Stack) -> None:
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc
    from fabrica.config.v1 import plc_pb2
    from google.protobuf import duration_pb2

    plc = plc_pb2.Plc(id="big-1", display_name="A thousand registers", collector_id="demo", enabled=True,
                      modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1", port=stack.modbus_port, unit_id=1),
                      poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration_pb2.Duration(seconds=1))])
    for i in range(1000):
        plc.tags.add(name=f"reg_{i:04d}", poll_group="default", data_type=plc_pb2.DATA_TYPE_UINT16, unit="raw",
                     modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=i))
    with stack.channel(stack.config) as ch:
        cgrpc.ConfigServiceStub(ch).CreatePlc(cpb.CreatePlcRequest(plc=plc), timeout=30, metadata=stack.metadata())
    page.goto(stack.url + "#/plant?plc=big-1")
    table = page.get_by_test_id("tag-table")
    expect(table).to_contain_text("Tags (1000)")
    first = table.locator('tr[data-tag="reg_0000"]')
    expect(first.get_by_test_id("tag-value")).not_to_have_text("—", timeout=30_000)  # live values arrived
    rows = table.locator("tbody tr[data-tag]")
    assert rows.count() < 60, "every tag was rendered"
    page.locator("[data-testid=tag-table] .vscroll").evaluate("e => { e.scrollTop = e.scrollHeight; }")
    expect(table.locator('tr[data-tag="reg_0999"]')).to_be_visible()
    assert rows.count() < 60
    # While values refresh, a frame stays short: the longest gap between animation frames over 3 s.
    longest = page.evaluate("""() => new Promise((done) => {
        let last = performance.now(), worst = 0; const end = last + 3000;
        const tick = (t) => { worst = Math.max(worst, t - last); last = t; t < end ? requestAnimationFrame(tick) : done(worst); };
        requestAnimationFrame(tick);
    })""")
    print(f"longest frame gap with 1,000 live tags: {longest:.0f} ms")
    screenshot(page, "02-plant-1000-tags")
