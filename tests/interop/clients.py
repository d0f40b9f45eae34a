"""Real third-party MQTT clients, each driven through one small job language.

A :class:`Job` is one connection: who connects (a certificate and key on disk, the client id being
the certificate's name), at which protocol level, with a clean or a persistent session, and the steps
to take once accepted: subscribe (waits for the SUBACK), publish (QoS 1 waits for the PUBACK),
ready (tells a test running the job in a thread that the steps before are done) and expect (waits
until that many messages have arrived). A client driver runs the job with the real
client and reports what that client showed in an :class:`Outcome`: the CONNACK code, the session
present flag, the refusal text, the protocol level it really spoke, the granted QoS and the messages.

Drivers: paho-mqtt (bare, and in MQTT 5 with properties on every packet), aiomqtt, gmqtt (at MQTT 5
on its defaults: no version is passed), Debian's mosquitto_pub/_sub/_rr and MQTT.js (node, the
script beside this file). Every wait has a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
import gmqtt  # type: ignore[import-untyped]  # gmqtt ships no type information
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.helpers import _V3_CONNACK as V311_CONNACK  # paho 2's names for 3.1.1 return codes
from tests.helpers import Identity, wait_until

DEADLINE = 10.0  # seconds a job may take, each wait in it included
NODE_DIR = Path(__file__).parent / "node"
MQTTJS_SCRIPT = NODE_DIR / "client.mjs"
MQTTJS_READY = '{"ready":true}'  # the line the script prints at a ready step


# -- the job language ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Subscribe:
    filter: str
    qos: int = 1


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Expect:
    count: int  # wait until this many messages have arrived on this connection


@dataclass(frozen=True)
class Ready:
    """Tells the test that the steps before it are done (a subscriber is live): sets ``event``."""

    event: threading.Event = field(default_factory=threading.Event, compare=False)


Step = Subscribe | Publish | Expect | Ready


@dataclass(frozen=True)
class Job:
    port: int
    ca: Path
    identity: Identity  # the client id is its name (a device's id, a service's name) unless as_id
    version: int  # 4 (MQTT 3.1.1) or 5
    steps: tuple[Step, ...] = ()
    clean: bool = True  # 3.1.1 clean session / 5 clean start
    session_expiry: int | None = None  # MQTT 5 Session Expiry Interval (seconds); 3.1.1 has none
    as_id: str | None = None  # a client id other than the identity's name

    @property
    def client_id(self) -> str:
        return self.as_id or self.identity.name

    def tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(str(self.identity.cert_path), str(self.identity.key_path))
        return ctx


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass
class Outcome:
    """What the client showed. ``connack`` is the wire code (3.1.1 return code, 5 reason code)."""

    connack: int | None = None
    session_present: bool | None = None  # None: this client does not tell
    reason: str = ""  # the refusal as the client shows it (reason string, error text)
    protocol: int | None = None  # the protocol level the client spoke, where it tells
    granted: list[int] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.connack == 0

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]


class Client(Protocol):
    name: str
    versions: tuple[int, ...]  # the protocol levels this driver is run at

    def run(self, job: Job) -> Outcome: ...


class Missing(Exception):
    """A client's program is not on this machine."""


# -- paho-mqtt ------------------------------------------------------------------------------------
# What paho-props sends beyond the bare client: properties on CONNECT, SUBSCRIBE and PUBLISH.
USER_PROPERTY = ("interop", "jitp")


def properties(packet: int, **values: Any) -> Properties | None:
    """paho's Properties for ``packet`` with these values (None for none)."""
    props = Properties(packet)  # type: ignore[no-untyped-call]
    for key, value in values.items():
        setattr(props, key, value)
    return props if values else None


