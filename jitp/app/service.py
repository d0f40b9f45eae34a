"""The provisioning service: one entry point, :meth:`ProvisioningService.admit`.

It decides, in a fixed order, whether a verified peer is admitted, and applies the result:

1. verify   - chain to an enabled anchor (cryptography's verifier) plus the explicit leaf policy
2. identity - certificate -> DeviceIdentity (or ServiceIdentity for service anchors); id safety
3. bind     - the MQTT client id must equal the derived id
4. registry - race-free create-if-absent; the event goes to the outbox in the same transaction
5. audit    - one entry per decision (provisioned entries are written with the record)

Admission control (jitp.app.admission) sits in front of step 4: a reconnect whose record is cached is
admitted without a registry round trip (last_seen written behind); other requests take a token
from their CA's and region's bucket and a slot of the bounded worker pool, or get
:class:`~jitp.errors.Overloaded` (CONNACK 3) at once. Unavailable outcomes are audited ("refused").

It never imports amqtt: the broker adapters translate sockets into :class:`PeerCredentials`
and :class:`~jitp.errors.ProvisioningError` subclasses into MQTT outcomes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from jitp import errors
from jitp.app.admission import Gate, JoinRates, Monotonic, RecordCache
from jitp.config import AdmissionConfig
from jitp.domain.audit import AuditDraft
from jitp.domain.certificates import BirthPolicy, CertState
from jitp.domain.events import ProvisioningEvent
from jitp.domain.identity import DEFAULT_REGION, DeviceIdentity, ServiceIdentity, derive_service, id_problem
from jitp.domain.records import ADMITTED, Command, DeviceRecord, EventType, ReprovisionPolicy
from jitp.domain.templates import EnrollmentTemplate, TemplateSet
from jitp.observability.port import JoinOutcome, NullObserver, Observer
from jitp.registry import Erasure, ProvisionOutcome, Registry, StatusChange
from jitp.trust import Role, TrustStore, VerifiedChain, parse_crl

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PeerCredentials:
    """What the transport knows about a connecting client."""

    chain_der: tuple[bytes, ...]  # leaf first, as verified by the TLS layer
    client_id: str
    address: str | None = None  # "host:port", for the audit trail


@dataclass(frozen=True)
class Admission:
    """An admitted client: a device (with its record) or a backend service."""

    role: Role
    client_id: str
    fingerprint: str
    record: DeviceRecord | None = None
    service: ServiceIdentity | None = None
    created: bool = False
    reprovisioned: bool = False
    # A factory certificate under ``birth_certificate: enroll_only`` once enrolled: re-enrollment only.
    enroll_only: bool = False
    # A claim certificate (role claim): the CA that vouched for it and its template (claim section).
    ca_id: str | None = None
    template: str | None = None


MAX_COALESCED_CAUSES = 10_000  # distinct causes (refusals, coalesced events) held open at once
MAX_COALESCED_HOSTS = 64  # distinct peer hosts counted per open window (bounded memory)
# Audited events whose repeats coalesce like refusals: a cloned certificate's two copies taking a
# session from each other many times a second would otherwise write an entry per takeover.
COALESCED_EVENTS = frozenset({"session-takeover"})

CoalesceKey = tuple[str, str, str]  # (action, reason, cause: a certificate, device or peer host)


@dataclass
class _Coalesced:
    draft: AuditDraft  # the entry written for the first occurrence of the window
    window_start: datetime
    last_at: datetime
    last_peer: str | None
    count: int = 0  # occurrences since the first one
    last_details: Mapping[str, str] | None = None  # the last occurrence's, for events
    hosts: set[str] = field(default_factory=set)  # distinct peer hosts, the first one's included

    def summary(self) -> AuditDraft | None:
        """The counted entry for the repeats of this window, or None if there were none."""
        if self.count == 0:
            return None
        details = {
            **dict(self.draft.details),
            **dict(self.last_details or {}),
            "coalesced": "true",
            "count": str(self.count),
            "first_at": self.window_start.isoformat(),
            "last_at": self.last_at.isoformat(),
            "peer_hosts": str(len(self.hosts)),
        }
        return dataclasses.replace(
            self.draft, at=self.last_at, peer=self.last_peer, details=MappingProxyType(details)
        )

    def note_host(self, peer: str | None) -> None:
        host = _host(peer)
        if host is not None and len(self.hosts) < MAX_COALESCED_HOSTS:
            self.hosts.add(host)


def _host(peer: str | None) -> str | None:
    return peer.rsplit(":", 1)[0] if peer else None


class _UnavailableRefusal(errors.Refused):
    """An Unavailable outcome (CONNACK 3) in the shape the refusal audit (and its coalescing) takes."""

    def __init__(self, exc: errors.Unavailable, *, detail: str) -> None:
        super().__init__(exc.message, detail=detail)
        self.reason = exc.reason  # type: ignore[misc]


class ProvisioningService:
    def __init__(
        self,
        registry: Registry,
        *,
        clock: Clock = utc_now,
        default_region: str = DEFAULT_REGION,
        templates: TemplateSet | None = None,
        stale_crl: str = "keep",
        coalesce_window: float = 0.0,
        admission: AdmissionConfig | None = None,
        monotonic: Monotonic = time.monotonic,
        roles: Mapping[str, str] | None = None,
        observer: Observer | None = None,
    ) -> None:
        """``roles``: explicit roles of single certificates (fingerprint -> role), over their CA's.
        ``observer``: told every join outcome, refusal, takeover and commit time (metrics, alerts)."""
        self.registry = registry
        self.observer: Observer = observer or NullObserver()
        self.paused_cas: dict[str, str] = {}  # CA id -> why its first joins are paused (an alert)
        self.roles = {fp: Role(role) for fp, role in (roles or {}).items()}
        self.admission = admission = admission or AdmissionConfig()
        self.gate = Gate(admission.workers, admission.queue_size)
        self.rates = JoinRates(
            per_ca_rate=admission.per_ca_rate,
            per_ca_burst=admission.per_ca_burst,
            per_region_rate=admission.per_region_rate,
            per_region_burst=admission.per_region_burst,
            clock=monotonic,
        )
        self.cache = RecordCache(admission.cache_size, admission.cache_ttl, clock=monotonic)
        self._provisioning: set[asyncio.Task[ProvisionOutcome]] = set()
        self.coalesce_window = coalesce_window
        self._refusals: dict[CoalesceKey, _Coalesced] = {}  # open windows, refusals and events
        self.stale_crl = stale_crl
        self.clock = clock
        self.default_region = default_region
        self.templates = templates or TemplateSet()
        self.trust = TrustStore()
        self._event_waiters: list[Callable[[list[ProvisioningEvent]], None]] = []
        self._trust_listeners: list[Callable[[TrustStore], None]] = []
        self._refresh_lock = asyncio.Lock()
        self.issuer_ids: frozenset[str] = frozenset()  # operational issuing CAs (jitp.app.certificates)

    # -- wiring --------------------------------------------------------------------------
    def on_new_events(self, callback: Callable[[list[ProvisioningEvent]], None]) -> None:
        """Call ``callback`` with the events a committed transaction added to the outbox."""
        self._event_waiters.append(callback)

    def on_trust_change(self, callback: Callable[[TrustStore], None]) -> None:
        self._trust_listeners.append(callback)

    async def refresh_trust(self, *, force: bool = False) -> bool:
        """Reload anchors from the registry if they changed. True if a new snapshot was taken."""
        async with self._refresh_lock:
            version = await self.registry.trust_version()
            if not force and version == self.trust.version:
                return False
            anchors = await self.registry.anchors()
            crls = await self.registry.crls()
            self.issuer_ids = frozenset(await self.registry.issuer_ids())
            self.trust = TrustStore.of(anchors, version=version, crls=crls, stale_crl=self.stale_crl)
            log.info(
                "trust anchors loaded: %d enabled, %d CRL(s) (version %d)",
                len(self.trust.anchors),
                len(crls),
                version,
            )
            self.report_stale_crls()
        for listener in self._trust_listeners:
            listener(self.trust)
        return True

    def report_stale_crls(self) -> list[str]:
        """Log loudly every CRL past its nextUpdate; returns their CA ids."""
        stale = self.trust.stale_crls(self.clock())
        for ca_id in stale:
            action = (
                "refusing every certificate it covers" if self.stale_crl == "refuse" else "still enforcing it"
            )
            log.error("the CRL of CA %s is past its nextUpdate: import a fresh one (%s)", ca_id, action)
        return stale

    # -- operator actions ------------------------------------------------------------------
    async def apply(
        self, command: Command, device_id: str, *, actor: str, reason: str | None = None
    ) -> StatusChange:
        """revoke, disable, enable, quarantine, deprovision, allow: idempotent, audited, evented."""
        change = await self.registry.change_status(
            device_id, command, at=self.clock(), actor=actor, reason=reason
        )
        if change.event is not None:
            self._hand_over([change.event])
        return change

    async def erase(
        self,
        *,
        device_id: str | None = None,
        fingerprint: str | None = None,
        actor: str,
        reason: str | None = None,
    ) -> Erasure:
        erasure = await self.registry.erase(
            device_id=device_id, fingerprint=fingerprint, at=self.clock(), actor=actor, reason=reason
        )
        if erasure.event is not None:
            self._hand_over([erasure.event])
        return erasure

    async def import_crl(self, ca_id: str, data: bytes, *, actor: str) -> x509.CertificateRevocationList:
        """Verify a CRL against its registered CA and store it; the broker applies it within seconds."""
        now = self.clock()
        anchor = next((a for a in await self.registry.anchors() if a.ca_id == ca_id), None)
        if anchor is None:
            raise errors.NotFound(f"no CA with id {ca_id!r} is registered", ca_id=ca_id)
        crl = parse_crl(data, anchor, now=now)
        current = (await self.registry.crls()).get(ca_id)
        if current is not None:
            stored = x509.load_der_x509_crl(current)
            if crl.last_update_utc < stored.last_update_utc:
                raise errors.InvalidRequest(
                    f"this CRL (thisUpdate {crl.last_update_utc.isoformat()}) is older than the one in force "
                    f"({stored.last_update_utc.isoformat()}); importing it would un-revoke certificates"
                )
        stale = crl.next_update_utc is not None and now > crl.next_update_utc
        details = {"ca_id": ca_id, "revoked": str(len(crl)), "stale": str(stale).lower()}
        if crl.next_update_utc is not None:
            details["next_update"] = crl.next_update_utc.isoformat()
        await self.registry.import_crl(
            ca_id,
            crl.public_bytes(Encoding.DER),
            this_update=crl.last_update_utc,
            next_update=crl.next_update_utc,
            audit=AuditDraft(at=now, action="crl-imported", actor=actor, details=MappingProxyType(details)),
        )
        if stale:
            log.error(
                "imported a CRL for CA %s that is already past its nextUpdate (%s)",
                ca_id,
                crl.next_update_utc,
            )
        return crl

    async def reload_templates(self, templates: TemplateSet, *, actor: str) -> list[ProvisioningEvent]:
        """Swap in new templates; re-render and publish the config of every device whose template changed."""
        previous, self.templates = self.templates, templates
        events: list[ProvisioningEvent] = []
        devices = await self.registry.list_devices()
        for name in templates.names():
            template = templates.get(name)
            try:
                before = previous.get(name)
            except errors.TemplateNotFound:
                before = None
            if before == template:
                continue
            changed = []
            for record in devices:
                if (record.template or "default") != name:
                    continue
                updated = self.rerender(record, template)
                if updated != record:
                    changed.append(updated)
            events += await self.registry.update_configs(changed, at=self.clock(), actor=actor, template=name)
            log.info(
                "template %s v%d: %d device configuration(s) changed", name, template.version, len(changed)
            )
        if events:
            self._hand_over(events)
        return events

    @staticmethod
    def rerender(record: DeviceRecord, template: EnrollmentTemplate) -> DeviceRecord:
        """A record's configuration under ``template``, from what the record holds (no certificate needed):
        static attributes, namespace and profile change; certificate-derived values and the region stay."""
        static = {rule.name: rule.value for rule in template.attributes if rule.value is not None}
        attributes = {**dict(record.attributes), **static}
        namespace = template.namespace(record.device_id, record.region, attributes)
        config = {
            "namespace": {"publish": list(namespace.publish), "subscribe": list(namespace.subscribe)},
            "profile": template.profile.to_json(),
        }
        if "certificate" in record.config:  # the operational certificate's dates stay
            config["certificate"] = record.config["certificate"]
        return dataclasses.replace(
            record,
            attributes=MappingProxyType(attributes),
            template_version=template.version,
            config=MappingProxyType(config),
        )

    def forget(self, device_id: str) -> None:
        """Drop a device's cached record (its status, certificate or configuration changed)."""
        self.cache.forget(device_id)

    def _hand_over(self, events: list[ProvisioningEvent]) -> None:
        for event in events:
            if event.device_id:
                self.cache.forget(event.device_id)
        for hand_over in self._event_waiters:
            hand_over(events)

    # -- the entry point -------------------------------------------------------------------
    async def admit(self, peer: PeerCredentials) -> Admission:
        now = self.clock()
        started = time.perf_counter()
        labels = {"ca": "", "template": "", "region": ""}  # what is known of the client so far
        try:
            verified = self.trust.verify(peer.chain_der, now=now)
            labels["ca"] = verified.anchor.ca_id
            role = self.roles.get(verified.fingerprint, verified.anchor.role)
            if role is Role.CLAIM:
                return self._admit_claim(peer, verified, now, started, labels)
            if role is not Role.DEVICE:  # a named backend principal, never provisioned
                service = derive_service(verified)
                self._bind(peer, service.name, verified.fingerprint)
                self._observe(JoinOutcome.RECONNECTED, now, started, peer, labels)
                return Admission(
                    role=role,
                    client_id=peer.client_id,
                    fingerprint=verified.fingerprint,
                    service=service,
                )
            if verified.anchor.ca_id in self.issuer_ids:
                admitted = await self._admit_operational(peer, verified.fingerprint, now)
                device_id = admitted.record.device_id if admitted.record is not None else None
                self._observe(JoinOutcome.RECONNECTED, now, started, peer, labels, device_id)
                return admitted
            template, identity = self.render(verified)
            labels["template"], labels["region"] = template.name, identity.region
            self._bind(peer, identity.device_id, verified.fingerprint)
            cached = self.cache.get(identity.device_id, verified.fingerprint)
            if cached is not None:
                admitted = await self._birth_policy(
                    self._admit_cached(peer, cached, now), template.birth_certificate
                )
                self._observe(JoinOutcome.RECONNECTED, now, started, peer, labels, identity.device_id)
                return admitted
            outcome = await self._provision(identity, at=now, peer=peer.address, policy=template.reprovision)
            admitted = Admission(
                role=Role.DEVICE,
                client_id=peer.client_id,
                fingerprint=verified.fingerprint,
                record=outcome.record,
                created=outcome.created,
                reprovisioned=outcome.reprovisioned,
            )
            admitted = await self._birth_policy(admitted, template.birth_certificate)
            joined = (
                JoinOutcome.PROVISIONED
                if outcome.created or outcome.reprovisioned
                else JoinOutcome.RECONNECTED
            )
            self._observe(joined, now, started, peer, labels, identity.device_id)
            return admitted
        except errors.Refused as exc:
            self._observe(JoinOutcome.REFUSED, now, started, peer, labels, reason=exc.reason)
            await self.record_refusal(exc, peer=peer.address, at=now, client_id=peer.client_id, counted=True)
            raise
        except errors.Unavailable as exc:
            self._observe(JoinOutcome.SHED, now, started, peer, labels, reason=exc.reason)
            detail = exc.scope if isinstance(exc, errors.Overloaded) and exc.scope else exc.reason
            await self.record_refusal(
                _UnavailableRefusal(exc, detail=detail),
                peer=peer.address,
                at=now,
                client_id=peer.client_id,
                counted=True,
            )
            raise

    def _admit_claim(
        self,
        peer: PeerCredentials,
        verified: VerifiedChain,
        now: datetime,
        started: float,
        labels: dict[str, str],
    ) -> Admission:
        """A claim certificate (possibly shared by a batch): no device record, no telemetry; the
        connection reaches only ``$jitp/certificates/<client_id>/``, so the client id must be safe
        as a topic level (any id: the device's own comes from the claim's parameters)."""
        problem = id_problem(peer.client_id)
        if problem is not None:
            raise errors.UnsafeIdentity(
                f"a claim connection's client id names its topics: {problem}",
                fingerprint=verified.fingerprint,
                detail=repr(peer.client_id)[:80],
            )
        labels["template"] = verified.anchor.template or "default"
        self._observe(JoinOutcome.RECONNECTED, now, started, peer, labels)
        return Admission(
            role=Role.CLAIM,
            client_id=peer.client_id,
            fingerprint=verified.fingerprint,
            ca_id=verified.anchor.ca_id,
            template=verified.anchor.template,
        )

    async def _admit_operational(self, peer: PeerCredentials, fingerprint: str, now: datetime) -> Admission:
        """A certificate of the operational issuing CA: the device it was issued to, for that id only.
        Its first use commits it (pending -> current, certificate-issued/-rotated event); a superseded,
        expired or revoked one is refused."""
        cert = await self.registry.certificate_by_fingerprint(fingerprint)
        if cert is None:
            raise errors.UnknownOperational(
                "the issuing CA signed this certificate, but it is not registered (erased?)",
                fingerprint=fingerprint,
            )
        self._bind(peer, cert.device_id, fingerprint)
        state = cert.effective_state(now)
        fields = {"device_id": cert.device_id, "fingerprint": fingerprint}
        event = None
        if state is CertState.PENDING:
            record, cert, event = await self.registry.commit_certificate(
                cert.certificate_id, at=now, peer=peer.address
            )
            if event is not None:
                log.info("%s device %s", event.type, cert.device_id)
                self._hand_over([event])
        elif state is CertState.CURRENT:
            found = await self.registry.get_device(cert.device_id)
            if found is None:
                raise errors.UnknownOperational("the device of this certificate is gone", **fields)
            record = found
            self.registry.note_seen(record.device_id, now)
        elif state is CertState.EXPIRED:
            raise errors.PendingExpired("this certificate was not used within its commit window", **fields)
        else:
            raise errors.CertificateSuperseded(f"this operational certificate is {state}", **fields)
        if record.status not in ADMITTED:
            raise errors.DeviceBlocked(f"device {record.device_id!r} is {record.status}", **fields)
        return Admission(
            role=Role.DEVICE,
            client_id=peer.client_id,
            fingerprint=fingerprint,
            record=record,
            # A claimed device's first certificate committed: the device itself is new (provisioned).
            created=event is not None and event.type is EventType.PROVISIONED,
            reprovisioned=event is not None and event.type is not EventType.PROVISIONED,
        )

    def _observe(
        self,
        outcome: JoinOutcome,
        at: datetime,
        started: float,
        peer: PeerCredentials,
        labels: dict[str, str],
        device_id: str | None = None,
        *,
        reason: str = "",
    ) -> None:
        self.observer.admit_seconds(time.perf_counter() - started, outcome)
        self.observer.joined(outcome, at=at, reason=reason, peer=peer.address, device_id=device_id, **labels)

    def pause_ca(self, ca_id: str, why: str) -> None:
        """Shed the first joins of ``ca_id`` (CONNACK 3) until :meth:`resume_ca`; known devices go on."""
        self.paused_cas[ca_id] = why
        log.error("first joins of CA %s paused: %s", ca_id, why)

    def resume_ca(self, ca_id: str) -> bool:
        resumed = self.paused_cas.pop(ca_id, None) is not None
        if resumed:
            log.warning("first joins of CA %s resumed", ca_id)
        return resumed

    async def _birth_policy(self, admitted: Admission, policy: BirthPolicy) -> Admission:
        """A factory certificate once an operational one is current: as the template's
        ``birth_certificate`` says (keep: as before; enroll_only: re-enroll only; retire: refused)."""
        record = admitted.record
        if policy is BirthPolicy.KEEP or record is None or not self.issuer_ids:
            return admitted
        certs = await self.registry.device_certificates(record.device_id)
        if not any(c.state is CertState.CURRENT for c in certs):
            return admitted
        if policy is BirthPolicy.RETIRE:
            raise errors.BirthCertificateRetired(
                "this device has an operational certificate; its factory certificate is retired",
                device_id=record.device_id,
                fingerprint=admitted.fingerprint,
            )
        return dataclasses.replace(admitted, enroll_only=True)

    def _admit_cached(self, peer: PeerCredentials, record: DeviceRecord, now: datetime) -> Admission:
        """A reconnect of a cached, admitted record: no registry round trip; last_seen written behind."""
        try:
            self.registry.note_seen(record.device_id, now)
        except Exception as exc:  # best effort: last_seen must never refuse a device
            log.debug("last_seen of %s not noted: %s", record.device_id, exc)
        return Admission(
            role=Role.DEVICE,
            client_id=peer.client_id,
            fingerprint=record.cert_fingerprint,
            record=dataclasses.replace(record, last_seen=now),
        )

    async def _provision(
        self, identity: DeviceIdentity, *, at: datetime, peer: str | None, policy: ReprovisionPolicy
    ) -> ProvisionOutcome:
        """The registry write path, behind the rate buckets and the bounded worker pool."""
        cfg = self.admission
        if identity.ca_id in self.paused_cas:
            known = await self.registry.find_by_fingerprint(identity.cert_fingerprint)
            if known is None or known.device_id != identity.device_id:
                raise errors.Overloaded(
                    f"first joins of CA {identity.ca_id[:16]} are paused ({self.paused_cas[identity.ca_id]})",
                    scope=f"ca:{identity.ca_id}",
                )
        refusal = self.rates.take(identity.ca_id, identity.region)
        if refusal is not None:
            # Over the rate: only a first join is shed; a known device (not cached here) goes on.
            known = await self.registry.find_by_fingerprint(identity.cert_fingerprint)
            if known is None or known.device_id != identity.device_id:
                raise errors.Overloaded(
                    f"first joins of {refusal.scope} over their rate; retry in {refusal.retry_after:.1f} s",
                    scope=refusal.scope,
                    retry_after=refusal.retry_after,
                )
        await self.gate.acquire(cfg.queue_timeout)
        try:
            task = asyncio.create_task(
                self._provision_in_slot(identity, at=at, peer=peer, policy=policy),
                name=f"jitp-provision-{identity.device_id[:40]}",
            )
        except BaseException:
            self.gate.release()
            raise
        self._provisioning.add(task)
        task.add_done_callback(self._provisioning.discard)
        try:
            # Shielded: a timeout (or a dropped connection) stops the waiting, not the write; its
            # event is still handed over and the device's retry is an idempotent reconnect.
            return await asyncio.wait_for(asyncio.shield(task), cfg.registry_timeout)
        except TimeoutError:
            raise errors.RegistryUnavailable(
                f"the registry did not answer within {cfg.registry_timeout:g} s"
            ) from None

    async def _provision_in_slot(
        self, identity: DeviceIdentity, *, at: datetime, peer: str | None, policy: ReprovisionPolicy
    ) -> ProvisionOutcome:
        started = time.perf_counter()
        try:
            outcome = await self.registry.provision(identity, at=at, peer=peer, policy=policy)
        finally:
            self.gate.release()
        self.observer.registry_commit_seconds(time.perf_counter() - started)
        if outcome.event is not None:
            log.info(
                "%s device %s (region %s)",
                outcome.event.type,
                outcome.record.device_id,
                outcome.record.region,
                extra={
                    "event": str(outcome.event.type),
                    "ca": outcome.record.ca_id,
                    "region": outcome.record.region,
                    "device": outcome.record.device_id,
                },
            )
            self._hand_over([outcome.event])
        self.cache.put(outcome.record)
        return outcome

    async def drain(self) -> None:
        """Wait for provisioning writes still running (e.g. after their requester timed out)."""
        if self._provisioning:
            await asyncio.wait(set(self._provisioning), timeout=self.admission.registry_timeout)

    def render(self, verified: VerifiedChain) -> tuple[EnrollmentTemplate, DeviceIdentity]:
        """Certificate -> (template, identity with its effective config), or a Refused. No side effects."""
        template = self.templates.get(verified.anchor.template)
        identity = template.render(verified, default_region=self.default_region)
        namespace = template.namespace(identity.device_id, identity.region, dict(identity.attributes))
        config = {
            "namespace": {"publish": list(namespace.publish), "subscribe": list(namespace.subscribe)},
            "profile": template.profile.to_json(),
        }
        return template, dataclasses.replace(identity, config=MappingProxyType(config))

    @staticmethod
    def _bind(peer: PeerCredentials, expected: str, fingerprint: str) -> None:
        if peer.client_id != expected:
            raise errors.ClientIdMismatch(
                f"MQTT client id must equal the certificate's identity {expected!r}",
                device_id=expected,
                fingerprint=fingerprint,
                detail=repr(peer.client_id)[:80],
            )

    # -- audit helpers for decisions taken outside admit() ------------------------------------
    async def record_refusal(
        self,
        exc: errors.Refused,
        *,
        peer: str | None,
        at: datetime | None = None,
        client_id: str | None = None,
        counted: bool = False,
    ) -> None:
        """Audit a refusal. Repeats of the same cause (reason + certificate, or reason + peer host)
        within ``coalesce_window`` become one counted entry, written when the window closes.
        The observer is told unless ``counted`` (admit() did): a limit a connected client hit, or a
        refused join (a TLS handshake, a will, an unsupported protocol)."""
        at = at or self.clock()
        if not counted:
            if isinstance(exc, errors.LimitExceeded | errors.WillNotAllowed):
                self.observer.limit_hit(exc.reason)
            else:
                self.observer.joined(JoinOutcome.REFUSED, at=at, reason=exc.reason, peer=peer)
        # Same cause: same reason and the same certificate (or, without one, the same detail -- e.g.
        # an erased certificate's tombstone -- or the same peer host).
        key = ("refused", exc.reason, exc.fingerprint or exc.detail or _host(peer) or "-")
        if self._count_repeat(key, at=at, peer=peer):
            log.debug("refused again from %s: %s (coalesced)", peer, exc.reason)
            return
        draft = await self._refusal_draft(exc, peer=peer, at=at, client_id=client_id)
        try:
            await self._write_first(key, draft)
        except errors.ProvisioningError as audit_exc:  # never let auditing hide the refusal itself
            log.error("could not audit a refusal: %s", audit_exc)

    def _count_repeat(
        self, key: CoalesceKey, *, at: datetime, peer: str | None, details: Mapping[str, str] | None = None
    ) -> bool:
        """Count a repeat into the open window of its cause; False when it opens a new one (no
        coalescing, no window, or the window closed)."""
        if self.coalesce_window <= 0:
            return False
        pending = self._refusals.get(key)
        if pending is None or (at - pending.window_start).total_seconds() >= self.coalesce_window:
            return False
        pending.count += 1
        pending.last_at, pending.last_peer = at, peer
        if details is not None:
            pending.last_details = details
        pending.note_host(peer)
        return True

    async def _write_first(self, key: CoalesceKey, draft: AuditDraft) -> None:
        """Write the first entry of a window (at once: an operator sees it immediately) and open the
        window. A closed window of the same cause that was not flushed yet writes its counted entry
        first. Windows change only before the one await, so concurrent callers never lose a count."""
        drafts = [draft]
        if self.coalesce_window > 0:
            closing = [w for w in (self._refusals.pop(key, None),) if w is not None]
            if len(self._refusals) >= MAX_COALESCED_CAUSES:  # bounded memory: close every window now
                closing += self._refusals.values()
                self._refusals.clear()
            drafts = [d for d in (w.summary() for w in closing) if d is not None] + drafts
            window = _Coalesced(draft=draft, window_start=draft.at, last_at=draft.at, last_peer=draft.peer)
            window.note_host(draft.peer)
            self._refusals[key] = window
        await self.registry.append_audit(drafts)

    async def flush_refusals(self, *, force: bool = False) -> int:
        """Write one counted entry per cause -- refusals and :data:`COALESCED_EVENTS` alike -- whose
        window closed (all of them with ``force``). Returns how many occurrences they count."""
        now = self.clock()
        due = [
            k
            for k, p in self._refusals.items()
            if force or (now - p.window_start).total_seconds() >= self.coalesce_window
        ]
        drafts = [d for d in (self._refusals.pop(k).summary() for k in due) if d is not None]
        if drafts:
            try:
                await self.registry.append_audit(drafts)
            except errors.ProvisioningError as audit_exc:
                log.error("could not audit %d coalesced entries: %s", len(drafts), audit_exc)
        return sum(int(d.details["count"]) for d in drafts)

    async def _refusal_draft(
        self, exc: errors.Refused, *, peer: str | None, at: datetime, client_id: str | None
    ) -> AuditDraft:
        details: dict[str, str] = {"message": exc.message}
        if exc.detail:
            details["detail"] = exc.detail
        device_id = exc.device_id
        if device_id is None and exc.fingerprint and not isinstance(exc, errors.DeviceErased):
            # Refused before its identity was derived (e.g. a revoked certificate): if the certificate
            # is a known device's, the entry is about that device and is pseudonymised under its key.
            try:
                known = await self.registry.find_by_fingerprint(exc.fingerprint)
            except errors.ProvisioningError:
                known = None
            device_id = known.device_id if known is not None else None
        if client_id is not None and device_id is None and not isinstance(exc, errors.DeviceErased):
            details["client_id"] = repr(client_id)[:80]
        log.warning(
            "refused %s from %s: %s (%s)",
            device_id or "client",
            peer,
            exc.reason,
            exc.message,
            extra={"event": "refused", "reason": exc.reason, "device": device_id},
        )
        return AuditDraft(
            at=at,
            action="refused",
            actor="broker",
            device_id=device_id,
            fingerprint=exc.fingerprint,
            reason=exc.reason,
            peer=peer,
            details=MappingProxyType(details),
        )

    async def record_event(
        self,
        action: str,
        *,
        device_id: str | None = None,
        peer: str | None = None,
        reason: str | None = None,
        details: dict[str, str] | None = None,
    ) -> bool:
        """Audit an event the broker saw. The first of a :data:`COALESCED_EVENTS` action (per action,
        reason and device) is written at once; repeats within ``coalesce_window`` are counted into one
        entry written when the window closes, like refusals. True if an entry was written now."""
        at = self.clock()
        draft = AuditDraft(
            at=at,
            action=action,
            actor="broker",
            device_id=device_id,
            peer=peer,
            reason=reason,
            details=MappingProxyType(details or {}),
        )
        if action == "session-takeover" and device_id is not None:
            self.observer.takeover(
                at=at,
                device_id=device_id,
                peer=peer,
                previous_peer=(details or {}).get("previous_peer"),
                same_certificate=(details or {}).get("same_certificate") == "true",
            )
        if action not in COALESCED_EVENTS:
            await self.registry.append_audit([draft])
            return True
        key = (action, reason or "", device_id or _host(peer) or "-")
        if self._count_repeat(key, at=at, peer=peer, details=draft.details):
            return False
        await self._write_first(key, draft)
        return True
