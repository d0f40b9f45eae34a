"""Issue 15, request/response the MQTT 5 way: the admin API and the certificate enrollment topics
take a Response Topic plus Correlation Data (instead of ``reply_to`` in the body), answer on that
topic with the same Correlation Data and Content Type ``application/json``, and never answer on a
Response Topic outside the caller's own reply space: the answer then goes where it would have gone
without one, and a subscriber on the foreign topic sees nothing (shown with a later marker message
on the same topic, never with a sleep).

Real broker, real mutual TLS, real paho-mqtt MQTT 5 clients.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import certs
from jitp.trust import Role
from tests.certflow import init_issuer, make_csr, new_key
from tests.helpers import BrokerThread, Identity, Pki, client_context, wait_until

WAIT = 10.0
ADMIN = "$jitp/admin"
REPLIES = f"{ADMIN}/replies"
CERTS = "$jitp/certificates"


# -- a paho-mqtt MQTT 5 client ----------------------------------------------------------------
@dataclass
class V5:
    """A connected paho-mqtt client speaking MQTT 5, on its own network thread."""

    name: str
    client: mqtt.Client
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        return [m for m in list(self.messages) if m.topic == topic]

    def under(self, prefix: str) -> list[mqtt.MQTTMessage]:
        return [m for m in list(self.messages) if m.topic.startswith(prefix)]

    def wait_on(self, topic: str, count: int = 1) -> list[mqtt.MQTTMessage]:
        assert wait_until(lambda: len(self.on(topic)) >= count, WAIT), (
            f"{self.name}: fewer than {count} message(s) on {topic}; got {[m.topic for m in self.messages]}"
        )
        return self.on(topic)

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        codes: list[int] = []

        def on_subscribe(c: Any, u: Any, mid: Any, reason_codes: Any, props: Any) -> None:
            codes.extend(int(rc.value) for rc in reason_codes)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic_filter, qos=1)
        assert done.wait(WAIT), f"{self.name}: no SUBACK"
        assert codes == [1], f"{self.name}: SUBSCRIBE {topic_filter} got {codes}"

    def publish(
        self,
        topic: str,
        payload: bytes | dict[str, Any],
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """A QoS 1 PUBLISH, acknowledged by the broker before this returns."""
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, properties=props)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"{self.name}: no PUBACK for {topic}"

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def connect5(broker: BrokerThread, pki: Pki, ident: Identity) -> V5:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=ident.name, protocol=mqtt.MQTTv5, reconnect_on_failure=False
    )
    client.tls_set_context(client_context(pki, ident))
    conn = V5(ident.name, client)
    connacked = threading.Event()
    codes: list[int] = []

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        codes.append(int(rc.value))
        connacked.set()

    client.on_connect = on_connect
    client.on_message = lambda c, u, m: conn.messages.append(m)
    client.connect("127.0.0.1", broker.port, keepalive=30, clean_start=True)
    client.loop_start()
    if not connacked.wait(WAIT) or codes != [0]:
        conn.close()
        pytest.fail(f"{ident.name}: CONNACK {codes or 'missing'}")
    return conn


@pytest.fixture
def v5(broker: BrokerThread, pki: Pki) -> Iterator[Callable[[Identity], V5]]:
    """Connect MQTT 5 clients to the test's broker; each is closed when the test ends."""
    opened: list[V5] = []

    def open_(ident: Identity) -> V5:
        conn = connect5(broker, pki, ident)
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        conn.close()


def props_of(message: mqtt.MQTTMessage) -> tuple[bytes | None, str | None, int | None]:
    """(Correlation Data, Content Type, Payload Format Indicator) of a received message."""
    p = message.properties
    return (
        getattr(p, "CorrelationData", None),
        getattr(p, "ContentType", None),
        getattr(p, "PayloadFormatIndicator", None),
    )


# -- the admin API -----------------------------------------------------------------------------
def operator(broker: BrokerThread, pki: Pki, *names: str) -> list[Identity]:
    """Operator identities under a CA registered with ``--role operator``."""
    ca = certs.make_ca("requests ops CA", key=certs.generate_key(), issuer=pki.root)
    broker.register_ca(ca.cert, role=Role.OPERATOR)
    return [pki.identity(name, issuer=ca) for name in names]


def admin_entries(broker: BrokerThread, actor: str) -> list[dict[str, str]]:
    return [
        dict(e.draft.details) | {"reason": e.draft.reason or ""}
        for e in broker.audit()
        if e.draft.action == "admin-command" and e.draft.actor == actor
    ]


