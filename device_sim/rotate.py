"""``jitp-sim rotate``: N devices through CSR enrollment, reconnect with the new certificate and
commit, with injected faults, then a cross-check.

Faults (device ``i`` gets ``FAULTS[i % len(FAULTS)]``, so every run has each of them):

* ``none``            the plain flow;
* ``never_reconnect`` it gets its certificate and never uses it (the pending one expires; the
  birth certificate stays its current one);
* ``old_certificate`` it reconnects with its old certificate first, then with the new one;
* ``wrong_key``       its first CSR's signature does not verify (rejected), then it sends a good one;
* ``answer_lost``     it ignores the first answer and asks again with the same request id (the same
  certificate must come back).

The cross-check: every device ends on exactly one current certificate (it connects with it at the
end, and the one it should not use is refused or unused), and the service saw exactly one
certificate-issued event per committed device, with the right fingerprints (no duplicates).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_sim.fleet import DeviceCreds, client_context
from device_sim.mqtt import ConnectFailed, Message, MqttClient

FAULTS = ("none", "never_reconnect", "old_certificate", "wrong_key", "answer_lost")


@dataclass
class DeviceResult:
    device_id: str
    fault: str
    birth_fp: str = ""
    new_fp: str = ""
    expected_current: str = ""  # the fingerprint it must end on
    error: str | None = None
    final_connect_ok: bool = False


@dataclass
class RotateReport:
    devices: list[DeviceResult] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stranded(self) -> list[str]:
        return [d.device_id for d in self.devices if d.error is not None or not d.final_connect_ok]

    @property
    def duplicate_events(self) -> int:
        counts = Counter(e["device_id"] for e in self.events)
        return sum(n - 1 for n in counts.values() if n > 1)

    @property
    def mismatched_events(self) -> list[str]:
        """Devices whose events do not match what they did (missing, unexpected or wrong fingerprints)."""
        by_device = {e["device_id"]: e for e in self.events}
        bad = []
        for d in self.devices:
            event = by_device.get(d.device_id)
            if d.fault == "never_reconnect" or d.error is not None:
                if event is not None:
                    bad.append(d.device_id)
            elif event is None or (event["previous_fingerprint"], event["new_fingerprint"]) != (
                d.birth_fp,
                d.new_fp,
            ):
                bad.append(d.device_id)
        return bad

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "faults": dict(Counter(d.fault for d in self.devices)),
            "stranded": self.stranded,
            "duplicate_events": self.duplicate_events,
            "mismatched_events": self.mismatched_events,
            "certificate_issued_events": len(self.events),
        }


def _fp(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _csr(key: ec.EllipticCurvePrivateKey, *, corrupt: bool = False) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sim")])
    der = bytearray(
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    if corrupt:
        der[-1] ^= 0x01  # the last bit of the signature: it parses, but proves nothing
    import base64

    body = base64.b64encode(bytes(der)).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{lines}\n-----END CERTIFICATE REQUEST-----\n"


class _Device:
    def __init__(
        self,
        creds: DeviceCreds,
        fault: str,
        *,
        host: str,
        port: int,
        ca: Path,
        workdir: Path,
        protocol: int = 4,
    ) -> None:
        self.protocol = protocol
        self.creds, self.fault, self.host, self.port, self.ca, self.workdir = (
            creds,
            fault,
            host,
            port,
            ca,
            workdir,
        )
        self.answers: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.result = DeviceResult(creds.device_id, fault)

    def _on_message(self, _: MqttClient, message: Message) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        self.answers.put_nowait((kind, json.loads(message.payload)))

    async def _connect(self, ctx: ssl.SSLContext) -> MqttClient:
        return await MqttClient.connect(
            self.host,
            self.port,
            ssl_context=ctx,
            client_id=self.creds.device_id,
            on_message=self._on_message,
            protocol=self.protocol,
        )

    async def _ask(self, client: MqttClient, request_id: str, csr: str) -> tuple[str, dict[str, Any]]:
        topic = f"$jitp/certificates/{self.creds.device_id}/create-from-csr"
        await client.publish(topic, json.dumps({"request_id": request_id, "csr": csr}).encode(), qos=1)
        return await asyncio.wait_for(self.answers.get(), 30)

    async def run(self) -> DeviceResult:
        r, creds = self.result, self.creds
        birth_ctx = client_context(self.ca, creds.cert, creds.key)
        birth_pem = creds.cert.read_bytes()
        r.birth_fp = _fp(x509.load_pem_x509_certificate(birth_pem).public_bytes(serialization.Encoding.DER))
        r.expected_current = r.birth_fp
        try:
            client = await self._connect(birth_ctx)
            await client.subscribe([(f"$jitp/certificates/{creds.device_id}/#", 1)])
            key = ec.generate_private_key(ec.SECP256R1())
            if self.fault == "wrong_key":
                kind, doc = await self._ask(client, "bad", _csr(key, corrupt=True))
                if (kind, doc.get("reason")) != ("rejected", "csr_signature_invalid"):
                    raise RuntimeError(f"a CSR with a bad signature got {kind} {doc}")
            kind, doc = await self._ask(client, "r1", _csr(key))
            if self.fault == "answer_lost":  # the answer never arrived: ask again, same request id
                kind2, doc2 = await self._ask(client, "r1", _csr(key))
                if kind2 != "accepted" or doc2.get("certificate_id") != doc.get("certificate_id"):
                    raise RuntimeError("the same request id did not return the same certificate")
            await client.disconnect()
            if kind != "accepted":
                raise RuntimeError(f"CSR rejected: {doc}")
            cert = x509.load_pem_x509_certificate(doc["certificate_pem"].encode())
            r.new_fp = _fp(cert.public_bytes(serialization.Encoding.DER))
            cert_path = self.workdir / f"{creds.device_id}.pem"
            key_path = self.workdir / f"{creds.device_id}.key"
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            key_path.chmod(0o600)
            new_ctx = client_context(self.ca, cert_path, key_path)
            if self.fault == "never_reconnect":
                final = birth_ctx
            else:
                if self.fault == "old_certificate":
                    await (await self._connect(birth_ctx)).disconnect()  # still allowed (pending only)
                await (await self._connect(new_ctx)).disconnect()  # the commit
                r.expected_current = r.new_fp
                final = new_ctx
            await (await self._connect(final)).disconnect()
            r.final_connect_ok = True
        except (ConnectFailed, RuntimeError, TimeoutError, OSError) as exc:
            r.error = f"{type(exc).__name__}: {exc}"
        return r


async def rotate(
    devices: list[DeviceCreds],
    *,
    host: str,
    port: int,
    ca: Path,
    service_cert: Path,
    service_key: Path,
    service_client_id: str,
    concurrency: int = 50,
    event_timeout: float = 30.0,
    protocol: int = 4,
    faults: tuple[str, ...] = FAULTS,
) -> RotateReport:
    """Device ``i`` gets ``faults[i % len(faults)]`` (``("none",)``: every device the plain flow)."""
    report = RotateReport()
    issued: list[dict[str, Any]] = []
    changed = asyncio.Event()

    def on_event(_: MqttClient, message: Message) -> None:
        issued.append(json.loads(message.payload))
        changed.set()

    service = await MqttClient.connect(
        host,
        port,
        ssl_context=client_context(ca, service_cert, service_key),
        client_id=service_client_id,
        on_message=on_event,
        protocol=protocol,
    )
    await service.subscribe([("$jitp/events/certificate-issued/+", 1)])
    semaphore = asyncio.Semaphore(concurrency)
    with tempfile.TemporaryDirectory(prefix="jitp-rotate-") as tmp:

        async def one(i: int, creds: DeviceCreds) -> DeviceResult:
            async with semaphore:
                return await _Device(
                    creds,
                    faults[i % len(faults)],
                    host=host,
                    port=port,
                    ca=ca,
                    workdir=Path(tmp),
                    protocol=protocol,
                ).run()

        report.devices = list(await asyncio.gather(*(one(i, d) for i, d in enumerate(devices))))
    expected = sum(1 for d in report.devices if d.error is None and d.fault != "never_reconnect")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + event_timeout
    while len(issued) < expected and loop.time() < deadline:
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), deadline - loop.time())
        except TimeoutError:
            break
    # Anything late would be a duplicate: one more round trip through the broker before counting.
    await service.ping()
    await service.disconnect()
    report.events = issued
    return report
