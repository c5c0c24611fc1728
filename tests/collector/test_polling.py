"""Pollers against the simulator's real Modbus TCP, RTU-over-TCP and S7 servers on loopback.

Reporting (first report, on change, deadband, integrity), the fixed-rate schedule, a PLC that dies or
turns slow (bad quality once, reconnects, recovery, another PLC unaffected), garbage answers, RTU buses,
and 200 connect/fail cycles without leaks. Waits are bounded; assertions are on counts and order. Where a
test counts polls or skipped ticks, the poller runs on a TickClock the test moves, and the counts are exact
per tick; no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator

import psutil
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from fabrica_svc.collector import drivers
from fabrica_svc.collector.drivers import BusRegistry, make_driver
from fabrica_svc.collector.poller import Poller
from fabrica_svc.plcsim import Simulator

from .support import (COIL, COMM, CONFIG, DECODE, GOOD, IR, TickClock, free_port, gateway_plc, mb_tag, modbus_plc,
                      s7_plc, s7_tag, serial_plc, value_of, wait_for)

T = plc_pb2


class FakeClock:
    """The simulator's plant clock: values only change when a test moves it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def frozen() -> AsyncIterator[tuple[Simulator, FakeClock]]:
    clock = FakeClock()
    async with Simulator(seed=4, clock=clock) as sim:
        clock.t += 30.0  # the press has produced something
        sim.refresh()
        yield sim, clock


@pytest.fixture
async def live() -> AsyncIterator[Simulator]:
    async with Simulator(seed=2) as sim:
        yield sim


class Running:
    """Pollers started by a test, with what they report; stopped at the end whatever happened."""

    def __init__(self) -> None:
        self.buses = BusRegistry()
        self.readings: list[reading_pb2.Reading] = []
        self.pollers: list[Poller] = []

    def start(self, plc: T.Plc, **kwargs) -> Poller:
        kwargs.setdefault("backoff_min", 0.05)
        kwargs.setdefault("backoff_max", 0.2)
        poller = Poller(plc, lambda p: make_driver(p, self.buses), self.readings.append, **kwargs)
        poller.start()
        self.pollers.append(poller)
        return poller

    def of(self, tag: T.Tag | int, quality: int | None = None) -> list[reading_pb2.Reading]:
        tag_id = tag if isinstance(tag, int) else tag.id
        return [r for r in self.readings if r.tag_id == tag_id and (quality is None or r.quality == quality)]

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.pollers))


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    r = Running()
    yield r
    await r.stop()


# ------------------------------------------------------------------------------------------- reporting


async def test_every_tag_is_reported_first_then_only_on_change_beyond_its_deadband(
    frozen: tuple[Simulator, FakeClock], running: Running
) -> None:
    sim, clock = frozen
    count = mb_tag("count", 0, T.DATA_TYPE_UINT32)
    temperature = mb_tag("temperature", 4, T.DATA_TYPE_FLOAT32, deadband=50.0)
    pressure = mb_tag("pressure", 6, T.DATA_TYPE_FLOAT32, word_order=T.WORD_ORDER_LITTLE_ENDIAN)
    running_bit = mb_tag("running", 0, T.DATA_TYPE_BOOL, table=COIL)
    tags = [count, temperature, pressure, running_bit]
    poller = running.start(modbus_plc("press", sim.modbus_port, tags, interval=0.02))

    await wait_for(lambda: all(running.of(t) for t in tags), what="the first report of every tag")
    first = {t.name: running.of(t)[0] for t in tags}
    snap = sim.plant.snapshot
    assert all(r.quality == GOOD and r.plc_id == "press" for r in first.values())
    assert value_of(first["count"]) == snap.production_count > 0
    assert value_of(first["temperature"]) == pytest.approx(snap.temperature, rel=1e-6)
    assert value_of(first["pressure"]) == pytest.approx(snap.pressure, rel=1e-6)  # CDAB
    assert value_of(first["running"]) is snap.running

    # Nothing changes on a frozen plant: more polls, no more readings.
    polls = poller.polls
    await wait_for(lambda: poller.polls >= polls + 10, what="ten more polls")
    assert len(running.readings) == 4

    # Ten seconds later the counter has moved; the temperature moved less than its deadband of 50 °C.
    clock.t += 10.0
    sim.refresh()
    await wait_for(lambda: len(running.of(count)) == 2, what="the new count")
    polls = poller.polls
    await wait_for(lambda: poller.polls >= polls + 5, what="five more polls")
    assert value_of(running.of(count)[1]) == sim.plant.snapshot.production_count > value_of(first["count"])
    assert len(running.of(temperature)) == 1
    assert sim.plant.snapshot.temperature != pytest.approx(value_of(first["temperature"]), abs=1e-9)


