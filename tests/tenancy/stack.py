"""Two tenants on one secure Fabrica (issue 15), for the isolation tests.

Config, ingest, production and alarm run in process (tests/in_process.py) with TLS and tokens (tests/
tls_support.py): each service has a certificate of a test CA, verifies tokens of the CA folder's signing key,
and talks to its peers over mutual TLS on their peer ports (production and alarm read ingest's feeds as
services, across tenants). An installation-wide admin (``tenant *``) creates the tenants ``acme`` and
``globex`` with CreateTenant; each tenant's own admin then creates the SAME resource ids (PLC ``press-1`` with
its tags, collector ``cell-1``, sector, work centre, item, defect code, downtime reason, an order, an alarm
rule, a notification and a forwarding target, a device profile) and its collector streams readings for its tags; globex also
has a few resources acme does not (ids ``gx-only-*``), so that "NOT_FOUND" is a real answer for acme.

Every string globex creates contains ``Globex`` and every number that is globex's own is one of
`GLOBEX_NUMBERS`: a response of acme's in which either appears carries globex's data (`leaks`).

Problems of the set-up (a tenant that cannot create an id the other has: ALREADY_EXISTS is itself a leak)
are collected in ``TenantStack.setup_problems`` rather than raised, so that a run on services that are
not isolated yet still reports every RPC that leaks.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from fabrica.alarm.v1 import alarm_service_pb2 as alarm_pb
from fabrica.alarm.v1 import alarm_service_pb2_grpc as alarm_grpc
from fabrica.alarm.v1 import notify_pb2, rule_pb2
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import config_service_pb2_grpc as config_grpc
from fabrica.config.v1 import collector_status_pb2, device_profile_pb2, plc_pb2, tenant_pb2
from fabrica.ingest.v1 import ingest_service_pb2 as ingest_pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from fabrica.common.v1 import reading_pb2
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2
from fabrica.production.v1 import production_service_pb2 as prod_pb
from fabrica.production.v1 import production_service_pb2_grpc as prod_grpc
from google.protobuf import duration_pb2, text_format, timestamp_pb2

from fabrica_svc.collector.demo import demo_plcs
from fabrica_svc.runtime import auth
from in_process import Server, Servers, settings_for
from production.support import TEST_CONSUMER
from tls_support import Pki

from ingest.support import TEST_CONFIG

ACME, GLOBEX = "acme", "globex"
COLLECTOR = "cell-1"
PLC = "press-1"
#: Numbers only globex's resources carry (planned quantity, booked good/scrap, reading values, ...).
GLOBEX_NUMBERS = {"planned": 7919, "good": 7907, "scrap": 7901, "defects": 7883, "value": 7877.25,
                  "count": 60013}
ACME_NUMBERS = {"planned": 104, "good": 103, "scrap": 101, "defects": 107, "value": 109.25, "count": 113}
TIMEOUT = 20.0
SECRET = "a-webhook-secret-of-the-test"


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def text(message: Any) -> str:
    return text_format.MessageToString(message, as_one_line=True)


@dataclass
class Ids:
    """The ids a request of the isolation table is filled with: globex's (what acme must not reach), or
    ids that exist nowhere (the answer to which says what "not there" looks like)."""

    tenant: str
    plc: str = PLC
    only_plc: str = "gx-only-plc"
    collector: str = COLLECTOR
    tags: list[int] = field(default_factory=list)
    measurement_tag: int = 0
    counter_tag: int = 0
    sector: str = "pressing"
    only_sector: str = "gx-only-sector"
    work_center: str = "press-1"
    only_work_center: str = "gx-only-wc"
    #: An order number globex has and acme does not.
    only_order_number: str = "PO-2"
    item: str = "BRK-100"
    only_item: str = "gx-only-item"
    defect_code: str = "BURR"
    only_defect_code: str = "gx-only-defect"
    reference_type: str = "BRACKETS"
    only_reference_type: str = "gx-only-reftype"
    reason: str = "TOOL"
    only_reason: str = "gx-only-reason"
    order: str = ""
    #: An order and a downtime of globex's whose ids acme has no order or downtime under (server-assigned
    #: ids: globex's second ones, which differ from acme's first whether numbering is global or per tenant).
    only_order: str = ""
    downtime: str = ""
    only_downtime: str = ""
    rule: str = "press-hot"
    only_rule: str = "gx-only-rule"
    target: str = "pager"
    only_target: str = "gx-only-pager"
    forwarding: str = "fwd"
    only_forwarding: str = "gx-only-fwd"
    #: A device profile of the tenant's own (config), and one only globex has.
    profile: str = "press-profile"
    only_profile: str = "gx-only-profile"


def nowhere() -> Ids:
    """Ids no tenant has: acme's answer to them is what "there is no such thing" looks like."""
    return Ids(tenant="nowhere", plc="nowhere-plc", only_plc="nowhere-plc", collector="nowhere-cell",
               tags=[987654321], measurement_tag=987654321, counter_tag=987654322, sector="nowhere-sector",
               only_sector="nowhere-sector", work_center="nowhere-wc", only_work_center="nowhere-wc",
               only_order_number="PO-nowhere", item="nowhere-item", only_item="nowhere-item",
               defect_code="nowhere-defect", only_defect_code="nowhere-defect", reference_type="nowhere-reftype",
               only_reference_type="nowhere-reftype", reason="nowhere-reason",
               only_reason="nowhere-reason", order="987654321", only_order="987654321", downtime="987654321", only_downtime="987654321", rule="nowhere-rule",
               only_rule="nowhere-rule", target="nowhere-pager", only_target="nowhere-pager",
               forwarding="nowhere-fwd", only_forwarding="nowhere-fwd", profile="nowhere-profile",
               only_profile="nowhere-profile")


