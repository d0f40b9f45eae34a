"""Issue 15: the interop matrix with real third-party clients over real mutual TLS.

For each client (paho-mqtt bare and with MQTT 5 properties, aiomqtt, gmqtt, Debian's mosquitto
clients, MQTT.js) at each protocol level (3.1.1 and 5):
- first join: a device's first connect provisions it and is accepted;
- it publishes and subscribes in its own namespace (``devices/<id>/cmd/#``) and gets its message back;
  a subscription outside that namespace is refused in the SUBACK;
- it reads its retained configuration on ``$jitp/devices/<id>/config``;
- a persistent session (3.1.1 clean session 0; 5 Session Expiry Interval) gets the QoS 1 message
  published while it was away;
- a revoked device sees the refusal (3.1.1: return code 5; 5: 0x8A Banned, with a reason string),
  and so does a client id other than the device id (5: 0x85);
and across versions: a 5 publisher reaches a 3.1.1 subscriber and the reverse (queued QoS 1,
retained, and live QoS 0 and 1 messages).

MQTT 5 rows are expected to fail until the broker speaks MQTT 5 (``MQTT5_BROKER``); strict, so that
the broker's MQTT 5 turns them into failures until the flag is set.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from jitp.app.operations import OPERATIONS, Context, LifecycleArgs
from jitp.domain.events import config_topic
from jitp.trust import Role
from tests.helpers import BrokerThread, Identity, Pki, connect, wait_until
from tests.interop.clients import (
    CLIENTS,
    USER_PROPERTY,
    Expect,
    Job,
    Missing,
    Outcome,
    Publish,
    Ready,
    Step,
    Subscribe,
)

MQTT5_BROKER = True  # set when the broker speaks MQTT 5 (issue 15); the MQTT 5 rows then must pass
DEADLINE = 10.0
SESSION_EXPIRY = 300  # seconds, for the persistent sessions
REFUSED_REVOKED = {4: 5, 5: 0x8A}  # CONNACK 3.1.1: not authorised; 5: Banned
REFUSED_CLIENT_ID = {4: 5, 5: 0x85}  # CONNACK 3.1.1: not authorised; 5: Client Identifier not valid
# SUBACK for a filter outside the namespace; 3.1.1: failure; 5: Not authorized (0x80 is allowed too)
SUBSCRIBE_DENIED = {4: {0x80}, 5: {0x80, 0x87}}


def _v5_pending(*versions: int) -> list[pytest.MarkDecorator]:
    if 5 in versions and not MQTT5_BROKER:
        return [pytest.mark.xfail(strict=True, reason="MQTT 5 broker not merged yet")]
    return []


MATRIX = [
    pytest.param(name, version, id=f"{name}-v{version}", marks=_v5_pending(version))
    for name, make in CLIENTS.items()
    for version in make().versions
]
CROSS = [  # (client, publisher's level, subscriber's level)
    pytest.param(name, pub, sub, id=f"{name}-pub-v{pub}-sub-v{sub}", marks=_v5_pending(pub, sub))
    for name, make in CLIENTS.items()
    if make().versions == (4, 5)
    for pub, sub in ((5, 4), (4, 5))
]


class Runner:
    """Runs jobs with one client (by name) against the test's broker; a missing program fails the
    test, or skips it where node is missing and CI is unset."""

    def __init__(self, broker: BrokerThread, pki: Pki, name: str, version: int) -> None:
        self.broker, self.pki, self.name, self.version = broker, pki, name, version
        self.client = CLIENTS[name]()

    def id(self, what: str, version: int | None = None) -> str:
        """A device id or service name of this test's own."""
        return f"io-{self.name}-{version or self.version}-{what}"

    def run(self, ident: Identity, *steps: Step, version: int | None = None, **kw: Any) -> Outcome:
        job = Job(
            port=self.broker.port,
            ca=self.pki.layout.root_cert,
            identity=ident,
            version=version or self.version,
            steps=steps,
            **kw,
        )
        try:
            return self.client.run(job)
        except Missing as exc:
            if self.name == "mqttjs" and "node is not installed" in str(exc) and not os.environ.get("CI"):
                pytest.skip(str(exc))
            pytest.fail(str(exc))

    def accepted(self, ident: Identity, *steps: Step, **kw: Any) -> Outcome:
        out = self.run(ident, *steps, **kw)
        assert out.accepted, f"{self.name}: {out}"
        assert out.error is None, f"{self.name}: {out}"
        if out.protocol is not None:
            assert out.protocol == (kw.get("version") or self.version), f"spoke another version: {out}"
        return out


