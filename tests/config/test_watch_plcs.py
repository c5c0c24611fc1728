"""WatchPlcs: snapshot, live changes from another replica (LISTEN/NOTIFY), exact resume, resync."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.config.v1 import config_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import plc_pb2
from google.protobuf import field_mask_pb2

from fabrica_svc.config import servicer as config_servicer
from fabrica_svc.config import store as config_store
from in_process import Server, Servers, settings_for

from .test_config_service import modbus_plc


@pytest.fixture
async def two_replicas(database_url: str, servers: Servers) -> tuple[Server, Server]:
    settings = settings_for("config", database_url=database_url)
    return await servers.start("config", settings), await servers.start("config", settings)


class Watch:
    """A WatchPlcs stream read in the background into a queue."""

    def __init__(self, stub: pb_grpc.ConfigServiceStub, collector: str, after: int = 0,
                 metadata: tuple[tuple[str, str], ...] | None = None):
        self.call = stub.WatchPlcs(pb.WatchPlcsRequest(collector_id=collector, after_revision=after), metadata=metadata)
        self.queue: asyncio.Queue[pb.WatchPlcsResponse] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.call:
            await self.queue.put(msg)

    async def next(self, timeout: float = 10.0) -> pb.WatchPlcsResponse:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_snapshot_then_live_changes_from_another_replica_then_exact_resume(
    two_replicas: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the fallback poll pushed out of reach, only a NOTIFY from replica B can wake the watcher on A.
    monkeypatch.setattr(config_servicer, "WATCH_POLL_SECONDS", 300.0)
    a, b = two_replicas
    async with grpc.aio.insecure_channel(a.address) as ch_a, grpc.aio.insecure_channel(b.address) as ch_b:
        stub_a, stub_b = pb_grpc.ConfigServiceStub(ch_a), pb_grpc.ConfigServiceStub(ch_b)
        p1 = (await stub_a.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("press-01")))).plc
        await stub_a.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("other", collector="cell-9")))

        watch = Watch(stub_a, "cell-1")
        first = await watch.next()
        assert first.WhichOneof("event") == "snapshot" and not first.snapshot.resync
        assert [p.id for p in first.snapshot.plcs] == ["press-01"]
        assert first.revision >= p1.revision

        started = time.perf_counter()
        p2 = (await stub_b.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("press-02")))).plc
        change = await watch.next()
        latency = time.perf_counter() - started
        print(f"change through replica B reached the watcher on A in {latency * 1000:.0f} ms")
        assert change.change.type == pb.CHANGE_TYPE_UPSERT and change.change.plc == p2
        assert change.revision == p2.revision

        # A change for another collector is not this watcher's business.
        await stub_b.UpdatePlc(pb.UpdatePlcRequest(plc=plc_pb2.Plc(id="other", display_name="x"),
                                                   update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
        # Moving press-01 to another collector is a delete for this one.
        moved = (await stub_b.UpdatePlc(pb.UpdatePlcRequest(
            plc=plc_pb2.Plc(id="press-01", collector_id="cell-2"),
            update_mask=field_mask_pb2.FieldMask(paths=["collector_id"])))).plc
        gone = await watch.next()
        assert gone.change.type == pb.CHANGE_TYPE_DELETE and gone.change.plc_id == "press-01"
        assert gone.revision == moved.revision
        last_seen = gone.revision
        await watch.close()

        # While disconnected: three changes, two of them ours.
        p3 = (await stub_b.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("press-03")))).plc
        await stub_b.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("press-04", collector="cell-2")))
        await stub_b.DeletePlc(pb.DeletePlcRequest(id="press-02"))

        resumed = Watch(stub_a, "cell-1", after=last_seen)
        got = [await resumed.next(), await resumed.next()]
        assert [(m.change.type, m.change.plc_id) for m in got] == [
            (pb.CHANGE_TYPE_UPSERT, "press-03"),
            (pb.CHANGE_TYPE_DELETE, "press-02"),
        ]
        assert got[0].change.plc == p3
        revisions = [m.revision for m in got]
        assert revisions == sorted(revisions) and revisions[0] > last_seen
        # Nothing more: no repeat of what came before the resume point.
        with pytest.raises(TimeoutError):
            await resumed.next(timeout=0.5)
        # And it is live again.
        await stub_b.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("press-05")))
        assert (await resumed.next()).change.plc_id == "press-05"
        await resumed.close()


async def test_resume_from_a_revision_too_old_or_unknown_gets_a_flagged_snapshot(
    two_replicas: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_store, "RETAINED_CHANGES", 3)
    a, _ = two_replicas
    async with grpc.aio.insecure_channel(a.address) as ch:
        stub = pb_grpc.ConfigServiceStub(ch)
        first = (await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc("press-01")))).plc
        for i in range(2, 7):
            await stub.CreatePlc(pb.CreatePlcRequest(plc=modbus_plc(f"press-0{i}")))
        watch = Watch(stub, "cell-1", after=first.revision)
        msg = await watch.next()
        assert msg.WhichOneof("event") == "snapshot" and msg.snapshot.resync
        assert len(msg.snapshot.plcs) == 6
        await watch.close()

        future = Watch(stub, "cell-1", after=msg.revision + 1000)  # e.g. a collector that saw another database
        msg2 = await future.next()
        assert msg2.snapshot.resync and msg2.revision == msg.revision
        await future.close()


async def test_watch_rejects_a_bad_collector_id(two_replicas: tuple[Server, Server]) -> None:
    a, _ = two_replicas
    async with grpc.aio.insecure_channel(a.address) as ch:
        stub = pb_grpc.ConfigServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchPlcs(pb.WatchPlcsRequest(collector_id="Not Valid")):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
