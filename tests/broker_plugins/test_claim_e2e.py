"""Claim certificates end to end: real broker, real TLS, real paho clients, real CSRs.

A CA registered with role ``claim`` (one certificate shared by a production batch) reaches only
``$jitp/certificates/<client_id>/``. Its create-from-csr request carries ``parameters``, which the
CA's template validates and turns into the device id and attributes; success writes the device
record and a pending operational certificate, and the device's reconnect with it commits it and
publishes ``provisioned``. An existing id is refused (``identity_conflict``) unless the template's
reprovision policy allows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

import certs
from jitp.config import AdmissionConfig
from jitp.trust import Role
from tests.certflow import answer_for, init_issuer, make_csr, new_key, request, save_identity
from tests.helpers import BrokerThread, Conn, Identity, Pki, connect, test_config, wait_until

CLAIM_TEMPLATE = """\
name: factory
version: 1
attributes:
  line: { value: "lyon-3" }
claim:
  parameters:
    serial: { regex: "[A-Z]{2}[0-9]{6}" }
    model: { regex: "[a-z0-9-]{1,32}", required: false }
  device_id: "meter-{serial}"
namespace:
  publish: ["meters/{attributes.model}/{device_id}/#"]
reprovision: %s
"""


def start(
    tmp_path: Path, pki: Pki, policy: str = "reject", **sections: Any
) -> tuple[BrokerThread, certs.Issuer]:
    tdir = tmp_path / "templates"
    tdir.mkdir(exist_ok=True)
    (tdir / "factory.yaml").write_text(CLAIM_TEMPLATE % policy)
    broker = BrokerThread(test_config(tmp_path, pki, templates_dir=tdir, **sections)).start()
    claim_ca = certs.make_ca("Acme claim CA, batch 7", key=certs.generate_key("ec"))
    broker.register_ca(claim_ca.cert, role=Role.CLAIM, template="factory")
    broker.register_ca(pki.manufacturer.cert)
    broker.register_ca(pki.service_ca.cert, role=Role.SERVICE)
    init_issuer(broker)
    return broker, claim_ca


@pytest.fixture
def claim(tmp_path: Path, pki: Pki) -> Iterator[tuple[BrokerThread, Identity]]:
    broker, claim_ca = start(tmp_path, pki)
    try:
        # One claim certificate (and key) for the whole batch, as a factory would flash it.
        yield broker, pki.identity("batch-7", issuer=claim_ca)
    finally:
        broker.stop()


def claimer(
    broker: BrokerThread, pki: Pki, ident: Identity, client_id: str, clients: Callable[[Conn], Conn]
) -> Conn:
    conn = clients(connect(broker.port, pki, ident, client_id=client_id))
    assert conn.rc == 0, conn.error
    assert conn.subscribe(f"$jitp/certificates/{client_id}/#") == [1]
    return conn


def _events(svc: Conn, kind: str, device_id: str) -> list[dict[str, object]]:
    topic = f"$jitp/events/{kind}/{device_id}"
    return [json.loads(m.payload) for m in list(svc.messages) if m.topic == topic]


def test_claim_creates_the_device_issues_its_certificate_and_provisions_it_at_commit(
    claim: tuple[BrokerThread, Identity], pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    broker, batch = claim
    svc = clients(connect(broker.port, pki, pki.service()))
    assert svc.rc == 0 and svc.subscribe("$jitp/events/#") == [1]
    dev = claimer(broker, pki, batch, "boot-a1", clients)
    assert broker.devices() == []  # a claim connection makes no device record

    key = new_key()
    params = {"serial": "AB123456", "model": "m-200"}
    request(
        dev, "boot-a1", {"request_id": "c1", "csr": make_csr(key, cn="meter-ZZ999999"), "parameters": params}
    )
    kind, doc = answer_for(dev, "boot-a1", "c1")
    assert kind == "accepted", doc
    assert doc["device_id"] == "meter-AB123456"
    cert = x509.load_pem_x509_certificate(doc["certificate_pem"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meter-AB123456"
    [record] = broker.devices()
    assert record.device_id == "meter-AB123456"
    assert dict(record.attributes) == {"line": "lyon-3", "serial": "AB123456", "model": "m-200"}
    assert record.config["namespace"]["publish"][0] == "meters/m-200/meter-AB123456/#"
    [pending] = broker.call(broker.registry().device_certificates("meter-AB123456"))
    assert str(pending.state) == "pending"
    assert _events(svc, "provisioned", "meter-AB123456") == []  # not before the device commits
    # The same request again (answer lost): the same certificate, no second device or certificate.
    request(dev, "boot-a1", {"request_id": "c1", "csr": make_csr(key), "parameters": params})
    assert answer_for(dev, "boot-a1", "c1", index=1)[1]["certificate_id"] == doc["certificate_id"]
    assert len(broker.call(broker.registry().device_certificates("meter-AB123456"))) == 1
    dev.close()

    # The device reconnects with its operational certificate: committed, provisioned published.
    op = save_identity(pki, "meter-AB123456", doc["certificate_pem"], key)
    meter = clients(connect(broker.port, pki, op))
    assert meter.rc == 0, meter.error
    assert svc.wait_for(lambda: _events(svc, "provisioned", "meter-AB123456"))
    [provisioned] = _events(svc, "provisioned", "meter-AB123456")
    assert provisioned["cert_fingerprint"] == op.fingerprint
    assert provisioned["attributes"] == {"line": "lyon-3", "serial": "AB123456", "model": "m-200"}
    assert _events(svc, "certificate-issued", "meter-AB123456") == []
    [current] = broker.call(broker.registry().device_certificates("meter-AB123456"))
    assert str(current.state) == "current"
    # Now it is a device: its telemetry flows to the service.
    assert svc.subscribe("meters/#") == [1]
    meter.client.publish("meters/m-200/meter-AB123456/t", b"21.5", qos=1).wait_for_publish(5)
    assert svc.wait_for(lambda: any(m.topic == "meters/m-200/meter-AB123456/t" for m in svc.messages))

    audit = [e.draft for e in broker.audit() if e.draft.device_id == "meter-AB123456"]
    requested = [d for d in audit if d.action == "certificate-requested"]
    assert [d.actor for d in requested] == ["claim"]
    assert requested[0].details["claim_client_id"] == "boot-a1"
    assert [d.action for d in audit if d.action == "provisioned"] == ["provisioned"]


def test_an_existing_id_is_refused_with_identity_conflict(
    claim: tuple[BrokerThread, Identity], pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """Two devices of one batch (one claim certificate) claim the same serial: the second is
    refused, and nothing is issued to it; the first (its own key) may ask again."""
    broker, batch = claim
    first = claimer(broker, pki, batch, "boot-1", clients)
    second = claimer(broker, pki, batch, "boot-2", clients)
    key = new_key()
    params = {"serial": "CD000001"}
    request(first, "boot-1", {"request_id": "a", "csr": make_csr(key), "parameters": params})
    assert answer_for(first, "boot-1", "a")[0] == "accepted"
    request(second, "boot-2", {"request_id": "b", "csr": make_csr(new_key()), "parameters": params})
    kind, doc = answer_for(second, "boot-2", "b")
    assert (kind, doc["reason"]) == ("rejected", "identity_conflict")
    assert "meter-CD000001" in doc["message"] and "reprovision reject" in doc["message"]
    certs_of = broker.call(broker.registry().device_certificates("meter-CD000001"))
    assert len(certs_of) == 1  # only the first device's
    # The first device, with the key it claimed with and a new request id (it rebooted): allowed.
    request(first, "boot-1", {"request_id": "a2", "csr": make_csr(key), "parameters": params})
    assert answer_for(first, "boot-1", "a2")[0] == "accepted"
    # A device provisioned from its birth certificate cannot be claimed either.
    birth = clients(connect(broker.port, pki, pki.device("meter-EF000002")))
    assert birth.rc == 0
    request(
        second,
        "boot-2",
        {"request_id": "c", "csr": make_csr(new_key()), "parameters": {"serial": "EF000002"}},
    )
    assert answer_for(second, "boot-2", "c")[1]["reason"] == "identity_conflict"
    assert broker.call(broker.registry().device_certificates("meter-EF000002")) == []
    # Audited on the device that was aimed at.
    refused = [
        e.draft
        for e in broker.audit()
        if e.draft.action == "certificate-rejected" and e.draft.reason == "identity_conflict"
    ]
    assert sorted(d.device_id or "" for d in refused) == ["meter-CD000001", "meter-EF000002"]
    assert {d.actor for d in refused} == {"claim"}
    assert {d.details["claim_client_id"] for d in refused} == {"boot-2"}


def test_reprovision_rotate_lets_a_claim_renew_an_existing_device(
    tmp_path: Path, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    broker, claim_ca = start(tmp_path, pki, policy="rotate")
    try:
        batch = pki.identity("batch-8", issuer=claim_ca)
        one = claimer(broker, pki, batch, "boot-1", clients)
        two = claimer(broker, pki, batch, "boot-2", clients)
        request(
            one,
            "boot-1",
            {"request_id": "a", "csr": make_csr(new_key()), "parameters": {"serial": "GH000003"}},
        )
        assert answer_for(one, "boot-1", "a")[0] == "accepted"
        request(
            two,
            "boot-2",
            {"request_id": "b", "csr": make_csr(new_key()), "parameters": {"serial": "GH000003"}},
        )
        kind, doc = answer_for(two, "boot-2", "b")
        assert kind == "accepted" and doc["device_id"] == "meter-GH000003"
        assert len(broker.call(broker.registry().device_certificates("meter-GH000003"))) == 2
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        (None, "'parameters' must be a JSON object"),
        ({}, "parameter 'serial' is required"),
        ({"serial": "ab123456"}, "does not match the template's pattern '[A-Z]{2}[0-9]{6}'"),
        ({"serial": "AB123456", "colour": "red"}, "unknown parameter(s) 'colour'"),
        ({"serial": 123456}, "parameter 'serial' must be a non-empty string"),
        ({"serial": "AB123456", "model": "M/../#"}, "parameter 'model' does not match"),
    ],
)
def test_parameters_failing_the_template_are_rejected_with_a_clear_reason(
    claim: tuple[BrokerThread, Identity],
    pki: Pki,
    clients: Callable[[Conn], Conn],
    parameters: object,
    words: str,
) -> None:
    broker, batch = claim
    dev = claimer(broker, pki, batch, "boot-p", clients)
    body: dict[str, object] = {"request_id": "p", "csr": make_csr(new_key())}
    if parameters is not None:
        body["parameters"] = parameters
    request(dev, "boot-p", body)
    kind, doc = answer_for(dev, "boot-p", "p")
    assert (kind, doc["reason"]) == ("rejected", "invalid_parameters")
    assert words in doc["message"], doc["message"]
    assert broker.devices() == []
    assert wait_until(
        lambda: any(
            e.draft.reason == "invalid_parameters" and e.draft.details.get("claim_client_id") == "boot-p"
            for e in broker.audit()
        )
    )


def test_a_claim_connection_reaches_nothing_but_its_certificate_api(
    claim: tuple[BrokerThread, Identity], pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    broker, batch = claim
    dev = claimer(broker, pki, batch, "boot-x", clients)
    for topic in (
        "#",
        "devices/boot-x/#",
        "$jitp/events/#",
        "$jitp/certificates/boot-y/#",
        "$jitp/admin/replies/boot-x/#",
    ):
        assert dev.subscribe(topic) == [0x80], topic
    # Another client id's certificate API: answered forbidden_topic on its own topics, not served.
    request(
        dev,
        "boot-x",
        {"request_id": "o", "csr": make_csr(new_key()), "parameters": {"serial": "IJ000004"}},
        topic="$jitp/certificates/boot-y/create-from-csr",
    )
    kind, doc = answer_for(dev, "boot-x", "o")
    assert (kind, doc["reason"]) == ("rejected", "forbidden_topic")
    # Telemetry: refused, the connection closed and audited claim_only.
    dev.client.publish("devices/boot-x/telemetry", b"1", qos=1)
    assert dev.disconnected.wait(10)
    assert wait_until(lambda: any(e.draft.reason == "claim_only" for e in broker.audit()))
    assert broker.devices() == []
    # An unsafe client id (a topic wildcard) is refused at CONNECT.
    bad = connect(broker.port, pki, batch, client_id="boot+x")
    try:
        assert bad.rc == 5
    finally:
        bad.close()


def test_new_devices_from_a_claim_ca_count_against_its_first_join_rate(
    tmp_path: Path, pki: Pki, clients: Callable[[Conn], Conn]
) -> None:
    """One shared claim certificate and many client ids must not mint devices without bound: a claim
    that creates a device takes a first-join token of the claim CA (admission.per_ca_rate)."""
    broker, claim_ca = start(tmp_path, pki, admission=AdmissionConfig(per_ca_rate=0.001, per_ca_burst=1))
    try:
        batch = pki.identity("batch-9", issuer=claim_ca)
        one = claimer(broker, pki, batch, "boot-1", clients)
        two = claimer(broker, pki, batch, "boot-2", clients)
        request(
            one,
            "boot-1",
            {"request_id": "a", "csr": make_csr(new_key()), "parameters": {"serial": "KL000005"}},
        )
        assert answer_for(one, "boot-1", "a")[0] == "accepted"
        request(
            two,
            "boot-2",
            {"request_id": "b", "csr": make_csr(new_key()), "parameters": {"serial": "KL000006"}},
        )
        kind, doc = answer_for(two, "boot-2", "b")
        assert (kind, doc["reason"]) == ("rejected", "overloaded"), doc
        assert "over their rate" in doc["message"]
        assert [d.device_id for d in broker.devices()] == ["meter-KL000005"]
    finally:
        broker.stop()
