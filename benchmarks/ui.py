"""Web UI: the time from a PLC value change in the simulator to its appearance on the Plant screen (p50, p99),
and the size of the built UI, gzipped.

A real `fabrica run --no-demo` (every service and the gRPC-Web gateway serving web/dist) and, in this process,
the project's PLC simulator on a manual clock, so a value changes only when the benchmark says: each step
makes one part (`Simulator.make_parts`), which moves the press's production counter. The collector polls the
simulated press every 100 ms. Debian's Chromium shows the Plant screen of that PLC; a MutationObserver in the
page notes the wall-clock time each counter value first appears in the tag table. Beside it, measured in the
same run on the same changes, the baseline: the same value's first appearance in ingest's GetLatestValues,
polled over gRPC every 5 ms (collector poll, uplink, commit), so the difference is what the screen adds (the
gateway, ingest's WatchLatestValues stream looking for newer readings every 200 ms, rendering).

Run: ``make bench`` or ``.venv/bin/python -m benchmarks.ui``; FABRICA_BENCH_UI_CHANGES (default 100) changes.
Nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "web" / "dist"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PLC_ID = "bench-press"
TAG = "press.production_count"


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (for fabrica run --base-port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        free = True
        for i in range(count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + i))
                except OSError:
                    free = False
                    break
        if free:
            return base


def ui_size() -> list[tuple[str, int, int]]:
    """(file, bytes, gzipped bytes at level 9) of every file the browser loads from web/dist."""
    out = []
    for f in sorted(DIST.rglob("*")):
        if f.is_file() and f.suffix in (".html", ".js", ".css", ".svg", ".woff2"):
            data = f.read_bytes()
            out.append((str(f.relative_to(DIST)), len(data), len(gzip.compress(data, 9))))
    return out


class SimThread:
    """The simulator on a manual clock, served from its own event loop in a thread."""

    def __init__(self) -> None:
        from fabrica_svc.plcsim.cli import Simulator
        from fabrica_svc.plcsim.plant import ManualClock

        self.loop = asyncio.new_event_loop()
        self.sim = Simulator(clock=ManualClock(), refresh_interval=0.05)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.sim.start(), self.loop).result(30)

    def make_part(self) -> int:
        """One more part; returns the production counter as the simulator now serves it."""
        async def step() -> int:
            return self.sim.make_parts(1).production_count
        return asyncio.run_coroutine_threadsafe(step(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    import grpc
    from fabrica.config.v1 import config_service_pb2 as cpb
    from fabrica.config.v1 import config_service_pb2_grpc as cgrpc
    from fabrica.ingest.v1 import ingest_service_pb2 as ipb
    from fabrica.ingest.v1 import ingest_service_pb2_grpc as igrpc
    from google.protobuf import duration_pb2
    from playwright.sync_api import sync_playwright

    from fabrica_svc.collector.demo import demo_plcs

    changes = int(os.environ.get("FABRICA_BENCH_UI_CHANGES", "100"))
    if not (DIST / "index.html").is_file():
        print("web/dist is not built: run `make bench` (it builds the UI)")
        return 1
    files = ui_size()
    print("Built UI (web/dist), gzip -9:")
    for name, raw, gz in files:
        print(f"  {name:<40} {raw / 1024:8.1f} kB  {gz / 1024:7.1f} kB gzipped")
    print(f"  {'total':<40} {sum(f[1] for f in files) / 1024:8.1f} kB  {sum(f[2] for f in files) / 1024:7.1f} kB gzipped")

    tmp = Path(tempfile.mkdtemp(prefix="fabrica-bench-ui-"))
    os.chmod(tmp, 0o755)  # the embedded Postgres runs as its own user
    base = _free_ports(8)  # config, ingest, production, collector, alarm, the two peer ports, the web origin
    web = base + 7
    env = {**os.environ, "FABRICA_LOG_FORMAT": "text", "FABRICA_METRICS_PORT": "-1", "FABRICA_WEB_DIST": str(DIST)}
    log = tmp / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fabrica_svc.cli", "run", "--no-demo", "--data-dir",
                                 str(tmp / "data"), "--base-port", str(base), "--web-port", str(web)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    sim = None
    try:
        for _ in range(1200):
            if "Ctrl-C stops everything" in log.read_text(errors="replace") or proc.poll() is not None:
                break
            time.sleep(0.1)
        banner = log.read_text(errors="replace")
        if "Ctrl-C stops everything" not in banner:
            print(banner[-3000:])
            return 1
        # The stack's TLS (its CA) and the banner's admin token: the browser signs in with it too.
        admin = re.search(r"^  export TOKEN=(\S+)$", banner, re.MULTILINE).group(1)  # type: ignore[union-attr]
        md = (("authorization", f"Bearer {admin}"),)
        creds = grpc.ssl_channel_credentials((tmp / "data" / "tls" / "ca.pem").read_bytes())
        sim = SimThread()
        press = demo_plcs("demo", sim.sim.modbus_port, sim.sim.rtu_port, sim.sim.s7_port)[0]
        press.id, press.display_name = PLC_ID, "Benchmark press"
        press.poll_groups[0].poll_interval.CopyFrom(duration_pb2.Duration(nanos=100_000_000))
        with grpc.secure_channel(f"127.0.0.1:{base}", creds) as cch, \
                grpc.secure_channel(f"127.0.0.1:{base + 1}", creds) as ich:
            plc = cgrpc.ConfigServiceStub(cch).CreatePlc(cpb.CreatePlcRequest(plc=press), timeout=10, metadata=md).plc
            tag_id = next(t.id for t in plc.tags if t.name == TAG)
            ingest = igrpc.IngestServiceStub(ich)

            def ingest_value() -> int | None:
                r = ingest.GetLatestValues(ipb.GetLatestValuesRequest(tag_ids=[tag_id]), timeout=5,
                                            metadata=md).readings
                return r[0].value.uint_value if r and r[0].HasField("value") else None

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(f"http://127.0.0.1:{web}/#/login")
                page.locator("textarea[name=token]").fill(admin)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_selector(".who-name")
                page.goto(f"http://127.0.0.1:{web}/#/plant?plc={PLC_ID}")
                cell = f'[data-testid=tag-table] tr[data-tag="{TAG}"] [data-testid=tag-value]'
                page.wait_for_function(f"(document.querySelector('{cell}')?.textContent ?? '—') !== '—'",
                                       timeout=60_000)
                page.evaluate("""(sel) => {
                    window.__seen = {};
                    const note = () => {
                        const el = document.querySelector(sel);
                        const v = el ? el.textContent.replace(/[^0-9]/g, '') : '';
                        if (v && !(v in window.__seen)) window.__seen[v] = performance.timeOrigin + performance.now();
                    };
                    new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true});
                    note();
                }""", cell)
                to_ingest, to_screen = [], []
                rnd = random.Random(8)
                for _ in range(changes):
                    time.sleep(rnd.uniform(0.05, 0.6))  # de-phase from the collector's and the UI's timers
                    count = sim.make_part()
                    t0 = time.time() * 1000
                    while ingest_value() != count:
                        time.sleep(0.005)
                    to_ingest.append(time.time() * 1000 - t0)
                    page.wait_for_function("(v) => v in window.__seen", arg=str(count), timeout=30_000)
                    to_screen.append(page.evaluate("(v) => window.__seen[v]", str(count)) - t0)
                browser.close()
        print(f"\nPLC value change in the simulator → seen ({changes} changes, collector polling every 100 ms):")
        print(f"  {'path':<52} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for name, xs in (("baseline: ingest GetLatestValues (gRPC, polled 5 ms)", to_ingest),
                         ("Plant screen in Chromium (WatchLatestValues, gateway)", to_screen)):
            print(f"  {name:<52} {_pct(xs, 50):8.0f} {_pct(xs, 99):8.0f} {statistics.fmean(xs):8.0f}")
        return 0
    finally:
        if sim is not None:
            sim.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.path[:0] = [str(REPO / "gen"), str(REPO / "services")]
    raise SystemExit(main())
