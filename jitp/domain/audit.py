"""The audit trail: append-only, hash-chained entries.

Each entry's hash is SHA-256 over its canonical JSON (without the hash) including the previous
entry's hash, so modifying, inserting or removing an entry breaks the chain from there on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class AuditDraft:
    """An entry before the registry assigns its sequence number and hash."""

    at: datetime
    action: str  # provisioned, refused, ca-registered, session-takeover, ...
    actor: str  # "device", "broker", "local-admin", ...
    device_id: str | None = None
    fingerprint: str | None = None
    reason: str | None = None
    peer: str | None = None
    details: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    draft: AuditDraft
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, **_fields(self.draft), "prev_hash": self.prev_hash, "hash": self.hash}


def _fields(d: AuditDraft) -> dict[str, Any]:
    return {
        # Normalised to UTC, as the registry stores it: the hash of an entry read back from storage
        # must not depend on the time zone the draft's timestamp happened to carry.
        "at": d.at.astimezone(UTC).isoformat(),
        "action": d.action,
        "actor": d.actor,
        "device_id": d.device_id,
        "fingerprint": d.fingerprint,
        "reason": d.reason,
        "peer": d.peer,
        "details": dict(d.details),
    }


def canonical(draft: AuditDraft, *, seq: int, prev_hash: str) -> bytes:
    return json.dumps(
        {"seq": seq, **_fields(draft), "prev_hash": prev_hash}, sort_keys=True, separators=(",", ":")
    ).encode()


def entry_hash(draft: AuditDraft, *, seq: int, prev_hash: str) -> str:
    return hashlib.sha256(canonical(draft, seq=seq, prev_hash=prev_hash)).hexdigest()


def chain(drafts: Iterable[AuditDraft], *, start_seq: int, prev_hash: str) -> list[AuditEntry]:
    out = []
    for i, d in enumerate(drafts):
        h = entry_hash(d, seq=start_seq + i, prev_hash=prev_hash)
        out.append(AuditEntry(seq=start_seq + i, draft=d, prev_hash=prev_hash, hash=h))
        prev_hash = h
    return out


def verify_chain(entries: Iterable[AuditEntry]) -> list[str]:
    """Problems found in a sequence of entries (empty when the chain is intact)."""
    problems = []
    prev = GENESIS_HASH
    expected_seq = 1
    for e in entries:
        if e.seq != expected_seq:
            problems.append(
                f"entry {e.seq}: expected sequence number {expected_seq} (inserted or removed entry)"
            )
        if e.prev_hash != prev:
            problems.append(
                f"entry {e.seq}: previous-hash link broken (an entry before it was changed or removed)"
            )
        if entry_hash(e.draft, seq=e.seq, prev_hash=e.prev_hash) != e.hash:
            problems.append(f"entry {e.seq}: content does not match its hash (modified)")
        prev = e.hash
        expected_seq = e.seq + 1
    return problems
