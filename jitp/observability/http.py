"""A minimal HTTP/1.1 server on the node's event loop: ``/metrics``, ``/status.json`` and the console.

Its own listener (``metrics.bind``), never the MQTT port. GET, HEAD and (small) POST; one request
per connection; the request head is bounded (8 KiB, 10 s) and a body to 16 KiB. Handlers run on
the broker's loop, so they read live state without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("jitp.metrics")

MAX_HEAD = 8192
MAX_BODY = 16 * 1024
HEAD_TIMEOUT = 10.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # names in lower case
    body: bytes = b""

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True))

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[Request], Awaitable[Response]]
_REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    500: "Error",
}


class HttpListener:
    """``routes``: exact paths; ``prefixes``: a handler for every path under a prefix."""

    def __init__(self, routes: Mapping[str, Handler], prefixes: Mapping[str, Handler] | None = None) -> None:
        self.routes = dict(routes)
        self.prefixes = dict(prefixes or {})
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
        except Exception:  # never let a request take the broker down; say so in its log
            log.exception("HTTP request failed")
            response = Response(500, b"internal error\n")
        head = [
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            "X-Content-Type-Options: nosniff",
            *(f"{k}: {v}" for k, v in response.headers),
        ]
        with contextlib.suppress(ConnectionError, TimeoutError):
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                request = parse_head(head)
                if request is None:
                    return Response(400, b"bad request\n")
                length = int(request.headers.get("content-length", "0") or 0)
                if length > MAX_BODY:
                    return Response(413, b"request body too large\n")
                body = await reader.readexactly(length) if length > 0 else b""
        except (
            asyncio.LimitOverrunError,
            asyncio.IncompleteReadError,
            TimeoutError,
            ConnectionError,
            ValueError,
        ):
            return Response(400, b"bad request\n")
        request = Request(request.method, request.path, request.query, request.headers, body)
        if request.method not in ("GET", "HEAD", "POST"):
            return Response(405, b"GET or POST only\n")
        handler = self.routes.get(request.path)
        if handler is None:
            handler = next((h for p, h in self.prefixes.items() if request.path.startswith(p)), None)
        if handler is None:
            return Response(404, b"not found\n")
        return await handler(request)


def parse_head(head: bytes) -> Request | None:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3:
        return None
    method, target, _ = parts
    url = urlsplit(target)
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Request(
        method=method,
        path=url.path,
        query=MappingProxyType(dict(parse_qsl(url.query, keep_blank_values=True))),
        headers=MappingProxyType(headers),
    )
