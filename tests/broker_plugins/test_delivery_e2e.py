"""Issue 18: a PUBACK means the message reaches every matching subscription, whatever happens next.

Real broker, real TLS, real clients (paho, Debian's mosquitto_pub, raw sockets where a client must
misbehave). Batches run many times in one test: the loss was intermittent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from jitp.domain.records import Command
from tests.helpers import BrokerThread, Conn, Identity, Pki, connect, wait_until
from tests.rawmqtt import connect_packet, recv_exact, subscribe_packet, tls_connect

DEADLINE = 30.0


def subscriber(broker: BrokerThread, pki: Pki, name: str, topic: str, *, clean: bool = True) -> Conn:
    conn = connect(broker.port, pki, pki.service(name), clean=clean)
    assert conn.rc == 0, conn.error
    assert conn.subscribe(topic, qos=1) == [1]
    return conn


def payloads(conn: Conn) -> list[bytes]:
    return [bytes(m.payload) for m in list(conn.messages)]


def publish_batch_and_disconnect(
    broker: BrokerThread, pki: Pki, device: Identity, batch: list[bytes]
) -> None:
    """paho: publish at QoS 1, wait for every PUBACK, disconnect at once."""
    conn = connect(broker.port, pki, device)
    assert conn.rc == 0, conn.error
    try:
        infos = [conn.client.publish(f"devices/{device.name}/t", p, qos=1) for p in batch]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        conn.close()


def mosquitto_pub_lines(broker: BrokerThread, pki: Pki, device: Identity, lines: list[str]) -> None:
    tool = shutil.which("mosquitto_pub")
    assert tool is not None, "mosquitto_pub is not installed (Debian package mosquitto-clients)"
    proc = subprocess.run(
        [
            tool,
            "-h", "127.0.0.1",
            "-p", str(broker.port),
            "--cafile", str(pki.layout.root_cert),
            "--cert", str(device.cert_path),
            "--key", str(device.key_path),
            "-i", device.name,
            "-q", "1",
            "-t", f"devices/{device.name}/t",
            "-l",
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_mosquitto_pub_batch_of_20_is_delivered_whole_100_times(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """The issue's reproduction: 20 lines through `mosquitto_pub -l -q 1`, 100 batches."""
    device = pki.device("qos1-mosq-01")
    sub = clients(subscriber(broker, pki, "svc-mosq", "devices/#"))
    expected: list[bytes] = []
    for batch in range(100):
        lines = [f"b{batch}-m{i}" for i in range(1, 21)]
        mosquitto_pub_lines(broker, pki, device, lines)
        expected += [line.encode() for line in lines]
        n = len(expected)
        assert wait_until(lambda n=n: len(sub.messages) >= n, DEADLINE), (
            f"batch {batch}: {len(sub.messages)} of {len(expected)} delivered"
        )
    assert sorted(payloads(sub)) == sorted(expected)


@pytest.mark.parametrize(("size", "repeats"), [(1, 30), (20, 30), (1000, 2)])
def test_paho_batches_reach_clean_and_persistent_subscribers(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn], size: int, repeats: int
) -> None:
    device = pki.device(f"qos1-paho-{size}")
    clean = clients(subscriber(broker, pki, f"svc-clean-{size}", f"devices/{device.name}/#"))
    persistent = clients(
        subscriber(broker, pki, f"svc-persist-{size}", f"devices/{device.name}/#", clean=False)
    )
    expected: list[bytes] = []
    for r in range(repeats):
        batch = [f"r{r}-m{i}".encode() for i in range(size)]
        publish_batch_and_disconnect(broker, pki, device, batch)
        expected += batch
        for sub in (clean, persistent):
            n = len(expected)
            assert wait_until(lambda sub=sub, n=n: len(sub.messages) >= n, DEADLINE), (
                f"repeat {r}: {len(sub.messages)} of {len(expected)}"
            )
    for sub in (clean, persistent):
        assert sorted(payloads(sub)) == sorted(expected)


