"""device_sim: a fleet simulator and load generator for mTLS MQTT brokers (jitp first).

One asyncio process drives thousands of simulated devices, each with its own certificate, over
a lean MQTT 3.1.1 client (MQTT 5.0 with ``Target(..., protocol=5)``). The Python API::

    fleet = create_fleet(pki_dir, 1000, out)            # or Fleet.load(out)
    # or one CA per region: create_region_fleet(pki_dir, {"eu-west": 500, "us-east": 500}, out),
    # then register each fleet.regions[r].cert with --region r; report.by_region() breaks results down
    target = Target("127.0.0.1", 8883, ca=pki_dir / "root-ca.pem")
    report = await run_storm(target, fleet, concurrency=200, service=ServiceCreds.from_pki(pki_dir),
                             registry_path=data_dir / "registry.db")
    print(report.table()); assert report.ok
    # QoS 1 telemetry, every acknowledged message cross-checked at the service subscriber:
    report = await run_telemetry(target, fleet, service=ServiceCreds.from_pki(pki_dir), n=1000, messages=20)
"""

from device_sim.backoff import Backoff
from device_sim.fleet import (
    DeviceCreds,
    Fleet,
    RegionCA,
    RegionSpec,
    ServiceCreds,
    Target,
    create_fleet,
    create_region_fleet,
    parse_regions,
)
from device_sim.report import (
    ChaosResult,
    EventCheck,
    HoldStats,
    JoinOutcome,
    RegionEvents,
    RegionResult,
    RegistryCheck,
    Report,
    TelemetryCheck,
)
from device_sim.scenarios import run_chaos, run_hold, run_ramp, run_reconnect, run_storm, run_telemetry

__all__ = [
    "Backoff",
    "ChaosResult",
    "DeviceCreds",
    "EventCheck",
    "Fleet",
    "HoldStats",
    "JoinOutcome",
    "RegionCA",
    "RegionEvents",
    "RegionResult",
    "RegionSpec",
    "RegistryCheck",
    "Report",
    "ServiceCreds",
    "Target",
    "TelemetryCheck",
    "create_fleet",
    "create_region_fleet",
    "parse_regions",
    "run_chaos",
    "run_hold",
    "run_ramp",
    "run_reconnect",
    "run_storm",
    "run_telemetry",
]
