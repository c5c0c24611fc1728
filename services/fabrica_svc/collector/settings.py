"""Collector settings: the runtime's Settings (its id and peers among them) plus the collector's own variables.

==================================  ====================================================  ==================
Variable                            Meaning                                               Default
==================================  ====================================================  ==================
FABRICA_COLLECTOR_ID                This collector's id (the config service assigns PLCs  required
                                    to it): lower case letters, digits and dashes
FABRICA_CONFIG_ADDR                 host:port of the config service                       127.0.0.1:50051
FABRICA_INGEST_ADDR                 host:port of the ingest service                       127.0.0.1:50052
FABRICA_COLLECTOR_LOG_MAX_BYTES     Size limit of the store-and-forward log; above it     268435456 (256 MiB)
                                    the oldest segment is dropped (counted and logged)
FABRICA_COLLECTOR_BATCH_SIZE        Readings per batch sent to ingest (cut when reached)  500
FABRICA_COLLECTOR_BATCH_LATENCY_MS  Longest a reading waits for its batch to be cut      200
                                    while acks are outstanding (none in flight: at once)
FABRICA_COLLECTOR_RECONNECT_MIN     First reconnect delay, seconds (PLCs, config, ingest) 0.5
FABRICA_COLLECTOR_RECONNECT_MAX     Longest reconnect delay, seconds                      30
FABRICA_COLLECTOR_STATUS_INTERVAL   Seconds between ReportCollectorStatus calls           15
FABRICA_COLLECTOR_SERIAL_URL_SCHEMES  pyserial URL schemes a serial port may use, comma   none: only devices
                                    separated (e.g. socket,rfc2217; collector/reach.py)   under /dev/
FABRICA_COLLECTOR_ALLOWED_NETWORKS  CIDRs the PLC hosts must be in (comma separated)      unset: any host
==================================  ====================================================  ==================

The id and the two addresses are the runtime's (``Settings.collector_id``, ``config_addr``, ``ingest_addr``,
which ``fabrica run`` sets for its own stack); the FABRICA_COLLECTOR_* variables are read here, with the
runtime's parsers. Local state (the log, the acknowledged sequence, the last applied configuration) lives
under ``FABRICA_DATA_DIR/collector/<collector id>/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..runtime.settings import Settings, SettingsError, env_float, env_int
from .reach import ReachPolicy, load_reach_policy

ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
DEFAULT_LOG_MAX_BYTES = 256 * 1024 * 1024
#: Where the collector looks for its peers when Settings.config_addr / ingest_addr are not set.
DEFAULT_CONFIG_ADDR = "127.0.0.1:50051"
DEFAULT_INGEST_ADDR = "127.0.0.1:50052"


@dataclass(frozen=True)
class CollectorSettings:
    base: Settings
    collector_id: str
    config_addr: str = DEFAULT_CONFIG_ADDR
    ingest_addr: str = DEFAULT_INGEST_ADDR
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    batch_size: int = 500
    batch_latency: float = 0.2
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    status_interval: float = 15.0
    #: Where a PLC definition may make the collector connect (collector/reach.py).
    reach: ReachPolicy = ReachPolicy()

    @property
    def state_dir(self) -> Path:
        return self.base.data_dir / "collector" / self.collector_id


def _address(name: str, raw: str, default: str) -> str:
    value = raw or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SettingsError(f"{name}={value!r} is not host:port (e.g. 127.0.0.1:50051)")
    return value


def load_collector_settings(base: Settings, env: Mapping[str, str] | None = None) -> CollectorSettings:
    """The collector's settings: its id and peers from `base`, its own variables from `env` (default: the
    process environment)."""
    env = os.environ if env is None else env
    collector_id = base.collector_id
    if not collector_id:
        raise SettingsError(
            "FABRICA_COLLECTOR_ID is required: the id the config service assigns PLCs to (e.g. cell-1)"
        )
    if len(collector_id) > 63 or not ID_PATTERN.match(collector_id):
        raise SettingsError(
            f"FABRICA_COLLECTOR_ID={collector_id!r} must be 1 to 63 lower case letters, digits and dashes, "
            "starting and ending with a letter or digit"
        )
    reconnect_min = env_float(env, "FABRICA_COLLECTOR_RECONNECT_MIN", 0.5, 0.001, 3600)
    reconnect_max = env_float(env, "FABRICA_COLLECTOR_RECONNECT_MAX", 30.0, 0.001, 3600)
    if reconnect_max < reconnect_min:
        raise SettingsError(
            f"FABRICA_COLLECTOR_RECONNECT_MAX={reconnect_max:g} is below FABRICA_COLLECTOR_RECONNECT_MIN={reconnect_min:g}"
        )
    return CollectorSettings(
        base=base,
        collector_id=collector_id,
        config_addr=_address("FABRICA_CONFIG_ADDR", base.config_addr, DEFAULT_CONFIG_ADDR),
        ingest_addr=_address("FABRICA_INGEST_ADDR", base.ingest_addr, DEFAULT_INGEST_ADDR),
        log_max_bytes=env_int(env, "FABRICA_COLLECTOR_LOG_MAX_BYTES", DEFAULT_LOG_MAX_BYTES, 64 * 1024, 2**50),
        # ReadingBatch allows at most 10,000 readings.
        batch_size=env_int(env, "FABRICA_COLLECTOR_BATCH_SIZE", 500, 1, 10_000),
        batch_latency=env_float(env, "FABRICA_COLLECTOR_BATCH_LATENCY_MS", 200, 1, 60_000) / 1000.0,
        reconnect_min=reconnect_min,
        reconnect_max=reconnect_max,
        status_interval=env_float(env, "FABRICA_COLLECTOR_STATUS_INTERVAL", 15.0, 0.05, 86_400),
        reach=load_reach_policy(env),
    )
