"""The one exception tree of jitp.

Every error the core raises is a :class:`ProvisioningError`. Refusals of a device carry a
stable machine-readable ``reason`` (it goes into the audit log and the tests) and the fields
that explain it. Only ``broker_plugins`` maps these to MQTT outcomes (CONNACK codes).

    ProvisioningError
    ├── Refused                      a connecting client is not admitted (CONNACK 5)
    │   ├── NoClientCertificate      no_certificate
    │   ├── InvalidCertificate       invalid_certificate  (unparseable DER)
    │   ├── UntrustedChain           unknown_ca           (no path to an enabled anchor)
    │   ├── CertificateExpired       expired
    │   ├── CertificateNotYetValid   not_yet_valid
    │   ├── CaCertificateAsLeaf      ca_as_leaf
    │   ├── BadKeyUsage              bad_key_usage        (KeyUsage or EKU forbid client auth)
    │   ├── WeakKey                  weak_key
    │   ├── UnsafeIdentity           unsafe_id
    │   ├── ClientIdMismatch         client_id_mismatch
    │   ├── IdentityConflict         identity_conflict
    │   ├── DeviceErased             erased               (a tombstone matches the certificate)
    │   ├── CertificateRevoked       revoked              (listed in the issuing CA's CRL)
    │   ├── StaleCrl                 crl_stale            (only with trust.stale_crl: refuse)
    │   ├── MissingAttribute         missing_attribute    (a required template value is absent)
    │   ├── TemplateNotFound         template_not_found   (the CA is bound to an unknown template)
    │   ├── DeviceBlocked            device_blocked       (record not active)
    │   ├── UnsupportedProtocol      unsupported_protocol (an MQTT version the broker does not speak)
    │   ├── WillNotAllowed           will_not_allowed     (the CONNECT's will topic is outside the namespace)
    │   ├── CertificateSuperseded    superseded           (an operational certificate replaced by a newer one)
    │   ├── PendingExpired           pending_expired      (a pending certificate not used within its commit window)
    │   ├── UnknownOperational       unknown_certificate  (signed by the issuer, but not issued to this id)
    │   ├── BirthCertificateRetired  birth_retired        (template birth_certificate: retire, after enrollment)
    │   └── LimitExceeded            a connected client's request is refused, a broker limit holds
    │       ├── QueueFull            queue_full           (a session's outgoing queue is full)
    │       ├── RetainedQuota        retained_quota       (per client, or the broker's total)
    │       ├── SubscriptionLimit    subscription_limit   (limits.max_subscriptions)
    │       ├── ProtocolViolation    protocol_violation   (a malformed packet: the connection is closed)
    │       ├── ProfileLimit         profile_limit        (a message over the profile's size or rate: MQTT 5 DISCONNECT 0x95/0x96)
    │       ├── PacketTooLarge       packet_too_large     (a CONNECT over limits.max_packet_size; MQTT 5: CONNACK 0x95)
    │       └── ClaimOnly            claim_only           (a claim connection went outside $jitp/certificates/<client_id>/)
    ├── Unavailable                  the server cannot decide now (CONNACK 3)
    │   ├── RegistryUnavailable      registry_unavailable
    │   └── Overloaded               overloaded           (admission queue full, CA/region over its rate)
    ├── EnrollmentRejected           a CSR request is answered on .../rejected with this reason; nothing issued
    │   ├── InvalidCsr               invalid_csr          (not a readable PEM CSR)
    │   ├── CsrSignatureInvalid      csr_signature_invalid (no proof of possession)
    │   ├── CaRequested              ca_requested         (basicConstraints CA:TRUE asked for)
    │   ├── WeakCsrKey               weak_key
    │   ├── ForbiddenTopic           forbidden_topic      (another device's $jitp/certificates/<id>/...)
    │   ├── PayloadTooLarge          payload_too_large
    │   ├── InvalidJson              invalid_json
    │   ├── MissingField             missing_field
    │   ├── RateLimited              rate_limited         (issuer.rate per device)
    │   ├── RequestIdConflict        request_id_conflict  (a request id reused with another key)
    │   ├── EnrollmentNotAllowed     device_blocked       (the device is not active)
    │   ├── IssuerMissing            issuer_missing
    │   ├── IssuerExpired            issuer_expired
    │   ├── ClaimConflict            identity_conflict    (a claim for a device id that exists; template reprovision: reject)
    │   └── InvalidParameters        invalid_parameters   (a claim's parameters fail its CA's template)
    ├── ConfigError                  bad configuration (file, line, key)
    │   └── MasterKeyError           the master key cannot be used (the broker refuses to start)
    │       ├── MasterKeyMissing     no key file and no environment variable
    │       ├── MasterKeyInvalid     unreadable, badly formed or too widely readable key material
    │       └── MasterKeyMismatch    the registry's data keys are wrapped under another key
    ├── WorkersFailed                `jitp serve --workers N`: a worker could not start, or kept dying
    └── OperatorError                a bad admin/CLI request; nothing was changed
        ├── NotFound                 unknown device or CA
        ├── Forbidden                the caller's role does not allow it
        └── InvalidRequest           bad input, e.g. a file that is not a CA certificate
"""

