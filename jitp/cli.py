"""The ``jitp`` command line.

Local mode works directly on the registry: the data dir's SQLite registry, or the PostgreSQL
one that ``registry:`` in the config or ``--registry DSN`` names. Whoever can run it can change
anything: it is root-equivalent, and its actions are audited as ``local-admin:<user>@<host>``.
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
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from jitp import errors
from jitp.audit import AuditDraft, verify_chain
from jitp.config import DEFAULT_CONFIG, Config, load_config, replace
from jitp.keys import MasterKeyProvider
from jitp.records import Command, DeviceRecord
from jitp.registry import Registry
from jitp.registry_factory import master_keys, open_registry
from jitp.service import ProvisioningService
from jitp.templates import TemplateSet
from jitp.trust import Role, TrustAnchor, TrustStore, fingerprint_der

Handler = Callable[[argparse.Namespace], int]

LIFECYCLE_HELP = {
    Command.REVOKE: "refuse the device from now on; a live session is closed within seconds",
    Command.DISABLE: "block the device temporarily (enable lifts it)",
    Command.ENABLE: "lift disable or quarantine",
    Command.QUARANTINE: "admit the device only to report status and read its config",
    Command.DEPROVISION: "retire the device: session closed, retained messages cleared, refused until allow",
    Command.ALLOW: "readmit a deprovisioned or revoked device",
}


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
) -> int:
    config = _config(args)

    async def go() -> int:
        registry = await open_registry(config, batch_window=0, keys=keys)
        try:
            return await fn(registry)
        finally:
            await registry.close()

    return asyncio.run(go())


def _draft(action: str, **details: str) -> AuditDraft:
    return AuditDraft(at=_now(), action=action, actor=_actor(), details=MappingProxyType(details))


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


# -- ca -----------------------------------------------------------------------------------
MAX_CERT_FILE = 1024 * 1024  # bytes; a certificate (chain) file is a few KiB
MAX_CRL_FILE = 16 * 1024 * 1024  # bytes; a CRL of ~400,000 revoked serials


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    """At most ``cap`` bytes of ``path``: reads ``cap + 1`` and refuses more (``/dev/zero`` at once)."""
    try:
        with path.open("rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise errors.InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > cap:
        raise errors.InvalidRequest(
            f"{path} is larger than {_size(cap)}, the limit for {what}; is it the right file?"
        )
    return data


def _load_certs(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file, or the one in a DER file (read with a size cap)."""
    data = _read_capped(path, MAX_CERT_FILE, "a certificate file")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise errors.InvalidRequest(f"{path} holds no PEM or DER certificate") from None


def _load_ca_cert(path: Path) -> x509.Certificate:
    """The one certificate in ``path``. A bundle is refused rather than cut to its first
    certificate: which of them was meant cannot be guessed, and registering only one is silent."""
    found = _load_certs(path)
    if len(found) > 1:
        raise errors.InvalidRequest(
            f"{path} holds {len(found)} certificates; put each CA certificate in a file of its own "
            "and register each separately"
        )
    return found[0]


def _load_leaf(path: Path) -> x509.Certificate:
    """The leaf of a chain file (leaf first, then its CAs, as TLS sends it). Several leaves are
    refused: erasing only the first of them would be silent."""
    leaf, *rest = _load_certs(path)
    leaves = 1 + sum(not _is_ca(c) for c in rest)
    if leaves > 1:
        raise errors.InvalidRequest(
            f"{path} holds {leaves} end-entity certificates; give one device's certificate "
            "(its chain may follow it) and erase each device separately"
        )
    return leaf


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


