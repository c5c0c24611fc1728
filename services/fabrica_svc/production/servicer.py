"""ProductionService over gRPC: translates requests and responses (convert.py) and calls the service layer
(service.py). No SQL and no transactions here.

Every request has already passed protovalidate (the interceptor); the rules the protos cannot express are
in resources.py and are checked here, before the service layer writes anything.

Tenants: every RPC but ListAuditEntries works in the one tenant the interceptor set for it (the caller's, or
the one an installation-wide caller names with x-fabrica-tenant); across tenants it is INVALID_ARGUMENT
(field x-fabrica-tenant). The pool scopes every statement to that tenant (row-level security), so another
tenant's id is NOT_FOUND like an id nobody has, and WatchOrders wakes on its tenant's changes only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from google.protobuf import field_mask_pb2, message

from ..runtime import audit, tenancy
from ..runtime.errors import FieldViolation, InvalidArgument
from ..runtime.pages import decode_int_page_token, decode_page_token, encode_page_token
from ..runtime.timefmt import optional_datetime
from ..runtime.validation import violations_of
from ..runtime.watch import Page, watch
from . import convert, resources
from .domain import OrderAction
from ..runtime.notify import TenantListener
from .resources import DEFECT_CODE, DOWNTIME_REASON, ITEM, REFERENCE_TYPE, SECTOR, WORK_CENTER, Kind
from .service import ProductionService
from .store import records

log = logging.getLogger(__name__)

#: Page size when a List request leaves page_size at 0 (the protos say 100).
DEFAULT_PAGE_SIZE = 100
#: Longest a watcher waits for a notification before it looks for changes anyway.
WATCH_POLL_SECONDS = 2.0
#: Orders per WatchOrders change message.
WATCH_PAGE = 500
#: A resume from further back than this many revisions gets a fresh snapshot instead: orders are never
#: deleted, so any resume could be served, but catching up on thousands of changed orders is slower and
#: less useful to a UI than the current state.
MAX_RESUME_REVISIONS = 10_000


def _page_size(requested: int) -> int:
    return requested or DEFAULT_PAGE_SIZE


def _require_id(kind: Kind, resource: message.Message, present: bool) -> str:
    """The id of the resource an Update names, checked by the id's own contract rule before any SQL (the
    request's resource is validated only after the mask is merged, so its rules have not run yet)."""
    if not present or not resource.id:  # type: ignore[attr-defined]
        raise InvalidArgument(FieldViolation(f"{kind.field}.id", f"the {kind.name} to update is required"))
    probe = type(resource)(id=resource.id)  # type: ignore[attr-defined]
    bad = [v for v in violations_of(probe, kind.field) if v.field == f"{kind.field}.id"]
    if bad:
        raise InvalidArgument(bad)
    return resource.id  # type: ignore[attr-defined]


#: The methods an installation-wide caller may call without naming a tenant (x-fabrica-tenant: * or no header
#: from a service): they read every tenant's rows. Every other method works in one tenant.
ACROSS_TENANTS = frozenset({"ListAuditEntries"})

