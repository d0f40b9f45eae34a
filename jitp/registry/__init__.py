"""The registry: where trust anchors, device records, the event outbox and the audit log live.

:class:`Registry` is the Protocol; :class:`~jitp.registry.core.RegistryCore` implements it once,
over the storage port each backend implements (:mod:`jitp.registry.sqlite`, the embedded default;
:mod:`jitp.registry.postgres`, shared by several nodes). The rules below are pure and shared as well.
The contract every implementation keeps:

* ``provision`` is race-free "create if absent": concurrent calls for the same new device
  yield exactly one record and exactly one ``provisioned`` event, whichever node or task wins.
* The event is written to the outbox in the same transaction as the record, so a record never
  exists without its event, and an event keeps its ``event_id`` across redeliveries.
* Audit entries are appended in order, each hash-chained to the previous one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Protocol

from jitp import errors
from jitp.crypto import privacy
from jitp.domain.audit import AuditDraft, AuditEntry
from jitp.domain.certificates import CertState, OperationalCertificate
from jitp.domain.events import ProvisioningEvent, lifecycle_event, new_event_id, provisioned_event
from jitp.domain.identity import DeviceIdentity
from jitp.domain.records import (
    ADMITTED,
    Command,
    DeviceRecord,
    DeviceStatus,
    EventType,
    ReprovisionPolicy,
    status_event_type,
    transition,
)
from jitp.trust import TrustAnchor


@dataclass(frozen=True)
class ProvisionOutcome:
    """``created``: a new record. ``event`` without ``created``: reprovisioned (rotate or reset)."""

    record: DeviceRecord
    created: bool
    event: ProvisioningEvent | None = None

    @property
    def reprovisioned(self) -> bool:
        return self.event is not None and not self.created


@dataclass(frozen=True)
class StatusChange:
    record: DeviceRecord
    changed: bool  # False: the device already had that status (the command is idempotent)
    event: ProvisioningEvent | None = None


@dataclass(frozen=True)
class Erasure:
    device_id: str | None  # None when the certificate's device was erased before
    event: ProvisioningEvent | None = None
    already_erased: bool = False


@dataclass(frozen=True)
class KeyringStatus:
    """Which master keys wrap the registry's data keys (``jitp keys status``)."""

    primary: str  # the kid new data keys are wrapped under
    wrapped: MappingProxyType[str, int]  # kid -> how many keys (data keys and registry keys) it wraps

    @property
    def pending(self) -> int:
        """Keys not yet under the primary: a rotation is unfinished while this is above 0."""
        return sum(n for kid, n in self.wrapped.items() if kid != self.primary)


@dataclass(frozen=True)
class FleetStats:
    """Counts from the registry's clear columns (no record is decrypted): metrics and ``jitp status``."""

    devices: MappingProxyType[tuple[str, str], int]  # (status, region) -> devices
    not_after: tuple[tuple[str, str, datetime], ...]  # (status, ca_id, certificate not-after) per device
    outbox_pending: int
    outbox_oldest: datetime | None  # occurred_at of the oldest undelivered event

    def expiring(self, now: datetime, days: float, *, ca: str | None = None) -> int:
        """Active devices (of ``ca``) whose certificate expires within ``days`` (or has expired)."""
        limit = now + timedelta(days=days)
        return sum(
            1
            for status, ca_id, when in self.not_after
            if status == "active" and when <= limit and (ca is None or ca_id == ca)
        )


