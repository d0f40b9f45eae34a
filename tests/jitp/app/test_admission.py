"""Admission control: token buckets (deterministic clock), the bounded gate, the record cache,
and the service's use of them (first joins shed with Overloaded, cached reconnects registry-free)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitp import errors
from jitp.app.admission import Gate, JoinRates, KeyedBuckets, RecordCache, TokenBucket
from jitp.app.service import PeerCredentials, ProvisioningService
from jitp.config import AdmissionConfig, ConfigError, load_config
from jitp.domain.audit import AuditDraft
from jitp.domain.records import Command, DeviceRecord, DeviceStatus
from jitp.registry.sqlite import SQLiteRegistry
from jitp.trust import TrustAnchor
from tests.helpers import Pki, wait_until_async


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- TokenBucket --------------------------------------------------------------------------------
def test_bucket_starts_full_then_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.take() and not bucket.take()
    clock.advance(100)
    assert bucket.available() == 3  # never more than the burst


def test_unlimited_bucket_always_grants() -> None:
    bucket = TokenBucket(0, 0, clock=FakeClock())
    assert all(bucket.take() for _ in range(10_000)) and bucket.retry_after() == 0


def test_a_clock_going_back_adds_no_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1.0, 1, clock=clock)
    assert bucket.take()
    clock.advance(-50)
    assert not bucket.take()
    clock.advance(50.5)  # back where it was, plus half a token's time
    assert not bucket.take()
    clock.advance(0.5)
    assert bucket.take()


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.01, max_value=1000),
    burst=st.integers(1, 100),
    steps=st.lists(st.tuples(st.floats(min_value=0, max_value=5), st.integers(0, 20)), max_size=60),
)
def test_bucket_never_grants_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock)
    granted, elapsed = 0, 0.0
    for dt, attempts in steps:
        clock.advance(dt)
        elapsed += dt
        granted += sum(bucket.take() for _ in range(attempts))
        assert granted <= burst + rate * elapsed + 1e-6
        assert 0 <= bucket.available() <= burst


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(min_value=0.1, max_value=100), burst=st.integers(1, 50))
def test_a_steady_client_at_the_rate_is_never_refused(rate: float, burst: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock)
    for _ in range(200):
        assert bucket.take()
        clock.advance(1 / rate)


def test_keyed_buckets_are_independent_and_bounded() -> None:
    clock = FakeClock()
    buckets = KeyedBuckets(1.0, 2, clock=clock, max_keys=3)
    assert buckets.bucket("a").take() and buckets.bucket("a").take() and not buckets.bucket("a").take()
    assert buckets.bucket("b").take()
    for key in "cdef":
        buckets.bucket(key)
    assert len(buckets) == 3
    assert KeyedBuckets(2.5, 0, clock=clock).burst == 3  # 0: one second's worth, rounded up


def test_join_rates_take_from_both_or_neither() -> None:
    clock = FakeClock()
    rates = JoinRates(per_ca_rate=1, per_ca_burst=5, per_region_rate=1, per_region_burst=2, clock=clock)
    assert rates.take("ca1", "eu") is None and rates.take("ca1", "eu") is None
    refusal = rates.take("ca1", "eu")
    assert refusal is not None and refusal.scope == "region:eu" and refusal.retry_after == pytest.approx(1)
    # The region refusal did not burn a CA token: ca1 still has 3, usable in another region.
    assert [rates.take("ca1", "us") for _ in range(2)] == [None, None]
    assert rates.take("ca1", "ap") is None  # ca1's fifth token
    refusal = rates.take("ca1", "ap")
    assert refusal is not None and refusal.scope == "ca:ca1"
    assert rates.take("ca2", "ap") is None  # another CA is unaffected
    assert JoinRates(clock=clock).take("x", "y") is None  # all unlimited


# -- Gate ---------------------------------------------------------------------------------------
def test_gate_bounds_running_and_waiting_and_hands_over_in_order() -> None:
    async def go() -> None:
        gate = Gate(workers=2, queue_size=2)
        await gate.acquire()
        await gate.acquire()
        order: list[int] = []

        async def waiter(i: int) -> None:
            await gate.acquire()
            order.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
        # Deterministic: one pass of the loop runs both new tasks up to their wait on the gate
        # (no I/O involved); sleep(0) only yields to it.
        await asyncio.sleep(0)
        assert gate.running == 2 and gate.waiting == 2
        with pytest.raises(errors.Overloaded) as exc:
            await gate.acquire()
        assert exc.value.scope == "queue" and exc.value.reason == "overloaded"
        assert isinstance(exc.value, errors.Unavailable) and not isinstance(exc.value, errors.Refused)
        gate.release()
        await tasks[0]
        assert order == [0] and gate.running == 2 and gate.waiting == 1
        gate.release()
        await tasks[1]
        assert order == [0, 1]
        gate.release()
        gate.release()
        assert gate.running == 0 and gate.waiting == 0

    asyncio.run(go())


def test_gate_wait_times_out_with_overloaded_and_leaves_no_waiter() -> None:
    async def go() -> None:
        gate = Gate(workers=1, queue_size=5)
        await gate.acquire()
        with pytest.raises(errors.Overloaded, match="within 0 s"):
            await gate.acquire(0)
        assert gate.waiting == 0
        gate.release()
        assert gate.running == 0
        assert gate.try_acquire()

    asyncio.run(go())


def test_gate_without_waiting_room_refuses_when_busy() -> None:
    async def go() -> None:
        gate = Gate(workers=1, queue_size=0)
        await gate.acquire()
        with pytest.raises(errors.Overloaded):
            await gate.acquire()
        gate.release()
        await gate.acquire()

    asyncio.run(go())


def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def go() -> None:
        gate = Gate(workers=1, queue_size=3)
        await gate.acquire()
        task = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)  # deterministic: yields once, so the task queues up on the gate
        gate.release()  # hands the slot to the waiter...
        task.cancel()  # ...which is cancelled before it resumes: the slot must come back
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.running == 0 and gate.waiting == 0

    asyncio.run(go())


@settings(max_examples=100, deadline=None)
@given(
    workers=st.integers(1, 4),
    queue_size=st.integers(0, 4),
    ops=st.lists(st.sampled_from(["acquire", "release"]), max_size=40),
)
def test_gate_invariants(workers: int, queue_size: int, ops: list[str]) -> None:
    async def go() -> None:
        gate = Gate(workers, queue_size)
        held = 0
        pending: list[asyncio.Task[None]] = []
        for op in ops:
            if op == "acquire":
                task = asyncio.create_task(gate.acquire())
                # Deterministic yields, not a wait: a free slot or a full queue settles the task
                # within a pass or two of the loop; otherwise it stays queued, which is the point.
                for _ in range(10):
                    await asyncio.sleep(0)
                if task.done():
                    if task.exception() is None:
                        held += 1
                    else:
                        assert isinstance(task.exception(), errors.Overloaded)
                        assert gate.waiting == queue_size
                else:
                    pending.append(task)
            elif held:
                gate.release()
                held -= 1
                for _ in range(10):  # deterministic yields: a waiter handed the slot resumes
                    await asyncio.sleep(0)
                for t in [t for t in pending if t.done()]:
                    pending.remove(t)
                    held += 1
            assert gate.running == held <= workers
            assert gate.waiting == len(pending) <= queue_size
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(go())


# -- RecordCache --------------------------------------------------------------------------------
def _record(
    device_id: str = "d1", fingerprint: str = "f1", status: DeviceStatus = DeviceStatus.ACTIVE
) -> DeviceRecord:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return DeviceRecord(
        device_id=device_id,
        status=status,
        cert_fingerprint=fingerprint,
        ca_id="ca",
        region="default",
        serial="01",
        subject=f"CN={device_id}",
        not_after=now + timedelta(days=365),
        provisioned_at=now,
        last_seen=now,
    )


def test_cache_hits_only_the_same_certificate_while_fresh() -> None:
    clock = FakeClock()
    cache = RecordCache(10, 60, clock=clock)
    cache.put(_record())
    assert cache.get("d1", "f1") is not None
    assert cache.get("d1", "other") is None and "d1" not in cache  # another certificate: dropped
    cache.put(_record())
    clock.advance(60)
    assert cache.get("d1", "f1") is None  # expired


def test_cache_keeps_only_admitted_records_and_is_bounded() -> None:
    cache = RecordCache(2, 60, clock=FakeClock())
    cache.put(_record("a"))
    cache.put(dataclasses.replace(_record("a"), status=DeviceStatus.REVOKED))
    assert "a" not in cache
    cache.put(_record("q", status=DeviceStatus.QUARANTINED))
    assert cache.get("q", "f1") is not None
    for d in "bcd":
        cache.put(_record(d))
    assert len(cache) == 2
    cache.forget("d")
    assert "d" not in cache
    disabled = RecordCache(0, 60, clock=FakeClock())
    disabled.put(_record())
    assert len(disabled) == 0


# -- config -------------------------------------------------------------------------------------
def test_admission_config_is_validated() -> None:
    cfg = load_config(text="admission:\n  workers: 4\n  queue_size: 0\n  per_ca_rate: 2.5\n")
    assert cfg.admission == AdmissionConfig(workers=4, queue_size=0, per_ca_rate=2.5)
    for bad in (
        "workers: 0",
        "queue_size: -1",
        "per_ca_rate: -1",
        "per_region_burst: -2",
        "queue_timeout: 0",
    ):
        with pytest.raises(ConfigError, match="admission"):
            load_config(text=f"admission:\n  {bad}\n")


# -- the service --------------------------------------------------------------------------------
class SlowRegistry:
    """Wraps a registry; ``provision`` waits for ``release`` (a registry that has stalled)."""

    def __init__(self, inner: SQLiteRegistry) -> None:
        self.inner = inner
        self.release = asyncio.Event()
        self.release.set()
        self.provisions = 0

    async def provision(self, *args: Any, **kw: Any) -> Any:
        self.provisions += 1
        await self.release.wait()
        return await self.inner.provision(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def registry_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "registry.db"


def _peer(pki: Pki, name: str, **kw: Any) -> PeerCredentials:
    from cryptography.hazmat.primitives.serialization import Encoding

    ident = pki.device(name, **kw)
    issuer = kw.get("issuer") or pki.manufacturer
    return PeerCredentials(
        chain_der=(ident.cert.public_bytes(Encoding.DER), issuer.cert.public_bytes(Encoding.DER)),
        client_id=name,
        address="10.0.0.1:1234",
    )


async def _service(
    path: Path, pki: Pki, admission: AdmissionConfig, **kw: Any
) -> tuple[ProvisioningService, SlowRegistry]:
    inner = SQLiteRegistry(path)
    await inner.open()
    registry = SlowRegistry(inner)
    anchor = TrustAnchor.from_certificate(pki.manufacturer.cert)
    await inner.register_anchor(
        anchor, audit=AuditDraft(at=datetime.now(UTC), action="ca-registered", actor="t")
    )
    service = ProvisioningService(registry, admission=admission, **kw)  # type: ignore[arg-type]
    await service.refresh_trust(force=True)
    return service, registry


def test_service_sheds_first_joins_over_the_ca_rate_and_audits_once(registry_dir: Path, pki: Pki) -> None:
    clock = FakeClock()

    async def go() -> None:
        service, registry = await _service(
            registry_dir,
            pki,
            AdmissionConfig(per_ca_rate=1, per_ca_burst=2),
            monotonic=clock,
            coalesce_window=60,
        )
        try:
            peers = [_peer(pki, f"rate-{i}") for i in range(5)]
            assert (await service.admit(peers[0])).created
            assert (await service.admit(peers[1])).created
            for p in peers[2:]:
                with pytest.raises(errors.Overloaded) as exc:
                    await service.admit(p)
                assert exc.value.scope is not None and exc.value.scope.startswith("ca:")
            # A known device is not a first join: admitted although the bucket is empty.
            service.cache.clear()
            assert not (await service.admit(peers[0])).created
            clock.advance(1)
            assert (await service.admit(peers[2])).created
            entries = [e for e in await registry.inner.audit_entries() if e.draft.action == "refused"]
            assert [e.draft.reason for e in entries] == ["overloaded"]  # the rest coalesced
            assert await service.flush_refusals(force=True) == 2
        finally:
            await registry.inner.close()

    asyncio.run(go())


def test_cached_reconnect_needs_no_registry_and_events_invalidate(registry_dir: Path, pki: Pki) -> None:
    async def go() -> None:
        service, registry = await _service(registry_dir, pki, AdmissionConfig())
        try:
            peer = _peer(pki, "cached-1")
            assert (await service.admit(peer)).created
            assert registry.provisions == 1
            again = await service.admit(peer)
            assert not again.created and again.record is not None and registry.provisions == 1
            await service.apply(Command.QUARANTINE, "cached-1", actor="t")
            assert "cached-1" not in service.cache
            quarantined = await service.admit(peer)
            assert registry.provisions == 2
            assert quarantined.record is not None and quarantined.record.status == DeviceStatus.QUARANTINED
            await service.apply(Command.REVOKE, "cached-1", actor="t")
            with pytest.raises(errors.DeviceBlocked):
                await service.admit(peer)
        finally:
            await registry.inner.close()

    asyncio.run(go())


def test_stalled_registry_gives_fast_unavailable_not_a_hang(registry_dir: Path, pki: Pki) -> None:
    async def go() -> None:
        service, registry = await _service(
            registry_dir,
            pki,
            AdmissionConfig(workers=1, queue_size=1, queue_timeout=30, registry_timeout=30),
            coalesce_window=60,
        )
        try:
            cached = _peer(pki, "stall-cached")
            await service.admit(cached)
            registry.release.clear()
            first = asyncio.create_task(service.admit(_peer(pki, "stall-1")))  # holds the worker
            second = asyncio.create_task(service.admit(_peer(pki, "stall-2")))  # waits in the queue
            assert await wait_until_async(lambda: service.gate.running == 1 and service.gate.waiting == 1), (
                service.gate.running,
                service.gate.waiting,
            )
            with pytest.raises(errors.Overloaded):  # queue full: refused at once
                await service.admit(_peer(pki, "stall-3"))
            assert (await service.admit(cached)).record is not None  # cached: still admitted
            registry.release.set()
            assert (await first).created and (await second).created
            assert service.gate.running == 0
        finally:
            await registry.inner.close()

    asyncio.run(go())


def test_registry_unavailable_is_unavailable_and_cached_devices_still_join(
    registry_dir: Path, pki: Pki
) -> None:
    async def go() -> None:
        service, registry = await _service(registry_dir, pki, AdmissionConfig())
        cached = _peer(pki, "down-cached")
        await service.admit(cached)
        await registry.inner.close()
        with pytest.raises(errors.RegistryUnavailable):
            await service.admit(_peer(pki, "down-new"))
        assert (await service.admit(cached)).record is not None

    asyncio.run(go())
