"""TrustStore.verify: every refusal has its specific reason; anchors decide role and region."""

from __future__ import annotations

import dataclasses
from datetime import UTC, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

import certs
from jitp import errors
from jitp.domain.identity import derive_identity, derive_service
from jitp.trust import Role, TrustAnchor, TrustStore, fingerprint, fingerprint_der

from .pkitools import (
    LEAF_KEY,
    MANUFACTURER,
    MANUFACTURER_ANCHOR,
    NOW,
    ROGUE,
    ROOT,
    ROOT_ANCHOR,
    SERVICE_ANCHOR,
    SERVICE_CA,
    STORE,
    chain_of,
    der,
    leaf,
    rsa_1024_key,
    verify,
)


def refused(
    exc_type: type[errors.Refused], reason: str, chain: list[bytes], store: TrustStore = STORE
) -> errors.Refused:
    with pytest.raises(exc_type) as info:
        verify(chain, store)
    exc = info.value
    assert type(exc) is exc_type
    assert exc.reason == reason
    assert reason in errors.REFUSAL_REASONS
    assert exc.message
    # Once the leaf parses, the refusal names its fingerprint (for the audit log).
    if chain and exc_type not in (errors.NoClientCertificate, errors.InvalidCertificate):
        assert exc.fingerprint == fingerprint_der(chain[0])
    return exc


# -- refusals ----------------------------------------------------------------------------------


def test_unknown_ca() -> None:
    cert = leaf("dev-1", issuer=ROGUE)
    refused(errors.UntrustedChain, "unknown_ca", [der(cert)])
    refused(errors.UntrustedChain, "unknown_ca", chain_of(cert, ROGUE))


def test_unknown_ca_even_with_a_same_named_forged_intermediate() -> None:
    forged = certs.make_ca(
        MANUFACTURER.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,  # type: ignore[arg-type]
        key=certs.generate_key("ec"),
        issuer=ROGUE,
        now=NOW,
    )
    cert = leaf("dev-1", issuer=forged)
    refused(errors.UntrustedChain, "unknown_ca", chain_of(cert, forged))


def test_leaf_of_root_without_the_intermediate_is_unknown_to_an_intermediate_anchor() -> None:
    cert = leaf("dev-1", issuer=ROOT)
    refused(errors.UntrustedChain, "unknown_ca", [der(cert)])


def test_no_anchor_at_all() -> None:
    refused(errors.UntrustedChain, "unknown_ca", [der(leaf("dev-1"))], TrustStore.of([]))


def test_expired() -> None:
    cert = leaf("dev-1", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1))
    refused(errors.CertificateExpired, "expired", [der(cert)])


def test_not_yet_valid() -> None:
    cert = leaf("dev-1", not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=30))
    refused(errors.CertificateNotYetValid, "not_yet_valid", [der(cert)])


def test_validity_bounds_are_inclusive() -> None:
    start, end = NOW + timedelta(minutes=1), NOW + timedelta(hours=1)  # within the CAs' validity
    cert = leaf("dev-1", not_before=start, not_after=end)
    chain = [der(cert)]
    assert STORE.verify(chain, now=cert.not_valid_before_utc).anchor == MANUFACTURER_ANCHOR
    assert STORE.verify(chain, now=cert.not_valid_after_utc).anchor == MANUFACTURER_ANCHOR
    with pytest.raises(errors.CertificateExpired):
        STORE.verify(chain, now=cert.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(errors.CertificateNotYetValid):
        STORE.verify(chain, now=cert.not_valid_before_utc - timedelta(seconds=1))


def test_ca_certificate_as_leaf() -> None:
    refused(errors.CaCertificateAsLeaf, "ca_as_leaf", [der(leaf("dev-1", is_ca=True))])
    # A registered CA presenting itself as a client is refused too.
    refused(errors.CaCertificateAsLeaf, "ca_as_leaf", [der(MANUFACTURER.cert)])


def test_bad_key_usage() -> None:
    refused(errors.BadKeyUsage, "bad_key_usage", [der(leaf("dev-1", key_usage=("key_encipherment",)))])


def test_bad_extended_key_usage() -> None:
    cert = leaf("dev-1", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    exc = refused(errors.BadKeyUsage, "bad_key_usage", [der(cert)])
    assert "ExtendedKeyUsage" in exc.message


def test_weak_rsa_key() -> None:
    cert = leaf("dev-1", key=rsa_1024_key(), key_usage=("digital_signature", "key_encipherment"))
    exc = refused(errors.WeakKey, "weak_key", [der(cert)])
    assert "RSA-1024" in exc.message


def test_disallowed_curve() -> None:
    cert = leaf("dev-1", key=ec.generate_private_key(ec.SECP256K1()))
    exc = refused(errors.WeakKey, "weak_key", [der(cert)])
    assert "secp256k1" in exc.message


def test_empty_chain() -> None:
    refused(errors.NoClientCertificate, "no_certificate", [])


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"not a certificate", b"\x30\x82\xff\xff" + b"\x00" * 10])
def test_garbage_der(garbage: bytes) -> None:
    refused(errors.InvalidCertificate, "invalid_certificate", [garbage])
    refused(errors.InvalidCertificate, "invalid_certificate", [der(leaf("dev-1")), garbage])


