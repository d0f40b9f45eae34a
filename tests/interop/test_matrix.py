"""Issue 15: the interop matrix with real third-party clients over real mutual TLS.

For each client (paho-mqtt bare and with MQTT 5 properties, aiomqtt, gmqtt, Debian's mosquitto
clients, MQTT.js) at each protocol level (3.1.1 and 5):
- first join: a device's first connect provisions it and is accepted;
- it publishes and subscribes in its own namespace (``devices/<id>/cmd/#``) and gets its message back;
- it reads its retained configuration on ``$jitp/devices/<id>/config``;
- a persistent session (3.1.1 clean session 0; 5 Session Expiry Interval) gets the QoS 1 message
  published while it was away;
- a revoked device sees the refusal (3.1.1: return code 5; 5: 0x8A Banned, with a reason string);
and across versions: a 5 publisher reaches a 3.1.1 subscriber and the reverse (queued QoS 1 and
retained messages).

MQTT 5 rows are expected to fail until the broker speaks MQTT 5 (``MQTT5_BROKER``); strict, so that
the broker's MQTT 5 turns them into failures until the flag is set.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from jitp.app.operations import OPERATIONS, Context, LifecycleArgs
from jitp.domain.events import config_topic
from jitp.trust import Role
from tests.helpers import BrokerThread, Identity, Pki, wait_until
from tests.interop.clients import (
    CLIENTS,
    USER_PROPERTY,
    Client,
    Expect,
    Job,
    Missing,
    Outcome,
    Publish,
    Step,
    Subscribe,
)

MQTT5_BROKER = False  # set when the broker speaks MQTT 5 (issue 15); the MQTT 5 rows then must pass
DEADLINE = 10.0
SESSION_EXPIRY = 300  # seconds, for the persistent sessions
REFUSED_REVOKED = {4: 5, 5: 0x8A}  # CONNACK 3.1.1: not authorised; 5: Banned
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
CROSS = [
    pytest.param(name, pub, sub, id=f"{name}-pub-v{pub}-sub-v{sub}", marks=_v5_pending(pub, sub))
    for name, make in CLIENTS.items()
    if make().versions == (4, 5)
    for pub, sub in ((5, 4), (4, 5))
]


class Runner:
    """Runs jobs with one client against the module's broker; a missing program skips or fails."""

    def __init__(self, broker: BrokerThread, pki: Pki, client: Client, version: int) -> None:
        self.broker, self.pki, self.client, self.version = broker, pki, client, version

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
            if (
                self.client.name == "mqttjs"
                and "node is not installed" in str(exc)
                and not os.environ.get("CI")
            ):
                pytest.skip(str(exc))
            pytest.fail(str(exc))

    def accepted(self, ident: Identity, *steps: Step, **kw: Any) -> Outcome:
        out = self.run(ident, *steps, **kw)
        assert out.accepted, f"{self.client.name}: {out}"
        assert out.error is None, f"{self.client.name}: {out}"
        if out.protocol is not None:
            assert out.protocol == (kw.get("version") or self.version), f"spoke another version: {out}"
        return out


def tag(name: str, version: int, what: str) -> str:
    return f"io-{name}-{version}-{what}"


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
def test_first_join_publish_and_subscribe_in_own_namespace(
    broker: BrokerThread, pki: Pki, name: str, version: int
) -> None:
    r = Runner(broker, pki, CLIENTS[name](), version)
    device_id = tag(name, version, "join")
    assert device_record(broker, device_id) is None
    echo = f"devices/{device_id}/cmd/echo"
    payload = f"hello from {name} v{version}".encode()
    out = r.accepted(pki.device(device_id), Subscribe(echo), Publish(echo, payload), Expect(1))
    check_granted(out, [1])
    assert [(m.topic, m.payload, m.retain) for m in out.messages] == [(echo, payload, False)]
    if name == "paho-props":
        # MQTT 5 PUBLISH properties are passed through (issue 15).
        assert USER_PROPERTY in out.messages[0].user_properties, out
    record = device_record(broker, device_id)
    assert record is not None and str(record.status) == "active", record
    assert "provisioned" in [e.type for e in broker.events(device_id)]


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_retained_config_on_first_join(broker: BrokerThread, pki: Pki, name: str, version: int) -> None:
    r = Runner(broker, pki, CLIENTS[name](), version)
    device_id = tag(name, version, "config")
    topic = config_topic(device_id)
    out = r.accepted(pki.device(device_id), Subscribe(topic), Expect(1))
    check_granted(out, [1])
    [message] = out.messages
    assert (message.topic, message.retain) == (topic, True)
    assert json.loads(message.payload)["device_id"] == device_id


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_subscribing_outside_own_namespace_is_refused_in_the_suback(
    broker: BrokerThread, pki: Pki, name: str, version: int
) -> None:
    r = Runner(broker, pki, CLIENTS[name](), version)
    device_id = tag(name, version, "acl")
    neighbour = tag(name, version, "acl-neighbour")
    own, other = f"devices/{device_id}/cmd/#", f"devices/{neighbour}/cmd/#"
    out = r.accepted(pki.device(device_id), Subscribe(own), Subscribe(other))
    assert len(out.granted) == 2 and out.granted[0] == 1, out
    assert out.granted[1] in SUBSCRIBE_DENIED[version], out


