"""Device profiles of a tenant's own (issue 15: "device profiles of its own; shared built-in profiles stay
global"): CreateDeviceProfile, GetDeviceProfile, DeleteDeviceProfile, ListDeviceProfiles with the built-ins
beside the tenant's own, CreatePlcFromProfile on a tenant's profile, and isolation between tenants.

The `server` of this folder runs in development mode: the caller is installation-wide and names its tenant
with the header x-fabrica-tenant (``default`` without it)."""

from __future__ import annotations

import grpc
import pytest
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import device_profile_pb2, plc_pb2
from google.protobuf import duration_pb2

from fabrica_svc.config.profiles import PROFILES
from fabrica_svc.runtime import tenancy
from grpc_helpers import error_info, field_violations

from .test_tenants import create_tenants, md, raises, tenant

Code = grpc.StatusCode


def own_profile(profile_id: str = "acme-meter", display_name: str = "Acme meter") -> device_profile_pb2.DeviceProfile:
    """A Modbus profile of two tags in two poll groups (the second tag without a group: the first one's)."""
    return device_profile_pb2.DeviceProfile(
        id=profile_id, display_name=display_name, description="Holding registers 0 and 2",
        protocol=device_profile_pb2.PROTOCOL_MODBUS,
        poll_groups=[plc_pb2.PollGroup(name="fast", poll_interval=duration_pb2.Duration(nanos=500_000_000)),
                     plc_pb2.PollGroup(name="slow", poll_interval=duration_pb2.Duration(seconds=5))],
        tags=[plc_pb2.Tag(name="power", unit="W", data_type=plc_pb2.DATA_TYPE_FLOAT32, poll_group="slow",
                          modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=0)),
              plc_pb2.Tag(name="energy", unit="Wh", data_type=plc_pb2.DATA_TYPE_UINT32,
                          modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=2))])


def meter_plc(plc_id: str = "meter-1") -> plc_pb2.Plc:
    return plc_pb2.Plc(id=plc_id, collector_id="cell-1", enabled=True,
                       modbus_tcp=plc_pb2.ModbusTcpConnection(host="127.0.0.1", unit_id=1))


async def listed(stub: pb_grpc.ConfigServiceStub, code: str = tenancy.DEFAULT) -> list[device_profile_pb2.DeviceProfile]:
    return list((await stub.ListDeviceProfiles(pb.ListDeviceProfilesRequest(), metadata=md(code))).profiles)


async def test_create_get_list_and_delete_a_tenants_profile(stub: pb_grpc.ConfigServiceStub) -> None:
    before = await listed(stub)
    assert [p.id for p in before] == sorted(PROFILES) and all(p.built_in for p in before)

    created = (await stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=own_profile()))).profile
    assert created == own_profile() and not created.built_in
    got = (await stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="acme-meter"))).profile
    assert got == created
    after = await listed(stub)
    assert [p.id for p in after] == sorted([*PROFILES, "acme-meter"])  # ordered by id, built-ins beside it
    assert {p.id for p in after if not p.built_in} == {"acme-meter"}
    assert (await stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="eastron-sdm630"))).profile.built_in

    # Output-only fields are not taken from the request: built_in stays false, tag ids are cleared.
    forged = own_profile("forged")
    forged.built_in = True
    forged.tags[0].id = 42
    stored = (await stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=forged))).profile
    assert not stored.built_in and stored.tags[0].id == 0
    await stub.DeleteDeviceProfile(pb.DeleteDeviceProfileRequest(id="forged"))

    await raises(stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=own_profile())), Code.ALREADY_EXISTS)
    await stub.DeleteDeviceProfile(pb.DeleteDeviceProfileRequest(id="acme-meter"))
    await raises(stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="acme-meter")), Code.NOT_FOUND)
    await raises(stub.DeleteDeviceProfile(pb.DeleteDeviceProfileRequest(id="acme-meter")), Code.NOT_FOUND)
    assert await listed(stub) == before

    entries = (await stub.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=100))).entries
    trail = [(e.action.rsplit("/", 1)[-1], e.resource) for e in entries if e.resource.startswith("device-profiles/")]
    assert ("CreateDeviceProfile", "device-profiles/acme-meter") in trail
    assert ("DeleteDeviceProfile", "device-profiles/acme-meter") in trail


