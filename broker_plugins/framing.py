"""MQTT framing over asyncio streams: a per-packet size limit and bounded writes.

W6: :class:`LimitedReader` refuses a packet over ``max_packet_size`` before reading its body.
W17: :class:`AbortableWriter` fails a write that cannot drain within the keep-alive period (a
client that stops reading) instead of waiting forever, and can always be aborted.
"""

from __future__ import annotations

import asyncio

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.errors import AMQTTError


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
    """W17: a write that cannot drain within ``write_timeout`` (a client that stops reading) fails
    instead of waiting forever, and closing never waits more than a second for such a client."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self.stream = writer
        self.write_timeout: float | None = None

    async def drain(self) -> None:
        if self.is_closed:
            return
        transport = self.stream.transport
        if (
            self.write_timeout is None
            or transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]
        ):
            await self.stream.drain()  # at or below the low-water mark writing is never paused: no timer
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


async def read_packet(reader: LimitedReader) -> bytes:
    """One whole MQTT packet (fixed header and body) as bytes; ``max_packet_size`` applies."""
    first = await reader.read(1)
    if not first:
        raise asyncio.IncompleteReadError(b"", 1)
    header, length, shift = bytearray(first), 0, 0
    for _ in range(4):
        byte = await reader.read(1)
        if not byte:
            raise asyncio.IncompleteReadError(bytes(header), None)
        header += byte
        length += (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    else:
        raise ValueError("malformed remaining length")
    body = b""
    while len(body) < length:
        chunk = await reader.read(length - len(body))
        if not chunk:
            raise asyncio.IncompleteReadError(body, length)
        body += chunk
    return bytes(header) + body


def connect_protocol(packet: bytes) -> tuple[str, int] | None:
    """(protocol name, protocol level) of a CONNECT packet, or None if it is not one.

    Read before amqtt parses the packet: amqtt reads every CONNECT as MQTT 3.1.1 and misreads an
    MQTT 5 CONNECT's properties as the client id, then waits for bytes that never come."""
    if not packet or packet[0] != 0x10:
        return None
    i = 1
    while i < len(packet) and packet[i] & 0x80:
        i += 1
    i += 1
    if len(packet) < i + 2:
        return None
    n = int.from_bytes(packet[i : i + 2], "big")
    name = packet[i + 2 : i + 2 + n]
    if len(packet) < i + 3 + n:
        return None
    return name.decode("utf-8", "replace"), packet[i + 2 + n]
