"""Pseudonyms and crypto-shredding for the audit trail and erasure (GDPR Art. 17).

Audit entries never store a device's personal data in clear. Entries about a device carry:

* ``d:<hex>`` instead of the device id and ``c:<hex>`` instead of its certificate fingerprint,
  both HMAC-SHA256 under that device's own random key;
* ``enc:<base64>`` instead of the peer address: AES-GCM under a key derived from the same key;
* free text (messages) with the device id replaced by ``<device>``.

While the device exists, ``jitp audit export`` resolves them. ``jitp devices erase`` destroys the
device's key: its entries stay in the hash chain (which still verifies) but can no longer be
linked to the device, in this database or in any old backup of it. What stays is a tombstone,
a salted hash of the certificate fingerprint, so the certificate stays refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
DEVICE_PLACEHOLDER = "<device>"


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def derive(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, purpose, hashlib.sha256).digest()


def device_ref(key: bytes, device_id: str) -> str:
    return "d:" + hmac.new(derive(key, b"ref"), device_id.encode(), hashlib.sha256).hexdigest()[:32]


def cert_ref(key: bytes, fingerprint: str) -> str:
    return "c:" + hmac.new(derive(key, b"ref"), fingerprint.encode(), hashlib.sha256).hexdigest()[:32]


def tombstone_ref(salt: bytes, fingerprint: str) -> str:
    return "t:" + hmac.new(salt, fingerprint.encode(), hashlib.sha256).hexdigest()


def seal(key: bytes, text: str) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(derive(key, b"enc")).encrypt(nonce, text.encode(), b"jitp-audit")
    return "enc:" + base64.b64encode(nonce + sealed).decode()


def unseal(key: bytes, token: str) -> str | None:
    if not token.startswith("enc:"):
        return token
    raw = base64.b64decode(token[4:])
    try:
        return AESGCM(derive(key, b"enc")).decrypt(raw[:12], raw[12:], b"jitp-audit").decode()
    except (InvalidTag, ValueError):
        return None


def scrub(text: str, *secrets: str) -> str:
    """``text`` with each secret (and its repr) replaced by ``<device>``, longest first."""
    present = [s for s in secrets if s and s in text]
    for secret in sorted(present, key=len, reverse=True):
        text = text.replace(repr(secret), DEVICE_PLACEHOLDER).replace(secret, DEVICE_PLACEHOLDER)
    return text
