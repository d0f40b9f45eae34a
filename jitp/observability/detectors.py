"""The anomaly detectors: pure state machines fed by the observer, each with the time passed in.

Each returns the :class:`~jitp.domain.alerts.Signal` s an observation raises (usually none); the
:class:`~jitp.observability.monitor.AlertManager` turns repeated signals into one coalesced alert.
Memory is bounded: every detector keeps at most :data:`MAX_KEYS` keys (the oldest go first).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType

from jitp.domain.alerts import AlertKind, Severity, Signal

MAX_KEYS = 10_000


def host_of(peer: str | None) -> str | None:
    """The host of a "host:port" (or "[v6]:port") peer address."""
    if not peer:
        return None
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 or peer.startswith("[") else peer
    return host.strip("[]")


def network_of(peer: str | None, *, v4_prefix: int = 24, v6_prefix: int = 64) -> str | None:
    """The source network of a peer address (``10.1.2.0/24``), or None when it is not an IP address."""
    host = host_of(peer)
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host.rsplit("%", 1)[0])
    except ValueError:
        return None
    prefix = v4_prefix if address.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class _Bounded(OrderedDict[str, "deque[datetime]"]):
    def window(self, key: str, size: int) -> deque[datetime]:
        found = self.get(key)
        if found is None or found.maxlen != size:
            found = self[key] = deque(maxlen=size)
            if len(self) > MAX_KEYS:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return found


def _burst(times: deque[datetime], at: datetime, window: float) -> bool:
    """Record ``at``; True when the deque (of ``maxlen`` events) fits in ``window`` seconds."""
    times.append(at)
    return len(times) == times.maxlen and (times[-1] - times[0]).total_seconds() <= window


@dataclass(frozen=True)
class CloneRule:
    takeovers: int = 3  # this many takeovers of one device within `window` (ping-pong)
    window: float = 60.0
    different_host: bool = True  # also: one takeover with the same certificate from another host


class CloneDetector:
    """The same certificate live from two places: an immediate takeover from another host, or
    takeover ping-pong (``takeovers`` within ``window``) from anywhere."""

    def __init__(self, rule: CloneRule) -> None:
        self.rule = rule
        self._takeovers = _Bounded()

    def takeover(
        self,
        *,
        at: datetime,
        device_id: str,
        peer: str | None,
        previous_peer: str | None,
        same_certificate: bool,
        ca: str | None = None,
        region: str | None = None,
    ) -> list[Signal]:
        if not same_certificate:
            return []  # a renewed certificate (reprovisioning) taking over its predecessor
        times = self._takeovers.window(device_id, max(1, self.rule.takeovers))
        ping_pong = _burst(times, at, self.rule.window)
        hosts = {h for h in (host_of(peer), host_of(previous_peer)) if h is not None}
        two_hosts = self.rule.different_host and len(hosts) == 2
        if not (ping_pong or two_hosts):
            return []
        evidence = {
            "takeovers_in_window": len(times),
            "window_seconds": self.rule.window,
            "distinct_hosts": len(hosts),
            "trigger": "different_hosts" if two_hosts else "takeover_ping_pong",
        }
        return [
            Signal(
                kind=AlertKind.CLONED_CERTIFICATE,
                key=f"device:{device_id}",
                severity=Severity.CRITICAL,
                at=at,
                ca=ca,
                region=region,
                device_id=device_id,
                evidence=MappingProxyType(evidence),
                peer=peer,
            )
        ]


@dataclass(frozen=True)
class BurstRule:
    refusals: int = 20  # this many refusals within `window` seconds, per CA or per source network
    window: float = 60.0
    v4_prefix: int = 24
    v6_prefix: int = 64


class RefusalBurstDetector:
    """Refused joins per CA (the unknown CA counts as one) and per source network."""

    def __init__(self, rule: BurstRule) -> None:
        self.rule = rule
        self._seen = _Bounded()

    def refused(self, *, at: datetime, reason: str, ca: str, peer: str | None) -> list[Signal]:
        rule, out = self.rule, []
        network = network_of(peer, v4_prefix=rule.v4_prefix, v6_prefix=rule.v6_prefix)
        for key in (f"ca:{ca or 'unknown'}", *((f"net:{network}",) if network else ())):
            times = self._seen.window(key, max(1, rule.refusals))
            if _burst(times, at, rule.window):
                evidence = {
                    "scope": key.partition(":")[0],
                    "refusals_in_window": len(times),
                    "window_seconds": rule.window,
                    "last_reason": reason,
                }
                out.append(
                    Signal(
                        kind=AlertKind.REFUSAL_BURST,
                        key=key,
                        severity=Severity.WARNING,
                        at=at,
                        ca=ca or None,
                        evidence=MappingProxyType(evidence),
                        peer=peer,
                    )
                )
        return out


@dataclass(frozen=True)
class SpikeRule:
    bucket: float = 60.0  # seconds per counting bucket
    factor: float = 5.0  # a bucket above factor x the CA's baseline is a spike ...
    min_joins: int = 100  # ... and at least this many joins (a quiet CA's first few are not)
    smoothing: float = 0.3  # weight of the newest completed bucket in the baseline (EWMA)


@dataclass
class _Rate:
    start: datetime
    count: int = 0
    baseline: float | None = None  # None: no completed bucket yet


class SpikeDetector:
    """First joins (provisioned) per CA per bucket, against that CA's own exponential average."""

    def __init__(self, rule: SpikeRule) -> None:
        self.rule = rule
        self._rates: OrderedDict[str, _Rate] = OrderedDict()

    def provisioned(self, *, at: datetime, ca: str, region: str | None = None) -> list[Signal]:
        rule = self.rule
        rate = self._rates.get(ca)
        if rate is None:
            rate = self._rates[ca] = _Rate(start=at)
            if len(self._rates) > MAX_KEYS:
                self._rates.popitem(last=False)
        elapsed = (at - rate.start).total_seconds()
        if elapsed >= rule.bucket:
            buckets = int(elapsed // rule.bucket)
            counts = [rate.count] + [0] * (buckets - 1)  # the quiet buckets between count as zero
            for c in counts:
                rate.baseline = (
                    float(c)
                    if rate.baseline is None
                    else (1 - rule.smoothing) * rate.baseline + rule.smoothing * c
                )
            rate.start += timedelta(seconds=buckets * rule.bucket)
            rate.count = 0
        rate.count += 1
        threshold = max(float(rule.min_joins), rule.factor * (rate.baseline or 0.0))
        if rate.count < threshold:
            return []
        evidence = {
            "joins_in_bucket": rate.count,
            "bucket_seconds": rule.bucket,
            "baseline_per_bucket": round(rate.baseline or 0.0, 2),
            "factor": rule.factor,
        }
        return [
            Signal(
                kind=AlertKind.PROVISIONING_SPIKE,
                key=f"ca:{ca}",
                severity=Severity.WARNING,
                at=at,
                ca=ca,
                region=region,
                evidence=MappingProxyType(evidence),
            )
        ]


@dataclass(frozen=True)
class ExpiryRule:
    ca_days: float = 30.0  # a CA certificate expiring within this many days
    crl_hours: float = 24.0  # a CRL whose nextUpdate is within this many hours (or past)
    device_days: float = 30.0  # devices whose certificate expires within this many days


def check_expiry(
    rule: ExpiryRule,
    *,
    now: datetime,
    ca_not_after: Mapping[str, datetime],
    crl_next_update: Mapping[str, datetime | None],
    devices_expiring: Mapping[str, int],
) -> list[Signal]:
    """Signals for CAs and CRLs near (or past) expiry, and per CA for devices whose certificate
    expires within ``device_days`` (``devices_expiring``: CA id -> count)."""
    out: list[Signal] = []

    def days_left(when: datetime) -> float:
        return round((when - now).total_seconds() / 86400, 2)

    for ca, not_after in ca_not_after.items():
        if not_after - now <= timedelta(days=rule.ca_days):
            severity = Severity.CRITICAL if not_after - now <= timedelta(days=7) else Severity.WARNING
            evidence = {"not_after": not_after.isoformat(), "days_left": days_left(not_after)}
            out.append(Signal(AlertKind.CA_EXPIRY, f"ca:{ca}", severity, now, ca=ca, evidence=evidence))
    for ca, next_update in crl_next_update.items():
        if next_update is not None and next_update - now <= timedelta(hours=rule.crl_hours):
            severity = Severity.CRITICAL if next_update <= now else Severity.WARNING
            evidence = {"next_update": next_update.isoformat(), "days_left": days_left(next_update)}
            out.append(Signal(AlertKind.CRL_EXPIRY, f"ca:{ca}", severity, now, ca=ca, evidence=evidence))
    for ca, count in devices_expiring.items():
        if count > 0:
            evidence = {"devices": count, "within_days": rule.device_days}
            out.append(
                Signal(AlertKind.CERT_EXPIRY, f"ca:{ca}", Severity.INFO, now, ca=ca, evidence=evidence)
            )
    return out
