"""Jittered exponential back-off ("full jitter") for refused or dropped connection attempts."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Retry policy: attempt ``n`` (0-based retry count) sleeps ``uniform(0, min(cap, base * 2**n))``."""

    base: float = 0.5
    cap: float = 30.0
    attempts: int = 8  # total connection attempts per device, the first included

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap <= 0 or self.attempts < 1:
            raise ValueError("backoff needs base > 0, cap > 0 and attempts >= 1")

    def ceiling(self, retry: int) -> float:
        return float(min(self.cap, self.base * 2.0 ** min(retry, 62)))

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        return rng.uniform(0.0, self.ceiling(retry))

    def delays(self, rng: random.Random) -> list[float]:
        """The whole schedule of waits for one device (``attempts - 1`` values)."""
        return [self.delay(i, rng) for i in range(self.attempts - 1)]


NO_RETRY = Backoff(attempts=1)
