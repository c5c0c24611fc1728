"""Tenants in production: two tenants with the same ids each see, change and watch only their own; a tag event
books in its own tenant only; the tag-event consumer reads ingest installation-wide; every table but the
documented allow-list has row-level security forced, and a statement that names no tenant sees nothing.

The servers run in insecure mode (tests/in_process.py settings_for): the development principal is
installation-wide, and each client names its tenant with the header x-fabrica-tenant (peer_channel's
`tenant`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as cpb
from fabrica.config.v1 import config_service_pb2_grpc as cpb_grpc
from fabrica.config.v1 import plc_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as ipb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from fabrica.ingest.v1 import tag_event_pb2
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2 as S
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, field_mask_pb2

from fabrica_svc.runtime.notify import TenantListener
from fabrica_svc.production.service import TagEventService
from fabrica_svc.production.store import Database, common, orders
from fabrica_svc.production.store.schema import CHANNEL, MIGRATIONS, TENANT_TABLES, UNSCOPED_TABLES
from fabrica_svc.runtime import tenancy
from fabrica_svc.runtime.channels import peer_channel
from fabrica_svc.runtime.db import apply_migrations, create_pool
from fabrica_svc.runtime import principal
from fabrica_svc.runtime.errors import DomainError, NotFound
from fabrica_svc.runtime.interceptors import abort_with
from grpc_helpers import field_violations
from in_process import Server

from .support import (
    GOOD_TAG,
    SCRAP_TAG,
    STATE_TAG,
    fetchval,
    new_order,
    precondition_violations,
    seed,
    start_production,
    ts,
    wait_for,
)

ACME, GLOBEX = "acme", "globex"


@pytest.fixture
async def tenants(server: Server) -> AsyncIterator[dict[str, pb_grpc.ProductionServiceStub]]:
    """A stub per tenant (and "*": installation-wide, naming no tenant), each on its own channel."""
    channels = {t: peer_channel(server.address, None, tenant=t) for t in (ACME, GLOBEX, tenancy.ALL)}
    yield {t: pb_grpc.ProductionServiceStub(c) for t, c in channels.items()}
    for c in channels.values():
        await c.close()


async def rls_connection(database_url: str) -> asyncpg.Connection:
    """A connection as the services' pools and the consumer connect: the row-level-security role, no tenant."""
    return await asyncpg.connect(database_url, server_settings={"search_path": "production",
                                                                "role": tenancy.DB_ROLE})


def event(cursor: int, tag: int, value: int, t: datetime, tenant: str) -> tag_event_pb2.TagEvent:
    e = tag_event_pb2.TagEvent(cursor=cursor, tag_id=tag, plc_id="press-plc", quality=reading_pb2.QUALITY_GOOD,
                               read_time=ts(t), tenant=tenant)
    e.value.uint_value = value
    return e


