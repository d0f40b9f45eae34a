"""The listener's TLS context, rebuilt from the current trust snapshot.

The context requires a client certificate (CERT_REQUIRED), accepts TLS 1.2+ only, and lets a
registered intermediate act as a trust anchor (partial chains). Each handshake uses whatever
context is current, so a CA registered or disabled at runtime applies to the next handshake,
removals included (a live context can never *remove* a CA, so it is replaced whole).

A refused handshake is audited with the reason OpenSSL gives (:func:`handshake_refusal`). For
"unable to get local issuer certificate" that alone does not say whether the device sent an
incomplete chain or chains to an unknown CA, so the context also keeps the Certificate message the
client sent during its handshake (see :func:`_capture_client_chain`) and the refusal names the cause.
"""

from __future__ import annotations

import _ssl
import logging
import ssl
from pathlib import Path
from types import TracebackType
from typing import Any

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
    _capture_client_chain(ctx, trust)
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


# Verify errors that mean "no registered issuer found": worth saying which certificates were sent.
_MISSING_ISSUER = frozenset({2, 19, 20, 21})
_NOT_CAPTURED = (
    "no issuer found for the client certificate: chain incomplete (no intermediate sent?) or an unknown CA"
)


def handshake_refusal(exc: BaseException) -> tuple[str, str] | None:
    """(reason, message) for a handshake refused because of the client certificate, else None.

    An issuer that was not found keeps its reason (``unknown_ca``); the message adds what the
    client sent, e.g. "unable to get local issuer certificate; chain incomplete (no intermediate
    sent), or an unknown CA: the client sent only its own certificate, and its issuer 'CN=...' is
    not a registered CA".
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code or 0
        message = exc.verify_message or str(exc)
        if code in _MISSING_ISSUER:
            explanation = _explain_missing_issuer(exc, code)
            if explanation:
                message = f"{message}; {explanation}"
        return _VERIFY_REASONS.get(code, "invalid_certificate"), message
    if isinstance(exc, ssl.SSLError) and exc.reason in (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    ):
        return "no_certificate", "the client presented no certificate"
    return None


# -- what the client sent, for a refused handshake ---------------------------------------------------
# OpenSSL does not keep a client chain it refused, and the ssl module has no verify callback. What it
# has is CPython's message callback (``SSLContext._msg_callback``, private: the hook behind test_ssl's
# handshake tracing), which sees each handshake message in clear, TLS 1.3 included. The client's
# Certificate message is kept on its ``ssl.SSLObject`` from its arrival until the client's Finished
# (so only while a handshake is under way), and parsed only when the handshake is refused; the frame
# of ``SSLObject.do_handshake`` in the exception's traceback leads back to it. The raw descriptor of
# ``_ssl._SSLContext`` is set, not ``ssl.SSLContext``'s wrapper, which converts three enums per call:
# OpenSSL calls the hook twice for every record of every connection on the context, measured here
# at +0.4 us per record (the wrapper: +4 us). Without the hook (a Python that moved it), a refusal
# still has its reason, and error 20 a hedged hint.
_HANDSHAKE, _CERTIFICATE, _FINISHED = 22, 11, 20
_TLS13 = 0x0304
_SENT = "_jitp_client_certificate"  # attribute of the ssl.SSLObject while it is in its handshake
_MSG_CALLBACK: Any = getattr(_ssl._SSLContext, "_msg_callback", None)


def _capture_client_chain(ctx: ssl.SSLContext, trust: TrustStore) -> bool:
    """Keep the client's Certificate message (and the trust it was checked against) during handshakes."""
    if _MSG_CALLBACK is None:
        log.debug("ssl has no message callback: handshake refusals will not name the chain the client sent")
        return False

    def on_message(
        conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes
    ) -> None:
        # Runs inside OpenSSL for every record: cheap, and never raises (an exception here would be
        # raised from the connection's next read or write).
        if content_type != _HANDSHAKE or direction != "read":
            return
        try:
            if msg_type == _CERTIFICATE:
                setattr(conn, _SENT, (version, data, trust))
            elif msg_type == _FINISHED:
                vars(conn).pop(_SENT, None)
        except Exception:  # noqa: S110 (not an ssl.SSLObject: nothing to keep it on)
            pass

    _MSG_CALLBACK.__set__(ctx, on_message)
    return True


def certificate_list(version: int, message: bytes) -> list[bytes] | None:
    """The DER certificates of a TLS Certificate handshake message (with its 4-byte header), leaf
    first as sent; None if it is not one or is malformed. ``version``: 0x0304 for the TLS 1.3 layout."""
    if len(message) < 7 or message[0] != _CERTIFICATE:
        return None
    end = 4 + int.from_bytes(message[1:4], "big")
    i = 4
    if version == _TLS13:
        i += 1 + message[i]  # certificate_request_context
    list_end = i + 3 + int.from_bytes(message[i : i + 3], "big")
    i += 3
    if end > len(message) or list_end > end:
        return None
    chain = []
    while i < list_end:
        size = int.from_bytes(message[i : i + 3], "big")
        i += 3
        if size == 0 or i + size > list_end:
            return None
        chain.append(bytes(message[i : i + size]))
        i += size
        if version == _TLS13:  # per-certificate extensions
            i += 2 + int.from_bytes(message[i : i + 2], "big")
    return chain if i == list_end else None


def _handshake_object(tb: TracebackType | None) -> ssl.SSLObject | None:
    """The SSLObject whose do_handshake raised (its frame is in the exception's traceback)."""
    for _ in range(64):
        if tb is None:
            return None
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, ssl.SSLObject):
            return owner
        tb = tb.tb_next
    return None


def _explain_missing_issuer(exc: ssl.SSLCertVerificationError, code: int) -> str | None:
    captured = getattr(_handshake_object(exc.__traceback__), _SENT, None)
    if captured is None:
        return _NOT_CAPTURED if code == 20 else None
    version, message, trust = captured
    chain = certificate_list(version, message)
    if not chain:
        return _NOT_CAPTURED if code == 20 else None
    store: TrustStore = trust
    return store.explain_missing_issuer(chain)
