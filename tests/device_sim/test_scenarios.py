"""The simulator against the real in-process jitp broker: outcomes cross-checked with the registry."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

from device_sim import (
    Backoff,
    Fleet,
    ServiceCreds,
    Target,
    run_chaos,
    run_hold,
    run_ramp,
    run_reconnect,
    run_storm,
)
from device_sim.fleet import client_context
from device_sim.mqtt import MqttClient
from jitp.trust import Role
from tests.certflow import init_issuer
from tests.helpers import BrokerThread, Pki, test_config


def provisioned_events(broker: BrokerThread) -> Counter[str]:
    return Counter(e.device_id for e in broker.events() if e.type == "provisioned")


def test_storm_outcomes_match_registry_and_events(
    broker: BrokerThread, fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    report = asyncio.run(
        run_storm(target, fleet, n=30, concurrency=10, service=service, registry_path=registry_path)
    )
    assert report.ok, report.table()
    assert report.joined == 30 and report.failures == {}
    assert report.events is not None and report.events.seen == 30 and report.events.new_events == 30
    assert not report.events.duplicates and not report.events.lost
    assert report.registry is not None and report.registry.checked == 30
    assert len(report.connack_latencies) == 30 and len(report.event_latencies) == 30
    joined = {o.device_id for o in report.outcomes if o.joined}
    assert {d.device_id for d in broker.devices()} == joined
    assert provisioned_events(broker) == Counter(joined)
    table = report.table()
    assert "joins" in table and "p99" in table and "OK" in table
    doc = report.to_json()
    assert doc["ok"] is True and doc["joined"] == 30 and doc["latency_connack_ms"]["p50"] > 0


def test_reconnect_gives_no_new_events(
    broker: BrokerThread, fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    async def go() -> tuple[object, object]:
        first = await run_storm(
            target, fleet, n=20, concurrency=20, service=service, registry_path=registry_path
        )
        again = await run_reconnect(
            target, fleet, n=20, concurrency=20, service=service, registry_path=registry_path
        )
        return first, again

    first, again = asyncio.run(go())
    assert first.ok, first.table()  # type: ignore[attr-defined]
    assert again.ok, again.table()  # type: ignore[attr-defined]
    assert again.joined == 20  # type: ignore[attr-defined]
    assert again.events.new_events == 0 and again.events.expected == 0  # type: ignore[attr-defined]
    assert len(broker.devices()) == 20
    assert all(n == 1 for n in provisioned_events(broker).values())


def test_reconnect_flags_new_provisioning(
    broker: BrokerThread, fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    """A 'reconnect' of a fleet that was never provisioned is not idempotent: reported as failures."""
    report = asyncio.run(
        run_reconnect(target, fleet, n=5, concurrency=5, service=service, registry_path=registry_path)
    )
    assert report.joined == 5
    assert not report.ok
    assert report.events is not None and len(report.events.unexpected) == 5


def test_chaos_identities_are_all_refused(
    broker: BrokerThread, pki: Pki, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    report = asyncio.run(run_chaos(target, pki.layout.dir, service=service, registry_path=registry_path))
    assert report.ok, report.table()
    by_name = {c.name: c for c in report.chaos}
    assert set(by_name) == {
        "expired",
        "unknown_ca",
        "client_id_mismatch",
        "unsafe_id_slash",
        "unsafe_id_hash",
        "unsafe_id_dollar",
        "no_certificate",
    }
    assert all(c.refused for c in report.chaos)
    for name in ("client_id_mismatch", "unsafe_id_slash", "unsafe_id_hash", "unsafe_id_dollar"):
        assert by_name[name].observed == "connack:5"
    for name in ("expired", "unknown_ca", "no_certificate"):  # refused in the TLS handshake, before MQTT
        assert not by_name[name].observed.startswith("connack")
    assert report.joined == 0
    assert broker.devices() == []
    assert report.registry is not None and report.registry.leaked == ()


def test_hold_keeps_connections_alive(
    broker: BrokerThread, fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    report = asyncio.run(
        run_hold(
            target,
            fleet,
            n=12,
            seconds=2,
            keepalive=1,
            publish_interval=0.5,
            concurrency=12,
            service=service,
            registry_path=registry_path,
        )
    )
    assert report.ok, report.table()
    assert report.hold is not None
    assert report.hold.held == 12 and dict(report.hold.dropped) == {}
    assert report.hold.pings > 0 and report.hold.ping_failures == 0
    assert report.hold.publishes > 0 and report.hold.publish_failures == 0
    assert report.events is not None and report.events.seen == 12  # first joins provision
    assert len(broker.devices()) == 12


def test_ramp_joins_everyone(
    broker: BrokerThread, fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    report = asyncio.run(
        run_ramp(target, fleet, rate=100, n=15, service=service, registry_path=registry_path)
    )
    assert report.ok, report.table()
    assert report.joined == 15 and report.events is not None and report.events.seen == 15


class _RefusalSeen(logging.Handler):
    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        super().__init__(logging.WARNING)
        self.loop = loop
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "max_connections" in record.getMessage():
            self.loop.call_soon_threadsafe(self.event.set)


def test_connack_3_backs_off_until_everyone_joins(
    tmp_path: Path, pki: Pki, fleet: Fleet, service: ServiceCreds
) -> None:
    broker = BrokerThread(test_config(tmp_path, pki, listener={"max_connections": 5})).start()
    try:
        broker.register_ca(pki.manufacturer.cert)
        broker.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        target = Target("127.0.0.1", broker.port, ca=pki.layout.root_cert)
        blockers = fleet.devices[-4:]  # 4 held devices + the service subscriber fill the 5 slots

        async def go() -> object:
            held = [
                await MqttClient.connect(
                    "127.0.0.1",
                    broker.port,
                    client_id=d.device_id,
                    ssl_context=client_context(target.ca, d.cert, d.key),
                )
                for d in blockers
            ]
            refused = asyncio.Event()
            handler = _RefusalSeen(asyncio.get_running_loop(), refused)
            logging.getLogger("jitp.broker").addHandler(handler)
            try:
                storm = asyncio.create_task(
                    run_storm(
                        target,
                        fleet,
                        n=16,
                        concurrency=16,
                        service=service,
                        registry_path=broker.config.registry_path,
                        backoff=Backoff(base=0.05, cap=0.5, attempts=60),
                        seed=7,
                    )
                )
                async with asyncio.timeout(60):
                    await refused.wait()  # at least one CONNACK 3 was sent: now free the slots
                for client in held:
                    await client.disconnect()
                return await storm
            finally:
                logging.getLogger("jitp.broker").removeHandler(handler)

        report = asyncio.run(go())
        assert report.ok, report.table()  # type: ignore[attr-defined]
        assert report.joined == 16  # type: ignore[attr-defined]
        assert report.retries.get("connack:3", 0) >= 1  # type: ignore[attr-defined]
        assert report.events.duplicates == () and report.events.lost == ()  # type: ignore[attr-defined]
        events = provisioned_events(broker)
        assert len(broker.devices()) == 16 + len(blockers)
        assert all(n == 1 for n in events.values()) and len(events) == 16 + len(blockers)
    finally:
        broker.stop()


def test_storm_enroll_joins_then_enrolls_every_device_and_cross_checks(
    broker: BrokerThread, fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    init_issuer(broker)
    report = asyncio.run(
        run_storm(
            target, fleet, n=12, concurrency=6, service=service, registry_path=registry_path, enroll=True
        )
    )
    assert report.ok, report.table()
    assert report.joined == 12 and report.issues == ()
    joined = {o.device_id for o in report.outcomes if o.joined}
    assert provisioned_events(broker) == Counter(joined)  # the first join, once each
    # Every device ends on exactly one current (operational) certificate, and the notes say so.
    for device_id in joined:
        states = [str(c.state) for c in broker.call(broker.registry().device_certificates(device_id))]
        assert states == ["current"], (device_id, states)
    issued = [e for e in broker.events() if str(e.type) == "certificate-issued"]
    assert Counter(e.device_id for e in issued) == Counter(joined)
    [note] = [n for n in report.notes if "issuances/s" in n]
    assert "12 device(s) enrolled" in note and "12 certificate-issued event(s)" in note


def test_storm_enroll_reports_devices_it_could_not_enroll(
    broker: BrokerThread, fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    """No issuing CA: every CSR is rejected (issuer_missing), and the run says so instead of passing."""
    report = asyncio.run(
        run_storm(
            target, fleet, n=3, concurrency=3, service=service, registry_path=registry_path, enroll=True
        )
    )
    assert not report.ok
    assert any("3 device(s) stranded" in issue for issue in report.issues), report.issues
