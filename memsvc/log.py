"""Structured logging: one JSON object per line (or plain text for humans).

Modules log with ``logging.getLogger(__name__)`` and %-style arguments; only the
command line calls :func:`configure`. The gRPC layer puts the current method in
:data:`rpc_method`, and every record logged while a call runs carries it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
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


# The loggers that say a line for each call that fails, or each reconnection: during
# an outage they said one for every call (a review: 220 lines in 25 s of a Redis
# outage under load, a psycopg.pool line every 2 s while a watcher waited).
PER_FAILURE_LOGGERS = (
    "memsvc.api._errors",
    "memsvc.store._retry",
    "memsvc.domain._lifecycle",
    "memsvc.domain._background",
    "psycopg.pool",
)
REPEAT_WINDOW_SECONDS = 30.0
# Kinds remembered at most (a library that formats its messages itself makes a kind
# of each): past it, the count starts again.
_MAX_KINDS = 1000


class RepeatLimit(logging.Filter):
    """Lets the first warning of each kind (its message template and first
    argument: memsvc's per-failure warnings name what failed first) through in
    every ``window`` seconds and drops the others, whose number the next one of
    that kind carries (``repeats_suppressed``). Other levels pass: errors are
    each their own story."""

    def __init__(
        self, window: float = REPEAT_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()  # a logger is shared by every thread
        self._kinds: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        # The template and its first argument (a method, a backend, an operation):
        # one kind of failure does not hide another.
        first = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        kind, now = f"{record.msg}\x00{first}", self._clock()
        with self._lock:
            started, suppressed = self._kinds.get(kind, (None, 0))
            if started is not None and now - started < self._window:
                self._kinds[kind] = (started, suppressed + 1)
                return False
            if len(self._kinds) >= _MAX_KINDS:
                self._kinds.clear()
            self._kinds[kind] = (now, 0)
        if suppressed:
            record.repeats_suppressed = suppressed
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
        if method is not None:
            line = f"{line} [{method}]"
        suppressed = getattr(record, "repeats_suppressed", None)
        if suppressed:
            line = f"{line} ({suppressed} more like it dropped since the last shown)"
        return line


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
    for name in PER_FAILURE_LOGGERS:
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, RepeatLimit)]
        logger.addFilter(RepeatLimit())
