"""The MQTT-native admin API: ``$jitp/admin/<command>`` requests, role-checked, audited.

A backend principal (a client certificate under a CA registered with ``--role service``,
``auditor``, ``operator`` or ``admin``) publishes a JSON request::

    {"correlation_id": "42", "reply_to": "$jitp/admin/replies/<client_id>/<anything>", "args": {...}}

and gets ``{"correlation_id": "42", "ok": true, "result": ...}`` or ``{"ok": false, "error":
{"reason": ..., "message": ...}}`` at QoS 1 on ``reply_to`` (which must lie under its own
``$jitp/admin/replies/<client_id>/``; otherwise ``.../<correlation_id>`` there). Every request,
allowed or denied, is audited with the caller's identity. Devices never reach ``$jitp/admin/#``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cryptography import x509

from jitp import errors
from jitp.audit import AuditDraft
from jitp.records import Command
from jitp.service import Admission
from jitp.templates import TemplateSet
from jitp.trust import Role, TrustAnchor

if TYPE_CHECKING:
    from broker_plugins.server import JitpServer

log = logging.getLogger("jitp.admin")

READ = frozenset({Role.SERVICE, Role.AUDITOR, Role.OPERATOR, Role.ADMIN})
AUDIT = frozenset({Role.AUDITOR, Role.ADMIN})
MANAGE = frozenset({Role.OPERATOR, Role.ADMIN})
CA_READ = frozenset({Role.AUDITOR, Role.OPERATOR, Role.ADMIN})
KEYS = frozenset({Role.ADMIN})

# command -> roles allowed. Key management is the admin's alone; rotation itself needs the key file
# and runs locally (`jitp keys rotate`).
PERMISSIONS: dict[str, frozenset[Role]] = {
    "devices.list": READ,
    "devices.show": READ,
    **{f"devices.{c}": MANAGE for c in Command},
    "devices.erase": MANAGE,
    "ca.list": CA_READ,
    "ca.register": MANAGE,
    "ca.disable": MANAGE,
    "ca.enable": MANAGE,
    "templates.reload": MANAGE,
    "audit.export": AUDIT,
    "keys.status": KEYS,
}

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]


class AdminApi:
    def __init__(self, server: JitpServer) -> None:
        self.server = server

    async def handle(self, admission: Admission | None, topic: str, payload: bytes) -> None:
        if admission is None or admission.role is Role.DEVICE:
            return  # the topic ACL already keeps devices out; never answer them
        client_id = admission.client_id
        command = topic.removeprefix("$jitp/admin/")
        replies = f"$jitp/admin/replies/{client_id}/"
        try:
            request = json.loads(payload)
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            await self._reply(
                replies + "error", {"ok": False, "error": _error("invalid_request", f"bad JSON: {exc}")}
            )
            await self._audit(admission, command, allowed=False, reason="invalid_request")
            return
        correlation = str(request.get("correlation_id", ""))[:128]
        reply_to = str(request.get("reply_to") or "")
        if not reply_to.startswith(replies) or "+" in reply_to or "#" in reply_to:
            reply_to = replies + (correlation or "reply")
        args = request.get("args") or {}
        response: dict[str, Any] = {"correlation_id": correlation}
        allowed_roles = PERMISSIONS.get(command)
        if allowed_roles is None or not isinstance(args, dict):
            response |= {"ok": False, "error": _error("invalid_request", f"unknown command {command!r}")}
            await self._audit(admission, command, allowed=False, reason="invalid_request")
        elif admission.role not in allowed_roles:
            response |= {
                "ok": False,
                "error": _error("forbidden", f"role {admission.role} may not run {command}"),
            }
            await self._audit(admission, command, allowed=False, reason="forbidden")
        else:
            actor = f"{admission.role}:{client_id}"
            try:
                result = await self._run(command, args, actor, admission.role)
                response |= {"ok": True, "result": result}
                await self._audit(admission, command, allowed=True)
            except errors.ProvisioningError as exc:
                response |= {"ok": False, "error": _error(exc.reason, exc.message)}
                await self._audit(admission, command, allowed=True, reason=exc.reason)
            except (KeyError, TypeError, ValueError) as exc:
                response |= {"ok": False, "error": _error("invalid_request", f"bad arguments: {exc}")}
                await self._audit(admission, command, allowed=True, reason="invalid_request")
        await self._reply(reply_to, response)

    async def _run(self, command: str, args: dict[str, Any], actor: str, role: Role) -> Any:
        service = self.server.service
        registry = service.registry
        if command == "devices.list":
            return [r.to_json() for r in await registry.list_devices()]
        if command == "devices.show":
            record = await registry.get_device(str(args["device_id"]))
            if record is None:
                raise errors.NotFound(f"no device with id {args['device_id']!r}")
            return record.to_json()
        if command.startswith("devices.") and command != "devices.erase":
            change = await service.apply(
                Command(command.removeprefix("devices.")),
                str(args["device_id"]),
                actor=actor,
                reason=args.get("reason"),
            )
            return {
                "device_id": change.record.device_id,
                "status": str(change.record.status),
                "changed": change.changed,
            }
        if command == "devices.erase":
            erasure = await service.erase(
                device_id=str(args["device_id"]), actor=actor, reason=args.get("reason")
            )
            return {"device_id": erasure.device_id}
        if command == "ca.list":
            return [a.to_json() for a in await registry.anchors()]
        if command == "ca.register":
            requested = Role(args.get("role", "device"))
            if role is not Role.ADMIN and requested not in (Role.DEVICE, Role.SERVICE):
                # An operator registering an admin CA could issue itself an admin certificate.
                raise errors.Forbidden(f"only an admin may register a CA with role {requested}")
            cert = x509.load_pem_x509_certificate(str(args["cert_pem"]).encode())
            anchor = TrustAnchor.from_certificate(
                cert,
                role=Role(args.get("role", "device")),
                region=args.get("region"),
                template=args.get("template"),
                registered_at=service.clock(),
                now=service.clock(),
            )
            if anchor.template:
                service.templates.get(anchor.template)
            stored = await registry.register_anchor(
                anchor,
                audit=_draft(
                    service.clock(), "ca-registered", actor, ca_id=anchor.ca_id, role=str(anchor.role)
                ),
            )
            await service.refresh_trust()
            return {"ca_id": stored.ca_id}
        if command in ("ca.disable", "ca.enable"):
            enabled = command == "ca.enable"
            anchor = await registry.set_anchor_enabled(
                str(args["ca_id"]),
                enabled,
                audit=_draft(
                    service.clock(),
                    "ca-enabled" if enabled else "ca-disabled",
                    actor,
                    ca_id=str(args["ca_id"]),
                ),
            )
            await service.refresh_trust()
            return {"ca_id": anchor.ca_id, "enabled": enabled}
        if command == "templates.reload":
            events = await service.reload_templates(
                TemplateSet.load(self.server.config.templates_dir), actor=actor
            )
            return {"changed": len(events)}
        if command == "audit.export":
            since, until = _when(args.get("since")), _when(args.get("until"))
            entries = [
                e
                for e in await registry.audit_entries()
                if (since is None or e.draft.at >= since) and (until is None or e.draft.at < until)
            ]
            return [e.to_json() for e in await registry.resolve_audit(entries)]
        if command == "keys.status":
            status = await registry.keyring_status()
            return {"primary": status.primary, "wrapped": dict(status.wrapped), "pending": status.pending}
        raise errors.InvalidRequest(f"unknown command {command!r}")  # pragma: no cover

    async def _reply(self, topic: str, document: dict[str, Any]) -> None:
        data = json.dumps(document, sort_keys=True, default=str).encode()
        await self.server.broker.internal_message_broadcast(topic, data, 1)

    async def _audit(
        self, admission: Admission, command: str, *, allowed: bool, reason: str | None = None
    ) -> None:
        service = self.server.service
        await service.registry.append_audit(
            [
                AuditDraft(
                    at=service.clock(),
                    action="admin-command",
                    actor=f"{admission.role}:{admission.client_id}",
                    reason=reason,
                    details=MappingProxyType({"command": command[:80], "allowed": str(allowed).lower()}),
                )
            ]
        )
        if not allowed:
            log.warning("admin API: %s %s denied (%s)", admission.client_id, command[:80], reason)


def _error(reason: str, message: str) -> dict[str, str]:
    return {"reason": reason, "message": message}


def _draft(at: datetime, action: str, actor: str, **details: str) -> AuditDraft:
    return AuditDraft(at=at, action=action, actor=actor, details=MappingProxyType(details))


def _when(value: object) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
