"""MQTT 5.0 on the same connection path as 3.1.1: one reader task handling packets in order, one
sender writing the session's bounded queue, the same broker entry points (ACL, profile, quotas).

Packets are cut from the stream here (fixed header, remaining length checked against the
announced Maximum Packet Size before the body is read) and decoded by the ``mqtt5`` codec. What
jitp announces in CONNACK, it enforces: Topic Alias Maximum 0, Maximum QoS 1 (0 for a device whose
profile says so), no Subscription Identifiers, Receive Maximum for inbound QoS 2 is moot (QoS 2 is
not accepted), and every close says why in a DISCONNECT with a reason code and Reason String.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import mqtt5

from broker_plugins.framing import (
    codec_error,
    message_properties,
    property_violation,
    read5,
    remaining_seconds,
)
from broker_plugins.handler import FAIR_SHARE, JitpProtocolHandler, Welcome
from broker_plugins.reasons import Goodbye
from broker_plugins.session import JitpSession
from broker_plugins.transport import PacketTooLarge, TlsConnection
from jitp.domain.routing import Outgoing, SubscriptionOptions, shared_filter

log = logging.getLogger("jitp.broker")

PINGRESP = b"\xd0\x00"
NORMAL, WITH_WILL = 0x00, 0x04
PACKET_ID_NOT_FOUND = 0x92


class Mqtt5Handler(JitpProtocolHandler):
    """The protocol handler of one MQTT 5 connection."""

    protocol = 5

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_max_packet: int | None = None  # the client's Maximum Packet Size
        self.problem_info = True  # the client's Request Problem Information
        self.max_qos = 1  # announced in CONNACK: a PUBLISH above it is a protocol error
        self.session_expiry_cap = 0  # the broker's cap on Session Expiry Interval

    # -- answers -----------------------------------------------------------------------------------
    async def accept(self, welcome: Welcome) -> None:
        self.max_qos = welcome.max_qos
        await self._send(
            mqtt5.ConnAckPacket(
                session_present=welcome.session_present,
                session_expiry_interval=welcome.session_expiry,
                server_keep_alive=welcome.server_keep_alive,
                receive_max=welcome.receive_max,
                max_qos=mqtt5.QoS(welcome.max_qos),
                retain_available=True,
                max_packet_size=welcome.max_packet_size,
                topic_alias_max=0,
                wildcard_subscription_available=True,
                subscription_id_available=False,
                shared_subscription_available=True,
            ).write()
        )

    async def suback(self, packet_id: int, codes: list[int]) -> None:
        await self._send(mqtt5.SubAckPacket(packet_id, [mqtt5.SubAckReasonCode(c) for c in codes]).write())

    async def unsuback(self, packet_id: int, codes: list[int]) -> None:
        await self._send(
            mqtt5.UnsubAckPacket(packet_id, [mqtt5.UnsubAckReasonCode(c) for c in codes]).write()
        )

    def goodbye(self, reason: Goodbye) -> None:
        """DISCONNECT with ``reason`` and its Reason String, then close (close_notify; the transport
        aborts a client that does not take it within a second)."""
        writer = self.writer
        if not isinstance(writer, TlsConnection) or writer.is_closed:
            return
        code = mqtt5.DisconnectReasonCode(int(reason))
        data = mqtt5.DisconnectPacket(reason_code=code, reason_str=reason.text).write()
        if not self._fits(data):  # the Reason String is left out rather [MQTT-3.14.2-3]
            data = mqtt5.DisconnectPacket(reason_code=code).write()
        writer.write(data)
        writer.shut()

    def _fits(self, data: bytes) -> bool:
        """Within the client's Maximum Packet Size [MQTT-3.1.2-24]."""
        return self.client_max_packet is None or len(data) <= self.client_max_packet

    def encode_publish(self, message: Outgoing) -> bytes | None:
        props = message.properties
        expiry = None
        if props.expires_at is not None:
            expiry = remaining_seconds(props.expires_at, self.clock())
        data = mqtt5.PublishPacket(
            message.topic,
            message.data,
            qos=mqtt5.QoS(message.qos),
            retain=message.retain,
            packet_id=message.packet_id if message.qos else None,
            duplicate=message.dup,
            payload_format_indicator=props.payload_format_indicator,
            message_expiry_interval=expiry,
            content_type=props.content_type,
            response_topic=props.response_topic,
            correlation_data=props.correlation_data,
            user_properties=list(props.user_properties),
        ).write()
        return data if self._fits(data) else None

    async def _send(self, data: bytes) -> None:
        async with self._write_lock:
            writer = self.writer
            assert writer is not None
            writer.write(data)
            await writer.drain()

    # -- the reader --------------------------------------------------------------------------------
    async def _read_packets(self, session: JitpSession) -> bool:
        reader = self.reader
        assert isinstance(reader, TlsConnection)
        keepalive = float(session.keep_alive) or None
        handled = 0
        try:
            while True:
                try:
                    async with asyncio.timeout(keepalive):  # the whole packet within the keep-alive
                        raw = await self._read_raw(reader)
                except TimeoutError:
                    self.handle_read_timeout()
                    return False
                except PacketTooLarge as exc:
                    await self._violation(session, str(exc), Goodbye.PACKET_TOO_LARGE)
                    return False
                except ValueError as exc:  # a remaining length over four bytes
                    await self._violation(session, f"malformed packet: {exc}", Goodbye.MALFORMED_PACKET)
                    return False
                try:
                    packet, _ = read5(raw)
                except (ValueError, IndexError, UnicodeDecodeError) as exc:
                    code, text = codec_error(exc)
                    await self._violation(session, f"malformed packet: {text}", Goodbye(code))
                    return False
                handled += 1
                if not handled % FAIR_SHARE:
                    await asyncio.sleep(0)
                try:
                    outcome = await self._handle(session, packet)
                except TimeoutError:  # an acknowledgement could not be written for a keep-alive
                    if self.broker is not None:
                        self.broker.stalled(session)
                    self.goodbye(Goodbye.QUOTA_EXCEEDED)
                    return False
                if outcome is not None:
                    return outcome
        except (asyncio.IncompleteReadError, OSError, EOFError) as exc:  # reset, TLS error, end
            log.debug("connection of %s ends: %r", session.client_id, exc)
            self.abort()
            return False

    async def _read_raw(self, reader: TlsConnection) -> bytes:
        """One whole packet (fixed header included), its size checked before its body is read."""
        head = bytearray(await reader.read(1))
        length, shift = 0, 0
        while True:
            byte = (await reader.read(1))[0]
            head.append(byte)
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if len(head) > 4:
                raise ValueError("malformed remaining length")
        if len(head) + length > self.max_packet_size:  # the whole packet [MQTT-3.2.2-15]
            raise PacketTooLarge(f"packet of {len(head) + length} bytes, over {self.max_packet_size}")
        if length:
            head += await reader.read(length)
        return bytes(head)

    async def _violation(self, session: JitpSession, what: str, goodbye: Goodbye) -> None:
        if self.broker is not None:
            await self.broker.protocol_violation(session, self, what, goodbye)
        else:
            self.goodbye(goodbye)

    async def _handle(self, session: JitpSession, packet: mqtt5.Packet) -> bool | None:
        """Handle one packet; None: go on reading, True/False: the connection ends (True: the client
        said DISCONNECT without asking for its will)."""
        broker = self.broker
        assert broker is not None
        if isinstance(packet, mqtt5.PublishPacket):
            return await self._publish(session, packet)
        if isinstance(packet, mqtt5.PubAckPacket):
            if session.delivery.acknowledge(packet.packet_id):
                broker.delivered()
            return None
        if isinstance(packet, mqtt5.PingReqPacket):
            await self._send(PINGRESP)
            return None
        if isinstance(packet, mqtt5.SubscribePacket):
            return await self._subscribe(session, packet)
        if isinstance(packet, mqtt5.UnsubscribePacket):
            await broker.unsubscribe(session, self, packet.packet_id, list(packet.patterns))
            return None
        if isinstance(packet, mqtt5.DisconnectPacket):
            return await self._disconnect(session, packet)
        if isinstance(packet, mqtt5.PubRelPacket):  # jitp takes no QoS 2: nothing to release
            await self._send(
                mqtt5.PubCompPacket(
                    packet.packet_id, reason_code=mqtt5.PubCompReasonCode(PACKET_ID_NOT_FOUND)
                ).write()
            )
            return None
        if isinstance(packet, mqtt5.PubRecPacket | mqtt5.PubCompPacket):
            return None  # jitp never sends QoS 2
        if isinstance(packet, mqtt5.AuthPacket):
            await self._violation(
                session, "AUTH packet: enhanced authentication is not supported", Goodbye.PROTOCOL_ERROR
            )
            return False
        await self._violation(
            session, f"unexpected {type(packet).__name__} [MQTT-4.8.0-1]", Goodbye.PROTOCOL_ERROR
        )
        return False

    async def _publish(self, session: JitpSession, packet: mqtt5.PublishPacket) -> bool | None:
        broker = self.broker
        assert broker is not None
        qos = int(packet.qos)
        violation = None
        if packet.topic_alias is not None:
            violation = ("PUBLISH with a Topic Alias (maximum 0) [MQTT-3.3.2-9]", Goodbye.TOPIC_ALIAS_INVALID)
        elif qos > self.max_qos:
            violation = (f"PUBLISH at QoS {qos}, over Maximum QoS {self.max_qos}", Goodbye.QOS_NOT_SUPPORTED)
        elif not packet.topic or "+" in packet.topic or "#" in packet.topic:
            violation = ("PUBLISH topic empty or with a wildcard [MQTT-3.3.2-2]", Goodbye.TOPIC_NAME_INVALID)
        elif bad := property_violation(
            response_topic=packet.response_topic,
            content_type=packet.content_type,
            user_properties=packet.user_properties,
            payload_format_indicator=packet.payload_format_indicator,
        ):
            violation = (f"PUBLISH: {bad[1]}", Goodbye(bad[0]))
        if violation is not None:
            await self._violation(session, *violation)
            return False
        interval = packet.message_expiry_interval
        properties = message_properties(
            payload_format_indicator=packet.payload_format_indicator,
            content_type=packet.content_type,
            response_topic=packet.response_topic,
            correlation_data=packet.correlation_data,
            user_properties=packet.user_properties,
            expires_at=self.clock() + interval if interval is not None else None,
        )
        verdict = await broker.receive(
            session, packet.topic, bytes(packet.payload), qos, packet.retain, properties=properties
        )
        if verdict.close is not None:
            await broker.close_connection(session, self, verdict.close)
            return False
        if qos and packet.packet_id is not None:
            code = verdict.puback
            reason = mqtt5.PubAckReasonCode(code)
            data = mqtt5.PubAckPacket(
                packet.packet_id,
                reason_code=reason,
                reason_str="not authorized for this topic" if code and self.problem_info else None,
            ).write()
            if not self._fits(data):  # the Reason String is left out rather [MQTT-3.4.2-2]
                data = mqtt5.PubAckPacket(packet.packet_id, reason_code=reason).write()
            await self._send(data)
        return None

    async def _subscribe(self, session: JitpSession, packet: mqtt5.SubscribePacket) -> bool | None:
        broker = self.broker
        assert broker is not None
        if packet.subscription_id is not None:
            await self._violation(
                session,
                "SUBSCRIBE with a Subscription Identifier (not available)",
                Goodbye.SUBSCRIPTION_IDS_NOT_SUPPORTED,
            )
            return False
        topics: list[tuple[str, int]] = []
        options: list[SubscriptionOptions] = []
        for tf in packet.topic_filters:
            try:
                shared = shared_filter(tf.pattern) is not None
            except ValueError:
                shared = True  # refused by the broker as an invalid filter
            if shared and tf.no_local:
                await self._violation(
                    session, "No Local on a shared subscription [MQTT-3.8.3-4]", Goodbye.PROTOCOL_ERROR
                )
                return False
            topics.append((tf.pattern, int(tf.max_qos)))
            options.append(
                SubscriptionOptions(
                    no_local=tf.no_local,
                    retain_as_published=tf.retain_as_published,
                    retain_handling=int(tf.retain_handling),
                )
            )
        await broker.subscribe(session, self, packet.packet_id, topics, options)
        return None

    async def _disconnect(self, session: JitpSession, packet: mqtt5.DisconnectPacket) -> bool:
        expiry = packet.session_expiry_interval
        if expiry is not None:
            if session.session_expiry == 0 and expiry != 0:
                # [MQTT-3.14.2-2]: a session that was to end with the connection cannot be extended.
                # A Protocol Error: DISCONNECT 0x82, and the will goes (not a normal disconnection).
                await self._violation(
                    session,
                    "DISCONNECT sets a Session Expiry on a session without one [MQTT-3.14.2-2]",
                    Goodbye.PROTOCOL_ERROR,
                )
                return False
            session.session_expiry = min(expiry, self.session_expiry_cap)
            session.clean_session = session.session_expiry == 0
        return int(packet.reason_code) != WITH_WILL
