"""Master keys: where they come from, and wrapping per-device data keys under them.

Device data at rest is envelope-encrypted (see :mod:`jitp.crypto.envelope`): each device has its own
random data key, and only the *wrapped* data key (AES-256-GCM under a master key) is stored, in
the keyring. The master key itself is never stored by the registry. It comes from a
:class:`MasterKeyProvider`:

* :class:`FileKeyProvider`: a key file (mode 0600, made by ``jitp keys init``), or
* :class:`EnvKeyProvider`: an environment variable (``JITP_MASTER_KEY``), when it is set;
* a KMS or HSM later: anything with ``kids``/``wrap``/``unwrap``/``reload``, so the master key
  need never leave the device that holds it.

A provider holds one or more keys, the *primary* first. New data keys are wrapped under the
primary; the others only unwrap, while ``jitp keys rotate`` re-wraps everything under the
primary. Each key is known by its *kid*, a hash of it, which is stored beside every wrapped key:
a wrong key is then a clear error ("wrapped under mk-…, the configured key is mk-…"), never a
silent garbage read.

Key file format: one key per line, ``jitp-mk-v1:<base64>``, the primary first; ``#`` comments.
The environment variable holds the same tokens, separated by commas.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from jitp import errors

KEY_BYTES = 32
NONCE_BYTES = 12
TOKEN_PREFIX = "jitp-mk-v1:"  # noqa: S105 (a format marker, not a secret)
DEFAULT_ENV = "JITP_MASTER_KEY"
_HEADER = (
    "# jitp master keys. Keep this file secret (mode 0600) and back it up apart from the registry.\n"
    "# The first key wraps new data keys; any later key only unwraps until `jitp keys rotate` finishes.\n"
)


def key_id(secret: bytes) -> str:
    """A master key's public name: a hash of it (it reveals nothing about the key)."""
    return "mk-" + hashlib.sha256(b"jitp master key id\x00" + secret).hexdigest()[:16]