async def not_found(call: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()


async def test_the_same_ids_in_two_tenants_are_two_resources(tenants: dict[str, pb_grpc.ProductionServiceStub],
                                                             stub: pb_grpc.ProductionServiceStub) -> None:
    acme, globex = tenants[ACME], tenants[GLOBEX]
    await seed(acme)
    await seed(globex)  # the same sector, work centre, items, codes and reasons: no ALREADY_EXISTS
    await globex.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
        work_center=md.WorkCenter(id="press-1", display_name="Globex press"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
    a_order = await new_order(acme, "PO-1", planned=50, start=True)
    g_order = await new_order(globex, "PO-1", planned=70)  # the same number
    assert a_order.id != g_order.id

    wc_a = (await acme.GetWorkCenter(pb.GetWorkCenterRequest(id="press-1"))).work_center
    wc_g = (await globex.GetWorkCenter(pb.GetWorkCenterRequest(id="press-1"))).work_center
    assert (wc_a.display_name, wc_g.display_name) == ("Press 1", "Globex press")
    for s in (acme, globex):
        assert [w.id for w in (await s.ListWorkCenters(pb.ListWorkCentersRequest())).work_centers] == ["press-1"]
        assert [i.id for i in (await s.ListItems(pb.ListItemsRequest())).items] == ["BRK-100", "CLP-200"]
        assert len((await s.ListDowntimeReasons(pb.ListDowntimeReasonsRequest())).downtime_reasons) == 2
    assert [(o.id, o.planned_quantity) for o in (await acme.ListOrders(pb.ListOrdersRequest())).orders] == [
        (a_order.id, 50)]
    assert [(o.id, o.planned_quantity) for o in (await globex.ListOrders(pb.ListOrdersRequest())).orders] == [
        (g_order.id, 70)]
    # Globex may start its PO-1 on its press-1 while Acme's runs on Acme's.
    await globex.StartOrder(pb.StartOrderRequest(id=g_order.id))
    # The default tenant (no header) has none of it.
    assert not (await stub.ListWorkCenters(pb.ListWorkCentersRequest())).work_centers
    assert not (await stub.ListOrders(pb.ListOrdersRequest())).orders
    await not_found(stub.GetItem(pb.GetItemRequest(id="BRK-100")))

    # Acme's order is NOT_FOUND for Globex, whatever the call, and nothing of it changes.
    await not_found(globex.GetOrder(pb.GetOrderRequest(id=a_order.id)))
    await not_found(globex.PauseOrder(pb.PauseOrderRequest(id=a_order.id)))
    await not_found(globex.CancelOrder(pb.CancelOrderRequest(id=a_order.id, reason="not yours")))
    await not_found(globex.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id=a_order.id,
                                                                                   good_quantity=5))))
    await not_found(globex.CreateDefect(pb.CreateDefectRequest(defect=S.Defect(
        order_id=a_order.id, defect_code_id="BURR", quantity=1))))
    await not_found(globex.ListBookings(pb.ListBookingsRequest(order_id=a_order.id)))
    await not_found(globex.ListDefects(pb.ListDefectsRequest(order_id=a_order.id)))
    await not_found(globex.GetOee(pb.GetOeeRequest(order_id=a_order.id)))
    after = (await acme.GetOrder(pb.GetOrderRequest(id=a_order.id))).order
    assert (after.state, after.good_quantity, after.etag) == (S.ORDER_STATE_IN_PROGRESS, 0, a_order.etag)

    # A stop of Acme's is not Globex's to classify or end; Globex's own list of press-1 is empty.
    stop = (await acme.CreateDowntime(pb.CreateDowntimeRequest(downtime=S.Downtime(
        work_center_id="press-1", start_time=ts(datetime.now(UTC) - timedelta(minutes=5)))))).downtime
    await not_found(globex.ClassifyDowntime(pb.ClassifyDowntimeRequest(id=stop.id, reason_id="TOOL")))
    await not_found(globex.EndDowntime(pb.EndDowntimeRequest(id=stop.id)))
    assert not (await globex.ListDowntimes(pb.ListDowntimesRequest(work_center_id="press-1"))).downtimes
    assert [d.id for d in (await acme.ListDowntimes(pb.ListDowntimesRequest(work_center_id="press-1"))).downtimes
            ] == [stop.id]

    # Deleting Globex's item does not touch Acme's; each tenant's audit trail is its own.
    await globex.DeleteItem(pb.DeleteItemRequest(id="CLP-200"))
    assert (await acme.GetItem(pb.GetItemRequest(id="CLP-200"))).item.display_name == "Clip"
    a_audit = (await acme.ListAuditEntries(pb.ListAuditEntriesRequest())).entries
    g_audit = (await globex.ListAuditEntries(pb.ListAuditEntriesRequest())).entries
    assert any(e.resource == "items/CLP-200" and e.action == "DeleteItem" for e in g_audit)
    assert not any(e.action == "DeleteItem" for e in a_audit)
    assert any(e.resource == f"downtimes/{stop.id}" for e in a_audit)
    assert not any(e.resource == f"downtimes/{stop.id}" for e in g_audit)


