"""TrustStore.explain_missing_issuer: what a refused chain lacked, from the certificates the client sent."""

from __future__ import annotations

import dataclasses

from cryptography.x509.oid import NameOID

import certs
from jitp.trust import TrustAnchor, TrustStore, _dn
from tests.jitp.pkitools import MANUFACTURER, NOW, ROGUE, ROOT, ROOT_ANCHOR, SERVICE_CA, der, leaf, name

ROOT_ONLY = TrustStore.of([ROOT_ANCHOR])


def _name_of(issuer: certs.Issuer) -> str:
    return repr(issuer.cert.subject.rfc4514_string())


def test_leaf_alone_below_a_registered_root_is_an_incomplete_chain() -> None:
    why = ROOT_ONLY.explain_missing_issuer([der(leaf("d1"))])
    assert why is not None
    assert why.startswith("chain incomplete (no intermediate sent), or an unknown CA: ")
    assert f"its issuer {_name_of(MANUFACTURER)} is not a registered CA" in why


def test_a_chain_that_reaches_an_enabled_ca_has_no_explanation() -> None:
    assert ROOT_ONLY.explain_missing_issuer([der(leaf("d1")), der(MANUFACTURER.cert)]) is None
    assert ROOT_ONLY.explain_missing_issuer([der(leaf("d1")), der(MANUFACTURER.cert), der(ROOT.cert)]) is None


def test_wrong_intermediate_and_unknown_tops() -> None:
    wrong = ROOT_ONLY.explain_missing_issuer([der(leaf("d1")), der(SERVICE_CA.cert)])
    assert wrong is not None and wrong.startswith("chain incomplete: the client sent 1 more certificate(s)")
    rogue_int = certs.make_ca("rogue intermediate", key=certs.generate_key("ec"), issuer=ROGUE)
    below = ROOT_ONLY.explain_missing_issuer([der(leaf("d2", issuer=rogue_int)), der(rogue_int.cert)])
    assert below is not None and below.startswith("unknown CA, or chain incomplete: ")
    assert f"ends at {_name_of(rogue_int)}, whose issuer {_name_of(ROGUE)}" in below
    at_root = ROOT_ONLY.explain_missing_issuer(
        [der(leaf("d2", issuer=rogue_int)), der(rogue_int.cert), der(ROGUE.cert)]
    )
    assert (
        at_root
        == f"unknown CA: the chain the client sent ends at the root {_name_of(ROGUE)}, which is not registered"
    )


def test_a_disabled_issuer_is_named_as_disabled() -> None:
    disabled = dataclasses.replace(TrustAnchor.from_certificate(MANUFACTURER.cert, now=NOW), enabled=False)
    why = TrustStore.of([disabled]).explain_missing_issuer([der(leaf("d1"))])
    assert why == f"the issuer {_name_of(MANUFACTURER)} is a registered CA, but it is disabled"


def test_an_impostor_with_a_registered_name_is_named() -> None:
    """A CA with the manufacturer's name but another key: the name matches, the signature does not."""
    impostor = certs.make_ca("jitp test manufacturer CA", key=certs.generate_key("ec"))
    store = TrustStore.of([TrustAnchor.from_certificate(MANUFACTURER.cert, now=NOW)])
    why = store.explain_missing_issuer([der(leaf("d1", issuer=impostor))])
    assert why is not None and "like a registered CA, but that CA did not sign it" in why


def test_self_signed_leaf_and_garbage_have_no_explanation() -> None:
    assert ROOT_ONLY.explain_missing_issuer([der(ROGUE.cert)]) is None
    assert ROOT_ONLY.explain_missing_issuer([b"\x30\x03\x02\x01\x00"]) is None
    assert ROOT_ONLY.explain_missing_issuer([]) is None


def test_issuer_names_are_quoted_printable_and_bounded() -> None:
    odd = certs.make_ca("evil\nCA\x1b[31m", key=certs.generate_key("ec"))
    why = ROOT_ONLY.explain_missing_issuer([der(leaf("d3", issuer=odd))])
    assert why is not None and "'O=jitp dev PKI,CN=evil?CA?[31m'" in why
    long = _dn(name((NameOID.COMMON_NAME, "x" * 300), (NameOID.ORGANIZATION_NAME, "o")))
    assert long == repr("O=o,CN=" + "x" * 150 + "...")