@dataclass(frozen=True)
class MasterKey:
    kid: str
    secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> MasterKey:
        secret = os.urandom(KEY_BYTES)
        return cls(key_id(secret), secret)

    @classmethod
    def parse(cls, token: str, *, where: str) -> MasterKey:
        """A key from its ``jitp-mk-v1:<base64>`` token. The error never echoes the token."""
        token = token.strip()
        if not token.startswith(TOKEN_PREFIX):
            raise errors.MasterKeyInvalid(f"a master key must start with {TOKEN_PREFIX!r}", where=where)
        try:
            secret = base64.b64decode(token[len(TOKEN_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise errors.MasterKeyInvalid("a master key is not valid base64", where=where) from None
        if len(secret) != KEY_BYTES:
            raise errors.MasterKeyInvalid(
                f"a master key must be {KEY_BYTES} bytes, this one is {len(secret)}", where=where
            )
        return cls(key_id(secret), secret)

    def token(self) -> str:
        return TOKEN_PREFIX + base64.b64encode(self.secret).decode()


class MasterKeyProvider(Protocol):
    """Where the master keys live. Data keys are wrapped and unwrapped through it."""

    @property
    def source(self) -> str:
        """Where the keys come from, for messages (never the keys)."""
        ...

    def kids(self) -> tuple[str, ...]:
        """The ids of the keys it holds, the primary first."""
        ...

    def wrap(self, kid: str, data_key: bytes, *, aad: bytes) -> bytes:
        """``data_key`` wrapped under key ``kid``, bound to ``aad`` (e.g. the device id)."""
        ...

    def unwrap(self, kid: str, wrapped: bytes, *, aad: bytes) -> bytes:
        """The data key; :class:`~jitp.errors.MasterKeyMismatch` if ``kid`` is not held or it fails."""
        ...

    def reload(self) -> None:
        """Read the keys again (a rotation added a new primary)."""
        ...


class LocalKeys:
    """Master keys held in this process's memory (the base of the file and environment providers)."""

    def __init__(self, keys: Sequence[MasterKey], *, source: str = "memory") -> None:
        self._source = source
        self._set(keys)

    def _set(self, keys: Sequence[MasterKey]) -> None:
        if not keys:
            raise errors.MasterKeyMissing(f"{self._source} holds no master key")
        self._keys = tuple(keys)
        self._by_kid = {k.kid: AESGCM(k.secret) for k in self._keys}

    @property
    def source(self) -> str:
        return self._source

    def kids(self) -> tuple[str, ...]:
        return tuple(k.kid for k in self._keys)

    def _cipher(self, kid: str) -> AESGCM:
        cipher = self._by_kid.get(kid)
        if cipher is None:
            self.reload()  # a rotation may have added it since we read the keys
            cipher = self._by_kid.get(kid)
        if cipher is None:
            raise errors.MasterKeyMismatch(
                f"data is wrapped under master key {kid}, which {self.source} does not hold "
                f"(it holds {', '.join(self.kids())})",
                kid=kid,
            )
        return cipher

    def wrap(self, kid: str, data_key: bytes, *, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._cipher(kid).encrypt(nonce, data_key, aad)

    def unwrap(self, kid: str, wrapped: bytes, *, aad: bytes) -> bytes:
        try:
            return self._cipher(kid).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except InvalidTag:
            raise errors.MasterKeyMismatch(
                f"a data key does not unwrap under master key {kid}: the keyring was altered "
                "or belongs to another registry",
                kid=kid,
            ) from None

    def reload(self) -> None:
        return None


def require_kids(provider: MasterKeyProvider, used: Sequence[str], *, where: str) -> None:
    """Check that ``provider`` holds every key in ``used`` (reading its keys again once if not):
    :class:`~jitp.errors.MasterKeyMismatch` naming both sides otherwise (never the keys)."""
    if any(kid not in provider.kids() for kid in used):
        provider.reload()  # a rotation may have added a key since the provider read them
    missing = [kid for kid in used if kid not in provider.kids()]
    if missing:
        raise errors.MasterKeyMismatch(
            f"wrong master key: this registry's data keys are wrapped under {', '.join(used)}, "
            f"but {provider.source} holds {', '.join(provider.kids())} (missing: {', '.join(missing)})",
            where=where,
            kid=missing[0],
        )


def parse_tokens(text: str, *, where: str) -> list[MasterKey]:
    keys: list[MasterKey] = []
    for raw in text.replace(",", "\n").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keys.append(MasterKey.parse(line, where=where))
    if len({k.kid for k in keys}) != len(keys):
        raise errors.MasterKeyInvalid("the same master key is listed twice", where=where)
    return keys


class EnvKeyProvider(LocalKeys):
    """Keys from an environment variable: comma-separated tokens, the primary first."""

    def __init__(self, var: str = DEFAULT_ENV) -> None:
        self.var = var
        super().__init__(self._read(), source=f"${var}")

    def _read(self) -> list[MasterKey]:
        value = os.environ.get(self.var, "")
        if not value.strip():
            raise errors.MasterKeyMissing(f"${self.var} is not set", where=f"${self.var}")
        return parse_tokens(value, where=f"${self.var}")

    def reload(self) -> None:
        with contextlib.suppress(errors.MasterKeyError):
            self._set(self._read())


class FileKeyProvider(LocalKeys):
    """Keys from a key file (see :func:`init_key_file`); refused if others may read it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        super().__init__(read_key_file(self.path), source=f"key file {self.path}")

    def reload(self) -> None:
        with contextlib.suppress(errors.MasterKeyError, OSError):
            self._set(read_key_file(self.path))


def read_key_file(path: Path) -> list[MasterKey]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise errors.MasterKeyMissing(
            f"no master key file here: create one with `jitp keys init`, or set ${DEFAULT_ENV}",
            where=str(path),
        ) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise errors.MasterKeyInvalid(
            f"the master key file is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "run chmod 600 on it",
            where=str(path),
        )
    return parse_tokens(path.read_text(encoding="ascii", errors="replace"), where=str(path))


def write_key_file(path: Path, keys: Sequence[MasterKey], *, exclusive: bool = False) -> None:
    """Write ``keys`` (primary first) with mode 0600, atomically (a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = _HEADER + "".join(k.token() + "\n" for k in keys)
    if exclusive:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def init_key_file(path: Path) -> MasterKey:
    """Create a key file with one new key. Never overwrites: an existing file is an error."""
    key = MasterKey.generate()
    try:
        write_key_file(path, [key], exclusive=True)
    except FileExistsError:
        raise errors.MasterKeyInvalid(
            "a master key file already exists here; it is never overwritten "
            "(use `jitp keys rotate` to change keys)",
            where=str(path),
        ) from None
    return key


def default_keys_dir(data_dir: Path) -> Path:
    """``var/data`` -> ``var/data-keys``: next to the data directory, not inside it, so a backup
    of the data directory does not carry the keys that decrypt it."""
    data_dir = Path(data_dir)
    return data_dir.parent / f"{data_dir.resolve().name or 'jitp'}-keys"


def provider_for(key_file: Path, *, env: str = DEFAULT_ENV) -> MasterKeyProvider:
    """The environment variable's keys when it is set, otherwise the key file's."""
    if os.environ.get(env, "").strip():
        return EnvKeyProvider(env)
    return FileKeyProvider(key_file)
