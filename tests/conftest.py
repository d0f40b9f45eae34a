from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from jitp.crypto.keys import DEFAULT_ENV, MasterKey
from tests.helpers import BrokerThread, Pki, test_config

# Device data is always encrypted at rest, so every registry needs a master key: the test session
# has one in $JITP_MASTER_KEY (inherited by the brokers and CLIs it starts). Tests of the key file,
# of missing and of wrong keys remove or replace it explicitly.
os.environ[DEFAULT_ENV] = MasterKey.generate().token()

logging.getLogger("transitions").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[BrokerThread]:
    """A jitp broker with the manufacturer CA (devices) and the service CA registered."""
    b = BrokerThread(test_config(tmp_path, pki)).start()
    try:
        b.register_ca(pki.manufacturer.cert)
        from jitp.trust import Role

        b.register_ca(pki.service_ca.cert, role=Role.SERVICE)
        yield b
    finally:
        b.stop()
