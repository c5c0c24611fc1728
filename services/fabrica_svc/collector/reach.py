"""Where the collector may connect: the one check before any driver is made from a PLC definition.

A PLC definition names where to connect (a host, or a serial port), and whoever writes one (CreatePlc in
config, or ProbePlc / PreviewDecode / PreviewPlc / ProbeMirror on the collector itself) chooses it. The
collector refuses, before connecting anywhere:

- a serial port that is not a device under ``/dev/`` (after resolving ``..`` and symbolic links; not
  ``/dev/fd/``, ``/dev/std*`` and the like, which are open files of the process), e.g. a local file path;
- a pyserial URL (``socket://``, ``rfc2217://``, ``loop://``, ...) whose scheme is not in
  FABRICA_COLLECTOR_SERIAL_URL_SCHEMES (default: none);
- with FABRICA_COLLECTOR_ALLOWED_NETWORKS set (CIDRs, comma separated), a host (of a TCP connection, or in
  an allowed serial URL) that is not an IP address inside one of them; host names are refused then, since
  what a name resolves to may change between the check and the connection.

The admin RPCs answer INVALID_ARGUMENT with a field violation naming the field; a configured PLC that is
refused reads as QUALITY_CONFIG_ERROR with the same words (the poller's PlcConfigError).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fabrica.config.v1 import plc_pb2

from ..runtime.errors import FieldViolation
from ..runtime.settings import SettingsError

#: Files under /dev that are no serial line: the process's own open files, memory, and pseudo devices.
_NOT_LINES = frozenset({"/dev/stdin", "/dev/stdout", "/dev/stderr", "/dev/tty", "/dev/console", "/dev/null",
                        "/dev/zero", "/dev/random", "/dev/urandom", "/dev/full", "/dev/mem", "/dev/kmem",
                        "/dev/port", "/dev/kmsg", "/dev/ptmx"})
_NOT_LINE_FOLDERS = ("/dev/fd/", "/dev/shm/", "/dev/mqueue/", "/dev/hugepages/")
_SCHEME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789+-.")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ReachPolicy:
    """The collector's limits on where a PLC definition may make it connect (see the module's docstring)."""

    serial_url_schemes: frozenset[str] = frozenset()
    #: Empty: any host.
    networks: tuple[Network, ...] = field(default_factory=tuple)

    def violations(self, plc: plc_pb2.Plc, path: str) -> list[FieldViolation]:
        """What in `plc` (at field path `path`, e.g. ``plc``) points where the collector may not connect."""
        kind = plc.WhichOneof("connection")
        if kind is None:
            return []
        connection = getattr(plc, kind)
        where = f"{path}.{kind}"
        if kind == "modbus_rtu":
            return self._serial(connection.serial_port, f"{where}.serial_port")
        return self._host(connection.host, f"{where}.host")

    def _serial(self, port: str, where: str) -> list[FieldViolation]:
        if "://" in port:
            scheme = port.split("://", 1)[0].lower()
            allowed = ", ".join(sorted(self.serial_url_schemes)) or "none"
            if scheme not in self.serial_url_schemes:
                return [FieldViolation(where, f"the pyserial URL scheme {scheme}:// is not allowed on this collector "
                                              f"(FABRICA_COLLECTOR_SERIAL_URL_SCHEMES: {allowed})")]
            try:
                host = urlsplit(port).hostname
            except ValueError:
                host = None
            return self._host(host, where) if host else []
        if not _is_line(port):
            return [FieldViolation(where, "must be a serial device under /dev/ (e.g. /dev/ttyUSB0); "
                                          f"{port!r} is not one")]
        return []

    def _host(self, host: str, where: str) -> list[FieldViolation]:
        if not self.networks:
            return []
        allowed = ", ".join(str(n) for n in self.networks)
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return [FieldViolation(where, f"must be an IP address in the collector's allowed networks ({allowed}; "
                                          "FABRICA_COLLECTOR_ALLOWED_NETWORKS): host names are not accepted")]
        if not any(address in n for n in self.networks):
            return [FieldViolation(where, f"{address} is outside the collector's allowed networks ({allowed}; "
                                          "FABRICA_COLLECTOR_ALLOWED_NETWORKS)")]
        return []


def _is_line(port: str) -> bool:
    """`port` names a character device under /dev/ (or one not there yet: an adapter plugged in later), both
    as written and with its symbolic links resolved, and none of the process's own or pseudo devices. Only
    looks at names and file metadata: nothing is opened."""
    if not port.startswith("/"):
        return False
    for name in (os.path.normpath(port), os.path.realpath(port)):
        if not name.startswith("/dev/") or name in _NOT_LINES or name.startswith(_NOT_LINE_FOLDERS):
            return False
    try:
        mode = os.stat(port).st_mode
    except OSError:
        return True  # not there (yet): opening it fails as a communication error, like an unplugged adapter
    return stat.S_ISCHR(mode)


def load_reach_policy(env: Mapping[str, str]) -> ReachPolicy:
    """FABRICA_COLLECTOR_SERIAL_URL_SCHEMES and FABRICA_COLLECTOR_ALLOWED_NETWORKS; SettingsError names a bad one."""
    schemes: set[str] = set()
    raw = env.get("FABRICA_COLLECTOR_SERIAL_URL_SCHEMES") or ""
    for item in (s.strip().lower().removesuffix("://") for s in raw.split(",")):
        if not item:
            continue
        if not set(item) <= _SCHEME_OK:
            raise SettingsError(f"FABRICA_COLLECTOR_SERIAL_URL_SCHEMES={raw!r}: {item!r} is not a URL scheme "
                                "(e.g. socket,rfc2217)")
        schemes.add(item)
    networks: list[Network] = []
    raw = env.get("FABRICA_COLLECTOR_ALLOWED_NETWORKS") or ""
    for item in (s.strip() for s in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SettingsError(f"FABRICA_COLLECTOR_ALLOWED_NETWORKS={raw!r}: {item!r} is not a network "
                                "(e.g. 10.20.0.0/16,192.168.10.0/24)") from None
    return ReachPolicy(frozenset(schemes), tuple(networks))
