"""Join storm benchmark: the same fleet and load generator against three mTLS brokers.

    .venv/bin/python benchmarks/join_storm.py            # n=1000, c=200, hold 1000
    .venv/bin/python benchmarks/join_storm.py -n 2000 -c 300 --hold 2000

Targets, each its own process (CPU and RSS read from /proc):

(a) stock amqtt 0.12.1, mTLS with a minimal client-certificate check, no provisioning
(b) Mosquitto (require_certificate, use_identity_as_username), if installed
(c) jitp (``jitp serve --workers 1``) doing full first-join provisioning: registry write, audit
    entry and a provisioned event delivered to a service subscriber; ``jitp:workers=N`` the same
    with N worker processes on the port (CPU and RSS summed over the supervisor and its workers)
(d) ``jitp+metrics``: the same with its metrics listener (``--metrics``) scraped every second during
    the storm; afterwards ``--inject-refusals`` unknown-CA connects, and /metrics must count exactly
    the storm's joins as provisioned and the injected connects as refused (issue 17)
(e) ``floor`` and ``floor-bio`` (benchmarks/tls_floor.py): mutual TLS and CONNACK only, with stdlib
    asyncio TLS or a MemoryBIO protocol: the floor for a Python broker, measured in the same run

MQTT 5 (issue 15): a target spelled ``NAME/v5`` is NAME with every device (and the service) on MQTT
5.0, e.g. ``--targets jitp,jitp/v5,mosquitto,mosquitto/v5 --repeat 3``: 3.1.1 and 5 side by side in
one table, and a line per pair with the ratio of CPU per join (v5 / 3.1.1, medians). Not for amqtt,
which has no MQTT 5.

The cost of the observability layer, paired: ``--targets jitp@BASE,jitp,jitp+metrics --repeat 3``
(BASE: a revision before it), ratios of medians.

Per target: a storm of N first joins with at most C handshakes in flight, then a hold phase (N
connections held) for broker memory per connection. Run on demand; never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import certs  # noqa: E402
from device_sim import Fleet, Report, ServiceCreds, Target, create_fleet, run_hold, run_storm  # noqa: E402
from device_sim.backoff import Backoff  # noqa: E402
from device_sim.fleet import lean_tls_buffers, raise_fd_limit  # noqa: E402
from device_sim.mqtt import ConnectFailed  # noqa: E402
from device_sim.procstat import try_sample  # noqa: E402
from device_sim.scenarios import Enrollment, enroll_devices  # noqa: E402

MOSQUITTO = "/usr/sbin/mosquitto"


@dataclass
class Broker:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    data_dir: Path | None = None
    service: ServiceCreds | None = None
    metrics_port: int | None = None


@dataclass
class Row:
    name: str
    storm: Report | None
    hold: Report | None
    broker_cpu_ms: float | None  # per join
    loadgen_cpu_ms: float | None  # per join
    skipped: str | None = None
    enrollment: Enrollment | None = None  # --enroll: the CSR phase after the storm (jitp targets)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(broker: Broker, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if broker.proc.poll() is not None:
            raise RuntimeError(f"{broker.name} exited with {broker.proc.returncode}; see {broker.log}")
        if ":workers=" in broker.name:  # every worker listening, not just the first
            if "jitp broker listening on" in broker.log.read_text(errors="replace"):
                return
            time.sleep(0.1)
            continue
        try:
            with socket.create_connection(("127.0.0.1", broker.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{broker.name} did not listen on {broker.port}; see {broker.log}")


def _spawn(name: str, cmd: list[str], work: Path, port: int, **kw: object) -> Broker:
    log = work / f"{name}.log"
    with log.open("wb") as out:
        env = kw.pop("env", None) or os.environ
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=kw.pop("cwd", work),  # type: ignore[call-overload]
                                env={**env, "PYTHONUNBUFFERED": "1"})  # type: ignore[dict-item]
    return Broker(name, proc, port, log, **kw)  # type: ignore[arg-type]


def start_amqtt(layout: certs.PkiLayout, work: Path, *, fresh: bool = True) -> Broker:
    port = free_port()
    return _spawn("amqtt", [sys.executable, "-m", "benchmarks.stock_amqtt", "--port", str(port),
                            "--certfile", str(layout.server_cert), "--keyfile", str(layout.server_key),
                            "--cafile", str(layout.root_cert)], work, port, cwd=ROOT)


def start_floor(layout: certs.PkiLayout, work: Path, *, fresh: bool = True, mode: str = "streams") -> Broker:
    """benchmarks/tls_floor.py: mutual TLS and CONNACK only, with jitp's TLS settings (the Python floor)."""
    port = free_port()
    return _spawn(f"floor-{mode}", [sys.executable, "-m", "benchmarks.tls_floor", "--port", str(port), "--mode", mode,
                                    "--certfile", str(layout.server_cert), "--keyfile", str(layout.server_key),
                                    "--cafile", str(layout.manufacturer_cert)], work, port, cwd=ROOT)


