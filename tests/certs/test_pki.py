"""Tests for certs.pki: real keys, real signatures, real chain validation (no mocks)."""

from __future__ import annotations

import ipaddress
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    DNSName,
    ExtensionPolicy,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

from certs.pki import (
    DeviceFiles,
    Issuer,
    PkiLayout,
    fingerprint,
    generate_key,
    init_pki,
    issue_devices,
    issue_from_pki,
    load_certs,
    load_issuer,
    load_key,
    make_ca,
    make_leaf,
    make_server_cert,
    write_certs,
    write_key,
)

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _client_verifier(root: x509.Certificate, when: datetime = NOW):  # type: ignore[no-untyped-def]
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    return (
        PolicyBuilder()
        .store(Store([root]))
        .time(when)
        .extension_policies(ee_policy=ee_policy, ca_policy=ExtensionPolicy.webpki_defaults_ca())
        .build_client_verifier()
    )


def _server_verifier(root: x509.Certificate, name: x509.verification.Subject, when: datetime = NOW):  # type: ignore[no-untyped-def]
    return PolicyBuilder().store(Store([root])).time(when).build_server_verifier(name)


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


@pytest.fixture(scope="module")
def ec_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(tmp_path_factory.mktemp("pki") / "pki", now=NOW)


@pytest.fixture(scope="module")
def root_ca() -> Issuer:
    return make_ca("test root", key=generate_key(), now=NOW)


@pytest.fixture(scope="module")
def sub_ca(root_ca: Issuer) -> Issuer:
    return make_ca("test sub", key=generate_key(), issuer=root_ca, now=NOW, path_length=0)


# ---------------------------------------------------------------------------------------------------------
# keys


def test_generate_key_types() -> None:
    ec_key = generate_key()
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ec_key.curve, ec.SECP256R1)
    rsa_key = generate_key("rsa", rsa_bits=2048)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert rsa_key.key_size == 2048
    with pytest.raises(ValueError, match="unknown key type"):
        generate_key("dsa")


def test_write_and_load_key_roundtrip(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "a" / "b" / "k.key"
    write_key(path, key)
    assert _mode(path) == 0o600
    text = path.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    loaded = load_key(path)
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]


def test_write_key_tightens_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("old junk that is longer than nothing" * 100)
    path.chmod(0o666)
    write_key(path, generate_key())
    assert _mode(path) == 0o600
    load_key(path)  # truncated + fully rewritten


def test_write_key_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("x")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(OSError):
        write_key(link, generate_key())
    assert target.read_text() == "x"


def test_write_certs_roundtrip(tmp_path: Path, root_ca: Issuer, sub_ca: Issuer) -> None:
    path = tmp_path / "c" / "chain.pem"
    write_certs(path, [sub_ca.cert, root_ca.cert])
    assert _mode(path) == 0o644
    assert load_certs(path) == [sub_ca.cert, root_ca.cert]


def test_fingerprint(root_ca: Issuer) -> None:
    fp = fingerprint(root_ca.cert)
    assert fp == root_ca.cert.fingerprint(hashes.SHA256()).hex()
    assert len(fp) == 64
    assert fp == fp.lower()


# ---------------------------------------------------------------------------------------------------------
# CAs


def test_root_ca_extensions(root_ca: Issuer) -> None:
    cert = root_ca.cert
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test root"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "jitp dev PKI"
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length is None
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    _ext(cert, x509.SubjectKeyIdentifier)
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, x509.AuthorityKeyIdentifier)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    cert.verify_directly_issued_by(cert)
    assert root_ca.chain == ()


