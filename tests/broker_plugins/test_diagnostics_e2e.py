"""Issue 12, finding 17: a handshake refused because the device sent no intermediate says so.

Real TLS clients (paho over the stdlib ssl module, TLS 1.2 and 1.3) against a real broker that has
only the root registered; the assertion is on the audit entry and the broker's log line.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

import certs
from broker_plugins import tls as tls_module
from jitp.trust import TrustAnchor, TrustStore
from tests.helpers import BrokerThread, Identity, Pki, client_context, connect, test_config, wait_until

INCOMPLETE = "chain incomplete (no intermediate sent)"


def _subject(issuer: certs.Issuer) -> str:
    return issuer.cert.subject.rfc4514_string()


def _with_chain(pki: Pki, ident: Identity, chain: list[certs.Issuer], name: str) -> Identity:
    """The same certificate and key, with a chain file holding the leaf and ``chain`` (as sent)."""
    path = pki.dir / "ids" / f"{name}.pem"
    certs.write_certs(path, [ident.cert, *(i.cert for i in chain)])
    return Identity(name=ident.name, cert_path=path, key_path=ident.key_path, cert=ident.cert)


def _context(pki: Pki, ident: Identity, tls: str) -> ssl.SSLContext:
    ctx = client_context(pki, ident)
    version = ssl.TLSVersion.TLSv1_3 if tls == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _refusal_messages(broker: BrokerThread, timeout: float = 5.0, count: int = 1) -> list[str]:
    # A refused handshake is audited before its connection leaves the listener's count: once none
    # is open, every refusal of the test is in the audit log (and no other can follow).
    assert wait_until(lambda: broker.server.listener.open_connections == 0, timeout), "connections still open"
    found = [
        (e.draft.reason, e.draft.details.get("message", ""))
        for e in broker.audit()
        if e.draft.action == "refused"
    ]
    assert len(found) == count, found
    assert {reason for reason, _ in found} == {"unknown_ca"}  # the stable reason code stays
    return [message for _, message in found]


@pytest.fixture
def root_only(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    """A broker with only the root CA registered: devices must send their manufacturer intermediate."""
    b = BrokerThread(test_config(tmp_path, pki, audit={"coalesce_window": 0.0})).start()
    try:
        b.register_ca(pki.root.cert)
        yield b
    finally:
        b.stop()


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_no_intermediate_sent_is_audited_as_an_incomplete_chain(
    root_only: BrokerThread, pki: Pki, tls: str, caplog: pytest.LogCaptureFixture
) -> None:
    full = pki.device(f"chain-{tls}")
    leaf_only = _with_chain(pki, full, [], f"leaf-only-{tls}")
    caplog.set_level(logging.WARNING, logger="jitp.service")

    refused = connect(root_only.port, pki, leaf_only, context=_context(pki, leaf_only, tls))
    refused.close()
    assert refused.rc is None, "a refused handshake never reaches CONNACK"

    [message] = _refusal_messages(root_only)
    assert message.startswith("TLS handshake refused: unable to get local issuer certificate; ")
    assert INCOMPLETE in message
    assert repr(_subject(pki.manufacturer)) in message  # names the issuer the device did not send
    assert any(INCOMPLETE in r.getMessage() and "unknown_ca" in r.getMessage() for r in caplog.records)

    # The same certificate with its intermediate joins: the chain was the only problem.
    ok = connect(root_only.port, pki, full, context=_context(pki, full, tls))
    ok.close()
    assert ok.rc == 0, ok.error


def test_an_unknown_ca_is_not_called_an_incomplete_chain(root_only: BrokerThread, pki: Pki) -> None:
    rogue_root = pki.other_ca("rogue root CA")
    rogue_int = certs.make_ca("rogue intermediate CA", key=certs.generate_key("ec"), issuer=rogue_root)
    ident = pki.identity("rogue-device", issuer=rogue_int)  # sends leaf + rogue intermediate
    with_root = _with_chain(pki, ident, [rogue_int, rogue_root], "rogue-with-root")

    for sent in (ident, with_root):
        refused = connect(root_only.port, pki, sent)
        refused.close()
        assert refused.rc is None
    ends_below, ends_at_root = _refusal_messages(root_only, count=2)
    assert INCOMPLETE not in ends_below and INCOMPLETE not in ends_at_root
    assert f"ends at {_subject(rogue_int)!r}, whose issuer {_subject(rogue_root)!r}" in ends_below
    assert f"ends at the root {_subject(rogue_root)!r}, which is not registered" in ends_at_root


def test_a_wrong_intermediate_is_named(root_only: BrokerThread, pki: Pki) -> None:
    """The device sends an intermediate, but not the one that issued its certificate."""
    ident = pki.device("wrong-intermediate")
    wrong = _with_chain(pki, ident, [pki.service_ca], "wrong-intermediate")
    refused = connect(root_only.port, pki, wrong)
    refused.close()
    assert refused.rc is None
    [message] = _refusal_messages(root_only)
    assert "chain incomplete: the client sent 1 more certificate(s), none of them its issuer" in message
    assert repr(_subject(pki.manufacturer)) in message


# -- the capture itself: in memory, without a broker ---------------------------------------------------
def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, BaseException | None]:
    """Drive a handshake in memory until the server side completes (error None) or fails (its error).

    A client-side failure is not what these tests are about: it propagates.
    """
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):  # the client waits for the server's next flight
            c.do_handshake()
        try:
            s.do_handshake()
        except ssl.SSLWantReadError:  # the server waits for the client's next flight: pass them on
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        except ssl.SSLError as exc:
            return s, exc
        else:
            return s, None
    raise AssertionError("the handshake neither completed nor failed within 10 flights")


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_the_sent_chain_is_kept_only_during_the_handshake(pki: Pki, tls: str) -> None:
    trust = TrustStore.of([TrustAnchor.from_certificate(pki.root.cert)])
    server = tls_module.server_context(cert=pki.layout.server_cert, key=pki.layout.server_key, trust=trust)
    full = pki.device(f"mem-{tls}")
    joined, error = _handshake(server, _context(pki, full, tls))
    assert error is None
    assert not hasattr(joined, tls_module._SENT)  # dropped at the client's Finished: no per-connection cost

    leaf_only = _with_chain(pki, full, [], f"mem-leaf-only-{tls}")
    refused, error = _handshake(server, _context(pki, leaf_only, tls))
    assert isinstance(error, ssl.SSLCertVerificationError)
    version, message, kept_trust = getattr(refused, tls_module._SENT)
    assert kept_trust is trust
    assert tls_module.certificate_list(version, message) == [full.cert.public_bytes(Encoding.DER)]
    reason, why = tls_module.handshake_refusal(error) or ("", "")
    assert reason == "unknown_ca" and INCOMPLETE in why


def _certificate_message(chain: list[bytes], *, tls13: bool) -> bytes:
    entries = b"".join(len(d).to_bytes(3, "big") + d + (b"\x00\x00" if tls13 else b"") for d in chain)
    body = (b"\x00" if tls13 else b"") + len(entries).to_bytes(3, "big") + entries
    return b"\x0b" + len(body).to_bytes(3, "big") + body


@settings(max_examples=200, deadline=None)
@given(
    chain=st.lists(st.binary(min_size=1, max_size=40), max_size=4), tls13=st.booleans(), cut=st.integers(1, 8)
)
def test_certificate_messages_parse_and_truncations_are_refused(
    chain: list[bytes], tls13: bool, cut: int
) -> None:
    version = 0x0304 if tls13 else 0x0303
    message = _certificate_message(chain, tls13=tls13)
    assert tls_module.certificate_list(version, message) == chain
    assert tls_module.certificate_list(version, message[:-cut]) is None


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), version=st.sampled_from([0x0303, 0x0304]))
def test_any_bytes_parse_or_give_none(data: bytes, version: int) -> None:
    result = tls_module.certificate_list(version, b"\x0b" + data)
    assert result is None or all(isinstance(d, bytes) and d for d in result)
