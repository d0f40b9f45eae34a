"""MQTT 5 attacked by an intruder holding one valid device certificate (or one service certificate):
every path that publishes, Response Topic, shared subscriptions, properties as a resource.

Real broker on a loopback port, real mutual TLS, real certificates, MQTT 5 in raw bytes through the
``mqtt5`` codec (a client that misbehaves on purpose). Nothing sleeps to synchronise: where a message
must NOT arrive, a marker routed after it on the same path arrives instead (queues are FIFO and a
connection's packets are handled in order).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mqtt5
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker_plugins.session import JitpSession
from tests.broker_plugins.test_mqtt5_bad_input_e2e import connect_bytes, read_packet
from tests.broker_plugins.test_mqtt5_disconnect_e2e import profile_broker
from tests.certflow import init_issuer, make_csr, new_key
from tests.helpers import BrokerThread, Identity, Pki, client_context, wait_until
from tests.rawmqtt import Raw5, tls_connect

DEADLINE = 10.0
QOS1 = mqtt5.QoS.AT_LEAST_ONCE


@pytest.fixture
def raw(broker: BrokerThread, pki: Pki) -> Iterator[Callable[..., Raw5]]:
    opened: list[Raw5] = []

    def make(ident: Identity, **kw: Any) -> Raw5:
        client = Raw5(broker.port, pki, ident, **kw)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.sock.close()


# -- properties as a resource -----------------------------------------------------------------------
def test_empty_user_properties_count_toward_the_retained_quota(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """Attack: retained messages packed with empty user properties (5 bytes each on the wire, ~73
    held). They counted 0 bytes: one device retained 100 x 50,000 pairs (~370 MB) within its 1 MiB
    quota, and the broker's 256 MiB cap did not see them either."""
    device = raw(pki.device("att-empty-props"))
    empty = [("", "")] * 50_000  # 250 kB on the wire, under limits.max_packet_size
    for i in range(3):
        assert device.publish(f"devices/att-empty-props/r{i}", b"x", retain=True, user_properties=empty) == 0
    assert device.publish("devices/att-empty-props/marker", b"marker", retain=True) == 0
    retained = broker.server.broker.retained
    assert retained.owner_usage("att-empty-props") == (1, len(b"marker"))
    assert "devices/att-empty-props/r0" not in retained


