"""The CLI's remote mode: run an admin command through a broker's MQTT admin API.

``jitp --broker HOST:PORT --cert C --key K --ca CA devices revoke ID`` connects over mutual TLS as
the principal named by the certificate (its CN is the client id), publishes the request on
``$jitp/admin/<command>`` and waits for the answer on its own replies topic. The broker checks the
principal's role and audits the request; nothing is read or written locally.
"""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from jitp import errors
from jitp.cli.certfiles import MAX_CERT_FILE, read_capped

_ERRORS: dict[str, type[errors.ProvisioningError]] = {
    "not_found": errors.NotFound,
    "forbidden": errors.Forbidden,
    "invalid_request": errors.InvalidRequest,
}


def remote_call(
    broker: str, *, cert: Path, key: Path, ca: Path, command: str, args: dict[str, Any], timeout: float = 15.0
) -> Any:
    """Run ``command`` with ``args`` on the broker's admin API; the result, or the error it names."""
    host, _, port = broker.rpartition(":")
    if not host or not port.isdigit():
        raise errors.InvalidRequest(f"--broker must be HOST:PORT, not {broker!r}")
    # Each file is read with the CLI's cap first: a wrong path (/dev/zero) is refused at once, before
    # OpenSSL reads it without one.
    leaf_pem = read_capped(cert, MAX_CERT_FILE, "a certificate file")
    read_capped(key, MAX_CERT_FILE, "a key file")
    read_capped(ca, MAX_CERT_FILE, "a certificate file")
    try:
        leaf = x509.load_pem_x509_certificates(leaf_pem)[0]
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise errors.InvalidRequest(f"cannot use --cert/--key/--ca: {exc}") from None
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise errors.InvalidRequest("the --cert certificate has no CN (it is the MQTT client id)")
    client_id = str(cns[0].value)
    correlation = uuid.uuid4().hex
    replies = f"$jitp/admin/replies/{client_id}/"
    answer: dict[str, Any] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.tls_set_context(context)

    def on_connect(c: mqtt.Client, u: object, flags: object, rc: Any, props: object) -> None:
        if rc.is_failure:
            answer["connect"] = rc.getName()
            done.set()
            return
        c.subscribe(replies + "#", qos=1)

    def on_subscribe(c: mqtt.Client, u: object, mid: int, codes: Any, props: object) -> None:
        request = {"correlation_id": correlation, "reply_to": replies + correlation, "args": args}
        c.publish(f"$jitp/admin/{command}", json.dumps(request), qos=1)

    def on_message(c: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        doc = json.loads(message.payload)
        if doc.get("correlation_id") == correlation:
            answer["doc"] = doc
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(host.strip("[]"), int(port))
    except OSError as exc:
        raise errors.RegistryUnavailable(f"cannot reach the broker at {broker}: {exc}") from None
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise errors.RegistryUnavailable(f"no answer from {broker} within {timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
    if "connect" in answer:
        raise errors.Forbidden(f"the broker refused the connection: {answer['connect']}")
    doc = answer["doc"]
    if doc.get("ok"):
        return doc.get("result")
    error = doc.get("error") or {}
    raise _ERRORS.get(error.get("reason", ""), errors.OperatorError)(str(error.get("message", "failed")))
