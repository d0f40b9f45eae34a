"""Trust anchors and certificate-chain verification.

Path building and validation come from ``cryptography.x509.verification``. On top of it,
jitp applies an explicit leaf policy, because the WebPKI profile alone accepts certificates
a device broker must refuse (a leaf without digitalSignature, an RSA-1024 key), and OpenSSL at
the TLS layer accepts a CA certificate as a client leaf. Each check raises a specific
:class:`~jitp.errors.Refused` subclass, so every refusal has a reason.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from jitp import errors

MIN_RSA_BITS = 2048
ALLOWED_CURVES: frozenset[str] = frozenset({"secp256r1", "secp384r1", "secp521r1"})
MAX_CHAIN_DEPTH = 6


class Role(enum.StrEnum):
    """What a certificate chaining to an anchor identifies."""

    DEVICE = "device"  # provisioned just in time
    SERVICE = "service"  # a backend system: may read $jitp/events/#, never provisioned
    AUDITOR = "auditor"  # reads devices and the audit trail through the admin API
    OPERATOR = "operator"  # lifecycle, CA and template management through the admin API
    ADMIN = "admin"  # everything
    # A claim (fleet-provisioning) certificate, possibly shared by a batch: reaches only
    # $jitp/certificates/<client_id>/ to enroll with template parameters; never a device itself.
    CLAIM = "claim"


def fingerprint_der(der: bytes) -> str:
    """SHA-256 of a DER encoding, lowercase hex. This is a certificate's and a CA's id."""
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    return fingerprint_der(cert.public_bytes(Encoding.DER))


# cryptography warns (UserWarning) each time it decodes a name attribute whose length is outside the
# X.520 bounds, e.g. a CN longer than 64 characters. Certificate fields are untrusted input: such a
# subject is judged by jitp's own rules (identity.id_problem), not logged once per connection, and not
# turned into an exception under ``-W error``.
_ATTRIBUTE_LENGTH_WARNING = r"Attribute's length must be"


def read_subject(cert: x509.Certificate, *, fingerprint: str | None = None) -> x509.Name:
    """``cert.subject``, without cryptography's attribute-length warning.

    A subject that cannot be decoded (e.g. a UTF8String that is not UTF-8) is an
    :class:`~jitp.errors.InvalidCertificate`, never a bare ``ValueError``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ATTRIBUTE_LENGTH_WARNING, category=UserWarning)
        try:
            return cert.subject
        except ValueError as exc:
            raise errors.InvalidCertificate(
                "the certificate subject could not be decoded", fingerprint=fingerprint, detail=str(exc)[:200]
            ) from None


@dataclass(frozen=True)
class TrustAnchor:
    """A registered CA certificate (root or intermediate) and what chaining to it means."""

    ca_id: str  # SHA-256 fingerprint of the DER
    cert_der: bytes
    role: Role
    subject: str
    region: str | None = None
    template: str | None = None
    enabled: bool = True
    registered_at: datetime | None = None

    @classmethod
    def from_certificate(
        cls,
        cert: x509.Certificate,
        *,
        role: Role = Role.DEVICE,
        region: str | None = None,
        template: str | None = None,
        registered_at: datetime | None = None,
        now: datetime | None = None,
    ) -> TrustAnchor:
        """Build an anchor after checking that ``cert`` is a usable CA certificate.

        ``now`` defaults to the current time: an expired CA certificate is never registered.
        """
        if now is None:
            now = datetime.now(UTC)
        elif now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        subject = _subject(cert)
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise errors.InvalidRequest(
                "not a CA certificate: it has no BasicConstraints extension", subject=subject
            ) from None
        except (ValueError, x509.DuplicateExtension) as exc:
            raise errors.InvalidRequest(
                f"the certificate's extensions could not be parsed: {exc}", subject=subject
            ) from None
        if not bc.ca:
            raise errors.InvalidRequest("not a CA certificate: BasicConstraints CA is false", subject=subject)
        if now > cert.not_valid_after_utc:
            raise errors.InvalidRequest(
                f"CA certificate expired on {cert.not_valid_after_utc.isoformat()}", subject=subject
            )
        try:
            public_key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise errors.InvalidRequest(f"the CA key could not be read: {exc}", subject=subject) from None
        _check_key_strength(public_key, what="CA key", cls=errors.InvalidRequest)
        der = cert.public_bytes(Encoding.DER)
        return cls(
            ca_id=fingerprint_der(der),
            cert_der=der,
            role=Role(role),
            subject=subject,
            region=region,
            template=template,
            registered_at=registered_at,
        )

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape (``jitp ca list --json``, the admin API's ``ca.list``)."""
        return {
            "ca_id": self.ca_id,
            "subject": self.subject,
            "role": str(self.role),
            "region": self.region,
            "template": self.template,
            "enabled": self.enabled,
            "registered_at": self.registered_at.isoformat() if self.registered_at else None,
        }

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.cert_der)


