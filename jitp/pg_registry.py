"""The shared registry: PostgreSQL through asyncpg, for several broker nodes on one database.

Same contract and semantics as :class:`~jitp.sqlite_registry.SQLiteRegistry` (the rules
themselves, :func:`~jitp.registry.decide` and :func:`~jitp.registry.pseudonymize`, are shared).
What differs is how it stays race-free when several nodes (several pools) write at once:

* Provisioning relies on constraints, not on locks held by the application. Known records are
  read ``FOR UPDATE``; new ones are written with ``INSERT ... ON CONFLICT DO NOTHING RETURNING``.
  A device another node created in the meantime is not returned: its (committed) row is then
  read ``FOR UPDATE`` and the requests for that device are decided again against it (same
  certificate: a reconnect; another one: the reprovisioning policy). The unique partial index
  ``outbox_one_provisioned`` guarantees a single ``provisioned`` event per device whatever happens.
* The audit hash chain stays one chain across nodes: every append locks the ``audit_head`` row
  of ``meta_text`` (``SELECT ... FOR UPDATE``), takes seq and previous hash from it, inserts and
  moves the head, all in the writing transaction. The head lock is always the last lock a
  transaction takes, so it is held only until the commit. Inserting outbox events takes it too
  (just before the insert), so outbox seq order is commit order, which event sinks rely on
  (``events_after``).
* Like SQLite, concurrent ``provision`` and ``append_audit`` calls of one node are grouped by a
  writer task into one transaction per batch (group commit). A batch that fails on bad data is
  retried request by request, so one bad request cannot fail the others; deadlocks and
  serialization failures are retried.

Device data is sealed at rest (:mod:`jitp.envelope`). The ``devices`` table keeps in clear only
what lookups and operations need (id, status, CA, region, template, validity end, times), a
blind index of the certificate fingerprint (``fp_index``), and the rest sealed (AES-GCM) under
the device's own data key; outbox payloads and superseded fingerprints (``cert_history``) are
sealed under the same key. The data keys, wrapped by the master key (:mod:`jitp.keys`), live in
the *keyring*: tables ``meta``, ``data_keys`` and ``registry_keys`` in a schema of their own
(``<schema>_keyring`` by default). Being in the same database, a key is written and destroyed in
the same transaction as the rows it protects. Being in another schema, a backup of the registry
(``pg_dump -n <schema>``) carries no key material: erasing a device deletes its wrapped data key
(crypto-shredding), so nothing about it can be decrypted from any copy of the registry schema,
old backups included. (Back the keyring up apart, like the master key, and keep its backups
short-lived.) The registry and its keyring are paired by a random ``keyring_id`` kept in both;
:meth:`PostgresRegistry.open` refuses a keyring of another registry, and master keys that do not
hold every key the keyring is wrapped under (:class:`~jitp.errors.MasterKeyMismatch`).

Timestamps are ``timestamptz``, DER and sealed values ``bytea``; audit details are JSON text,
exactly as SQLite stores them (what the audit hashes cover must read back byte-identical).
Schema migrations (and the keyring's creation) run on :meth:`PostgresRegistry.open` under an
advisory lock and are recorded in ``schema_migrations``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeVar

import asyncpg

from jitp import envelope, errors, privacy
from jitp.audit import GENESIS_HASH, AuditDraft, AuditEntry, chain
from jitp.config import SCHEMA_NAME, default_keyring_schema
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
from jitp.trust import Role, TrustAnchor

log = logging.getLogger(__name__)

T = TypeVar("T")

_HEAD_GENESIS = f"0:{GENESIS_HASH}"

MIGRATIONS: tuple[str, ...] = (
    # 1: the foundation, the same tables as SQLite's. Columns of `audit` hold the stored
    # (pseudonymous) form: see jitp.privacy.
    f"""
    CREATE TABLE anchors (
        ca_id TEXT PRIMARY KEY,
        cert_der BYTEA NOT NULL,
        role TEXT NOT NULL,
        subject TEXT NOT NULL,
        region TEXT,
        template TEXT,
        enabled BOOLEAN NOT NULL DEFAULT TRUE,
        registered_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('trust_version', 1), ('templates_version', 1);
    CREATE TABLE meta_text (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta_text (key, value) VALUES ('audit_head', '{_HEAD_GENESIS}');
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        cert_fingerprint TEXT NOT NULL,
        ca_id TEXT NOT NULL,
        region TEXT NOT NULL,
        serial TEXT NOT NULL,
        subject TEXT NOT NULL,
        not_after TIMESTAMPTZ NOT NULL,
        provisioned_at TIMESTAMPTZ NOT NULL,
        last_seen TIMESTAMPTZ,
        attributes TEXT NOT NULL DEFAULT '{{}}',
        template TEXT,
        template_version INTEGER,
        config TEXT NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX devices_fingerprint ON devices (cert_fingerprint);
    CREATE TABLE cert_history (
        device_id TEXT NOT NULL,
        cert_fingerprint TEXT NOT NULL,
        superseded_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (device_id, cert_fingerprint)
    );
    CREATE TABLE device_keys (device_id TEXT PRIMARY KEY, ref_key BYTEA NOT NULL);
    CREATE TABLE tombstones (ref TEXT PRIMARY KEY, erased_at TIMESTAMPTZ NOT NULL);
    CREATE TABLE crls (
        ca_id TEXT PRIMARY KEY,
        der BYTEA NOT NULL,
        this_update TIMESTAMPTZ NOT NULL,
        next_update TIMESTAMPTZ,
        imported_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE outbox (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        device_id TEXT NOT NULL,
        occurred_at TIMESTAMPTZ NOT NULL,
        payload BYTEA NOT NULL,
        delivered_at TIMESTAMPTZ
    );
    CREATE INDEX outbox_pending ON outbox (seq) WHERE delivered_at IS NULL;
    CREATE INDEX outbox_device ON outbox (device_id);
    CREATE UNIQUE INDEX outbox_one_provisioned ON outbox (device_id) WHERE type = 'provisioned';
    CREATE TABLE audit (
        seq BIGINT PRIMARY KEY,
        at TIMESTAMPTZ NOT NULL,
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
    CREATE TABLE sink_cursors (name TEXT PRIMARY KEY, seq BIGINT NOT NULL);
    CREATE INDEX outbox_erased_unscrubbed ON outbox (seq) WHERE type = 'erased' AND device_id <> '';
    """,
    # 3: device data sealed at rest (jitp.envelope). Only what lookups need stays in clear; the
    # fingerprint is kept as a blind index only, and the audit keys move to the keyring schema. The
    # old tables are renamed; PostgresRegistry._seal_legacy() moves their rows (it needs the keys)
    # and drops them, in the same transaction.
    """
    ALTER TABLE devices RENAME TO devices_v2;
    ALTER TABLE devices_v2 RENAME CONSTRAINT devices_pkey TO devices_v2_pkey;
    DROP INDEX devices_fingerprint;
    ALTER TABLE cert_history RENAME TO cert_history_v2;
    ALTER TABLE cert_history_v2 RENAME CONSTRAINT cert_history_pkey TO cert_history_v2_pkey;
    ALTER TABLE device_keys RENAME TO device_keys_v2;
    ALTER TABLE device_keys_v2 RENAME CONSTRAINT device_keys_pkey TO device_keys_v2_pkey;
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        ca_id TEXT NOT NULL,
        region TEXT NOT NULL,
        not_after TIMESTAMPTZ NOT NULL,
        provisioned_at TIMESTAMPTZ NOT NULL,
        last_seen TIMESTAMPTZ,
        template TEXT,
        template_version INTEGER,
        fp_index TEXT NOT NULL,
        sealed BYTEA NOT NULL
    );
    CREATE INDEX devices_fp_index ON devices (fp_index);
    CREATE TABLE cert_history (
        device_id TEXT NOT NULL,
        fp_index TEXT NOT NULL,
        sealed_fp BYTEA NOT NULL,
        superseded_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (device_id, fp_index)
    );
    """,
)


def _keyring_ddl(ks: str) -> str:
    """The keyring schema ``ks`` (quoted): wrapped data keys, wrapped registry keys, and meta
    (``keyring_id``: the registry it belongs to; ``primary_kid``: the master key new keys go under)."""
    return f"""
    CREATE SCHEMA IF NOT EXISTS {ks};
    CREATE TABLE IF NOT EXISTS {ks}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS {ks}.data_keys (
        device_id TEXT PRIMARY KEY,
        kid TEXT NOT NULL,
        wrapped BYTEA NOT NULL
    );
    CREATE INDEX IF NOT EXISTS data_keys_kid ON {ks}.data_keys (kid);
    CREATE TABLE IF NOT EXISTS {ks}.registry_keys (
        name TEXT PRIMARY KEY,
        kid TEXT NOT NULL,
        wrapped BYTEA NOT NULL
    );
    """


# An erased device's last event names it: once delivered over MQTT *and* past every event sink's
# cursor (a sink that is behind must still publish it in full), it goes too.
_SCRUB_ERASED = (
    "UPDATE outbox SET device_id = '', payload = ''::bytea WHERE type = 'erased' AND device_id <> '' "
    "AND delivered_at IS NOT NULL AND seq <= COALESCE((SELECT MIN(seq) FROM sink_cursors), seq)"
)

_DEVICE_COLUMNS = (
    "device_id, status, ca_id, region, not_after, provisioned_at, last_seen, template, template_version, "
    "fp_index, sealed"
)
_DEVICE_ARRAYS = (
    "$1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], "
    "$7::timestamptz[], $8::text[], $9::int[], $10::text[], $11::bytea[]"
)
# A device row and its wrapped data key (NULL: shredded), see PostgresRegistry._open_device.
_DEVICE_SELECT = (
    "d.device_id, d.status, d.ca_id, d.region, d.not_after, d.provisioned_at, d.last_seen, d.template, "
    "d.template_version, d.sealed, k.kid, k.wrapped"
)
_LEGACY_COLUMNS = (
    "device_id, status, cert_fingerprint, ca_id, region, serial, subject, not_after, provisioned_at, "
    "last_seen, attributes, template, template_version, config"
)
_ANCHOR_COLUMNS = "ca_id, cert_der, role, subject, region, template, enabled, registered_at"
_EVENT_COLUMNS = "event_id, type, device_id, occurred_at, payload"
_EVENT_SELECT = "o.seq, o.event_id, o.type, o.device_id, o.occurred_at, o.payload, k.kid, k.wrapped"
_RETRIES = 5

# Worth retrying the whole transaction: another node's transaction got in the way.
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
# The server is gone or refuses connections: the registry is unavailable, not the request bad.
_CONNECTION: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)
# The request itself failed (bad data): that request fails, the registry is fine.
_FAILED: tuple[type[BaseException], ...] = (asyncpg.PostgresError, asyncpg.exceptions.DataError)


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _legacy_record(row: Any) -> DeviceRecord:
    """A device row of schema version 2 (everything in clear), for _seal_legacy."""
    return DeviceRecord(
        device_id=row[0],
        status=DeviceStatus(row[1]),
        cert_fingerprint=row[2],
        ca_id=row[3],
        region=row[4],
        serial=row[5],
        subject=row[6],
        not_after=row[7],
        provisioned_at=row[8],
        last_seen=row[9],
        attributes=MappingProxyType(json.loads(row[10])),
        template=row[11],
        template_version=row[12],
        config=MappingProxyType(json.loads(row[13])),
    )


def _anchor(row: Any) -> TrustAnchor:
    return TrustAnchor(
        ca_id=row[0],
        cert_der=bytes(row[1]),
        role=Role(row[2]),
        subject=row[3],
        region=row[4],
        template=row[5],
        enabled=bool(row[6]),
        registered_at=row[7],
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


_Op = _Provision | _Audit
_Result = ProvisionOutcome | errors.ProvisioningError | None


@dataclass
class _Group:
    """The requests of one batch for one device id, decided in order against one current record."""

    current: DeviceRecord | None  # as read from the database
    results: dict[int, ProvisionOutcome | errors.ProvisioningError] = field(default_factory=dict)
    record: DeviceRecord | None = None  # what to write (None: nothing)
    events: list[ProvisioningEvent] = field(default_factory=list)
    history: list[tuple[str, str, datetime]] = field(default_factory=list)
    drafts: list[tuple[int, AuditDraft]] = field(default_factory=list)
    touches: dict[str, datetime] = field(default_factory=dict)

    @property
    def creates(self) -> bool:
        return self.current is None and self.record is not None


class PostgresRegistry:
    """A :class:`~jitp.registry.Registry` on PostgreSQL, shared by any number of broker nodes."""

    def __init__(
        self,
        dsn: str,
        *,
        keys: MasterKeyProvider,
        schema: str | None = None,
        keyring_schema: str | None = None,
        pool_size: int = 10,
        max_batch: int = 512,
        batch_window: float = 0.002,
        connect_timeout: float = 10.0,
    ) -> None:
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise errors.ConfigError("must be a postgresql:// DSN", key="registry")
        if schema is not None and not SCHEMA_NAME.fullmatch(schema):
            raise errors.ConfigError("must be an SQL identifier", key="postgres.schema")
        if keyring_schema is None:
            keyring_schema = default_keyring_schema(schema)
        if not SCHEMA_NAME.fullmatch(keyring_schema):
            raise errors.ConfigError("must be an SQL identifier", key="postgres.keyring_schema")
        if keyring_schema == schema:
            raise errors.ConfigError("must differ from postgres.schema", key="postgres.keyring_schema")
        if pool_size < 1:
            raise errors.ConfigError("must be >= 1", key="postgres.pool_size")
        self.dsn = dsn
        self.schema = schema
        self.keyring_schema = keyring_schema
        self._keys = keys
        self._ks = ks = _quote_ident(keyring_schema)
        self._select_devices = (
            f"SELECT {_DEVICE_SELECT} FROM devices d LEFT JOIN {ks}.data_keys k ON k.device_id = d.device_id"
        )
        # Events whose data key is gone (an older copy of an erased device's rows) cannot be read:
        # left out here already, so that a LIMIT still returns what can be.
        self._select_events = (
            f"SELECT {_EVENT_SELECT} FROM outbox o LEFT JOIN {ks}.data_keys k ON k.device_id = o.device_id "
            "WHERE (k.device_id IS NOT NULL OR o.type = 'erased')"
        )
        self._pool_size = pool_size
        self._max_batch = max_batch
        self._batch_window = batch_window
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._touches: dict[str, datetime] = {}
        self._salt = b""
        self._index_key = b""
        self._audit_key = b""

    def __repr__(self) -> str:
        return (
            f"PostgresRegistry({redact(self.dsn)!r}, schema={self.schema!r}, "
            f"keyring_schema={self.keyring_schema!r})"
        )

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, migrate, and check the keyring (MasterKeyMismatch: nothing is read unverified)."""
        settings = {"application_name": "jitp"}
        if self.schema is not None:
            settings["search_path"] = self.schema
        where = redact(self.dsn)
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=min(2, self._pool_size),
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                server_settings=settings,
            )
        except (ValueError, asyncpg.exceptions.ClientConfigurationError) as exc:
            raise errors.ConfigError(f"invalid PostgreSQL DSN: {exc}", key="registry") from None
        except (
            asyncpg.exceptions.InvalidAuthorizationSpecificationError,
            asyncpg.exceptions.InvalidPasswordError,
            asyncpg.exceptions.InvalidCatalogNameError,
        ) as exc:
            raise errors.RegistryUnavailable(
                f"cannot use the PostgreSQL registry at {where}: {exc}"
            ) from None
        except (*_CONNECTION, asyncpg.PostgresError) as exc:
            raise errors.RegistryUnavailable(
                f"cannot connect to the PostgreSQL registry at {where}: {exc or type(exc).__name__}"
            ) from None
        self._pool = pool
        try:
            await self._migrate()
            self._salt = await self._registry_salt()
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="jitp-postgres-writer")

    async def close(self) -> None:
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._pool is not None:
            try:
                if self._touches:
                    await self._tx(self._flush_touches)
                    self._touches = {}
            except errors.ProvisioningError as exc:
                log.warning("last_seen of %d device(s) not written: %s", len(self._touches), exc)
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()

    async def __aenter__(self) -> PostgresRegistry:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise errors.RegistryUnavailable("the registry is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection; a lost or refused connection is :class:`RegistryUnavailable`."""
        pool = self.pool
        try:
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn
        except _CONNECTION as exc:
            raise errors.RegistryUnavailable(
                f"the PostgreSQL registry is unreachable: {exc or type(exc).__name__}"
            ) from None

    async def _tx(self, body: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``body(conn)`` in a transaction, again if another node's transaction got in the way."""
        for attempt in range(_RETRIES):
            try:
                async with self._conn() as conn, conn.transaction():
                    return await body(conn)
            except _TRANSIENT as exc:
                if attempt == _RETRIES - 1:
                    raise errors.RegistryUnavailable(f"registry write failed: {exc}") from None
                await asyncio.sleep(0.005 * (attempt + 1))
            except _FAILED as exc:
                raise errors.RegistryUnavailable(f"registry write failed: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read(self, sql: str, *args: Any) -> list[Any]:
        try:
            async with self._conn() as conn:
                rows: list[Any] = await conn.fetch(sql, *args)
                return rows
        except _FAILED as exc:
            raise errors.RegistryUnavailable(f"registry read failed: {exc}") from None

    async def _migrate(self) -> None:
        """Schema migrations, the keyring, and the legacy rows sealed: all in one transaction."""

        async def body(conn: Any) -> None:
            # Several nodes may start at once: one migrates, the others wait and find it done.
            # Always in this order (registry, then keyring), so two locks never deadlock.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('jitp-migrations:' || $1::text))", self.schema or ""
            )
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('jitp-keyring:' || $1::text))", self.keyring_schema
            )
            if self.schema is not None:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self.schema)}")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ)"
            )
            current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))
            if current > len(MIGRATIONS):
                raise errors.ConfigError(
                    f"the database schema is version {current}, newer than this jitp "
                    f"({len(MIGRATIONS)}); upgrade jitp",
                    where=redact(self.dsn),
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                await conn.execute(MIGRATIONS[version - 1])
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    version,
                    datetime.now(UTC),
                )
                log.info("registry schema migrated to version %d", version)
            primary = await self._open_keyring(conn)
            await self._seal_legacy(conn, primary)

        await self._tx(body)

    async def _open_keyring(self, conn: Any) -> str:
        """Create the keyring if absent, check that it belongs to this registry and that the master
        keys hold every key it is wrapped under, load (or make) the registry keys. The primary kid."""
        ks = self._ks
        await conn.execute(_keyring_ddl(ks))
        reg_id = await conn.fetchval("SELECT value FROM meta_text WHERE key = 'keyring_id'")
        ring_id = await conn.fetchval(f"SELECT value FROM {ks}.meta WHERE key = 'keyring_id'")
        paired = pair_keyring(
            reg_id,
            ring_id,
            has_devices=await conn.fetchval("SELECT 1 FROM devices LIMIT 1") is not None,
            has_keys=await conn.fetchval(f"SELECT 1 FROM {ks}.data_keys LIMIT 1") is not None,
            keyring=f"(schema {self.keyring_schema})",
            where=redact(self.dsn),
        )
        paired = paired or privacy.new_key().hex()[:32]
        if reg_id is None:
            await conn.execute("INSERT INTO meta_text (key, value) VALUES ('keyring_id', $1)", paired)
        if ring_id is None:
            await conn.execute(f"INSERT INTO {ks}.meta (key, value) VALUES ('keyring_id', $1)", paired)
        primary = await conn.fetchval(f"SELECT value FROM {ks}.meta WHERE key = 'primary_kid'")
        if primary is None:
            primary = self._keys.kids()[0]
            await conn.execute(f"INSERT INTO {ks}.meta (key, value) VALUES ('primary_kid', $1)", primary)
        rows = await conn.fetch(
            f"SELECT kid FROM {ks}.data_keys UNION SELECT kid FROM {ks}.registry_keys UNION SELECT $1::text",
            primary,
        )
        used = sorted(str(r[0]) for r in rows)
        require_kids(self._keys, used, where=redact(self.dsn))
        self._index_key = await self._registry_key(conn, envelope.INDEX_KEY)
        self._audit_key = await self._registry_key(conn, envelope.AUDIT_KEY)
        return str(primary)

    async def _registry_key(self, conn: Any, name: str) -> bytes:
        """Registry key ``name`` of the keyring, made if absent (whichever node is first)."""
        query = f"SELECT kid, wrapped FROM {self._ks}.registry_keys WHERE name = $1"
        row = await conn.fetchrow(query, name)
        if row is None:
            primary = await self._primary_for_wrapping(conn)
            await conn.execute(
                f"INSERT INTO {self._ks}.registry_keys (name, kid, wrapped) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO NOTHING",
                name,
                primary,
                envelope.wrap_registry_key(self._keys, primary, name, envelope.new_data_key()),
            )
            row = await conn.fetchrow(query, name)
        return envelope.unwrap_registry_key(self._keys, str(row[0]), name, bytes(row[1]))

    async def _primary_for_wrapping(self, conn: Any) -> str:
        """The primary kid, share-locked to the end of the transaction: set_primary_key's update
        waits for every transaction wrapping under the old primary, so none does once it committed."""
        return str(
            await conn.fetchval(f"SELECT value FROM {self._ks}.meta WHERE key = 'primary_kid' FOR SHARE")
        )

    async def _seal_legacy(self, conn: Any, primary: str) -> None:
        """Move a version-2 registry's clear rows into their sealed form (migration 3), once.

        Each device keeps its audit key as its data key, so earlier audit entries still resolve."""
        if await conn.fetchval("SELECT to_regclass('devices_v2')") is None:
            return
        keys = {r[0]: bytes(r[1]) for r in await conn.fetch("SELECT device_id, ref_key FROM device_keys_v2")}
        devices = [_legacy_record(r) for r in await conn.fetch(f"SELECT {_LEGACY_COLUMNS} FROM devices_v2")]
        history = await conn.fetch("SELECT device_id, cert_fingerprint, superseded_at FROM cert_history_v2")
        events = await conn.fetch(
            "SELECT seq, device_id, payload FROM outbox WHERE type <> 'erased' ORDER BY seq"
        )
        ids = {r.device_id for r in devices} | {r[0] for r in history} | {r[1] for r in events}
        keys.update({i: envelope.new_data_key() for i in sorted(ids - set(keys))})
        ordered = sorted(keys)
        await conn.execute(
            f"INSERT INTO {self._ks}.data_keys (device_id, kid, wrapped) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) "
            "ON CONFLICT (device_id) DO UPDATE SET kid = excluded.kid, wrapped = excluded.wrapped",
            ordered,
            [primary] * len(ordered),
            [envelope.wrap_data_key(self._keys, primary, i, keys[i]) for i in ordered],
        )
        if devices:
            await conn.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) SELECT * FROM unnest({_DEVICE_ARRAYS})",
                *self._device_arrays(devices, keys),
            )
        await conn.executemany(
            "INSERT INTO cert_history (device_id, fp_index, sealed_fp, superseded_at) VALUES ($1, $2, $3, $4) "
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
        await conn.executemany(
            "UPDATE outbox SET payload = $2 WHERE seq = $1",
            [
                (seq, envelope.seal_payload(keys[d], d, bytes(payload)))
                for seq, d, payload in events
                if bytes(payload)[:1] != envelope.SEALED_VERSION
            ],
        )
        await conn.execute("DROP TABLE devices_v2, cert_history_v2, device_keys_v2")
        log.info(
            "registry data sealed: %d device(s), %d superseded certificate(s), %d event(s)",
            len(devices),
            len(history),
            len(events),
        )

    async def _registry_salt(self) -> bytes:
        """A random per-registry salt for tombstones, made once (by whichever node is first)."""

        async def body(conn: Any) -> bytes:
            await conn.execute(
                "INSERT INTO meta_text (key, value) VALUES ('salt', $1) ON CONFLICT DO NOTHING",
                privacy.new_key().hex(),
            )
            return bytes.fromhex(await conn.fetchval("SELECT value FROM meta_text WHERE key = 'salt'"))

        return await self._tx(body)

    async def schema_version(self) -> int:
        rows = await self._read("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(rows[0][0])

    # -- data keys -------------------------------------------------------------------------
    async def _data_keys(self, conn: Any, ids: Sequence[str], *, create: bool) -> dict[str, bytes]:
        """The data keys of ``ids``, unwrapped; with ``create``, made for those without one (under
        the primary, in this transaction: the same key whichever node makes it first)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        query = f"SELECT device_id, kid, wrapped FROM {self._ks}.data_keys WHERE device_id = ANY($1::text[])"
        keys = {
            r[0]: envelope.unwrap_data_key(self._keys, r[1], r[0], bytes(r[2]))
            for r in await conn.fetch(query, wanted)
        }
        missing = [i for i in wanted if i not in keys]
        if missing and create:
            primary = await self._primary_for_wrapping(conn)
            await conn.execute(
                f"INSERT INTO {self._ks}.data_keys (device_id, kid, wrapped) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) ON CONFLICT (device_id) DO NOTHING",
                missing,
                [primary] * len(missing),
                [envelope.wrap_data_key(self._keys, primary, i, envelope.new_data_key()) for i in missing],
            )
            # Read back: another node may have made the key first (its wrapped key is then the one).
            keys.update(
                {
                    r[0]: envelope.unwrap_data_key(self._keys, r[1], r[0], bytes(r[2]))
                    for r in await conn.fetch(query, missing)
                }
            )
        return keys

    def _open_device(self, row: Any) -> tuple[DeviceRecord, bytes] | None:
        """A ``_DEVICE_SELECT`` row opened, with its data key; None when the key is gone (shredded:
        the row comes from a copy of the registry older than the device's erasure)."""
        if row[10] is None:
            log.warning(
                "a device row has no data key (its device was erased; the row comes from an older "
                "copy of the registry): ignored"
            )
            return None
        device_id = str(row[0])
        key = envelope.unwrap_data_key(self._keys, row[10], device_id, bytes(row[11]))
        record = envelope.open_record(
            key,
            bytes(row[9]),
            device_id=device_id,
            status=row[1],
            ca_id=row[2],
            region=row[3],
            not_after=row[4],
            provisioned_at=row[5],
            last_seen=row[6],
            template=row[7],
            template_version=row[8],
        )
        return record, key

    def _opened(self, rows: Sequence[Any]) -> list[tuple[DeviceRecord, bytes]]:
        return [opened for row in rows if (opened := self._open_device(row)) is not None]

    def _device_arrays(self, records: Sequence[DeviceRecord], keys: dict[str, bytes]) -> list[list[Any]]:
        """Column-wise rows of ``records``, sealed, for ``unnest`` (one round trip for a whole batch)."""
        return [
            [r.device_id for r in records],
            [str(r.status) for r in records],
            [r.ca_id for r in records],
            [r.region for r in records],
            [r.not_after for r in records],
            [r.provisioned_at for r in records],
            [r.last_seen for r in records],
            [r.template for r in records],
            [r.template_version for r in records],
            [envelope.fingerprint_index(self._index_key, r.cert_fingerprint) for r in records],
            [envelope.seal_record(keys[r.device_id], r) for r in records],
        ]

    def _match(self, rows: Sequence[Any], fingerprint: str) -> DeviceRecord | None:
        """The first record of ``rows`` (read by blind index) that really holds ``fingerprint``."""
        return next((r for r, _ in self._opened(rows) if r.cert_fingerprint == fingerprint), None)

    # -- trust anchors -------------------------------------------------------------------
    async def register_anchor(self, anchor: TrustAnchor, *, audit: AuditDraft) -> TrustAnchor:
        at = anchor.registered_at or audit.at

        async def body(conn: Any) -> TrustAnchor:
            row = await conn.fetchrow(
                f"INSERT INTO anchors ({_ANCHOR_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, TRUE, $7) "
                "ON CONFLICT (ca_id) DO UPDATE SET role = excluded.role, region = excluded.region, "
                f"template = excluded.template, enabled = TRUE RETURNING {_ANCHOR_COLUMNS}",
                anchor.ca_id,
                anchor.cert_der,
                str(anchor.role),
                anchor.subject,
                anchor.region,
                anchor.template,
                at,
            )
            await self._bump(conn, "trust_version")
            await self._append_audit_tx(conn, [audit])
            return _anchor(row)

        return await self._tx(body)

    async def set_anchor_enabled(self, ca_id: str, enabled: bool, *, audit: AuditDraft) -> TrustAnchor:
        async def body(conn: Any) -> TrustAnchor:
            row = await conn.fetchrow(
                f"UPDATE anchors SET enabled = $2 WHERE ca_id = $1 RETURNING {_ANCHOR_COLUMNS}",
                ca_id,
                enabled,
            )
            if row is None:
                raise errors.NotFound(f"no CA with id {ca_id!r} is registered", ca_id=ca_id)
            await self._bump(conn, "trust_version")
            await self._append_audit_tx(conn, [audit])
            return _anchor(row)

        return await self._tx(body)

    async def anchors(self) -> list[TrustAnchor]:
        rows = await self._read(f"SELECT {_ANCHOR_COLUMNS} FROM anchors ORDER BY registered_at, ca_id")
        return [_anchor(r) for r in rows]

    @staticmethod
    async def _bump(conn: Any, key: str) -> None:
        await conn.execute("UPDATE meta SET value = value + 1 WHERE key = $1", key)

    async def _meta(self, key: str) -> int:
        rows = await self._read("SELECT value FROM meta WHERE key = $1", key)
        return int(rows[0][0]) if rows else 0

    async def trust_version(self) -> int:
        return await self._meta("trust_version")

    async def templates_version(self) -> int:
        """Bumped by every template reload, so other nodes reload their templates too."""
        return await self._meta("templates_version")

    async def bump_templates_version(self) -> None:
        async def body(conn: Any) -> None:
            await self._bump(conn, "templates_version")

        await self._tx(body)

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
        rows = await self._read(f"{self._select_devices} WHERE d.device_id = $1", device_id)
        opened = self._opened(rows)
        return opened[0][0] if opened else None

    async def list_devices(self) -> list[DeviceRecord]:
        rows = await self._read(f"{self._select_devices} ORDER BY d.device_id")
        return [r for r, _ in self._opened(rows)]

    async def find_by_fingerprint(self, fingerprint: str) -> DeviceRecord | None:
        rows = await self._read(
            f"{self._select_devices} WHERE d.fp_index = $1 ORDER BY d.device_id",
            envelope.fingerprint_index(self._index_key, fingerprint),
        )
        return self._match(rows, fingerprint)

    async def is_erased(self, fingerprint: str) -> bool:
        ref = privacy.tombstone_ref(self._salt, fingerprint)
        return bool(await self._read("SELECT 1 FROM tombstones WHERE ref = $1", ref))

    async def _lock_device(self, conn: Any, device_id: str) -> tuple[DeviceRecord, bytes]:
        """The record (locked) and its data key; NotFound when absent or shredded."""
        rows = await conn.fetch(f"{self._select_devices} WHERE d.device_id = $1 FOR UPDATE OF d", device_id)
        opened = self._opened(rows)
        if not opened:
            raise errors.NotFound(f"no device with id {device_id!r}", device_id=device_id)
        return opened[0]

    # -- lifecycle -------------------------------------------------------------------------
    async def change_status(
        self, device_id: str, command: Command, *, at: datetime, actor: str, reason: str | None = None
    ) -> StatusChange:
        async def body(conn: Any) -> StatusChange:
            record, key = await self._lock_device(conn, device_id)
            change, draft = plan_status_change(record, command, at=at, actor=actor, reason=reason)
            keys = {device_id: key}
            stored = await self._pseudonymize(conn, [draft], keys)
            if change.event is not None:
                await conn.execute(
                    "UPDATE devices SET status = $2 WHERE device_id = $1",
                    device_id,
                    str(change.record.status),
                )
                await self._insert_events(conn, [change.event], keys)
            await self._append_stored(conn, stored)
            return change

        return await self._tx(body)

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

        The device's data key goes in the same transaction (crypto-shredding): whatever copy of the
        registry schema still holds its sealed rows, old backups included, can no longer decrypt
        them, and its audit entries can no longer be linked to it."""
        if device_id is None and fingerprint is None:
            raise errors.InvalidRequest("erase needs a device id or a certificate")

        async def body(conn: Any) -> Erasure:
            target = device_id
            if target is None:
                assert fingerprint is not None
                rows = await conn.fetch(
                    f"{self._select_devices} WHERE d.fp_index = $1 ORDER BY d.device_id",
                    envelope.fingerprint_index(self._index_key, fingerprint),
                )
                found = self._match(rows, fingerprint)
                if found is None:
                    ref = privacy.tombstone_ref(self._salt, fingerprint)
                    if await conn.fetchval("SELECT 1 FROM tombstones WHERE ref = $1", ref) is not None:
                        return Erasure(device_id=None, already_erased=True)
                    raise errors.NotFound("no device holds this certificate")
                target = found.device_id
            record, key = await self._lock_device(conn, target)
            if fingerprint is not None and record.cert_fingerprint != fingerprint:
                # Another node reprovisioned the device between the lookup and the lock.
                raise errors.NotFound("no device holds this certificate")
            history = await conn.fetch("SELECT sealed_fp FROM cert_history WHERE device_id = $1", target)
            fingerprints = {
                record.cert_fingerprint,
                *(envelope.open_fingerprint(key, target, bytes(r[0])) for r in history),
            }
            await conn.executemany(
                "INSERT INTO tombstones (ref, erased_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(privacy.tombstone_ref(self._salt, fp), at) for fp in sorted(fingerprints)],
            )
            # Pseudonymized while the device's key still exists; appended last (the head lock).
            stored = await self._pseudonymize(
                conn,
                [
                    AuditDraft(
                        at=at,
                        action="erased",
                        actor=actor,
                        device_id=target,
                        fingerprint=record.cert_fingerprint,
                        reason=reason,
                        details=MappingProxyType({"previous_status": str(record.status)}),
                    )
                ],
                {target: key},
            )
            for table in ("outbox", "cert_history", "devices", f"{self._ks}.data_keys"):
                await conn.execute(f"DELETE FROM {table} WHERE device_id = $1", target)
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
            await self._insert_events(conn, [event], {})  # in clear: its key is gone
            await self._append_stored(conn, stored)
            return Erasure(device_id=target, event=event)

        erasure = await self._tx(body)
        if erasure.device_id is not None:
            self._touches.pop(erasure.device_id, None)
        return erasure

    async def checkpoint(self) -> bool:
        """Nothing to fold in PostgreSQL (dead row versions go with autovacuum); for parity with SQLite."""
        return True

    async def _insert_events(
        self, conn: Any, events: Sequence[ProvisioningEvent], keys: dict[str, bytes]
    ) -> None:
        """Outbox rows, payloads sealed under the device's data key in ``keys`` (an erasure's event,
        whose key is destroyed, names only the id and region, both in clear anyway)."""
        if not events:
            return
        rows = []
        for e in events:
            payload = e.payload
            if e.type != "erased":
                payload = envelope.seal_payload(keys[e.device_id], e.device_id, payload)
            rows.append((e.event_id, e.type, e.device_id, e.occurred_at, payload))
        # Outbox rows are numbered under the audit-head lock, held to commit, so seq order is
        # commit order: an event sink reading by seq (events_after) never skips a late commit.
        await conn.execute("SELECT 1 FROM meta_text WHERE key = 'audit_head' FOR UPDATE")
        await conn.executemany(f"INSERT INTO outbox ({_EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5)", rows)

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

        async def body(conn: Any) -> list[ProvisioningEvent]:
            rows = await conn.fetch(
                f"{self._select_devices} WHERE d.device_id = ANY($1::text[]) AND d.template = $2 "
                "ORDER BY d.device_id FOR UPDATE OF d",
                [r.device_id for r in ordered],
                template,
            )
            current = {r.device_id: (r, key) for r, key in self._opened(rows)}
            keys = {device_id: key for device_id, (_, key) in current.items()}
            updates = []
            for r in ordered:
                found = current.get(r.device_id)
                if found is None:
                    continue
                # Only what a template renders changes: the certificate may have rotated meanwhile.
                updated = dataclasses.replace(
                    found[0], attributes=r.attributes, template_version=r.template_version, config=r.config
                )
                updates.append((r.device_id, r.template_version, envelope.seal_record(found[1], updated)))
            if updates:
                await conn.executemany(
                    "UPDATE devices SET template_version = $2, sealed = $3 WHERE device_id = $1", updates
                )
            events = [
                provisioned_event(r, event_id=new_event_id(), at=at, type="config-changed")
                for r in records
                if r.device_id in keys
            ]
            stored = await self._pseudonymize(
                conn,
                [
                    AuditDraft(
                        at=at,
                        action="template-changed",
                        actor=actor,
                        details=MappingProxyType({"template": template, "devices": str(len(events))}),
                    )
                ],
            )
            await self._insert_events(conn, events, keys)
            await self._append_stored(conn, stored)
            return events

        return await self._tx(body)

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
        async def body(conn: Any) -> None:
            if await conn.fetchval("SELECT 1 FROM anchors WHERE ca_id = $1", ca_id) is None:
                raise errors.NotFound(f"no CA with id {ca_id!r} is registered", ca_id=ca_id)
            await conn.execute(
                "INSERT INTO crls (ca_id, der, this_update, next_update, imported_at) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (ca_id) DO UPDATE SET der = excluded.der, this_update = excluded.this_update, "
                "next_update = excluded.next_update, imported_at = excluded.imported_at",
                ca_id,
                der,
                this_update,
                next_update,
                audit.at,
            )
            await self._bump(conn, "trust_version")
            await self._append_audit_tx(conn, [audit])

        await self._tx(body)

    async def crls(self) -> dict[str, bytes]:
        return {r[0]: bytes(r[1]) for r in await self._read("SELECT ca_id, der FROM crls")}

    # -- keys (jitp keys rotate) -------------------------------------------------------------
    async def keyring_status(self) -> KeyringStatus:
        ks = self._ks
        primary = await self._read(f"SELECT value FROM {ks}.meta WHERE key = 'primary_kid'")
        rows = await self._read(
            f"SELECT kid, COUNT(*) FROM (SELECT kid FROM {ks}.data_keys "
            f"UNION ALL SELECT kid FROM {ks}.registry_keys) AS wrapped GROUP BY kid ORDER BY kid"
        )
        return KeyringStatus(
            primary=str(primary[0][0]), wrapped=MappingProxyType({str(r[0]): int(r[1]) for r in rows})
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

        async def body(conn: Any) -> None:
            # Waits for the transactions wrapping under the old primary (they share-lock this row).
            await conn.execute(f"UPDATE {self._ks}.meta SET value = $1 WHERE key = 'primary_kid'", kid)
            await self._append_audit_tx(conn, [audit])

        await self._tx(body)

    async def rewrap_keys(self, *, limit: int = 500) -> int:
        ks = self._ks

        async def body(conn: Any) -> int:
            primary = await self._primary_for_wrapping(conn)
            rows = await conn.fetch(
                f"SELECT device_id, kid, wrapped FROM {ks}.data_keys WHERE kid <> $1 ORDER BY device_id "
                "LIMIT $2 FOR UPDATE SKIP LOCKED",
                primary,
                limit,
            )
            if rows:
                await conn.execute(
                    f"UPDATE {ks}.data_keys AS k SET kid = $1, wrapped = u.wrapped "
                    "FROM unnest($2::text[], $3::bytea[]) AS u (device_id, wrapped) WHERE k.device_id = u.device_id",
                    primary,
                    [r[0] for r in rows],
                    [
                        envelope.wrap_data_key(
                            self._keys, primary, d, envelope.unwrap_data_key(self._keys, kid, d, bytes(w))
                        )
                        for d, kid, w in rows
                    ],
                )
            named = []
            if limit > len(rows):
                named = await conn.fetch(
                    f"SELECT name, kid, wrapped FROM {ks}.registry_keys WHERE kid <> $1 ORDER BY name "
                    "LIMIT $2 FOR UPDATE SKIP LOCKED",
                    primary,
                    limit - len(rows),
                )
                await conn.executemany(
                    f"UPDATE {ks}.registry_keys SET kid = $2, wrapped = $3 WHERE name = $1",
                    [
                        (
                            n,
                            primary,
                            envelope.wrap_registry_key(
                                self._keys,
                                primary,
                                n,
                                envelope.unwrap_registry_key(self._keys, kid, n, bytes(w)),
                            ),
                        )
                        for n, kid, w in named
                    ],
                )
            return len(rows) + len(named)

        return await self._tx(body)

    # -- outbox --------------------------------------------------------------------------
    def _open_events(self, rows: Sequence[Any]) -> list[tuple[int, ProvisioningEvent]]:
        """``_EVENT_SELECT`` rows, payloads opened (each device's key unwrapped once)."""
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
                event_id=event_id, type=type_, device_id=device_id, occurred_at=occurred_at, payload=opened
            )
            out.append((int(seq), event))
        return out

    async def pending_events(self, limit: int = 500) -> list[ProvisioningEvent]:
        rows = await self._read(
            f"{self._select_events} AND o.delivered_at IS NULL ORDER BY o.seq LIMIT $1", limit
        )
        return [e for _, e in self._open_events(rows)]

    async def mark_delivered(self, event_ids: Sequence[str], *, at: datetime) -> None:
        if not event_ids:
            return
        ids = sorted(set(event_ids))

        async def body(conn: Any) -> None:
            await conn.execute(
                "UPDATE outbox SET delivered_at = $2 WHERE event_id = ANY($1::text[]) AND delivered_at IS NULL",
                ids,
                at,
            )
            await conn.execute(_SCRUB_ERASED)

        await self._tx(body)

    async def events_after(self, seq: int, limit: int = 500) -> list[tuple[int, ProvisioningEvent]]:
        # Outbox rows are inserted under the audit-head lock (_insert_events): seq order is commit order.
        rows = await self._read(
            f"{self._select_events} AND o.seq > $1 AND NOT (o.type = 'erased' AND o.device_id = '') "
            "ORDER BY o.seq LIMIT $2",
            seq,
            limit,
        )
        return self._open_events(rows)

    async def outbox_head(self) -> int:
        """The newest outbox seq (0 when empty)."""
        async with self._conn() as conn:
            value = await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM outbox")
        return int(value)

    async def sink_cursor(self, name: str) -> int:
        rows = await self._read("SELECT seq FROM sink_cursors WHERE name = $1", name)
        return int(rows[0][0]) if rows else 0

    async def set_sink_cursor(self, name: str, seq: int) -> None:
        async def body(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO sink_cursors (name, seq) VALUES ($1, $2) "
                "ON CONFLICT (name) DO UPDATE SET seq = GREATEST(sink_cursors.seq, EXCLUDED.seq)",
                name,
                seq,
            )
            await conn.execute(_SCRUB_ERASED)

        await self._tx(body)

    async def events(self, device_id: str | None = None) -> list[ProvisioningEvent]:
        if device_id is None:
            rows = await self._read(f"{self._select_events} ORDER BY o.seq")
        else:
            rows = await self._read(f"{self._select_events} AND o.device_id = $1 ORDER BY o.seq", device_id)
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
        rows = await self._read(
            "SELECT seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, hash "
            "FROM audit ORDER BY seq"
        )
        return [
            AuditEntry(
                seq=int(r[0]),
                draft=AuditDraft(
                    at=r[1],
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
        rows = await self._read("SELECT value FROM meta_text WHERE key = 'audit_head'")
        if not rows:
            return None
        seq, _, digest = str(rows[0][0]).partition(":")
        return (int(seq), digest) if int(seq) > 0 else None

    async def resolve_audit(self, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
        """Entries with device refs and sealed peers resolved, for devices that still exist."""
        keys: dict[str, bytes] = {}
        if any(e.draft.device_id for e in entries):
            rows = await self._read(f"SELECT device_id, kid, wrapped FROM {self._ks}.data_keys")
            keys = {d: envelope.unwrap_data_key(self._keys, kid, d, bytes(w)) for d, kid, w in rows}
        return resolve_entries(entries, keys, self._audit_key)

    async def _pseudonymize(
        self, conn: Any, drafts: Sequence[AuditDraft], known: dict[str, bytes] | None = None
    ) -> list[AuditDraft]:
        """Drafts in their stored form: nothing personal about a device in clear (jitp.privacy).

        An entry about a device uses its data key (made if absent: a refusal can name a device that
        was never provisioned); the peer of an entry about no device is sealed under the audit key.
        Call it before inserting events: making a key takes a lock the audit head must come after."""
        known = known or {}
        ids = {d.device_id for d in drafts if d.device_id}
        keys = {i: known[i] for i in ids if i in known}
        keys.update(await self._data_keys(conn, [i for i in ids if i not in keys], create=True))
        return [pseudonymize(d, keys) if d.device_id else seal_anonymous(d, self._audit_key) for d in drafts]

    @staticmethod
    async def _append_stored(conn: Any, stored: Sequence[AuditDraft]) -> None:
        """Chain and insert stored drafts. Locks the audit head: the last lock of a transaction."""
        if not stored:
            return
        head = str(await conn.fetchval("SELECT value FROM meta_text WHERE key = 'audit_head' FOR UPDATE"))
        seq_text, _, prev = head.partition(":")
        entries = chain(stored, start_seq=int(seq_text) + 1, prev_hash=prev)
        await conn.executemany(
            "INSERT INTO audit (seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, "
            "hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
        last = entries[-1]
        await conn.execute(
            "UPDATE meta_text SET value = $1 WHERE key = 'audit_head'", f"{last.seq}:{last.hash}"
        )

    async def _append_audit_tx(self, conn: Any, drafts: Sequence[AuditDraft]) -> None:
        await self._append_stored(conn, await self._pseudonymize(conn, drafts))

    # -- last_seen (write-behind) ----------------------------------------------------------
    def note_seen(self, device_id: str, at: datetime) -> None:
        """Record a reconnect; written with the next batch, the next flush_seen(), or on close."""
        self._touches[device_id] = at

    async def flush_seen(self) -> None:
        """Write the reconnects noted since the last write (the broker calls this every few seconds)."""
        if self._touches and self._pool is not None:
            touches, self._touches = self._touches, {}
            await self._tx(lambda conn: self._flush_touches(conn, touches, only_extra=True))

    async def _flush_touches(
        self, conn: Any, extra: dict[str, datetime] | None = None, *, only_extra: bool = False
    ) -> None:
        touches = {**({} if only_extra else self._touches), **(extra or {})}
        if not touches:
            return
        ids = sorted(touches)
        # GREATEST: two nodes may write a device's reconnects out of order; last_seen never goes back.
        await conn.execute(
            "UPDATE devices AS d SET last_seen = GREATEST(d.last_seen, t.at) "
            "FROM unnest($1::text[], $2::timestamptz[]) AS t (device_id, at) WHERE d.device_id = t.device_id",
            ids,
            [touches[i] for i in ids],
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
                results = await self._commit(batch)
                for op, result in zip(batch, results, strict=True):
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
        """One transaction for the batch; on bad data, one per request so the others still pass."""
        touches = self._touches
        self._touches = {}
        try:
            for attempt in range(_RETRIES):
                try:
                    async with self._conn() as conn, conn.transaction():
                        return await self._apply(conn, batch, touches)
                except _TRANSIENT:
                    if attempt == _RETRIES - 1:
                        raise
                    await asyncio.sleep(0.005 * (attempt + 1))
        except errors.ProvisioningError as exc:  # unreachable server, or unusable master key
            self._touches = {**touches, **self._touches}
            return [exc] * len(batch)
        except _FAILED as exc:
            self._touches = {**touches, **self._touches}
            if len(batch) == 1:
                return [errors.RegistryUnavailable(f"registry write failed: {exc}")]
            log.warning("registry batch of %d failed (%s); retrying request by request", len(batch), exc)
            out: list[_Result] = []
            for op in batch:
                out += await self._commit([op])
            return out
        raise AssertionError("unreachable")  # pragma: no cover

    async def _apply(self, conn: Any, batch: list[_Op], touches: dict[str, datetime]) -> list[_Result]:
        by_device: dict[str, list[tuple[int, _Provision]]] = {}
        for i, op in enumerate(batch):
            if isinstance(op, _Provision):
                by_device.setdefault(op.identity.device_id, []).append((i, op))
        groups: dict[str, _Group] = {}
        keys: dict[str, bytes] = {}
        # Reconnects of other devices first: their row locks must come before the audit-head lock
        # that inserting outbox events takes (_insert_events).
        await self._flush_touches(conn, touches)
        if by_device:
            groups, keys = await self._provision(conn, by_device)
        results: list[_Result] = [None] * len(batch)
        drafts: list[tuple[int, int, AuditDraft]] = []
        seen: dict[str, datetime] = {}
        for group in groups.values():
            for i, outcome in group.results.items():
                results[i] = outcome
            drafts += [(i, n, d) for n, (i, d) in enumerate(group.drafts)]
            seen.update(group.touches)
        for i, op in enumerate(batch):
            if isinstance(op, _Audit):
                drafts += [(i, n, d) for n, d in enumerate(op.drafts)]
        await self._flush_touches(conn, seen, only_extra=True)  # devices of this batch: locked already
        drafts.sort(key=lambda t: (t[0], t[1]))  # in request order, as SQLite writes them
        # Keys (and their lock) before the audit head, which inserting the events takes.
        stored = await self._pseudonymize(conn, [d for _, _, d in drafts], keys)
        await self._insert_events(conn, [e for i in sorted(groups) for e in groups[i].events], keys)
        await self._append_stored(conn, stored)
        return results

    async def _lock_devices(
        self, conn: Any, ids: Sequence[str]
    ) -> tuple[dict[str, tuple[DeviceRecord, bytes]], set[tuple[str, str]]]:
        """Current records with their keys (locked, in id order) and their superseded certificates.

        Rows whose key is gone (restored from a copy older than the device's erasure) can never be
        read again: they are removed, and the device is new."""
        rows = await conn.fetch(
            f"{self._select_devices} WHERE d.device_id = ANY($1::text[]) ORDER BY d.device_id FOR UPDATE OF d",
            list(ids),
        )
        existing = {r.device_id: (r, key) for r, key in self._opened(rows)}
        orphans = sorted({str(r[0]) for r in rows} - set(existing))
        if orphans:
            await conn.execute("DELETE FROM cert_history WHERE device_id = ANY($1::text[])", orphans)
            await conn.execute(
                "DELETE FROM outbox WHERE device_id = ANY($1::text[]) AND type <> 'erased'", orphans
            )
            await conn.execute("DELETE FROM devices WHERE device_id = ANY($1::text[])", orphans)
        superseded: set[tuple[str, str]] = set()
        if existing:
            history = await conn.fetch(
                "SELECT device_id, sealed_fp FROM cert_history WHERE device_id = ANY($1::text[])",
                sorted(existing),
            )
            superseded = {
                (d, envelope.open_fingerprint(existing[d][1], d, bytes(sealed))) for d, sealed in history
            }
        return existing, superseded

    async def _provision(
        self, conn: Any, by_device: dict[str, list[tuple[int, _Provision]]]
    ) -> tuple[dict[str, _Group], dict[str, bytes]]:
        """Decide and write the batch's provisioning requests. The groups, and the data keys of the
        devices they write (their events are inserted by the caller, after the audit keys)."""
        existing: dict[str, DeviceRecord] = {}
        keys: dict[str, bytes] = {}
        superseded: set[tuple[str, str]] = set()
        erased: set[str] = set()
        groups: dict[str, _Group] = {}
        pending = sorted(by_device)
        for _ in range(_RETRIES):
            fresh, fresh_superseded = await self._lock_devices(conn, pending)
            for device_id in pending:
                existing.pop(device_id, None)
            existing.update({d: r for d, (r, _) in fresh.items()})
            keys.update({d: key for d, (_, key) in fresh.items()})
            superseded |= fresh_superseded
            # After the lock: an erasure that held it has committed its tombstones by now.
            refs = {
                privacy.tombstone_ref(self._salt, op.identity.cert_fingerprint)
                for device_id in pending
                for _, op in by_device[device_id]
            }
            rows = await conn.fetch("SELECT ref FROM tombstones WHERE ref = ANY($1::text[])", sorted(refs))
            erased |= {r[0] for r in rows}
            for device_id in pending:
                groups[device_id] = self._decide_group(
                    by_device[device_id], existing.get(device_id), superseded, erased
                )
            creates = [g.record for i in pending if (g := groups[i]).creates and g.record is not None]
            lost: list[str] = []
            if creates:
                # A new device's data key, in the same transaction as its first row (or the key
                # another node made for it first, read back).
                keys.update(await self._data_keys(conn, [r.device_id for r in creates], create=True))
                won = await conn.fetch(
                    f"INSERT INTO devices ({_DEVICE_COLUMNS}) SELECT * FROM unnest({_DEVICE_ARRAYS}) "
                    "ON CONFLICT (device_id) DO NOTHING RETURNING device_id",
                    *self._device_arrays(creates, keys),
                )
                won_ids = {r[0] for r in won}
                lost = sorted(r.device_id for r in creates if r.device_id not in won_ids)
            if not lost:
                break
            # Another node created these devices since we looked; its row is committed now (READ
            # COMMITTED: ON CONFLICT waited for it). Decide again against its record, locked this time.
            pending = lost
        else:
            raise errors.RegistryUnavailable(
                "provisioning did not settle (devices created and erased meanwhile)"
            )
        ids = sorted(by_device)
        updates = sorted(
            (g.record for g in groups.values() if not g.creates and g.record is not None),
            key=lambda r: r.device_id,
        )
        if updates:
            await conn.execute(
                f"UPDATE devices AS d SET ({_DEVICE_COLUMNS}) = (u.device_id, u.status, u.ca_id, u.region, "
                "u.not_after, u.provisioned_at, u.last_seen, u.template, u.template_version, u.fp_index, "
                f"u.sealed) FROM unnest({_DEVICE_ARRAYS}) AS u ({_DEVICE_COLUMNS}) WHERE d.device_id = u.device_id",
                *self._device_arrays(updates, keys),
            )
        history = [
            (
                d,
                envelope.fingerprint_index(self._index_key, fp),
                envelope.seal_fingerprint(keys[d], d, fp),
                at,
            )
            for i in ids
            for d, fp, at in groups[i].history
        ]
        if history:
            await conn.executemany(
                "INSERT INTO cert_history (device_id, fp_index, sealed_fp, superseded_at) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING",
                history,
            )
        return groups, keys

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
            ref = privacy.tombstone_ref(self._salt, op.identity.cert_fingerprint)
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
            group.events.append(event)
            group.drafts.append(
                (
                    i,
                    provisioned_draft(
                        record, event, previous=previous, at=op.at, peer=op.peer, policy=op.policy
                    ),
                )
            )
        return group


async def drop_schema(dsn: str, schema: str, *, keyring_schema: str | None = None) -> None:
    """Remove a registry schema and its keyring schema (``keyring_schema``, by default the one
    :class:`PostgresRegistry` derives), with everything in them (tests; decommissioning a registry)."""
    if keyring_schema is None:
        keyring_schema = default_keyring_schema(schema)
    for name in (schema, keyring_schema):
        if not SCHEMA_NAME.fullmatch(name):
            raise errors.ConfigError("must be an SQL identifier", key="postgres.schema")
    conn = await asyncpg.connect(dsn)
    try:
        for name in (schema, keyring_schema):
            await conn.execute(f"DROP SCHEMA IF EXISTS {_quote_ident(name)} CASCADE")
    finally:
        await conn.close()
