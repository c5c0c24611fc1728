"""PLC simulator: the plant model (fake clock) and the real servers on loopback.

Waits are bounded polls; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
import snap7
from pymodbus import FramerType
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from fabrica_svc.plcsim import (DEMO_TAGS, ListenError, MachineState, ManualClock, ModbusSim, Plant, PlantConfig,
                                Simulator, tags_for)
from fabrica_svc.plcsim.plant import DB1_SIZE, tag_value
from fabrica_svc.plcsim.s7 import S7Sim

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


# --- helpers -----------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def f32(hi: int, lo: int) -> float:
    return struct.unpack(">f", struct.pack(">HH", hi, lo))[0]


def u32(hi: int, lo: int) -> int:
    return struct.unpack(">I", struct.pack(">HH", hi, lo))[0]


def as_f32(x: float) -> float:
    """``x`` rounded to float32, as the wire carries it."""
    return struct.unpack(">f", struct.pack(">f", x))[0]


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    """Poll an async predicate until it returns a truthy value; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def mb_client(port: int, framer: FramerType = FramerType.SOCKET) -> AsyncModbusTcpClient:
    return AsyncModbusTcpClient(HOST, port=port, framer=framer, timeout=1, retries=0, reconnect_delay=0)


async def mb_read(port: int, address: int, count: int, *, table: str = "holding", framer=FramerType.SOCKET, unit=1):
    client = mb_client(port, framer)
    try:
        assert await client.connect(), "connect failed"
        read = client.read_holding_registers if table == "holding" else client.read_input_registers
        return await read(address, count=count, device_id=unit)
    finally:
        client.close()


def s7_read_sync(port: int, start: int = 0, size: int = DB1_SIZE) -> bytearray:
    client = snap7.client.Client()
    try:
        client.connect(HOST, 0, 1, port)
        return client.db_read(1, start, size)
    finally:
        client.disconnect()


async def s7_read(port: int, start: int = 0, size: int = DB1_SIZE) -> bytearray:
    return await asyncio.to_thread(s7_read_sync, port, start, size)


@pytest.fixture
async def sim():
    async with Simulator(seed=3) as s:
        yield s


@pytest.fixture
async def frozen():
    """A simulator on a fake clock, advanced 12.34 s past start: values are exact."""
    clock = FakeClock()
    async with Simulator(seed=5, clock=clock) as s:
        clock.t += 12.34
        s.refresh()
        yield s


# --- plant model -------------------------------------------------------------------


def test_plant_is_deterministic_for_a_seed():
    a, b, c = Plant(PlantConfig(seed=7)), Plant(PlantConfig(seed=7)), Plant(PlantConfig(seed=8))
    times = [0.0, 0.5, 3.3, 61.0, 299.9, 1234.5]
    assert [a.at(t) for t in times] == [b.at(t) for t in times]
    assert [s.end for s in a.segments(2000)] != [s.end for s in c.segments(2000)]


def test_step_follows_clock_and_is_independent_of_step_size():
    clock = FakeClock(500.0)
    fine, coarse = Plant(PlantConfig(seed=2)), Plant(PlantConfig(seed=2))
    fine.step(clock())  # first step defines the start time
    coarse.step(clock())
    for _ in range(3000):  # 300 s in 100 ms steps
        clock.t += 0.1
        fine.step(clock())
    coarse.step(clock())
    assert fine.snapshot == coarse.snapshot
    assert fine.elapsed == pytest.approx(300.0)
    # A clock going backwards leaves the plant where it is.
    before = fine.snapshot
    assert fine.step(clock() - 50.0) == before