def cmd_ca_register(args: argparse.Namespace) -> int:
    cert = _load_ca_cert(Path(args.cert))
    if args.template:
        TemplateSet.load(_config(args).templates_dir).get(args.template)  # an unknown name fails here
    anchor = TrustAnchor.from_certificate(
        cert,
        role=Role(args.role),
        region=args.region,
        template=args.template,
        registered_at=_now(),
        now=_now(),
    )

    async def go(registry: Registry) -> int:
        stored = await registry.register_anchor(
            anchor,
            audit=_draft(
                "ca-registered",
                ca_id=anchor.ca_id,
                role=str(anchor.role),
                subject=anchor.subject,
                region=anchor.region or "",
                template=anchor.template or "",
            ),
        )
        print(stored.ca_id)
        return 0

    return _run(args, go)


def cmd_ca_list(args: argparse.Namespace) -> int:
    async def go(registry: Registry) -> int:
        anchors = await registry.anchors()
        if args.json:
            _print_json([a.to_json() for a in anchors])
            return 0
        if not anchors:
            print("no CA registered")
        for a in anchors:
            state = "enabled " if a.enabled else "disabled"
            print(f"{a.ca_id}  {state}  {a.role:7}  region={a.region or '-':10}  {a.subject}")
        return 0

    return _run(args, go)


def cmd_ca_enable(args: argparse.Namespace, enabled: bool) -> int:
    async def go(registry: Registry) -> int:
        anchor = await registry.set_anchor_enabled(
            args.ca_id, enabled, audit=_draft("ca-enabled" if enabled else "ca-disabled", ca_id=args.ca_id)
        )
        print(f"{anchor.ca_id} {'enabled' if enabled else 'disabled'}")
        return 0

    return _run(args, go)


# -- devices ------------------------------------------------------------------------------
def _device_line(r: DeviceRecord) -> str:
    seen = r.last_seen.isoformat(timespec="seconds") if r.last_seen else "-"
    return f"{r.device_id:24} {r.status:13} region={r.region:10} last_seen={seen}"


def cmd_devices_list(args: argparse.Namespace) -> int:
    async def go(registry: Registry) -> int:
        records = await registry.list_devices()
        if args.json:
            _print_json([r.to_json() for r in records])
        else:
            for r in records:
                print(_device_line(r))
            print(f"{len(records)} device(s)")
        return 0

    return _run(args, go)


def cmd_devices_show(args: argparse.Namespace) -> int:
    async def go(registry: Registry) -> int:
        record = await registry.get_device(args.device_id)
        if record is None:
            raise errors.NotFound(f"no device with id {args.device_id!r}")
        doc = record.to_json()
        if args.json:
            _print_json(doc)
        else:
            for key, value in doc.items():
                print(f"{key:17} {value}")
        return 0

    return _run(args, go)


