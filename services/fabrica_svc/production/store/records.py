"""The rows the store reads and writes, as plain dataclasses (no asyncpg records, no protobuf messages)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

T = TypeVar("T")


def from_row(cls: type[T], row: Any) -> T:  # noqa: ANN401 - an asyncpg Record
    """A record of `cls` from the row's columns of the same names."""
    return cls(**{f.name: row[f.name] for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Sector:
    id: str
    display_name: str
    revision: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class WorkCenter:
    id: str
    display_name: str
    sector_id: str
    plc_id: str
    production_counter_tag_id: int
    scrap_counter_tag_id: int
    machine_state_tag_id: int
    counter_width: int
    max_counter_jump: int
    revision: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class Item:
    id: str
    display_name: str
    ideal_cycle_nanos: int
    #: The reference type it is grouped under; '' when none (NULL in the table).
    reference_type_id: str = ""
    revision: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class DefectCode:
    id: str
    display_name: str
    severity: int
    revision: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class DowntimeReason:
    id: str
    display_name: str
    color: str
    counts_against_availability: bool
    revision: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass(frozen=True)
class ReferenceType:
    id: str
    display_name: str
    description: str
    revision: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None


MasterRecord = Sector | WorkCenter | Item | DefectCode | DowntimeReason | ReferenceType


@dataclass(frozen=True)
class Order:
    id: int
    number: str
    item_id: str
    work_center_id: str
    planned_quantity: int
    state: int
    good_quantity: int
    scrap_quantity: int
    start_time: datetime | None
    end_time: datetime | None
    cancel_reason: str
    revision: int
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class Booking:
    id: int
    order_id: int
    good_quantity: int
    scrap_quantity: int
    source: int
    book_time: datetime
    note: str


@dataclass(frozen=True)
class Defect:
    id: int
    order_id: int
    defect_code_id: str
    quantity: int
    note: str
    create_time: datetime


@dataclass(frozen=True)
class Downtime:
    id: int
    work_center_id: str
    order_id: int | None
    start_time: datetime
    end_time: datetime | None
    reason_id: str | None
    note: str
    automatic: bool


@dataclass(frozen=True)
class OrderCycle:
    """An order's window and quantities with its item's ideal cycle time, for OEE."""

    work_center_id: str
    start_time: datetime | None
    end_time: datetime | None
    good_quantity: int
    scrap_quantity: int
    ideal_cycle_nanos: int


@dataclass(frozen=True)
class OeeInputs:
    """What OEE is computed from: the window, the stops that count, and (cycle time, good, scrap) per item."""

    start: datetime
    end: datetime
    now: datetime
    downtimes: list[tuple[datetime, datetime | None]]
    counts: list[tuple[float, int, int]]
