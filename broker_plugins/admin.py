"""The MQTT-native admin API: ``$jitp/admin/<command>`` requests, role-checked, audited.

A backend principal (a client certificate under a CA registered with ``--role service``,
``auditor``, ``operator`` or ``admin``) publishes a JSON request::

    {"correlation_id": "42", "reply_to": "$jitp/admin/replies/<client_id>/<anything>", "args": {...}}

and gets ``{"correlation_id": "42", "ok": true, "result": ...}`` or ``{"ok": false, "error":
{"reason": ..., "message": ...}}`` at QoS 1 on ``reply_to`` (which must lie under its own
``$jitp/admin/replies/<client_id>/``; otherwise ``.../<correlation_id>`` there). Every request,
allowed or denied, gets exactly one audit entry with the caller's identity and one reply (on
``.../error``, or the MQTT 5 Response Topic, when the request could not be read), whatever goes wrong inside: a ``forbidden``
answer is always audited ``allowed: false``. A request over :data:`MAX_REQUEST_BYTES` or nested
deeper than :data:`MAX_REQUEST_DEPTH` is refused (``invalid_request``) before it is parsed.
Devices never reach ``$jitp/admin/#``.

The commands, the roles that may run them, their arguments and what they do are
:data:`jitp.app.operations.OPERATIONS`, the same table the CLI runs locally and remotely: this module is
only the MQTT transport (limits, parsing, the role check, one reply and one audit entry).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from jitp import errors
from jitp.app.operations import OPERATIONS, Context
from jitp.app.service import Admission, ProvisioningService
from jitp.domain.audit import AuditDraft
from jitp.domain.routing import MessageProperties
from jitp.trust import Role

log = logging.getLogger("jitp.admin")

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


class Route(Protocol):
    def __call__(self, topic: str, data: bytes, qos: int, *, properties: MessageProperties) -> object: ...


class AdminApi:
    """Runs ``$jitp/admin/<operation>`` requests over the operations table; replies go out by ``route``."""

    def __init__(self, service: ProvisioningService, *, templates_dir: Path, route: Route) -> None:
        self.service = service
        self.templates_dir = templates_dir
        self.route = route

    async def handle(
        self,
        admission: Admission | None,
        topic: str,
        payload: bytes,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        """Answer one request: exactly one audit entry and one reply, whatever happens inside.
        MQTT 5: ``response_topic`` (within the caller's reply space, else ignored) replaces the
        body's ``reply_to``, and ``correlation_data`` comes back with the reply."""
        if admission is None or admission.role in (Role.DEVICE, Role.CLAIM):
            return  # the topic ACL already keeps devices out; never answer them
        command = topic.removeprefix("$jitp/admin/")
        try:
            outcome = await self._decide(admission, command, payload, response_topic)
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
            await self._reply(outcome.reply_to, outcome.response, correlation_data)
        except Exception:
            log.exception("admin API: cannot reply to %s on %s", admission.client_id, outcome.reply_to)

    async def _decide(
        self, admission: Admission, command: str, payload: bytes, response_topic: str | None = None
    ) -> _Outcome:
        client_id = admission.client_id
        replies = f"$jitp/admin/replies/{client_id}/"
        if response_topic is not None and _within(response_topic, replies):
            replies_to: str | None = response_topic
        else:
            replies_to = None
        # An unreadable body cannot name its reply topic, but an MQTT 5 Response Topic still can.
        error_to = replies_to or replies + "error"
        try:
            request = parse_request(payload)
        except RequestLimitExceeded as exc:
            return _Outcome.invalid(error_to, {}, str(exc), allowed=False, limit=exc.limit)
        except ValueError as exc:
            return _Outcome.invalid(error_to, {}, f"bad JSON: {exc}", allowed=False)
        correlation = str(request.get("correlation_id", ""))[:128]
        reply_to = replies_to or str(request.get("reply_to") or "")
        if not _within(reply_to, replies):
            reply_to = replies + (correlation or "reply")
        head: dict[str, Any] = {"correlation_id": correlation}
        args = request.get("args") or {}
        operation = OPERATIONS.get(command)
        if operation is None:
            return _Outcome.invalid(reply_to, head, f"unknown command {command[:80]!r}", allowed=False)
        if not isinstance(args, dict):
            return _Outcome.invalid(reply_to, head, "args must be a JSON object", allowed=False)
        if not operation.allows(admission.role):
            return _Outcome.denied(reply_to, head, f"role {admission.role} may not run {command}")
        context = Context(
            self.service,
            actor=f"{admission.role}:{client_id}",
            role=admission.role,
            templates_dir=self.templates_dir,
            node=True,
        )
        try:
            result = operation.encode(await operation.run(context, operation.decode(args)))
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

    async def _reply(
        self, topic: str, document: dict[str, Any], correlation_data: bytes | None = None
    ) -> None:
        data = json.dumps(document, sort_keys=True, default=str).encode()
        self.route(
            topic,
            data,
            1,
            properties=MessageProperties(
                payload_format_indicator=1, content_type="application/json", correlation_data=correlation_data
            ),
        )

    async def _audit(
        self,
        admission: Admission,
        command: str,
        *,
        allowed: bool,
        reason: str | None = None,
        **details: str,
    ) -> None:
        service = self.service
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


def _within(topic: str, replies: str) -> bool:
    """A reply topic the caller may name: under its own reply space, no wildcard."""
    return topic.startswith(replies) and "+" not in topic and "#" not in topic


def _error(reason: str, message: str) -> dict[str, str]:
    return {"reason": reason, "message": message}
