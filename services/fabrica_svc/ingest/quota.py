"""The readings-per-second quota of each tenant: a token bucket per tenant, shared by all its streams.

A tenant's quota (``Tenant.quota.readings_per_second`` in config, read by the TenantDirectory; 0 or
unknown: no quota) is a bucket holding one second's worth of readings (``rate`` tokens), filled at
``rate`` tokens a second. Before a stream's batch is queued for the writer, the stream handler asks
:meth:`TenantQuotas.admit` for the batch's readings:

* the bucket has them: taken, the batch goes on at once;
* it will have them within ``max_delay``: they are reserved now (so the tenant's streams are served in
  the order they asked) and the stream waits that long before the batch goes on. Meanwhile the stream is
  not read, so gRPC flow control slows the collector: backpressure, nothing lost;
* later than that: refused (:class:`~fabrica_svc.runtime.errors.ResourceExhausted` with a QuotaFailure on
  ``tenants/<code>``), nothing reserved. The stream ends after acknowledging what came before; the
  collector keeps the batch in its log and sends it again after ``retry_after_ms`` (ErrorInfo metadata).

A batch larger than the bucket waits until the bucket is full and then takes it all, into debt (the
tokens go below zero), so it is never refused for its size alone, and the rate over time stays the quota.

Only the streams of the tenant over its quota wait: each stream waits in its own handler, before the
shared writer, so no other tenant's stream (nor the writer's queue) is held up.

The bucket is per ingest replica (nothing is shared between replicas): a tenant whose collectors stream to
N replicas may reach N times its quota. A quota change reaches the bucket at the next admission after the
directory read it (within its poll interval): the bucket keeps its tokens, capped to the new capacity.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..runtime.errors import QuotaViolation, ResourceExhausted
from ..runtime.tenants import TenantDirectory


@dataclass
class TokenBucket:
    """`rate` tokens a second, at most `rate` held (one second's worth). Plain arithmetic on the times it
    is given; no clock of its own."""

    rate: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        return cls(rate, rate, now)

    @property
    def capacity(self) -> float:
        return self.rate

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def set_rate(self, rate: float, now: float) -> None:
        self.refill(now)
        self.rate = rate
        self.tokens = min(self.tokens, self.capacity)

    def wait_for(self, n: int, now: float) -> float:
        """Seconds until `n` tokens may be taken (a request above the capacity: until the bucket is full)."""
        self.refill(now)
        need = min(float(n), self.capacity)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def reserve(self, n: int, now: float, max_wait: float) -> float | None:
        """Reserve `n` tokens: the seconds to wait before using them, or None (nothing reserved) when that
        would be longer than `max_wait`."""
        wait = self.wait_for(n, now)
        if wait > max_wait:
            return None
        self.tokens -= n
        return wait


@dataclass
class QuotaStats:
    #: Batches that waited for their tenant's bucket, and the seconds they waited in all.
    delayed_batches: int = 0
    delayed_seconds: float = 0.0
    #: Batches refused with RESOURCE_EXHAUSTED.
    refused_batches: int = 0


class TenantQuotas:
    """The buckets of the tenants with a readings/s quota, on this replica (see the module docstring)."""

    def __init__(self, directory: TenantDirectory, *, max_delay: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] = asyncio.sleep):
        self.directory = directory
        self.max_delay = max_delay
        self.clock = clock
        self._sleep = sleep
        self._buckets: dict[str, TokenBucket] = {}
        #: Over every tenant, and per tenant.
        self.stats = QuotaStats()
        self._stats: dict[str, QuotaStats] = {}

    def stats_of(self, tenant: str) -> QuotaStats:
        """The counters of `tenant`'s streams on this replica."""
        return self._stats.setdefault(tenant, QuotaStats())

    def _bucket(self, tenant: str, now: float) -> TokenBucket | None:
        rate = self.directory.quota(tenant).readings_per_second
        if rate <= 0:
            self._buckets.pop(tenant, None)
            return None
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket.full(rate, now)
        elif bucket.rate != rate:
            bucket.set_rate(rate, now)
        return bucket

    async def admit(self, tenant: str, readings: int, *, sequence: int = 0) -> None:
        """Return when `tenant` may store `readings` more readings (at once, or after waiting its turn);
        ResourceExhausted when that would take longer than `max_delay`."""
        if readings <= 0:
            return
        now = self.clock()
        bucket = self._bucket(tenant, now)
        if bucket is None:
            return
        wait = bucket.reserve(readings, now, self.max_delay)
        if wait is None:
            for stats in (self.stats, self.stats_of(tenant)):
                stats.refused_batches += 1
            raise self._exhausted(tenant, bucket, readings, sequence, bucket.wait_for(readings, now))
        if wait > 0:
            for stats in (self.stats, self.stats_of(tenant)):
                stats.delayed_batches += 1
                stats.delayed_seconds += wait
            await self._sleep(wait)  # type: ignore[misc]

    def _exhausted(self, tenant: str, bucket: TokenBucket, readings: int, sequence: int,
                   retry_after: float) -> ResourceExhausted:
        rate = int(bucket.rate)
        retry_ms = max(1, math.ceil(retry_after * 1000))
        description = (f"tenant {tenant} may store {rate} readings per second; batch {sequence} ({readings} readings) "
                       f"would wait {retry_after:.1f} s for its turn, more than {self.max_delay:g} s")
        return ResourceExhausted(
            f"{description}: nothing of it was stored; send it again in {retry_ms} ms",
            quota_violations=[QuotaViolation(subject=f"tenants/{tenant}", description=description)],
            reason="QUOTA_EXCEEDED",
            metadata={"quota": "readings_per_second", "limit": str(rate), "retry_after_ms": str(retry_ms),
                      "tenant": tenant, "sequence": str(sequence)},
        )


__all__ = ["QuotaStats", "TenantQuotas", "TokenBucket"]
