"""The operations table (jitp.app.operations): permissions, typed arguments, audit entries, one implementation.

A real SQLiteRegistry in ``tmp_path``; no broker. The transports over the table (CLI, remote mode,
admin API) are tested in tests/test_operations_transports.py and end to end in
tests/broker_plugins/test_operations_e2e.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import certs
from jitp import errors
from jitp.app.operations import (
    CA_REGISTERED,
    OPERATIONS,
    AuditExportArgs,
    CaRegisterArgs,
    Context,
    EraseArgs,
    LifecycleArgs,
    NoArgs,
    decode_args,
    encode_args,
)
from jitp.app.service import PeerCredentials, ProvisioningService
from jitp.domain.alerts import Alert, AlertKind, Severity
from jitp.domain.audit import AuditDraft, AuditEntry
from jitp.domain.records import Command
from jitp.registry.sqlite import SQLiteRegistry
from jitp.trust import Role
from tests.jitp import pkitools as pt

T = TypeVar("T")

S, AU, OP, AD = Role.SERVICE, Role.AUDITOR, Role.OPERATOR, Role.ADMIN
# The README's "Admin API and roles" table.
PERMISSIONS = {
    "devices.list": {S, AU, OP, AD},
    "devices.show": {S, AU, OP, AD},
    **{f"devices.{c}": {OP, AD} for c in Command},
    "devices.erase": {OP, AD},
    "ca.list": {AU, OP, AD},
    "ca.register": {OP, AD},
    "ca.disable": {OP, AD},
    "ca.enable": {OP, AD},
    "templates.reload": {OP, AD},
    "audit.export": {AU, AD},
    "keys.status": {AD},
    "alerts.list": {AU, OP, AD},
    "alerts.ack": {OP, AD},
    "status.show": {AU, OP, AD},
}

TEMPLATE = """name: %s
version: %d
attributes:
  tier: %s
"""


def test_the_table_is_the_documented_command_set_with_its_roles() -> None:
    assert {name: set(op.roles) for name, op in OPERATIONS.items()} == PERMISSIONS
    for name, op in OPERATIONS.items():
        assert op.name == name == f"{op.group}.{op.verb}"
        assert all(op.allows(r) for r in op.roles) and not op.allows(Role.DEVICE)
        assert dataclasses.is_dataclass(op.args), name
        assert op.args.__dataclass_params__.frozen, f"{name}: arguments must be a frozen dataclass"  # type: ignore[attr-defined]


# -- typed arguments ------------------------------------------------------------------------------
def test_decode_types_the_arguments() -> None:
    args = decode_args(
        AuditExportArgs, {"since": "2026-01-02T03:04:05", "until": "2026-02-01T00:00:00+01:00", "x": 1}
    )
    assert args == AuditExportArgs(
        since=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),  # no zone: UTC
        until=datetime(2026, 1, 31, 23, 0, tzinfo=UTC),
    )
    assert decode_args(CaRegisterArgs, {"cert_pem": "x", "role": "operator"}).role is Role.OPERATOR
    assert decode_args(LifecycleArgs, {"device_id": ["x"]}) == LifecycleArgs(device_id="['x']")
    assert decode_args(NoArgs, {"anything": "ignored"}) == NoArgs()


@pytest.mark.parametrize(
    ("cls", "raw", "message"),
    [
        (LifecycleArgs, {}, "missing argument 'device_id'"),
        (LifecycleArgs, {"device_id": None}, "missing argument 'device_id'"),
        (CaRegisterArgs, {"cert_pem": "x", "role": "root"}, "not a role"),
        (AuditExportArgs, {"since": "yesterday"}, "not an ISO-8601 time"),
        (AuditExportArgs, {"pseudonymous": "yes"}, "must be true or false"),
        (EraseArgs, {}, "not both"),
        (EraseArgs, {"device_id": "a", "fingerprint": "b"}, "not both"),
    ],
)
def test_bad_arguments_are_invalid_requests(cls: type[Any], raw: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InvalidRequest, match=message):
        decode_args(cls, raw)


@pytest.mark.parametrize(
    "args",
    [
        NoArgs(),
        LifecycleArgs("dev-1"),
        LifecycleArgs("dev-1", reason="stolen"),
        EraseArgs(fingerprint="ab" * 32, reason="gdpr"),
        CaRegisterArgs("-----BEGIN CERTIFICATE-----", role=Role.ADMIN, region="eu"),
        AuditExportArgs(since=datetime(2026, 1, 1, tzinfo=UTC), pseudonymous=True),
    ],
    ids=repr,
)
def test_what_the_cli_sends_is_what_the_admin_api_decodes(args: Any) -> None:
    assert decode_args(type(args), encode_args(args)) == args


# -- the implementations, in-process ------------------------------------------------------------
def run(body: Callable[[ProvisioningService], Coroutine[Any, Any, T]], path: Path) -> T:
    async def go() -> T:
        async with SQLiteRegistry(path / "registry.db", batch_window=0) as registry:
            service = ProvisioningService(registry)
            await registry.register_anchor(
                pt.MANUFACTURER_ANCHOR,
                audit=AuditDraft(at=datetime.now(UTC), action="ca-registered", actor="test"),
            )
            await service.refresh_trust()
            return await body(service)

    return asyncio.run(go())


def context(service: ProvisioningService, tmp_path: Path, role: Role = Role.ADMIN) -> Context:
    return Context(service, actor=f"{role}:tester", role=role, templates_dir=tmp_path / "templates")


def ca_pem(cn: str) -> str:
    return certs.make_ca(cn, key=certs.generate_key()).cert.public_bytes(Encoding.PEM).decode()


def test_an_operator_registers_only_device_and_service_cas(tmp_path: Path) -> None:
    register = OPERATIONS["ca.register"]

    async def body(service: ProvisioningService) -> None:
        operator = context(service, tmp_path, Role.OPERATOR)
        for role in (Role.AUDITOR, Role.OPERATOR, Role.ADMIN):
            with pytest.raises(errors.Forbidden, match="only an admin"):
                await register.run(operator, CaRegisterArgs(ca_pem(f"escalation {role}"), role=role))
        stored = await register.run(operator, CaRegisterArgs(ca_pem("ops service CA"), role=Role.SERVICE))
        assert stored.role is Role.SERVICE
        admin = context(service, tmp_path, Role.ADMIN)
        assert (
            await register.run(admin, CaRegisterArgs(ca_pem("admins"), role=Role.ADMIN))
        ).role is Role.ADMIN
        assert len(await service.registry.anchors()) == 3  # the manufacturer CA, and the two allowed

    run(body, tmp_path)


def test_a_pem_bundle_is_refused_not_cut_to_its_first_certificate(tmp_path: Path) -> None:
    """The CLI refused a bundle file; the admin API registered the bundle's first certificate."""

    async def body(service: ProvisioningService) -> None:
        bundle = ca_pem("bundle 1") + ca_pem("bundle 2")
        with pytest.raises(errors.InvalidRequest, match="holds 2 certificates"):
            await OPERATIONS["ca.register"].run(context(service, tmp_path), CaRegisterArgs(bundle))
        with pytest.raises(errors.InvalidRequest, match="no PEM certificate"):
            await OPERATIONS["ca.register"].run(context(service, tmp_path), CaRegisterArgs("junk"))
        assert len(await service.registry.anchors()) == 1

    run(body, tmp_path)


def test_a_draft_must_carry_exactly_its_declared_fields(tmp_path: Path) -> None:
    async def body(service: ProvisioningService) -> None:
        ctx = context(service, tmp_path)
        with pytest.raises(RuntimeError, match="ca-registered"):
            ctx.draft(CA_REGISTERED, ca_id="x", role="device")

    run(body, tmp_path)


def test_each_operation_writes_the_audit_entries_it_declares(tmp_path: Path) -> None:
    """Every operation, run once: the entries it wrote are those of its ``audit`` declaration (an
    action and exactly its detail keys), and an operation that declares none writes none."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "probe.yaml").write_text(TEMPLATE % ("probe", 1, "bronze"))
    template = tmp_path / "templates" / "default.yaml"  # the devices' template (their CA names none)
    template.write_text(TEMPLATE % ("default", 1, "bronze"))
    args: dict[str, Any] = {
        "devices.show": {"device_id": "dev-show"},
        **{f"devices.{c}": {"device_id": f"dev-{c}", "reason": "test"} for c in Command},
        "devices.erase": {"device_id": "dev-erase"},
        "ca.register": {"cert_pem": ca_pem("declared"), "template": "probe", "region": "eu"},
        "ca.disable": {"ca_id": pt.MANUFACTURER_ANCHOR.ca_id},
        "ca.enable": {"ca_id": pt.MANUFACTURER_ANCHOR.ca_id},
        "alerts.ack": {"alert_id": PROBE_ALERT.alert_id},
    }
    start = {Command.ENABLE: Command.DISABLE, Command.ALLOW: Command.REVOKE}

    async def body(service: ProvisioningService) -> dict[str, list[AuditEntry]]:
        ctx = context(service, tmp_path)
        for c in (*Command, "show", "erase"):
            await service.admit(peer(f"dev-{c}"))
        for c, first in start.items():
            await service.apply(first, f"dev-{c}", actor="test")
        await service.registry.append_audit([PROBE_ALERT.audit_draft()])  # an alert, for alerts.ack
        await OPERATIONS["templates.reload"].run(ctx, NoArgs())  # the templates this service holds
        template.write_text(TEMPLATE % ("default", 2, "gold"))  # a change, for templates.reload to write
        written: dict[str, list[AuditEntry]] = {}
        for name, op in OPERATIONS.items():
            before = len(await service.registry.audit_entries())
            await op.run(ctx, op.decode(args.get(name, {})))
            written[name] = (await service.registry.audit_entries())[before:]
        return written

    written = run(body, tmp_path)
    for name, op in OPERATIONS.items():
        got = [(e.draft.action, sorted(e.draft.details)) for e in written[name]]
        assert got == [(a.action, sorted(a.fields)) for a in op.audit], name
        assert all(e.draft.actor == "admin:tester" for e in written[name]), name


PROBE_ALERT = Alert(
    alert_id="probe-alert",
    kind=AlertKind.REFUSAL_BURST,
    severity=Severity.WARNING,
    first_seen=datetime(2026, 12, 4, tzinfo=UTC),
    last_seen=datetime(2026, 12, 4, tzinfo=UTC),
    count=1,
)


def peer(device_id: str) -> PeerCredentials:
    return PeerCredentials(chain_der=tuple(pt.chain_of(pt.leaf(device_id))), client_id=device_id)


def test_audit_export_filters_by_time_and_resolves_unless_pseudonymous(tmp_path: Path) -> None:
    export = OPERATIONS["audit.export"]

    async def body(service: ProvisioningService) -> None:
        ctx = context(service, tmp_path, Role.AUDITOR)
        await service.admit(peer("dev-exported"))
        everything = await export.run(ctx, AuditExportArgs())
        assert [e.draft.action for e in everything] == ["ca-registered", "provisioned"]
        assert everything[1].draft.device_id == "dev-exported"
        stored = await export.run(ctx, AuditExportArgs(pseudonymous=True))
        assert stored[1].draft.device_id != "dev-exported"  # a pseudonym, as stored
        assert [e.hash for e in stored] == [e.hash for e in everything]
        future = datetime.now(UTC) + timedelta(days=1)
        assert await export.run(ctx, AuditExportArgs(since=future)) == []
        assert await export.run(ctx, AuditExportArgs(until=everything[0].draft.at)) == []

    run(body, tmp_path)
