"""The production service layer: each operation is one transaction of store calls around domain decisions.

The servicer translates messages (convert.py) and calls these; the store (store/) holds the SQL; the rules
are in domain.py, resources.py and booking.py. Every write runs in one transaction, so a refused request
leaves nothing behind. Tag events go ``load -> plan -> apply`` (TagEventService): the state of a whole
message is loaded in bulk, booking.plan decides, the effects and the moved cursor commit together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from fabrica.ingest.v1 import tag_event_pb2

from ..runtime import audit, tenancy
from ..runtime.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from ..runtime.pages import etag_of
from ..runtime.timefmt import timestamp_is_valid, to_datetime
from . import booking, convert, domain
from .domain import OrderAction, OrderState
from .resources import DEFECT_CODE, DOWNTIME_REASON, ITEM, REFERENCE_TYPE, SECTOR, WORK_CENTER, Kind, tag_bindings
from .store import Database, bookings, downtime, events, master, orders, records
from .store.common import (
    claim_request,
    current_revision,
    exists,
    lock_revision,
    missing,
    next_revision,
    notify,
    now,
    parse_id,
    precondition,
    record_request,
    stale,
)
from .tagcheck import TagCheck, binding_of

log = logging.getLogger(__name__)


def _busy(work_center_id: str, order_id: int | None, number: str | None) -> FailedPrecondition:
    which = f"order {number!r} (id {order_id})" if order_id else "another order"
    return precondition("WORK_CENTER_BUSY", f"workCenters/{work_center_id}",
                        f"{which} is in progress on work centre {work_center_id!r}; pause or complete it first",
                        "WORK_CENTER_BUSY", work_center_id=work_center_id,
                        **({"running_order_id": str(order_id)} if order_id else {}))


def _stale_order(order_id: str, given: str, current: str) -> Aborted:
    return Aborted(f"order {order_id} changed since it was read (etag {given}, now {current}); read it again and "
                   "retry", reason="ETAG_MISMATCH", metadata={"order_id": order_id, "etag": current})


class ProductionService:
    """Master data, orders, bookings, defects, downtime and OEE."""

    def __init__(self, db: Database, tag_check: TagCheck):
        self.db = db
        self.tag_check = tag_check

    # ----------------------------------------------------------------------------------------------------------
    # Master data
    # ----------------------------------------------------------------------------------------------------------

    async def _before_write(self, conn: asyncpg.Connection, kind: Kind, rec: records.MasterRecord) -> None:
        # FOR SHARE: the sector cannot be deleted under us before we commit.
        if kind is WORK_CENTER and not await exists(conn, "sectors", rec.sector_id, lock=True):
            raise missing(SECTOR, rec.sector_id)
        if (kind is ITEM and rec.reference_type_id
                and not await exists(conn, "reference_types", rec.reference_type_id, lock=True)):
            raise missing(REFERENCE_TYPE, rec.reference_type_id)

    async def create_master(self, kind: Kind, rec: records.MasterRecord) -> records.MasterRecord:
        if kind is WORK_CENTER:
            await self.tag_check.check(rec)
        async with self.db.write() as conn:
            await self._before_write(conn, kind, rec)
            created = await master.insert(conn, kind, rec)
            if kind is WORK_CENTER:
                await master.bind_tags(conn, rec.id, tag_bindings(rec))
            await audit.record(conn, f"{kind.collection}/{rec.id}", f"{kind.name} created")
            return created

    async def get_master(self, kind: Kind, resource_id: str) -> records.MasterRecord:
        return await master.get(self.db.pool, kind, resource_id)

    async def list_master(self, kind: Kind, page_size: int, after_id: str,
                          parent_id: str = "") -> tuple[list[records.MasterRecord], bool]:
        """A page by id; `parent_id` filters work centres by sector and items by reference type."""
        return await master.list_page(self.db.pool, kind, page_size, after_id, parent_id)

    async def update_master(self, kind: Kind, resource_id: str, etag: str,
                            merge: Callable[[records.MasterRecord], records.MasterRecord]) -> records.MasterRecord:
        """Lock the row, check the etag, store ``merge(current)``."""
        async with self.db.write() as conn:
            current = await master.get(conn, kind, resource_id, for_update=True)
            if etag and etag != etag_of(current.revision):
                raise stale(kind, resource_id, etag, etag_of(current.revision))
            new = merge(current)
            if kind is WORK_CENTER and binding_of(new) != binding_of(current):
                await self.tag_check.check(new)
            await self._before_write(conn, kind, new)
            updated = await master.update(conn, kind, new)
            if kind is WORK_CENTER:
                await master.bind_tags(conn, new.id, tag_bindings(new))
                await self._forget_baselines(conn, current, new)
            changed = [f for f in kind.updatable if getattr(current, f, None) != getattr(new, f, None)]
            await audit.record(conn, f"{kind.collection}/{resource_id}",
                               f"{kind.name} updated: {', '.join(changed) or 'no field changed'}")
            return updated

    @staticmethod
    async def _forget_baselines(conn: asyncpg.Connection, old: records.WorkCenter, new: records.WorkCenter) -> None:
        """Drop counter baselines and the machine state that no longer describe the bound tags.

        A tag that is unbound and later bound again must not book, from a stale baseline, what its counter
        advanced in between; after a width change old baselines would be read at the wrong width. The next
        reading of each tag is its new baseline.
        """
        width_changed = (domain.resolve_counter_settings(old.counter_width, 1)[0]
                         != domain.resolve_counter_settings(new.counter_width, 1)[0])
        keep = None if width_changed else [t for t in (new.production_counter_tag_id, new.scrap_counter_tag_id) if t]
        await master.forget_baselines(conn, new.id, keep_counter_tags=keep,
                                      machine_state=old.machine_state_tag_id != new.machine_state_tag_id)

    async def delete_master(self, kind: Kind, resource_id: str, etag: str) -> None:
        async with self.db.write() as conn:
            revision = await master.revision_for_delete(conn, kind, resource_id)
            if etag and etag != etag_of(revision):
                raise stale(kind, resource_id, etag, etag_of(revision))
            await master.delete(conn, kind, resource_id)
            await audit.record(conn, f"{kind.collection}/{resource_id}", f"{kind.name} deleted")

    # ----------------------------------------------------------------------------------------------------------
    # Orders
    # ----------------------------------------------------------------------------------------------------------

    async def create_order(self, number: str, item_id: str, work_center_id: str, planned_quantity: int,
                           request_id: str) -> records.Order:
        async with self.db.write() as conn:
            await lock_revision(conn)
            earlier = await claim_request(conn, "order", request_id)
            if earlier is not None:
                return await orders.by_id(conn, int(earlier))
            violations = []
            if not await exists(conn, "items", item_id, lock=True):
                violations += missing(ITEM, item_id).violations
            if not await exists(conn, "work_centers", work_center_id, lock=True):
                violations += missing(WORK_CENTER, work_center_id).violations
            if violations:
                raise FailedPrecondition("; ".join(v.description for v in violations), violations=violations,
                                         reason="REFERENCE_NOT_FOUND")
            revision = await next_revision(conn)
            order = await orders.insert(conn, number, item_id, work_center_id, planned_quantity, revision)
            await record_request(conn, "order", request_id, order.id)
            await audit.record(conn, f"orders/{order.id}", f"order {number!r}: {planned_quantity} of item {item_id!r} "
                               f"on work centre {work_center_id!r}")
            await notify(conn, revision)
            return order

    async def get_order(self, order_id: str) -> records.Order:
        return await orders.get(self.db.pool, order_id)

    async def list_orders(self, work_center_id: str, states: Sequence[int], page_size: int,
                          before_id: int | None) -> tuple[list[records.Order], bool]:
        return await orders.list_page(self.db.pool, work_center_id, states, page_size, before_id)

    async def change_order_state(self, order_id: str, etag: str, action: OrderAction,
                                 reason: str = "") -> records.Order:
        """Apply a state change (domain.transition) under the order's row lock, in one transaction."""
        async with self.db.write() as conn:
            await lock_revision(conn)
            row = await orders.get(conn, order_id, for_update=True)
            if etag and etag != etag_of(row.revision):
                raise _stale_order(order_id, etag, etag_of(row.revision))
            new_state = domain.transition(row.state, action, subject=f"orders/{row.id}")
            wc = row.work_center_id
            if new_state is OrderState.IN_PROGRESS:
                running = await orders.running_other(conn, wc, row.id)
                if running is not None:
                    raise _busy(wc, *running)
            revision = await next_revision(conn)
            try:
                new = await orders.set_state(conn, row.id, new_state, revision, reason)
            except asyncpg.UniqueViolationError:  # the index caught what the check above should have
                raise _busy(wc, None, None) from None
            if new_state is OrderState.IN_PROGRESS:
                await orders.start_run(conn, row.id, wc)
            else:
                await orders.end_run(conn, row.id)
            await audit.record(conn, f"orders/{row.id}", f"{OrderState(row.state).name} -> {new_state.name}"
                               + (f" ({reason})" if reason else ""))
            await notify(conn, revision)
            return new

    # ----------------------------------------------------------------------------------------------------------
    # Bookings and defects
    # ----------------------------------------------------------------------------------------------------------

    async def create_booking(self, order_id: str, good: int, scrap: int, book_time: datetime | None, note: str,
                             request_id: str) -> records.Booking:
        async with self.db.write() as conn:
            await lock_revision(conn)
            earlier = await claim_request(conn, "booking", request_id)
            if earlier is not None:
                return await bookings.get(conn, int(earlier))
            order = await orders.get(conn, order_id, for_update=True)
            state = OrderState(order.state)
            subject = f"orders/{order.id}"
            if state in (OrderState.COMPLETED, OrderState.CANCELLED):
                raise precondition("ORDER_STATE", subject, f"cannot book to an order that is {state.name}",
                                   "ORDER_CLOSED", order_id=str(order.id), state=state.name)
            new_good = order.good_quantity + good
            if new_good < 0:
                raise precondition("QUANTITY", subject, f"the correction of {good} would leave {new_good} good "
                                   f"parts; the order has {order.good_quantity}", "QUANTITY_NEGATIVE",
                                   order_id=str(order.id))
            new_scrap = order.scrap_quantity + scrap
            created = await bookings.insert_manual(conn, order.id, good, scrap, book_time, note)
            completion = domain.complete_if_reached(state, new_good, order.planned_quantity, order.start_time,
                                                    await now(conn))
            revision = await next_revision(conn)
            await orders.set_totals(conn, [(order.id, new_good, new_scrap, completion.state if completion else state,
                                            completion.end_time if completion else order.end_time, revision)])
            if completion is not None:
                await orders.end_run(conn, order.id)
                log.info("order completed by a manual booking", extra={"order_id": order.id, "good": new_good})
            await record_request(conn, "booking", request_id, created.id)
            await audit.record(conn, f"orders/{order.id}/bookings/{created.id}",
                               f"manual booking: good {good:+d}, scrap {scrap:+d}"
                               + ("; order completed" if completion is not None else ""))
            await notify(conn, revision)
            return created

    async def list_bookings(self, order_id: str, page_size: int, after_id: int) -> tuple[list[records.Booking], bool]:
        async with self.db.read() as conn:
            oid = await orders.existing_id(conn, order_id)
            return await bookings.list_page(conn, oid, page_size, after_id)

    async def create_defect(self, order_id: str, defect_code_id: str, quantity: int, note: str,
                            request_id: str) -> records.Defect:
        async with self.db.write() as conn:
            earlier = await claim_request(conn, "defect", request_id)
            if earlier is not None:
                return await bookings.get_defect(conn, int(earlier))
            oid = await orders.existing_id(conn, order_id)
            if not await exists(conn, "defect_codes", defect_code_id, lock=True):
                raise missing(DEFECT_CODE, defect_code_id)
            created = await bookings.insert_defect(conn, oid, defect_code_id, quantity, note)
            await record_request(conn, "defect", request_id, created.id)
            await audit.record(conn, f"orders/{oid}/defects/{created.id}", f"{quantity} x {defect_code_id!r}")
            return created

    async def list_defects(self, order_id: str, page_size: int, after_id: int) -> tuple[list[records.Defect], bool]:
        async with self.db.read() as conn:
            oid = await orders.existing_id(conn, order_id)
            return await bookings.list_defects(conn, oid, page_size, after_id)

    # ----------------------------------------------------------------------------------------------------------
    # Downtime
    # ----------------------------------------------------------------------------------------------------------

    async def create_downtime(self, work_center_id: str, start: datetime, end: datetime | None, reason_id: str,
                              note: str) -> records.Downtime:
        async with self.db.write() as conn:
            if not await exists(conn, "work_centers", work_center_id, lock=True):
                raise missing(WORK_CENTER, work_center_id)
            if reason_id and not await exists(conn, "downtime_reasons", reason_id, lock=True):
                raise missing(DOWNTIME_REASON, reason_id)
            # The order is the one that was running when the stop began (order_id is not taken from the
            # request: it would have to agree with the runs anyway).
            order_id = await orders.running_at(conn, work_center_id, start)
            created = await downtime.insert(conn, work_center_id, order_id, start, end, reason_id or None, note)
            await audit.record(conn, f"downtimes/{created.id}", f"work centre {work_center_id!r} from "
                               f"{start.isoformat()}" + (f", reason {reason_id!r}" if reason_id else ""))
            return created

    async def classify_downtime(self, downtime_id: str, reason_id: str, note: str) -> records.Downtime:
        did = parse_id(downtime_id, "downtime")
        async with self.db.write() as conn:
            if not await downtime.lock(conn, did):
                raise NotFound(f"no downtime with id {downtime_id!r}", metadata={"downtime_id": downtime_id})
            if not await exists(conn, "downtime_reasons", reason_id, lock=True):
                raise missing(DOWNTIME_REASON, reason_id)
            classified = await downtime.classify(conn, did, reason_id, note)
            await audit.record(conn, f"downtimes/{did}", f"classified as {reason_id!r}")
            return classified

    async def end_downtime(self, downtime_id: str, end: datetime | None) -> records.Downtime:
        """End an open stop entered by hand at `end` (the transaction's time when None)."""
        did = parse_id(downtime_id, "downtime")
        async with self.db.write() as conn:
            stop = await downtime.get(conn, did, lock=True)
            if stop is None:
                raise NotFound(f"no downtime with id {downtime_id!r}", metadata={"downtime_id": downtime_id})
            subject = f"downtimes/{did}"
            if stop.end_time is not None:
                raise precondition("DOWNTIME_STATE", subject, f"the stop ended already, at {stop.end_time.isoformat()}",
                                   "DOWNTIME_NOT_OPEN", downtime_id=downtime_id)
            if stop.automatic:
                raise precondition("DOWNTIME_STATE", subject, "the machine-state tag opened this stop; it ends when "
                                   "the machine runs again", "DOWNTIME_AUTOMATIC", downtime_id=downtime_id)
            t_now = await now(conn)
            end = end or t_now
            if end <= stop.start_time:
                raise InvalidArgument(FieldViolation("end_time", f"must be after the stop began "
                                                                 f"({stop.start_time.isoformat()})"))
            if end > t_now:
                raise InvalidArgument(FieldViolation("end_time", "must not be in the future"))
            ended = await downtime.end(conn, did, end)
            await audit.record(conn, subject, f"ended at {end.isoformat()}")
            return ended

    async def list_downtimes(self, work_center_id: str, start: datetime | None, end: datetime | None,
                             page_size: int, after: tuple[datetime, int] | None
                             ) -> tuple[list[records.Downtime], bool]:
        async with self.db.read() as conn:
            if not await exists(conn, "work_centers", work_center_id):
                raise _no_work_center(work_center_id)
            return await downtime.list_page(conn, work_center_id, start, end, page_size, after)

    # ----------------------------------------------------------------------------------------------------------
    # OEE
    # ----------------------------------------------------------------------------------------------------------

    async def order_oee(self, order_id: str) -> tuple[domain.Oee, records.OeeInputs]:
        """OEE of an order's run, from its start to its end (or now)."""
        oid = parse_id(order_id, "order")
        async with self.db.read() as conn:
            t_now = await now(conn)
            row = await downtime.order_with_cycle(conn, oid)
            if row is None:
                raise NotFound(f"no order with id {order_id!r}", metadata={"order_id": order_id})
            if row.start_time is None:
                raise precondition("ORDER_STATE", f"orders/{oid}", "the order has not started; it has no run to "
                                   "measure", "ORDER_NOT_STARTED", order_id=order_id)
            start, end = row.start_time, row.end_time or t_now
            stops = await downtime.counting(conn, row.work_center_id, start, end)
        inputs = records.OeeInputs(start, end, t_now, stops,
                                   [(row.ideal_cycle_nanos / 1e9, row.good_quantity, row.scrap_quantity)])
        return oee_of(inputs), inputs

    async def work_center_oee(self, work_center_id: str, start: datetime,
                              end: datetime | None) -> tuple[domain.Oee, records.OeeInputs]:
        """OEE of a work centre over [start, end); a window reaching past now ends now."""
        async with self.db.read() as conn:
            t_now = await now(conn)
            if not await exists(conn, "work_centers", work_center_id):
                raise _no_work_center(work_center_id)
            # The future has no run time yet: a window that reaches past now ends now.
            end = t_now if end is None else min(end, t_now)
            start = min(start, end)
            stops = await downtime.counting(conn, work_center_id, start, end)
            counts = await downtime.counts_by_item(conn, work_center_id, start, end)
        inputs = records.OeeInputs(start, end, t_now, stops, counts)
        return oee_of(inputs), inputs

    # ----------------------------------------------------------------------------------------------------------
    # WatchOrders
    # ----------------------------------------------------------------------------------------------------------

    async def order_snapshot(self, work_center_id: str) -> tuple[int, list[records.Order]]:
        """Open orders and those closed in the last 24 h, and the revision they are current at."""
        async with self.db.read() as conn:
            return await current_revision(conn), await orders.snapshot(conn, work_center_id)

    async def order_changes_after(self, revision: int, work_center_id: str,
                                  limit: int = 500) -> tuple[list[records.Order], int]:
        """Orders changed after `revision` (by revision), and the current revision, read consistently."""
        async with self.db.read() as conn:
            current = await current_revision(conn)
            return await orders.changed_after(conn, revision, work_center_id, limit), current

    async def current_order_revision(self) -> int:
        return await current_revision(self.db.pool)