async def test_an_installation_wide_caller_must_name_the_tenant(
        tenants: dict[str, pb_grpc.ProductionServiceStub]) -> None:
    across = tenants[tenancy.ALL]
    for call in (across.ListItems(pb.ListItemsRequest()), across.GetOrder(pb.GetOrderRequest(id="1")),
                 across.CreateSector(pb.CreateSectorRequest(sector=md.Sector(id="s", display_name="S")))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert tenancy.HEADER in field_violations(err.value)
    watch = across.WatchOrders(pb.WatchOrdersRequest())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The audit trail may be read across tenants.
    await across.ListAuditEntries(pb.ListAuditEntriesRequest())


async def test_order_revisions_and_watches_are_per_tenant(tenants: dict[str, pb_grpc.ProductionServiceStub]) -> None:
    acme, globex = tenants[ACME], tenants[GLOBEX]
    await seed(acme)
    await seed(globex)
    first = await new_order(acme, "PO-A1")
    watch = acme.WatchOrders(pb.WatchOrdersRequest())
    snapshot = await watch.read()
    assert snapshot.snapshot and [o.number for o in snapshot.orders] == ["PO-A1"] and snapshot.revision == 1

    # Globex changes its orders many times: Acme's watch gets none of it, Acme's revision does not move.
    g = await new_order(globex, "PO-G1", start=True)
    await globex.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id=g.id, good_quantity=3)))
    await globex.PauseOrder(pb.PauseOrderRequest(id=g.id))
    g_watch = globex.WatchOrders(pb.WatchOrdersRequest())
    g_snapshot = await g_watch.read()
    assert [o.number for o in g_snapshot.orders] == ["PO-G1"] and g_snapshot.revision == 4, \
        "globex's revisions count from 1 like acme's: 4 changes, 4 revisions"
    g_watch.cancel()

    # The next message on Acme's watch is Acme's next change, at Acme's next revision.
    await acme.StartOrder(pb.StartOrderRequest(id=first.id))
    change = await asyncio.wait_for(watch.read(), timeout=20)
    assert not change.snapshot
    assert [(o.number, o.state) for o in change.orders] == [("PO-A1", S.ORDER_STATE_IN_PROGRESS)]
    assert change.revision == 2
    # A resume of Acme's at its revision sees Acme's changes only, never Globex's.
    resumed = acme.WatchOrders(pb.WatchOrdersRequest(after_revision=1))
    again = await asyncio.wait_for(resumed.read(), timeout=20)
    assert [o.number for o in again.orders] == ["PO-A1"] and again.revision == 2
    resumed.cancel()
    watch.cancel()


async def test_a_notification_wakes_its_tenants_watchers_only(database_url: str) -> None:
    listener = TenantListener(database_url, CHANNEL)
    acme, globex = listener.for_tenant(ACME), listener.for_tenant(GLOBEX)
    a_token, g_token = acme.token(), globex.token()
    listener._on_notify(None, 0, CHANNEL, "globex:7")
    assert g_token.is_set() and not a_token.is_set()
    assert await globex.wait(g_token, 0.01) and not await acme.wait(a_token, 0.01)
    assert not globex.token().is_set(), "after a wake-up the next token is fresh"
    # A reconnect (or a payload naming no tenant) wakes everyone: they read what they may have missed.
    listener.wake_all()
    assert a_token.is_set()


async def test_a_tag_event_books_on_its_tenants_order_only(tenants: dict[str, pb_grpc.ProductionServiceStub],
                                                           server: Server, database_url: str) -> None:
    acme, globex = tenants[ACME], tenants[GLOBEX]
    await seed(acme)
    await seed(globex)  # both bound press-1 to the same tag ids 101, 102, 103
    a_order = await new_order(acme, "PO-1", planned=1000, start=True)
    g_order = await new_order(globex, "PO-1", planned=1000, start=True)
    t0 = max(a_order.start_time.ToDatetime(tzinfo=UTC), g_order.start_time.ToDatetime(tzinfo=UTC))
    conn = await rls_connection(database_url)
    try:
        tag_events: TagEventService = server.app.tag_events
        # One message mixing both tenants' events, as the installation-wide stream delivers them.
        result = await tag_events.apply_tag_events(conn, [
            event(1, GOOD_TAG, 100, t0 + timedelta(seconds=1), ACME),
            event(2, GOOD_TAG, 500, t0 + timedelta(seconds=1), GLOBEX),
            event(3, GOOD_TAG, 110, t0 + timedelta(seconds=2), ACME),
            event(4, GOOD_TAG, 503, t0 + timedelta(seconds=2), GLOBEX),
            event(5, GOOD_TAG, 117, t0 + timedelta(seconds=3), ACME),
            event(6, GOOD_TAG, 9, t0 + timedelta(seconds=3), ""),  # no tenant: default's, where nothing is bound
        ])
        assert (result.cursor, result.applied, result.booked_good) == (6, 6, 17 + 3)
        a = (await acme.GetOrder(pb.GetOrderRequest(id=a_order.id))).order
        g = (await globex.GetOrder(pb.GetOrderRequest(id=g_order.id))).order
        assert (a.good_quantity, g.good_quantity) == (17, 3)
        # A replay books nothing in either tenant: the one cursor is the installation's.
        assert (await tag_events.apply_tag_events(conn, [event(5, GOOD_TAG, 900, t0, ACME)])).applied == 0
        # Each tenant's baseline is its own.
        with_tenant = await fetchval(database_url, "SELECT string_agg(tenant_id || '=' || value, ',' ORDER BY"
                                                   " tenant_id) FROM production.counter_state")
        assert with_tenant == "acme=117,globex=503"
        # An event naming something that is not a tenant code is passed (nowhere to record it), the others book.
        result = await tag_events.apply_tag_events(conn, [event(7, GOOD_TAG, 120, t0 + timedelta(seconds=4), ACME),
                                                          event(8, GOOD_TAG, 999, t0 + timedelta(seconds=4), "Acme!")])
        assert (result.cursor, result.applied, result.booked_good, result.anomalies) == (8, 2, 3, 0)
        assert (await acme.GetOrder(pb.GetOrderRequest(id=a_order.id))).order.good_quantity == 20
        # The connection outside a transaction that names a tenant sees none of it.
        assert await conn.fetchval("SELECT count(*) FROM orders") == 0
    finally:
        await conn.close()


