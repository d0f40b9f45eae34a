"""Issue 12: what an intruder with a valid device certificate tried, run the way it was reported.

Real broker on a free port, real TLS, real certificates; paho where a well-behaved client does,
raw packets where the client misbehaves on purpose.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_plugins.session import JitpSession
from jitp.domain.records import Command
from jitp.trust import Role
from tests.helpers import BrokerThread, Conn, Pki, connect, test_config, wait_until
from tests.rawmqtt import (
    closed_within,
    connect_packet,
    raw_publish,
    recv_exact,
    subscribe_packet,
    tls_connect,
    unsubscribe_packet,
    will_connect_packet,
)

DEADLINE = 10.0


@pytest.fixture
def make(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., BrokerThread]]:
    started: list[BrokerThread] = []

    def build(**sections: Any) -> BrokerThread:
        b = BrokerThread(test_config(tmp_path / f"b{len(started)}", pki, **sections)).start()
        started.append(b)
        b.register_ca(pki.manufacturer.cert)
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        return b

    yield build
    for b in started:
        b.stop()


def refusal_reasons(broker: BrokerThread) -> list[str | None]:
    return [e.draft.reason for e in broker.audit()]


def admitted_raw(broker: BrokerThread, pki: Pki, device_id: str, *, keepalive: int = 30) -> ssl.SSLSocket:
    sock = tls_connect(broker.port, pki, pki.device(device_id))
    sock.sendall(connect_packet(device_id, keepalive=keepalive))
    assert recv_exact(sock, 4) == b"\x20\x02\x00\x00"
    return sock


def session_of(broker: BrokerThread, client_id: str) -> JitpSession:
    entry = broker.server.broker.sessions.get(client_id)
    assert entry is not None
    session = entry[0]
    assert isinstance(session, JitpSession)
    return session


# -- finding 1: the Last Will ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "devices/victim-01/cmd/reboot",
        "$jitp/events/provisioned/victim-01",
        "$jitp/admin/replies/ingest-service/x",
        "$jitp/devices/victim-01/config",
        "devices/+/cmd/reboot",
    ],
)
def test_a_will_outside_the_namespace_refuses_the_connect_and_is_audited(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn], topic: str
) -> None:
    watcher = clients(connect(broker.port, pki, pki.service("svc-will-watch")))
    assert watcher.subscribe("#") == [1]
    assert watcher.subscribe("$jitp/events/#") == [1]
    device = pki.device("will-attacker-01")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(
        will_connect_packet(
            device.name, will_topic=topic, will_payload=b"forged", will_qos=1, will_retain=True
        )
    )
    assert recv_exact(sock, 4) == b"\x20\x02\x00\x05"  # CONNACK 5, not authorized
    sock.close()
    assert wait_until(lambda: "will_not_allowed" in refusal_reasons(broker), DEADLINE)
    assert topic not in broker.server.broker.retained_messages
    assert not [m for m in watcher.messages if m.payload == b"forged"]
    # The broker keeps serving everyone else.
    ok = clients(connect(broker.port, pki, pki.device("will-bystander-01")))
    assert ok.rc == 0


def test_a_will_on_the_devices_own_status_topic_is_published_on_an_unclean_drop(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    watcher = clients(connect(broker.port, pki, pki.service("svc-status-watch")))
    assert watcher.subscribe("$jitp/devices/+/status") == [1]
    device = pki.device("will-status-01")
    sock = tls_connect(broker.port, pki, device)
    topic = f"$jitp/devices/{device.name}/status"
    sock.sendall(will_connect_packet(device.name, will_topic=topic, will_payload=b"offline", will_qos=1))
    assert recv_exact(sock, 4) == b"\x20\x02\x00\x00"
    sock.close()  # no DISCONNECT: the will goes out
    assert wait_until(
        lambda: [m.payload for m in watcher.messages if m.topic == topic] == [b"offline"], DEADLINE
    )


def test_the_will_is_checked_again_when_published(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Allowed at CONNECT, then the device is quarantined: its will on telemetry is not published."""
    watcher = clients(connect(broker.port, pki, pki.service("svc-will-late")))
    assert watcher.subscribe("devices/#") == [1]
    device = pki.device("will-late-01")
    sock = tls_connect(broker.port, pki, device)
    topic = f"devices/{device.name}/lastwill"
    sock.sendall(will_connect_packet(device.name, will_topic=topic, will_payload=b"bye", will_qos=1))
    assert recv_exact(sock, 4) == b"\x20\x02\x00\x00"
    broker.call(broker.server.service.apply(Command.QUARANTINE, device.name, actor="test"))
    assert wait_until(
        lambda: session_of(broker, device.name).client.namespace.publish[0].startswith("$"),  # type: ignore[union-attr]
        DEADLINE,
    )
    sock.close()
    assert wait_until(lambda: "will_not_allowed" in refusal_reasons(broker), DEADLINE)
    assert not [m for m in watcher.messages if m.topic == topic]


