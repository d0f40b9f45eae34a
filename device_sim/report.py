"""Results of a scenario run: per-device outcomes, cross-checks, the summary table and JSON."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK = "ok"


@dataclass(frozen=True)
class JoinOutcome:
    """What happened to one device: ``reason`` is "ok" or the final failure reason."""

    device_id: str
    reason: str
    attempts: int
    retried: tuple[str, ...] = ()  # reasons of the attempts that were retried
    started: float | None = None  # perf_counter() at the TCP connect of the last attempt
    connack_latency: float | None = None  # seconds, TCP connect -> CONNACK (accepted attempts)
    region: str | None = None  # the fleet's region for this device (multi-region fleets)

    @property
    def joined(self) -> bool:
        return self.reason == OK


@dataclass(frozen=True)
class EventCheck:
    """What the service subscriber saw on ``$jitp/events/provisioned/#``."""

    expected: int  # devices expected to produce a new provisioned event in this run
    seen: int  # expected devices whose event arrived
    new_events: int  # distinct events that occurred during this run
    unexpected: tuple[str, ...]  # devices with a new event although none was expected
    duplicates: tuple[str, ...]  # devices with more than one distinct event_id
    lost: tuple[str, ...]  # expected devices without an event
    redeliveries: int  # the same event_id delivered again (QoS 1 at-least-once; not a failure)
    stale: int  # events from before this run (a persistent session's backlog; ignored)
    # Devices whose event carried another region than the fleet's, as "device: expected X, got Y".
    region_mismatches: tuple[str, ...] = ()
    by_region: Mapping[str, RegionEvents] = field(default_factory=dict)  # by the fleet's region

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.duplicates or self.lost or self.region_mismatches)


@dataclass(frozen=True)
class RegionEvents:
    """Provisioned events of the devices of one (expected) region."""

    expected: int  # devices of the region expected to produce a new event
    seen: int  # of those, the ones whose event arrived
    lost: int
    duplicates: int
    mismatched: int  # devices whose event named another region
    observed: Mapping[str, int]  # region named by the events -> devices


@dataclass(frozen=True)
class RegistryCheck:
    checked: int
    missing: tuple[str, ...]  # joined devices absent from the registry
    event_counts_wrong: tuple[str, ...]  # joined devices without exactly one provisioned event
    leaked: tuple[str, ...]  # refused identities that appear in the registry
    # Joined devices recorded with another region than the fleet's, as "device: expected X, got Y".
    region_mismatches: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.event_counts_wrong or self.leaked or self.region_mismatches)


@dataclass(frozen=True)
class BrokerUsage:
    cpu_seconds: float
    rss_before: int
    rss_after: int
    rss_peak_seen: int


@dataclass(frozen=True)
class HoldStats:
    held: int  # connections that stayed open until the end
    dropped: Mapping[str, int]  # connections lost during the hold, by reason
    seconds: float
    pings: int
    ping_failures: int
    publishes: int  # QoS 1 telemetry publishes acknowledged
    publish_failures: int
    rss_delta: int | None  # broker RSS with all connected minus before (bytes)

    @property
    def rss_per_connection(self) -> float | None:
        if self.rss_delta is None or self.held + sum(self.dropped.values()) == 0:
            return None
        return self.rss_delta / max(1, self.held + sum(self.dropped.values()))

    @property
    def ok(self) -> bool:
        return not self.dropped and self.ping_failures == 0 and self.publish_failures == 0


