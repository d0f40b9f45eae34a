"""Certificates for the broker-less core tests: a small PKI built once per process, in memory.

Layout: ``ROOT`` (self-signed) -> ``MANUFACTURER`` (intermediate, devices) and ``SERVICE_CA``
(intermediate, backend services); ``ROGUE`` is an unrelated self-signed CA.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

import certs
from jitp.trust import Role, TrustAnchor, TrustStore, VerifiedChain

NOW = datetime.now(UTC)

ROOT = certs.make_ca("jitp test root CA", key=certs.generate_key("ec"))
MANUFACTURER = certs.make_ca(
    "jitp test manufacturer CA", key=certs.generate_key("ec"), issuer=ROOT, path_length=0
)
SERVICE_CA = certs.make_ca("jitp test service CA", key=certs.generate_key("ec"), issuer=ROOT, path_length=0)
ROGUE = certs.make_ca("rogue CA", key=certs.generate_key("ec"))

# One leaf key for every test certificate: keys are not what these tests are about.
LEAF_KEY = certs.generate_key("ec")

ROOT_ANCHOR = TrustAnchor.from_certificate(ROOT.cert)
MANUFACTURER_ANCHOR = TrustAnchor.from_certificate(MANUFACTURER.cert, region="eu-west")
SERVICE_ANCHOR = TrustAnchor.from_certificate(SERVICE_CA.cert, role=Role.SERVICE)

STORE = TrustStore.of([MANUFACTURER_ANCHOR, SERVICE_ANCHOR])


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def leaf(
    subject: str | x509.Name, *, issuer: certs.Issuer = MANUFACTURER, key: Any = None, **kw: Any
) -> x509.Certificate:
    """A client certificate (EC key, digitalSignature, clientAuth unless overridden)."""
    public_key = (key or LEAF_KEY).public_key()
    return certs.make_leaf(subject, public_key, issuer=issuer, now=NOW, **kw)


def chain_of(cert: x509.Certificate, issuer: certs.Issuer = MANUFACTURER) -> list[bytes]:
    """Leaf, its issuer and the issuer's chain (root excluded), as DER: what a TLS client sends."""
    return [der(c) for c in (cert, issuer.cert, *issuer.chain)]


def verify(chain_der: Sequence[bytes], store: TrustStore = STORE) -> VerifiedChain:
    return store.verify(chain_der, now=NOW)


def verified_device(subject: str | x509.Name) -> VerifiedChain:
    """A device certificate with ``subject`` from the manufacturer CA, verified against ``STORE``."""
    return verify([der(leaf(subject))])


def name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """A Name with one RDN per attribute, without cryptography's length validation (and its warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.Name([x509.NameAttribute(oid, value, _validate=False) for oid, value in attributes])


@cache
def rsa_1024_key() -> certs.PrivateKey:
    return certs.generate_key("rsa", rsa_bits=1024)


# -- raw DER surgery: certificates a real CA would never sign, signed anyway ---------------------


def _read_len(data: bytes, i: int) -> tuple[int, int]:
    first = data[i]
    if first < 0x80:
        return first, i + 1
    n = first & 0x7F
    return int.from_bytes(data[i + 1 : i + 1 + n], "big"), i + 1 + n


def _tlv(data: bytes, i: int) -> tuple[bytes, int]:
    length, body = _read_len(data, i + 1)
    return data[i : body + length], body + length


def _encode(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def patch_and_resign(cert: x509.Certificate, issuer: certs.Issuer, old: bytes, new: bytes) -> bytes:
    """``cert`` with ``old`` replaced by ``new`` (same length) in its TBS, re-signed by ``issuer`` (EC)."""
    assert len(old) == len(new)
    data = der(cert)
    _, body = _read_len(data, 1)
    tbs, after_tbs = _tlv(data, body)
    algorithm, _ = _tlv(data, after_tbs)
    assert tbs.count(old) == 1, "the bytes to patch must occur exactly once"
    tbs = tbs.replace(old, new)
    assert isinstance(issuer.key, ec.EllipticCurvePrivateKey)
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _encode(0x30, tbs + algorithm + _encode(0x03, b"\x00" + signature))
