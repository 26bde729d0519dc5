"""LifecycleService contract: failures at each boundary of each operation recover.

Failpoints with the ``error`` action fail an operation exactly after its
working-memory step 1 (nothing committed: everything must be as before) or
exactly after its commit (the answer is lost but the change is made: the next
call that meets the transitional marker must settle it). ADR 0004 has the table.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from memsvc.failpoints import POINTS
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from tests.helpers import expect_error, python, value


@pytest.fixture(params=POINTS)
def point(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def config_overrides(point: str) -> dict[str, object]:
    return {"failpoints": f"{point}=error"}


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


async def state_of(life, scope) -> int | None:
    try:
        return int((await life.GetSession(lc.GetSessionRequest(**scope))).session.state)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return None


async def can_write(wm, scope) -> bool:
    try:
        await wm.Set(pb.SetRequest(**scope, key="probe", value=value(1)))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        return False
    return True


async def reach(life, scope, operation: str) -> Any:
    """Bring the session to where ``operation`` can run, then run it."""
    seed = [pb.EntryInput(key="k", value=value("before"))]
    if operation == "spawn":
        return life.Spawn(lc.SpawnRequest(**scope, initial_entries=seed))
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=seed))
    if operation == "pause":
        return life.Pause(lc.PauseRequest(**scope))
    if operation == "terminate":
        return life.Terminate(lc.TerminateRequest(**scope))
    return None


async def test_failure_at_each_boundary_leaves_old_or_new_state(life, wm, scope, point):
    operation, when = point.split(".")
    committed = when == "before_finish"
    if operation == "resume":
        # Resume needs a pause first; the failpoint only fires on resume.
        await life.Spawn(
            lc.SpawnRequest(
                **scope, initial_entries=[pb.EntryInput(key="k", value=value("before"))]
            )
        )
        await life.Pause(lc.PauseRequest(**scope))
        assert not await can_write(wm, scope)
        call = life.Resume(lc.ResumeRequest(**scope))
    else:
        call = await reach(life, scope, operation)
    await expect_error(call, grpc.StatusCode.INTERNAL)

    expected_state = {
        ("spawn", False): None,
        ("spawn", True): lc.SESSION_STATE_ACTIVE,
        ("pause", False): lc.SESSION_STATE_ACTIVE,
        ("pause", True): lc.SESSION_STATE_PAUSED,
        ("resume", False): lc.SESSION_STATE_PAUSED,
        ("resume", True): lc.SESSION_STATE_ACTIVE,
        ("terminate", False): lc.SESSION_STATE_ACTIVE,
        ("terminate", True): lc.SESSION_STATE_TERMINATED,
    }[operation, committed]
    assert await state_of(life, scope) == expected_state
    # The working memory agrees with the committed state, whatever the marker said.
    assert await can_write(wm, scope) == (expected_state == lc.SESSION_STATE_ACTIVE)
    if expected_state in (lc.SESSION_STATE_ACTIVE, lc.SESSION_STATE_PAUSED):
        got = await wm.Get(pb.GetRequest(**scope, key="k"))
        assert python(got.entry.value) == "before"
    else:
        await expect_error(wm.Get(pb.GetRequest(**scope, key="k")), grpc.StatusCode.NOT_FOUND)
