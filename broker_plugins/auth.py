"""Authentication plugin: hands the TLS peer to the core's ``ProvisioningService.admit``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from broker_plugins.acl import namespace_of
from broker_plugins.hardened import ADMISSION, NAMESPACE, PEER, REFUSAL, peer_chain_der
from broker_plugins.runtime import runtime_of
from jitp import errors
from jitp.service import PeerCredentials

log = logging.getLogger("jitp.auth")


class JitpAuthPlugin(BaseAuthPlugin):
    """Admits a client iff the core admits its certificate and client id.

    The decision (an ``Admission``) is kept in ``session.attributes`` for the topic plugin; a
    refusal keeps the error, so the broker can answer CONNACK 5 or 3.
    """

    @dataclass
    class Config:
        pass

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)

    async def authenticate(self, *, session: Session) -> bool | None:
        service = runtime_of(self.context).service
        peer = PeerCredentials(
            chain_der=peer_chain_der(session.ssl_object),
            client_id=session.client_id or "",
            address=f"{session.remote_address}:{session.remote_port}",
        )
        try:
            admission = await service.admit(peer)
        except errors.ProvisioningError as exc:
            session.attributes[REFUSAL] = exc
            return False
        session.attributes[ADMISSION] = admission
        session.attributes[PEER] = peer
        session.attributes[NAMESPACE] = namespace_of(admission)
        session.is_anonymous = False
        return True
