"""Message relay between the worker processes of one ``jitp serve --workers N``.

Each worker is a broker node with its own sessions, topic tree and retained store. A message a
client publishes on one worker must reach subscribers on every worker, and a retained message must
be found whichever worker a subscriber lands on. The supervisor (:mod:`broker_plugins.workers`) is
the hub: every worker has one Unix socket to it; what a worker sends, the supervisor forwards to
every other worker, which applies it locally and never forwards it again.

What travels:

- ``PUBLISH`` (topic, payload, QoS, RETAIN, MQTT 5 properties): a message a client published, already checked against the
  publisher's ACL and profile on its worker, routed locally there. A peer routes it into its own
  subscribers' queues exactly as a local message (:meth:`JitpBroker.route`: receive ACL, QoS
  downgrade, queue limits).
- ``RETAIN`` (topic, payload, QoS, owner, MQTT 5 properties): a retained message stored or cleared (empty payload).
  Peers store it without quota checks (the origin applied them); the supervisor keeps a mirror
  and hands it to a worker it (re)starts before anything else.
- ``EVENTS``: outbox events this worker committed (after the commit). Peers publish them to their
  own subscribers and apply them to their own sessions at once, as the origin does. The registry
  stays the reliable path: every node still follows the outbox from its own cursor (each poll), as
  separate nodes do, and skips the events it already published (by ``event_id``), so an event a
  crash kept off the relay is delivered from there, and none is published twice by one node.
- ``ATTACHED`` (client id, when): a client connected here; a peer closes its older connection of
  that client id, as a takeover on one worker does (and audits it). A persistent session's state
  does not move with it: it stays on the worker that had it.
- ``READY``, ``FATAL``, ``STATUS``: worker to supervisor (started; could not start, with the
  error; its connected clients on request).

Guarantee: a relayed frame is handed to the kernel (a non-blocking write on the Unix socket)
before :meth:`JitpBroker.route` returns, so before the PUBACK. If the origin worker is killed
after that, the supervisor still forwards it. It is lost for peers only if the socket's buffer was
full (the frame still in the worker's memory) when the worker died, or if the supervisor dies.
Peers enqueue it like any local message, so QoS 1 holds from there. There is no acknowledgement
between workers: see README, "Several nodes".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from jitp.domain.events import ProvisioningEvent
from jitp.domain.records import EventType
from jitp.domain.routing import NO_PROPERTIES, MessageProperties

log = logging.getLogger("jitp.relay")

PUBLISH, RETAIN, EVENTS, ATTACHED = b"P", b"R", b"E", b"C"
READY, FATAL, STATUS = b"Y", b"F", b"S"
MAX_FRAME = 16 * 1024 * 1024  # bytes; far above limits.max_packet_size
_HEADER = struct.Struct("!I")  # body length; the body starts with its kind (one byte)
_WHEN = struct.Struct("!d")
_NO_OWNER = 0xFFFF  # owner length marking "the broker's own" (owner None)
_PROPS = struct.Struct("!I")  # length of the MQTT 5 properties (JSON; 0: none)
_RETAIN_FLAG = 0x04  # in a PUBLISH frame's first byte, beside the QoS
STATUS_CLIENTS = 1000  # client ids listed per worker in a status reply
Shares = dict[str, tuple[str, ...]]  # event id -> shared subscriptions its origin worker serves


class Relay(Protocol):
    """Where a worker's broker sends what other workers must also see. A no-op with one process."""

    def publish(
        self,
        topic: str,
        data: bytes,
        qos: int,
        *,
        properties: MessageProperties,
        retain: bool,
        shares: Sequence[str],
    ) -> None:
        """A client's message, routed here already: route it on the other workers too (with its
        MQTT 5 properties, and RETAIN for subscribers asking Retain As Published), except to the
        shared subscriptions ``shares`` it was given to here (one member of a group gets it)."""

    def retain(
        self, topic: str, data: bytes, qos: int, owner: str | None, *, properties: MessageProperties
    ) -> None:
        """A retained message stored (or cleared, ``data`` empty) here: the same on the other workers."""

    def events_committed(self, events: list[ProvisioningEvent]) -> None:
        """Outbox events were committed here: the other workers publish them too."""

    def attached(self, client_id: str, at: float) -> None:
        """A client connected here (at ``at``, ``time.monotonic()``): other workers close an older
        connection of the same client id (the takeover of [MQTT-3.1.4-2])."""


