"""Properties of the routing structures: topic tree, retained store, delivery queue."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from jitp.domain.acl import topic_matches, valid_filter
from jitp.domain.routing import (
    DeliveryQueue,
    Offer,
    Outgoing,
    QueueLimits,
    RetainedLimits,
    RetainedStore,
    RetainVerdict,
    SubscriptionTree,
)

LEVEL = st.sampled_from(["a", "b", "$x", "", "dev"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join)
FILTER = (
    st.lists(st.sampled_from(["a", "b", "$x", "", "dev", "+"]), min_size=1, max_size=5)
    .flatmap(lambda levels: st.sampled_from([levels, [*levels, "#"], ["#"]]))
    .map("/".join)
    .filter(valid_filter)
)
CLIENT = st.sampled_from(["c1", "c2", "c3"])


@given(st.lists(st.tuples(FILTER, CLIENT, st.integers(0, 1)), max_size=30), TOPIC)
def test_tree_matches_exactly_what_the_reference_matcher_matches(
    subs: list[tuple[str, str, int]], topic: str
) -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    table: dict[tuple[str, str], int] = {}
    for f, c, q in subs:
        tree.subscribe(f, c, q)
        table[(f, c)] = q
    expected: dict[str, int] = {}
    for (f, c), q in table.items():
        if topic_matches(topic, f):
            expected[c] = max(expected.get(c, -1), q)
    assert tree.match(topic) == expected


class TreeChurn(RuleBasedStateMachine):
    """Any sequence of subscribe/unsubscribe leaves exactly the live entries, and no empty nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.tree: SubscriptionTree[str] = SubscriptionTree()
        self.live: dict[tuple[str, str], int] = {}

    @rule(f=FILTER, c=CLIENT, q=st.integers(0, 1))
    def subscribe(self, f: str, c: str, q: int) -> None:
        assert self.tree.subscribe(f, c, q) == ((f, c) not in self.live)
        self.live[(f, c)] = q

    @rule(f=FILTER, c=CLIENT)
    def unsubscribe(self, f: str, c: str) -> None:
        assert self.tree.unsubscribe(f, c) == ((f, c) in self.live)
        self.live.pop((f, c), None)

    @invariant()
    def entries_are_the_live_ones(self) -> None:
        assert len(self.tree) == len(self.live)
        assert {(f, c): q for f, c, q in self.tree.entries()} == self.live
        if not self.live:
            assert self.tree.node_count() == 0


TestTreeChurn = TreeChurn.TestCase


def test_churn_of_100k_filters_leaves_no_nodes_behind() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.subscribe("devices/bystander/#", "svc", 1)
    base = tree.node_count()
    for i in range(100_000):
        f = f"devices/attacker/{i}/x"
        tree.subscribe(f, "attacker", 0)
        tree.unsubscribe(f, "attacker")
    assert tree.node_count() == base
    assert tree.match("devices/bystander/t") == {"svc": 1}


def test_dollar_topics_are_not_matched_by_leading_wildcards() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.subscribe("#", "a", 0)
    tree.subscribe("+/events/x", "b", 0)
    tree.subscribe("$jitp/#", "c", 1)
    assert tree.match("$jitp/events/x") == {"c": 1}
    assert tree.match("sport/events/x") == {"a": 0, "b": 0}


def test_deep_topics_do_not_recurse() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    deep = "/".join(["+"] * 20_000)
    tree.subscribe(deep, "a", 0)
    assert tree.match("/".join(["x"] * 20_000)) == {"a": 0}
    assert tree.unsubscribe(deep, "a")
    assert tree.node_count() == 0


# -- retained ----------------------------------------------------------------------------------


def test_retained_quota_per_owner_count_and_bytes() -> None:
    store = RetainedStore(RetainedLimits(max_per_owner=2, max_bytes_per_owner=10, max_total_bytes=100))
    assert store.put("a/1", b"xxxx", 1, owner="d") is RetainVerdict.STORED
    assert store.put("a/2", b"xxxx", 1, owner="d") is RetainVerdict.STORED
    assert store.put("a/3", b"x", 1, owner="d") is RetainVerdict.OWNER_COUNT
    assert store.put("a/1", b"xxxxxxx", 1, owner="d") is RetainVerdict.OWNER_BYTES
    assert store.put("a/1", b"xxxxxx", 1, owner="d") is RetainVerdict.STORED  # replacing its own
    assert store.owner_usage("d") == (2, 10)
    assert store.put("a/1", b"", 1, owner="d") is RetainVerdict.CLEARED
    assert store.owner_usage("d") == (1, 4)
    assert "a/1" not in store


