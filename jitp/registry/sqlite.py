"""The embedded registry: SQLite (WAL) through aiosqlite, below :class:`~jitp.registry.core.RegistryCore`.

One connection serves the process. Every write is a transaction that takes SQLite's write lock
first (``BEGIN IMMEDIATE``), so several processes sharing the file (the broker and the CLI) stay
race-free without row locks: the core's ``FOR UPDATE``/``FOR SHARE`` are dropped, and an insert
that the core reads as absent cannot lose to another process. Lists bind as one JSON array
(``json_each``), timestamps as UTC ISO-8601 text.

The keyring is a second SQLite file (``<data_dir>-keys/keyring.db`` by default), attached as
schema ``keyring`` and kept apart so that a backup of the registry holds no key material and
erasing a device's wrapped key (crypto-shredding) reaches every copy of it. SQLite commits attached
WAL databases one file after the other, so this keyring commits apart from the registry (see the
core's ordering of keys and rows). Erased data is overwritten (``secure_delete``) and the WALs are
truncated after an erasure (:meth:`SQLiteStorage.checkpoint`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from jitp import errors
from jitp.crypto.keys import MasterKeyProvider, default_keys_dir, provider_for
from jitp.registry.core import RegistryCore, Row
from jitp.registry.schema import ColumnTypes, migrations

log = logging.getLogger(__name__)

T = TypeVar("T")

TYPES = ColumnTypes(
    "BLOB", "TEXT", "INTEGER", "INTEGER NOT NULL DEFAULT 1", "INTEGER PRIMARY KEY AUTOINCREMENT"
)
MIGRATIONS = migrations(TYPES)

# The keyring (the attached file). `erasing` marks a data key whose device is being erased: it is
# deleted once the device's rows are, even if a crash came in between.
KEYRING_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS keyring.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS keyring.data_keys (device_id TEXT PRIMARY KEY, kid TEXT NOT NULL, "
    "wrapped BLOB NOT NULL, erasing INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS keyring.data_keys_kid ON data_keys (kid)",
    "CREATE TABLE IF NOT EXISTS keyring.registry_keys (name TEXT PRIMARY KEY, kid TEXT NOT NULL, "
    "wrapped BLOB NOT NULL)",
)

_ANY = re.compile(r"= ANY\(\?\)")
_ROW_LOCK = re.compile(r"\s+FOR (UPDATE|SHARE)( OF \w+)?( SKIP LOCKED)?\s*$")


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


_BIND: dict[type, Callable[[Any], Any]] = {datetime: _iso, list: json.dumps}


def _bind(values: Iterable[Any]) -> list[Any]:
    """Values as SQLite stores them: timestamps as UTC ISO-8601 text, lists as JSON (for json_each)."""
    return [_BIND[type(v)](v) if type(v) in _BIND else v for v in values]


class _Tx:
    """The core's SQL on the connection: ``= ANY(?)`` through ``json_each``, no row locks."""

    def __init__(self, db: aiosqlite.Connection, sql: dict[str, str]) -> None:
        self._db = db
        self._sql = sql

    def _translate(self, sql: str) -> str:
        found = self._sql.get(sql)
        if found is None:
            found = self._sql[sql] = _ROW_LOCK.sub("", _ANY.sub("IN (SELECT value FROM json_each(?))", sql))
        return found

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._db.execute(self._translate(sql), _bind(args)) as cur:
            return list(await cur.fetchall())

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._db.execute(self._translate(sql), _bind(args)) as cur:
            return cur.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        bound = [_bind(row) for row in rows]
        if bound:
            await self._db.executemany(self._translate(sql), bound)

    async def has_table(self, name: str) -> bool:
        return bool(await self.fetch("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", name))


class SQLiteStorage:
    """The :class:`~jitp.registry.core.Storage` of a registry file and its keyring file."""

    keyring_apart = True
    types = TYPES
    setup = KEYRING_SCHEMA
    failures: tuple[type[Exception], ...] = (sqlite3.IntegrityError, sqlite3.DataError)

    def __init__(self, path: Path, keyring: Path, *, synchronous: str = "FULL") -> None:
        self.path, self.keyring_path = path, keyring
        self.where, self.keyring = str(path), str(keyring)
        self._synchronous = synchronous.upper()
        if self._synchronous not in ("FULL", "NORMAL"):
            raise errors.ConfigError("must be FULL or NORMAL", key="sqlite_synchronous")
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._sql: dict[str, str] = {}

    def _tx(self) -> _Tx:
        if self._db is None:
            raise errors.RegistryUnavailable("the registry is not open")
        return _Tx(self._db, self._sql)

    async def open(self) -> None:
        for path in (self.path, self.keyring_path):
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            for pragma in (
                # First: the processes of `jitp serve --workers N` (and the CLI) open the file at the
                # same moment, and switching a new file to WAL takes a lock they must wait for.
                "busy_timeout=10000",
                "journal_mode=WAL",
                f"synchronous={self._synchronous}",
                "secure_delete=ON",  # erased data is overwritten, not just unlinked
            ):
                await db.execute(f"PRAGMA {pragma}")
            await db.execute("ATTACH DATABASE ? AS keyring", (self.keyring,))
            for pragma in (
                "journal_mode=WAL",
                "synchronous=FULL",
                "secure_delete=ON",
            ):  # a lost data key is lost data
                await db.execute(f"PRAGMA keyring.{pragma}")
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            async with self._lock:
                await self._db.close()
            self._db = None

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._lock:
            return await self._tx().fetch(sql, *args)

    async def write(self, body: Callable[[_Tx], Awaitable[T]], *, exclusive: bool = False) -> T:
        """``BEGIN IMMEDIATE`` is exclusive among writers already, whatever ``exclusive`` says."""
        async with self._lock:
            tx = self._tx()
            await tx.execute("BEGIN IMMEDIATE")
            try:
                result = await body(tx)
            except BaseException:
                await tx.execute("ROLLBACK")
                raise
            await tx.execute("COMMIT")
            return result

    async def checkpoint(self) -> bool:
        """Fold the WALs (registry and keyring) into their database files and truncate them, so
        erased pages and destroyed keys leave the WAL too."""
        complete = True
        for schema in ("main", "keyring"):
            async with self._lock:
                rows = await self._tx().fetch(f"PRAGMA {schema}.wal_checkpoint(TRUNCATE)")
            complete = complete and bool(rows) and int(rows[0][0]) == 0
        if not complete:
            log.warning(
                "WAL checkpoint incomplete (a reader is busy); erased pages leave the WAL on the next one"
            )
        return complete


class SQLiteRegistry(RegistryCore):
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
        storage = SQLiteStorage(self.path, self.keyring_path, synchronous=synchronous)
        keys = keys if keys is not None else provider_for(keys_dir / "master.key")
        super().__init__(storage, keys, max_batch=max_batch, batch_window=batch_window)
