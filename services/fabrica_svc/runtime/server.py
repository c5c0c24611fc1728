"""Builds and runs every Fabrica gRPC server the same way.

A service supplies a `ServiceApp`: its gRPC services, its schema and migrations, and its background work.
`ServiceHost` does the rest: Postgres (embedded when DATABASE_URL is unset) with migrations, an asyncpg
pool, grpc.aio with the shared interceptor (authentication and roles, runtime/auth.py) and OpenTelemetry,
health (SERVING only while the database answers; ``List`` implemented), reflection (off with
FABRICA_REFLECTION=0), the metrics endpoint, and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from . import auth
from .channels import MESSAGE_LIMITS, check_peer_token
from .db import Migration, apply_migrations, connect_with_retry, create_pool, resolve_database_url
from .interceptors import ServiceInterceptor
from .reflection import SourceInfoPool, descriptor_set_path
from .settings import Settings
from .tasks import cancel_and_wait
from .tls import principal_from_peer
from .telemetry import configure_telemetry, flush_traces, observe_health, start_metrics_endpoint

log = logging.getLogger(__name__)

#: A health name that is SERVING for as long as the process answers: for liveness probes, which must not
#: restart a pod because its database is away (readiness, on the overall name "", does follow it).
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.aio.HealthServicer):
    """grpcio-health-checking's asyncio servicer with ``List`` too (1.85 leaves it to the generated base,
    which raises NotImplementedError): every name ever set, with the status ``Check`` answers for it."""

    def __init__(self) -> None:
        super().__init__()
        self._names: set[str] = {""}

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        self._names.add(service)
        await super().set(service, status)

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        statuses = {name: await self.Check(health_pb2.HealthCheckRequest(service=name), context)
                    for name in sorted(self._names)}
        return health_pb2.HealthListResponse(statuses=statuses)


@dataclass
class Resources:
    """What the host hands a service when it starts."""

    settings: Settings
    dsn: str | None = None
    pool: asyncpg.Pool | None = None


class ServiceApp(Protocol):
    """One Fabrica service as the host sees it."""

    name: str
    #: Full gRPC service names, e.g. ``fabrica.config.v1.ConfigService`` (health and reflection).
    service_names: Sequence[str]
    #: The Postgres schema the service owns, or None for a service without a database (the collector).
    schema: str | None
    migrations: Sequence[Migration]

    async def start(self, resources: Resources) -> None:
        """Build the servicers and start background work. Called before `register`."""

    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicers to the server."""

    async def stop(self) -> None: ...


def _tenant_state(app: ServiceApp) -> Callable[[str], bool] | None:
    """Whether a tenant is active, by the app's ``tenant_directory`` (runtime/tenants.py; set in its start()),
    for the interceptor's TENANT_INACTIVE check; None for an app without one (config checks its own table)."""
    directory = getattr(app, "tenant_directory", None)
    return directory.active if directory is not None else None


