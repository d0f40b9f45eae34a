"""The ``jitp`` command line.

Local mode works directly on the registry: the data dir's SQLite registry, or the PostgreSQL
one that ``registry:`` in the config or ``--registry DSN`` names. Whoever can run it can change
anything: it is root-equivalent, and its actions are audited as ``local-admin:<user>@<host>``.

The commands shared with the admin API (``devices``, ``ca list/register/enable/disable``,
``templates reload``, ``audit export``, ``keys status``) are :data:`jitp.app.operations.OPERATIONS`:
here each has only its spelling (a :class:`Verb`: arguments, typed args, output). With ``--broker``
the same typed args go to a broker's admin API instead (:mod:`jitp.cli.remote`).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import getpass
import importlib
import json
import logging
import os
import socket
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from jitp import errors
from jitp.app.operations import (
    LIFECYCLE_SUMMARY,
    OPERATIONS,
    Context,
    DeviceDetail,
    EraseArgs,
    Operation,
    TemplatesReloaded,
    encode_args,
)
from jitp.app.service import ProvisioningService
from jitp.cli.certfiles import MAX_CERT_FILE, MAX_CRL_FILE
from jitp.cli.certfiles import load_ca_cert as _load_ca_cert
from jitp.cli.certfiles import load_leaf as _load_leaf
from jitp.cli.certfiles import read_capped as _read_capped
from jitp.cli.issuer import add_commands as _issuer_commands
from jitp.config import DEFAULT_CONFIG, Config, host_port, load_config, replace
from jitp.crypto.keys import MasterKeyProvider
from jitp.domain.records import Command, DeviceRecord
from jitp.domain.templates import TemplateSet
from jitp.registry import Erasure, KeyringStatus, Registry, StatusChange
from jitp.registry.factory import master_keys, open_registry
from jitp.trust import Role, TrustAnchor, TrustStore, fingerprint_der

Handler = Callable[[argparse.Namespace], int]


def _now() -> datetime:
    return datetime.now(UTC)


def _actor() -> str:
    """Who a local (data-dir) command acts as, in the audit trail."""
    return f"local-admin:{_who()}"


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _config(args: argparse.Namespace) -> Config:
    path = getattr(args, "config", None)
    if path is None and DEFAULT_CONFIG.exists() and Path.cwd() == DEFAULT_CONFIG.parent.parent:
        path = DEFAULT_CONFIG
    config = load_config(Path(path)) if path else Config()
    data_dir = getattr(args, "data_dir", None)
    return replace(
        config, data_dir=Path(data_dir) if data_dir else None, registry=getattr(args, "registry", None)
    )


def _run(
    args: argparse.Namespace,
    fn: Callable[[Registry], Awaitable[int]],
    *,
    keys: MasterKeyProvider | None = None,
    config: Config | None = None,
) -> int:
    config = config or _config(args)

    async def go() -> int:
        registry = await open_registry(config, batch_window=0, keys=keys)
        try:
            return await fn(registry)
        finally:
            await registry.close()

    return asyncio.run(go())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# -- pki ----------------------------------------------------------------------------------
def cmd_pki_init(args: argparse.Namespace) -> int:
    import certs

    layout = certs.init_pki(Path(args.dir), key_type=args.key_type, force=args.force)
    print(f"development PKI created in {layout.dir}")
    for label, path in (
        ("root CA", layout.root_cert),
        ("manufacturer CA (register with --role device)", layout.manufacturer_cert),
        ("service CA (register with --role service)", layout.service_ca_cert),
        ("broker certificate", layout.server_cert),
        ("broker key", layout.server_key),
        ("service client certificate", layout.service_client_cert),
        ("service client key", layout.service_client_key),
    ):
        print(f"  {label:48} {path}")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    import certs

    if args.count < 1:
        raise errors.InvalidRequest("--count must be at least 1")
    layout = certs.PkiLayout(Path(args.dir))
    if not layout.manufacturer_key.exists():
        raise errors.InvalidRequest(
            f"no manufacturer CA key at {layout.manufacturer_key}; run 'jitp pki init' first"
        )
    issued = certs.issue_from_pki(
        layout, args.count, Path(args.out), prefix=args.prefix, start=args.start, key_type=args.key_type
    )
    print(
        f"issued {len(issued)} device certificates into {args.out} "
        f"({issued[0].device_id} .. {issued[-1].device_id})"
    )
    return 0


# -- the operations shared with the admin API -------------------------------------------------
@dataclass(frozen=True)
class Verb:
    """How the command line spells an operation of :data:`jitp.app.operations.OPERATIONS`.

    Without overrides a verb has one argument per field of the operation's arguments (a required
    field positional, the others ``--field``), and prints the result as JSON: an operation added to
    the table is a command here at once. The overrides keep the established spelling and output.
    """

    op: Operation[Any, Any]
    help: str | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None  # the verb's own arguments
    args: Callable[[argparse.Namespace], Any] | None = None  # typed args; files are read here
    show: Callable[[Any, argparse.Namespace], int] | None = None  # prints a local (typed) result
    show_remote: Callable[[Any, argparse.Namespace], int] | None = None  # prints the admin API's JSON
    json_flag: bool = False  # a --json option (the remote output is always JSON)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        if self.arguments is not None:
            self.arguments(parser)
        else:
            _field_arguments(parser, self.op.args)
        if self.json_flag:
            parser.add_argument("--json", action="store_true")

    def make_args(self, ns: argparse.Namespace) -> Any:
        if self.args is not None:
            return self.args(ns)
        return self.op.decode({f.name: getattr(ns, f.name, None) for f in dataclasses.fields(self.op.args)})

    def print_local(self, result: Any, ns: argparse.Namespace) -> int:
        if self.show is not None:
            return self.show(result, ns)
        return _show_json(self.op.encode(result), ns)

    def print_remote(self, result: Any, ns: argparse.Namespace) -> int:
        return (self.show_remote or _show_json)(result, ns)


def _field_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) is not None:  # X | None
            (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
        choices = [r.value for r in Role] if hint is Role else None
        if hint is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true")
        elif f.default is dataclasses.MISSING:
            parser.add_argument(f.name, choices=choices)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, choices=choices)


def _show_json(result: Any, ns: argparse.Namespace) -> int:
    _print_json(result)
    return 0


def _local(ns: argparse.Namespace) -> int:
    """Run a verb's operation in-process on the registry, as the local admin."""
    verb: Verb = ns.verb
    call_args = verb.make_args(ns)  # files read and arguments checked before the registry is opened
    config = _config(ns)

    async def go(registry: Registry) -> int:
        context = Context(
            ProvisioningService(registry),
            actor=_actor(),
            role=Role.ADMIN,  # local mode is root-equivalent
            templates_dir=config.templates_dir,
        )
        return verb.print_local(await verb.op.run(context, call_args), ns)

    return _run(ns, go, config=config)


