"""jitp's decisions as MQTT answers: refusals as CONNACK codes, closes as MQTT 5 DISCONNECT reasons.

The core raises :mod:`jitp.errors`; only this adapter knows MQTT's numbers. A 3.1.1 client gets
its CONNACK return code (5 Not authorized, 3 Server unavailable) and a silent close; an MQTT 5
client gets a reason code and a Reason String naming jitp's refusal reason, never another
device's data (a stable code, not the refusal's message).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import mqtt5

from jitp import errors

# MQTT 3.1.1 CONNACK return codes
V3_NOT_AUTHORIZED, V3_SERVER_UNAVAILABLE = 5, 3

# MQTT 5 CONNACK reason codes
CLIENT_ID_NOT_VALID = 0x85
BAD_USER_NAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_BUSY = 0x89
BANNED = 0x8A
BAD_AUTHENTICATION_METHOD = 0x8C
PACKET_TOO_LARGE = 0x95
CONNECTION_RATE_EXCEEDED = 0x9F

_BANNED = (
    errors.CertificateRevoked,
    errors.DeviceBlocked,
    errors.DeviceErased,
    errors.CertificateSuperseded,
    errors.BirthCertificateRetired,
)


@dataclass(frozen=True)
class Refusal:
    """How a refused CONNECT is answered: ``v3`` and ``v5`` codes, the v5 Reason String, and a
    Retry-After hint (a v5 User Property) for load shedding."""

    v3: int
    v5: int
    reason: str
    retry_after: float | None = None

    @property
    def text(self) -> str:
        return f"jitp refused the connection: {self.reason}"


def refusal_of(exc: errors.ProvisioningError) -> Refusal:
    """The CONNACK for a provisioning error (the refusal reasons of :mod:`jitp.errors`)."""
    if isinstance(exc, errors.Overloaded):
        scope = exc.scope or ""
        code = CONNECTION_RATE_EXCEEDED if scope.startswith(("ca:", "region:")) else SERVER_BUSY
        return Refusal(V3_SERVER_UNAVAILABLE, code, exc.reason, exc.retry_after)
    if isinstance(exc, errors.Unavailable):
        return Refusal(V3_SERVER_UNAVAILABLE, SERVER_UNAVAILABLE, exc.reason)
    if isinstance(exc, errors.ClientIdMismatch):
        return Refusal(V3_NOT_AUTHORIZED, CLIENT_ID_NOT_VALID, exc.reason)
    if isinstance(exc, _BANNED):
        return Refusal(V3_NOT_AUTHORIZED, BANNED, exc.reason)
    return Refusal(V3_NOT_AUTHORIZED, NOT_AUTHORIZED, exc.reason)


def connack(refusal: Refusal, *, mqtt5_format: bool, max_packet: int | None = None) -> bytes:
    """The CONNACK refusing a connection: 3.1.1 its return code; 5 its reason code, Reason String
    and, when shedding, a ``retry-after`` User Property; those two are left out rather than exceed
    the client's Maximum Packet Size ``max_packet`` [MQTT-3.2.2-19, MQTT-3.2.2-20]."""
    if not mqtt5_format:
        return bytes((0x20, 2, 0, refusal.v3))
    retry = refusal.retry_after
    code = mqtt5.ConnAckReasonCode(refusal.v5)
    data = mqtt5.ConnAckPacket(
        reason_code=code,
        reason_str=refusal.text,
        user_properties=[("retry-after", str(math.ceil(retry)))] if retry else None,
    ).write()
    if max_packet is not None and len(data) > max_packet:
        return mqtt5.ConnAckPacket(reason_code=code).write()
    return data


BUSY = Refusal(V3_SERVER_UNAVAILABLE, SERVER_BUSY, "max_connections")
TOO_LARGE = Refusal(0, PACKET_TOO_LARGE, errors.PacketTooLarge.reason)  # 3.1.1: closed, no CONNACK
WILL_REFUSED = Refusal(V3_NOT_AUTHORIZED, NOT_AUTHORIZED, errors.WillNotAllowed.reason)


class Goodbye(enum.IntEnum):
    """Why the broker closes an established connection: the MQTT 5 DISCONNECT reason code
    (a 3.1.1 client just sees the connection close)."""

    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    NOT_AUTHORIZED = 0x87
    SERVER_SHUTTING_DOWN = 0x8B
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_NAME_INVALID = 0x90
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    QOS_NOT_SUPPORTED = 0x9B
    SUBSCRIPTION_IDS_NOT_SUPPORTED = 0xA1

    @property
    def text(self) -> str:
        return _GOODBYE_TEXT[self]


_GOODBYE_TEXT = {
    Goodbye.MALFORMED_PACKET: "malformed packet",
    Goodbye.PROTOCOL_ERROR: "protocol error",
    Goodbye.NOT_AUTHORIZED: "not authorized",
    Goodbye.SERVER_SHUTTING_DOWN: "jitp is shutting down",
    Goodbye.KEEP_ALIVE_TIMEOUT: "no packet within the keep-alive period",
    Goodbye.SESSION_TAKEN_OVER: "another connection took over this client id",
    Goodbye.TOPIC_NAME_INVALID: "topic name not allowed",
    Goodbye.RECEIVE_MAXIMUM_EXCEEDED: "more QoS 2 messages in flight than Receive Maximum",
    Goodbye.TOPIC_ALIAS_INVALID: "topic aliases are not supported (Topic Alias Maximum 0)",
    Goodbye.PACKET_TOO_LARGE: "packet or message over the limit",
    Goodbye.MESSAGE_RATE_TOO_HIGH: "over the profile's message rate",
    Goodbye.QUOTA_EXCEEDED: "queue full: the client does not keep up",
    Goodbye.ADMINISTRATIVE_ACTION: "closed by an operator",
    Goodbye.QOS_NOT_SUPPORTED: "QoS above the Maximum QoS announced in CONNACK",
    Goodbye.SUBSCRIPTION_IDS_NOT_SUPPORTED: "subscription identifiers are not supported",
}