def test_malformed_extension_is_an_invalid_certificate_not_a_crash() -> None:
    bad_ku = x509.UnrecognizedExtension(ExtensionOID.KEY_USAGE, b"\x00\x01garbage")
    cert = leaf("dev-1", key_usage=None, extra_extensions=(bad_ku,))
    exc = refused(errors.InvalidCertificate, "invalid_certificate", [der(cert)])
    assert exc.fingerprint == fingerprint(cert)


def test_unknown_critical_extension_is_refused() -> None:
    ext = x509.Extension(
        x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"),
        True,
        x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"),
    )
    cert = leaf("dev-1", extra_extensions=(ext,))
    refused(errors.UntrustedChain, "unknown_ca", [der(cert)])


def test_every_refusal_is_a_refused_subclass_with_a_distinct_reason() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.Refused)]
    concrete = [c for c in classes if c is not errors.Refused]
    assert sorted(c.reason for c in concrete) == sorted(errors.REFUSAL_REASONS)
    assert len(set(errors.REFUSAL_REASONS)) == len(errors.REFUSAL_REASONS)


# -- acceptance and anchors ------------------------------------------------------------------


def test_intermediate_registered_as_anchor() -> None:
    cert = leaf("dev-1")
    for chain in ([der(cert)], chain_of(cert)):
        verified = verify(chain)
        assert verified.anchor == MANUFACTURER_ANCHOR
        assert verified.anchor.role is Role.DEVICE
        assert verified.leaf == cert
        assert verified.leaf_der == der(cert)
        assert verified.fingerprint == certs.fingerprint(cert) == fingerprint(cert)
        assert verified.chain[0] == cert
        assert verified.chain[-1] == MANUFACTURER.cert


def test_root_registered_as_anchor() -> None:
    cert = leaf("dev-1")
    store = TrustStore.of([ROOT_ANCHOR])
    verified = verify(chain_of(cert), store)
    assert verified.anchor == ROOT_ANCHOR
    assert verified.chain == (cert, MANUFACTURER.cert, ROOT.cert)
    # Without the intermediate there is no path to the root.
    refused(errors.UntrustedChain, "unknown_ca", [der(cert)], store)


def test_nearest_registered_anchor_decides() -> None:
    store = TrustStore.of([ROOT_ANCHOR, MANUFACTURER_ANCHOR, SERVICE_ANCHOR])
    assert verify(chain_of(leaf("dev-1")), store).anchor == MANUFACTURER_ANCHOR
    assert verify(chain_of(leaf("svc", issuer=SERVICE_CA), SERVICE_CA), store).anchor == SERVICE_ANCHOR
    assert verify(chain_of(leaf("direct", issuer=ROOT), ROOT), store).anchor == ROOT_ANCHOR


def test_service_anchor_reports_the_service_role() -> None:
    cert = leaf("ingest-service", issuer=SERVICE_CA)
    verified = verify(chain_of(cert, SERVICE_CA))
    assert verified.anchor == SERVICE_ANCHOR
    assert verified.anchor.role is Role.SERVICE
    assert derive_service(verified).name == "ingest-service"


def test_disabled_anchor_is_not_trusted() -> None:
    disabled = dataclasses.replace(MANUFACTURER_ANCHOR, enabled=False)
    store = TrustStore.of([disabled, SERVICE_ANCHOR])
    assert store.anchors == (SERVICE_ANCHOR,)
    assert store.get(MANUFACTURER_ANCHOR.ca_id) is None
    assert "BEGIN CERTIFICATE" in store.pem_bundle()
    assert store.pem_bundle().count("BEGIN CERTIFICATE") == 1
    refused(errors.UntrustedChain, "unknown_ca", chain_of(leaf("dev-1")), store)
    refused(errors.UntrustedChain, "unknown_ca", [der(leaf("dev-1"))], TrustStore.of([disabled]))


