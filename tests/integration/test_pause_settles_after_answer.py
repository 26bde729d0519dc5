"""A Pause answers once it has committed; its marker settles after the answer.

Whatever meets the session meanwhile sees a paused session: a read is served, a
write waits for the step this process runs and is refused (FAILED_PRECONDITION),
and a Resume heals the marker by the committed state and goes on. The late step 3
then finds the marker taken and changes nothing. The store here holds the Pause's
own step 3 until released.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from memsvc.domain import SessionRef
from memsvc.domain._snapshot import encode_snapshot
from memsvc.server import Server
from memsvc.store.memory import InMemoryWorkingMemoryStore
from memsvc.v1 import lifecycle_pb2 as lc
from memsvc.v1 import working_memory_pb2 as pb
from memsvc.v1.lifecycle_pb2_grpc import LifecycleServiceStub
from memsvc.v1.working_memory_pb2_grpc import WorkingMemoryServiceStub
from tests.helpers import python, value
from tests.integration._held_step import HeldStep3, serving


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Server, HeldStep3, grpc.aio.Channel]]:
    # The first step 3 of a Pause (final state paused); a heal's after it goes through.
    def holds(final_state: str | None, swap: bool) -> bool:
        return final_state == "paused"

    async with serving(holds, tmp_path) as served:
        yield served


def new_ids() -> dict[str, Any]:
    return {
        "project_id": str(uuid.uuid4()),
        "agent_instance_id": str(uuid.uuid4()),
        "session_id": "settles-late",
    }


async def paused_with_step_3_held(
    store: HeldStep3, channel: grpc.aio.Channel, ids: dict[str, Any]
) -> SessionRef:
    """A session spawned with k='kept' and paused, its step 3 held."""
    life = LifecycleServiceStub(channel)
    await life.Spawn(lc.SpawnRequest(**ids, initial_entries=[
        pb.EntryInput(key="k", value=value("kept"))]))  # fmt: skip
    paused = await life.Pause(lc.PauseRequest(**ids))
    assert paused.session.state == lc.SESSION_STATE_PAUSED
    assert store.held == 1, "the answer came while step 3 was still held"
    ref = SessionRef(ids["project_id"], ids["agent_instance_id"], ids["session_id"])
    marker = await store.read_marker(ref)
    assert marker is not None and marker.state == "pausing"
    return ref


async def test_a_pause_answers_before_its_marker_settles(rig):
    """Reads are served meanwhile; a write waits for the step, then is refused."""
    server, store, channel = rig
    ids = new_ids()
    ref = await paused_with_step_3_held(store, channel, ids)
    wm = WorkingMemoryServiceStub(channel)
    assert python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == "kept"
    write = asyncio.ensure_future(wm.Set(pb.SetRequest(**ids, key="k", value=value("lost"))))
    await asyncio.sleep(0.2)
    assert not write.done(), "it waits for the step this process runs"

    store.release.set()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(write, 10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is paused" in (refused.value.details() or "")
    await server.lifecycle.settled()
    assert store.outcomes == ["settled"], "the step settled the marker itself"
    assert (await store.read_marker(ref)).state == "paused"
    assert python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == "kept"


async def test_a_resume_heals_a_pause_still_settling(rig):
    """A Resume meeting 'pausing' heals it by the committed state and goes on; the
    late step 3 then finds the marker taken and changes nothing."""
    server, store, channel = rig
    ids = new_ids()
    ref = await paused_with_step_3_held(store, channel, ids)
    life, wm = LifecycleServiceStub(channel), WorkingMemoryServiceStub(channel)
    resumed = await life.Resume(lc.ResumeRequest(**ids))
    assert resumed.session.state == lc.SESSION_STATE_ACTIVE
    assert resumed.entries_restored == 1

    store.release.set()
    await server.lifecycle.settled()
    assert store.outcomes == ["LostOperation"], "the late step 3 found the marker taken"
    await wm.Set(pb.SetRequest(**ids, key="k", value=value("after")))
    assert python((await wm.Get(pb.GetRequest(**ids, key="k"))).entry.value) == "after"
    assert (await store.read_marker(ref)).state == "active"


async def test_a_call_waiting_for_a_step_another_caller_settled_heals_what_came_next(rig):
    """Found by a review: a call that met the marker waited for this process's step 3
    and took its end for a settled marker. But another caller (a replica) had healed
    that Pause meanwhile and begun the next operation, whose marker the call then
    met again and reported, though a heal settles it: a read was refused."""
    _, store, channel = rig
    ids = new_ids()
    ref = await paused_with_step_3_held(store, channel, ids)
    marker = await store.read_marker(ref)
    assert marker is not None and marker.op is not None
    # Another replica heals the Pause (its marker 'paused'), then begins a Resume
    # that it has not committed (and never will: it died).
    await InMemoryWorkingMemoryStore.finish(store, ref, marker.op, "paused", False, False)
    empty = encode_snapshot([])
    await store.begin_restore(ref, "a-dead-resume", "epoch-never", empty, False, {"paused"})
    assert (await store.read_marker(ref)).state == "resuming"

    wm = WorkingMemoryServiceStub(channel)
    read = asyncio.ensure_future(wm.Get(pb.GetRequest(**ids, key="k")))
    await asyncio.sleep(0.2)
    assert not read.done(), "it waits for this process's step 3"
    store.release.set()
    assert python((await asyncio.wait_for(read, 10)).entry.value) == "kept"
    assert store.outcomes == ["LostOperation"]
    assert (await store.read_marker(ref)).state == "paused", "the dead Resume undone"
