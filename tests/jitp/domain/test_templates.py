"""Enrollment templates (jitp/domain/templates.py) without a broker: loading and strict validation,
certificate sources, and properties of rendering and namespaces (untrusted certificate values).

The broker-level behaviour (events, retained config, enforcement) is in
tests/broker_plugins/test_templates_e2e.py.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

import certs
from jitp import errors
from jitp.domain.acl import Access, Namespace, filter_within, topic_matches
from jitp.domain.identity import id_problem
from jitp.domain.templates import (
    DEFAULT_TEMPLATE,
    EnrollmentTemplate,
    Profile,
    ReprovisionPolicy,
    Source,
    TemplateSet,
    load_template,
)
from jitp.trust import VerifiedChain, fingerprint_der
from tests.jitp import pkitools

ROOT_DIR = Path(__file__).resolve().parents[3]
SMART_METER = ROOT_DIR / "config" / "templates" / "smart-meter.yaml"
CAPS_OID = "1.3.6.1.4.1.57264.1.1"
CUSTOM_SUBJECT_OID = "1.3.6.1.4.1.57264.2.7"

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write(directory: Path, stem: str, text: str) -> Path:
    path = directory / f"{stem}.yaml"
    path.write_text(text)
    return path


def marked_line(text: str) -> int:
    """1-based number of the line carrying the ``# <-`` marker."""
    [line] = [i for i, ln in enumerate(text.splitlines(), 1) if "# <-" in ln]
    return line


def der_string(value: str, tag: int = 0x0C) -> bytes:
    """A DER string (UTF8String by default), long-form length when needed."""
    body = value.encode("utf-16-be" if tag == 0x1E else "utf-8")
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def custom_ext(oid: str, value: str, tag: int = 0x0C) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), der_string(value, tag))


def chain_for(cert: x509.Certificate) -> VerifiedChain:
    """A VerifiedChain for ``cert`` without path validation: rendering must cope with any certificate
    a verifier could let through, so the properties below do not depend on what verification refuses."""
    der = cert.public_bytes(Encoding.DER)
    return VerifiedChain(
        leaf=cert,
        leaf_der=der,
        fingerprint=fingerprint_der(der),
        anchor=pkitools.MANUFACTURER_ANCHOR,
        chain=(cert, pkitools.MANUFACTURER.cert),
    )


# -- loading: the shipped template ------------------------------------------------------------------------
def test_shipped_smart_meter_template_loads_every_key() -> None:
    t = load_template(SMART_METER)
    assert t.name == "smart-meter" and t.version == 1
    assert t.id_rule.source == Source("subject.CN")
    assert t.id_rule.regex is not None and t.id_rule.regex.pattern == "^SM-(?P<serial>[0-9a-f]{8})$"
    assert t.id_rule.format == "meter-{serial}"
    attrs = {a.name: a for a in t.attributes}
    assert list(attrs) == ["type", "vendor", "location", "capabilities"]
    assert attrs["type"].value == "smart-meter" and attrs["type"].source is None
    assert attrs["vendor"].source == Source("subject.O") and attrs["vendor"].required
    assert attrs["location"].source == Source("subject.L") and not attrs["location"].required
    assert attrs["capabilities"].source == Source(f"ext:{CAPS_OID}") and not attrs["capabilities"].required
    assert t.region is None  # from the CA registration
    assert t.publish == ("meters/{region}/{device_id}/#",)
    assert t.subscribe == ("meters/{region}/{device_id}/cmd/#",)
    assert t.profile == Profile(
        keepalive_min=30,
        keepalive_max=300,
        max_qos=1,
        max_message_size=4096,
        rate_messages=10,
        rate_seconds=1.0,
        hints=MappingProxyType({"endpoint": "eu-west.mqtt.example.com", "lora_profile": "EU868"}),
    )
    assert t.profile.to_json()["rate_limit"] == {"messages": 10, "per_seconds": 1.0}
    assert t.reprovision is ReprovisionPolicy.ROTATE
    # And it renders what its comments promise.
    subject = pkitools.name((NameOID.COMMON_NAME, "SM-00a1b2c3"), (NameOID.ORGANIZATION_NAME, "Acme Meters"))
    cert = pkitools.leaf(subject, extra_extensions=(custom_ext(CAPS_OID, "water,power"),))
    ident = t.render(pkitools.verify(pkitools.chain_of(cert)), default_region="default")
    assert ident.device_id == "meter-00a1b2c3"
    assert ident.region == "eu-west"  # the manufacturer anchor's region
    assert dict(ident.attributes) == {
        "type": "smart-meter",
        "vendor": "Acme Meters",
        "capabilities": "water,power",
    }
    assert ident.template == "smart-meter" and ident.template_version == 1


def test_template_set_loads_the_config_directory(tmp_path: Path) -> None:
    templates = TemplateSet.load(SMART_METER.parent)
    assert templates.names() == ["default", "smart-meter"]
    assert templates.get(None) is DEFAULT_TEMPLATE
    with pytest.raises(errors.TemplateNotFound):
        templates.get("nope")
    assert TemplateSet.load(tmp_path / "missing").names() == ["default"]


def test_minimal_template_takes_the_defaults(tmp_path: Path) -> None:
    t = load_template(write(tmp_path, "bare", "version: 2\n"))
    assert t.name == "bare" and t.version == 2
    assert t.publish == DEFAULT_TEMPLATE.publish and t.subscribe == DEFAULT_TEMPLATE.subscribe
    assert t.id_rule == DEFAULT_TEMPLATE.id_rule and t.profile == Profile()
    assert t.reprovision is ReprovisionPolicy.REJECT and t.attributes == () and t.region is None


