"""One operations layer under every interface, end to end (issue 13, part 2).

The two drifts it removed: ``templates.reload`` through the admin API did not bump the templates
version, so the other nodes on the registry kept their old templates; ``ca.register`` through the
admin API audited fewer fields than ``jitp ca register``. Real brokers, real mTLS, the real CLI
(in-process, on the broker's data dir, as an operator on that machine would run it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import certs
from jitp import cli
from jitp.domain.audit import AuditEntry
from jitp.trust import Role, TrustAnchor
from tests.helpers import BrokerThread, Conn, Pki, connect, test_config, wait_until

TEMPLATE = """name: probe
version: %d
attributes:
  tier: %s
"""
TIMEOUT = 6.0


class Principal:
    """A backend principal connected to one node, running admin API requests."""

    def __init__(self, broker: BrokerThread, pki: Pki, ident: Any) -> None:
        self.cid = ident.name
        self.conn: Conn = connect(broker.port, pki, ident)
        assert self.conn.rc == 0, (self.conn.rc, self.conn.error)
        assert self.conn.subscribe(f"$jitp/admin/replies/{self.cid}/#") == [1]

    def request(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        corr = uuid.uuid4().hex
        doc = {
            "correlation_id": corr,
            "reply_to": f"$jitp/admin/replies/{self.cid}/{corr}",
            "args": args or {},
        }
        self.conn.client.publish(f"$jitp/admin/{command}", json.dumps(doc), qos=1).wait_for_publish(TIMEOUT)

        def reply() -> dict[str, Any] | None:
            for m in list(self.conn.messages):
                found: dict[str, Any] = json.loads(m.payload)
                if found.get("correlation_id") == corr:
                    return found
            return None

        assert wait_until(lambda: reply() is not None, TIMEOUT), f"no reply to {command}"
        answer = reply()
        assert answer is not None and answer["ok"] is True, answer
        return answer

    def close(self) -> None:
        self.conn.close()


def operator_of(broker: BrokerThread, pki: Pki, name: str) -> Principal:
    ops = certs.make_ca(f"ops CA for {name}", key=certs.generate_key(), issuer=pki.root)
    broker.register_ca(ops.cert, role=Role.OPERATOR)
    return Principal(broker, pki, pki.identity(name, issuer=ops))


def provisioned(broker: BrokerThread, pki: Pki, device_id: str) -> Any:
    dev = connect(broker.port, pki, pki.device(device_id))
    dev.close()
    assert dev.rc == 0, (dev.rc, dev.error)
    record = broker.call(broker.registry().get_device(device_id))
    assert record is not None
    return record


# -- (a) a templates reload through the admin API reaches every node -------------------------------
def test_a_templates_reload_through_the_admin_api_reaches_a_second_node(tmp_path: Path, pki: Pki) -> None:
    """Two nodes on one registry and one templates dir. An operator on node A reloads the changed
    template through the admin API; node B loads it too, and a device joining B gets the new config.
    Before, only A reloaded: B kept provisioning with the old template until its own restart."""
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "probe.yaml").write_text(TEMPLATE % (1, "bronze"))
    nodes: list[BrokerThread] = []
    operator = None
    try:
        for _ in range(2):  # one data dir: one registry
            nodes.append(BrokerThread(test_config(tmp_path, pki, templates_dir=tdir)).start())
        a, b = nodes
        a.register_ca(pki.manufacturer.cert, template="probe")
        operator = operator_of(a, pki, "olivia")
        b.call(b.server.service.refresh_trust())
        first = provisioned(b, pki, "joined-b-before")
        assert (first.template_version, first.attributes["tier"]) == (1, "bronze")
        version = a.call(a.registry().templates_version())

        (tdir / "probe.yaml").write_text(TEMPLATE % (2, "gold"))
        reply = operator.request("templates.reload")
        assert reply["result"] == {"changed": 1}  # joined-b-before's configuration, re-rendered on A
        assert a.call(a.registry().templates_version()) > version  # the other nodes are told

        assert wait_until(lambda: b.server.service.templates.get("probe").version == 2, TIMEOUT), (
            "node B kept v1"
        )
        later = provisioned(b, pki, "joined-b-after")
        assert (later.template_version, later.attributes["tier"]) == (2, "gold")
        again = b.call(b.registry().get_device("joined-b-before"))
        assert (again.template_version, again.attributes["tier"]) == (2, "gold")
    finally:
        if operator is not None:
            operator.close()
        for node in nodes:
            node.stop()


# -- (b) the same audit entry from the CLI and from the admin API ------------------------------------
@pytest.fixture
def node(tmp_path: Path, pki: Pki) -> Iterator[tuple[BrokerThread, Principal, Path]]:
    """A broker with a templates dir, an operator on it, and a config file for the local CLI."""
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "probe.yaml").write_text(TEMPLATE % (1, "bronze"))
    broker = BrokerThread(test_config(tmp_path, pki, templates_dir=tdir)).start()
    operator = None
    try:
        broker.register_ca(pki.manufacturer.cert, template="probe")
        operator = operator_of(broker, pki, "oscar")
        config = tmp_path / "jitp.yaml"
        config.write_text(f"templates_dir: {tdir}\n")
        yield broker, operator, config
    finally:
        if operator is not None:
            operator.close()
        broker.stop()


def local(broker: BrokerThread, config: Path, *args: str) -> None:
    """`jitp <args> --config C --data-dir D`, on the broker's own data dir."""
    code = cli.main([*args, "--config", str(config), "--data-dir", str(broker.config.data_dir)])
    assert code == 0, args


