"""Enrollment templates: how a verified certificate becomes a device.

A template (YAML in ``config/templates/<name>.yaml``) is bound to a trust anchor at
``jitp ca register --template NAME``. It says, for certificates chaining to that anchor:

* the device id: a source field, optionally a regex with a named group, optionally a format;
* attributes: static values, certificate fields or custom extensions (by OID), required or not;
* the region or tenant (else the CA registration's, else the default);
* the topic namespace: patterns with ``{device_id}``, ``{region}`` and ``{attributes.NAME}``;
* the connectivity profile: keep-alive range, maximum QoS, message size, rate, free-form hints;
* the reprovisioning policy for a known id arriving with a new certificate: reject, rotate, reset.

Sources (``from:``): ``subject.CN`` (also O, OU, L, ST, C, serialNumber, or a dotted OID),
``san.dns``, ``san.uri``, ``san.email``, ``san.ip``, ``serial``, ``fingerprint``, ``ext:OID``.
Certificate values are untrusted: the id always passes :func:`jitp.domain.identity.check_device_id`,
and every value substituted into a topic pattern must be a safe topic level too.

Matching runs on the broker's only event loop, so it must be cheap whatever a template or a
certificate says: id patterns are compiled with RE2 (linear time, no backtracking; patterns RE2
cannot compile, such as backreferences and lookaround, are refused at load), and a certificate
value longer than :data:`MAX_MATCH_CHARS` is never matched. Template files are untrusted input for
the loader too: at most :data:`MAX_TEMPLATE_BYTES`, UTF-8, nested at most
:data:`MAX_TEMPLATE_DEPTH` levels, and without YAML anchors or aliases (an alias "bomb" would
otherwise expand to gigabytes).
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information; IdPattern wraps it
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from jitp import errors, yamlfiles
from jitp.domain.acl import Namespace, status_topic, valid_filter
from jitp.domain.certificates import BirthPolicy
from jitp.domain.identity import DeviceIdentity, check_device_id, id_problem
from jitp.domain.records import ReprovisionPolicy
from jitp.trust import VerifiedChain
from jitp.yamlfiles import construct_scalar

_SUBJECT_OIDS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "C": NameOID.COUNTRY_NAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
}
_SAN_TYPES: dict[str, type[x509.GeneralName]] = {
    "dns": x509.DNSName,
    "uri": x509.UniformResourceIdentifier,
    "email": x509.RFC822Name,
    "ip": x509.IPAddress,
}
_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
MAX_VALUE_CHARS = 256
# A certificate value longer than this is never matched against an id pattern (refused as unsafe_id).
MAX_MATCH_CHARS = 256
# Template files: size read, nesting depth of YAML collections.
MAX_TEMPLATE_BYTES = 64 * 1024
MAX_TEMPLATE_DEPTH = 16


@dataclass(frozen=True)
class Source:
    """Where a value comes from in a certificate."""

    expr: str

    def __post_init__(self) -> None:
        kind, _, arg = self.expr.partition(".")
        if self.expr in ("serial", "fingerprint"):
            return
        if self.expr.startswith("ext:") and _OID_RE.match(self.expr[4:]):
            return
        if kind == "subject" and (arg in _SUBJECT_OIDS or _OID_RE.match(arg)):
            return
        if kind == "san" and arg in _SAN_TYPES:
            return
        raise ValueError(
            f"unknown source {self.expr!r} (use subject.CN|O|OU|L|ST|C|serialNumber|<oid>, "
            "san.dns|uri|email|ip, serial, fingerprint or ext:<oid>)"
        )

    def values(self, verified: VerifiedChain) -> list[str]:
        cert = verified.leaf
        if self.expr == "serial":
            return [format(cert.serial_number, "x")]
        if self.expr == "fingerprint":
            return [verified.fingerprint]
        if self.expr.startswith("ext:"):
            return _extension_values(cert, self.expr[4:])
        kind, _, arg = self.expr.partition(".")
        if kind == "subject":
            oid = _SUBJECT_OIDS.get(arg) or x509.ObjectIdentifier(arg)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # over-long attributes are untrusted input too
                attrs = cert.subject.get_attributes_for_oid(oid)
            return [
                a.value if isinstance(a.value, str) else a.value.decode("utf-8", "replace") for a in attrs
            ]
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return [str(v) for v in san.get_values_for_type(_SAN_TYPES[arg])]  # type: ignore[arg-type]


def _extension_values(cert: x509.Certificate, dotted: str) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(dotted))
    except x509.ExtensionNotFound:
        return []
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()
    return [_der_string(raw)]


def _der_string(raw: bytes) -> str:
    """A custom extension's value: a DER string type (UTF8String, PrintableString, IA5String...) or raw text."""
    if len(raw) >= 2 and raw[0] in (0x0C, 0x13, 0x16, 0x1A, 0x1E):
        length = raw[1]
        offset = 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(raw[2 : 2 + n], "big")
            offset = 2 + n
        body = raw[offset : offset + length]
        return body.decode("utf-16-be" if raw[0] == 0x1E else "utf-8", "replace")
    return raw.decode("utf-8", "replace")


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern becomes a ConfigError, not a line on stderr


