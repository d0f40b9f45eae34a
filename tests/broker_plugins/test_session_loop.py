"""W18: one task reads each connection (SUBSCRIBE, UNSUBSCRIBE and the QoS 2 handshake handled in
order, in the reader), one task writes it; nothing else runs per connection."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from device_sim.mqtt import encode_str, encode_varint
from tests.broker_plugins.test_delivery_e2e import payloads, subscriber
from tests.helpers import BrokerThread, Conn, Pki, connect, wait_until
from tests.rawmqtt import mqtt_connect, recv_exact, tls_connect


def qos2_publish(topic: str, payload: bytes, *, packet_id: int, dup: bool = False) -> bytes:
    body = encode_str(topic) + packet_id.to_bytes(2, "big") + payload
    return bytes([0x34 | (0x08 if dup else 0)]) + encode_varint(len(body)) + body


def pubrel(packet_id: int) -> bytes:
    return b"\x62\x02" + packet_id.to_bytes(2, "big")


def test_a_qos2_publish_is_routed_once_and_completed(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    sub = clients(subscriber(broker, pki, "svc-qos2", "devices/qos2-dev/#"))
    sock = tls_connect(broker.port, pki, pki.device("qos2-dev"))
    try:
        assert mqtt_connect(sock, "qos2-dev", keepalive=30) == 0
        sock.sendall(qos2_publish("devices/qos2-dev/t", b"once", packet_id=7))
        assert recv_exact(sock, 4) == b"\x50\x02\x00\x07"  # PUBREC
        sock.sendall(qos2_publish("devices/qos2-dev/t", b"once", packet_id=7, dup=True))  # lost PUBREC
        assert recv_exact(sock, 4) == b"\x50\x02\x00\x07"  # acknowledged again...
        sock.sendall(pubrel(7))
        assert recv_exact(sock, 4) == b"\x70\x02\x00\x07"  # PUBCOMP
        sock.sendall(qos2_publish("devices/qos2-dev/t", b"twice", packet_id=7))  # the id is free again
        assert recv_exact(sock, 4) == b"\x50\x02\x00\x07"
        sock.sendall(pubrel(7))
        assert recv_exact(sock, 4) == b"\x70\x02\x00\x07"
    finally:
        sock.close()
    assert wait_until(lambda: len(sub.messages) >= 2, 5)
    assert payloads(sub) == [b"once", b"twice"]  # ...but routed once


def test_subscriptions_are_granted_qos1_at_most(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    conn = clients(connect(broker.port, pki, pki.service("svc-qos-cap")))
    assert conn.rc == 0
    assert conn.subscribe("devices/+/t", qos=2) == [1]


def test_an_admitted_connection_runs_two_tasks(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """amqtt ran seven per client (reader, message loop and its four waiters, a listener task)."""

    def per_connection() -> Counter[str]:
        async def names() -> Counter[str]:
            return Counter(t.get_coro().__qualname__ for t in asyncio.all_tasks())  # type: ignore[union-attr]

        return broker.call(names())

    before = per_connection()
    for i in range(5):
        assert clients(connect(broker.port, pki, pki.device(f"tasks-{i}"))).rc == 0
    assert wait_until(lambda: sum((per_connection() - before).values()) == 10, 5)
    added = per_connection() - before
    assert added == Counter({"Listener._run": 5, "JitpProtocolHandler._send_loop": 5}), added
