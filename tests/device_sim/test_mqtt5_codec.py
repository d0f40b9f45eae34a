"""device_sim.mqtt's MQTT 5 framing and packet mapping against the mqtt5 codec (Hypothesis).

The client writes every MQTT 5 packet with mqtt5 and decodes with it; what is its own is the framing
(:func:`read_frame` cutting a byte stream into whole packets), the mapping of its arguments to
packets (CONNECT, PUBLISH, SUBSCRIBE) and of packets back to :class:`Message` and to failure
reasons (CONNACK, DISCONNECT). Those are checked here both ways, without a network.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TypeVar

import mqtt5
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.mqtt import (
    CONNACK,
    TRANSIENT_REASONS,
    ConnectFailed,
    PublishProperties,
    _read_connack_v5,
    connect_packet_v5,
    decode_v5,
    message_from_publish,
    publish_packet_v5,
    read_frame,
    subscribe_packet_v5,
)

T = TypeVar("T")

# MQTT UTF-8 strings: no U+0000 and no surrogates (mqtt5 refuses both, as the spec asks).
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
topic = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1, max_size=24
)
pairs = st.lists(st.tuples(text, text), max_size=4).map(tuple)
u16 = st.integers(1, 65535)
u32 = st.integers(0, 2**32 - 1)


def members(codes: type[T]) -> list[T]:
    """The members of one of mqtt5's reason-code enums (Rust classes: not iterable like enum.Enum)."""
    return [getattr(codes, name) for name in dir(codes) if name.isupper()]


properties = st.builds(
    PublishProperties,
    content_type=st.none() | text,
    user_properties=pairs,
    response_topic=st.none() | topic,
    correlation_data=st.none() | st.binary(max_size=16),
    payload_format_indicator=st.sampled_from([0, 1]),
    message_expiry_interval=st.none() | u32,
)


def publish_packets() -> st.SearchStrategy[mqtt5.PublishPacket]:
    @st.composite
    def build(draw: st.DrawFn) -> mqtt5.PublishPacket:
        qos = draw(st.sampled_from([0, 1]))
        props = draw(properties)
        return mqtt5.PublishPacket(
            draw(topic),
            draw(st.binary(max_size=300)),  # past 127 bytes: a two-byte remaining length
            qos=mqtt5.QoS(qos),
            retain=draw(st.booleans()),
            packet_id=draw(u16) if qos else None,
            content_type=props.content_type,
            user_properties=list(props.user_properties),
            response_topic=props.response_topic,
            correlation_data=props.correlation_data,
            payload_format_indicator=props.payload_format_indicator,
            message_expiry_interval=props.message_expiry_interval,
        )

    return build()


server_packets: st.SearchStrategy[mqtt5.Packet] = st.one_of(
    publish_packets(),
    st.builds(mqtt5.PubAckPacket, u16, reason_str=st.none() | text),
    st.builds(
        mqtt5.SubAckPacket,
        u16,
        st.lists(st.sampled_from(members(mqtt5.SubAckReasonCode)), min_size=1, max_size=4),
        reason_str=st.none() | text,
    ),
    st.builds(mqtt5.PingRespPacket),
    st.builds(
        mqtt5.DisconnectPacket,
        reason_code=st.sampled_from(members(mqtt5.DisconnectReasonCode)),
        reason_str=st.none() | text,
        user_properties=pairs.map(list),
    ),
)


