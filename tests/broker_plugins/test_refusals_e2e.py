"""Every refusal reason, end to end: the device is refused, the reason is audited, others keep working."""

from __future__ import annotations

import socket
import ssl
import warnings
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

import certs
from tests.helpers import BrokerThread, Identity, Pki, client_context, connect, wait_until
from tests.rawmqtt import closed_within


def _refusals(broker: BrokerThread) -> list[tuple[str | None, str | None]]:
    return [(e.draft.reason, e.draft.device_id) for e in broker.audit() if e.draft.action == "refused"]


def _wait_refusal(
    broker: BrokerThread, reason: str, timeout: float = 5.0
) -> list[tuple[str | None, str | None]]:
    found: list[tuple[str | None, str | None]] = []

    def seen() -> bool:
        found[:] = [r for r in _refusals(broker) if r[0] == reason]
        return bool(found)

    assert wait_until(seen, timeout, interval=0.05), (
        f"no refusal with reason {reason!r}; audit has {_refusals(broker)}"
    )
    return found


def _still_serving(broker: BrokerThread, pki: Pki, device_id: str) -> None:
    ok = connect(broker.port, pki, pki.device(device_id))
    try:
        assert ok.rc == 0, ok.error
    finally:
        ok.close()


# -- refused at the MQTT layer with CONNACK 5 ------------------------------------------------
@pytest.mark.parametrize(
    ("make", "client_id", "reason"),
    [
        (lambda p: p.identity("ca-leaf", is_ca=True), "ca-leaf", "ca_as_leaf"),
        (lambda p: p.identity("no-sign", key_usage=("key_encipherment",)), "no-sign", "bad_key_usage"),
        (
            lambda p: p.identity("server-eku", eku=(ExtendedKeyUsageOID.SERVER_AUTH,)),
            "server-eku",
            "bad_key_usage",
        ),
        (lambda p: p.device("has/slash"), "has/slash", "unsafe_id"),
        (lambda p: p.device("wild#card"), "wild#card", "unsafe_id"),
        (lambda p: p.device("plus+sign"), "plus+sign", "unsafe_id"),
        (lambda p: p.device("$SYS"), "$SYS", "unsafe_id"),
        (lambda p: p.device("ctl\x01char"), "ctl\x01char", "unsafe_id"),
        (lambda p: p.device("x" * 129), "x" * 129, "unsafe_id"),
        (lambda p: p.device("honest-device"), "someone-else", "client_id_mismatch"),
    ],
    ids=[
        "ca-as-leaf",
        "key-usage",
        "eku",
        "slash",
        "hash",
        "plus",
        "dollar",
        "control",
        "overlong",
        "client-id-mismatch",
    ],
)
def test_connack_refusals(broker: BrokerThread, pki: Pki, make, client_id: str, reason: str) -> None:
    ident: Identity = make(pki)
    conn = connect(broker.port, pki, ident, client_id=client_id)
    conn.close()
    if reason == "bad_key_usage":
        # OpenSSL's purpose check already refuses these in the handshake; the audit still says why.
        assert conn.rc is None, (conn.rc, conn.error)
    else:
        # Includes CA:TRUE leaves, which OpenSSL accepts and the core's explicit policy refuses.
        assert conn.rc == 5, (conn.rc, conn.error)
    _wait_refusal(broker, reason)
    assert broker.devices() == []
    assert broker.session_count() == 0
    _still_serving(broker, pki, "bystander")


def test_identity_conflict(broker: BrokerThread, pki: Pki) -> None:
    first = connect(broker.port, pki, pki.device("dup-1"))
    first.close()
    assert first.rc == 0
    clone = connect(broker.port, pki, pki.device("dup-1"))  # same CN, another key and certificate
    clone.close()
    assert clone.rc == 5
    _wait_refusal(broker, "identity_conflict")
    [record] = broker.devices()
    assert record.device_id == "dup-1"
    assert len(broker.events("dup-1")) == 1


