"""Issue 12, finding 12: session takeovers are coalesced like refusals.

Two clones of one certificate taking the session from each other wrote an audit entry per takeover
(~19/s). Within ``audit.coalesce_window`` the first takeover of a device is written at once and the
rest are counted into one entry, written when the window closes (or at shutdown).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from jitp import errors
from jitp.app.service import ProvisioningService
from jitp.domain.audit import AuditDraft
from jitp.registry.sqlite import SQLiteRegistry

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WINDOW = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def _takeover(service: ProvisioningService, device: str, peer: str, previous: str) -> bool:
    """What the broker's W7 takeover path records (broker_plugins/broker.py)."""
    return await service.record_event(
        "session-takeover",
        device_id=device,
        peer=peer,
        reason="duplicate_client_id",
        details={"previous_peer": previous, "same_certificate": "true"},
    )


def _run(
    tmp_path: Path, body: Callable[[ProvisioningService, FakeClock], Awaitable[None]], **kw: Any
) -> None:
    async def go() -> None:
        clock = FakeClock()
        async with SQLiteRegistry(tmp_path / "registry.db", batch_window=0) as registry:
            service = ProvisioningService(
                registry, clock=clock, coalesce_window=kw.pop("window", WINDOW), **kw
            )
            await body(service, clock)

    asyncio.run(go())


async def _takeovers(service: ProvisioningService) -> list[AuditDraft]:
    """The session-takeover entries, resolved (device id and peer in clear), oldest first."""
    registry = service.registry
    entries = await registry.resolve_audit(await registry.audit_entries())
    return [e.draft for e in entries if e.draft.action == "session-takeover"]


def test_ping_pong_is_one_entry_at_once_and_one_counted_entry(tmp_path: Path) -> None:
    async def body(service: ProvisioningService, clock: FakeClock) -> None:
        a, b = "10.0.0.1", "10.0.0.2"
        written = []
        for i in range(40):  # ~19/s, as reported: 40 takeovers in about two seconds
            new, old = (
                (f"{a}:{5000 + i}", f"{b}:{5000 + i - 1}")
                if i % 2 == 0
                else (f"{b}:{5000 + i}", f"{a}:{5000 + i - 1}")
            )
            written.append(await _takeover(service, "clone-1", new, old))
            clock.advance(0.05)
        assert written == [True] + [False] * 39
        [first] = await _takeovers(service)  # the first one, at once: an operator sees it immediately
        assert (first.device_id, first.peer, first.at) == ("clone-1", f"{a}:5000", T0)
        assert "coalesced" not in first.details

        assert await service.flush_refusals() == 0  # the window is still open
        clock.advance(WINDOW)
        assert await service.flush_refusals() == 39
        first, counted = await _takeovers(service)
        assert counted.device_id == "clone-1" and counted.reason == "duplicate_client_id"
        assert counted.details["coalesced"] == "true"
        assert counted.details["count"] == "39"  # the takeovers after the first
        assert counted.details["first_at"] == T0.isoformat()
        assert counted.details["last_at"] == (T0 + timedelta(seconds=39 * 0.05)).isoformat()
        assert counted.at == T0 + timedelta(seconds=39 * 0.05)
        assert counted.peer == f"{b}:5039"  # the last takeover: b took the session from a
        assert counted.details["previous_peer"] == f"{a}:5038"
        assert counted.details["peer_hosts"] == "2"  # two machines share the certificate
        assert len(await _takeovers(service)) == 2

    _run(tmp_path, body)


def test_windows_are_per_device_and_other_events_are_never_coalesced(tmp_path: Path) -> None:
    async def body(service: ProvisioningService, clock: FakeClock) -> None:
        for _ in range(3):
            await _takeover(service, "dev-a", "10.0.0.1:1", "10.0.0.2:2")
            await _takeover(service, "dev-b", "10.0.0.3:1", "10.0.0.4:2")
            await service.record_event("session-closed", device_id="dev-a", reason="revoked")
        assert [d.device_id for d in await _takeovers(service)] == ["dev-a", "dev-b"]
        closed = [e for e in await service.registry.audit_entries() if e.draft.action == "session-closed"]
        assert len(closed) == 3
        # A refusal of the same device is another cause: its window is its own.
        await service.record_refusal(
            errors.ClientIdMismatch("mismatch", device_id="dev-a"), peer="10.0.0.9:1"
        )
        assert await service.flush_refusals(force=True) == 4  # 2 per device
        counts = {d.device_id: d.details["count"] for d in await _takeovers(service) if "count" in d.details}
        assert counts == {"dev-a": "2", "dev-b": "2"}

    _run(tmp_path, body)


