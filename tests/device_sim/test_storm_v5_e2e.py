"""``jitp-sim storm --protocol 5`` against jitp itself (issue 15): the command a user runs, in
process, against a real broker over mutual TLS, cross-checked with the broker's registry, its
provisioned events and the protocol level of every connection it accepted.

jitp's audit does not record the protocol level of an accepted connection, so the test watches the
broker's own record of it: the ``protocol`` of each session at the moment the broker sends its
CONNACK (the real ``accept``, wrapped to note it; nothing is replaced).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker_plugins.handler import JitpProtocolHandler, Welcome
from broker_plugins.mqtt5_handler import Mqtt5Handler
from device_sim import Fleet
from device_sim.cli import main
from tests.helpers import BrokerThread, Pki

DEVICES, CONCURRENCY = 30, 10


@pytest.fixture
def restore_tls_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI shrinks asyncio's TLS read buffer process-wide; restore it for the tests that follow.
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)


@pytest.fixture
def accepted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """(handler class, client id, the session's protocol) of every CONNACK 0 the broker sends."""
    seen: list[tuple[str, str, int]] = []

    def noting(real: Any) -> Any:
        async def accept(self: JitpProtocolHandler, welcome: Welcome) -> None:
            session: Any = self.session
            seen.append((type(self).__name__, session.client_id, session.protocol))
            await real(self, welcome)

        return accept

    monkeypatch.setattr(Mqtt5Handler, "accept", noting(Mqtt5Handler.accept))
    monkeypatch.setattr(JitpProtocolHandler, "accept", noting(JitpProtocolHandler.accept))
    return seen


@pytest.mark.usefixtures("restore_tls_buffers")
def test_storm_with_protocol_5_joins_every_device_over_mqtt5(
    broker: BrokerThread,
    pki: Pki,
    fleet: Fleet,
    tmp_path: Path,
    accepted: list[tuple[str, str, int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = tmp_path / "storm.json"
    args = ["storm", "--port", str(broker.port), "--ca", str(pki.layout.root_cert), "--fleet", str(fleet.dir)]
    args += ["--protocol", "5", "-n", str(DEVICES), "-c", str(CONCURRENCY), "--no-progress"]
    args += ["--service-cert", str(pki.layout.service_client_cert)]
    args += ["--service-key", str(pki.layout.service_client_key)]
    args += ["--data-dir", str(broker.config.data_dir), "--json", str(report)]

    code = main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(MQTT 5.0)" in out

    # The simulator's own verdict: every device joined, its event came once, the registry has it.
    doc = json.loads(report.read_text())
    assert (doc["protocol"], doc["devices"], doc["joined"], doc["failures"]) == (5, DEVICES, DEVICES, {})
    assert doc["events"]["seen"] == DEVICES and doc["events"]["new_events"] == DEVICES, doc["events"]
    assert doc["events"]["duplicates"] == [] and doc["events"]["lost"] == [], doc["events"]
    assert doc["registry"]["checked"] == DEVICES, doc["registry"]

    # The broker's side, read from the broker itself.
    ids = {d.device_id for d in fleet.take(DEVICES)}
    assert {d.device_id for d in broker.devices()} == ids
    provisioned = Counter(e.device_id for e in broker.events() if e.type == "provisioned")
    assert provisioned == Counter(ids), provisioned
    audited = Counter(e.draft.device_id for e in broker.audit() if e.draft.action == "provisioned")
    assert audited == Counter(ids), audited

    # Every connection (the devices and the simulator's event subscriber) was MQTT 5.
    devices = [(kind, cid, level) for kind, cid, level in accepted if cid in ids]
    assert sorted(cid for _, cid, _ in devices) == sorted(ids), devices
    assert {(kind, level) for kind, _, level in accepted} == {("Mqtt5Handler", 5)}, accepted
    assert len(accepted) == DEVICES + 1  # and the one service connection
