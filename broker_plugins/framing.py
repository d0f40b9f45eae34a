"""MQTT framing helpers that need no stream: what a CONNECT asks for, before amqtt parses it."""

from __future__ import annotations

from dataclasses import dataclass


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
    """A CONNECT that breaks MQTT 3.1.1's rules: the connection is closed without CONNACK."""


@dataclass(frozen=True)
class Will:
    topic: str
    message: bytes
    qos: int  # 0-3 as sent: QoS 3 is refused after admission, audited with the device's id
    retain: bool


@dataclass(frozen=True)
class ConnectRequest:
    """An MQTT 3.1.1 CONNECT, parsed from the bytes the transport cut (no stream, no plugin)."""

    client_id: str
    clean_session: bool
    keep_alive: int
    will: Will | None
    username: str | None
    password: bytes | None


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
