"""Production's schema (``production``): its migrations, the NOTIFY channel and the consumer's lock key.

Enum numbers the SQL must hold are named constants taken from the generated enums (``OrderState`` is
numbered like ``fabrica.production.v1.OrderState``); the migration text interpolates them, so what it
creates is exactly the DDL that shipped (``state = 2`` is ``IN_PROGRESS``).

Tenants (migration 3): every table but UNSCOPED_TABLES has a ``tenant_id`` and row-level security, forced
(runtime/tenancy.py isolate_sql), so every statement of the store sees and writes the rows of its
connection's tenant only, and one that names no tenant sees nothing.
"""

from __future__ import annotations

import zlib
from datetime import timedelta

from ...runtime import audit, tenancy
from ...runtime.db import Migration
from ..domain import OrderState

#: The NOTIFY channel announcing each order revision as it commits.
CHANNEL = "fabrica_production_orders"
#: Key of the session advisory lock that elects the one replica consuming tag events.
CONSUMER_LOCK_KEY = zlib.crc32(b"fabrica.production.tag-event-consumer") - 2**31
#: Closed orders the first WatchOrders message still shows.
CLOSED_ORDERS_SHOWN = timedelta(hours=24)

_PLANNED = int(OrderState.PLANNED)
_IN_PROGRESS = int(OrderState.IN_PROGRESS)
_PAUSED = int(OrderState.PAUSED)
_CANCELLED = int(OrderState.CANCELLED)
#: The states of an order that is not closed, as the SQL compares them.
OPEN_STATES = [_PLANNED, _IN_PROGRESS, _PAUSED]

#: Tables of the schema that hold no tenant's rows, so carry no row-level security, and why. Every other
#: table of the schema has it, forced (tests/production/test_tenants.py checks pg_class against this).
UNSCOPED_TABLES: dict[str, str] = {
    "consumer_cursor": "the one tag-event consumer of the installation reads every tenant's events from one "
                       "ingest stream: its cursor is the installation's position in that stream, not a tenant's",
    "schema_migrations": "the migrations applied to the schema (runtime/db.py), the installation's",
}

#: The tables whose rows belong to a tenant (each gets tenancy.isolate_sql): all but UNSCOPED_TABLES.
TENANT_TABLES = (
    "sectors", "work_centers", "tag_bindings", "items", "defect_codes", "downtime_reasons", "reference_types",
    "order_revision", "orders", "order_runs", "bookings", "defects", "downtimes", "create_requests",
    "counter_state", "machine_state", "tag_anomalies",
)

