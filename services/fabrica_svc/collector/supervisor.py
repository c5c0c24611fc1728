"""Keeps one poller running per enabled PLC of the applied configuration.

Applying a configuration starts pollers for new PLCs, stops those of removed (or disabled) ones, and
restarts only the PLCs whose definition changed. Definitions are compared by their deterministic
serialization without the output-only fields (etag, revision, times), which change on every update even
when nothing the collector uses did, and without the display name, which the poller does not use (renaming
a PLC does not interrupt its polling). A changed PLC is restarted as a whole (new connection, new plan):
simple, and a changed tag can then never be read in its old form.

A PLC's `error_count` counts its failed reads since the collector started (as the contract says), across
restarts of its poller: the supervisor keeps the count of each PLC id it stopped and hands it to the next
poller of that id (after a change, a disable and enable, a removal and return).

Garbage collection. A collector holds many long-lived objects (per tag: its state, its compiled decoder;
per PLC: its definition), and CPython's full collections visit all of them: with 300 PLCs of 100 tags a full
collection takes some 50 ms (measured on the 2-core development VM), a stall of the event loop that shows
as poll lateness. So, with `freeze_gc`, once a configuration is applied (and has stayed unchanged for a
second, so a burst of changes costs one pass) the supervisor collects and then freezes what is left
(gc.freeze: moved to a permanent generation that collections skip). Unfreezing first, each time, lets the
next pass reclaim what a stopped poller left in cycles. gc.freeze acts on the whole process, so it is only
for a collector that has its process to itself (``fabrica serve collector``); when ``fabrica run`` (or a
test) hosts it next to other services, it would freeze their objects too, and is off.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterable
from typing import Any

from fabrica.config.v1 import plc_pb2

from ..runtime.retry import RetryPolicy
from .drivers import BusRegistry, Driver, PlcConfigError, make_driver
from .metrics import PollMetrics
from .mirror import MirrorSet
from .poller import Emit, Poller, PollerStatus
from .reach import ReachPolicy

log = logging.getLogger(__name__)

#: Seconds without configuration changes before the long-lived objects are frozen (see above).
GC_SETTLE_DELAY = 1.0

_OUTPUT_ONLY = ("etag", "revision", "create_time", "update_time")
#: Fields of a PLC that a poller does not use: a change to them alone does not restart it.
_NOT_POLLED = ("display_name",)


def definition_key(plc: plc_pb2.Plc) -> bytes:
    """What a poller is built from: equal keys, no restart."""
    copy = plc_pb2.Plc()
    copy.CopyFrom(plc)
    for name in _OUTPUT_ONLY + _NOT_POLLED:
        copy.ClearField(name)
    return copy.SerializeToString(deterministic=True)


class PlcSupervisor:
    def __init__(self, collector_id: str, emit: Emit, buses: BusRegistry, *, backoff_min: float = 0.5,
                 backoff_max: float = 30.0, metrics: PollMetrics | None = None, freeze_gc: bool = False,
                 poller_options: Callable[[plc_pb2.Plc], dict[str, Any]] | None = None,
                 reach: ReachPolicy | None = None):
        self.collector_id = collector_id
        #: Where a PLC may make it connect (collector/reach.py); None: anywhere (tests of polling alone).
        self.reach = reach
        self.emit = emit
        self.buses = buses
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.metrics = metrics
        #: For tests: extra Poller keyword arguments per PLC (e.g. a clock= and sleep= the test moves).
        self.poller_options = poller_options
        #: The applied configuration: every PLC assigned to this collector, enabled or not.
        self.definitions: dict[str, plc_pb2.Plc] = {}
        self._pollers: dict[str, tuple[bytes, Poller]] = {}
        #: Failed reads of the pollers stopped so far, by PLC id (error_count is since the collector started).
        self._error_counts: dict[str, int] = {}
        self._lock = asyncio.Lock()
        #: PLC ids started, in order (tests and logs use it to see what was restarted).
        self.starts: list[str] = []
        #: Freeze the long-lived objects after each configuration change (see above): only when alone in the process.
        self.freeze_gc = freeze_gc
        #: Collect-and-freeze passes done.
        self.gc_freezes = 0
        self._settle: asyncio.TimerHandle | None = None
        #: The DB mirrors of the applied configuration (collector/mirror.py), brought in line after each change.
        self.mirrors = MirrorSet(self._make_driver, retry=RetryPolicy(backoff_min, backoff_max))

    def _make_driver(self, plc: plc_pb2.Plc) -> Driver:
        if self.reach is not None and (refused := self.reach.violations(plc, "plc")):
            raise PlcConfigError("; ".join(f"{v.field}: {v.description}" for v in refused))
        return make_driver(plc, self.buses)

    @property
    def pollers(self) -> dict[str, Poller]:
        return {plc_id: poller for plc_id, (_, poller) in self._pollers.items()}

    async def apply_snapshot(self, plcs: Iterable[plc_pb2.Plc]) -> None:
        """Make the running set exactly `plcs`."""
        async with self._lock:
            desired = {plc.id: plc for plc in plcs}
            await asyncio.gather(*(self._remove(plc_id) for plc_id in list(self.definitions) if plc_id not in desired))
            for plc in desired.values():
                await self._upsert(plc)
                await asyncio.sleep(0)  # building a poller compiles its tags: let the running ones poll between
            await self.mirrors.apply(self.definitions)
        self._settle_later()

    async def upsert(self, plc: plc_pb2.Plc) -> None:
        async with self._lock:
            await self._upsert(plc)
            await self.mirrors.apply(self.definitions)
        self._settle_later()

    async def remove(self, plc_id: str) -> None:
        async with self._lock:
            await self._remove(plc_id)
            await self.mirrors.apply(self.definitions)
        self._settle_later()

    def _settle_later(self) -> None:
        if not self.freeze_gc:
            return
        if self._settle is not None:
            self._settle.cancel()
        self._settle = asyncio.get_running_loop().call_later(GC_SETTLE_DELAY, self._settle_gc)

    def _settle_gc(self) -> None:
        self._settle = None
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.gc_freezes += 1

    async def _upsert(self, plc: plc_pb2.Plc) -> None:
        if plc.collector_id and plc.collector_id != self.collector_id:
            await self._remove(plc.id)  # assigned elsewhere (a stale local copy): not ours to poll
            return
        self.definitions[plc.id] = plc
        current = self._pollers.get(plc.id)
        if not plc.enabled:
            if current:
                log.info("PLC %s disabled; stopping its poller", plc.id)
                del self._pollers[plc.id]
                await self._stop(current[1])
            return
        key = definition_key(plc)
        if current and current[0] == key:
            return
        if current:
            log.info("PLC %s changed; restarting its poller", plc.id)
            del self._pollers[plc.id]
            await self._stop(current[1])
        poller = Poller(plc, self._make_driver, self.emit, backoff_min=self.backoff_min,
                        backoff_max=self.backoff_max, metrics=self.metrics,
                        **(self.poller_options(plc) if self.poller_options else {}))
        poller.status.error_count = self._error_counts.get(plc.id, 0)
        self._pollers[plc.id] = (key, poller)
        poller.start()
        self.starts.append(plc.id)

    async def _remove(self, plc_id: str) -> None:
        self.definitions.pop(plc_id, None)
        current = self._pollers.pop(plc_id, None)
        if current:
            log.info("PLC %s removed; stopping its poller", plc_id)
            await self._stop(current[1])

    async def _stop(self, poller: Poller) -> None:
        await poller.stop()
        self._error_counts[poller.plc_id] = poller.status.error_count

    async def stop_all(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        async with self._lock:
            pollers = [poller for _, poller in self._pollers.values()]
            self._pollers.clear()
            await asyncio.gather(*(p.stop() for p in pollers), self.mirrors.stop_all())
        if self.gc_freezes:
            gc.unfreeze()  # what the pollers held may be collected again

    def statuses(self) -> list[PollerStatus]:
        """One status per PLC of the applied configuration, by id (disabled ones idle, without error)."""
        out = []
        for plc_id in sorted(self.definitions):
            current = self._pollers.get(plc_id)
            out.append(current[1].status if current else
                       PollerStatus(plc_id, error_count=self._error_counts.get(plc_id, 0)))
        return out