@dataclass(frozen=True)
class TelemetryCheck:
    """QoS 1 telemetry the run's devices published, cross-checked with what the service received.

    Messages are (device id, seq) pairs. A PUBACK hands a message to the broker, so every
    acknowledged message must reach the subscriber: ``lost`` fails the run, and so do messages
    received that were never sent (``unknown``) or on another device's topic (``misrouted``),
    and devices whose batch broke off (``publish_failures``). Duplicates (QoS 1 is at least once)
    and messages received without a PUBACK are reported, not failures.
    """

    devices: int  # devices that joined and published
    messages_per_device: int
    sent: int  # PUBLISH packets written
    acked: int  # of those, acknowledged with a PUBACK
    received: int  # distinct sent messages the subscriber received at least once
    deliveries: int  # every delivery of a sent message, duplicates included
    lost: tuple[tuple[str, int], ...]  # acknowledged but never received
    duplicated: tuple[tuple[str, int], ...]  # received more than once
    unacked_received: int  # received although the publisher never got the PUBACK (allowed)
    unknown: tuple[tuple[str, int], ...]  # this run's tag, but never sent
    misrouted: int  # this run's tag on another device's topic
    foreign: int  # not this run's (other runs, a persistent session's backlog, other publishers)
    publish_failures: Mapping[str, int] = field(default_factory=dict)  # devices cut short, by reason
    publish_seconds: float = 0.0  # first connect -> last device disconnected
    delivery_seconds: float = 0.0  # last device disconnected -> every acknowledged message received

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unknown or self.misrouted or self.publish_failures)


@dataclass(frozen=True)
class ChaosResult:
    name: str
    device_id: str
    client_id: str
    expected: tuple[str, ...]  # acceptable refusal reasons
    observed: str  # "ok" if accepted (a failure), else the refusal reason

    @property
    def refused(self) -> bool:
        return self.observed != OK

    @property
    def ok(self) -> bool:
        return self.observed in self.expected


