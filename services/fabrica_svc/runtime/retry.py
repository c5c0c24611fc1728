"""The one retry policy of Fabrica: every reconnect loop (PLC drivers, the collector's config watch and
uplink, production's tag-event consumer, LISTEN connections, the first connection to Postgres) waits with
it, so they all grow, jitter and cap the same way.

A `RetryPolicy` is the documented, immutable description (as temporalio's `RetryConfig`): the first delay,
the growth factor, the cap and the jitter. A `Backoff` is the state of one loop: how many failures in a
row it has seen. Call `next_delay()` (or `await wait()`) after a failure and `reset()` after a success.

Jitter is "equal jitter": the n-th consecutive failure waits a random time in [d·(1-j), d] with
d = min(maximum, initial · multiplier^(n-1)) and j = `jitter` (0.5 by default). Keeping part of the delay
fixed means a dead device is never hammered (full jitter may draw ~0); the random part keeps many clients
that lost the same peer at the same moment (a switch reboot, an ingest restart) from coming back in lockstep.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How a reconnect loop waits: `initial` seconds, times `multiplier` per failure, at most `maximum`."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {self.initial}, {self.maximum}")
        if self.multiplier < 1:
            raise ValueError(f"need multiplier >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"need 0 <= jitter <= 1, got {self.jitter}")

    def ceiling(self, failures: int) -> float:
        """The longest wait after `failures` consecutive failures (1 is the first)."""
        # Cap the exponent: 64 doublings are plenty and keep the float finite however long a peer stays away.
        return min(self.maximum, self.initial * self.multiplier ** min(max(failures - 1, 0), 64))

    def backoff(self, rng: Callable[[], float] = random.random) -> Backoff:
        """A fresh loop state following this policy."""
        return Backoff(self, rng)


#: Peers that come back in seconds (ingest, config, Postgres, a LISTEN connection).
SERVICE_RETRY = RetryPolicy(initial=0.1, maximum=5.0)
#: PLCs and meters: a dead device is retried more gently.
DEVICE_RETRY = RetryPolicy(initial=0.5, maximum=30.0)


class Backoff:
    """The retry state of one loop under a `RetryPolicy`."""

    def __init__(self, policy: RetryPolicy, rng: Callable[[], float] = random.random):
        self.policy = policy
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        """Count a failure and return how long to wait before the next attempt."""
        self.failures += 1
        ceiling = self.policy.ceiling(self.failures)
        return ceiling * (1 - self.policy.jitter) + self._rng() * ceiling * self.policy.jitter

    async def wait(self) -> float:
        """Count a failure and sleep its delay; returns the delay slept."""
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        """A success: the next failure starts from `initial` again."""
        self.failures = 0
