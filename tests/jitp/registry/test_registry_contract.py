"""The Registry contract, checked on every backend: the embedded SQLite and PostgreSQL.

Each test runs once per backend (``backend`` fixture: "sqlite", "postgresql"). PostgreSQL tests
use a real server (``JITP_TEST_POSTGRES_DSN``, default ``postgresql://postgres@127.0.0.1:5432/test``,
then user ``root``), each test in its own ``jitp_test_<random>_<n>`` schema, dropped afterwards.
Without a reachable server they are skipped, unless the environment variable ``CI`` is set: then
they fail, so a CI run cannot pass without testing the PostgreSQL registry.

Registries are driven directly with synthetic identities (no certificates): this is about the
storage contract, not about verification. A few tests go through ProvisioningService.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import secrets
import sqlite3
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import asyncpg
import pytest

from jitp import errors
from jitp.config import Config, PostgresConfig, SQLiteConfig, default_keyring_schema
from jitp.crypto.keys import EnvKeyProvider
from jitp.domain.audit import AuditDraft, AuditEntry, verify_chain
from jitp.domain.identity import DeviceIdentity
from jitp.domain.records import Command, DeviceStatus
from jitp.registry import Registry
from jitp.registry import postgres as pg_registry
from jitp.registry.factory import make_registry
from jitp.registry.postgres import PostgresRegistry, drop_schema, redact
from jitp.registry.sqlite import SQLiteRegistry
from tests.jitp import pkitools as pt

T = TypeVar("T")

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PEER_HOST = "203.0.113.9"
PEER = f"{PEER_HOST}:50000"
CA_ID = pt.MANUFACTURER_ANCHOR.ca_id
RUN_ID = secrets.token_hex(4)
_SCHEMAS = itertools.count(1)


# -- backends ---------------------------------------------------------------------------------
def _postgres_dsns() -> list[str]:
    explicit = os.environ.get("JITP_TEST_POSTGRES_DSN")
    if explicit:
        return [explicit]
    return [f"postgresql://{user}@127.0.0.1:5432/test" for user in ("postgres", "root")]


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """A reachable PostgreSQL DSN, or skip (fail when CI is set)."""

    async def probe(dsn: str) -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        await conn.close()

    problems = []
    for dsn in _postgres_dsns():
        try:
            asyncio.run(probe(dsn))
            return dsn
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            problems.append(f"{redact(dsn)}: {exc or type(exc).__name__}")
    message = "PostgreSQL is not reachable (" + "; ".join(problems) + ")"
    if os.environ.get("CI"):
        pytest.fail(
            f"{message}. CI is set, so the PostgreSQL registry tests must run: start PostgreSQL "
            "or set JITP_TEST_POSTGRES_DSN.",
            pytrace=False,
        )
    pytest.skip(f"{message}; set JITP_TEST_POSTGRES_DSN to run the PostgreSQL registry tests")


@dataclass
class Backend:
    name: str
    tmp: Path
    dsn: str | None = None
    schema: str | None = None

    def config(self, *, batch_window_ms: float = 0.0) -> Config:
        if self.name == "sqlite":
            return Config(data_dir=self.tmp, sqlite=SQLiteConfig(batch_window_ms=batch_window_ms))
        return Config(
            data_dir=self.tmp,
            registry=self.dsn,
            postgres=PostgresConfig(pool_size=4, schema=self.schema, batch_window_ms=batch_window_ms),
        )

    def make(self, *, batch_window_ms: float = 0.0, max_batch: int | None = None) -> Registry:
        """A new (unopened) registry instance on this backend's storage: another "node"."""
        if max_batch is None:
            return make_registry(self.config(batch_window_ms=batch_window_ms))
        if self.name == "sqlite":
            return SQLiteRegistry(
                self.tmp / "registry.db", max_batch=max_batch, batch_window=batch_window_ms / 1000
            )
        assert self.dsn is not None
        return PostgresRegistry(
            self.dsn,
            keys=EnvKeyProvider(),
            schema=self.schema,
            pool_size=4,
            max_batch=max_batch,
            batch_window=batch_window_ms / 1000,
        )

    async def tamper(self, sql: str, *args: Any) -> None:
        """Change the registry's storage behind its back (``keyring.<table>``: the keyring's)."""
        if self.name == "sqlite":
            config = self.config()
            db = sqlite3.connect(config.registry_path)
            try:
                db.execute("ATTACH DATABASE ? AS keyring", (str(config.keyring_path),))
                db.execute(sql, args)
                db.commit()
            finally:
                db.close()
            return
        numbers = itertools.count(1)
        sql = re.sub(r"\?", lambda _: f"${next(numbers)}", sql)
        sql = sql.replace("keyring.", f'"{default_keyring_schema(self.schema)}".')
        conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema or "public"})
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path)
        return
    dsn = request.getfixturevalue("pg_dsn")
    schema = f"jitp_test_{RUN_ID}_{next(_SCHEMAS)}"
    try:
        yield Backend("postgresql", tmp_path, dsn=dsn, schema=schema)
    finally:
        asyncio.run(drop_schema(dsn, schema))


@pytest.fixture
def postgres(pg_dsn: str, tmp_path: Path) -> Iterator[Backend]:
    """PostgreSQL only (tests of what SQLite has no counterpart for)."""
    schema = f"jitp_test_{RUN_ID}_{next(_SCHEMAS)}"
    try:
        yield Backend("postgresql", tmp_path, dsn=pg_dsn, schema=schema)
    finally:
        asyncio.run(drop_schema(pg_dsn, schema))