def _device_line(r: DeviceRecord) -> str:
    seen = r.last_seen.isoformat(timespec="seconds") if r.last_seen else "-"
    return f"{r.device_id:24} {r.status:13} region={r.region:10} last_seen={seen}"


def _show_devices(records: list[DeviceRecord], ns: argparse.Namespace) -> int:
    if ns.json:
        _print_json([r.to_json() for r in records])
    else:
        for r in records:
            print(_device_line(r))
        print(f"{len(records)} device(s)")
    return 0


def _show_device(detail: DeviceDetail, ns: argparse.Namespace) -> int:
    doc = detail.to_json()
    if ns.json:
        _print_json(doc)
        return 0
    certificates = doc.pop("certificates")
    for key, value in doc.items():
        print(f"{key:17} {value}")
    _print_certificates(certificates)
    return 0


def _print_certificates(certificates: dict[str, Any]) -> None:
    """The current and pending operational certificates of ``devices show``."""
    for label, cert in (
        ("current", certificates["current"]),
        *(("pending", c) for c in certificates["pending"]),
    ):
        if cert is None:
            print(f"{'op. certificate':17} none (the factory certificate is in use)")
            continue
        print(
            f"{label + ' cert':17} {cert['certificate_id']} fingerprint={cert['fingerprint'][:16]}... "
            f"not_after={cert['not_after']} renew_after={cert['renew_after']}"
            + (f" commit_by={cert['commit_by']}" if label == "pending" else "")
        )


def _show_change(change: StatusChange, ns: argparse.Namespace) -> int:
    state = "now" if change.changed else "already"
    print(f"{change.record.device_id}: {state} {change.record.status}")
    return 0


def _show_change_json(result: Any, ns: argparse.Namespace) -> int:
    print(f"{result['device_id']}: {'now' if result['changed'] else 'already'} {result['status']}")
    return 0


def _erase_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("device_id", nargs="?")
    p.add_argument("--cert", help="erase the device holding this certificate (PEM)")
    p.add_argument("--reason")


def _erase_args(ns: argparse.Namespace) -> EraseArgs:
    if (ns.device_id is None) == (ns.cert is None):
        raise errors.InvalidRequest("give a device id or --cert FILE (not both)")
    fingerprint = None
    if ns.cert:
        cert = _load_leaf(Path(ns.cert))  # a device's chain file will do: its leaf comes first
        fingerprint = fingerprint_der(cert.public_bytes(serialization.Encoding.DER))
    return EraseArgs(device_id=ns.device_id, fingerprint=fingerprint, reason=ns.reason)