@dataclass(frozen=True)
class RegionResult:
    """One region of a multi-region run: joins, failures, CONNACK latency and events."""

    region: str
    devices: int
    joined: int
    failures: Mapping[str, int]
    connack_latencies: tuple[float, ...]
    events: RegionEvents | None

    @property
    def ok(self) -> bool:
        e = self.events
        return not self.failures and (e is None or not (e.lost or e.duplicates or e.mismatched))

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "joined": self.joined,
            "failures": dict(self.failures),
            "latency_connack_ms": _latency_json(self.connack_latencies),
            "events": None
            if self.events is None
            else dict(asdict(self.events), observed=dict(self.events.observed)),
            "ok": self.ok,
        }


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Report:
    scenario: str
    target: str
    concurrency: int | None
    outcomes: tuple[JoinOutcome, ...]
    duration: float  # seconds from the first connect to the last outcome
    prepare_seconds: float = 0.0  # building TLS contexts etc., excluded from latencies
    event_latencies: tuple[float, ...] = ()  # seconds, TCP connect -> event seen by the subscriber
    events: EventCheck | None = None
    registry: RegistryCheck | None = None
    broker: BrokerUsage | None = None
    hold: HoldStats | None = None
    chaos: tuple[ChaosResult, ...] = ()
    telemetry: TelemetryCheck | None = None
    notes: tuple[str, ...] = field(default=())  # informational
    issues: tuple[str, ...] = field(default=())  # further failures found by the scenario
    protocol: int = 4  # MQTT protocol level the devices spoke: 4 (3.1.1) or 5 (5.0)

    # -- derived ---------------------------------------------------------------------------
    @property
    def devices(self) -> int:
        return len(self.outcomes)

    @property
    def joined(self) -> int:
        return sum(1 for o in self.outcomes if o.joined)

    @property
    def failures(self) -> dict[str, int]:
        """Final failure reasons (chaos runs count their expected refusals here too)."""
        return dict(Counter(o.reason for o in self.outcomes if not o.joined))

    @property
    def retries(self) -> dict[str, int]:
        return dict(Counter(r for o in self.outcomes for r in o.retried))

    @property
    def connack_latencies(self) -> tuple[float, ...]:
        return tuple(o.connack_latency for o in self.outcomes if o.connack_latency is not None)

    def by_region(self) -> list[RegionResult]:
        """Per-region breakdown, in order of first appearance; empty if no outcome has a region."""
        groups: dict[str, list[JoinOutcome]] = {}
        for o in self.outcomes:
            if o.region is not None:
                groups.setdefault(o.region, []).append(o)
        events = self.events.by_region if self.events is not None else {}
        return [
            RegionResult(
                region=region,
                devices=len(outs),
                joined=sum(1 for o in outs if o.joined),
                failures=dict(Counter(o.reason for o in outs if not o.joined)),
                connack_latencies=tuple(o.connack_latency for o in outs if o.connack_latency is not None),
                events=events.get(region) if self.events is not None else None,
            )
            for region, outs in groups.items()
        ]

    @property
    def joins_per_second(self) -> float:
        return self.joined / self.duration if self.duration > 0 else 0.0

    @property
    def cpu_ms_per_join(self) -> float | None:
        if self.broker is None or not self.joined:
            return None
        return self.broker.cpu_seconds * 1000 / self.joined

    def problems(self) -> list[str]:
        """Everything that makes the run a failure (empty list: success)."""
        out: list[str] = []
        if self.chaos:
            out += [
                f"chaos {c.name} ({c.device_id!r}): expected {' or '.join(c.expected)}, got {c.observed}"
                for c in self.chaos
                if not c.ok
            ]
        else:
            out += [f"{n} device(s) failed to join: {reason}" for reason, n in sorted(self.failures.items())]
        if self.events is not None:
            e = self.events
            if e.lost:
                out.append(f"{len(e.lost)} provisioned event(s) lost, e.g. {', '.join(e.lost[:5])}")
            if e.duplicates:
                out.append(
                    f"{len(e.duplicates)} device(s) with duplicate events, e.g. {', '.join(e.duplicates[:5])}"
                )
            if e.unexpected:
                out.append(
                    f"{len(e.unexpected)} unexpected new provisioned event(s), "
                    f"e.g. {', '.join(e.unexpected[:5])}"
                )
            if e.region_mismatches:
                out.append(
                    f"{len(e.region_mismatches)} provisioned event(s) with the wrong region, "
                    f"e.g. {'; '.join(e.region_mismatches[:3])}"
                )
        if self.registry is not None:
            r = self.registry
            if r.missing:
                out.append(
                    f"{len(r.missing)} joined device(s) missing from the registry, e.g. {r.missing[:5]}"
                )
            if r.event_counts_wrong:
                out.append(
                    f"{len(r.event_counts_wrong)} device(s) without exactly one provisioned event in the "
                    f"registry, e.g. {r.event_counts_wrong[:5]}"
                )
            if r.leaked:
                out.append(f"{len(r.leaked)} refused identities found in the registry: {r.leaked[:5]}")
            if r.region_mismatches:
                out.append(
                    f"{len(r.region_mismatches)} device(s) recorded with the wrong region, "
                    f"e.g. {'; '.join(r.region_mismatches[:3])}"
                )
        if self.telemetry is not None:
            out += _telemetry_problems(self.telemetry)
        out += list(self.issues)
        if self.hold is not None and not self.hold.ok:
            h = self.hold
            out.append(
                f"hold: dropped {dict(h.dropped)}, ping failures {h.ping_failures}, "
                f"publish failures {h.publish_failures}"
            )
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()

    # -- output ----------------------------------------------------------------------------
    def table(self) -> str:
        rows: list[tuple[str, str]] = []
        conc = f"   concurrency {self.concurrency}" if self.concurrency else ""
        mqtt = "MQTT 5.0" if self.protocol == 5 else "MQTT 3.1.1"
        rows.append(
            ("scenario", f"{self.scenario}   target {self.target} ({mqtt})   devices {self.devices}{conc}")
        )
        if self.chaos:
            for c in self.chaos:
                verdict = "ok" if c.ok else "FAIL"
                rows.append(
                    (f"  {c.name}", f"{c.observed:28} expected {' | '.join(c.expected):34} {verdict}")
                )
        else:
            rows.append(
                (
                    "joins",
                    f"{self.joined} / {self.devices} in {self.duration:.2f} s   "
                    f"{self.joins_per_second:.1f} joins/s   (TLS contexts built in "
                    f"{self.prepare_seconds:.2f} s, not timed)",
                )
            )
            rows.append(("failures", _counts(self.failures)))
            rows.append(("retried", _counts(self.retries)))
            rows.append(("connect->CONNACK", _latency(self.connack_latencies)))
            if self.event_latencies:
                rows.append(("connect->event", _latency(self.event_latencies)))
            rows += self._region_rows()
        if self.events is not None:
            e = self.events
            mismatched = f"  wrong region {len(e.region_mismatches)}" if e.by_region else ""
            rows.append(
                (
                    "events",
                    f"expected {e.expected}  seen {e.seen}  new {e.new_events}  duplicates "
                    f"{len(e.duplicates)}  lost {len(e.lost)}  unexpected {len(e.unexpected)}  "
                    f"redelivered {e.redeliveries}  stale {e.stale}{mismatched}",
                )
            )
        if self.registry is not None:
            r = self.registry
            wrong_region = f"  wrong region {len(r.region_mismatches)}" if self.by_region() else ""
            rows.append(
                (
                    "registry",
                    f"checked {r.checked}  missing {len(r.missing)}  wrong event count "
                    f"{len(r.event_counts_wrong)}  refused-but-recorded {len(r.leaked)}"
                    f"{wrong_region}",
                )
            )
        if self.hold is not None:
            h = self.hold
            per = h.rss_per_connection
            mem = f"   broker RSS/connection {per / 1024:.1f} KiB" if per is not None else ""
            rows.append(
                (
                    "hold",
                    f"{h.held} held for {h.seconds:.1f} s   dropped {_counts(h.dropped)}   pings "
                    f"{h.pings} ({h.ping_failures} failed)   publishes {h.publishes} "
                    f"({h.publish_failures} failed){mem}",
                )
            )
        if self.telemetry is not None:
            tm = self.telemetry
            rate = tm.acked / tm.publish_seconds if tm.publish_seconds > 0 else 0.0
            rows.append(
                (
                    "telemetry",
                    f"{tm.devices} devices x {tm.messages_per_device} QoS 1   sent {tm.sent}  acked {tm.acked}  "
                    f"received {tm.received}  lost {len(tm.lost)}  duplicated {len(tm.duplicated)}  "
                    f"received-unacked {tm.unacked_received}",
                )
            )
            waited = (
                f"gave up waiting for the lost ones after {tm.delivery_seconds:.2f} s"
                if tm.lost
                else f"all acked received {tm.delivery_seconds:.2f} s after the last disconnect"
            )
            rows.append(
                (
                    "",
                    f"{rate:.0f} acked msgs/s over {tm.publish_seconds:.2f} s; {waited}   foreign {tm.foreign}",
                )
            )
        if self.broker is not None:
            b = self.broker
            per_join = self.cpu_ms_per_join
            pj = f" ({per_join:.2f} ms/join)" if per_join is not None else ""
            rows.append(
                (
                    "broker",
                    f"CPU {b.cpu_seconds:.2f} s{pj}   RSS {_mb(b.rss_before)} -> "
                    f"{_mb(b.rss_after)} (peak seen {_mb(b.rss_peak_seen)})",
                )
            )
        for note in self.notes:
            rows.append(("note", note))
        problems = self.problems()
        rows.append(("result", "OK" if not problems else "FAILED"))
        rows += [("", f"- {p}") for p in problems]
        width = max(len(k) for k, _ in rows) + 2
        return "\n".join(f"{k:<{width}}{v}" for k, v in rows)

    def _region_rows(self) -> list[tuple[str, str]]:
        regions = self.by_region()
        if not regions:
            return []
        width = max(len(r.region) for r in regions)
        rows = [
            (
                "regions",
                f"{'region':<{width}}  {'joins':>9}  {'CONNACK p50':>11}  {'p99':>9}  "
                f"{'events':>9}  {'wrong region':>12}  failures",
            )
        ]
        for r in regions:
            p50, p99 = percentile(r.connack_latencies, 50), percentile(r.connack_latencies, 99)
            e = r.events
            events = f"{e.seen}/{e.expected}" if e is not None else "-"
            wrong = str(e.mismatched) if e is not None else "-"
            rows.append(
                (
                    "",
                    f"{r.region:<{width}}  {f'{r.joined}/{r.devices}':>9}  {_ms(p50):>11}  "
                    f"{_ms(p99):>9}  {events:>9}  {wrong:>12}  {_counts(r.failures)}"
                    f"{'' if r.ok else '   FAIL'}",
                )
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "scenario": self.scenario,
            "target": self.target,
            "protocol": self.protocol,
            "concurrency": self.concurrency,
            "devices": self.devices,
            "joined": self.joined,
            "duration_s": self.duration,
            "prepare_s": self.prepare_seconds,
            "joins_per_s": self.joins_per_second,
            "failures": self.failures,
            "retries": self.retries,
            "latency_connack_ms": _latency_json(self.connack_latencies),
            "latency_event_ms": _latency_json(self.event_latencies),
            "events": _json_or_none(self.events),
            "registry": _json_or_none(self.registry),
            "broker": _json_or_none(self.broker),
            "cpu_ms_per_join": self.cpu_ms_per_join,
            "hold": None,
            "telemetry": _json_or_none(self.telemetry),
            "chaos": [dict(asdict(c), ok=c.ok) for c in self.chaos],
            "notes": list(self.notes),
            "issues": list(self.issues),
            "problems": self.problems(),
            "ok": self.ok,
        }
        doc["regions"] = {r.region: r.to_json() for r in self.by_region()} or None
        if self.hold is not None:
            doc["hold"] = dict(
                asdict(self.hold),
                dropped=dict(self.hold.dropped),
                rss_per_connection=self.hold.rss_per_connection,
            )
        return doc

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")