# -- audit --------------------------------------------------------------------------------
def cmd_audit_verify(args: argparse.Namespace) -> int:
    async def go(registry: Registry) -> int:
        entries = await registry.audit_entries()
        problems = verify_chain(entries)
        head = await registry.audit_head()
        if head is not None and (not entries or (entries[-1].seq, entries[-1].hash) != head):
            last = entries[-1].seq if entries else 0
            problems.append(
                f"the newest entries were removed: the registry last appended entry {head[0]}, the log ends at {last}"
            )
        if problems:
            for p in problems:
                print(p)
            print(f"audit trail TAMPERED: {len(problems)} problem(s) in {len(entries)} entries")
            return 1
        head_hash = entries[-1].hash if entries else "-"
        print(f"audit trail intact: {len(entries)} entries, head {head_hash}")
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


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise errors.InvalidRequest(f"not an ISO-8601 time: {value!r} (e.g. 2026-11-28T05:00:00Z)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _write_entries(entries: Sequence[Any], fmt: str, writer: Any = None) -> None:
    for entry in entries:
        doc = entry.to_json()
        if fmt == "csv":
            doc["details"] = json.dumps(doc["details"], sort_keys=True)
            writer.writerow([doc[f] for f in AUDIT_FIELDS])
        else:
            print(json.dumps(doc, sort_keys=True), flush=True)


def cmd_audit_export(args: argparse.Namespace) -> int:
    since, until = _when(args.since), _when(args.until)

    async def go(registry: Registry) -> int:
        entries = [
            e
            for e in await registry.audit_entries()
            if (since is None or e.draft.at >= since) and (until is None or e.draft.at < until)
        ]
        if not args.pseudonymous:
            entries = await registry.resolve_audit(entries)
        writer = None
        if args.format == "csv":
            writer = csv.writer(sys.stdout)
            writer.writerow(AUDIT_FIELDS)
        _write_entries(entries, args.format, writer)
        return 0

    return _run(args, go)


def cmd_audit_tail(args: argparse.Namespace) -> int:
    async def go(registry: Registry) -> int:
        entries = await registry.audit_entries()
        shown = entries[-args.lines :] if args.lines else []
        _write_entries(await registry.resolve_audit(shown), "jsonl")
        last = entries[-1].seq if entries else 0
        while args.follow:
            await asyncio.sleep(1.0)
            fresh = [e for e in await registry.audit_entries() if e.seq > last]
            if fresh:
                _write_entries(await registry.resolve_audit(fresh), "jsonl")
                last = fresh[-1].seq
        return 0

    return _run(args, go)


# -- device lifecycle -----------------------------------------------------------------------
def cmd_devices_lifecycle(args: argparse.Namespace, command: Command) -> int:
    async def go(registry: Registry) -> int:
        service = ProvisioningService(registry)
        change = await service.apply(command, args.device_id, actor=_actor(), reason=args.reason)
        state = "now" if change.changed else "already"
        print(f"{args.device_id}: {state} {change.record.status}")
        return 0

    return _run(args, go)


def cmd_devices_erase(args: argparse.Namespace) -> int:
    if (args.device_id is None) == (args.cert is None):
        raise errors.InvalidRequest("give a device id or --cert FILE (not both)")
    fingerprint = None
    if args.cert:
        cert = _load_leaf(Path(args.cert))  # a device's chain file will do: its leaf comes first
        fingerprint = fingerprint_der(cert.public_bytes(serialization.Encoding.DER))

    async def go(registry: Registry) -> int:
        service = ProvisioningService(registry)
        erasure = await service.erase(
            device_id=args.device_id,
            fingerprint=fingerprint,
            actor=_actor(),
            reason=args.reason,
        )
        if erasure.already_erased:
            print("already erased: the certificate's device was erased before (its tombstone remains)")
        else:
            print(f"{erasure.device_id}: erased (only a tombstone remains; the certificate stays refused)")
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


def cmd_templates_reload(args: argparse.Namespace) -> int:
    """Re-render the configuration of devices whose template changed; running brokers follow within seconds."""
    templates = TemplateSet.load(
        _config(args).templates_dir
    )  # a broken template fails here, changing nothing

    async def go(registry: Registry) -> int:
        service = ProvisioningService(registry)
        events = await service.reload_templates(templates, actor=_actor())
        await registry.bump_templates_version()  # running brokers load the new templates too
        print(
            f"templates reloaded: {', '.join(templates.names())}; {len(events)} device configuration(s) changed"
        )
        return 0

    return _run(args, go)


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
    )
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("amqtt").setLevel(max(logging.WARNING, logging.getLogger().level))
    server = importlib.import_module("broker_plugins.server")  # the amqtt adapter; the core never imports it
    asyncio.run(server.serve(config))
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


# -- keys ---------------------------------------------------------------------------------
def cmd_keys_init(args: argparse.Namespace) -> int:
    from jitp.keys import init_key_file

    config = _config(args)
    path = Path(args.key_file) if args.key_file else config.key_file
    key = init_key_file(path)
    print(f"master key {key.kid} written to {path} (mode 0600)")
    print("Back it up apart from the registry: without it the device data cannot be read.")
    if os.environ.get(config.keys.env, "").strip():
        print(f"note: ${config.keys.env} is set, and takes precedence over this file", file=sys.stderr)
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from jitp.keys import MasterKey

    key = MasterKey.generate()
    print(key.token())
    print(f"{key.kid}: a new master key, shown once; keep it secret", file=sys.stderr)
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    config = _config(args)
    keys = master_keys(config)

    async def body(registry: Registry) -> int:
        status = await registry.keyring_status()
        print(f"source   {keys.source}")
        print(f"holds    {', '.join(keys.kids())}")
        print(f"primary  {status.primary}  (the registry's: new data keys are wrapped under it)")
        for kid, count in sorted(status.wrapped.items()):
            print(f"  {kid}  {count} key(s){'' if kid == status.primary else '  <- to re-wrap'}")
        if status.pending:
            print(f"rotation unfinished: {status.pending} key(s) to re-wrap; run `jitp keys rotate`")
        return 0

    return _run(args, body, keys=keys)


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from jitp.keyrotation import rotate_keys
    from jitp.keys import FileKeyProvider

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