def feed(chunks: list[bytes]) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return reader


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=200, deadline=None)
@given(st.lists(server_packets, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_read_frame_cuts_a_stream_into_the_packets_mqtt5_wrote(
    packets: list[mqtt5.Packet], cuts: list[int]
) -> None:
    """However the bytes arrive, each frame is one whole packet and decodes to what was written."""
    written = [p.write() for p in packets]

    async def cut() -> list[bytes]:
        reader = feed(split(b"".join(written), cuts))
        frames = [await read_frame(reader) for _ in written]
        assert reader.at_eof()
        return frames

    frames = asyncio.run(cut())
    assert frames == written
    assert [decode_v5(f) for f in frames] == packets


@settings(max_examples=200, deadline=None)
@given(
    topic,
    st.binary(max_size=300),
    st.sampled_from([0, 1]),
    u16,
    st.booleans(),
    properties,
)
def test_publish_encodes_what_mqtt5_decodes_and_maps_back_to_a_message(
    name: str, payload: bytes, qos: int, packet_id: int, retain: bool, props: PublishProperties
) -> None:
    data = publish_packet_v5(name, payload, qos=qos, packet_id=packet_id, retain=retain, properties=props)
    packet, used = mqtt5.read(memoryview(data))
    assert used == len(data) and isinstance(packet, mqtt5.PublishPacket)
    assert (packet.topic, packet.payload, int(packet.qos), packet.retain) == (name, payload, qos, retain)
    assert packet.packet_id == (packet_id if qos else None)
    message = message_from_publish(packet, 1.5)
    assert (message.topic, message.payload, message.qos, message.retain, message.dup) == (
        name,
        payload,
        qos,
        retain,
        False,
    )
    assert message.received_at == 1.5
    assert (
        PublishProperties(
            content_type=message.content_type,
            user_properties=message.user_properties,
            response_topic=message.response_topic,
            correlation_data=message.correlation_data,
            payload_format_indicator=message.payload_format_indicator,
            message_expiry_interval=message.message_expiry_interval,
        )
        == props
    )


@settings(max_examples=150, deadline=None)
@given(
    text,
    st.integers(0, 65535),
    st.booleans(),
    st.none() | u32,
    u16,
    st.none() | st.integers(1, 2**28),
    pairs,
)
def test_connect_encodes_what_mqtt5_decodes(
    client_id: str,
    keepalive: int,
    clean: bool,
    expiry: int | None,
    receive_max: int,
    max_packet: int | None,
    user: tuple[tuple[str, str], ...],
) -> None:
    data = connect_packet_v5(
        client_id,
        keepalive=keepalive,
        clean=clean,
        session_expiry=expiry,
        receive_max=receive_max,
        max_packet_size=max_packet,
        user_properties=user,
    )
    body = 2 + next(i for i in range(4) if not data[1 + i] & 0x80)  # after the remaining length
    assert data[body : body + 7] == b"\x00\x04MQTT\x05"  # protocol name and level 5
    packet, used = mqtt5.read(memoryview(data))
    assert used == len(data) and isinstance(packet, mqtt5.ConnectPacket)
    assert (packet.client_id, packet.keep_alive, packet.clean_start) == (client_id, keepalive, clean)
    # Unset, the session lasts as 3.1.1's would: none when clean, for ever when not.
    assert packet.session_expiry_interval == (expiry if expiry is not None else 0 if clean else 2**32 - 1)
    assert (packet.receive_max, packet.max_packet_size) == (receive_max, max_packet)
    assert packet.user_properties == list(user)
    assert packet.topic_alias_max == 0 and packet.will is None and packet.username is None


@settings(max_examples=100, deadline=None)
@given(u16, st.lists(st.tuples(topic, st.sampled_from([0, 1])), min_size=1, max_size=5))
def test_subscribe_encodes_what_mqtt5_decodes(packet_id: int, filters: list[tuple[str, int]]) -> None:
    packet, _ = mqtt5.read(memoryview(subscribe_packet_v5(packet_id, filters)))
    assert isinstance(packet, mqtt5.SubscribePacket) and packet.packet_id == packet_id
    assert [(f.pattern, int(f.max_qos)) for f in packet.topic_filters] == filters
    # As 3.1.1 behaves: live messages arrive without the retain flag, and our own come back.
    assert all(not f.retain_as_published and not f.no_local for f in packet.topic_filters)


def connack_outcome(data: bytes) -> ConnectFailed | mqtt5.ConnAckPacket:
    async def read() -> mqtt5.ConnAckPacket:
        return await _read_connack_v5(feed([data]))

    try:
        return asyncio.run(read())
    except ConnectFailed as exc:
        return exc


@given(st.sampled_from(members(mqtt5.ConnAckReasonCode)), st.none() | text)
def test_a_v5_connack_refusal_surfaces_its_reason_code_and_reason_string(
    code: mqtt5.ConnAckReasonCode, reason: str | None
) -> None:
    outcome = connack_outcome(mqtt5.ConnAckPacket(reason_code=code, reason_str=reason).write())
    if code == mqtt5.ConnAckReasonCode.SUCCESS:
        assert isinstance(outcome, mqtt5.ConnAckPacket) and outcome.reason_str == reason
        return
    assert isinstance(outcome, ConnectFailed)
    assert outcome.reason == f"connack:0x{int(code):02x}" and outcome.detail == (reason or "")
    shed = {0x88, 0x89, 0x9F}  # Server unavailable, Server busy, Connection rate exceeded
    assert (outcome.reason in TRANSIENT_REASONS) == (int(code) in shed)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5])
def test_a_v3_connack_to_a_v5_connect_keeps_the_v3_reason(code: int) -> None:
    """A server without MQTT 5 answers level 5 with a 3.1.1 CONNACK (1: unacceptable protocol version)."""
    outcome = connack_outcome(bytes([CONNACK << 4, 2, 0, code]))
    assert isinstance(outcome, ConnectFailed) and outcome.reason == f"connack:{code}"
    assert (outcome.reason in TRANSIENT_REASONS) == (code == 3)


@given(st.sampled_from(members(mqtt5.DisconnectReasonCode)), st.none() | text)
def test_a_disconnect_instead_of_a_connack_surfaces_its_reason(
    code: mqtt5.DisconnectReasonCode, reason: str | None
) -> None:
    outcome = connack_outcome(mqtt5.DisconnectPacket(reason_code=code, reason_str=reason).write())
    assert isinstance(outcome, ConnectFailed)
    assert outcome.reason == f"disconnect:0x{int(code):02x}" and outcome.detail == (reason or "")


@given(st.binary(max_size=40))
def test_any_frame_decodes_or_fails_as_a_protocol_error(body: bytes) -> None:
    """Garbage from the server is ``error:protocol``, never another exception in the reader."""
    for first in (0x20, 0x30, 0x40, 0x90, 0xB0, 0xD0, 0xE0):
        data = bytes([first, len(body)]) + body
        try:
            decode_v5(data)
        except ConnectFailed as exc:
            assert exc.reason == "error:protocol"
