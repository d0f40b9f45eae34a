"""Console tokens: ``v1.<payload>.<mac>``, an HMAC-SHA256 under the node's console key.

The key (32 random bytes) lives beside the master key, in ``<keys_dir>/console.key`` (mode
0600), made by the first ``jitp console token``; every node that serves the console needs the same
file. A token names a person and a role (auditor, operator or admin) and expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from datetime import datetime
from pathlib import Path

from jitp import errors
from jitp.trust import Role

CONSOLE_ROLES = (Role.AUDITOR, Role.OPERATOR, Role.ADMIN)
KEY_FILE = "console.key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ensure_key(path: Path) -> bytes:
    """The console key at ``path``, made (0600, in a 0700 directory) if there is none."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return read_key(path)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
    return read_key(path)


def read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError:
        raise errors.Forbidden(
            "the console has no key on this node: run `jitp console token` first"
        ) from None
    if len(key) != 32:
        raise errors.Forbidden(f"{path} is not a console key (32 bytes)")
    return key


def make_token(key: bytes, *, name: str, role: Role, expires: datetime) -> str:
    if role not in CONSOLE_ROLES:
        raise errors.InvalidRequest(f"a console token is for an auditor, operator or admin, not {role}")
    if not name or len(name) > 64 or not name.isprintable() or ":" in name:
        raise errors.InvalidRequest("--name: 1-64 printable characters, no ':'")
    payload = _b64(json.dumps({"n": name, "r": str(role), "e": int(expires.timestamp())}).encode())
    return f"v1.{payload}.{_b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())}"


def check_token(key: bytes, token: str, *, now: datetime) -> tuple[str, Role]:
    """(name, role) of a valid token; else :class:`~jitp.errors.Forbidden`."""
    try:
        version, payload, mac = token.split(".")
        good = hmac.compare_digest(_unb64(mac), hmac.new(key, payload.encode(), hashlib.sha256).digest())
        doc = json.loads(_unb64(payload)) if good and version == "v1" else None
    except (ValueError, TypeError):
        doc = None
    if not isinstance(doc, dict):
        raise errors.Forbidden("not a valid console token")
    if int(doc.get("e", 0)) < now.timestamp():
        raise errors.Forbidden("this console token has expired")
    role = Role(str(doc.get("r")))
    if role not in CONSOLE_ROLES:
        raise errors.Forbidden("not a console role")
    return str(doc.get("n")), role


def csrf(key: bytes, token: str, action: str) -> str:
    """The form field that ties a confirmed action to the session that was shown its confirmation."""
    return _b64(hmac.new(key, f"{token}|{action}".encode(), hashlib.sha256).digest())[:32]
