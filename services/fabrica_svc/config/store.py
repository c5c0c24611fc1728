"""All SQL of the config service (schema ``config``).

A PLC is stored as its serialized ``fabrica.config.v1.Plc`` (the contract is the schema; new fields need
no migration) next to the columns we query by. Every change takes the next global revision from a
one-row counter whose row lock is held to commit, so revisions commit in order: a watcher that has read
every change up to R can never later see one below R appear. Each change is also written to a change
log (kept for RETAINED_CHANGES revisions) and announced with NOTIFY in the same transaction, so a
watcher on any replica learns of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from fabrica.config.v1 import collector_status_pb2, plc_pb2

from ..runtime.db import Migration
from ..runtime import audit
from ..runtime.errors import Aborted, AlreadyExists, NotFound
from ..runtime.pages import etag_of

CHANNEL = "fabrica_config_changes"
RETAINED_CHANGES = 10_000

MIGRATIONS = [
    Migration(
        1,
        "plcs, tag ids, revisions, change log, collectors",
        """
        CREATE TABLE revision (
            only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            value bigint NOT NULL
        );
        INSERT INTO revision VALUES (true, 0);

        CREATE TABLE plcs (
            id text PRIMARY KEY,
            collector_id text NOT NULL,
            definition bytea NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );
        CREATE INDEX plcs_collector ON plcs (collector_id, id);

        -- A tag keeps its numeric id for as long as its PLC has a tag of that name, across updates,
        -- so history stays attached to it. Ids are never reused for another name.
        CREATE SEQUENCE tag_id_seq;
        CREATE TABLE tag_ids (
            plc_id text NOT NULL,
            name text NOT NULL,
            id bigint NOT NULL UNIQUE DEFAULT nextval('tag_id_seq'),
            PRIMARY KEY (plc_id, name)
        );

        CREATE TABLE changes (
            revision bigint PRIMARY KEY,
            plc_id text NOT NULL,
            old_collector_id text,
            new_collector_id text,
            definition bytea,
            commit_time timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE create_requests (
            request_id text PRIMARY KEY,
            plc_id text NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE collectors (
            id text PRIMARY KEY,
            applied_revision bigint NOT NULL,
            statuses bytea NOT NULL,
            report_time timestamptz NOT NULL
        );
        """,
    ),
    audit.migration(2),
]


@dataclass(frozen=True)
class Change:
    revision: int
    plc_id: str
    old_collector_id: str | None
    new_collector_id: str | None
    plc: plc_pb2.Plc | None


def _plc(row: asyncpg.Record) -> plc_pb2.Plc:
    plc = plc_pb2.Plc.FromString(row["definition"])
    plc.revision = row["revision"]
    plc.etag = etag_of(row["revision"])
    plc.create_time.FromDatetime(row["create_time"])
    plc.update_time.FromDatetime(row["update_time"])
    return plc


def _plc_changes(old: plc_pb2.Plc, new: plc_pb2.Plc) -> str:
    """What an update changed, for the audit trail: the top-level fields that differ, and the tags added,
    removed or changed by name."""
    skip = {"etag", "create_time", "update_time", "tags"}
    fields = sorted(f.name for f in plc_pb2.Plc.DESCRIPTOR.fields
                    if f.name not in skip and getattr(old, f.name) != getattr(new, f.name))
    before = {t.name: t for t in old.tags}
    after = {t.name: t for t in new.tags}
    parts = [f"fields {', '.join(fields)}"] if fields else []
    for what, names in (("tags added", sorted(after.keys() - before.keys())),
                        ("tags removed", sorted(before.keys() - after.keys())),
                        ("tags changed", sorted(n for n in before.keys() & after.keys() if before[n] != after[n]))):
        if names:
            parts.append(f"{what} {', '.join(names[:20])}{' …' if len(names) > 20 else ''}")
    return "; ".join(parts) or "no change"


class ConfigStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def _next_revision(self, conn: asyncpg.Connection) -> int:
        # The row lock is held until commit: writers queue here, so revisions commit in order.
        return await conn.fetchval("UPDATE revision SET value = value + 1 RETURNING value")

    async def _assign_tag_ids(self, conn: asyncpg.Connection, plc: plc_pb2.Plc) -> None:
        names = [t.name for t in plc.tags]
        if not names:
            return
        await conn.execute(
            "INSERT INTO tag_ids (plc_id, name) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING", plc.id, names
        )
        rows = await conn.fetch("SELECT name, id FROM tag_ids WHERE plc_id = $1 AND name = ANY($2::text[])", plc.id, names)
        ids = {r["name"]: r["id"] for r in rows}
        for tag in plc.tags:
            tag.id = ids[tag.name]

    async def _log_change(self, conn: asyncpg.Connection, revision: int, plc_id: str, old: str | None,
                          new: str | None, definition: bytes | None) -> None:
        await conn.execute(
            "INSERT INTO changes (revision, plc_id, old_collector_id, new_collector_id, definition)"
            " VALUES ($1, $2, $3, $4, $5)",
            revision, plc_id, old, new, definition,
        )
        await conn.execute("DELETE FROM changes WHERE revision <= $1", revision - RETAINED_CHANGES)
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(revision))

    async def create(self, plc: plc_pb2.Plc, request_id: str = "") -> plc_pb2.Plc:
        async with self.pool.acquire() as conn, conn.transaction():
            revision = await self._next_revision(conn)
            if request_id:
                earlier = await conn.fetchval("SELECT plc_id FROM create_requests WHERE request_id = $1", request_id)
                if earlier is not None:
                    # A retry of a create that succeeded: answer what it created. (The revision taken above is
                    # skipped; watchers only ever see revisions that carry a change, so a gap is harmless.)
                    row = await conn.fetchrow("SELECT * FROM plcs WHERE id = $1", earlier)
                    if row is None:
                        raise NotFound(f"the PLC created by request {request_id} ({earlier}) has been deleted since")
                    return _plc(row)
            await self._assign_tag_ids(conn, plc)
            definition = plc.SerializeToString(deterministic=True)
            row = await conn.fetchrow(
                "INSERT INTO plcs (id, collector_id, definition, revision, create_time, update_time)"
                " VALUES ($1, $2, $3, $4, now(), now()) ON CONFLICT (id) DO NOTHING RETURNING *",
                plc.id, plc.collector_id, definition, revision,
            )
            if row is None:
                raise AlreadyExists(f"a PLC with id {plc.id!r} exists", metadata={"plc_id": plc.id})
            if request_id:
                await conn.execute("INSERT INTO create_requests (request_id, plc_id) VALUES ($1, $2)", request_id, plc.id)
            await self._log_change(conn, revision, plc.id, None, plc.collector_id, definition)
            await audit.record(conn, f"plcs/{plc.id}", f"created for collector {plc.collector_id!r} with "
                               f"{len(plc.tags)} tags, revision {revision}")
            return _plc(row)

    async def get(self, plc_id: str) -> plc_pb2.Plc:
        row = await self.pool.fetchrow("SELECT * FROM plcs WHERE id = $1", plc_id)
        if row is None:
            raise NotFound(f"no PLC with id {plc_id!r}", metadata={"plc_id": plc_id})
        return _plc(row)

    async def list(self, collector_id: str, page_size: int, after_id: str) -> tuple[list[plc_pb2.Plc], bool]:
        rows = await self.pool.fetch(
            "SELECT * FROM plcs WHERE ($1 = '' OR collector_id = $1) AND id > $2 ORDER BY id LIMIT $3",
            collector_id, after_id, page_size + 1,
        )
        return [_plc(r) for r in rows[:page_size]], len(rows) > page_size

    async def update(self, plc_id: str, etag: str, merge) -> plc_pb2.Plc:  # noqa: ANN001 - merge: Plc -> Plc
        """Lock the PLC, check the etag, apply `await merge(current) -> new`, store it."""
        async with self.pool.acquire() as conn, conn.transaction():
            revision = await self._next_revision(conn)
            row = await conn.fetchrow("SELECT * FROM plcs WHERE id = $1 FOR UPDATE", plc_id)
            if row is None:
                raise NotFound(f"no PLC with id {plc_id!r}", metadata={"plc_id": plc_id})
            current = _plc(row)
            if etag and etag != current.etag:
                raise Aborted(f"PLC {plc_id!r} changed since it was read (etag {etag}, now {current.etag}); "
                              "read it again and retry", reason="ETAG_MISMATCH",
                              metadata={"plc_id": plc_id, "etag": current.etag})
            new = await merge(current)
            await self._assign_tag_ids(conn, new)
            definition = new.SerializeToString(deterministic=True)
            row = await conn.fetchrow(
                "UPDATE plcs SET collector_id = $2, definition = $3, revision = $4, update_time = now()"
                " WHERE id = $1 RETURNING *",
                plc_id, new.collector_id, definition, revision,
            )
            await self._log_change(conn, revision, plc_id, current.collector_id, new.collector_id, definition)
            await audit.record(conn, f"plcs/{plc_id}", _plc_changes(current, new) + f", revision {revision}")
            return _plc(row)

    async def delete(self, plc_id: str, etag: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            revision = await self._next_revision(conn)
            row = await conn.fetchrow("SELECT collector_id, revision FROM plcs WHERE id = $1 FOR UPDATE", plc_id)
            if row is None:
                raise NotFound(f"no PLC with id {plc_id!r}", metadata={"plc_id": plc_id})
            if etag and etag != etag_of(row["revision"]):
                raise Aborted(f"PLC {plc_id!r} changed since it was read; read it again and retry",
                              reason="ETAG_MISMATCH", metadata={"plc_id": plc_id, "etag": etag_of(row["revision"])})
            await conn.execute("DELETE FROM plcs WHERE id = $1", plc_id)
            await self._log_change(conn, revision, plc_id, row["collector_id"], None, None)
            await audit.record(conn, f"plcs/{plc_id}", f"deleted (collector {row['collector_id']!r}), revision {revision}")

    async def snapshot(self, collector_id: str) -> tuple[int, list[plc_pb2.Plc]]:
        """The collector's PLCs and the revision they are current at, read consistently."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            revision = await conn.fetchval("SELECT value FROM revision")
            rows = await conn.fetch("SELECT * FROM plcs WHERE collector_id = $1 ORDER BY id", collector_id)
            return revision, [_plc(r) for r in rows]

    async def changes_after(self, revision: int, limit: int = 500) -> tuple[list[Change], int, int]:
        """Changes after `revision` (oldest first), the oldest retained revision, and the current one."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            current = await conn.fetchval("SELECT value FROM revision")
            oldest = await conn.fetchval("SELECT coalesce(min(revision), $1 + 1) FROM changes", current)
            rows = await conn.fetch(
                "SELECT c.*, p.create_time, p.update_time FROM changes c LEFT JOIN plcs p"
                " ON p.id = c.plc_id AND p.revision = c.revision"
                " WHERE c.revision > $1 ORDER BY c.revision LIMIT $2",
                revision, limit,
            )
        out = []
        for r in rows:
            plc = None
            if r["definition"] is not None:
                plc = plc_pb2.Plc.FromString(r["definition"])
                plc.revision = r["revision"]
                plc.etag = etag_of(r["revision"])
                if r["update_time"] is not None:
                    plc.create_time.FromDatetime(r["create_time"])
                    plc.update_time.FromDatetime(r["update_time"])
            out.append(Change(r["revision"], r["plc_id"], r["old_collector_id"], r["new_collector_id"], plc))
        return out, oldest, current

    async def report(self, collector_id: str, applied_revision: int,
                     statuses: Sequence[collector_status_pb2.PlcStatus]) -> int:
        blob = collector_status_pb2.Collector(plc_statuses=statuses).SerializeToString(deterministic=True)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO collectors (id, applied_revision, statuses, report_time) VALUES ($1, $2, $3, now())"
                " ON CONFLICT (id) DO UPDATE SET applied_revision = excluded.applied_revision,"
                " statuses = excluded.statuses, report_time = excluded.report_time",
                collector_id, applied_revision, blob,
            )
            return await conn.fetchval("SELECT value FROM revision")

    async def collectors(self) -> list[collector_status_pb2.Collector]:
        out = []
        for r in await self.pool.fetch("SELECT * FROM collectors ORDER BY id"):
            c = collector_status_pb2.Collector.FromString(r["statuses"])
            c.id = r["id"]
            c.applied_revision = r["applied_revision"]
            c.report_time.FromDatetime(r["report_time"])
            out.append(c)
        return out
