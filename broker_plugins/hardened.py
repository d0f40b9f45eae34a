"""The hardened amqtt broker: every workaround for amqtt 0.12.1 lives here, named.

amqtt is pinned to :data:`AMQTT_VERSION`. :func:`check_amqtt_internals` runs before the broker
starts and fails loudly if any internal this module relies on has moved.

Workarounds (each has a regression test in ``tests/broker_plugins/test_hardening.py`` that runs
the same attack against stock amqtt and shows it succeeds there):

W1 REQUIRE_CLIENT_CERT    amqtt hard-codes ``ssl.CERT_OPTIONAL``. jitp owns the listener
                          (``type: external``) and runs the TLS handshake itself with a
                          CERT_REQUIRED context (:mod:`broker_plugins.tls`), a handshake deadline,
                          a 4096 backlog and TCP_NODELAY.
W2 AUTH_BEFORE_SESSION    stock amqtt deletes the session of a clean-session CONNECT's client id
                          *before* authenticating. Here authentication runs first; session state
                          is only touched for an admitted client.
W3 NO_REFUSED_SESSIONS    stock amqtt keeps refused clients in ``broker.sessions`` forever.
                          Refused clients never enter the table; clean sessions leave it on
                          disconnect.
W4 RETAINED_ACL           stock amqtt sends retained messages to a new subscriber without a
                          topic check, and replays retained messages matching *every* client's
                          subscriptions to a reconnecting one. Here each retained message is
                          checked with the topic plugins (RECEIVE), for the session's own
                          subscriptions only.
W5 KEEPALIVE              ``handle_read_timeout`` is a no-op in amqtt. Here silence beyond
                          ``keepalive_grace`` x keep-alive closes the connection, and keep-alive
                          is capped at ``max_keepalive``.
W6 DEADLINES_AND_LIMITS   no CONNECT deadline, no handshake deadline, and ``max_connections``
                          queues clients. Here: handshake and CONNECT deadlines, CONNACK 3 when
                          full, a maximum packet size and a per-client inflight limit.
W7 TAKEOVER               a second connection with a device's id takes over only after it is
                          authenticated as that device; the old connection is closed, logged and
                          audited (the signature of a cloned certificate).
W8 DEVICE_PROFILE        a device's connectivity profile (from its enrollment template) is
                          enforced: keep-alive range, maximum QoS of subscriptions, maximum message
                          size (larger closes the connection) and a message rate (excess dropped).
W9 TLS_READ_BUFFER        not amqtt but asyncio: every TLS connection allocates (and zero-fills) a
                          256 KiB read buffer (``asyncio.sslproto.SSLProtocol.max_size``), most of
                          the ~350 KB per held connection and ~9% of broker CPU per connect.
                          :func:`lean_tls_read_buffer` sets it process-wide (17 KiB, one TLS record, by default).
W10 DEVICE_STATUS         stock amqtt disconnects any client that publishes to a $-topic; a jitp
                          device may publish its own ``$jitp/devices/<id>/status`` (and nothing
                          else under $), and backend principals send requests to the admin API on
                          ``$jitp/admin/<command>``, as the topic ACL decides.
W11 LEAN_SESSION_STATE    amqtt builds a ``transitions.Machine`` for every Session, ~12% of broker
                          CPU per connect. Sessions made for CONNECTs use :class:`LeanSessionState`,
                          the same three states and transitions (``new``, ``connected``,
                          ``disconnected``) without the library; property-tested against it.
W12 ROUTING               amqtt matches every PUBLISH against every filter in the broker, leaves
                          unsubscribed filters behind, and iterates its subscription dict across
                          an await (a concurrent SUBSCRIBE drops the message for the rest). Here
                          a topic tree (:class:`jitp.routing.SubscriptionTree`) routes each message
                          synchronously, *before* its PUBACK: an acknowledged message is already in
                          every matching session's queue, whatever the publisher does next.
W13 DELIVERY_QUEUE        amqtt sends each outgoing message in a task of its own, without bound,
                          forgets unacknowledged QoS 1 messages when a connection drops, and
                          replays an offline session's queue with RETAIN=1. Here each session has
                          a bounded :class:`jitp.routing.DeliveryQueue` written by one sender per
                          connection: QoS 0 beyond the bound is dropped, QoS 1 beyond it disconnects
                          the client; unacknowledged QoS 1 messages are resent (DUP) on reconnect.
W14 WILL_ACL              amqtt publishes and retains a will without any topic check. Here a will
                          outside the client's namespace refuses the CONNECT (``will_not_allowed``),
                          and the will is checked again (ACL, profile, quotas) when published.
W15 RETAINED_QUOTA        retained messages have a quota per client (count, bytes) and a global cap;
                          a revoked, disabled, deprovisioned or erased device's are cleared.
W16 STRICT_PACKETS        QoS 3, a QoS 1 PUBLISH with packet id 0, wildcards in a PUBLISH topic, an
                          empty SUBSCRIBE or a will with QoS 3 close the connection (audited
                          ``protocol_violation``); keep-alive also bounds a half-sent packet.
W17 INLINE_READER         amqtt reads packets in one task and handles each in another, never
                          waiting for them. Here the reader handles them in order, so a client that
                          does not read its acknowledgements stops being read; writes that cannot
                          drain within the keep-alive period close the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import NOT_AUTHORIZED, SERVER_UNAVAILABLE, ConnackPacket
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
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.session import Session
from transitions import MachineError

from broker_plugins.tls import handshake_refusal
from jitp import errors
from jitp.acl import NOBODY, Access, valid_filter
from jitp.routing import (
    DeliveryQueue,
    Offer,
    Outgoing,
    QueueLimits,
    RetainedLimits,
    RetainedStore,
    RetainVerdict,
    SubscriptionTree,
)
from jitp.trust import Role

if TYPE_CHECKING:
    from broker_plugins.server import JitpServer

log = logging.getLogger("jitp.broker")

AMQTT_VERSION = "0.12.1"
LISTENER = "jitp"
ADMISSION = "jitp.admission"  # Session.attributes key: the jitp Admission of an admitted client
REFUSAL = "jitp.refusal"  # Session.attributes key: the ProvisioningError of a refused client
RATE = "jitp.rate"  # Session.attributes key: token-bucket state of the device's message rate
NAMESPACE = "jitp.namespace"  # Session.attributes key: the jitp.acl.Namespace the topic plugin enforces
PEER = "jitp.peer"  # Session.attributes key: the PeerCredentials it was admitted with
JITP_DEVICE_TOPICS = "$jitp/devices/"  # devices publish their status here (W10)
JITP_ADMIN_TOPICS = "$jitp/admin/"  # backend principals send admin API requests here (W10)
MAX_PENDING_REQUESTS = 16  # SUBSCRIBE/UNSUBSCRIBE read ahead of their SUBACK/UNSUBACK, per client
CLOSED_BY_OPERATOR = "jitp.closed"  # Session.attributes key: an operator decision closed it (no will)
CLOSED_BY_BROKER = "jitp.closing"  # Session.attributes key: a limit is closing it (once)


class AmqttIncompatible(RuntimeError):
    """The installed amqtt is not the version whose internals this module was written against."""


def check_amqtt_internals() -> None:
    """Fail loudly at start-up if amqtt changed under us."""
    installed = importlib.metadata.version("amqtt")
    if installed != AMQTT_VERSION:
        raise AmqttIncompatible(
            f"jitp's hardened broker is written against amqtt {AMQTT_VERSION}, found {installed}. "
            "Re-check every workaround in broker_plugins/hardened.py before changing the pin."
        )
    needed: list[tuple[object, str]] = [
        (Broker, "_client_connected"),
        (Broker, "_authenticate"),
        (Broker, "_delete_session"),
        (Broker, "_client_message_loop"),
        (Broker, "_publish_retained_messages_for_subscription"),
        (Broker, "_publish_session_retained_messages"),
        (Broker, "_topic_filtering"),
        (Broker, "_matches"),
        (Broker, "_get_handler"),
        (Broker, "_handle_message_delivery"),
        (Broker, "add_subscription"),
        (BrokerProtocolHandler, "init_from_connect"),
        (BrokerProtocolHandler, "handle_read_timeout"),
        (BrokerProtocolHandler, "_reader_loop"),
    ]
    missing = [f"{owner.__name__}.{name}" for owner, name in needed if not hasattr(owner, name)]  # type: ignore[attr-defined]
    if missing:
        raise AmqttIncompatible(f"amqtt internals jitp relies on are gone: {', '.join(missing)}")
    params = inspect.signature(Broker._publish_retained_messages_for_subscription).parameters
    if list(params) != ["self", "subscription", "session"]:
        raise AmqttIncompatible("Broker._publish_retained_messages_for_subscription changed its signature")
    if "_sessions" not in inspect.getsource(Broker.__init__):
        raise AmqttIncompatible("Broker._sessions is gone")


def peer_chain_der(ssl_object: ssl.SSLObject | None) -> tuple[bytes, ...]:
    """The client chain as OpenSSL verified it, leaf first, as DER.

    Python 3.13 has the public ``get_verified_chain()``; before that only the private
    ``_sslobj.get_verified_chain()`` exists (Python 3.10-3.12).
    """
    if ssl_object is None:
        return ()
    getter = getattr(ssl_object, "get_verified_chain", None)
    if getter is None:
        getter = ssl_object._sslobj.get_verified_chain  # type: ignore[attr-defined]
    chain = getter() or []
    if chain and isinstance(chain[0], bytes):
        return tuple(chain)
    return tuple(c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain)  # type: ignore[attr-defined]


def lean_tls_read_buffer(nbytes: int) -> int:
    """W9: the per-connection TLS read buffer asyncio allocates; returns the previous size.

    Process-wide: it applies to every asyncio TLS connection made afterwards in this process.
    """
    from asyncio import sslproto

    if not hasattr(sslproto.SSLProtocol, "max_size"):
        raise AmqttIncompatible("asyncio.sslproto.SSLProtocol.max_size is gone; re-check W9")
    previous = int(sslproto.SSLProtocol.max_size)
    sslproto.SSLProtocol.max_size = nbytes
    return previous


class LeanSessionState:
    """W11: what amqtt's Session needs from its ``transitions.Machine``, without building one.

    States ``new``, ``connected``, ``disconnected``; ``connect`` from new or disconnected,
    ``disconnect`` from any state (re-entering ``disconnected`` runs its callback again, as
    transitions does); the Session's enter callbacks keep its connect/disconnect times.
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> bool:
        if self.state == "connected":
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = "disconnected"
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


