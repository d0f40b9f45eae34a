"""A lean MQTT 3.1.1 and 5.0 client on asyncio streams + ssl: just what a simulated device needs.

CONNECT/CONNACK, PINGREQ/PINGRESP, PUBLISH QoS 0/1 (both directions), SUBSCRIBE/SUBACK,
UNSUBSCRIBE/UNSUBACK and DISCONNECT. One reader task per connection dispatches incoming packets; no reconnect logic
(scenarios own retries, see :mod:`device_sim.backoff`).

``protocol=4`` (the default) speaks MQTT 3.1.1 with the hand-written codec below; ``protocol=5``
speaks MQTT 5.0 through the ``mqtt5`` codec (sans-I/O): this module only cuts the byte stream into
packets (:func:`read_frame`) and hands each whole packet to ``mqtt5.read``.

Failures surface as :class:`ConnectFailed` with a short, stable ``reason`` string:
``connack:<code>`` (3.1.1: the decimal return code, e.g. ``connack:5``; 5.0: the reason code in hex,
e.g. ``connack:0x87``, with the CONNACK's Reason String as ``detail``), ``disconnect:0x<code>`` (a
5.0 server's DISCONNECT, its Reason String as ``detail``), ``tls:<alert>`` (a certificate refused in
the handshake; under TLS 1.3 the client only sees it on its first read), ``timeout``, ``reset``,
``eof``, ``refused`` (TCP), ``error:protocol`` (a malformed or unexpected packet) or
``error:<Type>``. A refused 5.0 QoS 1 PUBLISH raises ``puback:0x<code>`` from :meth:`MqttClient.publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mqtt5

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

CONNACK_ACCEPTED = 0
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_NOT_AUTHORIZED = 5

PROTOCOLS = (4, 5)  # MQTT 3.1.1 and MQTT 5.0 (the protocol level in CONNECT)


def v5_reason(kind: str, code: int) -> str:
    """The ``reason`` of an MQTT 5 reason code: ``connack:0x87``, ``disconnect:0x8e``, ``puback:0x87``."""
    return f"{kind}:0x{int(code):02x}"


#: Reasons a scenario may retry with back-off (transient); every other reason is final.
#: 3.1.1 CONNACK 3 (server unavailable); 5.0 CONNACK 0x88 Server unavailable, 0x89 Server busy and
#: 0x9F Connection rate exceeded (admission shedding).
TRANSIENT_REASONS = frozenset(
    {
        f"connack:{CONNACK_SERVER_UNAVAILABLE}",
        v5_reason("connack", mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE),
        v5_reason("connack", mqtt5.ConnAckReasonCode.SERVER_BUSY),
        v5_reason("connack", mqtt5.ConnAckReasonCode.CONNECTION_RATE_EXCEEDED),
        "timeout",
        "reset",
        "eof",
        "refused",
    }
)


class ConnectFailed(Exception):
    """A connection attempt (or an established connection) failed; ``reason`` is machine readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    received_at: float  # time.perf_counter()
    # MQTT 5 PUBLISH properties (always the defaults on a 3.1.1 connection).
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    response_topic: str | None = None
    correlation_data: bytes | None = None
    payload_format_indicator: int = 0
    message_expiry_interval: int | None = None


