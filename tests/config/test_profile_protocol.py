"""A device profile on a PLC of the other protocol: one clear error about the protocol, not one per tag.
And the Modbus TCP unit id the config service writes in when it is not set (1)."""

from __future__ import annotations

import grpc
import pytest
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import plc_pb2

from grpc_helpers import field_violations

from .test_config_service import count_plcs, modbus_plc

Code = grpc.StatusCode


@pytest.mark.parametrize(("profile_id", "connection", "says"), [
    ("s7-press-db1", {"modbus_tcp": plc_pb2.ModbusTcpConnection(host="10.1.2.3", unit_id=1)},
     "profile 's7-press-db1' is for S7 devices, but the PLC's connection (modbus_tcp) is Modbus"),
    ("s7-press-db1", {"modbus_rtu": plc_pb2.ModbusRtuConnection(serial_port="/dev/ttyUSB0", unit_id=1)},
     "profile 's7-press-db1' is for S7 devices, but the PLC's connection (modbus_rtu) is Modbus"),
    ("eastron-sdm630", {"s7": plc_pb2.S7Connection(host="10.1.2.3", slot=1)},
     "profile 'eastron-sdm630' is for Modbus devices, but the PLC's connection (s7) is S7"),
])
async def test_a_profile_of_the_other_protocol_is_one_violation_about_the_protocol(
        stub: pb_grpc.ConfigServiceStub, database_url: str, profile_id: str, connection: dict, says: str) -> None:
    plc = plc_pb2.Plc(id="wrong", collector_id="cell-1", enabled=True, **connection)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreatePlcFromProfile(pb.CreatePlcFromProfileRequest(profile_id=profile_id, plc=plc))
    assert err.value.code() == Code.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert list(violations) == ["profile_id"], violations
    assert violations["profile_id"].startswith(says)
    assert await count_plcs(database_url) == 0


async def test_a_modbus_tcp_plc_without_a_unit_id_is_stored_with_unit_1(stub: pb_grpc.ConfigServiceStub) -> None:
    plc = modbus_plc("no-unit")
    plc.modbus_tcp.ClearField("unit_id")
    created = (await stub.CreatePlc(pb.CreatePlcRequest(plc=plc))).plc
    assert created.modbus_tcp.unit_id == 1
    plc = modbus_plc("unit-7")
    plc.modbus_tcp.unit_id = 7
    assert (await stub.CreatePlc(pb.CreatePlcRequest(plc=plc))).plc.modbus_tcp.unit_id == 7
