"""What the engineer sees: readings carry their tag's name and unit, and tags removed from a PLC leave the
latest values (their history stays). Real config service, real ingest, the real collector app in process
polling the project's plcsim, all on the embedded Postgres; plus SyncTags on its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as cpb
from fabrica.config.v1 import config_service_pb2_grpc as cpb_grpc
from fabrica.config.v1 import plc_pb2 as T
from fabrica.ingest.v1 import ingest_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from fabrica.ingest.v1 import query_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2

from collector.support import (app_of, collector_settings, free_port, mb_tag, modbus_plc, start_collector,
                               start_config, start_ingest, store_config, stored_readings, wait_for)
from fabrica_svc.clients.errors import error_details
from fabrica_svc.clients.tags import TagInfo, sync_tags
from fabrica_svc.collector.tag_sync import TagSync
from fabrica_svc.runtime.retry import RetryPolicy
from fabrica_svc.plcsim import Simulator

from .support import batch, batch_request, fetchval, open_request, reading

COUNTER = reading_pb2.TAG_ROLE_PRODUCTION_COUNTER


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=3) as s:
        yield s


def press_tags() -> list[T.Tag]:
    tags = [mb_tag("count", 0, T.DATA_TYPE_UINT32, unit="pcs", role=COUNTER),
            mb_tag("temperature", 4, T.DATA_TYPE_FLOAT32, unit="°C"),
            mb_tag("current", 8, T.DATA_TYPE_FLOAT32, unit="A")]
    for tag in tags:
        tag.ClearField("id")  # the config service assigns them
    return tags


async def latest(stub: pb_grpc.IngestServiceStub, **request: object) -> dict[str, tuple[int, str, str]]:
    """GetLatestValues, as name -> (tag id, plc id, unit)."""
    reply = await stub.GetLatestValues(pb.GetLatestValuesRequest(**request), timeout=10)
    return {r.tag_name: (r.tag_id, r.plc_id, r.unit) for r in reply.readings}


def described(plc: T.Plc) -> dict[str, tuple[int, str, str]]:
    return {t.name: (t.id, plc.id, t.unit) for t in plc.tags}


async def test_latest_values_follow_the_tags_names_units_and_removals_in_config(
    database_url: str, sim: Simulator, tmp_path: Path
) -> None:
    config = await start_config(database_url)
    ingest = await start_ingest(database_url)
    collector = None
    try:
        async with grpc.aio.insecure_channel(config.address) as cch, grpc.aio.insecure_channel(ingest.address) as ich:
            cstub, stub = cpb_grpc.ConfigServiceStub(cch), pb_grpc.IngestServiceStub(ich)
            press = (await cstub.CreatePlc(cpb.CreatePlcRequest(
                plc=modbus_plc("press", sim.modbus_port, press_tags(), interval=0.05)))).plc
            collector = await start_collector(collector_settings(
                tmp_path, FABRICA_CONFIG_ADDR=config.address, FABRICA_INGEST_ADDR=ingest.address))
            app = app_of(collector)

            # Every tag of the PLC, under its name and unit (not only its id).
            want = described(press)
            assert want["temperature"][2] == "°C" and want["count"][2] == "pcs"
            async def shows(expected: dict[str, tuple[int, str, str]]) -> bool:
                return await latest(stub, plc_id="press") == expected
            await wait_for(lambda: shows(want), what="the press's latest values with names and units")
            by_id = await stub.GetLatestValues(pb.GetLatestValuesRequest(tag_ids=[want["count"][0]]))
            assert [(r.tag_name, r.unit, r.role) for r in by_id.readings] == [("count", "pcs", COUNTER)]

            # Renamed (the config service gives the new name a new id), a unit changed, a tag removed.
            plc = T.Plc()
            plc.CopyFrom(press)
            del plc.tags[0]  # count
            plc.tags[0].unit = "K"  # temperature keeps its id
            plc.tags[1].name = "motor_current"
            press2 = (await cstub.UpdatePlc(cpb.UpdatePlcRequest(
                plc=plc, update_mask=field_mask_pb2.FieldMask(paths=["tags"])))).plc
            want2 = described(press2)
            assert want2["temperature"] == (want["temperature"][0], "press", "K")
            assert want2["motor_current"][0] != want["current"][0]
            await wait_for(lambda: shows(want2), what="the renamed, re-united and removed tags in latest values")

            # The removed tags are gone from latest values by id too...
            gone = [want["count"][0], want["current"][0]]
            assert (await stub.GetLatestValues(pb.GetLatestValuesRequest(tag_ids=gone))).readings == []
            # ...while their readings stay queryable, under the names they had.
            history = await stub.QueryReadings(pb.QueryReadingsRequest(
                filter=query_pb2.ReadingFilter(tag_ids=gone, start_time=timestamp_pb2.Timestamp(seconds=0),
                                               end_time=timestamp_pb2.Timestamp(seconds=4_000_000_000)),
                page_size=10000))
            assert {r.tag_id for r in history.readings} == set(gone)
            assert {(r.tag_id, r.tag_name, r.unit) for r in history.readings} == {
                (want["count"][0], "count", "pcs"), (want["current"][0], "current", "A")}
            # Export carries the current names as well.
            exported = await stored_readings(ingest.address, [want2["temperature"][0]])
            assert exported and {(r.tag_name, r.unit) for r in exported} <= {("temperature", "°C"), ("temperature", "K")}
            assert app.tag_sync.failures == 0
    finally:
        if collector is not None:
            await collector.stop(grace=0)
        await ingest.stop(grace=0)
        await config.stop(grace=0)


async def test_the_sync_waits_for_ingest_without_holding_readings_and_is_idempotent_across_restarts(
    database_url: str, sim: Simulator, tmp_path: Path
) -> None:
    ingest_port = free_port()
    settings = collector_settings(tmp_path, FABRICA_INGEST_ADDR=f"127.0.0.1:{ingest_port}")
    tags = press_tags()
    for i, tag in enumerate(tags, start=1):
        tag.id = 900 + i
    press = modbus_plc("press", sim.modbus_port, tags, interval=0.05)
    store_config(settings, [press])  # the configuration the collector applied before (config is away)
    want = described(press)

    collector = await start_collector(settings)  # ingest is not up yet: the sync fails and is retried
    ingest = None
    try:
        app = app_of(collector)
        await wait_for(lambda: app.tag_sync.failures >= 2 and app.spool.backlog_readings > 0,
                       what="failed syncs while readings pile up")
        ingest = await start_ingest(database_url, ingest_port)
        async with grpc.aio.insecure_channel(ingest.address) as channel:
            stub = pb_grpc.IngestServiceStub(channel)

            async def shows() -> bool:
                return await latest(stub, plc_id="press") == want
            await wait_for(shows, timeout=20, what="names and units once ingest is up")
            assert app.tag_sync.syncs == 1 and app.tag_sync.last_reply == pb.SyncTagsResponse(changed=3, removed=0)

            # A restart sends the same set again: ingest changes nothing, latest values stay as they are.
            await collector.stop(grace=0)
            collector = await start_collector(settings)
            app = app_of(collector)
            await wait_for(lambda: app.tag_sync.syncs == 1, what="the set sent after the restart")
            assert app.tag_sync.last_reply == pb.SyncTagsResponse(changed=0, removed=0)
            assert await latest(stub, plc_id="press") == want
    finally:
        await collector.stop(grace=0)
        if ingest is not None:
            await ingest.stop(grace=0)


async def test_sync_tags_replaces_a_collectors_set_and_leaves_other_collectors_and_undescribed_tags(
    database_url: str, tmp_path: Path
) -> None:
    ingest = await start_ingest(database_url)
    try:
        async with grpc.aio.insecure_channel(ingest.address) as channel:
            stub = pb_grpc.IngestServiceStub(channel)
            # Readings of tags 1-4 (of two collectors), and of tag 9 that no collector ever describes.
            us = 1_700_000_000_000_000
            call = stub.StreamReadings()
            await call.write(open_request("cell-a"))
            await call.read()
            await call.write(batch_request(batch("cell-a", 1, [
                reading(t, us + t, float(t), plc_id="p1" if t < 3 else "p2") for t in (1, 2, 3, 4, 9)])))
            assert (await call.read()).ack.sequence == 1
            await call.done_writing()

            a = [TagInfo(tag_id=1, plc_id="p1", name="speed", unit="rpm"),
                 TagInfo(tag_id=2, plc_id="p1", name="torque", unit="N·m")]
            b = [TagInfo(tag_id=3, plc_id="p2", name="level", unit="%"),
                 TagInfo(tag_id=4, plc_id="p2", name="flow", unit="m³/h")]
            assert await sync_tags(channel, "cell-a", a) == pb.SyncTagsResponse(changed=2)
            assert await sync_tags(channel, "cell-a", a) == pb.SyncTagsResponse()  # idempotent
            assert await sync_tags(channel, "cell-b", b) == pb.SyncTagsResponse(changed=2)
            every = [1, 2, 3, 4, 9]
            assert await latest(stub, tag_ids=every) == {
                "speed": (1, "p1", "rpm"), "torque": (2, "p1", "N·m"), "level": (3, "p2", "%"),
                "flow": (4, "p2", "m³/h"), "": (9, "p2", "")}

            # cell-a drops torque and takes over flow: torque leaves latest values, flow is cell-a's now,
            # and cell-b's next sync (without flow) no longer removes it.
            a2 = [a[0], b[1]]
            assert await sync_tags(channel, "cell-a", a2) == pb.SyncTagsResponse(changed=1, removed=1)
            assert await sync_tags(channel, "cell-b", [b[0]]) == pb.SyncTagsResponse()
            assert set(await latest(stub, tag_ids=every)) == {"speed", "level", "flow", ""}
            # Back in the set: back in latest values (and flow, left out now, is removed).
            assert await sync_tags(channel, "cell-a", a) == pb.SyncTagsResponse(changed=1, removed=1)
            assert set(await latest(stub, tag_ids=every)) == {"speed", "torque", "level", ""}
            # An empty set removes all of the collector's tags.
            assert await sync_tags(channel, "cell-a", []) == pb.SyncTagsResponse(removed=2)
            assert set(await latest(stub, plc_id="p1")) == set()

            # A set that says two things of one tag, or a bad name, is refused with field violations.
            for tags, path in (([a[0], a[0]], "tags[1].tag_id"),
                               ([TagInfo(tag_id=5, plc_id="p1", name="bad name")], "tags[0].name"),
                               ([TagInfo(tag_id=5, plc_id="p1", name="ok", unit="x\x00")], "tags[0].unit")):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await sync_tags(channel, "cell-a", tags)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert path in dict(error_details(caught.value).field_violations)
    finally:
        await ingest.stop(grace=0)


async def test_the_collectors_tag_sync_reports_a_refused_set_and_repairs_a_restored_ingest(
    database_url: str
) -> None:
    ingest = await start_ingest(database_url)
    sync = TagSync(ingest.address, "cell-a", retry=RetryPolicy(0.05, 0.3), resync_interval=0.5)
    try:
        async with grpc.aio.insecure_channel(ingest.address) as channel:
            stub = pb_grpc.IngestServiceStub(channel)
            call = stub.StreamReadings()
            await call.write(open_request("cell-a"))
            await call.read()
            await call.write(batch_request(batch("cell-a", 1, [reading(t, 1_700_000_000_000_000, plc_id="p1")
                                                               for t in (1, 2)])))
            assert (await call.read()).ack.sequence == 1
            await call.done_writing()

            sync.start()
            plcs = [T.Plc(id="p1", tags=[T.Tag(id=1, name="speed", unit="rpm"), T.Tag(id=2, name="bad name")])]
            sync.update(plcs)
            await wait_for(lambda: sync.failures >= 1, what="the set refused")
            assert "tags[1].name" in sync.last_error and sync.syncs == 0
            plcs[0].tags[1].name = "torque"
            sync.update(plcs)
            want = {"speed": (1, "p1", "rpm"), "torque": (2, "p1", "")}

            async def shows() -> bool:
                return await latest(stub, plc_id="p1") == want
            await wait_for(shows, what="the corrected set synced")
            assert sync.syncs == 1 and sync.last_error == ""

            # Ingest's database loses what it knew (restored from an older backup): the periodic resync
            # brings the names back without any configuration change.
            deleted = await fetchval(
                database_url, "WITH gone AS (DELETE FROM ingest.tag_metadata RETURNING 1) SELECT count(*) FROM gone")
            assert deleted == 2
            await wait_for(shows, what="the names back after a resync")
            assert sync.syncs >= 2
    finally:
        await sync.stop()
        await ingest.stop(grace=0)
