"""The demo set-up `fabrica run` uses: complete, idempotent, re-binds changed tags, and fills from the counter."""

from __future__ import annotations

from datetime import UTC, timedelta

import asyncpg
from fabrica.common.v1 import reading_pb2
from fabrica.ingest.v1 import tag_event_pb2
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2 as S
from fabrica.production.v1 import production_service_pb2 as pb
from fabrica.production.v1 import production_service_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2, field_mask_pb2

from fabrica_svc.production.demo import create_demo
from in_process import Server

from .support import ts


async def test_create_demo(stub: pb_grpc.ProductionServiceStub, server: Server, database_url: str) -> None:
    order = await create_demo(stub, plc_id="demo-press", production_counter_tag_id=11, scrap_counter_tag_id=12,
                              machine_state_tag_id=13, planned_quantity=30)
    assert (order.number, order.state, order.planned_quantity) == ("DEMO-0001", S.ORDER_STATE_IN_PROGRESS, 30)
    wc = (await stub.GetWorkCenter(pb.GetWorkCenterRequest(id=order.work_center_id))).work_center
    assert (wc.plc_id, wc.production_counter_tag_id, wc.scrap_counter_tag_id, wc.machine_state_tag_id) == (
        "demo-press", 11, 12, 13)
    assert len((await stub.ListDefectCodes(pb.ListDefectCodesRequest())).defect_codes) == 3
    reasons = (await stub.ListDowntimeReasons(pb.ListDowntimeReasonsRequest())).downtime_reasons
    assert {r.id for r in reasons if not r.counts_against_availability} == {"BREAK"}

    item = (await stub.GetItem(pb.GetItemRequest(id=order.item_id))).item
    assert item.ideal_cycle_time.ToNanoseconds() == 450_000_000
    assert item.reference_type_id == "BRACKETS"
    assert [(r.id, r.display_name) for r in (await stub.ListReferenceTypes(pb.ListReferenceTypesRequest())
                                             ).reference_types] == [("BRACKETS", "Brackets")]

    again = await create_demo(stub, plc_id="demo-press", production_counter_tag_id=11, scrap_counter_tag_id=12,
                              machine_state_tag_id=13)
    assert again == order, "a second call changes nothing"
    assert (await stub.GetItem(pb.GetItemRequest(id=order.item_id))).item == item

    # A data folder from a run with the old ideal cycle time (0.5 s, a performance above 100 %) is corrected.
    await stub.UpdateItem(pb.UpdateItemRequest(
        item=md.Item(id=item.id, ideal_cycle_time=duration_pb2.Duration(nanos=500_000_000), etag=item.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["ideal_cycle_time"])))
    await create_demo(stub, plc_id="demo-press", production_counter_tag_id=11, scrap_counter_tag_id=12,
                      machine_state_tag_id=13)
    fixed = (await stub.GetItem(pb.GetItemRequest(id=order.item_id))).item
    assert fixed.ideal_cycle_time.ToNanoseconds() == 450_000_000
    # ... and so is one from before reference types: the demo item is grouped.
    await stub.UpdateItem(pb.UpdateItemRequest(item=md.Item(id=item.id, etag=fixed.etag),
                                               update_mask=field_mask_pb2.FieldMask(paths=["reference_type_id"])))
    await create_demo(stub, plc_id="demo-press", production_counter_tag_id=11, scrap_counter_tag_id=12,
                      machine_state_tag_id=13)
    regrouped = (await stub.GetItem(pb.GetItemRequest(id=order.item_id))).item
    assert (regrouped.reference_type_id, regrouped.ideal_cycle_time) == ("BRACKETS", fixed.ideal_cycle_time)

    # A fresh config database gave the tags new ids: the work centre follows them.
    await create_demo(stub, plc_id="demo-press", production_counter_tag_id=21, machine_state_tag_id=23)
    wc = (await stub.GetWorkCenter(pb.GetWorkCenterRequest(id=order.work_center_id))).work_center
    assert (wc.production_counter_tag_id, wc.scrap_counter_tag_id, wc.machine_state_tag_id) == (21, 0, 23)

    # The demo order fills from the counter (events as the consumer applies them) and completes itself.
    start = order.start_time.ToDatetime(tzinfo=UTC)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "production"})
    try:
        events = []
        for i, value in enumerate([1_000, 1_010, 1_020, 1_030]):
            e = tag_event_pb2.TagEvent(cursor=i + 1, tag_id=21, plc_id="demo-press", quality=reading_pb2.QUALITY_GOOD,
                                       read_time=ts(start + timedelta(seconds=i + 1)))
            e.value.uint_value = value
            events.append(e)
        await server.app.tag_events.apply_tag_events(conn, events)  # type: ignore[attr-defined]
    finally:
        await conn.close()
    done = (await stub.GetOrder(pb.GetOrderRequest(id=order.id))).order
    assert (done.state, done.good_quantity) == (S.ORDER_STATE_COMPLETED, 30)

    # With the first one done, the next call starts the next demo order.
    nxt = await create_demo(stub, plc_id="demo-press", production_counter_tag_id=21, machine_state_tag_id=23)
    assert (nxt.number, nxt.state) == ("DEMO-0002", S.ORDER_STATE_IN_PROGRESS)
