"""amqtt 0.12.1 compatibility: the pin, the internals jitp relies on, and the index of workarounds.

amqtt is pinned to :data:`AMQTT_VERSION`. :func:`check_amqtt_internals` runs before the broker
starts and fails loudly if any internal the adapter relies on has moved. Each workaround is named
here and implemented where its concern lives: the listener (W1, W6), the broker's connection path
and routing (W2-W4, W7, W12-W15), enforcement (W5, W8), the transport (W6, W9, W17), the protocol
handler (W12, W13, W16, W17), the TLS transport (W9), and this module (W11).

Workarounds (each has a regression test in ``tests/broker_plugins/test_hardening.py`` that runs
the same attack against stock amqtt and shows it succeeds there):

W1 REQUIRE_CLIENT_CERT    amqtt hard-codes ``ssl.CERT_OPTIONAL``. jitp owns the listener
                          (``type: external``) and runs the TLS handshake itself with a
                          CERT_REQUIRED context (:mod:`broker_plugins.tls`), a handshake deadline,
                          a 4096 backlog and TCP_NODELAY.
W2 AUTH_BEFORE_SESSION    stock amqtt deletes the session of a clean-session CONNECT's client id
                          *before* authenticating. Here authentication runs first; session state
                          is only touched for an admitted client.
W3 NO_REFUSED_SESSIONS    stock amqtt keeps refused clients in ``broker.sessions`` forever.
                          Refused clients never enter the table; clean sessions leave it on
                          disconnect.
W4 RETAINED_ACL           stock amqtt sends retained messages to a new subscriber without a
                          topic check, and replays retained messages matching *every* client's
                          subscriptions to a reconnecting one. Here each retained message is
                          checked with the topic plugins (RECEIVE), for the session's own
                          subscriptions only.
W5 KEEPALIVE              ``handle_read_timeout`` is a no-op in amqtt. Here silence beyond
                          ``keepalive_grace`` x keep-alive closes the connection, and keep-alive
                          is capped at ``max_keepalive``.
W6 DEADLINES_AND_LIMITS   no CONNECT deadline, no handshake deadline, and ``max_connections``
                          queues clients. Here: handshake and CONNECT deadlines, CONNACK 3 when
                          full, a maximum packet size and a per-client inflight limit.
W7 TAKEOVER               a second connection with a device's id takes over only after it is
                          authenticated as that device; the old connection is closed, logged and
                          audited (the signature of a cloned certificate).
W8 DEVICE_PROFILE        a device's connectivity profile (from its enrollment template) is
                          enforced: keep-alive range, maximum QoS of subscriptions, maximum message
                          size (larger closes the connection) and a message rate (excess dropped).
W9 TLS_TRANSPORT          not amqtt but asyncio: its TLS (``sslproto``) allocates a 256 KiB read
                          buffer per connection, runs streams and a task per connection before
                          any MQTT, and sends no TLS alert when OpenSSL refuses a client
                          certificate (clients see a bare EOF). jitp drives TLS itself through
                          ``ssl.MemoryBIO`` in one asyncio Protocol per connection
                          (:mod:`broker_plugins.transport`): no task before a whole CONNECT, the
                          refusal's alert sent, nothing buffered for an idle connection.
W10 DEVICE_STATUS         stock amqtt disconnects any client that publishes to a $-topic; a jitp
                          device may publish its own ``$jitp/devices/<id>/status`` (and nothing
                          else under $), and backend principals send requests to the admin API on
                          ``$jitp/admin/<command>``, as the topic ACL decides.
W11 LEAN_SESSION_STATE    amqtt builds a ``transitions.Machine`` for every Session, ~12% of broker
                          CPU per connect. Sessions made for CONNECTs use :class:`LeanSessionState`,
                          the same three states and transitions (``new``, ``connected``,
                          ``disconnected``) without the library; property-tested against it.
W12 ROUTING               amqtt matches every PUBLISH against every filter in the broker, leaves
                          unsubscribed filters behind, and iterates its subscription dict across
                          an await (a concurrent SUBSCRIBE drops the message for the rest). Here
                          a topic tree (:class:`jitp.domain.routing.SubscriptionTree`) routes each message
                          synchronously, *before* its PUBACK: an acknowledged message is already in
                          every matching session's queue, whatever the publisher does next.
W13 DELIVERY_QUEUE        amqtt sends each outgoing message in a task of its own, without bound,
                          forgets unacknowledged QoS 1 messages when a connection drops, and
                          replays an offline session's queue with RETAIN=1. Here each session has
                          a bounded :class:`jitp.domain.routing.DeliveryQueue` written by one sender per
                          connection: QoS 0 beyond the bound is dropped, QoS 1 beyond it disconnects
                          the client; unacknowledged QoS 1 messages are resent (DUP) on reconnect.
W14 WILL_ACL              amqtt publishes and retains a will without any topic check. Here a will
                          outside the client's namespace refuses the CONNECT (``will_not_allowed``),
                          and the will is checked again (ACL, profile, quotas) when published.
W15 RETAINED_QUOTA        retained messages have a quota per client (count, bytes) and a global cap;
                          a revoked, disabled, deprovisioned or erased device's are cleared.
W16 STRICT_PACKETS        QoS 3, a QoS 1 PUBLISH with packet id 0, wildcards in a PUBLISH topic, an
                          empty SUBSCRIBE or a will with QoS 3 close the connection (audited
                          ``protocol_violation``); keep-alive also bounds a half-sent packet.
W17 INLINE_READER         amqtt reads packets in one task and handles each in another, never
                          waiting for them. Here the reader handles them in order, so a client that
                          does not read its acknowledgements stops being read; writes that cannot
                          drain within the keep-alive period close the connection.
W18 SESSION_LOOP          amqtt runs, per client, a reader task, a message loop and four tasks that
                          loop waits on (disconnect, subscriptions, unsubscriptions, QoS 2
                          deliveries), with two request queues: seven tasks and ~30 KiB per held
                          connection. Here the connection's own task reads (SUBSCRIBE, UNSUBSCRIBE
                          and the QoS 2 handshake handled in order, in the reader, yielding every
                          16 packets), one sender writes: two tasks. Inbound QoS 2 is routed once on
                          arrival and its id kept until PUBREL; subscriptions are granted QoS 1 at most.
                          The CONNECT is parsed in place (:func:`broker_plugins.framing.parse_connect`),
                          not by amqtt's ``init_from_connect`` with its plugin dispatch.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import ssl

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

AMQTT_VERSION = "0.12.1"


class AmqttIncompatible(RuntimeError):
    """The installed amqtt is not the version whose internals this module was written against."""


def check_amqtt_internals() -> None:
    """Fail loudly at start-up if amqtt changed under us."""
    installed = importlib.metadata.version("amqtt")
    if installed != AMQTT_VERSION:
        raise AmqttIncompatible(
            f"jitp's hardened broker is written against amqtt {AMQTT_VERSION}, found {installed}. "
            "Re-check every workaround listed in broker_plugins/compat.py before changing the pin."
        )
    needed: list[tuple[object, str]] = [
        (Broker, "_delete_session"),
        (Broker, "_del_subscription"),
        (Broker, "_del_all_subscriptions"),
        (Broker, "_broadcast_message"),
        (Broker, "retain_message"),
        (Broker, "_publish_retained_messages_for_subscription"),
        (Broker, "_publish_session_retained_messages"),
        (Broker, "add_subscription"),
        (BrokerProtocolHandler, "mqtt_connack_authorize"),
        (BrokerProtocolHandler, "mqtt_acknowledge_subscription"),
        (BrokerProtocolHandler, "mqtt_acknowledge_unsubscription"),
        (BrokerProtocolHandler, "handle_pingreq"),
        (BrokerProtocolHandler, "handle_read_timeout"),
        (BrokerProtocolHandler, "_send_packet"),
    ]
    missing = [f"{owner.__name__}.{name}" for owner, name in needed if not hasattr(owner, name)]  # type: ignore[attr-defined]
    if missing:
        raise AmqttIncompatible(f"amqtt internals jitp relies on are gone: {', '.join(missing)}")
    params = inspect.signature(Broker._publish_retained_messages_for_subscription).parameters
    if list(params) != ["self", "subscription", "session"]:
        raise AmqttIncompatible("Broker._publish_retained_messages_for_subscription changed its signature")
    if "_sessions" not in inspect.getsource(Broker.__init__):
        raise AmqttIncompatible("Broker._sessions is gone")


def peer_chain_der(ssl_object: ssl.SSLObject | None) -> tuple[bytes, ...]:
    """The client chain as OpenSSL verified it, leaf first, as DER.

    Python 3.13 has the public ``get_verified_chain()``; before that only the private
    ``_sslobj.get_verified_chain()`` exists (Python 3.10-3.12).
    """
    if ssl_object is None:
        return ()
    getter = getattr(ssl_object, "get_verified_chain", None)
    if getter is None:
        getter = ssl_object._sslobj.get_verified_chain  # type: ignore[attr-defined]
    chain = getter() or []
    if chain and isinstance(chain[0], bytes):
        return tuple(chain)
    return tuple(c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain)  # type: ignore[attr-defined]


class LeanSessionState:
    """W11: what amqtt's Session needs from its ``transitions.Machine``, without building one.

    States ``new``, ``connected``, ``disconnected``; ``connect`` from new or disconnected,
    ``disconnect`` from any state (re-entering ``disconnected`` runs its callback again, as
    transitions does); the Session's enter callbacks keep its connect/disconnect times.
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> bool:
        if self.state == "connected":
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = "disconnected"
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"
