"""``jitp keys`` and the broker's refusal to start without the right master key (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jitp.crypto.keys import DEFAULT_ENV, MasterKey, parse_tokens, read_key_file
from tests.helpers import Pki

JITP = [sys.executable, "-m", "jitp.cli"]


def run(
    *args: str, cwd: Path, key: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """The CLI with ``key`` as $JITP_MASTER_KEY, or with the variable unset (then the key file counts)."""
    env = {k: v for k, v in os.environ.items() if k != DEFAULT_ENV}
    if key is not None:
        env[DEFAULT_ENV] = key
    return subprocess.run([*JITP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def serve(data: Path, pki: Pki, *, cwd: Path, key: str | None = None) -> subprocess.CompletedProcess[str]:
    return run(
        "serve",
        "--data-dir",
        str(data),
        "--bind",
        "127.0.0.1:0",
        "--server-cert",
        str(pki.layout.server_cert),
        "--server-key",
        str(pki.layout.server_key),
        cwd=cwd,
        key=key,
    )


def test_the_broker_refuses_to_start_without_its_master_key(tmp_path: Path, pki: Pki) -> None:
    data = tmp_path / "data"
    missing = serve(data, pki, cwd=tmp_path)
    assert missing.returncode == 2
    assert "no master key file here: create one with `jitp keys init`" in missing.stderr
    assert not data.exists()  # it did not start unencrypted, nor create anything

    made = run("keys", "init", "--data-dir", str(data), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    key_file = tmp_path / "data-keys" / "master.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    (kid,) = [k.kid for k in read_key_file(key_file)]
    assert kid in made.stdout and read_key_file(key_file)[0].token() not in made.stdout + made.stderr
    assert (
        run(
            "ca", "register", str(pki.layout.manufacturer_cert), "--data-dir", str(data), cwd=tmp_path
        ).returncode
        == 0
    )

    wrong = MasterKey.generate()
    refused = serve(data, pki, cwd=tmp_path, key=wrong.token())
    assert refused.returncode == 2
    assert f"wrong master key: this registry's data keys are wrapped under {kid}" in refused.stderr
    assert wrong.kid in refused.stderr and wrong.token() not in refused.stderr

    key_file.chmod(0o644)
    exposed = serve(data, pki, cwd=tmp_path)
    assert exposed.returncode == 2 and "accessible by others (mode 0644)" in exposed.stderr


def test_keys_init_never_overwrites_and_generate_prints_a_usable_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run("keys", "init", "--data-dir", str(data), cwd=tmp_path).returncode == 0
    key_file = tmp_path / "data-keys" / "master.key"
    before = key_file.read_bytes()
    again = run("keys", "init", "--data-dir", str(data), cwd=tmp_path)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert key_file.read_bytes() == before

    generated = run("keys", "generate", cwd=tmp_path)
    (key,) = parse_tokens(generated.stdout, where="stdout")
    assert key.kid in generated.stderr
    # A key from `generate` in the environment opens a registry, as the key file does.
    other = tmp_path / "other"
    listed = run("devices", "list", "--data-dir", str(other), cwd=tmp_path, key=generated.stdout.strip())
    assert listed.returncode == 0 and "0 device(s)" in listed.stdout
    status = run("keys", "status", "--data-dir", str(other), cwd=tmp_path, key=generated.stdout.strip())
    assert f"primary  {key.kid}" in status.stdout and f"${DEFAULT_ENV}" in status.stdout