def _show_erasure(erasure: Erasure, ns: argparse.Namespace) -> int:
    if erasure.already_erased:
        print("already erased: the certificate's device was erased before (its tombstone remains)")
    else:
        print(f"{erasure.device_id}: erased (only a tombstone remains; the certificate stays refused)")
    return 0


def _ca_register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cert")
    p.add_argument("--role", choices=[r.value for r in Role], default="device")
    p.add_argument("--region")
    p.add_argument("--template")


def _ca_register_args(ns: argparse.Namespace) -> Any:
    pem = _load_ca_cert(Path(ns.cert)).public_bytes(serialization.Encoding.PEM).decode()
    raw = {"cert_pem": pem, "role": ns.role, "region": ns.region, "template": ns.template}
    return OPERATIONS["ca.register"].decode(raw)


def _show_ca_id(anchor: TrustAnchor, ns: argparse.Namespace) -> int:
    print(anchor.ca_id)
    return 0


def _show_anchors(anchors: list[TrustAnchor], ns: argparse.Namespace) -> int:
    if ns.json:
        _print_json([a.to_json() for a in anchors])
        return 0
    if not anchors:
        print("no CA registered")
    for a in anchors:
        state = "enabled " if a.enabled else "disabled"
        print(f"{a.ca_id}  {state}  {a.role:7}  region={a.region or '-':10}  {a.subject}")
    return 0


def _show_anchor_state(anchor: TrustAnchor, ns: argparse.Namespace) -> int:
    print(f"{anchor.ca_id} {'enabled' if anchor.enabled else 'disabled'}")
    return 0


def _show_reload(reloaded: TemplatesReloaded, ns: argparse.Namespace) -> int:
    print(
        f"templates reloaded: {', '.join(reloaded.templates)}; "
        f"{reloaded.changed} device configuration(s) changed"
    )
    return 0


def _alert_line(doc: dict[str, Any]) -> str:
    state = f"acked by {doc['acked_by']}" if doc.get("acked_by") else "open"
    subject = doc.get("device_id") or doc.get("ca") or "-"
    return (
        f"{doc['alert_id']}  {doc['kind']:19} {doc['severity']:8} x{doc['count']:<5} "
        f"{doc['last_seen'][:19]}  {subject[:24]:24} {state}"
    )


def _show_alert_docs(docs: list[dict[str, Any]], ns: argparse.Namespace) -> int:
    if ns.json:
        _print_json(docs)
        return 0
    for doc in docs:
        print(_alert_line(doc))
    print(f"{len(docs)} alert(s)")
    return 0


def _show_ack(doc: dict[str, Any], ns: argparse.Namespace) -> int:
    alert = doc["alert"]
    print(
        f"{alert['alert_id']}: {'now' if doc['changed'] else 'already'} acknowledged by {alert['acked_by']}"
    )
    if doc.get("resumed"):
        print(f"first joins of CA {alert['ca']} resumed")
    return 0


def _show_status(doc: dict[str, Any], ns: argparse.Namespace) -> int:
    """One screen: what an operator looks at first."""
    if ns.json:
        _print_json(doc)
        return 0
    devices, alerts, outbox, expiry = doc["devices"], doc["alerts"], doc["outbox"], doc["expiry"]
    recent = next(v for k, v in doc.items() if k.startswith("last_"))
    window = next(k for k in doc if k.startswith("last_")).removeprefix("last_").replace("_", " ")

    def pairs(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"

    print(f"jitp status at {doc['at'][:19]}")
    print(f"devices    {devices['total']} ({pairs(devices['by_status'])})")
    print(f"regions    {pairs(devices['by_region'])}")
    print(
        f"last {window}: {recent['joins']} joins, {recent['refusals']} refusals ({pairs(recent['refusal_reasons'])})"
    )
    print(f"alerts     {alerts['open']} open ({pairs(alerts['by_kind'])})")
    for a in alerts["newest"]:
        print(f"  {a['alert_id']}  {a['kind']:19} {a['severity']:8} x{a['count']}  {a['last_seen'][:19]}")
    lag = outbox["nats_lag_events"]
    print(
        f"outbox     {outbox['pending']} pending, oldest {outbox['oldest_seconds']} s; "
        f"NATS lag {'-' if lag is None else lag}"
    )
    ca, crl = expiry["ca"], expiry["crl"]
    print(f"CA expiry  {ca['not_after'][:10] + '  ' + ca['subject'][:60] if ca else '-'}")
    print(f"CRL next   {crl['next_update'][:19] + '  CA ' + crl['ca_id'][:16] if crl else '-'}")
    print(
        f"devices    nearest certificate expiry {(expiry['device_certificate'] or '-')[:10]}; "
        f"{expiry['devices_expiring_30d']} expiring within 30 days"
    )
    return 0


# -- audit --------------------------------------------------------------------------------
def cmd_audit_verify(args: argparse.Namespace) -> int:
    from jitp.app.status import audit_check

    async def go(registry: Registry) -> int:
        problems, count, head_hash = await audit_check(registry)
        if problems:
            for p in problems:
                print(p)
            print(f"audit trail TAMPERED: {len(problems)} problem(s) in {count} entries")
            return 1
        print(f"audit trail intact: {count} entries, head {head_hash}")
        return 0

    return _run(args, go)


AUDIT_FIELDS = (
    "seq",
    "at",
    "action",
    "actor",
    "device_id",
    "fingerprint",
    "reason",
    "peer",
    "details",
    "prev_hash",
    "hash",
)


def _audit_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="ISO-8601 time, inclusive")
    p.add_argument("--until", help="ISO-8601 time, exclusive")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--pseudonymous", action="store_true", help="as stored: do not resolve device references")


