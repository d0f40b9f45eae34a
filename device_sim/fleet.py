"""Fleets of device identities on disk, targets, and the TLS contexts the simulator uses.

A fleet is either issued under the PKI's manufacturer CA (:func:`create_fleet`) or spans several
regions, each with its own manufacturer CA, an intermediate under the PKI root created and cached
in the fleet directory (:func:`create_region_fleet`)::

    FLEET/manifest.json        every device: id, cert, key, fingerprint, region, CA (relative paths)
    FLEET/fleet.json           how the fleet was made (prefix, regions and counts)
    FLEET/ca-eu-west.pem       the region's CA certificate (mode 0600), for `jitp ca register`
    FLEET/ca-eu-west.key       its key (mode 0600)
    FLEET/eu-west/<id>.pem     device chain (leaf + regional CA) and key
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

import certs
from device_sim.mqtt import PROTOCOLS

MANIFEST = "manifest.json"
FLEET_META = "fleet.json"


@dataclass(frozen=True)
class DeviceCreds:
    """One device identity: its id (the certificate CN) and its chain and key files."""

    device_id: str
    cert: Path
    key: Path
    client_id: str | None = None  # what the device sends as MQTT client id (default: device_id)
    region: str | None = None  # the region its provisioned event must carry (None: not checked)
    ca: Path | None = None  # the CA certificate that issued it (multi-region fleets)

    @property
    def mqtt_client_id(self) -> str:
        return self.device_id if self.client_id is None else self.client_id


@dataclass(frozen=True)
class RegionCA:
    """A region of a multi-region fleet: its manufacturer CA (an intermediate under the PKI root)."""

    region: str
    cert: Path
    key: Path
    fingerprint: str
    count: int
    template: str | None = None  # the enrollment template to bind at registration, if any

    def register_command(self, *, data_dir: Path | None = None) -> str:
        """The ``jitp ca register`` command binding this CA to its region (and template)."""
        cmd = ["jitp", "ca", "register", str(self.cert), "--region", self.region]
        if self.template:
            cmd += ["--template", self.template]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        return shlex.join(cmd)


@dataclass(frozen=True)
class Fleet:
    """Device identities, loaded from a fleet directory (``fleet create``).

    ``issuer_fingerprint`` is the single issuing CA of a one-CA fleet (None for a multi-region
    fleet, whose CAs are in ``regions``).
    """

    dir: Path
    devices: tuple[DeviceCreds, ...]
    issuer_fingerprint: str | None
    prefix: str = "dev-"
    region: str | None = None
    regions: Mapping[str, RegionCA] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.devices)

    def take(self, n: int | None) -> tuple[DeviceCreds, ...]:
        """The first ``n`` devices (all with None); raises if the fleet is smaller.

        Multi-region fleets are stored interleaved in proportion, so any prefix spans the regions.
        """
        if n is None:
            return self.devices
        if n > len(self.devices):
            raise ValueError(f"the fleet in {self.dir} has {len(self.devices)} devices, {n} requested")
        return self.devices[:n]

    def register_commands(self, *, data_dir: Path | None = None) -> list[str]:
        """What the operator runs to bind each regional CA to its region."""
        return [ca.register_command(data_dir=data_dir) for ca in self.regions.values()]

    @classmethod
    def load(cls, directory: Path) -> Fleet:
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no fleet in {directory} (missing {MANIFEST}); run 'fleet create'"
            ) from None
        meta_path = directory / FLEET_META
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        fleet_region = meta.get("region")
        devices = tuple(
            DeviceCreds(
                d["device_id"],
                directory / d["cert"],
                directory / d["key"],
                region=d.get("region", fleet_region),
                ca=directory / d["ca"] if d.get("ca") else None,
            )
            for d in manifest["devices"]
        )
        regions = {
            name: RegionCA(
                region=name,
                cert=directory / r["ca"],
                key=directory / r["ca_key"],
                fingerprint=r["ca_fingerprint"],
                count=r["count"],
                template=r.get("template"),
            )
            for name, r in manifest.get("regions", {}).items()
        }
        return cls(
            dir=directory,
            devices=devices,
            issuer_fingerprint=manifest.get("issuer_fingerprint"),
            prefix=meta.get("prefix", "dev-"),
            region=fleet_region,
            regions=regions,
        )


def create_fleet(
    pki_dir: Path,
    count: int,
    out: Path,
    *,
    prefix: str = "dev-",
    region: str | None = None,
    workers: int | None = None,
    force: bool = False,
) -> Fleet:
    """Issue ``count`` device identities under the manufacturer CA of a ``jitp pki init`` directory.

    Cached: if ``out`` already holds a fleet with the same count, prefix and issuer it is reused
    (unless ``force``). Issuance runs in a process pool for large fleets (``certs.issue_devices``).
    ``region`` is recorded in the fleet metadata (the broker takes regions from the CA registration)
    and is the region every device's provisioned event is expected to carry.
    """
    layout = certs.PkiLayout(Path(pki_dir))
    if not layout.manufacturer_key.exists():
        raise FileNotFoundError(
            f"no manufacturer CA key at {layout.manufacturer_key}; run 'jitp pki init' first"
        )
    issuer = certs.load_issuer(layout.manufacturer_cert, layout.manufacturer_key)
    out = Path(out)
    if not force and (out / MANIFEST).exists():
        try:
            fleet = Fleet.load(out)
        except (ValueError, KeyError, OSError):
            fleet = None
        if (
            fleet is not None
            and len(fleet) == count
            and fleet.prefix == prefix
            and fleet.region == region
            and not fleet.regions
            and fleet.issuer_fingerprint == certs.fingerprint(issuer.cert)
            and all(d.device_id.startswith(prefix) for d in fleet.devices)
            and all(d.cert.exists() and d.key.exists() for d in fleet.devices)
        ):
            return fleet
    certs.issue_devices(issuer, count, out, prefix=prefix, workers=workers)
    (out / FLEET_META).write_text(json.dumps({"prefix": prefix, "region": region, "count": count}) + "\n")
    return Fleet.load(out)


# -- multi-region fleets ------------------------------------------------------------------------------
_REGION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TEMPLATE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CA_RENEW_BEFORE = timedelta(days=30)


@dataclass(frozen=True)
class RegionSpec:
    region: str
    count: int
    template: str | None = None


def parse_regions(spec: str) -> list[RegionSpec]:
    """``"eu-west=500,us-east=300:smart-meter"`` -> region specs (REGION=COUNT[:TEMPLATE], comma-separated)."""
    out: list[RegionSpec] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, rest = item.partition("=")
        number, _, template = rest.partition(":")
        name, number, template = name.strip(), number.strip(), template.strip()
        if not sep or not number.isdigit():
            raise ValueError(f"bad region spec {item!r}: expected REGION=COUNT[:TEMPLATE], e.g. eu-west=500")
        out.append(RegionSpec(name, int(number), template or None))
    _check_specs(out)
    return out


def _check_specs(specs: Sequence[RegionSpec]) -> None:
    if not specs:
        raise ValueError("no regions given")
    seen: set[str] = set()
    for s in specs:
        if not _REGION_RE.match(s.region):
            raise ValueError(
                f"bad region name {s.region!r}: letters, digits, '-', '_' and '.', at most 63 characters"
            )
        if s.region in seen:
            raise ValueError(f"region {s.region!r} is given twice")
        seen.add(s.region)
        if s.count < 1:
            raise ValueError(f"region {s.region!r}: the count must be at least 1")
        if s.template is not None and not _TEMPLATE_RE.match(s.template):
            raise ValueError(f"region {s.region!r}: bad template name {s.template!r}")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, mode 0600 from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file already existed
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.replace(path)


def _usable_ca(cert_path: Path, key_path: Path, root: certs.Issuer) -> certs.Issuer | None:
    """The cached regional CA, if it exists, is issued by ``root`` and stays valid a while longer."""
    if not (cert_path.exists() and key_path.exists()):
        return None
    try:
        issuer = certs.load_issuer(cert_path, key_path)
        issuer.cert.verify_directly_issued_by(root.cert)
    except (ValueError, TypeError, InvalidSignature, OSError):
        return None
    if issuer.cert.not_valid_after_utc - _CA_RENEW_BEFORE < datetime.now(UTC):
        return None
    return certs.Issuer(cert=issuer.cert, key=issuer.key, chain=())


def regional_ca(fleet_dir: Path, region: str, root: certs.Issuer, *, key_type: str = "ec") -> certs.Issuer:
    """The manufacturer CA of ``region`` in ``fleet_dir``: reused if cached and issued by ``root``,
    else created (``ca-<region>.pem`` and ``.key``, mode 0600)."""
    cert_path, key_path = fleet_dir / f"ca-{region}.pem", fleet_dir / f"ca-{region}.key"
    cached = _usable_ca(cert_path, key_path, root)
    if cached is not None:
        return cached
    ca = certs.make_ca(
        f"{certs.MANUFACTURER_CA_CN} {region}", key=certs.generate_key(key_type), issuer=root, path_length=0
    )
    key_pem = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(key_path, key_pem)
    _write_private(cert_path, ca.cert.public_bytes(serialization.Encoding.PEM))
    return ca


def _interleave(groups: Sequence[Sequence[dict[str, str]]]) -> list[dict[str, str]]:
    """Merge per-region device lists in proportion (a prefix of the result spans every region)."""
    keyed = [((i + 0.5) / len(g), r, d) for r, g in enumerate(groups) for i, d in enumerate(g)]
    return [d for _, _, d in sorted(keyed, key=lambda t: (t[0], t[1]))]


def create_region_fleet(
    pki_dir: Path,
    regions: Sequence[RegionSpec] | Mapping[str, int],
    out: Path,
    *,
    prefix: str = "dev-",
    workers: int | None = None,
    force: bool = False,
) -> Fleet:
    """One fleet spanning several regions, each with its own manufacturer CA under the PKI root.

    ``regions``: specs, or ``{"eu-west": 500, "us-east": 300}``. Device ids are
    ``<prefix><region>-<n>``. Each region's CA is created once and cached in ``out`` (so a
    registration with the broker stays valid); devices are re-issued only when the regions, counts
    or prefix change, a CA was replaced, or with ``force``. Register each CA with its region::

        jitp ca register OUT/ca-eu-west.pem --region eu-west   (see Fleet.register_commands())
    """
    specs = [RegionSpec(r, n) for r, n in regions.items()] if isinstance(regions, Mapping) else list(regions)
    _check_specs(specs)
    layout = certs.PkiLayout(Path(pki_dir))
    if not layout.root_key.exists():
        raise FileNotFoundError(f"no root CA key at {layout.root_key}; run 'jitp pki init' first")
    root = certs.load_issuer(layout.root_cert, layout.root_key)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cas = {s.region: regional_ca(out, s.region, root) for s in specs}
    wanted = {s.region: (s.count, s.template) for s in specs}
    if not force and (out / MANIFEST).exists():
        try:
            fleet = Fleet.load(out)
        except (ValueError, KeyError, OSError, TypeError):
            fleet = None
        if (
            fleet is not None
            and fleet.prefix == prefix
            and {r: (ca.count, ca.template) for r, ca in fleet.regions.items()} == wanted
            and all(fleet.regions[r].fingerprint == certs.fingerprint(ca.cert) for r, ca in cas.items())
            and all(d.cert.exists() and d.key.exists() for d in fleet.devices)
        ):
            return fleet
    groups: list[list[dict[str, str]]] = []
    regions_doc: dict[str, dict[str, object]] = {}
    for s in specs:
        sub = out / s.region
        files = certs.issue_devices(
            cas[s.region], s.count, sub, prefix=f"{prefix}{s.region}-", workers=workers
        )
        issued = json.loads((sub / MANIFEST).read_text())
        fingerprints = {d["device_id"]: d["fingerprint"] for d in issued["devices"]}
        (sub / MANIFEST).unlink()  # the fleet's manifest is the one at the top
        ca_name = f"ca-{s.region}.pem"
        groups.append(
            [
                {
                    "device_id": d.device_id,
                    "cert": f"{s.region}/{d.cert_path.name}",
                    "key": f"{s.region}/{d.key_path.name}",
                    "fingerprint": fingerprints[d.device_id],
                    "region": s.region,
                    "ca": ca_name,
                }
                for d in files
            ]
        )
        regions_doc[s.region] = {
            "ca": ca_name,
            "ca_key": f"ca-{s.region}.key",
            "ca_fingerprint": certs.fingerprint(cas[s.region].cert),
            "count": s.count,
            "template": s.template,
        }
    manifest = {"issuer_fingerprint": None, "regions": regions_doc, "devices": _interleave(groups)}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)
    meta = {
        "prefix": prefix,
        "regions": {s.region: s.count for s in specs},
        "count": sum(s.count for s in specs),
    }
    (out / FLEET_META).write_text(json.dumps(meta) + "\n")
    return Fleet.load(out)


@dataclass(frozen=True)
class ServiceCreds:
    """A service identity (service CA) allowed to subscribe ``$jitp/events/#`` and telemetry.

    A jitp broker accepts a service only under the client id its certificate names (the subject
    CN), so that is the default; ``client_id`` overrides it (for brokers with other rules).
    """

    cert: Path
    key: Path
    client_id: str | None = None  # what the service sends as MQTT client id (default: the cert's CN)

    @property
    def mqtt_client_id(self) -> str:
        """``client_id`` if given, else the subject CN of the certificate (read from ``cert``)."""
        return self.client_id if self.client_id is not None else certificate_cn(self.cert)

    @classmethod
    def from_pki(cls, pki_dir: Path) -> ServiceCreds:
        layout = certs.PkiLayout(Path(pki_dir))
        return cls(cert=layout.service_client_cert, key=layout.service_client_key)


def certificate_cn(cert_path: Path) -> str:
    """The subject CN of the first certificate (the leaf) of a PEM file.

    Raises FileNotFoundError for a missing file and ValueError when the file holds no PEM
    certificate or the subject has no CN or several (the identity would be ambiguous).
    """
    data = Path(cert_path).read_bytes()
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except ValueError as exc:
        raise ValueError(f"{cert_path}: no PEM certificate ({exc})") from None
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise ValueError(
            f"{cert_path}: the certificate subject has {len(cns) or 'no'} common name(s) (CN); "
            "give the client id explicitly"
        )
    value = cns[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


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
    protocol: int = 4  # MQTT protocol level of every connection: 4 (3.1.1) or 5 (5.0)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be 4 (MQTT 3.1.1) or 5 (MQTT 5.0), not {self.protocol!r}")

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
