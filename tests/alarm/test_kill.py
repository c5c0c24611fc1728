"""Exactly once under crashes: the alarm service (`fabrica serve alarm`, a child process) is SIGKILLed five times
while readings flow into a real ingest and restarted each time; ingest itself is restarted once meanwhile. Afterwards the alarm events are exactly the
transitions of the value series sent, once each and in order, and the webhook receiver, after dropping
duplicates by idempotency key, has exactly one notification per event (a duplicate delivery, which a kill
between the receiver's 200 and its record may cause, carries the same body). Meanwhile a forwarding target
sends the same readings into a second Fabrica's ingest (its own database) as collector ``from-plant``: it
holds every reading exactly once."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import asyncpg
import pytest
from fabrica.alarm.v1 import alarm_pb2
from fabrica.alarm.v1 import alarm_service_pb2 as pb
from fabrica.alarm.v1 import alarm_service_pb2_grpc as pb_grpc
from fabrica.alarm.v1 import notify_pb2
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ingest_pb_grpc

import grpc
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
    """The series: a slow sine around the threshold, crossing it every ~20 readings."""
    return THRESHOLD + 30.0 * math.sin(i / 6.5) + (i % 3)


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
    # The feed's own channel to ingest's address: it outlives ingest's restart (same port) and reconnects.
    feed_channel = grpc.aio.insecure_channel(ingest.address)
    feed_stub = ingest_pb_grpc.IngestServiceStub(feed_channel)
    try:
        await asyncio.to_thread(alarm.start)
        sent: list[float] = []
        stop_feeding = asyncio.Event()

        async def feed() -> None:
            t0 = int((time.time() - 3600) * US)
            sequence = 0
            extra = 40  # after the last kill
            while extra > 0:
                if stop_feeding.is_set() and len(sent) >= MIN_READINGS:
                    extra -= 1
                sequence += 1
                i = len(sent)
                one = batch("c1", sequence, [reading(1, t0 + i * US, value(i))])
                while True:  # through ingest's restart: the same batch again (a duplicate if it was stored)
                    try:
                        await stream_batches(feed_stub, "c1", [one])
                        break
                    except grpc.aio.AioRpcError:  # ingest is restarting
                        await asyncio.sleep(0.1)
                sent.append(value(i))
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
                await stub.CreateNotificationTarget(pb.CreateNotificationTargetRequest(target=notify_pb2.NotificationTarget(
                    id="ops", url=receiver.url("/hook"), secret="sixteen-chars-or-more", enabled=True)))
                await stub.CreateAlarmRule(pb.CreateAlarmRuleRequest(rule=gt_rule("hot", "plc-1", 1, THRESHOLD)))
                await stub.CreateForwardingTarget(pb.CreateForwardingTargetRequest(target=notify_pb2.ForwardingTarget(
                    id="other", plc_ids=["plc-1"], enabled=True,
                    ingest=notify_pb2.ForwardingTarget.Ingest(address=other.address, collector_id="from-plant"))))
            feeding = asyncio.create_task(feed())
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
                await feeding
            finally:
                stop_feeding.set()
                if not feeding.done():
                    feeding.cancel()
                    await asyncio.gather(feeding, return_exceptions=True)

            head = await ingest_head(database_url)
            await wait_for(lambda: _moved(cursor, head), timeout=60, what="evaluation of every reading")
            async with grpc.aio.insecure_channel(alarm.address) as channel:
                stub = pb_grpc.AlarmServiceStub(channel)
                events = list((await stub.ListAlarmEvents(pb.ListAlarmEventsRequest(page_size=1000))).events)[::-1]
                expected = expected_transitions(sent)
                assert len(expected) >= 10, "the series must cross the threshold often"
                assert [(e.type, e.value.double_value) for e in events] == expected

                async def all_delivered() -> bool:
                    target = (await stub.GetNotificationTarget(pb.GetNotificationTargetRequest(id="ops"))).target
                    return target.pending_deliveries == 0
                await wait_for(all_delivered, timeout=60, what="every notification delivered")

                async def all_forwarded() -> bool:
                    return await count(other_database, "SELECT count(*) FROM ingest.readings") >= len(sent)
                await wait_for(all_forwarded, timeout=60, what="every reading forwarded")
            alarm.terminate()
            assert await count(other_database, "SELECT count(*) FROM ingest.readings") == len(sent)
            assert await count(other_database, "SELECT count(DISTINCT (tag_id, read_time)) FROM ingest.readings") == \
                len(sent)

            first: dict[str, bytes] = {}
            for r in receiver.at("/hook"):
                key = r.headers["Idempotency-Key"]
                assert first.setdefault(key, r.body) == r.body, f"{key} was sent with two different bodies"
            assert sorted(first) == sorted(f"alarm-event-{e.id}" for e in events)
            assert [json.loads(first[f"alarm-event-{e.id}"])["event"]["value"]["double_value"] for e in events] == \
                [v for _, v in expected]
        print(f"{len(sent)} readings, {len(events)} transitions, {len(receiver.at('/hook'))} deliveries "
              f"({len(receiver.at('/hook')) - len(first)} duplicates dropped by key) across {KILLS} kills")
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