def _write_docs(docs: Sequence[dict[str, Any]], fmt: str, writer: Any = None) -> None:
    for doc in docs:
        if fmt == "csv":
            writer.writerow(
                [json.dumps(doc[f], sort_keys=True) if f == "details" else doc[f] for f in AUDIT_FIELDS]
            )
        else:
            print(json.dumps(doc, sort_keys=True), flush=True)


def _show_audit_docs(docs: Sequence[dict[str, Any]], ns: argparse.Namespace) -> int:
    writer = None
    if ns.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(AUDIT_FIELDS)
    _write_docs(docs, ns.format, writer)
    return 0


def cmd_audit_tail(args: argparse.Namespace) -> int:
    async def go(registry: Registry) -> int:
        entries = await registry.audit_entries()
        shown = entries[-args.lines :] if args.lines else []
        _write_docs([e.to_json() for e in await registry.resolve_audit(shown)], "jsonl")
        last = entries[-1].seq if entries else 0
        while args.follow:
            await asyncio.sleep(1.0)
            fresh = [e for e in await registry.audit_entries() if e.seq > last]
            if fresh:
                _write_docs([e.to_json() for e in await registry.resolve_audit(fresh)], "jsonl")
                last = fresh[-1].seq
        return 0

    return _run(args, go)


def cmd_ca_crl(args: argparse.Namespace) -> int:
    data = _read_capped(Path(args.crl), MAX_CRL_FILE, "a CRL")

    async def go(registry: Registry) -> int:
        service = ProvisioningService(registry)
        crl = await service.import_crl(args.ca_id, data, actor=_actor())
        next_update = crl.next_update_utc
        print(
            f"CRL imported for {args.ca_id}: {len(crl)} revoked certificate(s), next update "
            f"{next_update.isoformat() if next_update else 'not set'}"
        )
        if next_update is not None and next_update < _now():
            print("WARNING: this CRL is already past its nextUpdate; see trust.stale_crl", file=sys.stderr)
        return 0

    return _run(args, go)


# -- templates ----------------------------------------------------------------------------
def cmd_templates_list(args: argparse.Namespace) -> int:
    templates = TemplateSet.load(_config(args).templates_dir)
    for name in templates.names():
        t = templates.get(name)
        print(f"{t.name:20} v{t.version:<4} reprovision={t.reprovision}  publish={', '.join(t.publish)}")
    return 0


def cmd_templates_test(args: argparse.Namespace) -> int:
    """Dry run: what a certificate would become under a template, or exactly why it would be refused."""
    config = _config(args)
    templates = TemplateSet.load(config.templates_dir)
    template = templates.get(args.name)
    chain_path = Path(args.cert)
    data = _read_capped(chain_path, MAX_CERT_FILE, "a certificate file")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise errors.InvalidRequest(f"cannot read certificates from {chain_path}: {exc}") from None
    ders = tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)

    async def go(registry: Registry) -> int:
        anchors = [a for a in await registry.anchors() if a.role is Role.DEVICE]
        if args.ca:
            anchors.append(TrustAnchor.from_certificate(_load_ca_cert(Path(args.ca))))
        anchors = [dataclasses.replace(a, template=template.name) for a in anchors]
        service = ProvisioningService(registry, default_region=config.default_region, templates=templates)
        service.trust = TrustStore.of(anchors)
        try:
            verified = service.trust.verify(ders, now=_now())
            _, identity = service.render(verified)
        except errors.Refused as exc:
            doc: dict[str, Any] = {"admitted": False, "reason": exc.reason, "message": exc.message}
            if exc.detail:
                doc["detail"] = exc.detail
            if args.json:
                _print_json(doc)
            else:
                print(f"REFUSED ({exc.reason}): {exc.message}")
            return 1
        doc = {
            "admitted": True,
            "template": template.name,
            "template_version": template.version,
            "device_id": identity.device_id,
            "region": identity.region,
            "attributes": dict(identity.attributes),
            "namespace": identity.config["namespace"],
            "profile": identity.config["profile"],
            "reprovision": str(template.reprovision),
            "cert_fingerprint": identity.cert_fingerprint,
            "ca_id": identity.ca_id,
        }
        if args.json:
            _print_json(doc)
        else:
            for key, value in doc.items():
                print(f"{key:17} {json.dumps(value) if isinstance(value, dict | list) else value}")
        return 0

    return _run(args, go)