def start_floor_bio(layout: certs.PkiLayout, work: Path, *, fresh: bool = True) -> Broker:
    return start_floor(layout, work, fresh=fresh, mode="bio")


def start_mosquitto(layout: certs.PkiLayout, work: Path, *, fresh: bool = True) -> Broker:
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text("\n".join([
        "user root" if os.geteuid() == 0 else "",  # don't drop privileges: the keys are 0600
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        f"listener {port} 127.0.0.1",
        f"cafile {layout.root_cert}",
        f"certfile {layout.server_cert}",
        f"keyfile {layout.server_key}",
        "require_certificate true",
        "use_identity_as_username true",
        "",
    ]))
    return _spawn("mosquitto", [MOSQUITTO, "-c", str(conf)], work, port)


def start_jitp(layout: certs.PkiLayout, work: Path, *, fresh: bool = True, revision: str | None = None,
               workers: int = 1, metrics: bool = False, issuer: bool = False) -> Broker:
    """``fresh``: a new data dir with the CAs registered; else reuse the last one (devices provisioned).

    ``revision``: run jitp as of that git revision (a worktree under ``work``), as a baseline.
    ``workers``: `jitp serve --workers N` (target ``jitp:workers=N``); CPU and RSS are the whole tree's.
    """
    name = (f"jitp@{revision}" if revision else f"jitp:workers={workers}" if workers > 1
            else "jitp+metrics" if metrics else "jitp")
    source = checkout(revision, work) if revision else ROOT
    data = work / f"{name.replace('@', '-')}-data"
    jitp = [sys.executable, "-m", "jitp.cli"]
    env = {k: v for k, v in os.environ.items() if k != "JITP_MASTER_KEY"}  # the key file made here
    if fresh or not data.exists():
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(data.with_name(data.name + "-keys"), ignore_errors=True)
        # Revisions with encryption at rest need a master key (keys.py, later jitp/crypto/keys.py).
        if any((source / "jitp" / p).exists() for p in ("keys.py", "crypto/keys.py")):
            subprocess.run([*jitp, "keys", "init", "--data-dir", str(data)], check=True, capture_output=True,
                           cwd=source, env=env)
        for cert, role in ((layout.manufacturer_cert, "device"), (layout.service_ca_cert, "service")):
            subprocess.run([*jitp, "ca", "register", str(cert), "--role", role, "--data-dir", str(data)],
                           check=True, capture_output=True, cwd=source, env=env)
        if issuer:  # --enroll: an operational issuing CA (ECDSA P-256) signs the devices' CSRs
            subprocess.run([*jitp, "issuer", "init", "--data-dir", str(data)], check=True, capture_output=True,
                           cwd=source, env=env)
    port = free_port()
    # Since --workers exists its default is one per core: say how many.
    many = ["--workers", str(workers)] if (source / "broker_plugins" / "workers.py").exists() else []
    # With workers, the supervisor says (at info) when all of them listen.
    level = "info" if workers > 1 else "warning"
    metrics_port = free_port() if metrics else None
    extra = ["--metrics", f"127.0.0.1:{metrics_port}"] if metrics_port else []
    return _spawn(name, [*jitp, "serve", "--data-dir", str(data), "--bind", f"127.0.0.1:{port}",
                         "--server-cert", str(layout.server_cert), "--server-key", str(layout.server_key),
                         "--log-level", level, *many, *extra], work, port, data_dir=data, cwd=source, env=env,
                  service=ServiceCreds(layout.service_client_cert, layout.service_client_key),
                  metrics_port=metrics_port)


