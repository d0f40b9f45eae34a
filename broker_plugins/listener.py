"""W1, W6: jitp's own TCP listener. amqtt hard-codes ``ssl.CERT_OPTIONAL``; here every connection
runs the TLS handshake with the current CERT_REQUIRED context, under a deadline, with TCP_NODELAY
and a 4096 backlog, and a refused handshake is audited with OpenSSL's reason."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from broker_plugins.framing import AbortableWriter, LimitedReader
from broker_plugins.tls import handshake_refusal
from jitp import errors
from jitp.config import LimitsConfig, ListenerConfig

log = logging.getLogger("jitp.broker")

OnConnection = Callable[[LimitedReader, AbortableWriter], Awaitable[None]]
RecordRefusal = Callable[..., Awaitable[None]]


class HandshakeRefused(errors.Refused):
    """A refusal decided by OpenSSL during the handshake, before any MQTT."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"TLS handshake refused: {message}")
        self.reason = reason  # type: ignore[misc]


class Listener:
    """Accepts sockets, runs the handshake, hands the TLS streams to ``on_connection``."""

    def __init__(
        self,
        config: ListenerConfig,
        limits: LimitsConfig,
        *,
        tls_context: Callable[[], ssl.SSLContext],
        on_connection: OnConnection,
        record_refusal: RecordRefusal,
    ) -> None:
        self.config = config
        self.limits = limits
        self._tls_context = tls_context
        self._on_connection = on_connection
        self._record_refusal = record_refusal
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.open_connections = 0
        # Past this many sockets even a handshake is refused: file descriptors are finite.
        self.hard_limit = config.max_connections + max(100, config.max_connections // 10)

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._accept,
            host,
            port,
            backlog=self.config.backlog,
            reuse_address=True,
            reuse_port=self.config.reuse_port or None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting; connections being set up are cancelled, admitted ones are the broker's."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
            self._server = None

    async def abort_all(self) -> None:
        """End every connection this listener accepted (after the broker drained them)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.open_connections += 1
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if peer else None
        try:
            if self.open_connections > self.hard_limit:
                writer.transport.abort()
                return
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await writer.start_tls(
                    self._tls_context(), ssl_handshake_timeout=self.config.handshake_timeout
                )
            except (TimeoutError, ssl.SSLError, OSError, EOFError) as exc:
                await self._handshake_failed(exc, address)
                writer.transport.abort()
                return
            await self._on_connection(
                LimitedReader(reader, max_packet_size=self.limits.max_packet_size), AbortableWriter(writer)
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
        await self._record_refusal(HandshakeRefused(reason, message), peer=address)
