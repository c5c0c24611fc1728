"""The alarm service's transactions: rules, operator actions, and the evaluator's commits.

Every change of an alarm happens in one transaction that locks the alarm's row, applies the lifecycle
(lifecycle.py), and records the event, whose `notify` flag puts it in the notification outbox. The
evaluator's transaction (`EvaluationStore.commit`) also stores the evaluator states it touched and moves the
readings cursor: a message of readings is either wholly evaluated, with its events and the cursor past it,
or not at all, so a replay after any crash neither repeats nor misses a transition.

Lock order, for every transaction: rule rows, then alarm rows (by rule id, tag id), then ``event_seq``.

Tenants: `AlarmService` runs in the request's tenant (its pool's connections are scoped to it, and row-level
security does the rest). The evaluator's transaction covers every tenant whose readings a group of messages
carried: on its own connection it scopes itself to each tenant in turn (store.as_tenant, in tenant order,
each tenant's part in the lock order above), so each tenant's states, alarms, events and outbox rows are
written as that tenant, and the cursor (no tenant's) moves in the same transaction. A rule changed in any of
them rolls all of it back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

import asyncpg

from ..runtime import principal, tenancy
from ..runtime.errors import Aborted, AlreadyExists, NotFound
from . import lifecycle as lc
from . import store
from .evaluator import NS, InstanceState, Key, Rule, Transition
from .store import AlarmRow, EventRow, NewEvent, RuleRow

log = logging.getLogger(__name__)

SYSTEM = "system"


class Outbox(Protocol):
    async def add(self, conn: asyncpg.Connection, events: Sequence[EventRow]) -> None:
        """Queue the notifications of `events` (those with `notify`) in the caller's transaction."""


class NoOutbox:
    async def add(self, conn: asyncpg.Connection, events: Sequence[EventRow]) -> None:
        return None


async def _record(conn: asyncpg.Connection, outbox: Outbox, events: Sequence[NewEvent]) -> list[EventRow]:
    """Insert events and queue their notifications, in the caller's transaction."""
    rows = await store.insert_events(conn, events)
    await outbox.add(conn, rows)
    return rows


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // NS, UTC) + timedelta(microseconds=(ns % NS) // 1000)


def _etag(a: AlarmRow) -> str:
    return f"a{a.revision}"


def _event(a: AlarmRow, type_: str, new_state: str, when: datetime, value: object, message: str, actor: str,
           note: str = "", notify: bool | None = None) -> NewEvent:
    shelved = a.shelved_until is not None
    return NewEvent(type_, a.rule_id, a.tag_id, a.plc_id, a.tag_name, a.severity, a.state, new_state, when, value,
                    message, actor, note, lc.is_annunciated(type_, shelved) if notify is None else notify)


async def _suppress(conn: asyncpg.Connection, outbox: Outbox, rule_id: str, why: str) -> list[EventRow]:
    """Every alarm of the rule that is not normal goes back to normal, with a SUPPRESSED event each."""
    events, now = [], datetime.now(UTC)
    for a in await store.not_normal_alarms(conn, rule_id):
        events.append(_event(a, lc.SUPPRESSED, lc.NORMAL, now, a.value, a.message, principal.actor(), why))
        await store.set_alarm(conn, replace(a, state=lc.NORMAL, state_time=now, revision=a.revision + 1))
    return await _record(conn, outbox, events)


