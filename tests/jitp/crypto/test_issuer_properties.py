"""Property: an issued operational certificate carries the record's id (CN and SAN) and nothing of
the CSR but its public key, whatever subject and extensions the CSR asks for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jitp.crypto.issuer import build_operational, make_issuing_ca, parse_csr, same_public_key
from tests.certflow import make_csr, new_key

NOW = datetime(2026, 12, 4, tzinfo=UTC)
SIGNER = make_issuing_ca(key_type="ec", validity=timedelta(days=365), now=NOW)
KEYS = [new_key() for _ in range(3)]  # key generation is not what is under test

device_ids = st.text(
    st.characters(
        codec="utf-8", exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"], exclude_characters="/+#$"
    ),
    min_size=1,
    max_size=128,  # jitp's id limit; over 64 (a CN's) the id is in the SAN only
)
requested = st.lists(
    st.sampled_from(
        [
            (x509.SubjectAlternativeName([x509.DNSName("evil.example"), x509.RFC822Name("a@b.c")]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(True, True, True, True, True, False, False, False, False), True),
            (
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]),
                False,
            ),
            (x509.OCSPNoCheck(), False),
            (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"), False),
        ]
    ),
    unique_by=lambda e: type(e[0]),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@example(device_id="d" * 128, cn="x", extensions=[], k=0)  # longer than a CN may be
@example(device_id="\u00e9" * 33, cn="x", extensions=[], k=0)  # 33 characters, 66 bytes: too long too
@given(
    device_id=device_ids,
    cn=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=30),
    extensions=requested,
    k=st.integers(0, 2),
)
def test_issued_certificate_has_the_record_id_and_none_of_the_csr_extensions(
    device_id: str, cn: str, extensions: list[tuple[x509.ExtensionType, bool]], k: int
) -> None:
    csr = parse_csr(make_csr(KEYS[k], cn=cn, extensions=extensions))
    cert = build_operational(SIGNER, csr, device_id=device_id, validity=timedelta(days=30), now=NOW)
    if len(device_id.encode()) <= 64:
        assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    else:  # too long for a CN: the SAN alone names it, and is then critical
        assert cert.subject == x509.Name([])
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [unquote(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)] == [
        f"urn:jitp:device:{device_id}"
    ]
    assert len(list(san)) == 1  # no DNS or e-mail names of the CSR
    ours = {
        x509.BasicConstraints,
        x509.KeyUsage,
        x509.ExtendedKeyUsage,
        x509.SubjectAlternativeName,
        x509.SubjectKeyIdentifier,
        x509.AuthorityKeyIdentifier,
    }
    assert {type(e.value) for e in cert.extensions} == ours
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not (ku.key_encipherment or ku.content_commitment or ku.key_cert_sign)
    assert same_public_key(cert, csr)
    assert cert.not_valid_after_utc - NOW == timedelta(days=30)
    cert.verify_directly_issued_by(SIGNER.cert)