async def test_a_retried_create_with_its_request_id_answers_the_first(stub: pb_grpc.ConfigServiceStub) -> None:
    request = pb.CreateDeviceProfileRequest(profile=own_profile(), request_id="0b5e7a9c-1d2f-4e6a-8b0c-9d1e2f3a4b5c")
    first = (await stub.CreateDeviceProfile(request)).profile
    assert (await stub.CreateDeviceProfile(request)).profile == first
    assert [p.id for p in await listed(stub) if not p.built_in] == ["acme-meter"]


async def test_two_tenants_with_the_same_profile_id_each_see_their_own(stub: pb_grpc.ConfigServiceStub) -> None:
    await create_tenants(stub, tenant("acme"), tenant("beta"))
    for code, label in (("acme", "Acme"), ("beta", "Beta")):
        await stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=own_profile("meter", f"{label} meter")),
                                       metadata=md(code))
    await stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=own_profile("beta-only", "Beta only")),
                                   metadata=md("beta"))
    for code, label in (("acme", "Acme"), ("beta", "Beta")):
        got = (await stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="meter"), metadata=md(code))).profile
        assert got.display_name == f"{label} meter"
    assert [p.display_name for p in await listed(stub, "acme") if not p.built_in] == ["Acme meter"]
    assert [p.display_name for p in await listed(stub, "beta") if not p.built_in] == ["Beta only", "Beta meter"]
    assert [p.id for p in await listed(stub, "default") if not p.built_in] == []

    # Another tenant's profile: NOT_FOUND, as an id nobody has (not PERMISSION_DENIED, not ALREADY_EXISTS).
    await raises(stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="beta-only"), metadata=md("acme")), Code.NOT_FOUND)
    await raises(stub.DeleteDeviceProfile(pb.DeleteDeviceProfileRequest(id="beta-only"), metadata=md("acme")),
                 Code.NOT_FOUND)
    await raises(stub.CreatePlcFromProfile(pb.CreatePlcFromProfileRequest(profile_id="beta-only", plc=meter_plc()),
                                           metadata=md("acme")), Code.NOT_FOUND)
    await stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=own_profile("beta-only", "Acme's own")),
                                   metadata=md("acme"))

    await stub.DeleteDeviceProfile(pb.DeleteDeviceProfileRequest(id="meter"), metadata=md("acme"))
    await raises(stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="meter"), metadata=md("acme")), Code.NOT_FOUND)
    got = (await stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="meter"), metadata=md("beta"))).profile
    assert got.display_name == "Beta meter"
    got = (await stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="beta-only"), metadata=md("beta"))).profile
    assert got.display_name == "Beta only"


async def test_a_plc_created_from_a_tenants_profile_gets_its_tags(stub: pb_grpc.ConfigServiceStub) -> None:
    await stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=own_profile()))
    plc = (await stub.CreatePlcFromProfile(pb.CreatePlcFromProfileRequest(
        profile_id="acme-meter", plc=meter_plc(), tag_name_prefix="m1."))).plc
    assert [(t.name, t.poll_group, t.modbus.address, t.data_type) for t in plc.tags] == [
        ("m1.power", "slow", 0, plc_pb2.DATA_TYPE_FLOAT32), ("m1.energy", "fast", 2, plc_pb2.DATA_TYPE_UINT32)]
    assert [g.name for g in plc.poll_groups] == ["fast", "slow"] and all(t.id for t in plc.tags)
    assert (await stub.GetPlc(pb.GetPlcRequest(id="meter-1"))).plc == plc
    # Deleting the profile leaves the PLC as it is.
    await stub.DeleteDeviceProfile(pb.DeleteDeviceProfileRequest(id="acme-meter"))
    assert (await stub.GetPlc(pb.GetPlcRequest(id="meter-1"))).plc == plc

    # The protocol check holds for a tenant's profile too: an S7 profile on a Modbus connection.
    s7 = device_profile_pb2.DeviceProfile()
    s7.CopyFrom(PROFILES["s7-press-db1"])
    s7.id = "acme-press"
    await stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=s7))
    err = await raises(stub.CreatePlcFromProfile(pb.CreatePlcFromProfileRequest(
        profile_id="acme-press", plc=meter_plc("press-1"))), Code.INVALID_ARGUMENT)
    assert "profile_id" in field_violations(err)