# Ids users choose (sectors, work centres, items, defect codes, downtime reasons, reference types, request
# ids, an order's number) are unique per tenant: keys, unique indexes and foreign keys gain tenant_id, so two
# tenants may use the same ids and a row can refer only to rows of its own tenant. Ids the service assigns
# (orders, runs, bookings, defects, downtimes, anomalies: identity columns) stay unique across tenants; the
# rows that refer to an order name it with their tenant too ((tenant_id, order_id) -> orders (tenant_id, id)).
# A tag is bound once per tenant. The order revision is a counter per tenant (one row each, created on first
# use): one tenant's changes never move another's revisions. Existing rows go to the tenant "default".
_TENANTS_SQL = f"""
    CREATE TABLE reference_types (
        id text NOT NULL,
        display_name text NOT NULL,
        description text NOT NULL DEFAULT '',
        revision bigint NOT NULL,
        create_time timestamptz NOT NULL,
        update_time timestamptz NOT NULL
    );
    ALTER TABLE items ADD COLUMN reference_type_id text;

    {"".join(tenancy.isolate_sql("production", t) for t in TENANT_TABLES)}
    {audit.isolation_sql("production")}

    -- Foreign keys on user-chosen ids go first (they depend on the keys they point at).
    ALTER TABLE work_centers DROP CONSTRAINT work_centers_sector_id_fkey;
    ALTER TABLE tag_bindings DROP CONSTRAINT tag_bindings_work_center_id_fkey;
    ALTER TABLE orders DROP CONSTRAINT orders_item_id_fkey;
    ALTER TABLE orders DROP CONSTRAINT orders_work_center_id_fkey;
    ALTER TABLE defects DROP CONSTRAINT defects_defect_code_id_fkey;
    ALTER TABLE downtimes DROP CONSTRAINT downtimes_work_center_id_fkey;
    ALTER TABLE downtimes DROP CONSTRAINT downtimes_reason_id_fkey;
    ALTER TABLE counter_state DROP CONSTRAINT counter_state_work_center_id_fkey;
    ALTER TABLE machine_state DROP CONSTRAINT machine_state_work_center_id_fkey;
    ALTER TABLE order_runs DROP CONSTRAINT order_runs_order_id_fkey;
    ALTER TABLE bookings DROP CONSTRAINT bookings_order_id_fkey;
    ALTER TABLE defects DROP CONSTRAINT defects_order_id_fkey;
    ALTER TABLE downtimes DROP CONSTRAINT downtimes_order_id_fkey;

    ALTER TABLE sectors DROP CONSTRAINT sectors_pkey, ADD PRIMARY KEY (tenant_id, id);
    ALTER TABLE work_centers DROP CONSTRAINT work_centers_pkey, ADD PRIMARY KEY (tenant_id, id);
    ALTER TABLE items DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (tenant_id, id);
    ALTER TABLE defect_codes DROP CONSTRAINT defect_codes_pkey, ADD PRIMARY KEY (tenant_id, id);
    ALTER TABLE downtime_reasons DROP CONSTRAINT downtime_reasons_pkey, ADD PRIMARY KEY (tenant_id, id);
    ALTER TABLE reference_types ADD PRIMARY KEY (tenant_id, id);
    ALTER TABLE tag_bindings DROP CONSTRAINT tag_bindings_pkey, ADD PRIMARY KEY (tenant_id, tag_id);
    ALTER TABLE counter_state DROP CONSTRAINT counter_state_pkey, ADD PRIMARY KEY (tenant_id, work_center_id, tag_id);
    ALTER TABLE machine_state DROP CONSTRAINT machine_state_pkey, ADD PRIMARY KEY (tenant_id, work_center_id);
    -- The lookup is by (kind, request id): tenant_id last keeps the key usable for it.
    ALTER TABLE create_requests DROP CONSTRAINT create_requests_pkey, ADD PRIMARY KEY (kind, request_id, tenant_id);
    ALTER TABLE order_revision DROP CONSTRAINT order_revision_pkey;
    ALTER TABLE order_revision DROP COLUMN only_row;
    ALTER TABLE order_revision ADD PRIMARY KEY (tenant_id);
    ALTER TABLE orders DROP CONSTRAINT orders_number_key, ADD CONSTRAINT orders_number_key UNIQUE (tenant_id, number);
    ALTER TABLE orders ADD CONSTRAINT orders_tenant_id_id_key UNIQUE (tenant_id, id);

    ALTER TABLE work_centers ADD FOREIGN KEY (tenant_id, sector_id) REFERENCES sectors (tenant_id, id);
    ALTER TABLE tag_bindings ADD FOREIGN KEY (tenant_id, work_center_id) REFERENCES work_centers (tenant_id, id)
        ON DELETE CASCADE;
    ALTER TABLE items ADD FOREIGN KEY (tenant_id, reference_type_id) REFERENCES reference_types (tenant_id, id);
    ALTER TABLE orders ADD FOREIGN KEY (tenant_id, item_id) REFERENCES items (tenant_id, id);
    ALTER TABLE orders ADD FOREIGN KEY (tenant_id, work_center_id) REFERENCES work_centers (tenant_id, id);
    ALTER TABLE defects ADD FOREIGN KEY (tenant_id, defect_code_id) REFERENCES defect_codes (tenant_id, id);
    ALTER TABLE downtimes ADD FOREIGN KEY (tenant_id, work_center_id) REFERENCES work_centers (tenant_id, id);
    ALTER TABLE downtimes ADD FOREIGN KEY (tenant_id, reason_id) REFERENCES downtime_reasons (tenant_id, id);
    ALTER TABLE counter_state ADD FOREIGN KEY (tenant_id, work_center_id) REFERENCES work_centers (tenant_id, id)
        ON DELETE CASCADE;
    ALTER TABLE machine_state ADD FOREIGN KEY (tenant_id, work_center_id) REFERENCES work_centers (tenant_id, id)
        ON DELETE CASCADE;
    ALTER TABLE order_runs ADD FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id);
    ALTER TABLE bookings ADD FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id);
    ALTER TABLE defects ADD FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id);
    ALTER TABLE downtimes ADD FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id);

    -- One running order, one open automatic stop per work centre: of a tenant.
    DROP INDEX orders_one_in_progress;
    CREATE UNIQUE INDEX orders_one_in_progress ON orders (work_center_id, tenant_id) WHERE state = {_IN_PROGRESS};
    DROP INDEX downtimes_one_open_automatic;
    CREATE UNIQUE INDEX downtimes_one_open_automatic ON downtimes (work_center_id, tenant_id)
        WHERE automatic AND end_time IS NULL;
    -- WatchOrders reads a tenant's orders changed after a revision.
    DROP INDEX orders_revision;
    CREATE INDEX orders_revision ON orders (tenant_id, revision);
    CREATE INDEX items_reference_type ON items (tenant_id, reference_type_id, id);
"""

