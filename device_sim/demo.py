"""`make demo`: a fresh dev PKI, a real jitp broker, real mTLS devices joining zero-touch,
then 1,000 simulated devices joining at once.

Everything lives under var/demo and is recreated on each run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

import certs
from device_sim import ServiceCreds, Target, create_fleet, run_storm

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "demo"
JITP = [sys.executable, "-m", "jitp.cli"]
DEVICES = 8
FLEET = 1000


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str) -> str:
    out = subprocess.run([*JITP, *args], check=True, capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the broker exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the broker did not start listening")


def mqtt_client(
    client_id: str,
    ca: Path,
    cert: Path,
    key: Path,
    *,
    clean: bool = True,
    protocol: MQTTProtocolVersion = mqtt.MQTTv311,
) -> mqtt.Client:
    if protocol == mqtt.MQTTv5:  # clean start; MQTT 5 has no clean_session
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, protocol=protocol
        )
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    client.tls_set_context(ctx)
    return client


def join(
    device: certs.DeviceFiles, ca: Path, port: int, *, protocol: MQTTProtocolVersion = mqtt.MQTTv311
) -> str:
    """One device: connect (its first connect is its enrollment), publish one reading, disconnect.
    The CONNACK's reason, with its MQTT 5 Reason String when there is one."""
    result: dict[str, str] = {}
    connected = threading.Event()
    client = mqtt_client(device.device_id, ca, device.cert_path, device.key_path, protocol=protocol)

    def on_connect(c: mqtt.Client, u: object, f: object, rc: ReasonCode, p: object) -> None:
        why = getattr(p, "ReasonString", None)
        result["rc"] = rc.getName() + (f" ({why})" if why else "")
        connected.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    connected.wait(10)
    if result.get("rc") == "Success":
        client.publish(
            f"devices/{device.device_id}/telemetry", json.dumps({"t": 21.5}), qos=1
        ).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    return result.get("rc", "no answer")


