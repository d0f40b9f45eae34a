"""End to end: real broker, real TLS, real certificates from certs/, paho clients."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jitp.domain.audit import AuditDraft
from jitp.trust import TrustAnchor
from tests.helpers import BrokerThread, Identity, Pki, connect, test_config, wait_until


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
        # The broker has seen the disconnect (a clean session leaves the table): the next connect
        # is a reconnect, not a takeover of a session still open.
        assert wait_until(lambda: broker.session_count() == 0), "the disconnect was not seen"
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
        assert wait_until(lambda: _connack(b, pki, dev) == 0, 5, interval=0.2), (
            "a CA registered at runtime must apply within 5 s"
        )
        b.call(b.registry().set_anchor_enabled(anchor.ca_id, False, audit=draft))
        after = pki.device("after-disable")
        assert wait_until(lambda: _connack(b, pki, after) is None, 5, interval=0.2), (
            "a CA disabled at runtime must stop admitting within 5 s"
        )
    finally:
        b.stop()


def _connack(broker: BrokerThread, pki: Pki, ident: Identity) -> int | None:
    """One connect attempt: the CONNACK code, None if refused in the handshake."""
    conn = connect(broker.port, pki, ident)
    conn.close()
    return conn.rc


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
        # Witness: a message routed to the device after the event. Had the event been routed to
        # the device, it would have arrived before this marker on the same connection.
        marker = dev.client.publish("devices/nosy/cmd/marker", b"m", qos=1)
        marker.wait_for_publish(5)
        assert dev.wait_for(lambda: any(m.topic == "devices/nosy/cmd/marker" for m in dev.messages))
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
    # The outbox publisher routes the events (queued for the offline session), then marks them
    # delivered: once nothing is pending, all three wait in the service's session.
    assert wait_until(lambda: broker.call(broker.registry().pending_events()) == []), "events still pending"
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
        # Both publishers must have taken their relay cursors before the test's events: a new node
        # starts at the present. A warm-up join puts an event in the outbox; a node cursor past it
        # shows that node's publisher has polled (a cursor is written only by the relay).
        warm = connect(nodes[0].port, pki, pki.device("relay-warm-up"))
        warm.close()
        assert warm.rc == 0
        _wait_relayed(nodes, nodes[0].call(nodes[0].registry().outbox_head()))
        svc = connect(nodes[0].port, pki, pki.service())
        try:
            assert svc.subscribe("$jitp/events/provisioned/+") == [1]
            for i, node in enumerate(nodes):
                d = connect(node.port, pki, pki.device(f"relay-{i}"))
                d.close()
                assert d.rc == 0
            assert svc.wait_for(lambda: len(svc.messages) >= 2, timeout=6)
            # A second copy could only come from node 0's relay poll, or from its pending-event poll.
            # Once node 0's cursor is past both events and nothing is pending, either has run; a
            # marker joining node 0 after that reaches the subscriber behind anything they sent.
            _wait_relayed(nodes[:1], nodes[0].call(nodes[0].registry().outbox_head()))
            assert wait_until(lambda: nodes[0].call(nodes[0].registry().pending_events()) == [])
            marker = connect(nodes[0].port, pki, pki.device("relay-marker"))
            marker.close()
            assert marker.rc == 0
            assert svc.wait_for(lambda: _device_ids(svc.messages)[-1:] == ["relay-marker"], timeout=6)
            got = sorted(_device_ids(svc.messages)[:-1])
            assert got == ["relay-0", "relay-1"]  # each exactly once
        finally:
            svc.close()
    finally:
        for n in nodes:
            n.stop()


def _wait_relayed(nodes: list[BrokerThread], seq: int) -> None:
    """Wait until each node's relay cursor (``mqtt:<node_id>``) has reached outbox seq ``seq``."""
    for node in nodes:
        _wait_cursor(node, f"mqtt:{node.config.node_id}", seq)


def _wait_cursor(node: BrokerThread, name: str, seq: int) -> None:
    assert wait_until(lambda: node.call(node.registry().sink_cursor(name)) >= seq, 6), (
        f"{name} did not reach seq {seq}"
    )


def _device_ids(messages: list[Any]) -> list[str]:
    return [json.loads(m.payload)["device_id"] for m in messages]
