"""The operational issuing CA: its key behind a :class:`Signer`, CSR checks, certificates and CRLs.

Everything here is pure (the clock is passed in) and uses ``cryptography`` for every operation.
The signing key sits behind :class:`Signer`, so a KMS or HSM signer can replace :class:`LocalSigner`:
the rest of jitp hands it finished ``CertificateBuilder``/``CertificateRevocationListBuilder``
objects and never touches the key.

An issued certificate takes nothing from the CSR but its public key (after the CSR's signature,
the proof of possession, verified): the subject and SAN come from the device record, and no CSR
extension is copied. It is CA:FALSE, KeyUsage digitalSignature, ExtendedKeyUsage clientAuth.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jitp import errors
from jitp.trust import _check_key_strength

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
MAX_CSR_PEM = 8 * 1024  # bytes; an RSA-4096 CSR is about 1.7 KiB
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, what: str = "duration") -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600`` (seconds) -> timedelta; ValueError otherwise."""
    m = _DURATION.fullmatch(text)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"{what} must be a positive number with an optional unit s, m, h, d or w: {text!r}")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


class Signer(Protocol):
    """The issuing CA's signing operations. A KMS or HSM implementation keeps the key inside it."""

    @property
    def certificate(self) -> x509.Certificate: ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate: ...

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList: ...


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """digitalSignature; a CA also keyCertSign and cRLSign. Nothing else (no encipherment)."""
    off = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
    )
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False, **off
    )


def _algorithm(key: object) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()


@dataclass(frozen=True)
class LocalSigner:
    """A signer holding the private key in memory (unsealed from the registry when needed)."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def certificate(self) -> x509.Certificate:
        return self.cert

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, _algorithm(self.key))

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return builder.sign(self.key, _algorithm(self.key))

    def key_der(self) -> bytes:
        """PKCS#8 DER, unencrypted: only ever passed on to be sealed under the master key."""
        return self.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def load_signer(cert_der: bytes, key_der: bytes) -> LocalSigner:
    key = serialization.load_der_private_key(key_der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise errors.InvalidRequest(f"unsupported issuer key type {type(key).__name__}")
    return LocalSigner(x509.load_der_x509_certificate(cert_der), key)


def new_key(key_type: str) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise errors.InvalidRequest(f"unknown key type {key_type!r} (ec or rsa)")


def make_issuing_ca(
    *, key_type: str, validity: timedelta, now: datetime, name: str = "jitp operational issuing CA"
) -> LocalSigner:
    """A new self-signed issuing CA (pathLen 0: it signs device certificates only)."""
    key = new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    signer = LocalSigner(cert=builder.sign(key, _algorithm(key)), key=key)
    return signer


def check_issuer_pair(cert: x509.Certificate, key: PrivateKey, *, now: datetime) -> None:
    """``jitp issuer import``: the key must be the certificate's, which must be a CA valid now."""
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise errors.InvalidRequest("the private key does not belong to the certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise errors.InvalidRequest("the certificate is not a CA certificate (basicConstraints CA:TRUE)")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise errors.InvalidRequest(f"the CA certificate is not valid now (until {cert.not_valid_after_utc})")


# -- certificate signing requests --------------------------------------------------------------
def parse_csr(pem: str) -> x509.CertificateSigningRequest:
    """The CSR, its proof of possession verified and its key checked; an EnrollmentRejected otherwise."""
    if len(pem) > MAX_CSR_PEM:
        raise errors.InvalidCsr(f"the CSR is over {MAX_CSR_PEM} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("utf-8"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise errors.InvalidCsr(f"not a PEM certificate signing request: {str(exc)[:120]}") from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType) as exc:
        raise errors.InvalidCsr(f"the CSR cannot be read: {str(exc)[:120]}") from None
    if not valid:
        raise errors.CsrSignatureInvalid("the CSR's signature does not verify (no proof of possession)")
    try:
        bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise errors.InvalidCsr(f"the CSR's extensions cannot be read: {str(exc)[:120]}") from None
    if bc is not None and bc.ca:
        raise errors.CaRequested("the CSR asks for a CA certificate (basicConstraints CA:TRUE)")
    _check_key_strength(key, what="the CSR's key", cls=errors.WeakCsrKey)
    return csr


def device_uri(device_id: str) -> str:
    return "urn:jitp:device:" + urllib.parse.quote(device_id, safe="")


MAX_CN = 64  # X.520 ub-common-name, which cryptography counts in UTF-8 bytes


def operational_subject(device_id: str) -> x509.Name:
    """``CN=<device id>``; an id longer than a CN may be (jitp allows 128 characters; a CN 64 bytes of
    UTF-8, so 16 to 64 characters) is carried by the SAN alone, with an empty subject."""
    if len(device_id.encode()) > MAX_CN:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])


def build_operational(
    signer: Signer,
    csr: x509.CertificateSigningRequest,
    *,
    device_id: str,
    validity: timedelta,
    now: datetime,
) -> x509.Certificate:
    """A device's operational certificate: only the CSR's public key is used."""
    ca = signer.certificate
    not_after = min(now + validity, ca.not_valid_after_utc)
    public_key = csr.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(operational_subject(device_id))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(device_id))]),
            critical=len(operational_subject(device_id)) == 0,  # RFC 5280: critical with an empty subject
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    except x509.ExtensionNotFound:
        pass
    return signer.sign_certificate(builder)


def same_public_key(cert: x509.Certificate, csr: x509.CertificateSigningRequest) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == csr.public_key().public_bytes(*fmt)


def build_crl(
    signer: Signer, revoked: Sequence[tuple[int, datetime]], *, now: datetime, next_update: timedelta
) -> x509.CertificateRevocationList:
    """A CRL of ``(serial, revoked_at)`` pairs, valid from ``now`` for ``next_update``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(signer.certificate.subject)
        .last_update(now)
        .next_update(now + next_update)
    )
    for serial, at in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
        )
    return signer.sign_crl(builder)
