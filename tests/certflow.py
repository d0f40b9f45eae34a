"""Test helpers for operational certificates: an issuing CA in a running broker, a device's CSRs
(made the way a TPM or secure element would: only the public key and a signature leave the device),
and the request/answer over a real paho connection."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import certs
from jitp.crypto.issuer import LocalSigner, make_issuing_ca
from jitp.domain.audit import AuditDraft
from jitp.trust import Role, TrustAnchor
from tests.helpers import BrokerThread, Conn, Identity, Pki, wait_until


def init_issuer(
    broker: BrokerThread, *, validity: timedelta = timedelta(days=365), now: datetime | None = None
) -> LocalSigner:
    """``jitp issuer init`` against the broker's registry (now: make it at another time)."""
    at = now or datetime.now(UTC)
    signer = make_issuing_ca(key_type="ec", validity=validity, now=at)
    anchor = TrustAnchor.from_certificate(signer.cert, role=Role.DEVICE, now=at)

    async def go() -> None:
        registry = broker.server.service.registry
        draft = AuditDraft(at=datetime.now(UTC), action="issuer-created", actor="test")
        await registry.store_issuer(anchor, signer.key_der(), audit=draft)
        await broker.server.service.refresh_trust()

    broker.call(go())
    return signer


def new_key(kind: str = "ec") -> Any:
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: Any,
    *,
    cn: str = "anything-the-device-says",
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> str:
    """A PEM CSR for ``key``, with a subject and extensions the broker must ignore (never copy)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for ext, critical in extensions or []:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def corrupt_signature(csr_pem: str) -> str:
    """The same CSR with the last bit of its signature flipped: it parses, but proves nothing."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    body = base64.b64encode(bytes(der)).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE REQUEST-----\n"
    )


def request(conn: Conn, device_id: str, payload: bytes | dict[str, Any], *, topic: str | None = None) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    info = conn.client.publish(topic or f"$jitp/certificates/{device_id}/create-from-csr", data, qos=1)
    info.wait_for_publish(5)


def answers(conn: Conn, device_id: str) -> list[tuple[str, dict[str, Any]]]:
    prefix = f"$jitp/certificates/{device_id}/"
    return [
        (m.topic.removeprefix(prefix), json.loads(m.payload))
        for m in list(conn.messages)
        if m.topic.startswith(prefix)
    ]


def answer_for(
    conn: Conn, device_id: str, request_id: str | None, *, index: int = 0, timeout: float = 10
) -> tuple[str, dict[str, Any]]:
    """The ``index``-th answer to ``request_id`` (None: answers without a readable request id)."""

    def found() -> list[tuple[str, dict[str, Any]]]:
        return [a for a in answers(conn, device_id) if a[1].get("request_id") == request_id]

    assert wait_until(lambda: len(found()) > index, timeout), (
        f"no answer to {request_id!r}: {answers(conn, device_id)}"
    )
    return found()[index]


@dataclass(frozen=True)
class Issued:
    identity: Identity
    answer: dict[str, Any]
    cert: x509.Certificate


def save_identity(pki: Pki, name: str, cert_pem: str, key: Any) -> Identity:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    base = pki.dir / "op" / f"{name}-{certs.fingerprint(cert)[:12]}"
    certs.write_certs(base.with_suffix(".pem"), [cert])
    certs.write_key(base.with_suffix(".key"), key)
    return Identity(
        name=name, cert_path=base.with_suffix(".pem"), key_path=base.with_suffix(".key"), cert=cert
    )


def enroll(pki: Pki, conn: Conn, device_id: str, request_id: str, key: Any | None = None) -> Issued:
    """Send a CSR for a new key (or ``key``) and wait for the accepted answer."""
    key = key or new_key()
    request(conn, device_id, {"request_id": request_id, "csr": make_csr(key)})
    kind, doc = answer_for(conn, device_id, request_id)
    assert kind == "accepted", doc
    ident = save_identity(pki, device_id, doc["certificate_pem"], key)
    return Issued(ident, doc, ident.cert)
