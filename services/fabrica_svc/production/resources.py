"""Rules on the contract's messages that protovalidate cannot express, output-only fields, and update masks.

Plain Python over the production messages: no gRPC, no SQL. Rules on single fields live in the protos and
are checked by the interceptor (and, for a resource merged from an update mask, by ``check`` here); the
rules below relate fields to each other or fill gaps where a message used inside a request carries no
rules of its own (``Booking``, ``Defect``, ``Downtime`` have none in the proto). Everything is reported as
field violations with a path such as ``work_center.scrap_counter_tag_id``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fabrica.common.v1 import reading_pb2
from fabrica.production.v1 import master_data_pb2, order_pb2
from google.protobuf import message

from ..runtime.errors import FieldViolation, InvalidArgument
from ..runtime.validation import violations_of

#: Largest tag id and jump limit we store. Tag ids come from the config service's bigint sequence, so a
#: larger one cannot name a real tag; a jump limit beyond it means "no limit" and is refused rather than
#: silently clamped.
MAX_INT64 = 2**63 - 1
#: Largest quantity a single booking or defect may carry (the proto's bound on a planned quantity).
MAX_QUANTITY = 100_000_000
MAX_NOTE = 1000
#: Longest id of a resource another one refers to (the protos' bound on ids).
MAX_ID = 63

#: The binding fields of a work centre and the tag role each one needs (config's role is the truth).
TAG_FIELDS = {
    "production_counter_tag_id": reading_pb2.TAG_ROLE_PRODUCTION_COUNTER,
    "scrap_counter_tag_id": reading_pb2.TAG_ROLE_SCRAP_COUNTER,
    "machine_state_tag_id": reading_pb2.TAG_ROLE_MACHINE_STATE,
}


@dataclass(frozen=True)
class Kind:
    """One master-data resource: its message, the request field that carries it, and what may be updated."""

    name: str  # for people: "work centre"
    field: str  # request field and violation prefix: "work_center"
    collection: str  # for precondition subjects: "workCenters"
    message: type[message.Message]
    updatable: tuple[str, ...]


SECTOR = Kind("sector", "sector", "sectors", master_data_pb2.Sector, ("display_name",))
WORK_CENTER = Kind(
    "work centre", "work_center", "workCenters", master_data_pb2.WorkCenter,
    ("display_name", "sector_id", "plc_id", "production_counter_tag_id", "scrap_counter_tag_id",
     "machine_state_tag_id", "counter_width", "max_counter_jump"),
)
ITEM = Kind("item", "item", "items", master_data_pb2.Item, ("display_name", "ideal_cycle_time", "reference_type_id"))
DEFECT_CODE = Kind("defect code", "defect_code", "defectCodes", master_data_pb2.DefectCode,
                   ("display_name", "severity"))
DOWNTIME_REASON = Kind("downtime reason", "downtime_reason", "downtimeReasons", master_data_pb2.DowntimeReason,
                       ("display_name", "color", "counts_against_availability"))
REFERENCE_TYPE = Kind("reference type", "reference_type", "referenceTypes", master_data_pb2.ReferenceType,
                      ("display_name", "description"))
KINDS = (SECTOR, WORK_CENTER, ITEM, DEFECT_CODE, DOWNTIME_REASON, REFERENCE_TYPE)

_OUTPUT_ONLY = ("etag", "create_time", "update_time")


def without_output_only(msg: message.Message) -> message.Message:
    """A copy without the fields the service sets (etag and times)."""
    out = type(msg)()
    out.CopyFrom(msg)
    for name in _OUTPUT_ONLY:
        if name in out.DESCRIPTOR.fields_by_name:
            out.ClearField(name)
    return out


def tag_bindings(wc: master_data_pb2.WorkCenter) -> dict[int, int]:
    """``{tag_id: TagRole}`` of the tags a work centre binds (0 = not bound)."""
    return {getattr(wc, f): role for f, role in TAG_FIELDS.items() if getattr(wc, f)}


def work_center_violations(wc: master_data_pb2.WorkCenter, prefix: str = "work_center") -> list[FieldViolation]:
    out: list[FieldViolation] = []
    seen: dict[int, str] = {}
    for name in TAG_FIELDS:
        tag_id = getattr(wc, name)
        if tag_id > MAX_INT64:
            out.append(FieldViolation(f"{prefix}.{name}", "not a tag id the config service can assign (above 2**63-1)"))
        elif tag_id and tag_id in seen:
            out.append(FieldViolation(f"{prefix}.{name}", f"tag {tag_id} is already bound as {seen[tag_id]}; "
                                                           "a tag has one role"))
        seen.setdefault(tag_id, name)
    if wc.max_counter_jump > MAX_INT64:
        out.append(FieldViolation(f"{prefix}.max_counter_jump", "must be at most 2**63-1"))
    if any(getattr(wc, f) for f in TAG_FIELDS) and not wc.plc_id:
        out.append(FieldViolation(f"{prefix}.plc_id", "required when counter or state tags are bound"))
    return out


def check_resource(kind: Kind, msg: message.Message) -> None:
    """The proto's rules, then the cross-field rules, on a whole resource (a create, or a merged update)."""
    found = violations_of(msg, kind.field)
    if kind is WORK_CENTER:
        found += work_center_violations(msg)  # type: ignore[arg-type]
    if found:
        raise InvalidArgument(found)


