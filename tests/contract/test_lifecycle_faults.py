"""LifecycleService contract: failures at each boundary of each operation recover.

Failpoints with the ``error`` action fail an operation exactly after its
working-memory step 1 (nothing committed: everything must be as before) or
exactly after its commit (the answer is lost but the change is made: the next
call that meets the transitional marker must settle it). ADR 0004 has the table.

The old and the new state always differ, in every key: the session takes a
"seed" checkpoint, then changes a key and adds others; Resume rolls back to the
seed, Pause takes a checkpoint of the later memory, Terminate ends it all. Each
case compares the whole working memory, the checkpoints and their contents, the
event log and the episodes with exactly the old state or exactly the new one,
then retries the call with the same request id (tests/faults/test_crash_boundaries.py
does the same with a real crash, on the production deployment only).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from memsvc.failpoints import POINTS, Failpoints
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import (
    LoggedEvent,
    checkpoint_contents,
    expect_error,
    lifecycle_log,
    session_episodes,
    value,
    whole_memory,
)

ACTIVE, PAUSED, TERMINATED = (
    lc.SESSION_STATE_ACTIVE,
    lc.SESSION_STATE_PAUSED,
    lc.SESSION_STATE_TERMINATED,
)
# The working memory as spawned; then what is written after the seed checkpoint
# (one key changed, two added), so that the old and the new memory differ.
SEED = {"plan": {"steps": ["search", "summarise"]}, "budget": 3}
LATER = {"budget": 2, "notes": ["found 3 papers"], "draft": "v1"}
# The state each operation starts from and leaves.
BEFORE = {"spawn": None, "pause": ACTIVE, "resume": PAUSED, "terminate": ACTIVE}
AFTER = {"spawn": ACTIVE, "pause": PAUSED, "resume": ACTIVE, "terminate": TERMINATED}
EVENT_OF = {
    "spawn": lc.EVENT_TYPE_SESSION_SPAWNED,
    "pause": lc.EVENT_TYPE_SESSION_PAUSED,
    "resume": lc.EVENT_TYPE_SESSION_RESUMED,
    "terminate": lc.EVENT_TYPE_SESSION_TERMINATED,
}
TRANSITIONS = frozenset(EVENT_OF.values())


@pytest.fixture(params=POINTS)
def point(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def config_overrides(point: str) -> dict[str, object]:
    return {"failpoints": f"{point}=error"}


@pytest.fixture
def life(channel: grpc.aio.Channel) -> LifecycleServiceStub:
    return LifecycleServiceStub(channel)


@dataclass
class Model:
    """What the session must look like: the test's record of what it did."""

    state: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (event type, checkpoint or episode id, request id) of every event, in order.
    events: list[tuple[int, str | None, str | None]] = field(default_factory=list)
    episodes: list[str] = field(default_factory=list)
    resume_checkpoint: str = ""


def entries(data: dict[str, Any]) -> list[pb.EntryInput]:
    return [pb.EntryInput(key=k, value=value(v)) for k, v in data.items()]


async def prepare(
    life: LifecycleServiceStub, wm: WorkingMemoryServiceStub, scope: dict[str, Any], operation: str
) -> Model:
    """Bring the session to where ``operation`` runs: a seed checkpoint, then more
    written after it (and, for resume, paused)."""
    model = Model()
    if operation == "spawn":
        return model
    await life.Spawn(lc.SpawnRequest(**scope, initial_entries=entries(SEED)))
    model.state, model.memory = ACTIVE, dict(SEED)
    model.events.append((lc.EVENT_TYPE_SESSION_SPAWNED, None, None))
    await life.CreateCheckpoint(lc.CreateCheckpointRequest(**scope, checkpoint_id="seed"))
    model.checkpoints["seed"] = dict(SEED)
    model.events.append((lc.EVENT_TYPE_CHECKPOINT_CREATED, "seed", None))
    for key, data in LATER.items():
        await wm.Set(pb.SetRequest(**scope, key=key, value=value(data)))
    model.memory.update(LATER)
    if operation == "resume":
        paused = (await life.Pause(lc.PauseRequest(**scope))).checkpoint.checkpoint_id
        model.state, model.resume_checkpoint = PAUSED, paused
        model.checkpoints[paused] = dict(model.memory)
        model.events.append((lc.EVENT_TYPE_SESSION_PAUSED, paused, None))
    return model


def the_call(
    life: LifecycleServiceStub, scope: dict[str, Any], operation: str, request_id: str
) -> Any:
    """The operation under test (a fresh call object each time)."""
    if operation == "spawn":
        request = lc.SpawnRequest(**scope, initial_entries=entries(SEED), request_id=request_id)
        return life.Spawn(request)
    if operation == "pause":
        return life.Pause(lc.PauseRequest(**scope, request_id=request_id))
    if operation == "resume":
        # A rollback to the seed: every key of the old memory differs from the new.
        return life.Resume(lc.ResumeRequest(**scope, checkpoint_id="seed", request_id=request_id))
    return life.Terminate(lc.TerminateRequest(**scope, request_id=request_id))


