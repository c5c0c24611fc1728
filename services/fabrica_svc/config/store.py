"""All SQL of the config service (schema ``config``).

A PLC is stored as its serialized ``fabrica.config.v1.Plc`` (the contract is the schema; new fields need
no migration) next to the columns we query by. Every change takes the next revision of its tenant from
the tenant's row of the counter table ``revision`` (one row per tenant), whose row lock is held to
commit, so a tenant's revisions commit in order: a watcher that has read every change up to R can never
later see one below R appear. Each change is also written to the change log, keyed by (tenant, revision)
and kept for RETAINED_CHANGES revisions per tenant, and announced with NOTIFY (payload
``<tenant>:<revision>``) in the same transaction, so a watcher of that tenant on any replica learns of it.
One tenant's changes never move another's revisions.

Tenants (migration 3). Every table holds the tenant of its rows (``tenant_id``) under row-level security
(runtime/tenancy.py ``isolate_sql``): the pool's connections see and write the rows of the RPC's tenant
only, and a connection taken with no tenant sees nothing. Ids a user chooses (PLC id, collector id, the
create request id) are unique per tenant: the keys are (tenant_id, id). Tag ids stay one global sequence.
The ``tenants`` table is under row-level security too, with a policy of its own (``tenant_self``): a
session of one tenant sees that tenant's row only, an installation-wide session (``*``) all of them; it is
written only in installation-wide sessions (the servicer runs the tenant RPCs of installation-wide admins
in ``tenancy.system()``). Only ``schema_migrations`` has no tenant.

Device profiles (migration 4). A tenant's own profiles are rows of ``device_profiles`` (the serialized
``DeviceProfile``, keyed by (tenant_id, id), under the same row-level security); the built-in ones are
code (profiles.py), the same for every tenant, and never stored. A create's optional request id is kept on
its row (unique per tenant), so a retried create answers the first one's profile.

Quotas (the tenant's ``quota``: max_plcs, max_tags, max_collectors; 0 = no limit) are checked in the
transaction of the create or update, after it has taken the tenant's revision row lock: a tenant's
writes queue there, so two concurrent creates cannot both pass a limit that only one of them fits.
A change over a limit that makes the count grow is RESOURCE_EXHAUSTED (QuotaFailure); one that keeps or
lowers the count of a tenant already over a lowered limit passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from fabrica.config.v1 import collector_status_pb2, device_profile_pb2, plc_pb2

from fabrica.config.v1 import tenant_pb2

from ..runtime import audit, tenancy
from ..runtime.db import Migration
from ..runtime.errors import Aborted, AlreadyExists, NotFound, QuotaViolation, ResourceExhausted
from ..runtime.pages import etag_of

CHANNEL = "fabrica_config_changes"
#: Changes kept in the log, per tenant.
RETAINED_CHANGES = 10_000

#: The tenant every installation has, as migration 3 seeds it.
DEFAULT_TENANT = tenant_pb2.Tenant(code=tenancy.DEFAULT, name="Default", active=True)
_TENANT_POLICY = (f"(code = current_setting('{tenancy.SETTING}', true)"
                  f" OR current_setting('{tenancy.SETTING}', true) = '{tenancy.ALL}')")


def _tenants_migration() -> str:
    isolated = "".join(tenancy.isolate_sql("config", t)
                       for t in ("revision", "plcs", "tag_ids", "changes", "create_requests", "collectors"))
    seed = tenant_pb2.Tenant(name=DEFAULT_TENANT.name).SerializeToString(deterministic=True).hex()  # as stored
    return f"""
        -- The migrating user may be the tables' owner, not a superuser: FORCE makes the policies hold it too.
        SELECT set_config('{tenancy.SETTING}', '{tenancy.ALL}', true);
        CREATE TABLE tenants (
            code text PRIMARY KEY CHECK (code ~ '{tenancy.CODE_PATTERN}'),
            definition bytea NOT NULL,
            active boolean NOT NULL,
            version bigint NOT NULL DEFAULT 1,
            create_time timestamptz NOT NULL DEFAULT now(),
            update_time timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO tenants (code, definition, active) VALUES ('{tenancy.DEFAULT}', decode('{seed}', 'hex'), true);
        ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
        ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
        CREATE POLICY tenant_self ON tenants USING {_TENANT_POLICY}
            WITH CHECK (current_setting('{tenancy.SETTING}', true) = '{tenancy.ALL}');
        {isolated}
        {audit.isolation_sql("config")}
        ALTER TABLE revision DROP COLUMN only_row;
        ALTER TABLE revision ADD PRIMARY KEY (tenant_id);
        ALTER TABLE revision ADD FOREIGN KEY (tenant_id) REFERENCES tenants (code);
        ALTER TABLE plcs DROP CONSTRAINT plcs_pkey, ADD PRIMARY KEY (tenant_id, id);
        -- How many tags the definition holds (the max_tags quota); NULL for PLCs from before, counted when needed.
        ALTER TABLE plcs ADD COLUMN tag_count integer;
        DROP INDEX plcs_collector;
        CREATE INDEX plcs_collector ON plcs (tenant_id, collector_id, id);
        ALTER TABLE tag_ids DROP CONSTRAINT tag_ids_pkey, ADD PRIMARY KEY (tenant_id, plc_id, name);
        ALTER TABLE changes DROP CONSTRAINT changes_pkey, ADD PRIMARY KEY (tenant_id, revision);
        ALTER TABLE create_requests DROP CONSTRAINT create_requests_pkey, ADD PRIMARY KEY (tenant_id, request_id);
        ALTER TABLE collectors DROP CONSTRAINT collectors_pkey, ADD PRIMARY KEY (tenant_id, id);
        SELECT set_config('{tenancy.SETTING}', '', true);
    """


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
    Migration(3, "tenants: the tenants table, row-level security on every table, keys and revisions per tenant",
              _tenants_migration()),
    Migration(4, "device profiles of a tenant's own (the built-in ones are code, profiles.py)", f"""
        CREATE TABLE device_profiles (
            id text NOT NULL,
            definition bytea NOT NULL,
            request_id text,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        {tenancy.isolate_sql("config", "device_profiles")}
        ALTER TABLE device_profiles ADD PRIMARY KEY (tenant_id, id);
        ALTER TABLE device_profiles ADD FOREIGN KEY (tenant_id) REFERENCES tenants (code);
        CREATE UNIQUE INDEX device_profiles_request ON device_profiles (tenant_id, request_id)
            WHERE request_id IS NOT NULL;
    """),
]


async def _audit_in(conn: asyncpg.Connection, tenant: str, resource: str, details: str) -> None:
    """An audit entry of `tenant` (a tenant's own trail records what was done to it) written in an
    installation-wide transaction: the session is that tenant's for the rest of the transaction."""
    await conn.execute(f"SELECT set_config('{tenancy.SETTING}', $1, true)", tenant)
    await audit.record(conn, resource, details)


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


def _profile(row: asyncpg.Record) -> device_profile_pb2.DeviceProfile:
    profile = device_profile_pb2.DeviceProfile.FromString(row["definition"])
    profile.id = row["id"]
    return profile


def _tenant(row: asyncpg.Record) -> tenant_pb2.Tenant:
    t = tenant_pb2.Tenant.FromString(row["definition"])
    t.code = row["code"]
    t.active = row["active"]
    t.etag = etag_of(row["version"])
    t.create_time.FromDatetime(row["create_time"])
    t.update_time.FromDatetime(row["update_time"])
    return t


def _stored_tenant(t: tenant_pb2.Tenant) -> bytes:
    copy = tenant_pb2.Tenant()
    copy.CopyFrom(t)
    for name in ("code", "active", "etag", "create_time", "update_time"):
        copy.ClearField(name)
    return copy.SerializeToString(deterministic=True)


def _check_etag(what: str, key: str, ident: str, given: str, current: str) -> None:
    """ABORTED (ETAG_MISMATCH) when an etag was given and is not the resource's `current` one."""
    if given and given != current:
        raise Aborted(f"{what} {ident!r} changed since it was read (etag {given}, now {current}); read it again "
                      "and retry", reason="ETAG_MISMATCH", metadata={key: ident, "etag": current})


class ConfigStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    # --- tenants (the servicer calls these in tenancy.system() for installation-wide callers) ----------

    async def tenant_state(self, code: str) -> bool | None:
        """Whether tenant `code` is active; None when the session cannot see it (no such tenant)."""
        return await self.pool.fetchval("SELECT active FROM tenants WHERE code = $1", code)

    async def create_tenant(self, t: tenant_pb2.Tenant) -> tenant_pb2.Tenant:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO tenants (code, definition, active) VALUES ($1, $2, $3)"
                " ON CONFLICT (code) DO NOTHING RETURNING *",
                t.code, _stored_tenant(t), t.active)
            if row is None:
                raise AlreadyExists(f"a tenant with code {t.code!r} exists", metadata={"tenant": t.code})
            await conn.execute("INSERT INTO revision (tenant_id, value) VALUES ($1, 0)", t.code)
            await _audit_in(conn, t.code, f"tenants/{t.code}", f"created ({'active' if t.active else 'inactive'})")
            return _tenant(row)

    async def get_tenant(self, code: str) -> tenant_pb2.Tenant:
        row = await self.pool.fetchrow("SELECT * FROM tenants WHERE code = $1", code)
        if row is None:
            raise NotFound(f"no tenant with code {code!r}", metadata={"tenant": code})
        return _tenant(row)

    async def list_tenants(self, page_size: int, after: str) -> tuple[list[tenant_pb2.Tenant], bool]:
        rows = await self.pool.fetch("SELECT * FROM tenants WHERE code > $1 ORDER BY code LIMIT $2",
                                     after, page_size + 1)
        return [_tenant(r) for r in rows[:page_size]], len(rows) > page_size

    async def update_tenant(self, code: str, etag: str, merge) -> tenant_pb2.Tenant:  # noqa: ANN001 - Tenant -> Tenant
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM tenants WHERE code = $1 FOR UPDATE", code)
            if row is None:
                raise NotFound(f"no tenant with code {code!r}", metadata={"tenant": code})
            current = _tenant(row)
            _check_etag("tenant", "tenant", code, etag, current.etag)
            new = merge(current)
            row = await conn.fetchrow(
                "UPDATE tenants SET definition = $2, active = $3, version = version + 1, update_time = now()"
                " WHERE code = $1 RETURNING *", code, _stored_tenant(new), new.active)
            changed = sorted(f.name for f in tenant_pb2.Tenant.DESCRIPTOR.fields
                             if f.name not in ("etag", "create_time", "update_time")
                             and getattr(current, f.name) != getattr(new, f.name))
            # The tenant's watchers look again (a suspended tenant's watches end).
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{code}:tenant")
            await _audit_in(conn, code, f"tenants/{code}", f"fields {', '.join(changed)}" if changed else "no change")
            return _tenant(row)

    # --- device profiles of the tenant's own (the servicer keeps the built-in ids out) ----------------

    async def get_profile(self, profile_id: str) -> device_profile_pb2.DeviceProfile | None:
        row = await self.pool.fetchrow("SELECT id, definition FROM device_profiles WHERE id = $1", profile_id)
        return _profile(row) if row is not None else None

    async def list_profiles(self) -> list[device_profile_pb2.DeviceProfile]:
        return [_profile(r) for r in await self.pool.fetch("SELECT id, definition FROM device_profiles ORDER BY id")]

    async def create_profile(self, profile: device_profile_pb2.DeviceProfile,
                             request_id: str = "") -> device_profile_pb2.DeviceProfile:
        """Store a profile of the tenant; ALREADY_EXISTS if the tenant has one with its id. A retry with the
        `request_id` of a create that succeeded answers that create's profile."""
        stored = device_profile_pb2.DeviceProfile()
        stored.CopyFrom(profile)
        stored.ClearField("built_in")
        async with self.pool.acquire() as conn, conn.transaction():
            # No conflict target: a concurrent retry (the request id) is caught here as well as the id.
            row = await conn.fetchrow(
                "INSERT INTO device_profiles (id, definition, request_id) VALUES ($1, $2, NULLIF($3, ''))"
                " ON CONFLICT DO NOTHING RETURNING id, definition",
                stored.id, stored.SerializeToString(deterministic=True), request_id)
            if row is None:
                if request_id:
                    earlier = await conn.fetchrow(
                        "SELECT id, definition FROM device_profiles WHERE request_id = $1", request_id)
                    if earlier is not None:
                        return _profile(earlier)
                raise AlreadyExists(f"a device profile with id {stored.id!r} exists",
                                    metadata={"profile_id": stored.id})
            await audit.record(conn, f"device-profiles/{stored.id}",
                               f"created with {len(stored.tags)} tags in {len(stored.poll_groups)} poll groups")
            return _profile(row)

    async def delete_profile(self, profile_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetchval("DELETE FROM device_profiles WHERE id = $1 RETURNING id", profile_id)
            if deleted is None:
                raise NotFound(f"no device profile {profile_id!r}", metadata={"profile_id": profile_id})
            await audit.record(conn, f"device-profiles/{profile_id}", "deleted")

    # --- quotas ------------------------------------------------------------------------------------

    async def _check_quota(self, conn: asyncpg.Connection, plc: plc_pb2.Plc, old: plc_pb2.Plc | None) -> None:
        """RESOURCE_EXHAUSTED when writing `plc` (replacing `old`; None for a create) takes the tenant past a
        quota. Called after the tenant's revision row is locked, so the tenant's writes are serialized."""
        code = tenancy.require()
        definition = await conn.fetchval("SELECT definition FROM tenants WHERE code = $1", code)
        quota = tenant_pb2.Tenant.FromString(definition).quota if definition is not None else tenant_pb2.TenantQuota()
        if not (quota.max_plcs or quota.max_tags or quota.max_collectors):
            return
        for r in await conn.fetch("SELECT id, definition FROM plcs WHERE tag_count IS NULL"):  # PLCs from before
            await conn.execute("UPDATE plcs SET tag_count = $2 WHERE id = $1", r["id"],
                               len(plc_pb2.Plc.FromString(r["definition"]).tags))
        # The tenant's other PLCs: all of them for a create, all but the one updated for an update.
        others = await conn.fetchrow(
            "SELECT count(*) AS plcs, coalesce(sum(tag_count), 0) AS tags,"
            " coalesce(array_agg(DISTINCT collector_id), '{}') AS collectors FROM plcs WHERE id IS DISTINCT FROM $1",
            old.id if old is not None else None)
        collectors = set(others["collectors"])
        before = (others["plcs"] + (old is not None), others["tags"] + (len(old.tags) if old is not None else 0),
                  len(collectors | ({old.collector_id} if old is not None else set())))
        after = (others["plcs"] + 1, others["tags"] + len(plc.tags), len(collectors | {plc.collector_id}))
        violations, names = [], []
        for name, limit, was, will in zip(("max_plcs", "max_tags", "max_collectors"),
                                          (quota.max_plcs, quota.max_tags, quota.max_collectors), before, after):
            if limit and will > limit and will > was:
                names.append(name)
                violations.append(QuotaViolation(
                    subject=f"tenants/{code}", description=f"{name} is {limit}; this change would make it {will}"))
        if violations:
            raise ResourceExhausted(
                f"tenant {code!r} is over its quota: " + "; ".join(v.description for v in violations),
                quota_violations=violations, reason="QUOTA_EXCEEDED", metadata={"quota": names[0]})

    # --- PLCs ----------------------------------------------------------------------------------------

    async def _next_revision(self, conn: asyncpg.Connection) -> int:
        # The tenant's row (the session sees no other); its lock is held until commit: the tenant's writers
        # queue here, so its revisions commit in order (and its quotas are checked one write at a time).
        revision = await conn.fetchval("UPDATE revision SET value = value + 1 RETURNING value")
        if revision is None:
            raise NotFound(f"no tenant {tenancy.current()!r}", reason="TENANT_NOT_FOUND",
                           metadata={"tenant": str(tenancy.current())})
        return revision

    async def _assign_tag_ids(self, conn: asyncpg.Connection, plc: plc_pb2.Plc) -> None:
        names = [t.name for t in plc.tags]
        if not names:
            return
        await conn.execute(
            "INSERT INTO tag_ids (plc_id, name) SELECT $1, unnest($2::text[])"
            " ON CONFLICT (tenant_id, plc_id, name) DO NOTHING", plc.id, names
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
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{tenancy.require()}:{revision}")

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
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM plcs WHERE id = $1)", plc.id):  # before the quota
                raise AlreadyExists(f"a PLC with id {plc.id!r} exists", metadata={"plc_id": plc.id})
            await self._check_quota(conn, plc, None)
            await self._assign_tag_ids(conn, plc)
            definition = plc.SerializeToString(deterministic=True)
            row = await conn.fetchrow(
                "INSERT INTO plcs (id, collector_id, definition, revision, tag_count, create_time, update_time)"
                " VALUES ($1, $2, $3, $4, $5, now(), now()) ON CONFLICT (tenant_id, id) DO NOTHING RETURNING *",
                plc.id, plc.collector_id, definition, revision, len(plc.tags),
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
            _check_etag("PLC", "plc_id", plc_id, etag, current.etag)
            new = await merge(current)
            await self._check_quota(conn, new, current)
            await self._assign_tag_ids(conn, new)
            definition = new.SerializeToString(deterministic=True)
            row = await conn.fetchrow(
                "UPDATE plcs SET collector_id = $2, definition = $3, revision = $4, tag_count = $5, update_time = now()"
                " WHERE id = $1 RETURNING *",
                plc_id, new.collector_id, definition, revision, len(new.tags),
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
            _check_etag("PLC", "plc_id", plc_id, etag, etag_of(row["revision"]))
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
                " ON p.tenant_id = c.tenant_id AND p.id = c.plc_id AND p.revision = c.revision"
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
                " ON CONFLICT (tenant_id, id) DO UPDATE SET applied_revision = excluded.applied_revision,"
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
