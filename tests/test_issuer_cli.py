"""`jitp issuer ...` and `jitp certificates expiring` as an operator runs them (subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509

import certs
from tests.test_cli import jitp


def test_issuer_init_status_crl_import_and_expiring(tmp_path: Path) -> None:
    out = jitp("issuer", "init", "--validity", "90d", "--data-dir", "d", cwd=tmp_path).stdout
    ca_id = out.split()[2]
    status = json.loads(jitp("issuer", "status", "--json", "--data-dir", "d", cwd=tmp_path).stdout)
    assert status["ca_id"] == ca_id and status["expired"] is False
    assert status["certificates"] == {"pending": 0, "current": 0, "superseded": 0, "expired": 0, "revoked": 0}
    # Registered as a device trust anchor.
    anchors = json.loads(jitp("ca", "list", "--json", "--data-dir", "d", cwd=tmp_path).stdout)
    assert [a["role"] for a in anchors if a["ca_id"] == ca_id] == ["device"]
    # A second init is refused (nothing changed) unless --replace.
    again = jitp("issuer", "init", "--data-dir", "d", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "--replace" in again.stderr
    # The CRL is signed by the issuer.
    jitp("issuer", "crl", "--out", "crl.pem", "--data-dir", "d", cwd=tmp_path)
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert len(crl) == 0
    assert (
        jitp(
            "certificates", "expiring", "--within", "7d", "--json", "--data-dir", "d", cwd=tmp_path
        ).stdout.strip()
        == "[]"
    )
    # Import an existing CA; a key that is not the certificate's is refused.
    ca = certs.make_ca("imported issuing CA", key=certs.generate_key("ec"))
    certs.write_certs(tmp_path / "ca.pem", [ca.cert])
    certs.write_key(tmp_path / "ca.key", ca.key)
    certs.write_key(tmp_path / "other.key", certs.generate_key("ec"))
    bad = jitp("issuer", "import", "ca.pem", "other.key", "--data-dir", "d", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "does not belong" in bad.stderr
    out = jitp("issuer", "import", "ca.pem", "ca.key", "--data-dir", "d", cwd=tmp_path).stdout
    status = json.loads(jitp("issuer", "status", "--json", "--data-dir", "d", cwd=tmp_path).stdout)
    assert status["subject"].endswith("CN=imported issuing CA") and status["ca_id"] in out
    # The key is nowhere on disk in clear: not in the data dir or the keyring, only wrapped.
    secret = ca.key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".key"]
    assert files and all(secret not in p.read_bytes() for p in files)