@dataclass(frozen=True)
class IdPattern:
    """A device-id pattern compiled with RE2: matching time is linear in the input, whatever the pattern.

    RE2 syntax, not Python's: no backreferences, lookaround or possessive quantifiers (ValueError), and
    ``\\d``, ``\\w``, ``\\s``, ``\\b`` are ASCII-only. Two patterns are equal when their text is (a
    template reload compares templates to find what changed).
    """

    pattern: str
    groupindex: Mapping[str, int] = field(init=False, repr=False, compare=False)
    _compiled: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = re2.compile(self.pattern, _RE2_OPTIONS)
        except re2.error as exc:
            problem = exc.args[0] if exc.args else exc
            raise ValueError(
                problem.decode("utf-8", "replace") if isinstance(problem, bytes) else str(problem)
            ) from None
        except UnicodeEncodeError:
            raise ValueError("the pattern is not valid Unicode text") from None
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "groupindex", MappingProxyType(dict(compiled.groupindex)))

    def fullmatch(self, text: str) -> dict[str, str] | None:
        """The named groups (a group that took no part as "") if all of ``text`` matches, else None."""
        try:
            m = self._compiled.fullmatch(text)
        except UnicodeEncodeError:  # a lone surrogate: not text a certificate field decodes to
            return None
        if m is None:
            return None
        return {str(k): str(v or "") for k, v in m.groupdict().items()}


@dataclass(frozen=True)
class IdRule:
    source: Source = Source("subject.CN")
    regex: IdPattern | None = None
    format: str | None = None

    def render(self, verified: VerifiedChain) -> str:
        values = self.source.values(verified)
        if not values:
            raise errors.UnsafeIdentity(
                f"the certificate has no {self.source.expr} for the device id",
                fingerprint=verified.fingerprint,
            )
        if self.source.expr == "subject.CN" and len(values) > 1:
            raise errors.UnsafeIdentity(
                "the certificate subject has several common names; the device id would be ambiguous",
                fingerprint=verified.fingerprint,
            )
        value = values[0]
        groups: dict[str, str] = {"value": value}
        if self.regex is not None:
            for candidate in values:
                if len(candidate) > MAX_MATCH_CHARS:
                    continue  # never matched: the work per CONNECT stays small and predictable
                found = self.regex.fullmatch(candidate)
                if found is not None:
                    groups = {"value": candidate, **found}
                    break
            else:
                if len(value) > MAX_MATCH_CHARS:
                    raise errors.UnsafeIdentity(
                        f"{self.source.expr} is longer than {MAX_MATCH_CHARS} characters and is not "
                        "matched against the template's id pattern",
                        fingerprint=verified.fingerprint,
                        detail=repr(value)[:80],
                    )
                raise errors.UnsafeIdentity(
                    f"{self.source.expr} does not match the template's id pattern {self.regex.pattern!r}",
                    fingerprint=verified.fingerprint,
                    detail=repr(value)[:80],
                )
            value = groups.get("id", groups["value"])
        if self.format is not None:
            try:
                value = self.format.format(**groups)
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise errors.UnsafeIdentity(
                    f"the template's id format {self.format!r} cannot be applied: {exc}",
                    fingerprint=verified.fingerprint,
                ) from None
        return check_device_id(value, fingerprint=verified.fingerprint)


