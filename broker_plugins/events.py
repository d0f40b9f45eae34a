"""Event plugin: the outbox publisher.

Events are written to the registry's outbox in the same transaction as the change they
describe. This publisher delivers them to MQTT subscribers at QoS 1 on
``$jitp/events/<type>/<device_id>`` (persistent service sessions get them when they return),
then marks them delivered. After a crash, undelivered events go out with their original
``event_id``, so consumers can de-duplicate.

With ``nats.enabled`` it also runs the NATS JetStream sink (:mod:`jitp.nats_sink`), which follows
the outbox with its own cursor, independent of MQTT delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

from broker_plugins.hardened import ADMISSION
from broker_plugins.runtime import runtime_of
from jitp import errors
from jitp.events import ProvisioningEvent
from jitp.nats_sink import NatsSink

CONFIG_EVENTS = ("provisioned", "reprovisioned", "config-changed")
RECENT_IDS = 20_000


def config_topic(device_id: str) -> str:
    """Where a device reads its effective configuration (retained; only that device may read it)."""
    return f"$jitp/devices/{device_id}/config"


def config_document(event: dict[str, Any]) -> dict[str, Any]:
    keys = ("device_id", "region", "attributes", "template", "template_version", "namespace", "profile")
    return {k: event.get(k) for k in keys}


log = logging.getLogger("jitp.events")


class JitpEventsPlugin(BasePlugin[BrokerContext]):
    @dataclass
    class Config:
        poll_interval: float = 1.0  # also picks up events written by other processes (the CLI)
        batch: int = 500

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fresh: list[ProvisioningEvent] = []
        self._node_cursor: str | None = None  # "mqtt:<node_id>" when several nodes share the registry
        self._relay_from: int | None = None  # that cursor, once read
        self._recent: dict[str, None] = {}  # ids published lately (insertion-ordered), never twice
        self.nats_sink: NatsSink | None = None

    async def on_broker_post_start(self) -> None:
        runtime = runtime_of(self.context)
        runtime.service.on_new_events(self._fresh_events)
        if runtime.config.node_id:
            self._node_cursor = f"mqtt:{runtime.config.node_id}"
        self._task = asyncio.create_task(self._run(), name="jitp-outbox-publisher")
        if runtime.config.nats.enabled:
            self.nats_sink = NatsSink(runtime.service.registry, runtime.config.nats)
            runtime.service.on_new_events(self.nats_sink.wake)
            await self.nats_sink.start()

    async def on_broker_pre_shutdown(self) -> None:
        if self.nats_sink is not None:
            await self.nats_sink.stop()
            self.nats_sink = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        """Re-retain a device's configuration if the broker lost it (retained messages live in memory)."""
        admission = client_session.attributes.get(ADMISSION)
        record = getattr(admission, "record", None)
        if record is None or admission.created or admission.reprovisioned:
            return  # a new (or renewed) device gets its config with its event, from the publisher
        if config_topic(record.device_id) in self.context.retained_messages:
            return
        doc = {
            "device_id": record.device_id,
            "region": record.region,
            "attributes": dict(record.attributes),
            "template": record.template,
            "template_version": record.template_version,
            **dict(record.config),
        }
        await self._deliver_config(record.device_id, doc)

    async def _deliver_config(self, device_id: str, doc: dict[str, Any]) -> None:
        payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        topic = config_topic(device_id)
        await self.context.retain_message(topic, payload, 1)
        await self.context.broadcast_message(topic, payload, qos=1)

    def _fresh_events(self, events: list[ProvisioningEvent]) -> None:
        self._fresh.extend(events)
        self._wake.set()

    async def _publish(self, events: list[ProvisioningEvent]) -> list[str]:
        published = []
        for event in events:
            if event.event_id in self._recent:
                continue
            await self.context.broadcast_message(event.topic, event.payload, qos=1)
            if event.type in CONFIG_EVENTS:
                await self._deliver_config(event.device_id, config_document(event.document()))
            self._recent[event.event_id] = None
            published.append(event.event_id)
            await runtime_of(self.context).enforce(event)  # also for relayed events: sessions live here
        while len(self._recent) > RECENT_IDS:
            self._recent.pop(next(iter(self._recent)))
        return published

    async def _relay_other_nodes(self, registry: Any) -> None:
        """With several nodes on one registry: deliver the events other nodes committed to this node's
        subscribers too, in outbox order, from this node's own cursor (events it published are skipped)."""
        assert self._node_cursor is not None
        if self._relay_from is None:
            cursor = await registry.sink_cursor(self._node_cursor)
            if cursor == 0:  # a new node starts at the present, not with the whole history
                cursor = await registry.outbox_head()
                await registry.set_sink_cursor(self._node_cursor, cursor)
            self._relay_from = cursor
        cursor = self._relay_from
        while True:
            batch = await registry.events_after(cursor, self.config.batch)
            if not batch:
                return
            await self._publish([event for _, event in batch])
            cursor = self._relay_from = batch[-1][0]
            await registry.set_sink_cursor(self._node_cursor, cursor)

    async def _run(self) -> None:
        service = runtime_of(self.context).service
        registry, clock = service.registry, service.clock
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.config.poll_interval
        while True:
            # The outbox is polled on a deadline, so a steady stream of joins cannot starve it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_poll - loop.time()))
            self._wake.clear()
            polled = loop.time() >= next_poll
            if polled:
                next_poll = loop.time() + self.config.poll_interval
            try:
                # Events this node just committed are handed over in memory: no read-back.
                while self._fresh:
                    fresh, self._fresh = self._fresh, []
                    await registry.mark_delivered(await self._publish(fresh), at=clock())
                # Anything else pending: written by another process (the CLI), or left by a crash.
                while polled:
                    pending = await registry.pending_events(self.config.batch)
                    if not pending:
                        break
                    await self._publish(pending)
                    await registry.mark_delivered([e.event_id for e in pending], at=clock())
                if polled and self._node_cursor is not None:
                    await self._relay_other_nodes(registry)
            except errors.ProvisioningError as exc:
                log.error("outbox delivery paused: %s", exc)
                await asyncio.sleep(self.config.poll_interval)