class NoRelay:
    """A single process: nothing to relay."""

    def publish(
        self,
        topic: str,
        data: bytes,
        qos: int,
        *,
        properties: MessageProperties,
        retain: bool,
        shares: Sequence[str],
    ) -> None:
        pass

    def retain(
        self, topic: str, data: bytes, qos: int, owner: str | None, *, properties: MessageProperties
    ) -> None:
        pass

    def events_committed(self, events: list[ProvisioningEvent]) -> None:
        pass

    def attached(self, client_id: str, at: float) -> None:
        pass


NO_RELAY = NoRelay()


# -- frames ------------------------------------------------------------------------------------
def frame(kind: bytes, body: bytes = b"") -> bytes:
    return _HEADER.pack(len(body) + 1) + kind + body


def encode_properties(properties: MessageProperties) -> bytes:
    """A message's MQTT 5 properties for the relay (empty: none). ``expires_at`` travels as is: it
    is on ``time.monotonic()``, CLOCK_MONOTONIC, which every process of one machine shares."""
    if properties == NO_PROPERTIES:
        return b""
    doc: dict[str, Any] = {"u": properties.user_properties}
    if properties.payload_format_indicator:
        doc["f"] = properties.payload_format_indicator
    if properties.content_type is not None:
        doc["c"] = properties.content_type
    if properties.response_topic is not None:
        doc["r"] = properties.response_topic
    if properties.correlation_data is not None:
        doc["d"] = properties.correlation_data.hex()
    if properties.expires_at is not None:
        doc["e"] = properties.expires_at
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_properties(data: bytes) -> MessageProperties:
    if not data:
        return NO_PROPERTIES
    doc = json.loads(data)
    correlation = doc.get("d")
    expires_at = doc.get("e")
    return MessageProperties(
        payload_format_indicator=int(doc.get("f", 0)),
        content_type=doc.get("c"),
        response_topic=doc.get("r"),
        correlation_data=bytes.fromhex(correlation) if correlation is not None else None,
        user_properties=tuple((str(k), str(v)) for k, v in doc["u"]),
        expires_at=float(expires_at) if expires_at is not None else None,
    )


def _with_properties(properties: MessageProperties, data: bytes) -> bytes:
    p = encode_properties(properties)
    return _PROPS.pack(len(p)) + p + data


def _split_properties(body: bytes, at: int) -> tuple[MessageProperties, bytes]:
    (plen,) = _PROPS.unpack_from(body, at)
    start = at + _PROPS.size
    return decode_properties(body[start : start + plen]), bytes(body[start + plen :])


def publish_frame(
    topic: str,
    data: bytes,
    qos: int,
    *,
    properties: MessageProperties = NO_PROPERTIES,
    retain: bool = False,
    shares: Sequence[str] = (),
) -> bytes:
    t = topic.encode()
    flags = qos | (_RETAIN_FLAG if retain else 0)
    s = json.dumps(list(shares)).encode() if shares else b""
    head = bytes((flags,)) + len(t).to_bytes(2, "big") + t + _PROPS.pack(len(s)) + s
    return frame(PUBLISH, head + _with_properties(properties, data))


def retain_frame(
    topic: str, data: bytes, qos: int, owner: str | None, *, properties: MessageProperties = NO_PROPERTIES
) -> bytes:
    o = owner.encode() if owner is not None else b""
    t = topic.encode()
    olen = _NO_OWNER if owner is None else len(o)
    head = bytes((qos,)) + olen.to_bytes(2, "big") + o + len(t).to_bytes(2, "big") + t
    return frame(RETAIN, head + _with_properties(properties, data))


