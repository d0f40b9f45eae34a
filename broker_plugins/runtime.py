"""How plugins reach the jitp runtime of the broker that loaded them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from amqtt.broker import BrokerContext

if TYPE_CHECKING:
    from broker_plugins.server import JitpServer


def runtime_of(context: BrokerContext) -> JitpServer:
    """The :class:`JitpServer` owning this broker.

    Workaround: amqtt 0.12.1 gives plugins no public handle to the broker instance, only the
    private ``BrokerContext._broker_instance`` (a :class:`~broker_plugins.hardened.JitpBroker`).
    """
    broker = context._broker_instance
    server = getattr(broker, "jitp", None)
    if server is None:
        raise RuntimeError("jitp plugins need the jitp broker (broker_plugins.hardened.JitpBroker)")
    return server  # type: ignore[no-any-return]
