"""Issuances per second and CPU per issuance of the CSR path (jitp.app.certificates), in process.

What is measured: CertificateService.handle for N devices, each with its own fresh CSR: JSON parse,
CSR signature check, signing (ECDSA P-256 issuing CA), the registry write (SQLite, synchronous=FULL,
sealed, audited). Not measured: MQTT/TLS transport (see join_storm.py for connect costs). CSRs and the
devices' records are made before the clock starts.

    .venv/bin/python benchmarks/issuance.py [N] [CONCURRENCY]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import CertificateSigningRequestBuilder, Name, NameAttribute
from cryptography.x509.oid import NameOID

import certs
from jitp.app.certificates import CertificateService
from jitp.app.service import PeerCredentials, ProvisioningService
from jitp.config import Config, IssuerConfig
from jitp.crypto.issuer import make_issuing_ca
from jitp.crypto.keys import DEFAULT_ENV, MasterKey
from jitp.domain.audit import AuditDraft
from jitp.registry.factory import make_registry
from jitp.trust import TrustAnchor


def csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = Name([NameAttribute(NameOID.COMMON_NAME, "x")])
    return (
        CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


async def main(n: int, concurrency: int) -> None:
    os.environ.setdefault(DEFAULT_ENV, MasterKey.generate().token())
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        registry = make_registry(Config(data_dir=Path(tmp)))
        await registry.open()
        try:
            at = now
            maker = certs.make_ca("bench manufacturer", key=certs.generate_key("ec"))
            draft = AuditDraft(at=at, action="setup", actor="bench")
            await registry.register_anchor(TrustAnchor.from_certificate(maker.cert), audit=draft)
            issuer = make_issuing_ca(key_type="ec", validity=timedelta(days=365), now=now)
            await registry.store_issuer(
                TrustAnchor.from_certificate(issuer.cert), issuer.key_der(), audit=draft
            )
            service = ProvisioningService(registry)
            await service.refresh_trust()
            certificates = CertificateService(service, IssuerConfig(rate=0))
            admissions = []
            for i in range(n):
                device_id = f"bench-{i:05d}"
                leaf = certs.make_leaf(device_id, certs.generate_key("ec").public_key(), issuer=maker)
                der = leaf.public_bytes(serialization.Encoding.DER)
                admissions.append(await service.admit(PeerCredentials((der,), device_id)))
            payloads = [json.dumps({"request_id": "r", "csr": csr_pem()}).encode() for _ in range(n)]
            semaphore = asyncio.Semaphore(concurrency)

            async def one(i: int) -> bool:
                async with semaphore:
                    topic = f"$jitp/certificates/{admissions[i].client_id}/create-from-csr"
                    answer = await certificates.handle(admissions[i], topic, payloads[i], allowed=True)
                    return answer.accepted

            cpu0, wall0 = time.process_time(), time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(n)))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            assert all(results), "a request was rejected"
            print(
                f"{n} issuances, concurrency {concurrency}: {n / wall:.0f} issuances/s, "
                f"{cpu / n * 1000:.2f} ms CPU per issuance ({wall:.2f} s wall, {cpu:.2f} s CPU)"
            )
        finally:
            await registry.close()


if __name__ == "__main__":
    asyncio.run(
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 500, int(sys.argv[2]) if len(sys.argv) > 2 else 50)
    )
