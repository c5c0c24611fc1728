"""Exactly once under crashes, in two tenants at once: the alarm service (`fabrica serve alarm`, a child process)
is SIGKILLed five times while readings flow into a real ingest and restarted each time; ingest itself is
restarted once meanwhile.

Two tenants run side by side through the same kills: ``default`` (its calls name no tenant) and ``acme`` (every
call names it with the ``x-fabrica-tenant`` header, as an installation-wide caller does in development mode).
Each has the same rule id ``hot`` on the same PLC and tag ids and the same notification target id ``ops``, its
own webhook path, and its own collector feeding its own value series (acme's phase-shifted and offset by 0.5,
so no value of one tenant is a value of the other's). Event ids, the outbox and the webhook dispatch are per
tenant (store.insert_events, service.EvaluationStore.commit, notify/webhook.py).

Afterwards, for each tenant: its alarm events are exactly the transitions of its own series, once each and in
order, with ids dense from 1; its webhook path, after dropping duplicates by idempotency key, has exactly
one notification per event, keyed ``alarm-event-<its event id>`` and carrying its own values (a duplicate
delivery, which a kill between the receiver's 200 and its record may cause, carries the same body); nothing
reaches any other path. Meanwhile a forwarding target of ``default`` sends its readings of plc-1 into a
second Fabrica's ingest (its own database) as collector ``from-plant``: it holds every one of default's
readings exactly once, and none of acme's (which have the same PLC and tag ids)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from fabrica.alarm.v1 import alarm_pb2
from fabrica.alarm.v1 import alarm_service_pb2 as pb
from fabrica.alarm.v1 import alarm_service_pb2_grpc as pb_grpc
from fabrica.alarm.v1 import notify_pb2
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ingest_pb_grpc

import grpc
from fabrica_svc.runtime.tenancy import HEADER
from in_process import Server, Servers, open_server, settings_for
from ingest.support import batch, reading, stream_batches
from procs import ServiceProcess, wait_for
from webhook_receiver import Receiver

from .support import gt_rule

pytestmark = pytest.mark.slow

KILLS = 5
#: Readings sent at least, whatever the kills take: the series then crosses the threshold 15 times or more.
MIN_READINGS = 300
THRESHOLD = 50.0
US = 1_000_000


def value(i: int) -> float:
    """default's series: a slow sine around the threshold, crossing it every ~20 readings."""
    return THRESHOLD + 30.0 * math.sin(i / 6.5) + (i % 3)


def acme_value(i: int) -> float:
    """acme's series: another period and phase, offset by 0.5: none of its values is one of default's (the test
    checks it), so a value in an event or a body tells whose it is."""
    return THRESHOLD + 30.0 * math.sin(i / 5.5 + 2.0) + (i % 3) + 0.5


@dataclass
class Tenant:
    """One tenant of the test: how its calls name it, its collector, webhook path and series; what it sent."""

    code: str
    #: The gRPC metadata of its calls (default's name no tenant).
    metadata: tuple[tuple[str, str], ...]
    collector_id: str
    hook: str
    value: Callable[[int], float]
    sent: list[float] = field(default_factory=list)


def tenants() -> list[Tenant]:
    return [Tenant("default", (), "c1", "/hook", value),
            Tenant("acme", ((HEADER, "acme"),), "c-acme", "/hook-acme", acme_value)]


def expected_transitions(values: list[float]) -> list[tuple[int, float]]:
    """(event type, value) of each transition the rule "> 50" must record for these values, in order."""
    out, active = [], False
    for v in values:
        if (v > THRESHOLD) != active:
            active = not active
            out.append((alarm_pb2.ALARM_EVENT_TYPE_RAISED if active else alarm_pb2.ALARM_EVENT_TYPE_CLEARED, v))
    return out


