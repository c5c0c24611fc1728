"""A rule created while readings flow is evaluated, whatever the moment of its commit.

The evaluator reloads its rules when the revision sequence moves. A sequence is not transactional: it moves
when CreateAlarmRule takes the revision, before that transaction commits. An evaluator that reloaded in
between got a snapshot without the new rule while believing itself current, and never evaluated the rule
(until some other rule changed): the demo's second rule stayed unevaluated in one end-to-end run. Here the
create is held between the two (a lock on its tenant's revision counter), a reading makes the evaluator
reload then, and the rule must still be evaluated once it commits."""

from __future__ import annotations

import asyncio

import asyncpg
from fabrica.alarm.v1 import alarm_service_pb2 as pb

from in_process import Servers, settings_for
from procs import wait_for

from .support import TenantFeed, gt_rule


async def test_a_rule_committed_after_the_evaluator_reloaded_on_its_revision_is_evaluated(
        database_url: str, servers: Servers) -> None:
    feed = TenantFeed()
    server = await servers.start("alarm", settings_for("alarm", database_url=database_url), source=feed.source)
    evaluation = server.app.evaluation

    async def evaluated() -> set[str]:
        listed = (await server.stub.ListAlarms(pb.ListAlarmsRequest(include_normal=True))).alarms
        return {a.rule_id for a in listed}

    await server.stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, 50.0)))
    await feed.send("default", 10.0)
    await wait_for(lambda: _has(evaluated, {"hot"}), timeout=20, what="the first rule evaluated")

    locker = await asyncpg.connect(database_url)  # the tables' owner: row-level security does not apply
    try:
        held = locker.transaction()
        await held.start()
        await locker.execute("SELECT last FROM alarm.rule_revision_counter WHERE tenant_id = 'default' FOR UPDATE")
        # The create takes its revision from the sequence, then waits for the counter row.
        create = asyncio.ensure_future(server.stub.CreateAlarmRule(
            pb.CreateAlarmRuleRequest(rule=gt_rule("cold", "plc-1", 1, 50.0))))
        await wait_for(lambda: _waiting_on_lock(database_url), timeout=20, what="the create waiting on the counter")
        await feed.send("default", 20.0)  # the evaluator sees the sequence moved and reloads: no "cold" yet
        await wait_for(lambda: evaluation.cursor == 2, timeout=20, what="the reading evaluated meanwhile")
        await held.rollback()
        await asyncio.wait_for(create, 20)
    finally:
        await locker.close()
    for value in (30.0, 40.0):
        await feed.send("default", value)
    await wait_for(lambda: _has(evaluated, {"hot", "cold"}), timeout=20, what="the rule committed late evaluated")


async def _has(evaluated, rules: set[str]) -> bool:  # noqa: ANN001
    return await evaluated() == rules


async def _waiting_on_lock(database_url: str) -> bool:
    """Whether a statement on the revision counter waits for a lock (asked on a connection of its own:
    pg_stat_activity is read once per transaction)."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                   " AND query LIKE '%rule_revision_counter%'") > 0
    finally:
        await conn.close()