def test_retained_global_cap_refuses_clients_but_never_the_broker() -> None:
    store = RetainedStore(RetainedLimits(max_per_owner=10, max_bytes_per_owner=100, max_total_bytes=10))
    assert store.put("x", b"x" * 8, 0, owner="d") is RetainVerdict.STORED
    assert store.put("y", b"x" * 8, 0, owner="e") is RetainVerdict.TOTAL_BYTES
    assert store.put("$jitp/devices/e/config", b"x" * 8, 1, owner=None) is RetainVerdict.STORED
    assert store.total_bytes == 16


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]), st.binary(max_size=6), st.sampled_from(["o1", "o2", None])
        ),
        max_size=40,
    )
)
def test_retained_accounting_matches_the_stored_messages(ops: list[tuple[str, bytes, str | None]]) -> None:
    limits = RetainedLimits(max_per_owner=2, max_bytes_per_owner=8, max_total_bytes=20)
    store = RetainedStore(limits)
    for topic, data, owner in ops:
        store.put(topic, data, 0, owner=owner)
        assert store.total_bytes == sum(len(m.data) for m in store.messages.values())
        for o in ("o1", "o2"):
            mine = [m for m in store.messages.values() if m.owner == o]
            assert store.owner_usage(o) == (len(mine), sum(len(m.data) for m in mine))
            assert len(mine) <= limits.max_per_owner
            assert sum(len(m.data) for m in mine) <= limits.max_bytes_per_owner
        assert sum(len(m.data) for m in store.messages.values() if m.owner is not None) <= 20


def test_retained_match_uses_filters() -> None:
    store = RetainedStore()
    store.put("devices/a/t", b"1", 0, owner="a")
    store.put("devices/b/t", b"2", 0, owner="b")
    assert {m.topic for m in store.match("devices/+/t")} == {"devices/a/t", "devices/b/t"}
    assert [m.topic for m in store.match("devices/a/t")] == ["devices/a/t"]
    assert store.owned_by("a") == ["devices/a/t"]


# -- delivery queue ------------------------------------------------------------------------------


def _msg(i: int, qos: int = 1, size: int = 1) -> Outgoing:
    return Outgoing(f"t/{i}", b"x" * size, qos, retain=False)


def test_queue_bounds_drop_qos0_and_overflow_qos1() -> None:
    q = DeliveryQueue(limits=QueueLimits(max_messages=2, max_bytes=1000, max_inflight=1))
    assert q.offer(_msg(1)) is Offer.QUEUED
    assert q.offer(_msg(2)) is Offer.QUEUED
    assert q.offer(_msg(3, qos=0)) is Offer.DROPPED
    assert q.offer(_msg(4, qos=1)) is Offer.OVERFLOW
    assert len(q) == 2


def test_queue_byte_bound() -> None:
    q = DeliveryQueue(limits=QueueLimits(max_messages=100, max_bytes=20, max_inflight=10))
    assert q.offer(_msg(1, size=10)) is Offer.QUEUED
    assert q.offer(_msg(2, size=10)) is Offer.OVERFLOW  # 3 + 10 topic+payload bytes each
    assert q.bytes == len("t/1") + 10


def test_unacknowledged_messages_are_resent_first_in_order_with_dup() -> None:
    q = DeliveryQueue(limits=QueueLimits(max_messages=10, max_bytes=1000, max_inflight=2))
    for i in range(4):
        q.offer(_msg(i))
    a, b = q.next_to_send(), q.next_to_send()
    assert a is not None and b is not None
    assert q.next_to_send() is None  # max_inflight
    assert q.acknowledge(a.packet_id or 0)
    q.connection_lost()
    order = []
    while (m := q.next_to_send()) is not None:
        order.append((m.topic, m.dup))
        q.acknowledge(m.packet_id or 0)
    assert order == [("t/1", True), ("t/2", False), ("t/3", False)]
    assert len(q) == 0 and q.bytes == 0


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["offer0", "offer1", "send", "ack", "lost"]), max_size=60))
def test_queue_never_loses_an_unacknowledged_qos1_message(ops: list[str]) -> None:
    """Whatever happens, every QoS 1 message offered and queued is acknowledged or still in the queue."""
    q = DeliveryQueue(limits=QueueLimits(max_messages=5, max_bytes=10_000, max_inflight=2))
    queued: set[str] = set()
    acked: set[str] = set()
    n = 0
    for op in ops:
        if op.startswith("offer"):
            n += 1
            m = _msg(n, qos=int(op[-1]))
            if q.offer(m) is Offer.QUEUED and m.qos:
                queued.add(m.topic)
        elif op == "send":
            q.next_to_send()
        elif op == "ack" and q.inflight:
            pid = next(iter(q.inflight))
            acked.add(q.inflight[pid].topic)
            q.acknowledge(pid)
        elif op == "lost":
            q.connection_lost()
        held = {m.topic for m in q.pending} | {m.topic for m in q.inflight.values()}
        assert queued - acked <= held
        assert len(q) <= 5
        assert len(q.inflight) <= 2
        assert len(set(q.inflight)) == len(q.inflight)