# -- serve --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    config = replace(
        config,
        listener__bind=args.bind,
        listener__server_cert=_path(args.server_cert),
        listener__server_key=_path(args.server_key),
        log_level=args.log_level,
        workers=args.workers,
        metrics__bind=args.metrics,
        metrics__console=True if args.console else None,
    )
    from jitp.observability import logs

    index: int | None = args.worker_index
    workers = config.effective_workers
    who = f"[w{index}]" if index is not None else "[supervisor]" if workers > 1 else ""
    logs.configure(
        config.log_level, fmt=config.logging.format, pseudonymous=config.logging.pseudonymous, label=who
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("amqtt").setLevel(max(logging.WARNING, logging.getLogger().level))
    # The amqtt adapter; the core never imports it.
    if index is not None:  # a worker, started by the supervisor below
        return int(
            importlib.import_module("broker_plugins.workers").run_worker(
                config, index=index, relay_fd=args.relay_fd
            )
        )
    if workers > 1:
        importlib.import_module("broker_plugins.workers").supervise(
            config, workers=workers, command=lambda i, port, fd: _worker_command(args, config, i, port, fd)
        )
        return 0
    asyncio.run(importlib.import_module("broker_plugins.server").serve(config))
    return 0


def _worker_command(args: argparse.Namespace, config: Config, index: int, port: int, fd: int) -> list[str]:
    """The command line of worker ``index`` of `jitp serve --workers N`: this one, on ``port``."""
    host = config.listener.bind.rpartition(":")[0]
    argv = [sys.executable, "-m", "jitp.cli", "serve", "--worker-index", str(index), "--relay-fd", str(fd)]
    argv += ["--bind", f"{host}:{port}"]
    for name in ("config", "data_dir", "registry", "server_cert", "server_key", "log_level"):
        value = getattr(args, name, None)
        if value:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if config.metrics.bind is not None:  # each worker exposes its own metrics: worker i on PORT+i
        metrics_host, metrics_port = host_port(config.metrics.bind)
        argv += ["--metrics", f"{metrics_host}:{metrics_port + index if metrics_port else 0}"]
    if config.metrics.console:
        argv += ["--console"]
    return argv


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


# -- console ------------------------------------------------------------------------------
def cmd_console_token(args: argparse.Namespace) -> int:
    """A console login token (auditor, operator or admin), signed with the console key."""
    from datetime import timedelta
    from types import MappingProxyType

    from jitp.console import auth
    from jitp.domain.audit import AuditDraft

    config = _config(args)
    role = Role(args.role)
    expires = _now() + timedelta(hours=args.hours)
    token = auth.make_token(
        auth.ensure_key(config.keys_dir / auth.KEY_FILE), name=args.name, role=role, expires=expires
    )

    async def go(registry: Registry) -> int:
        details = {"name": args.name, "role": str(role), "expires": expires.isoformat()}
        await registry.append_audit(
            [AuditDraft(at=_now(), action="console-token", actor=_actor(), details=MappingProxyType(details))]
        )
        return 0

    _run(args, go, config=config)
    print(token)
    print(
        f"a console token for {role}:{args.name}, valid until {expires.isoformat()[:19]} UTC", file=sys.stderr
    )
    return 0


# -- keys ---------------------------------------------------------------------------------
def cmd_keys_init(args: argparse.Namespace) -> int:
    from jitp.crypto.keys import init_key_file

    config = _config(args)
    path = Path(args.key_file) if args.key_file else config.key_file
    key = init_key_file(path)
    print(f"master key {key.kid} written to {path} (mode 0600)")
    print("Back it up apart from the registry: without it the device data cannot be read.")
    if os.environ.get(config.keys.env, "").strip():
        print(f"note: ${config.keys.env} is set, and takes precedence over this file", file=sys.stderr)
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from jitp.crypto.keys import MasterKey

    key = MasterKey.generate()
    print(key.token())
    print(f"{key.kid}: a new master key, shown once; keep it secret", file=sys.stderr)
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from jitp.crypto.keyrotation import rotate_keys
    from jitp.crypto.keys import FileKeyProvider

    config = _config(args)
    keys = master_keys(config)
    key_file = keys.path if isinstance(keys, FileKeyProvider) else None

    async def body(registry: Registry) -> int:
        report = await rotate_keys(
            registry,
            keys,
            key_file=key_file,
            actor=_actor(),
            clock=_now,
            batch=args.batch,
            max_batches=args.max_batches,
            keep_old=args.keep_old,
            stage=args.stage,
            progress=lambda n: print(f"\rre-wrapped {n}", end="", file=sys.stderr, flush=True),
        )
        if report.rewrapped:
            print(file=sys.stderr)
        old = ", ".join(report.previous) or "-"
        if report.staged:
            print(
                f"staged {report.primary} in {key_file} (not used yet): copy this file to every node, then run `jitp keys rotate`"
            )
            return 0
        if not report.complete:
            print(
                f"stopped: {report.rewrapped} key(s) re-wrapped under {report.primary}; run again to finish"
            )
            return 1
        print(f"done: every key is wrapped under {report.primary} ({report.rewrapped} re-wrapped now)")
        if report.retired:
            print(f"retired {old} from {key_file}")
        elif key_file is None:
            print(f"now remove {old} from ${config.keys.env} (and restart the brokers with it)")
        return 0

    return _run(args, body, keys=keys)


def _show_keys_status(status: KeyringStatus, ns: argparse.Namespace) -> int:
    keys = master_keys(_config(ns))  # what this machine holds (the registry was opened with them)
    print(f"source   {keys.source}")
    print(f"holds    {', '.join(keys.kids())}")
    print(f"primary  {status.primary}  (the registry's: new data keys are wrapped under it)")
    for kid, count in sorted(status.wrapped.items()):
        print(f"  {kid}  {count} key(s){'' if kid == status.primary else '  <- to re-wrap'}")
    if status.pending:
        print(f"rotation unfinished: {status.pending} key(s) to re-wrap; run `jitp keys rotate`")
    return 0


# -- the verbs of the operations ---------------------------------------------------------
def _verbs(table: Mapping[str, Operation[Any, Any]]) -> dict[str, Verb]:
    """A verb for every operation in ``table``: the established spellings, else the default one."""
    custom = [
        Verb(table["devices.list"], show=_show_devices, json_flag=True),
        Verb(table["devices.show"], show=_show_device, json_flag=True),
        *(
            Verb(
                table[f"devices.{c}"],
                help=LIFECYCLE_SUMMARY[c],
                show=_show_change,
                show_remote=_show_change_json,
            )
            for c in Command
        ),
        Verb(
            table["devices.erase"],
            help="GDPR Art. 17: remove the device's data, keep a tombstone",
            arguments=_erase_arguments,
            args=_erase_args,
            show=_show_erasure,
        ),
        Verb(
            table["ca.register"],
            help="register a CA certificate; prints its id",
            arguments=_ca_register_arguments,
            args=_ca_register_args,
            show=_show_ca_id,
        ),
        Verb(table["ca.list"], help="list registered CAs", show=_show_anchors, json_flag=True),
        *(
            Verb(
                table[f"ca.{name}"],
                help=f"{name} a CA (applies to running brokers within seconds)",
                show=_show_anchor_state,
            )
            for name in ("disable", "enable")
        ),
        Verb(
            table["templates.reload"],
            help="re-render device configs after a template change (publishes config-changed)",
            show=_show_reload,
        ),
        Verb(
            table["audit.export"],
            help="entries as JSON lines or CSV, device references resolved",
            arguments=_audit_export_arguments,
            show=lambda entries, ns: _show_audit_docs([e.to_json() for e in entries], ns),
            show_remote=_show_audit_docs,
        ),
        Verb(
            table["alerts.list"],
            help="open anomaly alerts (--all: acknowledged too)",
            show=lambda alerts, ns: _show_alert_docs([a.to_json() for a in alerts], ns),
            show_remote=_show_alert_docs,
            json_flag=True,
        ),
        Verb(
            table["alerts.ack"],
            help="acknowledge an alert (a CA paused by a spike alert resumes on that node)",
            show=lambda acked, ns: _show_ack(OPERATIONS["alerts.ack"].encode(acked), ns),
            show_remote=_show_ack,
        ),
        Verb(
            table["status.show"],
            help="a one-screen summary: devices, joins, refusals, alerts, backlog, expiry",
            show=_show_status,
            show_remote=_show_status,
            json_flag=True,
        ),
        Verb(
            table["keys.status"],
            help="which master keys wrap the registry's data keys",
            show=_show_keys_status,
        ),
    ]
    verbs = {v.op.name: v for v in custom if v.op.name in table}
    return {name: verbs.get(name) or Verb(op, help=op.summary) for name, op in table.items()}


# -- parser -------------------------------------------------------------------------------
# Operations spelled as one word rather than `jitp <group> <verb>`.
TOP_LEVEL = {"status.show": "status"}


def build_parser(operations: Mapping[str, Operation[Any, Any]] | None = None) -> argparse.ArgumentParser:
    """The command line. Every operation (of :data:`OPERATIONS`) is a command: ``jitp <group> <verb>``."""
    verbs = _verbs(OPERATIONS if operations is None else operations)
    parser = argparse.ArgumentParser(
        prog="jitp", description="Zero-touch just-in-time MQTT device provisioning."
    )
    remote_top = parser.add_argument_group(
        "remote mode", "run the command through a broker's admin API, as your certificate's principal"
    )
    remote_top.add_argument("--broker", dest="top_broker", metavar="HOST:PORT", help="the broker")
    remote_top.add_argument("--cert", dest="top_cert", help="your certificate (chain)")
    remote_top.add_argument("--key", dest="top_key", help="its private key")
    remote_top.add_argument("--ca", dest="top_ca", help="CA that signed the broker's certificate")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}

    def group(name: str, help: str) -> Any:
        groups[name] = sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)
        return groups[name]

    def data_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", help="YAML config file (default: config/jitp.yaml when run from the project)"
        )
        p.add_argument("--data-dir", help="data directory holding registry.db (overrides the config)")
        remote = p.add_argument_group("remote mode: through a broker's admin API instead of the data dir")
        remote.add_argument("--broker", metavar="HOST:PORT", help="run the command on this broker")
        remote.add_argument(
            "--client-cert", help="your certificate (chain) under an admin/operator/auditor CA"
        )
        remote.add_argument("--client-key", help="its private key")
        remote.add_argument("--client-ca", help="CA that signed the broker's certificate")
        p.add_argument(
            "--registry",
            metavar="DSN",
            help="use the PostgreSQL registry at this postgresql:// DSN (overrides the config)",
        )

    def verb(name: str) -> None:
        """The command of operation ``name``, in its group (at this place in the help)."""
        v = verbs.pop(name, None)
        if v is None:
            return  # not in this table
        kw = {"help": v.help} if v.help is not None else {}
        p = groups[v.op.group].add_parser(v.op.verb, **kw)
        v.add_arguments(p)
        data_opts(p)
        p.set_defaults(handler=_local, verb=v)

    pki = group("pki", "development PKI")
    p = pki.add_parser("init", help="create root, manufacturer, service CAs and broker/service certificates")
    p.add_argument("--dir", required=True)
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    p.add_argument("--force", action="store_true", help="overwrite an existing PKI")
    p.set_defaults(handler=cmd_pki_init)
    p = pki.add_parser("issue", help="issue device birth certificates under the manufacturer CA")
    p.add_argument("--dir", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="dev-")
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    p.set_defaults(handler=cmd_pki_issue)

    ca = group("ca", "trust anchors")
    for name in ("register", "list", "disable", "enable"):
        verb(f"ca.{name}")
    p = ca.add_parser(
        "crl", help="import a CRL for a registered CA (applies to running brokers within seconds)"
    )
    p.add_argument("ca_id")
    p.add_argument("crl")
    data_opts(p)
    p.set_defaults(handler=cmd_ca_crl)

    group("devices", "device records")
    for name in ("list", "show", *Command, "erase"):
        verb(f"devices.{name}")

    aud = group("audit", "the audit trail")
    p = aud.add_parser("verify", help="check the hash chain; exit 1 if tampered")
    data_opts(p)
    p.set_defaults(handler=cmd_audit_verify)
    verb("audit.export")
    p = aud.add_parser("tail", help="the newest entries; -f follows new ones")
    p.add_argument("-n", "--lines", type=int, default=10)
    p.add_argument("-f", "--follow", action="store_true")
    data_opts(p)
    p.set_defaults(handler=cmd_audit_tail)

    tpl = group("templates", "enrollment templates")
    p = tpl.add_parser("list", help="templates in templates_dir")
    data_opts(p)
    p.set_defaults(handler=cmd_templates_list)
    verb("templates.reload")
    p = tpl.add_parser("test", help="dry run: what a certificate would become, or why it is refused")
    p.add_argument("name")
    p.add_argument("--cert", required=True, help="device certificate chain (PEM, leaf first)")
    p.add_argument("--ca", help="verify against this CA instead of (in addition to) the registered ones")
    p.add_argument("--json", action="store_true")
    data_opts(p)
    p.set_defaults(handler=cmd_templates_test)

    keys = group("keys", "master keys (encryption at rest)")
    p = keys.add_parser("init", help="create the master key file (mode 0600); never overwrites one")
    data_opts(p)
    p.add_argument("--key-file", help="where (default: keys.file, or <data_dir>-keys/master.key)")
    p.set_defaults(handler=cmd_keys_init)
    p = keys.add_parser("generate", help="print a new master key (for $JITP_MASTER_KEY or a KMS)")
    p.set_defaults(handler=cmd_keys_generate)
    verb("keys.status")
    p = keys.add_parser("rotate", help="re-wrap every data key under a new master key (online, resumable)")
    data_opts(p)
    p.add_argument("--batch", type=int, default=500, help="keys re-wrapped per transaction")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (run again to resume)")
    p.add_argument("--keep-old", action="store_true", help="keep the old key in the key file afterwards")
    p.add_argument(
        "--stage",
        action="store_true",
        help="only add the new key to the key file (several nodes: copy it first)",
    )
    p.set_defaults(handler=cmd_keys_rotate)

    group("alerts", "anomaly alerts (raised by the broker's real-time detectors)")
    verb("alerts.list")
    verb("alerts.ack")

    for name, command in TOP_LEVEL.items():  # `jitp status`: one command, not a group
        v = verbs.pop(name, None)
        if v is not None:
            p = sub.add_parser(command, help=v.help or v.op.summary)
            v.add_arguments(p)
            data_opts(p)
            p.set_defaults(handler=_local, verb=v)

    con = group("console", "the web console (metrics.console on the metrics listener)")
    p = con.add_parser("token", help="a login token for the web console (printed once; audited)")
    p.add_argument("--name", required=True, help="who (in the audit trail as <role>:<name>)")
    p.add_argument("--role", choices=("auditor", "operator", "admin"), default="auditor")
    p.add_argument("--hours", type=float, default=8.0, help="valid for (default 8)")
    data_opts(p)
    p.set_defaults(handler=cmd_console_token)

    _issuer_commands(sub, data_opts, run=_run, actor=_actor, config=_config)

    p = sub.add_parser("serve", help="run the broker until SIGINT/SIGTERM")
    data_opts(p)
    p.add_argument("--bind", help="HOST:PORT (default 127.0.0.1:8883)")
    p.add_argument("--server-cert")
    p.add_argument("--server-key")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes on the one port (default: workers in the config, else one per core; 1: one process)",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    p.add_argument("--relay-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here (metrics.bind); with several workers, worker i uses PORT+i",
    )
    p.add_argument(
        "--console", action="store_true", help="also serve the web console there (metrics.console)"
    )
    p.set_defaults(handler=cmd_serve)

    for v in list(verbs.values()):  # operations without a place above: in their group, or a new one
        if v.op.group not in groups:
            group(v.op.group, f"{v.op.group} (admin API operations)")
        verb(v.op.name)
    return parser


