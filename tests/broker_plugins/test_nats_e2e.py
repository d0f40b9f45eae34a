# ruff: noqa: F811  (pytest fixtures imported from tests.jitp.integration.test_nats_sink)
"""End to end: a real jitp broker with the NATS sink enabled, paho devices, a real NATS JetStream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from jitp.integration.nats_sink import SINK_NAME
from tests.helpers import BrokerThread, Pki, connect, test_config, wait_until
from tests.jitp.integration.test_nats_sink import Stream, nats_url, stream  # noqa: F401  (fixtures)


@pytest.fixture
def nats_broker(tmp_path: Path, pki: Pki, stream: Stream) -> Iterator[BrokerThread]:
    b = BrokerThread(test_config(tmp_path, pki, nats=stream.config())).start()
    try:
        b.register_ca(pki.manufacturer.cert, region="eu-west")
        yield b
    finally:
        b.stop()


def test_device_joins_reach_the_stream_with_subject_and_headers(
    nats_broker: BrokerThread, pki: Pki, stream: Stream
) -> None:
    names = ["nats-dev-1", "nats.dev.2"]
    for name in names:
        conn = connect(nats_broker.port, pki, pki.device(name))
        try:
            assert conn.rc == 0, conn.error
        finally:
            conn.close()
    messages = asyncio.run(stream.messages(expect=2))
    events = nats_broker.events()
    assert [m.headers["Nats-Msg-Id"] for m in messages if m.headers] == [e.event_id for e in events]
    assert [m.subject for m in messages] == [
        f"{stream.prefix}.provisioned.eu-west.nats-dev-1",
        f"{stream.prefix}.provisioned.eu-west.nats%2Edev%2E2",
    ]
    for message, name in zip(messages, names, strict=True):
        doc = json.loads(message.data)
        assert doc["device_id"] == name and doc["type"] == "provisioned" and doc["region"] == "eu-west"
        assert message.headers is not None
        assert message.headers["Jitp-Event-Type"] == "provisioned"
        assert message.headers["Jitp-Device-Id"] == name
    # The sink's progress is durable, in the registry.
    last = nats_broker.call(nats_broker.registry().events_after(0))[-1][0]
    assert wait_until(
        lambda: nats_broker.call(nats_broker.registry().sink_cursor(SINK_NAME)) >= last, 10, interval=0.05
    ), "the sink cursor did not reach the last event"
