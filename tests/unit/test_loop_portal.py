"""LoopPortal: calls racing its stop end, none waits forever, no task is left behind."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from typing import Any

import pytest

from memsvc._loop_portal import LoopPortal


class CutOff(Exception):
    """The portal's error for a call its stop cut off."""


def test_calls_racing_a_stop_all_end(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Submitting is slowed down (as a busy machine may), widening the window between
    a call's check that the portal is open and its task reaching the loop."""
    submit = asyncio.run_coroutine_threadsafe

    def slow_submit(coroutine: Any, loop: asyncio.AbstractEventLoop) -> Any:
        time.sleep(0.002)
        return submit(coroutine, loop)

    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", slow_submit)
    outcomes: list[str] = []

    def caller(portal: LoopPortal) -> None:
        while True:
            try:
                portal.run(asyncio.sleep(0.001))
            except CutOff:
                outcomes.append("cut off")
                return
            except RuntimeError:
                outcomes.append("refused")  # submitted after the stop
                return

    with caplog.at_level(logging.ERROR):
        for _ in range(20):
            portal = LoopPortal("test-portal", "the test portal", cut_off=CutOff)
            callers = [threading.Thread(target=caller, args=(portal,)) for _ in range(6)]
            for thread in callers:
                thread.start()
            time.sleep(0.005)
            portal.stop()
            for thread in callers:
                thread.join(5)
                assert not thread.is_alive(), "a call still waits on the stopped portal"
        gc.collect()
    assert len(outcomes) == 20 * 6
    assert "Task was destroyed" not in caplog.text
    assert "exception calling callback" not in caplog.text


def test_stop_from_inside_a_call_does_not_deadlock():
    """A collected Client's __del__ may stop its portal from inside run() (a garbage
    collection during the submit): stop() must not wait for its own thread's lock."""
    portal = LoopPortal("test-portal", "the test portal")
    stopped = threading.Event()

    def stop_while_holding() -> None:
        with portal._lock:  # as run() holds it while it submits
            portal.stop(wait=False)
        stopped.set()

    thread = threading.Thread(target=stop_while_holding, daemon=True)
    thread.start()
    thread.join(5)
    assert stopped.is_set(), "stop() deadlocked on the lock its own thread held"
    assert portal.closed
