"""Test helpers: a real jitp broker on a free loopback port in a background thread, real paho clients."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from cryptography import x509

import certs
from broker_plugins.server import JitpServer
from jitp.config import AuditConfig, Config, LimitsConfig, ListenerConfig, TrustConfig
from jitp.domain.audit import AuditDraft
from jitp.trust import Role, TrustAnchor

T = TypeVar("T")


# -- waiting for a condition -------------------------------------------------------------------
# Tests never sleep to synchronise: they wait for the condition that shows the other side did its
# work, with a bounded deadline. These two are the one way to do that (blocking and on a loop).
def wait_until(predicate: Callable[[], object], timeout: float = 5.0, *, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass; True if it became truthy.

    Use as ``assert wait_until(lambda: ..., timeout), "what did not happen"``.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


async def wait_until_async(
    predicate: Callable[[], object | Awaitable[object]], within: float = 5.0, *, interval: float = 0.02
) -> bool:
    """:func:`wait_until` on an event loop, which keeps running meanwhile; ``predicate`` may be async."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class Identity:
    """A client identity on disk: chain file (leaf + intermediates) and key."""

    name: str
    cert_path: Path
    key_path: Path
    cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return certs.fingerprint(self.cert)


class Pki:
    """A dev PKI made by certs.init_pki, plus a factory for good and bad client certificates."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.layout = certs.init_pki(directory / "pki")
        self.root = certs.load_issuer(self.layout.root_cert, self.layout.root_key)
        self.manufacturer = certs.load_issuer(self.layout.manufacturer_cert, self.layout.manufacturer_key)
        self.service_ca = certs.load_issuer(self.layout.service_ca_cert, self.layout.service_ca_key)
        self._n = 0

    def identity(
        self,
        subject: str | x509.Name,
        *,
        issuer: certs.Issuer | None = None,
        key: certs.PrivateKey | None = None,
        **leaf_kw: Any,
    ) -> Identity:
        issuer = issuer or self.manufacturer
        key = key or certs.generate_key("ec")
        cert = certs.make_leaf(subject, key.public_key(), issuer=issuer, **leaf_kw)
        self._n += 1
        base = self.dir / "ids" / f"id{self._n}"
        certs.write_certs(base.with_suffix(".pem"), [cert, issuer.cert, *issuer.chain])
        certs.write_key(base.with_suffix(".key"), key)
        name = subject if isinstance(subject, str) else subject.rfc4514_string()
        return Identity(
            name=name, cert_path=base.with_suffix(".pem"), key_path=base.with_suffix(".key"), cert=cert
        )

    def device(self, device_id: str, **kw: Any) -> Identity:
        return self.identity(device_id, **kw)

    def service(self, name: str = "ingest-service", **kw: Any) -> Identity:
        return self.identity(name, issuer=self.service_ca, **kw)

    def other_ca(self, cn: str = "rogue CA") -> certs.Issuer:
        return certs.make_ca(cn, key=certs.generate_key("ec"))

    def expired(self, device_id: str) -> Identity:
        now = datetime.now(UTC)
        return self.identity(
            device_id, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        )

    def not_yet_valid(self, device_id: str) -> Identity:
        now = datetime.now(UTC)
        return self.identity(
            device_id, not_before=now + timedelta(days=1), not_after=now + timedelta(days=30)
        )


class BrokerThread:
    """A JitpServer running on its own event loop in a thread, so tests can use blocking paho clients."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="jitp-broker")
        self.server = JitpServer(config)

    def start(self) -> BrokerThread:
        self.thread.start()
        self.call(self.server.start(), timeout=30)
        return self

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    # -- conveniences --------------------------------------------------------------------
    def register_ca(
        self,
        cert: x509.Certificate,
        *,
        role: Role = Role.DEVICE,
        region: str | None = None,
        template: str | None = None,
    ) -> str:
        anchor = TrustAnchor.from_certificate(cert, role=role, region=region, template=template)
        draft = AuditDraft(at=datetime.now(UTC), action="ca-registered", actor="test")

        async def go() -> None:
            await self.server.service.registry.register_anchor(anchor, audit=draft)
            await self.server.service.refresh_trust()

        self.call(go())
        return anchor.ca_id

    def registry(self) -> Any:
        return self.server.service.registry

    def devices(self) -> list[Any]:
        return self.call(self.registry().list_devices())

    def events(self, device_id: str | None = None) -> list[Any]:
        return self.call(self.registry().events(device_id))

    def audit(self) -> list[Any]:
        """Audit entries with device references resolved (what `jitp audit export` shows)."""

        async def go() -> list[Any]:
            registry = self.registry()
            return list(await registry.resolve_audit(await registry.audit_entries()))

        return self.call(go())

    def raw_audit(self) -> list[Any]:
        """Audit entries as stored: pseudonymous."""
        return self.call(self.registry().audit_entries())

    def session_count(self) -> int:
        return len(self.server.broker.sessions)


def test_config(tmp: Path, pki: Pki, **sections: Any) -> Config:
    listener = ListenerConfig(
        server_cert=pki.layout.server_cert,
        server_key=pki.layout.server_key,
        **{"bind": "127.0.0.1:0", **sections.pop("listener", {})},
    )
    return Config(
        data_dir=tmp / "data",
        listener=listener,
        limits=LimitsConfig(**sections.pop("limits", {})),
        trust=TrustConfig(**sections.pop("trust", {"reload_interval": 0.5})),
        audit=AuditConfig(**sections.pop("audit", {})),
        **sections,
    )


test_config.__test__ = False  # type: ignore[attr-defined]


def client_context(pki: Pki, ident: Identity | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.layout.root_cert))
    if ident is not None:
        ctx.load_cert_chain(str(ident.cert_path), str(ident.key_path))
    return ctx


@dataclass
class Conn:
    """Outcome of one paho connect attempt."""

    rc: int | None  # CONNACK return code, None if the connection failed before CONNACK
    client: mqtt.Client
    error: str | None = None
    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        return wait_until(predicate, timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        done = threading.Event()
        result: list[int] = []

        def on_subscribe(client: Any, userdata: Any, mid: Any, reason_codes: Any, props: Any) -> None:
            result.extend(int(rc.value) if hasattr(rc, "value") else int(rc) for rc in reason_codes)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos)
        assert done.wait(timeout), "no SUBACK"
        return result

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def connect(
    port: int,
    pki: Pki,
    ident: Identity | None,
    *,
    client_id: str | None = None,
    clean: bool = True,
    keepalive: int = 30,
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
    bind_address: str = "",
) -> Conn:
    """Connect a real paho client over mutual TLS; returns the CONNACK code (or the error)."""
    cid = client_id if client_id is not None else (ident.name if ident else "anonymous")
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=cid,
        clean_session=clean,
        protocol=mqtt.MQTTv311,
        reconnect_on_failure=False,
    )
    client.tls_set_context(context or client_context(pki, ident))
    conn = Conn(rc=None, client=client)
    got = threading.Event()

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        # paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map back to the wire value.
        conn.rc = _V3_CONNACK.get(rc.getName(), -1)
        got.set()

    def on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        conn.disconnected.set()
        got.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = lambda c, u, m: conn.messages.append(m)
    try:
        client.connect("127.0.0.1", port, keepalive=keepalive, bind_address=bind_address)
    except (OSError, ssl.SSLError) as exc:
        conn.error = f"{type(exc).__name__}: {exc}"
        return conn
    client.loop_start()
    got.wait(timeout)
    if conn.rc is None and conn.error is None:
        conn.error = "no CONNACK"
    return conn


_V3_CONNACK = {
    "Success": 0,
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}
