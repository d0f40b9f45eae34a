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
from broker_plugins.compat import check_amqtt_internals
from broker_plugins.listener import Listener
from broker_plugins.publisher import OutboxPublisher
from broker_plugins.relay import WorkerRelay
from broker_plugins.tls import TlsContextHolder
from jitp import errors
from jitp.app.certificates import CertificateService
from jitp.app.service import Clock, ProvisioningService, utc_now
from jitp.config import Config, host_port
from jitp.domain.events import ProvisioningEvent
from jitp.domain.records import EventType
from jitp.domain.templates import TemplateSet
from jitp.observability.node import NodeObservability
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

    def __init__(
        self,
        config: Config,
        *,
        registry: Registry | None = None,
        clock: Clock = utc_now,
        relay: WorkerRelay | None = None,
    ) -> None:
        """``relay``: this node is a worker of `jitp serve --workers N` (see :mod:`broker_plugins.relay`)."""
        self.config = config
        self.relay = relay
        self._registry = registry
        self._clock = clock
        self.port: int | None = None
        self._broker: JitpBroker | None = None
        self._listener: Listener | None = None
        self._publisher: OutboxPublisher | None = None
        self._service: ProvisioningService | None = None
        self._tls: TlsContextHolder | None = None
        self._templates_version = 0
        self._observability: NodeObservability | None = None
        self.metrics_port: int | None = None

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
    def observability(self) -> NodeObservability:
        if self._observability is None:
            raise RuntimeError("the server is not started")
        return self._observability

    @property
    def tls(self) -> TlsContextHolder:
        if self._tls is None:
            raise RuntimeError("the server is not started")
        return self._tls

    async def start(self) -> None:
        check_amqtt_internals()
        cfg = self.config
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
        self._observability = observability = NodeObservability(cfg, self._registry, clock=self._clock)
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
                observer=observability.monitor,
            )
            self._service.on_trust_change(self._tls.update)
            self._service.on_trust_change(observability.trust_changed)
            self._service.on_trust_change(self._trust_changed)
            await self._service.refresh_trust(force=True)
            self.admin = AdminApi(
                self._service,
                templates_dir=cfg.templates_dir,
                route=lambda topic, data, qos, *, properties: self.broker.route(
                    topic, data, qos, properties=properties
                ),
            )
            self._broker = JitpBroker(cfg, service=self._service, admin=self.admin.handle)
            self.certificates = CertificateService(self._service, cfg.issuer)
            self._broker.certificates = self.certificates
            await self._broker.start()
            broker = self._broker
            observability.attach(
                publish=lambda topic, data: broker.route(topic, data, 1),
                connections=lambda: broker.connected_clients,
                service=self._service,
            )
            self._publisher = OutboxPublisher(cfg, self._service, self._broker, on_event=self.enforce)
            await self._publisher.start()
            if self.relay is not None:
                relay, publisher = self.relay, self._publisher
                self._broker.relay = relay
                self._service.on_new_events(relay.events_committed)
                await relay.start(self._broker, on_events=publisher.relayed)
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
            try:
                self.metrics_port = await observability.start()
            except errors.ConfigError:
                await self._listener.close()
                await self._publisher.stop()
                await self._broker.shutdown()
                self._broker = self._publisher = self._listener = None
                raise
        except BaseException:
            await self._registry.close()
            raise
        self._broker.spawn(self._trust_loop(), "jitp-trust-reload")
        # A worker's supervisor says it once for all of them.
        (log.info if self.relay is None else log.debug)(
            "jitp broker listening on %s:%d (mutual TLS)", host, self.port
        )

    async def stop(self) -> None:
        """Stop accepting, stop publishing events, deliver what was acknowledged, then close."""
        if self._listener is not None:
            await self._listener.close()
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None
        if self._broker is not None:
            await self._broker.drain()
        if self.relay is not None:
            self.relay.close()
        if self._listener is not None:
            if self._broker is not None:
                self._broker.say_goodbye()
            await self._listener.abort_all()
            self._listener = None
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
        if self._service is not None:
            await self._service.drain()
            await self._service.flush_refusals(force=True)
        if self._observability is not None:
            await self._observability.stop()
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


async def serve(
    config: Config,
    *,
    on_ready: Callable[[JitpServer], None] | None = None,
    relay: WorkerRelay | None = None,
) -> None:
    """Run until SIGINT or SIGTERM (or, for a worker, until its supervisor is gone), then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if relay is not None:
        relay.lost.clear()
        watch = loop.create_task(_stop_when(relay.lost, stop), name="jitp-supervisor-watch")
    async with JitpServer(config, relay=relay) as server:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(
                signal.SIGHUP, lambda: server.broker.spawn(server.reload_templates(), "reload")
            )
        if on_ready is not None:
            on_ready(server)
        if relay is not None:
            assert server.port is not None
            relay.ready(server.port)
        await stop.wait()
        if relay is not None and watch.done():
            log.error("the supervisor is gone: shutting down")
        log.info("shutting down")


async def _stop_when(event: asyncio.Event, stop: asyncio.Event) -> None:
    await event.wait()
    stop.set()