def test_counters_follow_running_time():
    cfg = PlantConfig(seed=11, rate=2.0, run_min=5, run_max=15, stop_min=2, stop_max=4, fault_ratio=0.5)
    plant = Plant(cfg, start_time=0.0)
    horizon = 600.0
    segments = plant.segments(horizon)
    assert {s.state for s in segments} == set(MachineState)
    assert segments[0].state is MachineState.RUNNING and segments[0].start == 0.0
    for prev, seg in zip(segments, segments[1:]):
        assert seg.start == prev.end
        assert (prev.state is MachineState.RUNNING) != (seg.state is MachineState.RUNNING)

    last = None
    for k in range(int(horizon * 4)):
        t = k * 0.25
        snap = plant.step(t)
        seg = next(s for s in segments if s.start <= t < s.end)
        run_time = sum(min(s.end, t) - s.start for s in segments if s.state is MachineState.RUNNING and s.start <= t)
        assert snap.state is seg.state
        assert snap.running == (seg.state is MachineState.RUNNING)
        assert snap.fault == (seg.state is MachineState.FAULT)
        assert snap.door_open == (seg.state is MachineState.STOPPED)
        assert abs(snap.production_count - run_time * cfg.rate) <= 1
        if last is not None:
            assert snap.production_count >= last.production_count
            assert snap.scrap_count >= last.scrap_count
            assert snap.energy_kwh >= last.energy_kwh
            if not snap.running:
                assert snap.production_count == last.production_count or last.running
        assert 25.0 < snap.temperature < 70.0
        assert 225.0 < snap.voltage_l1 < 235.0
        last = snap
    assert last is not None
    assert last.energy_kwh > cfg.energy_start_kwh
    assert last.good_count == last.production_count - last.scrap_count


def test_scrap_roughly_every_25_parts_and_temperature_around_65():
    plant = Plant(PlantConfig(seed=4), start_time=0.0)
    snap = plant.step(3600.0)
    assert snap.production_count > 5000
    assert 0.8 / 25 < snap.scrap_count / snap.production_count < 1.2 / 25
    running = [plant.at(t) for t in range(0, 600, 7) if plant.at(t).running]
    assert running and all(62.0 < s.temperature < 68.0 for s in running)
    assert all(150.0 < s.pressure < 210.0 for s in running)


def test_tag_values_wrap_like_the_plc_types():
    snap = dataclasses.replace(Plant().at(0), production_count=2**32 + 5, scrap_count=40000)
    tag = {(t.protocol, t.name): t for t in DEMO_TAGS}
    assert tag_value(tag["modbus_tcp", "press.production_count"], snap) == 5
    assert tag_value(tag["modbus_tcp", "press.scrap_count"], snap) == 40000
    assert tag_value(tag["s7", "press.bad_count"], snap) == 40000 % 32768
    assert tag_value(tag["s7", "press.good_count"], snap) == (2**32 + 5 - 40000) % 2**15


