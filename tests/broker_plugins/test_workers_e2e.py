"""`jitp serve --workers 2`: real processes on one port, real TLS, real paho clients.

Which worker a client landed on is asked of the supervisor (SIGUSR1: each worker logs its node id
and connected clients); clients are added until both workers have some of each kind, so every
test really crosses workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker_plugins.workers import Supervisor
from jitp import errors
from tests.helpers import Conn, Identity, Pki, client_context, connect, test_config, wait_until

ROOT = Path(__file__).resolve().parents[2]
MAX_TRIES = 40  # clients added while looking for one on each worker (each lands on either: 2^-40)


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "jitp.cli", *args], cwd=ROOT, check=True, capture_output=True)


class Cluster:
    """`jitp serve --workers N` as a process, with its log."""

    def __init__(self, data: Path, pki: Pki, log: Path, *extra: str, workers: int = 2) -> None:
        self.data, self.pki, self.log_path, self.workers = data, pki, log, workers
        layout = pki.layout
        self.argv = [
            sys.executable, "-m", "jitp.cli", "serve", "--data-dir", str(data), "--bind", "127.0.0.1:0",
            "--server-cert", str(layout.server_cert), "--server-key", str(layout.server_key),
            "--workers", str(workers), *extra,
        ]  # fmt: skip
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        found = self.wait_log(r"jitp broker listening on 127\.0\.0\.1:(\d+) \(mutual TLS, (\d+) workers\)")
        self.port = int(found[0][0])
        assert int(found[0][1]) == workers

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 30) -> list[tuple[str, ...]]:
        """The matches of ``pattern`` in the log, once there are ``count`` of them."""
        found: list[tuple[str, ...]] = []

        def enough() -> bool:
            assert self.proc.poll() is None or count == 0, self.log()[-3000:]
            found[:] = [m if isinstance(m, tuple) else (m,) for m in re.findall(pattern, self.log())]
            return len(found) >= count

        assert wait_until(enough, timeout, interval=0.05), f"no {pattern!r} in\n{self.log()[-3000:]}"
        return found

    def pids(self) -> dict[str, int]:
        """The current pid of each worker (the newest start)."""
        return {name: int(pid) for name, pid in re.findall(r"worker (w\d+) started \(pid (\d+)", self.log())}

    def placement(self) -> dict[str, set[str]]:
        """node id -> client ids connected there, asked of every worker now (SIGUSR1)."""
        before = len(re.findall(r"worker status: ", self.log()))
        self.proc.send_signal(signal.SIGUSR1)
        lines = self.wait_log(r"worker status: (\{.*\})", before + self.workers)
        docs = [json.loads(line[0]) for line in lines[before:]]
        return {doc["node"]: set(doc["clients"]) for doc in docs}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return self.proc.returncode


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def data(tmp_path: Path, pki: Pki) -> Path:
    data = tmp_path / "data"
    _cli("ca", "register", str(pki.layout.manufacturer_cert), "--data-dir", str(data))
    _cli("ca", "register", str(pki.layout.service_ca_cert), "--role", "service", "--data-dir", str(data))
    return data


@pytest.fixture
def cluster(data: Path, pki: Pki, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(data, pki, tmp_path / "serve.log")
    try:
        yield c
    finally:
        c.stop()


def _node_of(placement: dict[str, set[str]], client_id: str) -> str | None:
    return next((node for node, clients in placement.items() if client_id in clients), None)


def _spread(
    cluster: Cluster, make: Callable[[int], Conn], *, have: dict[str, Conn] | None = None
) -> dict[str, Conn]:
    """Connect clients (``make(i)``) until there is one on every worker: node id -> a client there."""
    have = dict(have or {})
    made: list[Conn] = []
    for i in range(MAX_TRIES):
        conn = make(i)
        assert conn.rc == 0, conn.error
        made.append(conn)
        placement = cluster.placement()
        for c in made:
            node = _node_of(placement, str(c.client._client_id.decode()))
            if node is not None and node not in have:
                have[node] = c
        if len(have) == cluster.workers:
            return have
    raise AssertionError(f"{MAX_TRIES} clients all on the same worker")


def _one_node(cluster: Cluster, client_id: str, out: list[str]) -> bool:
    """True when ``client_id`` is connected on exactly one worker (``out``: the nodes it is on)."""
    out[:] = [node for node, ids in cluster.placement().items() if client_id in ids]
    return len(out) == 1


def _service(cluster: Cluster, pki: Pki, name: str, *topics: str) -> Conn:
    conn = connect(cluster.port, pki, pki.service(name))
    if conn.rc == 0:
        for topic in topics:
            assert conn.subscribe(topic, 1) == [1]
    return conn


def _topics(conn: Conn) -> list[str]:
    return [m.topic for m in list(conn.messages)]


def test_two_workers_route_events_telemetry_and_retained_across_workers(
    cluster: Cluster, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    run = uuid.uuid4().hex[:6]
    services = _spread(
        cluster,
        lambda i: clients(
            _service(cluster, pki, f"svc-{run}-{i}", "$jitp/events/provisioned/#", "devices/#")
        ),
    )
    devices: dict[str, Identity] = {}

    def device(i: int) -> Conn:
        ident = devices.setdefault(f"dev-{run}-{i}", pki.device(f"dev-{run}-{i}"))
        return clients(connect(cluster.port, pki, ident))

    on = _spread(cluster, device)
    assert set(on) == set(services) and len(on) == 2
    every = set(devices)
    # Every service sees every device's provisioned event, whichever worker provisioned it.
    for svc in services.values():
        assert wait_until(
            lambda svc=svc: (
                {t.rsplit("/", 1)[1] for t in _topics(svc) if t.startswith("$jitp/events/")} >= every
            ),
            15,
        ), _topics(svc)
    # Telemetry from a device on each worker reaches the services on both, at the QoS subscribed.
    for node, dev in on.items():
        dev_id = dev.client._client_id.decode()
        info = dev.client.publish(f"devices/{dev_id}/telemetry", f"from {node}".encode(), qos=1)
        info.wait_for_publish(5)
    for svc in services.values():
        assert wait_until(lambda svc=svc: sum(t.endswith("/telemetry") for t in _topics(svc)) == 2, 10), (
            _topics(svc)
        )
        got = {m.payload.decode(): m.qos for m in list(svc.messages) if m.topic.endswith("/telemetry")}
        assert got == {f"from {node}": 1 for node in on}

    # A retained message set on one worker is found by a subscriber on either.
    dev_a, dev_b = on.values()
    a_id, b_id = dev_a.client._client_id.decode(), dev_b.client._client_id.decode()
    dev_a.client.publish(f"devices/{a_id}/state", b"on", qos=1, retain=True).wait_for_publish(5)
    dev_b.client.publish(f"devices/{b_id}/state", b"old", qos=1, retain=True).wait_for_publish(5)
    dev_b.client.publish(f"devices/{b_id}/state", b"", qos=1, retain=True).wait_for_publish(5)  # cleared

    def late(i: int) -> Conn:
        return clients(_service(cluster, pki, f"late-{run}-{i}", "devices/+/state"))

    # The last telemetry of each service arrived after the retained ones were set (it was published
    # later on the same connections): a new subscriber sees the retained state of both workers.
    late_ones = _spread(cluster, late)
    barrier = b"barrier"
    for svc in late_ones.values():
        assert wait_until(lambda svc=svc: f"devices/{a_id}/state" in _topics(svc), 10), _topics(svc)
    # A live message behind the retained ones: once it is in, every retained message is too.
    dev_a.client.publish(f"devices/{a_id}/state", barrier, qos=1).wait_for_publish(5)
    for svc in late_ones.values():
        assert wait_until(lambda svc=svc: any(m.payload == barrier for m in list(svc.messages)), 10)
        state = [(m.topic, m.payload, m.retain) for m in list(svc.messages)]
        assert state == [(f"devices/{a_id}/state", b"on", True), (f"devices/{a_id}/state", barrier, False)]


def _connect5(cluster: Cluster, pki: Pki, ident: Identity, *filters: str) -> Conn:
    """A paho MQTT 5 client subscribed to ``filters`` (with Retain As Published, unless shared)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=ident.name, protocol=mqtt.MQTTv5, reconnect_on_failure=False
    )
    client.tls_set_context(client_context(pki, ident))
    conn = Conn(rc=None, client=client)
    connected, subscribed = threading.Event(), threading.Event()

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        conn.rc = rc.value
        connected.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.set()
    client.on_message = lambda c, u, m: conn.messages.append(m)
    client.connect("127.0.0.1", cluster.port, keepalive=30)
    client.loop_start()
    assert connected.wait(10) and conn.rc == 0, conn.rc
    if filters:
        client.subscribe(
            [(f, SubscribeOptions(qos=1, retainAsPublished=not f.startswith("$share/"))) for f in filters]
        )
        assert subscribed.wait(10), "no SUBACK"
    return conn


