"""The metrics registry, the alert manager's coalescing, and the dashboard's queries."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from jitp.domain.alerts import AlertKind, Severity, Signal, ack_draft, alerts_from_audit
from jitp.domain.audit import AuditDraft, chain
from jitp.observability.metrics import Metrics
from jitp.observability.monitor import AlertManager, Monitor
from jitp.observability.port import JoinOutcome

ROOT = Path(__file__).resolve().parents[3]
T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def families(metrics: Metrics) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}


def test_each_server_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    Monitor(clock=lambda: T0, metrics=a).joined(
        JoinOutcome.PROVISIONED, at=T0, ca="c", template="t", region="r"
    )
    joins_a = [s for s in families(a)["jitp_joins"].samples if s.name == "jitp_joins_total"]
    joins_b = [s for s in families(b)["jitp_joins"].samples if s.name == "jitp_joins_total"]
    assert [(s.labels["outcome"], s.value) for s in joins_a] == [("provisioned", 1.0)]
    assert joins_b == []


def test_the_dashboard_and_the_rules_use_only_exposed_metrics() -> None:
    exposed = set(families(Metrics()))
    dashboard = json.loads((ROOT / "deploy/grafana/jitp-dashboard.json").read_text())
    texts = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    texts.append((ROOT / "deploy/prometheus/jitp-alerts.yml").read_text())
    used = {
        re.sub(r"_(total|bucket|count|sum)$", "", m) for t in texts for m in re.findall(r"jitp_[a-z_]+", t)
    }
    assert used and used <= exposed, used - exposed
    assert {"jitp_joins", "jitp_alerts", "jitp_devices", "jitp_join_seconds"} <= used


class FakeRegistry:
    def __init__(self) -> None:
        self.drafts: list[AuditDraft] = []

    async def append_audit(self, drafts: list[AuditDraft]) -> None:
        self.drafts += drafts

    async def get_device(self, device_id: str) -> None:
        return None


def test_alerts_are_coalesced_and_keep_their_id() -> None:
    registry = FakeRegistry()
    published: list[tuple[str, bytes]] = []
    metrics = Metrics()

    async def go() -> None:
        manager = AlertManager(registry, coalesce_window=60, long_window=3600, metrics=metrics)  # type: ignore[arg-type]
        manager.publish = lambda topic, data: published.append((topic, data))
        for i in range(5):
            manager.signal(
                Signal(AlertKind.REFUSAL_BURST, "ca:x", Severity.WARNING, T0 + timedelta(seconds=i), ca="x")
            )
        await manager.drain()
        assert await manager.flush(T0 + timedelta(seconds=10)) == 1  # the new count, window still open
        assert await manager.flush(T0 + timedelta(seconds=61)) == 0  # nothing new: closed
        manager.signal(
            Signal(AlertKind.REFUSAL_BURST, "ca:x", Severity.WARNING, T0 + timedelta(seconds=70), ca="x")
        )
        await manager.drain()

    asyncio.run(go())
    docs = [json.loads(d) for _, d in published]
    assert [d["count"] for d in docs] == [1, 5, 1]
    assert docs[0]["alert_id"] == docs[1]["alert_id"] != docs[2]["alert_id"]
    assert {t for t, _ in published} == {"$jitp/alerts/refusal_burst"}
    samples = families(metrics)["jitp_alerts"].samples
    assert [s.value for s in samples if s.name == "jitp_alerts_total"] == [2.0]
    # the audit trail holds them: two alerts, the first with its coalesced count; an ack closes it
    drafts = [
        *registry.drafts,
        ack_draft(docs[0]["alert_id"], actor="operator:alice", at=T0 + timedelta(minutes=5)),
    ]
    alerts = alerts_from_audit(chain(drafts, start_seq=1, prev_hash="0" * 64))
    assert [(a.count, a.open) for a in alerts] == [(5, False), (1, True)]
    assert alerts[0].acked_by == "operator:alice"


# Whole milliseconds: times are datetimes (microsecond resolution), so the model must not see
# sub-microsecond offsets that a timedelta would round away.
@given(
    st.lists(
        st.integers(min_value=0, max_value=2_000_000).map(lambda ms: ms / 1000), min_size=1, max_size=40
    ),
    st.integers(min_value=1000, max_value=300_000).map(lambda ms: ms / 1000),
)
def test_alerts_open_once_per_window_and_count_every_signal(offsets: list[float], window: float) -> None:
    """Against a reference model: a signal opens a new alert iff it comes ``window`` or more after
    the first signal of the current alert; every signal is counted in exactly one alert."""
    times = sorted(offsets)
    expected: list[int] = []
    start: float | None = None
    for t in times:
        if start is None or t - start >= window:
            start = t
            expected.append(0)
        expected[-1] += 1

    async def go() -> list[int]:
        manager = AlertManager(FakeRegistry(), coalesce_window=window, long_window=window)  # type: ignore[arg-type]
        alerts = [
            manager.signal(
                Signal(AlertKind.REFUSAL_BURST, "net:x", Severity.WARNING, T0 + timedelta(seconds=t))
            )
            for t in times
        ]
        await manager.drain()
        final: dict[str, int] = {}
        for alert in alerts:
            final[alert.alert_id] = alert.count
        return list(final.values())

    assert asyncio.run(go()) == expected


def test_configure_installs_json_lines_with_redaction(capsys: Any) -> None:
    import logging

    from jitp.observability import logs

    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        logs.configure("info", fmt="json", pseudonymous=True)
        logging.getLogger("jitp.test").warning(
            "device %s joined", "dev-9", extra={"device": "dev-9", "event": "x"}
        )
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert line["event"] == "x" and line["device"].startswith("dref:") and "dev-9" not in line["message"]
    finally:
        root.handlers, root.level = saved, level
