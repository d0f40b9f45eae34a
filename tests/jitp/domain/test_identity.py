"""Device ids: the safety rule (property-tested) and identity extraction from hostile subjects."""

from __future__ import annotations

import dataclasses
import unicodedata
import warnings

import pytest
from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from jitp import errors
from jitp.domain.acl import Access, device_namespace, topic_matches, valid_filter
from jitp.domain.identity import (
    MAX_ID_BYTES,
    MAX_ID_CHARS,
    check_device_id,
    derive_identity,
    derive_service,
    id_problem,
    is_safe_id,
    subject_common_name,
)
from jitp.trust import Role, TrustStore, VerifiedChain
from tests.jitp.pkitools import (
    MANUFACTURER,
    MANUFACTURER_ANCHOR,
    ROOT_ANCHOR,
    SERVICE_CA,
    chain_of,
    der,
    leaf,
    name,
    patch_and_resign,
    verified_device,
    verify,
)

FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}

# Characters that matter to the rule, mixed into otherwise arbitrary text.
TRICKY = (
    "/+#$ \t\n\r\x00\x1b\x7f\x85\xa0\u1680\u180e\u2000\u200b\u200d\u200e\u202e\u2028\u2029\u2066"
    "\u3000\ufeff\ufffe\uffff\ue000\U000f0000\u0378\U000e0001-_.:@ABCabc019\u00e9\u20ac\U0001f600"
)
any_char = st.characters(exclude_categories=())  # includes surrogates (Cs)
id_text = st.text(alphabet=st.one_of(any_char, st.sampled_from(TRICKY)), max_size=160)
# Long ids around the 128-character / 256-byte limits (1-, 2-, 3- and 4-byte UTF-8 characters).
long_text = st.text(alphabet=st.sampled_from("a\u00e9\u20ac\U0001f600"), min_size=60, max_size=140)
# What could be a safe id: no forbidden categories, no separators.
plausible_id = st.text(
    alphabet=st.characters(exclude_categories=sorted(FORBIDDEN_CATEGORIES), exclude_characters="/+#"),
    min_size=1,
    max_size=130,
)


def reference_is_safe(value: str) -> bool:
    """The documented rule, written independently of jitp.domain.identity."""
    return (
        0 < len(value) <= 128
        and len(value.encode("utf-8", "surrogatepass")) <= 256
        and not value.startswith("$")
        and not any(ch in "/+#" for ch in value)
        and not any(ch.isspace() for ch in value)
        and not any(unicodedata.category(ch) in FORBIDDEN_CATEGORIES for ch in value)
    )


# -- the id rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "sensor-0001",
        "urn:dev:ABC_1.2",
        "a",
        "dev-\u00e9t\u00e9",
        "x" * 128,
        "\u20ac" * 85,
        "a$b",
        "dev.1@site",
        "\u0645",
    ],
)
def test_known_good_ids_pass(value: str) -> None:
    assert id_problem(value) is None
    assert is_safe_id(value)
    assert check_device_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "$SYS",
        "$jitp",
        "a/b",
        "a+b",
        "a#b",
        "a b",
        "a\tb",
        "a\nb",
        "a\x00b",
        "a\u200bb",  # zero-width space (Cf)
        "a\u202eb",  # right-to-left override (Cf)
        "a\u2028b",  # line separator (Zl)
        "a\u2029b",  # paragraph separator (Zp)
        "a\ue000b",  # private use (Co)
        "a\u0378b",  # unassigned (Cn)
        "a\ud800b",  # lone surrogate (Cs)
        "a\xa0b",  # no-break space
        "a\u3000b",  # ideographic space
        "x" * 129,
        "\u20ac" * 86,  # 86 chars, 258 UTF-8 bytes
        "\U0001f600" * 65,  # 65 chars, 260 UTF-8 bytes
    ],
)
def test_known_bad_ids_fail(value: str) -> None:
    assert id_problem(value)
    assert not is_safe_id(value)
    with pytest.raises(errors.UnsafeIdentity) as info:
        check_device_id(value, fingerprint="ab" * 32)
    assert info.value.reason == "unsafe_id"
    assert info.value.message.startswith("unsafe device id: ")
    assert info.value.fingerprint == "ab" * 32


@settings(max_examples=300)
@given(st.one_of(id_text, long_text, plausible_id))
@example("$")
@example("\U0001f600" * 64)  # exactly 256 bytes
@example("\U0001f600" * 64 + "a")  # 257 bytes
def test_id_rule_matches_reference(value: str) -> None:
    assert is_safe_id(value) == reference_is_safe(value)
    assert is_safe_id(value) == (id_problem(value) is None)