def apply(model: Model, operation: str, request_id: str, ref: str) -> None:
    """What ``operation`` does once committed (``ref``: the checkpoint a Pause took,
    the episode a Terminate recorded, as its event names them)."""
    if operation == "terminate":  # each checkpoint it deletes is announced first
        model.events += [
            (lc.EVENT_TYPE_CHECKPOINT_DELETED, name, request_id) for name in model.checkpoints
        ]
    model.state = AFTER[operation]
    if operation == "spawn":
        model.memory = dict(SEED)
        ref = ""
    elif operation == "pause":
        model.checkpoints[ref] = dict(model.memory)
        model.resume_checkpoint = ref
    elif operation == "resume":
        model.memory = dict(model.checkpoints["seed"])
        assert ref == "seed"
    else:
        model.memory, model.checkpoints = {}, {}
        model.episodes.append(ref)
    model.events.append((EVENT_OF[operation], ref or None, request_id))


def ours(log: list[LoggedEvent], request_id: str) -> list[LoggedEvent]:
    """The change events of the call with ``request_id`` (a Terminate's
    CHECKPOINT_DELETED events carry its request id too)."""
    return [e for e in log if e.request_id == request_id and e.event_type in TRANSITIONS]


async def check(
    life: LifecycleServiceStub,
    wm: WorkingMemoryServiceStub,
    channel: grpc.aio.Channel,
    database_url: str,
    scope: dict[str, Any],
    model: Model,
) -> list[LoggedEvent]:
    """Everything a client can see is exactly ``model``: returns the event log."""
    # The working memory first, whole: the first read after a commit must see it.
    if model.state in (ACTIVE, PAUSED):
        assert await whole_memory(wm, scope) == model.memory
    else:
        await expect_error(whole_memory(wm, scope), grpc.StatusCode.NOT_FOUND)
    log = await lifecycle_log(database_url, scope)
    assert [(e.event_type, e.ref, e.request_id) for e in log] == model.events
    # Gap-free: a call that failed before its commit took no sequence number.
    first = log[0].sequence if log else 0
    assert [e.sequence for e in log] == list(range(first, first + len(log)))
    assert await session_episodes(channel, scope) == model.episodes
    if model.state is None:
        await expect_error(
            life.GetSession(lc.GetSessionRequest(**scope)), grpc.StatusCode.NOT_FOUND
        )
        await expect_error(
            life.ListCheckpoints(lc.ListCheckpointsRequest(**scope)), grpc.StatusCode.NOT_FOUND
        )
    else:
        session = (await life.GetSession(lc.GetSessionRequest(**scope))).session
        assert session.state == model.state
        assert session.version == len([e for e in log if e.event_type in TRANSITIONS])
        if model.state == PAUSED:
            assert session.resume_checkpoint_id == model.resume_checkpoint
        if model.state != TERMINATED:
            assert session.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
        listed = await life.ListCheckpoints(lc.ListCheckpointsRequest(**scope, page_size=100))
        assert sorted(c.checkpoint_id for c in listed.checkpoints) == sorted(model.checkpoints)
        for name, contents in model.checkpoints.items():
            assert await checkpoint_contents(life, scope, name) == contents, name
    # Writable exactly when ACTIVE (a refused write heals a transitional marker too).
    write = wm.Set(pb.SetRequest(**scope, key="probe", value=value(1)))
    if model.state == ACTIVE:
        await write
        await wm.Delete(pb.DeleteRequest(**scope, key="probe"))
    else:
        await expect_error(write, grpc.StatusCode.FAILED_PRECONDITION)
    return log


async def test_failure_at_each_boundary_leaves_old_or_new_state(
    life, wm, channel, server, scope, point, monkeypatch
):
    operation, when = point.split(".")
    committed = when == "before_finish"
    database = server.config.database_url
    model = await prepare(life, wm, scope, operation)
    assert model.state == BEFORE[operation]
    await check(life, wm, channel, database, scope, model)
    request_id = str(uuid.uuid4())
    await expect_error(the_call(life, scope, operation, request_id), grpc.StatusCode.INTERNAL)

    # Only the event log says what the failed call did: its answer was lost.
    mine = ours(await lifecycle_log(database, scope), request_id)
    assert len(mine) == (1 if committed else 0)
    if committed:
        apply(model, operation, request_id, mine[0].ref or "")
    await check(life, wm, channel, database, scope, model)

    if committed:
        # The retry returns the stored answer (it never reaches the failpoint).
        reply = await the_call(life, scope, operation, request_id)
    else:
        # Nothing was remembered: the retry runs anew, fails at the same point,
        # and again changes nothing; without the failpoint it completes.
        await expect_error(the_call(life, scope, operation, request_id), grpc.StatusCode.INTERNAL)
        await check(life, wm, channel, database, scope, model)
        monkeypatch.setattr(server.lifecycle, "_failpoints", Failpoints())
        reply = await the_call(life, scope, operation, request_id)
        mine = ours(await lifecycle_log(database, scope), request_id)
        assert len(mine) == 1
        apply(model, operation, request_id, mine[0].ref or "")
    assert reply.session.state == AFTER[operation]
    if operation == "pause":
        assert reply.checkpoint.checkpoint_id == model.resume_checkpoint
    elif operation == "resume":
        assert reply.checkpoint.checkpoint_id == "seed"
    elif operation == "terminate":
        assert [reply.episode_id] == model.episodes
    log = await check(life, wm, channel, database, scope, model)
    # Once more: the same answer, and nothing new.
    assert await the_call(life, scope, operation, request_id) == reply
    assert await lifecycle_log(database, scope) == log
