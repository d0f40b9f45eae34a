"""Device records: what the registry keeps about a provisioned device."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any


class DeviceStatus(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    REVOKED = "revoked"
    QUARANTINED = "quarantined"
    DEPROVISIONED = "deprovisioned"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    status: DeviceStatus
    cert_fingerprint: str
    ca_id: str
    region: str
    serial: str
    subject: str
    not_after: datetime
    provisioned_at: datetime
    last_seen: datetime | None
    attributes: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    template: str | None = None
    template_version: int | None = None
    # The effective configuration delivered to the device: namespace and connectivity profile.
    config: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape (``jitp devices show --json``)."""
        return {
            "device_id": self.device_id,
            "status": str(self.status),
            "cert_fingerprint": self.cert_fingerprint,
            "ca_id": self.ca_id,
            "region": self.region,
            "serial": self.serial,
            "subject": self.subject,
            "not_after": _iso(self.not_after),
            "provisioned_at": _iso(self.provisioned_at),
            "last_seen": _iso(self.last_seen),
            "attributes": dict(self.attributes),
            "template": self.template,
            "template_version": self.template_version,
            "config": dict(self.config),
        }


# -- lifecycle ------------------------------------------------------------------------------
class EventType(enum.StrEnum):
    """What a provisioning event says happened (``$jitp/events/<type>/<device_id>``)."""

    PROVISIONED = "provisioned"
    REPROVISIONED = "reprovisioned"
    CONFIG_CHANGED = "config-changed"
    REVOKED = "revoked"
    DISABLED = "disabled"
    ENABLED = "enabled"
    QUARANTINED = "quarantined"
    DEPROVISIONED = "deprovisioned"
    ALLOWED = "allowed"
    ERASED = "erased"
    CERTIFICATE_ISSUED = "certificate-issued"  # a device's first operational certificate committed
    CERTIFICATE_ROTATED = "certificate-rotated"  # a renewal committed (old and new fingerprints)


class ReprovisionPolicy(enum.StrEnum):
    """What a known device id presenting a new certificate does (a template's ``reprovision``)."""

    REJECT = "reject"  # a new certificate for a known id is an identity conflict
    ROTATE = "rotate"  # keep the record and history, record the new certificate, emit reprovisioned
    RESET = "reset"  # new record state, emit reprovisioned with reset: true


class Command(enum.StrEnum):
    """Operator lifecycle commands (``jitp devices <command> ID``)."""

    REVOKE = "revoke"
    DISABLE = "disable"
    ENABLE = "enable"
    QUARANTINE = "quarantine"
    DEPROVISION = "deprovision"
    ALLOW = "allow"


# command -> (statuses it applies to, resulting status, event type)
_S = DeviceStatus
_E = EventType
TRANSITIONS: dict[Command, tuple[frozenset[DeviceStatus], DeviceStatus, EventType]] = {
    Command.REVOKE: (
        frozenset({_S.ACTIVE, _S.DISABLED, _S.QUARANTINED, _S.DEPROVISIONED}),
        _S.REVOKED,
        _E.REVOKED,
    ),
    Command.DISABLE: (frozenset({_S.ACTIVE, _S.QUARANTINED}), _S.DISABLED, _E.DISABLED),
    Command.ENABLE: (frozenset({_S.DISABLED, _S.QUARANTINED}), _S.ACTIVE, _E.ENABLED),
    Command.QUARANTINE: (frozenset({_S.ACTIVE, _S.DISABLED}), _S.QUARANTINED, _E.QUARANTINED),
    Command.DEPROVISION: (
        frozenset({_S.ACTIVE, _S.DISABLED, _S.QUARANTINED, _S.REVOKED}),
        _S.DEPROVISIONED,
        _E.DEPROVISIONED,
    ),
    Command.ALLOW: (frozenset({_S.DEPROVISIONED, _S.REVOKED}), _S.ACTIVE, _E.ALLOWED),
}

# Statuses a connecting device is admitted in (quarantined: with the quarantine namespace).
ADMITTED = frozenset({DeviceStatus.ACTIVE, DeviceStatus.QUARANTINED})


def transition(current: DeviceStatus, command: Command) -> DeviceStatus | None:
    """The status ``command`` moves a device to; None if it is already there (idempotent).

    Raises ValueError with a message an operator can act on when the command does not apply.
    """
    sources, target, _ = TRANSITIONS[command]
    if current == target:
        return None
    if current not in sources:
        hint = {
            DeviceStatus.REVOKED: "it is revoked; use 'allow' to readmit it",
            DeviceStatus.DEPROVISIONED: "it is deprovisioned; use 'allow' to readmit it",
        }.get(current, f"it is {current}")
        raise ValueError(f"cannot {command} this device: {hint}")
    return target


def status_event_type(command: Command) -> EventType:
    return TRANSITIONS[command][2]
