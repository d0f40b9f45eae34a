"""Cross-checks beyond CONNACKs: the service subscriber (provisioned events and telemetry) and the
local registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeAlias

from device_sim.backoff import Backoff
from device_sim.fleet import ServiceCreds, Target, client_context
from device_sim.mqtt import ConnectFailed, Message, MqttClient
from device_sim.report import EventCheck, RegionEvents, RegistryCheck, TelemetryCheck

EVENTS_FILTER = "$jitp/events/provisioned/+"
_PREFIX = "$jitp/events/provisioned/"
#: Where a device publishes telemetry (inside its own namespace, ``devices/<id>/#``).
TELEMETRY_FILTER = "devices/+/telemetry"

#: One telemetry message of a run: (device id, sequence number from 1).
MessageKey: TypeAlias = tuple[str, int]


def telemetry_topic(device_id: str) -> str:
    return f"devices/{device_id}/telemetry"


def telemetry_payload(run_id: str, device_id: str, seq: int) -> bytes:
    """A payload unique to (run, device, seq), so the subscriber counts loss and duplicates exactly."""
    return json.dumps({"run": run_id, "device": device_id, "seq": seq}, separators=(",", ":")).encode()


class _Arrivals:
    """Waiting on messages a subscriber receives: until a set of them is complete, or until quiet."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def _arrived(self) -> None:
        self._changed.set()

    async def _until(self, complete: Callable[[], bool], time_limit: float) -> bool:
        deadline = time.monotonic() + time_limit
        while not complete():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return True

    async def settle(self, quiet: float = 0.5, *, time_limit: float = 5.0) -> None:
        """Wait until nothing arrived for ``quiet`` seconds (late duplicates), at most ``time_limit``."""
        deadline = time.monotonic() + time_limit
        while time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(
                    self._changed.wait(), min(quiet, max(0.0, deadline - time.monotonic()))
                )
            except TimeoutError:
                return


@dataclass(frozen=True)
class SeenEvent:
    device_id: str
    event_id: str
    occurred_at: datetime | None
    received_at: float  # perf_counter()
    region: str | None = None  # the region the event names


