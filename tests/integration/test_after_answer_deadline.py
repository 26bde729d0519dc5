"""Work a call leaves for after its answer (a Pause's last step, a heal) is not
bounded by that call's deadline: the client's deadline bounds nothing once it
has its answer, and a short one made that work give up on the first backend
hiccup (a Pause's step 3 left its marker transitional, writes refused)."""

from __future__ import annotations

import pytest

from memsvc.domain import SessionRef
from memsvc.domain._call_deadline import call_deadline, current_deadline
from tests.conftest import DEPLOYMENTS


@pytest.mark.parametrize("deployment", [DEPLOYMENTS["embedded"]], ids=["embedded"])
async def test_work_after_the_answer_runs_without_the_calls_deadline(server):
    lifecycle = server.lifecycle
    assert lifecycle is not None
    seen: list[float | None] = []

    async def after() -> bool:
        seen.append(current_deadline())
        return True

    with call_deadline(0.5):
        assert current_deadline() is not None  # the call's own work is bounded
        task = lifecycle._finish_past_the_call(SessionRef("p", "a", "s"), after())
    await task
    assert seen == [None]
