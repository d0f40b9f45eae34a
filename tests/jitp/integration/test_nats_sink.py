# ruff: noqa: F811  (pytest fixtures imported from test_registry_contract)
"""The NATS JetStream event sink (jitp.integration.nats_sink) and the registry's sink cursors.

Registry tests run on both backends (the ``backend`` fixture of test_registry_contract). NATS tests
use a real server with JetStream (``JITP_TEST_NATS_URL``, default ``nats://127.0.0.1:4222``), each
test with its own stream and subject prefix, deleted afterwards. Without a reachable server they
are skipped, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from jitp.config import NatsConfig
from jitp.domain.records import Command
from jitp.integration.nats_sink import SINK_NAME, NatsSink, device_filter, event_subject, subject_token
from jitp.registry import Registry
from jitp.registry.sqlite import SQLiteRegistry
from tests.helpers import wait_until_async
from tests.jitp.registry.test_registry_contract import (  # noqa: F401  (fixtures)
    T0,
    Backend,
    backend,
    identity,
    pg_dsn,
    run,
)

NATS_URL = os.environ.get("JITP_TEST_NATS_URL", "nats://127.0.0.1:4222")


# -- subject tokens -------------------------------------------------------------------------------
def test_subject_tokens_are_safe_and_documented() -> None:
    assert subject_token("dev-1") == "dev-1"
    assert subject_token("a.b") == "a%2Eb"
    assert subject_token("a*b>c") == "a%2Ab%3Ec"
    assert subject_token("100%") == "100%25"
    assert subject_token("") == subject_token(None) == "%"
    assert subject_token("zähler") == "zähler"


@given(st.text(max_size=20), st.text(max_size=20))
def test_subject_tokens_are_injective_and_valid(a: str, b: str) -> None:
    ta, tb = subject_token(a), subject_token(b)
    assert (ta == tb) == (a == b)
    assert ta and not any(c in ".*>" or c.isspace() for c in ta)


# -- registry: events_after, sink cursors -----------------------------------------------------------
async def provision(registry: Registry, *ids: str) -> None:
    for device_id in ids:
        outcome = await registry.provision(identity(device_id), at=T0, peer=None)
        assert outcome.created


def test_events_after_orders_by_seq_with_limit_and_gaps(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        assert await registry.events_after(0) == []
        await provision(registry, "a", "b.1", "c")
        rows = await registry.events_after(0)
        assert [e.device_id for _, e in rows] == ["a", "b.1", "c"]
        seqs = [s for s, _ in rows]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        assert [e.event_id for _, e in rows] == [e.event_id for e in await registry.events()]
        assert await registry.events_after(seqs[0], limit=1) == [rows[1]]
        assert await registry.events_after(seqs[-1]) == []
        # Erasing "b.1" deletes its rows: a gap, and the erased event at the end.
        await registry.erase(device_id="b.1", at=T0, actor="op")
        after = await registry.events_after(0)
        assert [(e.type, e.device_id) for _, e in after] == [
            ("provisioned", "a"),
            ("provisioned", "c"),
            ("erased", "b.1"),
        ]
        assert after[-1][0] > seqs[-1]

    run(backend, body)


def test_sink_cursor_is_durable_and_never_moves_back(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        assert await registry.sink_cursor("nats") == 0
        await registry.set_sink_cursor("nats", 5)
        await registry.set_sink_cursor("nats", 3)
        assert await registry.sink_cursor("nats") == 5
        assert await registry.sink_cursor("other") == 0

    run(backend, body)

    async def reopened(registry: Registry) -> None:
        assert await registry.sink_cursor("nats") == 5

    run(backend, reopened)


def test_erased_event_is_scrubbed_only_after_mqtt_and_every_sink(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        await provision(registry, "gone")
        [(seq0, _)] = await registry.events_after(0)
        await registry.set_sink_cursor("nats", seq0)  # the sink is registered and up to date
        erasure = await registry.erase(device_id="gone", at=T0, actor="op")
        assert erasure.event is not None
        # MQTT delivered it, the NATS sink has not: the event stays whole for the sink.
        await registry.mark_delivered([erasure.event.event_id], at=T0)
        [(seq, event)] = await registry.events_after(seq0)
        assert event.device_id == "gone" and json.loads(event.payload)["device_id"] == "gone"
        # The sink passes it: scrubbed, and no longer listed.
        await registry.set_sink_cursor("nats", seq)
        assert await registry.events_after(seq0) == []
        [stored] = [e for e in await registry.events() if e.type == "erased"]
        assert stored.device_id == "" and stored.payload == b""

    run(backend, body)


def test_erased_event_waits_for_mqtt_too(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        await provision(registry, "gone")
        erasure = await registry.erase(device_id="gone", at=T0, actor="op")
        [(seq, _)] = await registry.events_after(0)
        await registry.set_sink_cursor("nats", seq)  # the sink first: MQTT still owes it
        assert [e.device_id for e in await registry.pending_events()] == ["gone"]
        assert erasure.event is not None
        await registry.mark_delivered([erasure.event.event_id], at=T0)
        assert [e.payload for e in await registry.events()] == [b""]

    run(backend, body)


# -- NATS ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def nats_url() -> str:
    """A reachable NATS server with JetStream, or skip (fail when CI is set)."""

    async def quiet(exc: Exception) -> None:
        """Not a check: nats-py reports errors here too; the probe's exception below says what failed."""

    async def probe() -> None:
        nc = await asyncio.wait_for(
            nats.connect(
                NATS_URL,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                connect_timeout=3,
                error_cb=quiet,
            ),
            10,
        )
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()

    try:
        asyncio.run(probe())
        return NATS_URL
    except Exception as exc:
        message = f"NATS with JetStream is not reachable at {NATS_URL} ({type(exc).__name__}: {exc})"
    if os.environ.get("CI"):
        pytest.fail(
            f"{message}. CI is set, so the NATS sink tests must run: start nats-server -js "
            "or set JITP_TEST_NATS_URL.",
            pytrace=False,
        )
    pytest.skip(f"{message}; set JITP_TEST_NATS_URL to run the NATS sink tests")


