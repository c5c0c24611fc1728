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
=========================  =============================================  ==========================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_PORTS = {"config": 50051, "ingest": 50052, "production": 50053, "collector": 50054}
DEFAULT_METRICS_PORTS = {"config": 9451, "ingest": 9452, "production": 9453, "collector": 9454}


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
    #: The service has its process to itself (`fabrica serve`), so process-wide tuning may apply (the
    #: collector's gc.freeze); False when `fabrica run` or a test hosts several services in one process.
    sole_service: bool = False

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is out of range {lo}..{hi}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is out of range {lo}..{hi}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
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
    pool_min = _int(env, "FABRICA_DB_POOL_MIN", 1, 0, 1000)
    pool_max = _int(env, "FABRICA_DB_POOL_MAX", 10, 1, 1000)
    if pool_max < pool_min:
        raise SettingsError(f"FABRICA_DB_POOL_MAX={pool_max} is below FABRICA_DB_POOL_MIN={pool_min}")
    return Settings(
        service=service,
        database_url=env.get("DATABASE_URL") or None,
        data_dir=Path(env.get("FABRICA_DATA_DIR") or ".fabrica"),
        host=env.get("FABRICA_HOST") or "127.0.0.1",
        port=_int(env, "FABRICA_PORT", DEFAULT_PORTS[service], 0, 65535),
        metrics_port=_int(env, "FABRICA_METRICS_PORT", DEFAULT_METRICS_PORTS[service], -1, 65535),
        db_pool_min=pool_min,
        db_pool_max=pool_max,
        log_level=_choice(env, "FABRICA_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=_choice(env, "FABRICA_LOG_FORMAT", "json", ("json", "text")),
        shutdown_grace=_float(env, "FABRICA_SHUTDOWN_GRACE", 10.0, 0.0, 3600.0),
        health_interval=_float(env, "FABRICA_HEALTH_INTERVAL", 2.0, 0.05, 600.0),
        config_addr=(env.get("FABRICA_CONFIG_ADDR") or "").strip(),
        ingest_addr=(env.get("FABRICA_INGEST_ADDR") or "").strip(),
    )
