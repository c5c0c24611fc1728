"""The collector's OpenTelemetry metrics (exported on the runtime's Prometheus endpoint).

Instruments are created once per process: the SDK hands out one instrument per name, and an observable
gauge created twice keeps only its first callbacks. The observable ones therefore read every live
collector of the process from a weak registry (tests and `fabrica run` may host several in one process).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from fabrica.collector.v1.collector_service_pb2 import DropReason
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .spool import Spool


@dataclass(frozen=True)
class SpoolFigures:
    """What the log's gauges and counters show."""

    backlog_readings: int
    backlog_bytes: int
    #: Age of the oldest unacknowledged reading in seconds (0 when none).
    oldest_age: float
    #: Readings dropped since the log was created, by DropReason.
    dropped: Mapping[int, int]
    rejected_batches: int
    #: Batches ingest acknowledged as duplicates the first time they were sent (another writer).
    suspicious_duplicates: int = 0

    @classmethod
    def of(cls, spool: Spool) -> SpoolFigures:
        return cls(spool.backlog_readings, spool.disk_bytes, age_of(spool.oldest_unacked_ns()), dict(spool.dropped),
                   spool.rejected_batches, spool.suspicious_duplicates)


@dataclass(frozen=True)
class CollectorFigures:
    """What the uplink's, the configuration's and the PLCs' gauges show."""

    uplink_connected: bool = False
    readings_sent: int = 0
    batches_written: int = 0
    batches_duplicate: int = 0
    config_connected: bool = False
    config_revision: int = 0
    #: plc_id -> (connected, wall clock of the last good block read in seconds (0: none), shortest poll
    #: interval of its groups in seconds).
    plcs: Mapping[str, tuple[bool, float, float]] = None  # type: ignore[assignment]


def _collector(values: Callable[[CollectorFigures], Iterable[tuple[float, dict[str, str]]]]) -> object:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for source in list(_sources):
            figures_of = getattr(source, "collector_figures", None)
            if figures_of is None:
                continue
            try:
                figures = figures_of()
            except Exception:  # a collector starting or shutting down; skip it this time
                continue
            for value, attributes in values(figures):
                yield Observation(value, {"collector_id": source.collector_id, **attributes})

    return callback


class SpoolView(Protocol):
    collector_id: str

    def spool_figures(self) -> SpoolFigures:
        ...


_lock = threading.Lock()
_sources: weakref.WeakSet[SpoolView] = weakref.WeakSet()
_instruments: dict[str, object] = {}
#: Bucket bounds in seconds (the SDK's default bounds suit milliseconds).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def reason_label(reason: int) -> str:
    """The `reason` attribute of a DropReason: DROP_REASON_SPOOL_FULL is "spool_full"."""
    return DropReason.Name(reason).removeprefix("DROP_REASON_").lower()


def _observe(values: Callable[[SpoolFigures], Iterable[tuple[float, dict[str, str]]]]) -> object:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for source in list(_sources):
            try:
                figures = source.spool_figures()
            except Exception:  # a collector shutting down; skip it this time
                continue
            for value, attributes in values(figures):
                yield Observation(value, {"collector_id": source.collector_id, **attributes})

    return callback


def _one(field: str) -> Callable[[SpoolFigures], Iterable[tuple[float, dict[str, str]]]]:
    return lambda figures: [(getattr(figures, field), {})]