@dataclass
class Stream:
    """A unique stream and subject prefix on the shared server."""

    url: str
    name: str
    prefix: str

    def config(self, **kw: Any) -> NatsConfig:
        values: dict[str, Any] = {
            "enabled": True,
            "servers": self.url,
            "stream": self.name,
            "subject_prefix": self.prefix,
            "poll_interval": 0.1,
        }
        values.update(kw)
        return NatsConfig(**values)

    async def messages(self, expect: int | None = None, within: float = 10.0) -> list[Msg]:
        """Every message of the stream, read with an ephemeral JetStream pull consumer."""
        nc = await nats.connect(self.url, allow_reconnect=False)
        try:
            js = nc.jetstream()
            if expect is not None:  # (on timeout, the caller's assertions say what is missing)

                async def enough() -> bool:
                    return bool((await js.stream_info(self.name)).state.messages >= expect)

                await wait_until_async(enough, within, interval=0.05)
            total = (await js.stream_info(self.name)).state.messages
            if not total:
                return []
            sub = await js.pull_subscribe(f"{self.prefix}.>", stream=self.name)
            out: list[Msg] = []
            while len(out) < total:
                batch = await sub.fetch(total - len(out), timeout=5)
                for msg in batch:
                    await msg.ack()
                out += batch
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()

    async def exists(self) -> bool:
        nc = await nats.connect(self.url, allow_reconnect=False)
        try:
            await nc.jetstream().stream_info(self.name)
            return True
        except nats.js.errors.NotFoundError:
            return False
        finally:
            await nc.close()

    async def delete(self) -> None:
        nc = await nats.connect(self.url, allow_reconnect=False)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(self.name)
        finally:
            await nc.close()


def new_stream(url: str) -> Stream:
    tag = secrets.token_hex(4)
    return Stream(url=url, name=f"JITP_TEST_{tag}", prefix=f"jitptest.{tag}.events")


