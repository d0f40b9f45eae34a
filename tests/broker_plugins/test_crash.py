"""SIGKILL the broker in the middle of a 2,000-device storm, then restart it on the same data dir.

Every device that got CONNACK 0 has its record and exactly one provisioned event, with the
event_id a subscriber saw before the crash; no record exists without its event; after the
restart every pending event is delivered, with its original event_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from device_sim import Fleet, Report, Target, create_fleet, run_storm
from device_sim.backoff import NO_RETRY
from jitp.registry.sqlite import SQLiteRegistry
from tests.helpers import Pki, client_context, connect, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FLEET = 2000
KILL_AFTER = 600  # provisioned events seen by the subscriber


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "jitp.cli", *args], cwd=ROOT, check=True, capture_output=True)


class Broker:
    def __init__(self, data: Path, port: int, pki: Pki, log: Path) -> None:
        self.data, self.port, self.pki, self.log = data, port, pki, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        layout = self.pki.layout
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jitp.cli", "serve", "--data-dir", str(self.data),
                 "--bind", f"127.0.0.1:{self.port}", "--server-cert", str(layout.server_cert),
                 "--server-key", str(layout.server_key)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        proc = self.proc

        def accepting() -> bool:
            assert proc.poll() is None, self.log.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return False
            return True

        assert wait_until(accepting, 20, interval=0.05), "the broker did not start"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Subscriber:
    """The ingest service: records (device_id, event_id) of every provisioned event it receives."""

    def __init__(self, port: int, pki: Pki) -> None:
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        layout = pki.layout
        ctx = client_context(pki, None)
        ctx.load_cert_chain(str(layout.dir / "service-client.pem"), str(layout.dir / "service-client.key"))
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="ingest-service", protocol=mqtt.MQTTv311
        )
        self.client.tls_set_context(ctx)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("$jitp/events/provisioned/#", 1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        with self.lock:
            self.seen.append((doc["device_id"], doc["event_id"]))

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def device_ids(self) -> set[str]:
        with self.lock:
            return {device_id for device_id, _ in self.seen}

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


async def _stored(path: Path) -> tuple[dict[str, Any], list[Any], list[Any]]:
    registry = SQLiteRegistry(path)
    await registry.open()
    try:
        devices = {d.device_id: d for d in await registry.list_devices()}
        return devices, await registry.events(), await registry.pending_events(100_000)
    finally:
        await registry.close()


@pytest.fixture(scope="module")
def crash_fleet(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return create_fleet(pki.layout.dir, FLEET, tmp_path_factory.mktemp("crash") / "fleet", prefix="crash-")


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    data = tmp_path / "data"
    _cli("ca", "register", str(pki.layout.manufacturer_cert), "--data-dir", str(data))
    _cli("ca", "register", str(pki.layout.service_ca_cert), "--role", "service", "--data-dir", str(data))
    b = Broker(data, _free_port(), pki, tmp_path / "broker.log")
    b.start()
    try:
        yield b
    finally:
        b.stop()


def test_sigkill_mid_storm_loses_no_acknowledged_join_and_keeps_event_ids(
    broker: Broker, pki: Pki, crash_fleet: Fleet
) -> None:
    before = Subscriber(broker.port, pki)
    target = Target("127.0.0.1", broker.port, ca=pki.layout.root_cert)
    result: list[Report] = []
    storm = threading.Thread(
        target=lambda: result.append(
            asyncio.run(run_storm(target, crash_fleet, concurrency=200, backoff=NO_RETRY, event_timeout=1))
        )
    )
    storm.start()
    assert wait_until(lambda: before.count() >= KILL_AFTER, 30, interval=0.005), "the storm did not get going"
    broker.kill()
    storm.join(60)
    before.close()
    [report] = result
    joined = {o.device_id for o in report.outcomes if o.joined}
    assert KILL_AFTER <= len(joined) < FLEET, report.table()  # the kill really hit mid-storm

    registry_path = broker.data / "registry.db"
    devices, events, pending = asyncio.run(_stored(registry_path))
    provisioned: dict[str, list[str]] = {}
    for e in events:
        if e.type == "provisioned":
            provisioned.setdefault(e.device_id, []).append(e.event_id)
    # Every device that got CONNACK 0 has its record and exactly one event.
    assert joined <= set(devices), sorted(joined - set(devices))[:5]
    assert all(len(provisioned.get(d, [])) == 1 for d in joined)
    # No record without its event, no event without its record.
    assert set(devices) == set(provisioned)
    assert all(len(ids) == 1 for ids in provisioned.values())
    # What the subscriber saw before the crash carries the stored event_ids.
    stored_id = {d: ids[0] for d, ids in provisioned.items()}
    assert before.seen and all(stored_id.get(d) == eid for d, eid in before.seen)

    # Restart on the same data dir: the pending events go out with their original ids.
    broker.start()
    after = Subscriber(broker.port, pki)
    try:
        still: list[Any] = []

        def delivered() -> bool:
            still[:] = asyncio.run(_stored(registry_path))[2]
            return not still

        assert wait_until(delivered, 10, interval=0.2), (
            f"{len(still)} event(s) still pending after the restart"
        )
        # Witness that every redelivery has reached the subscriber: a new device joins after them;
        # its event is routed behind theirs, on the same connection.
        marker = connect(broker.port, pki, pki.device("crash-marker"))
        marker.close()
        assert marker.rc == 0, marker.error
        assert wait_until(lambda: "crash-marker" in after.device_ids(), 10), "no marker event"
        with after.lock:
            redelivered = [(d, eid) for d, eid in after.seen if d != "crash-marker"]
        assert all(stored_id.get(d) == eid for d, eid in redelivered)
        pending_ids = {(e.device_id, e.event_id) for e in pending if e.type == "provisioned"}
        assert set(redelivered) <= pending_ids | set(stored_id.items())
        print(
            f"\ncrash: {len(joined)} CONNACK 0 before SIGKILL, {len(devices)} records, "
            f"{len(pending)} event(s) pending at the crash, {len(redelivered)} redelivered to a new subscriber"
        )
    finally:
        after.close()