# -- loading: strict validation, file:line and key --------------------------------------------------------
# Each body marks the offending line with "# <-"; the file is "<stem>.yaml" with stem "t".
BAD = [
    # unknown keys, at every level
    ("version: 1\nbogus: 1  # <-\n", "bogus", "unknown key"),
    ("device_id:\n  from: subject.CN\n  bogus: x  # <-\n", "device_id.bogus", "unknown key"),
    ("attributes:\n  vendor: {from: subject.O, bogus: 1}  # <-\n", "attributes.vendor.bogus", "unknown key"),
    (
        "namespace:\n  publish: ['d/{device_id}/#']\n  bogus: []  # <-\n",
        "namespace.bogus",
        "unknown key",
    ),
    ("profile:\n  max_qos: 1\n  bogus: 1  # <-\n", "profile.bogus", "unknown key"),
    ("profile:\n  keepalive: {min: 1, mean: 3}  # <-\n", "profile.keepalive.mean", "unknown key"),
    (
        "profile:\n  rate_limit: {messages: 1, per_minute: 3}  # <-\n",
        "profile.rate_limit.per_minute",
        "unknown key",
    ),
    ("version: 1\nversion: 2  # <-\n", "version", "duplicate key"),
    # regular expressions
    ("device_id:\n  regex: '^(?P<id>[a-z'  # <-\n", "device_id.regex", "bad regular expression"),
    ("device_id:\n  regex: '(unclosed'  # <-\n", "device_id.regex", "bad regular expression"),
    # placeholders in namespace patterns
    (
        "namespace:\n  publish: ['d/{device_id}/{tenant}/#']  # <-\n",
        "namespace.publish",
        "unknown placeholder",
    ),
    (
        "namespace:\n  subscribe: ['d/{device_id}/{attributes}']  # <-\n",
        "namespace.subscribe",
        "unknown placeholder",
    ),
    (
        "namespace:\n  publish: ['d/{device_id}/{attributes.a.b}']  # <-\n",
        "namespace.publish",
        "unknown placeholder",
    ),
    (
        "namespace:\n  publish: ['d/{device_id}/{device_id.x}']  # <-\n",
        "namespace.publish",
        "unknown placeholder",
    ),
    ("namespace:\n  publish: ['d/{device_id}/{}']  # <-\n", "namespace.publish", "unknown placeholder"),
    ("namespace:\n  publish: ['d/{device_id}/{0}']  # <-\n", "namespace.publish", "unknown placeholder"),
    # placeholders in the id format
    (
        "device_id:\n  regex: '^(?P<serial>.+)$'\n  format: 'm-{serial}-{batch}'  # <-\n",
        "device_id.format",
        "unknown placeholder",
    ),
    ("device_id:\n  format: 'm-{serial}'  # <-\n", "device_id.format", "unknown placeholder"),
    ("device_id:\n  format: 'm-{value.upper}'  # <-\n", "device_id.format", "unknown placeholder"),
    # patterns that would not keep devices apart, or are not filters outside $-topics
    ("namespace:\n  publish: ['d/{region}/#']  # <-\n", "namespace.publish", "must contain {device_id}"),
    ("namespace:\n  publish: ['']  # <-\n", "namespace.publish", "must contain {device_id}"),
    ("namespace:\n  publish: ['d/x{device_id}/#']  # <-\n", "namespace.publish", "whole topic level"),
    (
        "namespace:\n  subscribe: ['d/{device_id}{region}']  # <-\n",
        "namespace.subscribe",
        "whole topic level",
    ),
    ("namespace:\n  publish: ['$SYS/{device_id}/#']  # <-\n", "namespace.publish", "outside $-topics"),
    (
        "namespace:\n  subscribe: ['$jitp/events/{device_id}']  # <-\n",
        "namespace.subscribe",
        "outside $-topics",
    ),
    (
        "namespace:\n  publish: ['d/{device_id}/#/x']  # <-\n",
        "namespace.publish",
        "not a valid MQTT topic filter",
    ),
    (
        "namespace:\n  publish: ['d/{device_id}/a+']  # <-\n",
        "namespace.publish",
        "not a valid MQTT topic filter",
    ),
    (
        "namespace:\n  publish: ['#/{device_id}']  # <-\n",
        "namespace.publish",
        "not a valid MQTT topic filter",
    ),
    ("namespace:\n  publish: {a: 1}  # <-\n", "namespace.publish", "expected a list"),
    # values
    ("reprovision: maybe  # <-\n", "reprovision", "must be reject, rotate or reset"),
    ("name: other  # <-\n", "name", "must match the file name 't'"),
    ("profile:\n  keepalive: {min: 300, max: 30}  # <-\n", "profile.keepalive", "min must not exceed max"),
    ("profile:\n  keepalive: {min: 4000}  # <-\n", "profile.keepalive", "min must not exceed max"),
    ("profile:\n  max_qos: 3  # <-\n", "profile.max_qos", "[0, 2]"),
    ("profile:\n  max_qos: true  # <-\n", "profile.max_qos", "[0, 2]"),
    ("profile:\n  max_message_size: 0  # <-\n", "profile.max_message_size", "must be"),
    ("profile:\n  rate_limit: {per_seconds: 0}  # <-\n", "profile.rate_limit.per_seconds", "must be"),
    ("profile:\n  hints: [a, b]  # <-\n", "profile.hints", "expected a mapping"),
    ("version: '2'  # <-\n", "version", "positive integer"),
    ("version: 1.5  # <-\n", "version", "positive integer"),
    ("version: true  # <-\n", "version", "positive integer"),
    ("version: 0  # <-\n", "version", "positive integer"),
    ("attributes:\n  vendor: {value: x, from: subject.O}  # <-\n", "attributes.vendor", "exactly one"),
    ("attributes:\n  vendor: {required: true}  # <-\n", "attributes.vendor", "exactly one"),
    (
        "attributes:\n  v: {from: subject.O, required: sometimes}  # <-\n",
        "attributes.v.required",
        "true or false",
    ),
    ("attributes:\n  a/b: x  # <-\n", "attributes.a/b", "safe identifiers"),
    ("attributes: [a, b]  # <-\n", "attributes", "expected a mapping"),
    ("region: eu/west  # <-\n", "region", "safe topic level"),
    # source expressions
    ("device_id:\n  from: subject.XX  # <-\n", "device_id.from", "unknown source"),
    ("device_id:\n  from: subject.3.1  # <-\n", "device_id.from", "unknown source"),
    ("device_id:\n  from: cn  # <-\n", "device_id.from", "unknown source"),
    ("attributes:\n  v: {from: san.phone}  # <-\n", "attributes.v.from", "unknown source"),
    ("attributes:\n  v: {from: 'ext:caps'}  # <-\n", "attributes.v.from", "unknown source"),
    ("attributes:\n  v: {from: serial.number}  # <-\n", "attributes.v.from", "unknown source"),
    # claim sections (claim certificates)
    ("claim:\n  device_id: 'm-{s}'  # <-\n", "claim", "needs 'parameters' and 'device_id'"),
    (
        "claim:\n  parameters: {s: {}}\n  device_id: 'm-{t}'  # <-\n",
        "claim.device_id",
        "unknown placeholder {t}",
    ),
    (
        "claim:\n  parameters: {s: {}}\n  device_id: 'fixed'  # <-\n",
        "claim.device_id",
        "at least one parameter",
    ),
    (
        "claim:\n  parameters: {s: {required: false}}\n  device_id: 'm-{s}'  # <-\n",
        "claim.device_id",
        "only required ones",
    ),
    (
        "claim:\n  parameters: {s: {regex: '(a'}}  # <-\n  device_id: 'm-{s}'\n",
        "claim.parameters.s.regex",
        "bad regular",
    ),
    (
        "claim:\n  parameters: {s: {colour: red}}  # <-\n  device_id: 'm-{s}'\n",
        "claim.parameters.s.colour",
        "unknown key",
    ),
]


