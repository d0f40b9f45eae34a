"""The MQTT-native admin API: ``$jitp/admin/<command>`` requests, role-based access, audited.

One broker for the whole module and one connected client per role (device, service, auditor,
operator, admin), reused by every case. Each role runs each command: an allowed command must
succeed (and change the registry as it says), a denied one must answer ``forbidden`` and change
nothing. Every request is audited as ``admin-command`` with the caller's role and the decision.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import certs
from broker_plugins import admin
from jitp.domain.audit import AuditDraft
from jitp.domain.records import Command, DeviceStatus
from jitp.trust import Role
from tests.helpers import BrokerThread, Conn, Pki, connect, test_config, wait_until, wait_until_async

ADMIN = "$jitp/admin"
REPLIES = f"{ADMIN}/replies"
SUBACK_FAILURE = 0x80
TIMEOUT = 5.0

ROLES = ("device", "service", "auditor", "operator", "admin")
READERS = frozenset({"service", "auditor", "operator", "admin"})
WRITERS = frozenset({"operator", "admin"})
LIFECYCLE = {
    "devices.revoke": Command.REVOKE,
    "devices.disable": Command.DISABLE,
    "devices.enable": Command.ENABLE,
    "devices.quarantine": Command.QUARANTINE,
    "devices.deprovision": Command.DEPROVISION,
    "devices.allow": Command.ALLOW,
}
ALLOWED: dict[str, frozenset[str]] = {
    "devices.list": READERS,
    "devices.show": READERS,
    **dict.fromkeys(LIFECYCLE, WRITERS),
    "devices.erase": WRITERS,
    "ca.list": frozenset({"auditor", "operator", "admin"}),
    "ca.register": WRITERS,
    "ca.disable": WRITERS,
    "ca.enable": WRITERS,
    "templates.reload": WRITERS,
    "audit.export": frozenset({"auditor", "admin"}),
    "keys.status": frozenset({"admin"}),  # key management: admin only, not even an operator
}
COMMANDS = tuple(ALLOWED)

# A lifecycle command's starting status (so the allowed case really changes something) and target.
START: dict[Command, Command | None] = {
    Command.REVOKE: None,
    Command.DISABLE: None,
    Command.ENABLE: Command.DISABLE,
    Command.QUARANTINE: None,
    Command.DEPROVISION: None,
    Command.ALLOW: Command.REVOKE,
}
TARGET = {
    Command.REVOKE: DeviceStatus.REVOKED,
    Command.DISABLE: DeviceStatus.DISABLED,
    Command.ENABLE: DeviceStatus.ACTIVE,
    Command.QUARANTINE: DeviceStatus.QUARANTINED,
    Command.DEPROVISION: DeviceStatus.DEPROVISIONED,
    Command.ALLOW: DeviceStatus.ACTIVE,
}

_victims = itertools.count(1)
_cas = itertools.count(1)


# -- fixtures --------------------------------------------------------------------------------
@dataclass
class Client:
    role: str
    cid: str
    conn: Conn

    @property
    def actor(self) -> str:
        return f"{self.role}:{self.cid}"


class Env:
    def __init__(self, broker: BrokerThread, pki: Pki) -> None:
        self.broker = broker
        self.pki = pki
        self.clients: dict[str, Client] = {}
        self.idents: dict[str, Any] = {}

    def add(self, role: str, ident: Any) -> None:
        self.idents[role] = ident
        self.clients[role] = self._connect(role)

    def _connect(self, role: str) -> Client:
        ident = self.idents[role]
        conn = connect(self.broker.port, self.pki, ident)
        assert conn.rc == 0, (role, conn.rc, conn.error)
        client = Client(role=role, cid=ident.name, conn=conn)
        if role != "device":
            assert conn.subscribe(f"{REPLIES}/{client.cid}/#") == [1], role
        return client

    def client(self, role: str) -> Client:
        """The role's connected client; reconnected if the broker dropped it (e.g. a denied publish)."""
        client = self.clients[role]
        if client.conn.disconnected.is_set():
            client.conn.close()
            self.clients[role] = client = self._connect(role)
        return client


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("admin-api")
    broker = BrokerThread(test_config(tmp, pki)).start()
    e = Env(broker, pki)
    try:
        broker.register_ca(pki.manufacturer.cert)
        broker.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        role_cas = {}
        for role, cn in ((Role.AUDITOR, "auditors CA"), (Role.OPERATOR, "ops CA"), (Role.ADMIN, "admins CA")):
            ca = certs.make_ca(cn, key=certs.generate_key(), issuer=pki.root)
            broker.register_ca(ca.cert, role=role)
            role_cas[str(role)] = ca
        e.add("device", pki.device("admin-api-dev"))
        e.add("service", pki.service("admin-api-svc"))
        e.add("auditor", pki.identity("audrey", issuer=role_cas["auditor"]))
        e.add("operator", pki.identity("alice", issuer=role_cas["operator"]))
        e.add("admin", pki.identity("adam", issuer=role_cas["admin"]))
        yield e
    finally:
        for c in e.clients.values():
            c.conn.close()
        broker.stop()


