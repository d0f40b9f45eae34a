"""Stock amqtt 0.12.1 in a background thread, for the hardening regression tests.

Each weakness in :mod:`broker_plugins.compat` is shown by running the same attack against an
unmodified ``amqtt.broker.Broker`` (this module) and against the jitp broker. The two tiny plugins
below give stock amqtt the same policy jitp enforces, so any difference is the broker's, not the
policy's:

* :class:`CertCnAuthPlugin` admits a client iff its TLS client certificate's CN equals its MQTT
  client id (jitp's identity binding), or, with ``allow_without_cert``, any client at all;
* :class:`ClientAclPlugin` is a per-client-id topic ACL with separate publish, subscribe and
  receive lists (``"*"`` is the entry for every client).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

T = TypeVar("T")

_MODULE = __name__


def _filter_matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 matching; a subscribe request's filter matches an allowed filter level by level."""
    t_levels = topic.split("/")
    f_levels = topic_filter.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level not in ("+", t_levels[i]):
            return False
    return len(t_levels) == len(f_levels)


def peer_cn(session: Session) -> str | None:
    ssl_object = session.ssl_object
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class CertCnAuthPlugin(BaseAuthPlugin):
    """Admit iff the client certificate's CN equals the client id (or anyone, if configured)."""

    @dataclass
    class Config:
        allow_without_cert: bool = False  # admit everyone: TLS is then the only gate

    async def authenticate(self, *, session: Session) -> bool | None:
        if self.config.allow_without_cert:
            return True
        cn = peer_cn(session)
        return cn is not None and cn == session.client_id


class ClientAclPlugin(BaseTopicPlugin):
    """Per-client-id topic ACL. A client without an entry (and no ``"*"`` entry) is denied."""

    @dataclass
    class Config:
        publish: dict[str, list[str]] = field(default_factory=lambda: {"*": ["#"]})
        subscribe: dict[str, list[str]] = field(default_factory=lambda: {"*": ["#"]})
        receive: dict[str, list[str]] = field(default_factory=lambda: {"*": ["#"]})

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or topic is None or action is None:
            return False
        table = {
            Action.PUBLISH: self.config.publish,
            Action.SUBSCRIBE: self.config.subscribe,
            Action.RECEIVE: self.config.receive,
        }[action]
        allowed = table.get(session.client_id or "", table.get("*", []))
        return any(_filter_matches(topic, f) for f in allowed)


AUTH_CN = f"{_MODULE}.CertCnAuthPlugin"
ACL = f"{_MODULE}.ClientAclPlugin"


def tls_listener(
    *, server_cert: Path, server_key: Path, cafile: Path, max_connections: int = 0
) -> dict[str, Any]:
    """A stock amqtt TLS listener (which uses ``ssl.CERT_OPTIONAL``, hard-coded) on a free loopback port."""
    return {
        "type": "tcp",
        "bind": "127.0.0.1:0",
        "ssl": True,
        "certfile": str(server_cert),
        "keyfile": str(server_key),
        "cafile": str(cafile),
        "max_connections": max_connections,
    }


class StockBroker:
    """An unmodified ``amqtt.broker.Broker`` on its own event loop in a thread."""

    def __init__(self, listener: dict[str, Any], plugins: dict[str, Any]) -> None:
        # Setting ``plugins`` explicitly drops amqtt's defaults (anonymous auth, $SYS, loggers).
        self.config: dict[str, Any] = {"listeners": {"default": listener}, "plugins": plugins}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="stock-amqtt")
        self._broker: Broker | None = None
        self.port = 0

    def start(self) -> StockBroker:
        self.thread.start()

        async def go() -> int:
            self._broker = Broker(self.config)
            await self._broker.start()
            instance = self._broker._servers["default"].instance
            return int(instance.sockets[0].getsockname()[1])

        self.port = self.call(go(), timeout=30)
        return self

    @property
    def broker(self) -> Broker:
        assert self._broker is not None, "not started"
        return self._broker

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def session_count(self) -> int:
        return len(self.broker.sessions)

    def stop(self) -> None:
        async def go() -> None:
            if self._broker is not None:
                await self._broker.shutdown()
            # Stock amqtt leaves connection tasks behind (e.g. clients queued on max_connections).
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.call(go(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
