"""Structured logging: one JSON object per line (or plain text for humans).

Modules log with ``logging.getLogger(__name__)`` and %-style arguments; only the
command line calls :func:`configure`. The gRPC layer puts the current method in
:data:`rpc_method`, and every record logged while a call runs carries it.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

rpc_method: ContextVar[str | None] = ContextVar("memsvc_rpc_method", default=None)

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        method = rpc_method.get()
        if method is not None and not hasattr(record, "rpc_method"):
            record.rpc_method = method
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class TextFormatter(logging.Formatter):
    """A line for humans: time, level, logger, message, and the call's method."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        method = getattr(record, "rpc_method", None)
        return line if method is None else f"{line} [{method}]"


def configure(level: str = "info", fmt: str = "json") -> None:
    """Send logs to stderr in the chosen format: memsvc's own at ``level``, other
    libraries' at info and above whatever ``level`` is. Their debug output is not
    memsvc's to vouch for: aiosqlite's logs every statement with its parameters,
    which hold sessions' metadata and working-memory values."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    chosen = logging.getLevelName(level.upper())
    root.setLevel(max(chosen, logging.INFO))
    logging.getLogger("memsvc").setLevel(chosen)
