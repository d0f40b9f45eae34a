"""The port the core reports to: :class:`Observer`, with :class:`NullObserver` as the default.

Every method is synchronous and cheap (called on the connection path): an implementation counts,
and defers anything slow (audit writes, publishing) to a task of its own.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Protocol


class JoinOutcome(enum.StrEnum):
    PROVISIONED = "provisioned"  # a record was created (or renewed: reprovisioned)
    RECONNECTED = "reconnected"  # a known device (or a backend principal) admitted again
    REFUSED = "refused"  # CONNACK 5, or a refused TLS handshake
    SHED = "shed"  # CONNACK 3: over a rate, the admission queue full, the registry slow


class Observer(Protocol):
    """What the core reports. The default bodies do nothing: an implementation overrides what it needs."""

    def joined(
        self,
        outcome: JoinOutcome,
        *,
        at: datetime,
        reason: str = "",
        ca: str = "",
        template: str = "",
        region: str = "",
        peer: str | None = None,
        device_id: str | None = None,
    ) -> None:
        """One connect's admission outcome. ``ca``/``template``/``region`` are empty when unknown
        (e.g. a certificate of an unknown CA); ``device_id`` never becomes a metric label."""
        return None

    def limit_hit(self, reason: str) -> None:
        """A connected client hit a limit (queue_full, retained_quota, ...)."""
        return None

    def takeover(
        self,
        *,
        at: datetime,
        device_id: str,
        peer: str | None,
        previous_peer: str | None,
        same_certificate: bool,
    ) -> None:
        """A second connection of an admitted client replaced its live first one."""
        return None

    def admit_seconds(self, seconds: float, outcome: JoinOutcome) -> None:
        """Time spent deciding one admission (ProvisioningService.admit)."""
        return None

    def registry_commit_seconds(self, seconds: float) -> None:
        """Time of one provisioning write, from the request to the committed record."""
        return None

    def join_seconds(self, seconds: float, outcome: JoinOutcome) -> None:
        """Accept to CONNACK of one connection: the connection path calls this (see README)."""
        return None


class NullObserver(Observer):
    """Observes nothing (the CLI, tests of the core, a node without metrics or alerts)."""
