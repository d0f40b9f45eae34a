"""The detectors with a fake clock: exact rules, and properties over arbitrary event sequences."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from jitp.domain.alerts import AlertKind, Severity
from jitp.observability.detectors import (
    BurstRule,
    CloneDetector,
    CloneRule,
    ExpiryRule,
    RefusalBurstDetector,
    SpikeDetector,
    SpikeRule,
    check_expiry,
    network_of,
)

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_clone_from_another_host_is_immediate() -> None:
    d = CloneDetector(CloneRule(takeovers=3, window=60))
    (s,) = d.takeover(
        at=T0, device_id="d1", peer="10.0.0.1:5000", previous_peer="10.0.0.2:6000", same_certificate=True
    )
    assert s.kind is AlertKind.CLONED_CERTIFICATE and s.severity is Severity.CRITICAL
    assert s.device_id == "d1" and s.evidence["trigger"] == "different_hosts"


def test_one_takeover_from_the_same_host_is_a_reconnect_but_ping_pong_is_a_clone() -> None:
    d = CloneDetector(CloneRule(takeovers=3, window=60))
    kw = {
        "device_id": "d1",
        "peer": "10.0.0.1:5000",
        "previous_peer": "10.0.0.1:6000",
        "same_certificate": True,
    }
    assert d.takeover(at=at(0), **kw) == []  # type: ignore[arg-type]
    assert d.takeover(at=at(10), **kw) == []  # type: ignore[arg-type]
    (s,) = d.takeover(at=at(20), **kw)  # type: ignore[arg-type]
    assert s.evidence["trigger"] == "takeover_ping_pong" and s.evidence["takeovers_in_window"] == 3


def test_ping_pong_slower_than_the_window_is_not_a_clone() -> None:
    d = CloneDetector(CloneRule(takeovers=3, window=60, different_host=False))
    kw = {
        "device_id": "d1",
        "peer": "10.0.0.1:5000",
        "previous_peer": "10.0.0.9:6000",
        "same_certificate": True,
    }
    assert all(d.takeover(at=at(t), **kw) == [] for t in (0, 40, 80, 120, 160))  # type: ignore[arg-type]


@given(st.lists(st.booleans(), max_size=20))
def test_a_renewed_certificate_taking_over_is_never_a_clone(hosts: list[bool]) -> None:
    d = CloneDetector(CloneRule(takeovers=2, window=60))
    for i, other in enumerate(hosts):
        peer = "10.0.0.2:1" if other else "10.0.0.1:1"
        assert (
            d.takeover(at=at(i), device_id="d", peer=peer, previous_peer="10.0.0.1:2", same_certificate=False)
            == []
        )


@given(
    st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), min_size=1, max_size=60),
    st.integers(min_value=1, max_value=8),
    st.floats(min_value=0.5, max_value=200, allow_nan=False),
)
def test_refusal_burst_fires_exactly_when_k_refusals_fit_in_the_window(
    offsets: list[float], k: int, window: float
) -> None:
    times = sorted(offsets)
    d = RefusalBurstDetector(BurstRule(refusals=k, window=window))
    fired = [bool(d.refused(at=at(t), reason="unknown_ca", ca="", peer=None)) for t in times]
    expected = [
        i >= k - 1 and (at(times[i]) - at(times[i - k + 1])).total_seconds() <= window
        for i in range(len(times))
    ]
    assert fired == expected


def test_refusal_burst_per_ca_and_per_network() -> None:
    d = RefusalBurstDetector(BurstRule(refusals=3, window=10))
    signals = []
    for i in range(3):
        signals += d.refused(at=at(i), reason="expired", ca="ca1", peer=f"192.0.2.{i + 1}:4000")
    assert sorted(s.key for s in signals) == ["ca:ca1", "net:192.0.2.0/24"]
    assert {s.kind for s in signals} == {AlertKind.REFUSAL_BURST}


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_the_network_of_a_peer_contains_it(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    peer = f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"
    network = network_of(peer)
    assert network is not None and address in ipaddress.ip_network(network)


def test_spike_against_the_cas_own_baseline() -> None:
    d = SpikeDetector(SpikeRule(bucket=60, factor=5, min_joins=10, smoothing=0.5))
    # a steady 8 joins per minute for 10 minutes: never a spike
    for minute in range(10):
        for j in range(8):
            assert d.provisioned(at=at(minute * 60 + j), ca="ca1") == []
    # then 40 in one minute (5x the baseline of 8): a spike at the 40th
    raised = [bool(d.provisioned(at=at(600 + j), ca="ca1")) for j in range(40)]
    assert raised.index(True) == 39
    # another CA is judged by its own baseline (none yet: min_joins)
    assert [bool(d.provisioned(at=at(600 + j), ca="ca2")) for j in range(10)] == [False] * 9 + [True]


@given(st.integers(min_value=1, max_value=9), st.integers(min_value=1, max_value=30))
def test_below_min_joins_is_never_a_spike(per_bucket: int, buckets: int) -> None:
    d = SpikeDetector(SpikeRule(bucket=60, factor=1.0, min_joins=10))
    for b in range(buckets):
        for j in range(per_bucket):
            assert d.provisioned(at=at(b * 60 + j), ca="ca") == []


def test_expiry_checks() -> None:
    rule = ExpiryRule(ca_days=30, crl_hours=24, device_days=30)
    signals = check_expiry(
        rule,
        now=T0,
        ca_not_after={"soon": T0 + timedelta(days=3), "later": T0 + timedelta(days=300)},
        crl_next_update={"soon": T0 - timedelta(hours=1), "later": T0 + timedelta(days=7), "none": None},
        devices_expiring={"soon": 4, "later": 0},
    )
    got = sorted((str(s.kind), s.ca, str(s.severity)) for s in signals)
    assert got == [
        ("ca_expiry", "soon", "critical"),
        ("cert_expiry", "soon", "info"),
        ("crl_expiry", "soon", "critical"),
    ]
