"""One trace from the PLC read to production, over OTLP to a real receiver, across real processes; and after a
collector SIGKILL and restart, the resent batch's commit span still links to the poll that produced it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import config_service_pb2_grpc as config_grpc
from fabrica.config.v1 import plc_pb2 as T
from fabrica.production.v1 import production_service_pb2 as prod_pb
from fabrica.production.v1 import production_service_pb2_grpc as prod_grpc

from fabrica_svc.plcsim import ManualClock, PlantConfig, Simulator
from fabrica_svc.production.demo import create_demo
from procs import ServiceProcess, wait_for

from collector.support import collector_settings, mb_tag, modbus_plc
from .support import OtlpReceiver

pytestmark = pytest.mark.slow


async def started(process: ServiceProcess) -> ServiceProcess:
    """Start the process off the event loop: the OTLP receiver keeps answering meanwhile."""
    return await asyncio.to_thread(process.start)


def _attr(span, key: str):  # noqa: ANN001 - an OTLP Span
    for a in span.attributes:
        if a.key == key:
            v = a.value
            return getattr(v, v.WhichOneof("value"))
    return None


async def test_one_trace_from_poll_to_booking_and_a_resent_batch_links_to_its_poll(
        database_url: str, tmp_path: Path) -> None:
    receiver = await OtlpReceiver().start()
    procs: list[ServiceProcess] = []
    try:
        async with Simulator(seed=3, clock=ManualClock(), config=PlantConfig(seed=3, scrap_every=0)) as sim:
            settings = collector_settings(tmp_path / "data", "cell-1")
            common = {"DATABASE_URL": database_url, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                      "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100",
                      "FABRICA_TRACE_SAMPLE_RATIO": "1", "FABRICA_HEALTH_INTERVAL": "0.5"}
            config = await started(ServiceProcess("config", common, tmp_path / "config.log"))
            procs.append(config)
            ingest = await started(ServiceProcess("ingest", common, tmp_path / "ingest.log"))
            procs.append(ingest)
            production = await started(ServiceProcess("production", {**common, "FABRICA_INGEST_ADDR": ingest.address,
                                                                     "FABRICA_CONFIG_ADDR": config.address},
                                                      tmp_path / "production.log"))
            procs.append(production)
            async with grpc.aio.insecure_channel(config.address) as cch:
                created = (await config_grpc.ConfigServiceStub(cch).CreatePlc(config_pb.CreatePlcRequest(plc=modbus_plc(
                    "press", sim.modbus_port,
                    [mb_tag("count", 0, T.DATA_TYPE_UINT32, role=reading_pb2.TAG_ROLE_PRODUCTION_COUNTER)],
                    interval=0.05, integrity=3600)))).plc
            counter = created.tags[0].id
            collector = ServiceProcess("collector", {
                **common, "FABRICA_DATA_DIR": str(settings.base.data_dir), "FABRICA_COLLECTOR_ID": "cell-1",
                "FABRICA_CONFIG_ADDR": config.address, "FABRICA_INGEST_ADDR": ingest.address,
                "FABRICA_COLLECTOR_BATCH_LATENCY_MS": "50", "FABRICA_COLLECTOR_RECONNECT_MIN": "0.05",
                "FABRICA_COLLECTOR_RECONNECT_MAX": "0.3"}, tmp_path / "collector.log")
            await started(collector)
            procs.append(collector)
            async with grpc.aio.insecure_channel(production.address) as pch:
                prod = prod_grpc.ProductionServiceStub(pch)
                order = await create_demo(prod, plc_id="press", production_counter_tag_id=counter, planned_quantity=100)
                # The first reading after the binding is the counter's baseline; the next one books.
                sim.make_parts(1)
                await asyncio.sleep(1.0)
                sim.make_parts(2)

                async def booked() -> bool:
                    got = (await prod.GetOrder(prod_pb.GetOrderRequest(id=order.id))).order
                    return got.good_quantity > 0

                await wait_for(booked, timeout=60, what="production to book the parts")
            by_id = {}

            def index() -> None:
                for service, span in receiver.spans:
                    by_id[span.span_id] = (service, span)

            def chain() -> dict | None:
                """A booking whose parent is a batch whose parent is a poll of the press, with that batch's spool
                write, send and commit in the same trace."""
                index()
                for service, book in receiver.named("production.book"):
                    parent = by_id.get(book.parent_span_id)
                    if service != "fabrica-production" or parent is None or parent[1].name != "collector.batch" \
                            or not _attr(book, "fabrica.production.booked_good"):
                        continue
                    batch = parent[1]
                    poll = by_id.get(batch.parent_span_id)
                    same = [(s, x) for s, x in receiver.spans if x.trace_id == book.trace_id]
                    names = {(s, x.name) for s, x in same}
                    commit = [x for s, x in same if s == "fabrica-ingest" and x.name == "ingest.commit" and (
                        x.parent_span_id == batch.span_id or any(li.span_id == batch.span_id for li in x.links))]
                    if poll and commit and ("fabrica-collector", "collector.uplink.send") in names \
                            and ("fabrica-collector", "collector.spool.append") in names:
                        return {"poll": poll, "batch": batch, "commit": commit[0], "book": book, "names": names}
                return None

            try:
                found = await wait_for(chain, timeout=60, what="a trace from the poll to the booking")
            except AssertionError:
                seen = sorted({(s, x.name, bool(x.parent_span_id), x.parent_span_id in by_id, len(x.links), _attr(x, 'fabrica.production.events')) for s, x in receiver.spans})
                raise AssertionError(f"no chain; spans received: {seen}") from None
            service, poll = found["poll"]
            assert service == "fabrica-collector" and poll.name == "collector.poll" and not poll.parent_span_id
            assert _attr(poll, "fabrica.plc.id") == "press" and _attr(poll, "fabrica.quality") == "GOOD"
            assert _attr(poll, "fabrica.block.range") == "holding_register[0..1]"
            assert _attr(poll, "fabrica.read.latency_s") > 0
            commit = found["commit"]
            assert _attr(commit, "fabrica.ingest.group_rows") >= 1 and _attr(commit, "fabrica.ingest.group_batches") >= 1
            assert _attr(commit, "fabrica.ingest.commit_seconds") > 0
            trace_id = found["book"].trace_id
            assert commit.trace_id == trace_id
            assert {s for s, x in receiver.spans if x.trace_id == trace_id} >= {
                "fabrica-collector", "fabrica-ingest", "fabrica-production"}
            # Client spans: the collector's calls to ingest carry their context (ingest's server span is a child).
            def client_to_server() -> bool:
                client = {x.span_id for s, x in receiver.spans if s == "fabrica-collector" and x.kind == x.SPAN_KIND_CLIENT}
                return any(s == "fabrica-ingest" and x.kind == x.SPAN_KIND_SERVER and x.parent_span_id in client
                           for s, x in receiver.spans)

            await wait_for(client_to_server, timeout=30, what="an ingest server span under a collector client span")

            # --- a batch written to the spool while ingest is down, the collector SIGKILLed, then resent ---
            ingest.kill()
            before = {x.span_id for _, x in receiver.named("collector.spool.append")}
            sim.make_parts(1)

            def new_batch():
                index()
                for _, x in receiver.named("collector.spool.append"):
                    if x.span_id not in before and x.parent_span_id in by_id:
                        return by_id[x.parent_span_id][1]
                return None

            batch = await wait_for(new_batch, timeout=30, what="a batch spooled while ingest is down")
            assert by_id[batch.parent_span_id][1].name == "collector.poll"
            collector.kill()
            await started(ingest)
            await started(collector)

            def resent_commit():
                index()
                for s, x in receiver.named("ingest.commit"):
                    if x.parent_span_id == batch.span_id or any(li.span_id == batch.span_id for li in x.links):
                        return x
                return None

            commit = await wait_for(resent_commit, timeout=60, what="the resent batch's commit")
            assert commit.trace_id == batch.trace_id
            def resent_send() -> bool:  # its span ends with the acknowledgement, so it may come after the commit's
                return any(_attr(x, "fabrica.batch.resent") for _, x in receiver.named("collector.uplink.send")
                           if x.parent_span_id == batch.span_id)

            await wait_for(resent_send, timeout=30, what="the resent batch's send span, marked resent")
            # The commit reaches the poll through the batch span, exported before the kill.
            assert by_id[batch.parent_span_id][1].name == "collector.poll"
    finally:
        for p in reversed(procs):
            p.kill()
        await receiver.stop()
        await asyncio.sleep(0)