def test_ca_chain_semantics(root_ca: Issuer, sub_ca: Issuer) -> None:
    assert sub_ca.chain == ()  # signed by the root: root never part of a chain
    sub_ca.cert.verify_directly_issued_by(root_ca.cert)
    aki = _ext(sub_ca.cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(root_ca.cert, x509.SubjectKeyIdentifier).value.digest
    assert _ext(sub_ca.cert, x509.BasicConstraints).value.path_length == 0

    mid = make_ca("mid", key=generate_key(), issuer=root_ca, now=NOW)
    low = make_ca("low", key=generate_key(), issuer=mid, now=NOW)
    lowest = make_ca("lowest", key=generate_key(), issuer=low, now=NOW)
    assert mid.chain == ()
    assert low.chain == (mid.cert,)
    assert lowest.chain == (low.cert, mid.cert)

    key = generate_key()
    leaf = make_leaf("deep-device", key.public_key(), issuer=lowest, now=NOW)
    _client_verifier(root_ca.cert).verify(leaf, [lowest.cert, *lowest.chain])


def test_ca_validity_defaults_and_overrides(root_ca: Issuer) -> None:
    assert root_ca.cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert root_ca.cert.not_valid_after_utc == NOW + timedelta(days=3650)
    start, end = NOW - timedelta(days=1), NOW + timedelta(days=2)
    ca = make_ca("x", key=generate_key(), not_before=start, not_after=end)
    assert (ca.cert.not_valid_before_utc, ca.cert.not_valid_after_utc) == (start, end)
    with pytest.raises(ValueError, match="before"):
        make_ca("x", key=generate_key(), not_before=end, not_after=start)


def test_naive_now_is_treated_as_utc() -> None:
    ca = make_ca("naive", key=generate_key(), now=datetime(2030, 1, 15, 12, 0))
    assert ca.cert.not_valid_before_utc == NOW - timedelta(minutes=5)


def test_rsa_ca_and_leaf() -> None:
    root = make_ca("rsa root", key=generate_key("rsa"), now=NOW)
    assert isinstance(root.key, rsa.RSAPrivateKey)
    key = generate_key("rsa")
    leaf = make_leaf("rsa-device", key.public_key(), issuer=root, now=NOW)
    _client_verifier(root.cert).verify(leaf, [])


def test_issuer_repr_has_no_key_material(root_ca: Issuer) -> None:
    text = repr(root_ca)
    assert "test root" in text
    assert "PRIVATE" not in text and "key=" not in text


# ---------------------------------------------------------------------------------------------------------
# leaves


def test_default_leaf(root_ca: Issuer, sub_ca: Issuer) -> None:
    key = generate_key()
    leaf = make_leaf("dev-1", key.public_key(), issuer=sub_ca, now=NOW, serial=12345)
    assert leaf.serial_number == 12345
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    assert leaf.issuer == sub_ca.cert.subject
    bc = _ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _ext(leaf, x509.SubjectKeyIdentifier)
    _ext(leaf, x509.AuthorityKeyIdentifier)
    with pytest.raises(x509.ExtensionNotFound):
        _ext(leaf, x509.SubjectAlternativeName)
    assert leaf.not_valid_after_utc == NOW + timedelta(days=825)
    _client_verifier(root_ca.cert).verify(leaf, [sub_ca.cert])


def test_random_serials_differ(sub_ca: Issuer) -> None:
    key = generate_key()
    serials = {make_leaf("d", key.public_key(), issuer=sub_ca, now=NOW).serial_number for _ in range(5)}
    assert len(serials) == 5


def test_leaf_is_ca(root_ca: Issuer, sub_ca: Issuer) -> None:
    leaf = make_leaf("rogue", generate_key().public_key(), issuer=sub_ca, now=NOW, is_ca=True)
    assert _ext(leaf, x509.BasicConstraints).value.ca is True
    with pytest.raises(VerificationError):
        _client_verifier(root_ca.cert).verify(leaf, [sub_ca.cert])


def test_leaf_without_key_usage_and_eku(root_ca: Issuer, sub_ca: Issuer) -> None:
    leaf = make_leaf("bare", generate_key().public_key(), issuer=sub_ca, now=NOW, key_usage=None, eku=None)
    with pytest.raises(x509.ExtensionNotFound):
        _ext(leaf, x509.KeyUsage)
    with pytest.raises(x509.ExtensionNotFound):
        _ext(leaf, x509.ExtendedKeyUsage)


def test_leaf_wrong_eku_rejected_by_client_verifier(root_ca: Issuer, sub_ca: Issuer) -> None:
    leaf = make_leaf(
        "server-ish",
        generate_key().public_key(),
        issuer=sub_ca,
        now=NOW,
        eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )
    with pytest.raises(VerificationError):
        _client_verifier(root_ca.cert).verify(leaf, [sub_ca.cert])


def test_leaf_key_usage_names(sub_ca: Issuer) -> None:
    leaf = make_leaf(
        "ku",
        generate_key().public_key(),
        issuer=sub_ca,
        now=NOW,
        key_usage=("digital_signature", "key_encipherment", "key_agreement"),
    )
    ku = _ext(leaf, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and ku.key_agreement and not ku.data_encipherment
    with pytest.raises(ValueError, match="unknown key usage"):
        make_leaf("ku", generate_key().public_key(), issuer=sub_ca, key_usage=("sign_everything",))


@pytest.mark.parametrize(
    "cn",
    [
        "devices/../../etc/passwd",
        "dev#1+x",
        "bell\x07tab\tnl\nnul\x00",
        "$x",
        "ünïcödé-设备",
        "a" * 200,
        " ",
    ],
    ids=["slash", "hash-plus", "control", "dollar", "unicode", "200-chars", "space"],
)
def test_leaf_odd_common_names(sub_ca: Issuer, cn: str) -> None:
    leaf = make_leaf(cn, generate_key().public_key(), issuer=sub_ca, now=NOW)
    reparsed = x509.load_der_x509_certificate(leaf.public_bytes(serialization.Encoding.DER))
    if len(cn.encode()) > 64:
        # NB: cryptography warns (UserWarning) whenever an overlong CN is *parsed*; code reading
        # subjects of hostile certificates must tolerate that under filterwarnings=error.
        with pytest.warns(UserWarning, match="Attribute's length must be"):
            subject = reparsed.subject
    else:
        subject = reparsed.subject
    values = [attr.value for attr in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert values == [cn]
    reparsed.verify_directly_issued_by(sub_ca.cert)


def test_leaf_empty_subject(sub_ca: Issuer) -> None:
    leaf = make_leaf("", generate_key().public_key(), issuer=sub_ca, now=NOW)
    assert len(leaf.subject) == 0
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []


def test_leaf_name_subject_and_sans(root_ca: Issuer, sub_ca: Issuer) -> None:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "dev-x"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1"),
        ]
    )
    leaf = make_leaf(
        name,
        generate_key().public_key(),
        issuer=sub_ca,
        now=NOW,
        san_dns=("dev-x.example",),
        san_uri=("urn:jitp:device:dev-x",),
        san_ip=("10.0.0.1", "::1"),
    )
    assert leaf.subject == name
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev-x.example"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:jitp:device:dev-x"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    _client_verifier(root_ca.cert).verify(leaf, [sub_ca.cert])


def test_leaf_extra_extensions(sub_ca: Issuer) -> None:
    extra = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    critical_extra = x509.Extension(
        x509.ObjectIdentifier("1.3.6.1.4.1.55555.2"),
        True,
        x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.2"), b"\x05\x00"),
    )
    leaf = make_leaf(
        "x", generate_key().public_key(), issuer=sub_ca, now=NOW, extra_extensions=(extra, critical_extra)
    )
    first = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"))
    second = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.55555.2"))
    assert not first.critical and second.critical


def test_leaf_expired_window() -> None:
    then = NOW - timedelta(days=60)
    root_ca = make_ca("old root", key=generate_key(), now=then)
    sub_ca = make_ca("old sub", key=generate_key(), issuer=root_ca, now=then, path_length=0)
    leaf = make_leaf(
        "old",
        generate_key().public_key(),
        issuer=sub_ca,
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    )
    assert leaf.not_valid_after_utc < NOW
    with pytest.raises(VerificationError):
        _client_verifier(root_ca.cert, NOW).verify(leaf, [sub_ca.cert])
    # ... but it was fine while it was valid
    _client_verifier(root_ca.cert, NOW - timedelta(days=2)).verify(leaf, [sub_ca.cert])


def test_leaf_not_yet_valid(root_ca: Issuer, sub_ca: Issuer) -> None:
    leaf = make_leaf("future", generate_key().public_key(), issuer=sub_ca, now=NOW + timedelta(days=10))
    with pytest.raises(VerificationError):
        _client_verifier(root_ca.cert, NOW).verify(leaf, [sub_ca.cert])


def test_leaf_from_foreign_ca_rejected(root_ca: Issuer) -> None:
    other_root = make_ca("other root", key=generate_key(), now=NOW)
    other_sub = make_ca("test sub", key=generate_key(), issuer=other_root, now=NOW, path_length=0)
    leaf = make_leaf("dev-1", generate_key().public_key(), issuer=other_sub, now=NOW)
    with pytest.raises(VerificationError):
        _client_verifier(root_ca.cert).verify(leaf, [other_sub.cert])


# ---------------------------------------------------------------------------------------------------------
# server certs


def test_server_cert(root_ca: Issuer) -> None:
    key = generate_key()
    cert = make_server_cert(root_ca, key, now=NOW)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment
    _server_verifier(root_ca.cert, DNSName("localhost")).verify(cert, [])
    _server_verifier(root_ca.cert, IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(cert, [])
    with pytest.raises(VerificationError):
        _server_verifier(root_ca.cert, DNSName("evil.example")).verify(cert, [])


def test_server_cert_rsa_custom_hosts(root_ca: Issuer) -> None:
    key = generate_key("rsa")
    cert = make_server_cert(root_ca, key, hosts=("broker.example", "10.1.2.3"), now=NOW)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "broker.example"
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    _server_verifier(root_ca.cert, DNSName("broker.example")).verify(cert, [])
    with pytest.raises(ValueError):
        make_server_cert(root_ca, key, hosts=())


# ---------------------------------------------------------------------------------------------------------
# init_pki


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_init_pki_files_and_modes(tmp_path: Path, key_type: str) -> None:
    directory = tmp_path / "nested" / "pki"
    layout = init_pki(directory, key_type=key_type, now=NOW)
    assert layout == PkiLayout(directory)
    assert _mode(directory) == 0o700
    for path in layout.key_files():
        assert path.is_file(), path
        assert _mode(path) == 0o600, path
        key = load_key(path)
        assert isinstance(key, ec.EllipticCurvePrivateKey if key_type == "ec" else rsa.RSAPrivateKey)
    for path in layout.cert_files():
        assert path.is_file(), path
        assert _mode(path) == 0o644, path
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        p.name for p in (*layout.key_files(), *layout.cert_files())
    )

    root = load_certs(layout.root_cert)
    manufacturer = load_certs(layout.manufacturer_cert)
    service_ca = load_certs(layout.service_ca_cert)
    server = load_certs(layout.server_cert)
    client = load_certs(layout.service_client_cert)
    assert [len(root), len(manufacturer), len(service_ca), len(server), len(client)] == [1, 1, 1, 1, 2]

    def cn(cert: x509.Certificate) -> str:
        return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    assert cn(root[0]) == "jitp dev root CA"
    assert cn(manufacturer[0]) == "jitp manufacturer CA"
    assert cn(service_ca[0]) == "jitp service CA"
    assert cn(client[0]) == "ingest-service"
    assert client[1] == service_ca[0]
    for ca in (manufacturer[0], service_ca[0]):
        assert _ext(ca, x509.BasicConstraints).value.path_length == 0
        ca.verify_directly_issued_by(root[0])
    server[0].verify_directly_issued_by(root[0])

    # private keys match their certificates
    for cert_path, key_path in zip(layout.cert_files(), layout.key_files(), strict=True):
        load_issuer(cert_path, key_path)

    _server_verifier(root[0], DNSName("localhost")).verify(server[0], [])
    _client_verifier(root[0]).verify(client[0], client[1:])
    assert list(_ext(client[0], x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _ext(client[0], x509.KeyUsage).value.digital_signature

    root_before = layout.root_key.read_bytes()
    with pytest.raises(FileExistsError, match=r"root-ca\.key"):
        init_pki(directory, key_type=key_type, now=NOW)
    assert layout.root_key.read_bytes() == root_before


def test_init_pki_force_regenerates(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", now=NOW)
    old_root = load_certs(layout.root_cert)[0]
    init_pki(tmp_path / "pki", now=NOW, force=True)
    assert load_certs(layout.root_cert)[0] != old_root
    assert _mode(layout.root_key) == 0o600


def test_init_pki_bad_key_type_touches_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        init_pki(tmp_path / "pki", key_type="dsa")
    assert not (tmp_path / "pki").exists()


def test_load_issuer_chain_excludes_root(tmp_path: Path, root_ca: Issuer, sub_ca: Issuer) -> None:
    low = make_ca("low", key=generate_key(), issuer=sub_ca, now=NOW)
    write_certs(tmp_path / "low.pem", [low.cert, sub_ca.cert, root_ca.cert])
    write_key(tmp_path / "low.key", low.key)
    loaded = load_issuer(tmp_path / "low.pem", tmp_path / "low.key")
    assert loaded.cert == low.cert
    assert loaded.chain == (sub_ca.cert,)
    write_key(tmp_path / "wrong.key", generate_key())
    with pytest.raises(ValueError, match="does not match"):
        load_issuer(tmp_path / "low.pem", tmp_path / "wrong.key")


# ---------------------------------------------------------------------------------------------------------
# device issuance


def _check_devices(
    files: list[DeviceFiles], out: Path, ids: list[str], issuer: Issuer, root: x509.Certificate
) -> None:
    assert [f.device_id for f in files] == ids
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["issuer_fingerprint"] == fingerprint(issuer.cert)
    assert [d["device_id"] for d in manifest["devices"]] == ids
    verifier = _client_verifier(root)
    for entry, df in zip(manifest["devices"], files, strict=True):
        assert df.cert_path == out / f"{df.device_id}.pem" == out / entry["cert"]
        assert df.key_path == out / f"{df.device_id}.key" == out / entry["key"]
        assert _mode(df.key_path) == 0o600
        certs = load_certs(df.cert_path)
        leaf = certs[0]
        assert certs[1:] == [issuer.cert, *issuer.chain]
        assert root not in certs
        assert fingerprint(leaf) == entry["fingerprint"]
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == df.device_id
        assert _ext(leaf, x509.BasicConstraints).value.ca is False
        ku = _ext(leaf, x509.KeyUsage).value
        assert ku.digital_signature and not ku.key_cert_sign
        assert list(_ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        key = load_key(df.key_path)
        assert key.public_key() == leaf.public_key()
        verifier.verify(leaf, certs[1:])


def test_issue_devices_inline(tmp_path: Path, root_ca: Issuer, sub_ca: Issuer) -> None:
    out = tmp_path / "out"
    files = issue_devices(sub_ca, 5, out, now=NOW)
    ids = [f"dev-{i:05d}" for i in range(1, 6)]
    _check_devices(files, out, ids, sub_ca, root_ca.cert)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(f"{i}.pem" for i in ids), *(f"{i}.key" for i in ids)]
    )


def test_issue_devices_prefix_start_width_rsa(tmp_path: Path, root_ca: Issuer, sub_ca: Issuer) -> None:
    files = issue_devices(sub_ca, 2, tmp_path, prefix="sensor_", start=98, width=3, key_type="rsa", now=NOW)
    _check_devices(files, tmp_path, ["sensor_098", "sensor_099"], sub_ca, root_ca.cert)
    assert isinstance(load_key(files[0].key_path), rsa.RSAPrivateKey)


def test_issue_devices_deep_chain(tmp_path: Path, root_ca: Issuer) -> None:
    mid = make_ca("mid", key=generate_key(), issuer=root_ca, now=NOW, path_length=1)
    low = make_ca("low", key=generate_key(), issuer=mid, now=NOW, path_length=0)
    files = issue_devices(low, 2, tmp_path, now=NOW)
    _check_devices(files, tmp_path, ["dev-00001", "dev-00002"], low, root_ca.cert)
    assert len(load_certs(files[0].cert_path)) == 3


def test_issue_devices_overwrites(tmp_path: Path, sub_ca: Issuer) -> None:
    first = issue_devices(sub_ca, 2, tmp_path, now=NOW)
    old = first[0].cert_path.read_bytes()
    first[0].key_path.chmod(0o644)
    second = issue_devices(sub_ca, 2, tmp_path, now=NOW)
    assert second == first
    assert second[0].cert_path.read_bytes() != old
    assert _mode(second[0].key_path) == 0o600


def test_issue_devices_zero_and_invalid(tmp_path: Path, sub_ca: Issuer) -> None:
    assert issue_devices(sub_ca, 0, tmp_path / "empty", now=NOW) == []
    manifest = json.loads((tmp_path / "empty" / "manifest.json").read_text())
    assert manifest["devices"] == []
    with pytest.raises(ValueError):
        issue_devices(sub_ca, -1, tmp_path)
    with pytest.raises(ValueError):
        issue_devices(sub_ca, 1, tmp_path, prefix="../escape-")
    with pytest.raises(ValueError):
        issue_devices(sub_ca, 1, tmp_path, key_type="dsa")
    assert not list(tmp_path.glob("*.key"))


def test_issue_from_pki_process_pool(tmp_path: Path, ec_pki: PkiLayout) -> None:
    out = tmp_path / "devices"
    files = issue_from_pki(ec_pki, 300, out, workers=2, now=NOW)
    ids = [f"dev-{i:05d}" for i in range(1, 301)]
    issuer = load_issuer(ec_pki.manufacturer_cert, ec_pki.manufacturer_key)
    assert issuer.chain == ()
    root = load_certs(ec_pki.root_cert)[0]
    _check_devices(files, out, ids, issuer, root)
    serials = {load_certs(f.cert_path)[0].serial_number for f in files}
    assert len(serials) == 300
