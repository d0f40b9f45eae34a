"""load_config: strict YAML into frozen dataclasses; every error names the file, line and key."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from jitp import config as config_mod
from jitp.config import (
    DEFAULT_CONFIG,
    Config,
    LimitsConfig,
    ListenerConfig,
    SQLiteConfig,
    TrustConfig,
    host_port,
    load_config,
    replace,
)
from jitp.errors import ConfigError


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(text=text)
    exc = info.value
    assert exc.reason == "config_error"
    assert str(exc) == exc.message
    return exc


def assert_error(text: str, *, line: int, key: str | None, contains: str = "") -> ConfigError:
    exc = error(text)
    assert exc.where == f"<config>:{line}", str(exc)
    assert exc.key == key, str(exc)
    assert str(exc).startswith(f"<config>:{line}: "), str(exc)
    if key is not None:
        assert f"{key}: " in str(exc)
    assert contains in str(exc)
    return exc


# -- defaults and the shipped file ------------------------------------------------------------


def test_defaults() -> None:
    config = load_config()
    assert config == Config()
    assert config.listener.bind == "127.0.0.1:8883"
    assert config.listener.max_connections == 20000
    assert config.limits.keepalive_grace == 1.5
    assert config.trust.reload_interval == 2.0
    assert config.sqlite.synchronous == "full"
    assert config.registry_path == Path("var/data/registry.db")


@pytest.mark.parametrize("text", ["", "\n", "# nothing but comments\n", "---\n", "~\n"])
def test_empty_documents_give_defaults(text: str) -> None:
    assert load_config(text=text) == Config()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_shipped_config_loads_and_equals_the_defaults() -> None:
    assert DEFAULT_CONFIG.is_file()
    loaded = load_config(DEFAULT_CONFIG)
    assert loaded == Config()
    # Every setting is spelled out in the shipped file (it documents them all).
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert set(document) == {f.name for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(Config):
        default = getattr(Config(), f.name)
        if dataclasses.is_dataclass(default):
            assert set(document[f.name]) == {g.name for g in dataclasses.fields(default)}, f.name


def test_types_are_converted() -> None:
    config = load_config(
        text="data_dir: /srv/jitp\nlistener:\n  handshake_timeout: 5\n  backlog: 16\n"
        "limits:\n  keepalive_grace: 2\nsqlite:\n  batch_window_ms: 0\n"
    )
    assert config.data_dir == Path("/srv/jitp")
    assert config.listener.handshake_timeout == 5.0
    assert isinstance(config.listener.handshake_timeout, float)
    assert config.listener.backlog == 16
    assert config.limits.keepalive_grace == 2.0
    assert config.sqlite.batch_window_ms == 0.0


def test_registry_selection() -> None:
    assert Config().registry is None  # the embedded SQLite registry
    config = load_config(
        text="registry: postgresql://jitp@db.example:5432/jitp\npostgres:\n  pool_size: 4\n  schema: jitp\n"
    )
    assert config.registry == "postgresql://jitp@db.example:5432/jitp"
    assert (config.postgres.pool_size, config.postgres.schema) == (4, "jitp")
    assert load_config(text="registry:\npostgres:\n  schema:\n") == Config()
    with pytest.raises(ConfigError) as info:
        replace(Config(), registry="mysql://u:secret@h/db")
    assert info.value.key == "registry" and "secret" not in str(info.value)  # a DSN may hold a password


def test_empty_section_gives_its_defaults() -> None:
    assert load_config(text="listener:\n  # bind: 0.0.0.0:8883\nlimits:\n") == Config()


# -- unknown and duplicate keys ---------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    exc = assert_error("log_level: info\nbogus: 1\n", line=2, key="bogus", contains="unknown key")
    assert "listener" in str(exc)  # the known keys are listed


def test_unknown_nested_key() -> None:
    text = "listener:\n  bind: 127.0.0.1:1883\n  bnid: 0.0.0.0:1883\n"
    exc = assert_error(text, line=3, key="listener.bnid", contains="unknown key")
    assert "bind" in str(exc)


def test_unknown_key_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jitp.yaml"
    path.write_text("trust:\n  reload_interval: 1\n  reload_intervall: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.where == f"{path}:3"
    assert info.value.key == "trust.reload_intervall"
    assert str(info.value).startswith(f"{path}:3: trust.reload_intervall: unknown key")


def test_duplicate_keys() -> None:
    assert_error("log_level: info\nlog_level: debug\n", line=2, key="log_level", contains="duplicate")
    assert_error(
        "limits:\n  max_inflight: 1\n  max_inflight: 2\n",
        line=3,
        key="limits.max_inflight",
        contains="duplicate",
    )
    assert_error("limits: {}\nlimits: {}\n", line=2, key="limits", contains="duplicate")


def test_non_scalar_key() -> None:
    assert_error("? [a, b]\n: 1\n", line=1, key=None, contains="key")


# -- wrong types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("limits:\n  max_inflight: many\n", 2, "limits.max_inflight"),
        ("limits:\n  max_inflight: 1.5\n", 2, "limits.max_inflight"),
        ("limits:\n  max_inflight: true\n", 2, "limits.max_inflight"),
        ("limits:\n  max_inflight: '3'\n", 2, "limits.max_inflight"),
        ("limits:\n  max_inflight: [1]\n", 2, "limits.max_inflight"),
        ("listener:\n  handshake_timeout: yes\n", 2, "listener.handshake_timeout"),
        ("listener:\n  handshake_timeout: 10s\n", 2, "listener.handshake_timeout"),
        ("listener:\n  handshake_timeout: .nan\n", 2, "listener.handshake_timeout"),
        ("listener:\n  handshake_timeout: .inf\n", 2, "listener.handshake_timeout"),
        ("limits:\n  max_inflight: !custom 3\n", 2, "limits.max_inflight"),
        ("limits:\n  max_inflight: !!binary aGVsbG8=\n", 2, "limits.max_inflight"),
        ("log_level: !!python/name:os.system info\n", 1, "log_level"),
        ("data_dir: [a, b]\n", 1, "data_dir"),
        ("data_dir: {a: b}\n", 1, "data_dir"),
        ("data_dir:\n", 1, "data_dir"),
        ("default_region: ~\n", 1, "default_region"),
        ("listener: 5\n", 1, "listener"),
        ("listener: [bind]\n", 1, "listener"),
        ("\n\nsqlite:\n  synchronous:\n    mode: full\n", 5, "sqlite.synchronous"),
    ],
)
def test_wrong_types(text: str, line: int, key: str) -> None:
    assert_error(text, line=line, key=key)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_document_must_be_a_mapping(text: str) -> None:
    assert_error(text, line=1, key=None, contains="expected a mapping")


# -- out-of-range values (checked in __post_init__, reported at the key's line) --------------------


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("log_level: info\nlistener:\n  max_connections: 0\n", 3, "listener.max_connections"),
        ("listener:\n  bind: 127.0.0.1:1\n  backlog: -1\n", 3, "listener.backlog"),
        ("listener:\n  handshake_timeout: 0\n", 2, "listener.handshake_timeout"),
        ("listener:\n  connect_timeout: -0.5\n", 2, "listener.connect_timeout"),
        ("listener:\n  session_tickets: -1\n", 2, "listener.session_tickets"),
        ("listener:\n  tls_read_buffer: 4096\n", 2, "listener.tls_read_buffer"),
        ("listener:\n  tls_min_version: '1.1'\n", 2, "listener.tls_min_version"),
        ("listener:\n  tls_min_version: 1.3.1\n", 2, "listener.tls_min_version"),
        ("limits:\n  max_packet_size: 0\n", 2, "limits.max_packet_size"),
        ("limits:\n  max_inflight: -3\n", 2, "limits.max_inflight"),
        ("limits:\n  max_keepalive: 0\n", 2, "limits.max_keepalive"),
        ("limits:\n  keepalive_grace: 0.5\n", 2, "limits.keepalive_grace"),
        ("trust:\n  reload_interval: 0\n", 2, "trust.reload_interval"),
        ("trust:\n  reload_interval: -2\n", 2, "trust.reload_interval"),
        ("sqlite:\n  synchronous: off\n", 2, "sqlite.synchronous"),
        ("sqlite:\n  synchronous: extra\n", 2, "sqlite.synchronous"),
        ("sqlite:\n  batch_window_ms: -1\n", 2, "sqlite.batch_window_ms"),
        ("postgres:\n  pool_size: 0\n", 2, "postgres.pool_size"),
        ("postgres:\n  pool_size: 1001\n", 2, "postgres.pool_size"),
        ("postgres:\n  schema: Bad-Name\n", 2, "postgres.schema"),
        ("postgres:\n  schema: a;drop\n", 2, "postgres.schema"),
        ("postgres:\n  batch_window_ms: -1\n", 2, "postgres.batch_window_ms"),
        ("postgres:\n  keyring_schema: Bad\n", 2, "postgres.keyring_schema"),
        ("postgres:\n  schema: a\n  keyring_schema: a\n", 3, "postgres.keyring_schema"),
        ("keys:\n  env: not a name\n", 2, "keys.env"),
        ("log_level: info\nregistry: sqlite:///var/data/registry.db\n", 2, "registry"),
        ("registry: db.example:5432\n", 1, "registry"),
        ("# comment\nlog_level: verbose\n", 2, "log_level"),
    ],
)
def test_out_of_range_values(text: str, line: int, key: str) -> None:
    exc = assert_error(text, line=line, key=key, contains="must be")
    assert exc.problem.startswith("must be")


@pytest.mark.parametrize(
    "bind",
    [
        "nocolon",
        "8883",
        "host:",
        "host:port",
        "host:99999",
        "host:-1",
        "host:¹",
        "host:٣",
        "host: 1",
        "[::1]",
        "",
    ],
)
def test_bad_bind(bind: str) -> None:
    text = "listener:\n  server_cert: a.pem\n" + yaml.safe_dump({"bind": bind}, allow_unicode=True).replace(
        "bind", "  bind"
    )
    exc = assert_error(text, line=3, key="listener.bind")
    assert "HOST:PORT" in str(exc)


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8883", ("127.0.0.1", 8883)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (":1883", ("127.0.0.1", 1883)),
        ("[::1]:8883", ("::1", 8883)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_good_bind(bind: str, expected: tuple[str, int]) -> None:
    assert host_port(bind) == expected
    assert load_config(text=f"listener:\n  bind: '{bind}'\n").listener.bind == bind


# -- invalid YAML and unreadable files --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("listener: [\n", 2),
        ("log_level: info\n  bind: x\n", 2),
        ("log_level: info\n---\nlog_level: debug\n", 2),
        ("log_level: 'unterminated\n", 2),
        ("limits:\n\tmax_inflight: 1\n", 2),
    ],
)
def test_invalid_yaml(text: str, line: int) -> None:
    exc = error(text)
    assert "invalid YAML" in str(exc)
    assert exc.where == f"<config>:{line}"
    assert "\n" not in str(exc)


BOMB = "a: &a ['x','x','x','x','x','x','x','x','x']\n" + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        (BOMB, "aliases are not allowed in the config file", 1),
        ("data_dir: *nowhere\n", "aliases are not allowed", 1),
        ("roles: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 16 levels", 1),
        ("limits:\n  max_inflight: !!int abc\n", "invalid value 'abc'", 2),
        ("listener:\n  reuse_port: !!bool maybe\n", "invalid value 'maybe'", 2),
        ("limits:\n  max_inflight: " + "9" * 5000 + "\n", "invalid value", 2),
        ("default_region: !!timestamp 2001-13-45\n", "invalid value", 1),
    ],
    ids=[
        "alias-bomb",
        "unknown-alias",
        "deep-nesting",
        "bad-int-tag",
        "bad-bool-tag",
        "huge-int",
        "bad-timestamp",
    ],
)
def test_hostile_yaml_is_a_config_error_not_a_crash(text: str, message: str, line: int) -> None:
    exc = error(text)
    assert message in str(exc)
    assert exc.where == f"<config>:{line}"


def test_config_files_are_bounded_regular_files(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_config(big)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)  # never blocks waiting for a writer
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(Path("/dev/zero"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("default_region: M\xfcnchen\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert info.value.where == str(path)


def test_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "utf8.yaml"
    path.write_bytes("default_region: M\u00fcnchen\n".encode())
    assert load_config(path).default_region == "M\u00fcnchen"


# -- constructing directly and replace() --------------------------------------------------------


def test_direct_construction_checks_ranges_without_a_location() -> None:
    with pytest.raises(ConfigError) as info:
        ListenerConfig(max_connections=0)
    assert (info.value.key, info.value.where) == ("listener.max_connections", None)
    with pytest.raises(ConfigError):
        LimitsConfig(keepalive_grace=float("nan"))
    with pytest.raises(ConfigError):
        TrustConfig(reload_interval=float("nan"))
    with pytest.raises(ConfigError):
        SQLiteConfig(batch_window_ms=-0.1)


def test_replace() -> None:
    base = load_config(DEFAULT_CONFIG)
    changed = replace(base, log_level="debug", listener__bind="0.0.0.0:1883", limits__max_inflight=None)
    assert changed.log_level == "debug"
    assert changed.listener.bind == "0.0.0.0:1883"
    assert changed.listener.backlog == base.listener.backlog
    assert changed.limits == base.limits
    with pytest.raises(ConfigError) as info:
        replace(base, listener__bind="nope")
    assert info.value.key == "listener.bind"


# -- property: any valid document round-trips; any unknown key is named with its line -------------

VALID: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "": {
        "data_dir": st.sampled_from(["var/data", "/srv/jitp data", "d"]),
        "templates_dir": st.sampled_from(["config/templates", "/etc/jitp/templates"]),
        "default_region": st.text(
            st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=10
        ),
        "log_level": st.sampled_from(["debug", "info", "warning", "error"]),
        "registry": st.sampled_from([None, "postgresql://jitp@db.example:5432/jitp", "postgres://u:p@h/d"]),
        "roles": st.lists(
            st.tuples(
                st.from_regex(r"[0-9a-fA-F]{64}", fullmatch=True),
                st.booleans(),
                st.sampled_from(["service", "auditor", "operator", "admin"]),
            ),
            max_size=3,
            unique_by=lambda t: t[0].lower(),  # one certificate once
        ).map(
            lambda items: {
                (":".join(raw[i : i + 2] for i in range(0, 64, 2)) if colons else raw): role
                for raw, colons, role in items
            }
        ),
    },
    "listener": {
        "bind": st.builds(
            lambda h, p: f"{h}:{p}",
            st.sampled_from(["127.0.0.1", "0.0.0.0", "", "[::]"]),
            st.integers(0, 65535),
        ),
        "server_cert": st.sampled_from(["var/pki/broker.pem", "/etc/ssl/b.pem"]),
        "server_key": st.sampled_from(["var/pki/broker.key", "k"]),
        "handshake_timeout": st.floats(min_value=0.001, max_value=1e6),
        "connect_timeout": st.integers(1, 10**6),
        "max_connections": st.integers(1, 10**9),
        "backlog": st.integers(1, 10**6),
        "tls_min_version": st.sampled_from(["1.2", "1.3"]),
        "session_tickets": st.integers(0, 10),
        "tls_read_buffer": st.integers(17 * 1024, 1024 * 1024),
        "reuse_port": st.booleans(),
    },
    "limits": {
        "max_packet_size": st.integers(1, 2**31),
        "max_inflight": st.integers(1, 1000),
        "max_keepalive": st.integers(1, 65535),
        "keepalive_grace": st.floats(min_value=1.0, max_value=100.0),
        "max_subscriptions": st.integers(1, 10**6),
        "max_queued_messages": st.integers(1, 10**6),
        "max_queued_bytes": st.integers(1, 2**40),
        "service_max_queued_messages": st.integers(1, 10**7),
        "service_max_queued_bytes": st.integers(1, 2**40),
        "max_retained_per_client": st.integers(1, 10**6),
        "max_retained_bytes_per_client": st.integers(1, 2**40),
        "max_retained_bytes": st.integers(1, 2**40),
        "shutdown_drain_timeout": st.floats(min_value=0.0, max_value=3600.0),
        "max_session_expiry": st.integers(min_value=1, max_value=2**32 - 1),
    },
    "trust": {
        "reload_interval": st.floats(min_value=0.01, max_value=3600),
        "stale_crl": st.sampled_from(["keep", "refuse"]),
    },
    "audit": {"coalesce_window": st.floats(min_value=0.0, max_value=86400.0)},
    "nats": {
        "enabled": st.booleans(),
        "servers": st.sampled_from(
            ["nats://127.0.0.1:4222", "nats://a:4222, tls://b:4223", "wss://n.example"]
        ),
        "stream": st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
        "subject_prefix": st.sampled_from(["jitp.events", "x", "acme.iot-events.v1"]),
        "create_stream": st.booleans(),
        "duplicate_window": st.floats(min_value=0.001, max_value=86400.0),
        "poll_interval": st.floats(min_value=0.001, max_value=3600.0),
    },
    "admission": {
        "workers": st.integers(1, 100000),
        "queue_size": st.integers(0, 10**6),
        "queue_timeout": st.floats(min_value=0.001, max_value=3600.0),
        "registry_timeout": st.floats(min_value=0.001, max_value=3600.0),
        "per_ca_rate": st.floats(min_value=0.0, max_value=1e6),
        "per_ca_burst": st.integers(0, 10**6),
        "per_region_rate": st.floats(min_value=0.0, max_value=1e6),
        "per_region_burst": st.integers(0, 10**6),
        "cache_size": st.integers(0, 10**7),
        "cache_ttl": st.floats(min_value=0.001, max_value=86400.0),
    },
    "sqlite": {
        "synchronous": st.sampled_from(["full", "normal"]),
        "batch_window_ms": st.floats(min_value=0.0, max_value=1000.0),
        "max_batch": st.integers(1, 10_000),
    },
    "postgres": {
        "pool_size": st.integers(1, 1000),
        "schema": st.sampled_from([None, "jitp", "tenant_a1", "_x"]),
        "keyring_schema": st.sampled_from([None, "jitp_keys", "vault_1"]),
        "batch_window_ms": st.floats(min_value=0.0, max_value=1000.0),
    },
    "keys": {
        "file": st.sampled_from([None, "/etc/jitp/master.key", "keys/k"]),
        "env": st.sampled_from(["JITP_MASTER_KEY", "MY_KEY", "_K1"]),
        "keyring": st.sampled_from([None, "/var/lib/jitp-keys/keyring.db"]),
    },
    "metrics": {
        "bind": st.sampled_from([None, "127.0.0.1:9883", "[::1]:0", "0.0.0.0:9100"]),
        "refresh_interval": st.floats(min_value=0.1, max_value=3600.0),
        "console": st.booleans(),
    },
    "logging": {"format": st.sampled_from(["text", "json"]), "pseudonymous": st.booleans()},
    "alerts": {
        "enabled": st.booleans(),
        **{
            k: st.floats(min_value=0.1, max_value=1e6)
            for k in (
                "coalesce_window",
                "expiry_window",
                "clone_window",
                "burst_window",
                "spike_bucket",
                "spike_factor",
            )
        },
        **{
            k: st.integers(min_value=1, max_value=10_000)
            for k in ("clone_takeovers", "burst_refusals", "spike_min_joins")
        },
        "clone_different_host": st.booleans(),
        "clone_action": st.sampled_from(["none", "quarantine"]),
        "spike_action": st.sampled_from(["none", "pause"]),
        "burst_v4_prefix": st.integers(min_value=8, max_value=32),
        "burst_v6_prefix": st.integers(min_value=16, max_value=128),
        **{
            k: st.floats(min_value=0.0, max_value=1e4)
            for k in ("expiry_ca_days", "expiry_crl_hours", "expiry_device_days")
        },
    },
    "issuer": {
        "validity": st.sampled_from(["30d", "12h", "3600", "1.5w"]),
        "commit_window": st.floats(min_value=1.0, max_value=86400.0),
        "rate": st.floats(min_value=0.0, max_value=100.0),
        "burst": st.integers(min_value=1, max_value=1000),
        "max_request_bytes": st.integers(min_value=1024, max_value=1024 * 1024),
        "crl_validity": st.sampled_from(["7d", "1d", "86400"]),
    },
}
SECTIONS = (
    "listener",
    "limits",
    "trust",
    "sqlite",
    "postgres",
    "audit",
    "admission",
    "nats",
    "keys",
    "metrics",
    "logging",
    "alerts",
    "issuer",
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section, keys in VALID.items():
        chosen = draw(st.lists(st.sampled_from(sorted(keys)), unique=True))
        values = {k: draw(keys[k]) for k in chosen}
        if section == "":
            doc.update(values)
        elif values or draw(st.booleans()):
            doc[section] = values
    return doc


def _expected(doc: dict[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        sections[section] = cls(**doc.get(section, {}))
    top = {k: (Path(v) if k.endswith("_dir") else v) for k, v in doc.items() if k in VALID[""]}
    if "keys" in doc:
        sections["keys"] = dataclasses.replace(
            sections["keys"],
            **{k: Path(v) for k, v in doc["keys"].items() if k in ("file", "keyring") and v is not None},
        )
    if "listener" in doc:
        sections["listener"] = dataclasses.replace(
            sections["listener"],
            **{k: Path(v) for k, v in doc["listener"].items() if k in ("server_cert", "server_key")},
        )
    return Config(**top, **sections)


@settings(max_examples=150, deadline=None)
@given(documents())
def test_valid_documents_round_trip(doc: dict[str, Any]) -> None:
    assert load_config(text=yaml.safe_dump(doc, allow_unicode=True)) == _expected(doc)


@settings(max_examples=150, deadline=None)
@given(documents(), st.data())
def test_an_unknown_key_anywhere_is_named_with_its_line(doc: dict[str, Any], data: st.DataObject) -> None:
    sections = [""] + [s for s in SECTIONS if s in doc]
    section = data.draw(st.sampled_from(sections))
    bogus = data.draw(
        st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True).filter(
            lambda k: (
                k not in VALID.get(section, {})
                and k not in VALID[""]
                and k not in VALID
                # YAML 1.1 words (no, on, y, null, ...) are dumped quoted; keep the line search simple
                and k not in {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}
            )
        )
    )
    target = doc if section == "" else doc[section]
    target[bogus] = 1
    text = yaml.safe_dump(doc, sort_keys=False)
    indent = "" if section == "" else "  "
    lines = text.splitlines()
    expected_line = next(
        i + 1
        for i, line in enumerate(lines)
        if line.startswith(f"{indent}{bogus}:") and (section == "" or _section_of(lines, i) == section)
    )
    exc = error(text)
    assert exc.key == (bogus if section == "" else f"{section}.{bogus}")
    assert exc.where == f"<config>:{expected_line}"


def _section_of(lines: list[str], index: int) -> str:
    for line in reversed(lines[:index]):
        if not line.startswith(" "):
            return line.split(":", 1)[0]
    return ""


def test_the_property_tests_cover_every_section() -> None:
    sections = {
        f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(Config(), f.name))
    }
    assert sections == set(VALID) - {""}
    for section in sections:
        cls = type(getattr(Config(), section))
        assert {f.name for f in dataclasses.fields(cls)} == set(VALID[section]), section
    assert config_mod.DEFAULT_CONFIG == DEFAULT_CONFIG


@pytest.mark.parametrize(
    ("text", "line", "contains"),
    [
        ("log_level: info\nroles:\n  abc: admin\n", 2, "is not a certificate's SHA-256 fingerprint"),
        (
            f"log_level: info\nroles:\n  {'ab' * 32}: device\n",
            2,
            "must be one of service, auditor, operator, admin",
        ),
        (f"log_level: info\nroles:\n  {'ab' * 32}: root\n", 2, "must be one of"),
        ("log_level: info\nroles:\n  - admin\n", 3, "expected a mapping"),
        (f"log_level: info\nroles:\n  {'ab' * 32}: admin\n  {'AB:' * 31}AB: auditor\n", 2, "listed twice"),
    ],
)
def test_bad_role_mappings_are_named(text: str, line: int, contains: str) -> None:
    assert_error(text, line=line, key="roles", contains=contains)
