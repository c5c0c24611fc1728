"""The contract's rules on ids, names, timestamps and durations, at real servers: what used to reach Postgres
or a datetime conversion (INTERNAL) is INVALID_ARGUMENT on its field, before any SQL."""

from __future__ import annotations

import grpc
import pytest
from fabrica.config.v1 import config_service_pb2 as cpb
from fabrica.ingest.v1 import ingest_service_pb2 as ipb
from fabrica.production.v1 import master_data_pb2, order_pb2
from fabrica.production.v1 import production_service_pb2 as ppb
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from fabrica_svc.runtime.validation import violations_of
from grpc_helpers import field_violations
from in_process import Servers, settings_for

Code = grpc.StatusCode
NUL = "press\x00-1"


async def refused(call: object, field: str) -> str:
    """Await the unary call (or read the first message of a stream); it must be INVALID_ARGUMENT on `field`."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if hasattr(call, "read"):
            await call.read()  # type: ignore[attr-defined]
        else:
            await call  # type: ignore[misc]
    assert err.value.code() == Code.INVALID_ARGUMENT, err.value
    violations = field_violations(err.value)
    assert field in violations, violations
    return violations[field]


async def test_nul_in_ids_is_invalid_argument_at_every_service(database_url: str, servers: Servers) -> None:
    config = await servers.start("config", settings_for("config", database_url=database_url))
    ingest = await servers.start("ingest", settings_for("ingest", database_url=database_url))
    production = await servers.start("production", settings_for("production", database_url=database_url))
    await refused(config.stub.GetPlc(cpb.GetPlcRequest(id=NUL)), "id")
    await refused(config.stub.DeletePlc(cpb.DeletePlcRequest(id=NUL)), "id")
    await refused(ingest.stub.WatchTagEvents(ipb.WatchTagEventsRequest(plc_ids=["press-1", NUL])), "plc_ids[1]")
    p = production.stub
    await refused(p.GetItem(ppb.GetItemRequest(id=NUL)), "id")
    await refused(p.DeleteItem(ppb.DeleteItemRequest(id=NUL)), "id")
    await refused(p.GetDefectCode(ppb.GetDefectCodeRequest(id=NUL)), "id")
    await refused(p.WatchOrders(ppb.WatchOrdersRequest(work_center_id=NUL)), "work_center_id")
    # An Update's resource is validated after its mask is merged: the id it names is checked before that.
    await refused(p.UpdateSector(ppb.UpdateSectorRequest(sector=master_data_pb2.Sector(id="\x00"),
                                                         update_mask=field_mask_pb2.FieldMask(paths=["display_name"]))),
                  "sector.id")
    await refused(p.CancelOrder(ppb.CancelOrderRequest(id="1", reason="tool\x00broke")), "reason")
    item = master_data_pb2.Item(id="BRK-100")
    for paths in (["display_name\x00"], ["display_name"] * 33):
        await refused(p.UpdateItem(ppb.UpdateItemRequest(item=item, update_mask=field_mask_pb2.FieldMask(paths=paths))),
                      "update_mask")


def _ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


BAD_TIMES = {
    "nanos of a second or more": _ts(1_700_000_000, 1_000_000_000),
    "negative nanos": _ts(1_700_000_000, -1),
    "after the year 9999": _ts(253_402_300_800),
    "before the year 1": _ts(-62_135_596_801),
}


@pytest.mark.parametrize("bad", list(BAD_TIMES), ids=list(BAD_TIMES))
async def test_timestamps_out_of_range_are_invalid_argument(bad: str, database_url: str, servers: Servers) -> None:
    production = await servers.start("production", settings_for("production", database_url=database_url))
    p, t = production.stub, BAD_TIMES[bad]
    downtime = order_pb2.Downtime(work_center_id="press-1", start_time=t)
    await refused(p.CreateDowntime(ppb.CreateDowntimeRequest(downtime=downtime)), "downtime.start_time")
    await refused(p.GetOee(ppb.GetOeeRequest(work_center_id="press-1", start_time=t)), "start_time")
    await refused(p.ListDowntimes(ppb.ListDowntimesRequest(work_center_id="press-1", end_time=t)), "end_time")


def test_the_extremes_of_the_timestamp_range_are_valid() -> None:
    for t in (_ts(-62_135_596_800), _ts(253_402_300_799, 999_999_999)):
        assert violations_of(ppb.ListDowntimesRequest(work_center_id="press-1", start_time=t)) == []


@pytest.mark.parametrize("seconds, nanos", [(1, 1_000_000_000), (1, -1), (-1, 1), (400_000_000_000, 0)])
def test_durations_out_of_range_or_of_mixed_sign_are_refused(seconds: int, nanos: int) -> None:
    item = master_data_pb2.Item(id="BRK-100", display_name="Bracket",
                                ideal_cycle_time=duration_pb2.Duration(seconds=seconds, nanos=nanos))
    found = violations_of(ppb.CreateItemRequest(item=item))
    assert found and {v.field for v in found} == {"item.ideal_cycle_time"}, found
