"""A minimal MQTT 3.1.1 encoder and raw TLS sockets, for clients that misbehave on purpose."""

from __future__ import annotations

import socket
import ssl
import time

from device_sim.mqtt import encode_str as _utf8
from device_sim.mqtt import encode_varint as _remaining_length
from tests.helpers import Identity, Pki, client_context

HOST = "127.0.0.1"


def connect_packet(client_id: str, *, keepalive: int, clean: bool = True) -> bytes:
    body = (
        _utf8("MQTT") + bytes([4, 0x02 if clean else 0x00]) + keepalive.to_bytes(2, "big") + _utf8(client_id)
    )
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH."""
    body = _utf8(topic) + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _remaining_length(len(body)) + body


PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


# -- raw sockets -------------------------------------------------------------------------------


def tcp_connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=5)


def tls_connect(port: int, pki: Pki, ident: Identity | None) -> ssl.SSLSocket:
    raw = tcp_connect(port)
    try:
        return client_context(pki, ident).wrap_socket(raw, server_hostname=HOST)
    except BaseException:
        raw.close()
        raise


def recv_exact(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


def mqtt_connect(sock: socket.socket, client_id: str, *, keepalive: int) -> int:
    """Send CONNECT, return the CONNACK return code."""
    sock.sendall(connect_packet(client_id, keepalive=keepalive))
    connack = recv_exact(sock, 4)
    assert connack[:2] == b"\x20\x02", connack
    return connack[3]


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes (EOF, reset, TLS alert) within ``timeout``; data read meanwhile is dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        except (ssl.SSLError, OSError):
            return True
        if not data:
            return True


def will_connect_packet(
    client_id: str,
    *,
    will_topic: str,
    will_payload: bytes,
    will_qos: int = 0,
    will_retain: bool = False,
    keepalive: int = 30,
    clean: bool = True,
) -> bytes:
    flags = 0x04 | (will_qos << 3) | (0x20 if will_retain else 0) | (0x02 if clean else 0)
    body = (
        _utf8("MQTT")
        + bytes([4, flags])
        + keepalive.to_bytes(2, "big")
        + _utf8(client_id)
        + _utf8(will_topic)
        + len(will_payload).to_bytes(2, "big")
        + will_payload
    )
    return b"\x10" + _remaining_length(len(body)) + body


def raw_publish(
    topic: str, payload: bytes, *, qos: int, packet_id: int | None = None, retain: bool = False
) -> bytes:
    """A PUBLISH with any QoS bits (3 included) and any packet id (0 included)."""
    body = _utf8(topic) + (packet_id.to_bytes(2, "big") if packet_id is not None else b"") + payload
    first = 0x30 | (qos << 1) | (1 if retain else 0)
    return bytes([first]) + _remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(_utf8(f) + bytes([q]) for f, q in filters)
    return b"\x82" + _remaining_length(len(body)) + body


def unsubscribe_packet(packet_id: int, filters: list[str]) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(_utf8(f) for f in filters)
    return b"\xa2" + _remaining_length(len(body)) + body
