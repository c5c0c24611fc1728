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
FABRICA_TLS_CERT/KEY/CA    The service's certificate, key, and the CA     unset: FABRICA_INSECURE
                           that verifies its peers (runtime/tls.py)       must be 1
FABRICA_PEER_PORT          The mutual-TLS port for collectors and         -1: none
                           services (runtime/tls.py); 0: any free port
FABRICA_INSECURE           1: development mode (below)                    0
FABRICA_HEALTH_PORT        A plaintext port serving grpc.health.v1 only,  -1: none
                           for probes that cannot speak TLS (kubelet's
                           native gRPC probes); 0: any free port
FABRICA_JWT_PUBLIC_KEY_FILE  PEM public key that signs bearer tokens      unset
FABRICA_JWKS_URL           JWKS of an OIDC provider (cached)              unset
FABRICA_JWKS_FILE          A JWKS in a local file                         unset
FABRICA_JWT_ISSUER         The tokens' required ``iss``                   fabrica
FABRICA_JWT_AUDIENCE       The tokens' required ``aud``                   fabrica
FABRICA_TOKEN_FILE         Bearer token this service sends to its peers   unset
FABRICA_TOKEN              The same token, inline (FILE wins)             unset
FABRICA_REFLECTION         0 turns server reflection off                  1
=========================  =============================================  ==========================

TLS is the default: without FABRICA_INSECURE=1 a service refuses to start unless FABRICA_TLS_CERT,
FABRICA_TLS_KEY and FABRICA_TLS_CA name readable PEM files (a missing or unreadable one is named in the
one-line error). With FABRICA_INSECURE=1 and no certificate, the ports and channels are plaintext (a
warning at start says so).

Authentication (runtime/auth.py): with a token verifier configured (FABRICA_JWT_PUBLIC_KEY_FILE,
FABRICA_JWKS_URL or FABRICA_JWKS_FILE) every RPC but health and reflection needs a bearer token or a
verified client certificate (runtime/tls.py) with the role its proto declares. Without a verifier a service
refuses to start, unless FABRICA_INSECURE=1, which turns authentication off (logged as a warning: anyone
can call anything).

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from .tls import TlsConfig, TlsFileError, load_tls

#: "grpc-web" is the gRPC-Web gateway (`fabrica grpc-web`, fabrica_svc/grpcweb): HTTP on 8080, as Envoy's
#: listener in deploy/envoy/envoy.yaml; it has no metrics endpoint of its own.
DEFAULT_PORTS = {"config": 50051, "ingest": 50052, "production": 50053, "collector": 50054, "alarm": 50055,
                 "grpc-web": 8080}
DEFAULT_METRICS_PORTS = {"config": 9451, "ingest": 9452, "production": 9453, "collector": 9454, "alarm": 9455,
                         "grpc-web": -1}


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
    #: The certificate, key and CA (FABRICA_TLS_*); None: plaintext, allowed only with `insecure`.
    tls: TlsConfig | None = None
    #: FABRICA_INSECURE=1: plaintext allowed, development only.
    insecure: bool = False
    #: The mutual-TLS port (FABRICA_PEER_PORT): -1 none, 0 any free port.
    peer_port: int = -1
    #: The plaintext health-only port (FABRICA_HEALTH_PORT): -1 none, 0 any free port.
    health_port: int = -1
    #: Token verification (runtime/auth.py): a PEM public key, a JWKS URL or a JWKS file; iss and aud.
    jwt_public_key_file: Path | None = None
    jwks_url: str = ""
    jwks_file: Path | None = None
    jwt_issuer: str = "fabrica"
    jwt_audience: str = "fabrica"
    #: The bearer token this service sends to its peers (runtime/channels.py): a file (re-read when it
    #: changes) or the token itself.
    token_file: Path | None = None
    token: str = field(default="", repr=False)
    #: FABRICA_TENANT: the tenant this process's calls name (header x-fabrica-tenant, runtime/tenancy.py)
    #: when its identity is installation-wide (development mode, an admin token with tenant *); empty: none.
    tenant: str = ""
    #: Server reflection on (FABRICA_REFLECTION=0 turns it off; health stays).
    reflection: bool = True

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


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """`env[name]` as a yes/no (1/0, true/false, yes/no, on/off); `default` when unset or blank."""
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={env.get(name)!r} is not one of 1, 0, true, false, yes, no, on, off")


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    raw = (env.get(name) or "").strip()
    return Path(raw) if raw else None