@dataclass
class Caller:
    """One identity: its token, and the tenant it names per call when it is installation-wide."""

    token: str
    tenant_header: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        md_ = [("authorization", f"Bearer {self.token}")]
        if self.tenant_header is not None:
            md_.append(("x-fabrica-tenant", self.tenant_header))
        return tuple(md_)


@dataclass
class Tenant:
    code: str
    label: str  # "Acme" / "Globex": in every string the tenant creates
    numbers: dict[str, float]
    admin: Caller
    collector: Caller
    ids: Ids
    sequence: int = 0  # the collector's last streamed batch


@dataclass
class TenantStack:
    servers: dict[str, Server]
    channels: dict[str, grpc.aio.Channel]
    pki: Pki
    installer: Caller
    tenants: dict[str, Tenant]
    setup_problems: list[str] = field(default_factory=list)

    def stub(self, service: str) -> Any:
        return {"config": config_grpc.ConfigServiceStub, "ingest": ingest_grpc.IngestServiceStub,
                "production": prod_grpc.ProductionServiceStub,
                "alarm": alarm_grpc.AlarmServiceStub}[service](self.channels[service])

    @property
    def acme(self) -> Tenant:
        return self.tenants[ACME]

    @property
    def globex(self) -> Tenant:
        return self.tenants[GLOBEX]

    async def step(self, what: str, call: Awaitable[Any]) -> Any:
        """Run one set-up call; a failure is recorded (with `what`) and None returned."""
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            self.setup_problems.append(f"set-up: {what}: {err.code().name} {err.details()}")
            return None

    # --- set-up ---------------------------------------------------------------------------------------

    async def create_tenants(self) -> None:
        config = self.stub("config")
        for t in self.tenants.values():
            await self.step(f"CreateTenant {t.code} (as the installation-wide admin)", config.CreateTenant(
                config_pb.CreateTenantRequest(tenant=tenant_pb2.Tenant(
                    code=t.code, name=f"{t.label} Corporation", trade_name=t.label, contact=f"ops@{t.code}.example",
                    active=True)),
                metadata=self.installer.metadata, timeout=TIMEOUT))

    async def seed(self, t: Tenant) -> None:
        """Everything of tenant `t`, created by its own admin and collector."""
        config, ingest = self.stub("config"), self.stub("ingest")
        production, alarm = self.stub("production"), self.stub("alarm")
        md_, n, label = t.admin.metadata, t.numbers, t.label
        plcs = {p.id: p for p in demo_plcs(COLLECTOR, 1, 1, 1)}
        press = plc_pb2.Plc()
        press.CopyFrom(plcs["press-1"])
        press.display_name = f"{label} press"
        created = await self.step(f"{t.code}: CreatePlc {PLC}", config.CreatePlc(
            config_pb.CreatePlcRequest(plc=press), metadata=md_, timeout=TIMEOUT))
        if created is not None:
            press = created.plc
        else:  # the id is taken: what its tenant sees under it (for the tag ids it streams)
            got = await self.step(f"{t.code}: GetPlc {PLC}", config.GetPlc(
                config_pb.GetPlcRequest(id=PLC), metadata=md_, timeout=TIMEOUT))
            press = got.plc if got is not None else press
        t.ids.tags = [tag.id for tag in press.tags]
        by_role = {tag.role: tag.id for tag in press.tags}
        t.ids.counter_tag = by_role.get(reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, 0)
        t.ids.measurement_tag = next((tag.id for tag in press.tags if tag.name == "press.temperature"), 0)
        if t.code == GLOBEX:
            for only_id in (t.ids.only_plc, t.ids.only_plc + "-p"):
                only = plc_pb2.Plc()
                only.CopyFrom(plcs["press-2"])
                only.id, only.display_name = only_id, f"{label} only press"
                await self.step(f"{t.code}: CreatePlc {only.id}", config.CreatePlc(
                    config_pb.CreatePlcRequest(plc=only), metadata=md_, timeout=TIMEOUT))
        # Device profiles of the tenant's own: the same id in both tenants, and one only globex has.
        for profile_id in (t.ids.profile, *((t.ids.only_profile,) if t.code == GLOBEX else ())):
            profile = device_profile_pb2.DeviceProfile(
                id=profile_id, display_name=f"{label} profile {profile_id}", protocol=device_profile_pb2.PROTOCOL_MODBUS,
                poll_groups=plcs[PLC].poll_groups, tags=plcs[PLC].tags)
            await self.step(f"{t.code}: CreateDeviceProfile {profile_id}", config.CreateDeviceProfile(
                config_pb.CreateDeviceProfileRequest(profile=profile), metadata=md_, timeout=TIMEOUT))
        await self.step(f"{t.code}: ReportCollectorStatus", config.ReportCollectorStatus(
            config_pb.ReportCollectorStatusRequest(collector_id=COLLECTOR, applied_revision=1, plc_statuses=[
                collector_status_pb2.PlcStatus(plc_id=PLC, connected=False, error=f"{label} cable unplugged")]),
            metadata=t.collector.metadata, timeout=TIMEOUT))

        # Ingest: the collector's tag metadata and readings.
        await self.step(f"{t.code}: SyncTags", ingest.SyncTags(ingest_pb.SyncTagsRequest(
            collector_id=COLLECTOR, tags=[ingest_pb.TagInfo(tag_id=tag.id, plc_id=PLC, name=f"{label}_{tag.name}",
                                                             unit=tag.unit, role=tag.role) for tag in press.tags]),
            metadata=t.collector.metadata, timeout=TIMEOUT))

        # Production master data and an order with bookings, a defect and a downtime.
        wc_tags = {tag.role: tag.id for tag in press.tags}
        for what, call in (
            ("CreateSector", lambda: production.CreateSector(prod_pb.CreateSectorRequest(
                sector=md.Sector(id=t.ids.sector, display_name=f"{label} pressing")), metadata=md_, timeout=TIMEOUT)),
            ("CreateWorkCenter", lambda: production.CreateWorkCenter(prod_pb.CreateWorkCenterRequest(work_center=md.WorkCenter(
                id=t.ids.work_center, display_name=f"{label} press line", sector_id=t.ids.sector, plc_id=PLC,
                production_counter_tag_id=wc_tags.get(reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, 0),
                scrap_counter_tag_id=wc_tags.get(reading_pb2.TAG_ROLE_SCRAP_COUNTER, 0),
                machine_state_tag_id=wc_tags.get(reading_pb2.TAG_ROLE_MACHINE_STATE, 0),
                counter_width=32, max_counter_jump=100000)), metadata=md_, timeout=TIMEOUT)),
            ("CreateItem", lambda: production.CreateItem(prod_pb.CreateItemRequest(item=md.Item(
                id=t.ids.item, display_name=f"{label} bracket", ideal_cycle_time=duration_pb2.Duration(seconds=2))),
                metadata=md_, timeout=TIMEOUT)),
            ("CreateDefectCode", lambda: production.CreateDefectCode(prod_pb.CreateDefectCodeRequest(defect_code=md.DefectCode(
                id=t.ids.defect_code, display_name=f"{label} burr", severity=md.SEVERITY_MINOR)),
                metadata=md_, timeout=TIMEOUT)),
            ("CreateDowntimeReason", lambda: production.CreateDowntimeReason(prod_pb.CreateDowntimeReasonRequest(
                downtime_reason=md.DowntimeReason(id=t.ids.reason, display_name=f"{label} tool change",
                                                  color="#ff8800", counts_against_availability=True)),
                metadata=md_, timeout=TIMEOUT)),
        ):  # one after the other: a gRPC call starts when it is made
            await self.step(f"{t.code}: {what}", call())
        if t.code == GLOBEX:
            for what, call in (
                ("CreateSector gx-only", lambda: production.CreateSector(prod_pb.CreateSectorRequest(
                    sector=md.Sector(id=t.ids.only_sector, display_name=f"{label} only sector")), metadata=md_,
                    timeout=TIMEOUT)),
                ("CreateWorkCenter gx-only", lambda: production.CreateWorkCenter(prod_pb.CreateWorkCenterRequest(
                    work_center=md.WorkCenter(id=t.ids.only_work_center, display_name=f"{label} only line",
                                              sector_id=t.ids.sector, plc_id=PLC, counter_width=32,
                                              max_counter_jump=1000)), metadata=md_, timeout=TIMEOUT)),
                ("CreateItem gx-only", lambda: production.CreateItem(prod_pb.CreateItemRequest(item=md.Item(
                    id=t.ids.only_item, display_name=f"{label} only item",
                    ideal_cycle_time=duration_pb2.Duration(seconds=3))), metadata=md_, timeout=TIMEOUT)),
                ("CreateDefectCode gx-only", lambda: production.CreateDefectCode(prod_pb.CreateDefectCodeRequest(
                    defect_code=md.DefectCode(id=t.ids.only_defect_code, display_name=f"{label} only defect",
                                              severity=md.SEVERITY_MAJOR)), metadata=md_, timeout=TIMEOUT)),
                ("CreateDowntimeReason gx-only", lambda: production.CreateDowntimeReason(prod_pb.CreateDowntimeReasonRequest(
                    downtime_reason=md.DowntimeReason(id=t.ids.only_reason, display_name=f"{label} only reason",
                                                      color="#0000ff")), metadata=md_, timeout=TIMEOUT)),
            ):
                await self.step(f"{t.code}: {what}", call())
        if hasattr(prod_pb, "CreateReferenceTypeRequest"):  # (issue 15's new master data; see test_isolation ARRIVING)
            for ref_id, name in ((t.ids.reference_type, f"{label} brackets"),
                                 *(((t.ids.only_reference_type, f"{label} only type"),) if t.code == GLOBEX else ())):
                await self.step(f"{t.code}: CreateReferenceType {ref_id}", production.CreateReferenceType(
                    prod_pb.CreateReferenceTypeRequest(reference_type=md.ReferenceType(id=ref_id, display_name=name)),
                    metadata=md_, timeout=TIMEOUT))
        order = await self.step(f"{t.code}: CreateOrder PO-1", production.CreateOrder(prod_pb.CreateOrderRequest(
            order=order_pb2.Order(number="PO-1", item_id=t.ids.item, work_center_id=t.ids.work_center,
                                  planned_quantity=int(n["planned"]))), metadata=md_, timeout=TIMEOUT))
        if order is not None:
            t.ids.order = order.order.id
            await self.step(f"{t.code}: StartOrder", production.StartOrder(prod_pb.StartOrderRequest(
                id=t.ids.order), metadata=md_, timeout=TIMEOUT))
            await self.step(f"{t.code}: CreateBooking", production.CreateBooking(prod_pb.CreateBookingRequest(
                booking=order_pb2.Booking(order_id=t.ids.order, good_quantity=int(n["good"]),
                                          scrap_quantity=int(n["scrap"]), note=f"{label} booking")),
                metadata=md_, timeout=TIMEOUT))
            await self.step(f"{t.code}: CreateDefect", production.CreateDefect(prod_pb.CreateDefectRequest(
                defect=order_pb2.Defect(order_id=t.ids.order, defect_code_id=t.ids.defect_code,
                                        quantity=int(n["defects"]), note=f"{label} defect")),
                metadata=md_, timeout=TIMEOUT))
        if t.code == GLOBEX:
            second = await self.step(f"{t.code}: CreateOrder PO-2", production.CreateOrder(prod_pb.CreateOrderRequest(
                order=order_pb2.Order(number=t.ids.only_order_number, item_id=t.ids.item, work_center_id=t.ids.work_center,
                                      planned_quantity=int(n["planned"]))), metadata=md_, timeout=TIMEOUT))
            if second is not None:
                t.ids.only_order = second.order.id
        now = time.time()
        downtime = await self.step(f"{t.code}: CreateDowntime", production.CreateDowntime(prod_pb.CreateDowntimeRequest(
            downtime=order_pb2.Downtime(work_center_id=t.ids.work_center, start_time=ts(now - 600),
                                        reason_id=t.ids.reason, note=f"{label} downtime")),
            metadata=md_, timeout=TIMEOUT))
        if downtime is not None:
            t.ids.downtime = downtime.downtime.id
        if t.code == GLOBEX:
            second = await self.step(f"{t.code}: CreateDowntime (second)", production.CreateDowntime(
                prod_pb.CreateDowntimeRequest(downtime=order_pb2.Downtime(
                    work_center_id=t.ids.work_center, start_time=ts(now - 1200), end_time=ts(now - 900),
                    reason_id=t.ids.reason, note=f"{label} second downtime")), metadata=md_, timeout=TIMEOUT))
            if second is not None:
                t.ids.only_downtime = second.downtime.id

        # Alarm: a rule that fires on the tenant's readings, a (disabled) notification and forwarding target.
        rule = rule_pb2.AlarmRule(
            id=t.ids.rule, display_name=f"{label} press hot", severity=rule_pb2.SEVERITY_HIGH, enabled=True,
            target=rule_pb2.RuleTarget(tag=rule_pb2.TagTarget(plc_id=PLC, tag_id=t.ids.measurement_tag)),
            condition=rule_pb2.Condition(threshold=rule_pb2.ThresholdCondition(
                comparison=rule_pb2.COMPARISON_GREATER, number=1.0)),
            message_template=label + " {tag} = {value}")
        await self.step(f"{t.code}: CreateAlarmRule", alarm.CreateAlarmRule(alarm_pb.CreateAlarmRuleRequest(rule=rule),
                                                                           metadata=md_, timeout=TIMEOUT))
        await self.step(f"{t.code}: CreateNotificationTarget", alarm.CreateNotificationTarget(
            alarm_pb.CreateNotificationTargetRequest(target=notify_pb2.NotificationTarget(
                id=t.ids.target, display_name=f"{label} pager", url=f"https://{t.code}.example/hook", secret=SECRET,
                enabled=False)), metadata=md_, timeout=TIMEOUT))
        await self.step(f"{t.code}: CreateForwardingTarget", alarm.CreateForwardingTarget(
            alarm_pb.CreateForwardingTargetRequest(target=notify_pb2.ForwardingTarget(
                id=t.ids.forwarding, display_name=f"{label} forward", plc_ids=[PLC],
                http=notify_pb2.ForwardingTarget.Http(url=f"https://{t.code}.example/ingest", secret=SECRET),
                enabled=False)), metadata=md_, timeout=TIMEOUT))
        if t.code == GLOBEX:
            only_rule = rule_pb2.AlarmRule()
            only_rule.CopyFrom(rule)
            only_rule.id, only_rule.display_name = t.ids.only_rule, f"{label} only rule"
            await self.step(f"{t.code}: CreateAlarmRule gx-only", alarm.CreateAlarmRule(
                alarm_pb.CreateAlarmRuleRequest(rule=only_rule), metadata=md_, timeout=TIMEOUT))
            await self.step(f"{t.code}: CreateNotificationTarget gx-only", alarm.CreateNotificationTarget(
                alarm_pb.CreateNotificationTargetRequest(target=notify_pb2.NotificationTarget(
                    id=t.ids.only_target, display_name=f"{label} only pager", url="https://globex.example/only", secret=SECRET,
                    enabled=False)), metadata=md_, timeout=TIMEOUT))
            await self.step(f"{t.code}: CreateForwardingTarget gx-only", alarm.CreateForwardingTarget(
                alarm_pb.CreateForwardingTargetRequest(target=notify_pb2.ForwardingTarget(
                    id=t.ids.only_forwarding, display_name=f"{label} only forward", plc_ids=[PLC],
                    http=notify_pb2.ForwardingTarget.Http(url="https://globex.example/only-ingest", secret=SECRET),
                    enabled=False)), metadata=md_, timeout=TIMEOUT))

    async def resume(self, t: Tenant) -> str:
        """Where tenant `t`'s cell-1 resumes (its committed sequence and epoch), as its collector sees it."""
        call = self.stub("ingest").StreamReadings(metadata=t.collector.metadata, timeout=TIMEOUT)
        try:
            await call.write(ingest_pb.StreamReadingsRequest(open=ingest_pb.StreamOpen(collector_id=COLLECTOR)))
            first = await call.read()
            await call.done_writing()
            return text(first) if first is not grpc.aio.EOF else "EOF"
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name} {err.details()}"
        finally:
            call.cancel()

    async def stream(self, t: Tenant, batches: int = 3, *, value: float | None = None) -> str | None:
        """Tenant `t`'s collector streams `batches` batches (every tag of its press, value `value`, default the
        tenant's marker) through ingest's StreamReadings; None, or what went wrong."""
        value = t.numbers["value"] if value is None else value
        call = self.stub("ingest").StreamReadings(metadata=t.collector.metadata, timeout=TIMEOUT)
        try:
            await call.write(ingest_pb.StreamReadingsRequest(open=ingest_pb.StreamOpen(collector_id=COLLECTOR)))
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("resume"):
                return f"no resume: {first}"
            t.sequence = max(t.sequence, first.resume.committed_sequence)
            now = time.time()
            for b in range(batches):
                await call.write(next_batch(t, now + b * 0.01, value))
                ack = await call.read()
                if ack is grpc.aio.EOF or not ack.HasField("ack"):
                    return f"batch {t.sequence}: {ack}"
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name} {err.details()}"
        return None


