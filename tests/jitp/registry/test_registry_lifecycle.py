"""Device lifecycle at the registry level: transitions, events, pseudonymous audit, erasure.

A real SQLiteRegistry in ``tmp_path``; no broker. Devices are provisioned through
``ProvisioningService.admit`` with certificates of the in-memory test PKI.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from jitp import errors
from jitp.app.service import PeerCredentials, ProvisioningService
from jitp.domain.audit import AuditDraft, AuditEntry, verify_chain
from jitp.domain.records import TRANSITIONS, Command, DeviceStatus, transition
from jitp.registry.sqlite import SQLiteRegistry
from jitp.trust import fingerprint
from tests.jitp import pkitools as pt

T = TypeVar("T")

PEER_HOST = "198.51.100.77"
PEER = f"{PEER_HOST}:40123"

# How to bring a freshly provisioned (active) device into each status.
REACH: dict[DeviceStatus, tuple[Command, ...]] = {
    DeviceStatus.ACTIVE: (),
    DeviceStatus.DISABLED: (Command.DISABLE,),
    DeviceStatus.QUARANTINED: (Command.QUARANTINE,),
    DeviceStatus.REVOKED: (Command.REVOKE,),
    DeviceStatus.DEPROVISIONED: (Command.DEPROVISION,),
}

_CERTS: dict[str, x509.Certificate] = {}


def cert_of(device_id: str) -> x509.Certificate:
    if device_id not in _CERTS:
        _CERTS[device_id] = pt.leaf(device_id)
    return _CERTS[device_id]


def peer_of(device_id: str, address: str | None = PEER) -> PeerCredentials:
    return PeerCredentials(
        chain_der=tuple(pt.chain_of(cert_of(device_id))), client_id=device_id, address=address
    )


def run(body: Callable[[SQLiteRegistry, ProvisioningService], Coroutine[Any, Any, T]], path: Path) -> T:
    async def go() -> T:
        async with SQLiteRegistry(path / "registry.db", batch_window=0) as registry:
            service = ProvisioningService(registry)
            await registry.register_anchor(
                pt.MANUFACTURER_ANCHOR,
                audit=AuditDraft(at=datetime.now(UTC), action="ca-registered", actor="test"),
            )
            await service.refresh_trust()
            return await body(registry, service)

    return asyncio.run(go())


async def provision(service: ProvisioningService, device_id: str, address: str | None = PEER) -> None:
    admission = await service.admit(peer_of(device_id, address))
    assert admission.created and admission.record is not None


async def change(
    registry: SQLiteRegistry, device_id: str, command: Command, reason: str | None = None
) -> Any:
    return await registry.change_status(
        device_id, command, at=datetime.now(UTC), actor="test-admin", reason=reason
    )


async def assert_chain_intact(registry: SQLiteRegistry) -> list[AuditEntry]:
    entries = await registry.audit_entries()
    assert verify_chain(entries) == []
    head = await registry.audit_head()
    assert head == (entries[-1].seq, entries[-1].hash)
    return entries


# -- the transitions table ------------------------------------------------------------------
@pytest.mark.parametrize("command", list(Command), ids=str)
@pytest.mark.parametrize("status", list(DeviceStatus), ids=str)
def test_change_status_agrees_with_transitions_table(
    tmp_path: Path, status: DeviceStatus, command: Command
) -> None:
    sources, target, event_type = TRANSITIONS[command]
    device_id = f"tbl-{status}-{command}"

    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, device_id)
        for step in REACH[status]:
            await change(registry, device_id, step)
        record = await registry.get_device(device_id)
        assert record is not None and record.status == status
        events_before = await registry.events(device_id)
        audit_before = await registry.audit_entries()

        if status == target:
            result = await change(registry, device_id, command, reason="again")
            assert not result.changed and result.event is None
            assert result.record.status == status
            assert await registry.events(device_id) == events_before  # no second event
            audit = await assert_chain_intact(registry)
            assert len(audit) == len(audit_before) + 1  # the no-op is still audited
            assert audit[-1].draft.details["changed"] == "false"
        elif status in sources:
            result = await change(registry, device_id, command, reason="because")
            assert result.changed and result.record.status == target
            assert result.event is not None and result.event.type == event_type
            stored = await registry.get_device(device_id)
            assert stored is not None and stored.status == target
            events = await registry.events(device_id)
            assert events[: len(events_before)] == events_before
            (new,) = events[len(events_before) :]
            assert new.event_id == result.event.event_id
            assert new.topic == f"$jitp/events/{event_type}/{device_id}"
            doc = new.document()
            assert doc["type"] == event_type and doc["device_id"] == device_id
            assert doc["status"] == str(target) and doc["previous_status"] == str(status)
            assert doc["reason"] == "because" and doc["region"] == "eu-west"
            audit = await assert_chain_intact(registry)
            assert len(audit) == len(audit_before) + 1
            last = audit[-1].draft
            assert last.action == event_type and last.actor == "test-admin" and last.reason == "because"
            assert last.details["previous_status"] == str(status) and last.details["changed"] == "true"
        else:
            with pytest.raises(errors.InvalidRequest) as info:
                await change(registry, device_id, command)
            if status in (DeviceStatus.REVOKED, DeviceStatus.DEPROVISIONED):
                assert "allow" in info.value.message
            stored = await registry.get_device(device_id)
            assert stored is not None and stored.status == status  # nothing changed
            assert await registry.events(device_id) == events_before
            assert await assert_chain_intact(registry) == audit_before  # nothing audited either

    run(body, tmp_path)


def test_transition_function_matches_table() -> None:
    for command, (sources, target, _) in TRANSITIONS.items():
        for status in DeviceStatus:
            if status == target:
                assert transition(status, command) is None
            elif status in sources:
                assert transition(status, command) == target
            else:
                with pytest.raises(ValueError, match=f"cannot {command}"):
                    transition(status, command)


def test_issue_semantics_of_the_table() -> None:
    """The operator-facing meaning, spelled out (guards the table itself)."""
    s = DeviceStatus
    assert transition(s.ACTIVE, Command.REVOKE) == s.REVOKED
    assert transition(s.DISABLED, Command.ENABLE) == s.ACTIVE
    assert transition(s.QUARANTINED, Command.ENABLE) == s.ACTIVE
    assert transition(s.ACTIVE, Command.QUARANTINE) == s.QUARANTINED
    assert transition(s.REVOKED, Command.ALLOW) == s.ACTIVE
    assert transition(s.DEPROVISIONED, Command.ALLOW) == s.ACTIVE
    for blocked in (s.REVOKED, s.DEPROVISIONED):
        for command in (Command.DISABLE, Command.ENABLE, Command.QUARANTINE):
            with pytest.raises(ValueError, match="allow"):
                transition(blocked, command)


# -- unknown ids ----------------------------------------------------------------------------
def test_unknown_ids_are_not_found(tmp_path: Path) -> None:
    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, "known-dev")
        before = await registry.audit_entries()
        for command in Command:
            with pytest.raises(errors.NotFound, match="ghost-dev"):
                await change(registry, "ghost-dev", command)
        with pytest.raises(errors.NotFound):
            await registry.erase(device_id="ghost-dev", at=datetime.now(UTC), actor="t")
        with pytest.raises(errors.NotFound):
            await registry.erase(fingerprint="ab" * 32, at=datetime.now(UTC), actor="t")
        with pytest.raises(errors.InvalidRequest):
            await registry.erase(at=datetime.now(UTC), actor="t")
        assert await registry.audit_entries() == before
        assert await registry.events("ghost-dev") == []

    run(body, tmp_path)


# -- events -----------------------------------------------------------------------------------
def test_each_change_writes_one_event_in_order(tmp_path: Path) -> None:
    device_id = "evt-dev"
    steps = [
        Command.QUARANTINE,
        Command.QUARANTINE,  # no-op
        Command.DISABLE,
        Command.ENABLE,
        Command.ENABLE,  # no-op
        Command.REVOKE,
        Command.DEPROVISION,
        Command.ALLOW,
    ]

    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, device_id)
        for step in steps:
            await service.apply(step, device_id, actor="op")
        events = await registry.events(device_id)
        assert [e.type for e in events] == [
            "provisioned",
            "quarantined",
            "disabled",
            "enabled",
            "revoked",
            "deprovisioned",
            "allowed",
        ]
        assert len({e.event_id for e in events}) == len(events)
        pending = await registry.pending_events()
        assert [e.event_id for e in pending] == [e.event_id for e in events]
        statuses = [(e.document()["previous_status"], e.document()["status"]) for e in events[1:]]
        assert statuses == [
            ("active", "quarantined"),
            ("quarantined", "disabled"),
            ("disabled", "active"),
            ("active", "revoked"),
            ("revoked", "deprovisioned"),
            ("deprovisioned", "active"),
        ]
        await assert_chain_intact(registry)

    run(body, tmp_path)


# -- pseudonymous audit -------------------------------------------------------------------------
def _stored_text(entries: list[AuditEntry]) -> str:
    return "\n".join(json.dumps(e.to_json(), sort_keys=True) for e in entries)


def test_audit_is_pseudonymous_and_resolvable(tmp_path: Path) -> None:
    device_id = "pseudo-dev-4c1e"
    fp = fingerprint(cert_of(device_id))

    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, device_id)
        await service.apply(Command.DISABLE, device_id, actor="op", reason="misbehaves")
        with pytest.raises(errors.DeviceBlocked):
            await service.admit(peer_of(device_id))
        await service.apply(Command.ENABLE, device_id, actor="op")

        stored = await assert_chain_intact(registry)
        about = [e for e in stored if e.draft.device_id is not None]
        assert [e.draft.action for e in about] == ["provisioned", "disabled", "refused", "enabled"]
        text = _stored_text(stored)
        assert device_id not in text
        assert fp not in text
        assert PEER_HOST not in text
        for e in about:
            assert e.draft.device_id.startswith("d:")
            assert e.draft.fingerprint is not None and e.draft.fingerprint.startswith("c:")
        assert len({e.draft.device_id for e in about}) == 1
        sealed = [e.draft.peer for e in about if e.draft.peer is not None]
        assert len(sealed) == 2  # provisioned and refused came from the network
        assert all(p.startswith("enc:") for p in sealed)
        assert len(set(sealed)) == 2  # sealing is randomised: two entries do not link by their peer

        resolved = await registry.resolve_audit(stored)
        assert [e.seq for e in resolved] == [e.seq for e in stored]
        mine = [e for e in resolved if e.draft.device_id == device_id]
        assert len(mine) == 4
        assert [e.draft.peer for e in mine if e.draft.peer is not None] == [PEER, PEER]
        refused = next(e for e in mine if e.draft.action == "refused")
        assert refused.draft.reason == "device_blocked"
        # Resolving changes the view, not the stored chain.
        assert await registry.audit_entries() == stored

    run(body, tmp_path)


def test_operator_reason_naming_the_device_is_pseudonymised(tmp_path: Path) -> None:
    """``--reason`` is free text: an operator naturally writes the device id into it.

    Like every other free text about a device, it is stored with the id replaced by ``<device>``
    (jitp.crypto.privacy), or erasure would leave the device named in clear in the audit trail.
    """
    device_id = "reason-dev-77aa"
    fp = fingerprint(cert_of(device_id))

    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, device_id)
        await service.apply(
            Command.REVOKE, device_id, actor="op", reason=f"ticket 42: {device_id} was stolen"
        )
        await service.erase(device_id=device_id, actor="op", reason=f"GDPR request for {device_id} ({fp})")
        stored = await assert_chain_intact(registry)
        text = _stored_text(stored)
        assert device_id not in text
        assert fp not in text
        assert [e.draft.reason for e in stored[-2:]] == [
            "ticket 42: <device> was stolen",
            "GDPR request for <device> (<device>)",
        ]

    run(body, tmp_path)


# -- erasure ----------------------------------------------------------------------------------
def test_erase_unlinks_audit_keeps_chain_and_tombstone(tmp_path: Path) -> None:
    device_id = "erase-reg-9d2b"
    other = "keeper-dev"
    fp = fingerprint(cert_of(device_id))

    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, device_id)
        await provision(service, other)
        await service.apply(Command.QUARANTINE, device_id, actor="op")
        ref = next(e.draft.device_id for e in await registry.audit_entries() if e.draft.device_id)
        assert not await registry.is_erased(fp)

        erasure = await service.erase(device_id=device_id, actor="op", reason="GDPR request")
        assert erasure.device_id == device_id and not erasure.already_erased
        assert erasure.event is not None and erasure.event.type == "erased"
        assert erasure.event.document()["previous_status"] == "quarantined"

        assert await registry.get_device(device_id) is None
        assert await registry.find_by_fingerprint(fp) is None
        assert await registry.is_erased(fp)
        assert not await registry.is_erased(fingerprint(cert_of(other)))
        assert [e.type for e in await registry.events(device_id)] == ["erased"]

        stored = await assert_chain_intact(registry)
        assert stored[-1].draft.action == "erased" and stored[-1].draft.device_id == ref
        text = _stored_text(stored)
        assert device_id not in text and fp not in text and PEER_HOST not in text
        resolved = await registry.resolve_audit(stored)
        erased_refs = [e for e in resolved if e.draft.device_id == ref]
        assert len(erased_refs) == 3  # provisioned, quarantined, erased: kept, but unlinkable
        assert all(e.draft.peer is None or e.draft.peer.startswith("enc:") for e in erased_refs)
        assert device_id not in _stored_text(resolved)
        # The other device still resolves.
        assert any(e.draft.device_id == other for e in resolved)

        # The tombstone refuses the certificate, and writes nothing that names the device.
        before = len(stored)
        with pytest.raises(errors.DeviceErased):
            await service.admit(peer_of(device_id))
        _, identity = service.render(
            service.trust.verify(pt.chain_of(cert_of(device_id)), now=datetime.now(UTC))
        )
        with pytest.raises(errors.DeviceErased):
            await registry.provision(identity, at=datetime.now(UTC), peer=None)
        after = await assert_chain_intact(registry)
        assert len(after) == before + 1
        refusal = after[-1].draft
        assert refusal.action == "refused" and refusal.reason == "erased"
        assert device_id not in _stored_text(after) and fp not in _stored_text(after)
        assert await registry.get_device(device_id) is None

        # Erasing again by certificate: already erased. By id: there is nothing left to find.
        again = await service.erase(fingerprint=fp, actor="op")
        assert again.already_erased and again.device_id is None and again.event is None
        with pytest.raises(errors.NotFound):
            await service.erase(device_id=device_id, actor="op")
        assert [e.type for e in await registry.events(device_id)] == ["erased"]

        # Once delivered, the erased event stops naming the device too.
        await registry.mark_delivered([erasure.event.event_id], at=datetime.now(UTC))
        assert await registry.events(device_id) == []

    run(body, tmp_path)


def test_erase_by_fingerprint_then_again(tmp_path: Path) -> None:
    device_id = "erase-fp-dev"
    fp = fingerprint(cert_of(device_id))

    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, device_id)
        first = await service.erase(fingerprint=fp, actor="op")
        assert first.device_id == device_id and not first.already_erased and first.event is not None
        second = await service.erase(fingerprint=fp, actor="op")
        assert second.already_erased and second.device_id is None and second.event is None
        assert [e.type for e in await registry.events(device_id)] == ["erased"]
        assert await registry.is_erased(fp)
        await assert_chain_intact(registry)

    run(body, tmp_path)


def test_erased_id_can_be_reused_by_a_new_certificate(tmp_path: Path) -> None:
    """The tombstone is the certificate's, not the name's: a new certificate is a new device."""
    device_id = "reused-name"
    old = cert_of(device_id)
    new = pt.leaf(device_id)
    assert fingerprint(new) != fingerprint(old)

    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, device_id)
        await service.erase(device_id=device_id, actor="op")
        admission = await service.admit(PeerCredentials(tuple(pt.chain_of(new)), device_id, PEER))
        assert admission.created and admission.record is not None
        assert admission.record.cert_fingerprint == fingerprint(new)
        assert [e.type for e in await registry.events(device_id)] == ["erased", "provisioned"]
        with pytest.raises(errors.DeviceErased):
            await service.admit(peer_of(device_id))
        await assert_chain_intact(registry)

    run(body, tmp_path)


def _revoking_crl(serials: list[int]) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pt.MANUFACTURER.cert.subject)
        .last_update(now - timedelta(minutes=1))
        .next_update(now + timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(minutes=1))
            .build()
        )
    return builder.sign(pt.MANUFACTURER.key, hashes.SHA256()).public_bytes(Encoding.PEM)


def test_erase_leaves_no_trace_even_after_crl_refusals(tmp_path: Path) -> None:
    """A device whose certificate a CRL revoked keeps trying to connect; then it is erased.

    Its refusals happened before the registry knew which device it was (the CRL check comes first),
    but they are about that device all the same: after erasure, nothing in the registry file may
    name it, its certificate fingerprint or where it connected from.
    """
    device_id = "crl-erase-3e8f"
    cert = cert_of(device_id)
    fp = fingerprint(cert)
    peer_host = "203.0.113.58"

    async def body(registry: SQLiteRegistry, service: ProvisioningService) -> None:
        await provision(service, device_id, address=f"{peer_host}:5555")
        await service.import_crl(
            pt.MANUFACTURER_ANCHOR.ca_id, _revoking_crl([cert.serial_number]), actor="op"
        )
        await service.refresh_trust()
        with pytest.raises(errors.CertificateRevoked):
            await service.admit(peer_of(device_id, f"{peer_host}:5556"))
        await service.erase(device_id=device_id, actor="op")
        await registry.mark_delivered(
            [e.event_id for e in await registry.pending_events()], at=datetime.now(UTC)
        )
        await assert_chain_intact(registry)
        text = _stored_text(await registry.audit_entries())
        assert device_id not in text, "the refusal names the erased device in clear"
        assert fp not in text, "the refusal keeps the erased device's certificate fingerprint in clear"
        assert peer_host not in text, "the refusal keeps the erased device's address in clear"

    run(body, tmp_path)
    raw = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("registry.db*")))
    assert device_id.encode() not in raw
    assert fp.encode() not in raw


def test_a_removed_tail_stays_visible_after_the_next_append(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Chaining from the recorded head, not the last row: deleting the newest entries and then
    appending must not make the log verify again."""
    import sqlite3
    from datetime import UTC, datetime

    from jitp.domain.audit import AuditDraft, verify_chain
    from jitp.registry.sqlite import SQLiteRegistry

    async def go() -> list[str]:
        path = tmp_path / "r.db"
        async with SQLiteRegistry(path, batch_window=0) as reg:
            for i in range(5):
                await reg.append_audit([AuditDraft(at=datetime.now(UTC), action=f"a{i}", actor="t")])
        db = sqlite3.connect(path)
        db.execute("DELETE FROM audit WHERE seq >= 4")
        db.commit()
        db.close()
        async with SQLiteRegistry(path, batch_window=0) as reg:
            await reg.append_audit([AuditDraft(at=datetime.now(UTC), action="after", actor="t")])
            return verify_chain(await reg.audit_entries())

    import asyncio

    problems = asyncio.run(go())
    assert any("entry 6" in p for p in problems), problems
