"""The operator's commands, once: one table of operations under every interface.

Each :class:`Operation` names a command (``devices.revoke``), the roles that may run it, its typed
arguments (a frozen dataclass), the audit entry it writes and its one implementation over the
:class:`~jitp.app.service.ProvisioningService` and its registry. The interfaces are transports over this
table and nothing else:

* the local CLI (``jitp devices revoke ID --data-dir D``) runs an operation in-process as
  ``local-admin:<user>@<host>`` (root-equivalent: the role ``admin``);
* the CLI's remote mode (``jitp --broker H:P ... devices revoke ID``) encodes the same arguments
  (:func:`encode_args`) into an admin API request;
* the MQTT admin API (``$jitp/admin/devices.revoke``) decodes them (:meth:`Operation.decode`),
  checks the caller's role (:meth:`Operation.allows`) and runs the operation on the broker node.

So an operation added here exists in all three, writes the same audit entry whichever way it is run,
and has the same effect on the other nodes sharing the registry (they follow the registry's trust
and templates versions). Commands that need local files or the data dir itself (``ca crl``,
``audit verify``, ``keys rotate``, ...) are the CLI's alone and are not in this table.

Never imports amqtt: the broker adapter calls in through :data:`OPERATIONS`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from cryptography import x509

from jitp import errors
from jitp.app.service import ProvisioningService
from jitp.app.status import fleet_status
from jitp.domain.alerts import ACK_ACTION, ALERT_ACTION, Alert, AlertKind, alerts_from_audit
from jitp.domain.audit import AuditDraft, AuditEntry
from jitp.domain.certificates import CertState, OperationalCertificate
from jitp.domain.records import Command, DeviceRecord, status_event_type
from jitp.domain.templates import TemplateSet
from jitp.registry import Erasure, KeyringStatus, Registry, StatusChange
from jitp.trust import Role, TrustAnchor

# -- permissions --------------------------------------------------------------------------------
READ = frozenset({Role.SERVICE, Role.AUDITOR, Role.OPERATOR, Role.ADMIN})
AUDIT = frozenset({Role.AUDITOR, Role.ADMIN})
MANAGE = frozenset({Role.OPERATOR, Role.ADMIN})
CA_READ = frozenset({Role.AUDITOR, Role.OPERATOR, Role.ADMIN})
KEYS = frozenset({Role.ADMIN})  # key management is the admin's alone; rotation runs locally
ANY_CA_ROLE = frozenset({Role.ADMIN})  # may register an auditor/operator/admin CA, not only device/service


# -- audit entries ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Audited:
    """An audit entry an operation writes: its action and the keys of its ``details``."""

    action: str
    fields: tuple[str, ...]


CA_REGISTERED = Audited("ca-registered", ("ca_id", "role", "subject", "region", "template"))
CA_ENABLED = Audited("ca-enabled", ("ca_id",))
CA_DISABLED = Audited("ca-disabled", ("ca_id",))
# Written by the registry (the entry goes with the change, in one transaction):
TEMPLATE_CHANGED = Audited("template-changed", ("template", "devices"))  # one per changed template
ERASED = Audited("erased", ("previous_status",))
ALERT_ACKED = Audited(ACK_ACTION, ("alert_id", "note"))


def lifecycle_audit(command: Command) -> Audited:
    return Audited(status_event_type(command), ("command", "previous_status", "changed"))


# -- where an operation runs ------------------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """Who runs an operation, and on what.

    ``node``: the service is a running broker node's. Its templates are the ones in force there, and
    a trust change is applied to its own sessions at once; other nodes (and a node under a local CLI)
    follow through the registry's trust and templates versions within ``trust.reload_interval``.
    """

    service: ProvisioningService
    actor: str  # in the audit trail: "operator:alice", "local-admin:root@host"
    role: Role
    templates_dir: Path
    node: bool = False

    @property
    def registry(self) -> Registry:
        return self.service.registry

    def now(self) -> datetime:
        return self.service.clock()

    def load_templates(self) -> TemplateSet:
        """The templates on disk (a broken one raises ConfigError, before anything is changed)."""
        return TemplateSet.load(self.templates_dir)

    def templates_in_force(self) -> TemplateSet:
        return self.service.templates if self.node else self.load_templates()

    def draft(self, audited: Audited, **details: str) -> AuditDraft:
        """The audit entry ``audited`` with these details: exactly its declared fields."""
        if set(details) != set(audited.fields):
            raise RuntimeError(f"{audited.action}: details {sorted(details)} are not {audited.fields}")
        return AuditDraft(
            at=self.now(), action=audited.action, actor=self.actor, details=MappingProxyType(details)
        )

    async def trust_changed(self) -> None:
        if self.node:
            await self.service.refresh_trust()


# -- arguments ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoArgs:
    pass


@dataclass(frozen=True)
class DeviceArgs:
    device_id: str


@dataclass(frozen=True)
class LifecycleArgs:
    device_id: str
    reason: str | None = None


@dataclass(frozen=True)
class EraseArgs:
    """A device by its id, or by the fingerprint (SHA-256 of the DER, hex) of its certificate."""

    device_id: str | None = None
    fingerprint: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if (self.device_id is None) == (self.fingerprint is None):
            raise errors.InvalidRequest("give a device_id or a certificate fingerprint (not both)")


@dataclass(frozen=True)
class CaRegisterArgs:
    cert_pem: str  # exactly one certificate
    role: Role = Role.DEVICE
    region: str | None = None
    template: str | None = None


@dataclass(frozen=True)
class CaArgs:
    ca_id: str


@dataclass(frozen=True)
class AuditExportArgs:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    pseudonymous: bool = False  # as stored: device references not resolved


@dataclass(frozen=True)
class AlertsListArgs:
    all: bool = False  # acknowledged alerts too


@dataclass(frozen=True)
class AlertAckArgs:
    alert_id: str
    note: str | None = None


# -- results that are more than a registry type -------------------------------------------------------
@dataclass(frozen=True)
class AlertAcked:
    alert: Alert
    changed: bool  # False: it was acknowledged before
    resumed: bool = False  # a CA's first joins, paused by this (spike) alert, go on again


@dataclass(frozen=True)
class TemplatesReloaded:
    templates: tuple[str, ...]
    changed: int  # device configurations re-rendered (a config-changed event each)


@dataclass(frozen=True)
class DeviceDetail:
    """``devices.show``: the record, and its operational certificates (newest first)."""

    record: DeviceRecord
    certificates: tuple[OperationalCertificate, ...] = ()
    at: datetime | None = None  # when it was read: a pending certificate past its window reads expired

    def to_json(self) -> dict[str, Any]:
        states = [(c, c.effective_state(self.at) if self.at else c.state) for c in self.certificates]
        current = next((c.to_json(self.at) for c, s in states if s is CertState.CURRENT), None)
        pending = [c.to_json(self.at) for c, s in states if s is CertState.PENDING]
        return {**self.record.to_json(), "certificates": {"current": current, "pending": pending}}


# -- the operation ----------------------------------------------------------------------------------
A = TypeVar("A")
R = TypeVar("R")


@dataclass(frozen=True)
class Operation(Generic[A, R]):
    name: str  # "<group>.<verb>": the admin API topic $jitp/admin/<name>, the CLI's `jitp <group> <verb>`
    summary: str
    roles: frozenset[Role]
    args: type[A]
    run: Callable[[Context, A], Awaitable[R]]
    encode: Callable[[R], Any]  # the result as JSON (the admin API's "result")
    audit: tuple[Audited, ...] = ()  # what it writes besides the admin API's admin-command entry

    @property
    def group(self) -> str:
        return self.name.partition(".")[0]

    @property
    def verb(self) -> str:
        return self.name.partition(".")[2]

    def allows(self, role: Role) -> bool:
        return role in self.roles

    def decode(self, raw: Mapping[str, object]) -> A:
        return decode_args(self.args, raw)


def decode_args(cls: type[A], raw: Mapping[str, object]) -> A:
    """Typed arguments from JSON-ish values (an admin request's ``args``, or the CLI's options).

    Unknown keys are ignored; a missing required one, or a value of the wrong kind, is an
    :class:`~jitp.errors.InvalidRequest`. Strings are taken as given (other JSON values are
    stringified, as a device id that is a list is simply an unknown device)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in raw or raw[f.name] is None:
            if f.default is dataclasses.MISSING:
                raise errors.InvalidRequest(f"missing argument {f.name!r}")
            continue
        values[f.name] = _decode(f.name, hints[f.name], raw[f.name])
    return cls(**values)


