"""EndDowntime: a stop entered by hand while the machine is down is ended later, by an operator; automatic
stops end with the machine state, ended ones stay as they are, and nothing is half-written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from fabrica.production.v1 import order_pb2 as S
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc

from grpc_helpers import error_info, field_violations

from .support import execute, precondition_violations, seed, ts

Code = grpc.StatusCode


async def test_an_open_stop_entered_by_hand_is_ended(stub: pb_grpc.ProductionServiceStub, database_url: str) -> None:
    await seed(stub)
    began = datetime.now(UTC) - timedelta(minutes=20)
    stop = (await stub.CreateDowntime(pb.CreateDowntimeRequest(downtime=S.Downtime(
        work_center_id="press-1", start_time=ts(began), note="waiting for coil")))).downtime
    assert not stop.HasField("end_time")

    # An end before the stop began, or in the future: the field, and nothing changes.
    for end in (began - timedelta(seconds=1), began, datetime.now(UTC) + timedelta(hours=1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.EndDowntime(pb.EndDowntimeRequest(id=stop.id, end_time=ts(end)))
        assert err.value.code() == Code.INVALID_ARGUMENT and "end_time" in field_violations(err.value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EndDowntime(pb.EndDowntimeRequest(id="999999"))
    assert err.value.code() == Code.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EndDowntime(pb.EndDowntimeRequest(id=""))
    assert err.value.code() == Code.INVALID_ARGUMENT and "id" in field_violations(err.value)
    listed = (await stub.ListDowntimes(pb.ListDowntimesRequest(work_center_id="press-1"))).downtimes
    assert listed == [stop]

    ended_at = began + timedelta(minutes=12)
    ended = (await stub.EndDowntime(pb.EndDowntimeRequest(id=stop.id, end_time=ts(ended_at)))).downtime
    assert ended.end_time == ts(ended_at)
    assert (ended.id, ended.note, ended.start_time, ended.automatic) == (stop.id, stop.note, stop.start_time, False)

    # Once ended it stays as it is.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EndDowntime(pb.EndDowntimeRequest(id=stop.id))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert error_info(err.value).reason == "DOWNTIME_NOT_OPEN"
    assert precondition_violations(err.value)[0].subject == f"downtimes/{stop.id}"

    # Unset end_time is now.
    other = (await stub.CreateDowntime(pb.CreateDowntimeRequest(downtime=S.Downtime(
        work_center_id="press-1", start_time=ts(datetime.now(UTC) - timedelta(minutes=1)))))).downtime
    now_ended = (await stub.EndDowntime(pb.EndDowntimeRequest(id=other.id))).downtime
    assert abs(now_ended.end_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)) < timedelta(seconds=30)


async def test_an_automatic_stop_is_left_to_the_machine_state(stub: pb_grpc.ProductionServiceStub,
                                                              database_url: str) -> None:
    await seed(stub)
    stop = (await stub.CreateDowntime(pb.CreateDowntimeRequest(downtime=S.Downtime(
        work_center_id="press-1", start_time=ts(datetime.now(UTC) - timedelta(minutes=5)))))).downtime
    await execute(database_url, "UPDATE production.downtimes SET automatic = true WHERE id = $1", int(stop.id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EndDowntime(pb.EndDowntimeRequest(id=stop.id))
    assert err.value.code() == Code.FAILED_PRECONDITION
    assert error_info(err.value).reason == "DOWNTIME_AUTOMATIC"
    after = (await stub.ListDowntimes(pb.ListDowntimesRequest(work_center_id="press-1"))).downtimes[0]
    assert not after.HasField("end_time") and after.automatic
