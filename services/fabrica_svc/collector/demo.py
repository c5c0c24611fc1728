"""The demo PLCs `fabrica run` gives the collector: the simulator's press (Modbus TCP), its energy meter
(Modbus RTU behind a serial gateway) and its S7 press, tag for tag as plcsim's DEMO_TAGS serves them.

Counters and the machine state carry the roles production uses, as DEMO_TAGS names them: on the Modbus
press PRODUCTION_COUNTER on the production count, SCRAP_COUNTER on the scrap count, MACHINE_STATE on the state
word (1 = running); on the S7 press (the edge seed's 14-byte DB1) the good and bad INT counters and the
machine-on bit (True = running).
"""

from __future__ import annotations

from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2
from google.protobuf import duration_pb2

from ..plcsim.plant import DEMO_TAGS, DemoTag

_TYPES = {
    "bool": plc_pb2.DATA_TYPE_BOOL,
    "int16": plc_pb2.DATA_TYPE_INT16,
    "uint16": plc_pb2.DATA_TYPE_UINT16,
    "int32": plc_pb2.DATA_TYPE_INT32,
    "uint32": plc_pb2.DATA_TYPE_UINT32,
    "float32": plc_pb2.DATA_TYPE_FLOAT32,
}
_TABLES = {
    "holding": plc_pb2.MODBUS_TABLE_HOLDING_REGISTER,
    "input": plc_pb2.MODBUS_TABLE_INPUT_REGISTER,
    "coil": plc_pb2.MODBUS_TABLE_COIL,
    "discrete": plc_pb2.MODBUS_TABLE_DISCRETE_INPUT,
}
_ROLES = {
    "production_counter": reading_pb2.TAG_ROLE_PRODUCTION_COUNTER,
    "scrap_counter": reading_pb2.TAG_ROLE_SCRAP_COUNTER,
    "machine_state": reading_pb2.TAG_ROLE_MACHINE_STATE,
}

HOST = "127.0.0.1"


def _tag(row: DemoTag) -> plc_pb2.Tag:
    tag = plc_pb2.Tag(
        name=row.name,
        description=row.description,
        poll_group="default",
        data_type=_TYPES[row.dtype],
        role=_ROLES.get(row.role, reading_pb2.TAG_ROLE_MEASUREMENT),
        unit=row.eng_unit,
    )
    if row.protocol == "s7":
        tag.s7.CopyFrom(plc_pb2.S7Address(area=plc_pb2.S7_AREA_DATA_BLOCK, db_number=row.db or 1,
                                          byte_offset=row.offset or 0))
        if row.dtype == "bool":
            tag.bit = row.bit or 0
        return tag
    tag.modbus.CopyFrom(plc_pb2.ModbusAddress(table=_TABLES[row.table or "holding"], address=row.address or 0))
    tag.byte_order = plc_pb2.BYTE_ORDER_BIG_ENDIAN
    if row.register_count == 2:
        tag.word_order = (plc_pb2.WORD_ORDER_LITTLE_ENDIAN if row.word_order == "CDAB"
                          else plc_pb2.WORD_ORDER_BIG_ENDIAN)
    return tag


def _plc(plc_id: str, name: str, collector_id: str, protocol: str) -> plc_pb2.Plc:
    plc = plc_pb2.Plc(
        id=plc_id,
        display_name=name,
        collector_id=collector_id,
        enabled=True,
        poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration_pb2.Duration(seconds=1),
                                       integrity_interval=duration_pb2.Duration(seconds=60))],
    )
    plc.tags.extend(_tag(row) for row in DEMO_TAGS if row.protocol == protocol)
    return plc


def demo_plcs(collector_id: str, modbus_port: int, rtu_port: int, s7_port: int) -> list[plc_pb2.Plc]:
    """The three demo PLCs of `collector_id`, pointing at a plcsim on 127.0.0.1 with these ports."""
    press = _plc("press-1", "Press 1 (Modbus TCP)", collector_id, "modbus_tcp")
    press.modbus_tcp.CopyFrom(plc_pb2.ModbusTcpConnection(host=HOST, port=modbus_port, unit_id=1))
    meter = _plc("meter-1", "Press 1 energy meter (Modbus RTU via gateway)", collector_id, "modbus_rtu")
    meter.modbus_rtu_over_tcp.CopyFrom(plc_pb2.ModbusRtuOverTcpConnection(host=HOST, port=rtu_port, unit_id=1))
    s7 = _plc("press-2", "Press 2 (S7)", collector_id, "s7")
    s7.s7.CopyFrom(plc_pb2.S7Connection(host=HOST, port=s7_port, rack=0, slot=1))
    return [press, meter, s7]
