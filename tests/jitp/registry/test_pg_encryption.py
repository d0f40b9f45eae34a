# ruff: noqa: F811  (pytest fixtures imported from test_registry_contract)
"""Encryption at rest in the PostgreSQL registry: what its schema holds, master keys, the keyring.

The contract tests (test_registry_contract) show that sealing changes nothing a caller sees; these
look at the database itself: no device data in clear in any table of the registry schema, the
keyring paired with its registry and its master keys, key rotation, crypto-shredding on erasure,
and the upgrade of a version-2 (clear) registry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta
from types import MappingProxyType
from typing import Any

import asyncpg
import pytest

from jitp import errors
from jitp.config import default_keyring_schema
from jitp.crypto import envelope, privacy
from jitp.crypto.keys import EnvKeyProvider, LocalKeys, MasterKey, MasterKeyProvider
from jitp.domain.audit import GENESIS_HASH, AuditDraft, chain, verify_chain
from jitp.domain.events import lifecycle_event, new_event_id, provisioned_event
from jitp.domain.records import Command, DeviceRecord, DeviceStatus
from jitp.registry import postgres as pg_registry
from jitp.registry import pseudonymize
from jitp.registry.postgres import PostgresRegistry, drop_schema
from tests.jitp.registry.test_registry_contract import (  # noqa: F401  (fixtures)
    PEER,
    PEER_HOST,
    T0,
    Backend,
    chain_intact,
    draft,
    fp_of,
    identity,
    pg_dsn,
    postgres,
)

SUBJECT = "CN=Quokka Zebrafish 7731,O=Secret Owner GmbH"
SERIAL = "5eca1de5ca1de77"
ATTRIBUTES = MappingProxyType({"owner": "alice-wonderland-9911", "site": "rooftop-5533"})
CONFIG_SECRET = "topic-nobody-may-read-4242"


def secret_identity(device_id: str, cert: str = "1") -> Any:
    return identity(
        device_id,
        cert,
        subject=SUBJECT,
        serial=SERIAL,
        attributes=ATTRIBUTES,
        config=MappingProxyType({"namespace": {"publish": [CONFIG_SECRET]}, "profile": {"max_qos": 1}}),
    )


def make(backend: Backend, keys: MasterKeyProvider, **kw: Any) -> PostgresRegistry:
    assert backend.dsn is not None
    return PostgresRegistry(backend.dsn, keys=keys, schema=backend.schema, pool_size=2, batch_window=0, **kw)


async def connect(backend: Backend) -> Any:
    return await asyncpg.connect(backend.dsn, server_settings={"search_path": backend.schema or "public"})


async def dump_schema(backend: Backend, schema: str | None = None) -> str:
    """Every row of every table of the schema, as PostgreSQL prints it (bytea as hex)."""
    schema = schema or backend.schema
    conn = await connect(backend)
    try:
        tables = [
            r[0]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", schema
            )
        ]
        assert {"devices", "cert_history", "outbox", "audit", "meta_text"} <= set(tables)
        out = []
        for table in tables:
            rows = await conn.fetch(f'SELECT t::text FROM "{schema}"."{table}" t')
            out += [f"{table}: {r[0]}" for r in rows]
        return "\n".join(out)
    finally:
        await conn.close()


def assert_absent(text: str, *secrets: str) -> None:
    for secret in secrets:
        for form in (secret, secret.encode().hex()):  # bytea columns print as hex
            assert form not in text, f"{secret!r} found in the registry schema"


@pytest.fixture
def keys_a() -> MasterKey:
    return MasterKey.generate()


# -- nothing in clear ---------------------------------------------------------------------------
def test_registry_schema_holds_no_device_data_in_clear(postgres: Backend, keys_a: MasterKey) -> None:
    ident, rotated = secret_identity("enc-dev"), secret_identity("enc-dev", "2")

    async def body() -> None:
        async with make(postgres, LocalKeys([keys_a])) as registry:
            await registry.provision(ident, at=T0, peer=PEER)
            await registry.provision(rotated, at=T0, peer=PEER, policy="rotate")
            await registry.change_status("enc-dev", Command.DISABLE, at=T0, actor="op")
            await registry.append_audit([draft("refused", peer=PEER, reason="no certificate")])
            record = await registry.get_device("enc-dev")
            assert record is not None and record.subject == SUBJECT and record.serial == SERIAL
            assert dict(record.attributes) == dict(ATTRIBUTES)
            assert await registry.find_by_fingerprint(rotated.cert_fingerprint) == record
            assert await registry.find_by_fingerprint(ident.cert_fingerprint) is None
            docs = [e.document() for e in await registry.events("enc-dev")]
            assert [d["type"] for d in docs] == ["provisioned", "reprovisioned", "disabled"]
            assert docs[0]["serial"] == SERIAL and docs[0]["attributes"] == dict(ATTRIBUTES)
            resolved = await registry.resolve_audit(await chain_intact(registry))
            assert [e.draft.peer for e in resolved if e.draft.action == "refused"] == [PEER]

        text = await dump_schema(postgres)
        assert "enc-dev" in text  # the device id is in clear by design: the scan does see rows
        assert_absent(
            text,
            SUBJECT,
            "Quokka",
            SERIAL,
            *ATTRIBUTES.values(),
            CONFIG_SECRET,
            ident.cert_fingerprint,
            rotated.cert_fingerprint,
            PEER_HOST,
        )

    asyncio.run(body())


# -- master keys and the keyring -------------------------------------------------------------------
def test_wrong_master_key_refuses_to_open(
    postgres: Backend, keys_a: MasterKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = MasterKey.generate()

    async def body() -> None:
        async with make(postgres, LocalKeys([keys_a])) as registry:
            await registry.provision(secret_identity("mk-dev"), at=T0, peer=None)
        with pytest.raises(errors.MasterKeyMismatch) as info:
            await make(postgres, LocalKeys([other])).open()
        assert keys_a.kid in str(info.value) and other.kid in str(info.value)
        assert info.value.kid == keys_a.kid
        monkeypatch.setenv("JITP_MASTER_KEY", other.token())
        with pytest.raises(errors.MasterKeyMismatch, match="JITP_MASTER_KEY"):
            await make(postgres, EnvKeyProvider()).open()
        # The right key still opens it: nothing was changed by the refusals.
        async with make(postgres, LocalKeys([keys_a])) as registry:
            record = await registry.get_device("mk-dev")
            assert record is not None and record.subject == SUBJECT

    asyncio.run(body())


def test_keyring_missing_or_of_another_registry(postgres: Backend, keys_a: MasterKey, pg_dsn: str) -> None:
    assert postgres.schema is not None
    other = Backend("postgresql", postgres.tmp, dsn=pg_dsn, schema=f"{postgres.schema}_b")
    keyring = default_keyring_schema(postgres.schema)

    async def body() -> None:
        async with make(postgres, LocalKeys([keys_a])) as registry:
            assert registry.keyring_schema == keyring
            await registry.provision(secret_identity("ring-dev"), at=T0, peer=None)
        # Another registry pointed at this registry's keyring: refused, nothing shared.
        with pytest.raises(errors.MasterKeyMismatch, match="another registry"):
            await make(other, LocalKeys([keys_a]), keyring_schema=keyring).open()
        # The keyring lost (dropped, or not restored with the registry): refused, not recreated empty.
        conn = await connect(postgres)
        try:
            await conn.execute(f'ALTER SCHEMA "{keyring}" RENAME TO "{keyring}_away"')
        finally:
            await conn.close()
        with pytest.raises(errors.MasterKeyMismatch, match="missing"):
            await make(postgres, LocalKeys([keys_a])).open()
        conn = await connect(postgres)
        try:
            assert await conn.fetchval("SELECT to_regnamespace($1)", keyring) is None
            await conn.execute(f'ALTER SCHEMA "{keyring}_away" RENAME TO "{keyring}"')
        finally:
            await conn.close()
        async with make(postgres, LocalKeys([keys_a])) as registry:
            assert await registry.get_device("ring-dev") is not None

    try:
        asyncio.run(body())
    finally:
        asyncio.run(drop_schema(pg_dsn, f"{keyring}_away", keyring_schema=f"{keyring}_away"))
        asyncio.run(drop_schema(pg_dsn, other.schema or ""))


def test_rotation_rewraps_every_key_under_the_new_primary(postgres: Backend, keys_a: MasterKey) -> None:
    new = MasterKey.generate()

    async def body() -> None:
        async with make(postgres, LocalKeys([keys_a])) as registry:
            for i in range(5):
                await registry.provision(secret_identity(f"rot-{i}"), at=T0, peer=PEER)
            status = await registry.keyring_status()
            assert status.primary == keys_a.kid and status.pending == 0
            assert dict(status.wrapped) == {keys_a.kid: 5 + 2}  # 5 devices, index and audit keys
            with pytest.raises(errors.MasterKeyMismatch, match="does not hold"):
                await registry.set_primary_key(new.kid, audit=draft("keys-rotated"))

        async with make(postgres, LocalKeys([new, keys_a])) as registry:
            await registry.set_primary_key(new.kid, audit=draft("keys-rotated"))
            status = await registry.keyring_status()
            assert status.primary == new.kid and status.pending == 7
            await registry.provision(secret_identity("rot-new"), at=T0, peer=None)  # under the new key
            assert (await registry.keyring_status()).wrapped[new.kid] == 1
            done = []
            while n := await registry.rewrap_keys(limit=3):
                done.append(n)
            assert done == [3, 3, 1]
            status = await registry.keyring_status()
            assert status.pending == 0 and dict(status.wrapped) == {new.kid: 8}
            assert (await chain_intact(registry))[-1].draft.action == "provisioned"

        with pytest.raises(errors.MasterKeyMismatch):  # the old key alone no longer opens it
            await make(postgres, LocalKeys([keys_a])).open()
        async with make(postgres, LocalKeys([new])) as registry:  # the new key alone does
            records = await registry.list_devices()
            assert len(records) == 6 and all(r.subject == SUBJECT for r in records)
            resolved = await registry.resolve_audit(await registry.audit_entries())
            assert {e.draft.device_id for e in resolved if e.draft.action == "provisioned"} == {
                *(f"rot-{i}" for i in range(5)),
                "rot-new",
            }
            assert all(e.draft.peer == PEER for e in resolved if e.draft.device_id == "rot-0")

    asyncio.run(body())


def test_a_node_without_the_new_primary_answers_first_joins_unavailable(
    postgres: Backend, keys_a: MasterKey
) -> None:
    """Another node made a key this node does not hold yet the primary: this node's first joins are
    refused as unavailable (CONNACK 3, as on SQLite), its known devices still reconnect."""
    new = MasterKey.generate()

    async def body() -> None:
        async with make(postgres, LocalKeys([keys_a])) as node:
            await node.provision(secret_identity("known"), at=T0, peer=None)
            async with make(postgres, LocalKeys([new, keys_a])) as operator:
                await operator.set_primary_key(new.kid, audit=draft("key-rotation-started"))
            with pytest.raises(errors.RegistryUnavailable, match=new.kid):
                await asyncio.wait_for(node.provision(secret_identity("fresh"), at=T0, peer=None), 10)
            again = await asyncio.wait_for(node.provision(secret_identity("known"), at=T0, peer=None), 10)
            assert not again.created and await node.get_device("fresh") is None

    asyncio.run(body())


# -- crypto-shredding ------------------------------------------------------------------------------
@pytest.fixture
def backup_schema(postgres: Backend, pg_dsn: str) -> Iterator[str]:
    name = f"{postgres.schema}_bak"
    try:
        yield name
    finally:
        asyncio.run(drop_schema(pg_dsn, name, keyring_schema=f"{name}_keyring"))


def test_erasure_leaves_old_copies_undecryptable(
    postgres: Backend, keys_a: MasterKey, backup_schema: str
) -> None:
    ident, rotated = secret_identity("shred-dev"), secret_identity("shred-dev", "2")
    keys = LocalKeys([keys_a])
    keyring = default_keyring_schema(postgres.schema)

    async def body() -> None:
        async with make(postgres, keys) as registry:
            await registry.provision(ident, at=T0, peer=PEER)
            await registry.provision(rotated, at=T0, peer=PEER, policy="rotate")
            await registry.provision(secret_identity("keeper"), at=T0, peer=None)
            conn = await connect(postgres)
            try:  # a backup of the registry schema (what pg_dump -n <schema> holds)
                await conn.execute(f'CREATE SCHEMA "{backup_schema}"')
                for table in ("devices", "cert_history", "outbox", "audit"):
                    await conn.execute(f'CREATE TABLE "{backup_schema}".{table} AS SELECT * FROM {table}')
                wrapped = await conn.fetchrow(
                    f'SELECT kid, wrapped FROM "{keyring}".data_keys WHERE device_id = $1', "shred-dev"
                )
            finally:
                await conn.close()
            key = envelope.unwrap_data_key(keys, wrapped[0], "shred-dev", bytes(wrapped[1]))

            erasure = await registry.erase(device_id="shred-dev", at=T0, actor="op")
            assert erasure.device_id == "shred-dev"
            assert await registry.is_erased(ident.cert_fingerprint)  # from the sealed history
            assert await registry.is_erased(rotated.cert_fingerprint)

            conn = await connect(postgres)
            try:
                assert (
                    await conn.fetchval(
                        f'SELECT 1 FROM "{keyring}".data_keys WHERE device_id = $1', "shred-dev"
                    )
                    is None
                )
                sealed = bytes(
                    await conn.fetchval(
                        f'SELECT sealed FROM "{backup_schema}".devices WHERE device_id = $1', "shred-dev"
                    )
                )
                payloads = [
                    bytes(r[0])
                    for r in await conn.fetch(
                        f'SELECT payload FROM "{backup_schema}".outbox WHERE device_id = $1', "shred-dev"
                    )
                ]
                remaining = await conn.fetch(f'SELECT device_id, kid, wrapped FROM "{keyring}".data_keys')
                assert [r[0] for r in remaining] == ["keeper"]
                # The backup still holds the sealed rows, but no key left in the keyring opens them.
                for device_id, kid, w in remaining:
                    other = envelope.unwrap_data_key(keys, kid, device_id, bytes(w))
                    with pytest.raises(errors.RegistryUnavailable):
                        open_sealed(other, "shred-dev", sealed)
                assert payloads and all(p[:1] == envelope.SEALED_VERSION for p in payloads)
                # (With the destroyed key, they did open: the rows were sealed under it.)
                assert open_sealed(key, "shred-dev", sealed).subject == SUBJECT
                assert json.loads(envelope.open_payload(key, "shred-dev", payloads[0]))["serial"] == SERIAL

                # The backup restored over the registry: the erased device's row stays unreadable.
                await conn.execute(
                    f'INSERT INTO devices SELECT * FROM "{backup_schema}".devices WHERE device_id = $1',
                    "shred-dev",
                )
                await conn.execute(
                    f"INSERT INTO outbox (event_id, type, device_id, occurred_at, payload) SELECT event_id, "
                    f'type, device_id, occurred_at, payload FROM "{backup_schema}".outbox WHERE device_id = $1',
                    "shred-dev",
                )
            finally:
                await conn.close()
            assert await registry.get_device("shred-dev") is None
            assert [r.device_id for r in await registry.list_devices()] == ["keeper"]
            assert [e.type for e in await registry.events("shred-dev")] == ["erased"]
            with pytest.raises(errors.NotFound):
                await registry.change_status("shred-dev", Command.DISABLE, at=T0, actor="op")
            # A new device under that id is a new device: the unreadable rows make way.
            fresh = await registry.provision(secret_identity("shred-dev", "3"), at=T0, peer=None)
            assert fresh.created
            assert [e.type for e in await registry.events("shred-dev")] == ["erased", "provisioned"]

    asyncio.run(body())


def open_sealed(key: bytes, device_id: str, sealed: bytes) -> DeviceRecord:
    return envelope.open_record(
        key,
        sealed,
        device_id=device_id,
        status="active",
        ca_id="x",
        region="x",
        not_after=T0,
        provisioned_at=T0,
        last_seen=None,
        template=None,
        template_version=None,
    )


# -- upgrade from schema version 2 (clear rows) ---------------------------------------------------
def test_version_2_registry_is_sealed_on_upgrade(postgres: Backend, keys_a: MasterKey) -> None:
    old, current = secret_identity("legacy-dev", "1"), secret_identity("legacy-dev", "2")
    ref_key = privacy.new_key()  # the device's audit key in version 2: it becomes its data key
    record = DeviceRecord(
        device_id="legacy-dev",
        status=DeviceStatus.ACTIVE,
        cert_fingerprint=current.cert_fingerprint,
        ca_id=current.ca_id,
        region=current.region,
        serial=current.serial,
        subject=current.subject,
        not_after=current.not_after,
        provisioned_at=T0,
        last_seen=T0,
        attributes=current.attributes,
        template=current.template,
        template_version=current.template_version,
        config=current.config,
    )
    event = provisioned_event(record, event_id=new_event_id(), at=T0)
    gone = lifecycle_event(
        "gone-dev",
        type="erased",
        event_id=new_event_id(),
        at=T0,
        status="erased",
        previous_status="active",
        region="eu-west",
        reason=None,
    )
    drafts = [
        pseudonymize(
            AuditDraft(at=T0, action="provisioned", actor="device", device_id="legacy-dev", peer=PEER),
            {"legacy-dev": ref_key},
        ),
        AuditDraft(at=T0 + timedelta(seconds=1), action="refused", actor="broker", peer=PEER),
    ]
    entries = chain(drafts, start_seq=1, prev_hash=GENESIS_HASH)

    async def build_v2() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            await conn.execute(f'CREATE SCHEMA "{postgres.schema}"')
            await conn.execute(f'SET search_path TO "{postgres.schema}"')
            await conn.execute(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ)"
            )
            for version, sql in enumerate(pg_registry.MIGRATIONS[:2], start=1):
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, now())", version)
            await conn.execute(
                "INSERT INTO devices (device_id, status, cert_fingerprint, ca_id, region, serial, subject, "
                "not_after, provisioned_at, last_seen, attributes, template, template_version, config) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                record.device_id,
                str(record.status),
                record.cert_fingerprint,
                record.ca_id,
                record.region,
                record.serial,
                record.subject,
                record.not_after,
                record.provisioned_at,
                record.last_seen,
                json.dumps(dict(record.attributes), sort_keys=True),
                record.template,
                record.template_version,
                json.dumps(dict(record.config), sort_keys=True),
            )
            await conn.execute(
                "INSERT INTO cert_history VALUES ($1, $2, $3)", "legacy-dev", old.cert_fingerprint, T0
            )
            await conn.execute("INSERT INTO device_keys VALUES ($1, $2)", "legacy-dev", ref_key)
            await conn.execute("INSERT INTO device_keys VALUES ($1, $2)", "refused-dev", privacy.new_key())
            for e in (event, gone):
                await conn.execute(
                    "INSERT INTO outbox (event_id, type, device_id, occurred_at, payload) VALUES ($1, $2, $3, $4, $5)",
                    e.event_id,
                    e.type,
                    e.device_id,
                    e.occurred_at,
                    e.payload,
                )
            for e in entries:
                d = e.draft
                await conn.execute(
                    "INSERT INTO audit VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    e.seq,
                    d.at,
                    d.action,
                    d.actor,
                    d.device_id,
                    d.fingerprint,
                    d.reason,
                    d.peer,
                    json.dumps(dict(d.details), sort_keys=True),
                    e.prev_hash,
                    e.hash,
                )
            await conn.execute(
                "UPDATE meta_text SET value = $1 WHERE key = 'audit_head'",
                f"{entries[-1].seq}:{entries[-1].hash}",
            )
        finally:
            await conn.close()

    async def body() -> None:
        await build_v2()
        async with make(postgres, LocalKeys([keys_a])) as registry:
            assert await registry.schema_version() == len(pg_registry.MIGRATIONS) == 4  # 4: operational certificates
            assert await registry.get_device("legacy-dev") == record
            assert await registry.find_by_fingerprint(current.cert_fingerprint) == record
            events = await registry.events()
            assert [(e.event_id, e.payload) for e in events] == [
                (event.event_id, event.payload),
                (gone.event_id, gone.payload),
            ]
            stored = await chain_intact(registry)  # the old entries, untouched
            assert verify_chain(stored) == [] and stored[0].hash == entries[0].hash
            resolved = await registry.resolve_audit(stored)
            assert resolved[0].draft.device_id == "legacy-dev" and resolved[0].draft.peer == PEER
            assert resolved[1].draft.peer == PEER  # stored in clear by version 2: stays readable
            # The superseded certificate came along (sealed): it stays refused.
            with pytest.raises(errors.IdentityConflict, match="superseded"):
                await registry.provision(old, at=T0, peer=None, policy="rotate")
            status = await registry.keyring_status()
            assert dict(status.wrapped) == {keys_a.kid: 2 + 2}  # legacy-dev, refused-dev, index, audit

        text = await dump_schema(postgres)
        assert_absent(text, SUBJECT, SERIAL, *ATTRIBUTES.values(), CONFIG_SECRET, current.cert_fingerprint)
        assert_absent(text, old.cert_fingerprint)
        for table in ("devices_v2", "cert_history_v2", "device_keys_v2", "device_keys"):
            assert f"{table}:" not in text

        async with make(postgres, LocalKeys([keys_a])) as registry:  # and again: nothing to do
            erasure = await registry.erase(fingerprint=current.cert_fingerprint, at=T0, actor="op")
            assert erasure.device_id == "legacy-dev"
            assert await registry.is_erased(old.cert_fingerprint)
            resolved = await registry.resolve_audit(await registry.audit_entries())
            assert resolved[0].draft.device_id != "legacy-dev"  # unlinkable now

    asyncio.run(body())


def test_fingerprint_lookup_uses_the_blind_index_only(postgres: Backend, keys_a: MasterKey) -> None:
    ident = secret_identity("idx-dev")

    async def body() -> None:
        async with make(postgres, LocalKeys([keys_a])) as registry:
            await registry.provision(ident, at=T0, peer=None)
            conn = await connect(postgres)
            try:
                index = await conn.fetchval("SELECT fp_index FROM devices WHERE device_id = 'idx-dev'")
            finally:
                await conn.close()
            assert index.startswith("f:") and ident.cert_fingerprint not in index
            assert index != envelope.fingerprint_index(b"\0" * 32, ident.cert_fingerprint)  # keyed
            assert (await registry.find_by_fingerprint(ident.cert_fingerprint)) is not None
            assert await registry.find_by_fingerprint(fp_of("unknown")) is None

    asyncio.run(body())