@pytest.fixture
def r(broker: BrokerThread, pki: Pki, name: str, version: int) -> Runner:
    """The client ``name`` at protocol level ``version`` (the test's parameters)."""
    return Runner(broker, pki, name, version)


def device_record(broker: BrokerThread, device_id: str) -> Any:
    return broker.call(broker.registry().get_device(device_id))


def revoke(broker: BrokerThread, device_id: str) -> None:
    """The operator's ``devices.revoke``, run on the broker node as the admin API runs it."""
    context = Context(
        broker.server.service,
        actor="operator:interop-test",
        role=Role.OPERATOR,
        templates_dir=broker.config.templates_dir,
        node=True,
    )

    async def go() -> None:
        await OPERATIONS["devices.revoke"].run(context, LifecycleArgs(device_id, reason="stolen"))

    broker.call(go())


def left(broker: BrokerThread, client_id: str) -> bool:
    return broker.server.broker.live_session(client_id) is None


def check_granted(out: Outcome, expected: list[int]) -> None:
    # mosquitto_rr prints only that the SUBACK came (-1), not what it granted.
    assert out.granted in (expected, [-1] * len(expected)), out


# -- the matrix -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_first_join_publish_and_subscribe_in_own_namespace(r: Runner) -> None:
    device_id = r.id("join")
    assert device_record(r.broker, device_id) is None
    echo = f"devices/{device_id}/cmd/echo"
    payload = f"hello from {r.name} v{r.version}".encode()
    out = r.accepted(r.pki.device(device_id), Subscribe(echo), Publish(echo, payload), Expect(1))
    check_granted(out, [1])
    assert [(m.topic, m.payload, m.retain) for m in out.messages] == [(echo, payload, False)]
    if r.name == "paho-props":
        # MQTT 5 PUBLISH properties are passed through (issue 15).
        assert USER_PROPERTY in out.messages[0].user_properties, out
    record = device_record(r.broker, device_id)
    assert record is not None and str(record.status) == "active", record
    assert "provisioned" in [e.type for e in r.broker.events(device_id)]


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_retained_config_on_first_join(r: Runner) -> None:
    device_id = r.id("config")
    topic = config_topic(device_id)
    out = r.accepted(r.pki.device(device_id), Subscribe(topic), Expect(1))
    check_granted(out, [1])
    [message] = out.messages
    assert (message.topic, message.retain) == (topic, True)
    assert json.loads(message.payload)["device_id"] == device_id


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_subscribing_outside_own_namespace_is_refused_in_the_suback(r: Runner) -> None:
    device_id = r.id("acl")
    own, other = f"devices/{device_id}/cmd/#", f"devices/{r.id('acl-neighbour')}/cmd/#"
    out = r.accepted(r.pki.device(device_id), Subscribe(own), Subscribe(other))
    assert len(out.granted) == 2 and out.granted[0] == 1, out
    assert out.granted[1] in SUBSCRIBE_DENIED[r.version], out


def persistent_delivery(r: Runner, pub: int, sub: int, what: str) -> None:
    """A subscriber (a service) at ``sub`` with a persistent session leaves; the device at ``pub``
    publishes a QoS 1 message and a retained one; the subscriber comes back and gets the first, and a
    new subscriber at ``sub`` gets the retained one."""
    device = r.pki.device(r.id(f"{what}-dev", pub))
    telemetry, state = f"devices/{device.name}/telemetry", f"devices/{device.name}/state"
    svc = r.pki.service(r.id(f"{what}-svc", sub))
    persistent: dict[str, Any] = {"clean": False, "session_expiry": SESSION_EXPIRY if sub == 5 else None}

    first = r.accepted(svc, Subscribe(telemetry), version=sub, **persistent)
    check_granted(first, [1])
    assert wait_until(lambda: left(r.broker, svc.name), DEADLINE), "the subscriber's connection stayed"

    away = f"published at v{pub} while the v{sub} subscriber was away".encode()
    r.accepted(device, Publish(telemetry, away, qos=1), version=pub)
    r.accepted(device, Publish(state, b"on", qos=1, retain=True), version=pub)

    back = r.accepted(svc, Subscribe(telemetry), Expect(1), version=sub, **persistent)
    assert back.session_present in (True, None), back  # None: the client does not tell
    assert [(m.topic, m.payload, m.retain) for m in back.messages] == [(telemetry, away, False)]

    late = r.accepted(r.pki.service(r.id(f"{what}-late", sub)), Subscribe(state), Expect(1), version=sub)
    assert [(m.topic, m.payload, m.retain) for m in late.messages] == [(state, b"on", True)]


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_persistent_session_gets_what_was_published_while_away(r: Runner) -> None:
    persistent_delivery(r, r.version, r.version, "persist")


