"""Admission control for first joins: bounded concurrency, per-CA/per-region rates, a record cache.

Pure building blocks with an injected monotonic clock (seconds), used by
:class:`~jitp.app.service.ProvisioningService`:

* :class:`TokenBucket` - ``rate`` tokens per second, at most ``burst`` stored. Over any interval of
  ``T`` seconds it grants at most ``burst + rate * T`` tokens.
* :class:`KeyedBuckets` - one bucket per key (a CA id, a region), a bounded number of keys.
* :class:`Gate` - at most ``workers`` holders at once and at most ``queue_size`` waiting (FIFO);
  beyond that, or after waiting ``max_wait`` seconds, :class:`~jitp.errors.Overloaded` at once.
* :class:`RecordCache` - admitted device records by device id (checked against the certificate
  fingerprint), LRU-bounded, each entry valid for ``ttl`` seconds, invalidated on lifecycle events.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from jitp import errors
from jitp.domain.records import ADMITTED, DeviceRecord

Monotonic = Callable[[], float]
_EPSILON = 1e-9  # tokens; absorbs float rounding (a client at exactly the rate is never refused)


class TokenBucket:
    """A token bucket that starts full. ``rate`` <= 0 means unlimited."""

    def __init__(self, rate: float, burst: float, *, clock: Monotonic = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self) -> None:
        now = self.clock()
        elapsed = now - self._stamp
        if elapsed > 0:  # a clock that goes back never adds tokens
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now

    def available(self) -> float:
        if self.unlimited:
            return math.inf
        self._refill()
        return self._tokens

    def take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are that many; False (and nothing taken) otherwise."""
        if self.unlimited:
            return True
        self._refill()
        if self._tokens >= n - _EPSILON:
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False

    def retry_after(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0 if they are now)."""
        if self.unlimited:
            return 0.0
        missing = n - self.available()
        return max(0.0, missing / self.rate)


class KeyedBuckets:
    """One :class:`TokenBucket` per key; at most ``max_keys`` kept (least recently used dropped)."""

    def __init__(
        self, rate: float, burst: float, *, clock: Monotonic = time.monotonic, max_keys: int = 10_000
    ) -> None:
        self.rate = rate
        self.burst = burst if burst > 0 else max(1.0, math.ceil(rate))  # 0: one second of joins
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, clock=self.clock)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True)
class RateRefusal:
    scope: str  # "ca:<id>" or "region:<name>"
    retry_after: float


class JoinRates:
    """Per-CA and per-region buckets; a join takes one token from both, or from neither."""

    def __init__(
        self,
        *,
        per_ca_rate: float = 0.0,
        per_ca_burst: float = 0.0,
        per_region_rate: float = 0.0,
        per_region_burst: float = 0.0,
        clock: Monotonic = time.monotonic,
    ) -> None:
        self.per_ca = KeyedBuckets(per_ca_rate, per_ca_burst, clock=clock)
        self.per_region = KeyedBuckets(per_region_rate, per_region_burst, clock=clock)

    def take(self, ca_id: str, region: str) -> RateRefusal | None:
        """Take a token for a first join of ``ca_id`` in ``region``; the refusal if either is exhausted."""
        checks = []
        if not self.per_ca.unlimited:
            checks.append((f"ca:{ca_id}", self.per_ca.bucket(ca_id)))
        if not self.per_region.unlimited:
            checks.append((f"region:{region}", self.per_region.bucket(region)))
        for scope, bucket in checks:
            if bucket.available() < 1.0 - _EPSILON:
                return RateRefusal(scope=scope, retry_after=bucket.retry_after())
        for _, bucket in checks:
            bucket.take()
        return None


class Gate:
    """Bounded concurrency with a bounded FIFO waiting room (the provisioning "worker pool").

    ``queue_size`` 0: no waiting room (refuse as soon as every worker is busy).
    """

    def __init__(self, workers: int, queue_size: int) -> None:
        if workers < 1 or queue_size < 0:
            raise ValueError("a gate needs workers >= 1 and queue_size >= 0")
        self.workers = workers
        self.queue_size = queue_size
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a free slot without waiting (only if nobody is queued before us)."""
        if self.running < self.workers and not self._waiters:
            self.running += 1
            return True
        return False

    async def acquire(self, max_wait: float | None = None) -> None:
        """A slot, after waiting at most ``max_wait`` seconds; else :class:`~jitp.errors.Overloaded`."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self.queue_size:
            raise errors.Overloaded(
                f"provisioning queue full ({self.workers} running, {self.waiting} waiting)", scope="queue"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), max_wait)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise errors.Overloaded(
                    f"no provisioning worker free within {max_wait:g} s", scope="queue"
                ) from None
            raise

    def release(self) -> None:
        """Free a slot: hand it to the first waiter still waiting, else return it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # running stays the same: the slot changes hands
                return
        self.running -= 1


class RecordCache:
    """Admitted device records for registry-free reconnects.

    A hit needs the same device id and certificate fingerprint, an admitted status (active or
    quarantined) and an entry younger than ``ttl`` seconds. ``size`` 0 disables the cache.
    """

    def __init__(self, size: int, ttl: float, *, clock: Monotonic = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, DeviceRecord]] = OrderedDict()

    def get(self, device_id: str, fingerprint: str) -> DeviceRecord | None:
        entry = self._entries.get(device_id)
        if entry is None:
            return None
        stored_at, record = entry
        if self.clock() - stored_at >= self.ttl or record.cert_fingerprint != fingerprint:
            del self._entries[device_id]
            return None
        self._entries.move_to_end(device_id)
        return record

    def put(self, record: DeviceRecord) -> None:
        if self.size <= 0:
            return
        if record.status not in ADMITTED:
            self._entries.pop(record.device_id, None)
            return
        self._entries[record.device_id] = (self.clock(), record)
        self._entries.move_to_end(record.device_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, device_id: str) -> None:
        self._entries.pop(device_id, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._entries
