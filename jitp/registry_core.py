"""The registry, written once over a small storage port.

:class:`RegistryCore` is the :class:`~jitp.registry.Registry`: the group-commit writer and the
batch decisions (:func:`~jitp.registry.decide`), sealing at rest (:mod:`jitp.envelope`),
pseudonymous audit entries and their hash chain, the erasure plan, the keyring's pairing and key
rotation, the upgrade of a registry written before encryption at rest. A backend implements only
:class:`Storage` and :class:`Tx`: connections and transactions, locking, array binding, where the
keyring lives and whether it commits with the registry, and its SQL dialect. The SQL here is
written once in the dialect :class:`Tx` documents; a backend translates it.

What keeps provisioning race-free, on any backend: current records are read locked (``FOR
UPDATE``: PostgreSQL row locks; SQLite's writer holds the whole database from ``BEGIN
IMMEDIATE``), and a new device is inserted with ``ON CONFLICT DO NOTHING``. A device another node
created meanwhile (its insert won) is read again, locked, and its requests are decided again
against that node's record. The unique index ``outbox_one_provisioned`` guarantees a single
``provisioned`` event per device whatever happens.

The audit trail is one hash chain across nodes: every append locks the ``audit_head`` row of
``meta_text``, takes seq and previous hash from it, inserts and moves the head, in the writing
transaction. That lock is the last one a transaction takes (held to its commit), and outbox events
are inserted under it too, so outbox seq order is commit order (``events_after`` relies on it).

Where the keyring commits apart from the registry (:attr:`Storage.keyring_apart`: SQLite, another
file), a data key is committed *before* the first row it protects (a crash may leave an unused
key, never an unreadable record) and an erasure runs in three steps: the key is marked
``erasing``, the rows go, then the key (again at the next open if a crash came first). Nothing new
is sealed under a key marked so. Where it commits with the registry (PostgreSQL, another schema),
keys are made and destroyed in the transaction of the rows they protect.
"""

# ruff: noqa: S608  (only constant SQL fragments are interpolated; values are always bound)
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol, Self, TypeVar

from jitp import envelope, errors, privacy
from jitp.audit import GENESIS_HASH, AuditDraft, AuditEntry, chain
from jitp.events import ProvisioningEvent, lifecycle_event, new_event_id, provisioned_event
from jitp.identity import DeviceIdentity
from jitp.keys import MasterKeyProvider, require_kids
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
from jitp.registry_schema import ColumnTypes, migrations
from jitp.trust import Role, TrustAnchor

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = Sequence[Any]
RETRIES = 5  # transactions another node's got in the way of; provisioning decisions against a lost insert


# -- the port ---------------------------------------------------------------------------------
class Tx(Protocol):
    """A connection inside a transaction (or a read), in the registry's SQL: ``?`` placeholders;
    ``col = ANY(?)`` with a list of values; keyring tables named ``keyring.<table>``; a trailing
    ``FOR UPDATE [OF t] [SKIP LOCKED]`` or ``FOR SHARE`` where the backend has row locks (a backend
    without drops it: its transactions hold the whole database); values are str, int, bool, bytes,
    datetime or None. Timestamps read back as datetime or ISO-8601 text (see :func:`timestamp`)."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """The number of rows changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def has_table(self, name: str) -> bool: ...


class Storage(Protocol):
    """What a backend implements: its database, reached through transactions."""

    where: str  # the registry, for messages (a path, a DSN without its password)
    keyring: str  # the keyring, for messages
    keyring_apart: bool  # True: the keyring commits apart from the registry (see the module doc)
    types: ColumnTypes  # the column types of its migrations
    setup: tuple[str, ...]  # idempotent statements run before the migrations (schemas, the keyring)
    failures: tuple[type[Exception], ...]  # errors that fail a request (bad data), not the registry

    async def open(self) -> None:
        """Connect. :class:`~jitp.errors.RegistryUnavailable` (or ConfigError) when it cannot."""
        ...

    async def close(self) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """One read, outside any write transaction."""
        ...

    async def write(self, body: Callable[[Tx], Awaitable[T]], *, exclusive: bool = False) -> T:
        """``body`` in one transaction, serialised with the writers it could race (run again if
        another node's transaction got in the way). ``exclusive``: also with every other node's
        exclusive transactions (opening: migrations, the keyring's pairing, sealing old rows)."""
        ...

    async def checkpoint(self) -> bool:
        """Make what was deleted leave the database's logs too (erasures); True when complete."""
        ...


