"""Seeing the fleet (issue 17): metrics, structured logs and real-time anomaly alerts.

The core calls one small port, :class:`~jitp.observability.port.Observer` (a no-op by default):
the provisioning service reports each join outcome, refusal, takeover and registry commit to it.
:class:`~jitp.observability.monitor.Monitor` is the broker node's observer: it feeds the Prometheus
metrics (:mod:`.metrics`, a registry per server) and the detectors (:mod:`.detectors`, pure, with
an injected clock), whose alerts :class:`~jitp.observability.monitor.AlertManager` de-duplicates,
audits, publishes on ``$jitp/alerts/<kind>`` and counts. Never imports amqtt.
"""