def test_demo_tags_layout():
    s7 = {t.name: (t.dtype, t.db, t.offset, t.bit) for t in tags_for("s7")}
    assert s7 == {
        "press.bad_part": ("bool", 1, 0, 0),
        "press.good_part": ("bool", 1, 0, 1),
        "press.machine_on": ("bool", 1, 0, 2),
        "press.current": ("float32", 1, 2, None),
        "press.vibration": ("float32", 1, 6, None),
        "press.good_count": ("int16", 1, 10, None),
        "press.bad_count": ("int16", 1, 12, None),
    }
    assert DB1_SIZE == 14
    mb = {t.name: (t.unit, t.table, t.address, t.dtype, t.word_order) for t in tags_for("modbus_tcp")}
    assert mb["press.production_count"] == (1, "holding", 0, "uint32", "ABCD")
    assert mb["press.scrap_count"] == (1, "holding", 2, "uint16", None)
    assert mb["press.machine_state"] == (1, "holding", 3, "uint16", None)
    assert mb["press.temperature"] == (1, "holding", 4, "float32", "ABCD")
    assert mb["press.pressure"] == (1, "holding", 6, "float32", "CDAB")
    assert [mb[n][1:3] for n in ("press.running", "press.fault", "press.door_open")] == [
        ("coil", 0), ("coil", 1), ("coil", 2)]
    rtu = {t.name: (t.table, t.address, t.dtype) for t in tags_for("modbus_rtu")}
    assert rtu["meter.voltage_l1"] == ("input", 0, "float32")
    assert rtu["meter.current_l1"] == ("input", 6, "float32")
    assert rtu["meter.power_l1"] == ("input", 12, "float32")
    assert rtu["meter.energy_kwh"] == ("input", 0x156, "float32")
    # No two values share a register / byte.
    for proto in ("modbus_tcp", "modbus_rtu"):
        used: set[tuple[str, int]] = set()
        for t in tags_for(proto):
            cells = {(t.table, t.address + i) for i in range(t.register_count)}
            assert not cells & used, t
            used |= cells
    bytes_used: set[int] = set()
    for t in tags_for("s7"):
        if t.dtype != "bool":
            cells = set(range(t.offset, t.offset + t.byte_size))
            assert not cells & bytes_used and max(cells) < DB1_SIZE, t
            bytes_used |= cells
    assert all(dataclasses.is_dataclass(t) for t in DEMO_TAGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEMO_TAGS[0].address = 9  # type: ignore[misc]


# --- servers: values ---------------------------------------------------------------


async def test_modbus_tcp_holding_registers_and_coils(frozen):
    snap = frozen.plant.snapshot
    assert snap.production_count > 0 and snap.running
    rr = await mb_read(frozen.modbus_port, 0, 10)
    assert not rr.isError(), rr
    r = rr.registers
    assert u32(r[0], r[1]) == snap.production_count
    assert r[2] == snap.scrap_count
    assert r[3] == int(snap.state) == 1
    assert f32(r[4], r[5]) == as_f32(snap.temperature)
    assert f32(r[7], r[6]) == as_f32(snap.pressure)  # CDAB: low word first
    assert not 100.0 < abs(f32(r[6], r[7])) < 300.0  # read as ABCD it is garbage
    assert f32(r[8], r[9]) == as_f32(snap.motor_current)
    client = mb_client(frozen.modbus_port)
    try:
        assert await client.connect()
        coils = await client.read_coils(0, count=3, device_id=1)
        assert coils.bits[:3] == [snap.running, snap.fault, snap.door_open] == [True, False, False]
        one = await client.read_coils(1, count=1, device_id=1)
        assert one.bits[0] is False
    finally:
        client.close()


async def test_modbus_rtu_over_tcp_energy_meter(frozen):
    snap = frozen.plant.snapshot
    rr = await mb_read(frozen.rtu_port, 0, 18, table="input", framer=FramerType.RTU)
    assert not rr.isError(), rr
    r = rr.registers
    assert f32(r[0], r[1]) == as_f32(snap.voltage_l1)
    assert f32(r[6], r[7]) == as_f32(snap.current_l1)
    assert f32(r[12], r[13]) == as_f32(snap.power_l1)
    assert 225.0 < f32(r[0], r[1]) < 235.0
    kwh = await mb_read(frozen.rtu_port, 342, 2, table="input", framer=FramerType.RTU)
    assert f32(*kwh.registers) == as_f32(snap.energy_kwh)
    # A gap in the SDM630 map is an illegal address, as on the real meter.
    gap = await mb_read(frozen.rtu_port, 100, 2, table="input", framer=FramerType.RTU)
    assert gap.isError() and gap.exception_code == 2


async def test_s7_db1_layout(frozen):
    snap = frozen.plant.snapshot
    db = await s7_read(frozen.s7_port)
    assert len(db) == DB1_SIZE
    assert [bool(db[0] >> bit & 1) for bit in range(3)] == [snap.scrap_count % 2 == 1, snap.good_count % 2 == 1,
                                                            snap.running]
    assert db[0] >> 3 == 0 and db[1] == 0
    assert struct.unpack_from(">f", db, 2)[0] == as_f32(snap.motor_current)
    assert struct.unpack_from(">f", db, 6)[0] == as_f32(snap.vibration) and snap.vibration > 1.0
    assert struct.unpack_from(">h", db, 10)[0] == snap.good_count % 32768
    assert struct.unpack_from(">h", db, 12)[0] == snap.scrap_count % 32768
    part = await s7_read(frozen.s7_port, 10, 4)
    assert struct.unpack(">hh", part) == (snap.good_count, snap.scrap_count)


async def test_counters_increase_over_time(sim):
    async def production_modbus() -> int:
        r = (await mb_read(sim.modbus_port, 0, 2)).registers
        return u32(r[0], r[1])

    async def production_s7() -> int:
        return struct.unpack_from(">h", await s7_read(sim.s7_port), 10)[0]

    async def energy() -> float:
        return f32(*(await mb_read(sim.rtu_port, 342, 2, table="input", framer=FramerType.RTU)).registers)

    first_mb, first_s7, first_kwh = await production_modbus(), await production_s7(), await energy()

    async def all_moved():
        return (await production_modbus() > first_mb and await production_s7() > first_s7
                and await energy() > first_kwh)

    await wait_for(all_moved, timeout=8.0, interval=0.2)


# --- servers: faults ---------------------------------------------------------------


async def test_modbus_pause_and_resume(sim):
    port = sim.modbus_port
    client = mb_client(port)
    try:
        assert await client.connect()
        assert not (await client.read_holding_registers(0, count=2, device_id=1)).isError()
        await sim.modbus.pause()
        assert sim.modbus.paused and not sim.modbus.serving
        with pytest.raises(ModbusException):
            await client.read_holding_registers(0, count=2, device_id=1)
    finally:
        client.close()
    fresh = mb_client(port)
    try:
        assert not await fresh.connect()  # connection refused
    finally:
        fresh.close()

    await sim.modbus.resume()
    assert sim.modbus.port == port and sim.modbus.serving

    async def readable():
        try:
            return not (await mb_read(port, 0, 2)).isError()
        except (ModbusException, AssertionError):
            return False

    await wait_for(readable)


async def test_modbus_exception_and_delay_modes(sim):
    sim.modbus.set_exception()  # illegal data address
    rr = await mb_read(sim.modbus_port, 0, 2)
    assert rr.isError() and rr.exception_code == 2
    sim.modbus.set_exception(4)  # device failure
    assert (await mb_read(sim.modbus_port, 4, 2)).exception_code == 4
    sim.rtu.set_exception(6)  # device busy, on the RTU line too
    rr = await mb_read(sim.rtu_port, 0, 2, table="input", framer=FramerType.RTU)
    assert rr.isError() and rr.exception_code == 6
    sim.modbus.set_exception(None)
    sim.rtu.set_exception(None)
    assert not (await mb_read(sim.modbus_port, 0, 2)).isError()
    assert not (await mb_read(sim.rtu_port, 0, 2, table="input", framer=FramerType.RTU)).isError()

    sim.modbus.set_delay(1.5)  # longer than the client's 1 s timeout
    with pytest.raises(ModbusException):
        await mb_read(sim.modbus_port, 0, 2)
    sim.modbus.set_delay(0)
    assert not (await mb_read(sim.modbus_port, 0, 2)).isError()


async def test_modbus_refuses_unmapped_addresses_writes_and_units(sim):
    assert (await mb_read(sim.modbus_port, 10, 1)).exception_code == 2  # past the map
    assert (await mb_read(sim.modbus_port, 0, 1, table="input")).exception_code == 2  # no input registers
    assert (await mb_read(sim.modbus_port, 0, 1, unit=9)).exception_code == 0x0B  # unknown unit
    client = mb_client(sim.modbus_port)
    try:
        assert await client.connect()
        assert (await client.write_register(3, 0, device_id=1)).exception_code == 2  # read-only
        assert (await client.write_coil(0, False, device_id=1)).exception_code == 2
        assert (await client.read_discrete_inputs(0, count=1, device_id=1)).exception_code == 2
    finally:
        client.close()


async def test_s7_pause_and_resume(sim):
    port = sim.s7_port
    client = snap7.client.Client()
    try:
        await asyncio.to_thread(client.connect, HOST, 0, 1, port)
        assert len(await asyncio.to_thread(client.db_read, 1, 0, DB1_SIZE)) == DB1_SIZE
        await sim.s7.pause()
        assert sim.s7.paused and not sim.s7.serving
        with pytest.raises(snap7.error.S7Error):  # connection closed by peer
            await asyncio.to_thread(client.db_read, 1, 0, DB1_SIZE)
    finally:
        await asyncio.to_thread(client.disconnect)
    with pytest.raises(snap7.error.S7ConnectionError):
        await s7_read(port)  # connection refused

    await sim.s7.resume()
    assert sim.s7.port == port

    async def readable():
        try:
            return len(await s7_read(port)) == DB1_SIZE
        except snap7.error.S7Error:
            return False

    await wait_for(readable)


async def test_s7_missing_db_mode(sim):
    sim.s7.set_db_missing(True)
    with pytest.raises(snap7.error.S7Error):
        await s7_read(sim.s7_port)
    sim.s7.set_db_missing(False)
    assert len(await s7_read(sim.s7_port)) == DB1_SIZE


async def test_simulator_ports_and_busy_port():
    async with Simulator() as s:
        ports = {s.modbus_port, s.rtu_port, s.s7_port}
        assert len(ports) == 3 and 0 not in ports
        assert set(s.endpoints()) == {"modbus_tcp", "modbus_rtu", "s7"}
        # snap7 listens with SO_REUSEPORT, so a second S7 server would silently share the port.
        other = S7Sim(s.plant, port=s.s7_port)
        with pytest.raises(ListenError) as info:
            await other.start()
        assert str(s.s7_port) in str(info.value)
        clash = Simulator(modbus_port=s.rtu_port)
        with pytest.raises(ListenError):
            await clash.start()
        assert not clash.modbus.running and not clash.s7.running
    # Stopped: every port is free again.
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, port))


