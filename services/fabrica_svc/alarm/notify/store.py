"""All SQL of notifications and forwarding (tables: schema.py). Functions take an asyncpg connection or
pool (anything with fetch/fetchrow/fetchval/execute) so the alarm service can call them inside its own
transactions; they return the plain dataclasses of domain.py."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import asyncpg
from google.protobuf import json_format
from google.protobuf.message import Message

from ...runtime.errors import Aborted, AlreadyExists, FieldViolation, InvalidArgument, NotFound
from .domain import (
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    Delivery,
    ForwardingTarget,
    NotificationTarget,
    check_event,
)
from .schema import OUTBOX_CHANNEL


class Db(Protocol):
    """An asyncpg Connection or Pool."""

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]: ...
    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


# --- notification targets -------------------------------------------------------------------------------

_TARGET_SELECT = """
SELECT t.*,
    (SELECT count(*) FROM alarm.notification_outbox o
     WHERE o.tenant_id = t.tenant_id AND o.target_id = t.id AND o.state = 1) AS pending,
    (SELECT count(*) FROM alarm.notification_outbox o
     WHERE o.tenant_id = t.tenant_id AND o.target_id = t.id AND o.state = 3) AS failed,
    (SELECT max(delivered_time) FROM alarm.notification_outbox o
     WHERE o.tenant_id = t.tenant_id AND o.target_id = t.id) AS last_delivered_time,
    (SELECT o.last_error FROM alarm.notification_outbox o
     WHERE o.tenant_id = t.tenant_id AND o.target_id = t.id AND o.attempts > 0
     ORDER BY o.last_attempt_time DESC NULLS LAST, o.id DESC LIMIT 1) AS last_error
