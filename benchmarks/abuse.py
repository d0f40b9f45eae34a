"""Issue 12's attacks, measured: a bystander's throughput after subscription churn, and broker RSS
after a slow reader and a retained flood, for jitp and (with --baseline REV) jitp as of REV.

    .venv/bin/python benchmarks/abuse.py                       # this tree only
    .venv/bin/python benchmarks/abuse.py --baseline 31e38fa    # and the commit before the fixes

Each target is a ``jitp serve`` process of its own (RSS read from /proc). Run on demand; never
part of the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.join_storm import Broker, running, start_jitp  # noqa: E402
from tests.helpers import Identity, Pki, client_context, connect  # noqa: E402
from tests.rawmqtt import (  # noqa: E402
    connect_packet,
    raw_publish,
    recv_exact,
    subscribe_packet,
    unsubscribe_packet,
)

_IDS: dict[str, Identity] = {}


def device(pki: Pki, name: str) -> Identity:
    """One certificate per device id (a second one for the same id would be an identity conflict)."""
    if name not in _IDS:
        _IDS[name] = pki.device(name)
    return _IDS[name]


def rss_mb(broker: Broker) -> float:
    for line in Path(f"/proc/{broker.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def raw_session(broker: Broker, pki: Pki, ident: Identity) -> ssl.SSLSocket:
    sock = client_context(pki, ident).wrap_socket(
        socket.create_connection(("127.0.0.1", broker.port), timeout=10), server_hostname="127.0.0.1"
    )
    sock.sendall(connect_packet(ident.name, keepalive=600))
    assert recv_exact(sock, 4)[3] == 0, "not admitted"
    return sock


def bystander_rate(broker: Broker, pki: Pki, n: int) -> float:
    """Messages per second from a device (QoS 1, all PUBACKs awaited) to a service subscriber."""
    device_ = device(pki, "bystander-01")
    if "bench-svc" not in _IDS:
        _IDS["bench-svc"] = pki.service("bench-svc")
    sub = connect(broker.port, pki, _IDS["bench-svc"])
    assert sub.rc == 0, sub.error
    sub.subscribe("devices/bystander-01/#", qos=1)
    pub = connect(broker.port, pki, device_)
    assert pub.rc == 0, pub.error
    sub.messages.clear()
    start = time.perf_counter()
    infos = [pub.client.publish("devices/bystander-01/t", b"%d" % i, qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(120)
    assert sub.wait_for(lambda: len(sub.messages) >= n, timeout=120), f"{len(sub.messages)} of {n}"
    rate = n / (time.perf_counter() - start)
    pub.close()
    sub.close()
    return rate


def churn(broker: Broker, pki: Pki, pairs: int) -> float:
    """``pairs`` SUBSCRIBE/UNSUBSCRIBE pairs inside the attacker's own namespace, pipelined."""
    ident = device(pki, "churner-01")
    sock = raw_session(broker, pki, ident)
    expected = pairs * (5 + 4)  # SUBACK + UNSUBACK
    got = [0]

    def drain() -> None:
        sock.settimeout(120)
        while got[0] < expected:
            chunk = sock.recv(65536)
            if not chunk:
                return
            got[0] += len(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    start = time.perf_counter()
    for i in range(pairs):
        f = f"devices/churner-01/cmd/{i}"
        pid = (2 * i) % 65000 + 1
        sock.sendall(subscribe_packet(pid, [(f, 1)]) + unsubscribe_packet(pid + 1, [f]))
    reader.join(180)
    elapsed = time.perf_counter() - start
    sock.close()
    return elapsed


def slow_reader(broker: Broker, pki: Pki, megabytes: int) -> None:
    """Subscribes to itself, never reads, publishes QoS 0 until ``megabytes`` or the broker stops it."""
    ident = device(pki, "slow-01")
    sock = raw_session(broker, pki, ident)
    sock.sendall(subscribe_packet(1, [("devices/slow-01/cmd/#", 0)]))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    packet = raw_publish("devices/slow-01/cmd/x", b"x" * 65536, qos=0)
    sock.settimeout(5)
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        for _ in range(megabytes * 16):
            sock.sendall(packet)
    sock.close()


def retained_flood(broker: Broker, pki: Pki, count: int, size: int) -> int:
    ident = device(pki, "retainer-01")
    conn = connect(broker.port, pki, ident)
    assert conn.rc == 0, conn.error
    payload = b"r" * size
    acked = 0
    for i in range(count):
        info = conn.client.publish(f"devices/retainer-01/r/{i}", payload, qos=1, retain=True)
        info.wait_for_publish(30)
        acked += info.is_published()
    conn.close()
    return acked


def measure(broker: Broker, pki: Pki, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    out["clean msgs/s"] = bystander_rate(broker, pki, args.messages)
    out["churn s"] = churn(broker, pki, args.pairs)
    out["after churn msgs/s"] = bystander_rate(broker, pki, args.messages)
    out["rss before floods MB"] = rss_mb(broker)
    slow_reader(broker, pki, args.slow_mb)
    out["rss after slow reader MB"] = rss_mb(broker)
    retained_flood(broker, pki, args.retained, args.retained_size)
    out["rss after retained flood MB"] = rss_mb(broker)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV", help="also measure jitp as of this git revision")
    parser.add_argument("--pairs", type=int, default=100_000, help="subscribe/unsubscribe pairs (100000)")
    parser.add_argument("--messages", type=int, default=2000, help="bystander messages per phase (2000)")
    parser.add_argument("--slow-mb", type=int, default=512, help="MB the slow reader pushes (512)")
    parser.add_argument("--retained", type=int, default=2000, help="retained messages in the flood (2000)")
    parser.add_argument("--retained-size", type=int, default=200_000, help="bytes each (200000)")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="jitp-abuse-") as tmp:
        work = Path(tmp)
        pki = Pki(work / "pki")
        targets = [("jitp", None)] + ([(f"jitp@{args.baseline}", args.baseline)] if args.baseline else [])
        for name, revision in targets:
            with running(start_jitp(pki.layout, work, revision=revision)) as broker:
                results[name] = measure(broker, pki, args)
                print(f"{name}: {results[name]}", flush=True)
    keys = list(next(iter(results.values())))
    names = list(results)
    print("\n| measure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{results[n][key]:.1f}" for n in names) + " |")
    for n in names:
        r = results[n]
        print(f"{n}: bystander after/before churn = {r['after churn msgs/s'] / r['clean msgs/s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