@pytest.mark.parametrize(("body", "key", "message"), BAD, ids=[f"{k}:{m}" for _, k, m in BAD])
def test_invalid_templates_name_file_line_and_key(tmp_path: Path, body: str, key: str, message: str) -> None:
    path = write(tmp_path, "t", body)
    with pytest.raises(errors.ConfigError) as info:
        load_template(path)
    exc = info.value
    assert exc.key == key
    assert exc.where == f"{path}:{marked_line(body)}"
    assert message in exc.problem
    assert str(exc).startswith(f"{path}:{marked_line(body)}: {key}: ")
    # The directory loader fails the same way (a broken template is never silently skipped).
    with pytest.raises(errors.ConfigError):
        TemplateSet.load(tmp_path)


@pytest.mark.parametrize("body", ["", "\n\n", "# nothing but a comment\n"])
def test_empty_template_is_an_error(tmp_path: Path, body: str) -> None:
    path = write(tmp_path, "t", body)
    with pytest.raises(errors.ConfigError, match="empty template") as info:
        load_template(path)
    assert info.value.where == str(path)


@pytest.mark.parametrize("body", ["name: [unclosed\n", "a: b: c\n", "device_id:\n  from: x\n bad: indent\n"])
def test_invalid_yaml_is_an_error(tmp_path: Path, body: str) -> None:
    path = write(tmp_path, "t", body)
    with pytest.raises(errors.ConfigError, match="invalid YAML") as info:
        load_template(path)
    assert info.value.where.startswith(f"{path}:")  # with the line
    assert "\n" not in str(info.value)


def test_top_level_must_be_a_mapping_and_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="expected a mapping"):
        load_template(write(tmp_path, "t", "- a\n- b\n"))
    for body in ("---\n", "~\n", "just a string\n"):  # a document that is no mapping
        with pytest.raises(errors.ConfigError):
            load_template(write(tmp_path, "t", body))
    with pytest.raises(errors.ConfigError, match="cannot read template"):
        load_template(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "pattern",
    [
        "{region:$>5}/{device_id}/#",  # renders '$jitp/events/#' for region 'jitp', device 'events'
        "{attributes.kind:$>5}/{device_id}/#",  # the same from a certificate field
        "d/{device_id}/{region!r}",
    ],
)
def test_placeholders_take_no_format_spec_or_conversion(tmp_path: Path, pattern: str) -> None:
    body = f"attributes:\n  kind: {{from: subject.O}}\nnamespace:\n  publish: ['{pattern}']  # <-\n"
    with pytest.raises(errors.ConfigError) as info:
        load_template(write(tmp_path, "t", body))
    assert info.value.key == "namespace.publish"


@pytest.mark.parametrize("name", ["_attrs", "__class__", "__dict__", "undeclared"])
def test_attribute_placeholders_must_name_declared_attributes(tmp_path: Path, name: str) -> None:
    body = (
        "attributes:\n  vendor: {from: subject.O}\n"
        f"namespace:\n  publish: ['d/{{device_id}}/{{attributes.{name}}}']  # <-\n"
    )
    with pytest.raises(errors.ConfigError) as info:
        load_template(write(tmp_path, "t", body))
    assert info.value.key == "namespace.publish"


def test_raw_attribute_values_never_reach_a_filter(tmp_path: Path) -> None:
    body = "attributes:\n  vendor: {from: subject.O}\nnamespace:\n  publish: ['{attributes._attrs}/{device_id}/#']\n"
    try:
        t = load_template(write(tmp_path, "t", body))
    except errors.ConfigError:
        return  # refusing the pattern at load time is the better fix
    ns = t.namespace("d1", "eu", {"vendor": "x/+/#"})
    assert all("x/+/#" not in f for f in ns.publish + ns.subscribe)


# -- sources --------------------------------------------------------------------------------------------
SUBJECT = [
    (NameOID.COMMON_NAME, "dev-0001"),
    (NameOID.ORGANIZATION_NAME, "Acme Meters"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "Water"),
    (NameOID.LOCALITY_NAME, "Lyon"),
    (NameOID.STATE_OR_PROVINCE_NAME, "Rhone"),
    (NameOID.COUNTRY_NAME, "FR"),
    (NameOID.SERIAL_NUMBER, "SN-42"),
    (x509.ObjectIdentifier(CUSTOM_SUBJECT_OID), "batch-7"),
]
LONG_VALUE = "cap-" + "x" * 296  # > 255 bytes: two-byte DER length


