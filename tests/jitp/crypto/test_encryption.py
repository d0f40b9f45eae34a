"""Encryption at rest of the embedded registry: what is on disk, wrong keys, rotation, shredding.

Real SQLite files, real AES-GCM, real certificates (tests.jitp.pkitools). The raw-byte scans read
every file the registry and its keyring wrote (database, WAL, shared memory).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.x509.oid import NameOID

from jitp import errors
from jitp.app.service import PeerCredentials, ProvisioningService
from jitp.crypto.keyrotation import rotate_keys
from jitp.crypto.keys import (
    DEFAULT_ENV,
    FileKeyProvider,
    LocalKeys,
    MasterKey,
    init_key_file,
    parse_tokens,
    read_key_file,
    write_key_file,
)
from jitp.domain.audit import AuditDraft, verify_chain
from jitp.domain.records import Command
from jitp.registry.sqlite import MIGRATIONS, SQLiteRegistry
from tests.jitp import pkitools as pt
from tests.jitp.registry.test_registry_contract import T0, draft, identity

T = TypeVar("T")
PEER = "198.51.100.77:40001"
ORG = "Zyxwv Unique Meters Ltd"
LOCALITY = "Quixotic-Lane-42"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def raw_bytes(*dirs: Path) -> bytes:
    """Everything on disk in these directories, concatenated."""
    return b"".join(p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file())


def _clock() -> datetime:
    return datetime.now(UTC)


def make(tmp: Path, keys: Any, **kw: Any) -> SQLiteRegistry:
    return SQLiteRegistry(tmp / "data" / "registry.db", keys=keys, batch_window=0, **kw)


async def with_registry(
    registry: SQLiteRegistry, body: Callable[[SQLiteRegistry], Coroutine[Any, Any, T]]
) -> T:
    await registry.open()
    try:
        return await body(registry)
    finally:
        await registry.close()


def a_device(cn: str) -> tuple[Any, PeerCredentials]:
    cert = pt.leaf(
        pt.name(
            (NameOID.COMMON_NAME, cn), (NameOID.ORGANIZATION_NAME, ORG), (NameOID.LOCALITY_NAME, LOCALITY)
        )
    )
    return cert, PeerCredentials(chain_der=tuple(pt.chain_of(cert)), client_id=cn, address=PEER)


# -- what is on disk ------------------------------------------------------------------------------
def test_the_files_hold_no_subject_certificate_serial_attribute_or_peer_in_clear(tmp_path: Path) -> None:
    keys = LocalKeys([MasterKey.generate()])
    cert, peer = a_device("meter-7f3a")
    fingerprint = pt.der(cert)

    async def body(registry: SQLiteRegistry) -> Any:
        service = ProvisioningService(registry)
        await registry.register_anchor(pt.MANUFACTURER_ANCHOR, audit=draft("ca-registered"))
        await service.refresh_trust()
        admitted = await service.admit(peer)
        assert admitted.created and admitted.record is not None
        await service.apply(Command.QUARANTINE, "meter-7f3a", actor="op")
        await registry.provision(
            identity("rich-1", attributes={"location": LOCALITY, "owner": "Jane Q. Example"}),
            at=T0,
            peer=PEER,
        )
        record = await registry.get_device("meter-7f3a")
        assert record is not None and ORG in record.subject  # it is all there, decrypted, for the API
        return record

    record = _run(with_registry(make(tmp_path, keys), body))
    on_disk = raw_bytes(tmp_path / "data", tmp_path / "data-keys")
    # The scan sees what is in clear: the device id is (documented), and its region.
    assert b"meter-7f3a" in on_disk and b"eu-west" in on_disk
    for secret in (
        record.subject.encode(),
        ORG.encode(),
        LOCALITY.encode(),
        b"Jane Q. Example",
        record.serial.encode(),
        record.cert_fingerprint.encode(),
        bytes.fromhex(record.cert_fingerprint),
        fingerprint,  # the certificate's DER
        fingerprint[-64:],  # and any run of it (here: part of the signature)
        PEER.split(":")[0].encode(),
    ):
        assert secret not in on_disk, secret[:40]


def test_a_sealed_record_moved_to_another_row_does_not_decrypt(tmp_path: Path) -> None:
    keys = LocalKeys([MasterKey.generate()])

    async def setup(registry: SQLiteRegistry) -> None:
        await registry.provision(identity("a"), at=T0, peer=None)
        await registry.provision(identity("b"), at=T0, peer=None)

    _run(with_registry(make(tmp_path, keys), setup))
    with sqlite3.connect(tmp_path / "data" / "registry.db") as db:
        sealed_b = db.execute("SELECT sealed FROM devices WHERE device_id = 'b'").fetchone()[0]
        db.execute("UPDATE devices SET sealed = ? WHERE device_id = 'a'", (sealed_b,))

    async def read(registry: SQLiteRegistry) -> None:
        with pytest.raises(errors.RegistryUnavailable, match="does not decrypt"):
            await registry.get_device("a")
        assert (await registry.get_device("b")) is not None

    _run(with_registry(make(tmp_path, keys), read))


# -- the master key --------------------------------------------------------------------------------
def test_a_wrong_or_missing_master_key_or_keyring_is_refused(tmp_path: Path) -> None:
    right, wrong = MasterKey.generate(), MasterKey.generate()

    async def setup(registry: SQLiteRegistry) -> None:
        await registry.provision(identity("d1"), at=T0, peer=None)

    _run(with_registry(make(tmp_path, LocalKeys([right])), setup))

    with pytest.raises(
        errors.MasterKeyMismatch, match=f"wrapped under {right.kid}.*holds {wrong.kid}"
    ) as exc:
        _run(make(tmp_path, LocalKeys([wrong])).open())
    assert exc.value.kid == right.kid and right.token() not in str(exc.value)

    with pytest.raises(errors.MasterKeyMissing, match="jitp keys init"):
        FileKeyProvider(tmp_path / "nowhere.key")

    keyring = tmp_path / "data-keys" / "keyring.db"
    shutil.move(keyring, tmp_path / "keyring.away")
    with pytest.raises(errors.MasterKeyMismatch, match="is missing or belongs to another registry"):
        _run(make(tmp_path, LocalKeys([right])).open())
    shutil.move(tmp_path / "keyring.away", keyring)

    async def still_fine(registry: SQLiteRegistry) -> None:
        assert [d.device_id for d in await registry.list_devices()] == ["d1"]

    _run(with_registry(make(tmp_path, LocalKeys([right])), still_fine))


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "master.key"
    key = init_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_key_file(path) == [key]
    with pytest.raises(errors.MasterKeyInvalid, match="never overwritten"):
        init_key_file(path)
    assert read_key_file(path) == [key]
    path.chmod(0o640)
    with pytest.raises(errors.MasterKeyInvalid, match="mode 0640"):
        read_key_file(path)
    path.chmod(0o600)
    other = MasterKey.generate()
    write_key_file(path, [other, key])
    assert [k.kid for k in read_key_file(path)] == [other.kid, key.kid]
    assert path.stat().st_mode & 0o777 == 0o600
    for bad, problem in (
        ("jitp-mk-v2:AAAA", "must start with"),
        ("jitp-mk-v1:not base64!", "not valid base64"),
        ("jitp-mk-v1:AAAA", "must be 32 bytes"),
        (f"{key.token()},{key.token()}", "listed twice"),
    ):
        with pytest.raises(errors.MasterKeyInvalid, match=problem) as exc:
            parse_tokens(bad, where="$X")
        assert "AAAA" not in str(exc.value) and key.token() not in str(exc.value)
    assert parse_tokens(f" {other.token()} , {key.token()}\n", where="$X") == [other, key]


# -- rotation ----------------------------------------------------------------------------------------
def test_rotation_interrupted_then_resumed_while_another_instance_serves(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    old = init_key_file(key_file)

    async def body() -> None:
        broker = make(tmp_path, FileKeyProvider(key_file))  # the serving node, with its own provider
        await broker.open()
        try:
            for i in range(7):
                await broker.provision(identity(f"dev-{i}"), at=T0, peer=PEER)
            operator = make(tmp_path, FileKeyProvider(key_file))
            await operator.open()
            try:
                report = await rotate_keys(
                    operator,
                    FileKeyProvider(key_file),
                    key_file=key_file,
                    actor="op",
                    clock=_clock,
                    batch=3,
                    max_batches=1,
                )
                assert not report.complete and report.rewrapped == 3
                new = read_key_file(key_file)[0]
                assert report.primary == new.kid and report.previous == (old.kid,)
                assert [k.kid for k in read_key_file(key_file)] == [new.kid, old.kid]  # both, mid-way
                status = await operator.keyring_status()
                assert status.primary == new.kid and status.pending > 0
                # The serving node keeps working mid-rotation: it reads keys wrapped either way and
                # wraps a new device's key under the new primary (it reloads the key file for it).
                assert len(await broker.list_devices()) == 7
                await broker.provision(identity("dev-new"), at=T0, peer=PEER)
                report = await rotate_keys(
                    operator, FileKeyProvider(key_file), key_file=key_file, actor="op", clock=_clock, batch=3
                )
                assert report.complete and report.retired and report.primary == new.kid
                assert read_key_file(key_file) == [new]
                assert (await operator.keyring_status()).pending == 0
                assert len(await broker.list_devices()) == 8
                actions = [e.draft.action for e in await operator.audit_entries()]
                assert actions.count("key-rotation-started") == 1 and actions[-1] == "key-rotation-finished"
            finally:
                await operator.close()
        finally:
            await broker.close()
        # Afterwards the new key alone opens everything; the old one alone opens nothing.
        fresh = make(tmp_path, FileKeyProvider(key_file))
        await fresh.open()
        try:
            assert len(await fresh.list_devices()) == 8
            entries = await fresh.audit_entries()
            assert verify_chain(entries) == []
            resolved = await fresh.resolve_audit(entries)
            assert {e.draft.device_id for e in resolved if e.draft.action == "provisioned"} == {
                *(f"dev-{i}" for i in range(7)),
                "dev-new",
            }
        finally:
            await fresh.close()
        with pytest.raises(errors.MasterKeyMismatch):
            await make(tmp_path, LocalKeys([old])).open()

    _run(body())


def test_cli_rotation_stopped_half_way_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != DEFAULT_ENV}
    jitp = [sys.executable, "-m", "jitp.cli"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*jitp, *args, "--data-dir", str(data)], env=env, capture_output=True, text=True, timeout=60
        )

    assert "jitp keys init" in cli("devices", "list").stderr  # no key: nothing opens, nothing is created
    assert not (data / "registry.db").exists()
    created = cli("keys", "init")
    assert created.returncode == 0, created.stderr
    key_file = tmp_path / "data-keys" / "master.key"
    first = read_key_file(key_file)[0]

    async def populate() -> None:
        registry = SQLiteRegistry(data / "registry.db", keys=FileKeyProvider(key_file), batch_window=0)
        await registry.open()
        try:
            for i in range(5):
                await registry.provision(identity(f"c-{i}"), at=T0, peer=None)
        finally:
            await registry.close()

    _run(populate())
    stopped = cli("keys", "rotate", "--batch", "2", "--max-batches", "1")
    assert stopped.returncode == 1 and "run again to finish" in stopped.stdout
    status = cli("keys", "status")
    assert "rotation unfinished" in status.stdout and first.kid in status.stdout
    done = cli("keys", "rotate", "--batch", "2")
    assert done.returncode == 0 and "done: every key is wrapped under" in done.stdout, (
        done.stdout + done.stderr
    )
    assert f"retired {first.kid}" in done.stdout
    assert cli("devices", "list").stdout.count("c-") == 5
    assert cli("audit", "verify").returncode == 0


# -- erasure --------------------------------------------------------------------------------------------
def test_erase_makes_an_old_copy_of_the_database_unreadable_for_that_device(tmp_path: Path) -> None:
    keys = LocalKeys([MasterKey.generate()])
    backup = tmp_path / "backup"

    async def before(registry: SQLiteRegistry) -> None:
        await registry.provision(identity("gone", subject=f"CN=gone,O={ORG}"), at=T0, peer=PEER)
        await registry.provision(identity("kept"), at=T0, peer=PEER)
        await registry.append_audit(
            [AuditDraft(at=T0, action="note", actor="op", device_id="gone", peer=PEER)]
        )
        await registry.checkpoint()
        backup.mkdir()
        shutil.copy(registry.path, backup / "registry.db")  # a backup of the registry (not of the keys)

    async def erase(registry: SQLiteRegistry) -> None:
        await registry.erase(device_id="gone", at=T0 + timedelta(days=1), actor="op")

    _run(with_registry(make(tmp_path, keys), before))
    assert ORG.encode() not in (backup / "registry.db").read_bytes()  # sealed in the backup too
    _run(with_registry(make(tmp_path, keys), erase))

    async def read_backup(registry: SQLiteRegistry) -> None:
        # The backup still has the sealed row, but its data key is gone from the keyring for good.
        assert await registry.get_device("gone") is None
        assert [d.device_id for d in await registry.list_devices()] == ["kept"]
        assert {e.device_id for e in await registry.events()} == {"kept"}
        resolved = await registry.resolve_audit(await registry.audit_entries())
        assert "gone" not in {e.draft.device_id for e in resolved}
        assert "kept" in {e.draft.device_id for e in resolved}

    with sqlite3.connect(backup / "registry.db") as db:
        assert db.execute("SELECT COUNT(*) FROM devices WHERE device_id = 'gone'").fetchone()[0] == 1
    registry = SQLiteRegistry(
        backup / "registry.db", keys=keys, keyring=tmp_path / "data-keys" / "keyring.db", batch_window=0
    )
    _run(with_registry(registry, read_backup))
    assert b"gone" not in raw_bytes(tmp_path / "data-keys")  # not even the id stays in the keyring


# -- upgrading a database written before encryption at rest ----------------------------------------
def test_a_version_2_database_is_sealed_on_open_and_keeps_its_audit_links(tmp_path: Path) -> None:
    path = tmp_path / "data" / "registry.db"
    path.parent.mkdir()
    audit_key = os.urandom(32)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
        for version, sql in enumerate(MIGRATIONS[:2], start=1):
            db.executescript(sql)
            db.execute("INSERT INTO schema_migrations VALUES (?, '2026-01-01')", (version,))
        db.execute(
            "INSERT INTO devices (device_id, status, cert_fingerprint, ca_id, region, serial, subject, not_after, "
            "provisioned_at, attributes, template, template_version, config) VALUES ('old-1', 'active', 'ab12', "
            f"'ca', 'eu', '77aa', 'CN=old-1,O={ORG}', '2030-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00', "
            "'{\"location\": \"Lyon\"}', NULL, NULL, '{}')"
        )
        db.execute("INSERT INTO device_keys VALUES ('old-1', ?)", (audit_key,))
        db.execute("INSERT INTO cert_history VALUES ('old-1', 'ffee', '2026-01-01T00:00:00+00:00')")
        payload = b'{"device_id":"old-1","serial":"77aa"}'
        db.execute(
            "INSERT INTO outbox (event_id, type, device_id, occurred_at, payload) VALUES "
            "('e1', 'provisioned', 'old-1', '2026-01-01T00:00:00+00:00', ?)",
            (payload,),
        )
    keys = LocalKeys([MasterKey.generate()])

    async def body(registry: SQLiteRegistry) -> None:
        record = await registry.get_device("old-1")
        assert record is not None
        assert (record.subject, record.serial, record.cert_fingerprint) == (
            f"CN=old-1,O={ORG}",
            "77aa",
            "ab12",
        )
        assert dict(record.attributes) == {"location": "Lyon"}
        assert (await registry.find_by_fingerprint("ab12")) == record
        assert [e.payload for e in await registry.events("old-1")] == [payload]
        # A superseded certificate stays superseded.
        with pytest.raises(errors.IdentityConflict, match="superseded"):
            await registry.provision(
                identity("old-1", cert_fingerprint="ffee", ca_id="ca", region="eu"),
                at=T0,
                peer=None,
                policy="rotate",
            )
        # Its audit key became its data key: entries written before the upgrade still resolve.
        from jitp.crypto import privacy

        await registry.append_audit([AuditDraft(at=T0, action="note", actor="op", device_id="old-1")])
        entries = await registry.audit_entries()
        assert entries[-1].draft.device_id == privacy.device_ref(audit_key, "old-1")

    _run(with_registry(make(tmp_path, keys), body))
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not {"devices_v2", "cert_history_v2", "device_keys_v2"} & tables
    assert ORG.encode() not in raw_bytes(tmp_path / "data") and b"Lyon" not in raw_bytes(tmp_path / "data")


# -- review fixes: failure modes -------------------------------------------------------------------
def test_a_key_the_instance_lacks_fails_those_joins_and_the_writer_keeps_serving(tmp_path: Path) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()

    async def body() -> None:
        broker = make(tmp_path, LocalKeys([old]))
        await broker.open()
        try:
            await broker.provision(identity("known"), at=T0, peer=None)
            operator = make(tmp_path, LocalKeys([new, old]))
            await operator.open()
            try:
                await operator.set_primary_key(new.kid, audit=draft("key-rotation-started"))
            finally:
                await operator.close()
            # This node cannot wrap under the new primary: the join is refused as unavailable (CONNACK 3),
            # promptly, and the writer lives on for everything else.
            with pytest.raises(errors.RegistryUnavailable, match=new.kid):
                await asyncio.wait_for(broker.provision(identity("fresh"), at=T0, peer=None), 10)
            again = await asyncio.wait_for(broker.provision(identity("known"), at=T0, peer=None), 10)
            assert not again.created
        finally:
            await broker.close()

    _run(body())


def test_a_restored_backup_holding_an_erased_device_does_not_stop_provisioning(tmp_path: Path) -> None:
    keys = LocalKeys([MasterKey.generate()])
    db = tmp_path / "data" / "registry.db"
    saved = tmp_path / "saved.db"

    async def before(registry: SQLiteRegistry) -> None:
        await registry.provision(identity("x"), at=T0, peer=None)
        await registry.checkpoint()
        shutil.copy(db, saved)
        await registry.erase(device_id="x", at=T0, actor="op")

    _run(with_registry(make(tmp_path, keys), before))
    shutil.copy(saved, db)  # the registry restored from the backup; the keyring is the current one

    async def after(registry: SQLiteRegistry) -> None:
        assert await registry.get_device("x") is None  # shredded
        outcome = await asyncio.wait_for(registry.provision(identity("x", cert="2"), at=T0, peer=None), 10)
        assert outcome.created  # the unreadable leftovers made way for it
        record = await registry.get_device("x")
        assert record is not None and record.cert_fingerprint == identity("x", cert="2").cert_fingerprint
        assert [e.type for e in await registry.events("x")] == ["provisioned"]

    _run(with_registry(make(tmp_path, keys), after))


def test_nothing_new_is_sealed_under_the_key_of_a_device_being_erased(tmp_path: Path) -> None:
    """Another process erases the device between this node's key check and its write (key marked,
    rows deleted, key not yet deleted): the first join of a new certificate for that id must not be
    sealed under the doomed key, or that key would outlive the erasure."""
    keys = LocalKeys([MasterKey.generate()])
    db_path, ring = tmp_path / "data" / "registry.db", tmp_path / "data-keys" / "keyring.db"

    def other_process(sql: str) -> None:
        with sqlite3.connect(db_path) as other:
            other.execute("ATTACH DATABASE ? AS keyring", (str(ring),))
            other.executescript(sql)

    class Interleaved(SQLiteRegistry):
        """Runs the other process's erasure steps right after this node checked its keys."""

        between: str | None = None

        async def _ensure_keys(self, wanted: dict[str, list[str]]) -> None:
            await super()._ensure_keys(wanted)
            if self.between is not None:
                other_process(self.between)
                self.between = None

    async def body() -> None:
        registry = Interleaved(db_path, keys=keys, batch_window=0)
        await registry.open()
        try:
            await registry.provision(identity("y"), at=T0, peer=None)
            registry.between = (
                "UPDATE keyring.data_keys SET erasing = 1 WHERE device_id = 'y';"
                "DELETE FROM outbox WHERE device_id = 'y'; DELETE FROM devices WHERE device_id = 'y';"
            )
            with pytest.raises(errors.RegistryUnavailable, match="being erased"):
                await registry.provision(identity("y", cert="2"), at=T0, peer=None)
            assert await registry.get_device("y") is None
            other_process(
                "DELETE FROM keyring.data_keys WHERE device_id = 'y' AND erasing = 1"
            )  # its last step
            outcome = await registry.provision(identity("y", cert="2"), at=T0, peer=None)
            assert outcome.created and (await registry.get_device("y")) is not None
        finally:
            await registry.close()

    _run(body())