class EventWatcher(_Arrivals):
    """A service client (persistent session, QoS 1) counting provisioned events.

    Reconnects with back-off if its connection drops; the persistent session keeps what was
    published meanwhile. Events that occurred before ``since`` (a persistent session's backlog
    from earlier runs) are counted as stale and otherwise ignored. It connects under the service
    certificate's CN (or the explicit ``client_id`` of ``creds``).

    With ``telemetry`` it also subscribes :data:`TELEMETRY_FILTER` at QoS 1 (on the same
    connection: a second one under the same client id would take the first over) and hands those
    messages to the tally; :meth:`stop` unsubscribes it again, so the persistent session does not
    keep queueing device telemetry between runs.
    """

    def __init__(
        self,
        target: Target,
        creds: ServiceCreds,
        *,
        since: datetime,
        telemetry: TelemetryTally | None = None,
    ) -> None:
        self.target = target
        self.creds = creds
        self.client_id = creds.mqtt_client_id
        self.since = since
        self.telemetry = telemetry
        self.events: list[SeenEvent] = []
        self.stale = 0
        self.malformed = 0
        self._ctx = client_context(target.ca, creds.cert, creds.key)
        self._client: MqttClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        super().__init__()

    async def start(self) -> None:
        self._client = await self._connect()
        self._task = asyncio.create_task(self._supervise(), name="jitp-sim-events")

    async def _connect(self) -> MqttClient:
        t = self.target
        client = await MqttClient.connect(
            t.host,
            t.port,
            ssl_context=self._ctx,
            client_id=self.client_id,
            server_hostname=t.server_hostname,
            keepalive=60,
            clean=False,
            time_limit=t.connect_timeout,
            on_message=self._on_message,
            protocol=t.protocol,
        )
        filters = [(EVENTS_FILTER, 1)]
        if self.telemetry is not None:
            filters.append((TELEMETRY_FILTER, 1))
        codes = await client.subscribe(filters)
        if codes != [1] * len(filters):
            await client.disconnect()
            raise ConnectFailed("subscribe_refused", f"SUBACK {codes} for {[f for f, _ in filters]}")
        return client

    async def _supervise(self) -> None:
        rng = random.Random()
        backoff = Backoff(base=0.2, cap=5.0, attempts=1_000_000)
        retry = 0
        while not self._stopping:
            client = self._client
            if client is not None:
                await asyncio.wait({client.closed}, timeout=20)
                if client.is_open:
                    with contextlib.suppress(ConnectFailed):
                        await client.ping(time_limit=20)
                    continue
            if self._stopping:
                return
            await asyncio.sleep(backoff.delay(retry, rng))
            try:
                self._client = await self._connect()
                retry = 0
            except ConnectFailed:
                self._client = None
                retry += 1

    def _on_message(self, _client: MqttClient, msg: Message) -> None:
        if not msg.topic.startswith(_PREFIX):
            if self.telemetry is not None:
                self.telemetry.on_message(msg)
            return
        try:
            doc = json.loads(msg.payload)
            device_id = str(doc["device_id"])
            event_id = str(doc["event_id"])
            occurred = _parse_time(doc.get("occurred_at"))
            region = doc.get("region")
            region = None if region is None else str(region)
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        if occurred is not None and occurred < self.since:
            self.stale += 1
            return
        self.events.append(SeenEvent(device_id, event_id, occurred, msg.received_at, region))
        self._arrived()

    def first_seen(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self.events:
            out.setdefault(e.device_id, e.received_at)
        return out

    async def wait_for(self, device_ids: Collection[str], *, time_limit: float) -> bool:
        """Wait until an event was seen for every id in ``device_ids`` (or the timeout)."""
        wanted = set(device_ids)

        def complete() -> bool:
            wanted.difference_update(e.device_id for e in self.events)
            return not wanted

        return await self._until(complete, time_limit)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._client is not None:
            if self.telemetry is not None and self._client.is_open:
                with contextlib.suppress(ConnectFailed):
                    await self._client.unsubscribe([TELEMETRY_FILTER], time_limit=5.0)
            await self._client.disconnect()

    def check(
        self,
        expected: Iterable[str],
        *,
        run_devices: Collection[str],
        regions: Mapping[str, str | None] | None = None,
    ) -> EventCheck:
        """Compare what was seen with the devices ``expected`` to produce a new event.

        ``regions``: the region each device's event must carry (device id -> region; None or
        absent: not checked). Every event of such a device that names another region is a mismatch,
        and the check is broken down by expected region.
        """
        expected_set = set(expected)
        run_set = set(run_devices)
        regions = regions or {}
        by_device: dict[str, set[str]] = {}
        named: dict[str, set[str | None]] = {}
        deliveries = 0
        for e in self.events:
            if e.device_id not in run_set:
                continue
            by_device.setdefault(e.device_id, set()).add(e.event_id)
            named.setdefault(e.device_id, set()).add(e.region)
            deliveries += 1
        distinct = sum(len(ids) for ids in by_device.values())
        mismatches: list[str] = []
        tallies: dict[str, _RegionTally] = {}
        for device in sorted(run_set):
            want = regions.get(device)
            if want is None:
                continue
            tally = tallies.setdefault(want, _RegionTally())
            if device in expected_set:
                tally.expected += 1
                if device in by_device:
                    tally.seen += 1
                else:
                    tally.lost += 1
            if len(by_device.get(device, ())) > 1:
                tally.duplicates += 1
            got = named.get(device, set())
            tally.observed.update(str(r) for r in got)
            wrong = sorted(str(r) for r in got if r != want)
            if wrong:
                tally.mismatched += 1
                mismatches.append(f"{device}: expected {want}, got {', '.join(wrong)}")
        return EventCheck(
            expected=len(expected_set),
            seen=len(expected_set & by_device.keys()),
            new_events=distinct,
            unexpected=tuple(sorted(by_device.keys() - expected_set)),
            duplicates=tuple(sorted(d for d, ids in by_device.items() if len(ids) > 1)),
            lost=tuple(sorted(expected_set - by_device.keys())),
            redeliveries=deliveries - distinct,
            stale=self.stale,
            region_mismatches=tuple(mismatches),
            by_region={r: t.freeze() for r, t in tallies.items()},
        )


class TelemetryTally(_Arrivals):
    """What the service subscriber received of one run's telemetry, by (device, seq).

    Messages on :data:`TELEMETRY_FILTER` that are not this run's (another run, a persistent
    session's backlog, real devices) are counted as foreign and otherwise ignored. One that carries
    this run's id on another device's topic is counted as misrouted.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.received: Counter[MessageKey] = Counter()
        self.foreign = 0
        self.misrouted = 0
        super().__init__()

    def on_message(self, msg: Message) -> None:
        try:
            doc = json.loads(msg.payload)
            run, device, seq = doc["run"], doc["device"], doc["seq"]
        except (ValueError, KeyError, TypeError):
            self.foreign += 1
            return
        if run != self.run_id:
            self.foreign += 1
            return
        if not isinstance(device, str) or not isinstance(seq, int) or msg.topic != telemetry_topic(device):
            self.misrouted += 1
        else:
            self.received[(device, seq)] += 1
        self._arrived()

    async def wait_for(self, keys: Collection[MessageKey], *, time_limit: float) -> bool:
        """Wait until every message in ``keys`` was received at least once (or the timeout)."""
        missing = set(keys)

        def complete() -> bool:
            missing.difference_update([k for k in missing if k in self.received])
            return not missing

        return await self._until(complete, time_limit)

    async def settle(self, quiet: float = 0.2, *, time_limit: float = 2.0) -> None:
        await super().settle(quiet, time_limit=time_limit)

    def check(
        self,
        *,
        sent: Collection[MessageKey],
        acked: Collection[MessageKey],
        devices: int,
        messages: int,
        publish_failures: Mapping[str, int] | None = None,
        publish_seconds: float = 0.0,
        delivery_seconds: float = 0.0,
    ) -> TelemetryCheck:
        return cross_check_telemetry(
            sent=sent,
            acked=acked,
            received=self.received,
            devices=devices,
            messages=messages,
            publish_failures=publish_failures,
            foreign=self.foreign,
            misrouted=self.misrouted,
            publish_seconds=publish_seconds,
            delivery_seconds=delivery_seconds,
        )


def cross_check_telemetry(
    *,
    sent: Collection[MessageKey],
    acked: Collection[MessageKey],
    received: Mapping[MessageKey, int],
    devices: int,
    messages: int,
    publish_failures: Mapping[str, int] | None = None,
    foreign: int = 0,
    misrouted: int = 0,
    publish_seconds: float = 0.0,
    delivery_seconds: float = 0.0,
) -> TelemetryCheck:
    """Compare what the devices sent and had acknowledged with what the subscriber received.

    ``received`` maps each message to how often it was delivered. Lost: acknowledged, never
    received. Duplicated: delivered more than once. Unknown: received but never sent.
    """
    sent_set = set(sent)
    acked_set = set(acked)
    got = {k for k, n in received.items() if n > 0}
    return TelemetryCheck(
        devices=devices,
        messages_per_device=messages,
        sent=len(sent_set),
        acked=len(acked_set),
        received=len(got & sent_set),
        deliveries=sum(n for k, n in received.items() if k in sent_set),
        lost=tuple(sorted(acked_set - got)),
        duplicated=tuple(sorted(k for k, n in received.items() if n > 1)),
        unacked_received=len((got & sent_set) - acked_set),
        unknown=tuple(sorted(got - sent_set)),
        misrouted=misrouted,
        foreign=foreign,
        publish_failures=dict(publish_failures or {}),
        publish_seconds=publish_seconds,
        delivery_seconds=delivery_seconds,
    )


@dataclass
class _RegionTally:
    expected: int = 0
    seen: int = 0
    lost: int = 0
    duplicates: int = 0
    mismatched: int = 0
    observed: Counter[str] = field(default_factory=Counter)

    def freeze(self) -> RegionEvents:
        return RegionEvents(
            self.expected, self.seen, self.lost, self.duplicates, self.mismatched, dict(self.observed)
        )


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RegistrySnapshot:
    """Device ids, when each was provisioned, and provisioned-event counts, from a local registry."""

    provisioned_at: dict[str, datetime]
    event_counts: dict[str, int]
    regions: dict[str, str] | None = None  # device id -> recorded region

    @classmethod
    async def read(cls, registry_path: Path) -> RegistrySnapshot:
        """Read-only, and only columns kept in clear (no master key needed, nothing migrated)."""
        return await asyncio.to_thread(cls._read, Path(registry_path))

    @classmethod
    def _read(cls, registry_path: Path) -> RegistrySnapshot:
        if not registry_path.exists():
            raise FileNotFoundError(f"no registry at {registry_path}")
        db = sqlite3.connect(f"{registry_path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            devices = db.execute("SELECT device_id, provisioned_at, region FROM devices").fetchall()
            counts: dict[str, int] = {}
            for (device_id,) in db.execute("SELECT device_id FROM outbox WHERE type = 'provisioned'"):
                counts[device_id] = counts.get(device_id, 0) + 1
        finally:
            db.close()
        return cls(
            {d: datetime.fromisoformat(at) for d, at, _ in devices},
            counts,
            {d: region for d, _, region in devices},
        )

    def check(
        self,
        joined: Iterable[str],
        *,
        refused: Iterable[str] = (),
        regions: Mapping[str, str | None] | None = None,
    ) -> RegistryCheck:
        """``regions``: the region each joined device must be recorded with (None: not checked)."""
        joined = list(joined)
        recorded = self.regions or {}
        wrong: list[str] = []
        for d in joined:
            want = (regions or {}).get(d)
            if want is not None and d in recorded and recorded[d] != want:
                wrong.append(f"{d}: expected {want}, got {recorded[d]}")
        return RegistryCheck(
            checked=len(joined),
            missing=tuple(d for d in joined if d not in self.provisioned_at),
            event_counts_wrong=tuple(d for d in joined if self.event_counts.get(d, 0) != 1),
            leaked=tuple(d for d in refused if d in self.provisioned_at or d in self.event_counts),
            region_mismatches=tuple(wrong),
        )

    def new_since(self, device_ids: Iterable[str], since: datetime) -> list[str]:
        return [d for d in device_ids if d in self.provisioned_at and self.provisioned_at[d] >= since]