def next_batch(t: Tenant, when: float, value: float) -> ingest_pb.StreamReadingsRequest:
    """Tenant `t`'s collector's next batch (its sequence moved on): every tag of its press read at `when`, the
    counter at the tenant's base plus the sequence, the other tags at `value`."""
    t.sequence += 1
    readings = []
    for i, tag in enumerate(t.ids.tags):
        r = reading_pb2.Reading(tag_id=tag, plc_id=PLC, read_time=ts(when + i * 0.0001), quality=reading_pb2.QUALITY_GOOD)
        if tag == t.ids.counter_tag:
            r.role = reading_pb2.TAG_ROLE_PRODUCTION_COUNTER
            r.value.int_value = int(t.numbers["count"]) + t.sequence
        else:
            r.role = reading_pb2.TAG_ROLE_MEASUREMENT
            r.value.double_value = value
        readings.append(r)
    return ingest_pb.StreamReadingsRequest(batch=reading_pb2.ReadingBatch(
        collector_id=COLLECTOR, sequence=t.sequence, readings=readings))


#: Every number of globex's in a response's text, as the text shows it.
#: (Not digits inside a word: an etag "r14", a colour "#ff8800", an id "gx-2".)
_NUMBER = re.compile(r"(?<![\w#.-])-?\d+(?:\.\d+)?(?![\w.-])")