@pytest.fixture(scope="module")
def rich_chain() -> VerifiedChain:
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("a.example"),
            x509.DNSName("b.example"),
            x509.UniformResourceIdentifier("urn:dev:0001"),
            x509.RFC822Name("dev-0001@example.com"),
            x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        ]
    )
    cert = pkitools.leaf(
        pkitools.name(*SUBJECT),
        serial=0xABCDEF0123,
        extra_extensions=(
            san,
            custom_ext(CAPS_OID, "water,power"),
            custom_ext("1.3.6.1.4.1.57264.1.2", LONG_VALUE),
            custom_ext("1.3.6.1.4.1.57264.1.3", "PRINTABLE 1", tag=0x13),
            custom_ext("1.3.6.1.4.1.57264.1.4", "ia5@x", tag=0x16),
            custom_ext("1.3.6.1.4.1.57264.1.5", "bmp é", tag=0x1E),
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.6"), b"raw text"),
        ),
    )
    return pkitools.verify(pkitools.chain_of(cert))  # a real path validation: these certificates are usable


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("subject.CN", ["dev-0001"]),
        ("subject.2.5.4.3", ["dev-0001"]),
        ("subject.O", ["Acme Meters"]),
        ("subject.2.5.4.10", ["Acme Meters"]),
        ("subject.OU", ["Water"]),
        ("subject.L", ["Lyon"]),
        ("subject.ST", ["Rhone"]),
        ("subject.C", ["FR"]),
        ("subject.serialNumber", ["SN-42"]),
        (f"subject.{CUSTOM_SUBJECT_OID}", ["batch-7"]),
        ("subject.2.5.4.12", []),  # title: absent
        ("san.dns", ["a.example", "b.example"]),
        ("san.uri", ["urn:dev:0001"]),
        ("san.email", ["dev-0001@example.com"]),
        ("san.ip", ["192.0.2.7", "2001:db8::1"]),
        ("serial", ["abcdef0123"]),
        (f"ext:{CAPS_OID}", ["water,power"]),
        ("ext:1.3.6.1.4.1.57264.1.2", [LONG_VALUE]),
        ("ext:1.3.6.1.4.1.57264.1.3", ["PRINTABLE 1"]),
        ("ext:1.3.6.1.4.1.57264.1.4", ["ia5@x"]),
        ("ext:1.3.6.1.4.1.57264.1.5", ["bmp é"]),
        ("ext:1.3.6.1.4.1.57264.1.6", ["raw text"]),
        ("ext:1.3.6.1.4.1.57264.1.99", []),
    ],
)
def test_sources_extract_certificate_values(
    rich_chain: VerifiedChain, expr: str, expected: list[str]
) -> None:
    assert Source(expr).values(rich_chain) == expected


def test_fingerprint_source_and_missing_san(rich_chain: VerifiedChain) -> None:
    assert Source("fingerprint").values(rich_chain) == [certs.fingerprint(rich_chain.leaf)]
    assert Source("fingerprint").values(rich_chain) == [rich_chain.fingerprint]
    plain = pkitools.verified_device("plain-1")
    for kind in ("dns", "uri", "email", "ip"):
        assert Source(f"san.{kind}").values(plain) == []
    assert Source(f"ext:{CAPS_OID}").values(plain) == []


def test_a_template_maps_every_source_kind_into_attributes(tmp_path: Path, rich_chain: VerifiedChain) -> None:
    body = (
        "device_id: {from: san.uri, regex: '^urn:dev:(?P<id>[0-9]+)$', format: 'unit-{id}'}\n"
        "attributes:\n"
        "  cn: {from: subject.CN}\n"
        f"  batch: {{from: subject.{CUSTOM_SUBJECT_OID}}}\n"
        "  host: {from: san.dns}\n"
        "  mail: {from: san.email}\n"
        "  ip: {from: san.ip}\n"
        "  serial: {from: serial}\n"
        "  fp: {from: fingerprint}\n"
        f"  caps: {{from: 'ext:{CAPS_OID}'}}\n"
        "  title: {from: subject.2.5.4.12, required: false}\n"
        "  tier: gold\n"
    )
    t = load_template(write(tmp_path, "every", body))
    ident = t.render(rich_chain, default_region="default")
    assert ident.device_id == "unit-0001"
    assert dict(ident.attributes) == {
        "cn": "dev-0001",
        "batch": "batch-7",
        "host": "a.example",  # the first value
        "mail": "dev-0001@example.com",
        "ip": "192.0.2.7",
        "serial": "abcdef0123",
        "fp": rich_chain.fingerprint,
        "caps": "water,power",
        "tier": "gold",
    }
    assert ident.serial == "abcdef0123" and ident.cert_fingerprint == rich_chain.fingerprint


def test_attribute_values_that_are_not_printable_text_are_refused(tmp_path: Path) -> None:
    t = load_template(write(tmp_path, "v", "attributes:\n  vendor: {from: subject.O}\n"))
    for bad in ("Acme\x00Meters", "x" * 257, "line\nbreak"):
        chain = chain_for(
            pkitools.leaf(pkitools.name((NameOID.COMMON_NAME, "d1"), (NameOID.ORGANIZATION_NAME, bad)))
        )
        with pytest.raises(errors.MissingAttribute) as info:
            t.render(chain, default_region="default")
        assert info.value.detail == "vendor"
    missing = chain_for(pkitools.leaf("d1"))
    with pytest.raises(errors.MissingAttribute, match="vendor"):
        t.render(missing, default_region="default")


EXT_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)


@FAST
@given(value=EXT_TEXT, org=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=80))
def test_custom_extension_and_subject_values_round_trip(value: str, org: str) -> None:
    cert = pkitools.leaf(
        pkitools.name((NameOID.COMMON_NAME, "d1"), (NameOID.ORGANIZATION_NAME, org)),
        extra_extensions=(custom_ext(CAPS_OID, value),),
    )
    chain = chain_for(cert)
    assert Source(f"ext:{CAPS_OID}").values(chain) == [value]
    assert Source("subject.O").values(chain) == [org]
    assert Source("subject.2.5.4.10").values(chain) == [org]


# -- property: rendering never yields an unsafe id ---------------------------------------------------------
RENDER_TEMPLATES = {
    "regex-format.yaml": (
        "device_id:\n"
        "  regex: '^(?P<a>[^-]*)-(?P<b>.*)$'\n"
        "  format: '{b}.{a}'\n"  # any text in both groups: the result must still be checked
    ),
    "prefix-format.yaml": "device_id:\n  format: 'dev-{value}'\n",
    "uri.yaml": (
        "device_id:\n"
        "  from: san.uri\n"
        "  regex: '^urn:dev:(?P<id>.*)$'\n"
        "attributes:\n"
        "  cn: {from: subject.CN, required: false}\n"
    ),
}


