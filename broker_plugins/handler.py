"""The protocol handler of one connection: reads packets in order, writes one session's queue.

W12: a PUBLISH is checked and routed (through :class:`Inbound`, the broker) *before* its PUBACK.
W13: one sender task per connection writes the session's bounded :class:`~jitp.domain.routing.DeliveryQueue`.
W16: malformed packets close the connection. W17: packets are handled in order in the reader task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsuback import UnsubackPacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket

from broker_plugins.oversize import OversizedRequest, skip_certificate_request
from broker_plugins.reasons import Goodbye
from broker_plugins.session import JitpSession
from broker_plugins.transport import PacketTooLarge, TlsConnection
from jitp.domain.acl import Access
from jitp.domain.routing import NO_PROPERTIES, DeliveryQueue, MessageProperties, Outgoing, SubscriptionOptions

log = logging.getLogger("jitp.broker")

FAIR_SHARE = 16  # packets a connection handles before letting the event loop run other connections


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`Inbound.receive` decided for one PUBLISH: the MQTT 5 PUBACK reason code, or a
    reason to close the connection. A 3.1.1 client gets a plain PUBACK either way, or the close."""

    puback: int = 0
    close: Goodbye | None = None


ACCEPTED = Verdict()
NOT_AUTHORIZED = Verdict(puback=0x87)  # the ACL refused it: dropped, the client is told (v5)


@dataclass(frozen=True, slots=True)
class Welcome:
    """What a CONNACK announces to an MQTT 5 client (3.1.1 has only Session Present)."""

    session_present: bool
    session_expiry: int | None = None  # when the broker changed what the client asked for
    server_keep_alive: int | None = None  # likewise
    receive_max: int = 65535
    max_packet_size: int = 268_435_455
    max_qos: int = 1


class Inbound(Protocol):
    """What the handler hands to the broker (implemented by :class:`~broker_plugins.broker.JitpBroker`)."""

    async def receive(
        self,
        session: JitpSession,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        *,
        properties: MessageProperties = NO_PROPERTIES,
    ) -> Verdict:
        """Check and route a message."""

    async def protocol_violation(
        self,
        session: JitpSession,
        handler: BrokerProtocolHandler,
        what: str,
        goodbye: Goodbye = Goodbye.PROTOCOL_ERROR,
    ) -> None:
        """Audit a malformed packet and close the connection."""

    async def certificate_request(
        self,
        session: JitpSession,
        topic: str,
        data: bytes,
        properties: MessageProperties = NO_PROPERTIES,
        *,
        size: int | None = None,
    ) -> Verdict:
        """Answer a certificate request (``size``: its body was read past, over max_packet_size)."""

    async def close_connection(
        self, session: JitpSession, handler: BrokerProtocolHandler, goodbye: Goodbye = Goodbye.PROTOCOL_ERROR
    ) -> None: ...

    async def subscribe(
        self,
        session: JitpSession,
        handler: JitpProtocolHandler,
        packet_id: int,
        topics: list[tuple[str, int]],
        options: list[SubscriptionOptions] | None = None,
    ) -> None:
        """Add the subscriptions, answer SUBACK, then queue the matching retained messages."""

    async def unsubscribe(
        self, session: JitpSession, handler: JitpProtocolHandler, packet_id: int, topics: list[str]
    ) -> None: ...

    def delivered(self) -> None:
        """A queue shrank (a graceful stop waits for that)."""

    def stalled(self, session: JitpSession) -> None:
        """The client read nothing for a keep-alive period while messages waited: it is closed."""


