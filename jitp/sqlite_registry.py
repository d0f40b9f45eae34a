"""The embedded registry: SQLite (WAL) through aiosqlite.

Writes from concurrent joins are grouped: ``provision``, ``append_audit`` and ``last_seen``
updates are queued and a single writer task applies whatever has queued up as one
transaction (group commit), so a join storm costs one commit per batch, not per device.
``BEGIN IMMEDIATE`` takes SQLite's write lock first, and inserts use ``ON CONFLICT DO
NOTHING``, so several processes sharing the file (the broker and the CLI) stay race-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiosqlite

from jitp import errors, privacy
from jitp.audit import GENESIS_HASH, AuditDraft, AuditEntry, chain
from jitp.events import ProvisioningEvent, lifecycle_event, new_event_id, provisioned_event
from jitp.identity import DeviceIdentity
from jitp.records import Command, DeviceRecord, DeviceStatus
from jitp.registry import Erasure, ProvisionOutcome, StatusChange, decide, plan_status_change, pseudonymize
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
)

# An erased device's last event names it: once delivered over MQTT *and* past every event sink's
# cursor (a sink that is behind must still publish it in full), it goes too.
_SCRUB_ERASED = (
    "UPDATE outbox SET device_id = '', payload = X'' WHERE type = 'erased' AND device_id != '' "
    "AND delivered_at IS NOT NULL AND seq <= COALESCE((SELECT MIN(seq) FROM sink_cursors), seq)"
)

_DEVICE_COLUMNS = (
    "device_id, status, cert_fingerprint, ca_id, region, serial, subject, not_after, provisioned_at, "
    "last_seen, attributes, template, template_version, config"
)
_DEVICE_MARKS = ", ".join("?" * 14)


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _record(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        status=DeviceStatus(row[1]),
        cert_fingerprint=row[2],
        ca_id=row[3],
        region=row[4],
        serial=row[5],
        subject=row[6],
        not_after=datetime.fromisoformat(row[7]),
        provisioned_at=datetime.fromisoformat(row[8]),
        last_seen=_dt(row[9]),
        attributes=MappingProxyType(json.loads(row[10])),
        template=row[11],
        template_version=row[12],
        config=MappingProxyType(json.loads(row[13])),
    )


def _device_row(record: DeviceRecord) -> tuple[Any, ...]:
    return (
        record.device_id,
        str(record.status),
        record.cert_fingerprint,
        record.ca_id,
        record.region,
        record.serial,
        record.subject,
        _ts(record.not_after),
        _ts(record.provisioned_at),
        _ts(record.last_seen) if record.last_seen else None,
        json.dumps(dict(record.attributes), sort_keys=True),
        record.template,
        record.template_version,
        json.dumps(dict(record.config), sort_keys=True),
    )


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


def _event(row: Sequence[Any]) -> ProvisioningEvent:
    return ProvisioningEvent(
        event_id=row[0],
        type=row[1],
        device_id=row[2],
        occurred_at=datetime.fromisoformat(row[3]),
        payload=bytes(row[4]),
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
        synchronous: str = "FULL",
        max_batch: int = 512,
        batch_window: float = 0.002,
    ) -> None:
        self.path = Path(path)
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
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute(f"PRAGMA synchronous={self._synchronous}")
        await self._db.execute("PRAGMA busy_timeout=10000")
        await self._db.execute("PRAGMA secure_delete=ON")  # erased data is overwritten, not just unlinked
        await self._migrate()
        self._salt = await self._registry_salt()
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
        async with (
            self._lock,
            self.db.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?",
                (device_id,),
            ) as cur,
        ):
            row = await cur.fetchone()
        return _record(row) if row else None

    async def list_devices(self) -> list[DeviceRecord]:
        async with (
            self._lock,
            self.db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id") as cur,
        ):
            return [_record(r) for r in await cur.fetchall()]

    async def find_by_fingerprint(self, fingerprint: str) -> DeviceRecord | None:
        async with (
            self._lock,
            self.db.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE cert_fingerprint = ?", (fingerprint,)
            ) as cur,
        ):
            row = await cur.fetchone()
        return _record(row) if row else None

    async def is_erased(self, fingerprint: str) -> bool:
        ref = privacy.tombstone_ref(self._salt, fingerprint)
        async with self._lock, self.db.execute("SELECT 1 FROM tombstones WHERE ref = ?", (ref,)) as cur:
            return await cur.fetchone() is not None

    async def _fetch(self, db: aiosqlite.Connection, device_id: str) -> DeviceRecord:
        async with db.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise errors.NotFound(f"no device with id {device_id!r}", device_id=device_id)
        return _record(row)

    # -- lifecycle -------------------------------------------------------------------------
    async def change_status(
        self, device_id: str, command: Command, *, at: datetime, actor: str, reason: str | None = None
    ) -> StatusChange:
        async with self._transaction() as db:
            record = await self._fetch(db, device_id)
            change, draft = plan_status_change(record, command, at=at, actor=actor, reason=reason)
            if change.event is not None:
                await db.execute(
                    "UPDATE devices SET status = ? WHERE device_id = ?",
                    (str(change.record.status), device_id),
                )
                await self._insert_events(db, [change.event])
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
        """GDPR erasure: only a tombstone (salted hash of each certificate fingerprint) remains."""
        async with self._transaction() as db:
            if device_id is None:
                if fingerprint is None:
                    raise errors.InvalidRequest("erase needs a device id or a certificate")
                async with db.execute(
                    "SELECT device_id FROM devices WHERE cert_fingerprint = ?", (fingerprint,)
                ) as cur:
                    row = await cur.fetchone()
                if row is None:
                    ref = privacy.tombstone_ref(self._salt, fingerprint)
                    async with db.execute("SELECT 1 FROM tombstones WHERE ref = ?", (ref,)) as cur:
                        if await cur.fetchone() is not None:
                            return Erasure(device_id=None, already_erased=True)
                    raise errors.NotFound("no device holds this certificate")
                device_id = str(row[0])
            record = await self._fetch(db, device_id)
            async with db.execute(
                "SELECT cert_fingerprint FROM cert_history WHERE device_id = ?", (device_id,)
            ) as cur:
                fingerprints = {record.cert_fingerprint, *(r[0] for r in await cur.fetchall())}
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
            for table in ("outbox", "cert_history", "device_keys", "devices"):
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
            await self._insert_events(db, [event])
            self._touches.pop(device_id, None)
        await self.checkpoint()
        return Erasure(device_id=device_id, event=event)

    async def checkpoint(self) -> bool:
        """Fold the WAL into the database file and truncate it (so erased pages leave the WAL too)."""
        async with self._lock, self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
            row = await cur.fetchone()
        complete = row is not None and int(row[0]) == 0
        if not complete:
            log.warning(
                "WAL checkpoint incomplete (a reader is busy); erased pages leave the WAL on the next one"
            )
        return complete

    @staticmethod
    async def _insert_events(db: aiosqlite.Connection, events: Sequence[ProvisioningEvent]) -> None:
        await db.executemany(
            "INSERT INTO outbox (event_id, type, device_id, occurred_at, payload) VALUES (?, ?, ?, ?, ?)",
            [(e.event_id, e.type, e.device_id, _ts(e.occurred_at), e.payload) for e in events],
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
            await db.executemany(
                "UPDATE devices SET attributes = ?, template_version = ?, config = ? WHERE device_id = ? AND template = ?",
                [
                    (
                        json.dumps(dict(r.attributes), sort_keys=True),
                        r.template_version,
                        json.dumps(dict(r.config), sort_keys=True),
                        r.device_id,
                        template,
                    )
                    for r in records
                ],
            )
            await self._insert_events(db, events)
            await self._append_audit_tx(
                db,
                [
                    AuditDraft(
                        at=at,
                        action="template-changed",
                        actor=actor,
                        details=MappingProxyType({"template": template, "devices": str(len(records))}),
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
                "SELECT event_id, type, device_id, occurred_at, payload FROM outbox WHERE delivered_at IS NULL "
                "ORDER BY seq LIMIT ?",
                (limit,),
            ) as cur,
        ):
            return [_event(r) for r in await cur.fetchall()]

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
                "SELECT seq, event_id, type, device_id, occurred_at, payload FROM outbox "
                "WHERE seq > ? AND NOT (type = 'erased' AND device_id = '') ORDER BY seq LIMIT ?",
                (seq, limit),
            ) as cur,
        ):
            return [(int(r[0]), _event(r[1:])) for r in await cur.fetchall()]

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
        sql = "SELECT event_id, type, device_id, occurred_at, payload FROM outbox"
        args: tuple[str, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id = ?"
            args = (device_id,)
        async with self._lock, self.db.execute(sql + " ORDER BY seq", args) as cur:
            return [_event(r) for r in await cur.fetchall()]

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

    @staticmethod
    async def _device_keys(db: aiosqlite.Connection, ids: Sequence[str], *, create: bool) -> dict[str, bytes]:
        keys: dict[str, bytes] = {}
        wanted = sorted(set(ids))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            async with db.execute(
                f"SELECT device_id, ref_key FROM device_keys WHERE device_id IN ({marks})", chunk
            ) as cur:
                keys.update({r[0]: bytes(r[1]) for r in await cur.fetchall()})
        missing = [i for i in wanted if i not in keys]
        if create and missing:
            fresh = {i: privacy.new_key() for i in missing}
            await db.executemany(
                "INSERT INTO device_keys (device_id, ref_key) VALUES (?, ?)", list(fresh.items())
            )
            keys.update(fresh)
        return keys

    async def _append_audit_tx(self, db: aiosqlite.Connection, drafts: Sequence[AuditDraft]) -> None:
        """Append entries in their stored form: nothing personal about a device in clear (jitp.privacy)."""
        keys = await self._device_keys(db, [d.device_id for d in drafts if d.device_id], create=True)
        stored = [pseudonymize(d, keys) for d in drafts]
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
        async with self._lock, self.db.execute("SELECT device_id, ref_key FROM device_keys") as cur:
            rows = await cur.fetchall()
        by_ref = {privacy.device_ref(bytes(k), d): (d, bytes(k)) for d, k in rows}
        out = []
        for e in entries:
            found = by_ref.get(e.draft.device_id or "")
            if found is None:
                out.append(e)
                continue
            device_id, key = found
            peer = privacy.unseal(key, e.draft.peer) if e.draft.peer else None
            out.append(
                dataclasses.replace(e, draft=dataclasses.replace(e.draft, device_id=device_id, peer=peer))
            )
        return out

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
            except (sqlite3.Error, ValueError) as exc:
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
        async with self._transaction() as db:
            existing: dict[str, DeviceRecord] = {}
            superseded: set[tuple[str, str]] = set()
            ids = sorted({p.identity.device_id for p in provisions})
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                async with db.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id IN ({marks})", chunk
                ) as cur:
                    for row in await cur.fetchall():
                        existing[row[0]] = _record(row)
            erased: set[str] = set()
            if provisions:
                refs = {privacy.tombstone_ref(self._salt, p.identity.cert_fingerprint) for p in provisions}
                marks = ",".join("?" * len(refs))
                async with db.execute(
                    f"SELECT ref FROM tombstones WHERE ref IN ({marks})", sorted(refs)
                ) as cur:
                    erased = {r[0] for r in await cur.fetchall()}
            known = sorted(i for i in ids if i in existing)
            if known and any(p.policy != "reject" for p in provisions):
                marks = ",".join("?" * len(known))
                async with db.execute(
                    f"SELECT device_id, cert_fingerprint FROM cert_history WHERE device_id IN ({marks})",
                    known,
                ) as cur:
                    superseded = {(r[0], r[1]) for r in await cur.fetchall()}
            upserts: dict[str, DeviceRecord] = {}
            new_events: list[tuple[Any, ...]] = []
            history: list[tuple[str, str, str]] = []
            drafts: list[AuditDraft] = []
            for i, op in enumerate(batch):
                if isinstance(op, _Audit):
                    drafts.extend(op.drafts)
                    continue
                if privacy.tombstone_ref(self._salt, op.identity.cert_fingerprint) in erased:
                    # Nothing that names the erased device is written again, not even in the audit trail.
                    results[i] = errors.DeviceErased(
                        "this certificate belonged to an erased device and stays refused",
                        detail=privacy.tombstone_ref(self._salt, op.identity.cert_fingerprint),
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
                previous = existing.get(record.device_id)
                if previous is not None:
                    history.append((record.device_id, previous.cert_fingerprint, _ts(op.at)))
                    superseded.add((record.device_id, previous.cert_fingerprint))
                existing[record.device_id] = record
                upserts[record.device_id] = record
                new_events.append((event.event_id, event.type, event.device_id, _ts(op.at), event.payload))
                details = {"ca_id": record.ca_id, "region": record.region, "event_id": event.event_id}
                if previous is not None:
                    details["previous_fingerprint"] = previous.cert_fingerprint
                    details["policy"] = op.policy
                drafts.append(
                    AuditDraft(
                        at=op.at,
                        action=event.type,
                        actor="device",
                        device_id=record.device_id,
                        fingerprint=record.cert_fingerprint,
                        peer=op.peer,
                        details=MappingProxyType(details),
                    )
                )
            if upserts:
                await db.executemany(
                    f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_DEVICE_MARKS}) ON CONFLICT(device_id) "
                    "DO UPDATE SET status=excluded.status, cert_fingerprint=excluded.cert_fingerprint, "
                    "ca_id=excluded.ca_id, region=excluded.region, serial=excluded.serial, subject=excluded.subject, "
                    "not_after=excluded.not_after, provisioned_at=excluded.provisioned_at, "
                    "last_seen=excluded.last_seen, attributes=excluded.attributes, template=excluded.template, "
                    "template_version=excluded.template_version, config=excluded.config",
                    [_device_row(r) for r in upserts.values()],
                )
                await db.executemany(
                    "INSERT INTO outbox (event_id, type, device_id, occurred_at, payload) VALUES (?, ?, ?, ?, ?)",
                    new_events,
                )
            if history:
                await db.executemany(
                    "INSERT INTO cert_history (device_id, cert_fingerprint, superseded_at) VALUES (?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    history,
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
