"""What the engineer sees of a PLC's life: its connection lost and restored, each logged once per transition with
the PLC id, address and reason; an `error_count` that counts since the collector started, whatever the
configuration changes; a rename that does not interrupt polling."""

from __future__ import annotations

import logging

import pytest
from fabrica.common.v1 import reading_pb2
from fabrica.config.v1 import plc_pb2

from fabrica_svc.collector.drivers import BusRegistry
from fabrica_svc.collector.supervisor import PlcSupervisor

from .bad_device import BadDevice, polling
from .support import COMM, GOOD, free_port, mb_tag, modbus_plc, wait_for

T = plc_pb2
DRIVERS = "fabrica_svc.collector.drivers"


def _transitions(caplog: pytest.LogCaptureFixture, plc_id: str) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == DRIVERS and r.getMessage().startswith(f"PLC {plc_id} ")]


async def test_connection_lost_and_restored_are_each_logged_once_with_plc_address_and_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=DRIVERS)
    tag = mb_tag("r0", 0)
    async with BadDevice() as device, polling(modbus_plc("meter", device.port, [tag], interval=0.02,
                                                         timeout=0.1)) as polled:
        where = f"127.0.0.1:{device.port}"
        await wait_for(lambda: polled.of(tag, GOOD), what="a good reading")
        device.mode = "silent"  # answers nothing: every poll times out, and the poller reconnects each time
        errors = polled.poller.status.error_count
        await wait_for(lambda: polled.poller.status.error_count >= errors + 4, what="several failed attempts")
        device.mode = "ok"
        mark = len(polled.readings)
        await wait_for(lambda: any(r.quality == GOOD for r in polled.since(mark)), what="good again")
        assert device.connections >= 4  # the outage spanned several connections: still one "lost", one "restored"
    assert _transitions(caplog, "meter") == [
        (logging.INFO, f"PLC meter connected ({where})"),
        (logging.WARNING, f"PLC meter connection lost ({where}): no answer from {where} within 0.1 s"),
        (logging.INFO, f"PLC meter connection restored ({where})"),
    ]


async def test_a_plc_that_never_answers_is_logged_once_however_often_it_is_retried(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=DRIVERS)
    port = free_port()
    async with polling(modbus_plc("gone", port, [mb_tag("r0", 0)], interval=0.02)) as polled:
        await wait_for(lambda: polled.poller.status.error_count >= 5, what="five failed connects")
    (only,) = _transitions(caplog, "gone")
    assert only[0] == logging.WARNING
    assert only[1].startswith(f"PLC gone cannot connect (127.0.0.1:{port}): cannot connect to 127.0.0.1:{port}")


def _renamed(plc: T.Plc, name: str) -> T.Plc:
    out = T.Plc()
    out.CopyFrom(plc)
    out.display_name = name
    out.etag, out.revision = f"e-{name}", plc.revision + 1  # output-only: change with every update
    return out


async def test_error_count_is_since_the_collector_started_and_a_rename_does_not_restart_the_poller() -> None:
    readings: list[reading_pb2.Reading] = []
    supervisor = PlcSupervisor("cell-1", readings.append, BusRegistry(), backoff_min=0.02, backoff_max=0.05)
    port = free_port()  # nothing listens: every attempt fails and counts
    tag = mb_tag("r0", 0)
    plc = modbus_plc("gone", port, [tag], interval=0.02)
    plc.display_name = "Meter"
    try:
        await supervisor.apply_snapshot([plc])
        status = lambda: {s.plc_id: s for s in supervisor.statuses()}["gone"]  # noqa: E731
        await wait_for(lambda: status().error_count >= 3, what="three failed attempts")

        # A rename: same poller, no restart, the count goes on.
        poller = supervisor.pollers["gone"]
        before = status().error_count
        await supervisor.upsert(_renamed(plc, "Meter 1, hall B"))
        assert supervisor.pollers["gone"] is poller and supervisor.starts == ["gone"]
        assert supervisor.definitions["gone"].display_name == "Meter 1, hall B"
        await wait_for(lambda: status().error_count > before, what="the same poller counting on")

        # A real change (another timeout) restarts the poller; its count starts where the old one stopped.
        changed = _renamed(plc, "Meter 1, hall B")
        changed.modbus_tcp.timeout.FromMilliseconds(300)
        await supervisor.upsert(changed)
        assert supervisor.pollers["gone"] is not poller and supervisor.starts == ["gone", "gone"]
        carried = poller.status.error_count
        assert status().error_count >= carried >= before + 1
        await wait_for(lambda: status().error_count > carried, what="the new poller counting on from there")

        # Disabled, its status keeps the count; enabled again, the count goes on from it.
        disabled = T.Plc()
        disabled.CopyFrom(changed)
        disabled.enabled = False
        await supervisor.upsert(disabled)
        stopped = status().error_count
        assert "gone" not in supervisor.pollers and stopped > carried
        await supervisor.upsert(changed)
        assert status().error_count >= stopped
        await wait_for(lambda: status().error_count > stopped, what="counting on after being enabled again")
        assert all(r.quality == COMM for r in readings if r.tag_id == tag.id)
    finally:
        await supervisor.stop_all()
