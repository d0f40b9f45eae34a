"""A certificate request over ``limits.max_packet_size``: read past, never held, and answered.

W6 closes the connection on a packet over ``limits.max_packet_size`` before reading its body.
Issue 16 asks more of a certificate request (``$jitp/certificates/<id>/create-from-csr``): a 1 MB
request is answered ``payload_too_large`` on ``.../rejected`` and the device keeps its connection.
So a PUBLISH over the limit has its topic read (at most 64 KiB); if it is a certificate request of
at most :data:`DISCARD_LIMIT` bytes, the rest of its body is read in chunks and dropped (memory stays
at one chunk), within the same keep-alive deadline as any packet. Anything else over the limit (other
topics, a request over :data:`DISCARD_LIMIT`, a malformed header) still closes the connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.packet import PUBLISH, MQTTFixedHeader

from jitp.domain.certificates import CERTIFICATES_PREFIX

DISCARD_LIMIT = 4 * 1024 * 1024  # bytes; an oversized certificate request up to this is answered
CHUNK = 64 * 1024  # bytes read (and dropped) at a time


@dataclass(frozen=True)
class OversizedRequest:
    """A certificate request whose payload was read past: what is needed to answer and acknowledge."""

    topic: str
    qos: int
    packet_id: int | None
    size: int  # payload bytes


async def skip_certificate_request(
    reader: ReaderAdapter, header: MQTTFixedHeader, *, max_read: int
) -> OversizedRequest | None:
    """Read past an oversized PUBLISH if it is a certificate request; None: close the connection
    (part of the packet may have been read). ``max_read``: the most the reader gives at once."""
    remaining = header.remaining_length
    if header.packet_type != PUBLISH or remaining > DISCARD_LIMIT:
        return None
    qos = (header.flags >> 1) & 0x03
    length = int.from_bytes(await reader.read(2), "big")
    left = remaining - 2 - length - (2 if qos else 0)
    if left < 0 or qos > 2:
        return None
    try:
        topic = (await reader.read(length)).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not topic.startswith(CERTIFICATES_PREFIX):
        return None
    packet_id = int.from_bytes(await reader.read(2), "big") if qos else None
    size = left
    while left:
        chunk = min(CHUNK, max_read, left)
        await reader.read(chunk)
        left -= chunk
    return OversizedRequest(topic, qos, packet_id, size)
