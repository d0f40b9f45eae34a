"""A lean MQTT 3.1.1 client on asyncio streams + ssl: just what a simulated device needs.

CONNECT/CONNACK, PINGREQ/PINGRESP, PUBLISH QoS 0/1 (both directions), SUBSCRIBE/SUBACK,
UNSUBSCRIBE/UNSUBACK and DISCONNECT. One reader task per connection dispatches incoming packets; no reconnect logic
(scenarios own retries, see :mod:`device_sim.backoff`).

Failures surface as :class:`ConnectFailed` with a short, stable ``reason`` string:
``connack:<code>``, ``tls:<alert>`` (a certificate refused in the handshake; under TLS 1.3 the
client only sees it on its first read), ``timeout``, ``reset``, ``eof``, ``refused`` (TCP) or
``error:<Type>``.
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

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

CONNACK_ACCEPTED = 0
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_NOT_AUTHORIZED = 5

#: Reasons a scenario may retry with back-off (transient); every other reason is final.
TRANSIENT_REASONS = frozenset({f"connack:{CONNACK_SERVER_UNAVAILABLE}", "timeout", "reset", "eof", "refused"})


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
        CONNECT, 0, encode_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + encode_str(client_id)
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


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(type, flags, body) of the next packet; raises IncompleteReadError at EOF."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        raise ConnectFailed("error:protocol", "malformed remaining length")
    body = await reader.readexactly(length) if length else b""
    return first >> 4, first & 0x0F, body


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
    """One MQTT connection. Create with :meth:`connect`; close with :meth:`disconnect` or :meth:`abort`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client_id: str,
        timing: ConnectTiming,
        on_message: Callable[[MqttClient, Message], None] | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.client_id = client_id
        self.timing = timing
        self.on_message = on_message
        self._next_id = 0
        self._acks: dict[int, asyncio.Future[bytes]] = {}
        self._pings: list[asyncio.Future[None]] = []
        self.closed: asyncio.Future[ConnectFailed | None] = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"mqtt-read-{client_id}")

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
    ) -> MqttClient:
        """TCP connect, TLS handshake, CONNECT, CONNACK; raises :class:`ConnectFailed`."""
        started = time.perf_counter()
        writer: asyncio.StreamWriter | None = None
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
        return cls(reader, writer, client_id, timing, on_message)

    # -- operations ----------------------------------------------------------------------
    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _check_open(self) -> None:
        if self.closed.done():
            raise self.closed.result() or ConnectFailed("closed")

    async def _await(self, fut: asyncio.Future[object], time_limit: float) -> None:
        waiters: set[asyncio.Future[Any]] = {fut, self.closed}
        done, _ = await asyncio.wait(waiters, timeout=time_limit, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            fut.result()
            return
        fut.cancel()
        if self.closed.done():
            raise self.closed.result() or ConnectFailed("closed")
        raise ConnectFailed("timeout")

    async def publish(self, topic: str, payload: bytes, *, qos: int = 0, time_limit: float = 30.0) -> None:
        """Publish; with qos=1 wait for the PUBACK."""
        self._check_open()
        if qos == 0:
            self.writer.write(publish_packet(topic, payload, qos=0))
            return
        packet_id = self._packet_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = fut
        self.writer.write(publish_packet(topic, payload, qos=1, packet_id=packet_id))
        try:
            await self._await(fut, time_limit)  # type: ignore[arg-type]
        finally:
            self._acks.pop(packet_id, None)

    async def subscribe(self, filters: list[tuple[str, int]], *, time_limit: float = 30.0) -> list[int]:
        """Subscribe; returns the SUBACK return codes (0x80 = refused)."""
        self._check_open()
        packet_id = self._packet_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = fut
        self.writer.write(subscribe_packet(packet_id, filters))
        try:
            await self._await(fut, time_limit)  # type: ignore[arg-type]
        finally:
            self._acks.pop(packet_id, None)
        return list(fut.result())

    async def unsubscribe(self, filters: list[str], *, time_limit: float = 30.0) -> None:
        """Unsubscribe; returns once the UNSUBACK arrived."""
        self._check_open()
        packet_id = self._packet_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = fut
        self.writer.write(unsubscribe_packet(packet_id, filters))
        try:
            await self._await(fut, time_limit)  # type: ignore[arg-type]
        finally:
            self._acks.pop(packet_id, None)

    async def ping(self, *, time_limit: float = 30.0) -> float:
        """PINGREQ; returns the round trip time in seconds."""
        self._check_open()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings.append(fut)
        t0 = time.perf_counter()
        self.writer.write(PINGREQ_PACKET)
        await self._await(fut, time_limit)  # type: ignore[arg-type]
        return time.perf_counter() - t0

    async def disconnect(self) -> None:
        """Send DISCONNECT and close the connection (never raises)."""
        if not self.closed.done():
            with contextlib.suppress(Exception):
                self.writer.write(DISCONNECT_PACKET)
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
                    fut = self._acks.get(packet_id)
                    if fut is not None and not fut.done():
                        fut.set_result(body[2:])
                elif kind == PINGRESP:
                    while self._pings:
                        ping = self._pings.pop(0)
                        if not ping.done():
                            ping.set_result(None)
                            break
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not self.closed.done():
                self.closed.set_result(classify(exc))
            self.writer.transport.abort()


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
