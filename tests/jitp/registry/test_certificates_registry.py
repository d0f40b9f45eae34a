"""Operational certificates on both registry backends (SQLite, PostgreSQL): the lost answer, the
crash before commit, the commit window, revocation into the issuer's CRL and erasure.

The service and the registry are real, the certificates are real (``cryptography``); the broker is
not needed: admission is called with the chain a TLS handshake would have verified.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import certs
from jitp import errors
from jitp.app.certificates import CertificateService
from jitp.app.service import Admission, PeerCredentials, ProvisioningService
from jitp.config import IssuerConfig
from jitp.crypto.issuer import make_issuing_ca
from jitp.domain.acl import Access, enrollment_namespace
from jitp.domain.audit import AuditDraft
from jitp.domain.certificates import BirthPolicy, CertState
from jitp.domain.records import Command, EventType
from jitp.domain.templates import DEFAULT_TEMPLATE, TemplateSet
from jitp.registry import Registry
from jitp.trust import TrustAnchor
from tests.certflow import make_csr, new_key
from tests.jitp.registry.test_registry_contract import Backend, run
from tests.jitp.registry.test_registry_contract import backend as backend  # (a fixture)
from tests.jitp.registry.test_registry_contract import pg_dsn as pg_dsn  # (a fixture)

NOW = datetime.now(UTC).replace(microsecond=0)


class Clock:
    def __init__(self) -> None:
        # The test's own start, not the module's import: a birth certificate made during the test
        # is valid from about now, and a long suite may reach this test minutes after collection.
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


async def _setup(registry: Registry, clock: Clock) -> tuple[ProvisioningService, CertificateService]:
    service = ProvisioningService(registry, clock=clock)
    return service, CertificateService(service, IssuerConfig(validity="30d", commit_window=3600, rate=0))


MANUFACTURER = certs.make_ca("test manufacturer", key=certs.generate_key("ec"))
ISSUER = make_issuing_ca(key_type="ec", validity=timedelta(days=365), now=NOW)


async def _anchors(registry: Registry) -> None:
    at = datetime.now(UTC)
    await registry.register_anchor(
        TrustAnchor.from_certificate(MANUFACTURER.cert),
        audit=AuditDraft(at=at, action="ca-registered", actor="t"),
    )
    anchor = TrustAnchor.from_certificate(ISSUER.cert, now=NOW)
    await registry.store_issuer(
        anchor, ISSUER.key_der(), audit=AuditDraft(at=at, action="issuer-created", actor="t")
    )


def _birth(device_id: str) -> bytes:
    cert = certs.make_leaf(device_id, certs.generate_key("ec").public_key(), issuer=MANUFACTURER)
    return cert.public_bytes(Encoding.DER)


async def _admit(service: ProvisioningService, der: bytes, device_id: str) -> Admission:
    await service.refresh_trust()
    return await service.admit(PeerCredentials(chain_der=(der,), client_id=device_id, address="127.0.0.1:1"))


async def _request(
    certs_: CertificateService, admission: Admission, device_id: str, request_id: str, key: Any
) -> dict[str, Any]:
    payload = json.dumps({"request_id": request_id, "csr": make_csr(key)}).encode()
    answer = await certs_.handle(
        admission, f"$jitp/certificates/{device_id}/create-from-csr", payload, allowed=True
    )
    doc: dict[str, Any] = json.loads(answer.payload)
    assert answer.accepted, doc
    return doc


def _der(doc: dict[str, Any]) -> bytes:
    return x509.load_pem_x509_certificate(doc["certificate_pem"].encode()).public_bytes(Encoding.DER)


def test_lost_answer_then_crash_before_commit_then_commit(backend: Backend) -> None:
    clock = Clock()
    key = new_key()
    birth = _birth("dev-lost")

    async def enroll(registry: Registry) -> dict[str, Any]:
        await _anchors(registry)
        service, issuer = await _setup(registry, clock)
        admission = await _admit(service, birth, "dev-lost")
        first = await _request(issuer, admission, "dev-lost", "req-1", key)
        again = await _request(issuer, admission, "dev-lost", "req-1", key)  # the answer was lost
        assert again["certificate_id"] == first["certificate_id"]
        assert again["certificate_pem"] == first["certificate_pem"]
        [pending] = await registry.device_certificates("dev-lost")
        assert pending.state is CertState.PENDING
        return first

    doc = run(backend, enroll)  # ... and the broker crashes before the device reconnects

    async def after_restart(registry: Registry) -> None:
        service, _ = await _setup(registry, clock)
        [pending] = await registry.device_certificates("dev-lost")
        assert pending.state is CertState.PENDING and pending.certificate_id == doc["certificate_id"]
        # The device never lost its old certificate: it still connects with it.
        assert (await _admit(service, birth, "dev-lost")).record is not None
        clock.now += timedelta(minutes=30)  # within the commit window
        admitted = await _admit(service, _der(doc), "dev-lost")
        assert admitted.reprovisioned and admitted.record is not None
        assert admitted.record.config["certificate"]["not_after"] == doc["not_after"]
        [event] = [e for e in await registry.events("dev-lost") if e.type is EventType.CERTIFICATE_ISSUED]
        body = event.document()
        assert body["new_fingerprint"] == certs.fingerprint(x509.load_der_x509_certificate(_der(doc)))
        # A second connect with it is a plain reconnect: no second event.
        await _admit(service, _der(doc), "dev-lost")
        kinds = [e.type for e in await registry.events("dev-lost")]
        assert kinds.count(EventType.CERTIFICATE_ISSUED) == 1

    run(backend, after_restart)


def test_a_pending_certificate_expires_after_the_commit_window(backend: Backend) -> None:
    clock = Clock()
    birth = _birth("dev-late")

    async def body(registry: Registry) -> None:
        await _anchors(registry)
        service, issuer = await _setup(registry, clock)
        admission = await _admit(service, birth, "dev-late")
        doc = await _request(issuer, admission, "dev-late", "r", new_key())
        clock.now += timedelta(hours=2)  # the device crashed and came back late
        with pytest.raises(errors.PendingExpired):
            await _admit(service, _der(doc), "dev-late")
        [expired] = await registry.expire_certificates(at=clock.now)
        assert expired.certificate_id == doc["certificate_id"]
        assert (await registry.device_certificates("dev-late"))[0].state is CertState.EXPIRED
        assert (await _admit(service, birth, "dev-late")).record is not None  # never locked out
        actions = [e.draft.action for e in await registry.resolve_audit(await registry.audit_entries())]
        assert "certificate-expired" in actions
        reasons = [e.draft.reason for e in await registry.resolve_audit(await registry.audit_entries())]
        assert "pending_expired" in reasons
        # Its request id is spent: asked again, it is rejected, not re-issued.
        payload = json.dumps({"request_id": "r", "csr": make_csr(new_key())}).encode()
        answer = await issuer.handle(
            admission, "$jitp/certificates/dev-late/create-from-csr", payload, allowed=True
        )
        assert answer.reason == "request_id_conflict"

    run(backend, body)


def test_revoke_lists_operational_certificates_in_the_crl_and_erase_deletes_them(backend: Backend) -> None:
    clock = Clock()
    birth = _birth("dev-gone")

    async def body(registry: Registry) -> None:
        await _anchors(registry)
        service, issuer = await _setup(registry, clock)
        admission = await _admit(service, birth, "dev-gone")
        doc = await _request(issuer, admission, "dev-gone", "r", new_key())
        await _admit(service, _der(doc), "dev-gone")  # committed
        serial = x509.load_der_x509_certificate(_der(doc)).serial_number
        assert len(await issuer.crl(now=clock.now)) == 0
        await service.apply(Command.REVOKE, "dev-gone", actor="op")
        crl = await issuer.crl(now=clock.now)
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert crl.is_signature_valid(ISSUER.cert.public_key())  # type: ignore[arg-type]
        with pytest.raises(errors.Refused):
            await _admit(service, _der(doc), "dev-gone")
        await service.erase(device_id="dev-gone", actor="op")
        assert await registry.device_certificates("dev-gone") == []
        fp = certs.fingerprint(x509.load_der_x509_certificate(_der(doc)))
        assert await registry.certificate_by_fingerprint(fp) is None
        assert await registry.is_erased(fp)  # tombstoned like the birth certificate
        crl = await issuer.crl(now=clock.now)
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None  # still listed

    run(backend, body)


@pytest.mark.parametrize("policy", [BirthPolicy.KEEP, BirthPolicy.ENROLL_ONLY, BirthPolicy.RETIRE])
def test_birth_certificate_policy_after_enrollment(backend: Backend, policy: BirthPolicy) -> None:
    clock = Clock()
    birth = _birth("dev-birth")
    templates = TemplateSet({"default": dataclasses.replace(DEFAULT_TEMPLATE, birth_certificate=policy)})

    async def body(registry: Registry) -> None:
        await _anchors(registry)
        service = ProvisioningService(registry, clock=clock, templates=templates)
        issuer = CertificateService(service, IssuerConfig(rate=0))
        before = await _admit(service, birth, "dev-birth")
        assert not before.enroll_only  # nothing enrolled yet: the birth certificate is all it has
        doc = await _request(issuer, before, "dev-birth", "r", new_key())
        assert not (await _admit(service, birth, "dev-birth")).enroll_only  # pending only: unchanged
        await _admit(service, _der(doc), "dev-birth")  # committed
        if policy is BirthPolicy.RETIRE:
            with pytest.raises(errors.BirthCertificateRetired):
                await _admit(service, birth, "dev-birth")
            return
        after = await _admit(service, birth, "dev-birth")
        assert after.enroll_only is (policy is BirthPolicy.ENROLL_ONLY)
        assert after.record is not None
        ns = enrollment_namespace("dev-birth") if after.enroll_only else None
        if ns is not None:  # re-enrollment only: its certificate topics, no telemetry
            assert ns.allows(Access.PUBLISH, "$jitp/certificates/dev-birth/create-from-csr")
            assert ns.allows(Access.SUBSCRIBE, "$jitp/certificates/dev-birth/#")
            assert not ns.allows(Access.PUBLISH, "devices/dev-birth/telemetry")
            assert not ns.allows(Access.SUBSCRIBE, "$jitp/certificates/other/#")

    run(backend, body)


def test_template_file_reads_birth_certificate(tmp_path: Path) -> None:
    (tmp_path / "meter.yaml").write_text("name: meter\nbirth_certificate: enroll_only\n")
    assert TemplateSet.load(tmp_path).get("meter").birth_certificate is BirthPolicy.ENROLL_ONLY
    (tmp_path / "meter.yaml").write_text("name: meter\nbirth_certificate: sometimes\n")
    with pytest.raises(errors.ConfigError, match="keep, enroll_only or retire"):
        TemplateSet.load(tmp_path)


CLAIM_CA = certs.make_ca("test claim CA", key=certs.generate_key("ec"))
CLAIM_TEMPLATE = "claim:\n  parameters:\n    serial: {regex: '[0-9]{6}'}\n  device_id: 'claimed-{serial}'\nreprovision: reject\n"


def test_a_claim_writes_the_device_and_its_pending_certificate_then_provisions_at_commit(
    backend: Backend, tmp_path: Path
) -> None:
    """On both backends: the claim's record and certificate in one transaction; a second claim of the
    id (another key) is identity_conflict and writes nothing; a restart before the commit loses
    nothing; the commit publishes provisioned (not certificate-issued), once."""
    from jitp.domain.templates import load_template
    from jitp.trust import Role

    (tmp_path / "factory.yaml").write_text(CLAIM_TEMPLATE)
    templates = TemplateSet({"factory": load_template(tmp_path / "factory.yaml")})
    clock = Clock()
    key = new_key()
    batch = certs.make_leaf("batch", certs.generate_key("ec").public_key(), issuer=CLAIM_CA)
    batch_der = batch.public_bytes(Encoding.DER)

    async def claim(
        certs_: CertificateService, service: ProvisioningService, client: str, k: Any
    ) -> dict[str, Any]:
        await service.refresh_trust()
        admission = await service.admit(PeerCredentials(chain_der=(batch_der,), client_id=client))
        assert admission.role is Role.CLAIM and admission.record is None
        payload = json.dumps({"request_id": "c", "csr": make_csr(k), "parameters": {"serial": "000042"}})
        answer = await certs_.handle(
            admission, f"$jitp/certificates/{client}/create-from-csr", payload.encode(), allowed=True
        )
        doc: dict[str, Any] = json.loads(answer.payload)
        return doc

    async def first(registry: Registry) -> dict[str, Any]:
        await _anchors(registry)
        await registry.register_anchor(
            TrustAnchor.from_certificate(CLAIM_CA.cert, role=Role.CLAIM, template="factory"),
            audit=AuditDraft(at=NOW, action="ca-registered", actor="t"),
        )
        service, issuer = await _setup(registry, clock)
        service.templates = templates
        doc = await claim(issuer, service, "boot-1", key)
        assert doc["device_id"] == "claimed-000042", doc
        record = await registry.get_device("claimed-000042")
        assert record is not None and dict(record.attributes) == {"serial": "000042"}
        conflict = await claim(issuer, service, "boot-2", new_key())
        assert conflict["reason"] == "identity_conflict", conflict
        [pending] = await registry.device_certificates("claimed-000042")
        assert pending.state is CertState.PENDING and pending.certificate_id == doc["certificate_id"]
        assert await registry.events("claimed-000042") == []
        return doc

    doc = run(backend, first)  # the broker restarts before the device reconnects

    async def commit(registry: Registry) -> None:
        service, _ = await _setup(registry, clock)
        service.templates = templates
        await service.refresh_trust()
        admitted = await service.admit(PeerCredentials(chain_der=(_der(doc),), client_id="claimed-000042"))
        assert admitted.created and not admitted.reprovisioned
        await service.admit(PeerCredentials(chain_der=(_der(doc),), client_id="claimed-000042"))
        kinds = [e.type for e in await registry.events("claimed-000042")]
        assert kinds == [EventType.PROVISIONED]
        [current] = await registry.device_certificates("claimed-000042")
        assert current.state is CertState.CURRENT

    run(backend, commit)