def test_publisher_revoked_right_after_its_pubacks_loses_nothing(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    device = pki.device("qos1-revoked-01")
    sub = clients(subscriber(broker, pki, "svc-revoke", f"devices/{device.name}/#"))
    conn = connect(broker.port, pki, device)
    assert conn.rc == 0
    batch = [f"m{i}".encode() for i in range(200)]
    infos = [conn.client.publish(f"devices/{device.name}/t", p, qos=1) for p in batch]
    for info in infos:
        info.wait_for_publish(10)
    broker.call(broker.server.service.apply(Command.REVOKE, device.name, actor="test"))
    assert conn.disconnected.wait(10)
    conn.client.loop_stop()
    assert wait_until(lambda: len(sub.messages) >= len(batch), DEADLINE)
    assert sorted(payloads(sub)) == sorted(batch)


def test_a_persistent_subscriber_that_drops_unacknowledged_messages_gets_them_again(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """In-flight QoS 1 messages (sent, not acknowledged) survive the subscriber's connection."""
    svc = pki.service("svc-noack")
    device = pki.device("qos1-noack-01")
    raw = tls_connect(broker.port, pki, svc)
    raw.sendall(connect_packet(svc.name, keepalive=30, clean=False))
    assert recv_exact(raw, 4)[3] == 0
    raw.sendall(subscribe_packet(1, [(f"devices/{device.name}/#", 1)]))
    assert recv_exact(raw, 5)[:2] == b"\x90\x03"
    batch = [f"m{i}".encode() for i in range(50)]
    publish_batch_and_disconnect(broker, pki, device, batch)
    # The raw subscriber reads some PUBLISHes and never acknowledges them, then drops the connection.
    first = recv_exact(raw, 2)
    assert first[0] & 0xF0 == 0x30
    raw.close()
    assert wait_until(lambda: broker.server.broker.live_session(svc.name) is None, DEADLINE)
    back = clients(connect(broker.port, pki, svc, clean=False))
    assert back.rc == 0
    assert wait_until(lambda: len(back.messages) >= len(batch), DEADLINE)
    assert sorted(set(payloads(back))) == sorted(batch)
    assert all(not m.retain for m in back.messages)


def test_queued_messages_for_an_offline_session_arrive_with_retain_0(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Finding 6 of issue 12: MQTT-3.3.1-9, and the backlog is not mistaken for retained state."""
    svc = pki.service("svc-offline")
    device = pki.device("qos1-offline-01")
    first = subscriber(broker, pki, svc.name, f"devices/{device.name}/#", clean=False)
    first.close()
    assert wait_until(lambda: broker.server.broker.live_session(svc.name) is None, DEADLINE)
    batch = [f"m{i}".encode() for i in range(300)]
    publish_batch_and_disconnect(broker, pki, device, batch)
    back = clients(connect(broker.port, pki, svc, clean=False))
    assert back.rc == 0
    assert wait_until(lambda: len(back.messages) >= len(batch), DEADLINE)
    assert sorted(payloads(back)) == sorted(batch)
    assert [m.retain for m in back.messages] == [False] * len(batch)


def test_takeover_of_a_persistent_subscriber_loses_nothing(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    svc = pki.service("svc-takeover")
    device = pki.device("qos1-takeover-01")
    old = clients(subscriber(broker, pki, svc.name, f"devices/{device.name}/#", clean=False))
    batch = [f"m{i}".encode() for i in range(400)]
    done = threading.Event()

    def publish() -> None:
        publish_batch_and_disconnect(broker, pki, device, batch)
        done.set()

    thread = threading.Thread(target=publish)
    thread.start()
    assert wait_until(lambda: len(old.messages) > 0, DEADLINE)
    new = clients(connect(broker.port, pki, svc, clean=False))  # takes the session over mid-stream
    assert new.rc == 0
    thread.join(60)
    assert done.is_set()
    assert wait_until(lambda: set(payloads(old)) | set(payloads(new)) >= set(batch), DEADLINE)
    got = set(payloads(old)) | set(payloads(new))
    assert got == set(batch)


def test_subscription_churn_by_another_device_loses_nothing(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Finding 4 of issue 12: amqtt dropped 10.7% while another device churned its filters."""
    device = pki.device("qos1-churn-pub")
    churner = pki.device("qos1-churner")
    sub = clients(subscriber(broker, pki, "svc-churn", f"devices/{device.name}/#"))
    stop = threading.Event()
    churned = [0]

    def churn() -> None:
        conn = connect(broker.port, pki, churner)
        assert conn.rc == 0
        try:
            while not stop.is_set():
                f = f"devices/{churner.name}/cmd/{churned[0] % 50}"
                conn.client.subscribe(f, 1)
                conn.client.unsubscribe(f)
                churned[0] += 1
                if churned[0] % 20 == 0:
                    time.sleep(0.001)  # let paho's network thread keep up; not synchronisation
        finally:
            conn.close()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        expected: list[bytes] = []
        for r in range(10):
            batch = [f"r{r}-m{i}".encode() for i in range(100)]
            publish_batch_and_disconnect(broker, pki, device, batch)
            expected += batch
    finally:
        stop.set()
        thread.join(30)
    assert churned[0] > 100
    assert wait_until(lambda: len(sub.messages) >= len(expected), DEADLINE)
    assert sorted(payloads(sub)) == sorted(expected)


def test_graceful_stop_delivers_what_was_acknowledged(tmp_path: Path, pki: Pki) -> None:
    """SIGTERM path: the broker stops taking messages, delivers the queued ones, then closes."""
    from jitp.trust import Role
    from tests.helpers import test_config

    b = BrokerThread(test_config(tmp_path, pki)).start()
    stopped = False
    try:
        b.register_ca(pki.manufacturer.cert)
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        device = pki.device("qos1-stop-01")
        sub = subscriber(b, pki, "svc-stop", f"devices/{device.name}/#")
        # A burst of 2,000 still queued in the broker (or unacknowledged) when the stop begins.
        batch = [os.urandom(8).hex().encode() for _ in range(2000)]
        publish_batch_and_disconnect(b, pki, device, batch)
        b.stop()
        stopped = True
        assert sorted(payloads(sub)) == sorted(batch)
        sub.client.loop_stop()
    finally:
        if not stopped:
            b.stop()


def test_a_service_absorbs_a_burst_far_beyond_the_device_queue_bound(tmp_path: Path, pki: Pki) -> None:
    """Queue bounds are per role: a device's is small (it only gets commands), a backend principal's
    holds a fleet's burst while it catches up (limits.service_max_queued_messages)."""
    from jitp.trust import Role
    from tests.helpers import test_config

    b = BrokerThread(test_config(tmp_path, pki, limits={"max_queued_messages": 10})).start()
    try:
        b.register_ca(pki.manufacturer.cert)
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        sub = subscriber(b, pki, "svc-burst", "devices/#")
        devices = [pki.device(f"qos1-burst-{i}") for i in range(5)]
        batches = {d.name: [f"{d.name}-m{i}".encode() for i in range(300)] for d in devices}
        threads = [
            threading.Thread(target=publish_batch_and_disconnect, args=(b, pki, d, batches[d.name]))
            for d in devices
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        expected = sorted(p for batch in batches.values() for p in batch)
        assert wait_until(lambda: len(sub.messages) >= len(expected), DEADLINE)
        assert sorted(payloads(sub)) == expected
        assert "queue_full" not in [e.draft.reason for e in b.audit()]
        sub.close()
    finally:
        b.stop()


def test_messages_queued_before_a_quarantine_are_not_delivered_after_it(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Session replay obeys the ACL at delivery: a command queued for an offline persistent session
    is withdrawn once the device is quarantined (its namespace no longer receives commands)."""
    device = pki.device("qos1-quarantine-replay")
    first = connect(broker.port, pki, device, clean=False)
    assert first.rc == 0
    assert first.subscribe(f"devices/{device.name}/cmd/#") == [1]
    assert first.subscribe(f"$jitp/devices/{device.name}/config") == [1]
    first.close()
    assert wait_until(lambda: broker.server.broker.live_session(device.name) is None, DEADLINE)
    routed = broker.call(_route(broker, f"devices/{device.name}/cmd/reboot", b"reboot"))
    assert routed == 1  # queued for the offline session
    broker.call(broker.server.service.apply(Command.QUARANTINE, device.name, actor="test"))
    back = clients(connect(broker.port, pki, device, clean=False))
    assert back.rc == 0
    config = f"$jitp/devices/{device.name}/config"
    # The configuration is queued after the command on reconnect: once it arrives, the command
    # would have arrived before it.
    assert wait_until(lambda: any(m.topic == config for m in back.messages), DEADLINE)
    assert not [m for m in back.messages if m.topic.startswith(f"devices/{device.name}/cmd/")]


async def _route(broker: BrokerThread, topic: str, data: bytes) -> int:
    return broker.server.broker.route(topic, data, 1)