# --- CLI ---------------------------------------------------------------------------


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "services"), str(REPO / "gen")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


async def _spawn_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabrica_svc.plcsim.cli", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=_cli_env(), cwd=REPO,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_cli_serves_and_exits_0_on_signal(sig):
    proc = await _spawn_cli("--modbus-port", "0", "--rtu-port", "0", "--s7-port", "0", "--seed", "9")
    try:
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 15
        while "ready" not in ports:
            line = await asyncio.wait_for(proc.stderr.readline(), max(0.1, deadline - time.monotonic()))
            assert line, "plcsim exited before it was ready"
            text = line.decode()
            if m := re.search(r"plcsim (\w+) listening on 127\.0\.0\.1:(\d+)", text):
                ports[m.group(1)] = int(m.group(2))
            elif "plcsim ready" in text:
                ports["ready"] = 1
        assert {"modbus_tcp", "modbus_rtu", "s7"} <= set(ports)
        assert not (await mb_read(ports["modbus_tcp"], 0, 4)).isError()
        assert len(await s7_read(ports["s7"])) == DB1_SIZE
        proc.send_signal(sig)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_busy_port_is_a_one_line_error():
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = await _spawn_cli("--modbus-port", "0", "--rtu-port", "0", "--s7-port", str(port))
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 2
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("fabrica plcsim: error: cannot listen on 127.0.0.1:") and str(port) in lines[0]


