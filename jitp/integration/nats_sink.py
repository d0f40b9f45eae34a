"""The NATS JetStream event sink: every outbox event, in outbox order, on an integration bus.

Each event is published to the stream ``nats.stream`` on the subject

    <subject_prefix>.<type>.<region>.<device_id>        e.g. jitp.events.provisioned.eu-west.dev-1

with header ``Nats-Msg-Id: <event_id>``, so JetStream drops a redelivery within the stream's
``duplicate_window``. The payload is the event's ``jitp.event/1`` JSON document, byte for byte what
MQTT subscribers get; headers ``Jitp-Event-Type`` and ``Jitp-Device-Id`` repeat type and id.

Subject tokens: a NATS token may not contain ``.``, ``*``, ``>`` or whitespace. Device ids may
contain ``.``, ``*`` and ``>`` (the id-safety rule refuses whitespace and control characters, not
those), so region and device id are percent-encoded: each of ``. * > %``, whitespace and control
characters becomes ``%XX`` per UTF-8 byte (``a.b`` -> ``a%2Eb``); an empty or missing value is
``%``. The mapping is injective, so a subscription to ``jitp.domain.events.*.*.<token>`` sees exactly one
device.

Delivery (at least once, de-duplicated by JetStream):

* The sink has its own durable progress: a cursor in the registry (``sink_cursors``, name
  ``nats``), the last outbox seq it published. It is independent of MQTT delivery
  (``delivered_at``): while NATS is down, events stay in the outbox and go out, in order, when it
  is back. A crash between a publish and the cursor update republishes with the same
  ``Nats-Msg-Id``; JetStream drops it. Gaps in seq (an erasure deletes a device's rows) are fine.
* ``erased`` events are scrubbed in the outbox only once delivered over MQTT *and* past every
  sink's cursor (see :meth:`jitp.registry.Registry.set_sink_cursor`), so a sink that is behind
  still publishes them in full. When it publishes one, the sink also purges the device's earlier
  messages from the stream (filter ``<prefix>.*.*.<device token>``): the erased event is the only
  thing about the device left there, until the stream's own retention removes it.
* Connection loss, a missing stream, a publish timeout: the sink closes the connection and tries
  again after a jittered exponential backoff (0.5 s doubling up to 30 s, full jitter).
* Several broker nodes on one PostgreSQL registry each run a sink on the shared cursor: they may
  publish an event more than once, which JetStream de-duplicates within ``duplicate_window``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from jitp import errors
from jitp.config import NatsConfig
from jitp.domain.events import ProvisioningEvent
from jitp.domain.records import EventType
from jitp.registry import Registry

log = logging.getLogger("jitp.nats")

SINK_NAME = "nats"
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
PUBLISH_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5
_ESCAPE = frozenset(".*>%")

# What makes the sink back off and reconnect (the registry being unavailable too).
RETRY_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    nats.errors.Error,
    errors.RegistryUnavailable,
)


def subject_token(value: str | None) -> str:
    """``value`` as one NATS subject token (injective; see the module docstring)."""
    if not value:
        return "%"
    out = []
    for ch in value:
        if ch in _ESCAPE or ch.isspace() or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            out.append("".join(f"%{b:02X}" for b in ch.encode()))
        else:
            out.append(ch)
    return "".join(out)


def event_subject(prefix: str, event: ProvisioningEvent) -> str:
    region = event.document().get("region")
    region_token = subject_token(region if isinstance(region, str) else None)
    return f"{prefix}.{subject_token(event.type)}.{region_token}.{subject_token(event.device_id)}"


def device_filter(prefix: str, device_id: str) -> str:
    return f"{prefix}.*.*.{subject_token(device_id)}"


def backoff_delay(attempt: int) -> float:
    """Full jitter: uniform in [0, min(max, min * 2**attempt)]."""
    return random.uniform(0, min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(attempt, 16)))


class NatsSink:
    """Publishes the outbox to JetStream. ``await sink.start()`` ... ``await sink.stop()``."""

    def __init__(self, registry: Registry, config: NatsConfig, *, batch: int = 500) -> None:
        self.registry = registry
        self.config = config
        self.batch = batch
        self.connected = asyncio.Event()  # set while connected with the stream in place
        self.published = 0  # messages acknowledged by JetStream (duplicates included)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._nc: NatsClient | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="jitp-nats-sink")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    def wake(self, events: object = None) -> None:
        """New events were committed (a :meth:`ProvisioningService.on_new_events` callback)."""
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                js = await self._connect()
                attempt = 0
                while True:
                    if self._nc is None or not self._nc.is_connected:
                        raise ConnectionError("connection to NATS lost")
                    await self.drain(js)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
                    self._wake.clear()
            except RETRY_ERRORS as exc:
                delay = backoff_delay(attempt)
                attempt += 1
                log.warning(
                    "NATS sink paused (%s: %s); events wait in the outbox, retry in %.1f s",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await self._close()
                await asyncio.sleep(delay)

    async def _connect(self) -> JetStreamContext:
        async def on_error(exc: Exception) -> None:
            log.debug("NATS connection error: %s", exc)

        async def on_disconnect() -> None:
            self.connected.clear()
            self._wake.set()  # the loop notices and reconnects with backoff

        servers = self.config.server_list
        # The sink reconnects itself, with backoff, and re-checks the stream. nats-py retries an
        # unreachable server forever unless max_reconnect_attempts > 0 (then: twice per server).
        nc = await asyncio.wait_for(
            nats.connect(
                servers,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                connect_timeout=CONNECT_TIMEOUT,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                name="jitp-nats-sink",
            ),
            2 * len(servers) * (CONNECT_TIMEOUT + 1),
        )
        self._nc = nc
        js = nc.jetstream(timeout=PUBLISH_TIMEOUT)
        await self._ensure_stream(js)
        self.connected.set()
        log.info("NATS sink connected; publishing to stream %s", self.config.stream)
        return js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        cfg = self.config
        try:
            await js.stream_info(cfg.stream)
            return
        except nats.js.errors.NotFoundError:
            if not cfg.create_stream:
                raise nats.js.errors.Error(
                    description=f"stream {cfg.stream} does not exist (nats.create_stream is false)"
                ) from None
        await js.add_stream(
            StreamConfig(
                name=cfg.stream,
                subjects=[f"{cfg.subject_prefix}.>"],
                duplicate_window=cfg.duplicate_window,
            )
        )
        log.info("created JetStream stream %s (subjects %s.>)", cfg.stream, cfg.subject_prefix)

    async def _close(self) -> None:
        self.connected.clear()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    # -- delivery ------------------------------------------------------------------------------
    async def drain(self, js: JetStreamContext) -> int:
        """Publish everything past the cursor, in seq order; the cursor follows each batch."""
        count = 0
        cursor = await self.registry.sink_cursor(SINK_NAME)
        while True:
            rows = await self.registry.events_after(cursor, self.batch)
            if not rows:
                return count
            done = cursor
            try:
                for seq, event in rows:
                    await self.publish(js, event)
                    done = seq
                    count += 1
            finally:
                if done > cursor:
                    await self.registry.set_sink_cursor(SINK_NAME, done)
            cursor = done

    async def publish(self, js: JetStreamContext, event: ProvisioningEvent) -> None:
        prefix = self.config.subject_prefix
        headers = {
            "Nats-Msg-Id": event.event_id,
            "Jitp-Event-Type": event.type,
            "Jitp-Device-Id": event.device_id,
        }
        ack = await js.publish(
            event_subject(prefix, event), event.payload, stream=self.config.stream, headers=headers
        )
        self.published += 1
        if event.type is EventType.ERASED and not ack.duplicate:
            # Nothing else about the erased device stays in the stream (see the module docstring).
            try:
                await js.purge_stream(
                    self.config.stream, seq=ack.seq, subject=device_filter(prefix, event.device_id)
                )
            except nats.js.errors.APIError as exc:
                log.error("could not purge the erased device's messages from %s: %s", self.config.stream, exc)