from __future__ import annotations

from typing import ClassVar


class ProvisioningError(Exception):
    """Root of every jitp error."""

    reason: ClassVar[str] = "error"

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields: dict[str, object] = {k: v for k, v in fields.items() if v is not None}

    def __str__(self) -> str:
        return self.message


class Refused(ProvisioningError):
    """A client is refused admission. ``reason`` is stable and machine readable."""

    reason = "refused"

    def __init__(
        self,
        message: str,
        *,
        device_id: str | None = None,
        fingerprint: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, device_id=device_id, fingerprint=fingerprint, detail=detail)
        self.device_id = device_id
        self.fingerprint = fingerprint
        self.detail = detail


class NoClientCertificate(Refused):
    reason = "no_certificate"


class InvalidCertificate(Refused):
    reason = "invalid_certificate"


class UntrustedChain(Refused):
    reason = "unknown_ca"


class CertificateExpired(Refused):
    reason = "expired"


class CertificateNotYetValid(Refused):
    reason = "not_yet_valid"


class CaCertificateAsLeaf(Refused):
    reason = "ca_as_leaf"


class BadKeyUsage(Refused):
    reason = "bad_key_usage"


class WeakKey(Refused):
    reason = "weak_key"


class UnsafeIdentity(Refused):
    reason = "unsafe_id"


class ClientIdMismatch(Refused):
    reason = "client_id_mismatch"


class IdentityConflict(Refused):
    reason = "identity_conflict"


class DeviceBlocked(Refused):
    reason = "device_blocked"


class DeviceErased(Refused):
    """The certificate belonged to a device erased under GDPR Art. 17; it stays refused."""

    reason = "erased"


class CertificateRevoked(Refused):
    """A CRL of the issuing CA lists the certificate."""

    reason = "revoked"


class StaleCrl(Refused):
    """The issuing CA's CRL is past nextUpdate and trust.stale_crl is 'refuse'."""

    reason = "crl_stale"


class MissingAttribute(Refused):
    """A value the enrollment template requires is missing or unusable; ``detail`` names it."""

    reason = "missing_attribute"


class TemplateNotFound(Refused):
    reason = "template_not_found"


class UnsupportedProtocol(Refused):
    """The CONNECT asks for a protocol version (level) the broker does not speak."""

    reason = "unsupported_protocol"


class WillNotAllowed(Refused):
    """The CONNECT carries a Last Will whose topic the client may not publish to."""

    reason = "will_not_allowed"


class LimitExceeded(Refused):
    """A connected client went past a broker limit; what it asked for is refused, and audited."""

    reason = "limit_exceeded"


class QueueFull(LimitExceeded):
    reason = "queue_full"


class RetainedQuota(LimitExceeded):
    reason = "retained_quota"


class SubscriptionLimit(LimitExceeded):
    reason = "subscription_limit"


class ProtocolViolation(LimitExceeded):
    """A packet the MQTT specification says closes the connection."""

    reason = "protocol_violation"


class ProfileLimit(LimitExceeded):
    """A message over the device profile's ``max_message_size`` or message rate (W8)."""

    reason = "profile_limit"


class PacketTooLarge(LimitExceeded):
    """A CONNECT over ``limits.max_packet_size``: refused before it is read (MQTT 5: CONNACK 0x95)."""

    reason = "packet_too_large"


class ClaimOnly(LimitExceeded):
    """A connection with a claim certificate published outside ``$jitp/certificates/<client_id>/``."""

    reason = "claim_only"


class CertificateSuperseded(Refused):
    reason = "superseded"


class PendingExpired(Refused):
    reason = "pending_expired"


class UnknownOperational(Refused):
    reason = "unknown_certificate"


class BirthCertificateRetired(Refused):
    reason = "birth_retired"


class EnrollmentRejected(ProvisioningError):
    """A certificate request refused; the device gets ``reason`` on ``$jitp/certificates/<id>/rejected``."""

    reason = "enrollment_rejected"


class InvalidCsr(EnrollmentRejected):
    reason = "invalid_csr"


