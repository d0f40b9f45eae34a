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
from typing import TYPE_CHECKING, Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

from broker_plugins.tls import handshake_refusal
from jitp import errors

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
    """An amqtt Session with :class:`LeanSessionState` (W11)."""

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

    async def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.max_packet_size:
            raise PacketTooLarge(f"packet larger than {self.max_packet_size} bytes")
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
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self.stream = writer

    def abort(self) -> None:
        self.is_closed = True
        transport = self.stream.transport
        if transport is not None:
            transport.abort()


class JitpProtocolHandler(BrokerProtocolHandler):
    """W5 keep-alive enforcement and W6 inflight limit on top of amqtt's handler."""

    max_inflight = 32

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inflight = asyncio.Semaphore(self.max_inflight)

    def handle_read_timeout(self) -> None:
        session = self.session
        log.info(
            "keep-alive expired for %s: no packet for %.1f s, disconnecting",
            session.client_id if session else "?",
            session.keep_alive if session else 0,
        )
        if isinstance(self.writer, AbortableWriter):
            self.writer.abort()

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
    ) -> Any:
        if not qos:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        async with self._inflight:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)


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
        self.limits = cfg.limits
        self.listener_config = cfg.listener
        JitpProtocolHandler.max_inflight = cfg.limits.max_inflight

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
        for task in list(self._tasks):
            task.cancel()
        await super().shutdown()

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

        session = await self._attach_session(session)
        self._apply_keepalive(session)
        session.transitions.connect()
        handler.attach(session, reader, writer)
        self._sessions[session.client_id] = (session, handler)
        self.connected_clients += 1
        try:
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
            )
            await handler.start()
            await self._publish_session_retained_messages(session)
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
                    del self._sessions[session.client_id]
                    await self._del_all_subscriptions(session)
                    session.clear_queues()

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
            log.warning(
                "session takeover for %s: %s replaces %s (same certificate: %s); possible cloned certificate",
                client_id,
                new_peer,
                old_peer,
                same_cert,
            )
            await self.jitp.service.record_event(
                "session-takeover",
                device_id=client_id,
                peer=new_peer,
                reason="duplicate_client_id",
                details={"previous_peer": old_peer, "same_certificate": str(same_cert).lower()},
            )
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

    # -- W8: connectivity profile ------------------------------------------------------------
    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        profile = _profile(session)
        topic_filter, qos = subscription
        if profile is not None:
            qos = min(qos, int(profile["max_qos"]))
        return await super().add_subscription((topic_filter, qos), session)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        profile = _profile(client_session)
        message = wait_deliver.result()
        if profile is not None and message is not None:
            size = len(message.data or b"")
            if size > int(profile["max_message_size"]):
                log.warning(
                    "%s sent %d bytes, over its profile's max_message_size %s: disconnecting",
                    client_session.client_id,
                    size,
                    profile["max_message_size"],
                )
                return False
            if not _within_rate(client_session, profile):
                log.info(
                    "%s is over its message rate; message on %s dropped",
                    client_session.client_id,
                    message.topic,
                )
                return True
        if message is not None and message.topic and message.topic.startswith(JITP_DEVICE_TOPICS):
            return await self._device_status(client_session, message)
        if message is not None and message.topic and message.topic.startswith(JITP_ADMIN_TOPICS):
            return await self._admin_request(client_session, message)
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)

    async def _device_status(self, session: Session, message: Any) -> bool:
        """W10: stock amqtt disconnects any client publishing to a $-topic; jitp devices report status
        on their own ``$jitp/devices/<id>/status`` (the topic ACL decides; nothing else under $)."""
        if not await self._topic_filtering(session, topic=message.topic, action=Action.PUBLISH):
            log.info("%s may not publish to %s", session.client_id, message.topic)
            return True
        await self._broadcast_message(session, message.topic, message.data)
        if message.publish_packet is not None and message.publish_packet.retain_flag:
            await self.retain_message(session, message.topic, message.data, message.qos)
        return True

    async def _admin_request(self, session: Session, message: Any) -> bool:
        """W10 too: a request to the admin API ($jitp/admin/<command>) goes to the API, never to
        other subscribers; the topic ACL decides who may send one at all."""
        if not await self._topic_filtering(session, topic=message.topic, action=Action.PUBLISH):
            log.info("%s may not use the admin API (%s)", session.client_id, message.topic)
            return True
        admission = session.attributes.get(ADMISSION)
        self.spawn(self.jitp.admin.handle(admission, message.topic, bytes(message.data or b"")), "jitp-admin")
        return True

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
        _, handler = found
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

    async def clear_retained(self, filters: tuple[str, ...]) -> int:
        """Clear every retained message whose topic matches one of ``filters``."""
        doomed = [t for t in list(self._retained_messages) if any(self._matches(t, f) for f in filters)]
        for topic in doomed:
            await self.retain_message(None, topic, b"")
        return len(doomed)

    def live_admissions(self) -> list[tuple[str, Any, Any]]:
        """(client id, admission, peer credentials) of every connected, admitted client."""
        out = []
        for client_id, (session, _) in list(self._sessions.items()):
            if session.transitions.is_connected() and ADMISSION in session.attributes:
                out.append((client_id, session.attributes[ADMISSION], session.attributes.get(PEER)))
        return out

    def _own_subscriptions(self, session: Session) -> list[tuple[str, int]]:
        return [
            (f, qos)
            for f, subs in self._subscriptions.items()
            for s, qos in subs
            if s.client_id == session.client_id
        ]

    # -- W4: retained messages obey the topic ACL ----------------------------------------------
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos or QOS_0), retain=True
                    )
                )
            )
        if tasks:
            await asyncio.wait(tasks)

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
