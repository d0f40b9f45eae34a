"""Configuration: YAML loaded strictly into frozen dataclasses.

Unknown keys, wrong types and out-of-range values are :class:`~jitp.errors.ConfigError` with
the file, line and key. Nothing is read from a mutable dict after loading. Relative paths are
taken relative to the current working directory.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from jitp import yamlfiles
from jitp.crypto.issuer import parse_duration
from jitp.crypto.keys import default_keys_dir
from jitp.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "jitp.yaml"


@dataclass(frozen=True)
class ListenerConfig:
    bind: str = "127.0.0.1:8883"
    server_cert: Path = Path("var/pki/broker.pem")
    server_key: Path = Path("var/pki/broker.key")
    handshake_timeout: float = 10.0  # seconds to complete the TLS handshake
    connect_timeout: float = 10.0  # seconds from handshake to a complete CONNECT packet
    max_connections: int = 20000  # beyond this, CONNACK 3 (server unavailable)
    backlog: int = 4096  # listen(2) backlog; amqtt's 100 overflows in join storms
    tls_min_version: str = "1.2"
    session_tickets: int = 0  # TLS 1.3 tickets per handshake; 0 saves ~0.8 ms CPU per connect
    reuse_port: bool = False  # SO_REUSEPORT: several `jitp serve` processes share one port (one per core)
    tls_read_buffer: int = 17 * 1024  # bytes decrypted per read (>= one TLS record), not held

    def __post_init__(self) -> None:
        _positive(self, "handshake_timeout", "connect_timeout", "max_connections", "backlog")
        if self.tls_min_version not in ("1.2", "1.3"):
            raise ConfigError("must be '1.2' or '1.3'", key="listener.tls_min_version")
        if self.session_tickets < 0:
            raise ConfigError("must be >= 0", key="listener.session_tickets")
        if self.tls_read_buffer < 17 * 1024:
            raise ConfigError("must be >= 17408 (one TLS record)", key="listener.tls_read_buffer")
        host_port(self.bind)


@dataclass(frozen=True)
class LimitsConfig:
    max_packet_size: int = 256 * 1024  # bytes; larger packets close the connection
    max_inflight: int = 32  # outgoing QoS 1/2 messages awaiting ack, per client
    max_keepalive: int = 3600  # seconds; a CONNECT asking for more (or 0 = none) gets this
    keepalive_grace: float = 1.5  # disconnect after this many keep-alive periods of silence
    max_subscriptions: int = 100  # topic filters per client; more get SUBACK 0x80
    max_queued_messages: int = 1000  # outgoing messages per session (queued + unacknowledged)
    max_queued_bytes: int = 16 * 1024 * 1024  # outgoing bytes per session (topic + payload)
    # The same bounds for backend principals (an ingest service takes every device's telemetry:
    # a burst of a whole fleet must fit while it catches up).
    service_max_queued_messages: int = 100_000
    service_max_queued_bytes: int = 256 * 1024 * 1024
    max_retained_per_client: int = 100  # retained messages one client may own
    max_retained_bytes_per_client: int = 1024 * 1024  # payload bytes one client may retain
    max_retained_bytes: int = 256 * 1024 * 1024  # all retained payloads in the broker
    shutdown_drain_timeout: float = 5.0  # s a graceful stop waits for queued QoS 1 deliveries
    # s an offline persistent session is kept (MQTT 5 Session Expiry Interval is capped here, and a
    # 3.1.1 persistent session, which has no expiry of its own, gets this): memory is finite.
    max_session_expiry: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        _positive(
            self,
            "max_session_expiry",
            "max_packet_size",
            "max_inflight",
            "max_keepalive",
            "max_subscriptions",
            "max_queued_messages",
            "max_queued_bytes",
            "service_max_queued_messages",
            "service_max_queued_bytes",
            "max_retained_per_client",
            "max_retained_bytes_per_client",
            "max_retained_bytes",
        )
        if self.max_inflight >= 65535:
            raise ConfigError("must be < 65535 (MQTT packet ids)", key="limits.max_inflight")
        if not self.shutdown_drain_timeout >= 0:
            raise ConfigError("must be >= 0", key="limits.shutdown_drain_timeout")
        if not self.keepalive_grace >= 1.0:
            raise ConfigError("must be >= 1.0", key="limits.keepalive_grace")


@dataclass(frozen=True)
class TrustConfig:
    reload_interval: float = 2.0  # seconds between checks for CA changes (a change applies within this)
    # A CRL past its nextUpdate: "keep" enforcing it and report loudly (default: a late CRL must not
    # lock out a whole fleet, Mosquitto issue #1826), or "refuse" every certificate it covers.
    stale_crl: str = "keep"

    def __post_init__(self) -> None:
        _positive(self, "reload_interval")
        if self.stale_crl not in ("keep", "refuse"):
            raise ConfigError("must be 'keep' or 'refuse'", key="trust.stale_crl")


@dataclass(frozen=True)
class SQLiteConfig:
    synchronous: str = "full"  # full: a CONNACK 0 is never sent for a record that a power loss could drop
    batch_window_ms: float = 2.0  # group commit: wait this long to gather concurrent writes
    max_batch: int = 512  # group commit: at most this many writes per transaction (1: no group commit)

    def __post_init__(self) -> None:
        if self.synchronous not in ("full", "normal"):
            raise ConfigError("must be 'full' or 'normal'", key="sqlite.synchronous")
        if not self.batch_window_ms >= 0:
            raise ConfigError("must be >= 0", key="sqlite.batch_window_ms")
        if self.max_batch < 1:
            raise ConfigError("must be >= 1", key="sqlite.max_batch")


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
PRINCIPAL_ROLES = ("service", "auditor", "operator", "admin")
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class PostgresConfig:
    """Settings of the PostgreSQL registry (used when ``registry`` is a postgresql:// DSN)."""

    pool_size: int = 10  # connections per broker node (or CLI run)
    schema: str | None = None  # tables live in this schema (created if absent); None: the DSN's search_path
    # The keyring (wrapped data keys) lives in its own schema, so that backups of the registry schema
    # (pg_dump -n) carry no key material and erasure reaches them. None: "<schema>_keyring"
    # ("jitp_keyring" without a schema).
    keyring_schema: str | None = None
    batch_window_ms: float = 2.0  # group commit: wait this long to gather concurrent writes

    def __post_init__(self) -> None:
        if not 1 <= self.pool_size <= 1000:
            raise ConfigError("must be between 1 and 1000", key="postgres.pool_size")
        if self.schema is not None and not SCHEMA_NAME.fullmatch(self.schema):
            raise ConfigError(
                "must be a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 characters)",
                key="postgres.schema",
            )
        if not self.batch_window_ms >= 0:
            raise ConfigError("must be >= 0", key="postgres.batch_window_ms")
        if self.keyring_schema is not None and not SCHEMA_NAME.fullmatch(self.keyring_schema):
            raise ConfigError(
                "must be a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 characters)",
                key="postgres.keyring_schema",
            )
        if self.keyring_schema is not None and self.keyring_schema == self.schema:
            raise ConfigError("must be another schema than postgres.schema", key="postgres.keyring_schema")

    @property
    def effective_keyring_schema(self) -> str:
        return self.keyring_schema if self.keyring_schema is not None else default_keyring_schema(self.schema)


def default_keyring_schema(schema: str | None) -> str:
    """The keyring schema of registry schema ``schema``: ``<schema>_keyring`` (or ``jitp_keyring``)."""
    return f"{schema[:55]}_keyring" if schema else "jitp_keyring"


@dataclass(frozen=True)
class KeysConfig:
    """Encryption at rest (jitp.crypto.keys, jitp.crypto.envelope): where the master key and the keyring live."""

    # The master key file (made by `jitp keys init`, mode 0600). None: <data_dir>-keys/master.key,
    # beside the data directory, not inside it, so a copy of the data directory holds no key.
    file: Path | None = None
    # When this environment variable is set, its keys are used instead of the file.
    env: str = "JITP_MASTER_KEY"
    # The SQLite registry's keyring (wrapped data keys). None: <data_dir>-keys/keyring.db.
    keyring: Path | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.env):
            raise ConfigError("must be an environment variable name", key="keys.env")


