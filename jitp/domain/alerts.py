"""Alerts (schema ``jitp.alert/1``): what the anomaly detectors raise, and how the audit trail holds them.

An alert is published at QoS 1 on ``$jitp/alerts/<kind>`` and written to the audit trail as an
``alert`` entry (again, with the same ``alert_id`` and a higher ``count``, when repeats were
coalesced into it). An operator's acknowledgement is an ``alert-acked`` entry. The audit trail is
the alerts' only store: every node and the local CLI read the same list from it
(:func:`alerts_from_audit`), and it is hash-chained like everything else there.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any

from jitp.domain.audit import AuditDraft, AuditEntry

SCHEMA = "jitp.alert/1"
ALERTS_TOPIC = "$jitp/alerts/"
ALERT_ACTION = "alert"
ACK_ACTION = "alert-acked"


class AlertKind(enum.StrEnum):
    CLONED_CERTIFICATE = "cloned_certificate"
    REFUSAL_BURST = "refusal_burst"
    PROVISIONING_SPIKE = "provisioning_spike"
    CA_EXPIRY = "ca_expiry"
    CRL_EXPIRY = "crl_expiry"
    CERT_EXPIRY = "cert_expiry"  # devices whose certificate expires soon


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Signal:
    """One detector observation. Signals with the same ``kind`` and ``key`` coalesce into one alert."""

    kind: AlertKind
    key: str  # what the alert is about: a device, a CA, a network ("ca:<id>", "net:10.0.0.0/24")
    severity: Severity
    at: datetime
    ca: str | None = None
    region: str | None = None
    device_id: str | None = None
    evidence: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    peer: str | None = None  # personal data: audited sealed, never published


@dataclass(frozen=True)
class Alert:
    alert_id: str
    kind: AlertKind
    severity: Severity
    first_seen: datetime
    last_seen: datetime
    count: int
    ca: str | None = None
    region: str | None = None
    device_id: str | None = None
    evidence: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    acked_by: str | None = None
    acked_at: datetime | None = None

    @property
    def topic(self) -> str:
        return f"{ALERTS_TOPIC}{self.kind}"

    @property
    def open(self) -> bool:
        return self.acked_by is None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "alert_id": self.alert_id,
            "kind": str(self.kind),
            "severity": str(self.severity),
            "ca": self.ca,
            "region": self.region,
            "device_id": self.device_id,
            "evidence": dict(self.evidence),
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "count": self.count,
        }
        if self.acked_by is not None:
            doc["acked_by"] = self.acked_by
            doc["acked_at"] = self.acked_at.isoformat() if self.acked_at else None
        return doc

    def payload(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    def audit_draft(self, *, peer: str | None = None, detail: str | None = None) -> AuditDraft:
        """The ``alert`` entry. ``peer`` (sealed by the registry) and ``detail`` (sealed for entries
        naming no device) carry what is personal; the evidence is counts and ids only."""
        details: dict[str, str] = {
            "alert_id": self.alert_id,
            "kind": str(self.kind),
            "severity": str(self.severity),
            "ca": self.ca or "",
            "region": self.region or "",
            "evidence": json.dumps(dict(self.evidence), sort_keys=True),
            "first_seen": self.first_seen.isoformat(),
            "count": str(self.count),
        }
        if detail:
            details["detail"] = detail
        return AuditDraft(
            at=self.last_seen,
            action=ALERT_ACTION,
            actor="broker",
            device_id=self.device_id,
            reason=str(self.kind),
            peer=peer,
            details=MappingProxyType(details),
        )


def ack_draft(alert_id: str, *, actor: str, at: datetime, note: str | None = None) -> AuditDraft:
    details = {"alert_id": alert_id, **({"note": note} if note else {})}
    return AuditDraft(at=at, action=ACK_ACTION, actor=actor, details=MappingProxyType(details))


def alerts_from_audit(entries: Iterable[AuditEntry]) -> list[Alert]:
    """Every alert in the audit trail (newest state of each ``alert_id``), oldest first."""
    found: dict[str, Alert] = {}
    for entry in entries:
        d = entry.draft
        if d.action == ALERT_ACTION and "alert_id" in d.details:
            alert_id = str(d.details["alert_id"])
            before = found.get(alert_id)
            try:
                evidence = json.loads(str(d.details.get("evidence", "{}")))
            except ValueError:
                evidence = {}
            found[alert_id] = Alert(
                alert_id=alert_id,
                kind=AlertKind(str(d.details["kind"])),
                severity=Severity(str(d.details["severity"])),
                first_seen=datetime.fromisoformat(str(d.details["first_seen"])),
                last_seen=d.at,
                count=max(int(str(d.details.get("count", "1"))), before.count if before else 0),
                ca=str(d.details.get("ca") or "") or None,
                region=str(d.details.get("region") or "") or None,
                device_id=d.device_id,
                evidence=MappingProxyType(evidence if isinstance(evidence, dict) else {}),
                acked_by=before.acked_by if before else None,
                acked_at=before.acked_at if before else None,
            )
        elif d.action == ACK_ACTION:
            alert_id = str(d.details.get("alert_id", ""))
            if alert_id in found and found[alert_id].acked_by is None:
                found[alert_id] = replace(found[alert_id], acked_by=d.actor, acked_at=d.at)
    return list(found.values())
