"""`fabrica grpc-web` on its own, as a deployment without Envoy would run it: upstreams from the environment,
its URL printed, calls forwarded, a clean stop on SIGTERM; a bad setting stops it with one line naming it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from fabrica.config.v1 import config_service_pb2 as config_pb

from in_process import Servers, settings_for

from .grpcweb_client import call

REPO = Path(__file__).resolve().parents[2]


async def test_fabrica_grpc_web_serves_from_its_environment(database_url: str, servers: Servers) -> None:
    config = await servers.start("config", settings_for("config", database_url=database_url))
    # Development mode (plaintext), as the in-process config it calls; under TLS: tests/test_end_to_end.py.
    env = {**os.environ, "FABRICA_INSECURE": "1", "FABRICA_CONFIG_ADDR": config.address, "FABRICA_LOG_FORMAT": "text",
           "FABRICA_WEB_DIST": "-", "FABRICA_SHUTDOWN_GRACE": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabrica_svc.cli", "grpc-web", "--port", "0", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        url = ""
        while not url:
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
            assert line, "fabrica grpc-web ended before printing its URL"
            if line.startswith("gRPC-Web gateway on "):
                url = line.removeprefix("gRPC-Web gateway on ").strip()
        reply = await asyncio.to_thread(call, url, "/fabrica.config.v1.ConfigService/ListDeviceProfiles",
                                        config_pb.ListDeviceProfilesRequest())
        assert reply.status == 0 and reply.messages
        profiles = config_pb.ListDeviceProfilesResponse.FromString(reply.messages[0]).profiles
        assert "eastron-sdm630" in [p.id for p in profiles]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=30)
    assert code == 0


async def test_a_bad_setting_stops_it_with_one_line() -> None:
    env = {**os.environ, "FABRICA_INSECURE": "1", "FABRICA_GRPC_WEB_CORS_ORIGINS": "*"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fabrica_svc.cli", "grpc-web", "--port", "0", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "FABRICA_GRPC_WEB_CORS_ORIGINS" in lines[0], stderr.decode()