class Registry(Protocol):
    """Device data at rest is sealed (:mod:`jitp.crypto.envelope`): an implementation is constructed with a
    :class:`~jitp.crypto.keys.MasterKeyProvider`, and its ``open`` raises
    :class:`~jitp.errors.MasterKeyError` when the keys it holds cannot unwrap the registry's keys."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # -- trust anchors -------------------------------------------------------------------
    async def register_anchor(self, anchor: TrustAnchor, *, audit: AuditDraft) -> TrustAnchor:
        """Add (or update and re-enable) an anchor. Bumps the trust version."""
        ...

    async def set_anchor_enabled(self, ca_id: str, enabled: bool, *, audit: AuditDraft) -> TrustAnchor:
        """Raises :class:`~jitp.errors.NotFound` for an unknown id. Bumps the trust version."""
        ...

    async def anchors(self) -> list[TrustAnchor]: ...

    async def trust_version(self) -> int:
        """A number that changes whenever any anchor changes (cheap to poll)."""
        ...

    # -- devices -------------------------------------------------------------------------
    async def provision(
        self,
        identity: DeviceIdentity,
        *,
        at: datetime,
        peer: str | None,
        policy: ReprovisionPolicy = ReprovisionPolicy.REJECT,
    ) -> ProvisionOutcome:
        """Create the device if absent (with its event and audit entry, atomically).

        An existing record with the same certificate is a reconnect: ``last_seen`` is updated
        and ``created`` is False. A record that is not active or quarantined raises
        :class:`~jitp.errors.DeviceBlocked`. Another certificate for a known id follows
        ``policy``: ``reject`` raises :class:`~jitp.errors.IdentityConflict`; ``rotate`` keeps the
        record and records the new certificate; ``reset`` starts a fresh record. Both emit a
        ``reprovisioned`` event, and a superseded certificate is never accepted again.
        """
        ...

    async def get_device(self, device_id: str) -> DeviceRecord | None: ...

    async def list_devices(self) -> list[DeviceRecord]: ...

    async def find_by_fingerprint(self, fingerprint: str) -> DeviceRecord | None: ...

    def note_seen(self, device_id: str, at: datetime) -> None:
        """Note a reconnect's time; written behind (see flush_seen)."""
        ...

    async def flush_seen(self) -> None:
        """Write the noted reconnect times now."""
        ...

    async def is_erased(self, fingerprint: str) -> bool: ...

    # -- lifecycle -----------------------------------------------------------------------
    async def change_status(
        self, device_id: str, command: Command, *, at: datetime, actor: str, reason: str | None = None
    ) -> StatusChange:
        """Apply a lifecycle command atomically with its event and audit entry.

        :class:`~jitp.errors.NotFound` for an unknown id; :class:`~jitp.errors.InvalidRequest`
        when the command does not apply to the device's status. Repeating a command is a no-op.
        """
        ...

    async def erase(
        self,
        *,
        device_id: str | None = None,
        fingerprint: str | None = None,
        at: datetime,
        actor: str,
        reason: str | None = None,
    ) -> Erasure:
        """Remove every piece of personal or identifying data of a device; keep a tombstone."""
        ...

    async def templates_version(self) -> int:
        """Changes whenever some node or the CLI changed device configs from templates."""
        ...

    async def bump_templates_version(self) -> None:
        """Tell every node to reload its templates."""
        ...

    async def update_configs(
        self, records: Sequence[DeviceRecord], *, at: datetime, actor: str, template: str
    ) -> list[ProvisioningEvent]:
        """Store re-rendered device configurations with a config-changed event each, atomically."""
        ...

    async def import_crl(
        self,
        ca_id: str,
        der: bytes,
        *,
        this_update: datetime,
        next_update: datetime | None,
        audit: AuditDraft,
    ) -> None: ...

    async def crls(self) -> dict[str, bytes]:
        """CRL DER by CA id."""
        ...

    # -- keys (jitp keys rotate) ----------------------------------------------------------
    async def keyring_status(self) -> KeyringStatus: ...

    async def set_primary_key(self, kid: str, *, audit: AuditDraft) -> None:
        """Wrap new data keys under master key ``kid`` from now on (the provider must hold it).

        Once this returns, no writer anywhere wraps under the previous primary any more, so a
        :meth:`rewrap_keys` loop that reaches 0 leaves nothing under the old key.
        """
        ...

    async def rewrap_keys(self, *, limit: int = 500) -> int:
        """Re-wrap up to ``limit`` keys that are not under the primary, in one transaction.

        Returns how many it re-wrapped (0: none is left). Safe to interrupt and to run while
        brokers serve: each batch commits on its own, so a rerun resumes where it stopped.
        """
        ...

    # -- outbox --------------------------------------------------------------------------
    async def pending_events(self, limit: int = 500) -> list[ProvisioningEvent]: ...

    async def mark_delivered(self, event_ids: Sequence[str], *, at: datetime) -> None: ...

    async def events(self, device_id: str | None = None) -> list[ProvisioningEvent]: ...

    # -- event sinks (jitp.integration.nats_sink): each has its own durable progress through the outbox ---------
    async def events_after(self, seq: int, limit: int = 500) -> list[tuple[int, ProvisioningEvent]]:
        """Outbox events with a sequence number above ``seq``, in order, as ``(seq, event)``.

        Sequence numbers only grow, in commit order, but have gaps (an erasure deletes the device's
        rows). Erased events already scrubbed (see :meth:`set_sink_cursor`) are left out.
        """
        ...

    async def outbox_head(self) -> int:
        """The newest outbox seq (0 when empty)."""
        ...

    async def fleet_stats(self) -> FleetStats:
        """Devices by status and region, certificate expiry per device, the outbox backlog."""
        ...

    async def sink_cursor(self, name: str) -> int:
        """The last outbox seq delivered to sink ``name``; 0 for a sink never seen."""
        ...

    async def set_sink_cursor(self, name: str, seq: int) -> None:
        """Record progress of sink ``name`` (never moves backwards).

        A sink that has a cursor holds back the scrub of ``erased`` events: such an event is
        scrubbed once it was delivered over MQTT (:meth:`mark_delivered`) *and* every sink's cursor
        has passed it, so a sink that is behind (NATS down) still publishes it in full.
        """
        ...

    # -- the operational issuing CA and its certificates (jitp.app.certificates) ---------------
    async def store_issuer(self, anchor: TrustAnchor, key_der: bytes, *, audit: AuditDraft) -> TrustAnchor:
        """Make ``anchor`` the active issuer (key sealed under the master key; a device trust anchor)."""
        ...

    async def issuer(self) -> tuple[bytes, bytes] | None:
        """The active issuer's certificate DER and private key DER; None without one."""
        ...

    async def issuer_ids(self) -> set[str]: ...

    async def certificate_by_fingerprint(self, fingerprint: str) -> OperationalCertificate | None: ...

    async def device_certificates(self, device_id: str) -> list[OperationalCertificate]: ...

    async def certificates_in(self, states: Sequence[CertState]) -> list[OperationalCertificate]: ...

    async def claim_device(
        self, record: DeviceRecord, cert: OperationalCertificate, *, audit: AuditDraft
    ) -> bool:
        """A claimed device's record and its first (pending) certificate; False if the id exists."""
        ...

    async def add_certificate(
        self, cert: OperationalCertificate, *, audit: AuditDraft
    ) -> tuple[OperationalCertificate, bool]:
        """Store a pending certificate; the existing one (and False) for a request id already used."""
        ...

    async def commit_certificate(
        self, certificate_id: str, *, at: datetime, peer: str | None
    ) -> tuple[DeviceRecord, OperationalCertificate, ProvisioningEvent | None]: ...

    async def expire_certificates(self, *, at: datetime) -> list[OperationalCertificate]: ...

    async def revoked_serials(self, issuer_id: str) -> list[tuple[int, datetime]]: ...

    # -- audit ---------------------------------------------------------------------------
    async def append_audit(self, drafts: Sequence[AuditDraft]) -> None: ...

    async def audit_entries(self) -> list[AuditEntry]:
        """Entries in their stored (pseudonymous) form, which is what the hash chain covers."""
        ...

    async def resolve_audit(self, entries: Sequence[AuditEntry]) -> list[AuditEntry]:
        """Device refs and sealed peers resolved, for devices that still exist."""
        ...

    async def audit_head(self) -> tuple[int, str] | None: ...