@pytest.fixture(scope="module")
def render_templates(tmp_path_factory: pytest.TempPathFactory) -> list[EnrollmentTemplate]:
    directory = tmp_path_factory.mktemp("render-templates")
    for file, body in RENDER_TEMPLATES.items():
        (directory / file).write_text(body)
    loaded = TemplateSet.load(directory)
    return [DEFAULT_TEMPLATE, load_template(SMART_METER), *(loaded.get(f[:-5]) for f in RENDER_TEMPLATES)]


HOSTILE = "/+#$\x00\x01\x1b\t\n \u200b\u202e\u2028\ufeff\ue000-.:aZ09é"
PLAUSIBLE = st.text(st.sampled_from(string.ascii_lowercase + string.digits + "-.é"), min_size=1, max_size=20)
HOSTILE_TEXT = st.one_of(
    st.text(st.sampled_from(HOSTILE), max_size=40),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=200),
    PLAUSIBLE,
    st.builds(
        lambda s: "SM-" + s, st.text(st.sampled_from("0123456789abcdef/+#$\x00"), min_size=7, max_size=9)
    ),
    st.builds(lambda s: "SM-" + s, st.text(st.sampled_from("0123456789abcdef"), min_size=8, max_size=8)),
    st.sampled_from(
        ["", "$", "#", "+", "/", "a/b", "$SYS", "x" * 129, "é" * 100, "ok-device", "SM-00a1b2c3"]
    ),
)
ASCII_HOSTILE = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=60)
ASCII_PLAUSIBLE = st.text(
    st.sampled_from(string.ascii_lowercase + string.digits + "-."), min_size=1, max_size=20
)


@FAST
@given(
    cns=st.lists(HOSTILE_TEXT, min_size=0, max_size=2),
    uris=st.lists(
        st.builds(lambda s: "urn:dev:" + s, ASCII_HOSTILE | ASCII_PLAUSIBLE) | ASCII_HOSTILE, max_size=2
    ),
    org=st.none() | PLAUSIBLE | HOSTILE_TEXT,
)
@example(cns=["SM-00a1b2c3"], uris=["urn:dev:abc"], org="Acme")
@example(cns=["SM-00a1b2c3"], uris=["urn:dev:a/b"], org="Acme\x00")
@example(cns=["abc-def"], uris=["urn:dev:$x"], org=None)
@pytest.mark.parametrize(
    "which", range(5), ids=["default", "smart-meter", "regex-format", "prefix-format", "uri"]
)
def test_rendering_yields_a_safe_id_or_a_refusal(
    render_templates: list[EnrollmentTemplate], which: int, cns: list[str], uris: list[str], org: str | None
) -> None:
    template = render_templates[which]
    san = (x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),) if uris else ()
    subject = [(NameOID.COMMON_NAME, cn) for cn in cns]
    if org is not None:
        subject.append((NameOID.ORGANIZATION_NAME, org))
    cert = pkitools.leaf(pkitools.name(*subject), extra_extensions=san)
    try:
        ident = template.render(chain_for(cert), default_region="default")
    except errors.Refused as exc:
        assert exc.reason in errors.REFUSAL_REASONS
        event(f"template {template.name}: refused ({exc.reason})")
        return
    event(f"template {template.name}: rendered")
    assert id_problem(ident.device_id) is None
    assert ident.region == "eu-west"
    ns = template.namespace(ident.device_id, ident.region, dict(ident.attributes))
    assert ns.publish, "a rendered identity always has a namespace"


@pytest.mark.parametrize(
    ("device_id", "cn"),
    [
        ("  regex: '^(?:(?P<a>[a-z]+)-)?(?P<b>.*)$'\n  format: '{a}.{b}'\n", "abc"),  # KeyError: 'a'
        ("  format: 'x-{value:d}'\n", "abc"),  # ValueError: unknown format code
    ],
)
def test_render_errors_are_refusals(tmp_path: Path, device_id: str, cn: str) -> None:
    try:
        t = load_template(write(tmp_path, "t", "device_id:\n" + device_id))
    except errors.ConfigError:
        return  # catching the bad format at load time is fine too
    try:
        ident = t.render(pkitools.verified_device(cn), default_region="default")
    except errors.Refused:
        return  # refused with a reason: fine
    # A group that did not take part renders as empty; the result is still a safe id.
    assert id_problem(ident.device_id) is None


