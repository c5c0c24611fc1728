"""Config's tag roles are the one truth: production checks a work centre's bindings against a real config
server (ConfigService.GetPlc) when they are created or changed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as cpb
from fabrica.config.v1 import plc_pb2
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, field_mask_pb2

from grpc_helpers import error_info
from in_process import Server, Servers, settings_for
from procs import free_port

from .support import precondition_violations, start_production

PLC = "press-plc"
Code = grpc.StatusCode


def _plc() -> plc_pb2.Plc:
    plc = plc_pb2.Plc(id=PLC, display_name="Press", collector_id="cell-1", enabled=True,
                      modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1", unit_id=1),
                      poll_groups=[plc_pb2.PollGroup(name="default", poll_interval=duration_pb2.Duration(seconds=1))])
    for i, (name, role, width) in enumerate([
            ("good", reading_pb2.TAG_ROLE_PRODUCTION_COUNTER, 0),
            ("scrap", reading_pb2.TAG_ROLE_SCRAP_COUNTER, 16),
            ("state", reading_pb2.TAG_ROLE_MACHINE_STATE, 0),
            ("temperature", reading_pb2.TAG_ROLE_MEASUREMENT, 0)]):
        plc.tags.add(name=name, data_type=plc_pb2.DATA_TYPE_UINT16, role=role, counter_width=width,
                     modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=i))
    return plc


class Stack:
    def __init__(self, tags: dict[str, int], production: pb_grpc.ProductionServiceStub):
        self.tags, self.production = tags, production

    async def create(self, wc_id: str = "press-1", **binding: int) -> md.WorkCenter:
        wc = md.WorkCenter(id=wc_id, display_name="Press 1", sector_id="pressing", plc_id=PLC, **binding)
        return (await self.production.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=wc))).work_center


@pytest.fixture
async def config(database_url: str, servers: Servers) -> Server:
    return await servers.start("config", settings_for("config", database_url=database_url))


@pytest.fixture
async def stack(config: Server, database_url: str) -> AsyncIterator[Stack]:
    plc = (await config.stub.CreatePlc(cpb.CreatePlcRequest(plc=_plc()))).plc
    production = await start_production(database_url, config_addr=config.address)
    try:
        async with grpc.aio.insecure_channel(production.address) as ch:
            stub = pb_grpc.ProductionServiceStub(ch)
            await stub.CreateSector(pb.CreateSectorRequest(sector=md.Sector(id="pressing", display_name="Pressing")))
            yield Stack({t.name: t.id for t in plc.tags}, stub)
    finally:
        await production.stop(grace=0)


async def test_bindings_that_match_config_are_accepted(stack: Stack) -> None:
    wc = await stack.create(production_counter_tag_id=stack.tags["good"], scrap_counter_tag_id=stack.tags["scrap"],
                            machine_state_tag_id=stack.tags["state"], counter_width=16)
    assert wc.production_counter_tag_id == stack.tags["good"]


async def test_a_measurement_bound_as_a_counter_is_refused_naming_the_tag(stack: Stack) -> None:
    temperature = stack.tags["temperature"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.create(production_counter_tag_id=temperature)
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert error_info(err.value).reason == "TAG_BINDING_MISMATCH"
    [v] = precondition_violations(err.value)
    assert (v.type, v.subject) == ("TAG_ROLE", f"tags/{temperature}")
    assert "TAG_ROLE_MEASUREMENT" in v.description and "TAG_ROLE_PRODUCTION_COUNTER" in v.description
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.production.GetWorkCenter(pb.GetWorkCenterRequest(id="press-1"))
    assert err.value.code() == Code.NOT_FOUND, "nothing was written"


async def test_roles_swapped_between_bindings_are_each_named(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.create(production_counter_tag_id=stack.tags["scrap"], machine_state_tag_id=stack.tags["good"])
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert {(v.type, v.subject) for v in precondition_violations(err.value)} == {
        ("TAG_ROLE", f"tags/{stack.tags['scrap']}"), ("TAG_ROLE", f"tags/{stack.tags['good']}")}


async def test_a_tag_config_does_not_have_is_refused(stack: Stack) -> None:
    missing = max(stack.tags.values()) + 1000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.create(production_counter_tag_id=stack.tags["good"], machine_state_tag_id=missing)
    assert err.value.code() == Code.FAILED_PRECONDITION
    [v] = precondition_violations(err.value)
    assert (v.type, v.subject) == ("TAG_NOT_FOUND", f"tags/{missing}")


async def test_a_plc_config_does_not_know_is_refused(stack: Stack) -> None:
    wc = md.WorkCenter(id="press-9", display_name="Press 9", sector_id="pressing", plc_id="no-such-plc",
                       production_counter_tag_id=stack.tags["good"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.production.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=wc))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert [(v.type, v.subject) for v in precondition_violations(err.value)] == [
        ("TAG_NOT_FOUND", f"tags/{stack.tags['good']}")]


async def test_config_counter_width_must_agree(stack: Stack) -> None:
    scrap = stack.tags["scrap"]  # declared 16 bits in config
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.create(scrap_counter_tag_id=scrap)  # the work centre's width: 32 (0)
    assert err.value.code() == Code.FAILED_PRECONDITION
    [v] = precondition_violations(err.value)
    assert (v.type, v.subject) == ("COUNTER_WIDTH", f"tags/{scrap}")
    assert (await stack.create(scrap_counter_tag_id=scrap, counter_width=16)).scrap_counter_tag_id == scrap


async def test_an_update_that_changes_a_binding_is_checked(stack: Stack) -> None:
    wc = await stack.create(production_counter_tag_id=stack.tags["good"])
    wc.production_counter_tag_id = stack.tags["temperature"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.production.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
            work_center=wc, update_mask=field_mask_pb2.FieldMask(paths=["production_counter_tag_id"])))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert [v.subject for v in precondition_violations(err.value)] == [f"tags/{stack.tags['temperature']}"]
    got = (await stack.production.GetWorkCenter(pb.GetWorkCenterRequest(id="press-1"))).work_center
    assert got.production_counter_tag_id == stack.tags["good"], "the refused update changed nothing"
    wc.production_counter_tag_id = stack.tags["good"]
    wc.display_name = "Renamed"
    renamed = (await stack.production.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
        work_center=wc, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))).work_center
    assert renamed.display_name == "Renamed"


async def test_config_unreachable_is_unavailable_not_unchecked(database_url: str) -> None:
    production = await start_production(database_url, config_addr=f"127.0.0.1:{free_port()}")
    try:
        async with grpc.aio.insecure_channel(production.address) as ch:
            stub = pb_grpc.ProductionServiceStub(ch)
            await stub.CreateSector(pb.CreateSectorRequest(sector=md.Sector(id="pressing", display_name="Pressing")))
            wc = md.WorkCenter(id="press-1", display_name="Press 1", sector_id="pressing", plc_id=PLC,
                               production_counter_tag_id=7)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=wc))
            assert err.value.code() == Code.UNAVAILABLE
            # A work centre with no bound tags needs nothing from config.
            wc = md.WorkCenter(id="manual-1", display_name="Bench", sector_id="pressing")
            assert (await stub.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=wc))).work_center.id
    finally:
        await production.stop(grace=0)


async def test_without_a_config_address_the_check_is_skipped_and_the_log_says_so(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fabrica_svc.production.app")
    production = await start_production(database_url)
    try:
        assert "FABRICA_CONFIG_ADDR is not set" in caplog.text
        async with grpc.aio.insecure_channel(production.address) as ch:
            stub = pb_grpc.ProductionServiceStub(ch)
            await stub.CreateSector(pb.CreateSectorRequest(sector=md.Sector(id="pressing", display_name="Pressing")))
            wc = md.WorkCenter(id="press-1", display_name="Press 1", sector_id="pressing", plc_id=PLC,
                               production_counter_tag_id=7)
            assert (await stub.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=wc))).work_center.id
    finally:
        await production.stop(grace=0)
