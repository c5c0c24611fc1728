"""Golden tests of the shipped device profiles: each profile, expanded as CreatePlcFromProfile expands it and
polled by the collector's real poller, against a simulated device built from the manufacturer's published map
(registers at the published addresses, nothing else; known values). Every tag must decode its value exactly.

The published maps are written here from the documents the profiles cite, by the manuals' own register numbers
(30001 = input register 0) and parameter names, so a wrong address, type, word order or scale in a profile
shows as a wrong value or a tag that reads a register the device does not have.
"""

from __future__ import annotations

import struct

import pytest
from fabrica.common.v1 import reading_pb2
from pymodbus import FramerType

from collector.support import settled_readings, gateway_plc, plc_from_profile, s7_plc, value_of
from fabrica_svc.config.profiles import PROFILES, S7_REAL_COUNTS, s7_db_reals
from fabrica_svc.plcsim import S7Device
from fabrica_svc.plcsim.registers import RegisterDevice

GOOD = reading_pb2.QUALITY_GOOD


def float_registers(published: dict[int, tuple[str, float]]) -> dict[int, int]:
    """An Eastron map: each parameter a float32 at its 3xxxx register, high word first."""
    out: dict[int, int] = {}
    for number, (_, value) in published.items():
        hi, lo = struct.unpack(">HH", struct.pack(">f", value))
        out[number - 30001], out[number - 30000] = hi, lo
    return out


async def poll(profile_id: str, device: RegisterDevice, **kwargs) -> dict[str, reading_pb2.Reading]:
    plc = plc_from_profile(PROFILES[profile_id], "meter",
                           modbus_rtu_over_tcp=gateway_plc("x", device.port, []).modbus_rtu_over_tcp)
    kwargs.setdefault("timeout", 15)
    return await settled_readings(plc, **kwargs)


def assert_exact(got: dict[str, reading_pb2.Reading], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].quality == GOOD, (name, got[name].error)
        assert value_of(got[name]) == value, name


# Eastron SDM630-Modbus V2 user manual, 1.2 input registers (the parameters the profile reads, and some it does
# not, so the device has registers around and between them as the meter has).
SDM630 = {
    30001: ("Phase 1 line to neutral volts", 230.5), 30003: ("Phase 2 line to neutral volts", 231.25),
    30005: ("Phase 3 line to neutral volts", 229.75), 30007: ("Phase 1 current", 10.5),
    30009: ("Phase 2 current", 11.25), 30011: ("Phase 3 current", 12.125), 30013: ("Phase 1 power", 2300.5),
    30015: ("Phase 2 power", 2400.25), 30017: ("Phase 3 power", 2500.75), 30019: ("Phase 1 volt amps", 2600.0),
    30031: ("Phase 1 power factor", 0.875), 30053: ("Total system power", 7201.5),
    30057: ("Total system volt amps", 7800.0), 30063: ("Total system power factor", 0.9375),
    30071: ("Frequency of supply voltages", 50.0625), 30073: ("Import Wh since last reset", 12345.5),
    30075: ("Export Wh since last reset", 67.25), 30343: ("Total kWh", 12412.75),
}
SDM630_TAGS = {"l1_voltage": 30001, "l2_voltage": 30003, "l3_voltage": 30005, "l1_current": 30007,
               "l2_current": 30009, "l3_current": 30011, "l1_power": 30013, "l2_power": 30015, "l3_power": 30017,
               "total_power": 30053, "frequency": 30071, "import_energy": 30073, "export_energy": 30075,
               "total_energy": 30343}


async def test_sdm630_profile_against_the_published_map() -> None:
    async with RegisterDevice(float_registers(SDM630), framer=FramerType.RTU) as device:
        got = await poll("eastron-sdm630", device)
    assert_exact(got, {name: SDM630[number][1] for name, number in SDM630_TAGS.items()})


async def test_sdm630_profile_on_a_meter_without_the_per_phase_registers() -> None:
    """The SDM72D-M's map (user manual V1.5, part 3): the totals only. The tags it lacks are the optional ones;
    every other tag is GOOD."""
    totals = {n: p for n, p in SDM630.items() if n in (30053, 30073, 30075, 30343)}
    optional = {t.name for t in PROFILES["eastron-sdm630"].tags if t.optional}
    async with RegisterDevice(float_registers(totals), framer=FramerType.RTU) as device:
        got = await poll("eastron-sdm630", device, timeout=5,
                         settled=lambda got: all(r.quality == GOOD for n, r in got.items() if n not in optional))
    assert optional == {n for n, number in SDM630_TAGS.items() if number not in totals}
    assert_exact({n: r for n, r in got.items() if n not in optional},
                 {name: SDM630[number][1] for name, number in SDM630_TAGS.items() if number in totals})
    assert all(got[n].quality != GOOD and got[n].error for n in optional)