class AlarmService:
    """Rules and operator actions, on the service's pool; `outbox` queues the notifications of their events."""

    def __init__(self, pool: asyncpg.Pool, outbox: Outbox | None = None):
        self.pool = pool
        self.outbox = outbox or NoOutbox()

    async def create_rule(self, rule_id: str, definition: bytes, enabled: bool, request_id: str) -> RuleRow:
        async with self.pool.acquire() as conn, conn.transaction():
            if request_id:
                earlier = await store.rule_of_request(conn, request_id)
                if earlier is not None:
                    row = await store.get_rule(conn, earlier)
                    if row is None:
                        raise NotFound(f"the rule created by request {request_id} ({earlier}) has been deleted since")
                    return row
            revision = await store.next_rule_revision(conn)
            row = await store.insert_rule(conn, rule_id, revision, definition, enabled, request_id)
            if row is None:
                raise AlreadyExists(f"a rule with id {rule_id!r} exists", metadata={"rule_id": rule_id})
            await conn.execute("SELECT pg_notify($1, session_tenant())", store.CHANNEL)
            return row

    async def get_rule(self, rule_id: str) -> RuleRow:
        row = await store.get_rule(self.pool, rule_id)
        if row is None:
            raise NotFound(f"no rule {rule_id!r}", metadata={"rule_id": rule_id})
        return row

    async def list_rules(self, after: str | None, limit: int) -> list[RuleRow]:
        return await store.list_rules(self.pool, after, limit)

    async def update_rule(self, rule_id: str, etag: str,
                          merge: Callable[[RuleRow], Awaitable[tuple[bytes, bool, int, bool]]]) -> RuleRow:
        """Lock the rule, `merge` it (→ definition, enabled, severity, whether its evaluation restarts), and
        store it. Disabling it or restarting its evaluation suppresses its alarms that are not normal."""
        async with self.pool.acquire() as conn, conn.transaction():
            current = await store.get_rule(conn, rule_id, for_update=True)
            if current is None:
                raise NotFound(f"no rule {rule_id!r}", metadata={"rule_id": rule_id})
            if etag and etag != f"r{current.revision}":
                raise Aborted(f"rule {rule_id!r} changed since it was read (etag {etag}, now r{current.revision})",
                              metadata={"rule_id": rule_id})
            definition, enabled, severity, restart = await merge(current)
            revision = await store.next_rule_revision(conn)
            row = await store.update_rule(conn, rule_id, revision, definition, enabled)
            restart = restart or enabled != current.enabled
            if restart:
                await _suppress(conn, self.outbox, rule_id, "rule disabled" if not enabled else "rule changed")
                await store.reset_evaluation(conn, rule_id, severity)
            else:  # the same evaluation: the evaluator's states carry over to the new revision
                await store.carry_evaluation(conn, rule_id, current.revision, revision, severity)
            await conn.execute("SELECT pg_notify($1, session_tenant())", store.CHANNEL)
            return row

    async def delete_rule(self, rule_id: str, etag: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            current = await store.get_rule(conn, rule_id, for_update=True)
            if current is None:
                raise NotFound(f"no rule {rule_id!r}", metadata={"rule_id": rule_id})
            if etag and etag != f"r{current.revision}":
                raise Aborted(f"rule {rule_id!r} changed since it was read (etag {etag}, now r{current.revision})",
                              metadata={"rule_id": rule_id})
            await _suppress(conn, self.outbox, rule_id, "rule deleted")
            await store.next_rule_revision(conn)  # the evaluator notices the change by the revision sequence
            await store.delete_rule(conn, rule_id)
            await conn.execute("SELECT pg_notify($1, session_tenant())", store.CHANNEL)

    async def _act(self, rule_id: str, tag_id: int, etag: str,
                   change: Callable[[AlarmRow, datetime], tuple[AlarmRow, NewEvent]]) -> tuple[AlarmRow, EventRow]:
        async with self.pool.acquire() as conn, conn.transaction():
            a = await store.get_alarm(conn, rule_id, tag_id, for_update=True)
            if a is None:
                raise NotFound(f"no alarm of rule {rule_id!r} on tag {tag_id}",
                               metadata={"rule_id": rule_id, "tag_id": str(tag_id)})
            if etag and etag != _etag(a):
                raise Aborted(f"alarm {rule_id}/{tag_id} changed since it was read (etag {etag}, now {_etag(a)})",
                              metadata={"rule_id": rule_id, "tag_id": str(tag_id)})
            updated, event = change(a, datetime.now(UTC))
            updated = replace(updated, revision=a.revision + 1)
            await store.set_alarm(conn, updated)
            (row,) = await _record(conn, self.outbox, [event])
            return updated, row

    async def acknowledge(self, rule_id: str, tag_id: int, note: str, etag: str) -> tuple[AlarmRow, EventRow]:
        who = principal.actor()

        def change(a: AlarmRow, now: datetime) -> tuple[AlarmRow, NewEvent]:
            new_state = lc.on_acknowledge(a.state, f"alarms/{rule_id}/{tag_id}")
            event = _event(a, lc.ACKNOWLEDGED, new_state, now, a.value, a.message, who, note)
            return replace(a, state=new_state, state_time=now, acknowledged_by=who, acknowledge_note=note), event

        return await self._act(rule_id, tag_id, etag, change)

    async def shelve(self, rule_id: str, tag_id: int, seconds: float, note: str,
                     etag: str) -> tuple[AlarmRow, EventRow]:
        who = principal.actor()

        def change(a: AlarmRow, now: datetime) -> tuple[AlarmRow, NewEvent]:
            until = now + timedelta(seconds=seconds)
            event = _event(a, lc.SHELVED, a.state, now, a.value, a.message, who, note)
            return replace(a, shelved_until=until), event

        return await self._act(rule_id, tag_id, etag, change)

    async def list_alarms(self, *, after: tuple[str, int] | None, limit: int, severities: Sequence[int],
                          plc_id: str, states: Sequence[str], rule_id: str) -> list[AlarmRow]:
        return await store.list_alarms(self.pool, after=after, limit=limit, severities=severities, plc_id=plc_id,
                                       states=states, rule_id=rule_id)

    async def last_event_id(self) -> int:
        return await store.last_event_id(self.pool)

    async def snapshot(self, states: Sequence[str], limit: int) -> tuple[int, list[AlarmRow]]:
        """The last event id and the alarms in `states`, read in one snapshot (they agree)."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            last = await store.last_event_id(conn)
            alarms = await store.list_alarms(conn, after=None, limit=limit, severities=(), plc_id="", states=states,
                                             rule_id="")
        return last, alarms

    async def changes_after(self, cursor: int, limit: int) -> list[tuple[EventRow, AlarmRow]]:
        """Events after `cursor`, each with its alarm as it is now (as the event left it, for a deleted rule)."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            events = await store.events_after(conn, cursor, limit)
            alarms = await store.alarms_of(conn, {(e.rule_id, e.tag_id) for e in events})
        return [(e, alarms.get((e.rule_id, e.tag_id)) or AlarmRow(
            e.rule_id, e.tag_id, e.plc_id, e.tag_name, e.severity, e.state, e.value, e.message, None, e.event_time,
            "", "", None, 0)) for e in events]

    async def list_events(self, **filters: object) -> list[EventRow]:
        return await store.list_events(self.pool, **filters)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CommitResult:
    events: list[EventRow]
    #: False when a rule changed under the evaluator: nothing was written; reload and evaluate again.
    committed: bool = True


class EvaluationStore:
    """The evaluator's reads and its one transaction per message of readings (or tick), on its own
    connection (the one holding the evaluator lock)."""

    def __init__(self, outbox: Outbox | None = None):
        self.outbox = outbox or NoOutbox()

    async def load(self, conn: asyncpg.Connection, decode: Callable[[RuleRow], Rule]
                   ) -> tuple[list[Rule], dict[tuple[str, str, int], InstanceState], int, int]:
        """Every tenant's rules, the evaluator states stored for their current revisions (by tenant, rule id,
        tag id), the cursor, and the version of those rules (store.rules_version), all of one snapshot."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await store.as_tenant(conn, tenancy.ALL)
            rules = [decode(r) for r in await store.all_rules(conn)]
            states = {(tenant, rule_id, tag_id): InstanceState.from_json(data)
                      for tenant, rule_id, tag_id, data in await store.load_states(conn)}
            cursor = await store.evaluator_cursor(conn)
            version = await store.rules_version(conn)
        return rules, states, cursor, version

    async def commit(self, conn: asyncpg.Connection, *, rules: Mapping[str, Mapping[str, Rule]], cursor: int | None,
                     transitions: Sequence[Transition], states: Mapping[str, Mapping[Key, InstanceState]],
                     now: datetime | None = None, rules_version: int | None = None) -> CommitResult:
        """Record `transitions` (each of its tenant), store `states` and move the cursor to `cursor` (None: leave
        it), in one transaction; or write nothing (committed=False) if the rules have changed since they were
        loaded: a rule used, or with `rules_version` (load's) any rule, a new one included. `rules` and
        `states` are per tenant; `now` (a tick) also ends the shelving of every tenant's alarms whose
        shelving has run out."""
        of_tenant: dict[str, list[Transition]] = {}
        for t in transitions:
            of_tenant.setdefault(t.tenant, []).append(t)
        try:
            async with conn.transaction():
                if rules_version is not None:
                    await store.as_tenant(conn, tenancy.ALL)
                    if await store.rules_version(conn) != rules_version:
                        raise _RuleChanged()  # e.g. a rule committed after the load's hint had moved past it
                if cursor is not None:
                    stored = await store.evaluator_cursor(conn, for_update=True)
                    if cursor < stored:  # another evaluator got further: ours is stale (impossible under the lock)
                        log.warning("evaluator cursor %d is behind the stored %d; reloading", cursor, stored)
                        raise _RuleChanged()
                tenants = {t for t, s in states.items() if s} | set(of_tenant)
                if now is not None:
                    await store.as_tenant(conn, tenancy.ALL)
                    tenants.update(await store.tenants_shelving_due(conn, now))
                rows: list[EventRow] = []
                for tenant in sorted(tenants):
                    await store.as_tenant(conn, tenant)
                    rows += await self._commit_tenant(conn, rules.get(tenant, {}), of_tenant.get(tenant, ()),
                                                      states.get(tenant, {}), now)
                if cursor is not None:
                    await store.save_evaluator_cursor(conn, cursor)
        except _RuleChanged:
            return CommitResult([], committed=False)
        return CommitResult(rows)

    async def _commit_tenant(self, conn: asyncpg.Connection, rules: Mapping[str, Rule],
                             transitions: Sequence[Transition], states: Mapping[Key, InstanceState],
                             now: datetime | None) -> list[EventRow]:
        """One tenant's part of `commit`, on a connection scoped to the tenant; _RuleChanged if a rule used has
        changed since it was loaded."""
        from .convert import stored_value  # noqa: PLC0415 - the stored form of values

        used = sorted({k[0] for k in states} | {t.rule_id for t in transitions})
        current = await store.rule_revisions(conn, used)
        for rule_id in used:
            rule = rules[rule_id]
            if current.get(rule_id) != (rule.revision, True):
                raise _RuleChanged()
        await store.save_states(conn, [
            (k[0], k[1], s.plc_id, s.tag_name, rules[k[0]].severity, rules[k[0]].revision,
             _json_state(s)) for k, s in sorted(states.items())])
        events: list[NewEvent] = []
        alarms = await store.lock_alarms(conn, [(t.rule_id, t.tag_id) for t in transitions])
        # The alarms as the transitions leave them, as mutable field dicts: one alarm often has several
        # transitions in a commit (a backlog), and an AlarmRow is then built once, not per transition.
        fields: dict[Key, dict] = {}
        changed: dict[Key, None] = {}
        for t in transitions:
            key = (t.rule_id, t.tag_id)
            a = fields.get(key)
            if a is None:
                row = alarms.get(key)
                if row is None:  # a transition of an instance whose state was not passed: create its row
                    await store.ensure_alarm(conn, t.rule_id, t.tag_id, t.plc_id, rules[t.rule_id].severity)
                    row = alarms[key] = (await store.lock_alarms(conn, [key]))[key]
                a = fields[key] = dict(vars(row))
            previous = a["state"]
            new_state = lc.on_raise(previous) if t.raised else lc.on_clear(previous)
            if new_state is None:
                continue
            when = _dt(t.time_ns)
            value = stored_value(t.value)
            a["plc_id"] = t.plc_id
            if t.tag_name:
                a["tag_name"] = t.tag_name
            type_ = lc.RAISED if t.raised else lc.CLEARED
            events.append(NewEvent(type_, t.rule_id, t.tag_id, t.plc_id, a["tag_name"], a["severity"], previous,
                                   new_state, when, value, t.message, SYSTEM, "",
                                   lc.is_annunciated(type_, a["shelved_until"] is not None)))
            a["state"], a["state_time"], a["value"], a["message"] = new_state, when, value, t.message
            a["revision"] += 1
            if t.raised:
                a["raise_time"], a["acknowledged_by"], a["acknowledge_note"] = when, "", ""
            changed[key] = None
        for key in changed:
            alarms[key] = AlarmRow(**fields[key])
        await store.set_alarms(conn, [alarms[k] for k in changed])
        events += await self._unshelve(conn, alarms, now)
        return await _record(conn, self.outbox, events)

    async def _unshelve(self, conn: asyncpg.Connection, locked: dict[Key, AlarmRow],
                        now: datetime | None) -> list[NewEvent]:
        """UNSHELVED events for alarms whose shelving has run out by `now` (None: not this time)."""
        if now is None:
            return []
        out = []
        for a in await store.shelving_due(conn, now):
            a = locked.get((a.rule_id, a.tag_id), a)
            if a.shelved_until is None or a.shelved_until > now:
                continue
            out.append(_event(a, lc.UNSHELVED, a.state, now, a.value, a.message, SYSTEM, notify=True))
            await store.set_alarm(conn, replace(a, shelved_until=None, revision=a.revision + 1))
        return out


class _RuleChanged(Exception):
    """A rule the evaluation used changed since it was loaded: the evaluator's transaction rolls back."""


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _json_state(state: InstanceState) -> str:
    return _dumps(state.to_json())
