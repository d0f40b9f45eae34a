"""The CLI reads certificate and CRL files with a size cap, and refuses bundles it would cut short.

Issue 12, finding 11: `jitp ca register /dev/zero` read until 24 GB, and a PEM bundle was
registered as its first certificate alone, silently. Real processes, real files.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import certs
from jitp import cli
from tests.helpers import Pki

JITP = [sys.executable, "-m", "jitp.cli"]
ROOT = Path(__file__).resolve().parent.parent
MEMORY_CAP = 2 * 1024**3  # so that a CLI reading without limit dies of MemoryError, not the test host


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def jitp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JITP, *args], cwd=cwd, capture_output=True, text=True, timeout=60, preexec_fn=_cap_memory
    )


def registered(cwd: Path) -> list[str]:
    proc = jitp("ca", "list", "--json", "--data-dir", "d", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return [a["ca_id"] for a in json.loads(proc.stdout)]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jitp: error: "), proc.stderr[-2000:]
    return lines[0]


REMOTE = ["--broker", "127.0.0.1:1", "--cert", "x.pem", "--key", "x.key", "--ca", "ca.pem"]


@pytest.mark.parametrize(
    ("args", "limit"),
    [
        (("ca", "register", "/dev/zero", "--data-dir", "d"), "1 MiB"),
        ((*REMOTE, "ca", "register", "/dev/zero"), "1 MiB"),  # refused before any connection
        (("ca", "crl", "f" * 64, "/dev/zero", "--data-dir", "d"), "16 MiB"),
        (("devices", "erase", "--cert", "/dev/zero", "--data-dir", "d"), "1 MiB"),
    ],
    ids=["ca-register", "remote-ca-register", "ca-crl", "devices-erase"],
)
def test_an_endless_file_is_refused_at_once(tmp_path: Path, args: tuple[str, ...], limit: str) -> None:
    line = one_line_error(jitp(*args, cwd=tmp_path))
    assert "/dev/zero is larger than " + limit in line, line


@pytest.mark.parametrize("option", ["--cert", "--key", "--ca"])
def test_remote_mode_reads_its_own_certificate_with_the_cap(tmp_path: Path, option: str) -> None:
    """`jitp --broker ... --cert /dev/zero`: the client certificate (and key, and broker CA) were read
    without a cap; now they are refused at once, before any connection."""
    for name in ("x.pem", "x.key", "ca.pem"):  # the other two files are read (small) before it
        (tmp_path / name).write_text("small\n")
    remote = list(REMOTE)
    remote[remote.index(option) + 1] = "/dev/zero"
    line = one_line_error(jitp(*remote, "devices", "list", cwd=tmp_path))
    assert "/dev/zero is larger than 1 MiB" in line, line


def test_a_certificate_padded_past_the_cap_is_refused(tmp_path: Path, pki: Pki) -> None:
    """A valid CA certificate followed by 2 MiB of text: it was registered; now the file is refused
    before it is parsed, and nothing is registered."""
    padded = tmp_path / "padded.pem"
    padded.write_bytes(pki.manufacturer.cert.public_bytes(Encoding.PEM) + b"# padding\n" * 200_000)
    line = one_line_error(jitp("ca", "register", str(padded), "--data-dir", "d", cwd=tmp_path))
    assert "larger than 1 MiB" in line, line
    assert registered(tmp_path) == []


def test_a_bundle_is_refused_and_each_certificate_registers_alone(tmp_path: Path, pki: Pki) -> None:
    cas = [pki.manufacturer, pki.service_ca, certs.make_ca("bundle CA", key=certs.generate_key())]
    bundle = tmp_path / "bundle.pem"
    certs.write_certs(bundle, [ca.cert for ca in cas])
    line = one_line_error(jitp("ca", "register", str(bundle), "--data-dir", "d", cwd=tmp_path))
    assert "holds 3 certificates" in line and "register each separately" in line, line
    assert registered(tmp_path) == []
    remote = one_line_error(jitp(*REMOTE, "ca", "register", str(bundle), cwd=tmp_path))
    assert "holds 3 certificates" in remote, remote

    ids = []
    for i, ca in enumerate(cas):
        single = tmp_path / f"ca{i}.der"  # DER holds one certificate by construction
        single.write_bytes(ca.cert.public_bytes(Encoding.DER))
        proc = jitp("ca", "register", str(single), "--data-dir", "d", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        ids.append(proc.stdout.strip())
    assert ids == [certs.fingerprint(ca.cert) for ca in cas]
    assert sorted(registered(tmp_path)) == sorted(ids)


def test_templates_test_refuses_a_ca_bundle(tmp_path: Path, pki: Pki) -> None:
    """`templates test --ca` reads a CA certificate the same way (from the project root, where the
    default config names the shipped templates)."""
    bundle = tmp_path / "bundle.pem"
    certs.write_certs(bundle, [pki.manufacturer.cert, pki.root.cert])
    leaf = pki.device("bundle-probe")
    args = ("templates", "test", "smart-meter", "--cert", str(leaf.cert_path), "--ca", str(bundle))
    line = one_line_error(jitp(*args, "--data-dir", str(tmp_path / "d"), cwd=ROOT))
    assert "holds 2 certificates" in line, line
    zero = one_line_error(jitp("templates", "test", "smart-meter", "--cert", "/dev/zero", cwd=ROOT))
    assert "/dev/zero is larger than 1 MiB" in zero, zero


def test_erase_by_certificate_takes_a_chain_but_not_two_devices(tmp_path: Path, pki: Pki) -> None:
    one, two = pki.device("erase-bundle-1"), pki.device("erase-bundle-2")
    both = tmp_path / "two-devices.pem"
    certs.write_certs(both, [one.cert, two.cert, pki.manufacturer.cert])
    line = one_line_error(jitp("devices", "erase", "--cert", str(both), "--data-dir", "d", cwd=tmp_path))
    assert "holds 2 end-entity certificates" in line, line
    assert cli._load_leaf(one.cert_path) == one.cert  # leaf, manufacturer CA, root: one device