# -- encoding -------------------------------------------------------------------------------
def encode_varint(n: int) -> bytes:
    """MQTT's variable byte integer (the remaining length)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_str(s: str) -> bytes:
    """An MQTT UTF-8 string: two length bytes, then the bytes."""
    data = s.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def frame(kind: int, flags: int, body: bytes) -> bytes:
    """A whole packet: fixed header (type, flags, remaining length) and body."""
    return bytes([(kind << 4) | flags]) + encode_varint(len(body)) + body


def connect_packet(client_id: str, *, keepalive: int, clean: bool) -> bytes:
    flags = 0x02 if clean else 0x00
    return frame(
        CONNECT,
        0,
        encode_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + encode_str(client_id),
    )


def publish_packet(
    topic: str, payload: bytes, *, qos: int, packet_id: int = 0, retain: bool = False
) -> bytes:
    body = encode_str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return frame(PUBLISH, (qos << 1) | int(retain), body)


def subscribe_packet(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(encode_str(f) + bytes([q]) for f, q in filters)
    return frame(SUBSCRIBE, 0x02, body)


def unsubscribe_packet(packet_id: int, filters: list[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(encode_str(f) for f in filters)
    return frame(UNSUBSCRIBE, 0x02, body)


PINGREQ_PACKET = bytes([PINGREQ << 4, 0])
DISCONNECT_PACKET = bytes([DISCONNECT << 4, 0])


def puback_packet(packet_id: int) -> bytes:
    return frame(PUBACK, 0, struct.pack("!H", packet_id))


async def _read_header(reader: asyncio.StreamReader) -> tuple[bytearray, int]:
    """The fixed header (first byte and remaining length, as received) and the remaining length."""
    header = bytearray(await reader.readexactly(1))
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        header.append(byte)
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return header, length
    raise ConnectFailed("error:protocol", "malformed remaining length")


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(type, flags, body) of the next packet; raises IncompleteReadError at EOF."""
    header, length = await _read_header(reader)
    body = await reader.readexactly(length) if length else b""
    return header[0] >> 4, header[0] & 0x0F, body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next whole packet, fixed header included (what ``mqtt5.read`` takes); IncompleteReadError at EOF."""
    header, length = await _read_header(reader)
    if length:
        header += await reader.readexactly(length)
    return bytes(header)


def decode_v5(data: bytes) -> mqtt5.Packet:
    """One whole MQTT 5 packet (a :func:`read_frame`); ConnectFailed ``error:protocol`` if malformed."""
    try:
        packet, used = mqtt5.read(memoryview(data))
    except (ValueError, IndexError) as exc:
        raise ConnectFailed("error:protocol", f"malformed MQTT 5 packet: {exc}") from None
    if used != len(data):
        raise ConnectFailed("error:protocol", f"MQTT 5 packet of {used} bytes in a frame of {len(data)}")
    return packet


def connect_packet_v5(
    client_id: str,
    *,
    keepalive: int,
    clean: bool,
    session_expiry: int | None = None,
    receive_max: int = 65535,
    max_packet_size: int | None = None,
    user_properties: tuple[tuple[str, str], ...] = (),
    authentication_method: str | None = None,
) -> bytes:
    """An MQTT 5 CONNECT. ``session_expiry`` None: 0 with ``clean``, else 0xFFFFFFFF (never expires,
    as a 3.1.1 persistent session); the server may cap it. Topic Alias Maximum 0: no aliases to us.
    ``authentication_method`` only probes a server's answer (0x8C): the client has no AUTH exchange."""
    if session_expiry is None:
        session_expiry = 0 if clean else 0xFFFFFFFF
    return mqtt5.ConnectPacket(
        client_id,
        clean_start=clean,
        keep_alive=keepalive,
        session_expiry_interval=session_expiry,
        receive_max=receive_max,
        max_packet_size=max_packet_size,
        user_properties=list(user_properties),
        authentication_method=authentication_method,
    ).write()


@dataclass(frozen=True)
class PublishProperties:
    """MQTT 5 PUBLISH properties a device or service sets (the broker passes them through)."""

    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    response_topic: str | None = None
    correlation_data: bytes | None = None
    payload_format_indicator: int = 0  # 1: the payload is UTF-8
    message_expiry_interval: int | None = None


NO_PROPERTIES = PublishProperties()


def publish_packet_v5(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    packet_id: int = 0,
    retain: bool = False,
    properties: PublishProperties = NO_PROPERTIES,
) -> bytes:
    return mqtt5.PublishPacket(
        topic,
        payload,
        qos=mqtt5.QoS(qos),
        retain=retain,
        packet_id=packet_id if qos else None,
        content_type=properties.content_type,
        user_properties=list(properties.user_properties),
        response_topic=properties.response_topic,
        correlation_data=properties.correlation_data,
        payload_format_indicator=properties.payload_format_indicator,
        message_expiry_interval=properties.message_expiry_interval,
    ).write()