def env_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    """`env[name]` as one of `choices` (case as the choices are written); `default` when unset or empty."""
    raw = env.get(name) or default
    value = raw.upper() if choices[0].isupper() else raw.lower()
    if value not in choices:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def token_issuer(env: Mapping[str, str]) -> str:
    """The ``iss`` tokens must have (FABRICA_JWT_ISSUER): what the services check and `fabrica token` signs."""
    return (env.get("FABRICA_JWT_ISSUER") or "").strip() or "fabrica"


def token_audience(env: Mapping[str, str]) -> str:
    """The ``aud`` tokens must have (FABRICA_JWT_AUDIENCE)."""
    return (env.get("FABRICA_JWT_AUDIENCE") or "").strip() or "fabrica"


def _env_tenant(env: Mapping[str, str]) -> str:
    from .tenancy import ALL, is_code

    tenant = (env.get("FABRICA_TENANT") or "").strip()
    if tenant and tenant != ALL and not is_code(tenant):
        raise SettingsError(f"FABRICA_TENANT={tenant!r}: not a tenant code (lower-case letters, digits and dashes, "
                            "starting with a letter) or *")
    return tenant


def load_settings(service: str, env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings of `service` from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    if service not in DEFAULT_PORTS:
        raise SettingsError(f"unknown service {service!r}; one of {', '.join(DEFAULT_PORTS)}")
    pool_min = env_int(env, "FABRICA_DB_POOL_MIN", 1, 0, 1000)
    pool_max = env_int(env, "FABRICA_DB_POOL_MAX", 10, 1, 1000)
    if pool_max < pool_min:
        raise SettingsError(f"FABRICA_DB_POOL_MAX={pool_max} is below FABRICA_DB_POOL_MIN={pool_min}")
    settings = Settings(
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
        jwt_public_key_file=_env_path(env, "FABRICA_JWT_PUBLIC_KEY_FILE"),
        jwks_url=(env.get("FABRICA_JWKS_URL") or "").strip(),
        jwks_file=_env_path(env, "FABRICA_JWKS_FILE"),
        jwt_issuer=token_issuer(env),
        jwt_audience=token_audience(env),
        token_file=_env_path(env, "FABRICA_TOKEN_FILE"),
        token=(env.get("FABRICA_TOKEN") or "").strip(),
        tenant=_env_tenant(env),
        reflection=env_bool(env, "FABRICA_REFLECTION", True),
    )
    insecure = env_choice(env, "FABRICA_INSECURE", "0", ("0", "1")) == "1"
    tls_files = [(env.get(n) or "").strip() for n in ("FABRICA_TLS_CERT", "FABRICA_TLS_KEY", "FABRICA_TLS_CA")]
    tls: TlsConfig | None = None
    if any(tls_files) or not insecure:
        try:
            tls = load_tls(*tls_files)
        except TlsFileError as exc:
            raise SettingsError(str(exc)) from None
    peer_port = env_int(env, "FABRICA_PEER_PORT", -1, -1, 65535)
    if peer_port != -1 and tls is None:
        raise SettingsError(f"FABRICA_PEER_PORT={peer_port} needs FABRICA_TLS_CERT, FABRICA_TLS_KEY and "
                            "FABRICA_TLS_CA: the peer port is mutual TLS")
    health_port = env_int(env, "FABRICA_HEALTH_PORT", -1, -1, 65535)
    return replace(settings, tls=tls, insecure=insecure, peer_port=peer_port, health_port=health_port)