# -- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
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

    pki = sub.add_parser("pki", help="development PKI").add_subparsers(dest="pki_command", required=True)
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

    ca = sub.add_parser("ca", help="trust anchors").add_subparsers(dest="ca_command", required=True)
    p = ca.add_parser("register", help="register a CA certificate; prints its id")
    p.add_argument("cert")
    p.add_argument("--role", choices=[r.value for r in Role], default="device")
    p.add_argument("--region")
    p.add_argument("--template")
    data_opts(p)
    p.set_defaults(handler=cmd_ca_register)
    p = ca.add_parser("list", help="list registered CAs")
    p.add_argument("--json", action="store_true")
    data_opts(p)
    p.set_defaults(handler=cmd_ca_list)
    for name, enabled in (("disable", False), ("enable", True)):
        p = ca.add_parser(name, help=f"{name} a CA (applies to running brokers within seconds)")
        p.add_argument("ca_id")
        data_opts(p)
        p.set_defaults(handler=lambda a, e=enabled: cmd_ca_enable(a, e))

    p = ca.add_parser(
        "crl", help="import a CRL for a registered CA (applies to running brokers within seconds)"
    )
    p.add_argument("ca_id")
    p.add_argument("crl")
    data_opts(p)
    p.set_defaults(handler=cmd_ca_crl)

    dev = sub.add_parser("devices", help="device records").add_subparsers(
        dest="devices_command", required=True
    )
    p = dev.add_parser("list")
    p.add_argument("--json", action="store_true")
    data_opts(p)
    p.set_defaults(handler=cmd_devices_list)
    p = dev.add_parser("show")
    p.add_argument("device_id")
    p.add_argument("--json", action="store_true")
    data_opts(p)
    p.set_defaults(handler=cmd_devices_show)

    for command in Command:
        p = dev.add_parser(str(command), help=LIFECYCLE_HELP[command])
        p.add_argument("device_id")
        p.add_argument("--reason")
        data_opts(p)
        p.set_defaults(handler=lambda a, c=command: cmd_devices_lifecycle(a, c))
    p = dev.add_parser("erase", help="GDPR Art. 17: remove the device's data, keep a tombstone")
    p.add_argument("device_id", nargs="?")
    p.add_argument("--cert", help="erase the device holding this certificate (PEM)")
    p.add_argument("--reason")
    data_opts(p)
    p.set_defaults(handler=cmd_devices_erase)

    aud = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command", required=True)
    p = aud.add_parser("verify", help="check the hash chain; exit 1 if tampered")
    data_opts(p)
    p.set_defaults(handler=cmd_audit_verify)
    p = aud.add_parser("export", help="entries as JSON lines or CSV, device references resolved")
    p.add_argument("--since", help="ISO-8601 time, inclusive")
    p.add_argument("--until", help="ISO-8601 time, exclusive")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--pseudonymous", action="store_true", help="as stored: do not resolve device references")
    data_opts(p)
    p.set_defaults(handler=cmd_audit_export)
    p = aud.add_parser("tail", help="the newest entries; -f follows new ones")
    p.add_argument("-n", "--lines", type=int, default=10)
    p.add_argument("-f", "--follow", action="store_true")
    data_opts(p)
    p.set_defaults(handler=cmd_audit_tail)

    tpl = sub.add_parser("templates", help="enrollment templates").add_subparsers(
        dest="templates_command", required=True
    )
    p = tpl.add_parser("list", help="templates in templates_dir")
    data_opts(p)
    p.set_defaults(handler=cmd_templates_list)
    p = tpl.add_parser(
        "reload", help="re-render device configs after a template change (publishes config-changed)"
    )
    data_opts(p)
    p.set_defaults(handler=cmd_templates_reload)
    p = tpl.add_parser("test", help="dry run: what a certificate would become, or why it is refused")
    p.add_argument("name")
    p.add_argument("--cert", required=True, help="device certificate chain (PEM, leaf first)")
    p.add_argument("--ca", help="verify against this CA instead of (in addition to) the registered ones")
    p.add_argument("--json", action="store_true")
    data_opts(p)
    p.set_defaults(handler=cmd_templates_test)

    keys = sub.add_parser("keys", help="master keys (encryption at rest)").add_subparsers(
        dest="keys_command", required=True
    )
    p = keys.add_parser("init", help="create the master key file (mode 0600); never overwrites one")
    data_opts(p)
    p.add_argument("--key-file", help="where (default: keys.file, or <data_dir>-keys/master.key)")
    p.set_defaults(handler=cmd_keys_init)
    p = keys.add_parser("generate", help="print a new master key (for $JITP_MASTER_KEY or a KMS)")
    p.set_defaults(handler=cmd_keys_generate)
    p = keys.add_parser("status", help="which master keys wrap the registry's data keys")
    data_opts(p)
    p.set_defaults(handler=cmd_keys_status)
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

    p = sub.add_parser("serve", help="run the broker until SIGINT/SIGTERM")
    data_opts(p)
    p.add_argument("--bind", help="HOST:PORT (default 127.0.0.1:8883)")
    p.add_argument("--server-cert")
    p.add_argument("--server-key")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=cmd_serve)
    return parser


