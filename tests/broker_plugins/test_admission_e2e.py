"""Admission control against the real broker: load shedding with CONNACK 3, a registry outage,
and per-CA fairness."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import certs
from device_sim import Backoff, Fleet, Target, create_fleet, run_storm
from jitp.config import AdmissionConfig
from jitp.trust import Role
from tests.helpers import BrokerThread, Pki, connect, test_config, wait_until


def _broker(tmp_path: Path, pki: Pki, **admission: Any) -> BrokerThread:
    b = BrokerThread(
        test_config(tmp_path, pki, audit={"coalesce_window": 60.0}, admission=AdmissionConfig(**admission))
    ).start()
    b.register_ca(pki.manufacturer.cert)
    b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
    return b


@pytest.fixture
def make_broker(tmp_path: Path, pki: Pki) -> Iterator[Any]:
    started: list[BrokerThread] = []

    def make(**admission: Any) -> BrokerThread:
        b = _broker(tmp_path, pki, **admission)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture(scope="module")
def storm_fleet(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return create_fleet(pki.layout.dir, 80, tmp_path_factory.mktemp("adm-fleet") / "fleet", prefix="adm-")


def test_storm_over_the_ca_rate_is_shed_with_connack_3_and_all_join_after_backing_off(
    make_broker: Any, pki: Pki, storm_fleet: Fleet
) -> None:
    broker = make_broker(per_ca_rate=40, per_ca_burst=10, workers=4, queue_size=8)
    target = Target("127.0.0.1", broker.port, ca=pki.layout.root_cert)
    report = asyncio.run(
        run_storm(
            target,
            storm_fleet,
            concurrency=80,
            registry_path=broker.config.registry_path,
            backoff=Backoff(base=0.1, cap=1.0, attempts=40),
            seed=7,
        )
    )
    assert report.ok, report.table()
    assert report.joined == 80 and report.failures == {}
    assert report.retries.get("connack:3", 0) > 0, report.table()
    assert report.registry is not None and report.registry.ok
    events = [e for e in broker.events() if e.type == "provisioned"]
    assert len(events) == 80 and len({e.device_id for e in events}) == 80  # no duplicates
    broker.call(broker.server.service.flush_refusals(force=True))
    shed = [e for e in broker.audit() if e.draft.action == "refused" and e.draft.reason == "overloaded"]
    assert shed, "load shedding is audited"
    total = sum(int(e.draft.details.get("count", "1")) for e in shed)
    assert len(shed) < total  # coalesced: a storm of refusals is a few counted entries


def test_a_full_queue_answers_connack_3_without_waiting(make_broker: Any, pki: Pki) -> None:
    """The only worker is held until the test lets it go: a second first join is refused with
    CONNACK 3 while the first is still in flight, not queued behind it."""
    broker = make_broker(workers=1, queue_size=0)
    registry = broker.registry()
    original = registry.provision

    async def new_event() -> asyncio.Event:
        return asyncio.Event()

    release = broker.call(new_event())
    entered = threading.Event()  # set once a join is inside the registry, holding the worker

    async def held(*args: Any, **kw: Any) -> Any:
        entered.set()
        await asyncio.wait_for(release.wait(), 30)
        return await original(*args, **kw)

    registry.provision = held
    try:
        slow: list[int | None] = []
        t = threading.Thread(
            target=lambda: slow.append(connect(broker.port, pki, pki.device("q-1"), timeout=40).rc)
        )
        t.start()
        assert wait_until(entered.is_set, 10), "q-1 did not take the only worker"
        started = time.perf_counter()
        refused = connect(broker.port, pki, pki.device("q-2"))
        elapsed = time.perf_counter() - started
        refused.close()
        assert refused.rc == 3
        assert slow == [], "q-2 was answered only after q-1 finished"
        print(f"\nqueue full: CONNACK 3 after {elapsed * 1000:.0f} ms (TLS + CONNECT included)")
        broker.loop.call_soon_threadsafe(release.set)
        t.join(40)
        assert slow == [0]
    finally:
        broker.loop.call_soon_threadsafe(release.set)
        registry.provision = original


def test_registry_unavailable_refuses_first_joins_fast_but_cached_devices_connect(
    make_broker: Any, pki: Pki
) -> None:
    # Waiting for the queue would take 60 s, beyond the client's 5 s: a CONNACK 3 within that
    # shows the join was refused at once, not left to time out.
    broker = make_broker(queue_timeout=60.0)
    known = pki.device("outage-known")
    first = connect(broker.port, pki, known)
    first.close()
    assert first.rc == 0
    broker.call(broker.registry().close())  # the registry is gone
    try:
        started = time.perf_counter()
        new = connect(broker.port, pki, pki.device("outage-new"))
        elapsed = time.perf_counter() - started
        new.close()
        assert new.rc == 3, (new.rc, new.error)
        print(f"\nregistry down: CONNACK 3 after {elapsed * 1000:.0f} ms")
        again = connect(broker.port, pki, known)
        again.close()
        assert again.rc == 0  # admitted from the cache, without the registry
    finally:
        broker.call(broker.registry().open())  # the registry is back
    later = connect(broker.port, pki, pki.device("outage-new"))
    later.close()
    assert later.rc == 0
    assert {d.device_id for d in broker.devices()} == {"outage-known", "outage-new"}


def test_one_ca_over_its_rate_does_not_stop_another_ca(make_broker: Any, pki: Pki) -> None:
    broker = make_broker(per_ca_rate=0.01, per_ca_burst=2)
    second = certs.make_ca("Second Manufacturer", key=certs.generate_key("ec"), issuer=pki.root)
    broker.register_ca(second.cert)
    batch_a = [pki.device(f"batch-a-{i}") for i in range(4)]
    codes = []
    for ident in batch_a:
        conn = connect(broker.port, pki, ident)
        conn.close()
        codes.append(conn.rc)
    assert codes == [0, 0, 3, 3]  # the first CA's batch is over its bucket
    for i in range(2):
        conn = connect(broker.port, pki, pki.device(f"batch-b-{i}", issuer=second))
        conn.close()
        assert conn.rc == 0  # the second CA is unaffected
    broker.server.service.cache.clear()
    again = connect(broker.port, pki, batch_a[0])  # a known device is not a first join: not shed
    again.close()
    assert again.rc == 0
