"""Issue 17 end to end: a real broker with its metrics listener, real TLS, real clients.

The counts in /metrics match a storm exactly; a cloned certificate raises an alert on
$jitp/alerts/cloned_certificate, in the audit trail and in the metric; a storm of unknown-CA
connects raises a refusal burst.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from device_sim import Target, create_fleet, run_storm
from jitp.config import AlertsConfig, MetricsConfig
from jitp.trust import Role
from tests.helpers import BrokerThread, Conn, Pki, client_context, connect, test_config, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(broker: BrokerThread) -> Samples:
    port = broker.server.metrics_port
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture
def node(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    config = test_config(
        tmp_path,
        pki,
        metrics=MetricsConfig(bind="127.0.0.1:0", refresh_interval=3600),
        alerts=AlertsConfig(burst_refusals=10, burst_window=60, clone_action="quarantine"),
    )
    b = BrokerThread(config).start()
    try:
        b.mfr_ca = b.register_ca(pki.manufacturer.cert)  # type: ignore[attr-defined]
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        yield b
    finally:
        b.stop()


def rogue_connects(port: int, context: ssl.SSLContext, n: int) -> None:
    """``n`` TLS connects with a certificate of an unknown CA; each is refused in the handshake."""
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            try:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.recv(1)  # TLS 1.3: the refusal shows on the first read
            except (ssl.SSLError, ConnectionError, TimeoutError):
                pass


def test_storm_counts_in_metrics_match_exactly(node: BrokerThread, pki: Pki, tmp_path: Path) -> None:
    n, rogue, mismatched = 40, 7, 3
    fleet = create_fleet(pki.layout.dir, n, tmp_path / "fleet", prefix="storm-")
    report = asyncio.run(
        run_storm(Target("127.0.0.1", node.port, ca=pki.layout.root_cert), fleet, concurrency=10)
    )
    assert report.joined == n, report.table()
    rogue_ctx = client_context(pki, pki.identity("rogue-1", issuer=pki.other_ca()))
    rogue_connects(node.port, rogue_ctx, rogue)
    for i in range(mismatched):
        conn = connect(node.port, pki, pki.device(f"mm-{i}"), client_id=f"someone-else-{i}")
        assert conn.rc == 5
        conn.close()
    ca = node.mfr_ca  # type: ignore[attr-defined]

    def counted() -> bool:
        s = scrape(node)
        return total(s, "jitp_joins_total", outcome="refused") >= rogue + mismatched

    assert wait_until(counted, 10), "the refusals were not counted"
    node.call(node.server.observability.refresh())
    s = scrape(node)
    assert total(s, "jitp_joins_total", outcome="provisioned") == n
    assert (
        total(s, "jitp_joins_total", outcome="provisioned", ca=ca, template="default", region="default") == n
    )
    assert total(s, "jitp_joins_total", outcome="refused", reason="unknown_ca", ca="") == rogue
    assert total(s, "jitp_joins_total", outcome="refused", reason="client_id_mismatch", ca=ca) == mismatched
    assert total(s, "jitp_joins_total", outcome="refused") == rogue + mismatched
    assert total(s, "jitp_joins_total", outcome="shed") == 0
    assert total(s, "jitp_registry_commit_seconds_count") == n
    assert total(s, "jitp_admit_seconds_count", outcome="provisioned") == n
    # accept to CONNACK, from the connection path (the handshake refusals have no CONNACK)
    assert total(s, "jitp_join_seconds_count", outcome="provisioned") == n
    assert total(s, "jitp_join_seconds_count", outcome="refused") == mismatched
    assert total(s, "jitp_join_seconds_sum", outcome="provisioned") > 0
    assert total(s, "jitp_devices", status="active") == n
    assert total(s, "jitp_outbox_pending") == 0
    assert total(s, "jitp_ca_not_after_timestamp_seconds", ca=ca) > 0
    # never a device id in a label
    assert not any("storm-" in value for (_, labels), _ in s.items() for _, value in labels)


def test_cloned_certificate_alert_on_topic_in_audit_and_metric(
    node: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    watcher = clients(connect(node.port, pki, pki.service("alert-watcher")))
    assert watcher.rc == 0
    assert watcher.subscribe("$jitp/alerts/#") == [1]
    device = pki.device("cloned-1")
    original = clients(connect(node.port, pki, device, bind_address="127.0.0.1"))
    assert original.rc == 0
    clone = clients(connect(node.port, pki, device, bind_address="127.0.0.2"))
    assert clone.rc == 0

    def alert_messages() -> list[dict[str, object]]:
        return [
            json.loads(m.payload) for m in watcher.messages if m.topic == "$jitp/alerts/cloned_certificate"
        ]

    assert wait_until(lambda: alert_messages(), 5), "no alert within 5 s of the second use"
    (alert,) = alert_messages()
    assert alert["schema"] == "jitp.alert/1" and alert["kind"] == "cloned_certificate"
    assert alert["device_id"] == "cloned-1" and alert["count"] == 1 and alert["severity"] == "critical"
    assert alert["ca"] == node.mfr_ca  # type: ignore[attr-defined]
    assert alert["evidence"]["trigger"] == "different_hosts"  # type: ignore[index]
    audited = [e.draft for e in node.audit() if e.draft.action == "alert"]
    assert [(d.reason, d.device_id, d.details["alert_id"]) for d in audited] == [
        ("cloned_certificate", "cloned-1", alert["alert_id"])
    ]
    assert "127.0.0.2" not in json.dumps([dict(e.draft.details) for e in node.raw_audit()])
    assert total(scrape(node), "jitp_alerts_total", kind="cloned_certificate") == 1
    # the configured action: the device is quarantined (audited as the alerts' actor)
    assert wait_until(lambda: node.call(node.registry().get_device("cloned-1")).status == "quarantined", 5)


def test_devices_cannot_subscribe_to_alerts(
    node: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    device = clients(connect(node.port, pki, pki.device("nosy-1")))
    assert device.rc == 0
    assert device.subscribe("$jitp/alerts/#") == [0x80]


def test_refusal_burst_alert_from_unknown_ca_connects(
    node: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    watcher = clients(connect(node.port, pki, pki.service("burst-watcher")))
    assert watcher.subscribe("$jitp/alerts/#") == [1]
    rogue_ctx = client_context(pki, pki.identity("rogue-2", issuer=pki.other_ca()))
    rogue_connects(node.port, rogue_ctx, 25)

    def bursts() -> list[dict[str, object]]:
        return [json.loads(m.payload) for m in watcher.messages if m.topic == "$jitp/alerts/refusal_burst"]

    assert wait_until(lambda: len(bursts()) == 2, 5), bursts()
    scopes = sorted(str(a["evidence"]["scope"]) for a in bursts())  # type: ignore[index]
    assert scopes == ["ca", "net"]
    assert all(a["count"] == 1 and a["evidence"]["last_reason"] == "unknown_ca" for a in bursts())  # type: ignore[index]
    assert total(scrape(node), "jitp_alerts_total", kind="refusal_burst") == 2
    # the 15 repeats coalesce: one more entry per alert, with the count, when the window closes
    node.call(node.server.observability.alerts.flush(node.server.service.clock(), force=True))  # type: ignore[union-attr]
    counts = sorted(int(e.draft.details["count"]) for e in node.audit() if e.draft.action == "alert")
    assert counts == [1, 1, 16, 16]


def test_expiry_alerts_and_the_status_document(
    tmp_path: Path, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """A CA expiring within alerts.expiry_ca_days raises ca_expiry at the next refresh, once a day."""
    config = test_config(
        tmp_path,
        pki,
        metrics=MetricsConfig(bind="127.0.0.1:0", refresh_interval=3600),
        alerts=AlertsConfig(expiry_ca_days=100_000, expiry_device_days=100_000),
    )
    b = BrokerThread(config).start()
    try:
        ca = b.register_ca(pki.manufacturer.cert)
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        device = clients(connect(b.port, pki, pki.device("expiring-1")))
        assert device.rc == 0
        b.call(b.server.observability.refresh())
        b.call(b.server.observability.refresh())  # the same day: coalesced, not raised again
        b.call(b.server.observability.alerts.drain())  # type: ignore[union-attr]
        # one alert of each kind (an alert's coalesced count may be written again, with its id)
        alerts = {
            (e.draft.details["alert_id"], e.draft.reason, e.draft.details["ca"])
            for e in b.audit()
            if e.draft.action == "alert"
        }
        assert sorted((kind, ca_id) for _, kind, ca_id in alerts) == [("ca_expiry", ca), ("cert_expiry", ca)]
        s = scrape(b)
        assert total(s, "jitp_alerts_total", kind="ca_expiry") == 1
        assert total(s, "jitp_devices_cert_expiring", within="30d") == 0  # a fresh certificate
        with urllib.request.urlopen(f"http://127.0.0.1:{b.server.metrics_port}/status.json", timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["devices"]["by_status"] == {"active": 1} and doc["alerts"]["open"] == 2
        assert doc["expiry"]["ca"]["ca_id"] == ca
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{b.server.metrics_port}/nothing", timeout=5)
        assert missing.value.code == 404
    finally:
        b.stop()


def test_takeover_ping_pong_from_one_host_is_a_cloned_certificate(
    tmp_path: Path, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Two copies of one certificate behind one address (NAT) keep taking the session from each
    other: the third takeover within the window raises the alert; one reconnect does not."""
    config = test_config(
        tmp_path,
        pki,
        metrics=MetricsConfig(bind="127.0.0.1:0", refresh_interval=3600),
        alerts=AlertsConfig(clone_takeovers=3, clone_window=60, clone_different_host=False),
    )
    b = BrokerThread(config).start()
    try:
        b.register_ca(pki.manufacturer.cert)
        device = pki.device("nat-twin")
        conns = [clients(connect(b.port, pki, device))]
        conns.append(clients(connect(b.port, pki, device)))  # takeover 1: a reconnect, no alert
        assert all(c.rc == 0 for c in conns)
        assert total(scrape(b), "jitp_takeovers_total") == 1
        assert total(scrape(b), "jitp_alerts_total") == 0
        for _ in range(2):  # takeovers 2 and 3
            conns.append(clients(connect(b.port, pki, device)))
            assert conns[-1].rc == 0
        assert wait_until(lambda: total(scrape(b), "jitp_alerts_total", kind="cloned_certificate") == 1, 5)
        assert total(scrape(b), "jitp_takeovers_total") == 3
        b.call(b.server.observability.alerts.drain())  # type: ignore[union-attr]
        (entry,) = [e.draft for e in b.audit() if e.draft.action == "alert"]
        assert entry.device_id == "nat-twin"
        assert json.loads(entry.details["evidence"])["trigger"] == "takeover_ping_pong"
    finally:
        b.stop()


def test_two_servers_in_one_process_each_expose_their_own(tmp_path: Path, pki: Pki) -> None:
    nodes = [
        BrokerThread(
            test_config(
                tmp_path / name, pki, metrics=MetricsConfig(bind="127.0.0.1:0", refresh_interval=3600)
            )
        ).start()
        for name in ("a", "b")
    ]
    try:
        for b in nodes:
            b.register_ca(pki.manufacturer.cert)
        conn = connect(nodes[0].port, pki, pki.device("only-on-a"))
        conn.close()
        assert conn.rc == 0
        assert nodes[0].server.metrics_port != nodes[1].server.metrics_port
        assert total(scrape(nodes[0]), "jitp_joins_total", outcome="provisioned") == 1
        assert total(scrape(nodes[1]), "jitp_joins_total", outcome="provisioned") == 0
    finally:
        for b in nodes:
            b.stop()
