"""Large and hostile CreatePlc requests: bounded in the contract, answered with a bounded list of violations,
and checked without stalling the other RPCs of the server."""

from __future__ import annotations

import asyncio

import grpc
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import plc_pb2

from fabrica_svc.runtime.validation import MAX_VIOLATIONS, max_items, violations_of
from grpc_helpers import error_info, field_violations

from .test_config_service import count_plcs, modbus_plc

Code = grpc.StatusCode
MAX_TAGS = max_items(plc_pb2.Plc.DESCRIPTOR.fields_by_name["tags"])


def with_bad_tags(n: int) -> pb.CreatePlcRequest:
    """A CreatePlc whose PLC has `n` tags, each breaking several rules (name, address, data type)."""
    request = pb.CreatePlcRequest(plc=modbus_plc("press-big", n_tags=0))
    request.plc.tags.extend([plc_pb2.Tag(name="9 not a name", description="d" * 501)] * n)
    return request


async def test_a_plc_with_100000_tags_is_invalid_argument_on_the_list_alone(
        stub: pb_grpc.ConfigServiceStub, database_url: str) -> None:
    with_too_many = with_bad_tags(100_000)
    try:
        await stub.CreatePlc(with_too_many)
        raise AssertionError("accepted")
    except grpc.aio.AioRpcError as err:
        assert err.code() == Code.INVALID_ARGUMENT, err  # not RESOURCE_EXHAUSTED from overflowing trailers
        violations = field_violations(err)
        assert list(violations) == ["plc.tags"], violations
        assert str(MAX_TAGS) in violations["plc.tags"] and "100000" in violations["plc.tags"]
    assert await count_plcs(database_url) == 0


async def test_thousands_of_violations_are_answered_with_the_first_ones_and_a_count_of_the_rest(
        stub: pb_grpc.ConfigServiceStub, database_url: str) -> None:
    request = with_bad_tags(MAX_TAGS)
    total = len(violations_of(request))
    assert total > 2 * MAX_TAGS
    try:
        await stub.CreatePlc(request)
        raise AssertionError("accepted")
    except grpc.aio.AioRpcError as err:
        assert err.code() == Code.INVALID_ARGUMENT, err
        violations = field_violations(err)
        assert 10 <= len(violations) <= MAX_VIOLATIONS
        assert all(path.startswith("plc.tags[") for path in violations)
        omitted = int(error_info(err).metadata["omitted_violations"])
        assert omitted == total - len(violations)
        assert f"{total} field violations" in (err.details() or "")
    assert await count_plcs(database_url) == 0


async def test_a_get_is_answered_while_a_large_create_is_being_checked(stub: pb_grpc.ConfigServiceStub) -> None:
    await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("press-01")))
    answered: list[str] = []

    async def create() -> None:
        try:
            await stub.CreatePlc(with_bad_tags(MAX_TAGS))
        except grpc.aio.AioRpcError as err:
            assert err.code() == Code.INVALID_ARGUMENT
            answered.append("CreatePlc")

    creating = asyncio.create_task(create())
    for _ in range(1000):  # bounded: gets go on until the create is answered
        got = await stub.GetPlc(pb.GetPlcRequest(id="press-01"))
        assert got.plc.id == "press-01"
        answered.append("GetPlc")
        if creating.done():
            break
    await creating
    assert answered[0] == "GetPlc" and answered.count("CreatePlc") == 1, answered
    assert answered.index("CreatePlc") > 0


async def test_an_update_to_thousands_of_bad_tags_is_answered_like_a_create_and_changes_nothing(
        stub: pb_grpc.ConfigServiceStub) -> None:
    created = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("press-01")))).plc
    patch = with_bad_tags(MAX_TAGS).plc
    patch.id, patch.etag = created.id, created.etag
    try:
        await stub.UpdatePlc(pb.UpdatePlcRequest(plc=patch, update_mask={"paths": ["tags"]}))
        raise AssertionError("accepted")
    except grpc.aio.AioRpcError as err:
        assert err.code() == Code.INVALID_ARGUMENT, err  # the merged PLC's check, bounded as every answer is
        violations = field_violations(err)
        assert 10 <= len(violations) <= MAX_VIOLATIONS
        assert all(path.startswith("plc.tags[") for path in violations)
        assert int(error_info(err).metadata["omitted_violations"]) > 0
    assert (await stub.GetPlc(pb.GetPlcRequest(id="press-01"))).plc == created
