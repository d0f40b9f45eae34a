"""``jitp status``: a one-screen summary of a fleet, from the registry alone (any node, or the CLI).

Devices by status and region, joins and refusals in the last minutes (from the audit trail, so
coalesced refusals count every occurrence), open alerts, the outbox and NATS backlog, and the
nearest expiry of a CA, a CRL and a device certificate.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from jitp.domain.alerts import ACK_ACTION, ALERT_ACTION, alerts_from_audit
from jitp.domain.audit import verify_chain
from jitp.registry import Registry
from jitp.trust import Role

NATS_SINK = "nats"
JOIN_ACTIONS = frozenset({"provisioned", "reprovisioned"})


async def audit_check(registry: Registry) -> tuple[list[str], int, str]:
    """``jitp audit verify``'s check: (problems, entries, head hash). No problems: the trail is intact."""
    entries = await registry.audit_entries()
    problems = verify_chain(entries)
    head = await registry.audit_head()
    if head is not None and (not entries or (entries[-1].seq, entries[-1].hash) != head):
        last = entries[-1].seq if entries else 0
        problems.append(
            f"the newest entries were removed: the registry last appended entry {head[0]}, the log ends at {last}"
        )
    return problems, len(entries), entries[-1].hash if entries else "-"


async def fleet_status(registry: Registry, *, now: datetime, minutes: int = 5) -> dict[str, Any]:
    stats = await registry.fleet_stats()
    by_status: dict[str, int] = {}
    by_region: dict[str, int] = {}
    for (status, region), count in stats.devices.items():
        by_status[status] = by_status.get(status, 0) + count
        by_region[region] = by_region.get(region, 0) + count
    since = now - timedelta(minutes=minutes)
    entries = await registry.audit_entries()
    joins = refusals = 0
    refusal_reasons: dict[str, int] = {}
    for entry in entries:
        d = entry.draft
        if d.at < since:
            continue
        if d.action in JOIN_ACTIONS:
            joins += 1
        elif d.action == "refused":
            n = int(str(d.details.get("count", "1"))) if d.details.get("coalesced") == "true" else 1
            refusals += n
            refusal_reasons[d.reason or "?"] = refusal_reasons.get(d.reason or "?", 0) + n
    alert_entries = [e for e in entries if e.draft.action in (ALERT_ACTION, ACK_ACTION)]
    alerts = [a for a in alerts_from_audit(await registry.resolve_audit(alert_entries)) if a.open]
    head = await registry.outbox_head()
    nats_cursor = await registry.sink_cursor(NATS_SINK)
    anchors = [a for a in await registry.anchors() if a.enabled]
    ca_expiry = min(
        ((a.certificate.not_valid_after_utc, a) for a in anchors if a.role is Role.DEVICE),
        default=None,
        key=lambda pair: pair[0],
    )
    crl_next: tuple[datetime, str] | None = None
    for ca_id, der in (await registry.crls()).items():
        next_update = x509.load_der_x509_crl(der).next_update_utc
        if next_update is not None and (crl_next is None or next_update < crl_next[0]):
            crl_next = (next_update, ca_id)
    active = [when for status, _, when in stats.not_after if status == "active"]
    return {
        "at": now.isoformat(),
        "devices": {"total": sum(by_status.values()), "by_status": by_status, "by_region": by_region},
        f"last_{minutes}_minutes": {
            "joins": joins,
            "refusals": refusals,
            "refusal_reasons": refusal_reasons,
        },
        "alerts": {
            "open": len(alerts),
            "by_kind": {k: sum(1 for a in alerts if a.kind == k) for k in sorted({a.kind for a in alerts})},
            "newest": [
                {
                    "alert_id": a.alert_id,
                    "kind": str(a.kind),
                    "severity": str(a.severity),
                    "count": a.count,
                    "last_seen": a.last_seen.isoformat(),
                }
                for a in sorted(alerts, key=lambda a: a.last_seen, reverse=True)[:5]
            ],
        },
        "outbox": {
            "pending": stats.outbox_pending,
            "oldest_seconds": round((now - stats.outbox_oldest).total_seconds(), 1)
            if stats.outbox_oldest
            else 0.0,
            "nats_lag_events": max(0, head - nats_cursor) if nats_cursor else None,
        },
        "expiry": {
            "ca": {
                "ca_id": ca_expiry[1].ca_id,
                "subject": ca_expiry[1].subject,
                "not_after": ca_expiry[0].isoformat(),
            }
            if ca_expiry
            else None,
            "crl": {"ca_id": crl_next[1], "next_update": crl_next[0].isoformat()} if crl_next else None,
            "device_certificate": min(active).isoformat() if active else None,
            "devices_expiring_30d": stats.expiring(now, 30),
        },
    }
