"""Each named workaround (listed in broker_plugins/compat.py) that is not an attack regression (those are in
test_hardening.py): why it exists, and that it behaves like what it replaces."""

from __future__ import annotations

import ssl

import pytest
from amqtt.session import Session
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st
from transitions import MachineError

from broker_plugins import compat
from broker_plugins.compat import LeanSessionState
from broker_plugins.session import JitpSession
from broker_plugins.transport import TlsConnection
from tests.helpers import BrokerThread, Pki, connect


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


def test_w9_connections_use_jitps_tls_transport(broker: BrokerThread, pki: Pki) -> None:
    """Not asyncio's sslproto (a 256 KiB read buffer per connection, no alert on refusal): each
    connection is a TlsConnection driving an SSLObject over memory BIOs."""
    conn = connect(broker.port, pki, pki.device("w9-1"))
    try:
        assert conn.rc == 0
        (connection,) = broker.server.listener._connections
        assert isinstance(connection, TlsConnection)
        assert isinstance(connection.get_ssl_info(), ssl.SSLObject)
        assert connection.get_ssl_info().version() in ("TLSv1.2", "TLSv1.3")
    finally:
        conn.close()


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
