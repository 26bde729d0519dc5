"""Log configuration: what each level lets through, and what a line carries."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from memsvc.log import configure, rpc_method


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure() sets up the root logger: put it back as pytest had it."""
    root, ours = logging.getLogger(), logging.getLogger("memsvc")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


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