async def test_integrity_reports_repeat_every_tag_even_when_nothing_changes(
    frozen: tuple[Simulator, FakeClock], running: Running
) -> None:
    sim, _ = frozen
    tags = [mb_tag("count", 0, T.DATA_TYPE_UINT32), mb_tag("state", 3)]
    running.start(modbus_plc("press", sim.modbus_port, tags, interval=0.02, integrity=0.15))
    await wait_for(lambda: all(len(running.of(t)) >= 3 for t in tags), what="three integrity rounds")
    for tag in tags:
        got = running.of(tag)
        assert {r.quality for r in got} == {GOOD}
        assert len({value_of(r) for r in got}) == 1  # unchanged, yet reported
        times = [r.read_time.ToNanoseconds() for r in got]
        assert times == sorted(times)


async def test_the_schedule_is_fixed_rate_and_an_overrunning_poll_skips_ticks_instead_of_drifting(
    frozen: tuple[Simulator, FakeClock], running: Running
) -> None:
    sim, _ = frozen
    clock, interval = TickClock(), 0.25
    poller = running.start(modbus_plc("press", sim.modbus_port, [mb_tag("state", 3)], interval=interval),
                           clock=clock, sleep=clock.sleep)
    group = poller.groups[0]
    await wait_for(lambda: clock.sleeps, what="the poller connected and waiting for its first tick")
    # The first tick is offset by a stable fraction of the interval derived from the PLC id.
    first = 1024.0 + zlib.crc32(b"press/default") / 2**32 * interval
    assert (poller.polls, group.next_due) == (0, first)

    # One poll per tick, on time, none skipped.
    for k in range(1, 6):
        await clock.tick(poller)
        assert (poller.polls, poller.skipped, group.next_due) == (k, 0, first + k * interval)
        assert poller.lateness[-1] == 0.0

    # The loop was held up for 2.5 intervals: one poll, late by that much; the two ticks it missed are
    # skipped, not caught up with, and the next tick is still on the grid of the first.
    await clock.tick(poller, to=group.next_due + 2.5 * interval)
    assert (poller.polls, poller.skipped, group.next_due) == (6, 2, first + 8 * interval)
    assert poller.lateness[-1] == 2.5 * interval

    # Every read now takes 1.75 intervals: each poll starts on its tick and skips the one tick it overran.
    driver = poller.driver
    assert driver is not None
    read = driver.read

    async def slow_read(block):  # noqa: ANN001, ANN202 - the real read, taking 1.75 intervals of the clock
        data = await read(block)
        clock.set(clock.t + 1.75 * interval)
        return data

    driver.read = slow_read  # type: ignore[method-assign]
    for k in range(1, 4):
        await clock.tick(poller)
        assert (poller.polls, poller.skipped, group.next_due) == (6 + k, 2 + k, first + (8 + 2 * k) * interval)
        assert poller.lateness[-1] == 0.0
    assert poller.status.error_count == 0 and poller.status.connected
    assert [r.quality for r in running.readings] == [GOOD]  # a frozen plant: reported once


# ------------------------------------------------------------------------------------ outages and speed