@settings(max_examples=300)
@given(st.one_of(id_text, long_text, plausible_id))
def test_safe_ids_are_safe_and_unsafe_ids_raise(value: str) -> None:
    problem = id_problem(value)
    if problem is None:
        assert value
        assert len(value) <= MAX_ID_CHARS
        assert len(value.encode("utf-8")) <= MAX_ID_BYTES
        assert not value.startswith("$")
        for ch in value:
            assert ch not in "/+#"
            assert not ch.isspace()
            assert unicodedata.category(ch) not in FORBIDDEN_CATEGORIES
        assert check_device_id(value) == value
        # ... and usable as a topic level: its namespace is a valid filter that matches only itself.
        assert valid_filter(f"devices/{value}/#")
        assert topic_matches(f"devices/{value}/telemetry", f"devices/{value}/#")
        assert device_namespace(value).allows(Access.PUBLISH, f"devices/{value}/telemetry")
    else:
        assert isinstance(problem, str) and problem
        with pytest.raises(errors.UnsafeIdentity) as info:
            check_device_id(value)
        assert info.value.message == f"unsafe device id: {problem}"
        assert info.value.reason == "unsafe_id"
        # The offending value is kept, bounded, for the audit log.
        assert info.value.detail is not None and len(info.value.detail) <= 80


# -- identity extraction -------------------------------------------------------------------

STRING_TYPES = [_ASN1Type.UTF8String, _ASN1Type.BMPString, _ASN1Type.UniversalString]
cn_text = st.one_of(
    id_text.filter(lambda s: not any(unicodedata.category(c) == "Cs" for c in s)), long_text, plausible_id
)
other_value = st.text(st.characters(codec="utf-8"), max_size=80)


def _attribute(oid: x509.ObjectIdentifier, value: str, string_type: _ASN1Type) -> x509.NameAttribute[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.NameAttribute(oid, value, _type=string_type, _validate=False)


@st.composite
def subjects(draw: st.DrawFn) -> tuple[x509.Name, str]:
    """A subject with exactly one CN (its text returned too) among arbitrary other attributes."""
    cn = draw(cn_text)
    cn_type = draw(st.sampled_from(STRING_TYPES))
    others = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.SERIAL_NUMBER]
                ),
                other_value,
            ),
            max_size=3,
        )
    )
    rdns = [x509.RelativeDistinguishedName([_attribute(oid, v, _ASN1Type.UTF8String)]) for oid, v in others]
    position = draw(st.integers(0, len(rdns)))
    rdns.insert(position, x509.RelativeDistinguishedName([_attribute(NameOID.COMMON_NAME, cn, cn_type)]))
    return x509.Name(rdns), cn


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subjects())
def test_derive_identity_returns_the_safe_cn_or_refuses(subject: tuple[x509.Name, str]) -> None:
    name_, cn = subject
    verified = verified_device(name_)
    assert verified.anchor == MANUFACTURER_ANCHOR
    try:
        identity = derive_identity(verified, default_region="unused")
    except errors.UnsafeIdentity as exc:
        assert not is_safe_id(cn)
        assert exc.fingerprint == verified.fingerprint
        assert exc.message
    else:
        assert identity.device_id == cn
        assert is_safe_id(identity.device_id)
        assert identity.cert_fingerprint == verified.fingerprint
        assert identity.ca_id == MANUFACTURER_ANCHOR.ca_id
        assert identity.region == "eu-west"
        assert identity.serial == format(verified.leaf.serial_number, "x")
        assert identity.not_after == verified.leaf.not_valid_after_utc
        assert isinstance(identity.subject, str)


def _no_warnings_while(fn: object) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert callable(fn)
        fn()
    assert [str(w.message) for w in caught] == []


def test_100_character_cn_is_a_valid_id_without_warnings() -> None:
    cn = "d" * 100  # over X.520's 64, within jitp's 128
    cert = leaf(name((NameOID.COMMON_NAME, cn), (NameOID.ORGANIZATION_NAME, "o" * 90)))
    results: list[object] = []
    _no_warnings_while(lambda: results.append(derive_identity(verify([der(cert)]))))
    (identity,) = results
    assert identity.device_id == cn  # type: ignore[attr-defined]
    assert cn in identity.subject  # type: ignore[attr-defined]
    # Under -W error (as in pytest here) the plain call works too.
    assert derive_identity(verify([der(cert)])).device_id == cn
    assert subject_common_name(cert) == cn


def test_200_character_cn_is_refused_as_unsafe_without_warnings() -> None:
    cert = leaf(name((NameOID.COMMON_NAME, "d" * 200)))

    def go() -> None:
        with pytest.raises(errors.UnsafeIdentity, match="longer than 128"):
            derive_identity(verify([der(cert)]))

    _no_warnings_while(go)