def test_disabled_intermediate_is_not_bypassed_through_an_enabled_root() -> None:
    disabled = dataclasses.replace(MANUFACTURER_ANCHOR, enabled=False)
    store = TrustStore.of([ROOT_ANCHOR, disabled])
    exc = refused(errors.UntrustedChain, "unknown_ca", chain_of(leaf("dev-1")), store)
    assert "disabled" in exc.message
    # Other intermediates under the same root are unaffected.
    assert verify(chain_of(leaf("svc", issuer=SERVICE_CA), SERVICE_CA), store).anchor == ROOT_ANCHOR


def test_enabled_copy_wins_over_a_disabled_duplicate() -> None:
    disabled = dataclasses.replace(MANUFACTURER_ANCHOR, enabled=False)
    store = TrustStore.of([disabled, MANUFACTURER_ANCHOR])
    assert verify([der(leaf("dev-1"))], store).anchor == MANUFACTURER_ANCHOR


def test_device_certificate_without_key_usage_and_eku_is_accepted() -> None:
    cert = leaf("dev-plain", key_usage=None, eku=None)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.KeyUsage)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    verified = verify([der(cert)])
    assert derive_identity(verified).device_id == "dev-plain"


def test_eku_with_client_auth_among_others_is_accepted() -> None:
    cert = leaf("dev-1", eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH))
    assert verify([der(cert)]).anchor == MANUFACTURER_ANCHOR


def test_ed25519_device_key_is_accepted() -> None:
    cert = leaf("dev-ed", key=ed25519.Ed25519PrivateKey.generate())
    assert verify([der(cert)]).anchor == MANUFACTURER_ANCHOR


def test_naive_now_is_taken_as_utc() -> None:
    cert = leaf("dev-1")
    assert (
        STORE.verify([der(cert)], now=NOW.astimezone(UTC).replace(tzinfo=None)).anchor == MANUFACTURER_ANCHOR
    )


def test_leaf_with_expired_intermediate_is_untrusted_when_the_root_is_the_anchor() -> None:
    old = certs.make_ca(
        "old manufacturer",
        key=certs.generate_key("ec"),
        issuer=ROOT,
        not_before=NOW - timedelta(days=60),
        not_after=NOW - timedelta(days=1),
    )
    cert = certs.make_leaf("dev-1", LEAF_KEY.public_key(), issuer=old, now=NOW)
    refused(errors.UntrustedChain, "unknown_ca", chain_of(cert, old), TrustStore.of([ROOT_ANCHOR]))


# -- TrustAnchor.from_certificate -------------------------------------------------------------


def test_from_certificate_records_the_ca() -> None:
    anchor = TrustAnchor.from_certificate(MANUFACTURER.cert, region="eu", template="t", now=NOW)
    assert anchor.ca_id == certs.fingerprint(MANUFACTURER.cert)
    assert anchor.cert_der == der(MANUFACTURER.cert)
    assert anchor.certificate == MANUFACTURER.cert
    assert anchor.subject == MANUFACTURER.cert.subject.rfc4514_string()
    assert (anchor.role, anchor.region, anchor.template, anchor.enabled) == (Role.DEVICE, "eu", "t", True)


def test_from_certificate_refuses_a_leaf() -> None:
    with pytest.raises(errors.InvalidRequest, match="not a CA certificate"):
        TrustAnchor.from_certificate(leaf("dev-1"), now=NOW)


def test_from_certificate_refuses_a_certificate_without_basic_constraints() -> None:
    key = certs.generate_key("ec")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no bc")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(errors.InvalidRequest, match="no BasicConstraints"):
        TrustAnchor.from_certificate(cert, now=NOW)


def test_from_certificate_refuses_an_expired_ca() -> None:
    expired = certs.make_ca(
        "expired CA",
        key=certs.generate_key("ec"),
        not_before=NOW - timedelta(days=60),
        not_after=NOW - timedelta(days=1),
    )
    with pytest.raises(errors.InvalidRequest, match="expired"):
        TrustAnchor.from_certificate(expired.cert, now=NOW)
    # The default is "now": an expired CA is never registered by omission.
    with pytest.raises(errors.InvalidRequest, match="expired"):
        TrustAnchor.from_certificate(expired.cert)


def test_from_certificate_refuses_a_weak_ca_key() -> None:
    weak = certs.make_ca("weak CA", key=rsa_1024_key())
    with pytest.raises(errors.InvalidRequest, match="RSA-1024"):
        TrustAnchor.from_certificate(weak.cert, now=NOW)


def test_from_certificate_refuses_a_ca_with_a_malformed_extension() -> None:
    bad = patch_basic_constraints_of_a_ca()
    with pytest.raises(errors.InvalidRequest):
        TrustAnchor.from_certificate(bad, now=NOW)


