"""Device profiles shipped with Fabrica: templates that expand into a PLC's poll groups and tags.

Addresses are zero-based, as on the wire (a manual's "30001" is input register 0). Each Modbus profile says
which published register map it follows (document and version); the golden tests (tests/config/
test_profiles_golden.py) poll each profile with the real collector against a simulated device built from
that map. A tag marked ``optional`` is at an address only some variants of the device have: on a device
without it the collector reports it QUALITY_CONFIG_ERROR naming the address, and the flag says that this is
expected, not a fault.

Profiles have no parameters (CreatePlcFromProfile copies them as they are). The generic "S7 DB with N REALs"
is therefore shipped for a few sizes (``s7-db1-reals-<n>``, DB1); :func:`s7_db_reals` builds any size and DB
number, and on a PLC created from a shipped size the engineer changes the DB number or drops tags with
UpdatePlc (update_mask "tags").
"""

from __future__ import annotations

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import device_profile_pb2, plc_pb2

from ..runtime.timefmt import duration_from_seconds

F32, U16, U32, I16, I32, BOOL = (
    plc_pb2.DATA_TYPE_FLOAT32,
    plc_pb2.DATA_TYPE_UINT16,
    plc_pb2.DATA_TYPE_UINT32,
    plc_pb2.DATA_TYPE_INT16,
    plc_pb2.DATA_TYPE_INT32,
    plc_pb2.DATA_TYPE_BOOL,
)
INPUT = plc_pb2.MODBUS_TABLE_INPUT_REGISTER
MEASUREMENT = reading_pb2.TAG_ROLE_MEASUREMENT
#: The sizes of the generic "S7 DB with N REALs" profile that are shipped.
S7_REAL_COUNTS = (8, 16, 32, 64)


def _group(name: str, seconds: float) -> plc_pb2.PollGroup:
    return plc_pb2.PollGroup(name=name, poll_interval=duration_from_seconds(seconds))


def _modbus(name: str, address: int, data_type: int, unit: str, description: str, **kw: object) -> plc_pb2.Tag:
    return plc_pb2.Tag(name=name, description=description, unit=unit, data_type=data_type, role=MEASUREMENT,
                       modbus=plc_pb2.ModbusAddress(table=INPUT, address=address), **kw)


def _eastron(rows: list[tuple[str, int, str, str]], optional: frozenset[str] = frozenset()) -> list[plc_pb2.Tag]:
    """Eastron input registers: every value an IEEE 754 float32 in two registers, high word first (ABCD)."""
    return [_modbus(n, a, F32, u, d, byte_order=plc_pb2.BYTE_ORDER_BIG_ENDIAN,
                    word_order=plc_pb2.WORD_ORDER_BIG_ENDIAN, optional=n in optional)
            for n, a, u, d in rows]


_EASTRON_SETUP = (
    "Modbus RTU over RS-485 (or through a serial gateway), function 04 (input registers), every value an IEEE 754 "
    "float32 in two registers, high word first. Factory setting unit id 1, 8 data bits, 1 stop bit; check baud "
    "rate and parity in the meter's set-up menu (they differ by model and batch) and set the PLC's connection "
    "to match."
)


def _sdm630() -> device_profile_pb2.DeviceProfile:
    # Eastron SDM630-Modbus V2 user manual (B+G e-tech), section 1.2 "Modbus Protocol Input Registers".
    regs = [
        ("l1_voltage", 0x00, "V", "Phase 1 line to neutral volts (30001)"),
        ("l2_voltage", 0x02, "V", "Phase 2 line to neutral volts (30003)"),
        ("l3_voltage", 0x04, "V", "Phase 3 line to neutral volts (30005)"),
        ("l1_current", 0x06, "A", "Phase 1 current (30007)"),
        ("l2_current", 0x08, "A", "Phase 2 current (30009)"),
        ("l3_current", 0x0A, "A", "Phase 3 current (30011)"),
        ("l1_power", 0x0C, "W", "Phase 1 active power (30013)"),
        ("l2_power", 0x0E, "W", "Phase 2 active power (30015)"),
        ("l3_power", 0x10, "W", "Phase 3 active power (30017)"),
        ("total_power", 0x34, "W", "Total system power (30053)"),
        ("frequency", 0x46, "Hz", "Frequency of supply voltages (30071)"),
        ("import_energy", 0x48, "kWh", "Total import active energy (30073)"),
        ("export_energy", 0x4A, "kWh", "Total export active energy (30075)"),
        ("total_energy", 0x156, "kWh", "Total active energy (30343)"),
    ]
    # The SDM72D-M shares this map but has none of the per-phase registers nor the frequency (Eastron SDM72D-M
    # user manual V1.5, part 3, lists 0x34, 0x48, 0x4A, 0x156 and the resettable energies only).
    per_phase = frozenset(n for n, _, _, _ in regs if n[:2] in ("l1", "l2", "l3")) | {"frequency"}
    return device_profile_pb2.DeviceProfile(
        id="eastron-sdm630",
        display_name="Eastron SDM630 three-phase energy meter",
        description=(
            "Register map: Eastron SDM630-Modbus V2 user manual, 1.2 Modbus Protocol Input Registers. "
            + _EASTRON_SETUP
            + " The per-phase registers and the frequency are optional: the SDM72D-M (user manual V1.5, part 3), "
            "which shares this map, has only the totals. A request may hold at most 30 parameters (60 registers); "
            "the tags here plan into blocks of at most 24."
        ),
        protocol=device_profile_pb2.PROTOCOL_MODBUS,
        poll_groups=[_group("default", 1.0)],
        tags=_eastron(regs, per_phase),
    )


