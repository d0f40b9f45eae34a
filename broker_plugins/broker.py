"""The jitp broker: amqtt's session and packet machinery, with jitp's connection path and routing.

A connection arrives from the :class:`~broker_plugins.listener.Listener` (TLS done). The broker
reads CONNECT, asks the provisioning service to admit the peer (W2: before any session state is
touched), checks the will (W14), takes over or reuses a session (W7), and then routes every
message through its topic tree (W12) into bounded per-session queues (W13), retained messages
under quotas (W15). It calls the service and nothing above it: the server assembles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Collection
from typing import Any, Protocol

from amqtt.broker import Broker
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, IDENTIFIER_REJECTED
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from broker_plugins import enforcement, reasons
from broker_plugins.compat import check_amqtt_internals, peer_chain_der
from broker_plugins.framing import (
    ConnectRequest,
    MalformedConnect,
    connect_protocol,
    parse_connect,
    parse_connect5,
)
from broker_plugins.handler import ACCEPTED, NOT_AUTHORIZED, JitpProtocolHandler, Verdict, Welcome
from broker_plugins.mqtt5_handler import Mqtt5Handler
from broker_plugins.reasons import Goodbye
from broker_plugins.relay import NO_RELAY, Relay
from broker_plugins.session import ClientState, JitpSession
from broker_plugins.transport import TlsConnection
from jitp import errors
from jitp.app.certificates import CertificateService
from jitp.app.service import Admission, PeerCredentials, ProvisioningService
from jitp.config import Config
from jitp.domain.acl import Access, topic_matches, valid_filter
from jitp.domain.certificates import CERTIFICATES_PREFIX
from jitp.domain.events import config_topic, record_config_payload
from jitp.domain.records import DeviceRecord
from jitp.domain.routing import (
    DEFAULT_OPTIONS,
    NO_PROPERTIES,
    MessageProperties,
    Offer,
    Outgoing,
    QueueLimits,
    RetainedLimits,
    RetainedStore,
    RetainVerdict,
    SubscriptionOptions,
    SubscriptionTree,
    shared_filter,
)
from jitp.observability.port import JoinOutcome
from jitp.trust import Role, fingerprint_der

log = logging.getLogger("jitp.broker")

JITP_DEVICE_TOPICS = "$jitp/devices/"  # devices publish their status here (W10)
JITP_ADMIN_TOPICS = "$jitp/admin/"  # backend principals send admin API requests here (W10)
SUBACK_FAILURE = 0x80
# MQTT 5 SUBACK/UNSUBACK reason codes (3.1.1 sends 0x80 for any failure)
SUBACK_NOT_AUTHORIZED, SUBACK_FILTER_INVALID, SUBACK_QUOTA_EXCEEDED = 0x87, 0x8F, 0x97
UNSUBACK_SUCCESS, UNSUBACK_NO_SUBSCRIPTION = 0x00, 0x11
MAX_QOS = 1  # granted to subscriptions: jitp delivers QoS 0 and 1 (3.1.1 QoS 2 PUBLISHes are accepted)
MQTT_311, MQTT_5 = 4, 5
V3_CONNACK_UNSUPPORTED = b"\x20\x02\x00\x01"  # return code 1: unacceptable protocol version
SHARED = "\x00"  # subscriber keys of shared subscriptions start with U+0000, never in a client id


class AdminHandler(Protocol):
    """The admin API (:class:`~broker_plugins.admin.AdminApi`)."""

    def __call__(
        self,
        admission: Admission,
        topic: str,
        payload: bytes,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> Awaitable[None]: ...


class JitpBroker(Broker):
    """amqtt's broker with jitp's connection path (W2-W4, W7) and routing (W12-W15)."""

    def __init__(self, config: Config, *, service: ProvisioningService, admin: AdminHandler) -> None:
        check_amqtt_internals()
        # The listener is "external" (jitp's own, W1) and there are no amqtt plugins: the broker
        # calls the provisioning service itself.
        super().__init__({"listeners": {"default": {"type": "external"}}, "plugins": {}})
        self.service = service
        self.admin = admin
        self.limits = limits = config.limits
        self.listener_config = config.listener
        self.connected_clients = 0
        self._tasks: set[asyncio.Task[Any]] = set()
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
        # W12: a topic tree (client id -> QoS per filter) instead of amqtt's scanned dict.
        self.subscription_tree: SubscriptionTree[str] = SubscriptionTree()
        self.shares: dict[str, SharedGroup] = {}  # SHARED + "$share/<name>/<filter>" -> members
        # W15: retained messages with quotas; amqtt's name for them is kept for its own code.
        self.retained = RetainedStore(
            RetainedLimits(
                max_per_owner=limits.max_retained_per_client,
                max_bytes_per_owner=limits.max_retained_bytes_per_client,
                max_total_bytes=limits.max_retained_bytes,
            )
        )
        self._retained_messages = self.retained.messages  # type: ignore[assignment]
        self.draining = False
        # Other worker processes of `jitp serve --workers N` (a no-op with one process): what a client
        # publishes or retains here is also routed or retained there.
        self.relay: Relay = NO_RELAY
        self._progress = asyncio.Event()  # set when a queue shrinks or a client leaves
        self._reported: dict[tuple[str, str], float] = {}  # (client id, reason) -> when last audited
        # Operational certificates ($jitp/certificates/<id>/create-from-csr); set by the server.
        self.certificates: CertificateService | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        self.draining = True
        for task in list(self._tasks):
            task.cancel()
        await super().shutdown()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def delivered(self) -> None:
        self._progress.set()

    def stalled(self, session: JitpSession) -> None:
        self._report(
            session,
            errors.QueueFull,
            f"the client read nothing for {session.keep_alive:.0f} s with {len(session.delivery)} "
            "message(s) waiting: disconnected",
        )

    def _undelivered(self, *, connected: bool) -> int:
        return sum(
            len(s.delivery)
            for s, _ in self._sessions.values()
            if isinstance(s, JitpSession) and s.transitions.is_connected() == connected
        )

    async def drain(self) -> None:
        """A graceful stop: no new PUBLISH is acknowledged, and what was acknowledged is delivered to
        connected subscribers (for up to ``limits.shutdown_drain_timeout``). Queues of offline
        persistent sessions live in memory and end with the process: how many were left is logged."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.shutdown_drain_timeout):
                while self._undelivered(connected=True):
                    self._progress.clear()
                    await self._progress.wait()
        left, offline = self._undelivered(connected=True), self._undelivered(connected=False)
        if left or offline:
            log.warning(
                "stopping with %d message(s) undelivered to connected clients and %d queued for "
                "offline persistent sessions",
                left,
                offline,
            )

    # -- W2, W3, W6, W7: the connection path -------------------------------------------------
    async def connection(self, connection: TlsConnection, packet: bytes) -> None:
        """One TLS connection, from its CONNECT (whole, from the transport) to the end of its session.
        MQTT 3.1.1 and 5 take the same path; only the codec and the answers' format differ."""
        level = await self._supported_protocol(packet, connection)
        if level is None:
            return
        try:
            # in place: no stream, no plugin dispatch
            request = parse_connect5(packet) if level == MQTT_5 else parse_connect(packet)
        except MalformedConnect as exc:
            log.debug("no valid CONNECT from %s: %s", connection.address, exc)
            await self._malformed_connect(connection, exc)
            if level == MQTT_5:  # v5 says why [MQTT-4.13.1-1]; 3.1.1 closes without CONNACK
                await self._refuse(
                    connection, reasons.Refusal(0, exc.code, f"malformed CONNECT: {exc}"), level
                )
            else:
                await _close(connection)
            return
        if request.auth_method is not None:  # MQTT 5 enhanced authentication: not offered
            await self.service.record_refusal(
                errors.UnsupportedProtocol(
                    "enhanced authentication (Authentication Method) is not supported: mutual TLS only",
                    detail=f"authentication method {request.auth_method[:40]!r}",
                ),
                peer=connection.address,
                client_id=request.client_id,
            )
            refusal = reasons.Refusal(0, reasons.BAD_AUTHENTICATION_METHOD, "bad_authentication_method")
            await self._refuse(connection, refusal, level, request.max_packet_size)
            return
        if level == MQTT_311 and request.password is not None and request.username is None:
            await self._refuse(
                connection, reasons.Refusal(BAD_USERNAME_PASSWORD, 0, ""), level
            )  # [MQTT-3.1.2-22]
            return
        if level == MQTT_311 and not request.client_id and not request.clean_session:
            await self._refuse(
                connection, reasons.Refusal(IDENTIFIER_REJECTED, 0, ""), level
            )  # [MQTT-3.1.3-8]
            return
        session = _session_of(request, connection)
        handler = (
            Mqtt5Handler(self.plugins_manager)
            if level == MQTT_5
            else JitpProtocolHandler(self.plugins_manager)
        )
        if self.connected_clients >= self.listener_config.max_connections:
            log.warning(
                "refusing %s: %d clients connected (max_connections)",
                session.client_id,
                self.connected_clients,
            )
            await self._refuse(connection, reasons.BUSY, level, request.max_packet_size)
            return

        # W2: admit before any session state is touched. The service audits its refusals.
        peer = PeerCredentials(
            chain_der=peer_chain_der(session.ssl_object),
            client_id=session.client_id or "",
            address=session.peer_address,
        )
        try:
            admission = await self.service.admit(peer)
        except errors.ProvisioningError as exc:
            refusal = reasons.refusal_of(exc)
            # W3: never entered the session table
            await self._refuse(connection, refusal, level, request.max_packet_size)
            shed = refusal.v3 == reasons.V3_SERVER_UNAVAILABLE
            self._joined(connection, JoinOutcome.SHED if shed else JoinOutcome.REFUSED)
            return
        session.admit(ClientState.of(admission, peer))
        session.is_anonymous = False

        refusal_will = enforcement.check_will(session)
        if refusal_will is not None:
            await self.service.record_refusal(
                refusal_will, peer=session.peer_address, client_id=session.client_id
            )
            if not enforcement.will_allowed_once_released(session):
                await self._refuse(
                    connection, reasons.refusal_of(refusal_will), level, request.max_packet_size
                )
                self._joined(connection, JoinOutcome.REFUSED)
                return
            session.will_flag = False  # quarantined: admitted, its will dropped (and audited above)

        session = await self._attach_session(session)
        session.closing, session.closed_by_operator = False, None
        profile = session.client.profile if session.client else None
        limits = (
            self.device_queue_limits
            if admission.role in (Role.DEVICE, Role.CLAIM)
            else self.service_queue_limits
        )
        if request.receive_max < limits.max_inflight:  # MQTT 5 Receive Maximum [MQTT-3.3.4-9]
            limits = dataclasses.replace(limits, max_inflight=request.receive_max)
        session.delivery.limits = limits
        keep_alive = enforcement.clamp_keepalive(request.keep_alive, limits=self.limits, profile=profile)
        session.keep_alive = keep_alive * self.limits.keepalive_grace  # type: ignore[assignment]
        expiry = self._session_expiry(request)
        session.protocol, session.session_expiry = request.protocol, expiry
        session.clean_session = expiry == 0
        connection.write_timeout = float(session.keep_alive)
        session.transitions.connect()
        handler.attach(session, connection, connection)
        handler.broker = self
        handler.max_packet_size = self.limits.max_packet_size
        max_qos = min(MAX_QOS, profile.max_qos) if profile is not None else MAX_QOS
        if isinstance(handler, Mqtt5Handler):
            handler.client_max_packet = request.max_packet_size
            handler.problem_info = request.request_problem_info
            handler.session_expiry_cap = self.limits.max_session_expiry
        welcome = Welcome(
            session_present=bool(session.parent),
            session_expiry=expiry if expiry != request.session_expiry and level == MQTT_5 else None,
            server_keep_alive=keep_alive if keep_alive != request.keep_alive else None,
            receive_max=self.limits.max_inflight,
            max_packet_size=self.limits.max_packet_size,
            max_qos=max_qos,
        )
        self._sessions[session.client_id or ""] = (session, handler)
        self.connected_clients += 1
        try:
            await handler.accept(welcome)
            new = admission.created or admission.reprovisioned
            self._joined(connection, JoinOutcome.PROVISIONED if new else JoinOutcome.RECONNECTED)
            self._ensure_config(admission)
            for topic_filter, qos in list(session.filters.items()):
                if session.options.get(topic_filter, DEFAULT_OPTIONS).retain_handling == 0:
                    await self._publish_retained_messages_for_subscription((topic_filter, qos), session)
            # W13, W18: the sender starts (resending what was unacknowledged), and this task reads.
            said_disconnect = await handler.run()
            await self._connection_ended(session, said_disconnect=said_disconnect)
        finally:
            self.connected_clients -= 1
            with contextlib.suppress(Exception):
                await handler.stop()
            current = self._sessions.get(session.client_id or "")
            if current is not None and current[1] is handler:  # not taken over by a newer connection
                if session.transitions.is_connected():
                    session.transitions.disconnect()
                self._redistribute(session)
                if session.clean_session:
                    # W3: a clean session ends with its network connection [MQTT-3.1.2-6].
                    await self._delete_session(session.client_id or "")
                else:
                    self._expire_later(session)

    def _session_expiry(self, request: ConnectRequest) -> int:
        """Seconds the session outlives its connection: MQTT 5's Session Expiry Interval, or for a
        3.1.1 persistent session (no expiry of its own) the cap, ``limits.max_session_expiry``."""
        cap = self.limits.max_session_expiry
        if request.protocol == MQTT_5:
            return min(request.session_expiry, cap)
        return 0 if request.clean_session else cap

    def _expire_later(self, session: JitpSession) -> None:
        """An offline persistent session ends after its expiry interval [MQTT-3.1.2-23]."""
        client_id = session.client_id or ""

        def expire() -> None:
            session.expiry_timer = None
            found = self._sessions.get(client_id)
            if found is not None and found[0] is session and not session.transitions.is_connected():
                log.info("session of %s expired after %d s offline", client_id, session.session_expiry)
                if session.will_timer is not None:  # the session ends first: its will goes now
                    session.will_timer.cancel()
                    session.will_timer = None
                    self.spawn(self._publish_will(session), "jitp-will")
                self.spawn(self._delete_session(client_id), "jitp-session-expiry")

        if session.expiry_timer is not None:  # not the will timer: a will held back still goes
            session.expiry_timer.cancel()
        session.expiry_timer = asyncio.get_running_loop().call_later(session.session_expiry, expire)

    def _joined(self, connection: TlsConnection, outcome: JoinOutcome) -> None:
        """Accept to CONNACK, for ``jitp_join_seconds``."""
        self.service.observer.join_seconds(time.monotonic() - connection.accepted_at, outcome)

    async def _supported_protocol(self, packet: bytes, connection: TlsConnection) -> int | None:
        """MQTT 3.1.1 (level 4) and 5 go on. Any other level gets the refusal its own version
        understands, at once, and is audited: MQTT 3.1 (``MQIsdp``, level 3) and other levels
        CONNACK 0x01 [MQTT-3.1.2-2]; a first packet that is not a CONNECT closes the connection
        [MQTT-3.1.0-1]."""
        protocol = connect_protocol(packet)
        if protocol == ("MQTT", MQTT_311) or protocol == ("MQTT", MQTT_5):
            return protocol[1]
        address = connection.address
        if protocol is None or protocol[0] not in ("MQTT", "MQIsdp"):
            log.debug("first packet from %s is not an MQTT CONNECT: closing", address)
            await _close(connection)
            return None
        name, level = protocol
        refusal = errors.UnsupportedProtocol(
            f"MQTT protocol level {level} ({name}) is not supported; this broker speaks MQTT 3.1.1 "
            "(level 4) and 5",
            detail=f"{name} level {level}",
        )
        await self.service.record_refusal(refusal, peer=address)
        with contextlib.suppress(Exception):
            connection.write(V3_CONNACK_UNSUPPORTED)
            await connection.drain()
        await _close(connection)
        return None

    async def _malformed_connect(self, connection: TlsConnection, exc: MalformedConnect) -> None:
        """Audit a CONNECT that breaks the specification as a protocol violation, like any later
        packet that does; keyed by the peer's certificate, so that repeats coalesce."""
        chain = peer_chain_der(connection.get_ssl_info())
        refusal = errors.ProtocolViolation(
            f"malformed CONNECT: {exc}", fingerprint=fingerprint_der(chain[0]) if chain else None
        )
        await self.service.record_refusal(refusal, peer=connection.address)

    async def _refuse(
        self, connection: TlsConnection, refusal: reasons.Refusal, level: int, max_packet: int | None = None
    ) -> None:
        """CONNACK with the refusal (3.1.1: its return code; 5: reason code and Reason String), then close.
        ``max_packet``: the client's Maximum Packet Size; the Reason String and the Retry-After are left
        out rather than exceed it [MQTT-3.2.2-19, MQTT-3.2.2-20]."""
        data = reasons.connack(refusal, mqtt5_format=level == MQTT_5, max_packet=max_packet)
        with contextlib.suppress(Exception):
            connection.write(data)
            await connection.drain()
        await _close(connection)

    def _ensure_config(self, admission: Admission) -> None:
        """Re-retain a device's configuration if the broker lost it (retained messages live in memory).
        A new (or renewed) device gets its configuration with its event, from the publisher."""
        record = admission.record
        if record is None or admission.created or admission.reprovisioned:
            return
        topic = config_topic(record.device_id)
        if topic not in self.retained:
            payload = record_config_payload(record)
            self.retain_own(topic, payload, 1)
            self.route(topic, payload, 1)

    async def _attach_session(self, incoming: JitpSession) -> JitpSession:
        """W7 takeover and session reuse, for an admitted client only."""
        client_id = incoming.client_id or ""
        incoming.connected_at = time.monotonic()
        self.relay.attached(client_id, incoming.connected_at)  # other workers close theirs [MQTT-3.1.4-2]
        existing = self._sessions.get(client_id)
        if existing is None:
            incoming.parent = 0
            return incoming
        old_session, old_handler = existing
        assert isinstance(old_session, JitpSession)
        if old_session.transitions.is_connected():
            await self._take_over(old_session, old_handler, incoming)
        # A delayed will or an expiry: the client is back [MQTT-3.1.3-9]. After the takeover, whose
        # end of the old connection holds back the old connection's will.
        _cancel_timers(old_session)
        if incoming.clean_start:
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
            "connected_at",
            "will_properties",
            "will_delay",
            "clean_start",
        ):
            setattr(old_session, name, getattr(incoming, name))
        assert incoming.client is not None
        old_session.admit(incoming.client)
        old_session.parent = 1
        return old_session

    async def _take_over(
        self, old_session: JitpSession, old_handler: BrokerProtocolHandler, incoming: JitpSession
    ) -> None:
        """A second connection of an admitted client closes the first; audited (coalesced), as it is
        the signature of a cloned certificate."""
        client_id = incoming.client_id or ""
        old_fp = old_session.client.fingerprint if old_session.client else None
        same_cert = old_fp == (incoming.client.fingerprint if incoming.client else None)
        old_peer, new_peer = old_session.peer_address, incoming.peer_address
        written = await self.service.record_event(
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
        # its task sees the end of the connection, publishes its will, disconnects
        _end(old_handler, Goodbye.SESSION_TAKEN_OVER)
        for _ in range(100):  # let the old connection's loop finish its disconnect
            if not old_session.transitions.is_connected():
                break
            await asyncio.sleep(0.01)
        if old_session.transitions.is_connected():
            old_session.transitions.disconnect()

    # -- W14: the Last Will, published like a PUBLISH ----------------------------------------------
    async def _connection_ended(self, session: JitpSession, *, said_disconnect: bool) -> None:
        """The will goes through :meth:`receive` (ACL now, profile, quotas), unless the client said
        DISCONNECT or the broker closed it for a lifecycle decision (revoked, disabled...). An MQTT 5
        Will Delay Interval holds it back (at most until the session ends); a reconnect within it
        cancels it [MQTT-3.1.3-9]."""
        if (
            not session.will_flag
            or said_disconnect
            or session.closed_by_operator is not None
            or not session.will_topic
        ):
            return
        delay = min(session.will_delay, session.session_expiry)
        if delay > 0:

            def publish_will() -> None:
                session.will_timer = None
                self.spawn(self._publish_will(session), "jitp-will")

            session.will_timer = asyncio.get_running_loop().call_later(delay, publish_will)
            return
        await self._publish_will(session)

    async def _publish_will(self, session: JitpSession) -> None:
        properties = session.will_properties
        if properties.expires_at is not None:  # the interval, relative: its deadline starts now
            properties = dataclasses.replace(properties, expires_at=time.monotonic() + properties.expires_at)
        await self.receive(
            session,
            session.will_topic or "",
            bytes(session.will_message or b""),
            session.will_qos or 0,
            bool(session.will_retain),
            properties=properties,
            will=True,
        )

    # -- W12: one inbound path for PUBLISH and Will, routed through the topic tree ---------------
    async def receive(
        self,
        session: JitpSession,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        *,
        properties: MessageProperties = NO_PROPERTIES,
        will: bool = False,
    ) -> Verdict:
        """Check and route one message from ``session``."""
        if self.draining and not will:
            # not acknowledged: the client sends it again to the next broker
            return Verdict(close=Goodbye.SERVER_SHUTTING_DOWN)
        what = "will" if will else "message"
        if topic.startswith(CERTIFICATES_PREFIX) and not will:
            # Before the profile's size and rate checks: a request gets an answer (payload_too_large,
            # rate_limited under issuer.rate), and is never routed to any subscriber.
            return await self.certificate_request(session, topic, data, properties)
        if session.client is not None and session.client.role is Role.CLAIM and not will:
            # A claim certificate reaches its certificate API only: anything else closes, audited.
            self._report(session, errors.ClaimOnly, f"a claim connection published to {topic[:160]!r}")
            return Verdict(close=Goodbye.NOT_AUTHORIZED)
        profile = session.client.profile if session.client is not None else None
        if profile is not None:
            size = len(data) + properties.wire_size  # MQTT 5 properties are part of the message
            if size > profile.max_message_size:
                self._report(
                    session,
                    errors.ProfileLimit,
                    f"a {size}-byte {what}, over its profile's max_message_size "
                    f"{profile.max_message_size}: {'dropped' if will else 'disconnected'}",
                )
                return Verdict(close=Goodbye.PACKET_TOO_LARGE)
            if not will and session.rate is not None and not session.rate.take():
                # 3.1.1: dropped, the connection kept; MQTT 5: DISCONNECT 0x96
                self._report(
                    session, errors.ProfileLimit, f"over its profile's message rate; {topic[:160]!r}"
                )
                return Verdict(close=Goodbye.MESSAGE_RATE_TOO_HIGH)
            qos = min(qos, profile.max_qos)  # W8: max_qos also caps what the device publishes
        if topic.startswith(JITP_ADMIN_TOPICS) and not will:
            return await self._admin_request(session, topic, data, properties)
        if topic.startswith("$") and not topic.startswith(JITP_DEVICE_TOPICS):
            if will:
                return ACCEPTED  # refused at CONNECT already; the ACL would refuse it anyway
            log.warning("[MQTT-4.7.2-1] %s published to %s: closing the connection", session.client_id, topic)
            return Verdict(close=Goodbye.TOPIC_NAME_INVALID)
        if not session.allows(Access.PUBLISH, topic):
            # W10 too: a device publishes under $ only to its own status topic.
            log.info("%s may not publish to %s; %s dropped", session.client_id, topic, what)
            if will:
                self._report(session, errors.WillNotAllowed, f"will on {topic!r} refused at publication")
            return NOT_AUTHORIZED
        forged = enforcement.forged_properties(session, properties)
        if forged is not None:  # v5: a client's message may not pass for one of the broker's own
            log.warning("%s: %s on %s; %s dropped", session.client_id, forged, topic[:160], what)
            if will:
                self._report(session, errors.WillNotAllowed, f"will on {topic!r} refused: {forged}")
            return NOT_AUTHORIZED
        served: list[str] = []
        self.route(
            topic, data, qos, properties=properties, origin=session.client_id, retain=retain, served=served
        )
        # Before the PUBACK, like the local routing; with the properties and RETAIN for the other
        # workers' v5 subscribers (the publisher is never on another worker: No Local holds there),
        # and the shared subscriptions served here, which the other workers skip.
        self.relay.publish(topic, data, qos, properties=properties, retain=retain, shares=served)
        if retain:
            self._retain(session, topic, data, qos, properties)
        return ACCEPTED

    def route(
        self,
        topic: str,
        data: bytes,
        qos: int,
        *,
        properties: MessageProperties = NO_PROPERTIES,
        origin: str | None = None,
        retain: bool = False,
        skip_shares: Collection[str] = (),
        served: list[str] | None = None,
    ) -> int:
        """Queue ``data`` for every session subscribed to ``topic`` and allowed to receive it, and for
        one member of each matching shared subscription. ``origin`` (the publishing client) and
        ``retain`` serve MQTT 5's No Local and Retain As Published. ``skip_shares``: shared
        subscriptions another worker gave this message to already; ``served`` collects those given
        it here.

        Synchronous: when it returns, every matching subscription has the message, so a PUBACK
        sent afterwards is a promise kept whatever the publisher does next."""
        routed = 0
        for client_id, sub_qos in self.subscription_tree.match(topic).items():
            if client_id[:1] == SHARED:
                if client_id in skip_shares:
                    continue
                given = self._route_shared(
                    client_id, Outgoing(topic, data, qos, False, properties=properties)
                )
                if given and served is not None:
                    served.append(client_id)
                routed += given
                continue
            entry = self._sessions.get(client_id)
            if entry is None:
                continue
            target = entry[0]
            if not isinstance(target, JitpSession) or not target.allows(Access.RECEIVE, topic):
                continue
            keep_retain = False
            if target.options:  # MQTT 5 options on some of its filters
                no_local, keep_retain = _options_for(target, topic)
                if no_local and client_id == origin:
                    continue
            message = Outgoing(
                topic, data, min(qos, sub_qos), retain=retain and keep_retain, properties=properties
            )
            routed += self._enqueue(target, message)
        return routed

    def shares_served(self, topic: str) -> list[str]:
        """The shared subscriptions matching ``topic`` with a member here that a message would go to
        now (see :meth:`_route_shared`): another worker leaves them to this one."""
        keys = []
        for key in self.subscription_tree.match(topic):
            group = self.shares.get(key) if key[:1] == SHARED else None
            if group is not None and any(
                (member := self._share_member(m, topic)) is not None
                and (member.transitions.is_connected() or not member.clean_session)
                for m in group.members
            ):
                keys.append(key)
        return keys

    def _share_member(self, client_id: str, topic: str) -> JitpSession | None:
        """A shared subscription's member's session, if it may receive ``topic``."""
        entry = self._sessions.get(client_id)
        target = entry[0] if entry is not None else None
        if isinstance(target, JitpSession) and target.allows(Access.RECEIVE, topic):
            return target
        return None

    def _route_shared(self, key: str, message: Outgoing, *, exclude: str | None = None) -> int:
        """Give ``message`` to one member of the shared subscription ``key``, in turn: the next
        connected member allowed to receive it, else an offline persistent one [MQTT-4.8.2]."""
        group = self.shares.get(key)
        if group is None:
            return 0
        members = [m for m in group.members if m != exclude]
        fallback: tuple[JitpSession, int] | None = None
        for i in range(len(members)):
            client_id = members[(group.turn + i) % len(members)]
            target = self._share_member(client_id, message.topic)
            if target is None:
                continue
            qos = min(message.qos, group.members[client_id])
            if target.transitions.is_connected():
                group.turn = (group.turn + i + 1) % max(1, len(members))
                return self._enqueue(target, dataclasses.replace(message, qos=qos, share=key))
            if fallback is None and not target.clean_session:
                fallback = (target, qos)
        if fallback is not None:
            return self._enqueue(fallback[0], dataclasses.replace(message, qos=fallback[1], share=key))
        return 0

    def _redistribute(self, session: JitpSession) -> None:
        """A member of shared subscriptions left: what they gave it and it did not acknowledge goes
        to another member [MQTT-4.8.2-5]; with no other member, it stays (persistent) or is lost."""
        taken = session.delivery.take_shared()
        for message in taken:
            assert message.share is not None
            message.packet_id, message.dup = None, False
            if (
                not self._route_shared(message.share, message, exclude=session.client_id)
                and not session.clean_session
            ):
                session.delivery.offer(message)

    def _enqueue(self, target: JitpSession, message: Outgoing) -> bool:
        connected = target.transitions.is_connected()
        if not connected and (target.clean_session or message.qos == 0):
            return False  # offline: only persistent sessions keep QoS 1 messages [MQTT-3.1.2-5]
        offer = target.delivery.offer(message)
        if offer is Offer.QUEUED:
            return True
        if offer is Offer.OVERFLOW and connected:
            if not target.closing:  # once, however many messages overflow
                target.closing = True
                self._report(
                    target, errors.QueueFull, "QoS 1 queue full: the client does not keep up; disconnected"
                )
                self.spawn(self._close_overflowing(target), "jitp-queue-full")
        else:
            self._report(target, errors.QueueFull, f"{len(target.delivery)} messages queued: dropped")
        return False

    def _retain(
        self, session: JitpSession, topic: str, data: bytes, qos: int, properties: MessageProperties
    ) -> None:
        verdict = self.retained.put(topic, data, qos, owner=session.client_id, properties=properties)
        if verdict in (RetainVerdict.STORED, RetainVerdict.CLEARED):
            self.relay.retain(topic, data, qos, session.client_id, properties=properties)
            return
        count, nbytes = self.retained.owner_usage(session.client_id or "")
        self._report(
            session,
            errors.RetainedQuota,
            f"retained message on {topic!r} refused ({verdict.value}): the client retains "
            f"{count} message(s), {nbytes} bytes; the broker {self.retained.total_bytes} bytes",
        )

    def _report(self, session: JitpSession, kind: type[errors.Refused], message: str) -> None:
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
        state = session.client
        device_id = state.device_id if state is not None else None
        refusal = kind(
            message,
            device_id=device_id,
            fingerprint=state.fingerprint if state is not None else None,
            detail=None if device_id is not None else client_id[:80],
        )
        self.spawn(
            self.service.record_refusal(refusal, peer=session.peer_address, client_id=client_id),
            "jitp-audit-limit",
        )

    async def _close_overflowing(self, session: JitpSession) -> None:
        found = self._sessions.get(session.client_id or "")
        if found is not None and found[0] is session and session.transitions.is_connected():
            log.warning("closing the connection of %s: queue_full", session.client_id)
            await self.close_connection(session, found[1], Goodbye.QUOTA_EXCEEDED)

    async def protocol_violation(
        self,
        session: JitpSession,
        handler: BrokerProtocolHandler,
        what: str,
        goodbye: Goodbye = Goodbye.PROTOCOL_ERROR,
    ) -> None:
        """A packet the specification says closes the connection: audited, then closed."""
        self._report(session, errors.ProtocolViolation, what)
        await self.close_connection(session, handler, goodbye)

    async def close_connection(
        self, session: JitpSession, handler: BrokerProtocolHandler, goodbye: Goodbye = Goodbye.PROTOCOL_ERROR
    ) -> None:
        _end(handler, goodbye)

    async def _admin_request(
        self, session: JitpSession, topic: str, data: bytes, properties: MessageProperties
    ) -> Verdict:
        """W10: a request to the admin API ($jitp/admin/<command>) goes to the API, never to
        other subscribers; the topic ACL decides who may send one at all. An MQTT 5 caller may
        name its reply topic as Response Topic (within its own reply space) with Correlation Data."""
        if session.client is None or not session.allows(Access.PUBLISH, topic):
            log.info("%s may not use the admin API (%s)", session.client_id, topic)
            return NOT_AUTHORIZED
        self.spawn(
            self.admin(
                session.client.admission,
                topic,
                data,
                response_topic=properties.response_topic,
                correlation_data=properties.correlation_data,
            ),
            "jitp-admin",
        )
        return ACCEPTED

    async def certificate_request(
        self,
        session: JitpSession,
        topic: str,
        data: bytes,
        properties: MessageProperties = NO_PROPERTIES,
        *,
        size: int | None = None,
    ) -> Verdict:
        """Answered in the reader, before the request's PUBACK: a device that floods requests is
        slowed by its own answers (no task per request, nothing that grows while it sends).
        ``size``: a request over limits.max_packet_size whose body the handler read past (oversize.py).
        An MQTT 5 device may name the answer's topic (Response Topic, within its own
        ``$jitp/certificates/<id>/``) and gets its Correlation Data back."""
        handler, client = self.certificates, session.client
        if handler is None or client is None or client.role not in (Role.DEVICE, Role.CLAIM):
            log.info("%s published to %s: dropped (devices only)", session.client_id, topic[:160])
            return NOT_AUTHORIZED
        allowed = session.allows(Access.PUBLISH, topic)
        try:
            answer = await handler.handle(
                client.admission, topic, data, allowed=allowed, peer=session.peer_address, size=size
            )
        except Exception:
            log.exception("certificate request of %s failed", client.admission.client_id)
            return ACCEPTED
        reply_topic, reply = answer.topic, NO_PROPERTIES
        own = f"{CERTIFICATES_PREFIX}{client.admission.client_id}/"
        wanted = properties.response_topic
        if (
            allowed
            and wanted
            and wanted.startswith(own)
            and "+" not in wanted
            and "#" not in wanted
            and session.allows(Access.RECEIVE, wanted)
        ):
            reply_topic = wanted
        if properties.correlation_data is not None or session.protocol == MQTT_5:
            reply = MessageProperties(
                payload_format_indicator=1,
                content_type="application/json",
                correlation_data=properties.correlation_data,
            )
        self.route(reply_topic, answer.payload, 1, properties=reply)
        return ACCEPTED

    # amqtt's own publishing entry points (internal broadcasts)
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
        if isinstance(source_session, JitpSession):
            self._retain(source_session, topic_name, bytes(data or b""), qos or 0, NO_PROPERTIES)
        else:
            self.retain_own(topic_name, bytes(data or b""), qos or 0)

    def retain_own(self, topic: str, data: bytes, qos: int) -> None:
        """Retain a message of the broker's own (a device's configuration): never refused."""
        self.retained.put(topic, data, qos, owner=None)
        self.relay.retain(topic, data, qos, None, properties=NO_PROPERTIES)

    def replicate_retained(
        self,
        topic: str,
        data: bytes,
        qos: int,
        owner: str | None,
        *,
        properties: MessageProperties = NO_PROPERTIES,
    ) -> None:
        """A retained message stored (or cleared) on another worker: the same here, without quota
        checks (the origin applied them) and without relaying it again."""
        self.retained.replicate(topic, data, qos, owner=owner, properties=properties)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """W13: queued messages live in the session's delivery queue and go out as they were
        published, with RETAIN=0 [MQTT-3.3.1-9]; amqtt's replay (with RETAIN=1) is not used."""

    # -- W12 subscriptions, W8 profile, limits ----------------------------------------------------
    async def add_subscription(
        self,
        subscription: tuple[str, int],
        session: Session,
        options: SubscriptionOptions = DEFAULT_OPTIONS,
    ) -> int:
        """Add one subscription; the granted QoS, or an MQTT 5 SUBACK failure code (3.1.1 sends 0x80
        for any). ``$share/<name>/<filter>`` joins a shared subscription; the ACL judges the inner
        filter [MQTT-4.8.2]."""
        topic_filter, qos = subscription
        if not isinstance(session, JitpSession):
            return SUBACK_FAILURE
        try:
            shared = shared_filter(topic_filter)
        except ValueError:
            return SUBACK_FILTER_INVALID
        inner = shared[1] if shared is not None else topic_filter
        if not valid_filter(inner):
            return SUBACK_FILTER_INVALID
        if not session.allows(Access.SUBSCRIBE, inner):
            return SUBACK_NOT_AUTHORIZED
        qos = min(qos, MAX_QOS)
        profile = session.client.profile if session.client is not None else None
        if profile is not None:
            qos = min(qos, profile.max_qos)
        if topic_filter not in session.filters and len(session.filters) >= self.limits.max_subscriptions:
            self._report(
                session,
                errors.SubscriptionLimit,
                f"subscription to {topic_filter!r} refused: {len(session.filters)} filters (limits.max_subscriptions)",
            )
            return SUBACK_QUOTA_EXCEEDED
        client_id = session.client_id or ""
        session.filters[topic_filter] = qos
        if options == DEFAULT_OPTIONS:
            session.options.pop(topic_filter, None)
        else:
            session.options[topic_filter] = options
        if shared is not None:
            key = SHARED + topic_filter
            group = self.shares.get(key)
            if group is None:
                group = self.shares[key] = SharedGroup()
                self.subscription_tree.subscribe(inner, key, MAX_QOS)
            group.members[client_id] = qos
        else:
            self.subscription_tree.subscribe(topic_filter, client_id, qos)
        return qos

    async def subscribe(
        self,
        session: JitpSession,
        handler: JitpProtocolHandler,
        packet_id: int,
        topics: list[tuple[str, int]],
        options: list[SubscriptionOptions] | None = None,
    ) -> None:
        """W18: in the reader, in order: subscriptions added, SUBACK, then matching retained messages
        (as MQTT 5's Retain Handling asks; never for a shared subscription [MQTT-3.8.4-4])."""
        opts = options or [DEFAULT_OPTIONS] * len(topics)
        codes, new = [], []
        for sub, option in zip(topics, opts, strict=True):
            new.append(sub[0] not in session.filters)
            codes.append(await self.add_subscription(sub, session, option))
        await handler.suback(packet_id, codes)
        for (topic_filter, _), code, option, fresh in zip(topics, codes, opts, new, strict=True):
            if code >= SUBACK_FAILURE or topic_filter.startswith("$share/"):
                continue
            if option.retain_handling == 0 or (option.retain_handling == 1 and fresh):
                await self._publish_retained_messages_for_subscription((topic_filter, code), session)

    async def unsubscribe(
        self, session: JitpSession, handler: JitpProtocolHandler, packet_id: int, topics: list[str]
    ) -> None:
        codes = [
            UNSUBACK_SUCCESS if self._del_subscription(t, session) else UNSUBACK_NO_SUBSCRIPTION
            for t in topics
        ]
        await handler.unsuback(packet_id, codes)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        client_id = session.client_id or ""
        if isinstance(session, JitpSession):
            if session.filters.pop(a_filter, None) is None:
                return 0
            session.options.pop(a_filter, None)
        if a_filter.startswith("$share/"):
            key = SHARED + a_filter
            group = self.shares.get(key)
            if group is None or group.members.pop(client_id, None) is None:
                return 0
            if not group.members:
                del self.shares[key]
                self.subscription_tree.unsubscribe(a_filter.split("/", 2)[2], key)
            return 1
        return int(self.subscription_tree.unsubscribe(a_filter, client_id))

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
            _cancel_timers(session)
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

    # -- W4: retained messages obey the topic ACL ----------------------------------------------
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if not isinstance(session, JitpSession):
            return
        topic_filter, qos = subscription
        if topic_filter.startswith("$share/"):
            return  # never for a shared subscription [MQTT-3.8.4-4]
        now = time.monotonic()
        for retained in self.retained.match(topic_filter):
            expires_at = retained.properties.expires_at
            if expires_at is not None and now >= expires_at:
                continue  # past its Message Expiry Interval [MQTT-3.3.2-5]
            if session.allows(Access.RECEIVE, retained.topic):
                self._enqueue(
                    session,
                    Outgoing(
                        retained.topic,
                        retained.data,
                        min(qos, retained.qos),
                        retain=True,
                        properties=retained.properties,
                    ),
                )

    # -- operator actions on live sessions -----------------------------------------------------
    def live_session(self, client_id: str) -> tuple[Session, BrokerProtocolHandler] | None:
        found = self._sessions.get(client_id)
        if found is None or not found[0].transitions.is_connected():
            return None
        return found

    async def disconnect_client(self, client_id: str, *, reason: str) -> bool:
        """Close a client's connection now, for an operator decision (no will). True if connected."""
        found = self.live_session(client_id)
        if found is None:
            offline = self._sessions.get(client_id, (None, None))[0]
            if isinstance(offline, JitpSession) and offline.will_timer is not None:
                # A will held back by Will Delay is not published after an operator decision either.
                offline.will_timer.cancel()
                offline.will_timer = None
                log.info("the pending will of %s is dropped: %s", client_id, reason)
            return False
        session, handler = found
        if isinstance(session, JitpSession):
            session.closed_by_operator = reason
        log.warning("closing the session of %s: %s", client_id, reason)
        _end(handler, Goodbye.ADMINISTRATIVE_ACTION)
        return True

    def say_goodbye(self) -> None:
        """Shutdown: every MQTT 5 client is told (DISCONNECT 0x8B Server shutting down)."""
        for _, handler in list(self._sessions.values()):
            if isinstance(handler, Mqtt5Handler):
                handler.goodbye(Goodbye.SERVER_SHUTTING_DOWN)

    def taken_over_elsewhere(self, client_id: str, at: float) -> None:
        """The client connected again on another worker (at ``at``, ``time.monotonic()``): close its
        older connection here, as a takeover on one worker would, and audit it the same way."""
        found = self.live_session(client_id)
        if found is None:
            return
        session, handler = found
        if not isinstance(session, JitpSession) or session.connected_at >= at:
            return
        log.warning(
            "session takeover for %s: it connected again on another worker; closing its connection from %s "
            "here (possible cloned certificate)",
            client_id,
            session.peer_address,
        )
        self.spawn(self.close_connection(session, handler, Goodbye.SESSION_TAKEN_OVER), "jitp-takeover")
        self.spawn(
            self.service.record_event(
                "session-takeover",
                device_id=client_id,
                reason="duplicate_client_id",
                details={"previous_peer": session.peer_address, "new_connection": "another worker"},
            ),
            "jitp-takeover-audit",
        )

    def update_device(self, record: DeviceRecord) -> bool:
        """Apply a device's new record (quarantine, enable, new configuration) to its live session."""
        found = self.live_session(record.device_id)
        if found is None or not isinstance(found[0], JitpSession) or found[0].client is None:
            return False
        found[0].admit(found[0].client.with_record(record))
        return True

    def clear_retained(self, *, owner: str | None = None, prefix: str | None = None) -> int:
        """Clear the retained messages ``owner`` retained, and those under topic ``prefix``."""
        doomed = set(self.retained.owned_by(owner)) if owner is not None else set()
        if prefix is not None:
            doomed.update(t for t in self.retained.messages if t.startswith(prefix))
        for topic in doomed:
            self.retained.remove(topic)
            self.relay.retain(topic, b"", 0, None, properties=NO_PROPERTIES)
        return len(doomed)

    def live_clients(self) -> list[tuple[str, ClientState]]:
        """(client id, state) of every connected, admitted client."""
        return [
            (client_id, session.client)
            for client_id, (session, _) in list(self._sessions.items())
            if isinstance(session, JitpSession)
            and session.client is not None
            and session.transitions.is_connected()
        ]


async def _close(connection: TlsConnection) -> None:
    """Close after what was written (a CONNACK) is sent; the transport aborts a client that does not read."""
    with contextlib.suppress(Exception):
        await connection.close()


def _end(handler: BrokerProtocolHandler, goodbye: Goodbye) -> None:
    """Close a connection now (an MQTT 5 client is told why); its own task notices (end of
    stream) and ends the session."""
    if isinstance(handler, JitpProtocolHandler):
        handler.goodbye(goodbye)
    elif isinstance(handler.writer, TlsConnection):
        handler.writer.abort()


def _cancel_timers(session: JitpSession) -> None:
    for name in ("expiry_timer", "will_timer"):
        timer = getattr(session, name)
        if timer is not None:
            timer.cancel()
            setattr(session, name, None)


def _options_for(session: JitpSession, topic: str) -> tuple[bool, bool]:
    """(No Local, Retain As Published) for a message on ``topic`` to ``session``: No Local only if
    every matching filter has it; Retain As Published if any has it (MQTT 5 sends one copy)."""
    no_local, as_published = True, False
    for topic_filter in session.filters:
        if topic_filter.startswith("$share/") or not topic_matches(topic, topic_filter):
            continue
        option = session.options.get(topic_filter, DEFAULT_OPTIONS)
        no_local = no_local and option.no_local
        as_published = as_published or option.retain_as_published
    return no_local, as_published


@dataclasses.dataclass
class SharedGroup:
    """The members of one shared subscription (client id -> granted QoS), served in turn."""

    members: dict[str, int] = dataclasses.field(default_factory=dict)
    turn: int = 0


def _session_of(request: ConnectRequest, connection: TlsConnection) -> JitpSession:
    """A fresh session for a parsed CONNECT (what amqtt's ``init_from_connect`` filled in)."""
    session = JitpSession()
    session.client_id = request.client_id
    session.clean_session = not request.persistent
    session.clean_start = request.clean_session
    session.protocol = request.protocol
    session.keep_alive = request.keep_alive
    will = request.will
    session.will_flag = will is not None
    if will is not None:
        session.will_topic, session.will_message = will.topic, will.message
        session.will_qos, session.will_retain = will.qos, will.retain
        session.will_properties, session.will_delay = will.properties, will.delay
    session.username = request.username
    session.password = request.password.decode("utf-8", "replace") if request.password is not None else None
    if connection.peer is not None:
        session.remote_address, session.remote_port = connection.peer
    session.ssl_object = connection.get_ssl_info()
    return session
