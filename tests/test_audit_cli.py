"""``jitp audit verify|export|tail`` as an operator runs them, against a registry file tampered with sqlite3."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from jitp.app.service import PeerCredentials, ProvisioningService
from jitp.cli import AUDIT_FIELDS
from jitp.domain.audit import AuditDraft, entry_hash
from jitp.domain.records import Command
from jitp.registry.sqlite import SQLiteRegistry
from tests.jitp import pkitools as pt

JITP = [sys.executable, "-m", "jitp.cli"]

BASE = (datetime.now(UTC) + timedelta(minutes=1)).replace(microsecond=0)
DEV_A = "audit-dev-alpha"
DEV_B = "audit-dev-bravo"
PEER_A = "198.51.100.10:50001"
ENTRIES = 7


def at(hours: int) -> datetime:
    return BASE + timedelta(hours=hours)


def iso(hours: int) -> str:
    return at(hours).isoformat().replace("+00:00", "Z")


class Clock:
    def __init__(self) -> None:
        self.now = at(0)

    def __call__(self) -> datetime:
        return self.now


async def _build(path: Path) -> None:
    """Seven entries, one hour apart (entry N at BASE + N-1 hours):

    1 ca-registered  2 provisioned A  3 provisioned B  4 disabled A  5 refused A  6 enabled A  7 revoked B
    """
    clock = Clock()
    async with SQLiteRegistry(path, batch_window=0) as registry:
        service = ProvisioningService(registry, clock=clock)
        await registry.register_anchor(
            pt.MANUFACTURER_ANCHOR, audit=AuditDraft(at=at(0), action="ca-registered", actor="test")
        )
        await service.refresh_trust()
        chain_a = tuple(pt.chain_of(pt.leaf(DEV_A)))
        chain_b = tuple(pt.chain_of(pt.leaf(DEV_B)))
        clock.now = at(1)
        await service.admit(PeerCredentials(chain_a, DEV_A, PEER_A))
        clock.now = at(2)
        await service.admit(PeerCredentials(chain_b, DEV_B, "198.51.100.11:50002"))
        clock.now = at(3)
        await service.apply(Command.DISABLE, DEV_A, actor="local-admin:test")
        clock.now = at(4)
        with pytest.raises(Exception, match="disabled"):
            await service.admit(PeerCredentials(chain_a, DEV_A, PEER_A))
        clock.now = at(5)
        await service.apply(Command.ENABLE, DEV_A, actor="local-admin:test")
        clock.now = at(6)
        await service.apply(Command.REVOKE, DEV_B, actor="local-admin:test", reason="stolen")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    asyncio.run(_build(data / "registry.db"))
    return data


def jitp(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JITP, *args, "--data-dir", str(data)],
        cwd=data.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def tamper(data: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    db = sqlite3.connect(data / "registry.db")
    try:
        for i, sql in enumerate(statements):
            db.execute(sql, params if i == 0 else ())
        db.commit()
    finally:
        db.close()


def rows(data: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(data / "registry.db")
    try:
        return db.execute(
            "SELECT seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, hash "
            "FROM audit ORDER BY seq"
        ).fetchall()
    finally:
        db.close()


def assert_tampered(data: Path, *named: str) -> str:
    proc = jitp(data, "audit", "verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "TAMPERED" in proc.stdout
    for text in named:
        assert text in proc.stdout, proc.stdout
    return proc.stdout


# -- verify ---------------------------------------------------------------------------------
def test_verify_intact(data_dir: Path) -> None:
    proc = jitp(data_dir, "audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"intact: {ENTRIES} entries" in proc.stdout
    assert rows(data_dir)[-1][10] in proc.stdout  # the head hash


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("reason", "nothing to see"),
        ("actor", "device"),
        ("action", "enabled"),
        ("at", "2020-01-01T00:00:00+00:00"),
    ],
)
def test_verify_detects_a_modified_field(data_dir: Path, column: str, value: str) -> None:
    tamper(data_dir, f"UPDATE audit SET {column} = ? WHERE seq = 4", params=(value,))
    out = assert_tampered(data_dir, "entry 4: content does not match its hash")
    assert "entry 3" not in out  # the entries before it are fine


def test_verify_detects_modified_details(data_dir: Path) -> None:
    details = json.loads(str(rows(data_dir)[1][8]))
    details["region"] = "elsewhere"
    tamper(
        data_dir, "UPDATE audit SET details = ? WHERE seq = 2", params=(json.dumps(details, sort_keys=True),)
    )
    assert_tampered(data_dir, "entry 2: content does not match its hash")


def test_verify_detects_a_naively_forged_entry_at_the_end(data_dir: Path) -> None:
    last = rows(data_dir)[-1]
    tamper(
        data_dir,
        "INSERT INTO audit (seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, hash) "
        "VALUES (?, ?, 'allowed', 'local-admin', NULL, NULL, NULL, NULL, '{}', ?, ?)",
        params=(ENTRIES + 1, at(7).isoformat(), last[10], "f" * 64),
    )
    assert_tampered(data_dir, f"entry {ENTRIES + 1}: content does not match its hash")


def test_verify_detects_a_well_forged_entry_at_the_end(data_dir: Path) -> None:
    """A forger who knows the hash algorithm appends a valid-looking entry: the audit head catches it."""
    last = rows(data_dir)[-1]
    draft = AuditDraft(at=at(7), action="allowed", actor="local-admin")
    forged = entry_hash(draft, seq=ENTRIES + 1, prev_hash=str(last[10]))
    tamper(
        data_dir,
        "INSERT INTO audit (seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, hash) "
        "VALUES (?, ?, 'allowed', 'local-admin', NULL, NULL, NULL, NULL, '{}', ?, ?)",
        params=(ENTRIES + 1, at(7).isoformat(), last[10], forged),
    )
    assert_tampered(data_dir, f"entry {ENTRIES}", f"ends at {ENTRIES + 1}")


def test_verify_detects_a_forged_entry_inserted_in_the_middle(data_dir: Path) -> None:
    before = rows(data_dir)
    draft = AuditDraft(at=at(2), action="allowed", actor="local-admin")
    forged = entry_hash(draft, seq=4, prev_hash=str(before[2][10]))
    tamper(
        data_dir,
        "UPDATE audit SET seq = -seq WHERE seq >= 4",
        "UPDATE audit SET seq = 1 - seq WHERE seq < 0",  # -4 -> 5, ...: renumbered to make room
    )
    tamper(
        data_dir,
        "INSERT INTO audit (seq, at, action, actor, device_id, fingerprint, reason, peer, details, prev_hash, hash) "
        "VALUES (4, ?, 'allowed', 'local-admin', NULL, NULL, NULL, NULL, '{}', ?, ?)",
        params=(at(2).isoformat(), before[2][10], forged),
    )
    assert [r[0] for r in rows(data_dir)] == list(range(1, ENTRIES + 2))
    out = assert_tampered(data_dir, "entry 5: previous-hash link broken")
    assert "entry 4:" not in out  # the forged entry itself is internally consistent


def test_verify_detects_a_deleted_middle_entry(data_dir: Path) -> None:
    tamper(data_dir, "DELETE FROM audit WHERE seq = 4")
    assert_tampered(data_dir, "entry 5: expected sequence number 4", "entry 5: previous-hash link broken")


@pytest.mark.parametrize("removed", [1, 2, ENTRIES])
def test_verify_detects_deleted_newest_entries(data_dir: Path, removed: int) -> None:
    """Removing the tail leaves a chain that is valid on its own: the audit head is what tells."""
    tamper(data_dir, "DELETE FROM audit WHERE seq > ?", params=(ENTRIES - removed,))
    assert_tampered(
        data_dir,
        f"last appended entry {ENTRIES}",
        f"ends at {ENTRIES - removed}",
        "newest entries were removed",
    )


def test_verify_detects_reordered_entries(data_dir: Path) -> None:
    tamper(
        data_dir,
        "UPDATE audit SET seq = -1 WHERE seq = 3",
        "UPDATE audit SET seq = 3 WHERE seq = 4",
        "UPDATE audit SET seq = 4 WHERE seq = -1",
    )
    out = assert_tampered(data_dir, "entry 3: previous-hash link broken", "entry 3: content does not match")
    assert "entry 4:" in out and "entry 2:" not in out


def test_verify_detects_renumbered_entries(data_dir: Path) -> None:
    tamper(data_dir, "UPDATE audit SET seq = seq + 100")
    assert_tampered(data_dir, "entry 101: expected sequence number 1", "entry 101: content does not match")


def test_verify_detects_a_renumbered_gap_closed(data_dir: Path) -> None:
    """Delete entry 4 and renumber the rest to hide the gap: the hash links still break at 4."""
    tamper(data_dir, "DELETE FROM audit WHERE seq = 4", "UPDATE audit SET seq = seq - 1 WHERE seq > 4")
    assert_tampered(data_dir, "entry 4: previous-hash link broken", "entry 4: content does not match")


# -- export ----------------------------------------------------------------------------------
def _jsonl(proc: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_export_csv_has_header_and_one_row_per_entry(data_dir: Path) -> None:
    proc = jitp(data_dir, "audit", "export", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    table = list(csv.reader(io.StringIO(proc.stdout)))
    assert tuple(table[0]) == AUDIT_FIELDS
    body = table[1:]
    assert len(body) == ENTRIES
    assert [int(r[0]) for r in body] == list(range(1, ENTRIES + 1))
    actions = [r[AUDIT_FIELDS.index("action")] for r in body]
    assert actions == [
        "ca-registered",
        "provisioned",
        "provisioned",
        "disabled",
        "refused",
        "enabled",
        "revoked",
    ]
    for r in body:
        assert isinstance(json.loads(r[AUDIT_FIELDS.index("details")]), dict)
    assert body[1][AUDIT_FIELDS.index("device_id")] == DEV_A
    assert body[1][AUDIT_FIELDS.index("peer")] == PEER_A
    assert body[-1][AUDIT_FIELDS.index("reason")] == "stolen"
    stored = rows(data_dir)
    assert [r[AUDIT_FIELDS.index("hash")] for r in body] == [s[10] for s in stored]


def test_export_since_until(data_dir: Path) -> None:
    window = _jsonl(jitp(data_dir, "audit", "export", "--since", iso(2), "--until", iso(5)))
    assert [e["seq"] for e in window] == [3, 4, 5]  # since inclusive, until exclusive
    assert [e["seq"] for e in _jsonl(jitp(data_dir, "audit", "export", "--since", iso(5)))] == [6, 7]
    assert [e["seq"] for e in _jsonl(jitp(data_dir, "audit", "export", "--until", iso(1)))] == [1]
    # A time without a zone is UTC; another zone is converted.
    naive = at(2).replace(tzinfo=None).isoformat()
    assert [e["seq"] for e in _jsonl(jitp(data_dir, "audit", "export", "--since", naive))] == [3, 4, 5, 6, 7]
    plus_two = at(4).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert [e["seq"] for e in _jsonl(jitp(data_dir, "audit", "export", "--since", plus_two))] == [5, 6, 7]
    proc = jitp(data_dir, "audit", "export", "--format", "csv", "--since", iso(2), "--until", iso(5))
    table = list(csv.reader(io.StringIO(proc.stdout)))
    assert [int(r[0]) for r in table[1:]] == [3, 4, 5]


def test_export_pseudonymous_shows_refs_default_resolves(data_dir: Path) -> None:
    resolved = _jsonl(jitp(data_dir, "audit", "export"))
    pseudo = _jsonl(jitp(data_dir, "audit", "export", "--pseudonymous"))
    assert [e["seq"] for e in resolved] == [e["seq"] for e in pseudo] == list(range(1, ENTRIES + 1))
    assert [e["device_id"] for e in resolved] == [None, DEV_A, DEV_B, DEV_A, DEV_A, DEV_A, DEV_B]
    refs = [e["device_id"] for e in pseudo]
    assert refs[0] is None
    assert all(isinstance(r, str) and r.startswith("d:") for r in refs[1:])
    assert refs[1] == refs[3] == refs[4] == refs[5] != refs[2] == refs[6]
    text = json.dumps(pseudo)
    assert DEV_A not in text and DEV_B not in text and PEER_A.split(":")[0] not in text
    assert pseudo[1]["peer"].startswith("enc:")
    assert resolved[1]["peer"] == PEER_A and resolved[4]["peer"] == PEER_A
    # Both views carry the stored hashes: the resolved export is still checkable against the chain.
    assert [e["hash"] for e in resolved] == [e["hash"] for e in pseudo]


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_export_invalid_time_is_a_clear_error(data_dir: Path, option: str) -> None:
    proc = jitp(data_dir, "audit", "export", option, "yesterday-ish")
    assert proc.returncode == 2
    assert "not an ISO-8601 time" in proc.stderr and "yesterday-ish" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_tail_prints_the_newest_entries(data_dir: Path) -> None:
    proc = jitp(data_dir, "audit", "tail", "-n", "2")
    lines = _jsonl(proc)
    assert len(lines) == 2
    assert [e["seq"] for e in lines] == [ENTRIES - 1, ENTRIES]
    assert [e["device_id"] for e in lines] == [DEV_A, DEV_B]  # resolved, like export
    assert len(_jsonl(jitp(data_dir, "audit", "tail"))) == ENTRIES  # fewer than the default 10