class _Ingest(ipb_grpc.IngestServiceServicer):
    """An ingest that serves a fixed list of tag events, as the real one serves an installation-wide caller
    (every event naming its tenant), and records the tenant header each WatchTagEvents came with. With
    `caller`, the caller is that principal and the header is judged as the real interceptor judges it."""

    def __init__(self, events: list[tag_event_pb2.TagEvent], caller: principal.Principal | None = None):
        self.events = events
        self.caller = caller
        self.headers: list[str | None] = []

    async def WatchTagEvents(self, request: ipb.WatchTagEventsRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[ipb.WatchTagEventsResponse]:
        self.headers.append(tenancy.requested(context.invocation_metadata()))
        if self.caller is not None:
            try:
                principal.tenant_of_request(self.caller, self.headers[-1])
            except DomainError as exc:
                await abort_with(context, exc)
        fresh = [e for e in self.events if e.cursor > request.after_cursor]
        if fresh:
            yield ipb.WatchTagEventsResponse(events=fresh)
        await asyncio.Event().wait()  # nothing more: the stream stays open


async def test_the_consumer_reads_every_tenant_and_books_each_in_its_own(
        tenants: dict[str, pb_grpc.ProductionServiceStub], database_url: str) -> None:
    acme, globex = tenants[ACME], tenants[GLOBEX]
    await seed(acme)
    await seed(globex)
    # Globex bound Acme's scrap and state tag ids as its good counter's: Acme's events must not book there.
    await globex.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
        work_center=md.WorkCenter(id="press-1", production_counter_tag_id=SCRAP_TAG, scrap_counter_tag_id=GOOD_TAG,
                                  machine_state_tag_id=STATE_TAG),
        update_mask=field_mask_pb2.FieldMask(paths=["production_counter_tag_id", "scrap_counter_tag_id"])))
    a_order = await new_order(acme, "PO-1", planned=1000, start=True)
    g_order = await new_order(globex, "PO-1", planned=1000, start=True)
    t0 = max(a_order.start_time.ToDatetime(tzinfo=UTC), g_order.start_time.ToDatetime(tzinfo=UTC))
    fake = _Ingest([event(1, GOOD_TAG, 10, t0 + timedelta(seconds=1), ACME),
                    event(2, GOOD_TAG, 14, t0 + timedelta(seconds=2), ACME),
                    event(3, SCRAP_TAG, 0, t0 + timedelta(seconds=1), ACME),
                    event(4, SCRAP_TAG, 2, t0 + timedelta(seconds=2), ACME),
                    event(5, SCRAP_TAG, 40, t0 + timedelta(seconds=1), GLOBEX),
                    event(6, SCRAP_TAG, 45, t0 + timedelta(seconds=2), GLOBEX)])
    ingest = grpc.aio.server()
    ipb_grpc.add_IngestServiceServicer_to_server(fake, ingest)
    port = ingest.add_insecure_port("127.0.0.1:0")
    await ingest.start()
    host = await start_production(database_url, ingest_addr=f"127.0.0.1:{port}")
    try:
        await wait_for(lambda: host.app.consumer.cursor == 6)
        a = (await acme.GetOrder(pb.GetOrderRequest(id=a_order.id))).order
        g = (await globex.GetOrder(pb.GetOrderRequest(id=g_order.id))).order
        assert (a.good_quantity, a.scrap_quantity) == (4, 2)
        assert (g.good_quantity, g.scrap_quantity) == (5, 0)
        assert fake.headers and set(fake.headers) == {tenancy.ALL}, "the consumer asks ingest across tenants"
    finally:
        await host.stop(grace=0)
        await ingest.stop(0)


