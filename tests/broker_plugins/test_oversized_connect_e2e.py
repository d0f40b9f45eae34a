"""Issue 15: a CONNECT over ``limits.max_packet_size`` is refused before its body is read: MQTT 5
gets CONNACK 0x95 (Packet too large) with a Reason String, 3.1.1 (which has no such code) a close;
both are audited, and the broker keeps serving (raw bytes over real mutual TLS)."""

from __future__ import annotations

import mqtt5
import pytest

from tests.broker_plugins.test_mqtt5_bad_input_e2e import read_packet
from tests.helpers import BrokerThread, Pki, connect, wait_until
from tests.rawmqtt import closed_within, tls_connect

DEADLINE = 10.0


def announced(level: int, size: int) -> bytes:
    """The first bytes of a CONNECT that announces ``size`` bytes of remaining length."""
    length, encoded = size, bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x10" + bytes(encoded) + b"\x00\x04MQTT" + bytes([level, 0x02, 0x00, 0x1E])


def too_large(broker: BrokerThread) -> list[str]:
    return [e.draft.details.get("detail", "") for e in broker.audit() if e.draft.reason == "packet_too_large"]


@pytest.mark.parametrize("split", [False, True], ids=["whole-head", "level-in-a-later-record"])
def test_an_oversized_mqtt5_connect_gets_connack_0x95(broker: BrokerThread, pki: Pki, split: bool) -> None:
    size = broker.server.config.limits.max_packet_size + 1
    device = pki.device(f"v5-huge-connect-{split}")
    sock = tls_connect(broker.port, pki, device)
    head = announced(5, size)
    if split:  # the level comes after the remaining length: the broker waits for it (a CONNACK at all)
        sock.sendall(head[:5])
        sock.sendall(head[5:])
    else:
        sock.sendall(head + b"\x00" * 4096)
    connack = read_packet(sock)
    assert isinstance(connack, mqtt5.ConnAckPacket)
    assert int(connack.reason_code) == 0x95
    assert connack.reason_str == "jitp refused the connection: packet_too_large"
    assert closed_within(sock, DEADLINE)
    assert wait_until(lambda: f"{size} bytes, level 5" in too_large(broker), DEADLINE), broker.audit()
    assert device.name not in broker.server.broker.sessions
    # The broker keeps serving.
    other = connect(broker.port, pki, pki.device("v5-huge-after"))
    assert other.rc == 0, other.error
    other.close()


def test_an_oversized_mqtt311_connect_is_closed_and_audited(broker: BrokerThread, pki: Pki) -> None:
    size = 5_000_000
    sock = tls_connect(broker.port, pki, pki.device("v3-huge-connect"))
    sock.sendall(announced(4, size))
    sock.settimeout(DEADLINE)
    assert sock.recv(4096) == b""  # no CONNACK: 3.1.1 has no code for it; closed
    assert wait_until(lambda: f"{size} bytes, level 4" in too_large(broker), DEADLINE), broker.audit()