@pytest.fixture
def stream(nats_url: str) -> Any:
    s = new_stream(nats_url)
    try:
        yield s
    finally:
        asyncio.run(s.delete())


@contextlib.asynccontextmanager
async def sqlite(tmp: Path) -> AsyncIterator[SQLiteRegistry]:
    registry = SQLiteRegistry(tmp / "registry.db", batch_window=0)
    await registry.open()
    try:
        yield registry
    finally:
        await registry.close()


def paused(caplog: pytest.LogCaptureFixture, why: str = "") -> int:
    """How many times the sink has logged a failed attempt ("NATS sink paused ..."), for ``why``."""
    return sum(
        1
        for r in caplog.records
        if r.name == "jitp.nats" and r.getMessage().startswith("NATS sink paused") and why in r.getMessage()
    )


async def caught_up(registry: Registry) -> bool:
    rows = await registry.events_after(0, limit=100_000)
    return not rows or await registry.sink_cursor(SINK_NAME) >= rows[-1][0]


def ids_of(messages: list[Msg]) -> list[str]:
    return [m.headers["Nats-Msg-Id"] for m in messages if m.headers]


def test_events_are_published_in_order_with_subject_and_headers(stream: Stream, tmp_path: Path) -> None:
    async def body() -> None:
        async with sqlite(tmp_path) as registry:
            await provision(registry, "dev-1", "odd.id*>", "dev-3")
            await registry.change_status("dev-1", Command.DISABLE, at=T0, actor="op")
            sink = NatsSink(registry, stream.config())
            await sink.start()
            try:
                assert await wait_until_async(lambda: caught_up(registry), 10), "the sink did not catch up"
            finally:
                await sink.stop()
            events = await registry.events()
            messages = await stream.messages(expect=len(events))
        assert ids_of(messages) == [e.event_id for e in events]
        assert [m.subject for m in messages] == [
            f"{stream.prefix}.provisioned.eu-west.dev-1",
            f"{stream.prefix}.provisioned.eu-west.odd%2Eid%2A%3E",
            f"{stream.prefix}.provisioned.eu-west.dev-3",
            f"{stream.prefix}.disabled.eu-west.dev-1",
        ]
        for message, event in zip(messages, events, strict=True):
            assert message.data == event.payload
            assert message.headers is not None
            assert message.headers["Jitp-Event-Type"] == event.type
            assert message.headers["Jitp-Device-Id"] == event.device_id
            assert message.subject == event_subject(stream.prefix, event)

    asyncio.run(body())


