"""SIGKILL the collector (`fabrica serve collector`, a child process) while it streams to a live ingest with
batches in flight, three times; the simulator's counter is the truth the stored readings are checked against.

The simulator runs on a ManualClock: its production counter moves only when the test calls make_parts, so
the test knows every value the counter took and whether the collector was up while it was current.

Each kill goes like this:

1. Live: the press makes parts, one step at a time; after each step the test waits until ingest has the new
   value (GetLatestValues), so the collector saw every value.
2. In flight: the test locks ingest's row of this collector in ``collector_sequences`` (a transaction of its
   own, FOR UPDATE), so ingest's write transactions wait: ingest receives batches and can neither commit nor
   acknowledge them. The press makes more parts; after each step the test waits until ingest holds exactly
   the readings sent since (its writer's queued rows) and the collector counts exactly those as not
   acknowledged. Then SIGKILL: every value so far was read and appended to the log.
3. Dead: the press makes parts the collector cannot see; only the last of them is still there when it comes
   back. The lock is released while it is dead (ingest then commits what it had received, and nobody is
   there to hear the acknowledgements: the restarted collector must not store them again), or only after
   the restart (the restarted collector resends the same batches while the dead one's still wait in ingest).
4. Restart, and wait until ingest has the counter's current value.

At the end each counter tag (one Modbus TCP, one S7 PLC) has exactly one reading per value the counter took
while the collector was up, all GOOD; the values it did not store are exactly those that came and went while
it was dead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from fabrica.config.v1 import plc_pb2 as T
from fabrica.ingest.v1 import ingest_service_pb2 as ipb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc

from fabrica_svc.plcsim import ManualClock, PlantConfig, Simulator
from fabrica_svc.runtime import tenancy

from .support import (GOOD, collector_settings, free_port, key, mb_tag, modbus_plc, s7_plc, s7_tag, start_ingest,
                      store_config, stored_readings, value_of, wait_for)
from .test_processes import Service, batches_on_disk, status_of

pytestmark = pytest.mark.slow

COLLECTOR = "cell-1"
#: One entry per SIGKILL: when ingest may commit again, and how many steps the press makes while the collector
#: is dead (all but the last of those values are never seen).
KILLS = (("while dead", 3), ("after the restart", 1), ("while dead", 2))
#: Steps per live phase and per in-flight phase.
LIVE_STEPS = 3
IN_FLIGHT_STEPS = 3

_LOCK = "SELECT committed_sequence FROM ingest.collector_sequences WHERE collector_id = $1 FOR UPDATE"


@pytest.fixture
def collectors() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.kill()


async def latest_values(address: str, tag_ids: list[int]) -> dict[int, object]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await ipb_grpc.IngestServiceStub(channel).GetLatestValues(
            ipb.GetLatestValuesRequest(tag_ids=tag_ids), timeout=10)
    return {r.tag_id: value_of(r) for r in reply.readings}


async def test_collector_killed_three_times_while_streaming_to_live_ingest_stores_each_counter_value_once(
    database_url: str, tmp_path: Path, collectors: list[Service]
) -> None:
    count_mb = mb_tag("count", 0, T.DATA_TYPE_UINT32)
    count_s7 = s7_tag("count", 10, T.DATA_TYPE_INT16)  # DB1's INT good-parts counter
    tag_ids = [count_mb.id, count_s7.id]
    ingest = await start_ingest(database_url)
    writer, store = ingest.app.writer, ingest.app.store
    try:
        # No scrap: DB1's good counter then takes exactly the values of the Modbus production counter.
        async with Simulator(seed=11, clock=ManualClock(), config=PlantConfig(seed=11, scrap_every=0)) as sim:
            settings = collector_settings(tmp_path / "data", COLLECTOR)
            # On change only: the integrity report (every tag again) is an hour away.
            store_config(settings, [
                modbus_plc("press", sim.modbus_port, [count_mb], interval=0.05, integrity=3600),
                s7_plc("press-s7", sim.s7_port, [count_s7], interval=0.05, integrity=3600),
            ])
            env = {
                "FABRICA_DATA_DIR": str(settings.base.data_dir), "FABRICA_COLLECTOR_ID": COLLECTOR,
                "FABRICA_CONFIG_ADDR": settings.config_addr, "FABRICA_INGEST_ADDR": ingest.address,
                "FABRICA_COLLECTOR_BATCH_LATENCY_MS": "50", "FABRICA_COLLECTOR_RECONNECT_MIN": "0.05",
                "FABRICA_COLLECTOR_RECONNECT_MAX": "0.3",
            }
            collector = Service("collector", free_port(), env, tmp_path / "collector.log")
            collectors.append(collector)
            spool_dir = settings.state_dir / "spool"

            produced = [sim.plant.snapshot.production_count]  # every value the counter took, in order
            never_seen: list[int] = []  # the values that came and went while the collector was dead

            def make_parts(parts: int) -> int:
                produced.append(sim.make_parts(parts).production_count)
                return produced[-1]

            async def stored(value: int) -> bool:
                return await latest_values(ingest.address, tag_ids) == dict.fromkeys(tag_ids, value)

            async def live_steps() -> None:
                for i in range(LIVE_STEPS):
                    value = make_parts(1 + i % 2)
                    await wait_for(lambda: stored(value), timeout=30, what=f"ingest to store {value}")

            async def settled() -> bool:
                status = await status_of(collector)
                return status.uplink_connected and status.backlog_readings == 0

            await collector.start()
            await wait_for(lambda: stored(produced[-1]), timeout=30, what="the first value")
            for kill, (release, dead_steps) in enumerate(KILLS):
                await live_steps()
                await wait_for(settled, timeout=30, what="everything acknowledged")
                assert writer.queued_rows == 0

                # Ingest can no longer commit: what the collector sends now stays in flight.
                lock = await asyncpg.connect(database_url)
                try:
                    transaction = lock.transaction()
                    await transaction.start()
                    committed_before = await lock.fetchval(_LOCK, COLLECTOR)
                    in_flight: list[int] = []
                    for i in range(1, IN_FLIGHT_STEPS + 1):
                        in_flight.append(make_parts(i))
                        rows = 2 * i  # one reading of each counter tag per step
                        await wait_for(lambda: writer.queued_rows == rows, timeout=30,
                                       what=f"ingest to hold {rows} readings it cannot commit")
                    status = await status_of(collector)
                    assert status.uplink_connected and status.backlog_readings == 2 * IN_FLIGHT_STEPS
                    collector.kill()

                    on_disk = batches_on_disk(spool_dir, tmp_path / f"spool-at-kill-{kill}")
                    state = json.loads((spool_dir / "state.json").read_text())
                    assert state["acked"] <= committed_before < max(on_disk)  # the state file may lag behind
                    unacked = [r for seq, b in on_disk.items() if seq > committed_before for r in b.readings]
                    assert sorted((r.tag_id, value_of(r)) for r in unacked) == sorted(
                        (t, v) for t in tag_ids for v in in_flight)

                    dead = [make_parts(1) for _ in range(dead_steps)]
                    never_seen += dead[:-1]  # the last one is still there when the collector is back
                    if release == "while dead":
                        await transaction.rollback()
                        # Ingest commits what it had received; the acknowledgements go nowhere.
                        with tenancy.scope(tenancy.DEFAULT):  # ingest's store outside an RPC: the collector's tenant
                            await wait_for(lambda: _equal(store.committed_sequence(COLLECTOR), max(on_disk)),
                                           timeout=30, what="ingest to commit the batches in flight")
                    await collector.start()
                    if release == "after the restart":
                        await transaction.rollback()
                finally:
                    await lock.close()
                await wait_for(lambda: stored(dead[-1]), timeout=30, what="the value after the restart")

            await live_steps()
            await wait_for(settled, timeout=30, what="everything acknowledged")
            assert collector.terminate() == 0

        readings = await stored_readings(ingest.address, tag_ids)
        assert [r for r in readings if r.quality != GOOD] == []
        assert max(Counter(map(key, readings)).values()) == 1, "a reading was stored twice"
        seen_while_up = sorted(set(produced) - set(never_seen))
        steps = len(KILLS) * (LIVE_STEPS + IN_FLIGHT_STEPS) + LIVE_STEPS + sum(n for _, n in KILLS)
        assert len(produced) == len(set(produced)) == 1 + steps
        for tag_id in tag_ids:
            values = sorted(value_of(r) for r in readings if r.tag_id == tag_id)
            # Every value the counter took while the collector was up, each exactly once ...
            assert values == seen_while_up, tag_id
            # ... and what is missing is exactly what came and went while it was dead.
            assert set(produced) - set(values) == set(never_seen) and len(never_seen) == sum(n - 1 for _, n in KILLS)
    finally:
        await ingest.stop(grace=0)


async def _equal(value, expected) -> bool:  # noqa: ANN001
    return await value == expected
