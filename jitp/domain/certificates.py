"""Operational certificates: what the registry keeps about each certificate the issuing CA signed.

A certificate is ``pending`` from issuance until the device connects with it (then ``current``;
the previous current one becomes ``superseded``), or until its commit window closes (``expired``:
the old certificate stays valid). Revocation (the device revoked or erased) lists it in the
issuer's CRL. Pure: every decision takes the time it is made at.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

CERTIFICATES_PREFIX = "$jitp/certificates/"
CREATE_FROM_CSR = "create-from-csr"


def certificates_filter(device_id: str) -> str:
    """Everything a device may reach of the certificate API: its own topics only."""
    return f"{CERTIFICATES_PREFIX}{device_id}/#"


def request_topic(device_id: str) -> str:
    return f"{CERTIFICATES_PREFIX}{device_id}/{CREATE_FROM_CSR}"


def answer_topic(device_id: str, *, accepted: bool) -> str:
    return f"{CERTIFICATES_PREFIX}{device_id}/{'accepted' if accepted else 'rejected'}"


class CertState(enum.StrEnum):
    PENDING = "pending"
    CURRENT = "current"
    SUPERSEDED = "superseded"
    EXPIRED = "expired"  # a pending certificate never used within its commit window
    REVOKED = "revoked"


class BirthPolicy(enum.StrEnum):
    """A template's ``birth_certificate``: may the factory certificate connect once enrolled?"""

    KEEP = "keep"  # yes, as before
    ENROLL_ONLY = "enroll_only"  # only to reach $jitp/certificates/<id>/# (re-enrollment)
    RETIRE = "retire"  # no: refused once an operational certificate is current


@dataclass(frozen=True)
class OperationalCertificate:
    certificate_id: str
    device_id: str
    request_id: str
    issuer_id: str
    fingerprint: str
    serial: int
    state: CertState
    issued_at: datetime
    not_before: datetime
    not_after: datetime
    commit_by: datetime
    changed_at: datetime | None
    cert_der: bytes

    def effective_state(self, now: datetime) -> CertState:
        """``pending`` past its commit window reads as ``expired`` even before a sweep marked it."""
        if self.state is CertState.PENDING and now > self.commit_by:
            return CertState.EXPIRED
        return self.state

    @property
    def renew_after(self) -> datetime:
        return renew_after(self.not_before, self.not_after)

    def to_json(self, now: datetime | None = None) -> dict[str, Any]:
        state = self.effective_state(now) if now is not None else self.state
        return {
            "certificate_id": self.certificate_id,
            "state": str(state),
            "fingerprint": self.fingerprint,
            "serial": format(self.serial, "x"),
            "issued_at": self.issued_at.isoformat(),
            "not_after": self.not_after.isoformat(),
            "renew_after": self.renew_after.isoformat(),
            "commit_by": self.commit_by.isoformat(),
        }


def renew_after(not_before: datetime, not_after: datetime, fraction: float = 2 / 3) -> datetime:
    """When a device should renew: at ``fraction`` (2/3 by default) of the validity."""
    return not_before + timedelta(seconds=(not_after - not_before).total_seconds() * fraction)


def certificate_config(cert: OperationalCertificate) -> dict[str, str]:
    """The ``certificate`` entry of the device's retained configuration."""
    return {"not_after": cert.not_after.isoformat(), "renew_after": cert.renew_after.isoformat()}
