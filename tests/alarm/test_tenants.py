"""Tenants in the alarm service (issue 15): two tenants with the same rule ids, tag ids and target ids.

The alarm service evaluates a feed of every tenant's readings (here a feed of our own, as ingest's
installation-wide WatchCommittedReadings gives it: each reading of a tenant); each tenant sees only its own
rules, alarms, events and targets; a reading of one tenant raises that tenant's alarm only; the WatchAlarms
of one tenant is not even woken by another's change; a tenant's webhooks never hear of another's alarms; and
every scoped table of the schema returns nothing to SQL that names no tenant (row-level security, forced).
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import grpc
import pytest
from fabrica.alarm.v1 import alarm_pb2, notify_pb2
from fabrica.alarm.v1 import alarm_service_pb2 as pb

from fabrica_svc.alarm import store
from fabrica_svc.alarm.store import MIGRATIONS, UNSCOPED_TABLES
from fabrica_svc.runtime import tenancy
from fabrica_svc.runtime.db import apply_migrations, create_pool
from in_process import Server, Servers, settings_for
from procs import wait_for
from webhook_receiver import Receiver

from .support import TenantFeed, gt_rule, seconds

S = alarm_pb2
A, B = (("x-fabrica-tenant", "acme"),), (("x-fabrica-tenant", "bolt"),)


@pytest.fixture
async def alarm(database_url: str, servers: Servers) -> tuple[Server, TenantFeed]:
    feed = TenantFeed()
    server = await servers.start("alarm", settings_for("alarm", database_url=database_url), source=feed.source)
    return server, feed


async def alarms(alarm: Server, metadata: tuple) -> list[alarm_pb2.Alarm]:
    return list((await alarm.stub.ListAlarms(pb.ListAlarmsRequest(include_normal=True), metadata=metadata)).alarms)


async def events(alarm: Server, metadata: tuple) -> list[alarm_pb2.AlarmEvent]:
    return list((await alarm.stub.ListAlarmEvents(pb.ListAlarmEventsRequest(), metadata=metadata)).events)


async def state(alarm: Server, metadata: tuple, rule_id: str = "hot", tag_id: int = 1) -> int:
    return next((a.state for a in await alarms(alarm, metadata) if a.rule_id == rule_id and a.tag_id == tag_id),
                S.ALARM_STATE_UNSPECIFIED)


async def test_same_rule_and_tag_ids_in_two_tenants_evaluate_and_list_apart(alarm: tuple[Server, TenantFeed]) -> None:
    server, feed = alarm
    stub = server.stub
    with Receiver() as receiver:
        # The same ids in both tenants: a rule "hot" on tag 1 of plc-1 (different thresholds), a target "ops".
        for metadata, threshold in ((A, 80.0), (B, 50.0)):
            await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, threshold),
                                                                 request_id="0000-abcd"), metadata=metadata)
        for metadata, path in ((A, "/acme"), (B, "/bolt")):
            await stub.CreateNotificationTarget(pb.CreateNotificationTargetRequest(target=notify_pb2.NotificationTarget(
                id="ops", url=receiver.url(path), secret="s" * 32, enabled=True)), metadata=metadata)
        a_rule = (await stub.GetAlarmRule(pb.GetAlarmRuleRequest(id="hot"), metadata=A)).rule
        b_rule = (await stub.GetAlarmRule(pb.GetAlarmRuleRequest(id="hot"), metadata=B)).rule
        assert a_rule.condition.threshold.number == 80 and b_rule.condition.threshold.number == 50
        # Revisions are numbered per tenant: B's rule did not move A's.
        assert a_rule.etag == b_rule.etag == "r1"
        # The request id is a tenant's too: B's "create-hot" did not answer with A's rule.
        again = await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, 1),
                                                                     request_id="0000-abcd"), metadata=B)
        assert again.rule.condition.threshold.number == 50

        b_watch = stub.WatchAlarms(pb.WatchAlarmsRequest(), metadata=B)
        b_seen: list[pb.WatchAlarmsResponse] = []

        async def watch_b() -> None:
            async for response in b_watch:
                b_seen.append(response)
        b_reader = asyncio.create_task(watch_b())
        await wait_for(lambda: b_seen, timeout=10, what="B's snapshot")
        (first,) = b_seen
        assert first.HasField("snapshot") and not first.snapshot.alarms and first.cursor == 0
        listener = server.app.listener
        await wait_for(lambda: listener.waiting == 1, timeout=10, what="B's watch waiting")
        woken, waits_woken = listener.tenant_notifications, listener.woken

        # A reading of A's tag 1 above both thresholds: A's alarm only.
        await feed.send("acme", 90)
        async def a_raised() -> bool:
            return await state(server, A) == S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED
        await wait_for(a_raised, timeout=15, what="A's alarm raised")
        assert await alarms(server, B) == []
        assert await events(server, B) == []
        (a_event,) = await events(server, A)
        assert a_event.id == 1 and a_event.type == S.ALARM_EVENT_TYPE_RAISED and a_event.value.double_value == 90
        # B's watch got nothing, and was not even woken: the notification named A (runtime/notify.py TenantListener).
        await wait_for(lambda: server.app.listener.tenant_notifications > woken, timeout=10,
                       what="the listener heard A's event")
        await asyncio.sleep(1.0)
        assert b_seen == [first]
        assert listener.woken == waits_woken  # (its waits ended by their poll timeout only, which counts none)
        # A's webhook is called, B's never.
        await wait_for(lambda: len(receiver.at("/acme")) == 1, timeout=15, what="A's webhook")
        body = json.loads(receiver.at("/acme")[0].body)
        assert body["event_type"] == "alarm.raised" and body["idempotency_key"] == "alarm-event-1"

        # Now B's reading (above B's 50, below A's 80): B's alarm; B's watch sees it with B's first event id.
        await feed.send("bolt", 60)
        await wait_for(lambda: len(b_seen) == 2, timeout=10, what="B's change")
        b_watch.cancel()
        b_reader.cancel()
        change = b_seen[1]
        assert change.change.event.type == S.ALARM_EVENT_TYPE_RAISED and change.cursor == 1
        assert change.change.alarm.rule_id == "hot" and change.change.alarm.value.double_value == 60
        await wait_for(lambda: len(receiver.at("/bolt")) == 1, timeout=15, what="B's webhook")
        assert json.loads(receiver.at("/bolt")[0].body)["idempotency_key"] == "alarm-event-1"
        assert await state(server, A) == S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED  # A's alarm untouched by B's 60
        (a_alarm,) = await alarms(server, A)
        assert a_alarm.value.double_value == 90
        await asyncio.sleep(0.5)
        assert len(receiver.at("/acme")) == 1 and len(receiver.at("/bolt")) == 1

    # Shelving runs out by the evaluator's clock, which unshelves every tenant's alarms, each in its tenant.
    await stub.ShelveAlarm(pb.ShelveAlarmRequest(rule_id="hot", tag_id=1, duration=seconds(1)), metadata=B)

    async def unshelved() -> bool:
        return (await events(server, B))[0].type == S.ALARM_EVENT_TYPE_UNSHELVED  # newest first
    await wait_for(unshelved, timeout=15, what="B's alarm unshelved")
    assert [e.id for e in await events(server, B)] == [3, 2, 1]  # B's own numbering: raised, shelved, unshelved
    assert [e.type for e in await events(server, A)] == [S.ALARM_EVENT_TYPE_RAISED]

    # Acknowledging, updating and deleting in one tenant leave the other's alone.
    await stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(rule_id="hot", tag_id=1), metadata=A)
    assert await state(server, A) == S.ALARM_STATE_ACTIVE_ACKNOWLEDGED
    assert await state(server, B) == S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED
    await stub.DeleteAlarmRule(pb.DeleteAlarmRuleRequest(id="hot"), metadata=B)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAlarmRule(pb.GetAlarmRuleRequest(id="hot"), metadata=B)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await stub.GetAlarmRule(pb.GetAlarmRuleRequest(id="hot"), metadata=A)).rule.id == "hot"
    assert [r.id for r in (await stub.ListAlarmRules(pb.ListAlarmRulesRequest(), metadata=A)).rules] == ["hot"]
    assert [t.id for t in (await stub.ListNotificationTargets(pb.ListNotificationTargetsRequest(),
                                                              metadata=B)).targets] == ["ops"]
    # A tenant that has nothing sees nothing (and another tenant's ids are NOT_FOUND to it).
    c = (("x-fabrica-tenant", "cobalt"),)
    assert await alarms(server, c) == [] and await events(server, c) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.AcknowledgeAlarm(pb.AcknowledgeAlarmRequest(rule_id="hot", tag_id=1), metadata=c)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetNotificationTarget(pb.GetNotificationTargetRequest(id="ops"), metadata=c)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_installation_wide_call_must_name_its_tenant(alarm: tuple[Server, TenantFeed]) -> None:
    server, _ = alarm
    everyone = (("x-fabrica-tenant", "*"),)
    for call in (server.stub.ListAlarms(pb.ListAlarmsRequest(), metadata=everyone),
                 server.stub.ListAlarmRules(pb.ListAlarmRulesRequest(), metadata=everyone)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await server.stub.WatchAlarms(pb.WatchAlarmsRequest(), metadata=everyone).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_every_alarm_table_is_under_forced_row_level_security_and_unscoped_sql_sees_nothing(
        alarm: tuple[Server, TenantFeed], database_url: str) -> None:
    server, feed = alarm
    stub = server.stub
    # Rows in every table: a rule (by request id), a raised alarm with its event and delivery, targets.
    await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, 80), request_id="0000-0001"),
                               metadata=A)
    await stub.CreateNotificationTarget(pb.CreateNotificationTargetRequest(target=notify_pb2.NotificationTarget(
        id="ops", url="http://127.0.0.1:9/nobody", secret="s" * 32, enabled=True)), metadata=A)
    await stub.CreateForwardingTarget(pb.CreateForwardingTargetRequest(target=notify_pb2.ForwardingTarget(
        id="cloud", plc_ids=["plc-1"], enabled=False, http=notify_pb2.ForwardingTarget.Http(
            url="http://127.0.0.1:9/nobody", secret="s" * 32))), metadata=A)
    await feed.send("acme", 90)

    async def raised() -> bool:
        return await state(server, A) == S.ALARM_STATE_ACTIVE_UNACKNOWLEDGED
    await wait_for(raised, timeout=15, what="the alarm raised")

    admin = await asyncpg.connect(database_url)
    try:
        tables = {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in await admin.fetch(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'alarm' AND c.relkind IN ('r', 'p')")}
    finally:
        await admin.close()
    assert set(UNSCOPED_TABLES) <= set(tables), "the allow-list names tables that do not exist"
    scoped = sorted(set(tables) - set(UNSCOPED_TABLES))
    assert {"rules", "create_requests", "alarms", "events", "event_seq", "rule_revision_counter",
            "notification_targets", "notification_outbox", "forwarding_targets"} <= set(scoped)
    assert [t for t in scoped if tables[t] != (True, True)] == [], "tables without forced row-level security"

    pool = await create_pool(database_url, "alarm", max_size=2)  # as the services' pools: role fabrica_rls
    try:
        for table in scoped:
            # The raw SQL of a store method that forgot its tenant: nothing.
            assert await pool.fetchval(f"SELECT count(*) FROM alarm.{table}") == 0, table
            with tenancy.system():
                assert await pool.fetchval(f"SELECT count(*) FROM alarm.{table}") >= 1, table
            with tenancy.scope("bolt"):
                assert await pool.fetchval(f"SELECT count(*) FROM alarm.{table}") == 0, table
        with pytest.raises(asyncpg.PostgresError):  # and it cannot write without a tenant either
            await pool.execute("INSERT INTO alarm.rules (id, revision, definition, enabled) VALUES ('x', 1, '', true)")
    finally:
        await pool.close()


async def test_what_was_there_before_tenants_is_the_default_tenants(database_url: str) -> None:
    """Migrations 2 and 1003 on a schema with data: every row becomes the tenant default's, whose revisions
    and event ids carry on from where the installation-wide ones stood."""
    admin = await asyncpg.connect(database_url)
    try:
        await apply_migrations(admin, "alarm", [m for m in MIGRATIONS if m.version in (1, 1001, 1002)])
        await admin.execute("""
            SELECT nextval('alarm.rule_revision'), nextval('alarm.rule_revision');
            INSERT INTO alarm.rules (id, revision, definition, enabled) VALUES ('hot', 2, '', true);
            INSERT INTO alarm.alarms (rule_id, tag_id, severity) VALUES ('hot', 1, 3);
            UPDATE alarm.event_seq SET last = 7;
            INSERT INTO alarm.notification_targets (id, url, secret) VALUES ('ops', 'http://127.0.0.1:9/', 's');
            INSERT INTO alarm.notification_outbox (target_id, idempotency_key, event_type, body)
                VALUES ('ops', 'alarm-event-7', 'alarm.raised', '{}');
        """)
        await apply_migrations(admin, "alarm", MIGRATIONS)
    finally:
        await admin.close()
    pool = await create_pool(database_url, "alarm", max_size=2)
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM alarm.alarms") == 0  # no tenant: nothing
        with tenancy.scope(tenancy.DEFAULT):
            async with pool.acquire() as conn, conn.transaction():
                assert await conn.fetchval("SELECT count(*) FROM alarm.notification_outbox") == 1
                assert await conn.fetchval("SELECT tenant_id FROM alarm.rules WHERE id = 'hot'") == "default"
                assert await store.next_rule_revision(conn) == 3
                assert await store.last_event_id(conn) == 7
        with tenancy.scope("acme"):
            async with pool.acquire() as conn, conn.transaction():
                assert await store.next_rule_revision(conn) == 1 and await store.last_event_id(conn) == 0
    finally:
        await pool.close()
