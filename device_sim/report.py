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

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.duplicates or self.lost)


@dataclass(frozen=True)
class RegistryCheck:
    checked: int
    missing: tuple[str, ...]  # joined devices absent from the registry
    event_counts_wrong: tuple[str, ...]  # joined devices without exactly one provisioned event
    leaked: tuple[str, ...]  # refused identities that appear in the registry

    @property
    def ok(self) -> bool:
        return not (self.missing or self.event_counts_wrong or self.leaked)


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
    notes: tuple[str, ...] = field(default=())  # informational
    issues: tuple[str, ...] = field(default=())  # further failures found by the scenario

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
            out += [f"chaos {c.name} ({c.device_id!r}): expected {' or '.join(c.expected)}, got {c.observed}"
                    for c in self.chaos if not c.ok]
        else:
            out += [f"{n} device(s) failed to join: {reason}" for reason, n in sorted(self.failures.items())]
        if self.events is not None:
            e = self.events
            if e.lost:
                out.append(f"{len(e.lost)} provisioned event(s) lost, e.g. {', '.join(e.lost[:5])}")
            if e.duplicates:
                out.append(f"{len(e.duplicates)} device(s) with duplicate events, e.g. {', '.join(e.duplicates[:5])}")
            if e.unexpected:
                out.append(f"{len(e.unexpected)} unexpected new provisioned event(s), "
                           f"e.g. {', '.join(e.unexpected[:5])}")
        if self.registry is not None:
            r = self.registry
            if r.missing:
                out.append(f"{len(r.missing)} joined device(s) missing from the registry, e.g. {r.missing[:5]}")
            if r.event_counts_wrong:
                out.append(f"{len(r.event_counts_wrong)} device(s) without exactly one provisioned event in the "
                           f"registry, e.g. {r.event_counts_wrong[:5]}")
            if r.leaked:
                out.append(f"{len(r.leaked)} refused identities found in the registry: {r.leaked[:5]}")
        out += list(self.issues)
        if self.hold is not None and not self.hold.ok:
            h = self.hold
            out.append(f"hold: dropped {dict(h.dropped)}, ping failures {h.ping_failures}, "
                       f"publish failures {h.publish_failures}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()

    # -- output ----------------------------------------------------------------------------
    def table(self) -> str:
        rows: list[tuple[str, str]] = []
        conc = f"   concurrency {self.concurrency}" if self.concurrency else ""
        rows.append(("scenario", f"{self.scenario}   target {self.target}   devices {self.devices}{conc}"))
        if self.chaos:
            for c in self.chaos:
                verdict = "ok" if c.ok else "FAIL"
                rows.append((f"  {c.name}", f"{c.observed:28} expected {' | '.join(c.expected):34} {verdict}"))
        else:
            rows.append(("joins", f"{self.joined} / {self.devices} in {self.duration:.2f} s   "
                                  f"{self.joins_per_second:.1f} joins/s   (TLS contexts built in "
                                  f"{self.prepare_seconds:.2f} s, not timed)"))
            rows.append(("failures", _counts(self.failures)))
            rows.append(("retried", _counts(self.retries)))
            rows.append(("connect->CONNACK", _latency(self.connack_latencies)))
            if self.event_latencies:
                rows.append(("connect->event", _latency(self.event_latencies)))
        if self.events is not None:
            e = self.events
            rows.append(("events", f"expected {e.expected}  seen {e.seen}  new {e.new_events}  duplicates "
                                   f"{len(e.duplicates)}  lost {len(e.lost)}  unexpected {len(e.unexpected)}  "
                                   f"redelivered {e.redeliveries}  stale {e.stale}"))
        if self.registry is not None:
            r = self.registry
            rows.append(("registry", f"checked {r.checked}  missing {len(r.missing)}  wrong event count "
                                     f"{len(r.event_counts_wrong)}  refused-but-recorded {len(r.leaked)}"))
        if self.hold is not None:
            h = self.hold
            per = h.rss_per_connection
            mem = f"   broker RSS/connection {per / 1024:.1f} KiB" if per is not None else ""
            rows.append(("hold", f"{h.held} held for {h.seconds:.1f} s   dropped {_counts(h.dropped)}   pings "
                                 f"{h.pings} ({h.ping_failures} failed)   publishes {h.publishes} "
                                 f"({h.publish_failures} failed){mem}"))
        if self.broker is not None:
            b = self.broker
            per_join = self.cpu_ms_per_join
            pj = f" ({per_join:.2f} ms/join)" if per_join is not None else ""
            rows.append(("broker", f"CPU {b.cpu_seconds:.2f} s{pj}   RSS {_mb(b.rss_before)} -> "
                                   f"{_mb(b.rss_after)} (peak seen {_mb(b.rss_peak_seen)})"))
        for note in self.notes:
            rows.append(("note", note))
        problems = self.problems()
        rows.append(("result", "OK" if not problems else "FAILED"))
        rows += [("", f"- {p}") for p in problems]
        width = max(len(k) for k, _ in rows) + 2
        return "\n".join(f"{k:<{width}}{v}" for k, v in rows)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "scenario": self.scenario, "target": self.target, "concurrency": self.concurrency,
            "devices": self.devices, "joined": self.joined, "duration_s": self.duration,
            "prepare_s": self.prepare_seconds, "joins_per_s": self.joins_per_second,
            "failures": self.failures, "retries": self.retries,
            "latency_connack_ms": _latency_json(self.connack_latencies),
            "latency_event_ms": _latency_json(self.event_latencies),
            "events": _json_or_none(self.events), "registry": _json_or_none(self.registry),
            "broker": _json_or_none(self.broker), "cpu_ms_per_join": self.cpu_ms_per_join,
            "hold": None, "chaos": [dict(asdict(c), ok=c.ok) for c in self.chaos],
            "notes": list(self.notes), "issues": list(self.issues), "problems": self.problems(), "ok": self.ok,
        }
        if self.hold is not None:
            doc["hold"] = dict(asdict(self.hold), dropped=dict(self.hold.dropped),
                               rss_per_connection=self.hold.rss_per_connection)
        return doc

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")


def _json_or_none(value: Any) -> Any:
    return None if value is None else asdict(value)


def _counts(counts: Mapping[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _latency(values: Sequence[float]) -> str:
    if not values:
        return "-"
    parts = [f"{name} {percentile(values, p) * 1000:8.1f} ms" for name, p in  # type: ignore[operator]
             (("p50", 50), ("p90", 90), ("p99", 99))]
    return "  ".join(parts) + f"  max {max(values) * 1000:8.1f} ms   (n={len(values)})"


def _latency_json(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {name: percentile(values, p) * 1000 for name, p in  # type: ignore[operator]
            (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


def write_histogram(report: Report, path: Path) -> str:
    """Write a latency histogram PNG if matplotlib is installed; returns a message either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"histogram skipped: matplotlib is not installed (pip install 'jitp[plot]'); not writing {path}"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in (("connect -> CONNACK", report.connack_latencies),
                          ("connect -> event", report.event_latencies)):
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