def test_empty_cn_is_refused() -> None:
    with pytest.raises(errors.UnsafeIdentity, match="empty"):
        derive_identity(verified_device(name((NameOID.COMMON_NAME, ""))))


def test_no_cn_is_refused() -> None:
    for subject in (x509.Name([]), name((NameOID.ORGANIZATION_NAME, "acme"), (NameOID.SERIAL_NUMBER, "42"))):
        with pytest.raises(errors.UnsafeIdentity, match="no common name"):
            derive_identity(verified_device(subject))


def test_several_cns_are_refused() -> None:
    separate = name((NameOID.COMMON_NAME, "dev-1"), (NameOID.COMMON_NAME, "dev-2"))
    same_rdn = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "dev-2"),
                ]
            )
        ]
    )
    identical = name((NameOID.COMMON_NAME, "dev-1"), (NameOID.COMMON_NAME, "dev-1"))
    for subject in (separate, same_rdn, identical):
        with pytest.raises(errors.UnsafeIdentity, match="several common names"):
            derive_identity(verified_device(subject))


def test_cn_in_a_multi_valued_rdn_is_found() -> None:
    subject = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "dev-7"),
                ]
            )
        ]
    )
    assert derive_identity(verified_device(subject)).device_id == "dev-7"


@pytest.mark.parametrize("string_type", STRING_TYPES)
def test_cn_string_types_decode_to_the_same_id(string_type: _ASN1Type) -> None:
    subject = x509.Name([_attribute(NameOID.COMMON_NAME, "dev-\u00e9\U0001f600", string_type)])
    assert derive_identity(verified_device(subject)).device_id == "dev-\u00e9\U0001f600"


def test_undecodable_cn_is_a_refusal_not_a_crash() -> None:
    """A CA that signs a UTF8String CN holding invalid UTF-8: refused, never a bare ValueError."""
    cert = leaf("dev-XXXX")
    bad = patch_and_resign(cert, MANUFACTURER, b"dev-XXXX", b"dev-\xff\xfe\xc3X")
    with pytest.raises(errors.InvalidCertificate) as info:
        verify([bad])
    assert info.value.reason == "invalid_certificate"
    # derive_identity on such a chain (however it was obtained) refuses too.
    good = verified_device("dev-XXXX")
    forged = dataclasses.replace(good, leaf=x509.load_der_x509_certificate(bad), leaf_der=bad)
    with pytest.raises(errors.Refused):
        derive_identity(forged)


def test_identity_uses_the_anchor_region_or_the_default_and_template() -> None:
    anchor = dataclasses.replace(MANUFACTURER_ANCHOR, region=None, template="sensors")
    verified = verify(chain_of(leaf("sensor-0001")), TrustStore.of([anchor]))
    identity = derive_identity(verified, default_region="us-east")
    assert (identity.device_id, identity.region, identity.template) == ("sensor-0001", "us-east", "sensors")
    assert derive_identity(verified).region == "default"


def test_identity_from_a_root_anchor() -> None:
    verified = verify(chain_of(leaf("sensor-0002")), TrustStore.of([ROOT_ANCHOR]))
    assert verified.anchor == ROOT_ANCHOR
    assert derive_identity(verified).ca_id == ROOT_ANCHOR.ca_id


def test_derive_identity_is_for_device_anchors_only() -> None:
    verified = verify(chain_of(leaf("ingest-service", issuer=SERVICE_CA), SERVICE_CA))
    assert verified.anchor.role is Role.SERVICE
    with pytest.raises(ValueError, match="device anchors"):
        derive_identity(verified)
    service = derive_service(verified)
    assert service.name == "ingest-service"
    assert service.cert_fingerprint == verified.fingerprint


def test_derive_service_refuses_unsafe_and_long_names_without_warnings() -> None:
    for subject in (name((NameOID.COMMON_NAME, "svc/#")), name((NameOID.COMMON_NAME, "s" * 300))):
        verified = verify(chain_of(leaf(subject, issuer=SERVICE_CA), SERVICE_CA))

        def go(v: VerifiedChain = verified) -> None:
            with pytest.raises(errors.UnsafeIdentity):
                derive_service(v)

        _no_warnings_while(go)


@settings(max_examples=100, deadline=None)
@given(cn_text)
def test_derive_service_returns_the_safe_cn_or_refuses(cn: str) -> None:
    assume(cn)
    verified = verify(chain_of(leaf(name((NameOID.COMMON_NAME, cn)), issuer=SERVICE_CA), SERVICE_CA))
    try:
        service = derive_service(verified)
    except errors.UnsafeIdentity:
        assert not is_safe_id(cn)
    else:
        assert service.name == cn and is_safe_id(cn)
