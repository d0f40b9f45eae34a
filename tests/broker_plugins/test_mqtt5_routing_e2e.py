"""Issue 15, MQTT 5 routing end to end: shared subscriptions, the subscription options No Local,
Retain As Published and Retain Handling, Message Expiry, the properties of provisioning events and
of messages across protocol versions.

Real broker, real mutual TLS, real paho-mqtt clients (MQTT 5 and 3.1.1); raw MQTT 5 bytes (the
``mqtt5`` codec) where paho cannot express the case: a shared-subscription member that never
acknowledges and then drops its socket, and share names with wildcards.
Nothing sleeps to synchronise. Where a message must NOT arrive, a marker that the broker routed
after it into the same session queue arrives instead: queues are FIFO and each connection's packets
are handled in order, so the marker's arrival proves the earlier message was never queued.

The interop matrix (tests/interop/test_matrix.py) already covers joins, own-namespace publish and
subscribe, retained configuration, persistent sessions with Session Expiry, and payload and retain
flag across versions; these tests do not repeat them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import mqtt5
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from jitp.domain.events import event_topic
from jitp.domain.records import EventType
from tests.helpers import BrokerThread, Identity, Pki, client_context, wait_until
from tests.rawmqtt import Raw5

DEADLINE = 10.0
SESSION_EXPIRY = 300
NOT_AUTHORIZED, FILTER_INVALID = 0x87, 0x8F


class Client:
    """A paho-mqtt client (MQTT 5 or 3.1.1) over mutual TLS that records what it receives."""

    def __init__(
        self,
        broker: BrokerThread,
        pki: Pki,
        ident: Identity,
        *,
        version: int = 5,
        session_expiry: int = 0,
        clean_start: bool = True,
    ) -> None:
        self.name, self.version = ident.name, version
        if version == 5:
            self.client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=ident.name,
                protocol=mqtt.MQTTv5,
                reconnect_on_failure=False,
            )
        else:
            self.client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=ident.name,
                protocol=mqtt.MQTTv311,
                clean_session=clean_start,
                reconnect_on_failure=False,
            )
        self.client.tls_set_context(client_context(pki, ident))
        self.messages: list[mqtt.MQTTMessage] = []
        self.session_present: bool | None = None
        self._subacks: dict[int, list[int]] = {}
        self._connack: list[int] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        kw: dict[str, Any] = {}
        if version == 5:
            props = Properties(PacketTypes.CONNECT)
            if session_expiry:
                props.SessionExpiryInterval = session_expiry
            kw = {"clean_start": clean_start, "properties": props}
        self.client.connect("127.0.0.1", broker.port, keepalive=30, **kw)
        self.client.loop_start()
        assert wait_until(lambda: self._connack, DEADLINE), f"{self.name}: no CONNACK"
        assert self._connack == [0], f"{self.name}: CONNACK {self._connack}"

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        self._connack.append(int(rc.value))

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        self._subacks[mid] = [int(rc.value) for rc in codes]

    def subscribe(
        self,
        topic: str | list[tuple[str, SubscribeOptions]],
        *,
        qos: int = 1,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
    ) -> list[int]:
        """SUBSCRIBE (waits for the SUBACK); the reason codes granted."""
        if isinstance(topic, str) and self.version == 4:
            rc, mid = self.client.subscribe(topic, qos)
        elif isinstance(topic, str):
            options = SubscribeOptions(
                qos=qos,
                noLocal=no_local,
                retainAsPublished=retain_as_published,
                retainHandling=retain_handling,
            )
            rc, mid = self.client.subscribe(topic, options=options)
        else:
            rc, mid = self.client.subscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None, rc
        assert wait_until(lambda: mid in self._subacks, DEADLINE), f"{self.name}: no SUBACK"
        return self._subacks[mid]

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """PUBLISH; at QoS 1 waits for the PUBACK (the broker has routed the message by then)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(DEADLINE)
        assert info.is_published(), f"{self.name}: {topic} not acknowledged"

    def payloads(self) -> list[bytes]:
        return [bytes(m.payload) for m in self.messages]

    def wait_for(self, payload: bytes) -> None:
        assert wait_until(lambda: payload in self.payloads(), DEADLINE), (
            f"{self.name} did not get {payload!r}; got {self.payloads()}"
        )

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