# -- refused in the TLS handshake --------------------------------------------------------------
def _handshake_fails(
    broker: BrokerThread, pki: Pki, ident: Identity | None, context: ssl.SSLContext | None = None
) -> str:
    conn = connect(broker.port, pki, ident, client_id=ident.name if ident else "nocert", context=context)
    conn.close()
    assert conn.rc is None, "a refused handshake must never reach CONNACK"
    return conn.error or ""


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("expired", "expired"),
        ("not_yet_valid", "not_yet_valid"),
        ("unknown_ca", "unknown_ca"),
        ("weak_key", "weak_key"),
    ],
)
def test_handshake_refusals(broker: BrokerThread, pki: Pki, kind: str, reason: str) -> None:
    if kind == "expired":
        ident = pki.expired("old-device")
    elif kind == "not_yet_valid":
        ident = pki.not_yet_valid("future-device")
    elif kind == "unknown_ca":
        ident = pki.identity("stranger", issuer=pki.other_ca())
    context = None
    if kind == "weak_key":
        ident = pki.identity("weak-rsa", key=certs.generate_key("rsa", rsa_bits=1024))
        # The client's own OpenSSL would refuse to present a 1024-bit key; lower its guard to attack.
        context = client_context(pki, None)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.load_cert_chain(str(ident.cert_path), str(ident.key_path))
    _handshake_fails(broker, pki, ident, context)
    _wait_refusal(broker, reason)
    assert broker.devices() == []
    _still_serving(broker, pki, "bystander-2")


def test_client_without_certificate_is_refused_at_handshake(broker: BrokerThread, pki: Pki) -> None:
    _handshake_fails(broker, pki, None)
    _wait_refusal(broker, "no_certificate")
    assert broker.session_count() == 0
    _still_serving(broker, pki, "bystander-3")


def test_tls_1_1_is_refused(broker: BrokerThread, pki: Pki) -> None:
    ident = pki.device("old-tls")
    ctx = client_context(pki, ident)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    conn = connect(broker.port, pki, ident, context=ctx)
    conn.close()
    assert conn.rc is None
    assert conn.error is not None and "SSL" in conn.error
    assert broker.devices() == []


def test_garbage_on_the_tls_port_changes_nothing(broker: BrokerThread, pki: Pki) -> None:
    before = (broker.devices(), len(broker.audit()), broker.session_count())
    payloads = [
        b"",
        b"\x00" * 10,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)) * 8,
        b"\x16\x03\x01\x00\x05hello",
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            # The server ends the connection (EOF or reset); it does not keep it open.
            assert closed_within(s, 5), f"the server kept the connection open after {payload[:16]!r}"
    # Witness that the server is done with all of them: a failed handshake is audited (if at
    # all) before its connection leaves the listener's count.
    assert wait_until(lambda: broker.server.listener.open_connections == 0), "connections still open"
    assert (broker.devices(), len(broker.audit()), broker.session_count()) == before
    _still_serving(broker, pki, "after-garbage")


def test_refusal_storms_are_coalesced_without_losing_distinct_causes(tmp_path, pki: Pki) -> None:
    from tests.helpers import test_config

    b = BrokerThread(test_config(tmp_path, pki, audit={"coalesce_window": 1.0})).start()
    try:
        b.register_ca(pki.manufacturer.cert)
        mismatched = pki.device("storm-a")
        weak_usage = pki.identity("storm-b", key_usage=("key_encipherment",))
        for _ in range(12):
            connect(b.port, pki, mismatched, client_id="not-storm-a").close()
        for _ in range(5):
            connect(b.port, pki, weak_usage).close()
        entries: list[Any] = []

        def counted() -> dict[str, int]:
            entries[:] = [e.draft for e in b.audit() if e.draft.action == "refused"]
            return {
                r: sum(int(e.details.get("count", "1")) for e in entries if e.reason == r)
                for r in ("client_id_mismatch", "bad_key_usage")
            }

        expected = {"client_id_mismatch": 12, "bad_key_usage": 5}
        assert wait_until(lambda: counted() == expected, 6, interval=0.2), counted()
        # 17 refusals, two causes: the first of each at once, then one counted entry per cause.
        assert len(entries) == 4
        coalesced = [e for e in entries if e.details.get("coalesced") == "true"]
        assert sorted(e.details["count"] for e in coalesced) == ["11", "4"]
        assert all(e.details["first_at"] <= e.details["last_at"] for e in coalesced)
    finally:
        b.stop()
