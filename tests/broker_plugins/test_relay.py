"""The relay's frames (worker <-> supervisor) and how a broker applies them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_plugins.relay import (
    EVENTS,
    MAX_FRAME,
    FrameReader,
    Published,
    Retained,
    events_frame,
    parse_events,
    parse_publish,
    parse_retain,
    publish_frame,
    retain_frame,
)
from jitp.domain.events import ProvisioningEvent
from jitp.domain.records import EventType
from jitp.domain.routing import NO_PROPERTIES, MessageProperties, RetainedLimits, RetainedStore

PROPS = MessageProperties(
    payload_format_indicator=1,
    content_type="application/json",
    response_topic="devices/d1/reply",
    correlation_data=b"\x00\xffid",
    user_properties=(("k", "v"), ("k", "v2"), ("\u00e9", "")),
    expires_at=12345.5,
)

EVENT = ProvisioningEvent(
    event_id="0b6c1a52-3f0e-4a47-9d55-0f1f6c1b2a11",
    type=EventType.PROVISIONED,
    device_id="d1",
    occurred_at=datetime(2026, 12, 4, 12, 0, tzinfo=UTC),
    payload=b'{"device_id":"d1"}',
)


def test_frames_round_trip_whatever_the_chunks() -> None:
    frames = [
        publish_frame("devices/d1/telemetry", b"\x00\x01payload", 1),
        retain_frame("devices/d1/state", b"on", 1, "d1"),
        retain_frame("$jitp/devices/d1/config", b"{}", 1, None),
        retain_frame("devices/d1/state", b"", 0, "d1"),
        events_frame([EVENT]),
        publish_frame("devices/\u00e9/t", b"", 0),
    ]
    stream = b"".join(frames)
    for size in (1, 3, 7, len(stream)):
        reader = FrameReader()
        bodies = [b for at in range(0, len(stream), size) for b in reader.feed(stream[at : at + size])]
        assert len(bodies) == len(frames)
    assert parse_publish(bodies[0]) == Published("devices/d1/telemetry", b"\x00\x01payload", 1)
    assert parse_retain(bodies[1]) == Retained("devices/d1/state", b"on", 1, "d1")
    assert parse_retain(bodies[2]) == Retained("$jitp/devices/d1/config", b"{}", 1, None)
    assert parse_retain(bodies[3]) == Retained("devices/d1/state", b"", 0, "d1")
    assert bodies[4][:1] == EVENTS and parse_events(bodies[4]) == ([EVENT], {})
    assert parse_publish(bodies[5]) == Published("devices/\u00e9/t", b"", 0)


def test_mqtt5_properties_and_retain_travel_with_the_message() -> None:
    """Issue 15: a v5 message routed to another worker keeps its properties (user properties in
    order, with repeats; correlation data as bytes; the expiry deadline) and its RETAIN flag."""
    reader = FrameReader()
    bodies = reader.feed(
        publish_frame("devices/d1/t", b"{}", 1, properties=PROPS, retain=True)
        + retain_frame("devices/d1/s", b"on", 1, "d1", properties=PROPS)
        + publish_frame("devices/d1/t", b"", 0, properties=MessageProperties(correlation_data=b""))
    )
    assert parse_publish(bodies[0]) == Published("devices/d1/t", b"{}", 1, PROPS, retain=True)
    assert parse_retain(bodies[1]) == Retained("devices/d1/s", b"on", 1, "d1", PROPS)
    empty = parse_publish(bodies[2])
    assert empty.properties.correlation_data == b"" and not empty.retain
    assert parse_publish(reader.feed(publish_frame("t", b"x", 1))[0]).properties is NO_PROPERTIES


def test_the_shared_subscriptions_served_at_the_origin_travel_with_the_message() -> None:
    """A message or event travels with the shared subscriptions its origin worker gave it to: the
    other workers skip those groups, so one member of a group gets it."""
    key = "\x00$share/ingest/$jitp/events/provisioned/#"
    body = FrameReader().feed(publish_frame("a/b", b"x", 1, shares=[key, "\x00$share/g/a/+"]))[0]
    assert parse_publish(body).shares == (key, "\x00$share/g/a/+")
    events, shares = parse_events(FrameReader().feed(events_frame([EVENT], {EVENT.event_id: (key,)}))[0])
    assert events == [EVENT] and shares == {EVENT.event_id: (key,)}


def test_an_expired_retained_message_reports_it() -> None:
    r = Retained("t", b"x", 1, None, MessageProperties(expires_at=10.0))
    assert r.expired(10.0) and not r.expired(9.9)
    assert not Retained("t", b"x", 1, None).expired(1e12)


def test_a_frame_of_absurd_size_is_refused() -> None:
    with pytest.raises(ValueError, match="relay frame"):
        FrameReader().feed((MAX_FRAME + 1).to_bytes(4, "big") + b"P")
    with pytest.raises(ValueError, match="relay frame"):
        FrameReader().feed((0).to_bytes(4, "big"))


def test_replicated_retained_messages_skip_the_quotas_and_keep_the_owner() -> None:
    """What another worker admitted under its quotas is stored as is (the copies stay the same),
    and counts toward its owner here too, so a later clear or owner cleanup finds it."""
    store = RetainedStore(RetainedLimits(max_per_owner=1, max_bytes_per_owner=10, max_total_bytes=100))
    store.replicate("a/1", b"x" * 8, 1, owner="d1")
    store.replicate("a/2", b"y" * 8, 1, owner="d1")  # over d1's quota: another worker let it in
    assert sorted(store.owned_by("d1")) == ["a/1", "a/2"] and store.total_bytes == 16
    store.replicate("a/1", b"", 0, owner="d1")
    assert store.owned_by("d1") == ["a/2"] and store.total_bytes == 8
    store.replicate("cfg", b"{}", 1, owner=None)
    assert "cfg" in store and store.owned_by("d1") == ["a/2"]


_text = st.text(max_size=20)


@given(
    st.builds(
        MessageProperties,
        payload_format_indicator=st.integers(0, 1),
        content_type=st.none() | _text,
        response_topic=st.none() | _text,
        correlation_data=st.none() | st.binary(max_size=20),
        user_properties=st.lists(st.tuples(_text, _text), max_size=4).map(tuple),
        expires_at=st.none() | st.floats(0, 1e9),
    ),
    st.binary(max_size=40),
    st.booleans(),
    st.lists(_text.map(lambda f: "\x00$share/g/" + f), max_size=3).map(tuple),
)
def test_any_properties_round_trip_through_the_relay(
    properties: MessageProperties, data: bytes, retain: bool, shares: tuple[str, ...]
) -> None:
    frame = publish_frame("a/b", data, 1, properties=properties, retain=retain, shares=shares)
    assert parse_publish(FrameReader().feed(frame)[0]) == Published(
        "a/b", data, 1, properties, retain, shares
    )
