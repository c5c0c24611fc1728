"""The browser tests' stack: a real `fabrica run` (embedded Postgres, every service, the PLC simulator with the
demo plant and its running order, the gRPC-Web gateway serving the built UI from web/dist) on free ports, and
Debian's Chromium driven by Playwright. One stack and one browser for the module's tests; each test gets a
fresh page. Screenshots go to build/screenshots/ (git-ignored), as test artifacts."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabrica_svc.stack import PORTS_USED
from procs import free_base_port, free_port

REPO = Path(__file__).resolve().parents[3]
DIST = REPO / "web" / "dist"
SCREENSHOTS = REPO / "build" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
#: How Chromium is started: headless, no sandbox (root in a container), and nothing that calls out.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Stack:
    url: str
    config: str
    ingest: str
    production: str
    collector: str
    s7_port: int
    modbus_port: int
    log: Path
    #: The data folder of the stack: its CA (tls/ca.pem) and signing key (auth/).
    data_dir: Path
    #: The admin token the banner prints.
    admin_token: str
    #: The alarm service's address.
    alarm: str = ""

    @property
    def ca(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def token(self, role: str, user: str, tenant: str = "") -> str:
        """A token minted by `fabrica token` from the stack's data folder (the token alone on its last line), of
        `tenant` (`*`: installation-wide) when given, else of the tenant `default`."""
        out = subprocess.run([sys.executable, "-m", "fabrica_svc.cli", "token", "--role", role, "--user", user,
                              "--data-dir", str(self.data_dir), *(["--tenant", tenant] if tenant else [])],
                             capture_output=True, text=True, check=True, timeout=60)
        return out.stdout.strip().splitlines()[-1]

    def channel(self, address: str):  # noqa: ANN201 - a grpc.Channel
        """A channel to one of the stack's services over TLS, trusting the stack's CA."""
        import grpc

        return grpc.secure_channel(address, grpc.ssl_channel_credentials(self.ca.read_bytes()))

    def metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token or self.admin_token}"),)


def _start_stack(tmp: Path) -> tuple[subprocess.Popen, Stack]:
    if not (DIST / "index.html").is_file():
        raise AssertionError("web/dist is not built: run the tests with `make test` (it builds the UI)")
    base, web = free_base_port(PORTS_USED), free_port()
    env = {**os.environ, "FABRICA_LOG_FORMAT": "text", "FABRICA_METRICS_PORT": "-1", "FABRICA_WEB_DIST": str(DIST)}
    log = tmp / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fabrica_svc.cli", "run", "--data-dir", str(tmp / "data"),
                                 "--base-port", str(base), "--web-port", str(web)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    banner = ""
    for _ in range(1200):
        banner = log.read_text(errors="replace")
        if "Ctrl-C stops everything" in banner or proc.poll() is not None:
            break
        time.sleep(0.1)
    if "Ctrl-C stops everything" not in banner:
        proc.kill()
        raise AssertionError(f"fabrica run did not come up:\n{banner[-4000:]}")
    sim = re.search(r"Modbus TCP 127\.0\.0\.1:(\d+), .* S7 127\.0\.0\.1:(\d+)", banner)
    assert sim, banner
    admin = re.search(r"^  export TOKEN=(\S+)$", banner, re.MULTILINE)
    assert admin, banner
    return proc, Stack(url=f"http://127.0.0.1:{web}/", config=f"127.0.0.1:{base}", ingest=f"127.0.0.1:{base + 1}",
                       production=f"127.0.0.1:{base + 2}", collector=f"127.0.0.1:{base + 3}",
                       modbus_port=int(sim.group(1)), s7_port=int(sim.group(2)), log=log, data_dir=tmp / "data",
                       admin_token=admin.group(1), alarm=f"127.0.0.1:{base + 4}")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Not under pytest's tmp folder (0700): the embedded Postgres runs as its own user and must reach its data.
    tmp = Path(tempfile.mkdtemp(prefix="fabrica-web-stack-"))
    os.chmod(tmp, 0o755)
    proc, st = _start_stack(tmp)
    try:
        yield st
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.access(CHROMIUM, os.X_OK):
        raise AssertionError(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def sign_in(page, url: str, token: str, who: str) -> None:  # noqa: ANN001 - a Playwright page
    """Sign in on the UI at `url` (its login screen, the token field) and wait until it names `who`."""
    from playwright.sync_api import expect

    page.goto(url.rstrip("/") + "/#/login")
    page.locator("textarea[name=token]").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".who-name")).to_contain_text(who)


@pytest.fixture
def page(browser, stack: Stack, request: pytest.FixtureRequest):  # noqa: ANN001, ANN201 - Playwright objects
    """A fresh page (1280×860, tablet-sized screens are tried in their own test), signed in with the banner's
    admin token (every call is verified by the services); a page error or a failed script fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(20_000)
    sign_in(pg, stack.url, stack.admin_token, "admin · admin")
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"script errors on the page: {errors}"


def screenshot(page, name: str) -> Path:  # noqa: ANN001 - a Playwright page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    return path


class CuttableProxy:
    """A TCP proxy on loopback in front of the gateway whose connections can be cut, as a network that
    drops: `cut()` closes every open connection (a browser's streams break for real) and refuses new ones
    until `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = threading.Event()
        self.up.set()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._socks -= {src, dst}

    def cut(self) -> None:
        self.up.clear()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self._server.close()


@pytest.fixture
def proxy(stack: Stack) -> Iterator[CuttableProxy]:
    p = CuttableProxy(int(stack.url.rstrip("/").rsplit(":", 1)[1]))
    try:
        yield p
    finally:
        p.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each browser test may run again twice after a failure (pytest-rerunfailures). They drive Chromium
    against a whole `fabrica run` on a two-core machine, and under load a page now and then misses a
    deadline its assertion waits for; a broken screen fails all three runs, and every rerun is reported
    (``-ra`` lists them as R). Only this folder gets it."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.flaky(reruns=2))
