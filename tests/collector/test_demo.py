"""The demo chain of `fabrica run`: the demo PLC definitions created through the config service, polled by
the collector from the simulator, stored by ingest: every demo tag arrives with the simulator's value."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import config_service_pb2 as pb
from fabrica.ingest.v1 import ingest_service_pb2 as ipb

from fabrica_svc.collector.demo import demo_plcs
from fabrica_svc.plcsim import DEMO_TAGS, Simulator
from fabrica_svc.plcsim.plant import tag_value
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
