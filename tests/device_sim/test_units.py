"""Unit tests: back-off schedule, MQTT encoding, fleet cache, report arithmetic, the CLI."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import json
import random
import ssl
from pathlib import Path

import pytest

from device_sim import Backoff, Fleet, create_fleet
from device_sim.cli import main
from device_sim.mqtt import (
    ConnectFailed,
    classify,
    connect_packet,
    decode_publish,
    publish_packet,
    read_packet,
)
from device_sim.report import JoinOutcome, Report, percentile
from tests.helpers import BrokerThread, Pki


def test_backoff_full_jitter_with_seeded_rng() -> None:
    policy = Backoff(base=0.5, cap=30.0, attempts=12)
    schedule = policy.delays(random.Random(1234))
    assert len(schedule) == 11
    assert schedule == policy.delays(random.Random(1234))  # reproducible
    assert schedule != policy.delays(random.Random(4321))
    for retry, delay in enumerate(schedule):
        assert 0.0 <= delay <= min(30.0, 0.5 * 2**retry)
    assert [policy.ceiling(i) for i in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.ceiling(10_000) == 30.0
    with pytest.raises(ValueError):
        Backoff(attempts=0)


def test_backoff_is_jittered_not_fixed() -> None:
    rng = random.Random(99)
    delays = {round(Backoff().delay(3, rng), 6) for _ in range(50)}
    assert len(delays) > 40 and max(delays) <= 4.0


def test_mqtt_packets_round_trip() -> None:
    packet = connect_packet("dev-1", keepalive=30, clean=True)
    assert packet[0] == 0x10 and b"MQTT\x04\x02\x00\x1e\x00\x05dev-1" in packet
    payload = b"x" * 300  # remaining length needs two bytes

    async def parse() -> tuple[int, int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(publish_packet("devices/dev-1/t", payload, qos=1, packet_id=7))
        reader.feed_eof()
        return await read_packet(reader)

    kind, flags, body = asyncio.run(parse())
    assert kind == 3
    assert decode_publish(flags, body) == ("devices/dev-1/t", 1, 7, payload)


def test_classify_failures() -> None:
    assert classify(TimeoutError()).reason == "timeout"
    assert classify(ConnectionResetError()).reason == "reset"
    assert classify(asyncio.IncompleteReadError(b"", 1)).reason == "eof"
    err = ssl.SSLError(1, "alert")
    err.reason = "SSLV3_ALERT_CERTIFICATE_EXPIRED"  # type: ignore[misc]
    assert classify(err).reason == "tls:certificate_expired"
    assert classify(ConnectFailed("connack:3")).reason == "connack:3"


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) is None


def test_report_counts_failures() -> None:
    outcomes = (
        JoinOutcome("a", "ok", 1, (), 0.0, 0.01),
        JoinOutcome("b", "connack:5", 1),
        JoinOutcome("c", "ok", 3, ("connack:3", "connack:3"), 0.0, 0.02),
    )
    report = Report(scenario="storm", target="x:1", concurrency=2, outcomes=outcomes, duration=1.0)
    assert report.joined == 2 and report.failures == {"connack:5": 1} and report.retries == {"connack:3": 2}
    assert not report.ok and "connack:5" in report.table()


def test_fleet_is_cached(pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    first = create_fleet(pki.layout.dir, 5, out, prefix="cache-")
    stamp = first.devices[0].cert.stat().st_mtime_ns
    again = create_fleet(pki.layout.dir, 5, out, prefix="cache-")
    assert again == first and again.devices[0].cert.stat().st_mtime_ns == stamp
    assert [d.device_id for d in Fleet.load(out).devices] == [f"cache-{i:05d}" for i in range(1, 6)]
    bigger = create_fleet(pki.layout.dir, 6, out, prefix="cache-")
    assert len(bigger) == 6


def test_cli_fleet_and_storm(
    broker: BrokerThread,
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CLI shrinks asyncio's TLS read buffer process-wide; restore it for the tests that follow.
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    out = tmp_path / "fleet"
    assert (
        main(
            [
                "fleet",
                "create",
                "--pki",
                str(pki.layout.dir),
                "--count",
                "8",
                "--out",
                str(out),
                "--prefix",
                "cli-",
            ]
        )
        == 0
    )
    layout = pki.layout
    report = tmp_path / "report.json"
    code = main(
        [
            "storm",
            "--port",
            str(broker.port),
            "--ca",
            str(layout.root_cert),
            "--fleet",
            str(out),
            "-c",
            "4",
            "--service-cert",
            str(layout.service_client_cert),
            "--service-key",
            str(layout.service_client_key),
            "--data-dir",
            str(broker.config.data_dir),
            "--json",
            str(report),
            "--histogram",
            str(tmp_path / "h.png"),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.out
    assert "connect->CONNACK" in captured.out
    doc = json.loads(report.read_text())
    assert doc["joined"] == 8 and doc["events"]["seen"] == 8 and doc["ok"] is True
    code = main(
        [
            "reconnect",
            "--port",
            str(broker.port),
            "--ca",
            str(layout.root_cert),
            "--fleet",
            str(out),
            "--data-dir",
            str(broker.config.data_dir),
            "--service-cert",
            str(layout.service_client_cert),
            "--service-key",
            str(layout.service_client_key),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().out