@dataclass(frozen=True)
class AttributeRule:
    name: str
    value: str | None = None  # static
    source: Source | None = None
    required: bool = True

    def render(self, verified: VerifiedChain) -> str | None:
        if self.value is not None:
            return self.value
        assert self.source is not None
        values = self.source.values(verified)
        if not values:
            if self.required:
                raise errors.MissingAttribute(
                    f"required attribute {self.name!r} is missing: the certificate has no {self.source.expr}",
                    fingerprint=verified.fingerprint,
                    detail=self.name,
                )
            return None
        value = values[0]
        if len(value) > MAX_VALUE_CHARS or any(not ch.isprintable() for ch in value):
            raise errors.MissingAttribute(
                f"attribute {self.name!r} from {self.source.expr} is not printable text of at most "
                f"{MAX_VALUE_CHARS} characters",
                fingerprint=verified.fingerprint,
                detail=self.name,
            )
        return value


@dataclass(frozen=True)
class Profile:
    """Connectivity profile, delivered to the device and enforced by the broker."""

    keepalive_min: int = 0
    keepalive_max: int = 3600
    max_qos: int = 1
    max_message_size: int = 256 * 1024
    rate_messages: int = 0  # messages per rate_seconds; 0 = unlimited
    rate_seconds: float = 1.0
    hints: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, Any]:
        return {
            "keepalive": {"min": self.keepalive_min, "max": self.keepalive_max},
            "max_qos": self.max_qos,
            "max_message_size": self.max_message_size,
            "rate_limit": {"messages": self.rate_messages, "per_seconds": self.rate_seconds},
            "hints": dict(self.hints),
        }


MAX_PARAMETERS = 32  # parameters a claim may carry


@dataclass(frozen=True)
class ParameterRule:
    """One parameter a claim request may (or must) carry: a string, matched whole by ``regex``."""

    name: str
    regex: IdPattern | None = None
    required: bool = True


@dataclass(frozen=True)
class ClaimRule:
    """A template's ``claim:`` section: how a claim request's ``parameters`` become a device.

    Every declared parameter that is present becomes an attribute of the device (beside the
    template's static attributes); ``device_id`` is a format over the parameters (``{serial}``)."""

    parameters: tuple[ParameterRule, ...]
    device_id: str

    def render(self, parameters: object) -> tuple[str, dict[str, str]]:
        """(device id, attributes) from a claim's ``parameters``, or InvalidParameters saying which."""
        if not isinstance(parameters, dict):
            raise errors.InvalidParameters("'parameters' must be a JSON object of strings")
        rules = {rule.name: rule for rule in self.parameters}
        unknown = sorted(str(k) for k in parameters if k not in rules)
        if unknown:
            raise errors.InvalidParameters(
                f"unknown parameter(s) {', '.join(repr(u[:40]) for u in unknown[:5])}; "
                f"the template accepts {', '.join(sorted(rules)) or 'none'}"
            )
        values: dict[str, str] = {}
        for name, rule in rules.items():
            value = parameters.get(name)
            if value is None:
                if rule.required:
                    raise errors.InvalidParameters(f"parameter {name!r} is required")
                continue
            if not isinstance(value, str) or not value:
                raise errors.InvalidParameters(f"parameter {name!r} must be a non-empty string")
            if len(value) > MAX_MATCH_CHARS or not value.isprintable():
                raise errors.InvalidParameters(
                    f"parameter {name!r} must be printable text of at most {MAX_MATCH_CHARS} characters"
                )
            if rule.regex is not None and rule.regex.fullmatch(value) is None:
                raise errors.InvalidParameters(
                    f"parameter {name!r} does not match the template's pattern {rule.regex.pattern!r}"
                )
            values[name] = value
        try:
            device_id = self.device_id.format(**values)
        except (KeyError, IndexError, ValueError) as exc:
            raise errors.InvalidParameters(
                f"the device id {self.device_id!r} cannot be formed: {exc} is missing"
            ) from None
        problem = id_problem(device_id)
        if problem is not None:
            raise errors.InvalidParameters(f"the device id {device_id[:80]!r} would be unsafe: {problem}")
        return device_id, values


DEFAULT_PUBLISH: tuple[str, ...] = ("devices/{device_id}/#",)
DEFAULT_SUBSCRIBE: tuple[str, ...] = ("devices/{device_id}/cmd/#",)


