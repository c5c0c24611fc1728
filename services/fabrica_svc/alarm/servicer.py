"""AlarmService over gRPC: translates requests and responses (convert.py) and calls the service layer
(service.py). No SQL and no transactions here.

Every request has passed protovalidate (the interceptor); a rule's cross-field rules and its tags are
checked here (rules.py) before anything is written.

Tenants: every RPC works in the caller's tenant (runtime/tenancy.py; row-level security scopes each
statement to it): rule, alarm, event and target ids are a tenant's, and another tenant's are NOT_FOUND. An
installation-wide caller names the tenant with the ``x-fabrica-tenant`` header; without one (``*``) every
RPC is INVALID_ARGUMENT (ids and event cursors are per tenant: a call across tenants would mean nothing).
WatchAlarms is woken only by its tenant's changes (runtime/notify.py TenantListener).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import grpc
from fabrica.alarm.v1 import alarm_service_pb2 as pb
from fabrica.alarm.v1 import alarm_service_pb2_grpc as pb_grpc
from fabrica.alarm.v1 import rule_pb2

from ..runtime import tenancy
from ..runtime.errors import FieldViolation, InvalidArgument, OutOfRange
from ..runtime.notify import Listener
from ..runtime.pages import decode_int_page_token, decode_page_token, encode_page_token, etag_of
from ..runtime.timefmt import optional_datetime, set_timestamp
from ..runtime.validation import violations_of
from ..runtime.watch import Page, watch
from . import convert
from . import lifecycle as lc
from .notify import store as notify_store
from .notify import convert as notify_convert
from .notify.domain import FORWARD_HTTP
from .rules import EVALUATION_FIELDS, UPDATABLE, TagCatalog, check_rule
from .service import AlarmService
from .store import RuleRow

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
WATCH_POLL_SECONDS = 2.0
WATCH_PAGE = 500
#: The snapshot of WatchAlarms: at most this many alarms that are not normal.
SNAPSHOT_LIMIT = 10_000
NOT_NORMAL = (lc.ACTIVE_UNACKNOWLEDGED, lc.ACTIVE_ACKNOWLEDGED, lc.CLEARED_UNACKNOWLEDGED)


def rule_message(row: RuleRow) -> rule_pb2.AlarmRule:
    msg = rule_pb2.AlarmRule.FromString(row.definition)
    msg.etag = etag_of(row.revision)
    set_timestamp(msg.create_time, row.create_time)
    set_timestamp(msg.update_time, row.update_time)
    return msg


def decode_rule(row: RuleRow):  # noqa: ANN201 - the evaluator's Rule
    """The evaluator's rule of a stored one; it watches from its last change (a tag's "no data" counts from there)."""
    msg = rule_pb2.AlarmRule.FromString(row.definition)
    return convert.rule_of(msg, row.revision, int(row.update_time.timestamp() * 1e9), row.tenant)


def _mask_paths(paths: list[str]) -> list[str]:
    if not paths or paths == ["*"]:
        return list(UPDATABLE)
    bad = [FieldViolation(f"update_mask.paths[{i}]", f"{p!r} cannot be updated; updatable: {', '.join(UPDATABLE)}")
           for i, p in enumerate(paths) if p not in UPDATABLE]
    if bad:
        raise InvalidArgument(bad)
    return paths


class AlarmServicer(pb_grpc.AlarmServiceServicer):
    def __init__(self, service: AlarmService, catalog: TagCatalog, listener: Listener, pool: asyncpg.Pool):
        self.service = service
        self.catalog = catalog
        self.listener = listener
        #: The notification targets and deliveries are notify/store.py's, on the service's pool.
        self.pool = pool

    # --- rules --------------------------------------------------------------------------------------------

    async def CreateAlarmRule(self, request: pb.CreateAlarmRuleRequest,
                              context: grpc.aio.ServicerContext) -> pb.CreateAlarmRuleResponse:
        rule = convert.without_output_only(request.rule)
        check_rule(rule)
        await self.catalog.check(rule)
        row = await self.service.create_rule(rule.id, rule.SerializeToString(deterministic=True), rule.enabled,
                                             request.request_id)
        return pb.CreateAlarmRuleResponse(rule=rule_message(row))

    async def GetAlarmRule(self, request: pb.GetAlarmRuleRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetAlarmRuleResponse:
        return pb.GetAlarmRuleResponse(rule=rule_message(await self.service.get_rule(request.id)))

    async def ListAlarmRules(self, request: pb.ListAlarmRulesRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListAlarmRulesResponse:
        after = decode_page_token(request.page_token, "rules") if request.page_token else None
        size = request.page_size or DEFAULT_PAGE_SIZE
        rows = await self.service.list_rules(after, size + 1)
        token = encode_page_token("rules", rows[size - 1].id) if len(rows) > size else ""
        return pb.ListAlarmRulesResponse(rules=[rule_message(r) for r in rows[:size]], next_page_token=token)

    async def UpdateAlarmRule(self, request: pb.UpdateAlarmRuleRequest,
                              context: grpc.aio.ServicerContext) -> pb.UpdateAlarmRuleResponse:
        patch = request.rule
        if not request.HasField("rule") or not patch.id:
            raise InvalidArgument(FieldViolation("rule.id", "the rule to update is required"))
        bad = [v for v in violations_of(rule_pb2.AlarmRule(id=patch.id), "rule") if v.field == "rule.id"]
        if bad:
            raise InvalidArgument(bad)
        paths = _mask_paths(list(request.update_mask.paths))

        async def merge(current: RuleRow) -> tuple[bytes, bool, int, bool]:
            old = rule_pb2.AlarmRule.FromString(current.definition)
            merged = rule_pb2.AlarmRule()
            merged.CopyFrom(old)
            for path in paths:
                field = merged.DESCRIPTOR.fields_by_name[path]
                if field.message_type is not None:
                    if patch.HasField(path):
                        getattr(merged, path).CopyFrom(getattr(patch, path))
                    else:
                        merged.ClearField(path)
                else:
                    setattr(merged, path, getattr(patch, path))
            check_rule(merged)
            restart = any(getattr(old, f) != getattr(merged, f) for f in EVALUATION_FIELDS)
            if restart or merged.target != old.target or (merged.enabled and not old.enabled):
                await self.catalog.check(merged)
            return merged.SerializeToString(deterministic=True), merged.enabled, merged.severity, restart

        row = await self.service.update_rule(patch.id, patch.etag, merge)
        return pb.UpdateAlarmRuleResponse(rule=rule_message(row))

    async def DeleteAlarmRule(self, request: pb.DeleteAlarmRuleRequest,
                              context: grpc.aio.ServicerContext) -> pb.DeleteAlarmRuleResponse:
        await self.service.delete_rule(request.id, request.etag)
        return pb.DeleteAlarmRuleResponse()

    # --- alarms and events --------------------------------------------------------------------------------

    async def ListAlarms(self, request: pb.ListAlarmsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListAlarmsResponse:
        states = sorted({convert.state_name(s) for s in request.states}) or (
            [*NOT_NORMAL, lc.NORMAL] if request.include_normal else list(NOT_NORMAL))
        query = f"alarms:{sorted(request.severities)}:{request.plc_id}:{states}:{request.rule_id}"
        after = None
        if request.page_token:
            position = decode_page_token(request.page_token, query)
            rule_id, _, tag = position.rpartition("/")
            if not rule_id or not tag.isdigit():
                raise InvalidArgument(FieldViolation("page_token", "not a token this service issued"))
            after = (rule_id, int(tag))
        size = request.page_size or DEFAULT_PAGE_SIZE
        rows = await self.service.list_alarms(after=after, limit=size + 1, severities=list(request.severities),
                                              plc_id=request.plc_id, states=states, rule_id=request.rule_id)
        token = ""
        if len(rows) > size:
            last = rows[size - 1]
            token = encode_page_token(query, f"{last.rule_id}/{last.tag_id}")
        return pb.ListAlarmsResponse(alarms=[convert.alarm_message(a) for a in rows[:size]], next_page_token=token)

    async def ListAlarmEvents(self, request: pb.ListAlarmEventsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ListAlarmEventsResponse:
        start, end = optional_datetime(request, "start_time"), optional_datetime(request, "end_time")
        if start and end and end < start:
            raise InvalidArgument(FieldViolation("end_time", "must not be before start_time"))
        query = (f"events:{start}:{end}:{request.plc_id}:{request.tag_id}:{sorted(request.severities)}:"
                 f"{request.rule_id}")
        before = decode_int_page_token(request.page_token, query)
        size = request.page_size or DEFAULT_PAGE_SIZE
        rows = await self.service.list_events(before_id=before, limit=size + 1, start=start, end=end,
                                              plc_id=request.plc_id, tag_id=request.tag_id,
                                              severities=list(request.severities), rule_id=request.rule_id)
        token = encode_page_token(query, str(rows[size - 1].id)) if len(rows) > size else ""
        return pb.ListAlarmEventsResponse(events=[convert.event_message(e) for e in rows[:size]],
                                          next_page_token=token)

    async def AcknowledgeAlarm(self, request: pb.AcknowledgeAlarmRequest,
                               context: grpc.aio.ServicerContext) -> pb.AcknowledgeAlarmResponse:
        alarm, event = await self.service.acknowledge(request.rule_id, request.tag_id, request.note, request.etag)
        return pb.AcknowledgeAlarmResponse(alarm=convert.alarm_message(alarm), event=convert.event_message(event))

    async def ShelveAlarm(self, request: pb.ShelveAlarmRequest,
                          context: grpc.aio.ServicerContext) -> pb.ShelveAlarmResponse:
        seconds = request.duration.ToTimedelta().total_seconds()
        alarm, event = await self.service.shelve(request.rule_id, request.tag_id, seconds, request.note, request.etag)
        return pb.ShelveAlarmResponse(alarm=convert.alarm_message(alarm), event=convert.event_message(event))

    # --- WatchAlarms --------------------------------------------------------------------------------------

    async def WatchAlarms(self, request: pb.WatchAlarmsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchAlarmsResponse]:
        start: int | None = request.after_cursor or None
        if start is not None:
            last = await self.service.last_event_id()
            if start > last:
                raise OutOfRange(f"cursor {start} is ahead of the last event ({last})",
                                 metadata={"after_cursor": str(start), "last_cursor": str(last)})
        async with contextlib.aclosing(watch(self.listener, self._watch_page, start,
                                             poll_interval=WATCH_POLL_SECONDS)) as out:
            async for response in out:
                yield response

    async def _watch_page(self, cursor: int | None) -> Page[pb.WatchAlarmsResponse, int | None]:
        if cursor is None:
            last, alarms = await self.service.snapshot(list(NOT_NORMAL), SNAPSHOT_LIMIT)
            snapshot = pb.AlarmSnapshot(alarms=[convert.alarm_message(a) for a in alarms])
            return Page([pb.WatchAlarmsResponse(cursor=last, snapshot=snapshot)], last, more=True)
        changes = await self.service.changes_after(cursor, WATCH_PAGE)
        if not changes:
            return Page([], cursor)
        out = [pb.WatchAlarmsResponse(cursor=e.id, change=pb.AlarmChange(event=convert.event_message(e),
                                                                          alarm=convert.alarm_message(a)))
               for e, a in changes]
        return Page(out, changes[-1][0].id, more=len(changes) == WATCH_PAGE)

    # --- notification targets and deliveries (notify/) ----------------------------------------------------

    async def CreateNotificationTarget(self, request: pb.CreateNotificationTargetRequest,
                                       context: grpc.aio.ServicerContext) -> pb.CreateNotificationTargetResponse:
        with _prefixed("target"):
            target = await notify_store.create_notification_target(
                self.pool, notify_convert.notification_target_from_proto(request.target))
        return pb.CreateNotificationTargetResponse(target=target_message(target))

    async def GetNotificationTarget(self, request: pb.GetNotificationTargetRequest,
                                    context: grpc.aio.ServicerContext) -> pb.GetNotificationTargetResponse:
        target = await notify_store.get_notification_target(self.pool, request.id)
        return pb.GetNotificationTargetResponse(target=target_message(target))

    async def ListNotificationTargets(self, request: pb.ListNotificationTargetsRequest,
                                      context: grpc.aio.ServicerContext) -> pb.ListNotificationTargetsResponse:
        targets = await notify_store.list_notification_targets(self.pool)
        return pb.ListNotificationTargetsResponse(targets=[target_message(t) for t in targets])

    async def UpdateNotificationTarget(self, request: pb.UpdateNotificationTargetRequest,
                                       context: grpc.aio.ServicerContext) -> pb.UpdateNotificationTargetResponse:
        t = request.target
        if not t.id:
            raise InvalidArgument(FieldViolation("target.id", "the target to update is required"))
        updatable = ("display_name", "url", "secret", "enabled")
        paths = list(request.update_mask.paths)
        if not paths or paths == ["*"]:
            paths = ["display_name", "url", "enabled"]
        bad = [FieldViolation(f"update_mask.paths[{i}]", f"{p!r} cannot be updated; updatable: {', '.join(updatable)}")
               for i, p in enumerate(paths) if p not in updatable]
        if bad:
            raise InvalidArgument(bad)
        with _prefixed("target"):
            target = await notify_store.update_notification_target(
                self.pool, t.id, expected_revision=_revision(t.etag), **{p: getattr(t, p) for p in paths})
        return pb.UpdateNotificationTargetResponse(target=target_message(target))

    async def DeleteNotificationTarget(self, request: pb.DeleteNotificationTargetRequest,
                                       context: grpc.aio.ServicerContext) -> pb.DeleteNotificationTargetResponse:
        await notify_store.delete_notification_target(self.pool, request.id)
        return pb.DeleteNotificationTargetResponse()

    async def ListDeliveries(self, request: pb.ListDeliveriesRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListDeliveriesResponse:
        query = f"deliveries:{request.target_id}:{request.state}"
        before = decode_int_page_token(request.page_token, query)
        size = request.page_size or DEFAULT_PAGE_SIZE
        rows = await notify_store.list_deliveries(self.pool, target_id=request.target_id or None,
                                                  state=request.state or None, before_id=before, limit=size + 1)
        token = encode_page_token(query, str(rows[size - 1].id)) if len(rows) > size else ""
        return pb.ListDeliveriesResponse(deliveries=[notify_convert.delivery_to_proto(d) for d in rows[:size]],
                                         next_page_token=token)

    # --- forwarding targets (notify/forwarding.py) --------------------------------------------------------

    async def CreateForwardingTarget(self, request: pb.CreateForwardingTargetRequest,
                                     context: grpc.aio.ServicerContext) -> pb.CreateForwardingTargetResponse:
        with _prefixed("target"):
            target = await notify_store.create_forwarding_target(
                self.pool, notify_convert.forwarding_target_from_proto(request.target))
        return pb.CreateForwardingTargetResponse(target=notify_convert.forwarding_target_to_proto(target))

    async def GetForwardingTarget(self, request: pb.GetForwardingTargetRequest,
                                  context: grpc.aio.ServicerContext) -> pb.GetForwardingTargetResponse:
        target = await notify_store.get_forwarding_target(self.pool, request.id)
        return pb.GetForwardingTargetResponse(target=notify_convert.forwarding_target_to_proto(target))

    async def ListForwardingTargets(self, request: pb.ListForwardingTargetsRequest,
                                    context: grpc.aio.ServicerContext) -> pb.ListForwardingTargetsResponse:
        targets = await notify_store.list_forwarding_targets(self.pool)
        return pb.ListForwardingTargetsResponse(targets=[notify_convert.forwarding_target_to_proto(t) for t in targets])

    async def UpdateForwardingTarget(self, request: pb.UpdateForwardingTargetRequest,
                                     context: grpc.aio.ServicerContext) -> pb.UpdateForwardingTargetResponse:
        t = request.target
        if not t.id:
            raise InvalidArgument(FieldViolation("target.id", "the target to update is required"))
        updatable = ("display_name", "plc_ids", "http.url", "http.secret", "enabled")
        paths = list(request.update_mask.paths)
        if not paths or paths == ["*"]:
            current = await notify_store.get_forwarding_target(self.pool, t.id)
            paths = ["display_name", "plc_ids", *(["http.url"] if current.kind == FORWARD_HTTP else []), "enabled"]
        bad = [FieldViolation(f"update_mask.paths[{i}]", f"{p!r} cannot be updated; updatable: {', '.join(updatable)}")
               for i, p in enumerate(paths) if p not in updatable]
        if bad:
            raise InvalidArgument(bad)
        values = {"display_name": t.display_name, "plc_ids": list(t.plc_ids), "http.url": t.http.url,
                  "http.secret": t.http.secret, "enabled": t.enabled}
        names = {"http.url": "url", "http.secret": "secret"}
        with _prefixed("target"):
            target = await notify_store.update_forwarding_target(
                self.pool, t.id, expected_revision=_revision(t.etag), **{names.get(p, p): values[p] for p in paths})
        return pb.UpdateForwardingTargetResponse(target=notify_convert.forwarding_target_to_proto(target))

    async def DeleteForwardingTarget(self, request: pb.DeleteForwardingTargetRequest,
                                     context: grpc.aio.ServicerContext) -> pb.DeleteForwardingTargetResponse:
        await notify_store.delete_forwarding_target(self.pool, request.id)
        return pb.DeleteForwardingTargetResponse()


class _prefixed(contextlib.AbstractContextManager):
    """Field violations raised inside name fields of the request's `prefix` message (notify/ names them bare)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __exit__(self, kind, exc, tb) -> bool:  # noqa: ANN001
        if isinstance(exc, InvalidArgument):
            raise InvalidArgument([FieldViolation(f"{self.prefix}.{v.field}", v.description)
                                   for v in exc.violations]) from None
        return False


def _revision(etag: str) -> int | None:
    """The revision an etag of notify's resources names (runtime.pages.etag_of); None for no etag."""
    if not etag:
        return None
    if not (etag.startswith("r") and etag[1:].isdigit()) or len(etag) > 20:
        raise InvalidArgument(FieldViolation("target.etag", "not an etag this service issued"))
    return int(etag[1:])


target_message = notify_convert.notification_target_to_proto


# Every RPC served here works in one tenant (a not-served one stays the generated UNIMPLEMENTED).
tenancy.every_rpc_in_one_tenant(AlarmServicer, pb.DESCRIPTOR.services_by_name["AlarmService"],
                                "alarm rules, alarms, events and targets")
