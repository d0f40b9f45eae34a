"""Topic ACL plugin: every publish, subscribe and delivery is checked by :mod:`jitp.acl`."""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from broker_plugins.hardened import NAMESPACE
from jitp.acl import NOBODY, SERVICE_NAMESPACE, Access, Namespace, device_namespace
from jitp.service import Admission
from jitp.trust import Role

_ACTIONS = {
    Action.PUBLISH: Access.PUBLISH,
    Action.SUBSCRIBE: Access.SUBSCRIBE,
    Action.RECEIVE: Access.RECEIVE,
}


def namespace_of(admission: Admission | None) -> Namespace:
    if admission is None:
        return NOBODY
    if admission.role is Role.SERVICE:
        return SERVICE_NAMESPACE
    if admission.record is not None:
        return device_namespace(admission.record.device_id)
    return NOBODY


class JitpTopicPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or topic is None or action is None:
            return False
        access = _ACTIONS.get(action)
        if access is None:
            return False
        namespace = session.attributes.get(NAMESPACE, NOBODY)
        return bool(namespace.allows(access, topic))
