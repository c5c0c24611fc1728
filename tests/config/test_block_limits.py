"""A PLC's block limits through ConfigService: stored and updated, and refused with field violations when they
are out of range (the proto's rules) or do not fit the PLC (plcmodel's rules)."""

from __future__ import annotations

import grpc
import pytest
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import plc_pb2
from google.protobuf import duration_pb2, field_mask_pb2

from grpc_helpers import field_violations

from .test_config_service import count_plcs, modbus_plc

Code = grpc.StatusCode


def s7_plc() -> plc_pb2.Plc:
    plc = modbus_plc("line-s7")
    plc.ClearField("modbus_tcp")
    plc.s7.host = "127.0.0.1"
    plc.ClearField("tags")
    plc.tags.add(name="label", s7=plc_pb2.S7Address(db_number=1, byte_offset=0), data_type=plc_pb2.DATA_TYPE_STRING,
                 string_length=40)
    return plc


async def test_block_limits_are_stored_and_updated(stub: pb_grpc.ConfigServiceStub) -> None:
    plc = modbus_plc()
    plc.block_limits.max_registers = 32
    plc.block_limits.max_gap = 0
    plc.block_limits.absent_retry_interval.CopyFrom(duration_pb2.Duration(seconds=3600))
    created = (await stub.CreatePlc(pb.CreatePlcRequest(plc=plc))).plc
    assert created.block_limits == plc.block_limits

    patch = plc_pb2.Plc(id=created.id, etag=created.etag, block_limits=plc_pb2.BlockLimits(no_merge=True))
    updated = (await stub.UpdatePlc(pb.UpdatePlcRequest(
        plc=patch, update_mask=field_mask_pb2.FieldMask(paths=["block_limits"])))).plc
    assert updated.block_limits == plc_pb2.BlockLimits(no_merge=True) and updated.tags == created.tags
    cleared = (await stub.UpdatePlc(pb.UpdatePlcRequest(
        plc=plc_pb2.Plc(id=created.id, etag=updated.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["block_limits"])))).plc
    assert not cleared.HasField("block_limits")


def _limits(**fields: object) -> plc_pb2.BlockLimits:
    return plc_pb2.BlockLimits(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("plc", "limits", "field"), [
    # The proto's ranges (protovalidate).
    (modbus_plc(), _limits(max_registers=126), "plc.block_limits.max_registers"),
    (modbus_plc(), _limits(max_registers=0), "plc.block_limits.max_registers"),
    (modbus_plc(), _limits(max_bits=2001), "plc.block_limits.max_bits"),
    (modbus_plc(), _limits(absent_retry_interval=duration_pb2.Duration(nanos=5)),
     "plc.block_limits.absent_retry_interval"),
    # The rules relating the limits to the PLC (plcmodel).
    (modbus_plc(), _limits(max_s7_bytes=100), "plc.block_limits.max_s7_bytes"),
    (s7_plc(), _limits(max_registers=10), "plc.block_limits.max_registers"),
    (modbus_plc(), _limits(no_merge=True, max_gap=4), "plc.block_limits.max_gap"),
    (modbus_plc(), _limits(max_registers=1), "plc.block_limits.max_registers"),  # UINT32 tags need 2
    (s7_plc(), _limits(max_s7_bytes=41), "plc.block_limits.max_s7_bytes"),  # a STRING[40] needs 42 bytes
], ids=["registers>125", "registers=0", "bits>2000", "retry<1s", "s7-limit-on-modbus", "modbus-limit-on-s7",
        "no_merge+gap", "tag-wider-than-registers", "tag-wider-than-s7-bytes"])
async def test_bad_block_limits_are_invalid_argument_and_nothing_is_written(
        stub: pb_grpc.ConfigServiceStub, database_url: str, plc: plc_pb2.Plc, limits: plc_pb2.BlockLimits,
        field: str) -> None:
    plc.block_limits.CopyFrom(limits)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreatePlc(pb.CreatePlcRequest(plc=plc))
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert field in field_violations(err.value), field_violations(err.value)
    assert await count_plcs(database_url) == 0
