"""Development PKI for jitp: CAs, broker/service identities and bulk device certificates.

Everything here uses the ``cryptography`` package only (no ``openssl`` subprocess).  Private keys are
written unencrypted (PKCS#8 PEM) with mode 0600 and are never logged or printed by this module.

PKI layout produced by :func:`init_pki` (see :class:`PkiLayout`)::

    root-ca.pem / root-ca.key                     self-signed "jitp dev root CA"
    manufacturer-ca.pem / manufacturer-ca.key     "jitp manufacturer CA" (root-signed, pathlen 0): devices
    service-ca.pem / service-ca.key               "jitp service CA" (root-signed, pathlen 0)
    broker.pem / broker.key                       broker TLS server certificate (root-signed, leaf only)
    service-client.pem / service-client.key       "ingest-service" client identity (leaf + service CA)
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import math
import multiprocessing
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_HOSTS",
    "MANUFACTURER_CA_CN",
    "ORGANIZATION",
    "ROOT_CA_CN",
    "SERVICE_CA_CN",
    "SERVICE_CLIENT_CN",
    "DeviceFiles",
    "Issuer",
    "PkiLayout",
    "PrivateKey",
    "PublicKey",
    "fingerprint",
    "generate_key",
    "init_pki",
    "issue_devices",
    "issue_from_pki",
    "load_certs",
    "load_issuer",
    "load_key",
    "make_ca",
    "make_leaf",
    "make_server_cert",
    "write_certs",
    "write_key",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

ORGANIZATION = "jitp dev PKI"
ROOT_CA_CN = "jitp dev root CA"
MANUFACTURER_CA_CN = "jitp manufacturer CA"
SERVICE_CA_CN = "jitp service CA"
SERVICE_CLIENT_CN = "ingest-service"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

_BACKDATE = timedelta(minutes=5)
_POOL_THRESHOLD = 200  # below this many devices, issue inline
_MAX_CHUNK = 500
_MIN_CHUNK = 50

_KEY_USAGE_NAMES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


@dataclass(frozen=True)
class Issuer:
    """A CA certificate with its private key.

    ``chain`` holds the certificates *above* ``cert`` up to, but excluding, the self-signed root
    (empty for the root itself and for CAs signed directly by the root).
    """

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def __repr__(self) -> str:  # never include key material in reprs / logs
        return f"Issuer(subject={self.cert.subject.rfc4514_string()!r}, chain_len={len(self.chain)})"


# ---------------------------------------------------------------------------------------------------------
# keys and time helpers


def _check_key_type(key_type: str) -> None:
    if key_type not in ("ec", "rsa"):
        raise ValueError(f"unknown key type {key_type!r} (expected 'ec' or 'rsa')")


def generate_key(key_type: str = "ec", *, rsa_bits: int = 2048) -> PrivateKey:
    """Generate a private key: ``"ec"`` -> NIST P-256, ``"rsa"`` -> RSA with ``rsa_bits`` bits."""
    _check_key_type(key_type)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _validity(
    now: datetime | None, days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    current = _utc(now)
    start = _utc(not_before) if not_before is not None else current - _BACKDATE
    end = _utc(not_after) if not_after is not None else current + timedelta(days=days)
    if end < start:
        raise ValueError(f"not_after ({end.isoformat()}) is before not_before ({start.isoformat()})")
    return start, end


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _aki_for(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_public_key_of(issuer_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _public_key_of(cert: x509.Certificate) -> PublicKey:
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise TypeError(f"unsupported public key type {type(public_key).__name__}")
    return public_key


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    return builder.sign(private_key=key, algorithm=hashes.SHA256())


# ---------------------------------------------------------------------------------------------------------
# certificate construction


def make_ca(
    cn: str,
    *,
    key: PrivateKey,
    issuer: Issuer | None = None,
    now: datetime | None = None,
    days: int = 3650,
    path_length: int | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extra_extensions: tuple[x509.Extension[x509.ExtensionType], ...] = (),
) -> Issuer:
    """Create a CA certificate for ``key``; self-signed root when ``issuer`` is None."""
    start, end = _validity(now, days, not_before, not_after)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    for ext in extra_extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    if issuer is None:
        return Issuer(cert=_sign(builder, key), key=key, chain=())
    builder = builder.add_extension(_aki_for(issuer.cert), critical=False)
    cert = _sign(builder, issuer.key)
    chain = () if _is_self_signed(issuer.cert) else (issuer.cert, *issuer.chain)
    return Issuer(cert=cert, key=key, chain=chain)


def _subject_name(subject: str | x509.Name) -> x509.Name:
    if isinstance(subject, x509.Name):
        return subject
    if subject == "":
        return x509.Name([])
    # _validate=False: allow arbitrary / overlong CNs (tests deliberately create hostile subjects).
    # cryptography still emits a UserWarning for those; silence just that one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attribute's length must be", category=UserWarning)
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject, _validate=False)])


def _key_usage(names: Iterable[str]) -> x509.KeyUsage:
    flags = dict.fromkeys(_KEY_USAGE_NAMES, False)
    for name in names:
        if name not in flags:
            raise ValueError(f"unknown key usage {name!r} (expected one of {', '.join(_KEY_USAGE_NAMES)})")
        flags[name] = True
    return x509.KeyUsage(**flags)


def make_leaf(
    subject: str | x509.Name,
    public_key: PublicKey,
    *,
    issuer: Issuer,
    now: datetime | None = None,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    serial: int | None = None,
    is_ca: bool = False,
    key_usage: tuple[str, ...] | None = ("digital_signature",),
    eku: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    san_dns: tuple[str, ...] = (),
    san_uri: tuple[str, ...] = (),
    san_ip: tuple[str, ...] = (),
    extra_extensions: tuple[x509.ExtensionType | x509.Extension[x509.ExtensionType], ...] = (),
) -> x509.Certificate:
    """Issue an end-entity (or, with ``is_ca``, deliberately odd) certificate signed by ``issuer``.

    ``subject`` as a string becomes a Name with only a CN (any string; ``""`` -> empty Name).
    ``key_usage``/``eku`` of None omit the extension entirely.  ``extra_extensions`` are added
    non-critical, unless given as ``x509.Extension`` objects, which carry their own criticality.
    """
    start, end = _validity(now, days, not_before, not_after)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject_name(subject))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki_for(issuer.cert), critical=False)
    )
    if key_usage is not None:
        builder = builder.add_extension(_key_usage(key_usage), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    general_names: list[x509.GeneralName] = [x509.DNSName(name) for name in san_dns]
    general_names += [x509.UniformResourceIdentifier(uri) for uri in san_uri]
    general_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in san_ip]
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    for extension in extra_extensions:
        if isinstance(extension, x509.Extension):
            builder = builder.add_extension(extension.value, critical=extension.critical)
        else:
            builder = builder.add_extension(extension, critical=False)
    return _sign(builder, issuer.key)


def make_server_cert(
    issuer: Issuer,
    key: PrivateKey,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    now: datetime | None = None,
    days: int = 825,
) -> x509.Certificate:
    """TLS server certificate: CN=hosts[0], SAN with every host (IP literals as iPAddress), EKU serverAuth."""
    if not hosts:
        raise ValueError("make_server_cert needs at least one host")
    dns: list[str] = []
    ips: list[str] = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            dns.append(host)
        else:
            ips.append(host)
    usage = (
        ("digital_signature", "key_encipherment")
        if isinstance(key, rsa.RSAPrivateKey)
        else ("digital_signature",)
    )
    return make_leaf(
        hosts[0],
        key.public_key(),
        issuer=issuer,
        now=now,
        days=days,
        key_usage=usage,
        eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
        san_dns=tuple(dns),
        san_ip=tuple(ips),
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of the DER encoding, lowercase hex without separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


# ---------------------------------------------------------------------------------------------------------
# files


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _certs_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def _write_bytes(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The mode is applied at creation time (no window where a key is world-readable); fchmod fixes
    # up pre-existing files and the umask.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


def write_key(path: Path, key: PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600 from creation on."""
    _write_bytes(Path(path), _key_pem(key), 0o600)