# -- SQL, in the dialect of Tx ------------------------------------------------------------------
_DEVICE_COLUMNS = (
    "device_id, status, ca_id, region, not_after, provisioned_at, last_seen, template, template_version, "
    "fp_index, sealed"
)
_INSERT_DEVICE = (
    f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({', '.join('?' * 11)}) ON CONFLICT DO NOTHING"
)
_UPDATE_DEVICE = (
    "UPDATE devices SET status = ?, ca_id = ?, region = ?, not_after = ?, provisioned_at = ?, last_seen = ?, "
    "template = ?, template_version = ?, fp_index = ?, sealed = ? WHERE device_id = ?"
)
# A device row with its wrapped data key (NULL: the key is gone, the row can no longer be read).
_DEVICES = (
    "SELECT d.device_id, d.status, d.ca_id, d.region, d.not_after, d.provisioned_at, d.last_seen, d.template, "
    "d.template_version, d.sealed, k.kid, k.wrapped FROM devices d LEFT JOIN keyring.data_keys k "
    "ON k.device_id = d.device_id"
)
# Events whose data key is gone (rows of an erased device, from a copy of the registry older than the
# erasure) cannot be read: left out here already, before any LIMIT, so that they cannot hide the rest.
_EVENTS = (
    "SELECT o.seq, o.event_id, o.type, o.device_id, o.occurred_at, o.payload, k.kid, k.wrapped FROM outbox o "
    "LEFT JOIN keyring.data_keys k ON k.device_id = o.device_id WHERE (k.device_id IS NOT NULL OR o.type = 'erased')"
)
_INSERT_HISTORY = (
    "INSERT INTO cert_history (device_id, fp_index, sealed_fp, superseded_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
_ANCHOR_COLUMNS = "ca_id, cert_der, role, subject, region, template, enabled, registered_at"
_DATA_KEYS = "SELECT device_id, kid, wrapped FROM keyring.data_keys WHERE device_id = ANY(?)"
_INSERT_DATA_KEY = (
    "INSERT INTO keyring.data_keys (device_id, kid, wrapped) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
)
_HEAD = "SELECT value FROM meta_text WHERE key = 'audit_head'"
_PRIMARY = "SELECT value FROM keyring.meta WHERE key = 'primary_kid'"
# An erased device's last event names it: once delivered over MQTT *and* past every event sink's
# cursor (a sink that is behind must still publish it in full), it goes too.
_SCRUB_ERASED = (
    "UPDATE outbox SET device_id = '', payload = ? WHERE type = 'erased' AND device_id <> '' "
    "AND delivered_at IS NOT NULL AND seq <= COALESCE((SELECT MIN(seq) FROM sink_cursors), seq)"
)


def timestamp(value: Any) -> Any:
    """A stored timestamp as a datetime: PostgreSQL reads them so, SQLite as ISO-8601 text."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


async def _value(tx: Tx, sql: str, *args: Any) -> Any:
    rows = await tx.fetch(sql, *args)
    return rows[0][0] if rows else None


def _anchor(row: Row) -> TrustAnchor:
    return TrustAnchor(
        ca_id=row[0],
        cert_der=bytes(row[1]),
        role=Role(row[2]),
        subject=row[3],
        region=row[4],
        template=row[5],
        enabled=bool(row[6]),
        registered_at=timestamp(row[7]),
    )


def _legacy_record(row: Row) -> DeviceRecord:
    """A device row of schema version 2 (everything in clear)."""
    return DeviceRecord(
        device_id=row[0],
        status=DeviceStatus(row[1]),
        cert_fingerprint=row[2],
        ca_id=row[3],
        region=row[4],
        serial=row[5],
        subject=row[6],
        not_after=timestamp(row[7]),
        provisioned_at=timestamp(row[8]),
        last_seen=timestamp(row[9]),
        attributes=MappingProxyType(json.loads(row[10])),
        template=row[11],
        template_version=row[12],
        config=MappingProxyType(json.loads(row[13])),
    )


# -- the group-commit writer's requests ---------------------------------------------------------
@dataclass(frozen=True)
class _Provision:
    identity: DeviceIdentity
    at: datetime
    peer: str | None
    policy: str
    future: asyncio.Future[ProvisionOutcome]


@dataclass(frozen=True)
class _Audit:
    drafts: Sequence[AuditDraft]
    future: asyncio.Future[None]


_Op = _Provision | _Audit
_Result = ProvisionOutcome | errors.ProvisioningError | None


@dataclass
class _Group:
    """The requests of one batch for one device id, decided in order against one current record."""

    current: DeviceRecord | None  # as read from the database
    results: dict[int, ProvisionOutcome | errors.ProvisioningError] = field(default_factory=dict)
    record: DeviceRecord | None = None  # what to write (None: nothing)
    events: list[tuple[int, ProvisioningEvent]] = field(default_factory=list)
    history: list[tuple[str, str, datetime]] = field(default_factory=list)  # superseded certificates
    drafts: list[tuple[int, AuditDraft]] = field(default_factory=list)
    touches: dict[str, datetime] = field(default_factory=dict)

    @property
    def creates(self) -> bool:
        return self.current is None and self.record is not None

    def fail(self, error: errors.ProvisioningError) -> None:
        """Every request the group admitted fails with ``error`` instead; nothing is written."""
        self.results = {i: error if isinstance(r, ProvisionOutcome) else r for i, r in self.results.items()}
        self.record, self.events, self.history, self.drafts, self.touches = None, [], [], [], {}


class RegistryCore:
    """A :class:`~jitp.registry.Registry` over a backend's :class:`Storage`.

    ``keys`` unwrap the data keys (:class:`~jitp.errors.MasterKeyError` at :meth:`open` when they
    cannot); ``max_batch`` and ``batch_window`` (seconds) shape the group commit; ``clock`` dates
    the migrations."""

    def __init__(
        self,
        storage: Storage,
        keys: MasterKeyProvider,
        *,
        max_batch: int = 512,
        batch_window: float = 0.002,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = storage
        self._keys = keys
        self._max_batch = max_batch
        self._batch_window = batch_window
        self._clock = clock
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._touches: dict[str, datetime] = {}
        self._salt = self._index_key = self._audit_key = b""

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, migrate, check the keyring (nothing is read unverified), seal old rows."""
        await self._store.open()
        try:
            await self._write(self._migrate, exclusive=True)
            await self._seal_legacy()
        except BaseException:
            await self._store.close()
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="jitp-registry-writer")

    async def close(self) -> None:
        if self._writer is None:
            return
        await self._queue.join()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None
        touches, self._touches = self._touches, {}
        try:
            if touches:
                await self._write(lambda tx: self._touch(tx, touches))
        except errors.ProvisioningError as exc:
            log.warning("last_seen of %d device(s) not written: %s", len(touches), exc)
        finally:
            await self._store.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _write(self, body: Callable[[Tx], Awaitable[T]], *, exclusive: bool = False) -> T:
        try:
            return await self._store.write(body, exclusive=exclusive)
        except self._store.failures as exc:
            raise errors.RegistryUnavailable(f"registry write failed: {exc}") from None

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            return await self._store.fetch(sql, *args)
        except self._store.failures as exc:
            raise errors.RegistryUnavailable(f"registry read failed: {exc}") from None

    async def checkpoint(self) -> bool:
        """Fold erased pages and destroyed keys out of the database's logs (SQLite's WAL)."""
        return await self._store.checkpoint()

    async def schema_version(self) -> int:
        rows = await self._fetch("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(rows[0][0])

    async def _migrate(self, tx: Tx) -> None:
        """Apply the migrations the database lacks, in order, each recorded in ``schema_migrations``;
        then open the keyring, in the same transaction: a keyring refused is not left created."""
        for statement in self._store.setup:
            await tx.execute(statement)
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            f"(version INTEGER PRIMARY KEY, applied_at {self._store.types.time})"
        )
        current = int(await _value(tx, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))
        steps = migrations(self._store.types)
        if current > len(steps):
            raise errors.ConfigError(
                f"the database schema is version {current}, newer than this jitp ({len(steps)}); upgrade jitp",
                where=self._store.where,
            )
        for version in range(current + 1, len(steps) + 1):
            for statement in steps[version - 1].split(";"):
                if statement.strip():
                    await tx.execute(statement)
            await tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", version, self._clock()
            )
            log.info("registry schema migrated to version %d", version)
        await self._open_keyring(tx)

    # -- keyring -------------------------------------------------------------------------
    async def _open_keyring(self, tx: Tx) -> None:
        """Check that the keyring belongs to this registry and that the master keys hold every key
        it is wrapped under (MasterKeyMismatch otherwise); load (or make) the registry keys and the
        tombstones' salt."""
        reg_id = await _value(tx, "SELECT value FROM meta_text WHERE key = 'keyring_id'")
        ring_id = await _value(tx, "SELECT value FROM keyring.meta WHERE key = 'keyring_id'")
        paired = pair_keyring(
            reg_id,
            ring_id,
            has_devices=bool(await tx.fetch("SELECT 1 FROM devices LIMIT 1")),
            has_keys=bool(await tx.fetch("SELECT 1 FROM keyring.data_keys LIMIT 1")),
            keyring=self._store.keyring,
            where=self._store.where,
        )
        paired = paired or privacy.new_key().hex()[:32]
        if reg_id is None:
            await tx.execute("INSERT INTO meta_text (key, value) VALUES ('keyring_id', ?)", paired)
        if ring_id is None:
            await tx.execute("INSERT INTO keyring.meta (key, value) VALUES ('keyring_id', ?)", paired)
        primary = await _value(tx, _PRIMARY)
        if primary is None:
            primary = self._keys.kids()[0]
            await tx.execute("INSERT INTO keyring.meta (key, value) VALUES ('primary_kid', ?)", primary)
        rows = await tx.fetch("SELECT kid FROM keyring.data_keys UNION SELECT kid FROM keyring.registry_keys")
        require_kids(self._keys, sorted({str(primary), *(str(r[0]) for r in rows)}), where=self._store.where)
        self._index_key = await self._registry_key(tx, envelope.INDEX_KEY)
        self._audit_key = await self._registry_key(tx, envelope.AUDIT_KEY)
        salt = privacy.new_key().hex()  # a random per-registry salt for tombstones, made once
        await tx.execute("INSERT INTO meta_text (key, value) VALUES ('salt', ?) ON CONFLICT DO NOTHING", salt)
        self._salt = bytes.fromhex(str(await _value(tx, "SELECT value FROM meta_text WHERE key = 'salt'")))
        if (
            self._store.keyring_apart
        ):  # finish erasures a crash interrupted: their rows are gone, so go their keys
            await tx.execute(
                "DELETE FROM keyring.data_keys WHERE erasing = 1 AND device_id NOT IN (SELECT device_id FROM devices)"
            )

    async def _registry_key(self, tx: Tx, name: str) -> bytes:
        """Registry key ``name`` of the keyring, made if absent (whichever node is first)."""
        query = "SELECT kid, wrapped FROM keyring.registry_keys WHERE name = ?"
        rows = await tx.fetch(query, name)
        if not rows:
            primary = await self._primary(tx)
            wrapped = envelope.wrap_registry_key(self._keys, primary, name, envelope.new_data_key())
            await tx.execute(
                "INSERT INTO keyring.registry_keys (name, kid, wrapped) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                name,
                primary,
                wrapped,
            )
            rows = await tx.fetch(query, name)
        return envelope.unwrap_registry_key(self._keys, str(rows[0][0]), name, bytes(rows[0][1]))

    async def _primary(self, tx: Tx) -> str:
        """The primary kid, share-locked to the end of the transaction: set_primary_key's update
        waits for every transaction wrapping under the old primary, so none does once it committed."""
        return str(await _value(tx, _PRIMARY + " FOR SHARE"))

    def _unwrap(self, rows: Iterable[Row]) -> dict[str, bytes]:
        """``device_id, kid, wrapped`` rows as data keys by device id."""
        return {
            str(d): envelope.unwrap_data_key(self._keys, str(kid), str(d), bytes(w)) for d, kid, w in rows
        }

    async def _data_keys(
        self, tx: Tx, ids: Iterable[str], *, create: bool, live_only: bool = False
    ) -> dict[str, bytes]:
        """The data keys of ``ids``, unwrapped; with ``create``, made (under the primary) for those
        without one, or read back where another node made one first. ``live_only``: not the key of
        a device being erased (nothing new may be sealed under a key about to be destroyed)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        live = " AND erasing = 0" if live_only and self._store.keyring_apart else ""
        keys = self._unwrap(await tx.fetch(_DATA_KEYS + live, wanted))
        missing = [i for i in wanted if i not in keys]
        if missing and create:
            primary = await self._primary(tx)
            await tx.executemany(
                _INSERT_DATA_KEY,
                [
                    (i, primary, envelope.wrap_data_key(self._keys, primary, i, envelope.new_data_key()))
                    for i in missing
                ],
            )
            keys.update(self._unwrap(await tx.fetch(_DATA_KEYS, missing)))
        return keys

    async def _ensure_keys(self, wanted: dict[str, list[str]]) -> None:
        """Where the keyring commits apart: data keys for the devices about to be written
        (``device_id -> tombstone refs of the certificates``), committed before any row they
        protect. A device whose certificates are all erased gets none; a key being destroyed by an
        erasure is replaced, unless its device still exists."""
        ids = sorted(wanted)
        have = {r[0] for r in await self._fetch(_DATA_KEYS + " AND erasing = 0", ids)}
        if have.issuperset(ids):
            return

        async def body(tx: Tx) -> None:
            missing = [d for d in ids if d not in have]
            rows = await tx.fetch(
                "SELECT k.device_id FROM keyring.data_keys k WHERE k.device_id = ANY(?) AND (k.erasing = 0 "
                "OR EXISTS (SELECT 1 FROM devices d WHERE d.device_id = k.device_id))",
                missing,
            )
            refs = {d: wanted[d] for d in missing if d not in {r[0] for r in rows}}
            erased = await self._tombstoned(tx, [ref for group in refs.values() for ref in group])
            create = sorted(d for d, group in refs.items() if not erased.issuperset(group))
            # Rows of these ids without any key were shredded (a registry restored from a backup older
            # than their erasure): unreadable for good, they make way for the new device.
            shredded = await tx.fetch(
                "SELECT device_id FROM devices WHERE device_id = ANY(?) "
                "AND device_id NOT IN (SELECT device_id FROM keyring.data_keys)",
                create,
            )
            await self._drop_orphans(tx, [r[0] for r in shredded])
            primary = await self._primary(tx)
            await tx.executemany(
                "INSERT INTO keyring.data_keys (device_id, kid, wrapped, erasing) VALUES (?, ?, ?, 0) "
                "ON CONFLICT (device_id) DO UPDATE SET kid = excluded.kid, wrapped = excluded.wrapped, erasing = 0",
                [
                    (d, primary, envelope.wrap_data_key(self._keys, primary, d, envelope.new_data_key()))
                    for d in create
                ],
            )

        await self._write(body)

    # -- rows ------------------------------------------------------------------------------
    def _open_device(self, row: Row) -> tuple[DeviceRecord, bytes] | None:
        """A ``_DEVICES`` row opened, with its data key; None when the key is gone (shredded: the
        row comes from a copy of the registry older than the device's erasure)."""
        if row[10] is None:
            # Not named: the id is all that is left of an erased device.
            log.warning(
                "a device row has no data key (erased; a registry copy older than its erasure?): ignored"
            )
            return None
        device_id = str(row[0])
        key = envelope.unwrap_data_key(self._keys, str(row[10]), device_id, bytes(row[11]))
        record = envelope.open_record(
            key,
            bytes(row[9]),
            device_id=device_id,
            status=row[1],
            ca_id=row[2],
            region=row[3],
            not_after=timestamp(row[4]),
            provisioned_at=timestamp(row[5]),
            last_seen=timestamp(row[6]),
            template=row[7],
            template_version=row[8],
        )
        return record, key

    def _opened(self, rows: Iterable[Row]) -> list[tuple[DeviceRecord, bytes]]:
        return [opened for row in rows if (opened := self._open_device(row)) is not None]

    def _device_row(self, record: DeviceRecord, key: bytes) -> tuple[Any, ...]:
        return (
            record.device_id,
            str(record.status),
            record.ca_id,
            record.region,
            record.not_after,
            record.provisioned_at,
            record.last_seen,
            record.template,
            record.template_version,
            envelope.fingerprint_index(self._index_key, record.cert_fingerprint),
            envelope.seal_record(key, record),
        )

    def _history_row(self, device_id: str, fingerprint: str, at: Any, key: bytes) -> tuple[Any, ...]:
        return (
            device_id,
            envelope.fingerprint_index(self._index_key, fingerprint),
            envelope.seal_fingerprint(key, device_id, fingerprint),
            at,
        )

    def _open_events(self, rows: Iterable[Row]) -> list[tuple[int, ProvisioningEvent]]:
        """``_EVENTS`` rows, payloads opened (each device's key unwrapped once); those that do not
        open are left out."""
        keys: dict[str, bytes | None] = {}
        out = []
        for seq, event_id, type_, device_id, occurred_at, payload, kid, wrapped in rows:
            stored = bytes(payload)
            if stored[:1] == envelope.SEALED_VERSION and device_id not in keys:
                keys[device_id] = (
                    envelope.unwrap_data_key(self._keys, kid, device_id, bytes(wrapped))
                    if kid is not None
                    else None
                )
            try:
                opened = envelope.open_payload(keys.get(device_id), device_id, stored)
            except errors.RegistryUnavailable as exc:
                log.warning("outbox event %s left out: %s", event_id, exc)
                continue
            event = ProvisioningEvent(
                event_id=event_id,
                type=type_,
                device_id=device_id,
                occurred_at=timestamp(occurred_at),
                payload=opened,
            )
            out.append((int(seq), event))
        return out

    async def _lock_records(
        self, tx: Tx, ids: Sequence[str], *, history: bool = False
    ) -> tuple[dict[str, tuple[DeviceRecord, bytes]], set[tuple[str, str]]]:
        """Current records with their keys (locked, in id order) and, with ``history``, their
        superseded certificates. Rows whose key is gone (restored from a copy older than the
        device's erasure) can never be read again: they are removed, and the device is new."""
        rows = await tx.fetch(
            f"{_DEVICES} WHERE d.device_id = ANY(?) ORDER BY d.device_id FOR UPDATE OF d", ids
        )
        existing = {r.device_id: (r, key) for r, key in self._opened(rows)}
        await self._drop_orphans(tx, sorted({str(r[0]) for r in rows} - set(existing)))
        superseded: set[tuple[str, str]] = set()
        if history and existing:
            rows = await tx.fetch(
                "SELECT device_id, sealed_fp FROM cert_history WHERE device_id = ANY(?)", sorted(existing)
            )
            superseded = {(d, envelope.open_fingerprint(existing[d][1], d, bytes(s))) for d, s in rows}
        return existing, superseded

    async def _lock_record(self, tx: Tx, device_id: str) -> tuple[DeviceRecord, bytes]:
        """The record (locked) and its data key; NotFound when absent or shredded."""
        existing, _ = await self._lock_records(tx, [device_id])
        if device_id not in existing:
            raise errors.NotFound(f"no device with id {device_id!r}", device_id=device_id)
        return existing[device_id]

    @staticmethod
    async def _drop_orphans(tx: Tx, ids: Sequence[str]) -> None:
        if ids:
            await tx.execute("DELETE FROM cert_history WHERE device_id = ANY(?)", ids)
            await tx.execute("DELETE FROM outbox WHERE device_id = ANY(?) AND type <> 'erased'", ids)
            await tx.execute("DELETE FROM devices WHERE device_id = ANY(?)", ids)

    @staticmethod
    async def _tombstoned(tx: Tx, refs: Iterable[str]) -> set[str]:
        wanted = sorted(set(refs))
        return (
            {r[0] for r in await tx.fetch("SELECT ref FROM tombstones WHERE ref = ANY(?)", wanted)}
            if wanted
            else set()
        )

    async def _touch(self, tx: Tx, touches: dict[str, datetime]) -> None:
        """Reconnect times; last_seen never goes back (two nodes may write them out of order)."""
        await tx.executemany(
            "UPDATE devices SET last_seen = ? WHERE device_id = ? AND (last_seen IS NULL OR last_seen < ?)",
            [(at, device_id, at) for device_id, at in sorted(touches.items())],
        )

    async def _pseudonymize(
        self, tx: Tx, drafts: Sequence[AuditDraft], known: dict[str, bytes]
    ) -> list[AuditDraft]:
        """Drafts in their stored form: nothing personal about a device in clear (jitp.privacy).

        An entry about a device uses its data key (made if absent: a refusal can name a device that
        was never provisioned); one about no device is sealed under the registry's audit key."""
        ids = {d.device_id for d in drafts if d.device_id}
        keys = {i: known[i] for i in ids if i in known}
        keys.update(await self._data_keys(tx, ids - set(keys), create=True))
        return [pseudonymize(d, keys) if d.device_id else seal_anonymous(d, self._audit_key) for d in drafts]

    async def _log(
        self,
        tx: Tx,
        events: Sequence[ProvisioningEvent],
        drafts: Sequence[AuditDraft],
        keys: dict[str, bytes] | None = None,
    ) -> None:
        """Write outbox events (payloads sealed under their device's key in ``keys``; an erasure's
        event, whose key is destroyed, names only the id and region, both in clear anyway) and audit
        entries, chained. Drafts are pseudonymised first: making a key takes a lock (the primary
        kid's) that must come before the audit head's, the last lock, held to the commit."""
        keys = keys or {}
        stored = await self._pseudonymize(tx, drafts, keys)
        if not events and not stored:
            return
        # Chain from the recorded head, not the last row: if someone removed the newest entries, the
        # next entry keeps the gap visible instead of papering over it.
        head = str(await _value(tx, _HEAD + " FOR UPDATE") or f"0:{GENESIS_HASH}")
        await tx.executemany(
            "INSERT INTO outbox (event_id, type, device_id, occurred_at, payload) VALUES (?, ?, ?, ?, ?)",
            [
                (
                    e.event_id,
                    e.type,
                    e.device_id,
                    e.occurred_at,
                    e.payload
                    if e.type == "erased"
                    else envelope.seal_payload(keys[e.device_id], e.device_id, e.payload),
                )
                for e in events
            ],
        )
        if not stored:
            return
        seq, _, prev = head.partition(":")
        entries = chain(stored, start_seq=int(seq) + 1, prev_hash=prev)
        await tx.executemany(
            "INSERT INTO audit (seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, "
            "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    e.seq,
                    e.draft.at,
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
        await tx.execute(
            "INSERT INTO meta_text (key, value) VALUES ('audit_head', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            f"{entries[-1].seq}:{entries[-1].hash}",
        )

    async def _seal_legacy(self) -> None:
        """Move a version-2 registry's clear rows into their sealed form (migration 3), once: the
        data keys first, committed on their own, then the rows. Each device keeps its audit key as
        its data key, so earlier audit entries still resolve."""
        ids_sql = (
            "SELECT device_id FROM devices_v2 UNION SELECT device_id FROM cert_history_v2 "
            "UNION SELECT device_id FROM outbox WHERE type <> 'erased'"
        )

        async def keys_first(tx: Tx) -> bool:
            if not await tx.has_table("devices_v2"):
                return False
            keys = {
                str(r[0]): bytes(r[1])
                for r in await tx.fetch("SELECT device_id, ref_key FROM device_keys_v2")
            }
            for row in await tx.fetch(ids_sql):
                keys.setdefault(str(row[0]), envelope.new_data_key())
            primary = await self._primary(tx)
            await tx.executemany(
                _INSERT_DATA_KEY,
                [
                    (d, primary, envelope.wrap_data_key(self._keys, primary, d, k))
                    for d, k in sorted(keys.items())
                ],
            )
            return True

        async def rows(tx: Tx) -> None:
            if not await tx.has_table("devices_v2"):
                return
            keys = await self._data_keys(tx, [str(r[0]) for r in await tx.fetch(ids_sql)], create=False)
            devices = [
                _legacy_record(r)
                for r in await tx.fetch(
                    "SELECT device_id, status, cert_fingerprint, ca_id, region, serial, subject, not_after, "
                    "provisioned_at, last_seen, attributes, template, template_version, config FROM devices_v2"
                )
            ]
            await tx.executemany(_INSERT_DEVICE, [self._device_row(r, keys[r.device_id]) for r in devices])
            history = await tx.fetch("SELECT device_id, cert_fingerprint, superseded_at FROM cert_history_v2")
            await tx.executemany(
                _INSERT_HISTORY, [self._history_row(d, fp, at, keys[d]) for d, fp, at in history]
            )
            events = await tx.fetch("SELECT seq, device_id, payload FROM outbox WHERE type <> 'erased'")
            await tx.executemany(
                "UPDATE outbox SET payload = ? WHERE seq = ?",
                [
                    (envelope.seal_payload(keys[d], d, bytes(payload)), seq)
                    for seq, d, payload in events
                    if bytes(payload)[:1] != envelope.SEALED_VERSION
                ],
            )
            for table in ("devices_v2", "cert_history_v2", "device_keys_v2"):
                await tx.execute(f"DROP TABLE {table}")
            log.info(
                "registry data sealed: %d device(s), %d superseded certificate(s), %d event(s)",
                len(devices),
                len(history),
                len(events),
            )

        if await self._write(keys_first, exclusive=True):
            await self._write(rows, exclusive=True)
            await self.checkpoint()

    # -- trust anchors -------------------------------------------------------------------
    async def register_anchor(self, anchor: TrustAnchor, *, audit: AuditDraft) -> TrustAnchor:
        async def body(tx: Tx) -> TrustAnchor:
            rows = await tx.fetch(
                f"INSERT INTO anchors ({_ANCHOR_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ca_id) "
                "DO UPDATE SET role = excluded.role, region = excluded.region, template = excluded.template, "
                f"enabled = excluded.enabled RETURNING {_ANCHOR_COLUMNS}",
                anchor.ca_id,
                anchor.cert_der,
                str(anchor.role),
                anchor.subject,
                anchor.region,
                anchor.template,
                True,
                anchor.registered_at or audit.at,
            )
            await self._bump(tx, "trust_version")
            await self._log(tx, [], [audit])
            return _anchor(rows[0])

        return await self._write(body)

    async def set_anchor_enabled(self, ca_id: str, enabled: bool, *, audit: AuditDraft) -> TrustAnchor:
        async def body(tx: Tx) -> TrustAnchor:
            rows = await tx.fetch(
                f"UPDATE anchors SET enabled = ? WHERE ca_id = ? RETURNING {_ANCHOR_COLUMNS}", enabled, ca_id
            )
            if not rows:
                raise errors.NotFound(f"no CA with id {ca_id!r} is registered", ca_id=ca_id)
            await self._bump(tx, "trust_version")
            await self._log(tx, [], [audit])
            return _anchor(rows[0])

        return await self._write(body)

    async def anchors(self) -> list[TrustAnchor]:
        rows = await self._fetch(f"SELECT {_ANCHOR_COLUMNS} FROM anchors ORDER BY registered_at, ca_id")
        return [_anchor(r) for r in rows]

    @staticmethod
    async def _bump(tx: Tx, key: str) -> None:
        await tx.execute("UPDATE meta SET value = value + 1 WHERE key = ?", key)

    async def _meta(self, key: str) -> int:
        rows = await self._fetch("SELECT value FROM meta WHERE key = ?", key)
        return int(rows[0][0]) if rows else 0

    async def trust_version(self) -> int:
        return await self._meta("trust_version")

    async def templates_version(self) -> int:
        """Bumped by every template reload, so other nodes reload their templates too."""
        return await self._meta("templates_version")

    async def bump_templates_version(self) -> None:
        await self._write(lambda tx: self._bump(tx, "templates_version"))

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
        found = self._opened(await self._fetch(f"{_DEVICES} WHERE d.device_id = ?", device_id))
        return found[0][0] if found else None

    async def list_devices(self) -> list[DeviceRecord]:
        return [r for r, _ in self._opened(await self._fetch(f"{_DEVICES} ORDER BY d.device_id"))]

    async def find_by_fingerprint(self, fingerprint: str) -> DeviceRecord | None:
        index = envelope.fingerprint_index(self._index_key, fingerprint)
        rows = await self._fetch(f"{_DEVICES} WHERE d.fp_index = ? ORDER BY d.device_id", index)
        return next((r for r, _ in self._opened(rows) if r.cert_fingerprint == fingerprint), None)

    async def is_erased(self, fingerprint: str) -> bool:
        ref = privacy.tombstone_ref(self._salt, fingerprint)
        return bool(await self._fetch("SELECT 1 FROM tombstones WHERE ref = ?", ref))

    # -- lifecycle -------------------------------------------------------------------------
    async def change_status(
        self, device_id: str, command: Command, *, at: datetime, actor: str, reason: str | None = None
    ) -> StatusChange:
        async def body(tx: Tx) -> StatusChange:
            record, key = await self._lock_record(tx, device_id)
            change, draft = plan_status_change(record, command, at=at, actor=actor, reason=reason)
            if change.event is not None:
                await tx.execute(
                    "UPDATE devices SET status = ? WHERE device_id = ?", str(change.record.status), device_id
                )
            await self._log(tx, [change.event] if change.event else [], [draft], {device_id: key})
            return change

        return await self._write(body)

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
        holds its sealed rows, old backups included, can no longer decrypt them, and its audit
        entries can no longer be linked to it. Where the keyring commits apart, in three steps, so
        that a crash anywhere leaves no unreadable live device and no forgotten key: mark the key,
        delete the rows, delete the marked key (again at the next open if a crash came first)."""
        if device_id is None:
            if fingerprint is None:
                raise errors.InvalidRequest("erase needs a device id or a certificate")
            known = await self.find_by_fingerprint(fingerprint)
            if known is None:
                if await self.is_erased(fingerprint):
                    return Erasure(device_id=None, already_erased=True)
                raise errors.NotFound("no device holds this certificate")
            device_id = known.device_id
        target = device_id
        apart = self._store.keyring_apart
        if apart:
            await self._write(
                lambda tx: tx.execute("UPDATE keyring.data_keys SET erasing = 1 WHERE device_id = ?", target)
            )

        async def body(tx: Tx) -> ProvisioningEvent:
            record, key = await self._lock_record(tx, target)
            if fingerprint is not None and record.cert_fingerprint != fingerprint:
                # Another node reprovisioned the device between the lookup and the lock.
                raise errors.NotFound("no device holds this certificate")
            rows = await tx.fetch("SELECT sealed_fp FROM cert_history WHERE device_id = ?", target)
            fingerprints = {
                record.cert_fingerprint,
                *(envelope.open_fingerprint(key, target, bytes(r[0])) for r in rows),
            }
            await tx.executemany(
                "INSERT INTO tombstones (ref, erased_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(privacy.tombstone_ref(self._salt, fp), at) for fp in sorted(fingerprints)],
            )
            # Everything else about the device goes (SQLite's secure_delete overwrites the freed pages).
            for table in ("outbox", "cert_history", "devices", *(() if apart else ("keyring.data_keys",))):
                await tx.execute(f"DELETE FROM {table} WHERE device_id = ?", target)
            event = lifecycle_event(
                target,
                type="erased",
                event_id=new_event_id(),
                at=at,
                status="erased",
                previous_status=str(record.status),
                region=record.region,
                reason=None,
            )
            draft = AuditDraft(
                at=at,
                action="erased",
                actor=actor,
                device_id=target,
                fingerprint=record.cert_fingerprint,
                reason=reason,
                details=MappingProxyType({"previous_status": str(record.status)}),
            )
            await self._log(tx, [event], [draft], {target: key})  # pseudonymised under the key it still has
            return event

        event = await self._write(body)
        self._touches.pop(target, None)
        if apart:
            await self._write(
                lambda tx: tx.execute(
                    "DELETE FROM keyring.data_keys WHERE device_id = ? AND erasing = 1 "
                    "AND NOT EXISTS (SELECT 1 FROM devices WHERE device_id = ?)",
                    target,
                    target,
                )
            )
        await self.checkpoint()
        return Erasure(device_id=target, event=event)

    # -- templates -------------------------------------------------------------------------
    async def update_configs(
        self, records: Sequence[DeviceRecord], *, at: datetime, actor: str, template: str
    ) -> list[ProvisioningEvent]:
        """Store re-rendered configurations, each with a config-changed event, in one transaction.

        Only devices still bound to ``template`` change (records sealed again) and get an event; a
        device erased meanwhile is left out (its key is gone)."""
        if not records:
            return []
        ordered = sorted(records, key=lambda r: r.device_id)  # rows locked in one order by every node

        async def body(tx: Tx) -> list[ProvisioningEvent]:
            rows = await tx.fetch(
                f"{_DEVICES} WHERE d.device_id = ANY(?) AND d.template = ? ORDER BY d.device_id FOR UPDATE OF d",
                [r.device_id for r in ordered],
                template,
            )
            current = {r.device_id: (r, key) for r, key in self._opened(rows)}
            keys = {device_id: key for device_id, (_, key) in current.items()}
            updates = []
            for r in ordered:
                if (found := current.get(r.device_id)) is not None:
                    # Only what a template renders changes: the certificate may have rotated meanwhile.
                    updated = dataclasses.replace(
                        found[0],
                        attributes=r.attributes,
                        template_version=r.template_version,
                        config=r.config,
                    )
                    updates.append((r.template_version, envelope.seal_record(found[1], updated), r.device_id))
            await tx.executemany(
                "UPDATE devices SET template_version = ?, sealed = ? WHERE device_id = ?", updates
            )
            events = [
                provisioned_event(r, event_id=new_event_id(), at=at, type="config-changed")
                for r in records
                if r.device_id in keys
            ]
            details = MappingProxyType({"template": template, "devices": str(len(events))})
            await self._log(
                tx, events, [AuditDraft(at=at, action="template-changed", actor=actor, details=details)], keys
            )
            return events

        return await self._write(body)

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
        async def body(tx: Tx) -> None:
            if not await tx.fetch("SELECT 1 FROM anchors WHERE ca_id = ?", ca_id):
                raise errors.NotFound(f"no CA with id {ca_id!r} is registered", ca_id=ca_id)
            await tx.execute(
                "INSERT INTO crls (ca_id, der, this_update, next_update, imported_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (ca_id) DO UPDATE SET der = excluded.der, this_update = excluded.this_update, "
                "next_update = excluded.next_update, imported_at = excluded.imported_at",
                ca_id,
                der,
                this_update,
                next_update,
                audit.at,
            )
            await self._bump(tx, "trust_version")
            await self._log(tx, [], [audit])

        await self._write(body)

    async def crls(self) -> dict[str, bytes]:
        return {r[0]: bytes(r[1]) for r in await self._fetch("SELECT ca_id, der FROM crls")}

    # -- keys (jitp keys rotate) -------------------------------------------------------------
    async def keyring_status(self) -> KeyringStatus:
        primary = await self._fetch(_PRIMARY)
        rows = await self._fetch(
            "SELECT kid, COUNT(*) FROM (SELECT kid FROM keyring.data_keys UNION ALL "
            "SELECT kid FROM keyring.registry_keys) AS wrapped GROUP BY kid ORDER BY kid"
        )
        counts = MappingProxyType({str(r[0]): int(r[1]) for r in rows})
        return KeyringStatus(primary=str(primary[0][0]), wrapped=counts)

    async def set_primary_key(self, kid: str, *, audit: AuditDraft) -> None:
        if kid not in self._keys.kids():
            self._keys.reload()
        if kid not in self._keys.kids():
            raise errors.MasterKeyMismatch(
                f"cannot make {kid} the primary master key: {self._keys.source} does not hold it "
                f"(it holds {', '.join(self._keys.kids())})",
                kid=kid,
            )

        async def body(tx: Tx) -> None:
            # Waits for the transactions wrapping under the old primary (they share-lock this row).
            await tx.execute("UPDATE keyring.meta SET value = ? WHERE key = 'primary_kid'", kid)
            await self._log(tx, [], [audit])

        await self._write(body)

    async def rewrap_keys(self, *, limit: int = 500) -> int:
        async def body(tx: Tx) -> int:
            primary = await self._primary(tx)
            rows = await tx.fetch(
                "SELECT device_id, kid, wrapped FROM keyring.data_keys WHERE kid <> ? ORDER BY device_id "
                "LIMIT ? FOR UPDATE SKIP LOCKED",
                primary,
                limit,
            )
            await tx.executemany(
                "UPDATE keyring.data_keys SET kid = ?, wrapped = ? WHERE device_id = ?",
                [
                    (primary, envelope.wrap_data_key(self._keys, primary, d, key), d)
                    for d, key in self._unwrap(rows).items()
                ],
            )
            named: list[Row] = []
            if limit > len(rows):
                named = await tx.fetch(
                    "SELECT name, kid, wrapped FROM keyring.registry_keys WHERE kid <> ? ORDER BY name "
                    "LIMIT ? FOR UPDATE SKIP LOCKED",
                    primary,
                    limit - len(rows),
                )
            await tx.executemany(
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
            return len(rows) + len(named)

        done = await self._write(body)
        if done == 0:
            await self.checkpoint()  # the old wrapped forms leave the keyring's log
        return done

    # -- outbox --------------------------------------------------------------------------
    async def _page(
        self, where: str, *args: Any, seq: int, limit: int
    ) -> list[tuple[int, ProvisioningEvent]]:
        """Up to ``limit`` events after ``seq`` that open: a page of rows that do not is skipped,
        never returned short of the events behind it (nor empty, which would stall a publisher)."""
        out: list[tuple[int, ProvisioningEvent]] = []
        while len(out) < limit:
            want = limit - len(out)
            rows = await self._fetch(
                f"{_EVENTS}{where} AND o.seq > ? ORDER BY o.seq LIMIT ?", *args, seq, want
            )
            out += self._open_events(rows)
            if len(rows) < want:
                break
            seq = int(rows[-1][0])
        return out

    async def pending_events(self, limit: int = 500) -> list[ProvisioningEvent]:
        return [e for _, e in await self._page(" AND o.delivered_at IS NULL", seq=0, limit=limit)]

    async def mark_delivered(self, event_ids: Sequence[str], *, at: datetime) -> None:
        if not event_ids:
            return

        async def body(tx: Tx) -> int:
            await tx.execute(
                "UPDATE outbox SET delivered_at = ? WHERE event_id = ANY(?) AND delivered_at IS NULL",
                at,
                sorted(set(event_ids)),
            )
            return await tx.execute(_SCRUB_ERASED, b"")

        if await self._write(body):
            await self.checkpoint()  # and out of the log into the (overwritten) database pages

    async def events_after(self, seq: int, limit: int = 500) -> list[tuple[int, ProvisioningEvent]]:
        # Outbox rows are inserted under the audit head's lock (_log): seq order is commit order.
        return await self._page(" AND NOT (o.type = 'erased' AND o.device_id = '')", seq=seq, limit=limit)

    async def outbox_head(self) -> int:
        """The newest outbox seq (0 when empty)."""
        return int((await self._fetch("SELECT COALESCE(MAX(seq), 0) FROM outbox"))[0][0])

    async def sink_cursor(self, name: str) -> int:
        rows = await self._fetch("SELECT seq FROM sink_cursors WHERE name = ?", name)
        return int(rows[0][0]) if rows else 0

    async def set_sink_cursor(self, name: str, seq: int) -> None:
        async def body(tx: Tx) -> int:
            await tx.execute(
                "INSERT INTO sink_cursors (name, seq) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET seq = "
                "CASE WHEN excluded.seq > sink_cursors.seq THEN excluded.seq ELSE sink_cursors.seq END",
                name,
                seq,
            )
            return await tx.execute(_SCRUB_ERASED, b"")

        if await self._write(body):
            await self.checkpoint()

    async def events(self, device_id: str | None = None) -> list[ProvisioningEvent]:
        if device_id is None:
            rows = await self._fetch(f"{_EVENTS} ORDER BY o.seq")
        else:
            rows = await self._fetch(f"{_EVENTS} AND o.device_id = ? ORDER BY o.seq", device_id)
        return [e for _, e in self._open_events(rows)]

    # -- audit ---------------------------------------------------------------------------
    async def append_audit(self, drafts: Sequence[AuditDraft]) -> None:
        if not drafts:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._check_writer()
        self._queue.put_nowait(_Audit(list(drafts), future))
        await future

    async def audit_entries(self) -> list[AuditEntry]:
        rows = await self._fetch(
            "SELECT seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, hash "
            "FROM audit ORDER BY seq"
        )
        return [
            AuditEntry(
                seq=int(r[0]),
                draft=AuditDraft(
                    at=timestamp(r[1]),
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

    async def audit_head(self) -> tuple[int, str] | None:
        """The (seq, hash) the registry last appended, to detect removal of the newest entries."""
        rows = await self._fetch(_HEAD)
        if not rows:
            return None
        seq, _, digest = str(rows[0][0]).partition(":")
        return (int(seq), digest) if int(seq) > 0 else None

    async def resolve_audit(self, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
        """Entries with device refs and sealed peers resolved, for devices that still exist."""
        keys: dict[str, bytes] = {}
        if any(e.draft.device_id for e in entries):
            keys = self._unwrap(await self._fetch("SELECT device_id, kid, wrapped FROM keyring.data_keys"))
        return resolve_entries(entries, keys, self._audit_key)

    # -- last_seen (write-behind) ----------------------------------------------------------
    def note_seen(self, device_id: str, at: datetime) -> None:
        """Record a reconnect; written with the next batch, the next flush_seen(), or on close."""
        self._touches[device_id] = at

    async def flush_seen(self) -> None:
        """Write the reconnects noted since the last write (the broker calls this every few seconds)."""
        if self._touches and self._writer is not None:
            touches, self._touches = self._touches, {}
            await self._write(lambda tx: self._touch(tx, touches))

    # -- the group-commit writer ------------------------------------------------------------
    def _check_writer(self) -> None:
        if self._writer is None or self._writer.done():
            raise errors.RegistryUnavailable("the registry writer is not running")

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if self._batch_window > 0 and self._queue.empty():
                await asyncio.sleep(self._batch_window)
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                for op, result in zip(batch, await self._commit(batch), strict=True):
                    if op.future.done():
                        continue
                    if isinstance(result, errors.ProvisioningError):
                        op.future.set_exception(result)
                    elif isinstance(op, _Audit):
                        op.future.set_result(None)
                    else:
                        assert isinstance(result, ProvisionOutcome)
                        op.future.set_result(result)
            except Exception as exc:  # never let the writer die: fail this batch, serve the next
                log.exception("registry write failed for a batch of %d", len(batch))
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(errors.RegistryUnavailable(f"registry write failed: {exc}"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Op]) -> list[_Result]:
        """One transaction for the batch; on bad data, one per request so that the others still pass.
        A registry that cannot be reached, or a master key it lacks, fails them all (CONNACK 3)."""
        touches, self._touches = self._touches, {}
        try:
            if self._store.keyring_apart:
                wanted: dict[str, list[str]] = {}
                for op in batch:
                    if isinstance(op, _Provision):
                        wanted.setdefault(op.identity.device_id, []).append(self._tombstone(op))
                if wanted:
                    await self._ensure_keys(wanted)
            return await self._store.write(lambda tx: self._apply(tx, batch, touches))
        except errors.ProvisioningError as exc:
            self._touches = {**touches, **self._touches}
            failed = (
                exc
                if isinstance(exc, errors.Unavailable)
                else errors.RegistryUnavailable(f"registry write failed: {exc}")
            )
            return [failed] * len(batch)
        except self._store.failures as exc:
            self._touches = {**touches, **self._touches}
            if len(batch) == 1:
                return [errors.RegistryUnavailable(f"registry write failed: {exc}")]
            log.warning("registry batch of %d failed (%s); retrying request by request", len(batch), exc)
            out: list[_Result] = []
            for op in batch:
                out += await self._commit([op])
            return out

    def _tombstone(self, op: _Provision) -> str:
        return privacy.tombstone_ref(self._salt, op.identity.cert_fingerprint)

    async def _apply(self, tx: Tx, batch: list[_Op], touches: dict[str, datetime]) -> list[_Result]:
        by_device: dict[str, list[tuple[int, _Provision]]] = {}
        for i, op in enumerate(batch):
            if isinstance(op, _Provision):
                by_device.setdefault(op.identity.device_id, []).append((i, op))
        # Reconnects of other devices first: their row locks must come before the audit head's.
        await self._touch(tx, touches)
        groups, keys = await self._provision(tx, by_device) if by_device else ({}, {})
        results: list[_Result] = [None] * len(batch)
        drafts: list[tuple[int, int, AuditDraft]] = []
        events: list[tuple[int, ProvisioningEvent]] = []
        seen: dict[str, datetime] = {}
        for group in groups.values():
            for i, outcome in group.results.items():
                results[i] = outcome
            drafts += [(i, 0, d) for i, d in group.drafts]
            events += group.events
            seen.update(group.touches)
        for i, op in enumerate(batch):
            if isinstance(op, _Audit):
                drafts += [(i, n, d) for n, d in enumerate(op.drafts)]
        await self._touch(tx, seen)  # devices of this batch: locked already
        drafts.sort(key=lambda t: (t[0], t[1]))  # in request order
        events.sort(key=lambda t: t[0])
        await self._log(tx, [e for _, e in events], [d for _, _, d in drafts], keys)
        return results

    async def _provision(
        self, tx: Tx, by_device: dict[str, list[tuple[int, _Provision]]]
    ) -> tuple[dict[str, _Group], dict[str, bytes]]:
        """Decide and write the batch's provisioning requests: the groups, and the data keys of the
        devices they write (their events and audit entries are the caller's to write)."""
        history = any(op.policy != "reject" for ops in by_device.values() for _, op in ops)
        existing: dict[str, DeviceRecord] = {}
        keys: dict[str, bytes] = {}
        superseded: set[tuple[str, str]] = set()
        erased: set[str] = set()
        groups: dict[str, _Group] = {}
        pending = sorted(by_device)
        for _ in range(RETRIES):
            fresh, fresh_superseded = await self._lock_records(tx, pending, history=history)
            for device_id in pending:
                existing.pop(device_id, None)
            existing.update({d: r for d, (r, _) in fresh.items()})
            keys.update({d: key for d, (_, key) in fresh.items()})
            superseded |= fresh_superseded
            # After the lock: an erasure that held it has committed its tombstones by now.
            erased |= await self._tombstoned(
                tx, [self._tombstone(op) for d in pending for _, op in by_device[d]]
            )
            for device_id in pending:
                groups[device_id] = self._decide_group(
                    by_device[device_id], existing.get(device_id), superseded, erased
                )
            lost = await self._create(tx, [groups[d] for d in pending if groups[d].creates], keys)
            if not lost:
                break
            # Another node created these devices since we looked; its row is committed now (the
            # insert waited for it). Decide again against its record, locked this time.
            pending = lost
        else:
            raise errors.RegistryUnavailable(
                "provisioning did not settle (devices created and erased meanwhile)"
            )
        updates = sorted(
            (g.record for g in groups.values() if not g.creates and g.record is not None),
            key=lambda r: r.device_id,
        )
        await tx.executemany(
            _UPDATE_DEVICE,
            [(*row[1:], row[0]) for row in (self._device_row(r, keys[r.device_id]) for r in updates)],
        )
        await tx.executemany(
            _INSERT_HISTORY,
            [
                self._history_row(d, fp, at, keys[d])
                for i in sorted(groups)
                for d, fp, at in groups[i].history
            ],
        )
        return groups, keys

    async def _create(self, tx: Tx, groups: list[_Group], keys: dict[str, bytes]) -> list[str]:
        """Insert the new devices of ``groups`` (their keys into ``keys``); the ids whose insert
        another node's row got in the way of."""
        if not groups:
            return []
        ids = [g.record.device_id for g in groups if g.record is not None]
        # A new device's data key: in this transaction (or the one another node made first, read
        # back), or, where the keyring commits apart, the one committed before it (_ensure_keys).
        keys.update(await self._data_keys(tx, ids, create=not self._store.keyring_apart, live_only=True))
        rows = []
        for g in groups:
            assert g.record is not None
            if g.record.device_id in keys:
                rows.append(self._device_row(g.record, keys[g.record.device_id]))
            else:  # an erasure running meanwhile (CLI or another node): that join is told to come back
                d = g.record.device_id
                g.fail(errors.RegistryUnavailable(f"device {d!r} is being erased; try again", device_id=d))
        await tx.executemany(_INSERT_DEVICE, rows)
        written = await tx.fetch("SELECT device_id, sealed FROM devices WHERE device_id = ANY(?)", ids)
        ours = {str(r[0]) for r in written if bytes(r[1]) in {row[10] for row in rows}}
        return sorted(str(row[0]) for row in rows if row[0] not in ours)

    def _decide_group(
        self,
        ops: list[tuple[int, _Provision]],
        current: DeviceRecord | None,
        superseded: set[tuple[str, str]],
        erased: set[str],
    ) -> _Group:
        group = _Group(current=current)
        superseded = {s for s in superseded if s[0] == current.device_id} if current else set()
        for i, op in ops:
            ref = self._tombstone(op)
            if ref in erased:
                # Nothing that names the erased device is written again, not even in the audit trail.
                group.results[i] = errors.DeviceErased(
                    "this certificate belonged to an erased device and stays refused", detail=ref
                )
                continue
            outcome = decide(op.identity, at=op.at, policy=op.policy, current=current, superseded=superseded)
            group.results[i] = outcome
            if isinstance(outcome, errors.ProvisioningError):
                continue
            if outcome.event is None:
                group.touches[op.identity.device_id] = op.at
                continue
            record, event = outcome.record, outcome.event
            previous = current
            if previous is not None:
                group.history.append((record.device_id, previous.cert_fingerprint, op.at))
                superseded.add((record.device_id, previous.cert_fingerprint))
            current = group.record = record
            group.events.append((i, event))
            draft = provisioned_draft(
                record, event, previous=previous, at=op.at, peer=op.peer, policy=op.policy
            )
            group.drafts.append((i, draft))
        return group
