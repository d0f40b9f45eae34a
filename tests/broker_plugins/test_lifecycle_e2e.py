"""Device lifecycle end to end: real mTLS clients, a real broker, and the real ``jitp`` CLI.

Every operator action runs as ``python -m jitp.cli ... --data-dir <the broker's data dir>`` while
the broker runs; the broker picks the CLI's events up from the outbox (1 s poll) or the trust
change from the registry (trust.reload_interval), and applies them to live sessions.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

import certs
from broker_plugins.session import JitpSession
from jitp.domain.acl import quarantine_namespace
from jitp.domain.events import config_topic
from jitp.trust import Role
from tests.helpers import BrokerThread, Conn, Identity, Pki, connect, test_config, wait_until

JITP = [sys.executable, "-m", "jitp.cli"]
DEADLINE = 6.0


# -- helpers ----------------------------------------------------------------------------------
def cli(broker: BrokerThread, *args: str) -> subprocess.CompletedProcess[str]:
    data = broker.config.data_dir
    assert data is not None
    return subprocess.run(
        [*JITP, *args, "--data-dir", str(data)],
        cwd=data.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def received(conn: Conn, topic: str) -> list[Any]:
    return [m for m in list(conn.messages) if m.topic == topic]


def event_docs(conn: Conn, event_type: str, device_id: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in received(conn, f"$jitp/events/{event_type}/{device_id}")]


def wait_event(conn: Conn, event_type: str, device_id: str) -> dict[str, Any]:
    assert wait_until(lambda: event_docs(conn, event_type, device_id), DEADLINE), (
        f"no {event_type} event for {device_id}; got {[m.topic for m in conn.messages]}"
    )
    return event_docs(conn, event_type, device_id)[0]


def refusals(broker: BrokerThread) -> list[tuple[str | None, str | None]]:
    return [(e.draft.reason, e.draft.device_id) for e in broker.audit() if e.draft.action == "refused"]


ANY_DEVICE = object()  # a refusal decided before the device is known: it may or may not be attributed


def assert_refused(broker: BrokerThread, pki: Pki, ident: Identity, reason: str, device_id: object) -> None:
    before = len(refusals(broker))
    conn = connect(broker.port, pki, ident, client_id=ident.name)
    conn.close()
    assert conn.rc == 5, (conn.rc, conn.error)
    assert wait_until(lambda: len(refusals(broker)) > before, DEADLINE), "the refusal was not audited"
    new = refusals(broker)[before:]
    if device_id is ANY_DEVICE:
        assert reason in [r for r, _ in new], new
    else:
        assert (reason, device_id) in new, new


def admitted(broker: BrokerThread, pki: Pki, ident: Identity) -> Conn:
    conn = connect(broker.port, pki, ident)
    assert conn.rc == 0, (conn.rc, conn.error)
    return conn


def watcher(broker: BrokerThread, pki: Pki, name: str, *filters: str) -> Conn:
    """A backend service, subscribed to ``filters`` (default: all events)."""
    conn = admitted(broker, pki, pki.service(name))
    for f in filters or ("$jitp/events/#",):
        assert conn.subscribe(f) == [1], f
    return conn


def namespace_of_session(broker: BrokerThread, client_id: str) -> Any:
    async def go() -> Any:
        found = broker.server.broker.live_session(client_id)
        if found is None or not isinstance(found[0], JitpSession) or found[0].client is None:
            return None
        return found[0].client.namespace

    return broker.call(go())


def retained_topics(broker: BrokerThread) -> set[str]:
    async def go() -> set[str]:
        return set(broker.server.broker.retained_messages)

    return broker.call(go())


def status_of(broker: BrokerThread, device_id: str) -> str | None:
    record = broker.call(broker.registry().get_device(device_id))
    return None if record is None else str(record.status)


def connack(broker: BrokerThread, pki: Pki, ident: Identity) -> int | None:
    """One connect attempt: the CONNACK code (None if refused in the handshake)."""
    conn = connect(broker.port, pki, ident)
    conn.close()
    return conn.rc


RECHECK = "jitp-recheck-sessions"  # the broker's task that rechecks live sessions after a trust change


def tasks_running(broker: BrokerThread, name: str) -> int:
    """How many tasks named ``name`` are running on the broker's loop."""

    async def count() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name() == name and not t.done())

    return broker.call(count())


