"""Master data (sectors, work centres, items, defect codes, downtime reasons): plain rows, one table each.

Each write takes the next value of one sequence (``master_revision``) as the row's revision; the etag is
made from it. A work centre's bound tags are also rows of ``tag_bindings`` (primary key: the tenant and the
tag), so a tag is bound once in a tenant, in one role, and the event consumer finds its work centre with one
lookup. Every row belongs to a tenant (schema.py); row-level security keeps each statement to the tenant of
the connection, so no query here names it, and ids are unique per tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import asyncpg

from ...runtime.errors import AlreadyExists, FailedPrecondition, NotFound, PreconditionViolation
from ..resources import DEFECT_CODE, DOWNTIME_REASON, ITEM, REFERENCE_TYPE, SECTOR, WORK_CENTER, Kind
from . import records
from .common import precondition
from .records import MasterRecord


@dataclass(frozen=True)
class _Table:
    table: str
    record: type


_TABLES: dict[str, _Table] = {
    SECTOR.field: _Table("sectors", records.Sector),
    WORK_CENTER.field: _Table("work_centers", records.WorkCenter),
    ITEM.field: _Table("items", records.Item),
    DEFECT_CODE.field: _Table("defect_codes", records.DefectCode),
    DOWNTIME_REASON.field: _Table("downtime_reasons", records.DowntimeReason),
    REFERENCE_TYPE.field: _Table("reference_types", records.ReferenceType),
}
#: Columns that hold NULL for "none" (a foreign key), '' in the records.
_NULL_WHEN_EMPTY = frozenset({"reference_type_id"})
_SERVICE_SET = ("id", "revision", "create_time", "update_time")

#: What a foreign key from each table means when it blocks a delete.
_USED_BY = {
    "work_centers": "work centres", "orders": "orders", "downtimes": "downtime records", "defects": "defect records",
    "items": "items",
}


def table_of(kind: Kind) -> str:
    return _TABLES[kind.field].table


def _columns(kind: Kind) -> tuple[str, ...]:
    return tuple(f.name for f in fields(_TABLES[kind.field].record) if f.name not in _SERVICE_SET)


def _values(kind: Kind, record: MasterRecord) -> tuple[object, ...]:
    return tuple((getattr(record, c) or None) if c in _NULL_WHEN_EMPTY else getattr(record, c) for c in _columns(kind))


def _record(kind: Kind, row: asyncpg.Record) -> MasterRecord:
    cls = _TABLES[kind.field].record
    return cls(**{f.name: (row[f.name] or "") if f.name in _NULL_WHEN_EMPTY else row[f.name] for f in fields(cls)})


def _not_found(kind: Kind, resource_id: str) -> NotFound:
    return NotFound(f"no {kind.name} with id {resource_id!r}", metadata={f"{kind.field}_id": resource_id})


async def insert(conn: asyncpg.Connection, kind: Kind, record: MasterRecord) -> MasterRecord:
    """Insert a new row; ALREADY_EXISTS if the id is taken."""
    cols = _columns(kind)
    params = ", ".join(f"${i}" for i in range(2, len(cols) + 2))
    row = await conn.fetchrow(
        f"INSERT INTO {table_of(kind)} (id, {', '.join(cols)}, revision, create_time, update_time)"
        f" VALUES ($1, {params}, nextval('master_revision'), now(), now())"
        " ON CONFLICT (tenant_id, id) DO NOTHING RETURNING *",
        record.id, *_values(kind, record))
    if row is None:
        raise AlreadyExists(f"a {kind.name} with id {record.id!r} exists", metadata={f"{kind.field}_id": record.id})
    return _record(kind, row)


async def get(conn: asyncpg.Connection | asyncpg.Pool, kind: Kind, resource_id: str, *,
              for_update: bool = False) -> MasterRecord:
    """The row; NOT_FOUND if there is none. `for_update` locks it (FOR NO KEY UPDATE)."""
    lock = " FOR NO KEY UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT * FROM {table_of(kind)} WHERE id = $1{lock}", resource_id)
    if row is None:
        raise _not_found(kind, resource_id)
    return _record(kind, row)


async def list_page(conn: asyncpg.Connection | asyncpg.Pool, kind: Kind, page_size: int, after_id: str,
                    parent_id: str = "") -> tuple[list[MasterRecord], bool]:
    """Rows by id after `after_id`, and whether there are more; work centres of the sector `parent_id`, items of
    the reference type `parent_id`, when it is set."""
    if kind is WORK_CENTER:
        rows = await conn.fetch(
            "SELECT * FROM work_centers WHERE ($1 = '' OR sector_id = $1) AND id > $2 ORDER BY id LIMIT $3",
            parent_id, after_id, page_size + 1)
    elif kind is ITEM:
        rows = await conn.fetch(
            "SELECT * FROM items WHERE ($1 = '' OR reference_type_id = $1) AND id > $2 ORDER BY id LIMIT $3",
            parent_id, after_id, page_size + 1)
    else:
        rows = await conn.fetch(f"SELECT * FROM {table_of(kind)} WHERE id > $1 ORDER BY id LIMIT $2",
                                after_id, page_size + 1)
    return [_record(kind, r) for r in rows[:page_size]], len(rows) > page_size


async def update(conn: asyncpg.Connection, kind: Kind, record: MasterRecord) -> MasterRecord:
    """Store the row's new values with a new revision (the row is locked by get(for_update=True))."""
    cols = _columns(kind)
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(cols, start=2))
    row = await conn.fetchrow(
        f"UPDATE {table_of(kind)} SET {sets}, revision = nextval('master_revision'), update_time = now()"
        " WHERE id = $1 RETURNING *", record.id, *_values(kind, record))
    return _record(kind, row)


