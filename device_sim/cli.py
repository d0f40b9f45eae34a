"""``python -m device_sim`` / ``jitp-sim``: fleet creation and load scenarios."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from device_sim.backoff import Backoff
from device_sim.fleet import (
    Fleet,
    ServiceCreds,
    Target,
    create_fleet,
    create_region_fleet,
    lean_tls_buffers,
    parse_regions,
    raise_fd_limit,
)
from device_sim.mqtt import PROTOCOLS
from device_sim.report import Report, write_histogram
from device_sim.scenarios import run_chaos, run_hold, run_ramp, run_reconnect, run_storm, run_telemetry

SCENARIOS = ("storm", "ramp", "reconnect", "hold", "telemetry", "chaos")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _protocol_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protocol",
        type=int,
        choices=PROTOCOLS,
        default=4,
        help="MQTT protocol level of every connection (devices and service): 4 = MQTT 3.1.1 "
        "(default), 5 = MQTT 5.0",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jitp-sim",
        description="Device fleet simulator and load generator "
        "for mTLS MQTT brokers (jitp, Mosquitto, amqtt, ...).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fleet = sub.add_parser("fleet", help="device identities").add_subparsers(
        dest="fleet_command", required=True
    )
    p = fleet.add_parser(
        "create",
        help="issue device identities under the manufacturer CA, or one CA per region (cached)",
        description="Issue --count devices under the PKI's manufacturer CA, or a multi-region fleet "
        "with --regions: one manufacturer CA per region (an intermediate under the PKI root, cached in "
        "the fleet directory), device ids <prefix><region>-<n>. Then register each regional CA with "
        "its region: the commands are printed.",
    )
    p.add_argument("--pki", required=True, type=Path, help="a 'jitp pki init' directory")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--count", type=int, help="devices under the manufacturer CA")
    size.add_argument(
        "--regions",
        metavar="REGION=N[:TEMPLATE],...",
        help="a multi-region fleet, e.g. eu-west=500,us-east=300,ap-south=200 (a template name after "
        "':' is added to the printed 'jitp ca register' command)",
    )
    p.add_argument("--out", required=True, type=Path, help="fleet directory")
    p.add_argument("--prefix", default="dev-")
    p.add_argument(
        "--region", help="with --count: the region the devices' events must carry (recorded in the fleet)"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="the broker's data dir, added to the printed 'jitp ca register' commands",
    )
    p.add_argument("--workers", type=int, help="issuing processes (default: CPU count)")
    p.add_argument("--force", action="store_true", help="re-issue even if a matching fleet exists")

    p = sub.add_parser(
        "rotate",
        help="devices enroll over MQTT (CSR), reconnect with the new certificate and commit, with faults "
        "(never reconnect, old certificate, bad CSR signature, lost answer); cross-checks the events",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--ca", required=True, type=Path, help="CA bundle that verifies the broker (root CA)")
    p.add_argument("--fleet", required=True, type=Path)
    p.add_argument("-n", type=int, help="devices (default: the whole fleet)")
    p.add_argument("-c", "--concurrency", type=int, default=50)
    p.add_argument("--service-cert", type=Path, required=True)
    p.add_argument("--service-key", type=Path, required=True)
    p.add_argument("--service-client-id")
    p.add_argument("--json", type=Path, help="write the summary as JSON")
    _protocol_argument(p)

    for name in SCENARIOS:
        p = sub.add_parser(name, help=_HELP[name])
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8883)
        p.add_argument("--ca", required=True, type=Path, help="CA bundle that verifies the broker (root CA)")
        p.add_argument("--server-name", help="TLS server name to verify (default: --host)")
        p.add_argument(
            "--service-cert",
            type=Path,
            required=name == "telemetry",
            help="service identity counting provisioned events"
            + (" and receiving the telemetry" if name == "telemetry" else ""),
        )
        p.add_argument("--service-key", type=Path, required=name == "telemetry")
        p.add_argument(
            "--service-client-id",
            help="the service's MQTT client id (default: the subject CN of --service-cert, "
            "which is what jitp requires)",
        )
        p.add_argument("--data-dir", type=Path, help="the broker's local data dir: cross-check its registry")
        p.add_argument("--broker-pid", type=int, help="local broker process: report its CPU and RSS")
        p.add_argument(
            "--source-ip",
            action="append",
            default=[],
            help="local source address to spread connections over (repeatable, e.g. 127.0.0.2)",
        )
        p.add_argument("--timeout", type=float, default=30.0, help="per connect attempt, seconds")
        p.add_argument("--json", type=Path, help="write the report as JSON")
        p.add_argument("--no-progress", action="store_true")
        _protocol_argument(p)
        if name == "chaos":
            p.add_argument("--pki", required=True, type=Path, help="the PKI dir (signs the bad identities)")
            continue
        p.add_argument("--fleet", required=True, type=Path)
        p.add_argument("-n", type=int, help="devices (default: the whole fleet)")
        p.add_argument("--seed", type=int, help="seed the back-off jitter")
        p.add_argument("--attempts", type=int, default=8, help="connection attempts per device")
        p.add_argument("--backoff-base", type=float, default=0.5)
        p.add_argument("--backoff-cap", type=float, default=30.0)
        p.add_argument("--event-timeout", type=float, default=30.0)
        p.add_argument("--histogram", type=Path, help="latency histogram PNG (needs matplotlib)")
        if name == "storm":
            p.add_argument(
                "--enroll",
                action="store_true",
                help="then every joined device enrolls (CSR over MQTT) and reconnects with its operational "
                "certificate; cross-checks certificate-issued events (needs --service-cert/--service-key "
                "and an issuing CA: jitp issuer init)",
            )
        if name == "ramp":
            p.add_argument("--rate", type=float, required=True, help="joins started per second")
            p.add_argument("-c", "--concurrency", type=int, help="optional cap on connects in flight")
        else:
            p.add_argument("-c", "--concurrency", type=int, default=100, help="connects in flight at most")
        if name == "telemetry":
            p.add_argument(
                "-m",
                "--messages",
                type=_positive_int,
                default=20,
                help="QoS 1 messages per device (default: 20)",
            )
            p.add_argument(
                "--inflight",
                type=_positive_int,
                default=20,
                help="PUBACKs a device awaits at most at once (default: 20)",
            )
            p.add_argument(
                "--delivery-timeout",
                type=float,
                default=30.0,
                help="seconds to wait for every acknowledged message to arrive (default: 30)",
            )
        if name == "hold":
            p.add_argument("--seconds", type=float, required=True)
            p.add_argument("--keepalive", type=int, default=30)
            p.add_argument("--publish-interval", type=float, default=5.0, help="telemetry period; 0 disables")
    return parser


_HELP = {
    "storm": "all devices join at once, at most -c handshakes in flight",
    "ramp": "devices join at --rate per second",
    "reconnect": "an already provisioned fleet rejoins: expects 0 new provisioned events",
    "hold": "connect N and keep them connected (pings, telemetry); broker memory per connection",
    "telemetry": "N devices publish -m QoS 1 messages each and disconnect at once; the service "
    "subscriber must receive every acknowledged one",
    "chaos": "bad identities (expired, unknown CA, id mismatch, unsafe ids): each must be refused",
}


def _service(args: argparse.Namespace) -> ServiceCreds | None:
    if args.service_cert is None and args.service_key is None:
        if args.service_client_id is not None:
            raise SystemExit("jitp-sim: --service-client-id goes with --service-cert and --service-key")
        return None
    if args.service_cert is None or args.service_key is None:
        raise SystemExit("jitp-sim: --service-cert and --service-key go together")
    creds = ServiceCreds(cert=args.service_cert, key=args.service_key, client_id=args.service_client_id)
    try:
        creds.mqtt_client_id  # noqa: B018 - read the CN now: a bad certificate is a usage error
    except ValueError as exc:
        raise SystemExit(f"jitp-sim: --service-cert: {exc}") from None
    return creds


async def _run(args: argparse.Namespace) -> Report:
    target = Target(
        host=args.host,
        port=args.port,
        ca=args.ca,
        server_hostname=args.server_name,
        broker_pid=args.broker_pid,
        source_addresses=tuple(args.source_ip),
        connect_timeout=args.timeout,
        protocol=args.protocol,
    )
    service = _service(args)
    registry = args.data_dir / "registry.db" if args.data_dir else None
    progress = not args.no_progress
    if args.command == "chaos":
        return await run_chaos(target, args.pki, service=service, registry_path=registry, progress=progress)
    fleet = Fleet.load(args.fleet)
    backoff = Backoff(base=args.backoff_base, cap=args.backoff_cap, attempts=args.attempts)
    common = {
        "service": service,
        "registry_path": registry,
        "backoff": backoff,
        "seed": args.seed,
        "progress": progress,
    }
    if args.command == "storm":
        if args.enroll and service is None:
            raise SystemExit("jitp-sim: storm --enroll needs --service-cert and --service-key")
        return await run_storm(
            target,
            fleet,
            n=args.n,
            concurrency=args.concurrency,
            event_timeout=args.event_timeout,
            enroll=args.enroll,
            **common,
        )
    if args.command == "ramp":
        return await run_ramp(
            target,
            fleet,
            rate=args.rate,
            n=args.n,
            concurrency=args.concurrency,
            event_timeout=args.event_timeout,
            **common,
        )
    if args.command == "reconnect":
        return await run_reconnect(target, fleet, n=args.n, concurrency=args.concurrency, **common)
    if args.command == "telemetry":
        assert service is not None  # required by the parser
        del common["service"]
        return await run_telemetry(
            target,
            fleet,
            service=service,
            n=args.n,
            messages=args.messages,
            inflight=args.inflight,
            concurrency=args.concurrency,
            delivery_timeout=args.delivery_timeout,
            event_timeout=args.event_timeout,
            **common,
        )
    n = args.n if args.n is not None else len(fleet)
    return await run_hold(
        target,
        fleet,
        n=n,
        seconds=args.seconds,
        concurrency=args.concurrency,
        keepalive=args.keepalive,
        publish_interval=args.publish_interval or None,
        event_timeout=args.event_timeout,
        **common,
    )


def _fleet_create(args: argparse.Namespace) -> int:
    if args.regions is not None:
        if args.region is not None:
            raise SystemExit(
                "jitp-sim: --region goes with --count; with --regions each region has its own CA"
            )
        try:
            specs = parse_regions(args.regions)
        except ValueError as exc:
            raise SystemExit(f"jitp-sim: --regions: {exc}") from None
        try:
            fleet = create_region_fleet(
                args.pki, specs, args.out, prefix=args.prefix, workers=args.workers, force=args.force
            )
        except FileNotFoundError as exc:
            raise SystemExit(f"jitp-sim: error: {exc}") from None
        print(f"fleet of {len(fleet)} devices in {fleet.dir} across {len(fleet.regions)} regions")
        width = max(len(r) for r in fleet.regions)
        for name, ca in fleet.regions.items():
            ids = [d.device_id for d in fleet.devices if d.region == name]
            print(f"  {name:<{width}}  {ca.count:>7} devices  CA {ca.cert}  ({ids[0]} .. {ids[-1]})")
        print("register each regional CA with its region before a run:")
        for command in fleet.register_commands(data_dir=args.data_dir):
            print(f"  {command}")
        return 0
    try:
        fleet = create_fleet(
            args.pki,
            args.count,
            args.out,
            prefix=args.prefix,
            region=args.region,
            workers=args.workers,
            force=args.force,
        )
    except FileNotFoundError as exc:
        raise SystemExit(f"jitp-sim: error: {exc}") from None
    print(
        f"fleet of {len(fleet)} devices in {fleet.dir} "
        f"({fleet.devices[0].device_id} .. {fleet.devices[-1].device_id})"
        if len(fleet)
        else f"empty fleet in {fleet.dir}"
    )
    return 0


def _rotate(args: argparse.Namespace) -> int:
    """``jitp-sim rotate``: CSR -> reconnect -> commit for N devices, with faults (device_sim.rotate)."""
    from device_sim.rotate import rotate

    service = _service(args)
    if service is None:
        raise SystemExit("jitp-sim: rotate needs --service-cert and --service-key (it counts the events)")
    devices = list(Fleet.load(args.fleet).take(args.n))
    report = asyncio.run(
        rotate(
            devices,
            host=args.host,
            port=args.port,
            ca=args.ca,
            service_cert=service.cert,
            service_key=service.key,
            service_client_id=service.mqtt_client_id,
            concurrency=args.concurrency,
            protocol=args.protocol,
        )
    )
    summary = report.to_json()
    print(json.dumps(summary, indent=2, sort_keys=True))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, sort_keys=True))
    ok = not summary["stranded"] and not summary["duplicate_events"] and not summary["mismatched_events"]
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fleet":
        return _fleet_create(args)
    if args.command == "rotate":
        raise_fd_limit()
        return _rotate(args)
    limit = raise_fd_limit()
    lean_tls_buffers()
    try:
        report = asyncio.run(_run(args))
    except FileNotFoundError as exc:
        print(f"jitp-sim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(report.table())
    if limit < 2 * report.devices:
        print(f"note: file-descriptor limit {limit}; large runs may need more", file=sys.stderr)
    if args.json:
        report.write_json(args.json)
    if getattr(args, "histogram", None):
        print(write_histogram(report, args.histogram), file=sys.stderr)
    return 0 if report.ok else 1