def close_all(*conns: Conn) -> None:
    for c in conns:
        c.close()


class Brokers:
    """Brokers a test starts itself (own config, or stopped mid-test); stopped at the end."""

    def __init__(self, tmp_path: Path, pki: Pki) -> None:
        self.tmp_path, self.pki = tmp_path, pki
        self.running: list[BrokerThread] = []

    def start(self, *, device_ca: certs.Issuer | None = None, **sections: Any) -> BrokerThread:
        b = BrokerThread(test_config(self.tmp_path, self.pki, **sections)).start()
        self.running.append(b)
        b.register_ca((device_ca or self.pki.manufacturer).cert)
        b.register_ca(self.pki.service_ca.cert, role=Role.SERVICE)
        return b

    def stop(self, b: BrokerThread) -> None:
        self.running.remove(b)
        b.stop()


@pytest.fixture
def brokers(tmp_path: Path, pki: Pki) -> Iterator[Brokers]:
    holder = Brokers(tmp_path, pki)
    try:
        yield holder
    finally:
        for b in list(holder.running):
            holder.stop(b)


def make_crl(
    issuer: certs.Issuer,
    serials: list[int],
    *,
    key: Any = None,
    last_update: datetime | None = None,
    next_update: datetime | None = None,
) -> bytes:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(last_update or now - timedelta(minutes=5))
        .next_update(next_update or now + timedelta(days=7))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(minutes=5))
            .build()
        )
    return builder.sign(key or issuer.key, hashes.SHA256()).public_bytes(Encoding.PEM)