@pytest.mark.parametrize(("name", "version", "sub"), CROSS)
def test_cross_version_delivery(r: Runner, sub: int) -> None:
    """The client publishing at ``version`` reaches itself subscribed at ``sub``."""
    persistent_delivery(r, r.version, sub, f"cross{sub}")


def release(r: Runner, device: Identity, topic: str, count: int) -> None:
    """A listener waits for ``count`` messages on ``topic``: when the client under test could not
    publish them, paho at 3.1.1 does, so that the test fails at once rather than at the deadline."""
    conn = connect(r.broker.port, r.pki, device)
    try:
        for i in range(count):
            conn.client.publish(topic, f"release {i}", qos=1).wait_for_publish(DEADLINE)
    finally:
        conn.close()


@pytest.mark.parametrize(("name", "version", "sub"), CROSS)
def test_cross_version_live_delivery_at_qos_0_and_1(r: Runner, sub: int) -> None:
    """The client at ``version`` publishes at QoS 0 and at QoS 1 to itself, live at ``sub``."""
    device = r.pki.device(r.id(f"live{sub}-dev"))
    topic = f"devices/{device.name}/telemetry"
    svc = r.pki.service(r.id(f"live{sub}-svc", sub))
    ready = Ready()
    with ThreadPoolExecutor(1) as pool:
        listening = pool.submit(r.accepted, svc, Subscribe(topic), ready, Expect(2), version=sub)
        assert wait_until(lambda: ready.event.is_set() or listening.done(), DEADLINE), "no SUBACK"
        if not ready.event.is_set():
            listening.result()  # raises what went wrong
            pytest.fail("the subscriber ended before it was ready")
        try:
            r.accepted(device, Publish(topic, b"at qos 0", qos=0))
            r.accepted(device, Publish(topic, b"at qos 1", qos=1))
        except BaseException:
            release(r, device, topic, 2)
            raise
        got = listening.result(DEADLINE + 5)
    # Two connections of the publisher: the order in which the broker routes them is not asserted.
    assert sorted((m.payload, m.retain) for m in got.messages) == [(b"at qos 0", False), (b"at qos 1", False)]


@pytest.mark.parametrize(
    ("name", "version"), [pytest.param(n, 5, marks=_v5_pending(5)) for n in ("paho", "mqttjs")]
)
def test_session_expiry_ends_a_persistent_session(r: Runner) -> None:
    """MQTT 5: a session kept for 1 s after the client leaves is gone after it: a message published
    then is not kept, and the next connect is told there is no session."""
    svc, device = r.pki.service(r.id("expiry-svc")), r.pki.device(r.id("expiry-dev"))
    telemetry = f"devices/{device.name}/telemetry"
    r.accepted(svc, Subscribe(telemetry), clean=False, session_expiry=1)
    assert wait_until(lambda: svc.name not in r.broker.server.broker.sessions, DEADLINE), (
        "the session outlived its expiry interval"
    )
    r.accepted(device, Publish(telemetry, b"nobody is there"))
    back = r.accepted(svc, clean=False, session_expiry=SESSION_EXPIRY)
    assert back.session_present is False, back
    assert back.messages == [], back


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_revoked_device_is_refused(r: Runner) -> None:
    device = r.pki.device(r.id("revoked"))
    r.accepted(device)
    revoke(r.broker, device.name)
    assert str(device_record(r.broker, device.name).status) == "revoked"
    out = r.run(device)
    assert out.connack == REFUSED_REVOKED[r.version], out
    assert out.reason, f"{r.name} showed no refusal: {out}"
    if r.version == 5 and r.name in ("paho", "paho-props", "mqttjs"):
        # These show the CONNACK's Reason String: jitp's refusal reason, not just "Banned".
        assert "device_blocked" in out.reason, out
    audit = r.broker.audit()
    refused = [
        e.draft.reason for e in audit if e.draft.action == "refused" and e.draft.device_id == device.name
    ]
    assert refused == ["device_blocked"], refused


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_a_client_id_other_than_the_device_id_is_refused(r: Runner) -> None:
    device = r.pki.device(r.id("cid"))
    out = r.run(device, as_id=f"{device.name}-other")
    assert out.connack == REFUSED_CLIENT_ID[r.version], out
    assert out.reason, f"{r.name} showed no refusal: {out}"
    assert device_record(r.broker, device.name) is None, "provisioned on a refused connect"
    audit = r.broker.audit()
    assert "client_id_mismatch" in [e.draft.reason for e in audit if e.draft.action == "refused"], audit
