"""The demo plant `fabrica run` sets up, with whatever services this build runs.

The PLC simulator (Modbus TCP press, Modbus RTU-over-TCP energy meter, S7 press), the demo PLC
definitions for the collector (created, or brought up to date with this run's simulator ports), and in
production a demo work centre bound to the Modbus press's counters with a running order that the
simulated counter fills, and in the alarm service two demo rules on the press's oil temperature.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import grpc
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as config_pb
from fabrica.config.v1 import config_service_pb2_grpc as config_grpc
from fabrica.config.v1 import plc_pb2

from .runtime.channels import peer_channel
from .runtime.server import ServiceHost
from .stack import grpcurl_transport

log = logging.getLogger("fabrica.demo")


async def _upsert_plc(stub: config_grpc.ConfigServiceStub, plc: plc_pb2.Plc) -> plc_pb2.Plc:
    try:
        return (await stub.CreatePlc(config_pb.CreatePlcRequest(plc=plc))).plc
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    # From an earlier run: point it at this run's simulator (its ports change from run to run).
    return (await stub.UpdatePlc(config_pb.UpdatePlcRequest(plc=plc))).plc


async def start_demo(stack: contextlib.AsyncExitStack, hosts: dict[str, ServiceHost],
                     args: argparse.Namespace, data_dir: Path, token: str = "") -> list[str]:
    """Start the demo parts the running services can use; returns lines for the banner. `token` is the
    bearer token the demo set-up calls config and production with (an admin's)."""
    if args.no_demo or "collector" not in hosts:
        return []
    from .collector.demo import demo_plcs
    from .plcsim.cli import Simulator

    sim = await stack.enter_async_context(Simulator())
    lines = [
        f"  plcsim      Modbus TCP 127.0.0.1:{sim.modbus_port}, Modbus RTU over TCP 127.0.0.1:{sim.rtu_port}, "
        f"S7 127.0.0.1:{sim.s7_port}",
    ]
    collector_id = hosts["collector"].settings.collector_id
    caller = hosts["config"].settings.with_overrides(token=token, token_file=None)
    channel = await stack.enter_async_context(peer_channel(hosts["config"].address, caller))
    config = config_grpc.ConfigServiceStub(channel)
    plcs = {p.id: await _upsert_plc(config, p)
            for p in demo_plcs(collector_id, sim.modbus_port, sim.rtu_port, sim.s7_port)}
    lines.append(f"  demo PLCs   {', '.join(plcs)} (collector {collector_id!r})")
    ingest = hosts.get("ingest")
    if ingest is not None:
        lines.append(f"  live data   .venv/bin/grpcurl {grpcurl_transport(ingest.settings)} "
                     f"-H \"authorization: Bearer $TOKEN\" -d '{{\"plc_id\": \"press-1\"}}' {ingest.address} "
                     "fabrica.ingest.v1.IngestService/GetLatestValues")
    if "production" in hosts:
        from fabrica.production.v1 import production_service_pb2_grpc as production_grpc

        from .production.demo import create_demo

        roles = {t.role: t.id for t in plcs["press-1"].tags}
        prod_channel = await stack.enter_async_context(peer_channel(hosts["production"].address, caller))
        order = await create_demo(
            production_grpc.ProductionServiceStub(prod_channel),
            plc_id="press-1",
            production_counter_tag_id=roles[reading_pb2.TAG_ROLE_PRODUCTION_COUNTER],
            scrap_counter_tag_id=roles.get(reading_pb2.TAG_ROLE_SCRAP_COUNTER, 0),
            machine_state_tag_id=roles.get(reading_pb2.TAG_ROLE_MACHINE_STATE, 0),
        )
        lines.append(f"  demo order  {order.number} ({order.planned_quantity} parts), filled from press-1's counter:")
        lines.append(f"              .venv/bin/grpcurl {grpcurl_transport(hosts['production'].settings)} "
                     f"-H \"authorization: Bearer $TOKEN\" -d '{{\"id\": \"{order.id}\"}}' "
                     f"{hosts['production'].address} fabrica.production.v1.ProductionService/GetOrder")
    if "alarm" in hosts:
        from fabrica.alarm.v1 import alarm_service_pb2_grpc as alarm_grpc

        from .alarm.demo import create_demo_rules

        temperature = next(t.id for t in plcs["press-1"].tags if t.name == "press.temperature")
        alarm_channel = await stack.enter_async_context(peer_channel(hosts["alarm"].address, caller))
        rules = await create_demo_rules(alarm_grpc.AlarmServiceStub(alarm_channel), "press-1", temperature)
        lines.append(f"  demo alarms {', '.join(rules)} on press-1's oil temperature:")
        lines.append(f"              .venv/bin/grpcurl {grpcurl_transport(hosts['alarm'].settings)} "
                     f"-H \"authorization: Bearer $TOKEN\" {hosts['alarm'].address} "
                     "fabrica.alarm.v1.AlarmService/ListAlarmRules")
    return lines
