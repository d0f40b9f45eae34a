"""MQTT framing helpers that need no stream: the CONNECT, parsed from the bytes the transport cut.

MQTT 3.1.1 is parsed here; MQTT 5 by the ``mqtt5`` codec (Rust, strict: duplicate or misplaced
properties, zero Receive Maximum, bad UTF-8), whose errors become :class:`MalformedConnect` with
the v5 reason code the specification asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mqtt5

from jitp.domain.routing import NO_PROPERTIES, MessageProperties

MALFORMED, PROTOCOL_ERROR, TOPIC_ALIAS_INVALID = 0x81, 0x82, 0x94


def connect_protocol(packet: bytes) -> tuple[str, int] | None:
    """(protocol name, protocol level) of a CONNECT packet, or None if it is not one.

    Read before amqtt parses the packet: amqtt reads every CONNECT as MQTT 3.1.1 and misreads an
    MQTT 5 CONNECT's properties as the client id, then waits for bytes that never come."""
    if not packet or packet[0] != 0x10:
        return None
    i = 1
    while i < len(packet) and packet[i] & 0x80:
        i += 1
    i += 1
    if len(packet) < i + 2:
        return None
    n = int.from_bytes(packet[i : i + 2], "big")
    name = packet[i + 2 : i + 2 + n]
    if len(packet) < i + 3 + n:
        return None
    return name.decode("utf-8", "replace"), packet[i + 2 + n]