async def test_a_plc_that_stops_answering_reports_bad_quality_once_reconnects_and_recovers_while_another_plc_polls_on(
    frozen: tuple[Simulator, FakeClock], live: Simulator, running: Running
) -> None:
    dead, _ = frozen
    tags = [mb_tag("count", 0, T.DATA_TYPE_UINT32), mb_tag("state", 3), mb_tag("door", 2, T.DATA_TYPE_BOOL, table=COIL)]
    a = running.start(modbus_plc("press-a", dead.modbus_port, tags, interval=0.05, timeout=0.3))
    clock = TickClock()
    b = running.start(modbus_plc("press-b", live.modbus_port, [mb_tag("count", 0, T.DATA_TYPE_UINT32)],
                                 interval=0.25, timeout=0.3), clock=clock, sleep=clock.sleep)
    await wait_for(lambda: all(running.of(t) for t in tags) and clock.sleeps, what="both PLCs polling")

    async def ticking(done: Callable[[], bool], what: str) -> int:
        """Tick B's clock, one tick at a time, until `done`: B polls exactly once per tick, on time, and
        skips none, however long A takes. Bounded by a timeout, like every wait; returns the ticks."""
        loop = asyncio.get_running_loop()
        deadline, ticks = loop.time() + 10.0, 0
        while True:
            polls, skipped = b.polls, b.skipped
            await clock.tick(b)
            ticks += 1
            assert (b.polls - polls, b.skipped - skipped, b.lateness[-1]) == (1, 0, 0.0)
            if done():
                return ticks
            assert loop.time() < deadline, f"timed out waiting for {what}"

    async def outage(start_fault, end_fault, what: str) -> str:
        errors_before = a.status.error_count
        bad_before = [len(running.of(t, COMM)) for t in tags]
        b_polls, b_skipped = b.polls, b.skipped
        await start_fault()
        ticks = await ticking(lambda: all(len(running.of(t, COMM)) > n for t, n in zip(tags, bad_before)),
                              f"bad quality while {what}")
        ticks += await ticking(lambda: a.status.error_count >= errors_before + 4, f"reconnect attempts while {what}")
        assert a.status.last_error
        # Once per tag, not at every tick or attempt (integrity is 60 s away).
        assert [len(running.of(t, COMM)) - n for t, n in zip(tags, bad_before)] == [1, 1, 1]
        error = running.of(tags[0], COMM)[-1].error
        await end_fault()
        ticks += await ticking(lambda: all(running.of(t)[-1].quality == GOOD for t in tags), f"recovery after {what}")
        # The other PLC polled on every tick of its clock meanwhile, and only then.
        assert (b.polls - b_polls, b.skipped - b_skipped, b.status.error_count) == (ticks, 0, 0)
        return error

    async def pause() -> None:
        await dead.pause()

    async def resume() -> None:
        await dead.resume()

    async def still_dead() -> None:
        assert not a.status.connected  # refused: no connection to hold
        await resume()

    refused = await outage(pause, still_dead, "dead")
    assert "cannot connect" in refused or "lost" in refused
    for tag in tags:
        assert [r.quality for r in running.of(tag)] == [GOOD, COMM, GOOD]

    async def slow() -> None:
        dead.modbus.set_delay(1.0)

    async def fast() -> None:
        dead.modbus.set_delay(0)

    timed_out = await outage(slow, fast, "slow")
    assert "no answer" in timed_out and "0.3 s" in timed_out
    for tag in tags:
        assert [r.quality for r in running.of(tag)] == [GOOD, COMM, GOOD, COMM, GOOD]
        assert len({value_of(r) for r in running.of(tag, GOOD)}) == 1  # frozen plant, same value throughout
    assert a.status.connected and a.status.last_error == ""


# ------------------------------------------------------------------------------------------------ garbage


def short_answer_server(values: list[int], keep: int) -> ModbusTcpServer:
    """A real pymodbus server whose register answers carry only their first `keep` registers: a device that
    answers garbage (plcsim has no mode for that)."""

    def truncate(sending: bool, pdu):  # noqa: ANN001, ANN202 - pymodbus trace hook
        if sending and getattr(pdu, "registers", None) and len(pdu.registers) > keep:
            pdu.registers = pdu.registers[:keep]
        return pdu

    device = SimDevice(id=1, simdata=[SimData(0, values=values, datatype=DataType.REGISTERS)])
    return ModbusTcpServer(device, address=("127.0.0.1", 0), trace_pdu=truncate)


async def test_garbage_answers_give_decode_failures_with_the_error_and_polling_goes_on(
    frozen: tuple[Simulator, FakeClock], running: Running
) -> None:
    sim, _ = frozen
    # Modbus exception responses.
    state = mb_tag("state", 3)
    modbus = running.start(modbus_plc("press", sim.modbus_port, [state], interval=0.02))
    await wait_for(lambda: running.of(state, GOOD), what="a good reading")
    sim.modbus.set_exception(4)
    await wait_for(lambda: running.of(state, DECODE), what="a decode failure")
    assert "Modbus exception 4: server device failure" in running.of(state, DECODE)[0].error
    polls = modbus.polls
    await wait_for(lambda: modbus.polls > polls + 5, what="polling to go on")
    assert len(running.of(state, DECODE)) == 1 and modbus.status.connected
    sim.modbus.set_exception(None)
    await wait_for(lambda: running.of(state)[-1].quality == GOOD, what="good again")

    # Short reads: a block of four registers answered with two.
    server = short_answer_server([11, 22, 33, 44], keep=2)
    await server.serve_forever(background=True)
    try:
        port = server.transport.sockets[0].getsockname()[1]
        first, second, third = mb_tag("r0", 0), mb_tag("r1", 1), mb_tag("r23", 2, T.DATA_TYPE_UINT32)
        running.start(modbus_plc("garbage", port, [first, second, third], interval=0.02))
        await wait_for(lambda: running.of(third), what="the short answer")
        # A reply shorter than asked is no reading for any tag of the block (never values from part of it).
        for tag in (first, second, third):
            assert running.of(tag)[0].quality == DECODE
            assert "reply carries 2 registers (4 bytes), asked for 4 (8 bytes)" in running.of(tag)[0].error
    finally:
        await server.shutdown()

    # S7 errors: the data block is gone.
    temp = s7_tag("temperature", 2, T.DATA_TYPE_FLOAT32)
    s7 = running.start(s7_plc("press-s7", sim.s7_port, [temp], interval=0.02))
    await wait_for(lambda: running.of(temp, GOOD), what="a good S7 reading")
    sim.s7.set_db_missing(True)
    await wait_for(lambda: running.of(temp, DECODE), what="an S7 error")
    assert "Object does not exist" in running.of(temp, DECODE)[0].error
    sim.s7.set_db_missing(False)
    await wait_for(lambda: running.of(temp)[-1].quality == GOOD, what="S7 good again")
    assert s7.status.error_count >= 1 and all(p.running for p in running.pollers)


