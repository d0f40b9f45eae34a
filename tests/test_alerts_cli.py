"""`jitp alerts list|ack` and `jitp status`, locally and through the admin API, with its roles."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import certs
from jitp.config import AlertsConfig
from jitp.trust import Role
from tests.helpers import BrokerThread, Identity, Pki, connect, test_config, wait_until
from tests.test_cli_remote import remote

ROOT = Path(__file__).resolve().parent.parent


def local(broker: BrokerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jitp.cli", *args, "--data-dir", str(broker.config.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def principals(broker: BrokerThread, pki: Pki) -> tuple[Identity, Identity]:
    ops_ca = certs.make_ca("alerts ops CA", key=certs.generate_key(), issuer=pki.root)
    audit_ca = certs.make_ca("alerts audit CA", key=certs.generate_key(), issuer=pki.root)
    broker.register_ca(ops_ca.cert, role=Role.OPERATOR)
    broker.register_ca(audit_ca.cert, role=Role.AUDITOR)
    return pki.identity("olga", issuer=ops_ca), pki.identity("aaron", issuer=audit_ca)


def test_auditor_reads_operator_acknowledges_locally_too(broker: BrokerThread, pki: Pki) -> None:
    operator, auditor = principals(broker, pki)
    device = pki.device("twin-1")
    first = connect(broker.port, pki, device, bind_address="127.0.0.1")
    second = connect(broker.port, pki, device, bind_address="127.0.0.2")
    first.close()
    second.close()
    assert (first.rc, second.rc) == (0, 0)
    assert wait_until(lambda: any(e.draft.action == "alert" for e in broker.audit()), 5)

    listed = remote(broker, pki, auditor, "alerts", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (alert,) = json.loads(listed.stdout)
    assert alert["kind"] == "cloned_certificate" and alert["device_id"] == "twin-1"
    assert local(broker, "alerts", "list").stdout.splitlines()[-1] == "1 alert(s)"

    denied = remote(broker, pki, auditor, "alerts", "ack", alert["alert_id"])
    assert denied.returncode == 2 and "may not run alerts.ack" in denied.stderr
    acked = remote(broker, pki, operator, "alerts", "ack", alert["alert_id"], "--note", "a lab twin")
    assert acked.returncode == 0, acked.stderr
    assert f"{alert['alert_id']}: now acknowledged by operator:olga" in acked.stdout
    again = local(broker, "alerts", "ack", alert["alert_id"])
    assert again.returncode == 0 and "already acknowledged by operator:olga" in again.stdout

    assert json.loads(remote(broker, pki, auditor, "alerts", "list", "--json").stdout) == []
    (everything,) = json.loads(local(broker, "alerts", "list", "--all", "--json").stdout)
    assert everything["acked_by"] == "operator:olga"
    ack_entries = [e.draft for e in broker.audit() if e.draft.action == "alert-acked"]
    assert [(d.actor, d.details["note"]) for d in ack_entries] == [("operator:olga", "a lab twin")]

    status = remote(broker, pki, auditor, "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["alerts"]["open"] == 0 and doc["devices"]["by_status"] == {"active": 1}
    assert doc["last_5_minutes"]["joins"] == 1
    screen = local(broker, "status")
    assert screen.returncode == 0, screen.stderr
    assert "devices    1 (active 1)" in screen.stdout and "alerts     0 open" in screen.stdout


@pytest.fixture
def spiky(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    alerts = AlertsConfig(spike_min_joins=3, spike_factor=1, spike_action="pause")
    b = BrokerThread(test_config(tmp_path, pki, alerts=alerts)).start()
    try:
        b.register_ca(pki.manufacturer.cert)
        yield b
    finally:
        b.stop()


def test_a_spike_pauses_first_joins_until_an_operator_acknowledges(spiky: BrokerThread, pki: Pki) -> None:
    operator, _ = principals(spiky, pki)
    devices = [pki.device(f"spike-{i}") for i in range(3)]
    for device in devices:
        conn = connect(spiky.port, pki, device)
        conn.close()
        assert conn.rc == 0
    assert wait_until(lambda: spiky.server.service.paused_cas, 5), "the spike did not pause the CA"
    paused = connect(spiky.port, pki, pki.device("spike-late"))
    paused.close()
    assert paused.rc == 3  # CONNACK 3: shed, not refused
    known = connect(spiky.port, pki, devices[0])  # a known device is not a first join: it goes on
    known.close()
    assert known.rc == 0
    (alert,) = json.loads(remote(spiky, pki, operator, "alerts", "list", "--json").stdout)
    assert alert["kind"] == "provisioning_spike"
    acked = remote(spiky, pki, operator, "alerts", "ack", alert["alert_id"])
    assert acked.returncode == 0 and "resumed" in acked.stdout, acked.stdout + acked.stderr
    resumed = connect(spiky.port, pki, pki.device("spike-after"))
    resumed.close()
    assert resumed.rc == 0
