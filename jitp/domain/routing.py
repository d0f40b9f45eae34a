"""Message routing state, independent of any broker: subscriptions, retained messages, delivery queues.

Three value-level structures the broker adapter drives, each bounded and property-tested:

* :class:`SubscriptionTree`: topic filters in a tree of levels. A PUBLISH costs what the filters
  that could match it cost (one branch per level, plus ``+`` and ``#``), never a scan of every
  filter; unsubscribing prunes the branch, so churn leaves nothing behind. :meth:`match` returns a
  fresh mapping, so delivering may await while subscriptions change.
* :class:`RetainedStore`: retained messages with their owner, a quota per owner (count and bytes)
  and a global byte cap.
* :class:`DeliveryQueue`: one session's outgoing messages, bounded in messages and bytes; QoS 1
  messages stay until acknowledged and are resent (DUP) on the next connection of a persistent session.

None of them does I/O or knows the time.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")


class _Node(Generic[K]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.subscribers: dict[K, int] = {}


class SubscriptionTree(Generic[K]):
    """Topic filter -> {subscriber: QoS}, matched level by level (MQTT 3.1.1 section 4.7)."""

    def __init__(self) -> None:
        self._root: _Node[K] = _Node()
        self._count = 0

    def __len__(self) -> int:
        """The number of (filter, subscriber) entries."""
        return self._count

    def subscribe(self, topic_filter: str, subscriber: K, qos: int) -> bool:
        """Add or update; True if the subscriber had no subscription on this exact filter."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        new = subscriber not in node.subscribers
        node.subscribers[subscriber] = qos
        self._count += new
        return new

    def unsubscribe(self, topic_filter: str, subscriber: K) -> bool:
        """Remove; True if there was such a subscription. Empty branches are pruned."""
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.subscribers.pop(subscriber, None) is None:
            return False
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subscribers or child.children:
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> dict[K, int]:
        """Every subscriber with a filter matching ``topic``, with the highest QoS among its filters."""
        levels = topic.split("/")
        out: dict[K, int] = {}
        # The "$" rule [MQTT-4.7.2-1]: a filter starting with a wildcard never matches a $-topic.
        dollar = topic.startswith("$")
        stack: list[tuple[_Node[K], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            wild = not (dollar and i == 0)
            if wild:
                hash_node = node.children.get("#")
                if hash_node is not None:
                    _merge(out, hash_node.subscribers)
            if i == len(levels):
                _merge(out, node.subscribers)
                continue
            child = node.children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            if wild:
                plus = node.children.get("+")
                if plus is not None:
                    stack.append((plus, i + 1))
        return out

    def entries(self) -> Iterator[tuple[str, K, int]]:
        """Every (filter, subscriber, QoS)."""
        stack: list[tuple[_Node[K], tuple[str, ...]]] = [
            (child, (level,)) for level, child in self._root.children.items()
        ]
        while stack:
            node, path = stack.pop()
            topic_filter = "/".join(path)
            for subscriber, qos in node.subscribers.items():
                yield topic_filter, subscriber, qos
            stack.extend((child, (*path, level)) for level, child in node.children.items())

    def node_count(self) -> int:
        """Nodes below the root (what churn would leak if pruning failed)."""
        count, stack = 0, list(self._root.children.values())
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count


def _merge(out: dict[K, int], subscribers: dict[K, int]) -> None:
    for subscriber, qos in subscribers.items():
        if out.get(subscriber, -1) < qos:
            out[subscriber] = qos


# -- retained messages ------------------------------------------------------------------------


# What one user property costs the broker beside its two strings: its tuple and the reference to it
# (~73 bytes measured on CPython 3.11, 64-bit). The two strings are counted by their length.
USER_PROPERTY_OVERHEAD = 64


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """What an MQTT 5 PUBLISH carries beside its payload, passed through to v5 subscribers (a 3.1.1
    subscriber gets the payload alone). ``expires_at`` is the Message Expiry Interval turned into a
    deadline on the broker's monotonic clock: a queued message past it is never delivered."""

    payload_format_indicator: int = 0
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    expires_at: float | None = None

    @property
    def size(self) -> int:
        """Bytes counted toward queue bounds (what a publisher could inflate). Each user property
        also counts what holding the pair costs (:data:`USER_PROPERTY_OVERHEAD`): a PUBLISH packed
        with empty pairs (5 bytes each on the wire) would otherwise count 0 bytes."""
        return (
            len(self.content_type or "")
            + len(self.response_topic or "")
            + len(self.correlation_data or b"")
            + sum(USER_PROPERTY_OVERHEAD + len(k) + len(v) for k, v in self.user_properties)
        )

    @property
    def wire_size(self) -> int:
        """Bytes these properties take in a PUBLISH (identifier, length prefixes and UTF-8): what a
        device's profile ``max_message_size`` counts beside the payload."""

        def utf8(text: str | None) -> int:
            return 0 if text is None else 3 + len(text.encode())

        return (
            (2 if self.payload_format_indicator else 0)
            + (5 if self.expires_at is not None else 0)
            + utf8(self.content_type)
            + utf8(self.response_topic)
            + (0 if self.correlation_data is None else 3 + len(self.correlation_data))
            + sum(5 + len(k.encode()) + len(v.encode()) for k, v in self.user_properties)
        )


NO_PROPERTIES = MessageProperties()


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """MQTT 5 subscription options beside the QoS [MQTT-3.8.3.1]: No Local (never send a client its
    own messages), Retain As Published (keep the RETAIN flag of live messages), Retain Handling
    (0: send retained messages at subscribe, 1: only for a new subscription, 2: never)."""

    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


DEFAULT_OPTIONS = SubscriptionOptions()


def shared_filter(topic_filter: str) -> tuple[str, str] | None:
    """(share name, inner filter) of ``$share/<name>/<filter>``, or None for a plain filter.
    Raises ValueError for a malformed one (empty or wildcard name, no filter) [MQTT-4.8.2-1, -2]."""
    if not topic_filter.startswith("$share/"):
        return None
    name, sep, inner = topic_filter[len("$share/") :].partition("/")
    if not sep or not name or not inner or "+" in name or "#" in name:
        raise ValueError(f"malformed shared subscription {topic_filter[:120]!r}")
    return name, inner


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    topic: str
    data: bytes
    qos: int
    owner: str | None  # the client that retained it; None: the broker itself (device configs)
    properties: MessageProperties = NO_PROPERTIES

    @property
    def size(self) -> int:
        """Bytes counted toward the quotas: payload and MQTT 5 properties."""
        return len(self.data) + self.properties.size


class RetainVerdict(enum.Enum):
    STORED = "stored"
    CLEARED = "cleared"
    OWNER_COUNT = "owner_count"  # the owner has max_per_owner retained messages already
    OWNER_BYTES = "owner_bytes"  # the owner's retained bytes would exceed max_bytes_per_owner
    TOTAL_BYTES = "total_bytes"  # the broker's retained bytes would exceed max_total_bytes


@dataclass(frozen=True)
class RetainedLimits:
    max_per_owner: int = 100
    max_bytes_per_owner: int = 1024 * 1024
    max_total_bytes: int = 256 * 1024 * 1024


class _Level:
    __slots__ = ("children", "topic")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}
        self.topic: str | None = None  # set if a retained message's topic ends at this level


class RetainedStore:
    """Retained messages by topic, with per-owner and global quotas.

    The broker's own messages (``owner=None``) count toward the global total but are never refused:
    a device must always be able to get its configuration. The topics are also held in a tree of
    levels, so a wildcard subscription costs what its branch holds, not a scan of every retained
    message in the broker (a fleet retains one configuration per device).
    """

    def __init__(self, limits: RetainedLimits | None = None) -> None:
        self.limits = limits or RetainedLimits()
        self.messages: dict[str, RetainedMessage] = {}
        self.total_bytes = 0
        self._owned: dict[str, dict[str, int]] = {}  # owner -> {topic: bytes}
        self._root = _Level()

    def _index(self, topic: str) -> None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Level()
            node = child
        node.topic = topic

    def _unindex(self, topic: str) -> None:
        path: list[tuple[_Level, str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        node.topic = None
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.topic is not None or child.children:
                break
            del parent.children[level]

    def __len__(self) -> int:
        return len(self.messages)

    def __contains__(self, topic: object) -> bool:
        return topic in self.messages

    def put(
        self,
        topic: str,
        data: bytes,
        qos: int,
        *,
        owner: str | None,
        properties: MessageProperties = NO_PROPERTIES,
    ) -> RetainVerdict:
        """Store (or, with empty ``data``, clear) the retained message of ``topic`` [MQTT-3.3.1-10]."""
        if not data:
            self.remove(topic)
            return RetainVerdict.CLEARED
        old = self.messages.get(topic)
        old_size = old.size if old is not None else 0
        size = len(data) + properties.size  # properties count: a device could hide bytes there
        if owner is not None:
            owned = self._owned.get(owner, {})
            replacing_own = old is not None and old.owner == owner
            if not replacing_own and len(owned) >= self.limits.max_per_owner:
                return RetainVerdict.OWNER_COUNT
            owner_bytes = sum(owned.values()) - (old_size if replacing_own else 0)
            if owner_bytes + size > self.limits.max_bytes_per_owner:
                return RetainVerdict.OWNER_BYTES
            if self.total_bytes - old_size + size > self.limits.max_total_bytes:
                return RetainVerdict.TOTAL_BYTES
        self.remove(topic)
        self.messages[topic] = RetainedMessage(topic, bytes(data), qos, owner, properties)
        self._index(topic)
        self.total_bytes += size
        if owner is not None:
            self._owned.setdefault(owner, {})[topic] = size
        return RetainVerdict.STORED

    def replicate(
        self,
        topic: str,
        data: bytes,
        qos: int,
        *,
        owner: str | None,
        properties: MessageProperties = NO_PROPERTIES,
    ) -> None:
        """Store (or clear) a retained message another broker process already admitted under its
        quotas: never refused here, so the copies stay the same."""
        self.remove(topic)
        if data:
            message = self.messages[topic] = RetainedMessage(topic, bytes(data), qos, owner, properties)
            self._index(topic)
            self.total_bytes += message.size
            if owner is not None:
                self._owned.setdefault(owner, {})[topic] = message.size

    def remove(self, topic: str) -> bool:
        old = self.messages.pop(topic, None)
        if old is None:
            return False
        self._unindex(topic)
        self.total_bytes -= old.size
        if old.owner is not None:
            owned = self._owned.get(old.owner)
            if owned is not None:
                owned.pop(topic, None)
                if not owned:
                    del self._owned[old.owner]
        return True

    def owned_by(self, owner: str) -> list[str]:
        return list(self._owned.get(owner, ()))

    def owner_usage(self, owner: str) -> tuple[int, int]:
        """(messages, bytes) retained by ``owner``."""
        owned = self._owned.get(owner, {})
        return len(owned), sum(owned.values())

    def match(self, topic_filter: str) -> list[RetainedMessage]:
        """The retained messages a new subscription on ``topic_filter`` receives."""
        if "+" not in topic_filter and "#" not in topic_filter:
            found = self.messages.get(topic_filter)
            return [found] if found is not None else []
        levels = topic_filter.split("/")
        topics: list[str] = []
        stack: list[tuple[_Level, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == len(levels):
                if node.topic is not None:
                    topics.append(node.topic)
                continue
            level = levels[i]
            if level == "#" or level == "+":
                # the "$" rule [MQTT-4.7.2-1]: a leading wildcard never matches a $-topic
                children = [c for name, c in node.children.items() if i or not name.startswith("$")]
                if level == "+":
                    stack.extend((child, i + 1) for child in children)
                    continue
                if node.topic is not None and i:  # "a/#" matches "a" itself
                    topics.append(node.topic)
                subtree = children
                while subtree:
                    below = subtree.pop()
                    if below.topic is not None:
                        topics.append(below.topic)
                    subtree.extend(below.children.values())
                continue
            child = node.children.get(level)
            if child is not None:
                stack.append((child, i + 1))
        return [m for m in (self.messages.get(t) for t in topics) if m is not None]


# -- one session's outgoing messages ------------------------------------------------------------


@dataclass(slots=True)
class Outgoing:
    topic: str
    data: bytes
    qos: int
    retain: bool
    packet_id: int | None = None
    dup: bool = False  # sent before on an earlier connection, not acknowledged
    properties: MessageProperties = NO_PROPERTIES
    share: str | None = None  # the shared subscription that chose this session (redelivered elsewhere)

    @property
    def size(self) -> int:
        return len(self.topic) + len(self.data) + self.properties.size


class Offer(enum.Enum):
    QUEUED = "queued"
    DROPPED = "dropped"  # QoS 0 over the bound: dropped, as MQTT allows
    OVERFLOW = "overflow"  # QoS 1 over the bound: not queued; a connected client is disconnected


@dataclass(frozen=True)
class QueueLimits:
    max_messages: int = 1000
    max_bytes: int = 16 * 1024 * 1024
    max_inflight: int = 32  # QoS 1 messages sent and not yet acknowledged


@dataclass
class DeliveryQueue:
    """A session's outgoing messages: ``pending`` (not sent) and ``inflight`` (sent, awaiting PUBACK).

    Both count toward the bounds. A message leaves only when sent at QoS 0, acknowledged at QoS 1,
    or when the session itself ends (:meth:`clear`).
    """

    limits: QueueLimits = field(default_factory=QueueLimits)
    notify: Callable[[], None] | None = None  # called when something becomes sendable
    pending: deque[Outgoing] = field(default_factory=deque)
    inflight: dict[int, Outgoing] = field(default_factory=dict)
    bytes: int = 0
    dropped: int = 0
    _next_id: int = 0

    def __len__(self) -> int:
        return len(self.pending) + len(self.inflight)

    def offer(self, message: Outgoing) -> Offer:
        if len(self) >= self.limits.max_messages or self.bytes + message.size > self.limits.max_bytes:
            self.dropped += 1
            return Offer.DROPPED if message.qos == 0 else Offer.OVERFLOW
        self.pending.append(message)
        self.bytes += message.size
        if self.notify is not None and len(self.inflight) < self.limits.max_inflight:
            self.notify()
        return Offer.QUEUED

    def next_to_send(self) -> Outgoing | None:
        """The next message to write, with its packet id assigned (QoS 1), or None if none may go now."""
        if not self.pending:
            return None
        if self.pending[0].qos and len(self.inflight) >= self.limits.max_inflight:
            return None
        message = self.pending.popleft()
        if message.qos:
            if message.packet_id is None or message.packet_id in self.inflight:
                message.packet_id = self._allocate_id()
            self.inflight[message.packet_id] = message
        else:
            self.bytes -= message.size
        return message

    def acknowledge(self, packet_id: int) -> bool:
        message = self.inflight.pop(packet_id, None)
        if message is None:
            return False
        self.bytes -= message.size
        if self.notify is not None and self.pending:
            self.notify()
        return True

    def withdraw(self, message: Outgoing) -> None:
        """A message taken by :meth:`next_to_send` that will not be sent after all (the session may
        no longer receive its topic): it leaves the queue as if acknowledged."""
        if message.qos and message.packet_id is not None:
            self.acknowledge(message.packet_id)

    def take_shared(self) -> list[Outgoing]:
        """Remove and return the messages a shared subscription gave this session (after
        :meth:`connection_lost`, so unacknowledged ones are among them): another member of the
        group gets them [MQTT-4.8.2-5]."""
        taken = [m for m in self.pending if m.share is not None]
        if taken:
            self.pending = deque(m for m in self.pending if m.share is None)
            self.bytes -= sum(m.size for m in taken)
        return taken

    def connection_lost(self) -> None:
        """Unacknowledged messages go back to the front, in the order they were sent, marked DUP."""
        resend = list(self.inflight.values())
        self.inflight.clear()
        for message in reversed(resend):
            message.dup = True
            self.pending.appendleft(message)

    def clear(self) -> int:
        """The session ended: forget everything. Returns how many messages were discarded."""
        discarded = len(self)
        self.pending.clear()
        self.inflight.clear()
        self.bytes = 0
        return discarded

    def _allocate_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("no free packet id")  # unreachable: max_inflight < 65535
