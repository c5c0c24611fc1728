"""Protobuf messages <-> the production service's records and the booking engine's events.

The servicer translates with these; nothing else in production builds or reads a message field by field.
Etags come from runtime/pages.py, times from runtime/timefmt.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import tag_event_pb2
from fabrica.production.v1 import master_data_pb2, order_pb2
from google.protobuf import message

from ..runtime.pages import etag_of
from ..runtime.timefmt import set_timestamp, to_datetime
from .booking import Event
from .domain import Oee
from .resources import DEFECT_CODE, DOWNTIME_REASON, ITEM, REFERENCE_TYPE, SECTOR, WORK_CENTER, Kind
from .store import records

# --------------------------------------------------------------------------------------------------------------
# Tag events
# --------------------------------------------------------------------------------------------------------------

_NUMBER_KINDS = ("bool_value", "int_value", "uint_value", "double_value")


def value_number(value: reading_pb2.Value) -> int | float | bool | None:
    """The number a reading holds, or None (a string, bytes, or nothing)."""
    kind = value.WhichOneof("kind")
    return getattr(value, kind) if kind in _NUMBER_KINDS else None


def value_text(value: reading_pb2.Value) -> str:
    """A reading's value for people and anomaly records (at most 200 characters)."""
    kind = value.WhichOneof("kind")
    return "(none)" if kind is None else f"{kind}={getattr(value, kind)!r}"[:200]


def event(e: tag_event_pb2.TagEvent) -> Event:
    return Event(cursor=e.cursor, tag_id=e.tag_id, read_time=to_datetime(e.read_time),
                 good_quality=e.quality == reading_pb2.QUALITY_GOOD, value=value_number(e.value),
                 value_text=value_text(e.value))


# --------------------------------------------------------------------------------------------------------------
# Master data
# --------------------------------------------------------------------------------------------------------------


def _common(msg: message.Message, rec: records.MasterRecord) -> message.Message:
    msg.etag = etag_of(rec.revision)  # type: ignore[attr-defined]
    set_timestamp(msg.create_time, rec.create_time)  # type: ignore[attr-defined]
    set_timestamp(msg.update_time, rec.update_time)  # type: ignore[attr-defined]
    return msg


def _item_message(r: records.Item) -> master_data_pb2.Item:
    item = master_data_pb2.Item(id=r.id, display_name=r.display_name, reference_type_id=r.reference_type_id)
    item.ideal_cycle_time.FromNanoseconds(r.ideal_cycle_nanos)
    return item


@dataclass(frozen=True)
class _Mapping:
    to_message: Callable[[records.MasterRecord], message.Message]
    to_record: Callable[[message.Message], records.MasterRecord]


_MASTER: dict[str, _Mapping] = {
    SECTOR.field: _Mapping(
        lambda r: master_data_pb2.Sector(id=r.id, display_name=r.display_name),
        lambda m: records.Sector(id=m.id, display_name=m.display_name)),
    WORK_CENTER.field: _Mapping(
        lambda r: master_data_pb2.WorkCenter(
            id=r.id, display_name=r.display_name, sector_id=r.sector_id, plc_id=r.plc_id,
            production_counter_tag_id=r.production_counter_tag_id, scrap_counter_tag_id=r.scrap_counter_tag_id,
            machine_state_tag_id=r.machine_state_tag_id, counter_width=r.counter_width,
            max_counter_jump=r.max_counter_jump),
        lambda m: records.WorkCenter(
            id=m.id, display_name=m.display_name, sector_id=m.sector_id, plc_id=m.plc_id,
            production_counter_tag_id=m.production_counter_tag_id, scrap_counter_tag_id=m.scrap_counter_tag_id,
            machine_state_tag_id=m.machine_state_tag_id, counter_width=m.counter_width,
            max_counter_jump=m.max_counter_jump)),
    ITEM.field: _Mapping(
        _item_message,
        lambda m: records.Item(id=m.id, display_name=m.display_name,
                               ideal_cycle_nanos=m.ideal_cycle_time.ToNanoseconds(),
                               reference_type_id=m.reference_type_id)),
    REFERENCE_TYPE.field: _Mapping(
        lambda r: master_data_pb2.ReferenceType(id=r.id, display_name=r.display_name, description=r.description),
        lambda m: records.ReferenceType(id=m.id, display_name=m.display_name, description=m.description)),
    DEFECT_CODE.field: _Mapping(
        lambda r: master_data_pb2.DefectCode(id=r.id, display_name=r.display_name, severity=r.severity),
        lambda m: records.DefectCode(id=m.id, display_name=m.display_name, severity=int(m.severity))),
    DOWNTIME_REASON.field: _Mapping(
        lambda r: master_data_pb2.DowntimeReason(id=r.id, display_name=r.display_name, color=r.color,
                                                 counts_against_availability=r.counts_against_availability),
        lambda m: records.DowntimeReason(id=m.id, display_name=m.display_name, color=m.color,
                                         counts_against_availability=m.counts_against_availability)),
}


def master_message(kind: Kind, rec: records.MasterRecord) -> message.Message:
    return _common(_MASTER[kind.field].to_message(rec), rec)


def master_record(kind: Kind, msg: message.Message) -> records.MasterRecord:
    """The stored fields of a resource message (output-only fields are not taken)."""
    return _MASTER[kind.field].to_record(msg)


# --------------------------------------------------------------------------------------------------------------
# Orders, bookings, defects, downtime, OEE
# --------------------------------------------------------------------------------------------------------------


def order_message(r: records.Order) -> order_pb2.Order:
    o = order_pb2.Order(
        id=str(r.id), number=r.number, item_id=r.item_id, work_center_id=r.work_center_id,
        planned_quantity=r.planned_quantity, state=r.state, good_quantity=r.good_quantity,
        scrap_quantity=r.scrap_quantity, etag=etag_of(r.revision),
    )
    set_timestamp(o.start_time, r.start_time)
    set_timestamp(o.end_time, r.end_time)
    set_timestamp(o.create_time, r.create_time)
    set_timestamp(o.update_time, r.update_time)
    return o


def booking_message(r: records.Booking) -> order_pb2.Booking:
    b = order_pb2.Booking(id=str(r.id), order_id=str(r.order_id), good_quantity=r.good_quantity,
                          scrap_quantity=r.scrap_quantity, source=r.source, note=r.note)
    set_timestamp(b.book_time, r.book_time)
    return b


def defect_message(r: records.Defect) -> order_pb2.Defect:
    d = order_pb2.Defect(id=str(r.id), order_id=str(r.order_id), defect_code_id=r.defect_code_id,
                         quantity=r.quantity, note=r.note)
    set_timestamp(d.create_time, r.create_time)
    return d


def downtime_message(r: records.Downtime) -> order_pb2.Downtime:
    d = order_pb2.Downtime(id=str(r.id), work_center_id=r.work_center_id,
                           order_id="" if r.order_id is None else str(r.order_id),
                           reason_id=r.reason_id or "", note=r.note, automatic=r.automatic)
    set_timestamp(d.start_time, r.start_time)
    set_timestamp(d.end_time, r.end_time)
    return d


def oee_message(figures: Oee, inputs: records.OeeInputs) -> order_pb2.Oee:
    oee = order_pb2.Oee(
        availability=figures.availability, performance=figures.performance, quality=figures.quality,
        oee=figures.oee, planned_seconds=figures.planned_time_s, downtime_seconds=figures.downtime_s,
        good_count=figures.good_count, total_count=figures.total_count)
    set_timestamp(oee.start_time, inputs.start)
    set_timestamp(oee.end_time, inputs.end)
    return oee
