"""Issue 15, "must show": two tenants with the same ids; every RPC of every Fabrica service, called with tenant
acme's admin token on tenant globex's resource ids, is NOT_FOUND or an answer without globex's data, and
watches of acme never carry globex's changes. Real services with TLS and tokens, real Postgres (stack.py).

The test is generated from the descriptors: every method of every ``fabrica.*`` service must have an entry in
`TABLE` (how to fill its request with globex's ids, and whether it reads, writes or creates); a method
without one fails the test ("add <method> to the isolation table"), so a new RPC cannot be forgotten.

For each method acme's answer is judged three ways:
- it carries nothing of globex's (stack.leaks: globex's names, numbers, tag ids and only-ids);
- it is OK (acme's own, or empty), NOT_FOUND, or exactly what an id that exists nowhere gets (the same status
  code): anything else (PERMISSION_DENIED, ALREADY_EXISTS, FAILED_PRECONDITION on globex's id only) tells acme
  that globex's resource exists;
- reads have a positive control: the same request made by globex's admin is OK and shows globex's data, so the
  request really reaches globex's resource (a NOT_FOUND for acme is then isolation, not a wrong request).
Writes and creates run after the reads; afterwards globex's resources, read by globex, are unchanged.

The collector's admin API (CollectorService) is not in the stack: it is served by one collector process,
of one tenant, about its own PLCs (TABLE says so per method); see the report of issue 15 for the check a
collector should make on a token of another tenant.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from fabrica.alarm.v1 import alarm_service_pb2 as alarm_pb
from fabrica.alarm.v1 import alarm_service_pb2_grpc
from fabrica.alarm.v1 import notify_pb2, rule_pb2
from fabrica.collector.v1 import collector_service_pb2_grpc
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import config_service_pb2_grpc
from fabrica.config.v1 import device_profile_pb2, plc_pb2, tenant_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as ingest_pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc, query_pb2
from fabrica.common.v1 import reading_pb2
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2
from fabrica.production.v1 import production_service_pb2 as prod_pb
from fabrica.production.v1 import production_service_pb2_grpc
from google.protobuf import duration_pb2, field_mask_pb2

from in_process import Servers

from .stack import COLLECTOR, PLC, SECRET, TIMEOUT, Caller, Ids, TenantStack, collect, leaks, nowhere, start_stack, text, \
    ts, wait_until

#: The generated modules whose services the table must cover: every Fabrica service.
SERVICE_MODULES = (config_service_pb2_grpc, ingest_service_pb2_grpc, production_service_pb2_grpc,
                   alarm_service_pb2_grpc, collector_service_pb2_grpc)
STREAM_SECONDS = 1.5
INTRUDER_VALUE = 6661.5  # what acme's collector writes on globex's tag ids: never in globex's readings

READ, WRITE, CREATE, CUSTOM, NOT_IN_STACK = "read", "write", "create", "custom", "not in stack"
#: acme's own ids, for the requests that need one of acme's (a rule on acme's tag) whatever ids they target.
OWN: contextvars.ContextVar[Ids] = contextvars.ContextVar("own_ids", default=nowhere())
#: What ResetCollectorSequence sets acme's cell-1 to: where it already is (3 batches streamed at set-up).
OWN_SEQUENCE = 3


@dataclass(frozen=True)
class Entry:
    """How to call one method with ids (globex's, or ids that exist nowhere) and what it does."""

    kind: str
    build: Callable[[Ids], Any] | None = None
    #: "admin" (the tenant's admin token) or "collector" (the tenant's collector cell-1).
    caller: str = "admin"
    #: Reads: globex's own call must show globex's data (False where the answer is legitimately empty).
    control: bool = True
    #: Why there is no call (kind NOT_IN_STACK) or what a CUSTOM entry checks.
    note: str = ""
    #: Writes and creates: what acme gets on ids that exist nowhere (status code names). Anything else means
    #: the table's request is refused for its own sake (fix the table), so it proves nothing about globex.
    absent: tuple[str, ...] = ()

    @property
    def expected_absent(self) -> tuple[str, ...]:
        return self.absent or (("OK",) if self.kind == CREATE else ("NOT_FOUND",))


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def span(ids: Ids) -> dict[str, Any]:
    import time
    now = time.time()
    return {"start_time": ts(now - 3600), "end_time": ts(now + 3600)}


def reading_filter(ids: Ids) -> query_pb2.ReadingFilter:
    return query_pb2.ReadingFilter(tag_ids=ids.tags, **span(ids))


C, I, P, A = ("fabrica.config.v1.ConfigService", "fabrica.ingest.v1.IngestService",
              "fabrica.production.v1.ProductionService", "fabrica.alarm.v1.AlarmService")
K = "fabrica.collector.v1.CollectorService"
_COLLECTOR_NOTE = ("the collector's admin API is served by one collector process about its own PLCs; it holds "
                   "no other tenant's data, and is not part of this stack: a caller of another tenant is NOT_FOUND "
                   "on each of its RPCs (tests/collector/test_admin_api.py "
                   "test_a_caller_of_another_tenant_finds_no_collector)")

TABLE: dict[str, Entry] = {
    # --- config -----------------------------------------------------------------------------------------
    f"{C}/GetPlc": Entry(READ, lambda g: config_pb.GetPlcRequest(id=g.only_plc)),
    f"{C}/ListPlcs": Entry(READ, lambda g: config_pb.ListPlcsRequest(collector_id=g.collector)),
    # The built-ins and the tenant's own profiles (globex's control: its press-profile and gx-only-profile).
    f"{C}/ListDeviceProfiles": Entry(READ, lambda g: config_pb.ListDeviceProfilesRequest()),
    f"{C}/GetDeviceProfile": Entry(READ, lambda g: config_pb.GetDeviceProfileRequest(id=g.only_profile)),
    f"{C}/WatchPlcs": Entry(READ, lambda g: config_pb.WatchPlcsRequest(collector_id=COLLECTOR), caller="collector"),
    f"{C}/ListCollectors": Entry(READ, lambda g: config_pb.ListCollectorsRequest()),
    f"{C}/ListAuditEntries": Entry(READ, lambda g: config_pb.ListAuditEntriesRequest(page_size=500)),
    f"{C}/GetTenant": Entry(READ, lambda g: config_pb.GetTenantRequest(code=g.tenant)),
    f"{C}/ListTenants": Entry(READ, lambda g: config_pb.ListTenantsRequest()),
    f"{C}/UpdatePlc": Entry(WRITE, lambda g: config_pb.UpdatePlcRequest(
        plc=plc_pb2.Plc(id=g.only_plc, display_name="Acme renamed"), update_mask=mask("display_name"))),
    f"{C}/DeletePlc": Entry(WRITE, lambda g: config_pb.DeletePlcRequest(id=g.only_plc)),
    f"{C}/DeleteDeviceProfile": Entry(WRITE, lambda g: config_pb.DeleteDeviceProfileRequest(id=g.only_profile)),
    # acme's own cell-1 reports (OK): globex's cell-1 keeps its status (the after-view compares).
    f"{C}/ReportCollectorStatus": Entry(WRITE, lambda g: config_pb.ReportCollectorStatusRequest(
        collector_id=COLLECTOR, applied_revision=999), caller="collector", absent=("OK",)),
    # Installation-wide admins only: a tenant's admin is refused whatever the code (that confirms nothing).
    f"{C}/UpdateTenant": Entry(WRITE, lambda g: config_pb.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(code=g.tenant, name="Acme took over"), update_mask=mask("name")),
        absent=("PERMISSION_DENIED", "NOT_FOUND")),
    f"{C}/CreatePlc": Entry(CREATE, lambda g: config_pb.CreatePlcRequest(plc=_acme_plc(g.only_plc))),
    f"{C}/CreatePlcFromProfile": Entry(CREATE, lambda g: config_pb.CreatePlcFromProfileRequest(
        profile_id="eastron-sdm120", plc=_acme_plc(g.only_plc + "-p", tags=False))),
    # Ids are unique per tenant: acme creates its own profile under globex's only id (OK, acme's).
    f"{C}/CreateDeviceProfile": Entry(CREATE, lambda g: config_pb.CreateDeviceProfileRequest(
        profile=_acme_profile(g.only_profile))),
    f"{C}/CreateTenant": Entry(CREATE, lambda g: config_pb.CreateTenantRequest(
        tenant=tenant_pb2.Tenant(code=g.tenant, name="Acme's copy", active=True)), absent=("PERMISSION_DENIED",)),
    # --- ingest -----------------------------------------------------------------------------------------
    f"{I}/StreamReadings": Entry(CUSTOM, caller="collector", note="acme's cell-1 resumes at acme's sequence, and "
                                 "a batch of acme's on globex's tag ids does not change globex's readings"),
    # acme's cell-1 describing globex's tag ids: acme's own tags, or refused as ids that exist nowhere are;
    # globex's tags keep their roles (the after-view reads them).
    f"{I}/SyncTags": Entry(WRITE, lambda g: ingest_pb.SyncTagsRequest(collector_id=COLLECTOR, tags=[
        ingest_pb.TagInfo(tag_id=tag, plc_id=PLC, name="Acme_intruder", role=reading_pb2.TAG_ROLE_MEASUREMENT)
        for tag in g.tags]), caller="collector", absent=("OK", "NOT_FOUND", "INVALID_ARGUMENT",
                                                          "FAILED_PRECONDITION")),
    f"{I}/WatchTagEvents": Entry(READ, lambda g: ingest_pb.WatchTagEventsRequest(tag_ids=g.tags)),
    f"{I}/WatchCommittedReadings": Entry(READ, lambda g: ingest_pb.WatchCommittedReadingsRequest(tag_ids=g.tags)),
    f"{I}/QueryReadings": Entry(READ, lambda g: ingest_pb.QueryReadingsRequest(filter=reading_filter(g),
                                                                                page_size=500)),
    f"{I}/ExportReadings": Entry(READ, lambda g: ingest_pb.ExportReadingsRequest(filter=reading_filter(g))),
    f"{I}/AggregateReadings": Entry(READ, lambda g: ingest_pb.AggregateReadingsRequest(
        filter=query_pb2.ReadingFilter(tag_ids=[g.measurement_tag], **span(g)), bucket_seconds=60)),
    f"{I}/GetLatestValues": Entry(READ, lambda g: ingest_pb.GetLatestValuesRequest(tag_ids=g.tags)),
    f"{I}/WatchLatestValues": Entry(READ, lambda g: ingest_pb.WatchLatestValuesRequest(tag_ids=g.tags)),
    f"{I}/SummarizeReadings": Entry(READ, lambda g: ingest_pb.SummarizeReadingsRequest(
        tag_id=g.measurement_tag, **span(g))),
    # ingest audits tag syncs and sequence resets, whose actor is the collector (cell-1 in both tenants):
    # nothing in globex's own entries says "globex", so no control; acme's must still carry none of globex's.
    f"{I}/ListAuditEntries": Entry(READ, lambda g: ingest_pb.ListAuditEntriesRequest(page_size=500),
                                   control=False),
    # cell-1 is acme's own too (OK, acme's sequence): globex's sequence stays (the StreamReadings check and
    # the after-view's resume).
    f"{I}/ResetCollectorSequence": Entry(WRITE, lambda g: ingest_pb.ResetCollectorSequenceRequest(
        collector_id=g.collector, committed_sequence=OWN_SEQUENCE)),
    # --- production -------------------------------------------------------------------------------------
    f"{P}/GetSector": Entry(READ, lambda g: prod_pb.GetSectorRequest(id=g.only_sector)),
    f"{P}/ListSectors": Entry(READ, lambda g: prod_pb.ListSectorsRequest(page_size=500)),
    f"{P}/GetWorkCenter": Entry(READ, lambda g: prod_pb.GetWorkCenterRequest(id=g.work_center)),
    f"{P}/ListWorkCenters": Entry(READ, lambda g: prod_pb.ListWorkCentersRequest(page_size=500)),
    f"{P}/GetItem": Entry(READ, lambda g: prod_pb.GetItemRequest(id=g.only_item)),
    f"{P}/ListItems": Entry(READ, lambda g: prod_pb.ListItemsRequest(page_size=500)),
    f"{P}/GetDefectCode": Entry(READ, lambda g: prod_pb.GetDefectCodeRequest(id=g.only_defect_code)),
    f"{P}/ListDefectCodes": Entry(READ, lambda g: prod_pb.ListDefectCodesRequest(page_size=500)),
    f"{P}/GetDowntimeReason": Entry(READ, lambda g: prod_pb.GetDowntimeReasonRequest(id=g.only_reason)),
    f"{P}/ListDowntimeReasons": Entry(READ, lambda g: prod_pb.ListDowntimeReasonsRequest(page_size=500)),
    f"{P}/GetOrder": Entry(READ, lambda g: prod_pb.GetOrderRequest(id=g.only_order)),
    f"{P}/ListOrders": Entry(READ, lambda g: prod_pb.ListOrdersRequest(work_center_id=g.work_center,
                                                                       page_size=500)),
    f"{P}/ListBookings": Entry(READ, lambda g: prod_pb.ListBookingsRequest(order_id=g.order, page_size=500)),
    f"{P}/ListDefects": Entry(READ, lambda g: prod_pb.ListDefectsRequest(order_id=g.order, page_size=500)),
    f"{P}/ListDowntimes": Entry(READ, lambda g: prod_pb.ListDowntimesRequest(work_center_id=g.work_center,
                                                                             page_size=500)),
    f"{P}/GetOee": Entry(READ, lambda g: prod_pb.GetOeeRequest(order_id=g.order)),
    f"{P}/WatchOrders": Entry(READ, lambda g: prod_pb.WatchOrdersRequest(work_center_id=g.work_center)),
    f"{P}/ListAuditEntries": Entry(READ, lambda g: prod_pb.ListAuditEntriesRequest(page_size=500)),
    f"{P}/UpdateSector": Entry(WRITE, lambda g: prod_pb.UpdateSectorRequest(
        sector=md.Sector(id=g.only_sector, display_name="Acme renamed"), update_mask=mask("display_name"))),
    f"{P}/DeleteSector": Entry(WRITE, lambda g: prod_pb.DeleteSectorRequest(id=g.only_sector)),
    f"{P}/UpdateWorkCenter": Entry(WRITE, lambda g: prod_pb.UpdateWorkCenterRequest(
        work_center=md.WorkCenter(id=g.work_center, display_name="Acme renamed line"),
        update_mask=mask("display_name"))),
    f"{P}/DeleteWorkCenter": Entry(WRITE, lambda g: prod_pb.DeleteWorkCenterRequest(id=g.only_work_center)),
    f"{P}/UpdateItem": Entry(WRITE, lambda g: prod_pb.UpdateItemRequest(
        item=md.Item(id=g.only_item, display_name="Acme renamed"), update_mask=mask("display_name"))),
    f"{P}/DeleteItem": Entry(WRITE, lambda g: prod_pb.DeleteItemRequest(id=g.only_item)),
    f"{P}/UpdateDefectCode": Entry(WRITE, lambda g: prod_pb.UpdateDefectCodeRequest(
        defect_code=md.DefectCode(id=g.only_defect_code, display_name="Acme renamed"),
        update_mask=mask("display_name"))),
    f"{P}/DeleteDefectCode": Entry(WRITE, lambda g: prod_pb.DeleteDefectCodeRequest(id=g.only_defect_code)),
    f"{P}/UpdateDowntimeReason": Entry(WRITE, lambda g: prod_pb.UpdateDowntimeReasonRequest(
        downtime_reason=md.DowntimeReason(id=g.only_reason, display_name="Acme renamed"),
        update_mask=mask("display_name"))),
    f"{P}/DeleteDowntimeReason": Entry(WRITE, lambda g: prod_pb.DeleteDowntimeReasonRequest(id=g.only_reason)),
    f"{P}/StartOrder": Entry(WRITE, lambda g: prod_pb.StartOrderRequest(id=g.only_order)),
    f"{P}/PauseOrder": Entry(WRITE, lambda g: prod_pb.PauseOrderRequest(id=g.order)),
    f"{P}/ResumeOrder": Entry(WRITE, lambda g: prod_pb.ResumeOrderRequest(id=g.order)),
    f"{P}/CompleteOrder": Entry(WRITE, lambda g: prod_pb.CompleteOrderRequest(id=g.only_order)),
    f"{P}/CancelOrder": Entry(WRITE, lambda g: prod_pb.CancelOrderRequest(id=g.only_order, reason="acme")),
    f"{P}/CreateBooking": Entry(WRITE, lambda g: prod_pb.CreateBookingRequest(booking=order_pb2.Booking(
        order_id=g.only_order, good_quantity=1, note="Acme booking"))),
    f"{P}/CreateDefect": Entry(WRITE, lambda g: prod_pb.CreateDefectRequest(defect=order_pb2.Defect(
        order_id=g.only_order, defect_code_id=g.only_defect_code, quantity=1))),
    # On acme's own work centre press-1, for globex's order: the order is not found.
    f"{P}/CreateDowntime": Entry(WRITE, lambda g: prod_pb.CreateDowntimeRequest(downtime=order_pb2.Downtime(
        work_center_id="press-1", order_id=g.only_order, start_time=span(g)["start_time"],
        note="Acme downtime")), absent=("OK", "NOT_FOUND")),  # (production does not check the order's id)
    f"{P}/ClassifyDowntime": Entry(WRITE, lambda g: prod_pb.ClassifyDowntimeRequest(
        id=g.only_downtime, reason_id=g.reason, note="Acme classified")),
    f"{P}/EndDowntime": Entry(WRITE, lambda g: prod_pb.EndDowntimeRequest(id=g.downtime)),
    f"{P}/CreateSector": Entry(CREATE, lambda g: prod_pb.CreateSectorRequest(
        sector=md.Sector(id=g.only_sector, display_name="Acme sector"))),
    f"{P}/CreateWorkCenter": Entry(CREATE, lambda g: prod_pb.CreateWorkCenterRequest(work_center=md.WorkCenter(
        id=g.only_work_center, display_name="Acme line", sector_id="pressing", plc_id=PLC,
        counter_width=32, max_counter_jump=1000))),
    f"{P}/CreateItem": Entry(CREATE, lambda g: prod_pb.CreateItemRequest(item=md.Item(
        id=g.only_item, display_name="Acme item", ideal_cycle_time=duration_pb2.Duration(seconds=1)))),
    f"{P}/CreateDefectCode": Entry(CREATE, lambda g: prod_pb.CreateDefectCodeRequest(defect_code=md.DefectCode(
        id=g.only_defect_code, display_name="Acme defect", severity=md.SEVERITY_MINOR))),
    f"{P}/CreateDowntimeReason": Entry(CREATE, lambda g: prod_pb.CreateDowntimeReasonRequest(
        downtime_reason=md.DowntimeReason(id=g.only_reason, display_name="Acme reason", color="#123456"))),
    f"{P}/CreateOrder": Entry(CREATE, lambda g: prod_pb.CreateOrderRequest(order=order_pb2.Order(
        number=g.only_order_number, item_id="BRK-100", work_center_id="press-1", planned_quantity=5))),
    # --- alarm ------------------------------------------------------------------------------------------
    f"{A}/GetAlarmRule": Entry(READ, lambda g: alarm_pb.GetAlarmRuleRequest(id=g.only_rule)),
    f"{A}/ListAlarmRules": Entry(READ, lambda g: alarm_pb.ListAlarmRulesRequest(page_size=500)),
    f"{A}/ListAlarms": Entry(READ, lambda g: alarm_pb.ListAlarmsRequest(page_size=500, include_normal=True)),
    f"{A}/ListAlarmEvents": Entry(READ, lambda g: alarm_pb.ListAlarmEventsRequest(page_size=500, **span(g))),
    f"{A}/WatchAlarms": Entry(READ, lambda g: alarm_pb.WatchAlarmsRequest()),
    f"{A}/GetNotificationTarget": Entry(READ, lambda g: alarm_pb.GetNotificationTargetRequest(id=g.only_target)),
    f"{A}/ListNotificationTargets": Entry(READ, lambda g: alarm_pb.ListNotificationTargetsRequest()),
    f"{A}/ListDeliveries": Entry(READ, lambda g: alarm_pb.ListDeliveriesRequest(target_id=g.only_target),
                                 control=False),
    f"{A}/GetForwardingTarget": Entry(READ, lambda g: alarm_pb.GetForwardingTargetRequest(id=g.only_forwarding)),
    f"{A}/ListForwardingTargets": Entry(READ, lambda g: alarm_pb.ListForwardingTargetsRequest()),
    f"{A}/UpdateAlarmRule": Entry(WRITE, lambda g: alarm_pb.UpdateAlarmRuleRequest(
        rule=rule_pb2.AlarmRule(id=g.only_rule, display_name="Acme renamed"), update_mask=mask("display_name"))),
    f"{A}/DeleteAlarmRule": Entry(WRITE, lambda g: alarm_pb.DeleteAlarmRuleRequest(id=g.only_rule)),
    f"{A}/AcknowledgeAlarm": Entry(WRITE, lambda g: alarm_pb.AcknowledgeAlarmRequest(
        rule_id=g.only_rule, tag_id=g.measurement_tag, note="Acme ack")),
    f"{A}/ShelveAlarm": Entry(WRITE, lambda g: alarm_pb.ShelveAlarmRequest(
        rule_id=g.only_rule, tag_id=g.measurement_tag, duration=duration_pb2.Duration(seconds=600), note="Acme")),
    f"{A}/UpdateNotificationTarget": Entry(WRITE, lambda g: alarm_pb.UpdateNotificationTargetRequest(
        target=notify_pb2.NotificationTarget(id=g.only_target, display_name="Acme renamed"),
        update_mask=mask("display_name"))),
    f"{A}/DeleteNotificationTarget": Entry(WRITE, lambda g: alarm_pb.DeleteNotificationTargetRequest(
        id=g.only_target)),
    f"{A}/UpdateForwardingTarget": Entry(WRITE, lambda g: alarm_pb.UpdateForwardingTargetRequest(
        target=notify_pb2.ForwardingTarget(id=g.only_forwarding, display_name="Acme renamed"),
        update_mask=mask("display_name"))),
    f"{A}/DeleteForwardingTarget": Entry(WRITE, lambda g: alarm_pb.DeleteForwardingTargetRequest(
        id=g.only_forwarding)),
    f"{A}/CreateAlarmRule": Entry(CREATE, lambda g: alarm_pb.CreateAlarmRuleRequest(rule=rule_pb2.AlarmRule(
        id=g.only_rule, display_name="Acme rule", severity=rule_pb2.SEVERITY_LOW, enabled=False,
        target=rule_pb2.RuleTarget(tag=rule_pb2.TagTarget(plc_id=PLC, tag_id=OWN.get().measurement_tag)),
        condition=rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(
            comparison=rule_pb2.COMPARISON_GREATER, number=1e9)),
        message_template="{tag}"))),
    f"{A}/CreateNotificationTarget": Entry(CREATE, lambda g: alarm_pb.CreateNotificationTargetRequest(
        target=notify_pb2.NotificationTarget(id=g.only_target, display_name="Acme pager", secret=SECRET,
                                             url="https://acme.example/hook", enabled=False))),
    f"{A}/CreateForwardingTarget": Entry(CREATE, lambda g: alarm_pb.CreateForwardingTargetRequest(
        target=notify_pb2.ForwardingTarget(id=g.only_forwarding, display_name="Acme forward", plc_ids=[PLC],
                                           http=notify_pb2.ForwardingTarget.Http(url="https://acme.example/in",
                                                                                 secret=SECRET),
                                           enabled=False))),
    # --- collector (admin API of one collector process) -------------------------------------------------
    **{f"{K}/{name}": Entry(NOT_IN_STACK, note=_COLLECTOR_NOTE)
       for name in ("GetStatus", "ProbePlc", "PreviewDecode", "ProbeMirror", "PreviewPlc")},
}