class CsrSignatureInvalid(EnrollmentRejected):
    reason = "csr_signature_invalid"


class CaRequested(EnrollmentRejected):
    reason = "ca_requested"


class WeakCsrKey(EnrollmentRejected):
    reason = "weak_key"


class ForbiddenTopic(EnrollmentRejected):
    reason = "forbidden_topic"


class PayloadTooLarge(EnrollmentRejected):
    reason = "payload_too_large"


class InvalidJson(EnrollmentRejected):
    reason = "invalid_json"


class MissingField(EnrollmentRejected):
    reason = "missing_field"


class RateLimited(EnrollmentRejected):
    reason = "rate_limited"


class RequestIdConflict(EnrollmentRejected):
    reason = "request_id_conflict"


class EnrollmentNotAllowed(EnrollmentRejected):
    reason = "device_blocked"


class IssuerMissing(EnrollmentRejected):
    reason = "issuer_missing"


class IssuerExpired(EnrollmentRejected):
    reason = "issuer_expired"


class ClaimConflict(EnrollmentRejected):
    """A claim whose parameters name a device that exists (one claim certificate shared by a batch
    must not let one device take another's id), unless the template's reprovision policy allows it."""

    reason = "identity_conflict"


class InvalidParameters(EnrollmentRejected):
    """A claim's ``parameters`` fail its CA's template (unknown, missing, malformed, unsafe id)."""

    reason = "invalid_parameters"


class Unavailable(ProvisioningError):
    """The server cannot take the decision now; the client should back off and retry."""

    reason = "unavailable"


class RegistryUnavailable(Unavailable):
    reason = "registry_unavailable"


class Overloaded(Unavailable):
    """Load shedding: the provisioning queue is full, or the CA's or region's join rate is exceeded.

    ``scope`` names what was exhausted ("queue", "ca:<id>", "region:<name>"); ``retry_after`` is a
    hint in seconds (None when unknown).
    """

    reason = "overloaded"

    def __init__(self, message: str, *, scope: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, scope=scope, retry_after=retry_after)
        self.scope = scope
        self.retry_after = retry_after


class ConfigError(ProvisioningError):
    """Invalid configuration. ``where`` names the file (and line) and ``key`` the offending setting."""

    reason = "config_error"

    def __init__(self, message: str, *, where: str | None = None, key: str | None = None) -> None:
        prefix = f"{where}: " if where else ""
        at = f"{key}: " if key else ""
        super().__init__(f"{prefix}{at}{message}", where=where, key=key)
        self.problem = message  # the message without the location and key
        self.where = where
        self.key = key


class MasterKeyError(ConfigError):
    """The master key that encrypts device data at rest cannot be used. ``kid``: the key asked for."""

    reason = "master_key"

    def __init__(self, message: str, *, where: str | None = None, kid: str | None = None) -> None:
        super().__init__(message, where=where)
        self.fields.update({"kid": kid} if kid else {})
        self.kid = kid


class MasterKeyMissing(MasterKeyError):
    reason = "master_key_missing"


class MasterKeyInvalid(MasterKeyError):
    reason = "master_key_invalid"


class MasterKeyMismatch(MasterKeyError):
    reason = "master_key_mismatch"


class WorkersFailed(ProvisioningError):
    """A worker process of `jitp serve --workers N` could not start, or kept dying at start."""

    reason = "workers_failed"


class OperatorError(ProvisioningError):
    """A bad request from an operator (CLI or admin API). Nothing was changed."""

    reason = "operator_error"


class NotFound(OperatorError):
    reason = "not_found"


class Forbidden(OperatorError):
    """The caller's role does not allow the request."""

    reason = "forbidden"


class InvalidRequest(OperatorError):
    reason = "invalid_request"


REFUSAL_REASONS: tuple[str, ...] = tuple(
    cls.reason
    for cls in (
        NoClientCertificate,
        InvalidCertificate,
        UntrustedChain,
        CertificateExpired,
        CertificateNotYetValid,
        CaCertificateAsLeaf,
        BadKeyUsage,
        WeakKey,
        UnsafeIdentity,
        ClientIdMismatch,
        IdentityConflict,
        DeviceBlocked,
        MissingAttribute,
        TemplateNotFound,
        DeviceErased,
        CertificateRevoked,
        StaleCrl,
        UnsupportedProtocol,
        WillNotAllowed,
        CertificateSuperseded,
        PendingExpired,
        UnknownOperational,
        BirthCertificateRetired,
        LimitExceeded,
        QueueFull,
        RetainedQuota,
        SubscriptionLimit,
        ProtocolViolation,
        ProfileLimit,
        PacketTooLarge,
        ClaimOnly,
    )
)