def leaks(message_text: str, globex: Ids, acme: Ids, *, only_ids: bool = True) -> list[str]:
    """What of globex's `message_text` (a response acme got) carries: its name, its numbers, its tag ids (tag
    ids are global numbers: globex's are not acme's), its only-ids (`only_ids`: not in the answer to acme's
    create of that id, which is acme's own resource then)."""
    found = []
    if "globex" in message_text.lower():
        at = message_text.lower().index("globex")
        found.append(f"the text {message_text[max(0, at - 40):at + 40]!r}")
    numbers = set(_NUMBER.findall(message_text))
    for name, number in GLOBEX_NUMBERS.items():
        shown = repr(number) if isinstance(number, float) else str(number)
        if shown in numbers:
            found.append(f"globex's {name} {shown}")
    # Numbers that grow from globex's base: its production counter (stream(): base + batch sequence), and
    # its order's good quantity (the booking, plus what production books from that counter).
    for name in ("count", "good"):
        base = int(GLOBEX_NUMBERS[name])
        grown = sorted({n for n in numbers if n.isdigit() and base <= int(n) < base + 100})
        if grown:
            found.append(f"globex's {name} {grown[0]}")
    own_tags = set(acme.tags)
    for tag_field in re.findall(r"tag_ids?: (\d+)", message_text):
        if int(tag_field) in set(globex.tags) - own_tags:
            found.append(f"globex's tag id {tag_field}")
    for only in () if not only_ids else (globex.only_plc, globex.only_reference_type, globex.only_work_center, globex.only_sector, globex.only_item, globex.only_defect_code,
                 globex.only_reason, globex.only_rule, globex.only_target, globex.only_forwarding,
                 globex.only_profile):
        if f'"{only}"' in message_text:
            found.append(f"globex's id {only}")
    return sorted(set(found))


