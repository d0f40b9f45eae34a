"""The MQTT-native admin API: ``$jitp/admin/<command>`` requests, role-checked, audited.

A backend principal (a client certificate under a CA registered with ``--role service``,
``auditor``, ``operator`` or ``admin``) publishes a JSON request::

    {"correlation_id": "42", "reply_to": "$jitp/admin/replies/<client_id>/<anything>", "args": {...}}

and gets ``{"correlation_id": "42", "ok": true, "result": ...}`` or ``{"ok": false, "error":
{"reason": ..., "message": ...}}`` at QoS 1 on ``reply_to`` (which must lie under its own
``$jitp/admin/replies/<client_id>/``; otherwise ``.../<correlation_id>`` there). Every request,
allowed or denied, gets exactly one audit entry with the caller's identity and one reply (on
``.../error`` when the request could not be read), whatever goes wrong inside: a ``forbidden``
answer is always audited ``allowed: false``. A request over :data:`MAX_REQUEST_BYTES` or nested
deeper than :data:`MAX_REQUEST_DEPTH` is refused (``invalid_request``) before it is parsed.
Devices never reach ``$jitp/admin/#``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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

# Request limits, checked before the JSON parser runs (a 100,000-deep ``[[[...`` would otherwise
# raise RecursionError inside it). A real request nests 3 levels and, with a PEM CA certificate in
# ``ca.register``, weighs a few KiB.
MAX_REQUEST_BYTES = 64 * 1024
MAX_REQUEST_DEPTH = 32

_SIGNIFICANT = re.compile(r'[\\"\[\]{}]')


class RequestLimitExceeded(ValueError):
    """A request over :data:`MAX_REQUEST_BYTES` or :data:`MAX_REQUEST_DEPTH`; never parsed."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit  # "size" or "depth": recorded in the audit entry


