"""``jitp issuer ...`` and ``jitp certificates ...``: the operational issuing CA and what it issued.

Local commands (on the data dir's registry, like ``ca crl``): the issuer's private key is only ever
written into the registry sealed under the master key, never to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from jitp import errors
from jitp.app.certificates import CertificateService
from jitp.app.service import ProvisioningService
from jitp.cli.certfiles import MAX_CERT_FILE, read_capped
from jitp.config import Config
from jitp.crypto.issuer import LocalSigner, check_issuer_pair, load_signer, make_issuing_ca, parse_duration
from jitp.domain.audit import AuditDraft
from jitp.domain.certificates import CertState
from jitp.registry import Registry
from jitp.trust import Role, TrustAnchor, fingerprint_der

Runner = Callable[[argparse.Namespace, Callable[[Registry], Awaitable[int]]], int]


def _now() -> datetime:
    return datetime.now(UTC)


async def _store(registry: Registry, signer: LocalSigner, *, action: str, actor: str, now: datetime) -> str:
    anchor = TrustAnchor.from_certificate(signer.cert, role=Role.DEVICE, now=now)
    details = {
        "ca_id": anchor.ca_id,
        "subject": anchor.subject,
        "not_after": signer.cert.not_valid_after_utc.isoformat(),
    }
    draft = AuditDraft(at=now, action=action, actor=actor, details=MappingProxyType(details))
    await registry.store_issuer(anchor, signer.key_der(), audit=draft)
    return anchor.ca_id


def _announce(ca_id: str, signer: LocalSigner) -> None:
    print(f"issuing CA {ca_id}")
    print(f"  subject   {signer.cert.subject.rfc4514_string()}")
    print(f"  not_after {signer.cert.not_valid_after_utc.isoformat()}")
    print("  its key is sealed under the master key; it is registered as a device trust anchor")


def cmd_issuer_init(args: argparse.Namespace, run: Runner, actor: str) -> int:
    try:
        validity = parse_duration(args.validity, what="--validity")
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc)) from None

    async def go(registry: Registry) -> int:
        now = _now()
        if await registry.issuer() is not None and not args.replace:
            raise errors.InvalidRequest(
                "an issuing CA exists already; --replace makes a new one the active one"
            )
        signer = make_issuing_ca(key_type=args.key_type, validity=validity, now=now)
        ca_id = await _store(registry, signer, action="issuer-created", actor=actor, now=now)
        _announce(ca_id, signer)
        return 0

    return run(args, go)


def cmd_issuer_import(args: argparse.Namespace, run: Runner, actor: str) -> int:
    cert_data = read_capped(Path(args.cert), MAX_CERT_FILE, "a certificate file")
    key_data = read_capped(Path(args.key), MAX_CERT_FILE, "a key file")
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError:
        try:
            cert = x509.load_der_x509_certificate(cert_data)
        except ValueError:
            raise errors.InvalidRequest(f"{args.cert} is not a certificate (PEM or DER)") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise errors.InvalidRequest(f"{args.key} is not an unencrypted PEM private key") from None
    key_der = key.private_bytes(Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    signer = load_signer(cert.public_bytes(Encoding.DER), key_der)

    async def go(registry: Registry) -> int:
        now = _now()
        check_issuer_pair(signer.cert, signer.key, now=now)
        ca_id = await _store(registry, signer, action="issuer-imported", actor=actor, now=now)
        _announce(ca_id, signer)
        return 0

    return run(args, go)


def cmd_issuer_status(args: argparse.Namespace, run: Runner, actor: str) -> int:
    async def go(registry: Registry) -> int:
        found = await registry.issuer()
        if found is None:
            raise errors.NotFound("no issuing CA (jitp issuer init, or jitp issuer import CERT KEY)")
        cert = x509.load_der_x509_certificate(found[0])
        now = _now()
        counts = {str(s): 0 for s in CertState}
        for c in await registry.certificates_in(list(CertState)):
            counts[str(c.effective_state(now))] += 1
        ca_id = fingerprint_der(found[0])
        doc = {
            "ca_id": ca_id,
            "subject": cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "expired": now >= cert.not_valid_after_utc,
            "certificates": counts,
            "revoked": len(await registry.revoked_serials(ca_id)),
        }
        if args.json:
            print(json.dumps(doc, indent=2, sort_keys=True))
            return 0
        for key in ("ca_id", "subject", "not_after", "expired", "revoked"):
            print(f"{key:10} {doc[key]}")
        print("certificates " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        return 0

    return run(args, go)


def cmd_issuer_crl(args: argparse.Namespace, run: Runner, actor: str, config: Config) -> int:
    made: list[x509.CertificateRevocationList] = []

    async def go(registry: Registry) -> int:
        service = CertificateService(ProvisioningService(registry), config.issuer)
        made.append(await service.crl(now=_now()))
        return 0

    code = run(args, go)
    crl = made[0]
    Path(args.out).write_bytes(crl.public_bytes(Encoding.PEM))
    print(f"CRL written to {args.out}: {len(crl)} revoked certificate(s), next update {crl.next_update_utc}")
    return code


def cmd_certificates_expiring(args: argparse.Namespace, run: Runner, actor: str) -> int:
    try:
        within = parse_duration(args.within, what="--within")
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc)) from None

    async def go(registry: Registry) -> int:
        now = _now()
        due = sorted(
            (c for c in await registry.certificates_in([CertState.CURRENT]) if c.not_after <= now + within),
            key=lambda c: c.not_after,
        )
        docs: list[dict[str, Any]] = [{"device_id": c.device_id, **c.to_json(now)} for c in due]
        if args.json:
            print(json.dumps(docs, indent=2, sort_keys=True))
            return 0
        for d in docs:
            print(f"{d['device_id']:24} not_after={d['not_after']} renew_after={d['renew_after']}")
        print(f"{len(docs)} device(s) due within {args.within}", file=sys.stderr)
        return 0

    return run(args, go)


def add_commands(
    sub: Any,
    data_opts: Callable[[argparse.ArgumentParser], None],
    *,
    run: Runner,
    actor: Callable[[], str],
    config: Callable[[argparse.Namespace], Config],
) -> None:
    """``jitp issuer init|import|status|crl`` and ``jitp certificates expiring``."""
    issuer = sub.add_parser("issuer", help="the operational issuing CA").add_subparsers(
        dest="issuer_command", required=True
    )
    p = issuer.add_parser("init", help="make an issuing CA (key sealed under the master key)")
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    p.add_argument("--validity", default="365d", help="of the CA certificate (e.g. 365d)")
    p.add_argument("--replace", action="store_true", help="make a new one when one exists")
    data_opts(p)
    p.set_defaults(handler=lambda ns: cmd_issuer_init(ns, run, actor()))
    p = issuer.add_parser("import", help="take an existing CA certificate and its key")
    p.add_argument("cert")
    p.add_argument("key")
    data_opts(p)
    p.set_defaults(handler=lambda ns: cmd_issuer_import(ns, run, actor()))
    p = issuer.add_parser("status", help="the issuer, its expiry and its counts")
    p.add_argument("--json", action="store_true")
    data_opts(p)
    p.set_defaults(handler=lambda ns: cmd_issuer_status(ns, run, actor()))
    p = issuer.add_parser("crl", help="write a signed CRL of the certificates it revoked")
    p.add_argument("--out", required=True)
    data_opts(p)
    p.set_defaults(handler=lambda ns: cmd_issuer_crl(ns, run, actor(), config(ns)))
    certificates = sub.add_parser("certificates", help="operational certificates").add_subparsers(
        dest="certificates_command", required=True
    )
    p = certificates.add_parser("expiring", help="devices whose current certificate expires soon")
    p.add_argument("--within", default="7d")
    p.add_argument("--json", action="store_true")
    data_opts(p)
    p.set_defaults(handler=lambda ns: cmd_certificates_expiring(ns, run, actor()))