def run(backend: Backend, body: Callable[[Registry], Coroutine[Any, Any, T]], **kw: Any) -> T:
    async def go() -> T:
        registry = backend.make(**kw)
        await registry.open()
        try:
            return await body(registry)
        finally:
            await registry.close()

    return asyncio.run(go())


# -- synthetic identities -----------------------------------------------------------------------
def fp_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def identity(device_id: str, cert: str = "1", **kw: Any) -> DeviceIdentity:
    """Device ``device_id`` with its certificate number ``cert`` (another number: another certificate)."""
    values: dict[str, Any] = {
        "device_id": device_id,
        "cert_fingerprint": fp_of(f"{device_id}/{cert}"),
        "ca_id": CA_ID,
        "region": "eu-west",
        "serial": format(int(fp_of(cert)[:12], 16), "x"),
        "subject": f"CN={device_id}",
        "not_after": T0 + timedelta(days=365),
        "attributes": MappingProxyType({"type": "sensor", "floor": 3}),
        "template": "default",
        "template_version": 1,
        "config": MappingProxyType(
            {"namespace": {"publish": [f"devices/{device_id}/#"], "subscribe": []}, "profile": {"max_qos": 1}}
        ),
    }
    values.update(kw)
    return DeviceIdentity(**values)


def draft(action: str = "note", **kw: Any) -> AuditDraft:
    return AuditDraft(at=kw.pop("at", T0), action=action, actor=kw.pop("actor", "test"), **kw)


async def chain_intact(registry: Registry) -> list[AuditEntry]:
    entries = await registry.audit_entries()
    assert verify_chain(entries) == []
    assert await registry.audit_head() == ((entries[-1].seq, entries[-1].hash) if entries else None)
    return entries


def stored_text(entries: list[AuditEntry]) -> str:
    return json.dumps([e.to_json() for e in entries])


async def change(registry: Registry, device_id: str, command: Command, **kw: Any) -> Any:
    return await registry.change_status(device_id, command, at=kw.pop("at", T0), actor="op", **kw)


