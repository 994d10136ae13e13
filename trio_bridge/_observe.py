"""Logging: one JSON line per event on stderr (or a readable text line), with request fields.

Every log call may pass ``extra={...}`` with fields such as ``request_id``, ``route``,
``status``; they become keys of the JSON object. Secrets are never passed to the logger:
keys are identified by their public id only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

request_log = logging.getLogger("trio_bridge.request")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _STD and not k.startswith("_")
        )
        line = f"{t} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure the root logger once for a role process (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_trio_bridge", False):
            root.removeHandler(h)
    handler._trio_bridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # hypercorn's own info lines ("Running on ...") are noise next to ours
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, root.level))
    # httpx logs every request URL (query string included) at INFO: never wanted here
    for noisy in ("httpx", "httpcore", "trio-websocket", "trio_websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_request(role: str, fields: dict[str, Any]) -> None:
    """The end-of-request line of one role (cheap when the level filters it out)."""
    if request_log.isEnabledFor(logging.INFO):
        fields["role"] = role
        request_log.info("request", extra=fields)
