"""`jitp-sim rotate` against a real broker: every fault, 0 stranded devices, 0 duplicate events."""

from __future__ import annotations

import asyncio

from device_sim.fleet import DeviceCreds
from device_sim.rotate import FAULTS, rotate
from tests.certflow import init_issuer
from tests.helpers import BrokerThread, Pki


def test_rotate_with_every_fault_strands_nobody(broker: BrokerThread, pki: Pki) -> None:
    init_issuer(broker)
    devices = []
    for i in range(2 * len(FAULTS)):
        ident = pki.device(f"rot-{i:03d}")
        devices.append(DeviceCreds(ident.name, ident.cert_path, ident.key_path))
    svc = pki.service()
    report = asyncio.run(
        rotate(
            devices,
            host="127.0.0.1",
            port=broker.port,
            ca=pki.layout.root_cert,
            service_cert=svc.cert_path,
            service_key=svc.key_path,
            service_client_id=svc.name,
            concurrency=4,
        )
    )
    summary = report.to_json()
    assert summary["stranded"] == [], [d.error for d in report.devices]
    assert summary["duplicate_events"] == 0
    assert summary["mismatched_events"] == []
    assert summary["faults"] == dict.fromkeys(FAULTS, 2)
    assert summary["certificate_issued_events"] == 2 * (len(FAULTS) - 1)  # all but never_reconnect
    # The registry agrees: one current certificate per committed device, a pending one otherwise.
    for d in report.devices:
        states = [str(c.state) for c in broker.call(broker.registry().device_certificates(d.device_id))]
        assert states == (["pending"] if d.fault == "never_reconnect" else ["current"]), (d.fault, states)
