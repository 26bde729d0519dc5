"""Log configuration: what each level lets through, and what a line carries."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from memsvc.log import PER_FAILURE_LOGGERS, RepeatLimit, TextFormatter, configure, rpc_method


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure() sets up the root logger: put it back as pytest had it."""
    root, ours = logging.getLogger(), logging.getLogger("memsvc")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    limited = [logging.getLogger(name) for name in PER_FAILURE_LOGGERS]
    filters = [logger.filters[:] for logger in limited]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)
    for logger, kept in zip(limited, filters, strict=True):
        logger.filters[:] = kept


def test_debug_is_memsvc_s_own_not_other_libraries(restored_logging, capsys):
    """aiosqlite's debug lines carry every statement's parameters (sessions' metadata,
    working-memory values): --log-level debug shows memsvc's debug lines only."""
    configure("debug", "json")
    logging.getLogger("aiosqlite").debug("executing INSERT ... ('META_SECRET',)")
    logging.getLogger("memsvc.domain").debug("heal: marker read again")
    logging.getLogger("aiosqlite").warning("a library's warning still shows")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("memsvc.domain", "debug"),
        ("aiosqlite", "warning"),
    ]
    configure("warning", "json")
    logging.getLogger("memsvc.domain").info("not shown")
    logging.getLogger("aiosqlite").info("nor this")
    assert capsys.readouterr().err == ""


def test_a_text_line_names_the_call_it_was_logged_in(restored_logging, capsys):
    configure("info", "text")
    token = rpc_method.set("/memsvc.v1.WorkingMemoryService/Set")
    try:
        logging.getLogger("memsvc.store").warning("backend error, retrying")
    finally:
        rpc_method.reset(token)
    logging.getLogger("memsvc.server").warning("outside any call")
    first, second = capsys.readouterr().err.splitlines()
    assert first.endswith("backend error, retrying [/memsvc.v1.WorkingMemoryService/Set]")
    assert second.endswith("memsvc.server: outside any call")


def record(message: str, level: int = logging.WARNING, *args: object) -> logging.LogRecord:
    return logging.LogRecord("memsvc.store._retry", level, __file__, 1, message, args, None)


def test_a_repeated_warning_is_said_once_a_window_with_the_count_dropped():
    """Found by an ops review: during an outage every failed call said its line (220
    in 25 s of a Redis outage under load). The first of a kind passes, the rest of
    the window are dropped and counted, and the next one after it carries the count."""
    now = [0.0]
    limit = RepeatLimit(window=30, clock=lambda: now[0])
    template = "%s failed: %s"
    assert limit.filter(record(template, logging.WARNING, "/Set", "Redis down"))
    assert not limit.filter(record(template, logging.WARNING, "/Set", "Redis timed out"))
    assert not limit.filter(record(template, logging.WARNING, "/Set", "Redis down"))
    # The first argument names what failed (a method, a backend): another is another
    # kind, which one failure does not hide (a review of this change).
    assert limit.filter(record(template, logging.WARNING, "/Get", "PostgreSQL down"))
    assert limit.filter(record("another kind: %s", logging.WARNING, "x"))  # its own window
    assert limit.filter(record(template, logging.ERROR, "/Set", "boom"))  # errors all pass
    now[0] = 29.9
    assert not limit.filter(record(template, logging.WARNING, "/Set", "Redis down"))
    now[0] = 30.0
    shown = record(template, logging.WARNING, "/Set", "Redis down")
    assert limit.filter(shown)
    assert shown.repeats_suppressed == 3  # type: ignore[attr-defined]
    assert TextFormatter().format(shown).endswith("(3 more like it dropped since the last shown)")
    now[0] = 61.0
    quiet = record(template, logging.WARNING, "/Set", "Redis down")
    assert limit.filter(quiet) and not hasattr(quiet, "repeats_suppressed")


def test_the_loggers_of_failed_calls_are_limited_and_others_are_not(restored_logging, capsys):
    configure("info", "json")
    for _ in range(5):
        logging.getLogger("memsvc.api._errors").warning("%s failed: %s", "/Set", "down")
        logging.getLogger("psycopg.pool").warning("error connecting in %r: %s", "memsvc", "x")
        logging.getLogger("memsvc.server").warning("backends not ready: %s", "down")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["logger"] for line in lines] == [
        "memsvc.api._errors", "psycopg.pool", "memsvc.server",
        "memsvc.server", "memsvc.server", "memsvc.server", "memsvc.server",
    ]  # fmt: skip
