"""Enrollment templates end to end: real broker, real mTLS, paho clients."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.helpers import BrokerThread, Pki, connect, test_config, wait_until

CAPS_OID = "1.3.6.1.4.1.57264.1.1"

METER = """
name: meter
version: 3
device_id:
  from: subject.CN
  regex: '^SM-(?P<serial>[0-9a-f]{8})$'
  format: 'meter-{serial}'
attributes:
  type: smart-meter
  vendor: {from: subject.O}
  location: {from: subject.L, required: false}
  capabilities: {from: "ext:%s", required: false}
region: eu-west
namespace:
  publish: ["meters/{region}/{device_id}/#"]
  subscribe: ["meters/{region}/{device_id}/cmd/#"]
profile:
  keepalive: {min: 10, max: 120}
  max_qos: 0
  max_message_size: 64
  rate_limit: {messages: 3, per_seconds: 60}
  hints: {endpoint: eu-west.example.com}
reprovision: %s
"""


def meter_subject(cn: str, org: str | None = "Acme Meters", locality: str | None = "Lyon") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if locality:
        attrs.append(x509.NameAttribute(NameOID.LOCALITY_NAME, locality))
    return x509.Name(attrs)


def caps_ext(value: str) -> x509.UnrecognizedExtension:
    raw = value.encode()
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(CAPS_OID), b"\x0c" + bytes([len(raw)]) + raw)


def start(tmp_path: Path, pki: Pki, policy: str = "reject") -> BrokerThread:
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "meter.yaml").write_text(METER % (CAPS_OID, policy))
    b = BrokerThread(test_config(tmp_path, pki, templates_dir=tdir)).start()
    b.register_ca(pki.manufacturer.cert, template="meter", region="ignored-by-template")
    from jitp.trust import Role

    b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
    return b


@pytest.fixture
def meter_broker(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    b = start(tmp_path, pki)
    yield b
    b.stop()


def test_template_renders_id_attributes_region_namespace_and_profile(
    meter_broker: BrokerThread, pki: Pki
) -> None:
    b = meter_broker
    svc = connect(b.port, pki, pki.service())
    assert svc.subscribe("$jitp/events/#") == [1]
    dev = pki.identity(meter_subject("SM-00a1b2c3"), extra_extensions=(caps_ext("water,power"),))
    conn = connect(b.port, pki, dev, client_id="meter-00a1b2c3")
    try:
        assert conn.rc == 0, conn.error
        # The device reads its own configuration (retained) instead of having it typed in.
        assert conn.subscribe("$jitp/devices/meter-00a1b2c3/config") == [0]  # max_qos 0 from the profile
        assert conn.wait_for(lambda: any(m.topic.endswith("/config") for m in conn.messages))
        config = json.loads(next(m for m in conn.messages if m.topic.endswith("/config")).payload)
        assert config["namespace"]["publish"] == [
            "meters/eu-west/meter-00a1b2c3/#",
            "$jitp/devices/meter-00a1b2c3/status",
        ]
        assert config["profile"]["max_message_size"] == 64
        assert config["profile"]["hints"] == {"endpoint": "eu-west.example.com"}
    finally:
        conn.close()
    assert svc.wait_for(lambda: len(svc.messages) >= 1)
    doc = json.loads(svc.messages[0].payload)
    svc.close()
    assert doc["device_id"] == "meter-00a1b2c3"
    assert doc["region"] == "eu-west"
    assert doc["template"] == "meter" and doc["template_version"] == 3
    assert doc["attributes"] == {
        "type": "smart-meter",
        "vendor": "Acme Meters",
        "location": "Lyon",
        "capabilities": "water,power",
    }
    assert doc["namespace"]["subscribe"] == [
        "meters/eu-west/meter-00a1b2c3/cmd/#",
        "$jitp/devices/meter-00a1b2c3/#",
    ]
    assert doc["profile"]["rate_limit"] == {"messages": 3, "per_seconds": 60.0}
    [record] = b.devices()
    assert record.device_id == "meter-00a1b2c3" and record.template_version == 3


def test_missing_required_attribute_is_a_refusal_naming_it(meter_broker: BrokerThread, pki: Pki) -> None:
    dev = pki.identity(meter_subject("SM-0000beef", org=None))
    conn = connect(meter_broker.port, pki, dev, client_id="meter-0000beef")
    conn.close()
    assert conn.rc == 5
    refusals = [e.draft for e in meter_broker.audit() if e.draft.action == "refused"]
    assert [r.reason for r in refusals] == ["missing_attribute"]
    assert "vendor" in refusals[0].details["message"]
    assert meter_broker.devices() == []


def test_id_pattern_mismatch_is_refused(meter_broker: BrokerThread, pki: Pki) -> None:
    conn = connect(
        meter_broker.port, pki, pki.identity(meter_subject("not-a-meter")), client_id="not-a-meter"
    )
    conn.close()
    assert conn.rc == 5
    assert [e.draft.reason for e in meter_broker.audit() if e.draft.action == "refused"] == ["unsafe_id"]


def test_namespace_and_profile_are_enforced(meter_broker: BrokerThread, pki: Pki) -> None:
    b = meter_broker
    svc = connect(b.port, pki, pki.service())
    assert svc.subscribe("meters/#") == [1]
    a = connect(b.port, pki, pki.identity(meter_subject("SM-0000000a")), client_id="meter-0000000a")
    other = connect(b.port, pki, pki.identity(meter_subject("SM-0000000b")), client_id="meter-0000000b")
    try:
        assert a.rc == 0 and other.rc == 0
        # Namespace: other's topics and the default devices/ namespace are out of reach.
        assert a.subscribe("meters/eu-west/meter-0000000b/cmd/#") == [0x80]
        assert a.subscribe("$jitp/devices/meter-0000000b/config") == [0x80]
        assert a.subscribe("meters/eu-west/meter-0000000a/cmd/#", qos=1) == [0]  # max_qos caps the grant
        # Rate: 3 messages per minute; the rest are dropped.
        for i in range(6):
            a.client.publish("meters/eu-west/meter-0000000a/t", str(i).encode())
        # The broker handles one connection's packets in order (W17) and routes a message before it
        # reads the next packet: the SUBACK of a later SUBSCRIBE shows all six were routed or dropped.
        assert a.subscribe("meters/eu-west/meter-0000000a/cmd/witness") == [0]
        # Publishing outside its namespace is denied (and counts against the rate, too).
        other.client.publish("devices/meter-0000000b/x", b"default namespace")
        other.client.publish("meters/eu-west/meter-0000000a/t", b"spoofed")
        # Witness: other's third message, in its namespace, on the same connection as the two
        # denied ones and routed after a's six. Anything else would reach svc before it.
        other.client.publish("meters/eu-west/meter-0000000b/t", b"marker")
        assert svc.wait_for(lambda: any(m.payload == b"marker" for m in svc.messages)), "no marker"
        assert [(m.topic, m.payload) for m in svc.messages] == [
            ("meters/eu-west/meter-0000000a/t", b"0"),
            ("meters/eu-west/meter-0000000a/t", b"1"),
            ("meters/eu-west/meter-0000000a/t", b"2"),
            ("meters/eu-west/meter-0000000b/t", b"marker"),
        ]
        # Size: more than max_message_size (64 bytes) closes the connection.
        other.client.publish("meters/eu-west/meter-0000000b/t", b"x" * 65)
        assert other.disconnected.wait(5)
    finally:
        for c in (a, other, svc):
            c.close()


@pytest.mark.parametrize("policy", ["reject", "rotate", "reset"])
def test_reprovisioning_policies(tmp_path: Path, pki: Pki, policy: str) -> None:
    b = start(tmp_path, pki, policy)
    try:
        old = pki.identity(meter_subject("SM-00c0ffee"))
        first = connect(b.port, pki, old, client_id="meter-00c0ffee")
        first.close()
        assert first.rc == 0
        [before] = b.devices()
        # The broker has seen the disconnect (a clean session leaves the table): the renewed
        # certificate's connect is a new join, not a takeover of a session still open.
        assert wait_until(lambda: b.session_count() == 0), "the disconnect was not seen"
        new = pki.identity(meter_subject("SM-00c0ffee", locality="Paris"))  # renewed certificate, new key
        second = connect(b.port, pki, new, client_id="meter-00c0ffee")
        second.close()
        [after] = b.devices()
        events = b.events("meter-00c0ffee")
        if policy == "reject":
            assert second.rc == 5
            assert after == before
            assert [e.type for e in events] == ["provisioned"]
            assert [e.draft.reason for e in b.audit() if e.draft.action == "refused"] == ["identity_conflict"]
            return
        assert second.rc == 0
        assert after.cert_fingerprint == new.fingerprint
        assert after.attributes["location"] == "Paris"
        assert [e.type for e in events] == ["provisioned", "reprovisioned"]
        doc = events[1].document()
        assert doc["previous_fingerprint"] == old.fingerprint
        assert doc["reset"] is (policy == "reset")
        if policy == "rotate":
            assert after.provisioned_at == before.provisioned_at
        else:
            assert after.provisioned_at > before.provisioned_at
        # The superseded certificate is never accepted again (no flip-flopping between certificates).
        again = connect(b.port, pki, old, client_id="meter-00c0ffee")
        again.close()
        assert again.rc == 5
        assert b.devices()[0].cert_fingerprint == new.fingerprint
        assert len(b.events("meter-00c0ffee")) == 2
    finally:
        b.stop()


def test_unknown_template_binding_refuses_with_reason(tmp_path: Path, pki: Pki) -> None:
    b = BrokerThread(test_config(tmp_path, pki)).start()
    try:
        b.register_ca(pki.manufacturer.cert, template="does-not-exist")
        conn = connect(b.port, pki, pki.device("orphan"))
        conn.close()
        assert conn.rc == 5
        assert [e.draft.reason for e in b.audit() if e.draft.action == "refused"] == ["template_not_found"]
    finally:
        b.stop()


def test_ext_value_with_long_der_length(pki: Pki) -> None:
    from jitp.domain.templates import _der_string

    long = "x" * 300
    raw = b"\x0c\x82" + len(long).to_bytes(2, "big") + long.encode()
    assert _der_string(raw) == long


def _broker_reloads(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The broker's "templates reloaded" log lines: one each time it followed a templates version bump,
    written once its reload (and any config-changed event it made) is done."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "jitp.server" and r.getMessage().startswith("templates reloaded from ")
    ]


def test_template_change_and_reload_publishes_config_changed(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    import subprocess
    import sys

    caplog.set_level(logging.INFO, logger="jitp.server")
    b = start(tmp_path, pki)
    try:
        svc = connect(b.port, pki, pki.service())
        assert svc.subscribe("$jitp/events/config-changed/#") == [1]
        dev = connect(b.port, pki, pki.identity(meter_subject("SM-00000abc")), client_id="meter-00000abc")
        assert dev.rc == 0
        assert dev.subscribe("$jitp/devices/meter-00000abc/config") == [0]
        assert dev.wait_for(lambda: len(dev.messages) >= 1)
        # The operator raises the message size limit and adds a static attribute.
        tfile = tmp_path / "templates" / "meter.yaml"
        text = tfile.read_text().replace("max_message_size: 64", "max_message_size: 128")
        text = text.replace("version: 3", "version: 4").replace(
            "  type: smart-meter", "  type: smart-meter\n  tier: gold"
        )
        tfile.write_text(text)
        cfg = tmp_path / "jitp.yaml"
        cfg.write_text(f"templates_dir: {tmp_path / 'templates'}\n")

        def reload() -> subprocess.CompletedProcess[str]:
            args = ["templates", "reload", "--config", str(cfg), "--data-dir", str(tmp_path / "data")]
            return subprocess.run(
                [sys.executable, "-m", "jitp.cli", *args], capture_output=True, text=True, timeout=60
            )

        out = reload()
        assert out.returncode == 0, out.stderr
        assert "1 device configuration(s) changed" in out.stdout
        assert svc.wait_for(lambda: len(svc.messages) >= 1, timeout=6)
        doc = json.loads(svc.messages[0].payload)
        assert doc["type"] == "config-changed"
        assert doc["template_version"] == 4 and doc["profile"]["max_message_size"] == 128
        assert doc["attributes"]["tier"] == "gold"
        # The device reads its new configuration (retained, republished).
        assert dev.wait_for(
            lambda: any(json.loads(m.payload)["profile"]["max_message_size"] == 128 for m in dev.messages),
            timeout=6,
        )
        [record] = b.devices()
        assert record.template_version == 4
        # The live session is held to the new profile: 100 bytes now pass (the old limit was 64).
        info = dev.client.publish("meters/eu-west/meter-00000abc/t", b"y" * 100, qos=1)
        info.wait_for_publish(5)
        # Over the limit, the broker closes the connection instead of acknowledging.
        assert info.is_published(), "no PUBACK for 100 bytes under the new profile"
        assert not dev.disconnected.is_set()
        # The broker follows the reload too (it sees the templates version bump); its own reload
        # finds the devices already re-rendered by the CLI. Wait for it before the second reload.
        assert wait_until(lambda: len(_broker_reloads(caplog)) == 1, 10), "the broker did not reload"
        # A second reload with nothing changed publishes nothing new: not from the CLI (0 changed),
        # and not from the broker's reload that follows it.
        again = reload()
        assert "0 device configuration(s) changed" in again.stdout
        assert wait_until(lambda: len(_broker_reloads(caplog)) == 2, 10), "the broker did not reload again"
        assert _broker_reloads(caplog)[-1].endswith(": 0 config-changed event(s)")
        # Every event goes through the outbox: it holds the one config-changed event, delivered.
        assert [e.type for e in b.events("meter-00000abc")] == ["provisioned", "config-changed"]
        assert b.call(b.registry().pending_events()) == []
        assert len(svc.messages) == 1
        dev.close()
        svc.close()
    finally:
        b.stop()


# -- issue 12, findings 7 and 8: hostile templates and certificates ---------------------------------------
def _long_cn(value: str) -> x509.Name:
    """A subject whose CN may exceed X.509's 64-character upper bound (a certificate may still carry it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False)])