@dataclass(frozen=True)
class Published:
    topic: str
    data: bytes
    qos: int
    properties: MessageProperties = NO_PROPERTIES
    retain: bool = False
    shares: tuple[str, ...] = ()  # the shared subscriptions its origin served


@dataclass(frozen=True)
class Retained:
    topic: str
    data: bytes
    qos: int
    owner: str | None
    properties: MessageProperties = NO_PROPERTIES

    def expired(self, now: float) -> bool:
        expires_at = self.properties.expires_at
        return expires_at is not None and expires_at <= now


def events_frame(events: list[ProvisioningEvent], shares: Shares | None = None) -> bytes:
    """``shares``: event id -> the shared subscriptions the origin serves that event to."""
    docs = []
    for e in events:
        doc: dict[str, Any] = {
            "id": e.event_id,
            "type": str(e.type),
            "device": e.device_id,
            "at": e.occurred_at.isoformat(),
            "payload": e.payload.decode(),
        }
        served = (shares or {}).get(e.event_id)
        if served:
            doc["shares"] = list(served)
        docs.append(doc)
    return frame(EVENTS, json.dumps(docs, separators=(",", ":")).encode())


def parse_events(body: bytes) -> tuple[list[ProvisioningEvent], Shares]:
    events, shares = [], {}
    for d in json.loads(body[1:]):
        events.append(
            ProvisioningEvent(
                event_id=d["id"],
                type=EventType(d["type"]),
                device_id=d["device"],
                occurred_at=datetime.fromisoformat(d["at"]),
                payload=d["payload"].encode(),
            )
        )
        if d.get("shares"):
            shares[d["id"]] = tuple(str(key) for key in d["shares"])
    return events, shares


def parse_publish(body: bytes) -> Published:
    flags, tlen = body[1], int.from_bytes(body[2:4], "big")
    at = 4 + tlen
    (slen,) = _PROPS.unpack_from(body, at)
    shares = tuple(str(key) for key in json.loads(body[at + 4 : at + 4 + slen])) if slen else ()
    properties, data = _split_properties(body, at + 4 + slen)
    topic = body[4 : 4 + tlen].decode()
    return Published(topic, data, flags & 0x03, properties, bool(flags & _RETAIN_FLAG), shares)


def parse_retain(body: bytes) -> Retained:
    qos, olen = body[1], int.from_bytes(body[2:4], "big")
    at = 4 + (0 if olen == _NO_OWNER else olen)
    owner = None if olen == _NO_OWNER else body[4:at].decode()
    tlen = int.from_bytes(body[at : at + 2], "big")
    topic = body[at + 2 : at + 2 + tlen].decode()
    properties, data = _split_properties(body, at + 2 + tlen)
    return Retained(topic, data, qos, owner, properties)


