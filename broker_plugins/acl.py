"""Topic ACL plugin: every publish, subscribe and delivery is checked by :mod:`jitp.acl`."""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from broker_plugins.hardened import NAMESPACE
from jitp.acl import NOBODY, Access, Namespace, device_namespace, principal_namespace, quarantine_namespace
from jitp.records import DeviceStatus
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
    if admission.role is not Role.DEVICE:
        return principal_namespace(str(admission.role), admission.client_id)
    record = admission.record
    if record is None:
        return NOBODY
    if record.status == DeviceStatus.QUARANTINED:
        return quarantine_namespace(record.device_id)
    ns = record.config.get("namespace")
    if isinstance(ns, dict):
        return Namespace(publish=tuple(ns.get("publish", ())), subscribe=tuple(ns.get("subscribe", ())))
    return device_namespace(record.device_id)


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
