"""Scale-out benchmark: joins/s and broker CPU per join for 1 node on SQLite, 1 node on PostgreSQL,
and 2 nodes sharing PostgreSQL (SO_REUSEPORT: both listen on one port, the kernel spreads connects).

    .venv/bin/python benchmarks/scale_out.py -n 2000 -c 200 [--dsn postgresql://postgres@127.0.0.1:5432/test]

Each node is its own `jitp serve` process; CPU is read from /proc for every node. The load generator
shares this machine's cores with the nodes, so compare the rows with each other, not with other
machines. Run on demand; never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import certs  # noqa: E402
from benchmarks.join_storm import free_port  # noqa: E402
from device_sim import ServiceCreds, Target, create_fleet, run_storm  # noqa: E402
from device_sim.fleet import lean_tls_buffers, raise_fd_limit  # noqa: E402
from device_sim.procstat import try_sample  # noqa: E402
from device_sim.report import percentile  # noqa: E402

JITP = [sys.executable, "-m", "jitp.cli"]


def start_nodes(layout: certs.PkiLayout, work: Path, *, nodes: int, dsn: str | None,
                keyring_schema: str | None = None) -> tuple[list[subprocess.Popen[bytes]], int]:
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(work / "data-keys", ignore_errors=True)
    registry = ["--registry", dsn] if dsn else []
    keyring = f"postgres:\n  keyring_schema: {keyring_schema}\n" if keyring_schema else ""
    base = work / "base.yaml"
    base.write_text(keyring)
    subprocess.run([*JITP, "keys", "init", "--data-dir", str(data)], check=True, capture_output=True, cwd=ROOT)
    for cert, role in ((layout.manufacturer_cert, "device"), (layout.service_ca_cert, "service")):
        subprocess.run([*JITP, "ca", "register", str(cert), "--role", role, "--config", str(base),
                        "--data-dir", str(data), *registry], check=True, capture_output=True, cwd=ROOT)
    port = free_port()
    procs = []
    for i in range(nodes):
        config = work / f"node{i}.yaml"
        # Several nodes: one port (SO_REUSEPORT), and each relays the others' events to its subscribers.
        config.write_text((f"node_id: node-{i}\nlistener:\n  reuse_port: true\n" if nodes > 1 else "") + keyring)
        log = (work / f"node{i}.log").open("wb")
        procs.append(subprocess.Popen(
            [*JITP, "serve", "--config", str(config), "--data-dir", str(data), *registry, "--bind", f"127.0.0.1:{port}",
             "--server-cert", str(layout.server_cert), "--server-key", str(layout.server_key), "--log-level", "warning"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            time.sleep(1.0)  # let every node bind
            return procs, port
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("nodes did not start; see the node logs in " + str(work))


def stop_nodes(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def one(label: str, layout: certs.PkiLayout, fleet_dir: Path, work: Path, *, n: int, c: int, nodes: int,
              dsn: str | None) -> str:
    schema_dsn = None
    if dsn:
        schema = f"jitp_bench_{uuid.uuid4().hex[:8]}"
        schema_dsn = f"{dsn}{'&' if '?' in dsn else '?'}options=-csearch_path%3D{schema}"
        subprocess.run(["psql", dsn, "-qc", f"CREATE SCHEMA {schema}"], check=True, capture_output=True)
    procs, port = start_nodes(layout, work, nodes=nodes, dsn=schema_dsn,
                              keyring_schema=f"{schema}_keyring" if dsn else None)
    try:
        fleet = create_fleet(layout.dir, n, fleet_dir, prefix="so-")
        target = Target("127.0.0.1", port, ca=layout.root_cert)
        before = [try_sample(p.pid) for p in procs]
        report = asyncio.run(run_storm(target, fleet, n=n, concurrency=c,
                                       service=ServiceCreds(layout.service_client_cert, layout.service_client_key),
                                       progress=False))
        time.sleep(1.0)
        after = [try_sample(p.pid) for p in procs]
        cpu = sum(a.cpu_seconds - b.cpu_seconds for a, b in zip(after, before, strict=True) if a and b)
        p99 = percentile(report.connack_latencies, 99) * 1000 if report.connack_latencies else float("nan")
        rate = report.joins_per_second
        ok = "ok" if report.ok else "FAILED: " + "; ".join(report.problems())[:80]
        return (f"{label:24} {report.joined:>6}/{n:<6} {rate:>8.1f} {cpu * 1000 / max(report.joined, 1):>12.2f} "
                f"{p99:>9.0f}  {ok}")
    finally:
        stop_nodes(procs)
        if dsn:
            subprocess.run(["psql", dsn, "-qc", f"DROP SCHEMA {schema} CASCADE; DROP SCHEMA IF EXISTS {schema}_keyring CASCADE"],
                           capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("-c", type=int, default=200)
    parser.add_argument("--dsn", default=os.environ.get("JITP_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--work", default="/tmp/jitp-scale-out")
    args = parser.parse_args()
    raise_fd_limit()
    lean_tls_buffers()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pki_dir = work / "pki"
    layout = certs.PkiLayout(pki_dir) if (pki_dir / "root-ca.key").exists() else certs.init_pki(pki_dir)
    rows = [f"scale-out: n={args.n} c={args.c}  ({os.cpu_count()} cores shared by the nodes and the load generator)",
            f"{'configuration':24} {'joins':>13} {'joins/s':>8} {'CPU ms/join':>12} {'p99 ms':>9}  result"]
    for label, nodes, dsn in (("1 node, SQLite", 1, None), ("1 node, PostgreSQL", 1, args.dsn),
                              ("2 nodes, PostgreSQL", 2, args.dsn)):
        fleet_dir = work / f"fleet-{label.replace(' ', '').replace(',', '-')}"
        shutil.rmtree(fleet_dir, ignore_errors=True)  # fresh identities: every run is a first join
        rows.append(one(label, layout, fleet_dir, work, n=args.n, c=args.c, nodes=nodes, dsn=dsn))
        print(rows[-1], file=sys.stderr)
    print("\n".join(rows))
    print("CPU ms/join: all nodes' CPU during the storm (+1 s) / joins. p99: TCP connect -> CONNACK.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