def _telemetry_problems(t: TelemetryCheck) -> list[str]:
    out: list[str] = []
    if t.lost:
        devices = len({d for d, _ in t.lost})
        out.append(
            f"{len(t.lost)} acknowledged telemetry message(s) of {devices} device(s) never arrived, "
            f"e.g. {_keys(t.lost)}"
        )
    if t.unknown:
        out.append(
            f"{len(t.unknown)} telemetry message(s) received that were never sent, e.g. {_keys(t.unknown)}"
        )
    if t.misrouted:
        out.append(f"{t.misrouted} telemetry message(s) received on another device's topic")
    if t.publish_failures:
        out.append(f"telemetry: devices that could not publish every message: {_counts(t.publish_failures)}")
    return out


def _keys(keys: Sequence[tuple[str, int]], limit: int = 5) -> str:
    return ", ".join(f"{d}#{seq}" for d, seq in keys[:limit])


def _json_or_none(value: Any) -> Any:
    return None if value is None else asdict(value)


def _counts(counts: Mapping[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _latency(values: Sequence[float]) -> str:
    if not values:
        return "-"
    parts = [
        f"{name} {_pct(values, p) * 1000:8.1f} ms" for name, p in (("p50", 50), ("p90", 90), ("p99", 99))
    ]
    return "  ".join(parts) + f"  max {max(values) * 1000:8.1f} ms   (n={len(values)})"


def _latency_json(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {name: _pct(values, p) * 1000 for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


def _pct(values: Sequence[float], p: float) -> float:
    """``percentile`` of a non-empty sequence."""
    value = percentile(values, p)
    assert value is not None
    return value


def write_histogram(report: Report, path: Path) -> str:
    """Write a latency histogram PNG if matplotlib is installed; returns a message either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            f"histogram skipped: matplotlib is not installed (pip install 'jitp[plot]'); not writing {path}"
        )
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in (
        ("connect -> CONNACK", report.connack_latencies),
        ("connect -> event", report.event_latencies),
    ):
        if values:
            ax.hist([v * 1000 for v in values], bins=60, alpha=0.6, label=label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("devices")
    ax.set_title(f"{report.scenario}: {report.joined} joins, {report.joins_per_second:.0f} joins/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"histogram written to {path}"