def _busy(what: str, variable: str, choices: str) -> str:
    """The message of a port that cannot be bound: what, why it usually is, and the variable that moves it."""
    return (f"{what}; the port is taken (another `fabrica serve` or `fabrica run` on this machine?) or the address "
            f"is not this machine's: set {variable} to another port {choices}, or FABRICA_HOST to another address")


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, what: str,
          variable: str, choices: str) -> int:
    """Add a port to `server` (TLS with `credentials`, else plaintext); the bound port, or OSError saying why."""
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:  # grpcio raises RuntimeError when it cannot bind, and says no more than that
        port = 0
    if port == 0:
        raise OSError(_busy(f"cannot listen on {address} ({what})", variable, choices))
    return port


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass
class ServiceHost:
    app: ServiceApp
    settings: Settings
    server: grpc.aio.Server | None = None
    health: HealthServicer = field(default_factory=HealthServicer)
    resources: Resources | None = None
    port: int = 0
    metrics_port: int | None = None
    #: The bound mutual-TLS port (FABRICA_PEER_PORT, runtime/tls.py), or None when there is none.
    peer_port: int | None = None
    #: The bound plaintext health-only port (FABRICA_HEALTH_PORT), or None when there is none.
    health_port: int | None = None
    _health_server: grpc.aio.Server | None = None
    _monitor: asyncio.Task[None] | None = None
    _metrics_server: object | None = None
    _serving: bool | None = None
    _interceptor: ServiceInterceptor | None = None
    _authenticator: auth.Authenticator | None = None

    @property
    def serving(self) -> bool | None:
        """SERVING (True), NOT_SERVING (False), or None before the first health check."""
        return self._serving

    @property
    def address(self) -> str:
        return _address(self.settings.host, self.port)

    @property
    def peer_address(self) -> str | None:
        """Where collectors and services call (mutual TLS), or None without a peer port."""
        return _address(self.settings.host, self.peer_port) if self.peer_port else None

    async def start(self) -> None:
        app, settings = self.app, self.settings
        # First: a service that cannot verify tokens (and is not in development mode) stops before anything.
        self._authenticator = auth.authenticator_for(settings, peer_identifier=principal_from_peer)
        check_peer_token(settings)
        configure_telemetry(app.name)
        observe_health(self)
        resources = Resources(settings=settings)
        if app.schema is not None:
            resources.dsn = await resolve_database_url(settings.database_url, settings.data_dir)
            conn = await connect_with_retry(resources.dsn)
            try:
                applied = await apply_migrations(conn, app.schema, app.migrations)
            finally:
                await conn.close()
            if applied:
                log.info("migrations applied", extra={"schema": app.schema, "versions": applied})
            resources.pool = await create_pool(
                resources.dsn, app.schema, min_size=settings.db_pool_min, max_size=settings.db_pool_max
            )
        self.resources = resources
        try:
            await app.start(resources)
            await self._start_server()
            self._write_port_file()
        except BaseException:
            await self.stop(grace=0)
            raise
        log.info("serving", extra={"service": app.name, "address": self.address, "port": self.port,
                                   "metrics_port": self.metrics_port, "peer_port": self.peer_port,
                                   "tls": self.settings.tls is not None})

    def _write_port_file(self) -> None:
        """Write the bound ports to FABRICA_PORT_FILE (see runtime/settings.py), keeping the entries other
        services of this process wrote there."""
        path = self.settings.port_file
        if path is None:
            return
        try:
            written = json.loads(path.read_text())
        except (OSError, ValueError):
            written = {}
        mine = isinstance(written, dict) and written.get("pid") == os.getpid()  # else: stale, another process's
        services = written.get("services", {}) if mine else {}
        services[self.app.name] = {"port": self.port, "metrics_port": self.metrics_port,
                                   **({"peer_port": self.peer_port} if self.peer_port else {}),
                                   **({"health_port": self.health_port} if self.health_port else {})}
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps({"pid": os.getpid(), "services": services}))
        os.replace(scratch, path)

    async def _start_server(self) -> None:
        app, settings = self.app, self.settings
        # Who calls (the interceptor sets it per RPC): a bearer token, then the verified client certificate
        # (runtime/auth.py, runtime/tls.py); no identify at all when authentication is off.
        identify = self._authenticator.identify if self._authenticator is not None else None
        self._interceptor = ServiceInterceptor(app.name, identify=identify, tenant_active=_tenant_state(app))
        server = grpc.aio.server(
            interceptors=[aio_server_interceptor(), self._interceptor],
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                # The one message size limit of every server and channel (runtime/channels.py).
                *MESSAGE_LIMITS,
                # A port already in use is an error, not a silently shared listener.
                ("grpc.so_reuseport", 0),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        app.register(server)
        if settings.reflection:
            reflection.enable_server_reflection(
                [*app.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME],
                server, pool=SourceInfoPool(descriptor_set_path()),  # with the protos' comments (runtime/reflection.py)
            )
        tls = settings.tls
        if tls is None:
            log.warning("plaintext gRPC on the port of %s (FABRICA_INSECURE=1, no FABRICA_TLS_CERT): anyone on the "
                        "network can read and send anything; for development only", app.name)
        self.port = _bind(server, _address(settings.host, settings.port),
                          tls.server_credentials(require_client_cert=False) if tls else None,
                          f"the gRPC port of {app.name}", "FABRICA_PORT", "(or --port; 0: any free port)")
        if settings.peer_port != -1 and tls is not None:  # settings refuse a peer port without TLS
            self.peer_port = _bind(server, _address(settings.host, settings.peer_port),
                                   tls.server_credentials(require_client_cert=True),
                                   f"the mutual-TLS peer port of {app.name}", "FABRICA_PEER_PORT", "(0: any free port)")
        await self._set_serving(False)
        await self.health.set(LIVENESS, SERVING)
        await server.start()
        self.server = server
        if settings.health_port != -1:
            # Health alone, plaintext: kubelet's native gRPC probes speak no TLS. It tells no more than
            # SERVING or not; everything else stays on the TLS ports.
            health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            self.health_port = _bind(health_server, _address(settings.host, settings.health_port), None,
                                     f"the health port of {app.name}", "FABRICA_HEALTH_PORT", "(0: any free port, -1: off)")
            await health_server.start()
            self._health_server = health_server
        try:
            endpoint = start_metrics_endpoint(settings.host, settings.metrics_port)
        except OSError as exc:  # the bare "[Errno 98] Address already in use" of http.server
            raise OSError(_busy(
                f"cannot serve metrics on {_address(settings.host, settings.metrics_port)} (the metrics port of "
                f"{app.name}): {exc.strerror or exc}", "FABRICA_METRICS_PORT", "(0: any free port, -1: off)")) from None
        if endpoint:
            self._metrics_server, self.metrics_port = endpoint
        await self._set_serving(await self._dependencies_ok())
        self._monitor = asyncio.create_task(self._watch_dependencies(), name=f"{app.name}-health")

    async def _set_serving(self, ok: bool) -> None:
        if ok == self._serving:
            return
        self._serving = ok
        status = SERVING if ok else NOT_SERVING
        for name in ("", *self.app.service_names):
            await self.health.set(name, status)
        if self.server is not None:
            log.log(logging.INFO if ok else logging.WARNING, "health %s", "SERVING" if ok else "NOT_SERVING")

    async def _dependencies_ok(self) -> bool:
        pool = self.resources.pool if self.resources else None
        if pool is None:
            return True
        try:
            async with asyncio.timeout(max(1.0, self.settings.health_interval)):
                await pool.fetchval("SELECT 1")
            return True
        except Exception as exc:  # any failure to answer means not ready
            log.debug("database check failed: %s", exc)
            return False

    async def _watch_dependencies(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await self._set_serving(await self._dependencies_ok())

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.shutdown_grace if grace is None else grace
        await cancel_and_wait(self._monitor)
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._interceptor is not None:
            self._interceptor.close()
        await self._release()
        flush_traces()
        log.info("stopped", extra={"service": self.app.name})

    async def _release(self) -> None:
        """Stop the app's background work and close what start() opened."""
        await self.app.stop()
        if self.resources and self.resources.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.resources.pool.close(), timeout=5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
            self._metrics_server = None


async def serve_until_signal(hosts: Sequence[ServiceHost]) -> None:
    """Start the hosts, run until SIGTERM or SIGINT, then shut them down gracefully (in reverse order)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[ServiceHost] = []
    try:
        for host in hosts:
            await host.start()
            started.append(host)
        await stop.wait()
        log.info("shutting down")
    finally:
        for host in reversed(started):
            await host.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
