"""The registry, written once over a small storage port.

:class:`RegistryCore` is the :class:`~jitp.registry.Registry`: the group-commit writer and its
batch decisions (:func:`~jitp.registry.decide`), sealing at rest (:mod:`jitp.crypto.envelope`),
pseudonymous audit entries and their hash chain, the erasure plan, the keyring's pairing, key
rotation, and the upgrade of a registry written before encryption at rest. A backend implements
only :class:`Storage` and :class:`Tx` (connections, transactions, locking, array binding, where
the keyring lives, its SQL dialect); the SQL here is written once, in the dialect :class:`Tx` names.

Provisioning stays race-free on any backend: current records are read locked (``FOR UPDATE``:
PostgreSQL's row locks; SQLite's writer holds the whole database), and a new device is inserted
``ON CONFLICT DO NOTHING``. When another node's insert won meanwhile, that node's record is read,
locked, and the requests are decided again against it. The unique index ``outbox_one_provisioned``
keeps a single ``provisioned`` event per device whatever happens. The audit trail is one hash chain
across nodes: an append locks the ``audit_head`` row, the last lock a transaction takes (held to its
commit); outbox events are inserted under it too, so outbox seq order is commit order.

Where the keyring commits apart from the registry (:attr:`Storage.keyring_apart`: SQLite, another
file), a data key is committed *before* the first row it protects (a crash may leave an unused key,
never an unreadable record), and an erasure takes three steps: mark the key ``erasing`` (nothing new
is sealed under it), delete the rows, delete the key (again at the next open after a crash).
Elsewhere (PostgreSQL, another schema) keys are made and destroyed with the rows they protect.
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

from cryptography import x509

from jitp import errors
from jitp.crypto import envelope, privacy
from jitp.crypto.keys import MasterKeyProvider, require_kids
from jitp.domain.audit import GENESIS_HASH, AuditDraft, AuditEntry, chain
from jitp.domain.certificates import CertState, OperationalCertificate, certificate_config
from jitp.domain.events import ProvisioningEvent, lifecycle_event, new_event_id, provisioned_event
from jitp.domain.identity import DeviceIdentity
from jitp.domain.records import ADMITTED, Command, DeviceRecord, DeviceStatus, EventType, ReprovisionPolicy
from jitp.registry import (
    Erasure,
    FleetStats,
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
from jitp.registry.schema import ColumnTypes, migrations
from jitp.trust import Role, TrustAnchor, fingerprint_der

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = Sequence[Any]
RETRIES = 5  # of a transaction another node's got in the way of; of decisions against a lost insert


# -- the port ---------------------------------------------------------------------------------
class Tx(Protocol):
    """A connection in a transaction (or a read), speaking the registry's SQL: ``?`` placeholders;
    ``col = ANY(?)`` with a list; the keyring's tables as ``keyring.<table>``; a trailing ``FOR
    UPDATE [OF t] [SKIP LOCKED]`` or ``FOR SHARE`` (a backend without row locks drops it: its
    transactions hold the whole database). Values: str, int, bool, bytes, datetime, None; timestamps
    read back as datetime or ISO-8601 text (:func:`timestamp`)."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """How many rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def has_table(self, name: str) -> bool: ...


class Storage(Protocol):
    """What a backend implements: its database, reached through transactions."""

    where: str  # the registry, for messages (a path, a DSN without its password)
    keyring: str  # the keyring, for messages
    keyring_apart: bool  # the keyring commits apart from the registry (see the module's doc)
    types: ColumnTypes  # of its tables (jitp.registry.schema)
    setup: tuple[str, ...]  # idempotent statements run before the migrations (schemas, the keyring)
    failures: tuple[type[Exception], ...]  # errors that fail a request (bad data), not the registry

    async def open(self) -> None:
        """Connect (RegistryUnavailable, or ConfigError for a bad address, when it cannot)."""
        ...

    async def close(self) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """One read, outside any write transaction."""
        ...

    async def write(self, body: Callable[[Tx], Awaitable[T]], *, exclusive: bool = False) -> T:
        """``body`` in one transaction, serialised with the writers it could race (again when
        another node's transaction got in the way). ``exclusive``: with every node's exclusive
        transactions too (opening: migrations, the keyring's pairing, sealing old rows)."""
        ...

    async def checkpoint(self) -> bool:
        """Make what was deleted leave the database's logs too; True when complete."""
        ...