# --- test hooks: a manual clock, held answers, silent units, garbage -----------------


@pytest.mark.parametrize("config", [PlantConfig(seed=2), PlantConfig(seed=3, rate=3.0, run_min=1.0, run_max=1.5)])
def test_time_of_count_is_the_first_instant_of_each_count_through_stops(config):
    plant = Plant(config)
    assert plant.time_of_count(0) == 0.0
    previous = 0.0
    for count in (1, 2, 3, 7, 40, 41, 250):
        t = plant.time_of_count(count)
        assert plant.at(t).production_count == count
        assert plant.at(t).running
        # An instant earlier the count was lower: t is where it first reaches `count`.
        assert plant.at(max(0.0, t - 1e-6)).production_count == count - 1
        assert t > previous
        previous = t
    if config.run_max < 2:  # short runs: the counts above span many stops
        assert sum(s.state is not MachineState.RUNNING for s in plant.segments(previous)) >= 10
    with pytest.raises(ValueError):
        Plant(PlantConfig(rate=0.0)).time_of_count(1)


def test_manual_clock():
    clock = ManualClock(5.0)
    assert clock() == 5.0 and clock.advance(2.5) == 7.5 and clock() == 7.5
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_make_parts_moves_the_counter_by_exactly_that_much_on_every_server():
    async with Simulator(seed=6, clock=ManualClock(), config=PlantConfig(seed=6, run_min=2.0, run_max=3.0)) as s:

        async def served() -> tuple[int, int]:
            r = (await mb_read(s.modbus_port, 0, 2)).registers
            good, bad = struct.unpack_from(">hh", await s7_read(s.s7_port), 10)  # DB1's INT counters
            return u32(r[0], r[1]), good + bad

        assert await served() == (0, 0)
        total = 0
        for parts in (1, 5, 2, 13, 1):  # 22 parts at 2/s with 2-3 s runs: through several stops
            snap = s.make_parts(parts)
            total += parts
            assert snap.production_count == total
            assert await served() == (total, total)
            await asyncio.sleep(2 * s.modbus.refresh_interval)  # the refresh timers ran: nothing moved
            assert await served() == (total, total)
    with pytest.raises(TypeError):
        Simulator().make_parts(1)


