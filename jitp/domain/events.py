"""Provisioning events: what downstream subscribers receive.

Schema ``jitp.event/1`` (JSON object, UTF-8), published at QoS 1 on
``$jitp/events/<type>/<device_id>``:

    schema            "jitp.event/1"
    event_id          unique id (UUID4 string), stable across redeliveries
    type              "provisioned" | "reprovisioned" (below); lifecycle events ("revoked",
                      "disabled", "enabled", "quarantined", "deprovisioned", "allowed", "erased")
                      carry schema, event_id, type, occurred_at, device_id, status,
                      previous_status, region and reason
    occurred_at       ISO-8601 UTC timestamp of the registry change
    device_id         the device id
    cert_fingerprint  SHA-256 hex of the device certificate's DER
    ca_id             SHA-256 hex of the trust anchor the chain validated to
    region            region or tenant of the device
    serial            certificate serial number, lowercase hex
    not_after         certificate expiry, ISO-8601
    provisioned_at    ISO-8601, when the record was created
    attributes        object: device metadata (type, location, capabilities, ...)
    template          name of the enrollment template
    template_version  its version
    namespace         {"publish": [...], "subscribe": [...]}: the device's topic namespace
    profile           connectivity profile: keepalive {min, max}, max_qos, max_message_size,
                      rate_limit {messages, per_seconds}, hints {...}
    reprovisioned only:
    previous_fingerprint  the certificate this one replaced
    reset                 true when the record was reset (policy "reset"), false for "rotate"
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jitp.domain.records import DeviceRecord, EventType

SCHEMA = "jitp.event/1"
EVENTS_PREFIX = "$jitp/events"


def event_topic(event_type: EventType, device_id: str) -> str:
    return f"{EVENTS_PREFIX}/{event_type}/{device_id}"


# Events that carry a configuration (re-retained on the device's config topic).
CONFIG_EVENTS = frozenset(
    {
        EventType.PROVISIONED,
        EventType.REPROVISIONED,
        EventType.CONFIG_CHANGED,
        EventType.CERTIFICATE_ISSUED,  # the configuration gains certificate: {not_after, renew_after}
        EventType.CERTIFICATE_ROTATED,
    }
)
_CONFIG_KEYS = ("device_id", "region", "attributes", "template", "template_version", "namespace", "profile")


def config_topic(device_id: str) -> str:
    """Where a device reads its effective configuration (retained; only that device may read it)."""
    return f"$jitp/devices/{device_id}/config"


def config_payload(doc: dict[str, Any]) -> bytes:
    """The retained configuration document: the configuration keys of an event or a record, and
    ``certificate: {not_after, renew_after}`` once the device has an operational certificate."""
    config = {k: doc.get(k) for k in _CONFIG_KEYS}
    if doc.get("certificate"):
        config["certificate"] = doc["certificate"]
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def record_config_payload(record: DeviceRecord) -> bytes:
    return config_payload(
        {
            "device_id": record.device_id,
            "region": record.region,
            "attributes": dict(record.attributes),
            "template": record.template,
            "template_version": record.template_version,
            **dict(record.config),
        }
    )


@dataclass(frozen=True)
class ProvisioningEvent:
    event_id: str
    type: EventType
    device_id: str
    occurred_at: datetime
    payload: bytes  # the JSON document, fixed when the event is created

    @property
    def topic(self) -> str:
        return event_topic(self.type, self.device_id)

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.payload)
        return doc


def new_event_id() -> str:
    return str(uuid.uuid4())


def provisioned_event(
    record: DeviceRecord,
    *,
    event_id: str,
    at: datetime,
    type: EventType = EventType.PROVISIONED,
    **extra: Any,
) -> ProvisioningEvent:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "event_id": event_id,
        "type": type,
        "occurred_at": at.isoformat(),
        "device_id": record.device_id,
        "cert_fingerprint": record.cert_fingerprint,
        "ca_id": record.ca_id,
        "region": record.region,
        "serial": record.serial,
        "not_after": record.not_after.isoformat(),
        "provisioned_at": record.provisioned_at.isoformat(),
        "attributes": dict(record.attributes),
        "template": record.template,
        "template_version": record.template_version,
        "namespace": dict(record.config).get("namespace"),
        "profile": dict(record.config).get("profile"),
        **extra,
    }
    payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return ProvisioningEvent(
        event_id=event_id, type=type, device_id=record.device_id, occurred_at=at, payload=payload
    )


def lifecycle_event(
    device_id: str,
    *,
    type: EventType,
    event_id: str,
    at: datetime,
    status: str,
    previous_status: str | None,
    region: str | None,
    reason: str | None = None,
) -> ProvisioningEvent:
    """revoked, disabled, enabled, quarantined, deprovisioned, allowed, erased."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "event_id": event_id,
        "type": type,
        "occurred_at": at.isoformat(),
        "device_id": device_id,
        "status": status,
        "previous_status": previous_status,
        "region": region,
        "reason": reason,
    }
    payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return ProvisioningEvent(
        event_id=event_id, type=type, device_id=device_id, occurred_at=at, payload=payload
    )
