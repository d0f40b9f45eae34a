"""The broker node's observer: metrics, detectors and the alert manager behind the core's port."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime

from jitp import errors
from jitp.domain.alerts import Alert, AlertKind, Signal
from jitp.observability.detectors import (
    BurstRule,
    CloneDetector,
    CloneRule,
    RefusalBurstDetector,
    SpikeDetector,
    SpikeRule,
)
from jitp.observability.metrics import Metrics
from jitp.observability.port import JoinOutcome
from jitp.registry import Registry

log = logging.getLogger("jitp.alerts")

Publish = Callable[[str, bytes], object]  # (topic, payload), published at QoS 1
Action = Callable[[Alert], Awaitable[None]]
Clock = Callable[[], datetime]
LONG_WINDOW_KINDS = frozenset({AlertKind.CA_EXPIRY, AlertKind.CRL_EXPIRY, AlertKind.CERT_EXPIRY})


@dataclass
class _Open:
    alert: Alert
    written_count: int  # the count the audit trail (and the topic) last carried
    peer: str | None = None
    detail: str | None = None


class AlertManager:
    """Signals -> alerts, de-duplicated: the first signal of a (kind, key) opens an alert, which is
    audited and published at once; repeats within the window only count, and :meth:`flush` writes
    (and publishes) the new count once, with the same ``alert_id``. A signal after the window
    opens a new alert."""

    def __init__(
        self,
        registry: Registry,
        *,
        coalesce_window: float,
        long_window: float,
        metrics: Metrics | None = None,
        actions: dict[AlertKind, Action] | None = None,
    ) -> None:
        self.registry = registry
        self.coalesce_window = coalesce_window
        self.long_window = long_window
        self.metrics = metrics
        self.actions = actions or {}
        self.publish: Publish | None = None  # set once the broker runs
        self._open: dict[tuple[AlertKind, str], _Open] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _window(self, kind: AlertKind) -> float:
        return self.long_window if kind in LONG_WINDOW_KINDS else self.coalesce_window

    def signal(self, s: Signal) -> Alert:
        """Count a signal into its open alert, or open one (audited and published by a task)."""
        key = (s.kind, s.key)
        found = self._open.get(key)
        if found is not None and (s.at - found.alert.first_seen).total_seconds() < self._window(s.kind):
            found.alert = replace(
                found.alert, count=found.alert.count + 1, last_seen=s.at, evidence=s.evidence
            )
            return found.alert
        alert = Alert(
            alert_id=str(uuid.uuid4()),
            kind=s.kind,
            severity=s.severity,
            first_seen=s.at,
            last_seen=s.at,
            count=1,
            ca=s.ca,
            region=s.region,
            device_id=s.device_id,
            evidence=s.evidence,
        )
        detail = s.key if s.key.startswith("net:") else None  # a network: sealed in the audit
        self._open[key] = _Open(alert=alert, written_count=0, peer=s.peer, detail=detail)
        if len(self._open) > 10_000:
            self._open.pop(next(iter(self._open)))
        if self.metrics is not None:
            self.metrics.alerts.labels(kind=str(s.kind)).inc()
        task = asyncio.get_running_loop().create_task(self._opened(key, alert), name="jitp-alert")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return alert

    async def _opened(self, key: tuple[AlertKind, str], alert: Alert) -> None:
        """Audit and publish a new alert as it was opened (count 1); repeats go out with flush()."""
        entry = self._open.get(key)
        if entry is None or entry.alert.alert_id != alert.alert_id:
            return  # evicted (bounded memory) before it was written
        if alert.device_id is not None and (alert.ca is None or alert.region is None):
            try:
                record = await self.registry.get_device(alert.device_id)
            except errors.ProvisioningError:
                record = None
            if record is not None:
                alert = replace(alert, ca=alert.ca or record.ca_id, region=alert.region or record.region)
                entry.alert = replace(entry.alert, ca=alert.ca, region=alert.region)
        log.warning(
            "ALERT %s (%s): %s",
            alert.kind,
            alert.severity,
            alert.alert_id,
            extra={
                "event": "alert",
                "reason": str(alert.kind),
                "ca": alert.ca,
                "region": alert.region,
                "device": alert.device_id,
            },
        )
        await self._write(entry, alert)
        action = self.actions.get(alert.kind)
        if action is not None:
            try:
                await action(alert)
            except errors.ProvisioningError as exc:
                log.error("alert %s: action failed: %s", alert.alert_id, exc)

    async def _write(self, entry: _Open, alert: Alert) -> None:
        entry.written_count = alert.count
        try:
            await self.registry.append_audit([alert.audit_draft(peer=entry.peer, detail=entry.detail)])
        except errors.ProvisioningError as exc:
            log.error("could not audit alert %s: %s", alert.alert_id, exc)
        if self.publish is not None:
            self.publish(alert.topic, alert.payload())

    async def flush(self, now: datetime, *, force: bool = False) -> int:
        """Write the new counts of coalesced alerts; close alerts whose window ended. Returns how
        many alerts were written."""
        written = 0
        for key, entry in list(self._open.items()):
            closed = force or (now - entry.alert.first_seen).total_seconds() >= self._window(key[0])
            if entry.alert.count > entry.written_count and entry.written_count > 0:
                await self._write(entry, entry.alert)
                written += 1
            if closed and entry.written_count > 0:
                self._open.pop(key, None)
        return written

    async def drain(self) -> None:
        """Wait for alerts being written (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Monitor:
    """The :class:`~jitp.observability.port.Observer` of a broker node."""

    def __init__(
        self,
        *,
        clock: Clock,
        metrics: Metrics | None = None,
        alerts: AlertManager | None = None,
        clone: CloneRule | None = None,
        burst: BurstRule | None = None,
        spike: SpikeRule | None = None,
    ) -> None:
        self.clock = clock
        self.metrics = metrics
        self.alerts = alerts
        self.clone = CloneDetector(clone or CloneRule())
        self.burst = RefusalBurstDetector(burst or BurstRule())
        self.spike = SpikeDetector(spike or SpikeRule())

    def _raise(self, signals: list[Signal]) -> None:
        if self.alerts is not None:
            for s in signals:
                self.alerts.signal(s)

    def joined(
        self,
        outcome: JoinOutcome,
        *,
        at: datetime,
        reason: str = "",
        ca: str = "",
        template: str = "",
        region: str = "",
        peer: str | None = None,
        device_id: str | None = None,
    ) -> None:
        if self.metrics is not None:
            self.metrics.joins.labels(
                outcome=str(outcome), reason=reason, ca=ca, template=template, region=region
            ).inc()
        if self.alerts is None:
            return
        if outcome is JoinOutcome.REFUSED:
            self._raise(self.burst.refused(at=at, reason=reason, ca=ca, peer=peer))
        elif outcome is JoinOutcome.PROVISIONED and ca:
            self._raise(self.spike.provisioned(at=at, ca=ca, region=region or None))

    def limit_hit(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.limits.labels(reason=reason).inc()

    def takeover(
        self,
        *,
        at: datetime,
        device_id: str,
        peer: str | None,
        previous_peer: str | None,
        same_certificate: bool,
    ) -> None:
        if self.metrics is not None:
            self.metrics.takeovers.inc()
        self._raise(
            self.clone.takeover(
                at=at,
                device_id=device_id,
                peer=peer,
                previous_peer=previous_peer,
                same_certificate=same_certificate,
            )
        )

    def admit_seconds(self, seconds: float, outcome: JoinOutcome) -> None:
        if self.metrics is not None:
            self.metrics.admit_seconds.labels(outcome=str(outcome)).observe(seconds)

    def registry_commit_seconds(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.commit_seconds.observe(seconds)

    def join_seconds(self, seconds: float, outcome: JoinOutcome) -> None:
        if self.metrics is not None:
            self.metrics.join_seconds.labels(outcome=str(outcome)).observe(seconds)