class Paho:
    """paho-mqtt 2, on its own network thread. ``properties``: MQTT 5 with properties everywhere."""

    def __init__(self, *, properties: bool = False) -> None:
        self.properties = properties
        self.name: str = "paho-props" if properties else "paho"
        self.versions: tuple[int, ...] = (5,) if properties else (4, 5)

    def run(self, job: Job) -> Outcome:
        v5 = job.version == 5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=job.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else job.clean,
            reconnect_on_failure=False,
        )
        client.tls_set_context(job.tls())
        out = Outcome(protocol=job.version)
        connacked, gone = threading.Event(), threading.Event()

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            out.connack = int(rc.value) if v5 else V311_CONNACK.get(rc.getName(), -1)
            out.session_present = bool(flags.session_present)
            out.reason = str(getattr(props, "ReasonString", "")) or rc.getName()
            connacked.set()

        def on_disconnect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            gone.set()
            connacked.set()

        def on_message(c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
            users = tuple(getattr(m.properties, "UserProperty", ()) or ())
            out.messages.append(Message(m.topic, bytes(m.payload), bool(m.retain), users))

        client.on_connect, client.on_disconnect, client.on_message = on_connect, on_disconnect, on_message
        connect_props: dict[str, Any] = {}
        if v5 and job.session_expiry is not None:
            connect_props["SessionExpiryInterval"] = job.session_expiry
        if v5 and self.properties:
            connect_props |= {
                "ReceiveMaximum": 20,
                "MaximumPacketSize": 256 * 1024,
                "TopicAliasMaximum": 10,
                "UserProperty": [USER_PROPERTY],
            }
        if v5:
            client.connect(
                "127.0.0.1",
                job.port,
                keepalive=30,
                clean_start=job.clean,
                properties=properties(PacketTypes.CONNECT, **connect_props),
            )
        else:
            client.connect("127.0.0.1", job.port, keepalive=30)
        client.loop_start()
        try:
            if not connacked.wait(DEADLINE) or out.connack is None:
                out.error = "no CONNACK"
                return out
            if out.accepted:
                try:
                    for step in job.steps:
                        self._step(client, step, out, v5)
                finally:
                    client.disconnect()
                if not gone.wait(DEADLINE):
                    out.error = "DISCONNECT not completed"
            return out
        finally:
            client.loop_stop()

    def _step(self, client: mqtt.Client, step: Step, out: Outcome, v5: bool) -> None:
        extra = v5 and self.properties
        if isinstance(step, Subscribe):
            done = threading.Event()

            def on_subscribe(c: Any, u: Any, mid: Any, codes: Any, props: Any) -> None:
                out.granted.extend(int(rc.value) for rc in codes)
                done.set()

            client.on_subscribe = on_subscribe
            if extra:
                client.subscribe(
                    step.filter,
                    options=SubscribeOptions(qos=step.qos),
                    properties=properties(PacketTypes.SUBSCRIBE, UserProperty=[USER_PROPERTY]),
                )
            else:
                client.subscribe(step.filter, step.qos)
            if not done.wait(DEADLINE):
                raise TimeoutError(f"no SUBACK for {step.filter}")
        elif isinstance(step, Publish):
            props = (
                properties(
                    PacketTypes.PUBLISH,
                    UserProperty=[USER_PROPERTY],
                    ContentType="text/plain",
                    PayloadFormatIndicator=1,
                )
                if extra
                else None
            )
            info = client.publish(step.topic, step.payload, step.qos, step.retain, properties=props)
            info.wait_for_publish(DEADLINE)
            if not info.is_published():
                raise TimeoutError(f"no PUBACK for {step.topic}")
        elif isinstance(step, Ready):
            step.event.set()
        elif not wait_until(lambda: len(out.messages) >= step.count, DEADLINE):
            raise TimeoutError(f"{len(out.messages)} of {step.count} messages arrived")


# -- asyncio clients ------------------------------------------------------------------------------
class AsyncDriver:
    """A client on its own event loop in the test's thread (the broker runs on another)."""

    name: str
    versions: tuple[int, ...] = (4, 5)

    def run(self, job: Job) -> Outcome:
        return asyncio.run(asyncio.wait_for(self._run(job), DEADLINE))

    async def _run(self, job: Job) -> Outcome:
        raise NotImplementedError


class Aiomqtt(AsyncDriver):
    name = "aiomqtt"

    async def _run(self, job: Job) -> Outcome:
        v5 = job.version == 5
        expiry = (
            {"SessionExpiryInterval": job.session_expiry} if v5 and job.session_expiry is not None else {}
        )
        client = aiomqtt.Client(
            "127.0.0.1",
            job.port,
            identifier=job.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else job.clean,
            clean_start=job.clean if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties(PacketTypes.CONNECT, **expiry),
            tls_context=job.tls(),
            timeout=DEADLINE,
        )
        out = Outcome(protocol=job.version)
        try:
            async with client:
                out.connack = 0
                for step in job.steps:
                    if isinstance(step, Subscribe):
                        granted = await client.subscribe(step.filter, step.qos)
                        out.granted.extend(g.value if isinstance(g, ReasonCode) else g for g in granted)
                    elif isinstance(step, Publish):
                        await client.publish(step.topic, step.payload, step.qos, step.retain)
                    elif isinstance(step, Ready):
                        step.event.set()
                    else:
                        async for m in client.messages:
                            assert isinstance(m.payload, bytes)
                            out.messages.append(Message(str(m.topic), m.payload, bool(m.retain)))
                            if len(out.messages) >= step.count:
                                break
        except MqttConnectError as exc:
            rc = exc.rc
            if isinstance(rc, ReasonCode):
                out.connack = int(rc.value) if v5 else V311_CONNACK.get(rc.getName(), -1)
            else:
                out.connack = rc
            out.reason = str(exc)
        return out


class Gmqtt(AsyncDriver):
    """gmqtt; at MQTT 5 on its defaults (``connect`` is given no version: it picks 5 itself)."""

    name = "gmqtt"

    async def _run(self, job: Job) -> Outcome:
        v5 = job.version == 5
        kwargs: dict[str, Any] = {}
        if v5 and job.session_expiry is not None:
            kwargs["session_expiry_interval"] = job.session_expiry
        client = gmqtt.Client(job.client_id, clean_session=job.clean, **kwargs)
        client.set_config({"reconnect_retries": 0})
        out = Outcome()
        arrived = asyncio.Event()
        acks: dict[int, asyncio.Future[list[int]]] = {}
        loop = asyncio.get_running_loop()

        def on_connect(c: Any, flags: int, rc: int, props: Any) -> None:
            out.connack = rc
            out.session_present = bool(flags)

        def on_message(c: Any, topic: str, payload: bytes, qos: int, props: dict[str, Any]) -> int:
            out.messages.append(Message(topic, payload, bool(props.get("retain", 0))))
            arrived.set()
            return 0

        def on_subscribe(c: Any, mid: int, granted: Any, props: Any) -> None:
            acks.setdefault(mid, loop.create_future()).set_result([int(q) for q in granted])

        client.on_connect, client.on_message, client.on_subscribe = on_connect, on_message, on_subscribe
        try:
            if v5:
                await client.connect("127.0.0.1", job.port, ssl=job.tls(), keepalive=30)  # its default: 5
            else:
                await client.connect(
                    "127.0.0.1", job.port, ssl=job.tls(), keepalive=30, version=gmqtt.constants.MQTTv311
                )
        except gmqtt.mqtt.handler.MQTTConnectError as exc:
            out.connack, out.reason = exc._code, str(exc)
            out.protocol = client._connection._protocol.proto_ver if client._connection else None
            await client.disconnect()
            return out
        out.protocol = client._connection._protocol.proto_ver
        try:
            for step in job.steps:
                if isinstance(step, Subscribe):
                    mid = client.subscribe(step.filter, qos=step.qos)
                    out.granted.extend(await acks.setdefault(mid, loop.create_future()))
                elif isinstance(step, Publish):
                    # gmqtt's publish does not wait for the PUBACK; its store of unacknowledged QoS 1
                    # messages empties when it arrives.
                    client.publish(step.topic, step.payload, qos=step.qos, retain=step.retain)
                    await client._persistent_storage.wait_empty()
                elif isinstance(step, Ready):
                    step.event.set()
                else:
                    while len(out.messages) < step.count:
                        arrived.clear()
                        await arrived.wait()
        finally:
            await client.disconnect()
        return out


# -- client programs ---------------------------------------------------------------------------------
def run_program(
    cmd: list[str], ready: Ready | None = None, is_ready: Callable[[str], bool] = lambda line: False
) -> tuple[int, list[str], str]:
    """Run a client program to its end, reading its output as it comes: ``ready`` is set at the
    first line ``is_ready`` accepts. Returns the exit code, the output's lines and the error output."""
    errors: list[str] = []
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        stderr = proc.stderr
        reader = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
        reader.start()
        watchdog = threading.Timer(DEADLINE + 5, proc.kill)
        watchdog.start()
        lines = []
        try:
            for raw in proc.stdout:
                lines.append(raw.rstrip("\n"))
                if ready is not None and is_ready(lines[-1]):
                    ready.event.set()
            proc.wait()
        finally:
            watchdog.cancel()
        reader.join(DEADLINE)
    return proc.returncode, lines, "".join(errors)


# -- Debian's mosquitto clients ---------------------------------------------------------------------
_CONNACK_DEBUG = re.compile(r"received CONNACK \((\d+)\)")
_SUBACK_DEBUG = re.compile(r"received SUBACK")
_GRANTED_DEBUG = re.compile(r"Subscribed \(mid: \d+\): ([\d, ]+)$")


class Mosquitto:
    """mosquitto_pub, mosquitto_sub and mosquitto_rr: one program run a job, chosen by its steps.

    A program holds one connection and does one thing, so the jobs it runs have fixed shapes:
    publish one message (mosquitto_pub), subscribe and publish to the same topic and get it back
    (mosquitto_rr), subscribe and leave at once (mosquitto_sub -E), subscribe and receive n messages
    (mosquitto_sub -C n; on a resumed session it repeats the subscription and skips retained ones).
    """

    name: str = "mosquitto"
    versions: tuple[int, ...] = (4, 5)

    def command(self, job: Job) -> list[str]:
        steps = tuple(s for s in job.steps if not isinstance(s, Ready))  # ready: at the SUBACK
        common = [
            "-h", "127.0.0.1", "-p", str(job.port), "-V", "mqttv5" if job.version == 5 else "mqttv311",
            "--cafile", str(job.ca), "--cert", str(job.identity.cert_path), "--key", str(job.identity.key_path),
            "-i", job.client_id, "-d",
        ]  # fmt: skip
        if not job.clean:
            common.append("-c")
        if job.version == 5 and job.session_expiry is not None:
            common += ["-x", str(job.session_expiry)]
        subs = [s for s in steps if isinstance(s, Subscribe)]
        topics = [arg for s in subs for arg in ("-t", s.filter)]
        qos = ["-q", str(max((s.qos for s in subs), default=0))]
        match steps:
            case (Publish() as p,):
                return self._tool("mosquitto_pub", common, "-t", p.topic, "-m", p.payload.decode(),
                                  "-q", str(p.qos), *(["-r"] if p.retain else []))  # fmt: skip
            case (Subscribe() as s, Publish() as p, Expect(count=1)) if s.filter == p.topic:
                return self._tool("mosquitto_rr", common, "-e", s.filter, "-t", p.topic,
                                  "-m", p.payload.decode(), "-q", str(p.qos), "-W", str(int(DEADLINE)), "-F", "%j")  # fmt: skip
            case () | (Subscribe(), *_) if len(subs) == len(steps):
                # Subscribe and leave once the SUBACK is in (just connect: a filter it may read).
                topics = topics or ["-t", f"devices/{job.client_id}/cmd/none"]
                return self._tool("mosquitto_sub", common, *topics, *qos, "-E")
            case (Subscribe(), *_, Expect() as e) if len(subs) == len(steps) - 1:
                # On a resumed session the repeated subscription would bring retained messages again.
                fresh = ["-R"] if not job.clean else []
                return self._tool("mosquitto_sub", common, *topics, *qos, *fresh,
                                  "-C", str(e.count), "-W", str(int(DEADLINE)), "-F", "%j")  # fmt: skip
        raise ValueError(f"no mosquitto program runs {steps}")

    def _tool(self, program: str, common: list[str], *args: str) -> list[str]:
        path = shutil.which(program)
        if path is None:
            raise Missing(f"{program} is not installed (Debian package mosquitto-clients)")
        # Into a pipe its output is block-buffered: line-buffered, the SUBACK line comes when it does.
        stdbuf = shutil.which("stdbuf")
        return [*([stdbuf, "-oL"] if stdbuf else []), path, *common, *args]

    def run(self, job: Job) -> Outcome:
        cmd = self.command(job)
        ready = next((s for s in job.steps if isinstance(s, Ready)), None)
        returncode, lines, stderr = run_program(cmd, ready, lambda line: bool(_GRANTED_DEBUG.match(line)))
        out = Outcome(protocol=job.version)
        for line in lines:
            if line.startswith("{"):
                doc = json.loads(line)
                payload = doc.get("payload", "")
                out.messages.append(Message(doc["topic"], payload.encode(), bool(doc.get("retain"))))
            elif m := _CONNACK_DEBUG.search(line):
                out.connack = int(m.group(1))
            elif m := _GRANTED_DEBUG.match(line):
                out.granted += [int(q) for q in m.group(1).split(",")]
            elif _SUBACK_DEBUG.search(line) and any(part.endswith("mosquitto_rr") for part in cmd[:3]):
                out.granted.append(-1)  # mosquitto_rr prints no granted QoS, only that the SUBACK came
        if returncode:
            out.error = f"exit {returncode}: {stderr.strip()}"
            said = [line for line in stderr.splitlines() if "Connection error" in line]
            out.reason = (said or stderr.strip().splitlines() or [out.error])[0]
        return out


# -- MQTT.js (node) ---------------------------------------------------------------------------------
class MqttJs:
    name: str = "mqttjs"
    versions: tuple[int, ...] = (4, 5)

    def node(self) -> str:
        node = shutil.which("node")
        if node is None:
            raise Missing("node is not installed")
        if not (NODE_DIR / "node_modules" / "mqtt").is_dir():
            raise Missing("MQTT.js is not installed: run `make interop-deps`")
        return node

    def run(self, job: Job) -> Outcome:
        spec = {
            "port": job.port,
            "ca": str(job.ca),
            "cert": str(job.identity.cert_path),
            "key": str(job.identity.key_path),
            "clientId": job.client_id,
            "version": job.version,
            "clean": job.clean,
            "sessionExpiry": job.session_expiry,
            "deadlineMs": int(DEADLINE * 1000),
            "steps": [_js_step(s) for s in job.steps],
        }
        ready = next((s for s in job.steps if isinstance(s, Ready)), None)
        returncode, lines, stderr = run_program(
            [self.node(), str(MQTTJS_SCRIPT), json.dumps(spec)], ready, lambda line: line == MQTTJS_READY
        )
        if returncode or not lines or lines[-1] == MQTTJS_READY:
            return Outcome(error=f"node exit {returncode}: {stderr.strip()}")
        doc = json.loads(lines[-1])
        return Outcome(
            connack=doc["connack"],
            session_present=doc["sessionPresent"],
            reason=doc["reason"],
            protocol=doc["protocol"],
            granted=list(doc["granted"]),
            messages=[Message(m["topic"], m["payload"].encode(), m["retain"]) for m in doc["messages"]],
            error=doc["error"],
        )


def _js_step(step: Step) -> dict[str, Any]:
    if isinstance(step, Subscribe):
        return {"subscribe": step.filter, "qos": step.qos}
    if isinstance(step, Publish):
        return {
            "publish": step.topic,
            "payload": step.payload.decode(),
            "qos": step.qos,
            "retain": step.retain,
        }
    if isinstance(step, Ready):
        return {"ready": True}
    return {"expect": step.count}


CLIENTS: dict[str, Callable[[], Client]] = {
    "paho": Paho,
    "paho-props": lambda: Paho(properties=True),
    "aiomqtt": Aiomqtt,
    "gmqtt": Gmqtt,
    "mosquitto": Mosquitto,
    "mqttjs": MqttJs,
}