# -- rules every implementation applies the same way (pure) -----------------------------------
def decide(
    identity: DeviceIdentity,
    *,
    at: datetime,
    policy: ReprovisionPolicy,
    current: DeviceRecord | None,
    superseded: set[tuple[str, str]],
) -> ProvisionOutcome | errors.ProvisioningError:
    """What one provisioning request does, given the current record."""
    ident = identity
    fresh = DeviceRecord(
        device_id=ident.device_id,
        status=DeviceStatus.ACTIVE,
        cert_fingerprint=ident.cert_fingerprint,
        ca_id=ident.ca_id,
        region=ident.region,
        serial=ident.serial,
        subject=ident.subject,
        not_after=ident.not_after,
        provisioned_at=at,
        last_seen=at,
        attributes=ident.attributes,
        template=ident.template,
        template_version=ident.template_version,
        config=ident.config,
    )
    if current is None:
        return ProvisionOutcome(
            record=fresh, created=True, event=provisioned_event(fresh, event_id=new_event_id(), at=at)
        )
    if current.status not in ADMITTED:
        return errors.DeviceBlocked(
            f"device {ident.device_id!r} is {current.status}",
            device_id=ident.device_id,
            fingerprint=ident.cert_fingerprint,
        )
    if current.cert_fingerprint == ident.cert_fingerprint:
        return ProvisionOutcome(record=current, created=False)
    if policy is ReprovisionPolicy.REJECT:
        return errors.IdentityConflict(
            f"device id {ident.device_id!r} is already provisioned with another certificate",
            device_id=ident.device_id,
            fingerprint=ident.cert_fingerprint,
            detail=f"registered certificate {current.cert_fingerprint}",
        )
    if (ident.device_id, ident.cert_fingerprint) in superseded:
        return errors.IdentityConflict(
            f"this certificate of {ident.device_id!r} was superseded by a newer one",
            device_id=ident.device_id,
            fingerprint=ident.cert_fingerprint,
        )
    reset = policy is ReprovisionPolicy.RESET
    record = (
        fresh
        if reset
        else dataclasses.replace(fresh, status=current.status, provisioned_at=current.provisioned_at)
    )
    event = provisioned_event(
        record,
        event_id=new_event_id(),
        at=at,
        type=EventType.REPROVISIONED,
        previous_fingerprint=current.cert_fingerprint,
        reset=reset,
    )
    return ProvisionOutcome(record=record, created=False, event=event)