#: The production service's reference types (items grouped by a reference type).
REFERENCE_TYPES: dict[str, Entry] = {
    f"{P}/GetReferenceType": Entry(READ, lambda g: prod_pb.GetReferenceTypeRequest(id=g.only_reference_type)),
    f"{P}/ListReferenceTypes": Entry(READ, lambda g: prod_pb.ListReferenceTypesRequest(page_size=500)),
    f"{P}/UpdateReferenceType": Entry(WRITE, lambda g: prod_pb.UpdateReferenceTypeRequest(
        reference_type=md.ReferenceType(id=g.only_reference_type, display_name="Acme renamed"),
        update_mask=mask("display_name"))),
    f"{P}/DeleteReferenceType": Entry(WRITE, lambda g: prod_pb.DeleteReferenceTypeRequest(
        id=g.only_reference_type)),
    f"{P}/CreateReferenceType": Entry(CREATE, lambda g: prod_pb.CreateReferenceTypeRequest(
        reference_type=md.ReferenceType(id=g.only_reference_type, display_name="Acme type"))),
}


TABLE.update(REFERENCE_TYPES)


def _file_of(module: Any) -> Any:
    return __import__(module.__name__.replace("_grpc", ""), fromlist=["DESCRIPTOR"]).DESCRIPTOR


