"""The audit hash chain: intact chains verify; every kind of tampering is found at the right entry."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from jitp.domain.audit import GENESIS_HASH, AuditDraft, AuditEntry, canonical, chain, entry_hash, verify_chain

T0 = datetime(2026, 1, 1, tzinfo=UTC)

optional_text = st.none() | st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8)
json_values = (
    scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4), scalars, max_size=2)
)
drafts = st.builds(
    AuditDraft,
    at=st.integers(0, 10**8).map(lambda s: T0 + timedelta(seconds=s, microseconds=s % 1000)),
    action=st.sampled_from(
        ["provisioned", "refused", "ca-registered", "session-takeover", "device-disabled"]
    ),
    actor=st.sampled_from(["device", "broker", "local-admin"]),
    device_id=optional_text,
    fingerprint=st.none() | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    reason=optional_text,
    peer=optional_text,
    details=st.dictionaries(st.text(max_size=6), json_values, max_size=3).map(MappingProxyType),
)
draft_lists = st.lists(drafts, min_size=1, max_size=6)


def build(ds: list[AuditDraft]) -> list[AuditEntry]:
    return chain(ds, start_seq=1, prev_hash=GENESIS_HASH)


def seqs_named(problems: list[str]) -> list[int]:
    out = []
    for p in problems:
        m = re.match(r"entry (\d+): ", p)
        assert m, p
        out.append(int(m.group(1)))
    return out


def test_empty_chain_is_intact() -> None:
    assert verify_chain([]) == []


def test_chain_links_entries() -> None:
    ds = [AuditDraft(at=T0, action="provisioned", actor="broker", device_id=f"d{i}") for i in range(3)]
    entries = build(ds)
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS_HASH
    assert entries[1].prev_hash == entries[0].hash
    assert entries[2].prev_hash == entries[1].hash
    assert len({e.hash for e in entries}) == 3
    assert all(re.fullmatch(r"[0-9a-f]{64}", e.hash) for e in entries)
    assert entries[1].to_json()["device_id"] == "d1"
    assert entries[1].to_json()["hash"] == entries[1].hash
    # Appending later continues the same chain.
    more = chain(ds[:1], start_seq=4, prev_hash=entries[-1].hash)
    assert verify_chain(entries + more) == []


@settings(max_examples=100)
@given(draft_lists)
def test_intact_chains_verify(ds: list[AuditDraft]) -> None:
    entries = build(ds)
    assert verify_chain(entries) == []
    # Deterministic: the same drafts always give the same hashes.
    assert [e.hash for e in build(ds)] == [e.hash for e in entries]


def _changed(draft: AuditDraft, field: str, data: st.DataObject) -> AuditDraft:
    old = getattr(draft, field)
    if field == "at":
        new: Any = old + timedelta(microseconds=data.draw(st.integers(1, 10**9)))
    elif field == "details":
        new = MappingProxyType({**old, "tampered": data.draw(json_values)})
    elif field == "fingerprint":
        new = ("f" * 64) if old != "f" * 64 else ("e" * 64)
    else:
        new = data.draw(optional_text.filter(lambda v: v != old and v is not None))
    return dataclasses.replace(draft, **{field: new})


FIELDS = ["at", "action", "actor", "device_id", "fingerprint", "reason", "peer", "details"]


@settings(max_examples=120)
@given(draft_lists, st.data())
def test_modifying_any_field_is_detected_at_that_entry(ds: list[AuditDraft], data: st.DataObject) -> None:
    entries = build(ds)
    k = data.draw(st.integers(0, len(entries) - 1))
    field = data.draw(st.sampled_from(FIELDS))
    tampered = list(entries)
    tampered[k] = dataclasses.replace(entries[k], draft=_changed(entries[k].draft, field, data))
    problems = verify_chain(tampered)
    assert seqs_named(problems) == [k + 1], problems
    assert "modified" in problems[0]


@settings(max_examples=100)
@given(draft_lists, st.data())
def test_modifying_a_hash_or_link_is_detected(ds: list[AuditDraft], data: st.DataObject) -> None:
    entries = build(ds)
    k = data.draw(st.integers(0, len(entries) - 1))
    what = data.draw(st.sampled_from(["hash", "prev_hash"]))
    tampered = list(entries)
    tampered[k] = dataclasses.replace(entries[k], **{what: "1" * 64})
    named = seqs_named(verify_chain(tampered))
    assert named[0] == k + 1
    if what == "hash" and k + 1 < len(entries):
        assert k + 2 in named  # the next entry's link no longer matches


@settings(max_examples=100)
@given(draft_lists, st.data())
def test_re_hashed_modification_is_detected_at_the_next_entry(
    ds: list[AuditDraft], data: st.DataObject
) -> None:
    """An attacker who recomputes the modified entry's hash still breaks the following link."""
    entries = build(ds)
    k = data.draw(st.integers(0, len(entries) - 2)) if len(entries) > 1 else 0
    draft = _changed(entries[k].draft, data.draw(st.sampled_from(FIELDS)), data)
    forged = AuditEntry(
        seq=k + 1,
        draft=draft,
        prev_hash=entries[k].prev_hash,
        hash=entry_hash(draft, seq=k + 1, prev_hash=entries[k].prev_hash),
    )
    tampered = [*entries[:k], forged, *entries[k + 1 :]]
    problems = verify_chain(tampered)
    if k + 1 < len(entries):
        assert seqs_named(problems) == [k + 2], problems
        assert "link broken" in problems[0]
    else:  # rewriting the newest entry is indistinguishable from having appended it
        assert problems == []