def test_a_refused_clients_certificate_name_and_client_id_are_sealed(tmp_path: Path) -> None:
    keys = LocalKeys([MasterKey.generate()])
    cn = "Jane Example/pacemaker-7"  # not a safe device id: refused, and quoted in the refusal
    cert = pt.leaf(cn)
    peer = PeerCredentials(chain_der=tuple(pt.chain_of(cert)), client_id="jane-client-77", address=PEER)

    async def body(registry: SQLiteRegistry) -> None:
        service = ProvisioningService(registry)
        await registry.register_anchor(pt.MANUFACTURER_ANCHOR, audit=draft("ca-registered"))
        await service.refresh_trust()
        with pytest.raises(errors.UnsafeIdentity):
            await service.admit(peer)
        await service.flush_refusals()
        (entry,) = [e for e in await registry.audit_entries() if e.draft.action == "refused"]
        assert entry.draft.device_id is None and entry.draft.reason == "unsafe_id"
        (resolved,) = await registry.resolve_audit([entry])
        assert "Jane Example" in resolved.draft.details.get("detail", "") + resolved.draft.details["message"]
        assert resolved.draft.details["client_id"] == repr("jane-client-77")
        assert resolved.draft.peer == PEER

    _run(with_registry(make(tmp_path, keys), body))
    on_disk = raw_bytes(tmp_path / "data")
    assert b"unsafe_id" in on_disk  # the reason stays in clear
    for secret in (b"Jane Example", b"jane-client-77", PEER.split(":")[0].encode()):
        assert secret not in on_disk, secret