def main() -> int:
    if WORK.exists():
        shutil.rmtree(WORK)
    step("1. development PKI: root, manufacturer, service CAs, broker and service certificates")
    layout = certs.init_pki(WORK / "pki")
    print(
        run(
            "pki",
            "issue",
            "--dir",
            str(layout.dir),
            "--count",
            str(DEVICES),
            "--out",
            str(WORK / "devices"),
            "--prefix",
            "sensor-",
        )
    )
    devices = [
        certs.DeviceFiles(
            device_id=f"sensor-{i:05d}",
            cert_path=WORK / "devices" / f"sensor-{i:05d}.pem",
            key_path=WORK / "devices" / f"sensor-{i:05d}.key",
        )
        for i in range(1, DEVICES + 1)
    ]

    data = str(WORK / "data")
    step("2. the master key (device data is encrypted at rest; nothing starts without it)")
    print(run("keys", "init", "--data-dir", data).splitlines()[0])
    step("2b. register the manufacturer CA (devices, region eu-west) and the service CA")
    print(
        "device CA :",
        run("ca", "register", str(layout.manufacturer_cert), "--data-dir", data, "--region", "eu-west"),
    )
    print(
        "service CA:",
        run("ca", "register", str(layout.service_ca_cert), "--role", "service", "--data-dir", data),
    )

    port = free_port()
    step(f"3. start the broker: jitp serve on 127.0.0.1:{port} (mutual TLS)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (WORK / "broker.log").open("wb")
    proc = subprocess.Popen(
        [
            *JITP,
            "serve",
            "--data-dir",
            data,
            "--bind",
            f"127.0.0.1:{port}",
            "--server-cert",
            str(layout.server_cert),
            "--server-key",
            str(layout.server_key),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    sealed = False
    try:
        wait_port(port, proc)
        print(f"broker pid {proc.pid}, log in {WORK / 'broker.log'}")

        service = ServiceCreds.from_pki(layout.dir)
        step(
            f"4. a service subscriber ({service.mqtt_client_id}, the CN of its certificate; persistent "
            "session) listens on $jitp/events/#"
        )
        events: list[dict[str, object]] = []
        svc = mqtt_client(service.mqtt_client_id, layout.root_cert, service.cert, service.key, clean=False)
        svc.on_message = lambda c, u, m: events.append(json.loads(m.payload))
        svc.connect("127.0.0.1", port)
        svc.subscribe("$jitp/events/#", qos=1)
        svc.loop_start()
        time.sleep(0.5)

        step(f"5. {DEVICES} devices connect for the first time, concurrently")
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=DEVICES) as pool:
            outcomes = list(pool.map(lambda d: join(d, layout.root_cert, port), devices))
        print(
            f"CONNACKs: {outcomes.count('Success')} accepted of {len(outcomes)} "
            f"in {time.monotonic() - started:.2f} s (same connection, no drop-and-retry)"
        )

        step("6. a device reconnects: idempotent, no new record, no new event")
        print(f"{devices[0].device_id}: {join(devices[0], layout.root_cert, port)}")

        deadline = time.monotonic() + 5
        while len(events) < DEVICES and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        step(f"7. provisioning events the service subscriber received: {len(events)}")
        for e in sorted(events, key=lambda e: str(e["device_id"])):
            print(f"  {e['type']:12} {e['device_id']:14} region={e['region']}  event_id={e['event_id']}")
        svc.unsubscribe("$jitp/events/#")  # the simulator's subscriber reuses this identity below
        time.sleep(0.2)
        svc.loop_stop()
        svc.disconnect()

        step("7b. MQTT 5 on the same port: a device joins; a revoked one is told why")
        v5_joined = join(devices[1], layout.root_cert, port, protocol=mqtt.MQTTv5)
        print(f"{devices[1].device_id} (MQTT 5): {v5_joined}")
        run("devices", "revoke", devices[2].device_id, "--data-dir", data)
        # The broker learns of a revocation by the CLI (another process) from the outbox, within a second.
        deadline = time.monotonic() + 5
        while (
            not (v5_refused := join(devices[2], layout.root_cert, port, protocol=mqtt.MQTTv5)).startswith(
                "Banned"
            )
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        print(f"{devices[2].device_id} (MQTT 5, revoked): {v5_refused}")

        step("8. jitp devices show sensor-00001 (decrypted; on disk it is sealed)")
        shown = run("devices", "show", devices[0].device_id, "--data-dir", data, "--json")
        print(shown)
        subject = str(json.loads(shown)["subject"]).encode()
        on_disk = b"".join(f.read_bytes() for f in (WORK / "data").iterdir() if f.is_file())
        sealed = subject not in on_disk
        print(
            f"registry files ({len(on_disk)} bytes): device id in clear: {devices[0].device_id.encode() in on_disk}; "
            f"subject {subject.decode()!r} in clear: {subject in on_disk}"
        )

        step(f"9. {FLEET} simulated devices join at once (device_sim storm, 200 connects in flight)")
        fleet = create_fleet(layout.dir, FLEET, WORK / "fleet", prefix="dev-")
        target = Target("127.0.0.1", port, ca=layout.root_cert, broker_pid=proc.pid)
        report = asyncio.run(
            run_storm(
                target,
                fleet,
                concurrency=200,
                service=service,
                registry_path=WORK / "data" / "registry.db",
                progress=True,
            )
        )
        print(report.table())
        listed = run("devices", "list", "--data-dir", data).splitlines()
        print(f"registry: {listed[-1]}")

        step("10. jitp audit verify")
        print(run("audit", "verify", "--data-dir", data))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        log.close()
        step(f"11. broker stopped on SIGTERM (exit code {code})")
    ok = (
        outcomes.count("Success") == DEVICES
        and len(events) == DEVICES
        and v5_joined == "Success"
        and v5_refused.startswith("Banned (jitp refused the connection:")
        and report.ok
        and sealed
    )
    print("\ndemo OK" if ok else "\ndemo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