class JitpSession(Session):
    """An amqtt Session with :class:`LeanSessionState` (W11), its own topic filters and its
    bounded outgoing queue (W12, W13)."""

    queue_limits = QueueLimits()  # set from LimitsConfig by JitpBroker

    def __init__(self) -> None:
        super().__init__()
        self.filters: dict[str, int] = {}  # topic filter -> granted QoS
        self.delivery = DeliveryQueue(limits=self.queue_limits)

    def _init_states(self) -> None:
        self.transitions = LeanSessionState(self)  # type: ignore[assignment]


def use_lean_sessions() -> None:
    """W11: amqtt's CONNECT path (``BrokerProtocolHandler.init_from_connect``) creates ``Session()``
    by its module-level name; point that name at :class:`JitpSession`."""
    from amqtt.mqtt.protocol import broker_handler

    if getattr(broker_handler, "Session", None) not in (Session, JitpSession):
        raise AmqttIncompatible("amqtt.mqtt.protocol.broker_handler.Session moved; re-check W11")
    broker_handler.Session = JitpSession  # type: ignore[misc]


class PacketTooLarge(AMQTTError):
    """Not an MQTTError: amqtt's reader loop discards those and keeps reading the payload as packets."""


class LimitedReader(StreamReaderAdapter):
    """W6: refuses a packet whose remaining length exceeds ``max_packet_size``, before reading its body.

    It follows MQTT framing over the byte stream (a type byte, remaining-length bytes, then the
    body), so the limit is per packet, however amqtt splits its reads.
    """

    def __init__(self, reader: asyncio.StreamReader, *, max_packet_size: int) -> None:
        super().__init__(reader)
        self.max_packet_size = max_packet_size
        self._body_left = 0  # bytes of the current packet's body not read yet
        self._length: int | None = None  # remaining length being decoded; None: next byte is a packet type
        self._shift = 0
        # W16: seconds the rest of a packet may take once its first byte came (the keep-alive
        # period); amqtt's reader loop times out only the wait for a packet's first byte.
        self.idle_timeout: float | None = None

    async def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.max_packet_size:
            raise PacketTooLarge(f"packet larger than {self.max_packet_size} bytes")
        if self.idle_timeout is not None and (self._body_left or self._length is not None):
            async with asyncio.timeout(self.idle_timeout):
                data = await super().read(n)
        else:
            data = await super().read(n)
        self._track(data)
        return data

    def _track(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._body_left:
                take = min(self._body_left, len(data) - i)
                self._body_left -= take
                i += take
            elif self._length is None:  # the first byte of a fixed header
                self._length, self._shift = 0, 0
                i += 1
            else:  # a remaining-length byte
                byte = data[i]
                i += 1
                self._length += (byte & 0x7F) << self._shift
                self._shift += 7
                if not byte & 0x80:
                    length, self._length = self._length, None
                    if length > self.max_packet_size:
                        raise PacketTooLarge(f"packet of {length} bytes, over {self.max_packet_size}")
                    self._body_left = length


class AbortableWriter(StreamWriterAdapter):
    """W17: a write that cannot drain within ``write_timeout`` (a client that stops reading) fails
    instead of waiting forever, and closing never waits more than a second for such a client."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self.stream = writer
        self.write_timeout: float | None = None

    async def drain(self) -> None:
        if self.is_closed:
            return
        async with asyncio.timeout(self.write_timeout):
            await self.stream.drain()

    async def close(self) -> None:
        if self.is_closed:
            return
        try:
            async with asyncio.timeout(1.0):
                await super().close()
        except (TimeoutError, OSError):
            self.abort()

    def abort(self) -> None:
        self.is_closed = True
        transport = self.stream.transport
        if transport is not None:
            transport.abort()


class JitpProtocolHandler(BrokerProtocolHandler):
    """W5 keep-alive, W12 inline routing of PUBLISH, W13 one sender per connection, W16 strict packets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broker: JitpBroker | None = None
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._qos2: set[asyncio.Task[None]] = set()
        # W17: the reader waits (TCP backpressure) rather than queueing requests without bound.
        self._pending_subscriptions = asyncio.Queue(maxsize=MAX_PENDING_REQUESTS)
        self._pending_unsubscriptions = asyncio.Queue(maxsize=MAX_PENDING_REQUESTS)

    async def _reader_loop(self) -> None:
        """W17: packets are handled one after another in this task, in order. amqtt starts a task
        per packet and never waits for them: a client that does not read its PUBACKs grows the broker
        without bound, and a drop of the connection cancels packets already read."""
        session, reader = self.session, self.reader
        assert session is not None and reader is not None and self._reader_ready is not None
        keepalive = float(session.keep_alive) or None
        handlers: dict[int, Callable[[Any], Awaitable[None]]] = {
            PUBLISH: self.handle_publish,
            PUBACK: self.handle_puback,
            PUBREC: self.handle_pubrec,
            PUBREL: self.handle_pubrel,
            PUBCOMP: self.handle_pubcomp,
            SUBSCRIBE: self.handle_subscribe,
            UNSUBSCRIBE: self.handle_unsubscribe,
            PINGREQ: self.handle_pingreq,
            DISCONNECT: self.handle_disconnect,
        }
        self._reader_ready.set()
        try:
            while True:
                try:
                    async with asyncio.timeout(keepalive):  # no task per read, unlike wait_for
                        header = await MQTTFixedHeader.from_stream(reader)
                except TimeoutError:
                    self.handle_read_timeout()
                    break
                if not header:
                    break
                handle = handlers.get(header.packet_type)
                if handle is None:  # CONNECT again, a server-only packet, or a reserved type
                    if self.broker is not None:
                        await self.broker.protocol_violation(
                            session, self, f"unexpected packet type {header.packet_type} [MQTT-4.8.0-1]"
                        )
                    break
                try:
                    packet = await packet_class(header).from_stream(reader, fixed_header=header)
                except (MQTTError, ValueError, UnicodeDecodeError) as exc:  # e.g. '+' in a PUBLISH topic
                    if self.broker is not None:
                        await self.broker.protocol_violation(session, self, f"malformed packet: {exc}")
                    break
                await handle(packet)
                if header.packet_type == DISCONNECT:
                    break
        except asyncio.CancelledError:
            pass
        except TimeoutError:
            self.handle_read_timeout()
        except Exception as exc:  # malformed packet, reset, TLS error: the connection ends
            log.debug("connection of %s ends: %r", session.client_id, exc)
        for task in self._qos2:
            task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def handle_read_timeout(self) -> None:
        session = self.session
        log.info(
            "keep-alive expired for %s: no packet for %.1f s, disconnecting",
            session.client_id if session else "?",
            session.keep_alive if session else 0,
        )
        if isinstance(self.writer, AbortableWriter):
            self.writer.abort()

    # -- W13: the session's delivery queue, written by one task ------------------------------
    async def start(self) -> None:
        await super().start()
        session = self.session
        assert isinstance(session, JitpSession)
        session.delivery.notify = self._wake.set
        self._sender = asyncio.create_task(self._send_loop(session.delivery), name="jitp-sender")

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
        self.stop_sender()
        await super().stop()
        if self.broker is not None:
            self.broker.delivery_progress.set()

    async def _send_loop(self, queue: DeliveryQueue) -> None:
        try:
            while True:
                message = queue.next_to_send()
                if message is None:
                    self._wake.clear()
                    message = queue.next_to_send()
                    if message is None:
                        await self._wake.wait()
                        continue
                packet = PublishPacket.build(
                    message.topic, message.data, message.packet_id, message.dup, message.qos, message.retain
                )
                async with self._write_lock:
                    assert self.writer is not None
                    await packet.to_stream(self.writer)
                if not message.qos and self.broker is not None:
                    self.broker.delivery_progress.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection is gone; the reader notices and ends the session
            log.debug("sender of %s stopped: %r", self.session.client_id if self.session else "?", exc)
            if isinstance(self.writer, AbortableWriter):
                self.writer.abort()

    async def handle_puback(self, puback: PubackPacket) -> None:
        session = self.session
        packet_id = puback.packet_id
        if isinstance(session, JitpSession) and session.delivery.acknowledge(packet_id):
            if self.broker is not None:
                self.broker.delivery_progress.set()
        else:  # a duplicate, or for a message resent on a later connection: harmless [MQTT-4.3.2]
            log.debug(
                "%s acknowledged unknown packet id %d", session.client_id if session else "?", packet_id
            )

    # -- W12, W16: a PUBLISH is checked and routed before its PUBACK -----------------------------
    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        session, broker = self.session, self.broker
        if session is None or broker is None:
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
        if qos == 2:  # amqtt's QoS 2 flow (PUBREC, then wait for PUBREL) ends in the message loop
            if len(self._qos2) >= JitpSession.queue_limits.max_inflight:
                await broker.protocol_violation(session, self, "too many QoS 2 messages in flight")
                return
            task = asyncio.create_task(super().handle_publish(publish_packet))
            self._qos2.add(task)
            task.add_done_callback(self._qos2.discard)
            return
        data = bytes(publish_packet.data or b"")
        if not await broker.receive(session, topic, data, qos, bool(publish_packet.retain_flag)):
            await broker.close_connection(session, self)
            return
        if qos == 1:
            assert packet_id is not None
            await self._send_packet(PubackPacket.build(packet_id))

    async def handle_subscribe(self, subscribe: SubscribePacket) -> None:
        session, broker = self.session, self.broker
        topics = subscribe.payload.topics if subscribe.payload is not None else []
        violation = None
        if not topics:
            violation = "SUBSCRIBE with no topic filter [MQTT-3.8.3-3]"
        elif any(not 0 <= qos <= 2 for _, qos in topics):
            violation = "SUBSCRIBE with QoS 3 [MQTT-3-8.3-4]"
        if violation is not None and session is not None and broker is not None:
            await broker.protocol_violation(session, self, violation)
            return
        await super().handle_subscribe(subscribe)


class JitpBroker(Broker):
    """amqtt's broker with jitp's connection path (W1-W7). Built by :class:`JitpServer`."""

    def __init__(self, server: JitpServer, config: dict[str, Any]) -> None:
        check_amqtt_internals()
        use_lean_sessions()
        super().__init__(config)
        self.jitp = server
        self._listener: asyncio.Server | None = None
        self.open_connections = 0
        self.connected_clients = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        cfg = server.config
        self.limits = limits = cfg.limits
        self.listener_config = cfg.listener
        self.device_queue_limits = QueueLimits(
            max_messages=limits.max_queued_messages,
            max_bytes=limits.max_queued_bytes,
            max_inflight=limits.max_inflight,
        )
        self.service_queue_limits = QueueLimits(
            max_messages=limits.service_max_queued_messages,
            max_bytes=limits.service_max_queued_bytes,
            max_inflight=limits.max_inflight,
        )
        JitpSession.queue_limits = self.device_queue_limits
        # W12: a topic tree (client id -> QoS per filter) instead of amqtt's scanned dict.
        self.subscription_tree: SubscriptionTree[str] = SubscriptionTree()
        # W15: retained messages with quotas; amqtt's name for them is kept for BrokerContext.
        self.retained = RetainedStore(
            RetainedLimits(
                max_per_owner=limits.max_retained_per_client,
                max_bytes_per_owner=limits.max_retained_bytes_per_client,
                max_total_bytes=limits.max_retained_bytes,
            )
        )
        self._retained_messages = self.retained.messages  # type: ignore[assignment]
        self.draining = False
        self.delivery_progress = asyncio.Event()  # set when a queue shrinks or a client leaves
        self._reported: dict[tuple[str, str], float] = {}  # (client id, reason) -> when last audited

    # -- W1: our own listener --------------------------------------------------------------
    async def start_listener(self, host: str, port: int) -> int:
        self._listener = await asyncio.start_server(
            self._accept,
            host,
            port,
            backlog=self.listener_config.backlog,
            reuse_address=True,
            reuse_port=self.listener_config.reuse_port or None,
        )
        return int(self._listener.sockets[0].getsockname()[1])

    async def close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 1)
            self._listener = None

    async def shutdown(self) -> None:
        await self.close_listener()
        await self._drain()
        for task in list(self._tasks):
            task.cancel()
        await super().shutdown()

    def _undelivered(self, *, connected: bool) -> int:
        return sum(
            len(s.delivery)
            for s, _ in self._sessions.values()
            if isinstance(s, JitpSession) and s.transitions.is_connected() == connected
        )

    async def _drain(self) -> None:
        """A graceful stop: no new PUBLISH is acknowledged, and what was acknowledged is delivered to
        connected subscribers (for up to ``limits.shutdown_drain_timeout``). Queues of offline
        persistent sessions live in memory and end with the process: how many were left is logged."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.shutdown_drain_timeout):
                while self._undelivered(connected=True):
                    self.delivery_progress.clear()
                    await self.delivery_progress.wait()
        left, offline = self._undelivered(connected=True), self._undelivered(connected=False)
        if left or offline:
            log.warning(
                "stopping with %d message(s) undelivered to connected clients and %d queued for "
                "offline persistent sessions",
                left,
                offline,
            )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.open_connections += 1
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if peer else None
        try:
            # Past this many sockets even a handshake is refused: file descriptors are finite.
            hard_limit = self.listener_config.max_connections + max(
                100, self.listener_config.max_connections // 10
            )
            if self.open_connections > hard_limit:
                writer.transport.abort()
                return
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await writer.start_tls(
                    self.jitp.tls.context, ssl_handshake_timeout=self.listener_config.handshake_timeout
                )
            except (TimeoutError, ssl.SSLError, OSError, EOFError) as exc:
                await self._handshake_failed(exc, address)
                writer.transport.abort()
                return
            await self._client_connected(
                LISTENER,
                LimitedReader(reader, max_packet_size=self.limits.max_packet_size),
                AbortableWriter(writer),
            )
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception:
            log.exception("unexpected error on connection from %s", address)
            writer.transport.abort()
        finally:
            self.open_connections -= 1
            if task is not None:
                self._tasks.discard(task)

    async def _handshake_failed(self, exc: BaseException, address: str | None) -> None:
        refusal = handshake_refusal(exc)
        if refusal is None:
            log.debug("TLS handshake with %s failed: %r", address, exc)
            return
        reason, message = refusal
        await self.jitp.service.record_refusal(_HandshakeRefusal(reason, message), peer=address)

    # -- W2, W3, W6, W7: the connection path -------------------------------------------------
    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        try:
            handler, session = await asyncio.wait_for(
                JitpProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                timeout=self.listener_config.connect_timeout,
            )
        except (
            TimeoutError,
            AMQTTError,
            MQTTError,
            NoDataError,
            asyncio.IncompleteReadError,
            ConnectionError,
            ValueError,
        ) as exc:
            log.debug("no valid CONNECT: %r", exc)
            await _close(writer)
            return
        assert isinstance(handler, JitpProtocolHandler)
        if self.connected_clients >= self.listener_config.max_connections:
            log.warning(
                "refusing %s: %d clients connected (max_connections)",
                session.client_id,
                self.connected_clients,
            )
            await self._refuse(writer, SERVER_UNAVAILABLE)
            return

        # W2: authenticate before any session state is touched.
        try:
            authenticated = await self._authenticate(session, self.listeners_config.get(listener_name))
        except Exception:
            log.exception("authentication plugin failed; refusing")
            authenticated = False
        if not authenticated:
            refusal = session.attributes.get(REFUSAL)
            code = SERVER_UNAVAILABLE if isinstance(refusal, errors.Unavailable) else NOT_AUTHORIZED
            await self._refuse(writer, code)  # W3: never entered the session table
            return

        refusal = self._check_will(session)
        if refusal is not None:
            await self.jitp.service.record_refusal(
                refusal, peer=f"{session.remote_address}:{session.remote_port}", client_id=session.client_id
            )
            await self._refuse(writer, NOT_AUTHORIZED)
            return

        session = await self._attach_session(session)
        session.attributes.pop(CLOSED_BY_BROKER, None)
        session.attributes.pop(CLOSED_BY_OPERATOR, None)
        if isinstance(session, JitpSession):
            role = getattr(session.attributes.get(ADMISSION), "role", Role.DEVICE)
            session.delivery.limits = (
                self.device_queue_limits if role is Role.DEVICE else self.service_queue_limits
            )
        self._apply_keepalive(session)
        if isinstance(reader, LimitedReader):
            reader.idle_timeout = float(session.keep_alive)
        if isinstance(writer, AbortableWriter):
            writer.write_timeout = float(session.keep_alive)
        session.transitions.connect()
        handler.attach(session, reader, writer)
        handler.broker = self
        self._sessions[session.client_id] = (session, handler)
        self.connected_clients += 1
        try:
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
            )
            await handler.start()  # W13: also starts the sender, which resends what was unacknowledged
            for topic_filter, qos in self._own_subscriptions(session):
                await self._publish_retained_messages_for_subscription((topic_filter, qos), session)
            await self._client_message_loop(session, handler)
        finally:
            self.connected_clients -= 1
            with contextlib.suppress(Exception):
                await handler.stop()
            current = self._sessions.get(session.client_id)
            if current is not None and current[1] is handler:  # not taken over by a newer connection
                if session.transitions.is_connected():
                    session.transitions.disconnect()
                if session.clean_session:
                    # W3: a clean session ends with its network connection [MQTT-3.1.2-6].
                    await self._delete_session(session.client_id)

    async def _refuse(self, writer: WriterAdapter, code: int) -> None:
        with contextlib.suppress(Exception):
            await ConnackPacket.build(0, code).to_stream(writer)
        await _close(writer)

    async def _attach_session(self, incoming: Session) -> Session:
        """W7 takeover and session reuse, for an authenticated client only."""
        client_id = incoming.client_id
        existing = self._sessions.get(client_id)
        if existing is None:
            incoming.parent = 0
            return incoming
        old_session, old_handler = existing
        if old_session.transitions.is_connected():
            old_adm = old_session.attributes.get(ADMISSION)
            new_adm = incoming.attributes.get(ADMISSION)
            same_cert = getattr(old_adm, "fingerprint", None) == getattr(new_adm, "fingerprint", None)
            old_peer = f"{old_session.remote_address}:{old_session.remote_port}"
            new_peer = f"{incoming.remote_address}:{incoming.remote_port}"
            written = await self.jitp.service.record_event(
                "session-takeover",
                device_id=client_id,
                peer=new_peer,
                reason="duplicate_client_id",
                details={"previous_peer": old_peer, "same_certificate": str(same_cert).lower()},
            )
            # Repeats within the audit's coalescing window (a cloned certificate's ping-pong) are
            # counted there; the log says it once per window too.
            (log.warning if written else log.debug)(
                "session takeover for %s: %s replaces %s (same certificate: %s); possible cloned certificate",
                client_id,
                new_peer,
                old_peer,
                same_cert,
            )
            if isinstance(old_handler, JitpProtocolHandler):
                old_handler.stop_sender()  # its unacknowledged messages stay queued for the new connection
            await old_handler.handle_connection_closed()
            if isinstance(old_handler.writer, AbortableWriter):
                old_handler.writer.abort()
            for _ in range(100):  # let the old connection's loop finish its disconnect
                if not old_session.transitions.is_connected():
                    break
                await asyncio.sleep(0.01)
            if old_session.transitions.is_connected():
                old_session.transitions.disconnect()
        if incoming.clean_session:
            await self._delete_session(client_id)
            incoming.parent = 0
            return incoming
        # Persistent session: keep subscriptions and queued messages, take the new connection's settings.
        for name in (
            "will_flag",
            "will_message",
            "will_topic",
            "will_qos",
            "will_retain",
            "keep_alive",
            "username",
            "password",
            "remote_address",
            "remote_port",
            "ssl_object",
        ):
            setattr(old_session, name, getattr(incoming, name))
        old_session.attributes.update(incoming.attributes)
        old_session.parent = 1
        return old_session

    def _apply_keepalive(self, session: Session) -> None:
        """W5/W8: clamp keep-alive to the limits and profile; disconnect after ``keepalive_grace`` periods."""
        profile = _profile(session)
        ceiling = self.limits.max_keepalive
        floor = 0
        if profile is not None:
            ceiling = min(ceiling, int(profile["keepalive"]["max"]))
            floor = int(profile["keepalive"]["min"])
        requested = session.keep_alive
        if requested <= 0 or requested > ceiling:
            requested = ceiling
        requested = max(requested, floor)
        session.keep_alive = requested * self.limits.keepalive_grace  # type: ignore[assignment]

    # -- W14: the Last Will goes through the topic ACL ---------------------------------------------
    def _check_will(self, session: Session) -> errors.Refused | None:
        """At CONNECT: a will must be a topic the client may publish to (its own status topic is).
        Such a CONNECT is refused (CONNACK 5, audited ``will_not_allowed``) rather than admitted with
        its will dropped: the device learns at once that its configuration is wrong."""
        if not session.will_flag:
            return None
        topic = session.will_topic or ""
        admission = session.attributes.get(ADMISSION)
        device_id = getattr(getattr(admission, "record", None), "device_id", None)
        fingerprint = getattr(admission, "fingerprint", None)
        if (session.will_qos or 0) > 2:
            return errors.ProtocolViolation(
                "CONNECT with will QoS 3 [MQTT-3.1.2-14]", device_id=device_id, fingerprint=fingerprint
            )
        if "+" in topic or "#" in topic or not self._allows(session, Access.PUBLISH, topic):
            return errors.WillNotAllowed(
                "the Last Will's topic is outside the client's publish namespace",
                device_id=device_id,
                fingerprint=fingerprint,
                detail=repr(topic)[:120],
            )
        return None

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        """The will is published like a PUBLISH (same ACL, now; profile; quotas), unless the client
        said DISCONNECT or the broker closed it for a lifecycle decision (revoked, quarantined...)."""
        result = disconnect_waiter.result()
        if (
            client_session.will_flag
            and result is None
            and not client_session.attributes.get(CLOSED_BY_OPERATOR)
            and client_session.will_topic
        ):
            await self.receive(
                client_session,
                client_session.will_topic,
                bytes(client_session.will_message or b""),
                client_session.will_qos or 0,
                bool(client_session.will_retain),
                will=True,
            )
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )

    # -- W12: one inbound path for PUBLISH and Will, routed through the topic tree ---------------
    def _allows(self, session: Session, access: Access, topic: str) -> bool:
        namespace = session.attributes.get(NAMESPACE, NOBODY)
        return bool(namespace.allows(access, topic))

    async def receive(
        self, session: Session, topic: str, data: bytes, qos: int, retain: bool, *, will: bool = False
    ) -> bool:
        """Check and route one message from ``session``. False: close the connection."""
        if self.draining and not will:
            return False  # not acknowledged: the client sends it again to the next broker
        what = "will" if will else "message"
        profile = _profile(session)
        if profile is not None:
            if len(data) > int(profile["max_message_size"]):
                log.warning(
                    "%s sent a %d-byte %s, over its profile's max_message_size %s: %s",
                    session.client_id,
                    len(data),
                    what,
                    profile["max_message_size"],
                    "dropped" if will else "disconnecting",
                )
                return False
            if not will and not _within_rate(session, profile):
                log.info("%s is over its message rate; message on %s dropped", session.client_id, topic)
                return True
            # W8: the profile's max_qos also caps what the device publishes (and its will).
            qos = min(qos, int(profile["max_qos"]))
        if topic.startswith(JITP_ADMIN_TOPICS) and not will:
            return await self._admin_request(session, topic, data)
        if topic.startswith("$") and not topic.startswith(JITP_DEVICE_TOPICS):
            if will:
                return True  # refused at CONNECT already; the ACL would refuse it anyway
            log.warning("[MQTT-4.7.2-1] %s published to %s: closing the connection", session.client_id, topic)
            return False
        if not self._allows(session, Access.PUBLISH, topic):
            # W10 too: a device publishes under $ only to its own status topic.
            log.info("%s may not publish to %s; %s dropped", session.client_id, topic, what)
            if will:
                self._report(session, errors.WillNotAllowed, f"will on {topic!r} refused at publication")
            return True
        self.route(topic, data, qos)
        if retain:
            self._retain(session, topic, data, qos)
        return True

    def route(self, topic: str, data: bytes, qos: int) -> int:
        """Queue ``data`` for every session subscribed to ``topic`` and allowed to receive it.

        Synchronous: when it returns, every matching subscription has the message, so a PUBACK
        sent afterwards is a promise kept whatever the publisher does next."""
        routed = 0
        for client_id, sub_qos in self.subscription_tree.match(topic).items():
            entry = self._sessions.get(client_id)
            if entry is None:
                continue
            target = entry[0]
            if not isinstance(target, JitpSession) or not self._allows(target, Access.RECEIVE, topic):
                continue
            routed += self._enqueue(target, Outgoing(topic, data, min(qos, sub_qos), retain=False))
        return routed

    def _enqueue(self, target: JitpSession, message: Outgoing) -> bool:
        connected = target.transitions.is_connected()
        if not connected and (target.clean_session or message.qos == 0):
            return False  # offline: only persistent sessions keep QoS 1 messages [MQTT-3.1.2-5]
        offer = target.delivery.offer(message)
        if offer is Offer.QUEUED:
            return True
        if offer is Offer.OVERFLOW and connected:
            if CLOSED_BY_BROKER not in target.attributes:  # once, however many messages overflow
                target.attributes[CLOSED_BY_BROKER] = "queue_full"
                self._report(
                    target, errors.QueueFull, "QoS 1 queue full: the client does not keep up; disconnected"
                )
                self.spawn(self._close_overflowing(target), "jitp-queue-full")
        else:
            self._report(target, errors.QueueFull, f"{len(target.delivery)} messages queued: dropped")
        return False

    def _retain(self, session: Session, topic: str, data: bytes, qos: int) -> None:
        verdict = self.retained.put(topic, data, qos, owner=session.client_id)
        if verdict in (RetainVerdict.STORED, RetainVerdict.CLEARED):
            return
        count, nbytes = self.retained.owner_usage(session.client_id or "")
        self._report(
            session,
            errors.RetainedQuota,
            f"retained message on {topic!r} refused ({verdict.value}): the client retains "
            f"{count} message(s), {nbytes} bytes; the broker {self.retained.total_bytes} bytes",
        )

    def _report(self, session: Session, kind: type[errors.Refused], message: str) -> None:
        """Log and audit a limit a connected client hit; the audit coalesces repeats (and this
        reports one cause of one client at most once a second, so a flood costs no task per message)."""
        client_id = session.client_id or "?"
        now = time.monotonic()
        key = (client_id, kind.reason)
        if now - self._reported.get(key, -1e9) < 1.0:
            return
        if len(self._reported) > 10_000:
            self._reported.clear()
        self._reported[key] = now
        log.warning("%s: %s (%s)", client_id, message, kind.reason)
        admission = session.attributes.get(ADMISSION)
        record = getattr(admission, "record", None)
        refusal = kind(
            message,
            device_id=getattr(record, "device_id", None),
            fingerprint=getattr(admission, "fingerprint", None),
            detail=None if record is not None else client_id[:80],
        )
        self.spawn(
            self.jitp.service.record_refusal(
                refusal, peer=f"{session.remote_address}:{session.remote_port}", client_id=client_id
            ),
            "jitp-audit-limit",
        )

    async def _close_overflowing(self, session: JitpSession) -> None:
        found = self._sessions.get(session.client_id or "")
        if found is not None and found[0] is session and session.transitions.is_connected():
            log.warning("closing the connection of %s: queue_full", session.client_id)
            await self.close_connection(session, found[1])

    async def protocol_violation(self, session: Session, handler: BrokerProtocolHandler, what: str) -> None:
        """A packet the specification says closes the connection: audited, then closed."""
        self._report(session, errors.ProtocolViolation, what)
        await self.close_connection(session, handler)

    async def close_connection(self, session: Session, handler: BrokerProtocolHandler) -> None:
        await handler.handle_connection_closed()
        if isinstance(handler.writer, AbortableWriter):
            handler.writer.abort()

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """Only QoS 2 messages come this way (amqtt's PUBREC/PUBREL flow); QoS 0 and 1 are routed
        by :meth:`JitpProtocolHandler.handle_publish` before their PUBACK."""
        message = wait_deliver.result()
        if message is None or not message.topic:
            return True
        retain = bool(message.publish_packet is not None and message.publish_packet.retain_flag)
        return await self.receive(client_session, message.topic, bytes(message.data or b""), 2, retain)

    async def _admin_request(self, session: Session, topic: str, data: bytes) -> bool:
        """W10: a request to the admin API ($jitp/admin/<command>) goes to the API, never to
        other subscribers; the topic ACL decides who may send one at all."""
        if not self._allows(session, Access.PUBLISH, topic):
            log.info("%s may not use the admin API (%s)", session.client_id, topic)
            return True
        admission = session.attributes.get(ADMISSION)
        self.spawn(self.jitp.admin.handle(admission, topic, data), "jitp-admin")
        return True

    # amqtt's own publishing entry points (BrokerContext.broadcast_message, internal broadcasts)
    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        if topic:
            self.route(topic, bytes(data or b""), 1 if force_qos is None else force_qos)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if topic_name is None:
            return
        if source_session is None:  # the broker's own (device configurations): never refused
            self.retained.put(topic_name, bytes(data or b""), qos or 0, owner=None)
        else:
            self._retain(source_session, topic_name, bytes(data or b""), qos or 0)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """W13: queued messages live in the session's delivery queue and go out as they were
        published, with RETAIN=0 [MQTT-3.3.1-9]; amqtt's replay (with RETAIN=1) is not used."""

    # -- W12 subscriptions, W8 profile, limits ----------------------------------------------------
    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        if not valid_filter(topic_filter) or not self._allows(session, Access.SUBSCRIBE, topic_filter):
            return 0x80
        if not isinstance(session, JitpSession):
            return 0x80
        profile = _profile(session)
        if profile is not None:
            qos = min(qos, int(profile["max_qos"]))
        if topic_filter not in session.filters and len(session.filters) >= self.limits.max_subscriptions:
            self._report(
                session,
                errors.SubscriptionLimit,
                f"subscription to {topic_filter!r} refused: {len(session.filters)} filters (limits.max_subscriptions)",
            )
            return 0x80
        session.filters[topic_filter] = qos
        self.subscription_tree.subscribe(topic_filter, session.client_id or "", qos)
        return qos

    async def _handle_subscription(
        self, client_session: Session, handler: BrokerProtocolHandler, subscribe_waiter: asyncio.Future[Any]
    ) -> None:
        request = subscribe_waiter.result()
        codes = [await self.add_subscription(sub, client_session) for sub in request.topics]
        await handler.mqtt_acknowledge_subscription(request.packet_id, codes)
        for (topic_filter, _), code in zip(request.topics, codes, strict=True):
            if code != 0x80:
                await self._publish_retained_messages_for_subscription((topic_filter, code), client_session)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        if isinstance(session, JitpSession):
            session.filters.pop(a_filter, None)
        return int(self.subscription_tree.unsubscribe(a_filter, session.client_id or ""))

    async def _del_all_subscriptions(self, session: Session) -> None:
        if isinstance(session, JitpSession):
            for topic_filter in list(session.filters):
                self._del_subscription(topic_filter, session)

    async def _delete_session(self, client_id: str) -> None:
        session = self._sessions.pop(client_id, (None, None))[0]
        if session is None:
            return
        await self._del_all_subscriptions(session)
        session.clear_queues()
        if isinstance(session, JitpSession):
            session.delivery.clear()

    @property
    def subscriptions(self) -> dict[str, list[tuple[Session, int]]]:
        """amqtt's view (filter -> [(session, QoS)]), built from the topic tree."""
        view: dict[str, list[tuple[Session, int]]] = {}
        for topic_filter, client_id, qos in self.subscription_tree.entries():
            entry = self._sessions.get(client_id)
            if entry is not None:
                view.setdefault(topic_filter, []).append((entry[0], qos))
        return view

    # -- operator actions on live sessions -----------------------------------------------------
    def live_session(self, client_id: str) -> tuple[Session, BrokerProtocolHandler] | None:
        found = self._sessions.get(client_id)
        if found is None or not found[0].transitions.is_connected():
            return None
        return found

    async def disconnect_client(self, client_id: str, *, reason: str) -> bool:
        """Close a client's connection now. True if it was connected."""
        found = self.live_session(client_id)
        if found is None:
            return False
        session, handler = found
        session.attributes[CLOSED_BY_OPERATOR] = reason  # W14: no will for a revoked device
        log.warning("closing the session of %s: %s", client_id, reason)
        await handler.handle_connection_closed()
        if isinstance(handler.writer, AbortableWriter):
            handler.writer.abort()
        return True

    def set_namespace(self, client_id: str, namespace: Any, admission: Any) -> bool:
        """Swap a live client's topic namespace (e.g. quarantine) without disconnecting it."""
        found = self.live_session(client_id)
        if found is None:
            return False
        found[0].attributes[NAMESPACE] = namespace
        found[0].attributes[ADMISSION] = admission
        return True

    def clear_retained(self, *, owner: str | None = None, prefix: str | None = None) -> int:
        """Clear the retained messages ``owner`` retained, and those under topic ``prefix``."""
        doomed = set(self.retained.owned_by(owner)) if owner is not None else set()
        if prefix is not None:
            doomed.update(t for t in self.retained.messages if t.startswith(prefix))
        for topic in doomed:
            self.retained.remove(topic)
        return len(doomed)

    def live_admissions(self) -> list[tuple[str, Any, Any]]:
        """(client id, admission, peer credentials) of every connected, admitted client."""
        out = []
        for client_id, (session, _) in list(self._sessions.items()):
            if session.transitions.is_connected() and ADMISSION in session.attributes:
                out.append((client_id, session.attributes[ADMISSION], session.attributes.get(PEER)))
        return out

    def _own_subscriptions(self, session: Session) -> list[tuple[str, int]]:
        return list(session.filters.items()) if isinstance(session, JitpSession) else []

    # -- W4: retained messages obey the topic ACL ----------------------------------------------
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if not isinstance(session, JitpSession):
            return
        topic_filter, qos = subscription
        for retained in self.retained.match(topic_filter):
            if self._allows(session, Access.RECEIVE, retained.topic):
                self._enqueue(
                    session, Outgoing(retained.topic, retained.data, min(qos, retained.qos), retain=True)
                )

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _profile(session: Session) -> dict[str, Any] | None:
    admission = session.attributes.get(ADMISSION)
    record = getattr(admission, "record", None)
    if record is None:
        return None
    profile = record.config.get("profile")
    return profile if isinstance(profile, dict) else None


def _within_rate(session: Session, profile: dict[str, Any]) -> bool:
    """A token bucket per session: ``messages`` per ``per_seconds``, bursts up to ``messages``."""
    limit = profile.get("rate_limit") or {}
    capacity = float(limit.get("messages", 0))
    if capacity <= 0:
        return True
    period = float(limit.get("per_seconds", 1.0))
    now = time.monotonic()
    tokens, last = session.attributes.get(RATE, (capacity, now))
    tokens = min(capacity, tokens + (now - last) * capacity / period)
    if tokens < 1.0:
        session.attributes[RATE] = (tokens, now)
        return False
    session.attributes[RATE] = (tokens - 1.0, now)
    return True


class _HandshakeRefusal(errors.Refused):
    """A refusal decided by OpenSSL during the handshake, before any MQTT."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"TLS handshake refused: {message}")
        self.reason = reason  # type: ignore[misc]


async def _close(writer: WriterAdapter) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.close(), 1)
    if isinstance(writer, AbortableWriter):
        writer.abort()
