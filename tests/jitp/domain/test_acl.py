"""Topic ACL: matching against an independent reference, filter containment, device namespaces."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from jitp.domain.acl import (
    NOBODY,
    SERVICE_NAMESPACE,
    Access,
    device_namespace,
    filter_within,
    topic_matches,
    valid_filter,
)
from jitp.domain.identity import is_safe_id

# -- an independent reference: MQTT 3.1.1 section 4.7 as regular expressions --------------------


def reference_valid_filter(topic_filter: str) -> bool:
    """4.7.1: '#' only as a whole, last level; '+' only as a whole level; non-empty."""
    return (
        bool(topic_filter) and re.fullmatch(r"(?:(?:[^/+#]*|\+)/)*(?:[^/+#]*|\+|#)", topic_filter) is not None
    )


def reference_regex(topic_filter: str) -> re.Pattern[str]:
    pattern = ""
    for i, level in enumerate(topic_filter.split("/")):
        if level == "#":
            # "a/#" also matches the parent "a"; a lone "#" matches everything.
            pattern += "(?:/.*)?" if i else ".*"
            break
        if i:
            pattern += "/"
        pattern += "[^/]*" if level == "+" else re.escape(level)
    return re.compile(pattern, re.DOTALL)


def reference_matches(topic: str, topic_filter: str) -> bool:
    # 4.7.2: wildcards at the first level never match topics starting with '$'.
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    return reference_regex(topic_filter).fullmatch(topic) is not None


# -- strategies over a small alphabet, so that matches are frequent ------------------------------

level = st.text(alphabet="ab$", max_size=2)
topics = st.lists(level, min_size=1, max_size=5).map("/".join)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(level, st.just("+")), min_size=0, max_size=4))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "+"  # "" is not a filter


raw = st.text(alphabet="/+#$ab", max_size=8)


def instances(draw: st.DrawFn, topic_filter: str) -> str:
    """A concrete topic matching ``topic_filter`` (wildcards replaced by drawn levels)."""
    out: list[str] = []
    for i, lvl in enumerate(topic_filter.split("/")):
        if lvl == "#":
            extra = draw(st.lists(level, max_size=3))
            if i == 0:
                # '#' must produce at least one level; first level of a wildcard is never '$'.
                extra = extra or [draw(level)]
                extra[0] = extra[0].lstrip("$")
            out.extend(extra)
            break
        value = draw(level) if lvl == "+" else lvl
        if i == 0 and lvl == "+":
            value = value.lstrip("$")
        out.append(value)
    return "/".join(out)


@settings(max_examples=500)
@given(topics, st.one_of(filters(), raw.filter(reference_valid_filter)))
@example("$a", "+")
@example("$a/b", "#")
@example("a", "a/#")
@example("a/b", "a/+/#")
@example("a", "+/#")
@example("/a", "+/a")
@example("a/", "a/+")
def test_topic_matches_agrees_with_the_reference(topic: str, topic_filter: str) -> None:
    assert topic_matches(topic, topic_filter) == reference_matches(topic, topic_filter)


@settings(max_examples=300)
@given(st.one_of(raw, filters()))
def test_valid_filter_agrees_with_the_reference(topic_filter: str) -> None:
    assert valid_filter(topic_filter) == reference_valid_filter(topic_filter)


@settings(max_examples=500)
@given(filters(), filters(), st.data())
def test_filter_within_is_sound(inner: str, outer: str, data: st.DataObject) -> None:
    """If ``inner`` is within ``outer``, every topic ``inner`` matches, ``outer`` matches too."""
    if not filter_within(inner, outer):
        return
    for _ in range(5):
        topic = instances(data.draw, inner)
        assert reference_matches(topic, inner), (topic, inner)
        assert reference_matches(topic, outer), (topic, inner, outer)
        assert topic_matches(topic, outer)


@settings(max_examples=300)
@given(filters())
def test_filter_within_is_reflexive_and_hash_covers_non_dollar_filters(topic_filter: str) -> None:
    assert filter_within(topic_filter, topic_filter)
    assert filter_within(topic_filter, "#") == (not topic_filter.startswith("$"))


@pytest.mark.parametrize(
    ("inner", "outer", "expected"),
    [
        ("a/b", "a/+", True),
        ("a/+", "a/b", False),
        ("a/#", "a/+", False),
        ("a", "a/#", True),
        ("a/b/c", "a/#", True),
        ("+/+", "#", True),
        ("$jitp/x", "#", False),
        ("$jitp/x", "+/x", False),
        ("$jitp/x", "$jitp/#", True),
        ("#", "$jitp/#", False),
        ("+/x", "$jitp/x", False),
        ("a/#", "a/+/#", False),
        ("a+", "#", False),  # invalid inner
        ("a", "a#", False),  # invalid outer
        ("", "#", False),
    ],
)
def test_filter_within_examples(inner: str, outer: str, expected: bool) -> None:
    assert filter_within(inner, outer) is expected


# -- namespaces -------------------------------------------------------------------------------

D = "sensor-0001"


@pytest.mark.parametrize(
    "topic", ["devices/sensor-0001/x", "devices/sensor-0001/telemetry/temp", "devices/sensor-0001"]
)
def test_device_can_publish_in_its_namespace(topic: str) -> None:
    assert device_namespace(D).allows(Access.PUBLISH, topic)


@pytest.mark.parametrize(
    "topic",
    [
        "devices/sensor-0002/x",
        "devices/sensor-00011/x",
        "devices/+/x",
        "devices/sensor-0001/#",
        "devices/sensor-0001/+",
        "$jitp/events/provisioned/sensor-0001",
        "$jitp/devices/sensor-0001/config",
        "devices",
        "other",
        "",
        "devices/sensor-0001/\x00",
    ],
)
def test_device_cannot_publish_elsewhere_or_with_wildcards(topic: str) -> None:
    assert not device_namespace(D).allows(Access.PUBLISH, topic)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+/+/#",
        "+/#",
        "devices/#",
        "devices/+/cmd/#",
        "devices/+/#",
        "devices/sensor-0002/cmd/#",
        "devices/sensor-0001/#",  # its own telemetry: publish-only
        "$jitp/events/#",
        "$jitp/events/+/sensor-0001",
        "$jitp/devices/sensor-0002/#",
        "$jitp/devices/+/config",
        "$jitp/#",
        "$jitp/admin/#",
        "$SYS/#",
        "devices/sensor-0001/cmd/#/x",  # invalid
        "devices/sensor-0001/cmd/a+",  # invalid
        "",
    ],
)
def test_device_cannot_subscribe_beyond_its_namespace(topic_filter: str) -> None:
    assert not device_namespace(D).allows(Access.SUBSCRIBE, topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "devices/sensor-0001/cmd/#",
        "devices/sensor-0001/cmd/reboot",
        "devices/sensor-0001/cmd/+",
        "devices/sensor-0001/cmd",
        "$jitp/devices/sensor-0001/config",
        "$jitp/devices/sensor-0001/#",
        "$jitp/devices/sensor-0001/+",
    ],
)
def test_device_can_subscribe_to_its_commands_and_config(topic_filter: str) -> None:
    assert device_namespace(D).allows(Access.SUBSCRIBE, topic_filter)


def test_device_receives_only_its_own_topics() -> None:
    ns = device_namespace(D)
    assert ns.allows(Access.RECEIVE, "devices/sensor-0001/cmd/reboot")
    assert ns.allows(Access.RECEIVE, "$jitp/devices/sensor-0001/config")
    assert not ns.allows(Access.RECEIVE, "devices/sensor-0002/cmd/reboot")
    assert not ns.allows(Access.RECEIVE, "$jitp/events/provisioned/sensor-0001")
    assert not ns.allows(Access.RECEIVE, "devices/sensor-0001/cmd/#")


safe_ids = st.text(alphabet=st.sampled_from("ab$-.:é"), min_size=1, max_size=6).filter(is_safe_id) | st.text(
    min_size=1, max_size=20
).filter(is_safe_id)
suffixes = st.lists(st.sampled_from(["x", "cmd", "config", "a", "", "$x"]), max_size=3).map(
    lambda levels: "".join("/" + lvl for lvl in levels)
)


@st.composite
def hostile_filters(draw: st.DrawFn, d: str, e: str) -> str:
    pieces = ["devices", "$jitp", "events", "cmd", "config", "admin", d, e, "+", "", "x"]
    levels = draw(st.lists(st.sampled_from(pieces), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=400)
@given(safe_ids, safe_ids, st.data())
def test_nothing_a_device_may_subscribe_to_reaches_another_device_or_the_events(
    d: str, e: str, data: st.DataObject
) -> None:
    assume(d != e)
    ns = device_namespace(d)
    topic_filter = data.draw(hostile_filters(d, e))
    foreign = [
        f"devices/{e}{data.draw(suffixes)}",
        f"devices/{e}/cmd{data.draw(suffixes)}",
        f"$jitp/devices/{e}{data.draw(suffixes)}",
        f"$jitp/events{data.draw(suffixes)}",
        f"$jitp/events/provisioned/{d}",
        f"$jitp/admin{data.draw(suffixes)}",
    ]
    if ns.allows(Access.SUBSCRIBE, topic_filter):
        for topic in foreign:
            assert not topic_matches(topic, topic_filter), (d, e, topic_filter, topic)
    for topic in foreign:
        assert not ns.allows(Access.RECEIVE, topic)
        assert not ns.allows(Access.PUBLISH, topic)
    # What it may subscribe to stays within its own command and configuration trees.
    own = (f"devices/{d}/cmd/#", f"$jitp/devices/{d}/#")
    assert ns.allows(Access.SUBSCRIBE, topic_filter) == any(filter_within(topic_filter, f) for f in own)


def test_service_namespace() -> None:
    ns = SERVICE_NAMESPACE
    allowed = ("$jitp/events/#", "$jitp/events/provisioned/+", "devices/#", "devices/+/telemetry", "#", "+/#")
    for topic_filter in allowed:
        assert ns.allows(Access.SUBSCRIBE, topic_filter), topic_filter
    refused = ("$jitp/#", "$jitp/admin/#", "$jitp/devices/+/config", "$jitp/+/x", "$SYS/#", "a/#/b", "")
    for topic_filter in refused:
        assert not ns.allows(Access.SUBSCRIBE, topic_filter), topic_filter
    assert ns.allows(Access.RECEIVE, "$jitp/events/provisioned/sensor-0001")
    assert ns.allows(Access.RECEIVE, "devices/sensor-0001/telemetry")
    assert not ns.allows(Access.RECEIVE, "$jitp/devices/sensor-0001/config")
    assert not ns.allows(Access.RECEIVE, "$jitp/admin/x")
    for topic in ("$jitp/events/provisioned/x", "devices/x/cmd/reboot", "devices/x", "anything"):
        assert not ns.allows(Access.PUBLISH, topic), topic


@settings(max_examples=300)
@given(st.data())
def test_nothing_a_service_may_subscribe_to_reaches_reserved_topics(data: st.DataObject) -> None:
    pieces = ["$jitp", "$SYS", "events", "devices", "admin", "config", "d", "+", ""]
    levels = data.draw(st.lists(st.sampled_from(pieces), min_size=1, max_size=4))
    if data.draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    reserved = [
        f"$jitp/devices/d{data.draw(suffixes)}",
        f"$jitp/admin{data.draw(suffixes)}",
        f"$SYS/broker{data.draw(suffixes)}",
        "$jitp",
        "$jitp/event",
    ]
    if SERVICE_NAMESPACE.allows(Access.SUBSCRIBE, topic_filter):
        for topic in reserved:
            assert not topic_matches(topic, topic_filter), (topic_filter, topic)
    for topic in reserved:
        assert not SERVICE_NAMESPACE.allows(Access.RECEIVE, topic)


@settings(max_examples=200)
@given(st.one_of(topics, filters(), raw), st.sampled_from(list(Access)))
def test_nobody_gets_anything(topic: str, action: Access) -> None:
    assert not NOBODY.allows(action, topic)
