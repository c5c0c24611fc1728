"""A failing PLC next to a healthy one on the same collector (in process, real servers on loopback).

Counted by sequence, not by time: the simulators run on a ManualClock, so the healthy PLC's counter moves only
when the test makes parts, and each value it makes must come back as a reading while the other PLC is
failing; the failing simulator counts the requests it received and holds. The healthy PLC's poller runs on a
TickClock (the collector's poller_options hook) that only the test moves: each value made is read on exactly
one tick, and its polls and skipped ticks are exact counts (polls == ticks, skipped == 0), whatever the load
on the machine. The failing PLC polls on the real clock, on the same event loop: had it blocked that loop
or the healthy PLC's connection, the healthy poll of a tick would not come (the wait for it is bounded).

* A slow S7 PLC: its answer is held (plcsim's hold) for as long as the test likes. While that one request is
  outstanding, the healthy PLC reads every value the test makes, each on one tick (no tick skipped, no error).
* A garbage-answering Modbus PLC (malformed frames): it gets bad quality (a decode failure, once), again and again;
  between two of its garbage answers the healthy one reads the next value, on one tick.
* A shared RTU gateway is the exception by design: one request at a time on the line. A dead device (a unit
  that never answers) costs its timeout once per turn: every device gets its turn in order, the one after
  the dead device is asked as soon as its timeout is over, and no device waits more than one dead timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from fabrica.config.v1 import plc_pb2 as T

from fabrica_svc.collector.app import CollectorApp
from fabrica_svc.collector.poller import Poller
from fabrica_svc.plcsim import ManualClock, ModbusSim, Plant, PlantConfig, Simulator
from fabrica_svc.runtime.server import ServiceHost

from .support import (COMM, DECODE, GOOD, IR, TickClock, app_of, collector_settings, gateway_plc, mb_tag, modbus_plc, readings,
                      s7_plc, s7_tag, start_collector, store_config, value_of, wait_for)

#: Values the healthy PLC makes (and must read) while the other one is failing.
VALUES = 5
#: A binary fraction: every tick of the healthy PLC is an exact float on its TickClock.
HEALTHY_INTERVAL = 0.25


@pytest.fixture
async def healthy() -> AsyncIterator[Simulator]:
    async with Simulator(seed=21, clock=ManualClock()) as sim:
        yield sim


@pytest.fixture
async def failing() -> AsyncIterator[Simulator]:
    async with Simulator(seed=22, clock=ManualClock()) as sim:
        yield sim


class Collector:
    """A collector in process; the PLC named "healthy" (if any) polls on `clock`, which the test moves."""

    def __init__(self, host: ServiceHost, clock: TickClock):
        self.host = host
        self.app: CollectorApp = app_of(host)
        self.clock = clock
        #: Ticks of the healthy PLC the test moved its clock to.
        self.ticks = 0

    def poller(self, plc_id: str) -> Poller:
        return self.app.supervisor.pollers[plc_id]

    async def tick(self) -> None:
        """Move the healthy PLC's clock to its next tick and wait until it has polled and sleeps again."""
        if not self.ticks:
            await wait_for(lambda: self.clock.sleeps, what="the healthy PLC connected, waiting for its first tick")
        await self.clock.tick(self.poller("healthy"))
        self.ticks += 1


@pytest.fixture
async def collector_of(tmp_path: Path):  # noqa: ANN201
    started: list[ServiceHost] = []

    async def start(plcs: list[T.Plc]) -> Collector:
        settings = collector_settings(tmp_path / f"c{len(started)}")
        store_config(settings, plcs)
        clock = TickClock()
        started.append(await start_collector(settings, poller_options=lambda plc: (
            {"clock": clock, "sleep": clock.sleep} if plc.id == "healthy" else {})))
        return Collector(started[-1], clock)

    yield start
    for host in started:
        await host.stop(grace=0)


async def healthy_reads_every_value(collector: Collector, sim: Simulator, tag: T.Tag, values: int,
                                    meanwhile: Callable[[], Awaitable[None]] | None = None) -> None:
    """Make `values` values on the healthy PLC, one at a time, each read on the one tick after it was made
    (after `meanwhile`, if given, before each value)."""
    for _ in range(values):
        if meanwhile is not None:
            await meanwhile()
        value = sim.make_parts(1).production_count
        await collector.tick()
        assert [value_of(r) for r in readings(collector.app, tag.id)][-1:] == [value]


def assert_healthy(collector: Collector, sim: Simulator, tag: T.Tag) -> None:
    """One GOOD reading per value the healthy counter took, one poll per tick, no tick skipped, no error."""
    poller = collector.poller("healthy")
    got = readings(collector.app, tag.id)
    assert [r.quality for r in got] == [GOOD] * len(got)
    assert [value_of(r) for r in got] == list(range(sim.plant.snapshot.production_count + 1 - len(got),
                                                     sim.plant.snapshot.production_count + 1))
    assert poller.polls == collector.ticks and poller.skipped == 0
    assert poller.status.error_count == 0 and poller.status.connected


