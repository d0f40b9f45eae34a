"""Issue 12, finding 12, end to end: two paho clients with one device certificate take the session
from each other; the audit trail gets the first takeover at once and one counted entry for the rest,
written when the window closes or, as here, when the broker stops."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from jitp.registry.factory import open_registry
from tests.helpers import BrokerThread, Conn, Pki, connect, test_config

PING_PONGS = 20


def _takeovers(broker: BrokerThread) -> list[Any]:
    return [e.draft for e in broker.audit() if e.draft.action == "session-takeover"]


def test_clones_ping_ponging_one_certificate_write_two_entries(tmp_path: Path, pki: Pki) -> None:
    config = test_config(tmp_path, pki, audit={"coalesce_window": 60.0})
    broker = BrokerThread(config).start()
    clients: list[Conn] = []
    try:
        broker.register_ca(pki.manufacturer.cert)
        clone = pki.device("cloned-device")  # one certificate and key, used by both "devices"
        for i in range(PING_PONGS):
            conn = connect(broker.port, pki, clone)
            clients.append(conn)
            assert conn.rc == 0, (i, conn.error)
            if i:
                assert clients[-2].disconnected.wait(5), "the previous holder was not taken over"
            if i == 1:
                [first] = _takeovers(broker)  # written at once: an operator sees the first takeover
                assert first.device_id == "cloned-device" and first.reason == "duplicate_client_id"
                assert first.details["same_certificate"] == "true"
        assert len(_takeovers(broker)) == 1  # the other 18 are being counted
    finally:
        for conn in clients:
            conn.close()
        broker.stop()  # flushes the open window

    async def read() -> list[Any]:
        registry = await open_registry(config)
        try:
            entries = await registry.resolve_audit(await registry.audit_entries())
        finally:
            await registry.close()
        return [e.draft for e in entries if e.draft.action == "session-takeover"]

    first, counted = asyncio.run(read())
    assert "coalesced" not in first.details
    assert counted.device_id == "cloned-device"
    assert counted.details["coalesced"] == "true"
    assert counted.details["count"] == str(PING_PONGS - 2)  # 19 takeovers: the first, then 18 counted
    assert counted.details["first_at"] == first.at.isoformat()
    assert counted.details["peer_hosts"] == "1"  # both clones ran on this machine
    assert counted.peer is not None and counted.peer.startswith("127.0.0.1:")