@settings(max_examples=100)
@given(draft_lists, drafts, st.data())
def test_inserting_an_entry_is_detected(ds: list[AuditDraft], extra: AuditDraft, data: st.DataObject) -> None:
    entries = build(ds)
    i = data.draw(st.integers(0, len(entries) - 1))  # insert before entries[i]
    prev = entries[i - 1].hash if i else GENESIS_HASH
    seq = data.draw(st.sampled_from([i + 1, i + 2, 99]))
    # The best forgery: correctly hashed and linked to its predecessor.
    inserted = AuditEntry(
        seq=seq, draft=extra, prev_hash=prev, hash=entry_hash(extra, seq=seq, prev_hash=prev)
    )
    problems = verify_chain([*entries[:i], inserted, *entries[i:]])
    assert problems
    named = seqs_named(problems)
    # Found at the inserted entry (bad sequence number) or at the original entry after it.
    assert named[0] in {seq, i + 1}
    assert i + 1 in named or seq in named


@settings(max_examples=100)
@given(draft_lists.filter(lambda ds: len(ds) >= 2), st.data())
def test_removing_an_entry_is_detected_at_its_successor(ds: list[AuditDraft], data: st.DataObject) -> None:
    entries = build(ds)
    i = data.draw(st.integers(0, len(entries) - 2))  # not the newest: see test_truncation_...
    problems = verify_chain(entries[:i] + entries[i + 1 :])
    assert seqs_named(problems) == [i + 2, i + 2], problems
    assert f"expected sequence number {i + 1}" in problems[0]
    assert "link broken" in problems[1]


@settings(max_examples=100)
@given(draft_lists.filter(lambda ds: len(ds) >= 2), st.data())
def test_reordering_is_detected(ds: list[AuditDraft], data: st.DataObject) -> None:
    entries = build(ds)
    i, j = sorted(data.draw(st.lists(st.integers(0, len(entries) - 1), min_size=2, max_size=2, unique=True)))
    swapped = list(entries)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    problems = verify_chain(swapped)
    assert problems
    # The first problem is at position i: the entry now there (seq j+1) should have been seq i+1.
    assert problems[0].startswith(f"entry {j + 1}: expected sequence number {i + 1}")


@settings(max_examples=100)
@given(draft_lists, st.data())
def test_changing_a_sequence_number_is_detected(ds: list[AuditDraft], data: st.DataObject) -> None:
    entries = build(ds)
    k = data.draw(st.integers(0, len(entries) - 1))
    new_seq = data.draw(st.integers(0, 50).filter(lambda s: s != k + 1))
    tampered = list(entries)
    tampered[k] = dataclasses.replace(entries[k], seq=new_seq)
    problems = verify_chain(tampered)
    assert problems[0] == f"entry {new_seq}: expected sequence number {k + 1} (inserted or removed entry)"
    assert any("modified" in p for p in problems)  # the sequence number is hashed too


def test_truncation_of_the_newest_entries_is_not_detectable_from_the_entries_alone() -> None:
    """Documented limit: a chain cut short is still a valid chain; compare with the known head."""
    ds = [AuditDraft(at=T0, action="refused", actor="broker") for _ in range(3)]
    assert verify_chain(build(ds)[:2]) == []


def test_chain_must_start_at_genesis() -> None:
    ds = [AuditDraft(at=T0, action="refused", actor="broker") for _ in range(3)]
    entries = build(ds)
    problems = verify_chain(entries[1:])
    assert seqs_named(problems)[0] == 2


def test_canonical_form_is_sorted_compact_json() -> None:
    draft = AuditDraft(
        at=T0, action="refused", actor="broker", details=MappingProxyType({"b": 1, "a": [1, 2]})
    )
    data = canonical(draft, seq=7, prev_hash=GENESIS_HASH)
    parsed = json.loads(data)
    assert (
        parsed["seq"] == 7
        and parsed["prev_hash"] == GENESIS_HASH
        and parsed["details"] == {"a": [1, 2], "b": 1}
    )
    assert data == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    assert "hash" not in parsed


def test_the_hash_does_not_depend_on_the_time_zone_of_the_timestamp() -> None:
    """The registry stores timestamps in UTC; an entry read back must verify."""
    local = T0.astimezone(timezone(timedelta(hours=2)))
    a = AuditDraft(at=T0, action="refused", actor="broker")
    b = dataclasses.replace(a, at=local)
    assert entry_hash(a, seq=1, prev_hash=GENESIS_HASH) == entry_hash(b, seq=1, prev_hash=GENESIS_HASH)
    written = build([b])
    read_back = [
        dataclasses.replace(
            written[0], draft=dataclasses.replace(b, at=datetime.fromisoformat(T0.isoformat()))
        )
    ]
    assert verify_chain(read_back) == []


@settings(max_examples=100)
@given(draft_lists)
def test_entries_survive_a_json_round_trip(ds: list[AuditDraft]) -> None:
    """What the registry does: store details as JSON text, timestamps as UTC ISO strings, and read back."""
    entries = build(ds)
    read_back = []
    for e in entries:
        row = e.to_json()
        draft = AuditDraft(
            at=datetime.fromisoformat(row["at"]),
            action=row["action"],
            actor=row["actor"],
            device_id=row["device_id"],
            fingerprint=row["fingerprint"],
            reason=row["reason"],
            peer=row["peer"],
            details=MappingProxyType(json.loads(json.dumps(row["details"], sort_keys=True))),
        )
        read_back.append(
            AuditEntry(seq=row["seq"], draft=draft, prev_hash=row["prev_hash"], hash=row["hash"])
        )
    assert verify_chain(read_back) == []