@dataclass(frozen=True)
class EnrollmentTemplate:
    name: str
    version: int = 1
    id_rule: IdRule = field(default_factory=IdRule)
    attributes: tuple[AttributeRule, ...] = ()
    region: str | None = None
    publish: tuple[str, ...] = DEFAULT_PUBLISH
    subscribe: tuple[str, ...] = DEFAULT_SUBSCRIBE
    profile: Profile = field(default_factory=Profile)
    reprovision: ReprovisionPolicy = ReprovisionPolicy.REJECT
    # Once an operational certificate is current: may the factory certificate still connect?
    birth_certificate: BirthPolicy = BirthPolicy.KEEP
    # For a CA registered with --role claim: how a claim's parameters become a device.
    claim: ClaimRule | None = None

    def render_claim(
        self, parameters: object, *, ca_id: str, default_region: str
    ) -> tuple[str, str, dict[str, str], dict[str, Any]]:
        """A claim's parameters -> (device id, region, attributes, configuration), or InvalidParameters."""
        if self.claim is None:
            raise errors.InvalidParameters(f"template {self.name!r} has no claim section: it takes no claims")
        device_id, values = self.claim.render(parameters)
        static = {rule.name: rule.value for rule in self.attributes if rule.value is not None}
        attributes = {**static, **values}
        region = self.region or default_region
        namespace = self.namespace(device_id, region, attributes)
        config = {
            "namespace": {"publish": list(namespace.publish), "subscribe": list(namespace.subscribe)},
            "profile": self.profile.to_json(),
        }
        return device_id, region, attributes, config

    def render(self, verified: VerifiedChain, *, default_region: str) -> DeviceIdentity:
        """Certificate -> DeviceIdentity, or a Refused with the precise reason."""
        device_id = self.id_rule.render(verified)
        attrs: dict[str, str] = {}
        for rule in self.attributes:
            value = rule.render(verified)
            if value is not None:
                attrs[rule.name] = value
        region = self.region or verified.anchor.region or default_region
        if id_problem(region) is not None:
            raise errors.UnsafeIdentity(f"unsafe region {region!r}", fingerprint=verified.fingerprint)
        leaf = verified.leaf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            subject = leaf.subject.rfc4514_string()
        return DeviceIdentity(
            device_id=device_id,
            cert_fingerprint=verified.fingerprint,
            ca_id=verified.anchor.ca_id,
            region=region,
            serial=format(leaf.serial_number, "x"),
            subject=subject,
            not_after=leaf.not_valid_after_utc,
            attributes=MappingProxyType(attrs),
            template=self.name,
            template_version=self.version,
        )

    def namespace(self, device_id: str, region: str, attributes: dict[str, Any]) -> Namespace:
        """The device's topic namespace. Any unsafe substituted value yields no access at all."""
        values = {"device_id": device_id, "region": region}
        values.update({f"attributes.{k}": str(v) for k, v in attributes.items()})

        def fill(pattern: str) -> str | None:
            out = []
            for literal, name in _split_pattern(pattern):
                out.append(literal)
                if name is not None:
                    value = values.get(name)
                    if value is None or id_problem(value) is not None:
                        return None
                    out.append(value)
            return "".join(out)

        rendered = [fill(p) for p in (*self.publish, *self.subscribe)]
        if any(r is None for r in rendered):
            return Namespace(publish=(), subscribe=())
        pub = tuple(r for r in rendered[: len(self.publish)] if r is not None)
        sub = tuple(r for r in rendered[len(self.publish) :] if r is not None)
        own = f"$jitp/devices/{device_id}/#"
        return Namespace(publish=(*pub, status_topic(device_id)), subscribe=(*sub, own))


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _split_pattern(pattern: str) -> list[tuple[str, str | None]]:
    """(literal text, placeholder name or None) pieces of a namespace pattern. No format specs."""
    pieces: list[tuple[str, str | None]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(pattern):
        pieces.append((pattern[pos : m.start()], m.group(1)))
        pos = m.end()
    pieces.append((pattern[pos:], None))
    return pieces


DEFAULT_TEMPLATE = EnrollmentTemplate(name="default")


# -- loading --------------------------------------------------------------------------------
def _err(where: str, node: yaml.Node | None, key: str, message: str) -> errors.ConfigError:
    line = f":{node.start_mark.line + 1}" if node is not None else ""
    return errors.ConfigError(message, where=f"{where}{line}", key=key)


def _mapping(node: yaml.Node, where: str, key: str, allowed: set[str]) -> dict[str, tuple[yaml.Node, Any]]:
    if not isinstance(node, yaml.MappingNode):
        raise _err(where, node, key, "expected a mapping")
    out: dict[str, tuple[yaml.Node, Any]] = {}
    for k, v in node.value:
        name = str(k.value)
        if name not in allowed:
            raise _err(
                where, k, f"{key}.{name}".lstrip("."), f"unknown key (known: {', '.join(sorted(allowed))})"
            )
        if name in out:
            raise _err(where, k, f"{key}.{name}".lstrip("."), "duplicate key")
        try:
            out[name] = (v, construct_scalar(v))
        except ValueError as exc:
            raise _err(where, v, f"{key}.{name}".lstrip("."), f"invalid value: {exc}") from None
    return out


def _check_pattern(pattern: str, where: str, node: yaml.Node, key: str, attributes: frozenset[str]) -> str:
    if "{" in _PLACEHOLDER.sub("", pattern) or "}" in _PLACEHOLDER.sub("", pattern):
        raise _err(where, node, key, f"pattern {pattern!r} has an unbalanced brace")
    for _, fname in _split_pattern(pattern):
        if fname is None:
            continue
        allowed = {"device_id", "region", *(f"attributes.{a}" for a in attributes)}
        if fname not in allowed:
            raise _err(
                where,
                node,
                key,
                f"unknown placeholder {{{fname}}} (use {{device_id}}, {{region}} or {{attributes.NAME}} of a "
                "declared attribute; no format specs)",
            )
    if "{device_id}" not in pattern:
        raise _err(where, node, key, f"pattern {pattern!r} must contain {{device_id}} so devices stay apart")
    sample = _PLACEHOLDER.sub("x", pattern)
    if not valid_filter(sample) or sample.startswith("$"):
        raise _err(where, node, key, f"pattern {pattern!r} is not a valid MQTT topic filter outside $-topics")
    levels = pattern.split("/")
    if not any(level == "{device_id}" for level in levels):
        raise _err(where, node, key, "{device_id} must be a whole topic level")
    return pattern


def load_template(path: Path) -> EnrollmentTemplate:
    where = str(path)
    text = yamlfiles.read_text(path, max_bytes=MAX_TEMPLATE_BYTES, what="template")
    root = yamlfiles.compose(text, where=where, max_depth=MAX_TEMPLATE_DEPTH, what="templates")
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        raise errors.ConfigError("empty template", where=where)
    top = _mapping(
        root,
        where,
        "",
        {
            *("name", "version", "device_id", "attributes", "region", "namespace", "profile"),
            *("reprovision", "birth_certificate", "claim"),
        },
    )
    name = str(top["name"][1]) if "name" in top else path.stem
    if name != path.stem:
        raise _err(where, top["name"][0], "name", f"must match the file name {path.stem!r}")
    version = top.get("version", (None, 1))[1]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _err(where, top["version"][0], "version", "must be a positive integer")
    id_rule = IdRule()
    if "device_id" in top:
        spec = _mapping(top["device_id"][0], where, "device_id", {"from", "regex", "format"})
        id_rule = IdRule(
            source=_source(spec.get("from"), where, "device_id.from") or Source("subject.CN"),
            regex=_regex(spec.get("regex"), where, "device_id.regex"),
            format=str(spec["format"][1]) if "format" in spec else None,
        )
        if id_rule.format is not None:
            groups = set(id_rule.regex.groupindex) if id_rule.regex else set()
            try:
                parsed = list(string.Formatter().parse(id_rule.format))
            except ValueError as exc:
                raise _err(where, spec["format"][0], "device_id.format", f"bad format: {exc}") from None
            for _, fname, fspec, conv in parsed:
                if fname is not None and (fname not in groups | {"value"} or fspec or conv):
                    raise _err(
                        where,
                        spec["format"][0],
                        "device_id.format",
                        f"unknown placeholder {{{fname}}} (named regex groups or {{value}}, no format specs)",
                    )
    attributes = []
    if "attributes" in top:
        node = top["attributes"][0]
        if not isinstance(node, yaml.MappingNode):
            raise _err(where, node, "attributes", "expected a mapping of attribute name to rule")
        for k, v in node.value:
            aname = str(k.value)
            if id_problem(aname) is not None:
                raise _err(where, k, f"attributes.{aname}", "attribute names must be safe identifiers")
            if isinstance(v, yaml.ScalarNode):
                attributes.append(AttributeRule(name=aname, value=str(v.value)))
                continue
            spec = _mapping(v, where, f"attributes.{aname}", {"value", "from", "required"})
            if ("value" in spec) == ("from" in spec):
                raise _err(where, v, f"attributes.{aname}", "give exactly one of 'value' or 'from'")
            required = spec.get("required", (None, True))[1]
            if not isinstance(required, bool):
                raise _err(
                    where, spec["required"][0], f"attributes.{aname}.required", "must be true or false"
                )
            attributes.append(
                AttributeRule(
                    name=aname,
                    value=str(spec["value"][1]) if "value" in spec else None,
                    source=_source(spec.get("from"), where, f"attributes.{aname}.from"),
                    required=required,
                )
            )
    region = None
    if "region" in top:
        region = str(top["region"][1])
        if id_problem(region) is not None:
            raise _err(where, top["region"][0], "region", "must be a safe topic level")
    claim = _claim(top["claim"][0], where) if "claim" in top else None
    publish, subscribe = DEFAULT_PUBLISH, DEFAULT_SUBSCRIBE
    declared = frozenset(rule.name for rule in attributes) | frozenset(
        p.name for p in (claim.parameters if claim else ())
    )
    if "namespace" in top:
        ns = _mapping(top["namespace"][0], where, "namespace", {"publish", "subscribe"})
        if "publish" in ns:
            publish = _patterns(ns["publish"], where, "namespace.publish", declared)
        if "subscribe" in ns:
            subscribe = _patterns(ns["subscribe"], where, "namespace.subscribe", declared)
    profile = _profile(top["profile"][0], where) if "profile" in top else Profile()
    reprovision = ReprovisionPolicy.REJECT
    if "reprovision" in top:
        try:
            reprovision = ReprovisionPolicy(str(top["reprovision"][1]))
        except ValueError:
            raise _err(
                where, top["reprovision"][0], "reprovision", "must be reject, rotate or reset"
            ) from None
    birth = BirthPolicy.KEEP
    if "birth_certificate" in top:
        try:
            birth = BirthPolicy(str(top["birth_certificate"][1]))
        except ValueError:
            raise _err(
                where, top["birth_certificate"][0], "birth_certificate", "must be keep, enroll_only or retire"
            ) from None
    return EnrollmentTemplate(
        name=name,
        version=version,
        id_rule=id_rule,
        attributes=tuple(attributes),
        region=region,
        publish=publish,
        subscribe=subscribe,
        profile=profile,
        reprovision=reprovision,
        birth_certificate=birth,
        claim=claim,
    )


def _claim(node: yaml.Node, where: str) -> ClaimRule:
    """``claim: {parameters: {NAME: {regex, required}}, device_id: "prefix-{NAME}"}``."""
    spec = _mapping(node, where, "claim", {"parameters", "device_id"})
    if "parameters" not in spec or "device_id" not in spec:
        raise _err(where, node, "claim", "needs 'parameters' and 'device_id'")
    pnode = spec["parameters"][0]
    if not isinstance(pnode, yaml.MappingNode) or not pnode.value:
        raise _err(where, pnode, "claim.parameters", "expected a mapping of parameter name to rule")
    if len(pnode.value) > MAX_PARAMETERS:
        raise _err(where, pnode, "claim.parameters", f"at most {MAX_PARAMETERS} parameters")
    rules = []
    for k, v in pnode.value:
        pname = str(k.value)
        key = f"claim.parameters.{pname}"
        if id_problem(pname) is not None or not pname.isidentifier():
            raise _err(where, k, key, "parameter names must be identifiers")
        rule = _mapping(v, where, key, {"regex", "required"}) if not _is_null(v) else {}
        required = rule.get("required", (None, True))[1]
        if not isinstance(required, bool):
            raise _err(where, rule["required"][0], f"{key}.required", "must be true or false")
        rules.append(
            ParameterRule(
                name=pname, regex=_regex(rule.get("regex"), where, f"{key}.regex"), required=required
            )
        )
    fnode, fmt = spec["device_id"]
    names = {r.name for r in rules}
    try:
        parsed = list(string.Formatter().parse(str(fmt)))
    except ValueError as exc:
        raise _err(where, fnode, "claim.device_id", f"bad format: {exc}") from None
    used = set()
    for _, fname, fspec, conv in parsed:
        if fname is not None and (fname not in names or fspec or conv):
            raise _err(
                where, fnode, "claim.device_id", f"unknown placeholder {{{fname}}} (declared parameters only)"
            )
        if fname is not None:
            used.add(fname)
    optional = sorted(r.name for r in rules if r.name in used and not r.required)
    if not used or optional:
        raise _err(
            where,
            fnode,
            "claim.device_id",
            "must use at least one parameter, and only required ones"
            + (f" ({optional[0]!r} is not)" if optional else ""),
        )
    return ClaimRule(parameters=tuple(rules), device_id=str(fmt))


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")


def _source(item: tuple[yaml.Node, Any] | None, where: str, key: str) -> Source | None:
    if item is None:
        return None
    try:
        return Source(str(item[1]))
    except ValueError as exc:
        raise _err(where, item[0], key, str(exc)) from None


def _regex(item: tuple[yaml.Node, Any] | None, where: str, key: str) -> IdPattern | None:
    if item is None:
        return None
    try:
        return IdPattern(str(item[1]))
    except ValueError as exc:
        raise _err(
            where,
            item[0],
            key,
            f"bad regular expression: {exc}; id patterns must use RE2 syntax (linear-time matching: "
            "no backreferences, lookaround or possessive quantifiers; see "
            "https://github.com/google/re2/wiki/Syntax)",
        ) from None


def _patterns(
    item: tuple[yaml.Node, Any], where: str, key: str, attributes: frozenset[str]
) -> tuple[str, ...]:
    node, value = item
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(where, node, key, "expected a list of topic patterns")
    return tuple(_check_pattern(v, where, node, key, attributes) for v in value)


def _profile(node: yaml.Node, where: str) -> Profile:
    spec = _mapping(
        node, where, "profile", {"keepalive", "max_qos", "max_message_size", "rate_limit", "hints"}
    )
    kw: dict[str, Any] = {}

    def number(item: tuple[yaml.Node, Any], key: str, lo: float, hi: float, kind: type = int) -> Any:
        n, v = item
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float) if kind is float else int)
            or not lo <= v <= hi
        ):
            raise _err(
                where, n, key, f"must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}]"
            )
        return v

    if "keepalive" in spec:
        ka = _mapping(spec["keepalive"][0], where, "profile.keepalive", {"min", "max"})
        if "min" in ka:
            kw["keepalive_min"] = number(ka["min"], "profile.keepalive.min", 0, 65535)
        if "max" in ka:
            kw["keepalive_max"] = number(ka["max"], "profile.keepalive.max", 1, 65535)
        if kw.get("keepalive_min", 0) > kw.get("keepalive_max", 3600):
            raise _err(where, spec["keepalive"][0], "profile.keepalive", "min must not exceed max")
    if "max_qos" in spec:
        kw["max_qos"] = number(spec["max_qos"], "profile.max_qos", 0, 2)
    if "max_message_size" in spec:
        kw["max_message_size"] = number(
            spec["max_message_size"], "profile.max_message_size", 1, 256 * 1024 * 1024
        )
    if "rate_limit" in spec:
        rl = _mapping(spec["rate_limit"][0], where, "profile.rate_limit", {"messages", "per_seconds"})
        if "messages" in rl:
            kw["rate_messages"] = number(rl["messages"], "profile.rate_limit.messages", 0, 10**6)
        if "per_seconds" in rl:
            kw["rate_seconds"] = float(
                number(rl["per_seconds"], "profile.rate_limit.per_seconds", 0.001, 86400, float)
            )
    if "hints" in spec:
        n, v = spec["hints"]
        if not isinstance(v, dict) or not all(isinstance(x, (str, int, float)) for x in v.values()):
            raise _err(where, n, "profile.hints", "expected a mapping of names to plain values")
        kw["hints"] = MappingProxyType({str(k): str(x) for k, x in v.items()})
    return Profile(**kw)


class TemplateSet:
    """The templates of a directory, by name. ``default`` always exists."""

    def __init__(self, templates: dict[str, EnrollmentTemplate] | None = None) -> None:
        self._templates = {"default": DEFAULT_TEMPLATE, **(templates or {})}

    @classmethod
    def load(cls, directory: Path | None) -> TemplateSet:
        templates: dict[str, EnrollmentTemplate] = {}
        if directory is not None and directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                t = load_template(path)
                templates[t.name] = t
        return cls(templates)

    def get(self, name: str | None) -> EnrollmentTemplate:
        template = self._templates.get(name or "default")
        if template is None:
            raise errors.TemplateNotFound(f"enrollment template {name!r} is not loaded", detail=name)
        return template

    def names(self) -> list[str]:
        return sorted(self._templates)
