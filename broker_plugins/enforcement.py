"""What the broker enforces on an admitted client at CONNECT: keep-alive (W5, W8) and the will (W14).

Per-message enforcement (profile size, rate and QoS; the ACL; quotas) is in
:meth:`broker_plugins.broker.JitpBroker.receive`, the one inbound path.
"""

from __future__ import annotations

import dataclasses

from broker_plugins.session import JitpSession
from jitp import errors
from jitp.config import LimitsConfig
from jitp.domain.acl import Access, namespace_for
from jitp.domain.records import DeviceStatus
from jitp.domain.routing import MessageProperties
from jitp.domain.templates import Profile

RESERVED_SCHEMA = ("schema", "jitp.")  # the user property that marks jitp's own events and alerts


def clamp_keepalive(requested: int, *, limits: LimitsConfig, profile: Profile | None) -> int:
    """W5/W8: the keep-alive clamped to the limits and profile (0, none, gets the ceiling): what an
    MQTT 5 client is told as Server Keep Alive when it differs from what it asked for. Silence for
    this times ``keepalive_grace`` closes the connection."""
    ceiling = limits.max_keepalive
    floor = 0
    if profile is not None:
        ceiling = min(ceiling, profile.keepalive_max)
        floor = profile.keepalive_min
    if requested <= 0 or requested > ceiling:
        requested = ceiling
    return max(requested, floor)


def keepalive(requested: int, *, limits: LimitsConfig, profile: Profile | None) -> float:
    """Seconds of silence that close the connection."""
    return clamp_keepalive(requested, limits=limits, profile=profile) * limits.keepalive_grace


def forged_properties(session: JitpSession, properties: MessageProperties) -> str | None:
    """What a client may not put in an MQTT 5 PUBLISH or will, or None:

    * the user property ``schema=jitp.*`` marks what the broker itself publishes (events, alerts),
      so that a v5 subscriber can trust it; a client's message never carries it;
    * a Response Topic under ``$`` the client could not receive itself (``$jitp/admin/...``,
      another device's ``$jitp/devices/...`` or ``$jitp/certificates/...``): a responder that
      answers where it is asked would publish there in its own name, for the client."""
    key, prefix = RESERVED_SCHEMA
    for name, value in properties.user_properties:
        if name == key and value.startswith(prefix):
            return f"user property {name}={value[:40]!r} is reserved for the broker's own messages"
    response = properties.response_topic
    if response is not None and response.startswith("$") and not session.allows(Access.RECEIVE, response):
        return f"Response Topic {response[:120]!r} is a $-topic the client cannot receive"
    return None


def check_will(session: JitpSession) -> errors.Refused | None:
    """W14 at CONNECT: a will must be a topic the client may publish to (its own status topic is).
    Such a CONNECT is refused (CONNACK 5, audited ``will_not_allowed``) rather than admitted with
    its will dropped: the device learns at once that its configuration is wrong."""
    if not session.will_flag:
        return None
    topic = session.will_topic or ""
    state = session.client
    device_id = state.device_id if state is not None else None
    fingerprint = state.fingerprint if state is not None else None
    if (session.will_qos or 0) > 2:
        return errors.ProtocolViolation(
            "CONNECT with will QoS 3 [MQTT-3.1.2-14]", device_id=device_id, fingerprint=fingerprint
        )
    if "+" in topic or "#" in topic or not session.allows(Access.PUBLISH, topic):
        return errors.WillNotAllowed(
            "the Last Will's topic is outside the client's publish namespace",
            device_id=device_id,
            fingerprint=fingerprint,
            detail=repr(topic)[:120],
        )
    forged = forged_properties(session, session.will_properties)
    if forged is not None:
        return errors.WillNotAllowed(
            f"the Last Will's properties: {forged}",
            device_id=device_id,
            fingerprint=fingerprint,
            detail=repr(topic)[:120],
        )
    return None


def will_allowed_once_released(session: JitpSession) -> bool:
    """True for a quarantined device whose will its normal namespace allows: its CONNECT is admitted
    with the will dropped (audited), so quarantine still lets it report status and read its config."""
    state = session.client
    record = state.admission.record if state is not None else None
    if state is None or record is None or record.status != DeviceStatus.QUARANTINED:
        return False
    released = dataclasses.replace(record, status=DeviceStatus.ACTIVE)
    normal = namespace_for(state.role, state.admission.client_id, released)
    return normal.allows(Access.PUBLISH, session.will_topic or "")