def mask_paths(kind: Kind, paths: Iterable[str]) -> list[str]:
    """The fields an update_mask names; empty or "*" names every updatable field. Unknown ones are refused."""
    paths = list(paths)
    if not paths or paths == ["*"]:
        return list(kind.updatable)
    bad = [
        FieldViolation(f"update_mask.paths[{i}]", f"{p!r} cannot be updated; updatable: {', '.join(kind.updatable)}")
        for i, p in enumerate(paths) if p not in kind.updatable
    ]
    if bad:
        raise InvalidArgument(bad)
    return paths


def apply_update_mask(kind: Kind, current: message.Message, patch: message.Message,
                      paths: Iterable[str]) -> message.Message:
    """`current` with the fields named in `paths` taken from `patch`. Empty paths or "*" take them all."""
    paths = mask_paths(kind, paths)
    merged = type(current)()
    merged.CopyFrom(current)
    for path in paths:
        field = merged.DESCRIPTOR.fields_by_name[path]
        if field.message_type is not None:
            if patch.HasField(path):
                getattr(merged, path).CopyFrom(getattr(patch, path))
            else:
                merged.ClearField(path)  # check() then reports it if it is required
        else:
            setattr(merged, path, getattr(patch, path))
    return merged


def _id(value: str, path: str, *, required: bool = True) -> list[FieldViolation]:
    """An id field: present (if `required`) and at most MAX_ID characters."""
    if not value:
        return [FieldViolation(path, "required")] if required else []
    return [FieldViolation(path, f"at most {MAX_ID} characters")] if len(value) > MAX_ID else []


def _note(note: str, path: str) -> list[FieldViolation]:
    return [FieldViolation(path, f"at most {MAX_NOTE} characters")] if len(note) > MAX_NOTE else []


def booking_violations(b: order_pb2.Booking) -> list[FieldViolation]:
    """A manual booking: an order, a non-zero quantity within bounds, scrap never negative."""
    out = _id(b.order_id, "booking.order_id")
    if abs(b.good_quantity) > MAX_QUANTITY:
        out.append(FieldViolation("booking.good_quantity", f"must be within ±{MAX_QUANTITY:,}"))
    if b.scrap_quantity < 0:
        out.append(FieldViolation("booking.scrap_quantity", "must not be negative (only good parts are corrected "
                                                            "with a negative booking)"))
    elif b.scrap_quantity > MAX_QUANTITY:
        out.append(FieldViolation("booking.scrap_quantity", f"must be at most {MAX_QUANTITY:,}"))
    if b.good_quantity == 0 and b.scrap_quantity == 0:
        out.append(FieldViolation("booking.good_quantity", "a booking needs a good or a scrap quantity"))
    if b.source not in (order_pb2.BOOKING_SOURCE_UNSPECIFIED, order_pb2.BOOKING_SOURCE_MANUAL):
        out.append(FieldViolation("booking.source", "only MANUAL bookings can be created; counter bookings come "
                                                    "from the PLC"))
    return out + _note(b.note, "booking.note")


def defect_violations(d: order_pb2.Defect) -> list[FieldViolation]:
    out = _id(d.order_id, "defect.order_id") + _id(d.defect_code_id, "defect.defect_code_id")
    if not 1 <= d.quantity <= MAX_QUANTITY:
        out.append(FieldViolation("defect.quantity", f"must be 1 to {MAX_QUANTITY:,}"))
    return out + _note(d.note, "defect.note")


def downtime_violations(d: order_pb2.Downtime) -> list[FieldViolation]:
    """A stop entered by hand: a work centre, a start, and an end after the start if there is one."""
    out = _id(d.work_center_id, "downtime.work_center_id")
    if not d.HasField("start_time"):
        out.append(FieldViolation("downtime.start_time", "required"))
    elif d.HasField("end_time") and d.end_time.ToNanoseconds() <= d.start_time.ToNanoseconds():
        out.append(FieldViolation("downtime.end_time", "must be after start_time"))
    out += _id(d.reason_id, "downtime.reason_id", required=False)
    return out + _note(d.note, "downtime.note")


def check(found: list[FieldViolation]) -> None:
    if found:
        raise InvalidArgument(found)