MIGRATIONS = [
    Migration(
        1,
        "master data, orders, runs, bookings, defects, downtime, consumer state",
        f"""
        CREATE SEQUENCE master_revision;

        CREATE TABLE sectors (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );

        CREATE TABLE work_centers (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            sector_id text NOT NULL REFERENCES sectors (id),
            plc_id text NOT NULL,
            production_counter_tag_id bigint NOT NULL,
            scrap_counter_tag_id bigint NOT NULL,
            machine_state_tag_id bigint NOT NULL,
            counter_width integer NOT NULL,
            max_counter_jump bigint NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );
        CREATE INDEX work_centers_sector ON work_centers (sector_id, id);

        -- The tags work centres bind: a tag is bound once, in one role (fabrica.common.v1.TagRole).
        CREATE TABLE tag_bindings (
            tag_id bigint PRIMARY KEY,
            work_center_id text NOT NULL REFERENCES work_centers (id) ON DELETE CASCADE,
            role smallint NOT NULL
        );
        CREATE INDEX tag_bindings_work_center ON tag_bindings (work_center_id);

        CREATE TABLE items (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            ideal_cycle_nanos bigint NOT NULL CHECK (ideal_cycle_nanos > 0),
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );

        CREATE TABLE defect_codes (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            severity smallint NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );

        CREATE TABLE downtime_reasons (
            id text PRIMARY KEY,
            display_name text NOT NULL,
            color text NOT NULL,
            counts_against_availability boolean NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );

        CREATE TABLE order_revision (
            only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            value bigint NOT NULL
        );
        INSERT INTO order_revision VALUES (true, 0);

        CREATE TABLE orders (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            number text NOT NULL UNIQUE,
            item_id text NOT NULL REFERENCES items (id),
            work_center_id text NOT NULL REFERENCES work_centers (id),
            planned_quantity bigint NOT NULL CHECK (planned_quantity >= 1),
            state smallint NOT NULL CHECK (state BETWEEN {_PLANNED} AND {_CANCELLED}),
            good_quantity bigint NOT NULL DEFAULT 0 CHECK (good_quantity >= 0),
            scrap_quantity bigint NOT NULL DEFAULT 0 CHECK (scrap_quantity >= 0),
            start_time timestamptz,
            end_time timestamptz,
            cancel_reason text NOT NULL DEFAULT '',
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL
        );
        -- One running order per work centre, whatever the code above does.
        CREATE UNIQUE INDEX orders_one_in_progress ON orders (work_center_id) WHERE state = {_IN_PROGRESS};
        CREATE INDEX orders_revision ON orders (revision);
        CREATE INDEX orders_work_center ON orders (work_center_id, id);
        CREATE INDEX orders_item ON orders (item_id);
        CREATE INDEX orders_open ON orders (id) WHERE state IN ({_PLANNED}, {_IN_PROGRESS}, {_PAUSED});

        -- From each start or resume to the pause, completion or cancellation that ends it.
        CREATE TABLE order_runs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            order_id bigint NOT NULL REFERENCES orders (id),
            work_center_id text NOT NULL,
            start_time timestamptz NOT NULL,
            end_time timestamptz
        );
        CREATE INDEX order_runs_work_center ON order_runs (work_center_id, start_time);
        CREATE UNIQUE INDEX order_runs_one_open ON order_runs (order_id) WHERE end_time IS NULL;

        CREATE TABLE bookings (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            order_id bigint NOT NULL REFERENCES orders (id),
            good_quantity bigint NOT NULL,
            scrap_quantity bigint NOT NULL,
            source smallint NOT NULL,
            book_time timestamptz NOT NULL,
            note text NOT NULL DEFAULT '',
            source_cursor bigint,
            source_tag_id bigint,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX bookings_order ON bookings (order_id, id);
        CREATE INDEX bookings_order_time ON bookings (order_id, book_time);
        -- Each tag event books at most once.
        CREATE UNIQUE INDEX bookings_source_cursor ON bookings (source_cursor) WHERE source_cursor IS NOT NULL;

        CREATE TABLE defects (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            order_id bigint NOT NULL REFERENCES orders (id),
            defect_code_id text NOT NULL REFERENCES defect_codes (id),
            quantity bigint NOT NULL CHECK (quantity > 0),
            note text NOT NULL DEFAULT '',
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX defects_order ON defects (order_id, id);

        CREATE TABLE downtimes (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            work_center_id text NOT NULL REFERENCES work_centers (id),
            order_id bigint REFERENCES orders (id),
            start_time timestamptz NOT NULL,
            end_time timestamptz CHECK (end_time >= start_time),
            reason_id text REFERENCES downtime_reasons (id),
            note text NOT NULL DEFAULT '',
            automatic boolean NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX downtimes_work_center ON downtimes (work_center_id, start_time DESC, id DESC);
        CREATE UNIQUE INDEX downtimes_one_open_automatic ON downtimes (work_center_id)
            WHERE automatic AND end_time IS NULL;

        -- Idempotent creates: the first request with a key records what it made.
        CREATE TABLE create_requests (
            kind text NOT NULL,
            request_id text NOT NULL,
            resource_id text,
            create_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (kind, request_id)
        );

        -- The last WatchTagEvents cursor whose events are applied.
        CREATE TABLE consumer_cursor (
            only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            cursor bigint NOT NULL,
            update_time timestamptz NOT NULL
        );
        INSERT INTO consumer_cursor VALUES (true, 0, now());

        -- Last counter value seen per work centre and tag: the baseline of the next delta. numeric: a
        -- 64-bit counter does not fit a bigint.
        CREATE TABLE counter_state (
            work_center_id text NOT NULL REFERENCES work_centers (id) ON DELETE CASCADE,
            tag_id bigint NOT NULL,
            value numeric(20, 0) NOT NULL,
            cursor bigint NOT NULL,
            read_time timestamptz NOT NULL,
            PRIMARY KEY (work_center_id, tag_id)
        );

        CREATE TABLE machine_state (
            work_center_id text PRIMARY KEY REFERENCES work_centers (id) ON DELETE CASCADE,
            tag_id bigint NOT NULL,
            running boolean NOT NULL,
            cursor bigint NOT NULL,
            read_time timestamptz NOT NULL
        );

        -- Counter jumps (flagged, not booked) and values that are not counts or states. Kept after the
        -- work centre is gone: they are a record.
        CREATE TABLE tag_anomalies (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            work_center_id text NOT NULL,
            tag_id bigint NOT NULL,
            cursor bigint NOT NULL,
            kind text NOT NULL,
            previous_value numeric(20, 0),
            value text NOT NULL,
            note text NOT NULL,
            read_time timestamptz NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX tag_anomalies_work_center ON tag_anomalies (work_center_id, id);
        """,
    ),
    audit.migration(2),
    Migration(3, "tenants: every row belongs to a tenant, ids unique per tenant; reference types", _TENANTS_SQL),
]