async def test_held_answers_wait_for_release_and_are_counted(sim):
    client = mb_client(sim.modbus_port)
    s7 = snap7.client.Client()
    try:
        assert await client.connect()
        await asyncio.to_thread(s7.connect, HOST, 0, 1, sim.s7_port)
        received = sim.modbus.faults.received, sim.s7.faults.received
        sim.modbus.hold()
        sim.s7.hold()
        assert sim.modbus.faults.held and sim.s7.faults.held
        modbus_read = asyncio.ensure_future(client.read_holding_registers(0, count=2, device_id=1))
        s7_read_ = asyncio.ensure_future(asyncio.to_thread(s7.db_read, 1, 0, DB1_SIZE))
        await wait_for(lambda: _true(sim.modbus.faults.waiting == 1 and sim.s7.faults.waiting == 1))
        assert not modbus_read.done() and not s7_read_.done()
        assert (sim.modbus.faults.received, sim.s7.faults.received) == (received[0] + 1, received[1] + 1)
        sim.modbus.release()
        sim.s7.release()
        assert not (await modbus_read).isError()
        assert len(await s7_read_) == DB1_SIZE
        assert sim.modbus.faults.waiting == sim.s7.faults.waiting == 0
        # Held again, then stopped: stop lets the held answer go (nothing hangs).
        sim.s7.hold()
        late = asyncio.ensure_future(asyncio.to_thread(s7.db_read, 1, 0, DB1_SIZE))
        await wait_for(lambda: _true(sim.s7.faults.waiting == 1))
        await sim.s7.stop()
        assert not sim.s7.faults.held
        with contextlib.suppress(snap7.error.S7Error):
            await late
        assert sim.s7.faults.waiting == 0
    finally:
        client.close()
        await asyncio.to_thread(s7.disconnect)


async def test_s7_delay_mode(sim):
    sim.s7.set_delay(0.2)
    assert sim.s7.faults.delay == 0.2
    assert len(await s7_read(sim.s7_port)) == DB1_SIZE  # late, within snap7's 5 s
    sim.s7.set_delay(0)


async def test_an_rtu_line_of_several_units_with_a_silent_one_and_the_request_log():
    clock = ManualClock()
    plant = Plant(PlantConfig(seed=1))
    async with ModbusSim(plant, "modbus_rtu", units=(1, 2, 3), clock=clock) as line:
        line.set_silent(3)
        client = mb_client(line.port, FramerType.RTU)
        try:
            assert await client.connect()
            for unit in (1, 2):
                rr = await client.read_input_registers(0, count=2, device_id=unit)
                assert not rr.isError() and 225.0 < f32(*rr.registers) < 235.0
            with pytest.raises(ModbusException):  # no answer at all: the client times out
                await client.read_input_registers(0, count=2, device_id=3)
            rr = await client.read_input_registers(0, count=2, device_id=1)  # the line goes on
            assert not rr.isError()
            rr = await client.read_input_registers(0, count=2, device_id=9)
            assert rr.isError() and rr.exception_code == 0x0B
            line.set_silent(3, False)
            assert not (await client.read_input_registers(0, count=2, device_id=3)).isError()
        finally:
            client.close()
        assert list(line.request_units) == [1, 2, 3, 1, 9, 3]
    with pytest.raises(ValueError):
        ModbusSim(plant, "modbus_rtu", units=(1, 1))


@pytest.mark.parametrize("which", ["modbus", "rtu"])
async def test_garbage_answers_are_malformed_frames(sim, which):
    server = getattr(sim, which)
    framer = FramerType.SOCKET if which == "modbus" else FramerType.RTU
    table = "holding" if which == "modbus" else "input"
    server.set_garbage()
    with pytest.raises(ModbusException):  # the client cannot decode the answer: no usable response
        await mb_read(server.port, 0, 2, table=table, framer=framer)
    server.set_garbage(False)
    assert not (await mb_read(server.port, 0, 2, table=table, framer=framer)).isError()


async def _true(value: bool) -> bool:
    return value