async def test_a_consumer_whose_identity_is_one_tenants_consumes_that_tenant(
        tenants: dict[str, pb_grpc.ProductionServiceStub], database_url: str) -> None:
    """A token of one tenant (as `fabrica run` mints production's, of default): ingest refuses it "*"; the
    consumer then reads that tenant's events (which name no tenant) and books them in that tenant."""
    acme, globex = tenants[ACME], tenants[GLOBEX]
    await seed(acme)
    await seed(globex)
    a_order = await new_order(acme, "PO-1", planned=1000, start=True)
    g_order = await new_order(globex, "PO-1", planned=1000, start=True)
    t0 = max(a_order.start_time.ToDatetime(tzinfo=UTC), g_order.start_time.ToDatetime(tzinfo=UTC))
    fake = _Ingest([event(1, GOOD_TAG, 10, t0 + timedelta(seconds=1), ""),
                    event(2, GOOD_TAG, 16, t0 + timedelta(seconds=2), "")],
                   caller=principal.Principal(subject="user:service-production", roles=frozenset({"viewer"}),
                                              tenant=ACME))
    ingest = grpc.aio.server()
    ipb_grpc.add_IngestServiceServicer_to_server(fake, ingest)
    port = ingest.add_insecure_port("127.0.0.1:0")
    await ingest.start()
    host = await start_production(database_url, ingest_addr=f"127.0.0.1:{port}")
    try:
        await wait_for(lambda: host.app.consumer.cursor == 2)
        assert fake.headers[:2] == [tenancy.ALL, ACME], "asked for every tenant first, then for its own"
        assert (await acme.GetOrder(pb.GetOrderRequest(id=a_order.id))).order.good_quantity == 6
        assert (await globex.GetOrder(pb.GetOrderRequest(id=g_order.id))).order.good_quantity == 0
    finally:
        await host.stop(grace=0)
        await ingest.stop(0)


class _Config(cpb_grpc.ConfigServiceServicer):
    """A config whose PLCs are each one tenant's: GetPlc answers a PLC of the tenant the header names only."""

    def __init__(self, plcs: dict[tuple[str, str], plc_pb2.Plc]):
        self.plcs = plcs
        self.headers: list[str | None] = []

    async def GetPlc(self, request: cpb.GetPlcRequest, context: grpc.aio.ServicerContext) -> cpb.GetPlcResponse:
        tenant = tenancy.requested(context.invocation_metadata())
        self.headers.append(tenant)
        plc = self.plcs.get((tenant or "", request.id))
        if plc is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no PLC {request.id!r}")
        return cpb.GetPlcResponse(plc=plc)


