"""ConfigService against a real server on 127.0.0.1:0 and the embedded Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import collector_status_pb2, plc_pb2
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_helpers import error_info, field_violations

Code = grpc.StatusCode


def modbus_plc(plc_id: str = "press-01", collector: str = "cell-1", n_tags: int = 2) -> plc_pb2.Plc:
    plc = plc_pb2.Plc(
        id=plc_id,
        display_name="Press 1",
        collector_id=collector,
        enabled=True,
        modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1", unit_id=1),
        poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration_pb2.Duration(seconds=1))],
    )
    for i in range(n_tags):
        plc.tags.add(
            name=f"value_{i}",
            modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=2 * i),
            data_type=plc_pb2.DATA_TYPE_UINT32,
            role=reading_pb2.TAG_ROLE_MEASUREMENT,
        )
    return plc


async def count_plcs(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM config.plcs")
    finally:
        await conn.close()


async def test_create_get_list_update_delete(stub: pb_grpc.ConfigServiceStub) -> None:
    created = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc()))).plc
    assert created.id == "press-01"
    assert created.modbus_tcp.port == 502, "the default port is written in"
    assert all(t.id > 0 for t in created.tags) and len({t.id for t in created.tags}) == 2
    assert all(t.poll_group == "default" for t in created.tags)
    assert created.etag and created.revision > 0 and created.HasField("create_time")

    got = (await stub.GetPlc(pb.GetPlcRequest(id="press-01"))).plc
    assert got == created

    for i in range(2, 6):
        await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc(f"press-0{i}", collector="cell-2" if i % 2 else "cell-1")))
    page1 = await stub.ListPlcs(pb.ListPlcsRequest(page_size=2))
    page2 = await stub.ListPlcs(pb.ListPlcsRequest(page_size=2, page_token=page1.next_page_token))
    page3 = await stub.ListPlcs(pb.ListPlcsRequest(page_size=2, page_token=page2.next_page_token))
    ids = [p.id for page in (page1, page2, page3) for p in page.plcs]
    assert ids == [f"press-0{i}" for i in range(1, 6)] and page3.next_page_token == ""
    cell2 = await stub.ListPlcs(pb.ListPlcsRequest(collector_id="cell-2"))
    assert [p.id for p in cell2.plcs] == ["press-03", "press-05"]

    # Partial update: only display_name; the rest stays, tag ids stay.
    patch = plc_pb2.Plc(id="press-01", display_name="Press one", etag=created.etag)
    updated = (await stub.UpdatePlc(pb.UpdatePlcRequest(
        plc=patch, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))).plc
    assert updated.display_name == "Press one" and updated.collector_id == "cell-1"
    assert [t.id for t in updated.tags] == [t.id for t in created.tags]
    assert updated.etag != created.etag and updated.revision > created.revision

    # Replacing tags keeps the id of a tag whose name stays, and gives a new name a new id.
    tags_patch = modbus_plc(n_tags=3)
    tags_patch.tags[0].name = "renamed"
    after_tags = (await stub.UpdatePlc(pb.UpdatePlcRequest(
        plc=tags_patch, update_mask=field_mask_pb2.FieldMask(paths=["tags"])))).plc
    by_name = {t.name: t.id for t in after_tags.tags}
    assert by_name["value_1"] == created.tags[1].id
    assert by_name["renamed"] not in {t.id for t in created.tags}

    await stub.DeletePlc(pb.DeletePlcRequest(id="press-01", etag=after_tags.etag))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetPlc(pb.GetPlcRequest(id="press-01"))
    assert err.value.code() == Code.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeletePlc(pb.DeletePlcRequest(id="press-01"))
    assert err.value.code() == Code.NOT_FOUND


async def test_duplicate_id_and_idempotent_create(stub: pb_grpc.ConfigServiceStub, database_url: str) -> None:
    req = pb.CreatePlcRequest(plc=modbus_plc(), request_id="0d6b4c7e-9f0a-4a57-b8e8-5b0a7f7d2a11")
    first = (await stub.CreatePlc(req)).plc
    again = (await stub.CreatePlc(req)).plc
    assert again == first, "a retried create returns what the first one made"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc()))
    assert err.value.code() == Code.ALREADY_EXISTS
    assert error_info(err.value).reason == "ALREADY_EXISTS"
    assert await count_plcs(database_url) == 1


async def test_stale_etag_is_aborted(stub: pb_grpc.ConfigServiceStub) -> None:
    created = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc()))).plc
    mask = field_mask_pb2.FieldMask(paths=["enabled"])
    await stub.UpdatePlc(pb.UpdatePlcRequest(plc=plc_pb2.Plc(id=created.id, enabled=False, etag=created.etag),
                                             update_mask=mask))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdatePlc(pb.UpdatePlcRequest(plc=plc_pb2.Plc(id=created.id, enabled=True, etag=created.etag),
                                                 update_mask=mask))
    assert err.value.code() == Code.ABORTED
    assert error_info(err.value).reason == "ETAG_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeletePlc(pb.DeletePlcRequest(id=created.id, etag=created.etag))
    assert err.value.code() == Code.ABORTED
    assert (await stub.GetPlc(pb.GetPlcRequest(id=created.id))).plc.enabled is False


def _port_zero(p: plc_pb2.Plc) -> None:
    p.modbus_tcp.port = 0


def _empty_tag_name(p: plc_pb2.Plc) -> None:
    p.tags[1].name = ""


def _duplicate_tag_name(p: plc_pb2.Plc) -> None:
    p.tags[1].name = p.tags[0].name


def _bit_16(p: plc_pb2.Plc) -> None:
    p.tags[0].data_type = plc_pb2.DATA_TYPE_BOOL
    p.tags[0].bit = 16


def _string_without_length(p: plc_pb2.Plc) -> None:
    p.tags[1].data_type = plc_pb2.DATA_TYPE_STRING


def _unknown_enum(p: plc_pb2.Plc) -> None:
    p.tags[0].data_type = 42  # type: ignore[assignment]


def _s7_address_on_modbus(p: plc_pb2.Plc) -> None:
    p.tags[0].s7.db_number = 1


def _unknown_poll_group(p: plc_pb2.Plc) -> None:
    p.tags[0].poll_group = "nope"


def _no_connection(p: plc_pb2.Plc) -> None:
    p.ClearField("modbus_tcp")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_port_zero, "plc.modbus_tcp.port"),
        (_empty_tag_name, "plc.tags[1].name"),
        (_duplicate_tag_name, "plc.tags[1].name"),
        (_bit_16, "plc.tags[0].bit"),
        (_string_without_length, "plc.tags[1].string_length"),
        (_unknown_enum, "plc.tags[0].data_type"),
        (_s7_address_on_modbus, "plc.tags[0].s7"),
        (_unknown_poll_group, "plc.tags[0].poll_group"),
        (_no_connection, "plc.connection"),
    ],
    ids=lambda v: getattr(v, "__name__", v).strip("_") if callable(v) else v,
)
async def test_invalid_plc_is_rejected_and_nothing_written(
    stub: pb_grpc.ConfigServiceStub, database_url: str, mutate, field: str
) -> None:
    plc = modbus_plc()
    mutate(plc)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreatePlc(pb.CreatePlcRequest(plc=plc))
    assert err.value.code() == Code.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert field in violations, violations
    assert await count_plcs(database_url) == 0

    # The same definition is refused as an update too, and the stored PLC is left as it was.
    created = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc()))).plc
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdatePlc(pb.UpdatePlcRequest(plc=plc))
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert field in field_violations(err.value)
    assert (await stub.GetPlc(pb.GetPlcRequest(id=created.id))).plc == created


async def test_bad_update_mask_and_page_token(stub: pb_grpc.ConfigServiceStub) -> None:
    await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc()))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdatePlc(pb.UpdatePlcRequest(plc=plc_pb2.Plc(id="press-01"),
                                                 update_mask=field_mask_pb2.FieldMask(paths=["id"])))
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "update_mask.paths[0]" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListPlcs(pb.ListPlcsRequest(page_token="garbage!"))
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "page_token" in field_violations(err.value)


async def test_device_profiles(stub: pb_grpc.ConfigServiceStub) -> None:
    profiles = {p.id: p for p in (await stub.ListDeviceProfiles(pb.ListDeviceProfilesRequest())).profiles}
    assert {"eastron-sdm630", "peacefair-pzem-004t", "s7-press-db1"} <= set(profiles)
    s7 = profiles["s7-press-db1"]
    layout = {(t.s7.byte_offset, t.bit if t.HasField("bit") else None, t.data_type) for t in s7.tags}
    assert {(0, 0, plc_pb2.DATA_TYPE_BOOL), (0, 1, plc_pb2.DATA_TYPE_BOOL), (0, 2, plc_pb2.DATA_TYPE_BOOL),
            (2, None, plc_pb2.DATA_TYPE_FLOAT32), (6, None, plc_pb2.DATA_TYPE_FLOAT32),
            (10, None, plc_pb2.DATA_TYPE_INT16), (12, None, plc_pb2.DATA_TYPE_INT16)} <= layout
    sdm = profiles["eastron-sdm630"]
    assert all(t.modbus.table == plc_pb2.MODBUS_TABLE_INPUT_REGISTER and t.data_type == plc_pb2.DATA_TYPE_FLOAT32
               for t in sdm.tags)

    meter = (await stub.CreatePlcFromProfile(pb.CreatePlcFromProfileRequest(
        profile_id="peacefair-pzem-004t", tag_name_prefix="m1.",
        plc=plc_pb2.Plc(id="meter-1", collector_id="cell-1", enabled=True,
                        modbus_rtu=plc_pb2.ModbusRtuConnection(serial_port="/dev/ttyUSB0", unit_id=1)),
    ))).plc
    assert [t.name for t in meter.tags][:2] == ["m1.voltage", "m1.current"] and all(t.id for t in meter.tags)

    press = (await stub.CreatePlcFromProfile(pb.CreatePlcFromProfileRequest(
        profile_id="s7-press-db1",
        plc=plc_pb2.Plc(id="press-s7", collector_id="cell-1", s7=plc_pb2.S7Connection(host="10.1.2.3", slot=1)),
    ))).plc
    assert press.s7.port == 102 and len(press.tags) == len(s7.tags)

    with pytest.raises(grpc.aio.AioRpcError) as err:  # a Modbus profile on an S7 connection
        await stub.CreatePlcFromProfile(pb.CreatePlcFromProfileRequest(
            profile_id="eastron-sdm630",
            plc=plc_pb2.Plc(id="wrong", collector_id="cell-1", s7=plc_pb2.S7Connection(host="10.1.2.3"))))
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert list(field_violations(err.value)) == ["profile_id"]  # one error about the protocol, not one per tag
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreatePlcFromProfile(pb.CreatePlcFromProfileRequest(profile_id="nope", plc=modbus_plc("x")))
    assert err.value.code() == Code.NOT_FOUND


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "fabrica.config.v1.ConfigService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="fabrica.config.v1.ConfigService")

    answers = [a async for a in reflection.ServerReflectionInfo(ask())]
    names = {s.name for s in answers[0].list_services_response.service}
    assert "fabrica.config.v1.ConfigService" in names and "grpc.health.v1.Health" in names
    assert answers[1].file_descriptor_response.file_descriptor_proto, "descriptors for grpcurl describe"


async def test_collector_status_reports(stub: pb_grpc.ConfigServiceStub) -> None:
    created = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc()))).plc
    resp = await stub.ReportCollectorStatus(pb.ReportCollectorStatusRequest(
        collector_id="cell-1", applied_revision=created.revision,
        plc_statuses=[collector_status_pb2.PlcStatus(plc_id="press-01", connected=False, error="connection refused")]))
    assert resp.current_revision == created.revision
    collectors = (await stub.ListCollectors(pb.ListCollectorsRequest())).collectors
    assert len(collectors) == 1 and collectors[0].id == "cell-1"
    assert collectors[0].applied_revision == created.revision
    assert collectors[0].plc_statuses[0].error == "connection refused"
