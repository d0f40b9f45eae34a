"""Envelope encryption of device data at rest (AES-256-GCM, from ``cryptography``).

Every device has its own random 256-bit *data key*. The registry stores:

* in clear, only what lookups, routing and operations need: the device id (the primary key,
  also the MQTT client id and part of every topic), status, issuing CA id, region, template and
  its version, the certificate's validity end, provisioning and last-seen times;
* a *blind index* of the certificate fingerprint (HMAC-SHA256 under a registry index key), so a
  certificate can be looked up without storing its fingerprint;
* everything else sealed under the data key: certificate fingerprint, serial, subject,
  attributes and the device configuration (:func:`seal_record`), and every outbox event payload
  about the device (:func:`seal_payload`). Audit entries were pseudonymised under the same key
  before (:mod:`jitp.crypto.privacy`).

The data key itself is only stored *wrapped* by the master key (:mod:`jitp.crypto.keys`), in the
keyring, which is kept apart from the registry (a separate file, or a separate schema), so that
erasing a device's wrapped key (crypto-shredding) leaves every copy of the registry, old backups
included, unable to decrypt anything about that device.

Ciphertexts are bound to the device id (AES-GCM associated data): a sealed record moved to
another row, or a wrapped key moved to another device, fails to decrypt instead of being misread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import datetime
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from jitp import errors
from jitp.crypto.keys import KEY_BYTES, NONCE_BYTES, MasterKeyProvider
from jitp.crypto.privacy import derive
from jitp.domain.records import DeviceRecord, DeviceStatus

SEALED_VERSION = b"\x01"  # the first byte of every sealed value (JSON payloads start with "{")
# Registry keys (kept wrapped in the keyring): the blind index of certificate fingerprints, and the
# key sealing what audit entries naming no device could reveal (jitp.registry.seal_anonymous).
INDEX_KEY = "fingerprint-index"
AUDIT_KEY = "audit"


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _data_key_aad(device_id: str) -> bytes:
    return b"jitp-data-key\x00" + device_id.encode()


def _registry_key_aad(name: str) -> bytes:
    return b"jitp-registry-key\x00" + name.encode()


def wrap_data_key(provider: MasterKeyProvider, kid: str, device_id: str, data_key: bytes) -> bytes:
    return provider.wrap(kid, data_key, aad=_data_key_aad(device_id))


def unwrap_data_key(provider: MasterKeyProvider, kid: str, device_id: str, wrapped: bytes) -> bytes:
    return provider.unwrap(kid, wrapped, aad=_data_key_aad(device_id))


def wrap_registry_key(provider: MasterKeyProvider, kid: str, name: str, key: bytes) -> bytes:
    return provider.wrap(kid, key, aad=_registry_key_aad(name))


def unwrap_registry_key(provider: MasterKeyProvider, kid: str, name: str, wrapped: bytes) -> bytes:
    return provider.unwrap(kid, wrapped, aad=_registry_key_aad(name))


def fingerprint_index(index_key: bytes, fingerprint: str) -> str:
    """The blind index of a certificate fingerprint: equal fingerprints, equal indexes."""
    return "f:" + hmac.new(index_key, fingerprint.encode(), hashlib.sha256).hexdigest()[:40]


def _seal(key: bytes, purpose: bytes, device_id: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    aad = b"jitp-" + purpose + b"\x00" + device_id.encode()
    return SEALED_VERSION + nonce + AESGCM(derive(key, purpose)).encrypt(nonce, plaintext, aad)


def _open(key: bytes, purpose: bytes, device_id: str, sealed: bytes) -> bytes:
    if sealed[:1] != SEALED_VERSION:
        raise errors.RegistryUnavailable(
            f"sealed {purpose.decode()} data of {device_id!r} has an unknown format"
        )
    aad = b"jitp-" + purpose + b"\x00" + device_id.encode()
    body = sealed[1:]
    try:
        return AESGCM(derive(key, purpose)).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], aad)
    except InvalidTag:
        raise errors.RegistryUnavailable(
            f"sealed {purpose.decode()} data of {device_id!r} does not decrypt with its data key "
            "(altered, or moved from another row)"
        ) from None


def seal_record(key: bytes, record: DeviceRecord) -> bytes:
    doc = {
        "cert_fingerprint": record.cert_fingerprint,
        "serial": record.serial,
        "subject": record.subject,
        "attributes": dict(record.attributes),
        "config": dict(record.config),
    }
    return _seal(key, b"record", record.device_id, json.dumps(doc, separators=(",", ":")).encode())


def open_record(
    key: bytes,
    sealed: bytes,
    *,
    device_id: str,
    status: str,
    ca_id: str,
    region: str,
    not_after: datetime,
    provisioned_at: datetime,
    last_seen: datetime | None,
    template: str | None,
    template_version: int | None,
) -> DeviceRecord:
    doc: dict[str, Any] = json.loads(_open(key, b"record", device_id, sealed))
    return DeviceRecord(
        device_id=device_id,
        status=DeviceStatus(status),
        cert_fingerprint=doc["cert_fingerprint"],
        ca_id=ca_id,
        region=region,
        serial=doc["serial"],
        subject=doc["subject"],
        not_after=not_after,
        provisioned_at=provisioned_at,
        last_seen=last_seen,
        attributes=MappingProxyType(doc["attributes"]),
        template=template,
        template_version=template_version,
        config=MappingProxyType(doc["config"]),
    )


def seal_fingerprint(key: bytes, device_id: str, fingerprint: str) -> bytes:
    """A superseded certificate's fingerprint (reprovisioning history), sealed for its own purpose:
    it cannot pass for an event payload or a record."""
    return _seal(key, b"fingerprint", device_id, fingerprint.encode())


def open_fingerprint(key: bytes, device_id: str, sealed: bytes) -> str:
    return _open(key, b"fingerprint", device_id, sealed).decode()


def seal_payload(key: bytes, device_id: str, payload: bytes) -> bytes:
    return _seal(key, b"event", device_id, payload)


def open_payload(key: bytes | None, device_id: str, stored: bytes) -> bytes:
    """An outbox payload as published. Payloads stored in clear (the erased event) pass through."""
    if stored[:1] != SEALED_VERSION:
        return stored
    if key is None:
        raise errors.RegistryUnavailable(f"the data key of {device_id!r} is gone (the device was erased)")
    return _open(key, b"event", device_id, stored)


def seal_certificate(key: bytes, device_id: str, der: bytes) -> bytes:
    """An operational certificate's DER (jitp.crypto.issuer), sealed for its own purpose."""
    return _seal(key, b"op-cert", device_id, der)


def open_certificate(key: bytes, device_id: str, sealed: bytes) -> bytes:
    return _open(key, b"op-cert", device_id, sealed)
