"""Operational certificates over MQTT: ``$jitp/certificates/<device_id>/create-from-csr``.

A connected device publishes ``{"request_id": "...", "csr": "<PEM>"}``; the answer goes to
``$jitp/certificates/<device_id>/accepted`` (``request_id, certificate_pem, chain_pem,
certificate_id, not_after``) or ``.../rejected`` (``request_id, reason, message``, a stable reason:
see :class:`~jitp.errors.EnrollmentRejected`). Nothing is issued for a rejected request. The new
certificate is *pending* until the device connects with it (:meth:`ProvisioningService.admit`
commits it), or until ``issuer.commit_window`` passes. The same ``request_id`` returns the same
pending certificate (an answer lost on the way is asked for again, never minted twice).

It never imports amqtt: the broker hands over (admission, topic, payload) and routes the answer.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from jitp import errors
from jitp.app.admission import KeyedBuckets, Monotonic
from jitp.app.service import Admission, ProvisioningService
from jitp.config import IssuerConfig
from jitp.crypto.issuer import (
    Signer,
    build_crl,
    build_operational,
    load_signer,
    parse_csr,
    parse_duration,
    same_public_key,
)
from jitp.domain.audit import AuditDraft
from jitp.domain.certificates import CertState, OperationalCertificate, answer_topic, request_topic
from jitp.domain.records import DeviceRecord, DeviceStatus, ReprovisionPolicy
from jitp.trust import Role, fingerprint_der

log = logging.getLogger("jitp.certificates")

MAX_REQUEST_ID = 128
SignerFactory = Callable[[bytes, bytes], Signer]


@dataclass(frozen=True)
class Answer:
    """What the broker publishes (QoS 1) in reply to one request."""

    topic: str
    payload: bytes
    reason: str | None  # None: accepted

    @property
    def accepted(self) -> bool:
        return self.reason is None


class CertificateService:
    """Signs device CSRs with the active issuing CA (behind a :class:`Signer`)."""

    def __init__(
        self,
        service: ProvisioningService,
        config: IssuerConfig,
        *,
        signer_factory: SignerFactory = load_signer,
        monotonic: Monotonic = time.monotonic,
    ) -> None:
        self.service = service
        self.config = config
        self.validity = parse_duration(config.validity, what="issuer.validity")
        self.commit_window = timedelta(seconds=config.commit_window)
        self.rates = KeyedBuckets(config.rate, config.burst, clock=monotonic)
        self._signer_factory = signer_factory
        self._signer: tuple[bytes, Signer] | None = None  # by the CA certificate's DER
        self._audited_floods: dict[str, float] = {}
        self._monotonic = monotonic

    async def signer(self) -> Signer:
        """The active issuer's signer (IssuerMissing without one); rebuilt when the issuer changes."""
        found = await self.service.registry.issuer()
        if found is None:
            raise errors.IssuerMissing("no issuing CA is configured (jitp issuer init)")
        cert_der, key_der = found
        if self._signer is None or self._signer[0] != cert_der:
            self._signer = (cert_der, self._signer_factory(cert_der, key_der))
        return self._signer[1]

    # -- one request -------------------------------------------------------------------------
    async def handle(
        self,
        admission: Admission,
        topic: str,
        payload: bytes,
        *,
        allowed: bool,
        peer: str | None = None,
        size: int | None = None,
    ) -> Answer:
        """Answer one request from ``admission``'s device; ``allowed``: the topic ACL let it publish;
        ``peer``: its address, for the audit trail; ``size``: the request's size when the broker
        discarded its body unread (a request over ``limits.max_packet_size``), else ``len(payload)``."""
        claim = admission.role is Role.CLAIM
        # Whose topics: the device's, or for a claim connection its client id's.
        device_id = admission.record.device_id if admission.record is not None else admission.client_id
        size = len(payload) if size is None else size
        # Echoed in every answer it can be read from, so that the device can match even a rejection.
        request_id = _peek_request_id(payload) if size <= self.config.max_request_bytes else None
        now = self.service.clock()
        try:
            if not allowed or topic != request_topic(device_id):
                raise errors.ForbiddenTopic(
                    f"a device may only send requests to {request_topic(device_id)}", detail=topic[:160]
                )
            if size > self.config.max_request_bytes:
                raise errors.PayloadTooLarge(
                    f"request of {size} bytes is over the limit of {self.config.max_request_bytes}"
                )
            bucket = f"claim:{device_id}" if claim else device_id
            if not self.rates.unlimited and not self.rates.bucket(bucket).take():
                raise errors.RateLimited(
                    f"over issuer.rate ({self.config.rate:g}/s, burst {self.config.burst}); retry later"
                )
            request_id, csr_pem, doc = _parse(payload)
            if claim:
                cert, issued = await self._claim(admission, request_id, csr_pem, doc, now=now, peer=peer)
            else:
                cert, issued = await self._issue(device_id, request_id, csr_pem, now=now, peer=peer)
        except (errors.EnrollmentRejected, errors.Unavailable) as exc:
            # A claim's rejection is about no device, except a conflict: that device's trail shows it.
            about = str(exc.fields.get("device_id") or "") or None if claim else device_id
            await self._audit_rejection(
                about, exc, request_id=request_id, now=now, peer=peer, client_id=device_id if claim else None
            )
            body = {"request_id": request_id, "reason": exc.reason, "message": exc.message}
            return Answer(answer_topic(device_id, accepted=False), _json(body), exc.reason)
        signer = await self.signer()
        body = {
            "request_id": request_id,
            "certificate_pem": x509.load_der_x509_certificate(cert.cert_der)
            .public_bytes(Encoding.PEM)
            .decode(),
            "chain_pem": signer.certificate.public_bytes(Encoding.PEM).decode(),
            "certificate_id": cert.certificate_id,
            "not_after": cert.not_after.isoformat(),
            "renew_after": cert.renew_after.isoformat(),
            "commit_by": cert.commit_by.isoformat(),
        }
        if claim:
            body["device_id"] = cert.device_id  # the id to connect with (client id and certificate)
        log.info(
            "%s certificate %s for %s", "issued" if issued else "re-sent", cert.certificate_id, device_id
        )
        return Answer(answer_topic(device_id, accepted=True), _json(body), None)

    async def _issue(
        self, device_id: str, request_id: str, csr_pem: str, *, now: datetime, peer: str | None
    ) -> tuple[OperationalCertificate, bool]:
        signer = await self.signer()
        ca = signer.certificate
        if now >= ca.not_valid_after_utc:
            raise errors.IssuerExpired(f"the issuing CA expired at {ca.not_valid_after_utc.isoformat()}")
        csr = parse_csr(csr_pem)
        for known in await self.service.registry.device_certificates(device_id):
            if known.request_id != request_id:
                continue
            cert = x509.load_der_x509_certificate(known.cert_der)
            if not same_public_key(cert, csr):
                raise errors.RequestIdConflict("this request_id was used with another key; use a new one")
            if known.effective_state(now) in (CertState.PENDING, CertState.CURRENT):
                return known, False
            raise errors.RequestIdConflict(
                f"the certificate of this request_id is {known.effective_state(now)}"
            )
        op = self._new_certificate(signer, csr, device_id, request_id, now=now)
        stored, issued = await self.service.registry.add_certificate(
            op, audit=_requested(op, actor="device", peer=peer)
        )
        if issued:
            return stored, True
        if not same_public_key(x509.load_der_x509_certificate(stored.cert_der), csr):
            raise errors.RequestIdConflict("this request_id was used with another key; use a new one")
        return stored, False

    async def _claim(
        self,
        admission: Admission,
        request_id: str,
        csr_pem: str,
        doc: dict[str, Any],
        *,
        now: datetime,
        peer: str | None,
    ) -> tuple[OperationalCertificate, bool]:
        """A claim certificate's request: the CA's template turns ``parameters`` into a device id and
        attributes. A new id: the record and its first certificate (pending) are written together.
        A known id: refused (identity_conflict) unless the template's reprovision policy allows it or
        the claim comes from the key the device was claimed with (the same device asking again)."""
        try:
            template = self.service.templates.get(admission.template)
        except errors.TemplateNotFound as exc:
            raise errors.InvalidParameters(f"the claim CA's {exc.message}") from None
        device_id, region, attributes, config = template.render_claim(
            doc.get("parameters"), ca_id=admission.ca_id or "", default_region=self.service.default_region
        )
        signer = await self.signer()
        if now >= signer.certificate.not_valid_after_utc:
            raise errors.IssuerExpired(
                f"the issuing CA expired at {signer.certificate.not_valid_after_utc.isoformat()}"
            )
        csr = parse_csr(csr_pem)
        existing = await self.service.registry.get_device(device_id)
        if existing is not None:
            if template.reprovision is ReprovisionPolicy.REJECT and not await self._claimed_with(
                existing, csr
            ):
                raise errors.ClaimConflict(
                    f"device {device_id!r} exists; a claim cannot take it over "
                    f"(template {template.name!r}: reprovision {template.reprovision})",
                    device_id=device_id,
                )
            return await self._issue(device_id, request_id, csr_pem, now=now, peer=peer)
        # A new device is a first join of the claim CA: its per-CA and per-region rates (admission:
        # per_ca_rate, per_region_rate) and a pause of its CA (a spike alert) apply as to any.
        ca_id = admission.ca_id or ""
        if ca_id in self.service.paused_cas:
            raise errors.Overloaded(
                f"first joins of CA {ca_id[:16]} are paused ({self.service.paused_cas[ca_id]})",
                scope=f"ca:{ca_id}",
            )
        refusal = self.service.rates.take(ca_id, region)
        if refusal is not None:
            raise errors.Overloaded(
                f"first joins of {refusal.scope} over their rate; retry in {refusal.retry_after:.1f} s",
                scope=refusal.scope,
                retry_after=refusal.retry_after,
            )
        op = self._new_certificate(signer, csr, device_id, request_id, now=now)
        leaf = x509.load_der_x509_certificate(op.cert_der)
        record = DeviceRecord(
            device_id=device_id,
            status=DeviceStatus.ACTIVE,
            cert_fingerprint=op.fingerprint,
            ca_id=admission.ca_id or "",
            region=region,
            serial=format(op.serial, "x"),
            subject=leaf.subject.rfc4514_string(),
            not_after=op.not_after,
            provisioned_at=now,
            last_seen=None,
            attributes=MappingProxyType(attributes),
            template=template.name,
            template_version=template.version,
            config=MappingProxyType(config),
        )
        extra = {"claim_ca": (admission.ca_id or "")[:16], "claim_client_id": admission.client_id[:80]}
        draft = _requested(op, actor="claim", peer=peer, **extra)
        if not await self.service.registry.claim_device(record, op, audit=draft):
            raise errors.ClaimConflict(
                f"device {device_id!r} was created meanwhile; a claim cannot take it over",
                device_id=device_id,
            )
        log.info("claimed device %s (template %s) by %s", device_id, template.name, admission.client_id)
        return op, True

    async def _claimed_with(self, record: DeviceRecord, csr: x509.CertificateSigningRequest) -> bool:
        """Was ``record`` claimed with this CSR's key (a pending or current certificate of the key it
        was created for)? Then a repeated claim is the same device, which lost its answer."""
        for known in await self.service.registry.device_certificates(record.device_id):
            if known.fingerprint == record.cert_fingerprint:
                return same_public_key(x509.load_der_x509_certificate(known.cert_der), csr)
        return False

    def _new_certificate(
        self,
        signer: Signer,
        csr: x509.CertificateSigningRequest,
        device_id: str,
        request_id: str,
        *,
        now: datetime,
    ) -> OperationalCertificate:
        ca = signer.certificate
        cert = build_operational(signer, csr, device_id=device_id, validity=self.validity, now=now)
        der = cert.public_bytes(Encoding.DER)
        return OperationalCertificate(
            certificate_id=uuid.uuid4().hex,
            device_id=device_id,
            request_id=request_id,
            issuer_id=fingerprint_der(ca.public_bytes(Encoding.DER)),
            fingerprint=fingerprint_der(der),
            serial=cert.serial_number,
            state=CertState.PENDING,
            issued_at=now,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            commit_by=now + self.commit_window,
            changed_at=None,
            cert_der=der,
        )

    async def _audit_rejection(
        self,
        device_id: str | None,
        exc: errors.EnrollmentRejected | errors.Unavailable,
        *,
        request_id: str | None,
        now: datetime,
        peer: str | None,
        client_id: str | None = None,
    ) -> None:
        """Every rejection is audited; a flood (rate_limited) at most once a second per device (per
        client id for a claim connection, ``client_id``)."""
        if isinstance(exc, errors.RateLimited):
            flooder = device_id or f"claim:{client_id}"
            last = self._audited_floods.get(flooder)
            tick = self._monotonic()
            if last is not None and tick - last < 1.0:
                return
            if len(self._audited_floods) > 10_000:
                self._audited_floods.clear()
            self._audited_floods[flooder] = tick
        details = {"message": exc.message[:200]}
        if request_id is not None:
            details["request_id"] = request_id[:MAX_REQUEST_ID]
        if client_id is not None:
            details["claim_client_id"] = client_id[:80]
        log.warning(
            "certificate request of %s rejected: %s (%s)", device_id or client_id, exc.reason, exc.message
        )
        try:
            await self.service.registry.append_audit(
                [
                    AuditDraft(
                        at=now,
                        action="certificate-rejected",
                        actor="claim" if client_id is not None else "device",
                        device_id=device_id,
                        reason=exc.reason,
                        peer=peer,
                        details=MappingProxyType(details),
                    )
                ]
            )
        except errors.ProvisioningError as audit_exc:
            log.error("could not audit a rejected certificate request: %s", audit_exc)

    # -- operator views ----------------------------------------------------------------------
    async def crl(self, *, now: datetime) -> x509.CertificateRevocationList:
        """A signed CRL of every certificate the active issuer revoked."""
        signer = await self.signer()
        issuer_id = fingerprint_der(signer.certificate.public_bytes(Encoding.DER))
        revoked = await self.service.registry.revoked_serials(issuer_id)
        return build_crl(signer, revoked, now=now, next_update=parse_duration(self.config.crl_validity))


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _peek_request_id(payload: bytes) -> str | None:
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    value = doc.get("request_id") if isinstance(doc, dict) else None
    if isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID and value.isprintable():
        return value
    return None