def test_admin_request_is_answered_on_its_response_topic_with_its_correlation_data(
    broker: BrokerThread, pki: Pki, v5: Callable[[Identity], V5]
) -> None:
    dev = v5(pki.device("rr-admin-dev"))  # a device in the registry, for devices.show
    [alice] = operator(broker, pki, "rr-alice")
    op = v5(alice)
    op.subscribe(f"{REPLIES}/{alice.name}/#")
    here = f"{REPLIES}/{alice.name}/v5/answers"
    # No correlation_id and no reply_to in the body: only the MQTT 5 properties say where and which.
    # Binary Correlation Data (not UTF-8) comes back byte for byte.
    op.publish(
        f"{ADMIN}/devices.show",
        {"args": {"device_id": dev.name}},
        response_topic=here,
        correlation=b"\x00\xffq1",
    )
    op.publish(
        f"{ADMIN}/devices.show", {"args": {"device_id": "rr-nobody"}}, response_topic=here, correlation=b"q2"
    )
    answers = op.wait_on(here, 2)
    by_correlation = {props_of(m)[0]: json.loads(m.payload) for m in answers}
    assert set(by_correlation) == {b"\x00\xffq1", b"q2"}, answers
    found, missing = by_correlation[b"\x00\xffq1"], by_correlation[b"q2"]
    assert found["ok"] is True and found["result"]["device_id"] == dev.name, found
    assert missing["ok"] is False and missing["error"]["reason"] == "not_found", missing
    for m in answers:
        _, content_type, pfi = props_of(m)
        assert (content_type, pfi, m.qos) == ("application/json", 1, 1)
    # Each request got exactly one answer: a marker request after them is the third message.
    op.publish(f"{ADMIN}/devices.list", {}, response_topic=here, correlation=b"marker")
    op.wait_on(here, 3)
    assert len(op.under(f"{REPLIES}/")) == 3, [m.topic for m in op.messages]
    assert props_of(op.on(here)[2])[0] == b"marker"
    assert wait_until(lambda: len(admin_entries(broker, f"operator:{alice.name}")) == 3, WAIT)
    entries = admin_entries(broker, f"operator:{alice.name}")
    assert sorted((e["command"], e["allowed"], e["reason"]) for e in entries) == [
        ("devices.list", "true", ""),
        ("devices.show", "true", ""),
        ("devices.show", "true", "not_found"),
    ]


def test_admin_request_with_an_unreadable_body_is_answered_on_its_response_topic(
    broker: BrokerThread, pki: Pki, v5: Callable[[Identity], V5]
) -> None:
    """The body cannot say where to answer, but the Response Topic can: the error goes there."""
    [alice] = operator(broker, pki, "rr-alice-bad")
    op = v5(alice)
    op.subscribe(f"{REPLIES}/{alice.name}/#")
    here = f"{REPLIES}/{alice.name}/v5/bad"
    op.publish(f"{ADMIN}/devices.list", b"{not json", response_topic=here, correlation=b"bad-1")
    [answer] = op.wait_on(here)
    doc = json.loads(answer.payload)
    assert doc["ok"] is False and doc["error"]["reason"] == "invalid_request", doc
    assert props_of(answer) == (b"bad-1", "application/json", 1)
    assert op.on(f"{REPLIES}/{alice.name}/error") == []
    assert wait_until(lambda: admin_entries(broker, f"operator:{alice.name}"), WAIT)
    [entry] = admin_entries(broker, f"operator:{alice.name}")
    assert (entry["command"], entry["allowed"], entry["reason"]) == (
        "devices.list",
        "false",
        "invalid_request",
    )


@pytest.mark.parametrize("foreign", ["another-principal", "device-topic"])
def test_admin_response_topic_outside_the_callers_reply_space_is_not_used(
    broker: BrokerThread, pki: Pki, v5: Callable[[Identity], V5], foreign: str
) -> None:
    alice, bob = operator(broker, pki, f"rr-alice-{foreign}", f"rr-bob-{foreign}")
    op = v5(alice)
    op.subscribe(f"{REPLIES}/{alice.name}/#")
    victim_device = pki.device(f"rr-victim-{foreign}")
    if foreign == "another-principal":
        victim = v5(bob)
        target = f"{REPLIES}/{bob.name}/stolen"
        victim.subscribe(f"{REPLIES}/{bob.name}/#")
    else:
        victim = v5(victim_device)
        target = f"devices/{victim_device.name}/cmd/answers"
        victim.subscribe(f"devices/{victim_device.name}/cmd/#")

    op.publish(
        f"{ADMIN}/devices.list", {"correlation_id": "c1"}, response_topic=target, correlation=b"c1-data"
    )
    # Answered where it would have been without a Response Topic: .../<correlation_id>, with the
    # caller's Correlation Data still echoed.
    [answer] = op.wait_on(f"{REPLIES}/{alice.name}/c1")
    doc = json.loads(answer.payload)
    assert doc["ok"] is True and doc["correlation_id"] == "c1", doc
    assert props_of(answer) == (b"c1-data", "application/json", 1)

    # A marker on the foreign topic, published after the answer was routed: the victim's session
    # delivers in order, so had the answer gone there too, it would arrive before the marker.
    if foreign == "another-principal":
        victim.publish(f"{ADMIN}/devices.list", {}, response_topic=target, correlation=b"marker")
    else:
        victim.publish(target, b"marker")
    [seen] = victim.wait_on(target)
    if foreign == "another-principal":  # bob's own answer, with bob's Correlation Data
        assert props_of(seen)[0] == b"marker" and json.loads(seen.payload)["ok"] is True, seen.payload
    else:
        assert seen.payload == b"marker"
    assert len(victim.messages) == 1, [(m.topic, m.payload) for m in victim.messages]
    assert len(op.messages) == 1, [m.topic for m in op.messages]
    # The request itself ran and is audited as allowed (the foreign topic is only ignored).
    assert wait_until(lambda: admin_entries(broker, f"operator:{alice.name}"), WAIT)
    [entry] = admin_entries(broker, f"operator:{alice.name}")
    assert (entry["command"], entry["allowed"], entry["reason"]) == ("devices.list", "true", "")