def test_a_quarantined_device_reconnects_with_its_usual_will_dropped(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Quarantine must still let a device report its status: its CONNECT (with a will its normal
    namespace allows) is admitted with the will dropped and audited, not refused."""
    watcher = clients(connect(broker.port, pki, pki.service("svc-will-quarantine")))
    assert watcher.subscribe("devices/#") == [1]
    assert watcher.subscribe("$jitp/devices/+/status") == [1]
    device = pki.device("will-quarantined-01")
    first = clients(connect(broker.port, pki, device))
    assert first.rc == 0
    first.close()
    broker.call(broker.server.service.apply(Command.QUARANTINE, device.name, actor="test"))
    topic = f"devices/{device.name}/lastwill"
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(will_connect_packet(device.name, will_topic=topic, will_payload=b"bye", will_qos=1))
    assert recv_exact(sock, 4) == b"\x20\x02\x00\x00"  # admitted
    assert wait_until(lambda: "will_not_allowed" in refusal_reasons(broker), DEADLINE)
    status = f"$jitp/devices/{device.name}/status"
    sock.sendall(raw_publish(status, b"quarantined-ok", qos=1, packet_id=1))
    assert recv_exact(sock, 4) == b"\x40\x02\x00\x01"  # PUBACK
    sock.close()  # unclean: a will would go out now, but it was dropped
    assert wait_until(
        lambda: [m.payload for m in watcher.messages if m.topic == status] == [b"quarantined-ok"], DEADLINE
    )
    # A will is routed before the clean session leaves the table; a marker routed after that reaches
    # the watcher after any will would have.
    assert wait_until(lambda: device.name not in broker.server.broker.sessions, DEADLINE)
    marker = clients(connect(broker.port, pki, pki.device("will-quarantine-marker")))
    info = marker.client.publish("devices/will-quarantine-marker/m", b"m", qos=1)
    info.wait_for_publish(5)
    assert wait_until(
        lambda: any(m.topic == "devices/will-quarantine-marker/m" for m in watcher.messages), DEADLINE
    )
    assert not [m for m in watcher.messages if m.topic == topic]


def test_a_will_with_qos_3_is_a_protocol_violation(broker: BrokerThread, pki: Pki) -> None:
    device = pki.device("will-qos3-01")
    sock = tls_connect(broker.port, pki, device)
    sock.sendall(
        will_connect_packet(device.name, will_topic=f"devices/{device.name}/x", will_payload=b"x", will_qos=3)
    )
    assert closed_within(sock, DEADLINE)
    assert wait_until(lambda: "protocol_violation" in refusal_reasons(broker), DEADLINE)


# -- finding 2: subscription churn ---------------------------------------------------------------


def test_churned_filters_leave_nothing_behind_even_after_the_attacker_leaves(
    broker: BrokerThread, pki: Pki
) -> None:
    tree = broker.server.broker.subscription_tree
    base_nodes, base_len = tree.node_count(), len(tree)
    sock = admitted_raw(broker, pki, "churn-attacker-01")
    pid = 0
    for i in range(2000):
        f = f"devices/churn-attacker-01/cmd/{i}"
        pid = pid % 65000 + 1
        sock.sendall(subscribe_packet(pid, [(f, 1)]))
        assert recv_exact(sock, 5)[:2] == b"\x90\x03"
        pid = pid % 65000 + 1
        sock.sendall(unsubscribe_packet(pid, [f]))
        assert recv_exact(sock, 4)[:2] == b"\xb0\x02"
    assert len(tree) == base_len and tree.node_count() == base_nodes
    sock.sendall(subscribe_packet(1, [("devices/churn-attacker-01/cmd/live", 1)]))
    assert recv_exact(sock, 5)[:2] == b"\x90\x03"
    assert len(tree) == base_len + 1
    sock.close()
    assert wait_until(lambda: len(tree) == base_len and tree.node_count() == base_nodes, DEADLINE)


def test_max_subscriptions_per_client_answers_0x80_and_is_audited(
    make: Callable[..., BrokerThread], pki: Pki
) -> None:
    broker = make(limits={"max_subscriptions": 3})
    sock = admitted_raw(broker, pki, "subs-limit-01")
    codes = []
    for i in range(5):
        sock.sendall(subscribe_packet(i + 1, [(f"devices/subs-limit-01/cmd/{i}", 1)]))
        codes.append(recv_exact(sock, 5)[4])
    assert codes == [1, 1, 1, 0x80, 0x80]
    # Re-subscribing to an existing filter is not a new one.
    sock.sendall(subscribe_packet(9, [("devices/subs-limit-01/cmd/0", 0)]))
    assert recv_exact(sock, 5)[4] == 0
    assert wait_until(lambda: "subscription_limit" in refusal_reasons(broker), DEADLINE)
    sock.close()


# -- finding 3: a slow reader ----------------------------------------------------------------------


def test_a_client_that_stops_reading_is_bounded_then_disconnected(
    make: Callable[..., BrokerThread], pki: Pki
) -> None:
    """It subscribes to itself, stops reading and keeps publishing: the broker's queue for it stays
    within max_queued_messages, and it is disconnected, audited queue_full: either QoS 1 overflowed
    the bound, or the broker's writes to it could not drain for a keep-alive period (W17), whichever
    comes first (the kernel's socket buffers decide which)."""
    broker = make(limits={"max_queued_messages": 50, "max_queued_bytes": 1 << 20, "keepalive_grace": 1.0})
    device_id = "slow-reader-01"
    sock = admitted_raw(broker, pki, device_id, keepalive=2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(subscribe_packet(1, [(f"devices/{device_id}/cmd/#", 1)]))
    assert recv_exact(sock, 5)[:2] == b"\x90\x03"
    session = session_of(broker, device_id)
    payload = b"x" * 4096
    sent, peak = 0, 0
    stopped: str | None = None  # why publishing stopped early: the broker stopped reading us, or closed
    sock.settimeout(0.5)
    try:
        for i in range(5000):
            sock.sendall(raw_publish(f"devices/{device_id}/cmd/x", payload, qos=1, packet_id=i % 60000 + 1))
            sent += 1
            peak = max(peak, len(session.delivery))
    except (TimeoutError, OSError, ssl.SSLError) as exc:
        stopped = f"{type(exc).__name__} after {sent} publishes"
    assert peak <= 50
    assert wait_until(lambda: "queue_full" in refusal_reasons(broker), DEADLINE)
    assert wait_until(lambda: broker.server.broker.live_session(device_id) is None, DEADLINE)
    # However publishing ended, the broker ends the connection (EOF, reset or TLS alert).
    assert closed_within(sock, DEADLINE), f"the connection stayed open ({stopped or 'all 5000 sent'})"
    sock.close()
    ok = connect(broker.port, pki, pki.device("slow-bystander-01"))
    assert ok.rc == 0
    ok.close()


# -- finding 5: retained quota -----------------------------------------------------------------------


def test_retained_quota_per_device_and_cleared_on_revocation(
    make: Callable[..., BrokerThread], pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    broker = make(limits={"max_retained_per_client": 5, "max_retained_bytes_per_client": 10_000})
    device = pki.device("retain-flood-01")
    conn = connect(broker.port, pki, device)
    assert conn.rc == 0
    for i in range(8):
        info = conn.client.publish(f"devices/{device.name}/r/{i}", b"y" * 100, qos=1, retain=True)
        info.wait_for_publish(5)
        assert info.is_published()
    info = conn.client.publish(f"devices/{device.name}/big", b"z" * 20_000, qos=1, retain=True)
    info.wait_for_publish(5)
    store = broker.server.broker.retained
    assert store.owner_usage(device.name) == (5, 500)
    assert wait_until(lambda: "retained_quota" in refusal_reasons(broker), DEADLINE)
    broker.call(broker.server.service.apply(Command.REVOKE, device.name, actor="test"))
    assert wait_until(lambda: store.owner_usage(device.name) == (0, 0), DEADLINE)
    assert not [t for t in store.messages if t.startswith(f"devices/{device.name}/")]
    conn.close()


# -- finding 9: keep-alive inside a partial packet -------------------------------------------------


def test_keepalive_is_enforced_inside_a_half_sent_packet(make: Callable[..., BrokerThread], pki: Pki) -> None:
    broker = make(limits={"keepalive_grace": 1.0})
    sock = admitted_raw(broker, pki, "half-packet-01", keepalive=2)
    packet = raw_publish("devices/half-packet-01/t", b"x" * 100, qos=1, packet_id=1)
    sock.sendall(packet[: len(packet) // 2])
    assert closed_within(sock, 10.0)


# -- finding 13: protocol leniency ------------------------------------------------------------------


MALFORMED: dict[str, Callable[[str], bytes]] = {
    "publish-qos3": lambda d: raw_publish(f"devices/{d}/t", b"x", qos=3, packet_id=1),
    "publish-pid0": lambda d: raw_publish(f"devices/{d}/t", b"x", qos=1, packet_id=0),
    "publish-plus": lambda d: raw_publish(f"devices/{d}/+", b"x", qos=0),
    "publish-hash": lambda d: raw_publish(f"devices/{d}/#", b"x", qos=0),
    "subscribe-empty": lambda d: b"\x82\x02\x00\x01",
    "subscribe-qos3": lambda d: subscribe_packet(1, [(f"devices/{d}/cmd/x", 3)]),
    "second-connect": lambda d: connect_packet(d, keepalive=30),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_packets_close_the_connection_at_once(broker: BrokerThread, pki: Pki, name: str) -> None:
    device_id = f"strict-{name}"
    sock = admitted_raw(broker, pki, device_id, keepalive=600)
    sock.sendall(MALFORMED[name](device_id))
    assert closed_within(sock, DEADLINE)  # keep-alive is 600 s: only the violation can close it
    assert wait_until(lambda: "protocol_violation" in refusal_reasons(broker), DEADLINE)


# -- finding 14: the profile's max_qos also caps PUBLISH ---------------------------------------------

QOS0_TEMPLATE = """
name: qos0
version: 1
device_id: {from: subject.CN}
profile:
  max_qos: 0
"""


def test_a_qos1_publish_from_a_max_qos_0_device_is_delivered_at_qos_0(
    tmp_path: Path, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "qos0.yaml").write_text(QOS0_TEMPLATE)
    broker = BrokerThread(test_config(tmp_path, pki, templates_dir=tdir)).start()
    try:
        broker.register_ca(pki.manufacturer.cert, template="qos0")
        broker.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        svc = clients(connect(broker.port, pki, pki.service("svc-qos0")))
        assert svc.subscribe("devices/#", qos=1) == [1]
        device = clients(connect(broker.port, pki, pki.device("qos0-dev-01")))
        assert device.rc == 0
        info = device.client.publish("devices/qos0-dev-01/t", b"m", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
        assert wait_until(lambda: len(svc.messages) == 1, DEADLINE)
        assert svc.messages[0].qos == 0
    finally:
        broker.stop()