def plan_status_change(
    record: DeviceRecord, command: Command, *, at: datetime, actor: str, reason: str | None
) -> tuple[StatusChange, AuditDraft]:
    """What a lifecycle command does to ``record``: the change (with its event, if any) and the audit
    entry. InvalidRequest when the command does not apply to the record's status."""
    try:
        target = transition(record.status, command)
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc), device_id=record.device_id) from None
    details = {
        "command": str(command),
        "previous_status": str(record.status),
        "changed": str(target is not None).lower(),
    }
    draft = AuditDraft(
        at=at,
        action=status_event_type(command),
        actor=actor,
        device_id=record.device_id,
        fingerprint=record.cert_fingerprint,
        reason=reason,
        details=MappingProxyType(details),
    )
    if target is None:
        return StatusChange(record=record, changed=False), draft
    event = lifecycle_event(
        record.device_id,
        type=status_event_type(command),
        event_id=new_event_id(),
        at=at,
        status=str(target),
        previous_status=str(record.status),
        region=record.region,
        reason=reason,
    )
    return StatusChange(record=dataclasses.replace(record, status=target), changed=True, event=event), draft


_PEER_DETAILS = ("previous_peer",)  # details holding a peer address, sealed like the entry's peer


def pseudonymize(draft: AuditDraft, keys: dict[str, bytes]) -> AuditDraft:
    """An audit entry's stored form: nothing personal about a device in clear (see jitp.crypto.privacy)."""
    if not draft.device_id:
        return draft
    key = keys[draft.device_id]
    secrets = (draft.device_id, draft.fingerprint or "")
    details = {k: privacy.scrub(str(v), *secrets) for k, v in draft.details.items()}
    if "previous_fingerprint" in details:  # a superseded certificate is the device's too
        details["previous_fingerprint"] = privacy.cert_ref(key, str(draft.details["previous_fingerprint"]))
    for name in _PEER_DETAILS:  # another connection's address is as personal as the entry's peer
        if details.get(name):
            details[name] = privacy.seal(key, str(draft.details[name]))
    return dataclasses.replace(
        draft,
        device_id=privacy.device_ref(key, draft.device_id),
        fingerprint=privacy.cert_ref(key, draft.fingerprint) if draft.fingerprint else None,
        peer=privacy.seal(key, draft.peer) if draft.peer else None,
        reason=privacy.scrub(draft.reason, *secrets) if draft.reason else None,
        details=MappingProxyType(details),
    )


# Free text of an entry about no device that can quote the refused certificate (its CN in a message
# or detail) or what the client sent (its client id).
_QUOTING_DETAILS = ("client_id", "detail", "message")