def _acme_plc(plc_id: str, *, tags: bool = True) -> plc_pb2.Plc:
    from fabrica_svc.collector.demo import demo_plcs
    plc = plc_pb2.Plc()
    # press-2 (S7) for a PLC with tags; press-1 (Modbus TCP) for the Modbus profile, which brings its own.
    plc.CopyFrom(next(p for p in demo_plcs(COLLECTOR, 1, 1, 1) if p.id == ("press-2" if tags else "press-1")))
    plc.id, plc.display_name = plc_id, "Acme copy"
    if not tags:
        del plc.tags[:]
        del plc.poll_groups[:]
    return plc


def _acme_profile(profile_id: str) -> device_profile_pb2.DeviceProfile:
    plc = _acme_plc(profile_id)
    return device_profile_pb2.DeviceProfile(id=profile_id, display_name="Acme profile", tags=plc.tags,
                                            poll_groups=plc.poll_groups, protocol=device_profile_pb2.PROTOCOL_S7)


def fabrica_methods() -> list[tuple[str, Any]]:
    """(full method name, method descriptor) of every method of every Fabrica service."""
    out = []
    for module in SERVICE_MODULES:
        for service in _file_of(module).services_by_name.values():
            out.extend((f"{service.full_name}/{m.name}", m) for m in service.methods)
    return out