@dataclass(frozen=True)
class AuditConfig:
    # Identical refusals (same reason, same certificate or peer host) within this many seconds are
    # written once, then as one counted entry per window: a refusal storm cannot bloat the log.
    coalesce_window: float = 60.0

    def __post_init__(self) -> None:
        if not self.coalesce_window >= 0 or self.coalesce_window == float("inf"):
            raise ConfigError("must be a number >= 0 (0: no coalescing)", key="audit.coalesce_window")


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission control of first joins (the registry write path); see jitp.app.admission."""

    workers: int = 256  # provisioning requests in flight to the registry at once
    queue_size: int = 10000  # first joins waiting for a worker; beyond: CONNACK 3 (0: no waiting)
    queue_timeout: float = 5.0  # seconds a first join waits for a worker before CONNACK 3
    registry_timeout: float = 10.0  # seconds a join waits for the registry's answer before CONNACK 3
    per_ca_rate: float = 0.0  # first joins per second per CA (token bucket); 0: unlimited
    per_ca_burst: int = 0  # bucket size per CA; 0: one second's worth (per_ca_rate, at least 1)
    per_region_rate: float = 0.0  # first joins per second per region; 0: unlimited
    per_region_burst: int = 0  # bucket size per region; 0: one second's worth
    cache_size: int = 100000  # admitted records kept for registry-free reconnects; 0: no cache
    cache_ttl: float = 60.0  # seconds a cached record is trusted (bounds staleness across processes)

    def __post_init__(self) -> None:
        _positive(self, "workers", "queue_timeout", "registry_timeout", "cache_ttl")
        for name in ("queue_size", "per_ca_burst", "per_region_burst", "cache_size"):
            if getattr(self, name) < 0:
                raise ConfigError("must be >= 0", key=f"admission.{name}")
        for name in ("per_ca_rate", "per_region_rate"):
            if not getattr(self, name) >= 0:
                raise ConfigError("must be a number >= 0 (0: unlimited)", key=f"admission.{name}")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics (jitp.observability) on an HTTP listener of their own; off by default."""

    bind: str | None = None  # HOST:PORT, e.g. 127.0.0.1:9883; none: no metrics listener
    refresh_interval: float = 10.0  # s between refreshes of the gauges read from the registry
    console: bool = False  # serve the web console (/console/, token login) on this listener too

    def __post_init__(self) -> None:
        _positive(self, "refresh_interval")
        if self.bind is not None:
            try:
                host_port(self.bind)
            except ConfigError:
                raise ConfigError("must be HOST:PORT", key="metrics.bind") from None


