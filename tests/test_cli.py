"""The jitp CLI as a user runs it: real processes, real files, a real broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.helpers import Pki, connect, wait_until

JITP = [sys.executable, "-m", "jitp.cli"]


def jitp(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*JITP, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"jitp {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pki_init_and_issue(tmp_path: Path) -> None:
    out = jitp("pki", "init", "--dir", "pki", cwd=tmp_path).stdout
    assert "manufacturer-ca.pem" in out
    for key in ("root-ca.key", "manufacturer-ca.key", "service-ca.key", "broker.key", "service-client.key"):
        assert stat.S_IMODE((tmp_path / "pki" / key).stat().st_mode) == 0o600
    again = jitp("pki", "init", "--dir", "pki", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "exists" in again.stderr
    jitp("pki", "issue", "--dir", "pki", "--count", "3", "--out", "devs", "--prefix", "pump-", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "devs").glob("*.pem")) == [
        "pump-00001.pem",
        "pump-00002.pem",
        "pump-00003.pem",
    ]
    assert stat.S_IMODE((tmp_path / "devs" / "pump-00001.key").stat().st_mode) == 0o600
    bad = jitp("pki", "issue", "--dir", "nowhere", "--count", "3", "--out", "x", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "jitp pki init" in bad.stderr


def test_ca_register_list_disable(tmp_path: Path, pki: Pki) -> None:
    ca_id = jitp(
        "ca", "register", str(pki.layout.manufacturer_cert), "--data-dir", "d", "--region", "eu", cwd=tmp_path
    ).stdout.strip()
    assert len(ca_id) == 64
    listed = json.loads(jitp("ca", "list", "--json", "--data-dir", "d", cwd=tmp_path).stdout)
    assert [(a["ca_id"], a["role"], a["region"], a["enabled"]) for a in listed] == [
        (ca_id, "device", "eu", True)
    ]
    jitp("ca", "disable", ca_id, "--data-dir", "d", cwd=tmp_path)
    assert (
        json.loads(jitp("ca", "list", "--json", "--data-dir", "d", cwd=tmp_path).stdout)[0]["enabled"]
        is False
    )
    unknown = jitp("ca", "disable", "f" * 64, "--data-dir", "d", cwd=tmp_path, check=False)
    assert unknown.returncode == 2 and "no CA" in unknown.stderr
    leaf = tmp_path / "leaf.pem"  # the leaf alone: its chain file would be refused as a bundle
    leaf.write_bytes(pki.device("not-a-ca").cert.public_bytes(Encoding.PEM))
    refused = jitp("ca", "register", str(leaf), "--data-dir", "d", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "not a CA certificate" in refused.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    assert jitp("ca", "register", str(garbage), "--data-dir", "d", cwd=tmp_path, check=False).returncode == 2
    assert "intact: 2 entries" in jitp("audit", "verify", "--data-dir", "d", cwd=tmp_path).stdout
    actions = [
        json.loads(line)["action"]
        for line in jitp("audit", "export", "--data-dir", "d", cwd=tmp_path).stdout.splitlines()
    ]
    assert actions == ["ca-registered", "ca-disabled"]


def test_serve_provisions_then_stops_cleanly_on_sigterm(tmp_path: Path, pki: Pki) -> None:
    jitp("ca", "register", str(pki.layout.manufacturer_cert), "--data-dir", "d", cwd=tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            *JITP,
            "serve",
            "--data-dir",
            "d",
            "--bind",
            f"127.0.0.1:{port}",
            "--server-cert",
            str(pki.layout.server_cert),
            "--server-key",
            str(pki.layout.server_key),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert wait_until(lambda: _accepts(port, proc), 20, interval=0.1), "jitp serve is not listening"
        dev = pki.device("cli-dev")
        conn = connect(port, pki, dev)
        conn.close()
        assert conn.rc == 0
        # The CLI sees the record while the broker runs (shared SQLite, WAL).
        shown = json.loads(
            jitp("devices", "show", "cli-dev", "--json", "--data-dir", "d", cwd=tmp_path).stdout
        )
        assert shown["device_id"] == "cli-dev"
        assert shown["cert_fingerprint"] == dev.fingerprint
        for key in ("status", "ca_id", "region", "serial", "not_after", "provisioned_at", "last_seen"):
            assert shown[key]
        listed = json.loads(jitp("devices", "list", "--json", "--data-dir", "d", cwd=tmp_path).stdout)
        assert [r["device_id"] for r in listed] == ["cli-dev"]
        missing = jitp("devices", "show", "ghost", "--data-dir", "d", cwd=tmp_path, check=False)
        assert missing.returncode == 2 and "no device" in missing.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    assert code == 0


def _accepts(port: int, proc: subprocess.Popen[bytes]) -> bool:
    """True once the server accepts a TCP connection on ``port``; fails at once if it has exited."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        return False
    return True


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--bind", "nonsense"], "HOST:PORT"), (["--server-cert", "/nonexistent.pem"], "no such file")],
)
def test_serve_bad_settings_fail_clearly(tmp_path: Path, pki: Pki, args: list[str], message: str) -> None:
    base = [
        "serve",
        "--data-dir",
        "d",
        "--server-cert",
        str(pki.layout.server_cert),
        "--server-key",
        str(pki.layout.server_key),
        "--bind",
        f"127.0.0.1:{free_port()}",
    ]
    proc = jitp(*base, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_serve_rejects_unknown_config_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("listener:\n  bind: 127.0.0.1:0\n  typo_key: 1\n")
    proc = jitp("serve", "--config", str(cfg), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "typo_key" in proc.stderr and "bad.yaml:3" in proc.stderr
