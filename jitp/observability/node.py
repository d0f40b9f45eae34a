"""A broker node's observability, assembled: metrics, detectors, alerts and the metrics listener.

The server builds one :class:`NodeObservability` from the config, passes :attr:`monitor` to the
provisioning service as its observer, connects :meth:`attach` to the broker once it runs, and
calls :meth:`refresh` periodically (gauges from the registry, expiry checks, coalesced alerts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import datetime

from jitp import errors
from jitp.app.service import ProvisioningService
from jitp.config import Config, host_port
from jitp.domain.alerts import Alert, AlertKind
from jitp.domain.records import Command
from jitp.observability.detectors import BurstRule, CloneRule, ExpiryRule, SpikeRule, check_expiry
from jitp.observability.http import HttpListener, Request, Response
from jitp.observability.metrics import CONTENT_TYPE, EXPIRING_WITHIN, Metrics
from jitp.observability.monitor import Action, AlertManager, Monitor, Publish
from jitp.registry import Registry
from jitp.trust import Role, TrustStore

log = logging.getLogger("jitp.observability")

ALERT_ACTOR = "broker:alerts"
NATS_SINK = "nats"  # jitp.integration.nats_sink.SINK_NAME (not imported: nats-py stays optional here)


class NodeObservability:
    def __init__(self, config: Config, registry: Registry, *, clock: Callable[[], datetime]) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        a = config.alerts
        self.metrics = Metrics()  # always: cheap, and `jitp status` on a node reads it too
        self.alerts = (
            AlertManager(
                registry, coalesce_window=a.coalesce_window, long_window=a.expiry_window, metrics=self.metrics
            )
            if a.enabled
            else None
        )
        self.monitor = Monitor(
            clock=clock,
            metrics=self.metrics,
            alerts=self.alerts,
            clone=CloneRule(a.clone_takeovers, a.clone_window, a.clone_different_host),
            burst=BurstRule(a.burst_refusals, a.burst_window, a.burst_v4_prefix, a.burst_v6_prefix),
            spike=SpikeRule(a.spike_bucket, a.spike_factor, a.spike_min_joins),
        )
        self.expiry = ExpiryRule(a.expiry_ca_days, a.expiry_crl_hours, a.expiry_device_days)
        self.http: HttpListener | None = None
        self._service: ProvisioningService | None = None
        self._ca_not_after: dict[str, datetime] = {}
        self._crl_next_update: dict[str, datetime | None] = {}
        self._task: asyncio.Task[None] | None = None

    def attach(
        self,
        *,
        publish: Publish,
        connections: Callable[[], int],
        service: ProvisioningService,
    ) -> None:
        """Connect to the running node: where alerts are published, the live gauges, the actions."""
        self._service = service
        self.metrics.watch(connections, lambda: service.gate.waiting)
        if self.alerts is None:
            return
        self.alerts.publish = publish
        a = self.config.alerts

        async def quarantine(alert: Alert) -> None:
            if alert.device_id is not None:
                why = f"cloned certificate (alert {alert.alert_id})"
                await service.apply(Command.QUARANTINE, alert.device_id, actor=ALERT_ACTOR, reason=why)

        async def pause(alert: Alert) -> None:
            if alert.ca is not None:
                service.pause_ca(
                    alert.ca, f"provisioning spike, alert {alert.alert_id}; `jitp alerts ack` resumes"
                )

        actions: dict[AlertKind, Action] = {}
        if a.clone_action == "quarantine":
            actions[AlertKind.CLONED_CERTIFICATE] = quarantine
        if a.spike_action == "pause":
            actions[AlertKind.PROVISIONING_SPIKE] = pause
        self.alerts.actions = actions

    async def start(self) -> int | None:
        """The metrics listener (``metrics.bind``) and the refresh loop. The listener's port, if any."""
        port = None
        if self.config.metrics.bind is not None:
            host, wanted = host_port(self.config.metrics.bind)
            prefixes = {}
            if self.config.metrics.console and self._service is not None:
                from jitp.console.app import Console
                from jitp.console.auth import KEY_FILE

                console = Console(
                    self._service,
                    templates_dir=self.config.templates_dir,
                    key_path=self.config.keys_dir / KEY_FILE,
                    clock=self.clock,
                )
                prefixes["/console"] = console.handle
            self.http = HttpListener({"/metrics": self._scrape, "/status.json": self._status}, prefixes)
            try:
                port = await self.http.start(host, wanted)
            except OSError as exc:
                raise errors.ConfigError(
                    f"cannot listen on {host}:{wanted}: {exc.strerror}", key="metrics.bind"
                ) from None
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="jitp-observability")
        return port

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.http is not None:
            await self.http.close()
        if self.alerts is not None:
            await self.alerts.drain()
            await self.alerts.flush(self.clock(), force=True)

    async def _loop(self) -> None:
        """Refresh at once (the gauges exist from the first scrape), then every refresh_interval."""
        while True:
            try:
                await self.refresh()
            except errors.ProvisioningError as exc:
                log.error("metrics refresh failed: %s", exc)
            await asyncio.sleep(self.config.metrics.refresh_interval)

    def trust_changed(self, trust: TrustStore) -> None:
        """New trust snapshot: the expiry of each device CA and of each CRL in force."""
        self._ca_not_after = {
            a.ca_id: a.certificate.not_valid_after_utc for a in trust.anchors if a.role is Role.DEVICE
        }
        self._crl_next_update = trust.crl_next_updates()

    async def refresh(self) -> None:
        """Gauges from the registry; expiry alerts; coalesced alerts written."""
        now = self.clock()
        stats = await self.registry.fleet_stats()
        nats_lag = 0
        if self.config.nats.enabled:
            nats_lag = max(0, await self.registry.outbox_head() - await self.registry.sink_cursor(NATS_SINK))
        if self.alerts is not None:
            await self.alerts.flush(now)
            expiring_by_ca = {
                ca: stats.expiring(now, self.expiry.device_days, ca=ca) for ca in self._ca_not_after
            }
            for signal in check_expiry(
                self.expiry,
                now=now,
                ca_not_after=self._ca_not_after,
                crl_next_update=self._crl_next_update,
                devices_expiring=expiring_by_ca,
            ):
                self.alerts.signal(signal)
        self.metrics.set_fleet(
            devices=stats.devices,
            expiring={w: stats.expiring(now, days) for w, days in EXPIRING_WITHIN.items()},
            outbox_pending=stats.outbox_pending,
            outbox_oldest_seconds=max(0.0, (now - stats.outbox_oldest).total_seconds())
            if stats.outbox_oldest
            else 0.0,
            nats_lag=nats_lag,
            ca_not_after=self._ca_not_after,
            crl_next_update=self._crl_next_update,
        )

    async def _scrape(self, _: Request) -> Response:
        return Response(200, self.metrics.exposition(), CONTENT_TYPE)

    async def _status(self, _: Request) -> Response:
        from jitp.app.status import fleet_status  # the same summary as `jitp status`

        doc = await fleet_status(self.registry, now=self.clock())
        return Response(200, json.dumps(doc, sort_keys=True).encode(), "application/json")
