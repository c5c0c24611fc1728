"""CollectorService over gRPC: a real collector (in process on 127.0.0.1:0) and the simulator."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from fabrica.collector.v1 import collector_service_pb2 as pb
from fabrica.collector.v1 import collector_service_pb2_grpc as pb_grpc
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2

from fabrica_svc.plcsim import Simulator
from grpc_helpers import field_violations
from in_process import Server, Servers

from .support import (COIL, IR, collector_settings, free_port, gateway_plc, mb_tag, modbus_plc, s7_plc, s7_tag,
                      start_collector, store_config, wait_for)

T = plc_pb2
Code = grpc.StatusCode


class FakeClock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    clock = FakeClock()
    async with Simulator(seed=9, clock=clock) as s:
        clock.t += 20.0
        s.refresh()
        yield s


@pytest.fixture
async def server(servers: Servers, sim: Simulator, tmp_path: Path) -> Server:
    """The collector under test (`stub` talks to it), with a stored configuration of a live and a dead PLC."""
    settings = collector_settings(tmp_path)
    store_config(settings, [
        modbus_plc("press", sim.modbus_port, [mb_tag("count", 0, T.DATA_TYPE_UINT32), mb_tag("state", 3)],
                   interval=0.05),
        modbus_plc("ghost", free_port(), [mb_tag("count", 0, T.DATA_TYPE_UINT32)], interval=0.05),
    ], revision=7)
    return await servers.start("collector", settings.base, config=settings)


async def test_get_status_shows_each_plc_and_the_backlog(stub: pb_grpc.CollectorServiceStub) -> None:
    async def settled() -> pb.GetStatusResponse | None:
        status = await stub.GetStatus(pb.GetStatusRequest())
        plcs = {p.plc_id: p for p in status.plcs}
        ok = plcs["press"].connected and plcs["press"].HasField("last_good_read_time") \
            and plcs["ghost"].error_count >= 2 and status.backlog_readings > 0
        return status if ok else None

    status = await wait_for(settled, what="both PLCs polled")
    assert status.collector_id == "cell-1" and status.applied_revision == 7
    press, ghost = status.plcs  # by id: ghost, press
    press, ghost = (press, ghost) if press.plc_id == "press" else (ghost, press)
    assert press.tag_count == 2 and press.error_count == 0 and press.last_error == ""
    assert press.read_latency.ToNanoseconds() > 0
    assert not ghost.connected and "cannot connect" in ghost.last_error and not ghost.HasField("last_good_read_time")
    # No ingest: everything stays on disk.
    assert not status.uplink_connected
    assert status.backlog_bytes > 0 and status.HasField("oldest_backlog_time") and status.dropped_readings == 0

    # The same figures are metrics (OpenTelemetry, exported for Prometheus).
    exported = {}
    for family in text_string_to_metric_families(prometheus_client.generate_latest().decode()):
        for sample in family.samples:
            if sample.name.startswith("fabrica_collector_") and sample.labels.get("collector_id") == "cell-1":
                exported[sample.name] = sample.value
    assert exported["fabrica_collector_backlog_readings"] > 0
    assert exported["fabrica_collector_backlog_bytes"] > 0
    assert exported["fabrica_collector_backlog_oldest_age_seconds"] > 0
    assert exported["fabrica_collector_dropped_readings_total"] == 0


async def test_probe_plc_connects_and_measures_or_says_why_not(stub: pb_grpc.CollectorServiceStub,
                                                             sim: Simulator) -> None:
    ok = await stub.ProbePlc(pb.ProbePlcRequest(plc=modbus_plc("p", sim.modbus_port, [])))
    assert ok.reachable and ok.error == "" and ok.connect_latency.ToNanoseconds() > 0
    assert ok.read_latency.ToNanoseconds() > 0

    gateway = await stub.ProbePlc(pb.ProbePlcRequest(
        plc=gateway_plc("m", sim.rtu_port, [mb_tag("v", 0, T.DATA_TYPE_FLOAT32, table=IR)])))
    assert gateway.reachable and gateway.error == ""

    s7 = await stub.ProbePlc(pb.ProbePlcRequest(plc=s7_plc("s", sim.s7_port, [])))
    assert s7.reachable and "CPU" in s7.device_info and "order code" in s7.device_info

    # The press has no holding register 0 when it answers everything with an exception: reachable, but says so.
    sim.modbus.set_exception(2)
    refused_read = await stub.ProbePlc(pb.ProbePlcRequest(plc=modbus_plc("p", sim.modbus_port, [])))
    assert refused_read.reachable and "exception 2" in refused_read.error
    sim.modbus.set_exception(None)

    dead = await stub.ProbePlc(pb.ProbePlcRequest(plc=modbus_plc("p", free_port(), [])))
    assert not dead.reachable and "cannot connect" in dead.error

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ProbePlc(pb.ProbePlcRequest())
    assert err.value.code() == Code.INVALID_ARGUMENT and "plc" in field_violations(err.value)


async def test_preview_decode_shows_raw_data_and_the_decoded_value(stub: pb_grpc.CollectorServiceStub,
                                                                  sim: Simulator) -> None:
    snap = sim.plant.snapshot
    press = modbus_plc("p", sim.modbus_port, [])
    pressure = await stub.PreviewDecode(pb.PreviewDecodeRequest(
        plc=press, tag=mb_tag("pressure", 6, T.DATA_TYPE_FLOAT32, word_order=T.WORD_ORDER_LITTLE_ENDIAN, tag_id=0)))
    assert pressure.quality == reading_pb2.QUALITY_GOOD and pressure.error == ""
    assert len(pressure.registers) == 2
    low, high = pressure.registers
    assert struct.unpack(">f", struct.pack(">HH", high, low))[0] == pytest.approx(pressure.value.double_value)
    assert pressure.value.double_value == pytest.approx(snap.pressure, rel=1e-6)

    scaled = await stub.PreviewDecode(pb.PreviewDecodeRequest(
        plc=press, tag=mb_tag("count", 0, T.DATA_TYPE_UINT32, scale=0.5, offset=1.0, tag_id=0)))
    assert list(scaled.registers) == [snap.production_count >> 16, snap.production_count & 0xFFFF]
    assert scaled.value.double_value == snap.production_count * 0.5 + 1.0

    running = await stub.PreviewDecode(pb.PreviewDecodeRequest(
        plc=press, tag=mb_tag("running", 0, T.DATA_TYPE_BOOL, table=COIL, tag_id=0)))
    assert list(running.bits) == [snap.running] and running.value.bool_value is snap.running

    current = await stub.PreviewDecode(pb.PreviewDecodeRequest(
        plc=s7_plc("s", sim.s7_port, []), tag=s7_tag("current", 2, T.DATA_TYPE_FLOAT32, tag_id=0)))
    assert len(current.raw_bytes) == 4
    assert struct.unpack(">f", current.raw_bytes)[0] == pytest.approx(current.value.double_value)
    assert current.value.double_value == pytest.approx(snap.motor_current, rel=1e-6)

    sim.modbus.set_exception(2)
    refused = await stub.PreviewDecode(pb.PreviewDecodeRequest(plc=press, tag=mb_tag("x", 3, tag_id=0)))
    # Exception 2: the device has no such address, a configuration error (the poll says the same).
    assert refused.quality == reading_pb2.QUALITY_CONFIG_ERROR
    assert refused.error == "device has no holding register 3 (exception 2, illegal data address)"
    assert not refused.HasField("value")
    sim.modbus.set_exception(4)
    failing = await stub.PreviewDecode(pb.PreviewDecodeRequest(plc=press, tag=mb_tag("x", 3, tag_id=0)))
    assert failing.quality == reading_pb2.QUALITY_DECODE_FAILURE and "server device failure" in failing.error
    sim.modbus.set_exception(None)

    dead = await stub.PreviewDecode(pb.PreviewDecodeRequest(plc=modbus_plc("p", free_port(), []),
                                                            tag=mb_tag("x", 3, tag_id=0)))
    assert dead.quality == reading_pb2.QUALITY_COMMUNICATION_FAILURE and dead.error


@pytest.mark.parametrize(("tag", "field"), [
    (s7_tag("wrong", 0, T.DATA_TYPE_INT16, tag_id=0), "tag.s7"),
    (mb_tag("no-bit", 3, T.DATA_TYPE_BOOL, tag_id=0), "tag.bit"),
    (mb_tag("float-in-coils", 3, T.DATA_TYPE_FLOAT32, table=COIL, tag_id=0), "tag.data_type"),
    (mb_tag("Bad name!", 3, tag_id=0), "tag.name"),  # a rule of the proto itself (protovalidate)
])
async def test_preview_decode_of_a_tag_that_does_not_fit_is_invalid_argument(
        stub: pb_grpc.CollectorServiceStub, sim: Simulator, tag: T.Tag, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PreviewDecode(pb.PreviewDecodeRequest(plc=modbus_plc("p", sim.modbus_port, []), tag=tag))
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert field in field_violations(err.value), field_violations(err.value)


async def test_a_second_collector_process_on_the_same_state_folder_is_refused(stub: pb_grpc.CollectorServiceStub,
                                                                            tmp_path: Path) -> None:
    with pytest.raises(OSError, match="in use by another collector"):
        await start_collector(collector_settings(tmp_path))
    # The first one is unharmed.
    status = await stub.GetStatus(pb.GetStatusRequest())
    assert status.collector_id == "cell-1"


async def test_a_caller_of_another_tenant_finds_no_collector(stub: pb_grpc.CollectorServiceStub, sim: Simulator,
                                                             tmp_path: Path) -> None:
    """The collector is of tenant default (its identity names none): a caller working in another tenant is
    answered NOT_FOUND on every admin RPC, as if it did not exist; its own tenant's and an installation-wide
    caller's pass."""
    from fabrica_svc.collector.servicer import own_tenant

    from .test_mirror import lab, line, mirror
    from fabrica_svc.runtime import auth
    from fabrica_svc.runtime.settings import Settings

    other = (("x-fabrica-tenant", "globex"),)
    plc = modbus_plc("p", sim.modbus_port, [mb_tag("count", 0, T.DATA_TYPE_UINT32)])
    calls = {
        "GetStatus": lambda md: stub.GetStatus(pb.GetStatusRequest(), metadata=md),
        "ProbePlc": lambda md: stub.ProbePlc(pb.ProbePlcRequest(plc=plc), metadata=md),
        "PreviewDecode": lambda md: stub.PreviewDecode(pb.PreviewDecodeRequest(plc=plc, tag=plc.tags[0]), metadata=md),
        "PreviewPlc": lambda md: stub.PreviewPlc(pb.PreviewPlcRequest(plc=plc), metadata=md),
        # A well-formed dry run (to ports nobody listens on: the tenant is refused before anything is read).
        "ProbeMirror": lambda md: stub.ProbeMirror(pb.ProbeMirrorRequest(
            source_plc=line(free_port()), target_plc=lab(free_port()), mirror=mirror()), metadata=md),
    }
    assert set(calls) == set(pb.DESCRIPTOR.services_by_name["CollectorService"].methods_by_name)
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(other)
        assert err.value.code() == Code.NOT_FOUND, name
        assert "globex" in (err.value.details() or ""), name
    status = await calls["GetStatus"]((("x-fabrica-tenant", "default"),))
    assert status.collector_id == "cell-1"
    assert (await calls["GetStatus"]((("x-fabrica-tenant", "*"),))).collector_id == "cell-1"

    # Where the collector's tenant comes from: its certificate, else its token's claim, else FABRICA_TENANT,
    # else default.
    key = auth.ensure_local_key(tmp_path / "auth")
    token = auth.mint_token(key, subject="c", roles=["collector"], collector_id="cell-1", ttl_seconds=60,
                            tenant="acme")
    assert own_tenant(Settings(service="collector", token=token)) == "acme"
    assert own_tenant(Settings(service="collector", tenant="globex")) == "globex"
    assert own_tenant(Settings(service="collector")) == "default"