def test_every_fabrica_method_is_in_the_isolation_table() -> None:
    methods = dict(fabrica_methods())
    missing = [f"add {name} to the isolation table (tests/tenancy/test_isolation.py TABLE)"
               for name in sorted(methods) if name not in TABLE]
    stale = [f"{name} is in the isolation table but no service has it" for name in sorted(TABLE)
             if name not in methods]
    assert not missing and not stale, "\n".join(missing + stale)
    for name, entry in TABLE.items():
        m = methods[name]
        if entry.build is not None:
            request = entry.build(nowhere())
            assert request.DESCRIPTOR.full_name == m.input_type.full_name, (name, request.DESCRIPTOR.full_name)


# --- calling ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    messages: list[Any]

    @property
    def shown(self) -> str:
        return self.code.name if self.code == grpc.StatusCode.OK else f"{self.code.name} ({self.details})"


async def call(stack: TenantStack, name: str, entry: Entry, ids: Ids, caller: Caller) -> Outcome:
    service, method = name.rsplit("/", 1)
    short = service.split(".")[1]
    stub = stack.stub(short)
    rpc = getattr(stub, method)
    request = entry.build(ids)
    descriptor = dict(fabrica_methods())[name]
    try:
        if descriptor.server_streaming:
            messages, err = await collect(rpc(request, metadata=caller.metadata, timeout=STREAM_SECONDS + 5),
                                          STREAM_SECONDS)
            if err is not None:
                return Outcome(err.code(), err.details() or "", messages)
            return Outcome(grpc.StatusCode.OK, "", messages)
        response = await rpc(request, metadata=caller.metadata, timeout=TIMEOUT)
        return Outcome(grpc.StatusCode.OK, "", [response])
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), err.details() or "", [])


