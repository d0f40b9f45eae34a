"""Each named workaround (listed in broker_plugins/compat.py) that is not an attack regression (those are in
test_hardening.py): why it exists, and that it behaves like what it replaces."""

from __future__ import annotations

import asyncio
from asyncio import sslproto

import pytest
from amqtt.session import Session
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st
from transitions import MachineError

from broker_plugins import compat
from broker_plugins.compat import LeanSessionState
from broker_plugins.session import JitpSession
from tests.helpers import BrokerThread, Pki, client_context, connect


def test_amqtt_version_pin_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    compat.check_amqtt_internals()  # the installed amqtt is the pinned one
    monkeypatch.setattr(compat, "AMQTT_VERSION", "0.0.1")
    with pytest.raises(compat.AmqttIncompatible, match=r"0\.0\.1"):
        compat.check_amqtt_internals()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["connect", "disconnect"]), max_size=12))
def test_w11_lean_session_state_behaves_like_amqtts_state_machine(steps: list[str]) -> None:
    """W11 replaces amqtt's per-session transitions.Machine (~12% of broker CPU per connect)."""
    stock, lean = Session(), JitpSession()
    assert type(stock.transitions) is not LeanSessionState
    assert isinstance(lean.transitions, LeanSessionState)
    for step in steps:
        outcomes = []
        for session in (stock, lean):
            try:
                getattr(session.transitions, step)()
                outcomes.append("ok")
            except MachineError:
                outcomes.append("MachineError")
        assert outcomes[0] == outcomes[1], (steps, outcomes)
        assert stock.transitions.state == lean.transitions.state
        assert stock.transitions.is_connected() == lean.transitions.is_connected()
        assert (stock.last_disconnect_time is None) == (lean.last_disconnect_time is None)


def test_w11_broker_sessions_are_lean(broker: BrokerThread, pki: Pki) -> None:
    conn = connect(broker.port, pki, pki.device("lean-1"), clean=False)
    try:
        assert conn.rc == 0
        session, _ = broker.server.broker.sessions["lean-1"]
        assert isinstance(session.transitions, LeanSessionState)
    finally:
        conn.close()


def test_w9_tls_read_buffer(broker: BrokerThread, pki: Pki) -> None:
    """asyncio allocates a 256 KiB read buffer per TLS connection; jitp uses one TLS record, 17 KiB."""
    assert sslproto.SSLProtocol.max_size == broker.config.listener.tls_read_buffer == 17 * 1024
    previous = compat.lean_tls_read_buffer(256 * 1024)
    try:
        assert previous == 17 * 1024

        async def buffer_of_a_new_connection() -> int:
            ctx = client_context(pki, pki.device("buf-1"))
            _, writer = await asyncio.open_connection("127.0.0.1", broker.port, ssl=ctx)
            size = len(writer.transport._ssl_protocol._ssl_buffer)  # type: ignore[attr-defined]
            writer.close()
            return size

        assert asyncio.run(buffer_of_a_new_connection()) == 256 * 1024  # the stock size, per connection
    finally:
        compat.lean_tls_read_buffer(17 * 1024)


def test_peer_chain_is_the_verified_chain(broker: BrokerThread, pki: Pki) -> None:
    dev = pki.device("chain-1")
    conn = connect(broker.port, pki, dev, clean=False)
    try:
        assert conn.rc == 0
        session, _ = broker.server.broker.sessions["chain-1"]
        chain = compat.peer_chain_der(session.ssl_object)
        assert chain[0] == dev.cert.public_bytes(Encoding.DER)
        assert len(chain) >= 2  # leaf + the manufacturer CA it was verified against
    finally:
        conn.close()
    assert compat.peer_chain_der(None) == ()