def _no_work_center(work_center_id: str) -> NotFound:
    return NotFound(f"no work centre with id {work_center_id!r}", metadata={"work_center_id": work_center_id})


def oee_of(inputs: records.OeeInputs) -> domain.Oee:
    """OEE of a window from what the store read: planned time is the whole window (shifts and calendars are
    not modelled yet), downtime the merged stops inside it that count against availability or are not
    classified, counts from the bookings, performance from each item's ideal cycle time."""
    planned_s = max((inputs.end - inputs.start).total_seconds(), 0.0)
    downtime_s = domain.overlap_seconds(inputs.downtimes, inputs.start, inputs.end, inputs.now)
    # A window can hold a negative manual correction without the parts it corrects; it never counts below 0.
    good = sum(max(g, 0) for _, g, _ in inputs.counts)
    cycle_s, total = domain.weighted_ideal_cycle_time([(c, max(g, 0) + max(s, 0)) for c, g, s in inputs.counts])
    return domain.compute_oee(planned_time_s=planned_s, downtime_s=downtime_s, ideal_cycle_time_s=cycle_s,
                              total_count=total, good_count=min(good, total))


# --------------------------------------------------------------------------------------------------------------
# Tag events
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    """What one message of tag events did."""

    cursor: int
    applied: int = 0
    booked_good: int = 0
    booked_scrap: int = 0
    anomalies: int = 0
    completed_orders: list[int] = field(default_factory=list)