async def revision_for_delete(conn: asyncpg.Connection, kind: Kind, resource_id: str) -> int:
    """Lock the row for deletion and return its revision; NOT_FOUND if there is none."""
    revision = await conn.fetchval(f"SELECT revision FROM {table_of(kind)} WHERE id = $1 FOR UPDATE", resource_id)
    if revision is None:
        raise _not_found(kind, resource_id)
    return revision


async def delete(conn: asyncpg.Connection, kind: Kind, resource_id: str) -> None:
    """Delete the row; FAILED_PRECONDITION (IN_USE) if other rows still refer to it."""
    try:
        await conn.execute(f"DELETE FROM {table_of(kind)} WHERE id = $1", resource_id)
    except asyncpg.ForeignKeyViolationError as exc:
        used_by = _USED_BY.get(exc.table_name or "", exc.table_name or "other records")
        raise precondition("IN_USE", f"{kind.collection}/{resource_id}",
                           f"{kind.name} {resource_id!r} is still used by {used_by}", "IN_USE",
                           **{f"{kind.field}_id": resource_id}) from None


async def bind_tags(conn: asyncpg.Connection, work_center_id: str, bindings: dict[int, int]) -> None:
    """Replace the work centre's tag bindings ({tag: role}); FAILED_PRECONDITION if another work centre has
    one of the tags."""
    if bindings:
        taken = await conn.fetch(
            "SELECT tag_id, work_center_id FROM tag_bindings WHERE tag_id = ANY($1::bigint[])"
            " AND work_center_id <> $2 ORDER BY tag_id", list(bindings), work_center_id)
        if taken:
            violations = [PreconditionViolation(
                type="TAG_BINDING", subject=f"tags/{r['tag_id']}",
                description=f"tag {r['tag_id']} is bound to work centre {r['work_center_id']!r}") for r in taken]
            raise FailedPrecondition("; ".join(v.description for v in violations), violations=violations,
                                     reason="TAG_ALREADY_BOUND", metadata={"work_center_id": work_center_id})
    await conn.execute("DELETE FROM tag_bindings WHERE work_center_id = $1", work_center_id)
    try:
        await conn.executemany("INSERT INTO tag_bindings (tag_id, work_center_id, role) VALUES ($1, $2, $3)",
                               [(tag, work_center_id, role) for tag, role in bindings.items()])
    except asyncpg.UniqueViolationError:  # another work centre bound it since we looked
        raise precondition("TAG_BINDING", f"workCenters/{work_center_id}", "a tag of this work centre was just "
                           "bound to another one; read and retry", "TAG_ALREADY_BOUND") from None


async def forget_baselines(conn: asyncpg.Connection, work_center_id: str, *, keep_counter_tags: list[int] | None,
                           machine_state: bool) -> None:
    """Drop counter baselines (all of them when `keep_counter_tags` is None, else those of other tags) and,
    with `machine_state`, the machine state of a work centre."""
    if keep_counter_tags is None:
        await conn.execute("DELETE FROM counter_state WHERE work_center_id = $1", work_center_id)
    else:
        await conn.execute("DELETE FROM counter_state WHERE work_center_id = $1 AND tag_id <> ALL($2::bigint[])",
                           work_center_id, keep_counter_tags)
    if machine_state:
        await conn.execute("DELETE FROM machine_state WHERE work_center_id = $1", work_center_id)