async def test_an_invalid_profile_is_refused_with_field_violations(stub: pb_grpc.ConfigServiceStub) -> None:
    bad = own_profile()
    bad.tags[1].name = "power"  # a duplicate name
    bad.tags[0].poll_group = "never"
    s7_tag = bad.tags.add()
    s7_tag.CopyFrom(PROFILES["s7-press-db1"].tags[3])  # an S7 address in a Modbus profile
    err = await raises(stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=bad)), Code.INVALID_ARGUMENT)
    found = field_violations(err)
    assert {"profile.tags[1].name", "profile.tags[0].poll_group", "profile.tags[2].s7"} <= set(found), found
    assert "duplicate" in found["profile.tags[1].name"]

    # The proto's rules: an id, a protocol, at least one poll group; a tag's own rules, under profile.tags[i].
    rules = own_profile("")
    rules.protocol = device_profile_pb2.PROTOCOL_UNSPECIFIED
    del rules.poll_groups[:]
    rules.tags[0].name = ""
    err = await raises(stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=rules)), Code.INVALID_ARGUMENT)
    found = field_violations(err)
    assert {"profile.id", "profile.protocol", "profile.poll_groups", "profile.tags[0].name"} <= set(found), found
    err = await raises(stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest()), Code.INVALID_ARGUMENT)
    assert "profile" in field_violations(err)
    assert [p.id for p in await listed(stub) if not p.built_in] == []


async def test_built_in_profiles_reserve_their_ids_and_cannot_be_deleted(stub: pb_grpc.ConfigServiceStub) -> None:
    await create_tenants(stub, tenant("acme"))
    for code in ("acme", "default"):
        err = await raises(stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(
            profile=own_profile("eastron-sdm630")), metadata=md(code)), Code.ALREADY_EXISTS)
        assert error_info(err).reason == "BUILT_IN_PROFILE"
        err = await raises(stub.DeleteDeviceProfile(pb.DeleteDeviceProfileRequest(id="eastron-sdm630"),
                                                    metadata=md(code)), Code.FAILED_PRECONDITION)
        assert error_info(err).reason == "BUILT_IN_PROFILE"
    assert (await stub.GetDeviceProfile(pb.GetDeviceProfileRequest(id="eastron-sdm630"),
                                        metadata=md("acme"))).profile.tags == PROFILES["eastron-sdm630"].tags


@pytest.mark.parametrize("rpc", ["ListDeviceProfiles", "GetDeviceProfile", "CreateDeviceProfile",
                                 "DeleteDeviceProfile"])
async def test_an_installation_wide_call_across_tenants_is_refused(stub: pb_grpc.ConfigServiceStub, rpc: str) -> None:
    request = {"ListDeviceProfiles": pb.ListDeviceProfilesRequest(),
               "GetDeviceProfile": pb.GetDeviceProfileRequest(id="acme-meter"),
               "CreateDeviceProfile": pb.CreateDeviceProfileRequest(profile=own_profile()),
               "DeleteDeviceProfile": pb.DeleteDeviceProfileRequest(id="acme-meter")}[rpc]
    err = await raises(getattr(stub, rpc)(request, metadata=md(tenancy.ALL)), Code.INVALID_ARGUMENT)
    assert tenancy.HEADER in field_violations(err)


async def test_a_profile_as_large_as_a_plc_may_be_is_stored_and_one_tag_more_is_refused(
        stub: pb_grpc.ConfigServiceStub) -> None:
    big = own_profile("big")
    del big.tags[:]
    for i in range(5000):  # a PLC's max_items: checked in a thread, as a PLC that large is
        big.tags.add(name=f"r{i}", data_type=plc_pb2.DATA_TYPE_UINT16,
                     modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=i))
    assert len((await stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=big))).profile.tags) == 5000
    big.id = "bigger"
    big.tags.add(name="one-more", data_type=plc_pb2.DATA_TYPE_UINT16,
                 modbus=plc_pb2.ModbusAddress(table=plc_pb2.MODBUS_TABLE_HOLDING_REGISTER, address=5000))
    err = await raises(stub.CreateDeviceProfile(pb.CreateDeviceProfileRequest(profile=big)), Code.INVALID_ARGUMENT)
    assert "profile.tags" in field_violations(err)