def subscribe_packet_v5(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    """Subscription options as 3.1.1 behaves: Retain As Published off, No Local off, retained sent."""
    return mqtt5.SubscribePacket(
        packet_id,
        [mqtt5.TopicFilter(f, max_qos=mqtt5.QoS(q), retain_as_published=False) for f, q in filters],
    ).write()


def message_from_publish(packet: mqtt5.PublishPacket, received_at: float) -> Message:
    return Message(
        packet.topic,
        packet.payload,
        int(packet.qos),
        packet.retain,
        packet.duplicate,
        received_at,
        content_type=packet.content_type,
        user_properties=tuple(packet.user_properties),
        response_topic=packet.response_topic,
        correlation_data=packet.correlation_data,
        payload_format_indicator=packet.payload_format_indicator,
        message_expiry_interval=packet.message_expiry_interval,
    )


def decode_publish(flags: int, body: bytes) -> tuple[str, int, int, bytes]:
    """(topic, qos, packet_id, payload) of a PUBLISH body."""
    (tlen,) = struct.unpack_from("!H", body, 0)
    topic = body[2 : 2 + tlen].decode("utf-8", "replace")
    pos = 2 + tlen
    qos = (flags >> 1) & 0x03
    packet_id = 0
    if qos:
        (packet_id,) = struct.unpack_from("!H", body, pos)
        pos += 2
    return topic, qos, packet_id, body[pos:]


# -- errors ---------------------------------------------------------------------------------
def classify(exc: BaseException) -> ConnectFailed:
    """Map a transport exception to a :class:`ConnectFailed` reason."""
    if isinstance(exc, ConnectFailed):
        return exc
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return ConnectFailed("timeout")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectFailed("tls:server_verify", exc.verify_message or str(exc))
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").lower()
        for prefix in ("sslv3_alert_", "tlsv13_alert_", "tlsv1_alert_"):
            if reason.startswith(prefix):
                return ConnectFailed(f"tls:{reason.removeprefix(prefix)}", str(exc))
        if reason == "application_data_after_close_notify":
            return ConnectFailed("eof", str(exc))
        return ConnectFailed(f"tls:{reason or 'error'}", str(exc))
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return ConnectFailed("eof")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectFailed("refused", str(exc))
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return ConnectFailed("reset", str(exc))
    if isinstance(exc, OSError):
        return ConnectFailed(f"error:{type(exc).__name__}", str(exc))
    return ConnectFailed(f"error:{type(exc).__name__}", str(exc))


# -- the client -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ConnectTiming:
    started: float  # perf_counter() before the TCP connect
    tls_done: float  # handshake complete (client side)
    connack: float  # CONNACK received


class MqttClient:
    """One MQTT connection. Create with :meth:`connect`; close with :meth:`disconnect` or :meth:`abort`.

    ``protocol`` is 4 (MQTT 3.1.1) or 5 (MQTT 5.0). On 5.0, :attr:`connack` is the server's CONNACK
    (its Receive Maximum bounds the QoS 1 publishes in flight, its Maximum Packet Size what is sent)
    and :attr:`client_id` is the Assigned Client Identifier when the server gave one.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_id: str,
        timing: ConnectTiming,
        on_message: Callable[[MqttClient, Message], None] | None,
        *,
        protocol: int = 4,
        connack: mqtt5.ConnAckPacket | None = None,
        keepalive: int = 60,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self.connack = connack
        self.client_id = (connack.assigned_client_id if connack else None) or client_id
        #: The keep-alive in force: the requested one, or a 5.0 server's Server Keep Alive.
        server_keepalive = connack.server_keep_alive if connack is not None else None
        self.keepalive = keepalive if server_keepalive is None else server_keepalive
        self.timing = timing
        self.on_message = on_message
        self._next_id = 0
        self._acks: dict[int, asyncio.Future[tuple[list[int], str]]] = {}
        self._pings: list[asyncio.Future[None]] = []
        # MQTT 5 flow control: no more QoS 1 publishes in flight than the server's Receive Maximum.
        self._quota = asyncio.Semaphore(connack.receive_max) if connack is not None else None
        self._max_packet = connack.max_packet_size if connack is not None else None
        self.closed: asyncio.Future[ConnectFailed | None] = asyncio.get_running_loop().create_future()
        read_loop = self._read_loop_v5 if protocol == 5 else self._read_loop
        self._reader_task = asyncio.create_task(read_loop(), name=f"mqtt-read-{client_id}")

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        client_id: str,
        server_hostname: str | None = None,
        keepalive: int = 60,
        clean: bool = True,
        time_limit: float = 30.0,
        source_address: str | None = None,
        on_message: Callable[[MqttClient, Message], None] | None = None,
        protocol: int = 4,
        session_expiry: int | None = None,
        receive_max: int = 65535,
        max_packet_size: int | None = None,
        user_properties: tuple[tuple[str, str], ...] = (),
        authentication_method: str | None = None,
    ) -> MqttClient:
        """TCP connect, TLS handshake, CONNECT, CONNACK; raises :class:`ConnectFailed`.

        ``session_expiry``, ``receive_max``, ``max_packet_size``, ``user_properties`` and
        ``authentication_method`` are MQTT 5 CONNECT properties (see :func:`connect_packet_v5`); with
        ``protocol=4`` they must stay unset.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be 4 (MQTT 3.1.1) or 5 (MQTT 5.0), not {protocol!r}")
        if protocol == 4 and (
            session_expiry is not None
            or receive_max != 65535
            or max_packet_size
            or user_properties
            or authentication_method is not None
        ):
            raise ValueError("MQTT 5 CONNECT properties need protocol=5")
        started = time.perf_counter()
        writer: asyncio.StreamWriter | None = None
        connack: mqtt5.ConnAckPacket | None = None
        try:
            async with asyncio.timeout(time_limit):
                sock = await _tcp_connect(host, port, source_address)
                try:
                    reader, writer = await asyncio.open_connection(
                        sock=sock,
                        ssl=ssl_context,
                        limit=2**16,
                        server_hostname=(server_hostname or host) if ssl_context else None,
                        ssl_handshake_timeout=time_limit if ssl_context else None,
                    )
                except BaseException:
                    sock.close()
                    raise
                tls_done = time.perf_counter()
                if protocol == 5:
                    writer.write(
                        connect_packet_v5(
                            client_id,
                            keepalive=keepalive,
                            clean=clean,
                            session_expiry=session_expiry,
                            receive_max=receive_max,
                            max_packet_size=max_packet_size,
                            user_properties=user_properties,
                            authentication_method=authentication_method,
                        )
                    )
                    connack = await _read_connack_v5(reader)
                else:
                    writer.write(connect_packet(client_id, keepalive=keepalive, clean=clean))
                    kind, _flags, body = await read_packet(reader)
                    if kind != CONNACK or len(body) != 2:
                        raise ConnectFailed("error:protocol", f"expected CONNACK, got packet type {kind}")
                    if body[1] != CONNACK_ACCEPTED:
                        raise ConnectFailed(f"connack:{body[1]}")
                timing = ConnectTiming(started, tls_done, time.perf_counter())
        except BaseException as exc:
            if writer is not None:
                writer.transport.abort()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, Exception):
                raise classify(exc) from None
            raise
        return cls(
            reader,
            writer,
            client_id,
            timing,
            on_message,
            protocol=protocol,
            connack=connack,
            keepalive=keepalive,
        )

    # -- operations ----------------------------------------------------------------------
    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _check_open(self) -> None:
        if self.closed.done():
            raise self.closed.result() or ConnectFailed("closed")

    def _send(self, data: bytes) -> None:
        if self._max_packet is not None and len(data) > self._max_packet:
            raise ConnectFailed(
                "error:packet_too_large",
                f"{len(data)} bytes; the server's Maximum Packet Size is {self._max_packet}",
            )
        self.writer.write(data)

    async def _await(self, fut: asyncio.Future[Any], time_limit: float) -> None:
        waiters: set[asyncio.Future[Any]] = {fut, self.closed}
        done, _ = await asyncio.wait(waiters, timeout=time_limit, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            fut.result()
            return
        fut.cancel()
        if self.closed.done():
            raise self.closed.result() or ConnectFailed("closed")
        raise ConnectFailed("timeout")

    async def _request(self, packet_id: int, data: bytes, time_limit: float) -> tuple[list[int], str]:
        """Send a packet that the server acknowledges under ``packet_id``; (reason codes, reason string)."""
        fut: asyncio.Future[tuple[list[int], str]] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = fut
        try:
            self._send(data)
            await self._await(fut, time_limit)
        finally:
            self._acks.pop(packet_id, None)
        return fut.result()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        time_limit: float = 30.0,
        retain: bool = False,
        properties: PublishProperties = NO_PROPERTIES,
    ) -> None:
        """Publish; with qos=1 wait for the PUBACK (MQTT 5: a refusing one raises ``puback:0x<code>``).

        ``properties`` need an MQTT 5 connection (ValueError on 3.1.1).
        """
        self._check_open()
        if self.protocol == 4:
            if properties != NO_PROPERTIES:
                raise ValueError("PUBLISH properties need an MQTT 5 connection")
            if qos == 0:
                self._send(publish_packet(topic, payload, qos=0, retain=retain))
                return
            packet_id = self._packet_id()
            await self._request(
                packet_id,
                publish_packet(topic, payload, qos=1, packet_id=packet_id, retain=retain),
                time_limit,
            )
            return

        def encode(packet_id: int) -> bytes:
            return publish_packet_v5(
                topic, payload, qos=qos, packet_id=packet_id, retain=retain, properties=properties
            )

        if qos == 0:
            self._send(encode(0))
            return
        assert self._quota is not None
        async with self._quota:
            self._check_open()
            packet_id = self._packet_id()
            codes, text = await self._request(packet_id, encode(packet_id), time_limit)
        if codes and codes[0] >= 0x80:
            raise ConnectFailed(v5_reason("puback", codes[0]), text)

    async def subscribe(self, filters: list[tuple[str, int]], *, time_limit: float = 30.0) -> list[int]:
        """Subscribe; returns the SUBACK return (5.0: reason) codes, 0x80 and above refused."""
        self._check_open()
        packet_id = self._packet_id()
        encode = subscribe_packet_v5 if self.protocol == 5 else subscribe_packet
        codes, _text = await self._request(packet_id, encode(packet_id, filters), time_limit)
        return codes

    async def unsubscribe(self, filters: list[str], *, time_limit: float = 30.0) -> None:
        """Unsubscribe; returns once the UNSUBACK arrived."""
        self._check_open()
        packet_id = self._packet_id()
        data = (
            mqtt5.UnsubscribePacket(packet_id, filters).write()
            if self.protocol == 5
            else unsubscribe_packet(packet_id, filters)
        )
        await self._request(packet_id, data, time_limit)

    async def ping(self, *, time_limit: float = 30.0) -> float:
        """PINGREQ; returns the round trip time in seconds."""
        self._check_open()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings.append(fut)
        t0 = time.perf_counter()
        self.writer.write(PINGREQ_PACKET)  # the same two bytes in 3.1.1 and 5.0
        await self._await(fut, time_limit)
        return time.perf_counter() - t0

    async def disconnect(self) -> None:
        """Send DISCONNECT (5.0: reason 0, normal) and close the connection (never raises)."""
        if not self.closed.done():
            with contextlib.suppress(Exception):
                self.writer.write(DISCONNECT_PACKET)  # 5.0 reads a bare DISCONNECT as reason 0
        await self._shutdown(None)

    async def abort(self) -> None:
        self.writer.transport.abort()
        await self._shutdown(None)

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    # -- internals -------------------------------------------------------------------------
    async def _shutdown(self, failure: ConnectFailed | None) -> None:
        if not self.closed.done():
            self.closed.set_result(failure)
        self._reader_task.cancel()
        with contextlib.suppress(BaseException):
            await self._reader_task
        with contextlib.suppress(Exception):
            self.writer.close()
        # Don't wait for a TLS close_notify exchange with a possibly overloaded broker.
        self.writer.transport.abort()

    def _acked(self, packet_id: int, codes: list[int], text: str) -> None:
        fut = self._acks.get(packet_id)
        if fut is not None and not fut.done():
            fut.set_result((codes, text))

    def _pong(self) -> None:
        while self._pings:
            ping = self._pings.pop(0)
            if not ping.done():
                ping.set_result(None)
                break

    def _failed(self, exc: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_result(classify(exc))
        self.writer.transport.abort()

    async def _read_loop(self) -> None:
        try:
            while True:
                kind, flags, body = await read_packet(self.reader)
                if kind == PUBLISH:
                    topic, qos, packet_id, payload = decode_publish(flags, body)
                    if qos == 1:
                        self.writer.write(puback_packet(packet_id))
                    if self.on_message is not None:
                        self.on_message(
                            self,
                            Message(
                                topic, payload, qos, bool(flags & 1), bool(flags & 8), time.perf_counter()
                            ),
                        )
                elif kind in (PUBACK, SUBACK, UNSUBACK) and len(body) >= 2:
                    (packet_id,) = struct.unpack_from("!H", body, 0)
                    self._acked(packet_id, list(body[2:]), "")
                elif kind == PINGRESP:
                    self._pong()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._failed(exc)

    async def _read_loop_v5(self) -> None:
        try:
            while True:
                packet = decode_v5(await read_frame(self.reader))
                if isinstance(packet, mqtt5.PublishPacket):
                    if packet.topic_alias is not None:
                        raise ConnectFailed(
                            "error:protocol", "a Topic Alias, over our Topic Alias Maximum of 0"
                        )
                    if packet.qos == mqtt5.QoS.EXACTLY_ONCE:
                        raise ConnectFailed("error:protocol", "a QoS 2 PUBLISH on a QoS 1 subscription")
                    if packet.qos == mqtt5.QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                        self.writer.write(puback_packet(packet.packet_id))  # the same bytes in 5.0
                    if self.on_message is not None:
                        self.on_message(self, message_from_publish(packet, time.perf_counter()))
                elif isinstance(packet, mqtt5.PubAckPacket):
                    self._acked(packet.packet_id, [int(packet.reason_code)], packet.reason_str or "")
                elif isinstance(packet, mqtt5.SubAckPacket | mqtt5.UnsubAckPacket):
                    codes = [int(c) for c in packet.reason_codes]
                    self._acked(packet.packet_id, codes, packet.reason_str or "")
                elif isinstance(packet, mqtt5.PingRespPacket):
                    self._pong()
                elif isinstance(packet, mqtt5.DisconnectPacket):
                    raise ConnectFailed(v5_reason("disconnect", packet.reason_code), packet.reason_str or "")
                else:
                    raise ConnectFailed(
                        "error:protocol", f"unexpected {type(packet).__name__} from the server"
                    )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._failed(exc)


async def _read_connack_v5(reader: asyncio.StreamReader) -> mqtt5.ConnAckPacket:
    """The CONNACK of an MQTT 5 CONNECT; a refusal raises ``connack:0x<code>`` with its Reason String.

    A server that does not speak 5.0 answers with a 3.1.1 CONNACK (two bytes, no properties): its
    return code (1: unacceptable protocol version) surfaces as the 3.1.1 ``connack:<code>``.
    """
    data = await read_frame(reader)
    if data[0] >> 4 == CONNACK and data[1:2] == b"\x02":
        if data[3] != CONNACK_ACCEPTED:
            raise ConnectFailed(f"connack:{data[3]}", "a 3.1.1 CONNACK to an MQTT 5 CONNECT")
        raise ConnectFailed("error:protocol", "a 3.1.1 CONNACK accepted an MQTT 5 CONNECT")
    packet = decode_v5(data)
    if isinstance(packet, mqtt5.DisconnectPacket):
        raise ConnectFailed(v5_reason("disconnect", packet.reason_code), packet.reason_str or "")
    if not isinstance(packet, mqtt5.ConnAckPacket):
        raise ConnectFailed("error:protocol", f"expected CONNACK, got {type(packet).__name__}")
    if packet.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
        raise ConnectFailed(v5_reason("connack", packet.reason_code), packet.reason_str or "")
    return packet


async def _tcp_connect(host: str, port: int, source_address: str | None) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    family, _type, proto, _canon, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        # Without TCP_NODELAY, Nagle holds CONNECT behind the last handshake flight (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_address is not None:
            sock.bind((source_address, 0))
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock
