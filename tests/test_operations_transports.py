"""The three transports over jitp.app.operations: an operation added to the table is a command of the
local CLI, of the CLI's remote mode and of the admin API, with the same arguments and audit entry.

A toy operation (``toys.ping``) is added to the table for the test; no broker: the admin API runs
against a stand-in for the server (its service, its templates dir, a broker that records replies).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from broker_plugins import admin
from jitp import cli
from jitp.app import operations
from jitp.app.operations import OPERATIONS, Audited, Context, Operation
from jitp.app.service import Admission, ProvisioningService
from jitp.cli import remote
from jitp.domain.audit import AuditEntry
from jitp.registry.sqlite import SQLiteRegistry
from jitp.trust import Role

PINGED = Audited("pinged", ("name", "loud", "role"))


@dataclass(frozen=True)
class PingArgs:
    name: str
    loud: bool = False
    role: Role | None = None


async def _ping(ctx: Context, args: PingArgs) -> dict[str, Any]:
    draft = ctx.draft(PINGED, name=args.name, loud=str(args.loud).lower(), role=str(args.role))
    await ctx.registry.append_audit([draft])
    return {"pong": args.name, "by": ctx.actor}


PING = Operation(
    "toys.ping", "answer a ping", frozenset({Role.OPERATOR, Role.ADMIN}), PingArgs, _ping, dict, (PINGED,)
)
TABLE = MappingProxyType({**OPERATIONS, PING.name: PING})


@pytest.fixture
def with_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "OPERATIONS", TABLE)
    monkeypatch.setattr(admin, "OPERATIONS", TABLE)


def audit(data_dir: Path) -> list[AuditEntry]:
    async def go() -> list[AuditEntry]:
        async with SQLiteRegistry(data_dir / "registry.db", batch_window=0) as registry:
            return await registry.audit_entries()

    return asyncio.run(go())


def admin_request(data_dir: Path, role: Role, command: str, args: dict[str, Any]) -> dict[str, Any]:
    """One request through the admin API of a node on ``data_dir``'s registry; its reply."""

    async def go() -> dict[str, Any]:
        async with SQLiteRegistry(data_dir / "registry.db", batch_window=0) as registry:
            replies: list[tuple[str, dict[str, Any]]] = []
            api = admin.AdminApi(
                ProvisioningService(registry),
                templates_dir=data_dir / "templates",
                route=lambda topic, data, qos, **_: replies.append((topic, json.loads(data))),
            )
            who = Admission(role=role, client_id="olga", fingerprint="00" * 32)
            request = {"correlation_id": "1", "args": args}
            await api.handle(who, f"$jitp/admin/{command}", json.dumps(request).encode())
            [(topic, reply)] = replies
            assert topic == "$jitp/admin/replies/olga/1"
            return reply

    return asyncio.run(go())


def test_a_new_operation_is_a_command_of_all_three_transports(
    with_ping: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    # 1. the local CLI: `jitp toys ping NAME [--loud] [--role R]`, run in-process as local-admin
    assert cli.main(["toys", "ping", "bob", "--loud", "--role", "auditor", "--data-dir", str(data)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pong"] == "bob" and out["by"].startswith("local-admin:")

    # 2. remote mode: the same typed arguments, encoded for the admin API
    sent: dict[str, Any] = {}

    def fake_remote_call(broker: str, **kw: Any) -> Any:
        sent.update(kw, broker=broker)
        return {"pong": "bob", "by": "operator:olga"}

    monkeypatch.setattr(remote, "remote_call", fake_remote_call)
    top = ["--broker", "127.0.0.1:8883", "--cert", "c.pem", "--key", "c.key", "--ca", "ca.pem"]
    assert cli.main([*top, "toys", "ping", "bob", "--loud", "--role", "auditor"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pong": "bob", "by": "operator:olga"}
    assert (sent["command"], sent["args"]) == ("toys.ping", {"name": "bob", "loud": True, "role": "auditor"})

    # 3. the admin API: what remote mode sends, checked against the role and run on the node
    reply = admin_request(data, Role.OPERATOR, "toys.ping", sent["args"])
    assert reply == {"correlation_id": "1", "ok": True, "result": {"pong": "bob", "by": "operator:olga"}}
    denied = admin_request(data, Role.AUDITOR, "toys.ping", sent["args"])
    assert denied["error"]["reason"] == "forbidden"

    # the same audit entry, whoever ran it; and one admin-command entry per admin API request
    entries = audit(data)
    pinged = [e.draft for e in entries if e.draft.action == "pinged"]
    assert len(pinged) == 2
    assert pinged[0].details == pinged[1].details == {"name": "bob", "loud": "true", "role": "auditor"}
    assert pinged[0].actor.startswith("local-admin:") and pinged[1].actor == "operator:olga"
    commands = [(e.draft.actor, dict(e.draft.details)) for e in entries if e.draft.action == "admin-command"]
    assert commands == [
        ("operator:olga", {"command": "toys.ping", "allowed": "true"}),
        ("auditor:olga", {"command": "toys.ping", "allowed": "false"}),
    ]


def test_every_operation_has_its_cli_command(tmp_path: Path) -> None:
    """The real table: each operation parses as `jitp <group> <verb>` into its own verb."""
    parser = cli.build_parser()
    sample = {"device_id": "d", "ca_id": "c", "cert": "ca.pem", "alert_id": "a"}
    for name, op in OPERATIONS.items():
        verb = cli._verbs(OPERATIONS)[name]
        command = [cli.TOP_LEVEL[name]] if name in cli.TOP_LEVEL else [op.group, op.verb]
        positional = [sample[a.dest] for a in parser_for(parser, *command)._actions if not a.option_strings]
        ns = parser.parse_args([*command, *positional])
        assert ns.verb.op is op and ns.handler is cli._local, name
        assert verb.op is op


def parser_for(parser: Any, *path: str) -> Any:
    for name in path:
        [sub] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        parser = sub.choices[name]
    return parser


def test_commands_outside_the_table_stay_local(capsys: pytest.CaptureFixture[str]) -> None:
    top = ["--broker", "127.0.0.1:1", "--cert", "c.pem", "--key", "c.key", "--ca", "ca.pem"]
    for command in (["audit", "verify"], ["ca", "crl", "x", "crl.pem"], ["keys", "rotate"]):
        assert cli.main([*top, *command]) == 2
        assert "is not available with --broker; run it locally" in capsys.readouterr().err


def test_the_operations_module_never_imports_amqtt() -> None:
    import subprocess
    import sys

    code = "import sys, jitp.app.operations, jitp.cli; assert not [m for m in sys.modules if m.startswith('amqtt')]"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    assert operations.OPERATIONS is OPERATIONS
