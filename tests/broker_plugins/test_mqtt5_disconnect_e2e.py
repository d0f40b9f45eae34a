"""Issue 15, the broker's goodbyes over MQTT 5: when jitp closes an established v5 connection, the
client is told why in a DISCONNECT, with the reason code the specification gives the situation and
a Reason String naming jitp's reason (never another device's data), and the audit says what it says.

Real broker, real mutual TLS, paho-mqtt's MQTTv5 client; raw bytes with the ``mqtt5`` codec where
the case needs a client that stops talking (keep-alive) or a look at what comes after the DISCONNECT
(shutdown). Nothing sleeps to synchronise: each step waits for its condition.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mqtt5
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from broker_plugins.reasons import Goodbye
from jitp.trust import Role
from tests.helpers import BrokerThread, Identity, Pki, client_context, connect, test_config, wait_until
from tests.rawmqtt import tls_connect

DEADLINE = 10.0
JITP = [sys.executable, "-m", "jitp.cli"]


# -- a paho MQTT 5 client that records how its connection ended ------------------------------------
@dataclass
class V5:
    client: mqtt.Client
    connack: int | None = None
    connack_reason: str | None = None
    connected: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    disconnect: int | None = None  # the reason code of the broker's DISCONNECT
    disconnect_reason: str | None = None  # its Reason String
    from_broker: bool | None = None  # the DISCONNECT came from the broker (not a lost socket)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def reason_string(props: Properties | None) -> str | None:
    return getattr(props, "ReasonString", None) if props is not None else None


def v5_connect(port: int, pki: Pki, ident: Identity, *, keepalive: int = 30) -> V5:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=ident.name, protocol=mqtt.MQTTv5, reconnect_on_failure=False
    )
    client.tls_set_context(client_context(pki, ident))
    conn = V5(client)

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        conn.connack, conn.connack_reason = int(rc.value), reason_string(props)
        conn.connected.set()

    def on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Properties | None) -> None:
        conn.disconnect, conn.disconnect_reason = int(rc.value), reason_string(props)
        conn.from_broker = bool(flags.is_disconnect_packet_from_server)
        conn.ended.set()
        conn.connected.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect("127.0.0.1", port, keepalive=keepalive, clean_start=True)
    client.loop_start()
    assert conn.connected.wait(DEADLINE), "no CONNACK"
    return conn


@pytest.fixture
def v5(broker: BrokerThread, pki: Pki) -> Iterator[Callable[..., V5]]:
    """Connect paho v5 clients to ``broker``; each is closed when the test ends, pass or fail."""
    opened: list[V5] = []

    def open_(ident: Identity, **kw: Any) -> V5:
        conn = v5_connect(broker.port, pki, ident, **kw)
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        conn.close()


def joined(conn: V5) -> V5:
    assert conn.connack == 0, f"CONNACK {conn.connack}: {conn.connack_reason}"
    assert not conn.ended.is_set()
    return conn


def told(conn: V5, goodbye: Goodbye) -> None:
    """``conn`` got the broker's DISCONNECT ``goodbye``, saying jitp's reason."""
    assert conn.ended.wait(DEADLINE), f"no DISCONNECT {goodbye.name} within {DEADLINE} s"
    assert conn.from_broker, "the connection ended without a DISCONNECT from the broker"
    assert conn.disconnect == int(goodbye), f"DISCONNECT 0x{conn.disconnect or 0:02x}, not {goodbye!r}"
    assert conn.disconnect_reason == goodbye.text


def published(conn: V5, topic: str, payload: bytes) -> bool:
    """A QoS 1 PUBLISH acknowledged by the broker."""
    info = conn.client.publish(topic, payload, qos=1)
    info.wait_for_publish(DEADLINE)
    return info.is_published()


def audit_of(broker: BrokerThread, device_id: str) -> list[tuple[str, str | None]]:
    return [(e.draft.action, e.draft.reason) for e in broker.audit() if e.draft.device_id == device_id]


# -- raw MQTT 5 ------------------------------------------------------------------------------------
def read_sized(sock: socket.socket, buf: bytearray) -> tuple[mqtt5.Packet, int]:
    """The next whole MQTT 5 packet from the broker and its size on the wire (``buf`` keeps what
    follows it)."""
    sock.settimeout(DEADLINE)
    while True:
        try:
            packet, used = mqtt5.read(memoryview(bytes(buf)))
            del buf[:used]
            return packet, used
        except IndexError:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed after {bytes(buf)!r}"
            buf += chunk


def read_packet(sock: socket.socket, buf: bytearray) -> mqtt5.Packet:
    return read_sized(sock, buf)[0]


def raw_join(port: int, pki: Pki, ident: Identity, *, keep_alive: int) -> tuple[socket.socket, bytearray]:
    sock = tls_connect(port, pki, ident)
    sock.sendall(mqtt5.ConnectPacket(ident.name, clean_start=True, keep_alive=keep_alive).write())
    buf = bytearray()
    connack = read_packet(sock, buf)
    assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0, connack
    return sock, buf


def at_eof(sock: socket.socket, buf: bytearray) -> bool:
    """Nothing more comes before the broker closes the connection."""
    if buf:
        return False
    sock.settimeout(DEADLINE)
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, OSError):
        return True


# -- takeover: 0x8E ---------------------------------------------------------------------------------
def test_takeover_tells_the_first_connection_0x8e_and_is_audited(
    broker: BrokerThread, pki: Pki, v5: Callable[..., V5]
) -> None:
    device = pki.device("v5-bye-takeover")
    first = joined(v5(device))
    second = joined(v5(device))
    told(first, Goodbye.SESSION_TAKEN_OVER)
    assert first.disconnect_reason is not None and "127.0.0.1" not in first.disconnect_reason
    assert not second.ended.is_set() and broker.server.broker.live_session(device.name) is not None
    assert wait_until(lambda: ("session-takeover", "duplicate_client_id") in audit_of(broker, device.name))
    [entry] = [e for e in broker.audit() if e.draft.action == "session-takeover"]
    assert entry.draft.details["same_certificate"] == "true"
    # The connection that took over keeps working: it still gets answers.
    assert published(second, f"devices/{device.name}/t", b"x")
    assert not second.ended.is_set()


# -- keep-alive: 0x8D -------------------------------------------------------------------------------
def test_silence_past_the_keep_alive_gets_0x8d(broker: BrokerThread, pki: Pki) -> None:
    """Keep-alive 1 s (the default profile's floor is 0, so not clamped: no Server Keep Alive) and
    then nothing: the broker closes after 1.5 keep-alives (limits.keepalive_grace) with 0x8D."""
    device = pki.device("v5-bye-keepalive")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(mqtt5.ConnectPacket(device.name, clean_start=True, keep_alive=1).write())
    buf = bytearray()
    connack = read_packet(sock, buf)
    assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0, connack
    assert connack.server_keep_alive is None  # the broker took the 1 s as asked
    disconnect = read_packet(sock, buf)
    assert isinstance(disconnect, mqtt5.DisconnectPacket), disconnect
    assert int(disconnect.reason_code) == Goodbye.KEEP_ALIVE_TIMEOUT
    assert disconnect.reason_str == Goodbye.KEEP_ALIVE_TIMEOUT.text
    assert at_eof(sock, buf)
    sock.close()
    assert wait_until(lambda: broker.server.broker.live_session(device.name) is None, DEADLINE)


# -- shutdown: 0x8B ---------------------------------------------------------------------------------
def test_shutdown_tells_every_v5_client_0x8b_before_closing(tmp_path: Path, pki: Pki) -> None:
    b = BrokerThread(test_config(tmp_path, pki)).start()
    stopped = False
    try:
        b.register_ca(pki.manufacturer.cert)
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        raws = [raw_join(b.port, pki, pki.device(f"v5-bye-shutdown-{i}"), keep_alive=30) for i in range(2)]
        paho = v5_connect(b.port, pki, pki.device("v5-bye-shutdown-paho"))
        try:
            joined(paho)
            b.stop()
            stopped = True
            for sock, buf in raws:
                disconnect = read_packet(sock, buf)
                assert isinstance(disconnect, mqtt5.DisconnectPacket), disconnect
                assert int(disconnect.reason_code) == Goodbye.SERVER_SHUTTING_DOWN
                assert disconnect.reason_str == Goodbye.SERVER_SHUTTING_DOWN.text
                assert at_eof(sock, buf), "more than the DISCONNECT before the close"
                sock.close()
            told(paho, Goodbye.SERVER_SHUTTING_DOWN)
        finally:
            paho.close()
    finally:
        if not stopped:
            b.stop()


# -- revoke of a live session: 0x98, then CONNACK 0x8A ---------------------------------------------
def test_revoking_a_live_session_says_0x98_and_its_reconnect_gets_0x8a(
    broker: BrokerThread, pki: Pki, v5: Callable[..., V5]
) -> None:
    device = pki.device("v5-bye-revoke")
    bystander = joined(v5(pki.device("v5-bye-bystander")))
    live = joined(v5(device))
    data = broker.config.data_dir
    proc = subprocess.run(
        [*JITP, "devices", "revoke", device.name, "--reason", "stolen", "--data-dir", str(data)],
        cwd=data.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    told(live, Goodbye.ADMINISTRATIVE_ACTION)
    assert "stolen" not in (live.disconnect_reason or "")  # the operator's note is not sent out
    assert not bystander.ended.is_set(), "another device was disconnected too"

    again = v5(device)
    assert again.connack == 0x8A, f"CONNACK 0x{again.connack or 0:02x}: {again.connack_reason}"
    assert again.connack_reason is not None and "device_blocked" in again.connack_reason
    assert "v5-bye-bystander" not in again.connack_reason
    assert wait_until(lambda: ("refused", "device_blocked") in audit_of(broker, device.name), DEADLINE)
    actions = [action for action, _ in audit_of(broker, device.name)]
    assert actions.index("revoked") < actions.index("refused"), actions


# -- profile violations: 0x95, 0x96 ------------------------------------------------------------------
def profile_broker(tmp_path: Path, pki: Pki, profile: str) -> BrokerThread:
    """A broker whose devices (the manufacturer CA) get a template with ``profile``."""
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "small.yaml").write_text(f"name: small\nversion: 1\ndevice_id: {{from: subject.CN}}\n{profile}")
    b = BrokerThread(test_config(tmp_path, pki, templates_dir=tdir)).start()
    try:
        b.register_ca(pki.manufacturer.cert, template="small")
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
    except BaseException:
        b.stop()
        raise
    return b


@pytest.fixture
def small_broker(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    b = profile_broker(tmp_path, pki, "profile:\n  max_message_size: 64\n")
    yield b
    b.stop()


@pytest.fixture
def slow_broker(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    b = profile_broker(tmp_path, pki, "profile:\n  rate_limit: {messages: 2, per_seconds: 3600}\n")
    yield b
    b.stop()


@pytest.fixture
def brisk_broker(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    b = profile_broker(tmp_path, pki, "profile:\n  keepalive: {min: 1, max: 1}\n")
    yield b
    b.stop()


def test_the_keep_alive_enforced_is_the_server_keep_alive_announced(
    brisk_broker: BrokerThread, pki: Pki
) -> None:
    """A device asks for 30 s; its profile allows 1 s at most: CONNACK says Server Keep Alive 1, and
    the broker holds it to that (0x8D after 1.5 s of silence), not to what it asked for."""
    device = pki.device("v5-bye-brisk")
    sock = tls_connect(brisk_broker.port, pki, device)
    sock.sendall(mqtt5.ConnectPacket(device.name, clean_start=True, keep_alive=30).write())
    buf = bytearray()
    connack = read_packet(sock, buf)
    assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0, connack
    assert connack.server_keep_alive == 1
    disconnect = read_packet(sock, buf)
    assert isinstance(disconnect, mqtt5.DisconnectPacket), disconnect
    assert int(disconnect.reason_code) == Goodbye.KEEP_ALIVE_TIMEOUT
    assert disconnect.reason_str == Goodbye.KEEP_ALIVE_TIMEOUT.text
    assert at_eof(sock, buf)
    sock.close()


def profile_limits(b: BrokerThread, device: str) -> list[str]:
    return [
        e.draft.details.get("message", "")
        for e in b.audit()
        if e.draft.reason == "profile_limit" and e.draft.device_id == device
    ]


def test_a_message_over_the_profiles_size_gets_0x95(small_broker: BrokerThread, pki: Pki) -> None:
    b = small_broker
    device = pki.device("v5-bye-big")
    topic = f"devices/{device.name}/t"
    service = connect(b.port, pki, pki.service("v5-bye-big-service"))
    conn = v5_connect(b.port, pki, device)
    again: V5 | None = None
    try:
        assert service.rc == 0 and service.subscribe("devices/+/t") == [1]
        joined(conn)
        # At the limit: routed and acknowledged. One byte over: closed with 0x95.
        assert published(conn, topic, b"x" * 64)
        conn.client.publish(topic, b"y" * 65, qos=1)
        told(conn, Goodbye.PACKET_TOO_LARGE)
        # Audited, with the sizes.
        assert wait_until(
            lambda: any("max_message_size 64" in m for m in profile_limits(b, device.name)), DEADLINE
        )
        # Not routed either: the device's next message, sent on a new connection after the
        # DISCONNECT, arrives right after the first one.
        assert wait_until(lambda: b.server.broker.live_session(device.name) is None, DEADLINE)
        again = joined(v5_connect(b.port, pki, device))
        assert published(again, topic, b"marker")
        assert wait_until(lambda: any(m.payload == b"marker" for m in service.messages), DEADLINE)
        assert [m.payload for m in service.messages] == [b"x" * 64, b"marker"]
    finally:
        for c in (conn, again):
            if c is not None:
                c.close()
        service.close()


def test_a_message_over_the_profiles_rate_gets_0x96(slow_broker: BrokerThread, pki: Pki) -> None:
    """Two messages an hour: the third closes the connection with 0x96 (a 3.1.1 client's is only
    dropped), and it is not routed."""
    b = slow_broker
    device = pki.device("v5-bye-rate")
    topic = f"devices/{device.name}/t"
    service = connect(b.port, pki, pki.service("v5-bye-rate-service"))
    conn = v5_connect(b.port, pki, device)
    try:
        assert service.rc == 0 and service.subscribe("devices/+/t") == [1]
        joined(conn)
        assert published(conn, topic, b"1") and published(conn, topic, b"2")
        conn.client.publish(topic, b"3", qos=1)
        told(conn, Goodbye.MESSAGE_RATE_TOO_HIGH)
        # The service saw the two within the rate and not the third: another device's marker,
        # published after the DISCONNECT, comes right after them.
        other = pki.device("v5-bye-rate-other")
        marker = joined(v5_connect(b.port, pki, other))
        try:
            assert published(marker, f"devices/{other.name}/t", b"marker")
        finally:
            marker.close()
        assert wait_until(lambda: any(m.payload == b"marker" for m in service.messages), DEADLINE)
        assert [m.payload for m in service.messages] == [b"1", b"2", b"marker"]
        assert wait_until(lambda: any("message rate" in m for m in profile_limits(b, device.name)), DEADLINE)
    finally:
        conn.close()
        service.close()


# -- the client's Maximum Packet Size bounds the DISCONNECT too -------------------------------------
SMALL_PACKETS = 32  # a client's Maximum Packet Size: CONNACK fits, a Reason String of 44 bytes not


def test_a_disconnect_drops_its_reason_string_to_fit_the_clients_maximum_packet_size(
    broker: BrokerThread, pki: Pki, v5: Callable[..., V5]
) -> None:
    """[MQTT-3.14.2-3]: the Reason String is left out if it would take the DISCONNECT over the
    Maximum Packet Size the client announced; the reason code still says why."""
    device = pki.device("v5-bye-small-packets")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(
        mqtt5.ConnectPacket(
            device.name, clean_start=True, keep_alive=30, max_packet_size=SMALL_PACKETS
        ).write()
    )
    buf = bytearray()
    connack = read_packet(sock, buf)
    assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0, connack
    assert len(Goodbye.SESSION_TAKEN_OVER.text) > SMALL_PACKETS  # with its Reason String it could not fit
    joined(v5(device))  # takes over
    packet, used = read_sized(sock, buf)
    assert used <= SMALL_PACKETS, (
        f"a DISCONNECT of {used} bytes to a client that takes {SMALL_PACKETS} at most: {bytes(buf)!r}"
    )
    assert isinstance(packet, mqtt5.DisconnectPacket), packet
    assert int(packet.reason_code) == Goodbye.SESSION_TAKEN_OVER and packet.reason_str is None
    assert at_eof(sock, buf)
    sock.close()


def test_a_refused_publish_drops_its_reason_string_to_fit_the_clients_maximum_packet_size(
    broker: BrokerThread, pki: Pki
) -> None:
    """[MQTT-3.4.2-2], the same rule for the PUBACK of a message the ACL refuses."""
    device = pki.device("v5-bye-small-puback")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(
        mqtt5.ConnectPacket(
            device.name, clean_start=True, keep_alive=30, max_packet_size=SMALL_PACKETS
        ).write()
    )
    buf = bytearray()
    connack = read_packet(sock, buf)
    assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0, connack
    sock.sendall(
        mqtt5.PublishPacket("devices/someone-else/t", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=7).write()
    )
    sock.sendall(
        mqtt5.PublishPacket(
            f"devices/{device.name}/t", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=8
        ).write()
    )
    (refused, size), accepted = read_sized(sock, buf), read_packet(sock, buf)
    assert isinstance(refused, mqtt5.PubAckPacket) and refused.packet_id == 7, refused
    assert int(refused.reason_code) == 0x87 and refused.reason_str is None
    assert size <= SMALL_PACKETS
    assert (
        isinstance(accepted, mqtt5.PubAckPacket)
        and accepted.packet_id == 8
        and int(accepted.reason_code) == 0
        and accepted.reason_str is None
    )
    sock.close()


def test_a_refusal_drops_its_reason_string_to_fit_the_clients_maximum_packet_size(
    broker: BrokerThread, pki: Pki
) -> None:
    """[MQTT-3.2.2-19], the same rule for a refused CONNECT's CONNACK (here 0x85: the client id is
    not the device id); the refusal is audited as ever."""
    device = pki.device("v5-bye-small-connack")
    sock = tls_connect(broker.port, pki, device)
    connect = mqtt5.ConnectPacket(f"{device.name}-x", clean_start=True, max_packet_size=SMALL_PACKETS)
    sock.sendall(connect.write())
    buf = bytearray()
    connack, size = read_sized(sock, buf)
    assert isinstance(connack, mqtt5.ConnAckPacket), connack
    assert int(connack.reason_code) == 0x85 and connack.reason_str is None
    assert size <= SMALL_PACKETS
    assert at_eof(sock, buf)
    sock.close()
    assert wait_until(
        lambda: (
            "client_id_mismatch" in [e.draft.reason for e in broker.audit() if e.draft.action == "refused"]
        ),
        DEADLINE,
    )
