"""Prometheus metrics of one broker node, in a registry of its own (never the process-global one,
so several servers in one process each expose exactly their own).

Label values are CA ids, template names, regions, reason codes and outcomes: never device ids
(cardinality, and privacy). Counters are updated on the connection path (a dictionary lookup and
an add under prometheus-client's lock); gauges that need the registry (devices by status, outbox,
expiry) are set by :meth:`Metrics.set_fleet`, from the server's periodic refresh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from jitp.observability.port import JoinOutcome

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a join is ~3-10 ms of CPU, but under a storm it waits (admission queue, group commit).
JOIN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
EXPIRING_WITHIN = {"7d": 7.0, "30d": 30.0}  # jitp_devices_cert_expiring{within}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.joins = Counter(
            "jitp_joins",
            "Connect admissions by outcome (provisioned, reconnected, refused, shed)",
            ("outcome", "reason", "ca", "template", "region"),
            registry=r,
        )
        self.limits = Counter(
            "jitp_limits", "Limits hit by connected clients, by reason", ("reason",), registry=r
        )
        self.takeovers = Counter(
            "jitp_takeovers", "Session takeovers (a second connection of a client)", registry=r
        )
        self.join_seconds = Histogram(
            "jitp_join_seconds", "Accept to CONNACK", ("outcome",), buckets=JOIN_BUCKETS, registry=r
        )
        self.admit_seconds = Histogram(
            "jitp_admit_seconds",
            "Admission decision (verify, identity, registry) of one CONNECT",
            ("outcome",),
            buckets=JOIN_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "jitp_registry_commit_seconds",
            "One provisioning write, request to committed record (group commit included)",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.connections = Gauge("jitp_connections", "Connected, admitted clients", registry=r)
        self.queue_depth = Gauge(
            "jitp_admission_queue_depth", "First joins waiting for a provisioning worker", registry=r
        )
        self.devices = Gauge(
            "jitp_devices", "Device records by status and region", ("status", "region"), registry=r
        )
        self.outbox_pending = Gauge("jitp_outbox_pending", "Events not yet delivered to MQTT", registry=r)
        self.outbox_oldest = Gauge(
            "jitp_outbox_oldest_seconds", "Age of the oldest undelivered event (0: none)", registry=r
        )
        self.nats_lag = Gauge(
            "jitp_nats_lag_events", "Outbox events the NATS sink has not sent (0 without NATS)", registry=r
        )
        self.alerts = Counter("jitp_alerts", "Alerts raised, by kind", ("kind",), registry=r)
        self.ca_not_after = Gauge(
            "jitp_ca_not_after_timestamp_seconds",
            "Expiry of each registered CA certificate",
            ("ca",),
            registry=r,
        )
        self.crl_next_update = Gauge(
            "jitp_crl_next_update_timestamp_seconds",
            "nextUpdate of each CA's CRL in force",
            ("ca",),
            registry=r,
        )
        self.cert_expiring = Gauge(
            "jitp_devices_cert_expiring",
            "Active devices whose certificate expires within a period",
            ("within",),
            registry=r,
        )
        for outcome in JoinOutcome:  # every outcome exists from the start (rate() needs a zero)
            self.join_seconds.labels(outcome=str(outcome))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def watch(self, connections: Callable[[], int], queue_depth: Callable[[], int]) -> None:
        """Gauges read at scrape time from the live broker."""
        self.connections.set_function(lambda: float(connections()))
        self.queue_depth.set_function(lambda: float(queue_depth()))

    def set_fleet(
        self,
        *,
        devices: Mapping[tuple[str, str], int],
        expiring: Mapping[str, int],
        outbox_pending: int,
        outbox_oldest_seconds: float,
        nats_lag: int,
        ca_not_after: Mapping[str, datetime],
        crl_next_update: Mapping[str, datetime | None],
    ) -> None:
        self.devices.clear()
        for (status, region), count in devices.items():
            self.devices.labels(status=status, region=region).set(count)
        for within, count in expiring.items():
            self.cert_expiring.labels(within=within).set(count)
        self.outbox_pending.set(outbox_pending)
        self.outbox_oldest.set(outbox_oldest_seconds)
        self.nats_lag.set(nats_lag)
        self.ca_not_after.clear()
        for ca, when in ca_not_after.items():
            self.ca_not_after.labels(ca=ca).set(when.timestamp())
        self.crl_next_update.clear()
        for ca, next_update in crl_next_update.items():
            if next_update is not None:
                self.crl_next_update.labels(ca=ca).set(next_update.timestamp())