@dataclass(frozen=True)
class LoggingConfig:
    format: str = (
        "text"  # text | json (one JSON object per line: ts, level, event, reason, ca, region, device)
    )
    pseudonymous: bool = False  # JSON lines name a device by a keyed reference instead of its id

    def __post_init__(self) -> None:
        if self.format not in ("text", "json"):
            raise ConfigError("must be 'text' or 'json'", key="logging.format")


@dataclass(frozen=True)
class AlertsConfig:
    """The real-time anomaly detectors (jitp.observability.detectors) and what an alert does."""

    enabled: bool = True
    coalesce_window: float = 300.0  # s; repeats of one alert (kind + subject) count into it
    expiry_window: float = 86400.0  # s; the same for expiry alerts (re-raised once a day)
    clone_takeovers: int = 3  # takeovers of one device (same certificate) within clone_window: cloned
    clone_window: float = 60.0
    clone_different_host: bool = True  # one takeover with the same certificate from another host: cloned
    clone_action: str = "none"  # none | quarantine (the device, through the lifecycle, audited)
    burst_refusals: int = 20  # refused joins within burst_window, per CA and per source network
    burst_window: float = 60.0
    burst_v4_prefix: int = 24  # source network size
    burst_v6_prefix: int = 64
    spike_bucket: float = 60.0  # s; first joins per CA are counted per bucket ...
    spike_factor: float = 5.0  # ... and a bucket above factor x the CA's average is a spike
    spike_min_joins: int = 100  # ... with at least this many first joins
    spike_action: str = "none"  # none | pause (the CA's first joins get CONNACK 3 until `jitp alerts ack`)
    expiry_ca_days: float = 30.0  # a CA certificate expiring within this
    expiry_crl_hours: float = 24.0  # a CRL's nextUpdate within this (or past)
    expiry_device_days: float = 30.0  # device certificates expiring within this (a count per CA)

    def __post_init__(self) -> None:
        _positive(
            self,
            "coalesce_window",
            "expiry_window",
            "clone_takeovers",
            "clone_window",
            "burst_refusals",
            "burst_window",
            "spike_bucket",
            "spike_factor",
            "spike_min_joins",
        )
        if self.clone_action not in ("none", "quarantine"):
            raise ConfigError("must be 'none' or 'quarantine'", key="alerts.clone_action")
        if self.spike_action not in ("none", "pause"):
            raise ConfigError("must be 'none' or 'pause'", key="alerts.spike_action")
        if not 8 <= self.burst_v4_prefix <= 32:
            raise ConfigError("must be 8..32", key="alerts.burst_v4_prefix")
        if not 16 <= self.burst_v6_prefix <= 128:
            raise ConfigError("must be 16..128", key="alerts.burst_v6_prefix")
        for name in ("expiry_ca_days", "expiry_crl_hours", "expiry_device_days"):
            if not getattr(self, name) >= 0:
                raise ConfigError("must be >= 0", key=f"alerts.{name}")


