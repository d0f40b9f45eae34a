"""Scenarios: storm, ramp, reconnect, hold, telemetry and chaos, each against any mTLS MQTT endpoint.

Every scenario builds the devices' TLS contexts first (not timed), optionally starts a service
subscriber counting provisioned events, samples the broker process, runs, then cross-checks
events and the local registry and returns a :class:`~device_sim.report.Report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import secrets
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import certs
from device_sim.backoff import Backoff
from device_sim.checks import (
    EventWatcher,
    MessageKey,
    RegistrySnapshot,
    TelemetryTally,
    telemetry_payload,
    telemetry_topic,
)
from device_sim.fleet import DeviceCreds, Fleet, ServiceCreds, Target, client_context, raise_fd_limit
from device_sim.mqtt import TRANSIENT_REASONS, ConnectFailed, MqttClient
from device_sim.procstat import ProcSample, try_sample
from device_sim.report import (
    OK,
    BrokerUsage,
    ChaosResult,
    HoldStats,
    JoinOutcome,
    Report,
    TelemetryCheck,
)

DEFAULT_BACKOFF = Backoff()


class Progress:
    """A one-line progress display on a text stream (plain ``\\r`` updates, no dependency)."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.joined = 0
        self.failed = 0
        self.inflight = 0
        self.retries = 0
        self.phase = ""
        self.started = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.started = time.perf_counter()
        if self.enabled:
            self._task = asyncio.create_task(self._loop(), name="jitp-sim-progress")

    def line(self) -> str:
        done = self.joined + self.failed
        width = 30
        filled = int(width * done / self.total) if self.total else width
        rate = self.joined / max(1e-9, time.perf_counter() - self.started)
        phase = f" {self.phase}" if self.phase else ""
        return (
            f"[{self.label}] [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} joined {self.joined} "
            f"failed {self.failed} in flight {self.inflight} retries {self.retries} {rate:.0f}/s{phase}"
        )

    async def _loop(self) -> None:
        while True:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()


@dataclass(frozen=True)
class _Plan:
    """One simulated connection: who connects, with which TLS context and client id."""

    device_id: str
    client_id: str
    context: ssl.SSLContext
    region: str | None = None  # the region its provisioned event must carry


