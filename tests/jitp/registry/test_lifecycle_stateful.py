"""Random sequences of lifecycle commands, erasures and connect attempts against a model.

A Hypothesis state machine drives a real SQLiteRegistry through ``ProvisioningService`` (admit,
apply, erase) and checks after every step that the registry agrees with a simple model: status per
device, who is admitted, one ``provisioned`` event per device, an intact audit chain, and exactly one
``refused`` audit entry (with the right reason) per refused connect.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from jitp import errors
from jitp.app.service import PeerCredentials, ProvisioningService
from jitp.domain.audit import AuditDraft, verify_chain
from jitp.domain.records import ADMITTED, TRANSITIONS, Command, DeviceStatus
from jitp.registry.sqlite import SQLiteRegistry
from jitp.trust import fingerprint
from tests.jitp import pkitools as pt

T = TypeVar("T")

DEVICE_IDS = ("sm-dev-a", "sm-dev-b", "sm-dev-c")
CERTS_PER_ID = 2  # a second certificate per id: identity conflicts, and a fresh device after erasure

# Real certificate chains, made once: (device id, index) -> (fingerprint, chain DER).
CHAINS: dict[tuple[str, int], tuple[str, tuple[bytes, ...]]] = {}
for _id in DEVICE_IDS:
    for _i in range(CERTS_PER_ID):
        _cert = pt.leaf(_id)
        CHAINS[(_id, _i)] = (fingerprint(_cert), tuple(pt.chain_of(_cert)))

ERASED = "erased"


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="jitp-sm-"))
        self.loop = asyncio.new_event_loop()
        self.registry = SQLiteRegistry(self.dir / "registry.db", synchronous="NORMAL", batch_window=0)
        self.service = ProvisioningService(self.registry)
        self.run(self.registry.open())
        self.run(
            self.registry.register_anchor(
                pt.MANUFACTURER_ANCHOR,
                audit=AuditDraft(at=datetime.now(UTC), action="ca-registered", actor="test"),
            )
        )
        self.run(self.service.refresh_trust())
        # The model.
        self.status: dict[str, DeviceStatus] = {}  # devices that exist now
        self.cert: dict[str, int] = {}  # which certificate each existing device is registered with
        self.tombstoned: set[str] = set()  # fingerprints of erased devices
        self.expected_refusals: list[str] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.registry.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- rules ----------------------------------------------------------------------------------
    @rule(device_id=st.sampled_from(DEVICE_IDS), index=st.integers(0, CERTS_PER_ID - 1))
    def connect(self, device_id: str, index: int) -> None:
        fp, chain = CHAINS[(device_id, index)]
        peer = PeerCredentials(chain_der=chain, client_id=device_id, address="192.0.2.1:1883")
        expected: str | None  # the refusal reason, None if admitted
        if fp in self.tombstoned:
            expected = "erased"
        elif device_id not in self.status:
            expected = None
        elif self.status[device_id] not in ADMITTED:
            expected = "device_blocked"
        elif self.cert[device_id] != index:
            expected = "identity_conflict"
        else:
            expected = None
        try:
            admission = self.run(self.service.admit(peer))
        except errors.Refused as exc:
            assert expected is not None, f"refused ({exc.reason}: {exc.message}) but the model admits"
            assert exc.reason == expected
            self.expected_refusals.append(expected)
            return
        assert expected is None, f"admitted, but the model expects a refusal ({expected})"
        assert admission.record is not None
        if device_id not in self.status:
            assert admission.created
            self.status[device_id] = DeviceStatus.ACTIVE
            self.cert[device_id] = index
        else:
            assert not admission.created
        assert admission.record.status == self.status[device_id]
        assert admission.record.cert_fingerprint == fp

    @rule(
        device_id=st.sampled_from(DEVICE_IDS),
        command=st.sampled_from(list(Command)),
        reason=st.none() | st.sampled_from(["maintenance", "stolen", "ticket 7"]),
    )
    def lifecycle(self, device_id: str, command: Command, reason: str | None) -> None:
        events_before = self.run(self.registry.events(device_id))
        current = self.status.get(device_id)
        if current is None:
            with pytest.raises(errors.NotFound):
                self.run(self.service.apply(command, device_id, actor="op", reason=reason))
            return
        sources, target, event_type = TRANSITIONS[command]
        if current != target and current not in sources:
            with pytest.raises(errors.InvalidRequest):
                self.run(self.service.apply(command, device_id, actor="op", reason=reason))
            assert self.run(self.registry.events(device_id)) == events_before
            return
        change = self.run(self.service.apply(command, device_id, actor="op", reason=reason))
        events = self.run(self.registry.events(device_id))
        if current == target:
            assert not change.changed and change.event is None
            assert events == events_before
        else:
            assert change.changed and change.event is not None and change.event.type == event_type
            assert events == [*events_before, change.event]
            self.status[device_id] = target
        assert change.record.status == self.status[device_id]

    @rule(
        device_id=st.sampled_from(DEVICE_IDS), index=st.integers(0, CERTS_PER_ID - 1), by_cert=st.booleans()
    )
    def erase(self, device_id: str, index: int, by_cert: bool) -> None:
        fp, _ = CHAINS[(device_id, index)]
        if by_cert:
            holder = device_id if self.cert.get(device_id) == index and device_id in self.status else None
            if holder is None and fp in self.tombstoned:
                result = self.run(self.service.erase(fingerprint=fp, actor="op"))
                assert result.already_erased and result.device_id is None and result.event is None
                return
            if holder is None:
                with pytest.raises(errors.NotFound):
                    self.run(self.service.erase(fingerprint=fp, actor="op"))
                return
            result = self.run(self.service.erase(fingerprint=fp, actor="op"))
        else:
            if device_id not in self.status:
                with pytest.raises(errors.NotFound):
                    self.run(self.service.erase(device_id=device_id, actor="op"))
                return
            result = self.run(self.service.erase(device_id=device_id, actor="op"))
        assert result.device_id == device_id and not result.already_erased
        assert result.event is not None and result.event.type == ERASED
        self.tombstoned.add(CHAINS[(device_id, self.cert[device_id])][0])
        del self.status[device_id]
        del self.cert[device_id]

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def registry_agrees_with_model(self) -> None:
        records = {r.device_id: r for r in self.run(self.registry.list_devices())}
        assert {d: r.status for d, r in records.items()} == self.status
        for device_id, index in self.cert.items():
            assert records[device_id].cert_fingerprint == CHAINS[(device_id, index)][0]

    @invariant()
    def one_provisioned_event_per_existing_device(self) -> None:
        for device_id in DEVICE_IDS:
            types = [e.type for e in self.run(self.registry.events(device_id))]
            assert types.count("provisioned") == (1 if device_id in self.status else 0), types
            if device_id in self.status:
                # The erased event of an earlier device with this id may precede it (undelivered).
                assert next(t for t in types if t != ERASED) == "provisioned", types

    @invariant()
    def tombstones_agree(self) -> None:
        for fp, _ in CHAINS.values():
            assert self.run(self.registry.is_erased(fp)) == (fp in self.tombstoned)

    @invariant()
    def audit_chain_intact_and_refusals_recorded(self) -> None:
        entries = self.run(self.registry.audit_entries())
        assert verify_chain(entries) == []
        assert self.run(self.registry.audit_head()) == (entries[-1].seq, entries[-1].hash)
        refused = [e.draft.reason for e in entries if e.draft.action == "refused"]
        assert refused == self.expected_refusals


TestLifecycle = LifecycleMachine.TestCase
TestLifecycle.settings = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
