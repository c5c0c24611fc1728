"""The libraries' noise does not reach the logs as errors (runtime/logs.py LibraryNoise): the simulator's S7
server logging a client's garbage at ERROR, here; pymodbus's timeouts in tests/collector/test_bad_replies.py."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from fabrica_svc.plcsim import Simulator
from fabrica_svc.runtime.logs import NOISY_LIBRARY_LOGGERS, quiet_libraries
from procs import wait_for


def _send(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)


async def test_the_s7_servers_complaint_about_garbage_is_debug_not_error(caplog: pytest.LogCaptureFixture) -> None:
    quiet_libraries()
    caplog.set_level(logging.DEBUG)  # at DEBUG the demoted records are still there, as DEBUG
    async with Simulator(seed=1) as sim:
        await asyncio.to_thread(_send, sim.s7_port, b"garbage, not a TPKT header")
        complaint = await wait_for(lambda: [r for r in caplog.records if r.name == "snap7.server"
                                            and "Invalid TPKT version" in r.getMessage()],
                                   what="the S7 server's complaint")
    assert all(r.levelno == logging.DEBUG and r.levelname == "DEBUG" for r in complaint)
    loud = [r for r in caplog.records if r.name in NOISY_LIBRARY_LOGGERS and r.levelno > logging.DEBUG]
    assert loud == []


async def test_at_info_the_noise_is_not_logged_at_all(caplog: pytest.LogCaptureFixture) -> None:
    quiet_libraries()
    caplog.set_level(logging.INFO)
    record = logging.getLogger("pymodbus.logging").makeRecord(
        "pymodbus.logging", logging.ERROR, __file__, 1, "No response received after 0 retries", (), None)
    logging.getLogger("pymodbus.logging").handle(record)
    logging.getLogger("fabrica_svc.collector.drivers").warning("PLC x connection lost (h:1): no answer")
    assert [(r.name, r.levelno) for r in caplog.records] == [("fabrica_svc.collector.drivers", logging.WARNING)]
