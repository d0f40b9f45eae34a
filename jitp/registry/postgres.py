"""The shared registry: PostgreSQL through asyncpg, for several broker nodes (several pools) on one
database: the :class:`~jitp.registry.core.Storage` below :class:`~jitp.registry.core.RegistryCore`.

The core's SQL runs as written, ``?`` numbered ``$1..$n`` and lists bound as arrays. Its ``FOR
UPDATE``/``FOR SHARE`` are row locks: provisioning relies on constraints and row locks, not on locks
held by the application. Transactions run at READ COMMITTED; deadlocks and serialization failures
are retried; opening transactions are serialised across nodes by advisory locks (registry first).

The keyring is a schema of its own (``<schema>_keyring`` by default): in the same database, so a key
is written and destroyed in the transaction of the rows it protects; in another schema, so a backup
of the registry (``pg_dump -n <schema>``) carries no key material and erasing a device's wrapped key
(crypto-shredding) reaches every copy of it. Back the keyring up apart, like the master key, with
short retention. Timestamps are ``timestamptz``, DER and sealed values ``bytea``; audit details are
JSON text, as SQLite stores them (what the audit hashes cover must read back byte-identical).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import asyncpg

from jitp import errors
from jitp.config import SCHEMA_NAME, default_keyring_schema
from jitp.crypto.keys import MasterKeyProvider
from jitp.registry.core import RETRIES, RegistryCore, Row
from jitp.registry.schema import ColumnTypes, migrations

T = TypeVar("T")

_V2 = ("devices", "cert_history", "device_keys")  # migration 3 frees their primary keys' names
_RENAME = " ".join(f"ALTER TABLE {t}_v2 RENAME CONSTRAINT {t}_pkey TO {t}_v2_pkey;" for t in _V2)
_IDENTITY = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
TYPES = ColumnTypes("BYTEA", "TIMESTAMPTZ", "BIGINT", "BOOLEAN NOT NULL DEFAULT TRUE", _IDENTITY, _RENAME)
MIGRATIONS = migrations(TYPES)

_X = asyncpg.exceptions
# Worth retrying the whole transaction: another node's transaction got in the way.
_TRANSIENT: tuple[type[BaseException], ...] = (_X.DeadlockDetectedError, _X.SerializationError)
# The server is gone or refuses connections: the registry is unavailable, not the request bad.
_CONNECTION: tuple[type[BaseException], ...] = (OSError, TimeoutError, _X.ConnectionDoesNotExistError)
_CONNECTION += (_X.PostgresConnectionError, _X.CannotConnectNowError, _X.OperatorInterventionError)
_CONNECTION += (_X.InsufficientResourcesError,)
_PLACEHOLDER = re.compile(r"\?")
_KEYRING = re.compile(r"\bkeyring\.")


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


def _keyring_ddl(ks: str) -> tuple[str, ...]:
    """The keyring schema ``ks`` (quoted): wrapped data keys, wrapped registry keys, and meta
    (``keyring_id``: the registry it belongs to; ``primary_kid``: the master key new keys go under)."""
    return (
        f"CREATE SCHEMA IF NOT EXISTS {ks}",
        f"CREATE TABLE IF NOT EXISTS {ks}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {ks}.data_keys (device_id TEXT PRIMARY KEY, kid TEXT NOT NULL, wrapped BYTEA NOT NULL)",
        f"CREATE INDEX IF NOT EXISTS data_keys_kid ON {ks}.data_keys (kid)",
        f"CREATE TABLE IF NOT EXISTS {ks}.registry_keys (name TEXT PRIMARY KEY, kid TEXT NOT NULL, wrapped BYTEA NOT NULL)",
    )


class _Tx:
    """The core's SQL on a pooled connection: placeholders numbered, the keyring's schema named."""

    def __init__(self, conn: Any, sql: dict[str, str], ks: str) -> None:
        self._conn, self._sql, self._ks = conn, sql, ks

    def _translate(self, sql: str) -> str:
        found = self._sql.get(sql)
        if found is None:
            numbers = iter(range(1, sql.count("?") + 1))
            numbered = _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql)
            found = self._sql[sql] = _KEYRING.sub(f"{self._ks}.", numbered)
        return found

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self._conn.fetch(self._translate(sql), *args)
        return rows

    async def execute(self, sql: str, *args: Any) -> int:
        status = str(await self._conn.execute(self._translate(sql), *args))
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        listed = list(rows)
        if listed:
            await self._conn.executemany(self._translate(sql), listed)

    async def has_table(self, name: str) -> bool:
        # The catalog read with this statement's snapshot (to_regclass could use a cache older than
        # the advisory lock this transaction waited for, and miss another node's DROP).
        query = "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() AND tablename = $1"
        return await self._conn.fetchval(query, name) is not None


class PostgresStorage:
    """The :class:`~jitp.registry.core.Storage` of a registry schema and its keyring schema."""

    keyring_apart = False
    types = TYPES
    failures: tuple[type[Exception], ...] = (asyncpg.PostgresError, asyncpg.exceptions.DataError)

    def __init__(
        self, dsn: str, schema: str | None, keyring_schema: str, *, pool_size: int, timeout: float
    ) -> None:
        self.dsn, self.schema, self.keyring_schema = dsn, schema, keyring_schema
        self.where, self.keyring = redact(dsn), f"(schema {keyring_schema})"
        self._ks = _quote_ident(keyring_schema)
        own = () if schema is None else (f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(schema)}",)
        self.setup = (*own, *_keyring_ddl(self._ks))
        self._locks = (f"jitp-migrations:{schema or ''}", f"jitp-keyring:{keyring_schema}")
        self._pool_size, self._connect_timeout = pool_size, timeout
        self._pool: asyncpg.Pool | None = None
        self._sql: dict[str, str] = {}

    async def open(self) -> None:
        settings = {"application_name": "jitp"}
        if self.schema is not None:
            settings["search_path"] = self.schema
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=min(2, self._pool_size),
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                server_settings=settings,
            )
        except (ValueError, _X.ClientConfigurationError) as exc:
            raise errors.ConfigError(f"invalid PostgreSQL DSN: {exc}", key="registry") from None
        except (
            _X.InvalidAuthorizationSpecificationError,
            _X.InvalidPasswordError,
            _X.InvalidCatalogNameError,
        ) as exc:
            raise errors.RegistryUnavailable(
                f"cannot use the PostgreSQL registry at {self.where}: {exc}"
            ) from None
        except (*_CONNECTION, asyncpg.PostgresError) as exc:
            raise errors.RegistryUnavailable(
                f"cannot connect to the PostgreSQL registry at {self.where}: {exc or type(exc).__name__}"
            ) from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection; a lost or refused connection is :class:`RegistryUnavailable`."""
        if self._pool is None:
            raise errors.RegistryUnavailable("the registry is not open")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn
        except _CONNECTION as exc:
            raise errors.RegistryUnavailable(
                f"the PostgreSQL registry is unreachable: {exc or type(exc).__name__}"
            ) from None

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._conn() as conn:
            return await _Tx(conn, self._sql, self._ks).fetch(sql, *args)

    async def write(self, body: Callable[[_Tx], Awaitable[T]], *, exclusive: bool = False) -> T:
        for attempt in range(RETRIES):
            try:
                async with self._conn() as conn, conn.transaction():
                    if exclusive:  # several nodes may start at once: one migrates, the others find it done
                        for lock in self._locks:
                            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1::text))", lock)
                    return await body(_Tx(conn, self._sql, self._ks))
            except _TRANSIENT:
                if attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    async def checkpoint(self) -> bool:
        """Nothing to fold in PostgreSQL (dead row versions go with autovacuum)."""
        return True


class PostgresRegistry(RegistryCore):
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
        self.dsn, self.schema, self.keyring_schema = dsn, schema, keyring_schema
        storage = PostgresStorage(dsn, schema, keyring_schema, pool_size=pool_size, timeout=connect_timeout)
        super().__init__(storage, keys, max_batch=max_batch, batch_window=batch_window)

    def __repr__(self) -> str:
        return (
            f"PostgresRegistry({redact(self.dsn)!r}, schema={self.schema!r}, "
            f"keyring_schema={self.keyring_schema!r})"
        )


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