async def test_a_tag_the_device_cannot_serve_as_defined_reports_a_config_error_and_the_rest_is_polled(
    frozen: tuple[Simulator, FakeClock], running: Running
) -> None:
    sim, _ = frozen
    good = mb_tag("state", 3)
    wrong_protocol = s7_tag("s7-on-modbus", 0, T.DATA_TYPE_INT16)
    no_bit = mb_tag("bool-without-bit", 3, T.DATA_TYPE_BOOL)
    poller = running.start(modbus_plc("press", sim.modbus_port, [good, wrong_protocol, no_bit], interval=0.02))
    await wait_for(lambda: running.of(good) and running.of(wrong_protocol) and running.of(no_bit), what="readings")
    assert running.of(good)[0].quality == GOOD
    assert running.of(wrong_protocol)[0].quality == CONFIG and "s7" in running.of(wrong_protocol)[0].error
    assert running.of(no_bit)[0].quality == CONFIG and "bit" in running.of(no_bit)[0].error
    assert poller.status.tag_count == 1 and len(poller.status.config_errors) == 2


# -------------------------------------------------------------------------------------------- RTU buses


async def test_rtu_devices_on_one_gateway_share_one_link_and_take_turns_and_a_serial_url_works(
    live: Simulator, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    units: list[int] = []  # the unit of each request on the gateway's link, in order
    on_link = [0, 0]  # requests on the link now, most at once
    original = drivers._modbus_read

    async def recorded(client, table, start, count, unit, where):  # noqa: ANN001, ANN202 - observes the real read
        mine = client.comm_params.port == live.rtu_port
        if mine:
            on_link[0] += 1
            on_link[1] = max(on_link)
        try:
            return await original(client, table, start, count, unit, where)
        finally:
            if mine:
                on_link[0] -= 1
                units.append(unit)

    monkeypatch.setattr(drivers, "_modbus_read", recorded)
    live.rtu.set_delay(0.03)
    voltage = mb_tag("voltage", 0, T.DATA_TYPE_FLOAT32, table=IR)
    absent = mb_tag("voltage", 0, T.DATA_TYPE_FLOAT32, table=IR)
    meter = running.start(gateway_plc("meter-1", live.rtu_port, [voltage], unit=1, interval=0.02, timeout=1.0))
    other = running.start(gateway_plc("meter-2", live.rtu_port, [absent], unit=2, interval=0.02, timeout=1.0))
    await wait_for(lambda: units.count(1) >= 5 and units.count(2) >= 5, what="both devices polled")
    assert running.of(voltage, GOOD) and 200 < value_of(running.of(voltage, GOOD)[0]) < 260
    # Unit 2 is not on the bus: the gateway answers exception 11.
    assert "exception 11" in running.of(absent, DECODE)[0].error
    # One link to the gateway, and never two requests on it at once.
    assert len(running.buses) == 1
    mine = [c for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == live.rtu_port and c.status == psutil.CONN_ESTABLISHED]
    assert len(mine) == 1
    assert on_link[1] == 1, "overlapping requests on one bus"
    assert meter.status.connected and other.status.connected

    # The same meter through pyserial's socket:// URL: the serial-port driver (AsyncModbusSerialClient).
    serial_voltage = mb_tag("voltage", 0, T.DATA_TYPE_FLOAT32, table=IR)
    running.start(serial_plc("meter-serial", f"socket://127.0.0.1:{live.rtu_port}", [serial_voltage], interval=0.05))
    await wait_for(lambda: running.of(serial_voltage, GOOD), what="a reading over the serial driver")
    assert 200 < value_of(running.of(serial_voltage, GOOD)[0]) < 260


async def test_a_second_plc_on_a_serial_port_with_other_line_settings_reports_a_config_error(
    live: Simulator, running: Running
) -> None:
    url = f"socket://127.0.0.1:{live.rtu_port}"
    first, second = mb_tag("v", 0, T.DATA_TYPE_FLOAT32, table=IR), mb_tag("v", 0, T.DATA_TYPE_FLOAT32, table=IR)
    running.start(serial_plc("meter-a", url, [first], interval=0.05))
    await wait_for(lambda: running.of(first, GOOD), what="the first meter")
    other = serial_plc("meter-b", url, [second], unit=2, interval=0.05)
    other.modbus_rtu.baud_rate = 19200  # the line already runs at 9600
    poller = running.start(other)
    await wait_for(lambda: running.of(second), what="the second meter's reading")
    assert running.of(second)[0].quality == CONFIG and "already in use" in running.of(second)[0].error
    assert poller.status.config_errors and not poller.status.connected
    assert running.pollers[0].status.connected and len(running.buses) == 1


async def test_s7_blocks_are_as_large_as_the_negotiated_pdu_allows(live: Simulator) -> None:
    from fabrica_svc.collector.drivers import S7Driver
    from fabrica_svc.collector.tags import tag_spec

    driver = S7Driver("s7", "127.0.0.1", live.s7_port, 0, 1, 1.0)
    try:
        await driver.connect()
        specs = [tag_spec(s7_tag("a", 0, T.DATA_TYPE_INT16)), tag_spec(s7_tag("b", 400, T.DATA_TYPE_INT32))]
        assert driver.pdu_length == 480  # what the simulator negotiates
        assert [(b.start, b.size) for b in driver.plan(specs)] == [(0, 404)]  # fits 480 - 18 bytes
        driver.pdu_length = 240  # a smaller CPU: 222 bytes per read
        assert [(b.start, b.size) for b in driver.plan(specs)] == [(0, 2), (400, 4)]
    finally:
        await driver.dispose()


# ------------------------------------------------------------------------------------------------ leaks


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _quiet_minimum(measure: Callable[[], int], samples: int = 25) -> int:
    """The smallest of a few samples: a connect in flight holds a socket and a task for a moment; a leak
    raises the floor."""
    seen = []
    for _ in range(samples):
        seen.append(measure())
        await asyncio.sleep(0.004)
    return min(seen)


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Silence chatty loggers: every failed connect logs, and captured log records would count as memory."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


async def test_two_hundred_connect_fail_cycles_leave_fds_tasks_and_memory_flat(running: Running) -> None:
    port = free_port()  # nothing listens there: every connect is refused
    tags = [mb_tag("x", 0)]
    plcs = [
        modbus_plc("tcp", port, tags),
        gateway_plc("gateway", port, [mb_tag("x", 0)]),
        serial_plc("serial", f"socket://127.0.0.1:{port}", [mb_tag("x", 0)]),
        s7_plc("s7", port, [s7_tag("x", 0, T.DATA_TYPE_INT16)]),
    ]
    with quiet("pymodbus", "snap7", "fabrica_svc", "asyncio"):
        pollers = [running.start(p, backoff_min=0.001, backoff_max=0.002) for p in plcs]

        async def cycles(n: int) -> None:
            await wait_for(lambda: all(p.status.error_count >= n for p in pollers), timeout=60,
                           what=f"{n} failed connects each")

        await cycles(30)  # warm up: imports, caches, the executors' threads
        gc.collect()
        await asyncio.sleep(0.05)
        tracemalloc.start()
        fds, tasks = await _quiet_minimum(_fds), await _quiet_minimum(lambda: len(asyncio.all_tasks()))
        memory = tracemalloc.get_traced_memory()[0]
        start = [p.status.error_count for p in pollers]
        await cycles(min(start) + 200)
        gc.collect()
        await asyncio.sleep(0.05)
        grown = tracemalloc.get_traced_memory()[0] - memory
        tracemalloc.stop()
        after_fds, after_tasks = await _quiet_minimum(_fds), await _quiet_minimum(lambda: len(asyncio.all_tasks()))
    assert all(p.status.error_count - s >= 200 for p, s in zip(pollers, start))
    # Each bad-quality reading is reported once, not per cycle.
    assert len(running.readings) == 4 and {r.quality for r in running.readings} == {COMM}
    assert after_fds <= fds, (fds, after_fds)
    assert after_tasks <= tasks, (tasks, after_tasks)
    assert grown < 256 * 1024, f"{grown} bytes more after 800 connect/fail cycles"
