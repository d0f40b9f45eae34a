"""Multi-region fleets: one manufacturer CA per region, results and events broken down by region."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import json
import shlex
import stat
from pathlib import Path

import pytest

import certs
from device_sim import (
    Fleet,
    JoinOutcome,
    RegionSpec,
    Report,
    ServiceCreds,
    Target,
    create_region_fleet,
    parse_regions,
    run_reconnect,
    run_storm,
)
from device_sim.cli import main as sim_main
from device_sim.report import EventCheck, RegionEvents
from jitp.cli import main as jitp_main
from tests.helpers import BrokerThread, Pki, wait_until

REGIONS = {"eu-west": 10, "us-east": 10}


@pytest.fixture(scope="session")
def region_fleet(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return create_region_fleet(
        pki.layout.dir, REGIONS, tmp_path_factory.mktemp("regions") / "fleet", prefix="rg-"
    )


def regional_cert(fleet: Fleet, region: str) -> object:
    return certs.load_certs(fleet.regions[region].cert)[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- fleet creation ------------------------------------------------------------------------------------
def test_parse_regions() -> None:
    assert parse_regions("eu-west=500, us-east=300,ap-south=200:smart-meter") == [
        RegionSpec("eu-west", 500),
        RegionSpec("us-east", 300),
        RegionSpec("ap-south", 200, "smart-meter"),
    ]
    for bad in (
        "",
        "eu-west",
        "eu-west=x",
        "eu-west=0",
        "eu/west=1",
        "$eu=1",
        "a=1,a=2",
        "a=1:bad/tpl",
        "a=-1",
    ):
        with pytest.raises(ValueError):
            parse_regions(bad)


def test_region_fleet_layout_manifest_and_cas(region_fleet: Fleet, pki: Pki) -> None:
    fleet = region_fleet
    assert len(fleet) == 20 and list(fleet.regions) == ["eu-west", "us-east"]
    assert fleet.issuer_fingerprint is None
    root = certs.load_certs(pki.layout.root_cert)[0]
    for region, ca in fleet.regions.items():
        assert ca.cert == fleet.dir / f"ca-{region}.pem" and ca.key == fleet.dir / f"ca-{region}.key"
        assert mode(ca.cert) == 0o600 and mode(ca.key) == 0o600
        cert = certs.load_certs(ca.cert)[0]
        cert.verify_directly_issued_by(root)  # an intermediate under the PKI root
        assert region in cert.subject.rfc4514_string()
        assert certs.fingerprint(cert) == ca.fingerprint and ca.count == 10
        assert certs.load_issuer(ca.cert, ca.key).cert == cert  # key matches
    manifest = json.loads((fleet.dir / "manifest.json").read_text())
    for entry in manifest["devices"]:
        assert entry["device_id"].startswith(f"rg-{entry['region']}-")
        assert entry["ca"] == f"ca-{entry['region']}.pem"
    for d in fleet.devices:
        assert d.region in REGIONS and d.ca == fleet.regions[d.region].cert
        assert mode(d.key) == 0o600
        leaf, issuer = certs.load_certs(d.cert)[:2]
        assert certs.fingerprint(issuer) == fleet.regions[d.region].fingerprint
        assert leaf.issuer == issuer.subject
    # Stored interleaved: any prefix of the fleet spans both regions.
    assert {d.region for d in fleet.take(2)} == set(REGIONS)
    assert Fleet.load(fleet.dir) == fleet


def test_region_fleet_is_cached_and_cas_survive_reissue(
    region_fleet: Fleet, pki: Pki, tmp_path: Path
) -> None:
    again = create_region_fleet(pki.layout.dir, REGIONS, region_fleet.dir, prefix="rg-")
    assert again == region_fleet  # nothing re-issued
    out = tmp_path / "fleet"
    first = create_region_fleet(pki.layout.dir, {"a": 2, "b": 1}, out)
    bigger = create_region_fleet(pki.layout.dir, {"a": 3, "b": 1}, out)
    assert len(bigger) == 4
    # The regional CAs are kept (a registration with the broker stays valid); devices are new.
    assert {r: ca.fingerprint for r, ca in bigger.regions.items()} == {
        r: ca.fingerprint for r, ca in first.regions.items()
    }
    forced = create_region_fleet(pki.layout.dir, {"a": 3, "b": 1}, out, force=True)
    assert forced.regions["a"].fingerprint == first.regions["a"].fingerprint
    assert {d.device_id for d in forced.devices} == {
        "dev-a-00001",
        "dev-a-00002",
        "dev-a-00003",
        "dev-b-00001",
    }


def test_register_commands(region_fleet: Fleet, tmp_path: Path) -> None:
    assert region_fleet.register_commands() == [
        f"jitp ca register {region_fleet.dir}/ca-eu-west.pem --region eu-west",
        f"jitp ca register {region_fleet.dir}/ca-us-east.pem --region us-east",
    ]
    [cmd] = [c for c in region_fleet.register_commands(data_dir=tmp_path / "my data") if "us-east" in c]
    assert shlex.split(cmd)[-2:] == ["--data-dir", str(tmp_path / "my data")]


# -- reports ------------------------------------------------------------------------------------------
def test_report_breaks_results_down_by_region() -> None:
    outcomes = (
        JoinOutcome("a1", "ok", 1, (), 0.0, 0.010, "eu"),
        JoinOutcome("a2", "ok", 1, (), 0.0, 0.030, "eu"),
        JoinOutcome("b1", "ok", 1, (), 0.0, 0.100, "us"),
        JoinOutcome("b2", "connack:5", 1, region="us"),
    )
    events = EventCheck(
        expected=3,
        seen=3,
        new_events=3,
        unexpected=(),
        duplicates=(),
        lost=(),
        redeliveries=0,
        stale=0,
        region_mismatches=("b1: expected us, got eu",),
        by_region={
            "eu": RegionEvents(2, 2, 0, 0, 0, {"eu": 2}),
            "us": RegionEvents(1, 1, 0, 0, 1, {"eu": 1}),
        },
    )
    report = Report(
        scenario="storm", target="x:1", concurrency=2, outcomes=outcomes, duration=1.0, events=events
    )
    eu, us = report.by_region()
    assert (eu.region, eu.devices, eu.joined, eu.failures, eu.ok) == ("eu", 2, 2, {}, True)
    assert (us.region, us.devices, us.joined, us.failures, us.ok) == ("us", 2, 1, {"connack:5": 1}, False)
    assert eu.connack_latencies == (0.010, 0.030)
    doc = report.to_json()
    assert doc["regions"]["eu"]["latency_connack_ms"]["p50"] == pytest.approx(10.0)
    assert doc["regions"]["eu"]["latency_connack_ms"]["p99"] == pytest.approx(30.0)
    assert doc["regions"]["us"]["events"]["mismatched"] == 1
    assert doc["regions"]["us"]["failures"] == {"connack:5": 1}
    assert list(doc["events"]["region_mismatches"]) == ["b1: expected us, got eu"]
    assert not report.ok
    assert any("wrong region" in p and "b1: expected us, got eu" in p for p in report.problems())
    table = report.table()
    [eu_row] = [line for line in table.splitlines() if line.strip().startswith("eu ")]
    assert "2/2" in eu_row and "10.0 ms" in eu_row and "30.0 ms" in eu_row and "FAIL" not in eu_row
    [us_row] = [line for line in table.splitlines() if line.strip().startswith("us ")]
    assert "1/2" in us_row and "connack:5 1" in us_row and "FAIL" in us_row
    # Without regions, nothing region-specific appears.
    plain = Report(
        scenario="storm", target="x:1", concurrency=1, outcomes=(JoinOutcome("a", "ok", 1),), duration=1
    )
    assert plain.by_region() == [] and "regions" not in plain.table() and plain.to_json()["regions"] is None


# -- against the broker ---------------------------------------------------------------------------------
def storm(target: Target, fleet: Fleet, service: ServiceCreds, registry_path: Path) -> Report:
    return asyncio.run(run_storm(target, fleet, concurrency=8, service=service, registry_path=registry_path))


def test_two_region_storm_reports_per_region(
    broker: BrokerThread,
    region_fleet: Fleet,
    target: Target,
    service: ServiceCreds,
    registry_path: Path,
    tmp_path: Path,
) -> None:
    for region in REGIONS:
        broker.register_ca(regional_cert(region_fleet, region), region=region)  # type: ignore[arg-type]
    report = storm(target, region_fleet, service, registry_path)
    assert report.ok, report.table()
    assert report.joined == 20
    regions = {r.region: r for r in report.by_region()}
    assert set(regions) == set(REGIONS)
    for region, r in regions.items():
        assert (r.devices, r.joined, dict(r.failures)) == (10, 10, {})
        assert len(r.connack_latencies) == 10
        assert r.events is not None
        assert (r.events.expected, r.events.seen, r.events.lost, r.events.mismatched) == (10, 10, 0, 0)
        assert r.events.observed == {region: 10}  # every event carries the device's region
    assert report.events is not None and report.events.region_mismatches == ()
    assert report.registry is not None and report.registry.region_mismatches == ()
    # The broker's own records agree.
    expected = {d.device_id: d.region for d in region_fleet.devices}
    assert {d.device_id: d.region for d in broker.devices()} == expected
    table = report.table()
    assert "regions" in table and "wrong region" in table
    for region in REGIONS:
        [row] = [line for line in table.splitlines() if line.strip().startswith(region)]
        assert "10/10" in row and " ms" in row and "FAIL" not in row
    report.write_json(tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc["regions"]) == set(REGIONS)
    for region in REGIONS:
        r = doc["regions"][region]
        assert r["joined"] == 10 and r["ok"] is True and r["latency_connack_ms"]["p99"] > 0
        assert r["events"]["observed"] == {region: 10}
    # A rejoin is idempotent and checked per region too.
    again = asyncio.run(
        run_reconnect(target, region_fleet, concurrency=8, service=service, registry_path=registry_path)
    )
    assert again.ok, again.table()
    assert {r.region: r.joined for r in again.by_region()} == REGIONS


def test_a_ca_registered_with_the_wrong_region_is_a_failure(
    broker: BrokerThread, region_fleet: Fleet, target: Target, service: ServiceCreds, registry_path: Path
) -> None:
    broker.register_ca(regional_cert(region_fleet, "eu-west"), region="eu-west")  # type: ignore[arg-type]
    broker.register_ca(regional_cert(region_fleet, "us-east"), region="eu-west")  # type: ignore[arg-type]  # wrong
    report = storm(target, region_fleet, service, registry_path)
    assert report.joined == 20 and not report.ok
    assert report.events is not None and len(report.events.region_mismatches) == 10
    assert all("expected us-east, got eu-west" in m for m in report.events.region_mismatches)
    assert report.registry is not None and len(report.registry.region_mismatches) == 10
    regions = {r.region: r for r in report.by_region()}
    assert regions["eu-west"].ok and not regions["us-east"].ok
    us = regions["us-east"].events
    assert us is not None and us.mismatched == 10 and us.observed == {"eu-west": 10}
    problems = report.problems()
    assert any("10 provisioned event(s) with the wrong region" in p for p in problems)
    assert any("10 device(s) recorded with the wrong region" in p for p in problems)
    table = report.table()
    assert "FAILED" in table
    [us_row] = [line for line in table.splitlines() if line.strip().startswith("us-east")]
    assert "FAIL" in us_row
    doc = report.to_json()
    assert doc["ok"] is False and doc["regions"]["us-east"]["ok"] is False and doc["regions"]["eu-west"]["ok"]


def test_cli_multi_region_fleet_operator_flow(
    broker: BrokerThread,
    pki: Pki,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fleet create --regions, run the printed `jitp ca register` commands, storm with --json."""
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    out = tmp_path / "fleet"
    data_dir = broker.config.data_dir
    argv = [
        "fleet",
        "create",
        "--pki",
        str(pki.layout.dir),
        "--regions",
        "eu-west=3,ap-south=2",
        "--out",
        str(out),
    ]
    assert sim_main([*argv, "--data-dir", str(data_dir)]) == 0
    printed = capsys.readouterr().out
    assert "fleet of 5 devices" in printed and "across 2 regions" in printed
    commands = [line.strip() for line in printed.splitlines() if line.strip().startswith("jitp ca register")]
    assert len(commands) == 2 and all("--region" in c for c in commands)
    for command in commands:
        assert jitp_main(shlex.split(command)[1:]) == 0
    capsys.readouterr()
    # The broker reloads its trust store from the registry: wait until it has both regional CAs.
    assert wait_until(lambda: len(broker.server.service.trust.anchors) >= 4, 10, interval=0.1), (
        broker.server.service.trust.anchors
    )
    layout = pki.layout
    code = sim_main(
        [
            "storm",
            "--port",
            str(broker.port),
            "--ca",
            str(layout.root_cert),
            "--fleet",
            str(out),
            "--service-cert",
            str(layout.service_client_cert),
            "--service-key",
            str(layout.service_client_key),
            "--data-dir",
            str(data_dir),
            "--json",
            str(tmp_path / "report.json"),
            "--no-progress",
        ]
    )
    table = capsys.readouterr().out
    assert code == 0, table
    assert "regions" in table and "eu-west" in table and "ap-south" in table
    doc = json.loads((tmp_path / "report.json").read_text())
    assert {r: v["joined"] for r, v in doc["regions"].items()} == {"eu-west": 3, "ap-south": 2}
    assert {r: v["events"]["observed"] for r, v in doc["regions"].items()} == {
        "eu-west": {"eu-west": 3},
        "ap-south": {"ap-south": 2},
    }
    # --regions and --region do not mix.
    with pytest.raises(SystemExit):
        sim_main([*argv, "--region", "eu-west"])