def checkout(revision: str, work: Path) -> Path:
    """The tree of ``revision`` (exported once, under ``work``): a baseline measured in the same run.
    ``git archive``, not a worktree: the repository's metadata (shared by its worktrees) is not touched."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{revision}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    tree = work / f"src-{commit[:12]}"
    if not (tree / "jitp").is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True, capture_output=True)
    return tree


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


async def scraper(port: int, stop: asyncio.Event) -> int:
    """Scrape once a second (as Prometheus would, faster) until ``stop``; the number of scrapes."""
    done = 0
    while not stop.is_set():
        await asyncio.to_thread(scrape, port)
        done += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    return done


def inject_refusals(broker: Broker, layout: certs.PkiLayout, work: Path, count: int) -> None:
    """``count`` TLS connects with a certificate of an unknown CA (each refused in the handshake)."""
    import ssl

    rogue = certs.make_ca("bench rogue CA", key=certs.generate_key("ec"))
    key = certs.generate_key("ec")
    leaf = certs.make_leaf("bench-rogue", key.public_key(), issuer=rogue)
    chain, keyfile = work / "rogue.pem", work / "rogue.key"
    certs.write_certs(chain, [leaf])
    certs.write_key(keyfile, key)
    ctx = ssl.create_default_context(cafile=str(layout.root_cert))
    ctx.load_cert_chain(str(chain), str(keyfile))
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass


def check_counts(broker: Broker, storm: Report, injected: int) -> str:
    """/metrics against the storm: provisioned == joined, refused unknown_ca == injected."""
    assert broker.metrics_port is not None
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(broker.metrics_port)
        refused = metric(samples, "jitp_joins_total", outcome="refused", reason="unknown_ca")
        if refused >= injected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    provisioned = metric(samples, "jitp_joins_total", outcome="provisioned")
    ok = provisioned == storm.joined and refused == injected
    return (f"/metrics: provisioned {provisioned:.0f} (storm joined {storm.joined}), refused unknown_ca "
            f"{refused:.0f} (injected {injected}), shed {metric(samples, 'jitp_joins_total', outcome='shed'):.0f}: "
            f"{'MATCH' if ok else 'MISMATCH'}")


def stop(broker: Broker) -> None:
    if broker.proc.poll() is None:
        broker.proc.send_signal(signal.SIGTERM)
        try:
            broker.proc.wait(20)
        except subprocess.TimeoutExpired:
            broker.proc.kill()
            broker.proc.wait(5)


@contextlib.contextmanager
def running(broker: Broker) -> Iterator[Broker]:
    try:
        wait_listening(broker)
        yield broker
    finally:
        stop(broker)


async def storm_phase(broker: Broker, layout: certs.PkiLayout, fleet: Fleet, *, n: int,
                      concurrency: int, protocol: int = 4) -> tuple[Report, float | None, float | None]:
    """The storm; returns the report, broker CPU ms per join and load generator CPU ms per join.

    Broker CPU is sampled before the storm and after 1 s of quiet, so deferred clean-up counts too.
    """
    target = Target("127.0.0.1", broker.port, ca=layout.root_cert, broker_pid=broker.proc.pid, protocol=protocol)
    registry = broker.data_dir / "registry.db" if broker.data_dir is not None else None
    me = os.getpid()
    stop_scraping = asyncio.Event()
    scrapes = (asyncio.create_task(scraper(broker.metrics_port, stop_scraping))
               if broker.metrics_port is not None else None)
    broker_before, gen_before = try_sample(broker.proc.pid), try_sample(me)
    storm = await run_storm(target, fleet, n=n, concurrency=concurrency, service=broker.service,
                            registry_path=registry, backoff=Backoff(attempts=8), progress=True)
    gen_after = try_sample(me)
    stop_scraping.set()
    if scrapes is not None:
        print(f"{await scrapes} scrapes of /metrics during the storm", file=sys.stderr)
    await asyncio.sleep(1.0)
    broker_after = try_sample(broker.proc.pid)
    broker_ms = gen_ms = None
    if storm.joined and broker_before and broker_after:
        broker_ms = (broker_after.cpu_seconds - broker_before.cpu_seconds) * 1000 / storm.joined
    if storm.joined and gen_before and gen_after:
        gen_ms = (gen_after.cpu_seconds - gen_before.cpu_seconds) * 1000 / storm.joined
    return storm, broker_ms, gen_ms


async def enroll_phase(broker: Broker, layout: certs.PkiLayout, fleet: Fleet, storm: Report, *,
                       concurrency: int) -> Enrollment:
    """After the storm and 1 s of quiet: every joined device enrolls (device_sim.scenarios.enroll_devices)."""
    assert broker.service is not None
    await asyncio.sleep(1.0)
    target = Target("127.0.0.1", broker.port, ca=layout.root_cert, broker_pid=broker.proc.pid)
    joined = {o.device_id for o in storm.outcomes if o.joined}
    devices = [d for d in fleet.devices if d.device_id in joined]
    return await enroll_devices(target, devices, service=broker.service, concurrency=concurrency)


async def hold_phase(broker: Broker, layout: certs.PkiLayout, fleet: Fleet, *, n: int, concurrency: int,
                     seconds: float, protocol: int = 4) -> Report:
    """Hold ``n`` connections on a freshly started broker process (a clean RSS baseline)."""
    await asyncio.sleep(0.5)
    target = Target("127.0.0.1", broker.port, ca=layout.root_cert, broker_pid=broker.proc.pid, protocol=protocol)
    return await run_hold(target, fleet, n=n, seconds=seconds, concurrency=concurrency, keepalive=30,
                          publish_interval=None, progress=True)


V5 = "/v5"
NO_V5 = ("amqtt",)  # stock amqtt 0.12.1 speaks 3.1.1 only


def split_protocol(name: str) -> tuple[str, int]:
    """``jitp/v5`` -> (``jitp``, 5); ``jitp`` -> (``jitp``, 4)."""
    return (name.removesuffix(V5), 5) if name.endswith(V5) else (name, 4)


def protocol_lines(cpu: dict[str, float]) -> list[str]:
    """MQTT 5 against 3.1.1 for each target measured both ways: v5 CPU per join / 3.1.1's."""
    lines = []
    for name in sorted(cpu):
        base, protocol = split_protocol(name)
        if protocol == 5 and cpu.get(base):
            ratio = cpu[name] / cpu[base]
            lines.append(f"CPU per join, MQTT 5 / 3.1.1, {base}: {ratio:.3f}x ({(ratio - 1) * 100:+.1f}%: "
                         f"{cpu[name]:.2f} vs {cpu[base]:.2f} ms)")
    return lines


