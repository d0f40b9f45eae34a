"""The embedded registry: SQLite (WAL) through aiosqlite.

Writes from concurrent joins are grouped: ``provision``, ``append_audit`` and ``last_seen``
updates are queued and a single writer task applies whatever has queued up as one
transaction (group commit), so a join storm costs one commit per batch, not per device.
``BEGIN IMMEDIATE`` takes SQLite's write lock first, and inserts use ``ON CONFLICT DO
NOTHING``, so several processes sharing the file (the broker and the CLI) stay race-free.

Device data is sealed at rest (:mod:`jitp.envelope`): the ``devices`` table keeps in clear only
what lookups need, the rest is AES-GCM under each device's data key. The data keys, wrapped by
the master key (:mod:`jitp.keys`), live in the *keyring*, a second SQLite file attached as
schema ``keyring`` and kept apart from this one (``<data_dir>-keys/keyring.db`` by default), so
that a backup of the registry holds no key material and erasing a device's wrapped key
(crypto-shredding) reaches every copy of it. SQLite commits attached WAL databases one file after
the other, so a data key is always committed *before* the first device row it protects (a crash
may leave an unused key, never an unreadable record), and removed only after those rows are gone.
(The one exception: a key made for an audit entry about a device that was never provisioned is
written with that entry; a crash at the commit can cost the entry its resolvability, no record.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiosqlite

from jitp import envelope, errors, privacy
from jitp.audit import GENESIS_HASH, AuditDraft, AuditEntry, chain
from jitp.events import ProvisioningEvent, lifecycle_event, new_event_id, provisioned_event
from jitp.identity import DeviceIdentity
from jitp.keys import MasterKeyProvider, default_keys_dir, provider_for, require_kids
from jitp.records import Command, DeviceRecord, DeviceStatus
from jitp.registry import (
    Erasure,
    KeyringStatus,
    ProvisionOutcome,
    StatusChange,
    decide,
    pair_keyring,
    plan_status_change,
    provisioned_draft,
    pseudonymize,
    resolve_entries,
    seal_anonymous,
)
from jitp.trust import Role, TrustAnchor

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 1: the foundation. Columns of `audit` hold the stored (pseudonymous) form: see jitp.privacy.
    """
    CREATE TABLE anchors (
        ca_id TEXT PRIMARY KEY,
        cert_der BLOB NOT NULL,
        role TEXT NOT NULL,
        subject TEXT NOT NULL,
        region TEXT,
        template TEXT,
        enabled INTEGER NOT NULL DEFAULT 1,
        registered_at TEXT NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('trust_version', 1);
    INSERT INTO meta (key, value) VALUES ('templates_version', 1);
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        cert_fingerprint TEXT NOT NULL,
        ca_id TEXT NOT NULL,
        region TEXT NOT NULL,
        serial TEXT NOT NULL,
        subject TEXT NOT NULL,
        not_after TEXT NOT NULL,
        provisioned_at TEXT NOT NULL,
        last_seen TEXT,
        attributes TEXT NOT NULL DEFAULT '{}',
        template TEXT,
        template_version INTEGER,
        config TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE cert_history (
        device_id TEXT NOT NULL,
        cert_fingerprint TEXT NOT NULL,
        superseded_at TEXT NOT NULL,
        PRIMARY KEY (device_id, cert_fingerprint)
    );
    CREATE TABLE device_keys (device_id TEXT PRIMARY KEY, ref_key BLOB NOT NULL);
    CREATE TABLE tombstones (ref TEXT PRIMARY KEY, erased_at TEXT NOT NULL);
    CREATE TABLE crls (
        ca_id TEXT PRIMARY KEY,
        der BLOB NOT NULL,
        this_update TEXT NOT NULL,
        next_update TEXT,
        imported_at TEXT NOT NULL
    );
    CREATE TABLE meta_text (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE INDEX devices_fingerprint ON devices (cert_fingerprint);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        device_id TEXT NOT NULL,
        occurred_at TEXT NOT NULL,
        payload BLOB NOT NULL,
        delivered_at TEXT
    );
    CREATE INDEX outbox_pending ON outbox (seq) WHERE delivered_at IS NULL;
    CREATE UNIQUE INDEX outbox_one_provisioned ON outbox (device_id) WHERE type = 'provisioned';
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        device_id TEXT,
        fingerprint TEXT,
        reason TEXT,
        peer TEXT,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    """,
    # 2: event sinks (jitp.nats_sink): each sink's progress through the outbox, by seq.
    """
    CREATE TABLE sink_cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
    CREATE INDEX outbox_erased_unscrubbed ON outbox (seq) WHERE type = 'erased' AND device_id != '';
    """,
    # 3: encryption at rest. Identifying fields move into `sealed` (jitp.envelope), the certificate
    # fingerprint is only kept as a blind index, and the audit keys move to the keyring. The old
    # tables are renamed; SQLiteRegistry._seal_legacy() moves their rows (it needs the keys), then
    # drops them.
    """
    ALTER TABLE devices RENAME TO devices_v2;
    DROP INDEX devices_fingerprint;
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        ca_id TEXT NOT NULL,
        region TEXT NOT NULL,
        not_after TEXT NOT NULL,
        provisioned_at TEXT NOT NULL,
        last_seen TEXT,
        template TEXT,
        template_version INTEGER,
        fp_index TEXT NOT NULL,
        sealed BLOB NOT NULL
    );
    CREATE INDEX devices_fp_index ON devices (fp_index);
    ALTER TABLE cert_history RENAME TO cert_history_v2;
    CREATE TABLE cert_history (
        device_id TEXT NOT NULL,
        fp_index TEXT NOT NULL,
        sealed_fp BLOB NOT NULL,
        superseded_at TEXT NOT NULL,
        PRIMARY KEY (device_id, fp_index)
    );
    ALTER TABLE device_keys RENAME TO device_keys_v2;
    """,
)

# The keyring (a separate file, attached as `keyring`). `erasing` marks a data key whose device is
# being erased: it is deleted once the device's rows are, even if a crash came in between.
KEYRING_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS keyring.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS keyring.data_keys (device_id TEXT PRIMARY KEY, kid TEXT NOT NULL, "
    "wrapped BLOB NOT NULL, erasing INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS keyring.data_keys_kid ON data_keys (kid)",
    "CREATE TABLE IF NOT EXISTS keyring.registry_keys (name TEXT PRIMARY KEY, kid TEXT NOT NULL, "
    "wrapped BLOB NOT NULL)",
)

# An erased device's last event names it: once delivered over MQTT *and* past every event sink's
# cursor (a sink that is behind must still publish it in full), it goes too.
_SCRUB_ERASED = (
    "UPDATE outbox SET device_id = '', payload = X'' WHERE type = 'erased' AND device_id != '' "
    "AND delivered_at IS NOT NULL AND seq <= COALESCE((SELECT MIN(seq) FROM sink_cursors), seq)"
)

_DEVICE_COLUMNS = (
    "device_id, status, ca_id, region, not_after, provisioned_at, last_seen, template, template_version, "
    "fp_index, sealed"
)
_DEVICE_MARKS = ", ".join("?" * 11)
# A device row with its wrapped data key (NULL: the key is gone, the row can no longer be read).
_DEVICE_SELECT = (
    "SELECT d.device_id, d.status, d.ca_id, d.region, d.not_after, d.provisioned_at, d.last_seen, "
    "d.template, d.template_version, d.sealed, k.kid, k.wrapped "
    "FROM devices d LEFT JOIN keyring.data_keys k ON k.device_id = d.device_id"
)
_EVENT_SELECT = (
    "SELECT o.event_id, o.type, o.device_id, o.occurred_at, o.payload, k.kid, k.wrapped "
    "FROM outbox o LEFT JOIN keyring.data_keys k ON k.device_id = o.device_id"
)


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


def _chunks(values: Sequence[str], size: int = 500) -> list[list[str]]:
    ordered = sorted(set(values))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _anchor(row: Sequence[Any]) -> TrustAnchor:
    return TrustAnchor(
        ca_id=row[0],
        cert_der=bytes(row[1]),
        role=Role(row[2]),
        subject=row[3],
        region=row[4],
        template=row[5],
        enabled=bool(row[6]),
        registered_at=_dt(row[7]),
    )


@dataclass
class _Provision:
    identity: DeviceIdentity
    at: datetime
    peer: str | None
    policy: str
    future: asyncio.Future[ProvisionOutcome]


@dataclass
class _Audit:
    drafts: Sequence[AuditDraft]
    future: asyncio.Future[None]


class SQLiteRegistry:
    """The embedded :class:`~jitp.registry.Registry`."""

    def __init__(
        self,
        path: Path | str,
        *,
        keys: MasterKeyProvider | None = None,
        keyring: Path | str | None = None,
        synchronous: str = "FULL",
        max_batch: int = 512,
        batch_window: float = 0.002,
    ) -> None:
        """``keys`` and ``keyring`` default as the configuration does: ``$JITP_MASTER_KEY`` or the key
        file, and the keyring, in ``<data_dir>-keys/`` beside the registry's directory."""
        self.path = Path(path)
        keys_dir = default_keys_dir(self.path.parent)
        self.keyring_path = Path(keyring) if keyring is not None else keys_dir / "keyring.db"
        self._keys = keys if keys is not None else provider_for(keys_dir / "master.key")
        self._index_key = b""
        self._audit_key = b""
        self._synchronous = synchronous.upper()
        if self._synchronous not in ("FULL", "NORMAL"):
            raise errors.ConfigError("must be FULL or NORMAL", key="sqlite_synchronous")
        self._max_batch = max_batch
        self._batch_window = batch_window
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._queue: asyncio.Queue[_Provision | _Audit] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._touches: dict[str, datetime] = {}
        self._salt = b""

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        for path in (self.path, self.keyring_path):
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute(f"PRAGMA synchronous={self._synchronous}")
            await self._db.execute("PRAGMA busy_timeout=10000")
            await self._db.execute("PRAGMA secure_delete=ON")  # erased data is overwritten, not just unlinked
            await self._db.execute("ATTACH DATABASE ? AS keyring", (str(self.keyring_path),))
            await self._db.execute("PRAGMA keyring.journal_mode=WAL")
            await self._db.execute("PRAGMA keyring.synchronous=FULL")  # a lost data key is lost data
            await self._db.execute("PRAGMA keyring.secure_delete=ON")
            await self._migrate()
            await self._open_keyring()
            await self._seal_legacy()
            self._salt = await self._registry_salt()
        except BaseException:
            await self._db.close()
            self._db = None
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="jitp-sqlite-writer")

    async def close(self) -> None:
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._db is not None:
            async with self._lock:
                await self._flush_touches()
                await self._db.close()
            self._db = None

    async def __aenter__(self) -> SQLiteRegistry:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise errors.RegistryUnavailable("the registry is not open")
        return self._db

    async def _migrate(self) -> None:
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self.db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
                )
                async with self.db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cur:
                    row = await cur.fetchone()
                current = int(row[0]) if row else 0
                if current > len(MIGRATIONS):
                    raise errors.ConfigError(
                        f"the database schema is version {current}, newer than this jitp "
                        f"({len(MIGRATIONS)}); upgrade jitp",
                        where=str(self.path),
                    )
                for version in range(current + 1, len(MIGRATIONS) + 1):
                    for statement in MIGRATIONS[version - 1].split(";"):
                        if statement.strip():
                            await self.db.execute(statement)
                    await self.db.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (version, _ts(datetime.now(UTC))),
                    )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    @contextlib.asynccontextmanager
    async def _transaction(self) -> Any:
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    # -- keyring ---------------------------------------------------------------------------
    async def _scalar(self, db: aiosqlite.Connection, sql: str, args: Sequence[object] = ()) -> Any:
        async with db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return row[0] if row is not None else None

    async def _open_keyring(self) -> None:
        """Check that the keyring belongs to this registry and that the master keys unwrap it;
        load (or make) the registry keys. MasterKeyMismatch otherwise: nothing is read unverified."""
        async with self._transaction() as db:
            for statement in KEYRING_SCHEMA:
                await db.execute(statement)
            reg_id = await self._scalar(db, "SELECT value FROM meta_text WHERE key = 'keyring_id'")
            ring_id = await self._scalar(db, "SELECT value FROM keyring.meta WHERE key = 'keyring_id'")
            paired = pair_keyring(
                reg_id,
                ring_id,
                has_devices=await self._scalar(db, "SELECT 1 FROM devices LIMIT 1") is not None,
                has_keys=await self._scalar(db, "SELECT 1 FROM keyring.data_keys LIMIT 1") is not None,
                keyring=str(self.keyring_path),
                where=str(self.path),
            )
            paired = paired or privacy.new_key().hex()[:32]
            if reg_id is None:
                await db.execute("INSERT INTO meta_text (key, value) VALUES ('keyring_id', ?)", (paired,))
            if ring_id is None:
                await db.execute("INSERT INTO keyring.meta (key, value) VALUES ('keyring_id', ?)", (paired,))
            primary = await self._scalar(db, "SELECT value FROM keyring.meta WHERE key = 'primary_kid'")
            if primary is None:
                primary = self._keys.kids()[0]
                await db.execute(
                    "INSERT INTO keyring.meta (key, value) VALUES ('primary_kid', ?)", (primary,)
                )
            async with db.execute(
                "SELECT kid FROM keyring.data_keys UNION SELECT kid FROM keyring.registry_keys UNION SELECT ?",
                (primary,),
            ) as cur:
                used = sorted(str(r[0]) for r in await cur.fetchall())
            require_kids(self._keys, used, where=str(self.path))
            self._index_key = await self._registry_key(db, envelope.INDEX_KEY, primary)
            self._audit_key = await self._registry_key(db, envelope.AUDIT_KEY, primary)
            # Finish erasures a crash interrupted: their device rows are gone, so must their keys be.
            await db.execute(
                "DELETE FROM keyring.data_keys WHERE erasing = 1 "
                "AND device_id NOT IN (SELECT device_id FROM devices)"
            )

    async def _registry_key(self, db: aiosqlite.Connection, name: str, primary: str) -> bytes:
        async with db.execute(
            "SELECT kid, wrapped FROM keyring.registry_keys WHERE name = ?", (name,)
        ) as cur:
            row = await cur.fetchone()
        if row is not None:
            return envelope.unwrap_registry_key(self._keys, str(row[0]), name, bytes(row[1]))
        key = envelope.new_data_key()
        await db.execute(
            "INSERT INTO keyring.registry_keys (name, kid, wrapped) VALUES (?, ?, ?)",
            (name, primary, envelope.wrap_registry_key(self._keys, primary, name, key)),
        )
        return key

    async def _load_keys(
        self, db: aiosqlite.Connection, ids: Sequence[str], *, usable_only: bool = False
    ) -> dict[str, bytes]:
        """The data keys of ``ids`` that have one, unwrapped. ``usable_only``: not those of a device
        being erased (nothing new may be sealed under a key about to be destroyed)."""
        keys: dict[str, bytes] = {}
        live = " AND erasing = 0" if usable_only else ""
        for chunk in _chunks(ids):
            async with db.execute(
                f"SELECT device_id, kid, wrapped FROM keyring.data_keys WHERE device_id IN ({_marks(chunk)}){live}",
                chunk,
            ) as cur:
                for device_id, kid, wrapped in await cur.fetchall():
                    keys[device_id] = envelope.unwrap_data_key(self._keys, kid, device_id, bytes(wrapped))
        return keys

    async def _create_keys(self, db: aiosqlite.Connection, ids: Sequence[str]) -> dict[str, bytes]:
        """New data keys for ``ids``, wrapped under the primary (read in this transaction: a key
        rotation that changed it is seen). A doomed key (erasing) is replaced."""
        if not ids:
            return {}
        primary = str(await self._scalar(db, "SELECT value FROM keyring.meta WHERE key = 'primary_kid'"))
        fresh = {device_id: envelope.new_data_key() for device_id in ids}
        await db.executemany(
            "INSERT INTO keyring.data_keys (device_id, kid, wrapped, erasing) VALUES (?, ?, ?, 0) "
            "ON CONFLICT(device_id) DO UPDATE SET kid = excluded.kid, wrapped = excluded.wrapped, erasing = 0",
            [
                (device_id, primary, envelope.wrap_data_key(self._keys, primary, device_id, key))
                for device_id, key in fresh.items()
            ],
        )
        return fresh

    async def _ensure_keys(self, wanted: dict[str, list[str]]) -> None:
        """Data keys for the devices about to be written (``device_id -> tombstone refs of the
        certificates``), committed before any row they protect. A device whose certificates are all
        erased gets none."""
        async with self._lock:
            have: set[str] = set()
            for chunk in _chunks(list(wanted)):
                async with self.db.execute(
                    f"SELECT device_id FROM keyring.data_keys WHERE erasing = 0 AND device_id IN ({_marks(chunk)})",
                    chunk,
                ) as cur:
                    have.update(r[0] for r in await cur.fetchall())
            if len(have) == len(wanted):
                return
        async with self._transaction() as db:
            missing = [d for d in wanted if d not in have]
            keep: set[str] = set()  # a key row that stays: live (not erasing), or its device still exists
            for chunk in _chunks(missing):
                async with db.execute(
                    f"SELECT k.device_id FROM keyring.data_keys k WHERE k.device_id IN ({_marks(chunk)}) "
                    "AND (k.erasing = 0 OR EXISTS (SELECT 1 FROM devices d WHERE d.device_id = k.device_id))",
                    chunk,
                ) as cur:
                    keep.update(r[0] for r in await cur.fetchall())
            refs = {d: wanted[d] for d in missing if d not in keep}
            erased: set[str] = set()
            for chunk in _chunks([ref for group in refs.values() for ref in group]):
                async with db.execute(
                    f"SELECT ref FROM tombstones WHERE ref IN ({_marks(chunk)})", chunk
                ) as cur:
                    erased.update(r[0] for r in await cur.fetchall())
            create = [d for d, group in refs.items() if not erased.issuperset(group)]
            # Rows of these ids that have no key at all were shredded (a registry restored from a
            # backup older than their erasure): unreadable for good, they make way for the new device.
            for chunk in _chunks(create):
                marks = _marks(chunk)
                shredded = f"SELECT device_id FROM devices WHERE device_id IN ({marks}) AND device_id NOT IN (SELECT device_id FROM keyring.data_keys)"
                async with db.execute(shredded, chunk) as cur:
                    gone = [(r[0],) for r in await cur.fetchall()]
                for table in ("outbox", "cert_history", "devices") if gone else ():
                    await db.executemany(f"DELETE FROM {table} WHERE device_id = ?", gone)
            await self._create_keys(db, create)

    def _open_record(self, row: Sequence[Any], keys: dict[str, bytes]) -> DeviceRecord | None:
        """A device row from ``_DEVICE_SELECT``; None when its data key is gone (shredded)."""
        device_id = str(row[0])
        if row[10] is None:
            # Not named: the id is all that is left of an erased device.
            log.warning("a device row has no data key (erased; a registry copy older than its erasure?)")
            return None
        key = keys.get(device_id)
        if key is None:
            key = keys[device_id] = envelope.unwrap_data_key(self._keys, row[10], device_id, bytes(row[11]))
        return envelope.open_record(
            key,
            bytes(row[9]),
            device_id=device_id,
            status=row[1],
            ca_id=row[2],
            region=row[3],
            not_after=datetime.fromisoformat(row[4]),
            provisioned_at=datetime.fromisoformat(row[5]),
            last_seen=_dt(row[6]),
            template=row[7],
            template_version=row[8],
        )

    async def _select_records(
        self,
        db: aiosqlite.Connection,
        where: str,
        args: Sequence[object],
        keys: dict[str, bytes] | None = None,
    ) -> list[DeviceRecord]:
        keys = {} if keys is None else keys
        async with db.execute(f"{_DEVICE_SELECT} {where}", args) as cur:
            rows = await cur.fetchall()
        return [r for r in (self._open_record(row, keys) for row in rows) if r is not None]

    def _device_row(self, record: DeviceRecord, key: bytes) -> tuple[Any, ...]:
        return (
            record.device_id,
            str(record.status),
            record.ca_id,
            record.region,
            _ts(record.not_after),
            _ts(record.provisioned_at),
            _ts(record.last_seen) if record.last_seen else None,
            record.template,
            record.template_version,
            envelope.fingerprint_index(self._index_key, record.cert_fingerprint),
            envelope.seal_record(key, record),
        )

    def _open_events(self, rows: Iterable[Sequence[Any]]) -> list[ProvisioningEvent]:
        """Events from ``_EVENT_SELECT`` rows, payloads opened; those whose key is gone are left out."""
        keys: dict[str, bytes | None] = {}
        out = []
        for event_id, type_, device_id, occurred_at, payload, kid, wrapped in rows:
            if device_id not in keys:
                keys[device_id] = (
                    envelope.unwrap_data_key(self._keys, kid, device_id, bytes(wrapped))
                    if kid is not None
                    else None
                )
            try:
                opened = envelope.open_payload(keys[device_id], device_id, bytes(payload))
            except errors.RegistryUnavailable as exc:
                log.warning("outbox event %s left out: %s", event_id, exc)
                continue
            out.append(
                ProvisioningEvent(
                    event_id=event_id,
                    type=type_,
                    device_id=device_id,
                    occurred_at=datetime.fromisoformat(occurred_at),
                    payload=opened,
                )
            )
        return out

    async def _seal_legacy(self) -> None:
        """Move a version-2 database's clear rows into their sealed form (migration 3), once.

        Each device keeps its audit key as its data key, so earlier audit entries still resolve."""
        async with self._lock:
            legacy = await self._scalar(
                self.db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'devices_v2'"
            )
        if legacy is None:
            return
        async with self._transaction() as db:  # the keys first, committed on their own
            async with db.execute("SELECT device_id, ref_key FROM device_keys_v2") as cur:
                old_keys = {r[0]: bytes(r[1]) for r in await cur.fetchall()}
            async with db.execute("SELECT device_id FROM devices_v2") as cur:
                ids = [r[0] for r in await cur.fetchall()]
            primary = str(await self._scalar(db, "SELECT value FROM keyring.meta WHERE key = 'primary_kid'"))
            for device_id in ids:
                old_keys.setdefault(device_id, envelope.new_data_key())
            await db.executemany(
                "INSERT INTO keyring.data_keys (device_id, kid, wrapped) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    (d, primary, envelope.wrap_data_key(self._keys, primary, d, k))
                    for d, k in old_keys.items()
                ],
            )
        async with self._transaction() as db:
            keys = await self._load_keys(db, ids)
            async with db.execute(
                "SELECT device_id, status, cert_fingerprint, ca_id, region, serial, subject, not_after, "
                "provisioned_at, last_seen, attributes, template, template_version, config FROM devices_v2"
            ) as cur:
                rows = await cur.fetchall()
            records = [
                DeviceRecord(
                    device_id=r[0],
                    status=DeviceStatus(r[1]),
                    cert_fingerprint=r[2],
                    ca_id=r[3],
                    region=r[4],
                    serial=r[5],
                    subject=r[6],
                    not_after=datetime.fromisoformat(r[7]),
                    provisioned_at=datetime.fromisoformat(r[8]),
                    last_seen=_dt(r[9]),
                    attributes=MappingProxyType(json.loads(r[10])),
                    template=r[11],
                    template_version=r[12],
                    config=MappingProxyType(json.loads(r[13])),
                )
                for r in rows
            ]
            await db.executemany(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_DEVICE_MARKS})",
                [self._device_row(rec, keys[rec.device_id]) for rec in records],
            )
            async with db.execute(
                "SELECT device_id, cert_fingerprint, superseded_at FROM cert_history_v2"
            ) as cur:
                history = await cur.fetchall()
            await db.executemany(
                "INSERT INTO cert_history (device_id, fp_index, sealed_fp, superseded_at) VALUES (?, ?, ?, ?)",
                [
                    (
                        d,
                        envelope.fingerprint_index(self._index_key, fp),
                        envelope.seal_fingerprint(keys[d], d, fp),
                        at,
                    )
                    for d, fp, at in history
                    if d in keys
                ],
            )
            async with db.execute("SELECT seq, device_id, payload FROM outbox WHERE type != 'erased'") as cur:
                events = await cur.fetchall()
            await db.executemany(
                "UPDATE outbox SET payload = ? WHERE seq = ?",
                [
                    (envelope.seal_payload(keys[d], d, bytes(payload)), seq)
                    for seq, d, payload in events
                    if d in keys and bytes(payload)[:1] != envelope.SEALED_VERSION
                ],
            )
            for table in ("devices_v2", "cert_history_v2", "device_keys_v2"):
                await db.execute(f"DROP TABLE {table}")
        log.info("sealed %d device records of the previous schema (encryption at rest)", len(records))
        await self.checkpoint()

    # -- trust anchors -------------------------------------------------------------------
    async def register_anchor(self, anchor: TrustAnchor, *, audit: AuditDraft) -> TrustAnchor:
        at = anchor.registered_at or audit.at
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO anchors (ca_id, cert_der, role, subject, region, template, enabled, registered_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT(ca_id) DO UPDATE SET role=excluded.role, "
                "region=excluded.region, template=excluded.template, enabled=1",
                (
                    anchor.ca_id,
                    anchor.cert_der,
                    str(anchor.role),
                    anchor.subject,
                    anchor.region,
                    anchor.template,
                    _ts(at),
                ),
            )
            await db.execute("UPDATE meta SET value = value + 1 WHERE key = 'trust_version'")
            await self._append_audit_tx(db, [audit])
            async with db.execute(
                "SELECT ca_id, cert_der, role, subject, region, template, enabled, registered_at FROM anchors "
                "WHERE ca_id = ?",
                (anchor.ca_id,),
            ) as cur:
                row = await cur.fetchone()
        assert row is not None
        return _anchor(row)

    async def set_anchor_enabled(self, ca_id: str, enabled: bool, *, audit: AuditDraft) -> TrustAnchor:
        async with self._transaction() as db:
            async with db.execute(
                "SELECT ca_id, cert_der, role, subject, region, template, enabled, registered_at FROM anchors "
                "WHERE ca_id = ?",
                (ca_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                raise errors.NotFound(f"no CA with id {ca_id!r} is registered", ca_id=ca_id)
            await db.execute("UPDATE anchors SET enabled = ? WHERE ca_id = ?", (int(enabled), ca_id))
            await db.execute("UPDATE meta SET value = value + 1 WHERE key = 'trust_version'")
            await self._append_audit_tx(db, [audit])
        anchor = _anchor(row)
        return TrustAnchor(**{**anchor.__dict__, "enabled": enabled})

    async def anchors(self) -> list[TrustAnchor]:
        async with (
            self._lock,
            self.db.execute(
                "SELECT ca_id, cert_der, role, subject, region, template, enabled, registered_at FROM anchors "
                "ORDER BY registered_at, ca_id"
            ) as cur,
        ):
            return [_anchor(r) for r in await cur.fetchall()]

    async def bump_templates_version(self) -> None:
        async with self._transaction() as db:
            await db.execute("UPDATE meta SET value = value + 1 WHERE key = 'templates_version'")

    async def templates_version(self) -> int:
        """Bumped by every template reload, so other nodes reload their templates too."""
        async with (
            self._lock,
            self.db.execute("SELECT value FROM meta WHERE key = 'templates_version'") as cur,
        ):
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def trust_version(self) -> int:
        async with self._lock, self.db.execute("SELECT value FROM meta WHERE key = 'trust_version'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # -- devices -------------------------------------------------------------------------
    async def provision(
        self, identity: DeviceIdentity, *, at: datetime, peer: str | None, policy: str = "reject"
    ) -> ProvisionOutcome:
        if policy not in ("reject", "rotate", "reset"):
            raise ValueError(f"unknown reprovisioning policy {policy!r}")
        future: asyncio.Future[ProvisionOutcome] = asyncio.get_running_loop().create_future()
        self._check_writer()
        self._queue.put_nowait(_Provision(identity, at, peer, policy, future))
        return await future

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        async with self._lock:
            found = await self._select_records(self.db, "WHERE d.device_id = ?", (device_id,))
        return found[0] if found else None

    async def list_devices(self) -> list[DeviceRecord]:
        async with self._lock:
            return await self._select_records(self.db, "ORDER BY d.device_id", ())

    async def find_by_fingerprint(self, fingerprint: str) -> DeviceRecord | None:
        index = envelope.fingerprint_index(self._index_key, fingerprint)
        async with self._lock:
            found = await self._select_records(self.db, "WHERE d.fp_index = ?", (index,))
        return next((r for r in found if r.cert_fingerprint == fingerprint), None)

    async def is_erased(self, fingerprint: str) -> bool:
        ref = privacy.tombstone_ref(self._salt, fingerprint)
        async with self._lock, self.db.execute("SELECT 1 FROM tombstones WHERE ref = ?", (ref,)) as cur:
            return await cur.fetchone() is not None

    async def _fetch(
        self, db: aiosqlite.Connection, device_id: str, keys: dict[str, bytes] | None = None
    ) -> DeviceRecord:
        found = await self._select_records(db, "WHERE d.device_id = ?", (device_id,), keys)
        if not found:
            raise errors.NotFound(f"no device with id {device_id!r}", device_id=device_id)
        return found[0]

    # -- lifecycle -------------------------------------------------------------------------
    async def change_status(
        self, device_id: str, command: Command, *, at: datetime, actor: str, reason: str | None = None
    ) -> StatusChange:
        async with self._transaction() as db:
            keys: dict[str, bytes] = {}
            record = await self._fetch(db, device_id, keys)
            change, draft = plan_status_change(record, command, at=at, actor=actor, reason=reason)
            if change.event is not None:
                await db.execute(
                    "UPDATE devices SET status = ? WHERE device_id = ?",
                    (str(change.record.status), device_id),
                )
                await self._insert_events(db, [change.event], keys)
            await self._append_audit_tx(db, [draft])
        return change

    async def erase(
        self,
        *,
        device_id: str | None = None,
        fingerprint: str | None = None,
        at: datetime,
        actor: str,
        reason: str | None = None,
    ) -> Erasure:
        """GDPR erasure: only a tombstone (salted hash of each certificate fingerprint) remains.

        The device's data key goes too (crypto-shredding): whatever copy of the registry still
        holds its sealed rows, old backups included, can no longer decrypt them. In three steps, so
        that a crash anywhere leaves no unreadable live device and no forgotten key: mark the key,
        delete the rows (one transaction), delete the marked key (again at the next open if a
        crash came first)."""
        if device_id is None:
            if fingerprint is None:
                raise errors.InvalidRequest("erase needs a device id or a certificate")
            known = await self.find_by_fingerprint(fingerprint)
            if known is None:
                if await self.is_erased(fingerprint):
                    return Erasure(device_id=None, already_erased=True)
                raise errors.NotFound("no device holds this certificate")
            device_id = known.device_id
        async with self._transaction() as db:
            await db.execute("UPDATE keyring.data_keys SET erasing = 1 WHERE device_id = ?", (device_id,))
        async with self._transaction() as db:
            keys: dict[str, bytes] = {}
            record = await self._fetch(db, device_id, keys)
            key = keys[device_id]
            async with db.execute(
                "SELECT sealed_fp FROM cert_history WHERE device_id = ?", (device_id,)
            ) as cur:
                old = [envelope.open_fingerprint(key, device_id, bytes(r[0])) for r in await cur.fetchall()]
            fingerprints = {record.cert_fingerprint, *old}
            await db.executemany(
                "INSERT INTO tombstones (ref, erased_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(privacy.tombstone_ref(self._salt, fp), _ts(at)) for fp in sorted(fingerprints)],
            )
            await self._append_audit_tx(
                db,
                [
                    AuditDraft(
                        at=at,
                        action="erased",
                        actor=actor,
                        device_id=device_id,
                        fingerprint=record.cert_fingerprint,
                        reason=reason,
                        details=MappingProxyType({"previous_status": str(record.status)}),
                    )
                ],
            )
            # Everything else about the device goes; secure_delete overwrites the freed pages.
            for table in ("outbox", "cert_history", "devices"):
                await db.execute(f"DELETE FROM {table} WHERE device_id = ?", (device_id,))
            event = lifecycle_event(
                device_id,
                type="erased",
                event_id=new_event_id(),
                at=at,
                status="erased",
                previous_status=str(record.status),
                region=record.region,
                reason=None,
            )
            await self._insert_events(db, [event], {})
            self._touches.pop(device_id, None)
        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM keyring.data_keys WHERE device_id = ? AND erasing = 1 "
                "AND NOT EXISTS (SELECT 1 FROM devices WHERE device_id = ?)",
                (device_id, device_id),
            )
        await self.checkpoint()
        return Erasure(device_id=device_id, event=event)

    async def checkpoint(self) -> bool:
        """Fold the WALs (registry and keyring) into their database files and truncate them, so erased
        pages and destroyed keys leave the WAL too."""
        complete = True
        for schema in ("main", "keyring"):
            async with self._lock, self.db.execute(f"PRAGMA {schema}.wal_checkpoint(TRUNCATE)") as cur:
                row = await cur.fetchone()
            complete = complete and row is not None and int(row[0]) == 0
        if not complete:
            log.warning(
                "WAL checkpoint incomplete (a reader is busy); erased pages leave the WAL on the next one"
            )
        return complete

    @staticmethod
    def _event_row(event: ProvisioningEvent, keys: dict[str, bytes]) -> tuple[Any, ...]:
        """An outbox row: the payload sealed under the device's key (an erasure's event, whose key is
        being destroyed, names only the id and region, both in clear anyway)."""
        payload = event.payload
        if event.type != "erased":
            payload = envelope.seal_payload(keys[event.device_id], event.device_id, payload)
        return (event.event_id, event.type, event.device_id, _ts(event.occurred_at), payload)

    async def _insert_events(
        self, db: aiosqlite.Connection, events: Sequence[ProvisioningEvent], keys: dict[str, bytes]
    ) -> None:
        await db.executemany(
            "INSERT INTO outbox (event_id, type, device_id, occurred_at, payload) VALUES (?, ?, ?, ?, ?)",
            [self._event_row(e, keys) for e in events],
        )

    # -- templates -------------------------------------------------------------------------
    async def update_configs(
        self, records: Sequence[DeviceRecord], *, at: datetime, actor: str, template: str
    ) -> list[ProvisioningEvent]:
        """Store re-rendered configurations, each with a config-changed event, in one transaction."""
        if not records:
            return []
        events = [
            provisioned_event(r, event_id=new_event_id(), at=at, type="config-changed") for r in records
        ]
        async with self._transaction() as db:
            keys: dict[str, bytes] = {}
            rows = []
            for chunk in _chunks([r.device_id for r in records]):
                current = {
                    c.device_id: c
                    for c in await self._select_records(
                        db,
                        f"WHERE d.device_id IN ({_marks(chunk)}) AND d.template = ?",
                        (*chunk, template),
                        keys,
                    )
                }
                for r in records:
                    now = current.get(r.device_id)
                    if now is None:
                        continue
                    # Only what a template renders changes: the certificate may have rotated meanwhile.
                    updated = dataclasses.replace(
                        now, attributes=r.attributes, template_version=r.template_version, config=r.config
                    )
                    rows.append(
                        (
                            updated.template_version,
                            envelope.seal_record(keys[r.device_id], updated),
                            r.device_id,
                        )
                    )
            await db.executemany(
                "UPDATE devices SET template_version = ?, sealed = ? WHERE device_id = ?", rows
            )
            events = [e for e in events if e.device_id in keys]
            await self._insert_events(db, events, keys)
            await self._append_audit_tx(
                db,
                [
                    AuditDraft(
                        at=at,
                        action="template-changed",
                        actor=actor,
                        details=MappingProxyType({"template": template, "devices": str(len(events))}),
                    )
                ],
            )
        return events

    # -- CRLs ------------------------------------------------------------------------------
    async def import_crl(
        self,
        ca_id: str,
        der: bytes,
        *,
        this_update: datetime,
        next_update: datetime | None,
        audit: AuditDraft,
    ) -> None:
        async with self._transaction() as db:
            async with db.execute("SELECT 1 FROM anchors WHERE ca_id = ?", (ca_id,)) as cur:
                if await cur.fetchone() is None:
                    raise errors.NotFound(f"no CA with id {ca_id!r} is registered", ca_id=ca_id)
            await db.execute(
                "INSERT INTO crls (ca_id, der, this_update, next_update, imported_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(ca_id) DO UPDATE SET der=excluded.der, this_update=excluded.this_update, "
                "next_update=excluded.next_update, imported_at=excluded.imported_at",
                (ca_id, der, _ts(this_update), _ts(next_update) if next_update else None, _ts(audit.at)),
            )
            await db.execute("UPDATE meta SET value = value + 1 WHERE key = 'trust_version'")
            await self._append_audit_tx(db, [audit])

    async def crls(self) -> dict[str, bytes]:
        async with self._lock, self.db.execute("SELECT ca_id, der FROM crls") as cur:
            return {r[0]: bytes(r[1]) for r in await cur.fetchall()}

    # -- outbox --------------------------------------------------------------------------
    async def pending_events(self, limit: int = 500) -> list[ProvisioningEvent]:
        async with (
            self._lock,
            self.db.execute(
                f"{_EVENT_SELECT} WHERE o.delivered_at IS NULL ORDER BY o.seq LIMIT ?", (limit,)
            ) as cur,
        ):
            rows = await cur.fetchall()
        return self._open_events(rows)

    async def mark_delivered(self, event_ids: Sequence[str], *, at: datetime) -> None:
        if not event_ids:
            return
        async with self._transaction() as db:
            await db.executemany(
                "UPDATE outbox SET delivered_at = ? WHERE event_id = ? AND delivered_at IS NULL",
                [(_ts(at), e) for e in event_ids],
            )
            scrubbed = (await db.execute(_SCRUB_ERASED)).rowcount
        if scrubbed:
            await self.checkpoint()  # and out of the WAL into the (overwritten) database pages

    async def events_after(self, seq: int, limit: int = 500) -> list[tuple[int, ProvisioningEvent]]:
        # Writers take the write lock first (BEGIN IMMEDIATE): seq order is commit order.
        async with (
            self._lock,
            self.db.execute(
                f"SELECT o.seq, {_EVENT_SELECT.removeprefix('SELECT ')} "
                "WHERE o.seq > ? AND NOT (o.type = 'erased' AND o.device_id = '') ORDER BY o.seq LIMIT ?",
                (seq, limit),
            ) as cur,
        ):
            rows = await cur.fetchall()
        by_id = {r[1]: int(r[0]) for r in rows}
        return [(by_id[e.event_id], e) for e in self._open_events([r[1:] for r in rows])]

    async def outbox_head(self) -> int:
        """The newest outbox seq (0 when empty)."""
        async with self._lock, self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def sink_cursor(self, name: str) -> int:
        async with self._lock, self.db.execute("SELECT seq FROM sink_cursors WHERE name = ?", (name,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def set_sink_cursor(self, name: str, seq: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO sink_cursors (name, seq) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                (name, seq),
            )
            scrubbed = (await db.execute(_SCRUB_ERASED)).rowcount
        if scrubbed:
            await self.checkpoint()

    async def events(self, device_id: str | None = None) -> list[ProvisioningEvent]:
        sql = _EVENT_SELECT
        args: tuple[str, ...] = ()
        if device_id is not None:
            sql += " WHERE o.device_id = ?"
            args = (device_id,)
        async with self._lock, self.db.execute(sql + " ORDER BY o.seq", args) as cur:
            rows = await cur.fetchall()
        return self._open_events(rows)

    # -- audit ---------------------------------------------------------------------------
    async def append_audit(self, drafts: Sequence[AuditDraft]) -> None:
        if not drafts:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._check_writer()
        self._queue.put_nowait(_Audit(list(drafts), future))
        await future

    async def audit_entries(self) -> list[AuditEntry]:
        async with (
            self._lock,
            self.db.execute(
                "SELECT seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, hash "
                "FROM audit ORDER BY seq"
            ) as cur,
        ):
            rows = await cur.fetchall()
        return [
            AuditEntry(
                seq=r[0],
                draft=AuditDraft(
                    at=datetime.fromisoformat(r[1]),
                    action=r[2],
                    actor=r[3],
                    device_id=r[4],
                    fingerprint=r[5],
                    reason=r[6],
                    peer=r[7],
                    details=MappingProxyType(json.loads(r[8])),
                ),
                prev_hash=r[9],
                hash=r[10],
            )
            for r in rows
        ]

    async def _registry_salt(self) -> bytes:
        """A random per-registry salt for tombstones, made once."""
        async with self._transaction() as db:
            async with db.execute("SELECT value FROM meta_text WHERE key = 'salt'") as cur:
                row = await cur.fetchone()
            if row is not None:
                return bytes.fromhex(row[0])
            salt = privacy.new_key()
            await db.execute("INSERT INTO meta_text (key, value) VALUES ('salt', ?)", (salt.hex(),))
            return salt

    async def _append_audit_tx(self, db: aiosqlite.Connection, drafts: Sequence[AuditDraft]) -> None:
        """Append entries in their stored form: nothing personal about a device in clear (jitp.privacy)."""
        ids = sorted({d.device_id for d in drafts if d.device_id})
        keys = await self._load_keys(db, ids)
        # A refusal can name a device that was never provisioned: its entries get a key of their own.
        keys.update(await self._create_keys(db, [i for i in ids if i not in keys]))
        stored = [
            pseudonymize(d, keys) if d.device_id else seal_anonymous(d, self._audit_key) for d in drafts
        ]
        # Chain from the recorded head, not the last row: if someone removed the newest entries, the
        # next entry keeps the gap visible instead of papering over it.
        async with db.execute("SELECT value FROM meta_text WHERE key = 'audit_head'") as cur:
            row = await cur.fetchone()
        if row is not None:
            head_seq, _, head_hash = str(row[0]).partition(":")
            seq, prev = int(head_seq) + 1, head_hash
        else:
            seq, prev = 1, GENESIS_HASH
        entries = chain(stored, start_seq=seq, prev_hash=prev)
        await db.executemany(
            "INSERT INTO audit (seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, "
            "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    e.seq,
                    _ts(e.draft.at),
                    e.draft.action,
                    e.draft.actor,
                    e.draft.device_id,
                    e.draft.fingerprint,
                    e.draft.reason,
                    e.draft.peer,
                    json.dumps(dict(e.draft.details), sort_keys=True),
                    e.prev_hash,
                    e.hash,
                )
                for e in entries
            ],
        )
        last = entries[-1]
        await db.execute(
            "INSERT INTO meta_text (key, value) VALUES ('audit_head', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (f"{last.seq}:{last.hash}",),
        )

    async def audit_head(self) -> tuple[int, str] | None:
        """The (seq, hash) the registry last appended, to detect removal of the newest entries."""
        async with self._lock, self.db.execute("SELECT value FROM meta_text WHERE key = 'audit_head'") as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        seq, _, digest = str(row[0]).partition(":")
        return int(seq), digest

    async def resolve_audit(self, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
        """Entries with device refs and sealed peers resolved, for devices that still exist."""
        async with (
            self._lock,
            self.db.execute("SELECT device_id, kid, wrapped FROM keyring.data_keys") as cur,
        ):
            rows = await cur.fetchall()
        keys = {d: envelope.unwrap_data_key(self._keys, kid, d, bytes(w)) for d, kid, w in rows}
        return resolve_entries(entries, keys, self._audit_key)

    # -- keys (jitp keys rotate) -------------------------------------------------------------
    async def keyring_status(self) -> KeyringStatus:
        async with self._lock:
            primary = await self._scalar(self.db, "SELECT value FROM keyring.meta WHERE key = 'primary_kid'")
            async with self.db.execute(
                "SELECT kid, COUNT(*) FROM (SELECT kid FROM keyring.data_keys "
                "UNION ALL SELECT kid FROM keyring.registry_keys) GROUP BY kid"
            ) as cur:
                counts = {str(r[0]): int(r[1]) for r in await cur.fetchall()}
        return KeyringStatus(primary=str(primary), wrapped=MappingProxyType(counts))

    async def set_primary_key(self, kid: str, *, audit: AuditDraft) -> None:
        if kid not in self._keys.kids():
            self._keys.reload()
        if kid not in self._keys.kids():
            raise errors.MasterKeyMismatch(
                f"cannot make {kid} the primary master key: {self._keys.source} does not hold it", kid=kid
            )
        async with self._transaction() as db:
            await db.execute("UPDATE keyring.meta SET value = ? WHERE key = 'primary_kid'", (kid,))
            await self._append_audit_tx(db, [audit])

    async def rewrap_keys(self, *, limit: int = 500) -> int:
        async with self._transaction() as db:
            primary = str(await self._scalar(db, "SELECT value FROM keyring.meta WHERE key = 'primary_kid'"))
            async with db.execute(
                "SELECT device_id, kid, wrapped FROM keyring.data_keys WHERE kid != ? LIMIT ?",
                (primary, limit),
            ) as cur:
                data_rows = await cur.fetchall()
            rows = [
                (
                    primary,
                    envelope.wrap_data_key(
                        self._keys, primary, d, envelope.unwrap_data_key(self._keys, kid, d, bytes(w))
                    ),
                    d,
                )
                for d, kid, w in data_rows
            ]
            await db.executemany(
                "UPDATE keyring.data_keys SET kid = ?, wrapped = ? WHERE device_id = ?", rows
            )
            async with db.execute(
                "SELECT name, kid, wrapped FROM keyring.registry_keys WHERE kid != ? LIMIT ?",
                (primary, max(limit - len(rows), 0)),
            ) as cur:
                named = await cur.fetchall()
            await db.executemany(
                "UPDATE keyring.registry_keys SET kid = ?, wrapped = ? WHERE name = ?",
                [
                    (
                        primary,
                        envelope.wrap_registry_key(
                            self._keys, primary, n, envelope.unwrap_registry_key(self._keys, kid, n, bytes(w))
                        ),
                        n,
                    )
                    for n, kid, w in named
                ],
            )
        done = len(rows) + len(named)
        if done == 0:
            await self.checkpoint()  # the old wrapped forms leave the keyring's WAL
        return done

    # -- last_seen (write-behind) ----------------------------------------------------------
    def note_seen(self, device_id: str, at: datetime) -> None:
        """Record a reconnect; written with the next batch, the next flush_seen(), or on close."""
        self._touches[device_id] = at

    async def flush_seen(self) -> None:
        """Write the reconnects noted since the last write (the broker calls this every few seconds)."""
        if self._touches and self._db is not None:
            async with self._transaction():
                await self._flush_touches()

    async def _flush_touches(self) -> None:
        if not self._touches or self._db is None:
            return
        touches, self._touches = self._touches, {}
        await self._db.executemany(
            "UPDATE devices SET last_seen = ? WHERE device_id = ?", [(_ts(t), d) for d, t in touches.items()]
        )

    # -- the group-commit writer ------------------------------------------------------------
    def _check_writer(self) -> None:
        if self._writer is None or self._writer.done():
            raise errors.RegistryUnavailable("the registry writer is not running")

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            if self._batch_window > 0 and self._queue.empty():
                await asyncio.sleep(self._batch_window)
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._apply(batch)
            except Exception as exc:  # one bad batch must not stop every later join
                log.error("registry write failed for a batch of %d: %s", len(batch), exc)
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(errors.RegistryUnavailable(f"registry write failed: {exc}"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _apply(self, batch: list[_Provision | _Audit]) -> None:
        provisions = [op for op in batch if isinstance(op, _Provision)]
        results: dict[int, ProvisionOutcome | errors.ProvisioningError] = {}
        # Each certificate's tombstone ref, computed once: an erased certificate stays refused.
        tombstone = {
            p.identity.cert_fingerprint: privacy.tombstone_ref(self._salt, p.identity.cert_fingerprint)
            for p in provisions
        }
        if provisions:
            wanted: dict[str, list[str]] = {}
            for p in provisions:
                wanted.setdefault(p.identity.device_id, []).append(tombstone[p.identity.cert_fingerprint])
            await self._ensure_keys(wanted)
        async with self._transaction() as db:
            keys: dict[str, bytes] = {}
            existing: dict[str, DeviceRecord] = {}
            superseded: set[tuple[str, str]] = set()
            ids = sorted({p.identity.device_id for p in provisions})
            for chunk in _chunks(ids):
                for record in await self._select_records(
                    db, f"WHERE d.device_id IN ({_marks(chunk)})", chunk, keys
                ):
                    existing[record.device_id] = record
            erased: set[str] = set()
            if provisions:
                for chunk in _chunks(list(tombstone.values())):
                    async with db.execute(
                        f"SELECT ref FROM tombstones WHERE ref IN ({_marks(chunk)})", chunk
                    ) as cur:
                        erased.update(r[0] for r in await cur.fetchall())
            # A new record is sealed only under a key that is not being destroyed by an erasure
            # running meanwhile (CLI or another node): that join is told to come back (CONNACK 3).
            keys.update(await self._load_keys(db, [i for i in ids if i not in existing], usable_only=True))
            known = sorted(i for i in ids if i in existing)
            if known and any(p.policy != "reject" for p in provisions):
                for chunk in _chunks(known):
                    async with db.execute(
                        f"SELECT device_id, sealed_fp FROM cert_history WHERE device_id IN ({_marks(chunk)})",
                        chunk,
                    ) as cur:
                        superseded.update(
                            (d, envelope.open_fingerprint(keys[d], d, bytes(sealed)))
                            for d, sealed in await cur.fetchall()
                        )
            upserts: dict[str, DeviceRecord] = {}
            new_events: list[ProvisioningEvent] = []
            history: list[tuple[str, str, str]] = []  # device id, superseded fingerprint, when
            drafts: list[AuditDraft] = []
            for i, op in enumerate(batch):
                if isinstance(op, _Audit):
                    drafts.extend(op.drafts)
                    continue
                ref = tombstone[op.identity.cert_fingerprint]
                if ref in erased:
                    # Nothing that names the erased device is written again, not even in the audit trail.
                    results[i] = errors.DeviceErased(
                        "this certificate belonged to an erased device and stays refused", detail=ref
                    )
                    continue
                outcome = decide(
                    op.identity,
                    at=op.at,
                    policy=op.policy,
                    current=existing.get(op.identity.device_id),
                    superseded=superseded,
                )
                if isinstance(outcome, errors.ProvisioningError):
                    results[i] = outcome
                    continue
                results[i] = outcome
                if outcome.event is None:
                    self._touches[op.identity.device_id] = op.at
                    continue
                record, event = outcome.record, outcome.event
                if record.device_id not in keys:
                    results[i] = errors.RegistryUnavailable(
                        f"device {record.device_id!r} is being erased; try again", device_id=record.device_id
                    )
                    continue
                previous = existing.get(record.device_id)
                if previous is not None:
                    history.append((record.device_id, previous.cert_fingerprint, _ts(op.at)))
                    superseded.add((record.device_id, previous.cert_fingerprint))
                existing[record.device_id] = record
                upserts[record.device_id] = record
                new_events.append(event)
                drafts.append(
                    provisioned_draft(
                        record, event, previous=previous, at=op.at, peer=op.peer, policy=op.policy
                    )
                )
            if upserts:
                await db.executemany(
                    f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_DEVICE_MARKS}) ON CONFLICT(device_id) "
                    "DO UPDATE SET status=excluded.status, ca_id=excluded.ca_id, region=excluded.region, "
                    "not_after=excluded.not_after, provisioned_at=excluded.provisioned_at, "
                    "last_seen=excluded.last_seen, template=excluded.template, "
                    "template_version=excluded.template_version, fp_index=excluded.fp_index, sealed=excluded.sealed",
                    [self._device_row(r, keys[r.device_id]) for r in upserts.values()],
                )
                await self._insert_events(db, new_events, keys)
            if history:
                await db.executemany(
                    "INSERT INTO cert_history (device_id, fp_index, sealed_fp, superseded_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    [
                        (
                            d,
                            envelope.fingerprint_index(self._index_key, fp),
                            envelope.seal_fingerprint(keys[d], d, fp),
                            at,
                        )
                        for d, fp, at in history
                    ],
                )
            await self._flush_touches()
            if drafts:
                await self._append_audit_tx(db, drafts)
        for i, op in enumerate(batch):
            if op.future.done():
                continue
            if isinstance(op, _Audit):
                op.future.set_result(None)
                continue
            result = results[i]
            if isinstance(result, errors.ProvisioningError):
                op.future.set_exception(result)
            else:
                op.future.set_result(result)