#: Errors of applying tag events that come from the events themselves (a value the database cannot hold,
#: say an order total beyond 2^63), not from the database being away: the same event fails the same way
#: every time. asyncpg's client-side DataError is a ValueError; its server-side one is SQLSTATE class 22.
UNTAKEABLE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, ArithmeticError, TypeError, asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
)


class TagEventService:
    """Applies messages of tag events exactly once: load -> plan -> apply, with the cursor, in one transaction."""

    @staticmethod
    async def try_lock(conn: asyncpg.Connection) -> bool:
        return await events.try_lock(conn)

    @staticmethod
    async def cursor(conn: asyncpg.Connection) -> int:
        return await events.cursor(conn)

    @staticmethod
    async def reset_cursor(conn: asyncpg.Connection) -> None:
        await events.save_cursor(conn, 0)

    async def apply_tag_events(self, conn: asyncpg.Connection, messages: Sequence[tag_event_pb2.TagEvent], *,
                               unnamed: str = tenancy.DEFAULT) -> ApplyResult:
        """Apply one message of tag events and move the cursor past it, in one transaction on `conn`. Each event
        is booked in the tenant it names (TagEvent.tenant), one that names none in `unnamed`.

        If the message cannot be applied because of what is in it (an error of the data, not of the database
        being away: see UNTAKEABLE_ERRORS), its events are applied one at a time, each in its own
        transaction with the cursor, and an event that cannot be taken is recorded as an ``UNTAKEABLE``
        anomaly and passed, the cursor moved past it in the same transaction, and logged once. Replaying
        the same event could only fail the same way, and would stop every later booking."""
        try:
            return await self._apply(conn, messages, unnamed)
        except UNTAKEABLE_ERRORS as exc:
            if len(messages) == 1:
                return await self._pass_untakeable(conn, messages[0], exc, unnamed)
        total = ApplyResult(cursor=await events.cursor(conn))
        for event in sorted(messages, key=lambda e: e.cursor):
            try:
                one = await self._apply(conn, [event], unnamed)
            except UNTAKEABLE_ERRORS as exc:
                one = await self._pass_untakeable(conn, event, exc, unnamed)
            total.cursor = max(total.cursor, one.cursor)
            total.applied += one.applied
            total.booked_good += one.booked_good
            total.booked_scrap += one.booked_scrap
            total.anomalies += one.anomalies
            total.completed_orders += one.completed_orders
        return total

    async def _pass_untakeable(self, conn: asyncpg.Connection, event: tag_event_pb2.TagEvent,
                               exc: BaseException, unnamed: str) -> ApplyResult:
        """Record `event`, which failed with `exc`, as an UNTAKEABLE anomaly of its tenant and move the cursor
        past it, in one transaction; log it. An event naming no tenant code at all cannot be recorded anywhere:
        it is passed and logged only."""
        problem = f"{type(exc).__name__}: {exc}"[:500]
        tenant = event.tenant or unnamed
        work_center_id = ""
        async with conn.transaction():
            stored = await events.cursor(conn, for_update=True)
            if event.cursor <= stored:
                return ApplyResult(cursor=stored)
            recorded = tenancy.is_code(tenant)
            if recorded:
                with tenancy.scope(tenant):
                    await events.set_tenant(conn, tenant)
                    bindings = await events.load_bindings(conn, [event.tag_id])
                    binding = bindings.get(event.tag_id)
                    work_center_id = binding.work_center_id if binding else ""
                    read_time = (to_datetime(event.read_time)
                                 if timestamp_is_valid(event.read_time.seconds, event.read_time.nanos)
                                 else datetime.now(UTC))
                    anomaly = booking.Anomaly(work_center_id, event.tag_id, event.cursor, booking.UNTAKEABLE, None,
                                              convert.value_text(event.value),
                                              f"the event could not be applied ({problem}); passed", read_time)
                    await events.apply(conn, booking.Effects(anomalies=[anomaly]))
            await events.save_cursor(conn, event.cursor)
        log.error("tag event could not be applied and was passed (%s): %s",
                  "recorded as an UNTAKEABLE anomaly" if recorded else "its tenant is not a tenant code", problem,
                  extra={"cursor": event.cursor, "tag_id": event.tag_id, "plc_id": event.plc_id,
                         "work_center_id": work_center_id, "tenant": event.tenant})
        return ApplyResult(cursor=event.cursor, applied=1, anomalies=1 if recorded else 0)

    async def _apply(self, conn: asyncpg.Connection, messages: Sequence[tag_event_pb2.TagEvent],
                     unnamed: str) -> ApplyResult:
        """One transaction: the cursor row locked, each tenant's fresh events planned and applied under that
        tenant (in tenant order, so two transactions lock tenants' revision rows in the same order), the cursor
        moved past them all."""
        async with conn.transaction():
            stored = await events.cursor(conn, for_update=True)
            # Events at or below the stored cursor are applied already: a replay books nothing.
            fresh = sorted((e for e in messages if e.cursor > stored), key=lambda e: e.cursor)
            result = ApplyResult(cursor=stored)
            if not fresh:
                return result
            result.cursor = fresh[-1].cursor
            result.applied = len(fresh)
            done = []
            for tenant, group in _by_tenant(fresh, unnamed):
                with tenancy.scope(tenant):
                    await events.set_tenant(conn, tenant)
                    planned = [convert.event(e) for e in group]
                    bindings = await events.load_bindings(conn, (e.tag_id for e in planned))
                    state = await events.load_state(conn, bindings, ((e.tag_id, e.read_time) for e in planned))
                    effects = booking.plan(planned, state)
                    await events.apply(conn, effects)
                done.append(effects)
            await events.save_cursor(conn, result.cursor)
        for effects in done:
            self._report(effects, result)
        return result

    @staticmethod
    def _report(effects: booking.Effects, result: ApplyResult) -> None:
        result.booked_good += effects.booked_good
        result.booked_scrap += effects.booked_scrap
        result.anomalies += len(effects.anomalies)
        result.completed_orders += list(effects.completed_orders)
        for a in effects.anomalies:
            log.warning("tag event not booked: %s", a.note, extra={
                "work_center_id": a.work_center_id, "tag_id": a.tag_id, "cursor": a.cursor, "kind": a.kind})
        totals = {o.id: o for o in effects.orders}
        for order_id in effects.completed_orders:
            o = totals[order_id]
            log.info("order completed: planned quantity reached", extra={
                "order_id": o.id, "number": o.number, "good": o.good, "planned": o.planned})


def _by_tenant(messages: Sequence[tag_event_pb2.TagEvent],
               unnamed: str) -> list[tuple[str, list[tag_event_pb2.TagEvent]]]:
    """The events of each tenant (`unnamed` for an event that names none: ``default`` from an ingest from before
    tenants, or the one tenant a consumer of one tenant's events reads), in cursor order, tenants in name order.
    ValueError for a tenant that is not a tenant code (an untakeable event)."""
    groups: dict[str, list[tag_event_pb2.TagEvent]] = {}
    for e in messages:
        tenant = e.tenant or unnamed
        if not tenancy.is_code(tenant):
            raise ValueError(f"tag event {e.cursor} names {e.tenant!r}, not a tenant code")
        groups.setdefault(tenant, []).append(e)
    return sorted(groups.items())