def write_certs(path: Path, certs: Sequence[x509.Certificate]) -> None:
    """Write ``certs`` as concatenated PEM, mode 0644."""
    _write_bytes(Path(path), _certs_pem(certs), 0o644)


def load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def _load_key_pem(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unsupported private key type {type(key).__name__} (expected EC or RSA)")
    return key


def load_key(path: Path) -> PrivateKey:
    return _load_key_pem(Path(path).read_bytes())


def _public_bytes(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _issuer_from(certs: Sequence[x509.Certificate], key: PrivateKey, origin: str) -> Issuer:
    if not certs:
        raise ValueError(f"{origin}: no certificate found")
    cert = certs[0]
    if _public_bytes(cert.public_key()) != _public_bytes(key.public_key()):
        raise ValueError(f"{origin}: private key does not match the first certificate")
    chain = tuple(c for c in certs[1:] if not _is_self_signed(c))
    return Issuer(cert=cert, key=key, chain=chain)


def load_issuer(cert_path: Path, key_path: Path) -> Issuer:
    """Load a CA: first cert in ``cert_path`` is the CA, the rest (minus self-signed roots) its chain."""
    return _issuer_from(load_certs(cert_path), load_key(key_path), str(cert_path))


# ---------------------------------------------------------------------------------------------------------
# PKI directory


@dataclass(frozen=True)
class PkiLayout:
    """File names inside a PKI directory created by :func:`init_pki`."""

    dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))

    @property
    def root_cert(self) -> Path:
        return self.dir / "root-ca.pem"

    @property
    def root_key(self) -> Path:
        return self.dir / "root-ca.key"

    @property
    def manufacturer_cert(self) -> Path:
        return self.dir / "manufacturer-ca.pem"

    @property
    def manufacturer_key(self) -> Path:
        return self.dir / "manufacturer-ca.key"

    @property
    def service_ca_cert(self) -> Path:
        return self.dir / "service-ca.pem"

    @property
    def service_ca_key(self) -> Path:
        return self.dir / "service-ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "broker.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "broker.key"

    @property
    def service_client_cert(self) -> Path:
        return self.dir / "service-client.pem"

    @property
    def service_client_key(self) -> Path:
        return self.dir / "service-client.key"

    def cert_files(self) -> tuple[Path, ...]:
        return (
            self.root_cert,
            self.manufacturer_cert,
            self.service_ca_cert,
            self.server_cert,
            self.service_client_cert,
        )

    def key_files(self) -> tuple[Path, ...]:
        return (
            self.root_key,
            self.manufacturer_key,
            self.service_ca_key,
            self.server_key,
            self.service_client_key,
        )