# -- helpers ---------------------------------------------------------------------------------
def replies(client: Client) -> list[tuple[str, int, dict[str, Any]]]:
    out = []
    for m in list(client.conn.messages):
        if m.topic.startswith(f"{REPLIES}/"):
            try:
                doc = json.loads(m.payload)
            except ValueError:
                doc = {"unparsable": m.payload}
            out.append((m.topic, m.qos, doc))
    return out


def find_reply(client: Client, correlation_id: str) -> tuple[str, int, dict[str, Any]] | None:
    for topic, qos, doc in replies(client):
        if isinstance(doc, dict) and doc.get("correlation_id") == correlation_id:
            return topic, qos, doc
    return None


def publish(client: Client, command: str, payload: bytes | str) -> None:
    info = client.conn.client.publish(f"{ADMIN}/{command}", payload, qos=1)
    try:
        info.wait_for_publish(TIMEOUT)
    except (RuntimeError, ValueError):
        assert client.role == "device", f"{client.actor}: the request could not be published"


def device_publish(client: Client, command: str, payload: str) -> None:
    """A device's request: the broker acknowledges it (PUBACK) and must do nothing else with it."""
    assert client.role == "device"
    info = client.conn.client.publish(f"{ADMIN}/{command}", payload, qos=1)
    info.wait_for_publish(TIMEOUT)
    # The PUBACK follows the broker's decision on the PUBLISH: dropped, or handed to the admin API.
    assert info.is_published(), f"{client.actor}: no PUBACK for a request to {command}"


def admin_requests_in_flight(env: Env) -> int:
    """How many admin requests the broker is handling: it runs each in a task named ``jitp-admin``."""

    async def count() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name() == "jitp-admin" and not t.done())

    return env.broker.call(count())


def settled(env: Env) -> None:
    """Wait until no admin request is being handled: whatever the broker did with a request it has
    acknowledged is then done (and visible in the registry and the audit)."""
    assert wait_until(lambda: admin_requests_in_flight(env) == 0), "admin requests still in flight"


def send(
    client: Client, command: str, args: dict[str, Any] | None = None, *, reply_to: str | None = None
) -> str:
    corr = uuid.uuid4().hex
    doc = {
        "correlation_id": corr,
        "reply_to": reply_to if reply_to is not None else f"{REPLIES}/{client.cid}/{corr}",
        "args": args or {},
    }
    publish(client, command, json.dumps(doc))
    return corr


def request_full(
    client: Client, command: str, args: dict[str, Any] | None = None, *, reply_to: str | None = None
) -> tuple[str, int, dict[str, Any]]:
    corr = send(client, command, args, reply_to=reply_to)
    assert wait_until(lambda: find_reply(client, corr) is not None), (
        f"{client.actor}: no response to {command}; got {replies(client)}"
    )
    found = find_reply(client, corr)
    assert found is not None
    return found


