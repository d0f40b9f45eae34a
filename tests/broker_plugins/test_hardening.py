"""Issue "Broker hardening": regression tests for the amqtt 0.12.1 weaknesses (W1-W7, see broker_plugins/compat.py).

Each attack runs twice, over real sockets and real TLS: against stock amqtt 0.12.1
(:mod:`tests.broker_plugins.stock_amqtt`, given the same policy as jitp through two tiny plugins),
where it succeeds, and against the jitp broker, where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_plugins.session import JitpSession
from jitp.domain.acl import Access
from jitp.trust import Role
from tests.broker_plugins.stock_amqtt import ACL, AUTH_CN, StockBroker, tls_listener
from tests.helpers import (
    BrokerThread,
    Conn,
    Pki,
    client_context,
    connect,
    test_config,
    wait_until,
    wait_until_async,
)
from tests.rawmqtt import (
    HOST,
    PINGREQ,
    PINGRESP,
    closed_within,
    connect_packet,
    mqtt_connect,
    puback,
    publish_packet,
    recv_exact,
    tcp_connect,
    tls_connect,
)

CLOSE_DEADLINE = 4.0  # generous deadline for "the server closed the connection"
# How long a connection must survive to count as "not closed". Waiting this long is the behaviour
# under test (stock amqtt has no deadline to wait for), not synchronisation; a positive witness
# (PINGRESP, CONNACK) then shows the connection is still served.
STAYS_OPEN = 3.0

CONNACK_ACCEPTED = 0
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_NOT_AUTHORIZED = 5


# -- asyncio clients for the many-connections tests --------------------------------------------


async def _connack_code(port: int, ctx: ssl.SSLContext, client_id: str) -> int | None:
    """Full mutual-TLS handshake, CONNECT, return the CONNACK code (None if the connection failed)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=HOST), 20
        )
    except OSError:  # TimeoutError and ssl.SSLError included
        return None
    try:
        writer.write(connect_packet(client_id, keepalive=30))
        await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(4), 20)
        return head[3] if head[:2] == b"\x20\x02" else None
    except (OSError, asyncio.IncompleteReadError):  # TimeoutError and ssl.SSLError included
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def _idle_until_closed(port: int, within: float) -> bool:
    """Plain TCP connect that never starts TLS; True if the server closes it within ``within`` seconds."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 20)
    except OSError:  # TimeoutError included
        return False
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except TimeoutError:  # before OSError, of which it is a subclass
        return False
    except OSError:  # reset by the server
        return True
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)


def run_bounded(coros: list[Any], concurrency: int) -> list[Any]:
    async def main() -> list[Any]:
        gate = asyncio.Semaphore(concurrency)

        async def one(coro: Any) -> Any:
            async with gate:
                return await coro

        return list(await asyncio.gather(*(one(c) for c in coros)))

    return asyncio.run(main())


def connack_codes(
    port: int, ctx: ssl.SSLContext, client_ids: list[str], concurrency: int = 50
) -> list[int | None]:
    return run_bounded([_connack_code(port, ctx, cid) for cid in client_ids], concurrency)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def track() -> Iterator[Callable[[Any], Any]]:
    """Register paho connections and sockets to be closed at teardown."""
    items: list[Any] = []

    def add(item: Any) -> Any:
        items.append(item)
        return item

    yield add
    for item in reversed(items):
        with contextlib.suppress(Exception):
            item.close()


@pytest.fixture
def stock(pki: Pki) -> Iterator[Callable[..., StockBroker]]:
    """Factory: a stock amqtt 0.12.1 broker with a TLS listener (CERT_OPTIONAL, as amqtt hard-codes)."""
    started: list[StockBroker] = []

    def make(plugins: dict[str, Any], *, max_connections: int = 0) -> StockBroker:
        b = StockBroker(
            tls_listener(
                server_cert=pki.layout.server_cert,
                server_key=pki.layout.server_key,
                cafile=pki.layout.root_cert,
                max_connections=max_connections,
            ),
            plugins,
        )
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def jitp(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., BrokerThread]]:
    """Factory: a jitp broker with a custom config, the manufacturer and service CAs registered."""
    started: list[BrokerThread] = []

    def make(**sections: Any) -> BrokerThread:
        b = BrokerThread(test_config(tmp_path / f"jitp{len(started)}", pki, **sections))
        b.start()
        started.append(b)
        b.register_ca(pki.manufacturer.cert)
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        return b

    yield make
    for b in started:
        b.stop()


def publish(conn: Conn, topic: str, payload: bytes, *, retain: bool = False) -> None:
    info = conn.client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(5)
    assert info.is_published(), f"no PUBACK for {topic}"


def received(conn: Conn, topic: str) -> list[bytes]:
    return [bytes(m.payload) for m in list(conn.messages) if m.topic == topic]


def topics(conn: Conn) -> set[str]:
    return {m.topic for m in list(conn.messages)}


# == W1: TLS client certificates are optional in stock amqtt ===============================================


def test_w1_stock_amqtt_admits_a_client_without_certificate(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    # With TLS as the only gate (an auth plugin that admits every client), no certificate is needed.
    broker = stock({AUTH_CN: {"allow_without_cert": True}})
    conn = track(connect(broker.port, pki, None, client_id="no-cert"))
    assert conn.rc == CONNACK_ACCEPTED, conn.error
    session = broker.broker.sessions["no-cert"][0]
    assert session.ssl_object is not None
    assert not session.ssl_object.getpeercert(), "the admitted client presented no certificate"


def test_w1_stock_amqtt_completes_tls_without_certificate_even_with_cert_auth(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    # With an auth plugin that checks the certificate, the certless client is refused only at the MQTT
    # layer: it got through TLS and got to talk MQTT (a CONNACK).
    broker = stock({AUTH_CN: {}})
    sock = track(tls_connect(broker.port, pki, None))
    assert mqtt_connect(sock, "no-cert", keepalive=30) == CONNACK_NOT_AUTHORIZED


def test_w1_jitp_refuses_a_client_without_certificate_at_the_handshake(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    conn = track(connect(broker.port, pki, None, client_id="no-cert"))
    assert conn.rc is None
    assert conn.error is not None
    # Raw: whatever TLS version, not a single MQTT byte comes back, and the server ends the
    # connection: an alert in the handshake (TLS 1.2), or EOF, an alert or a reset right after it
    # (TLS 1.3, where the client finishes first). Never left hanging, never a CONNACK.
    answer: bytes | OSError
    try:
        sock = track(tls_connect(broker.port, pki, None))
        sock.sendall(connect_packet("no-cert", keepalive=30))
        sock.settimeout(5)
        answer = sock.recv(4)
    except OSError as exc:  # ssl.SSLError, a reset -- or a timeout, which the assertion refuses
        answer = exc
    assert answer == b"" or isinstance(answer, ssl.SSLError | ConnectionError), repr(answer)
    assert broker.session_count() == 0
    # And a client with a certificate is still admitted (the refusal is about the certificate).
    ok = track(connect(broker.port, pki, pki.device("w1-device")))
    assert ok.rc == CONNACK_ACCEPTED, ok.error


# == W2: an unauthenticated clean-session CONNECT wipes the victim's session ===============================


def test_w2_stock_amqtt_refused_connect_wipes_the_victims_session(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = stock({AUTH_CN: {}})
    victim_id = "w2-victim"
    cmd = f"devices/{victim_id}/cmd/#"
    victim = track(connect(broker.port, pki, pki.device(victim_id)))
    assert victim.rc == CONNACK_ACCEPTED, victim.error
    assert victim.subscribe(cmd) == [1]
    witness = track(connect(broker.port, pki, pki.device("w2-witness")))
    assert witness.rc == CONNACK_ACCEPTED
    assert witness.subscribe(cmd) == [1]
    publish(victim, f"devices/{victim_id}/cmd/before", b"1")
    assert victim.wait_for(lambda: received(victim, f"devices/{victim_id}/cmd/before"))

    attacker = track(connect(broker.port, pki, pki.device("w2-attacker"), client_id=victim_id))
    assert attacker.rc == CONNACK_NOT_AUTHORIZED  # refused ...

    # ... and yet the victim's subscription is gone, while its connection looks fine.
    assert all(s.client_id != victim_id for s, _ in broker.broker.subscriptions.get(cmd, []))
    assert not victim.disconnected.is_set()
    publish(victim, f"devices/{victim_id}/cmd/after", b"2")
    assert witness.wait_for(lambda: received(witness, f"devices/{victim_id}/cmd/after"))
    # Documented absence check. The proof is the subscription table above; this only confirms that
    # nothing reaches the victim. There is no positive witness to wait for: stock amqtt now sends
    # whatever is meant for the victim's client id to the refused attacker's handler, which replaced
    # the victim's in the session table, so no marker could ever reach the victim either.
    time.sleep(0.5)
    assert received(victim, f"devices/{victim_id}/cmd/after") == [], "stock amqtt no longer wiped the session"


def test_w2_jitp_refused_connect_leaves_the_victims_session_alone(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    victim_id = "w2-victim"
    cmd = f"devices/{victim_id}/cmd/#"
    victim = track(connect(broker.port, pki, pki.device(victim_id)))
    assert victim.rc == CONNACK_ACCEPTED, victim.error
    assert victim.subscribe(cmd) == [1]
    witness = track(connect(broker.port, pki, pki.service()))
    assert witness.rc == CONNACK_ACCEPTED, witness.error
    assert witness.subscribe("devices/#") == [1]
    before = broker.call(_session_and_handler(broker, victim_id))

    attacker = track(connect(broker.port, pki, pki.device("w2-attacker"), client_id=victim_id))
    assert attacker.rc == CONNACK_NOT_AUTHORIZED

    assert broker.call(_session_and_handler(broker, victim_id)) == before
    assert any(s.client_id == victim_id for s, _ in broker.server.broker.subscriptions.get(cmd, []))
    publish(victim, f"devices/{victim_id}/cmd/after", b"2")
    assert witness.wait_for(lambda: received(witness, f"devices/{victim_id}/cmd/after"))
    assert victim.wait_for(lambda: received(victim, f"devices/{victim_id}/cmd/after") == [b"2"])
    assert not victim.disconnected.is_set()
    refusals = [e.draft for e in broker.audit() if e.draft.action == "refused"]
    assert [(d.device_id, d.reason) for d in refusals] == [("w2-attacker", "client_id_mismatch")]


async def _session_and_handler(broker: BrokerThread, client_id: str) -> tuple[int, int]:
    session, handler = broker.server.broker.sessions[client_id]
    return id(session), id(handler)


# == W3: refused clients stay in the session table forever ===============================================

REFUSED_N = 50


def test_w3_stock_amqtt_keeps_every_refused_session(stock: Callable[..., StockBroker], pki: Pki) -> None:
    broker = stock({AUTH_CN: {}})
    baseline = broker.session_count()
    ctx = client_context(pki, pki.device("w3-intruder"))
    codes = connack_codes(broker.port, ctx, [f"w3-spoof-{i}" for i in range(REFUSED_N)])
    assert codes == [CONNACK_NOT_AUTHORIZED] * REFUSED_N
    # The session monitor (every second) reaps disconnected clean sessions, but not these. Witness
    # that it has run since: an admitted clean session, disconnected, disappears from the table.
    reaped = connect(broker.port, pki, pki.device("w3-reaped"))
    assert reaped.rc == CONNACK_ACCEPTED, reaped.error
    reaped.close()
    assert wait_until(lambda: "w3-reaped" not in broker.broker.sessions, 5), "the session monitor did not run"
    assert broker.session_count() == baseline + REFUSED_N
    sessions = [s for s, _ in broker.broker.sessions.values()]
    assert all(s.transitions.is_connected() for s in sessions), "refused sessions are even marked connected"


def test_w3_jitp_never_enters_refused_clients_in_the_session_table(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    baseline = broker.session_count()
    ctx = client_context(pki, pki.device("w3-intruder"))
    codes = connack_codes(broker.port, ctx, [f"w3-spoof-{i}" for i in range(REFUSED_N)])
    assert codes == [CONNACK_NOT_AUTHORIZED] * REFUSED_N
    assert broker.session_count() == baseline
    # The table does count admitted clients (and a clean session leaves it on disconnect).
    ok = connect(broker.port, pki, pki.device("w3-device"))
    assert ok.rc == CONNACK_ACCEPTED, ok.error
    assert broker.session_count() == baseline + 1
    ok.close()
    assert ok.wait_for(lambda: broker.session_count() == baseline)
    assert ok.wait_for(lambda: broker.server.listener.open_connections == 0)


# == W4: retained messages skip the topic ACL ===========================================================


def test_w4_stock_amqtt_sends_retained_messages_the_acl_refuses(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    # reader may subscribe to sensors/#, but may only *receive* sensors/public/#.
    broker = stock(
        {
            AUTH_CN: {},
            ACL: {
                "publish": {"w4-writer": ["sensors/#"], "w4-reader": ["sensors/public/#"]},
                "subscribe": {"w4-writer": ["sensors/#"], "w4-reader": ["sensors/#"]},
                "receive": {"w4-writer": ["sensors/#"], "w4-reader": ["sensors/public/#"]},
            },
        }
    )
    writer = track(connect(broker.port, pki, pki.device("w4-writer")))
    assert writer.rc == CONNACK_ACCEPTED, writer.error
    publish(writer, "sensors/private/key", b"secret", retain=True)
    publish(writer, "sensors/public/temp", b"21", retain=True)
    # (stock amqtt acknowledges before it stores)
    assert writer.wait_for(
        lambda: broker.broker.retained_messages.keys() >= {"sensors/private/key", "sensors/public/temp"}
    )

    reader = track(connect(broker.port, pki, pki.device("w4-reader")))
    assert reader.rc == CONNACK_ACCEPTED, reader.error
    assert reader.subscribe("sensors/#") == [1]
    assert writer.subscribe("sensors/#") == [1]  # (after the reader connected: see the next test)
    # Live messages do obey the receive ACL ...
    publish(writer, "sensors/private/live", b"live")
    assert writer.wait_for(lambda: received(writer, "sensors/private/live"))
    publish(reader, "sensors/public/marker", b"m")
    assert reader.wait_for(lambda: received(reader, "sensors/public/marker"))
    assert received(reader, "sensors/private/live") == []
    assert received(reader, "sensors/public/temp") == [b"21"]
    # ... retained ones do not.
    assert received(reader, "sensors/private/key") == [b"secret"], "stock amqtt checked the ACL"


def test_w4_stock_amqtt_replays_retained_messages_for_every_clients_subscriptions(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = stock(
        {
            AUTH_CN: {},
            ACL: {
                "publish": {"w4-writer": ["sensors/#"]},
                "subscribe": {"w4-writer": ["sensors/#"], "w4-snoop": ["public/#"]},
                "receive": {"w4-writer": ["sensors/#"], "w4-snoop": ["public/#"]},
            },
        }
    )
    writer = track(connect(broker.port, pki, pki.device("w4-writer")))
    assert writer.rc == CONNACK_ACCEPTED, writer.error
    assert writer.subscribe("sensors/#") == [1]  # someone else's subscription
    publish(writer, "sensors/private/key", b"secret", retain=True)
    assert writer.wait_for(lambda: "sensors/private/key" in broker.broker.retained_messages)

    # snoop subscribes to nothing, and may receive nothing under sensors/.
    snoop = track(connect(broker.port, pki, pki.device("w4-snoop")))
    assert snoop.rc == CONNACK_ACCEPTED, snoop.error
    assert snoop.subscribe("sensors/#") == [128]  # the ACL refuses the subscription itself
    assert snoop.wait_for(lambda: received(snoop, "sensors/private/key")), "stock amqtt stopped replaying"
    assert received(snoop, "sensors/private/key") == [b"secret"]


class _NarrowReceive:
    """A namespace that may subscribe to a filter but not receive every topic it matches."""

    def __init__(self, inner: Any, denied_prefix: str) -> None:
        self.inner = inner
        self.denied_prefix = denied_prefix

    def allows(self, action: Access, topic: str) -> bool:
        if action is Access.RECEIVE and topic.startswith(self.denied_prefix):
            return False
        return bool(self.inner.allows(action, topic))


def test_w4_jitp_checks_the_acl_for_each_retained_message(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    # jitp's default namespaces grant RECEIVE exactly where they grant SUBSCRIBE, so give the device a
    # namespace (as a template could) that subscribes to cmd/# but may not receive cmd/private/...
    dev = "w4-reader"
    conn = track(connect(broker.port, pki, pki.device(dev)))
    assert conn.rc == CONNACK_ACCEPTED, conn.error

    async def narrow() -> None:
        session = broker.server.broker.sessions[dev][0]
        assert isinstance(session, JitpSession) and session.client is not None
        narrowed = _NarrowReceive(session.client.namespace, f"devices/{dev}/cmd/private/")
        session.client = dataclasses.replace(session.client, namespace=narrowed)  # type: ignore[arg-type]

    broker.call(narrow())
    retain = broker.server.broker.retain_message
    broker.call(retain(None, f"devices/{dev}/cmd/private/key", b"secret", 1))
    broker.call(retain(None, f"devices/{dev}/cmd/config", b"ok", 1))

    assert conn.subscribe(f"devices/{dev}/cmd/#") == [1]
    publish(conn, f"devices/{dev}/cmd/marker", b"m")
    assert conn.wait_for(lambda: received(conn, f"devices/{dev}/cmd/marker"))
    assert conn.wait_for(lambda: received(conn, f"devices/{dev}/cmd/config") == [b"ok"])
    assert received(conn, f"devices/{dev}/cmd/private/key") == []


def test_w4_jitp_replays_retained_messages_only_for_the_clients_own_subscriptions(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    owner, snoop_id = "w4-owner", "w4-snoop"
    config = f"$jitp/devices/{owner}/config"
    retain = broker.server.broker.retain_message
    broker.call(retain(None, f"devices/{owner}/cmd/reboot", b"secret-cmd", 1))
    broker.call(retain(None, f"$jitp/devices/{owner}/secret", b"secret-jitp", 1))
    broker.call(retain(None, f"devices/{snoop_id}/cmd/hello", b"own", 1))

    # The owner reads its own retained configuration (published by jitp on provisioning) and commands,
    # and stays connected: its subscriptions match everything of its own.
    dev = track(connect(broker.port, pki, pki.device(owner)))
    assert dev.rc == CONNACK_ACCEPTED, dev.error
    assert dev.subscribe(f"$jitp/devices/{owner}/#") == [1]
    assert dev.subscribe(f"devices/{owner}/cmd/#") == [1]
    assert dev.wait_for(lambda: received(dev, config))
    assert json.loads(received(dev, config)[-1])["device_id"] == owner
    assert dev.wait_for(lambda: received(dev, f"$jitp/devices/{owner}/secret") == [b"secret-jitp"])
    assert dev.wait_for(lambda: received(dev, f"devices/{owner}/cmd/reboot") == [b"secret-cmd"])
    assert config in broker.server.broker.retained_messages
    # And a service's subscription matches every device's commands.
    service = track(connect(broker.port, pki, pki.service()))
    assert service.rc == CONNACK_ACCEPTED, service.error
    assert service.subscribe("devices/#") == [1]

    own = {f"devices/{snoop_id}/cmd/hello", f"devices/{snoop_id}/cmd/marker"}
    snoop_cert = pki.device(snoop_id)
    snoop = track(connect(broker.port, pki, snoop_cert, clean=False))
    assert snoop.rc == CONNACK_ACCEPTED, snoop.error
    assert snoop.subscribe(f"devices/{owner}/cmd/#") == [128]  # not its namespace
    assert snoop.subscribe(f"$jitp/devices/{owner}/#") == [128]
    assert snoop.subscribe(f"devices/{snoop_id}/cmd/#") == [1]
    publish(snoop, f"devices/{snoop_id}/cmd/marker", b"m1")
    assert snoop.wait_for(lambda: received(snoop, f"devices/{snoop_id}/cmd/marker"))
    assert topics(snoop) == own

    # Reconnect to the persistent session: its own subscription is replayed, nobody else's.
    snoop.close()
    again = track(connect(broker.port, pki, snoop_cert, clean=False))
    assert again.rc == CONNACK_ACCEPTED, again.error
    assert again.wait_for(lambda: received(again, f"devices/{snoop_id}/cmd/hello") == [b"own"])
    publish(again, f"devices/{snoop_id}/cmd/marker", b"m2")
    assert again.wait_for(lambda: received(again, f"devices/{snoop_id}/cmd/marker"))
    assert topics(again) == own


# == W5: keep-alive is not enforced =====================================================================


def test_w5_stock_amqtt_keeps_silent_clients_forever(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = stock({AUTH_CN: {}})
    silent = track(tls_connect(broker.port, pki, pki.device("w5-silent")))
    assert mqtt_connect(silent, "w5-silent", keepalive=1) == CONNACK_ACCEPTED
    no_keepalive = track(tls_connect(broker.port, pki, pki.device("w5-zero")))
    assert mqtt_connect(no_keepalive, "w5-zero", keepalive=0) == CONNACK_ACCEPTED
    time.sleep(STAYS_OPEN)  # 3 keep-alive periods of silence: the silence is what is tested
    assert broker.broker.sessions["w5-silent"][0].transitions.is_connected()
    for sock in (silent, no_keepalive):  # both still open, and served
        sock.sendall(PINGREQ)
        assert recv_exact(sock, 2) == PINGRESP


def test_w5_jitp_disconnects_a_client_silent_beyond_its_keepalive(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    sock = track(tls_connect(broker.port, pki, pki.device("w5-silent")))
    assert mqtt_connect(sock, "w5-silent", keepalive=1) == CONNACK_ACCEPTED
    start = time.monotonic()
    assert closed_within(sock, CLOSE_DEADLINE), "a client silent for 1.5 x its keep-alive was kept"
    assert time.monotonic() - start >= 1.0, "closed before its keep-alive had even expired"
    assert broker.call(wait_until_async(lambda: broker.session_count() == 0))


def test_w5_jitp_keeps_a_client_that_pings_within_its_keepalive(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    sock = track(tls_connect(broker.port, pki, pki.device("w5-pinger")))
    assert mqtt_connect(sock, "w5-pinger", keepalive=1) == CONNACK_ACCEPTED
    for _ in range(6):  # 3 s, twice the grace period
        time.sleep(0.5)  # the client's ping interval: the behaviour under test, not synchronisation
        sock.sendall(PINGREQ)
        assert recv_exact(sock, 2) == PINGRESP


def test_w5_jitp_caps_keepalive_at_max_keepalive(
    jitp: Callable[..., BrokerThread], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = jitp(limits={"max_keepalive": 1})
    no_keepalive = track(tls_connect(broker.port, pki, pki.device("w5-zero")))
    assert mqtt_connect(no_keepalive, "w5-zero", keepalive=0) == CONNACK_ACCEPTED
    too_long = track(tls_connect(broker.port, pki, pki.device("w5-long")))
    assert mqtt_connect(too_long, "w5-long", keepalive=600) == CONNACK_ACCEPTED
    assert closed_within(no_keepalive, CLOSE_DEADLINE), "keep-alive 0 was not capped at max_keepalive"
    assert closed_within(too_long, CLOSE_DEADLINE), "keep-alive 600 was not capped at max_keepalive"


# == W6: no handshake or CONNECT deadline, max_connections queues, no packet size limit ==================


def test_w6_stock_amqtt_keeps_sockets_that_never_handshake_or_connect(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = stock({AUTH_CN: {}})
    no_tls = track(tcp_connect(broker.port))
    no_connect = track(tls_connect(broker.port, pki, pki.device("w6-idle")))
    time.sleep(STAYS_OPEN)  # idle sockets: the idling is what is tested
    # Both still open, and served: the handshake and the CONNECT, late, still go through.
    late_tls = track(client_context(pki, pki.device("w6-late")).wrap_socket(no_tls, server_hostname=HOST))
    assert mqtt_connect(late_tls, "w6-late", keepalive=30) == CONNACK_ACCEPTED
    assert mqtt_connect(no_connect, "w6-idle", keepalive=30) == CONNACK_ACCEPTED


def test_w6_jitp_closes_a_socket_that_never_starts_tls(
    jitp: Callable[..., BrokerThread], track: Callable[[Any], Any]
) -> None:
    broker = jitp(listener={"handshake_timeout": 0.5})
    sock = track(tcp_connect(broker.port))
    assert closed_within(sock, CLOSE_DEADLINE)
    assert broker.call(wait_until_async(lambda: broker.server.listener.open_connections == 0))


def test_w6_jitp_closes_a_tls_socket_that_never_sends_connect(
    jitp: Callable[..., BrokerThread], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = jitp(listener={"connect_timeout": 0.5})
    sock = track(tls_connect(broker.port, pki, pki.device("w6-idle")))
    assert closed_within(sock, CLOSE_DEADLINE)
    assert broker.call(wait_until_async(lambda: broker.server.listener.open_connections == 0))
    assert broker.session_count() == 0


def test_w6_stock_amqtt_max_connections_makes_clients_wait(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = stock({AUTH_CN: {}}, max_connections=2)
    first = track(connect(broker.port, pki, pki.device("w6-one")))
    second = track(connect(broker.port, pki, pki.device("w6-two")))
    assert (first.rc, second.rc) == (CONNACK_ACCEPTED, CONNACK_ACCEPTED)
    third = track(connect(broker.port, pki, pki.device("w6-three"), timeout=2.0))
    assert third.rc is None, "stock amqtt answered the client over max_connections"
    assert third.error == "no CONNACK"
    # It was queued, not refused: it gets in as soon as a slot frees up.
    first.close()
    assert third.wait_for(lambda: third.rc == CONNACK_ACCEPTED)


def test_w6_jitp_refuses_clients_over_max_connections(
    jitp: Callable[..., BrokerThread], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = jitp(listener={"max_connections": 2})
    first = track(connect(broker.port, pki, pki.device("w6-one")))
    second = track(connect(broker.port, pki, pki.device("w6-two")))
    assert (first.rc, second.rc) == (CONNACK_ACCEPTED, CONNACK_ACCEPTED)
    three = pki.device("w6-three")
    third = track(connect(broker.port, pki, three))
    assert third.rc == CONNACK_SERVER_UNAVAILABLE
    assert broker.session_count() == 2
    first.close()
    assert broker.call(wait_until_async(lambda: broker.server.broker.connected_clients == 1))
    again = track(connect(broker.port, pki, three))
    assert again.rc == CONNACK_ACCEPTED, again.error


def test_w6_stock_amqtt_accepts_a_packet_of_any_size(
    stock: Callable[..., StockBroker], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = stock({AUTH_CN: {}})
    sock = track(tls_connect(broker.port, pki, pki.device("w6-big")))
    assert mqtt_connect(sock, "w6-big", keepalive=30) == CONNACK_ACCEPTED
    sock.sendall(publish_packet("devices/w6-big/blob", b"x" * (1024 * 1024), packet_id=7))
    assert recv_exact(sock, 4) == puback(7)


def test_w6_jitp_closes_the_connection_on_a_packet_over_max_packet_size(
    jitp: Callable[..., BrokerThread], pki: Pki, track: Callable[[Any], Any]
) -> None:
    broker = jitp(limits={"max_packet_size": 1024})
    sock = track(tls_connect(broker.port, pki, pki.device("w6-big")))
    assert mqtt_connect(sock, "w6-big", keepalive=30) == CONNACK_ACCEPTED
    sock.sendall(publish_packet("devices/w6-big/small", b"x" * 512, packet_id=1))
    assert recv_exact(sock, 4) == puback(1)
    with contextlib.suppress(OSError):  # the server may close while we are still sending
        sock.sendall(publish_packet("devices/w6-big/blob", b"x" * (64 * 1024), packet_id=2))
    assert closed_within(sock, CLOSE_DEADLINE), "a packet over max_packet_size did not close the connection"
    assert broker.call(wait_until_async(lambda: broker.session_count() == 0))


def test_w6_jitp_max_packet_size_counts_the_whole_packet(
    jitp: Callable[..., BrokerThread], pki: Pki, track: Callable[[Any], Any]
) -> None:
    # Topic and payload each under the limit, the packet (topic + payload) over it.
    broker = jitp(limits={"max_packet_size": 1024})
    dev = "w6-sum"
    sock = track(tls_connect(broker.port, pki, pki.device(dev)))
    assert mqtt_connect(sock, dev, keepalive=30) == CONNACK_ACCEPTED
    topic = f"devices/{dev}/" + "t" * 900
    with contextlib.suppress(OSError):
        sock.sendall(publish_packet(topic, b"x" * 900, packet_id=3))
    assert closed_within(sock, CLOSE_DEADLINE), "a 1.8 KiB packet passed max_packet_size 1024"


# == W7: takeover only by the same authenticated device, audited ========================================


def test_w7_same_certificate_takes_over_the_session_and_is_audited(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    dev = "w7-twin"
    cert = pki.device(dev)
    first = track(connect(broker.port, pki, cert))
    assert first.rc == CONNACK_ACCEPTED, first.error
    second = track(connect(broker.port, pki, cert))
    assert second.rc == CONNACK_ACCEPTED, second.error
    assert first.disconnected.wait(5), "the old connection was not closed"
    assert second.subscribe(f"devices/{dev}/cmd/#") == [1]
    publish(second, f"devices/{dev}/cmd/ping", b"p")
    assert second.wait_for(lambda: received(second, f"devices/{dev}/cmd/ping") == [b"p"])
    assert not second.disconnected.is_set()
    assert broker.session_count() == 1
    takeovers = [e.draft for e in broker.audit() if e.draft.action == "session-takeover"]
    assert [d.device_id for d in takeovers] == [dev]
    assert takeovers[0].details["same_certificate"] == "true"
    assert takeovers[0].details["previous_peer"].startswith("127.0.0.1:")
    # Stored, both peer addresses are sealed under the device's data key (encryption at rest).
    [stored] = [e.draft for e in broker.raw_audit() if e.draft.action == "session-takeover"]
    assert "127.0.0.1" not in (stored.peer or "") + stored.details["previous_peer"]


def test_w7_another_certificate_cannot_take_over(
    broker: BrokerThread, pki: Pki, track: Callable[[Any], Any]
) -> None:
    dev = "w7-owner"
    owner = track(connect(broker.port, pki, pki.device(dev)))
    assert owner.rc == CONNACK_ACCEPTED, owner.error
    assert owner.subscribe(f"devices/{dev}/cmd/#") == [1]

    impostor = track(connect(broker.port, pki, pki.device("w7-impostor"), client_id=dev))
    assert impostor.rc == CONNACK_NOT_AUTHORIZED
    same_name = track(connect(broker.port, pki, pki.device(dev)))  # a second certificate for the same CN
    assert same_name.rc == CONNACK_NOT_AUTHORIZED

    assert not owner.disconnected.is_set()
    publish(owner, f"devices/{dev}/cmd/ping", b"p")
    assert owner.wait_for(lambda: received(owner, f"devices/{dev}/cmd/ping") == [b"p"])
    assert not owner.disconnected.is_set()
    assert [e for e in broker.audit() if e.draft.action == "session-takeover"] == []


# == soak: refused and idle connections leave nothing behind ==========================================

SOAK_REFUSED = 2000
SOAK_IDLE = 2000


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_soak_refused_and_idle_connections_leave_no_sessions_or_fds(
    jitp: Callable[..., BrokerThread], pki: Pki
) -> None:
    started = time.monotonic()
    broker = jitp(listener={"handshake_timeout": 1.0})
    jb = broker.server.broker
    # Warm up (registry, TLS context, first provisioning), then take the baseline.
    warm = connect(broker.port, pki, pki.device("soak-warm"))
    assert warm.rc == CONNACK_ACCEPTED, warm.error
    warm.close()
    assert broker.call(
        wait_until_async(lambda: broker.server.listener.open_connections == 0 and broker.session_count() == 0)
    )
    base_sessions = broker.session_count()
    base_fds = _open_fds()

    ctx = client_context(pki, pki.device("soak-intruder"))
    codes = connack_codes(broker.port, ctx, [f"soak-{i}" for i in range(SOAK_REFUSED)], concurrency=50)
    assert codes.count(CONNACK_NOT_AUTHORIZED) == SOAK_REFUSED, {c: codes.count(c) for c in set(codes)}
    assert broker.session_count() == base_sessions

    closed = run_bounded([_idle_until_closed(broker.port, 15) for _ in range(SOAK_IDLE)], concurrency=1000)
    assert closed.count(True) == SOAK_IDLE

    assert broker.call(wait_until_async(lambda: broker.server.listener.open_connections == 0, 10)), (
        broker.server.listener.open_connections
    )
    assert wait_until(lambda: _open_fds() <= base_fds + 10, 10, interval=0.2), (base_fds, _open_fds())
    assert broker.session_count() == base_sessions
    assert jb.connected_clients == 0
    # Still serving.
    ok = connect(broker.port, pki, pki.device("soak-after"))
    assert ok.rc == CONNACK_ACCEPTED, ok.error
    ok.close()
    assert time.monotonic() - started < 60
