"""Topic access control: a pure function of (principal, action, topic), property-tested.

Default namespaces (templates may widen them later):

* a device ``D`` publishes under ``devices/D/#``; subscribes to and receives ``devices/D/cmd/#``
  and ``$jitp/devices/D/#`` (its retained configuration);
* a service reads ``$jitp/events/#`` and all device telemetry (``#``, which never matches
  ``$`` topics), to route and attribute it, and publishes nothing;
* services, auditors, operators and admins read ``$jitp/alerts/#`` (anomaly alerts);
* nobody else gets anything. ``$jitp/events/#``, ``$jitp/alerts/#`` and ``$jitp/admin/#`` are never a device's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from jitp.domain.certificates import certificates_filter, request_topic
from jitp.domain.records import DeviceRecord, DeviceStatus
from jitp.trust import Role


class Access(enum.StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


def topic_matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 topic-filter matching (section 4.7), including the ``$`` rule."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return i == len(f_levels) - 1
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(t_levels) == len(f_levels)


def valid_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def filter_within(inner: str, outer: str) -> bool:
    """True if every topic matched by filter ``inner`` is matched by filter ``outer``."""
    if not (valid_filter(inner) and valid_filter(outer)):
        return False
    # The "$" rule (MQTT 3.1.1 section 4.7.2): a filter starting with a wildcard never matches a
    # topic starting with "$", and a literal first level matches only topics that share its "$"-ness.
    # So every topic of ``inner`` starts with "$" iff ``inner`` does, and ``outer`` can only cover
    # them if it also starts with "$" (in particular "+/..." or "#" never covers "$jitp/...").
    if inner.startswith("$") != outer.startswith("$"):
        return False
    i_levels = inner.split("/")
    o_levels = outer.split("/")
    for i, o in enumerate(o_levels):
        if o == "#":
            return True
        if i >= len(i_levels):
            return False
        level = i_levels[i]
        if level == "#":
            return False
        if o == "+":
            continue
        if level == "+" or level != o:
            return False
    return len(i_levels) == len(o_levels)


@dataclass(frozen=True)
class Namespace:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def allows(self, action: Access, topic: str) -> bool:
        if not topic or "\x00" in topic:
            return False
        if action is Access.PUBLISH:
            return (
                valid_filter(topic)
                and "+" not in topic
                and "#" not in topic
                and any(topic_matches(topic, f) for f in self.publish)
            )
        if action is Access.SUBSCRIBE:
            return any(filter_within(topic, f) for f in self.subscribe)
        return "+" not in topic and "#" not in topic and any(topic_matches(topic, f) for f in self.subscribe)


def device_namespace(device_id: str) -> Namespace:
    return Namespace(
        publish=(f"devices/{device_id}/#", status_topic(device_id)),
        subscribe=(f"devices/{device_id}/cmd/#", f"$jitp/devices/{device_id}/#"),
    )


def status_topic(device_id: str) -> str:
    """Where a device reports its own status (the one $-topic a device may publish to)."""
    return f"$jitp/devices/{device_id}/status"


def quarantine_namespace(device_id: str) -> Namespace:
    """A quarantined device may only report its status and read its configuration."""
    return Namespace(publish=(status_topic(device_id),), subscribe=(f"$jitp/devices/{device_id}/config",))


ALERTS = "$jitp/alerts/#"  # anomaly alerts (jitp.domain.alerts): services and every admin role, never devices
SERVICE_NAMESPACE = Namespace(publish=(), subscribe=("$jitp/events/#", ALERTS, "$jitp/devices/+/status", "#"))
NOBODY = Namespace(publish=(), subscribe=())


ADMIN_REQUESTS = "$jitp/admin/"


def admin_replies(client_id: str) -> str:
    """The filter under which a principal gets its admin API responses."""
    return f"$jitp/admin/replies/{client_id}/#"


def principal_namespace(role: str, client_id: str) -> Namespace:
    """Backend principals (service, auditor, operator, admin): the admin API, and for services the
    event feed and telemetry. Which admin commands a role may run is decided per request."""
    admin = Namespace(publish=(f"{ADMIN_REQUESTS}#",), subscribe=(admin_replies(client_id),))
    if role == "service":
        return Namespace(publish=admin.publish, subscribe=(*SERVICE_NAMESPACE.subscribe, *admin.subscribe))
    return Namespace(publish=admin.publish, subscribe=(ALERTS, *admin.subscribe))


def with_certificates(ns: Namespace, device_id: str) -> Namespace:
    """``ns`` plus the device's own certificate API: publish its CSR requests, read their answers."""
    return Namespace(
        publish=(*ns.publish, request_topic(device_id)),
        subscribe=(*ns.subscribe, certificates_filter(device_id)),
    )


def enrollment_namespace(device_id: str) -> Namespace:
    """A factory certificate under ``birth_certificate: enroll_only``, once enrolled: re-enroll only."""
    return with_certificates(NOBODY, device_id)


def namespace_for(role: Role, client_id: str, record: DeviceRecord | None) -> Namespace:
    """The namespace an admitted client gets: a principal's by its role; a device's from its record
    (its template's namespace, or the default; quarantined: status and configuration only); a claim
    certificate's: its own certificate API under its client id, nothing else."""
    if role is Role.CLAIM:
        return with_certificates(NOBODY, client_id)
    if role is not Role.DEVICE:
        return principal_namespace(str(role), client_id)
    if record is None:
        return NOBODY
    if record.status == DeviceStatus.QUARANTINED:
        return quarantine_namespace(record.device_id)
    ns = record.config.get("namespace")
    if isinstance(ns, dict):
        own = Namespace(publish=tuple(ns.get("publish", ())), subscribe=tuple(ns.get("subscribe", ())))
        return with_certificates(own, record.device_id)
    return with_certificates(device_namespace(record.device_id), record.device_id)
