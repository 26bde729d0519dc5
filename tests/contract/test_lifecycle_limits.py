"""LifecycleService contract: the checkpoints-per-session limit (both deployments)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import expect_error, value


@pytest.fixture
def config_overrides(request: pytest.FixtureRequest) -> dict[str, object]:
    overrides: dict[str, object] = getattr(request, "param", {"max_checkpoints_per_session": 2})
    return overrides


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


async def checkpoint_ids(life: LifecycleServiceStub, scope: dict[str, Any]) -> list[str]:
    page = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope))
    return sorted(c.checkpoint_id for c in page.checkpoints)


async def test_past_the_checkpoint_limit_pause_and_create_are_refused_and_change_nothing(
    life: LifecycleServiceStub, wm: WorkingMemoryServiceStub, scope: dict[str, Any]
):
    await life.Spawn(lc.SpawnRequest(**scope))
    for checkpoint_id in ("one", "two"):
        await life.CreateCheckpoint(
            lc.CreateCheckpointRequest(**scope, checkpoint_id=checkpoint_id)
        )
    created = await expect_error(
        life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="three")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert created.reason == "ERROR_REASON_CHECKPOINT_LIMIT"
    assert created.metadata == {"limit": "2", **scope}
    assert created.quota_subjects == ["checkpoints per session"]
    paused = await expect_error(
        life.Pause(lc.PauseRequest(**scope, checkpoint_id="resume-point")),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert paused.reason == "ERROR_REASON_CHECKPOINT_LIMIT"
    # Nothing changed: still ACTIVE and writable, the same two checkpoints, no event.
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == lc.SESSION_STATE_ACTIVE
    await wm.Set(pb.SetRequest(**scope, key="k", value=value(1)))
    assert await checkpoint_ids(life, scope) == ["one", "two"]
    # Room again once one is deleted.
    await life.DeleteCheckpoint(lc.DeleteCheckpointRequest(**scope, checkpoint_id="one"))
    await life.Pause(lc.PauseRequest(**scope, checkpoint_id="resume-point"))
    assert await checkpoint_ids(life, scope) == ["resume-point", "two"]


async def test_concurrent_checkpoints_without_ids_stop_at_the_limit(
    life: LifecycleServiceStub, scope: dict[str, Any]
):
    # Each waits for the session's lock while another commits: the count it checks
    # must include the checkpoints committed meanwhile (PostgreSQL reads a
    # statement's subqueries with the snapshot from before it waited).
    await life.Spawn(lc.SpawnRequest(**scope))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))

    async def create() -> grpc.StatusCode:
        try:
            await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(create() for _ in range(8)))
    assert sorted(code.name for code in codes) == ["OK"] + ["RESOURCE_EXHAUSTED"] * 7
    assert len(await checkpoint_ids(life, scope)) == 2


PRUNING = {"max_checkpoints_per_session": 2, "checkpoint_keep_last": 1}
# keep_last at the limit: the prune after each insert makes room as well.
PRUNING_AT_THE_LIMIT = {"max_checkpoints_per_session": 2, "checkpoint_keep_last": 2}


@pytest.mark.parametrize(
    "config_overrides", [PRUNING, PRUNING_AT_THE_LIMIT], indirect=True, ids=["below", "at"]
)
async def test_keep_last_up_to_the_limit_prunes_instead_of_refusing(
    life: LifecycleServiceStub, scope: dict[str, Any], config_overrides: dict[str, object]
):
    await life.Spawn(lc.SpawnRequest(**scope))
    for checkpoint_id in ("one", "two", "three"):
        await life.CreateCheckpoint(
            lc.CreateCheckpointRequest(**scope, checkpoint_id=checkpoint_id)
        )
    kept = ["three", "two"][: int(str(config_overrides["checkpoint_keep_last"]))]
    assert await checkpoint_ids(life, scope) == sorted(kept)


@pytest.mark.parametrize(
    "config_overrides", [PRUNING, PRUNING_AT_THE_LIMIT], indirect=True, ids=["below", "at"]
)
async def test_a_new_checkpoint_is_never_pruned_by_its_own_call(
    life: LifecycleServiceStub,
    scope: dict[str, Any],
    server: Any,
    monkeypatch: pytest.MonkeyPatch,
    config_overrides: dict[str, object],
):
    """Stamped earlier than the newest one (a replica whose clock is behind, a
    clock stepped back), it still survives the prune that makes room for it, and
    counts among the ones kept: the session holds keep_last checkpoints, never one
    more (at the limit, the count is not checked: the prune keeps to it)."""
    await life.Spawn(lc.SpawnRequest(**scope))
    for checkpoint_id in ("one", "two"):
        await life.CreateCheckpoint(
            lc.CreateCheckpointRequest(**scope, checkpoint_id=checkpoint_id)
        )
    behind = server.lifecycle._clock_ms() - 60_000
    monkeypatch.setattr(server.lifecycle, "_clock_ms", lambda: behind)
    made = await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="late"))
    got = await life.GetCheckpoint(lc.GetCheckpointRequest(**scope, checkpoint_id="late"))
    assert got.checkpoint.create_time == made.checkpoint.create_time
    kept = ["late", "two"][: int(str(config_overrides["checkpoint_keep_last"]))]
    assert await checkpoint_ids(life, scope) == sorted(kept)


@pytest.mark.parametrize("config_overrides", [{"max_session_keys": 2}], indirect=True)
@pytest.mark.parametrize("paused", [False, True], ids=["active", "paused"])
async def test_a_merge_resume_past_the_key_limit_is_refused_and_changes_nothing(
    life: LifecycleServiceStub, wm: WorkingMemoryServiceStub, scope: dict[str, Any], paused: bool
):
    """The checkpoint's keys over the current ones (a PAUSED session's: those it
    paused with) would pass the session's key limit: refused, nothing changes."""
    await life.Spawn(lc.SpawnRequest(**scope))
    await wm.Set(pb.SetRequest(**scope, key="a", value=value(1)))
    earlier = (await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope))).checkpoint
    await wm.Delete(pb.DeleteRequest(**scope, key="a"))
    await wm.Set(pb.SetRequest(**scope, key="b", value=value(2)))
    await wm.Set(pb.SetRequest(**scope, key="c", value=value(3)))
    if paused:
        await life.Pause(lc.PauseRequest(**scope))
    refused = await expect_error(
        life.Resume(
            lc.ResumeRequest(**scope, checkpoint_id=earlier.checkpoint_id, merge_with_current=True)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert refused.reason == "ERROR_REASON_SESSION_KEY_LIMIT"
    assert (refused.metadata["current"], refused.metadata["requested"]) == ("2", "3")
    session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
    assert session.state == (lc.SESSION_STATE_PAUSED if paused else lc.SESSION_STATE_ACTIVE)
    if paused:
        await life.Resume(lc.ResumeRequest(**scope))
    listed = await wm.ListKeys(pb.ListKeysRequest(**scope))
    assert [info.key for info in listed.keys] == ["b", "c"]