def _decode(name: str, hint: Any, value: object) -> Any:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    if hint is str:
        return value if isinstance(value, str) else str(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise errors.InvalidRequest(f"{name} must be true or false, not {value!r:.40}")
        return value
    if hint is Role:
        try:
            return Role(str(value))
        except ValueError:
            raise errors.InvalidRequest(f"{name}: not a role: {value!r:.40}") from None
    if hint is datetime:
        return parse_time(str(value))
    raise TypeError(f"argument {name}: {hint} has no decoding")  # pragma: no cover - a new field type


def encode_args(args: object) -> dict[str, Any]:
    """The JSON ``args`` of an admin request for typed arguments (defaults left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(args):  # type: ignore[arg-type]
        value = getattr(args, f.name)
        if value is None or value is False:
            continue
        out[f.name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise errors.InvalidRequest(f"not an ISO-8601 time: {value!r} (e.g. 2026-11-28T05:00:00Z)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# -- the implementations ------------------------------------------------------------------------------
async def _devices_list(ctx: Context, _: NoArgs) -> list[DeviceRecord]:
    return await ctx.registry.list_devices()


async def _devices_show(ctx: Context, args: DeviceArgs) -> DeviceDetail:
    record = await ctx.registry.get_device(args.device_id)
    if record is None:
        raise errors.NotFound(f"no device with id {args.device_id!r}")
    certificates = await ctx.registry.device_certificates(record.device_id)
    return DeviceDetail(record, tuple(certificates), at=ctx.now())


def _lifecycle(command: Command) -> Callable[[Context, LifecycleArgs], Awaitable[StatusChange]]:
    async def run(ctx: Context, args: LifecycleArgs) -> StatusChange:
        return await ctx.service.apply(command, args.device_id, actor=ctx.actor, reason=args.reason)

    return run


def _status_change(change: StatusChange) -> dict[str, Any]:
    return {
        "device_id": change.record.device_id,
        "status": str(change.record.status),
        "changed": change.changed,
    }


async def _devices_erase(ctx: Context, args: EraseArgs) -> Erasure:
    return await ctx.service.erase(
        device_id=args.device_id, fingerprint=args.fingerprint, actor=ctx.actor, reason=args.reason
    )


async def _ca_list(ctx: Context, _: NoArgs) -> list[TrustAnchor]:
    return await ctx.registry.anchors()


async def _ca_register(ctx: Context, args: CaRegisterArgs) -> TrustAnchor:
    if args.role not in (Role.DEVICE, Role.SERVICE, Role.CLAIM) and ctx.role not in ANY_CA_ROLE:
        # An operator registering an admin CA could issue itself an admin certificate.
        raise errors.Forbidden(f"only an admin may register a CA with role {args.role}")
    cert = _one_certificate(args.cert_pem)
    if args.template:
        ctx.templates_in_force().get(args.template)  # an unknown name fails here
    now = ctx.now()
    anchor = TrustAnchor.from_certificate(
        cert, role=args.role, region=args.region, template=args.template, registered_at=now, now=now
    )
    stored = await ctx.registry.register_anchor(
        anchor,
        audit=ctx.draft(
            CA_REGISTERED,
            ca_id=anchor.ca_id,
            role=str(anchor.role),
            subject=anchor.subject,
            region=anchor.region or "",
            template=anchor.template or "",
        ),
    )
    await ctx.trust_changed()
    return stored


def _one_certificate(pem: str) -> x509.Certificate:
    try:
        found = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise errors.InvalidRequest("cert_pem holds no PEM certificate") from None
    if len(found) > 1:
        raise errors.InvalidRequest(
            f"cert_pem holds {len(found)} certificates; register each CA certificate separately"
        )
    return found[0]


def _ca_set_enabled(enabled: bool) -> Callable[[Context, CaArgs], Awaitable[TrustAnchor]]:
    audited = CA_ENABLED if enabled else CA_DISABLED

    async def run(ctx: Context, args: CaArgs) -> TrustAnchor:
        anchor = await ctx.registry.set_anchor_enabled(
            args.ca_id, enabled, audit=ctx.draft(audited, ca_id=args.ca_id)
        )
        await ctx.trust_changed()
        return anchor

    return run


async def _templates_reload(ctx: Context, _: NoArgs) -> TemplatesReloaded:
    """Re-render the configs of devices whose template changed, then tell every node to reload."""
    templates = ctx.load_templates()  # a broken template fails here, changing nothing
    events = await ctx.service.reload_templates(templates, actor=ctx.actor)
    await ctx.registry.bump_templates_version()  # the other nodes load the new templates too
    return TemplatesReloaded(templates=tuple(templates.names()), changed=len(events))


async def _audit_export(ctx: Context, args: AuditExportArgs) -> list[AuditEntry]:
    since, until = args.since, args.until
    entries = [
        e
        for e in await ctx.registry.audit_entries()
        if (since is None or e.draft.at >= since) and (until is None or e.draft.at < until)
    ]
    return entries if args.pseudonymous else await ctx.registry.resolve_audit(entries)


async def _alerts_list(ctx: Context, args: AlertsListArgs) -> list[Alert]:
    """Alerts from the audit trail (their only store), oldest first; open ones unless ``all``."""
    wanted = (ALERT_ACTION, ACK_ACTION)
    entries = [e for e in await ctx.registry.audit_entries() if e.draft.action in wanted]
    alerts = alerts_from_audit(await ctx.registry.resolve_audit(entries))
    return alerts if args.all else [a for a in alerts if a.open]


async def _alerts_ack(ctx: Context, args: AlertAckArgs) -> AlertAcked:
    """Acknowledge an alert (idempotent). On the node that paused a CA for this spike alert, its
    first joins resume."""
    alert = next(
        (a for a in await _alerts_list(ctx, AlertsListArgs(all=True)) if a.alert_id == args.alert_id), None
    )
    if alert is None:
        raise errors.NotFound(f"no alert with id {args.alert_id!r}")
    if not alert.open:
        return AlertAcked(alert=alert, changed=False)
    await ctx.registry.append_audit([ctx.draft(ALERT_ACKED, alert_id=alert.alert_id, note=args.note or "")])
    resumed = False
    if ctx.node and alert.kind is AlertKind.PROVISIONING_SPIKE and alert.ca is not None:
        resumed = ctx.service.resume_ca(alert.ca)
    acked = dataclasses.replace(alert, acked_by=ctx.actor, acked_at=ctx.now())
    return AlertAcked(alert=acked, changed=True, resumed=resumed)


async def _status(ctx: Context, _: NoArgs) -> dict[str, Any]:
    return await fleet_status(ctx.registry, now=ctx.now())


async def _keys_status(ctx: Context, _: NoArgs) -> KeyringStatus:
    return await ctx.registry.keyring_status()


def _json_list(items: list[Any]) -> list[Any]:
    return [item.to_json() for item in items]


LIFECYCLE_SUMMARY = {
    Command.REVOKE: "refuse the device from now on; a live session is closed within seconds",
    Command.DISABLE: "block the device temporarily (enable lifts it)",
    Command.ENABLE: "lift disable or quarantine",
    Command.QUARANTINE: "admit the device only to report status and read its config",
    Command.DEPROVISION: "retire the device: session closed, retained messages cleared, refused until allow",
    Command.ALLOW: "readmit a deprovisioned or revoked device",
}

# -- the table ----------------------------------------------------------------------------------------
_TABLE: tuple[Operation[Any, Any], ...] = (
    Operation("devices.list", "device records", READ, NoArgs, _devices_list, _json_list),
    Operation("devices.show", "one device record", READ, DeviceArgs, _devices_show, lambda r: r.to_json()),
    *(
        Operation(
            f"devices.{c}",
            LIFECYCLE_SUMMARY[c],
            MANAGE,
            LifecycleArgs,
            _lifecycle(c),
            _status_change,
            (lifecycle_audit(c),),
        )
        for c in Command
    ),
    Operation(
        "devices.erase",
        "GDPR Art. 17: remove the device's data, keep a tombstone",
        MANAGE,
        EraseArgs,
        _devices_erase,
        lambda e: {"device_id": e.device_id},
        (ERASED,),
    ),
    Operation("ca.list", "registered CAs", CA_READ, NoArgs, _ca_list, _json_list),
    Operation(
        "ca.register",
        "register a CA certificate (an operator: device and service CAs only)",
        MANAGE,
        CaRegisterArgs,
        _ca_register,
        lambda a: {"ca_id": a.ca_id},
        (CA_REGISTERED,),
    ),
    Operation(
        "ca.disable",
        "disable a CA",
        MANAGE,
        CaArgs,
        _ca_set_enabled(False),
        lambda a: {"ca_id": a.ca_id, "enabled": a.enabled},
        (CA_DISABLED,),
    ),
    Operation(
        "ca.enable",
        "enable a CA",
        MANAGE,
        CaArgs,
        _ca_set_enabled(True),
        lambda a: {"ca_id": a.ca_id, "enabled": a.enabled},
        (CA_ENABLED,),
    ),
    Operation(
        "templates.reload",
        "re-render device configs after a template change; every node loads the new templates",
        MANAGE,
        NoArgs,
        _templates_reload,
        lambda r: {"changed": r.changed},
        (TEMPLATE_CHANGED,),
    ),
    Operation("audit.export", "audit entries", AUDIT, AuditExportArgs, _audit_export, _json_list),
    Operation(
        "alerts.list",
        "open anomaly alerts (--all: acknowledged too)",
        CA_READ,
        AlertsListArgs,
        _alerts_list,
        _json_list,
    ),
    Operation(
        "alerts.ack",
        "acknowledge an alert (a CA paused by a spike alert resumes)",
        MANAGE,
        AlertAckArgs,
        _alerts_ack,
        lambda r: {"alert": r.alert.to_json(), "changed": r.changed, "resumed": r.resumed},
        (ALERT_ACKED,),
    ),
    Operation("status.show", "a one-screen summary of the fleet", CA_READ, NoArgs, _status, lambda r: r),
    Operation(
        "keys.status",
        "which master keys wrap the registry's data keys",
        KEYS,
        NoArgs,
        _keys_status,
        lambda s: {"primary": s.primary, "wrapped": dict(s.wrapped), "pending": s.pending},
    ),
)

OPERATIONS: Mapping[str, Operation[Any, Any]] = types.MappingProxyType({op.name: op for op in _TABLE})
