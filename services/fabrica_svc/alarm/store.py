"""The alarm service's SQL: schema ``alarm``, its migrations, and every query. No rules here.

Tables:

* ``rules``: each rule's definition (the contract's AlarmRule, serialized, without output fields, as config
  keeps PLCs) with its revision; ``create_requests`` maps request ids to the rules they created.
* ``alarms``: one row per (rule, tag): the lifecycle state (written by the evaluator's transactions and by
  AcknowledgeAlarm / ShelveAlarm, each under the row's lock), and the evaluator's state of that instance
  (``eval_state``, for the rule revision ``eval_revision``), written only by the evaluator.
* ``events``: every transition. Ids come from ``event_seq`` under its row lock, so they increase in commit
  order: a watcher that has read up to id N never later finds a smaller id committed (WatchAlarms' cursor).
  ``notify`` marks the events to annunciate: the notification outbox, written in the transaction of the
  transition itself.
* ``evaluator_cursor``: the position in ingest's committed readings up to which the events are recorded,
  moved in the same transaction as the events and states a message of readings produced.

Tenants (runtime/tenancy.py; migration 2 here, 1003 in notify/schema.py): every table but those of
`UNSCOPED_TABLES` has a ``tenant_id`` and a forced row-level-security policy, so a statement sees and
writes only the rows of the tenant its connection is scoped to (none when it is scoped to nobody). Ids
chosen by users (rule ids, request ids, target ids) are unique per tenant: the keys are (tenant_id, ...).
Event ids are per tenant too (``event_seq`` has a row per tenant): a tenant's WatchAlarms cursor and
event ids are dense in its own events and say nothing about another tenant's; so are rule revisions
(``rule_revision_counter``; the sequence ``rule_revision`` only tells the evaluator that some rule of
some tenant changed, and is never shown). The evaluator's connection is not a pool's: it sets the tenant
itself, per transaction (`as_tenant`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from ..runtime import tenancy
from ..runtime.db import Migration
from .notify import NOTIFY_MIGRATIONS
from .notify.schema import NOTIFY_UNSCOPED_TABLES

CHANNEL = "fabrica_alarm"
SCHEMA = "alarm"
#: From this many rows on, a statement inserts them with COPY.
_COPY_FROM = 20
#: The session lock of the one evaluating replica.
EVALUATOR_LOCK_KEY = zlib.crc32(b"fabrica.alarm.evaluator") - 2**31

_OWN_MIGRATIONS: list[Migration] = [
    Migration(1, "rules, alarms, events, evaluator cursor", """
        CREATE TABLE rules (
            id text PRIMARY KEY,
            revision bigint NOT NULL,
            definition bytea NOT NULL,
            enabled boolean NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now(),
            update_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE SEQUENCE rule_revision;
        CREATE TABLE create_requests (
            request_id text PRIMARY KEY,
            rule_id text NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE alarms (
            rule_id text NOT NULL,
            tag_id bigint NOT NULL,
            plc_id text NOT NULL DEFAULT '',
            tag_name text NOT NULL DEFAULT '',
            severity integer NOT NULL,
            state text NOT NULL DEFAULT 'NORMAL',
            value jsonb,
            message text NOT NULL DEFAULT '',
            raise_time timestamptz,
            state_time timestamptz,
            acknowledged_by text NOT NULL DEFAULT '',
            acknowledge_note text NOT NULL DEFAULT '',
            shelved_until timestamptz,
            revision bigint NOT NULL DEFAULT 0,
            eval_revision bigint NOT NULL DEFAULT 0,
            eval_state text,
            PRIMARY KEY (rule_id, tag_id)
        );
        CREATE INDEX alarms_not_normal ON alarms (rule_id, tag_id) WHERE state <> 'NORMAL';
        CREATE INDEX alarms_shelved ON alarms (shelved_until) WHERE shelved_until IS NOT NULL;
        CREATE TABLE event_seq (last bigint NOT NULL);
        INSERT INTO event_seq VALUES (0);
        CREATE TABLE events (
            id bigint PRIMARY KEY,
            type text NOT NULL,
            rule_id text NOT NULL,
            tag_id bigint NOT NULL,
            plc_id text NOT NULL,
            tag_name text NOT NULL,
            severity integer NOT NULL,
            previous_state text NOT NULL,
            state text NOT NULL,
            event_time timestamptz NOT NULL,
            value jsonb,
            message text NOT NULL,
            actor text NOT NULL,
            note text NOT NULL DEFAULT '',
            notify boolean NOT NULL,
            commit_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX events_time ON events (event_time);
        CREATE INDEX events_plc ON events (plc_id, id);
        CREATE INDEX events_tag ON events (tag_id, id);
        CREATE INDEX events_rule ON events (rule_id, id);
        CREATE TABLE evaluator_cursor (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            cursor bigint NOT NULL,
            update_time timestamptz NOT NULL DEFAULT now()
        );
        INSERT INTO evaluator_cursor (cursor) VALUES (0);
    """),
    Migration(2, "tenants: every table but the evaluator's cursor is a tenant's (row-level security); rule, "
              "request and event ids are unique per tenant, event ids and rule revisions numbered per tenant", f"""
        CREATE TABLE rule_revision_counter (
            tenant_id text NOT NULL PRIMARY KEY,
            last bigint NOT NULL
        );
        INSERT INTO rule_revision_counter (tenant_id, last)
            SELECT '{tenancy.DEFAULT}', CASE WHEN is_called THEN last_value ELSE 0 END FROM rule_revision;
        {tenancy.isolate_sql(SCHEMA, "rule_revision_counter")}
        {tenancy.isolate_sql(SCHEMA, "rules")}
        ALTER TABLE rules DROP CONSTRAINT rules_pkey, ADD PRIMARY KEY (tenant_id, id);
        {tenancy.isolate_sql(SCHEMA, "create_requests")}
        ALTER TABLE create_requests DROP CONSTRAINT create_requests_pkey, ADD PRIMARY KEY (tenant_id, request_id);
        {tenancy.isolate_sql(SCHEMA, "alarms")}
        ALTER TABLE alarms DROP CONSTRAINT alarms_pkey, ADD PRIMARY KEY (tenant_id, rule_id, tag_id);
        DROP INDEX alarms_not_normal;
        CREATE INDEX alarms_not_normal ON alarms (tenant_id, rule_id, tag_id) WHERE state <> 'NORMAL';
        {tenancy.isolate_sql(SCHEMA, "event_seq")}
        ALTER TABLE event_seq ADD PRIMARY KEY (tenant_id);
        {tenancy.isolate_sql(SCHEMA, "events")}
        ALTER TABLE events DROP CONSTRAINT events_pkey, ADD PRIMARY KEY (tenant_id, id);
        DROP INDEX events_time, events_plc, events_tag, events_rule;
        CREATE INDEX events_time ON events (tenant_id, event_time);
        CREATE INDEX events_plc ON events (tenant_id, plc_id, id);
        CREATE INDEX events_tag ON events (tenant_id, tag_id, id);
        CREATE INDEX events_rule ON events (tenant_id, rule_id, id);
    """),
]
#: Tables of the schema that belong to no tenant (no row-level security), and why: tests/alarm checks every
#: other table of the schema against pg_class (row-level security enabled and forced).
UNSCOPED_TABLES: dict[str, str] = {
    "evaluator_cursor": "installation-wide bookkeeping: the position of the one evaluation in ingest's feed of "
                        "every tenant's readings",
    "schema_migrations": "the schema's applied migrations (runtime/db.py)",
    **NOTIFY_UNSCOPED_TABLES,
}
#: The service's own migrations and those of notifications and forwarding (notify/schema.py, from 1001).
MIGRATIONS: list[Migration] = sorted([*_OWN_MIGRATIONS, *NOTIFY_MIGRATIONS], key=lambda m: m.version)


@dataclass(frozen=True)
class RuleRow:
    id: str
    revision: int
    definition: bytes
    enabled: bool
    create_time: datetime
    update_time: datetime
    tenant: str = tenancy.DEFAULT


@dataclass(frozen=True)
class AlarmRow:
    rule_id: str
    tag_id: int
    plc_id: str
    tag_name: str
    severity: int
    state: str
    value: Any
    message: str
    raise_time: datetime | None
    state_time: datetime | None
    acknowledged_by: str
    acknowledge_note: str
    shelved_until: datetime | None
    revision: int


@dataclass(frozen=True)
class EventRow:
    id: int
    type: str
    rule_id: str
    tag_id: int
    plc_id: str
    tag_name: str
    severity: int
    previous_state: str
    state: str
    event_time: datetime
    value: Any
    message: str
    actor: str
    note: str
    notify: bool


@dataclass(frozen=True)
class NewEvent:
    """An event to record (its id is assigned when it is inserted)."""

    type: str
    rule_id: str
    tag_id: int
    plc_id: str
    tag_name: str
    severity: int
    previous_state: str
    state: str
    event_time: datetime
    value: Any
    message: str
    actor: str
    note: str
    notify: bool


_ALARM_COLUMNS = ("rule_id, tag_id, plc_id, tag_name, severity, state, value, message, raise_time, state_time,"
                  " acknowledged_by, acknowledge_note, shelved_until, revision")
_EVENT_COLUMNS = ("id, type, rule_id, tag_id, plc_id, tag_name, severity, previous_state, state, event_time, value,"
                  " message, actor, note, notify")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _unjson(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _rule(r: asyncpg.Record) -> RuleRow:
    return RuleRow(r["id"], r["revision"], bytes(r["definition"]), r["enabled"], r["create_time"], r["update_time"],
                   r["tenant_id"])


def _alarm(r: asyncpg.Record) -> AlarmRow:
    return AlarmRow(r["rule_id"], r["tag_id"], r["plc_id"], r["tag_name"], r["severity"], r["state"],
                    _unjson(r["value"]), r["message"], r["raise_time"], r["state_time"], r["acknowledged_by"],
                    r["acknowledge_note"], r["shelved_until"], r["revision"])


def _event(r: asyncpg.Record) -> EventRow:
    return EventRow(r["id"], r["type"], r["rule_id"], r["tag_id"], r["plc_id"], r["tag_name"], r["severity"],
                    r["previous_state"], r["state"], r["event_time"], _unjson(r["value"]), r["message"], r["actor"],
                    r["note"], r["notify"])


# --- rules ------------------------------------------------------------------------------------------------


async def as_tenant(conn: asyncpg.Connection, tenant: str) -> None:
    """Scope the rest of `conn`'s transaction to `tenant` (a code, or ``*``): for the evaluator's own
    connection, which no pool scopes; a pool's connection is scoped by runtime/db.py on acquire."""
    if tenant != tenancy.ALL and not tenancy.is_code(tenant):
        raise ValueError(f"not a tenant code: {tenant!r}")
    await conn.execute(f"SELECT set_config('{tenancy.SETTING}', $1, true)", tenant)


async def next_rule_revision(conn: asyncpg.Connection) -> int:
    """The next revision of the connection's tenant's rules; also moves `rules_version` and
    `rules_changed_hint` (the evaluator's signals that some rule of some tenant changed)."""
    await conn.execute("SELECT nextval('rule_revision')")
    return await conn.fetchval(
        "INSERT INTO rule_revision_counter (last) VALUES (1)"
        " ON CONFLICT (tenant_id) DO UPDATE SET last = rule_revision_counter.last + 1 RETURNING last")


async def rule_of_request(conn: asyncpg.Connection, request_id: str) -> str | None:
    return await conn.fetchval("SELECT rule_id FROM create_requests WHERE request_id = $1", request_id)


async def insert_rule(conn: asyncpg.Connection, rule_id: str, revision: int, definition: bytes, enabled: bool,
                      request_id: str) -> RuleRow | None:
    """The new rule, or None when the id is taken."""
    row = await conn.fetchrow(
        "INSERT INTO rules (id, revision, definition, enabled) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (tenant_id, id) DO NOTHING RETURNING *", rule_id, revision, definition, enabled)
    if row is not None and request_id:
        await conn.execute("INSERT INTO create_requests (request_id, rule_id) VALUES ($1, $2)", request_id, rule_id)
    return None if row is None else _rule(row)


async def get_rule(conn: asyncpg.Connection | asyncpg.Pool, rule_id: str, *, for_update: bool = False
                   ) -> RuleRow | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT * FROM rules WHERE id = $1{lock}", rule_id)
    return None if row is None else _rule(row)


async def list_rules(conn: asyncpg.Connection | asyncpg.Pool, after: str | None, limit: int) -> list[RuleRow]:
    rows = await conn.fetch("SELECT * FROM rules WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2",
                            after, limit)
    return [_rule(r) for r in rows]


async def all_rules(conn: asyncpg.Connection) -> list[RuleRow]:
    """Every rule the connection sees (the evaluator's: of every tenant), each with its tenant."""
    return [_rule(r) for r in await conn.fetch("SELECT * FROM rules ORDER BY tenant_id, id")]


async def rule_revisions(conn: asyncpg.Connection, rule_ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
    """``{id: (revision, enabled)}`` of these rules, share-locked until the transaction ends (an update of
    one waits for the evaluator's transaction, and the evaluator's waits for the update's)."""
    rows = await conn.fetch("SELECT id, revision, enabled FROM rules WHERE id = ANY($1::text[]) ORDER BY id"
                            " FOR SHARE", list(rule_ids))
    return {r["id"]: (r["revision"], r["enabled"]) for r in rows}


async def update_rule(conn: asyncpg.Connection, rule_id: str, revision: int, definition: bytes,
                      enabled: bool) -> RuleRow:
    row = await conn.fetchrow("UPDATE rules SET revision = $2, definition = $3, enabled = $4, update_time = now()"
                              " WHERE id = $1 RETURNING *", rule_id, revision, definition, enabled)
    return _rule(row)


async def delete_rule(conn: asyncpg.Connection, rule_id: str) -> None:
    await conn.execute("DELETE FROM alarms WHERE rule_id = $1", rule_id)
    await conn.execute("DELETE FROM rules WHERE id = $1", rule_id)


async def reset_evaluation(conn: asyncpg.Connection, rule_id: str, severity: int) -> None:
    """Forget the evaluator's state of a rule's alarms (its condition changed), and take its new severity."""
    await conn.execute("UPDATE alarms SET eval_state = NULL, eval_revision = 0, severity = $2 WHERE rule_id = $1",
                       rule_id, severity)


async def carry_evaluation(conn: asyncpg.Connection, rule_id: str, old_revision: int, new_revision: int,
                           severity: int) -> None:
    """Keep the evaluator's states of a rule whose evaluation did not change (a new name, severity, message)."""
    await conn.execute("UPDATE alarms SET eval_revision = CASE WHEN eval_revision = $2 THEN $3 ELSE 0 END,"
                       " severity = $4 WHERE rule_id = $1", rule_id, old_revision, new_revision, severity)


async def rules_changed_hint(conn: asyncpg.Connection) -> int:
    """The revision sequence: it moves as soon as a rule is being created, changed or deleted, before that
    commits (sequences are not transactional), so the evaluator looks again. Only a hint: a version read
    this way may be ahead of what a snapshot holds; `rules_version` is the one to compare with."""
    return await conn.fetchval("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM rule_revision")


async def rules_version(conn: asyncpg.Connection) -> int:
    """The version of every tenant's rules as the transaction sees them (the sum of the per-tenant revision
    counters, which every rule change moves in its own transaction); on a connection scoped to ``*``."""
    return await conn.fetchval("SELECT coalesce(sum(last), 0) FROM rule_revision_counter")


# --- alarms -----------------------------------------------------------------------------------------------


async def get_alarm(conn: asyncpg.Connection | asyncpg.Pool, rule_id: str, tag_id: int, *,
                    for_update: bool = False) -> AlarmRow | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE rule_id = $1 AND tag_id = $2{lock}",
                              rule_id, tag_id)
    return None if row is None else _alarm(row)


async def lock_alarms(conn: asyncpg.Connection, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], AlarmRow]:
    """These alarms, locked, in key order (so two transactions never wait on each other in a cycle)."""
    keys = sorted(set(keys))
    if not keys:
        return {}
    rows = await conn.fetch(
        f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE (rule_id, tag_id) IN"
        " (SELECT * FROM unnest($1::text[], $2::bigint[])) ORDER BY rule_id, tag_id FOR UPDATE",
        [k[0] for k in keys], [k[1] for k in keys])
    return {(r["rule_id"], r["tag_id"]): _alarm(r) for r in rows}


async def alarms_of(conn: asyncpg.Connection, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], AlarmRow]:
    keys = sorted(set(keys))
    if not keys:
        return {}
    rows = await conn.fetch(
        f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE (rule_id, tag_id) IN"
        " (SELECT * FROM unnest($1::text[], $2::bigint[]))", [k[0] for k in keys], [k[1] for k in keys])
    return {(r["rule_id"], r["tag_id"]): _alarm(r) for r in rows}


async def not_normal_alarms(conn: asyncpg.Connection, rule_id: str) -> list[AlarmRow]:
    rows = await conn.fetch(f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE rule_id = $1 AND state <> 'NORMAL'"
                            " ORDER BY tag_id FOR UPDATE", rule_id)
    return [_alarm(r) for r in rows]


async def list_alarms(conn: asyncpg.Connection | asyncpg.Pool, *, after: tuple[str, int] | None, limit: int,
                      severities: Sequence[int], plc_id: str, states: Sequence[str], rule_id: str) -> list[AlarmRow]:
    rows = await conn.fetch(
        f"SELECT {_ALARM_COLUMNS} FROM alarms"
        " WHERE ($1::text IS NULL OR (rule_id, tag_id) > ($1, $2::bigint))"
        "   AND (cardinality($3::int[]) = 0 OR severity = ANY($3))"
        "   AND ($4 = '' OR plc_id = $4)"
        "   AND (state = ANY($5::text[]))"
        "   AND ($6 = '' OR rule_id = $6)"
        " ORDER BY rule_id, tag_id LIMIT $7",
        after[0] if after else None, after[1] if after else 0, list(severities), plc_id, list(states), rule_id, limit)
    return [_alarm(r) for r in rows]


#: The staging tables of the evaluator's bulk writes: session-local, emptied by every commit.
_STAGES = {
    "eval_states_in": "rule_id text, tag_id bigint, plc_id text, tag_name text, severity integer,"
                      " eval_revision bigint, eval_state text",
    "alarms_in": "rule_id text, tag_id bigint, plc_id text, tag_name text, severity integer, state text,"
                 " value jsonb, message text, raise_time timestamptz, state_time timestamptz,"
                 " acknowledged_by text, acknowledge_note text, shelved_until timestamptz, revision bigint",
    "events_in": "id bigint, type text, rule_id text, tag_id bigint, plc_id text, tag_name text, severity integer,"
                 " previous_state text, state text, event_time timestamptz, value jsonb, message text, actor text,"
                 " note text, notify boolean",
}


async def _stage(conn: asyncpg.Connection, table: str, rows: Sequence[tuple]) -> None:
    """`rows` into the temporary table `table` (created on first use, ON COMMIT DELETE ROWS), by binary COPY:
    for thousands of rows several times cheaper than unnest's arrays, which asyncpg checks element by
    element. Only inside a transaction."""
    await conn.execute(f"SET LOCAL client_min_messages = warning;"
                       f" CREATE TEMPORARY TABLE IF NOT EXISTS {table} ({_STAGES[table]}) ON COMMIT DELETE ROWS")
    await conn.copy_records_to_table(table, records=rows, schema_name="pg_temp")


async def save_states(conn: asyncpg.Connection, rows: Sequence[tuple[str, int, str, str, int, int, str]]) -> None:
    """Upsert evaluator states: (rule_id, tag_id, plc_id, tag_name, severity, eval_revision, state json), in one
    statement (many: staged by COPY first). Inside a transaction."""
    if not rows:
        return
    upsert = (" ON CONFLICT (tenant_id, rule_id, tag_id) DO UPDATE SET plc_id = excluded.plc_id,"
              "   tag_name = CASE WHEN excluded.tag_name = '' THEN alarms.tag_name ELSE excluded.tag_name END,"
              "   eval_revision = excluded.eval_revision, eval_state = excluded.eval_state")
    columns = "rule_id, tag_id, plc_id, tag_name, severity, eval_revision, eval_state"
    if len(rows) >= _COPY_FROM:
        await _stage(conn, "eval_states_in", rows)
        await conn.execute(f"INSERT INTO alarms ({columns}) SELECT {columns} FROM pg_temp.eval_states_in{upsert}")
        return
    await conn.execute(
        f"INSERT INTO alarms ({columns})"
        " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::bigint[],"
        "                      $7::text[])" + upsert,
        *[list(col) for col in zip(*rows, strict=True)])


async def load_states(conn: asyncpg.Connection) -> list[tuple[str, str, int, Any]]:
    """(tenant, rule_id, tag_id, state) of every alarm the connection sees whose evaluator state belongs to its
    rule's current revision."""
    rows = await conn.fetch("SELECT a.tenant_id, a.rule_id, a.tag_id, a.eval_state FROM alarms a"
                            " JOIN rules r ON r.tenant_id = a.tenant_id AND r.id = a.rule_id"
                            " WHERE a.eval_state IS NOT NULL AND a.eval_revision = r.revision")
    return [(r["tenant_id"], r["rule_id"], r["tag_id"], json.loads(r["eval_state"])) for r in rows]


async def set_alarm(conn: asyncpg.Connection, a: AlarmRow) -> None:
    await conn.execute(
        "UPDATE alarms SET plc_id = $3, tag_name = $4, severity = $5, state = $6, value = $7::jsonb, message = $8,"
        " raise_time = $9, state_time = $10, acknowledged_by = $11, acknowledge_note = $12, shelved_until = $13,"
        " revision = $14 WHERE rule_id = $1 AND tag_id = $2",
        a.rule_id, a.tag_id, a.plc_id, a.tag_name, a.severity, a.state, _json(a.value), a.message, a.raise_time,
        a.state_time, a.acknowledged_by, a.acknowledge_note, a.shelved_until, a.revision)


async def set_alarms(conn: asyncpg.Connection, alarms: Sequence[AlarmRow]) -> None:
    """`set_alarm` for many, in one statement (many: staged by COPY first). Inside a transaction."""
    if not alarms:
        return
    rows = [(a.rule_id, a.tag_id, a.plc_id, a.tag_name, a.severity, a.state, _json(a.value), a.message,
             a.raise_time, a.state_time, a.acknowledged_by, a.acknowledge_note, a.shelved_until, a.revision)
            for a in alarms]
    assign = ("UPDATE alarms a SET plc_id = u.plc_id, tag_name = u.tag_name, severity = u.severity, state = u.state,"
              " value = u.value, message = u.message, raise_time = u.raise_time, state_time = u.state_time,"
              " acknowledged_by = u.acknowledged_by, acknowledge_note = u.acknowledge_note,"
              " shelved_until = u.shelved_until, revision = u.revision")
    if len(rows) >= _COPY_FROM:
        await _stage(conn, "alarms_in", rows)
        await conn.execute(f"{assign} FROM pg_temp.alarms_in u WHERE a.rule_id = u.rule_id AND a.tag_id = u.tag_id")
        return
    cols = list(zip(*rows, strict=True))
    await conn.execute(
        f"{assign}"
        " FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::text[], $7::jsonb[],"
        "            $8::text[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[],"
        "            $13::timestamptz[], $14::bigint[])"
        "   AS u(rule_id, tag_id, plc_id, tag_name, severity, state, value, message, raise_time, state_time,"
        "        acknowledged_by, acknowledge_note, shelved_until, revision)"
        " WHERE a.rule_id = u.rule_id AND a.tag_id = u.tag_id", *[list(c) for c in cols])


async def ensure_alarm(conn: asyncpg.Connection, rule_id: str, tag_id: int, plc_id: str, severity: int) -> None:
    await conn.execute("INSERT INTO alarms (rule_id, tag_id, plc_id, severity) VALUES ($1, $2, $3, $4)"
                       " ON CONFLICT DO NOTHING", rule_id, tag_id, plc_id, severity)


async def tenants_shelving_due(conn: asyncpg.Connection, now: datetime) -> list[str]:
    """The tenants with alarms whose shelving has run out by `now` (of those the connection sees)."""
    rows = await conn.fetch("SELECT DISTINCT tenant_id FROM alarms WHERE shelved_until <= $1 ORDER BY tenant_id", now)
    return [r["tenant_id"] for r in rows]


async def shelving_due(conn: asyncpg.Connection, now: datetime) -> list[AlarmRow]:
    rows = await conn.fetch(f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE shelved_until <= $1"
                            " ORDER BY rule_id, tag_id FOR UPDATE SKIP LOCKED", now)
    return [_alarm(r) for r in rows]


# --- events -----------------------------------------------------------------------------------------------


async def insert_events(conn: asyncpg.Connection, events: Sequence[NewEvent]) -> list[EventRow]:
    """Record events of the connection's tenant with its next event ids (taken under the tenant's event_seq row
    lock, so a tenant's ids follow its commit order)."""
    if not events:
        return []
    last = await conn.fetchval("INSERT INTO event_seq (last) VALUES ($1) ON CONFLICT (tenant_id)"
                               " DO UPDATE SET last = event_seq.last + $1 RETURNING last", len(events))
    first = last - len(events) + 1
    ids = range(first, last + 1)
    rows = [(i, e.type, e.rule_id, e.tag_id, e.plc_id, e.tag_name, e.severity, e.previous_state, e.state,
             e.event_time, _json(e.value), e.message, e.actor, e.note, e.notify) for i, e in zip(ids, events,
                                                                                                    strict=True)]
    if len(rows) < _COPY_FROM:
        await conn.executemany(
            "INSERT INTO events (id, type, rule_id, tag_id, plc_id, tag_name, severity, previous_state, state,"
            " event_time, value, message, actor, note, notify)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13, $14, $15)", rows)
    else:  # many (a burst, a replay): binary COPY (several times faster than unnest's arrays) into a staging
        # table, then one INSERT: Postgres refuses COPY FROM into a table under row-level security
        await _stage(conn, "events_in", rows)
        await conn.execute(f"INSERT INTO events ({_EVENT_COLUMNS}) SELECT {_EVENT_COLUMNS} FROM pg_temp.events_in")
    # The payload names the tenant: a WatchAlarms of another tenant is not woken (runtime/notify.py TenantListener).
    await conn.execute("SELECT pg_notify($1, session_tenant())", CHANNEL)
    return [EventRow(*r[:10], e.value, *r[11:]) for r, e in zip(rows, events, strict=True)]


async def list_events(conn: asyncpg.Connection | asyncpg.Pool, *, before_id: int | None, limit: int,
                      start: datetime | None, end: datetime | None, plc_id: str, tag_id: int,
                      severities: Sequence[int], rule_id: str) -> list[EventRow]:
    rows = await conn.fetch(
        f"SELECT {_EVENT_COLUMNS} FROM events"
        " WHERE ($1::bigint IS NULL OR id < $1)"
        "   AND ($2::timestamptz IS NULL OR event_time >= $2) AND ($3::timestamptz IS NULL OR event_time < $3)"
        "   AND ($4 = '' OR plc_id = $4) AND ($5::bigint = 0 OR tag_id = $5)"
        "   AND (cardinality($6::int[]) = 0 OR severity = ANY($6)) AND ($7 = '' OR rule_id = $7)"
        " ORDER BY id DESC LIMIT $8",
        before_id, start, end, plc_id, tag_id, list(severities), rule_id, limit)
    return [_event(r) for r in rows]


async def events_after(conn: asyncpg.Connection | asyncpg.Pool, after_id: int, limit: int) -> list[EventRow]:
    rows = await conn.fetch(f"SELECT {_EVENT_COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2",
                            after_id, limit)
    return [_event(r) for r in rows]


async def last_event_id(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """The last event id of the connection's tenant (0 before its first event)."""
    return await conn.fetchval("SELECT coalesce((SELECT last FROM event_seq), 0)")


# --- the evaluator's cursor -------------------------------------------------------------------------------


async def try_lock_evaluator(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval("SELECT pg_try_advisory_lock($1)", EVALUATOR_LOCK_KEY)


async def evaluator_cursor(conn: asyncpg.Connection | asyncpg.Pool, *, for_update: bool = False) -> int:
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchval(f"SELECT cursor FROM evaluator_cursor{lock}")


async def save_evaluator_cursor(conn: asyncpg.Connection, cursor: int) -> None:
    await conn.execute("UPDATE evaluator_cursor SET cursor = $1, update_time = now()", cursor)