def patch_basic_constraints_of_a_ca() -> x509.Certificate:
    from .pkitools import patch_and_resign

    issuer = certs.make_ca("patched CA", key=certs.generate_key("ec"))
    # BasicConstraints value: SEQUENCE { BOOLEAN TRUE } = 30 03 01 01 ff -> turn the BOOLEAN into an INTEGER
    # of the same length, which no BasicConstraints parser accepts.
    data = patch_and_resign(issuer.cert, issuer, b"\x30\x03\x01\x01\xff", b"\x30\x03\x13\x01\x41")
    return x509.load_der_x509_certificate(data)


def test_service_role_anchor() -> None:
    anchor = TrustAnchor.from_certificate(SERVICE_CA.cert, role=Role.SERVICE, now=NOW)
    assert anchor.role is Role.SERVICE
    assert TrustAnchor.from_certificate(SERVICE_CA.cert, role="service", now=NOW).role is Role.SERVICE  # type: ignore[arg-type]


# -- the verified issuer-path cache (issue 14: verify the chain once) ----------------------------


def test_a_cached_issuer_path_gives_the_same_verdict_and_is_used() -> None:
    store = TrustStore.of([ROOT_ANCHOR])
    first = store.verify(chain_of(leaf("cache-1")), now=NOW)
    assert len(store._paths) == 1
    second = store.verify(chain_of(leaf("cache-2")), now=NOW)
    assert second.anchor == first.anchor
    assert [c.subject for c in second.chain[1:]] == [c.subject for c in first.chain[1:]]
    assert len(store._paths) == 1  # the same path, found in the cache


def test_a_forged_leaf_under_a_cached_path_is_refused() -> None:
    store = TrustStore.of([ROOT_ANCHOR])
    store.verify(chain_of(leaf("cache-ok")), now=NOW)
    # A CA with the manufacturer's name but another key: its leaf claims the cached issuer.
    twin = certs.make_ca(
        "jitp test manufacturer CA", key=certs.generate_key("ec"), issuer=ROOT, path_length=0, now=NOW
    )
    forged = leaf("cache-forged", issuer=twin)
    with pytest.raises(errors.UntrustedChain):
        store.verify([der(forged), der(MANUFACTURER.cert)], now=NOW)


def test_an_expired_leaf_under_a_cached_path_is_refused() -> None:
    store = TrustStore.of([ROOT_ANCHOR])
    store.verify(chain_of(leaf("cache-fresh")), now=NOW)
    old = leaf("cache-old", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1))
    with pytest.raises(errors.CertificateExpired):
        store.verify(chain_of(old), now=NOW)


def test_a_cached_path_is_verified_again_once_an_issuer_on_it_expires() -> None:
    short = certs.make_ca(
        "jitp short-lived CA", key=certs.generate_key("ec"), issuer=ROOT, path_length=0,
        not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(hours=1),
    )  # fmt: skip
    store = TrustStore.of([ROOT_ANCHOR])
    store.verify(chain_of(leaf("cache-short", issuer=short), short), now=NOW)
    later = NOW + timedelta(hours=2)
    device = leaf(
        "cache-short-2", issuer=short, not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=9)
    )
    with pytest.raises(errors.UntrustedChain):
        store.verify(chain_of(device, short), now=later)


def test_paths_through_a_name_constrained_ca_are_never_cached() -> None:
    constraints = x509.Extension(
        x509.NameConstraints.oid,
        True,
        x509.NameConstraints(permitted_subtrees=[x509.DNSName("devices.example")], excluded_subtrees=None),
    )
    constrained = certs.make_ca(
        "jitp constrained CA", key=certs.generate_key("ec"), issuer=ROOT, path_length=0,
        extra_extensions=(constraints,), now=NOW,
    )  # fmt: skip
    store = TrustStore.of([ROOT_ANCHOR])
    store.verify(chain_of(leaf("cache-nc", issuer=constrained), constrained), now=NOW)
    assert store._paths == {}


def test_a_new_trust_snapshot_starts_without_cached_paths() -> None:
    store = TrustStore.of([ROOT_ANCHOR])
    store.verify(chain_of(leaf("cache-snap")), now=NOW)
    disabled = dataclasses.replace(ROOT_ANCHOR, enabled=False)
    after = TrustStore.of([disabled], version=1)
    assert after._paths == {}
    with pytest.raises(errors.UntrustedChain):
        after.verify(chain_of(leaf("cache-snap-2")), now=NOW)


def test_a_leaf_issued_by_an_anchor_needs_no_cached_path() -> None:
    """Verifying it is already one step (the manufacturer CA registered itself)."""
    store = TrustStore.of([MANUFACTURER_ANCHOR])
    store.verify(chain_of(leaf("cache-direct")), now=NOW)
    assert store._paths == {}