def persistent_delivery(r: Runner, name: str, pub: int, sub: int, what: str) -> None:
    """A subscriber (a service) at ``sub`` with a persistent session leaves; the device at ``pub``
    publishes a QoS 1 message and a retained one; the subscriber comes back and gets the first, and a
    new subscriber at ``sub`` gets the retained one."""
    broker, pki = r.broker, r.pki
    device_id = tag(name, pub, f"{what}-dev")
    telemetry, state = f"devices/{device_id}/telemetry", f"devices/{device_id}/state"
    svc = pki.service(tag(name, sub, f"{what}-svc"))
    persistent: dict[str, Any] = {"clean": False, "session_expiry": SESSION_EXPIRY if sub == 5 else None}

    first = r.accepted(svc, Subscribe(telemetry), version=sub, **persistent)
    check_granted(first, [1])
    assert wait_until(lambda: left(broker, svc.name), DEADLINE), "the subscriber's connection stayed"

    away = f"published at v{pub} while the v{sub} subscriber was away".encode()
    device = pki.device(device_id)
    r.accepted(device, Publish(telemetry, away, qos=1), version=pub)
    r.accepted(device, Publish(state, b"on", qos=1, retain=True), version=pub)

    back = r.accepted(svc, Subscribe(telemetry), Expect(1), version=sub, **persistent)
    assert back.session_present in (True, None), back
    assert [(m.topic, m.payload, m.retain) for m in back.messages] == [(telemetry, away, False)]

    late = r.accepted(pki.service(tag(name, sub, f"{what}-late")), Subscribe(state), Expect(1), version=sub)
    assert [(m.topic, m.payload, m.retain) for m in late.messages] == [(state, b"on", True)]


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_persistent_session_gets_what_was_published_while_away(
    broker: BrokerThread, pki: Pki, name: str, version: int
) -> None:
    persistent_delivery(Runner(broker, pki, CLIENTS[name](), version), name, version, version, "persist")


@pytest.mark.parametrize(
    "name", [pytest.param("paho", marks=_v5_pending(5)), pytest.param("mqttjs", marks=_v5_pending(5))]
)
def test_session_expiry_ends_a_persistent_session(broker: BrokerThread, pki: Pki, name: str) -> None:
    """MQTT 5: a session kept for 1 s after the client leaves is gone after it: a message published
    then is not kept, and the next connect is told there is no session."""
    r = Runner(broker, pki, CLIENTS[name](), 5)
    svc = pki.service(tag(name, 5, "expiry-svc"))
    telemetry = f"devices/{tag(name, 5, 'expiry-dev')}/telemetry"
    r.accepted(svc, Subscribe(telemetry), clean=False, session_expiry=1)
    assert wait_until(lambda: svc.name not in broker.server.broker.sessions, DEADLINE), (
        "the session outlived its expiry interval"
    )
    r.accepted(pki.device(tag(name, 5, "expiry-dev")), Publish(telemetry, b"nobody is there"))
    back = r.accepted(svc, clean=False, session_expiry=SESSION_EXPIRY)
    assert back.session_present is False, back
    assert back.messages == [], back


@pytest.mark.parametrize(("name", "pub", "sub"), CROSS)
def test_cross_version_delivery(broker: BrokerThread, pki: Pki, name: str, pub: int, sub: int) -> None:
    persistent_delivery(Runner(broker, pki, CLIENTS[name](), pub), name, pub, sub, f"cross{pub}{sub}")


@pytest.mark.parametrize(("name", "version"), MATRIX)
def test_revoked_device_is_refused(broker: BrokerThread, pki: Pki, name: str, version: int) -> None:
    r = Runner(broker, pki, CLIENTS[name](), version)
    device_id = tag(name, version, "revoked")
    device = pki.device(device_id)
    r.accepted(device)
    revoke(broker, device_id)
    assert str(device_record(broker, device_id).status) == "revoked"
    out = r.run(device)
    assert out.connack == REFUSED_REVOKED[version], out
    assert out.reason, f"{name} showed no refusal: {out}"
    if version == 5 and name in ("paho", "paho-props", "mqttjs"):
        # These show the CONNACK's Reason String: jitp's refusal reason, not just "Banned".
        assert "device_blocked" in out.reason, out
    refused = [e for e in broker.audit() if e.draft.action == "refused" and e.draft.device_id == device_id]
    assert [e.draft.reason for e in refused] == ["device_blocked"], refused
