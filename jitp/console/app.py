"""The console's pages: server-rendered HTML over the operations table, with the caller's role.

Reading pages run read operations (``status.show``, ``devices.list``/``show``, ``alerts.list``,
``ca.list``, ``audit.export``); an action (revoke, quarantine, acknowledge, verify the audit trail)
needs a confirmation page first, whose form carries a token tied to the session and the action.
Every action is checked against the operation's roles and audited (``console-command``), allowed
or not, like an admin API request.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, urlencode

from jitp import errors
from jitp.app.operations import OPERATIONS, Context
from jitp.app.service import ProvisioningService
from jitp.app.status import audit_check
from jitp.console import auth
from jitp.domain.audit import AuditDraft
from jitp.observability.http import Request, Response
from jitp.trust import Role

log = logging.getLogger("jitp.console")

COOKIE = "jitp_console"
ACTIONS = {  # what the console may do, and how it asks
    "devices.revoke": "Revoke device {device_id}? It is refused from now on; a live session is closed.",
    "devices.quarantine": "Quarantine device {device_id}? It may then only report its status.",
    "alerts.ack": "Acknowledge alert {alert_id}?",
    "audit.verify": "Verify the whole audit trail's hash chain now?",
}
HTML = "text/html; charset=utf-8"
STYLE = """body{font-family:system-ui,sans-serif;margin:0;color:#222}nav{background:#1d3557;padding:.6em 1em}
nav a{color:#fff;margin-right:1.2em;text-decoration:none}nav span{color:#a8dadc;float:right}
main{padding:1em 1.5em}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left;font-size:.92em}th{background:#f1f1f1}.bad{color:#b00020}.ok{color:#2a7}
.card{display:inline-block;border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:0 1em 1em 0}
.card b{font-size:1.6em;display:block}button{padding:.3em .9em}form.inline{display:inline}"""


@dataclass(frozen=True)
class Caller:
    name: str
    role: Role
    token: str

    @property
    def actor(self) -> str:
        return f"{self.role}:{self.name}"


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value))


def page(title: str, body: str, caller: Caller | None = None, *, refresh: int | None = None) -> Response:
    nav = ""
    if caller is not None:
        links = [
            ("/console/", "Overview"),
            ("/console/devices", "Devices"),
            ("/console/alerts", "Alerts"),
            ("/console/cas", "CAs"),
            ("/console/audit", "Audit"),
            ("/console/logout", "Log out"),
        ]
        nav = "<nav>" + "".join(f'<a href="{h}">{t}</a>' for h, t in links)
        nav += f"<span>{esc(caller.actor)}</span></nav>"
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>jitp · {esc(title)}</title>"
        f"<style>{STYLE}</style></head><body>{nav}<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )
    return Response(200, doc.encode(), HTML, (("Cache-Control", "no-store"),))


def redirect(location: str, *headers: tuple[str, str]) -> Response:
    return Response(303, b"", HTML, (("Location", location), *headers))


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (escape them with :func:`esc`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body or '<tr><td colspan=99>none</td></tr>'}</table>"


class Console:
    def __init__(
        self,
        service: ProvisioningService,
        *,
        templates_dir: Path,
        key_path: Path,
        clock: Callable[[], datetime],
    ) -> None:
        self.service = service
        self.templates_dir = templates_dir
        self.key_path = key_path
        self.clock = clock

    # -- plumbing ---------------------------------------------------------------------------------
    def _caller(self, request: Request) -> Caller | None:
        token = request.cookie(COOKIE) or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not token:
            return None
        try:
            name, role = auth.check_token(auth.read_key(self.key_path), token, now=self.clock())
        except errors.Forbidden:
            return None
        return Caller(name, role, token)

    async def run(self, caller: Caller, name: str, raw: Mapping[str, object]) -> Any:
        """One operation, as the caller (its role decides, as for the admin API)."""
        op = OPERATIONS[name]
        if not op.allows(caller.role):
            raise errors.Forbidden(f"{caller.role} may not run {name}")
        ctx = Context(
            self.service, actor=caller.actor, role=caller.role, templates_dir=self.templates_dir, node=True
        )
        return await op.run(ctx, op.decode(raw))

    async def _audited(self, caller: Caller, command: str, allowed: bool, reason: str | None = None) -> None:
        details = {"command": command, "allowed": str(allowed).lower(), "via": "console"}
        await self.service.registry.append_audit(
            [
                AuditDraft(
                    at=self.clock(),
                    action="console-command",
                    actor=caller.actor,
                    reason=reason,
                    details=MappingProxyType(details),
                )
            ]
        )

    async def handle(self, request: Request) -> Response:
        path = request.path.rstrip("/") or "/console"
        if path == "/console/login":
            return await self.login(request)
        if path == "/console/logout":
            return redirect("/console/login", ("Set-Cookie", f"{COOKIE}=; Path=/console; Max-Age=0"))
        caller = self._caller(request)
        if caller is None:
            return redirect("/console/login")
        try:
            if request.method == "POST" and path == "/console/do":
                return await self.do(caller, request)
            if path == "/console":
                return await self.overview(caller)
            if path == "/console/devices":
                return await self.devices(caller, request.query.get("q", ""))
            if path.startswith("/console/devices/"):
                return await self.device(caller, path.removeprefix("/console/devices/"))
            if path == "/console/alerts":
                return await self.alerts(caller)
            if path == "/console/cas":
                return await self.cas(caller)
            if path == "/console/audit":
                return await self.audit(caller)
            if path == "/console/confirm":
                return self.confirm(caller, request.query)
        except errors.Forbidden as exc:
            return page("Not permitted", f"<p class=bad>{esc(exc)}</p>", caller)
        except errors.OperatorError as exc:
            return page("Error", f"<p class=bad>{esc(exc)}</p>", caller)
        return page("Not found", "<p>No such page.</p>", caller)

    # -- pages --------------------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        message = ""
        if request.method == "POST":
            token = request.form().get("token", "").strip()
            try:
                name, role = auth.check_token(auth.read_key(self.key_path), token, now=self.clock())
            except errors.Forbidden as exc:
                message = f"<p class=bad>{esc(exc)}</p>"
            else:
                log.info("console login: %s:%s", role, name)
                cookie = f"{COOKIE}={token}; Path=/console; HttpOnly; SameSite=Strict"
                return redirect("/console/", ("Set-Cookie", cookie))
        body = (
            f"{message}<form method=post action=/console/login><p>Token (from <code>jitp console token</code>):"
            "</p><input name=token size=80 autocomplete=off> <button type=submit>Log in</button></form>"
        )
        return page("jitp console", body)

    async def overview(self, caller: Caller) -> Response:
        doc = await self.run(caller, "status.show", {})
        recent = next(v for k, v in doc.items() if k.startswith("last_"))
        cards = [
            ("devices", doc["devices"]["total"]),
            ("joins (5 min)", recent["joins"]),
            ("refusals (5 min)", recent["refusals"]),
            ("open alerts", doc["alerts"]["open"]),
            ("outbox pending", doc["outbox"]["pending"]),
        ]
        body = "".join(
            f"<div class=card id='card-{esc(k.split()[0])}'>{esc(k)}<b>{esc(v)}</b></div>" for k, v in cards
        )
        body += (
            "<h2>Provisioning rate (first joins per minute, last 30 minutes)</h2>" + await self._rate_chart()
        )
        body += "<h2>Devices by status</h2>" + table(
            ["status", "devices"], [[esc(k), esc(v)] for k, v in sorted(doc["devices"]["by_status"].items())]
        )
        body += "<h2>Devices by region</h2>" + table(
            ["region", "devices"], [[esc(k), esc(v)] for k, v in sorted(doc["devices"]["by_region"].items())]
        )
        body += "<h2>Open alerts</h2>" + table(
            ["alert", "kind", "severity", "count", "last seen"],
            [
                [
                    esc(a["alert_id"]),
                    esc(a["kind"]),
                    esc(a["severity"]),
                    esc(a["count"]),
                    esc(a["last_seen"][:19]),
                ]
                for a in doc["alerts"]["newest"]
            ],
        )
        return page("Overview", body, caller, refresh=5)

    async def _rate_chart(self) -> str:
        now = self.clock()
        start = now - timedelta(minutes=30)
        per_minute = [0] * 30
        for entry in await self.service.registry.audit_entries():
            at = entry.draft.at
            if entry.draft.action in ("provisioned", "reprovisioned") and at >= start:
                per_minute[min(29, int((at - start).total_seconds() // 60))] += 1
        peak = max(per_minute) or 1
        bars = "".join(
            f"<rect x='{i * 20 + 2}' y='{120 - n * 110 / peak:.1f}' width='16' height='{n * 110 / peak:.1f}' "
            f"fill='#457b9d'><title>{n}</title></rect>"
            for i, n in enumerate(per_minute)
        )
        return (
            f"<svg id=rate width=604 height=130 role=img aria-label='first joins per minute'>"
            f"<line x1=0 y1=120 x2=604 y2=120 stroke='#999'/>{bars}"
            f"<text x=2 y=12 font-size=11>peak {peak}/min</text></svg>"
        )

    async def devices(self, caller: Caller, query: str) -> Response:
        records = await self.run(caller, "devices.list", {})
        shown = [r for r in records if query.lower() in r.device_id.lower()][:500]
        rows = [
            [
                f"<a href='/console/devices/{quote(r.device_id, safe='')}'>{esc(r.device_id)}</a>",
                esc(r.status),
                esc(r.region),
                esc(r.last_seen.isoformat()[:19] if r.last_seen else "-"),
            ]
            for r in shown
        ]
        form = (
            f"<form method=get action=/console/devices><input name=q value='{esc(query)}' "
            "placeholder='device id contains'> <button>Search</button></form>"
        )
        body = (
            form
            + f"<p>{len(shown)} of {len(records)} device(s)</p>"
            + table(["device", "status", "region", "last seen"], rows)
        )
        return page("Devices", body, caller)

    async def device(self, caller: Caller, quoted: str) -> Response:
        from urllib.parse import unquote

        device_id = unquote(quoted)
        record = await self.run(caller, "devices.show", {"device_id": device_id})
        doc = record.to_json()
        rows = [[esc(k), esc(json.dumps(v) if isinstance(v, dict | list) else v)] for k, v in doc.items()]
        body = table(["field", "value"], rows)
        for action in ("devices.revoke", "devices.quarantine"):
            if OPERATIONS[action].allows(caller.role):
                link = "/console/confirm?" + urlencode({"action": action, "device_id": device_id})
                body += f"<a id='{action.replace('.', '-')}' href='{esc(link)}'><button>{esc(action.split('.')[1])}</button></a> "
            else:
                body += f"<button disabled title='not permitted for {esc(caller.role)}'>{esc(action.split('.')[1])}</button> "
        body += "<h2>Audit history</h2>"
        try:
            entries = await self.run(caller, "audit.export", {})
        except errors.Forbidden:
            body += f"<p>The audit trail is not readable by the role {esc(caller.role)}.</p>"
        else:
            mine = [e for e in entries if e.draft.device_id == device_id]
            body += table(
                ["at", "action", "actor", "reason"],
                [
                    [
                        esc(e.draft.at.isoformat()[:19]),
                        esc(e.draft.action),
                        esc(e.draft.actor),
                        esc(e.draft.reason),
                    ]
                    for e in mine
                ],
            )
        return page(f"Device {device_id}", body, caller)

    async def alerts(self, caller: Caller) -> Response:
        alerts = await self.run(caller, "alerts.list", {"all": True})
        rows = []
        for a in reversed(alerts):
            if a.open and OPERATIONS["alerts.ack"].allows(caller.role):
                link = "/console/confirm?" + urlencode({"action": "alerts.ack", "alert_id": a.alert_id})
                state = f"<a href='{esc(link)}'><button>acknowledge</button></a>"
            else:
                state = esc(f"acknowledged by {a.acked_by}" if not a.open else "open")
            rows.append(
                [
                    esc(a.alert_id),
                    esc(a.kind),
                    esc(a.severity),
                    esc(a.ca or "-")[:16],
                    esc(a.device_id or "-"),
                    esc(a.count),
                    esc(a.last_seen.isoformat()[:19]),
                    esc(json.dumps(dict(a.evidence))),
                    state,
                ]
            )
        body = table(
            ["alert", "kind", "severity", "CA", "device", "count", "last seen", "evidence", ""], rows
        )
        return page("Alerts", body, caller, refresh=10)

    async def cas(self, caller: Caller) -> Response:
        from cryptography import x509

        anchors = await self.run(caller, "ca.list", {})
        crls = await self.service.registry.crls()
        now = self.clock()
        rows = []
        for a in anchors:
            not_after = a.certificate.not_valid_after_utc
            crl = x509.load_der_x509_crl(crls[a.ca_id]) if a.ca_id in crls else None
            next_update = crl.next_update_utc if crl is not None else None
            crl_state = (
                "none"
                if crl is None
                else (
                    f"{len(crl)} revoked, next update {next_update.isoformat()[:19] if next_update else '-'}"
                    + (" <b class=bad>STALE</b>" if next_update and next_update < now else "")
                )
            )
            days = (not_after - now).days
            rows.append(
                [
                    esc(a.ca_id[:16]),
                    esc(a.subject),
                    esc(a.role),
                    esc(a.region or "-"),
                    "enabled" if a.enabled else "<span class=bad>disabled</span>",
                    f"{esc(not_after.isoformat()[:10])} ({days} days)"
                    + (" <b class=bad>soon</b>" if days < 30 else ""),
                    crl_state,
                ]
            )
        return page(
            "CAs", table(["CA id", "subject", "role", "region", "state", "expires", "CRL"], rows), caller
        )

    async def audit(self, caller: Caller) -> Response:
        entries = await self.run(caller, "audit.export", {})
        rows = [
            [
                esc(e.seq),
                esc(e.draft.at.isoformat()[:19]),
                esc(e.draft.action),
                esc(e.draft.actor),
                esc(e.draft.device_id or "-"),
                esc(e.draft.reason or ""),
            ]
            for e in entries[-100:][::-1]
        ]
        link = "/console/confirm?" + urlencode({"action": "audit.verify"})
        body = (
            f"<a id=verify href='{esc(link)}'><button>Verify the hash chain</button></a>"
            f"<p>{len(entries)} entries; the newest 100:</p>"
            + table(["seq", "at", "action", "actor", "device", "reason"], rows)
        )
        return page("Audit trail", body, caller)

    # -- actions: a confirmation, then a POST ---------------------------------------------------------
    def confirm(self, caller: Caller, query: Mapping[str, str]) -> Response:
        action = query.get("action", "")
        if action not in ACTIONS:
            raise errors.InvalidRequest(f"not a console action: {action!r}")
        args = {k: v for k, v in query.items() if k != "action"}
        question = ACTIONS[action].format_map({"device_id": "", "alert_id": "", **args})
        fields = "".join(f"<input type=hidden name='{esc(k)}' value='{esc(v)}'>" for k, v in args.items())
        key = auth.read_key(self.key_path)
        marker = auth.csrf(key, caller.token, action + json.dumps(args, sort_keys=True))
        body = (
            f"<p>{esc(question)}</p><form method=post action=/console/do>"
            f"<input type=hidden name=action value='{esc(action)}'>{fields}"
            f"<input type=hidden name=csrf value='{marker}'><label>Reason <input name=reason></label> "
            "<button id=confirm type=submit>Confirm</button></form><p><a href='javascript:history.back()'>Cancel</a></p>"
        )
        return page("Confirm", body, caller)

    async def do(self, caller: Caller, request: Request) -> Response:
        form = request.form()
        action = form.pop("action", "")
        marker = form.pop("csrf", "")
        reason = form.pop("reason", "") or None
        key = auth.read_key(self.key_path)
        if action not in ACTIONS or marker != auth.csrf(
            key, caller.token, action + json.dumps(form, sort_keys=True)
        ):
            return page("Refused", "<p class=bad>This action was not confirmed in this session.</p>", caller)
        try:
            message = await self._act(caller, action, form, reason)
        except errors.Forbidden as exc:
            await self._audited(caller, action, False, exc.reason)
            return page("Not permitted", f"<p id=result class=bad>{esc(exc)}</p>", caller)
        except errors.OperatorError as exc:
            await self._audited(caller, action, True, exc.reason)
            return page("Failed", f"<p id=result class=bad>{esc(exc)}</p>", caller)
        await self._audited(caller, action, True)
        return page("Done", f"<p id=result class=ok>{esc(message)}</p>", caller)

    async def _act(self, caller: Caller, action: str, form: dict[str, str], reason: str | None) -> str:
        if action == "audit.verify":
            if not OPERATIONS["audit.export"].allows(caller.role):
                raise errors.Forbidden(f"{caller.role} may not verify the audit trail")
            problems, count, head = await audit_check(self.service.registry)
            if problems:
                return f"audit trail TAMPERED: {len(problems)} problem(s) in {count} entries: " + "; ".join(
                    problems[:5]
                )
            return f"audit trail intact: {count} entries, head {head}"
        if action == "alerts.ack":
            acked = await self.run(caller, action, {"alert_id": form.get("alert_id", ""), "note": reason})
            return f"alert {acked.alert.alert_id}: {'now' if acked.changed else 'already'} acknowledged"
        change = await self.run(caller, action, {"device_id": form.get("device_id", ""), "reason": reason})
        return f"{change.record.device_id}: {'now' if change.changed else 'already'} {change.record.status}"