def _remote(args: argparse.Namespace) -> int:
    """--broker: the same operation through the broker's admin API (role-checked and audited there)."""
    from jitp.cli.remote import remote_call

    verb: Verb | None = getattr(args, "verb", None)
    if verb is None:
        group = args.command
        sub = getattr(args, f"{group}_command", None)
        raise errors.InvalidRequest(f"'jitp {group} {sub}' is not available with --broker; run it locally")
    call_args = verb.make_args(args)  # files are read (with their caps) before anything is sent
    if not (args.client_cert and args.client_key and args.client_ca):
        raise errors.InvalidRequest(
            "--broker needs your certificate, its key and the broker's CA: "
            "jitp --broker H:P --cert F --key F --ca F <command> (or --client-cert/--client-key/--client-ca)"
        )
    result = remote_call(
        args.broker,
        cert=Path(args.client_cert),
        key=Path(args.client_key),
        ca=Path(args.client_ca),
        command=verb.op.name,
        args=encode_args(call_args),
    )
    return verb.print_remote(result, args)


_REMOTE_OPTIONS = (
    ("broker", "top_broker"),
    ("client_cert", "top_cert"),
    ("client_key", "top_key"),
    ("client_ca", "top_ca"),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `jitp --broker H:P --cert C --key K --ca CA <command>` or `jitp <command> --broker ... --client-*`
    for name, top in _REMOTE_OPTIONS:
        if getattr(args, top, None) and not getattr(args, name, None):
            setattr(args, name, getattr(args, top))
    if not getattr(args, "broker", None) and any(getattr(args, top, None) for _, top in _REMOTE_OPTIONS):
        parser.error("--cert, --key and --ca are for remote mode: give --broker HOST:PORT too")
    handler: Handler = _remote if getattr(args, "broker", None) else args.handler
    try:
        return handler(args)
    except errors.ProvisioningError as exc:
        print(f"jitp: error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"jitp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `jitp audit export | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