# -- anchors ----------------------------------------------------------------------------------
def test_anchors_register_enable_disable_and_trust_version(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        assert await registry.anchors() == []
        assert await registry.audit_head() is None
        v0 = await registry.trust_version()
        stored = await registry.register_anchor(
            replace(pt.MANUFACTURER_ANCHOR, registered_at=T0), audit=draft("ca-registered")
        )
        assert stored.ca_id == CA_ID and stored.enabled and stored.region == "eu-west"
        assert stored.cert_der == pt.MANUFACTURER_ANCHOR.cert_der
        assert stored.registered_at == T0 and stored.registered_at.tzinfo is not None
        assert await registry.anchors() == [stored]
        v1 = await registry.trust_version()
        assert v1 > v0

        disabled = await registry.set_anchor_enabled(CA_ID, False, audit=draft("ca-disabled"))
        assert not disabled.enabled
        assert [a.enabled for a in await registry.anchors()] == [False]
        v2 = await registry.trust_version()
        assert v2 > v1

        # Registering again updates and re-enables; registered_at stays.
        again = await registry.register_anchor(
            replace(pt.MANUFACTURER_ANCHOR, region="us-east", template="t2", registered_at=T0 + timedelta(1)),
            audit=draft("ca-registered"),
        )
        assert again.enabled and again.region == "us-east" and again.template == "t2"
        assert again.registered_at == T0
        assert await registry.trust_version() > v2

        with pytest.raises(errors.NotFound):
            await registry.set_anchor_enabled("f" * 64, True, audit=draft("ca-enabled"))
        service = await registry.register_anchor(
            replace(pt.SERVICE_ANCHOR, registered_at=T0 + timedelta(days=1)), audit=draft("ca-registered")
        )
        assert [a.ca_id for a in await registry.anchors()] == [CA_ID, service.ca_id]
        entries = await chain_intact(registry)
        assert [e.draft.action for e in entries] == [
            "ca-registered",
            "ca-disabled",
            "ca-registered",
            "ca-registered",
        ]

    run(backend, body)


# -- provisioning -----------------------------------------------------------------------------
def test_provision_creates_record_event_and_audit(backend: Backend) -> None:
    ident = identity("dev-create")

    async def body(registry: Registry) -> None:
        outcome = await registry.provision(ident, at=T0, peer=PEER)
        assert outcome.created and not outcome.reprovisioned and outcome.event is not None
        record = outcome.record
        assert record.status is DeviceStatus.ACTIVE
        assert (record.provisioned_at, record.last_seen) == (T0, T0)
        stored = await registry.get_device("dev-create")
        assert stored == record
        assert stored.not_after.tzinfo is not None and stored.provisioned_at.tzinfo is not None
        assert dict(stored.attributes) == {"type": "sensor", "floor": 3}
        assert stored.config["namespace"]["publish"] == ["devices/dev-create/#"]
        assert (stored.template, stored.template_version) == ("default", 1)
        assert await registry.list_devices() == [record]
        assert await registry.find_by_fingerprint(ident.cert_fingerprint) == record
        assert await registry.find_by_fingerprint(fp_of("nobody")) is None
        assert await registry.get_device("nobody") is None

        events = await registry.events("dev-create")
        assert events == [outcome.event]
        assert events[0].type == "provisioned" and events[0].occurred_at == T0
        assert events[0].document()["cert_fingerprint"] == ident.cert_fingerprint

        entries = await chain_intact(registry)
        assert [e.draft.action for e in entries] == ["provisioned"]
        assert entries[0].draft.details["event_id"] == outcome.event.event_id

    run(backend, body)


def test_reconnect_updates_last_seen_only(backend: Backend) -> None:
    ident = identity("dev-again")
    t1, t2 = T0 + timedelta(minutes=5), T0 + timedelta(minutes=9)

    async def first(registry: Registry) -> None:
        created = await registry.provision(ident, at=T0, peer=PEER)
        again = await registry.provision(ident, at=t1, peer=PEER)
        assert not again.created and again.event is None and not again.reprovisioned
        assert again.record == created.record  # the record as it was (last_seen is written behind)
        assert len(await registry.events()) == 1
        assert len(await registry.audit_entries()) == 1  # reconnects are not audited

    async def second(registry: Registry) -> None:
        record = await registry.get_device("dev-again")
        assert record is not None and record.last_seen == t1 and record.provisioned_at == T0
        registry.note_seen("dev-again", t2)  # type: ignore[attr-defined]

    async def third(registry: Registry) -> None:
        record = await registry.get_device("dev-again")
        assert record is not None and record.last_seen == t2

    run(backend, first)  # close() writes pending last_seen updates
    run(backend, second)
    run(backend, third)


def test_reconnect_last_seen_is_written_with_the_next_batch(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        await registry.provision(identity("dev-a"), at=T0, peer=None)
        await registry.provision(identity("dev-a"), at=T0 + timedelta(seconds=30), peer=None)
        await registry.provision(identity("dev-b"), at=T0 + timedelta(seconds=31), peer=None)
        record = await registry.get_device("dev-a")
        assert record is not None and record.last_seen == T0 + timedelta(seconds=30)

    run(backend, body)


def test_last_seen_never_goes_back(backend: Backend) -> None:
    """Two nodes write a device's reconnect times out of order: the later time stays."""
    late, early = T0 + timedelta(minutes=10), T0 + timedelta(minutes=5)

    async def body() -> None:
        a, b = backend.make(), backend.make()
        await a.open()
        await b.open()
        try:
            await a.provision(identity("dev-seen"), at=T0, peer=None)
            a.note_seen("dev-seen", late)
            await a.flush_seen()
            b.note_seen("dev-seen", early)
            await b.flush_seen()
            record = await b.get_device("dev-seen")
            assert record is not None and record.last_seen == late
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


def test_another_certificate_is_a_conflict_under_reject(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        await registry.provision(identity("dev-c"), at=T0, peer=PEER)
        with pytest.raises(errors.IdentityConflict) as info:
            await registry.provision(identity("dev-c", "2"), at=T0, peer=PEER)
        assert info.value.device_id == "dev-c"
        record = await registry.get_device("dev-c")
        assert record is not None and record.cert_fingerprint == identity("dev-c").cert_fingerprint
        assert [e.type for e in await registry.events()] == ["provisioned"]

    run(backend, body)


def test_rotate_keeps_the_record_and_refuses_the_superseded_certificate(backend: Backend) -> None:
    t1 = T0 + timedelta(hours=1)

    async def body(registry: Registry) -> None:
        await registry.provision(identity("dev-r"), at=T0, peer=PEER)
        await change(registry, "dev-r", Command.QUARANTINE)
        outcome = await registry.provision(identity("dev-r", "2"), at=t1, peer=PEER, policy="rotate")
        assert outcome.reprovisioned and not outcome.created and outcome.event is not None
        record = outcome.record
        assert record.cert_fingerprint == identity("dev-r", "2").cert_fingerprint
        assert record.status is DeviceStatus.QUARANTINED and record.provisioned_at == T0
        assert await registry.get_device("dev-r") == record
        doc = outcome.event.document()
        assert doc["previous_fingerprint"] == identity("dev-r").cert_fingerprint and doc["reset"] is False
        assert [e.type for e in await registry.events("dev-r")] == [
            "provisioned",
            "quarantined",
            "reprovisioned",
        ]

        with pytest.raises(errors.IdentityConflict, match="superseded"):
            await registry.provision(identity("dev-r"), at=t1, peer=PEER, policy="rotate")
        # The new certificate reconnects; a third one rotates again.
        assert not (
            await registry.provision(identity("dev-r", "2"), at=t1, peer=None, policy="rotate")
        ).created
        third = await registry.provision(identity("dev-r", "3"), at=t1, peer=None, policy="rotate")
        assert third.reprovisioned
        with pytest.raises(errors.IdentityConflict, match="superseded"):
            await registry.provision(identity("dev-r", "2"), at=t1, peer=None, policy="reset")

        entries = await chain_intact(registry)
        rotated = [e for e in entries if e.draft.action == "reprovisioned"]
        assert len(rotated) == 2 and rotated[0].draft.details["policy"] == "rotate"
        assert identity("dev-r", "3").cert_fingerprint not in stored_text(entries)  # pseudonymous

    run(backend, body)


def test_reprovisioned_audit_does_not_name_the_previous_certificate(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        await registry.provision(identity("dev-pf"), at=T0, peer=None)
        await registry.provision(identity("dev-pf", "2"), at=T0, peer=None, policy="rotate")
        await registry.erase(device_id="dev-pf", at=T0, actor="op")
        assert identity("dev-pf").cert_fingerprint not in stored_text(await registry.audit_entries())

    run(backend, body)


def test_reset_starts_a_fresh_record(backend: Backend) -> None:
    t1 = T0 + timedelta(hours=2)

    async def body(registry: Registry) -> None:
        await registry.provision(identity("dev-x"), at=T0, peer=PEER)
        await change(registry, "dev-x", Command.QUARANTINE)
        outcome = await registry.provision(
            identity("dev-x", "2", attributes=MappingProxyType({"type": "gateway"})),
            at=t1,
            peer=PEER,
            policy="reset",
        )
        assert outcome.reprovisioned and outcome.event is not None
        assert outcome.event.document()["reset"] is True
        record = await registry.get_device("dev-x")
        assert record == outcome.record
        assert record.status is DeviceStatus.ACTIVE and record.provisioned_at == t1
        assert dict(record.attributes) == {"type": "gateway"}

    run(backend, body)


@pytest.mark.parametrize(
    ("command", "admitted"),
    [
        (Command.DISABLE, False),
        (Command.REVOKE, False),
        (Command.DEPROVISION, False),
        (Command.QUARANTINE, True),
    ],
    ids=str,
)
def test_blocked_statuses_refuse_even_the_known_certificate(
    backend: Backend, command: Command, admitted: bool
) -> None:
    async def body(registry: Registry) -> None:
        await registry.provision(identity("dev-b"), at=T0, peer=None)
        await change(registry, "dev-b", command)
        events = len(await registry.events())
        for policy in ("reject", "rotate"):
            for cert in ("1", "2"):
                if admitted and cert == "1":
                    assert not (await registry.provision(identity("dev-b", cert), at=T0, peer=None)).created
                elif not admitted:
                    with pytest.raises(errors.DeviceBlocked):
                        await registry.provision(identity("dev-b", cert), at=T0, peer=None, policy=policy)
        assert len(await registry.events()) == events

    run(backend, body)


def test_unknown_policy_is_a_programming_error(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        with pytest.raises(ValueError, match="policy"):
            await registry.provision(identity("dev-p"), at=T0, peer=None, policy="merge")

    run(backend, body)


def test_a_batch_mixing_devices_audit_and_refusals(backend: Backend) -> None:
    """Concurrent requests of every kind land in one group-committed batch; each gets its answer."""

    async def body(registry: Registry) -> None:
        await registry.provision(identity("known"), at=T0, peer=None)
        results = await asyncio.gather(
            registry.provision(identity("new-1"), at=T0, peer=PEER),
            registry.provision(identity("known", "2"), at=T0, peer=None),
            registry.append_audit([draft("refused", reason="unknown_ca")]),
            registry.provision(identity("known", "3"), at=T0, peer=None, policy="rotate"),
            registry.provision(identity("new-1"), at=T0 + timedelta(seconds=1), peer=None),
            registry.provision(identity("new-2"), at=T0, peer=None),
            return_exceptions=True,
        )
        assert results[0].created and results[5].created
        assert isinstance(results[1], errors.IdentityConflict)
        assert results[2] is None
        assert results[3].reprovisioned
        assert not results[4].created
        assert sorted(e.type for e in await registry.events()) == [
            "provisioned",
            "provisioned",
            "provisioned",
            "reprovisioned",
        ]
        entries = await chain_intact(registry)
        assert sorted(e.draft.action for e in entries) == ["provisioned"] * 3 + ["refused", "reprovisioned"]

    run(backend, body, batch_window_ms=20)


# -- outbox -----------------------------------------------------------------------------------
def test_outbox_pending_and_delivered(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        outcomes = [await registry.provision(identity(f"dev-{i}"), at=T0, peer=None) for i in range(5)]
        ids = [o.event.event_id for o in outcomes if o.event]
        assert [e.event_id for e in await registry.pending_events()] == ids
        assert [e.event_id for e in await registry.pending_events(limit=2)] == ids[:2]
        await registry.mark_delivered(ids[:3], at=T0)
        await registry.mark_delivered(ids[:1], at=T0 + timedelta(1))  # again: no effect
        await registry.mark_delivered([], at=T0)
        assert [e.event_id for e in await registry.pending_events()] == ids[3:]
        assert [e.event_id for e in await registry.events()] == ids  # delivered events stay
        assert [e.event_id for e in await registry.events("dev-2")] == [ids[2]]
        assert await registry.events("nobody") == []
        event = (await registry.events("dev-1"))[0]
        assert event == outcomes[1].event and isinstance(event.payload, bytes)

    run(backend, body)


def test_events_of_two_instances_are_shared(backend: Backend) -> None:
    async def body() -> None:
        a, b = backend.make(), backend.make()
        await a.open()
        await b.open()
        try:
            created = await a.provision(identity("shared"), at=T0, peer=None)
            assert [e.event_id for e in await b.pending_events()] == [created.event.event_id]
            assert await b.get_device("shared") == created.record
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


def test_undecryptable_events_at_the_head_of_the_outbox_do_not_stall_it(backend: Backend) -> None:
    """Full batches of outbox rows that cannot be read at the head of the outbox, then a readable
    one: the readable one is returned (the unreadable ones are skipped before the LIMIT), so a
    publisher polling batch by batch moves on. Unreadable: rows whose data key is gone (the registry
    restored from a copy older than their devices' erasure), then payloads altered at rest."""
    batch = 2
    shredded, altered = ["ghost-1", "ghost-2"], ["ghost-3", "ghost-4"]

    async def body(registry: Registry) -> None:
        for ghost in shredded + altered:
            await registry.provision(identity(ghost), at=T0, peer=None)
        await backend.tamper("DELETE FROM keyring.data_keys WHERE device_id IN (?, ?)", *shredded)
        await backend.tamper(
            "UPDATE outbox SET payload = ? WHERE device_id IN (?, ?)", b"\x01" + bytes(40), *altered
        )
        good = await registry.provision(identity("alive"), at=T0, peer=None)
        assert good.event is not None
        assert await registry.pending_events(limit=batch) == [good.event]
        assert await registry.events_after(0, limit=batch) == [(await registry.outbox_head(), good.event)]
        await registry.mark_delivered([good.event.event_id], at=T0)
        assert await registry.pending_events(limit=batch) == []

    run(backend, body)


# -- audit ------------------------------------------------------------------------------------
def test_audit_chain_is_pseudonymous_and_resolvable(backend: Backend) -> None:
    ident = identity("dev-audit")

    async def body(registry: Registry) -> None:
        await registry.append_audit([])
        await registry.append_audit([draft("startup", actor="broker")])
        await registry.provision(ident, at=T0, peer=PEER)
        await registry.append_audit(
            [
                draft(
                    "refused",
                    device_id="dev-audit",
                    fingerprint=ident.cert_fingerprint,
                    reason="client id 'dev-audit' does not match",
                    peer=PEER,
                    details=MappingProxyType({"message": "dev-audit was refused", "n": 2}),
                    at=T0 + timedelta(seconds=1, microseconds=123456),
                ),
                draft("other", reason="no device here"),
            ]
        )
        entries = await chain_intact(registry)
        assert [e.seq for e in entries] == [1, 2, 3, 4]
        assert [e.draft.action for e in entries] == ["startup", "provisioned", "refused", "other"]
        text = stored_text(entries)
        assert "dev-audit" not in text and ident.cert_fingerprint not in text and PEER_HOST not in text
        ref = entries[1].draft.device_id
        assert ref is not None and ref.startswith("d:") and entries[2].draft.device_id == ref
        assert entries[2].draft.fingerprint.startswith("c:")
        assert entries[2].draft.peer.startswith("enc:")
        assert entries[2].draft.reason == "client id <device> does not match"
        assert entries[2].draft.details == {"message": "<device> was refused", "n": "2"}
        assert entries[2].draft.at == T0 + timedelta(seconds=1, microseconds=123456)

        resolved = await registry.resolve_audit(entries)
        assert [e.draft.device_id for e in resolved] == [None, "dev-audit", "dev-audit", None]
        assert resolved[2].draft.peer == PEER
        assert resolved[0] == entries[0] and resolved[3] == entries[3]
        assert await registry.audit_head() == (4, entries[-1].hash)

    run(backend, body)


def test_audit_appends_from_two_instances_form_one_chain(backend: Backend) -> None:
    async def body() -> None:
        a, b = backend.make(batch_window_ms=1), backend.make(batch_window_ms=1)
        await a.open()
        await b.open()
        try:
            await asyncio.gather(
                *(reg.append_audit([draft(f"n{i}"), draft(f"m{i}")]) for i in range(40) for reg in (a, b))
            )
            entries = await chain_intact(a)
            assert len(entries) == 160 and await b.audit_head() == await a.audit_head()
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


# -- lifecycle --------------------------------------------------------------------------------
def test_lifecycle_transitions_events_and_audit(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        await registry.provision(identity("dev-l"), at=T0, peer=None)
        steps = [
            (Command.DISABLE, DeviceStatus.DISABLED, True),
            (Command.DISABLE, DeviceStatus.DISABLED, False),
            (Command.ENABLE, DeviceStatus.ACTIVE, True),
            (Command.QUARANTINE, DeviceStatus.QUARANTINED, True),
            (Command.REVOKE, DeviceStatus.REVOKED, True),
            (Command.ALLOW, DeviceStatus.ACTIVE, True),
            (Command.DEPROVISION, DeviceStatus.DEPROVISIONED, True),
        ]
        for command, status, changed in steps:
            result = await change(registry, "dev-l", command, reason="dev-l asked")
            assert result.changed is changed and result.record.status is status
            assert (result.event is not None) is changed
            record = await registry.get_device("dev-l")
            assert record is not None and record.status is status
            if result.event is not None:
                doc = result.event.document()
                assert doc["status"] == str(status) and doc["reason"] == "dev-l asked"
        with pytest.raises(errors.InvalidRequest, match="allow"):
            await change(registry, "dev-l", Command.DISABLE)
        with pytest.raises(errors.NotFound):
            await change(registry, "nobody", Command.REVOKE)
        assert [e.type for e in await registry.events("dev-l")] == [
            "provisioned",
            "disabled",
            "enabled",
            "quarantined",
            "revoked",
            "allowed",
            "deprovisioned",
        ]
        entries = await chain_intact(registry)
        assert len(entries) == 1 + len(steps)  # the no-op is audited too
        assert entries[2].draft.details["changed"] == "false"
        assert entries[1].draft.reason == "<device> asked"

    run(backend, body)


# -- erasure ----------------------------------------------------------------------------------
def test_erase_leaves_a_tombstone_and_an_unlinkable_chain(backend: Backend) -> None:
    old, new = identity("dev-e"), identity("dev-e", "2")

    async def body(registry: Registry) -> None:
        await registry.provision(old, at=T0, peer=PEER)
        await registry.provision(new, at=T0, peer=PEER, policy="rotate")
        await registry.provision(identity("keeper"), at=T0, peer=PEER)
        await change(registry, "dev-e", Command.DISABLE)
        assert not await registry.is_erased(new.cert_fingerprint)

        erasure = await registry.erase(device_id="dev-e", at=T0, actor="op", reason="GDPR: dev-e asked")
        assert erasure.device_id == "dev-e" and not erasure.already_erased
        assert erasure.event is not None and erasure.event.document()["previous_status"] == "disabled"
        assert await registry.get_device("dev-e") is None
        assert await registry.find_by_fingerprint(new.cert_fingerprint) is None
        # Every certificate the device ever had is tombstoned.
        assert await registry.is_erased(new.cert_fingerprint) and await registry.is_erased(
            old.cert_fingerprint
        )
        assert not await registry.is_erased(identity("keeper").cert_fingerprint)
        assert [e.type for e in await registry.events("dev-e")] == ["erased"]

        entries = await chain_intact(registry)
        assert entries[-1].draft.action == "erased" and entries[-1].draft.reason == "GDPR: <device> asked"
        resolved = await registry.resolve_audit(entries)
        assert "dev-e" not in json.dumps([e.draft.device_id for e in resolved])
        assert any(e.draft.device_id == "keeper" for e in resolved)

        for ident, policy in ((new, "reject"), (old, "rotate")):
            with pytest.raises(errors.DeviceErased):
                await registry.provision(ident, at=T0, peer=PEER, policy=policy)
        assert len(await registry.audit_entries()) == len(entries)  # refusals of erased certs: not here
        with pytest.raises(errors.NotFound):
            await registry.erase(device_id="dev-e", at=T0, actor="op")
        again = await registry.erase(fingerprint=old.cert_fingerprint, at=T0, actor="op")
        assert again.already_erased and again.device_id is None and again.event is None

        # Once delivered, the erased event stops naming the device.
        await registry.mark_delivered([erasure.event.event_id], at=T0)
        assert await registry.events("dev-e") == []
        scrubbed = [e for e in await registry.events() if e.type == "erased"]
        assert len(scrubbed) == 1 and scrubbed[0].device_id == "" and scrubbed[0].payload == b""

        # A new certificate with the same name is a new device.
        fresh = await registry.provision(identity("dev-e", "3"), at=T0, peer=None)
        assert fresh.created

    run(backend, body)


def test_erase_by_fingerprint(backend: Backend) -> None:
    ident = identity("dev-f")

    async def body(registry: Registry) -> None:
        await registry.provision(ident, at=T0, peer=None)
        with pytest.raises(errors.InvalidRequest):
            await registry.erase(at=T0, actor="op")
        with pytest.raises(errors.NotFound):
            await registry.erase(fingerprint=fp_of("unknown"), at=T0, actor="op")
        first = await registry.erase(fingerprint=ident.cert_fingerprint, at=T0, actor="op")
        assert first.device_id == "dev-f" and first.event is not None and not first.already_erased
        second = await registry.erase(fingerprint=ident.cert_fingerprint, at=T0, actor="op")
        assert second.already_erased and second.device_id is None
        assert await registry.is_erased(ident.cert_fingerprint)
        assert await registry.checkpoint() in (True, False)  # type: ignore[attr-defined]
        await chain_intact(registry)

    run(backend, body)


# -- CRLs, templates --------------------------------------------------------------------------
def test_crls(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        with pytest.raises(errors.NotFound):
            await registry.import_crl(
                CA_ID, b"x", this_update=T0, next_update=None, audit=draft("crl-imported")
            )
        await registry.register_anchor(pt.MANUFACTURER_ANCHOR, audit=draft("ca-registered"))
        version = await registry.trust_version()
        assert await registry.crls() == {}
        await registry.import_crl(
            CA_ID, b"crl-1", this_update=T0, next_update=T0 + timedelta(days=7), audit=draft("crl-imported")
        )
        assert await registry.crls() == {CA_ID: b"crl-1"}
        await registry.import_crl(
            CA_ID, b"crl-2", this_update=T0, next_update=None, audit=draft("crl-imported")
        )
        assert await registry.crls() == {CA_ID: b"crl-2"}
        assert await registry.trust_version() == version + 2
        assert [e.draft.action for e in await chain_intact(registry)][-2:] == ["crl-imported"] * 2

    run(backend, body)


def test_templates_version_and_update_configs(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        v = await registry.templates_version()
        await registry.bump_templates_version()
        assert await registry.templates_version() == v + 1
        a = (await registry.provision(identity("tpl-a"), at=T0, peer=None)).record
        b = (await registry.provision(identity("tpl-b", template="other"), at=T0, peer=None)).record
        assert await registry.update_configs([], at=T0, actor="op", template="default") == []
        changed = [
            replace(r, template_version=2, config=MappingProxyType({"namespace": {"publish": ["x"]}}))
            for r in (a, b)
        ]
        events = await registry.update_configs(changed, at=T0, actor="op", template="default")
        # b is bound to another template: not changed, and no event claims it was
        assert [(e.type, e.device_id) for e in events] == [("config-changed", "tpl-a")]
        new_a, new_b = await registry.get_device("tpl-a"), await registry.get_device("tpl-b")
        assert new_a == changed[0]
        assert new_b == b  # bound to another template: not changed
        assert [e.type for e in await registry.events("tpl-a")] == ["provisioned", "config-changed"]
        entries = await chain_intact(registry)
        assert entries[-1].draft.action == "template-changed"
        assert entries[-1].draft.details == {"template": "default", "devices": "1"}

    run(backend, body)


# -- through the service, with real certificates ------------------------------------------------
def test_service_admits_refuses_and_erases(backend: Backend) -> None:
    from jitp.app.service import PeerCredentials, ProvisioningService

    cert = pt.leaf("svc-dev")
    peer = PeerCredentials(chain_der=tuple(pt.chain_of(cert)), client_id="svc-dev", address=PEER)

    async def body(registry: Registry) -> None:
        service = ProvisioningService(registry)
        await registry.register_anchor(pt.MANUFACTURER_ANCHOR, audit=draft("ca-registered"))
        await service.refresh_trust()
        first = await service.admit(peer)
        assert first.created and first.record is not None and first.record.region == "eu-west"
        assert not (await service.admit(peer)).created
        await service.apply(Command.DISABLE, "svc-dev", actor="op")
        with pytest.raises(errors.DeviceBlocked):
            await service.admit(peer)
        await service.erase(device_id="svc-dev", actor="op")
        with pytest.raises(errors.DeviceErased):
            await service.admit(peer)
        entries = await chain_intact(registry)
        assert [e.draft.action for e in entries] == [
            "ca-registered",
            "provisioned",
            "disabled",
            "refused",
            "erased",
            "refused",
        ]

    run(backend, body)


# -- races ------------------------------------------------------------------------------------
def test_race_same_new_device_on_one_instance(backend: Backend) -> None:
    async def body(registry: Registry) -> None:
        outcomes = await asyncio.gather(
            *(
                registry.provision(identity("storm"), at=T0 + timedelta(microseconds=i), peer=None)
                for i in range(50)
            )
        )
        assert sum(o.created for o in outcomes) == 1
        assert len(await registry.list_devices()) == 1
        assert [e.type for e in await registry.events("storm")] == ["provisioned"]
        assert len(await chain_intact(registry)) == 1

    run(backend, body, batch_window_ms=1)


@pytest.mark.parametrize(
    ("batch_window_ms", "max_batch"),
    [(0.0, None), (2.0, None), (0.0, 1), (0.0, 7)],
    ids=["no-window", "group-commit", "one-per-transaction", "batches-of-7"],
)
def test_race_two_instances_same_devices(
    backend: Backend, batch_window_ms: float, max_batch: int | None
) -> None:
    """Two nodes (two pools, or two SQLite connections), 50 new devices, each at both at once."""
    n = 50

    async def body() -> None:
        a, b = (backend.make(batch_window_ms=batch_window_ms, max_batch=max_batch) for _ in range(2))
        await a.open()
        await b.open()
        try:
            calls = [
                reg.provision(identity(f"node-dev-{i:02d}"), at=T0, peer=PEER)
                for i in range(n)
                for reg in ((a, b) if i % 2 else (b, a))
            ]
            outcomes = await asyncio.gather(*calls)
            assert sum(o.created for o in outcomes) == n
            for i in range(n):
                pair = outcomes[2 * i : 2 * i + 2]
                assert sorted(o.created for o in pair) == [False, True]
                assert pair[0].record.cert_fingerprint == pair[1].record.cert_fingerprint
            devices = await a.list_devices()
            assert [d.device_id for d in devices] == [f"node-dev-{i:02d}" for i in range(n)]
            events = await b.events()
            assert sorted(e.device_id for e in events) == [d.device_id for d in devices]
            assert {e.type for e in events} == {"provisioned"}
            entries = await chain_intact(a)
            assert len(entries) == n and await b.audit_head() == await a.audit_head()
            resolved = await b.resolve_audit(entries)
            assert sorted(e.draft.device_id for e in resolved) == [d.device_id for d in devices]
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


def test_race_two_instances_different_certificates(backend: Backend) -> None:
    """The same new id with two certificates at two nodes: one wins, the other is a conflict."""

    async def body() -> None:
        a, b = backend.make(batch_window_ms=1), backend.make(batch_window_ms=1)
        await a.open()
        await b.open()
        try:
            results = await asyncio.gather(
                *(
                    reg.provision(identity(f"dup-{i}", cert), at=T0, peer=None)
                    for i in range(20)
                    for reg, cert in ((a, "1"), (b, "2"))
                ),
                return_exceptions=True,
            )
            for i in range(20):
                pair = results[2 * i : 2 * i + 2]
                won = [r for r in pair if not isinstance(r, BaseException)]
                assert len(won) == 1 and won[0].created
                assert sum(isinstance(r, errors.IdentityConflict) for r in pair) == 1
                record = await a.get_device(f"dup-{i}")
                assert record is not None and record.cert_fingerprint == won[0].record.cert_fingerprint
            assert len(await a.events()) == 20
            await chain_intact(b)
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


def test_race_rotation_at_two_instances(backend: Backend) -> None:
    """Concurrent rotations of one device at two nodes apply one after the other, never lost."""

    async def body() -> None:
        a, b = backend.make(batch_window_ms=1), backend.make(batch_window_ms=1)
        await a.open()
        await b.open()
        try:
            await a.provision(identity("rot"), at=T0, peer=None)
            results = await asyncio.gather(
                a.provision(identity("rot", "2"), at=T0, peer=None, policy="rotate"),
                b.provision(identity("rot", "3"), at=T0, peer=None, policy="rotate"),
                return_exceptions=True,
            )
            assert all(not isinstance(r, BaseException) and r.reprovisioned for r in results)
            events = [e.document() for e in await a.events("rot") if e.type == "reprovisioned"]
            assert len(events) == 2
            # Serialized: the second rotation names the first one's certificate as previous.
            assert events[1]["previous_fingerprint"] == events[0]["cert_fingerprint"]
            record = await b.get_device("rot")
            assert record is not None and record.cert_fingerprint == events[1]["cert_fingerprint"]
        finally:
            await a.close()
            await b.close()

    asyncio.run(body())


# -- PostgreSQL specifics ------------------------------------------------------------------------
def test_pg_migrations_are_versioned_and_run_once(postgres: Backend) -> None:
    async def body() -> None:
        registries = [postgres.make() for _ in range(3)]
        await asyncio.gather(*(r.open() for r in registries))  # three nodes starting at once
        try:
            first = registries[0]
            assert isinstance(first, PostgresRegistry)
            assert await first.schema_version() == len(pg_registry.MIGRATIONS)
            conn = await asyncpg.connect(postgres.dsn, server_settings={"search_path": postgres.schema})
            try:
                rows = await conn.fetch("SELECT version FROM schema_migrations")
                assert [r[0] for r in rows] == list(range(1, len(pg_registry.MIGRATIONS) + 1))
                salts = await conn.fetch("SELECT value FROM meta_text WHERE key = 'salt'")
                assert len(salts) == 1
                await conn.execute("INSERT INTO schema_migrations (version) VALUES (99)")
            finally:
                await conn.close()
            newer = postgres.make()
            with pytest.raises(errors.ConfigError, match="newer than this jitp"):
                await newer.open()
        finally:
            for r in registries:
                await r.close()

    asyncio.run(body())


def test_pg_bad_dsn_and_unreachable_server(tmp_path: Path) -> None:
    async def body() -> None:
        unreachable = PostgresRegistry(
            "postgresql://nobody:secret@127.0.0.1:1/x", keys=EnvKeyProvider(), connect_timeout=2
        )
        with pytest.raises(errors.RegistryUnavailable, match="cannot connect") as info:
            await unreachable.open()
        assert "secret" not in str(info.value)
        with pytest.raises(errors.ConfigError):
            await PostgresRegistry("postgresql://h:notaport/x", keys=EnvKeyProvider()).open()
        with pytest.raises(errors.RegistryUnavailable, match="not open"):
            await PostgresRegistry("postgresql://h/x", keys=EnvKeyProvider()).get_device("x")

    asyncio.run(body())
    with pytest.raises(errors.ConfigError) as info:
        PostgresRegistry("mysql://h/x", keys=EnvKeyProvider())
    assert info.value.key == "registry"
    with pytest.raises(errors.ConfigError):
        PostgresRegistry("postgresql://h/x", keys=EnvKeyProvider(), schema="bad; drop")


def test_factory_selects_the_backend(tmp_path: Path) -> None:
    assert isinstance(make_registry(Config(data_dir=tmp_path)), SQLiteRegistry)
    pg = make_registry(
        Config(registry="postgresql://u@h/db", postgres=PostgresConfig(pool_size=3, schema="jitp_x"))
    )
    assert isinstance(pg, PostgresRegistry) and pg.schema == "jitp_x"
    with pytest.raises(errors.ConfigError) as info:
        Config(registry="sqlite:///var/data/registry.db")
    assert info.value.key == "registry"


def test_cli_uses_the_postgres_registry(
    postgres: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jitp.cli import main

    config = tmp_path / "jitp.yaml"
    config.write_text(f"postgres:\n  schema: {postgres.schema}\n  pool_size: 2\n")
    ca = tmp_path / "ca.pem"
    from cryptography.hazmat.primitives.serialization import Encoding

    ca.write_bytes(pt.MANUFACTURER.cert.public_bytes(Encoding.PEM))
    base = ["--config", str(config), "--registry", postgres.dsn or ""]
    assert main(["ca", "register", str(ca), *base]) == 0
    assert main(["ca", "list", "--json", *base]) == 0
    assert main(["audit", "verify", *base]) == 0
    out = capsys.readouterr().out
    assert CA_ID in out and "audit trail intact: 1 entries" in out
    assert not (tmp_path / "var").exists()  # nothing went to a SQLite file

    assert main(["ca", "list", "--config", str(config), "--registry", "postgresql://x@127.0.0.1:1/x"]) == 2
    assert main(["ca", "list", "--registry", "mysql://x"]) == 2
    err = capsys.readouterr().err
    assert "registry" in err and "cannot connect" in err


def test_pg_two_broker_nodes_share_one_registry(postgres: Backend, tmp_path: Path, pki: Any) -> None:
    """Two JitpServers (two pools) on one PostgreSQL schema: a device joining both is one device."""
    from tests.helpers import BrokerThread, connect, test_config

    config = test_config(
        tmp_path, pki, registry=postgres.dsn, postgres=PostgresConfig(schema=postgres.schema, pool_size=3)
    )
    a = BrokerThread(config).start()
    try:
        b = BrokerThread(config).start()
        try:
            a.register_ca(pki.manufacturer.cert)
            b.call(b.server.service.refresh_trust(force=True))
            device = pki.device("two-nodes-dev")
            conns = [connect(node.port, pki, device) for node in (a, b)]
            try:
                assert [c.rc for c in conns] == [0, 0], [c.error for c in conns]
            finally:
                for c in conns:
                    c.close()
            assert [d.device_id for d in b.devices()] == ["two-nodes-dev"]
            assert [e.type for e in a.events("two-nodes-dev")] == ["provisioned"]
            assert verify_chain(b.raw_audit()) == []
            assert not (tmp_path / "data" / "registry.db").exists()  # nothing went to SQLite
        finally:
            b.stop()
    finally:
        a.stop()
