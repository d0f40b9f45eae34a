"""Issue 15, bad input over MQTT 5: each gets a CONNACK or DISCONNECT with the reason code the
specification asks for, and the broker keeps serving (raw bytes over real mutual TLS)."""

from __future__ import annotations

import socket

import mqtt5
import pytest

from device_sim.mqtt import encode_varint
from tests.helpers import BrokerThread, Pki, wait_until
from tests.rawmqtt import closed_within, connect_packet, mqtt_connect, publish_packet, recv_exact, tls_connect

DEADLINE = 10.0


def read_packet(sock: socket.socket) -> mqtt5.Packet:
    """The next whole MQTT 5 packet from the broker."""
    sock.settimeout(DEADLINE)
    buf = b""
    while True:
        try:
            packet, _ = mqtt5.read(memoryview(buf))
            return packet
        except IndexError:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed after {buf!r}"
            buf += chunk


def connect_bytes(client_id: str, props: bytes) -> bytes:
    """A v5 CONNECT (clean start, keep-alive 30) with the raw property bytes ``props``."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x05\x02\x00\x1e" + bytes([len(props)]) + props + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body


@pytest.mark.parametrize(
    ("props", "code"),
    [
        (b"\x21\x00\x05\x21\x00\x06", 0x82),  # Receive Maximum twice [MQTT-2.2.2-2]
        (b"\x21\x00\x00", 0x82),  # Receive Maximum 0 [MQTT-3.1.2-21]
        (b"\x23\x00\x05", 0x81),  # Topic Alias: not a CONNECT property
        (b"\x99", 0x81),  # no such property
    ],
    ids=["duplicate", "receive-max-0", "misplaced", "unknown"],
)
def test_a_bad_connect_property_gets_its_reason_code(
    broker: BrokerThread, pki: Pki, props: bytes, code: int
) -> None:
    device = pki.device(f"v5-bad-{code:x}-{len(props)}")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(connect_bytes(device.name, props))
    connack = read_packet(sock)
    assert isinstance(connack, mqtt5.ConnAckPacket)
    assert int(connack.reason_code) == code
    assert device.name not in broker.server.broker.sessions


def test_an_authentication_method_gets_0x8c(broker: BrokerThread, pki: Pki) -> None:
    device = pki.device("v5-auth-method")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(
        mqtt5.ConnectPacket(device.name, clean_start=True, authentication_method="SCRAM-SHA-1").write()
    )
    connack = read_packet(sock)
    assert isinstance(connack, mqtt5.ConnAckPacket)
    assert int(connack.reason_code) == 0x8C


def joined(broker: BrokerThread, pki: Pki, name: str) -> socket.socket:
    device = pki.device(name)
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(mqtt5.ConnectPacket(device.name, clean_start=True, keep_alive=30).write())
    connack = read_packet(sock)
    assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0
    return sock


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (bytes.fromhex("3209" + "0001" + "61" + "0001" + "03" + "230005"), 0x94),  # Topic Alias 5 (max 0)
        (bytes.fromhex("3209" + "0001" + "61" + "0001" + "03" + "230000"), 0x94),  # Topic Alias 0
        (bytes.fromhex("30ffffffff7f"), 0x81),  # a remaining length of five bytes
        (bytes.fromhex("f000"), 0x81),  # AUTH without its properties: malformed
        (bytes.fromhex("f0020000"), 0x82),  # AUTH: no enhanced authentication
        (bytes.fromhex("3407" + "0001" + "61" + "0001" + "00" + "78"), 0x9B),  # QoS 2 over Maximum QoS 1
    ],
    ids=["alias-over-max", "alias-0", "length-5-bytes", "auth-malformed", "auth", "qos2"],
)
def test_a_bad_packet_after_connack_gets_a_disconnect_with_its_reason(
    broker: BrokerThread, pki: Pki, packet: bytes, code: int
) -> None:
    sock = joined(broker, pki, f"v5-bad-packet-{code:x}-{packet.hex()[:6]}")
    sock.sendall(packet)
    disconnect = read_packet(sock)
    assert isinstance(disconnect, mqtt5.DisconnectPacket)
    assert int(disconnect.reason_code) == code
    assert disconnect.reason_str
    # the broker keeps serving everyone else
    other = joined(broker, pki, f"v5-after-{code:x}-{packet.hex()[:6]}")
    other.close()


# -- a will with an invalid property -----------------------------------------------------------
def will_connect_bytes(client_id: str, will_props: bytes, *, declared: int | None = None) -> bytes:
    """A v5 CONNECT (clean start, QoS 0 will on the device's own topic) whose Will Properties are the
    raw bytes ``will_props``, announced as ``declared`` bytes long (default: their length)."""
    cid = client_id.encode()
    topic = f"devices/{client_id}/will".encode()
    body = b"\x00\x04MQTT\x05\x06\x00\x1e\x00" + len(cid).to_bytes(2, "big") + cid
    body += encode_varint(len(will_props) if declared is None else declared) + will_props
    body += len(topic).to_bytes(2, "big") + topic + b"\x00\x04gone"
    return b"\x10" + encode_varint(len(body)) + body


def protocol_violations(broker: BrokerThread) -> list[str]:
    return [
        e.draft.details.get("message", "") for e in broker.audit() if e.draft.reason == "protocol_violation"
    ]


@pytest.mark.parametrize(
    ("props", "declared", "code", "audited"),
    [
        # Not a Will Property: an identifier not valid there makes a Malformed Packet (section 2.2.2.2).
        (b"\x23\x00\x05", None, 0x81, "TopicAlias"),
        (b"\x11\x00\x00\x00\x3c", None, 0x81, "SessionExpiryInterval"),
        # Twice: a Protocol Error [MQTT-2.2.2-2].
        (b"\x18\x00\x00\x00\x01\x18\x00\x00\x00\x02", None, 0x82, "Duplicate"),
        (b"\x03\x00\x01a\x03\x00\x01b", None, 0x82, "Duplicate"),
        # A Content Type whose string runs past the end of the Will Properties.
        (b"\x03\x00\x05ab", 3, 0x81, "Invalid remaining length"),
        # A Content Type that is not UTF-8 [MQTT-1.5.4-1].
        (b"\x03\x00\x02\xc3\x28", None, 0x81, "UTF-8"),
    ],
    ids=["topic-alias", "session-expiry", "duplicate-delay", "duplicate-content-type", "length", "not-utf8"],
)
def test_a_will_with_an_invalid_property_gets_its_reason_code_and_is_audited(
    broker: BrokerThread, pki: Pki, props: bytes, declared: int | None, code: int, audited: str
) -> None:
    device = pki.device(f"v5-bad-will-{props.hex()[:12]}-{declared}")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(will_connect_bytes(device.name, props, declared=declared))
    connack = read_packet(sock)
    assert isinstance(connack, mqtt5.ConnAckPacket)
    assert int(connack.reason_code) == code, connack
    assert connack.reason_str and audited.lower() in connack.reason_str.lower(), connack.reason_str
    assert closed_within(sock, DEADLINE), "the connection stays open after the refusal"
    assert wait_until(lambda: any(audited in m for m in protocol_violations(broker)), DEADLINE), (
        broker.audit()
    )
    assert device.name not in broker.server.broker.sessions
    assert device.name not in [d.device_id for d in broker.devices()]  # refused before admission
    joined(broker, pki, f"v5-after-will-{props.hex()[:12]}-{declared}").close()


def test_a_packet_with_a_string_that_is_not_utf8_gets_a_disconnect_0x81(
    broker: BrokerThread, pki: Pki
) -> None:
    sock = joined(broker, pki, "v5-bad-utf8-topic")
    sock.sendall(bytes.fromhex("3206" + "0002" + "c328" + "0001" + "00"))  # topic b"\xc3\x28", QoS 1
    disconnect = read_packet(sock)
    assert isinstance(disconnect, mqtt5.DisconnectPacket)
    assert int(disconnect.reason_code) == 0x81 and disconnect.reason_str
    assert closed_within(sock, DEADLINE)
    assert wait_until(lambda: any("UTF-8" in m for m in protocol_violations(broker)), DEADLINE)
    joined(broker, pki, "v5-after-bad-utf8-topic").close()


# -- MQTT 5 property bytes on an MQTT 3.1.1 connection -------------------------------------------
def v311_joined(broker: BrokerThread, pki: Pki, name: str) -> socket.socket:
    sock = tls_connect(broker.port, pki, pki.device(name))
    assert mqtt_connect(sock, name, keepalive=60) == 0
    return sock


def with_header(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_varint(len(body)) + body


def v5_style_packet(case: str, device_id: str) -> bytes:
    """An MQTT 5 packet (or its v5-only bits) as a client that forgot it speaks 3.1.1 sends it."""
    tf = f"devices/{device_id}/cmd/a".encode()
    filter_bytes = len(tf).to_bytes(2, "big") + tf
    if case == "subscribe-props":  # a property length (0) before the topic filters
        return with_header(0x82, b"\x00\x01" + b"\x00" + filter_bytes + b"\x01")
    if case == "subscribe-user-property":  # read as 3.1.1, a filter that runs past the packet
        return with_header(0x82, b"\x00\x01" + b"\x07\x26\x00\x01k\x00\x01v" + filter_bytes + b"\x01")
    if case == "subscribe-no-local":  # v5 subscription options: reserved bits in 3.1.1 [MQTT-3.8.3-4]
        return with_header(0x82, b"\x00\x01" + filter_bytes + b"\x05")
    if case == "unsubscribe-props":
        return with_header(0xA2, b"\x00\x01" + b"\x00" + filter_bytes)
    assert case == "puback"  # a v5 reason code and property length: 3.1.1's PUBACK is 2 bytes
    return with_header(0x40, b"\x00\x01" + b"\x10\x00")


@pytest.mark.parametrize(
    ("case", "audited"),
    [
        ("subscribe-props", "SubscribePacket: its fields do not fill its remaining length"),
        ("subscribe-user-property", "SubscribePacket: its fields do not fill its remaining length"),
        ("subscribe-no-local", "reserved bits set [MQTT-3.8.3-4]"),
        ("unsubscribe-props", "UnsubscribePacket: its fields do not fill its remaining length"),
        ("puback", "PubackPacket: its fields do not fill its remaining length"),
    ],
)
def test_v5_property_bytes_on_a_311_connection_close_it_at_once_and_are_audited(
    broker: BrokerThread, pki: Pki, case: str, audited: str
) -> None:
    name = f"v311-props-{case}"
    sock = v311_joined(broker, pki, name)
    sock.sendall(v5_style_packet(case, name))
    # 3.1.1 has no reason codes: the connection is closed, long before its 60 s keep-alive.
    assert closed_within(sock, DEADLINE), "the connection stays open"
    assert wait_until(lambda: any(audited in m for m in protocol_violations(broker)), DEADLINE), (
        protocol_violations(broker)
    )
    assert wait_until(lambda: name not in broker.server.broker.sessions, DEADLINE)
    v311_joined(broker, pki, f"v311-after-{case}").close()


def test_a_311_connect_with_trailing_property_bytes_is_closed_without_connack_and_audited(
    broker: BrokerThread, pki: Pki
) -> None:
    device = pki.device("v311-connect-props")
    sock = tls_connect(broker.port, pki, device)
    packet = connect_packet(device.name, keepalive=60)
    props = b"\x03\x21\x00\x14"  # what mosquitto -V mqttv5 sends: Receive Maximum 20
    sock.sendall(b"\x10" + encode_varint(len(packet) - 2 + len(props)) + packet[2:] + props)
    sock.settimeout(DEADLINE)
    assert sock.recv(16) == b"", "a CONNACK for a malformed 3.1.1 CONNECT"
    assert wait_until(lambda: any("after the CONNECT" in m for m in protocol_violations(broker)), DEADLINE)
    assert device.name not in [d.device_id for d in broker.devices()]
    v311_joined(broker, pki, "v311-after-connect-props").close()


def test_v5_property_bytes_in_a_311_publish_are_payload_never_properties(
    broker: BrokerThread, pki: Pki
) -> None:
    """A 3.1.1 PUBLISH has no property length: what a v5 client would read as properties is the
    start of its payload, delivered byte for byte, and never becomes a property for a v5 subscriber."""
    service = pki.service("v5-watch-311-props")  # a service may read every device's telemetry
    sub = tls_connect(broker.port, pki, service)
    sub.sendall(mqtt5.ConnectPacket(service.name, clean_start=True, keep_alive=30).write())
    connack = read_packet(sub)
    assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0
    name = "v311-publish-props"
    topic = f"devices/{name}/data"
    sub.sendall(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS(1))]).write())
    suback = read_packet(sub)
    assert isinstance(suback, mqtt5.SubAckPacket) and [int(c) for c in suback.reason_codes] == [1]
    pub = v311_joined(broker, pki, name)
    payload = b"\x06\x09\x00\x04corr\x03\x00\x10application/json" + b"{}"  # as if Correlation Data...
    pub.sendall(publish_packet(topic, payload, packet_id=7))
    assert recv_exact(pub, 4, timeout=DEADLINE) == b"\x40\x02\x00\x07"
    message = read_packet(sub)
    assert isinstance(message, mqtt5.PublishPacket)
    assert (message.topic, bytes(message.payload)) == (topic, payload)
    assert message.correlation_data is None and message.content_type is None
    pub.close()
    sub.close()