def _setup() -> dict[str, object]:
    with _lock:
        if _instruments:
            return _instruments
        meter = metrics.get_meter("fabrica.collector")
        _instruments["lateness"] = meter.create_histogram(
            "fabrica_collector_poll_lateness", unit="s", explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            description="How late a poll started after its tick, by PLC")
        _instruments["skipped"] = meter.create_counter(
            "fabrica_collector_poll_ticks_skipped", description="Poll ticks skipped because a poll overran")
        _instruments["reads"] = meter.create_counter(
            "fabrica_collector_block_reads", description="Block reads, by PLC and outcome (ok, device_error, "
            "communication_error)")
        _instruments["read_duration"] = meter.create_histogram(
            "fabrica_collector_block_read_duration", unit="s", explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
            description="Duration of one block read, by PLC")
        _instruments["readings"] = meter.create_counter(
            "fabrica_collector_readings", description="Readings reported, by quality")
        meter.create_observable_gauge(
            "fabrica_collector_backlog_readings", callbacks=[_observe(_one("backlog_readings"))],
            description="Readings in the store-and-forward log not yet acknowledged by ingest")
        meter.create_observable_gauge(
            "fabrica_collector_backlog_bytes", unit="By", callbacks=[_observe(_one("backlog_bytes"))],
            description="Bytes of the store-and-forward log on disk")
        meter.create_observable_gauge(
            "fabrica_collector_backlog_oldest_age", unit="s", callbacks=[_observe(_one("oldest_age"))],
            description="Age of the oldest unacknowledged reading (0 when none)")
        meter.create_observable_counter(
            "fabrica_collector_dropped_readings",
            callbacks=[_observe(lambda f: [(n, {"reason": reason_label(r)}) for r, n in f.dropped.items()])],
            description="Readings dropped without reaching ingest since the log was created, by reason: spool_full "
            "(the log's size limit, oldest first), rejected_by_ingest (a batch set aside), disk_error (an append "
            "the disk refused)")
        meter.create_observable_counter(
            "fabrica_collector_rejected_batches", callbacks=[_observe(_one("rejected_batches"))],
            description="Batches ingest rejected for good and the collector set aside, since the log was created")
        meter.create_observable_counter(
            "fabrica_collector_suspicious_duplicates", callbacks=[_observe(_one("suspicious_duplicates"))],
            description="Batches ingest acknowledged as duplicates the first time the collector sent them (another "
            "writer uses its collector id; their readings were most likely not stored), since the log was created")
        meter.create_observable_gauge(
            "fabrica_collector_uplink_connected", callbacks=[_collector(lambda f: [(int(f.uplink_connected), {})])],
            description="1 while the collector's stream to ingest is open (ingest answered its resume)")
        meter.create_observable_counter(
            "fabrica_collector_readings_sent", callbacks=[_collector(lambda f: [(f.readings_sent, {})])],
            description="Readings ingest acknowledged as stored, since the collector started")
        meter.create_observable_counter(
            "fabrica_collector_batches_acknowledged",
            callbacks=[_collector(lambda f: [(f.batches_written, {"outcome": "written"}),
                                             (f.batches_duplicate, {"outcome": "duplicate"})])],
            description="Batches ingest acknowledged since the collector started, by outcome (written, duplicate); "
            "refused ones are fabrica_collector_rejected_batches")
        meter.create_observable_gauge(
            "fabrica_collector_config_connected", callbacks=[_collector(lambda f: [(int(f.config_connected), {})])],
            description="1 while the collector follows the configuration (WatchPlcs open)")
        meter.create_observable_gauge(
            "fabrica_collector_config_revision_applied",
            callbacks=[_collector(lambda f: [(f.config_revision, {})])],
            description="The configuration revision the collector applied (0: none yet)")
        meter.create_observable_gauge(
            "fabrica_collector_plc_connected",
            callbacks=[_collector(lambda f: [(int(c), {"plc_id": p}) for p, (c, _, _) in (f.plcs or {}).items()])],
            description="1 while the collector has a working connection to the PLC, by PLC")
        meter.create_observable_gauge(
            "fabrica_collector_last_good_read_timestamp", unit="s",
            callbacks=[_collector(lambda f: [(t, {"plc_id": p}) for p, (_, t, _) in (f.plcs or {}).items() if t])],
            description="Unix time of the PLC's last successful block read, by PLC")
        meter.create_observable_gauge(
            "fabrica_collector_poll_interval", unit="s",
            callbacks=[_collector(lambda f: [(i, {"plc_id": p}) for p, (_, _, i) in (f.plcs or {}).items() if i])],
            description="The PLC's shortest poll interval, by PLC")
        return _instruments


class PollMetrics:
    """What pollers record; one per collector."""

    def __init__(self) -> None:
        inst = _setup()
        self.lateness = inst["lateness"]
        self.skipped = inst["skipped"]
        self.reads = inst["reads"]
        self.read_duration = inst["read_duration"]
        self.readings = inst["readings"]


def register_spool(source: SpoolView) -> None:
    _setup()
    _sources.add(source)


def unregister_spool(source: SpoolView) -> None:
    _sources.discard(source)


def age_of(oldest_ns: int | None) -> float:
    return 0.0 if not oldest_ns else max(0.0, time.time() - oldest_ns / 1e9)
