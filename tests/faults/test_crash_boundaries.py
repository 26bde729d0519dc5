"""memsvc killed exactly between the working-memory step and the database step of
each lifecycle operation, and exactly between the commit and the last step.

The failpoint ``<op>.after_prepare=crash`` ends the process after step 1 (a
transitional marker and a snapshot or staged restore in Redis), before the
database commits; ``<op>.before_finish=crash`` ends it after the commit, before
step 3 settles Redis. The crash action is ``os._exit``: like SIGKILL, no cleanup,
``finally`` or undo runs, and the kernel closes the sockets.

After a restart without failpoints, each case checks, as a client can see it:

- the session is in the old state (not committed) or the new one (committed);
- the event log agrees: the last transition event is the state, the operation's
  event (with its request id) is there exactly when it committed;
- every checkpoint is complete (all its entries decode) or absent;
- the working memory matches the state: the old contents and writable after an
  uncommitted pause, read-only after a committed one, the checkpoint's contents
  after a committed resume, gone after a committed terminate;
- retrying the call with the same request id completes it with exactly one
  effect (one event, one checkpoint, one episode), and a second retry returns the
  same answer and changes nothing.

tests/integration/test_crash_recovery.py covers pause and resume on the shared
backends with the session state and working memory only; this suite adds spawn
and terminate, the event log, checkpoint completeness, episodes, and retries.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis

from memsvc.domain import SessionRef
from memsvc.failpoints import CRASH_EXIT_STATUS
from memsvc.store.redis import session_keys
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from tests.faults._support import (
    STATE_OF_EVENT,
    Stubs,
    checkpoint_ids,
    episodes_of,
    expect_code,
    read_log,
    wait_serving,
)
from tests.faults.conftest import Rig, RigFactory
from tests.helpers import checkpoint_with_contents, value, whole_memory

ACTIVE, PAUSED, TERMINATED = (
    lc.SESSION_STATE_ACTIVE,
    lc.SESSION_STATE_PAUSED,
    lc.SESSION_STATE_TERMINATED,
)
# The working memory as spawned, then as it is when the operation runs.
SEED = {"plan": {"steps": ["search", "summarise"]}, "budget": 3}
LATER = {"notes": ["found 3 papers"], "draft": "v1"}

# (operation, failpoint): the state before, after, and the event the operation appends.
CASES = {
    ("spawn", "after_prepare"): (None, None),
    ("spawn", "before_finish"): (None, ACTIVE),
    ("pause", "after_prepare"): (ACTIVE, ACTIVE),
    ("pause", "before_finish"): (ACTIVE, PAUSED),
    ("resume", "after_prepare"): (PAUSED, PAUSED),
    ("resume", "before_finish"): (PAUSED, ACTIVE),
    ("terminate", "after_prepare"): (ACTIVE, ACTIVE),
    ("terminate", "before_finish"): (ACTIVE, TERMINATED),
    ("terminate-keep", "after_prepare"): (PAUSED, PAUSED),
    ("terminate-keep", "before_finish"): (PAUSED, TERMINATED),
}
EVENT_OF = {
    "spawn": lc.EVENT_TYPE_SESSION_SPAWNED,
    "pause": lc.EVENT_TYPE_SESSION_PAUSED,
    "resume": lc.EVENT_TYPE_SESSION_RESUMED,
    "terminate": lc.EVENT_TYPE_SESSION_TERMINATED,
    "terminate-keep": lc.EVENT_TYPE_SESSION_TERMINATED,
}


@dataclass
class Session:
    """What the test did to its session before the crash."""

    ids: dict[str, Any]
    events: list[int] = field(default_factory=list)
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)


async def prepare(stubs: Stubs, session: Session, operation: str) -> None:
    """Bring the session to where ``operation`` runs, with a checkpoint to keep."""
    if operation == "spawn":
        return
    await stubs.life.Spawn(
        lc.SpawnRequest(
            **session.ids,
            initial_entries=[pb.EntryInput(key=k, value=value(v)) for k, v in SEED.items()],
        ),
        timeout=10,
    )
    session.events.append(lc.EVENT_TYPE_SESSION_SPAWNED)
    session.memory = dict(SEED)
    # A checkpoint of the seed: Resume rolls back to it, Terminate deletes it.
    mark = await stubs.life.CreateCheckpoint(
        lc.CreateCheckpointRequest(**session.ids, checkpoint_id="seed"), timeout=10
    )
    session.events.append(lc.EVENT_TYPE_CHECKPOINT_CREATED)
    session.checkpoints[mark.checkpoint.checkpoint_id] = dict(SEED)
    for key, data in LATER.items():
        await stubs.wm.Set(pb.SetRequest(**session.ids, key=key, value=value(data)), timeout=10)
        session.memory[key] = data
    if operation in ("resume", "terminate-keep"):
        paused = await stubs.life.Pause(lc.PauseRequest(**session.ids), timeout=10)
        session.events.append(lc.EVENT_TYPE_SESSION_PAUSED)
        session.checkpoints[paused.checkpoint.checkpoint_id] = dict(session.memory)


def the_call(stubs: Stubs, session: Session, operation: str, request_id: str) -> Any:
    """The operation under test, with its request id (a fresh call object each time)."""
    ids = session.ids
    if operation == "spawn":
        seed = [pb.EntryInput(key=k, value=value(v)) for k, v in SEED.items()]
        return stubs.life.Spawn(
            lc.SpawnRequest(**ids, initial_entries=seed, request_id=request_id), timeout=10
        )
    if operation == "pause":
        return stubs.life.Pause(lc.PauseRequest(**ids, request_id=request_id), timeout=10)
    if operation == "resume":
        # A rollback to the seed checkpoint, so the old and new memory differ.
        return stubs.life.Resume(
            lc.ResumeRequest(**ids, checkpoint_id="seed", request_id=request_id), timeout=10
        )
    return stubs.life.Terminate(
        lc.TerminateRequest(
            **ids,
            task_description="crash boundary",
            keep_working_memory=operation == "terminate-keep",
            request_id=request_id,
        ),
        timeout=10,
    )


def marker_state(rig: Rig, ids: dict[str, Any]) -> str | None:
    """The session's Redis marker state, read straight from Redis."""
    with redis.Redis(port=rig.redis.port, socket_timeout=5) as client:
        raw = client.hget(session_keys(SessionRef(**ids))[3], "state")
    return None if raw is None else bytes(raw).decode()