class FrameReader:
    """Splits a byte stream into frames (each ``kind + payload``, header stripped)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buffer
        buf += data
        frames, at = [], 0
        while len(buf) - at >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, at)
            if not 1 <= size <= MAX_FRAME:
                raise ValueError(f"relay frame of {size} bytes")
            if len(buf) - at - _HEADER.size < size:
                break
            frames.append(bytes(buf[at + _HEADER.size : at + _HEADER.size + size]))
            at += _HEADER.size + size
        del buf[:at]
        return frames


# -- the worker's end ---------------------------------------------------------------------------
class RelayTarget(Protocol):
    """What a worker applies relayed frames to (the broker)."""

    def route(
        self,
        topic: str,
        data: bytes,
        qos: int,
        *,
        properties: MessageProperties,
        retain: bool,
        skip_shares: Collection[str],
    ) -> int: ...

    def shares_served(self, topic: str) -> list[str]:
        """The shared subscriptions matching ``topic`` that have a member here to give it to."""
        ...

    def replicate_retained(
        self, topic: str, data: bytes, qos: int, owner: str | None, *, properties: MessageProperties
    ) -> None: ...

    def live_clients(self) -> list[tuple[str, Any]]: ...

    def taken_over_elsewhere(self, client_id: str, at: float) -> None: ...


class WorkerRelay(asyncio.Protocol):
    """A worker's socket to the supervisor: sends what this worker routes, applies what others did."""

    def __init__(self, fd: int, *, node_id: str) -> None:
        self.fd = fd
        self.node_id = node_id
        self.lost = asyncio.Event()  # the supervisor is gone: the worker stops
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader()
        self._target: RelayTarget | None = None
        self._on_events: Callable[[list[ProvisioningEvent], Shares], None] = lambda events, shares: None
        self.forwarded = self.applied = 0

    async def start(
        self,
        target: RelayTarget,
        *,
        on_events: Callable[[list[ProvisioningEvent], Shares], None],
    ) -> None:
        """Start applying what the other workers send (the retained mirror comes first)."""
        self._target, self._on_events = target, on_events
        sock = socket.socket(fileno=self.fd)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: self, sock=sock)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # Relay ---------------------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        data: bytes,
        qos: int,
        *,
        properties: MessageProperties,
        retain: bool,
        shares: Sequence[str],
    ) -> None:
        self._send(publish_frame(topic, data, qos, properties=properties, retain=retain, shares=shares))

    def retain(
        self, topic: str, data: bytes, qos: int, owner: str | None, *, properties: MessageProperties
    ) -> None:
        self._send(retain_frame(topic, data, qos, owner, properties=properties))

    def events_committed(self, events: list[ProvisioningEvent]) -> None:
        if events:
            # This worker publishes them moments later: its shared subscriptions' members get them
            # here, and the other workers skip those groups (one member of a group gets an event).
            target = self._target
            shares = {e.event_id: tuple(target.shares_served(e.topic)) for e in events} if target else {}
            self._send(events_frame(events, shares))

    def attached(self, client_id: str, at: float) -> None:
        self._send(frame(ATTACHED, _WHEN.pack(at) + client_id.encode()))

    def ready(self, port: int) -> None:
        self._send(
            frame(READY, json.dumps({"node": self.node_id, "pid": os.getpid(), "port": port}).encode())
        )

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)  # to the kernel at once unless its buffer is full
            self.forwarded += 1

    # asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.lost.set()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except ValueError as exc:
            log.error("relay from the supervisor is corrupt (%s): stopping", exc)
            if self._transport is not None:
                self._transport.close()
            return
        target = self._target
        assert target is not None
        for body in frames:
            kind = body[:1]
            try:
                if kind == PUBLISH:
                    p = parse_publish(body)
                    target.route(
                        p.topic,
                        p.data,
                        p.qos,
                        properties=p.properties,
                        retain=p.retain,
                        skip_shares=frozenset(p.shares),
                    )
                elif kind == RETAIN:
                    r = parse_retain(body)
                    target.replicate_retained(r.topic, r.data, r.qos, r.owner, properties=r.properties)
                elif kind == EVENTS:
                    self._on_events(*parse_events(body))
                elif kind == ATTACHED:
                    (at,) = _WHEN.unpack_from(body, 1)
                    target.taken_over_elsewhere(body[1 + _WHEN.size :].decode(), at)
                elif kind == STATUS:
                    clients = sorted(client_id for client_id, _ in target.live_clients())
                    doc = {"node": self.node_id, "pid": os.getpid(), "connected": len(clients)}
                    self._send(
                        frame(STATUS, json.dumps({**doc, "clients": clients[:STATUS_CLIENTS]}).encode())
                    )
                else:
                    log.warning("unknown relay frame kind %r ignored", kind)
                    continue
                self.applied += 1
            except (UnicodeDecodeError, IndexError, KeyError, TypeError, ValueError) as exc:
                log.error("relay frame %r not applied: %r", kind, exc)


def report_fatal(fd: int, message: str) -> None:
    """A worker that cannot start tells the supervisor why (which shows it once), then exits."""
    with contextlib.suppress(OSError):
        os.write(fd, frame(FATAL, message.encode()))
