"""LoopPortal: calls racing its stop end, none waits forever, no task is left behind."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from memsvc._loop_portal import LoopPortal


class CutOff(Exception):
    """The portal's error for a call its stop cut off."""


def test_calls_racing_a_stop_all_end(caplog: pytest.LogCaptureFixture):
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
        for _ in range(30):
            portal = LoopPortal("test-portal", "the test portal", cut_off=CutOff)
            callers = [threading.Thread(target=caller, args=(portal,)) for _ in range(6)]
            for thread in callers:
                thread.start()
            threading.Event().wait(0.005)
            portal.stop()
            for thread in callers:
                thread.join(5)
                assert not thread.is_alive(), "a call still waits on the stopped portal"
    assert len(outcomes) == 30 * 6
    assert "Task was destroyed" not in caplog.text
    assert "exception calling callback" not in caplog.text