# Eastron single-phase meters, input registers (function 04), float32 high word first; the addresses below are
# in both the SDM120-Modbus and the SDM230-Modbus protocol documents (Eastron "SDM120 Modbus protocol" and
# "SDM230 Modbus protocol", input register tables).
_SINGLE_PHASE = [
    ("voltage", 0x00, "V", "Line to neutral volts (30001)"),
    ("current", 0x06, "A", "Current (30007)"),
    ("active_power", 0x0C, "W", "Active power (30013)"),
    ("apparent_power", 0x12, "VA", "Apparent power (30019)"),
    ("reactive_power", 0x18, "VAr", "Reactive power (30025)"),
    ("power_factor", 0x1E, "", "Power factor, signed by the direction of the current (30031)"),
    ("phase_angle", 0x24, "°", "Phase angle (30037)"),
    ("frequency", 0x46, "Hz", "Frequency (30071)"),
    ("import_energy", 0x48, "kWh", "Import active energy (30073)"),
    ("export_energy", 0x4A, "kWh", "Export active energy (30075)"),
    ("import_reactive_energy", 0x4C, "kvarh", "Import reactive energy (30077)"),
    ("export_reactive_energy", 0x4E, "kvarh", "Export reactive energy (30079)"),
    ("total_energy", 0x156, "kWh", "Total active energy (30343)"),
    ("total_reactive_energy", 0x158, "kvarh", "Total reactive energy (30345)"),
]


def _sdm120() -> device_profile_pb2.DeviceProfile:
    return device_profile_pb2.DeviceProfile(
        id="eastron-sdm120",
        display_name="Eastron SDM120 single-phase energy meter",
        description="Register map: Eastron SDM120-Modbus protocol, input registers. " + _EASTRON_SETUP,
        protocol=device_profile_pb2.PROTOCOL_MODBUS,
        poll_groups=[_group("default", 1.0)],
        tags=_eastron(_SINGLE_PHASE),
    )


def _sdm230() -> device_profile_pb2.DeviceProfile:
    demand = [
        ("total_power_demand", 0x54, "W", "Total system power demand (30085)"),
        ("max_total_power_demand", 0x56, "W", "Maximum total system power demand (30087)"),
        ("current_demand", 0x102, "A", "Current demand (30259)"),
        ("max_current_demand", 0x108, "A", "Maximum current demand (30265)"),
    ]
    return device_profile_pb2.DeviceProfile(
        id="eastron-sdm230",
        display_name="Eastron SDM230 single-phase energy meter",
        description=("Register map: Eastron SDM230-Modbus protocol, input registers (the SDM120's plus the demand "
                     "registers). " + _EASTRON_SETUP),
        protocol=device_profile_pb2.PROTOCOL_MODBUS,
        poll_groups=[_group("default", 1.0)],
        tags=_eastron(_SINGLE_PHASE + demand),
    )


def _pzem004t() -> device_profile_pb2.DeviceProfile:
    # Peacefair "PZEM-004T V3.0 Datasheet / User Manual", 2.3 "Read the measurement result": input registers,
    # 32-bit values as two registers, low 16 bits first.
    little = plc_pb2.WORD_ORDER_LITTLE_ENDIAN
    return device_profile_pb2.DeviceProfile(
        id="peacefair-pzem-004t",
        display_name="Peacefair PZEM-004T v3.0 single-phase meter",
        description=(
            "Register map: Peacefair PZEM-004T V3.0 datasheet and user manual, 2.3 (input registers, function 04; "
            "32-bit values low 16 bits first). Modbus RTU over TTL serial, usually through an RS-485 adapter: "
            "9600 baud, 8 data bits, no parity, 1 stop bit; slave address 0x01 to 0xF7 (0xF8 answers on a bus "
            "with one device only). The 10 A and 100 A variants have the same map."
        ),
        protocol=device_profile_pb2.PROTOCOL_MODBUS,
        poll_groups=[_group("default", 1.0)],
        tags=[
            _modbus("voltage", 0x0000, U16, "V", "Voltage, 0.1 V per LSB", scale=0.1),
            _modbus("current", 0x0001, U32, "A", "Current, 0.001 A per LSB", scale=0.001, word_order=little),
            _modbus("power", 0x0003, U32, "W", "Active power, 0.1 W per LSB", scale=0.1, word_order=little),
            _modbus("energy", 0x0005, U32, "Wh", "Active energy, 1 Wh per LSB", word_order=little),
            _modbus("frequency", 0x0007, U16, "Hz", "Frequency, 0.1 Hz per LSB", scale=0.1),
            _modbus("power_factor", 0x0008, U16, "", "Power factor, 0.01 per LSB", scale=0.01),
            _modbus("alarm", 0x0009, U16, "", "Power alarm: 0xFFFF over the threshold, 0x0000 not"),
        ],
    )


