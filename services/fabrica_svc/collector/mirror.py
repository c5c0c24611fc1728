"""DB mirrors: raw copies of a block of one S7 PLC's memory to another, every interval (the edge seed's DB mirror).

A mirror is defined on its source PLC (``Plc.mirrors``) and run by the collector that polls the source; the
target must be an S7 PLC of the same collector with ``writable`` set (no PLC is written otherwise). Each
mirror has its own two connections (one to each PLC), apart from the pollers'.

What a running mirror guarantees:

* Before the first write it probes the target: reads the target range once. A target that refuses that read
  (a DB smaller than the range, or no such DB) refuses the mirror for good (``refused_reason`` in the status;
  a new definition tries again): it never writes. A target that cannot be reached is retried; nothing is
  written before the probe succeeds.
* Each cycle reads the whole source range and, only if that read returned exactly ``size`` bytes, writes them
  to the target in one write request sequence. A cycle whose source read fails writes nothing (never stale or
  partial bytes) and counts as skipped; the last error of each side is kept until a good read / write.
* A connection that fails is dropped and opened again on a later cycle, after a backoff (runtime/retry.py).
* A range larger than one PDU (about 200 bytes) is read, and written, in several requests (snap7 splits it):
  the copy is then not one consistent snapshot of the source, and a target lost in the middle of a write may
  hold part of a cycle's bytes until the next good cycle. Ranges within one PDU are one request each way.

The checks that need no device (the source and the target are S7 PLCs, the target is writable and on this
collector, ranges of one PLC do not overlap) are :func:`refusal`; the config service checks the same when the
mirror is defined, except the target's size, which only a device can tell: the collector's ProbeMirror RPC
(:func:`probe`) is the dry run that tells it, and shows the bytes a cycle would write, before the mirror is saved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fabrica.config.v1 import plc_pb2

from ..plcmodel.mirrors import mirror_problems
from ..plcmodel.plc import is_s7
from ..runtime.retry import RetryPolicy
from ..runtime.tasks import cancel_and_wait
from .drivers import CommunicationError, DeviceError, Driver, PlcConfigError, S7Driver, s7_range_name

log = logging.getLogger(__name__)

MakeDriver = Callable[[plc_pb2.Plc], Driver]


def range_name(r: plc_pb2.S7Range, size: int) -> str:
    return s7_range_name(r.area, r.db_number, r.byte_offset, size)


def refusal(source: plc_pb2.Plc, mirror: plc_pb2.Mirror, target: plc_pb2.Plc | None) -> str | None:
    """Why `mirror` of `source` cannot run with `target` (None: no such PLC on this collector), judged from the
    definitions alone (plcmodel's rules, the ones config checks); None when it can."""
    problems = mirror_problems(source, mirror, source if mirror.target_plc_id == source.id else target)
    return "; ".join(description for _, description in problems) or None


# ------------------------------------------------------------------------------------------------- probe


@dataclass
class ProbeResult:
    source_bytes: bytes = b""
    target_bytes: bytes = b""
    source_error: str = ""
    target_error: str = ""

    @property
    def ok(self) -> bool:
        return not self.source_error and not self.target_error


async def _read(driver: Driver, r: plc_pb2.S7Range, size: int) -> bytes:
    assert isinstance(driver, S7Driver)
    if not driver.connected:
        await driver.connect()
    return await driver.read_range(r.area, r.db_number, r.byte_offset, size)


def _too_small(target: plc_pb2.Plc, mirror: plc_pb2.Mirror, exc: DeviceError) -> str:
    return (f"target PLC {target.id} refuses {range_name(mirror.target, mirror.size)} (the block is smaller than "
            f"the {mirror.size}-byte range, or missing): {exc}")


async def probe(source: plc_pb2.Plc, target: plc_pb2.Plc, mirror: plc_pb2.Mirror,
                make_driver: MakeDriver) -> ProbeResult:
    """A dry run: read the source range and the target range once each, write nothing."""
    out = ProbeResult()
    for field, description in mirror_problems(source, mirror, target):
        side = "target" if field.startswith("target") else "source"
        joined = getattr(out, f"{side}_error")
        setattr(out, f"{side}_error", f"{joined}; {description}" if joined else description)
    for side, plc, r in (("source", source, mirror.source), ("target", target, mirror.target)):
        if getattr(out, f"{side}_error"):
            continue
        try:
            driver = make_driver(plc)
        except PlcConfigError as exc:
            setattr(out, f"{side}_error", str(exc))
            continue
        try:
            setattr(out, f"{side}_bytes", await _read(driver, r, mirror.size))
        except CommunicationError as exc:
            setattr(out, f"{side}_error", str(exc))
        except DeviceError as exc:
            setattr(out, f"{side}_error", _too_small(target, mirror, exc) if side == "target" else str(exc))
        finally:
            await driver.dispose()
    return out


# ------------------------------------------------------------------------------------------------ runner


@dataclass
class MirrorStatus:
    plc_id: str
    name: str
    target_plc_id: str
    running: bool = False
    refused_reason: str = ""
    copies: int = 0
    bytes_copied: int = 0
    skipped_cycles: int = 0
    last_source_error: str = ""
    last_target_error: str = ""
    #: Wall-clock ns of the last completed copy (0: none yet).
    last_copy_ns: int = 0


class MirrorRunner:
    """Runs one mirror until stopped (see the module's docstring for what a cycle does)."""

    def __init__(self, source: plc_pb2.Plc, mirror: plc_pb2.Mirror, target: plc_pb2.Plc, make_driver: MakeDriver,
                 *, retry: RetryPolicy):
        self.source, self.mirror, self.target = source, mirror, target
        self.status = MirrorStatus(source.id, mirror.name, mirror.target_plc_id)
        self._make_driver = make_driver
        self._retry = retry
        self._interval = max(mirror.interval.ToTimedelta().total_seconds(), 0.01)
        self._task: asyncio.Task | None = None
        self._drivers: dict[str, Driver] = {}

    def start(self) -> None:
        self.status.running = True
        self._task = asyncio.create_task(self._run(), name=f"mirror {self.source.id}/{self.mirror.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        for driver in self._drivers.values():
            await driver.dispose()
        self._drivers.clear()
        self.status.running = False

    def _driver(self, side: str) -> Driver:
        if side not in self._drivers:
            self._drivers[side] = self._make_driver(self.source if side == "source" else self.target)
        return self._drivers[side]

    async def _run(self) -> None:
        status, m = self.status, self.mirror
        backoff = self._retry.backoff()
        # The probe: nothing is written before the target has shown it holds the whole range.
        while True:
            try:
                await _read(self._driver("target"), m.target, m.size)
                status.last_target_error = ""
                break
            except DeviceError as exc:
                status.refused_reason = _too_small(self.target, m, exc)
                status.running = False
                log.warning("mirror %s/%s refused: %s", self.source.id, m.name, status.refused_reason)
                return
            except CommunicationError as exc:
                status.last_target_error = str(exc)
                await self._driver("target").close()
                await asyncio.sleep(max(self._interval, backoff.next_delay()))
        backoff.reset()
        next_at = time.monotonic()
        while True:
            delay = await self._cycle()
            next_at += self._interval
            now = time.monotonic()
            if next_at < now:  # late (a slow device): the missed cycles are not made up
                next_at = now
            if delay:
                next_at = max(next_at, now + backoff.next_delay())
            else:
                backoff.reset()
            await asyncio.sleep(next_at - now)

    async def _cycle(self) -> bool:
        """One copy; True when a connection failed (the next cycle waits for the backoff)."""
        status, m = self.status, self.mirror
        try:
            data = await _read(self._driver("source"), m.source, m.size)
        except (CommunicationError, DeviceError) as exc:
            status.skipped_cycles += 1
            status.last_source_error = str(exc)
            if isinstance(exc, CommunicationError):
                await self._driver("source").close()
                return True
            return False
        status.last_source_error = ""
        target = self._driver("target")
        try:
            if not target.connected:
                await target.connect()
            assert isinstance(target, S7Driver)
            await target.write_range(m.target.area, m.target.db_number, m.target.byte_offset, data)
        except (CommunicationError, DeviceError) as exc:
            status.last_target_error = str(exc)
            if isinstance(exc, CommunicationError):
                await target.close()
                return True
            return False
        status.last_target_error = ""
        status.copies += 1
        status.bytes_copied += len(data)
        status.last_copy_ns = time.time_ns()
        return False


# --------------------------------------------------------------------------------------------------- set


def _key(source: plc_pb2.Plc, mirror: plc_pb2.Mirror, target: plc_pb2.Plc | None) -> bytes:
    """What a running mirror depends on: its definition, both connections, the target's writable flag."""
    parts = [mirror.SerializeToString(deterministic=True),
             source.s7.SerializeToString(deterministic=True) if is_s7(source) else source.id.encode()]
    if target is not None:
        parts += [target.s7.SerializeToString(deterministic=True) if is_s7(target) else target.id.encode(),
                  b"w" if target.writable else b"-"]
    return b"\0".join(parts)


class MirrorSet:
    """The mirrors of the applied configuration: one runner per mirror of an enabled source PLC."""

    def __init__(self, make_driver: MakeDriver, *, retry: RetryPolicy):
        self._make_driver = make_driver
        self._retry = retry
        self._runners: dict[tuple[str, str], tuple[bytes, MirrorRunner | None, MirrorStatus]] = {}

    async def apply(self, definitions: Mapping[str, plc_pb2.Plc]) -> None:
        """Start, restart and stop runners so that exactly the mirrors in `definitions` run."""
        wanted: dict[tuple[str, str], tuple[plc_pb2.Plc, plc_pb2.Mirror, plc_pb2.Plc | None]] = {}
        for plc in definitions.values():
            if plc.enabled:
                for mirror in plc.mirrors:
                    wanted[(plc.id, mirror.name)] = (plc, mirror, definitions.get(mirror.target_plc_id))
        for key in [k for k in self._runners if k not in wanted]:
            await self._stop(key)
        for key, (source, mirror, target) in wanted.items():
            fingerprint = _key(source, mirror, target)
            current = self._runners.get(key)
            if current is not None and current[0] == fingerprint:
                continue
            await self._stop(key)
            status = MirrorStatus(source.id, mirror.name, mirror.target_plc_id)
            why = refusal(source, mirror, target)
            if why or not mirror.enabled:
                status.refused_reason = why or ""
                if why:
                    log.warning("mirror %s/%s refused: %s", source.id, mirror.name, why)
                self._runners[key] = (fingerprint, None, status)
                continue
            assert target is not None
            runner = MirrorRunner(source, mirror, target, self._make_driver, retry=self._retry)
            runner.start()
            self._runners[key] = (fingerprint, runner, runner.status)

    async def _stop(self, key: tuple[str, str]) -> None:
        current = self._runners.pop(key, None)
        if current is not None and current[1] is not None:
            await current[1].stop()

    async def stop_all(self) -> None:
        await asyncio.gather(*(self._stop(key) for key in list(self._runners)))

    def statuses(self) -> list[MirrorStatus]:
        return [status for _, (_, _, status) in sorted(self._runners.items())]

    def runners(self) -> Iterable[MirrorRunner]:
        return (runner for _, runner, _ in self._runners.values() if runner is not None)
