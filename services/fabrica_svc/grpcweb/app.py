"""The gRPC-Web gateway: `fabrica grpc-web` alone, or inside `fabrica run`.

One HTTP origin (hypercorn; HTTP/1.1 and h2c) serving the built UI and gRPC-Web for every unary and
server-streaming method of config, ingest, production and the collector, forwarded to their gRPC servers
(proxy.py) with the routes and policy of deploy/envoy/envoy.yaml (routes.py, cors.py). It is what `make run`,
the tests and anyone without Envoy use; in deployment Envoy does the same job.

Settings (environment; a bad value stops it with one line naming the variable):

=============================  ===============================================  ===========================
Variable                       Meaning                                          Default
=============================  ===============================================  ===========================
FABRICA_HOST / FABRICA_PORT    Address the gateway binds (HTTP)                 127.0.0.1 / 8080
FABRICA_CONFIG_ADDR            host:port of config                              127.0.0.1:50051
FABRICA_INGEST_ADDR            host:port of ingest                              127.0.0.1:50052
FABRICA_PRODUCTION_ADDR        host:port of production                          127.0.0.1:50053
FABRICA_COLLECTOR_ADDR         host:port of the collector (probe, preview)      127.0.0.1:50054
FABRICA_ALARM_ADDR             host:port of alarm                               127.0.0.1:50055
FABRICA_GRPC_WEB_CORS_ORIGINS  Comma-separated origins allowed to call from     http://localhost:5173
                               another origin (scheme://host[:port]; never *)   (the UI's dev server)
FABRICA_WEB_DIST               The built UI to serve; "-" serves none           web/dist when it exists
FABRICA_GRPC_WEB_MAX_MESSAGE   Largest request message, bytes                   4194304
FABRICA_TLS_CERT/KEY/CA        TLS to the upstreams (runtime/channels.py):      required unless
                               the CA verifies them; the certificate is         FABRICA_INSECURE=1
                               presented where a port asks for one
=============================  ===============================================  ===========================

Who calls is the browser's business: its ``authorization`` header is forwarded to the service, which
verifies the token and checks the method's role. The gateway never sends a token of its own (FABRICA_TOKEN
and FABRICA_TOKEN_FILE are ignored here), so a call without one is UNAUTHENTICATED at the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from ..runtime.channels import peer_channel
from ..runtime.settings import DEFAULT_PORTS, Settings, SettingsError, env_int, load_settings
from .cors import Cors
from .proxy import GrpcWebProxy
from .routes import UPSTREAMS, Route, load_routes
from .static import StaticFiles

log = logging.getLogger("fabrica.grpcweb")

#: Where `npm run build` in web/ writes the UI, in a source checkout.
REPO_WEB_DIST = Path(__file__).resolve().parents[3] / "web" / "dist"
DEFAULT_CORS_ORIGINS = ("http://localhost:5173",)
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
#: A path that names an RPC (/package.Service/Method): answered by the proxy, never by the UI's files.
_RPC_PATH = re.compile(r"/[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+/[A-Za-z_]\w*")
_ADDR_VARS = {"config": "FABRICA_CONFIG_ADDR", "ingest": "FABRICA_INGEST_ADDR",
              "production": "FABRICA_PRODUCTION_ADDR", "collector": "FABRICA_COLLECTOR_ADDR",
              "alarm": "FABRICA_ALARM_ADDR"}


@dataclass(frozen=True)
class GatewaySettings:
    #: host, port, logging and whatever applies to every peer channel (runtime/channels.py).
    base: Settings
    #: Upstream address of each of routes.UPSTREAMS.
    upstreams: Mapping[str, str] = field(default_factory=dict)
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    web_dist: Path | None = None
    max_message_bytes: int = 4 * 1024 * 1024

    def with_overrides(self, **changes: Any) -> GatewaySettings:
        return replace(self, **changes)


def parse_origins(raw: str, name: str = "FABRICA_GRPC_WEB_CORS_ORIGINS") -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise SettingsError(f"{name}={raw!r}: {origin!r} is not an origin like https://host[:port] "
                                "(no path, no wildcard)")
    return origins


def load_gateway_settings(env: Mapping[str, str] | None = None) -> GatewaySettings:
    env = os.environ if env is None else env
    base = load_settings("grpc-web", env)
    upstreams = {}
    for name in UPSTREAMS:
        address = (env.get(_ADDR_VARS[name]) or "").strip() or f"127.0.0.1:{DEFAULT_PORTS[name]}"
        if not re.fullmatch(r"[\w.-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}", address):
            raise SettingsError(f"{_ADDR_VARS[name]}={address!r} is not host:port")
        upstreams[name] = address
    raw_origins = env.get("FABRICA_GRPC_WEB_CORS_ORIGINS")
    origins = DEFAULT_CORS_ORIGINS if raw_origins is None else parse_origins(raw_origins)
    raw_dist = (env.get("FABRICA_WEB_DIST") or "").strip()
    if raw_dist == "-":
        web_dist = None
    elif raw_dist:
        web_dist = Path(raw_dist)
        if not (web_dist / "index.html").is_file():
            raise SettingsError(f"FABRICA_WEB_DIST={raw_dist!r} has no index.html (build the UI: npm run build)")
    else:
        web_dist = REPO_WEB_DIST if (REPO_WEB_DIST / "index.html").is_file() else None
    max_message = env_int(env, "FABRICA_GRPC_WEB_MAX_MESSAGE", 4 * 1024 * 1024, 1024, 64 * 1024 * 1024)
    return GatewaySettings(base=base, upstreams=upstreams, cors_origins=origins, web_dist=web_dist,
                           max_message_bytes=max_message)


class GatewayApp:
    """The ASGI application: RPC paths to the proxy (gRPC-Web only), everything else to the UI's files; CORS
    around both."""

    def __init__(self, routes: Mapping[str, Route], channels: Mapping[str, grpc.aio.Channel],
                 settings: GatewaySettings) -> None:
        self.routes = routes
        self.proxy = GrpcWebProxy(routes, channels, settings.max_message_bytes)
        self.static = StaticFiles(settings.web_dist)
        self._handler = Cors(self._dispatch, settings.cors_origins)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        await self._handler(scope, receive, send)

    async def _dispatch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if path not in self.routes and not _RPC_PATH.fullmatch(path):
            await self.static(scope, receive, send)
            return
        content_type = ""
        for key, value in scope.get("headers", ()):
            if key.lower() == b"content-type":
                content_type = value.decode("latin-1").split(";")[0].strip().lower()
        if content_type not in ("application/grpc-web", "application/grpc-web+proto"):
            # Connect, plain gRPC, grpc-web+json and grpc-web-text are not offered (the upstreams speak
            # binary gRPC only; connect-web's gRPC-Web transport sends application/grpc-web+proto).
            body = (b"This gateway speaks gRPC-Web with binary messages only "
                    b"(content-type application/grpc-web+proto).\n")
            await send({"type": "http.response.start", "status": 415, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"), (b"accept-post", b"application/grpc-web+proto")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.proxy(scope, receive, send)


class Gateway:
    """The gateway's HTTP server and its channels to the upstreams, started and stopped with the stack."""

    def __init__(self, settings: GatewaySettings, routes: Mapping[str, Route] | None = None) -> None:
        self.settings = settings
        self.routes = dict(routes if routes is not None else load_routes())
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return self.settings.base.host

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        from hypercorn.asyncio import serve  # noqa: PLC0415 - only the gateway needs the HTTP server
        from hypercorn.config import Config  # noqa: PLC0415

        base = self.settings.base
        # TLS and tracing from peer_channel, but never a token of the gateway's: each call carries its caller's.
        upstream = base.with_overrides(token="", token_file=None)
        for name, address in self.settings.upstreams.items():
            self._channels[name] = peer_channel(address, upstream)
        family = socket.AF_INET6 if ":" in base.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((base.host, base.port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            await self._close_channels()
            raise OSError(exc.errno, f"the gRPC-Web gateway cannot listen on {base.host}:{base.port}: "
                                     f"{exc.strerror}") from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = Config()
        # Bound here (port 0 gives a free port, known before anyone connects); hypercorn owns the socket.
        config.bind = [f"fd://{sock.detach()}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("fabrica.grpcweb.http")
        config.graceful_timeout = base.shutdown_grace
        app = GatewayApp(self.routes, self._channels, self.settings)
        self._task = asyncio.create_task(serve(app, config, shutdown_trigger=self._stop.wait, mode="asgi"),
                                         name="grpc-web gateway")
        await asyncio.sleep(0)
        if self._task.done():  # hypercorn could not start: say why now, not at the first request
            await self._close_channels()
            self._task.result()
        missing = sorted({r.upstream for r in self.routes.values()} - set(self._channels))
        log.info("gRPC-Web gateway serving", extra={"url": self.url, "upstreams": dict(self.settings.upstreams),
                                                    "ui": str(self.settings.web_dist or ""),
                                                    "unrouted_upstreams": missing})

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting, gives calls in flight `grace` seconds (default FABRICA_SHUTDOWN_GRACE), then ends
        the rest (open watches end as CANCELLED; their clients resume elsewhere)."""
        if self._task is None:
            return
        self._stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), grace if grace is not None else
                                   self.settings.base.shutdown_grace)
        await self._close_channels()
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _close_channels(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def serve_gateway(settings: GatewaySettings) -> None:
    """`fabrica grpc-web`: the gateway until SIGINT or SIGTERM."""
    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    print(f"gRPC-Web gateway on {gateway.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await gateway.stop()
