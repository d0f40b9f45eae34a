"""Reading the certificate, key and CRL files an operator names, with a size cap.

The CLI (local and remote mode) reads every such file through here: at most ``cap`` bytes, so that a
wrong path (``/dev/zero``, a disk image) is refused at once instead of being read until memory runs
out. A CA certificate file must hold exactly one certificate: a bundle is refused rather than cut to
its first certificate.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from jitp import errors

MAX_CERT_FILE = 1024 * 1024  # bytes; a certificate (chain) or key file is a few KiB
MAX_CRL_FILE = 16 * 1024 * 1024  # bytes; a CRL of ~400,000 revoked serials


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """At most ``cap`` bytes of ``path``: reads ``cap + 1`` and refuses more (``/dev/zero`` at once)."""
    try:
        with path.open("rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise errors.InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > cap:
        raise errors.InvalidRequest(
            f"{path} is larger than {_size(cap)}, the limit for {what}; is it the right file?"
        )
    return data


def load_certs(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file, or the one in a DER file (read with a size cap)."""
    data = read_capped(path, MAX_CERT_FILE, "a certificate file")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise errors.InvalidRequest(f"{path} holds no PEM or DER certificate") from None


def load_ca_cert(path: Path) -> x509.Certificate:
    """The one certificate in ``path``. A bundle is refused rather than cut to its first
    certificate: which of them was meant cannot be guessed, and registering only one is silent."""
    found = load_certs(path)
    if len(found) > 1:
        raise errors.InvalidRequest(
            f"{path} holds {len(found)} certificates; put each CA certificate in a file of its own "
            "and register each separately"
        )
    return found[0]


def load_leaf(path: Path) -> x509.Certificate:
    """The leaf of a chain file (leaf first, then its CAs, as TLS sends it). Several leaves are
    refused: acting on only the first of them would be silent."""
    leaf, *rest = load_certs(path)
    leaves = 1 + sum(not is_ca(c) for c in rest)
    if leaves > 1:
        raise errors.InvalidRequest(
            f"{path} holds {leaves} end-entity certificates; give one device's certificate "
            "(its chain may follow it) and erase each device separately"
        )
    return leaf


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"