def _s7_tag(name: str, offset: int, data_type: int, description: str, db: int = 1, **kw: object) -> plc_pb2.Tag:
    return plc_pb2.Tag(
        name=name, description=description, data_type=data_type,
        s7=plc_pb2.S7Address(area=plc_pb2.S7_AREA_DATA_BLOCK, db_number=db, byte_offset=offset), **kw
    )


def _s7_press_db() -> device_profile_pb2.DeviceProfile:
    """The edge seed's press DB1, 14 bytes: nothing is read past byte 13."""
    return device_profile_pb2.DeviceProfile(
        id="s7-press-db1",
        display_name="S7 press data block (DB1, 14 bytes)",
        description=(
            "A press cell's data block DB1 (not optimized, PUT/GET enabled), 14 bytes: BOOL bad part, good part and "
            "machine on in byte 0 bits 0-2; REAL motor current at 2 and vibration at 6; INT good-parts counter at "
            "10 and bad-parts counter at 12 (16-bit counters). Change db_number after creating if yours differs."
        ),
        protocol=device_profile_pb2.PROTOCOL_S7,
        poll_groups=[_group("fast", 0.5), _group("slow", 5.0)],
        tags=[
            _s7_tag("bad_part", 0, BOOL, "Bad part signal", bit=0, poll_group="fast", role=MEASUREMENT),
            _s7_tag("good_part", 0, BOOL, "Good part signal", bit=1, poll_group="fast", role=MEASUREMENT),
            _s7_tag("machine_on", 0, BOOL, "Machine on (True = running)", bit=2, poll_group="fast",
                    role=reading_pb2.TAG_ROLE_MACHINE_STATE),
            _s7_tag("current", 2, F32, "Motor current", unit="A", deadband=0.1, poll_group="slow",
                    role=MEASUREMENT),
            _s7_tag("vibration", 6, F32, "Vibration", unit="mm/s", deadband=0.1, poll_group="slow",
                    role=MEASUREMENT),
            _s7_tag("good_count", 10, I16, "Good parts counter", unit="pcs", poll_group="fast", counter_width=16,
                    role=reading_pb2.TAG_ROLE_PRODUCTION_COUNTER),
            _s7_tag("bad_count", 12, I16, "Bad parts counter", unit="pcs", poll_group="fast", counter_width=16,
                    role=reading_pb2.TAG_ROLE_SCRAP_COUNTER),
        ],
    )


def s7_db_reals(count: int, db_number: int = 1) -> device_profile_pb2.DeviceProfile:
    """The generic profile "an S7 data block holding `count` REALs back to back from byte 0"."""
    if not 1 <= count <= 1024 or not 1 <= db_number <= 65535:
        raise ValueError("count must be 1 to 1024 and db_number 1 to 65535")
    width = len(str(count - 1))
    return device_profile_pb2.DeviceProfile(
        id=f"s7-db{db_number}-reals-{count}",
        display_name=f"S7 data block DB{db_number} with {count} REALs",
        description=(
            f"DB{db_number} (not optimized, PUT/GET enabled) holding {count} REALs (IEEE 754 float32, big endian) "
            f"at bytes 0, 4, ... {4 * (count - 1)}: {4 * count} bytes. Tags real_{0:0{width}d} ... "
            f"real_{count - 1:0{width}d}; rename them, set units, change db_number or drop the tags you do not use "
            "with UpdatePlc after creating."
        ),
        protocol=device_profile_pb2.PROTOCOL_S7,
        poll_groups=[_group("default", 1.0)],
        tags=[_s7_tag(f"real_{i:0{width}d}", 4 * i, F32, f"REAL at DB{db_number}.DBD{4 * i}", db=db_number,
                      role=MEASUREMENT) for i in range(count)],
    )


PROFILES: dict[str, device_profile_pb2.DeviceProfile] = {
    p.id: p for p in sorted((_sdm630(), _sdm120(), _sdm230(), _pzem004t(), _s7_press_db(),
                             *(s7_db_reals(n) for n in S7_REAL_COUNTS)), key=lambda p: p.id)
}
