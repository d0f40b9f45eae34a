"""Typed per-session state of the jitp broker.

amqtt's ``Session`` carries the MQTT state (client id, will, keep-alive, clean session). What jitp
knows of the client lives beside it in typed fields of :class:`JitpSession`: its
:class:`ClientState` (admission, peer, namespace, profile: one frozen value, swapped whole when
an operator changes the device), its topic filters, its delivery queue and its message-rate bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from amqtt.session import Session

from broker_plugins.compat import LeanSessionState
from jitp.app.admission import TokenBucket
from jitp.app.service import Admission, PeerCredentials
from jitp.domain.acl import NOBODY, Access, Namespace, enrollment_namespace, namespace_for
from jitp.domain.records import DeviceRecord
from jitp.domain.routing import NO_PROPERTIES, DeliveryQueue, MessageProperties, SubscriptionOptions
from jitp.domain.templates import Profile
from jitp.trust import Role


@dataclass(frozen=True)
class ClientState:
    """An admitted client as the broker enforces it."""

    admission: Admission
    peer: PeerCredentials
    namespace: Namespace
    profile: Profile | None  # a device's connectivity profile; None for backend principals

    @classmethod
    def of(cls, admission: Admission, peer: PeerCredentials) -> ClientState:
        record = admission.record
        return cls(
            admission=admission,
            peer=peer,
            namespace=enrollment_namespace(record.device_id)
            if admission.enroll_only and record is not None
            else namespace_for(admission.role, admission.client_id, record),
            profile=profile_of(record),
        )

    def with_record(self, record: DeviceRecord) -> ClientState:
        """The same client after an operator changed its device (quarantine, enable, new config)."""
        admission = Admission(
            role=self.admission.role,
            client_id=self.admission.client_id,
            fingerprint=self.admission.fingerprint,
            record=record,
            service=self.admission.service,
            enroll_only=self.admission.enroll_only,
        )
        return ClientState.of(admission, self.peer)

    @property
    def role(self) -> Role:
        return self.admission.role

    @property
    def device_id(self) -> str | None:
        return self.admission.record.device_id if self.admission.record is not None else None

    @property
    def fingerprint(self) -> str:
        return self.admission.fingerprint


def profile_of(record: DeviceRecord | None) -> Profile | None:
    """The profile in a device record's configuration (as ``Profile.to_json`` wrote it)."""
    if record is None:
        return None
    doc = record.config.get("profile")
    if not isinstance(doc, dict):
        return None
    keepalive: dict[str, Any] = doc.get("keepalive") or {}
    rate: dict[str, Any] = doc.get("rate_limit") or {}
    return Profile(
        keepalive_min=int(keepalive.get("min", 0)),
        keepalive_max=int(keepalive.get("max", 3600)),
        max_qos=int(doc.get("max_qos", 1)),
        max_message_size=int(doc.get("max_message_size", 256 * 1024)),
        rate_messages=int(rate.get("messages", 0)),
        rate_seconds=float(rate.get("per_seconds", 1.0)),
        hints=MappingProxyType({str(k): str(v) for k, v in (doc.get("hints") or {}).items()}),
    )


class JitpSession(Session):
    """An amqtt Session with :class:`LeanSessionState` (W11) and jitp's typed state."""

    def __init__(self) -> None:
        super().__init__()
        self.client: ClientState | None = None  # None until admitted
        self.filters: dict[str, int] = {}  # topic filter -> granted QoS (W12)
        # QoS 2 PUBLISHes routed and acknowledged (PUBREC) whose PUBREL has not come: a resend of one
        # is not routed again, also after a reconnect of a persistent session [MQTT-4.3.3-2].
        self.qos2_received: set[int] = set()
        self.delivery = DeliveryQueue()  # W13; its limits are the role's, set at admission
        self.rate: TokenBucket | None = None  # W8: the profile's message rate
        self.closed_by_operator: str | None = None  # W14: a lifecycle decision closed it: no will
        self.closing = False  # a limit is closing it (act once, however many messages overflow)
        self.connected_at = 0.0  # time.monotonic() of its connection's admission (one clock per machine)
        # MQTT 5 (issue 15); a 3.1.1 session keeps the defaults.
        self.protocol = 4
        self.clean_start = False  # 3.1.1: the clean session flag; 5: Clean Start
        self.session_expiry = 0  # seconds an offline persistent session lives (capped by the broker)
        self.expiry_timer: Any = None  # asyncio.TimerHandle of an offline persistent session
        self.will_timer: Any = None  # asyncio.TimerHandle of a will held back by Will Delay Interval
        self.will_properties: MessageProperties = NO_PROPERTIES
        self.will_delay = 0
        self.options: dict[str, SubscriptionOptions] = {}  # v5 filters with non-default options

    def _init_states(self) -> None:
        self.transitions = LeanSessionState(self)  # type: ignore[assignment]

    def admit(self, state: ClientState) -> None:
        self.client = state
        profile = state.profile
        if profile is not None and profile.rate_messages > 0:
            self.rate = TokenBucket(profile.rate_messages / profile.rate_seconds, profile.rate_messages)
        else:
            self.rate = None

    def allows(self, access: Access, topic: str) -> bool:
        namespace = self.client.namespace if self.client is not None else NOBODY
        return namespace.allows(access, topic)

    @property
    def peer_address(self) -> str:
        return f"{self.remote_address}:{self.remote_port}"