def test_mqtt5_properties_and_retain_as_published_cross_workers(
    cluster: Cluster, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Issue 15: a v5 message routed to the other worker keeps its properties and, for a Retain As
    Published subscriber, its RETAIN flag; a retained one found there keeps its properties too."""
    run = uuid.uuid4().hex[:6]
    services = _spread(
        cluster, lambda i: clients(_connect5(cluster, pki, pki.service(f"s5-{run}-{i}"), "devices/+/state"))
    )
    devices = _spread(cluster, lambda i: clients(_connect5(cluster, pki, pki.device(f"d5-{run}-{i}"))))
    for node, dev in devices.items():
        dev_id = dev.client._client_id.decode()
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("origin", node), ("origin", "again")]
        props.ContentType = "application/json"
        props.CorrelationData = b"\x00" + node.encode()
        props.ResponseTopic = f"devices/{dev_id}/reply"
        props.MessageExpiryInterval = 3600
        dev.client.publish(
            f"devices/{dev_id}/state", b'{"on":1}', qos=1, retain=True, properties=props
        ).wait_for_publish(5)

    def seen(conn: Conn) -> dict[str, Any]:
        return {m.properties.UserProperty[0][1]: m for m in list(conn.messages) if m.properties}

    for svc in services.values():
        assert wait_until(lambda svc=svc: set(seen(svc)) == set(devices), 10), _topics(svc)
        for node, m in seen(svc).items():
            dev_id = devices[node].client._client_id.decode()
            p = m.properties
            assert (m.retain, m.qos, m.payload) == (True, 1, b'{"on":1}')
            assert p.UserProperty == [("origin", node), ("origin", "again")]
            assert (p.ContentType, p.CorrelationData) == ("application/json", b"\x00" + node.encode())
            assert p.ResponseTopic == f"devices/{dev_id}/reply"
            assert 3500 < p.MessageExpiryInterval <= 3600

    # A new subscriber on each worker gets both retained messages, with their properties.
    late = _spread(
        cluster, lambda i: clients(_connect5(cluster, pki, pki.service(f"l5-{run}-{i}"), "devices/+/state"))
    )
    for svc in late.values():
        assert wait_until(lambda svc=svc: set(seen(svc)) == set(devices), 10), _topics(svc)
        assert {m.properties.ContentType for m in seen(svc).values()} == {"application/json"}


def test_a_shared_subscription_across_workers_gets_each_message_and_event_once(
    cluster: Cluster, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Issue 15: members of one shared subscription on different workers. Each message a device
    publishes, and each provisioned event, goes to one member only: the origin worker serves the
    groups it has a member of, and the other workers skip those."""
    run = uuid.uuid4().hex[:6]
    group = ("$share/ingest/devices/+/telemetry", "$share/ingest/$jitp/events/provisioned/#")
    every: list[Conn] = []  # _spread may make more than one member per worker: all are in the group

    def member(i: int) -> Conn:
        every.append(clients(_connect5(cluster, pki, pki.service(f"m-{run}-{i}"), *group)))
        return every[-1]

    members = _spread(cluster, member)
    devices = _spread(cluster, lambda i: clients(_connect5(cluster, pki, pki.device(f"sd-{run}-{i}"))))
    ids = [dev.client._client_id.decode() for dev in devices.values()]
    sent = []
    for node, dev in devices.items():
        dev_id = dev.client._client_id.decode()
        for n in range(10):
            payload = f"{node}-{n}".encode()
            dev.client.publish(f"devices/{dev_id}/telemetry", payload, qos=1).wait_for_publish(5)
            sent.append(payload)

    def received() -> list[bytes]:
        return [m.payload for c in every for m in list(c.messages) if m.topic.endswith("/telemetry")]

    def events() -> list[str]:
        return [m.topic for c in every for m in list(c.messages) if m.topic.startswith("$jitp/events/")]

    # Every device that joined after the members subscribed has its provisioned event in the group.
    assert wait_until(lambda: {t.rsplit("/", 1)[1] for t in events()} >= set(ids), 15), events()
    assert wait_until(lambda: sorted(received()) == sorted(sent), 10), (sorted(received()), sorted(sent))
    # A marker from each worker, behind everything else on the same paths: any second copy of an
    # earlier message would have arrived before it.
    for node, dev in devices.items():
        dev.client.publish(
            f"devices/{dev.client._client_id.decode()}/telemetry", b"end-" + node.encode(), qos=1
        )
    assert wait_until(lambda: sum(p.startswith(b"end-") for p in received()) == len(devices), 10)
    assert sorted(p for p in received() if not p.startswith(b"end-")) == sorted(sent)  # once each
    mine = [t for t in events() if t.rsplit("/", 1)[1] in ids]
    assert sorted(mine) == sorted(set(mine))  # each provisioned event once across the group
    # A member on each worker took a share (the origin worker serves its own members).
    assert all(any(m.topic.endswith("/telemetry") for m in list(c.messages)) for c in members.values())


def test_sigterm_stops_every_worker_cleanly(cluster: Cluster) -> None:
    pids = cluster.pids()
    assert len(pids) == 2 and all(_alive(p) for p in pids.values())
    assert cluster.stop() == 0
    log = cluster.log()
    assert "SIGTERM: stopping 2 worker(s)" in log and "all workers stopped" in log
    assert log.count("jitp.server: shutting down") == 2
    assert not any(_alive(p) for p in pids.values())
    assert "Traceback" not in log, log[-3000:]


def test_a_killed_worker_is_restarted_and_gets_the_retained_messages(
    cluster: Cluster, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    run = uuid.uuid4().hex[:6]
    dev = clients(connect(cluster.port, pki, pki.device(f"keep-{run}")))
    assert dev.rc == 0
    dev.client.publish(f"devices/keep-{run}/state", b"kept", qos=1, retain=True).wait_for_publish(5)
    placement = cluster.placement()
    home = _node_of(placement, f"keep-{run}")
    victim_node = next(node for node in placement if node != home)
    victim = victim_node.rsplit("-", 1)[1]  # "w0" or "w1"
    old_pid = cluster.pids()[victim]
    readies = len(re.findall(rf"worker {victim} ready", cluster.log()))
    os.kill(old_pid, signal.SIGKILL)
    cluster.wait_log(rf"worker {victim} \(pid {old_pid}\) was killed by SIGKILL; restarting it in")
    cluster.wait_log(rf"worker {victim} ready", readies + 1)
    assert cluster.pids()[victim] != old_pid
    # The restarted worker took over the retained messages the other one holds (from the
    # supervisor's mirror), and its subscribers get the other worker's traffic again.
    found = _spread(cluster, lambda i: clients(_service(cluster, pki, f"after-{run}-{i}", "devices/#")))
    fresh = found[victim_node]
    assert wait_until(lambda: f"devices/keep-{run}/state" in _topics(fresh), 10), _topics(fresh)
    dev.client.publish(f"devices/keep-{run}/telemetry", b"still here", qos=1).wait_for_publish(5)
    assert wait_until(lambda: any(m.payload == b"still here" for m in list(fresh.messages)), 10)


def test_bad_config_fails_once_and_clearly(data: Path, pki: Pki, tmp_path: Path) -> None:
    layout = pki.layout
    argv = [
        sys.executable, "-m", "jitp.cli", "serve", "--data-dir", str(data), "--bind", "127.0.0.1:0",
        "--server-cert", str(tmp_path / "missing.pem"), "--server-key", str(layout.server_key),
        "--workers", "2",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert output.count("jitp: error:") == 1 and "missing.pem" in output, output
    assert "worker w0 started" not in output  # nothing was started

    # A port another broker (here: a second `jitp serve --workers 2`) listens on is refused, once.
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        argv = [a if a != "127.0.0.1:0" else f"127.0.0.1:{taken}" for a in argv]
        argv[argv.index("--server-cert") + 1] = str(layout.server_cert)
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("jitp: error:") == 1 and f"cannot listen on 127.0.0.1:{taken}" in proc.stderr

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("workers: 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jitp.cli", "serve", "--config", str(cfg), "--data-dir", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("jitp: error:") == 1 and "workers: must be between 1 and 256" in proc.stderr, (
        proc.stderr
    )


def test_a_worker_that_cannot_start_stops_everything_with_its_error_once(pki: Pki, tmp_path: Path) -> None:
    """Past the supervisor's own checks, the workers fail at start (here: a stand-in worker that
    reports an error on its relay socket and exits, as a real one does): the supervisor stops,
    raising that error once, and leaves nothing running."""
    script = (
        "import sys; from broker_plugins.relay import report_fatal; "
        "report_fatal(int(sys.argv[1]), 'registry: the stand-in cannot start'); sys.exit(2)"
    )
    started: list[int] = []

    def command(index: int, port: int, fd: int) -> list[str]:
        started.append(index)
        return [sys.executable, "-c", script, str(fd)]

    supervisor = Supervisor(test_config(tmp_path, pki), workers=2, command=command)
    with pytest.raises(errors.WorkersFailed, match=r"could not start: registry: the stand-in cannot start"):
        asyncio.run(supervisor.run())
    assert sorted(started) == [0, 1]
    assert all(w.proc is not None and w.proc.returncode is not None for w in supervisor.workers)


def test_a_client_connecting_again_on_another_worker_takes_over(
    cluster: Cluster, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """[MQTT-3.1.4-2] across workers: the older connection of the client id is closed."""
    ident = pki.device(f"twice-{uuid.uuid4().hex[:6]}")
    previous = clients(connect(cluster.port, pki, ident))
    assert previous.rc == 0
    where = _node_of(cluster.placement(), ident.name)
    for _ in range(MAX_TRIES):
        latest = clients(connect(cluster.port, pki, ident))
        assert latest.rc == 0, latest.error
        assert previous.disconnected.wait(10), "the older connection was not closed"
        now: list[str] = []
        assert wait_until(lambda now=now: _one_node(cluster, ident.name, now), 10), now
        if now[0] != where:
            cluster.wait_log(rf"session takeover for {ident.name}: it connected again on another worker")
            return
        previous, where = latest, now[0]
    raise AssertionError(f"{MAX_TRIES} connections all on the same worker")


def test_one_worker_is_the_single_process(data: Path, pki: Pki, tmp_path: Path) -> None:
    """`--workers 1`: no supervisor, no relay; the broker process itself listens and stops on SIGTERM."""
    log = tmp_path / "one.log"
    layout = pki.layout
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jitp.cli", "serve", "--data-dir", str(data), "--bind", "127.0.0.1:0",
             "--server-cert", str(layout.server_cert), "--server-key", str(layout.server_key), "--workers", "1"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        pattern = r"jitp broker listening on 127\.0\.0\.1:(\d+) \(mutual TLS\)"
        assert wait_until(lambda: proc.poll() is None and re.search(pattern, log.read_text()), 30), (
            log.read_text()
        )
        port = int(re.findall(pattern, log.read_text())[0])
        conn = connect(port, pki, pki.device(f"single-{uuid.uuid4().hex[:6]}"))
        conn.close()
        assert conn.rc == 0, conn.error
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            assert f.read().split() == []  # no worker processes
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    text = log.read_text()
    assert code == 0, text
    assert "[supervisor]" not in text and "[w0]" not in text and "workers" not in text, text
