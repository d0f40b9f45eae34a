"""MQTT framing helpers that need no stream: what a CONNECT asks for, before amqtt parses it."""

from __future__ import annotations


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