def request(client: Client, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish a request and wait for the response with its correlation id; checks topic and QoS."""
    topic, qos, doc = request_full(client, command, args)
    assert topic == f"{REPLIES}/{client.cid}/{doc['correlation_id']}", topic
    assert qos == 1, qos
    return doc


def admin_entries(env: Env, actor: str, command: str) -> list[Any]:
    return [
        e
        for e in env.broker.audit()
        if e.draft.action == "admin-command"
        and e.draft.actor == actor
        and e.draft.details.get("command") == command
    ]


def state(env: Env) -> dict[str, Any]:
    """What a command could change: devices, anchors, outbox events, templates, non-admin audit."""
    b = env.broker
    registry = b.registry()
    return {
        "devices": sorted((d.device_id, str(d.status), d.cert_fingerprint) for d in b.devices()),
        "anchors": sorted((a.ca_id, a.enabled, str(a.role), a.region) for a in b.call(registry.anchors())),
        "events": len(b.events()),
        "templates_version": b.call(registry.templates_version()),
        "audit": [
            (e.draft.action, e.draft.actor, e.draft.device_id)
            for e in b.audit()
            if e.draft.action != "admin-command"
        ],
    }


def status_of(env: Env, device_id: str) -> str | None:
    record = env.broker.call(env.broker.registry().get_device(device_id))
    return None if record is None else str(record.status)


def new_victim(env: Env, start: Command | None = None) -> str:
    """A freshly provisioned device (connected once), optionally moved to a starting status."""
    device_id = f"victim-{next(_victims)}"
    conn = connect(env.broker.port, env.pki, env.pki.device(device_id))
    conn.close()
    assert conn.rc == 0, (conn.rc, conn.error)
    assert wait_until(lambda: status_of(env, device_id) == "active")
    if start is not None:
        env.broker.call(env.broker.server.service.apply(start, device_id, actor="test"))
    return device_id


def new_ca() -> certs.Issuer:
    return certs.make_ca(f"admin-api CA {next(_cas)}", key=certs.generate_key())


def anchor(env: Env, ca_id: str) -> Any:
    for a in env.broker.call(env.broker.registry().anchors()):
        if a.ca_id == ca_id:
            return a
    return None


def pem(issuer: certs.Issuer) -> str:
    return issuer.cert.public_bytes(Encoding.PEM).decode()


def without_last_seen(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "last_seen"}


# -- per-command preparation and checks --------------------------------------------------------
@dataclass
class Case:
    args: dict[str, Any]
    check_allowed: Callable[[Any], None]


def prepare(env: Env, command: str) -> Case:
    """Arguments that make ``command`` succeed, and a check of its result and effect."""
    b = env.broker
    if command == "devices.list":
        device_id = new_victim(env)

        def check(result: Any) -> None:
            expected = [without_last_seen(r.to_json()) for r in b.devices()]
            assert isinstance(result, list)
            assert [without_last_seen(d) for d in result] == expected
            assert device_id in {d["device_id"] for d in result}

        return Case({}, check)
    if command == "devices.show":
        device_id = new_victim(env)

        def check(result: Any) -> None:
            record = b.call(b.registry().get_device(device_id))
            no_certificates = {"certificates": {"current": None, "pending": []}}  # none issued to it
            assert without_last_seen(result) == without_last_seen(record.to_json()) | no_certificates

        return Case({"device_id": device_id}, check)
    if command in LIFECYCLE:
        cmd = LIFECYCLE[command]
        device_id = new_victim(env, START[cmd])

        def check(result: Any) -> None:
            assert result == {"device_id": device_id, "status": str(TARGET[cmd]), "changed": True}
            assert status_of(env, device_id) == str(TARGET[cmd])

        return Case({"device_id": device_id, "reason": "admin api test"}, check)
    if command == "devices.erase":
        device_id = new_victim(env)

        def check(result: Any) -> None:
            assert result == {"device_id": device_id}
            assert status_of(env, device_id) is None

        return Case({"device_id": device_id}, check)
    if command == "ca.list":

        def check(result: Any) -> None:
            assert isinstance(result, list)
            anchors = b.call(b.registry().anchors())
            assert {a["ca_id"] for a in result} == {a.ca_id for a in anchors}
            by_id = {a.ca_id: a for a in anchors}
            for doc in result:
                a = by_id[doc["ca_id"]]
                assert (doc["role"], doc["enabled"], doc["region"]) == (str(a.role), a.enabled, a.region)
                assert {"subject", "template", "registered_at"} <= set(doc)

        return Case({}, check)
    if command == "ca.register":
        ca = new_ca()
        ca_id = certs.fingerprint(ca.cert)

        def check(result: Any) -> None:
            assert result == {"ca_id": ca_id}
            stored = anchor(env, ca_id)
            assert stored is not None
            assert (str(stored.role), stored.region, stored.enabled) == ("device", "eu-admin", True)

        return Case({"cert_pem": pem(ca), "role": "device", "region": "eu-admin"}, check)
    if command in ("ca.disable", "ca.enable"):
        ca = new_ca()
        ca_id = b.register_ca(ca.cert)
        enable = command == "ca.enable"
        if enable:
            draft = AuditDraft(at=datetime.now(UTC), action="ca-disabled", actor="test")
            b.call(b.registry().set_anchor_enabled(ca_id, False, audit=draft))

        def check(result: Any) -> None:
            assert anchor(env, ca_id).enabled is enable

        return Case({"ca_id": ca_id}, check)
    if command == "templates.reload":
        version = b.call(b.registry().templates_version())

        def check(result: Any) -> None:
            assert result == {"changed": 0}  # the templates on disk are those the broker holds
            assert b.call(b.registry().templates_version()) > version  # so the other nodes reload too

        return Case({}, check)
    if command == "audit.export":

        def check(result: Any) -> None:
            assert isinstance(result, list) and result
            for doc in result:
                assert {"seq", "at", "action", "actor", "details", "prev_hash", "hash"} <= set(doc)
            seqs = [doc["seq"] for doc in result]
            assert seqs == sorted(seqs)
            assert "admin-command" in {doc["action"] for doc in result}

        return Case({}, check)
    if command == "keys.status":

        def check(result: Any) -> None:
            status = b.call(b.registry().keyring_status())
            assert result == {"primary": status.primary, "wrapped": dict(status.wrapped), "pending": 0}
            assert result["wrapped"][status.primary] >= 2  # the registry keys, at least

        return Case({}, check)
    raise AssertionError(command)


# -- the matrix --------------------------------------------------------------------------------
def test_matrix_is_complete() -> None:
    assert set(LIFECYCLE) | {"devices.list", "devices.show", "devices.erase"} <= set(COMMANDS)
    assert len(COMMANDS) == 16


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("role", ROLES)
def test_role_command(env: Env, role: str, command: str) -> None:
    client = env.client(role)
    case = prepare(env, command)
    allowed = role in ALLOWED[command]
    audited_before = len(admin_entries(env, client.actor, command))
    before = state(env)

    if role == "device":
        # Devices cannot reach $jitp/admin/#: no response, nothing happens.
        device_publish(client, command, json.dumps({"correlation_id": "dev", "args": case.args}))
        settled(env)
        assert not [m.topic for m in client.conn.messages if m.topic.startswith(f"{ADMIN}/")]
        assert state(env) == before
        # If the broker audits the attempt at all, it is a denial.
        for e in admin_entries(env, client.actor, command):
            assert e.draft.details.get("allowed") == "false", e
        return

    doc = request(client, command, case.args)
    if allowed:
        assert doc.get("ok") is True, doc
        assert "error" not in doc or doc["error"] is None, doc
        case.check_allowed(doc["result"])
    else:
        assert doc.get("ok") is False, doc
        assert doc["error"]["reason"] == "forbidden", doc
        assert isinstance(doc["error"].get("message"), str), doc
        assert state(env) == before

    # Audited: one admin-command entry for this request, with the caller's role and the decision.
    assert wait_until(lambda: len(admin_entries(env, client.actor, command)) == audited_before + 1), (
        f"no admin-command audit entry for {client.actor} {command}"
    )
    entry = admin_entries(env, client.actor, command)[-1].draft
    assert entry.details.get("allowed") == ("true" if allowed else "false"), entry
    if not allowed:
        assert entry.reason == "forbidden", entry


# -- protocol details ---------------------------------------------------------------------------
def test_unknown_command_is_invalid_request(env: Env) -> None:
    client = env.client("admin")
    doc = request(client, "devices.teleport", {})
    assert doc["ok"] is False
    assert doc["error"]["reason"] == "invalid_request", doc
    assert wait_until(lambda: admin_entries(env, client.actor, "devices.teleport")), (
        "unknown command not audited"
    )


def test_bad_json_is_invalid_request(env: Env) -> None:
    client = env.client("operator")
    seen = len(replies(client))
    publish(client, "devices.list", b"{this is not json")
    assert wait_until(lambda: len(replies(client)) > seen), "no response to a malformed request"
    topic, _qos, doc = replies(client)[seen]
    assert topic.startswith(f"{REPLIES}/{client.cid}/"), topic
    assert doc["ok"] is False
    assert doc["error"]["reason"] == "invalid_request", doc


def test_unknown_device_is_not_found(env: Env) -> None:
    doc = request(env.client("operator"), "devices.show", {"device_id": "no-such-device"})
    assert doc["ok"] is False
    assert doc["error"]["reason"] == "not_found", doc


def test_missing_args_are_invalid_request(env: Env) -> None:
    doc = request(env.client("operator"), "devices.revoke", {})
    assert doc["ok"] is False
    assert doc["error"]["reason"] == "invalid_request", doc


def test_audit_export_since_until(env: Env) -> None:
    client = env.client("auditor")
    future = request(client, "audit.export", {"since": "2999-01-01T00:00:00Z"})
    assert future["ok"] is True and future["result"] == [], future
    past = request(client, "audit.export", {"until": "2000-01-01T00:00:00Z"})
    assert past["ok"] is True and past["result"] == [], past
    everything = request(client, "audit.export", {})
    assert len(everything["result"]) >= len(env.broker.audit()) - 1  # this request's own entry may follow


def test_reply_to_outside_own_prefix_goes_to_own_prefix(env: Env) -> None:
    """A client cannot direct a response to another client's reply topics."""
    operator, auditor = env.client("operator"), env.client("auditor")
    seen_by_auditor = len(replies(auditor))
    topic, qos, doc = request_full(operator, "devices.list", reply_to=f"{REPLIES}/{auditor.cid}/stolen")
    assert topic == f"{REPLIES}/{operator.cid}/{doc['correlation_id']}", topic
    assert qos == 1
    assert doc["ok"] is True
    # Witness: the auditor's own request, answered on the auditor's ordered queue. A reply of the
    # operator's request sent there would have been queued before this one: it is the only new reply.
    marker = request(auditor, "ca.list")
    assert [d for _, _, d in replies(auditor)[seen_by_auditor:]] == [marker]


def test_reply_to_own_prefix_is_honoured(env: Env) -> None:
    operator = env.client("operator")
    topic, _, doc = request_full(operator, "ca.list", reply_to=f"{REPLIES}/{operator.cid}/inbox/7")
    assert topic == f"{REPLIES}/{operator.cid}/inbox/7"
    assert doc["ok"] is True


@pytest.mark.parametrize("role", sorted(READERS))
def test_cannot_subscribe_to_other_clients_replies(env: Env, role: str) -> None:
    client = env.client(role)
    other = "alice" if client.cid != "alice" else "audrey"
    assert client.conn.subscribe(f"{REPLIES}/{other}/#") == [SUBACK_FAILURE]
    assert client.conn.subscribe(f"{REPLIES}/+/#") == [SUBACK_FAILURE]
    assert client.conn.subscribe(f"{ADMIN}/#") == [SUBACK_FAILURE]


def test_device_cannot_reach_admin_topics(env: Env) -> None:
    device = env.client("device")
    assert device.conn.subscribe(f"{ADMIN}/#") == [SUBACK_FAILURE]
    assert device.conn.subscribe(f"{REPLIES}/{device.cid}/#") == [SUBACK_FAILURE]
    victim = new_victim(env)
    before = state(env)
    device_publish(
        device, "devices.revoke", json.dumps({"correlation_id": "x", "args": {"device_id": victim}})
    )
    device_publish(env.client("device"), "devices.list", json.dumps({"correlation_id": "y", "args": {}}))
    settled(env)
    assert status_of(env, victim) == "active"
    assert state(env) == before
    assert not [m.topic for m in env.client("device").conn.messages if m.topic.startswith(f"{ADMIN}/")]


def test_a_request_in_flight_is_seen(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The witness :func:`settled` relies on: a request being handled counts as in flight."""
    gate = threading.Event()
    list_devices = env.broker.registry().list_devices

    async def held() -> list[Any]:
        assert await wait_until_async(gate.is_set, TIMEOUT), "the test did not release the request"
        return list(await list_devices())

    monkeypatch.setattr(env.broker.registry(), "list_devices", held)
    client = env.client("auditor")
    corr = send(client, "devices.list")
    try:
        assert wait_until(lambda: admin_requests_in_flight(env) == 1), "a held request is not seen"
    finally:
        gate.set()
    assert wait_until(lambda: find_reply(client, corr) is not None), "no reply once released"
    settled(env)


def test_only_an_admin_registers_a_ca_with_an_administrative_role(env: Env) -> None:
    """An operator that could register an admin CA could issue itself an admin certificate."""
    for role in ("auditor", "operator", "admin"):
        ca = new_ca()
        denied = request(env.client("operator"), "ca.register", {"cert_pem": pem(ca), "role": role})
        assert denied["ok"] is False and denied["error"]["reason"] == "forbidden", denied
        assert anchor(env, certs.fingerprint(ca.cert)) is None
    ca = new_ca()
    allowed = request(env.client("admin"), "ca.register", {"cert_pem": pem(ca), "role": "operator"})
    assert allowed["ok"] is True, allowed
    assert str(anchor(env, certs.fingerprint(ca.cert)).role) == "operator"


def test_roles_from_an_explicit_mapping_in_config(tmp_path: Path, pki: Pki) -> None:
    """`roles:` names single certificates: it makes a device-CA certificate an operator (never
    provisioned then), and demotes a certificate of the admin CA to auditor."""
    admins = certs.make_ca("mapped admins CA", key=certs.generate_key(), issuer=pki.root)
    promoted = pki.device("ops-console")  # from the manufacturer CA: a device, unless mapped
    demoted = pki.identity("dora", issuer=admins)
    fp = promoted.fingerprint.upper()
    colons = ":".join(fp[i : i + 2] for i in range(0, len(fp), 2))  # as `openssl x509 -fingerprint` prints it
    config = test_config(tmp_path, pki, roles={colons: "operator", demoted.fingerprint: "auditor"})
    broker = BrokerThread(config).start()
    env = Env(broker, pki)
    try:
        broker.register_ca(pki.manufacturer.cert)
        broker.register_ca(admins.cert, role=Role.ADMIN)
        env.add("operator", promoted)
        env.add("auditor", demoted)
        victim = new_victim(env)
        assert request(env.client("operator"), "devices.revoke", {"device_id": victim})["ok"] is True
        assert status_of(env, victim) == "revoked"
        assert "ops-console" not in {d.device_id for d in broker.devices()}  # a principal, not a device
        denied = request(env.client("auditor"), "devices.revoke", {"device_id": victim})
        assert denied["ok"] is False and denied["error"]["reason"] == "forbidden"
        assert request(env.client("auditor"), "audit.export")["ok"] is True
        actors = {e.draft.actor for e in broker.audit() if e.draft.action == "admin-command"}
        assert {"operator:ops-console", "auditor:dora"} <= actors
    finally:
        for c in env.clients.values():
            c.conn.close()
        broker.stop()


# -- request limits and the audit of every request (issue 12, findings 10 and 15) ---------------
def error_replies(client: Client) -> list[dict[str, Any]]:
    """Replies to requests that could not be read (no correlation id): on ``.../<cid>/error``."""
    return [doc for topic, _, doc in replies(client) if topic == f"{REPLIES}/{client.cid}/error"]


def unreadable_request(env: Env, role: str, command: str, payload: bytes) -> tuple[dict[str, Any], Any]:
    """Publish a request that cannot be read; its error reply and its one audit entry."""
    client = env.client(role)
    seen = len(error_replies(client))
    audited = len(admin_entries(env, client.actor, command))
    publish(client, command, payload)
    assert wait_until(lambda: len(error_replies(client)) > seen), f"no reply to {payload[:40]!r}..."
    assert wait_until(lambda: len(admin_entries(env, client.actor, command)) > audited), "not audited"
    assert len(error_replies(client)) == seen + 1
    assert len(admin_entries(env, client.actor, command)) == audited + 1, "audited more than once"
    return error_replies(client)[seen], admin_entries(env, client.actor, command)[-1].draft


def nested(depth: int, correlation_id: str = "") -> bytes:
    """A devices.show request whose device id is ``depth`` nested lists: ``depth + 2`` levels."""
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return json.dumps({"correlation_id": correlation_id, "args": {"device_id": value}}).encode()


def still_serving(env: Env, role: str) -> None:
    doc = request(env.client(role), "devices.list")
    assert doc["ok"] is True, doc


def test_deeply_nested_request_gets_an_error_and_an_audit_entry(env: Env) -> None:
    """A 30,000-deep ``[[[...`` (under the size limit) raised RecursionError inside the JSON parser:
    no reply, no audit entry. Now the depth is checked before parsing."""
    doc, entry = unreadable_request(env, "operator", "devices.list", b"[" * 30_000)
    assert doc["ok"] is False and doc["error"]["reason"] == "invalid_request", doc
    assert f"more than {admin.MAX_REQUEST_DEPTH} levels" in doc["error"]["message"], doc
    assert admin.MAX_REQUEST_BYTES > 30_000  # refused for its depth, not its size
    assert (entry.details.get("allowed"), entry.reason) == ("false", "invalid_request"), entry
    assert entry.details.get("limit") == "depth", entry
    still_serving(env, "operator")


def test_nesting_just_over_the_limit_is_refused_and_at_it_accepted(env: Env) -> None:
    over = nested(admin.MAX_REQUEST_DEPTH - 1)  # one level too deep
    doc, entry = unreadable_request(env, "admin", "devices.show", over)
    assert doc["error"]["reason"] == "invalid_request" and entry.details.get("limit") == "depth", doc
    client = env.client("admin")
    corr = uuid.uuid4().hex
    publish(client, "devices.show", nested(admin.MAX_REQUEST_DEPTH - 2, corr))  # at the limit
    assert wait_until(lambda: find_reply(client, corr) is not None), (
        "no reply to a request at the depth limit"
    )
    found = find_reply(client, corr)
    assert found is not None
    # parsed and run: the device id (a list, stringified) is simply unknown
    assert found[2]["error"]["reason"] == "not_found", found


def test_brackets_inside_strings_do_not_count(env: Env) -> None:
    doc = request(env.client("operator"), "devices.show", {"device_id": "[{" * 5_000 + '\\"]'})
    assert doc["ok"] is False and doc["error"]["reason"] == "not_found", doc


def test_oversized_request_gets_an_error_and_an_audit_entry(env: Env) -> None:
    payload = json.dumps({"correlation_id": "big", "args": {"device_id": "x" * 100_000}}).encode()
    doc, entry = unreadable_request(env, "operator", "devices.show", payload)
    assert admin.MAX_REQUEST_BYTES < len(payload) < 256 * 1024  # under the broker's packet limit
    assert doc["ok"] is False and doc["error"]["reason"] == "invalid_request", doc
    assert str(admin.MAX_REQUEST_BYTES) in doc["error"]["message"], doc
    assert (entry.details.get("allowed"), entry.reason, entry.details.get("limit")) == (
        "false",
        "invalid_request",
        "size",
    ), entry
    # just under the limit is read and run
    under = request(env.client("operator"), "devices.show", {"device_id": "y" * 60_000})
    assert under["ok"] is False and under["error"]["reason"] == "not_found", under
    still_serving(env, "operator")


def test_non_utf8_and_non_object_requests_are_answered_and_audited(env: Env) -> None:
    for payload in (b'{"args": "\xff\xfe"}', b"[1, 2, 3]", b"{this is not json"):
        doc, entry = unreadable_request(env, "auditor", "ca.list", payload)
        assert doc["error"]["reason"] == "invalid_request", (payload, doc)
        assert (entry.details.get("allowed"), entry.reason) == ("false", "invalid_request"), entry


def test_args_not_an_object_is_invalid_request(env: Env) -> None:
    client = env.client("operator")
    before = len(admin_entries(env, client.actor, "devices.show"))
    corr = uuid.uuid4().hex
    publish(client, "devices.show", json.dumps({"correlation_id": corr, "args": ["x"]}))
    assert wait_until(lambda: find_reply(client, corr) is not None)
    found = find_reply(client, corr)
    assert found is not None
    assert found[2]["error"] == {"reason": "invalid_request", "message": "args must be a JSON object"}
    assert len(admin_entries(env, client.actor, "devices.show")) == before + 1


def test_forbidden_escalation_is_audited_as_denied(env: Env) -> None:
    """An operator asking ``ca.register`` for an administrative role is answered ``forbidden``; the
    audit entry said ``allowed: true``, hiding exactly the denial an auditor looks for."""
    operator = env.client("operator")
    for role in ("auditor", "operator", "admin"):
        before = len(admin_entries(env, operator.actor, "ca.register"))
        ca = new_ca()
        doc = request(operator, "ca.register", {"cert_pem": pem(ca), "role": role})
        assert doc["ok"] is False and doc["error"]["reason"] == "forbidden", doc
        expected = before + 1
        assert wait_until(lambda n=expected: len(admin_entries(env, operator.actor, "ca.register")) == n)
        entry = admin_entries(env, operator.actor, "ca.register")[-1].draft
        assert (entry.details.get("allowed"), entry.reason) == ("false", "forbidden"), (role, entry)
        assert anchor(env, certs.fingerprint(ca.cert)) is None


def test_every_forbidden_answer_is_audited_as_denied(env: Env) -> None:
    """Whatever path answers ``forbidden`` (the role table, or a check inside a command), its one
    audit entry says ``allowed: false``."""
    b = env.broker
    count = len(b.audit())
    answered = 0
    for role in ROLES[1:]:
        for command in COMMANDS:
            if role not in ALLOWED[command]:
                assert request(env.client(role), command, {})["error"]["reason"] == "forbidden"
                answered += 1
    escalation = request(env.client("operator"), "ca.register", {"cert_pem": pem(new_ca()), "role": "admin"})
    assert escalation["error"]["reason"] == "forbidden"
    answered += 1
    denied = [
        e.draft
        for e in b.audit()[count:]
        if e.draft.action == "admin-command" and e.draft.reason == "forbidden"
    ]
    assert len(denied) == answered
    assert [d.details.get("allowed") for d in denied] == ["false"] * answered, denied


def test_a_failing_command_is_answered_and_audited_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception inside a command: an ``internal_error`` reply and one audit entry."""

    async def broken() -> list[Any]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(env.broker.registry(), "list_devices", broken)
    client = env.client("auditor")
    before = len(admin_entries(env, client.actor, "devices.list"))
    doc = request(client, "devices.list")
    assert doc["ok"] is False and doc["error"]["reason"] == "internal_error", doc
    assert "disk on fire" not in json.dumps(doc)  # details stay in the broker log
    assert wait_until(lambda: len(admin_entries(env, client.actor, "devices.list")) == before + 1)
    entry = admin_entries(env, client.actor, "devices.list")[-1].draft
    assert (entry.details.get("allowed"), entry.reason) == ("true", "internal_error"), entry
    monkeypatch.undo()
    still_serving(env, "auditor")
    assert len(admin_entries(env, client.actor, "devices.list")) == before + 2


def test_unknown_command_is_audited_once_as_denied(env: Env) -> None:
    client = env.client("admin")
    before = len(admin_entries(env, client.actor, "devices.levitate"))
    doc = request(client, "devices.levitate", {})
    assert doc["error"]["reason"] == "invalid_request", doc
    assert wait_until(lambda: len(admin_entries(env, client.actor, "devices.levitate")) == before + 1)
    entry = admin_entries(env, client.actor, "devices.levitate")[-1].draft
    assert (entry.details.get("allowed"), entry.reason) == ("false", "invalid_request"), entry


def test_json_depth_ignores_strings_and_escapes() -> None:
    assert admin.json_depth('{"a": [1, {"b": []}]}') == 4
    assert admin.json_depth('{"a": "[[[[{{{{"}') == 1
    assert admin.json_depth('{"a": "\\\\", "b": [[]]}') == 3  # an escaped backslash ends no string
    assert admin.json_depth('{"a": "\\"[[[["}') == 1  # an escaped quote does
    assert admin.json_depth("[" * 100_000, stop=32) == 33