@pytest.fixture
async def other_database(pg_admin_dsn: str):  # noqa: ANN201 - the second Fabrica's database
    from conftest import dsn_with_database

    name = f"other_{time.monotonic_ns()}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield dsn_with_database(pg_admin_dsn, name)
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_sigkill_five_times_while_readings_flow(database_url: str, other_database: str, servers: Servers,
                                                     tmp_path: Path) -> None:
    ingest: Server = await open_server("ingest", settings_for("ingest", database_url=database_url))
    other = await servers.start("ingest", settings_for("ingest", database_url=other_database))
    env = {"DATABASE_URL": database_url, "FABRICA_INGEST_ADDR": ingest.address, "FABRICA_ALARM_TICK_SECONDS": "0.2"}
    alarm = ServiceProcess("alarm", env, tmp_path / "alarm.log")
    # The feeds' own channel to ingest's address: it outlives ingest's restart (same port) and reconnects.
    feed_channel = grpc.aio.insecure_channel(ingest.address)
    feed_stub = ingest_pb_grpc.IngestServiceStub(feed_channel)
    default, acme = both = tenants()
    try:
        await asyncio.to_thread(alarm.start)
        stop_feeding = asyncio.Event()

        async def feed(tenant: Tenant) -> None:
            """One reading a batch from the tenant's collector (its stream names its tenant)."""
            t0 = int((time.time() - 3600) * US)
            sequence = 0
            extra = 40  # after the last kill
            while extra > 0:
                if stop_feeding.is_set() and len(tenant.sent) >= MIN_READINGS:
                    extra -= 1
                sequence += 1
                i = len(tenant.sent)
                one = batch(tenant.collector_id, sequence, [reading(1, t0 + i * US, tenant.value(i))])
                while True:  # through ingest's restart: the same batch again (a duplicate if it was stored)
                    try:
                        await stream_batches(feed_stub, tenant.collector_id, [one], metadata=tenant.metadata)
                        break
                    except grpc.aio.AioRpcError:  # ingest is restarting
                        await asyncio.sleep(0.1)
                tenant.sent.append(tenant.value(i))
                await asyncio.sleep(0.01)

        async def cursor() -> int:
            conn = await asyncpg.connect(database_url)
            try:
                return await conn.fetchval("SELECT cursor FROM alarm.evaluator_cursor")
            finally:
                await conn.close()

        with Receiver() as receiver:
            async with grpc.aio.insecure_channel(alarm.address) as channel:
                stub = pb_grpc.AlarmServiceStub(channel)
                for t in both:  # the same target and rule ids in both tenants, each its own webhook path
                    await stub.CreateNotificationTarget(pb.CreateNotificationTargetRequest(
                        target=notify_pb2.NotificationTarget(id="ops", url=receiver.url(t.hook),
                                                             secret="sixteen-chars-or-more", enabled=True)),
                        metadata=t.metadata)
                    await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, THRESHOLD)),
                                               metadata=t.metadata)
                await stub.CreateForwardingTarget(pb.CreateForwardingTargetRequest(target=notify_pb2.ForwardingTarget(
                    id="other", plc_ids=["plc-1"], enabled=True,
                    ingest=notify_pb2.ForwardingTarget.Ingest(address=other.address, collector_id="from-plant"))))
            feeding = [asyncio.create_task(feed(t)) for t in both]
            try:
                for kill in range(KILLS):
                    start = await cursor()
                    # Let it evaluate a few messages (and deliver some), then kill it mid-flow.
                    await wait_for(lambda s=start: _moved(cursor, s + 5 + 3 * kill), timeout=60,
                                   what=f"evaluation before kill {kill + 1}")
                    alarm.kill()
                    await asyncio.sleep(0.2)  # readings keep coming while it is down
                    if kill == 2:  # and ingest restarts once, on the same port, under the alarm service's stream
                        port = ingest.host.port
                        await ingest.stop()
                        ingest = await open_server("ingest", settings_for("ingest", database_url=database_url, port=port))
                    await asyncio.to_thread(alarm.start)
                stop_feeding.set()
                await asyncio.gather(*feeding)
            finally:
                stop_feeding.set()
                for task in feeding:
                    task.cancel()
                await asyncio.gather(*feeding, return_exceptions=True)

            head = await ingest_head(database_url)
            await wait_for(lambda: _moved(cursor, head), timeout=60, what="evaluation of every reading")
            events: dict[str, list[alarm_pb2.AlarmEvent]] = {}
            expected: dict[str, list[tuple[int, float]]] = {}
            async with grpc.aio.insecure_channel(alarm.address) as channel:
                stub = pb_grpc.AlarmServiceStub(channel)
                for t in both:
                    events[t.code] = list((await stub.ListAlarmEvents(pb.ListAlarmEventsRequest(page_size=1000),
                                                                      metadata=t.metadata)).events)[::-1]
                    expected[t.code] = expected_transitions(t.sent)
                    assert len(expected[t.code]) >= 10, f"{t.code}'s series must cross the threshold often"
                    assert [(e.type, e.value.double_value) for e in events[t.code]] == expected[t.code], t.code
                    # A tenant's event ids are its own: dense from 1, whatever the other tenant recorded meanwhile.
                    assert [e.id for e in events[t.code]] == list(range(1, len(events[t.code]) + 1)), t.code

                    async def all_delivered(t: Tenant = t) -> bool:
                        target = (await stub.GetNotificationTarget(pb.GetNotificationTargetRequest(id="ops"),
                                                                   metadata=t.metadata)).target
                        return target.pending_deliveries == 0
                    await wait_for(all_delivered, timeout=60, what=f"every notification of {t.code} delivered")

                async def all_forwarded() -> bool:
                    return await count(other_database, "SELECT count(*) FROM ingest.readings") >= len(default.sent)
                await wait_for(all_forwarded, timeout=60, what="every reading forwarded")
            alarm.terminate()
            # Every one of default's readings once, none of acme's (the same PLC and tag ids, another tenant's).
            assert await count(other_database, "SELECT count(*) FROM ingest.readings") == len(default.sent)
            assert await count(other_database, "SELECT count(DISTINCT (tag_id, read_time)) FROM ingest.readings") == \
                len(default.sent)
            assert sorted(await values(other_database)) == sorted(default.sent)

            # The two series have no value in common, so a value tells its tenant.
            assert not set(default.sent) & set(acme.sent)
            assert {r.path for r in receiver.requests} == {t.hook for t in both}, "a request to no tenant's path"
            first: dict[str, dict[str, bytes]] = {}
            for t in both:
                mine = first[t.code] = {}
                for r in receiver.at(t.hook):
                    key = r.headers["Idempotency-Key"]
                    assert mine.setdefault(key, r.body) == r.body, f"{t.code}: {key} was sent with two different bodies"
                assert sorted(mine) == sorted(f"alarm-event-{e.id}" for e in events[t.code]), t.code
                bodies = [json.loads(mine[f"alarm-event-{e.id}"]) for e in events[t.code]]
                assert [int(b["event"]["id"]) for b in bodies] == [e.id for e in events[t.code]], t.code
                assert [b["event"]["value"]["double_value"] for b in bodies] == [v for _, v in expected[t.code]], \
                    f"{t.code}'s webhook carried values not of its own series"
        for t in both:
            deliveries = len(receiver.at(t.hook))
            print(f"{t.code}: {len(t.sent)} readings, {len(events[t.code])} transitions, {deliveries} deliveries "
                  f"({deliveries - len(first[t.code])} duplicates dropped by key) across {KILLS} kills")
    finally:
        alarm.kill()  # if a failure left it running
        await feed_channel.close()
        await ingest.stop()


async def _moved(cursor, at_least: int) -> bool:  # noqa: ANN001
    return await cursor() >= at_least


async def ingest_head(database_url: str) -> int:
    """The newest cursor of ingest's committed-readings feed."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT coalesce(max(cursor), 0) FROM ingest.committed_batches")
    finally:
        await conn.close()


async def count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def values(dsn: str) -> list[float]:
    """The double values of every reading in `dsn`'s ingest."""
    conn = await asyncpg.connect(dsn)
    try:
        return [r["v"] for r in await conn.fetch("SELECT value AS v FROM ingest.readings")]
    finally:
        await conn.close()