def init_pki(
    directory: Path, *, key_type: str = "ec", now: datetime | None = None, force: bool = False
) -> PkiLayout:
    """Create the dev PKI in ``directory`` (mode 0700). Refuses to overwrite an existing root key."""
    layout = PkiLayout(Path(directory))
    if layout.root_key.exists() and not force:
        raise FileExistsError(
            f"refusing to overwrite existing PKI: {layout.root_key} already exists "
            "(use force=True / --force to regenerate every CA and identity)"
        )
    _check_key_type(key_type)  # before touching the filesystem
    layout.dir.mkdir(parents=True, exist_ok=True)
    layout.dir.chmod(0o700)
    current = _utc(now)

    root = make_ca(ROOT_CA_CN, key=generate_key(key_type), now=current)
    manufacturer = make_ca(
        MANUFACTURER_CA_CN, key=generate_key(key_type), issuer=root, now=current, path_length=0
    )
    service_ca = make_ca(SERVICE_CA_CN, key=generate_key(key_type), issuer=root, now=current, path_length=0)
    server_key = generate_key(key_type)
    server_cert = make_server_cert(root, server_key, now=current)
    client_key = generate_key(key_type)
    client_cert = make_leaf(SERVICE_CLIENT_CN, client_key.public_key(), issuer=service_ca, now=current)

    write_key(layout.root_key, root.key)
    write_certs(layout.root_cert, [root.cert])
    write_key(layout.manufacturer_key, manufacturer.key)
    write_certs(layout.manufacturer_cert, [manufacturer.cert])
    write_key(layout.service_ca_key, service_ca.key)
    write_certs(layout.service_ca_cert, [service_ca.cert])
    write_key(layout.server_key, server_key)
    write_certs(layout.server_cert, [server_cert])
    write_key(layout.service_client_key, client_key)
    write_certs(layout.service_client_cert, [client_cert, service_ca.cert, *service_ca.chain])
    return layout


# ---------------------------------------------------------------------------------------------------------
# bulk device issuance


@dataclass(frozen=True)
class DeviceFiles:
    device_id: str
    cert_path: Path  # <out>/<id>.pem: leaf + issuer cert + issuer chain (root excluded)
    key_path: Path  # <out>/<id>.key, mode 0600


# Per-worker-process state, set by _worker_init (holds the issuer's key; never logged).
_worker_state: dict[str, Any] = {}


def _issue_one(
    issuer: Issuer, chain_pem: bytes, device_id: str, out: Path, key_type: str, now: datetime, days: int
) -> str:
    key = generate_key(key_type)
    cert = make_leaf(device_id, key.public_key(), issuer=issuer, now=now, days=days)
    write_key(out / f"{device_id}.key", key)
    _write_bytes(out / f"{device_id}.pem", cert.public_bytes(serialization.Encoding.PEM) + chain_pem, 0o644)
    return fingerprint(cert)


