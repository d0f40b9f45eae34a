"""The CONNECT parser the connection path uses (broker_plugins/framing.py): a property test against
an independent encoder (device_sim's, which the simulator uses against every broker) and amqtt's own
decoder, and every malformed input refused with MalformedConnect, never another exception."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from amqtt.adapters import BufferReader
from amqtt.mqtt.connect import ConnectPacket
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_plugins.framing import MalformedConnect, Will, parse_connect
from device_sim.mqtt import encode_str, encode_varint
from tests.helpers import BrokerThread, Pki
from tests.rawmqtt import closed_within, recv_exact, tls_connect

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


def encode(
    client_id: str,
    *,
    clean: bool,
    keep_alive: int,
    will: Will | None,
    username: str | None,
    password: bytes | None,
) -> bytes:
    flags = (
        (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    )
    payload = encode_str(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += encode_str(will.topic) + len(will.message).to_bytes(2, "big") + will.message
    if username is not None:
        payload += encode_str(username)
    if password is not None:
        payload += len(password).to_bytes(2, "big") + password
    body = encode_str("MQTT") + bytes([4, flags]) + keep_alive.to_bytes(2, "big") + payload
    return b"\x10" + encode_varint(len(body)) + body


wills = st.none() | st.builds(
    Will, topic=text, message=st.binary(max_size=40), qos=st.integers(0, 2), retain=st.booleans()
)


@settings(max_examples=300)
@given(
    client_id=text,
    clean=st.booleans(),
    keep_alive=st.integers(0, 65535),
    will=wills,
    username=st.none() | text,
    password=st.none() | st.binary(max_size=20),
)
def test_what_is_encoded_is_parsed_the_same_as_amqtt_parses_it(
    client_id: str,
    clean: bool,
    keep_alive: int,
    will: Will | None,
    username: str | None,
    password: bytes | None,
) -> None:
    packet = encode(
        client_id, clean=clean, keep_alive=keep_alive, will=will, username=username, password=password
    )
    parsed = parse_connect(packet)
    assert (parsed.client_id, parsed.clean_session, parsed.keep_alive) == (client_id, clean, keep_alive)
    assert (parsed.will, parsed.username, parsed.password) == (will, username, password)
    theirs = asyncio.run(ConnectPacket.from_stream(BufferReader(packet)))
    assert theirs.keep_alive == keep_alive and theirs.clean_session_flag == clean
    assert theirs.will_flag == (will is not None)
    if client_id:  # amqtt invents an id for an empty one
        assert theirs.client_id == client_id


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_any_bytes_parse_or_raise_malformed_connect(data: bytes) -> None:
    for packet in (data, b"\x10" + encode_varint(len(data)) + data):
        with contextlib.suppress(MalformedConnect):
            parse_connect(packet)


GOOD = encode("dev-1", clean=True, keep_alive=30, will=None, username=None, password=None)


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        (GOOD[:-1], "past the end"),
        (GOOD + b"\x00", "after the CONNECT"),
        (b"\x12" + GOOD[1:], "fixed header"),
        (GOOD[:9] + bytes([GOOD[9] | 0x01]) + GOOD[10:], "reserved flag"),
        (GOOD[:9] + bytes([GOOD[9] | 0x20]) + GOOD[10:], "without the will flag"),
        (GOOD.replace(b"dev-1", b"dev\x001"), r"U\+0000"),
        (GOOD.replace(b"dev-1", b"dev\xff1"), "not UTF-8"),
        (GOOD.replace(b"\x00\x04MQTT\x04", b"\x00\x04MQTT\x05"), "3.1.1"),
    ],
)
def test_malformed_connects_are_named(packet: bytes, why: str) -> None:
    with pytest.raises(MalformedConnect, match=why):
        parse_connect(packet)


@pytest.mark.parametrize(
    ("client_id", "clean", "username", "password", "code"),
    [("conn-pw", True, None, b"secret", 4), ("", False, None, None, 2)],
    ids=["password-without-username", "empty-id-persistent"],
)
def test_the_broker_answers_what_3_1_1_says(
    broker: BrokerThread,
    pki: Pki,
    client_id: str,
    clean: bool,
    username: str | None,
    password: bytes | None,
    code: int,
) -> None:
    sock = tls_connect(broker.port, pki, pki.device("conn-pw"))
    try:
        sock.sendall(
            encode(client_id, clean=clean, keep_alive=30, will=None, username=username, password=password)
        )
        assert recv_exact(sock, 4) == bytes([0x20, 0x02, 0x00, code])
        assert closed_within(sock, 5)
    finally:
        sock.close()
    assert "conn-pw" not in broker.server.broker.sessions and "" not in broker.server.broker.sessions


def test_a_malformed_connect_closes_without_connack(broker: BrokerThread, pki: Pki) -> None:
    sock = tls_connect(broker.port, pki, pki.device("conn-bad"))
    try:
        sock.sendall(GOOD[:9] + bytes([GOOD[9] | 0x01]) + GOOD[10:])  # reserved flag
        assert closed_within(sock, 5)
    finally:
        sock.close()