@pytest.fixture
def connect(broker: BrokerThread, pki: Pki) -> Iterator[Callable[..., Client]]:
    """Connect a :class:`Client` (closed when the test ends, pass or fail)."""
    opened: list[Client] = []

    def make(ident: Identity, **kw: Any) -> Client:
        client = Client(broker, pki, ident, **kw)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def gone(broker: BrokerThread, client_id: str) -> bool:
    return broker.server.broker.live_session(client_id) is None


def prop(message: mqtt.MQTTMessage, name: str) -> Any:
    """The MQTT 5 property ``name`` of a received message (paho's attribute), None if absent."""
    assert message.properties is not None, "not an MQTT 5 message"
    return getattr(message.properties, name, None)


def user_properties(message: mqtt.MQTTMessage) -> list[tuple[str, str]]:
    return list(prop(message, "UserProperty") or [])


def expiry_props(seconds: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = seconds
    return props


def wait_past(deadline: float) -> None:
    """Wait until the (shared, monotonic) clock is past ``deadline``: a condition, not a delay."""
    assert wait_until(lambda: time.monotonic() > deadline, DEADLINE)


# -- shared subscriptions -------------------------------------------------------------------------
def test_shared_subscription_delivers_each_qos1_message_to_exactly_one_member(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    device = connect(pki.device("sh-dev"))
    telemetry = f"devices/{device.name}/telemetry"
    shared = f"$share/ingest/{telemetry}"
    members = [connect(pki.service(f"sh-svc-{i}")) for i in range(3)]
    for member in members:
        assert member.subscribe(shared) == [1]

    sent = [f"m{i}".encode() for i in range(12)]
    for payload in sent:
        device.publish(telemetry, payload)
    assert wait_until(lambda: sum(len(m.messages) for m in members) >= len(sent), DEADLINE)
    # Markers until each member has one: routed after the 12, so anything of the 12 still coming to
    # a member would have come before its marker (one queue per member, in order).
    markers: list[bytes] = []

    def arrived() -> bool:
        return any(markers[-1] in member.payloads() for member in members)

    while not all(any(p.startswith(b"marker") for p in m.payloads()) for m in members):
        assert len(markers) < 10 * len(members), "a member gets no messages"
        markers.append(f"marker{len(markers)}".encode())
        device.publish(telemetry, markers[-1])
        assert wait_until(arrived, DEADLINE)

    got = [p for m in members for p in m.payloads() if not p.startswith(b"marker")]
    assert sorted(got) == sorted(sent), "each message exactly once across the group"
    assert all(any(not p.startswith(b"marker") for p in m.payloads()) for m in members), (
        f"not spread across the group: {[m.payloads() for m in members]}"
    )
    assert all(m.qos == 1 and not m.retain for member in members for m in member.messages)


def test_unacknowledged_shared_messages_go_to_another_member_when_one_drops(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    device = connect(pki.device("shr-dev"))
    telemetry = f"devices/{device.name}/telemetry"
    shared = f"$share/ingest/{telemetry}"
    silent = Raw5(broker.port, pki, pki.service("shr-silent"), ack=False)
    try:
        assert silent.subscribe(shared) == [1]
        steady = connect(pki.service("shr-steady"))
        assert steady.subscribe(shared) == [1]

        sent = [f"m{i}".encode() for i in range(8)]
        for payload in sent:
            device.publish(telemetry, payload)
        assert wait_until(lambda: silent.poll() + len(steady.messages) >= len(sent), DEADLINE)
        unacked = silent.payloads()
        assert unacked, "the silent member got none of the group's messages"
        assert sorted(unacked + steady.payloads()) == sorted(sent), "each message once across the group"
        assert all(int(p.qos) == 1 for p in silent.publishes)
        before = steady.payloads()
    finally:
        silent.drop()

    # What the dropped member never acknowledged now goes to the other member, and only that.
    assert wait_until(lambda: sorted(steady.payloads()) == sorted(sent), DEADLINE), (
        f"not redelivered: silent had {unacked}, steady has {steady.payloads()}"
    )
    assert steady.payloads()[: len(before)] == before
    assert sorted(steady.payloads()[len(before) :]) == sorted(unacked)
    assert wait_until(lambda: gone(broker, "shr-silent"), DEADLINE)
    # And the group goes on with its remaining member.
    device.publish(telemetry, b"after")
    steady.wait_for(b"after")
    assert len(steady.payloads()) == len(sent) + 1, steady.payloads()


def test_acl_applies_to_the_inner_filter_and_malformed_share_names_are_invalid(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    device = connect(pki.device("sh-acl"))
    own = f"devices/{device.name}/cmd/#"
    filters = [
        f"$share/g/{own}",  # its own namespace
        "$share/g/devices/sh-acl-neighbour/cmd/#",  # another device's
        "$share/g/#",  # everything (a device may not)
        "$share/g/$jitp/events/#",  # the event feed (services only)
        f"$share//{own}",  # empty share name [MQTT-4.8.2-1]
        "$share/g",  # no filter [MQTT-4.8.2-2]
        "$share/g/",  # empty filter
    ]
    codes = device.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
    assert codes == [1, NOT_AUTHORIZED, NOT_AUTHORIZED, NOT_AUTHORIZED] + [FILTER_INVALID] * 3, codes
    assert not gone(broker, device.name), "refused filters are answered in the SUBACK, not by a close"
    # The granted shared subscription works: the device gets what it publishes to its own command topic.
    device.publish(f"devices/{device.name}/cmd/x", b"to myself")
    device.wait_for(b"to myself")


def test_a_wildcard_in_a_share_name_gets_filter_invalid(broker: BrokerThread, pki: Pki) -> None:
    """``$share/g+/...`` and ``$share/g#/...`` [MQTT-4.8.2-2]: paho and the ``mqtt5`` codec refuse
    to send them, so raw bytes. The broker answers 0x8F for each and keeps the connection."""
    member = Raw5(broker.port, pki, pki.device("sh-wild"))
    try:
        body = b"\x00\x07" + b"\x00"  # packet id 7, no properties
        for name in (b"g+", b"g#"):
            pattern = b"$share/" + name + b"/devices/sh-wild/cmd/#"
            body += len(pattern).to_bytes(2, "big") + pattern + b"\x01"
        member.sock.sendall(b"\x82" + bytes([len(body)]) + body)
        suback = member.next(DEADLINE)
        assert isinstance(suback, mqtt5.SubAckPacket), suback
        assert suback.packet_id == 7
        assert [int(c) for c in suback.reason_codes] == [FILTER_INVALID, FILTER_INVALID], suback
        member.sock.sendall(mqtt5.PingReqPacket().write())
        assert isinstance(member.next(DEADLINE), mqtt5.PingRespPacket), "the connection did not go on"
    finally:
        member.sock.close()


def test_a_provisioning_event_goes_to_exactly_one_member_of_a_group(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    shared = "$share/provisioning/$jitp/events/provisioned/+"
    members = [connect(pki.service(f"shev-svc-{i}")) for i in range(2)]
    for member in members:
        assert member.subscribe(shared) == [1]

    def events_for(device_id: str) -> list[mqtt.MQTTMessage]:
        topic = event_topic(EventType.PROVISIONED, device_id)
        return [m for member in members for m in member.messages if m.topic == topic]

    connect(pki.device("shev-new")).close()
    assert wait_until(lambda: events_for("shev-new"), DEADLINE), "no member got the event"
    # Later joins until each member has an event published after the first one's.
    later: list[str] = []

    def has_later(member: Client) -> bool:
        topics = {event_topic(EventType.PROVISIONED, d) for d in later}
        return any(m.topic in topics for m in member.messages)

    while not all(has_later(member) for member in members):
        assert len(later) < 10, "a member gets no events"
        later.append(f"shev-later-{len(later)}")
        connect(pki.device(later[-1])).close()
        assert wait_until(lambda: events_for(later[-1]), DEADLINE)

    [event] = events_for("shev-new")
    assert event.qos == 1
    assert json.loads(event.payload)["device_id"] == "shev-new"
    assert all(len(events_for(d)) == 1 for d in later)


# -- subscription options -----------------------------------------------------------------------
def test_no_local_keeps_a_clients_own_messages_from_it_but_not_from_others(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    device = connect(pki.device("nl-dev"))
    cmd = f"devices/{device.name}/cmd"
    assert device.subscribe(f"{cmd}/own", no_local=True) == [1]
    assert device.subscribe(f"{cmd}/marker") == [1]  # without No Local
    service = connect(pki.service("nl-svc"))
    assert service.subscribe(f"{cmd}/#") == [1]

    device.publish(f"{cmd}/own", b"own")
    device.publish(f"{cmd}/marker", b"marker")  # handled and routed after "own"
    device.wait_for(b"marker")
    service.wait_for(b"marker")
    assert device.payloads() == [b"marker"], "No Local: the device got its own message"
    assert service.payloads() == [b"own", b"marker"], "another subscriber gets it"


def test_retain_as_published_keeps_the_retain_flag_of_a_live_message(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    device = connect(pki.device("rap-dev"))
    state = f"devices/{device.name}/state"
    as_published = connect(pki.service("rap-svc-on"))
    assert as_published.subscribe(state, retain_as_published=True) == [1]
    plain = connect(pki.service("rap-svc-off"))
    assert plain.subscribe(state) == [1]

    device.publish(state, b"retained", retain=True)
    device.publish(state, b"live")
    for client in (as_published, plain):
        client.wait_for(b"live")
    assert [(m.payload, m.retain) for m in as_published.messages] == [(b"retained", True), (b"live", False)]
    assert [(m.payload, m.retain) for m in plain.messages] == [(b"retained", False), (b"live", False)]


@pytest.mark.parametrize(
    ("handling", "expected"),
    [
        (0, [b"retained", b"retained", b"marker"]),  # at every subscribe
        (1, [b"retained", b"marker"]),  # only when the subscription is new
        (2, [b"marker"]),  # never
    ],
)
def test_retain_handling(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client], handling: int, expected: list[bytes]
) -> None:
    device = connect(pki.device(f"rh{handling}-dev"))
    state, marker = f"devices/{device.name}/state", f"devices/{device.name}/marker"
    device.publish(state, b"retained", retain=True)
    device.publish(marker, b"marker", retain=True)
    service = connect(pki.service(f"rh{handling}-svc"))
    assert service.subscribe(state, retain_handling=handling) == [1]
    assert service.subscribe(state, retain_handling=handling) == [1]  # again: not new
    # A later SUBSCRIBE on the same connection (handled in order): its retained message comes after
    # any of the subscriptions before.
    assert service.subscribe(marker) == [1]
    service.wait_for(b"marker")
    assert service.payloads() == expected
    assert all(m.retain for m in service.messages)
    # The subscription itself is live whatever its Retain Handling.
    device.publish(state, b"live")
    service.wait_for(b"live")
    assert [(m.payload, m.retain) for m in service.messages[len(expected) :]] == [(b"live", False)]


# -- Message Expiry ---------------------------------------------------------------------------------
def test_a_queued_message_past_its_expiry_is_not_delivered_and_the_rest_carry_the_time_left(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    device = connect(pki.device("mx-dev"))
    telemetry = f"devices/{device.name}/telemetry"
    service_id = pki.service("mx-svc")
    away = connect(service_id, session_expiry=SESSION_EXPIRY)
    assert away.subscribe(telemetry) == [1]
    away.close()
    assert wait_until(lambda: gone(broker, service_id.name), DEADLINE)

    device.publish(telemetry, b"expires in 60 s", properties=expiry_props(60))
    device.publish(telemetry, b"expires in 1 s", properties=expiry_props(1))
    acked = time.monotonic()  # the broker took it (and set its deadline) before this
    device.publish(telemetry, b"never expires")
    wait_past(acked + 1.0)

    back = connect(service_id, session_expiry=SESSION_EXPIRY, clean_start=False)
    assert back.session_present is True
    back.wait_for(b"never expires")  # queued after the expired one
    assert back.payloads() == [b"expires in 60 s", b"never expires"]
    first, last = back.messages
    # The interval forwarded is the time left [MQTT-3.3.2-6]: more than a second has passed.
    assert 1 <= prop(first, "MessageExpiryInterval") <= 59, first.properties
    assert prop(last, "MessageExpiryInterval") is None, last.properties


def test_a_retained_message_past_its_expiry_is_not_sent(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    device = connect(pki.device("mxr-dev"))
    lasting, short = f"devices/{device.name}/lasting", f"devices/{device.name}/short"
    device.publish(lasting, b"lasting", retain=True, properties=expiry_props(60))
    device.publish(short, b"short", retain=True, properties=expiry_props(1))
    acked = time.monotonic()
    wait_past(acked + 1.0)

    service = connect(pki.service("mxr-svc"))
    assert service.subscribe(short) == [1]
    assert service.subscribe(lasting) == [1]  # handled after: its retained message comes after
    service.wait_for(b"lasting")
    assert service.payloads() == [b"lasting"]
    [message] = service.messages
    assert message.retain
    assert 1 <= prop(message, "MessageExpiryInterval") <= 59, message.properties


# -- properties: events and across versions -----------------------------------------------------
def test_provisioning_events_carry_content_type_and_schema_for_v5_and_the_same_json_for_311(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    feed = "$jitp/events/provisioned/+"
    v5 = connect(pki.service("evp-svc-v5"))
    v311 = connect(pki.service("evp-svc-v311"), version=4)
    assert v5.subscribe(feed) == [1]
    assert v311.subscribe(feed) == [1]

    connect(pki.device("evp-dev"), version=4).close()
    topic = event_topic(EventType.PROVISIONED, "evp-dev")
    assert wait_until(lambda: all(any(m.topic == topic for m in c.messages) for c in (v5, v311)), DEADLINE)
    [at_5] = [m for m in v5.messages if m.topic == topic]
    [at_311] = [m for m in v311.messages if m.topic == topic]
    assert at_5.payload == at_311.payload
    assert json.loads(at_5.payload)["device_id"] == "evp-dev"
    assert prop(at_5, "ContentType") == "application/json"
    assert ("schema", "jitp.event/1") in user_properties(at_5)
    assert prop(at_5, "PayloadFormatIndicator") == 1
    assert at_5.qos == at_311.qos == 1


def test_v5_publish_properties_reach_a_v5_subscriber_intact_and_a_311_subscriber_gets_the_payload(
    broker: BrokerThread, pki: Pki, connect: Callable[..., Client]
) -> None:
    device = connect(pki.device("xv-dev"))
    telemetry = f"devices/{device.name}/telemetry"
    v5 = connect(pki.service("xv-svc-v5"))
    v311 = connect(pki.service("xv-svc-v311"), version=4)
    assert v5.subscribe(telemetry) == [1]
    assert v311.subscribe(telemetry) == [1]

    props = Properties(PacketTypes.PUBLISH)
    sent_user = [("unit", "celsius"), ("unit", "again"), ("ü", "✓")]
    props.UserProperty = sent_user
    props.ContentType = "text/plain; charset=utf-8"
    props.ResponseTopic = f"devices/{device.name}/cmd/reply"
    props.CorrelationData = b"\x00\x01corr\xff"
    props.PayloadFormatIndicator = 1
    payload = "21.5 °C".encode()
    device.publish(telemetry, payload, properties=props)
    v5.wait_for(payload)
    v311.wait_for(payload)

    [got5] = v5.messages
    assert user_properties(got5) == sent_user  # order and repeats kept
    assert prop(got5, "ContentType") == "text/plain; charset=utf-8"
    assert prop(got5, "ResponseTopic") == f"devices/{device.name}/cmd/reply"
    assert prop(got5, "CorrelationData") == b"\x00\x01corr\xff"
    assert prop(got5, "PayloadFormatIndicator") == 1
    [got311] = v311.messages
    assert (got311.topic, got311.payload, got311.qos, got311.retain) == (telemetry, payload, 1, False)

    # And the reverse: what a 3.1.1 publisher sends reaches a v5 subscriber with no properties.
    old = connect(pki.device("xv-dev-311"), version=4)
    old_topic = f"devices/{old.name}/telemetry"
    assert v5.subscribe(old_topic) == [1]
    old.publish(old_topic, b"from 3.1.1")
    v5.wait_for(b"from 3.1.1")
    from_311 = v5.messages[-1]
    for name in ("UserProperty", "ContentType", "ResponseTopic", "CorrelationData", "MessageExpiryInterval"):
        assert prop(from_311, name) is None, from_311.properties
