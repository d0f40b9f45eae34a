"""Which registry a configuration names: the embedded SQLite one, or PostgreSQL.

``registry`` unset: :class:`~jitp.registry.sqlite.SQLiteRegistry` at ``data_dir/registry.db``.
``registry: postgresql://...``: :class:`~jitp.registry.postgres.PostgresRegistry` with the
``postgres`` section's pool size, schema and group-commit window.
"""

from __future__ import annotations

from jitp.config import Config
from jitp.crypto.keys import MasterKeyProvider, provider_for
from jitp.registry import Registry


def master_keys(config: Config) -> MasterKeyProvider:
    """The master keys ``config`` names: ``$JITP_MASTER_KEY`` (keys.env) when set, else the key file.

    Raises :class:`~jitp.errors.MasterKeyMissing` when there are none: nothing starts unencrypted.
    """
    return provider_for(config.key_file, env=config.keys.env)


def make_registry(
    config: Config, *, batch_window: float | None = None, keys: MasterKeyProvider | None = None
) -> Registry:
    """The registry ``config`` names, not yet opened.

    ``batch_window`` (seconds) overrides the configured group-commit window (the CLI uses 0).
    ``keys``: the master keys, if not those of the configuration (:func:`master_keys`).
    """
    keys = keys if keys is not None else master_keys(config)
    if config.registry is not None:
        from jitp.registry.postgres import PostgresRegistry  # asyncpg is only imported when used

        pg = config.postgres
        return PostgresRegistry(
            config.registry,
            keys=keys,
            schema=pg.schema,
            keyring_schema=pg.effective_keyring_schema,
            pool_size=pg.pool_size,
            batch_window=pg.batch_window_ms / 1000 if batch_window is None else batch_window,
        )
    from jitp.registry.sqlite import SQLiteRegistry

    return SQLiteRegistry(
        config.registry_path,
        keys=keys,
        keyring=config.keyring_path,
        synchronous=config.sqlite.synchronous,
        max_batch=config.sqlite.max_batch,
        batch_window=config.sqlite.batch_window_ms / 1000 if batch_window is None else batch_window,
    )


async def open_registry(
    config: Config, *, batch_window: float | None = None, keys: MasterKeyProvider | None = None
) -> Registry:
    """:func:`make_registry`, opened (migrations applied). The caller closes it."""
    registry = make_registry(config, batch_window=batch_window, keys=keys)
    await registry.open()
    return registry