@dataclass(frozen=True)
class VerifiedChain:
    """A client chain that validated to an enabled anchor, with the policy checks passed."""

    leaf: x509.Certificate
    leaf_der: bytes
    fingerprint: str
    anchor: TrustAnchor
    chain: tuple[x509.Certificate, ...]


def _subject(cert: x509.Certificate) -> str:
    try:
        return read_subject(cert).rfc4514_string()
    except errors.InvalidCertificate as exc:
        raise errors.InvalidRequest(
            "the certificate subject could not be decoded", detail=exc.detail
        ) from None


def _check_key_strength(
    key: object, *, what: str, cls: type[errors.ProvisioningError], **fields: str | None
) -> None:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise cls(f"{what} is RSA-{key.key_size}; at least RSA-{MIN_RSA_BITS} is required", **fields)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise cls(f"{what} uses curve {key.curve.name}, which is not allowed", **fields)
    elif isinstance(key, dsa.DSAPublicKey):
        raise cls(f"{what} is DSA, which is not allowed", **fields)
    elif not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise cls(f"{what} has an unsupported key type {type(key).__name__}", **fields)


def check_leaf_policy(leaf: x509.Certificate, *, now: datetime, fingerprint: str) -> None:
    """The explicit end-entity policy for device and service client certificates."""
    fp = fingerprint
    try:
        # cryptography parses extensions lazily: a malformed or duplicated extension is an invalid
        # certificate (a refusal with a reason), not a ValueError escaping into the broker.
        extensions = leaf.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise errors.InvalidCertificate(
            "the certificate's extensions could not be parsed", fingerprint=fp, detail=str(exc)[:200]
        ) from None
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise errors.CaCertificateAsLeaf(
                "the client certificate is a CA certificate (BasicConstraints CA:TRUE)", fingerprint=fp
            )
    except x509.ExtensionNotFound:
        pass
    if now < leaf.not_valid_before_utc:
        raise errors.CertificateNotYetValid(
            f"certificate is not valid before {leaf.not_valid_before_utc.isoformat()}", fingerprint=fp
        )
    if now > leaf.not_valid_after_utc:
        raise errors.CertificateExpired(
            f"certificate expired on {leaf.not_valid_after_utc.isoformat()}", fingerprint=fp
        )
    try:
        public_key = leaf.public_key()
    except UnsupportedAlgorithm as exc:
        raise errors.WeakKey(
            "certificate key uses an unsupported algorithm", fingerprint=fp, detail=str(exc)[:200]
        ) from None
    except ValueError as exc:
        raise errors.InvalidCertificate(
            "the certificate key could not be parsed", fingerprint=fp, detail=str(exc)[:200]
        ) from None
    _check_key_strength(public_key, what="certificate key", cls=errors.WeakKey, fingerprint=fp)
    try:
        ku = extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise errors.BadKeyUsage(
                "KeyUsage does not allow digitalSignature, which TLS client authentication needs",
                fingerprint=fp,
            )
    except x509.ExtensionNotFound:
        pass
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if (
            ExtendedKeyUsageOID.CLIENT_AUTH not in eku
            and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
        ):
            raise errors.BadKeyUsage("ExtendedKeyUsage does not allow clientAuth", fingerprint=fp)
    except x509.ExtensionNotFound:
        pass


def _ee_policy() -> ExtensionPolicy:
    # Devices are usually identified by CN only: SAN and EKU may be absent. EKU is checked by
    # check_leaf_policy ("where present").
    return (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
    )


# Extensions of a CA that constrain the certificates below it beyond their own signature and
# validity: a path through one is never cached (a cached issuer acts as the anchor, whose own
# constraints the verifier would not apply to the leaf).
_CONSTRAINING = (x509.NameConstraints, x509.PolicyConstraints, x509.InhibitAnyPolicy)
MAX_CACHED_PATHS = 1024  # issuer paths remembered per trust snapshot