def leaked(stack: TenantStack, outcome: Outcome, *, only_ids: bool = True) -> list[str]:
    found: list[str] = []
    for message in outcome.messages:
        found.extend(leaks(text(message), stack.globex.ids, stack.acme.ids, only_ids=only_ids))
    return sorted(set(found))


async def judge(stack: TenantStack, name: str, entry: Entry) -> list[str]:
    """The problems of `name` called by acme with globex's ids (empty: isolated)."""
    acme, globex = stack.acme, stack.globex
    who = acme.admin if entry.caller == "admin" else acme.collector
    problems = []
    if entry.kind == READ and entry.control:
        own = await call(stack, name, entry, globex.ids, globex.admin if entry.caller == "admin" else globex.collector)
        if own.code != grpc.StatusCode.OK or not leaked(stack, own):
            problems.append(f"{name}: control failed: globex's own call answered {own.shown} without globex's "
                            "data, so the table's request does not reach globex's resource (fix the table or "
                            "the set-up)")
    absent = None
    if entry.kind in (WRITE, CREATE):
        # First what ids that exist nowhere get: the table's request must be a sound one (a create creates,
        # a write finds nothing), or a refusal of globex's ids would prove nothing.
        absent = await call(stack, name, entry, nowhere(), who)
        if absent.code.name not in entry.expected_absent:
            problems.append(f"{name}: the table's request on ids that exist nowhere gets {absent.shown}, not "
                            f"{' or '.join(entry.expected_absent)}: fix the table")
    outcome = await call(stack, name, entry, globex.ids, who)
    if found := leaked(stack, outcome, only_ids=entry.kind != CREATE):
        problems.append(f"{name}: acme got globex's data: {'; '.join(found)}")
    if outcome.code not in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND):
        absent = absent or await call(stack, name, entry, nowhere(), who)
        if absent.code != outcome.code:
            problems.append(f"{name}: on globex's ids acme gets {outcome.shown}, on ids that exist nowhere "
                            f"{absent.shown}: the answer confirms globex's resource exists")
    return problems


