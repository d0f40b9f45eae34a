"""A minimal HTTP/1.1 server on the node's event loop, for ``/metrics`` (and ``/status.json``).

Its own listener (``metrics.bind``), never the MQTT port. GET only, one request per connection,
request head bounded (8 KiB, 10 s): enough for a Prometheus scrape and nothing to attack.
Handlers run on the broker's loop, so they read live state without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("jitp.metrics")

MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[], Awaitable[Response]]
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Error"}


class HttpListener:
    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self.routes = dict(routes)
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self._respond(reader)
        except Exception:  # never let a scrape take the broker down; say so in its log
            log.exception("metrics request failed")
            response = Response(500, b"internal error\n")
        head = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
            f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError, TimeoutError):
            writer.write(head.encode() + response.body)
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return Response(400, b"bad request\n")
        if len(head) > MAX_HEAD:
            return Response(400, b"request head too large\n")
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return Response(400, b"bad request\n")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return Response(405, b"GET only\n")
        handler = self.routes.get(target.split("?", 1)[0])
        if handler is None:
            return Response(404, b"not found\n")
        return await handler()