# -- property: namespaces never escape {device_id} ---------------------------------------------------------
NS_TEMPLATES = {
    "tenant.yaml": (
        "attributes:\n"
        "  tenant: {from: subject.O}\n"
        "  site: {from: subject.L, required: false}\n"
        "namespace:\n"
        "  publish: ['fleet/{attributes.tenant}/{device_id}/#', 'telemetry/+/{device_id}',"
        " 'sites/{attributes.site}/{region}/{device_id}']\n"
        "  subscribe: ['fleet/{attributes.tenant}/{device_id}/cmd/#', 'broadcast/{region}/{device_id}/+']\n"
    ),
}
SAFE_ID_CHARS = string.ascii_letters + string.digits + "-_.:@é$"
SAFE_ID = st.one_of(
    st.text(st.sampled_from(SAFE_ID_CHARS), min_size=1, max_size=20),
    st.text(
        st.characters(exclude_categories=("Cs", "Cc", "Cf", "Co", "Cn", "Zl", "Zp", "Zs")),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from(
        ["events", "admin", "jitp", "devices", "cmd", "status", "config", "fleet", "meters", "eu-west"]
    ),
).filter(lambda s: id_problem(s) is None)
ATTR_VALUE = st.one_of(SAFE_ID, HOSTILE_TEXT)
EVIL_TOPICS = [
    "$jitp/events",
    "$jitp/events/provisioned/victim",
    "$jitp/events/x/y/z",
    "$jitp/admin",
    "$jitp/admin/devices/victim/disable",
]


@pytest.fixture(scope="module")
def ns_templates(tmp_path_factory: pytest.TempPathFactory) -> list[EnrollmentTemplate]:
    directory = tmp_path_factory.mktemp("ns-templates")
    for file, body in NS_TEMPLATES.items():
        (directory / file).write_text(body)
    return [DEFAULT_TEMPLATE, load_template(SMART_METER), load_template(directory / "tenant.yaml")]


def sample_topics(topic_filter: str) -> Iterator[str]:
    """Concrete topics matched by ``topic_filter`` (wildcards replaced, '#' also matching its parent)."""
    levels = topic_filter.split("/")
    for fill in ("x", "cmd", "#"):
        out: list[str] = []
        for level in levels:
            if level == "+":
                out.append("w" if fill == "#" else fill)
            elif level == "#":
                if fill == "#":
                    break  # "a/#" matches "a"
                out += [fill, "y", "z"]
            else:
                out.append(level)
        if out:
            yield "/".join(out)


def attrs_for(names: list[str], values: list[str]) -> dict[str, str]:
    return dict(zip(names, values, strict=False))


@FAST
@pytest.mark.parametrize("which", range(3), ids=["default", "smart-meter", "tenant"])
@given(
    d=SAFE_ID,
    e=SAFE_ID,
    region_d=SAFE_ID,
    region_e=SAFE_ID,
    values_d=st.lists(ATTR_VALUE, min_size=1, max_size=2),
    values_e=st.lists(ATTR_VALUE, min_size=1, max_size=2),
)
def test_namespaces_never_escape_the_device_id(
    ns_templates: list[EnrollmentTemplate],
    which: int,
    d: str,
    e: str,
    region_d: str,
    region_e: str,
    values_d: list[str],
    values_e: list[str],
) -> None:
    assume(d != e)
    template = ns_templates[which]
    names = ["tenant", "site"]
    ns_d = template.namespace(d, region_d, attrs_for(names, values_d))
    ns_e = template.namespace(e, region_e, attrs_for(names, values_e))
    mine = ns_d.publish + ns_d.subscribe
    event("no access" if not mine else "namespace")
    theirs = ns_e.publish + ns_e.subscribe
    for f in mine:
        assert d in f.split("/"), f"{f!r} is not scoped to the device id {d!r}"
        for g in theirs:
            assert not filter_within(g, f), (f, g)
            for topic in sample_topics(g):
                assert not topic_matches(topic, f), (topic, f)
        for topic in EVIL_TOPICS:
            assert not topic_matches(topic, f), (topic, f)
    for action in Access:
        for topic in EVIL_TOPICS:
            assert not ns_d.allows(action, topic)
    assert not ns_d.allows(Access.SUBSCRIBE, "$jitp/events/#")
    assert not ns_d.allows(Access.SUBSCRIBE, "$jitp/admin/#")
    assert not ns_d.allows(Access.SUBSCRIBE, "#")
    for g in theirs:
        for topic in sample_topics(g):
            assert not ns_d.allows(Access.PUBLISH, topic)
            assert not ns_d.allows(Access.RECEIVE, topic)


@FAST
@given(d=SAFE_ID, region=SAFE_ID, tenant=HOSTILE_TEXT, site=ATTR_VALUE)
def test_unsafe_attribute_values_give_no_access_at_all(
    ns_templates: list[EnrollmentTemplate], d: str, region: str, tenant: str, site: str
) -> None:
    template = ns_templates[2]
    ns = template.namespace(d, region, {"tenant": tenant, "site": site})
    if id_problem(tenant) is not None or id_problem(site) is not None:
        assert ns == Namespace(publish=(), subscribe=())
    else:
        assert len(ns.publish) == 4 and len(ns.subscribe) == 3
        assert ns.publish[0] == f"fleet/{tenant}/{d}/#"


def test_absent_attribute_used_in_a_pattern_gives_no_access(ns_templates: list[EnrollmentTemplate]) -> None:
    template = ns_templates[2]
    assert template.namespace("d1", "eu", {"tenant": "acme"}) == Namespace(publish=(), subscribe=())
    ns = template.namespace("d1", "eu", {"tenant": "acme", "site": "lyon"})
    assert ns.publish == (
        "fleet/acme/d1/#",
        "telemetry/+/d1",
        "sites/lyon/eu/d1",
        "$jitp/devices/d1/status",
    )
    assert ns.subscribe == ("fleet/acme/d1/cmd/#", "broadcast/eu/d1/+", "$jitp/devices/d1/#")


def test_sample_topics_helper() -> None:
    assert list(sample_topics("a/+/b/#")) == ["a/x/b/x/y/z", "a/cmd/b/cmd/y/z", "a/w/b"]
    assert re.fullmatch(r"[a-z/]+", next(sample_topics("devices/d/#")))


# -- untrusted patterns and files (issue 12, findings 7 and 8) ---------------------------------------------
# Id patterns run on the broker's only event loop, once per CONNECT, on certificate values. Under Python's
# backtracking `re`, '^(a+)+$' with a 33-character CN froze the broker for 8.9 s, doubling per character.
CATASTROPHIC = "device_id:\n  regex: '^(a+)+$'\n"


def test_a_catastrophic_pattern_matches_a_10000_character_input(tmp_path: Path) -> None:
    # No timing here: with a backtracking engine the non-matching call below never returns, and the test
    # fails under pytest-timeout. RE2 answers both in time linear in the input.
    t = load_template(write(tmp_path, "t", CATASTROPHIC))
    regex = t.id_rule.regex
    assert regex is not None and regex.pattern == "^(a+)+$"
    assert regex.fullmatch("a" * 9_999 + "!") is None
    assert regex.fullmatch("!" + "a" * 9_999) is None
    assert regex.fullmatch("a" * 10_000) == {}  # a match: the named groups (none here)
    from jitp.domain.templates import IdPattern

    assert isinstance(regex, IdPattern)


def test_a_catastrophic_pattern_refuses_a_hostile_cn(tmp_path: Path) -> None:
    t = load_template(write(tmp_path, "t", CATASTROPHIC))
    hostile = chain_for(pkitools.leaf(pkitools.name((NameOID.COMMON_NAME, "a" * 200 + "!"))))
    with pytest.raises(errors.UnsafeIdentity, match="does not match the template's id pattern") as info:
        t.render(hostile, default_region="default")
    assert info.value.reason == "unsafe_id"
    assert t.render(pkitools.verified_device("aaaa"), default_region="default").device_id == "aaaa"


def test_values_longer_than_the_match_limit_are_never_matched(tmp_path: Path) -> None:
    from jitp.domain.templates import MAX_MATCH_CHARS

    assert MAX_MATCH_CHARS == 256  # the README documents this number
    body = "device_id:\n  regex: '^(?P<pad>0*)(?P<id>[a-z]{1,8})$'\n"
    t = load_template(write(tmp_path, "t", body))
    at_limit = "0" * (MAX_MATCH_CHARS - 8) + "abcdefgh"
    ident = t.render(
        chain_for(pkitools.leaf(pkitools.name((NameOID.COMMON_NAME, at_limit)))), default_region="d"
    )
    assert ident.device_id == "abcdefgh"
    for long in ("0" + at_limit, "0" * 10_000 + "abcdefgh"):
        chain = chain_for(pkitools.leaf(pkitools.name((NameOID.COMMON_NAME, long))))
        with pytest.raises(errors.UnsafeIdentity, match=f"longer than {MAX_MATCH_CHARS} characters") as info:
            t.render(chain, default_region="d")
        assert info.value.reason == "unsafe_id"
    # Several values (SANs): an over-long one is skipped, never matched; a later one may still fit.
    uri_t = load_template(
        write(tmp_path, "u", "device_id:\n  from: san.uri\n  regex: '^urn:dev:(?P<id>[0-9]+)$'\n")
    )
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("urn:dev:" + "1" * 300), x509.UniformResourceIdentifier("urn:dev:42")]
    )
    cert = pkitools.leaf(pkitools.name((NameOID.COMMON_NAME, "x")), extra_extensions=(san,))
    assert uri_t.render(chain_for(cert), default_region="d").device_id == "42"


