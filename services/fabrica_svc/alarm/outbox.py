"""The notifications of alarm events: each event with `notify` set is queued for every enabled webhook target
(notify.enqueue_notification) in the transaction that records the event, as the contract's AlarmEvent in
JSON. Its idempotency key is ``alarm-event-<event id>``: one event per transition (the evaluator's cursor
commits with it), so one key per transition, whatever is replayed or retried."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from . import convert
from .notify import enqueue_notification
from .store import EventRow


def idempotency_key(event_id: int) -> str:
    return f"alarm-event-{event_id}"


def event_type(event: EventRow) -> str:
    """``alarm.raised``, ``alarm.cleared``, ``alarm.acknowledged``, ... (the notification's event type)."""
    return f"alarm.{event.type.lower()}"


class WebhookOutbox:
    async def add(self, conn: asyncpg.Connection, events: Sequence[EventRow]) -> None:
        announced = [e for e in events if e.notify]
        if not announced or not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM notification_targets WHERE enabled)"):
            return  # no target to notify: nothing to queue (one query, not one per event)
        for e in announced:
            if e.notify:
                await enqueue_notification(conn, idempotency_key=idempotency_key(e.id), event_type=event_type(e),
                                           event=convert.event_message(e), create_time=e.event_time)
