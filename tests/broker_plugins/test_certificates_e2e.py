"""Operational certificates end to end: real broker, real TLS, real paho devices, real CSRs.

Birth certificate -> CSR over MQTT -> reconnect with the new certificate (commit) -> renewal over the
operational certificate -> the superseded certificate refused. And every bad input of issue 16,
each answered on .../rejected with its reason, with nothing issued.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_plugins.oversize import DISCARD_LIMIT
from jitp.config import IssuerConfig
from jitp.domain.acl import topic_matches
from jitp.trust import Role
from tests.certflow import (
    answer_for,
    corrupt_signature,
    enroll,
    init_issuer,
    make_csr,
    new_key,
    request,
)
from tests.helpers import BrokerThread, Conn, Pki, connect, test_config, wait_until


def _events(svc: Conn, kind: str, device_id: str) -> list[dict[str, object]]:
    topic = f"$jitp/events/{kind}/{device_id}"
    return [json.loads(m.payload) for m in list(svc.messages) if m.topic == topic]


def _reasons(broker: BrokerThread, action: str) -> list[str | None]:
    return [e.draft.reason for e in broker.audit() if e.draft.action == action]


def test_birth_csr_commit_renewal_and_old_certificate_refused(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    signer = init_issuer(broker)
    svc = clients(connect(broker.port, pki, pki.service()))
    assert svc.rc == 0 and svc.subscribe("$jitp/events/#") == [1]
    birth = pki.device("op-0001")
    dev = clients(connect(broker.port, pki, birth))
    assert dev.rc == 0, dev.error
    assert dev.subscribe("$jitp/certificates/op-0001/#") == [1]

    # The CSR asks for another name, a DNS SAN and carries extensions: none of it may be copied.
    key = new_key()
    evil = [
        (x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False),
        (x509.KeyUsage(True, True, True, True, True, False, False, False, False), True),
    ]
    request(dev, "op-0001", {"request_id": "r1", "csr": make_csr(key, cn="op-9999", extensions=evil)})
    kind, doc = answer_for(dev, "op-0001", "r1")
    assert kind == "accepted", doc
    cert = x509.load_pem_x509_certificate(doc["certificate_pem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "op-0001"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:jitp:device:op-0001"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment and not ku.content_commitment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.issuer == signer.cert.subject
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=29) < validity < timedelta(days=31)  # issuer.validity: 30d
    assert doc["chain_pem"].startswith("-----BEGIN CERTIFICATE-----")

    # The answer was lost: the same request id gets the same pending certificate, not a second one.
    request(dev, "op-0001", {"request_id": "r1", "csr": make_csr(key)})
    kind, again = answer_for(dev, "op-0001", "r1", index=1)
    assert kind == "accepted" and again["certificate_id"] == doc["certificate_id"]
    assert again["certificate_pem"] == doc["certificate_pem"]
    [pending] = broker.call(broker.registry().device_certificates("op-0001"))
    assert str(pending.state) == "pending"
    dev.close()

    # Reconnect with the new certificate: committed, certificate-issued with both fingerprints.
    from tests.certflow import save_identity

    op1 = save_identity(pki, "op-0001", doc["certificate_pem"], key)
    dev1 = clients(connect(broker.port, pki, op1))
    assert dev1.rc == 0, dev1.error
    assert svc.wait_for(lambda: _events(svc, "certificate-issued", "op-0001"))
    [issued] = _events(svc, "certificate-issued", "op-0001")
    assert issued["previous_fingerprint"] == birth.fingerprint
    assert issued["new_fingerprint"] == op1.fingerprint
    # The retained configuration now says when to renew.
    assert dev1.subscribe("$jitp/devices/op-0001/config") == [1]
    assert dev1.wait_for(lambda: any(m.topic.endswith("/config") for m in dev1.messages))
    config = json.loads(next(m.payload for m in dev1.messages if m.topic.endswith("/config")))
    assert config["certificate"]["not_after"] == cert.not_valid_after_utc.isoformat()
    renew_after = datetime.fromisoformat(config["certificate"]["renew_after"])
    assert cert.not_valid_before_utc < renew_after < cert.not_valid_after_utc

    # Renewal over the operational certificate; reconnect commits it: certificate-rotated.
    assert dev1.subscribe("$jitp/certificates/op-0001/#") == [1]
    renewed = enroll(pki, dev1, "op-0001", "r2")
    dev1.close()
    dev2 = clients(connect(broker.port, pki, renewed.identity))
    assert dev2.rc == 0, dev2.error
    assert svc.wait_for(lambda: _events(svc, "certificate-rotated", "op-0001"))
    [rotated] = _events(svc, "certificate-rotated", "op-0001")
    assert rotated["previous_fingerprint"] == op1.fingerprint
    assert rotated["new_fingerprint"] == renewed.identity.fingerprint
    assert len(_events(svc, "certificate-issued", "op-0001")) == 1  # no duplicate events

    # The superseded operational certificate is refused from now on; the birth one (keep) is not.
    dev2.close()
    old = connect(broker.port, pki, op1)
    assert old.rc != 0
    old.close()
    assert wait_until(lambda: "superseded" in _reasons(broker, "refused"))
    birth_again = clients(connect(broker.port, pki, birth))
    assert birth_again.rc == 0
    states = {
        c.certificate_id: str(c.state) for c in broker.call(broker.registry().device_certificates("op-0001"))
    }
    assert sorted(states.values()) == ["current", "superseded"]
    actions = [e.draft.action for e in broker.audit() if e.draft.device_id == "op-0001"]
    assert actions.count("certificate-requested") == 2
    assert "certificate-issued" in actions and "certificate-rotated" in actions


@pytest.fixture
def tight(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    """A broker with a small CSR burst (flood tests) and the usual CAs."""
    config = test_config(tmp_path, pki, issuer=IssuerConfig(rate=0.001, burst=8))
    b = BrokerThread(config).start()
    try:
        b.register_ca(pki.manufacturer.cert)
        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        yield b
    finally:
        b.stop()


def test_each_bad_input_is_rejected_with_its_reason_and_nothing_is_issued(
    tight: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    broker = tight
    init_issuer(broker)
    dev = clients(connect(broker.port, pki, pki.device("bad-0001")))
    assert dev.rc == 0
    assert dev.subscribe("$jitp/certificates/bad-0001/#") == [1]
    good = make_csr(new_key())
    cases: list[tuple[str, bytes | dict[str, object], str | None, str]] = [
        ("sig", {"request_id": "sig", "csr": corrupt_signature(good)}, None, "csr_signature_invalid"),
        (
            "ca",
            {
                "request_id": "ca",
                "csr": make_csr(new_key(), extensions=[(x509.BasicConstraints(True, None), True)]),
            },
            None,
            "ca_requested",
        ),
        ("weak", {"request_id": "weak", "csr": make_csr(new_key("rsa1024"))}, None, "weak_key"),
        (
            "other",
            {"request_id": "other", "csr": good},
            "$jitp/certificates/bad-0002/create-from-csr",
            "forbidden_topic",
        ),
        (None, b"{not json", None, "invalid_json"),
        ("nocsr", {"request_id": "nocsr"}, None, "missing_field"),
        (
            "junk",
            {"request_id": "junk", "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"},
            None,
            "invalid_csr",
        ),
    ]
    for _, payload, topic, _ in cases:
        request(dev, "bad-0001", payload, topic=topic)
    for request_id, _, _, reason in cases:
        kind, doc = answer_for(dev, "bad-0001", request_id)
        assert (kind, doc["reason"]) == ("rejected", reason), doc
        assert doc["message"]
    # Over issuer.max_request_bytes (16 KiB): answered, not parsed.
    request(dev, "bad-0001", b'{"request_id": "big", "csr": "' + b"A" * 100_000 + b'"}')
    kind, doc = answer_for(dev, "bad-0001", None, index=1)
    assert (kind, doc["reason"]) == ("rejected", "payload_too_large")
    assert broker.call(broker.registry().device_certificates("bad-0001")) == []  # nothing issued so far
    assert broker.call(broker.registry().device_certificates("bad-0001")) == []
    # The flood: 10 valid requests at once; what is over the burst (8, partly spent above on bad
    # requests that got as far as the CSR) is rate_limited, and only the accepted ones were issued.
    for n in range(10):
        request(dev, "bad-0001", {"request_id": f"flood-{n}", "csr": make_csr(new_key())})
    flood = [answer_for(dev, "bad-0001", f"flood-{n}") for n in range(10)]
    accepted = [doc for kind, doc in flood if kind == "accepted"]
    limited = [doc for kind, doc in flood if kind == "rejected" and doc["reason"] == "rate_limited"]
    assert len(accepted) + len(limited) == 10 and len(limited) >= 8
    issued = broker.call(broker.registry().device_certificates("bad-0001"))
    assert sorted(c.certificate_id for c in issued) == sorted(d["certificate_id"] for d in accepted)
    reasons = _reasons(broker, "certificate-rejected")
    for *_, reason in cases:
        assert reason in reasons
    assert "rate_limited" in reasons and "payload_too_large" in reasons
    # A 1 MB request is over limits.max_packet_size (256 KiB) too: its body is read past, unheld, and
    # answered payload_too_large; the connection stays up (the same connection enrolls afterwards).
    assert broker.server.config.limits.max_packet_size < 1_000_000
    huge = b'{"request_id": "huge", "csr": "' + b"A" * 1_000_000 + b'"}'
    request(dev, "bad-0001", huge)
    kind, doc = answer_for(dev, "bad-0001", None, index=2)
    assert (kind, doc["reason"]) == ("rejected", "payload_too_large")
    assert f"request of {len(huge)} bytes" in doc["message"]
    assert not dev.disconnected.is_set()
    assert reasons.count("payload_too_large") == 1
    assert wait_until(lambda: _reasons(broker, "certificate-rejected").count("payload_too_large") == 2)
    # Over oversize.DISCARD_LIMIT (4 MiB) the connection is closed before the body is read (W6),
    # nothing is issued, and everyone else is served.
    dev.client.publish("$jitp/certificates/bad-0001/create-from-csr", b"x" * (DISCARD_LIMIT + 1), qos=0)
    assert dev.disconnected.wait(10)
    other = clients(connect(broker.port, pki, pki.device("bad-0003")))
    assert other.rc == 0
    assert other.subscribe("$jitp/certificates/bad-0003/#") == [1]
    enroll(pki, other, "bad-0003", "fine")
    assert len(broker.call(broker.registry().device_certificates("bad-0001"))) == len(accepted)


def test_an_oversized_request_keeps_the_connection_and_the_device_enrolls_on_it(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """QoS 1, then QoS 2: each over max_packet_size is acknowledged and answered, and the same
    connection then enrolls; a telemetry PUBLISH over max_packet_size still closes (W6)."""
    init_issuer(broker)
    dev = clients(connect(broker.port, pki, pki.device("big-0001")))
    assert dev.rc == 0 and dev.subscribe("$jitp/certificates/big-0001/#") == [1]
    for n, qos in enumerate((1, 2)):
        payload = b'{"request_id": "big", "csr": "' + b"A" * (1024 * 1024) + b'"}'
        info = dev.client.publish("$jitp/certificates/big-0001/create-from-csr", payload, qos=qos)
        info.wait_for_publish(10)
        assert info.is_published()  # PUBACK (QoS 1) or PUBCOMP (QoS 2) came back
        kind, doc = answer_for(dev, "big-0001", None, index=n)
        assert (kind, doc["reason"]) == ("rejected", "payload_too_large")
    enroll(pki, dev, "big-0001", "small")
    assert not dev.disconnected.is_set()
    dev.client.publish("big-0001/telemetry", b"x" * (300 * 1024), qos=1)
    assert dev.disconnected.wait(10)


def test_a_device_cannot_subscribe_to_another_devices_answers(broker: BrokerThread, pki: Pki) -> None:
    init_issuer(broker)
    dev = connect(broker.port, pki, pki.device("acl-0001"))
    try:
        assert dev.rc == 0
        assert dev.subscribe("$jitp/certificates/acl-0002/#") == [0x80]
        assert dev.subscribe("$jitp/certificates/+/accepted") == [0x80]
        assert dev.subscribe("$jitp/certificates/acl-0001/#") == [1]
    finally:
        dev.close()
    assert topic_matches("$jitp/certificates/acl-0001/accepted", "$jitp/certificates/acl-0001/#")


def test_requests_without_an_issuer_or_with_an_expired_one_are_rejected(
    broker: BrokerThread, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    dev = clients(connect(broker.port, pki, pki.device("noiss-0001")))
    assert dev.rc == 0 and dev.subscribe("$jitp/certificates/noiss-0001/#") == [1]
    request(dev, "noiss-0001", {"request_id": "a", "csr": make_csr(new_key())})
    assert answer_for(dev, "noiss-0001", "a")[1]["reason"] == "issuer_missing"
    # An issuer made 2 days ago, valid for 1 day: expired now.
    init_issuer(broker, validity=timedelta(days=1), now=datetime.now(UTC) - timedelta(days=2))
    request(dev, "noiss-0001", {"request_id": "b", "csr": make_csr(new_key())})
    assert answer_for(dev, "noiss-0001", "b")[1]["reason"] == "issuer_expired"
    assert broker.call(broker.registry().device_certificates("noiss-0001")) == []
