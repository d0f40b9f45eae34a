"""The telemetry scenario (issue 18) and the service client id taken from the certificate (issue 12 #16).

The cross-check logic is tested on its own; the scenario runs against the real in-process jitp broker.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from device_sim import Fleet, ServiceCreds, Target, run_storm, run_telemetry
from device_sim.checks import TelemetryTally, cross_check_telemetry, telemetry_payload, telemetry_topic
from device_sim.cli import main
from device_sim.fleet import certificate_cn
from device_sim.mqtt import Message
from device_sim.report import Report
from tests.helpers import BrokerThread, Identity, Pki

SERVICE_NAME = "billing-service"  # any service certificate, not the dev PKI's "ingest-service"


@pytest.fixture(scope="module")
def billing(pki: Pki) -> Identity:
    return pki.service(SERVICE_NAME)


# -- the cross-check, without a broker -----------------------------------------------------------
def test_cross_check_reports_exactly_the_missing_and_duplicated_messages() -> None:
    sent = {("a", s) for s in range(1, 6)} | {("b", s) for s in range(1, 6)}
    acked = sent - {("b", 5)}  # b's last PUBACK never came
    received = {k: 1 for k in sent}
    del received[("a", 4)], received[("a", 5)], received[("b", 2)]  # acknowledged, lost
    received[("a", 1)] = 3  # delivered three times
    received[("b", 3)] = 2
    received[("c", 1)] = 1  # never sent
    check = cross_check_telemetry(
        sent=sent, acked=acked, received=received, devices=2, messages=5, foreign=7, misrouted=0
    )
    assert (check.sent, check.acked) == (10, 9)
    assert check.lost == (("a", 4), ("a", 5), ("b", 2))
    assert check.duplicated == (("a", 1), ("b", 3))
    assert check.received == 7  # distinct sent messages seen: 10 - 3 lost
    assert check.deliveries == 7 + 2 + 1  # duplicates included, the unknown one not
    assert check.unacked_received == 1  # b#5 arrived without its PUBACK: allowed
    assert check.unknown == (("c", 1),)
    assert check.foreign == 7
    assert not check.ok

    report = Report(
        scenario="telemetry", target="x:1", concurrency=None, outcomes=(), duration=1.0, telemetry=check
    )
    problems = report.problems()
    assert any("3 acknowledged telemetry message(s) of 2 device(s) never arrived" in p for p in problems)
    assert any("a#4, a#5, b#2" in p for p in problems)
    assert any("never sent" in p and "c#1" in p for p in problems)
    assert "lost 3  duplicated 2" in report.table() and "FAILED" in report.table()
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["telemetry"]["lost"] == [["a", 4], ["a", 5], ["b", 2]] and doc["ok"] is False


def test_cross_check_duplicates_and_unacked_deliveries_are_not_failures() -> None:
    sent = {("a", 1), ("a", 2), ("a", 3)}
    check = cross_check_telemetry(
        sent=sent,
        acked={("a", 1), ("a", 2)},
        received={("a", 1): 2, ("a", 2): 1, ("a", 3): 1},
        devices=1,
        messages=3,
    )
    assert check.lost == () and check.duplicated == (("a", 1),) and check.unacked_received == 1
    assert check.ok
    failed = cross_check_telemetry(
        sent=sent,
        acked=sent,
        received={k: 1 for k in sent},
        devices=1,
        messages=3,
        publish_failures={"reset": 1},
    )
    assert failed.lost == () and not failed.ok  # a device whose batch broke off fails the run


def test_tally_counts_only_this_runs_messages_on_their_own_topic() -> None:
    tally = TelemetryTally("run-1")

    def deliver(topic: str, payload: bytes) -> None:
        tally.on_message(Message(topic, payload, 1, False, False, time.perf_counter()))

    deliver(telemetry_topic("d1"), telemetry_payload("run-1", "d1", 1))
    deliver(telemetry_topic("d1"), telemetry_payload("run-1", "d1", 1))  # a redelivery
    deliver(telemetry_topic("d1"), telemetry_payload("run-0", "d1", 1))  # an earlier run's backlog
    deliver(telemetry_topic("d1"), b'{"t": 21.5}')  # someone else's telemetry
    deliver(telemetry_topic("d1"), b"\xff\xfe")
    deliver(telemetry_topic("d2"), telemetry_payload("run-1", "d1", 2))  # on another device's topic
    assert dict(tally.received) == {("d1", 1): 2}
    assert tally.foreign == 3 and tally.misrouted == 1

    async def waits() -> tuple[bool, bool]:
        return (
            await tally.wait_for({("d1", 1)}, time_limit=5),
            await tally.wait_for({("d1", 1), ("d1", 9)}, time_limit=0.05),
        )

    assert asyncio.run(waits()) == (True, False)


# -- the service client id (issue 12 #16) ------------------------------------------------------
def test_service_client_id_is_the_certificate_cn(pki: Pki, billing: Identity) -> None:
    assert certificate_cn(billing.cert_path) == SERVICE_NAME
    assert ServiceCreds(cert=billing.cert_path, key=billing.key_path).mqtt_client_id == SERVICE_NAME
    assert ServiceCreds.from_pki(pki.layout.dir).mqtt_client_id == "ingest-service"
    override = ServiceCreds(cert=billing.cert_path, key=billing.key_path, client_id="other")
    assert override.mqtt_client_id == "other"
    nameless = pki.identity(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no CN")]), issuer=pki.service_ca
    )
    with pytest.raises(ValueError, match="no common name"):
        certificate_cn(nameless.cert_path)
    with pytest.raises(ValueError, match="no PEM certificate"):
        certificate_cn(billing.key_path)


def test_storm_with_a_service_certificate_not_named_ingest_service(
    broker: BrokerThread, fleet: Fleet, target: Target, billing: Identity, registry_path: Path
) -> None:
    service = ServiceCreds(cert=billing.cert_path, key=billing.key_path)
    report = asyncio.run(
        run_storm(target, fleet, n=5, concurrency=5, service=service, registry_path=registry_path)
    )
    assert report.ok, report.table()
    assert report.events is not None and report.events.seen == 5


def test_cli_service_cert_without_cn_is_a_usage_error(
    broker: BrokerThread,
    pki: Pki,
    fleet: Fleet,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    nameless = pki.identity(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no CN")]), issuer=pki.service_ca
    )
    base = ["storm", "--port", str(broker.port), "--ca", str(pki.layout.root_cert), "--fleet", str(fleet.dir)]
    with pytest.raises(SystemExit, match="no common name"):
        main([*base, "--service-cert", str(nameless.cert_path), "--service-key", str(nameless.key_path)])
    with pytest.raises(SystemExit, match="--service-client-id goes with"):
        main([*base, "--service-client-id", "x"])


# -- the telemetry scenario against a real broker ---------------------------------------------
def test_telemetry_every_acknowledged_message_arrives(
    broker: BrokerThread, fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    """20 devices x 20 QoS 1 messages, each device disconnecting right after its last PUBACK."""
    report = asyncio.run(
        run_telemetry(
            target,
            fleet,
            service=service,
            n=20,
            messages=20,
            concurrency=20,
            registry_path=registry_path,
            delivery_timeout=10,
        )
    )
    t = report.telemetry
    assert t is not None
    assert report.joined == 20 and t.devices == 20 and t.messages_per_device == 20
    assert t.sent == t.acked == 400 and dict(t.publish_failures) == {}
    assert t.received + len(t.lost) == t.acked and t.unknown == () and t.misrouted == 0
    assert report.events is not None and report.events.seen == 20  # first joins provision
    assert t.lost == (), f"{len(t.lost)} of {t.acked} acknowledged messages lost: {t.lost[:10]}"
    assert report.ok, report.table()


def test_cli_telemetry_with_another_service_certificate(
    broker: BrokerThread,
    pki: Pki,
    fleet: Fleet,
    billing: Identity,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    out = tmp_path / "report.json"
    code = main(
        [
            "telemetry",
            "-n",
            "6",
            "-m",
            "5",
            "--inflight",
            "2",
            "--port",
            str(broker.port),
            "--ca",
            str(pki.layout.root_cert),
            "--fleet",
            str(fleet.dir),
            "--service-cert",
            str(billing.cert_path),
            "--service-key",
            str(billing.key_path),
            "--data-dir",
            str(broker.config.data_dir),
            "--delivery-timeout",
            "10",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())
    t = doc["telemetry"]
    assert doc["joined"] == 6 and t["devices"] == 6 and t["sent"] == t["acked"] == 30, captured.out
    assert t["received"] + len(t["lost"]) == 30
    assert "telemetry" in captured.out and "acked 30" in captured.out
    assert code == (0 if doc["ok"] else 1)
    assert doc["ok"] == (not t["lost"] and doc["events"]["lost"] == []), captured.out


def test_cli_telemetry_needs_the_service_identity(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["telemetry", "--ca", "ca.pem", "--fleet", "fleet"])
    assert exc.value.code == 2
    assert "--service-cert" in capsys.readouterr().err