def _remote(args: argparse.Namespace) -> int:
    """--broker: the same commands through the broker's admin API (role-checked and audited there)."""
    from jitp.remote import remote_call

    group = args.command
    sub = getattr(args, f"{group}_command", None)
    device_args = {"device_id": getattr(args, "device_id", None), "reason": getattr(args, "reason", None)}
    if group == "devices" and sub in [str(c) for c in Command] + ["erase"]:
        if sub == "erase" and getattr(args, "cert", None):
            raise errors.InvalidRequest("erase --cert is local only; give the device id with --broker")
        command, call_args = f"devices.{sub}", device_args
    elif group == "devices" and sub in ("list", "show"):
        command, call_args = f"devices.{sub}", {"device_id": getattr(args, "device_id", None)}
    elif group == "ca" and sub == "list":
        command, call_args = "ca.list", {}
    elif group == "ca" and sub in ("disable", "enable"):
        command, call_args = f"ca.{sub}", {"ca_id": args.ca_id}
    elif group == "ca" and sub == "register":
        pem = _load_ca_cert(Path(args.cert)).public_bytes(serialization.Encoding.PEM).decode()
        command, call_args = (
            "ca.register",
            {"cert_pem": pem, "role": args.role, "region": args.region, "template": args.template},
        )
    elif group == "templates" and sub == "reload":
        command, call_args = "templates.reload", {}
    elif group == "audit" and sub == "export" and args.format == "jsonl":
        command, call_args = "audit.export", {"since": args.since, "until": args.until}
    else:
        raise errors.InvalidRequest(f"'jitp {group} {sub}' is not available with --broker; run it locally")
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
        command=command,
        args={k: v for k, v in call_args.items() if v is not None},
    )
    if command == "audit.export":
        for entry in result:
            print(json.dumps(entry, sort_keys=True))
    elif getattr(args, "json", False) or not isinstance(result, dict) or "status" not in result:
        _print_json(result)
    else:
        print(f"{result['device_id']}: {'now' if result['changed'] else 'already'} {result['status']}")
    return 0


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
