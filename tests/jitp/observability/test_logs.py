"""JSON log lines: the fields, the privacy rule, and never key material or certificate bodies."""

from __future__ import annotations

import io
import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from jitp.crypto.keys import MasterKey
from jitp.observability.logs import JsonFormatter, RedactingFilter, redact

PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----"


def emit(formatter: logging.Formatter, msg: str, *args: object, **extra: object) -> dict[str, object]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("jitp.test.logs")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.warning(msg, *args, extra=extra)
    (line,) = stream.getvalue().splitlines()
    return dict(json.loads(line))


def test_a_json_line_has_the_fields_and_the_device_in_clear() -> None:
    doc = emit(
        JsonFormatter(),
        "refused %s from %s",
        "dev-1",
        "10.1.2.3:5555",
        event="refused",
        reason="expired",
        ca="ab12",
        region="eu",
        device="dev-1",
    )
    assert doc["level"] == "warning" and doc["event"] == "refused" and doc["reason"] == "expired"
    assert doc["ca"] == "ab12" and doc["region"] == "eu" and doc["device"] == "dev-1"
    assert doc["message"] == "refused dev-1 from 10.1.2.3:5555" and str(doc["ts"]).endswith("+00:00")


def test_pseudonymous_lines_name_no_device_and_no_peer() -> None:
    formatter = JsonFormatter(pseudonymous=True, key=b"k" * 32)
    doc = emit(formatter, "refused %s from %s", "dev-1", "10.1.2.3:5555", device="dev-1")
    assert str(doc["device"]).startswith("dref:") and doc["device"] == formatter.device_ref("dev-1")
    assert "dev-1" not in json.dumps(doc) and "10.1.2.3" not in json.dumps(doc)
    # the same device, the same reference (lines of one run correlate); another device, another
    assert formatter.device_ref("dev-1") != formatter.device_ref("dev-2")


def test_key_material_and_certificate_bodies_are_never_written() -> None:
    token = MasterKey.generate().token()
    for fmt in (JsonFormatter(), logging.Formatter("%(message)s")):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.addFilter(RedactingFilter())
        handler.setFormatter(fmt)
        logger = logging.getLogger("jitp.test.redact")
        logger.propagate, logger.handlers = False, [handler]
        logger.error("loaded %s with key %s", PEM, token)
        out = stream.getvalue()
        assert "MIIBszCCAVmgAwIBAgIU" not in out and token not in out and "[redacted]" in out


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_redaction_removes_any_embedded_pem_body(noise: str) -> None:
    assert "MIIBszCCAVmgAwIBAgIU" not in redact(noise + PEM + noise)