async def session_log(stubs: Stubs, session: Session) -> list[lc.LifecycleEvent]:
    return await read_log(stubs, **session.ids)


async def check_consistent(
    stubs: Stubs, session: Session, state: int | None, operation: str
) -> list[lc.LifecycleEvent]:
    """Everything a client can see agrees with ``state`` (None: never spawned)."""
    ids = session.ids
    log = await session_log(stubs, session)
    assert [int(e.event_type) for e in log] == session.events
    if state is None:
        await expect_code(
            stubs.life.GetSession(lc.GetSessionRequest(**ids), timeout=10),
            grpc.StatusCode.NOT_FOUND,
        )
        assert not log
        refused = await expect_code(
            stubs.wm.Set(pb.SetRequest(**ids, key="k", value=value(1)), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert refused.reason == "ERROR_REASON_SESSION_NOT_WRITABLE", refused
        await expect_code(
            stubs.wm.Get(pb.GetRequest(**ids, key="plan"), timeout=10), grpc.StatusCode.NOT_FOUND
        )
        assert not await episodes_of(stubs, ids["project_id"])
        return log
    reply = (await stubs.life.GetSession(lc.GetSessionRequest(**ids), timeout=10)).session
    assert reply.state == state
    transitions = [e for e in log if e.event_type in STATE_OF_EVENT]
    assert STATE_OF_EVENT[transitions[-1].event_type] == state, "state and event log disagree"
    assert reply.version == len(transitions)
    # Checkpoints: exactly the expected ones, each complete.
    assert sorted(await checkpoint_ids(stubs, ids)) == sorted(session.checkpoints)
    for checkpoint_id, contents in session.checkpoints.items():
        checkpoint, stored = await checkpoint_with_contents(stubs.life, ids, checkpoint_id)
        assert stored == contents, f"checkpoint {checkpoint_id} is not complete"
        assert checkpoint.key_count == len(contents)
    # Episodes: one per committed terminate.
    episodes = await episodes_of(
        stubs,
        ids["project_id"],
        agent_instance_id=ids["agent_instance_id"],
        session_id=ids["session_id"],
    )
    terminated = [e for e in log if e.event_type == lc.EVENT_TYPE_SESSION_TERMINATED]
    assert [e.episode_id for e in episodes] == [e.episode_id for e in terminated]
    # Working memory follows the state. A write first: a refused write heals a
    # transitional marker (reads do too: see the test below).
    write = stubs.wm.Set(pb.SetRequest(**ids, key="probe", value=value(1)), timeout=10)
    if state == ACTIVE:
        await write
        await stubs.wm.Delete(pb.DeleteRequest(**ids, key="probe"), timeout=10)
    else:
        refused = await expect_code(write, grpc.StatusCode.FAILED_PRECONDITION)
        assert refused.reason == "ERROR_REASON_SESSION_NOT_WRITABLE", refused
    if state == TERMINATED and operation != "terminate-keep":
        await expect_code(
            stubs.wm.Get(pb.GetRequest(**ids, key="plan"), timeout=10), grpc.StatusCode.NOT_FOUND
        )
        return log
    assert await whole_memory(stubs.wm, ids) == session.memory
    if state != TERMINATED:
        reply = (await stubs.life.GetSession(lc.GetSessionRequest(**ids), timeout=10)).session
        assert reply.working_memory_status == lc.WORKING_MEMORY_STATUS_INTACT
    return log


def change_events(log: list[lc.LifecycleEvent], request_id: str) -> list[lc.LifecycleEvent]:
    """The events of the call with ``request_id`` that change the session (a
    Terminate's CHECKPOINT_DELETED events carry its request id too)."""
    return [
        e
        for e in log
        if e.request_id == request_id and e.event_type != lc.EVENT_TYPE_CHECKPOINT_DELETED
    ]


def apply(session: Session, operation: str, checkpoint_id: str) -> None:
    """What the operation, once done, did to the session (``checkpoint_id``: the
    one a pause made)."""
    if operation == "terminate":  # each checkpoint it deletes is announced first
        session.events += [lc.EVENT_TYPE_CHECKPOINT_DELETED] * len(session.checkpoints)
    session.events.append(EVENT_OF[operation])
    if operation == "spawn":
        session.memory = dict(SEED)
    elif operation == "pause":
        session.checkpoints[checkpoint_id] = dict(session.memory)
    elif operation == "resume":
        session.memory = dict(session.checkpoints["seed"])
    elif operation == "terminate":
        session.checkpoints.clear()
        session.memory = {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("operation", "point"), list(CASES), ids=[f"{o}.{p}" for o, p in CASES])
async def test_crash_at_the_boundary_then_retry(make_rig: RigFactory, operation: str, point: str):
    rig = make_rig()
    failpoint = f"{operation.removesuffix('-keep')}.{point}"
    memsvc = rig.start(failpoints=f"{failpoint}=crash")
    state_before, state_after = CASES[operation, point]
    committed = point == "before_finish"
    session = Session(
        {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4()),
         "session_id": f"crash-{operation}"}
    )  # fmt: skip
    request_id = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await prepare(stubs, session, operation)
        await check_consistent(stubs, session, state_before, operation)
        await expect_code(
            the_call(stubs, session, operation, request_id), grpc.StatusCode.UNAVAILABLE
        )
    assert memsvc.wait(30) == CRASH_EXIT_STATUS, memsvc.log_tail()
    # The crash fell between the steps: the marker it left is transitional.
    transitional = {"spawn": "spawning", "pause": "pausing", "resume": "resuming"}
    assert marker_state(rig, session.ids) == transitional.get(operation, "terminating")

    memsvc.start()
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await wait_serving(stubs)
        # Only the event log can say what a crashed call did: its answer was lost.
        ours = change_events(await session_log(stubs, session), request_id)
        assert len(ours) == (1 if committed else 0), "the crashed call's event"
        if committed:
            apply(session, operation, ours[0].checkpoint_id)
        await check_consistent(stubs, session, state_after, operation)

        # The client retries with the same request id: exactly one effect in all.
        reply = await the_call(stubs, session, operation, request_id)
        if not committed:
            apply(session, operation, getattr(reply, "checkpoint", lc.Checkpoint()).checkpoint_id)
        log = await check_consistent(
            stubs, session, CASES[operation, "before_finish"][1], operation
        )
        ours = change_events(log, request_id)
        assert len(ours) == 1, "one event for the request id"
        assert_same_answer(operation, reply, ours[0])
        # Once more: the same answer, and nothing new.
        assert await the_call(stubs, session, operation, request_id) == reply
        assert len(await session_log(stubs, session)) == len(log)


def assert_same_answer(operation: str, reply: Any, event: lc.LifecycleEvent) -> None:
    """The answer names what the event recorded (for a retry: the first call's)."""
    if operation == "pause":
        assert reply.checkpoint.checkpoint_id == event.checkpoint_id
    elif operation.startswith("terminate"):
        assert reply.episode_id == event.episode_id
    elif operation == "resume":
        assert reply.checkpoint.checkpoint_id == event.checkpoint_id == "seed"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("operation", ["resume", "terminate"])
async def test_the_first_read_after_a_crash_past_the_commit_sees_the_commit(
    make_rig: RigFactory, operation: str
):
    """Resume rolls the session back to the seed checkpoint (no "draft" key there);
    Terminate deletes the working memory. Both commit, then memsvc dies before step 3.
    The database says so at once; the first read must agree with it."""
    rig = make_rig()
    memsvc = rig.start(failpoints=f"{operation}.before_finish=crash")
    session = Session(
        {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4()),
         "session_id": f"read-after-{operation}"}
    )  # fmt: skip
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await prepare(stubs, session, "resume" if operation == "resume" else "terminate")
        await expect_code(
            the_call(stubs, session, operation, str(uuid.uuid4())), grpc.StatusCode.UNAVAILABLE
        )
    assert memsvc.wait(30) == CRASH_EXIT_STATUS
    memsvc.start()
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await wait_serving(stubs)
        expected = ACTIVE if operation == "resume" else TERMINATED
        got = (await stubs.life.GetSession(lc.GetSessionRequest(**session.ids))).session
        assert got.state == expected
        # "draft" was written after the seed checkpoint: gone after either commit.
        await expect_code(
            stubs.wm.Get(pb.GetRequest(**session.ids, key="draft"), timeout=10),
            grpc.StatusCode.NOT_FOUND,
        )


