"""Master data over gRPC: sectors, work centres, items, defect codes, downtime reasons."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_helpers import error_info, field_violations

from .support import at, fetchval, new_order, precondition_violations, seed, ts

Code = grpc.StatusCode


# One row per resource: how to build one, and the RPC names and request/response fields that carry it.
class Api:
    def __init__(self, name: str, field: str, plural: str, table: str, build: Callable[[int], object]):
        self.name, self.field, self.plural, self.table, self.build = name, field, plural, table, build

    async def create(self, stub, msg):  # noqa: ANN001, ANN201
        req = getattr(pb, f"Create{self.name}Request")(**{self.field: msg})
        return getattr(await getattr(stub, f"Create{self.name}")(req), self.field)

    async def get(self, stub, resource_id: str):  # noqa: ANN001, ANN201
        return getattr(await getattr(stub, f"Get{self.name}")(getattr(pb, f"Get{self.name}Request")(id=resource_id)),
                       self.field)

    async def list(self, stub, **kw):  # noqa: ANN001, ANN201
        resp = await getattr(stub, f"List{self.plural}")(getattr(pb, f"List{self.plural}Request")(**kw))
        return list(getattr(resp, self.table)), resp.next_page_token  # the response field is named like the table

    async def update(self, stub, msg, paths=()):  # noqa: ANN001, ANN201
        req = getattr(pb, f"Update{self.name}Request")(**{self.field: msg},
                                                       update_mask=field_mask_pb2.FieldMask(paths=list(paths)))
        return getattr(await getattr(stub, f"Update{self.name}")(req), self.field)

    async def delete(self, stub, resource_id: str, etag: str = "") -> None:  # noqa: ANN001
        await getattr(stub, f"Delete{self.name}")(getattr(pb, f"Delete{self.name}Request")(id=resource_id, etag=etag))


APIS = [
    Api("Sector", "sector", "Sectors", "sectors", lambda i: md.Sector(id=f"sector-{i}", display_name=f"Sector {i}")),
    Api("WorkCenter", "work_center", "WorkCenters", "work_centers", lambda i: md.WorkCenter(
        id=f"wc-{i}", display_name=f"WC {i}", sector_id="pressing", plc_id="plc-1",
        production_counter_tag_id=1000 + i, counter_width=32)),
    Api("Item", "item", "Items", "items", lambda i: md.Item(
        id=f"ITEM-{i}", display_name=f"Item {i}",
        ideal_cycle_time=duration_pb2.Duration(seconds=1, nanos=500_000_000))),
    Api("DefectCode", "defect_code", "DefectCodes", "defect_codes", lambda i: md.DefectCode(
        id=f"D{i}", display_name=f"Defect {i}", severity=md.SEVERITY_MAJOR)),
    Api("DowntimeReason", "downtime_reason", "DowntimeReasons", "downtime_reasons", lambda i: md.DowntimeReason(
        id=f"R{i}", display_name=f"Reason {i}", color="#123abc", counts_against_availability=True)),
]


@pytest.fixture
async def seeded(stub: pb_grpc.ProductionServiceStub) -> AsyncIterator[pb_grpc.ProductionServiceStub]:
    await seed(stub)
    yield stub


async def count(database_url: str, table: str, where: str = "true") -> int:
    return int(await fetchval(database_url, f"SELECT count(*) FROM production.{table} WHERE {where}"))


@pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)
async def test_create_get_list_update_delete(seeded: pb_grpc.ProductionServiceStub, api: Api) -> None:
    stub = seeded
    created = [await api.create(stub, api.build(i)) for i in range(1, 4)]
    first = created[0]
    assert first.etag and first.HasField("create_time") and first.update_time == first.create_time
    assert await api.get(stub, first.id) == first

    listed, token, pages = [], "", 0
    for pages in range(1, 10):  # the seed adds up to two of each; pages of two
        page, token = await api.list(stub, page_size=2, page_token=token)
        assert len(page) <= 2
        listed += page
        if not token:
            break
    assert token == "" and pages >= 2
    assert [r.id for r in listed] == sorted(r.id for r in listed)
    assert [r for r in listed if r.id in {c.id for c in created}] == created

    patch = type(first)(id=first.id, display_name="Renamed", etag=first.etag)
    updated = await api.update(stub, patch, ["display_name"])
    assert updated.display_name == "Renamed" and updated.etag != first.etag
    expected = type(first)()
    expected.CopyFrom(first)
    expected.display_name, expected.etag = "Renamed", updated.etag
    expected.update_time.CopyFrom(updated.update_time)
    assert updated == expected, "only the masked field changed"

    with pytest.raises(grpc.aio.AioRpcError) as err:  # the etag read before the update is stale now
        await api.update(stub, type(first)(id=first.id, display_name="Again", etag=first.etag), ["display_name"])
    assert err.value.code() == Code.ABORTED and error_info(err.value).reason == "ETAG_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.delete(stub, first.id, etag=first.etag)
    assert err.value.code() == Code.ABORTED

    await api.delete(stub, first.id, etag=updated.etag)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.get(stub, first.id)
    assert err.value.code() == Code.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.delete(stub, first.id)
    assert err.value.code() == Code.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.create(stub, api.build(2))
    assert err.value.code() == Code.ALREADY_EXISTS and error_info(err.value).reason == "ALREADY_EXISTS"


def _wc(**changes: object) -> md.WorkCenter:
    wc = md.WorkCenter(id="wc-x", display_name="X", sector_id="pressing", plc_id="plc-1",
                       production_counter_tag_id=501, scrap_counter_tag_id=502, counter_width=16)
    for k, v in changes.items():
        setattr(wc, k, v)
    return wc


INVALID = [
    # (case, resource, message, field reported)
    ("sector-bad-id", "Sector", md.Sector(id="Bad Id", display_name="x"), "sector.id"),
    ("sector-no-name", "Sector", md.Sector(id="ok"), "sector.display_name"),
    ("wc-width-8", "WorkCenter", _wc(counter_width=8), "work_center.counter_width"),
    ("wc-same-tag-twice", "WorkCenter", _wc(scrap_counter_tag_id=501), "work_center.scrap_counter_tag_id"),
    ("wc-tags-without-plc", "WorkCenter", _wc(plc_id=""), "work_center.plc_id"),
    ("wc-tag-id-too-large", "WorkCenter", _wc(machine_state_tag_id=2**63), "work_center.machine_state_tag_id"),
    ("wc-no-sector", "WorkCenter", _wc(sector_id=""), "work_center.sector_id"),
    ("item-no-cycle", "Item", md.Item(id="I1", display_name="x"), "item.ideal_cycle_time"),
    ("item-zero-cycle", "Item", md.Item(id="I1", display_name="x", ideal_cycle_time=duration_pb2.Duration()),
     "item.ideal_cycle_time"),
    ("item-cycle-over-a-day", "Item",
     md.Item(id="I1", display_name="x", ideal_cycle_time=duration_pb2.Duration(seconds=90_000)),
     "item.ideal_cycle_time"),
    ("defect-no-severity", "DefectCode", md.DefectCode(id="D1", display_name="x"), "defect_code.severity"),
    ("reason-bad-colour", "DowntimeReason", md.DowntimeReason(id="R1", display_name="x", color="red"),
     "downtime_reason.color"),
]


async def test_invalid_resources_are_rejected_and_nothing_written(
        seeded: pb_grpc.ProductionServiceStub, database_url: str) -> None:
    # One server for the whole table keeps this quick; each case says which one failed.
    for n, (case, api_name, msg, field) in enumerate(INVALID):
        api = next(a for a in APIS if a.name == api_name)
        before = await count(database_url, api.table)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.create(seeded, msg)
        assert err.value.code() == Code.INVALID_ARGUMENT, case
        assert field in field_violations(err.value), (case, field_violations(err.value))
        assert await count(database_url, api.table) == before, case
        assert await count(database_url, "tag_bindings", "tag_id IN (501, 502)") == 0, case
        if field.endswith(".id"):
            continue  # ids are immutable: there is no update to try
        # The same values as an update of a valid resource are refused too, and the stored one stays.
        good = await api.create(seeded, api.build(100 + n))
        patch = type(good)()
        patch.CopyFrom(msg)
        patch.id = good.id
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.update(seeded, patch)
        assert err.value.code() == Code.INVALID_ARGUMENT, case
        assert field in field_violations(err.value), case
        assert await api.get(seeded, good.id) == good, case


async def test_update_mask_and_update_errors(seeded: pb_grpc.ProductionServiceStub) -> None:
    item = (await seeded.GetItem(pb.GetItemRequest(id="BRK-100"))).item
    faster = md.Item(id="BRK-100", display_name="ignored, not in the mask",
                     ideal_cycle_time=duration_pb2.Duration(nanos=750_000_000))
    updated = (await seeded.UpdateItem(pb.UpdateItemRequest(
        item=faster, update_mask=field_mask_pb2.FieldMask(paths=["ideal_cycle_time"])))).item
    assert updated.display_name == item.display_name
    assert updated.ideal_cycle_time == duration_pb2.Duration(nanos=750_000_000)

    cases = [
        (pb.UpdateItemRequest(item=md.Item(id="BRK-100"), update_mask=field_mask_pb2.FieldMask(paths=["id"])),
         Code.INVALID_ARGUMENT, "update_mask.paths[0]"),
        (pb.UpdateItemRequest(item=md.Item(display_name="no id")), Code.INVALID_ARGUMENT, "item.id"),
        (pb.UpdateItemRequest(), Code.INVALID_ARGUMENT, "item.id"),
        # Clearing a required field through the mask: the merged item is invalid.
        (pb.UpdateItemRequest(item=md.Item(id="BRK-100"),
                              update_mask=field_mask_pb2.FieldMask(paths=["ideal_cycle_time"])),
         Code.INVALID_ARGUMENT, "item.ideal_cycle_time"),
        (pb.UpdateItemRequest(item=md.Item(id="NOPE", display_name="x"),
                              update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), Code.NOT_FOUND, None),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await seeded.UpdateItem(request)
        assert err.value.code() == code, request
        if field:
            assert field in field_violations(err.value)
    assert (await seeded.GetItem(pb.GetItemRequest(id="BRK-100"))).item == updated


async def test_work_center_references_and_tag_bindings(seeded: pb_grpc.ProductionServiceStub,
                                                        database_url: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await seeded.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=_wc(sector_id="nope")))
    assert err.value.code() == Code.FAILED_PRECONDITION
    [v] = precondition_violations(err.value)
    assert (v.type, v.subject) == ("SECTOR", "sectors/nope")

    # Tag 101 is press-1's production counter: no other work centre may bind it, in any role.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await seeded.CreateWorkCenter(pb.CreateWorkCenterRequest(work_center=_wc(scrap_counter_tag_id=101)))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert error_info(err.value).reason == "TAG_ALREADY_BOUND"
    [v] = precondition_violations(err.value)
    assert (v.type, v.subject) == ("TAG_BINDING", "tags/101") and "press-1" in v.description
    assert await count(database_url, "work_centers", "id = 'wc-x'") == 0

    # Re-binding press-1 to other tags frees 101 for another work centre.
    await seeded.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
        work_center=md.WorkCenter(id="press-1", production_counter_tag_id=111),
        update_mask=field_mask_pb2.FieldMask(paths=["production_counter_tag_id"])))
    wc = (await seeded.CreateWorkCenter(pb.CreateWorkCenterRequest(
        work_center=_wc(production_counter_tag_id=101, scrap_counter_tag_id=0)))).work_center
    assert wc.production_counter_tag_id == 101
    rows = await fetchval(database_url, "SELECT string_agg(tag_id || ':' || work_center_id, ',' ORDER BY tag_id)"
                                        " FROM production.tag_bindings")
    assert rows == "101:wc-x,102:press-1,103:press-1,111:press-1"

    await seeded.CreateSector(pb.CreateSectorRequest(sector=md.Sector(id="assembly", display_name="Assembly")))
    await seeded.UpdateWorkCenter(pb.UpdateWorkCenterRequest(
        work_center=md.WorkCenter(id="wc-x", sector_id="assembly"),
        update_mask=field_mask_pb2.FieldMask(paths=["sector_id"])))
    in_assembly = (await seeded.ListWorkCenters(pb.ListWorkCentersRequest(sector_id="assembly"))).work_centers
    assert [w.id for w in in_assembly] == ["wc-x"]

    # A sector with work centres cannot go.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await seeded.DeleteSector(pb.DeleteSectorRequest(id="assembly"))
    assert err.value.code() == Code.FAILED_PRECONDITION and error_info(err.value).reason == "IN_USE"
    assert precondition_violations(err.value)[0].subject == "sectors/assembly"
    await seeded.DeleteWorkCenter(pb.DeleteWorkCenterRequest(id="wc-x"))
    assert await count(database_url, "tag_bindings", "work_center_id = 'wc-x'") == 0
    await seeded.DeleteSector(pb.DeleteSectorRequest(id="assembly"))


async def test_delete_refused_while_in_use(seeded: pb_grpc.ProductionServiceStub) -> None:
    order = await new_order(seeded)
    await seeded.CreateDefect(pb.CreateDefectRequest(defect=order_pb2.Defect(
        order_id=order.id, defect_code_id="BURR", quantity=1)))
    down = (await seeded.CreateDowntime(pb.CreateDowntimeRequest(downtime=order_pb2.Downtime(
        work_center_id="press-1", start_time=ts(at(8)), end_time=ts(at(8, 1)),
        reason_id="TOOL")))).downtime
    assert down.reason_id == "TOOL"
    for request, call in [
        (pb.DeleteItemRequest(id="BRK-100"), seeded.DeleteItem),
        (pb.DeleteWorkCenterRequest(id="press-1"), seeded.DeleteWorkCenter),
        (pb.DeleteDefectCodeRequest(id="BURR"), seeded.DeleteDefectCode),
        (pb.DeleteDowntimeReasonRequest(id="TOOL"), seeded.DeleteDowntimeReason),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        assert err.value.code() == Code.FAILED_PRECONDITION, request
        assert [v.type for v in precondition_violations(err.value)] == ["IN_USE"]
    # What is not used can go.
    await seeded.DeleteItem(pb.DeleteItemRequest(id="CLP-200"))
    await seeded.DeleteDowntimeReason(pb.DeleteDowntimeReasonRequest(id="BREAK"))


async def test_bad_page_tokens(seeded: pb_grpc.ProductionServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await seeded.ListSectors(pb.ListSectorsRequest(page_token="garbage!"))
    assert err.value.code() == Code.INVALID_ARGUMENT and "page_token" in field_violations(err.value)
    for i in range(3):
        await seeded.CreateItem(pb.CreateItemRequest(item=md.Item(
            id=f"X-{i}", display_name="x", ideal_cycle_time=duration_pb2.Duration(seconds=1))))
    token = (await seeded.ListItems(pb.ListItemsRequest(page_size=1))).next_page_token
    assert token
    with pytest.raises(grpc.aio.AioRpcError) as err:  # an items token is not a sectors token
        await seeded.ListSectors(pb.ListSectorsRequest(page_token=token))
    assert err.value.code() == Code.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await seeded.ListItems(pb.ListItemsRequest(page_size=501))
    assert err.value.code() == Code.INVALID_ARGUMENT and "page_size" in field_violations(err.value)


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "fabrica.production.v1.ProductionService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    answers = [a async for a in reflection.ServerReflectionInfo(ask())]
    assert "fabrica.production.v1.ProductionService" in {s.name for s in answers[0].list_services_response.service}
