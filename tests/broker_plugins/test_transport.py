"""jitp's own TLS transport (broker_plugins/transport.py): alerts on refusal, no task before CONNECT,
nothing buffered for an idle connection, and third-party clients that now say why they were refused."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess

import pytest

from broker_plugins.transport import TlsConnection
from tests.helpers import BrokerThread, Identity, Pki, client_context, connect, wait_until
from tests.rawmqtt import connect_packet


async def _first_read_error(port: int, ctx: ssl.SSLContext) -> ssl.SSLError:
    """Connect, send a CONNECT, and return the TLS error the first read raises (TLS 1.3 refuses the
    client certificate after the client's handshake is done, so the alert arrives on that read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(connect_packet("alert-probe", keepalive=30))
        async with asyncio.timeout(5):
            await reader.read(10)
    except ssl.SSLError as exc:
        return exc
    finally:
        writer.close()
    raise AssertionError("the broker closed the connection without a TLS alert")


def _refusal_alert(broker: BrokerThread, pki: Pki, ident: Identity, *, tls13: bool = True) -> str:
    ctx = client_context(pki, ident)
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        exc = asyncio.run(_first_read_error(broker.port, ctx))
    except ssl.SSLError as handshake_error:  # TLS 1.2: the alert ends the client's own handshake
        exc = handshake_error
    return str(exc.reason)


@pytest.mark.parametrize("tls13", [True, False], ids=["1.3", "1.2"])
def test_an_expired_certificate_gets_the_certificate_expired_alert(
    broker: BrokerThread, pki: Pki, tls13: bool
) -> None:
    assert _refusal_alert(broker, pki, pki.expired("old-1"), tls13=tls13) == "SSLV3_ALERT_CERTIFICATE_EXPIRED"


def test_an_unknown_ca_gets_the_unknown_ca_alert(broker: BrokerThread, pki: Pki) -> None:
    rogue = pki.identity("rogue-1", issuer=pki.other_ca())
    assert _refusal_alert(broker, pki, rogue) == "TLSV1_ALERT_UNKNOWN_CA"


def test_no_client_certificate_gets_the_certificate_required_alert(broker: BrokerThread, pki: Pki) -> None:
    async def probe() -> str:
        exc = await _first_read_error(broker.port, client_context(pki, None))
        return str(exc.reason)

    assert asyncio.run(probe()) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


def test_a_refused_handshake_leaves_the_broker_serving(broker: BrokerThread, pki: Pki) -> None:
    _refusal_alert(broker, pki, pki.expired("old-2"))
    conn = connect(broker.port, pki, pki.device("fine-1"))
    try:
        assert conn.rc == 0
    finally:
        conn.close()


def test_mosquitto_pub_names_the_alert_for_an_expired_certificate(broker: BrokerThread, pki: Pki) -> None:
    """A third-party client now reports why: with -d, libmosquitto prints OpenSSL's error for the
    alert (before, with asyncio's TLS, there was no alert to print, only 'The connection was lost')."""
    ident = pki.expired("old-3")
    result = subprocess.run(
        [
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-i",
            "old-3",
            "-t",
            "x",
            "-m",
            "1",
            "--cafile",
            str(pki.layout.root_cert),
            "--cert",
            str(ident.cert_path),
            "--key",
            str(ident.key_path),
            "-d",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode != 0
    assert "alert certificate expired" in result.stdout + result.stderr, result.stdout


def test_no_task_runs_for_a_connection_before_its_connect(broker: BrokerThread, pki: Pki) -> None:
    """Accept, handshake and a half-sent CONNECT run in the event loop's callbacks only."""
    listener = broker.server.listener
    ctx = client_context(pki, pki.device("slow-1"))
    raw = socket.create_connection(("127.0.0.1", broker.port))
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    try:
        packet = connect_packet("slow-1", keepalive=30)
        tls.sendall(packet[:5])  # half a CONNECT
        assert wait_until(lambda: listener.open_connections == 1, 5)
        assert not listener._tasks  # no task for it yet
        (connection,) = listener._connections
        assert isinstance(connection, TlsConnection)
        tls.sendall(packet[5:])
        assert wait_until(lambda: len(listener._tasks) == 1, 5)  # the CONNECT started its one task
        assert tls.recv(4)[:2] == b"\x20\x02"  # CONNACK
    finally:
        tls.close()


def test_an_idle_connection_buffers_nothing(broker: BrokerThread, pki: Pki) -> None:
    conn = connect(broker.port, pki, pki.device("idle-1"))
    try:
        assert conn.rc == 0
        (connection,) = broker.server.listener._connections
        assert wait_until(lambda: not connection._buffer and not connection._incoming.pending, 5)
        assert not connection._outgoing.pending
    finally:
        conn.close()