def test_a_backtracking_id_pattern_cannot_stall_the_broker(tmp_path: Path, pki: Pki) -> None:
    """Finding 7 as reported: '^(a+)+$' and a hostile CN over real mutual TLS. Under Python's re, the first
    CONNECT froze every connection (8.9 s at 33 characters, doubling per character; this CN has 61), so
    nothing below would complete before pytest-timeout. With RE2 it is an ordinary refusal."""
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "greedy.yaml").write_text("device_id:\n  regex: '^(a+)+$'\n")
    b = BrokerThread(test_config(tmp_path, pki, templates_dir=tdir)).start()
    try:
        b.register_ca(pki.manufacturer.cert, template="greedy")
        hostile = connect(b.port, pki, pki.identity(meter_subject("a" * 60 + "!")), client_id="hostile")
        hostile.close()
        assert hostile.rc == 5, hostile.error
        # An over-long value is refused without being matched at all (MAX_MATCH_CHARS = 256).
        huge = connect(b.port, pki, pki.identity(_long_cn("a" * 300)), client_id="huge")
        huge.close()
        assert huge.rc == 5, huge.error
        good = connect(b.port, pki, pki.identity(meter_subject("aaaa")), client_id="aaaa")
        good.close()
        assert good.rc == 0, good.error
        refusals = [e.draft for e in b.audit() if e.draft.action == "refused"]
        assert [r.reason for r in refusals] == ["unsafe_id", "unsafe_id"]
        assert "does not match the template's id pattern" in refusals[0].details["message"]
        assert "longer than 256 characters" in refusals[1].details["message"]
        assert [d.device_id for d in b.devices()] == ["aaaa"]
    finally:
        b.stop()


def _alias_bomb() -> str:
    lines = ["region:", '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        lines.append(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join([*lines, "name: *l8", ""])


def test_templates_list_reports_an_alias_bomb_in_one_line(tmp_path: Path) -> None:
    """Finding 8 as reported: `jitp templates list` over a templates dir holding a "billion laughs" ended in
    a MemoryError traceback after tens of seconds. Now: exit 2 and one line naming the file."""
    import subprocess
    import sys

    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "bomb.yaml").write_text(_alias_bomb())
    cfg = tmp_path / "jitp.yaml"
    cfg.write_text(f"templates_dir: {tdir}\n")
    out = subprocess.run(
        [sys.executable, "-m", "jitp.cli", "templates", "list", "--config", str(cfg)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stdout == ""
    [line] = out.stderr.splitlines()
    assert line.startswith(f"jitp: error: {tdir / 'bomb.yaml'}:2: ")
    assert "aliases are not allowed in templates" in line