def _worker_init(chain_pem: bytes, issuer_key_pem: bytes) -> None:
    """``chain_pem`` is the issuer's certificate followed by its chain (what every device .pem appends)."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    _worker_state["issuer"] = Issuer(cert=certs[0], key=_load_key_pem(issuer_key_pem), chain=tuple(certs[1:]))
    _worker_state["chain_pem"] = chain_pem


def _worker_issue(
    device_ids: list[str], out: str, key_type: str, now: datetime, days: int
) -> list[tuple[str, str]]:
    issuer: Issuer = _worker_state["issuer"]
    chain_pem: bytes = _worker_state["chain_pem"]
    out_path = Path(out)
    return [
        (device_id, _issue_one(issuer, chain_pem, device_id, out_path, key_type, now, days))
        for device_id in device_ids
    ]


def _check_device_id(device_id: str) -> None:
    if device_id in ("", ".", "..") or any(ch in device_id for ch in ("/", "\\", "\0")):
        raise ValueError(f"device id {device_id!r} is not usable as a file name")


def issue_devices(
    issuer: Issuer,
    count: int,
    out: Path,
    *,
    prefix: str = "dev-",
    start: int = 1,
    key_type: str = "ec",
    width: int = 5,
    workers: int | None = None,
    now: datetime | None = None,
    days: int = 825,
) -> list[DeviceFiles]:
    """Issue ``count`` device identities into ``out`` and write ``out/manifest.json``.

    Device ids are ``f"{prefix}{i:0{width}d}"`` for ``i`` in ``start .. start+count-1``; each gets
    ``<id>.pem`` (leaf + issuer + issuer chain, root excluded) and ``<id>.key`` (mode 0600).
    With ``count >= 200`` and more than one worker, keys are generated and certificates signed in a
    spawn-based process pool (so callers' scripts need the usual ``if __name__ == "__main__"`` guard).
    ``workers`` defaults to the CPU count.  Existing files for the same ids, and the manifest, are
    overwritten.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    _check_key_type(key_type)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    current = _utc(now)
    device_ids = [f"{prefix}{i:0{width}d}" for i in range(start, start + count)]
    for device_id in device_ids:
        _check_device_id(device_id)
    if len(set(device_ids)) != len(device_ids):
        raise ValueError("device ids are not unique (check prefix/width)")

    chain_pem = _certs_pem((issuer.cert, *issuer.chain))
    n_workers = workers if workers is not None else (os.cpu_count() or 1)
    fingerprints: dict[str, str] = {}
    if count >= _POOL_THRESHOLD and n_workers > 1:
        chunk = max(_MIN_CHUNK, min(_MAX_CHUNK, math.ceil(count / (n_workers * 4))))
        chunks = [device_ids[i : i + chunk] for i in range(0, count, chunk)]
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(n_workers, len(chunks)),
            mp_context=context,
            initializer=_worker_init,
            initargs=(chain_pem, _key_pem(issuer.key)),
        ) as pool:
            futures = [pool.submit(_worker_issue, ids, str(out), key_type, current, days) for ids in chunks]
            for future in futures:
                fingerprints.update(future.result())
    else:
        for device_id in device_ids:
            fingerprints[device_id] = _issue_one(issuer, chain_pem, device_id, out, key_type, current, days)

    results = [
        DeviceFiles(device_id, out / f"{device_id}.pem", out / f"{device_id}.key") for device_id in device_ids
    ]
    manifest = {
        "issuer_fingerprint": fingerprint(issuer.cert),
        "devices": [
            {
                "device_id": files.device_id,
                "cert": files.cert_path.name,
                "key": files.key_path.name,
                "fingerprint": fingerprints[files.device_id],
            }
            for files in results
        ],
    }
    tmp = out / "manifest.json.tmp"
    _write_bytes(tmp, (json.dumps(manifest, indent=2) + "\n").encode(), 0o644)
    tmp.replace(out / "manifest.json")
    return results


def issue_from_pki(layout: PkiLayout, count: int, out: Path, **kw: Any) -> list[DeviceFiles]:
    """Issue devices with the manufacturer CA of ``layout`` (root never included in device chains)."""
    issuer = load_issuer(layout.manufacturer_cert, layout.manufacturer_key)
    return issue_devices(issuer, count, out, **kw)
