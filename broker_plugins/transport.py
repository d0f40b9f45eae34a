"""jitp's own TLS transport: one asyncio ``Protocol`` per connection, TLS through ``ssl.MemoryBIO``.

From accept to a complete CONNECT there is no task, no stream and no plugin: the event loop
calls :meth:`TlsConnection.data_received`, which feeds OpenSSL's memory BIO, drives the
handshake (under ``listener.handshake_timeout``), decrypts, and cuts the first packet (under
``listener.connect_timeout``). Only a whole CONNECT starts a task: the broker's admission, which
then runs the session on the same object, as amqtt's reader and writer.

Owning the TLS state machine also means the client hears *why* it was refused: when OpenSSL
refuses the client certificate it writes the TLS alert (``bad_certificate``, ``unknown_ca``,
``certificate_expired``...) into the outgoing BIO, and this transport sends it before closing.
asyncio's ``sslproto`` drops the connection without it, so clients logged a bare EOF.

W17: a write that cannot drain within ``write_timeout`` (a client that stops reading) fails
instead of waiting forever, and closing never waits more than :data:`CLOSE_TIMEOUT` for such a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import TYPE_CHECKING

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.errors import AMQTTError

from broker_plugins.tls import handshake_refusal

if TYPE_CHECKING:
    from broker_plugins.listener import Listener

log = logging.getLogger("jitp.broker")

CLOSE_TIMEOUT = 1.0  # s a closing connection may take to flush before it is aborted
_HANDSHAKE, _CONNECT, _ADMITTING, _CLOSED = range(4)


class PacketTooLarge(AMQTTError):
    """A packet over ``max_packet_size``. Not an MQTTError: amqtt's reader loop would discard
    those and keep reading the payload as packets."""


class TlsConnection(asyncio.Protocol, ReaderAdapter, WriterAdapter):
    """One client connection: the TLS handshake, the CONNECT, then amqtt's reader and writer.

    Reading: decrypted bytes wait in one buffer; past ``pause_above`` bytes not yet read by the
    session the socket stops being read (TCP backpressure), until the session needs more.
    Writing: plaintext is encrypted into the outgoing BIO and handed to the socket at once;
    :meth:`drain` waits only while the socket's buffer is over its high-water mark.
    """

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self.max_packet_size = listener.limits.max_packet_size
        self.pause_above = max(64 * 1024, 2 * self.max_packet_size)
        self.write_timeout: float | None = None
        self.is_closed = False
        self.peer: tuple[str, int] | None = None
        self.accepted_at = 0.0  # time.monotonic() at accept: the join latency runs from here
        self._transport: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl: ssl.SSLObject | None = None
        self._state = _HANDSHAKE
        self._buffer = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._need = 0
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.accepted_at = time.monotonic()
        listener = self._listener
        if not listener.opened(self):
            self._state = _CLOSED
            self.is_closed = True
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (str(peer[0]), int(peer[1]))
        self._ssl = listener.tls_context().wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._timer = asyncio.get_running_loop().call_later(
            listener.config.handshake_timeout, self._timed_out
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self.is_closed = True
        self._eof = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiter = None
        self._listener.closed(self)

    def data_received(self, data: bytes) -> None:
        if self._state == _CLOSED:
            return
        self._incoming.write(data)
        if self._state == _HANDSHAKE and not self._handshake():
            return
        self._decrypt()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False  # the transport closes itself

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._drain_waiter = None

    # -- TLS ----------------------------------------------------------------------------------
    def _handshake(self) -> bool:
        assert self._ssl is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # OpenSSL's alert for the refusal: the client logs why
            self._refused(exc)
            return False
        self._flush()
        self._state = _CONNECT
        self._rearm(self._listener.config.connect_timeout)
        return True

    def _refused(self, exc: BaseException) -> None:
        self._state = _CLOSED
        self.is_closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        refusal = handshake_refusal(exc)
        if refusal is None:
            log.debug("TLS handshake with %s failed: %r", self.address, exc)
        else:
            self._listener.handshake_refused(self, refusal)
        # Half-close after the alert and keep reading (discarding) until the client closes: closing
        # a socket with unread data (the CONNECT a TLS 1.3 client sends right after its Finished)
        # makes the kernel send a reset, which can destroy the alert before the client reads it.
        transport = self._transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)
        else:
            self._close_transport()

    def _decrypt(self) -> None:
        assert self._ssl is not None
        read, buffer, size = self._ssl.read, self._buffer, self._listener.config.tls_read_buffer
        try:
            while True:
                chunk = read(size)
                if not chunk:
                    self._eof = True
                    break
                buffer += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify
            self._eof = True
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS error from %s: %r", self.address, exc)
            self.abort()
            return
        if self._outgoing.pending:  # post-handshake messages (key update, tickets)
            self._flush()
        if self._state == _CONNECT:
            self._first_packet()
        elif self._waiter is not None and (len(buffer) >= self._need or self._eof):
            self._wake_reader()
        if len(buffer) > self.pause_above and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _flush(self) -> None:
        data = self._outgoing.read()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    # -- the first packet ----------------------------------------------------------------------
    def _first_packet(self) -> None:
        buffer = self._buffer
        if not buffer:
            if self._eof:
                self.abort()
            return
        if buffer[0] != 0x10:  # [MQTT-3.1.0-1] the first packet must be a CONNECT
            log.debug("first packet from %s is not a CONNECT: closing", self.address)
            self.abort()
            return
        length, shift, i = 0, 0, 1
        while True:
            if i >= len(buffer):
                if self._eof or i > 4:
                    self.abort()
                return
            byte = buffer[i]
            length += (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if i > 4:
                self.abort()  # malformed remaining length
                return
        if length > self.max_packet_size:
            # Its protocol level decides the answer (MQTT 5: CONNACK 0x95); the body is never read.
            head = bytes(buffer[i : i + 7])
            if len(head) < 7 and not self._eof:
                return  # the level is not in yet (the CONNECT deadline still runs)
            level = head[6] if head[:6] == b"\x00\x04MQTT" and len(head) == 7 else None
            log.debug("CONNECT of %d bytes from %s, over max_packet_size: refused", length, self.address)
            buffer.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._state = _ADMITTING
            self._listener.oversized_connect(self, length, level)
            return
        if len(buffer) < i + length:
            if self._eof:
                self.abort()
            return
        packet = bytes(buffer[: i + length])
        del buffer[: i + length]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._state = _ADMITTING
        self._listener.connect_received(self, packet)

    def _rearm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        what = "TLS handshake" if self._state == _HANDSHAKE else "CONNECT"
        log.debug("no %s from %s in time: closing", what, self.address)
        self.abort()

    @property
    def address(self) -> str | None:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else None

    # -- amqtt's ReaderAdapter ---------------------------------------------------------------------
    async def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.max_packet_size:
            raise PacketTooLarge(f"packet larger than {self.max_packet_size} bytes")
        buffer = self._buffer
        while len(buffer) < n:
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(buffer), n)
            if self._reading_paused and self._transport is not None:
                self._reading_paused = False
                self._transport.resume_reading()
            self._need = n
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(buffer[:n])
        del buffer[:n]
        if self._reading_paused and len(buffer) <= self.pause_above // 2 and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    def feed_eof(self) -> None:
        self._eof = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- amqtt's WriterAdapter ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.is_closed or self._ssl is None:
            return
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS write to %s failed: %r", self.address, exc)
            self.abort()
            return
        self._flush()

    async def drain(self) -> None:
        """Wait while the socket's buffer is over its high-water mark; at most ``write_timeout``
        (TimeoutError), so a client that stops reading cannot hold a writer forever."""
        if self.is_closed or not self._writing_paused:
            return
        if self._drain_waiter is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
        waiter = self._drain_waiter
        async with asyncio.timeout(self.write_timeout):
            await asyncio.shield(waiter)

    def get_peer_info(self) -> tuple[str, int] | None:
        return self.peer

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return self._ssl

    async def close(self) -> None:
        """Say close_notify and close once written; abort a client that does not take it."""
        self.shut()

    def shut(self) -> None:
        """:meth:`close` without a caller to wait: what was written goes first (an MQTT 5 DISCONNECT)."""
        if self.is_closed:
            return
        self.is_closed = True
        if self._ssl is not None and self._state != _HANDSHAKE:
            # SSLWantReadError: close_notify is written; the client's is not awaited.
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self._ssl.unwrap()
            self._flush()
        self._close_transport()

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()  # after what is buffered is written...
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)  # ...within a second

    def abort(self) -> None:
        self.is_closed = True
        self._state = _CLOSED
        if self._transport is not None:
            self._transport.abort()