FROM alarm.notification_targets t
"""


def _target(row: asyncpg.Record) -> NotificationTarget:
    return NotificationTarget(
        id=row["id"], display_name=row["display_name"], url=row["url"], secret=row["secret"],
        enabled=row["enabled"], revision=row["revision"], create_time=row["create_time"],
        update_time=row["update_time"], pending_deliveries=row["pending"], failed_deliveries=row["failed"],
        last_delivered_time=row["last_delivered_time"], last_error=row["last_error"] or "",
    )


async def create_notification_target(db: Db, target: NotificationTarget) -> NotificationTarget:
    """Store a new target (checked first: InvalidArgument); AlreadyExists for a taken id."""
    target.check()
    try:
        await db.execute(
            "INSERT INTO alarm.notification_targets (id, display_name, url, secret, enabled) VALUES ($1, $2, $3, $4, $5)",
            target.id, target.display_name, target.url, target.secret, target.enabled,
        )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"notification target {target.id} already exists", metadata={"id": target.id}) from None
    return await get_notification_target(db, target.id)


async def get_notification_target(db: Db, target_id: str) -> NotificationTarget:
    row = await db.fetchrow(_TARGET_SELECT + " WHERE t.id = $1", target_id)
    if row is None:
        raise NotFound(f"notification target {target_id} not found", metadata={"id": target_id})
    return _target(row)


async def list_notification_targets(db: Db) -> list[NotificationTarget]:
    return [_target(r) for r in await db.fetch(_TARGET_SELECT + " ORDER BY t.id")]


async def update_notification_target(db: Db, target_id: str, *, display_name: str | None = None,
                                     url: str | None = None, secret: str | None = None, enabled: bool | None = None,
                                     expected_revision: int | None = None) -> NotificationTarget:
    """Change the given fields (None: unchanged). Aborted if `expected_revision` (from the etag) is stale;
    NotFound for an unknown id. Deliveries already queued are sent to the new URL and signed with the new
    secret from their next attempt on."""
    current = await get_notification_target(db, target_id)
    if expected_revision is not None and expected_revision != current.revision:
        raise Aborted(f"notification target {target_id} changed (revision {current.revision}); read it again",
                      reason="ETAG_MISMATCH", metadata={"id": target_id})
    merged = current.replace(display_name=display_name, url=url, secret=secret, enabled=enabled)
    merged.check()
    status = await db.execute(
        "UPDATE alarm.notification_targets SET display_name = $2, url = $3, secret = $4, enabled = $5,"
        " revision = revision + 1, update_time = now() WHERE id = $1 AND revision = $6",
        target_id, merged.display_name, merged.url, merged.secret, merged.enabled, current.revision,
    )
    if status.split()[-1] == "0":
        raise Aborted(f"notification target {target_id} changed meanwhile; read it again", reason="ETAG_MISMATCH",
                      metadata={"id": target_id})
    if enabled:
        await db.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
    return await get_notification_target(db, target_id)


async def delete_notification_target(db: Db, target_id: str) -> None:
    """Delete a target and its deliveries (pending ones are not sent). NotFound for an unknown id."""
    status = await db.execute("DELETE FROM alarm.notification_targets WHERE id = $1", target_id)
    if status.split()[-1] == "0":
        raise NotFound(f"notification target {target_id} not found", metadata={"id": target_id})


# --- the outbox -----------------------------------------------------------------------------------------


def event_body(event: Mapping[str, Any] | Message, *, event_type: str, idempotency_key: str,
               create_time: datetime | None = None) -> bytes:
    """The JSON body of a notification: ``{"idempotency_key", "event_type", "create_time", "event"}`` with
    the event as given (a proto message becomes its JSON mapping, proto field names), compact, keys
    sorted, UTF-8."""
    payload = json_format.MessageToDict(event, preserving_proto_field_name=True) if isinstance(event, Message) \
        else dict(event)
    doc: dict[str, Any] = {"idempotency_key": idempotency_key, "event_type": event_type, "event": payload}
    if create_time is not None:
        doc["create_time"] = create_time.isoformat()
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


async def enqueue_notification(conn: Db, *, idempotency_key: str, event_type: str,
                               event: Mapping[str, Any] | Message, target_ids: Sequence[str] | None = None,
                               create_time: datetime | None = None) -> int:
    """Queue one delivery of `event` to every enabled notification target (or to those of `target_ids`
    that are enabled), in the caller's transaction: call it in the transaction that commits the alarm
    event, so that the notification is sent (at least once) exactly when the event committed.

    `idempotency_key` names the event (e.g. ``alarm-event-<id>``): it is sent as the Idempotency-Key header
    on every attempt, and queueing the same key again for a target adds nothing (a replay of the
    transition cannot notify twice). Returns the deliveries added. The dispatcher is woken at commit."""
    check_event(idempotency_key, event_type)
    body = event_body(event, event_type=event_type, idempotency_key=idempotency_key, create_time=create_time)
    status = await conn.execute(
        "INSERT INTO alarm.notification_outbox (target_id, idempotency_key, event_type, body)"
        " SELECT id, $1, $2, $3 FROM alarm.notification_targets"
        " WHERE enabled AND ($4::text[] IS NULL OR id = ANY($4::text[])) ORDER BY id"
        " ON CONFLICT (tenant_id, target_id, idempotency_key) DO NOTHING",
        idempotency_key, event_type, body, list(target_ids) if target_ids is not None else None,
    )
    added = int(status.split()[-1])
    if added:
        await conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
    return added


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(
        id=row["id"], target_id=row["target_id"], idempotency_key=row["idempotency_key"],
        event_type=row["event_type"], body=bytes(row["body"]), state=row["state"], attempts=row["attempts"],
        next_attempt_time=row["next_attempt_time"], last_error=row["last_error"],
        last_http_status=row["last_http_status"], last_attempt_time=row["last_attempt_time"],
        create_time=row["create_time"], delivered_time=row["delivered_time"],
    )


async def list_deliveries(db: Db, *, target_id: str | None = None, state: int | None = None,
                          before_id: int | None = None, limit: int = 100) -> list[Delivery]:
    """Deliveries, newest first (id descending), optionally of one target and in one state, before
    `before_id` (the last id of the previous page)."""
    if state is not None and state not in (DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_FAILED):
        raise InvalidArgument(FieldViolation("state", f"unknown delivery state {state}"))
    rows = await db.fetch(
        "SELECT * FROM alarm.notification_outbox"
        " WHERE ($1::text IS NULL OR target_id = $1) AND ($2::smallint IS NULL OR state = $2)"
        "   AND ($3::bigint IS NULL OR id < $3)"
        " ORDER BY id DESC LIMIT $4",
        target_id, state, before_id, limit,
    )
    return [_delivery(r) for r in rows]


async def targets_with_pending(db: Db) -> list[tuple[str, str]]:
    """(tenant, id) of the enabled targets that have deliveries to make (of the tenants `db` sees: the
    dispatcher's, every tenant's)."""
    rows = await db.fetch(
        "SELECT t.tenant_id, t.id FROM alarm.notification_targets t WHERE t.enabled AND EXISTS"
        " (SELECT 1 FROM alarm.notification_outbox o WHERE o.tenant_id = t.tenant_id AND o.target_id = t.id"
        "  AND o.state = 1) ORDER BY t.tenant_id, t.id"
    )
    return [(r["tenant_id"], r["id"]) for r in rows]


async def next_delivery(db: Db, target_id: str) -> tuple[Delivery, str, str, float] | None:
    """The target's oldest pending delivery with the target's URL and secret and the seconds until it is
    due (by the database's clock; 0 or less: now), or None (none pending, or the target is disabled or gone)."""
    row = await db.fetchrow(
        "SELECT o.*, t.url, t.secret, extract(epoch FROM o.next_attempt_time - now())::float8 AS due_in"
        " FROM alarm.notification_outbox o"
        " JOIN alarm.notification_targets t ON t.tenant_id = o.tenant_id AND t.id = o.target_id"
        " WHERE o.target_id = $1 AND o.state = 1 AND t.enabled ORDER BY o.id LIMIT 1",
        target_id,
    )
    return None if row is None else (_delivery(row), row["url"], row["secret"], row["due_in"])


async def record_attempt(db: Db, delivery_id: int, *, delivered: bool, give_up: bool, error: str,
                         http_status: int, retry_in: float) -> None:
    """The outcome of one attempt: delivered, failed for good (`give_up`), or to retry in `retry_in` s.
    `last_error` keeps the last error met (a delivery that succeeded after failures still shows it)."""
    state = DELIVERY_DELIVERED if delivered else DELIVERY_FAILED if give_up else DELIVERY_PENDING
    await db.execute(
        "UPDATE alarm.notification_outbox SET attempts = attempts + 1, state = $2::smallint,"
        " last_error = CASE WHEN $3::text = '' THEN last_error ELSE $3::text END,"
        " last_http_status = $4, last_attempt_time = now(),"
        " next_attempt_time = now() + make_interval(secs => $5::float8),"
        f" delivered_time = CASE WHEN $2::smallint = {DELIVERY_DELIVERED:d} THEN now() END"
        " WHERE id = $1 AND state = 1",
        delivery_id, state, error[:2000], http_status, retry_in,
    )


# --- forwarding targets ---------------------------------------------------------------------------------


def _forwarding(row: asyncpg.Record) -> ForwardingTarget:
    return ForwardingTarget(
        id=row["id"], display_name=row["display_name"], plc_ids=tuple(row["plc_ids"]), kind=row["kind"],
        url=row["url"], secret=row["secret"], ingest_address=row["ingest_address"],
        collector_id=row["collector_id"], enabled=row["enabled"], start_at_end=row["start_at_end"],
        revision=row["revision"], cursor=row["cursor"], forwarded_batches=row["forwarded_batches"],
        forwarded_readings=row["forwarded_readings"], last_forward_time=row["last_forward_time"],
        last_commit_time=row["last_commit_time"], last_error=row["last_error"],
        create_time=row["create_time"], update_time=row["update_time"], tenant=row["tenant_id"],
    )


async def create_forwarding_target(db: Db, target: ForwardingTarget) -> ForwardingTarget:
    """Store a new forwarding target (checked: InvalidArgument); AlreadyExists for a taken id. It starts
    at the oldest batch ingest retains, or at the newest with `start_at_end`."""
    target.check()
    try:
        await db.execute(
            "INSERT INTO alarm.forwarding_targets (id, display_name, plc_ids, kind, url, secret, ingest_address,"
            " collector_id, enabled, start_at_end) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            target.id, target.display_name, list(target.plc_ids), target.kind, target.url, target.secret,
            target.ingest_address, target.collector_id, target.enabled, target.start_at_end,
        )
    except asyncpg.UniqueViolationError:
        raise AlreadyExists(f"forwarding target {target.id} already exists", metadata={"id": target.id}) from None
    return await get_forwarding_target(db, target.id)


async def get_forwarding_target(db: Db, target_id: str) -> ForwardingTarget:
    row = await db.fetchrow("SELECT * FROM alarm.forwarding_targets WHERE id = $1", target_id)
    if row is None:
        raise NotFound(f"forwarding target {target_id} not found", metadata={"id": target_id})
    return _forwarding(row)


async def list_forwarding_targets(db: Db) -> list[ForwardingTarget]:
    """The forwarding targets `db` sees (a request's: its tenant's; the supervisor's: every tenant's)."""
    return [_forwarding(r) for r in await db.fetch("SELECT * FROM alarm.forwarding_targets ORDER BY tenant_id, id")]


async def update_forwarding_target(db: Db, target_id: str, *, display_name: str | None = None,
                                   plc_ids: Sequence[str] | None = None, url: str | None = None,
                                   secret: str | None = None, enabled: bool | None = None,
                                   expected_revision: int | None = None) -> ForwardingTarget:
    """Change the given fields (None: unchanged); the destination kind, ingest address and collector id
    are fixed at creation (the target's sequence numbering belongs to them). Aborted for a stale
    `expected_revision`; NotFound for an unknown id. A changed PLC set applies from the stored cursor on."""
    current = await get_forwarding_target(db, target_id)
    if expected_revision is not None and expected_revision != current.revision:
        raise Aborted(f"forwarding target {target_id} changed (revision {current.revision}); read it again",
                      reason="ETAG_MISMATCH", metadata={"id": target_id})
    merged = current.replace(display_name=display_name, plc_ids=tuple(plc_ids) if plc_ids is not None else None,
                             url=url, secret=secret, enabled=enabled)
    merged.check()
    status = await db.execute(
        "UPDATE alarm.forwarding_targets SET display_name = $2, plc_ids = $3, url = $4, secret = $5, enabled = $6,"
        " revision = revision + 1, update_time = now() WHERE id = $1 AND revision = $7",
        target_id, merged.display_name, list(merged.plc_ids), merged.url, merged.secret, merged.enabled,
        current.revision,
    )
    if status.split()[-1] == "0":
        raise Aborted(f"forwarding target {target_id} changed meanwhile; read it again", reason="ETAG_MISMATCH",
                      metadata={"id": target_id})
    return await get_forwarding_target(db, target_id)


async def delete_forwarding_target(db: Db, target_id: str) -> None:
    status = await db.execute("DELETE FROM alarm.forwarding_targets WHERE id = $1", target_id)
    if status.split()[-1] == "0":
        raise NotFound(f"forwarding target {target_id} not found", metadata={"id": target_id})


async def commit_forwarded(db: Db, target_id: str, *, from_cursor: int, cursor: int, batches: int, readings: int,
                           commit_time: datetime | None) -> bool:
    """Move the target's committed state from `from_cursor` to `cursor` (`batches` more sent). False if the
    stored cursor is no longer `from_cursor` (another forwarder moved it: this one must stop). Clears
    `start_at_end`: once a cursor is stored, the target resumes from it."""
    status = await db.execute(
        "UPDATE alarm.forwarding_targets SET cursor = $3, forwarded_batches = forwarded_batches + $4,"
        " start_at_end = false,"
        " forwarded_readings = forwarded_readings + $5, last_forward_time = CASE WHEN $4 > 0 THEN now()"
        " ELSE last_forward_time END, last_commit_time = coalesce($6, last_commit_time), last_error = ''"
        " WHERE id = $1 AND cursor = $2",
        target_id, from_cursor, cursor, batches, readings, commit_time,
    )
    return status.split()[-1] == "1"


async def note_forwarding_error(db: Db, target_id: str, error: str) -> None:
    await db.execute("UPDATE alarm.forwarding_targets SET last_error = $2 WHERE id = $1", target_id, error[:2000])