@pytest.mark.timeout(60)
async def test_a_spawn_retried_after_a_restart_returns_the_first_answer(make_rig: RigFactory):
    """A Spawn commits, memsvc dies before answering, the client retries it (same
    request, same request id) on the restarted process: it must get the first answer.
    The two processes differ only in their hash seed (as any two processes do)."""
    rig = make_rig()
    memsvc = rig.start(failpoints="spawn.before_finish=crash", env={"PYTHONHASHSEED": "1"})
    ids: dict[str, Any] = {"project_id": str(uuid.uuid4()), "agent_instance_id": str(uuid.uuid4()),
           "session_id": "retried-spawn"}  # fmt: skip
    plan = {f"step-{n}": n for n in range(20)}  # an object with many fields
    request = lc.SpawnRequest(
        **ids,
        initial_entries=[pb.EntryInput(key="plan", value=value(plan))],
        request_id=str(uuid.uuid4()),
    )
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await expect_code(stubs.life.Spawn(request, timeout=10), grpc.StatusCode.UNAVAILABLE)
    assert memsvc.wait(30) == CRASH_EXIT_STATUS
    memsvc.start(env={"PYTHONHASHSEED": "2"})
    async with grpc.aio.insecure_channel(memsvc.target) as channel:
        stubs = Stubs(channel)
        await wait_serving(stubs)
        reply = await stubs.life.Spawn(request, timeout=10)
        assert reply.session.state == ACTIVE
