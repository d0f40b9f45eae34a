"""End to end: real broker, real TLS, real certificates from certs/, paho clients."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from jitp.audit import AuditDraft
from jitp.trust import TrustAnchor
from tests.helpers import BrokerThread, Pki, connect, test_config


def test_first_connect_provisions_on_the_same_connection(broker: BrokerThread, pki: Pki) -> None:
    dev = pki.device("sensor-0001")
    conn = connect(broker.port, pki, dev)
    try:
        assert conn.rc == 0, conn.error
        # The same connection is usable right away: publish in its namespace.
        info = conn.client.publish("devices/sensor-0001/telemetry", b"21.5", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
    finally:
        conn.close()
    [record] = broker.devices()
    assert record.device_id == "sensor-0001"
    assert record.cert_fingerprint == dev.fingerprint
    assert str(record.status) == "active"


def test_service_subscriber_receives_provisioned_event(broker: BrokerThread, pki: Pki) -> None:
    svc = connect(broker.port, pki, pki.service())
    try:
        assert svc.rc == 0, svc.error
        assert svc.subscribe("$jitp/events/#") == [1]
        dev = pki.device("meter-7")
        d = connect(broker.port, pki, dev)
        assert d.rc == 0
        d.close()
        assert svc.wait_for(lambda: len(svc.messages) >= 1)
        msg = svc.messages[0]
        assert msg.topic == "$jitp/events/provisioned/meter-7"
        assert msg.qos == 1
        doc = json.loads(msg.payload)
        assert doc["device_id"] == "meter-7"
        assert doc["cert_fingerprint"] == dev.fingerprint
        for key in ("event_id", "ca_id", "region", "provisioned_at", "attributes", "schema"):
            assert key in doc
    finally:
        svc.close()


def test_reconnect_is_idempotent_and_updates_last_seen(broker: BrokerThread, pki: Pki) -> None:
    dev = pki.device("thermo-1")
    for _ in range(3):
        conn = connect(broker.port, pki, dev)
        conn.close()
        assert conn.rc == 0
        time.sleep(0.05)
    # Reconnects of a cached record skip the registry; last_seen is written behind, with the
    # registry's next write (here: another device's join) or when it closes.
    other = connect(broker.port, pki, pki.device("thermo-2"))
    other.close()
    assert other.rc == 0
    record = next(d for d in broker.devices() if d.device_id == "thermo-1")
    assert len(broker.events("thermo-1")) == 1
    provisioned = [e for e in broker.audit() if e.draft.action == "provisioned"]
    assert [e.draft.device_id for e in provisioned] == ["thermo-1", "thermo-2"]
    assert record.last_seen is not None and record.last_seen > record.provisioned_at


def test_concurrent_first_connects_of_one_device_give_one_record(broker: BrokerThread, pki: Pki) -> None:
    dev = pki.device("racer")
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: connect(broker.port, pki, dev), range(16)))
    for c in results:
        c.close()
    # Takeovers may close some of the connections, but every CONNACK was 0 and there is one record.
    assert all(c.rc == 0 for c in results), [c.rc for c in results]
    assert [r.device_id for r in broker.devices()] == ["racer"]
    assert len(broker.events("racer")) == 1


def test_concurrent_first_connects_of_many_devices(broker: BrokerThread, pki: Pki) -> None:
    devs = [pki.device(f"fleet-{i:03d}") for i in range(40)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda d: connect(broker.port, pki, d), devs))
    for c in results:
        c.close()
    assert [c.rc for c in results] == [0] * 40
    assert sorted(r.device_id for r in broker.devices()) == sorted(d.name for d in devs)
    events = broker.events()
    assert len(events) == 40
    assert len({e.event_id for e in events}) == 40


def test_ca_registered_and_disabled_at_runtime(tmp_path: Path, pki: Pki) -> None:
    b = BrokerThread(test_config(tmp_path, pki, trust={"reload_interval": 1.0})).start()
    try:
        dev = pki.device("late-joiner")
        first = connect(b.port, pki, dev)
        first.close()
        assert first.rc is None  # no CA yet: refused in the handshake
        # Register through the registry directly (what `jitp ca register` does from another process).
        anchor = TrustAnchor.from_certificate(pki.manufacturer.cert)
        draft = AuditDraft(at=datetime.now(UTC), action="ca-registered", actor="test")
        b.call(b.registry().register_anchor(anchor, audit=draft))
        deadline = time.monotonic() + 5
        rc = None
        while time.monotonic() < deadline and rc != 0:
            c = connect(b.port, pki, dev)
            c.close()
            rc = c.rc
            time.sleep(0.2)
        assert rc == 0, "a CA registered at runtime must apply within 5 s"
        b.call(b.registry().set_anchor_enabled(anchor.ca_id, False, audit=draft))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and rc is not None:
            c = connect(b.port, pki, pki.device("after-disable"))
            c.close()
            rc = c.rc
            time.sleep(0.2)
        assert rc is None, "a CA disabled at runtime must stop admitting within 5 s"
    finally:
        b.stop()


def test_devices_cannot_read_events_and_services_are_not_provisioned(broker: BrokerThread, pki: Pki) -> None:
    dev = connect(broker.port, pki, pki.device("nosy"))
    svc = connect(broker.port, pki, pki.service("dashboard"))
    try:
        assert dev.rc == 0 and svc.rc == 0
        assert dev.subscribe("$jitp/events/#") == [0x80]
        assert dev.subscribe("#") == [0x80]
        assert dev.subscribe("devices/nosy/cmd/#") == [1]
        assert svc.subscribe("$jitp/events/#") == [1]
        other = connect(broker.port, pki, pki.device("newcomer"))
        other.close()
        assert svc.wait_for(lambda: len(svc.messages) >= 1)
        time.sleep(0.3)
        assert not [m for m in dev.messages if m.topic.startswith("$jitp/events")]
    finally:
        dev.close()
        svc.close()
    assert sorted(r.device_id for r in broker.devices()) == ["newcomer", "nosy"]


def test_persistent_service_session_gets_events_published_while_offline(
    broker: BrokerThread, pki: Pki
) -> None:
    svc_id = pki.service("pipeline")
    svc = connect(broker.port, pki, svc_id, clean=False)
    assert svc.rc == 0
    assert svc.subscribe("$jitp/events/provisioned/+") == [1]
    svc.close()
    for i in range(3):
        d = connect(broker.port, pki, pki.device(f"offline-{i}"))
        d.close()
        assert d.rc == 0
    time.sleep(1.5)  # the outbox publisher delivers while the service is away
    back = connect(broker.port, pki, svc_id, clean=False)
    try:
        assert back.rc == 0
        assert back.wait_for(lambda: len(back.messages) >= 3)
        got = sorted(json.loads(m.payload)["device_id"] for m in back.messages)
        assert got == ["offline-0", "offline-1", "offline-2"]
    finally:
        back.close()


def test_two_nodes_share_one_port_with_reuse_port(tmp_path: Path, pki: Pki) -> None:
    """listener.reuse_port: several broker processes (here two in one) on one port, one registry."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    try:
        for _ in range(2):
            cfg = test_config(tmp_path, pki, listener={"bind": f"127.0.0.1:{port}", "reuse_port": True})
            nodes.append(BrokerThread(cfg).start())
        nodes[0].register_ca(pki.manufacturer.cert)
        nodes[1].call(nodes[1].server.service.refresh_trust())
        devs = [pki.device(f"rp-{i:02d}") for i in range(16)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda d: connect(port, pki, d), devs))
        try:
            assert [c.rc for c in results] == [0] * 16
            # The kernel spreads connects over both listeners (all 16 on one: p = 2**-15).
            served = [n.server.broker.connected_clients for n in nodes]
            assert sum(served) == 16 and min(served) > 0, served
        finally:
            for c in results:
                c.close()
        assert sorted(r.device_id for r in nodes[0].devices()) == sorted(d.name for d in devs)
        assert len(nodes[0].events()) == 16
    finally:
        for n in nodes:
            n.stop()