def write_crl(tmp_path: Path, name: str, pem: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(pem)
    return str(path)


# -- revoke -----------------------------------------------------------------------------------
def test_revoke_closes_live_session_and_refuses_reconnect(broker: BrokerThread, pki: Pki) -> None:
    device_id = "lc-revoke-01"
    svc = watcher(broker, pki, "svc-revoke")
    dev = pki.device(device_id)
    conn = admitted(broker, pki, dev)
    try:
        out = ok(cli(broker, "devices", "revoke", device_id, "--reason", "stolen"))
        assert f"{device_id}: now revoked" in out
        assert conn.disconnected.wait(5), "the live session was not closed within 5 s"
        doc = wait_event(svc, "revoked", device_id)
        assert (doc["status"], doc["previous_status"], doc["reason"]) == ("revoked", "active", "stolen")
        assert_refused(broker, pki, dev, "device_blocked", device_id)
        assert status_of(broker, device_id) == "revoked"
        assert "revoked" in [e.draft.action for e in broker.audit() if e.draft.device_id == device_id]
    finally:
        close_all(conn, svc)


# -- disable / enable -------------------------------------------------------------------------
def test_disable_blocks_and_enable_readmits(broker: BrokerThread, pki: Pki) -> None:
    device_id = "lc-disable-01"
    svc = watcher(broker, pki, "svc-disable")
    dev = pki.device(device_id)
    conn = admitted(broker, pki, dev)
    again: Conn | None = None
    try:
        assert "now disabled" in ok(cli(broker, "devices", "disable", device_id))
        assert conn.disconnected.wait(5)
        assert wait_event(svc, "disabled", device_id)["previous_status"] == "active"
        assert_refused(broker, pki, dev, "device_blocked", device_id)

        assert "now active" in ok(cli(broker, "devices", "enable", device_id))
        doc = wait_event(svc, "enabled", device_id)
        assert (doc["status"], doc["previous_status"]) == ("active", "disabled")
        again = admitted(broker, pki, dev)
        assert status_of(broker, device_id) == "active"
    finally:
        close_all(conn, svc, *([again] if again else []))


# -- quarantine ---------------------------------------------------------------------------------
def test_quarantine_limits_namespace_and_enable_restores_it(broker: BrokerThread, pki: Pki) -> None:
    device_id = "lc-quarantine-01"
    status = f"$jitp/devices/{device_id}/status"
    telemetry = f"devices/{device_id}/telemetry"
    svc = watcher(broker, pki, "svc-quarantine", "$jitp/events/#", "#", "$jitp/devices/+/status")
    dev = pki.device(device_id)
    conn = admitted(broker, pki, dev)
    conns = [svc, conn]
    try:
        # Before: telemetry flows.
        conn.client.publish(telemetry, b"before", qos=1)
        assert wait_until(lambda: received(svc, telemetry), DEADLINE), (
            "telemetry of an active device did not arrive"
        )

        assert "now quarantined" in ok(
            cli(broker, "devices", "quarantine", device_id, "--reason", "odd traffic")
        )
        wait_event(svc, "quarantined", device_id)
        assert wait_until(
            lambda: namespace_of_session(broker, device_id) == quarantine_namespace(device_id), DEADLINE
        )
        assert not conn.disconnected.is_set(), "a quarantined device stays connected"

        def check_quarantined(c: Conn, tag: bytes) -> None:
            svc.messages.clear()
            c.client.publish(telemetry, b"forbidden-" + tag, qos=1)
            c.client.publish(status, b"status-" + tag, qos=1)
            assert wait_until(
                lambda: [m.payload for m in received(svc, status)] == [b"status-" + tag], DEADLINE
            ), "the status report of a quarantined device did not arrive"
            # The status report is the witness: one connection's packets are handled in order (W17),
            # each routed before the next is read, and svc gets both topics on one ordered queue.
            # Had the telemetry been routed, it would have arrived before the status report.
            assert received(svc, telemetry) == [], "a quarantined device published outside its status topic"
            # It reads its configuration (retained) but nothing else.
            assert c.subscribe(f"devices/{device_id}/cmd/#") == [0x80]
            c.messages.clear()
            assert c.subscribe(config_topic(device_id)) == [1]
            assert wait_until(lambda: received(c, config_topic(device_id)), DEADLINE), (
                "no retained config for the quarantined device"
            )
            config = json.loads(received(c, config_topic(device_id))[0].payload)
            assert config["device_id"] == device_id
            assert not c.disconnected.is_set()

        check_quarantined(conn, b"live")

        # A reconnect while quarantined is admitted, with the quarantine namespace.
        conn.close()
        conn = admitted(broker, pki, dev)
        conns.append(conn)
        assert namespace_of_session(broker, device_id) == quarantine_namespace(device_id)
        check_quarantined(conn, b"reconnected")

        # enable restores the normal namespace, on the live session.
        assert "now active" in ok(cli(broker, "devices", "enable", device_id))
        wait_event(svc, "enabled", device_id)
        assert wait_until(
            lambda: namespace_of_session(broker, device_id) not in (None, quarantine_namespace(device_id)),
            DEADLINE,
        )
        svc.messages.clear()
        conn.client.publish(telemetry, b"after", qos=1)
        assert wait_until(lambda: [m.payload for m in received(svc, telemetry)] == [b"after"], DEADLINE)
        assert conn.subscribe(f"devices/{device_id}/cmd/#") == [1]
        assert not conn.disconnected.is_set()
    finally:
        close_all(*conns)


# -- deprovision --------------------------------------------------------------------------------
def test_deprovision_closes_session_clears_retained_until_allow(broker: BrokerThread, pki: Pki) -> None:
    device_id = "lc-deprov-01"
    state = f"devices/{device_id}/state"
    svc = watcher(broker, pki, "svc-deprov")
    dev = pki.device(device_id)
    conn = admitted(broker, pki, dev)
    conns = [svc, conn]
    try:
        conn.client.publish(state, b"running", qos=1, retain=True).wait_for_publish(5)
        assert wait_until(lambda: {state, config_topic(device_id)} <= retained_topics(broker), DEADLINE)
        probe = watcher(broker, pki, "svc-deprov-probe", f"devices/{device_id}/#")
        assert wait_until(lambda: received(probe, state), DEADLINE), (
            "the retained state is there before deprovisioning"
        )
        probe.close()

        assert "now deprovisioned" in ok(cli(broker, "devices", "deprovision", device_id))
        assert conn.disconnected.wait(5), "the session was not closed within 5 s"
        wait_event(svc, "deprovisioned", device_id)
        assert wait_until(lambda: not ({state, config_topic(device_id)} & retained_topics(broker)), DEADLINE)

        # Witness: another device's retained status. A new subscription gets the retained messages it
        # matches once its SUBACK is sent, and a client's subscriptions are handled one after another:
        # the marker, retained for the last filter, reaches the late subscriber after anything
        # retained for the first two.
        marker_id = "lc-deprov-marker"
        marker = admitted(broker, pki, pki.device(marker_id))
        conns.append(marker)
        marker.client.publish(
            f"$jitp/devices/{marker_id}/status", b"up", qos=1, retain=True
        ).wait_for_publish(5)
        assert wait_until(lambda: f"$jitp/devices/{marker_id}/status" in retained_topics(broker), DEADLINE)
        late = watcher(
            broker, pki, "svc-deprov-late", f"devices/{device_id}/#", "#", "$jitp/devices/+/status"
        )
        conns.append(late)
        assert wait_until(lambda: received(late, f"$jitp/devices/{marker_id}/status"), DEADLINE), "no marker"
        assert [m.topic for m in late.messages if device_id in m.topic] == []

        assert_refused(broker, pki, dev, "device_blocked", device_id)

        assert "now active" in ok(cli(broker, "devices", "allow", device_id))
        wait_event(svc, "allowed", device_id)
        back = admitted(broker, pki, dev)
        conns.append(back)
        assert status_of(broker, device_id) == "active"
    finally:
        close_all(*conns)


def test_deprovision_clears_only_the_devices_own_retained_messages(broker: BrokerThread, pki: Pki) -> None:
    """A level that happens to equal the device id does not make another device's topic its own.

    A gateway reports for its children under its own namespace (devices/<gateway>/children/<child>/...);
    deprovisioning the child device must not wipe the gateway's retained data.
    """
    gateway_id, child_id = "lc-gateway-01", "lc-child-01"
    mine = f"devices/{child_id}/state"
    gateways = f"devices/{gateway_id}/children/{child_id}/state"
    gateway = admitted(broker, pki, pki.device(gateway_id))
    child = admitted(broker, pki, pki.device(child_id))
    svc = watcher(broker, pki, "svc-gateway")
    try:
        gateway.client.publish(gateways, b"child seen", qos=1, retain=True).wait_for_publish(5)
        child.client.publish(mine, b"on", qos=1, retain=True).wait_for_publish(5)
        assert wait_until(lambda: {mine, gateways} <= retained_topics(broker), DEADLINE)

        ok(cli(broker, "devices", "deprovision", child_id))
        assert child.disconnected.wait(5)
        wait_event(svc, "deprovisioned", child_id)
        assert wait_until(lambda: mine not in retained_topics(broker), DEADLINE)
        assert gateways in retained_topics(broker), "another device's retained message was cleared"
        assert config_topic(gateway_id) in retained_topics(broker)
    finally:
        close_all(gateway, child, svc)


def test_cli_revoke_is_enforced_while_other_devices_keep_joining(broker: BrokerThread, pki: Pki) -> None:
    """Events the CLI writes are found by the outbox poll; a steady stream of joins must not starve it."""
    device_id = "lc-busy-target"
    conn = admitted(broker, pki, pki.device(device_id))
    try:
        proc = subprocess.Popen(
            [*JITP, "devices", "revoke", device_id, "--data-dir", str(broker.config.data_dir)],
            cwd=broker.config.data_dir.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 5.0
        joined = 0
        # Joins back to back until the revoked session is closed: each hands fresh events to the
        # publisher, which must still poll the outbox for the CLI's event.
        while not conn.disconnected.is_set() and time.monotonic() < deadline:
            admitted(broker, pki, pki.device(f"lc-busy-{joined:03d}")).close()
            joined += 1
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert conn.disconnected.wait(max(0.0, deadline - time.monotonic())), (
            "the revoked device's session stayed open while other devices were joining"
        )
    finally:
        conn.close()


# -- erase ---------------------------------------------------------------------------------------
def traces(data: Path, *idents: Identity) -> list[str]:
    """What of ``idents`` (id, subject, fingerprint, serial, DER) is in any registry.db* file."""
    secrets: dict[str, bytes] = {}
    for ident in idents:
        fp = certs.fingerprint(ident.cert)
        secrets |= {
            f"{ident.name} id": ident.name.encode(),
            f"{ident.name} subject": ident.cert.subject.rfc4514_string().encode(),
            f"{ident.name} fingerprint": fp.encode(),
            f"{ident.name} fingerprint (upper)": fp.upper().encode(),
            f"{ident.name} fingerprint (raw)": bytes.fromhex(fp),
            f"{ident.name} serial": f"{ident.cert.serial_number:x}".encode(),
            f"{ident.name} DER": ident.cert.public_bytes(Encoding.DER),
        }
    found = []
    for path in sorted(data.glob("registry.db*")):
        raw = path.read_bytes()
        found += [f"{what} in {path.name}" for what, needle in secrets.items() if needle in raw]
    return found


def assert_no_trace(data: Path, *idents: Identity) -> None:
    assert list(data.glob("registry.db*")), "no registry files to scan"
    assert traces(data, *idents) == []


def test_erase_by_id_and_by_cert_leaves_no_trace(brokers: Brokers, pki: Pki, tmp_path: Path) -> None:
    by_id, by_cert = "erase-me-7f3a", "erase-cert-c41d"
    b = brokers.start()
    svc = watcher(b, pki, "svc-erase")
    dev_id, dev_cert = pki.device(by_id), pki.device(by_cert)
    conn_id, conn_cert = admitted(b, pki, dev_id), admitted(b, pki, dev_cert)
    conns = [svc, conn_id, conn_cert]
    try:
        conn_id.client.publish(f"devices/{by_id}/state", b"x", qos=1, retain=True).wait_for_publish(5)
        ok(cli(b, "devices", "quarantine", by_id, "--reason", "before erasure"))
        wait_event(svc, "quarantined", by_id)

        assert f"{by_id}: erased" in ok(cli(b, "devices", "erase", by_id, "--reason", "GDPR Art. 17"))
        assert f"{by_cert}: erased" in ok(cli(b, "devices", "erase", "--cert", str(dev_cert.cert_path)))
        assert conn_id.disconnected.wait(5) and conn_cert.disconnected.wait(5)
        for device_id in (by_id, by_cert):
            doc = wait_event(svc, "erased", device_id)
            assert doc["status"] == "erased"
        assert wait_until(lambda: not any(by_id in t for t in retained_topics(b)), DEADLINE)
        assert b.devices() == []

        assert_refused(b, pki, dev_id, "erased", None)
        assert_refused(b, pki, dev_cert, "erased", None)
        again = cli(b, "devices", "erase", "--cert", str(dev_cert.cert_path))
        assert again.returncode == 0 and "already erased" in again.stdout
        gone = cli(b, "devices", "erase", by_id)
        assert gone.returncode == 2 and "no device" in gone.stderr

        assert "intact" in ok(cli(b, "audit", "verify"))
        # Let the publisher mark the erased events delivered (it scrubs them then).
        assert wait_until(lambda: b.call(b.registry().pending_events()) == [], DEADLINE)
        assert wait_until(lambda: b.events(by_id) == [] and b.events(by_cert) == [], DEADLINE)
    finally:
        close_all(*conns)
    brokers.stop(b)

    assert_no_trace(tmp_path / "data", dev_id, dev_cert)

    # The audit trail still verifies after the broker is gone, and still has the erased devices' entries.
    proc = subprocess.run(
        [*JITP, "audit", "verify", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "intact" in proc.stdout, proc.stdout + proc.stderr


def test_erasure_leaves_no_trace_on_disk_while_the_broker_keeps_running(
    broker: BrokerThread, pki: Pki, tmp_path: Path
) -> None:
    """Once the erased event is delivered (and scrubbed), nothing on disk names the device: an erasure
    must not wait for the broker to stop (or for an automatic WAL checkpoint, 1000 pages later)."""
    device_id = "erase-live-5a0c"
    svc = watcher(broker, pki, "svc-erase-live")
    dev = pki.device(device_id)
    conn = admitted(broker, pki, dev)
    try:
        ok(cli(broker, "devices", "erase", device_id))
        assert conn.disconnected.wait(5)
        wait_event(svc, "erased", device_id)
        # delivered, then scrubbed from the outbox
        assert wait_until(lambda: broker.events(device_id) == [], DEADLINE)
        data = tmp_path / "data"
        assert wait_until(lambda: traces(data, dev) == [], DEADLINE), traces(data, dev)
        assert_no_trace(tmp_path / "data", dev)
    finally:
        close_all(conn, svc)


# -- idempotency and operator errors ---------------------------------------------------------------
def test_commands_are_idempotent_and_errors_are_clear(broker: BrokerThread, pki: Pki) -> None:
    device_id = "lc-idem-01"
    svc = watcher(broker, pki, "svc-idem")
    admitted(broker, pki, pki.device(device_id)).close()
    try:
        sequence = [("quarantine", "quarantined"), ("disable", "disabled"), ("revoke", "revoked")]
        for command, status in sequence:
            assert f"{device_id}: now {status}" in ok(cli(broker, "devices", command, device_id))
            second = cli(broker, "devices", command, device_id)
            assert second.returncode == 0, second.stderr
            assert f"{device_id}: already {status}" in second.stdout

        # Does not apply to a revoked device: exit 2, naming the command that does.
        for command in ("disable", "enable", "quarantine"):
            bad = cli(broker, "devices", command, device_id)
            assert bad.returncode == 2, (command, bad.stdout, bad.stderr)
            assert "allow" in bad.stderr and "revoked" in bad.stderr
            assert bad.stdout == ""
        assert status_of(broker, device_id) == "revoked"

        assert "now active" in ok(cli(broker, "devices", "allow", device_id))
        assert "already active" in ok(cli(broker, "devices", "allow", device_id))

        unknown = cli(broker, "devices", "revoke", "no-such-device-x9")
        assert unknown.returncode == 2
        assert "no device" in unknown.stderr and "no-such-device-x9" in unknown.stderr
        assert "Traceback" not in unknown.stderr

        types = [e.type for e in broker.events(device_id)]
        assert types == ["provisioned", "quarantined", "disabled", "revoked", "allowed"]
        wait_event(svc, "allowed", device_id)
        # Nothing else may arrive. The outbox publisher has marked every event delivered (so its
        # polls find nothing more to send), and a marker it publishes afterwards reaches svc on the
        # same ordered queue behind anything it sent before.
        assert wait_until(lambda: broker.call(broker.registry().pending_events()) == [], DEADLINE)
        admitted(broker, pki, pki.device("lc-idem-marker")).close()
        wait_event(svc, "provisioned", "lc-idem-marker")
        got = [m.topic for m in svc.messages if m.topic.endswith(f"/{device_id}")]
        assert got == [f"$jitp/events/{t}/{device_id}" for t in types], got
        assert "intact" in ok(cli(broker, "audit", "verify"))
    finally:
        svc.close()


# -- CRLs ------------------------------------------------------------------------------------------
def test_crl_closes_listed_session_and_refuses_it(
    broker: BrokerThread, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_id = certs.fingerprint(pki.manufacturer.cert)
    listed, spared = pki.device("lc-crl-listed"), pki.device("lc-crl-spared")
    c_listed, c_spared = admitted(broker, pki, listed), admitted(broker, pki, spared)
    conns = [c_listed, c_spared]
    # Which sessions the broker closes, and from which task (the recheck after a trust change).
    closed: list[tuple[str, str]] = []
    disconnect_client = broker.server.broker.disconnect_client

    async def recording(client_id: str, *, reason: str) -> bool:
        task = asyncio.current_task()
        closed.append((client_id, task.get_name() if task is not None else "?"))
        return await disconnect_client(client_id, reason=reason)

    monkeypatch.setattr(broker.server.broker, "disconnect_client", recording)
    try:
        crl = write_crl(tmp_path, "good.pem", make_crl(pki.manufacturer, [listed.cert.serial_number]))
        out = ok(cli(broker, "ca", "crl", ca_id, crl))
        assert "1 revoked certificate" in out
        assert c_listed.disconnected.wait(5), "the revoked certificate's session was not closed within 5 s"
        # Witness: the recheck of every live session after the trust change has finished.
        assert wait_until(lambda: tasks_running(broker, RECHECK) == 0, DEADLINE), "recheck still running"
        assert closed == [(listed.name, RECHECK)], closed
        assert broker.server.broker.live_session(spared.name) is not None
        assert not c_spared.disconnected.is_set(), "a certificate the CRL does not list was disconnected"
        assert_refused(broker, pki, listed, "revoked", ANY_DEVICE)
        conns.append(admitted(broker, pki, pki.device("lc-crl-newcomer")))
        actions = [e.draft.action for e in broker.audit()]
        assert "crl-imported" in actions and "session-closed" in actions
    finally:
        close_all(*conns)


def test_crl_with_bad_signature_or_issuer_changes_nothing(
    broker: BrokerThread, pki: Pki, tmp_path: Path
) -> None:
    ca_id = certs.fingerprint(pki.manufacturer.cert)
    dev = pki.device("lc-crl-forged")
    conn = admitted(broker, pki, dev)
    try:
        audit_before = broker.raw_audit()
        trust_before = broker.call(broker.registry().trust_version())
        forged = make_crl(pki.manufacturer, [dev.cert.serial_number], key=certs.generate_key("ec"))
        proc = cli(broker, "ca", "crl", ca_id, write_crl(tmp_path, "forged.pem", forged))
        assert proc.returncode == 2
        assert "signature does not verify" in proc.stderr
        rogue = pki.other_ca("lc rogue CA")
        proc = cli(
            broker,
            "ca",
            "crl",
            ca_id,
            write_crl(tmp_path, "rogue.pem", make_crl(rogue, [dev.cert.serial_number])),
        )
        assert proc.returncode == 2 and "not by this CA" in proc.stderr
        garbage = tmp_path / "garbage.pem"
        garbage.write_bytes(b"-----BEGIN X509 CRL-----\nnope\n-----END X509 CRL-----\n")
        proc = cli(broker, "ca", "crl", ca_id, str(garbage))
        assert proc.returncode == 2 and "not a CRL" in proc.stderr
        unknown = cli(
            broker, "ca", "crl", "0" * 64, write_crl(tmp_path, "x.pem", make_crl(pki.manufacturer, []))
        )
        assert unknown.returncode == 2 and "no CA" in unknown.stderr

        # The registry is how the CLI tells the broker: nothing in it changed (no CRL, no audit
        # entry, the same trust version), so the broker's trust reloads have nothing to apply.
        assert broker.call(broker.registry().trust_version()) == trust_before
        assert broker.call(broker.registry().crls()) == {}
        assert broker.raw_audit() == audit_before
        assert not conn.disconnected.is_set()
        conn.close()
        conn = admitted(broker, pki, dev)
    finally:
        conn.close()


def test_stale_crl_is_kept_and_enforced_by_default(broker: BrokerThread, pki: Pki, tmp_path: Path) -> None:
    ca_id = certs.fingerprint(pki.manufacturer.cert)
    now = datetime.now(UTC)
    listed = pki.device("lc-stale-listed")
    c_listed = admitted(broker, pki, listed)
    conns = [c_listed]
    try:
        stale = make_crl(
            pki.manufacturer,
            [listed.cert.serial_number],
            last_update=now - timedelta(days=2),
            next_update=now - timedelta(days=1),
        )
        proc = cli(broker, "ca", "crl", ca_id, write_crl(tmp_path, "stale.pem", stale))
        assert proc.returncode == 0, proc.stderr
        assert "WARNING" in proc.stderr and "nextUpdate" in proc.stderr
        assert c_listed.disconnected.wait(5)
        assert_refused(broker, pki, listed, "revoked", ANY_DEVICE)
        conns.append(admitted(broker, pki, pki.device("lc-stale-other")))
    finally:
        close_all(*conns)


def test_stale_crl_refuses_the_whole_ca_when_configured(brokers: Brokers, pki: Pki, tmp_path: Path) -> None:
    b = brokers.start(trust={"reload_interval": 0.5, "stale_crl": "refuse"})
    ca_id = certs.fingerprint(pki.manufacturer.cert)
    now = datetime.now(UTC)
    dev = pki.device("lc-refuse-live")
    conn = admitted(b, pki, dev)
    svc = watcher(b, pki, "svc-refuse")
    try:
        stale = make_crl(
            pki.manufacturer, [], last_update=now - timedelta(days=2), next_update=now - timedelta(days=1)
        )
        proc = cli(b, "ca", "crl", ca_id, write_crl(tmp_path, "stale.pem", stale))
        assert proc.returncode == 0, proc.stderr
        assert "WARNING" in proc.stderr
        assert conn.disconnected.wait(5), "a session under the stale CRL's CA was not closed"
        assert_refused(b, pki, dev, "crl_stale", ANY_DEVICE)
        assert_refused(b, pki, pki.device("lc-refuse-new"), "crl_stale", ANY_DEVICE)
        assert not svc.disconnected.is_set()  # another CA: unaffected
        svc2 = admitted(b, pki, pki.service("svc-refuse-2"))
        svc2.close()
        # A fresh CRL lifts it.
        fresh = make_crl(pki.manufacturer, [])
        ok(cli(b, "ca", "crl", ca_id, write_crl(tmp_path, "fresh.pem", fresh)))
        assert wait_until(lambda: connack(b, pki, dev) == 0, DEADLINE, interval=0.3), (
            "a fresh CRL did not lift the refusal"
        )
    finally:
        close_all(conn, svc)


def test_crl_revoking_an_intermediate(brokers: Brokers, pki: Pki, tmp_path: Path) -> None:
    """Only the root is registered for devices; its CRL revokes the manufacturer (intermediate) CA."""
    b = brokers.start(device_ca=pki.root)
    dev = pki.device("lc-intermediate-01")
    conn = admitted(b, pki, dev)
    svc = watcher(b, pki, "svc-intermediate")
    try:
        crl = make_crl(pki.root, [pki.manufacturer.cert.serial_number])
        ok(cli(b, "ca", "crl", certs.fingerprint(pki.root.cert), write_crl(tmp_path, "root.pem", crl)))
        assert conn.disconnected.wait(5)
        assert_refused(b, pki, dev, "revoked", ANY_DEVICE)
        assert_refused(b, pki, pki.device("lc-intermediate-02"), "revoked", ANY_DEVICE)
        assert not svc.disconnected.is_set()
    finally:
        close_all(conn, svc)
