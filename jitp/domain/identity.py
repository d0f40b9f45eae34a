"""Device identity: what a verified certificate becomes, and the id-safety rule.

Certificate fields are untrusted input. A device id becomes an MQTT client id and a topic
level, so it must be safe as both; :func:`check_device_id` is the one rule every derived id
passes, whatever the enrollment template says.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from jitp import errors
from jitp.trust import Role, VerifiedChain, read_subject

MAX_ID_CHARS = 128
MAX_ID_BYTES = 256
_FORBIDDEN = frozenset("/+#")
# Unicode categories refused anywhere in an id: control, format (bidi overrides, zero-width),
# surrogates, private use, unassigned, and line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def id_problem(value: str) -> str | None:
    """Why ``value`` is unsafe as a device id, or None if it is safe."""
    if not value:
        return "the id is empty"
    if len(value) > MAX_ID_CHARS or len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"the id is longer than {MAX_ID_CHARS} characters or {MAX_ID_BYTES} UTF-8 bytes"
    if value.startswith("$"):
        return "the id starts with '$', which MQTT reserves for server topics"
    for ch in value:
        if ch in _FORBIDDEN:
            return f"the id contains {ch!r}, an MQTT topic separator or wildcard"
        if ch.isspace():
            return f"the id contains whitespace (U+{ord(ch):04X})"
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            return f"the id contains a control or invisible character (U+{ord(ch):04X})"
    return None


def is_safe_id(value: str) -> bool:
    return id_problem(value) is None


def check_device_id(value: str, *, fingerprint: str | None = None) -> str:
    """Return ``value`` if it is a safe id, else raise :class:`~jitp.errors.UnsafeIdentity`."""
    problem = id_problem(value)
    if problem is not None:
        raise errors.UnsafeIdentity(
            f"unsafe device id: {problem}", fingerprint=fingerprint, detail=repr(value)[:80]
        )
    return value


def subject_common_name(name: x509.Name | x509.Certificate, *, fingerprint: str | None = None) -> str:
    """The single CN of a subject. None or several CNs is a refusal: the id would be ambiguous.

    Given a certificate, its subject is read without cryptography's warning about attribute
    lengths (a CN over 64 characters is judged by :func:`id_problem`, not warned about).
    """
    if isinstance(name, x509.Certificate):
        name = read_subject(name, fingerprint=fingerprint)
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise errors.UnsafeIdentity(
            "the certificate subject has no common name (CN)", fingerprint=fingerprint
        )
    if len(cns) > 1:
        raise errors.UnsafeIdentity(
            "the certificate subject has several common names; the device id would be ambiguous",
            fingerprint=fingerprint,
        )
    value = cns[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _frozen(mapping: dict[str, Any] | None = None) -> MappingProxyType[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class DeviceIdentity:
    """What a verified device certificate becomes: its id and the metadata bound to it."""

    device_id: str
    cert_fingerprint: str
    ca_id: str
    region: str
    serial: str
    subject: str
    not_after: datetime
    attributes: MappingProxyType[str, Any] = field(default_factory=_frozen)
    template: str | None = None
    template_version: int | None = None
    config: MappingProxyType[str, Any] = field(default_factory=_frozen)  # namespace + profile


@dataclass(frozen=True)
class ServiceIdentity:
    """A backend system (ingestion pipeline, dashboard) identified by a service CA."""

    name: str
    cert_fingerprint: str
    ca_id: str


DEFAULT_REGION = "default"


def derive_identity(verified: VerifiedChain, *, default_region: str = DEFAULT_REGION) -> DeviceIdentity:
    """The default enrollment rule: the device id is the subject CN."""
    if verified.anchor.role is not Role.DEVICE:
        raise ValueError("derive_identity is for device anchors")
    leaf = verified.leaf
    fp = verified.fingerprint
    subject = read_subject(leaf, fingerprint=fp)
    device_id = check_device_id(subject_common_name(subject, fingerprint=fp), fingerprint=fp)
    return DeviceIdentity(
        device_id=device_id,
        cert_fingerprint=verified.fingerprint,
        ca_id=verified.anchor.ca_id,
        region=verified.anchor.region or default_region,
        serial=format(leaf.serial_number, "x"),
        subject=subject.rfc4514_string(),
        not_after=leaf.not_valid_after_utc,
        attributes=_frozen(),
        template=verified.anchor.template,
    )


def derive_service(verified: VerifiedChain) -> ServiceIdentity:
    fp = verified.fingerprint
    name = check_device_id(subject_common_name(verified.leaf, fingerprint=fp), fingerprint=fp)
    return ServiceIdentity(name=name, cert_fingerprint=verified.fingerprint, ca_id=verified.anchor.ca_id)