async def test_bindings_are_checked_against_the_tenants_own_plcs(
        tenants: dict[str, pb_grpc.ProductionServiceStub], database_url: str) -> None:
    """Config is asked in the request's tenant: Globex cannot bind a tag of Acme's PLC (TAG_NOT_FOUND)."""
    tags = [plc_pb2.Tag(id=GOOD_TAG, name="good", role=reading_pb2.TAG_ROLE_PRODUCTION_COUNTER),
            plc_pb2.Tag(id=SCRAP_TAG, name="scrap", role=reading_pb2.TAG_ROLE_SCRAP_COUNTER),
            plc_pb2.Tag(id=STATE_TAG, name="state", role=reading_pb2.TAG_ROLE_MACHINE_STATE)]
    fake = _Config({(ACME, "press-plc"): plc_pb2.Plc(id="press-plc", tags=tags)})
    config = grpc.aio.server()
    cpb_grpc.add_ConfigServiceServicer_to_server(fake, config)
    port = config.add_insecure_port("127.0.0.1:0")
    await config.start()
    host = await start_production(database_url, config_addr=f"127.0.0.1:{port}")
    channels = [peer_channel(host.address, None, tenant=t) for t in (ACME, GLOBEX)]
    acme, globex = (pb_grpc.ProductionServiceStub(c) for c in channels)
    try:
        await seed(acme)  # press-1 bound to press-plc's tags: config (Acme's) agrees
        await globex.CreateSector(pb.CreateSectorRequest(sector=md.Sector(id="pressing", display_name="Pressing")))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await globex.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=md.WorkCenter(
                id="press-1", display_name="Press 1", sector_id="pressing", plc_id="press-plc",
                production_counter_tag_id=GOOD_TAG)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert [(v.type, v.subject) for v in precondition_violations(err.value)] == [
            ("TAG_NOT_FOUND", f"tags/{GOOD_TAG}")]
        assert fake.headers == [ACME, GLOBEX]
    finally:
        for c in channels:
            await c.close()
        await host.stop(grace=0)
        await config.stop(0)


async def _populate_every_table(acme: pb_grpc.ProductionServiceStub, tag_events: TagEventService,
                                database_url: str) -> None:
    await seed(acme)
    await acme.CreateReferenceType(pb.CreateReferenceTypeRequest(reference_type=md.ReferenceType(
        id="BRACKETS", display_name="Brackets")))
    await acme.CreateItem(pb.CreateItemRequest(item=md.Item(
        id="BRK-200", display_name="Bracket L", ideal_cycle_time=duration_pb2.Duration(seconds=3),
        reference_type_id="BRACKETS")))
    order = (await acme.CreateOrder(pb.CreateOrderRequest(request_id="7c3f1c8e-2f57-4f0a-9a0e-5d1b2c3d4e5f",
                                                          order=S.Order(number="PO-1", item_id="BRK-100",
                                                                        work_center_id="press-1",
                                                                        planned_quantity=100)))).order
    order = (await acme.StartOrder(pb.StartOrderRequest(id=order.id))).order
    await acme.CreateBooking(pb.CreateBookingRequest(booking=S.Booking(order_id=order.id, good_quantity=1)))
    await acme.CreateDefect(pb.CreateDefectRequest(defect=S.Defect(order_id=order.id, defect_code_id="BURR",
                                                                   quantity=1)))
    await acme.CreateDowntime(pb.CreateDowntimeRequest(downtime=S.Downtime(
        work_center_id="press-1", start_time=ts(datetime.now(UTC) - timedelta(minutes=1)))))
    t0 = order.start_time.ToDatetime(tzinfo=UTC)
    conn = await rls_connection(database_url)
    try:
        string = event(3, GOOD_TAG, 0, t0 + timedelta(seconds=3), ACME)
        string.value.string_value = "jammed"  # an anomaly
        await tag_events.apply_tag_events(conn, [event(1, GOOD_TAG, 5, t0 + timedelta(seconds=1), ACME),
                                                 event(2, STATE_TAG, 1, t0 + timedelta(seconds=2), ACME), string])
    finally:
        await conn.close()