# -- SQL, in the dialect of Tx; rows by column name ------------------------------------------
# What a device row holds in clear (then fp_index, the certificate's blind index, and the rest sealed).
_CLEAR: tuple[str, ...] = ("device_id", "status", "ca_id", "region", "not_after", "provisioned_at")
_CLEAR += ("last_seen", "template", "template_version")
_INSERT_DEVICE = f"INSERT INTO devices ({', '.join(_CLEAR)}, fp_index, sealed) VALUES ({', '.join('?' * 11)})"
_UPDATE_DEVICE = (
    f"UPDATE devices SET {' = ?, '.join((*_CLEAR[1:], 'fp_index', 'sealed'))} = ? WHERE device_id = ?"
)
# A device row with its wrapped data key (NULL: the key is gone, the row can no longer be read).
_DEVICES = (
    f"SELECT {', '.join('d.' + c for c in _CLEAR)}, d.sealed, k.kid, k.wrapped "
    "FROM devices d LEFT JOIN keyring.data_keys k ON k.device_id = d.device_id"
)
# Events whose data key is gone (an erased device's rows, from a registry copy older than the
# erasure) cannot be read: left out here already, before any LIMIT, so they cannot hide the rest.
_EVENTS = (
    "SELECT o.seq, o.event_id, o.type, o.device_id, o.occurred_at, o.payload, k.kid, k.wrapped FROM outbox o "
    "LEFT JOIN keyring.data_keys k ON k.device_id = o.device_id WHERE (k.device_id IS NOT NULL OR o.type = 'erased')"
)
_INSERT_EVENT = "INSERT INTO outbox (event_id, type, device_id, occurred_at, payload) VALUES (?, ?, ?, ?, ?)"
_HISTORY = "INSERT INTO cert_history (device_id, fp_index, sealed_fp, superseded_at) VALUES (?, ?, ?, ?)"
_ANCHOR = ("ca_id", "cert_der", "role", "subject", "region", "template", "enabled", "registered_at")
_DRAFT = ("at", "action", "actor", "device_id", "fingerprint", "reason", "peer", "details")
_AUDIT = f"seq, {', '.join(_DRAFT)}, prev_hash, hash"
_LEGACY: tuple[str, ...] = ("device_id", "status", "cert_fingerprint", "ca_id", "region", "serial")
_LEGACY += ("subject", "not_after", "provisioned_at", "last_seen", "attributes", "template")
_LEGACY += ("template_version", "config")  # a device row of schema 2, all in clear
_DATA_KEYS = "SELECT device_id, kid, wrapped FROM keyring.data_keys WHERE device_id = ANY(?)"
_INSERT_KEY = (
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


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _mapping(value: str) -> MappingProxyType[str, Any]:
    return MappingProxyType(json.loads(value))


def _fields(names: Sequence[str], row: Iterable[Any], **convert: Callable[[Any], Any]) -> dict[str, Any]:
    """``row`` by column name, each value through its converter, if it has one."""
    return {n: convert[n](v) if n in convert else v for n, v in zip(names, row, strict=True)}


def _rendered(record: DeviceRecord) -> dict[str, Any]:
    """What a template renders of a device record."""
    return {name: getattr(record, name) for name in ("attributes", "template_version", "config")}


def _audit_row(e: AuditEntry) -> tuple[Any, ...]:
    details = json.dumps(dict(e.draft.details), sort_keys=True)
    return (e.seq, *(getattr(e.draft, n) for n in _DRAFT[:-1]), details, e.prev_hash, e.hash)


_TIMES = dict.fromkeys(("not_after", "provisioned_at", "last_seen"), timestamp)


async def _value(tx: Tx, sql: str, *args: Any) -> Any:
    rows = await tx.fetch(sql, *args)
    return rows[0][0] if rows else None


# -- the group-commit writer's requests ---------------------------------------------------------
@dataclass(frozen=True)
class _Provision:
    identity: DeviceIdentity
    at: datetime
    peer: str | None
    policy: ReprovisionPolicy
    future: asyncio.Future[ProvisionOutcome]
    tombstone: str  # the certificate's tombstone ref: an erased certificate stays refused


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
        self._store, self._keys, self._clock = storage, keys, clock
        self._max_batch, self._batch_window = max_batch, batch_window
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
        """Fold erased pages and destroyed keys out of the database's logs (SQLite's WALs)."""
        return await self._store.checkpoint()

    async def schema_version(self) -> int:
        return int((await self._fetch("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))[0][0])

    async def _migrate(self, tx: Tx) -> None:
        """Apply the migrations the database lacks, in order, each recorded in ``schema_migrations``;
        then open the keyring, in the same transaction: a keyring refused is not left created."""
        for statement in self._store.setup:
            await tx.execute(statement)
        time = self._store.types.time
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at {time})"
        )
        current = int(await _value(tx, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))
        steps = migrations(self._store.types)
        if current > len(steps):
            raise errors.ConfigError(
                f"the database schema is version {current}, newer than this jitp ({len(steps)}); upgrade jitp",
                where=self._store.where,
            )
        for version in range(current + 1, len(steps) + 1):
            for statement in filter(str.strip, steps[version - 1].split(";")):
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
        if self._store.keyring_apart:  # erasures a crash interrupted: their rows are gone, so go their keys
            await tx.execute(
                "DELETE FROM keyring.data_keys WHERE erasing = 1 AND device_id NOT IN (SELECT device_id FROM devices)"
            )

    async def _registry_key(self, tx: Tx, name: str) -> bytes:
        """Registry key ``name`` of the keyring, made if absent (whichever node is first)."""
        query = "SELECT kid, wrapped FROM keyring.registry_keys WHERE name = ?"
        if not (rows := await tx.fetch(query, name)):
            primary = await self._primary(tx)
            wrapped = envelope.wrap_registry_key(self._keys, primary, name, envelope.new_data_key())
            insert = "INSERT INTO keyring.registry_keys (name, kid, wrapped) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
            await tx.execute(insert, name, primary, wrapped)
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

    def _wrap_new(self, primary: str, ids: Iterable[str]) -> list[tuple[str, str, bytes]]:
        """New data keys for ``ids``, wrapped under ``primary``, as keyring rows."""
        return [
            (i, primary, envelope.wrap_data_key(self._keys, primary, i, envelope.new_data_key())) for i in ids
        ]

    async def _data_keys(
        self, tx: Tx, ids: Iterable[str], *, create: bool, live_only: bool = False
    ) -> dict[str, bytes]:
        """The data keys of ``ids``, unwrapped; with ``create``, made (under the primary) for those
        without one, or read back where another node made one first. ``live_only``: not the key of
        a device being erased (nothing new may be sealed under a key about to be destroyed)."""
        if not (wanted := sorted(set(ids))):
            return {}
        live = " AND erasing = 0" if live_only and self._store.keyring_apart else ""
        keys = self._unwrap(await tx.fetch(_DATA_KEYS + live, wanted))
        if create and (missing := [i for i in wanted if i not in keys]):
            await tx.executemany(_INSERT_KEY, self._wrap_new(await self._primary(tx), missing))
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
            await tx.executemany(
                "INSERT INTO keyring.data_keys (device_id, kid, wrapped, erasing) VALUES (?, ?, ?, 0) "
                "ON CONFLICT (device_id) DO UPDATE SET kid = excluded.kid, wrapped = excluded.wrapped, erasing = 0",
                self._wrap_new(await self._primary(tx), create),
            )

        await self._write(body)

    # -- rows ------------------------------------------------------------------------------
    def _open_device(self, row: Row) -> tuple[DeviceRecord, bytes] | None:
        """A ``_DEVICES`` row opened, with its data key; None when the key is gone (shredded: the
        row comes from a copy of the registry older than the device's erasure)."""
        *clear, sealed, kid, wrapped = row
        if kid is None:  # not named: the id is all that is left of an erased device
            log.warning(
                "a device row has no data key (erased; a registry copy older than its erasure?): ignored"
            )
            return None
        key = envelope.unwrap_data_key(self._keys, kid, str(clear[0]), bytes(wrapped))
        return envelope.open_record(key, bytes(sealed), **_fields(_CLEAR, clear, **_TIMES)), key

    def _opened(self, rows: Iterable[Row]) -> list[tuple[DeviceRecord, bytes]]:
        return [opened for row in rows if (opened := self._open_device(row)) is not None]

    def _device_row(self, record: DeviceRecord, key: bytes) -> tuple[Any, ...]:
        index = envelope.fingerprint_index(self._index_key, record.cert_fingerprint)
        return (*(getattr(record, name) for name in _CLEAR), index, envelope.seal_record(key, record))

    def _history_row(self, device_id: str, fingerprint: str, at: Any, key: bytes) -> tuple[Any, ...]:
        index = envelope.fingerprint_index(self._index_key, fingerprint)
        return (device_id, index, envelope.seal_fingerprint(key, device_id, fingerprint), at)

    @staticmethod
    def _event_row(e: ProvisioningEvent, keys: dict[str, bytes]) -> tuple[Any, ...]:
        """An outbox row, its payload sealed under the device's key (an erasure's event, whose key is
        destroyed, names only the id and region, both in clear anyway)."""
        sealed = (
            e.payload
            if e.type is EventType.ERASED
            else envelope.seal_payload(keys[e.device_id], e.device_id, e.payload)
        )
        return (e.event_id, e.type, e.device_id, e.occurred_at, sealed)

    def _open_events(self, rows: Iterable[Row]) -> list[tuple[int, ProvisioningEvent]]:
        """``_EVENTS`` rows, payloads opened (each device's key unwrapped once); those that do not
        open are left out."""
        keys: dict[str, bytes | None] = {}
        out = []
        for seq, event_id, type_, device_id, at, payload, kid, wrapped in rows:
            if bytes(payload)[:1] == envelope.SEALED_VERSION and device_id not in keys:
                keys[device_id] = (
                    None if kid is None else self._unwrap([(device_id, kid, wrapped)])[device_id]
                )
            try:
                opened = envelope.open_payload(keys.get(device_id), device_id, bytes(payload))
            except errors.RegistryUnavailable as exc:
                log.warning("outbox event %s left out: %s", event_id, exc)
                continue
            event = ProvisioningEvent(
                event_id, EventType(type_), device_id, occurred_at=timestamp(at), payload=opened
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
            query = "SELECT device_id, sealed_fp FROM cert_history WHERE device_id = ANY(?)"
            rows = await tx.fetch(query, sorted(existing))
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
        for where in (
            ("cert_history WHERE", "outbox WHERE type <> 'erased' AND", "devices WHERE") if ids else ()
        ):
            await tx.execute(f"DELETE FROM {where} device_id = ANY(?)", ids)

    @staticmethod
    async def _tombstoned(tx: Tx, refs: Iterable[str]) -> set[str]:
        wanted = sorted(set(refs))
        rows = await tx.fetch("SELECT ref FROM tombstones WHERE ref = ANY(?)", wanted) if wanted else []
        return {r[0] for r in rows}

    @staticmethod
    async def _touch(tx: Tx, touches: dict[str, datetime]) -> None:
        """Reconnect times; last_seen never goes back (two nodes may write them out of order)."""
        await tx.executemany(
            "UPDATE devices SET last_seen = ? WHERE device_id = ? AND (last_seen IS NULL OR last_seen < ?)",
            [(at, device_id, at) for device_id, at in sorted(touches.items())],
        )

    async def _log(
        self,
        tx: Tx,
        events: Sequence[ProvisioningEvent],
        drafts: Sequence[AuditDraft],
        keys: dict[str, bytes],
    ) -> None:
        """Write outbox events (sealed under their device's key in ``keys``) and audit entries,
        chained, in their stored form: nothing personal about a device in clear (jitp.crypto.privacy). An
        entry about a device uses its data key (made if absent: a refusal can name a device never
        provisioned), one about no device the registry's audit key. Keys come first: making one
        takes a lock (the primary kid's) that must come before the audit head's."""
        ids = {d.device_id for d in drafts if d.device_id}
        keys = {**keys, **await self._data_keys(tx, ids - set(keys), create=True)}
        stored = [
            pseudonymize(d, keys) if d.device_id else seal_anonymous(d, self._audit_key) for d in drafts
        ]
        if not events and not stored:
            return
        # Chained from the recorded head, not the last row: if someone removed the newest entries,
        # the next entry keeps the gap visible instead of papering over it.
        head = str(await _value(tx, _HEAD + " FOR UPDATE") or f"0:{GENESIS_HASH}")
        await tx.executemany(_INSERT_EVENT, [self._event_row(e, keys) for e in events])
        if not stored:
            return
        seq, _, prev = head.partition(":")
        entries = chain(stored, start_seq=int(seq) + 1, prev_hash=prev)
        await tx.executemany(
            f"INSERT INTO audit ({_AUDIT}) VALUES ({', '.join('?' * 11)})", map(_audit_row, entries)
        )
        await tx.execute(
            "INSERT INTO meta_text (key, value) VALUES ('audit_head', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
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
            wrap = envelope.wrap_data_key
            await tx.executemany(
                _INSERT_KEY, [(d, primary, wrap(self._keys, primary, d, k)) for d, k in keys.items()]
            )
            return True

        async def rows(tx: Tx) -> None:
            keys = await self._data_keys(tx, [str(r[0]) for r in await tx.fetch(ids_sql)], create=False)
            legacy = await tx.fetch(f"SELECT {', '.join(_LEGACY)} FROM devices_v2")
            devices = [
                DeviceRecord(
                    **_fields(_LEGACY, r, status=DeviceStatus, **_TIMES, attributes=_mapping, config=_mapping)
                )
                for r in legacy
            ]
            await tx.executemany(_INSERT_DEVICE, [self._device_row(r, keys[r.device_id]) for r in devices])
            history = await tx.fetch("SELECT device_id, cert_fingerprint, superseded_at FROM cert_history_v2")
            await tx.executemany(_HISTORY, [self._history_row(d, fp, at, keys[d]) for d, fp, at in history])
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
                "registry data sealed: %d device(s), %d superseded certificate(s)", len(devices), len(history)
            )

        if await self._write(keys_first, exclusive=True):  # and then only (another node may have sealed)
            await self._write(lambda tx: self._if_table(tx, "devices_v2", rows), exclusive=True)
            await self.checkpoint()

    @staticmethod
    async def _if_table(tx: Tx, name: str, body: Callable[[Tx], Awaitable[None]]) -> None:
        if await tx.has_table(name):
            await body(tx)

    # -- trust anchors -------------------------------------------------------------------
    async def register_anchor(self, anchor: TrustAnchor, *, audit: AuditDraft) -> TrustAnchor:
        stored = dataclasses.replace(anchor, enabled=True, registered_at=anchor.registered_at or audit.at)

        async def body(tx: Tx) -> TrustAnchor:
            rows = await tx.fetch(
                f"INSERT INTO anchors ({', '.join(_ANCHOR)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ca_id) "
                "DO UPDATE SET role = excluded.role, region = excluded.region, template = excluded.template, "
                f"enabled = excluded.enabled RETURNING {', '.join(_ANCHOR)}",
                *(getattr(stored, name) for name in _ANCHOR),
            )
            await self._bump(tx, "trust_version")
            await self._log(tx, [], [audit], {})
            return self._anchor(rows[0])

        return await self._write(body)

    async def set_anchor_enabled(self, ca_id: str, enabled: bool, *, audit: AuditDraft) -> TrustAnchor:
        async def body(tx: Tx) -> TrustAnchor:
            update = f"UPDATE anchors SET enabled = ? WHERE ca_id = ? RETURNING {', '.join(_ANCHOR)}"
            if not (rows := await tx.fetch(update, enabled, ca_id)):
                raise errors.NotFound(f"no CA with id {ca_id!r} is registered", ca_id=ca_id)
            await self._bump(tx, "trust_version")
            await self._log(tx, [], [audit], {})
            return self._anchor(rows[0])

        return await self._write(body)

    async def anchors(self) -> list[TrustAnchor]:
        rows = await self._fetch(f"SELECT {', '.join(_ANCHOR)} FROM anchors ORDER BY registered_at, ca_id")
        return [self._anchor(r) for r in rows]

    @staticmethod
    def _anchor(row: Row) -> TrustAnchor:
        return TrustAnchor(
            **_fields(_ANCHOR, row, cert_der=bytes, role=Role, enabled=bool, registered_at=timestamp)
        )

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
        self,
        identity: DeviceIdentity,
        *,
        at: datetime,
        peer: str | None,
        policy: ReprovisionPolicy = ReprovisionPolicy.REJECT,
    ) -> ProvisionOutcome:
        if policy not in ReprovisionPolicy.__members__.values():
            raise ValueError(f"unknown reprovisioning policy {policy!r}")
        policy = ReprovisionPolicy(policy)
        future: asyncio.Future[ProvisionOutcome] = asyncio.get_running_loop().create_future()
        self._check_writer()
        ref = privacy.tombstone_ref(self._salt, identity.cert_fingerprint)
        self._queue.put_nowait(_Provision(identity, at, peer, policy, future, ref))
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
                    "UPDATE devices SET status = ? WHERE device_id = ?", change.record.status, device_id
                )
            if command is Command.REVOKE:  # its operational certificates go into the issuer's CRL
                await self._revoke_certificates(tx, device_id, at)
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
        entries can no longer be linked to it. Where the keyring commits apart, in three steps (see
        the module's doc), so that a crash anywhere leaves no unreadable device and no forgotten key."""
        if device_id is None:
            if fingerprint is None:
                raise errors.InvalidRequest("erase needs a device id or a certificate")
            if (known := await self.find_by_fingerprint(fingerprint)) is None:
                if await self.is_erased(fingerprint):
                    return Erasure(device_id=None, already_erased=True)
                raise errors.NotFound("no device holds this certificate")
            device_id = known.device_id
        target, apart = device_id, self._store.keyring_apart
        if apart:
            await self._write(
                lambda tx: tx.execute("UPDATE keyring.data_keys SET erasing = 1 WHERE device_id = ?", target)
            )

        async def body(tx: Tx) -> ProvisioningEvent:
            record, key = await self._lock_record(tx, target)
            if fingerprint is not None and record.cert_fingerprint != fingerprint:
                raise errors.NotFound("no device holds this certificate")  # reprovisioned meanwhile
            rows = await tx.fetch("SELECT sealed_fp FROM cert_history WHERE device_id = ?", target)
            old = {envelope.open_fingerprint(key, target, bytes(r[0])) for r in rows}
            # Operational certificates: tombstoned like the birth certificate, listed in the CRL, deleted.
            ops = await tx.fetch(f"SELECT {_OP_COLUMNS} FROM op_certs WHERE device_id = ?", target)
            old |= {self._open_op(r, key).fingerprint for r in ops}
            await self._revoke_certificates(tx, target, at)
            await tx.executemany(
                "INSERT INTO tombstones (ref, erased_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [
                    (privacy.tombstone_ref(self._salt, fp), at)
                    for fp in sorted({record.cert_fingerprint, *old})
                ],
            )
            # Everything else about the device goes (SQLite's secure_delete overwrites the freed pages).
            for table in (
                *("outbox", "cert_history", "op_certs", "devices"),
                *(() if apart else ("keyring.data_keys",)),
            ):
                await tx.execute(f"DELETE FROM {table} WHERE device_id = ?", target)
            previous = str(record.status)
            event = lifecycle_event(
                target,
                type=EventType.ERASED,
                event_id=new_event_id(),
                at=at,
                status="erased",
                previous_status=previous,
                region=record.region,
            )
            details = MappingProxyType({"previous_status": previous})
            fp = record.cert_fingerprint
            draft = AuditDraft(
                at, "erased", actor, device_id=target, fingerprint=fp, reason=reason, details=details
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
            # Only what a template renders changes: the certificate may have rotated meanwhile.
            rendered = [(current[r.device_id], _rendered(r)) for r in ordered if r.device_id in current]
            await tx.executemany(
                "UPDATE devices SET template_version = ?, sealed = ? WHERE device_id = ?",
                [
                    (now.template_version, envelope.seal_record(key, now), now.device_id)
                    for (record, key), change in rendered
                    for now in [dataclasses.replace(record, **change)]
                ],
            )
            new = [r for r in records if r.device_id in current]
            events = [
                provisioned_event(r, event_id=new_event_id(), at=at, type=EventType.CONFIG_CHANGED)
                for r in new
            ]
            details = MappingProxyType({"template": template, "devices": str(len(events))})
            draft = AuditDraft(at=at, action="template-changed", actor=actor, details=details)
            await self._log(tx, events, [draft], {d: key for d, (_, key) in current.items()})
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
                *(ca_id, der, this_update, next_update, audit.at),
            )
            await self._bump(tx, "trust_version")
            await self._log(tx, [], [audit], {})

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
        return KeyringStatus(
            primary=str(primary[0][0]), wrapped=MappingProxyType({str(k): int(n) for k, n in rows})
        )

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
            await self._log(tx, [], [audit], {})

        await self._write(body)

    async def rewrap_keys(self, *, limit: int = 500) -> int:
        kinds = (
            ("data_keys", "device_id", envelope.unwrap_data_key, envelope.wrap_data_key),
            ("registry_keys", "name", envelope.unwrap_registry_key, envelope.wrap_registry_key),
        )

        async def body(tx: Tx) -> int:
            primary, done = await self._primary(tx), 0
            for table, name, unwrap, wrap in kinds:
                if done >= limit:
                    break
                rows = await tx.fetch(
                    f"SELECT {name}, kid, wrapped FROM keyring.{table} WHERE kid <> ? ORDER BY {name} "
                    "LIMIT ? FOR UPDATE SKIP LOCKED",
                    *(primary, limit - done),
                )
                await tx.executemany(
                    f"UPDATE keyring.{table} SET kid = ?, wrapped = ? WHERE {name} = ?",
                    [
                        (primary, wrap(self._keys, primary, n, unwrap(self._keys, kid, n, bytes(w))), n)
                        for n, kid, w in rows
                    ],
                )
                done += len(rows)
            return done

        if (done := await self._write(body)) == 0:
            await self.checkpoint()  # the old wrapped forms leave the keyring's log
        return done

    # -- outbox --------------------------------------------------------------------------
    async def _page(self, where: str, *, seq: int, limit: int) -> list[tuple[int, ProvisioningEvent]]:
        """Up to ``limit`` events after ``seq`` that open: rows that do not are skipped, never
        returned as a short (or empty) page ahead of the events behind them."""
        out: list[tuple[int, ProvisioningEvent]] = []
        while len(out) < limit:
            want = limit - len(out)
            rows = await self._fetch(f"{_EVENTS}{where} AND o.seq > ? ORDER BY o.seq LIMIT ?", seq, want)
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
            update = "UPDATE outbox SET delivered_at = ? WHERE event_id = ANY(?) AND delivered_at IS NULL"
            await tx.execute(update, at, sorted(set(event_ids)))
            return await tx.execute(_SCRUB_ERASED, b"")

        if await self._write(body):
            await self.checkpoint()  # and out of the log into the (overwritten) database pages

    async def events_after(self, seq: int, limit: int = 500) -> list[tuple[int, ProvisioningEvent]]:
        # Outbox rows are inserted under the audit head's lock (_log): seq order is commit order.
        return await self._page(" AND NOT (o.type = 'erased' AND o.device_id = '')", seq=seq, limit=limit)

    async def fleet_stats(self) -> FleetStats:
        rows = await self._fetch("SELECT status, region, ca_id, not_after FROM devices")
        devices: dict[tuple[str, str], int] = {}
        for status, region, _, _ in rows:
            devices[(str(status), str(region))] = devices.get((str(status), str(region)), 0) + 1
        pending = await self._fetch(
            "SELECT COUNT(*), MIN(occurred_at) FROM outbox WHERE delivered_at IS NULL"
        )
        count, oldest = pending[0] if pending else (0, None)
        oldest_at = timestamp(oldest) if oldest is not None else None
        return FleetStats(
            devices=MappingProxyType(devices),
            not_after=tuple((str(s), str(c), _utc(timestamp(n))) for s, _, c, n in rows),
            outbox_pending=int(count or 0),
            outbox_oldest=_utc(oldest_at) if oldest_at is not None else None,
        )

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
                *(name, seq),
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
        rows = await self._fetch(f"SELECT {_AUDIT} FROM audit ORDER BY seq")
        return [
            AuditEntry(seq=int(r[0]), draft=self._draft(r[1:9]), prev_hash=r[9], hash=r[10]) for r in rows
        ]

    @staticmethod
    def _draft(row: Row) -> AuditDraft:
        return AuditDraft(**_fields(_DRAFT, row, at=timestamp, details=_mapping))

    async def audit_head(self) -> tuple[int, str] | None:
        """The (seq, hash) the registry last appended, to detect removal of the newest entries."""
        seq, _, digest = str(next(iter(await self._fetch(_HEAD)), ["0:"])[0]).partition(":")
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
            wanted: dict[str, list[str]] = {}
            for op in batch if self._store.keyring_apart else ():
                if isinstance(op, _Provision):
                    wanted.setdefault(op.identity.device_id, []).append(op.tombstone)
            if wanted:
                await self._ensure_keys(wanted)
            return await self._store.write(lambda tx: self._apply(tx, batch, touches))
        except errors.ProvisioningError as exc:
            self._touches = {**touches, **self._touches}
            unavailable = isinstance(exc, errors.Unavailable)
            return [
                exc if unavailable else errors.RegistryUnavailable(f"registry write failed: {exc}")
            ] * len(batch)
        except self._store.failures as exc:
            self._touches = {**touches, **self._touches}
            if len(batch) == 1:
                return [errors.RegistryUnavailable(f"registry write failed: {exc}")]
            log.warning("registry batch of %d failed (%s); retrying request by request", len(batch), exc)
            return [result for op in batch for result in await self._commit([op])]

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
        history = any(
            op.policy is not ReprovisionPolicy.REJECT for ops in by_device.values() for _, op in ops
        )
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
            erased |= await self._tombstoned(tx, [op.tombstone for d in pending for _, op in by_device[d]])
            for d in pending:
                groups[d] = self._decide_group(by_device[d], existing.get(d), superseded, erased)
            if not (
                pending := await self._create(tx, [groups[d] for d in pending if groups[d].creates], keys)
            ):
                break
            # Another node created these devices since they were read; its rows are committed now
            # (the insert waited for them): decide again against its records, locked this time.
        else:
            raise errors.RegistryUnavailable(
                "provisioning did not settle (devices created and erased meanwhile)"
            )
        updates = sorted(
            (g.record for g in groups.values() if g.record and not g.creates), key=lambda r: r.device_id
        )
        rows = [self._device_row(r, keys[r.device_id]) for r in updates]
        await tx.executemany(_UPDATE_DEVICE, [(*row[1:], row[0]) for row in rows])
        history_rows = [self._history_row(*h, keys[h[0]]) for d in sorted(groups) for h in groups[d].history]
        await tx.executemany(_HISTORY + " ON CONFLICT DO NOTHING", history_rows)
        return groups, keys

    async def _create(self, tx: Tx, groups: list[_Group], keys: dict[str, bytes]) -> list[str]:
        """Insert the new devices of ``groups`` (their keys into ``keys``); the ids whose insert
        another node's row got in the way of."""
        ids = [g.record.device_id for g in groups if g.record]
        if not ids:
            return []
        # A new device's data key: made in this transaction (or another node's, read back), or,
        # where the keyring commits apart, the one committed before it (_ensure_keys).
        keys.update(await self._data_keys(tx, ids, create=not self._store.keyring_apart, live_only=True))
        rows = []
        for g in groups:
            if g.record and g.record.device_id in keys:
                rows.append(self._device_row(g.record, keys[g.record.device_id]))
            elif g.record:  # an erasure running meanwhile (CLI or another node): told to come back
                d = g.record.device_id
                g.fail(errors.RegistryUnavailable(f"device {d!r} is being erased; try again", device_id=d))
        await tx.executemany(_INSERT_DEVICE + " ON CONFLICT DO NOTHING", rows)
        sealed = {row[-1] for row in rows}
        written = await tx.fetch("SELECT device_id, sealed FROM devices WHERE device_id = ANY(?)", ids)
        won = {r[0] for r in written if bytes(r[1]) in sealed}
        return sorted(row[0] for row in rows if row[0] not in won)

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
            if (ref := op.tombstone) in erased:
                # Nothing that names the erased device is written again, not even in the audit trail.
                group.results[i] = errors.DeviceErased(
                    "this certificate belonged to an erased device and stays refused", detail=ref
                )
                continue
            outcome = group.results[i] = decide(
                op.identity, at=op.at, policy=op.policy, current=current, superseded=superseded
            )
            if isinstance(outcome, errors.ProvisioningError):
                continue
            if outcome.event is None:
                group.touches[op.identity.device_id] = op.at
                continue
            record, event, previous = outcome.record, outcome.event, current
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

    # -- the operational issuing CA and its certificates (jitp.crypto.issuer) ------------------
    async def store_issuer(self, anchor: TrustAnchor, key_der: bytes, *, audit: AuditDraft) -> TrustAnchor:
        """Make ``anchor`` the active issuing CA: its key wrapped under the primary master key (in the
        keyring, re-wrapped by key rotation), the CA registered as a device trust anchor, audited."""
        stored = dataclasses.replace(anchor, enabled=True, registered_at=anchor.registered_at or audit.at)
        name = f"issuer:{anchor.ca_id}"

        async def body(tx: Tx) -> TrustAnchor:
            primary = await self._primary(tx)
            wrapped = envelope.wrap_registry_key(self._keys, primary, name, key_der)
            await tx.execute(
                "INSERT INTO keyring.registry_keys (name, kid, wrapped) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET kid = excluded.kid, wrapped = excluded.wrapped",
                *(name, primary, wrapped),
            )
            await tx.execute("UPDATE issuers SET active = ?", False)
            await tx.execute(
                "INSERT INTO issuers (ca_id, cert_der, active, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (ca_id) DO UPDATE SET active = excluded.active",
                *(anchor.ca_id, anchor.cert_der, True, audit.at),
            )
            rows = await tx.fetch(
                f"INSERT INTO anchors ({', '.join(_ANCHOR)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ca_id) "
                f"DO UPDATE SET role = excluded.role, enabled = excluded.enabled RETURNING {', '.join(_ANCHOR)}",
                *(getattr(stored, n) for n in _ANCHOR),
            )
            await self._bump(tx, "trust_version")
            await self._log(tx, [], [audit], {})
            return self._anchor(rows[0])

        return await self._write(body)

    async def issuer(self) -> tuple[bytes, bytes] | None:
        """The active issuing CA as (certificate DER, private key PKCS#8 DER); None without one."""
        rows = await self._fetch("SELECT ca_id, cert_der FROM issuers WHERE active = ?", True)
        if not rows:
            return None
        ca_id, cert_der = str(rows[0][0]), bytes(rows[0][1])
        name = f"issuer:{ca_id}"
        keys = await self._fetch("SELECT kid, wrapped FROM keyring.registry_keys WHERE name = ?", name)
        if not keys:
            raise errors.RegistryUnavailable(f"the issuing CA {ca_id} has no key in the keyring")
        return cert_der, envelope.unwrap_registry_key(self._keys, str(keys[0][0]), name, bytes(keys[0][1]))

    async def issuer_ids(self) -> set[str]:
        """Every issuing CA ever made here (certificates of an inactive one still connect until they expire)."""
        return {str(r[0]) for r in await self._fetch("SELECT ca_id FROM issuers")}

    def _open_op(self, row: Row, key: bytes) -> OperationalCertificate:
        (
            cid,
            device_id,
            request_id,
            issuer_id,
            serial,
            state,
            issued_at,
            not_after,
            commit_by,
            changed,
            sealed,
        ) = row
        der = envelope.open_certificate(key, str(device_id), bytes(sealed))
        cert = x509.load_der_x509_certificate(der)
        return OperationalCertificate(
            certificate_id=str(cid),
            device_id=str(device_id),
            request_id=str(request_id),
            issuer_id=str(issuer_id),
            fingerprint=fingerprint_der(der),
            serial=int(str(serial), 16),
            state=CertState(state),
            issued_at=timestamp(issued_at),
            not_before=cert.not_valid_before_utc,
            not_after=timestamp(not_after),
            commit_by=timestamp(commit_by),
            changed_at=timestamp(changed) if changed is not None else None,
            cert_der=der,
        )

    async def _device_key(self, tx: Tx | None, device_id: str) -> bytes | None:
        rows = await (tx.fetch if tx is not None else self._fetch)(_DATA_KEYS, [device_id])
        return self._unwrap(rows).get(device_id)

    async def certificate_by_fingerprint(self, fingerprint: str) -> OperationalCertificate | None:
        index = envelope.fingerprint_index(self._index_key, fingerprint)
        for row in await self._fetch(f"SELECT {_OP_COLUMNS} FROM op_certs WHERE fp_index = ?", index):
            key = await self._device_key(None, str(row[1]))
            if key is not None and (op := self._open_op(row, key)).fingerprint == fingerprint:
                return op
        return None

    async def device_certificates(self, device_id: str) -> list[OperationalCertificate]:
        """A device's operational certificates, newest first."""
        key = await self._device_key(None, device_id)
        if key is None:
            return []
        rows = await self._fetch(
            f"SELECT {_OP_COLUMNS} FROM op_certs WHERE device_id = ? ORDER BY issued_at DESC", device_id
        )
        return [self._open_op(r, key) for r in rows]

    async def certificates_in(self, states: Sequence[CertState]) -> list[OperationalCertificate]:
        rows = await self._fetch(
            f"SELECT {_OP_COLUMNS} FROM op_certs WHERE state = ANY(?)", [str(s) for s in states]
        )
        ids = sorted({str(r[1]) for r in rows})
        keys = self._unwrap(await self._fetch(_DATA_KEYS, ids)) if ids else {}
        return [self._open_op(r, keys[str(r[1])]) for r in rows if str(r[1]) in keys]

    async def claim_device(
        self, record: DeviceRecord, cert: OperationalCertificate, *, audit: AuditDraft
    ) -> bool:
        """A device claimed with template parameters (a claim certificate): its record and its first
        operational certificate, pending, in one transaction, audited; no event yet (``provisioned``
        is published when the device connects with ``cert``). False, nothing written, when the id
        exists: a claim never takes over a device."""
        device_id = record.device_id
        if self._store.keyring_apart:
            await self._ensure_keys({device_id: [privacy.tombstone_ref(self._salt, cert.fingerprint)]})

        async def body(tx: Tx) -> bool:
            if await tx.fetch("SELECT 1 FROM devices WHERE device_id = ?", device_id):
                return False
            keys = await self._data_keys(
                tx, [device_id], create=not self._store.keyring_apart, live_only=True
            )
            if device_id not in keys:
                raise errors.RegistryUnavailable(f"device {device_id!r} is being erased; try again")
            row = self._device_row(record, keys[device_id])
            await tx.executemany(_INSERT_DEVICE + " ON CONFLICT DO NOTHING", [row])
            written = await tx.fetch("SELECT sealed FROM devices WHERE device_id = ?", device_id)
            if not written or bytes(written[0][0]) != row[-1]:
                return False  # another node created it meanwhile
            await self._insert_certificate(tx, cert, keys[device_id])
            await self._log(tx, [], [audit], keys)
            return True

        return await self._write(body)

    async def _insert_certificate(self, tx: Tx, cert: OperationalCertificate, key: bytes) -> None:
        await tx.execute(
            f"INSERT INTO op_certs ({_OP_COLUMNS}, fp_index) VALUES ({', '.join('?' * 12)})",
            *_op_values(cert),
            envelope.seal_certificate(key, cert.device_id, cert.cert_der),
            envelope.fingerprint_index(self._index_key, cert.fingerprint),
        )

    async def add_certificate(
        self, cert: OperationalCertificate, *, audit: AuditDraft
    ) -> tuple[OperationalCertificate, bool]:
        """Store a newly issued (pending) certificate, unless the device already has one for the same
        request id: then that one is returned (False) and ``cert`` is dropped, never stored."""

        async def body(tx: Tx) -> tuple[OperationalCertificate, bool]:
            record, key = await self._lock_record(tx, cert.device_id)
            if record.status not in ADMITTED:
                raise errors.EnrollmentNotAllowed(f"device {record.device_id!r} is {record.status}")
            rows = await tx.fetch(
                f"SELECT {_OP_COLUMNS} FROM op_certs WHERE device_id = ? AND request_id = ?",
                *(cert.device_id, cert.request_id),
            )
            if rows:
                return self._open_op(rows[0], key), False
            await self._insert_certificate(tx, cert, key)
            await self._log(tx, [], [audit], {cert.device_id: key})
            return cert, True

        return await self._write(body)

    async def commit_certificate(
        self, certificate_id: str, *, at: datetime, peer: str | None
    ) -> tuple[DeviceRecord, OperationalCertificate, ProvisioningEvent | None]:
        """The device connected with its pending certificate: it becomes current (the previous current
        one superseded), the record's retained configuration gets its ``certificate`` entry, and a
        certificate-issued (first) or certificate-rotated event carries both fingerprints. Idempotent:
        committing the current certificate again changes nothing (no event). PendingExpired past the
        commit window; CertificateSuperseded for any other state."""

        async def body(tx: Tx) -> tuple[DeviceRecord, OperationalCertificate, ProvisioningEvent | None]:
            rows = await tx.fetch("SELECT device_id FROM op_certs WHERE certificate_id = ?", certificate_id)
            if not rows:
                raise errors.UnknownOperational("this certificate is not (or no longer) registered")
            device_id = str(rows[0][0])
            record, key = await self._lock_record(tx, device_id)
            mine = [
                self._open_op(r, key)
                for r in await tx.fetch(
                    f"SELECT {_OP_COLUMNS} FROM op_certs WHERE device_id = ? ORDER BY issued_at", device_id
                )
            ]
            cert = next(c for c in mine if c.certificate_id == certificate_id)
            if cert.state is CertState.CURRENT:
                return record, cert, None
            fields = {"device_id": device_id, "fingerprint": cert.fingerprint}
            if cert.effective_state(at) is CertState.EXPIRED:
                raise errors.PendingExpired(
                    "this certificate was not used within its commit window", **fields
                )
            if cert.state is not CertState.PENDING:
                raise errors.CertificateSuperseded(f"this certificate is {cert.state}", **fields)
            previous = next((c for c in mine if c.state is CertState.CURRENT), None)
            old_fp = previous.fingerprint if previous is not None else record.cert_fingerprint
            await tx.execute(
                "UPDATE op_certs SET state = ?, changed_at = ? WHERE device_id = ? AND state = ?",
                *(str(CertState.SUPERSEDED), at, device_id, str(CertState.CURRENT)),
            )
            # Other pending ones (earlier requests never used) can no longer be committed.
            await tx.execute(
                "UPDATE op_certs SET state = ?, changed_at = ? WHERE device_id = ? AND state = ? "
                "AND certificate_id <> ?",
                *(str(CertState.EXPIRED), at, device_id, str(CertState.PENDING), certificate_id),
            )
            await tx.execute(
                "UPDATE op_certs SET state = ?, changed_at = ? WHERE certificate_id = ?",
                *(str(CertState.CURRENT), at, certificate_id),
            )
            cert = dataclasses.replace(cert, state=CertState.CURRENT, changed_at=at)
            config = {**dict(record.config), "certificate": certificate_config(cert)}
            record = dataclasses.replace(record, config=MappingProxyType(config))
            await tx.execute(
                "UPDATE devices SET sealed = ? WHERE device_id = ?",
                envelope.seal_record(key, record),
                device_id,
            )
            kind = EventType.CERTIFICATE_ROTATED if previous is not None else EventType.CERTIFICATE_ISSUED
            if previous is None and old_fp == cert.fingerprint:
                kind = EventType.PROVISIONED  # a claimed device (claim_device): new with this certificate
            extra = {
                "previous_fingerprint": old_fp,
                "new_fingerprint": cert.fingerprint,
                "certificate_id": cert.certificate_id,
                "certificate": certificate_config(cert),
            }
            if kind is EventType.PROVISIONED:
                extra = {"certificate_id": cert.certificate_id, "certificate": certificate_config(cert)}
            event = provisioned_event(record, event_id=new_event_id(), at=at, type=kind, **extra)
            details = {"certificate_id": cert.certificate_id, "event_id": event.event_id}
            if kind is not EventType.PROVISIONED:
                details["previous_fingerprint"] = old_fp
            else:
                details["claimed"] = "true"
            draft = AuditDraft(
                at=at,
                action=str(kind),
                actor="device",
                device_id=device_id,
                fingerprint=cert.fingerprint,
                peer=peer,
                details=MappingProxyType(details),
            )
            await self._log(tx, [event], [draft], {device_id: key})
            return record, cert, event

        return await self._write(body)

    async def expire_certificates(self, *, at: datetime) -> list[OperationalCertificate]:
        """Mark pending certificates past their commit window expired, each audited."""
        rows = await self._fetch(
            f"SELECT {_OP_COLUMNS} FROM op_certs WHERE state = ? AND commit_by < ?",
            str(CertState.PENDING),
            at,
        )
        ids = sorted({str(r[1]) for r in rows})
        keys = self._unwrap(await self._fetch(_DATA_KEYS, ids)) if ids else {}
        due = [self._open_op(r, keys[str(r[1])]) for r in rows if str(r[1]) in keys]
        if not due:
            return []

        async def body(tx: Tx) -> list[OperationalCertificate]:
            ids = sorted(c.certificate_id for c in due)
            changed = await tx.fetch(
                "UPDATE op_certs SET state = ?, changed_at = ? WHERE certificate_id = ANY(?) AND state = ? "
                "RETURNING certificate_id",
                *(str(CertState.EXPIRED), at, ids, str(CertState.PENDING)),
            )
            done = {str(r[0]) for r in changed}
            expired = [c for c in due if c.certificate_id in done]
            keys = self._unwrap(await tx.fetch(_DATA_KEYS, sorted({c.device_id for c in expired})))
            drafts = [
                AuditDraft(
                    at=at,
                    action="certificate-expired",
                    actor="broker",
                    device_id=c.device_id,
                    fingerprint=c.fingerprint,
                    reason="pending_expired",
                    details=MappingProxyType({"certificate_id": c.certificate_id}),
                )
                for c in expired
                if c.device_id in keys
            ]
            await self._log(tx, [], drafts, keys)
            return expired

        return await self._write(body)

    async def revoked_serials(self, issuer_id: str) -> list[tuple[int, datetime]]:
        rows = await self._fetch(
            "SELECT serial, revoked_at FROM issuer_revocations WHERE issuer_id = ? ORDER BY serial", issuer_id
        )
        return [(int(str(s), 16), timestamp(at)) for s, at in rows]

    @staticmethod
    async def _revoke_certificates(tx: Tx, device_id: str, at: datetime) -> None:
        """List every certificate of the device in its issuer's CRL (revocations outlive the rows)."""
        await tx.execute(
            "INSERT INTO issuer_revocations (issuer_id, serial, revoked_at) SELECT issuer_id, serial, ? "
            "FROM op_certs WHERE device_id = ? AND state <> ? ON CONFLICT DO NOTHING",
            *(at, device_id, str(CertState.EXPIRED)),
        )
        await tx.execute(
            "UPDATE op_certs SET state = ?, changed_at = ? WHERE device_id = ? AND state IN (?, ?)",
            *(str(CertState.REVOKED), at, device_id, str(CertState.PENDING), str(CertState.CURRENT)),
        )


_OP_COLUMNS = (
    "certificate_id, device_id, request_id, issuer_id, serial, state, issued_at, not_after, commit_by, "
    "changed_at, sealed"
)


def _op_values(c: OperationalCertificate) -> tuple[Any, ...]:
    return (
        c.certificate_id,
        c.device_id,
        c.request_id,
        c.issuer_id,
        format(c.serial, "x"),
        str(c.state),
        c.issued_at,
        c.not_after,
        c.commit_by,
        c.changed_at,
    )