def seal_anonymous(draft: AuditDraft, audit_key: bytes) -> AuditDraft:
    """An audit entry naming no device (a refused unknown client), as stored: its peer address and
    the details that may quote the client sealed under the registry's audit key (AES-GCM)."""
    details = {
        k: privacy.seal(audit_key, v) if k in _QUOTING_DETAILS and v else v for k, v in draft.details.items()
    }
    return dataclasses.replace(
        draft,
        peer=privacy.seal(audit_key, draft.peer) if draft.peer else None,
        details=MappingProxyType(details),
    )


def open_anonymous(draft: AuditDraft, audit_key: bytes) -> AuditDraft:
    """:func:`seal_anonymous` undone (a value that does not open is left as stored)."""
    details = {
        k: (privacy.unseal(audit_key, v) or v) if k in _QUOTING_DETAILS else v
        for k, v in draft.details.items()
    }
    peer = (privacy.unseal(audit_key, draft.peer) or draft.peer) if draft.peer else None
    return dataclasses.replace(draft, peer=peer, details=MappingProxyType(details))


def provisioned_draft(
    record: DeviceRecord,
    event: ProvisioningEvent,
    *,
    previous: DeviceRecord | None,
    at: datetime,
    peer: str | None,
    policy: ReprovisionPolicy,
) -> AuditDraft:
    """The audit entry of a provisioning decision that wrote ``record`` (a reprovisioning when
    ``previous`` is the record it replaced)."""
    details = {"ca_id": record.ca_id, "region": record.region, "event_id": event.event_id}
    if previous is not None:
        details["previous_fingerprint"] = previous.cert_fingerprint
        details["policy"] = policy
    return AuditDraft(
        at=at,
        action=event.type,
        actor="device",
        device_id=record.device_id,
        fingerprint=record.cert_fingerprint,
        peer=peer,
        details=MappingProxyType(details),
    )


def resolve_entries(
    entries: Sequence[AuditEntry], keys: Mapping[str, bytes], audit_key: bytes
) -> list[AuditEntry]:
    """Stored entries resolved: device refs and sealed peers of the devices whose data keys are in
    ``keys`` (device id -> key), and the sealed fields of entries naming no device. Entries of a
    device whose key is gone (erased) stay as stored."""
    by_ref = {privacy.device_ref(key, device_id): (device_id, key) for device_id, key in keys.items()}
    out = []
    for e in entries:
        if not e.draft.device_id:
            out.append(dataclasses.replace(e, draft=open_anonymous(e.draft, audit_key)))
            continue
        found = by_ref.get(e.draft.device_id)
        if found is None:
            out.append(e)
            continue
        device_id, key = found
        peer = privacy.unseal(key, e.draft.peer) if e.draft.peer else None
        details = dict(e.draft.details)
        for name in _PEER_DETAILS:
            if details.get(name):
                details[name] = privacy.unseal(key, details[name]) or details[name]
        resolved = dataclasses.replace(
            e.draft, device_id=device_id, peer=peer, details=MappingProxyType(details)
        )
        out.append(dataclasses.replace(e, draft=resolved))
    return out


def pair_keyring(
    registry_id: str | None,
    keyring_id: str | None,
    *,
    has_devices: bool,
    has_keys: bool,
    keyring: str,
    where: str,
) -> str | None:
    """The id that pairs a registry with its keyring, from the id each holds (None: none yet).

    Both without one: a new pair (returns None: make one). One side without: it takes the other's,
    if that side protects nothing yet (a new registry on an empty keyring, or the first open
    interrupted between the two writes). Otherwise they must be equal; else
    :class:`~jitp.errors.MasterKeyMismatch` (a missing keyring, or another registry's)."""
    if registry_id == keyring_id:
        return registry_id
    if keyring_id is None and not has_devices:
        return registry_id
    if registry_id is None and not has_keys:
        return keyring_id
    found = "there is none" if keyring_id is None else f"it holds keyring {keyring_id}"
    raise errors.MasterKeyMismatch(
        f"the keyring {keyring} is missing or belongs to another registry: this registry's data is "
        f"sealed with the keys of keyring {registry_id or '(none yet)'}, {found}. Restore that keyring "
        "or point the configuration at it (or, to start an empty registry, move this keyring away)",
        where=where,
    )
