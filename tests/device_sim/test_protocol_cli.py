"""``jitp-sim --protocol``: the option on every scenario, and MQTT 5 runs over real mutual TLS.

The runs go to a Mosquitto started here with the test PKI (require_certificate, as the join-storm
benchmark runs it): an MQTT 5 broker that is not jitp, so these hold whatever jitp's MQTT 5 does.
Without the mosquitto binary they are skipped, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import join_storm
from benchmarks.join_storm import Broker
from device_sim import Fleet, Report, Target
from device_sim.cli import SCENARIOS, build_parser, main
from tests.helpers import Pki, wait_until


def test_every_connecting_command_takes_protocol_4_or_5() -> None:
    parser = build_parser()
    for command in (*SCENARIOS, "rotate"):
        required = ["--ca", "ca.pem"]
        if command == "chaos":
            required += ["--pki", "pki"]
        else:
            required += ["--fleet", "fleet"]
        if command in ("telemetry", "rotate"):
            required += ["--service-cert", "s.pem", "--service-key", "s.key"]
        if command == "ramp":
            required += ["--rate", "10"]
        if command == "hold":
            required += ["--seconds", "1"]
        assert parser.parse_args([command, *required]).protocol == 4, command
        assert parser.parse_args([command, *required, "--protocol", "5"]).protocol == 5, command
        with pytest.raises(SystemExit):
            parser.parse_args([command, *required, "--protocol", "3"])


def test_target_and_report_name_the_protocol() -> None:
    with pytest.raises(ValueError, match=r"4 .* or 5"):
        Target("127.0.0.1", 8883, ca=Path("ca.pem"), protocol=3)
    v5 = Report(scenario="storm", target="x:1", concurrency=1, outcomes=(), duration=1.0, protocol=5)
    assert "(MQTT 5.0)" in v5.table() and v5.to_json()["protocol"] == 5
    v3 = Report(scenario="storm", target="x:1", concurrency=1, outcomes=(), duration=1.0)
    assert "(MQTT 3.1.1)" in v3.table() and v3.to_json()["protocol"] == 4


@pytest.fixture
def mosquitto_tls(
    pki: Pki, tmp_path: Path, mosquitto_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Broker]:
    monkeypatch.setattr(join_storm, "MOSQUITTO", str(mosquitto_binary))
    broker = join_storm.start_mosquitto(pki.layout, tmp_path)

    def listening() -> bool:
        assert broker.proc.poll() is None, broker.log.read_text()
        try:
            socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        assert wait_until(listening, 15), broker.log.read_text()
        yield broker
    finally:
        join_storm.stop(broker)


@pytest.fixture
def restore_tls_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI shrinks asyncio's TLS read buffer process-wide; restore it for the tests that follow.
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)


@pytest.mark.usefixtures("restore_tls_buffers")
def test_storm_and_telemetry_with_protocol_5_over_mutual_tls(
    mosquitto_tls: Broker, pki: Pki, fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--port", str(mosquitto_tls.port), "--ca", str(pki.layout.root_cert), "--fleet", str(fleet.dir)]
    common += ["--protocol", "5", "--no-progress"]
    storm = tmp_path / "storm.json"
    code = main(["storm", *common, "-n", "12", "-c", "4", "--json", str(storm)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(MQTT 5.0)" in out
    doc = json.loads(storm.read_text())
    assert (doc["protocol"], doc["joined"], doc["failures"]) == (5, 12, {})

    service = ["--service-cert", str(pki.layout.service_client_cert)]
    service += ["--service-key", str(pki.layout.service_client_key)]
    telemetry = tmp_path / "telemetry.json"
    code = main(["telemetry", *common, *service, "-n", "6", "-m", "5", "--json", str(telemetry)])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(telemetry.read_text())
    assert doc["protocol"] == 5 and doc["joined"] == 6
    check = doc["telemetry"]
    assert (check["acked"], check["received"], check["lost"]) == (30, 30, []), check
