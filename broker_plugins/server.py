"""Assembles a jitp node: registry, provisioning service, TLS, listener, broker and event publisher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

from broker_plugins.admin import AdminApi
from broker_plugins.broker import JitpBroker
from broker_plugins.compat import check_amqtt_internals, lean_tls_read_buffer
from broker_plugins.listener import Listener
from broker_plugins.publisher import OutboxPublisher
from broker_plugins.tls import TlsContextHolder
from jitp import errors
from jitp.app.certificates import CertificateService
from jitp.app.service import Clock, ProvisioningService, utc_now
from jitp.config import Config, host_port
from jitp.domain.events import ProvisioningEvent
from jitp.domain.records import EventType
from jitp.domain.templates import TemplateSet
from jitp.registry import Registry
from jitp.registry.factory import make_registry
from jitp.trust import TrustStore

log = logging.getLogger("jitp.server")

STALE_CRL_REPORT_INTERVAL = 300.0  # seconds between repeated errors about a CRL past nextUpdate
_E = EventType
CLOSING_EVENTS = frozenset({_E.REVOKED, _E.DISABLED, _E.DEPROVISIONED, _E.ERASED})  # close live sessions
NAMESPACE_EVENTS = frozenset({_E.QUARANTINED, _E.ENABLED, _E.ALLOWED, _E.CONFIG_CHANGED})  # new namespace


class JitpServer:
    """One jitp broker node. ``async with JitpServer(config) as server: ...`` or :func:`serve`."""

    def __init__(self, config: Config, *, registry: Registry | None = None, clock: Clock = utc_now) -> None:
        self.config = config
        self._registry = registry
        self._clock = clock
        self.port: int | None = None
        self._broker: JitpBroker | None = None
        self._listener: Listener | None = None
        self._publisher: OutboxPublisher | None = None
        self._service: ProvisioningService | None = None
        self._tls: TlsContextHolder | None = None
        self._templates_version = 0

    @property
    def broker(self) -> JitpBroker:
        if self._broker is None:
            raise RuntimeError("the server is not started")
        return self._broker

    @property
    def listener(self) -> Listener:
        if self._listener is None:
            raise RuntimeError("the server is not started")
        return self._listener

    @property
    def service(self) -> ProvisioningService:
        if self._service is None:
            raise RuntimeError("the server is not started")
        return self._service

    @property
    def tls(self) -> TlsContextHolder:
        if self._tls is None:
            raise RuntimeError("the server is not started")
        return self._tls

    async def start(self) -> None:
        check_amqtt_internals()
        cfg = self.config
        lean_tls_read_buffer(cfg.listener.tls_read_buffer)
        listener = cfg.listener
        host, port = host_port(listener.bind)
        # Fail on bad certificates before touching any state.
        self._tls = TlsContextHolder(
            cert=listener.server_cert,
            key=listener.server_key,
            min_version=listener.tls_min_version,
            session_tickets=listener.session_tickets,
        )
        if self._registry is None:
            self._registry = make_registry(cfg)  # SQLite, or PostgreSQL with `registry: postgresql://...`
        await self._registry.open()
        try:
            self._service = ProvisioningService(
                self._registry,
                clock=self._clock,
                default_region=cfg.default_region,
                templates=TemplateSet.load(cfg.templates_dir),
                stale_crl=cfg.trust.stale_crl,
                coalesce_window=cfg.audit.coalesce_window,
                admission=cfg.admission,
                roles=cfg.role_map,
            )
            self._service.on_trust_change(self._tls.update)
            self._service.on_trust_change(self._trust_changed)
            await self._service.refresh_trust(force=True)
            self.admin = AdminApi(
                self._service,
                templates_dir=cfg.templates_dir,
                route=lambda topic, data, qos: self.broker.route(topic, data, qos),
            )
            self._broker = JitpBroker(cfg, service=self._service, admin=self.admin.handle)
            self.certificates = CertificateService(self._service, cfg.issuer)
            self._broker.certificates = self.certificates
            await self._broker.start()
            self._publisher = OutboxPublisher(cfg, self._service, self._broker, on_event=self.enforce)
            await self._publisher.start()
            tls = self._tls
            self._listener = Listener(
                listener,
                cfg.limits,
                tls_context=lambda: tls.context,
                on_connection=self._broker.connection,
                record_refusal=self._service.record_refusal,
            )
            try:
                self.port = await self._listener.start(host, port)
            except OSError as exc:
                await self._publisher.stop()
                await self._broker.shutdown()
                self._broker = self._publisher = None
                raise errors.ConfigError(
                    f"cannot listen on {host}:{port}: {exc.strerror}", key="listener.bind"
                ) from None
        except BaseException:
            await self._registry.close()
            raise
        self._broker.spawn(self._trust_loop(), "jitp-trust-reload")
        log.info("jitp broker listening on %s:%d (mutual TLS)", host, self.port)

    async def stop(self) -> None:
        """Stop accepting, stop publishing events, deliver what was acknowledged, then close."""
        if self._listener is not None:
            await self._listener.close()
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None
        if self._broker is not None:
            await self._broker.drain()
        if self._listener is not None:
            await self._listener.abort_all()
            self._listener = None
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
        if self._service is not None:
            await self._service.drain()
            await self._service.flush_refusals(force=True)
        if self._registry is not None:
            await self._registry.close()

    async def __aenter__(self) -> JitpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- operator decisions reach live sessions ---------------------------------------------------
    async def enforce(self, event: ProvisioningEvent) -> None:
        """Apply a lifecycle event to live sessions and retained messages (called by the publisher)."""
        broker, device_id = self.broker, event.device_id
        if not device_id:
            return
        if event.type is not EventType.PROVISIONED:
            # Also changes made by other processes (the CLI): this node's cached record is stale.
            self.service.forget(device_id)
        if event.type in CLOSING_EVENTS:
            await broker.disconnect_client(device_id, reason=f"device {event.type}")
        if event.type in CLOSING_EVENTS:
            # What the device itself retained goes with it; after deprovisioning or erasure also its
            # own $jitp/devices/<id>/ topics (its configuration).
            gone = event.type in (EventType.DEPROVISIONED, EventType.ERASED)
            prefix = f"$jitp/devices/{device_id}/" if gone else None
            cleared = broker.clear_retained(owner=device_id, prefix=prefix)
            log.info("cleared %d retained message(s) of %s", cleared, device_id)
        if event.type in NAMESPACE_EVENTS and broker.live_session(device_id) is not None:
            record = await self.service.registry.get_device(device_id)
            if record is not None:
                broker.update_device(record)

    def _trust_changed(self, trust: TrustStore) -> None:
        if self._broker is not None:
            self._broker.spawn(self._recheck_sessions(), "jitp-recheck-sessions")

    async def _recheck_sessions(self) -> None:
        """After a trust change (CA disabled, CRL imported), close sessions whose chain no longer verifies."""
        now = self.service.clock()
        for client_id, state in self.broker.live_clients():
            try:
                self.service.trust.verify(state.peer.chain_der, now=now)
            except errors.Refused as exc:
                await self.broker.disconnect_client(client_id, reason=f"{exc.reason}: {exc.message}")
                is_device = state.device_id is not None
                await self.service.record_event(
                    "session-closed",
                    device_id=client_id if is_device else None,
                    reason=exc.reason,
                    details={"message": exc.message}
                    if is_device
                    else {"message": exc.message, "service": client_id},
                )

    async def reload_templates(self) -> None:
        """SIGHUP, or a `jitp templates reload` seen in the registry: new templates, re-rendered configs."""
        try:
            templates = TemplateSet.load(self.config.templates_dir)
        except errors.ConfigError as exc:
            log.error("templates not reloaded (keeping the current ones): %s", exc)
            return
        events = await self.service.reload_templates(templates, actor="broker")
        self._templates_version = await self.service.registry.templates_version()
        log.info(
            "templates reloaded from %s: %d config-changed event(s)", self.config.templates_dir, len(events)
        )

    async def _trust_loop(self) -> None:
        last_report = time.monotonic()
        self._templates_version = await self.service.registry.templates_version()
        while True:
            await asyncio.sleep(self.config.trust.reload_interval)
            try:
                await self.service.flush_refusals()
                await self.service.registry.flush_seen()
                await self.service.refresh_trust()
                if self.service.issuer_ids:
                    await self.service.registry.expire_certificates(at=self.service.clock())
                if await self.service.registry.templates_version() != self._templates_version:
                    await self.reload_templates()
            except errors.ProvisioningError as exc:
                log.error("trust or template reload failed (keeping the current ones): %s", exc)
            if time.monotonic() - last_report > STALE_CRL_REPORT_INTERVAL:
                last_report = time.monotonic()
                self.service.report_stale_crls()


async def serve(config: Config, *, on_ready: Callable[[JitpServer], None] | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with JitpServer(config) as server:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(
                signal.SIGHUP, lambda: server.broker.spawn(server.reload_templates(), "reload")
            )
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
        log.info("shutting down")
