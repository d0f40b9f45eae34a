"""W1, W6: jitp's own TCP listener. amqtt hard-codes ``ssl.CERT_OPTIONAL``; here every connection
runs the TLS handshake with the current CERT_REQUIRED context, under a deadline, with TCP_NODELAY
(asyncio's default) and a 4096 backlog, and a refused handshake is audited with OpenSSL's reason.

The listener makes a :class:`~broker_plugins.transport.TlsConnection` per socket; no task runs for
a connection until its CONNECT is whole, then ``on_connection`` (the broker) takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from broker_plugins import reasons
from broker_plugins.transport import TlsConnection
from jitp import errors
from jitp.config import LimitsConfig, ListenerConfig

log = logging.getLogger("jitp.broker")

OnConnection = Callable[[TlsConnection, bytes], Awaitable[None]]
RecordRefusal = Callable[..., Coroutine[Any, Any, None]]


class HandshakeRefused(errors.Refused):
    """A refusal decided by OpenSSL during the handshake, before any MQTT."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"TLS handshake refused: {message}")
        self.reason = reason  # type: ignore[misc]


class Listener:
    """Accepts sockets; each becomes a :class:`TlsConnection`, handed to ``on_connection`` with its CONNECT."""

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
        self.tls_context = tls_context
        self._on_connection = on_connection
        self._record_refusal = record_refusal
        self._server: asyncio.Server | None = None
        self._connections: set[TlsConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._auditing: set[TlsConnection] = set()
        # Past this many sockets even a handshake is refused: file descriptors are finite.
        self.hard_limit = config.max_connections + max(100, config.max_connections // 10)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: TlsConnection(self),
            host,
            port,
            backlog=self.config.backlog,
            reuse_address=True,
            reuse_port=self.config.reuse_port or None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting; connections being set up are the broker's to drain, then :meth:`abort_all`."""
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
        for connection in list(self._connections):
            connection.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # -- called by TlsConnection -----------------------------------------------------------------
    def opened(self, connection: TlsConnection) -> bool:
        """Count a new socket; False: over the hard limit, abort it."""
        if len(self._connections) >= self.hard_limit:
            return False
        self._connections.add(connection)
        return True

    def closed(self, connection: TlsConnection) -> None:
        if connection not in self._auditing:  # a refused one leaves once its refusal is audited
            self._connections.discard(connection)

    def connect_received(self, connection: TlsConnection, packet: bytes) -> None:
        """The first task of a connection: the broker admits it and runs its session."""
        task = asyncio.get_running_loop().create_task(self._run(connection, packet))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, connection: TlsConnection, packet: bytes) -> None:
        try:
            await self._on_connection(connection, packet)
        except asyncio.CancelledError:
            connection.abort()
            raise
        except (KeyboardInterrupt, SystemExit):
            connection.abort()
            raise
        except BaseException:  # an Exception, or e.g. a PanicException of a Rust extension
            log.exception("unexpected error on connection from %s", connection.address)
            connection.abort()

    def oversized_connect(self, connection: TlsConnection, size: int, level: int | None) -> None:
        """A CONNECT over ``limits.max_packet_size``, unread: MQTT 5 gets CONNACK 0x95 (Packet too large),
        3.1.1 (no such code) a close; audited either way."""
        if level == 5:
            connection.write(reasons.connack(reasons.TOO_LARGE, mqtt5_format=True))
        connection.shut()
        version = f"level {level}" if level is not None else "no protocol level"
        refusal = errors.PacketTooLarge(
            f"CONNECT of {size} bytes, over limits.max_packet_size {self.limits.max_packet_size}",
            detail=f"{size} bytes, {version}",
        )
        self._audit(connection, self._record_refusal(refusal, peer=connection.address))

    def handshake_refused(self, connection: TlsConnection, refusal: tuple[str, str]) -> None:
        """Audit a refusal OpenSSL decided; the connection counts as open until it is written."""
        reason, message = refusal
        self._audit(
            connection, self._record_refusal(HandshakeRefused(reason, message), peer=connection.address)
        )

    def _audit(self, connection: TlsConnection, record: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(record)
        self._tasks.add(task)
        self._auditing.add(connection)

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            self._auditing.discard(connection)
            self._connections.discard(connection)  # the transport is closed or closing

        task.add_done_callback(done)