async def start_stack(servers: Servers, database_url: str, tmp_path: Path) -> TenantStack:
    pki = Pki(tmp_path / "pki")

    def env(service: str) -> dict[str, str]:
        return {**pki.env(service), "FABRICA_PEER_PORT": "0"}

    started: dict[str, Server] = {}
    started["config"] = await servers.start("config", settings_for("config", env("config"), database_url=database_url,
                                                                   data_dir=tmp_path / "config"))
    config_peer = started["config"].host.peer_address
    started["ingest"] = await servers.start(
        "ingest", settings_for("ingest", env("ingest"), database_url=database_url, data_dir=tmp_path / "ingest",
                               config_addr=config_peer), grace=0.5, config=TEST_CONFIG)
    ingest_peer = started["ingest"].host.peer_address
    started["production"] = await servers.start(
        "production", settings_for("production", env("production"), database_url=database_url,
                                   data_dir=tmp_path / "production", ingest_addr=ingest_peer, config_addr=config_peer),
        consumer=TEST_CONSUMER)
    started["alarm"] = await servers.start(
        "alarm", settings_for("alarm", env("alarm"), database_url=database_url, data_dir=tmp_path / "alarm",
                              ingest_addr=ingest_peer, config_addr=config_peer))
    key = pki.key
    installer = Caller(auth.mint_token(key, subject="installer", roles=["admin"], ttl_seconds=3600, tenant="*"))
    tenants = {}
    for code, label, numbers in ((ACME, "Acme", ACME_NUMBERS), (GLOBEX, "Globex", GLOBEX_NUMBERS)):
        tenants[code] = Tenant(
            code=code, label=label, numbers=numbers,
            admin=Caller(auth.mint_token(key, subject=f"{code}-admin", roles=["admin"], ttl_seconds=3600,
                                         tenant=code)),
            collector=Caller(auth.mint_token(key, subject=f"{code}-{COLLECTOR}", roles=["collector"],
                                             collector_id=COLLECTOR, ttl_seconds=3600, tenant=code)),
            ids=Ids(tenant=code))
    stack = TenantStack(started, {name: s.channel for name, s in started.items()}, pki, installer, tenants)
    await stack.create_tenants()
    for code in (ACME, GLOBEX):
        await stack.seed(stack.tenants[code])
    for code in (ACME, GLOBEX):
        problem = await stack.stream(stack.tenants[code])
        if problem:
            stack.setup_problems.append(f"set-up: {code}'s collector streaming readings: {problem}")
    return stack


async def collect(stream: Any, seconds: float) -> tuple[list[Any], grpc.aio.AioRpcError | None]:
    """The messages a server stream sends within `seconds` (then it is cancelled), and the error that ended it
    early, if any."""
    out: list[Any] = []

    async def read() -> None:
        async for message in stream:
            out.append(message)

    try:
        await asyncio.wait_for(read(), seconds)
    except TimeoutError:
        stream.cancel()
    except grpc.aio.AioRpcError as err:
        if err.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return out, err
    return out, None


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False


__all__: Sequence[str] = ["ACME", "GLOBEX", "Caller", "Ids", "Tenant", "TenantStack", "collect", "leaks",
                          "next_batch", "nowhere", "start_stack", "text", "ts", "wait_until"]
