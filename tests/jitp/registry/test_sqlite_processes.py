"""The SQLite registry shared by several processes, as the workers of `jitp serve --workers N` share
it: they open a new file at the same moment (the WAL switch and the migrations serialised by
SQLite's locks), provision the same devices at once (one record, one event each), append to one
audit chain, and keep one outbox cursor each."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path
from typing import Any

from jitp.registry.sqlite import SQLiteRegistry
from tests.jitp.registry.test_registry_contract import PEER, T0, chain_intact, identity

PROCESSES = 4
SHARED = 30  # devices every process provisions at the same moment
OWN = 10  # devices only one process provisions


async def _node(path: Path, index: int) -> None:
    registry = SQLiteRegistry(path, batch_window=0.002)
    await registry.open()  # a fresh file: the processes race through the migrations
    try:
        order = range(SHARED) if index % 2 else reversed(range(SHARED))
        calls = [registry.provision(identity(f"shared-{i:02d}"), at=T0, peer=PEER) for i in order]
        calls += [registry.provision(identity(f"p{index}-{i:02d}"), at=T0, peer=PEER) for i in range(OWN)]
        await asyncio.gather(*calls)
        await registry.set_sink_cursor(f"mqtt:node-w{index}", index + 1)
    finally:
        await registry.close()


def _process(path: Path, index: int, barrier: Any) -> None:
    barrier.wait()
    asyncio.run(_node(path, index))


def test_processes_share_one_sqlite_registry(tmp_path: Path) -> None:
    path = tmp_path / "data" / "registry.db"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    procs = [ctx.Process(target=_process, args=(path, i, barrier)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    async def check() -> None:
        registry = SQLiteRegistry(path)
        await registry.open()
        try:
            expected = {f"shared-{i:02d}" for i in range(SHARED)}
            expected |= {f"p{n}-{i:02d}" for n in range(PROCESSES) for i in range(OWN)}
            devices = await registry.list_devices()
            assert sorted(d.device_id for d in devices) == sorted(expected)
            events = await registry.events()
            assert sorted(e.device_id for e in events) == sorted(expected)  # one event per device
            entries = await chain_intact(registry)  # one chain, whichever process appended
            assert len(entries) == len(expected)
            cursors = [await registry.sink_cursor(f"mqtt:node-w{n}") for n in range(PROCESSES)]
            assert cursors == [n + 1 for n in range(PROCESSES)]
            assert await registry.schema_version() >= 1
        finally:
            await registry.close()

    asyncio.run(check())