def test_a_withdrawn_message_leaves_the_queue_and_its_bytes() -> None:
    q = DeliveryQueue(limits=QueueLimits(max_messages=10, max_bytes=1000, max_inflight=2))
    q.offer(_msg(1, qos=1))
    q.offer(_msg(2, qos=0))
    first, second = q.next_to_send(), q.next_to_send()
    assert first is not None and second is not None
    q.withdraw(first)
    q.withdraw(second)
    assert len(q) == 0 and q.bytes == 0 and not q.inflight


def test_retained_properties_count_toward_the_owner_quota() -> None:
    """An MQTT 5 device cannot hide bytes from the retained quota in user properties."""
    from jitp.domain.routing import MessageProperties, RetainedLimits, RetainedStore, RetainVerdict

    store = RetainedStore(RetainedLimits(max_per_owner=10, max_bytes_per_owner=1000, max_total_bytes=10_000))
    fat = MessageProperties(user_properties=(("k", "v" * 2000),))
    assert store.put("devices/d/a", b"x", 0, owner="d", properties=fat) is RetainVerdict.OWNER_BYTES
    assert "devices/d/a" not in store
    assert store.put("devices/d/a", b"x", 0, owner="d") is RetainVerdict.STORED
    assert store.total_bytes == 1
    store.remove("devices/d/a")
    assert store.total_bytes == 0


def test_empty_user_properties_are_not_free() -> None:
    """An MQTT 5 PUBLISH packed with empty user properties (5 bytes each on the wire, ~73 bytes each
    held in the broker) counts what holding them costs, in the retained quota and the queue bound;
    it used to count 0 bytes, so 100 retained messages of 50,000 empty pairs (~370 MB) fit in a
    1 MiB quota."""
    from jitp.domain.routing import USER_PROPERTY_OVERHEAD, MessageProperties

    empty = MessageProperties(user_properties=(("", ""),) * 10_000)
    assert empty.size == 10_000 * USER_PROPERTY_OVERHEAD
    store = RetainedStore(RetainedLimits())  # the defaults: 1 MiB per owner
    assert store.put("devices/d/a", b"x", 0, owner="d", properties=empty) is RetainVerdict.STORED
    assert store.owner_usage("d") == (1, 1 + 10_000 * USER_PROPERTY_OVERHEAD)
    assert store.put("devices/d/b", b"x", 0, owner="d", properties=empty) is RetainVerdict.OWNER_BYTES
    queue = DeliveryQueue(QueueLimits(max_messages=1000, max_bytes=16 * 1024 * 1024))
    offers = [queue.offer(Outgoing("t", b"x", 1, False, properties=empty)) for _ in range(30)]
    assert offers.count(Offer.QUEUED) == 16 * 1024 * 1024 // (2 + empty.size) < 30
    assert offers[-1] is Offer.OVERFLOW


def test_wire_size_is_what_the_properties_take_in_a_publish() -> None:
    """A profile's max_message_size counts the properties as sent (checked against the codec)."""
    import mqtt5

    from jitp.domain.routing import MessageProperties

    props = MessageProperties(
        payload_format_indicator=1,
        content_type="application/é",
        response_topic="r/t",
        correlation_data=b"\x00" * 9,
        user_properties=(("", ""), ("ké", "v" * 300)),
        expires_at=5.0,
    )
    bare = len(mqtt5.PublishPacket("t", b"").write())
    full = mqtt5.PublishPacket(
        "t",
        b"",
        payload_format_indicator=1,
        content_type=props.content_type,
        response_topic=props.response_topic,
        correlation_data=props.correlation_data,
        user_properties=list(props.user_properties),
        message_expiry_interval=5,
    ).write()
    # the property length and the remaining length grow by one byte each past 127
    assert len(full) - bare - 2 == props.wire_size


@given(
    st.lists(st.tuples(st.booleans(), TOPIC), max_size=40),
    st.lists(FILTER, min_size=1, max_size=5),
)
@settings(max_examples=300, deadline=None)
def test_retained_match_by_the_level_tree_is_the_scan(
    ops: list[tuple[bool, str]], filters: list[str]
) -> None:
    """The level tree finds exactly what a scan of every retained message with topic_matches finds,
    after any sequence of stores and clears."""
    store = RetainedStore()
    for keep, topic in ops:
        if keep:
            store.put(topic, b"x", 0, owner=None)
        else:
            store.remove(topic)
    for topic_filter in filters:
        found = sorted(m.topic for m in store.match(topic_filter))
        assert found == sorted(t for t in store.messages if topic_matches(t, topic_filter)), topic_filter
    for topic in list(store.messages):
        store.remove(topic)
    assert store.match("#") == [] and not store._root.children