# -- certificate enrollment --------------------------------------------------------------------
def cert_entries(broker: BrokerThread, action: str) -> list[Any]:
    return [e for e in broker.audit() if e.draft.action == action]


def test_certificate_request_is_answered_on_its_response_topic_with_its_correlation_data(
    broker: BrokerThread, pki: Pki, v5: Callable[[Identity], V5]
) -> None:
    signer = init_issuer(broker)
    device = pki.device("rr-cert-0001")
    dev = v5(device)
    own = f"{CERTS}/{device.name}/"
    dev.subscribe(own + "#")
    here = own + "answers/7"
    key = new_key()
    dev.publish(
        own + "create-from-csr",
        {"request_id": "r1", "csr": make_csr(key)},
        response_topic=here,
        correlation=b"\x01corr-r1",
    )
    [answer] = dev.wait_on(here)
    assert props_of(answer) == (b"\x01corr-r1", "application/json", 1)
    doc = json.loads(answer.payload)
    assert doc["request_id"] == "r1" and "reason" not in doc, doc
    cert = x509.load_pem_x509_certificate(doc["certificate_pem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device.name
    assert cert.public_key() == key.public_key()
    assert cert.issuer == signer.cert.subject

    # A rejection also goes to the Response Topic, with its own Correlation Data.
    dev.publish(
        own + "create-from-csr", {"request_id": "r2", "csr": "junk"}, response_topic=here, correlation=b"r2"
    )
    rejected = dev.wait_on(here, 2)[1]
    assert props_of(rejected)[0] == b"r2"
    assert json.loads(rejected.payload)["request_id"] == "r2" and json.loads(rejected.payload)["reason"]

    # Without a Response Topic the answer goes to the default topic: the marker. Nothing of the
    # two requests before it arrived on .../accepted or .../rejected.
    dev.publish(own + "create-from-csr", {"request_id": "r3", "csr": "junk"}, correlation=b"r3")
    [marker] = dev.wait_on(own + "rejected")
    assert json.loads(marker.payload)["request_id"] == "r3" and props_of(marker)[0] == b"r3"
    assert dev.on(own + "accepted") == []
    assert [m.topic for m in dev.messages] == [here, here, own + "rejected"]
    assert wait_until(lambda: len(cert_entries(broker, "certificate-rejected")) == 2, WAIT)
    assert len(cert_entries(broker, "certificate-requested")) == 1


# A wildcard Response Topic is a Protocol Error, refused at the PUBLISH (0x82): test_mqtt5_attacks_e2e.
@pytest.mark.parametrize("foreign", ["other-device", "normal-topic"])
def test_certificate_response_topic_outside_the_devices_space_is_not_used(
    broker: BrokerThread, pki: Pki, v5: Callable[[Identity], V5], foreign: str
) -> None:
    init_issuer(broker)
    device, other = pki.device(f"rr-cert-a-{foreign}"), pki.device(f"rr-cert-b-{foreign}")
    dev = v5(device)
    own = f"{CERTS}/{device.name}/"
    dev.subscribe(own + "#")
    if foreign == "other-device":
        watcher = v5(other)
        target = f"{CERTS}/{other.name}/accepted"
        watcher.subscribe(f"{CERTS}/{other.name}/#")
    else:  # in the device's own namespace, but not its certificate space
        watcher = v5(pki.service(f"rr-svc-{foreign}"))
        target = f"devices/{device.name}/cmd/certificate"
        watcher.subscribe(f"devices/{device.name}/cmd/#")

    dev.publish(
        own + "create-from-csr",
        {"request_id": "r1", "csr": make_csr(new_key())},
        response_topic=target,
        correlation=b"corr-1",
    )
    # The default topic gets the answer, with the Correlation Data echoed.
    [answer] = dev.wait_on(own + "accepted")
    assert props_of(answer) == (b"corr-1", "application/json", 1)
    assert json.loads(answer.payload)["request_id"] == "r1"

    # The marker: a later message the watcher's session must deliver after anything sent to target.
    if foreign == "other-device":
        watcher.publish(f"{CERTS}/{other.name}/create-from-csr", {"request_id": "marker", "csr": "junk"})
        [seen] = watcher.wait_on(f"{CERTS}/{other.name}/rejected")
        assert json.loads(seen.payload)["request_id"] == "marker"
    else:
        dev.publish(target, b"marker")
        [seen] = watcher.wait_on(target)
        assert seen.payload == b"marker"
    assert len(watcher.messages) == 1, [(m.topic, m.payload) for m in watcher.messages]
    assert [m.topic for m in dev.under(own)] == [own + "accepted"]
    assert wait_until(lambda: cert_entries(broker, "certificate-requested"), WAIT)
