"""Where a PLC definition may make the collector connect (collector/reach.py): a real collector in process,
asked by real gRPC calls (ProbePlc, PreviewDecode, PreviewPlc, ProbeMirror) and given a stored
configuration, with a loopback listener that counts every connection it is offered: a refused definition is
INVALID_ARGUMENT naming the field (or, configured, a CONFIG_ERROR), and the listener sees nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from fabrica.collector.v1 import collector_service_pb2 as pb
from fabrica.collector.v1 import collector_service_pb2_grpc as pb_grpc
from fabrica.config.v1 import plc_pb2
from google.protobuf import duration_pb2

from fabrica_svc.collector.reach import ReachPolicy, load_reach_policy
from fabrica_svc.runtime.settings import SettingsError
from grpc_helpers import field_violations
from in_process import Servers

from .support import app_of, collector_settings, mb_tag, modbus_plc, s7_plc, serial_plc, start_collector, \
    store_config, wait_for

T = plc_pb2
SERIAL = "plc.modbus_rtu.serial_port"


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections made to it (and closes them)."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    async with Listener() as got:
        yield got


async def collector(servers: Servers, tmp_path: Path, **env: str) -> pb_grpc.CollectorServiceStub:
    settings = collector_settings(tmp_path, **env)
    server = await servers.start("collector", settings.base, config=settings)
    return server.stub


async def refused(call) -> dict[str, str]:  # noqa: ANN001
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    return field_violations(err.value)


def probe(plc: plc_pb2.Plc) -> pb.ProbePlcRequest:
    return pb.ProbePlcRequest(plc=plc)


async def test_a_socket_url_is_refused_by_default_and_nothing_is_connected(servers: Servers, tmp_path: Path,
                                                                           listener: Listener) -> None:
    stub = await collector(servers, tmp_path)
    url = f"socket://127.0.0.1:{listener.port}"
    tag = mb_tag("v", 0)
    for call in (stub.ProbePlc(probe(serial_plc("p", url, [tag]))),
                 stub.PreviewDecode(pb.PreviewDecodeRequest(plc=serial_plc("p", url, []), tag=tag)),
                 stub.PreviewPlc(pb.PreviewPlcRequest(plc=serial_plc("p", url, [tag]))),
                 stub.ProbePlc(probe(serial_plc("p", f"RFC2217://127.0.0.1:{listener.port}", [tag])))):
        violations = await refused(call)
        assert list(violations) == [SERIAL]
        assert "is not allowed on this collector (FABRICA_COLLECTOR_SERIAL_URL_SCHEMES: none)" in violations[SERIAL]
    await asyncio.sleep(0.2)  # a connection that was started would have landed by now
    assert listener.connections == 0


async def test_a_local_file_or_a_pseudo_device_is_no_serial_port(servers: Servers, tmp_path: Path) -> None:
    stub = await collector(servers, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not touch")
    before = secret.stat()
    for port in (str(secret), f"/dev/../{secret}", "/dev/stdin", "/dev/null", "/dev/fd/0", "relative/ttyUSB0"):
        violations = await refused(stub.ProbePlc(probe(serial_plc("p", port, [mb_tag("v", 0)]))))
        assert violations == {SERIAL: f"must be a serial device under /dev/ (e.g. /dev/ttyUSB0); {port!r} is not one"}
    after = secret.stat()
    assert secret.read_text() == "do not touch" and after.st_mtime_ns == before.st_mtime_ns
    # A device that is not plugged in is a serial port all the same: it is tried, and unreachable.
    reply = await stub.ProbePlc(probe(serial_plc("p", "/dev/ttyFABRICA-TEST-ABSENT", [mb_tag("v", 0)])))
    assert not reply.reachable and reply.error


async def test_an_allowed_scheme_and_network_do_connect(servers: Servers, tmp_path: Path,
                                                        listener: Listener) -> None:
    stub = await collector(servers, tmp_path, FABRICA_COLLECTOR_SERIAL_URL_SCHEMES="socket",
                           FABRICA_COLLECTOR_ALLOWED_NETWORKS="127.0.0.0/8")
    reply = await stub.ProbePlc(probe(serial_plc("p", f"socket://127.0.0.1:{listener.port}", [mb_tag("v", 0)])))
    assert reply.error  # the listener is no Modbus device
    await wait_for(lambda: listener.connections >= 1, what="the probe's connection")


async def test_hosts_outside_the_allowed_networks_are_refused_unconnected(servers: Servers, tmp_path: Path,
                                                                          listener: Listener) -> None:
    stub = await collector(servers, tmp_path, FABRICA_COLLECTOR_ALLOWED_NETWORKS="10.20.0.0/16, 192.168.10.0/24",
                           FABRICA_COLLECTOR_SERIAL_URL_SCHEMES="socket")
    tcp = modbus_plc("p", listener.port, [mb_tag("v", 0)])
    violations = await refused(stub.ProbePlc(probe(tcp)))
    assert violations == {"plc.modbus_tcp.host": "127.0.0.1 is outside the collector's allowed networks "
                                                 "(10.20.0.0/16, 192.168.10.0/24; FABRICA_COLLECTOR_ALLOWED_NETWORKS)"}
    tcp.modbus_tcp.host = "localhost"
    assert "host names are not accepted" in (await refused(stub.ProbePlc(probe(tcp))))["plc.modbus_tcp.host"]
    url = serial_plc("p", f"socket://127.0.0.1:{listener.port}", [mb_tag("v", 0)])
    assert "outside the collector's allowed networks" in (await refused(stub.ProbePlc(probe(url))))[SERIAL]
    source, target = s7_plc("src", listener.port, []), s7_plc("dst", listener.port, [])
    target.s7.host, target.writable = "10.20.0.9", True
    mirror = plc_pb2.Mirror(name="m", target_plc_id="dst", size=4, interval=duration_pb2.Duration(seconds=1),
                            source=plc_pb2.S7Range(area=plc_pb2.S7_AREA_DATA_BLOCK, db_number=1),
                            target=plc_pb2.S7Range(area=plc_pb2.S7_AREA_DATA_BLOCK, db_number=2))
    violations = await refused(stub.ProbeMirror(pb.ProbeMirrorRequest(source_plc=source, target_plc=target,
                                                                      mirror=mirror)))
    assert list(violations) == ["source_plc.s7.host"]
    await asyncio.sleep(0.2)
    assert listener.connections == 0


async def test_a_configured_plc_that_points_where_it_may_not_is_a_config_error_unconnected(
        servers: Servers, tmp_path: Path, listener: Listener) -> None:
    settings = collector_settings(tmp_path)
    store_config(settings, [serial_plc("sneaky", f"socket://127.0.0.1:{listener.port}", [mb_tag("v", 0)],
                                       interval=0.05)])
    host = await start_collector(settings)
    try:
        poller = await wait_for(lambda: app_of(host).supervisor.pollers.get("sneaky"), what="the poller")
        errors = await wait_for(lambda: poller.status.config_errors, what="its config error")
        assert errors[0].startswith("plc.modbus_rtu.serial_port: the pyserial URL scheme socket:// is not allowed")
        await asyncio.sleep(0.2)
        assert listener.connections == 0
    finally:
        await host.stop(grace=0)


def test_the_settings() -> None:
    assert load_reach_policy({}) == ReachPolicy()
    policy = load_reach_policy({"FABRICA_COLLECTOR_SERIAL_URL_SCHEMES": "socket://, RFC2217",
                                "FABRICA_COLLECTOR_ALLOWED_NETWORKS": "10.0.0.0/8,fd00::/8"})
    assert policy.serial_url_schemes == {"socket", "rfc2217"}
    assert [str(n) for n in policy.networks] == ["10.0.0.0/8", "fd00::/8"]
    with pytest.raises(SettingsError, match="^FABRICA_COLLECTOR_ALLOWED_NETWORKS='10.0.0.0/33': '10.0.0.0/33' is not"):
        load_reach_policy({"FABRICA_COLLECTOR_ALLOWED_NETWORKS": "10.0.0.0/33"})
    with pytest.raises(SettingsError, match="^FABRICA_COLLECTOR_SERIAL_URL_SCHEMES='so cket'"):
        load_reach_policy({"FABRICA_COLLECTOR_SERIAL_URL_SCHEMES": "so cket"})