class JitpProtocolHandler(BrokerProtocolHandler):
    """W5 keep-alive, W12 inline routing of PUBLISH, W13 one sender per connection, W16 strict
    packets, W17 one reader handling packets in order."""

    protocol = 4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock: Callable[[], float] = time.monotonic  # Message Expiry deadlines are on this clock
        self.broker: Inbound | None = None
        self.max_packet_size = 268_435_455  # MQTT's own bound; the broker sets limits.max_packet_size
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        # W18: SUBSCRIBE and UNSUBSCRIBE are handled in the reader, in order; amqtt's request queues
        # (and the tasks of its per-client message loop that wait on them) are not used.
        self._pending_subscriptions = self._pending_unsubscriptions = None  # type: ignore[assignment]

    async def run(self) -> bool:
        """W17, W18: the session on this connection, in the caller's task. The sender starts, then
        packets are read and handled one after another, in order, until the connection ends.
        True if the client ended it with DISCONNECT (then its will is not published).

        amqtt runs a reader task that starts a task per packet without waiting for it (a client that
        does not read its PUBACKs grows the broker without bound; a dropped connection cancels
        packets already read), and a message loop waiting on four more tasks per client."""
        session = self.session
        assert isinstance(session, JitpSession)
        session.delivery.notify = self._wake.set
        self._sender = asyncio.create_task(self._send_loop(session.delivery), name="jitp-sender")
        try:
            return await self._read_packets(session)
        except asyncio.CancelledError:
            return False
        finally:
            self.stop_sender()

    async def _read_packets(self, session: JitpSession) -> bool:
        reader = self.reader
        assert reader is not None
        keepalive = float(session.keep_alive) or None
        handlers: dict[int, Callable[[Any], Awaitable[None]]] = {
            PUBLISH: self.handle_publish,
            PUBACK: self.handle_puback,
            PUBREC: self._unexpected_ack,
            PUBREL: self.handle_pubrel,
            PUBCOMP: self._unexpected_ack,
            SUBSCRIBE: self.handle_subscribe,
            UNSUBSCRIBE: self.handle_unsubscribe,
            PINGREQ: self.handle_pingreq,
        }
        handled = 0
        packet: Any = None
        handle: Callable[[Any], Awaitable[None]] | None
        try:
            while True:
                # W5/W16: the whole next packet, not only its first byte, must arrive within the
                # keep-alive period (already times keepalive_grace), so a half-sent packet cannot hold
                # the connection open. One timer per packet; asyncio.timeout makes no task.
                try:
                    async with asyncio.timeout(keepalive):
                        header = await MQTTFixedHeader.from_stream(reader)
                        if header is None:
                            return False
                        if header.remaining_length > self.max_packet_size:  # W6: before its body
                            # Issue 16: a certificate request is read past and answered; else closed.
                            packet = await skip_certificate_request(
                                reader, header, max_read=self.max_packet_size
                            )
                            if packet is None:
                                raise PacketTooLarge(
                                    f"packet of {header.remaining_length} bytes, over {self.max_packet_size}"
                                )
                            handle = self.handle_oversized_request
                        else:
                            if header.packet_type == DISCONNECT:
                                return True
                            handle = handlers.get(header.packet_type)
                            if handle is not None:
                                packet = await _parse_whole(reader, header)
                except TimeoutError:
                    self.handle_read_timeout()
                    return False
                except PacketTooLarge as exc:
                    if self.broker is not None:
                        await self.broker.protocol_violation(
                            session, self, str(exc), Goodbye.PACKET_TOO_LARGE
                        )
                    return False
                except (MQTTError, NoDataError, ValueError, UnicodeDecodeError) as exc:  # e.g. '+' in a topic
                    if self.broker is not None:
                        await self.broker.protocol_violation(session, self, f"malformed packet: {exc}")
                    return False
                if handle is None:  # CONNECT again, a server-only packet, or a reserved type
                    if self.broker is not None:
                        await self.broker.protocol_violation(
                            session, self, f"unexpected packet type {header.packet_type} [MQTT-4.8.0-1]"
                        )
                    return False
                handled += 1
                if not handled % FAIR_SHARE:
                    # Buffered packets are read without suspending: a client that keeps sending would
                    # hold the event loop. Every FAIR_SHARE packets the others get their turn.
                    await asyncio.sleep(0)
                try:
                    await handle(packet)
                except TimeoutError:  # W17: an acknowledgement could not be written for a keep-alive period
                    if self.broker is not None:
                        self.broker.stalled(session)
                    self.abort()
                    return False
        except (AMQTTError, OSError, EOFError) as exc:  # too large, reset, TLS error: the connection ends
            log.debug("connection of %s ends: %r", session.client_id, exc)
            self.abort()
            return False

    def abort(self) -> None:
        if isinstance(self.writer, TlsConnection):
            self.writer.abort()

    def goodbye(self, reason: Goodbye) -> None:
        """Close the connection for ``reason`` (MQTT 3.1.1 has no DISCONNECT from the server: it is
        dropped). Its own task notices the end of the stream and ends the session."""
        self.abort()

    def handle_read_timeout(self) -> None:
        session = self.session
        log.info(
            "keep-alive expired for %s: no packet for %.1f s, disconnecting",
            session.client_id if session else "?",
            session.keep_alive if session else 0,
        )
        self.goodbye(Goodbye.KEEP_ALIVE_TIMEOUT)

    # -- what the broker answers -------------------------------------------------------------------
    async def accept(self, welcome: Welcome) -> None:
        """CONNACK 0 (Session Present from the session)."""
        await self.mqtt_connack_authorize(True)

    async def suback(self, packet_id: int, codes: list[int]) -> None:
        """3.1.1 knows one failure code, 0x80."""
        await self._send_packet(SubackPacket.build(packet_id, [c if c < 0x80 else 0x80 for c in codes]))

    async def unsuback(self, packet_id: int, codes: list[int]) -> None:
        await self._send_packet(UnsubackPacket.build(packet_id))

    def encode_publish(self, message: Outgoing) -> bytes | None:
        """The PUBLISH to write (3.1.1: the payload alone; properties are MQTT 5's)."""
        packet = PublishPacket.build(
            message.topic, message.data, message.packet_id, message.dup, message.qos, message.retain
        )
        return bytes(packet.to_bytes())

    # -- W13: the session's delivery queue, written by one task ------------------------------
    def stop_sender(self) -> None:
        """Stop writing; unacknowledged QoS 1 messages go back to the queue (resent on reconnect)."""
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        session = self.session
        if isinstance(session, JitpSession) and session.delivery.notify == self._wake.set:
            session.delivery.notify = None
            session.delivery.connection_lost()

    async def stop(self) -> None:
        """End this connection: stop writing, close (close_notify, then the socket)."""
        self.stop_sender()
        if self.writer is not None:
            await self.writer.close()
        if self.broker is not None:
            self.broker.delivered()

    async def _send_loop(self, queue: DeliveryQueue) -> None:
        session = self.session
        assert isinstance(session, JitpSession)
        try:
            while True:
                message = queue.next_to_send()
                if message is None:
                    self._wake.clear()
                    message = queue.next_to_send()
                    if message is None:
                        await self._wake.wait()
                        continue
                # The ACL again at delivery: a message queued before the client's namespace shrank
                # (quarantine while offline or busy) is not delivered after it. A message past its
                # Message Expiry Interval is not delivered either [MQTT-3.3.2-5].
                expires_at = message.properties.expires_at
                if not session.allows(Access.RECEIVE, message.topic) or (
                    expires_at is not None and self.clock() >= expires_at
                ):
                    queue.withdraw(message)
                    continue
                try:
                    data = self.encode_publish(message)
                except ValueError as exc:  # the codec refuses what it read (a bug to fix at the inlet)
                    log.warning(
                        "a message on %r cannot be encoded for %s: %s; dropped",
                        message.topic[:160],
                        session.client_id,
                        exc,
                    )
                    queue.withdraw(message)
                    continue
                if data is None:  # over the client's Maximum Packet Size: as if delivered [MQTT-3.1.2-25]
                    queue.withdraw(message)
                    continue
                async with self._write_lock:
                    writer = self.writer
                    assert writer is not None
                    writer.write(data)
                    await writer.drain()
                if not message.qos and self.broker is not None:
                    self.broker.delivered()
        except asyncio.CancelledError:
            raise
        except TimeoutError:  # W17: the write could not drain within the keep-alive period
            if self.broker is not None:
                self.broker.stalled(session)
            self.abort()
        except Exception as exc:  # the connection is gone; the reader notices and ends the session
            log.debug("sender of %s stopped: %r", session.client_id, exc)
            self.abort()

    async def handle_puback(self, puback: PubackPacket) -> None:
        session = self.session
        packet_id = puback.packet_id
        if isinstance(session, JitpSession) and session.delivery.acknowledge(packet_id):
            if self.broker is not None:
                self.broker.delivered()
        else:  # a duplicate, or for a message resent on a later connection: harmless [MQTT-4.3.2]
            log.debug(
                "%s acknowledged unknown packet id %d", session.client_id if session else "?", packet_id
            )

    # -- W12, W16: a PUBLISH is checked and routed before its PUBACK -----------------------------
    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        session, broker = self.session, self.broker
        if not isinstance(session, JitpSession) or broker is None:
            return
        header = publish_packet.variable_header
        topic = header.topic_name if header is not None else None
        qos = publish_packet.qos or 0
        packet_id = header.packet_id if header is not None else None
        violation = None
        if qos > 2:
            violation = "PUBLISH with QoS 3 [MQTT-3.3.1-4]"
        elif qos and not packet_id:
            violation = "PUBLISH with QoS > 0 and packet id 0 [MQTT-2.3.1-1]"
        elif not topic:
            violation = "PUBLISH with an empty topic [MQTT-4.7.3-1]"
        elif "+" in topic or "#" in topic:
            violation = "PUBLISH to a topic with a wildcard [MQTT-3.3.2-2]"
        if violation is not None:
            await broker.protocol_violation(session, self, violation)
            return
        assert topic is not None
        if qos == 2 and packet_id in session.qos2_received:
            # A resend (DUP) before PUBREL: routed already, so only acknowledged again [MQTT-4.3.3-2].
            await self._send_packet(PubrecPacket.build(packet_id))
            return
        if qos == 2 and len(session.qos2_received) >= session.delivery.limits.max_inflight:
            await broker.protocol_violation(session, self, "too many QoS 2 messages in flight")
            return
        data = bytes(publish_packet.data or b"")
        verdict = await broker.receive(session, topic, data, qos, bool(publish_packet.retain_flag))
        if verdict.close is not None and verdict.close is not Goodbye.MESSAGE_RATE_TOO_HIGH:
            await broker.close_connection(session, self, verdict.close)
            return  # over the rate, a 3.1.1 message is dropped (and acknowledged) instead
        if qos == 1 and packet_id is not None:
            await self._send_packet(PubackPacket.build(packet_id))
        elif qos == 2 and packet_id is not None:  # routed on arrival, once; the id is kept until PUBREL
            session.qos2_received.add(packet_id)
            await self._send_packet(PubrecPacket.build(packet_id))

    async def handle_oversized_request(self, request: OversizedRequest) -> None:
        """A certificate request over max_packet_size, its body read past: answered (payload_too_large),
        then acknowledged like any PUBLISH of its QoS."""
        session, broker = self.session, self.broker
        if not isinstance(session, JitpSession) or broker is None:
            return
        verdict = await broker.certificate_request(session, request.topic, b"", size=request.size)
        if verdict.close is not None:
            await broker.close_connection(session, self, verdict.close)
        elif request.qos == 1 and request.packet_id:
            await self._send_packet(PubackPacket.build(request.packet_id))
        elif request.qos == 2 and request.packet_id:
            session.qos2_received.add(request.packet_id)
            await self._send_packet(PubrecPacket.build(request.packet_id))

    async def handle_pubrel(self, pubrel: PubrelPacket) -> None:
        """QoS 2, second half: forget the packet id, answer PUBCOMP (also for an unknown id, as the
        message may have been completed before a reconnect) [MQTT-4.3.3-2]."""
        if isinstance(self.session, JitpSession):
            self.session.qos2_received.discard(pubrel.packet_id)
        await self._send_packet(PubcompPacket.build(pubrel.packet_id))

    async def _unexpected_ack(self, packet: Any) -> None:
        """PUBREC or PUBCOMP: jitp never sends QoS 2 (subscriptions are granted QoS 1 at most)."""
        log.debug(
            "%s sent an acknowledgement for nothing jitp sent: %r",
            self.session and self.session.client_id,
            packet,
        )

    async def handle_subscribe(self, subscribe: SubscribePacket) -> None:
        session, broker = self.session, self.broker
        if not isinstance(session, JitpSession) or broker is None:
            return
        topics = subscribe.payload.topics if subscribe.payload is not None else []
        packet_id = subscribe.variable_header.packet_id if subscribe.variable_header is not None else 0
        violation = None
        if not topics:
            violation = "SUBSCRIBE with no topic filter [MQTT-3.8.3-3]"
        elif any(not 0 <= qos <= 2 for _, qos in topics):
            violation = "SUBSCRIBE with QoS 3 or reserved bits set [MQTT-3.8.3-4]"
        if violation is not None:
            await broker.protocol_violation(session, self, violation)
            return
        await broker.subscribe(session, self, packet_id, topics)

    async def handle_unsubscribe(self, unsubscribe: UnsubscribePacket) -> None:
        session, broker = self.session, self.broker
        if not isinstance(session, JitpSession) or broker is None:
            return
        topics = unsubscribe.payload.topics if unsubscribe.payload is not None else []
        packet_id = unsubscribe.variable_header.packet_id if unsubscribe.variable_header is not None else 0
        await broker.unsubscribe(session, self, packet_id, topics)