class ProductionServicer(pb_grpc.ProductionServiceServicer):
    def __init__(self, service: ProductionService, listener: TenantListener):
        self.service = service
        self.listener = listener

    # ----------------------------------------------------------------------------------------------------------
    # Master data: one implementation, six resources
    # ----------------------------------------------------------------------------------------------------------

    async def _create(self, kind: Kind, resource: message.Message) -> message.Message:
        resource = resources.without_output_only(resource)
        resources.check_resource(kind, resource)
        created = await self.service.create_master(kind, convert.master_record(kind, resource))
        return convert.master_message(kind, created)

    async def _get(self, kind: Kind, resource_id: str) -> message.Message:
        return convert.master_message(kind, await self.service.get_master(kind, resource_id))

    async def _list(self, kind: Kind, page_size: int, token: str, parent_id: str = "") -> tuple[list, str]:
        query = f"{kind.field}|{parent_id}"
        after = decode_page_token(token, query) if token else ""
        items, more = await self.service.list_master(kind, _page_size(page_size), after, parent_id)
        return [convert.master_message(kind, r) for r in items], encode_page_token(query, items[-1].id) if more else ""

    async def _update(self, kind: Kind, patch: message.Message, present: bool,
                      mask: field_mask_pb2.FieldMask) -> message.Message:
        resource_id = _require_id(kind, patch, present)
        paths = resources.mask_paths(kind, mask.paths)

        def merge(current: records.MasterRecord) -> records.MasterRecord:
            merged = resources.apply_update_mask(kind, convert.master_message(kind, current), patch, paths)
            resources.check_resource(kind, merged)
            return convert.master_record(kind, merged)

        updated = await self.service.update_master(kind, resource_id, patch.etag, merge)  # type: ignore[attr-defined]
        return convert.master_message(kind, updated)

    async def CreateSector(self, request: pb.CreateSectorRequest, context: grpc.aio.ServicerContext
                           ) -> pb.CreateSectorResponse:
        return pb.CreateSectorResponse(sector=await self._create(SECTOR, request.sector))

    async def GetSector(self, request: pb.GetSectorRequest, context: grpc.aio.ServicerContext) -> pb.GetSectorResponse:
        return pb.GetSectorResponse(sector=await self._get(SECTOR, request.id))

    async def ListSectors(self, request: pb.ListSectorsRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ListSectorsResponse:
        items, token = await self._list(SECTOR, request.page_size, request.page_token)
        return pb.ListSectorsResponse(sectors=items, next_page_token=token)

    async def UpdateSector(self, request: pb.UpdateSectorRequest, context: grpc.aio.ServicerContext
                           ) -> pb.UpdateSectorResponse:
        return pb.UpdateSectorResponse(sector=await self._update(
            SECTOR, request.sector, request.HasField("sector"), request.update_mask))

    async def DeleteSector(self, request: pb.DeleteSectorRequest, context: grpc.aio.ServicerContext
                           ) -> pb.DeleteSectorResponse:
        await self.service.delete_master(SECTOR, request.id, request.etag)
        return pb.DeleteSectorResponse()

    async def CreateWorkCenter(self, request: pb.CreateWorkCenterRequest, context: grpc.aio.ServicerContext
                               ) -> pb.CreateWorkCenterResponse:
        return pb.CreateWorkCenterResponse(work_center=await self._create(WORK_CENTER, request.work_center))

    async def GetWorkCenter(self, request: pb.GetWorkCenterRequest, context: grpc.aio.ServicerContext
                            ) -> pb.GetWorkCenterResponse:
        return pb.GetWorkCenterResponse(work_center=await self._get(WORK_CENTER, request.id))

    async def ListWorkCenters(self, request: pb.ListWorkCentersRequest, context: grpc.aio.ServicerContext
                              ) -> pb.ListWorkCentersResponse:
        items, token = await self._list(WORK_CENTER, request.page_size, request.page_token, request.sector_id)
        return pb.ListWorkCentersResponse(work_centers=items, next_page_token=token)

    async def UpdateWorkCenter(self, request: pb.UpdateWorkCenterRequest, context: grpc.aio.ServicerContext
                               ) -> pb.UpdateWorkCenterResponse:
        return pb.UpdateWorkCenterResponse(work_center=await self._update(
            WORK_CENTER, request.work_center, request.HasField("work_center"), request.update_mask))

    async def DeleteWorkCenter(self, request: pb.DeleteWorkCenterRequest, context: grpc.aio.ServicerContext
                               ) -> pb.DeleteWorkCenterResponse:
        await self.service.delete_master(WORK_CENTER, request.id, request.etag)
        return pb.DeleteWorkCenterResponse()

    async def CreateItem(self, request: pb.CreateItemRequest, context: grpc.aio.ServicerContext
                         ) -> pb.CreateItemResponse:
        return pb.CreateItemResponse(item=await self._create(ITEM, request.item))

    async def GetItem(self, request: pb.GetItemRequest, context: grpc.aio.ServicerContext) -> pb.GetItemResponse:
        return pb.GetItemResponse(item=await self._get(ITEM, request.id))

    async def ListItems(self, request: pb.ListItemsRequest, context: grpc.aio.ServicerContext) -> pb.ListItemsResponse:
        items, token = await self._list(ITEM, request.page_size, request.page_token, request.reference_type_id)
        return pb.ListItemsResponse(items=items, next_page_token=token)

    async def UpdateItem(self, request: pb.UpdateItemRequest, context: grpc.aio.ServicerContext
                         ) -> pb.UpdateItemResponse:
        return pb.UpdateItemResponse(item=await self._update(
            ITEM, request.item, request.HasField("item"), request.update_mask))

    async def DeleteItem(self, request: pb.DeleteItemRequest, context: grpc.aio.ServicerContext
                         ) -> pb.DeleteItemResponse:
        await self.service.delete_master(ITEM, request.id, request.etag)
        return pb.DeleteItemResponse()

    async def CreateDefectCode(self, request: pb.CreateDefectCodeRequest, context: grpc.aio.ServicerContext
                               ) -> pb.CreateDefectCodeResponse:
        return pb.CreateDefectCodeResponse(defect_code=await self._create(DEFECT_CODE, request.defect_code))

    async def GetDefectCode(self, request: pb.GetDefectCodeRequest, context: grpc.aio.ServicerContext
                            ) -> pb.GetDefectCodeResponse:
        return pb.GetDefectCodeResponse(defect_code=await self._get(DEFECT_CODE, request.id))

    async def ListDefectCodes(self, request: pb.ListDefectCodesRequest, context: grpc.aio.ServicerContext
                              ) -> pb.ListDefectCodesResponse:
        items, token = await self._list(DEFECT_CODE, request.page_size, request.page_token)
        return pb.ListDefectCodesResponse(defect_codes=items, next_page_token=token)

    async def UpdateDefectCode(self, request: pb.UpdateDefectCodeRequest, context: grpc.aio.ServicerContext
                               ) -> pb.UpdateDefectCodeResponse:
        return pb.UpdateDefectCodeResponse(defect_code=await self._update(
            DEFECT_CODE, request.defect_code, request.HasField("defect_code"), request.update_mask))

    async def DeleteDefectCode(self, request: pb.DeleteDefectCodeRequest, context: grpc.aio.ServicerContext
                               ) -> pb.DeleteDefectCodeResponse:
        await self.service.delete_master(DEFECT_CODE, request.id, request.etag)
        return pb.DeleteDefectCodeResponse()

    async def CreateReferenceType(self, request: pb.CreateReferenceTypeRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.CreateReferenceTypeResponse:
        return pb.CreateReferenceTypeResponse(
            reference_type=await self._create(REFERENCE_TYPE, request.reference_type))

    async def GetReferenceType(self, request: pb.GetReferenceTypeRequest, context: grpc.aio.ServicerContext
                               ) -> pb.GetReferenceTypeResponse:
        return pb.GetReferenceTypeResponse(reference_type=await self._get(REFERENCE_TYPE, request.id))

    async def ListReferenceTypes(self, request: pb.ListReferenceTypesRequest, context: grpc.aio.ServicerContext
                                 ) -> pb.ListReferenceTypesResponse:
        items, token = await self._list(REFERENCE_TYPE, request.page_size, request.page_token)
        return pb.ListReferenceTypesResponse(reference_types=items, next_page_token=token)

    async def UpdateReferenceType(self, request: pb.UpdateReferenceTypeRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.UpdateReferenceTypeResponse:
        return pb.UpdateReferenceTypeResponse(reference_type=await self._update(
            REFERENCE_TYPE, request.reference_type, request.HasField("reference_type"), request.update_mask))

    async def DeleteReferenceType(self, request: pb.DeleteReferenceTypeRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.DeleteReferenceTypeResponse:
        await self.service.delete_master(REFERENCE_TYPE, request.id, request.etag)
        return pb.DeleteReferenceTypeResponse()

    async def CreateDowntimeReason(self, request: pb.CreateDowntimeReasonRequest, context: grpc.aio.ServicerContext
                                   ) -> pb.CreateDowntimeReasonResponse:
        return pb.CreateDowntimeReasonResponse(
            downtime_reason=await self._create(DOWNTIME_REASON, request.downtime_reason))

    async def GetDowntimeReason(self, request: pb.GetDowntimeReasonRequest, context: grpc.aio.ServicerContext
                                ) -> pb.GetDowntimeReasonResponse:
        return pb.GetDowntimeReasonResponse(downtime_reason=await self._get(DOWNTIME_REASON, request.id))

    async def ListDowntimeReasons(self, request: pb.ListDowntimeReasonsRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.ListDowntimeReasonsResponse:
        items, token = await self._list(DOWNTIME_REASON, request.page_size, request.page_token)
        return pb.ListDowntimeReasonsResponse(downtime_reasons=items, next_page_token=token)

    async def UpdateDowntimeReason(self, request: pb.UpdateDowntimeReasonRequest, context: grpc.aio.ServicerContext
                                   ) -> pb.UpdateDowntimeReasonResponse:
        return pb.UpdateDowntimeReasonResponse(downtime_reason=await self._update(
            DOWNTIME_REASON, request.downtime_reason, request.HasField("downtime_reason"), request.update_mask))

    async def DeleteDowntimeReason(self, request: pb.DeleteDowntimeReasonRequest, context: grpc.aio.ServicerContext
                                   ) -> pb.DeleteDowntimeReasonResponse:
        await self.service.delete_master(DOWNTIME_REASON, request.id, request.etag)
        return pb.DeleteDowntimeReasonResponse()

    # ----------------------------------------------------------------------------------------------------------
    # Orders
    # ----------------------------------------------------------------------------------------------------------

    async def CreateOrder(self, request: pb.CreateOrderRequest, context: grpc.aio.ServicerContext
                          ) -> pb.CreateOrderResponse:
        # Output-only fields (id, state, quantities, times, etag) are ignored: only what planning says is read.
        o = request.order
        return pb.CreateOrderResponse(order=convert.order_message(await self.service.create_order(
            o.number, o.item_id, o.work_center_id, o.planned_quantity, request.request_id)))

    async def GetOrder(self, request: pb.GetOrderRequest, context: grpc.aio.ServicerContext) -> pb.GetOrderResponse:
        return pb.GetOrderResponse(order=convert.order_message(await self.service.get_order(request.id)))

    async def ListOrders(self, request: pb.ListOrdersRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListOrdersResponse:
        states = sorted(set(request.states))
        query = f"orders|{request.work_center_id}|{','.join(map(str, states))}"
        before = decode_int_page_token(request.page_token, query)
        orders, more = await self.service.list_orders(request.work_center_id, states,
                                                      _page_size(request.page_size), before)
        return pb.ListOrdersResponse(orders=[convert.order_message(o) for o in orders],
                                     next_page_token=encode_page_token(query, str(orders[-1].id)) if more else "")

    async def _change(self, order_id: str, etag: str, action: OrderAction, reason: str = ""):  # noqa: ANN202
        return convert.order_message(await self.service.change_order_state(order_id, etag, action, reason))

    async def StartOrder(self, request: pb.StartOrderRequest, context: grpc.aio.ServicerContext
                         ) -> pb.StartOrderResponse:
        return pb.StartOrderResponse(order=await self._change(request.id, request.etag,
                                                                               OrderAction.START))

    async def PauseOrder(self, request: pb.PauseOrderRequest, context: grpc.aio.ServicerContext
                         ) -> pb.PauseOrderResponse:
        return pb.PauseOrderResponse(order=await self._change(request.id, request.etag,
                                                                               OrderAction.PAUSE))

    async def ResumeOrder(self, request: pb.ResumeOrderRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ResumeOrderResponse:
        return pb.ResumeOrderResponse(order=await self._change(request.id, request.etag,
                                                                                OrderAction.RESUME))

    async def CompleteOrder(self, request: pb.CompleteOrderRequest, context: grpc.aio.ServicerContext
                            ) -> pb.CompleteOrderResponse:
        return pb.CompleteOrderResponse(order=await self._change(request.id, request.etag,
                                                                                  OrderAction.COMPLETE))

    async def CancelOrder(self, request: pb.CancelOrderRequest, context: grpc.aio.ServicerContext
                          ) -> pb.CancelOrderResponse:
        return pb.CancelOrderResponse(order=await self._change(
            request.id, request.etag, OrderAction.CANCEL, request.reason))

    # ----------------------------------------------------------------------------------------------------------
    # Bookings, defects, downtime
    # ----------------------------------------------------------------------------------------------------------

    async def CreateBooking(self, request: pb.CreateBookingRequest, context: grpc.aio.ServicerContext
                            ) -> pb.CreateBookingResponse:
        b = request.booking
        resources.check(resources.booking_violations(b))
        created = await self.service.create_booking(b.order_id, b.good_quantity, b.scrap_quantity,
                                                    optional_datetime(b, "book_time"), b.note, request.request_id)
        return pb.CreateBookingResponse(booking=convert.booking_message(created))

    async def ListBookings(self, request: pb.ListBookingsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListBookingsResponse:
        query = f"bookings|{request.order_id}"
        after = decode_int_page_token(request.page_token, query) or 0
        bookings, more = await self.service.list_bookings(request.order_id, _page_size(request.page_size), after)
        return pb.ListBookingsResponse(bookings=[convert.booking_message(b) for b in bookings],
                                       next_page_token=encode_page_token(query, str(bookings[-1].id)) if more else "")

    async def CreateDefect(self, request: pb.CreateDefectRequest, context: grpc.aio.ServicerContext
                           ) -> pb.CreateDefectResponse:
        d = request.defect
        resources.check(resources.defect_violations(d))
        created = await self.service.create_defect(d.order_id, d.defect_code_id, d.quantity, d.note, request.request_id)
        return pb.CreateDefectResponse(defect=convert.defect_message(created))

    async def ListDefects(self, request: pb.ListDefectsRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ListDefectsResponse:
        query = f"defects|{request.order_id}"
        after = decode_int_page_token(request.page_token, query) or 0
        defects, more = await self.service.list_defects(request.order_id, _page_size(request.page_size), after)
        return pb.ListDefectsResponse(defects=[convert.defect_message(d) for d in defects],
                                      next_page_token=encode_page_token(query, str(defects[-1].id)) if more else "")

    async def CreateDowntime(self, request: pb.CreateDowntimeRequest, context: grpc.aio.ServicerContext
                             ) -> pb.CreateDowntimeResponse:
        d = request.downtime
        resources.check(resources.downtime_violations(d))
        created = await self.service.create_downtime(d.work_center_id, optional_datetime(d, "start_time"),
                                                     optional_datetime(d, "end_time"), d.reason_id, d.note)
        return pb.CreateDowntimeResponse(downtime=convert.downtime_message(created))

    async def ClassifyDowntime(self, request: pb.ClassifyDowntimeRequest, context: grpc.aio.ServicerContext
                               ) -> pb.ClassifyDowntimeResponse:
        return pb.ClassifyDowntimeResponse(downtime=convert.downtime_message(await self.service.classify_downtime(
            request.id, request.reason_id, request.note)))

    async def EndDowntime(self, request: pb.EndDowntimeRequest, context: grpc.aio.ServicerContext
                          ) -> pb.EndDowntimeResponse:
        return pb.EndDowntimeResponse(downtime=convert.downtime_message(await self.service.end_downtime(
            request.id, optional_datetime(request, "end_time"))))

    async def ListDowntimes(self, request: pb.ListDowntimesRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ListDowntimesResponse:
        start, end = optional_datetime(request, "start_time"), optional_datetime(request, "end_time")
        if start is not None and end is not None and end <= start:
            raise InvalidArgument(FieldViolation("end_time", "must be after start_time"))
        query = f"downtimes|{request.work_center_id}|{start}|{end}"
        after = None
        if request.page_token:
            last = decode_page_token(request.page_token, query)
            try:
                micros, last_id = last.split("|")
                after = (datetime.fromtimestamp(0, UTC) + timedelta(microseconds=int(micros)), int(last_id))
            except ValueError:
                raise InvalidArgument(FieldViolation("page_token", "not a token this service issued")) from None
        rows, more = await self.service.list_downtimes(request.work_center_id, start, end,
                                                       _page_size(request.page_size), after)
        downtimes = [convert.downtime_message(d) for d in rows]
        token = ""
        if more:
            tail = downtimes[-1]
            token = encode_page_token(query, f"{tail.start_time.ToMicroseconds()}|{tail.id}")
        return pb.ListDowntimesResponse(downtimes=downtimes, next_page_token=token)

    # ----------------------------------------------------------------------------------------------------------
    # OEE
    # ----------------------------------------------------------------------------------------------------------

    async def ListAuditEntries(self, request: pb.ListAuditEntriesRequest,
                               context: grpc.aio.ServicerContext) -> pb.ListAuditEntriesResponse:
        return await audit.list_response(self.service.db.pool, request, pb.ListAuditEntriesResponse)

    async def GetOee(self, request: pb.GetOeeRequest, context: grpc.aio.ServicerContext) -> pb.GetOeeResponse:
        if request.WhichOneof("subject") == "order_id":
            bad = [FieldViolation(name, "only with work_center_id: an order's window is its run")
                   for name in ("start_time", "end_time") if request.HasField(name)]
            resources.check(bad)
            figures, inputs = await self.service.order_oee(request.order_id)
        else:
            start, end = optional_datetime(request, "start_time"), optional_datetime(request, "end_time")
            if start is None:
                raise InvalidArgument(FieldViolation("start_time", "required for a work centre's OEE"))
            if end is not None and end <= start:
                raise InvalidArgument(FieldViolation("end_time", "must be after start_time"))
            figures, inputs = await self.service.work_center_oee(request.work_center_id, start, end)
        return pb.GetOeeResponse(oee=convert.oee_message(figures, inputs))

    # ----------------------------------------------------------------------------------------------------------
    # WatchOrders
    # ----------------------------------------------------------------------------------------------------------

    async def WatchOrders(self, request: pb.WatchOrdersRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchOrdersResponse]:
        wc = request.work_center_id
        # The cursor is the revision sent last; None until the first snapshot is sent.
        start: int | None = request.after_revision or None
        if start is not None:
            current = await self.service.current_order_revision()
            if start > current or current - start > MAX_RESUME_REVISIONS:
                log.info("WatchOrders cannot resume there; sending a snapshot",
                         extra={"after_revision": start, "current": current, "work_center_id": wc})
                start = None
        read = functools.partial(self._order_page, wc)
        # Woken by this tenant's order changes only (runtime/notify.py TenantListener); what it reads is this tenant's (row-level security).
        waits = self.listener.for_tenant(tenancy.require())
        async with contextlib.aclosing(watch(waits, read, start, poll_interval=WATCH_POLL_SECONDS)) as out:  # type: ignore[arg-type]
            async for response in out:
                yield response

    async def _order_page(self, wc: str, cursor: int | None) -> Page[pb.WatchOrdersResponse, int | None]:
        """The next page of a WatchOrders: the snapshot first, then up to WATCH_PAGE changed orders."""
        if cursor is None:
            revision, orders = await self.service.order_snapshot(wc)
            return Page([pb.WatchOrdersResponse(revision=revision, orders=[convert.order_message(o) for o in orders],
                                                snapshot=True)], revision, more=True)
        changes, current = await self.service.order_changes_after(cursor, wc, WATCH_PAGE)
        full = len(changes) == WATCH_PAGE
        # A short page holds every matching change up to `current` (read in the same snapshot), so the
        # watcher is then at `current`, even if the last changes were other work centres' orders.
        new_cursor = changes[-1].revision if full else max(cursor, current)
        if not changes:
            return Page([], new_cursor)
        response = pb.WatchOrdersResponse(revision=new_cursor, orders=[convert.order_message(o) for o in changes])
        return Page([response], new_cursor, more=full)


# Every RPC but ACROSS_TENANTS refuses a call across tenants: production's ids are unique per tenant only, its
# order revisions are per tenant, and what it writes belongs to one tenant.
tenancy.every_rpc_in_one_tenant(ProductionServicer, pb.DESCRIPTOR.services_by_name["ProductionService"],
                                "production's master data, orders and records", except_=ACROSS_TENANTS)