async def stream_readings_check(stack: TenantStack) -> list[str]:
    """acme's cell-1 resumes at acme's own sequence; its batch on globex's tag ids does not land in globex."""
    name = f"{I}/StreamReadings"
    acme, globex = stack.acme, stack.globex
    call_ = stack.stub("ingest").StreamReadings(metadata=acme.collector.metadata, timeout=TIMEOUT)
    problems = []
    try:
        await call_.write(ingest_pb.StreamReadingsRequest(open=ingest_pb.StreamOpen(collector_id=COLLECTOR)))
        first = await call_.read()
        if first is not grpc.aio.EOF and first.HasField("resume"):
            if first.resume.committed_sequence != acme.sequence:
                problems.append(f"{name}: acme's {COLLECTOR} resumes at {first.resume.committed_sequence}, not at "
                                f"its own {acme.sequence} (globex's is {globex.sequence})")
            sequence = first.resume.committed_sequence + 1
            import time
            await call_.write(ingest_pb.StreamReadingsRequest(batch=reading_pb2.ReadingBatch(
                collector_id=COLLECTOR, sequence=sequence, readings=[
                    reading_pb2.Reading(tag_id=tag, plc_id=PLC, read_time=ts(time.time()),
                                        quality=reading_pb2.QUALITY_GOOD, role=reading_pb2.TAG_ROLE_MEASUREMENT,
                                        value=reading_pb2.Value(double_value=INTRUDER_VALUE))
                    for tag in globex.ids.tags if tag != globex.ids.counter_tag])))
            await call_.read()  # an ack, or the stream's end (refused)
            await call_.done_writing()
            while await call_.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.PERMISSION_DENIED:
            problems.append(f"{name}: PERMISSION_DENIED on globex's tag ids confirms they exist: {err.details()}")
    return problems


