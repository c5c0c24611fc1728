"""The whole chain on loopback: PLC simulator → collector → ingest → production, and `fabrica run`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from fabrica.alarm.v1 import alarm_service_pb2 as alarm_pb
from fabrica.alarm.v1 import alarm_service_pb2_grpc as alarm_grpc
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import config_service_pb2_grpc as config_grpc
from fabrica.ingest.v1 import ingest_service_pb2 as ingest_pb
from fabrica.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from fabrica.production.v1 import master_data_pb2 as md
from fabrica.production.v1 import order_pb2
from fabrica.production.v1 import production_service_pb2 as prod_pb
from fabrica.production.v1 import production_service_pb2_grpc as prod_grpc

from fabrica_svc.collector.app import create_app as create_collector
from fabrica_svc.collector.demo import demo_plcs
from fabrica_svc.collector.settings import CollectorSettings
from fabrica_svc.config.app import create_app as create_config
from fabrica_svc.ingest.app import create_app as create_ingest
from fabrica_svc.plcsim import ManualClock
from fabrica_svc.plcsim.cli import Simulator
from fabrica_svc.production.app import create_app as create_production
from fabrica_svc.production import demo
from fabrica_svc.production.demo import create_demo
from fabrica_svc.runtime.server import ServiceHost
from fabrica_svc.runtime.settings import load_settings
from fabrica_svc.stack import PORTS_USED
from procs import PLAINTEXT, free_base_port, wait_for
from web.grpcweb_client import call as grpc_web_call

pytestmark = pytest.mark.slow


def _settings(service: str, database_url: str, data_dir: Path):
    return load_settings(service, PLAINTEXT).with_overrides(port=0, metrics_port=-1, database_url=database_url,
                                                     data_dir=data_dir, health_interval=0.5)


async def test_order_fills_from_the_simulated_counter_and_completes_itself(database_url: str, tmp_path: Path) -> None:
    """The order's quantities equal the simulator's counter advance over the order's run, exactly.

    The simulator runs on a ManualClock: its counters move only when the test makes parts, and stand still
    at the start (so the baseline is known) and at the end (so the numbers are final)."""
    hosts: list[ServiceHost] = []
    try:
        async with Simulator(clock=ManualClock(), rate=5.0) as sim:
            for factory, name in ((create_config, "config"), (create_ingest, "ingest")):
                s = _settings(name, database_url, tmp_path)
                hosts.append(ServiceHost(factory(s), s))
                await hosts[-1].start()
            config_host, ingest_host = hosts
            s = _settings("production", database_url, tmp_path)
            hosts.append(ServiceHost(create_production(s, ingest_addr=ingest_host.address), s))
            await hosts[-1].start()
            production_host = hosts[-1]
            s = _settings("collector", database_url, tmp_path)
            collector = CollectorSettings(base=s, collector_id="cell-1", config_addr=config_host.address,
                                          ingest_addr=ingest_host.address, batch_latency=0.05)
            hosts.append(ServiceHost(create_collector(s, collector), s))
            await hosts[-1].start()

            async with grpc.aio.insecure_channel(config_host.address) as cch, \
                    grpc.aio.insecure_channel(production_host.address) as pch, \
                    grpc.aio.insecure_channel(ingest_host.address) as ich:
                config = config_grpc.ConfigServiceStub(cch)
                ingest = ingest_grpc.IngestServiceStub(ich)
                plcs = {}
                for plc in demo_plcs("cell-1", sim.modbus_port, sim.rtu_port, sim.s7_port):
                    plcs[plc.id] = (await config.CreatePlc(config_pb.CreatePlcRequest(plc=plc))).plc
                roles = {t.role: t.id for t in plcs["press-1"].tags}
                counters = [roles[reading_pb2.TAG_ROLE_PRODUCTION_COUNTER], roles[reading_pb2.TAG_ROLE_SCRAP_COUNTER]]

                async def ingest_has(snap) -> bool:  # noqa: ANN001 - a PlantSnapshot
                    reply = await ingest.GetLatestValues(ingest_pb.GetLatestValuesRequest(tag_ids=counters))
                    values = [getattr(r.value, r.value.WhichOneof("kind") or "uint_value") for r in reply.readings]
                    return values == [snap.production_count, snap.scrap_count]

                # The press is bound to its work centre before the order, as in a plant: production takes the
                # first reading after the binding as the counters' baseline. Then the counters stand still
                # until ingest has their values, so the order starts from a known baseline.
                production = prod_grpc.ProductionServiceStub(pch)
                await production.CreateSector(prod_pb.CreateSectorRequest(sector=md.Sector(
                    id=demo.SECTOR_ID, display_name="Pressing")))
                await production.CreateWorkCenter(prod_pb.CreateWorkCenterRequest(work_center=md.WorkCenter(
                    id=demo.WORK_CENTER_ID, display_name="Press 1", sector_id=demo.SECTOR_ID, plc_id="press-1",
                    production_counter_tag_id=counters[0], scrap_counter_tag_id=counters[1],
                    machine_state_tag_id=roles[reading_pb2.TAG_ROLE_MACHINE_STATE], counter_width=32)))
                start = sim.make_parts(10)
                await wait_for(lambda: ingest_has(start), timeout=60, what="the counters before the order")
                order = await create_demo(
                    production, plc_id="press-1", planned_quantity=12,
                    production_counter_tag_id=counters[0], scrap_counter_tag_id=counters[1],
                    machine_state_tag_id=roles[reading_pb2.TAG_ROLE_MACHINE_STATE],
                )
                assert order.state == order_pb2.ORDER_STATE_IN_PROGRESS
                end = start
                for _ in range(10):  # bounded: 5 parts a step, 12 planned
                    end = sim.make_parts(5)
                    await wait_for(lambda: ingest_has(end), timeout=60, what=f"the counters at {end.production_count}")

                    async def booked() -> order_pb2.Order | None:
                        got = (await production.GetOrder(prod_pb.GetOrderRequest(id=order.id))).order
                        return got if got.good_quantity == end.production_count - start.production_count else None

                    order = await wait_for(booked, timeout=60, what="production to book the step")
                    if order.state == order_pb2.ORDER_STATE_COMPLETED:
                        break
                assert order.state == order_pb2.ORDER_STATE_COMPLETED, order
                # Three steps of 5 parts reach the 12 planned; the simulator's scrap count moved on the way.
                assert end.production_count - start.production_count == 15
                assert end.scrap_count > start.scrap_count
                # The counters stand still now: the order's numbers are final and equal the counters' advance.
                order = (await production.GetOrder(prod_pb.GetOrderRequest(id=order.id))).order
                assert order.good_quantity == end.production_count - start.production_count
                assert order.scrap_quantity == end.scrap_count - start.scrap_count
                bookings = (await production.ListBookings(prod_pb.ListBookingsRequest(order_id=order.id))).bookings
                assert bookings and all(b.source == order_pb2.BOOKING_SOURCE_COUNTER for b in bookings)
                assert sum(b.good_quantity for b in bookings) == end.production_count - start.production_count
                assert sum(b.scrap_quantity for b in bookings) == end.scrap_count - start.scrap_count
    finally:
        for host in reversed(hosts):
            await host.stop(grace=0)


def test_fabrica_run_shows_a_demo_order_being_filled(tmp_path: Path) -> None:
    base = free_base_port(PORTS_USED)
    env = {**os.environ, "FABRICA_LOG_FORMAT": "text", "FABRICA_METRICS_PORT": "-1"}
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fabrica_svc.cli", "run", "--data-dir", str(tmp_path / "data"),
                                 "--base-port", str(base), "--web-port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        banner = ""
        for _ in range(600):
            banner = log.read_text(errors="replace")
            if "Ctrl-C stops everything" in banner or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert "demo order  DEMO-0001" in banner, banner
        # Over TLS: the stack's own CA, created in its data folder.
        ca = tmp_path / "data" / "tls" / "ca.pem"
        assert f"grpcurl -cacert {ca} 127.0.0.1:{base} list" in banner
        with grpc.insecure_channel(f"127.0.0.1:{base + 2}") as ch:  # plaintext to a TLS port: refused
            with pytest.raises(grpc.RpcError) as err:
                prod_grpc.ProductionServiceStub(ch).ListOrders(prod_pb.ListOrdersRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Authentication is on: the banner's admin token reads, no token is UNAUTHENTICATED.
        admin = next(line.split("=", 1)[1] for line in banner.splitlines() if "export TOKEN=" in line)
        bearer = (("authorization", f"Bearer {admin}"),)
        with grpc.secure_channel(f"127.0.0.1:{base + 2}", grpc.ssl_channel_credentials(ca.read_bytes())) as ch:
            stub = prod_grpc.ProductionServiceStub(ch)
            with pytest.raises(grpc.RpcError) as denied:
                stub.ListOrders(prod_pb.ListOrdersRequest(), timeout=10)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = 0
            for _ in range(600):
                orders = stub.ListOrders(prod_pb.ListOrdersRequest(), timeout=10, metadata=bearer).orders
                good = max((o.good_quantity for o in orders if o.number == "DEMO-0001"), default=0)
                if good > 0:
                    break
                time.sleep(0.1)
            assert good > 0, "the demo order was not filled from the simulated counter"
        # The same order through the web origin `fabrica run` prints: its gRPC-Web gateway.
        web = re.search(r"^  web +(http://127\.0\.0\.1:\d+)/", banner, re.MULTILINE)
        assert web, banner
        # The gateway calls the services over TLS (the local CA) and forwards the browser's token, adding
        # none of its own: without one the services answer UNAUTHENTICATED through it.
        anonymous = grpc_web_call(web.group(1), "/fabrica.production.v1.ProductionService/ListOrders",
                                  prod_pb.ListOrdersRequest())
        assert anonymous.status == grpc.StatusCode.UNAUTHENTICATED.value[0], (anonymous.status, anonymous.message)
        reply = grpc_web_call(web.group(1), "/fabrica.production.v1.ProductionService/ListOrders",
                              prod_pb.ListOrdersRequest(), headers={"authorization": f"Bearer {admin}"})
        assert reply.status == 0 and len(reply.messages) == 1, (reply.status, reply.message)
        assert "DEMO-0001" in [o.number for o in prod_pb.ListOrdersResponse.FromString(reply.messages[0]).orders]
        assert "demo alarms press-1-oil-hot, press-1-silent" in banner, banner
        with grpc.secure_channel(f"127.0.0.1:{base + 4}", grpc.ssl_channel_credentials(ca.read_bytes())) as ch:
            alarms = alarm_grpc.AlarmServiceStub(ch)
            rules = alarms.ListAlarmRules(alarm_pb.ListAlarmRulesRequest(), timeout=10, metadata=bearer).rules
            assert [r.id for r in rules] == ["press-1-oil-hot", "press-1-silent"]
            evaluated: set[str] = set()
            for _ in range(600):  # each rule's alarm exists once the evaluator has seen the tag's readings
                listed = alarms.ListAlarms(alarm_pb.ListAlarmsRequest(include_normal=True), timeout=10,
                                           metadata=bearer).alarms
                evaluated = {a.rule_id for a in listed}
                if len(evaluated) == 2:
                    break
                time.sleep(0.1)
            assert evaluated == {"press-1-oil-hot", "press-1-silent"}, "the demo rules are not evaluated"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text(errors="replace")[-3000:]