def test_rotation_stage_keep_old_and_one_run_at_a_time(tmp_path: Path) -> None:
    import fcntl

    key_file = tmp_path / "master.key"
    first = init_key_file(key_file)

    async def body() -> None:
        registry = make(tmp_path, FileKeyProvider(key_file))
        await registry.open()
        try:
            await registry.provision(identity("r"), at=T0, peer=None)

            def rotate(**kw: Any) -> Any:
                return rotate_keys(
                    registry, FileKeyProvider(key_file), key_file=key_file, actor="op", clock=_clock, **kw
                )

            staged = await rotate(stage=True)  # several nodes: the new key goes into the file only
            second = read_key_file(key_file)[0]
            assert staged.staged and staged.primary == second.kid and read_key_file(key_file)[1] == first
            assert (await registry.keyring_status()).primary == first.kid  # not used yet
            kept = await rotate(keep_old=True)  # then the rotation proper
            assert kept.complete and not kept.retired and kept.primary == second.kid
            assert [k.kid for k in read_key_file(key_file)] == [second.kid, first.kid]
            again = await rotate()  # after --keep-old, a rotation is a rotation: a new key
            third = read_key_file(key_file)[0]
            assert again.complete and again.retired and third.kid not in (first.kid, second.kid)
            assert read_key_file(key_file) == [third]
            with (tmp_path / "master.key.lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                with pytest.raises(errors.InvalidRequest, match="another `jitp keys rotate`"):
                    await rotate()
            assert read_key_file(key_file) == [third]
            assert (await registry.get_device("r")) is not None
        finally:
            await registry.close()

    _run(body())


def test_pairing_a_registry_with_its_keyring() -> None:
    from jitp.registry import pair_keyring

    def pair(reg: str | None, ring: str | None, *, devices: bool = False, keys: bool = False) -> str | None:
        return pair_keyring(reg, ring, has_devices=devices, has_keys=keys, keyring="K", where="R")

    assert pair(None, None) is None  # new: the caller makes an id for both
    assert pair("a", "a", devices=True, keys=True) == "a"
    assert pair("a", None) == "a"  # the first open was interrupted between the two writes
    assert pair(None, "b") == "b"  # a new registry on a keyring that protects nothing yet
    for reg, ring, devices, keys in (
        ("a", None, True, False),
        (None, "b", False, True),
        ("a", "b", True, True),
    ):
        with pytest.raises(
            errors.MasterKeyMismatch, match="the keyring K is missing or belongs to another"
        ) as exc:
            pair(reg, ring, devices=devices, keys=keys)
        assert exc.value.where == "R" and "move this keyring away" in str(exc.value)