def _requested(op: OperationalCertificate, *, actor: str, peer: str | None, **extra: str) -> AuditDraft:
    """The audit entry of a newly issued (pending) certificate."""
    details = {
        "certificate_id": op.certificate_id,
        "request_id": op.request_id[:MAX_REQUEST_ID],
        "commit_by": op.commit_by.isoformat(),
        "not_after": op.not_after.isoformat(),
        **extra,
    }
    return AuditDraft(
        at=op.issued_at,
        action="certificate-requested",
        actor=actor,
        device_id=op.device_id,
        fingerprint=op.fingerprint,
        peer=peer,
        details=MappingProxyType(details),
    )


def _parse(payload: bytes) -> tuple[str, str, dict[str, Any]]:
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise errors.InvalidJson(f"the request is not UTF-8 JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise errors.InvalidJson("the request must be a JSON object")
    for name in ("request_id", "csr"):
        if name not in doc:
            raise errors.MissingField(f"the request has no {name!r}")
        if not isinstance(doc[name], str) or not doc[name]:
            raise errors.MissingField(f"{name!r} must be a non-empty string")
    request_id = str(doc["request_id"])
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise errors.MissingField(f"'request_id' must be at most {MAX_REQUEST_ID} printable characters")
    return request_id, str(doc["csr"]), doc