# Eastron SDM120-Modbus / SDM230-Modbus protocol, input registers.
SINGLE_PHASE = {
    30001: ("Voltage", 229.5), 30007: ("Current", 5.25), 30013: ("Active power", 1150.5),
    30019: ("Apparent power", 1205.0), 30025: ("Reactive power", 350.25), 30031: ("Power factor", -0.953125),
    30037: ("Phase angle", 17.5), 30071: ("Frequency", 49.9375), 30073: ("Import active energy", 321.5),
    30075: ("Export active energy", 12.25), 30077: ("Import reactive energy", 45.5),
    30079: ("Export reactive energy", 3.75), 30343: ("Total active energy", 333.75),
    30345: ("Total reactive energy", 49.25),
}
SINGLE_PHASE_TAGS = {"voltage": 30001, "current": 30007, "active_power": 30013, "apparent_power": 30019,
                     "reactive_power": 30025, "power_factor": 30031, "phase_angle": 30037, "frequency": 30071,
                     "import_energy": 30073, "export_energy": 30075, "import_reactive_energy": 30077,
                     "export_reactive_energy": 30079, "total_energy": 30343, "total_reactive_energy": 30345}
SDM230_DEMAND = {30085: ("Total system power demand", 1100.5), 30087: ("Maximum total system power demand", 2200.0),
                 30259: ("Current demand", 4.75), 30265: ("Maximum current demand", 9.5)}
SDM230_DEMAND_TAGS = {"total_power_demand": 30085, "max_total_power_demand": 30087, "current_demand": 30259,
                      "max_current_demand": 30265}


async def test_sdm120_profile_against_the_published_map() -> None:
    async with RegisterDevice(float_registers(SINGLE_PHASE), framer=FramerType.RTU) as device:
        got = await poll("eastron-sdm120", device)
    assert_exact(got, {name: SINGLE_PHASE[number][1] for name, number in SINGLE_PHASE_TAGS.items()})


async def test_sdm230_profile_against_the_published_map() -> None:
    published = {**SINGLE_PHASE, **SDM230_DEMAND}
    async with RegisterDevice(float_registers(published), framer=FramerType.RTU) as device:
        got = await poll("eastron-sdm230", device)
    tags = {**SINGLE_PHASE_TAGS, **SDM230_DEMAND_TAGS}
    assert_exact(got, {name: published[number][1] for name, number in tags.items()})


async def test_pzem_004t_profile_against_the_published_map() -> None:
    """PZEM-004T V3.0 datasheet 2.3: 0x0000 voltage (0.1 V), 0x0001/0x0002 current low/high 16 bits (0.001 A),
    0x0003/0x0004 power low/high (0.1 W), 0x0005/0x0006 energy low/high (1 Wh), 0x0007 frequency (0.1 Hz),
    0x0008 power factor (0.01), 0x0009 alarm (0xFFFF alarm, 0x0000 none). Values above 16 bits, so a wrong
    word order shows."""
    current, power, energy = 70_000, 123_456, 654_321  # 70.000 A, 12345.6 W, 654321 Wh
    registers = {0: 2301, 1: current & 0xFFFF, 2: current >> 16, 3: power & 0xFFFF, 4: power >> 16,
                 5: energy & 0xFFFF, 6: energy >> 16, 7: 500, 8: 95, 9: 0xFFFF}
    async with RegisterDevice(registers, framer=FramerType.RTU) as device:
        got = await poll("peacefair-pzem-004t", device)
    expected = {"voltage": 230.1, "current": 70.0, "power": 12345.6, "energy": 654321.0, "frequency": 50.0,
                "power_factor": 0.95, "alarm": 65535.0}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].quality == GOOD, (name, got[name].error)
        assert float(value_of(got[name])) == pytest.approx(value, rel=1e-12), name
    units = {t.name: t.unit for t in PROFILES["peacefair-pzem-004t"].tags}
    assert (units["voltage"], units["current"], units["power"], units["energy"]) == ("V", "A", "W", "Wh")


@pytest.mark.parametrize("count", [S7_REAL_COUNTS[0], S7_REAL_COUNTS[-1]])
async def test_s7_db_with_n_reals_profile(count: int) -> None:
    values = [i * 1.5 - 7.25 for i in range(count)]
    async with S7Device({1: struct.pack(f">{count}f", *values)}) as device:
        profile = PROFILES[f"s7-db1-reals-{count}"]
        got = await settled_readings(plc_from_profile(profile, "db", s7=s7_plc("x", device.port, []).s7))
    assert [value_of(got[t.name]) for t in profile.tags] == values
    assert all(r.quality == GOOD for r in got.values())
    assert all(a.end <= 4 * count for a in device.reads)


def test_s7_db_reals_builds_any_size_and_db() -> None:
    profile = s7_db_reals(3, db_number=7)
    assert profile.id == "s7-db7-reals-3"
    assert [(t.name, t.s7.db_number, t.s7.byte_offset) for t in profile.tags] == [
        ("real_0", 7, 0), ("real_1", 7, 4), ("real_2", 7, 8)]
    with pytest.raises(ValueError):
        s7_db_reals(0)