_NATS_STREAM = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NATS_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
NATS_SCHEMES = ("nats://", "tls://", "ws://", "wss://")


@dataclass(frozen=True)
class NatsConfig:
    """The optional NATS JetStream event sink (jitp.integration.nats_sink): every outbox event, once."""

    enabled: bool = False
    servers: str = "nats://127.0.0.1:4222"  # comma-separated server URLs of one cluster
    stream: str = "JITP_EVENTS"  # the JetStream stream that stores the events
    subject_prefix: str = "jitp.events"  # subjects: <prefix>.<type>.<region>.<device_id>
    create_stream: bool = True  # create the stream (subjects <prefix>.>) if it does not exist
    duplicate_window: float = 120.0  # s; the stream's de-duplication window (Nats-Msg-Id = event_id)
    poll_interval: float = 1.0  # s between outbox polls (fresh events are handed over at once)

    def __post_init__(self) -> None:
        _positive(self, "duplicate_window", "poll_interval")
        for name in ("duplicate_window", "poll_interval"):
            if getattr(self, name) == float("inf"):
                raise ConfigError("must be finite", key=f"nats.{name}")
        urls = self.server_list
        if not urls or any(not u.startswith(NATS_SCHEMES) or u.endswith("://") for u in urls):
            raise ConfigError(
                "must be comma-separated nats://, tls://, ws:// or wss:// URLs", key="nats.servers"
            )
        if not _NATS_STREAM.fullmatch(self.stream):
            raise ConfigError("must be 1-64 characters of A-Z a-z 0-9 _ -", key="nats.stream")
        if not _NATS_SUBJECT.fullmatch(self.subject_prefix):
            raise ConfigError(
                "must be dot-separated tokens of A-Z a-z 0-9 _ - (no wildcards)", key="nats.subject_prefix"
            )

    @property
    def server_list(self) -> list[str]:
        return [u.strip() for u in self.servers.split(",") if u.strip()]