def parse_request(payload: bytes) -> dict[str, Any]:
    """The request object in ``payload``: size and nesting depth are checked before parsing.

    Raises :class:`RequestLimitExceeded` over a limit, ``ValueError`` for anything else that is
    not one UTF-8 JSON object.
    """
    if len(payload) > MAX_REQUEST_BYTES:
        raise RequestLimitExceeded(
            f"request of {len(payload)} bytes is over the limit of {MAX_REQUEST_BYTES} bytes", limit="size"
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    depth = json_depth(text, stop=MAX_REQUEST_DEPTH)
    if depth > MAX_REQUEST_DEPTH:
        raise RequestLimitExceeded(
            f"request nested more than {MAX_REQUEST_DEPTH} levels deep (the limit)",
            limit="depth",
        )
    request = json.loads(text)
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    return request


def json_depth(text: str, stop: int | None = None) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON text, brackets inside strings not counted.

    One linear pass over the characters that matter, no recursion; it returns as soon as the depth
    passes ``stop``. It is exact on any valid prefix of JSON text, and the parser never descends
    further than the valid prefix before it fails: so it bounds the parser's recursion.
    """
    depth = deepest = 0
    in_string = False
    escaped = -1  # the index of the character after a backslash inside a string
    for m in _SIGNIFICANT.finditer(text):
        i, ch = m.start(), m.group()
        if in_string:
            if i == escaped:
                continue
            if ch == "\\":
                escaped = i + 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop is not None and deepest > stop:
                    break
        elif ch in "]}":
            depth -= 1
    return deepest


@dataclass(frozen=True)
class _Outcome:
    """What one request comes to: the reply and where it goes, and the audit entry's decision."""

    reply_to: str
    response: dict[str, Any]
    allowed: bool
    reason: str | None
    details: dict[str, str] = field(default_factory=dict)

    @classmethod
    def invalid(
        cls, reply_to: str, head: dict[str, Any], message: str, *, allowed: bool, limit: str | None = None
    ) -> _Outcome:
        response = head | {"ok": False, "error": _error("invalid_request", message)}
        return cls(reply_to, response, allowed, "invalid_request", {"limit": limit} if limit else {})

    @classmethod
    def denied(cls, reply_to: str, head: dict[str, Any], message: str) -> _Outcome:
        """A ``forbidden`` answer: always audited ``allowed: false``."""
        response = head | {"ok": False, "error": _error("forbidden", message)}
        return cls(reply_to, response, False, "forbidden")

    @classmethod
    def failed(cls, reply_to: str, head: dict[str, Any]) -> _Outcome:
        """An unexpected exception: authorised, but it failed (``internal_error``)."""
        message = "the command failed; see the broker log"
        return cls(
            reply_to, head | {"ok": False, "error": _error("internal_error", message)}, True, "internal_error"
        )


class AdminApi:
    def __init__(self, server: JitpServer) -> None:
        self.server = server

    async def handle(self, admission: Admission | None, topic: str, payload: bytes) -> None:
        """Answer one request: exactly one audit entry and one reply, whatever happens inside."""
        if admission is None or admission.role is Role.DEVICE:
            return  # the topic ACL already keeps devices out; never answer them
        command = topic.removeprefix("$jitp/admin/")
        try:
            outcome = await self._decide(admission, command, payload)
        except Exception:  # a bug must still answer and be audited, never kill the task silently
            log.exception("admin API: %s %s failed", admission.client_id, command[:80])
            outcome = _Outcome.failed(f"$jitp/admin/replies/{admission.client_id}/error", {})
        try:
            await self._audit(
                admission, command, allowed=outcome.allowed, reason=outcome.reason, **outcome.details
            )
        except Exception:  # the registry is down, say: the caller still gets its answer
            log.exception("admin API: cannot audit %s %s", admission.client_id, command[:80])
        try:
            await self._reply(outcome.reply_to, outcome.response)
        except Exception:
            log.exception("admin API: cannot reply to %s on %s", admission.client_id, outcome.reply_to)

    async def _decide(self, admission: Admission, command: str, payload: bytes) -> _Outcome:
        client_id = admission.client_id
        replies = f"$jitp/admin/replies/{client_id}/"
        try:
            request = parse_request(payload)
        except RequestLimitExceeded as exc:
            return _Outcome.invalid(replies + "error", {}, str(exc), allowed=False, limit=exc.limit)
        except ValueError as exc:
            return _Outcome.invalid(replies + "error", {}, f"bad JSON: {exc}", allowed=False)
        correlation = str(request.get("correlation_id", ""))[:128]
        reply_to = str(request.get("reply_to") or "")
        if not reply_to.startswith(replies) or "+" in reply_to or "#" in reply_to:
            reply_to = replies + (correlation or "reply")
        head: dict[str, Any] = {"correlation_id": correlation}
        args = request.get("args") or {}
        allowed_roles = PERMISSIONS.get(command)
        if allowed_roles is None:
            return _Outcome.invalid(reply_to, head, f"unknown command {command[:80]!r}", allowed=False)
        if not isinstance(args, dict):
            return _Outcome.invalid(reply_to, head, "args must be a JSON object", allowed=False)
        if admission.role not in allowed_roles:
            return _Outcome.denied(reply_to, head, f"role {admission.role} may not run {command}")
        actor = f"{admission.role}:{client_id}"
        try:
            result = await self._run(command, args, actor, admission.role)
        except errors.Forbidden as exc:  # e.g. an operator asking for an administrative CA role
            return _Outcome.denied(reply_to, head, exc.message)
        except errors.ProvisioningError as exc:
            response = head | {"ok": False, "error": _error(exc.reason, exc.message)}
            return _Outcome(reply_to, response, allowed=True, reason=exc.reason)
        except (KeyError, TypeError, ValueError) as exc:
            return _Outcome.invalid(reply_to, head, f"bad arguments: {exc}", allowed=True)
        except Exception:  # a bug or a broken registry: answered and audited, details in the log
            log.exception("admin API: %s %s failed", client_id, command)
            return _Outcome.failed(reply_to, head)
        return _Outcome(reply_to, head | {"ok": True, "result": result}, allowed=True, reason=None)

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
        self,
        admission: Admission,
        command: str,
        *,
        allowed: bool,
        reason: str | None = None,
        **details: str,
    ) -> None:
        service = self.server.service
        await service.registry.append_audit(
            [
                AuditDraft(
                    at=service.clock(),
                    action="admin-command",
                    actor=f"{admission.role}:{admission.client_id}",
                    reason=reason,
                    details=MappingProxyType(
                        {"command": command[:80], "allowed": str(allowed).lower(), **details}
                    ),
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