@pytest.mark.parametrize(
    "pattern",
    [
        r"^(?P<a>[a-z])\1$",  # backreference
        "^(?P<a>[a-z])(?P=a)$",  # named backreference
        "^(?=dev-)(?P<id>.+)$",  # lookahead
        "^(?P<id>.+)(?<!-test)$",  # lookbehind
        "^(?P<id>a++)$",  # possessive quantifier (Python 3.11 accepts it)
    ],
)
def test_patterns_re2_cannot_compile_are_refused_at_load(tmp_path: Path, pattern: str) -> None:
    re.compile(pattern)  # valid for Python's re: only the linear-time engine refuses it
    body = f"name: t\ndevice_id:\n  regex: '{pattern}'  # <-\n"
    path = write(tmp_path, "t", body)
    with pytest.raises(errors.ConfigError) as info:
        load_template(path)
    exc = info.value
    assert exc.key == "device_id.regex" and exc.where == f"{path}:3"
    assert "bad regular expression" in exc.problem and "RE2 syntax" in exc.problem
    assert "\n" not in str(exc)


def test_named_groups_and_equality_of_re2_patterns(tmp_path: Path) -> None:
    from jitp.domain.templates import IdPattern

    t = load_template(SMART_METER)
    assert t.id_rule.regex is not None and dict(t.id_rule.regex.groupindex) == {"serial": 1}
    assert t.id_rule.regex.fullmatch("SM-00a1b2c3") == {"serial": "00a1b2c3"}
    assert t.id_rule.regex.fullmatch("SM-00a1b2c3x") is None  # fullmatch, not match
    optional = IdPattern("^(?:(?P<a>x)-)?(?P<b>[a-z]+)$")
    assert optional.fullmatch("abc") == {"a": "", "b": "abc"}  # a group that took no part renders as ""
    # A template reload re-renders devices whose template changed: equal text must compare equal.
    assert IdPattern("^a$") == IdPattern("^a$") and hash(IdPattern("^a$")) == hash(IdPattern("^a$"))
    assert IdPattern("^a$") != IdPattern("^b$")
    assert load_template(SMART_METER) == load_template(SMART_METER)


# Patterns in the syntax Python's re and RE2 share. Named groups are never repeated, so the two engines'
# (identical, leftmost-first) submatch rules can be compared exactly.
RE_ATOM = st.sampled_from(["a", "b", "0", "-", ".", "[ab]", "[a-c]", "[^a]", r"\d", "[0-9a-f]"])
RE_QUANT = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "*?", "+?", "??"])
RE_SEQ = st.lists(st.tuples(RE_ATOM, RE_QUANT).map("".join), min_size=1, max_size=4).map("".join)
RE_ALT = st.lists(RE_SEQ, min_size=1, max_size=3).map("|".join)


@st.composite
def shared_patterns(draw: st.DrawFn) -> str:
    parts = []
    for i in range(draw(st.integers(1, 3))):
        body = draw(RE_ALT)
        if draw(st.booleans()):
            parts.append(f"(?P<g{i}>{body})")
        elif re.fullmatch(f"(?:{body})", ""):
            # A repeated group that can match empty: the engines differ on empty iterations (Python
            # may take one more, RE2 never does), which moves later groups; leave it unrepeated.
            parts.append(f"(?:{body})")
        else:
            parts.append(f"(?:{body}){draw(RE_QUANT)}")
    pattern = "".join(parts)
    return f"^{pattern}$" if draw(st.booleans()) else pattern


@settings(max_examples=300, deadline=None)
@given(pattern=shared_patterns(), texts=st.lists(st.text(st.sampled_from("ab0c-f"), max_size=10), max_size=5))
@example(pattern="^(?P<g0>a|ab)(?P<g1>b?)$", texts=["ab", "abb", "a"])
@example(pattern="(?P<g0>a*?)(?P<g1>a*)", texts=["aaa", ""])
def test_re2_and_re_agree_on_fullmatch_and_groups(pattern: str, texts: list[str]) -> None:
    from jitp.domain.templates import IdPattern

    compiled = IdPattern(pattern)
    reference = re.compile(pattern)
    assert dict(compiled.groupindex) == dict(reference.groupindex)
    for text in texts:
        expected = reference.fullmatch(text)
        got = compiled.fullmatch(text)
        event("match" if expected else "no match")
        assert (got is None) == (expected is None), (pattern, text)
        if expected is not None:
            assert got == {k: v or "" for k, v in expected.groupdict().items()}, (pattern, text)