def _fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def table(rows: list[Row], *, n: int, concurrency: int, hold: int) -> str:
    width = max([10, *(len(r.name) for r in rows)])
    header = (f"{'target':{width}} {'joins':>10} {'joins/s':>8} {'CPU ms/join':>12} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'max ms':>8} {'event p50':>10} {'event p99':>10} {'KiB/held':>9} {'gen ms/join':>12}  failures")
    enroll_lines: list[str] = []
    lines = [f"join storm: n={n} c={concurrency} hold={hold}  ({os.cpu_count()} cores, broker and load generator "
             "share them)", header, "-" * len(header)]
    for row in rows:
        if row.storm is None:
            lines.append(f"{row.name:{width}} skipped: {row.skipped}")
            continue
        if row.enrollment is not None:
            enrolled = row.enrollment
            fails_e = "; ".join(enrolled.issues()) or "-"
            enroll_lines.append(f"{row.name:{width}} {enrolled.devices:>8} {enrolled.issuances_per_second:>8.1f} "
                                f"{_fmt(enrolled.broker_cpu_ms_per_issuance, '.2f'):>13}  {fails_e}")
        s = row.storm
        c = s.to_json()["latency_connack_ms"] or {}
        e = s.to_json()["latency_event_ms"] or {}
        per_conn = row.hold.hold.rss_per_connection if row.hold and row.hold.hold else None
        held_ok = "" if row.hold is None or row.hold.ok else "  (hold: " + "; ".join(row.hold.problems()) + ")"
        fails = ", ".join(f"{k} {v}" for k, v in sorted(s.failures.items())) or "-"
        if s.retries:
            fails += "  retried: " + ", ".join(f"{k} {v}" for k, v in sorted(s.retries.items()))
        lines.append(f"{row.name:{width}} {f'{s.joined}/{s.devices}':>10} {s.joins_per_second:8.1f} "
                     f"{_fmt(row.broker_cpu_ms, '.2f'):>12} {_fmt(c.get('p50')):>8} {_fmt(c.get('p99')):>8} "
                     f"{_fmt(c.get('max')):>8} {_fmt(e.get('p50')):>10} {_fmt(e.get('p99')):>10} "
                     f"{_fmt(per_conn / 1024 if per_conn is not None else None):>9} "
                     f"{_fmt(row.loadgen_cpu_ms, '.2f'):>12}  {fails}{held_ok}")
    if enroll_lines:
        head = f"{'target':{width}} {'enrolled':>8} {'iss/s':>8} {'CPU ms/iss':>13}  problems"
        lines += ["", "enrollment after the storm (--enroll): each device reconnects with its birth certificate, "
                  "sends a CSR, reconnects with the issued certificate (commit) and once more", head, "-" * len(head),
                  *enroll_lines]
    samples: dict[str, list[float]] = {}
    for r in rows:
        if r.storm is not None and r.broker_cpu_ms is not None:
            samples.setdefault(r.name, []).append(r.broker_cpu_ms)
    cpu = {name: statistics.median(values) for name, values in samples.items()}
    jitp = cpu.get("jitp")
    repeated = any(len(v) > 1 for v in samples.values())
    for other in sorted(cpu):
        if jitp and other != "jitp" and cpu[other]:
            note = f"  (medians of {len(samples['jitp'])} and {len(samples[other])} runs)" if repeated else ""
            lines.append(f"CPU per join, jitp / {other}: {jitp / cpu[other]:.3f}x{note}")
    lines.extend(protocol_lines(cpu))
    lines.append("CPU ms/join: broker CPU from just before the storm to 1 s after it / joins (jitp: includes the "
                 "registry write, audit and event delivery). p50/p99/max: TCP connect -> CONNACK. event: TCP "
                 "connect -> provisioned event at the service subscriber. KiB/held: broker RSS delta / held "
                 "connections, on a freshly started broker (jitp: devices already provisioned). gen: load "
                 "generator CPU per join.")
    if enroll_lines:
        lines.append("iss/s: enrolled devices / wall time of the enrollment phase. CPU ms/iss: broker CPU over that "
                     "phase / enrolled devices: one CSR (parse, proof of possession, ECDSA signature, sealed audited "
                     "registry write) with its three mTLS connects (birth, commit, final).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="devices joining (default 1000)")
    parser.add_argument("-c", type=int, default=200, help="handshakes in flight at most (default 200)")
    parser.add_argument("--hold", type=int, default=1000, help="connections held for the memory phase (0: skip)")
    parser.add_argument("--hold-seconds", type=float, default=3.0)
    parser.add_argument("--targets", default="amqtt,mosquitto,jitp",
                        help="comma-separated: amqtt, mosquitto, jitp, jitp:workers=N (jitp serve --workers N), "
                        "jitp@REV (jitp as of git revision REV), floor (stdlib asyncio TLS + CONNACK only), "
                        "floor-bio (MemoryBIO TLS + CONNACK only); NAME/v5: NAME with MQTT 5.0 clients (not amqtt)")
    parser.add_argument("--repeat", type=int, default=1, help="run the targets this many times, interleaved; "
                        "ratios then use each target's median")
    parser.add_argument("--inject-refusals", type=int, default=50,
                        help="jitp+metrics: unknown-CA connects after the storm, counted in /metrics")
    parser.add_argument("--enroll", action="store_true",
                        help="jitp targets: an issuing CA (jitp issuer init), and after the storm every joined "
                        "device enrolls over MQTT (CSR) and commits; adds issuances/s and broker CPU per issuance")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "jitp-bench",
                        help="PKI, fleet (cached) and broker logs")
    args = parser.parse_args(argv)
    raise_fd_limit()
    lean_tls_buffers()  # the load generator's own memory; brokers are other processes
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    layout = certs.PkiLayout(work / "pki")
    if not layout.root_key.exists():
        certs.init_pki(layout.dir)
    size = max(args.n, args.hold)
    t0 = time.perf_counter()
    fleet = create_fleet(layout.dir, size, work / f"fleet-{size}", prefix="bench-")
    print(f"fleet of {len(fleet)} devices ready in {time.perf_counter() - t0:.1f} s ({fleet.dir})", file=sys.stderr)
    starters = {"amqtt": start_amqtt, "mosquitto": start_mosquitto, "jitp": start_jitp, "floor": start_floor,
                "floor-bio": start_floor_bio, "jitp+metrics": functools.partial(start_jitp, metrics=True)}
    if args.enroll:
        starters["jitp"] = functools.partial(start_jitp, issuer=True)
    checks: list[str] = []
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    for name in names:
        base, protocol = split_protocol(name)
        if base.startswith("jitp@"):
            starters[base] = functools.partial(start_jitp, revision=base.removeprefix("jitp@"))
        if base.startswith("jitp:workers="):
            starters[base] = functools.partial(start_jitp, workers=int(base.split("=", 1)[1]))
        if base not in starters:
            parser.error(f"unknown target {name!r}")
        if protocol == 5 and base in NO_V5:
            parser.error(f"{name}: {base} has no MQTT 5")
    rows: list[Row] = []
    for name in names * args.repeat:
        base, protocol = split_protocol(name)
        if base == "mosquitto" and not Path(MOSQUITTO).exists() and shutil.which("mosquitto") is None:
            rows.append(Row(name, None, None, None, None,
                            skipped="not installed: sudo apt-get install mosquitto"))
            continue
        print(f"\n== {name}", file=sys.stderr)
        enrollment = None
        with running(starters[base](layout, work)) as broker:
            try:
                storm, broker_ms, gen_ms = asyncio.run(storm_phase(broker, layout, fleet, n=args.n,
                                                                   concurrency=args.c, protocol=protocol))
            except ConnectFailed as exc:  # the event subscriber refused, e.g. a broker without MQTT 5
                rows.append(Row(name, None, None, None, None, skipped=f"the service could not connect: {exc}"))
                continue
            if args.enroll and name == "jitp":
                enrollment = asyncio.run(enroll_phase(broker, layout, fleet, storm, concurrency=args.c))
                print("\n".join(enrollment.notes() + enrollment.issues()), file=sys.stderr)
            if broker.metrics_port is not None:
                inject_refusals(broker, layout, work, args.inject_refusals)
                checks.append(f"{name}: {check_counts(broker, storm, args.inject_refusals)}")
                print(checks[-1], file=sys.stderr)
        print(storm.table(), file=sys.stderr)
        held = None
        if args.hold:
            time.sleep(1.0)
            with running(starters[base](layout, work, fresh=False)) as broker:
                held = asyncio.run(hold_phase(broker, layout, fleet, n=args.hold, concurrency=args.c,
                                              seconds=args.hold_seconds, protocol=protocol))
            print(held.table(), file=sys.stderr)
        rows.append(Row(name, storm, held, broker_ms, gen_ms, enrollment=enrollment))
        time.sleep(1.0)
    print()
    print(table(rows, n=args.n, concurrency=args.c, hold=args.hold))
    for line in checks:
        print(line)
    ok = all(r.storm is None or r.storm.ok for r in rows) and not any("MISMATCH" in c for c in checks)
    ok = ok and all(r.enrollment is None or not r.enrollment.issues() for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