def test_the_same_event_twice_is_one_stream_message(stream: Stream, tmp_path: Path) -> None:
    async def body() -> None:
        async with sqlite(tmp_path) as registry:
            await provision(registry, "dup")
            [(_, event)] = await registry.events_after(0)
            sink = NatsSink(registry, stream.config())
            await sink.start()
            try:
                assert await wait_until_async(lambda: caught_up(registry), 10), "the sink did not catch up"
                await asyncio.wait_for(sink.connected.wait(), 5)
                # A crash after the publish, before the cursor moved: the same event again.
                nc = await nats.connect(stream.url, allow_reconnect=False)
                try:
                    js = nc.jetstream()
                    await sink.publish(js, event)
                    await sink.publish(js, event)
                    info = await js.stream_info(stream.name)
                    assert info.config.duplicate_window == 120.0
                finally:
                    await nc.close()
            finally:
                await sink.stop()
        messages = await stream.messages()
        assert ids_of(messages) == [event.event_id]

    asyncio.run(body())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proxy:
    """A TCP proxy to the NATS server that the test can cut and restore (the server stays up)."""

    def __init__(self, target: str) -> None:
        host_port = target.split("://", 1)[1]
        host, _, port = host_port.rpartition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            # Not a check: the test cuts the proxy on purpose (down()), which ends the copy with
            # a reset or a closed stream.
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_outage_events_wait_in_the_outbox_and_arrive_exactly_once(
    stream: Stream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jitp.nats")

    async def body() -> None:
        proxy = Proxy(stream.url)
        await proxy.up()
        async with sqlite(tmp_path) as registry:
            await provision(registry, "before-1", "before-2")
            sink = NatsSink(registry, stream.config(servers=proxy.url))
            await sink.start()
            try:
                assert await wait_until_async(lambda: caught_up(registry), 10), "the sink did not catch up"
                # NATS becomes unreachable for the sink; devices keep joining, MQTT keeps delivering.
                await proxy.down()
                assert await wait_until_async(lambda: not sink.connected.is_set(), 10), "still connected"
                await provision(registry, *(f"during-{i}" for i in range(20)))
                await registry.erase(device_id="before-2", at=T0, actor="op")
                sink.wake()
                pending = await registry.pending_events(1000)
                await registry.mark_delivered([e.event_id for e in pending], at=datetime.now(UTC))
                # Witness: the sink has tried again since these events were committed, and failed.
                tried = paused(caplog)
                assert await wait_until_async(lambda: paused(caplog) > tried, 10), "the sink did not retry"
                assert not await caught_up(registry)
                # Erased while the sink was behind: still whole for the sink.
                erased = [e for _, e in await registry.events_after(0) if e.type == "erased"]
                assert [e.device_id for e in erased] == ["before-2"]
                await proxy.up()
                assert await wait_until_async(lambda: caught_up(registry), 20), "the sink did not catch up"
            finally:
                await sink.stop()
                await proxy.down()
            events = await registry.events()
            # The sink passed the erased event: it is scrubbed in the outbox now.
            assert [e.payload for e in events if e.type == "erased"] == [b""]
        messages = await stream.messages(expect=22)
        got = ids_of(messages)
        assert len(got) == len(set(got)) == 22  # nothing lost, nothing twice
        # The erased device's earlier messages were purged; its erased event (whole) remains.
        subjects = [m.subject for m in messages]
        assert f"{stream.prefix}.provisioned.eu-west.before-2" not in subjects
        [gone] = [m for m in messages if m.subject.endswith(".before-2")]
        assert json.loads(gone.data)["type"] == "erased" and json.loads(gone.data)["device_id"] == "before-2"
        assert subjects[0] == f"{stream.prefix}.provisioned.eu-west.before-1"
        assert device_filter(stream.prefix, "before-2") == f"{stream.prefix}.*.*.before-2"

    asyncio.run(body())


def test_a_dead_server_leaves_the_cursor_alone_and_a_new_sink_catches_up(
    stream: Stream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jitp.nats")

    async def body() -> None:
        async with sqlite(tmp_path) as registry:
            dead = NatsSink(registry, stream.config(servers=f"nats://127.0.0.1:{free_port()}"))
            await dead.start()
            await provision(registry, "x1", "x2", "x3")
            # Witness: the sink has tried since the events were committed, and failed.
            tried = paused(caplog)
            assert await wait_until_async(lambda: paused(caplog) > tried, 10), "the sink did not try"
            assert await registry.sink_cursor(SINK_NAME) == 0 and not dead.connected.is_set()
            await dead.stop()
            sink = NatsSink(registry, stream.config(), batch=2)  # several batches
            await sink.start()
            try:
                assert await wait_until_async(lambda: caught_up(registry), 10), "the sink did not catch up"
            finally:
                await sink.stop()
            expected = [e.event_id for e in await registry.events()]
        assert ids_of(await stream.messages(expect=3)) == expected

    asyncio.run(body())


def test_missing_stream_without_create_stream_pauses_the_sink(
    stream: Stream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="jitp.nats")

    async def body() -> None:
        async with sqlite(tmp_path) as registry:
            await provision(registry, "y1")
            sink = NatsSink(registry, stream.config(create_stream=False))
            await sink.start()
            try:
                # Witness: the sink reached the server and found no stream.
                missing = f"stream {stream.name} does not exist (nats.create_stream is false)"
                assert await wait_until_async(lambda: paused(caplog, missing) > 0, 10), "the sink did not try"
                assert not sink.connected.is_set() and await registry.sink_cursor(SINK_NAME) == 0
                assert not await stream.exists()  # and it did not create one
            finally:
                await sink.stop()

    asyncio.run(body())