class _Body(ReaderAdapter):
    """One packet's body, read whole: amqtt's parsers read from it, never past the packet's end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.overrun = False  # a field asked for more bytes than the packet has

    async def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out = self.data[self.pos : end]
        self.pos += len(out)
        if len(out) < n:
            self.overrun = True
        return out

    def feed_eof(self) -> None:
        pass


async def _parse_whole(reader: ReaderAdapter, header: MQTTFixedHeader) -> Any:
    """Parse one MQTT 3.1.1 packet from exactly its remaining length.

    amqtt's SUBSCRIBE and UNSUBSCRIBE parsers trust their string lengths over the remaining length:
    fed the stream, a packet whose fields do not add up (an MQTT 5 property length, say) made them
    read on into the following bytes, so the connection hung until its keep-alive ran out (or the
    next packets were swallowed as topic filters). Parsed from its own bytes, a packet whose fields
    run past its end, or leave bytes over, is malformed and closes the connection [MQTT-4.8.0-1]."""
    body = _Body(await reader.read(header.remaining_length))
    packet = await packet_class(header).from_stream(body, fixed_header=header)
    if body.overrun or body.pos != len(body.data):
        raise ValueError(
            f"{type(packet).__name__}: its fields do not fill its remaining length of {header.remaining_length} bytes"
        )
    return packet