@pytest.fixture
def small_broker(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    """Devices get a template whose profile allows 64-byte messages."""
    b = profile_broker(tmp_path, pki, "profile:\n  max_message_size: 64\n")
    yield b
    b.stop()


@pytest.mark.parametrize(
    "props",
    [
        {"user_properties": [("k", "v" * 8000)]},
        {"correlation_data": b"c" * 8000},
        {"content_type": "t" * 8000},
    ],
    ids=["user-property", "correlation-data", "content-type"],
)
def test_properties_count_toward_the_profiles_message_size(
    small_broker: BrokerThread, pki: Pki, props: dict[str, Any]
) -> None:
    """Attack: a device whose profile allows 64-byte messages sends a 1-byte payload with 8 kB of
    properties. Only the payload was measured: it was accepted and routed to every subscriber."""
    name = f"att-prof-{next(iter(props))}".replace("_", "-")
    opened: list[Raw5] = []
    try:
        service = Raw5(small_broker.port, pki, pki.service(f"svc-{name}"))
        opened.append(service)
        assert service.subscribe(f"devices/{name}/#") == [1]
        ident = pki.device(name)
        opened.append(device := Raw5(small_broker.port, pki, ident))
        assert device.publish(f"devices/{name}/ok", b"fits") == 0  # a small message passes
        service.wait_for(b"fits")
        device.sock.sendall(
            mqtt5.PublishPacket(f"devices/{name}/fat", b"x", qos=QOS1, packet_id=9, **props).write()
        )
        goodbye = device.expect(mqtt5.DisconnectPacket)
        assert int(goodbye.reason_code) == 0x95
        # the service never got it: a marker the device publishes after it arrives alone
        opened.append(device := Raw5(small_broker.port, pki, ident))
        assert device.publish(f"devices/{name}/after", b"after") == 0
        service.wait_for(b"after")
        assert service.payloads() == [b"fits", b"after"]
    finally:
        for client in opened:
            client.sock.close()


# -- the Last Will, held back by Will Delay ----------------------------------------------------------
def session_of(broker: BrokerThread, client_id: str) -> JitpSession:
    session = broker.server.broker._sessions[client_id][0]
    assert isinstance(session, JitpSession)
    return session


def test_a_delayed_will_is_published_after_its_delay(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """MQTT 5 Will Delay on a persistent session: the will goes after the delay [MQTT-3.1.3-9].
    Before: the session's expiry timer cancelled the will's timer, so it was never published."""
    service = raw(pki.service("svc-att-will-delay"))
    assert service.subscribe("devices/att-will-delay/#") == [1]
    will = mqtt5.Will("devices/att-will-delay/gone", payload=b"WILL", will_delay_interval=1)
    device = raw(pki.device("att-will-delay"), session_expiry_interval=60, will=will)
    device.sock.close()  # no DISCONNECT: the will is due
    message = service.wait_for(b"WILL")
    assert message.topic == "devices/att-will-delay/gone"


def test_a_reconnect_within_the_will_delay_cancels_the_will_also_after_a_takeover(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """The second connection takes over the first (its will held back by Will Delay): the first
    connection's end must not schedule a will that fires while the client is connected."""
    service = raw(pki.service("svc-att-will-takeover"))
    assert service.subscribe("devices/att-will-takeover/#") == [1]
    ident = pki.device("att-will-takeover")
    will = mqtt5.Will("devices/att-will-takeover/gone", payload=b"WILL", will_delay_interval=1)
    first = raw(ident, session_expiry_interval=60, will=will)
    second = raw(ident, clean_start=False, session_expiry_interval=60)
    assert int(first.expect(mqtt5.DisconnectPacket).reason_code) == 0x8E
    session = session_of(broker, ident.name)
    assert session.will_timer is None, "a will is pending while the client is connected"
    assert second.publish("devices/att-will-takeover/marker", b"marker") == 0
    service.wait_for(b"marker")
    assert b"WILL" not in service.payloads()


def test_revoking_an_offline_device_drops_its_delayed_will(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """Attack: a device sets a retained will on its own topic, held back by Will Delay up to its
    Session Expiry, drops the connection, and gets revoked. Its will would be published, and
    retained, after the revocation cleared its retained messages."""
    name = "att-will-revoked"
    will = mqtt5.Will(f"devices/{name}/gone", payload=b"WILL", retain=True, will_delay_interval=30)
    device = raw(pki.device(name), session_expiry_interval=60, will=will)
    device.sock.close()
    assert wait_until(lambda: broker.server.broker.live_session(name) is None, DEADLINE)
    session = session_of(broker, name)
    assert wait_until(lambda: session.will_timer is not None, DEADLINE), "no will pending"
    data = broker.config.data_dir
    proc = subprocess.run(
        [sys.executable, "-m", "jitp.cli", "devices", "revoke", name, "--data-dir", str(data)],
        cwd=data.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert wait_until(lambda: session.will_timer is None, DEADLINE), "the will is still pending"
    assert f"devices/{name}/gone" not in broker.server.broker.retained


def test_a_will_delay_past_the_session_expiry_goes_when_the_session_ends(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """Will Delay 600 s, Session Expiry 1 s: the will goes when the session ends [MQTT-3.1.3-9]."""
    service = raw(pki.service("svc-att-will-expiry"))
    assert service.subscribe("devices/att-will-expiry/#") == [1]
    will = mqtt5.Will("devices/att-will-expiry/gone", payload=b"WILL", will_delay_interval=600)
    device = raw(pki.device("att-will-expiry"), session_expiry_interval=1, will=will)
    device.sock.close()
    service.wait_for(b"WILL")
    assert wait_until(lambda: "att-will-expiry" not in broker.server.broker._sessions, DEADLINE)


# -- forged events ----------------------------------------------------------------------------------
EVENT = json.dumps({"schema": "jitp.event/1", "type": "revoked", "device_id": "victim"}).encode()
MARKER = [("schema", "jitp.event/1")]


def test_a_device_cannot_mark_its_message_as_one_of_jitps_events(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """Attack: a v5 device publishes event-shaped JSON on its own telemetry topic with Content Type
    application/json and the user property schema=jitp.event/1, the marker jitp's events carry for
    v5 subscribers. A service on ``#`` (telemetry) got it marker and all: one that trusts the marker
    took it for a provisioning event about another device. The marker is now the broker's alone."""
    service = raw(pki.service("svc-att-forge"))
    assert service.subscribe("#") == [1]
    device = raw(pki.device("att-forge"))
    topic = "devices/att-forge/telemetry"
    assert device.publish(topic, EVENT, user_properties=MARKER, content_type="application/json") == 0x87
    assert device.publish(topic, EVENT, user_properties=[("schema", "jitp.alert/1")]) == 0x87
    assert device.publish(topic, EVENT, user_properties=[("Schema", "mine"), ("x", "jitp.event/1")]) == 0
    assert device.publish(topic, b"marker", retain=True, user_properties=MARKER) == 0x87
    assert device.publish(topic, b"marker") == 0
    service.wait_for(b"marker")
    assert [dict(p.user_properties) for p in service.publishes] == [
        {"Schema": "mine", "x": "jitp.event/1"},
        {},
    ]
    assert topic not in broker.server.broker.retained


def test_a_will_cannot_carry_jitps_event_marker(broker: BrokerThread, pki: Pki) -> None:
    """The same marker in a will: CONNACK 0x87, audited will_not_allowed."""
    will = mqtt5.Will("devices/att-forge-will/gone", payload=EVENT, user_properties=MARKER)
    with pytest.raises(AssertionError, match="NOT_AUTHORIZED"):
        Raw5(broker.port, pki, pki.device("att-forge-will"), will=will)
    assert wait_until(
        lambda: any(
            e.draft.action == "refused" and e.draft.reason == "will_not_allowed" for e in broker.audit()
        ),
        DEADLINE,
    )


def test_a_device_cannot_name_a_dollar_response_topic_it_cannot_read(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """Attack (confused deputy): a v5 device's request names as Response Topic the admin API
    (``$jitp/admin/<command>``), an event topic, or another device's configuration or certificate
    answers. Before, it reached the service as sent, and a responder answering where it is asked
    published there in its own name (a service may publish admin requests). Its own $-topics
    (configuration, certificate answers) and its plain topics stay allowed."""
    service = raw(pki.service("svc-att-deputy"))
    assert service.subscribe("devices/+/request") == [1]
    name = "att-deputy"
    device = raw(pki.device(name))
    topic = f"devices/{name}/request"
    for response in (
        "$jitp/admin/devices.list",
        "$jitp/events/revoked/victim",
        "$jitp/devices/victim/config",
        "$jitp/certificates/victim/accepted",
        "$jitp/admin/replies/svc-att-deputy/x",
    ):
        assert device.publish(topic, b"forged", response_topic=response) == 0x87, response
    will = mqtt5.Will(topic, payload=b"will", response_topic="$jitp/admin/devices.list")
    with pytest.raises(AssertionError, match="NOT_AUTHORIZED"):
        Raw5(broker.port, pki, pki.device(f"{name}-will"), will=will)
    allowed = (f"$jitp/certificates/{name}/mine", f"devices/{name}/cmd/reply", "devices/elsewhere/reply")
    for n, response in enumerate(allowed):
        assert device.publish(topic, f"ok-{n}".encode(), response_topic=response) == 0, response
    service.wait_for(f"ok-{len(allowed) - 1}".encode())
    assert [p.response_topic for p in service.publishes] == list(allowed)


# -- DISCONNECT --------------------------------------------------------------------------------------
def test_a_disconnect_that_extends_a_session_without_expiry_is_a_protocol_error(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """A session that ends with its connection (Session Expiry 0) cannot be extended by DISCONNECT
    [MQTT-3.14.2-2]. Before: logged, taken as a normal DISCONNECT, so the will was suppressed and no
    reason code was sent; now DISCONNECT 0x82, the session ends and the will goes."""
    service = raw(pki.service("svc-att-extend"))
    assert service.subscribe("devices/att-extend/#") == [1]
    will = mqtt5.Will("devices/att-extend/gone", payload=b"WILL")
    device = raw(pki.device("att-extend"), will=will)
    device.sock.sendall(mqtt5.DisconnectPacket(session_expiry_interval=3600).write())
    assert int(device.expect(mqtt5.DisconnectPacket).reason_code) == 0x82
    service.wait_for(b"WILL")
    assert wait_until(lambda: "att-extend" not in broker.server.broker._sessions, DEADLINE)


# -- input the codec panics on -------------------------------------------------------------------
BAD_UTF8_USER_PROPERTY = b"\x26" + b"\x00\x01\xff" + b"\x00\x01v"  # a key that is not UTF-8


def publish_bytes(topic: str, props: bytes) -> bytes:
    """A QoS 1 PUBLISH (packet id 5, payload "p") with the raw property bytes ``props``."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + b"\x00\x05" + bytes([len(props)]) + props + b"p"
    return b"\x32" + bytes([len(body)]) + body


def test_a_connect_the_codec_panics_on_gets_0x81_and_is_closed(broker: BrokerThread, pki: Pki) -> None:
    """Attack (any certificate the TLS layer trusts, even a revoked device's: this is before
    admission): a CONNECT whose user property is not UTF-8. The ``mqtt5`` codec panics (pyo3's
    PanicException, a BaseException): it escaped every handler, nothing answered and nothing closed
    the connection, which stayed open and counted toward the listener's hard limit (max_connections
    + 10%): a few hundred such CONNECTs locked everyone out."""
    device = pki.device("att-panic-connect")
    sock = tls_connect(broker.port, pki, device)
    try:
        sock.sendall(connect_bytes(device.name, BAD_UTF8_USER_PROPERTY))
        connack = read_packet(sock)
        assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0x81
        sock.settimeout(DEADLINE)
        assert sock.recv(1) == b"", "the connection stays open"
    finally:
        sock.close()
    listener = broker.server.listener
    assert wait_until(lambda: listener.open_connections == 0, DEADLINE)


def test_a_publish_the_codec_panics_on_gets_0x81(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """The same after CONNACK: DISCONNECT 0x81 and an audited protocol_violation (before: the panic
    ended the connection without a word or an audit entry)."""
    device = raw(pki.device("att-panic-publish"))
    device.sock.sendall(publish_bytes("devices/att-panic-publish/x", BAD_UTF8_USER_PROPERTY))
    assert int(device.expect(mqtt5.DisconnectPacket).reason_code) == 0x81
    assert wait_until(
        lambda: any(
            e.draft.reason == "protocol_violation" and e.draft.device_id == "att-panic-publish"
            for e in broker.audit()
        ),
        DEADLINE,
    )


# -- properties the codec reads but will not write -----------------------------------------------
def string_property(identifier: int, text: bytes) -> bytes:
    return bytes([identifier]) + len(text).to_bytes(2, "big") + text


@pytest.mark.parametrize(
    ("props", "code"),
    [
        (string_property(0x08, b"replies/+"), 0x82),  # Response Topic with a wildcard
        (string_property(0x08, b"replies/#"), 0x82),
        (string_property(0x08, b""), 0x82),  # an empty Response Topic
        (string_property(0x08, b"replies/\x00"), 0x81),  # U+0000 [MQTT-1.5.4-2]
        (string_property(0x03, b"text/\x00"), 0x81),  # in the Content Type
        (b"\x26" + string_property(0x00, b"k")[1:] + string_property(0x00, b"\x00")[1:], 0x81),
    ],
    ids=["rt-plus", "rt-hash", "rt-empty", "rt-nul", "content-type-nul", "user-property-nul"],
)
def test_a_publish_whose_properties_cannot_be_forwarded_is_refused_and_subscribers_stay(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5], props: bytes, code: int
) -> None:
    """Attack: a v5 device publishes with a Response Topic holding a wildcard. The codec reads it
    but refuses to write it: before, the PUBLISH was acknowledged and routed, and the sender of every
    v5 subscriber it reached raised and dropped that subscriber's connection; a persistent session
    got it again at each reconnect, so one message locked a service out for good. Now the publisher
    gets a DISCONNECT with the reason code, and subscribers never see it."""
    service = raw(pki.service(f"svc-att-rt-{code:x}-{props.hex()[:12]}"), session_expiry_interval=300)
    assert service.subscribe("devices/+/x") == [1]
    name = f"att-rt-{code:x}-{props.hex()[:12]}"
    device = raw(pki.device(name))
    device.sock.sendall(publish_bytes(f"devices/{name}/x", props))
    assert int(device.expect(mqtt5.DisconnectPacket).reason_code) == code
    other = raw(pki.device(f"{name}-b"))
    assert other.publish(f"devices/{name}-b/x", b"marker") == 0
    service.wait_for(b"marker")
    assert service.payloads() == [b"marker"]
    assert broker.server.broker.live_session(service.name) is not None


def test_a_will_whose_response_topic_has_a_wildcard_is_refused(broker: BrokerThread, pki: Pki) -> None:
    """The same in a will: CONNACK 0x82 (it would have been published when the device went away)."""
    device = pki.device("att-rt-will")
    sock = tls_connect(broker.port, pki, device)
    try:
        connect = mqtt5.ConnectPacket(
            device.name,
            clean_start=True,
            will=mqtt5.Will("devices/att-rt-will/gone", payload=b"w", response_topic="replies/xx"),
        ).write()
        # the codec will not write a wildcard: put one in place of "xx"
        connect = connect.replace(b"replies/xx", b"replies/+#")
        sock.sendall(connect)
        connack = read_packet(sock)
        assert isinstance(connack, mqtt5.ConnAckPacket) and int(connack.reason_code) == 0x82
    finally:
        sock.close()


# -- CPU ---------------------------------------------------------------------------------------------
def test_a_subscribe_flood_does_not_scan_the_fleets_retained_messages(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """Attack: a device sends SUBSCRIBEs to its own wildcard filter in a loop (SUBSCRIBE has no rate
    limit; Retain Handling 0 asks for the retained messages each time). Each matched its filter
    against every retained message in the broker, one configuration per device: with 100,000
    devices ~85 ms of the event loop per SUBSCRIBE (300 took ~25 s, everyone else waiting). The
    retained topics are now a tree of levels: a SUBSCRIBE costs its own branch."""
    b = broker.server.broker

    async def fleet() -> None:
        for i in range(100_000):
            b.retained.put(f"$jitp/devices/fleet-{i:06d}/config", b"{}", 1, owner=None)

    broker.call(fleet(), timeout=120)
    device = raw(pki.device("att-sub-flood"))
    assert device.publish("devices/att-sub-flood/cmd/kept", b"kept", retain=True) == 0
    count = 300
    started = time.monotonic()
    for n in range(count):
        device.sock.sendall(
            mqtt5.SubscribePacket(
                n + 1, [mqtt5.TopicFilter("devices/att-sub-flood/cmd/#", max_qos=QOS1)]
            ).write()
        )
    for _ in range(count):
        device.expect(mqtt5.SubAckPacket, timeout=DEADLINE)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"{count} SUBSCRIBEs took {elapsed:.1f} s"
    # the retained message of the device's own branch still comes, and nothing else
    device.wait_for(b"kept")
    assert set(device.payloads()) == {b"kept"}


# -- defenses that hold (regression tests) -----------------------------------------------------------
def test_shared_subscriptions_do_not_escape_the_acl(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """A device reaches events, another device's topics or everything through no $share form; a
    service does not reach another principal's admin replies or the admin requests either."""
    device = raw(pki.device("att-share"))
    assert (
        device.subscribe(
            "$share/g/$jitp/events/#",
            "$share/a/$share/b/devices/att-share/cmd/#",
            "$share/g/#",
            "$share/g/+/att-share/cmd/#",
            "$share/g/devices/other/cmd/#",
            "$share/g/$jitp/devices/other/config",
            "$SHARE/g/#",
        )
        == [0x87] * 7
    )
    assert device.subscribe("$share/g/devices/att-share/cmd/#") == [1]  # its own namespace: fine
    service = raw(pki.service("svc-att-share"))
    assert (
        service.subscribe(
            "$share/a/$share/b/#",
            "$share/g/$jitp/admin/#",
            "$share/g/$jitp/admin/replies/someone-else/#",
            "$share/g/$jitp/certificates/att-share/#",
        )
        == [0x87] * 4
    )
    # the service's own filters work: an event and telemetry reach it
    assert service.subscribe("$share/g/#", "$jitp/events/#") == [1, 1]
    other = raw(pki.device("att-share-2"))  # its provisioning event is published now
    assert other.publish("devices/att-share-2/x", b"marker") == 0
    service.wait_for(b"marker")
    assert any(p.topic == "$jitp/events/provisioned/att-share-2" for p in service.publishes)
    device.sock.sendall(mqtt5.PingReqPacket().write())
    device.expect(mqtt5.PingRespPacket)
    assert device.publishes == []  # none of the refused filters was installed for it either


def test_a_device_cannot_publish_under_jitp_events(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """A PUBLISH to $jitp/events/...: DISCONNECT 0x90; a will there: CONNACK 0x87."""
    device = raw(pki.device("att-events"))
    device.sock.sendall(
        mqtt5.PublishPacket(
            "$jitp/events/revoked/victim", b"{}", qos=QOS1, packet_id=1, user_properties=MARKER
        ).write()
    )
    assert int(device.expect(mqtt5.DisconnectPacket).reason_code) == 0x90
    will = mqtt5.Will("$jitp/events/revoked/victim", payload=b"{}", content_type="application/json")
    with pytest.raises(AssertionError, match="NOT_AUTHORIZED"):
        Raw5(broker.port, pki, pki.device("att-events-will"), will=will)


def test_a_tiny_maximum_packet_size_drops_publishes_without_spinning(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """Maximum Packet Size 2: no PUBLISH fits, so each is discarded as if delivered [MQTT-3.1.2-25]:
    nothing arrives, nothing stays queued or in flight, and the connection keeps working."""
    device = raw(pki.device("att-tiny"), max_packet_size=2)
    assert device.subscribe("devices/att-tiny/cmd/#") == [1]
    for n in range(200):
        assert device.publish(f"devices/att-tiny/cmd/{n}", b"y" * 100) == 0
    device.sock.sendall(mqtt5.PingReqPacket().write())
    device.expect(mqtt5.PingRespPacket)
    assert device.publishes == []
    delivery = broker.server.broker._sessions["att-tiny"][0].delivery
    assert wait_until(lambda: len(delivery) == 0 and delivery.bytes == 0, DEADLINE)


def test_a_subscription_identifier_gets_0xa1(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """CONNACK says Subscription Identifiers Available = 0: a SUBSCRIBE with one is refused."""
    device = raw(pki.device("att-subid"))
    device.sock.sendall(
        mqtt5.SubscribePacket(
            1, [mqtt5.TopicFilter("devices/att-subid/cmd/#", max_qos=QOS1)], subscription_id=7
        ).write()
    )
    assert int(device.expect(mqtt5.DisconnectPacket).reason_code) == 0xA1


def test_admin_answers_stay_in_the_callers_reply_space_whatever_its_response_topic(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """A service's admin request names another principal's replies, an event topic or a device's
    command topic as Response Topic (with 60 kB of Correlation Data): the answer goes to its own
    reply space all the same, Correlation Data echoed; a Response Topic inside it is honoured."""
    victim = raw(pki.service("svc-att-victim"))
    assert victim.subscribe("$jitp/admin/replies/svc-att-victim/#", "$jitp/events/#", "#") == [1, 1, 1]
    caller = raw(pki.service("svc-att-caller"))
    assert caller.subscribe("$jitp/admin/replies/svc-att-caller/#") == [1]
    correlation = b"\x00" * 60_000
    elsewhere = (
        "$jitp/admin/replies/svc-att-victim/stolen",
        "$jitp/events/provisioned/fake",
        "devices/someone/cmd/reboot",
        "$jitp/admin/replies/svc-att-caller",  # the space itself, without its slash
    )
    for n, response in enumerate(elsewhere):
        request = json.dumps({"correlation_id": f"c{n}"}).encode()
        assert (
            caller.publish(
                "$jitp/admin/devices.list", request, response_topic=response, correlation_data=correlation
            )
            == 0
        )
    own = "$jitp/admin/replies/svc-att-caller/mine"
    request = json.dumps({"correlation_id": "own"}).encode()
    assert (
        caller.publish("$jitp/admin/devices.list", request, response_topic=own, correlation_data=b"own") == 0
    )

    caller.until(lambda got: len(got) == len(elsewhere) + 1)
    topics = {json.loads(bytes(p.payload))["correlation_id"]: p.topic for p in caller.publishes}
    assert topics == {f"c{n}": f"$jitp/admin/replies/svc-att-caller/c{n}" for n in range(len(elsewhere))} | {
        "own": own
    }
    assert all(p.correlation_data == correlation for p in caller.publishes if p.topic != own)
    # the victim got none of them: its own request's answer comes alone
    assert victim.publish("$jitp/admin/devices.list", json.dumps({"correlation_id": "v"}).encode()) == 0
    victim.until(lambda got: any(p.topic.startswith("$jitp/admin/replies/") for p in got))
    assert [p.topic for p in victim.publishes] == ["$jitp/admin/replies/svc-att-victim/v"]


def test_certificate_answers_stay_on_the_devices_own_topics_whatever_its_response_topic(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """A device's CSR request names another device's certificate topic, an event topic or its own
    telemetry as Response Topic: the answer goes to its own default topic (Correlation Data back);
    a Response Topic under its own $jitp/certificates/<id>/ is honoured; the other device sees none."""
    init_issuer(broker)
    other = raw(pki.device("att-cert-other"))
    assert other.subscribe("$jitp/certificates/att-cert-other/#") == [1]
    device = raw(pki.device("att-cert"))
    assert device.subscribe("$jitp/certificates/att-cert/#", "devices/att-cert/cmd/#") == [1, 1]
    elsewhere = (
        "$jitp/certificates/att-cert-other/accepted",
        "$jitp/certificates/att-cert-other",
        "devices/att-cert/cmd/x",
    )
    for n, response in enumerate(elsewhere):
        request = json.dumps({"request_id": f"r{n}", "csr": make_csr(new_key())}).encode()
        correlation = f"c{n}".encode()
        topic = "$jitp/certificates/att-cert/create-from-csr"
        assert device.publish(topic, request, response_topic=response, correlation_data=correlation) == 0
    own = "$jitp/certificates/att-cert/mine"
    request = json.dumps({"request_id": "own", "csr": make_csr(new_key())}).encode()
    topic = "$jitp/certificates/att-cert/create-from-csr"
    assert device.publish(topic, request, response_topic=own, correlation_data=b"own") == 0
    device.until(lambda got: len(got) == len(elsewhere) + 1)
    answers = {
        json.loads(bytes(p.payload))["request_id"]: (p.topic, p.correlation_data) for p in device.publishes
    }
    default = "$jitp/certificates/att-cert/accepted"
    expected = {f"r{n}": (default, f"c{n}".encode()) for n in range(len(elsewhere))}
    assert answers == expected | {"own": (own, b"own")}
    # the other device got none of them: its own request's answer comes alone
    request = json.dumps({"request_id": "theirs", "csr": make_csr(new_key())}).encode()
    assert other.publish("$jitp/certificates/att-cert-other/create-from-csr", request) == 0
    other.until(lambda got: bool(got))
    assert [json.loads(bytes(p.payload))["request_id"] for p in other.publishes] == ["theirs"]


def test_a_payload_format_indicator_other_than_0_or_1_is_refused_and_paho_subscribers_stay(
    broker: BrokerThread, pki: Pki, raw: Callable[..., Raw5]
) -> None:
    """Attack: a v5 device publishes with Payload Format Indicator 2 (only 0 and 1 exist). The codec
    reads it and the broker forwarded it: paho-mqtt's v5 client stops receiving on it, so every
    paho service reading device telemetry went deaf (and a persistent one got it again at each
    reconnect). Now the publisher gets DISCONNECT 0x82 and the service gets the later marker."""
    service = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="svc-att-pfi", protocol=mqtt.MQTTv5)
    service.tls_set_context(client_context(pki, pki.service("svc-att-pfi")))
    received: list[bytes] = []
    subscribed = threading.Event()
    service.on_message = lambda c, u, m: received.append(m.payload)
    service.on_subscribe = lambda *args: subscribed.set()
    service.on_connect = lambda c, *args: c.subscribe("devices/+/x", qos=1)
    service.connect("127.0.0.1", broker.port)
    service.loop_start()
    try:
        assert subscribed.wait(DEADLINE)
        device = raw(pki.device("att-pfi"))
        device.sock.sendall(publish_bytes("devices/att-pfi/x", b"\x01\x02"))  # PFI 2
        assert int(device.expect(mqtt5.DisconnectPacket).reason_code) == 0x82
        other = raw(pki.device("att-pfi-b"))
        assert other.publish("devices/att-pfi-b/x", b"marker", payload_format_indicator=1) == 0
        assert wait_until(lambda: b"marker" in received, DEADLINE), received
        assert received == [b"marker"]
    finally:
        service.disconnect()
        service.loop_stop()