def new_entries(broker: BrokerThread, count: int, action: str) -> list[AuditEntry]:
    return [e for e in broker.audit()[count:] if e.draft.action == action]


def same_entry(cli_entry: AuditEntry, api_entry: AuditEntry) -> None:
    """Everything but who and when: action, device, certificate, reason, details."""
    assert cli_entry.draft.actor.startswith("local-admin:")
    assert api_entry.draft.actor == "operator:oscar"
    fields = ("action", "device_id", "fingerprint", "reason", "peer", "details")
    assert {f: getattr(cli_entry.draft, f) for f in fields} == {
        f: getattr(api_entry.draft, f) for f in fields
    }


def test_ca_register_writes_the_same_audit_entry_from_the_cli_and_the_admin_api(
    node: tuple[BrokerThread, Principal, Path], tmp_path: Path
) -> None:
    """The same CA registered twice (the second registration updates the first): once by `jitp ca
    register`, once by `ca.register` through the admin API. The API's entry lacked subject, region
    and template."""
    broker, operator, config = node
    ca = certs.make_ca("audited CA", key=certs.generate_key())
    path = tmp_path / "audited-ca.pem"
    path.write_bytes(ca.cert.public_bytes(Encoding.PEM))
    count = len(broker.audit())
    local(broker, config, "ca", "register", str(path), "--region", "eu-audit", "--template", "probe")
    pem = ca.cert.public_bytes(Encoding.PEM).decode()
    operator.request("ca.register", {"cert_pem": pem, "region": "eu-audit", "template": "probe"})
    by_cli, by_api = new_entries(broker, count, "ca-registered")
    same_entry(by_cli, by_api)
    assert dict(by_api.draft.details) == {
        "ca_id": certs.fingerprint(ca.cert),
        "role": "device",
        "subject": TrustAnchor.from_certificate(ca.cert).subject,
        "region": "eu-audit",
        "template": "probe",
    }


def test_every_change_writes_the_same_audit_entry_from_the_cli_and_the_admin_api(
    node: tuple[BrokerThread, Principal, Path], pki: Pki, tmp_path: Path
) -> None:
    """Each operation that changes something, run once locally and once through the admin API on
    equivalent targets: the two audit entries differ only in their actor and time."""
    broker, operator, config = node
    tdir = tmp_path / "templates"
    ca = certs.make_ca("toggled CA", key=certs.generate_key())
    ca_id = broker.register_ca(ca.cert)
    for device_id in ("life-a", "life-b", "gone-a", "gone-b"):
        provisioned(broker, pki, device_id)

    def both(action: str, by_cli: Callable[[], None], by_api: Callable[[], None]) -> None:
        count = len(broker.audit())
        by_cli()
        by_api()
        assert wait_until(lambda: len(new_entries(broker, count, action)) == 2, TIMEOUT)
        one, other = new_entries(broker, count, action)
        same_entry(one, other)

    both(
        "ca-disabled",
        lambda: local(broker, config, "ca", "disable", ca_id),
        lambda: operator.request("ca.disable", {"ca_id": ca_id}),
    )
    both(
        "ca-enabled",
        lambda: local(broker, config, "ca", "enable", ca_id),
        lambda: operator.request("ca.enable", {"ca_id": ca_id}),
    )
    for command, action in (("quarantine", "quarantined"), ("enable", "enabled"), ("revoke", "revoked")):
        count = len(broker.audit())
        local(broker, config, "devices", command, "life-a", "--reason", "audit test")
        operator.request(f"devices.{command}", {"device_id": "life-b", "reason": "audit test"})
        one, other = new_entries(broker, count, action)
        assert (one.draft.device_id, other.draft.device_id) == ("life-a", "life-b")
        assert (
            one.draft.details == other.draft.details
            and one.draft.reason == other.draft.reason == "audit test"
        )
    count = len(broker.audit())
    local(broker, config, "devices", "erase", "gone-a")
    operator.request("devices.erase", {"device_id": "gone-b"})
    one, other = new_entries(broker, count, "erased")
    assert one.draft.details == other.draft.details == {"previous_status": "active"}

    def change_template(version: int) -> None:
        (tdir / "probe.yaml").write_text(TEMPLATE % (version, f"tier-{version}"))

    count = len(broker.audit())
    change_template(2)
    local(broker, config, "templates", "reload")
    # The broker follows the CLI's reload (the templates version); only then the next change.
    assert wait_until(lambda: broker.server.service.templates.get("probe").version == 2, TIMEOUT)
    change_template(3)
    operator.request("templates.reload")
    by_cli, by_api = new_entries(broker, count, "template-changed")
    same_entry(by_cli, by_api)
    assert dict(by_api.draft.details) == {"template": "probe", "devices": "2"}  # life-a and life-b
