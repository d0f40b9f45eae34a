"""The floor for a Python broker's first join: mutual TLS, read a CONNECT, write CONNACK 0, nothing else.

Run by ``benchmarks/join_storm.py`` (targets ``floor`` and ``floor-bio``) as its own process, so
its CPU per connect is measured in the same run as jitp and Mosquitto, against the same fleet:

- ``--mode streams``: ``asyncio.start_server(ssl=...)``, the stdlib's TLS (sslproto) and streams;
- ``--mode bio``: one ``asyncio.Protocol`` per connection driving ``ssl.SSLObject`` over
  ``ssl.MemoryBIO``, the way jitp's transport does, with no task at all.

Same TLS settings as jitp: CERT_REQUIRED, partial chains, no session tickets, TLS 1.2+. No
provisioning, no registry, no audit, no MQTT session: what jitp adds is jitp minus this.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl

CONNACK = b"\x20\x02\x00\x00"
CONNACK_V5 = b"\x20\x03\x00\x00\x00"  # reason code 0, no properties


def connack_for(connect: bytes | bytearray) -> bytes:
    """CONNACK 0 in the CONNECT's own protocol: after the fixed header, "MQTT" (6 bytes), the level."""
    header = 2 + next((i for i in range(4) if not connect[1 + i] & 0x80), 0)
    return CONNACK_V5 if connect[header + 6 : header + 7] == b"\x05" else CONNACK


def context(certfile: str, keyfile: str, cafile: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.num_tickets = 0
    ctx.load_cert_chain(certfile, keyfile)
    ctx.load_verify_locations(cafile)
    return ctx


def _connect_length(buffer: bytes | bytearray) -> int | None:
    """Bytes of the whole first packet, or None if incomplete."""
    length, shift = 0, 0
    for i in range(1, min(len(buffer), 5)):
        length += (buffer[i] & 0x7F) << shift
        shift += 7
        if not buffer[i] & 0x80:
            return i + 1 + length
    return None


async def _streams_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = bytearray()
    try:
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                return
            data += chunk
            size = _connect_length(data)
            if size is not None and len(data) >= size:
                break
        writer.write(connack_for(data))
        await reader.read(4096)  # until the client goes
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


class BioConnection(asyncio.Protocol):
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshaken = self.answered = False
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.incoming.write(data)
        try:
            if not self.handshaken:
                self.ssl.do_handshake()
                self.handshaken = True
            while True:
                chunk = self.ssl.read(17 * 1024)
                if not chunk:
                    break
                self.buffer += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            self.transport.write(self.outgoing.read())
            self.transport.close()
            return
        if not self.answered:
            size = _connect_length(self.buffer)
            if size is not None and len(self.buffer) >= size:
                self.answered = True
                self.ssl.write(connack_for(self.buffer))
        out = self.outgoing.read()
        if out:
            self.transport.write(out)


async def serve(port: int, mode: str, ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    if mode == "streams":
        server = await asyncio.start_server(_streams_client, "127.0.0.1", port, ssl=ctx, backlog=4096)
    else:
        server = await loop.create_server(lambda: BioConnection(ctx), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("streams", "bio"), default="bio")
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--cafile", required=True, help="the CA bundle client certificates chain to")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.mode, context(args.certfile, args.keyfile, args.cafile)))


if __name__ == "__main__":
    main()
