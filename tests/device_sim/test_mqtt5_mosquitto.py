"""device_sim's MQTT 5 client against a real MQTT 5 server: the system Mosquitto (plain TCP).

The address is ``$JITP_TEST_MOSQUITTO`` (default 127.0.0.1:1883). Without a reachable server these
tests are skipped, unless ``CI`` is set: then they fail, so a CI run cannot pass without them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import mqtt5
import pytest

from device_sim.mqtt import TRANSIENT_REASONS, ConnectFailed, Message, MqttClient, PublishProperties
from tests.helpers import wait_until, wait_until_async

T = TypeVar("T")
ADDRESS = os.environ.get("JITP_TEST_MOSQUITTO", "127.0.0.1:1883")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture(scope="session")
def mosquitto() -> tuple[str, int]:
    """A reachable MQTT 5 server, or skip (fail when CI is set)."""
    host, _, port = ADDRESS.rpartition(":")

    async def probe() -> None:
        client = await MqttClient.connect(
            host, int(port), ssl_context=None, client_id="jitp-probe", protocol=5, time_limit=5
        )
        await client.disconnect()

    try:
        run(probe())
        return host, int(port)
    except ConnectFailed as exc:
        message = f"no MQTT 5 server at {ADDRESS} ({exc})"
    if os.environ.get("CI"):
        pytest.fail(
            f"{message}. CI is set, so the MQTT 5 client tests must run: start mosquitto "
            "(apt-get install mosquitto) or set JITP_TEST_MOSQUITTO.",
            pytrace=False,
        )
    pytest.skip(f"{message}; set JITP_TEST_MOSQUITTO to run the MQTT 5 client tests")


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def __call__(self, _client: MqttClient, message: Message) -> None:
        self.messages.append(message)

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]


async def connect(
    server: tuple[str, int], client_id: str | None = None, *, protocol: int = 5, **kw: Any
) -> MqttClient:
    return await MqttClient.connect(
        server[0],
        server[1],
        ssl_context=None,
        client_id=f"sim5-{uuid.uuid4().hex[:12]}" if client_id is None else client_id,
        protocol=protocol,
        time_limit=10,
        **kw,
    )


def prefix() -> str:
    return f"jitp-test/{uuid.uuid4().hex}"


def test_v5_publish_and_subscribe_round_trip_every_property_at_qos_1(mosquitto: tuple[str, int]) -> None:
    props = PublishProperties(
        content_type="application/json",
        user_properties=(("schema", "jitp.event/1"), ("schema", "again"), ("ü", "✓")),
        response_topic="replies/sim5/1",
        correlation_data=b"\x00\x01req-7",
        payload_format_indicator=1,
        message_expiry_interval=3600,
    )

    async def scenario() -> tuple[list[int], MqttClient, list[Message]]:
        topic = f"{prefix()}/t"
        inbox = Inbox()
        sub = await connect(mosquitto, on_message=inbox)
        codes = await sub.subscribe([(topic, 1)])
        pub = await connect(mosquitto)
        await pub.publish(topic, b'{"v": 1}', qos=1, properties=props)
        await pub.publish(topic, b"plain", qos=0)
        assert await wait_until_async(lambda: len(inbox.on(topic)) == 2), inbox.messages
        await pub.disconnect()
        await sub.disconnect()
        return codes, sub, inbox.on(topic)

    codes, sub, (first, second) = run(scenario())
    assert codes == [1]  # granted QoS 1
    assert sub.protocol == 5 and sub.connack is not None
    assert (first.payload, first.qos, first.retain) == (b'{"v": 1}', 1, False)
    assert first.content_type == "application/json"
    assert first.user_properties == props.user_properties  # order and repeats kept
    assert (first.response_topic, first.correlation_data) == ("replies/sim5/1", b"\x00\x01req-7")
    assert first.payload_format_indicator == 1
    assert first.message_expiry_interval is not None and 0 < first.message_expiry_interval <= 3600
    assert (second.payload, second.qos, second.content_type, second.user_properties) == (
        b"plain",
        0,
        None,
        (),
    )


def test_v5_and_v3_clients_reach_each_other(mosquitto: tuple[str, int]) -> None:
    async def scenario() -> tuple[list[Message], list[Message]]:
        base = prefix()
        at_v3, at_v5 = Inbox(), Inbox()
        v3 = await connect(mosquitto, protocol=4, on_message=at_v3)
        v5 = await connect(mosquitto, on_message=at_v5)
        assert await v3.subscribe([(f"{base}/to-v3", 1)]) == [1]
        assert await v5.subscribe([(f"{base}/to-v5", 1)]) == [1]
        await v5.publish(f"{base}/to-v3", b"from v5", qos=1, properties=PublishProperties(content_type="t"))
        await v3.publish(f"{base}/to-v5", b"from v3", qos=1)
        assert await wait_until_async(lambda: at_v3.messages and at_v5.messages)
        await v3.disconnect()
        await v5.disconnect()
        return at_v3.messages, at_v5.messages

    to_v3, to_v5 = run(scenario())
    assert [(m.payload, m.qos, m.content_type) for m in to_v3] == [(b"from v5", 1, None)]  # 3.1.1 has none
    assert [(m.payload, m.qos) for m in to_v5] == [(b"from v3", 1)]


def test_v5_retained_message_and_unsubscribe(mosquitto: tuple[str, int]) -> None:
    async def scenario() -> tuple[list[Message], list[Message]]:
        base = prefix()
        retained, live = f"{base}/config", f"{base}/live"
        pub = await connect(mosquitto)
        await pub.publish(retained, b"cfg-1", qos=1, retain=True)
        inbox = Inbox()
        sub = await connect(mosquitto, on_message=inbox)
        assert await sub.subscribe([(retained, 1), (live, 1)]) == [1, 1]
        assert await wait_until_async(lambda: inbox.on(retained))
        await sub.unsubscribe([retained])
        await pub.publish(retained, b"", qos=1, retain=True)  # clears it, and is not delivered any more
        await pub.publish(live, b"after", qos=1)
        assert await wait_until_async(lambda: inbox.on(live))  # in order after the one on `retained`
        await pub.disconnect()
        await sub.disconnect()
        return inbox.on(retained), inbox.on(live)

    on_retained, on_live = run(scenario())
    assert [(m.payload, m.retain) for m in on_retained] == [(b"cfg-1", True)]
    assert [(m.payload, m.retain) for m in on_live] == [(b"after", False)]


def test_connack_refusal_reason_codes(mosquitto: tuple[str, int]) -> None:
    """5.0: an Authentication Method Mosquitto has no plugin for, 0x8C Bad authentication method.
    3.1.1: an empty client id with a persistent session, return code 2 (identifier rejected)."""

    async def attempt(protocol: int, **kw: Any) -> ConnectFailed:
        with pytest.raises(ConnectFailed) as caught:
            await connect(mosquitto, protocol=protocol, **kw)
        return caught.value

    refused = run(attempt(5, authentication_method="SCRAM-SHA-256"))
    assert refused.reason == "connack:0x8c" and refused.reason not in TRANSIENT_REASONS
    assert run(attempt(4, client_id="", clean=False)).reason == "connack:2"


def test_v5_server_disconnect_surfaces_its_reason_code(mosquitto: tuple[str, int]) -> None:
    """A Topic Alias over the server's maximum (written raw: the client sends no aliases itself):
    Mosquitto answers DISCONNECT 0x94 Topic Alias invalid, and the client reports it as its failure."""

    async def scenario() -> tuple[int, ConnectFailed | None]:
        client = await connect(mosquitto)
        assert client.connack is not None
        over = client.connack.topic_alias_max + 1
        client.writer.write(mqtt5.PublishPacket("jitp-test/alias", b"x", topic_alias=over).write())
        failure = await asyncio.wait_for(client.closed, 10)
        with pytest.raises(ConnectFailed) as caught:
            await client.ping(time_limit=5)
        assert caught.value is failure
        await client.disconnect()
        return over, failure

    over, failure = run(scenario())
    assert over > 1
    assert failure is not None and failure.reason == "disconnect:0x94"


def test_v5_assigned_client_id_and_session_present(mosquitto: tuple[str, int]) -> None:
    async def scenario() -> tuple[MqttClient, MqttClient, MqttClient]:
        anonymous = await connect(mosquitto, "")  # clean start: the server assigns one
        await anonymous.disconnect()
        client_id = f"sim5-session-{uuid.uuid4().hex[:8]}"
        first = await connect(mosquitto, client_id, clean=False, session_expiry=60)
        assert await first.subscribe([(f"{prefix()}/s", 1)]) == [1]
        await first.disconnect()
        again = await connect(mosquitto, client_id, clean=False, session_expiry=0)
        await again.disconnect()
        return anonymous, first, again

    anonymous, first, again = run(scenario())
    assert anonymous.connack is not None and anonymous.connack.assigned_client_id
    assert anonymous.client_id == anonymous.connack.assigned_client_id
    assert first.connack is not None and not first.connack.session_present
    assert again.connack is not None and again.connack.session_present  # kept for 60 s


def test_v5_qos1_in_flight_never_exceeds_the_servers_receive_maximum(mosquitto: tuple[str, int]) -> None:
    """Mosquitto announces Receive Maximum 20 by default; 100 concurrent QoS 1 publishes all arrive."""

    class Counting(MqttClient):
        peak = 0

        async def _request(self, packet_id: int, data: bytes, time_limit: float) -> tuple[list[int], str]:
            Counting.peak = max(Counting.peak, len(self._acks) + 1)
            return await super()._request(packet_id, data, time_limit)

    async def scenario() -> tuple[int, int, list[Message]]:
        topic = f"{prefix()}/flow"
        inbox = Inbox()
        sub = await connect(mosquitto, on_message=inbox)
        assert await sub.subscribe([(topic, 1)]) == [1]
        pub = await Counting.connect(
            mosquitto[0], mosquitto[1], ssl_context=None, client_id=f"sim5-{uuid.uuid4().hex[:8]}", protocol=5
        )
        assert pub.connack is not None
        await asyncio.gather(*(pub.publish(topic, str(i).encode(), qos=1) for i in range(100)))
        assert await wait_until_async(lambda: len(inbox.on(topic)) == 100)
        await pub.disconnect()
        await sub.disconnect()
        return pub.connack.receive_max, Counting.peak, inbox.on(topic)

    receive_max, peak, received = run(scenario())
    assert receive_max < 100  # else this test shows nothing
    assert 1 < peak <= receive_max
    assert sorted(int(m.payload) for m in received) == list(range(100))


def test_properties_need_protocol_5(mosquitto: tuple[str, int]) -> None:
    async def scenario() -> None:
        v3 = await connect(mosquitto, protocol=4)
        try:
            with pytest.raises(ValueError, match="MQTT 5"):
                await v3.publish("x", b"", properties=PublishProperties(content_type="t"))
        finally:
            await v3.disconnect()
        for kw in ({"session_expiry": 10}, {"receive_max": 10}, {"authentication_method": "X"}):
            with pytest.raises(ValueError, match="protocol=5"):
                await connect(mosquitto, protocol=4, **kw)
        with pytest.raises(ValueError, match=r"4 .* or 5"):
            await connect(mosquitto, protocol=3)

    run(scenario())


@pytest.fixture
def acl_mosquitto(mosquitto_binary: Path, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A Mosquitto of this test's own (plain TCP) whose ACL lets anyone write ``open/#`` only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    (tmp_path / "acl").write_text("topic readwrite open/#\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        ("user root\n" if os.geteuid() == 0 else "")
        + f"persistence false\nlistener {port} 127.0.0.1\nallow_anonymous true\nacl_file {tmp_path / 'acl'}\n"
    )
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(mosquitto_binary), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
        )

    def listening() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        assert wait_until(listening, 15), log.read_text()
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(10)


def test_v5_refused_publish_raises_its_puback_reason_code(acl_mosquitto: tuple[str, int]) -> None:
    """3.1.1 cannot refuse a PUBLISH; 5.0 answers PUBACK 0x87 Not authorized, and the connection stays up."""

    async def scenario() -> tuple[ConnectFailed, bool]:
        client = await connect(acl_mosquitto)
        await client.publish("open/a", b"fine", qos=1)
        with pytest.raises(ConnectFailed) as caught:
            await client.publish("closed/a", b"refused", qos=1)
        await client.publish("open/b", b"still fine", qos=1)
        still_open = client.is_open
        await client.disconnect()
        return caught.value, still_open

    refused, still_open = run(scenario())
    assert refused.reason == "puback:0x87"
    assert still_open
