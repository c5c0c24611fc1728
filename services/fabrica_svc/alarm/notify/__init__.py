"""Outbound notifications (webhooks) and readings forwarding of the alarm service.

What the alarm service calls (everything else here is internal):

* migrations: ``NOTIFY_MIGRATIONS`` (append to the alarm schema's MIGRATIONS, sorted by version).
* in the transaction that commits an alarm event: ``await enqueue_notification(conn, idempotency_key=...,
  event_type=..., event=<AlarmEvent proto or a JSON-able mapping>)``.
* background parts, started and stopped by the app: ``WebhookDispatcher(pool, dsn)`` and
  ``ForwardingSupervisor(pool, dsn, ingest_addr)``.
* the resources (targets, deliveries, forwarding targets): the CRUD functions of store.py, and
  convert.py for proto ⇄ domain.
"""

from __future__ import annotations

from .forwarding import ForwardingSupervisor
from .schema import NOTIFY_MIGRATIONS, OUTBOX_CHANNEL, SCHEMA
from .store import enqueue_notification
from .webhook import WebhookDispatcher

__all__ = ["NOTIFY_MIGRATIONS", "OUTBOX_CHANNEL", "SCHEMA", "ForwardingSupervisor", "WebhookDispatcher",
           "enqueue_notification"]