def test_subscribers_on_one_node_get_events_committed_on_another(tmp_path: Path, pki: Pki) -> None:
    """Several nodes on one registry (node_id set): each relays the other nodes' events to its own
    subscribers, from its own outbox cursor."""
    nodes = [BrokerThread(test_config(tmp_path, pki, node_id=f"node-{i}")).start() for i in range(2)]
    try:
        nodes[0].register_ca(pki.manufacturer.cert)
        from jitp.trust import Role

        nodes[0].register_ca(pki.service_ca.cert, role=Role.SERVICE)
        nodes[1].call(nodes[1].server.service.refresh_trust())
        time.sleep(1.2)  # both publishers have set their cursors
        svc = connect(nodes[0].port, pki, pki.service())
        try:
            assert svc.subscribe("$jitp/events/provisioned/+") == [1]
            for i, node in enumerate(nodes):
                d = connect(node.port, pki, pki.device(f"relay-{i}"))
                d.close()
                assert d.rc == 0
            assert svc.wait_for(lambda: len(svc.messages) >= 2, timeout=6)
            time.sleep(1.2)
            got = sorted(json.loads(m.payload)["device_id"] for m in svc.messages)
            assert got == ["relay-0", "relay-1"]  # each exactly once
        finally:
            svc.close()
    finally:
        for n in nodes:
            n.stop()
