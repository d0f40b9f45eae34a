"""The registry's tables, written once for every backend.

Each migration is a template: a backend fills in its column types (:class:`ColumnTypes`), and the
statements only its engine needs (:attr:`ColumnTypes.rename_keys`). Migrations are applied in
order and recorded in ``schema_migrations``; a registry whose schema is newer than this code is
refused. The keyring (wrapped data keys, see :mod:`jitp.crypto.envelope`) is not migrated: its few tables
are created if absent by each backend, where it keeps them (another file, another schema).
"""

from __future__ import annotations

from dataclasses import dataclass

from jitp.domain.audit import GENESIS_HASH


@dataclass(frozen=True)
class ColumnTypes:
    blob: str  # DER, sealed values
    time: str  # timestamps
    bigint: str
    flag: str  # a boolean column, with its default (true)
    serial: str  # the outbox's ever-growing primary key
    rename_keys: str = ""  # statements freeing the names of the primary keys of migration 3's tables


_TEMPLATES: tuple[str, ...] = (
    # 1: the foundation. Columns of `audit` hold the stored (pseudonymous) form: see jitp.crypto.privacy.
    # The audit head row exists from the start: appending locks it (one chain across nodes).
    """
    CREATE TABLE anchors (ca_id TEXT PRIMARY KEY, cert_der {blob} NOT NULL, role TEXT NOT NULL,
        subject TEXT NOT NULL, region TEXT, template TEXT, enabled {flag}, registered_at {time} NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value {bigint} NOT NULL);
    INSERT INTO meta (key, value) VALUES ('trust_version', 1);
    INSERT INTO meta (key, value) VALUES ('templates_version', 1);
    CREATE TABLE meta_text (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta_text (key, value) VALUES ('audit_head', '0:{genesis}');
    CREATE TABLE devices (device_id TEXT PRIMARY KEY, status TEXT NOT NULL, cert_fingerprint TEXT NOT NULL,
        ca_id TEXT NOT NULL, region TEXT NOT NULL, serial TEXT NOT NULL, subject TEXT NOT NULL,
        not_after {time} NOT NULL, provisioned_at {time} NOT NULL, last_seen {time},
        attributes TEXT NOT NULL DEFAULT '{{}}', template TEXT, template_version INTEGER,
        config TEXT NOT NULL DEFAULT '{{}}');
    CREATE INDEX devices_fingerprint ON devices (cert_fingerprint);
    CREATE TABLE cert_history (device_id TEXT NOT NULL, cert_fingerprint TEXT NOT NULL,
        superseded_at {time} NOT NULL, PRIMARY KEY (device_id, cert_fingerprint));
    CREATE TABLE device_keys (device_id TEXT PRIMARY KEY, ref_key {blob} NOT NULL);
    CREATE TABLE tombstones (ref TEXT PRIMARY KEY, erased_at {time} NOT NULL);
    CREATE TABLE crls (ca_id TEXT PRIMARY KEY, der {blob} NOT NULL, this_update {time} NOT NULL,
        next_update {time}, imported_at {time} NOT NULL);
    CREATE TABLE outbox (seq {serial}, event_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
        device_id TEXT NOT NULL, occurred_at {time} NOT NULL, payload {blob} NOT NULL, delivered_at {time});
    CREATE INDEX outbox_pending ON outbox (seq) WHERE delivered_at IS NULL;
    CREATE INDEX outbox_device ON outbox (device_id);
    CREATE UNIQUE INDEX outbox_one_provisioned ON outbox (device_id) WHERE type = 'provisioned';
    CREATE TABLE audit (seq {bigint} PRIMARY KEY, at {time} NOT NULL, action TEXT NOT NULL,
        actor TEXT NOT NULL, device_id TEXT, fingerprint TEXT, reason TEXT, peer TEXT, details TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
    """,
    # 2: event sinks (jitp.integration.nats_sink): each sink's progress through the outbox, by seq.
    """
    CREATE TABLE sink_cursors (name TEXT PRIMARY KEY, seq {bigint} NOT NULL);
    CREATE INDEX outbox_erased_unscrubbed ON outbox (seq) WHERE type = 'erased' AND device_id <> '';
    """,
    # 3: encryption at rest (jitp.crypto.envelope). Identifying fields move into `sealed`, the certificate
    # fingerprint is only kept as a blind index, and the audit keys move to the keyring. The old
    # tables are renamed; the registry moves their rows once it holds the keys (RegistryCore.
    # _seal_legacy), then drops them.
    """
    ALTER TABLE devices RENAME TO devices_v2;
    ALTER TABLE cert_history RENAME TO cert_history_v2;
    ALTER TABLE device_keys RENAME TO device_keys_v2;
    {rename_keys}
    DROP INDEX devices_fingerprint;
    CREATE TABLE devices (device_id TEXT PRIMARY KEY, status TEXT NOT NULL, ca_id TEXT NOT NULL,
        region TEXT NOT NULL, not_after {time} NOT NULL, provisioned_at {time} NOT NULL, last_seen {time},
        template TEXT, template_version INTEGER, fp_index TEXT NOT NULL, sealed {blob} NOT NULL);
    CREATE INDEX devices_fp_index ON devices (fp_index);
    CREATE TABLE cert_history (device_id TEXT NOT NULL, fp_index TEXT NOT NULL, sealed_fp {blob} NOT NULL,
        superseded_at {time} NOT NULL, PRIMARY KEY (device_id, fp_index));
    """,
    # 4: the operational issuing CA (jitp.crypto.issuer) and the certificates it issued. The CA's key is
    # wrapped under the master key like the registry keys (keyring.registry_keys, name
    # "issuer:<ca_id>"), so key rotation re-wraps it too. A certificate's DER and fingerprint are
    # sealed under its device's data key (erasure shreds them); its serial stays in clear for the CRL,
    # and revocations outlive the rows (an erased device's certificates stay listed).
    """
    CREATE TABLE issuers (ca_id TEXT PRIMARY KEY, cert_der {blob} NOT NULL, active {flag},
        created_at {time} NOT NULL);
    CREATE TABLE op_certs (certificate_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, request_id TEXT NOT NULL,
        issuer_id TEXT NOT NULL, fp_index TEXT NOT NULL, serial TEXT NOT NULL, state TEXT NOT NULL,
        issued_at {time} NOT NULL, not_after {time} NOT NULL, commit_by {time} NOT NULL,
        changed_at {time}, sealed {blob} NOT NULL);
    CREATE UNIQUE INDEX op_certs_request ON op_certs (device_id, request_id);
    CREATE INDEX op_certs_fp_index ON op_certs (fp_index);
    CREATE INDEX op_certs_device ON op_certs (device_id);
    CREATE TABLE issuer_revocations (issuer_id TEXT NOT NULL, serial TEXT NOT NULL,
        revoked_at {time} NOT NULL, PRIMARY KEY (issuer_id, serial));
    """,
)


def migrations(types: ColumnTypes) -> tuple[str, ...]:
    """The migrations in a backend's column types (``MIGRATIONS[n - 1]`` makes version ``n``)."""
    values = {name: getattr(types, name) for name in ColumnTypes.__dataclass_fields__}
    values["genesis"] = GENESIS_HASH
    return tuple(template.format(**values) for template in _TEMPLATES)
