"""The outbox publisher.

Events are written to the registry's outbox in the same transaction as the change they
describe. This publisher delivers them to MQTT subscribers at QoS 1 on
``$jitp/events/<type>/<device_id>`` (persistent service sessions get them when they return),
then marks them delivered. After a crash, undelivered events go out with their original
``event_id``, so consumers can de-duplicate.

With ``nats.enabled`` it also runs the NATS JetStream sink (:mod:`jitp.integration.nats_sink`), which follows
the outbox with its own cursor, independent of MQTT delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol

from jitp import errors
from jitp.app.service import ProvisioningService
from jitp.config import Config
from jitp.domain.events import CONFIG_EVENTS, ProvisioningEvent, config_payload, config_topic
from jitp.domain.routing import MessageProperties
from jitp.integration.nats_sink import NatsSink
from jitp.registry import Registry

log = logging.getLogger("jitp.events")

RECENT_IDS = 20_000
POLL_INTERVAL = 1.0  # s; also picks up events written by other processes (the CLI)
BATCH = 500
# What an MQTT 5 subscriber sees beside the JSON (a 3.1.1 subscriber gets the JSON alone).
EVENT_PROPERTIES = MessageProperties(
    payload_format_indicator=1,
    content_type="application/json",
    user_properties=(("schema", "jitp.event/1"),),
)


class Delivery(Protocol):
    """Where events go (the broker)."""

    def route(
        self,
        topic: str,
        data: bytes,
        qos: int,
        *,
        properties: MessageProperties = ...,
        skip_shares: Collection[str] = ...,
    ) -> int: ...

    def retain_own(self, topic: str, data: bytes, qos: int) -> None:
        """Retain a message of the broker's own (never refused by a quota)."""


class OutboxPublisher:
    def __init__(
        self,
        config: Config,
        service: ProvisioningService,
        delivery: Delivery,
        *,
        on_event: Callable[[ProvisioningEvent], Awaitable[None]],
    ) -> None:
        self.config = config
        self.service = service
        self.delivery = delivery
        self.on_event = on_event
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fresh: list[ProvisioningEvent] = []
        # "mqtt:<node_id>" when several nodes share the registry
        self._node_cursor = f"mqtt:{config.node_id}" if config.node_id else None
        self._relay_from: int | None = None  # that cursor, once read
        self._from_peers: list[ProvisioningEvent] = []  # committed by other workers of this machine
        self._served_by_peer: dict[str, tuple[str, ...]] = {}  # event id -> shared subscriptions
        self._recent: dict[str, None] = {}  # ids published lately (insertion-ordered), never twice
        self.nats_sink: NatsSink | None = None

    async def start(self) -> None:
        if self._node_cursor is not None:
            # Where this node's relay starts, fixed now: events other nodes commit from here on are
            # relayed even if they come before the first poll.
            await self._relay_cursor(self.service.registry)
        self.service.on_new_events(self._fresh_events)
        self._task = asyncio.create_task(self._run(), name="jitp-outbox-publisher")
        if self.config.nats.enabled:
            self.nats_sink = NatsSink(self.service.registry, self.config.nats)
            self.service.on_new_events(self.nats_sink.wake)
            await self.nats_sink.start()

    async def stop(self) -> None:
        if self.nats_sink is not None:
            await self.nats_sink.stop()
            self.nats_sink = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def relayed(self, events: list[ProvisioningEvent], shares: dict[str, tuple[str, ...]]) -> None:
        """Events another worker of the same `jitp serve` committed (handed over by the relay right
        after its commit): published here at once, except to the shared subscriptions ``shares``
        (event id -> keys) that worker serves. This node's cursor still reads them from the outbox
        at its next poll, and skips them then (see :mod:`broker_plugins.relay`)."""
        self._from_peers.extend(events)
        self._served_by_peer.update(shares)
        self._wake.set()

    def _fresh_events(self, events: list[ProvisioningEvent]) -> None:
        self._fresh.extend(events)
        self._wake.set()

    async def _publish(self, events: list[ProvisioningEvent]) -> list[str]:
        published = []
        for event in events:
            skip = self._served_by_peer.pop(event.event_id, ())
            if event.event_id in self._recent:
                continue
            self.delivery.route(event.topic, event.payload, 1, properties=EVENT_PROPERTIES, skip_shares=skip)
            if event.type in CONFIG_EVENTS:
                payload = config_payload(event.document())
                topic = config_topic(event.device_id)
                self.delivery.retain_own(topic, payload, 1)
                self.delivery.route(topic, payload, 1)
            self._recent[event.event_id] = None
            published.append(event.event_id)
            await self.on_event(event)  # also for relayed events: sessions live here
        while len(self._recent) > RECENT_IDS:
            self._recent.pop(next(iter(self._recent)))
        return published

    async def _relay_other_nodes(self, registry: Registry) -> None:
        """With several nodes on one registry: deliver the events other nodes committed to this node's
        subscribers too, in outbox order, from this node's own cursor (events it published are skipped)."""
        assert self._node_cursor is not None
        cursor = await self._relay_cursor(registry)
        while True:
            batch = await registry.events_after(cursor, BATCH)
            if not batch:
                return
            await self._publish([event for _, event in batch])
            cursor = self._relay_from = batch[-1][0]
            await registry.set_sink_cursor(self._node_cursor, cursor)

    async def _relay_cursor(self, registry: Registry) -> int:
        assert self._node_cursor is not None
        if self._relay_from is None:
            cursor = await registry.sink_cursor(self._node_cursor)
            if cursor == 0:  # a new node starts at the present, not with the whole history
                cursor = await registry.outbox_head()
                await registry.set_sink_cursor(self._node_cursor, cursor)
            self._relay_from = cursor
        return self._relay_from

    async def _run(self) -> None:
        registry, clock = self.service.registry, self.service.clock
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + POLL_INTERVAL
        while True:
            # The outbox is polled on a deadline, so a steady stream of joins cannot starve it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_poll - loop.time()))
            self._wake.clear()
            polled = loop.time() >= next_poll
            if polled:
                next_poll = loop.time() + POLL_INTERVAL
            try:
                # Events this node just committed are handed over in memory: no read-back.
                while self._fresh:
                    fresh, self._fresh = self._fresh, []
                    await registry.mark_delivered(await self._publish(fresh), at=clock())
                # Anything else pending: written by another process (the CLI), or left by a crash.
                while polled:
                    pending = await registry.pending_events(BATCH)
                    if not pending:
                        break
                    await self._publish(pending)
                    await registry.mark_delivered([e.event_id for e in pending], at=clock())
                while self._from_peers:  # their origin marks them delivered
                    relayed, self._from_peers = self._from_peers, []
                    await self._publish(relayed)
                if polled and self._node_cursor is not None:
                    await self._relay_other_nodes(registry)
            except errors.ProvisioningError as exc:
                log.error("outbox delivery paused: %s", exc)
                await asyncio.sleep(POLL_INTERVAL)