@dataclass(frozen=True)
class _IssuerPath:
    """A verified path from a leaf's issuer up to an anchor, as cryptography's verifier found it."""

    issuer: Store  # the leaf's issuing CA alone, as the anchor of a leaf-only verification
    tail: tuple[x509.Certificate, ...]  # the verified chain above the leaf
    verified_at: datetime
    expires: datetime  # the earliest notAfter on the path: later, the whole path is verified again

    @classmethod
    def of(cls, chain: Sequence[x509.Certificate], now: datetime) -> _IssuerPath | None:
        tail = tuple(chain[1:])
        if len(tail) < 2:  # the leaf's issuer is the anchor itself: verifying is already one step
            return None
        for cert in tail:
            for ext in cert.extensions:
                if isinstance(ext.value, _CONSTRAINING):
                    return None
        expires = min(c.not_valid_after_utc for c in tail)
        return cls(issuer=Store([tail[0]]), tail=tail, verified_at=now, expires=expires)


def _verifier(store: Store, now: datetime) -> Any:
    return (
        PolicyBuilder()
        .store(store)
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy())
        .build_client_verifier()
    )


@dataclass(frozen=True)
class TrustStore:
    """An immutable snapshot of the registered anchors. Swapped whole when anchors change.

    ``anchors`` holds the enabled anchors only. Disabled anchors are remembered by id: a chain
    through a disabled CA is refused even when an enabled CA above it (e.g. the root) would
    otherwise accept it, so disabling an intermediate always takes effect.
    """

    anchors: tuple[TrustAnchor, ...] = ()
    version: int = 0
    _by_id: dict[str, TrustAnchor] = field(default_factory=dict, compare=False, repr=False)
    _store: Store | None = field(default=None, compare=False, repr=False)
    _disabled: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    _disabled_anchors: tuple[TrustAnchor, ...] = field(default=(), compare=False, repr=False)
    _revoked: dict[str, frozenset[int]] = field(default_factory=dict, compare=False, repr=False)
    _crl_next_update: dict[str, datetime | None] = field(default_factory=dict, compare=False, repr=False)
    stale_crl: str = "keep"
    # Verified issuer paths, by the certificates a client sent above its leaf. A new snapshot (a CA
    # registered, disabled, a CRL imported) starts empty, so a trust change is never hidden.
    _paths: dict[tuple[bytes, ...], _IssuerPath] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        anchors: Iterable[TrustAnchor],
        *,
        version: int = 0,
        crls: dict[str, bytes] | None = None,
        stale_crl: str = "keep",
    ) -> TrustStore:
        """``crls``: CRL DER by CA id (already verified at import). ``stale_crl``: what a CRL past
        its nextUpdate means: ``keep`` enforcing it (default) or ``refuse`` every certificate it covers."""
        anchors = tuple(anchors)
        enabled = tuple(a for a in anchors if a.enabled)
        by_id = {a.ca_id: a for a in enabled}
        disabled = frozenset(a.ca_id for a in anchors if not a.enabled) - by_id.keys()
        store = Store([a.certificate for a in enabled]) if enabled else None
        revoked: dict[str, frozenset[int]] = {}
        next_update: dict[str, datetime | None] = {}
        for ca_id, der in (crls or {}).items():
            crl = x509.load_der_x509_crl(der)
            revoked[ca_id] = frozenset(r.serial_number for r in crl)
            next_update[ca_id] = crl.next_update_utc
        return cls(
            anchors=enabled,
            version=version,
            _by_id=by_id,
            _store=store,
            _disabled=disabled,
            _disabled_anchors=tuple(a for a in anchors if a.ca_id in disabled),
            _revoked=revoked,
            _crl_next_update=next_update,
            stale_crl=stale_crl,
        )

    def crl_next_updates(self) -> dict[str, datetime | None]:
        """nextUpdate of the CRL in force, by CA id (None: the CRL names none)."""
        return dict(self._crl_next_update)

    def stale_crls(self, now: datetime) -> list[str]:
        """CA ids whose CRL is past its nextUpdate."""
        return [ca for ca, nu in self._crl_next_update.items() if nu is not None and now > nu]

    def _check_revocation(self, chain: tuple[x509.Certificate, ...], *, now: datetime, fp: str) -> None:
        for cert, issuer in itertools.pairwise(chain):
            ca_id = fingerprint(issuer)
            serials = self._revoked.get(ca_id)
            if serials is None:
                continue
            if cert.serial_number in serials:
                which = "certificate" if cert is chain[0] else f"intermediate CA {cert.serial_number:x}"
                raise errors.CertificateRevoked(
                    f"the {which} is listed in its CA's revocation list", fingerprint=fp, detail=ca_id
                )
            next_update = self._crl_next_update.get(ca_id)
            if self.stale_crl == "refuse" and next_update is not None and now > next_update:
                raise errors.StaleCrl(
                    f"the CRL of CA {ca_id[:16]} expired on {next_update.isoformat()} (trust.stale_crl: refuse)",
                    fingerprint=fp,
                    detail=ca_id,
                )

    def get(self, ca_id: str) -> TrustAnchor | None:
        return self._by_id.get(ca_id)

    def pem_bundle(self) -> str:
        """The enabled anchors as PEM, for the TLS layer's verify locations."""
        return "".join(a.certificate.public_bytes(Encoding.PEM).decode() for a in self.anchors)

    def verify(self, chain_der: Sequence[bytes], *, now: datetime) -> VerifiedChain:
        """Validate a client chain (leaf first) and return which anchor it chains to."""
        if not chain_der:
            raise errors.NoClientCertificate("no client certificate was presented")
        try:
            leaf = x509.load_der_x509_certificate(chain_der[0])
            intermediates = [x509.load_der_x509_certificate(d) for d in chain_der[1:]]
        except ValueError as exc:
            raise errors.InvalidCertificate(f"client certificate could not be parsed: {exc}") from None
        fp = fingerprint_der(chain_der[0])
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        read_subject(leaf, fingerprint=fp)  # decodable, or InvalidCertificate
        check_leaf_policy(leaf, now=now, fingerprint=fp)
        if self._store is None:
            raise errors.UntrustedChain("no CA is registered and enabled", fingerprint=fp)
        # A cached path is found by the leaf's issuer name and the certificates sent above the leaf.
        sent = (leaf.issuer.public_bytes(), *chain_der[1:])
        chain = self._verify_cached(leaf, sent, now)
        if chain is None:
            try:
                verified = _verifier(self._store, now).verify(leaf, intermediates)
            except VerificationError as exc:
                raise errors.UntrustedChain(
                    "the certificate does not chain to an enabled, registered CA",
                    fingerprint=fp,
                    detail=str(exc),
                ) from None
            chain = tuple(verified.chain)
            self._remember(sent, chain, now)
        if self._revoked:
            self._check_revocation(chain, now=now, fp=fp)
        # The nearest registered CA above the leaf decides the role, region and template.
        # A disabled CA on the way up vetoes the chain.
        for cert in chain[1:]:
            ca_id = fingerprint(cert)
            if ca_id in self._disabled:
                raise errors.UntrustedChain(
                    "the certificate chains through a disabled CA", fingerprint=fp, detail=ca_id
                )
            anchor = self._by_id.get(ca_id)
            if anchor is not None:
                return VerifiedChain(
                    leaf=leaf, leaf_der=chain_der[0], fingerprint=fp, anchor=anchor, chain=chain
                )
        raise errors.UntrustedChain("the chain ends at no registered CA", fingerprint=fp)  # pragma: no cover

    def _verify_cached(
        self, leaf: x509.Certificate, sent: tuple[bytes, ...], now: datetime
    ) -> tuple[x509.Certificate, ...] | None:
        """The chain of ``leaf`` through an issuer path verified before, checking only the leaf
        (its signature by the issuer, validity, extension policy) with cryptography's verifier, the
        issuer as its anchor. None: no usable cached path, or the leaf fails it (then the whole
        chain is verified, so another valid path is never refused here)."""
        path = self._paths.get(sent)
        if path is None or not path.verified_at <= now < path.expires:
            return None
        try:
            _verifier(path.issuer, now).verify(leaf, [])
        except VerificationError:
            return None
        return (leaf, *path.tail)

    def _remember(self, sent: tuple[bytes, ...], chain: tuple[x509.Certificate, ...], now: datetime) -> None:
        path = _IssuerPath.of(chain, now)
        if path is None:
            return
        if len(self._paths) >= MAX_CACHED_PATHS:
            self._paths.pop(next(iter(self._paths)))
        self._paths[sent] = path

    def explain_missing_issuer(self, chain_der: Sequence[bytes]) -> str | None:
        """Why the chain a client sent (leaf first, as sent) reaches no registered CA, for the audit
        trail of a handshake OpenSSL refused with only "unable to get local issuer certificate".

        Follows the sent certificates by issuer name from the leaf. None when that is not the cause
        (the chain does reach an enabled CA, the leaf is self-signed, or the input is unreadable).
        It cannot tell a missing intermediate from an unknown CA when the client sent only its own
        certificate (the broker never sees the certificate that was not sent), and says so.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ATTRIBUTE_LENGTH_WARNING, category=UserWarning)
            try:
                return self._explain_missing_issuer(chain_der)
            except ValueError:
                return None

    def _explain_missing_issuer(self, chain_der: Sequence[bytes]) -> str | None:
        sent = [x509.load_der_x509_certificate(d) for d in chain_der[: MAX_CHAIN_DEPTH + 2]]
        if not sent:
            return None
        enabled = [a.certificate for a in self.anchors]
        disabled = [a.certificate for a in self._disabled_anchors]
        leaf, path = sent[0], [sent[0]]
        while True:
            cert = path[-1]
            named = [ca for ca in enabled if ca.subject == cert.issuer]
            if any(_directly_issued(cert, ca) for ca in named):
                return None  # it does reach an enabled CA: the refusal has another cause
            if any(_directly_issued(cert, ca) for ca in disabled if ca.subject == cert.issuer):
                return f"the issuer {_dn(cert.issuer)} is a registered CA, but it is disabled"
            if named:
                return f"the issuer is named {_dn(cert.issuer)}, like a registered CA, but that CA did not sign it"
            if cert.issuer == cert.subject:
                break  # a self-signed top
            issuer = next((c for c in sent[1:] if c.subject == cert.issuer and c not in path), None)
            if issuer is None or len(path) > MAX_CHAIN_DEPTH:
                break
            path.append(issuer)
        top = path[-1]
        if top is leaf and leaf.issuer == leaf.subject:
            return None  # a self-signed client certificate: OpenSSL's own message says so
        if len(sent) == 1:
            return (
                "chain incomplete (no intermediate sent), or an unknown CA: the client sent only its own "
                f"certificate, and its issuer {_dn(leaf.issuer)} is not a registered CA"
            )
        if top is leaf:
            return (
                f"chain incomplete: the client sent {len(sent) - 1} more certificate(s), none of them "
                f"its issuer {_dn(leaf.issuer)}, which is not a registered CA"
            )
        if top.issuer == top.subject:
            return f"unknown CA: the chain the client sent ends at the root {_dn(top.subject)}, which is not registered"
        return (
            f"unknown CA, or chain incomplete: the chain the client sent ends at {_dn(top.subject)}, "
            f"whose issuer {_dn(top.issuer)} is not a registered CA"
        )


def _directly_issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):  # not its signature, name, or kind of key
        return False
    return True


def _dn(name: x509.Name) -> str:
    """A distinguished name from a client's certificate, quoted for a log line: printable, bounded."""
    try:
        text = name.rfc4514_string()
    except ValueError:
        return "(an undecodable name)"
    text = "".join(c if c.isprintable() else "?" for c in text)
    return repr(text if len(text) <= 160 else text[:157] + "...")


def parse_crl(data: bytes, anchor: TrustAnchor, *, now: datetime) -> x509.CertificateRevocationList:
    """A CRL (PEM or DER) issued by ``anchor``, with its signature verified; else InvalidRequest."""
    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise errors.InvalidRequest(f"not a CRL: {exc}") from None
    ca = anchor.certificate
    if crl.issuer != ca.subject:
        raise errors.InvalidRequest(
            f"the CRL is issued by {crl.issuer.rfc4514_string()}, not by this CA ({anchor.subject})"
        )
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise errors.InvalidRequest("the CRL's signature does not verify against this CA's key")
    if crl.last_update_utc > now:
        raise errors.InvalidRequest(
            f"the CRL's thisUpdate {crl.last_update_utc.isoformat()} is in the future"
        )
    return crl