class MalformedConnect(ValueError):
    """A CONNECT that breaks the specification. MQTT 3.1.1: the connection is closed without
    CONNACK; MQTT 5: CONNACK with ``code`` (0x81 Malformed Packet, 0x82 Protocol Error), then closed."""

    def __init__(self, message: str, *, code: int = MALFORMED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Will:
    topic: str
    message: bytes
    qos: int  # 0-3 as sent: QoS 3 is refused after admission, audited with the device's id
    retain: bool
    properties: MessageProperties = NO_PROPERTIES  # MQTT 5 (expires_at holds the interval, relative)
    delay: int = 0  # MQTT 5 Will Delay Interval, seconds


@dataclass(frozen=True)
class ConnectRequest:
    """A CONNECT, parsed from the bytes the transport cut (no stream, no plugin).

    ``clean_session`` is MQTT 3.1.1's flag and MQTT 5's Clean Start; a v5 session outlives its
    connection for ``session_expiry`` seconds (``0xFFFFFFFF``: until the broker's cap)."""

    client_id: str
    clean_session: bool
    keep_alive: int
    will: Will | None
    username: str | None
    password: bytes | None
    protocol: int = 4
    session_expiry: int = 0
    receive_max: int = 65535
    max_packet_size: int | None = None
    request_problem_info: bool = True
    auth_method: str | None = None
    user_properties: tuple[tuple[str, str], ...] = field(default=())

    @property
    def persistent(self) -> bool:
        """Whether the session outlives the connection (3.1.1: clean session 0; 5: expiry > 0)."""
        return self.session_expiry > 0 if self.protocol == 5 else not self.clean_session


def codec_error(exc: Exception) -> tuple[int, str]:
    """(v5 reason code, message) for an error the ``mqtt5`` codec raised on a whole packet."""
    text = str(exc)[:200] or type(exc).__name__
    if "alias" in text.lower() and "Invalid property type" not in text:
        return TOPIC_ALIAS_INVALID, text
    if "Duplicate" in text or "must be != 0" in text:
        return PROTOCOL_ERROR, text  # [MQTT-2.2.2-2], Receive Maximum or Maximum Packet Size 0
    return MALFORMED, text


def read5(data: bytes) -> tuple[mqtt5.Packet, int]:
    """``mqtt5.read``, whose every failure on bad input is a ValueError, IndexError (incomplete) or
    UnicodeDecodeError. The codec panics on some input (invalid UTF-8 in a property: pyo3's
    PanicException, a BaseException that no ``except Exception`` catches); that becomes a
    UnicodeDecodeError-like ValueError here, a Malformed Packet for the caller."""
    try:
        return mqtt5.read(memoryview(data))
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise ValueError(f"undecodable packet (invalid UTF-8?): {exc}") from None


def parse_connect5(packet: bytes) -> ConnectRequest:
    """Parse a whole MQTT 5 CONNECT with the ``mqtt5`` codec [MQTT-3.1]."""
    try:
        parsed, used = read5(packet)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        code, text = codec_error(exc)
        raise MalformedConnect(f"MQTT 5 CONNECT: {text}", code=code) from None
    if not isinstance(parsed, mqtt5.ConnectPacket) or used != len(packet):
        raise MalformedConnect("MQTT 5 CONNECT with bytes after its payload")
    will = None
    if parsed.will is not None:
        w = parsed.will
        bad = property_violation(
            response_topic=w.response_topic,
            content_type=w.content_type,
            user_properties=w.user_properties,
            payload_format_indicator=w.payload_format_indicator,
        )
        if bad is not None:
            raise MalformedConnect(f"MQTT 5 CONNECT, the will: {bad[1]}", code=bad[0])
        will = Will(
            topic=w.topic,
            message=bytes(w.payload or b""),
            qos=int(w.qos),
            retain=w.retain,
            properties=message_properties(
                payload_format_indicator=w.payload_format_indicator,
                content_type=w.content_type,
                response_topic=w.response_topic,
                correlation_data=w.correlation_data,
                user_properties=w.user_properties,
                expires_at=w.message_expiry_interval,
            ),
            delay=w.will_delay_interval,
        )
    return ConnectRequest(
        client_id=parsed.client_id,
        clean_session=parsed.clean_start,
        keep_alive=parsed.keep_alive,
        will=will,
        username=parsed.username,
        password=parsed.password,
        protocol=5,
        session_expiry=parsed.session_expiry_interval,
        receive_max=parsed.receive_max,
        max_packet_size=parsed.max_packet_size,
        request_problem_info=parsed.request_problem_info,
        auth_method=parsed.authentication_method,
        user_properties=tuple(parsed.user_properties),
    )


def property_violation(
    *,
    response_topic: str | None,
    content_type: str | None,
    user_properties: list[tuple[str, str]],
    payload_format_indicator: int = 0,
) -> tuple[int, str] | None:
    """(v5 reason code, message) for a PUBLISH's or will's properties that break the specification
    although the codec reads them (and would refuse to write them, or a subscriber to read them):
    a Payload Format Indicator other than 0 or 1 (paho-mqtt drops its connection on one), a
    Response Topic that is empty or has a wildcard [MQTT-3.3.2-14, MQTT-4.7.3-1], U+0000 in a
    string [MQTT-1.5.4-2]. None if they are fine."""
    if payload_format_indicator not in (0, 1):
        return (
            PROTOCOL_ERROR,
            f"Payload Format Indicator {payload_format_indicator} (0 or 1) [MQTT-3.3.2.3.2]",
        )
    if response_topic is not None and (not response_topic or "+" in response_topic or "#" in response_topic):
        return PROTOCOL_ERROR, "Response Topic empty or with a wildcard [MQTT-3.3.2-14]"
    strings = [response_topic or "", content_type or ""]
    strings.extend(text for pair in user_properties for text in pair)
    if any("\x00" in text for text in strings):
        return MALFORMED, "U+0000 in a property [MQTT-1.5.4-2]"
    return None


def message_properties(
    *,
    payload_format_indicator: int,
    content_type: str | None,
    response_topic: str | None,
    correlation_data: bytes | None,
    user_properties: list[tuple[str, str]],
    expires_at: float | None,
) -> MessageProperties:
    """The shared :data:`NO_PROPERTIES` when a v5 message carries none (the common case)."""
    if not (
        payload_format_indicator
        or content_type
        or response_topic
        or correlation_data
        or user_properties
        or expires_at is not None
    ):
        return NO_PROPERTIES
    return MessageProperties(
        payload_format_indicator=payload_format_indicator,
        content_type=content_type,
        response_topic=response_topic,
        correlation_data=correlation_data,
        user_properties=tuple(user_properties),
        expires_at=expires_at,
    )


def remaining_seconds(deadline: float, now: float) -> int:
    """A Message Expiry Interval to send: whole seconds left, at least 1."""
    return max(1, math.ceil(deadline - now))


def parse_connect(packet: bytes) -> ConnectRequest:
    """Parse a whole MQTT 3.1.1 CONNECT packet (fixed header included) [MQTT-3.1].

    Raises :class:`MalformedConnect` for anything the specification says closes the connection:
    reserved bits set, will fields without the will flag, a string that is not UTF-8 or holds
    U+0000, a length past the packet's end, or bytes left over."""
    if not packet or packet[0] != 0x10:
        raise MalformedConnect("not a CONNECT, or its fixed header flags are set [MQTT-2.2.2-2]")
    i = 1
    while i < len(packet) and packet[i] & 0x80 and i < 4:
        i += 1
    i += 1
    view = memoryview(packet)

    def take(n: int) -> bytes:
        nonlocal i
        if n < 0 or i + n > len(packet):
            raise MalformedConnect("a field runs past the end of the CONNECT")
        out = bytes(view[i : i + n])
        i += n
        return out

    def binary() -> bytes:
        return take(int.from_bytes(take(2), "big"))

    def string(what: str) -> str:
        raw = binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedConnect(f"{what} is not UTF-8 [MQTT-1.5.3-1]") from None
        if "\x00" in text:
            raise MalformedConnect(f"{what} contains U+0000 [MQTT-1.5.3-2]")
        return text

    if string("the protocol name") != "MQTT" or take(1) != b"\x04":
        raise MalformedConnect("not MQTT 3.1.1 (protocol name MQTT, level 4)")
    flags = take(1)[0]
    if flags & 0x01:
        raise MalformedConnect("CONNECT reserved flag set [MQTT-3.1.2-3]")
    keep_alive = int.from_bytes(take(2), "big")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise MalformedConnect("will QoS or retain without the will flag [MQTT-3.1.2-11, -13]")
    client_id = string("the client id")
    will = None
    if will_flag:
        will = Will(topic=string("the will topic"), message=binary(), qos=will_qos, retain=will_retain)
    username = string("the user name") if flags & 0x80 else None
    password = binary() if flags & 0x40 else None
    if i != len(packet):
        raise MalformedConnect(f"{len(packet) - i} byte(s) after the CONNECT payload")
    return ConnectRequest(
        client_id=client_id,
        clean_session=bool(flags & 0x02),
        keep_alive=keep_alive,
        will=will,
        username=username,
        password=password,
    )
