"""The collector's gc.freeze acts on the whole process: only a collector that has its process to itself
(``fabrica serve collector``) freezes; one that ``fabrica run`` or a test hosts next to other services
never does."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from pathlib import Path

from fabrica_svc.collector.app import create_app
from fabrica_svc.collector.drivers import BusRegistry
from fabrica_svc.collector.settings import CollectorSettings
from fabrica_svc.collector.supervisor import PlcSupervisor
from fabrica_svc.runtime.server import Resources
from fabrica_svc.runtime.settings import load_settings
from collector.support import start_config
from procs import free_port, wait_for

#: A child running the real command line, `fabrica serve collector`, that reports (and then ends itself
#: with SIGTERM) once the process is frozen, or after 60 s that it never was.
SERVE_AND_REPORT = """
import gc, os, signal, sys, threading, time
from fabrica_svc.cli import main

def report():
    deadline = time.monotonic() + 60
    while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    print("frozen" if gc.get_freeze_count() else "never frozen", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=report, daemon=True).start()
sys.exit(main(["serve", "collector", "--port", "0"]))
"""


def _ignore(*_readings: object) -> None:
    pass


async def test_only_a_supervisor_told_it_is_alone_freezes_the_process() -> None:
    assert gc.get_freeze_count() == 0
    shared = PlcSupervisor("shared", _ignore, BusRegistry())  # as `fabrica run` and tests build it
    alone = PlcSupervisor("alone", _ignore, BusRegistry(), freeze_gc=True)
    try:
        await shared.apply_snapshot([])
        await asyncio.sleep(0)
        await alone.apply_snapshot([])  # its settle pass comes after the one `shared` would have had
        await wait_for(lambda: alone.gc_freezes == 1, what="the collect-and-freeze pass")
        assert gc.get_freeze_count() > 0
        assert shared.gc_freezes == 0
    finally:
        await shared.stop_all()
        assert gc.get_freeze_count() > 0, "a supervisor that never froze does not unfreeze what another froze"
        await alone.stop_all()
    assert gc.get_freeze_count() == 0


async def test_the_collector_app_freezes_only_with_settings_that_say_it_is_alone(tmp_path: Path) -> None:
    shared = load_settings("collector", {"FABRICA_INSECURE": "1"})  # what `fabrica run` and the tests start services with
    assert shared.sole_service is False
    for settings, expected in ((shared, False), (shared.with_overrides(sole_service=True), True)):
        settings = settings.with_overrides(data_dir=tmp_path / str(expected), port=0, metrics_port=-1)
        unreachable = f"127.0.0.1:{free_port()}"
        app = create_app(settings, CollectorSettings(base=settings, collector_id="solo", config_addr=unreachable,
                                                     ingest_addr=unreachable))
        await app.start(Resources(settings=settings))
        try:
            assert app.supervisor.freeze_gc is expected
        finally:
            await app.stop()


async def test_fabrica_serve_collector_freezes_its_process(database_url: str, tmp_path: Path) -> None:
    """The real command line in a child process, given an (empty) configuration by a real config service."""
    config = await start_config(database_url)
    try:
        env = {**os.environ, "FABRICA_COLLECTOR_ID": "solo", "FABRICA_CONFIG_ADDR": config.address,
               "FABRICA_INGEST_ADDR": f"127.0.0.1:{free_port()}", "FABRICA_DATA_DIR": str(tmp_path),
               "FABRICA_METRICS_PORT": "-1", "FABRICA_LOG_FORMAT": "text"}
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", SERVE_AND_REPORT, env=env,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(90):
                out, err = await child.communicate()
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert out.decode().split() == ["frozen"], err.decode()[-2000:]
        assert child.returncode == 0, err.decode()[-2000:]  # and it shut down cleanly on the SIGTERM
    finally:
        await config.stop(grace=0)
