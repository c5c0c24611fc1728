"""The demo chain of `fabrica run`: the demo PLC definitions created through the config service, polled by
the collector from the simulator, stored by ingest: every demo tag arrives with the simulator's value. And
how `fabrica run` wires its services: through their settings, never the environment."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2 as ipb

from fabrica_svc.collector.demo import demo_plcs
from fabrica_svc.collector.settings import load_collector_settings
from fabrica_svc.plcsim import DEMO_TAGS, Simulator
from fabrica_svc.plcsim.plant import tag_value
from fabrica_svc.runtime.settings import SettingsError
from fabrica_svc.stack import ORDER, stack_settings
from in_process import Servers, settings_for

from .support import collector_settings, value_of, wait_for

PROTOCOL_OF_PLC = {"press-1": "modbus_tcp", "meter-1": "modbus_rtu", "press-2": "s7"}


class FakeClock:
    def __init__(self) -> None:
        self.t = 10.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    clock = FakeClock()
    async with Simulator(seed=1, clock=clock) as s:
        clock.t += 75.0  # values that are not zero
        s.refresh()
        yield s


def as_float32(x: float) -> float:
    return struct.unpack(">f", struct.pack(">f", x))[0]


async def test_every_demo_tag_reaches_ingest_with_the_simulators_value(database_url: str, sim: Simulator,
                                                                        servers: Servers, tmp_path: Path) -> None:
    config = await servers.start("config", settings_for("config", database_url=database_url))
    ingest = await servers.start("ingest", settings_for("ingest", database_url=database_url))
    settings = collector_settings(tmp_path, "demo", FABRICA_CONFIG_ADDR=config.address,
                                  FABRICA_INGEST_ADDR=ingest.address)
    created = [(await config.stub.CreatePlc(pb.CreatePlcRequest(plc=plc))).plc
               for plc in demo_plcs("demo", sim.modbus_port, sim.rtu_port, sim.s7_port)]
    await servers.start("collector", settings.base, config=settings)
    tags = {t.id: (p.id, t) for p in created for t in p.tags}

    async def latest() -> list[reading_pb2.Reading] | None:
        got = (await ingest.stub.GetLatestValues(ipb.GetLatestValuesRequest(tag_ids=sorted(tags)))).readings
        return list(got) if len(got) == len(tags) else None

    readings = await wait_for(latest, timeout=20, what="a reading of every demo tag in ingest")
    snap = sim.plant.snapshot
    rows = {(d.protocol, d.name): d for d in DEMO_TAGS}
    assert len(readings) == len(DEMO_TAGS)
    for r in readings:
        plc_id, tag = tags[r.tag_id]
        row = rows[(PROTOCOL_OF_PLC[plc_id], tag.name)]
        assert r.quality == reading_pb2.QUALITY_GOOD, (plc_id, tag.name, r.error)
        assert r.plc_id == plc_id and r.role == tag.role
        expected = tag_value(row, snap)
        if row.dtype == "float32":
            assert value_of(r) == pytest.approx(as_float32(expected), rel=1e-6), (plc_id, tag.name)
        else:
            assert value_of(r) == expected, (plc_id, tag.name)


# ---------------------------------------------------------------------------- `fabrica run` wires by settings


def test_fabrica_run_wires_its_stack_with_settings_and_leaves_the_environment_alone(tmp_path: Path) -> None:
    environ = dict(os.environ)
    settings = stack_settings(ORDER, 6100, tmp_path, {"FABRICA_LOG_LEVEL": "warning"})
    assert dict(os.environ) == environ
    assert {name: s.port for name, s in settings.items()} == {
        "config": 6100, "ingest": 6101, "production": 6102, "collector": 6103, "alarm": 6104}
    for s in settings.values():
        # Every service finds its peers (config's and ingest's mutual-TLS peer ports, after the five gRPC
        # ports) and the demo collector in its settings; logs are text unless set.
        assert (s.config_addr, s.ingest_addr, s.collector_id) == ("127.0.0.1:6105", "127.0.0.1:6106", "demo")
        assert (s.data_dir, s.log_level, s.log_format) == (tmp_path, "WARNING", "text")
    # TLS with the stack's own CA: a certificate per service, the collector's naming its id.
    assert {name: s.peer_port for name, s in settings.items()} == {
        "config": 6105, "ingest": 6106, "production": -1, "collector": -1, "alarm": -1}
    assert all(s.tls is not None and s.tls.ca_path == tmp_path / "tls" / "ca.pem" for s in settings.values())
    assert settings["collector"].tls.cert_path == tmp_path / "tls" / "collector-demo.pem"
    collector = load_collector_settings(settings["collector"], {})
    assert (collector.collector_id, collector.config_addr, collector.ingest_addr) == (
        "demo", "127.0.0.1:6105", "127.0.0.1:6106")
    assert collector.state_dir == tmp_path / "collector" / "demo"


def test_fabrica_run_in_development_mode_is_plaintext_on_the_gRPC_ports(tmp_path: Path) -> None:
    settings = stack_settings(ORDER, 6100, tmp_path, {"FABRICA_INSECURE": "1"})
    assert all(s.tls is None and s.insecure and s.peer_port == -1 for s in settings.values())
    assert (settings["collector"].config_addr, settings["collector"].ingest_addr) == ("127.0.0.1:6100",
                                                                                      "127.0.0.1:6101")
    assert not (tmp_path / "tls").exists()


def test_fabrica_run_reuses_its_ca_and_certificates(tmp_path: Path) -> None:
    first = stack_settings(ORDER, 6100, tmp_path, {})
    again = stack_settings(ORDER, 6100, tmp_path, {})
    assert all(first[n].tls == again[n].tls for n in ORDER)
    assert (tmp_path / "tls" / "ca-key.pem").stat().st_mode & 0o077 == 0  # the keys are the owner's only
    # A certificate that is no longer one (or near its end) is issued again by the same CA.
    (tmp_path / "tls" / "ingest.pem").write_text("garbage")
    renewed = stack_settings(ORDER, 6100, tmp_path, {})
    assert renewed["ingest"].tls.cert_pem != first["ingest"].tls.cert_pem
    assert renewed["ingest"].tls.ca_pem == first["ingest"].tls.ca_pem
    assert renewed["config"].tls == first["config"].tls


def test_fabrica_run_keeps_the_peers_and_the_collector_id_the_environment_names(tmp_path: Path) -> None:
    env = {"FABRICA_COLLECTOR_ID": "cell-7", "FABRICA_INGEST_ADDR": "10.0.0.5:7000", "FABRICA_LOG_FORMAT": "json"}
    settings = stack_settings(["production", "collector"], 6100, tmp_path, env)
    assert settings["production"].ingest_addr == "10.0.0.5:7000"
    collector = load_collector_settings(settings["collector"], env)
    assert (collector.collector_id, collector.config_addr, collector.ingest_addr) == (
        "cell-7", "127.0.0.1:6105", "10.0.0.5:7000")
    assert settings["collector"].tls.cert_path == tmp_path / "tls" / "collector-cell-7.pem"
    assert settings["collector"].log_format == "json"
    with pytest.raises(SettingsError, match="FABRICA_LOG_LEVEL"):
        stack_settings(ORDER, 6100, tmp_path, {"FABRICA_LOG_LEVEL": "LOUD"})