def test_a_closed_window_not_yet_flushed_is_written_before_the_next_first_entry(tmp_path: Path) -> None:
    async def body(service: ProvisioningService, clock: FakeClock) -> None:
        for _ in range(5):
            await _takeover(service, "clone-2", "10.0.0.1:1", "10.0.0.2:1")
        clock.advance(WINDOW + 1)  # closed, but the broker's periodic flush has not run yet
        assert await _takeover(service, "clone-2", "10.0.0.2:2", "10.0.0.1:1")
        first, counted, next_first = await _takeovers(service)
        assert "count" not in first.details and "count" not in next_first.details
        assert counted.details["count"] == "4"  # not lost when the new window replaced it
        assert next_first.at == T0 + timedelta(seconds=WINDOW + 1)

    _run(tmp_path, body)


def test_refusals_share_the_mechanism_and_no_longer_lose_a_closed_window(tmp_path: Path) -> None:
    """Before, a refusal opening a new window replaced a closed one not yet flushed, and its count was lost."""

    async def body(service: ProvisioningService, clock: FakeClock) -> None:
        for _ in range(3):
            await service.record_refusal(
                errors.ClientIdMismatch("mismatch", device_id="r1"), peer="10.0.0.1:1"
            )
        clock.advance(WINDOW + 1)
        await service.record_refusal(errors.ClientIdMismatch("mismatch", device_id="r1"), peer="10.0.0.1:2")
        refused = [e.draft for e in await service.registry.audit_entries() if e.draft.action == "refused"]
        assert [d.details.get("count") for d in refused] == [None, "2", None]

    _run(tmp_path, body)


def test_shutdown_writes_the_open_window(tmp_path: Path) -> None:
    async def body(service: ProvisioningService, clock: FakeClock) -> None:
        for i in range(7):
            await _takeover(service, "clone-3", f"10.0.0.{i % 2}:1", "x:1")
        assert len(await _takeovers(service)) == 1
        assert await service.flush_refusals(force=True) == 6  # what JitpServer.stop() calls
        assert [d.details.get("count") for d in await _takeovers(service)] == [None, "6"]

    _run(tmp_path, body)


def test_without_a_window_every_takeover_is_written(tmp_path: Path) -> None:
    async def body(service: ProvisioningService, clock: FakeClock) -> None:
        for _ in range(4):
            assert await _takeover(service, "clone-4", "10.0.0.1:1", "10.0.0.2:1")
        assert len(await _takeovers(service)) == 4
        assert await service.flush_refusals(force=True) == 0

    _run(tmp_path, body, window=0.0)


# -- no takeover is ever lost or written twice, whatever the timing --------------------------------------
class _Collector:
    """An append-only audit sink (the property below runs hundreds of schedules: no database each)."""

    def __init__(self) -> None:
        self.drafts: list[AuditDraft] = []

    async def append_audit(self, drafts: list[AuditDraft]) -> None:
        self.drafts.extend(drafts)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["d1", "d2", "d3"]), st.floats(0, 2 * WINDOW), st.booleans()), max_size=40
    )
)
def test_counts_add_up_and_first_entries_are_a_window_apart(steps: list[tuple[str, float, bool]]) -> None:
    async def go() -> None:
        clock, sink = FakeClock(), _Collector()
        service = ProvisioningService(sink, clock=clock, coalesce_window=WINDOW)  # type: ignore[arg-type]
        for device, dt, flush in steps:
            clock.advance(dt)
            if flush:
                await service.flush_refusals()
            await _takeover(service, device, "10.0.0.1:1", "10.0.0.2:1")
        await service.flush_refusals(force=True)
        for device in ("d1", "d2", "d3"):
            mine = [d for d in sink.drafts if d.device_id == device]
            total = sum(int(d.details.get("count", "1")) for d in mine)
            assert total == sum(1 for s in steps if s[0] == device)
            firsts = [d.at for d in mine if "count" not in d.details]
            assert all((b - a).total_seconds() >= WINDOW for a, b in itertools.pairwise(firsts))

    asyncio.run(go())
