"""Structured logs: ``logging.format: json`` writes one JSON object per line.

Every line has ``ts`` (UTC, ISO-8601), ``level``, ``logger``, ``event`` and ``message``, and, when
the call site gives them (``extra={"event": ..., "reason": ..., "ca": ..., "region": ...,
"device": ...}``), the reason code, CA id, region and a device reference. The device reference
follows the audit trail's privacy rule: the device id, or with ``logging.pseudonymous: true`` a
keyed reference (``dref:`` + HMAC-SHA256 under a key of this process, so lines of one run can be
correlated, and nothing else); then the device id is also replaced in the message text, and peer
addresses are masked.

Whatever the format, nothing that looks like key material or a certificate body is written: PEM
blocks and master key tokens are replaced by ``[redacted]`` in every line (:class:`RedactingFilter`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from datetime import UTC, datetime
from typing import Any

from jitp.crypto.keys import TOKEN_PREFIX

STRUCTURED = ("reason", "ca", "region")
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9+/=]*")
_IPV4_PEER = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b")
_IPV6_PEER = re.compile(r"\[[0-9A-Fa-f:.%]+\](?::\d{1,5})?")


def redact(text: str) -> str:
    return _TOKEN.sub("[redacted]", _PEM.sub("[redacted]", text))


class RedactingFilter(logging.Filter):
    """Never key material or certificate bodies, whichever logger wrote them and however."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, *, pseudonymous: bool = False, key: bytes | None = None) -> None:
        super().__init__()
        self.pseudonymous = pseudonymous
        self._key = key or os.urandom(32)

    def device_ref(self, device_id: str) -> str:
        if not self.pseudonymous:
            return device_id
        return "dref:" + hmac.new(self._key, device_id.encode(), hashlib.sha256).hexdigest()[:24]

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or record.name.rsplit(".", 1)[-1],
        }
        for name in STRUCTURED:
            value = getattr(record, name, None)
            if value:
                doc[name] = str(value)
        device = getattr(record, "device", None)
        if device:
            doc["device"] = self.device_ref(str(device))
            if self.pseudonymous:
                message = message.replace(str(device), doc["device"])
        if self.pseudonymous:
            message = _IPV6_PEER.sub("[peer]", _IPV4_PEER.sub("[peer]", message))
        doc["message"] = message
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = record.exc_info[0].__name__
            doc["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(
    level: str, *, fmt: str = "text", pseudonymous: bool = False, label: str = ""
) -> logging.Handler:
    """Set up the root logger for ``jitp serve``: text or JSON lines on stderr, always redacting.
    ``label`` (text only) names the process, e.g. ``[w1]`` for a worker of `jitp serve --workers`."""
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        JsonFormatter(pseudonymous=pseudonymous)
        if fmt == "json"
        else logging.Formatter(TEXT_FORMAT.replace("%(name)s", f"{label} %(name)s" if label else "%(name)s"))
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