@dataclass(frozen=True)
class IssuerConfig:
    """Operational certificates (``$jitp/certificates/<id>/create-from-csr``, jitp.app.certificates)."""

    validity: str = "30d"  # of an operational certificate (s, m, h, d, w); capped at the CA's own expiry
    commit_window: float = 3600.0  # s a pending certificate may wait for the device to connect with it
    rate: float = 0.05  # CSR requests per second per device (token bucket); 0: unlimited
    burst: int = 5  # requests a device may send at once before `rate_limited`
    max_request_bytes: int = 16 * 1024  # a larger request is answered `payload_too_large`
    crl_validity: str = "7d"  # nextUpdate of `jitp issuer crl`

    def __post_init__(self) -> None:
        for name in ("validity", "crl_validity"):
            try:
                parse_duration(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(str(exc), key=f"issuer.{name}") from None
        if not self.commit_window > 0 or self.commit_window == float("inf"):
            raise ConfigError("must be a number of seconds > 0", key="issuer.commit_window")
        if not self.rate >= 0 or self.rate == float("inf"):
            raise ConfigError("must be a number >= 0 (0: unlimited)", key="issuer.rate")
        if self.burst < 1:
            raise ConfigError("must be at least 1", key="issuer.burst")
        if not 1024 <= self.max_request_bytes <= 1024 * 1024:
            raise ConfigError("must be between 1024 and 1048576", key="issuer.max_request_bytes")


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("var/data")
    templates_dir: Path = Path("config/templates")  # enrollment templates, <name>.yaml
    default_region: str = "default"
    # Set on every node when several broker nodes share one registry: each node then also delivers
    # the events other nodes committed to its own MQTT subscribers (a per-node outbox cursor).
    node_id: str | None = None
    # `jitp serve` runs this many worker processes on one port (SO_REUSEPORT), each a node with its own
    # id (<node_id or hostname>-w<i>), relaying messages to each other. None: one per core. 1: one process.
    workers: int | None = None
    log_level: str = "info"
    # None: the embedded SQLite registry at data_dir/registry.db. "postgresql://...": PostgreSQL,
    # shared by several broker nodes (see jitp.registry.postgres).
    registry: str | None = None
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    sqlite: SQLiteConfig = field(default_factory=SQLiteConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    issuer: IssuerConfig = field(default_factory=IssuerConfig)
    # Explicit roles for single client certificates, by SHA-256 fingerprint (hex, colons allowed):
    # service, auditor, operator or admin. It overrides the role of the CA the certificate chains to.
    roles: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if len(self.role_map) != len(self.roles):
            raise ConfigError("a certificate is listed twice (with and without colons?)", key="roles")
        for fingerprint, role in self.roles.items():
            if not _FINGERPRINT.fullmatch(fingerprint.replace(":", "").lower()):
                raise ConfigError(
                    f"{fingerprint[:80]!r} is not a certificate's SHA-256 fingerprint (64 hex digits)",
                    key="roles",
                )
            if role not in PRINCIPAL_ROLES:
                raise ConfigError(
                    f"role {role[:40]!r} for {fingerprint[:16]}...: must be one of {', '.join(PRINCIPAL_ROLES)}",
                    key="roles",
                )
        if self.workers is not None and not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"must be between 1 and {MAX_WORKERS}", key="workers")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("must be debug, info, warning or error", key="log_level")
        if self.registry is not None and not self.registry.startswith(POSTGRES_SCHEMES):
            # The value is not echoed: a DSN may carry a password.
            raise ConfigError(
                "must be a postgresql://user@host:port/database DSN, or no value for the embedded SQLite registry",
                key="registry",
            )

    @property
    def role_map(self) -> dict[str, str]:
        """``roles`` with fingerprints normalised (lowercase hex, no colons)."""
        return {fp.replace(":", "").lower(): role for fp, role in self.roles.items()}

    @property
    def effective_workers(self) -> int:
        """``workers``, or the number of cores when unset."""
        return self.workers if self.workers is not None else max(1, os.cpu_count() or 1)

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.db"

    @property
    def keys_dir(self) -> Path:
        return default_keys_dir(self.data_dir)

    @property
    def key_file(self) -> Path:
        return self.keys.file if self.keys.file is not None else self.keys_dir / "master.key"

    @property
    def keyring_path(self) -> Path:
        return self.keys.keyring if self.keys.keyring is not None else self.keys_dir / "keyring.db"


MAX_WORKERS = 256  # worker processes of one `jitp serve`
MAX_CONFIG_BYTES = 1024 * 1024  # the config file is read whole; larger is refused
MAX_CONFIG_DEPTH = 16  # nesting levels (the deepest setting is 3)


def host_port(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    # isascii: str.isdigit() accepts e.g. "¹", which int() then rejects with a ValueError.
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT, got {bind!r}", key="listener.bind")
    return host.strip("[]") or "127.0.0.1", int(port)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:  # also refuses NaN
            raise ConfigError(
                "must be > 0", key=f"{type(obj).__name__.removesuffix('Config').lower()}.{name}"
            )


T = TypeVar("T")


_NULL_TAG = "tag:yaml.org,2002:null"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _convert(tp: Any, node: yaml.Node, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if _is_null(node):
            return None
        return _convert(args[0], node, where, key)
    at = f"{where}:{node.start_mark.line + 1}"
    if origin in (dict, collections.abc.Mapping):
        if _is_null(node):
            return MappingProxyType({})
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError("expected a mapping", where=at, key=key)
        key_type, value_type = typing.get_args(tp)
        out: dict[Any, Any] = {}
        for k_node, v_node in node.value:
            name = _convert(key_type, k_node, where, key)
            if name in out:
                raise ConfigError(
                    f"duplicate key {str(name)[:80]!r}",
                    where=f"{where}:{k_node.start_mark.line + 1}",
                    key=key,
                )
            out[name] = _convert(value_type, v_node, where, f"{key}.{str(name)[:80]}")
        return MappingProxyType(out)
    if dataclasses.is_dataclass(tp):
        if _is_null(node):  # an empty section ("listener:" with every key commented out): defaults
            return typing.cast(Any, tp)()
        return _build(tp, node, where, prefix=f"{key}.")  # type: ignore[arg-type]
    if not isinstance(node, yaml.ScalarNode):
        kind = "mapping" if isinstance(node, yaml.MappingNode) else "list"
        raise ConfigError(f"expected a single value, not a {kind}", where=at, key=key)
    value = str(node.value)
    if node.tag == _NULL_TAG:
        raise ConfigError(f"expected {getattr(tp, '__name__', tp)}, got no value", where=at, key=key)
    try:
        resolved = yamlfiles.construct_scalar(node)
    except ValueError as exc:  # an unknown tag ("!foo 3"), "!!int abc", a bad !!binary, ...
        raise ConfigError(f"invalid value {value[:80]!r}: {exc}", where=at, key=key) from None
    try:
        if tp is bool:
            if not isinstance(resolved, bool):
                raise ValueError
            return resolved
        if tp is int:
            if isinstance(resolved, bool) or not isinstance(resolved, int):
                raise ValueError
            return resolved
        if tp is float:
            if isinstance(resolved, bool) or not isinstance(resolved, int | float):
                raise ValueError
            if not math.isfinite(resolved):
                raise ConfigError(f"expected a finite number, got {value!r}", where=at, key=key)
            return float(resolved)
        if tp is str:
            return value
        if tp is Path:
            return Path(value)
    except ValueError:
        raise ConfigError(f"expected {tp.__name__}, got {value!r}", where=at, key=key) from None
    raise ConfigError(f"unsupported type {tp}", where=at, key=key)  # pragma: no cover


def _build(cls: type[T], node: yaml.Node, where: str, *, prefix: str = "") -> T:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(
            "expected a mapping", where=f"{where}:{node.start_mark.line + 1}", key=prefix.rstrip(".") or None
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(
                "a key must be a plain name",
                where=f"{where}:{key_node.start_mark.line + 1}",
                key=prefix.rstrip(".") or None,
            )
        name = str(key_node.value)
        at = f"{where}:{key_node.start_mark.line + 1}"
        if name not in known:
            raise ConfigError(f"unknown key (known: {', '.join(sorted(known))})", where=at, key=prefix + name)
        if name in values:
            raise ConfigError("duplicate key", where=at, key=prefix + name)
        values[name] = _convert(hints[name], value_node, where, prefix + name)
        lines[prefix + name] = key_node.start_mark.line + 1
    try:
        return cls(**values)
    except ConfigError as exc:
        if exc.where is None:
            # A range check in __post_init__: point at the offending key's line, or at the mapping.
            line = lines.get(exc.key or "", node.start_mark.line + 1)
            raise ConfigError(exc.problem, where=f"{where}:{line}", key=exc.key) from None
        raise


def load_config(path: Path | None = None, *, text: str | None = None) -> Config:
    """Load a config file (``path``) or YAML ``text``. An empty document gives the defaults."""
    where = str(path) if path is not None else "<config>"
    if text is None:
        if path is None:
            return Config()
        text = yamlfiles.read_text(path, max_bytes=MAX_CONFIG_BYTES, what="config")
    node = yamlfiles.compose(text, where=where, max_depth=MAX_CONFIG_DEPTH, what="the config file")
    if node is None or _is_null(node):  # empty, comments only, "---" or "~"
        return Config()
    return _build(Config, node, where)


def replace(config: Config, **changes: Any) -> Config:
    """A copy with some top-level or ``section__field`` values changed (for CLI overrides)."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        if value is None:
            continue
        if "__" in key:
            section, name = key.split("__", 1)
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, fields_ in sections.items():
        top[section] = dataclasses.replace(getattr(config, section), **fields_)
    return dataclasses.replace(config, **top)
