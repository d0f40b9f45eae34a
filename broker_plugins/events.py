"""Event plugin: the outbox publisher.

Events are written to the registry's outbox in the same transaction as the change they
describe. This publisher delivers them to MQTT subscribers at QoS 1 on
``$jitp/events/<type>/<device_id>`` (persistent service sessions get them when they return),
then marks them delivered. After a crash, undelivered events go out with their original
``event_id``, so consumers can de-duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin

from broker_plugins.runtime import runtime_of
from jitp import errors

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

    async def on_broker_post_start(self) -> None:
        runtime = runtime_of(self.context)
        runtime.service.on_new_events(self._wake.set)
        self._task = asyncio.create_task(self._run(), name="jitp-outbox-publisher")

    async def on_broker_pre_shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        registry = runtime_of(self.context).service.registry
        clock = runtime_of(self.context).service.clock
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
            self._wake.clear()
            try:
                while True:
                    pending = await registry.pending_events(self.config.batch)
                    if not pending:
                        break
                    for event in pending:
                        await self.context.broadcast_message(event.topic, event.payload, qos=1)
                    await registry.mark_delivered([e.event_id for e in pending], at=clock())
            except errors.ProvisioningError as exc:
                log.error("outbox delivery paused: %s", exc)
                await asyncio.sleep(self.config.poll_interval)