async def test_without_a_tenant_no_table_shows_a_row(tenants: dict[str, pb_grpc.ProductionServiceStub],
                                                     server: Server, database_url: str) -> None:
    await _populate_every_table(tenants[ACME], server.app.tag_events, database_url)
    admin = await asyncpg.connect(database_url)
    try:
        tables = {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in await admin.fetch(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'production' AND c.relkind IN ('r', 'p')")}
    finally:
        await admin.close()
    assert set(UNSCOPED_TABLES) <= set(tables), "the allow-list names only tables that exist"
    scoped = set(tables) - set(UNSCOPED_TABLES)
    assert scoped == set(TENANT_TABLES) | {"audit_entries"}
    assert {t for t in scoped if tables[t] != (True, True)} == set(), "row-level security enabled and forced"

    conn = await rls_connection(database_url)
    try:
        for table in sorted(scoped):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, f"{table}: rows seen without a tenant"
        async with conn.transaction():
            await conn.execute(f"SELECT set_config('{tenancy.SETTING}', '*', true)")
            empty = [t for t in sorted(scoped) if await conn.fetchval(f"SELECT count(*) FROM {t}") == 0]
        assert empty == [], "every table has rows (of acme): the counts above could have failed"
        async with conn.transaction():
            await conn.execute(f"SELECT set_config('{tenancy.SETTING}', 'globex', true)")
            assert [t for t in sorted(scoped) if await conn.fetchval(f"SELECT count(*) FROM {t}")] == []
        # A write without a tenant is refused too: the policy's check, or tenant_id's NOT NULL.
        with pytest.raises((asyncpg.InsufficientPrivilegeError, asyncpg.NotNullViolationError)):
            await conn.execute("INSERT INTO sectors (id, display_name, revision, create_time, update_time)"
                               " VALUES ('x', 'X', 1, now(), now())")
    finally:
        await conn.close()


async def test_reference_types_group_items(tenants: dict[str, pb_grpc.ProductionServiceStub]) -> None:
    acme, globex = tenants[ACME], tenants[GLOBEX]
    rt = (await acme.CreateReferenceType(pb.CreateReferenceTypeRequest(reference_type=md.ReferenceType(
        id="BRACKETS", display_name="Brackets", description="Steel brackets, all sizes")))).reference_type
    assert rt.etag and rt.HasField("create_time")
    assert (await acme.GetReferenceType(pb.GetReferenceTypeRequest(id="BRACKETS"))).reference_type == rt
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await acme.CreateReferenceType(pb.CreateReferenceTypeRequest(reference_type=md.ReferenceType(
            id="BRACKETS", display_name="Again")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await acme.CreateReferenceType(pb.CreateReferenceTypeRequest(reference_type=md.ReferenceType(
            id="-bad-", display_name="")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err.value)) >= {"reference_type.id", "reference_type.display_name"}
    await acme.CreateReferenceType(pb.CreateReferenceTypeRequest(reference_type=md.ReferenceType(
        id="CLIPS", display_name="Clips")))

    def item(item_id: str, rt_id: str) -> md.Item:
        return md.Item(id=item_id, display_name=item_id, ideal_cycle_time=duration_pb2.Duration(seconds=1),
                       reference_type_id=rt_id)

    await acme.CreateItem(pb.CreateItemRequest(item=item("BRK-1", "BRACKETS")))
    await acme.CreateItem(pb.CreateItemRequest(item=item("BRK-2", "BRACKETS")))
    await acme.CreateItem(pb.CreateItemRequest(item=item("CLP-1", "CLIPS")))
    await acme.CreateItem(pb.CreateItemRequest(item=item("LOOSE", "")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await acme.CreateItem(pb.CreateItemRequest(item=item("X-1", "NUTS")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [(v.type, v.subject) for v in precondition_violations(err.value)] == [
        ("REFERENCE_TYPE", "referenceTypes/NUTS")]
    # Another tenant's reference type does not exist for Globex: neither to read nor to group under.
    await not_found(globex.GetReferenceType(pb.GetReferenceTypeRequest(id="BRACKETS")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await globex.CreateItem(pb.CreateItemRequest(item=item("BRK-1", "BRACKETS")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not (await globex.ListReferenceTypes(pb.ListReferenceTypesRequest())).reference_types

    async def ids(rt_id: str = "", page_size: int = 0) -> list[str]:
        out, token = [], ""
        while True:
            page = await acme.ListItems(pb.ListItemsRequest(reference_type_id=rt_id, page_size=page_size,
                                                            page_token=token))
            out += [(i.id, i.reference_type_id) for i in page.items]
            token = page.next_page_token
            if not token:
                return out

    assert await ids("BRACKETS", page_size=1) == [("BRK-1", "BRACKETS"), ("BRK-2", "BRACKETS")]
    assert await ids("CLIPS") == [("CLP-1", "CLIPS")]
    assert await ids() == [("BRK-1", "BRACKETS"), ("BRK-2", "BRACKETS"), ("CLP-1", "CLIPS"), ("LOOSE", "")]
    assert [r.id for r in (await acme.ListReferenceTypes(pb.ListReferenceTypesRequest())).reference_types] == [
        "BRACKETS", "CLIPS"]

    # Regroup an item, ungroup another; an update naming a reference type that does not exist is refused.
    await acme.UpdateItem(pb.UpdateItemRequest(item=md.Item(id="BRK-2", reference_type_id="CLIPS"),
                                               update_mask=field_mask_pb2.FieldMask(paths=["reference_type_id"])))
    await acme.UpdateItem(pb.UpdateItemRequest(item=md.Item(id="BRK-1"),
                                               update_mask=field_mask_pb2.FieldMask(paths=["reference_type_id"])))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await acme.UpdateItem(pb.UpdateItemRequest(item=md.Item(id="LOOSE", reference_type_id="NUTS"),
                                                   update_mask=field_mask_pb2.FieldMask(paths=["reference_type_id"])))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await ids("CLIPS") == [("BRK-2", "CLIPS"), ("CLP-1", "CLIPS")]
    assert await ids("BRACKETS") == []

    clips = (await acme.GetReferenceType(pb.GetReferenceTypeRequest(id="CLIPS"))).reference_type
    changed = (await acme.UpdateReferenceType(pb.UpdateReferenceTypeRequest(
        reference_type=md.ReferenceType(id="CLIPS", description="Spring clips", etag=clips.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["description"])))).reference_type
    assert (changed.display_name, changed.description) == ("Clips", "Spring clips") and changed.etag != clips.etag
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await acme.UpdateReferenceType(pb.UpdateReferenceTypeRequest(
            reference_type=md.ReferenceType(id="CLIPS", display_name="Stale", etag=clips.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
    assert err.value.code() == grpc.StatusCode.ABORTED

    # A reference type items are grouped under cannot be deleted; an empty one can.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await acme.DeleteReferenceType(pb.DeleteReferenceTypeRequest(id="CLIPS"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [v.type for v in precondition_violations(err.value)] == ["IN_USE"]
    await acme.DeleteReferenceType(pb.DeleteReferenceTypeRequest(id="BRACKETS"))
    await not_found(acme.GetReferenceType(pb.GetReferenceTypeRequest(id="BRACKETS")))
    await not_found(acme.DeleteReferenceType(pb.DeleteReferenceTypeRequest(id="BRACKETS")))


async def test_data_from_before_tenants_is_the_default_tenants(database_url: str) -> None:
    """Migration 3 on a schema with rows: they belong to ``default``, keys and the order revision survive, and
    the default tenant goes on from where it was."""
    admin = await asyncpg.connect(database_url)
    try:
        assert await apply_migrations(admin, "production", MIGRATIONS[:2]) == [1, 2]
        await admin.execute("""
            SET search_path TO production;
            INSERT INTO sectors VALUES ('pressing', 'Pressing', 1, now(), now());
            INSERT INTO work_centers VALUES ('press-1', 'Press 1', 'pressing', 'plc', 101, 0, 0, 16, 1000, 2, now(), now());
            INSERT INTO tag_bindings VALUES (101, 'press-1', 1);
            INSERT INTO items VALUES ('BRK-100', 'Bracket', 2000000000, 3, now(), now());
            UPDATE order_revision SET value = 41;
            INSERT INTO orders (number, item_id, work_center_id, planned_quantity, state, revision, create_time,
                                update_time) VALUES ('PO-1', 'BRK-100', 'press-1', 10, 1, 41, now(), now());
            INSERT INTO create_requests (kind, request_id, resource_id) VALUES ('order', 'r-1', '1');
        """)
        assert await apply_migrations(admin, "production", MIGRATIONS) == [3]
        for table in ("sectors", "work_centers", "tag_bindings", "items", "orders", "order_revision", "create_requests"):
            assert await admin.fetchval(f"SELECT string_agg(DISTINCT tenant_id, ',') FROM production.{table}") == \
                "default", table
    finally:
        await admin.close()
    pool = await create_pool(database_url, "production")
    try:
        with tenancy.scope(tenancy.DEFAULT):
            async with Database(pool).write() as conn:
                await common.lock_revision(conn)
                assert await common.next_revision(conn) == 42
                assert (await orders.get(conn, "1")).number == "PO-1"
        with tenancy.scope(ACME):
            async with Database(pool).write() as conn:
                await common.lock_revision(conn)
                assert await common.next_revision(conn) == 1, "a new tenant's revisions start at 1"
                with pytest.raises(NotFound):
                    await orders.get(conn, "1")
    finally:
        await pool.close()
