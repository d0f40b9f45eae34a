"""Fleets of device identities on disk, targets, and the TLS contexts the simulator uses."""

from __future__ import annotations

import json
import resource
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import certs

MANIFEST = "manifest.json"
FLEET_META = "fleet.json"


@dataclass(frozen=True)
class DeviceCreds:
    """One device identity: its id (the certificate CN) and its chain and key files."""

    device_id: str
    cert: Path
    key: Path
    client_id: str | None = None  # what the device sends as MQTT client id (default: device_id)

    @property
    def mqtt_client_id(self) -> str:
        return self.device_id if self.client_id is None else self.client_id


@dataclass(frozen=True)
class Fleet:
    """Device identities issued under one CA (``fleet create``), loaded from a fleet directory."""

    dir: Path
    devices: tuple[DeviceCreds, ...]
    issuer_fingerprint: str
    prefix: str = "dev-"
    region: str | None = None

    def __len__(self) -> int:
        return len(self.devices)

    def take(self, n: int | None) -> tuple[DeviceCreds, ...]:
        """The first ``n`` devices (all with None); raises if the fleet is smaller."""
        if n is None:
            return self.devices
        if n > len(self.devices):
            raise ValueError(f"the fleet in {self.dir} has {len(self.devices)} devices, {n} requested")
        return self.devices[:n]

    @classmethod
    def load(cls, directory: Path) -> Fleet:
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no fleet in {directory} (missing {MANIFEST}); run 'fleet create'") from None
        meta_path = directory / FLEET_META
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        devices = tuple(DeviceCreds(d["device_id"], directory / d["cert"], directory / d["key"])
                        for d in manifest["devices"])
        return cls(dir=directory, devices=devices, issuer_fingerprint=manifest["issuer_fingerprint"],
                   prefix=meta.get("prefix", "dev-"), region=meta.get("region"))


def create_fleet(pki_dir: Path, count: int, out: Path, *, prefix: str = "dev-", region: str | None = None,
                 workers: int | None = None, force: bool = False) -> Fleet:
    """Issue ``count`` device identities under the manufacturer CA of a ``jitp pki init`` directory.

    Cached: if ``out`` already holds a fleet with the same count, prefix and issuer it is reused
    (unless ``force``). Issuance runs in a process pool for large fleets (``certs.issue_devices``).
    ``region`` is recorded in the fleet metadata (the broker takes regions from the CA registration).
    """
    layout = certs.PkiLayout(Path(pki_dir))
    if not layout.manufacturer_key.exists():
        raise FileNotFoundError(f"no manufacturer CA key at {layout.manufacturer_key}; run 'jitp pki init' first")
    issuer = certs.load_issuer(layout.manufacturer_cert, layout.manufacturer_key)
    out = Path(out)
    if not force and (out / MANIFEST).exists():
        try:
            fleet = Fleet.load(out)
        except (ValueError, KeyError, OSError):
            fleet = None
        if (fleet is not None and len(fleet) == count and fleet.prefix == prefix and fleet.region == region
                and fleet.issuer_fingerprint == certs.fingerprint(issuer.cert)
                and all(d.device_id.startswith(prefix) for d in fleet.devices)
                and all(d.cert.exists() and d.key.exists() for d in fleet.devices)):
            return fleet
    certs.issue_devices(issuer, count, out, prefix=prefix, workers=workers)
    (out / FLEET_META).write_text(json.dumps({"prefix": prefix, "region": region, "count": count}) + "\n")
    return Fleet.load(out)


@dataclass(frozen=True)
class ServiceCreds:
    """A service identity (service CA) allowed to subscribe ``$jitp/events/#``."""

    cert: Path
    key: Path
    client_id: str = certs.SERVICE_CLIENT_CN

    @classmethod
    def from_pki(cls, pki_dir: Path) -> ServiceCreds:
        layout = certs.PkiLayout(Path(pki_dir))
        return cls(cert=layout.service_client_cert, key=layout.service_client_key)


@dataclass(frozen=True)
class Target:
    """An mTLS MQTT endpoint. ``ca`` verifies the broker's certificate."""

    host: str
    port: int
    ca: Path
    server_hostname: str | None = None  # defaults to host
    broker_pid: int | None = None  # a local broker process: CPU and RSS are read from /proc
    source_addresses: tuple[str, ...] = ()  # e.g. 127.0.0.2.. to go beyond ~28k ports per source IP
    connect_timeout: float = 30.0

    def source_for(self, index: int) -> str | None:
        if not self.source_addresses:
            return None
        return self.source_addresses[index % len(self.source_addresses)]


def client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A client context: verifies the broker against ``ca`` and presents ``cert``/``key``.

    Costs ~2.5 ms with OpenSSL 3.0; scenarios build them before the clock starts.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def build_contexts(ca: Path, devices: Sequence[DeviceCreds]) -> list[ssl.SSLContext]:
    return [client_context(ca, d.cert, d.key) for d in devices]


def raise_fd_limit() -> int:
    """Raise the soft file-descriptor limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def lean_tls_buffers(size: int = 32 * 1024) -> None:
    """Shrink asyncio's per-TLS-connection read buffer (256 KiB in Python 3.11) for this process.

    Process-wide (a class attribute of ``asyncio.sslproto.SSLProtocol``): the CLI calls it; library
    users decide for themselves, since it also affects any TLS server running in the same process.
    """
    import asyncio.sslproto

    asyncio.sslproto.SSLProtocol.max_size = size