CUSTOM_CHECKS = {f"{I}/StreamReadings": stream_readings_check}


async def globex_view(stack: TenantStack) -> dict[str, str]:
    """What globex's admin (and collector) see of globex's resources, for before/after comparison."""
    g = stack.globex
    out: dict[str, str] = {}
    for name, entry in TABLE.items():
        if entry.kind != READ or name.endswith("ListAuditEntries") or "/Watch" in name or name.endswith(
                "ListCollectors"):
            continue  # audit entries grow with every call; watches are streams; collectors: below
        if name.endswith(("ListDeliveries", "/GetOee")):
            continue  # deliveries: none (targets disabled); OEE: computed up to now, it moves by itself
        outcome = await call(stack, name, entry, g.ids, g.admin if entry.caller == "admin" else g.collector)
        out[name] = outcome.shown + " " + " | ".join(text(m) for m in outcome.messages)
    collectors = await call(stack, f"{C}/ListCollectors", TABLE[f"{C}/ListCollectors"], g.ids, g.admin)
    out["collectors"] = " | ".join(text(m) for m in collectors.messages)
    out["ingest tags"] = ";".join(await _tag_rows(stack))
    out["cell-1's resume"] = await stack.resume(g)
    return out


async def _tag_rows(stack: TenantStack) -> list[str]:
    """globex's tags in ingest (plc, role) (read as the database owner: no policy in the way)."""
    conn = await asyncpg.connect(stack.servers["ingest"].database_url)
    try:
        # Rows of globex's (all of them while ingest has no tenant column).
        rows = await conn.fetch("SELECT tag_id, (to_jsonb(t) - 'update_time')::text AS row FROM ingest.tags t"
                                " WHERE tag_id = ANY($1::bigint[])"
                                " AND coalesce(to_jsonb(t)->>'tenant_id', 'globex') = 'globex' ORDER BY 1, 2",
                                stack.globex.ids.tags)
    finally:
        await conn.close()
    return [f"{r['tag_id']}={r['row']}" for r in rows]


async def _globex_ready(stack: TenantStack) -> None:
    """Wait until globex's alarm is active and its latest values are there (evaluation and writing are
    asynchronous), so the before-view is settled."""
    g = stack.globex

    async def alarm_active() -> bool:
        try:
            got = await stack.stub("alarm").ListAlarms(alarm_pb.ListAlarmsRequest(page_size=100),
                                                       metadata=g.admin.metadata, timeout=TIMEOUT)
        except grpc.aio.AioRpcError:
            return False
        return any("Globex" in text(a) for a in got.alarms)

    if not await wait_until(alarm_active):
        stack.setup_problems.append("set-up: globex's alarm rule never fired on globex's readings")


@pytest.fixture
async def stack(database_url: str, servers: Servers, tmp_path: Path) -> TenantStack:
    return await start_stack(servers, database_url, tmp_path)


async def test_every_rpc_of_acme_on_globex_ids_is_not_found_or_empty(stack: TenantStack) -> None:
    OWN.set(stack.acme.ids)
    await _globex_ready(stack)
    problems = list(stack.setup_problems)
    before = await globex_view(stack)
    order = {READ: 0, CUSTOM: 1, WRITE: 2, CREATE: 3}
    for name, entry in sorted(TABLE.items(), key=lambda kv: (order.get(kv[1].kind, 9), kv[0])):
        if entry.kind == NOT_IN_STACK:
            continue
        if entry.kind == CUSTOM:
            problems.extend(await CUSTOM_CHECKS[name](stack))
        else:
            problems.extend(await judge(stack, name, entry))
    await asyncio.sleep(0.5)  # what acme's writes might have set off (writers, evaluation) lands
    after = await globex_view(stack)
    for key in sorted(before):
        if before[key] != after.get(key):
            problems.append(f"globex's data changed under acme's calls: {key}:\n    before {before[key][:400]}\n"
                            f"    after  {after.get(key, '')[:400]}")
    assert not problems, f"{len(problems)} isolation problem(s):\n" + "\n".join(problems)