async def test_a_slow_s7_plc_does_not_hold_up_a_healthy_plc_on_the_same_collector(
    healthy: Simulator, failing: Simulator, collector_of
) -> None:
    count = mb_tag("count", 0, T.DATA_TYPE_UINT32)
    temperature = s7_tag("temperature", 2, T.DATA_TYPE_FLOAT32)
    c = await collector_of([
        modbus_plc("healthy", healthy.modbus_port, [count], interval=HEALTHY_INTERVAL, timeout=0.5),
        # Its timeout is far beyond the test: the held answer is "late", never "lost".
        s7_plc("slow", failing.s7_port, [temperature], interval=0.05, timeout=30.0),
    ])
    await c.tick()
    await wait_for(lambda: readings(c.app, temperature.id) and readings(c.app, count.id), what="both PLCs read")
    slow = failing.s7.faults
    failing.s7.hold()
    await wait_for(lambda: slow.waiting == 1, what="the slow PLC's request to be outstanding")
    received, slow_polls = slow.received, c.poller("slow").polls
    polls = c.poller("healthy").polls

    await healthy_reads_every_value(c, healthy, count, VALUES)

    # All of that happened while one request of the slow PLC was outstanding, the same one all along, its
    # poller still waiting in that poll (had it blocked the event loop, it would have timed out meanwhile).
    assert slow.waiting == 1 and slow.received == received
    assert c.poller("slow").polls == slow_polls and c.poller("slow").status.error_count == 0
    assert c.poller("healthy").polls == polls + VALUES
    assert_healthy(c, healthy, count)
    failing.s7.release()
    await wait_for(lambda: c.poller("slow").polls > slow_polls, what="the late answer, and the next poll")
    assert [r.quality for r in readings(c.app, temperature.id)] == [GOOD]  # late, not lost: no bad quality
    assert c.poller("slow").status.error_count == 0


async def test_a_garbage_answering_modbus_plc_does_not_hold_up_a_healthy_plc_on_the_same_collector(
    healthy: Simulator, failing: Simulator, collector_of
) -> None:
    count = mb_tag("count", 0, T.DATA_TYPE_UINT32)
    state = mb_tag("state", 3)
    c = await collector_of([
        modbus_plc("healthy", healthy.modbus_port, [count], interval=HEALTHY_INTERVAL, timeout=0.5),
        modbus_plc("garbage", failing.modbus_port, [state], interval=0.05, timeout=0.3),
    ])
    await c.tick()
    await wait_for(lambda: readings(c.app, state.id) and readings(c.app, count.id), what="both PLCs read")
    failing.modbus.set_garbage()
    garbage = c.poller("garbage")
    errors = garbage.status.error_count

    async def another_garbage_answer() -> None:
        seen = garbage.status.error_count
        await wait_for(lambda: garbage.status.error_count > seen, what="another garbage answer")

    await healthy_reads_every_value(c, healthy, count, VALUES, meanwhile=another_garbage_answer)
    # The garbage PLC kept failing meanwhile: every poll was answered with a frame whose byte count lies.
    await wait_for(lambda: garbage.status.error_count >= errors + 3, timeout=20, what="garbage answers")

    assert_healthy(c, healthy, count)
    # A byte count that disagrees with the frame is a decode failure (collector/replies.py); reported once,
    # not per attempt.
    assert [r.quality for r in readings(c.app, state.id)] == [GOOD, DECODE]
    failing.modbus.set_garbage(False)
    await wait_for(lambda: readings(c.app, state.id)[-1].quality == GOOD, timeout=20, what="the PLC to recover")
    assert_healthy(c, healthy, count)


async def test_on_a_shared_rtu_gateway_a_dead_device_costs_its_timeout_once_per_turn_and_the_next_is_polled(
    collector_of
) -> None:
    dead_timeout = 1.0  # far beyond the live devices' interval: they are always waiting when it ends
    async with ModbusSim(Plant(PlantConfig(seed=23)), "modbus_rtu", units=(1, 2, 3), clock=ManualClock()) as line:
        line.set_silent(3)
        voltage = {u: mb_tag(f"voltage-{u}", 0, T.DATA_TYPE_FLOAT32, table=IR) for u in (1, 2, 3)}
        c = await collector_of([
            gateway_plc("meter-1", line.port, [voltage[1]], unit=1, interval=0.05, timeout=0.5),
            gateway_plc("meter-3", line.port, [voltage[3]], unit=3, interval=0.05, timeout=dead_timeout),
            gateway_plc("meter-2", line.port, [voltage[2]], unit=2, interval=0.05, timeout=0.5),
        ])
        await wait_for(lambda: list(line.request_units).count(3) >= 4, timeout=30, what="four turns of the dead one")
        log = list(line.request_units)

    dead = [i for i, u in enumerate(log) if u == 3]
    for here, there in zip(dead, dead[1:]):
        # After the dead device's timeout the next request is another device's; between two turns of the dead
        # device every other device was asked.
        assert log[here + 1] != 3 and {1, 2} <= set(log[here + 1:there]), log
    for unit in (1, 2):
        mine = [i for i, u in enumerate(log) if u == unit and i > dead[0]]
        # A live device waits at most one dead timeout between two of its requests.
        assert all(log[a + 1:b].count(3) <= 1 for a, b in zip(mine, mine[1:])), log
        got = readings(c.app, voltage[unit].id)
        assert [r.quality for r in got] == [GOOD] and c.poller(f"meter-{unit}").status.error_count == 0
    bad = readings(c.app, voltage[3].id)
    assert [r.quality for r in bad] == [COMM]  # once, not per turn (the integrity report is 60 s away)
    assert "unit 3" in bad[0].error and f"no answer within {dead_timeout:g} s" in bad[0].error