class _Run:
    """Shared machinery of the join scenarios."""

    def __init__(
        self,
        scenario: str,
        target: Target,
        devices: Sequence[DeviceCreds],
        *,
        concurrency: int | None,
        service: ServiceCreds | None,
        registry_path: Path | None,
        backoff: Backoff,
        seed: int | None,
        progress: bool,
        keepalive: int = 60,
        telemetry: TelemetryTally | None = None,
    ) -> None:
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.scenario = scenario
        self.target = target
        self.devices = list(devices)
        self.concurrency = concurrency
        self.service = service
        self.registry_path = registry_path
        self.backoff = backoff
        self.rng = random.Random(seed)
        self.keepalive = keepalive
        self.telemetry = telemetry
        self.progress = Progress(scenario, len(self.devices), enabled=progress)
        self.sem = asyncio.Semaphore(concurrency) if concurrency else None
        self.plans: list[_Plan] = []
        self.watcher: EventWatcher | None = None
        self.prepare_seconds = 0.0
        self.since = datetime.now(UTC)
        self.before: ProcSample | None = None
        self.rss_peak = 0
        self.started = 0.0
        self.outcomes: list[JoinOutcome] = []

    async def prepare(self) -> None:
        raise_fd_limit()
        t0 = time.perf_counter()
        self.plans = [
            _Plan(d.device_id, d.mqtt_client_id, client_context(self.target.ca, d.cert, d.key), d.region)
            for d in self.devices
        ]
        self.prepare_seconds = time.perf_counter() - t0
        self.since = datetime.now(UTC)
        if self.service is not None:
            self.watcher = EventWatcher(self.target, self.service, since=self.since, telemetry=self.telemetry)
            await self.watcher.start()
        self.before = try_sample(self.target.broker_pid)
        self.rss_peak = self.before.rss_bytes if self.before else 0

    def start_clock(self) -> None:
        self.started = time.perf_counter()
        self.progress.start()

    def sample_broker(self) -> ProcSample | None:
        now = try_sample(self.target.broker_pid)
        if now is not None:
            self.rss_peak = max(self.rss_peak, now.rss_bytes)
        return now

    async def join(
        self, index: int, plan: _Plan, *, keep: bool, on_message: object = None
    ) -> tuple[JoinOutcome, MqttClient | None]:
        """Connect with retries; returns the outcome and, with ``keep``, the open client."""
        retried: list[str] = []
        t = self.target
        for attempt in range(self.backoff.attempts):
            failure: ConnectFailed | None = None
            client: MqttClient | None = None
            async with self.sem if self.sem is not None else contextlib.nullcontext():
                self.progress.inflight += 1
                try:
                    client = await MqttClient.connect(
                        t.host,
                        t.port,
                        ssl_context=plan.context,
                        client_id=plan.client_id,
                        server_hostname=t.server_hostname,
                        keepalive=self.keepalive,
                        time_limit=t.connect_timeout,
                        source_address=t.source_for(index),
                        protocol=t.protocol,
                    )
                    if not keep:
                        await client.disconnect()
                except ConnectFailed as exc:
                    failure = exc
                finally:
                    self.progress.inflight -= 1
            if client is not None:
                self.progress.joined += 1
                timing = client.timing
                return JoinOutcome(
                    plan.device_id,
                    OK,
                    attempt + 1,
                    tuple(retried),
                    timing.started,
                    timing.connack - timing.started,
                    plan.region,
                ), (client if keep else None)
            assert failure is not None
            if failure.reason in TRANSIENT_REASONS and attempt + 1 < self.backoff.attempts:
                retried.append(failure.reason)
                self.progress.retries += 1
                await asyncio.sleep(self.backoff.delay(attempt, self.rng))
                continue
            self.progress.failed += 1
            return JoinOutcome(
                plan.device_id, failure.reason, attempt + 1, tuple(retried), region=plan.region
            ), None
        raise AssertionError("unreachable")  # pragma: no cover

    async def finish(
        self,
        *,
        expect_new: bool | None,
        event_timeout: float,
        hold: HoldStats | None = None,
        issues: Sequence[str] = (),
        refused_ids: Sequence[str] = (),
        chaos: Sequence[ChaosResult] = (),
        telemetry: TelemetryCheck | None = None,
        duration: float | None = None,
    ) -> Report:
        """Cross-check events and the registry, sample the broker, and build the report.

        ``expect_new``: True - every joined device should be newly provisioned (the registry, when
        given, says which really were); False - none may be (idempotent rejoin); None - whatever the
        registry says, or, without one, no judgement on which devices produce events.
        """
        if duration is None:
            duration = time.perf_counter() - self.started
        joined = [o.device_id for o in self.outcomes if o.joined]
        regions = {p.device_id: p.region for p in self.plans if p.region is not None}
        issues = list(issues)
        notes: list[str] = []
        snapshot = await RegistrySnapshot.read(self.registry_path) if self.registry_path is not None else None
        if expect_new is False:
            expected: list[str] = []
        elif snapshot is not None:
            expected = snapshot.new_since(joined, self.since - timedelta(seconds=1))
        elif expect_new:
            expected = joined
            if self.watcher is not None:
                notes.append("no registry given: every joined device is expected to be new (a fresh fleet)")
        else:
            if self.watcher is not None:
                await self.watcher.settle(1.0)
            seen = self.watcher.first_seen() if self.watcher is not None else {}
            expected = [d for d in joined if d in seen]
        if snapshot is not None and expect_new is False:
            fresh = snapshot.new_since(joined, self.since)
            if fresh:
                issues.append(
                    f"{len(fresh)} device(s) newly provisioned during an idempotent run: {fresh[:5]}"
                )
        event_check = None
        event_latencies: tuple[float, ...] = ()
        if self.watcher is not None:
            self.progress.phase = "waiting for events"
            await self.watcher.wait_for(expected, time_limit=event_timeout)
            await self.watcher.settle(0.5 if expected else 1.0)
            run_ids = [p.device_id for p in self.plans]
            event_check = self.watcher.check(expected, run_devices=run_ids, regions=regions)
            seen = self.watcher.first_seen()
            event_latencies = tuple(
                seen[o.device_id] - o.started
                for o in self.outcomes
                if o.joined and o.started is not None and o.device_id in seen and o.device_id in set(expected)
            )
            if self.watcher.malformed:
                issues.append(f"{self.watcher.malformed} malformed event payload(s)")
            await self.watcher.stop()
        after = self.sample_broker()
        await self.progress.stop()
        broker = None
        if self.before is not None and after is not None:
            broker = BrokerUsage(
                cpu_seconds=after.cpu_seconds - self.before.cpu_seconds,
                rss_before=self.before.rss_bytes,
                rss_after=after.rss_bytes,
                rss_peak_seen=self.rss_peak,
            )
        registry_check = (
            snapshot.check(joined, refused=refused_ids, regions=regions) if snapshot is not None else None
        )
        t = self.target
        return Report(
            scenario=self.scenario,
            target=f"{t.host}:{t.port}",
            protocol=t.protocol,
            concurrency=self.concurrency,
            outcomes=tuple(self.outcomes),
            duration=duration,
            prepare_seconds=self.prepare_seconds,
            event_latencies=event_latencies,
            events=event_check,
            registry=registry_check,
            broker=broker,
            hold=hold,
            chaos=tuple(chaos),
            telemetry=telemetry,
            notes=tuple(notes),
            issues=tuple(issues),
        )

    async def abort_watcher(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        await self.progress.stop()


async def _broker_sampler(run: _Run) -> None:
    while True:
        await asyncio.sleep(0.5)
        run.sample_broker()


async def _join_all(run: _Run, *, rate: float | None = None) -> float:
    """Join every planned device once (connect, CONNACK, DISCONNECT); returns the duration."""
    run.start_clock()
    sampler = asyncio.create_task(_broker_sampler(run))

    async def one(i: int, plan: _Plan) -> JoinOutcome:
        if rate is not None:
            delay = run.started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        outcome, _ = await run.join(i, plan, keep=False)
        return outcome

    try:
        run.outcomes = list(await asyncio.gather(*(one(i, p) for i, p in enumerate(run.plans))))
    finally:
        sampler.cancel()
    return time.perf_counter() - run.started


async def run_storm(
    target: Target,
    fleet: Fleet,
    *,
    n: int | None = None,
    concurrency: int = 100,
    service: ServiceCreds | None = None,
    registry_path: Path | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    seed: int | None = None,
    event_timeout: float = 30.0,
    progress: bool = False,
    enroll: bool = False,
) -> Report:
    """All ``n`` devices (default: the whole fleet) join with at most ``concurrency`` connects in flight.

    Expects a fresh fleet: every joined device should produce exactly one provisioned event
    (with ``registry_path``, only the devices the registry shows as provisioned during the run).
    ``enroll``: then every joined device enrolls (CSR over MQTT) and reconnects with its operational
    certificate (``jitp-sim rotate``'s flow without faults), cross-checked the same way.
    """
    if enroll and service is None:
        raise ValueError(
            "--enroll needs a service identity (--service-cert/--service-key): it counts the events"
        )
    devices = fleet.take(n)
    report = await _scenario(
        "storm",
        target,
        fleet.take(n),
        concurrency=concurrency,
        rate=None,
        service=service,
        registry_path=registry_path,
        backoff=backoff,
        seed=seed,
        event_timeout=event_timeout,
        progress=progress,
        expect_new=True,
    )
    if not enroll:
        return report
    assert service is not None
    joined = {o.device_id for o in report.outcomes if o.joined}
    return await _enroll_after(
        report,
        target,
        [d for d in devices if d.device_id in joined],
        service=service,
        concurrency=concurrency,
        event_timeout=event_timeout,
    )


@dataclass(frozen=True)
class Enrollment:
    """What the enrollment phase of ``storm --enroll`` did: each device reconnected with its birth
    certificate, sent a CSR, reconnected with the issued certificate (the commit) and once more."""

    devices: int
    seconds: float
    broker_cpu_seconds: float | None
    summary: dict[str, Any]  # RotateReport.to_json()

    @property
    def issuances_per_second(self) -> float:
        return self.devices / self.seconds if self.seconds else 0.0

    @property
    def broker_cpu_ms_per_issuance(self) -> float | None:
        if self.broker_cpu_seconds is None or not self.devices:
            return None
        return 1000 * self.broker_cpu_seconds / self.devices

    def notes(self) -> list[str]:
        out = [
            f"enroll: {self.devices} device(s) enrolled and reconnected in {self.seconds:.2f} s "
            f"({self.issuances_per_second:.1f} issuances/s, each: 1 birth connect, 1 CSR, 2 connects with "
            f"the new certificate); {self.summary['certificate_issued_events']} certificate-issued event(s)"
        ]
        if self.broker_cpu_seconds is not None:
            out.append(
                f"enroll: broker CPU {self.broker_cpu_seconds:.2f} s, {self.broker_cpu_ms_per_issuance:.2f} ms "
                "per device (the issuance with its three mTLS connects)"
            )
        return out

    def issues(self) -> list[str]:
        s, out = self.summary, []
        if s["stranded"]:
            out.append(f"enroll: {len(s['stranded'])} device(s) stranded: {s['stranded'][:5]}")
        if s["duplicate_events"]:
            out.append(f"enroll: {s['duplicate_events']} duplicate certificate-issued event(s)")
        if s["mismatched_events"]:
            out.append(
                f"enroll: {len(s['mismatched_events'])} device(s) whose certificate-issued event is "
                f"missing or wrong: {s['mismatched_events'][:5]}"
            )
        return out


async def enroll_devices(
    target: Target,
    devices: Sequence[DeviceCreds],
    *,
    service: ServiceCreds,
    concurrency: int,
    event_timeout: float = 30.0,
) -> Enrollment:
    """Every device enrolls (``jitp-sim rotate``'s flow, no faults); every one must end on its new
    certificate, with exactly one certificate-issued event carrying its birth and new fingerprints."""
    from device_sim.rotate import rotate

    before = try_sample(target.broker_pid)
    started = time.perf_counter()
    enrolled = await rotate(
        list(devices),
        host=target.host,
        port=target.port,
        ca=target.ca,
        service_cert=service.cert,
        service_key=service.key,
        service_client_id=service.mqtt_client_id,
        concurrency=concurrency,
        event_timeout=event_timeout,
        faults=("none",),
    )
    seconds = time.perf_counter() - started
    after = try_sample(target.broker_pid)
    cpu = after.cpu_seconds - before.cpu_seconds if before is not None and after is not None else None
    return Enrollment(len(devices), seconds, cpu, enrolled.to_json())


async def _enroll_after(
    report: Report,
    target: Target,
    devices: Sequence[DeviceCreds],
    *,
    service: ServiceCreds,
    concurrency: int,
    event_timeout: float,
) -> Report:
    """The enrollment phase of ``storm --enroll``, its figures in the report's notes, its failures
    in its issues."""
    enrollment = await enroll_devices(
        target, devices, service=service, concurrency=concurrency, event_timeout=event_timeout
    )
    return dataclasses.replace(
        report,
        notes=(*report.notes, *enrollment.notes()),
        issues=(*report.issues, *enrollment.issues()),
    )


async def run_ramp(
    target: Target,
    fleet: Fleet,
    *,
    rate: float,
    n: int | None = None,
    concurrency: int | None = None,
    service: ServiceCreds | None = None,
    registry_path: Path | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    seed: int | None = None,
    event_timeout: float = 30.0,
    progress: bool = False,
) -> Report:
    """Devices start joining at ``rate`` per second (optionally capped at ``concurrency`` in flight)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    return await _scenario(
        "ramp",
        target,
        fleet.take(n),
        concurrency=concurrency,
        rate=rate,
        service=service,
        registry_path=registry_path,
        backoff=backoff,
        seed=seed,
        event_timeout=event_timeout,
        progress=progress,
        expect_new=True,
    )


async def run_reconnect(
    target: Target,
    fleet: Fleet,
    *,
    n: int | None = None,
    concurrency: int = 100,
    service: ServiceCreds | None = None,
    registry_path: Path | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    seed: int | None = None,
    progress: bool = False,
) -> Report:
    """An already provisioned fleet rejoins: zero new provisioned events are expected."""
    return await _scenario(
        "reconnect",
        target,
        fleet.take(n),
        concurrency=concurrency,
        rate=None,
        service=service,
        registry_path=registry_path,
        backoff=backoff,
        seed=seed,
        event_timeout=0.0,
        progress=progress,
        expect_new=False,
    )


async def _scenario(
    name: str,
    target: Target,
    devices: Sequence[DeviceCreds],
    *,
    concurrency: int | None,
    rate: float | None,
    service: ServiceCreds | None,
    registry_path: Path | None,
    backoff: Backoff,
    seed: int | None,
    event_timeout: float,
    progress: bool,
    expect_new: bool,
) -> Report:
    run = _Run(
        name,
        target,
        devices,
        concurrency=concurrency,
        service=service,
        registry_path=registry_path,
        backoff=backoff,
        seed=seed,
        progress=progress,
    )
    await run.prepare()
    try:
        duration = await _join_all(run, rate=rate)
    except BaseException:
        await run.abort_watcher()
        raise
    return await run.finish(expect_new=expect_new, event_timeout=event_timeout, duration=duration)


# -- hold -------------------------------------------------------------------------------------
@dataclass
class _HoldCounters:
    pings: int = 0
    ping_failures: int = 0
    publishes: int = 0
    publish_failures: int = 0


async def run_hold(
    target: Target,
    fleet: Fleet,
    *,
    n: int,
    seconds: float,
    concurrency: int = 100,
    keepalive: int = 30,
    publish_interval: float | None = 5.0,
    service: ServiceCreds | None = None,
    registry_path: Path | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    seed: int | None = None,
    event_timeout: float = 30.0,
    progress: bool = False,
    expect_new: bool | None = None,
) -> Report:
    """Connect ``n`` devices and keep them connected for ``seconds`` after the last one joined.

    Each device pings every ``keepalive / 2`` seconds and publishes QoS 1 telemetry on
    ``devices/<id>/telemetry`` every ``publish_interval`` seconds (None: no telemetry). With a
    local broker (``target.broker_pid``) the report includes broker RSS per held connection.
    ``expect_new``: whether joins should provision (None: as the registry says; no judgement without one).
    """
    if keepalive < 1:
        raise ValueError("keepalive must be >= 1 s")
    run = _Run(
        "hold",
        target,
        fleet.take(n),
        concurrency=concurrency,
        service=service,
        registry_path=registry_path,
        backoff=backoff,
        seed=seed,
        progress=progress,
        keepalive=keepalive,
    )
    await run.prepare()
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    counters = _HoldCounters()
    dropped: Counter[str] = Counter()
    clients: list[MqttClient] = []
    sampler: asyncio.Task[None] | None = None
    all_joined = asyncio.Event()
    settled = 0

    async def device(i: int, plan: _Plan) -> JoinOutcome:
        nonlocal settled
        try:
            outcome, client = await run.join(i, plan, keep=True)
        finally:
            settled += 1
            if settled == len(run.plans):
                all_joined.set()
        if client is not None:
            clients.append(client)
            await _hold_loop(
                client,
                plan.device_id,
                stop,
                keepalive,
                publish_interval,
                counters,
                dropped,
                random.Random(run.rng.random()),
            )
        return outcome

    try:
        run.start_clock()
        sampler = asyncio.create_task(_broker_sampler(run))
        tasks = [asyncio.create_task(device(i, p)) for i, p in enumerate(run.plans)]
        if run.plans:
            await all_joined.wait()
        join_duration = time.perf_counter() - run.started
        await asyncio.sleep(0.5)  # let the broker settle before measuring memory
        connected = run.sample_broker()
        run.progress.phase = f"holding {len(clients)} for {seconds:.0f} s"
        await asyncio.sleep(seconds)
        stop.set_result(None)
        run.outcomes = list(await asyncio.gather(*tasks))
    except BaseException:
        if not stop.done():
            stop.set_result(None)
        await asyncio.gather(*(c.abort() for c in clients), return_exceptions=True)
        await run.abort_watcher()
        raise
    finally:
        if sampler is not None:
            sampler.cancel()
    held = sum(1 for c in clients if c.is_open)
    await asyncio.gather(*(c.disconnect() for c in clients))
    rss_delta = None
    if run.before is not None and connected is not None:
        rss_delta = connected.rss_bytes - run.before.rss_bytes
    hold = HoldStats(
        held=held,
        dropped=dict(dropped),
        seconds=seconds,
        pings=counters.pings,
        ping_failures=counters.ping_failures,
        publishes=counters.publishes,
        publish_failures=counters.publish_failures,
        rss_delta=rss_delta,
    )
    report = await run.finish(
        expect_new=expect_new, event_timeout=event_timeout, hold=hold, duration=join_duration
    )
    return report


async def _hold_loop(
    client: MqttClient,
    device_id: str,
    stop: asyncio.Future[None],
    keepalive: int,
    publish_interval: float | None,
    counters: _HoldCounters,
    dropped: Counter[str],
    rng: random.Random,
) -> None:
    now = time.monotonic()
    ping_every = (client.keepalive or keepalive) / 2  # a 5.0 server's Server Keep Alive wins
    next_ping = now + rng.uniform(0.5, 1.0) * ping_every
    next_pub = now + rng.uniform(0, publish_interval) if publish_interval else float("inf")
    seq = 0
    topic = f"devices/{device_id}/telemetry"
    while True:
        wake = min(next_ping, next_pub)
        waiters: set[asyncio.Future[Any]] = {stop, client.closed}
        await asyncio.wait(waiters, timeout=max(0.0, wake - time.monotonic()))
        if stop.done():
            return
        if client.closed.done():
            failure = client.closed.result()
            dropped[failure.reason if failure else "closed"] += 1
            return
        now = time.monotonic()
        try:
            if now >= next_ping:
                next_ping = now + ping_every
                await client.ping(time_limit=keepalive)
                counters.pings += 1
            if now >= next_pub and publish_interval:
                next_pub = now + publish_interval
                seq += 1
                payload = json.dumps(
                    {"seq": seq, "t": round(time.time(), 3), "v": round(rng.gauss(21, 2), 2)}
                )
                await client.publish(topic, payload.encode(), qos=1, time_limit=keepalive)
                counters.publishes += 1
        except ConnectFailed as exc:
            if client.closed.done():
                continue  # counted as dropped on the next turn
            if exc.reason == "timeout":
                counters.ping_failures += 1
            else:
                counters.publish_failures += 1


# -- telemetry --------------------------------------------------------------------------------
async def run_telemetry(
    target: Target,
    fleet: Fleet,
    *,
    service: ServiceCreds,
    n: int | None = None,
    messages: int = 20,
    inflight: int = 20,
    concurrency: int = 100,
    registry_path: Path | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    seed: int | None = None,
    delivery_timeout: float = 30.0,
    event_timeout: float = 30.0,
    progress: bool = False,
    expect_new: bool | None = None,
) -> Report:
    """``n`` devices each publish ``messages`` QoS 1 messages, then disconnect at once; the service
    subscriber must receive every message the broker acknowledged.

    The service client (persistent session) subscribes ``devices/+/telemetry`` at QoS 1 before the
    first device connects. Each device joins (a first join provisions it, a rejoin does not;
    ``expect_new`` as in :func:`run_hold`), publishes seq 1..``messages`` on
    ``devices/<id>/telemetry`` with at most ``inflight`` PUBACKs outstanding, and sends DISCONNECT
    and closes right after its last PUBACK. Payloads name the run, the device and the seq, so loss
    and duplicates are exact. The run then waits until every acknowledged message has arrived, or
    ``delivery_timeout`` seconds. See :class:`~device_sim.report.TelemetryCheck` for what fails it.
    """
    if messages < 1:
        raise ValueError("messages must be >= 1")
    if inflight < 1:
        raise ValueError("inflight must be >= 1")
    tally = TelemetryTally(secrets.token_hex(8))
    run = _Run(
        "telemetry",
        target,
        fleet.take(n),
        concurrency=concurrency,
        service=service,
        registry_path=registry_path,
        backoff=backoff,
        seed=seed,
        progress=progress,
        telemetry=tally,
    )
    await run.prepare()
    sent: set[MessageKey] = set()
    acked: set[MessageKey] = set()
    failures: Counter[str] = Counter()
    open_clients: set[MqttClient] = set()
    publishers = 0
    sampler: asyncio.Task[None] | None = None

    async def device(i: int, plan: _Plan) -> JoinOutcome:
        nonlocal publishers
        outcome, client = await run.join(i, plan, keep=True)
        if client is None:
            return outcome
        open_clients.add(client)
        publishers += 1
        try:
            failure = await _publish_batch(
                client,
                plan.device_id,
                tally.run_id,
                messages=messages,
                inflight=inflight,
                time_limit=target.connect_timeout,
                sent=sent,
                acked=acked,
            )
        finally:
            await client.disconnect()  # right after the last PUBACK: the pattern of issue 18
            open_clients.discard(client)
        if failure is not None:
            failures[failure] += 1
        return outcome

    try:
        run.start_clock()
        run.progress.phase = "publishing"
        sampler = asyncio.create_task(_broker_sampler(run))
        run.outcomes = list(await asyncio.gather(*(device(i, p) for i, p in enumerate(run.plans))))
        publish_seconds = time.perf_counter() - run.started
        run.progress.phase = f"waiting for {len(acked)} acknowledged messages"
        t0 = time.perf_counter()
        await tally.wait_for(acked, time_limit=delivery_timeout)
        delivery_seconds = time.perf_counter() - t0
        await tally.settle()  # late duplicates; returns after a short quiet spell
    except BaseException:
        await asyncio.gather(*(c.abort() for c in open_clients), return_exceptions=True)
        await run.abort_watcher()
        raise
    finally:
        if sampler is not None:
            sampler.cancel()
    check = tally.check(
        sent=sent,
        acked=acked,
        devices=publishers,
        messages=messages,
        publish_failures=failures,
        publish_seconds=publish_seconds,
        delivery_seconds=delivery_seconds,
    )
    return await run.finish(
        expect_new=expect_new, event_timeout=event_timeout, telemetry=check, duration=publish_seconds
    )


async def _publish_batch(
    client: MqttClient,
    device_id: str,
    run_id: str,
    *,
    messages: int,
    inflight: int,
    time_limit: float,
    sent: set[MessageKey],
    acked: set[MessageKey],
) -> str | None:
    """Publish seq 1..``messages`` at QoS 1 in order, at most ``inflight`` awaiting their PUBACK.

    Records each message in ``sent`` as its PUBLISH is written and in ``acked`` on its PUBACK.
    Returns None if every message was acknowledged, else why the batch broke off.
    """
    topic = telemetry_topic(device_id)
    window = asyncio.Semaphore(inflight)
    failures: list[str] = []

    async def one(seq: int) -> None:
        try:
            if failures or not client.is_open:
                return
            sent.add((device_id, seq))  # publish() writes before its first await
            await client.publish(
                topic, telemetry_payload(run_id, device_id, seq), qos=1, time_limit=time_limit
            )
            acked.add((device_id, seq))
        except ConnectFailed as exc:
            failures.append(exc.reason)
        finally:
            window.release()

    tasks: list[asyncio.Task[None]] = []
    try:
        for seq in range(1, messages + 1):
            await window.acquire()
            tasks.append(asyncio.create_task(one(seq)))  # tasks start in order: PUBLISHes go out in seq order
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    if failures:
        return failures[0]
    if not all((device_id, seq) in acked for seq in range(1, messages + 1)):
        failure = client.closed.result() if client.closed.done() else None
        return failure.reason if failure is not None else "closed"
    return None


# -- chaos ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChaosCase:
    name: str
    device_id: str  # the certificate CN
    client_id: str
    cert: Path | None
    key: Path | None
    expected: tuple[str, ...]


def make_chaos_cases(
    pki_dir: Path, out: Path, *, tag: str | None = None, protocol: int = 4
) -> list[ChaosCase]:
    """Bad identities, generated on the fly under ``out``: each must be refused by a jitp broker.

    With ``protocol=5`` the refusals are MQTT 5 reason codes (issue 15): 0x85 Client Identifier not
    valid for a client id that is not the device id, 0x87 Not authorized (or 0x85) for unsafe ids.
    """
    layout = certs.PkiLayout(Path(pki_dir))
    manufacturer = certs.load_issuer(layout.manufacturer_cert, layout.manufacturer_key)
    rogue = certs.make_ca("chaos rogue CA", key=certs.generate_key("ec"))
    tag = tag or f"{random.getrandbits(32):08x}"
    now = datetime.now(UTC)

    # Refused in the TLS handshake: a broker on OpenSSL's own I/O (Mosquitto) sends the alert; one on
    # asyncio's TLS (jitp, amqtt) closes without it (asyncio drops the pending alert when the server-side
    # handshake fails), so the client sees EOF or a reset on its first read, before any CONNACK.
    def tls(alert: str) -> tuple[str, ...]:
        return (f"tls:{alert}", "eof", "reset")

    refused = ("connack:0x87", "connack:0x85") if protocol == 5 else ("connack:5",)
    mismatch = ("connack:0x85",) if protocol == 5 else refused
    specs: list[tuple[str, str, str | None, certs.Issuer, dict[str, datetime], tuple[str, ...]]] = [
        (
            "expired",
            f"chaos-expired-{tag}",
            None,
            manufacturer,
            {"not_before": now - timedelta(days=30), "not_after": now - timedelta(days=1)},
            tls("certificate_expired"),
        ),
        ("unknown_ca", f"chaos-rogue-{tag}", None, rogue, {}, tls("unknown_ca")),
        ("client_id_mismatch", f"chaos-mismatch-{tag}", f"chaos-other-{tag}", manufacturer, {}, mismatch),
        ("unsafe_id_slash", f"chaos/{tag}", None, manufacturer, {}, refused),
        ("unsafe_id_hash", f"chaos#{tag}", None, manufacturer, {}, refused),
        ("unsafe_id_dollar", f"$chaos-{tag}", None, manufacturer, {}, refused),
    ]
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, (name, cn, client_id, issuer, validity, expected) in enumerate(specs):
        key = certs.generate_key("ec")
        cert = certs.make_leaf(cn, key.public_key(), issuer=issuer, **validity)  # type: ignore[arg-type]
        cert_path, key_path = out / f"chaos-{i}.pem", out / f"chaos-{i}.key"
        certs.write_certs(cert_path, [cert, issuer.cert, *issuer.chain] if issuer is manufacturer else [cert])
        certs.write_key(key_path, key)
        cases.append(ChaosCase(name, cn, client_id or cn, cert_path, key_path, expected))
    cases.append(
        ChaosCase(
            "no_certificate",
            f"chaos-nocert-{tag}",
            f"chaos-nocert-{tag}",
            None,
            None,
            tls("certificate_required"),
        )
    )
    return cases


async def run_chaos(
    target: Target,
    pki_dir: Path,
    *,
    service: ServiceCreds | None = None,
    registry_path: Path | None = None,
    progress: bool = False,
) -> Report:
    """Connect each bad identity once; every one must be refused, with the expected reason.

    With ``service`` no provisioned event may appear for them; with ``registry_path`` none may be
    recorded in the registry.
    """
    with tempfile.TemporaryDirectory(prefix="jitp-chaos-") as tmp:
        cases = make_chaos_cases(Path(pki_dir), Path(tmp), protocol=target.protocol)
        run = _Run(
            "chaos",
            target,
            [],
            concurrency=1,
            service=service,
            registry_path=registry_path,
            backoff=Backoff(attempts=1),
            seed=None,
            progress=progress,
        )
        run.progress.total = len(cases)
        await run.prepare()
        run.plans = [_Plan(c.device_id, c.client_id, client_context(target.ca, c.cert, c.key)) for c in cases]
        run.start_clock()
        try:
            outcomes = [(await run.join(i, plan, keep=False))[0] for i, plan in enumerate(run.plans)]
        except BaseException:
            await run.abort_watcher()
            raise
        run.outcomes = outcomes
        results = [
            ChaosResult(c.name, c.device_id, c.client_id, c.expected, o.reason)
            for c, o in zip(cases, outcomes, strict=True)
        ]
        ids = [c.device_id for c in cases] + [c.client_id for c in cases]
        return await run.finish(expect_new=False, event_timeout=0.0, refused_ids=ids, chaos=results)
