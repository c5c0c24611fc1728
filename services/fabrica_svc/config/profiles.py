"""Device profiles shipped with Fabrica: templates that expand into a PLC's poll groups and tags.

Addresses are zero-based, as on the wire (a manual's "30001" is input register 0).
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


def _group(name: str, seconds: float) -> plc_pb2.PollGroup:
    return plc_pb2.PollGroup(name=name, poll_interval=duration_from_seconds(seconds))


def _modbus(name: str, address: int, data_type: int, unit: str, description: str, **kw: object) -> plc_pb2.Tag:
    return plc_pb2.Tag(name=name, description=description, unit=unit, data_type=data_type, role=MEASUREMENT,
                       modbus=plc_pb2.ModbusAddress(table=INPUT, address=address), **kw)


def _sdm630() -> device_profile_pb2.DeviceProfile:
    regs = [
        ("l1_voltage", 0x00, "V", "Phase 1 line-to-neutral voltage"),
        ("l2_voltage", 0x02, "V", "Phase 2 line-to-neutral voltage"),
        ("l3_voltage", 0x04, "V", "Phase 3 line-to-neutral voltage"),
        ("l1_current", 0x06, "A", "Phase 1 current"),
        ("l2_current", 0x08, "A", "Phase 2 current"),
        ("l3_current", 0x0A, "A", "Phase 3 current"),
        ("l1_power", 0x0C, "W", "Phase 1 active power"),
        ("l2_power", 0x0E, "W", "Phase 2 active power"),
        ("l3_power", 0x10, "W", "Phase 3 active power"),
        ("total_power", 0x34, "W", "Total system active power"),
        ("frequency", 0x46, "Hz", "Supply frequency"),
        ("import_energy", 0x48, "kWh", "Total import active energy"),
        ("export_energy", 0x4A, "kWh", "Total export active energy"),
        ("total_energy", 0x156, "kWh", "Total active energy"),
    ]
    return device_profile_pb2.DeviceProfile(
        id="eastron-sdm630",
        display_name="Eastron SDM630 three-phase energy meter",
        description=(
            "Modbus RTU (RS-485) or through a gateway; factory setting 9600 baud, 8 data bits, no parity, 1 stop "
            "bit, unit id 1. Values are IEEE 754 float32 in input registers, high word first."
        ),
        protocol=device_profile_pb2.PROTOCOL_MODBUS,
        poll_groups=[_group("default", 1.0)],
        tags=[_modbus(n, a, F32, u, d, deadband=0.0) for n, a, u, d in regs],
    )


def _pzem004t() -> device_profile_pb2.DeviceProfile:
    little = plc_pb2.WORD_ORDER_LITTLE_ENDIAN
    return device_profile_pb2.DeviceProfile(
        id="peacefair-pzem-004t",
        display_name="Peacefair PZEM-004T v3 single-phase meter",
        description=(
            "Modbus RTU (TTL serial, usually through an RS-485 adapter): 9600 baud, 8N1, unit id 1 by default. "
            "32-bit values are sent low word first."
        ),
        protocol=device_profile_pb2.PROTOCOL_MODBUS,
        poll_groups=[_group("default", 1.0)],
        tags=[
            _modbus("voltage", 0x0000, U16, "V", "Voltage", scale=0.1),
            _modbus("current", 0x0001, U32, "A", "Current", scale=0.001, word_order=little),
            _modbus("power", 0x0003, U32, "W", "Active power", scale=0.1, word_order=little),
            _modbus("energy", 0x0005, U32, "Wh", "Active energy", word_order=little),
            _modbus("frequency", 0x0007, U16, "Hz", "Frequency", scale=0.1),
            _modbus("power_factor", 0x0008, U16, "", "Power factor", scale=0.01),
            _modbus("alarm", 0x0009, U16, "", "Power alarm (65535 = over threshold)"),
        ],
    )


def _s7_tag(name: str, offset: int, data_type: int, description: str, **kw: object) -> plc_pb2.Tag:
    return plc_pb2.Tag(
        name=name, description=description, data_type=data_type,
        s7=plc_pb2.S7Address(area=plc_pb2.S7_AREA_DATA_BLOCK, db_number=1, byte_offset=offset), **kw
    )


def _s7_press_db() -> device_profile_pb2.DeviceProfile:
    return device_profile_pb2.DeviceProfile(
        id="s7-press-db1",
        display_name="S7 press data block (DB1)",
        description=(
            "A press cell's data block DB1 (not optimized, PUT/GET enabled): BOOL running, fault, door_open in "
            "byte 0 bits 0-2; REAL temperature at 2 and pressure at 6; INT machine state at 10 (1 = running) and "
            "scrap count at 12; DINT good-parts count at 14. Change db_number after creating if yours differs."
        ),
        protocol=device_profile_pb2.PROTOCOL_S7,
        poll_groups=[_group("fast", 0.5), _group("slow", 5.0)],
        tags=[
            _s7_tag("running", 0, BOOL, "Machine running", bit=0, poll_group="fast", role=MEASUREMENT),
            _s7_tag("fault", 0, BOOL, "Machine fault", bit=1, poll_group="fast", role=MEASUREMENT),
            _s7_tag("door_open", 0, BOOL, "Guard door open", bit=2, poll_group="fast", role=MEASUREMENT),
            _s7_tag("temperature", 2, F32, "Oil temperature", unit="°C", deadband=0.1, poll_group="slow",
                    role=MEASUREMENT),
            _s7_tag("pressure", 6, F32, "Hydraulic pressure", unit="bar", deadband=0.5, poll_group="slow",
                    role=MEASUREMENT),
            _s7_tag("machine_state", 10, I16, "Machine state (1 running)", poll_group="fast",
                    role=reading_pb2.TAG_ROLE_MACHINE_STATE),
            _s7_tag("scrap_count", 12, I16, "Scrap parts counter", unit="pcs", poll_group="fast", counter_width=16,
                    role=reading_pb2.TAG_ROLE_SCRAP_COUNTER),
            _s7_tag("good_count", 14, I32, "Good parts counter", unit="pcs", poll_group="fast", counter_width=32,
                    role=reading_pb2.TAG_ROLE_PRODUCTION_COUNTER),
        ],
    )


PROFILES: dict[str, device_profile_pb2.DeviceProfile] = {
    p.id: p for p in sorted((_sdm630(), _pzem004t(), _s7_press_db()), key=lambda p: p.id)
}
