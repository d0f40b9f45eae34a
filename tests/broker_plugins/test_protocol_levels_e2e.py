"""Issue 15: MQTT 3.1.1 and 5 on one listener; a CONNECT for a version jitp does not speak gets the
refusal its own version understands, at once, and is audited. (amqtt alone misread an MQTT 5
CONNECT with properties and left the client hanging until the CONNECT deadline.)"""

from __future__ import annotations

import shutil
import subprocess
import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.helpers import BrokerThread, Pki, client_context, wait_until
from tests.rawmqtt import recv_exact, tls_connect

DEADLINE = 10.0


def refusals(broker: BrokerThread) -> list[tuple[str | None, str]]:
    return [(e.draft.reason, e.draft.details.get("detail", "")) for e in broker.audit()]


def raw_connect(name: bytes, level: int, client_id: bytes) -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes([level, 0x02]) + (30).to_bytes(2, "big")
    if level == 5:
        body += b"\x03\x21\x00\x14"  # properties: Receive Maximum 20 (what mosquitto always sends)
    body += len(client_id).to_bytes(2, "big") + client_id
    return b"\x10" + bytes([len(body)]) + body


@pytest.mark.parametrize(
    ("name", "level", "connack"),
    [
        (b"MQIsdp", 3, b"\x20\x02\x00\x01"),  # MQTT 3.1: return code 1
        (b"MQTT", 6, b"\x20\x02\x00\x01"),
    ],
    ids=["mqtt31", "level-6"],
)
def test_other_protocol_levels_are_refused_at_once_and_audited(
    broker: BrokerThread, pki: Pki, name: bytes, level: int, connack: bytes
) -> None:
    device = pki.device(f"proto-{level}-{name.decode().lower()}")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(raw_connect(name, level, device.name.encode()))
    # A CONNACK at all is the fix: amqtt sent none and closed at the CONNECT deadline.
    assert recv_exact(sock, len(connack), timeout=DEADLINE) == connack
    sock.close()
    detail = f"{name.decode()} level {level}"
    assert wait_until(lambda: ("unsupported_protocol", detail) in refusals(broker), DEADLINE)
    assert device.name not in broker.server.broker.sessions


def test_a_first_packet_that_is_not_connect_closes_the_connection(broker: BrokerThread, pki: Pki) -> None:
    sock = tls_connect(broker.port, pki, pki.device("proto-not-connect"))
    sock.sendall(b"\xc0\x00")  # PINGREQ
    sock.settimeout(DEADLINE)
    assert sock.recv(16) == b""


def test_paho_mqtt5_client_with_properties_joins_and_reads_the_connack_properties(
    broker: BrokerThread, pki: Pki
) -> None:
    device = pki.device("proto-paho-v5")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device.name, protocol=mqtt.MQTTv5)
    client.tls_set_context(client_context(pki, device))
    got = threading.Event()
    seen: list[tuple[Any, Any]] = []

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        seen.append((rc, props))
        got.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 10
    client.connect("127.0.0.1", broker.port, keepalive=30, clean_start=True, properties=props)
    client.loop_start()
    try:
        assert got.wait(DEADLINE), "no CONNACK"
        rc, connack = seen[0]
        assert int(rc.value) == 0, rc
        # What jitp announces, truthfully: QoS 1 at most, no topic aliases, no subscription ids,
        # shared subscriptions, the packet limit.
        assert connack.MaximumQoS == 1
        assert getattr(connack, "TopicAliasMaximum", 0) == 0
        assert connack.SubscriptionIdentifierAvailable == 0
        assert getattr(connack, "SharedSubscriptionAvailable", 1) == 1
        assert connack.MaximumPacketSize == broker.server.config.limits.max_packet_size
    finally:
        client.disconnect()
        client.loop_stop()


def test_mosquitto_pub_v5_publishes(broker: BrokerThread, pki: Pki) -> None:
    tool = shutil.which("mosquitto_pub")
    assert tool is not None, "mosquitto_pub is not installed (Debian package mosquitto-clients)"
    device = pki.device("proto-mosquitto-v5")
    proc = subprocess.run(
        [
            tool, "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5", "-q", "1",
            "--cafile", str(pki.layout.root_cert), "--cert", str(device.cert_path), "--key", str(device.key_path),
            "-i", device.name, "-t", f"devices/{device.name}/t", "-m", "x",
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
