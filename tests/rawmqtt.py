"""A minimal MQTT 3.1.1 encoder, raw TLS sockets and a raw MQTT 5 client, for clients that misbehave
on purpose."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

import mqtt5

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


class Raw5:
    """An MQTT 5 client in raw bytes (the ``mqtt5`` codec) over mutual TLS. ``ack=False``: it never
    acknowledges a PUBLISH (a member that takes its share and sits on it)."""

    def __init__(self, port: int, pki: Pki, ident: Identity, *, ack: bool = True, **connect: Any) -> None:
        self.name = ident.name
        self.sock = tls_connect(port, pki, ident)
        self.ack = ack
        self.buf = b""
        self.publishes: list[mqtt5.PublishPacket] = []
        self.others: list[mqtt5.Packet] = []
        self._id = 0
        connect.setdefault("clean_start", True)
        connect.setdefault("keep_alive", 30)
        self.sock.sendall(mqtt5.ConnectPacket(ident.name, **connect).write())
        connack = self.next(10.0)
        assert isinstance(connack, mqtt5.ConnAckPacket), connack
        assert int(connack.reason_code) == 0, connack

    def packet_id(self) -> int:
        self._id = self._id % 65535 + 1
        return self._id

    def next(self, timeout: float = 10.0) -> mqtt5.Packet | None:
        """The next packet from the broker, None if none comes within ``timeout`` or it closed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                packet, size = mqtt5.read(memoryview(self.buf))
                self.buf = self.buf[size:]
                return packet
            except IndexError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, OSError):
                return None
            if not chunk:
                return None
            self.buf += chunk

    def expect(self, kind: type[Any], timeout: float = 10.0) -> Any:
        """The next packet of type ``kind``; PUBLISHes met on the way are kept (and acknowledged)."""
        deadline = time.monotonic() + timeout
        while True:
            packet = self.next(max(0.0, deadline - time.monotonic()))
            assert packet is not None, f"no {kind.__name__}"
            if isinstance(packet, kind):
                return packet
            self._keep(packet)

    def _keep(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PublishPacket):
            self.publishes.append(packet)
            if packet.packet_id is not None and self.ack:
                self.sock.sendall(mqtt5.PubAckPacket(packet.packet_id).write())
        else:
            self.others.append(packet)

    def subscribe(self, *filters: str, **options: Any) -> list[int]:
        self.sock.sendall(
            mqtt5.SubscribePacket(
                self.packet_id(),
                [mqtt5.TopicFilter(f, max_qos=mqtt5.QoS.AT_LEAST_ONCE, **options) for f in filters],
            ).write()
        )
        return [int(c) for c in self.expect(mqtt5.SubAckPacket).reason_codes]

    def publish(self, topic: str, payload: bytes, **props: Any) -> int:
        """A QoS 1 PUBLISH; the PUBACK's reason code."""
        pid = self.packet_id()
        self.sock.sendall(
            mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=pid, **props).write()
        )
        ack = self.expect(mqtt5.PubAckPacket)
        assert ack.packet_id == pid
        return int(ack.reason_code)

    def wait_for(self, payload: bytes, timeout: float = 10.0) -> mqtt5.PublishPacket:
        """Read until a PUBLISH with ``payload`` arrives (everything before it is kept)."""
        deadline = time.monotonic() + timeout
        while True:
            for p in self.publishes:
                if bytes(p.payload) == payload:
                    return p
            packet = self.next(max(0.0, deadline - time.monotonic()))
            assert packet is not None, f"{payload!r} never arrived; got {self.payloads()}"
            self._keep(packet)

    def until(self, done: Callable[[list[mqtt5.PublishPacket]], bool], timeout: float = 10.0) -> None:
        """Read (keeping PUBLISHes) until ``done(self.publishes)``."""
        deadline = time.monotonic() + timeout
        while not done(self.publishes):
            packet = self.next(max(0.0, deadline - time.monotonic()))
            assert packet is not None, f"not done; got {[p.topic for p in self.publishes]}"
            self._keep(packet)

    def payloads(self) -> list[bytes]:
        return [bytes(p.payload) for p in self.publishes]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(mqtt5.DisconnectPacket().write())
        self.sock.close()

    def poll(self) -> int:
        """Keep whatever PUBLISHes have arrived by now (waiting briefly for the first); their count."""
        packet = self.next(0.05)
        while packet is not None:
            self._keep(packet)
            packet = self.next(0.0)
        return len(self.publishes)

    def drop(self) -> None:
        """Close the socket abruptly: TCP reset, no TLS close_notify, no DISCONNECT, no PUBACK."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