async def test_watches_of_acme_never_carry_globex_changes(stack: TenantStack) -> None:
    """acme's watches are open while globex changes its PLC, its orders, streams readings that raise an
    alarm and tag events: acme's watches carry none of it; globex's own watches do (the control)."""
    acme, globex = stack.acme, stack.globex
    problems = list(stack.setup_problems)
    watches = {
        f"{C}/WatchPlcs": ("config", "WatchPlcs", config_pb.WatchPlcsRequest(collector_id=COLLECTOR), "collector"),
        f"{P}/WatchOrders": ("production", "WatchOrders", prod_pb.WatchOrdersRequest(), "admin"),
        f"{A}/WatchAlarms": ("alarm", "WatchAlarms", alarm_pb.WatchAlarmsRequest(), "admin"),
        f"{I}/WatchTagEvents": ("ingest", "WatchTagEvents", ingest_pb.WatchTagEventsRequest(), "admin"),
        f"{I}/WatchCommittedReadings": ("ingest", "WatchCommittedReadings",
                                        ingest_pb.WatchCommittedReadingsRequest(start_at_end=True), "admin"),
        f"{I}/WatchLatestValues": ("ingest", "WatchLatestValues",
                                   ingest_pb.WatchLatestValuesRequest(plc_id=PLC), "admin"),
    }
    seconds = 8.0

    def open_all(tenant: Any) -> dict[str, Any]:
        out = {}
        for name, (service, method, request, who) in watches.items():
            caller = tenant.admin if who == "admin" else tenant.collector
            out[name] = asyncio.ensure_future(collect(getattr(stack.stub(service), method)(
                request, metadata=caller.metadata, timeout=seconds + 10), seconds))
        return out

    acme_watches, globex_watches = open_all(acme), open_all(globex)
    await asyncio.sleep(1.0)  # the watches are open and past their current state
    # globex changes things: its PLC, an order, readings (an alarm, tag events, latest values, the feed).
    await stack.step("globex: UpdatePlc", stack.stub("config").UpdatePlc(config_pb.UpdatePlcRequest(
        plc=plc_pb2.Plc(id=PLC, display_name="Globex press, renamed"), update_mask=mask("display_name")),
        metadata=globex.admin.metadata, timeout=TIMEOUT))
    order = await stack.step("globex: CreateOrder PO-9", stack.stub("production").CreateOrder(
        prod_pb.CreateOrderRequest(order=order_pb2.Order(number="PO-9", item_id=globex.ids.item,
                                                         work_center_id=globex.ids.work_center,
                                                         planned_quantity=7919)),
        metadata=globex.admin.metadata, timeout=TIMEOUT))
    if order is not None:
        await stack.step("globex: PauseOrder", stack.stub("production").PauseOrder(
            prod_pb.PauseOrderRequest(id=globex.ids.order), metadata=globex.admin.metadata, timeout=TIMEOUT))
    if problem := await stack.stream(globex, 3, value=0.0):
        problems.append(f"globex streaming (alarm clears): {problem}")
    if problem := await stack.stream(globex, 3):
        problems.append(f"globex streaming (alarm raised again): {problem}")
    acme_seen = {name: await task for name, task in acme_watches.items()}
    globex_seen = {name: await task for name, task in globex_watches.items()}
    for name in watches:
        messages, err = acme_seen[name]
        if err is not None:
            problems.append(f"{name}: acme's watch ended with {err.code().name} ({err.details()})")
        for message in messages:
            if found := leaks(text(message), globex.ids, acme.ids):
                problems.append(f"{name}: acme's watch carried globex's change: {'; '.join(found)}")
                break
        own, own_err = globex_seen[name]
        if own_err is not None or not any(leaks(text(m), globex.ids, acme.ids) for m in own):
            problems.append(f"{name}: control failed: globex's own watch saw none of globex's changes "
                            f"({own_err.code().name if own_err else f'{len(own)} messages'})")
    assert not problems, f"{len(problems)} isolation problem(s):\n" + "\n".join(problems)


async def test_an_installation_wide_admin_names_the_tenant_of_each_call(stack: TenantStack) -> None:
    """The header end to end, in every service: the installation's admin sees acme's resource with
    ``x-fabrica-tenant: acme`` and globex's with ``globex``, under the same id; a tenant's admin naming the
    other tenant is PERMISSION_DENIED (TENANT_MISMATCH, whatever the id) and a header that is not a code is
    INVALID_ARGUMENT on the header."""
    from grpc_helpers import error_info, field_violations

    problems = list(stack.setup_problems)
    reads = {
        "config GetPlc": lambda t, md_: stack.stub("config").GetPlc(config_pb.GetPlcRequest(id=PLC), metadata=md_,
                                                                     timeout=TIMEOUT),
        "ingest GetLatestValues": lambda t, md_: stack.stub("ingest").GetLatestValues(
            ingest_pb.GetLatestValuesRequest(plc_id=PLC), metadata=md_, timeout=TIMEOUT),
        "production GetWorkCenter": lambda t, md_: stack.stub("production").GetWorkCenter(
            prod_pb.GetWorkCenterRequest(id="press-1"), metadata=md_, timeout=TIMEOUT),
        "alarm GetAlarmRule": lambda t, md_: stack.stub("alarm").GetAlarmRule(
            alarm_pb.GetAlarmRuleRequest(id="press-hot"), metadata=md_, timeout=TIMEOUT),
    }
    for what, read in reads.items():
        for tenant in (stack.acme, stack.globex):
            header = Caller(stack.installer.token, tenant.code).metadata
            try:
                shown = text(await read(tenant, header))
            except grpc.aio.AioRpcError as err:
                problems.append(f"{what} as the installation's admin in {tenant.code}: {err.code().name} "
                                f"{err.details()}")
                continue
            other = "Globex" if tenant.code == "acme" else "Acme"
            if tenant.label not in shown or other in shown:
                problems.append(f"{what} as the installation's admin in {tenant.code} shows {shown[:200]}")
        try:
            await read(stack.acme, Caller(stack.acme.admin.token, "globex").metadata)
            problems.append(f"{what}: acme's admin naming globex was served")
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.PERMISSION_DENIED or error_info(err).reason != "TENANT_MISMATCH":
                problems.append(f"{what}: acme's admin naming globex: {err.code().name} {err.details()}")
        try:
            await read(stack.acme, Caller(stack.installer.token, "Globex Corp").metadata)
            problems.append(f"{what}: a header that is not a tenant code was served")
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT or "x-fabrica-tenant" not in field_violations(err):
                problems.append(f"{what}: a bad header: {err.code().name} {err.details()}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)
