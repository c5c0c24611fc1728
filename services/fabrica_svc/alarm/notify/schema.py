"""The tables of notifications and forwarding, in the alarm service's schema (``alarm``).

``NOTIFY_MIGRATIONS`` is appended to the alarm schema's MIGRATIONS by the alarm service. Their versions
start at 1001 so that they never collide with the service's own (1, 2, ...): keep the alarm service's list
sorted by version (``sorted([...own..., *NOTIFY_MIGRATIONS], key=lambda m: m.version)``); these tables
reference none of the service's own, so they apply in any order relative to them.

Tables
------
``notification_targets``   webhook targets: URL, signing secret, enabled; ``revision`` gives the etag.
``notification_outbox``    one row per (alarm event, target): the JSON body signed and sent, its idempotency
                           key, and the delivery state (attempts, last error and HTTP status, next attempt,
                           delivered or given up). Rows are inserted by the alarm service in the same
                           transaction as the alarm event (store.enqueue_notification), so a committed event
                           is delivered at least once and an event that did not commit is never sent.
``forwarding_targets``     readings forwarding: which PLCs, where to (HTTP JSON batches or another
                           Fabrica's ingest), and the committed state: the source cursor of the last batch
                           forwarded and how many batches were sent (the next target sequence is that + 1).

Tenants (1003): every table is a tenant's (runtime/tenancy.py isolate_sql: ``tenant_id``, forced row-level
security). Target ids are unique per tenant, so the keys, the outbox's reference to its target and its
idempotency keys are (tenant_id, ...). Delivery ids (``notification_outbox.id``) stay one sequence of the
installation: a tenant's delivery ids have gaps where other tenants' deliveries were queued (they order its
ListDeliveries pages, nothing else).
"""

from __future__ import annotations

from ...runtime import tenancy
from ...runtime.db import Migration

SCHEMA = "alarm"
#: Tables of notifications and forwarding that belong to no tenant, and why (none: all are a tenant's); part
#: of the alarm schema's allow-list (store.UNSCOPED_TABLES).
NOTIFY_UNSCOPED_TABLES: dict[str, str] = {}
#: Notified (in the inserting transaction, so at its commit) when outbox rows are added.
OUTBOX_CHANNEL = "fabrica_alarm_outbox"

NOTIFY_MIGRATIONS = [
    Migration(1001, "notification targets and the webhook outbox", """
CREATE TABLE notification_targets (
    id text PRIMARY KEY,
    display_name text NOT NULL DEFAULT '',
    url text NOT NULL,
    secret text NOT NULL,
    enabled boolean NOT NULL DEFAULT true,
    revision bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);

-- state: 1 pending, 2 delivered, 3 failed (gave up after the last attempt): DeliveryState numbers.
CREATE TABLE notification_outbox (
    id bigserial PRIMARY KEY,
    target_id text NOT NULL REFERENCES notification_targets (id) ON DELETE CASCADE,
    idempotency_key text NOT NULL,
    event_type text NOT NULL,
    body bytea NOT NULL,
    state smallint NOT NULL DEFAULT 1,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_time timestamptz NOT NULL DEFAULT now(),
    last_error text NOT NULL DEFAULT '',
    last_http_status integer NOT NULL DEFAULT 0,
    last_attempt_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    delivered_time timestamptz,
    UNIQUE (target_id, idempotency_key)
);
CREATE INDEX notification_outbox_pending_idx ON notification_outbox (target_id, id) WHERE state = 1;
CREATE INDEX notification_outbox_target_idx ON notification_outbox (target_id, id DESC);
"""),
    Migration(1002, "forwarding targets: readings of chosen PLCs to another platform, from a committed cursor", """
-- kind: 1 HTTP JSON batches, 2 another Fabrica's ingest (StreamReadings).
CREATE TABLE forwarding_targets (
    id text PRIMARY KEY,
    display_name text NOT NULL DEFAULT '',
    plc_ids text[] NOT NULL,
    kind smallint NOT NULL,
    url text NOT NULL DEFAULT '',
    secret text NOT NULL DEFAULT '',
    ingest_address text NOT NULL DEFAULT '',
    collector_id text NOT NULL DEFAULT '',
    enabled boolean NOT NULL DEFAULT true,
    start_at_end boolean NOT NULL DEFAULT false,
    revision bigint NOT NULL DEFAULT 1,
    cursor bigint NOT NULL DEFAULT 0,
    forwarded_batches bigint NOT NULL DEFAULT 0,
    forwarded_readings bigint NOT NULL DEFAULT 0,
    last_forward_time timestamptz,
    last_commit_time timestamptz,
    last_error text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
"""),
    Migration(1003, "tenants: notification targets, deliveries and forwarding targets are a tenant's (row-level "
                    "security); target ids unique per tenant", f"""
{tenancy.isolate_sql(SCHEMA, "notification_targets")}
{tenancy.isolate_sql(SCHEMA, "notification_outbox")}
{tenancy.isolate_sql(SCHEMA, "forwarding_targets")}
ALTER TABLE notification_outbox DROP CONSTRAINT notification_outbox_target_id_fkey;
ALTER TABLE notification_outbox DROP CONSTRAINT notification_outbox_target_id_idempotency_key_key;
ALTER TABLE notification_targets DROP CONSTRAINT notification_targets_pkey, ADD PRIMARY KEY (tenant_id, id);
ALTER TABLE notification_outbox ADD FOREIGN KEY (tenant_id, target_id)
    REFERENCES notification_targets (tenant_id, id) ON DELETE CASCADE;
ALTER TABLE notification_outbox ADD UNIQUE (tenant_id, target_id, idempotency_key);
DROP INDEX notification_outbox_pending_idx, notification_outbox_target_idx;
CREATE INDEX notification_outbox_pending_idx ON notification_outbox (tenant_id, target_id, id) WHERE state = 1;
CREATE INDEX notification_outbox_target_idx ON notification_outbox (tenant_id, target_id, id DESC);
ALTER TABLE forwarding_targets DROP CONSTRAINT forwarding_targets_pkey, ADD PRIMARY KEY (tenant_id, id);
"""),
]
