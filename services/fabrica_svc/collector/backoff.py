"""Exponential backoff with jitter, for reconnecting to PLCs, the config service and ingest."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays that double from `initial` up to `maximum`, with "equal jitter".

    The n-th consecutive failure waits a random time in [d/2, d] with d = min(maximum, initial * 2**(n-1)).
    Half of the delay is kept fixed so that a dead device is never hammered (full jitter may draw ~0),
    the other half is random so that many clients that lost the same peer at the same moment (a switch
    reboot, an ingest restart) do not come back in lockstep.
    """

    def __init__(self, initial: float, maximum: float, rng: Callable[[], float] = random.random):
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        self.failures += 1
        # Cap the exponent: 2**64 is plenty and keeps the float finite however long a device stays away.
        ceiling = min(self.maximum, self.initial * 2.0 ** min(self.failures - 1, 64))
        return ceiling / 2 + self._rng() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0
