from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from device_sim import Fleet, ServiceCreds, Target, create_fleet
from tests.helpers import BrokerThread, Pki

FLEET_SIZE = 40


@pytest.fixture(scope="session")
def fleet(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return create_fleet(pki.layout.dir, FLEET_SIZE, tmp_path_factory.mktemp("fleet") / "fleet", prefix="sim-")


@pytest.fixture
def target(broker: BrokerThread, pki: Pki) -> Target:
    return Target("127.0.0.1", broker.port, ca=pki.layout.root_cert)


@pytest.fixture
def service(pki: Pki) -> ServiceCreds:
    return ServiceCreds.from_pki(pki.layout.dir)


@pytest.fixture
def registry_path(broker: BrokerThread) -> Path:
    return broker.config.registry_path


@pytest.fixture(scope="session")
def mosquitto_binary() -> Path:
    """The mosquitto broker binary, for tests that start their own; skip without it (fail under CI)."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if found is not None:
        return Path(found)
    if os.environ.get("CI"):
        pytest.fail("mosquitto is not installed, and CI is set: apt-get install mosquitto", pytrace=False)
    pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
