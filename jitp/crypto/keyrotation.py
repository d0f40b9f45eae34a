"""Master key rotation: ``jitp keys rotate``.

Online and resumable. With a key file:

1. a new key is put first in the key file, the old one kept after it (brokers reading the file
   pick the new one up the first time they meet it: :meth:`~jitp.crypto.keys.LocalKeys.reload`);
2. the registry's primary becomes the new key, so every data key made from then on, by any
   node, is wrapped under it (:meth:`~jitp.registry.Registry.set_primary_key`);
3. every data key still under the old key is re-wrapped, a batch per transaction;
4. once none is left, the old key is removed from the key file.

Interrupted anywhere (Ctrl-C, a crash, ``max_batches``), running it again resumes: a key file
whose first key is not the registry's primary, or a keyring with keys under a non-primary key,
is a rotation in progress, and no new key is made until it is finished. Runs are serialised by a
lock on the key file.

Several nodes with a key file each: ``stage=True`` (``jitp keys rotate --stage``) stops after
step 1; copy the key file to every node, then run ``jitp keys rotate`` to do steps 2 to 4 (and
copy the final file again). Until a node has the new key, it cannot make data keys (its first
joins get CONNACK 3), but it keeps serving known devices.

With keys from the environment nothing can be written for the operator: they put a new key
(``jitp keys generate``) first in the variable, keep the old one after it, restart the brokers,
run ``jitp keys rotate`` (steps 2 and 3), then drop the old key from the variable.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from jitp import errors
from jitp.crypto.keys import MasterKey, MasterKeyProvider, read_key_file, write_key_file
from jitp.domain.audit import AuditDraft
from jitp.registry import Registry


@dataclass(frozen=True)
class RotationReport:
    primary: str  # the key everything is (to be) wrapped under
    previous: tuple[str, ...]  # the keys it replaces
    rewrapped: int  # keys re-wrapped by this run
    complete: bool  # nothing is left under an old key
    retired: bool  # the old keys were removed from the key file
    staged: bool = False  # only step 1 was done (stage=True)


@contextlib.contextmanager
def _exclusive(key_file: Path) -> Iterator[None]:
    lock = key_file.with_name(key_file.name + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.InvalidRequest(f"another `jitp keys rotate` holds {lock}; wait for it") from None
        yield
    finally:
        os.close(fd)


async def rotate_keys(
    registry: Registry,
    provider: MasterKeyProvider,
    *,
    key_file: Path | None,
    actor: str,
    clock: Callable[[], datetime],
    batch: int = 500,
    max_batches: int | None = None,
    keep_old: bool = False,
    stage: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RotationReport:
    """Rotate (or finish rotating) the master key. ``key_file`` None: keys from the environment."""
    if batch < 1:
        raise errors.InvalidRequest("batch must be >= 1")
    if key_file is None:
        if stage:
            raise errors.InvalidRequest(
                "--stage writes the key file; with $JITP_MASTER_KEY, add the key yourself"
            )
        return await _rotate(
            registry, provider, None, [], actor, clock, batch, max_batches, keep_old, progress
        )
    with _exclusive(key_file):
        status = await registry.keyring_status()
        file_keys = read_key_file(key_file)
        if status.pending == 0 and file_keys[0].kid == status.primary:  # no rotation under way: start one
            file_keys = [MasterKey.generate(), *file_keys]
            write_key_file(key_file, file_keys)
            provider.reload()
        if stage:
            return RotationReport(
                file_keys[0].kid, (status.primary,), 0, complete=False, retired=False, staged=True
            )
        return await _rotate(
            registry, provider, key_file, file_keys, actor, clock, batch, max_batches, keep_old, progress
        )


async def _rotate(
    registry: Registry,
    provider: MasterKeyProvider,
    key_file: Path | None,
    file_keys: list[MasterKey],
    actor: str,
    clock: Callable[[], datetime],
    batch: int,
    max_batches: int | None,
    keep_old: bool,
    progress: Callable[[int], None] | None,
) -> RotationReport:
    status = await registry.keyring_status()
    if key_file is not None:
        target = file_keys[0].kid
        previous = tuple(k.kid for k in file_keys[1:])
    else:
        target = provider.kids()[0]
        previous = tuple(k for k in provider.kids()[1:])
        if target == status.primary and status.pending == 0:
            raise errors.InvalidRequest(
                f"nothing to rotate: every key is wrapped under {target}, the first key in {provider.source}. "
                "To rotate keys kept in the environment: put a new key (`jitp keys generate`) first in it, "
                "keep the current one after it, restart the brokers with it, then run `jitp keys rotate` again"
            )
    if status.primary != target:
        await registry.set_primary_key(
            target,
            audit=AuditDraft(
                at=clock(),
                action="key-rotation-started",
                actor=actor,
                details=MappingProxyType({"from": status.primary, "to": target}),
            ),
        )
    rewrapped = batches = 0
    while max_batches is None or batches < max_batches:
        done = await registry.rewrap_keys(limit=batch)
        batches += 1
        if done == 0:
            break
        rewrapped += done
        if progress is not None:
            progress(rewrapped)
    remaining = (await registry.keyring_status()).pending
    if remaining:
        return RotationReport(target, previous, rewrapped, complete=False, retired=False)
    await registry.append_audit(
        [
            AuditDraft(
                at=clock(),
                action="key-rotation-finished",
                actor=actor,
                details=MappingProxyType({"primary": target, "rewrapped": str(rewrapped)}),
            )
        ]
    )
    retired = False
    if key_file is not None and not keep_old and len(file_keys) > 1:
        write_key_file(key_file, file_keys[:1])
        retired = True
    return RotationReport(target, previous, rewrapped, complete=True, retired=retired)
