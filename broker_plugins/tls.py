"""The listener's TLS context, rebuilt from the current trust snapshot.

The context requires a client certificate (CERT_REQUIRED), accepts TLS 1.2+ only, and lets a
registered intermediate act as a trust anchor (partial chains). Each handshake uses whatever
context is current, so a CA registered or disabled at runtime applies to the next handshake,
removals included (a live context can never *remove* a CA, so it is replaced whole).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from jitp import errors
from jitp.trust import TrustStore

log = logging.getLogger(__name__)


def server_context(
    *, cert: Path, key: Path, trust: TrustStore, min_version: str = "1.2", session_tickets: int = 0
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.num_tickets = session_tickets
    for path, key_name in ((cert, "listener.server_cert"), (key, "listener.server_key")):
        if not Path(path).is_file():
            raise errors.ConfigError(
                f"{path}: no such file (run 'jitp pki init' or pass --server-cert/--server-key)", key=key_name
            )
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(
            f"server certificate {cert} / key {key} unusable: {exc}", key="listener.server_cert"
        ) from None
    bundle = trust.pem_bundle()
    if bundle:
        ctx.load_verify_locations(cadata=bundle)
    return ctx


class TlsContextHolder:
    """Holds the current server context; swapped when the trust snapshot changes."""

    def __init__(self, *, cert: Path, key: Path, min_version: str, session_tickets: int) -> None:
        self._cert = cert
        self._key = key
        self._min_version = min_version
        self._tickets = session_tickets
        self.context = self.build(TrustStore())

    def build(self, trust: TrustStore) -> ssl.SSLContext:
        return server_context(
            cert=self._cert,
            key=self._key,
            trust=trust,
            min_version=self._min_version,
            session_tickets=self._tickets,
        )

    def update(self, trust: TrustStore) -> None:
        self.context = self.build(trust)
        log.info("TLS trust updated: %d CA(s) accepted for client certificates", len(trust.anchors))


# OpenSSL X509_V_ERR_* codes -> jitp refusal reasons (for handshakes refused before MQTT starts).
_VERIFY_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "not_yet_valid",
    10: "expired",
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed cert in chain
    20: "unknown_ca",  # unable to get local issuer
    21: "unknown_ca",  # unable to verify the first certificate
    24: "invalid_ca",  # invalid CA certificate
    26: "bad_key_usage",  # unsupported purpose
    28: "unknown_ca",  # certificate rejected
    66: "weak_key",  # EE key too small
    67: "weak_key",  # CA key too small
    68: "weak_key",  # CA md too weak
}


def handshake_refusal(exc: BaseException) -> tuple[str, str] | None:
    """(reason, message) for a handshake refused because of the client certificate, else None."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code or 0
        return _VERIFY_REASONS.get(code, "invalid_certificate"), exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError) and exc.reason in (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    ):
        return "no_certificate", "the client presented no certificate"
    return None