# A "billion laughs": nine levels of nine aliases, 9**9 strings once expanded (the issue measured 3 GB and
# 38 s per reload with the old loader, and a MemoryError traceback from `jitp templates list`).
def alias_bomb(levels: int = 9) -> str:
    lines = ["region:", '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    lines.append(f"name: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_anything_is_expanded(tmp_path: Path) -> None:
    import tracemalloc

    path = write(tmp_path, "bomb", alias_bomb())
    tracemalloc.start()
    try:
        with pytest.raises(errors.ConfigError) as info:
            load_template(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"loading the bomb allocated {peak} bytes"
    exc = info.value
    assert "aliases are not allowed in templates" in exc.problem
    assert exc.where == f"{path}:2"  # the first anchor
    assert str(exc).startswith(str(path)) and "\n" not in str(exc)
    with pytest.raises(errors.ConfigError, match="aliases are not allowed"):
        TemplateSet.load(tmp_path)


@pytest.mark.parametrize(
    "body",
    [
        "namespace:\n  publish: &p ['d/{device_id}/#']  # <-\n  subscribe: *p\n",
        "profile:\n  hints: {a: &k x, b: *k}  # <-\n",
        "device_id:\n  from: subject.CN\nattributes:\n  a: !!str &x v  # <-\n",
    ],
    ids=["alias-of-a-list", "alias-in-a-flow-mapping", "anchor-alone"],
)
def test_anchors_and_aliases_are_refused_even_when_harmless(tmp_path: Path, body: str) -> None:
    path = write(tmp_path, "t", body)
    with pytest.raises(errors.ConfigError, match="aliases are not allowed") as info:
        load_template(path)
    if "# <-" in body:
        assert info.value.where == f"{path}:{marked_line(body)}"


def test_template_files_are_bounded_regular_utf8_files(tmp_path: Path) -> None:
    import os

    from jitp.domain.templates import MAX_TEMPLATE_BYTES, MAX_TEMPLATE_DEPTH

    assert MAX_TEMPLATE_BYTES == 64 * 1024 and MAX_TEMPLATE_DEPTH == 16  # the README documents these
    head = "version: 1\n"
    fits = write(tmp_path, "fits", head + "#" * (MAX_TEMPLATE_BYTES - len(head) - 1) + "\n")
    assert fits.stat().st_size == MAX_TEMPLATE_BYTES
    assert load_template(fits).name == "fits"
    big = write(tmp_path, "big", head + "#" * (MAX_TEMPLATE_BYTES - len(head)) + "\n")
    with pytest.raises(errors.ConfigError, match="larger than 64 KiB") as info:
        load_template(big)
    assert info.value.where == str(big)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")  # endless input: refused without reading it
    with pytest.raises(errors.ConfigError, match="not a regular file"):
        load_template(zero)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # no writer: opening it must not block the broker
    with pytest.raises(errors.ConfigError, match="not a regular file"):
        load_template(fifo)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"region: caf\xe9\n")
    with pytest.raises(errors.ConfigError, match="not UTF-8"):
        load_template(latin)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("profile:\n  hints: " + "[" * 5000 + "]" * 5000 + "  # <-\n", "nested deeper than 16 levels"),
        ("name: !foo x  # <-\n", "invalid value"),
        ("name: !!binary 'a'  # <-\n", "invalid value"),
        ("version: !!int abc  # <-\n", "invalid value"),
        ("attributes:\n  a: {from: subject.O, required: !!bool maybe}  # <-\n", "invalid value"),
        ("region: !!timestamp 2001-13-45  # <-\n", "invalid value"),
        ("version: " + "9" * 5000 + "  # <-\n", "invalid value"),
    ],
    ids=["deep-nesting", "unknown-tag", "bad-binary", "bad-int", "bad-bool", "bad-timestamp", "huge-int"],
)
def test_hostile_yaml_is_a_config_error_not_a_crash(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, "t", body)
    with pytest.raises(errors.ConfigError, match=message) as info:
        load_template(path)
    assert info.value.where == f"{path}:{marked_line(body)}"
    assert "\n" not in str(info.value)


YAML_SOUP = st.text(st.sampled_from("ab0:-[]{}&*!|>'\"#,?%@ \n\t.~"), max_size=120)
KEYS = [
    "name",
    "version",
    "device_id",
    "from",
    "regex",
    "format",
    "attributes",
    "namespace",
    "publish",
    "profile",
    "hints",
    "keepalive",
    "min",
    "required",
    "value",
    "region",
    "reprovision",
    "!!int",
    "&a",
    "*a",
]


@FAST
@given(
    soup=YAML_SOUP,
    words=st.lists(st.sampled_from(KEYS) | YAML_SOUP, max_size=12),
)
def test_any_file_content_loads_or_is_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, soup: str, words: list[str]
) -> None:
    directory = tmp_path_factory.mktemp("soup", numbered=True)
    for stem, body in (("soup", soup), ("words", " ".join(words)), ("lines", "\n".join(words))):
        try:
            load_template(write(directory, stem, body))
        except errors.ConfigError as exc:
            assert exc.where is not None and exc.where.startswith(str(directory))


def test_a_claim_section_turns_parameters_into_the_id_and_attributes(tmp_path: Path) -> None:
    body = (
        "attributes:\n  plant: {value: lyon}\n"
        "claim:\n  parameters:\n    serial: {regex: '[0-9]{4}'}\n    model:\n  device_id: 'm-{serial}'\n"
        "namespace:\n  publish: ['m/{attributes.serial}/{device_id}/#']\n"
    )
    template = load_template(write(tmp_path, "t", body))
    device_id, region, attributes, config = template.render_claim(
        {"serial": "0042", "model": "x1"}, ca_id="ca", default_region="eu"
    )
    assert (device_id, region) == ("m-0042", "eu")
    assert attributes == {"plant": "lyon", "serial": "0042", "model": "x1"}
    assert config["namespace"]["publish"][0] == "m/0042/m-0042/#"
    for bad, words in [
        ({"serial": "42"}, "does not match"),
        ({"model": "x1"}, "'serial' is required"),
        ({"serial": "0042", "x": "1"}, "unknown parameter"),
        (["0042"], "JSON object"),
    ]:
        with pytest.raises(errors.InvalidParameters, match=words):
            template.render_claim(bad, ca_id="ca", default_region="eu")
    with pytest.raises(errors.InvalidParameters, match="no claim section"):
        DEFAULT_TEMPLATE.render_claim({"serial": "0042"}, ca_id="ca", default_region="eu")
