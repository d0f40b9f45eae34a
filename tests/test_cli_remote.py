"""`jitp --broker ...`: the CLI's remote mode through the admin API, as an operator would use it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import certs
from jitp.trust import Role
from tests.helpers import BrokerThread, Pki, connect


def remote(broker: BrokerThread, pki: Pki, ident, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    opts = [
        "--broker",
        f"127.0.0.1:{broker.port}",
        "--client-cert",
        str(ident.cert_path),
        "--client-key",
        str(ident.key_path),
        "--client-ca",
        str(pki.layout.root_cert),
    ]
    return subprocess.run(
        [sys.executable, "-m", "jitp.cli", *args, *opts],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_remote_mode_runs_commands_as_the_principal(broker: BrokerThread, pki: Pki) -> None:
    ops_ca = certs.make_ca("remote ops CA", key=certs.generate_key(), issuer=pki.root)
    audit_ca = certs.make_ca("remote audit CA", key=certs.generate_key(), issuer=pki.root)
    broker.register_ca(ops_ca.cert, role=Role.OPERATOR)
    broker.register_ca(audit_ca.cert, role=Role.AUDITOR)
    operator = pki.identity("olga", issuer=ops_ca)
    auditor = pki.identity("aaron", issuer=audit_ca)
    dev = connect(broker.port, pki, pki.device("remote-victim"))
    dev.close()
    assert dev.rc == 0

    listed = remote(broker, pki, operator, "devices", "list")
    assert listed.returncode == 0, listed.stderr
    assert [d["device_id"] for d in json.loads(listed.stdout)] == ["remote-victim"]

    revoked = remote(broker, pki, operator, "devices", "revoke", "remote-victim", "--reason", "lost")
    assert revoked.returncode == 0, revoked.stderr
    assert "now revoked" in revoked.stdout
    assert [str(r.status) for r in broker.devices()] == ["revoked"]

    denied = remote(broker, pki, auditor, "devices", "enable", "remote-victim")
    assert denied.returncode == 2 and "may not run devices.enable" in denied.stderr
    assert [str(r.status) for r in broker.devices()] == ["revoked"]

    exported = remote(broker, pki, auditor, "audit", "export")
    assert exported.returncode == 0, exported.stderr
    actions = [json.loads(line)["action"] for line in exported.stdout.splitlines()]
    assert "revoked" in actions and "admin-command" in actions

    missing = remote(broker, pki, operator, "devices", "show", "no-such-device")
    assert missing.returncode == 2 and "no device" in missing.stderr
    local_only = remote(broker, pki, operator, "audit", "verify")
    assert local_only.returncode == 2 and "not available with --broker" in local_only.stderr
    entries = [e for e in broker.audit() if e.draft.action == "admin-command"]
    assert {e.draft.actor for e in entries} == {"operator:olga", "auditor:aaron"}


def test_remote_options_before_the_command(broker: BrokerThread, pki: Pki) -> None:
    """The issue's spelling: jitp --broker H:P --cert F --key F --ca F <command> (--cert after
    `devices erase` keeps meaning the device's certificate)."""
    ops_ca = certs.make_ca("remote ops CA 2", key=certs.generate_key(), issuer=pki.root)
    broker.register_ca(ops_ca.cert, role=Role.OPERATOR)
    operator = pki.identity("otto", issuer=ops_ca)
    dev = connect(broker.port, pki, pki.device("remote-victim-2"))
    dev.close()
    assert dev.rc == 0
    top = ["--broker", f"127.0.0.1:{broker.port}", "--cert", str(operator.cert_path)]
    top += ["--key", str(operator.key_path), "--ca", str(pki.layout.root_cert)]
    cli = [sys.executable, "-m", "jitp.cli"]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [*cli, *top, "devices", "quarantine", "remote-victim-2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr
    assert [str(r.status) for r in broker.devices()] == ["quarantined"]
    assert "operator:otto" in {e.draft.actor for e in broker.audit() if e.draft.action == "admin-command"}
    alone = subprocess.run(
        [*cli, "--cert", str(operator.cert_path), "devices", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    assert alone.returncode == 2 and "give --broker HOST:PORT too" in alone.stderr


def test_remote_mode_runs_every_operation_of_the_table(broker: BrokerThread, pki: Pki) -> None:
    """Remote mode follows jitp.app.operations: what the local CLI can do with a shared command, it can
    do through the broker (these three answered "not available with --broker" before)."""
    admins = certs.make_ca("remote admins CA", key=certs.generate_key(), issuer=pki.root)
    broker.register_ca(admins.cert, role=Role.ADMIN)
    adm = pki.identity("ada", issuer=admins)
    device = pki.device("remote-erased")
    dev = connect(broker.port, pki, device)
    dev.close()
    assert dev.rc == 0

    erased = remote(broker, pki, adm, "devices", "erase", "--cert", str(device.cert_path))
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout) == {"device_id": "remote-erased"}
    assert broker.devices() == []
    [entry] = [e.draft for e in broker.audit() if e.draft.action == "erased"]
    assert entry.actor == "admin:ada"

    status = remote(broker, pki, adm, "keys", "status")
    assert status.returncode == 0, status.stderr
    assert set(json.loads(status.stdout)) == {"primary", "wrapped", "pending"}

    table = remote(broker, pki, adm, "audit", "export", "--format", "csv")
    assert table.returncode == 0, table.stderr
    rows = list(csv.reader(io.StringIO(table.stdout)))
    assert rows[0][:4] == ["seq", "at", "action", "actor"]
    assert "erased" in {r[2] for r in rows[1:]}
