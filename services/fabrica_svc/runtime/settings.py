"""Settings from environment variables, with defaults that suit a developer's machine.

Every service reads the same variables; containers and the Kubernetes manifests set them.

=========================  =============================================  ==========================
Variable                   Meaning                                        Default
=========================  =============================================  ==========================
DATABASE_URL               Postgres DSN (postgresql://user:pw@host/db)    unset: embedded Postgres
FABRICA_DATA_DIR           Local data: embedded Postgres, collector log   ./.fabrica
FABRICA_HOST               Address the gRPC server binds                  127.0.0.1
FABRICA_PORT               gRPC port                                      per service (below)
FABRICA_METRICS_PORT       Prometheus scrape port; -1 turns it off        per service (below)
FABRICA_DB_POOL_MIN/MAX    asyncpg pool size                              1 / 10
FABRICA_LOG_LEVEL          DEBUG, INFO, WARNING, ERROR                    INFO
FABRICA_LOG_FORMAT         json or text                                   json
FABRICA_SHUTDOWN_GRACE     Seconds in-flight RPCs get on SIGTERM          10
FABRICA_HEALTH_INTERVAL    Seconds between database health checks         2
FABRICA_CONFIG_ADDR        host:port of the config service (its clients)  unset
FABRICA_INGEST_ADDR        host:port of the ingest service (its clients)  unset
FABRICA_PORT_FILE          File the bound ports are written to (below)    unset: none written
FABRICA_COLLECTOR_ID       The collector's id (the collector only)        unset
=========================  =============================================  ==========================

FABRICA_PORT (and FABRICA_METRICS_PORT) may be 0: the service binds a free port. With FABRICA_PORT_FILE set,
once a service listens it writes the ports it bound to that file, atomically, as JSON:
``{"pid": 1234, "services": {"config": {"port": 41234, "metrics_port": 39877}}}`` (``metrics_port`` is null
when the endpoint is off; a process hosting several services lists each). Whoever started the process reads
the port back from there, so no other process can take it in between. The "serving" log line carries the
same ports.

A service with settings of its own (ingest's FABRICA_INGEST_*, the collector's FABRICA_COLLECTOR_*) reads
them with :func:`env_int`, :func:`env_float` and :func:`env_choice`, so every bad value is refused with the
same one-line error naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

DEFAULT_PORTS = {"config": 50051, "ingest": 50052, "production": 50053, "collector": 50054, "alarm": 50055}
DEFAULT_METRICS_PORTS = {"config": 9451, "ingest": 9452, "production": 9453, "collector": 9454, "alarm": 9455}


N = TypeVar("N", int, float)


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Settings:
    service: str
    database_url: str | None = None
    data_dir: Path = Path(".fabrica")
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = -1
    db_pool_min: int = 1
    db_pool_max: int = 10
    log_level: str = "INFO"
    log_format: str = "json"
    shutdown_grace: float = 10.0
    health_interval: float = 2.0
    #: Peers, for the services that call them ("" = not configured; each service says what that means).
    config_addr: str = ""
    ingest_addr: str = ""
    #: Where to write the bound ports once listening (FABRICA_PORT_FILE); None: nowhere.
    port_file: Path | None = None
    #: The collector's id ("" = not set; the collector refuses to start without one).
    collector_id: str = ""
    #: The service has its process to itself (`fabrica serve`), so process-wide tuning may apply (the
    #: collector's gc.freeze); False when `fabrica run` or a test hosts several services in one process.
    sole_service: bool = False

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """`env[name]` as a whole number in lo..hi; `default` when unset or blank. SettingsError names `name`."""
    return _env_number(env, name, default, lo, hi, int, "a whole number")


def env_float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    """`env[name]` as a number in lo..hi; `default` when unset or blank. SettingsError names `name`."""
    return _env_number(env, name, default, lo, hi, float, "a number")


def _env_number(env: Mapping[str, str], name: str, default: N, lo: N, hi: N, parse: Callable[[str], N],
                what: str) -> N:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not {what}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is out of range {lo}..{hi}")
    return value


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    """`env[name]` as one of `choices` (case as the choices are written); `default` when unset or empty."""
    raw = env.get(name) or default
    value = raw.upper() if choices[0].isupper() else raw.lower()
    if value not in choices:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def load_settings(service: str, env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings of `service` from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    if service not in DEFAULT_PORTS:
        raise SettingsError(f"unknown service {service!r}; one of {', '.join(DEFAULT_PORTS)}")
    pool_min = env_int(env, "FABRICA_DB_POOL_MIN", 1, 0, 1000)
    pool_max = env_int(env, "FABRICA_DB_POOL_MAX", 10, 1, 1000)
    if pool_max < pool_min:
        raise SettingsError(f"FABRICA_DB_POOL_MAX={pool_max} is below FABRICA_DB_POOL_MIN={pool_min}")
    return Settings(
        service=service,
        database_url=env.get("DATABASE_URL") or None,
        data_dir=Path(env.get("FABRICA_DATA_DIR") or ".fabrica"),
        host=env.get("FABRICA_HOST") or "127.0.0.1",
        port=env_int(env, "FABRICA_PORT", DEFAULT_PORTS[service], 0, 65535),
        metrics_port=env_int(env, "FABRICA_METRICS_PORT", DEFAULT_METRICS_PORTS[service], -1, 65535),
        db_pool_min=pool_min,
        db_pool_max=pool_max,
        log_level=env_choice(env, "FABRICA_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=env_choice(env, "FABRICA_LOG_FORMAT", "json", ("json", "text")),
        shutdown_grace=env_float(env, "FABRICA_SHUTDOWN_GRACE", 10.0, 0.0, 3600.0),
        health_interval=env_float(env, "FABRICA_HEALTH_INTERVAL", 2.0, 0.05, 600.0),
        config_addr=(env.get("FABRICA_CONFIG_ADDR") or "").strip(),
        ingest_addr=(env.get("FABRICA_INGEST_ADDR") or "").strip(),
        port_file=Path(env["FABRICA_PORT_FILE"]) if env.get("FABRICA_PORT_FILE") else None,
        collector_id=(env.get("FABRICA_COLLECTOR_ID") or "").strip(),
    )
